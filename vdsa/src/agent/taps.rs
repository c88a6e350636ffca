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

/// Attaches every tap of `role` (retrying each until it is in sync or the
/// role stops), then leaves sync mode, watches until the role stops, and
/// detaches.
pub fn run(role: &SourceRole, stream: &SourceStream, server: NbdAddress, stopped: &AtomicBool) {
    let mut attached: Vec<(String, String)> = Vec::new();
    for t in &role.taps {
        let Some(disk) = role.disks.iter().find(|d| d.id == t.disk) else { continue };
        stream.set_syncing(true);
        let mut attempt = 0u32;
        while !stopped.load(Ordering::SeqCst) {
            attempt += 1;
            match attach_one(t, &disk.name, &server) {
                Ok(job) => {
                    tracing::info!(disk = %disk.name, attempt, "tap attached and in sync");
                    attached.push((t.qmp_socket.clone(), job));
                    break;
                }
                Err(e) => {
                    tracing::error!(disk = %disk.name, attempt, "{e}; retrying");
                    std::thread::sleep(RETRY);
                }
            }
        }
    }
    if !stopped.load(Ordering::SeqCst) {
        stream.set_syncing(false);
        tracing::info!(vpg = %role.vpg, stream = %role.stream, "initial sync done: checkpoints are consistent");
    }
    while !stopped.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(50));
    }
    for (socket, job) in attached {
        let r =
            with_monitor(&socket, |qmp| kvm::detach(qmp, &job, &format!("{job}-tgt"), true).map_err(|e| e.to_string()));
        if let Err(e) = r {
            tracing::warn!(%job, "cannot detach the tap: {e}");
        }
    }
}
