//! The Debian package for KVM hosts: `vdsa` and `site-manager`, their
//! systemd units, and their configuration files with defaults (conffiles:
//! kept on upgrade and removal, removed on purge). The maintainer scripts
//! honour `DPKG_ROOT`, so the package installs into a fresh root with
//! `dpkg --root` (as its test does).

use crate::{dir_size, io, put, read_elf, run, Result};
use std::fs;
use std::path::PathBuf;
use std::process::Command;

pub const DEB_PACKAGE: &str = "hypervisor-replication";

/// The units and configuration files, kept as real files beside this crate.
pub const UNIT_VDSA: &str = include_str!("../files/vdsa.service");
pub const UNIT_SITE_MANAGER: &str = include_str!("../files/site-manager.service");
pub const AGENT_CONFIG: &str = include_str!("../files/agent.json");
pub const DEFAULT_VDSA: &str = include_str!("../files/default-vdsa");
pub const DEFAULT_SITE_MANAGER: &str = include_str!("../files/default-site-manager");

/// The configuration files (path, contents, mode): conffiles.
pub const CONFFILES: &[(&str, &str, u32)] = &[
    ("etc/vdsa/agent.json", AGENT_CONFIG, 0o644),
    // Holds the registration token.
    ("etc/default/vdsa", DEFAULT_VDSA, 0o600),
    ("etc/default/site-manager", DEFAULT_SITE_MANAGER, 0o644),
];

/// The units (path, contents).
pub const UNITS: &[(&str, &str)] =
    &[("lib/systemd/system/vdsa.service", UNIT_VDSA), ("lib/systemd/system/site-manager.service", UNIT_SITE_MANAGER)];

const POSTINST: &str = r#"#!/bin/sh
set -e
# DPKG_ROOT: installing into another root (dpkg --root); no systemd there.
mkdir -p "$DPKG_ROOT/var/lib/vdsa" "$DPKG_ROOT/var/lib/site-manager"
chmod 700 "$DPKG_ROOT/var/lib/vdsa" "$DPKG_ROOT/var/lib/site-manager"
if [ "$1" = configure ] && [ -z "$DPKG_ROOT" ] && [ -d /run/systemd/system ]; then
    systemctl daemon-reload || true
    systemctl enable site-manager.service vdsa.service >/dev/null 2>&1 || true
    echo "hypervisor-replication: set /etc/default/site-manager, or /etc/vdsa/agent.json and the"
    echo "registration token in /etc/default/vdsa, then: systemctl start site-manager (or vdsa)"
fi
exit 0
"#;

const PRERM: &str = r#"#!/bin/sh
set -e
if [ -z "$DPKG_ROOT" ] && [ -d /run/systemd/system ]; then
    if [ "$1" = remove ]; then
        systemctl disable --now vdsa.service site-manager.service >/dev/null 2>&1 || true
    fi
fi
exit 0
"#;

const POSTRM: &str = r#"#!/bin/sh
set -e
if [ -z "$DPKG_ROOT" ] && [ -d /run/systemd/system ]; then
    systemctl daemon-reload || true
fi
# Purge removes the state folders only when empty: journals and the site
# manager's store are the operator's to delete.
if [ "$1" = purge ]; then
    rmdir "$DPKG_ROOT/var/lib/vdsa" "$DPKG_ROOT/var/lib/site-manager" 2>/dev/null || true
fi
exit 0
"#;

/// What the Debian package is built from.
#[derive(Debug, Clone)]
pub struct DebInputs {
    pub vdsa: PathBuf,
    pub site_manager: PathBuf,
    /// Debian version, e.g. `0.1.0-1`.
    pub version: String,
    /// The folder to write the .deb into.
    pub out_dir: PathBuf,
}

/// Builds `hypervisor-replication_VERSION_amd64.deb`.
pub fn build_deb(inputs: &DebInputs) -> Result<PathBuf> {
    let work = tempfile::tempdir().map_err(io("making a work folder"))?;
    let root = work.path().join("root");
    let put = |rel: &str, bytes: &[u8], mode: u32| put(&root, rel, bytes, mode);
    for (bin, name) in [(&inputs.vdsa, "vdsa"), (&inputs.site_manager, "site-manager")] {
        put(&format!("usr/bin/{name}"), &read_elf(bin)?, 0o755)?;
    }
    for (path, text) in UNITS {
        put(path, text.as_bytes(), 0o644)?;
    }
    for (path, text, mode) in CONFFILES {
        put(path, text.as_bytes(), *mode)?;
    }
    put(
        "usr/share/doc/hypervisor-replication/README",
        b"hypervisor-level replication: vdsa (one per KVM host) and site-manager (one per site).\n\
          Configure /etc/default/site-manager, or /etc/vdsa/agent.json and /etc/default/vdsa,\n\
          then start site-manager.service or vdsa.service.\n",
        0o644,
    )?;
    let installed_kb = dir_size(&root) / 1024;
    let control = format!(
        "Package: {DEB_PACKAGE}\n\
         Version: {v}\n\
         Architecture: amd64\n\
         Maintainer: Hypervisor-level replication developers <dev@localhost>\n\
         Installed-Size: {installed_kb}\n\
         Depends: libc6 (>= 2.31)\n\
         Recommends: qemu-system-x86 | qemu-utils\n\
         Section: admin\n\
         Priority: optional\n\
         Description: hypervisor-level replication: VDSA and site manager\n \
         The virtual data services appliance (vdsa) taps VM disk writes on a KVM\n \
         host, journals them and replicates them to a peer site; site-manager is\n \
         the site's control plane, API and console.\n",
        v = inputs.version
    );
    put("DEBIAN/control", control.as_bytes(), 0o644)?;
    let conffiles: String = CONFFILES.iter().map(|(p, _, _)| format!("/{p}\n")).collect();
    put("DEBIAN/conffiles", conffiles.as_bytes(), 0o644)?;
    put("DEBIAN/postinst", POSTINST.as_bytes(), 0o755)?;
    put("DEBIAN/prerm", PRERM.as_bytes(), 0o755)?;
    put("DEBIAN/postrm", POSTRM.as_bytes(), 0o755)?;
    fs::create_dir_all(&inputs.out_dir).map_err(io(format!("creating {}", inputs.out_dir.display())))?;
    let out = inputs.out_dir.join(format!("{DEB_PACKAGE}_{}_amd64.deb", inputs.version));
    run(Command::new("dpkg-deb").args(["--root-owner-group", "-Zxz", "--build"]).arg(&root).arg(&out))?;
    Ok(out)
}
