//! The KVM tap with the real QEMU (recipes/kvm-tap.md): qemu-storage-daemon
//! holds a source disk, QEMU's write-blocking block mirror copies every
//! write to the `vdsa` daemon over NBD, and a guest (our NBD client)
//! writes through QEMU. The journal must then read back exactly the source.

use integration::kvm_lab::{qemu_available, StorageDaemon, VdsaProcess};
use integration::workload::{GenWrite, Mix, ReferenceModel, Workload};
use protection_groups::{CheckpointId, DiskId};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;
use vdsa::journal::{Journal, JournalConfig};
use vdsa::kvm;
use vdsa::nbd::client::NbdClient;

const DISK: u64 = 256 << 20;

fn lab() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_lab"))
}

fn ok<T>(r: anyhow::Result<T>) -> T {
    r.unwrap_or_else(|e| panic!("{e:#}"))
}

/// The same name → id rule as the daemon's.
fn disk_id(name: &str) -> DiskId {
    DiskId::from_bytes(vdsa::daemon::derived_id("disk", name))
}

/// A source image with content already on it (the initial sync copies it).
fn source_image(dir: &Path) -> (PathBuf, ReferenceModel) {
    let path = dir.join("source.raw");
    let mut model = ReferenceModel::new(&[DISK]);
    let mut w = Workload::new(99, &[DISK], Mix { random: 1, sequential: 3, unaligned: 0, duplicate: 1, zero: 0 });
    for _ in 0..600 {
        model.apply(&w.next_write());
    }
    std::fs::write(&path, &model.images[0]).unwrap_or_else(|e| panic!("{e}"));
    (path, model)
}

/// Writes through QEMU as a guest does and keeps the model in step.
/// Returns whether the write reached the tap (trims do not).
fn guest_write(g: &mut NbdClient, w: &GenWrite, model: &mut ReferenceModel) -> bool {
    let reached = integration::kvm_lab::guest_write(g, w).unwrap_or_else(|e| panic!("guest write: {e}"));
    model.apply_unless_trim(w);
    reached
}

fn view_hash(journal: &Journal, cp: u64) -> blake3::Hash {
    let v = journal.open_view(CheckpointId(cp)).unwrap_or_else(|e| panic!("{e}"));
    v.disk_hash(disk_id("vmdisk")).unwrap_or_else(|e| panic!("{e}"))
}

/// Every write a guest makes through QEMU reaches the journal, in order:
/// checkpoints taken while the guest writes hold exactly the writes
/// acknowledged before them, and the last one equals the source image.
#[test]
fn the_kvm_tap_mirrors_every_guest_write_into_the_journal() {
    assert!(qemu_available(), "qemu-storage-daemon is needed (integration/run-tests installs qemu-utils)");
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let (image, mut model) = source_image(dir.path());
    let vdsa = ok(VdsaProcess::start(lab(), dir.path(), "vmdisk=256M"));
    let mut qsd = ok(StorageDaemon::start(dir.path(), &image, false));
    let st = ok(qsd.attach("tap0", &vdsa.tap_sock, "vmdisk"));
    assert!(st.in_sync(), "{st:?}");
    // The initial sync is done: checkpoints from here on are consistent.
    let during_sync = ok(vdsa.call(json!({"op": "checkpoint", "name": "initial"})));
    assert_eq!(during_sync["kind"], "Inconsistent", "a checkpoint before sync-done is not a recovery point");
    ok(vdsa.call(json!({"op": "sync", "syncing": false})));
    let seq0 = ok(vdsa.call(json!({"op": "status"})))["seq"].as_u64().unwrap_or(0);

    // The guest writes; another thread inserts checkpoints meanwhile.
    let control = vdsa.control.clone();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let checkpointer = std::thread::spawn(move || {
        let mut taken = Vec::new();
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(150));
            let mut s = UnixStream::connect(&control).unwrap_or_else(|e| panic!("{e}"));
            let _ = writeln!(s, "{}", json!({"op": "checkpoint"}));
            let mut line = String::new();
            let _ = BufReader::new(s).read_line(&mut line);
            let v: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
            if v["ok"] == json!(true) {
                taken.push((v["id"].as_u64().unwrap_or(0), v["seq"].as_u64().unwrap_or(0), v["kind"].clone()));
            }
        }
        taken
    });
    let mut guest = ok(qsd.guest());
    let mut workload = Workload::new(7, &[DISK], Mix::default());
    let mut written = 0u64;
    let mut writes = Vec::new(); // (workload index) of writes that reached the tap
    let mut i = 0u64;
    while written < 300 << 20 {
        let w = workload.next_write();
        if guest_write(&mut guest, &w, &mut model) {
            writes.push(i);
        }
        written += w.len();
        i += 1;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let taken = checkpointer.join().unwrap_or_default();
    let last = ok(vdsa.call(json!({"op": "checkpoint", "name": "end"})));
    let last_id = last["id"].as_u64().unwrap_or(0);
    assert_eq!(ok(qsd.image_hash()), blake3::hash(&model.images[0]), "QEMU's source and the model agree");
    let source = ok(qsd.image_hash());
    let state = kvm::state(&mut qsd.qmp, "tap0").unwrap_or_default();
    assert!(state.as_ref().is_some_and(|s| s.in_sync()), "the tap stayed in sync: {state:?}");
    ok(qsd.detach("tap0"));
    let vdsa_journal = vdsa.journal.clone();
    ok(vdsa.shutdown());

    let journal = Journal::open(&vdsa_journal, JournalConfig::default()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(view_hash(&journal, last_id), source, "the final checkpoint is the source image");
    // Replay the guest's writes and compare each checkpoint taken while it
    // wrote with the model after exactly the writes it acknowledged.
    assert!(taken.len() >= 3, "only {} checkpoints were taken during the writes", taken.len());
    let (image, mut replay) = {
        let dir2 = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        source_image(dir2.path())
    };
    drop(image);
    let mut workload = Workload::new(7, &[DISK], Mix::default());
    let mut applied = 0u64; // tap writes applied to `replay`
    let mut next = 0usize; // index into `writes`
    let mut idx = 0u64;
    for (id, seq, kind) in &taken {
        assert_eq!(kind, "Automatic", "checkpoint {id} after sync-done is consistent");
        let k = seq - seq0;
        while applied < k {
            let w = workload.next_write();
            if next < writes.len() && writes[next] == idx {
                replay.apply(&w);
                applied += 1;
                next += 1;
            }
            idx += 1;
        }
        assert_eq!(
            view_hash(&journal, *id),
            blake3::hash(&replay.images[0]),
            "checkpoint {id} (after {k} guest writes) differs"
        );
    }
}

/// Kill the VDSA while the guest writes: QEMU's job reports the error, the
/// guest's writes keep succeeding, and once the VDSA is back and the tap
/// re-attached, a delta sync brings the journal back to exactly the source.
#[test]
fn a_killed_vdsa_catches_up_by_delta_sync() {
    assert!(qemu_available(), "qemu-storage-daemon is needed (integration/run-tests installs qemu-utils)");
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let (image, mut model) = source_image(dir.path());
    let vdsa = ok(VdsaProcess::start(lab(), dir.path(), "vmdisk=256M"));
    let mut qsd = ok(StorageDaemon::start(dir.path(), &image, false));
    ok(qsd.attach("tap0", &vdsa.tap_sock, "vmdisk"));
    ok(vdsa.call(json!({"op": "sync", "syncing": false})));
    let mut guest = ok(qsd.guest());
    let mut workload = Workload::new(11, &[DISK], Mix::default());
    for _ in 0..500 {
        guest_write(&mut guest, &workload.next_write(), &mut model);
    }
    // Kill it in the middle of a stream of writes.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop_writer = stop.clone();
    let writer = std::thread::spawn(move || {
        let mut n = 0;
        while !stop_writer.load(std::sync::atomic::Ordering::Relaxed) || n < 2000 {
            guest_write(&mut guest, &workload.next_write(), &mut model);
            n += 1;
        }
        (guest, workload, model, n)
    });
    std::thread::sleep(Duration::from_millis(300));
    eprintln!("killing the vdsa");
    vdsa.kill();
    // A failed target ends the job by itself: no job is left for the
    // restarted VDSA to cancel while the guest writes, which QEMU 10.0 may
    // not survive (docs/management-protocol.md).
    let failed =
        kvm::wait_for(&mut qsd.qmp, "tap0", Duration::from_secs(30), "the job to end on the target's failure", |s| {
            s.is_none()
        });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let failed = failed.unwrap_or_else(|e| panic!("{e}"));
    eprintln!("job after the kill: {failed:?}");
    assert!(!failed.actively_synced, "{failed:?}");
    // It ended on the target's error, not by a cancel.
    let error = qsd.qmp.job_error("tap0");
    assert!(error.is_some_and(|e| !e.is_empty()), "the job did not end with the target's error: {:?}", qsd.qmp.events);
    eprintln!("QEMU: the job ended with {error:?}");
    // The guest's writes after the kill all succeeded (guest_write panics
    // on an error).
    let (mut guest, mut workload, mut model, n) =
        writer.join().unwrap_or_else(|_| panic!("a guest write failed after the kill"));
    assert!(n >= 2000);
    eprintln!("{n} guest writes during and after the kill");

    let vdsa = ok(VdsaProcess::start(lab(), dir.path(), "vmdisk=256M"));
    let resync = ok(vdsa.call(json!({"op": "checkpoint", "name": "during resync"})));
    assert_eq!(resync["kind"], "Inconsistent", "a restarted VDSA offers nothing consistent before its resync");
    ok(qsd.detach("tap0"));
    eprintln!("old tap detached; re-attaching with a full (delta) sync");
    let st = ok(qsd.attach("tap1", &vdsa.tap_sock, "vmdisk"));
    assert!(st.in_sync(), "{st:?}");
    ok(vdsa.call(json!({"op": "sync", "syncing": false})));
    for _ in 0..300 {
        guest_write(&mut guest, &workload.next_write(), &mut model);
    }
    let last = ok(vdsa.call(json!({"op": "checkpoint", "name": "after resync"})));
    assert_eq!(last["kind"], "Named");
    let source = ok(qsd.image_hash());
    assert_eq!(source, blake3::hash(&model.images[0]));
    ok(qsd.detach("tap1"));
    let vdsa_journal = vdsa.journal.clone();
    ok(vdsa.shutdown());
    let journal = Journal::open(&vdsa_journal, JournalConfig::default()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        view_hash(&journal, last["id"].as_u64().unwrap_or(0)),
        source,
        "after the delta sync the journal is the source"
    );
}
