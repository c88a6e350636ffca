//! Site manager benchmarks, on real processes over loopback:
//!
//! 1. The checkpoint barrier: its hold (first PREPARE to last decision,
//!    what the guests feel), p50 and p99, with 3 and with 16 protected
//!    VDSAs while their guests write 20 MB/s in all (4 KiB random writes).
//! 2. Guest write latency p99 with a checkpoint every second against none,
//!    in the same run (the VPG's interval is changed through the API).
//! 3. The VPG list call with 1,000 VPGs: latency p50 and p99 (against 10
//!    VPGs in the same process), and the site manager's RSS.
//!
//! `cargo bench -p integration --bench site_manager [-- --hosts 3,16 --seconds 15 --vpgs 1000]`

use anyhow::{bail, Context, Result};
use integration::kvm_lab::qemu_available;
use integration::measure::percentile;
use integration::site_lab::{ProtectedSite, SiteManagerProcess, SiteSpec};
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

struct Args {
    hosts: Vec<usize>,
    seconds: u64,
    vpgs: usize,
}

fn args() -> Result<Args> {
    let mut a = Args { hosts: vec![3, 16], seconds: 15, vpgs: 1000 };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        match k.as_str() {
            "--hosts" => {
                a.hosts = it.next().context("--hosts N,M")?.split(',').map(str::parse).collect::<Result<_, _>>()?
            }
            "--seconds" => a.seconds = it.next().context("--seconds N")?.parse()?,
            "--vpgs" => a.vpgs = it.next().context("--vpgs N")?.parse()?,
            "--bench" => {}
            other => bail!("unknown argument {other}"),
        }
    }
    Ok(a)
}

/// Guests writing `bytes_per_sec` in all, 4 KiB at random offsets, paced;
/// each write's latency (µs) goes into the shared list while `record`.
fn writers(
    site: &ProtectedSite,
    disk_bytes: u64,
    bytes_per_sec: u64,
    stop: Arc<AtomicBool>,
    lat: Arc<Mutex<Vec<f64>>>,
) -> Result<Vec<std::thread::JoinHandle<Result<()>>>> {
    let per = bytes_per_sec / site.vms.len() as u64;
    let mut out = Vec::new();
    for (i, vm) in site.vms.iter().enumerate() {
        let mut g = vm.guest()?;
        let (stop, lat) = (stop.clone(), lat.clone());
        out.push(std::thread::spawn(move || -> Result<()> {
            let mut rng = rand::rngs::StdRng::seed_from_u64(i as u64);
            let mut buf = vec![0u8; 4096];
            let interval = Duration::from_secs_f64(4096.0 / per as f64);
            let mut next = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                rng.fill(&mut buf[..]);
                let off = rng.gen_range(0..disk_bytes / 4096) * 4096;
                let t = Instant::now();
                g.write(off, &buf)?;
                let us = t.elapsed().as_secs_f64() * 1e6;
                if let Ok(mut l) = lat.lock() {
                    l.push(us);
                }
                next += interval;
                if let Some(d) = next.checked_duration_since(Instant::now()) {
                    std::thread::sleep(d);
                }
            }
            Ok(())
        }));
    }
    Ok(out)
}

/// (busy, total) jiffies of all CPUs.
fn cpu_jiffies() -> (u64, u64) {
    let s = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<u64> =
        s.lines().next().unwrap_or("").split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    let total: u64 = v.iter().sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

fn holds(sm: &SiteManagerProcess, vpg: &str, after: u64) -> Result<Vec<f64>> {
    let cps = sm.get(&format!("/api/v1/vpgs/{vpg}/checkpoints"))?;
    Ok(cps
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter(|c| c["id"].as_u64().unwrap_or(0) > after && c["consistent"] == true)
        .filter_map(|c| c["hold_us"].as_u64())
        .map(|us| us as f64 / 1000.0)
        .collect())
}

fn barrier(lab: &Path, hosts: usize, seconds: u64) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let disk_bytes = 64 << 20;
    let spec = SiteSpec {
        hosts,
        disk_bytes,
        site_manager_args: Vec::new(),
        vdsa_args: Vec::new(),
        checkpoint_interval_ms: 3_600_000,
        quiesce_hook: Vec::new(),
        disk_image: None,
        recovery_vsphere_host: None,
        recovery_link_proxy: false,
    };
    let site = ProtectedSite::start(lab, dir.path(), &spec, |m| eprintln!("  {m}"))?;
    let sm = site.sm()?;
    let vpg = site.vpg.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let lat = Arc::new(Mutex::new(Vec::new()));
    let threads = writers(&site, disk_bytes, 20 << 20, stop.clone(), lat.clone())?;
    // Phase 1: no checkpoints.
    std::thread::sleep(Duration::from_secs(seconds));
    let mut none: Vec<f64> = std::mem::take(&mut *lat.lock().map_err(|_| anyhow::anyhow!("poisoned"))?);
    // Phase 2: a checkpoint every second.
    let newest = sm.get(&format!("/api/v1/vpgs/{vpg}/checkpoints"))?.as_array().and_then(|a| a.last().cloned());
    let after = newest.and_then(|c| c["id"].as_u64()).unwrap_or(0);
    let mut v: Value = sm.get(&format!("/api/v1/vpgs/{vpg}"))?;
    v["settings"]["checkpoint_interval_ms"] = json!(1000);
    sm.call("PUT", &format!("/api/v1/vpgs/{vpg}"), Some(v["settings"].clone()))?;
    std::thread::sleep(Duration::from_secs(seconds));
    let mut with: Vec<f64> = std::mem::take(&mut *lat.lock().map_err(|_| anyhow::anyhow!("poisoned"))?);
    let mut every_second = holds(sm, &vpg, after)?;
    // Phase 3: checkpoints back to back, for the hold's distribution.
    let last = sm.get(&format!("/api/v1/vpgs/{vpg}/checkpoints"))?.as_array().and_then(|a| a.last().cloned());
    let after = last.and_then(|c| c["id"].as_u64()).unwrap_or(0);
    let cpu0 = cpu_jiffies();
    for i in 0..100 {
        let r = sm.post(&format!("/api/v1/vpgs/{vpg}/checkpoints"), json!({"name": format!("b{i}")}))?;
        let id = r["id"].as_u64().context("id")?;
        sm.get(&format!("/api/v1/vpgs/{vpg}/checkpoints/{id}/wait?timeout_ms=5000"))?;
    }
    let cpu1 = cpu_jiffies();
    let busy = (cpu1.0 - cpu0.0) as f64 / (cpu1.1 - cpu0.1).max(1) as f64 * 100.0;
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().map_err(|_| anyhow::anyhow!("a writer panicked"))??;
    }
    let mut b2b = holds(sm, &vpg, after)?;
    let (n0, n1) = (none.len(), with.len());
    let (p99_none, p99_with) = (percentile(&mut none, 0.99), percentile(&mut with, 0.99));
    println!(
        "barrier, {hosts} protected VDSAs, 20 MB/s of 4 KiB guest writes: hold p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms \
         ({} back-to-back checkpoints; CPUs {busy:.0}% busy, load {}); with 1 s checkpoints hold p50 {:.2} ms p99 {:.2} ms ({})",
        percentile(&mut b2b, 0.5),
        percentile(&mut b2b, 0.99),
        percentile(&mut b2b, 1.0),
        b2b.len(),
        load.split_whitespace().next().unwrap_or("?"),
        percentile(&mut every_second, 0.5),
        percentile(&mut every_second, 0.99),
        every_second.len(),
    );
    println!(
        "guest write latency, {hosts} hosts: p99 {:.0} µs with a checkpoint every second vs {:.0} µs with none: ratio {:.2} \
         ({n1} and {n0} writes; p50 {:.0} vs {:.0} µs)",
        p99_with,
        p99_none,
        p99_with / p99_none,
        percentile(&mut with, 0.5),
        percentile(&mut none, 0.5),
    );
    Ok(())
}

fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()
}

/// The list call's latency, request sent to body received (the client's
/// JSON parsing is not the server's time).
fn list_latency(sm: &SiteManagerProcess, n: usize, want: usize) -> Result<(f64, f64)> {
    let mut v = Vec::new();
    for _ in 0..n {
        let t = Instant::now();
        let body = sm.get_bytes("/api/v1/vpgs")?;
        v.push(t.elapsed().as_secs_f64() * 1000.0);
        let l: Value = serde_json::from_slice(&body)?;
        if l.as_array().map(Vec::len) != Some(want) {
            bail!("the list does not hold {want} VPGs");
        }
    }
    Ok((percentile(&mut v, 0.5), percentile(&mut v, 0.99)))
}

fn vpg_list(lab: &Path, vpgs: usize) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let sm = SiteManagerProcess::start(lab, dir.path(), &[])?;
    let site = sm.get("/api/v1/site")?["id"].as_str().context("site")?.to_string();
    let host = sm.post("/api/v1/hosts", json!({"name": "kvm-1", "hypervisor": "kvm"}))?;
    let host = host["id"].as_str().context("host")?.to_string();
    let make = |i: usize| {
        json!({"name": format!("vpg-{i}"), "recovery_site": site, "checkpoint_interval_ms": 60_000, "vms": [{
            "id": uuid::Uuid::new_v4(), "name": format!("vm-{i}"), "host": host, "recovery_host": host,
            "disks": [{"id": uuid::Uuid::new_v4(), "name": format!("vm-{i}-disk"), "size_bytes": 1u64 << 30}]}]})
    };
    let base = 10;
    for i in 0..base {
        sm.post("/api/v1/vpgs", make(i))?;
    }
    let (b50, b99) = list_latency(&sm, 200, base)?;
    let rss_base = sm.pid().and_then(rss_kib).unwrap_or(0);
    let t = Instant::now();
    for i in base..vpgs {
        sm.post("/api/v1/vpgs", make(i))?;
    }
    let create_ms = t.elapsed().as_secs_f64() * 1000.0 / (vpgs - base) as f64;
    let (p50, p99) = list_latency(&sm, 200, vpgs)?;
    let rss = sm.pid().and_then(rss_kib).unwrap_or(0);
    println!(
        "VPG list: {vpgs} VPGs p50 {p50:.1} ms p99 {p99:.1} ms; {base} VPGs p50 {b50:.1} ms p99 {b99:.1} ms; \
         site manager RSS {:.1} MiB with {vpgs} VPGs ({:.1} MiB with {base}); create {create_ms:.1} ms per VPG",
        rss as f64 / 1024.0,
        rss_base as f64 / 1024.0,
    );
    Ok(())
}

fn main() -> Result<()> {
    let a = args()?;
    let lab = Path::new(env!("CARGO_BIN_EXE_lab"));
    vpg_list(lab, a.vpgs)?;
    if !qemu_available() {
        bail!("qemu-storage-daemon is missing (apt-get install qemu-utils)");
    }
    for h in &a.hosts {
        barrier(lab, *h, a.seconds)?;
    }
    Ok(())
}
