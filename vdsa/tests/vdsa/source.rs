//! The source stream's sync when the disks are tapped from outside the
//! VDSA (an ESXi filter): it ends once the tap has covered every block.

use protection_groups::{DiskId, StreamId, VpgId};
use std::sync::Arc;
use std::time::Duration;
use vdsa::nbd::export::BlockExport;
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

/// Threads of the taps' connection runtime in this process.
fn tap_threads() -> usize {
    let tasks = std::fs::read_dir("/proc/self/task").into_iter().flatten().flatten();
    tasks.filter(|t| std::fs::read_to_string(t.path().join("comm")).is_ok_and(|n| n.starts_with("vdsa-tap"))).count()
}

/// Writes that arrive while a checkpoint is held are not acknowledged
/// until it is decided, and wait without a thread each: sixty tap
/// connections waiting out a hold add no thread per connection (a thread
/// each, blocked in the stream, would add sixty).
#[test]
fn writes_during_a_hold_wait_for_the_decision_without_a_thread_each() {
    use vdsa::nbd::client::NbdClient;
    use vdsa::nbd::proto::{Request, CMD_WRITE};
    let dir = tempfile::tempdir().expect("a folder");
    let disk = DiskId::new();
    let s = stream(dir.path(), &[(disk, 1 << 20)]);
    let exports = vdsa::nbd::export::Exports::default();
    exports.insert("d", Arc::new(SourceDisk { stream: s.clone(), disk }));
    let sock = dir.path().join("tap.sock");
    super::serve_exports(&sock, exports, vdsa::serving::Protocol::Nbd);
    const WRITERS: usize = 60;
    let mut clients: Vec<NbdClient> =
        (0..WRITERS).map(|_| NbdClient::connect_unix(&sock, "d").expect("connected")).collect();
    let queued_before = s.queue_stats().entries;
    let threads_before = tap_threads();
    s.prepare(7, "held", protection_groups::CheckpointKind::Automatic, None).expect("a hold");
    for (i, c) in clients.iter_mut().enumerate() {
        let req = Request { flags: 0, kind: CMD_WRITE, handle: i as u64, offset: (i as u64) * 4096, length: 4096 };
        let mut bytes = req.encode().to_vec();
        bytes.extend_from_slice(&[i as u8; 4096]);
        c.send_raw(&bytes).expect("a write sent");
    }
    std::thread::sleep(Duration::from_millis(500));
    let threads_held = tap_threads();
    assert_eq!(s.queue_stats().entries, queued_before, "no write is queued while the checkpoint is held");
    assert!(
        threads_held < threads_before + 20,
        "{threads_before} tap threads before the hold, {threads_held} with {WRITERS} writes waiting"
    );
    s.decide(7, true).expect("decided");
    let acks = std::thread::scope(|scope| {
        let waiting: Vec<_> = clients.iter_mut().map(|c| scope.spawn(move || c.read_reply())).collect();
        waiting.into_iter().filter_map(|w| w.join().ok()).filter(|r| r.as_ref().is_ok_and(|(e, _)| *e == 0)).count()
    });
    assert_eq!(acks, WRITERS, "every write is acknowledged once the checkpoint is decided");
    // The marker, then the writes.
    assert_eq!(s.queue_stats().entries, queued_before + 1 + WRITERS as u64);
}
