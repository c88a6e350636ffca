//! The operator command against a real daemon: tables for people, JSON
//! for scripts, and a non-zero exit with the server's message when it
//! refuses.

use crate::daemon::Daemon;
use std::path::Path;
use std::process::Command;

/// Runs `site-manager ARGS --api … --data DIR`; (success, stdout, stderr).
fn cli(d: &Daemon, dir: &Path, args: &[&str], extra: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_site-manager"))
        .args(args)
        .args(["--api", &d.url(""), "--data"])
        .arg(dir)
        .args(extra)
        .env_remove("SITE_MANAGER_TOKEN")
        .output()
        .unwrap_or_else(|e| panic!("running site-manager: {e}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_cli_prints_tables_and_json_and_fails_with_the_servers_message() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let d = Daemon::start(dir.path(), None);
    let (ok, out, err) = cli(&d, dir.path(), &["site", "show"], &[]);
    assert!(ok && out.contains("generation:") && out.contains("CA SHA-256:"), "{out}{err}");

    let (ok, out, err) = cli(&d, dir.path(), &["host", "add", "--name", "kvm-a"], &[]);
    assert!(ok && out.contains("kvm-a") && out.contains("not_installed"), "{out}{err}");
    let (ok, out, _) = cli(&d, dir.path(), &["host", "list", "--json"], &[]);
    let hosts: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert!(ok && hosts.as_array().is_some_and(|h| h.len() == 1 && h[0]["name"] == "kvm-a"), "{out}");

    // A viewer token from the CLI, then a refused change with it.
    let (ok, out, _) = cli(&d, dir.path(), &["token", "create", "--name", "ro", "--role", "viewer", "--json"], &[]);
    let created: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert!(ok, "{out}");
    let viewer = dir.path().join("viewer-token");
    std::fs::write(&viewer, created["secret"].as_str().unwrap_or_default()).unwrap_or_else(|e| panic!("{e}"));
    let viewer = viewer.to_string_lossy().into_owned();
    let (ok, _, err) = cli(&d, dir.path(), &["host", "add", "--name", "kvm-b"], &["--token-file", &viewer]);
    assert!(!ok && err.contains("403") && err.contains("Viewer"), "{err}");
    let (ok, out, _) = cli(&d, dir.path(), &["vpg", "list"], &["--token-file", &viewer]);
    assert!(ok && out.starts_with("ID"), "{out}");

    // Unknown ids, bad files, not paired: the server's words.
    let unknown = uuid::Uuid::new_v4().to_string();
    let (ok, _, err) = cli(&d, dir.path(), &["vpg", "show", &unknown], &[]);
    assert!(!ok && err.contains("404"), "{err}");
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, r#"{"name": 5}"#).unwrap_or_else(|e| panic!("{e}"));
    let (ok, _, err) = cli(&d, dir.path(), &["vpg", "create", "--file", &bad.to_string_lossy()], &[]);
    assert!(!ok && err.contains("name"), "{err}");
    let (ok, _, err) = cli(&d, dir.path(), &["peer", "show"], &[]);
    assert!(!ok && err.contains("not paired"), "{err}");
    let (ok, out, err) = cli(&d, dir.path(), &["peer", "token"], &[]);
    assert!(ok && out.contains("token:"), "{out}{err}");
    let (ok, out, _) = cli(&d, dir.path(), &["task", "list"], &[]);
    assert!(ok && out.starts_with("ID"), "{out}");
}
