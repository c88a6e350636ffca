//! The whole protected site lost: a VPG of a paired site replicates into
//! the recovery site; then the protected site's manager, its VDSA and the
//! VM are SIGKILLed and not restarted. The recovery site's manager fails
//! the VPG over from its own copy of the definition, exactly (the export's
//! bytes equal the source's at the checkpoint), rolls back and fails over
//! to another checkpoint, commits it into the replica; and the protected
//! site's manager, started again without its VDSA, takes the status from
//! the exchange (its sources stay stopped).

use integration::site_lab::{free_port, AgentProcess, SiteManagerProcess};
use serde_json::{json, Value};
use std::path::Path;
use std::time::Duration;
use vdsa::nbd::client::NbdClient;

fn lab() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_lab"))
}

fn ok<T>(r: anyhow::Result<T>) -> T {
    r.unwrap_or_else(|e| panic!("{e:#}"))
}

const SIZE: u64 = 8 << 20;

/// Reads a whole `nbd://HOST:PORT/NAME` export with our own client.
fn export_hash(uri: &str) -> blake3::Hash {
    let (addr, name) = ok(integration::exports::split_uri(uri));
    let mut c = ok(NbdClient::connect_tcp(&addr, &name).map_err(Into::into));
    let mut bytes = vec![0u8; SIZE as usize];
    for (i, chunk) in bytes.chunks_mut(1 << 20).enumerate() {
        ok(c.read((i as u64) << 20, chunk).map_err(Into::into));
    }
    blake3::hash(&bytes)
}

fn wait_task(sm: &SiteManagerProcess, task: &Value, what: &str) -> Value {
    let id = task["id"].as_str().unwrap_or_default();
    let done =
        ok(sm.wait_until(&format!("/api/v1/tasks/{id}"), Duration::from_secs(120), what, |t| {
            t["status"] == "Completed"
        }));
    assert_eq!(done["completion"], "Success", "{what}: {done}");
    done
}

#[test]
fn with_the_protected_site_gone_the_recovery_site_fails_over_exactly_from_its_copy() {
    let _turn = crate::take_turns();
    assert!(integration::kvm_lab::qemu_available(), "qemu-storage-daemon is needed");
    let dir = ok(tempfile::tempdir().map_err(Into::into));
    let d = dir.path();
    let (prod_api, prod_mgmt) = (free_port(), free_port());
    let prod = ok(SiteManagerProcess::start_on(lab(), &d.join("prod"), prod_api, prod_mgmt, &["--name", "prod"]));
    let dr = ok(SiteManagerProcess::start(lab(), &d.join("dr"), &["--name", "dr"]));
    let (prod_host, prod_token) = ok(prod.add_host("kvm-prod"));
    let (dr_host, dr_token) = ok(dr.add_host("kvm-dr"));
    let mut prod_agent =
        ok(AgentProcess::start(lab(), &d.join("a-prod"), "kvm-prod", &prod.management_address(), &prod_token));
    let _dr_agent = ok(AgentProcess::start(lab(), &d.join("a-dr"), "kvm-dr", &dr.management_address(), &dr_token));
    let token = ok(dr.post("/api/v1/site/pairing-tokens", json!({})));
    let dr_addr = format!("127.0.0.1:{}", dr.api_port);
    ok(prod.post("/api/v1/site/peer", json!({"address": dr_addr, "token": token["token"]})));
    let dr_site = ok(dr.get("/api/v1/site"));

    // A VPG at prod recovering to dr's host, named checkpoints only.
    let vm_dir = d.join("vm");
    ok(std::fs::create_dir_all(&vm_dir).map_err(Into::into));
    let image = vm_dir.join("disk.raw");
    ok(std::fs::File::create(&image).and_then(|f| f.set_len(SIZE)).map_err(Into::into));
    let vm = ok(integration::kvm_lab::StorageDaemon::start(&vm_dir, &image, false));
    let disk = protection_groups::DiskId::new();
    let settings = json!({
        "name": "lost-site", "recovery_site": dr_site["id"],
        "vms": [{"id": uuid::Uuid::new_v4(), "name": "vm-0", "host": prod_host, "hypervisor_ref": vm.vdsa_qmp_sock,
                 "disks": [{"id": disk.0, "name": "vm-0-disk", "size_bytes": SIZE, "device": "src"}],
                 "recovery_host": dr_host}],
        "checkpoint_interval_ms": 3_600_000,
    });
    let created = ok(prod.create_vpg(&settings));
    let vpg = created["vpg"]["id"].as_str().unwrap_or_default().to_string();
    wait_task(&prod, &created["task"], "the cross-site VPG to protect");

    // Writes and three named checkpoints, each durable at dr.
    let mut guest = ok(vm.guest());
    let mut model = vec![0u8; SIZE as usize];
    let mut refs: Vec<(u64, blake3::Hash)> = Vec::new();
    for round in 0..3u64 {
        for k in 0..40u64 {
            let n = round * 40 + k;
            let off = (n * 7919 * 4096) % (SIZE - 65536) + (n % 4096);
            let data: Vec<u8> = (0..(512 + (n * 37) % 60_000)).map(|i| (i * 31 + n) as u8).collect();
            ok(guest.write(off, &data).map_err(Into::into));
            model[off as usize..off as usize + data.len()].copy_from_slice(&data);
        }
        let cp = ok(prod.post(&format!("/api/v1/vpgs/{vpg}/checkpoints"), json!({"name": format!("c{round}")})));
        let id = cp["id"].as_u64().unwrap_or_default();
        let rec = ok(prod.get(&format!("/api/v1/vpgs/{vpg}/checkpoints/{id}/wait?timeout_ms=60000")));
        assert!(rec["consistent"] == true && rec["durable"] == true, "not durable at dr: {rec}");
        refs.push((id, blake3::hash(&model)));
    }
    // The exchange has told dr the VPG's status (Protecting) by now.
    ok(dr.wait_until("/api/v1/site/peer/vpgs", Duration::from_secs(20), "dr's copy to protect", |v| {
        v.as_array().is_some_and(|c| c.iter().any(|v| v["id"] == vpg.as_str() && v["status"] == "Protecting"))
    }));

    // The protected site is gone: its manager, its VDSA and the VM.
    prod.kill();
    prod_agent.kill();
    drop(guest);
    drop(vm);
    println!("the protected site is gone (site manager, VDSA and VM SIGKILLed)");

    // Fail over at dr to the second checkpoint, from dr's copy alone.
    let (k1, k1_hash) = refs[1];
    let r = ok(dr.post(&format!("/api/v1/vpgs/{vpg}/failover"), json!({"checkpoint": k1})));
    assert_eq!(r["vpg"]["status"], "Failover", "{r}");
    wait_task(&dr, &r["task"], "the failover at dr");
    let f = ok(dr.get(&format!("/api/v1/failover-tests/{}", r["failover"]["id"].as_str().unwrap_or_default())));
    let uri = f["exports"][0]["uri"].as_str().unwrap_or_default().to_string();
    assert_eq!(export_hash(&uri), k1_hash, "failover to {k1} with the protected site gone");
    // Roll back and fail over to the newest checkpoint instead.
    let r = ok(dr.post(&format!("/api/v1/vpgs/{vpg}/failover/rollback"), json!({})));
    wait_task(&dr, &r["task"], "the roll back at dr");
    let r = ok(dr.post(&format!("/api/v1/vpgs/{vpg}/failover"), json!({"checkpoint": null})));
    wait_task(&dr, &r["task"], "the failover to the newest checkpoint");
    let f = ok(dr.get(&format!("/api/v1/failover-tests/{}", r["failover"]["id"].as_str().unwrap_or_default())));
    let (k2, k2_hash) = refs[2];
    assert_eq!(f["checkpoint"], k2, "the newest checkpoint: {f}");
    let uri = f["exports"][0]["uri"].as_str().unwrap_or_default().to_string();
    assert_eq!(export_hash(&uri), k2_hash, "failover to the newest checkpoint {k2}");
    // Commit: the replica is the recovered disk.
    let r = ok(dr.post(&format!("/api/v1/vpgs/{vpg}/failover/commit"), json!({})));
    wait_task(&dr, &r["task"], "the promotion at dr");
    let replica = d.join("a-dr/data/journals").join(&vpg).join("journal/replica").join(format!("{}.img", disk.0));
    let mut bytes = ok(std::fs::read(&replica).map_err(Into::into));
    bytes.truncate(SIZE as usize);
    assert_eq!(blake3::hash(&bytes), k2_hash, "the promoted replica is the disk at {k2}");
    let copy = ok(dr.get("/api/v1/site/peer/vpgs"));
    assert!(
        copy.as_array()
            .is_some_and(|c| c.iter().any(|v| v["id"] == vpg.as_str() && v["status"] == "NeedReverseConfiguration")),
        "{copy}"
    );

    // The protected site's manager comes back (its host does not): it
    // takes the VPG's status from the recovery site.
    let prod = ok(SiteManagerProcess::start_on(lab(), &d.join("prod"), prod_api, prod_mgmt, &["--name", "prod"]));
    let v = ok(prod.wait_until(&format!("/api/v1/vpgs/{vpg}"), Duration::from_secs(60), "prod to learn it", |v| {
        v["status"] == "NeedReverseConfiguration"
    }));
    println!("prod learned: {} ({})", v["status"], v["status_reason"]);
}
