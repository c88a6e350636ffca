//! `vdsa agent`: the long-lived VDSA of a host under a site manager
//! (docs/management-protocol.md). It registers once with a one-time
//! registration token, then dials its site manager over mutual TLS,
//! obeys the newest manager generation only, runs the roles of the desired
//! state it receives (source streams and target journals), trusts the
//! paired sites it names, takes part in the checkpoint barrier (quiescing
//! its VMs when asked), answers the log collector, and reports its actual
//! state every heartbeat.

pub mod appliance;
mod config;
mod identity;
mod link;
mod quiesce;
mod recovery;
mod roles;
mod taps;

pub use config::AgentConfig;
pub use identity::{newest_generation, Identity};

use crate::daemon::listen::{add_per_run_nbd_listener, claim_listeners, serve_taps, TapListener};
use crate::journal::JournalConfig;
use crate::nbd::export::Exports;
use crate::replication::target::{TargetOptions, TargetServer};
use crate::wire::tls;
use anyhow::{bail, Context, Result};
use identity::{connect_tcp, store_generation};
use link::{read_message, write_message};
use protection_groups::mgmt::{ManagerMessage, VdsaMessage, PROTOCOL_VERSION, SITE_MANAGER_NAME};
use roles::Roles;
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Reports go at most this often (a busy recovery VDSA makes checkpoints
/// durable many times a second).
const REPORT_SPACING: Duration = Duration::from_millis(200);
/// How often the reporter looks for a newly durable checkpoint.
const REPORT_POLL: Duration = Duration::from_millis(20);

/// How long a clean stop waits for the send queues to drain.
const DRAIN_LIMIT: Duration = Duration::from_secs(20);

/// Serves the processing stacks' exports on `listen` (plain NBD, on the
/// connection runtime); returns the address bound.
fn serve_stacks(listen: &str, exports: Arc<Exports>) -> Result<String> {
    use crate::conn_limit::{ConnectionLimit, MAX_TAP_CONNECTIONS};
    use crate::serving::{accept_each, Listener, Pool, Protocol};
    let l = TcpListener::bind(listen).with_context(|| format!("listening for stack exports on {listen}"))?;
    let addr = l.local_addr()?.to_string();
    let what = "stack export connections";
    let limit = ConnectionLimit::new(MAX_TAP_CONNECTIONS, what);
    accept_each(Listener::Tcp(l), exports, limit, Pool::Exports, Protocol::Nbd, what)
        .context("serving stack exports")?;
    Ok(addr)
}

/// Runs the agent until SIGTERM or SIGINT.
pub fn run(mut cfg: AgentConfig) -> Result<()> {
    cfg.check()?;
    let stop = install_signal_thread()?;
    std::fs::create_dir_all(&cfg.data).with_context(|| format!("creating {}", cfg.data.display()))?;
    // The addresses are taken before anything is created.
    let mut listeners = TapListener::parse_all(&cfg.tap_listen)?;
    let claims = claim_listeners(&listeners)?;
    // The mirror jobs this agent attaches reach it at this run's own path
    // (the first NBD listener); outside taps at the configured one.
    add_per_run_nbd_listener(&mut listeners);
    cfg.tap_listen = listeners.iter().map(TapListener::spec).collect();
    let replication = TcpListener::bind(&cfg.replication_listen)
        .with_context(|| format!("listening for replication on {}", cfg.replication_listen))?;
    let identity = loop {
        if let Some(i) = Identity::load(&cfg.data)? {
            break i;
        }
        match identity::register(&cfg) {
            Ok(i) => break i,
            Err(e) if is_refusal(&e) => return Err(e),
            Err(e) => {
                tracing::warn!("registration failed, retrying: {e:#}");
                if stop.load(Ordering::SeqCst) {
                    return Ok(());
                }
                std::thread::sleep(Duration::from_secs(2));
            }
        }
    };
    let site = identity.replication().context("loading the replication identity")?;
    let root = cfg.data.join("journals");
    std::fs::create_dir_all(&root)?;
    let target = TargetServer::new(TargetOptions {
        root,
        heartbeat: Duration::from_millis(cfg.heartbeat_ms.max(50)),
        journal: JournalConfig::default(),
    });
    let server_tls = Arc::new(std::sync::RwLock::new(site.server_config()?));
    let (t, tls) = (target.clone(), server_tls.clone());
    std::thread::spawn(move || t.serve(replication, tls));
    let exports = Arc::new(Exports::default());
    serve_taps(listeners, claims, exports.clone())?;
    let stack_exports = Arc::new(Exports::default());
    let export_address = serve_stacks(&cfg.export_listen, stack_exports.clone())?;
    let tls = super::agent::roles::ReplicationTls {
        identity_dir: identity.dir.clone(),
        server: server_tls,
        client: std::sync::Mutex::new(site.client_config()?),
    };
    let stacks =
        recovery::Stacks::new(cfg.data.join("stacks"), stack_exports, export_address, cfg.promotion_bytes_per_sec);
    let roles = Arc::new(Roles::new(cfg.clone(), target, exports, tls, stacks));
    let r = roles.clone();
    std::thread::spawn(move || loop {
        std::thread::sleep(Duration::from_secs(5));
        r.run_retention();
    });
    println!("vdsa agent: host {} , replication on {}", identity.host, cfg.replication_listen);
    let agent = Arc::new(Agent {
        cfg,
        identity,
        roles,
        prepares: Default::default(),
        quiescer: Arc::new(quiesce::Quiescer::default()),
    });
    let q = agent.quiescer.clone();
    std::thread::spawn(move || loop {
        std::thread::sleep(Duration::from_secs(1));
        q.thaw_overdue();
    });
    let a = agent.clone();
    std::thread::spawn(move || loop {
        raise_session_priority();
        if let Err(e) = a.session() {
            tracing::warn!("site manager link: {e:#}");
        }
        std::thread::sleep(Duration::from_secs(1));
    });
    while !stop.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(100));
    }
    agent.shutdown();
    Ok(())
}

/// Sends a message to the site manager (any thread of the session).
type Sender = Arc<dyn Fn(&VdsaMessage) -> Result<()> + Send + Sync>;

/// Real-time priority of the management session thread.
const SESSION_PRIORITY: libc::c_int = 10;

/// Puts the management session thread (it answers PREPARE and applies
/// COMMIT, while guests wait) ahead of the data path: SCHED_FIFO, reset on
/// fork, so the threads and processes it starts (roles, links, hooks) run
/// as normal ones. It only waits on the link and does little per message.
/// Without the privilege (CAP_SYS_NICE) it stays as it is. See
/// docs/performance.md, "The barrier with 16 VDSAs".
fn raise_session_priority() {
    let param = libc::sched_param { sched_priority: SESSION_PRIORITY };
    // SAFETY: `param` outlives the call; pid 0 is the calling thread, the
    // only one changed.
    let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO | libc::SCHED_RESET_ON_FORK, &param) };
    if rc != 0 {
        tracing::debug!("session thread priority not raised: {}", std::io::Error::last_os_error());
    }
}

/// The records of this VDSA's log file in the range, the newest kept
/// when they are too many for one answer.
fn collect_logs(
    file: &std::path::Path,
    since_ms: u64,
    until_ms: u64,
    level: protection_groups::logs::LogLevel,
) -> (String, bool) {
    let text = match std::fs::read(file) {
        Ok(b) => String::from_utf8_lossy(&b).into_owned(),
        Err(e) => return (format!("(the VDSA cannot read its log {}: {e})\n", file.display()), false),
    };
    let lines = protection_groups::logs::filter(&text, since_ms, until_ms, level);
    let mut out: Vec<&str> = Vec::new();
    let mut bytes = 0usize;
    let mut truncated = false;
    for l in lines.iter().rev() {
        bytes += l.len() + 1;
        if bytes > protection_groups::mgmt::MAX_LOG_BYTES {
            truncated = true;
            break;
        }
        out.push(l);
    }
    out.reverse();
    let mut s = out.join("\n");
    s.push('\n');
    (s, truncated)
}

/// `vdsa agent`'s exit status when its registration was refused: a wrong,
/// used or expired token, or a site manager that is not the one the token
/// names. Restarting cannot help (the appliance's init stops).
pub const EXIT_REFUSED: i32 = 3;

/// Whether an error of [`run`] is a refusal that retrying cannot mend.
pub fn is_refusal(e: &anyhow::Error) -> bool {
    let s = format!("{e:#}");
    // Retrying cannot help these: the token or the site manager is wrong.
    s.contains("refused the registration")
        || s.contains("malformed")
        || s.contains("not registered yet")
        || s.contains("not the one the registration token names")
}

/// SIGTERM and SIGINT set the returned flag (they are blocked in every
/// thread and taken by one).
fn install_signal_thread() -> Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    // SAFETY: sigset_t is plain data; the calls only read and write the
    // set we pass, and pthread_sigmask changes this thread's mask, which
    // the threads spawned after inherit.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            bail!("cannot block SIGTERM: {}", std::io::Error::last_os_error());
        }
        set
    };
    let s = stop.clone();
    std::thread::spawn(move || {
        let mut sig = 0;
        // SAFETY: sigwait reads the set and writes the signal number.
        unsafe { libc::sigwait(&set, &mut sig) };
        tracing::info!(signal = sig, "stopping");
        s.store(true, Ordering::SeqCst);
    });
    Ok(stop)
}

#[derive(Debug)]
struct Agent {
    cfg: AgentConfig,
    identity: Identity,
    roles: Arc<Roles>,
    /// PREPAREs answered (for fault injection).
    prepares: std::sync::atomic::AtomicU64,
    /// VMs frozen for application-consistent checkpoints.
    quiescer: Arc<quiesce::Quiescer>,
}

impl Agent {
    /// A clean stop: waits (bounded) for every send queue to drain, so a
    /// planned restart needs no resync, then syncs the journals.
    fn shutdown(&self) {
        let deadline = std::time::Instant::now() + DRAIN_LIMIT;
        while !self.roles.drained() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        if !self.roles.drained() {
            tracing::warn!("send queues not drained in {} s: a resync follows the restart", DRAIN_LIMIT.as_secs());
        }
        self.roles.stop_all();
        println!("vdsa agent stopped");
    }

    /// One session with the site manager, until the link breaks.
    fn session(&self) -> Result<()> {
        let tcp = connect_tcp(&self.cfg.site_manager)?;
        let (mut r, w) = tls::connect_to(self.identity.management_client()?, tcp, SITE_MANAGER_NAME)
            .with_context(|| format!("TLS with the site manager at {}", self.cfg.site_manager))?;
        let w = Arc::new(Mutex::new(w));
        let w1 = w.clone();
        let send: Sender = Arc::new(move |m: &VdsaMessage| -> Result<()> {
            let mut g = w1.lock().map_err(|_| anyhow::anyhow!("link writer poisoned"))?;
            write_message(&mut *g, m)
        });
        let obeyed = newest_generation(&self.cfg.data);
        send(&VdsaMessage::Hello {
            protocol: PROTOCOL_VERSION,
            host: self.identity.host,
            newest_generation: obeyed,
            newest_checkpoint: self.roles.newest_checkpoint(),
            hold_limit_ms: self.cfg.hold_limit_ms,
            replication_address: self.cfg.advertised_replication_address(),
            software_version: env!("CARGO_PKG_VERSION").to_string(),
        })?;
        let mut current = match read_message(&mut r)? {
            ManagerMessage::Welcome { generation, .. } if generation < obeyed => {
                bail!(
                    "the site manager's generation {generation} is older than {obeyed}, which this VDSA obeys: \
                     ignoring a stale site manager (restored from a backup? run reclaim on it)"
                );
            }
            ManagerMessage::Welcome { generation, .. } => generation,
            ManagerMessage::Refused { reason } => bail!("the site manager refused the link: {reason}"),
            other => bail!("unexpected answer to hello: {other:?}"),
        };
        if current > obeyed {
            store_generation(&self.cfg.data, current)?;
        }
        tracing::info!(generation = current, "connected to the site manager");
        let ended = Arc::new(AtomicBool::new(false));
        let (roles, w2, ended2) = (self.roles.clone(), w.clone(), ended.clone());
        let beat = Duration::from_millis(self.cfg.heartbeat_ms);
        let reporter = std::thread::spawn(move || {
            // Every heartbeat, and soon after a recovery journal made a
            // checkpoint durable: the site manager's RPO counts until it
            // hears of it.
            let mut durable_seen = roles.target.markers_made_durable();
            while !ended2.load(Ordering::SeqCst) {
                let m = VdsaMessage::Report { actual: roles.actual() };
                let ok = w2.lock().map_err(|_| ()).and_then(|mut g| write_message(&mut *g, &m).map_err(|_| ()));
                if ok.is_err() {
                    if let Ok(g) = w2.lock() {
                        g.shutdown();
                    }
                    break;
                }
                let sent = std::time::Instant::now();
                std::thread::sleep(REPORT_SPACING.min(beat));
                while sent.elapsed() < beat && !ended2.load(Ordering::SeqCst) {
                    let durable = roles.target.markers_made_durable();
                    if durable != durable_seen {
                        durable_seen = durable;
                        break;
                    }
                    std::thread::sleep(REPORT_POLL);
                }
            }
        });
        let result = self.obey(&mut r, &send, &mut current);
        ended.store(true, Ordering::SeqCst);
        if let Ok(g) = w.lock() {
            g.shutdown();
        }
        let _ = reporter.join();
        result
    }

    /// Carries out commands until the link breaks.
    fn obey(&self, r: &mut tls::LinkReader, send: &Sender, current: &mut u64) -> Result<()> {
        loop {
            let m = read_message(r)?;
            if let Some(g) = m.generation() {
                if g < *current {
                    send(&VdsaMessage::Refused {
                        reason: format!("generation {g} is older than {current}, which this VDSA obeys"),
                    })?;
                    continue;
                }
                if g > *current {
                    store_generation(&self.cfg.data, g)?;
                    *current = g;
                }
            }
            match m {
                ManagerMessage::Desired { state, .. } => {
                    self.roles.apply(&state);
                    send(&VdsaMessage::Report { actual: self.roles.actual() })?;
                }
                ManagerMessage::Prepare { vpg, checkpoint, kind, name, .. } => {
                    let answer = match self.roles.prepare(vpg, checkpoint, kind, &name) {
                        Ok(()) => VdsaMessage::Prepared { vpg, checkpoint },
                        Err(reason) => VdsaMessage::PrepareFailed { vpg, checkpoint, reason },
                    };
                    send(&answer)?;
                    let n = self.prepares.fetch_add(1, Ordering::SeqCst) + 1;
                    if self.cfg.fault_kill_after_prepare == n {
                        tracing::warn!(%checkpoint, "fault injection: the VDSA dies between PREPARE and COMMIT");
                        // SAFETY: kill(2) on this process.
                        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
                    }
                }
                ManagerMessage::Commit { vpg, checkpoint, .. } => {
                    let (committed, reason) = self.roles.decide(vpg, checkpoint, true);
                    send(&VdsaMessage::Decided { vpg, checkpoint, committed, reason })?;
                }
                ManagerMessage::Abort { vpg, checkpoint, reason, .. } => {
                    let _ = self.roles.decide(vpg, checkpoint, false);
                    send(&VdsaMessage::Decided { vpg, checkpoint, committed: false, reason })?;
                }
                // Freezing and thawing take seconds: on threads of their own,
                // so that PREPAREs of other VPGs are answered meanwhile.
                ManagerMessage::Quiesce { vpg, checkpoint, .. } => {
                    let (q, specs, send) = (self.quiescer.clone(), self.roles.quiesce_specs(vpg), send.clone());
                    std::thread::spawn(move || {
                        let failures = q.quiesce(vpg, checkpoint, &specs);
                        if let Err(e) = send(&VdsaMessage::Quiesced { vpg, checkpoint, failures }) {
                            tracing::warn!(%vpg, %checkpoint, "cannot answer QUIESCE: {e:#}");
                        }
                    });
                }
                ManagerMessage::Thaw { vpg, checkpoint, .. } => {
                    let q = self.quiescer.clone();
                    std::thread::spawn(move || q.thaw(vpg, checkpoint));
                }
                ManagerMessage::CollectLogs { request, since_ms, until_ms, level, .. } => {
                    let (text, truncated) = collect_logs(&self.cfg.log_file(), since_ms, until_ms, level);
                    send(&VdsaMessage::Logs { request, text, truncated })?;
                }
                ManagerMessage::Refused { reason } => tracing::warn!(%reason, "the site manager refused"),
                ManagerMessage::Welcome { .. } | ManagerMessage::Registered { .. } => {
                    tracing::warn!("unexpected message in a session: {m:?}")
                }
            }
        }
    }
}
