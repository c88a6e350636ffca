//! The clean-point search over 10,000 checkpoints (architecture.md, "The
//! clean-point search"): a journal of one disk whose "files" (64 blocks of
//! text) are encrypted at a random checkpoint; the search runs k host-side
//! checks at a time, each opening a view of the journal at its checkpoint
//! and comparing the files' blocks with their hash. Prints the rounds
//! against ceil(log_(k+1)(n + 1)) and the wall time, for k = 4 and k = 1.
//!
//! `cargo bench -p vdsa --bench clean_point [-- --checkpoints N]`

use protection_groups::clean_point::{CleanPointSearch, Outcome, Verdict};
use protection_groups::{CheckpointId, CheckpointKind, DiskId, StreamId};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::time::Instant;
use vdsa::journal::{CheckpointSpec, Journal, JournalConfig, TapWrite, WriteData, BLOCK_SIZE};

const FILE_BLOCKS: usize = 64;

fn main() {
    let v: Vec<String> = std::env::args().collect();
    let n: u64 = v
        .iter()
        .position(|a| a == "--checkpoints")
        .and_then(|i| v.get(i + 1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(10_000);
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let journal = Journal::open(dir.path(), JournalConfig::default()).unwrap_or_else(|e| panic!("{e}"));
    let disk = DiskId::new();
    journal.add_disk(disk, 16 << 20).unwrap_or_else(|e| panic!("{e}"));
    let stream = StreamId::new();
    let mut rng = StdRng::seed_from_u64(5);
    let text: Vec<u8> = (0..FILE_BLOCKS * BLOCK_SIZE).map(|i| b"quarterly report, customer total\n"[i % 33]).collect();
    let want = blake3::hash(&text);
    let attack = rng.gen_range(n / 2..n);

    journal
        .ingest(stream, &[TapWrite { seq: 1, disk, offset: 0, data: WriteData::Data(&text) }])
        .unwrap_or_else(|e| panic!("{e}"));
    let started = Instant::now();
    for cp in 1..=n {
        let seq = cp + 1;
        let (offset, data): (u64, Vec<u8>) = if cp == attack {
            let mut enc = vec![0u8; text.len()];
            rng.fill(&mut enc[..]);
            (0, enc)
        } else {
            let block = FILE_BLOCKS as u64 + 1 + cp % 512;
            (block * BLOCK_SIZE as u64, text[..BLOCK_SIZE].to_vec())
        };
        journal
            .ingest(stream, &[TapWrite { seq, disk, offset, data: WriteData::Data(&data) }])
            .unwrap_or_else(|e| panic!("{e}"));
        let spec = CheckpointSpec {
            id: CheckpointId(cp),
            kind: CheckpointKind::Automatic,
            name: String::new(),
            source_time_ms: cp * 1000,
            cuts: vec![],
        };
        journal.mark_checkpoint(spec).unwrap_or_else(|e| panic!("{e}"));
    }
    println!(
        "{n} checkpoints written in {:.1} s; the files are encrypted at checkpoint {attack}",
        started.elapsed().as_secs_f64()
    );
    // The host-side check: the files' blocks at the checkpoint, hashed.
    let check = |cp: CheckpointId| {
        let view = journal.open_view(cp).unwrap_or_else(|e| panic!("{e}"));
        let mut buf = vec![0u8; FILE_BLOCKS * BLOCK_SIZE];
        view.read(disk, 0, &mut buf).unwrap_or_else(|e| panic!("{e}"));
        if blake3::hash(&buf) == want {
            Verdict::Pass
        } else {
            Verdict::Fail
        }
    };
    for k in [4usize, 1] {
        let points: Vec<CheckpointId> = (1..=n).map(CheckpointId).collect();
        let mut search = CleanPointSearch::new(points, k, 1).unwrap_or_else(|e| panic!("{e}"));
        let t = Instant::now();
        loop {
            let round = search.next_round();
            if round.is_empty() {
                break;
            }
            let verdicts: Vec<(CheckpointId, Verdict)> = std::thread::scope(|s| {
                let hs: Vec<_> = round.iter().map(|&cp| s.spawn(move || (cp, check(cp)))).collect();
                hs.into_iter().map(|h| h.join().unwrap_or_else(|_| panic!("a check panicked"))).collect()
            });
            for (cp, v) in verdicts {
                search.record(cp, v);
            }
        }
        let bound = ((n as f64 + 1.0).ln() / ((k as f64) + 1.0).ln()).ceil() as u32;
        let found = search.outcome();
        assert_eq!(
            found,
            Some(Outcome::Found { clean: CheckpointId(attack - 1), first_failing: CheckpointId(attack) })
        );
        println!(
            "k = {k}: {} rounds (ceil(log_{}({}+1)) = {bound}), {:.3} s, answer {:?}",
            search.rounds(),
            k + 1,
            n,
            t.elapsed().as_secs_f64(),
            found
        );
    }
}
