//! The journal under SIGKILL: durable means durable.

use integration::process::ChildGuard;
use integration::workload::{Mix, ReferenceModel, Workload};
use integration::{checkpoint_spec, crash_child_stream};
use protection_groups::{CheckpointId, CheckpointKind, DiskId};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};
use std::time::Duration;
use vdsa::journal::{Journal, JournalConfig};

const ROUNDS: u64 = 60;
const PER_CHECKPOINT: u64 = 16;

fn open(dir: &std::path::Path) -> Journal {
    Journal::open(dir, JournalConfig::default()).unwrap_or_else(|e| panic!("reopening after a kill: {e}"))
}

/// A child ingests and checkpoints; it is killed with SIGKILL at a random
/// moment, ROUNDS times. After each kill, every checkpoint it reported
/// durable (and not aged out by its retention) is present and reads back
/// exactly the reference model, and so does everything else that survived.
#[test]
fn checkpoints_reported_durable_survive_sigkill_at_random_moments() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let sizes = [4u64 << 20, 4 << 20, 2 << 20];
    let disks: Vec<DiskId> = {
        let j = open(dir.path());
        let disks: Vec<DiskId> = sizes.iter().map(|_| DiskId::new()).collect();
        for (d, s) in disks.iter().zip(sizes) {
            j.add_disk(*d, s).unwrap_or_else(|e| panic!("{e}"));
        }
        disks
    };
    let stream = crash_child_stream();
    let mut model = ReferenceModel::new(&sizes);
    let mut expected: BTreeMap<CheckpointId, Vec<blake3::Hash>> = BTreeMap::new();
    let mut rng = StdRng::seed_from_u64(0xC0FFEE);
    let (mut seq_start, mut cp_start) = (0u64, 0u64);
    let (mut kills_after_durable, mut durable_verified, mut views_verified) = (0, 0, 0);
    for round in 0..ROUNDS {
        let seed = 1000 + round;
        let spawned = Command::new(env!("CARGO_BIN_EXE_lab"))
            .args(["crash-child", "--seed", &seed.to_string(), "--writes-per-checkpoint"])
            .arg(PER_CHECKPOINT.to_string())
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawning the crash child: {e}"));
        // Stopped on every path, a failing assertion included.
        let mut child = ChildGuard::adopt(spawned, "the crash child");
        let stdout = child.child_mut().and_then(|c| c.stdout.take()).unwrap_or_else(|| panic!("no stdout"));
        let mut stderr = child.child_mut().and_then(|c| c.stderr.take());
        let reader =
            std::thread::spawn(move || BufReader::new(stdout).lines().map_while(Result::ok).collect::<Vec<String>>());
        std::thread::sleep(Duration::from_millis(rng.gen_range(5..400)));
        let exited_early = child.child_mut().and_then(|c| c.try_wait().ok().flatten());
        child.kill(); // SIGKILL
        let lines = reader.join().unwrap_or_default();
        if let Some(status) = exited_early {
            let mut err = String::new();
            if let Some(e) = stderr.as_mut() {
                let _ = e.read_to_string(&mut err);
            }
            panic!("round {round}: the child exited by itself ({status}): {err}");
        }
        let durable: Vec<u64> =
            lines.iter().filter_map(|l| l.strip_prefix("DURABLE ")).filter_map(|n| n.parse().ok()).collect();
        if !durable.is_empty() {
            kills_after_durable += 1;
        }

        let j = open(dir.path());
        let final_seq = j.stream_position(stream).unwrap_or_default().map_or(0, |c| c.seq);
        assert!(final_seq >= seq_start, "round {round}: the stream went back from {seq_start} to {final_seq}");
        // Replay what the child wrote, as far as it got.
        let mut workload = Workload::new(seed, &sizes, Mix::default());
        for k in 1..=final_seq - seq_start {
            model.apply(&workload.next_write());
            if k % PER_CHECKPOINT == 0 {
                expected.insert(CheckpointId(cp_start + k / PER_CHECKPOINT), model.hashes());
            }
        }
        let present = j.checkpoints().unwrap_or_else(|e| panic!("{e}"));
        let base = present.first().map_or(0, |c| c.id.0);
        for d in durable.iter().filter(|&&d| d >= base) {
            assert!(
                present.iter().any(|c| c.id.0 == *d),
                "round {round}: checkpoint {d} was reported durable but is gone (base {base})"
            );
            durable_verified += 1;
        }
        for cp in &present {
            let want = expected.get(&cp.id).unwrap_or_else(|| panic!("round {round}: unknown {}", cp.id));
            let view = j.open_view(cp.id).unwrap_or_else(|e| panic!("{e}"));
            for (i, d) in disks.iter().enumerate() {
                let got = view.disk_hash(*d).unwrap_or_else(|e| panic!("{e}"));
                assert_eq!(&got, &want[i], "round {round}: {} disk {i} differs from the model", cp.id);
            }
            views_verified += 1;
        }
        // What survived past the last checkpoint is exact too.
        let head_id = present.last().map_or(0, |c| c.id.0).max(cp_start) + 1;
        j.mark_checkpoint(checkpoint_spec(head_id, head_id * 1000, CheckpointKind::Automatic))
            .unwrap_or_else(|e| panic!("{e}"));
        expected.insert(CheckpointId(head_id), model.hashes());
        let view = j.open_view(CheckpointId(head_id)).unwrap_or_else(|e| panic!("{e}"));
        for (i, d) in disks.iter().enumerate() {
            let got = view.disk_hash(*d).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(got, model.hashes()[i], "round {round}: head after the kill differs on disk {i}");
        }
        seq_start = final_seq;
        cp_start = head_id;
    }
    println!("{ROUNDS} kills, {kills_after_durable} after durable checkpoints; {durable_verified} durable checkpoints and {views_verified} views verified");
    assert!(kills_after_durable >= ROUNDS / 2, "too few kills landed after work was done: {kills_after_durable}");
    assert!(seq_start > 1000, "the children wrote too little to test anything: {seq_start} writes");
}

/// The shared chunk store under SIGKILL: a child ingests into two journals
/// sharing one store, with retention collecting garbage, and removes and
/// creates one of them (half the time with its own store, as an earlier
/// build made it, then moved into the shared one); it is killed at random
/// moments 100 times. Every
/// checkpoint reported durable and retained reads back what was written,
/// a removal is whole or not at all, and after a full collection a scrub
/// of the packs finds no orphan and nothing missing
/// (`integration::store_crash`; `lab store-crash --long` runs 1000).
#[test]
fn the_shared_chunk_store_keeps_every_needed_block_and_leaks_none_under_sigkill() {
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_secs());
    println!("store crash seed {seed}");
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let lab = std::path::Path::new(env!("CARGO_BIN_EXE_lab"));
    let r = integration::store_crash::run(dir.path(), lab, 100, seed).unwrap_or_else(|e| panic!("seed {seed}: {e:#}"));
    println!("{r:?}");
    assert_eq!(r.runs, 100);
    assert!(
        r.removals_finished > 0 && r.moves_finished > 0 && r.checkpoints_verified > 100,
        "the runs did something: {r:?}"
    );
}
