//! The journal engine against a simple in-memory reference model, plus the
//! corruption and edge cases an operator relies on.

use proptest::prelude::*;
use protection_groups::{CheckpointId, CheckpointKind, DiskId, RetentionPolicy, SparseTier, StreamId};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;
use vdsa::journal::{CheckpointSpec, Journal, JournalConfig, JournalError, PitView, TapWrite, WriteData, BLOCK_SIZE};

const DISK_SIZE: u64 = 32 * BLOCK_SIZE as u64;

fn small_config() -> JournalConfig {
    JournalConfig {
        segment_bytes: 64 << 10,
        pack_bytes: 64 << 10,
        compression_level: Some(1),
        workers: 2,
        chunk_store: None,
    }
}

/// Content of byte `pos` of a write with pattern `seed`: the same seed at
/// the same in-block offset gives the same byte, so aligned blocks written
/// with one seed dedup across blocks and disks; seed 0 is all zeros.
fn pattern(seed: u8, pos: u64) -> u8 {
    if seed == 0 {
        return 0;
    }
    let x = (pos % BLOCK_SIZE as u64) as u32;
    let seed = u32::from(seed);
    // Seeds 1..=3 compress well (few distinct values), others do not.
    if seed <= 3 {
        (x / 512) as u8 ^ seed as u8
    } else {
        (x.wrapping_mul(2_654_435_761) ^ seed.wrapping_mul(0x9E37_79B9)).rotate_left(seed % 31) as u8
    }
}

fn spec(id: u64, time_ms: u64, kind: CheckpointKind) -> CheckpointSpec {
    CheckpointSpec { id: CheckpointId(id), kind, name: format!("cp{id}"), source_time_ms: time_ms, cuts: vec![] }
}

fn read_disk(view: &PitView, disk: DiskId) -> Vec<u8> {
    let mut buf = vec![0u8; DISK_SIZE as usize];
    if let Err(e) = view.read(disk, 0, &mut buf) {
        panic!("reading {disk} at {}: {e}", view.checkpoint().id);
    }
    buf
}

#[derive(Debug, Clone)]
enum Op {
    Write { disk: usize, offset: u64, len: u64, seed: u8, kind: u8 },
    Checkpoint { named: bool },
    Time { keep: u64 },
    Space { bytes: u64 },
    Tiered { keep: u64 },
    Restart,
    HoldView { pick: usize },
    DropViews,
}

fn op() -> impl Strategy<Value = Op> {
    let write = (0..3usize, 0..DISK_SIZE, 1..20_000u64, 0..8u8, 0..10u8, any::<bool>()).prop_map(
        |(disk, offset, len, seed, kind, align)| {
            let offset = if align { offset / 4096 * 4096 } else { offset };
            let len = if align { (len / 4096).max(1) * 4096 } else { len };
            let len = len.min(DISK_SIZE - offset).max(1);
            Op::Write { disk, offset, len, seed, kind }
        },
    );
    prop_oneof![
        12 => write,
        4 => any::<bool>().prop_map(|named| Op::Checkpoint { named }),
        1 => (1..12u64).prop_map(|keep| Op::Time { keep }),
        1 => (50_000..400_000u64).prop_map(|bytes| Op::Space { bytes }),
        1 => (4..12u64).prop_map(|keep| Op::Tiered { keep }),
        1 => Just(Op::Restart),
        1 => (0..100usize).prop_map(|pick| Op::HoldView { pick }),
        1 => Just(Op::DropViews),
    ]
}

struct Harness {
    dir: tempfile::TempDir,
    journal: Option<Journal>,
    disks: Vec<DiskId>,
    stream: StreamId,
    seq: u64,
    /// Reference images now, and at every checkpoint taken.
    now: Vec<Vec<u8>>,
    at: BTreeMap<CheckpointId, Vec<Vec<u8>>>,
    held: Vec<(PitView, Vec<Vec<u8>>)>,
    next_cp: u64,
    clock: u64,
    /// With a shared chunk store: another journal in it, holding blocks of
    /// the same patterns at its checkpoint 1, and what its disk reads there.
    neighbour: Option<(Journal, DiskId, Vec<u8>)>,
}

impl Harness {
    fn new() -> Harness {
        Harness::in_store(false)
    }

    /// The journal at `<dir>/journal`; with `shared`, its chunks in the
    /// store `<dir>/chunk-store`, next to a neighbour's.
    fn in_store(shared: bool) -> Harness {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let store = shared.then(|| dir.path().join("chunk-store"));
        let neighbour = store.as_ref().map(|store| {
            let config = JournalConfig { chunk_store: Some(store.clone()), ..small_config() };
            let n = Journal::open(dir.path().join("neighbour"), config).unwrap_or_else(|e| panic!("open: {e}"));
            let disk = DiskId::new();
            n.add_disk(disk, DISK_SIZE).unwrap_or_else(|e| panic!("add disk: {e}"));
            let image: Vec<u8> = (0..DISK_SIZE).map(|p| pattern((p / BLOCK_SIZE as u64 % 7) as u8 + 1, p)).collect();
            let write = TapWrite { seq: 1, disk, offset: 0, data: WriteData::Data(&image) };
            n.ingest(StreamId::new(), &[write]).unwrap_or_else(|e| panic!("{e}"));
            n.mark_checkpoint(spec(1, 1000, CheckpointKind::Automatic)).unwrap_or_else(|e| panic!("{e}"));
            (n, disk, image)
        });
        let config = JournalConfig { chunk_store: store, ..small_config() };
        let journal = Journal::open(dir.path().join("journal"), config).unwrap_or_else(|e| panic!("open: {e}"));
        let disks: Vec<DiskId> = (0..3).map(|_| DiskId::new()).collect();
        for d in &disks {
            journal.add_disk(*d, DISK_SIZE).unwrap_or_else(|e| panic!("add disk: {e}"));
        }
        Harness {
            dir,
            journal: Some(journal),
            disks,
            stream: StreamId::new(),
            seq: 0,
            now: vec![vec![0u8; DISK_SIZE as usize]; 3],
            at: BTreeMap::new(),
            held: Vec::new(),
            next_cp: 1,
            clock: 0,
            neighbour,
        }
    }

    /// The neighbour still reads what it wrote, whatever the journal's
    /// retention and compaction freed in the store they share.
    fn check_neighbour(&self) {
        if let Some((n, disk, image)) = &self.neighbour {
            // Compacted all the way: any count the store lost shows here.
            self.j().collect_chunk_garbage(true).unwrap_or_else(|e| panic!("{e}"));
            let mut referenced = self.j().referenced_chunks().unwrap_or_else(|e| panic!("{e}"));
            referenced.extend(n.referenced_chunks().unwrap_or_else(|e| panic!("{e}")));
            let stored = vdsa::journal::stored_chunk_hashes(&self.dir.path().join("chunk-store/chunks"))
                .unwrap_or_else(|e| panic!("{e}"));
            let orphans = stored.iter().filter(|h| !referenced.contains(*h)).count();
            let missing = referenced.iter().filter(|h| !stored.contains(*h)).count();
            assert_eq!((orphans, missing), (0, 0), "the shared store after a full collection: orphans, missing");
            let view = n.open_view(CheckpointId(1)).unwrap_or_else(|e| panic!("{e}"));
            assert!(read_disk(&view, *disk) == *image, "the neighbour's blocks changed in the shared store");
        }
    }

    fn j(&self) -> &Journal {
        match &self.journal {
            Some(j) => j,
            None => panic!("journal closed"),
        }
    }

    fn run(&mut self, op: &Op) {
        self.clock += 1000;
        match *op {
            Op::Write { disk, offset, len, seed, kind } => {
                let data: Vec<u8> = (offset..offset + len).map(|p| pattern(seed, p)).collect();
                let wd = match kind {
                    0 => WriteData::Zero { len },
                    1 => WriteData::Trim { len },
                    _ => WriteData::Data(&data),
                };
                self.seq += 1;
                let w = TapWrite { seq: self.seq, disk: self.disks[disk], offset, data: wd };
                self.j().ingest(self.stream, &[w]).unwrap_or_else(|e| panic!("ingest: {e}"));
                let img = &mut self.now[disk][offset as usize..(offset + len) as usize];
                match kind {
                    0 | 1 => img.fill(0),
                    _ => img.copy_from_slice(&data),
                }
            }
            Op::Checkpoint { named } => {
                let kind = if named { CheckpointKind::Named } else { CheckpointKind::Automatic };
                let id = self.next_cp;
                self.next_cp += 1;
                let cp =
                    self.j().mark_checkpoint(spec(id, self.clock, kind)).unwrap_or_else(|e| panic!("checkpoint: {e}"));
                assert_eq!(cp.id, CheckpointId(id));
                self.at.insert(cp.id, self.now.clone());
                let view = self.j().open_view(cp.id).unwrap_or_else(|e| panic!("view: {e}"));
                for (i, d) in self.disks.iter().enumerate() {
                    assert!(read_disk(&view, *d) == self.now[i], "fresh checkpoint {id} disk {i} differs");
                }
            }
            Op::Time { keep } => {
                let policy = RetentionPolicy::Time { history: Duration::from_secs(keep) };
                let before = self.retained();
                let times: BTreeMap<CheckpointId, u64> =
                    self.j().checkpoints().unwrap_or_default().into_iter().map(|c| (c.id, c.source_time_ms)).collect();
                let report = self.j().apply_retention(&policy, self.clock).unwrap_or_else(|e| panic!("retention: {e}"));
                // The replica moves to the newest checkpoint at or before
                // the horizon (if there is one); exactly the checkpoints
                // older than it age out.
                let horizon = self.clock.saturating_sub(keep * 1000);
                let base = before.iter().rev().find(|id| times[id] <= horizon).copied();
                let expected: Vec<CheckpointId> =
                    before.iter().filter(|id| base.is_none_or(|b| **id >= b)).copied().collect();
                let aged: Vec<CheckpointId> = before.iter().filter(|id| !expected.contains(id)).copied().collect();
                assert_eq!(self.retained(), expected, "retained after a {keep} s time policy at {}", self.clock);
                let mut reported = report.aged_out.clone();
                reported.sort();
                assert_eq!(reported, aged);
                self.verify_all();
            }
            Op::Space { bytes } => {
                let policy = RetentionPolicy::Space { max_bytes: bytes };
                let report = self.j().apply_retention(&policy, self.clock).unwrap_or_else(|e| panic!("retention: {e}"));
                let newest = self.retained().last().copied();
                assert!(
                    report.journal_bytes <= bytes || report.base == newest,
                    "space policy left {} > {bytes} bytes with older checkpoints to spare",
                    report.journal_bytes
                );
                self.verify_all();
            }
            Op::Tiered { keep } => {
                let policy = RetentionPolicy::Tiered {
                    base: Box::new(RetentionPolicy::Time { history: Duration::from_secs(keep * 4) }),
                    tiers: vec![
                        SparseTier { after: Duration::from_secs(keep), every: Some(Duration::from_secs(3)) },
                        SparseTier { after: Duration::from_secs(keep * 2), every: None },
                    ],
                };
                self.j().apply_retention(&policy, self.clock).unwrap_or_else(|e| panic!("retention: {e}"));
                self.verify_all();
            }
            Op::Restart => {
                self.held.clear();
                self.journal = None;
                self.journal = Some(
                    Journal::open(self.dir.path().join("journal"), small_config())
                        .unwrap_or_else(|e| panic!("reopen: {e}")),
                );
                self.verify_all();
            }
            Op::HoldView { pick } => {
                let retained = self.retained();
                if !retained.is_empty() {
                    let id = retained[pick % retained.len()];
                    let view = self.j().open_view(id).unwrap_or_else(|e| panic!("view: {e}"));
                    self.held.push((view, self.at[&id].clone()));
                }
            }
            Op::DropViews => self.held.clear(),
        }
    }

    fn retained(&self) -> Vec<CheckpointId> {
        self.j().checkpoints().unwrap_or_else(|e| panic!("list: {e}")).iter().map(|c| c.id).collect()
    }

    /// Every retained checkpoint, and every held view, reads back exactly
    /// the reference image.
    fn verify_all(&self) {
        for id in self.retained() {
            let Some(expected) = self.at.get(&id) else {
                panic!("journal offers {id}, which was never taken");
            };
            let view = self.j().open_view(id).unwrap_or_else(|e| panic!("view {id}: {e}"));
            for (i, d) in self.disks.iter().enumerate() {
                assert!(read_disk(&view, *d) == expected[i], "checkpoint {id} disk {i} differs from the model");
                // Unaligned ranges too: partial edge blocks, mixed sources.
                for (off, len) in
                    [(1usize, 4095usize), (4000, 9000), (12_345, 70_000), (DISK_SIZE as usize - 5000, 5000)]
                {
                    let mut part = vec![0u8; len];
                    view.read(*d, off as u64, &mut part).unwrap_or_else(|e| panic!("{e}"));
                    assert!(
                        part[..] == expected[i][off..off + len],
                        "checkpoint {id} disk {i} range {off}+{len} differs"
                    );
                }
            }
        }
        for (view, expected) in &self.held {
            for (i, d) in self.disks.iter().enumerate() {
                assert!(
                    read_disk(view, *d) == expected[i],
                    "held view at {} disk {i} changed under retention",
                    view.checkpoint().id
                );
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, max_shrink_iters: 400, ..ProptestConfig::default() })]
    #[test]
    fn every_retained_checkpoint_reads_back_the_model(ops in prop::collection::vec(op(), 1..80)) {
        let mut h = Harness::new();
        for op in &ops {
            h.run(op);
        }
        h.run(&Op::Checkpoint { named: false });
        h.run(&Op::Restart);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, max_shrink_iters: 200, ..ProptestConfig::default() })]
    /// The same in a shared chunk store whose other member holds blocks of
    /// the same patterns: retention and compaction of one journal never
    /// take a block the other reads.
    #[test]
    fn every_retained_checkpoint_reads_back_the_model_in_a_shared_store(ops in prop::collection::vec(op(), 1..80)) {
        let mut h = Harness::in_store(true);
        for op in &ops {
            h.run(op);
        }
        h.run(&Op::Checkpoint { named: false });
        h.run(&Op::Restart);
        h.check_neighbour();
    }
}

fn open(dir: &Path) -> Journal {
    Journal::open(dir, small_config()).unwrap_or_else(|e| panic!("open {}: {e}", dir.display()))
}

/// A journal with one disk, a few checkpoints and data spread over several
/// log segments and packs. Returns (disk, stream).
fn populated(dir: &Path) -> (DiskId, StreamId) {
    let j = open(dir);
    let disk = DiskId::new();
    let stream = StreamId::new();
    j.add_disk(disk, 4 << 20).unwrap_or_else(|e| panic!("{e}"));
    let mut seq = 0;
    for cp in 1..=4u64 {
        for i in 0..128u64 {
            seq += 1;
            let data: Vec<u8> = (0..4 * BLOCK_SIZE as u64).map(|p| pattern(4 + (i % 3) as u8, p * cp + i)).collect();
            let w = TapWrite { seq, disk, offset: ((i * 7 + cp) % 1000) * 4096, data: WriteData::Data(&data) };
            j.ingest(stream, &[w]).unwrap_or_else(|e| panic!("{e}"));
        }
        j.mark_checkpoint(spec(cp, cp, CheckpointKind::Automatic)).unwrap_or_else(|e| panic!("{e}"));
    }
    (disk, stream)
}

fn files(dir: &Path, ext: &str) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == ext)).collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn expect_corrupt(dir: &Path, file: &Path) {
    match Journal::open(dir, small_config()) {
        Err(JournalError::Corrupt { path, offset, reason }) => {
            assert_eq!(path, file, "error names the damaged file ({reason} at {offset})");
        }
        Err(JournalError::MissingChunk { path, hash, .. }) => {
            assert!(path.exists(), "missing chunk {hash} reported for a real segment");
        }
        Err(other) => panic!("expected a corruption error, got: {other}"),
        Ok(_) => panic!("a damaged journal opened without complaint"),
    }
}

#[test]
fn a_flipped_byte_in_the_middle_of_a_segment_is_refused_with_file_and_offset() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    populated(dir.path());
    let segs = files(&dir.path().join("log"), "log");
    assert!(segs.len() >= 3, "test needs several segments, has {}", segs.len());
    let victim = &segs[0];
    let mut bytes = std::fs::read(victim).unwrap_or_default();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(victim, &bytes).unwrap_or_else(|e| panic!("{e}"));
    match Journal::open(dir.path(), small_config()) {
        Err(JournalError::Corrupt { path, offset, .. }) => {
            assert_eq!(&path, victim);
            assert!(offset <= mid as u64, "offset {offset} is at or before the flipped byte {mid}");
        }
        Err(e) => panic!("expected Corrupt, got {e}"),
        Ok(_) => panic!("flipped byte went unnoticed"),
    }
}

#[test]
fn a_flipped_byte_mid_newest_segment_is_corruption_not_a_torn_tail() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    populated(dir.path());
    let segs = files(&dir.path().join("log"), "log");
    // The newest non-empty segment: records follow the flipped one.
    let victim = segs.iter().rev().find(|p| std::fs::metadata(p).map(|m| m.len() > 4096).unwrap_or(false)).cloned();
    let Some(victim) = victim else { panic!("no segment with records") };
    let mut bytes = std::fs::read(&victim).unwrap_or_default();
    bytes[100] ^= 0x80;
    std::fs::write(&victim, &bytes).unwrap_or_else(|e| panic!("{e}"));
    // Remove the empty segments a reopen would have left after it, so the
    // damaged one is the newest.
    for s in &segs {
        if s > &victim {
            std::fs::remove_file(s).unwrap_or_else(|e| panic!("{e}"));
        }
    }
    expect_corrupt(dir.path(), &victim);
}

#[test]
fn a_truncated_pack_is_refused() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    populated(dir.path());
    let packs = files(&dir.path().join("chunks"), "pack");
    let victim = packs.iter().find(|p| std::fs::metadata(p).map(|m| m.len() > 8192).unwrap_or(false)).cloned();
    let Some(victim) = victim else { panic!("no pack with chunks") };
    let len = std::fs::metadata(&victim).map(|m| m.len()).unwrap_or(0);
    let f = std::fs::OpenOptions::new().write(true).open(&victim).unwrap_or_else(|e| panic!("{e}"));
    f.set_len(len / 2).unwrap_or_else(|e| panic!("{e}"));
    drop(f);
    match Journal::open(dir.path(), small_config()) {
        Err(JournalError::Corrupt { path, .. }) => assert_eq!(path, victim),
        Err(JournalError::MissingChunk { hash, .. }) => assert_eq!(hash.len(), 64),
        Err(e) => panic!("expected a corruption error, got {e}"),
        Ok(_) => panic!("a truncated pack went unnoticed"),
    }
}

#[test]
fn bad_magic_in_a_segment_or_a_pack_is_refused() {
    for (sub, ext) in [("log", "log"), ("chunks", "pack")] {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        populated(dir.path());
        let victim = files(&dir.path().join(sub), ext)[0].clone();
        let mut bytes = std::fs::read(&victim).unwrap_or_default();
        bytes[0..4].copy_from_slice(b"XXXX");
        std::fs::write(&victim, &bytes).unwrap_or_else(|e| panic!("{e}"));
        match Journal::open(dir.path(), small_config()) {
            Err(JournalError::Corrupt { path, offset, reason }) => {
                assert_eq!(path, victim);
                assert_eq!(offset, 0);
                assert!(reason.contains("magic") || reason.contains("header"), "{reason}");
            }
            Err(e) => panic!("expected Corrupt for {sub}, got {e}"),
            Ok(_) => panic!("bad magic in {sub} went unnoticed"),
        }
    }
}

#[test]
fn a_torn_tail_is_cut_and_durable_checkpoints_survive() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let (disk, stream) = populated(dir.path());
    let before = {
        let j = open(dir.path());
        let v = j.open_view(CheckpointId(4)).unwrap_or_else(|e| panic!("{e}"));
        let h = v.disk_hash(disk).unwrap_or_else(|e| panic!("{e}"));
        // Writes after the last checkpoint, never synced.
        for i in 0..3u64 {
            let data = vec![0x5Au8; 8192];
            let w = TapWrite { seq: 513 + i, disk, offset: i * 8192, data: WriteData::Data(&data) };
            j.ingest(stream, &[w]).unwrap_or_else(|e| panic!("{e}"));
        }
        h
    };
    // Tear the last write record: the clean close appended a 32-byte commit
    // record after it, which a crash would not have.
    let segs = files(&dir.path().join("log"), "log");
    let last = segs.iter().rev().find(|p| std::fs::metadata(p).map(|m| m.len() > 32).unwrap_or(false)).cloned();
    let Some(last) = last else { panic!("no segment") };
    let len = std::fs::metadata(&last).map(|m| m.len()).unwrap_or(0);
    let f = std::fs::OpenOptions::new().write(true).open(&last).unwrap_or_else(|e| panic!("{e}"));
    f.set_len(len - 32 - 20).unwrap_or_else(|e| panic!("{e}"));
    drop(f);
    for s in &segs {
        if s > &last {
            std::fs::remove_file(s).unwrap_or_else(|e| panic!("{e}"));
        }
    }
    let j = open(dir.path());
    let v = j.open_view(CheckpointId(4)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(v.disk_hash(disk).unwrap_or_else(|e| panic!("{e}")), before);
    // The stream resumes after the last surviving write.
    let pos = j.stream_position(stream).unwrap_or_default().map(|c| c.seq);
    assert_eq!(pos, Some(514), "two of three unsynced writes survive the torn tail");
}

#[test]
fn unaligned_zero_and_trim_writes_are_exact_and_store_no_zero_chunks() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let j = open(dir.path());
    let disk = DiskId::new();
    let s = StreamId::new();
    j.add_disk(disk, 1 << 20).unwrap_or_else(|e| panic!("{e}"));
    let mut model = vec![0u8; 1 << 20];
    let data: Vec<u8> = (0..300_000u64).map(|p| pattern(9, p * 3)).collect();
    let writes = [
        (1u64, 100u64, WriteData::Data(&data[..512])),
        (2, 4096 * 3 + 7, WriteData::Data(&data[..300_000])),
        (3, 5000, WriteData::Zero { len: 200_000 }),
        (4, 700_001, WriteData::Trim { len: 100_000 }),
        (5, 4095, WriteData::Data(&data[1000..1002])),
    ];
    let stats0 = j.stats().unwrap_or_default();
    for (seq, offset, wd) in writes {
        j.ingest(s, &[TapWrite { seq, disk, offset, data: wd }]).unwrap_or_else(|e| panic!("{e}"));
        let r = &mut model[offset as usize..(offset + wd.len()) as usize];
        match wd {
            WriteData::Data(d) => r.copy_from_slice(d),
            _ => r.fill(0),
        }
    }
    let stats = j.stats().unwrap_or_default();
    assert!(stats.zero_blocks - stats0.zero_blocks >= 48 + 23, "zero ranges recorded as zero blocks: {stats:?}");
    j.mark_checkpoint(spec(1, 1, CheckpointKind::Automatic)).unwrap_or_else(|e| panic!("{e}"));
    let v = j.open_view(CheckpointId(1)).unwrap_or_else(|e| panic!("{e}"));
    let mut got = vec![0u8; 1 << 20];
    v.read(disk, 0, &mut got).unwrap_or_else(|e| panic!("{e}"));
    assert!(got == model, "view differs from the model");
    // Reads at odd offsets and lengths too.
    let mut part = vec![0u8; 12_345];
    v.read(disk, 4093, &mut part).unwrap_or_else(|e| panic!("{e}"));
    assert!(part[..] == model[4093..4093 + 12_345]);
}

#[test]
fn bad_requests_are_refused_whole_and_name_the_problem() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let j = open(dir.path());
    let disk = DiskId::new();
    let s = StreamId::new();
    j.add_disk(disk, 64 << 10).unwrap_or_else(|e| panic!("{e}"));
    let d = [1u8; 4096];
    let ok = TapWrite { seq: 1, disk, offset: 0, data: WriteData::Data(&d) };
    j.ingest(s, &[ok]).unwrap_or_else(|e| panic!("{e}"));
    // A gap: seq 3 after 1, in a batch whose first write is fine.
    let batch = [TapWrite { seq: 2, ..ok }, TapWrite { seq: 4, ..ok }];
    match j.ingest(s, &batch) {
        Err(JournalError::SeqGap { expected: 3, got: 4, .. }) => {}
        other => panic!("expected a seq gap, got {other:?}"),
    }
    // Refused whole: seq 2 is still next.
    j.ingest(s, &[TapWrite { seq: 2, ..ok }]).unwrap_or_else(|e| panic!("batch was half applied: {e}"));
    let e = j.ingest(s, &[TapWrite { seq: 3, offset: 62 << 10, ..ok }]);
    assert!(matches!(e, Err(JournalError::OutOfRange { .. })), "{e:?}");
    let e = j.ingest(s, &[TapWrite { seq: 3, disk: DiskId::new(), ..ok }]);
    assert!(matches!(e, Err(JournalError::UnknownDisk(_))), "{e:?}");
    j.mark_checkpoint(spec(5, 1, CheckpointKind::Automatic)).unwrap_or_else(|e| panic!("{e}"));
    let e = j.mark_checkpoint(spec(5, 2, CheckpointKind::Automatic));
    assert!(matches!(e, Err(JournalError::CheckpointNotNewer { .. })), "{e:?}");
    let e = j.open_view(CheckpointId(99));
    assert!(matches!(e, Err(JournalError::UnknownCheckpoint(_))), "{e:?}");
    let e = j.add_disk(DiskId::new(), 1000);
    assert!(matches!(e, Err(JournalError::InvalidWrite(_))), "{e:?}");
    // A second process (here: a second open) is refused.
    assert!(matches!(Journal::open(dir.path(), small_config()), Err(JournalError::Locked(_))));
    // And after all of that the journal still works.
    j.ingest(s, &[TapWrite { seq: 3, ..ok }]).unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn checkpoints_cut_each_stream_at_its_own_marker() {
    // Stream A's write after its marker arrives before stream B's marker:
    // the checkpoint must not contain it (architecture.md §3).
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let j = open(dir.path());
    let (da, db) = (DiskId::new(), DiskId::new());
    let (a, b) = (StreamId::new(), StreamId::new());
    j.add_disk(da, 64 << 10).unwrap_or_else(|e| panic!("{e}"));
    j.add_disk(db, 64 << 10).unwrap_or_else(|e| panic!("{e}"));
    let one = [1u8; 4096];
    let two = [2u8; 4096];
    j.ingest(a, &[TapWrite { seq: 1, disk: da, offset: 0, data: WriteData::Data(&one) }])
        .unwrap_or_else(|e| panic!("{e}"));
    let cut_a = j.stream_position(a).unwrap_or_default();
    j.ingest(a, &[TapWrite { seq: 2, disk: da, offset: 0, data: WriteData::Data(&two) }])
        .unwrap_or_else(|e| panic!("{e}"));
    j.ingest(b, &[TapWrite { seq: 1, disk: db, offset: 0, data: WriteData::Data(&one) }])
        .unwrap_or_else(|e| panic!("{e}"));
    let cut_b = j.stream_position(b).unwrap_or_default();
    let cuts = [cut_a, cut_b].into_iter().flatten().collect();
    j.mark_checkpoint(CheckpointSpec { cuts, ..spec(1, 1, CheckpointKind::Automatic) })
        .unwrap_or_else(|e| panic!("{e}"));
    let v = j.open_view(CheckpointId(1)).unwrap_or_else(|e| panic!("{e}"));
    let mut buf = [0u8; 4096];
    v.read(da, 0, &mut buf).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(buf, one, "A's write after its marker is not in the checkpoint");
    v.read(db, 0, &mut buf).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(buf, one);
    drop(v);
    // A later checkpoint contains it; retention to it keeps both right.
    j.mark_checkpoint(spec(2, 2, CheckpointKind::Automatic)).unwrap_or_else(|e| panic!("{e}"));
    let old = j.open_view(CheckpointId(1)).unwrap_or_else(|e| panic!("{e}"));
    j.apply_retention(&RetentionPolicy::Time { history: Duration::from_millis(0) }, 10)
        .unwrap_or_else(|e| panic!("{e}"));
    let v2 = j.open_view(CheckpointId(2)).unwrap_or_else(|e| panic!("{e}"));
    v2.read(da, 0, &mut buf).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(buf, two);
    old.read(da, 0, &mut buf).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(buf, one, "the held view still reads its own checkpoint");
    // A cut that goes back is refused.
    let back = vec![vdsa::journal::Cut { stream: a, lsn: 1, seq: 1 }];
    let e = j.mark_checkpoint(CheckpointSpec { cuts: back, ..spec(3, 3, CheckpointKind::Automatic) });
    assert!(matches!(e, Err(JournalError::CutGoesBack { .. })), "{e:?}");
}

#[test]
fn opening_a_view_costs_the_same_for_a_small_and_a_huge_disk() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let j = open(dir.path());
    let (small, huge) = (DiskId::new(), DiskId::new());
    j.add_disk(small, 1 << 30).unwrap_or_else(|e| panic!("{e}"));
    j.add_disk(huge, 1 << 40).unwrap_or_else(|e| panic!("{e}"));
    let s = StreamId::new();
    let d = [7u8; 4096];
    j.ingest(s, &[TapWrite { seq: 1, disk: huge, offset: (1 << 40) - 4096, data: WriteData::Data(&d) }])
        .unwrap_or_else(|e| panic!("{e}"));
    j.mark_checkpoint(spec(1, 1, CheckpointKind::Automatic)).unwrap_or_else(|e| panic!("{e}"));
    let v = j.open_view(CheckpointId(1)).unwrap_or_else(|e| panic!("{e}"));
    let mut buf = [0u8; 4096];
    v.read(huge, (1 << 40) - 4096, &mut buf).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(buf, d);
    v.read(small, (1 << 30) - 4096, &mut buf).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(buf, [0u8; 4096]);
    // The replica of a 1 TiB disk is a sparse file, not a terabyte.
    let used: u64 = std::fs::read_dir(dir.path().join("replica"))
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| e.metadata().ok())
                .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
                .sum()
        })
        .unwrap_or(u64::MAX);
    assert!(used < 64 << 20, "replicas use {used} bytes on disk");
}

/// Opening used to create a log segment (twice) and a pack, one of them
/// never synced: after a power cut that segment was empty but not the
/// newest, and the journal never opened again. Opening now writes nothing,
/// so a journal on a full disk opens too.
#[test]
fn opening_a_journal_writes_nothing() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    populated(dir.path());
    let listing = |sub: &str, ext: &str| files(&dir.path().join(sub), ext);
    let before = (listing("log", "log"), listing("chunks", "pack"));
    for _ in 0..3 {
        drop(Journal::open(dir.path(), small_config()).unwrap_or_else(|e| panic!("{e}")));
    }
    assert_eq!((listing("log", "log"), listing("chunks", "pack")), before);
}

/// A checkpoint name larger than a log record may hold used to be
/// acknowledged as durable and then lost (or block the next open).
#[test]
fn an_oversized_checkpoint_name_is_refused_and_the_journal_still_opens() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let (_, _) = populated(dir.path());
    let j = Journal::open(dir.path(), small_config()).unwrap_or_else(|e| panic!("{e}"));
    let newest = j.checkpoints().unwrap_or_default().last().map_or(0, |c| c.id.0);
    for len in [1025, 65 << 20] {
        let mut spec = integration_spec(newest + 1);
        spec.name = "n".repeat(len);
        match j.mark_checkpoint(spec) {
            Err(JournalError::InvalidCheckpoint(why)) => assert!(why.contains("name"), "{why}"),
            other => panic!("a {len}-byte name: expected InvalidCheckpoint, got {other:?}"),
        }
    }
    let mut spec = integration_spec(newest + 1);
    spec.name = "n".repeat(1024);
    j.mark_checkpoint(spec).unwrap_or_else(|e| panic!("{e}"));
    drop(j);
    let j = Journal::open(dir.path(), small_config()).unwrap_or_else(|e| panic!("{e}"));
    let last = j.checkpoints().unwrap_or_default().last().cloned();
    assert_eq!(last.map(|c| (c.id.0, c.name.len())), Some((newest + 1, 1024)));
}

fn integration_spec(id: u64) -> vdsa::journal::CheckpointSpec {
    vdsa::journal::CheckpointSpec {
        id: protection_groups::CheckpointId(id),
        kind: protection_groups::CheckpointKind::Named,
        name: String::new(),
        source_time_ms: 1,
        cuts: Vec::new(),
    }
}

/// A disk that grows: checkpoints before the resize keep the old size (a
/// view reads no further), later ones see the new size and what was
/// written there; after a reopen and after retention moved the replica
/// past the resize, the same holds. A shrink is refused.
#[test]
fn a_disk_grows_at_its_place_in_the_stream_and_earlier_checkpoints_keep_the_old_size() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let (small, big) = (16 * BLOCK_SIZE as u64, 32 * BLOCK_SIZE as u64);
    let disk = DiskId::new();
    let s = StreamId::new();
    let a: Vec<u8> = (0..BLOCK_SIZE as u64).map(|p| pattern(5, p)).collect();
    let b: Vec<u8> = (0..BLOCK_SIZE as u64).map(|p| pattern(6, p)).collect();
    {
        let j = open(dir.path());
        j.add_disk(disk, small).unwrap_or_else(|e| panic!("{e}"));
        j.ingest(s, &[TapWrite { seq: 1, disk, offset: 0, data: WriteData::Data(&a) }])
            .unwrap_or_else(|e| panic!("{e}"));
        j.mark_checkpoint(spec(1, 1_000, CheckpointKind::Automatic)).unwrap_or_else(|e| panic!("{e}"));
        // Beyond the old end before the resize: refused.
        let early = j.ingest(s, &[TapWrite { seq: 2, disk, offset: small, data: WriteData::Data(&b) }]);
        assert!(matches!(early, Err(JournalError::OutOfRange { .. })), "{early:?}");
        // The resize and a write past the old end, in one batch.
        j.ingest(
            s,
            &[
                TapWrite { seq: 2, disk, offset: 0, data: WriteData::Resize { size: big } },
                TapWrite { seq: 3, disk, offset: big - BLOCK_SIZE as u64, data: WriteData::Data(&b) },
            ],
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let shrink = j.ingest(s, &[TapWrite { seq: 4, disk, offset: 0, data: WriteData::Resize { size: small } }]);
        assert!(
            matches!(&shrink, Err(JournalError::InvalidWrite(m)) if m.contains("never shrinks")),
            "a shrink must be refused: {shrink:?}"
        );
        j.mark_checkpoint(spec(2, 2_000, CheckpointKind::Automatic)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(j.disks().unwrap_or_default()[0].size, big);
    }
    let check = |j: &Journal, with_cp1: bool| {
        if with_cp1 {
            let v1 = j.open_view(CheckpointId(1)).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(v1.disk_size(disk).unwrap_or(0), small, "checkpoint 1 keeps the old size");
            let mut buf = vec![0u8; BLOCK_SIZE];
            let past = v1.read(disk, small, &mut buf);
            assert!(matches!(past, Err(JournalError::OutOfRange { .. })), "{past:?}");
            v1.read(disk, 0, &mut buf).unwrap_or_else(|e| panic!("{e}"));
            assert!(buf == a);
        }
        let v2 = j.open_view(CheckpointId(2)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(v2.disk_size(disk).unwrap_or(0), big);
        let mut buf = vec![0u8; BLOCK_SIZE];
        v2.read(disk, big - BLOCK_SIZE as u64, &mut buf).unwrap_or_else(|e| panic!("{e}"));
        assert!(buf == b, "the block written past the old end");
        v2.read(disk, small, &mut buf).unwrap_or_else(|e| panic!("{e}"));
        assert!(buf.iter().all(|&x| x == 0), "the grown part reads zeros");
    };
    let j = open(dir.path());
    check(&j, true);
    // A view of checkpoint 1 held while retention moves the replica past
    // the resize still sees the old size and content.
    let held = j.open_view(CheckpointId(1)).unwrap_or_else(|e| panic!("{e}"));
    let policy = RetentionPolicy::Time { history: Duration::from_secs(1) };
    j.apply_retention(&policy, 3_500).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(j.checkpoints().unwrap_or_default().first().map(|c| c.id), Some(CheckpointId(2)));
    assert_eq!(held.disk_size(disk).unwrap_or(0), small);
    let mut buf = vec![0u8; BLOCK_SIZE];
    held.read(disk, 0, &mut buf).unwrap_or_else(|e| panic!("{e}"));
    assert!(buf == a);
    check(&j, false);
    drop(held);
    drop(j);
    let meta = std::fs::read_to_string(dir.path().join("journal.json")).unwrap_or_default();
    assert!(meta.contains(&format!("\"size\": {big}")), "the base's size is the new one: {meta}");
    check(&open(dir.path()), false);
}

/// Bytes this thread has read through read(2) and friends so far, page
/// cache hits included (`rchar` of /proc/thread-self/io).
fn thread_read_bytes() -> u64 {
    std::fs::read_to_string("/proc/thread-self/io")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("rchar: ").and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0)
}

/// Every retained checkpoint's disk hash.
fn checkpoint_hashes(j: &Journal, disk: DiskId) -> Vec<(u64, String)> {
    let cps = j.checkpoints().unwrap_or_else(|e| panic!("{e}"));
    cps.iter()
        .map(|c| {
            let view = j.open_view(c.id).unwrap_or_else(|e| panic!("{e}"));
            (c.id.0, view.disk_hash(disk).unwrap_or_else(|e| panic!("{e}")).to_hex().to_string())
        })
        .collect()
}

fn set_meta_format(dir: &Path, format: u64) {
    let path = dir.join("journal.json");
    let mut meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap_or_default()).unwrap_or_else(|e| panic!("{e}"));
    meta["format"] = serde_json::json!(format);
    std::fs::write(&path, serde_json::to_vec(&meta).unwrap_or_default()).unwrap_or_else(|e| panic!("{e}"));
}

fn meta_format(dir: &Path) -> u64 {
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("journal.json")).unwrap_or_default()).unwrap_or_default();
    meta["format"].as_u64().unwrap_or(0)
}

/// A journal opens from its packs' indexes: it reads a small share of what
/// its packs hold (control: the same open with the indexes removed reads
/// all of it). A journal of the format before indexes (format 1, no
/// index files) is upgraded in place and reads the same; a damaged index
/// is passed over and written again; an unknown format is refused by name.
#[test]
fn a_journal_opens_from_its_pack_indexes_and_an_old_one_is_upgraded() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    // 8 MiB of distinct, incompressible blocks in 64 KiB packs, four
    // checkpoints.
    let disk = DiskId::new();
    {
        let j = open(dir.path());
        let stream = StreamId::new();
        j.add_disk(disk, 16 << 20).unwrap_or_else(|e| panic!("{e}"));
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let mut data = vec![0u8; 64 << 10];
        for seq in 1..=128u64 {
            for b in data.chunks_exact_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                b.copy_from_slice(&x.to_le_bytes());
            }
            let w = TapWrite { seq, disk, offset: (seq * 7 % 256) << 16, data: WriteData::Data(&data) };
            j.ingest(stream, &[w]).unwrap_or_else(|e| panic!("{e}"));
            if seq % 32 == 0 {
                j.mark_checkpoint(spec(seq / 32, seq, CheckpointKind::Automatic)).unwrap_or_else(|e| panic!("{e}"));
            }
        }
    }
    let chunks = dir.path().join("chunks");
    let expected = checkpoint_hashes(&open(dir.path()), disk);
    assert_eq!(expected.len(), 4);
    let packs = files(&chunks, "pack");
    let pack_bytes: u64 = packs.iter().map(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)).sum();
    assert!(packs.len() >= 4, "test needs several packs, has {}", packs.len());
    assert_eq!(files(&chunks, "idx").len(), packs.len(), "every sealed pack has its index");

    let read_at_open = |dir: &Path| {
        let before = thread_read_bytes();
        let j = open(dir);
        let read = thread_read_bytes() - before;
        assert_eq!(checkpoint_hashes(&j, disk), expected, "the journal reads the same after this open");
        read
    };
    let indexed = read_at_open(dir.path());
    assert!(indexed * 8 < pack_bytes, "open read {indexed} bytes with indexes, the packs hold {pack_bytes}");

    // The format before indexes: no index files, format 1.
    for idx in files(&chunks, "idx") {
        std::fs::remove_file(idx).unwrap_or_else(|e| panic!("{e}"));
    }
    set_meta_format(dir.path(), 1);
    let scanned = read_at_open(dir.path());
    assert!(scanned >= pack_bytes, "without indexes the open reads every pack ({scanned} of {pack_bytes} bytes)");
    assert_eq!(meta_format(dir.path()), 2, "an old journal is upgraded in place");
    assert_eq!(files(&chunks, "idx").len(), files(&chunks, "pack").len(), "and gets its indexes");
    assert!(read_at_open(dir.path()) * 8 < pack_bytes, "the next open reads the indexes");

    // A damaged index: passed over (the pack scanned), written again.
    let victim = files(&chunks, "idx")[1].clone();
    let mut bytes = std::fs::read(&victim).unwrap_or_default();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x10;
    std::fs::write(&victim, &bytes).unwrap_or_else(|e| panic!("{e}"));
    read_at_open(dir.path());
    let rewritten = std::fs::read(&victim).unwrap_or_default();
    assert!(rewritten.len() == bytes.len() && rewritten != bytes, "the damaged index was written again");

    // A format this build does not know is refused, by name.
    set_meta_format(dir.path(), 4);
    match Journal::open(dir.path(), small_config()) {
        Err(e @ JournalError::UnsupportedVersion { found: 4, supported: 3, .. }) => {
            assert!(e.to_string().contains("journal.json"), "{e}")
        }
        Err(e) => panic!("expected UnsupportedVersion, got {e}"),
        Ok(_) => panic!("a journal of format 4 opened"),
    }
    // Format 3 keeps its chunks in a shared store, which it must name.
    set_meta_format(dir.path(), 3);
    match Journal::open(dir.path(), small_config()) {
        Err(e @ JournalError::Corrupt { .. }) => assert!(e.to_string().contains("names no chunk store"), "{e}"),
        Err(e) => panic!("expected a format 3 journal without a store to be refused, got {e}"),
        Ok(_) => panic!("a format 3 journal without a chunk store opened"),
    }
}

/// Bytes of `path` in the page cache, by util-linux's `fincore`.
fn cached_bytes(path: &Path) -> u64 {
    let out = std::process::Command::new("fincore")
        .args(["--bytes", "--noheadings", "--output", "RES"])
        .arg(path)
        .output()
        .unwrap_or_else(|e| panic!("fincore (Debian: util-linux-extra; integration/install-deps installs it): {e}"));
    let text = String::from_utf8_lossy(&out.stdout);
    text.trim().parse().unwrap_or_else(|e| panic!("fincore printed {text:?}: {e}"))
}

/// Whether files in `dir` can be opened with `O_DIRECT`.
fn direct_io_works(dir: &Path) -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_DIRECT)
        .open(dir.join("probe"))
        .and_then(|_| std::fs::remove_file(dir.join("probe")))
        .is_ok()
}

/// The end of a pack's last whole entry (docs/journal-format.md, "Chunk
/// packs"): 32-byte header, then entries of 45 header bytes and their
/// stored bytes.
fn pack_entries_end(bytes: &[u8]) -> usize {
    let mut pos = 32;
    while pos + 45 <= bytes.len() && bytes[pos..pos + 4] == 0x4B4E4843u32.to_le_bytes() {
        let len = u32::from_le_bytes(bytes[pos + 37..pos + 41].try_into().unwrap_or_default()) as usize;
        pos += 45 + len;
    }
    pos
}

#[test]
fn packs_are_written_past_the_page_cache_and_end_at_their_last_entry() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let (disk, _) = populated(dir.path());
    let packs = files(&dir.path().join("chunks"), "pack");
    assert!(packs.len() > 3, "the test needs packs that rolled over: {packs:?}");
    let mut written = 0;
    for p in &packs {
        let bytes = std::fs::read(p).unwrap_or_else(|e| panic!("{e}"));
        // Closed cleanly: no padding after the last entry, sealed or not.
        assert_eq!(pack_entries_end(&bytes), bytes.len(), "{} ends at its last entry", p.display());
        written += bytes.len() as u64;
    }
    // Reading them above cached them: the same packs written again are
    // looked at before anything reads them. In the build's folder, on a
    // disk, not in a /tmp that may be tmpfs (no direct I/O there: the packs
    // are then appended through the page cache, which is all tmpfs has).
    let dir2 = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap_or_else(|e| panic!("{e}"));
    if direct_io_works(dir2.path()) {
        populated(dir2.path());
        let packs2 = files(&dir2.path().join("chunks"), "pack");
        let cached: u64 = packs2.iter().map(|p| cached_bytes(p)).sum();
        assert!(
            cached <= written / 8,
            "{cached} of {written} bytes of the packs are in the page cache: their appends went through it"
        );
    } else {
        eprintln!("{} has no direct I/O: the page-cache check is left out", dir2.path().display());
    }

    // A kill leaves the active pack padded to a block boundary: the zeros
    // are cut as a torn tail and every checkpoint still reads.
    let before = {
        let j = open(dir.path());
        let v = j.open_view(CheckpointId(4)).unwrap_or_else(|e| panic!("{e}"));
        v.disk_hash(disk).unwrap_or_else(|e| panic!("{e}"))
    };
    let last = packs.last().cloned().unwrap_or_default();
    let len = std::fs::metadata(&last).map(|m| m.len()).unwrap_or(0);
    let f = std::fs::OpenOptions::new().write(true).open(&last).unwrap_or_else(|e| panic!("{e}"));
    f.set_len(len.next_multiple_of(4096) + 4096).unwrap_or_else(|e| panic!("{e}"));
    drop(f);
    let j = open(dir.path());
    let v = j.open_view(CheckpointId(4)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(v.disk_hash(disk).unwrap_or_else(|e| panic!("{e}")), before);
    assert_eq!(std::fs::metadata(&last).map(|m| m.len()).unwrap_or(0), len, "the padding was cut");
}
