//! Taps the VDSA attaches itself on KVM: for each disk of a source role,
//! QEMU's block mirror (write-blocking) from the VM's block node to this
//! VDSA's NBD export, with a full copy first. When every disk of the role
//! is actively synced, the stream leaves sync mode and its checkpoints are
//! consistent. When the role stops, the jobs are cancelled (the VM's disk
//! stays as it is).

use crate::kvm::{self, NbdAddress, Qmp, TapSpec};
use crate::replication::source::SourceStream;
use protection_groups::mgmt::SourceRole;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// How long the initial copy may take.
const SYNC_LIMIT: Duration = Duration::from_secs(3600);

fn job_id(disk: &protection_groups::DiskId) -> String {
    format!("vdsa-tap-{}", &disk.0.simple().to_string()[..12])
}

/// Attaches every tap of `role`, waits for them to be in sync, then
/// watches until the role stops, and detaches.
pub fn run(role: &SourceRole, stream: &SourceStream, server: NbdAddress, stopped: &AtomicBool) {
    let mut attached: Vec<(Qmp, String)> = Vec::new();
    let mut ok = true;
    for t in &role.taps {
        let Some(disk) = role.disks.iter().find(|d| d.id == t.disk) else { continue };
        let job = job_id(&t.disk);
        let mut qmp = match Qmp::connect(Path::new(&t.qmp_socket)) {
            Ok(q) => q,
            Err(e) => {
                tracing::error!(socket = %t.qmp_socket, "cannot reach the VM's QEMU: {e}");
                ok = false;
                continue;
            }
        };
        // A job of an earlier run of this VDSA (a restart) goes first: its
        // queue is gone, so the disk is copied again.
        let _ = kvm::detach(&mut qmp, &job, &format!("{job}-tgt"), true);
        let spec = TapSpec {
            job_id: job.clone(),
            device: t.device.clone(),
            target_node: format!("{job}-tgt"),
            server: server.clone(),
            export: disk.name.clone(),
            sync_full: true,
            reconnect_delay: Some(5),
        };
        stream.set_syncing(true);
        match kvm::attach(&mut qmp, &spec, SYNC_LIMIT) {
            Ok(_) => {
                tracing::info!(disk = %disk.name, "tap attached and in sync");
                attached.push((qmp, job));
            }
            Err(e) => {
                tracing::error!(disk = %disk.name, "cannot attach the tap: {e}");
                ok = false;
            }
        }
    }
    if ok && !stopped.load(Ordering::SeqCst) {
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
