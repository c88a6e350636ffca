//! Packaging of the product, made from Debian's packages and the
//! workspace's binaries only:
//! - `debian`: Debian's packages unpacked into a private folder (kernel,
//!   busybox, boot loader, disk tools);
//! - `image`: bootable images from files alone (initramfs, boot disk);
//! - `appliance`: the VDSA appliance's boot disk and its init;
//! - `ova`: the VDSA OVA (descriptor, boot and data disks, manifest);
//! - `deb`: the Debian package of `vdsa` and `site-manager` with systemd
//!   units and configuration files for KVM hosts.
//!
//! It must not contain product logic: it only assembles what the other
//! crates build. It shells out to `apt-get download`, `dpkg-deb`, busybox's
//! cpio, sfdisk, mkfs.vfat, SYSLINUX with mtools, and `qemu-img` (the
//! streamOptimized VMDKs).

pub mod appliance;
pub mod deb;
pub mod debian;
pub mod image;
pub mod ova;

pub use deb::{build_deb, DebInputs, DEB_PACKAGE};
pub use ova::{build_ova, OvaBuilt, OvaInputs, OVF_NETWORK, VAPP_PROPERTIES};

use std::fmt::Write as _;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A Grafana dashboard over the site manager's `/metrics` (import it and
/// pick the Prometheus data source that scrapes the site manager).
pub const GRAFANA_DASHBOARD: &str = include_str!("../files/grafana-dashboard.json");

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("{tool} failed ({status}): {stderr}")]
    Tool { tool: String, status: String, stderr: String },
    #[error("{0}")]
    Input(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

pub(crate) fn run(cmd: &mut Command) -> Result<()> {
    let tool = cmd.get_program().to_string_lossy().into_owned();
    let out = cmd.output().map_err(io(format!("running {tool} (is it installed?)")))?;
    if !out.status.success() {
        return Err(Error::Tool {
            tool,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// Writes `bytes` to `root/rel` with `mode`, making folders on the way.
pub(crate) fn put(root: &Path, rel: &str, bytes: &[u8], mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let p = root.join(rel);
    if let Some(parent) = p.parent() {
        fs::create_dir_all(parent).map_err(io(format!("creating {}", parent.display())))?;
    }
    fs::write(&p, bytes).map_err(io(format!("writing {}", p.display())))?;
    fs::set_permissions(&p, fs::Permissions::from_mode(mode)).map_err(io(format!("chmod {}", p.display())))
}

/// An executable's bytes; anything but an ELF file is refused.
pub(crate) fn read_elf(path: &Path) -> Result<Vec<u8>> {
    let bytes = fs::read(path).map_err(io(format!("reading {}", path.display())))?;
    if !bytes.starts_with(b"\x7fELF") {
        return Err(Error::Input(format!("{} is not an ELF executable", path.display())));
    }
    Ok(bytes)
}

pub(crate) fn dir_size(dir: &Path) -> u64 {
    let mut total = 0;
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            match e.file_type() {
                Ok(t) if t.is_dir() => total += dir_size(&e.path()) + 4096,
                Ok(_) => total += e.metadata().map(|m| m.len()).unwrap_or(0) + 4096,
                Err(_) => {}
            }
        }
    }
    total
}

/// A file's SHA-256 in hex (over ring, the provider the workspace already
/// builds).
pub(crate) fn sha256_file(p: &Path) -> Result<String> {
    let mut f = fs::File::open(p).map_err(io(format!("opening {}", p.display())))?;
    let mut h = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io(format!("reading {}", p.display())))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finish().as_ref().iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    }))
}

/// Strips debug information into a copy (release builds keep it for
/// profiling; an appliance need not ship it). Falls back to the original.
pub fn stripped_copy(bin: &Path, dir: &Path) -> Result<PathBuf> {
    let name = bin.file_name().ok_or_else(|| Error::Input(format!("{} has no file name", bin.display())))?;
    let out = dir.join(name);
    match run(Command::new("strip").arg("--strip-debug").arg("-o").arg(&out).arg(bin)) {
        Ok(()) => Ok(out),
        Err(_) => Ok(bin.to_path_buf()),
    }
}
