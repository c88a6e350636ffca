//! The two-site scenario, shared by `lab` (the README's main job) and the
//! end-to-end test: three VM disks behind QEMU's block mirror replicate
//! from a source VDSA over TLS through a fault proxy to a target VDSA while
//! a guest writes and a checkpoint is taken every second. The link is cut,
//! stalled past the heartbeat, slowed to a WAN's latency and bandwidth;
//! the target and then the source are SIGKILLed (the source's restart
//! needs QEMU's full resync). At the end every checkpoint the target offers
//! as consistent must be exactly the source at that checkpoint, none taken
//! during the resync may be offered as consistent, and the newest must be
//! the source disks.

use crate::kvm_lab::{guest_write, StorageDaemon};
use crate::replication_lab::{paired_sites, wait_until, Daemon, FaultProxy, SourceSpec, TargetSpec};
use crate::workload::{GenWrite, Mix, Payload, ReferenceModel, Workload};
use anyhow::{bail, Context, Result};
use protection_groups::{CheckpointId, DiskId};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};
use vdsa::journal::{Journal, JournalConfig};
use vdsa::nbd::client::NbdClient;

/// How hard the scenario pushes.
#[derive(Debug, Clone)]
pub struct TwoSiteOptions {
    pub disk_size: u64,
    /// Seconds of guest writes; faults happen in the first two thirds.
    pub seconds: f64,
    pub cuts: usize,
    pub heartbeat_ms: u64,
    /// The source's send queue memory (`--queue-memory`); what does not
    /// fit goes to its spill file.
    pub queue_memory: String,
}

impl Default for TwoSiteOptions {
    fn default() -> Self {
        TwoSiteOptions { disk_size: 32 << 20, seconds: 30.0, cuts: 5, heartbeat_ms: 300, queue_memory: "64M".into() }
    }
}

/// What the scenario did and verified.
#[derive(Debug, Clone, Default)]
pub struct TwoSiteReport {
    pub guest_writes: u64,
    pub guest_bytes: u64,
    pub cuts: usize,
    pub stalls: usize,
    pub links_up: usize,
    pub consistent_verified: usize,
    pub inconsistent_during_resync: usize,
    pub initial_sync: Value,
    pub resync: Value,
    pub source_status: Value,
}

pub fn disk_id(name: &str) -> DiskId {
    DiskId::from_bytes(vdsa::daemon::derived_id("disk", name))
}

/// Every checkpoint the journal offers as consistent reads back exactly
/// `expected` at it, and none in `must_be_inconsistent` is offered as
/// consistent. Returns how many were checked.
pub fn verify_checkpoints(
    journal_dir: &Path,
    disks: &[String],
    expected: &BTreeMap<u64, Vec<blake3::Hash>>,
    must_be_inconsistent: &[u64],
) -> Result<usize> {
    let j = Journal::open(journal_dir, JournalConfig::default())?;
    let mut checked = 0;
    for cp in j.checkpoints()? {
        if !cp.kind.is_recoverable() {
            continue;
        }
        if must_be_inconsistent.contains(&cp.id.0) {
            bail!("checkpoint {} was taken during a resync but is offered as consistent ({:?})", cp.id.0, cp.kind);
        }
        let Some(want) = expected.get(&cp.id.0) else {
            bail!("the target offers checkpoint {} as consistent, but it was never consistent at the source", cp.id.0);
        };
        let v = j.open_view(CheckpointId(cp.id.0))?;
        for (i, name) in disks.iter().enumerate() {
            if v.disk_hash(disk_id(name))? != want[i] {
                bail!("checkpoint {} disk {name}: the target differs from the source", cp.id.0);
            }
        }
        checked += 1;
    }
    Ok(checked)
}

/// A source disk behind qemu-storage-daemon with content on it already
/// (the initial sync copies it), and its mirror job's name.
struct QemuDisk {
    qsd: StorageDaemon,
    job: String,
}

fn qemu_disk(dir: &Path, i: usize, size: u64, model: &mut ReferenceModel) -> Result<QemuDisk> {
    let d = dir.join(format!("qsd{i}"));
    std::fs::create_dir_all(&d)?;
    let image = d.join("source.raw");
    let mut seed =
        Workload::new(100 + i as u64, &[size], Mix { random: 1, sequential: 3, unaligned: 0, duplicate: 1, zero: 0 });
    let mut one = ReferenceModel::new(&[size]);
    for _ in 0..150 {
        one.apply(&seed.next_write());
    }
    std::fs::write(&image, &one.images[0])?;
    model.images[i] = one.images.remove(0);
    Ok(QemuDisk { qsd: StorageDaemon::start(&d, &image, false)?, job: String::new() })
}

fn status(d: &Daemon) -> Result<Value> {
    d.call(json!({"op": "status"}))
}

/// Runs the scenario with `lab` (the binary whose `lab vdsa ...` is the
/// daemon) in `dir`; `say` hears each event.
pub fn run(lab: &Path, dir: &Path, o: &TwoSiteOptions, mut say: impl FnMut(String)) -> Result<TwoSiteReport> {
    let size = o.disk_size;
    let (src_certs, dst_certs) = paired_sites(lab, dir, "prod", "dr")?;
    let tspec = TargetSpec::new(dir, &dst_certs, o.heartbeat_ms)?;
    let mut target = Some(tspec.start(lab)?);
    let proxy = FaultProxy::start(tspec.port)?;
    let disks: Vec<(String, u64)> = (0..3).map(|i| (format!("d{i}"), size)).collect();
    let names: Vec<String> = disks.iter().map(|d| d.0.clone()).collect();
    let mut sspec = SourceSpec::new(dir, &src_certs, &proxy.addr(), "vpg1", &disks);
    sspec.extra =
        vec!["--heartbeat-ms".into(), o.heartbeat_ms.to_string(), "--queue-memory".into(), o.queue_memory.clone()];
    let mut source = Some(sspec.start(lab)?);
    let mut model = ReferenceModel::new(&[size; 3]);
    let mut qemu: Vec<QemuDisk> = (0..3).map(|i| qemu_disk(dir, i, size, &mut model)).collect::<Result<_>>()?;
    for (i, q) in qemu.iter_mut().enumerate() {
        q.job = format!("tap{i}a");
        q.qsd.attach(&q.job, &sspec.tap_sock, &names[i])?;
    }
    let src = source.as_ref().context("source")?;
    let mut report = TwoSiteReport { initial_sync: status(src)?["sync"].clone(), ..Default::default() };
    src.call(json!({"op": "sync", "syncing": false}))?;
    say(format!("initial sync of 3 disks done: {}", report.initial_sync));
    let mut guests: Vec<NbdClient> = qemu.iter().map(|q| q.qsd.guest()).collect::<Result<_>>()?;
    let mut work = Workload::new(5, &[size; 3], Mix::default());

    let mut expected: BTreeMap<u64, Vec<blake3::Hash>> = BTreeMap::new();
    let mut in_resync: Vec<u64> = Vec::new();
    let mut next_id = 1u64;
    let start = Instant::now();
    let mut last_cp = Instant::now();
    let mut stalled_at: Option<Instant> = None;
    let mut wan_since: Option<Instant> = None;
    let mut target_killed_at: Option<Instant> = None;
    let mut source_killed = false;
    let mut resync: Option<std::thread::JoinHandle<Result<Vec<QemuDisk>>>> = None;
    let span = o.seconds * 2.0 / 3.0;
    let (t_stall, t_target, t_source) = (span * 0.6, span * 0.75, span);
    // Each fault waits until the link has come back from the one before, so
    // a slow machine cannot fold two faults into one outage.
    let links_up = |s: &Option<Daemon>| s.as_ref().map_or(0, |s| s.log_text().matches("replication link up").count());
    let mut ups_at_fault = 0usize;
    loop {
        let t = start.elapsed().as_secs_f64();
        for _ in 0..20 {
            let w = work.next_write();
            guest_write(&mut guests[w.disk], &w)?;
            model.apply_unless_trim(&w);
            report.guest_writes += 1;
            report.guest_bytes += w.len();
        }
        if let Some(s) = stalled_at {
            if s.elapsed() > Duration::from_millis(5 * o.heartbeat_ms) {
                proxy.stall(false);
                stalled_at = None;
                report.stalls = 1;
                say(format!(
                    "[{t:.1}s] link flows again after {} ms (heartbeat {} ms)",
                    5 * o.heartbeat_ms,
                    o.heartbeat_ms
                ));
                // A WAN for a while: 20 ms each way, 8 MB/s.
                proxy.delay(Duration::from_millis(20));
                proxy.limit(8_000_000);
                wan_since = Some(Instant::now());
                say(format!("[{t:.1}s] link now 20 ms each way and 8 MB/s"));
            }
        }
        if wan_since.is_some_and(|w| w.elapsed() > Duration::from_secs(2)) {
            proxy.delay(Duration::ZERO);
            proxy.limit(0);
            wan_since = None;
            say(format!("[{t:.1}s] link back to loopback speed"));
        }
        let cut_due = report.cuts < o.cuts && t > (report.cuts + 1) as f64 * t_stall / (o.cuts + 1) as f64;
        let stall_due = report.cuts == o.cuts && report.stalls == 0 && stalled_at.is_none() && t > t_stall;
        let kill_due = report.stalls == 1 && target_killed_at.is_none() && t > t_target;
        if (cut_due || stall_due || kill_due) && stalled_at.is_none() {
            let ups = links_up(&source);
            if ups > ups_at_fault {
                ups_at_fault = ups;
                if cut_due {
                    proxy.cut();
                    report.cuts += 1;
                    say(format!("[{t:.1}s] link cut #{}", report.cuts));
                } else if stall_due {
                    proxy.stall(true);
                    stalled_at = Some(Instant::now());
                    say(format!("[{t:.1}s] link stalled (nothing flows, the TCP connection stays up)"));
                } else {
                    if let Some(d) = target.take() {
                        d.kill();
                    }
                    target_killed_at = Some(Instant::now());
                    say(format!("[{t:.1}s] target VDSA SIGKILLed"));
                }
            }
        }
        if target.is_none() && target_killed_at.is_some_and(|k| k.elapsed() > Duration::from_millis(800)) {
            target = Some(tspec.start(lab)?);
            say(format!("[{t:.1}s] target VDSA restarted"));
        }
        if !source_killed && t > t_source && target.is_some() && links_up(&source) > ups_at_fault {
            if let Some(d) = source.take() {
                d.kill();
            }
            source_killed = true;
            // QEMU notices at the next write of each disk; the guest's
            // writes keep succeeding.
            for (i, q) in qemu.iter_mut().enumerate() {
                let w = GenWrite { disk: i, offset: 0, payload: Payload::Data(vec![0xAB; 4096]) };
                guest_write(&mut guests[i], &w)?;
                model.apply(&w);
                vdsa::kvm::wait_for(
                    &mut q.qsd.qmp,
                    &q.job,
                    Duration::from_secs(30),
                    "the job to end",
                    vdsa::kvm::stopped_mirroring,
                )?;
                q.qsd.detach(&q.job)?;
            }
            let s = sspec.start(lab)?;
            say(format!("[{t:.1}s] source VDSA SIGKILLed (its queue is lost), QEMU's mirror jobs ended on the failed target, the guest kept writing; source restarted"));
            // Nothing is consistent until the tap has re-sent every block.
            let r = s.call(json!({"op": "checkpoint", "id": next_id}))?;
            if r["kind"] != "Inconsistent" {
                bail!("checkpoint {next_id} right after the source's restart is {}", r["kind"]);
            }
            in_resync.push(next_id);
            next_id += 1;
            source = Some(s);
            // Re-attach with a full sync while the guest keeps writing.
            let mut moved = std::mem::take(&mut qemu);
            let (sock, names2) = (sspec.tap_sock.clone(), names.clone());
            resync = Some(std::thread::spawn(move || {
                for (i, q) in moved.iter_mut().enumerate() {
                    q.job = format!("tap{i}b");
                    q.qsd.attach(&q.job, &sock, &names2[i])?;
                }
                Ok(moved)
            }));
        }
        if resync.as_ref().is_some_and(|h| h.is_finished()) {
            let h = resync.take().context("resync")?;
            qemu = h.join().map_err(|_| anyhow::anyhow!("re-attaching the taps panicked"))??;
            if let Some(s) = &source {
                report.resync = status(s)?["sync"].clone();
                say(format!("[{t:.1}s] QEMU's full resync through the tap done: {}", report.resync));
                s.call(json!({"op": "sync", "syncing": false}))?;
            }
        }
        if last_cp.elapsed() >= Duration::from_secs(1) || resync.is_some() {
            if let Some(s) = &source {
                let r = s.call(json!({"op": "checkpoint", "id": next_id}))?;
                if r["kind"] == "Inconsistent" {
                    in_resync.push(next_id);
                } else if resync.is_some() {
                    bail!("checkpoint {next_id} during the resync is {}", r["kind"]);
                } else {
                    expected.insert(next_id, model.hashes());
                }
                next_id += 1;
            }
            last_cp = Instant::now();
        }
        if t > o.seconds && source_killed && resync.is_none() && target.is_some() {
            break;
        }
    }
    let (source, target) = (source.context("source")?, target.context("target")?);
    let last = next_id;
    let r = source.call(json!({"op": "checkpoint", "id": last, "name": "final"}))?;
    if r["kind"] != "Named" {
        bail!("the final checkpoint is {}", r["kind"]);
    }
    expected.insert(last, model.hashes());
    wait_until("the target to hold everything", Duration::from_secs(120), || {
        Ok(status(&source)?["drained"] == json!(true))
    })?;
    report.source_status = status(&source)?;
    report.links_up = source.log_text().matches("replication link up").count();
    for q in &mut qemu {
        q.qsd.detach(&q.job)?;
    }
    let source_hashes: Vec<blake3::Hash> = qemu.iter().map(|q| q.qsd.image_hash()).collect::<Result<_>>()?;
    if source_hashes != model.hashes() {
        bail!("the model does not follow QEMU's source disks");
    }
    source.shutdown()?;
    target.shutdown()?;
    report.consistent_verified = verify_checkpoints(&tspec.journal_dir("vpg1"), &names, &expected, &in_resync)?;
    report.inconsistent_during_resync = in_resync.len();
    let j = Journal::open(tspec.journal_dir("vpg1"), JournalConfig::default())?;
    let cps = j.checkpoints()?;
    let newest = cps.iter().rev().find(|c| c.kind.is_recoverable()).context("no consistent checkpoint")?;
    if newest.id.0 != last {
        bail!("the newest consistent checkpoint is {}, not the final one {last}", newest.id.0);
    }
    let v = j.open_view(newest.id)?;
    for (i, n) in names.iter().enumerate() {
        if v.disk_hash(disk_id(n))? != source_hashes[i] {
            bail!("disk {n} at the newest checkpoint differs from QEMU's source disk");
        }
    }
    Ok(report)
}
