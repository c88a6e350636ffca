//! The README's first command: the two-site lab runs to the end, exits 0,
//! and its JSON report says every check passed, with the keys scripts
//! read.

use std::path::Path;
use std::process::Command;

#[test]
fn the_two_site_lab_verifies_everything_and_writes_its_report() {
    run_lab(&[]);
}

/// `--faults`: a VDSA, the site-to-site link and the protected site's
/// manager are killed while the guests write; every check still passes.
#[test]
fn the_two_site_lab_verifies_everything_under_faults() {
    let r = run_lab(&["--faults"]);
    let faults = r["checks"]
        .as_array()
        .map_or(0, |c| c.iter().filter(|c| c["name"].as_str().is_some_and(|n| n.starts_with("fault:"))).count());
    assert_eq!(faults, 3, "{r}");
}

fn run_lab(args: &[&str]) -> serde_json::Value {
    let _turn = crate::take_turns();
    let dir = tempfile::tempdir().expect("a temporary folder");
    let report = dir.path().join("report.json");
    let lab = Path::new(env!("CARGO_BIN_EXE_lab"));
    let out = Command::new(lab)
        .args(args)
        .arg("--report")
        .arg(&report)
        .arg("--dir")
        .arg(dir.path().join("lab"))
        .output()
        .expect("running the lab");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(out.status.success(), "the lab failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let r: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&report).expect("the report file")).expect("the report is JSON");
    assert_eq!(r["verified"], true, "{r}");
    let checks = r["checks"].as_array().expect("checks");
    assert!(checks.len() >= 20 && checks.iter().all(|c| c["ok"] == true && c["name"].is_string()), "{r}");
    for key in ["rpo_ms", "barrier_hold_ms"] {
        for q in ["p50", "p99", "max"] {
            assert!(r[key][q].is_number(), "{key}.{q} in {r}");
        }
    }
    let tests = r["failover_tests"].as_array().expect("failover_tests");
    assert_eq!(tests.len(), 3, "{r}");
    assert!(tests.iter().all(|t| t["verified"] == true && t["checkpoint"].is_u64() && t["start_s"].is_number()));
    assert!(r["rto_s"].as_f64().is_some_and(|s| s > 0.0 && s < 2.0), "{r}");
    assert!(r["link_bytes_per_written_byte"].as_f64().is_some_and(|x| x > 0.0), "{r}");
    assert!(r["duration_s"].as_f64().is_some_and(|s| s < 300.0), "{r}");
    r
}
