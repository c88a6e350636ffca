//! Scale benchmark: one protected VDSA with many disks in many VPGs and one
//! recovery VDSA receiving them all, with their site manager, on loopback.
//!
//! The disks are tapped from outside: the bench writes each one through the
//! protected VDSA's NBD tap, one connection per disk, as QEMU's mirror job
//! of each disk would. It reports:
//!
//! 1. setup: the time to define the VPGs and for all of them to protect
//!    (each disk's initial copy is a zero write over the whole disk, since
//!    the disks start empty);
//! 2. RPO under load: `--rate` MB/s of unique incompressible 64 KiB writes
//!    at random places, spread over every disk, checkpoints every second;
//!    every VPG's RPO is read from the site manager's `/metrics` once a
//!    second: p50, p99 and the worst, over all VPGs and samples;
//! 3. each VDSA's peak RSS (VmHWM) and its threads, sampled each second
//!    (the most seen).
//!
//! `cargo bench -p integration --bench scale [-- --disks 200 --vpgs 50 --disk-mib 64 --rate 100 --seconds 60 --dir PATH]`

use anyhow::{bail, Context, Result};
use integration::measure::{percentile, proc_status, threads_by_name};
use integration::site_lab::{free_port, AgentProcess, SiteManagerProcess};
use integration::workload::Pacer;
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// Threads counted by name.
type ThreadNames = Vec<(String, usize)>;
use std::time::{Duration, Instant};
use vdsa::nbd::client::NbdClient;

struct Args {
    disks: usize,
    vpgs: usize,
    disk_mib: u64,
    rate_mb: u64,
    seconds: u64,
    dir: PathBuf,
}

fn args() -> Result<Args> {
    let mut a = Args {
        disks: 200,
        vpgs: 50,
        disk_mib: 64,
        rate_mb: 100,
        seconds: 60,
        dir: PathBuf::from("target/bench-scale"),
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().with_context(|| format!("{k} needs a value"));
        match k.as_str() {
            "--disks" => a.disks = v()?.parse()?,
            "--vpgs" => a.vpgs = v()?.parse()?,
            "--disk-mib" => a.disk_mib = v()?.parse()?,
            "--rate" => a.rate_mb = v()?.parse()?,
            "--seconds" => a.seconds = v()?.parse()?,
            "--dir" => a.dir = PathBuf::from(v()?),
            "--bench" => {}
            other => bail!("unknown argument {other}"),
        }
    }
    if a.vpgs == 0 || a.disks < a.vpgs {
        bail!("--disks must be at least --vpgs, and --vpgs at least 1");
    }
    Ok(a)
}

/// Every `vdsa_vpg_rpo_seconds` sample of a scrape: (labels, seconds).
fn rpo_samples(scrape: &str) -> Vec<(String, f64)> {
    scrape
        .lines()
        .filter_map(|l| l.strip_prefix("vdsa_vpg_rpo_seconds{"))
        .filter_map(|rest| {
            let (labels, value) = rest.rsplit_once("} ")?;
            Some((labels.to_string(), value.trim().parse().ok()?))
        })
        .collect()
}

fn main() -> Result<()> {
    let a = args()?;
    let lab = PathBuf::from(env!("CARGO_BIN_EXE_lab"));
    let _ = std::fs::remove_dir_all(&a.dir);
    std::fs::create_dir_all(&a.dir)?;
    let dir = std::fs::canonicalize(&a.dir)?;
    let result = run(&lab, &dir, &a);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn run(lab: &Path, dir: &Path, a: &Args) -> Result<()> {
    let disk_bytes = a.disk_mib << 20;
    let sm = SiteManagerProcess::start_on(lab, &dir.join("site-manager"), free_port(), free_port(), &[])?;
    let mut agents = Vec::new();
    let mut host_ids = Vec::new();
    for name in ["protected-0", "recovery-0"] {
        let (id, token) = sm.add_host(name)?;
        agents.push(AgentProcess::start_on(
            lab,
            &dir.join(name),
            name,
            &sm.management_address(),
            &token,
            free_port(),
            &[],
        )?);
        host_ids.push(id);
    }
    sm.wait_until("/api/v1/hosts", Duration::from_secs(120), "both VDSAs to register", |v| {
        v.as_array().is_some_and(|hs| hs.len() == 2 && hs.iter().all(|h| h["vdsa"] == "installed"))
    })?;
    let site = sm.get("/api/v1/site")?["id"].as_str().context("site id")?.to_string();

    // 1. The VPGs: disks spread evenly, one VM per disk.
    let setup = Instant::now();
    let mut disks = Vec::new();
    let mut tasks = Vec::new();
    for g in 0..a.vpgs {
        let mut vms = Vec::new();
        for d in (0..a.disks).filter(|d| d % a.vpgs == g) {
            let name = format!("vpg{g}-disk{d}");
            vms.push(json!({
                "id": uuid::Uuid::new_v4(), "name": format!("vpg{g}-vm{d}"), "host": host_ids[0],
                "hypervisor_ref": "", "recovery_host": host_ids[1],
                "disks": [{"id": uuid::Uuid::new_v4(), "name": name, "size_bytes": disk_bytes, "device": ""}],
            }));
            disks.push(name);
        }
        let created = sm.create_vpg(&json!({
            "name": format!("vpg-{g}"), "recovery_site": site, "vms": vms, "checkpoint_interval_ms": 1000,
        }))?;
        tasks.push(created["task"]["id"].as_str().context("task id")?.to_string());
    }
    let defined = setup.elapsed();
    // The initial copy of each disk: the disks are empty, so zeros.
    let sock = agents[0].tap_sock.clone();
    let mut clients = Vec::new();
    let connect_deadline = Instant::now() + Duration::from_secs(120);
    for d in &disks {
        let client = loop {
            match NbdClient::connect_unix(&sock, d) {
                Ok(c) => break c,
                Err(_) if Instant::now() < connect_deadline => std::thread::sleep(Duration::from_millis(100)),
                Err(e) => bail!("the tap of {d} never came: {e}"),
            }
        };
        clients.push(client);
    }
    for c in &mut clients {
        let mut off = 0;
        while off < disk_bytes {
            let len = (disk_bytes - off).min(32 << 20);
            c.write_zeroes(off, len as u32, false)?;
            off += len;
        }
    }
    for t in &tasks {
        let done = sm.get(&format!("/api/v1/tasks/{t}/wait?timeout_ms=600000"))?;
        if done["completion"] != "Success" {
            bail!("a VPG did not reach Protecting: {done}");
        }
    }
    let protecting = setup.elapsed();
    eprintln!(
        "{} VPGs with {} disks of {} MiB defined in {:.1} s, all protecting after {:.1} s",
        a.vpgs,
        a.disks,
        a.disk_mib,
        defined.as_secs_f64(),
        protecting.as_secs_f64()
    );

    // 2. The load, and the samplers.
    let stop = Arc::new(AtomicBool::new(false));
    let rpo = Arc::new(Mutex::new(Vec::<f64>::new()));
    let missing = Arc::new(Mutex::new(0usize));
    let peaks = Arc::new(Mutex::new([(0.0f64, 0u64); 2]));
    // Each VDSA's threads by name when it had the most.
    let peak_names: Arc<Mutex<[ThreadNames; 2]>> = Arc::default();
    let pids = [agents[0].pid(), agents[1].pid()];
    let writers = 4.min(clients.len());
    let per_writer = a.rate_mb * 1_000_000 / writers as u64;
    let mut groups: Vec<Vec<NbdClient>> = (0..writers).map(|_| Vec::new()).collect();
    for (i, c) in clients.into_iter().enumerate() {
        groups[i % writers].push(c);
    }
    let written = Arc::new(Mutex::new(0u64));
    let start = Instant::now();
    let seconds = a.seconds;
    let vpgs = a.vpgs;
    std::thread::scope(|scope| -> Result<()> {
        let mut handles = Vec::new();
        for (w, mut group) in groups.into_iter().enumerate() {
            let (stop, written) = (stop.clone(), written.clone());
            handles.push(scope.spawn(move || -> Result<()> {
                let mut rng = StdRng::seed_from_u64(w as u64);
                let mut pacer = Pacer::new(per_writer);
                let mut data = vec![0u8; 64 << 10];
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    rng.fill_bytes(&mut data);
                    let c = group.len();
                    let client = &mut group[rng.gen_range(0..c)];
                    let off = rng.gen_range(0..disk_bytes / (64 << 10)) * (64 << 10);
                    client.write(off, &data)?;
                    n += data.len() as u64;
                    pacer.pace(data.len() as u64);
                }
                if let Ok(mut t) = written.lock() {
                    *t += n;
                }
                for c in group {
                    let _ = c.disconnect();
                }
                Ok(())
            }));
        }
        let sampler = {
            let (stop, rpo, missing, peaks) = (stop.clone(), rpo.clone(), missing.clone(), peaks.clone());
            let peak_names = peak_names.clone();
            let sm = &sm;
            scope.spawn(move || {
                let warmup = Instant::now();
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_secs(1));
                    for (i, pid) in pids.iter().enumerate() {
                        let now = proc_status(*pid);
                        if let Ok(mut p) = peaks.lock() {
                            if now.threads > p[i].1 {
                                if let (Some(pid), Ok(mut names)) = (pid, peak_names.lock()) {
                                    names[i] = threads_by_name(*pid);
                                }
                            }
                            p[i] = (p[i].0.max(now.peak_rss_mib), p[i].1.max(now.threads));
                        }
                    }
                    if warmup.elapsed() < Duration::from_secs(5) {
                        continue;
                    }
                    let Ok(scrape) = sm.get_bytes("/metrics") else { continue };
                    let samples = rpo_samples(&String::from_utf8_lossy(&scrape));
                    let mut seen: Vec<&str> = samples.iter().map(|(l, _)| l.as_str()).collect();
                    seen.sort_unstable();
                    seen.dedup();
                    if let (Ok(mut r), Ok(mut m)) = (rpo.lock(), missing.lock()) {
                        *m += vpgs.saturating_sub(seen.len());
                        r.extend(samples.iter().map(|(_, s)| s * 1000.0));
                    }
                }
            })
        };
        while start.elapsed() < Duration::from_secs(seconds) && !handles.iter().any(|h| h.is_finished()) {
            std::thread::sleep(Duration::from_millis(200));
        }
        stop.store(true, Ordering::Relaxed);
        for h in handles {
            h.join().map_err(|_| anyhow::anyhow!("a writer panicked"))??;
        }
        let _ = sampler.join();
        Ok(())
    })?;
    let elapsed = start.elapsed().as_secs_f64();
    let achieved = *written.lock().map_err(|_| anyhow::anyhow!("poisoned"))? as f64 / elapsed;
    let mut samples = rpo.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.clone();
    let missing = *missing.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
    let peaks = *peaks.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
    let (p50, p99) = (percentile(&mut samples, 0.5), percentile(&mut samples, 0.99));
    let worst = samples.iter().copied().fold(0.0, f64::max);
    println!("scale benchmark: {} disks of {} MiB in {} VPGs, checkpoints every 1 s", a.disks, a.disk_mib, a.vpgs);
    println!(
        "  setup: defined in {:.1} s, all protecting after {:.1} s",
        defined.as_secs_f64(),
        protecting.as_secs_f64()
    );
    println!(
        "  load {:.0} MB/s (asked {} MB/s) for {elapsed:.0} s: RPO p50 {p50:.0} ms, p99 {p99:.0} ms, worst {worst:.0} ms \
         (goal p99 <= 2000 ms; {} samples, {missing} VPG-samples without a durable checkpoint)",
        achieved / 1e6,
        a.rate_mb,
        samples.len()
    );
    for (i, role) in ["protected VDSA", "recovery VDSA"].iter().enumerate() {
        println!(
            "  {role}: peak RSS {:.0} MiB (goal <= 1024), threads at most {} ({:.2} per disk)",
            peaks[i].0,
            peaks[i].1,
            peaks[i].1 as f64 / a.disks as f64
        );
        let names = peak_names.lock().map(|n| n[i].clone()).unwrap_or_default();
        let names: Vec<String> = names.iter().map(|(name, n)| format!("{name} {n}")).collect();
        println!("    by name then: {}", names.join(", "));
    }
    for mut agent in agents {
        agent.stop();
    }
    sm.stop();
    Ok(())
}
