//! The KVM tap with the real QEMU (recipes/kvm-tap.md): qemu-storage-daemon
//! holds a source disk, QEMU's write-blocking block mirror copies every
//! write to the `vdsa` daemon over NBD, and a guest (our NBD client)
//! writes through QEMU. The journal must then read back exactly the source.

use integration::workload::{GenWrite, Mix, Payload, ReferenceModel, Workload};
use protection_groups::{CheckpointId, DiskId};
use serde_json::{json, Value};
use site_manager::kvm::{self, NbdAddress, Qmp, TapSpec};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use vdsa::journal::{Journal, JournalConfig};
use vdsa::nbd::client::NbdClient;

const DISK: u64 = 256 << 20;


fn wait_for_path(p: &Path) {
    let start = Instant::now();
    while !p.exists() {
        assert!(start.elapsed() < Duration::from_secs(20), "{} never appeared", p.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The same name → id rule as the daemon's.
fn disk_id(name: &str) -> DiskId {
    let h = blake3::hash(format!("disk:{name}").as_bytes());
    let mut id = [0u8; 16];
    id.copy_from_slice(&h.as_bytes()[..16]);
    DiskId::from_bytes(id)
}

struct Vdsa {
    child: Child,
    control: PathBuf,
}

impl Vdsa {
    fn start(dir: &Path) -> Vdsa {
        let control = dir.join("ctl.sock");
        // `lab vdsa` is the vdsa daemon, built from this tree with the test.
        let mut child = Command::new(env!("CARGO_BIN_EXE_lab"))
            .args(["vdsa", "tap-serve", "--disk", "vmdisk=256M"])
            .arg("--journal")
            .arg(dir.join("journal"))
            .arg("--listen")
            .arg(format!("unix:{}", dir.join("tap.sock").display()))
            .arg("--control")
            .arg(&control)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting vdsa: {e}"));
        let out = child.stdout.take().unwrap_or_else(|| panic!("no stdout"));
        let mut line = String::new();
        let _ = BufReader::new(out).read_line(&mut line);
        assert_eq!(line.trim(), "READY", "vdsa did not start");
        Vdsa { child, control }
    }

    fn call(&self, req: Value) -> Value {
        let mut s = UnixStream::connect(&self.control).unwrap_or_else(|e| panic!("control: {e}"));
        writeln!(s, "{req}").unwrap_or_else(|e| panic!("{e}"));
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).unwrap_or_else(|e| panic!("{e}"));
        let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert_eq!(v["ok"], json!(true), "control {req} failed: {v}");
        v
    }

    fn shutdown(mut self) {
        let _ = self.call(json!({"op": "shutdown"}));
        let _ = self.child.wait();
    }

    fn kill(mut self) {
        let _ = self.child.kill(); // SIGKILL
        let _ = self.child.wait();
    }
}

struct Qsd {
    child: Child,
    qmp: Qmp,
    guest_sock: PathBuf,
    image: PathBuf,
}

impl Qsd {
    fn start(dir: &Path, image: &Path) -> Qsd {
        let qmp_sock = dir.join("qmp.sock");
        let guest_sock = dir.join("qsd.sock");
        let child = Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!("driver=file,node-name=src-file,filename={}", image.display()))
            .args(["--blockdev", "driver=raw,node-name=src,file=src-file"])
            .arg("--nbd-server")
            .arg(format!("addr.type=unix,addr.path={}", guest_sock.display()))
            .args(["--export", "type=nbd,id=exp0,node-name=src,name=vmdisk,writable=on"])
            .arg("--chardev")
            .arg(format!("socket,id=qmp0,path={},server=on,wait=off", qmp_sock.display()))
            .args(["--monitor", "chardev=qmp0"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting qemu-storage-daemon (is qemu-utils installed?): {e}"));
        wait_for_path(&qmp_sock);
        wait_for_path(&guest_sock);
        let qmp = Qmp::connect(&qmp_sock).unwrap_or_else(|e| panic!("{e}"));
        Qsd { child, qmp, guest_sock, image: image.to_path_buf() }
    }

    fn guest(&self) -> NbdClient {
        NbdClient::connect_unix(&self.guest_sock, "vmdisk").unwrap_or_else(|e| panic!("guest connect: {e}"))
    }

    fn attach(&mut self, dir: &Path, job: &str) -> kvm::TapState {
        let spec = TapSpec {
            job_id: job.into(),
            device: "src".into(),
            target_node: format!("{job}-tgt"),
            server: NbdAddress::Unix(dir.join("tap.sock").display().to_string()),
            export: "vmdisk".into(),
            sync_full: true,
            reconnect_delay: None,
        };
        kvm::attach(&mut self.qmp, &spec, Duration::from_secs(120)).unwrap_or_else(|e| panic!("attach: {e}"))
    }

    fn image_hash(&self) -> blake3::Hash {
        blake3::hash(&std::fs::read(&self.image).unwrap_or_else(|e| panic!("{e}")))
    }
}

impl Drop for Qsd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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

/// Writes through QEMU as a guest does; the mirror drops discards, so a
/// trim changes neither the source nor the model. Returns whether the
/// write reached the tap (trims do not).
fn guest_write(g: &mut NbdClient, w: &GenWrite, model: &mut ReferenceModel) -> bool {
    match &w.payload {
        Payload::Data(d) => g.write(w.offset, d).unwrap_or_else(|e| panic!("guest write: {e}")),
        Payload::Zero(n) => g.write_zeroes(w.offset, *n as u32, false).unwrap_or_else(|e| panic!("guest zero: {e}")),
        Payload::Trim(n) => {
            g.trim(w.offset, *n as u32).unwrap_or_else(|e| panic!("guest trim: {e}"));
            return false;
        }
    }
    model.apply(w);
    true
}

fn view_hash(journal: &Journal, cp: u64) -> blake3::Hash {
    let v = journal.open_view(CheckpointId(cp)).unwrap_or_else(|e| panic!("{e}"));
    v.disk_hash(disk_id("vmdisk")).unwrap_or_else(|e| panic!("{e}"))
}

fn qemu_available() -> bool {
    Command::new("qemu-storage-daemon").arg("--version").output().is_ok_and(|o| o.status.success())
}

/// Every write a guest makes through QEMU reaches the journal, in order:
/// checkpoints taken while the guest writes hold exactly the writes
/// acknowledged before them, and the last one equals the source image.
#[test]
fn the_kvm_tap_mirrors_every_guest_write_into_the_journal() {
    assert!(qemu_available(), "qemu-storage-daemon is needed (integration/run-tests installs qemu-utils)");
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let (image, mut model) = source_image(dir.path());
    let vdsa = Vdsa::start(dir.path());
    let mut qsd = Qsd::start(dir.path(), &image);
    let st = qsd.attach(dir.path(), "tap0");
    assert!(st.in_sync(), "{st:?}");
    // The initial sync is done: checkpoints from here on are consistent.
    let during_sync = vdsa.call(json!({"op": "checkpoint", "name": "initial"}));
    assert_eq!(during_sync["kind"], "Inconsistent", "a checkpoint before sync-done is not a recovery point");
    vdsa.call(json!({"op": "sync", "syncing": false}));
    let seq0 = vdsa.call(json!({"op": "status"}))["seq"].as_u64().unwrap_or(0);

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
    let mut guest = qsd.guest();
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
    let last = vdsa.call(json!({"op": "checkpoint", "name": "end"}));
    let last_id = last["id"].as_u64().unwrap_or(0);
    assert_eq!(qsd.image_hash(), blake3::hash(&model.images[0]), "QEMU's source and the model agree");
    let source = qsd.image_hash();
    let state = kvm::state(&mut qsd.qmp, "tap0").unwrap_or_default();
    assert!(state.as_ref().is_some_and(|s| s.in_sync()), "the tap stayed in sync: {state:?}");
    kvm::detach(&mut qsd.qmp, "tap0", "tap0-tgt", false).unwrap_or_else(|e| panic!("detach: {e}"));
    vdsa.shutdown();

    let journal = Journal::open(dir.path().join("journal"), JournalConfig::default()).unwrap_or_else(|e| panic!("{e}"));
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
        assert_eq!(view_hash(&journal, *id), blake3::hash(&replay.images[0]), "checkpoint {id} (after {k} guest writes) differs");
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
    let vdsa = Vdsa::start(dir.path());
    let mut qsd = Qsd::start(dir.path(), &image);
    qsd.attach(dir.path(), "tap0");
    vdsa.call(json!({"op": "sync", "syncing": false}));
    let mut guest = qsd.guest();
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
    let failed = kvm::wait_for(&mut qsd.qmp, "tap0", Duration::from_secs(30), "the job to report the target's failure", |s| {
        s.is_some_and(|s| s.failed())
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let failed = failed.unwrap_or_else(|e| panic!("{e}"));
    eprintln!("job after the kill: {failed:?}");
    assert!(!failed.actively_synced, "{failed:?}");
    // The guest's writes after the kill all succeeded (guest_write panics
    // on an error).
    let (mut guest, mut workload, mut model, n) = writer.join().unwrap_or_else(|_| panic!("a guest write failed after the kill"));
    assert!(n >= 2000);
    eprintln!("{n} guest writes during and after the kill");

    let vdsa = Vdsa::start(dir.path());
    let resync = vdsa.call(json!({"op": "checkpoint", "name": "during resync"}));
    assert_eq!(resync["kind"], "Inconsistent", "a restarted VDSA offers nothing consistent before its resync");
    kvm::detach(&mut qsd.qmp, "tap0", "tap0-tgt", true).unwrap_or_else(|e| panic!("detach: {e}"));
    eprintln!("old tap detached; re-attaching with a full (delta) sync");
    let st = qsd.attach(dir.path(), "tap1");
    assert!(st.in_sync(), "{st:?}");
    vdsa.call(json!({"op": "sync", "syncing": false}));
    for _ in 0..300 {
        guest_write(&mut guest, &workload.next_write(), &mut model);
    }
    let last = vdsa.call(json!({"op": "checkpoint", "name": "after resync"}));
    assert_eq!(last["kind"], "Named");
    let source = qsd.image_hash();
    assert_eq!(source, blake3::hash(&model.images[0]));
    kvm::detach(&mut qsd.qmp, "tap1", "tap1-tgt", false).unwrap_or_else(|e| panic!("detach: {e}"));
    vdsa.shutdown();
    let journal = Journal::open(dir.path().join("journal"), JournalConfig::default()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(view_hash(&journal, last["id"].as_u64().unwrap_or(0)), source, "after the delta sync the journal is the source");
}
