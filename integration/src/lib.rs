//! End-to-end tests, the workload generator and the lab harness.
//!
//! This crate owns what exercises the product from outside: a deterministic
//! workload generator with a reference model of every disk, the `lab`
//! command (the README's main job), and the end-to-end tests that start,
//! kill and verify real processes.
//!
//! It must not contain product logic: what it checks, it checks through the
//! product's public APIs and processes.

pub mod browser;
pub mod exports;
pub mod ext4_lab;
pub mod guest;
pub mod kvm_lab;
pub mod measure;
pub mod power_loss;
pub mod process;
pub mod replication_lab;
pub mod site_lab;
pub mod store_crash;
pub mod two_site_lab;
pub mod two_sites;
pub mod vcsim;
pub mod vsphere_lab;
pub mod workload;
pub mod write_order;

use protection_groups::{CheckpointId, CheckpointKind, DiskId, StreamId};
use vdsa::journal::{CheckpointSpec, TapWrite, WriteData};
use workload::{GenWrite, Payload};

/// The generated write as a tap delivers it.
pub fn tap_write<'a>(w: &'a GenWrite, disks: &[DiskId], seq: u64) -> TapWrite<'a> {
    let data = match &w.payload {
        Payload::Data(d) => WriteData::Data(d),
        Payload::Zero(len) => WriteData::Zero { len: *len },
        Payload::Trim(len) => WriteData::Trim { len: *len },
    };
    TapWrite { seq, disk: disks[w.disk], offset: w.offset, data }
}

pub fn checkpoint_spec(id: u64, source_time_ms: u64, kind: CheckpointKind) -> CheckpointSpec {
    CheckpointSpec { id: CheckpointId(id), kind, name: format!("checkpoint {id}"), source_time_ms, cuts: Vec::new() }
}

/// The stream the crash child writes, known to the parent too.
pub fn crash_child_stream() -> StreamId {
    StreamId::from_bytes([0x5C; 16])
}
