//! Replication benchmark: a source and a target `vdsa` daemon on loopback
//! (both on this machine's cores), fed through the source's NBD tap, with
//! the baselines measured in the same run:
//!
//! 1. throughput of incompressible, non-duplicate data vs min(raw loopback
//!    TCP copy, raw disk write with fsync), taking turns, medians;
//! 2. RPO (target status: now minus the source time of the newest
//!    consistent checkpoint durable there) at a constant write load,
//!    checkpoints every second: p50 and p99;
//! 3. bytes on the link (TLS included, counted by a proxy) for ten disks
//!    written alike (clones patched alike), as a share of bytes written;
//!    the same for ten clones of a template each in a VPG of its own (ten
//!    source daemons, one target), with the target's journal bytes against
//!    one copy;
//! 4. the same for half-compressible data;
//! 5. the peak resident memory of each daemon.
//!
//! `cargo bench -p integration --bench replication [-- --mib N --reps N --rpo-secs N --rpo-rate MBps --dir PATH --only throughput|vpg-clones]`

use anyhow::{bail, Context, Result};
use integration::measure::{percentile, proc_status};
use integration::replication_lab::{paired_sites, wait_until, Daemon, FaultProxy, SourceSpec, TargetSpec};
use integration::workload::{fill, Pacer};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use vdsa::nbd::client::NbdClient;

struct Args {
    mib: u64,
    reps: usize,
    rpo_secs: u64,
    rpo_rate: u64,
    dir: PathBuf,
    /// Only the throughput part (for profiling).
    only_throughput: bool,
    /// Only the ten clones in ten VPGs.
    only_vpg_clones: bool,
}

fn args() -> Args {
    let mut a = Args {
        mib: 1024,
        reps: 3,
        rpo_secs: 20,
        rpo_rate: 100,
        dir: PathBuf::from("target/bench-replication"),
        only_throughput: false,
        only_vpg_clones: false,
    };
    let v: Vec<String> = std::env::args().collect();
    let mut i = 1;
    while i + 1 < v.len() {
        match v[i].as_str() {
            "--mib" => a.mib = v[i + 1].parse().unwrap_or(a.mib),
            "--reps" => a.reps = v[i + 1].parse().unwrap_or(a.reps),
            "--rpo-secs" => a.rpo_secs = v[i + 1].parse().unwrap_or(a.rpo_secs),
            "--rpo-rate" => a.rpo_rate = v[i + 1].parse().unwrap_or(a.rpo_rate),
            "--dir" => a.dir = PathBuf::from(&v[i + 1]),
            "--only" => {
                a.only_throughput = v[i + 1] == "throughput";
                a.only_vpg_clones = v[i + 1] == "vpg-clones";
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

fn lab() -> PathBuf {
    // The bench binary sits in target/release/deps; lab in target/release.
    let exe = std::env::current_exe().unwrap_or_default();
    let release = exe.parent().and_then(Path::parent).map(Path::to_path_buf).unwrap_or_default();
    release.join("lab")
}

/// Lets writeback of the previous measurement finish, so that no run pays
/// for the one before it.
fn settle() {
    let _ = std::process::Command::new("sync").status();
    std::thread::sleep(Duration::from_millis(500));
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Bytes per second of one TCP stream over loopback.
fn loopback_tcp(bytes: u64) -> Result<f64> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    let reader = std::thread::spawn(move || -> std::io::Result<u64> {
        let (mut c, _) = l.accept()?;
        let mut buf = vec![0u8; 1 << 20];
        let mut n = 0u64;
        loop {
            let k = c.read(&mut buf)?;
            if k == 0 {
                return Ok(n);
            }
            n += k as u64;
        }
    });
    let mut c = TcpStream::connect(addr)?;
    let buf = vec![0x5Au8; 1 << 20];
    let start = Instant::now();
    for _ in 0..bytes >> 20 {
        c.write_all(&buf)?;
    }
    drop(c);
    let got = reader.join().map_err(|_| anyhow::anyhow!("reader panicked"))??;
    if got != bytes {
        bail!("loopback copy moved {got} of {bytes} bytes");
    }
    Ok(bytes as f64 / start.elapsed().as_secs_f64())
}

/// Bytes per second of writing a file in 1 MiB pieces, fsynced at the end.
fn disk_write(dir: &Path, bytes: u64) -> Result<f64> {
    let path = dir.join("baseline.raw");
    let mut f = std::fs::File::create(&path)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut rng = StdRng::seed_from_u64(1);
    fill(&mut rng, &mut buf, false);
    let start = Instant::now();
    for i in 0..bytes >> 20 {
        buf[..8].copy_from_slice(&i.to_le_bytes());
        f.write_all(&buf)?;
    }
    f.sync_all()?;
    let r = bytes as f64 / start.elapsed().as_secs_f64();
    drop(f);
    std::fs::remove_file(&path)?;
    Ok(r)
}

/// The same as `disk_write` with `O_DIRECT` (as the journal appends its
/// packs): the disk without the page cache's copy and reclaim, which on a
/// VM can cost more CPU than the device time.
fn disk_write_direct(dir: &Path, bytes: u64) -> Result<f64> {
    use std::os::unix::fs::OpenOptionsExt;
    const ALIGN: usize = 4096;
    let path = dir.join("baseline-direct.raw");
    let f =
        std::fs::OpenOptions::new().write(true).create(true).truncate(true).custom_flags(libc::O_DIRECT).open(&path)?;
    let mut backing = vec![0u8; (1 << 20) + ALIGN];
    let at = backing.as_ptr().align_offset(ALIGN);
    let buf = &mut backing[at..at + (1 << 20)];
    let mut rng = StdRng::seed_from_u64(1);
    fill(&mut rng, buf, false);
    let start = Instant::now();
    for i in 0..bytes >> 20 {
        buf[..8].copy_from_slice(&i.to_le_bytes());
        std::os::unix::fs::FileExt::write_all_at(&f, buf, i << 20)?;
    }
    f.sync_all()?;
    let r = bytes as f64 / start.elapsed().as_secs_f64();
    drop(f);
    std::fs::remove_file(&path)?;
    Ok(r)
}

/// CPU seconds (user + system) a process has used so far.
fn cpu_seconds(pid: Option<u32>) -> f64 {
    let stat = pid.and_then(|p| std::fs::read_to_string(format!("/proc/{p}/stat")).ok()).unwrap_or_default();
    // Fields after the command name's closing parenthesis: utime is the
    // 12th, stime the 13th (0-based from the state field).
    let fields: Vec<&str> = stat.rsplit_once(')').map_or("", |(_, rest)| rest).split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(f64::NAN);
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (ticks(11) + ticks(12)) / hz
}

/// CPU time of the calling thread, in seconds.
fn thread_cpu() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: ts is a valid timespec for the call to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

/// The work replication cannot avoid, in CPU seconds per GB, measured in
/// this process on the same kind of data: (source, target). The source
/// hashes every block once and encrypts it (TLS 1.3 with the sites' own
/// certificates, in memory); the target decrypts it and copies it once
/// into the page cache (a file written without fsync).
fn unavoidable_cost(sites: (&Path, &Path), dir: &Path, base: &[u8], mib: u64) -> Result<(f64, f64)> {
    use rustls::{ClientConnection, ServerConnection};
    use vdsa::wire::tls::{SiteIdentity, NODE_NAME};
    let client_cfg = SiteIdentity::load(sites.0)?.client_config()?;
    let server_cfg = SiteIdentity::load(sites.1)?.server_config()?;
    let name = rustls_pki_types::ServerName::try_from(NODE_NAME.to_string())?;
    let mut client = ClientConnection::new(client_cfg, name)?;
    let mut server = ServerConnection::new(server_cfg)?;
    // A megabyte goes in whole; the link's writer hands over frames whole.
    client.set_buffer_limit(None);
    let mut wire = Vec::new();
    // The handshake, in memory.
    while client.is_handshaking() || server.is_handshaking() {
        wire.clear();
        while client.wants_write() {
            client.write_tls(&mut wire)?;
        }
        server.read_tls(&mut wire.as_slice())?;
        server.process_new_packets()?;
        wire.clear();
        while server.wants_write() {
            server.write_tls(&mut wire)?;
        }
        client.read_tls(&mut wire.as_slice())?;
        client.process_new_packets()?;
    }
    // Per megabyte, each step's CPU time; the median of each is taken, as
    // this VM's neighbours make single samples noisy. The file is a
    // rotating 64 MiB region, so the copy is measured, not the page
    // allocation and writeback that a growing file adds.
    let (mut hash, mut enc, mut dec, mut copy) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut plain = vec![0u8; base.len()];
    let path = dir.join("unavoidable.raw");
    let file = std::fs::File::create(&path)?;
    for i in 0..mib {
        let mut buf = base.to_vec();
        buf[..8].copy_from_slice(&i.to_le_bytes());
        let t = thread_cpu();
        // As the source hashes a batch: its blocks side by side.
        let blocks: Vec<&[u8]> = buf.chunks(4096).collect();
        std::hint::black_box(vdsa::journal::hash_blocks(&blocks));
        let t1 = thread_cpu();
        std::io::Write::write_all(&mut client.writer(), &buf)?;
        wire.clear();
        while client.wants_write() {
            client.write_tls(&mut wire)?;
        }
        let t2 = thread_cpu();
        let mut rest = wire.as_slice();
        let mut got = 0;
        while got < plain.len() {
            if !rest.is_empty() {
                server.read_tls(&mut rest)?;
                server.process_new_packets()?;
            }
            match server.reader().read(&mut plain[got..]) {
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && !rest.is_empty() => {}
                Err(e) => return Err(e.into()),
            }
        }
        let t3 = thread_cpu();
        std::os::unix::fs::FileExt::write_all_at(&file, &plain, (i % 64) << 20)?;
        let t4 = thread_cpu();
        hash.push(t1 - t);
        enc.push(t2 - t1);
        dec.push(t3 - t2);
        copy.push(t4 - t3);
    }
    drop(file);
    std::fs::remove_file(&path)?;
    let per_gb = 1e9 / (1u64 << 20) as f64;
    let (hash, enc, dec, copy) =
        (median(hash) * per_gb, median(enc) * per_gb, median(dec) * per_gb, median(copy) * per_gb);
    eprintln!(
        "unavoidable, CPU s/GB: hash {hash:.3}, TLS encrypt {enc:.3}, TLS decrypt {dec:.3}, page-cache copy {copy:.3}"
    );
    Ok((hash + enc, dec + copy))
}

/// A source/target pair with a counting proxy between them.
struct Pair {
    _dir: tempfile::TempDir,
    /// The two sites' certificate folders: (source, target).
    sites: (PathBuf, PathBuf),
    source: Daemon,
    target: Daemon,
    /// Counts link bytes; left out where its copying would cost the
    /// measurement CPU.
    proxy: Option<FaultProxy>,
    sspec: SourceSpec,
    tspec: TargetSpec,
}

impl Pair {
    fn start(base: &Path, disks: &[(String, u64)], extra: &[&str], counted: bool) -> Result<Pair> {
        std::fs::create_dir_all(base)?;
        let dir = tempfile::tempdir_in(base)?;
        let lab = lab();
        let (src, dst) = paired_sites(&lab, dir.path(), "prod", "dr")?;
        let sites = (src.clone(), dst.clone());
        let tspec = TargetSpec::new(dir.path(), &dst, 1000)?;
        let target = tspec.start(&lab)?;
        let proxy = if counted { Some(FaultProxy::start(tspec.port)?) } else { None };
        let addr = proxy.as_ref().map_or(format!("127.0.0.1:{}", tspec.port), FaultProxy::addr);
        let mut sspec = SourceSpec::new(dir.path(), &src, &addr, "bench", disks);
        sspec.extra = extra.iter().map(|s| s.to_string()).collect();
        sspec.extra.push("--no-initial-sync".into());
        let source = sspec.start(&lab)?;
        Ok(Pair { _dir: dir, sites, source, target, proxy, sspec, tspec })
    }

    fn tap(&self, disk: &str) -> Result<NbdClient> {
        NbdClient::connect_unix(&self.sspec.tap_sock, disk).context("tap")
    }

    fn drained(&self, timeout: Duration) -> Result<()> {
        wait_until("the target to hold everything", timeout, || {
            Ok(self.source.call(json!({"op": "status"}))?["drained"] == json!(true))
        })
    }

    fn link_bytes(&self) -> u64 {
        self.proxy.as_ref().map_or(0, FaultProxy::forwarded)
    }

    fn raw_bytes(&self) -> Result<u64> {
        Ok(self.source.call(json!({"op": "status"}))?["raw_bytes"].as_u64().unwrap_or(0))
    }

    /// Peak resident set of (source, target), in MiB.
    fn peak_rss(&self) -> (f64, f64) {
        (proc_status(self.source.pid()).peak_rss_mib, proc_status(self.target.pid()).peak_rss_mib)
    }
}

/// Bytes of the files under `dir`, recursively.
fn bytes_under(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => bytes_under(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}

/// Ten clones of a 64 MiB template, one per VPG, each written whole
/// through its own source daemon after the previous one drained; one proxy
/// counts the link bytes of all. Returns (link bytes / written, journal
/// bytes of the ten VPGs at the target / the template's size).
fn clones_in_ten_vpgs(base: &Path) -> Result<(f64, f64)> {
    let size = 64u64 << 20;
    let mut template = vec![0u8; size as usize];
    fill(&mut StdRng::seed_from_u64(17), &mut template, false);
    let pair = Pair::start(base, &[("clone".into(), size)], &[], true)?;
    let lab = lab();
    let addr = pair.proxy.as_ref().map(FaultProxy::addr).context("the counting proxy")?;
    let mut extra_sources = Vec::new();
    let mut journals = vec![pair.tspec.journal_dir("bench")];
    for k in 0..10 {
        let (sock, source) = if k == 0 {
            (pair.sspec.tap_sock.clone(), None)
        } else {
            let dir = pair._dir.path().join(format!("clone-vpg-{k}"));
            std::fs::create_dir_all(&dir)?;
            let vpg = format!("clone-vpg-{k}");
            let mut spec = SourceSpec::new(&dir, &pair.sites.0, &addr, &vpg, &[("clone".into(), size)]);
            spec.extra.push("--no-initial-sync".into());
            let d = spec.start(&lab)?;
            journals.push(pair.tspec.journal_dir(&vpg));
            (spec.tap_sock.clone(), Some(d))
        };
        let mut tap = NbdClient::connect_unix(&sock, "clone").context("tap")?;
        for (i, piece) in template.chunks(4 << 20).enumerate() {
            tap.write((i as u64) << 22, piece)?;
        }
        let daemon = source.as_ref().unwrap_or(&pair.source);
        wait_until("the clone's VPG to be durable at the target", Duration::from_secs(300), || {
            Ok(daemon.call(json!({"op": "status"}))?["drained"] == json!(true))
        })?;
        extra_sources.extend(source);
    }
    let link = pair.link_bytes() as f64 / (10 * size) as f64;
    for d in extra_sources {
        d.shutdown()?;
    }
    // Chunks live in the journals' own folders (format 2) or in the
    // target's shared store (format 3): both are counted.
    let own: u64 = journals.iter().map(|j| bytes_under(&j.join("chunks"))).sum();
    let shared = bytes_under(&pair.tspec.root.join(vdsa::replication::target::CHUNK_STORE_DIR).join("chunks"));
    Ok((link, (own + shared) as f64 / size as f64))
}

/// Unique incompressible 1 MiB writes: each 4 KiB block carries a counter.
fn unique_writes(client: &mut NbdClient, base: &[u8], first: u64, mib: u64, disk_mib: u64) -> Result<()> {
    let mut buf = base.to_vec();
    let mut i = first;
    let mut left = mib;
    while left > 0 {
        let batch = left.min(8);
        let mut bufs = Vec::new();
        for k in 0..batch {
            for (b, block) in buf.chunks_mut(4096).enumerate() {
                block[..8].copy_from_slice(&(i + k).to_le_bytes());
                block[8..16].copy_from_slice(&(b as u64).to_le_bytes());
            }
            bufs.push((((i + k) % disk_mib) << 20, buf.clone()));
        }
        let refs: Vec<(u64, &[u8])> = bufs.iter().map(|(o, d)| (*o, d.as_slice())).collect();
        client.write_many(&refs)?;
        i += batch;
        left -= batch;
    }
    Ok(())
}

fn main() -> Result<()> {
    let a = args();
    if a.only_vpg_clones {
        let (link, journal) = clones_in_ten_vpgs(&a.dir)?;
        println!(
            "ten clones in ten VPGs: link bytes / written {link:.3} (goal <= 0.12); target journal bytes / one copy \
             {journal:.2} (goal <= 1.15)"
        );
        return Ok(());
    }
    if !lab().exists() {
        bail!("{} is missing: cargo build --release -p integration first", lab().display());
    }
    std::fs::create_dir_all(&a.dir)?;
    let mut rng = StdRng::seed_from_u64(7);
    let mut base = vec![0u8; 1 << 20];
    fill(&mut rng, &mut base, false);

    // 1. Throughput, taking turns with the baselines.
    let disk_mib = 1024u64;
    let pair = Pair::start(&a.dir, &[("d0".into(), disk_mib << 20)], &[], false)?;
    let mut tap = pair.tap("d0")?;
    let (mut tcp, mut disk, mut disk_direct, mut repl) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut first = 0u64;
    let mut ratios = Vec::new();
    let (mut cpu_source, mut cpu_target) = (Vec::new(), Vec::new());
    for rep in 0..a.reps {
        tcp.push(loopback_tcp(a.mib << 20)?);
        // This VM's disk is fast for its first gigabytes, then throttled:
        // the disk baseline and the replication (which writes the journal)
        // take turns going first.
        let measure_disk = |disk: &mut Vec<f64>, direct: &mut Vec<f64>| -> Result<()> {
            settle();
            disk.push(disk_write(&a.dir, a.mib << 20)?);
            settle();
            direct.push(disk_write_direct(&a.dir, a.mib << 20)?);
            Ok(())
        };
        if rep % 2 == 0 {
            measure_disk(&mut disk, &mut disk_direct)?;
        }
        settle();
        let cpu_before = (cpu_seconds(pair.source.pid()), cpu_seconds(pair.target.pid()));
        let start = Instant::now();
        unique_writes(&mut tap, &base, first, a.mib, disk_mib)?;
        first += a.mib;
        pair.drained(Duration::from_secs(600))?;
        repl.push((a.mib << 20) as f64 / start.elapsed().as_secs_f64());
        let gb = (a.mib << 20) as f64 / 1e9;
        cpu_source.push((cpu_seconds(pair.source.pid()) - cpu_before.0) / gb);
        cpu_target.push((cpu_seconds(pair.target.pid()) - cpu_before.1) / gb);
        if rep % 2 == 1 {
            measure_disk(&mut disk, &mut disk_direct)?;
        }
        ratios.push(repl[rep] / tcp[rep].min(disk[rep]));
        eprintln!(
            "rep {rep}: loopback TCP {:.0} MB/s, disk {:.0} MB/s ({:.0} MB/s with O_DIRECT), replication {:.0} MB/s, \
             ratio {:.2} ({:.2} against the faster disk figure)",
            tcp[rep] / 1e6,
            disk[rep] / 1e6,
            disk_direct[rep] / 1e6,
            repl[rep] / 1e6,
            ratios[rep],
            repl[rep] / tcp[rep].min(disk[rep].max(disk_direct[rep]))
        );
    }
    let (tcp, disk, disk_direct, repl) = (median(tcp), median(disk), median(disk_direct), median(repl));
    let (cpu_source, cpu_target) = (median(cpu_source), median(cpu_target));
    let (floor_source, floor_target) = unavoidable_cost((&pair.sites.0, &pair.sites.1), &a.dir, &base, 256)?;
    eprintln!(
        "CPU s per replicated GB: source {cpu_source:.2} (unavoidable {floor_source:.2}, ratio {:.1}), target \
         {cpu_target:.2} (unavoidable {floor_target:.2}, ratio {:.1})",
        cpu_source / floor_source,
        cpu_target / floor_target
    );
    let queue = pair.source.call(json!({"op": "status"}))?["queue"].clone();
    eprintln!("source queue after the runs: {queue}");
    let (rss_s1, rss_t1) = pair.peak_rss();
    drop(tap);
    drop(pair);
    if a.only_throughput {
        println!("replication {:.0} MB/s; ratios {ratios:.2?}", repl / 1e6);
        return Ok(());
    }

    // 2. RPO at a constant load, checkpoints every second.
    let pair = Pair::start(&a.dir, &[("d0".into(), disk_mib << 20)], &["--checkpoint-interval-ms", "1000"], false)?;
    let mut tap = pair.tap("d0")?;
    let rate = a.rpo_rate * 1_000_000;
    let samples = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (samples, stop, ctl) = (samples.clone(), stop.clone(), pair.target.control.clone());
        std::thread::spawn(move || {
            let target = |req: serde_json::Value| -> Result<serde_json::Value> {
                let mut s = std::os::unix::net::UnixStream::connect(&ctl)?;
                writeln!(s, "{req}")?;
                let mut line = String::new();
                std::io::BufRead::read_line(&mut std::io::BufReader::new(s), &mut line)?;
                Ok(serde_json::from_str(&line)?)
            };
            let warmup = Instant::now();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(100));
                if warmup.elapsed() < Duration::from_secs(3) {
                    continue;
                }
                if let Ok(v) = target(json!({"op": "status"})) {
                    if let Some(r) = v["vpgs"][0]["rpo_ms"].as_u64() {
                        if let Ok(mut s) = samples.lock() {
                            s.push(r as f64);
                        }
                    }
                }
            }
        })
    };
    let mut pacer = Pacer::new(rate);
    let start = Instant::now();
    let mut i = first;
    let mut wrng = StdRng::seed_from_u64(9);
    while start.elapsed() < Duration::from_secs(a.rpo_secs) {
        // Writes of 64 KiB to 1 MiB at random places.
        let len = 4096 * wrng.gen_range(16..=256usize);
        let off = wrng.gen_range(0..(disk_mib << 20) / 4096 - 256) * 4096;
        let mut d = base[..len].to_vec();
        for (b, block) in d.chunks_mut(4096).enumerate() {
            block[..8].copy_from_slice(&i.to_le_bytes());
            block[8..16].copy_from_slice(&(b as u64).to_le_bytes());
        }
        tap.write(off, &d)?;
        i += 1;
        pacer.pace(len as u64);
    }
    let achieved = pair.raw_bytes()? as f64 / start.elapsed().as_secs_f64();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = sampler.join();
    let mut samples = samples.lock().map(|s| s.clone()).unwrap_or_default();
    let (p50, p99) = (percentile(&mut samples, 0.5), percentile(&mut samples, 0.99));
    let (rss_s2, rss_t2) = pair.peak_rss();
    drop(tap);
    drop(pair);

    // 3. Ten clones patched alike.
    let clones: Vec<(String, u64)> = (0..10).map(|k| (format!("clone{k}"), 256u64 << 20)).collect();
    let pair = Pair::start(&a.dir, &clones, &[], true)?;
    let mut taps: Vec<NbdClient> = clones.iter().map(|(n, _)| pair.tap(n)).collect::<Result<_>>()?;
    let before = pair.link_bytes();
    let mut prng = StdRng::seed_from_u64(11);
    for step in 0..512u64 {
        let mut d = vec![0u8; 64 << 10];
        fill(&mut prng, &mut d, false);
        let off = (step % 4096) * (64 << 10);
        for t in &mut taps {
            t.write(off, &d)?;
        }
    }
    pair.drained(Duration::from_secs(300))?;
    let clone_raw = pair.raw_bytes()? as f64;
    let clone_ratio = (pair.link_bytes() - before) as f64 / clone_raw;
    let (rss_s3, rss_t3) = pair.peak_rss();
    drop(taps);
    drop(pair);

    // 3b. Ten VMs cloned from one template, each in a VPG of its own (ten
    // source daemons, one target VDSA): link bytes against bytes written,
    // and the target's journal bytes against one copy.
    let (vpg_link_ratio, vpg_journal_ratio) = clones_in_ten_vpgs(&a.dir)?;

    // 4. Half-compressible data.
    let pair = Pair::start(&a.dir, &[("d0".into(), 1u64 << 30)], &[], true)?;
    let mut tap = pair.tap("d0")?;
    let before = pair.link_bytes();
    let mut crng = StdRng::seed_from_u64(13);
    for step in 0..256u64 {
        let mut d = vec![0u8; 1 << 20];
        fill(&mut crng, &mut d, true);
        tap.write((step % 1024) << 20, &d)?;
    }
    pair.drained(Duration::from_secs(300))?;
    let half_raw = pair.raw_bytes()? as f64;
    let half_ratio = (pair.link_bytes() - before) as f64 / half_raw;
    let (rss_s4, rss_t4) = pair.peak_rss();
    drop(tap);
    drop(pair);

    let floor = tcp.min(disk);
    let rss_s = [rss_s1, rss_s2, rss_s3, rss_s4].into_iter().fold(0.0, f64::max);
    let rss_t = [rss_t1, rss_t2, rss_t3, rss_t4].into_iter().fold(0.0, f64::max);
    println!("replication benchmark ({} MiB x {} reps; medians)", a.mib, a.reps);
    println!("  loopback TCP copy        {:>8.0} MB/s", tcp / 1e6);
    println!("  disk write + fsync       {:>8.0} MB/s", disk / 1e6);
    println!("  the same with O_DIRECT   {:>8.0} MB/s", disk_direct / 1e6);
    println!(
        "  replication, unique      {:>8.0} MB/s   ratio to min(baselines): {:.2} (of medians), {:.2} (median of per-rep ratios)  (goal >= 0.5)",
        repl / 1e6,
        repl / floor,
        median(ratios)
    );
    println!(
        "  RPO at {:.0} MB/s (asked {} MB/s), checkpoints every 1 s: p50 {:.0} ms, p99 {:.0} ms  (goal p99 <= 2000 ms; {} samples)",
        achieved / 1e6,
        a.rpo_rate,
        p50,
        p99,
        samples.len()
    );
    println!("  ten clones patched alike: link bytes / written {:.3}  (goal <= 0.15)", clone_ratio);
    println!(
        "  ten clones in ten VPGs:   link bytes / written {vpg_link_ratio:.3}  (goal <= 0.12); target journal \
         bytes / one copy {vpg_journal_ratio:.2}  (goal <= 1.15)"
    );
    println!("  half-compressible data:   link bytes / written {:.3}  (goal <= 0.6)", half_ratio);
    println!("  peak RSS: source {rss_s:.0} MiB, target {rss_t:.0} MiB  (goal <= 512 MiB each)");
    Ok(())
}
