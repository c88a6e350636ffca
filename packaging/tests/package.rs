//! The Debian package, taken apart with dpkg-deb and installed into a
//! fresh root with dpkg, then removed and purged. (The OVA needs Debian's
//! kernel and boot loader: its tests boot it, in the integration crate's
//! e2e `appliance` tests.)

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{ensure, Context, Result};

/// An ELF to package: this test binary without its debug information (any
/// executable will do for the packaging mechanics; the vSphere e2e test
/// packages the real vdsa).
fn some_elf() -> Result<PathBuf> {
    static DIR: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    let dir = DIR.get_or_init(|| tempfile::tempdir().expect("a temporary folder"));
    let exe = std::env::current_exe()?;
    let out = dir.path().join("some-elf");
    if !out.exists() {
        let tmp = dir.path().join(format!("some-elf.{:?}", std::thread::current().id()));
        run(Command::new("strip").arg("--strip-debug").arg("-o").arg(&tmp).arg(&exe))?;
        std::fs::rename(&tmp, &out)?;
    }
    Ok(out)
}

fn sha256(p: &Path) -> Result<String> {
    let out = Command::new("sha256sum").arg(p).output()?;
    ensure!(out.status.success(), "sha256sum {}", p.display());
    Ok(String::from_utf8(out.stdout)?.split_whitespace().next().unwrap_or_default().to_string())
}

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {:?}", cmd.get_program()))?;
    ensure!(out.status.success(), "{:?} failed: {}", cmd, String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn dpkg(root: &Path, args: &[&str]) -> Result<String> {
    run(Command::new("dpkg")
        .arg(format!("--root={}", root.display()))
        .arg(format!("--log={}", root.join("dpkg.log").display()))
        // The maintainer scripts run here, with DPKG_ROOT set: the root
        // has no shell of its own to chroot into.
        .args(["--force-script-chrootless", "--force-depends", "--force-not-root"])
        .args(args))
}

/// Every file under `dir`, relative, sorted.
fn files_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p.strip_prefix(dir).map(|r| r.display().to_string()).unwrap_or_default());
            }
        }
    }
    out.sort();
    out
}

#[test]
fn the_debian_package_installs_into_a_fresh_root_with_units_and_config_and_removes_cleanly() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let elf = some_elf()?;
    let deb = packaging::build_deb(&packaging::DebInputs {
        vdsa: elf.clone(),
        site_manager: elf.clone(),
        version: "1.2.3-1".into(),
        out_dir: dir.path().to_path_buf(),
    })?;
    assert_eq!(deb.file_name().and_then(|n| n.to_str()), Some("hypervisor-replication_1.2.3-1_amd64.deb"));
    let field = |f: &str| run(Command::new("dpkg-deb").arg("-f").arg(&deb).arg(f));
    assert_eq!(field("Package")?.trim(), packaging::DEB_PACKAGE);
    assert_eq!(field("Version")?.trim(), "1.2.3-1");
    assert_eq!(field("Architecture")?.trim(), "amd64");
    let contents = run(Command::new("dpkg-deb").arg("-c").arg(&deb))?;
    for path in ["./usr/bin/vdsa", "./usr/bin/site-manager"] {
        let line = contents.lines().find(|l| l.ends_with(path)).with_context(|| format!("{path} in {contents}"))?;
        assert!(line.contains("root/root") && line.starts_with("-rwxr-xr-x"), "{line}");
    }

    // A fresh root: only dpkg's database.
    let root = dir.path().join("root");
    for d in ["var/lib/dpkg/info", "var/lib/dpkg/updates"] {
        std::fs::create_dir_all(root.join(d))?;
    }
    std::fs::write(root.join("var/lib/dpkg/status"), "")?;
    dpkg(&root, &["-i", deb.to_str().context("path")?])?;
    let status = dpkg(&root, &["-s", packaging::DEB_PACKAGE])?;
    assert!(status.contains("Status: install ok installed"), "{status}");
    assert_eq!(sha256(&root.join("usr/bin/vdsa"))?, sha256(&elf)?);
    for (path, text) in packaging::deb::UNITS {
        assert_eq!(std::fs::read_to_string(root.join(path))?, *text, "{path}");
    }
    for (path, text, mode) in packaging::deb::CONFFILES {
        assert_eq!(std::fs::read_to_string(root.join(path))?, *text, "{path}");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(root.join(path))?.permissions().mode() & 0o777, *mode, "{path}");
    }
    let conffiles = dpkg(&root, &["--status", packaging::DEB_PACKAGE])?;
    assert!(conffiles.contains("/etc/vdsa/agent.json "), "{conffiles}");
    // postinst made the state folders, private.
    for d in ["var/lib/vdsa", "var/lib/site-manager"] {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(root.join(d))?.permissions().mode() & 0o777, 0o700, "{d}");
    }
    // The units start what the package installed, with its config files.
    assert!(packaging::deb::UNIT_VDSA.contains("ExecStart=/usr/bin/vdsa agent --config /etc/vdsa/agent.json"));
    assert!(packaging::deb::UNIT_VDSA.contains("EnvironmentFile=-/etc/default/vdsa"));
    assert!(packaging::deb::UNIT_SITE_MANAGER.contains("EnvironmentFile=/etc/default/site-manager"));
    // The default agent configuration is one the agent accepts.
    let cfg: serde_json::Value = serde_json::from_str(packaging::deb::AGENT_CONFIG)?;
    assert_eq!(cfg["data"], "/var/lib/vdsa");

    // An operator's edit survives removal; purge takes it and leaves the
    // root as it was (dpkg's own files aside).
    std::fs::write(root.join("etc/vdsa/agent.json"), "{\"edited\": true}")?;
    dpkg(&root, &["-r", packaging::DEB_PACKAGE])?;
    assert!(!root.join("usr/bin/vdsa").exists() && !root.join("lib/systemd/system/vdsa.service").exists());
    assert_eq!(std::fs::read_to_string(root.join("etc/vdsa/agent.json"))?, "{\"edited\": true}");
    dpkg(&root, &["-P", packaging::DEB_PACKAGE])?;
    let left: Vec<String> =
        files_under(&root).into_iter().filter(|f| !f.starts_with("var/lib/dpkg") && f != "dpkg.log").collect();
    assert!(left.is_empty(), "purge left {left:?}");
    assert!(!root.join("var/lib/vdsa").exists(), "purge left the empty state folder");
    Ok(())
}
