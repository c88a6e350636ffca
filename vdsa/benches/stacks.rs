//! Processing stacks benchmark (docs/performance.md, "Recovery"):
//!
//! 1. Start time: from opening a stack to the first 4 KiB read through its
//!    NBD export over loopback TCP, for disks of 1 GiB and 64 GiB (sparse),
//!    with an empty journal and with `--entries` journal entries.
//! 2. Sequential read, in one run: four stacks at four checkpoints read in
//!    parallel over NBD against four parallel plain reads of the replica
//!    file; then one stack read by `qemu-img convert` from NBD against the
//!    qcow2-chain peer (a base and 100 overlays holding the same writes)
//!    read by `qemu-img convert`.
//! 3. Storage per test: what a stack occupies after its users wrote W
//!    bytes.
//! 4. Promotion (a committed failover): the journal's part (its entries
//!    into the replica) and the overlay copy of `--promote-mib` written by
//!    the recovered VMs, against a raw sequential write of as many bytes
//!    to a new file (with fdatasync) in the same run.
//!
//! `cargo bench -p vdsa --bench stacks [-- --entries N --read-mib N --promote-mib N --dir PATH]`

use protection_groups::{CheckpointId, CheckpointKind, DiskId, StackId, StreamId};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use std::net::TcpListener;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};
use vdsa::conn_limit::{ConnectionLimit, MAX_TAP_CONNECTIONS};
use vdsa::journal::{CheckpointSpec, Journal, JournalConfig, TapWrite, WriteData, BLOCK_SIZE};
use vdsa::nbd::client::NbdClient;
use vdsa::nbd::export::{BlockExport, Exports};
use vdsa::recovery::{export_name, ProcessingStack};
use vdsa::serving::{accept_each, Listener, Pool, Protocol};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

fn ok<T, E: std::fmt::Display>(r: Result<T, E>) -> T {
    r.unwrap_or_else(|e| panic!("{e}"))
}

struct Args {
    entries: u64,
    read_mib: u64,
    promote_mib: u64,
    dir: PathBuf,
}

fn args() -> Args {
    let mut a = Args { entries: 1_000_000, read_mib: 1024, promote_mib: 512, dir: std::env::temp_dir() };
    let argv: Vec<String> = std::env::args().collect();
    let mut i = 1;
    while i < argv.len() {
        let v = argv.get(i + 1).cloned().unwrap_or_default();
        match argv[i].as_str() {
            "--entries" => a.entries = v.parse().unwrap_or(a.entries),
            "--read-mib" => a.read_mib = v.parse().unwrap_or(a.read_mib),
            "--promote-mib" => a.promote_mib = v.parse().unwrap_or(a.promote_mib),
            "--dir" => a.dir = PathBuf::from(v),
            _ => {
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    a
}

/// Serves `exports` on a loopback TCP port as a VDSA does (on the
/// connection runtime); returns the address.
fn serve_tcp(exports: Arc<Exports>) -> String {
    let l = ok(TcpListener::bind("127.0.0.1:0"));
    let addr = ok(l.local_addr()).to_string();
    let limit = ConnectionLimit::new(MAX_TAP_CONNECTIONS, "bench connections");
    ok(accept_each(Listener::Tcp(l), exports, limit, Pool::Exports, Protocol::Nbd, "bench connections"));
    addr
}

fn checkpoint(j: &Journal, id: u64) {
    ok(j.mark_checkpoint(CheckpointSpec {
        id: CheckpointId(id),
        kind: CheckpointKind::Automatic,
        name: String::new(),
        source_time_ms: id,
        cuts: vec![],
    }));
}

/// A journal with one disk of `size` and `entries` 4 KiB block versions
/// spread over it in 100 checkpoints (contents from a pool of 4,096
/// blocks, so the packs stay small).
fn journal_with_entries(dir: &Path, size: u64, entries: u64) -> (Journal, DiskId) {
    let j = ok(Journal::open(dir, JournalConfig::default()));
    let disk = DiskId::new();
    ok(j.add_disk(disk, size));
    let stream = StreamId::new();
    let mut rng = StdRng::seed_from_u64(1);
    let mut pool = vec![0u8; 4096 * BLOCK_SIZE];
    rng.fill_bytes(&mut pool);
    let blocks = size / BLOCK_SIZE as u64;
    let mut seq = 0;
    let per_cp = entries.div_ceil(100).max(1);
    let mut cp = 0;
    let mut done = 0;
    while done < entries {
        let n = (entries - done).min(256);
        let ws: Vec<TapWrite<'_>> = (0..n)
            .map(|_| {
                seq += 1;
                let p = rng.gen_range(0..4096usize) * BLOCK_SIZE;
                TapWrite {
                    seq,
                    disk,
                    offset: rng.gen_range(0..blocks) * BLOCK_SIZE as u64,
                    data: WriteData::Data(&pool[p..p + BLOCK_SIZE]),
                }
            })
            .collect();
        ok(j.ingest(stream, &ws));
        done += n;
        if done / per_cp > cp {
            cp += 1;
            checkpoint(&j, cp);
        }
    }
    cp += 1;
    checkpoint(&j, cp);
    ok(j.sync());
    (j, disk)
}

/// Opens a stack at the newest checkpoint, serves it, connects and reads
/// 4 KiB: the time a test takes to be readable (median of 5).
fn start_time(j: &Journal, dir: &Path) -> Duration {
    let newest = ok(j.checkpoints()).iter().map(|c| c.id).max().unwrap_or(CheckpointId(1));
    let exports = Arc::new(Exports::default());
    let addr = serve_tcp(exports.clone());
    let mut times = Vec::new();
    for rep in 0..5 {
        let t = Instant::now();
        let id = StackId::new();
        let stack = ok(ProcessingStack::open(j, &dir.join(format!("stack-{rep}")), id, newest));
        let d = stack.disks()[0].clone();
        let name = export_name(id, d.disk);
        exports.insert(name.clone(), d as Arc<dyn BlockExport>);
        let mut c = ok(NbdClient::connect_tcp(&addr, &name));
        let mut buf = vec![0u8; 4096];
        ok(c.read(0, &mut buf));
        times.push(t.elapsed());
        exports.remove(&name);
        drop(c);
        ok(stack.discard());
    }
    times.sort();
    times[times.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn main() {
    let a = args();
    let root = ok(tempfile::tempdir_in(&a.dir));
    println!("processing stacks benchmark (in {})", root.path().display());

    // 1. Start time.
    println!("\n1. start time (open + export + first 4 KiB read over NBD/TCP), median of 5:");
    for (size, label) in [(GIB, "1 GiB"), (64 * GIB, "64 GiB sparse")] {
        for entries in [0, a.entries] {
            let dir = root.path().join(format!("start-{size}-{entries}"));
            let t0 = Instant::now();
            let (j, _) = journal_with_entries(&dir.join("journal"), size, entries);
            let built = t0.elapsed();
            let t = start_time(&j, &dir);
            println!(
                "   {label:>14}, {entries:>9} journal entries: {:7.2} ms   (journal built in {:.1} s)",
                ms(t),
                built.as_secs_f64()
            );
            drop(j);
            let _ = std::fs::remove_dir_all(&dir);
        }
    }

    // 2. Sequential read.
    let size = a.read_mib * MIB;
    println!("\n2. sequential read of a {} MiB disk:", a.read_mib);
    let dir = root.path().join("read");
    let j = ok(Journal::open(dir.join("journal"), JournalConfig::default()));
    let disk = DiskId::new();
    ok(j.add_disk(disk, size));
    let stream = StreamId::new();
    let mut rng = StdRng::seed_from_u64(2);
    // The base image: random data written through the journal, then made
    // the replica by retention.
    let mut seq = 0;
    let mut chunk = vec![0u8; MIB as usize];
    for off in (0..size).step_by(MIB as usize) {
        rng.fill_bytes(&mut chunk);
        seq += 1;
        ok(j.ingest(stream, &[TapWrite { seq, disk, offset: off, data: WriteData::Data(&chunk) }]));
    }
    checkpoint(&j, 1);
    ok(j.apply_retention(&protection_groups::RetentionPolicy::Time { history: Duration::ZERO }, 2));
    // 100 checkpoints of 50 writes of 64 KiB each (the qcow2 peer gets the
    // same writes, one overlay per checkpoint).
    let src = dir.join("src");
    ok(std::fs::create_dir_all(&src));
    let mut overlays: Vec<Vec<(u64, PathBuf)>> = Vec::new();
    for cp in 2..=101u64 {
        let mut ws = Vec::new();
        for w in 0..50 {
            let mut data = vec![0u8; 64 << 10];
            rng.fill_bytes(&mut data);
            let off = rng.gen_range(0..(size - (64 << 10)) / 4096) * 4096;
            seq += 1;
            ok(j.ingest(stream, &[TapWrite { seq, disk, offset: off, data: WriteData::Data(&data) }]));
            let f = src.join(format!("w{cp}-{w}.bin"));
            ok(std::fs::write(&f, &data));
            ws.push((off, f));
        }
        checkpoint(&j, cp);
        overlays.push(ws);
    }
    ok(j.sync());
    let stacks: Vec<ProcessingStack> = [26u64, 51, 76, 101]
        .iter()
        .enumerate()
        .map(|(i, cp)| ok(ProcessingStack::open(&j, &dir.join(format!("s{i}")), StackId::new(), CheckpointId(*cp))))
        .collect();
    let exports = Arc::new(Exports::default());
    for s in &stacks {
        let d = s.disks()[0].clone();
        exports.insert(export_name(s.id, d.disk), d as Arc<dyn BlockExport>);
    }
    let addr = serve_tcp(exports.clone());
    let replica = ok(std::fs::read_dir(dir.join("journal")))
        .flatten()
        .map(|e| e.path())
        .find(|p| p.to_string_lossy().contains("replica"))
        .map(|p| if p.is_dir() { ok(std::fs::read_dir(&p)).flatten().map(|e| e.path()).next().unwrap_or(p) } else { p })
        .unwrap_or_else(|| panic!("no replica file under {}", dir.join("journal").display()));
    let par = |f: &(dyn Fn(usize) -> u64 + Sync)| -> f64 {
        let t = Instant::now();
        let bytes: u64 = std::thread::scope(|s| {
            let hs: Vec<_> = (0..4).map(|i| s.spawn(move || f(i))).collect();
            hs.into_iter().map(|h| h.join().unwrap_or(0)).sum()
        });
        bytes as f64 / MIB as f64 / t.elapsed().as_secs_f64()
    };
    let nbd_read = |i: usize| -> u64 {
        let s = &stacks[i];
        let mut c = ok(NbdClient::connect_tcp(&addr, &export_name(s.id, s.disks()[0].disk)));
        let mut buf = vec![0u8; 4 << 20];
        let mut off = 0;
        while off < size {
            ok(c.read(off, &mut buf));
            off += buf.len() as u64;
        }
        size
    };
    let plain_read = |_: usize| -> u64 {
        let f = ok(std::fs::File::open(&replica));
        let mut buf = vec![0u8; 4 << 20];
        let mut off = 0;
        while off < size {
            ok(f.read_exact_at(&mut buf, off));
            off += buf.len() as u64;
        }
        size
    };
    // The page cache serves both sides of the comparison alike; the order
    // alternates so that neither always runs first.
    let mut stack_rates = Vec::new();
    let mut plain_rates = Vec::new();
    for round in 0..3 {
        if round % 2 == 0 {
            plain_rates.push(par(&plain_read));
            stack_rates.push(par(&nbd_read));
        } else {
            stack_rates.push(par(&nbd_read));
            plain_rates.push(par(&plain_read));
        }
    }
    let best = |v: &[f64]| v.iter().cloned().fold(0.0, f64::max);
    let direct_read = |i: usize| -> u64 {
        let d = &stacks[i].disks()[0];
        let mut buf = vec![0u8; 4 << 20];
        let mut off = 0;
        while off < size {
            ok(d.read(off, &mut buf));
            off += buf.len() as u64;
        }
        size
    };
    let direct = (0..3).map(|_| par(&direct_read)).fold(0.0, f64::max);
    println!("   4 stacks in parallel, in process:     {direct:8.0} MiB/s in all (no NBD; where the time goes)");
    let (sr, pr) = (best(&stack_rates), best(&plain_rates));
    println!("   4 stacks in parallel over NBD:        {sr:8.0} MiB/s in all (best of 3)");
    println!("   4 plain reads of the replica file:    {pr:8.0} MiB/s in all (best of 3)");
    println!("   ratio: {:.2} (goal: at least 0.5)", sr / pr);

    // The qcow2-chain peer.
    let chain = dir.join("chain");
    ok(std::fs::create_dir_all(&chain));
    let base = chain.join("base.qcow2");
    let r =
        ok(Command::new("qemu-img").args(["convert", "-f", "raw", "-O", "qcow2"]).arg(&replica).arg(&base).output());
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let mut top = base.clone();
    for (k, ws) in overlays.iter().enumerate() {
        let next = chain.join(format!("o{k}.qcow2"));
        let r = ok(Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
            .arg(&top)
            .arg(&next)
            .output());
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
        let mut cmd = Command::new("qemu-io");
        cmd.args(["-f", "qcow2"]);
        for (off, f) in ws {
            cmd.arg("-c").arg(format!("write -q -s {} {off} 64k", f.display()));
        }
        let r = ok(cmd.arg(&next).output());
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
        top = next;
    }
    let convert = |from: &[&str]| -> f64 {
        let t = Instant::now();
        let null = format!("driver=null-co,size={size}");
        let r =
            ok(Command::new("qemu-img").arg("convert").args(from).args(["-n", "--target-image-opts", &null]).output());
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
        size as f64 / MIB as f64 / t.elapsed().as_secs_f64()
    };
    let newest = &stacks[3];
    let uri = format!("nbd://{addr}/{}", export_name(newest.id, newest.disks()[0].disk));
    let top_s = top.to_string_lossy().into_owned();
    let (mut q, mut n) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        n.push(convert(&["-f", "raw", &uri]));
        q.push(convert(&["-f", "qcow2", &top_s]));
    }
    let (nr, qr) = (best(&n), best(&q));
    println!("   qemu-img convert of the stack at checkpoint 101 over NBD: {nr:8.0} MiB/s (best of 3)");
    println!("   qemu-img convert of the qcow2 chain (base + 100 overlays): {qr:8.0} MiB/s (best of 3)");
    println!("   ratio: {:.2} (goal: at least 3)", nr / qr);
    let chain_bytes: u64 =
        ok(std::fs::read_dir(&chain)).flatten().filter_map(|e| e.metadata().ok()).map(|m| m.len()).sum();
    println!("   on disk: qcow2 chain {} MiB", chain_bytes / MIB);

    // 3. Storage per test.
    println!("\n3. storage per test:");
    let s = &stacks[0];
    let d = &s.disks()[0];
    let before = s.allocated_bytes();
    let mut written = 0u64;
    let mut block = vec![0u8; 4096];
    for i in 0..4096u64 {
        rng.fill_bytes(&mut block);
        let off = (i * 7919 % (size / 4096)) * 4096;
        ok(d.write(off, &block));
        written += 4096;
    }
    ok(s.flush());
    let after = s.allocated_bytes();
    println!(
        "   {} MiB written: the stack occupies {:.2} MiB ({} KiB before writing): {:.2} % over its writes",
        written / MIB,
        after as f64 / MIB as f64,
        before / 1024,
        (after as f64 - written as f64) / written as f64 * 100.0
    );

    drop(stacks);

    // 4. Promotion.
    promotion(&a, root.path());
}

/// Section 4: a stack at the newest checkpoint of a journal with
/// `--entries` entries, `--promote-mib` written to it in 1 MiB writes at
/// random aligned offsets, then promoted; the overlay copy against a raw
/// sequential write of as many bytes.
fn promotion(a: &Args, root: &Path) {
    let mib = a.promote_mib.max(1);
    let size = (2 * mib * MIB).max(GIB);
    println!(
        "\n4. promotion of a {} MiB disk with {} journal entries, {mib} MiB written by the VMs:",
        size / MIB,
        a.entries
    );
    let dir = root.join("promotion");
    let (j, _) = journal_with_entries(&dir.join("journal"), size, a.entries);
    let newest = ok(j.checkpoints()).iter().map(|c| c.id).max().unwrap_or(CheckpointId(1));
    let stack = ok(ProcessingStack::open(&j, &dir.join("stack"), StackId::new(), newest));
    let d = stack.disks()[0].clone();
    let mut rng = StdRng::seed_from_u64(4);
    let mut chunk = vec![0u8; MIB as usize];
    let slots = size / MIB;
    let mut used = std::collections::HashSet::new();
    while (used.len() as u64) < mib {
        let slot = rng.gen_range(0..slots);
        if used.insert(slot) {
            rng.fill_bytes(&mut chunk);
            ok(d.write(slot * MIB, &chunk));
        }
    }
    ok(stack.flush());
    let t = Instant::now();
    let applied = ok(j.promote_to(newest));
    let journal_part = t.elapsed();
    let progress = vdsa::recovery::PromotionProgress::default();
    let t = Instant::now();
    ok(stack.promote(&j, None, &progress));
    let copy = t.elapsed();
    let copied = progress.done_bytes.load(std::sync::atomic::Ordering::Relaxed);
    // The baseline: the same bytes written sequentially to a new file.
    let raw = dir.join("raw.img");
    let f = ok(std::fs::File::create(&raw));
    let t = Instant::now();
    for i in 0..mib {
        rng.fill_bytes(&mut chunk[..8]);
        ok(f.write_all_at(&chunk, i * MIB));
    }
    ok(f.sync_data());
    let raw_time = t.elapsed();
    let rate = |bytes: u64, d: Duration| bytes as f64 / MIB as f64 / d.as_secs_f64();
    println!("   the journal's part: {applied} blocks into the replica in {:.2} s", journal_part.as_secs_f64());
    println!(
        "   the overlay copy: {} MiB in {:.2} s = {:8.0} MiB/s",
        copied / MIB,
        copy.as_secs_f64(),
        rate(copied, copy)
    );
    println!("   raw sequential write of {mib} MiB + fdatasync: {:8.0} MiB/s", rate(mib * MIB, raw_time));
    println!("   ratio: {:.2}", rate(copied, copy) / rate(mib * MIB, raw_time));
    drop(d);
    drop(stack);
    drop(j);
    let _ = std::fs::remove_dir_all(&dir);
}
