//! Processing stacks: views at checkpoints with private overlays, checked
//! against a reference image per checkpoint; isolation between stacks, the
//! journal untouched, overlays that survive a reopen, space freed on
//! discard, real NBD clients (qemu-img, qemu-io) reading, writing and
//! asking block status, and hostile NBD input against a stack.

use super::nbd::{fuzz, SIZE};
use protection_groups::{CheckpointId, CheckpointKind, DiskId, StackId, StreamId};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use vdsa::journal::{CheckpointSpec, Journal, JournalConfig, TapWrite, WriteData};
use vdsa::nbd::export::Exports;
use vdsa::recovery::{export_name, ProcessingStack};
use vdsa::serving::Protocol;

fn ok<T, E: std::fmt::Display>(r: Result<T, E>) -> T {
    r.unwrap_or_else(|e| panic!("{e}"))
}

/// A journal with two disks of `SIZE` and three checkpoints, each after a
/// batch of random writes; returns the reference images at each.
fn journal_with_history(dir: &Path, seed: u64) -> (Journal, [DiskId; 2], Vec<[Vec<u8>; 2]>) {
    let journal = ok(Journal::open(dir.join("journal"), JournalConfig::default()));
    let disks = [DiskId::new(), DiskId::new()];
    for d in disks {
        ok(journal.add_disk(d, SIZE));
    }
    let stream = StreamId::new();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut image = [vec![0u8; SIZE as usize], vec![0u8; SIZE as usize]];
    let mut refs = Vec::new();
    let mut seq = 0;
    for cp in 1..=3u64 {
        for _ in 0..40 {
            let which = rng.gen_range(0..2);
            let off = rng.gen_range(0..SIZE - 1);
            let len = rng.gen_range(1..=(SIZE - off).min(30_000));
            let mut data = vec![0u8; len as usize];
            rng.fill_bytes(&mut data);
            seq += 1;
            let w = TapWrite { seq, disk: disks[which], offset: off, data: WriteData::Data(&data) };
            ok(journal.ingest(stream, &[w]));
            image[which][off as usize..(off + len) as usize].copy_from_slice(&data);
        }
        ok(journal.mark_checkpoint(CheckpointSpec {
            id: CheckpointId(cp),
            kind: CheckpointKind::Automatic,
            name: String::new(),
            source_time_ms: cp * 1000,
            cuts: vec![],
        }));
        refs.push(image.clone());
    }
    ok(journal.sync());
    (journal, disks, refs)
}

fn read_all(stack: &ProcessingStack, i: usize) -> Vec<u8> {
    use vdsa::nbd::export::BlockExport;
    let mut buf = vec![0u8; SIZE as usize];
    ok(stack.disks()[i].read(0, &mut buf));
    buf
}

fn du(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    for e in walk(path) {
        total += std::fs::metadata(&e).map(|m| m.blocks() * 512).unwrap_or(0);
    }
    total
}

fn walk(path: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(path).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn stacks_at_several_checkpoints_are_isolated_and_keep_the_journal_as_it_was() {
    let dir = ok(tempfile::tempdir());
    let (journal, disks, refs) = journal_with_history(dir.path(), 7);
    let stacks = dir.path().join("stacks");
    let (a_id, b_id, c_id) = (StackId::new(), StackId::new(), StackId::new());
    let a = ok(ProcessingStack::open(&journal, &stacks.join("a"), a_id, CheckpointId(1)));
    let b = ok(ProcessingStack::open(&journal, &stacks.join("b"), b_id, CheckpointId(2)));
    let c = ok(ProcessingStack::open(&journal, &stacks.join("c"), c_id, CheckpointId(1)));
    assert_eq!(a.disks().iter().map(|d| d.disk).collect::<Vec<_>>(), disks.to_vec());
    for (i, (at1, at2)) in refs[0].iter().zip(&refs[1]).enumerate() {
        assert!(read_all(&a, i) == *at1, "stack at 1, disk {i}");
        assert!(read_all(&b, i) == *at2, "stack at 2, disk {i}");
    }
    let before = ok(journal.stats());
    // Writes, zeroes and trims in stack a, checked against its own model.
    let mut model = refs[0].clone();
    let mut rng = StdRng::seed_from_u64(11);
    scribble(&a, &mut model, &mut rng, 200);
    ok(a.flush());
    for i in 0..2 {
        assert!(read_all(&a, i) == model[i], "stack a holds its writes, disk {i}");
        assert!(read_all(&c, i) == refs[0][i], "another stack at the same checkpoint does not see them");
        assert!(read_all(&b, i) == refs[1][i], "a stack at another checkpoint does not see them");
        let view = ok(journal.open_view(CheckpointId(1)));
        let mut buf = vec![0u8; SIZE as usize];
        ok(view.read(disks[i], 0, &mut buf));
        assert!(buf == refs[0][i], "the journal's view is unchanged");
    }
    let after = ok(journal.stats());
    assert_eq!(
        (before.head_lsn, before.log_bytes, before.pack_bytes),
        (after.head_lsn, after.log_bytes, after.pack_bytes)
    );
    assert!(a.written_bytes() > 0);

    // Reopened at the same checkpoint (a VDSA restart) it keeps its writes;
    // at another checkpoint it starts empty.
    drop(a);
    let a = ok(ProcessingStack::open(&journal, &stacks.join("a"), a_id, CheckpointId(1)));
    assert!(read_all(&a, 1) == model[1], "flushed writes survive a reopen");
    drop(a);
    let a = ok(ProcessingStack::open(&journal, &stacks.join("a"), a_id, CheckpointId(3)));
    assert!(read_all(&a, 0) == refs[2][0], "reopened at another checkpoint, the overlay starts empty");

    // Retention cannot change what a running stack reads, and keeps the
    // checkpoints stacks are told to keep: a stack at one of them opens
    // again after retention (as after a VDSA restart).
    let policy = protection_groups::RetentionPolicy::Time { history: std::time::Duration::from_secs(1) };
    ok(journal.apply_retention_keeping(&policy, 1_000_000, &[CheckpointId(1), CheckpointId(2)]));
    assert!(read_all(&b, 0) == refs[1][0], "a stack's view is pinned against retention");
    assert!(read_all(&c, 1) == refs[0][1], "a stack's view is pinned against retention");
    let kept: Vec<_> = ok(journal.checkpoints()).iter().map(|c| c.id).collect();
    assert!(kept.contains(&CheckpointId(1)) && kept.contains(&CheckpointId(2)), "{kept:?}");
    drop(c);
    let c = ok(ProcessingStack::open(&journal, &stacks.join("c"), c_id, CheckpointId(1)));
    ok(journal.apply_retention(&policy, 1_000_000));
    assert!(read_all(&c, 1) == refs[0][1], "without keep, the base moves on and the open view still reads");
    let kept: Vec<_> = ok(journal.checkpoints()).iter().map(|c| c.id).collect();
    assert_eq!(kept, vec![CheckpointId(3)], "without keep, retention moves on");

    // Discarding frees the overlays.
    let used = du(&stacks);
    ok(a.discard());
    ok(b.discard());
    ok(c.discard());
    assert!(!stacks.join("a").exists() && walk(&stacks).is_empty(), "{:?}", walk(&stacks));
    assert!(used > 0 && du(&stacks) == 0);
}

/// Random writes, zeroes and trims to `stack`, mirrored in `model`.
fn scribble(stack: &ProcessingStack, model: &mut [Vec<u8>; 2], rng: &mut StdRng, n: usize) {
    use vdsa::nbd::export::BlockExport;
    for _ in 0..n {
        let i = rng.gen_range(0..2);
        let off = rng.gen_range(0..SIZE - 1);
        let len = rng.gen_range(1..=(SIZE - off).min(50_000));
        match rng.gen_range(0..10) {
            0 => ok(stack.disks()[i].write_zeroes(off, len)),
            1 => ok(stack.disks()[i].trim(off, len)),
            _ => {
                let mut d = vec![0u8; len as usize];
                rng.fill_bytes(&mut d);
                ok(stack.disks()[i].write(off, &d));
                model[i][off as usize..(off + len) as usize].copy_from_slice(&d);
                continue;
            }
        }
        model[i][off as usize..(off + len) as usize].fill(0);
    }
}

fn replica_bytes(journal: &Journal, disk: DiskId) -> Vec<u8> {
    let mut bytes = ok(std::fs::read(ok(journal.replica_path(disk))));
    bytes.truncate(SIZE as usize);
    bytes
}

#[test]
fn promotion_makes_the_replica_the_checkpoint_plus_the_stacks_writes_while_they_go_on() {
    let seed = rand::random::<u64>();
    println!("seed {seed}");
    let dir = ok(tempfile::tempdir());
    let (journal, disks, refs) = journal_with_history(dir.path(), seed);
    let stacks = dir.path().join("stacks");
    let id = StackId::new();
    // Failover to checkpoint 2: the writes after it (checkpoint 3) must
    // never reach the replica.
    let stack = Arc::new(ok(ProcessingStack::open(&journal, &stacks.join("f"), id, CheckpointId(2))));
    let mut model = refs[1].clone();
    let mut rng = StdRng::seed_from_u64(seed ^ 1);
    scribble(&stack, &mut model, &mut rng, 100);
    ok(stack.flush());

    // A test at another checkpoint blocks the promotion, with a reason.
    let test = ok(ProcessingStack::open(&journal, &stacks.join("t"), StackId::new(), CheckpointId(3)));
    let progress = vdsa::recovery::PromotionProgress::default();
    let refused = stack.promote(&journal, None, &progress);
    assert!(refused.as_ref().is_err_and(|e| e.to_string().contains("stop the failover tests")), "{refused:?}");
    ok(test.discard());

    // A crash after the journal's part: the stack reopens and reads the
    // same; the promotion then runs again from the start.
    ok(journal.promote_to(CheckpointId(2)));
    drop(stack);
    drop(journal);
    let journal = ok(Journal::open(dir.path().join("journal"), JournalConfig::default()));
    let kept: Vec<_> = ok(journal.checkpoints()).iter().map(|c| c.id).collect();
    assert_eq!(kept, vec![CheckpointId(2)], "the journal holds nothing after the promoted checkpoint");
    assert_eq!(ok(journal.stats()).log_bytes, 0);
    let stack = Arc::new(ok(ProcessingStack::open(&journal, &stacks.join("f"), id, CheckpointId(2))));
    for (i, want) in model.iter().enumerate() {
        assert!(read_all(&stack, i) == *want, "disk {i} after the journal's promotion and a reopen");
    }

    // The VMs keep writing while the overlays are copied (slowly, so that
    // the writes land in every pass).
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (stack, stop, mut model) = (stack.clone(), stop.clone(), model.clone());
        std::thread::spawn(move || {
            let mut rng = StdRng::seed_from_u64(seed ^ 2);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                scribble(&stack, &mut model, &mut rng, 5);
            }
            ok(stack.flush());
            model
        })
    };
    std::thread::sleep(std::time::Duration::from_millis(50));
    ok(stack.promote(&journal, Some(4 << 20), &progress));
    assert!(stack.is_promoted());
    std::thread::sleep(std::time::Duration::from_millis(50));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let model = writer.join().unwrap_or_else(|_| panic!("the writer panicked"));
    let done = progress.done_bytes.load(std::sync::atomic::Ordering::Relaxed);
    assert!(done > 0, "progress counted the copy");
    for i in 0..2 {
        assert!(read_all(&stack, i) == model[i], "the promoted stack reads disk {i} as written");
        assert!(replica_bytes(&journal, disks[i]) == model[i], "replica {i} = checkpoint 2 + every write");
    }
    assert!(walk(&stacks.join("f")).iter().all(|p| !p.to_string_lossy().ends_with(".overlay")), "overlays freed");
    // Reopened (a VDSA restart): the stack is its replica files.
    drop(stack);
    drop(journal);
    let journal = ok(Journal::open(dir.path().join("journal"), JournalConfig::default()));
    let stack = ok(ProcessingStack::open(&journal, &stacks.join("f"), id, CheckpointId(2)));
    assert!(stack.is_promoted());
    for (i, want) in model.iter().enumerate() {
        assert!(read_all(&stack, i) == *want, "disk {i} after a restart");
    }
}

#[test]
fn a_corrupt_overlay_map_is_named_not_read() {
    let dir = ok(tempfile::tempdir());
    let (journal, disks, _) = journal_with_history(dir.path(), 3);
    let id = StackId::new();
    let at = dir.path().join("s");
    let s = ok(ProcessingStack::open(&journal, &at, id, CheckpointId(2)));
    let map = at.join(format!("{}.map", disks[0].0));
    assert!(!map.exists(), "an overlay nobody wrote has no map (opening costs the same for any disk size)");
    {
        use vdsa::nbd::export::BlockExport;
        ok(s.disks()[0].write(8192, &[7u8; 4096]));
    }
    ok(s.flush());
    drop(s);
    let mut bytes = ok(std::fs::read(&map));
    bytes[30] ^= 0xFF;
    ok(std::fs::write(&map, bytes));
    let e = ProcessingStack::open(&journal, &at, id, CheckpointId(2)).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(e.contains("corrupt") && e.contains(".map"), "{e}");
}

fn qemu_tools() -> bool {
    Command::new("qemu-img").arg("--version").output().is_ok_and(|o| o.status.success())
}

fn serve_stacks(sock: &Path, stacks: &[&ProcessingStack]) {
    let exports = Exports::default();
    for s in stacks {
        for d in s.disks() {
            exports.insert(export_name(s.id, d.disk), d.clone() as Arc<dyn vdsa::nbd::export::BlockExport>);
        }
    }
    super::serve_exports(sock, exports, Protocol::Nbd);
}

fn uri(sock: &Path, name: &str) -> String {
    format!("nbd+unix:///{name}?socket={}", sock.display())
}

/// qemu-img copies each stack's disk (structured replies, block status)
/// and gets the reference image of its checkpoint; qemu-io writes into one
/// stack and only that stack changes; `qemu-img map` sees the zeroes.
#[test]
fn real_nbd_clients_read_write_and_map_the_stacks() {
    if !qemu_tools() {
        panic!("qemu-img is missing: integration/run-tests installs qemu-utils");
    }
    let dir = ok(tempfile::tempdir());
    let (journal, disks, refs) = journal_with_history(dir.path(), 5);
    let stacks: Vec<ProcessingStack> = (1..=3)
        .map(|cp| {
            ok(ProcessingStack::open(&journal, &dir.path().join(format!("s{cp}")), StackId::new(), CheckpointId(cp)))
        })
        .collect();
    let sock = dir.path().join("nbd.sock");
    serve_stacks(&sock, &stacks.iter().collect::<Vec<_>>());
    for (k, s) in stacks.iter().enumerate() {
        for (i, d) in disks.iter().enumerate() {
            let out = dir.path().join(format!("copy-{k}-{i}.raw"));
            let r = ok(Command::new("qemu-img")
                .args(["convert", "-f", "raw", "-O", "raw", &uri(&sock, &export_name(s.id, *d))])
                .arg(&out)
                .output());
            assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
            let copy = ok(std::fs::read(&out));
            assert_eq!(blake3::hash(&copy), blake3::hash(&refs[k][i]), "checkpoint {} disk {i}", k + 1);
        }
    }
    // qemu-io writes 64 KiB of 0xab and zeroes 128 KiB in stack 2's disk 0.
    let name = export_name(stacks[1].id, disks[0]);
    let r = ok(Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0xab 4096 65536", "-c", "write -z -u 262144 131072", "-c", "flush"])
        .arg(uri(&sock, &name))
        .output());
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let mut want = refs[1][0].clone();
    want[4096..4096 + 65536].fill(0xab);
    want[262_144..262_144 + 131_072].fill(0);
    assert!(read_all(&stacks[1], 0) == want, "the stack holds qemu-io's writes");
    assert!(read_all(&stacks[0], 0) == refs[0][0] && read_all(&stacks[2], 0) == refs[2][0], "others do not");
    // Block status: qemu-img map reports the zeroed range as zero.
    let r = ok(Command::new("qemu-img").args(["map", "-f", "raw", "--output=json", &uri(&sock, &name)]).output());
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let map: serde_json::Value = ok(serde_json::from_slice(&r.stdout));
    let zero_at = |off: u64| {
        map.as_array().into_iter().flatten().any(|e| {
            let (s, l) = (e["start"].as_u64().unwrap_or(0), e["length"].as_u64().unwrap_or(0));
            s <= off && off < s + l && e["zero"] == true
        })
    };
    assert!(zero_at(262_144) && !zero_at(4096), "qemu-img map: {map}");
}

/// The landed NBD fuzz run pointed at two stacks: malformed requests
/// change nothing, the stacks keep serving, and the journal is untouched.
#[test]
fn hostile_nbd_input_against_stacks_changes_nothing_it_should_not() {
    let dir = ok(tempfile::tempdir());
    let (journal, disks, refs) = journal_with_history(dir.path(), 9);
    let a = ok(ProcessingStack::open(&journal, &dir.path().join("a"), StackId::new(), CheckpointId(2)));
    let b = ok(ProcessingStack::open(&journal, &dir.path().join("b"), StackId::new(), CheckpointId(3)));
    let sock = dir.path().join("nbd.sock");
    serve_stacks(&sock, &[&a, &b]);
    let before = ok(journal.stats());
    let names = [export_name(a.id, disks[0]), export_name(b.id, disks[1])];
    let mut model = [refs[1][0].clone(), refs[2][1].clone()];
    fuzz(&sock, [names[0].as_str(), names[1].as_str()], &mut model, 0x57AC);
    assert!(read_all(&a, 1) == refs[1][1] && read_all(&b, 0) == refs[2][0], "the disks not fuzzed are unchanged");
    let after = ok(journal.stats());
    assert_eq!((before.head_lsn, before.log_bytes), (after.head_lsn, after.log_bytes), "the journal is untouched");
    let view = ok(journal.open_view(CheckpointId(2)));
    let mut buf = vec![0u8; SIZE as usize];
    ok(view.read(disks[0], 0, &mut buf));
    assert!(buf == refs[1][0], "the checkpoint reads as before");
}
