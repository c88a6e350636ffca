//! vSphere benchmark against the vCenter simulator (vcsim from Debian's
//! govmomi) on loopback:
//!
//! 1. deploying the VDSA OVA (built by `packaging` from the real binary) to
//!    32 hosts with the deploys in parallel vs one after another, each on a
//!    fresh simulator; with no added latency and with a per-call delay that
//!    stands for a vCenter across a WAN;
//! 2. retrieving 1,000 VMs with their disks, NICs and extra config in one
//!    PropertyCollector round-trip series (a container view), against the
//!    baseline of one retrieval per VM; with no added latency and with the
//!    per-call delay.
//!
//! `cargo bench -p integration --bench vsphere [-- --reps N --delay-ms N --vms N]`

use std::net::Ipv4Addr;
use std::time::Instant;

use anyhow::{ensure, Result};
use integration::vcsim::{Vcsim, VcsimOptions};
use integration::vsphere_lab::{build_vdsa_ova, lab_settings, lab_trust, LAB_PASSWORD, LAB_USER};
use site_manager::vsphere::{VdsaState, VsphereSite};
use vsphere_client::{Client, Ova};

struct Args {
    reps: usize,
    delay_ms: u32,
    vms: u32,
}

fn args() -> Args {
    let mut a = Args { reps: 3, delay_ms: 20, vms: 1000 };
    let v: Vec<String> = std::env::args().collect();
    let mut i = 1;
    while i + 1 < v.len() {
        match v[i].as_str() {
            "--reps" => a.reps = v[i + 1].parse().unwrap_or(a.reps),
            "--delay-ms" => a.delay_ms = v[i + 1].parse().unwrap_or(a.delay_ms),
            "--vms" => a.vms = v[i + 1].parse().unwrap_or(a.vms),
            _ => {
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    a
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Deploys to all 32 hosts of a fresh simulator, `parallel` at a time;
/// returns the seconds it took and checks every host shows installed.
fn deploy_32(ova: &Ova, parallel: usize, delay_ms: u32) -> Result<f64> {
    let sim =
        Vcsim::start(&VcsimOptions { clusters: 2, hosts_per_cluster: 16, vms: 0, delay_ms, ..Default::default() })?;
    let site = VsphereSite::connect(&sim.url, lab_trust(&sim)?, LAB_USER, LAB_PASSWORD)?;
    let mut reqs = site.plan_cluster("DC0_C0", &lab_settings(Ipv4Addr::new(10, 0, 0, 10)))?.requests;
    reqs.extend(site.plan_cluster("DC0_C1", &lab_settings(Ipv4Addr::new(10, 0, 1, 10)))?.requests);
    ensure!(reqs.len() == 32, "{} hosts", reqs.len());
    let t = Instant::now();
    let results = site.deploy_many(ova, &reqs, parallel, &|_, _| {})?;
    let secs = t.elapsed().as_secs_f64();
    for (h, r) in &results {
        ensure!(r.is_ok(), "{h}: {r:?}");
    }
    let hosts = site.hosts()?;
    ensure!(hosts.iter().filter(|h| h.state == VdsaState::Installed).count() == 32, "not all installed");
    Ok(secs)
}

fn main() -> Result<()> {
    let a = args();
    let dir = tempfile::tempdir()?;
    let ova_path = build_vdsa_ova(dir.path())?;
    let ova = Ova::open(&ova_path)?;
    println!(
        "vsphere bench: OVA {} bytes; 32 hosts (2 clusters of 16) on vcsim; {} reps, alternating serial and parallel",
        std::fs::metadata(&ova_path)?.len(),
        a.reps
    );
    for delay in [0, a.delay_ms] {
        let (mut serial, mut parallel) = (Vec::new(), Vec::new());
        for rep in 0..a.reps {
            // Alternate which runs first, against drift in the machine.
            let order = if rep % 2 == 0 { [1, 32] } else { [32, 1] };
            for p in order {
                let s = deploy_32(&ova, p, delay)?;
                println!(
                    "  delay {delay:>3} ms/call  rep {rep}  {:<9} {:>7.3} s",
                    if p == 1 { "serial" } else { "parallel" },
                    s
                );
                if p == 1 {
                    serial.push(s)
                } else {
                    parallel.push(s)
                }
            }
        }
        let (s, p) = (median(serial), median(parallel));
        println!(
            "deploy to 32 hosts, {delay} ms per SOAP call: serial {s:.3} s, parallel (32 at once) {p:.3} s: parallel takes {:.3} of serial ({:.1}x faster)",
            p / s,
            s / p
        );
    }

    // Inventory of many VMs.
    let sim = Vcsim::start(&VcsimOptions {
        clusters: 1,
        hosts_per_cluster: 4,
        standalone_hosts: 0,
        vms: a.vms,
        ..Default::default()
    })?;
    let client = Client::connect(&sim.url, lab_trust(&sim)?)?;
    client.login(LAB_USER, LAB_PASSWORD)?;
    let (mut series, mut per_vm) = (Vec::new(), Vec::new());
    let mut disks = 0;
    for rep in 0..a.reps {
        let t = Instant::now();
        let vms = client.vms()?;
        series.push(t.elapsed().as_secs_f64());
        ensure!(vms.len() as u32 == a.vms, "{} VMs retrieved, {} expected", vms.len(), a.vms);
        disks = vms.iter().map(|v| v.disks.len()).sum::<usize>();
        ensure!(vms.iter().all(|v| !v.disks.is_empty() && v.host.is_some()), "a VM without disks or host");
        // Baseline: one retrieval per VM (what a client without a view does).
        let t = Instant::now();
        for v in &vms {
            client.vm(&v.moref)?;
        }
        per_vm.push(t.elapsed().as_secs_f64());
        println!(
            "  rep {rep}: one series {:.3} s; one call per VM {:.3} s",
            series[series.len() - 1],
            per_vm[per_vm.len() - 1]
        );
    }
    let (s, b) = (median(series), median(per_vm));
    println!(
        "inventory of {} VMs ({disks} disks) in one round-trip series (view + RetrievePropertiesEx + DestroyView): {:.3} s, {:.0} VMs/s; one call per VM: {:.3} s; ratio {:.3}",
        a.vms,
        s,
        a.vms as f64 / s,
        b,
        s / b
    );
    drop(sim);

    // The same over a distant vCenter: every call waits `delay_ms`.
    let sim = Vcsim::start(&VcsimOptions {
        clusters: 1,
        hosts_per_cluster: 4,
        standalone_hosts: 0,
        vms: a.vms,
        delay_ms: a.delay_ms,
        ..Default::default()
    })?;
    let client = Client::connect(&sim.url, lab_trust(&sim)?)?;
    client.login(LAB_USER, LAB_PASSWORD)?;
    let t = Instant::now();
    let vms = client.vms()?;
    let s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    for v in &vms {
        client.vm(&v.moref)?;
    }
    let b = t.elapsed().as_secs_f64();
    println!(
        "inventory of {} VMs at {} ms per SOAP call: one series {:.3} s; one call per VM {:.3} s; ratio {:.4}",
        vms.len(),
        a.delay_ms,
        s,
        b,
        s / b
    );
    Ok(())
}
