//! The source stream's sync when the disks are tapped from outside the
//! VDSA (an ESXi filter): it ends once the tap has covered every block.

use protection_groups::{DiskId, StreamId, VpgId};
use std::sync::Arc;
use std::time::Duration;
use vdsa::nbd::server::BlockExport;
use vdsa::replication::queue::{Backpressure, QueueConfig};
use vdsa::replication::source::{SourceDisk, SourceOptions, SourceStream};

fn stream(dir: &std::path::Path, disks: &[(DiskId, u64)]) -> Arc<SourceStream> {
    let opts = SourceOptions {
        site: "prod".into(),
        vpg: VpgId::new(),
        stream: StreamId::new(),
        epoch: 1,
        disks: disks.to_vec(),
        target: "127.0.0.1:9".into(),
        heartbeat: Duration::from_secs(1),
        bandwidth: 0,
        streams: 1,
        batch_bytes: 1 << 20,
        window: 4,
        entropy_signal: true,
    };
    let queue = QueueConfig {
        memory_bytes: 64 << 20,
        spill_path: dir.join("spill"),
        spill_bytes: 64 << 20,
        backpressure: Backpressure::Block,
    };
    SourceStream::new(opts, queue).expect("a stream")
}

#[test]
fn an_outside_tap_ends_the_sync_by_covering_every_block_and_only_then() {
    let dir = tempfile::tempdir().expect("a folder");
    let (a, b) = (DiskId::new(), DiskId::new());
    let s = stream(dir.path(), &[(a, 64 << 10), (b, 32 << 10)]);
    s.end_sync_when_covered();
    let (da, db) = (SourceDisk { stream: s.clone(), disk: a }, SourceDisk { stream: s.clone(), disk: b });
    assert!(s.is_syncing());
    da.write(0, &[1u8; 64 << 10]).expect("a write");
    // The same block twice, and zeros, count once each.
    db.write(0, &[2u8; 4096]).expect("a write");
    db.write(0, &[3u8; 4096]).expect("a write");
    db.write_zeroes(4096, 24 << 10).expect("a zero write");
    assert!(s.is_syncing(), "one block of disk b was never written");
    db.write(28 << 10, &[4u8; 4096]).expect("a write");
    assert!(!s.is_syncing(), "every block came through the tap");

    // The control: a stream whose taps the VDSA attaches (it ends the sync
    // itself) stays in sync mode however much the tap covers.
    let other = tempfile::tempdir().expect("a folder");
    let c = stream(other.path(), &[(a, 64 << 10)]);
    let dc = SourceDisk { stream: c.clone(), disk: a };
    dc.write(0, &[1u8; 64 << 10]).expect("a write");
    assert!(c.is_syncing());
}
