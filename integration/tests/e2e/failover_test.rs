//! Failover tests through the site manager's API: four tests at four
//! checkpoints of one VPG at once while it replicates, each export read by
//! qemu-img equal to the reference image of its checkpoint, a real guest
//! booted through its firmware from each test's export that checks its
//! data area and writes, writes kept private to their test, and stopping
//! frees their space and keeps a record.

use integration::guest::{Boot, GuestConfig, GuestKit, Initramfs, BLOCK_MODULES, TEST_VM_INIT};
use integration::kvm_lab::qemu_available;
use integration::site_lab::{ProtectedSite, SiteSpec};
use serde_json::{json, Value};
use std::path::Path;
use std::process::Command;
use std::time::Duration;
use vdsa::nbd::client::NbdClient;

fn sha256_hex(bytes: &[u8], scratch: &Path) -> String {
    ok(integration::exports::sha256_hex(bytes, scratch))
}

fn ok<T, E: std::fmt::Display>(r: Result<T, E>) -> T {
    r.unwrap_or_else(|e| panic!("{e:#}"))
}

/// Copies an `nbd://HOST:PORT/NAME` export with qemu-img and hashes it.
pub(crate) fn export_hash(uri: &str, scratch: &Path) -> blake3::Hash {
    ok(integration::exports::export_hash(uri, scratch))
}

fn du(path: &Path) -> u64 {
    let out = Command::new("du").args(["-sk"]).arg(path).output().ok();
    let text = out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
    text.split_whitespace().next().and_then(|k| k.parse::<u64>().ok()).unwrap_or(0) * 1024
}

/// `nbd://HOST:PORT/NAME` split for our own client.
fn split_uri(uri: &str) -> (String, String) {
    ok(integration::exports::split_uri(uri))
}

#[test]
fn four_failover_tests_at_four_checkpoints_while_the_vpg_replicates() {
    if !qemu_available() {
        panic!("qemu-storage-daemon is missing: integration/run-tests installs qemu-utils");
    }
    let _turn = crate::take_turns();
    let dir = ok(tempfile::tempdir());
    let lab = Path::new(env!("CARGO_BIN_EXE_lab"));
    // The protected VMs' disks: bootable images (SYSLINUX, the kit's kernel
    // and the test VM's initramfs) with an 8 MiB data area the workload
    // writes.
    let kit = ok(GuestKit::prepare());
    let initramfs = dir.path().join("initrd");
    ok(kit.build_initramfs(
        &Initramfs { modules: BLOCK_MODULES.to_vec(), programs: Vec::new(), init: TEST_VM_INIT.into() },
        &initramfs,
    ));
    let boot = ok(kit.build_boot_disk(&initramfs, "", 48, 8, &dir.path().join("template.raw")));
    let (area, area_len) = (boot.data_offset, boot.data_len);
    let disk_len = area + area_len;
    let spec = SiteSpec {
        hosts: 2,
        disk_bytes: disk_len,
        site_manager_args: Vec::new(),
        vdsa_args: Vec::new(),
        checkpoint_interval_ms: 3_600_000,
        quiesce_hook: Vec::new(),
        disk_image: Some(boot.path.clone()),
        recovery_vsphere_host: None,
        recovery_link_proxy: false,
    };
    let mut site = ok(ProtectedSite::start(lab, dir.path(), &spec, |m| println!("{m}")));
    let sm = ok(site.sm());
    let vpg = site.vpg.clone();
    let mut guests: Vec<NbdClient> = ok(site.vms.iter().map(|q| q.guest()).collect::<anyhow::Result<_>>());
    // Each VM's disk as the guests left it: the reference at each
    // checkpoint (the guests pause while a checkpoint is taken).
    let mut model = vec![vec![0u8; disk_len as usize]; guests.len()];
    for (g, m) in guests.iter_mut().zip(&mut model) {
        for (i, chunk) in m.chunks_mut(1 << 20).enumerate() {
            ok(g.read((i as u64) << 20, chunk));
        }
    }
    let mut refs: Vec<(u64, Vec<blake3::Hash>)> = Vec::new();
    // vm-0's data area at each checkpoint, for its test VM's check.
    let mut areas: Vec<Vec<u8>> = Vec::new();
    let mut n = 0u64;
    for round in 0..4 {
        for _ in 0..50 {
            n += 1;
            let which = (n % guests.len() as u64) as usize;
            let off = area + (n * 7919 * 4096) % (area_len - 65536) + (n % 4096);
            let data: Vec<u8> = (0..(512 + (n * 37) % 60_000)).map(|i| (i * 31 + n) as u8).collect();
            ok(guests[which].write(off, &data));
            model[which][off as usize..off as usize + data.len()].copy_from_slice(&data);
        }
        let cp = ok(sm.post(&format!("/api/v1/vpgs/{vpg}/checkpoints"), json!({"name": format!("ft-{round}")})));
        let id = cp["id"].as_u64().unwrap_or(0);
        let w = ok(sm.get(&format!("/api/v1/vpgs/{vpg}/checkpoints/{id}/wait?timeout_ms=30000")));
        assert_eq!(w["durable"], true, "checkpoint {id}: {w}");
        refs.push((id, model.iter().map(|m| blake3::hash(m)).collect()));
        areas.push(model[0][area as usize..].to_vec());
    }
    // Replication goes on during the tests: a writer keeps writing.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let mut writer_guest = guests.remove(0);
    let writer = std::thread::spawn(move || {
        let mut k = 0u64;
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            k += 1;
            let _ = writer_guest.write(area + (k * 4096) % (area_len - 4096), &[0x5A; 4096]);
            std::thread::sleep(Duration::from_millis(2));
        }
        k
    });
    // vm-0 is re-addressed in tests: its test VM reads it from its config
    // disk.
    let mut v = ok(sm.get(&format!("/api/v1/vpgs/{vpg}")));
    v["settings"]["vms"][0]["test_network"] =
        json!({"network": "dr-test", "address": "10.9.0.10/24", "gateway": "10.9.0.1", "dns": ["10.9.0.53"]});
    ok(sm.call("PUT", &format!("/api/v1/vpgs/{vpg}"), Some(v["settings"].clone())));
    let vm0 = v["settings"]["vms"][0]["id"].clone();
    let recovery_stacks = site.agents[spec.hosts].dir.join("data/stacks");
    let du_before = du(&recovery_stacks);
    let ids: Vec<u64> = refs.iter().map(|(id, _)| *id).collect();
    let started = ok(sm.post(&format!("/api/v1/vpgs/{vpg}/failover-tests"), json!({"checkpoints": ids})));
    let task = started["task"]["id"].as_str().unwrap_or_default().to_string();
    let done = ok(sm.wait_until(&format!("/api/v1/tasks/{task}"), Duration::from_secs(60), "the tests to run", |t| {
        t["status"] == "Completed"
    }));
    assert_eq!(done["completion"], "Success", "{done}");
    ok(sm.wait_until(&format!("/api/v1/vpgs/{vpg}"), Duration::from_secs(10), "the VPG's Test status", |v| {
        v["status"] == "Test"
    }));
    let tests: Vec<Value> =
        ok(sm.get(&format!("/api/v1/vpgs/{vpg}/failover-tests"))).as_array().cloned().unwrap_or_default();
    assert_eq!(tests.len(), 4, "{tests:?}");
    let scratch = dir.path().join("scratch");
    ok(std::fs::create_dir_all(&scratch));
    for t in &tests {
        assert_eq!(t["state"], "Running", "{t}");
        let cp = t["checkpoint"].as_u64().unwrap_or(0);
        let (_, want) = refs.iter().find(|(id, _)| *id == cp).unwrap_or_else(|| panic!("test at unknown {cp}"));
        let exports = t["exports"].as_array().cloned().unwrap_or_default();
        assert_eq!(exports.len(), site.disks.len(), "{t}");
        for (i, disk) in site.disks.iter().enumerate() {
            let e = exports.iter().find(|e| e["disk"] == json!(disk)).unwrap_or_else(|| panic!("no export of {disk}"));
            let got = export_hash(e["uri"].as_str().unwrap_or_default(), &scratch);
            assert_eq!(got, want[i], "checkpoint {cp}, disk {i}: the export differs from the reference");
        }
        println!("test at checkpoint {cp}: every export equals its reference");
    }
    // A real guest per test boots through its firmware from the test's
    // export of vm-0's disk, checks its data area against the reference at
    // that checkpoint and writes a marker of its own (two at a time: TCG on
    // two cores).
    let export_uri = |t: &Value, disk: usize| {
        let e = t["exports"].as_array().and_then(|a| a.iter().find(|e| e["disk"] == json!(site.disks[disk]))).cloned();
        e.and_then(|e| e["uri"].as_str().map(str::to_string)).unwrap_or_default()
    };
    let config_uri = |t: &Value| {
        let n = t["vm_networks"].as_array().and_then(|a| a.iter().find(|n| n["vm"] == vm0)).cloned();
        n.and_then(|n| n["config_uri"].as_str().map(str::to_string)).unwrap_or_default()
    };
    for t in &tests {
        let n = t["vm_networks"].as_array().and_then(|a| a.iter().find(|n| n["vm"] == vm0)).cloned();
        let n = n.unwrap_or_default();
        assert_eq!(n["kernel_ip"], "ip=10.9.0.10::10.9.0.1:255.255.255.0:vm-0:eth0:off:10.9.0.53", "{t}");
        assert_eq!(n["settings"]["network"], "dr-test", "{t}");
        assert!(config_uri(t).starts_with("nbd://"), "{t}");
    }
    let mut markers = Vec::new();
    for pair in tests.chunks(2) {
        let mut vms = Vec::new();
        for t in pair {
            let cp = t["checkpoint"].as_u64().unwrap_or(0);
            let console = dir.path().join(format!("test-vm-{cp}.log"));
            let vm = ok(kit.boot(&GuestConfig {
                boot: Boot::FirstDisk,
                memory_mb: 256,
                disks: Vec::new(),
                nbd_disks: vec![export_uri(t, 0)],
                read_only_nbd_disks: vec![config_uri(t)],
                forwards: Vec::new(),
                console,
            }));
            vms.push((t, cp, vm));
        }
        for (t, cp, mut vm) in vms {
            ok(vm.wait_for("TESTVM: wrote", Duration::from_secs(180)));
            ok(vm.wait_exit(Duration::from_secs(60)));
            let console = vm.console_text();
            let k = refs.iter().position(|(id, _)| *id == cp).unwrap_or(0);
            let want = sha256_hex(&areas[k], &scratch);
            assert!(
                console.contains(&format!("TESTVM: data {want}")),
                "checkpoint {cp}: the test VM saw another data area:\n{console}"
            );
            assert!(
                console.contains("TESTVM: config address=10.9.0.10/24"),
                "checkpoint {cp}: the test VM did not read its network from its config disk:\n{console}"
            );
            let marker =
                console.lines().find_map(|l| l.trim().strip_prefix("TESTVM: wrote ")).unwrap_or_default().to_string();
            assert!(marker.starts_with("test-vm-"), "{console}");
            println!("test VM at checkpoint {cp} booted from its export, checked its data area and wrote {marker}");
            markers.push((t.clone(), marker));
        }
    }
    for (t, marker) in &markers {
        let (addr, name) = split_uri(&export_uri(t, 0));
        let mut c = ok(NbdClient::connect_tcp(&addr, &name));
        let mut sector = vec![0u8; 512];
        ok(c.read(area + 3 * 512, &mut sector));
        assert!(sector.starts_with(marker.as_bytes()), "the test's export lacks its VM's write");
        for (other, m) in &markers {
            if other["id"] != t["id"] {
                let (addr, name) = split_uri(&export_uri(other, 0));
                let mut sector = vec![0u8; 512];
                ok(ok(NbdClient::connect_tcp(&addr, &name)).read(area + 3 * 512, &mut sector));
                assert!(
                    !sector.starts_with(marker.as_bytes()) && sector.starts_with(m.as_bytes()),
                    "writes leak between tests"
                );
            }
        }
    }
    // A write in the first test is seen by it only.
    let export_of = |t: &Value, disk: usize| split_uri(&export_uri(t, disk));
    let (addr, name) = export_of(&tests[0], 0);
    let mut c = ok(NbdClient::connect_tcp(&addr, &name));
    ok(c.write(area + 4096, &[0xEE; 65536]));
    ok(c.flush());
    drop(c);
    let (addr1, name1) = export_of(&tests[1], 0);
    let mut other = vec![0u8; 65536];
    ok(ok(NbdClient::connect_tcp(&addr1, &name1)).read(area + 4096, &mut other));
    assert!(other.iter().any(|&b| b != 0xEE), "another test sees the first test's write");
    // Stop them with verdicts; their space is freed and records kept.
    let du_running = du(&recovery_stacks);
    // The operator command lists them and stops the second with a fail
    // verdict; the others are stopped through the API.
    let api = format!("https://127.0.0.1:{}", site.api_port);
    let cli = |args: &[&str]| {
        let out = ok(Command::new(lab)
            .arg("site-manager")
            .args(args)
            .arg("--data")
            .arg(site.site_manager_dir.join("data"))
            .args(["--api", &api])
            .output());
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "site-manager {args:?}: {stdout}{stderr}");
        stdout.into_owned()
    };
    let listed: Value = ok(serde_json::from_str(&cli(&["test", "list", &vpg, "--json"])));
    assert_eq!(listed.as_array().map(Vec::len), Some(4), "{listed}");
    for (k, t) in tests.iter().enumerate() {
        let id = t["id"].as_str().unwrap_or_default();
        if k == 1 {
            let out = cli(&["test", "stop", id, "--result", "fail", "--notes", "note 1"]);
            assert!(out.contains("Stopped") && out.contains("fail"), "{out}");
            continue;
        }
        let r = ok(sm.post(
            &format!("/api/v1/failover-tests/{id}/stop"),
            json!({"result": "pass", "notes": format!("note {k}")}),
        ));
        let stop_task = r["task"]["id"].as_str().unwrap_or_default().to_string();
        ok(sm.wait_until(&format!("/api/v1/tasks/{stop_task}"), Duration::from_secs(30), "the test to stop", |t| {
            t["status"] == "Completed"
        }));
    }
    let records: Vec<Value> =
        ok(sm.get(&format!("/api/v1/vpgs/{vpg}/failover-tests"))).as_array().cloned().unwrap_or_default();
    for r in &records {
        assert_eq!(r["state"], "Stopped", "{r}");
        assert!(r["stopped_ms"].as_u64() >= r["started_ms"].as_u64(), "{r}");
        assert!(r["exports"].as_array().is_some_and(Vec::is_empty), "{r}");
    }
    ok(sm.wait_until(&format!("/api/v1/vpgs/{vpg}"), Duration::from_secs(10), "Protecting after the tests", |v| {
        v["status"] == "Protecting"
    }));
    let first = records.iter().find(|r| r["id"] == tests[0]["id"]).cloned().unwrap_or_default();
    assert!(first["written_bytes"].as_u64().unwrap_or(0) >= 65536, "{first}");
    assert_eq!(first["result"], "pass");
    let du_after = du(&recovery_stacks);
    println!("stack space: {du_before} bytes before, {du_running} running, {du_after} after");
    assert!(du_running > du_after, "stopping the tests freed nothing: {du_running} -> {du_after}");
    // A new test at the first test's checkpoint does not see its writes.
    let again = ok(sm.post(&format!("/api/v1/vpgs/{vpg}/failover-tests"), json!({"checkpoints": [ids[0]]})));
    let task = again["task"]["id"].as_str().unwrap_or_default().to_string();
    ok(sm.wait_until(&format!("/api/v1/tasks/{task}"), Duration::from_secs(60), "the test to run", |t| {
        t["status"] == "Completed"
    }));
    let t = ok(sm.get(&format!("/api/v1/failover-tests/{}", again["tests"][0]["id"].as_str().unwrap_or_default())));
    let got = export_hash(t["exports"][0]["uri"].as_str().unwrap_or_default(), &scratch);
    let disk0 = site.disks.iter().position(|d| json!(d) == t["exports"][0]["disk"]).unwrap_or(0);
    assert_eq!(got, refs[0].1[disk0], "a new test at the same checkpoint starts clean");
    // A checkpoint nobody holds is refused by name; records can be
    // discarded.
    let bad = sm.post(&format!("/api/v1/vpgs/{vpg}/failover-tests"), json!({"checkpoints": [999_999]}));
    assert!(bad.as_ref().err().is_some_and(|e| format!("{e:#}").contains("checkpoints[0]")), "{bad:?}");
    let discarded = ok(sm.call("DELETE", &format!("/api/v1/vpgs/{vpg}/failover-tests"), None));
    assert_eq!(discarded["discarded"], 4, "{discarded}");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let writes = writer.join().unwrap_or(0);
    assert!(writes > 10, "replication ran on during the tests ({writes} writes)");
    // The replica never saw a test's write: no checkpoint of the journal
    // holds a test VM's marker.
    let journal_dir = site.agents[spec.hosts].journal(&vpg);
    for a in site.agents.iter_mut() {
        a.stop();
    }
    let journal = ok(vdsa::journal::Journal::open(journal_dir, vdsa::journal::JournalConfig::default()));
    for cp in ok(journal.checkpoints()) {
        let view = ok(journal.open_view(cp.id));
        let mut sector = vec![0u8; 512];
        ok(view.read(site.disks[0], area + 3 * 512, &mut sector));
        assert!(
            !markers.iter().any(|(_, m)| sector.starts_with(m.as_bytes())),
            "checkpoint {} holds a test's write",
            cp.id
        );
    }
}

/// Failover to checkpoint k reads back the reference at k and stops
/// replication into it; roll back, fail over to k+3, which reads the
/// reference at k+3; roll back again and the VPG protects again. Nothing
/// the recovered VM wrote reaches the journal.
/// What the failover tests below share: a one-VM site with an 8 MiB disk,
/// four checkpoints after random writes, and their reference hashes.
pub(crate) struct FailoverSite {
    pub dir: tempfile::TempDir,
    /// Where exports are copied to be hashed.
    pub scratch: std::path::PathBuf,
    pub site: ProtectedSite,
    pub guest: NbdClient,
    pub model: Vec<u8>,
    pub refs: Vec<(u64, Vec<u8>)>,
    n: u64,
}

pub(crate) const FO_SIZE: u64 = 8 << 20;

impl FailoverSite {
    pub fn start(vdsa_args: Vec<(usize, Vec<String>)>) -> FailoverSite {
        if !qemu_available() {
            panic!("qemu-storage-daemon is missing: integration/run-tests installs qemu-utils");
        }
        let dir = ok(tempfile::tempdir());
        let scratch = dir.path().join("scratch");
        ok(std::fs::create_dir_all(&scratch));
        let lab = Path::new(env!("CARGO_BIN_EXE_lab"));
        let spec = SiteSpec {
            hosts: 1,
            disk_bytes: FO_SIZE,
            site_manager_args: Vec::new(),
            vdsa_args,
            checkpoint_interval_ms: 3_600_000,
            quiesce_hook: Vec::new(),
            disk_image: None,
            recovery_vsphere_host: None,
            recovery_link_proxy: false,
        };
        let site = ok(ProtectedSite::start(lab, dir.path(), &spec, |m| println!("{m}")));
        let guest = ok(site.vms[0].guest());
        let mut fs =
            FailoverSite { dir, scratch, site, guest, model: vec![0u8; FO_SIZE as usize], refs: Vec::new(), n: 0 };
        for round in 0..4 {
            fs.write();
            let id = fs.checkpoint(&format!("fo-{round}"));
            fs.refs.push((id, fs.model.clone()));
        }
        fs
    }

    pub fn vpg(&self) -> String {
        self.site.vpg.clone()
    }

    /// 30 writes by the protected VM, mirrored in the model.
    fn write(&mut self) {
        for _ in 0..30 {
            self.n += 1;
            let n = self.n;
            let off = (n * 7919 * 4096) % (FO_SIZE - 65536) + (n % 4096);
            let data: Vec<u8> = (0..(512 + (n * 37) % 60_000)).map(|i| (i * 31 + n) as u8).collect();
            ok(self.guest.write(off, &data));
            self.model[off as usize..off as usize + data.len()].copy_from_slice(&data);
        }
    }

    /// A named checkpoint, once durable.
    fn checkpoint(&self, name: &str) -> u64 {
        let sm = ok(self.site.sm());
        let cp = ok(sm.post(&format!("/api/v1/vpgs/{}/checkpoints", self.vpg()), json!({ "name": name })));
        let id = cp["id"].as_u64().unwrap_or(0);
        let w = ok(sm.get(&format!("/api/v1/vpgs/{}/checkpoints/{id}/wait?timeout_ms=30000", self.vpg())));
        assert_eq!(w["durable"], true, "checkpoint {id}: {w}");
        id
    }

    /// A named checkpoint once durable, taken again while a resync left by
    /// a roll back still runs (a checkpoint taken then is recorded
    /// inconsistent, by design, and never offered).
    fn checkpoint_after_sync(&self, name: &str) -> u64 {
        let sm = ok(self.site.sm());
        let start = std::time::Instant::now();
        loop {
            let cp = ok(sm.post(&format!("/api/v1/vpgs/{}/checkpoints", self.vpg()), json!({ "name": name })));
            let id = cp["id"].as_u64().unwrap_or(0);
            let w = ok(sm.get(&format!("/api/v1/vpgs/{}/checkpoints/{id}/wait?timeout_ms=30000", self.vpg())));
            let syncing = w["reason"].as_str().is_some_and(|r| r.contains("a sync runs"));
            if !syncing || start.elapsed() > Duration::from_secs(60) {
                assert_eq!(w["durable"], true, "checkpoint {id}: {w}");
                return id;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// Fails over to `cp`; the failover's record once it is served. Prints
    /// the RTO: from the command to the first block read from the export.
    fn failover_to(&self, cp: u64) -> Value {
        let sm = ok(self.site.sm());
        let t = std::time::Instant::now();
        let r = ok(sm.post(&format!("/api/v1/vpgs/{}/failover", self.vpg()), json!({ "checkpoint": cp })));
        assert_eq!(r["vpg"]["status"], "Failover", "{r}");
        let done = self.wait_task(&r["task"], "the failover");
        assert_eq!(done["completion"], "Success", "{done}");
        let f = ok(sm.get(&format!("/api/v1/failover-tests/{}", r["failover"]["id"].as_str().unwrap_or_default())));
        let (addr, name) = split_uri(f["exports"][0]["uri"].as_str().unwrap_or_default());
        let mut first = [0u8; 4096];
        ok(ok(NbdClient::connect_tcp(&addr, &name)).read(0, &mut first));
        println!("failover RTO (command to the first 4 KiB read from the export): {} ms", t.elapsed().as_millis());
        f
    }

    fn roll_back(&self) {
        let sm = ok(self.site.sm());
        let r = ok(sm.post(&format!("/api/v1/vpgs/{}/failover/rollback", self.vpg()), json!({})));
        assert_eq!(r["vpg"]["status"], "Protecting", "{r}");
        self.wait_task(&r["task"], "the roll back");
    }

    pub fn wait_task(&self, task: &Value, what: &str) -> Value {
        let id = task["id"].as_str().unwrap_or_default();
        ok(ok(self.site.sm())
            .wait_until(&format!("/api/v1/tasks/{id}"), Duration::from_secs(120), what, |t| t["status"] == "Completed"))
    }

    /// The recovery VDSA's replica file of the VM's disk, cut to the disk.
    pub fn replica_hash(&self) -> blake3::Hash {
        let path =
            self.site.agents[1].journal(&self.vpg()).join("replica").join(format!("{}.img", self.site.disks[0].0));
        let mut bytes = ok(std::fs::read(&path));
        bytes.truncate(FO_SIZE as usize);
        blake3::hash(&bytes)
    }
}

/// Random bytes written through an export by a recovered VM, mirrored in
/// `image`.
fn recovered_vm_writes(uri: &str, image: &mut [u8], seed: u64, writes: usize, max_len: u64) {
    let (addr, name) = split_uri(uri);
    let mut recovered = ok(NbdClient::connect_tcp(&addr, &name));
    let mut x = seed;
    for _ in 0..writes {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let len = 4096 + (x >> 20) % max_len;
        let off = (x >> 7) % (FO_SIZE - len);
        let data: Vec<u8> = (0..len).map(|i| ((x >> 3) as u8).wrapping_add(i as u8)).collect();
        ok(recovered.write(off, &data));
        image[off as usize..(off + len) as usize].copy_from_slice(&data);
    }
    ok(recovered.flush());
}

#[test]
fn failover_rolls_back_fails_over_to_another_checkpoint_and_commits_it_into_the_replica() {
    let _turn = crate::take_turns();
    let mut fs = FailoverSite::start(Vec::new());
    let vpg = fs.vpg();
    let scratch = fs.scratch.clone();
    let replica_before = fs.replica_hash();
    // Fail over to the first checkpoint: the export is that checkpoint;
    // the source's later writes do not reach it; the recovered VM writes.
    let (k, k_image) = fs.refs[0].clone();
    let f = fs.failover_to(k);
    let uri = f["exports"][0]["uri"].as_str().unwrap_or_default().to_string();
    assert_eq!(export_hash(&uri, &scratch), blake3::hash(&k_image), "failover to {k}");
    {
        let sm = ok(fs.site.sm());
        let vpg_now = ok(sm.get(&format!("/api/v1/vpgs/{vpg}")));
        assert_eq!(vpg_now["status"], "Failover", "{vpg_now}");
        let refused = sm.post(&format!("/api/v1/vpgs/{vpg}/checkpoints"), json!({"name": "during failover"}));
        assert!(refused.is_err(), "no checkpoint is taken while failed over: {refused:?}");
    }
    fs.write();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(export_hash(&uri, &scratch), blake3::hash(&k_image), "replication into a failed-over VPG stopped");
    let mut scribbled = k_image.clone();
    recovered_vm_writes(&uri, &mut scribbled, 1, 4, 8192);
    assert_eq!(fs.replica_hash(), replica_before, "nothing touches the replica before commit");
    // Roll back: the VPG protects again, and a new checkpoint holds the
    // source's writes made meanwhile.
    fs.roll_back();
    fs.write();
    ok(ok(fs.site.sm()).wait_until(
        &format!("/api/v1/vpgs/{vpg}"),
        Duration::from_secs(120),
        "protection again",
        |v| v["status"] == "Protecting",
    ));
    let after = fs.checkpoint_after_sync("after the roll back");
    let after_image = fs.model.clone();
    // Fail over to k+3, which knows nothing of the first failover's write.
    let (k3, k3_image) = fs.refs[3].clone();
    let f = fs.failover_to(k3);
    let uri = f["exports"][0]["uri"].as_str().unwrap_or_default().to_string();
    assert_eq!(export_hash(&uri, &scratch), blake3::hash(&k3_image), "failover to {k3} after the roll back");
    // The recovered VM writes; then commit: the replica becomes k+3 plus
    // those writes, while the export keeps serving.
    let mut expected = k3_image.clone();
    recovered_vm_writes(&uri, &mut expected, 2, 40, 60_000);
    let sm = ok(fs.site.sm());
    let r = ok(sm.post(&format!("/api/v1/vpgs/{vpg}/failover/commit"), json!({})));
    assert_eq!(r["vpg"]["status"], "PromotingAndNeedReverseConfiguration", "{r}");
    let done = fs.wait_task(&r["task"], "the promotion");
    assert_eq!(done["completion"], "Success", "{done}");
    assert_eq!(done["progress"], 100, "{done}");
    let v = ok(sm.get(&format!("/api/v1/vpgs/{vpg}")));
    assert_eq!(v["status"], "NeedReverseConfiguration", "{v}");
    assert_eq!(fs.replica_hash(), blake3::hash(&expected), "replica = checkpoint {k3} + the recovered VM's writes");
    assert_ne!(blake3::hash(&expected), blake3::hash(&after_image), "the checkpoint taken after k+3 is not in it");
    assert_eq!(export_hash(&uri, &scratch), blake3::hash(&expected), "the export serves the promoted replica");
    // The recovered VM keeps writing: into the replica itself now.
    recovered_vm_writes(&uri, &mut expected, 3, 5, 8192);
    assert_eq!(fs.replica_hash(), blake3::hash(&expected), "writes after promotion land in the replica");
    let refused = sm.post(&format!("/api/v1/vpgs/{vpg}/failover/rollback"), json!({}));
    assert!(
        refused.as_ref().is_err_and(|e| e.to_string().contains("cannot be rolled back")),
        "a committed failover is not rolled back: {refused:?}"
    );
    let records: Vec<Value> =
        ok(sm.get(&format!("/api/v1/vpgs/{vpg}/failover-tests"))).as_array().cloned().unwrap_or_default();
    assert_eq!(records.len(), 2, "{records:?}");
    assert!(records.iter().all(|r| r["purpose"] == "failover"), "{records:?}");
    assert!(
        records.iter().any(|r| r["checkpoint"] == k3 && r["state"] == "Running" && r["promoted_ms"].is_u64()),
        "{records:?}"
    );
    println!("checkpoint {after} (after the roll back) protected; failover to {k3} committed and promoted");
}

#[test]
fn sigkill_of_the_recovery_vdsa_during_promotion_resumes_it_exactly() {
    let _turn = crate::take_turns();
    // The promotion is paced to 1 MiB/s, so that it is still running when
    // the recovery VDSA is killed.
    let pace = ["--promotion-bytes-per-sec".to_string(), (1u64 << 20).to_string()];
    let mut fs = FailoverSite::start(vec![(1, pace.to_vec())]);
    let vpg = fs.vpg();
    let scratch = fs.scratch.clone();
    let (k, k_image) = fs.refs[2].clone();
    let f = fs.failover_to(k);
    let uri = f["exports"][0]["uri"].as_str().unwrap_or_default().to_string();
    let mut expected = k_image.clone();
    recovered_vm_writes(&uri, &mut expected, 7, 100, 65_536);
    let r = ok(ok(fs.site.sm()).post(&format!("/api/v1/vpgs/{vpg}/failover/commit"), json!({})));
    let task = r["task"]["id"].as_str().unwrap_or_default().to_string();
    let midway = ok(ok(fs.site.sm()).wait_until(
        &format!("/api/v1/tasks/{task}"),
        Duration::from_secs(60),
        "the promotion to be under way",
        |t| t["progress"].as_u64().is_some_and(|p| p >= 10) || t["status"] == "Completed",
    ));
    assert_ne!(midway["status"], "Completed", "the promotion ended before the kill: {midway}");
    fs.site.agents[1].kill();
    println!("recovery VDSA SIGKILLed during the promotion at {}%", midway["progress"]);
    let lab = Path::new(env!("CARGO_BIN_EXE_lab"));
    let dir = fs.dir.path().to_path_buf();
    let pace: Vec<&str> = pace.iter().map(String::as_str).collect();
    ok(fs.site.restart_agent(lab, &dir, 1, &pace));
    let done = fs.wait_task(&r["task"], "the promotion after the restart");
    assert_eq!(done["completion"], "Success", "{done}");
    assert!(fs.site.agents[1].log_text().contains("promotion complete"), "the restarted VDSA finished it");
    assert_eq!(fs.replica_hash(), blake3::hash(&expected), "replica = checkpoint {k} + every acknowledged write");
    let f =
        ok(ok(fs.site.sm())
            .get(&format!("/api/v1/failover-tests/{}", r["failover"]["id"].as_str().unwrap_or_default())));
    let uri = f["exports"][0]["uri"].as_str().unwrap_or_default().to_string();
    assert_eq!(export_hash(&uri, &scratch), blake3::hash(&expected), "the export serves it after the restart");
}
