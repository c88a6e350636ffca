//! Journal benchmark: the journal against plain file I/O of the same bytes
//! with the same fsync cadence, in one process, reported as ratios.
//!
//! `cargo bench -p vdsa --bench journal [-- --mib N --reps N --dir PATH --only CASE --open-gib 1,16]`
//! (cases: random, sequential, dedup, dedup-wire, read, index, flush, reopen, hash)

use protection_groups::{CheckpointId, CheckpointKind, DiskId, RetentionPolicy, StreamId};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use std::alloc::{GlobalAlloc, Layout, System};
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};
use vdsa::journal::{hash_blocks, CheckpointSpec, Journal, JournalConfig, TapWrite, WireBlock, WriteData, BLOCK_SIZE};

/// Counts live heap bytes, to measure the index's memory for real.
struct Counting;
static LIVE: AtomicI64 = AtomicI64::new(0);

// SAFETY: delegates every call to the system allocator unchanged and only
// adds bookkeeping of sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as i64, Ordering::Relaxed);
        // SAFETY: same layout contract as our caller's.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size() as i64, Ordering::Relaxed);
        // SAFETY: p was allocated by System with layout l.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LIVE.fetch_add(new as i64 - l.size() as i64, Ordering::Relaxed);
        // SAFETY: p was allocated by System with layout l.
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const MIB: usize = 1 << 20;

struct Args {
    only: Option<String>,
    workers: Option<usize>,
    mib: usize,
    reps: usize,
    dir: PathBuf,
    /// Journal sizes for the reopen case, in GiB.
    open_gib: Vec<u64>,
}

fn args() -> Args {
    let mut a = Args { only: None, workers: None, mib: 512, reps: 3, dir: std::env::temp_dir(), open_gib: vec![1, 16] };
    let argv: Vec<String> = std::env::args().collect();
    let mut i = 1;
    while i < argv.len() {
        let v = argv.get(i + 1).cloned().unwrap_or_default();
        match argv[i].as_str() {
            "--mib" => a.mib = v.parse().unwrap_or(a.mib),
            "--reps" => a.reps = v.parse().unwrap_or(a.reps),
            "--dir" => a.dir = PathBuf::from(v),
            "--only" => a.only = Some(v),
            "--open-gib" => a.open_gib = v.split(',').filter_map(|g| g.trim().parse().ok()).collect(),
            "--workers" => a.workers = v.parse().ok(),
            "--no-compress" => {
                let _ = NO_COMPRESS.set(true);
                i += 1;
                continue;
            }
            _ => {
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    a
}

/// One workload: batches of writes (offset, bytes), a checkpoint (and
/// fsync) every `cadence` batches. Batches are 1 MiB, about what one wire
/// batch of a replication stream carries; the baseline writes each batch
/// with one call.
struct Workload {
    name: &'static str,
    disk_size: u64,
    batches: Vec<Vec<(u64, Vec<u8>)>>,
    cadence: usize,
    bytes: usize,
    /// Ingest as a replication target does (`ingest_wire`): every block
    /// comes with the sender's hash, and one the journal already holds
    /// comes as its hash only.
    wire: bool,
}

fn random_block(rng: &mut StdRng) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK_SIZE];
    rng.fill_bytes(&mut b);
    b
}

/// 4 KiB writes at random places on a 64 GiB disk, 256 to a batch; a
/// share `repeat` of them repeats a block written earlier.
fn writes_4k(name: &'static str, total: usize, seed: u64, repeat: f64) -> Workload {
    let mut rng = StdRng::seed_from_u64(seed);
    let disk_size = 64u64 << 30;
    let blocks = total / BLOCK_SIZE;
    let per_batch = 256;
    let mut written: Vec<Vec<u8>> = Vec::new();
    let batches = (0..blocks / per_batch)
        .map(|_| {
            (0..per_batch)
                .map(|_| {
                    let data = if !written.is_empty() && rng.gen_bool(repeat) {
                        written[rng.gen_range(0..written.len())].clone()
                    } else {
                        let b = random_block(&mut rng);
                        if repeat > 0.0 {
                            written.push(b.clone());
                        }
                        b
                    };
                    (rng.gen_range(0..disk_size / 4096) * 4096, data)
                })
                .collect()
        })
        .collect();
    Workload {
        name,
        disk_size,
        batches,
        cadence: 32 * MIB / (per_batch * BLOCK_SIZE),
        bytes: blocks / per_batch * per_batch * BLOCK_SIZE,
        wire: false,
    }
}

fn sequential_64k(total: usize) -> Workload {
    let mut rng = StdRng::seed_from_u64(2);
    let disk_size = 64u64 << 30;
    let writes = total / (64 << 10);
    let per_batch = 16;
    let mut offset = 0u64;
    let batches = (0..writes / per_batch)
        .map(|_| {
            (0..per_batch)
                .map(|_| {
                    let mut d = vec![0u8; 64 << 10];
                    rng.fill_bytes(&mut d);
                    offset += 64 << 10;
                    (offset - (64 << 10), d)
                })
                .collect()
        })
        .collect();
    Workload {
        name: "64 KiB sequential writes, incompressible",
        disk_size,
        batches,
        cadence: 32 * MIB / (per_batch * (64 << 10)),
        bytes: writes / per_batch * per_batch * (64 << 10),
        wire: false,
    }
}

fn spec(id: u64) -> CheckpointSpec {
    CheckpointSpec {
        id: CheckpointId(id),
        kind: CheckpointKind::Automatic,
        name: String::new(),
        source_time_ms: id,
        cuts: vec![],
    }
}

fn fresh_dir(base: &Path, name: &str) -> PathBuf {
    let d = base.join(format!("vdsa-bench-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    let _ = std::fs::create_dir_all(&d);
    d
}

/// Runs the baseline and the journal in lockstep, one checkpoint interval
/// at a time (alternating which goes first), so that both see the same
/// machine: the baseline appends the interval's bytes to a plain file, one
/// write per batch, and fsyncs; the journal ingests the same batches and
/// marks a (durable) checkpoint. Returns (baseline, journal) time.
fn run_pair(w: &Workload, dir: &Path) -> (Duration, Duration) {
    let path = dir.join("baseline.dat");
    let mut f = File::create(&path).unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
    let jdir = dir.join("journal");
    let _ = std::fs::remove_dir_all(&jdir);
    let j = Journal::open(&jdir, config()).unwrap_or_else(|e| panic!("{e}"));
    let disk = DiskId::new();
    j.add_disk(disk, w.disk_size).unwrap_or_else(|e| panic!("{e}"));
    let stream = StreamId::new();
    let (mut seq, mut cp) = (0u64, 0u64);
    let mut buf = Vec::with_capacity(2 * MIB);
    let (mut tb, mut tj) = (Duration::ZERO, Duration::ZERO);
    // The sender's work, done before the clock starts: each block's hash,
    // and whether an earlier block of the stream had it.
    let wire_blocks: Vec<Vec<WireBlock>> = if w.wire {
        let mut seen = std::collections::HashSet::new();
        w.batches
            .iter()
            .map(|batch| {
                batch
                    .iter()
                    .flat_map(|(_, d)| d.chunks_exact(BLOCK_SIZE))
                    .map(|b| {
                        let hash = *blake3::hash(b).as_bytes();
                        if seen.insert(hash) {
                            WireBlock::Sent { hash }
                        } else {
                            WireBlock::Held { hash }
                        }
                    })
                    .collect()
            })
            .collect()
    } else {
        Vec::new()
    };
    flush_dirty();
    for (n, interval) in w.batches.chunks(w.cadence).enumerate() {
        let mut baseline = || {
            let t = Instant::now();
            for batch in interval {
                buf.clear();
                for (_, d) in batch {
                    buf.extend_from_slice(d);
                }
                f.write_all(&buf).unwrap_or_else(|e| panic!("baseline write: {e}"));
            }
            f.sync_data().unwrap_or_else(|e| panic!("baseline fsync: {e}"));
            t.elapsed()
        };
        let mut journal = || {
            let t = Instant::now();
            for (i, batch) in interval.iter().enumerate() {
                let taps: Vec<TapWrite<'_>> = batch
                    .iter()
                    .map(|(off, d)| {
                        seq += 1;
                        TapWrite { seq, disk, offset: *off, data: WriteData::Data(d) }
                    })
                    .collect();
                match wire_blocks.get(n * w.cadence + i) {
                    Some(blocks) => j.ingest_wire(stream, &taps, blocks).map(|_| ()),
                    None => j.ingest(stream, &taps).map(|_| ()),
                }
                .unwrap_or_else(|e| panic!("{e}"));
            }
            cp += 1;
            j.mark_checkpoint(spec(cp)).unwrap_or_else(|e| panic!("{e}"));
            t.elapsed()
        };
        if n % 2 == 0 {
            tb += baseline();
            tj += journal();
        } else {
            tj += journal();
            tb += baseline();
        }
    }
    drop(f);
    drop(j);
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_dir_all(&jdir);
    (tb, tj)
}

static WORKERS: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
static NO_COMPRESS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();

fn config() -> JournalConfig {
    let mut c = JournalConfig::default();
    if NO_COMPRESS.get().copied().unwrap_or(false) {
        c.compression_level = None;
    }
    if let Some(w) = WORKERS.get().copied().flatten() {
        c.workers = w;
    }
    c
}

/// Writes back every dirty page of the machine (sync(2)).
fn flush_dirty() {
    let _ = std::process::Command::new("sync").status();
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn mbps(bytes: usize, t: Duration) -> f64 {
    bytes as f64 / MIB as f64 / t.as_secs_f64()
}

fn ingest(w: &Workload, dir: &Path, reps: usize, goal: f64) {
    let (mut base, mut jour, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..reps {
        let (b, j) = run_pair(w, dir);
        let (b, j) = (mbps(w.bytes, b), mbps(w.bytes, j));
        base.push(b);
        jour.push(j);
        ratios.push(j / b);
    }
    let (b, j, r) = (median(base), median(jour), median(ratios));
    println!(
        "{:<46} baseline {:>7.0} MiB/s  journal {:>7.0} MiB/s  ratio {:.2} (goal >= {goal}) {}",
        w.name,
        b,
        j,
        r,
        if r >= goal { "ok" } else { "MISSED" }
    );
}

/// Hashing 4 KiB blocks: `hash_blocks` (four blocks side by side in SIMD
/// lanes) against `blake3::hash` of each block, the same bytes, in memory,
/// alternating; CPU time is wall time here (one thread, nothing waits).
fn hashing(mib: usize, reps: usize) {
    let mut data = vec![0u8; mib * MIB];
    StdRng::seed_from_u64(9).fill_bytes(&mut data);
    let blocks: Vec<&[u8]> = data.chunks_exact(BLOCK_SIZE).collect();
    let (mut one, mut many, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..reps {
        let t = Instant::now();
        let a: Vec<[u8; 32]> = blocks.iter().map(|b| *blake3::hash(b).as_bytes()).collect();
        let t1 = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let b = hash_blocks(&blocks);
        let t2 = t.elapsed().as_secs_f64();
        assert!(a == b, "hash_blocks differs from blake3::hash");
        let gb = data.len() as f64 / 1e9;
        one.push(t1 / gb);
        many.push(t2 / gb);
        ratios.push(t1 / t2);
    }
    let (o, m, r) = (median(one), median(many), median(ratios));
    println!(
        "hashing 4 KiB blocks                           one at a time {o:.3} s/GB  side by side {m:.3} s/GB  speed-up {r:.2}"
    );
}

/// Sequential read of a view with half its blocks in the journal, against a
/// plain read of the replica file; both warm in the page cache.
fn view_read(dir: &Path, mib: usize, reps: usize) {
    let jdir = dir.join("journal-read");
    let _ = std::fs::remove_dir_all(&jdir);
    let j = Journal::open(&jdir, config()).unwrap_or_else(|e| panic!("{e}"));
    let disk = DiskId::new();
    let size = (mib * MIB) as u64;
    j.add_disk(disk, size).unwrap_or_else(|e| panic!("{e}"));
    let stream = StreamId::new();
    let mut rng = StdRng::seed_from_u64(4);
    let mut seq = 0;
    let mut chunk = vec![0u8; MIB];
    for off in (0..size).step_by(MIB) {
        rng.fill_bytes(&mut chunk);
        seq += 1;
        j.ingest(stream, &[TapWrite { seq, disk, offset: off, data: WriteData::Data(&chunk) }])
            .unwrap_or_else(|e| panic!("{e}"));
    }
    j.mark_checkpoint(spec(1)).unwrap_or_else(|e| panic!("{e}"));
    // Move everything into the replica, then overwrite a random half.
    j.mark_checkpoint(spec(2)).unwrap_or_else(|e| panic!("{e}"));
    j.apply_retention(&RetentionPolicy::Time { history: Duration::ZERO }, 1).unwrap_or_else(|e| panic!("{e}"));
    let mut block = vec![0u8; BLOCK_SIZE];
    for b in 0..size / BLOCK_SIZE as u64 {
        if rng.gen_bool(0.5) {
            rng.fill_bytes(&mut block);
            seq += 1;
            j.ingest(stream, &[TapWrite { seq, disk, offset: b * BLOCK_SIZE as u64, data: WriteData::Data(&block) }])
                .unwrap_or_else(|e| panic!("{e}"));
        }
    }
    j.mark_checkpoint(spec(3)).unwrap_or_else(|e| panic!("{e}"));
    let in_journal = j.stats().map(|s| s.index_versions).unwrap_or(0);
    let view = j.open_view(CheckpointId(3)).unwrap_or_else(|e| panic!("{e}"));
    let replica = jdir.join("replica").join(format!("{}.img", disk.0));
    let file = File::open(&replica).unwrap_or_else(|e| panic!("{e}"));
    // Warm both, then time them request by request, interleaved.
    let mut second = vec![0u8; MIB];
    for off in (0..size).step_by(MIB) {
        view.read(disk, off, &mut chunk).unwrap_or_else(|e| panic!("{e}"));
        file.read_exact_at(&mut second, off).unwrap_or_else(|e| panic!("{e}"));
    }
    let (mut pv, mut vv, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..reps {
        let (mut tp, mut tv) = (Duration::ZERO, Duration::ZERO);
        for off in (0..size).step_by(MIB) {
            let t = Instant::now();
            file.read_exact_at(&mut second, off).unwrap_or_else(|e| panic!("{e}"));
            tp += t.elapsed();
            let t = Instant::now();
            view.read(disk, off, &mut chunk).unwrap_or_else(|e| panic!("{e}"));
            tv += t.elapsed();
        }
        let (p, v) = (mbps(size as usize, tp), mbps(size as usize, tv));
        pv.push(p);
        vv.push(v);
        ratios.push(v / p);
    }
    let r = median(ratios);
    println!(
        "{:<46} replica  {:>7.0} MiB/s  view    {:>7.0} MiB/s  ratio {:.2} (goal >= 0.5) {}",
        format!("sequential view read, {:.0}% of blocks in journal", in_journal as f64 * 100.0 / (size / 4096) as f64),
        median(pv),
        median(vv),
        r,
        if r >= 0.5 { "ok" } else { "MISSED" }
    );
    drop(view);
    drop(j);
    let _ = std::fs::remove_dir_all(&jdir);
}

/// Opening a view over 1 M journal block versions, and what the index costs
/// per version (live heap measured by the counting allocator).
fn index_and_open(dir: &Path) {
    let jdir = dir.join("journal-index");
    let _ = std::fs::remove_dir_all(&jdir);
    let j = Journal::open(&jdir, config()).unwrap_or_else(|e| panic!("{e}"));
    let disk = DiskId::new();
    let size = 1u64 << 40;
    j.add_disk(disk, size).unwrap_or_else(|e| panic!("{e}"));
    let stream = StreamId::new();
    j.mark_checkpoint(spec(1)).unwrap_or_else(|e| panic!("{e}"));
    let small = time_open(&j, CheckpointId(1));
    let mut rng = StdRng::seed_from_u64(5);
    let pool: Vec<Vec<u8>> = (0..64).map(|_| random_block(&mut rng)).collect();
    let before = LIVE.load(Ordering::Relaxed);
    let mut seq = 0;
    // 16 block versions per write: 1 Mi versions in all.
    let target = (1u64 << 20) / 16;
    let mut batch_data: Vec<Vec<u8>> = Vec::new();
    while seq < target {
        batch_data.clear();
        let mut offs = Vec::new();
        for _ in 0..64 {
            // 64 KiB writes of pooled blocks at random places on a 1 TiB disk.
            let mut d = Vec::with_capacity(64 << 10);
            for _ in 0..16 {
                d.extend_from_slice(&pool[rng.gen_range(0..pool.len())]);
            }
            batch_data.push(d);
            offs.push(rng.gen_range(0..size / (64 << 10)) * (64 << 10));
        }
        let taps: Vec<TapWrite<'_>> = batch_data
            .iter()
            .zip(&offs)
            .map(|(d, off)| {
                seq += 1;
                TapWrite { seq, disk, offset: *off, data: WriteData::Data(d) }
            })
            .collect();
        j.ingest(stream, &taps).unwrap_or_else(|e| panic!("{e}"));
    }
    j.mark_checkpoint(spec(2)).unwrap_or_else(|e| panic!("{e}"));
    drop(batch_data);
    let after = LIVE.load(Ordering::Relaxed);
    let versions = j.stats().map(|s| s.index_versions).unwrap_or(0);
    let per = (after - before) as f64 / versions as f64;
    let big = time_open(&j, CheckpointId(2));
    println!(
        "{:<46} {:>7} versions: open {:>7.1} us (empty journal {:>5.1} us) (goal < 10 ms) {}",
        "open a view",
        versions,
        big.as_secs_f64() * 1e6,
        small.as_secs_f64() * 1e6,
        if big < Duration::from_millis(10) { "ok" } else { "MISSED" }
    );
    println!(
        "{:<46} {:>7.1} bytes per block version (live heap) (goal <= 64) {}",
        "index memory",
        per,
        if per <= 64.0 { "ok" } else { "MISSED" }
    );
    drop(j);
    let _ = std::fs::remove_dir_all(&jdir);
    // Per distinct block: index entry plus chunk catalog and hash lookup.
    let jdir = dir.join("journal-catalog");
    let j =
        Journal::open(&jdir, JournalConfig { compression_level: None, ..config() }).unwrap_or_else(|e| panic!("{e}"));
    j.add_disk(disk, size).unwrap_or_else(|e| panic!("{e}"));
    let n = 200_000u64;
    let before = LIVE.load(Ordering::Relaxed);
    let mut b = vec![0u8; BLOCK_SIZE];
    for i in 0..n {
        b[..8].copy_from_slice(&i.to_le_bytes());
        j.ingest(stream, &[TapWrite { seq: i + 1, disk, offset: i * 4096, data: WriteData::Data(&b) }])
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let per = (LIVE.load(Ordering::Relaxed) - before) as f64 / n as f64;
    println!(
        "{:<46} {:>7.1} bytes per distinct block (index + chunk catalog + hash lookup)",
        "memory, all blocks distinct", per
    );
    drop(j);
    let _ = std::fs::remove_dir_all(&jdir);
}

fn time_open(j: &Journal, id: CheckpointId) -> Duration {
    let mut times: Vec<Duration> = (0..101)
        .map(|_| {
            let t = Instant::now();
            let v = j.open_view(id).unwrap_or_else(|e| panic!("{e}"));
            let e = t.elapsed();
            drop(v);
            e
        })
        .collect();
    times.sort();
    times[50]
}

/// Bytes this process has read: (through read calls, from storage), from
/// `/proc/self/io`.
fn io_read() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/self/io").unwrap_or_default();
    let field = |name: &str| {
        text.lines().find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse::<u64>().ok())).unwrap_or(0)
    };
    (field("rchar:"), field("read_bytes:"))
}

/// Empties the page cache if this process may (root), so that an open
/// reads from the disk; says whether it could.
fn drop_caches() -> bool {
    flush_dirty();
    std::fs::write("/proc/sys/vm/drop_caches", "3").is_ok()
}

fn bytes_under(dir: &Path, ext: &str) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| e.path().extension().is_some_and(|x| x == ext))
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// Opening a journal of each size: wall time and bytes read, with the pack
/// indexes and (control) with them removed, so that every pack is scanned.
/// The journal holds unique incompressible data written as 1 MiB writes
/// with a checkpoint every 64 MiB.
fn reopen(dir: &Path, sizes_gib: &[u64]) {
    let cfg = || JournalConfig { compression_level: None, ..config() };
    let mut rows = Vec::new();
    for &gib in sizes_gib {
        let jdir = dir.join(format!("journal-reopen-{gib}"));
        let _ = std::fs::remove_dir_all(&jdir);
        let fill = Instant::now();
        {
            let j = Journal::open(&jdir, cfg()).unwrap_or_else(|e| panic!("{e}"));
            let disk = DiskId::new();
            j.add_disk(disk, 2 * (gib << 30)).unwrap_or_else(|e| panic!("{e}"));
            let stream = StreamId::new();
            let mut rng = StdRng::seed_from_u64(gib);
            let mut data = vec![vec![0u8; MIB]; 16];
            let mut seq = 0u64;
            for batch in 0..(gib << 30) / (16 * MIB as u64) {
                for d in &mut data {
                    rng.fill_bytes(d);
                }
                let taps: Vec<TapWrite<'_>> = data
                    .iter()
                    .enumerate()
                    .map(|(i, d)| {
                        seq += 1;
                        let offset = (batch * 16 + i as u64) * MIB as u64;
                        TapWrite { seq, disk, offset, data: WriteData::Data(d) }
                    })
                    .collect();
                j.ingest(stream, &taps).unwrap_or_else(|e| panic!("{e}"));
                if batch % 4 == 3 {
                    j.mark_checkpoint(spec(batch + 1)).unwrap_or_else(|e| panic!("{e}"));
                }
            }
            j.mark_checkpoint(spec(u64::MAX / 2)).unwrap_or_else(|e| panic!("{e}"));
        }
        let (packs, log) = (bytes_under(&jdir.join("chunks"), "pack"), bytes_under(&jdir.join("log"), "log"));
        let indexes = bytes_under(&jdir.join("chunks"), "idx");
        let fill = fill.elapsed();
        let measure = || {
            let cold = drop_caches();
            let (r0, d0) = io_read();
            let t = Instant::now();
            let j = Journal::open(&jdir, cfg()).unwrap_or_else(|e| panic!("{e}"));
            let took = t.elapsed();
            let (r1, d1) = io_read();
            drop(j);
            (took, r1 - r0, d1 - d0, cold)
        };
        // Twice with the indexes (the first open after writing may still
        // index the packs sealed by the close), then without.
        let _ = measure();
        let indexed = measure();
        for e in std::fs::read_dir(jdir.join("chunks")).into_iter().flatten().flatten() {
            if e.path().extension().is_some_and(|x| x == "idx") {
                let _ = std::fs::remove_file(e.path());
            }
        }
        let scanned = measure();
        println!(
            "journal of {gib} GiB (filled in {:.0} s): packs {} MiB, log {} MiB, pack indexes {} MiB",
            fill.as_secs_f64(),
            packs >> 20,
            log >> 20,
            indexes >> 20
        );
        for (what, (took, rchar, disk_read, cold)) in [("with pack indexes", indexed), ("scanning packs", scanned)] {
            println!(
                "  open {what:<18} {:>8.2} s, read {:>7.1} MiB ({:>7.1} MiB from storage{})",
                took.as_secs_f64(),
                rchar as f64 / MIB as f64,
                disk_read as f64 / MIB as f64,
                if cold { ", page cache dropped first" } else { ", page cache NOT dropped (not root)" }
            );
        }
        rows.push((gib, indexed, scanned));
        let _ = std::fs::remove_dir_all(&jdir);
    }
    if let (Some(small), Some(large)) = (rows.first(), rows.last()) {
        if large.0 > small.0 {
            let ratio = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64().max(1e-9);
            let (ti, ts) = (ratio(large.1 .0, small.1 .0), ratio(large.2 .0, small.2 .0));
            let (bi, bs) = (large.1 .1 as f64 / small.1 .1.max(1) as f64, large.2 .1 as f64 / small.2 .1.max(1) as f64);
            println!(
                "open of {} GiB against {} GiB: time {ti:.2}x, bytes read {bi:.2}x with indexes (goal <= 2x: {}); \
                 scanning: time {ts:.2}x, bytes {bs:.2}x",
                large.0,
                small.0,
                if ti <= 2.0 && bi <= 2.0 { "ok" } else { "MISSED" }
            );
        }
    }
}

/// What a guest's FUA write (or a write and a FLUSH) costs: one 4 KiB
/// write made durable before the next, `n` times, through the journal
/// (ingest, then the group commit: pack fsync, log fsync, commit record,
/// log fsync) against a plain file (pwrite, fdatasync), interleaved.
fn durable_writes(dir: &Path, n: usize) {
    let path = dir.join("baseline-flush.dat");
    let f = File::create(&path).unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
    let jdir = dir.join("journal-flush");
    let _ = std::fs::remove_dir_all(&jdir);
    let j = Journal::open(&jdir, config()).unwrap_or_else(|e| panic!("{e}"));
    let disk = DiskId::new();
    let size = 64 * MIB as u64;
    j.add_disk(disk, size).unwrap_or_else(|e| panic!("{e}"));
    let stream = StreamId::new();
    let mut rng = StdRng::seed_from_u64(9);
    let (mut lat_b, mut lat_j) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for seq in 1..=n as u64 {
        let block = random_block(&mut rng);
        let off = rng.gen_range(0..size / BLOCK_SIZE as u64) * BLOCK_SIZE as u64;
        let t = Instant::now();
        f.write_all_at(&block, off).unwrap_or_else(|e| panic!("baseline write: {e}"));
        f.sync_data().unwrap_or_else(|e| panic!("baseline fsync: {e}"));
        lat_b.push(t.elapsed().as_secs_f64() * 1e6);
        let t = Instant::now();
        j.ingest(stream, &[TapWrite { seq, disk, offset: off, data: WriteData::Data(&block) }])
            .unwrap_or_else(|e| panic!("{e}"));
        j.sync().unwrap_or_else(|e| panic!("{e}"));
        lat_j.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let pct = |v: &mut Vec<f64>, p: f64| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[((v.len() - 1) as f64 * p) as usize]
    };
    let (b50, b99) = (pct(&mut lat_b, 0.5), pct(&mut lat_b, 0.99));
    let (j50, j99) = (pct(&mut lat_j, 0.5), pct(&mut lat_j, 0.99));
    println!(
        "durable 4 KiB writes ({n}, FUA-like): journal p50 {j50:.0} us, p99 {j99:.0} us; plain file p50 {b50:.0} us, \
         p99 {b99:.0} us; journal / file p50 {:.2}, p99 {:.2}",
        j50 / b50,
        j99 / b99
    );
    drop(j);
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_dir_all(&jdir);
}

fn main() {
    // The allocator as the daemon sets it up, so the journal is measured
    // as it runs there.
    vdsa::daemon::keep_freed_memory();
    let a = args();
    let _ = WORKERS.set(a.workers);
    let dir = fresh_dir(&a.dir, "run");
    println!("journal benchmark: {} MiB per case, {} repetitions, medians; directory {}", a.mib, a.reps, dir.display());
    let total = a.mib * MIB;
    let run = |name: &str| a.only.as_deref().is_none_or(|o| o == name);
    if run("random") {
        ingest(&writes_4k("4 KiB random writes, incompressible", total, 1, 0.0), &dir, a.reps, 0.6);
    }
    if run("sequential") {
        ingest(&sequential_64k(total), &dir, a.reps, 0.6);
    }
    if run("dedup") {
        ingest(&writes_4k("4 KiB writes, half repeating earlier blocks", total, 3, 0.5), &dir, a.reps, 1.5);
    }
    if run("dedup-wire") {
        let w = Workload { wire: true, ..writes_4k("same, as received: held blocks as hashes", total, 3, 0.5) };
        ingest(&w, &dir, a.reps, 1.5);
    }
    if run("read") {
        view_read(&dir, a.mib.min(512), a.reps);
    }
    if run("index") {
        index_and_open(&dir);
    }
    if run("flush") {
        durable_writes(&dir, 2000);
    }
    if run("reopen") {
        reopen(&dir, &a.open_gib);
    }
    if run("hash") {
        hashing(a.mib, a.reps);
    }
    let _ = std::fs::remove_dir_all(&dir);
}
