//! Write order across hosts: one VPG with a VM on each of three protected
//! hosts (each a qemu-storage-daemon whose disk its host's `vdsa agent`
//! taps through QEMU's block mirror), recovering to a fourth VDSA, under a
//! real site manager. The workload makes causal chains across hosts: a
//! write completes on one host, then the next write, on the next host,
//! records the id of the one before. Checkpoints are inserted back to back
//! through the API. On every checkpoint the site manager offers (consistent
//! and durable), each recorded reference must point to a write the
//! checkpoint holds. A control run with the barrier switched off must find
//! violations.

use crate::kvm_lab::StorageDaemon;
use crate::site_lab::{AgentProcess, SiteManagerProcess};
use anyhow::{bail, Context, Result};
use protection_groups::{CheckpointId, DiskId};
use serde_json::{json, Value};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vdsa::journal::{Journal, JournalConfig};

/// Protected hosts, one VM each.
pub const HOSTS: usize = 3;
const DISK_BYTES: u64 = 8 << 20;
/// Record slots per disk (4 KiB each) the chain cycles through.
const SLOTS: u64 = 256;
const BLOCK: usize = 4096;

#[derive(Debug, Clone)]
pub struct WriteOrderOptions {
    pub checkpoints: usize,
    pub seed: u64,
    /// The control run: the site manager takes checkpoints without the
    /// barrier.
    pub control: bool,
}

#[derive(Debug, Clone, Default)]
pub struct WriteOrderReport {
    /// Checkpoints offered (consistent and durable) and checked.
    pub checked: usize,
    /// Checkpoints inserted.
    pub inserted: usize,
    /// Recorded references whose write the checkpoint lacks.
    pub violations: usize,
    /// Chain writes made.
    pub writes: u64,
    pub first_violation: Option<String>,
}

/// One chain record: write `id` on host `id % HOSTS`, referring to write
/// `id - 1` on the host before.
fn record(id: u64) -> Vec<u8> {
    let mut b = format!("WO1 id={id} ref={}\n", id.saturating_sub(1)).into_bytes();
    b.resize(BLOCK, 0);
    b
}

fn parse(block: &[u8]) -> Option<(u64, u64)> {
    let text = std::str::from_utf8(&block[..block.iter().position(|&b| b == b'\n')?]).ok()?;
    let mut it = text.strip_prefix("WO1 ")?.split(' ');
    let id = it.next()?.strip_prefix("id=")?.parse().ok()?;
    let r = it.next()?.strip_prefix("ref=")?.parse().ok()?;
    Some((id, r))
}

fn slot_of(id: u64) -> (usize, u64) {
    ((id % HOSTS as u64) as usize, (id / HOSTS as u64) % SLOTS)
}

/// Runs the scenario in `dir` with `lab` (whose `lab vdsa` and `lab
/// site-manager` are the daemons); `say` hears progress.
pub fn run(lab: &Path, dir: &Path, o: &WriteOrderOptions, mut say: impl FnMut(String)) -> Result<WriteOrderReport> {
    let extra: &[&str] = if o.control { &["--unsafe-no-barrier"] } else { &[] };
    let sm = SiteManagerProcess::start(lab, &dir.join("site-manager"), extra)?;
    let site = sm.get("/api/v1/site")?["id"].as_str().context("site id")?.to_string();
    let mut agents = Vec::new();
    let mut host_ids = Vec::new();
    for i in 0..=HOSTS {
        let name = if i < HOSTS { format!("kvm-{i}") } else { "recovery-0".to_string() };
        let (id, token) = sm.add_host(&name)?;
        agents.push(AgentProcess::start(lab, &dir.join(&name), &name, &sm.management_address(), &token)?);
        host_ids.push(id);
    }
    sm.wait_until("/api/v1/hosts", Duration::from_secs(60), "every VDSA to register", |v| {
        v.as_array().is_some_and(|hs| hs.len() == HOSTS + 1 && hs.iter().all(|h| h["vdsa"] == "installed"))
    })?;
    say(format!("{} VDSAs registered", HOSTS + 1));
    let mut qsds = Vec::new();
    let mut vms = Vec::new();
    let mut disks = Vec::new();
    for i in 0..HOSTS {
        let d = dir.join(format!("qsd-{i}"));
        std::fs::create_dir_all(&d)?;
        let image = d.join("disk.raw");
        std::fs::write(&image, vec![0u8; DISK_BYTES as usize])?;
        let qsd = StorageDaemon::start(&d, &image, false)?;
        let disk = DiskId::new();
        disks.push(disk);
        vms.push(json!({
            "id": uuid::Uuid::new_v4(),
            "name": format!("vm-{i}"),
            "host": host_ids[i],
            "hypervisor_ref": qsd.vdsa_qmp_sock,
            "disks": [{"id": disk.0, "name": format!("vm-{i}-disk"), "size_bytes": DISK_BYTES, "device": "src"}],
            "recovery_host": host_ids[HOSTS],
        }));
        qsds.push(qsd);
    }
    let guests: Vec<_> = qsds.iter().map(|q| q.guest()).collect::<Result<_>>()?;
    let created = sm.post(
        "/api/v1/vpgs",
        json!({"name": "write-order", "recovery_site": site, "vms": vms, "checkpoint_interval_ms": 3_600_000}),
    )?;
    let vpg = created["vpg"]["id"].as_str().context("vpg id")?.to_string();
    let task = created["task"]["id"].as_str().context("task id")?.to_string();
    let t = sm.get(&format!("/api/v1/tasks/{task}/wait?timeout_ms=120000"))?;
    if t["completion"] != "Success" {
        bail!("the VPG did not reach Protecting: {t}");
    }
    say("the VPG protects: every tap is in sync".into());

    // The chain: one writer, host by host, each write completed (the tap
    // acknowledged it) before the next is issued.
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    let (stop2, written2) = (stop.clone(), written.clone());
    let writer = std::thread::spawn(move || -> Result<()> {
        let mut guests = guests;
        let mut id = 1u64;
        while !stop2.load(Ordering::Relaxed) {
            let (host, slot) = slot_of(id);
            guests[host].write(slot * BLOCK as u64, &record(id))?;
            written2.store(id, Ordering::Relaxed);
            id += 1;
        }
        Ok(())
    });
    let mut rng = o.seed.max(1);
    let mut inserted = Vec::new();
    let started = Instant::now();
    for i in 0..o.checkpoints {
        let r = sm.post(&format!("/api/v1/vpgs/{vpg}/checkpoints"), json!({"name": format!("wo-{i}")}))?;
        let id = r["id"].as_u64().context("checkpoint id")?;
        let w = sm.get(&format!("/api/v1/vpgs/{vpg}/checkpoints/{id}/wait?timeout_ms=20000"))?;
        inserted.push((id, w));
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        std::thread::sleep(Duration::from_millis(rng % 20));
        if (i + 1) % 10 == 0 {
            say(format!("{} checkpoints, {} chain writes", i + 1, written.load(Ordering::Relaxed)));
        }
    }
    stop.store(true, Ordering::Relaxed);
    writer.join().map_err(|_| anyhow::anyhow!("the writer panicked"))??;
    let writes = written.load(Ordering::Relaxed);
    // Durable at the target: the wait answered after the target listed
    // it; take the final records.
    let records: Vec<Value> =
        sm.get(&format!("/api/v1/vpgs/{vpg}/checkpoints"))?.as_array().cloned().unwrap_or_default();
    let offered: Vec<u64> = records
        .iter()
        .filter(|c| c["consistent"] == true && c["durable"] == true)
        .filter_map(|c| c["id"].as_u64())
        .filter(|id| inserted.iter().any(|(i, _)| i == id))
        .collect();
    say(format!(
        "{} of {} checkpoints offered, {writes} chain writes in {:.0} s",
        offered.len(),
        inserted.len(),
        started.elapsed().as_secs_f64()
    ));
    // Stop the sources (drained), then the recovery VDSA (journal synced).
    for a in agents.iter_mut() {
        a.stop();
    }
    drop(qsds);
    let journal = Journal::open(agents[HOSTS].journal(&vpg), JournalConfig::default())?;
    let mut report = WriteOrderReport { inserted: inserted.len(), writes, ..Default::default() };
    let recoverable: Vec<u64> =
        journal.checkpoints()?.iter().filter(|c| c.kind.is_recoverable()).map(|c| c.id.0).collect();
    for id in offered {
        if !recoverable.contains(&id) {
            bail!("checkpoint {id} is offered as durable but the recovery journal does not hold it as recoverable");
        }
        let view = journal.open_view(CheckpointId(id))?;
        let mut ids = vec![vec![0u64; SLOTS as usize]; HOSTS];
        let mut refs = Vec::new();
        let mut block = vec![0u8; BLOCK];
        for (h, disk) in disks.iter().enumerate() {
            for s in 0..SLOTS {
                view.read(*disk, s * BLOCK as u64, &mut block)?;
                if let Some((wid, r)) = parse(&block) {
                    ids[h][s as usize] = wid;
                    refs.push((wid, r));
                }
            }
        }
        for (wid, r) in refs {
            if r == 0 {
                continue;
            }
            let (h, s) = slot_of(r);
            if ids[h][s as usize] < r {
                report.violations += 1;
                report.first_violation.get_or_insert_with(|| {
                    format!("checkpoint {id}: write {wid} refers to write {r} (host {h}, slot {s}), which it lacks")
                });
            }
        }
        report.checked += 1;
    }
    Ok(report)
}
