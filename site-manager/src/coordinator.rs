//! The checkpoint coordinator: the two-phase barrier across every source
//! VDSA of a VPG (docs/architecture.md §3). PREPARE goes to each; when all
//! answered within the deadline, COMMIT; otherwise ABORT. Ids come from the
//! store's counter, so they grow across restarts. A checkpoint is
//! recorded at once as consistent or not, and marked durable once every
//! target VDSA of the VPG reports holding it.

use crate::links::Links;
use crate::model::{now_ms, Checkpoint};
use crate::store::Store;
use protection_groups::mgmt::{ManagerMessage, VdsaMessage};
use protection_groups::{CheckpointId, CheckpointKind, HostId, VpgId};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;

/// How long the coordinator waits for every PREPARE answer. A VDSA's own
/// hold limit must be longer (it releases on its own after it).
pub const PREPARE_DEADLINE: Duration = Duration::from_millis(500);

/// How long the coordinator waits for every QUIESCE answer (a VDSA gives
/// each VM five seconds; a VPG rarely has many VMs on one host).
pub const QUIESCE_DEADLINE: Duration = Duration::from_secs(12);

/// How long the coordinator waits for the VDSAs to say how they recorded a
/// committed marker. One that does not say in time is left as committed:
/// durability (every target listing it as recoverable) still decides
/// whether it is offered.
const DECISION_WAIT: Duration = Duration::from_millis(500);

/// Answers to one barrier in flight.
#[derive(Debug)]
struct Pending {
    tx: mpsc::UnboundedSender<(HostId, VdsaMessage)>,
}

/// Routes PREPARE answers to the barrier waiting for them, and runs one
/// barrier per VPG at a time.
#[derive(Debug, Default)]
pub struct Coordinator {
    pending: Mutex<HashMap<(VpgId, CheckpointId), Pending>>,
    turns: Mutex<HashMap<VpgId, Arc<tokio::sync::Mutex<()>>>>,
    /// For control runs of the write-order checker only: no barrier; each
    /// VDSA places its marker on its own, one after another, as if each
    /// host were checkpointed alone.
    pub unsafe_no_barrier: std::sync::atomic::AtomicBool,
    /// Fault injection for tests: the site manager kills itself after
    /// sending the PREPAREs of this many barriers (0: never).
    pub fault_kill_after_prepare: std::sync::atomic::AtomicU64,
}

impl Coordinator {
    fn fault_after_prepare(&self) -> bool {
        use std::sync::atomic::Ordering::SeqCst;
        let left = self.fault_kill_after_prepare.load(SeqCst);
        left > 0 && self.fault_kill_after_prepare.fetch_sub(1, SeqCst) == 1
    }

    fn turn(&self, vpg: VpgId) -> Arc<tokio::sync::Mutex<()>> {
        self.turns.lock().map(|mut t| t.entry(vpg).or_default().clone()).unwrap_or_default()
    }
}

impl Coordinator {
    /// Called by a session with a PREPARE answer or a decision report.
    pub fn on_answer(&self, host: HostId, m: VdsaMessage) {
        let key = match &m {
            VdsaMessage::Prepared { vpg, checkpoint }
            | VdsaMessage::PrepareFailed { vpg, checkpoint, .. }
            | VdsaMessage::Quiesced { vpg, checkpoint, .. } => (*vpg, *checkpoint),
            VdsaMessage::Decided { vpg, checkpoint, committed, reason } => {
                if !committed {
                    tracing::info!(%host, %vpg, %checkpoint, %reason, "a VDSA recorded a checkpoint as not consistent");
                }
                (*vpg, *checkpoint)
            }
            _ => return,
        };
        if let Ok(p) = self.pending.lock() {
            if let Some(p) = p.get(&key) {
                let _ = p.tx.send((host, m));
            }
        }
    }
}

/// The outcome of one barrier.
#[derive(Debug, Clone)]
pub struct BarrierOutcome {
    pub checkpoint: Checkpoint,
    /// First PREPARE sent to last COMMIT sent.
    pub hold: Duration,
}

/// One checkpoint to take: its id (from the store's counter), the VPG and
/// its source VDSAs' hosts.
#[derive(Debug, Clone)]
pub struct CheckpointRequest {
    pub vpg: VpgId,
    pub hosts: Vec<HostId>,
    pub kind: CheckpointKind,
    pub name: String,
    pub id: CheckpointId,
    /// Quiesce the VMs around the barrier (application-consistent).
    pub quiesce: bool,
}

/// Stores a checkpoint's record, flushed.
fn record(store: &std::sync::RwLock<Store>, cp: &Checkpoint) -> Result<(), crate::store::StoreError> {
    let s = store.read().map_err(|_| crate::store::StoreError::Corrupt {
        tree: "checkpoints",
        key: cp.id.to_string(),
        why: "store lock poisoned".into(),
    })?;
    s.put_checkpoint_unflushed(cp)?;
    s.flush()?;
    crate::barrier_hold::BARRIER_HOLD.observe(cp.hold_us);
    Ok(())
}

impl Coordinator {
    /// Runs one barrier over the VPG's source VDSAs (through `links`, as
    /// manager `generation`) and records the checkpoint in `store`. Fails only
    /// if the store does.
    pub async fn take_checkpoint(
        &self,
        links: &Links,
        store: &std::sync::RwLock<Store>,
        generation: u64,
        req: CheckpointRequest,
    ) -> Result<BarrierOutcome, crate::store::StoreError> {
        let turn = self.turn(req.vpg);
        let _turn = turn.lock().await;
        if self.unsafe_no_barrier.load(std::sync::atomic::Ordering::Relaxed) {
            return no_barrier(links, store, generation, req).await;
        }
        let CheckpointRequest { vpg, hosts, kind, name, id, quiesce } = req;
        let hosts = &hosts[..];
        let (tx, mut rx) = mpsc::unbounded_channel();
        if let Ok(mut p) = self.pending.lock() {
            p.insert((vpg, id), Pending { tx });
        }
        let quiesce_failures =
            if quiesce { quiesce_all(links, generation, vpg, id, hosts, &mut rx).await } else { Vec::new() };
        let started = tokio::time::Instant::now();
        let mut missing: Vec<HostId> = Vec::new();
        let mut sent = Vec::new();
        for &h in hosts {
            let prepare = ManagerMessage::Prepare { generation, vpg, checkpoint: id, kind, name: name.clone() };
            match links.sender(h) {
                Some(tx) if tx.send(prepare).await.is_ok() => sent.push(h),
                _ => missing.push(h),
            }
        }
        let mut failed: Vec<String> = missing.iter().map(|h| format!("VDSA of host {h} is not connected")).collect();
        let mut answered: Vec<HostId> = Vec::new();
        let deadline = started + PREPARE_DEADLINE;
        while failed.is_empty() && answered.len() < sent.len() {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some((h, VdsaMessage::Prepared { .. }))) if sent.contains(&h) && !answered.contains(&h) => {
                    answered.push(h)
                }
                Ok(Some((h, VdsaMessage::PrepareFailed { reason, .. }))) => failed.push(format!("host {h}: {reason}")),
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(_) => {
                    let late: Vec<String> =
                        sent.iter().filter(|h| !answered.contains(h)).map(|h| h.to_string()).collect();
                    failed.push(format!(
                        "no PREPARE answer within {} ms from {}",
                        PREPARE_DEADLINE.as_millis(),
                        late.join(", ")
                    ));
                }
            }
        }
        let commit = failed.is_empty() && !hosts.is_empty();
        if self.fault_after_prepare() {
            // Fault injection for tests: die between PREPARE and COMMIT.
            tracing::warn!(%vpg, checkpoint = %id, "fault injection: the site manager dies after PREPARE");
            // SAFETY: kill(2) on this process.
            unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
        }
        for &h in &sent {
            let m = if commit {
                ManagerMessage::Commit { generation, vpg, checkpoint: id }
            } else {
                ManagerMessage::Abort { generation, vpg, checkpoint: id, reason: failed.join("; ") }
            };
            if let Some(tx) = links.sender(h) {
                let _ = tx.send(m).await;
            }
        }
        let hold = started.elapsed();
        // Each VDSA says how it recorded the marker: a sync running or its own
        // hold limit passed makes it inconsistent in the stream.
        let mut consistent = commit;
        if commit {
            let mut decided: Vec<HostId> = Vec::new();
            let deadline = tokio::time::Instant::now() + DECISION_WAIT;
            while decided.len() < sent.len() {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some((h, VdsaMessage::Decided { committed, reason, .. }))) if !decided.contains(&h) => {
                        decided.push(h);
                        if !committed {
                            consistent = false;
                            failed.push(format!("host {h}: {reason}"));
                        }
                    }
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => break,
                }
            }
        }
        if quiesce {
            for &h in hosts {
                if let Some(tx) = links.sender(h) {
                    let _ = tx.send(ManagerMessage::Thaw { generation, vpg, checkpoint: id }).await;
                }
            }
        }
        if let Ok(mut p) = self.pending.lock() {
            p.remove(&(vpg, id));
        }
        let reason = if hosts.is_empty() { "the VPG has no protected host".to_string() } else { failed.join("; ") };
        let hold_us = u64::try_from(hold.as_micros()).unwrap_or(u64::MAX);
        let checkpoint = Checkpoint {
            vpg,
            id,
            time_ms: now_ms(),
            kind,
            name,
            consistent,
            durable: false,
            reason,
            hold_us,
            application_consistent: quiesce && consistent && quiesce_failures.is_empty(),
            quiesce_reason: quiesce_failures.join("; "),
        };
        record(store, &checkpoint)?;
        Ok(BarrierOutcome { checkpoint, hold })
    }
}

/// QUIESCE to every host, then waits for their answers; returns why VMs
/// could not be quiesced (a host that does not answer in time counts).
async fn quiesce_all(
    links: &Links,
    generation: u64,
    vpg: VpgId,
    checkpoint: CheckpointId,
    hosts: &[HostId],
    rx: &mut mpsc::UnboundedReceiver<(HostId, VdsaMessage)>,
) -> Vec<String> {
    let mut failures = Vec::new();
    let mut sent = Vec::new();
    for &h in hosts {
        match links.sender(h) {
            Some(tx) if tx.send(ManagerMessage::Quiesce { generation, vpg, checkpoint }).await.is_ok() => sent.push(h),
            _ => failures.push(format!("VDSA of host {h} is not connected")),
        }
    }
    let deadline = tokio::time::Instant::now() + QUIESCE_DEADLINE;
    let mut answered = Vec::new();
    while answered.len() < sent.len() {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some((h, VdsaMessage::Quiesced { failures: f, .. }))) if !answered.contains(&h) => {
                answered.push(h);
                failures.extend(f);
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => {
                for h in sent.iter().filter(|h| !answered.contains(h)) {
                    failures.push(format!("host {h} did not quiesce within {} s", QUIESCE_DEADLINE.as_secs()));
                }
                break;
            }
        }
    }
    failures
}

/// The control run's checkpoint: each VDSA in turn gets PREPARE and COMMIT
/// at once, a few milliseconds apart, so that each cut is taken alone.
/// Recorded as consistent: the write-order checker must find it is not.
async fn no_barrier(
    links: &Links,
    store: &std::sync::RwLock<Store>,
    generation: u64,
    req: CheckpointRequest,
) -> Result<BarrierOutcome, crate::store::StoreError> {
    let CheckpointRequest { vpg, hosts, kind, name, id, .. } = req;
    let started = tokio::time::Instant::now();
    for &h in &hosts {
        if let Some(tx) = links.sender(h) {
            let _ =
                tx.send(ManagerMessage::Prepare { generation, vpg, checkpoint: id, kind, name: name.clone() }).await;
            let _ = tx.send(ManagerMessage::Commit { generation, vpg, checkpoint: id }).await;
        }
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
    let hold = started.elapsed();
    let hold_us = u64::try_from(hold.as_micros()).unwrap_or(u64::MAX);
    let checkpoint = Checkpoint {
        vpg,
        id,
        time_ms: now_ms(),
        kind,
        name,
        consistent: true,
        durable: false,
        reason: String::new(),
        hold_us,
        application_consistent: false,
        quiesce_reason: String::new(),
    };
    record(store, &checkpoint)?;
    Ok(BarrierOutcome { checkpoint, hold })
}
