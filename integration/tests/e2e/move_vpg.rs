//! Move, reverse protection and failback. The protected VM writes without
//! a pause until the move powers it off (through its QEMU monitor, from
//! its VDSA); the move takes a last checkpoint, fails over to it and
//! commits, from the operator command. The promoted replica, and the
//! export the moved VM runs from, equal the source disk as the VM left
//! it: every write it was told is done, none lost. Then the moved VM runs
//! from the promoted replica and writes; reverse protection makes the
//! former source disk its replica, brought up to date by a delta sync
//! that sends only the blocks that differ (counted on the link); failback
//! (a failover the other way, committed) ends with the original host's
//! disk equal to the recovered one.

use crate::failover_test::{export_hash, FailoverSite, FO_SIZE};
use integration::kvm_lab::StorageDaemon;
use serde_json::{json, Value};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

fn ok<T, E: std::fmt::Display>(r: Result<T, E>) -> T {
    r.unwrap_or_else(|e| panic!("{e:#}"))
}

#[test]
fn a_move_loses_no_write_and_failback_after_reverse_protection_sends_only_the_delta() {
    let _turn = crate::take_turns();
    let mut fs = FailoverSite::start(Vec::new());
    let vpg = fs.vpg();
    let scratch = fs.scratch.clone();
    // The VM writes until it is powered off; `acked` counts the writes it
    // was told are done.
    let mut guest = std::mem::replace(&mut fs.guest, ok(fs.site.vms[0].guest()));
    let writer = std::thread::spawn(move || {
        let mut acked = 0u64;
        let mut x = 99u64;
        loop {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let len = 512 + (x >> 20) % 30_000;
            let off = (x >> 7) % (FO_SIZE - len);
            let data: Vec<u8> = (0..len).map(|i| ((x >> 3) as u8).wrapping_add(i as u8)).collect();
            if guest.write(off, &data).is_err() {
                return acked;
            }
            acked += 1;
            std::thread::sleep(Duration::from_millis(1));
        }
    });
    std::thread::sleep(Duration::from_secs(1));
    // The move, from the operator command.
    let lab = Path::new(env!("CARGO_BIN_EXE_lab"));
    let api = format!("https://127.0.0.1:{}", fs.site.api_port);
    let out = ok(Command::new(lab)
        .args(["site-manager", "vpg", "--data"])
        .arg(fs.site.site_manager_dir.join("data"))
        .args(["--api", &api, "--json", "move", &vpg])
        .output());
    assert!(out.status.success(), "vpg move: {}", String::from_utf8_lossy(&out.stderr));
    let v: Value = ok(serde_json::from_slice(&out.stdout));
    assert_eq!(v["status"], "NeedReverseConfiguration", "{v}");
    let acked = writer.join().unwrap_or_else(|_| panic!("the writer panicked"));
    assert!(acked > 100, "the VM wrote until the move: {acked} writes");
    assert!(!fs.site.vms[0].is_running(), "the move powered the VM off");
    let source = ok(fs.site.vms[0].image_hash());
    assert_eq!(fs.replica_hash(), source, "the moved disk equals the source disk: no write lost");
    let tasks: Vec<Value> = ok(ok(fs.site.sm()).get("/api/v1/tasks")).as_array().cloned().unwrap_or_default();
    let moved = tasks.iter().find(|t| t["kind"] == "move").cloned().unwrap_or_default();
    assert_eq!(moved["completion"], "Success", "{moved}");
    let failover = moved["result"]["failover"].as_str().unwrap_or_default().to_string();
    let f = ok(ok(fs.site.sm()).get(&format!("/api/v1/failover-tests/{failover}")));
    let uri = f["exports"][0]["uri"].as_str().unwrap_or_default().to_string();
    assert_eq!(export_hash(&uri, &scratch), source, "the moved VM's export serves the source disk");
    println!("moved after {acked} acknowledged writes, at checkpoint {}", moved["result"]["checkpoint"]);

    // The moved VM runs from the promoted replica at the recovery host and
    // writes incompressible data (so the link counts every byte sent).
    let recovered_image = fs.site.agents[1].journal(&vpg).join("replica").join(format!("{}.img", fs.site.disks[0].0));
    let vm_dir = fs.dir.path().join("recovered-vm");
    ok(std::fs::create_dir_all(&vm_dir));
    let recovered = ok(StorageDaemon::start(&vm_dir, &recovered_image, false));
    let mut g = ok(recovered.guest());
    let mut changed_blocks = std::collections::BTreeSet::new();
    for i in 0..40u64 {
        let len = 4096 * (1 + i % 8);
        let off = (i * 7919 * 4096) % (FO_SIZE - len);
        let mut data = vec![0u8; len as usize];
        blake3::Hasher::new().update(&i.to_le_bytes()).finalize_xof().fill(&mut data);
        ok(g.write(off, &data));
        changed_blocks.extend(off / 4096..(off + len) / 4096);
    }
    ok(g.flush());
    let original_disk = fs.site.vms[0].image.clone();
    let sm = ok(fs.site.sm());
    let v = ok(sm.get(&format!("/api/v1/vpgs/{vpg}")));
    let vm_id = v["settings"]["vms"][0]["id"].clone();
    let reverse = json!({"vms": [{"vm": vm_id, "hypervisor_ref": recovered.vdsa_qmp_sock,
        "disks": [{"disk": fs.site.disks[0].0, "device": "src", "seed_path": original_disk}]}]});
    let r = ok(sm.post(&format!("/api/v1/vpgs/{vpg}/reverse-protection"), reverse));
    assert_eq!(r["vpg"]["status"], "Initializing", "{r}");
    assert_eq!(r["vpg"]["settings"]["vms"][0]["host"], v["settings"]["vms"][0]["recovery_host"], "direction swapped");
    fs.wait_task(&r["task"], "the reverse protection's delta sync");
    let roles: Vec<Value> = ok(sm.get(&format!("/api/v1/vpgs/{vpg}/roles"))).as_array().cloned().unwrap_or_default();
    let source = roles.iter().find(|r| r["role"]["kind"] == "source").cloned().unwrap_or_default();
    let link = source["role"]["link_bytes"].as_u64().unwrap_or(0);
    let delta = changed_blocks.len() as u64 * 4096;
    let blocks = FO_SIZE / 4096;
    println!("delta sync: {link} bytes on the link for {delta} bytes that differ ({blocks} blocks hashed); a full copy is {FO_SIZE}");
    assert!(link >= delta, "the blocks that differ crossed the link: {link} < {delta}");
    assert!(
        link <= delta + blocks * 64 + (256 << 10),
        "only the blocks that differ (and hashes) crossed the link: {link} bytes for {delta} differing"
    );
    // The recovered VM keeps writing, protected now; then failback.
    for i in 40..60u64 {
        let mut data = vec![0u8; 8192];
        blake3::Hasher::new().update(&i.to_le_bytes()).finalize_xof().fill(&mut data);
        ok(g.write((i * 104_729 * 4096) % (FO_SIZE - 8192), &data));
    }
    ok(g.flush());
    let cp = ok(sm.post(&format!("/api/v1/vpgs/{vpg}/checkpoints"), json!({"name": "before failback"})));
    let id = cp["id"].as_u64().unwrap_or(0);
    let w = ok(sm.get(&format!("/api/v1/vpgs/{vpg}/checkpoints/{id}/wait?timeout_ms=30000")));
    assert!(w["durable"] == true && w["consistent"] == true, "{w}");
    drop(g);
    let recovered_hash = blake3::hash(&ok(std::fs::read(&recovered_image))[..FO_SIZE as usize]);
    let r = ok(sm.post(&format!("/api/v1/vpgs/{vpg}/failover"), json!({"checkpoint": id})));
    fs.wait_task(&r["task"], "the failback");
    let f = ok(sm.get(&format!("/api/v1/failover-tests/{}", r["failover"]["id"].as_str().unwrap_or_default())));
    let uri = f["exports"][0]["uri"].as_str().unwrap_or_default().to_string();
    assert_eq!(export_hash(&uri, &scratch), recovered_hash, "the failback serves the recovered disk");
    let r = ok(sm.post(&format!("/api/v1/vpgs/{vpg}/failover/commit"), json!({})));
    fs.wait_task(&r["task"], "the failback's promotion");
    let back = fs.site.agents[0].journal(&vpg).join("replica").join(format!("{}.img", fs.site.disks[0].0));
    let back_hash = blake3::hash(&ok(std::fs::read(&back))[..FO_SIZE as usize]);
    assert_eq!(back_hash, recovered_hash, "after failback the original host's disk equals the recovered one");
    let v = ok(sm.get(&format!("/api/v1/vpgs/{vpg}")));
    assert_eq!(v["status"], "NeedReverseConfiguration", "{v}");
    assert_eq!(v["settings"]["vms"][0]["recovery_host"], r["vpg"]["settings"]["vms"][0]["recovery_host"]);
    drop(recovered);
}
