//! Two site managers paired over their APIs, as real processes: a VPG at
//! the protected site replicates into a VDSA of the recovery site (the
//! recovery site sets up the target from its copy of the VPG), its
//! checkpoint is durable there with the source's bytes; site pairing
//! tokens are refused when wrong or reused; and after unpairing neither
//! site's VDSAs accept the other's.

use integration::site_lab::{AgentProcess, SiteManagerProcess};
use serde_json::{json, Value};
use std::path::Path;
use std::time::{Duration, Instant};
use vdsa::journal::{Journal, JournalConfig};

fn lab() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_lab"))
}

fn ok<T>(r: anyhow::Result<T>) -> T {
    r.unwrap_or_else(|e| panic!("{e:#}"))
}

/// Whether a replication link from the VDSA whose identity is in
/// `identity` to the VDSA listening on `port` passes the TLS handshake
/// (the listener then waits for a hello: the read times out) or is
/// refused (the read fails with the handshake's alert).
fn link_accepted(identity: &Path, port: u16) -> bool {
    let id = ok(vdsa::wire::tls::SiteIdentity::load(identity).map_err(Into::into));
    let cfg = ok(id.client_config().map_err(Into::into));
    let tcp = ok(std::net::TcpStream::connect(("127.0.0.1", port)).map_err(Into::into));
    ok(tcp.set_read_timeout(Some(Duration::from_millis(1500))).map_err(Into::into));
    let Ok((mut r, _w)) = vdsa::wire::tls::connect(cfg, tcp) else { return false };
    matches!(vdsa::wire::frame::read_frame(&mut r), Err(vdsa::wire::frame::FrameError::Silent))
}

fn copy_identity(from: &Path, to: &Path) {
    ok(std::fs::create_dir_all(to.join("peers")).map_err(Into::into));
    for f in ["node.pem", "node.key"] {
        ok(std::fs::copy(from.join(f), to.join(f)).map_err(Into::into));
    }
    for e in ok(std::fs::read_dir(from.join("peers")).map_err(Into::into)).flatten() {
        ok(std::fs::copy(e.path(), to.join("peers").join(e.file_name())).map_err(Into::into));
    }
}

fn status_of(sm: &SiteManagerProcess, method: &str, path: &str, body: Option<Value>) -> String {
    match sm.call(method, path, body) {
        Ok(v) => format!("ok {v}"),
        Err(e) => format!("{e:#}"),
    }
}

fn wait_host(sm: &SiteManagerProcess, id: &str) {
    ok(sm.wait_until(&format!("/api/v1/hosts/{id}"), Duration::from_secs(60), "the VDSA to register", |h| {
        h["vdsa"] == "installed"
    }));
}

#[test]
fn paired_sites_replicate_and_unpairing_revokes_trust() {
    let _turn = crate::take_turns();
    assert!(integration::kvm_lab::qemu_available(), "qemu-storage-daemon is needed");
    let dir = ok(tempfile::tempdir().map_err(Into::into));
    let d = dir.path();
    let prod = ok(SiteManagerProcess::start(lab(), &d.join("prod"), &["--name", "prod"]));
    let dr = ok(SiteManagerProcess::start(lab(), &d.join("dr"), &["--name", "dr"]));
    let (prod_host, prod_token) = ok(prod.add_host("kvm-prod"));
    let (dr_host, dr_token) = ok(dr.add_host("kvm-dr"));
    let prod_agent =
        ok(AgentProcess::start(lab(), &d.join("a-prod"), "kvm-prod", &prod.management_address(), &prod_token));
    let dr_agent = ok(AgentProcess::start(lab(), &d.join("a-dr"), "kvm-dr", &dr.management_address(), &dr_token));
    wait_host(&prod, &prod_host);
    wait_host(&dr, &dr_host);
    let prod_identity = d.join("a-prod/data/identity");
    let dr_identity = d.join("a-dr/data/identity");
    // Before pairing, the sites' VDSAs do not trust each other.
    assert!(!link_accepted(&prod_identity, dr_agent.replication_port), "an unpaired site's VDSA was accepted");

    // Wrong tokens.
    let token = ok(dr.post("/api/v1/site/pairing-tokens", json!({})));
    let token = token["token"].as_str().unwrap_or_default().to_string();
    let dr_addr = format!("127.0.0.1:{}", dr.api_port);
    let pin = token.rsplit_once('.').map(|(_, p)| p.to_string()).unwrap_or_default();
    let made_up = status_of(
        &prod,
        "POST",
        "/api/v1/site/peer",
        Some(json!({"address": dr_addr, "token": format!("00ff.{pin}")})),
    );
    assert!(made_up.contains("403") && made_up.contains("unknown"), "{made_up}");
    let secret = token.split_once('.').map(|(s, _)| s.to_string()).unwrap_or_default();
    let wrong_ca = status_of(
        &prod,
        "POST",
        "/api/v1/site/peer",
        Some(json!({"address": dr_addr, "token": format!("{secret}.{}", "ab".repeat(32))})),
    );
    assert!(wrong_ca.contains("403") && wrong_ca.contains("CA"), "{wrong_ca}");
    let malformed = status_of(&prod, "POST", "/api/v1/site/peer", Some(json!({"address": dr_addr, "token": "nodot"})));
    assert!(malformed.contains("400") && malformed.contains("token"), "{malformed}");

    // Pairing.
    let peer = ok(prod.post("/api/v1/site/peer", json!({"address": dr_addr, "token": token})));
    let dr_site = ok(dr.get("/api/v1/site"));
    assert_eq!(peer["site"], dr_site["id"]);
    let prod_site = ok(prod.get("/api/v1/site"));
    assert_eq!(ok(dr.get("/api/v1/site/peer"))["site"], prod_site["id"]);
    // The token cannot be used again, by another site.
    let other = ok(SiteManagerProcess::start(lab(), &d.join("other"), &["--name", "other"]));
    let reused = status_of(&other, "POST", "/api/v1/site/peer", Some(json!({"address": dr_addr, "token": token})));
    assert!(reused.contains("403") && reused.contains("used"), "{reused}");
    drop(other);

    // The sites' VDSAs now trust each other, both ways.
    let start = Instant::now();
    while !(link_accepted(&prod_identity, dr_agent.replication_port)
        && link_accepted(&dr_identity, prod_agent.replication_port))
    {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the paired sites' VDSAs do not trust each other:\n{}\n{}",
            prod_agent.log_text(),
            dr_agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(300));
    }

    // Identities as they are while paired: used after unpairing, the
    // client still trusts the other site, so only the listener can refuse.
    let (prod_paired, dr_paired) = (d.join("prod-identity-paired"), d.join("dr-identity-paired"));
    copy_identity(&prod_identity, &prod_paired);
    copy_identity(&dr_identity, &dr_paired);

    // A VPG at prod recovering to dr's host.
    let vm_dir = d.join("vm");
    ok(std::fs::create_dir_all(&vm_dir).map_err(Into::into));
    let image = vm_dir.join("disk.raw");
    let size = 16u64 << 20;
    ok(std::fs::File::create(&image).and_then(|f| f.set_len(size)).map_err(Into::into));
    let vm = ok(integration::kvm_lab::StorageDaemon::start(&vm_dir, &image, false));
    let disk = protection_groups::DiskId::new();
    let settings = json!({
        "name": "cross-site", "recovery_site": dr_site["id"],
        "vms": [{"id": uuid::Uuid::new_v4(), "name": "vm-0", "host": prod_host, "hypervisor_ref": vm.vdsa_qmp_sock,
                 "disks": [{"id": disk.0, "name": "vm-0-disk", "size_bytes": size, "device": "src"}],
                 "recovery_host": dr_host}],
        "checkpoint_interval_ms": 1000,
    });
    // prod learns dr's hosts at the next exchange.
    let created = ok(prod.create_vpg(&settings));
    let vpg = created["vpg"]["id"].as_str().unwrap_or_default().to_string();
    let task = created["task"]["id"].as_str().unwrap_or_default().to_string();
    let t = ok(prod.get(&format!("/api/v1/tasks/{task}/wait?timeout_ms=120000")));
    assert_eq!(t["completion"], "Success", "the cross-site VPG did not reach Protecting: {t}");
    let copies = ok(dr.get("/api/v1/site/peer/vpgs"));
    assert!(copies.as_array().is_some_and(|c| c.iter().any(|v| v["id"] == vpg.as_str())), "dr keeps no copy: {copies}");

    // Writes, a named checkpoint durable at dr, its bytes equal the source's.
    let mut guest = ok(vm.guest());
    let mut data = vec![0u8; 64 << 10];
    for (i, b) in data.iter_mut().enumerate() {
        *b = (i * 7 % 251) as u8;
    }
    for k in 0..32u64 {
        ok(guest.write(k * (256 << 10), &data).map_err(Into::into));
    }
    ok(guest.flush().map_err(Into::into));
    let cp = ok(prod.post(&format!("/api/v1/vpgs/{vpg}/checkpoints"), json!({"name": "after-writes"})));
    let id = cp["id"].as_u64().unwrap_or_default();
    let rec = ok(prod.get(&format!("/api/v1/vpgs/{vpg}/checkpoints/{id}/wait?timeout_ms=60000")));
    assert!(rec["consistent"] == true && rec["durable"] == true, "the checkpoint is not durable at dr: {rec}");
    let source_hash = ok(vm.image_hash());

    // Unpairing is refused while the VPG spans the sites.
    let refused = status_of(&prod, "DELETE", "/api/v1/site/peer", None);
    assert!(refused.contains("409") && refused.contains("cross-site"), "{refused}");
    let removed = ok(prod.call("DELETE", &format!("/api/v1/vpgs/{vpg}"), None));
    let task = removed["task"]["id"].as_str().unwrap_or_default().to_string();
    let t = ok(prod.get(&format!("/api/v1/tasks/{task}/wait?timeout_ms=60000")));
    assert_eq!(t["completion"], "Success", "{t}");
    ok(dr.wait_until("/api/v1/site/peer/vpgs", Duration::from_secs(20), "dr to drop its copy", |v| {
        v.as_array().is_some_and(Vec::is_empty)
    }));
    ok(prod.call("DELETE", "/api/v1/site/peer", None));
    let gone = status_of(&dr, "GET", "/api/v1/site/peer", None);
    assert!(gone.contains("404"), "dr still shows the pairing: {gone}");

    // Neither site's VDSAs accept the other's any longer.
    let start = Instant::now();
    while link_accepted(&prod_paired, dr_agent.replication_port)
        || link_accepted(&dr_paired, prod_agent.replication_port)
    {
        assert!(start.elapsed() < Duration::from_secs(30), "a VDSA still accepts the unpaired site's VDSAs");
        std::thread::sleep(Duration::from_millis(300));
    }
    // The removed VPG's journal at dr still holds the checkpoint with the
    // source's bytes (the guest wrote nothing after it).
    drop(dr_agent);
    let journal = ok(Journal::open(d.join("a-dr/data/journals").join(&vpg).join("journal"), JournalConfig::default())
        .map_err(Into::into));
    let view = ok(journal.open_view(protection_groups::CheckpointId(id)).map_err(Into::into));
    let mut bytes = vec![0u8; size as usize];
    ok(view.read(disk, 0, &mut bytes).map_err(Into::into));
    assert_eq!(blake3::hash(&bytes), source_hash, "the recovery site's bytes at the checkpoint differ from the source");
    drop(prod_agent);
}
