//! A recovery journal whose volume fills under a site manager: the VPG's
//! protection pauses with a status naming the cause, the protected site's
//! writes wait in its queues, and once the volume has room the journal is
//! reopened, protection resumes on its own, and a new checkpoint holds
//! exactly the source's bytes: nothing lost or silently dropped.

use crate::SmallDisk;
use integration::kvm_lab::qemu_available;
use integration::site_lab::{ProtectedSite, SiteSpec};
use rand::{RngCore, SeedableRng};
use serde_json::json;
use std::path::Path;
use std::time::{Duration, Instant};

fn ok<T>(r: anyhow::Result<T>) -> T {
    r.unwrap_or_else(|e| panic!("{e:#}"))
}

#[test]
fn a_full_recovery_journal_pauses_protection_and_it_resumes_with_nothing_lost() {
    assert!(qemu_available(), "qemu-storage-daemon is needed");
    let _turn = crate::take_turns();
    let dir = ok(tempfile::tempdir().map_err(Into::into));
    let d = dir.path();
    // The recovery host's whole data folder on a small volume, with room
    // held by a filler file to free later.
    let small = SmallDisk::mount(&d.join("recovery-0"), "64M");
    let filler = small.0.join("filler");
    ok(std::fs::write(&filler, vec![0x5Au8; 24 << 20]).map_err(Into::into));
    let lab = Path::new(env!("CARGO_BIN_EXE_lab"));
    let spec = SiteSpec::one_vm();
    let site = ok(ProtectedSite::start(lab, d, &spec, |m| println!("{m}")));
    let sm = ok(site.sm());
    let vpg = site.vpg.clone();
    let mut guest = ok(site.vms[0].guest());
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let mut block = vec![0u8; 1 << 20];
    let started = Instant::now();
    let paused = loop {
        assert!(started.elapsed() < Duration::from_secs(120), "protection never paused");
        rng.fill_bytes(&mut block);
        let at = (rng.next_u64() % 8) << 20;
        ok(guest.write(at, &block).map_err(Into::into));
        std::thread::sleep(Duration::from_millis(200));
        let v = ok(sm.get(&format!("/api/v1/vpgs/{vpg}")));
        if v["status"] == "Error" {
            break v;
        }
    };
    println!("paused: {}", paused["status_reason"]);
    assert_eq!(paused["paused"], true, "{paused}");
    let reason = paused["status_reason"].as_str().unwrap_or_default();
    assert!(reason.contains("paused") && reason.contains("journal"), "{reason}");
    // Room again: the journal is reopened and protection resumes.
    ok(std::fs::remove_file(&filler).map_err(Into::into));
    ok(sm.wait_until(&format!("/api/v1/vpgs/{vpg}"), Duration::from_secs(90), "protection to resume", |v| {
        v["status"] == "Protecting"
    }));
    let cp = ok(sm.post(&format!("/api/v1/vpgs/{vpg}/checkpoints"), json!({"name": "after-resume"})));
    let id = cp["id"].as_u64().unwrap_or_default();
    let start = Instant::now();
    loop {
        let rec = ok(sm.get(&format!("/api/v1/vpgs/{vpg}/checkpoints/{id}/wait?timeout_ms=30000")));
        if rec["durable"] == true {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(90), "the checkpoint after the resume is not durable: {rec}");
    }
    let source = ok(site.vms[0].image_hash());
    let mut site = site;
    let recovered = ok(site.recovered_hash(id, 0, 8 << 20));
    assert_eq!(recovered, source, "the recovered bytes differ from the source after the pause");
    drop(site);
    drop(small);
}

/// A protected VM whose QEMU goes away (deleted or shut down) pauses the
/// VPG with a status naming the VM's monitor; when the VM is back, its tap
/// is attached again with a full copy and protection resumes on its own,
/// with a new checkpoint holding the VM's bytes.
#[test]
fn a_vm_that_goes_away_pauses_protection_until_it_is_back() {
    assert!(qemu_available(), "qemu-storage-daemon is needed");
    let _turn = crate::take_turns();
    let dir = ok(tempfile::tempdir().map_err(Into::into));
    let d = dir.path();
    let lab = Path::new(env!("CARGO_BIN_EXE_lab"));
    let spec = SiteSpec::one_vm();
    let mut site = ok(ProtectedSite::start(lab, d, &spec, |m| println!("{m}")));
    let vpg = site.vpg.clone();
    let image = site.vms[0].image.clone();
    drop(site.vms.remove(0));
    let paused = ok(ok(site.sm()).wait_until(
        &format!("/api/v1/vpgs/{vpg}"),
        Duration::from_secs(60),
        "the VPG to pause",
        |v| v["status"] == "MissingConfiguration",
    ));
    let reason = paused["status_reason"].as_str().unwrap_or_default().to_string();
    assert!(reason.contains("paused") && reason.contains("vdsa-qmp.sock"), "{reason}");
    // The VM is back (same image, same sockets) and writes.
    let vm = ok(integration::kvm_lab::StorageDaemon::start(&d.join("vm-0"), &image, false));
    let mut guest = ok(vm.guest());
    ok(guest.write(4096, &[0xC3u8; 65536]).map_err(Into::into));
    let sm = ok(site.sm());
    ok(sm.wait_until(&format!("/api/v1/vpgs/{vpg}"), Duration::from_secs(90), "protection to resume", |v| {
        v["status"] == "Protecting"
    }));
    let cp = ok(sm.post(&format!("/api/v1/vpgs/{vpg}/checkpoints"), json!({"name": "back"})));
    let id = cp["id"].as_u64().unwrap_or_default();
    let rec = ok(sm.get(&format!("/api/v1/vpgs/{vpg}/checkpoints/{id}/wait?timeout_ms=60000")));
    assert!(rec["consistent"] == true && rec["durable"] == true, "{rec}");
    let source = ok(vm.image_hash());
    let recovered = ok(site.recovered_hash(id, 0, 8 << 20));
    assert_eq!(recovered, source, "the recovered bytes differ from the VM's after it came back");
}
