//! The web console in a real browser (Debian's headless Chromium over
//! WebDriver), against a real site: an operator signs in, creates a VPG
//! with the form, waits until it protects, inserts three named checkpoints,
//! picks them on the timeline and starts three failover tests at once
//! (each export's bytes equal the disk at its checkpoint), stops them with
//! results and notes, follows a clean-point search to its answer on the
//! tasks page, fails over to a checkpoint with the wizard (the
//! export equals that checkpoint) and commits. A viewer then sees no
//! action on any page, while the operator did (the control), and the API
//! refuses the viewer's writes. Screenshots of every step are saved in
//! target/artefacts/console.

use integration::browser::Browser;
use integration::kvm_lab::qemu_available;
use integration::site_lab::{ProtectedSite, SiteManagerProcess, SiteSpec};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::Duration;

fn ok<T, E: std::fmt::Display>(r: Result<T, E>) -> T {
    r.unwrap_or_else(|e| panic!("{e:#}"))
}

fn artefacts() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/artefacts/console")
}

fn token(sm: &SiteManagerProcess, name: &str, role: &str) -> String {
    let t = ok(sm.post("/api/v1/tokens", json!({"name": name, "role": role})));
    t["secret"].as_str().unwrap_or_default().to_string()
}

const SECS: fn(u64) -> Duration = Duration::from_secs;

fn sign_in(b: &Browser, base: &str, secret: &str) {
    ok(b.goto(&format!("{base}/")));
    ok(b.fill("#login-token", secret));
    ok(b.click("#login-submit"));
    ok(b.wait_for("#whoami", SECS(20)));
}

/// Opens a console page and waits until its first refresh has drawn it.
fn open(b: &Browser, base: &str, hash: &str, ready: &str) {
    ok(b.goto(&format!("{base}/console/#{hash}")));
    ok(b.wait_for(ready, SECS(20)));
    // One more refresh: every part of the page is drawn.
    std::thread::sleep(Duration::from_millis(2500));
}

/// The action buttons on the shown page (`data-action`), by name.
fn actions(b: &Browser) -> Vec<String> {
    let found = ok(b.all("[data-action]"));
    found.iter().map(|e| ok(b.attr(e, "data-action")).unwrap_or_default()).collect()
}

fn test_of(sm: &SiteManagerProcess, vpg: &str, checkpoint: u64, purpose: &str) -> Value {
    let tests = ok(sm.get(&format!("/api/v1/vpgs/{vpg}/failover-tests")));
    tests
        .as_array()
        .and_then(|a| a.iter().rev().find(|t| t["checkpoint"] == checkpoint && t["purpose"] == purpose).cloned())
        .unwrap_or_else(|| panic!("no {purpose} at checkpoint {checkpoint}: {tests}"))
}

#[test]
fn an_operator_protects_tests_three_points_and_fails_over_in_the_console_and_a_viewer_sees_no_action() {
    assert!(qemu_available(), "qemu-storage-daemon is missing: integration/run-tests installs qemu-utils");
    assert!(
        integration::browser::available(),
        "chromium and chromedriver are missing: integration/install-deps installs them"
    );
    let _turn = crate::take_turns();
    let dir = ok(tempfile::tempdir());
    let lab = Path::new(env!("CARGO_BIN_EXE_lab"));
    let shots = artefacts();
    let _ = std::fs::remove_dir_all(&shots);
    let spec = SiteSpec { checkpoint_interval_ms: 2000, ..SiteSpec::one_vm() };
    let site = ok(ProtectedSite::start_unprotected(lab, dir.path(), &spec, |m| println!("{m}")));
    let sm = ok(site.sm());
    let base = format!("https://127.0.0.1:{}", site.api_port);
    let operator = token(sm, "olga (operator)", "operator");
    let viewer = token(sm, "victor (viewer)", "viewer");
    let b = ok(Browser::start(&shots));

    // Sign in: a wrong token is refused with a reason, the operator's is
    // taken.
    ok(b.goto(&format!("{base}/")));
    ok(b.fill("#login-token", "not-a-token"));
    ok(b.click("#login-submit"));
    ok(b.wait_for_text("#login-error", "unknown or revoked", SECS(10)));
    ok(b.screenshot("sign-in-refused"));
    sign_in(&b, &base, &operator);
    ok(b.wait_for_text("#whoami", "Operator", SECS(10)));
    ok(b.screenshot("dashboard-empty"));

    // Create the VPG with the form.
    ok(b.click("a[data-nav=vpgs]"));
    ok(b.click("[data-action=new-vpg]"));
    ok(b.fill("#vpg-name", "console-vpg"));
    ok(b.fill("[name=checkpoint_interval_secs]", "2"));
    ok(b.fill("[name=vm_name]", "vm-0"));
    ok(b.select("select[name=host]", &site.host_ids[0]));
    ok(b.select("select[name=recovery_host]", &site.host_ids[1]));
    ok(b.fill("[name=hypervisor_ref]", &site.vms[0].vdsa_qmp_sock.to_string_lossy()));
    ok(b.fill("[name=disk_name]", "vm-0-disk"));
    ok(b.fill("[name=disk_device]", "src"));
    ok(b.fill("[name=disk_size]", "8M"));
    ok(b.screenshot("new-vpg-form"));
    ok(b.click("[data-action=create-vpg]"));
    ok(b.wait_for("[data-status=Initializing], [data-status=Protecting]", SECS(20)));
    let vpgs = ok(sm.get("/api/v1/vpgs"));
    let vpg = vpgs[0]["id"].as_str().unwrap_or_default().to_string();
    assert_eq!(vpgs[0]["settings"]["vms"][0]["disks"][0]["size_bytes"], 8 << 20, "the form's 8M is 8 MiB: {vpgs}");
    ok(b.wait_for(".page-head [data-status=Protecting]", SECS(300)));
    ok(b.screenshot("vpg-protecting"));
    // The control for the viewer's check below: the operator sees actions.
    let operator_actions = actions(&b);
    for a in ["insert-checkpoint", "failover", "move"] {
        assert!(operator_actions.iter().any(|x| x == a), "the operator lacks {a}: {operator_actions:?}");
    }

    // Three named checkpoints, each after a write, inserted in the console.
    let mut guest = ok(site.vms[0].guest());
    let mut points: Vec<(u64, blake3::Hash)> = Vec::new();
    for (i, name) in ["before patch", "after patch", "after reboot"].iter().enumerate() {
        ok(guest.write((i as u64 + 1) << 20, &vec![0xA0 + i as u8; 256 << 10]));
        let reference = ok(site.vms[0].image_hash());
        ok(b.click("[data-action=insert-checkpoint]"));
        ok(b.fill("#insert-checkpoint-dialog [name=name]", name));
        ok(b.click("#insert-checkpoint-dialog [data-role=submit]"));
        ok(b.wait_for_text(".toast", name, SECS(10)));
        let id = loop {
            let cps = ok(sm.get(&format!("/api/v1/vpgs/{vpg}/checkpoints")));
            if let Some(c) = cps.as_array().and_then(|a| a.iter().find(|c| c["name"] == *name)) {
                break c["id"].as_u64().unwrap_or_default();
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        let w = ok(sm.get(&format!("/api/v1/vpgs/{vpg}/checkpoints/{id}/wait?timeout_ms=30000")));
        assert_eq!(w["durable"], true, "{w}");
        points.push((id, reference));
    }
    // Pick the three on the timeline and test them side by side.
    for (id, _) in &points {
        // Drawn once the console has seen it durable (only such points
        // may be picked).
        let marker = format!(".cp.named:not(.nondurable)[data-cp=\"{id}\"]");
        ok(b.wait_for(&marker, SECS(10)));
        ok(b.click(&marker));
        ok(b.wait_for(&format!("[data-picked=\"{id}\"]"), SECS(5)));
    }
    ok(b.wait_for_text("[data-action=start-tests]", "Test 3 picked points", SECS(5)));
    ok(b.screenshot("three-points-picked"));
    ok(b.click("[data-action=start-tests]"));
    for (id, _) in &points {
        ok(b.wait_for(&format!("tr[data-checkpoint=\"{id}\"] [data-state=Running]"), SECS(120)));
    }
    ok(b.screenshot("three-tests-running"));
    let scratch = dir.path().join("scratch");
    ok(std::fs::create_dir_all(&scratch));
    for (id, reference) in &points {
        let t = test_of(sm, &vpg, *id, "test");
        let uri = t["exports"][0]["uri"].as_str().unwrap_or_default();
        let got = ok(integration::exports::export_hash(uri, &scratch));
        assert_eq!(got, *reference, "the test at checkpoint {id} does not read the disk as it was then");
    }
    // Stop them with verdicts and notes.
    for (n, (id, _)) in points.iter().enumerate() {
        let verdict = if n == 1 { "fail" } else { "pass" };
        ok(b.click(&format!("tr[data-checkpoint=\"{id}\"] [data-action=stop-test]")));
        ok(b.click(&format!("#stop-test-dialog input[value={verdict}]")));
        ok(b.fill("#stop-test-dialog [name=notes]", &format!("checked by hash, verdict {verdict}")));
        if n == 0 {
            ok(b.screenshot("stop-test-dialog"));
        }
        ok(b.click("#stop-test-dialog [data-role=submit]"));
        ok(b.wait_for(&format!("tr[data-checkpoint=\"{id}\"] [data-result={verdict}]"), SECS(60)));
    }
    for (n, (id, _)) in points.iter().enumerate() {
        ok(b.wait_for(&format!("tr[data-checkpoint=\"{id}\"] [data-state=Stopped]"), SECS(120)));
        let t = test_of(sm, &vpg, *id, "test");
        assert_eq!(t["result"], if n == 1 { "fail" } else { "pass" }, "{t}");
        assert!(t["notes"].as_str().unwrap_or_default().starts_with("checked by hash"), "{t}");
    }
    ok(b.screenshot("tests-stopped-with-results"));

    // A clean-point search (its check always passes): the tasks page shows
    // its answer under its description.
    let search = ok(sm.post(&format!("/api/v1/vpgs/{vpg}/clean-point-search"), json!({"k": 4, "check": ["true"]})));
    let search_id = search["id"].as_str().unwrap_or_default().to_string();
    let done = ok(sm.get(&format!("/api/v1/tasks/{search_id}/wait?timeout_ms=300000")));
    assert_eq!(done["result"]["outcome"]["outcome"], "no_failing_point", "{done}");
    open(&b, &base, "/tasks", "tr[data-task]");
    ok(b.wait_for_text(
        &format!("tr[data-task=\"{search_id}\"] [data-role=clean-point]"),
        "no failing point in the range",
        SECS(10),
    ));
    ok(b.screenshot("clean-point-search"));
    // Its tests are stopped before the failover.
    let deadline = std::time::Instant::now() + SECS(120);
    while ok(sm.get(&format!("/api/v1/vpgs/{vpg}/failover-tests")))
        .as_array()
        .is_some_and(|a| a.iter().any(|t| !matches!(t["state"].as_str(), Some("Stopped" | "Failed"))))
    {
        assert!(std::time::Instant::now() < deadline, "the search's tests did not stop");
        std::thread::sleep(Duration::from_millis(250));
    }
    open(&b, &base, &format!("/vpgs/{vpg}"), ".page-head [data-status]");

    // The failover wizard: the second point, confirm, then commit.
    let (target, reference) = points[1];
    ok(b.wait_for(".page-head [data-status=Protecting]", SECS(60)));
    ok(b.click("[data-action=failover]"));
    ok(b.select("#failover-checkpoint", &target.to_string()));
    ok(b.screenshot("failover-wizard-checkpoint"));
    ok(b.click("#failover-dialog [data-role=submit]"));
    ok(b.wait_for("#failover-confirm", SECS(5)));
    ok(b.screenshot("failover-wizard-confirm"));
    ok(b.click("#failover-dialog [data-role=submit]"));
    ok(b.wait_for("[data-action=commit]", SECS(120)));
    ok(b.wait_for("[data-failover] [data-state=Running]", SECS(120)));
    let f = test_of(sm, &vpg, target, "failover");
    let uri = f["exports"][0]["uri"].as_str().unwrap_or_default();
    assert_eq!(
        ok(integration::exports::export_hash(uri, &scratch)),
        reference,
        "the failover does not read checkpoint {target}"
    );
    ok(b.screenshot("failed-over"));
    ok(b.click("[data-action=commit]"));
    ok(b.click("dialog [data-role=submit]"));
    ok(b.wait_for(".page-head [data-status=NeedReverseConfiguration]", SECS(180)));
    let f = test_of(sm, &vpg, target, "failover");
    assert!(f["committed_ms"].as_u64().is_some() && f["promoted_ms"].as_u64().is_some(), "{f}");
    ok(b.screenshot("committed"));

    // Other pages draw for the operator; host actions are the admin's.
    open(&b, &base, "/hosts", "tr[data-vdsa]");
    assert!(actions(&b).is_empty(), "an operator is offered host actions: {:?}", actions(&b));
    ok(b.screenshot("hosts"));
    open(&b, &base, "/tasks", "tr[data-task]");
    ok(b.screenshot("tasks"));
    open(&b, &base, "/health", "#health-vpg");
    ok(b.screenshot("health"));
    open(&b, &base, "/", "tr[data-vpg]");
    ok(b.screenshot("dashboard"));

    // The viewer: no action on any page, and the API refuses its writes.
    ok(b.click("#logout"));
    sign_in(&b, &base, &viewer);
    ok(b.wait_for_text("#whoami", "Viewer", SECS(10)));
    for (hash, ready) in [
        ("/".to_string(), "tr[data-vpg]"),
        ("/vpgs".to_string(), "tr[data-vpg]"),
        (format!("/vpgs/{vpg}"), ".page-head [data-status]"),
        ("/hosts".to_string(), "tr[data-vdsa]"),
        ("/tasks".to_string(), "tr[data-task]"),
        ("/vpgs/new".to_string(), "main h1"),
    ] {
        open(&b, &base, &hash, ready);
        let seen = actions(&b);
        assert!(seen.is_empty(), "the viewer is offered {seen:?} on {hash}");
        let buttons: Vec<String> =
            ok(b.all("main button")).iter().map(|e| ok(b.text(e))).filter(|t| !t.is_empty()).collect();
        for word in
            ["Stop", "Fail over", "Commit", "Roll back", "Move", "Insert", "Deploy", "Remove", "Add host", "Create"]
        {
            assert!(
                !buttons.iter().any(|t| t.contains(word)),
                "the viewer sees a {word:?} button on {hash}: {buttons:?}"
            );
        }
        ok(b.screenshot(&format!("viewer{}", hash.replace('/', "-"))));
    }
    let site_id = ok(sm.get("/api/v1/site"))["id"].clone();
    for (method, path, body) in [
        ("POST", format!("/api/v1/vpgs/{vpg}/checkpoints"), json!({"name": "viewer"})),
        ("POST", format!("/api/v1/vpgs/{vpg}/failover-tests"), json!({"checkpoints": [null]})),
        ("POST", format!("/api/v1/vpgs/{vpg}/failover/rollback"), json!({})),
        ("POST", "/api/v1/vpgs".to_string(), json!({"name": "x", "recovery_site": site_id})),
    ] {
        let (status, answer) = ok(sm.call_as(method, &path, Some(body), Some(&viewer)));
        assert_eq!(status, 403, "{method} {path} as a viewer: {answer}");
    }
    println!("screenshots: {}", shots.display());
}
