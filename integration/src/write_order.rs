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

use crate::site_lab::{ProtectedSite, SiteSpec};
use anyhow::{bail, Context, Result};
use protection_groups::CheckpointId;
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
    /// A SIGKILL between PREPARE and COMMIT, after this many barriers.
    pub fault: Option<(Fault, u64)>,
    /// Change the protected VMs while the workload runs: a disk added to
    /// the first VM, then removed, then the third VM moved to the second
    /// host (its stream handed over).
    pub changes: bool,
}

/// Who is killed between PREPARE and COMMIT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The VDSA of the second protected host, after answering PREPARE.
    Vdsa,
    /// The site manager, after sending PREPARE.
    SiteManager,
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
    /// The longest a guest write took, per protected host (ms).
    pub max_write_ms: Vec<u64>,
    /// The checkpoint in flight when the fault struck, and its record.
    pub faulted: Option<(u64, Option<Value>)>,
    /// Checkpoints offered after the faulted one (protection resumed).
    pub offered_after_fault: usize,
    /// The changes made, each with the newest checkpoint before it.
    pub changes: Vec<(String, u64)>,
    /// Checkpoints offered after the last change.
    pub offered_after_changes: usize,
    /// With the changes: how vm-1's grown disk looked in the offered
    /// checkpoints (each checkpoint's size, in id order).
    pub grown_disk_sizes: Vec<(u64, u64)>,
    /// What is wrong with those sizes (a checkpoint from before the
    /// resize with the new size, a size that went back, the last offered
    /// checkpoint without the new size).
    pub size_problems: Vec<String>,
    /// At the end, before the VDSAs stop: per VM, tap target nodes whose
    /// job is gone (left by a tap that ended, not removed).
    pub stray_tap_nodes: Vec<Vec<String>>,
}

/// The VM changes of [`WriteOrderOptions::changes`], in order.
/// The grow comes last: the lab's stand-in VM takes its guest export back
/// on top of the new tap's filter node, and a later detach of that tap
/// (the move replaces vm-1's role) is not what the test is about.
const CHANGES: [&str; 4] =
    ["add a disk to vm-0", "remove that disk", "move vm-2 to kvm-1", "grow vm-1's disk by 4 MiB"];

/// vm-1's disk after the grow.
const GROWN_BYTES: u64 = DISK_BYTES + (4 << 20);

/// Makes change `step` through the API (and, for a new disk, in the VM).
/// `paused` (vm-1's guest is paused) is set while vm-1's disk is grown.
fn change_vms(site: &mut ProtectedSite, dir: &Path, vpg: &str, step: usize, paused: &AtomicBool) -> Result<()> {
    let sm = site.sm()?;
    let mut settings = sm.get(&format!("/api/v1/vpgs/{vpg}"))?["settings"].clone();
    let vms = settings["vms"].as_array_mut().context("vms")?;
    match step {
        0 => {
            // A second disk in the first VM, as a hypervisor adds one.
            let image = dir.join("vm-0/extra.raw");
            std::fs::File::create(&image)?.set_len(4 << 20)?;
            site.vms[0].qmp.execute(
                "blockdev-add",
                json!({"driver": "raw", "node-name": "extra",
                       "file": {"driver": "file", "filename": image.to_string_lossy()}}),
            )?;
            let disks = vms[0]["disks"].as_array_mut().context("disks")?;
            disks.push(json!({"id": uuid::Uuid::new_v4(), "name": "vm-0-extra", "size_bytes": 4u64 << 20,
                              "device": "extra"}));
        }
        1 => {
            let disks = vms[0]["disks"].as_array_mut().context("disks")?;
            disks.retain(|d| d["name"] != "vm-0-extra");
        }
        // The operator grows a protected disk through the site manager; its
        // VDSA detaches the tap (QEMU resizes no mirrored node), resizes it
        // and attaches again. The lab's VM hands its guest the disk through
        // an NBD export, which QEMU never lets be resized: like a guest
        // paused for it, the export goes while the VDSA resizes, and comes
        // back on top of the new tap's filter (as a VM's device stays above
        // it; on `src` itself its writes would pass the tap by).
        3 => {
            vms[1]["disks"][0]["size_bytes"] = json!(GROWN_BYTES);
            paused.store(true, Ordering::SeqCst);
            let qmp = &mut site.vms[1].qmp;
            let job_ids = |jobs: &Value| -> Vec<String> {
                let ids = jobs.as_array().map(|a| a.iter().filter_map(|j| j["device"].as_str()).map(str::to_string));
                ids.map(Iterator::collect).unwrap_or_default()
            };
            let before = job_ids(&qmp.execute("query-block-jobs", json!({}))?);
            qmp.execute("block-export-del", json!({"id": "exp0", "mode": "hard"}))?;
            let sm = site.sm()?;
            sm.call("PUT", &format!("/api/v1/vpgs/{vpg}"), Some(settings))?;
            let qmp = &mut site.vms[1].qmp;
            let start = Instant::now();
            let job = loop {
                let jobs = qmp.execute("query-block-jobs", json!({}))?;
                let ready = jobs.as_array().and_then(|a| a.iter().find(|j| j["ready"] == true)).map(|j| &j["device"]);
                if let Some(id) = ready.and_then(Value::as_str).filter(|id| !before.iter().any(|b| b == id)) {
                    break id.to_string();
                }
                if start.elapsed() > Duration::from_secs(60) {
                    bail!("vm-1's disk was not grown and tapped again within 60 s: {jobs}");
                }
                std::thread::sleep(Duration::from_millis(100));
            };
            qmp.execute(
                "block-export-add",
                json!({"type": "nbd", "id": "exp0", "node-name": format!("{job}-filter"), "name": "vmdisk",
                       "writable": true}),
            )?;
            paused.store(false, Ordering::SeqCst);
            return Ok(());
        }
        _ => {
            vms[2]["host"] = json!(site.host_ids[1]);
        }
    }
    let sm = site.sm()?;
    sm.call("PUT", &format!("/api/v1/vpgs/{vpg}"), Some(settings))?;
    Ok(())
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

/// What is wrong with vm-1's disk size across the offered checkpoints
/// (`sizes`, in id order): before the grow it is the old size, it never
/// goes back, and the newest offered checkpoint has the new size.
fn check_grown_sizes(sizes: &[(u64, u64)], changes: &[(String, u64)]) -> Vec<String> {
    let mut problems = Vec::new();
    let before = changes.iter().find(|(c, _)| c == CHANGES[3]).map(|(_, id)| *id);
    let mut last = 0;
    for &(id, size) in sizes {
        if size != DISK_BYTES && size != GROWN_BYTES {
            problems.push(format!("checkpoint {id}: vm-1's disk is {size} bytes"));
        }
        if before.is_none_or(|b| id <= b) && size != DISK_BYTES {
            problems.push(format!("checkpoint {id}, from before the grow, has {size} bytes"));
        }
        if size < last {
            problems.push(format!("checkpoint {id}: vm-1's disk went back from {last} to {size} bytes"));
        }
        last = size;
    }
    if sizes.last().is_none_or(|&(_, s)| s != GROWN_BYTES) {
        problems.push(format!("the newest offered checkpoint does not have the grown disk: {:?}", sizes.last()));
    }
    problems
}

fn slot_of(id: u64) -> (usize, u64) {
    ((id % HOSTS as u64) as usize, (id / HOSTS as u64) % SLOTS)
}

/// What the site saw (the VPG's record and the ends of the protected
/// VDSAs' logs), so a failure can be understood from the output alone.
fn what_the_site_saw(site: &mut ProtectedSite, vpg: &str) -> String {
    let vpg_now = site.sm().and_then(|sm| sm.get(&format!("/api/v1/vpgs/{vpg}"))).map(|v| v.to_string());
    let mut out = format!("VPG {vpg_now:?}");
    for (h, agent) in site.agents.iter().enumerate().take(HOSTS) {
        let log = crate::process::last_lines(&agent.log_text(), 20);
        out.push_str(&format!("\nthe log of kvm-{h}'s VDSA ends:\n{log}"));
    }
    for (h, vm) in site.vms.iter_mut().enumerate() {
        out.push_str(&format!("\nvm-{h}'s {}", vm.report()));
    }
    out
}

/// Runs the scenario in `dir` with `lab` (whose `lab vdsa` and `lab
/// site-manager` are the daemons); `say` hears progress.
pub fn run(lab: &Path, dir: &Path, o: &WriteOrderOptions, mut say: impl FnMut(String)) -> Result<WriteOrderReport> {
    let mut sm_args: Vec<String> = Vec::new();
    if o.control {
        sm_args.push("--unsafe-no-barrier".into());
    }
    let fault_arg = |f: Fault| match o.fault {
        Some((g, n)) if g == f => vec!["--fault-kill-after-prepare".to_string(), n.to_string()],
        _ => Vec::new(),
    };
    sm_args.extend(fault_arg(Fault::SiteManager));
    let spec = SiteSpec {
        hosts: HOSTS,
        disk_bytes: DISK_BYTES,
        site_manager_args: sm_args,
        vdsa_args: vec![(1, fault_arg(Fault::Vdsa))],
        checkpoint_interval_ms: 3_600_000,
        quiesce_hook: Vec::new(),
        disk_image: None,
        recovery_vsphere_host: None,
        recovery_link_proxy: false,
    };
    let mut site = ProtectedSite::start(lab, dir, &spec, &mut say)?;
    let plain: Vec<&str> = if o.control { vec!["--unsafe-no-barrier"] } else { Vec::new() };
    let guests: Vec<_> = site.vms.iter().map(|q| q.guest()).collect::<Result<_>>()?;
    let sockets: Vec<_> = site.vms.iter().map(|q| q.guest_sock.clone()).collect();
    // With the changes, vm-1's guest waits while it is paused for a
    // resize, then connects again and repeats the write its export's going
    // cut short.
    let reconnect = o.changes;
    let paused = Arc::new(AtomicBool::new(false));
    let paused2 = paused.clone();
    let vpg = site.vpg.clone();
    let disks = site.disks.clone();

    // The chain: one writer, host by host, each write completed (the tap
    // acknowledged it) before the next is issued.
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    let (stop2, written2) = (stop.clone(), written.clone());
    let writer = std::thread::spawn(move || -> Result<Vec<u64>> {
        let mut guests = guests;
        let mut id = 1u64;
        let mut max_ms = vec![0u64; HOSTS];
        while !stop2.load(Ordering::Relaxed) {
            let (host, slot) = slot_of(id);
            let t = Instant::now();
            let wait_paused = || {
                while host == 1 && paused2.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(10));
                }
            };
            wait_paused();
            while let Err(e) = guests[host].write(slot * BLOCK as u64, &record(id)) {
                if !reconnect || t.elapsed() > Duration::from_secs(90) {
                    return Err(e).with_context(|| format!("guest write {id} on host {host}"));
                }
                std::thread::sleep(Duration::from_millis(50));
                wait_paused();
                if let Ok(g) = vdsa::nbd::client::NbdClient::connect_unix(&sockets[host], "vmdisk") {
                    guests[host] = g;
                }
            }
            max_ms[host] = max_ms[host].max(t.elapsed().as_millis() as u64);
            written2.store(id, Ordering::Relaxed);
            id += 1;
        }
        Ok(max_ms)
    });
    let mut rng = o.seed.max(1);
    let mut inserted = Vec::new();
    let mut faulted: Option<u64> = None;
    let mut changes: Vec<(String, u64)> = Vec::new();
    let started = Instant::now();
    let mut i = 0;
    let mut extra_since: Option<Instant> = None;
    loop {
        let done = i >= o.checkpoints;
        let durable_after = |after: Option<u64>| {
            after.is_none_or(|f| inserted.iter().any(|(id, w): &(u64, Value)| *id > f && w["durable"] == true))
        };
        let resumed = durable_after(faulted) && durable_after(changes.last().map(|(_, id)| *id));
        if done && (o.fault.is_none() || faulted.is_some()) && resumed {
            break;
        }
        if done && extra_since.get_or_insert_with(Instant::now).elapsed() > Duration::from_secs(120) {
            let last = inserted.last().map(|(_, w)| w.to_string()).unwrap_or_default();
            bail!(
                "protection did not resume after the fault (faulted checkpoint {faulted:?}) or the changes \
                 ({changes:?}); last checkpoint {last}; {}",
                what_the_site_saw(&mut site, &vpg)
            );
        }
        let api = site.sm()?;
        let attempt =
            api.post(&format!("/api/v1/vpgs/{vpg}/checkpoints"), json!({"name": format!("wo-{i}")})).and_then(|r| {
                let id = r["id"].as_u64().context("checkpoint id")?;
                let w = api.get(&format!("/api/v1/vpgs/{vpg}/checkpoints/{id}/wait?timeout_ms=20000"))?;
                Ok((id, w))
            });
        match attempt {
            Ok((id, w)) => inserted.push((id, w)),
            Err(e) if o.fault.is_some_and(|(f, _)| f == Fault::SiteManager) && faulted.is_none() => {
                // The site manager died between PREPARE and COMMIT: start
                // it again (a new generation) and go on.
                say(format!("the site manager died mid-barrier ({e:#}); restarting it"));
                faulted = Some(inserted.last().map_or(0, |(id, _)| *id) + 1);
                site.restart_site_manager(lab, &plain)?;
            }
            Err(e) => return Err(e.context(format!("changes {changes:?}; {}", what_the_site_saw(&mut site, &vpg)))),
        }
        if o.fault.is_some_and(|(f, _)| f == Fault::Vdsa) && faulted.is_none() && !site.agents[1].is_running() {
            let (id, _) = inserted.last().cloned().unwrap_or((0, Value::Null));
            say(format!("the VDSA of kvm-1 died between PREPARE and COMMIT of checkpoint {id}; restarting it"));
            faulted = Some(id);
            site.restart_agent(lab, dir, 1, &[])?;
        }
        // Each change waits until a checkpoint after the one before was
        // offered: protection resumed.
        let step = changes.len();
        let settled = changes.last().is_none_or(|(_, before)| {
            inserted.iter().any(|(id, w): &(u64, Value)| id > before && w["durable"] == true)
        });
        if o.changes && settled && step < CHANGES.len() && i >= (step + 1) * o.checkpoints / (CHANGES.len() + 1) {
            let before = inserted.last().map_or(0, |(id, _)| *id);
            change_vms(&mut site, dir, &vpg, step, &paused)?;
            say(format!("changed the VMs: {} (after checkpoint {before})", CHANGES[step]));
            changes.push((CHANGES[step].to_string(), before));
        }
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        std::thread::sleep(Duration::from_millis(rng % 20));
        i += 1;
        if i % 10 == 0 {
            say(format!("{i} checkpoints, {} chain writes", written.load(Ordering::Relaxed)));
        }
    }
    stop.store(true, Ordering::Relaxed);
    let max_write_ms = writer.join().map_err(|_| anyhow::anyhow!("the writer panicked"))??;
    let writes = written.load(Ordering::Relaxed);
    let sm = site.sm()?;
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
    let stray_tap_nodes = site
        .vms
        .iter_mut()
        .map(|vm| if vm.is_running() { vm.stray_tap_nodes() } else { Ok(Vec::new()) })
        .collect::<Result<Vec<_>>>()?;
    // Stop the sources (drained), then the recovery VDSA (journal synced).
    for a in site.agents.iter_mut() {
        a.stop();
    }
    let journal = Journal::open(site.agents[HOSTS].journal(&vpg), JournalConfig::default())?;
    let faulted = faulted.map(|id| (id, records.iter().find(|c| c["id"].as_u64() == Some(id)).cloned()));
    let offered_after_fault = faulted.as_ref().map_or(0, |(f, _)| offered.iter().filter(|id| *id > f).count());
    if let Some((id, _)) = &faulted {
        if offered.contains(id) {
            bail!("checkpoint {id}, in flight when the fault struck, is offered as consistent and durable");
        }
    }
    let mut report = WriteOrderReport {
        inserted: inserted.len(),
        writes,
        max_write_ms,
        faulted,
        offered_after_fault,
        stray_tap_nodes,
        offered_after_changes: changes.last().map_or(0, |(_, c)| offered.iter().filter(|id| *id > c).count()),
        changes,
        ..Default::default()
    };
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
        if o.changes {
            report.grown_disk_sizes.push((id, view.disk_size(disks[1])?));
        }
    }
    if o.changes {
        report.size_problems = check_grown_sizes(&report.grown_disk_sizes, &report.changes);
    }
    Ok(report)
}
