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
use crate::nbd::export::Exports;
use crate::replication::source::{SourceDisk, SourceStream};
use protection_groups::mgmt::{SourceRole, TapAttach};
use protection_groups::DiskId;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

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
/// is gone, so the disk is copied again anyway), and removes the target
/// nodes of jobs that ended by themselves (a failed target ends a job;
/// its NBD node stays until it is deleted).
fn remove_leftovers(qmp: &mut Qmp, disk: &protection_groups::DiskId) -> Result<(), String> {
    let prefix = job_prefix(disk);
    let jobs = kvm::job_ids(qmp).map_err(|e| e.to_string())?;
    for job in jobs.into_iter().filter(|id| id.starts_with(&prefix)) {
        // Its state is logged: how QEMU holds a job a dead VDSA left
        // decides how it must be cancelled (docs/management-protocol.md).
        let state = kvm::state(qmp, &job).map_err(|e| e.to_string())?;
        tracing::info!(%job, ?state, "cancelling a tap job left by an earlier role");
        kvm::detach(qmp, &job, &kvm::target_node(&job)).map_err(|e| e.to_string())?;
    }
    let nodes = kvm::node_names(qmp).map_err(|e| e.to_string())?;
    let targets = nodes.iter().filter(|n| kvm::job_of_target_node(n).is_some_and(|job| job.starts_with(&prefix)));
    for node in targets {
        tracing::info!(%node, "removing the target node of a tap job that ended by itself");
        // A node that stays only costs QEMU an idle NBD client: the next
        // attach's node has a name of its own.
        if let Err(e) = qmp.execute("blockdev-del", json!({"node-name": node})) {
            tracing::warn!(%node, "cannot remove the old tap's node: {e}");
        }
    }
    Ok(())
}

/// Attaches one tap with a full copy and waits until it is in sync;
/// returns its job id.
///
/// The export is published only after jobs an earlier run left are gone:
/// such a job's NBD client reconnects to whatever serves the export's name
/// at this address, and QEMU (10.0) corrupted its heap when that job was
/// cancelled just after it had reconnected.
fn attach_one(
    t: &TapAttach,
    export: &str,
    size: u64,
    server: &NbdAddress,
    publish: &dyn Fn(),
) -> Result<String, String> {
    let job = format!("{}-{}", job_prefix(&t.disk), &uuid::Uuid::new_v4().simple().to_string()[..8]);
    with_monitor(&t.qmp_socket, |qmp| {
        remove_leftovers(qmp, &t.disk)?;
        publish();
        grow_node(qmp, &t.device, size)?;
        let spec = TapSpec {
            job_id: job.clone(),
            device: t.device.clone(),
            target_node: kvm::target_node(&job),
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

/// How long a guest may take to shut down cleanly before QEMU is told to
/// quit.
const CLEAN_SHUTDOWN: Duration = Duration::from_secs(60);

/// A move's request to power the role's VMs off, and its outcome.
#[derive(Debug, Default)]
pub struct PowerOff {
    pub asked: AtomicBool,
    /// Every VM's QEMU is gone.
    pub done: AtomicBool,
}

/// Whether the monitor at `socket` is gone (its QEMU exited).
fn vm_gone(socket: &str) -> bool {
    matches!(with_monitor(socket, |qmp| qmp.execute("query-status", json!({})).map_err(|e| e.to_string())),
        Err(e) if monitor_gone(&e))
}

/// Powers the VM whose monitor is `socket` off: a clean shutdown (ACPI
/// power button) first, then QEMU's quit if the guest has not gone within
/// [`CLEAN_SHUTDOWN`] or the QEMU runs no guest (a storage daemon). Every
/// write QEMU acknowledged went through the write-blocking tap first, so
/// the stream holds all of them.
fn power_off_vm(socket: &str) -> Result<(), String> {
    let powerdown = with_monitor(socket, |qmp| match qmp.execute("system_powerdown", json!({})) {
        Ok(_) => Ok(true),
        Err(kvm::QmpError::Command { class, .. }) if class == "CommandNotFound" => Ok(false),
        Err(e) => Err(e.to_string()),
    });
    let clean = match powerdown {
        Err(e) if monitor_gone(&e) => return Ok(()),
        Err(e) => return Err(e),
        Ok(sent) => sent,
    };
    if clean {
        if wait_gone(socket, CLEAN_SHUTDOWN) {
            return Ok(());
        }
        tracing::warn!(%socket, "the guest did not shut down in {} s: quitting QEMU", CLEAN_SHUTDOWN.as_secs());
    }
    // QEMU may close the monitor before it answers.
    let _ = with_monitor(socket, |qmp| qmp.execute("quit", json!({})).map_err(|e| e.to_string()));
    if wait_gone(socket, Duration::from_secs(30)) {
        return Ok(());
    }
    Err(format!("the VM's QEMU at {socket} did not exit after quit"))
}

/// Whether the VM's QEMU at `socket` is gone within `limit`.
fn wait_gone(socket: &str, limit: Duration) -> bool {
    let until = Instant::now() + limit;
    while Instant::now() < until {
        if vm_gone(socket) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

/// Powers every VM of the role off (see [`power_off_vm`]).
fn power_off_vms(role: &SourceRole) -> Result<(), String> {
    let mut sockets: Vec<&str> = role.taps.iter().map(|t| t.qmp_socket.as_str()).collect();
    sockets.sort_unstable();
    sockets.dedup();
    for socket in sockets {
        power_off_vm(socket)?;
        tracing::warn!(vpg = %role.vpg, %socket, "VM powered off for a move");
    }
    Ok(())
}

/// How often an attached tap's job is looked at.
const WATCH_EVERY: Duration = Duration::from_secs(3);

/// A resize QEMU refused is tried again after this.
const RESIZE_RETRY: Duration = Duration::from_secs(30);

/// Grows a tapped disk: detaches its tap (QEMU refuses to resize a node
/// a mirror job uses), then puts the resize in the stream, after every
/// write the tap took and before any the next attach takes. The caller
/// attaches again, which resizes the VM's block node first, with a full
/// copy (writes while no tap was attached are in it).
fn grow_one(t: &TapAttach, job: Option<&str>, size: u64, stream: &SourceStream) -> Result<(), String> {
    if let Some(job) = job {
        with_monitor(&t.qmp_socket, |qmp| {
            kvm::detach(qmp, job, &kvm::target_node(job)).map_err(|e| format!("cannot detach the tap: {e}"))
        })?;
    }
    stream.resize(t.disk, size).map_err(|e| e.to_string())
}

/// Grows the VM's block node `device` to `size` bytes if it is smaller (a
/// protected disk the site manager grew). A larger node is left alone:
/// the mirror refuses it, naming both sizes.
fn grow_node(qmp: &mut Qmp, device: &str, size: u64) -> Result<(), String> {
    let nodes = qmp.execute("query-named-block-nodes", json!({"flat": true})).map_err(|e| e.to_string())?;
    let now = nodes
        .as_array()
        .and_then(|a| a.iter().find(|n| n.get("node-name").and_then(Value::as_str) == Some(device)))
        .and_then(|n| n.pointer("/image/virtual-size").and_then(Value::as_u64));
    if now.is_some_and(|now| now < size) {
        tracing::info!(%device, size, "growing the VM's disk in QEMU");
        qmp.execute("block_resize", json!({"node-name": device, "size": size}))
            .map_err(|e| format!("QEMU cannot grow {device} to {size} bytes: {e}"))?;
    }
    Ok(())
}

/// Attaches every tap of `role` (retrying each until it is in sync or the
/// role stops), then leaves sync mode and watches the jobs until the role
/// stops: a job that ended (the VM restarted) is attached again with a
/// full copy; a monitor that does not answer (the VM was deleted or shut
/// down) is put in `problem`, which the role reports; a disk to grow
/// (from `grow`) is detached, resized and attached again. Then it detaches.
#[allow(clippy::too_many_arguments)]
pub fn run(
    role: &SourceRole,
    stream: &Arc<SourceStream>,
    server: NbdAddress,
    stopped: &AtomicBool,
    problem: &Mutex<Option<String>>,
    grow: &Mutex<Vec<(DiskId, u64)>>,
    exports: &Exports,
    power: &PowerOff,
) {
    let mut growing: Vec<(DiskId, u64, Instant)> = Vec::new();
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
            while !stopped.load(Ordering::SeqCst) && !power.asked.load(Ordering::SeqCst) {
                attempt += 1;
                let size = stream.disk_size(t.disk).unwrap_or(disk.size_bytes);
                let publish = || {
                    exports.insert(disk.name.clone(), Arc::new(SourceDisk { stream: stream.clone(), disk: disk.id }))
                };
                match attach_one(t, &disk.name, size, &server, &publish) {
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
        if power.asked.load(Ordering::SeqCst) {
            // A move: the VMs go, their taps with them; the stream stays
            // so that their last writes drain.
            match power_off_vms(role) {
                Ok(()) => {
                    power.done.store(true, Ordering::SeqCst);
                    set_problem(None);
                    attached.clear();
                    while !stopped.load(Ordering::SeqCst) {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    break;
                }
                Err(e) => {
                    tracing::error!(vpg = %role.vpg, "cannot power the VMs off: {e}; trying again");
                    set_problem(Some(format!("cannot power the VMs off for the move: {e}")));
                    std::thread::sleep(RETRY);
                    continue;
                }
            }
        }
        stream.set_syncing(false);
        tracing::info!(vpg = %role.vpg, stream = %role.stream, "initial sync done: checkpoints are consistent");
        // Watch until the role stops or a job needs attaching again.
        let mut last = std::time::Instant::now();
        while !stopped.load(Ordering::SeqCst) && pending.is_empty() && !power.asked.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(50));
            if let Ok(mut g) = grow.lock() {
                growing.extend(g.drain(..).map(|(d, size)| (d, size, Instant::now())));
            }
            let now = Instant::now();
            for (disk, size, when) in std::mem::take(&mut growing) {
                let Some(t) = role.taps.iter().find(|t| t.disk == disk) else { continue };
                if when > now {
                    growing.push((disk, size, when));
                    continue;
                }
                let job = attached.iter().position(|(_, j)| j.starts_with(&job_prefix(&disk)));
                stream.set_syncing(true);
                match grow_one(t, job.map(|i| attached[i].1.as_str()), size, stream) {
                    Ok(()) => tracing::info!(%disk, size, "the disk grew: attaching its tap again with a full copy"),
                    Err(e) => {
                        tracing::error!(%disk, size, "{e}; trying again in {} s", RESIZE_RETRY.as_secs());
                        growing.push((disk, size, now + RESIZE_RETRY));
                    }
                }
                if let Some(i) = job {
                    attached.remove(i);
                }
                pending.push(t);
            }
            if !pending.is_empty() || last.elapsed() < WATCH_EVERY {
                continue;
            }
            last = std::time::Instant::now();
            for t in &role.taps {
                let Some((_, job)) = attached.iter().find(|(_, j)| j.starts_with(&job_prefix(&t.disk))) else {
                    continue;
                };
                let state = with_monitor(&t.qmp_socket, |qmp| kvm::state(qmp, job).map_err(|e| e.to_string()));
                match state {
                    Ok(s) if !kvm::stopped_mirroring(s.as_ref()) => set_problem(None),
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
        let r = with_monitor(&socket, |qmp| kvm::detach(qmp, &job, &kvm::target_node(&job)).map_err(|e| e.to_string()));
        if let Err(e) = r {
            tracing::warn!(%job, "cannot detach the tap: {e}");
        }
    }
}
