//! The `vdsa` daemon's command line and services:
//! - `tap-serve` receives a hypervisor's tap (QEMU's block mirror over NBD,
//!   or the native tap protocol) for the disks of one stream into a local
//!   journal;
//! - `source` receives the tap and replicates to a target VDSA;
//! - `target` accepts source links and keeps each VPG's journal;
//! - `certs` creates site certificates and pairs sites.
//!
//! Each service has a control socket (`control`: typed line-delimited JSON
//! requests: checkpoint, sync, bandwidth, status, promote, shutdown); taps
//! connect on the `listen` addresses. The
//! `vdsa` binary is a thin wrapper over [`main`].

pub mod control;
pub(crate) mod listen;
mod memory;
pub use memory::keep_freed_memory;

use crate::journal::{Journal, JournalConfig};
use crate::nbd::export::Exports;
use crate::tap::{TapDisk, TapStream};
use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use control::{claim_path, not_served, serve_control, ControlRequest};
use listen::{claim_listeners, serve_taps, NoDurability, TapListener};
use protection_groups::{CheckpointId, CheckpointKind, DiskId, StreamId};
use serde_json::{json, Value};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(name = "vdsa", about = "The virtual data services appliance")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve tap targets (NBD) for the disks of one stream into a journal.
    TapServe {
        /// Journal directory.
        #[arg(long)]
        journal: PathBuf,
        #[command(flatten)]
        taps: TapArgs,
        /// Stream name (one per VDSA and VPG).
        #[arg(long, default_value = "local")]
        stream: String,
        /// Insert an automatic checkpoint every N ms (0: only on request).
        #[arg(long, default_value_t = 0)]
        checkpoint_interval_ms: u64,
        /// A log segment is closed at this size (at least 64K).
        #[arg(long, default_value = "64M")]
        segment_bytes: String,
        /// A chunk pack is closed at this size (at least 64K).
        #[arg(long, default_value = "256M")]
        pack_bytes: String,
        /// For control runs of durability checkers only: FLUSH and FUA are
        /// acknowledged without making anything durable, so a checker can
        /// show that it catches the loss.
        #[arg(long, hide = true)]
        unsafe_no_durability: bool,
    },
    /// Source side of replication: serve taps for the disks of one VPG
    /// stream and replicate their writes to a target VDSA.
    Source(Box<SourceArgs>),
    /// Target side of replication: accept links from source VDSAs and keep
    /// each VPG's journal.
    Target(TargetArgs),
    /// The long-lived VDSA of a host under a site manager: registers,
    /// then runs the roles its site manager asks for.
    Agent(AgentArgs),
    /// The appliance's boot step: turns its OVF environment into the
    /// agent's configuration file and prints the network settings as shell
    /// assignments; a missing or bad property stops it, naming the property.
    ApplianceConfig {
        /// The OVF environment (ovf-env.xml from the appliance's CD-ROM).
        #[arg(long)]
        ovf_env: PathBuf,
        /// The agent's data folder on the appliance's data volume.
        #[arg(long)]
        data: PathBuf,
        /// The agent's configuration file to write.
        #[arg(long)]
        config: PathBuf,
    },
    /// Site certificates for the replication link.
    #[command(subcommand)]
    Certs(CertsCommand),
}

/// `vdsa agent`: a configuration file, each field overridable by a flag.
#[derive(clap::Args, Debug)]
struct AgentArgs {
    /// The configuration file (JSON; see docs/management-protocol.md).
    #[arg(long)]
    config: Option<PathBuf>,
    #[arg(long)]
    name: Option<String>,
    #[arg(long)]
    data: Option<PathBuf>,
    /// HOST:PORT of the site manager's management listener.
    #[arg(long)]
    site_manager: Option<String>,
    #[arg(long, env = "VDSA_REGISTRATION_TOKEN")]
    registration_token: Option<String>,
    #[arg(long)]
    replication_listen: Option<String>,
    #[arg(long)]
    replication_address: Option<String>,
    /// Where taps connect (repeatable; replaces the file's list).
    #[arg(long)]
    tap_listen: Vec<String>,
    /// Where processing stacks are served over NBD (HOST:PORT).
    #[arg(long)]
    export_listen: Option<String>,
    /// Paces a committed failover's promotion (0: unpaced).
    #[arg(long)]
    promotion_bytes_per_sec: Option<u64>,
    #[arg(long)]
    hold_limit_ms: Option<u64>,
    #[arg(long)]
    heartbeat_ms: Option<u64>,
    /// Fault injection for tests: SIGKILL itself after answering the Nth
    /// PREPARE.
    #[arg(long, hide = true)]
    fault_kill_after_prepare: Option<u64>,
}

fn agent_config(a: AgentArgs) -> Result<crate::agent::AgentConfig> {
    let mut cfg = match &a.config {
        Some(p) => crate::agent::AgentConfig::load(p)?,
        None => {
            let need = |v: &Option<String>, flag: &str| v.clone().with_context(|| format!("give --config or --{flag}"));
            serde_json::from_value(json!({
                "name": need(&a.name, "name")?,
                "data": a.data.clone().with_context(|| "give --config or --data")?,
                "site_manager": need(&a.site_manager, "site-manager")?,
                "replication_listen": need(&a.replication_listen, "replication-listen")?,
            }))?
        }
    };
    if let Some(v) = a.name {
        cfg.name = v;
    }
    if let Some(v) = a.data {
        cfg.data = v;
    }
    if let Some(v) = a.site_manager {
        cfg.site_manager = v;
    }
    if let Some(v) = a.registration_token {
        cfg.registration_token = Some(v);
    }
    if let Some(v) = a.replication_listen {
        cfg.replication_listen = v;
    }
    if let Some(v) = a.replication_address {
        cfg.replication_address = Some(v);
    }
    if !a.tap_listen.is_empty() {
        cfg.tap_listen = a.tap_listen;
    }
    if let Some(v) = a.export_listen {
        cfg.export_listen = v;
    }
    if let Some(v) = a.promotion_bytes_per_sec {
        cfg.promotion_bytes_per_sec = v;
    }
    if let Some(v) = a.hold_limit_ms {
        cfg.hold_limit_ms = v;
    }
    if let Some(v) = a.heartbeat_ms {
        cfg.heartbeat_ms = v;
    }
    if let Some(v) = a.fault_kill_after_prepare {
        cfg.fault_kill_after_prepare = v;
    }
    if cfg.name.trim().is_empty() {
        // The deb's default configuration names no host: the machine's.
        cfg.name =
            std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_default();
    }
    Ok(cfg)
}

/// Where taps connect and which disks they write: shared by `tap-serve`
/// and `source`.
#[derive(clap::Args, Debug)]
struct TapArgs {
    /// Where taps connect: unix:PATH or tcp:HOST:PORT for NBD (QEMU's
    /// block mirror), native-unix:PATH or native-tcp:HOST:PORT for the
    /// native tap protocol (docs/tap-protocol.md). Repeatable.
    #[arg(long, required = true)]
    listen: Vec<String>,
    /// Control socket (line-delimited JSON).
    #[arg(long)]
    control: PathBuf,
    /// A protected disk: NAME=SIZE[K|M|G] (repeatable). NAME is its NBD
    /// export name.
    #[arg(long, required = true)]
    disk: Vec<String>,
}

#[derive(clap::Args, Debug)]
struct SourceArgs {
    /// This site's name (in logs and the target's refusals).
    #[arg(long)]
    site: String,
    /// The VPG (its name; the id is derived from it).
    #[arg(long)]
    vpg: String,
    /// Stream name: one per VDSA and VPG.
    #[arg(long, default_value = "host-1")]
    stream: String,
    /// Replication direction's epoch; a target refuses older ones.
    #[arg(long, default_value_t = 1)]
    epoch: u64,
    /// The target VDSA, HOST:PORT.
    #[arg(long)]
    target: String,
    /// Folder with node.pem, node.key and peers/ (see `vdsa certs`).
    #[arg(long)]
    certs: PathBuf,
    #[command(flatten)]
    taps: TapArgs,
    /// Memory for queued writes before they spill to disk.
    #[arg(long, default_value = "128M")]
    queue_memory: String,
    /// The spill file, and how large it may grow.
    #[arg(long)]
    spill: PathBuf,
    #[arg(long, default_value = "4G")]
    spill_size: String,
    /// When memory and spill are full: block the tap, or mark writes in a
    /// dirty bitmap (and resync later).
    #[arg(long, default_value = "block")]
    backpressure: String,
    /// Link bandwidth limit in bytes per second (0: none); changeable live.
    #[arg(long, default_value = "0")]
    bandwidth: String,
    #[arg(long, default_value_t = 1000)]
    heartbeat_ms: u64,
    /// Streams of the VPG placing each checkpoint marker.
    #[arg(long, default_value_t = 1)]
    streams: u16,
    /// Insert an automatic checkpoint every N ms (0: only on request).
    #[arg(long, default_value_t = 0)]
    checkpoint_interval_ms: u64,
    /// Start as a continuing stream rather than in sync mode (only for a
    /// tap known to deliver every write from the start, e.g. benchmarks).
    #[arg(long)]
    no_initial_sync: bool,
}

#[derive(clap::Args, Debug)]
struct TargetArgs {
    /// HOST:PORT to accept links on.
    #[arg(long)]
    listen: String,
    /// One folder per VPG under here.
    #[arg(long)]
    root: PathBuf,
    #[arg(long)]
    certs: PathBuf,
    #[arg(long)]
    control: PathBuf,
    #[arg(long, default_value_t = 1000)]
    heartbeat_ms: u64,
}

#[derive(Subcommand, Debug)]
enum CertsCommand {
    /// Create the site's CA (unless there) and a node certificate.
    Create {
        #[arg(long)]
        site: String,
        #[arg(long)]
        dir: PathBuf,
    },
    /// Trust a paired site: copy its ca.pem into peers/.
    Trust {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        peer_site: String,
        #[arg(long)]
        ca: PathBuf,
    },
}

/// Ids derived from names, so that a restarted daemon finds its disks.
pub fn derived_id(kind: &str, name: &str) -> [u8; 16] {
    let h = blake3::hash(format!("{kind}:{name}").as_bytes());
    let mut id = [0u8; 16];
    id.copy_from_slice(&h.as_bytes()[..16]);
    id
}

fn parse_size(s: &str) -> Result<u64> {
    let (num, mult) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    let n: u64 = num.parse().with_context(|| format!("bad size {s:?}"))?;
    n.checked_mul(mult).with_context(|| format!("size {s:?} overflows"))
}

/// Logs to stderr and, for the long-lived agent, also to `file` (what the
/// log collector reads; moved to `.1` once it passes 32 MiB at a start).
fn init_tracing(file: Option<&Path>) {
    use tracing_subscriber::prelude::*;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let stderr = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let to_file = file.and_then(|p| {
        let open = || -> std::io::Result<std::fs::File> {
            if let Some(dir) = p.parent() {
                std::fs::create_dir_all(dir)?;
            }
            if std::fs::metadata(p).is_ok_and(|m| m.len() > 32 << 20) {
                std::fs::rename(p, p.with_extension("log.1"))?;
            }
            std::fs::OpenOptions::new().create(true).append(true).open(p)
        };
        match open() {
            Ok(f) => Some(tracing_subscriber::fmt::layer().with_writer(std::sync::Mutex::new(f)).with_ansi(false)),
            Err(e) => {
                eprintln!("vdsa: cannot write the log file {}: {e}", p.display());
                None
            }
        }
    });
    let _ = tracing_subscriber::registry().with(filter).with(stderr).with(to_file).try_init();
}

/// Runs the daemon with `args` (the first is the program name).
pub fn main<I: IntoIterator<Item = String>>(args: I) -> Result<()> {
    memory::keep_freed_memory();
    let cli = Cli::parse_from(args);
    if let Command::Agent(a) = cli.command {
        let cfg = agent_config(a)?;
        init_tracing(Some(&cfg.log_file()));
        return match crate::agent::run(cfg) {
            Err(e) if crate::agent::is_refusal(&e) => {
                // Restarting cannot help: the appliance's init stops here.
                tracing::error!("{e:#}");
                eprintln!("vdsa agent: {e:#}");
                std::process::exit(crate::agent::EXIT_REFUSED)
            }
            r => r,
        };
    }
    if let Command::ApplianceConfig { ovf_env, data, config } = &cli.command {
        print!("{}", crate::agent::appliance::configure(ovf_env, data, config)?);
        return Ok(());
    }
    init_tracing(None);
    match cli.command {
        Command::TapServe {
            journal,
            taps,
            stream,
            checkpoint_interval_ms,
            segment_bytes,
            pack_bytes,
            unsafe_no_durability,
        } => {
            let config = JournalConfig {
                segment_bytes: parse_size(&segment_bytes)?,
                pack_bytes: parse_size(&pack_bytes)?,
                ..JournalConfig::default()
            };
            tap_serve(journal, config, taps, stream, checkpoint_interval_ms, unsafe_no_durability)
        }
        Command::Source(a) => source(*a),
        Command::Target(a) => target(a),
        Command::Agent(_) | Command::ApplianceConfig { .. } => Ok(()),
        Command::Certs(CertsCommand::Create { site, dir }) => {
            for p in crate::wire::tls::create_site_certificates(&dir, &site)? {
                println!("wrote {}", p.display());
            }
            Ok(())
        }
        Command::Certs(CertsCommand::Trust { dir, peer_site, ca }) => {
            let p = crate::wire::tls::trust_peer(&dir, &peer_site, &ca)?;
            println!("trusting {peer_site}: {}", p.display());
            Ok(())
        }
    }
}

fn tap_serve(
    dir: PathBuf,
    config: JournalConfig,
    taps: TapArgs,
    stream: String,
    interval_ms: u64,
    no_durability: bool,
) -> Result<()> {
    // Everything the command line says is checked before anything is
    // created or taken over.
    let disks: Vec<(String, DiskId, u64)> = taps.disk.iter().map(|d| parse_disk(d)).collect::<Result<_>>()?;
    let listeners = TapListener::parse_all(&taps.listen)?;
    let control = claim_path(&taps.control)?;
    let claims = claim_listeners(&listeners)?;
    let journal = Journal::open(&dir, config).with_context(|| format!("opening journal {}", dir.display()))?;
    warn_if_full(&journal);
    let known = journal.disks()?;
    let stream_id = StreamId::from_bytes(derived_id("stream", &stream));
    let tap = TapStream::new(journal.clone(), stream_id)?;
    let exports = Exports::default();
    for (name, id, size) in disks {
        match known.iter().find(|d| d.id == id) {
            Some(d) if d.size != size => bail!("disk {name} is {} bytes in the journal, not {size}", d.size),
            Some(_) => {}
            None => journal.add_disk(id, size)?,
        }
        let disk = Arc::new(TapDisk { stream: tap.clone(), disk: id, size });
        if no_durability {
            tracing::warn!(disk = %name, "control run: FLUSH and FUA make nothing durable");
            exports.insert(name, Arc::new(NoDurability(disk)));
        } else {
            exports.insert(name, disk);
        }
    }
    serve_taps(listeners, claims, Arc::new(exports))?;
    let control_lock = Arc::new(Mutex::new(()));
    if interval_ms > 0 {
        let (tap, lock) = (tap.clone(), control_lock.clone());
        std::thread::spawn(move || loop {
            std::thread::sleep(Duration::from_millis(interval_ms));
            let _guard = lock.lock();
            if let Err(e) = checkpoint(&tap, None, None) {
                tracing::error!(error = %e, "automatic checkpoint failed");
            }
        });
    }
    let tap2 = tap.clone();
    serve_control(control, control_lock, move |req| handle(req, &tap2))
}

/// Says at start when the journal's disk has no room left: the VDSA still
/// starts (reads, status and checkpoints of what is there keep working) and
/// writes are refused with ENOSPC until space is freed.
fn warn_if_full(journal: &Journal) {
    match journal.free_bytes() {
        Ok(free) if free < JOURNAL_LOW_SPACE => tracing::warn!(
            journal = %journal.dir().display(),
            free_bytes = free,
            "the journal's disk is full: writes will be refused until space is freed"
        ),
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot tell the journal disk's free space"),
    }
}

/// Below this much free space a journal's disk counts as full.
const JOURNAL_LOW_SPACE: u64 = 16 << 20;

fn checkpoint(tap: &TapStream, id: Option<u64>, name: Option<&str>) -> Result<Value> {
    let newest = tap.journal().checkpoints()?.last().map_or(0, |c| c.id.0);
    let id = id.unwrap_or(newest + 1);
    let name = name.unwrap_or("");
    let kind = if name.is_empty() { CheckpointKind::Automatic } else { CheckpointKind::Named };
    let cp = tap.checkpoint(CheckpointId(id), name, kind)?;
    let seq = cp.cuts.first().map_or(0, |c| c.seq);
    Ok(json!({"ok": true, "id": cp.id.0, "kind": format!("{:?}", cp.kind), "seq": seq, "lsn": cp.lsn}))
}

fn handle(req: ControlRequest, tap: &TapStream) -> Result<Value> {
    match req {
        ControlRequest::Checkpoint { id, name } => checkpoint(tap, id, name.as_deref()),
        ControlRequest::Sync { syncing } => {
            tap.set_syncing(syncing);
            Ok(json!({"ok": true}))
        }
        ControlRequest::Status {} => {
            let stats = tap.journal().stats()?;
            let seq = tap.position()?.map_or(0, |c| c.seq);
            let free = tap.journal().free_bytes()?;
            Ok(json!({
                "ok": true,
                "syncing": tap.is_syncing(),
                "seq": seq,
                "stats": stats,
                "journal_free_bytes": free,
                "journal_disk_full": free < JOURNAL_LOW_SPACE,
            }))
        }
        ControlRequest::Shutdown {} => {
            tap.journal().sync()?;
            Ok(json!({"ok": true, "bye": true}))
        }
        other => Err(not_served("tap-serve", &other)),
    }
}

fn parse_disk(spec: &str) -> Result<(String, DiskId, u64)> {
    let Some((name, size)) = spec.split_once('=') else {
        bail!("--disk {spec:?}: expected NAME=SIZE");
    };
    let size = parse_size(size).with_context(|| format!("--disk {spec:?}"))?;
    if size == 0 || !size.is_multiple_of(crate::journal::BLOCK_SIZE as u64) {
        bail!("--disk {spec:?}: the size must be a positive multiple of 4 KiB");
    }
    Ok((name.to_string(), DiskId::from_bytes(derived_id("disk", name)), size))
}

fn source(a: SourceArgs) -> Result<()> {
    use crate::replication::queue::{Backpressure, QueueConfig};
    use crate::replication::source::{SourceDisk, SourceOptions, SourceStream};
    let identity = crate::wire::tls::SiteIdentity::load(&a.certs)?;
    let disks: Vec<(String, DiskId, u64)> = a.taps.disk.iter().map(|d| parse_disk(d)).collect::<Result<_>>()?;
    let listeners = TapListener::parse_all(&a.taps.listen)?;
    let backpressure = match a.backpressure.as_str() {
        "block" => Backpressure::Block,
        "bitmap" => Backpressure::Bitmap,
        other => bail!("--backpressure {other:?}: expected block or bitmap"),
    };
    let opts = SourceOptions {
        site: a.site,
        vpg: protection_groups::VpgId::from_bytes(derived_id("vpg", &a.vpg)),
        stream: StreamId::from_bytes(derived_id("stream", &a.stream)),
        epoch: a.epoch,
        disks: disks.iter().map(|(_, id, size)| (*id, *size)).collect(),
        target: a.target,
        heartbeat: Duration::from_millis(a.heartbeat_ms.max(50)),
        bandwidth: parse_size(&a.bandwidth)?,
        streams: a.streams,
        batch_bytes: crate::replication::source::BATCH_BYTES,
        window: crate::replication::source::OFFER_WINDOW,
        entropy_signal: true,
    };
    let queue = QueueConfig {
        memory_bytes: parse_size(&a.queue_memory)?,
        spill_path: a.spill,
        spill_bytes: parse_size(&a.spill_size)?,
        backpressure,
    };
    let control = claim_path(&a.taps.control)?;
    let mut claims = claim_listeners(&listeners)?;
    // The spill file is truncated at start: never another daemon's.
    claims.push(claim_path(&queue.spill_path)?);
    let stream = SourceStream::new(opts, queue).context("creating the send queue")?;
    if a.no_initial_sync {
        stream.set_syncing(false);
    }
    let exports = Exports::default();
    for (name, id, _) in &disks {
        exports.insert(name.clone(), Arc::new(SourceDisk { stream: stream.clone(), disk: *id }));
    }
    serve_taps(listeners, claims, Arc::new(exports))?;
    let cfg = identity.client_config()?;
    let link = stream.clone();
    link.start_link(cfg).context("starting the replication link")?;
    let lock = Arc::new(Mutex::new(()));
    let last_id = Arc::new(Mutex::new(0u64));
    if a.checkpoint_interval_ms > 0 {
        let (stream, lock, last_id) = (stream.clone(), lock.clone(), last_id.clone());
        std::thread::spawn(move || loop {
            std::thread::sleep(Duration::from_millis(a.checkpoint_interval_ms));
            let _guard = lock.lock();
            if let Err(e) = source_checkpoint(&stream, &last_id, None, "") {
                tracing::error!("automatic checkpoint failed: {e:#}");
            }
        });
    }
    let s = stream.clone();
    serve_control(control, lock, move |req| match req {
        ControlRequest::Checkpoint { id, name } => source_checkpoint(&s, &last_id, id, name.as_deref().unwrap_or("")),
        ControlRequest::Sync { syncing } => {
            s.set_syncing(syncing);
            Ok(json!({"ok": true}))
        }
        ControlRequest::Bandwidth { bytes_per_sec } => {
            s.throttle.set_rate(bytes_per_sec);
            Ok(json!({"ok": true}))
        }
        ControlRequest::Status {} => {
            let mut st = s.status();
            st["ok"] = json!(true);
            st["drained"] = json!(s.drained());
            Ok(st)
        }
        ControlRequest::Shutdown {} => {
            s.stop();
            Ok(json!({"ok": true, "bye": true}))
        }
        other => Err(not_served("source", &other)),
    })
}

/// Checkpoint ids grow across restarts: by default the time in ms.
fn source_checkpoint(
    s: &Arc<crate::replication::source::SourceStream>,
    last: &Mutex<u64>,
    id: Option<u64>,
    name: &str,
) -> Result<Value> {
    let mut last = last.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
    let id = id.unwrap_or_else(|| crate::replication::now_ms().max(*last + 1));
    if id <= *last {
        bail!("checkpoint id {id} is not newer than the last one, {}", *last);
    }
    let kind = if name.is_empty() { CheckpointKind::Automatic } else { CheckpointKind::Named };
    let kind = s.checkpoint(id, name, kind)?;
    *last = id;
    Ok(json!({"ok": true, "id": id, "kind": format!("{kind:?}")}))
}

fn target(a: TargetArgs) -> Result<()> {
    use crate::replication::target::{TargetOptions, TargetServer};
    let identity = crate::wire::tls::SiteIdentity::load(&a.certs)?;
    // The addresses are taken before anything is created or opened: a
    // daemon that cannot have them changes nothing.
    let control = claim_path(&a.control)?;
    let listener = TcpListener::bind(&a.listen).with_context(|| format!("listening on {}", a.listen))?;
    std::fs::create_dir_all(&a.root).with_context(|| format!("creating {}", a.root.display()))?;
    let server = TargetServer::new(TargetOptions {
        root: a.root,
        heartbeat: Duration::from_millis(a.heartbeat_ms.max(50)),
        journal: JournalConfig::default(),
    });
    server.open_existing().context("opening the VPG journals")?;
    let cfg = identity.server_config()?;
    let srv = server.clone();
    let tls = Arc::new(std::sync::RwLock::new(cfg));
    std::thread::spawn(move || srv.serve(listener, tls));
    serve_control(control, Arc::new(Mutex::new(())), move |req| match req {
        ControlRequest::Status {} => {
            let vpgs: Vec<Value> = server.replicas().iter().map(|r| r.status()).collect();
            Ok(json!({"ok": true, "vpgs": vpgs}))
        }
        ControlRequest::Promote { vpg } => {
            let vpg = protection_groups::VpgId::from_bytes(derived_id("vpg", &vpg));
            let r = server.replica(vpg).map_err(|e| anyhow::anyhow!(e))?;
            let epoch = r.bump_epoch()?;
            Ok(json!({"ok": true, "epoch": epoch}))
        }
        ControlRequest::Shutdown {} => {
            server.sync_all();
            Ok(json!({"ok": true, "bye": true}))
        }
        other => Err(not_served("target", &other)),
    })
}
