//! The roles a VDSA runs, reconciled to the desired state its site manager
//! sends: source streams (each with its tap exports and its link to a
//! target VDSA) and target journals (each accepting only the streams the
//! site manager defined). The checkpoint barrier's PREPARE and decision
//! land here for every source stream of a VPG.

use super::AgentConfig;
use crate::nbd::export::Exports;
use crate::replication::queue::{Backpressure, QueueConfig};
use crate::replication::source::{SourceDisk, SourceOptions, SourceStream};
use crate::replication::target::{ServerTls, TargetDefinition, TargetServer};
use protection_groups::mgmt::{
    ActualState, DesiredState, RoleKind, RolePhase, RoleState, SourceRole, TargetRole, TrustedSite,
};
use protection_groups::{CheckpointId, CheckpointKind, DiskId, StreamId, VpgId};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A running source role.
#[derive(Debug)]
struct SourceRun {
    role: SourceRole,
    stream: Arc<SourceStream>,
    /// Set when the role stops: its tap thread detaches and ends.
    stopped: Arc<std::sync::atomic::AtomicBool>,
    taps: Option<std::thread::JoinHandle<()>>,
    /// Why a tap cannot be attached (the VM's monitor does not answer).
    tap_problem: Arc<Mutex<Option<String>>>,
    /// Disks to grow, for the tap thread (it detaches the tap, resizes the
    /// disk in QEMU, puts the resize in the stream and attaches again).
    resizes: Arc<Mutex<Vec<(DiskId, u64)>>>,
    /// A move's power-off, obeyed by the tap thread.
    power: Arc<super::taps::PowerOff>,
}

/// The disks `want` grows, if growing disks is all that differs between
/// the running role `now` and `want`.
fn grown_disks(now: &SourceRole, want: &SourceRole) -> Option<Vec<(DiskId, u64)>> {
    if now.disks.len() != want.disks.len() {
        return None;
    }
    let mut grown = Vec::new();
    for (a, b) in now.disks.iter().zip(&want.disks) {
        if a.id != b.id || b.size_bytes < a.size_bytes {
            return None;
        }
        if b.size_bytes > a.size_bytes {
            grown.push((b.id, b.size_bytes));
        }
    }
    let mut same = want.clone();
    same.disks.clone_from(&now.disks);
    (same == *now && !grown.is_empty()).then_some(grown)
}

/// How long a stopping role waits for its taps to be detached before its
/// exports go (QEMU's mirror would otherwise fail writes to a vanished
/// export and stall the guest until its reconnect delay).
const DETACH_WAIT: Duration = Duration::from_secs(15);

/// Every role of this VDSA.
#[derive(Debug)]
pub struct Roles {
    cfg: AgentConfig,
    sources: Mutex<HashMap<StreamId, SourceRun>>,
    targets: Mutex<HashMap<VpgId, TargetRole>>,
    pub target: Arc<TargetServer>,
    pub exports: Arc<Exports>,
    tls: ReplicationTls,
    /// The processing stacks of its target roles.
    stacks: super::recovery::Stacks,
    /// The paired sites trusted now (None until the first desired state
    /// of this run; until then the files from the last run apply).
    trusted: Mutex<Option<Vec<TrustedSite>>>,
    applied_version: AtomicU64,
}

/// The replication link's TLS: both sides' configurations, rebuilt from
/// the identity folder when the trusted sites change.
#[derive(Debug)]
pub struct ReplicationTls {
    /// The agent's `identity/`: `peers/site.pem` is its own site's CA,
    /// `peers/site-<id>.pem` a paired site's.
    pub identity_dir: PathBuf,
    pub server: ServerTls,
    pub client: Mutex<Arc<rustls::ClientConfig>>,
}

/// A failed journal is reopened once its volume has this much free.
const REOPEN_FREE_BYTES: u64 = 8 << 20;

/// The newest recoverable checkpoints a target reports, at most.
const REPORTED_CHECKPOINTS: usize = 256;

impl Roles {
    pub fn new(
        cfg: AgentConfig,
        target: Arc<TargetServer>,
        exports: Arc<Exports>,
        tls: ReplicationTls,
        stacks: super::recovery::Stacks,
    ) -> Roles {
        // Until the site manager says otherwise, no VPG is accepted.
        target.set_defined(HashMap::new());
        Roles {
            cfg,
            sources: Mutex::default(),
            targets: Mutex::default(),
            target,
            exports,
            tls,
            stacks,
            trusted: Mutex::new(None),
            applied_version: AtomicU64::new(0),
        }
    }

    /// Reconciles to `desired`: the trusted sites, then the roles.
    pub fn apply(&self, desired: &DesiredState) {
        self.apply_trust(&desired.trusted_sites);
        let defined = desired
            .targets
            .iter()
            .map(|t| {
                let seeds = t.seeds.iter().map(|s| (s.disk, std::path::PathBuf::from(&s.path))).collect();
                (t.vpg, TargetDefinition { streams: t.streams.clone(), seeds })
            })
            .collect::<HashMap<_, _>>();
        self.target.set_defined(defined);
        if let Ok(mut targets) = self.targets.lock() {
            for vpg in targets.keys().copied().collect::<Vec<_>>() {
                if !desired.targets.iter().any(|t| t.vpg == vpg) {
                    tracing::info!(%vpg, "target role removed");
                    self.target.close(vpg);
                    targets.remove(&vpg);
                }
            }
            for t in &desired.targets {
                if !targets.contains_key(&t.vpg) {
                    tracing::info!(vpg = %t.vpg, streams = t.streams.len(), "target role added");
                    if let Err(e) = self.target.replica(t.vpg) {
                        tracing::error!(vpg = %t.vpg, "cannot open the journal: {e}");
                        continue;
                    }
                }
                targets.insert(t.vpg, t.clone());
            }
        }
        let want: Vec<_> = desired.targets.iter().flat_map(|t| t.stacks.iter().map(|s| (t.vpg, s.clone()))).collect();
        self.stacks.apply(&want, |vpg| self.target.replica(vpg).map(|r| r.journal.clone()));
        if let Ok(mut sources) = self.sources.lock() {
            // A disk that grew keeps its role running: the resize goes into
            // the stream in order (a new role would start a new run).
            for r in &desired.sources {
                if let Some(run) = sources.get_mut(&r.stream) {
                    if let Some(grown) = grown_disks(&run.role, r) {
                        self.grow(run, r, grown);
                    }
                    if run.role.same_run(r) {
                        run.power.asked.store(r.power_off, Ordering::SeqCst);
                        run.role.power_off = r.power_off;
                    }
                }
            }
            for id in sources.keys().copied().collect::<Vec<_>>() {
                let keep = desired
                    .sources
                    .iter()
                    .any(|r| r.stream == id && sources.get(&id).is_some_and(|s| s.role.same_run(r)));
                if !keep {
                    if let Some(run) = sources.remove(&id) {
                        self.stop_source(run);
                    }
                }
            }
            for r in &desired.sources {
                if sources.contains_key(&r.stream) {
                    continue;
                }
                match self.start_source(r) {
                    Ok(run) => {
                        sources.insert(r.stream, run);
                    }
                    Err(e) => tracing::error!(vpg = %r.vpg, stream = %r.stream, "cannot start the source role: {e}"),
                }
            }
        }
        self.applied_version.store(desired.version, Ordering::SeqCst);
    }

    /// Trusts exactly the paired sites in `sites` (besides its own): their
    /// CAs are kept in `identity/peers/` (so they hold across restarts),
    /// both TLS configurations are rebuilt, and when a site was dropped
    /// every live link is closed so each passes the handshake again.
    fn apply_trust(&self, sites: &[TrustedSite]) {
        let Ok(mut current) = self.trusted.lock() else { return };
        if current.as_deref() == Some(sites) {
            return;
        }
        let peers = self.tls.identity_dir.join("peers");
        let wanted: HashMap<String, &TrustedSite> = sites.iter().map(|s| (format!("site-{}.pem", s.site), s)).collect();
        let mut narrowed = false;
        for entry in std::fs::read_dir(&peers).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with("site-") && name.ends_with(".pem") && !wanted.contains_key(&name) {
                match std::fs::remove_file(entry.path()) {
                    Ok(()) => {
                        tracing::info!(file = %name, "no longer trusting a site that was unpaired");
                        narrowed = true;
                    }
                    Err(e) => tracing::error!(file = %name, "cannot remove an unpaired site's CA: {e}"),
                }
            }
        }
        for (name, site) in &wanted {
            let path = peers.join(name);
            if std::fs::read_to_string(&path).is_ok_and(|pem| pem == site.ca_pem) {
                continue;
            }
            if let Err(e) = super::identity::write_durably(&path, site.ca_pem.as_bytes(), false) {
                tracing::error!(site = %site.name, "cannot store the paired site's CA: {e:#}");
            }
        }
        if narrowed {
            if let Ok(d) = std::fs::File::open(&peers) {
                let _ = d.sync_all();
            }
        }
        match crate::wire::tls::SiteIdentity::load(&self.tls.identity_dir) {
            Ok(id) => match (id.server_config(), id.client_config()) {
                (Ok(server), Ok(client)) => {
                    if let Ok(mut s) = self.tls.server.write() {
                        *s = server;
                    }
                    if let Ok(mut c) = self.tls.client.lock() {
                        *c = client;
                    }
                }
                (Err(e), _) | (_, Err(e)) => tracing::error!("cannot rebuild the replication TLS: {e}"),
            },
            Err(e) => tracing::error!("cannot reload the replication identity: {e}"),
        }
        if narrowed {
            self.target.close_all_links();
        }
        let names: Vec<&str> = sites.iter().map(|s| s.name.as_str()).collect();
        tracing::info!(sites = ?names, "trusted paired sites");
        *current = Some(sites.to_vec());
    }

    /// Grows disks of a running role: its tap thread detaches, resizes and
    /// attaches again; a disk tapped from outside is resized in the stream
    /// at once (whoever taps it resized it first).
    fn grow(&self, run: &mut SourceRun, want: &SourceRole, grown: Vec<(DiskId, u64)>) {
        for (disk, size) in grown {
            tracing::info!(vpg = %want.vpg, %disk, size, "a protected disk grows");
            if run.taps.is_some() && want.taps.iter().any(|t| t.disk == disk) {
                if let Ok(mut r) = run.resizes.lock() {
                    r.push((disk, size));
                }
            } else if let Err(e) = run.stream.resize(disk, size) {
                tracing::error!(%disk, size, "cannot grow the disk: {e}");
            }
        }
        run.role = want.clone();
    }

    fn start_source(&self, r: &SourceRole) -> std::io::Result<SourceRun> {
        let spill_dir = self.cfg.data.join("spill");
        std::fs::create_dir_all(&spill_dir)?;
        let opts = SourceOptions {
            site: self.cfg.name.clone(),
            vpg: r.vpg,
            stream: r.stream,
            epoch: r.epoch,
            disks: r.disks.iter().map(|d| (d.id, d.size_bytes)).collect(),
            target: r.target_address.clone(),
            heartbeat: Duration::from_millis(self.cfg.heartbeat_ms.max(50)),
            bandwidth: r.bandwidth_bytes_per_sec,
            streams: r.streams_to_target,
            batch_bytes: crate::replication::source::BATCH_BYTES,
            window: crate::replication::source::OFFER_WINDOW,
            entropy_signal: true,
        };
        let queue = QueueConfig {
            memory_bytes: self.cfg.queue_memory_bytes,
            spill_path: spill_dir.join(format!("{}.spill", r.stream.0)),
            spill_bytes: self.cfg.spill_bytes,
            backpressure: Backpressure::Block,
        };
        let stream = SourceStream::new(opts, queue)?;
        // Disks tapped from outside (an ESXi filter) copy themselves whole
        // through the tap first: that coverage ends the sync.
        if r.taps.is_empty() {
            stream.end_sync_when_covered();
        }
        // Every run states its disks' sizes first: a resize that a crash
        // took with the send queue still reaches the target.
        stream.state_sizes().map_err(|e| std::io::Error::other(e.to_string()))?;
        // A disk the VDSA taps itself is published by its tap thread, once
        // an earlier run's jobs are gone (see taps::attach_one).
        for d in r.disks.iter().filter(|d| !r.taps.iter().any(|t| t.disk == d.id)) {
            self.exports.insert(d.name.clone(), Arc::new(SourceDisk { stream: stream.clone(), disk: d.id }));
        }
        let tls = self.tls.client.lock().map_err(|_| std::io::Error::other("TLS configuration poisoned"))?.clone();
        let link = stream.clone();
        link.start_link(tls)?;
        tracing::info!(vpg = %r.vpg, stream = %r.stream, target = %r.target_address, disks = r.disks.len(), "source role started");
        let stopped = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut taps = None;
        let tap_problem = Arc::new(Mutex::new(None));
        let resizes = Arc::new(Mutex::new(Vec::new()));
        let power = Arc::new(super::taps::PowerOff::default());
        power.asked.store(r.power_off, Ordering::SeqCst);
        if !r.taps.is_empty() {
            match self.nbd_address() {
                Some(server) => {
                    let (role, s, stop, problem) = (r.clone(), stream.clone(), stopped.clone(), tap_problem.clone());
                    let (grow, exports, pw) = (resizes.clone(), self.exports.clone(), power.clone());
                    taps =
                        Some(std::thread::Builder::new().name("stream-taps".into()).spawn(move || {
                            super::taps::run(&role, &s, server, &stop, &problem, &grow, &exports, &pw)
                        })?);
                }
                None => {
                    tracing::error!(vpg = %r.vpg, "the role has taps to attach but this VDSA has no NBD tap listener")
                }
            }
        }
        Ok(SourceRun { role: r.clone(), stream, stopped, taps, tap_problem, resizes, power })
    }

    /// Where QEMU's mirror jobs reach this VDSA's taps: its first NBD
    /// listener.
    fn nbd_address(&self) -> Option<crate::kvm::NbdAddress> {
        self.cfg.tap_listen.iter().find_map(|l| {
            if let Some(p) = l.strip_prefix("unix:") {
                Some(crate::kvm::NbdAddress::Unix(p.to_string()))
            } else {
                let (host, port) = l.strip_prefix("tcp:")?.rsplit_once(':')?;
                Some(crate::kvm::NbdAddress::Tcp { host: host.to_string(), port: port.parse().ok()? })
            }
        })
    }

    fn stop_source(&self, run: SourceRun) {
        run.stopped.store(true, Ordering::SeqCst);
        if let Some(t) = run.taps {
            let start = std::time::Instant::now();
            while !t.is_finished() && start.elapsed() < DETACH_WAIT {
                std::thread::sleep(Duration::from_millis(20));
            }
            if !t.is_finished() {
                tracing::warn!(stream = %run.role.stream, "the taps are still attaching; the exports go anyway");
            }
        }
        for d in &run.role.disks {
            self.exports.remove(&d.name);
        }
        // A held checkpoint is released so no tap waits on a role that is
        // gone.
        if let Some(id) = run.stream.held() {
            let _ = run.stream.decide(id, false);
        }
        run.stream.stop();
        tracing::info!(vpg = %run.role.vpg, stream = %run.role.stream, "source role stopped");
    }

    /// Whether every source stream's queue is empty (all durable at its
    /// target).
    pub fn drained(&self) -> bool {
        self.sources.lock().map(|s| s.values().all(|r| r.stream.drained())).unwrap_or(true)
    }

    /// Stops every source role (a clean shutdown).
    pub fn stop_all(&self) {
        if let Ok(mut sources) = self.sources.lock() {
            for (_, run) in sources.drain() {
                self.stop_source(run);
            }
        }
        self.target.sync_all();
    }

    fn streams_of(&self, vpg: VpgId) -> Vec<Arc<SourceStream>> {
        self.sources
            .lock()
            .map(|s| s.values().filter(|r| r.role.vpg == vpg).map(|r| r.stream.clone()).collect())
            .unwrap_or_default()
    }

    /// The VMs of `vpg` on this host that name a way to quiesce them.
    pub fn quiesce_specs(&self, vpg: VpgId) -> Vec<protection_groups::mgmt::VmQuiesce> {
        self.sources
            .lock()
            .map(|s| s.values().filter(|r| r.role.vpg == vpg).flat_map(|r| r.role.quiesce.clone()).collect())
            .unwrap_or_default()
    }

    /// PREPARE on every source stream of `vpg` here.
    pub fn prepare(&self, vpg: VpgId, id: CheckpointId, kind: CheckpointKind, name: &str) -> Result<(), String> {
        let streams = self.streams_of(vpg);
        if streams.is_empty() {
            return Err(format!("no source role of VPG {vpg} runs here"));
        }
        let limit = Duration::from_millis(self.cfg.hold_limit_ms);
        for (i, s) in streams.iter().enumerate() {
            if let Err(e) = s.prepare(id.0, name, kind, Some(limit)) {
                for done in &streams[..i] {
                    let _ = done.decide(id.0, false);
                }
                return Err(e.to_string());
            }
        }
        Ok(())
    }

    /// COMMIT or ABORT on every source stream of `vpg`; returns whether
    /// every stream recorded it as committed, and why not.
    pub fn decide(&self, vpg: VpgId, id: CheckpointId, commit: bool) -> (bool, String) {
        let mut committed = commit;
        let mut why = Vec::new();
        for s in self.streams_of(vpg) {
            match s.decide(id.0, commit) {
                Ok(Some(CheckpointKind::Inconsistent)) if commit => {
                    committed = false;
                    why.push("a sync runs: the checkpoint is inconsistent".to_string());
                }
                Ok(Some(_)) => {}
                Ok(None) => {
                    committed = false;
                    why.push("released on the hold limit before the decision came".to_string());
                }
                Err(e) => {
                    committed = false;
                    why.push(e.to_string());
                }
            }
        }
        (committed, why.join("; "))
    }

    /// The newest checkpoint id placed by any role here.
    pub fn newest_checkpoint(&self) -> CheckpointId {
        let t =
            self.target.replicas().iter().filter_map(|r| r.journal.checkpoints().ok()?.last().map(|c| c.id.0)).max();
        CheckpointId(t.unwrap_or(0))
    }

    /// What runs now, for the report.
    pub fn actual(&self) -> ActualState {
        let mut roles = Vec::new();
        // Taken out first: the barrier's PREPARE needs the roles' lock, and
        // a status waits on locks the data path holds.
        type Run = (VpgId, StreamId, Arc<SourceStream>, Arc<Mutex<Option<String>>>, Arc<super::taps::PowerOff>);
        let runs: Vec<Run> = self
            .sources
            .lock()
            .map(|s| {
                s.values()
                    .map(|r| (r.role.vpg, r.role.stream, r.stream.clone(), r.tap_problem.clone(), r.power.clone()))
                    .collect()
            })
            .unwrap_or_default();
        {
            for (vpg, stream_id, stream, tap_problem, power) in runs {
                let st = stream.status();
                let syncing = stream.is_syncing();
                let connected = st["connected"].as_bool().unwrap_or(false);
                let problem = tap_problem.lock().ok().and_then(|p| p.clone());
                let phase = if problem.is_some() {
                    RolePhase::Failed
                } else if syncing {
                    RolePhase::Syncing
                } else if connected {
                    RolePhase::Protecting
                } else {
                    RolePhase::Starting
                };
                roles.push(RoleState {
                    vpg,
                    kind: RoleKind::Source,
                    stream: Some(stream_id),
                    phase,
                    detail: problem.unwrap_or_else(|| st["last_error"].as_str().unwrap_or_default().to_string()),
                    sync_done_bytes: st["sync"]["done_bytes"].as_u64().unwrap_or(0),
                    sync_total_bytes: st["sync"]["total_bytes"].as_u64().unwrap_or(0),
                    durable_checkpoint: CheckpointId(0),
                    recoverable_checkpoints: Vec::new(),
                    oldest_recoverable_checkpoint: None,
                    written_bytes: st["raw_bytes"].as_u64().unwrap_or(0),
                    link_bytes: st["wire_bytes"].as_u64().unwrap_or(0),
                    write_count: st["writes"].as_u64().unwrap_or(0),
                    blocks_offered: st["blocks_offered"].as_u64().unwrap_or(0),
                    blocks_sent: st["blocks_sent"].as_u64().unwrap_or(0),
                    queue_bytes: st["queue"]["memory_bytes"].as_u64().unwrap_or(0),
                    spill_bytes: st["queue"]["spill_bytes"].as_u64().unwrap_or(0),
                    stacks: Vec::new(),
                    powered_off: power.done.load(Ordering::SeqCst),
                    entropy: stream.entropy_samples(),
                });
            }
        }
        let targets: Vec<VpgId> = self.targets.lock().map(|t| t.keys().copied().collect()).unwrap_or_default();
        for vpg in targets {
            let Ok(r) = self.target.replica(vpg) else { continue };
            let cps = r.journal.checkpoints().unwrap_or_default();
            let recoverable: Vec<CheckpointId> =
                cps.iter().rev().filter(|c| c.kind.is_recoverable()).take(REPORTED_CHECKPOINTS).map(|c| c.id).collect();
            let stats = r.journal.stats().ok();
            let failure = r.journal.failure();
            roles.push(RoleState {
                vpg,
                kind: RoleKind::Target,
                stream: None,
                phase: if failure.is_some() { RolePhase::Failed } else { RolePhase::Protecting },
                detail: failure.map(|why| format!("the recovery journal refuses writes: {why}")).unwrap_or_default(),
                sync_done_bytes: 0,
                sync_total_bytes: 0,
                durable_checkpoint: cps.last().map_or(CheckpointId(0), |c| c.id),
                recoverable_checkpoints: recoverable,
                oldest_recoverable_checkpoint: cps.iter().find(|c| c.kind.is_recoverable()).map(|c| c.id),
                written_bytes: stats.as_ref().map_or(0, |s| s.log_bytes + s.pack_bytes),
                link_bytes: 0,
                write_count: 0,
                blocks_offered: 0,
                blocks_sent: 0,
                queue_bytes: 0,
                spill_bytes: 0,
                stacks: self.stacks.states(vpg),
                powered_off: false,
                entropy: Vec::new(),
            });
        }
        let data_free_bytes = crate::journal::free_bytes_at(&self.cfg.data).unwrap_or(0);
        ActualState {
            desired_version: self.applied_version.load(Ordering::SeqCst),
            roles,
            data_free_bytes,
            memory_bytes: resident_bytes(),
        }
    }

    /// Applies each target role's retention (every few seconds), and
    /// reopens a journal that failed once its volume has room again.
    pub fn run_retention(&self) {
        let targets: Vec<TargetRole> = self.targets.lock().map(|t| t.values().cloned().collect()).unwrap_or_default();
        for t in targets {
            if let Ok(r) = self.target.replica(t.vpg) {
                if let Some(why) = r.journal.failure() {
                    let free = crate::journal::free_bytes_at(&self.cfg.data).unwrap_or(0);
                    if free < REOPEN_FREE_BYTES {
                        continue;
                    }
                    tracing::warn!(vpg = %t.vpg, %why, free, "reopening the failed journal: its volume has room again");
                    if let Err(e) = self.target.reopen(t.vpg) {
                        tracing::error!(vpg = %t.vpg, "cannot reopen the journal: {e}");
                    }
                    continue;
                }
                // A failed-over VPG (no stream accepted) keeps its journal
                // as it is: the failover's checkpoint must stay, and a
                // promotion owns the replica.
                if t.streams.is_empty() {
                    continue;
                }
                // The checkpoints its failover tests read stay retained.
                let keep: Vec<CheckpointId> = t.stacks.iter().map(|s| s.checkpoint).collect();
                if let Err(e) = r.journal.apply_retention_keeping(&t.retention, crate::replication::now_ms(), &keep) {
                    tracing::error!(vpg = %t.vpg, "retention failed: {e}");
                }
            }
        }
    }
}

/// This process's resident memory, from /proc/self/statm (0 where that
/// cannot be read).
fn resident_bytes() -> u64 {
    let pages = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1).and_then(|p| p.parse::<u64>().ok()))
        .unwrap_or(0);
    // SAFETY: sysconf only reads a system constant.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    pages.saturating_mul(u64::try_from(page).unwrap_or(4096))
}
