//! Taps the VDSA attaches itself on KVM: for each disk of a source role,
//! QEMU's block mirror (write-blocking) from the VM's block node to this
//! VDSA's NBD export, with a full copy first. When every disk of the role
//! is actively synced, the stream leaves sync mode and its checkpoints are
//! consistent. When the role stops, the jobs are cancelled (the VM's disk
//! stays as it is).
//!
//! A VM's monitor serves one client at a time, and a role may be replaced
//! by another for the same VM (a disk added, a VM moved here): each use of
//! a monitor takes that monitor's lock and holds no connection between
//! uses, and each attach has a job id of its own, so a stopping role's
//! detach never cancels the job of the role that replaced it.

use crate::kvm::{self, NbdAddress, Qmp, TapSpec};
use crate::replication::source::SourceStream;
use protection_groups::mgmt::{SourceRole, TapAttach};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

/// How long the initial copy may take.
const SYNC_LIMIT: Duration = Duration::from_secs(3600);
/// A failed attach is tried again after this.
const RETRY: Duration = Duration::from_secs(2);

/// The lock of the monitor at `socket`.
fn monitor_lock(socket: &str) -> Arc<Mutex<()>> {
    static LOCKS: OnceLock<Mutex<HashMap<String, Arc<Mutex<()>>>>> = OnceLock::new();
    let locks = LOCKS.get_or_init(Mutex::default);
    let mut m = locks.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    m.entry(socket.to_string()).or_default().clone()
}

/// Runs `f` on a fresh connection to the monitor, holding its lock.
fn with_monitor<T>(socket: &str, f: impl FnOnce(&mut Qmp) -> Result<T, String>) -> Result<T, String> {
    let lock = monitor_lock(socket);
    let _held = lock.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut qmp = Qmp::connect(Path::new(socket)).map_err(|e| format!("cannot reach the VM's QEMU: {e}"))?;
    f(&mut qmp)
}

/// Jobs of a disk's taps start with this; QEMU's node names (the job's
/// `-tgt` and `-filter` nodes) are at most 31 bytes.
fn job_prefix(disk: &protection_groups::DiskId) -> String {
    format!("vt{}", &disk.0.simple().to_string()[..10])
}

/// Cancels jobs of this disk left by an earlier run or role (their queue
/// is gone, so the disk is copied again anyway).
fn remove_leftovers(qmp: &mut Qmp, disk: &protection_groups::DiskId) -> Result<(), String> {
    let prefix = job_prefix(disk);
    let jobs = qmp.execute("query-block-jobs", json!({})).map_err(|e| e.to_string())?;
    let ids: Vec<String> = jobs
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|j| j.get("device").and_then(Value::as_str))
                .filter(|id| id.starts_with(&prefix))
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    for job in ids {
        tracing::info!(%job, "cancelling a tap job left by an earlier role");
        kvm::detach(qmp, &job, &format!("{job}-tgt"), true).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Attaches one tap with a full copy and waits until it is in sync;
/// returns its job id.
fn attach_one(t: &TapAttach, export: &str, server: &NbdAddress) -> Result<String, String> {
    let job = format!("{}-{}", job_prefix(&t.disk), &uuid::Uuid::new_v4().simple().to_string()[..8]);
    with_monitor(&t.qmp_socket, |qmp| {
        remove_leftovers(qmp, &t.disk)?;
        let spec = TapSpec {
            job_id: job.clone(),
            device: t.device.clone(),
            target_node: format!("{job}-tgt"),
            server: server.clone(),
            export: export.to_string(),
            sync_full: true,
            reconnect_delay: Some(5),
        };
        kvm::attach(qmp, &spec, SYNC_LIMIT).map_err(|e| format!("cannot attach the tap: {e}"))?;
        Ok(job.clone())
    })
}

/// Whether a monitor error says the VM's QEMU is gone (its socket missing
/// or nobody listening), not merely busy.
fn monitor_gone(e: &str) -> bool {
    e.starts_with("cannot reach") && (e.contains("(os error 2)") || e.contains("(os error 111)"))
}

/// How often an attached tap's job is looked at.
const WATCH_EVERY: Duration = Duration::from_secs(3);

/// Attaches every tap of `role` (retrying each until it is in sync or the
/// role stops), then leaves sync mode and watches the jobs until the role
/// stops: a job that ended (the VM restarted) is attached again with a
/// full copy; a monitor that does not answer (the VM was deleted or shut
/// down) is put in `problem`, which the role reports. Then it detaches.
pub fn run(
    role: &SourceRole,
    stream: &SourceStream,
    server: NbdAddress,
    stopped: &AtomicBool,
    problem: &Mutex<Option<String>>,
) {
    let set_problem = |p: Option<String>| {
        if let Ok(mut g) = problem.lock() {
            *g = p;
        }
    };
    let mut attached: Vec<(String, String)> = Vec::new();
    let mut pending: Vec<&TapAttach> = role.taps.iter().collect();
    while !stopped.load(Ordering::SeqCst) {
        if !pending.is_empty() {
            stream.set_syncing(true);
        }
        for t in std::mem::take(&mut pending) {
            let Some(disk) = role.disks.iter().find(|d| d.id == t.disk) else { continue };
            let mut attempt = 0u32;
            while !stopped.load(Ordering::SeqCst) {
                attempt += 1;
                match attach_one(t, &disk.name, &server) {
                    Ok(job) => {
                        tracing::info!(disk = %disk.name, attempt, "tap attached and in sync");
                        attached.retain(|(_, j)| !j.starts_with(&job_prefix(&t.disk)));
                        attached.push((t.qmp_socket.clone(), job));
                        set_problem(None);
                        break;
                    }
                    Err(e) => {
                        tracing::error!(disk = %disk.name, attempt, "{e}; retrying");
                        if monitor_gone(&e) {
                            set_problem(Some(format!(
                                "disk {}: the VM's monitor {} does not answer (was the VM deleted or shut down?): {e}",
                                disk.name, t.qmp_socket
                            )));
                        }
                        std::thread::sleep(RETRY);
                    }
                }
            }
        }
        if stopped.load(Ordering::SeqCst) {
            break;
        }
        stream.set_syncing(false);
        tracing::info!(vpg = %role.vpg, stream = %role.stream, "initial sync done: checkpoints are consistent");
        // Watch until the role stops or a job needs attaching again.
        let mut last = std::time::Instant::now();
        while !stopped.load(Ordering::SeqCst) && pending.is_empty() {
            std::thread::sleep(Duration::from_millis(50));
            if last.elapsed() < WATCH_EVERY {
                continue;
            }
            last = std::time::Instant::now();
            for t in &role.taps {
                let Some((_, job)) = attached.iter().find(|(_, j)| j.starts_with(&job_prefix(&t.disk))) else {
                    continue;
                };
                let state = with_monitor(&t.qmp_socket, |qmp| kvm::state(qmp, job).map_err(|e| e.to_string()));
                match state {
                    Ok(Some(s)) if !s.failed() => set_problem(None),
                    Ok(_) => {
                        tracing::warn!(%job, "the tap's job ended: attaching again with a full copy");
                        pending.push(t);
                    }
                    // Gone (no socket, nobody listening): the VM was deleted
                    // or shut down. Only slow (busy with another client or
                    // a drain): look again next round.
                    Err(e) if monitor_gone(&e) => {
                        tracing::warn!(%job, "the VM's monitor is gone: {e}");
                        set_problem(Some(format!(
                            "the VM's monitor {} does not answer (was the VM deleted or shut down?): {e}",
                            t.qmp_socket
                        )));
                        pending.push(t);
                    }
                    Err(e) => tracing::warn!(%job, "the VM's monitor is slow to answer: {e}"),
                }
            }
        }
    }
    for (socket, job) in attached {
        let r =
            with_monitor(&socket, |qmp| kvm::detach(qmp, &job, &format!("{job}-tgt"), true).map_err(|e| e.to_string()));
        if let Err(e) = r {
            tracing::warn!(%job, "cannot detach the tap: {e}");
        }
    }
}
