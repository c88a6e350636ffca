//! Taps the VDSA attaches itself on KVM: for each disk of a source role,
//! QEMU's block mirror (write-blocking) from the VM's block node to this
//! VDSA's NBD export, with a full copy first. When every disk of the role
//! is actively synced, the stream leaves sync mode and its checkpoints are
//! consistent. When the role stops, the jobs are cancelled (the VM's disk
//! stays as it is).

use crate::kvm::{self, NbdAddress, Qmp, TapSpec};
use crate::replication::source::SourceStream;
use protection_groups::mgmt::{SourceRole, TapAttach};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// How long the initial copy may take.
const SYNC_LIMIT: Duration = Duration::from_secs(3600);
/// A failed attach is tried again after this.
const RETRY: Duration = Duration::from_secs(2);

fn job_id(disk: &protection_groups::DiskId) -> String {
    format!("vdsa-tap-{}", &disk.0.simple().to_string()[..12])
}

/// Attaches one tap: connects to the VM's monitor, removes a job left by
/// an earlier run of this VDSA (a restart: its queue is gone, so the disk
/// is copied again), and attaches anew with a full copy, waiting until it
/// is in sync.
fn attach_one(t: &TapAttach, export: &str, server: &NbdAddress) -> Result<(Qmp, String), String> {
    let job = job_id(&t.disk);
    let mut qmp = Qmp::connect(Path::new(&t.qmp_socket)).map_err(|e| format!("cannot reach the VM's QEMU: {e}"))?;
    let _ = kvm::detach(&mut qmp, &job, &format!("{job}-tgt"), true);
    let spec = TapSpec {
        job_id: job.clone(),
        device: t.device.clone(),
        target_node: format!("{job}-tgt"),
        server: server.clone(),
        export: export.to_string(),
        sync_full: true,
        reconnect_delay: Some(5),
    };
    kvm::attach(&mut qmp, &spec, SYNC_LIMIT).map_err(|e| format!("cannot attach the tap: {e}"))?;
    Ok((qmp, job))
}

/// Attaches every tap of `role` (retrying each until it is in sync or the
/// role stops), then leaves sync mode, watches until the role stops, and
/// detaches.
pub fn run(role: &SourceRole, stream: &SourceStream, server: NbdAddress, stopped: &AtomicBool) {
    let mut attached: Vec<(Qmp, String)> = Vec::new();
    for t in &role.taps {
        let Some(disk) = role.disks.iter().find(|d| d.id == t.disk) else { continue };
        stream.set_syncing(true);
        let mut attempt = 0u32;
        while !stopped.load(Ordering::SeqCst) {
            attempt += 1;
            match attach_one(t, &disk.name, &server) {
                Ok(a) => {
                    tracing::info!(disk = %disk.name, attempt, "tap attached and in sync");
                    attached.push(a);
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
        std::thread::sleep(Duration::from_millis(200));
    }
    for (mut qmp, job) in attached {
        if let Err(e) = kvm::detach(&mut qmp, &job, &format!("{job}-tgt"), true) {
            tracing::warn!(%job, "cannot detach the tap: {e}");
        }
    }
}
