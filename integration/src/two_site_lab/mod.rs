//! The two-site lab, the README's main job: the whole product on this
//! machine, driven only through the site managers' APIs (the lab is a
//! client of the product, not a second implementation of it).
//!
//! Two site managers (prod and dr) are paired; three protected hosts at
//! prod and two recovery hosts at dr each run a `vdsa agent` that
//! registers with a one-time token; six VMs (each a qemu-storage-daemon
//! serving a bootable disk with a data area) form two VPGs spread over the
//! hosts. A workload writes causal chains across each VPG's hosts; named
//! checkpoints are taken with the writers paused, so each has an exact
//! reference. Then three failover tests run in parallel at three
//! checkpoints, each export is compared with its reference and a real
//! guest boots from each test's export and checks its data area; one VPG
//! fails over to a chosen checkpoint, is verified, written to and
//! committed, and after promotion reads back the reference plus that
//! write. Every step is a check in the report (`report.rs`).

mod report;

pub use report::{Check, CleanPoint, Report, TestRun};

use crate::exports::{export_hash, sha256_hex, split_uri};
use crate::guest::{Boot, GuestConfig, GuestKit, Initramfs, BLOCK_MODULES, TEST_VM_INIT};
use crate::kvm_lab::StorageDaemon;
use crate::site_lab::{AgentProcess, SiteManagerProcess};
use anyhow::{bail, Context, Result};
use rand::SeedableRng;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use vdsa::nbd::client::NbdClient;

/// How the lab runs.
#[derive(Debug, Clone, Default)]
pub struct LabOptions {
    /// Where the sites keep their folders (default: a temporary folder,
    /// removed at the end).
    pub dir: Option<PathBuf>,
    /// Leave both sites running at the end, until Ctrl-C.
    pub keep: bool,
    /// During the rounds of writes: SIGKILL a protected host's VDSA, cut
    /// and stall the site-to-site link, SIGKILL the protected site's
    /// manager; every check must still pass.
    pub faults: bool,
}

/// A VDSA as the lab starts it, to start it again after a kill.
struct AgentSpec {
    name: String,
    token: String,
    site_manager: String,
    port: u16,
    extra: Vec<String>,
}

impl AgentSpec {
    fn start(&self, lab: &Path, dir: &Path) -> Result<AgentProcess> {
        let extra: Vec<&str> = self.extra.iter().map(String::as_str).collect();
        AgentProcess::start_on(
            lab,
            &dir.join(&self.name),
            &self.name,
            &self.site_manager,
            &self.token,
            self.port,
            &extra,
        )
    }
}

const PROTECTED_HOSTS: usize = 3;
const RECOVERY_HOSTS: usize = 2;
const VMS: usize = 6;
/// Named checkpoints, each after a round of writes.
const ROUNDS: usize = 3;
/// How long each round's writers run.
const ROUND_WRITES: Duration = Duration::from_secs(4);

/// One protected VM: its disk's QEMU and the reference model of its disk.
struct LabVm {
    name: String,
    id: String,
    disk: String,
    qsd: StorageDaemon,
    model: Vec<u8>,
}

/// A VPG of the lab: its id and its VMs (indexes into the VM list).
struct LabVpg {
    name: String,
    id: String,
    vms: Vec<usize>,
    /// (checkpoint id, per VM disk blake3, vm-0's data area) per named
    /// checkpoint.
    refs: Vec<(u64, Vec<blake3::Hash>, Vec<u8>)>,
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// The URI of `disk`'s export in a test's (or failover's) record.
fn export_of(rec: &Value, disk: &str) -> String {
    rec["exports"]
        .as_array()
        .and_then(|a| a.iter().find(|e| e["disk"] == disk))
        .and_then(|e| e["uri"].as_str())
        .unwrap_or_default()
        .to_string()
}

/// How many of `disks` (each with the hash it must have) read back equal
/// through their exports in `rec`.
fn exports_equal<'a>(
    rec: &Value,
    disks: impl Iterator<Item = (&'a str, blake3::Hash)>,
    scratch: &Path,
) -> Result<usize> {
    let mut same = 0;
    for (disk, want) in disks {
        if export_hash(&export_of(rec, disk), scratch)? == want {
            same += 1;
        }
    }
    Ok(same)
}

/// Waits for a task, showing its progress; returns the finished task.
fn wait_task(sm: &SiteManagerProcess, task: &Value, what: &str, timeout: Duration) -> Result<Value> {
    let id = task["id"].as_str().context("a task id")?;
    let bar = indicatif::ProgressBar::new(100);
    bar.set_style(
        indicatif::ProgressStyle::with_template("  {spinner} {msg} [{bar:30}] {pos}%")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_message(what.to_string());
    let start = Instant::now();
    loop {
        let t = sm.get(&format!("/api/v1/tasks/{id}"))?;
        bar.set_position(t["progress"].as_u64().unwrap_or(0));
        if t["status"] != "Running" {
            bar.finish_and_clear();
            return Ok(t);
        }
        if start.elapsed() > timeout {
            bar.finish_and_clear();
            bail!("timed out after {timeout:?} waiting for {what}: {t}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Installs what the lab needs when it is absent (`integration/install-deps`,
/// shared with the test command), so that the README's first command works
/// on a fresh machine.
fn install_deps() -> Result<()> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("install-deps");
    if script.is_file() {
        let status = std::process::Command::new("bash").arg(&script).status().context("running install-deps")?;
        if !status.success() {
            bail!("{} failed ({status}): the lab needs qemu-utils and the guest kit's libraries", script.display());
        }
    }
    if !crate::kvm_lab::qemu_available() {
        bail!("qemu-storage-daemon is not installed: apt-get install qemu-utils");
    }
    Ok(())
}

/// Runs the lab; the report says what was verified.
pub fn run(lab: &Path, o: &LabOptions) -> Result<Report> {
    let started = Instant::now();
    let mut report = Report::default();
    install_deps()?;
    let tmp;
    let dir = match &o.dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => {
            tmp = tempfile::tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    let scratch = dir.join("scratch");
    std::fs::create_dir_all(&scratch)?;
    println!("lab: two sites on this machine under {}", dir.display());

    // The VMs' disks: a bootable image (the guest kit's kernel and a test
    // VM's initramfs) with an 8 MiB data area the workload writes.
    let kit = GuestKit::prepare()?;
    let initramfs = dir.join("test-vm-initrd");
    kit.build_initramfs(
        &Initramfs { modules: BLOCK_MODULES.to_vec(), programs: Vec::new(), init: TEST_VM_INIT.into() },
        &initramfs,
    )?;
    let boot = kit.build_boot_disk(&initramfs, "", 48, 8, &dir.join("template.raw"))?;
    let (area, area_len) = (boot.data_offset, boot.data_len);
    let template = std::fs::read(&boot.path)?;

    // Two site managers, paired.
    let (prod_api, prod_mgmt) = (crate::site_lab::free_port(), crate::site_lab::free_port());
    let mut prod = SiteManagerProcess::start_on(lab, &dir.join("prod"), prod_api, prod_mgmt, &["--name", "prod"])?;
    let dr = SiteManagerProcess::start(lab, &dir.join("dr"), &["--name", "dr"])?;
    let token = dr.post("/api/v1/site/pairing-tokens", json!({}))?;
    let peer = prod
        .post("/api/v1/site/peer", json!({"address": format!("127.0.0.1:{}", dr.api_port), "token": token["token"]}))?;
    let dr_site = dr.get("/api/v1/site")?["id"].clone();
    report.check("pairing", peer["site"] == dr_site, format!("prod paired with dr ({dr_site})"));

    // Hosts: a VDSA each, registered with a one-time token.
    // The site-to-site link: dr's VDSAs are reached through a proxy each
    // (they advertise its address), which `--faults` cuts and stalls.
    let mut agents: Vec<AgentProcess> = Vec::new();
    let mut specs: Vec<AgentSpec> = Vec::new();
    let mut wan = Vec::new();
    let mut hosts: Vec<(String, String)> = Vec::new(); // (name, id)
    for (sm, prefix, n) in [(&prod, "prod", PROTECTED_HOSTS), (&dr, "dr", RECOVERY_HOSTS)] {
        for i in 0..n {
            let name = format!("{prefix}-kvm-{i}");
            let (id, token) = sm.add_host(&name)?;
            let port = crate::site_lab::free_port();
            let mut extra = Vec::new();
            if prefix == "dr" {
                let proxy = crate::replication_lab::FaultProxy::start(port)?;
                extra = vec!["--replication-address".to_string(), proxy.addr()];
                wan.push(proxy);
            }
            let spec = AgentSpec { name: name.clone(), token, site_manager: sm.management_address(), port, extra };
            agents.push(spec.start(lab, &dir)?);
            specs.push(spec);
            hosts.push((name, id));
        }
    }
    for (sm, n) in [(&prod, PROTECTED_HOSTS), (&dr, RECOVERY_HOSTS)] {
        sm.wait_until("/api/v1/hosts", Duration::from_secs(120), "every VDSA to register", |v| {
            v.as_array().is_some_and(|hs| hs.len() == n && hs.iter().all(|h| h["vdsa"] == "installed"))
        })?;
    }
    report.check("vdsas registered", true, format!("{PROTECTED_HOSTS} at prod, {RECOVERY_HOSTS} at dr, installed"));

    // Six VMs, two per protected host.
    let mut vms = Vec::new();
    for i in 0..VMS {
        let d = dir.join(format!("vm-{i}"));
        std::fs::create_dir_all(&d)?;
        let image = d.join("disk.raw");
        std::fs::write(&image, &template)?;
        vms.push(LabVm {
            name: format!("vm-{i}"),
            id: uuid::Uuid::new_v4().to_string(),
            disk: uuid::Uuid::new_v4().to_string(),
            qsd: StorageDaemon::start(&d, &image, false)?,
            model: template.clone(),
        });
    }
    // Two VPGs, each with a VM on every protected host, recovering to
    // both recovery hosts.
    let mut vpgs = vec![
        LabVpg { name: "web".into(), id: String::new(), vms: vec![0, 1, 2], refs: Vec::new() },
        LabVpg { name: "db".into(), id: String::new(), vms: vec![3, 4, 5], refs: Vec::new() },
    ];
    let mut tasks = Vec::new();
    for (k, g) in vpgs.iter_mut().enumerate() {
        let members: Vec<Value> = g
            .vms
            .iter()
            .enumerate()
            .map(|(j, &i)| {
                let v = &vms[i];
                json!({"id": v.id, "name": v.name, "host": hosts[j % PROTECTED_HOSTS].1,
                       "hypervisor_ref": v.qsd.vdsa_qmp_sock,
                       "disks": [{"id": v.disk, "name": format!("{}-disk", v.name), "size_bytes": template.len(),
                                  "device": "src"}],
                       "recovery_host": hosts[PROTECTED_HOSTS + (j + k) % RECOVERY_HOSTS].1})
            })
            .collect();
        let settings =
            json!({"name": g.name, "recovery_site": dr_site, "vms": members, "checkpoint_interval_ms": 2000});
        // prod learns dr's hosts at its next exchange with dr.
        let created = prod.create_vpg(&settings)?;
        g.id = created["vpg"]["id"].as_str().context("VPG id")?.to_string();
        tasks.push((g.name.clone(), created["task"].clone()));
    }
    for (name, task) in &tasks {
        let t = wait_task(&prod, task, &format!("VPG {name}: initial sync"), Duration::from_secs(300))?;
        report.check(
            &format!("VPG {name} protects"),
            t["completion"] == "Success",
            format!("initial sync of 3 VMs on 3 hosts to dr: {}", t["completion"]),
        );
    }

    // The workload: per VPG, a chain of writes across its VMs' hosts
    // (each write is issued after the previous one, on another host, was
    // acknowledged, and names it). The writers pause for each named
    // checkpoint, so each has an exact reference.
    let mut guests: Vec<NbdClient> = vms.iter().map(|v| v.qsd.guest()).collect::<Result<_>>()?;
    let written = AtomicU64::new(0);
    let mut seq = 0u64;
    let mut write_time = Duration::ZERO;
    for round in 0..ROUNDS {
        let round_start = Instant::now();
        let stop = AtomicBool::new(false);
        let rpo = Mutex::new(Vec::new());
        let mut fault: Option<Fault> = None;
        std::thread::scope(|s| -> Result<()> {
            // RPO sampler: at each VPG, now minus the newest durable
            // checkpoint's time.
            s.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    for g in &vpgs {
                        if let Ok(cps) = prod.get(&format!("/api/v1/vpgs/{}/checkpoints", g.id)) {
                            let newest = cps
                                .as_array()
                                .into_iter()
                                .flatten()
                                .filter(|c| c["durable"] == true)
                                .filter_map(|c| c["time_ms"].as_u64())
                                .max();
                            if let (Some(t), Ok(mut r)) = (newest, rpo.lock()) {
                                r.push(now_ms().saturating_sub(t));
                            }
                        }
                    }
                    std::thread::sleep(Duration::from_millis(500));
                }
            });
            let mut handles = Vec::new();
            let mut rest: &mut [NbdClient] = &mut guests;
            let mut models: Vec<&mut Vec<u8>> = vms.iter_mut().map(|v| &mut v.model).collect();
            let mut chains = Vec::new();
            for g in &vpgs {
                let (mine, after) = rest.split_at_mut(g.vms.len());
                rest = after;
                let my_models: Vec<&mut Vec<u8>> = models.drain(..g.vms.len()).collect();
                chains.push((g.name.clone(), mine, my_models));
            }
            for (k, (name, mine, my_models)) in chains.into_iter().enumerate() {
                let written = &written;
                let base = seq + (k as u64) * 1_000_000_000;
                handles.push(s.spawn(move || -> Result<u64> {
                    let mut n = 0u64;
                    let mut prev = blake3::hash(b"chain start");
                    let mut models = my_models;
                    while round_start.elapsed() < ROUND_WRITES {
                        n += 1;
                        let which = (n % mine.len() as u64) as usize;
                        let id = base + n;
                        let len = 4096 * (1 + (id % 16));
                        let off = area + ((id * 7919) % ((area_len - len) / 4096)) * 4096;
                        let mut data = vec![0u8; len as usize];
                        let head = format!("chain {name} write {id} after {}", prev.to_hex());
                        data[..head.len()].copy_from_slice(head.as_bytes());
                        // Random bytes: neither dedup nor compression
                        // makes the link's work smaller than the writes.
                        rand::RngCore::fill_bytes(&mut rand::rngs::StdRng::seed_from_u64(id), &mut data[head.len()..]);
                        mine[which].write(off, &data).with_context(|| format!("{name}: guest write"))?;
                        models[which][off as usize..(off + len) as usize].copy_from_slice(&data);
                        prev = blake3::hash(&data);
                        written.fetch_add(len, Ordering::Relaxed);
                    }
                    Ok(n)
                }));
            }
            if o.faults {
                std::thread::sleep(ROUND_WRITES / 2);
                fault = Some(inject_fault(round, lab, &dir, &prod, &mut agents, &specs, &wan)?);
            }
            for h in handles {
                match h.join() {
                    Ok(r) => {
                        seq += r?;
                    }
                    Err(_) => bail!("a writer panicked"),
                }
            }
            stop.store(true, Ordering::Relaxed);
            Ok(())
        })?;
        write_time += round_start.elapsed();
        report.rpo_ms.extend(rpo.into_inner().unwrap_or_default());
        if fault == Some(Fault::SiteManager) {
            // The killed site manager starts again on its folder and
            // ports; its VDSAs dial back in.
            prod = SiteManagerProcess::start_on(lab, &dir.join("prod"), prod_api, prod_mgmt, &["--name", "prod"])?;
        }
        // A named checkpoint per VPG with the writers paused: its
        // reference is the model now. After a fault the VPG may still be
        // catching up (a delta sync makes a cut inconsistent): the
        // operator's way is to insert another one, as here.
        let after_fault = Instant::now();
        let mut attempts = 0;
        for g in &mut vpgs {
            let mut last;
            let ok = loop {
                attempts += 1;
                let c =
                    prod.post(&format!("/api/v1/vpgs/{}/checkpoints", g.id), json!({"name": format!("lab-{round}")}))?;
                let id = c["id"].as_u64().context("checkpoint id")?;
                last = prod.get(&format!("/api/v1/vpgs/{}/checkpoints/{id}/wait?timeout_ms=30000", g.id))?;
                if last["consistent"] == true && last["durable"] == true {
                    let hashes = g.vms.iter().map(|&i| blake3::hash(&vms[i].model)).collect();
                    g.refs.push((id, hashes, vms[g.vms[0]].model[area as usize..].to_vec()));
                    break true;
                }
                if fault.is_none() || after_fault.elapsed() > Duration::from_secs(180) {
                    break false;
                }
                std::thread::sleep(Duration::from_secs(1));
            };
            report.check(
                &format!("VPG {} checkpoint lab-{round}", g.name),
                ok,
                format!(
                    "checkpoint {}: consistent {}, durable at dr {}",
                    last["id"], last["consistent"], last["durable"]
                ),
            );
        }
        if let Some(f) = fault {
            report.check(
                &format!("fault: {}", f.what()),
                vpgs.iter().all(|g| g.refs.len() == round + 1),
                format!(
                    "both VPGs gave a consistent checkpoint durable at dr {:.1} s after the writes paused ({attempts} \
                     checkpoints inserted)",
                    after_fault.elapsed().as_secs_f64()
                ),
            );
        }
    }
    report.write_seconds = write_time.as_secs_f64();
    report.written_bytes = written.load(Ordering::Relaxed);
    for g in &vpgs {
        let cps = prod.get(&format!("/api/v1/vpgs/{}/checkpoints", g.id))?;
        for c in cps.as_array().into_iter().flatten().filter(|c| c["consistent"] == true) {
            report.barrier_hold_ms.push(c["hold_us"].as_u64().unwrap_or(0) as f64 / 1000.0);
        }
        let roles = prod.get(&format!("/api/v1/vpgs/{}/roles", g.id))?;
        for r in roles.as_array().into_iter().flatten().map(|r| &r["role"]).filter(|r| r["kind"] == "source") {
            report.link_bytes += r["link_bytes"].as_u64().unwrap_or(0);
            report.tapped_bytes += r["written_bytes"].as_u64().unwrap_or(0);
        }
    }

    // Three failover tests of "web" in parallel at its three named
    // checkpoints, at dr; replication goes on.
    let web = &vpgs[0];
    let ids: Vec<u64> = web.refs.iter().map(|r| r.0).collect();
    let t0 = Instant::now();
    let started_tests = dr.post(&format!("/api/v1/vpgs/{}/failover-tests", web.id), json!({"checkpoints": ids}))?;
    let done = wait_task(&dr, &started_tests["task"], "three failover tests", Duration::from_secs(120))?;
    let start_s = t0.elapsed().as_secs_f64();
    report.check("three failover tests start", done["completion"] == "Success", format!("{}", done["completion"]));
    let tests: Vec<Value> = started_tests["tests"].as_array().cloned().unwrap_or_default();
    let mut records = Vec::new();
    for t in &tests {
        let id = t["id"].as_str().context("test id")?;
        records.push(dr.get(&format!("/api/v1/failover-tests/{id}"))?);
    }
    let mut verdicts = Vec::new();
    for rec in &records {
        let cp = rec["checkpoint"].as_u64().unwrap_or(0);
        let (_, want, _) = web.refs.iter().find(|r| r.0 == cp).context("a test at an unknown checkpoint")?;
        let same = exports_equal(rec, web.vms.iter().zip(want).map(|(&i, h)| (vms[i].disk.as_str(), *h)), &scratch)?;
        report.check(
            &format!("failover test at checkpoint {cp}: exports"),
            same == web.vms.len(),
            format!("{same} of {} disks read by qemu-img equal the reference", web.vms.len()),
        );
        verdicts.push((cp, same == web.vms.len()));
    }
    // A real guest per test boots through its firmware from the test's
    // export of vm-0's disk and checks its data area (two at a time: TCG
    // on two cores).
    for pair in records.chunks(2) {
        let mut booted = Vec::new();
        for rec in pair {
            let cp = rec["checkpoint"].as_u64().unwrap_or(0);
            let guest = kit.boot(&GuestConfig {
                boot: Boot::FirstDisk,
                memory_mb: 256,
                disks: Vec::new(),
                nbd_disks: vec![export_of(rec, &vms[web.vms[0]].disk)],
                read_only_nbd_disks: Vec::new(),
                forwards: Vec::new(),
                console: dir.join(format!("test-vm-{cp}.log")),
            })?;
            booted.push((cp, guest));
        }
        for (cp, mut guest) in booted {
            let ok = guest.wait_for("TESTVM: wrote", Duration::from_secs(180)).is_ok();
            let _ = guest.wait_exit(Duration::from_secs(60));
            let console = guest.console_text();
            let (_, _, area_ref) = web.refs.iter().find(|r| r.0 == cp).context("reference")?;
            let want = sha256_hex(area_ref, &scratch)?;
            let saw = console.contains(&format!("TESTVM: data {want}"));
            report.check(
                &format!("failover test at checkpoint {cp}: guest"),
                ok && saw,
                if ok && saw {
                    "a real guest booted from the export and read the reference data area".to_string()
                } else {
                    format!(
                        "the guest did not see the reference (console {})",
                        dir.join(format!("test-vm-{cp}.log")).display()
                    )
                },
            );
            if let Some(v) = verdicts.iter_mut().find(|v| v.0 == cp) {
                v.1 &= ok && saw;
            }
        }
    }
    for (cp, verified) in &verdicts {
        report.failover_tests.push(TestRun { checkpoint: *cp, start_s, verified: *verified });
    }
    for t in &tests {
        let id = t["id"].as_str().context("test id")?;
        let stop = dr.post(&format!("/api/v1/failover-tests/{id}/stop"), json!({"result": "pass", "notes": "lab"}))?;
        let s = wait_task(&dr, &stop["task"], "stopping a test", Duration::from_secs(60))?;
        report.check("failover test stops", s["completion"] == "Success", format!("test {id}: {}", s["completion"]));
    }

    // Failover of "web" at dr to its second named checkpoint.
    let (cp, want, _) = web.refs[1].clone();
    let t0 = Instant::now();
    let f = dr.post(&format!("/api/v1/vpgs/{}/failover", web.id), json!({ "checkpoint": cp }))?;
    let done = wait_task(&dr, &f["task"], "failover", Duration::from_secs(120))?;
    let fid = f["failover"]["id"].as_str().context("failover id")?.to_string();
    let rec = dr.get(&format!("/api/v1/failover-tests/{fid}"))?;
    let first = export_of(&rec, &vms[web.vms[0]].disk);
    let (addr, name) = split_uri(&first)?;
    let mut c = NbdClient::connect_tcp(&addr, &name)?;
    let mut block = vec![0u8; 4096];
    c.read(0, &mut block)?;
    report.rto_s = Some(t0.elapsed().as_secs_f64());
    report.check("failover", done["completion"] == "Success", format!("to checkpoint {cp}: {}", done["completion"]));
    let same = exports_equal(&rec, web.vms.iter().zip(&want).map(|(&i, h)| (vms[i].disk.as_str(), *h)), &scratch)?;
    report.check(
        "failover exports",
        same == web.vms.len(),
        format!("{same} of {} recovered disks equal the reference at checkpoint {cp}", web.vms.len()),
    );
    // The recovered VM writes; commit promotes the checkpoint plus that
    // write into the replicas.
    let marker = b"written by the recovered vm-0 before commit";
    c.write(area + 4096, marker)?;
    c.flush()?;
    drop(c);
    let commit = dr.post(&format!("/api/v1/vpgs/{}/failover/commit", web.id), json!({}))?;
    let done = wait_task(&dr, &commit["task"], "commit and promotion", Duration::from_secs(300))?;
    report.check("commit", done["completion"] == "Success", format!("promotion {}", done["completion"]));
    // vm-0's disk at the checkpoint is the template's boot part and the
    // data area's reference; the recovered VM's write goes on top.
    let (_, _, area_at_cp) = &web.refs[1];
    let mut expected = template[..area as usize].to_vec();
    expected.extend_from_slice(area_at_cp);
    let at = (area + 4096) as usize;
    expected[at..at + marker.len()].copy_from_slice(marker);
    let rec = dr.get(&format!("/api/v1/failover-tests/{fid}"))?;
    let got = export_hash(&export_of(&rec, &vms[web.vms[0]].disk), &scratch)?;
    report.check(
        "promoted disks",
        got == blake3::hash(&expected),
        "after promotion vm-0's disk reads the reference at the checkpoint plus the recovered VM's write",
    );
    let others =
        exports_equal(&rec, web.vms.iter().zip(&want).skip(1).map(|(&i, h)| (vms[i].disk.as_str(), *h)), &scratch)?;
    report.check(
        "promoted disks unchanged elsewhere",
        others == web.vms.len() - 1,
        format!("{others} of {} other disks equal the reference", web.vms.len() - 1),
    );
    reverse_and_fail_back(&mut report, &dir, &prod, &dr, &agents, &vms, web, template.len())?;
    let db = &vpgs[1];
    let guest = &mut guests[db.vms[0]];
    match ransomware_stage(lab, &prod, &dr, db, guest, area + area_len / 2) {
        Ok(c) => {
            report.check(
                "ransomware alert",
                c.alert_delay_s <= 10.0,
                format!("encryption_suspected at prod {:.1} s after the attack on VPG db began", c.alert_delay_s),
            );
            report.check(
                "clean-point search",
                c.found == c.expected,
                format!(
                    "4 failover tests a round at dr found checkpoint {} in {} rounds; the last one before the attack \
                     is {}",
                    c.found, c.rounds, c.expected
                ),
            );
            report.clean_point = Some(c);
        }
        Err(e) => report.check("ransomware stage", false, format!("{e:#}")),
    }
    vsphere_stage(&mut report);
    report.duration_s = started.elapsed().as_secs_f64();
    if o.keep {
        println!("\nlab: both sites keep running (Ctrl-C stops them)");
        for (name, sm) in [("prod", &prod), ("dr", &dr)] {
            println!(
                "  {name}: console https://127.0.0.1:{port}/ , API https://127.0.0.1:{port}/api/v1 (CA {ca}), admin token {token}",
                port = sm.api_port,
                ca = sm.dir.join("data/pki/ca.pem").display(),
                token = sm.admin
            );
        }
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
    drop(guests);
    Ok(report)
}

/// The ransomware stage, on VPG `db` (docs/architecture.md, "The
/// encryption signal" and "The clean-point search"): text files written
/// into vm-3's disk at `at`, protected for a few checkpoints; right after a
/// checkpoint is recorded the attack overwrites them with random bytes.
/// The alert must come at prod, and the clean-point search at dr (4 tests
/// a round, a host-side check of the files' bytes in each test's export)
/// must find that checkpoint.
fn ransomware_stage(
    lab: &Path,
    prod: &SiteManagerProcess,
    dr: &SiteManagerProcess,
    db: &LabVpg,
    guest: &mut NbdClient,
    at: u64,
) -> Result<CleanPoint> {
    const FILES: usize = 2 << 20;
    let text = crate::ext4_lab::plain_text(31, FILES);
    guest.write(at, &text)?;
    let newest = |sm: &SiteManagerProcess| -> Result<u64> {
        let cps = sm.get(&format!("/api/v1/vpgs/{}/checkpoints?limit=1", db.id))?;
        Ok(cps[0]["id"].as_u64().unwrap_or(0))
    };
    // A few checkpoints with the files in place (the second one recorded
    // after the write is the first sure to hold them), then the attack
    // right after one is recorded (the next comes a whole interval later).
    let files_from = newest(prod)? + 2;
    std::thread::sleep(Duration::from_secs(8));
    let seen = newest(prod)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let expected = loop {
        let n = newest(prod)?;
        if n > seen {
            break n;
        }
        if Instant::now() > deadline {
            bail!("no checkpoint of VPG db for 10 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let started = Instant::now();
    let mut rng = rand::rngs::StdRng::seed_from_u64(99);
    for piece in 0..FILES / (256 << 10) {
        let mut enc = vec![0u8; 256 << 10];
        rand::RngCore::fill_bytes(&mut rng, &mut enc);
        guest.write(at + (piece * (256 << 10)) as u64, &enc)?;
    }
    let alert_delay_s = loop {
        let alerts = prod.get("/api/v1/alerts")?;
        let raised = alerts.as_array().into_iter().flatten().any(|a| {
            a["kind"] == "encryption_suspected" && a["subject"] == db.id.as_str() && a["cleared_ms"].is_null()
        });
        if raised {
            break started.elapsed().as_secs_f64();
        }
        if started.elapsed() > Duration::from_secs(30) {
            bail!("no encryption alert for VPG db 30 s after the attack");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    println!("lab: the attack on VPG db raised encryption_suspected after {alert_delay_s:.1} s; searching for the last clean checkpoint at dr");
    // Give dr's journals the attack's checkpoints, then search from a few
    // checkpoints before it.
    std::thread::sleep(Duration::from_secs(5));
    let region = format!("{at}:{FILES}:{}", blake3::hash(&text).to_hex());
    let check = json!([lab.display().to_string(), "clean-point-check", "--region", region]);
    let task = dr.post(
        &format!("/api/v1/vpgs/{}/clean-point-search", db.id),
        json!({"from": files_from, "k": 4, "check": check, "test_timeout_secs": 120}),
    )?;
    let done = wait_task(dr, &task, "the clean-point search", Duration::from_secs(600))?;
    let r = &done["result"];
    println!("lab: {}", r["summary"].as_str().unwrap_or_default());
    if done["completion"] != "Success" {
        bail!("the clean-point search failed: {done}");
    }
    let found = r["outcome"]["clean"].as_u64().unwrap_or(0);
    Ok(CleanPoint { expected, found, rounds: r["rounds"].as_u64().unwrap_or(0), alert_delay_s })
}

/// The vSphere stage, when the simulator can be built: the VDSA OVA
/// deployed to every host of a simulated vCenter, a test's VMs on an
/// isolated network in boot order, removed with it.
fn vsphere_stage(report: &mut Report) {
    if !crate::vsphere_lab::simulator_available() {
        report.not_run.push((
            "the vSphere stage".into(),
            "the vCenter simulator needs golang-go and golang-github-vmware-govmomi-dev (integration/run-tests \
             installs them)"
                .into(),
        ));
        return;
    }
    println!("lab: vSphere — the VDSA OVA deployed to a simulated vCenter (vcsim from Debian's govmomi)");
    match crate::vsphere_lab::run(|line| println!("    {line}")) {
        Ok(r) => {
            report.check(
                "vSphere: the OVA deployed to every host",
                r.deployed == r.hosts && r.properties_checked == 2 * r.deployed,
                format!(
                    "{} of {} hosts show their VDSA installed with its vApp properties ({:.2} s)",
                    r.deployed, r.hosts, r.deploy_secs
                ),
            );
            report.check(
                "vSphere: test VMs in boot order on an isolated network",
                r.recovery_vms == r.removed_test_vms && r.recovery_vms > 0,
                format!("{} VMs in {} boot groups, removed with the network", r.recovery_vms, r.boot_groups),
            );
        }
        Err(e) => report.check("vSphere stage", false, format!("{e:#}")),
    }
}

/// A fault `--faults` injects while the writers run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    Vdsa,
    Link,
    SiteManager,
}

impl Fault {
    fn what(self) -> &'static str {
        match self {
            Fault::Vdsa => "a protected host's VDSA SIGKILLed and restarted",
            Fault::Link => "the site-to-site link cut, then stalled for 2 s",
            Fault::SiteManager => "the protected site's manager SIGKILLed",
        }
    }
}

/// Injects round `round`'s fault (a VDSA, the link, the site manager).
fn inject_fault(
    round: usize,
    lab: &Path,
    dir: &Path,
    prod: &SiteManagerProcess,
    agents: &mut [AgentProcess],
    specs: &[AgentSpec],
    wan: &[crate::replication_lab::FaultProxy],
) -> Result<Fault> {
    let f = [Fault::Vdsa, Fault::Link, Fault::SiteManager][round % 3];
    println!("  fault: {}", f.what());
    match f {
        Fault::Vdsa => {
            agents[1].kill();
            agents[1] = specs[1].start(lab, dir)?;
        }
        Fault::Link => {
            for p in wan {
                p.cut();
                p.stall(true);
            }
            std::thread::sleep(Duration::from_secs(2));
            for p in wan {
                p.stall(false);
            }
        }
        Fault::SiteManager => {
            if let Some(pid) = prod.pid() {
                // SAFETY: kill(2) on our own child; it is reaped when its
                // guard is dropped.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
        }
    }
    Ok(f)
}

/// Reverse protection and failback of `web`, failed over and committed at
/// dr: dr takes the VPG over; the recovered VMs run from the promoted
/// replicas at dr and are protected back to their original hosts, whose
/// disks seed the new replicas (a delta sync); they write; a checkpoint
/// at dr becomes durable at prod; prod fails over to it and commits, and
/// its disks then equal the recovered ones.
#[allow(clippy::too_many_arguments)]
fn reverse_and_fail_back(
    report: &mut Report,
    dir: &Path,
    prod: &SiteManagerProcess,
    dr: &SiteManagerProcess,
    agents: &[AgentProcess],
    vms: &[LabVm],
    web: &LabVpg,
    disk_len: usize,
) -> Result<()> {
    let scratch = dir.join("scratch");
    let mut recovered = Vec::new();
    for (j, &i) in web.vms.iter().enumerate() {
        // The recovery host the lab gave VM j of the first VPG.
        let agent = &agents[PROTECTED_HOSTS + j % RECOVERY_HOSTS];
        let image = agent.journal(&web.id).join("replica").join(format!("{}.img", vms[i].disk));
        let d = dir.join(format!("recovered-{}", vms[i].name));
        std::fs::create_dir_all(&d)?;
        recovered.push((i, StorageDaemon::start(&d, &image, false)?, image));
    }
    let body = json!({"vms": recovered.iter().map(|(i, q, _)| json!({
        "vm": vms[*i].id, "hypervisor_ref": q.vdsa_qmp_sock,
        "disks": [{"disk": vms[*i].disk, "device": "src", "seed_path": vms[*i].qsd.image}]})).collect::<Vec<_>>()});
    let r = dr.post(&format!("/api/v1/vpgs/{}/reverse-protection", web.id), body)?;
    let t = wait_task(dr, &r["task"], "reverse protection: delta sync", Duration::from_secs(300))?;
    let roles = dr.get(&format!("/api/v1/vpgs/{}/roles", web.id))?;
    let link: u64 = roles
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| &r["role"])
        .filter(|r| r["kind"] == "source")
        .map(|r| r["link_bytes"].as_u64().unwrap_or(0))
        .sum();
    report.check(
        "reverse protection",
        t["completion"] == "Success",
        format!(
            "dr protects the recovered VMs back to prod: {} by delta sync, {:.1} MiB on the link for {} disks of {} MiB",
            t["completion"],
            link as f64 / 1048576.0,
            recovered.len(),
            disk_len >> 20
        ),
    );
    let copies = prod.get("/api/v1/site/peer/vpgs")?;
    let copy = copies.as_array().into_iter().flatten().any(|v| v["id"] == web.id.as_str());
    report.check("prod keeps a copy", copy, "the VPG is defined at dr now; prod holds its copy for the failback");
    // The recovered VMs write, protected now.
    for (k, (_, q, _)) in recovered.iter().enumerate() {
        let mut g = q.guest()?;
        for n in 0..16u64 {
            let mut data = vec![0u8; 8192];
            rand::RngCore::fill_bytes(&mut rand::rngs::StdRng::seed_from_u64(n + 100 * k as u64), &mut data);
            g.write(4096 * (17 + n * 13 + k as u64), &data)?;
        }
        g.flush()?;
    }
    let c = dr.post(&format!("/api/v1/vpgs/{}/checkpoints", web.id), json!({"name": "before failback"}))?;
    let id = c["id"].as_u64().context("checkpoint id")?;
    let w = dr.get(&format!("/api/v1/vpgs/{}/checkpoints/{id}/wait?timeout_ms=60000", web.id))?;
    report.check(
        "checkpoint at dr, durable at prod",
        w["consistent"] == true && w["durable"] == true,
        format!("checkpoint {id}: consistent {}, durable {}", w["consistent"], w["durable"]),
    );
    let mut want = Vec::new();
    for (_, _, image) in &recovered {
        let mut bytes = std::fs::read(image)?;
        bytes.truncate(disk_len);
        want.push(blake3::hash(&bytes));
    }
    // Failback: prod fails over to that checkpoint and commits.
    let f = prod.post(&format!("/api/v1/vpgs/{}/failover", web.id), json!({ "checkpoint": id }))?;
    let done = wait_task(prod, &f["task"], "failback", Duration::from_secs(120))?;
    report.check("failback", done["completion"] == "Success", format!("at prod, to checkpoint {id}"));
    let commit = prod.post(&format!("/api/v1/vpgs/{}/failover/commit", web.id), json!({}))?;
    let done = wait_task(prod, &commit["task"], "failback: commit and promotion", Duration::from_secs(300))?;
    let fid = f["failover"]["id"].as_str().context("failover id")?;
    let rec = prod.get(&format!("/api/v1/failover-tests/{fid}"))?;
    let same =
        exports_equal(&rec, recovered.iter().zip(&want).map(|((i, _, _), h)| (vms[*i].disk.as_str(), *h)), &scratch)?;
    report.check(
        "failed back",
        done["completion"] == "Success" && same == recovered.len(),
        format!(
            "after the failback's promotion {same} of {} disks at prod equal the recovered VMs' disks",
            recovered.len()
        ),
    );
    Ok(())
}
