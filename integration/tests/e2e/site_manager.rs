//! Trust between a site manager and its VDSAs, as real processes: one-time
//! registration tokens, the pinned site CA, and manager generations that
//! fence a site manager restored from a backup until `reclaim`.

use integration::site_lab::{AgentProcess, SiteManagerProcess};
use std::path::Path;
use std::time::{Duration, Instant};

fn lab() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_lab"))
}

/// Waits for the agent to exit on its own; returns its log.
fn exits(a: &mut AgentProcess, what: &str) -> String {
    let start = Instant::now();
    while a.is_running() {
        assert!(start.elapsed() < Duration::from_secs(30), "{what}: the agent kept running:\n{}", a.log_text());
        std::thread::sleep(Duration::from_millis(100));
    }
    a.log_text()
}

fn host_state(sm: &SiteManagerProcess, id: &str) -> String {
    sm.get(&format!("/api/v1/hosts/{id}")).map(|h| h["vdsa"].as_str().unwrap_or("").to_string()).unwrap_or_default()
}

fn wait_state(sm: &SiteManagerProcess, id: &str, want: &str) {
    sm.wait_until(&format!("/api/v1/hosts/{id}"), Duration::from_secs(30), want, |h| h["vdsa"] == want)
        .unwrap_or_else(|e| panic!("{e:#}"));
}

#[test]
fn wrong_or_reused_registration_tokens_are_refused() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let sm = SiteManagerProcess::start(lab(), &dir.path().join("sm"), &[]).unwrap_or_else(|e| panic!("{e:#}"));
    let (h1, t1) = sm.add_host("kvm-1").unwrap_or_else(|e| panic!("{e:#}"));
    let mut a = AgentProcess::start(lab(), &dir.path().join("a"), "kvm-1", &sm.management_address(), &t1)
        .unwrap_or_else(|e| panic!("{e:#}"));
    wait_state(&sm, &h1, "installed");
    // The same token again.
    let mut b = AgentProcess::start(lab(), &dir.path().join("b"), "kvm-1b", &sm.management_address(), &t1)
        .unwrap_or_else(|e| panic!("{e:#}"));
    let log = exits(&mut b, "a reused token");
    assert!(log.contains("already used"), "{log}");
    // A made-up secret with the right CA hash.
    let pin = t1.rsplit_once('.').map(|(_, p)| p.to_string()).unwrap_or_default();
    let mut c = AgentProcess::start(
        lab(),
        &dir.path().join("c"),
        "kvm-1c",
        &sm.management_address(),
        &format!("0123abcd.{pin}"),
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
    let log = exits(&mut c, "an unknown token");
    assert!(log.contains("registration token is unknown"), "{log}");
    // A token naming another site manager's CA: the VDSA refuses the
    // site manager before it sends the secret.
    let (_, t2) = sm.add_host("kvm-2").unwrap_or_else(|e| panic!("{e:#}"));
    let forged = format!("{}.{}", t2.split_once('.').map(|(s, _)| s).unwrap_or(""), "ab".repeat(32));
    let mut d = AgentProcess::start(lab(), &dir.path().join("d"), "kvm-2", &sm.management_address(), &forged)
        .unwrap_or_else(|e| panic!("{e:#}"));
    let log = exits(&mut d, "a token pinning another CA");
    assert!(log.contains("not the one the registration token names"), "{log}");
    assert_ne!(host_state(&sm, &h1), "down");
    assert!(a.is_running());
    a.stop();
}

#[test]
fn a_site_manager_restored_from_a_backup_cannot_steer_until_it_reclaims() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let smdir = dir.path().join("sm");
    let ports = (integration::site_lab::free_port(), integration::site_lab::free_port());
    let start =
        || SiteManagerProcess::start_on(lab(), &smdir, ports.0, ports.1, &[]).unwrap_or_else(|e| panic!("{e:#}"));
    let sm = start();
    let (h, t) = sm.add_host("kvm-1").unwrap_or_else(|e| panic!("{e:#}"));
    let g_backup = sm.get("/api/v1/site").map(|s| s["generation"].as_u64().unwrap_or(0)).unwrap_or(0);
    sm.stop();
    // The backup: the data folder as it is now.
    let backup = dir.path().join("backup");
    copy_dir(&smdir.join("data"), &backup);
    // Two more starts: the VDSA obeys the newest generation.
    let sm = start();
    let mut a = AgentProcess::start(lab(), &dir.path().join("a"), "kvm-1", &sm.management_address(), &t)
        .unwrap_or_else(|e| panic!("{e:#}"));
    wait_state(&sm, &h, "installed");
    sm.stop();
    let sm = start();
    let g_newest = sm.get("/api/v1/site").map(|s| s["generation"].as_u64().unwrap_or(0)).unwrap_or(0);
    assert_eq!(g_newest, g_backup + 2);
    wait_state(&sm, &h, "installed");
    sm.stop();
    // Restore the backup: it starts with an older generation than the
    // VDSA has obeyed.
    std::fs::remove_dir_all(smdir.join("data")).unwrap_or_else(|e| panic!("{e}"));
    copy_dir(&backup, &smdir.join("data"));
    let sm = start();
    let g_restored = sm.get("/api/v1/site").map(|s| s["generation"].as_u64().unwrap_or(0)).unwrap_or(0);
    assert!(g_restored < g_newest, "{g_restored} vs {g_newest}");
    std::thread::sleep(Duration::from_secs(4));
    let host = sm.get(&format!("/api/v1/hosts/{h}")).unwrap_or_default();
    assert_ne!(host["vdsa"], "installed", "a VDSA accepted a stale site manager: {host}\n{}", a.log_text());
    assert!(a.log_text().contains("ignoring a stale site manager"), "{}", a.log_text());
    // Reclaim: the generation goes above what the VDSA reported.
    let r = sm.call("POST", "/api/v1/site/reclaim", None).unwrap_or_else(|e| panic!("{e:#}"));
    assert!(r["generation"].as_u64().unwrap_or(0) > g_newest, "{r}");
    wait_state(&sm, &h, "installed");
    a.stop();
}

/// The log collector through the operator command: a tar.gz holding the
/// site manager's log and its VDSA's, filtered by level, with a manifest.
#[test]
fn the_log_collector_bundles_the_site_managers_and_vdsas_logs() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let sm = SiteManagerProcess::start(lab(), &dir.path().join("sm"), &[]).unwrap_or_else(|e| panic!("{e:#}"));
    // The KVM deploy: a registration token and a task that ends when the
    // VDSA given it has registered and reported.
    let host = sm.post("/api/v1/hosts", serde_json::json!({"name": "kvm-logs", "hypervisor": "kvm"}));
    let h = host.unwrap_or_else(|e| panic!("{e:#}"))["id"].as_str().unwrap_or_default().to_string();
    let reg =
        sm.call("POST", &format!("/api/v1/hosts/{h}/registration-token"), None).unwrap_or_else(|e| panic!("{e:#}"));
    let t = reg["token"].as_str().unwrap_or_default().to_string();
    let task = reg["task"].as_str().unwrap_or_default().to_string();
    let running = sm.get(&format!("/api/v1/tasks/{task}")).unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(running["status"], "Running", "{running}");
    let mut a = AgentProcess::start(lab(), &dir.path().join("a"), "kvm-logs", &sm.management_address(), &t)
        .unwrap_or_else(|e| panic!("{e:#}"));
    let done = sm.get(&format!("/api/v1/tasks/{task}/wait?timeout_ms=60000")).unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(done["completion"], "Success", "{done}");
    wait_state(&sm, &h, "installed");
    let collect = |level: &str, out: &Path| {
        let o = std::process::Command::new(lab())
            .args(["site-manager", "logs", "collect", "--level", level, "--api"])
            .arg(format!("https://127.0.0.1:{}", sm.api_port))
            .arg("--data")
            .arg(sm.dir.join("data"))
            .arg("--out")
            .arg(out)
            .output()
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let gz = flate2::read::GzDecoder::new(std::fs::File::open(out).unwrap_or_else(|e| panic!("{e}")));
        let mut files = std::collections::BTreeMap::new();
        for e in tar::Archive::new(gz).entries().unwrap_or_else(|e| panic!("{e}")) {
            let mut e = e.unwrap_or_else(|e| panic!("{e}"));
            let name = e.path().map(|p| p.display().to_string()).unwrap_or_default();
            let mut text = String::new();
            std::io::Read::read_to_string(&mut e, &mut text).unwrap_or_else(|e| panic!("{e}"));
            files.insert(name, text);
        }
        files
    };
    let info = collect("info", &dir.path().join("info.tar.gz"));
    assert!(info.get("site-manager.log").is_some_and(|l| l.contains("site manager store open")), "{info:?}");
    assert!(info.get("vdsa-kvm-logs.log").is_some_and(|l| l.contains("connected to the site manager")), "{info:?}");
    let manifest: serde_json::Value =
        serde_json::from_str(info.get("manifest.json").map_or("", String::as_str)).unwrap_or_default();
    assert_eq!(manifest["hosts"][0]["answered"], true, "{manifest}");
    // At error level the INFO records are left out.
    let errors = collect("error", &dir.path().join("errors.tar.gz"));
    assert!(errors.get("vdsa-kvm-logs.log").is_some_and(|l| !l.contains(" INFO ")), "{errors:?}");
    assert!(errors.get("site-manager.log").is_some_and(|l| !l.contains(" INFO ")), "{errors:?}");
    a.stop();
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap_or_else(|e| panic!("{e}"));
    for e in std::fs::read_dir(from).unwrap_or_else(|e| panic!("{e}")) {
        let e = e.unwrap_or_else(|e| panic!("{e}"));
        let target = to.join(e.file_name());
        if e.path().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), &target).unwrap_or_else(|e| panic!("{e}"));
        }
    }
}
