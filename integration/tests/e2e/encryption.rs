//! The encryption signal end to end: two VMs on two hosts whose disks are
//! ext4 file systems of plain text files are protected in one VPG by a
//! real site manager and VDSAs (QEMU's mirror as the tap). Ordinary work (files rewritten in
//! place with text, a compressed archive copied into free space) raises
//! nothing; then an attack spread over both hosts rewrites most files in
//! place with encrypted-looking bytes, and the `encryption_suspected`
//! alert must come within 10 s, name both VMs and the first checkpoint of
//! the attack (within one). Then the clean-point search, with k = 4 and with k = 1
//! and a host-side check that reads the attacked files from each test's
//! export with `debugfs`, must return exactly the checkpoint a scan of
//! every checkpoint in the range (read from the recovery journal) finds:
//! the last one before the attack's first write; a check that always
//! passes or always fails must say so instead of naming a checkpoint.

use integration::ext4_lab::{self, Ext4Image, BLOCK};
use integration::site_lab::{ProtectedSite, SiteSpec};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use std::time::{Duration, Instant};
use vdsa::nbd::client::NbdClient;

fn lab() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_BIN_EXE_lab"))
}

fn alerts_of(site: &ProtectedSite, kind: &str) -> Vec<Value> {
    let all = site.sm().and_then(|sm| sm.get("/api/v1/alerts")).unwrap_or(Value::Null);
    all.as_array()
        .map(|a| a.iter().filter(|x| x["kind"] == kind && x["cleared_ms"].is_null()).cloned().collect())
        .unwrap_or_default()
}

/// The first checkpoint the VPG's encryption alert names, and the signal
/// as the API shows it.
fn alert_first_checkpoint(site: &ProtectedSite) -> (u64, Value) {
    let signal = site
        .sm()
        .and_then(|sm| sm.get(&format!("/api/v1/vpgs/{}/encryption", site.vpg)))
        .unwrap_or_else(|e| panic!("{e}"));
    (signal["alert"]["first_checkpoint"].as_u64().unwrap_or(0), signal)
}

fn newest_checkpoint(site: &ProtectedSite) -> u64 {
    let path = format!("/api/v1/vpgs/{}/checkpoints?limit=1", site.vpg);
    site.sm().and_then(|sm| sm.get(&path)).ok().and_then(|v| v[0]["id"].as_u64()).unwrap_or(0)
}

/// Rewrites `blocks` of the guest's disk, 64 KiB at a time where they run
/// on, with what `content` gives for each run.
fn rewrite(guest: &mut NbdClient, blocks: &[u64], mut content: impl FnMut(usize) -> Vec<u8>) {
    let mut i = 0;
    while i < blocks.len() {
        let mut j = i + 1;
        while j < blocks.len() && blocks[j] == blocks[j - 1] + 1 && j - i < 16 {
            j += 1;
        }
        let data = content((j - i) * BLOCK as usize);
        guest.write(blocks[i] * BLOCK, &data).unwrap_or_else(|e| panic!("guest write: {e}"));
        i = j;
    }
}

#[test]
fn an_attack_that_encrypts_files_in_place_raises_the_alert_within_ten_seconds_and_ordinary_work_does_not() {
    if !integration::kvm_lab::qemu_available() {
        println!("skipped: qemu-storage-daemon is not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let image: Ext4Image = ext4_lab::build(dir.path(), 240, 24 << 10, 48 << 20, 7)
        .unwrap_or_else(|e| panic!("making the ext4 image: {e:#}"));
    let mut spec = SiteSpec::one_vm();
    spec.hosts = 2;
    spec.disk_image = Some(image.path.clone());
    let site = ProtectedSite::start(&lab(), dir.path(), &spec, |s| println!("{s}"))
        .unwrap_or_else(|e| panic!("starting the site: {e:#}"));
    let mut guests: Vec<NbdClient> = site.vms.iter().map(|v| v.guest().unwrap_or_else(|e| panic!("{e}"))).collect();
    let mut rng = StdRng::seed_from_u64(11);

    // Ordinary work for 8 s: files rewritten in place with new text, and a
    // compressed archive (zstd of text: as random as a zip or a video)
    // copied into free space.
    let archive = ext4_lab::compressed_archive(900, 4 << 20).unwrap_or_else(|e| panic!("{e}"));
    let free = &image.free[..(archive.len() as u64).div_ceil(BLOCK).min(image.free.len() as u64) as usize];
    let ordinary_until = Instant::now() + Duration::from_secs(8);
    let mut copied = 0usize;
    let mut touched = std::collections::HashSet::new();
    while Instant::now() < ordinary_until {
        let vm = rng.gen_range(0..guests.len());
        let f = &image.files[rng.gen_range(0..image.files.len())];
        touched.insert((vm, f.name.clone()));
        let seed = rng.gen();
        rewrite(&mut guests[vm], &f.blocks, |n| ext4_lab::plain_text(seed, n));
        if copied < free.len() {
            let run = &free[copied..(copied + 8).min(free.len())];
            rewrite(&mut guests[vm], run, |n| {
                let from = (copied * BLOCK as usize).min(archive.len());
                let mut piece = archive[from..(from + n).min(archive.len())].to_vec();
                piece.resize(n, 0);
                piece
            });
            copied += run.len();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_secs(2));
    assert!(alerts_of(&site, "encryption_suspected").is_empty(), "ordinary work raised the alert");

    // The attack: 70 % of the files, every block rewritten in place with
    // encrypted-looking bytes, over about two seconds.
    let before = newest_checkpoint(&site);
    let started = Instant::now();
    // The attack takes files of both VMs in turn. The files the check
    // reads: attacked ones ordinary work left alone, the first of them
    // attacked first.
    let mut victims: Vec<(usize, &ext4_lab::Ext4File)> =
        image.files.iter().enumerate().filter(|_| rng.gen_ratio(7, 10)).map(|(i, f)| (i % 2, f)).collect();
    victims.sort_by_key(|(vm, f)| touched.contains(&(*vm, f.name.clone())));
    let checked: Vec<(usize, String, blake3::Hash)> = victims
        .iter()
        .filter(|(vm, f)| !touched.contains(&(*vm, f.name.clone())))
        .take(20)
        .map(|(vm, f)| (*vm, f.name.clone(), f.hash))
        .collect();
    assert!(checked.iter().any(|c| c.0 == 0) && checked.iter().any(|c| c.0 == 1), "files of both VMs are checked");
    for (vm, f) in &victims {
        rewrite(&mut guests[*vm], &f.blocks, |n| ext4_lab::random_bytes(&mut rng, n));
        std::thread::sleep(Duration::from_millis(8));
    }
    let alert = loop {
        if let Some(a) = alerts_of(&site, "encryption_suspected").into_iter().next() {
            break a;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "no alert 10 s after the attack began");
        std::thread::sleep(Duration::from_millis(200));
    };
    let delay = started.elapsed();
    println!("alert after {:.1} s: {}", delay.as_secs_f64(), alert["message"]);
    assert_eq!(alert["subject"], site.vpg.as_str());
    assert!(alert["message"].as_str().is_some_and(|m| m.contains("vm-0") && m.contains("vm-1")), "{alert}");
    let (first, signal) = alert_first_checkpoint(&site);
    assert!(
        first == before + 1 || first == before + 2,
        "the attack's first checkpoint is {}..={}, the alert names {first}: {signal}",
        before + 1,
        before + 2
    );
    let metrics = site.sm().and_then(|sm| sm.get_bytes("/metrics")).unwrap_or_default();
    let metrics = String::from_utf8_lossy(&metrics);
    assert!(
        metrics.lines().any(|l| l.starts_with("vdsa_vpg_encryption_suspected{") && l.ends_with(" 1")),
        "the metric says so too"
    );

    // The clean-point search over the checkpoints around the attack.
    std::thread::sleep(Duration::from_secs(3));
    let expect = dir.path().join("expect.json");
    let map: serde_json::Map<String, Value> =
        checked.iter().map(|(vm, n, h)| (format!("{vm}:{n}"), Value::String(h.to_hex().to_string()))).collect();
    std::fs::write(&expect, serde_json::to_vec(&map).unwrap_or_default()).unwrap_or_else(|e| panic!("{e}"));
    let check =
        vec![lab().display().to_string(), "clean-point-check".into(), "--expect".into(), expect.display().to_string()];
    let from = before.saturating_sub(8);
    let mut answers = Vec::new();
    for k in [4, 1] {
        let sm = site.sm().unwrap_or_else(|e| panic!("{e}"));
        let task = sm
            .post(
                &format!("/api/v1/vpgs/{}/clean-point-search", site.vpg),
                serde_json::json!({"from": from, "k": k, "check": check, "test_timeout_secs": 120}),
            )
            .unwrap_or_else(|e| panic!("starting the search: {e}"));
        let id = task["id"].as_str().unwrap_or_default().to_string();
        let done = sm.get(&format!("/api/v1/tasks/{id}/wait?timeout_ms=300000")).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(done["completion"], "Success", "{done}");
        let r = &done["result"];
        println!("k = {k}: {} in {} rounds over {} checkpoints", r["summary"], r["rounds"], r["checkpoints_in_range"]);
        assert_eq!(r["outcome"]["outcome"], "found", "{r}");
        assert_eq!(r["monotonic"], true, "{r}");
        answers.push((r["outcome"]["clean"].as_u64().unwrap_or(0), r["range"][1].as_u64().unwrap_or(0)));
    }
    // A check that always passes, or always fails: a clear answer, not a
    // checkpoint.
    for (check, want) in [("true", "no_failing_point"), ("false", "no_passing_point")] {
        let sm = site.sm().unwrap_or_else(|e| panic!("{e}"));
        let task = sm
            .post(
                &format!("/api/v1/vpgs/{}/clean-point-search", site.vpg),
                serde_json::json!({"from": from, "k": 4, "check": [check]}),
            )
            .unwrap_or_else(|e| panic!("{e}"));
        let id = task["id"].as_str().unwrap_or_default().to_string();
        let done = sm.get(&format!("/api/v1/tasks/{id}/wait?timeout_ms=300000")).unwrap_or_else(|e| panic!("{e}"));
        println!("check {check:?}: {}", done["result"]["summary"]);
        assert_eq!(done["result"]["outcome"]["outcome"], want, "{done}");
    }
    // The truth, by a scan of every checkpoint of the range read straight
    // from the recovery journal.
    let newest = answers.iter().map(|a| a.1).min().unwrap_or(0);
    let (mut site, agents_dir) = (site, dir.path().join("scan"));
    std::fs::create_dir_all(&agents_dir).unwrap_or_else(|e| panic!("{e}"));
    for a in site.agents.iter_mut() {
        a.stop();
    }
    let recovery = site.agents.last().unwrap_or_else(|| panic!("no recovery VDSA"));
    let journal = vdsa::journal::Journal::open(recovery.journal(&site.vpg), vdsa::journal::JournalConfig::default())
        .unwrap_or_else(|e| panic!("{e}"));
    let mut last_clean = 0;
    for cp in journal.checkpoints().unwrap_or_default().iter().filter(|c| c.id.0 >= from && c.id.0 <= newest) {
        if !cp.kind.is_recoverable() {
            continue;
        }
        let view = journal.open_view(cp.id).unwrap_or_else(|e| panic!("{e}"));
        let mut clean = true;
        for vm in 0..2 {
            let mut bytes = vec![0u8; site.disk_bytes[vm] as usize];
            view.read(site.disks[vm], 0, &mut bytes).unwrap_or_else(|e| panic!("{e}"));
            let img = agents_dir.join("scan.raw");
            std::fs::write(&img, &bytes).unwrap_or_else(|e| panic!("{e}"));
            let files: Vec<&(usize, String, blake3::Hash)> = checked.iter().filter(|c| c.0 == vm).collect();
            let names: Vec<&str> = files.iter().map(|c| c.1.as_str()).collect();
            let hashes = ext4_lab::file_hashes(&img, &names).unwrap_or_default();
            clean &= hashes.len() == files.len() && hashes.iter().zip(&files).all(|(h, c)| *h == c.2);
        }
        if clean {
            assert!(last_clean == 0 || last_clean < cp.id.0, "not monotonic");
            last_clean = cp.id.0;
        }
    }
    assert!(last_clean >= from, "the scan found no clean checkpoint");
    for (k, (answer, _)) in [4, 1].iter().zip(&answers) {
        assert_eq!(*answer, last_clean, "k = {k}: the search answered {answer}, the scan finds {last_clean}");
    }
    assert!(last_clean < first, "the last clean checkpoint {last_clean} is before the alert's first {first}");
}

/// The clean-point search with its check inside a VM: each test's export
/// is attached to a check VM (the guest kit's kernel under QEMU) that
/// hashes the files' blocks with the guest's own tools; the search (k = 2)
/// must find the checkpoint recorded just before the attack.
#[test]
fn the_clean_point_search_runs_its_check_inside_a_vm() {
    if !integration::kvm_lab::qemu_available() {
        println!("skipped: qemu-storage-daemon is not installed");
        return;
    }
    if let Err(e) = integration::guest::GuestKit::prepare() {
        println!("skipped: the guest kit is not available: {e:#}");
        return;
    }
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let site = ProtectedSite::start(&lab(), dir.path(), &SiteSpec::one_vm(), |s| println!("{s}"))
        .unwrap_or_else(|e| panic!("starting the site: {e:#}"));
    let mut guest = site.vms[0].guest().unwrap_or_else(|e| panic!("{e}"));
    let (at, len) = (1u64 << 20, 2usize << 20);
    let text = ext4_lab::plain_text(5, len);
    guest.write(at, &text).unwrap_or_else(|e| panic!("{e}"));
    let files_from = newest_checkpoint(&site) + 2;
    std::thread::sleep(Duration::from_secs(5));
    let seen = newest_checkpoint(&site);
    let expected = loop {
        let n = newest_checkpoint(&site);
        if n > seen {
            break n;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut rng = StdRng::seed_from_u64(3);
    guest.write(at, &ext4_lab::random_bytes(&mut rng, len)).unwrap_or_else(|e| panic!("{e}"));
    std::thread::sleep(Duration::from_secs(4));
    let sha = integration::exports::sha256_hex(&text, dir.path()).unwrap_or_else(|e| panic!("{e}"));
    let command = format!(
        "[ \"$(dd if=/dev/vda bs=4096 skip={} count={} 2>/dev/null | sha256sum | cut -d' ' -f1)\" = \"{sha}\" ]",
        at / 4096,
        len / 4096
    );
    let check = vec![lab().display().to_string(), "clean-point-guest-check".into(), "--command".into(), command];
    let sm = site.sm().unwrap_or_else(|e| panic!("{e}"));
    let task = sm
        .post(
            &format!("/api/v1/vpgs/{}/clean-point-search", site.vpg),
            serde_json::json!({"from": files_from, "k": 2, "check": check, "test_timeout_secs": 300}),
        )
        .unwrap_or_else(|e| panic!("{e}"));
    let id = task["id"].as_str().unwrap_or_default().to_string();
    let done = sm.get(&format!("/api/v1/tasks/{id}/wait?timeout_ms=900000")).unwrap_or_else(|e| panic!("{e}"));
    let r = &done["result"];
    println!("{} in {} rounds over {} checkpoints", r["summary"], r["rounds"], r["checkpoints_in_range"]);
    assert_eq!(done["completion"], "Success", "{done}");
    assert_eq!(r["outcome"]["clean"].as_u64(), Some(expected), "{r}");
    // The verdicts and what the check VM said are in the tests' records.
    let tests = sm.get(&format!("/api/v1/vpgs/{}/failover-tests", site.vpg)).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        tests
            .as_array()
            .into_iter()
            .flatten()
            .any(|t| t["notes"].as_str().is_some_and(|n| n.contains("CHECKVM: exit 0"))),
        "a passing check VM's console is in its test's notes"
    );
}

/// The signal against a real guest kernel: a Linux guest (the guest kit's
/// kernel under QEMU) mounts the ext4 file system of a protected VM's
/// disk through that VM's QEMU, whose mirror is the VDSA's tap; it
/// rewrites some files with text, then encrypts every file in place with
/// `dd` from `/dev/urandom`. The alert must come within 10 s of the
/// attack's start (the guest's console says when) and name the checkpoint
/// interval of the attack's first write: after the newest checkpoint when
/// the attack began, and at most one after the newest when the first
/// encrypted file was synced (both read from the console's marks, so a
/// guest slowed by a loaded host does not move the bounds). The text
/// rewrites raise nothing.
#[test]
fn a_real_guest_encrypting_its_ext4_files_raises_the_alert() {
    if !integration::kvm_lab::qemu_available() {
        println!("skipped: qemu-storage-daemon is not installed");
        return;
    }
    let kit = match integration::guest::GuestKit::prepare() {
        Ok(k) => k,
        Err(e) => {
            println!("skipped: the guest kit is not available: {e:#}");
            return;
        }
    };
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let image = ext4_lab::build(dir.path(), 160, 24 << 10, 32 << 20, 17).unwrap_or_else(|e| panic!("{e:#}"));
    let mut spec = SiteSpec::one_vm();
    spec.disk_image = Some(image.path.clone());
    let site = ProtectedSite::start(&lab(), dir.path(), &spec, |s| println!("{s}"))
        .unwrap_or_else(|e| panic!("starting the site: {e:#}"));
    let init = "i=0; while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done\n\
        mkdir -p /mnt; mount -t ext4 /dev/vda /mnt || echo 'GUESTWL: mount failed'\n\
        for f in /mnt/doc-000*.txt /mnt/doc-001*.txt; do tr a-z A-Z < $f > /tmp/x; dd if=/tmp/x of=$f conv=notrunc,fsync 2>/dev/null; done\n\
        echo 'GUESTWL: ordinary done'; sleep 6\n\
        echo 'GUESTWL: attack'\n\
        n=0; for f in /mnt/doc-*.txt; do dd if=/dev/urandom of=$f bs=4096 count=6 conv=notrunc,fsync 2>/dev/null; \
        n=$((n+1)); [ $n -eq 1 ] && echo 'GUESTWL: first file encrypted'; done\n\
        echo 'GUESTWL: attack done'; sleep 20";
    let initramfs = dir.path().join("workload-initrd");
    kit.build_initramfs(
        &integration::guest::Initramfs {
            modules: integration::guest::BLOCK_MODULES.to_vec(),
            programs: Vec::new(),
            init: init.into(),
        },
        &initramfs,
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
    let console = dir.path().join("workload.log");
    let mut vm = kit
        .boot(&integration::guest::GuestConfig {
            boot: integration::guest::Boot::Kernel { initramfs, append: String::new() },
            memory_mb: 256,
            disks: Vec::new(),
            nbd_disks: vec![format!("nbd+unix:///vmdisk?socket={}", site.vms[0].guest_sock.display())],
            read_only_nbd_disks: Vec::new(),
            forwards: Vec::new(),
            console: console.clone(),
        })
        .unwrap_or_else(|e| panic!("{e:#}"));
    vm.wait_for("GUESTWL: ordinary done", Duration::from_secs(300)).unwrap_or_else(|e| panic!("{e:#}"));
    vm.wait_for("GUESTWL: attack", Duration::from_secs(60)).unwrap_or_else(|e| panic!("{e:#}"));
    let before = newest_checkpoint(&site);
    let started = Instant::now();
    assert!(alerts_of(&site, "encryption_suspected").is_empty(), "the text rewrites raised the alert");
    vm.wait_for("GUESTWL: first file encrypted", Duration::from_secs(60)).unwrap_or_else(|e| panic!("{e:#}"));
    let synced = newest_checkpoint(&site);
    let alert = loop {
        if let Some(a) = alerts_of(&site, "encryption_suspected").into_iter().next() {
            break a;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no alert 10 s after the guest's attack began: {}",
            vm.console_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    println!("alert {:.1} s after the guest's attack began: {}", started.elapsed().as_secs_f64(), alert["message"]);
    assert!(alert["message"].as_str().is_some_and(|m| m.contains("vm-0")), "{alert}");
    let (first, signal) = alert_first_checkpoint(&site);
    assert!(
        (before..=synced + 1).contains(&first),
        "the guest's attack began after checkpoint {before} was recorded and its first file was synced by \
         checkpoint {}; the alert names {first}: {signal}",
        synced + 1
    );
}
