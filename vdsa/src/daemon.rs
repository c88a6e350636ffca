//! The `vdsa` daemon's command line and services. Today: `tap-serve`
//! receives a hypervisor's tap (QEMU's block mirror over NBD) for the disks
//! of one stream into a journal, with a control socket (line-delimited
//! JSON: checkpoint, sync, status, shutdown). The `vdsa` binary is a thin
//! wrapper over [`main`].

use crate::journal::{Journal, JournalConfig};
use crate::nbd::server::{serve, Ending, Exports};
use crate::tap::{TapDisk, TapStream};
use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use protection_groups::{CheckpointId, CheckpointKind, DiskId, StreamId};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
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
        /// Stream name (one per VDSA and VPG).
        #[arg(long, default_value = "local")]
        stream: String,
        /// Insert an automatic checkpoint every N ms (0: only on request).
        #[arg(long, default_value_t = 0)]
        checkpoint_interval_ms: u64,
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

/// Runs the daemon with `args` (the first is the program name).
pub fn main<I: IntoIterator<Item = String>>(args: I) -> Result<()> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .try_init();
    let cli = Cli::parse_from(args);
    match cli.command {
        Command::TapServe {
            journal,
            listen,
            control,
            disk,
            stream,
            checkpoint_interval_ms,
        } => tap_serve(journal, listen, control, disk, stream, checkpoint_interval_ms),
    }
}

fn tap_serve(dir: PathBuf, listen: Vec<String>, control: PathBuf, disks: Vec<String>, stream: String, interval_ms: u64) -> Result<()> {
    let journal = Journal::open(&dir, JournalConfig::default()).with_context(|| format!("opening journal {}", dir.display()))?;
    let known = journal.disks()?;
    let stream_id = StreamId::from_bytes(derived_id("stream", &stream));
    let tap = TapStream::new(journal.clone(), stream_id)?;
    let mut exports = Exports::default();
    for spec in &disks {
        let Some((name, size)) = spec.split_once('=') else {
            bail!("--disk {spec:?}: expected NAME=SIZE");
        };
        let size = parse_size(size)?;
        let id = DiskId::from_bytes(derived_id("disk", name));
        match known.iter().find(|d| d.id == id) {
            Some(d) if d.size != size => bail!("disk {name} is {} bytes in the journal, not {size}", d.size),
            Some(_) => {}
            None => journal.add_disk(id, size)?,
        }
        exports.insert(name, Arc::new(TapDisk { stream: tap.clone(), disk: id, size }));
    }
    let exports = Arc::new(exports);
    for spec in &listen {
        let (native, rest) = match spec.strip_prefix("native-") {
            Some(rest) => (true, rest),
            None => (false, spec.as_str()),
        };
        // Both kinds of tap serve the same exports; each connection gets a
        // thread of its own.
        let session = move |exports: &Exports, r: Reader, w: Writer| {
            if native {
                match crate::native_tap::serve(r, w, exports) {
                    Ok(crate::native_tap::Ending::Refused(why)) => tracing::warn!("native tap refused: {why}"),
                    Ok(end) => tracing::info!("native tap ended: {end:?}"),
                    Err(e) => tracing::warn!("native tap failed: {e}"),
                }
            } else {
                log_end(serve(r, w, exports));
            }
        };
        let exports = exports.clone();
        if let Some(path) = rest.strip_prefix("unix:") {
            let _ = std::fs::remove_file(path);
            let l = UnixListener::bind(path).with_context(|| format!("listening on {path}"))?;
            let conns = std::iter::from_fn(move || Some(l.accept().map(|(c, _)| c)))
                .flatten()
                .filter_map(|c| Some(halves(c.try_clone().ok()?, c)));
            accept_each(conns, exports, session);
        } else if let Some(addr) = rest.strip_prefix("tcp:") {
            let l = TcpListener::bind(addr).with_context(|| format!("listening on {addr}"))?;
            let conns = std::iter::from_fn(move || Some(l.accept().map(|(c, _)| c))).flatten().filter_map(|c| {
                let _ = c.set_nodelay(true);
                Some(halves(c.try_clone().ok()?, c))
            });
            accept_each(conns, exports, session);
        } else {
            bail!("--listen {spec:?}: expected [native-]unix:PATH or [native-]tcp:HOST:PORT");
        }
    }
    let control_lock = Arc::new(Mutex::new(()));
    if interval_ms > 0 {
        let (tap, lock) = (tap.clone(), control_lock.clone());
        std::thread::spawn(move || loop {
            std::thread::sleep(Duration::from_millis(interval_ms));
            let _guard = lock.lock();
            if let Err(e) = checkpoint(&tap, "") {
                tracing::error!(error = %e, "automatic checkpoint failed");
            }
        });
    }
    let _ = std::fs::remove_file(&control);
    let l = UnixListener::bind(&control).with_context(|| format!("control socket {}", control.display()))?;
    println!("READY");
    std::io::stdout().flush()?;
    for conn in l.incoming().flatten() {
        let (tap, lock) = (tap.clone(), control_lock.clone());
        std::thread::spawn(move || control_session(conn, &tap, &lock));
    }
    Ok(())
}

type Reader = Box<dyn Read + Send>;
type Writer = Box<dyn Write + Send>;

fn halves(r: impl Read + Send + 'static, w: impl Write + Send + 'static) -> (Reader, Writer) {
    (Box::new(r), Box::new(w))
}

/// Serves each accepted connection on a thread of its own.
fn accept_each(
    conns: impl Iterator<Item = (Reader, Writer)> + Send + 'static,
    exports: Arc<Exports>,
    session: impl Fn(&Exports, Reader, Writer) + Copy + Send + 'static,
) {
    std::thread::spawn(move || {
        for (r, w) in conns {
            let exports = exports.clone();
            std::thread::spawn(move || session(&exports, r, w));
        }
    });
}

fn log_end(r: std::io::Result<Ending>) {
    match r {
        Ok(Ending::Protocol(why)) => tracing::warn!("tap connection dropped: {why}"),
        Ok(end) => tracing::info!("tap connection ended: {end:?}"),
        Err(e) => tracing::warn!("tap connection failed: {e}"),
    }
}

fn checkpoint(tap: &TapStream, name: &str) -> Result<Value> {
    let next = tap.journal().checkpoints()?.last().map_or(1, |c| c.id.0 + 1);
    let kind = if name.is_empty() { CheckpointKind::Automatic } else { CheckpointKind::Named };
    let cp = tap.checkpoint(CheckpointId(next), name, kind)?;
    let seq = cp.cuts.first().map_or(0, |c| c.seq);
    Ok(json!({"ok": true, "id": cp.id.0, "kind": format!("{:?}", cp.kind), "seq": seq, "lsn": cp.lsn}))
}

fn control_session(conn: UnixStream, tap: &TapStream, lock: &Mutex<()>) {
    let Ok(w) = conn.try_clone() else { return };
    let mut w = std::io::BufWriter::new(w);
    for line in BufReader::new(conn).lines() {
        let Ok(line) = line else { return };
        let reply = match serde_json::from_str::<Value>(&line) {
            Err(e) => json!({"ok": false, "error": format!("bad request: {e}")}),
            Ok(req) => {
                let _guard = lock.lock();
                handle(&req, tap).unwrap_or_else(|e| json!({"ok": false, "error": format!("{e:#}")}))
            }
        };
        if writeln!(w, "{reply}").and_then(|_| w.flush()).is_err() {
            return;
        }
        if reply.get("bye").is_some() {
            std::process::exit(0);
        }
    }
}

fn handle(req: &Value, tap: &TapStream) -> Result<Value> {
    match req.get("op").and_then(Value::as_str) {
        Some("checkpoint") => checkpoint(tap, req.get("name").and_then(Value::as_str).unwrap_or("")),
        Some("sync") => {
            let Some(syncing) = req.get("syncing").and_then(Value::as_bool) else {
                bail!("sync needs \"syncing\": true|false");
            };
            tap.set_syncing(syncing);
            Ok(json!({"ok": true}))
        }
        Some("status") => {
            let stats = tap.journal().stats()?;
            let seq = tap.position()?.map_or(0, |c| c.seq);
            Ok(json!({"ok": true, "syncing": tap.is_syncing(), "seq": seq, "stats": stats}))
        }
        Some("shutdown") => {
            tap.journal().sync()?;
            Ok(json!({"ok": true, "bye": true}))
        }
        other => bail!("unknown op {other:?}"),
    }
}
