//! Debian's packages, unpacked into a private folder: the only source of
//! what the appliance image holds (kernel, busybox, boot loader) and of the
//! tools that make a disk from files alone. `apt-get download` and
//! `dpkg-deb -x`: nothing is installed system-wide, nothing comes from
//! anywhere but Debian's archive.

use crate::{io, run, Error, Result};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;

/// What an image needs besides the kernel: busybox for its userland, and
/// what makes a bootable disk from files (sfdisk, mkfs.vfat, SYSLINUX with
/// mtools).
pub const IMAGE_PACKAGES: &[&str] = &["busybox-static", "syslinux", "syslinux-common", "mtools", "dosfstools", "fdisk"];

/// The meta package whose dependency is the kernel every image boots: the
/// cloud kernel (small; has the drivers of ESXi's and QEMU's virtual
/// hardware as modules).
const KERNEL_META_PACKAGE: &str = "linux-image-cloud-amd64";

/// Packages unpacked into one folder.
#[derive(Debug, Clone)]
pub struct DebianRoot {
    root: PathBuf,
    kernel_version: String,
}

fn apt_update() -> Result<()> {
    run(Command::new("apt-get").args(["update", "-qq"]))
}

/// The kernel package the cloud kernel's meta package points at.
fn kernel_package() -> Result<String> {
    for attempt in 0..2 {
        let out = Command::new("apt-cache")
            .args(["depends", KERNEL_META_PACKAGE])
            .output()
            .map_err(io("running apt-cache (is this Debian?)"))?;
        let text = String::from_utf8_lossy(&out.stdout);
        let found =
            text.lines().filter_map(|l| l.trim().strip_prefix("Depends: ")).find(|p| p.starts_with("linux-image-"));
        if let Some(p) = found {
            return Ok(p.trim().to_string());
        }
        if attempt == 0 {
            apt_update()?;
        }
    }
    Err(Error::Input(format!("apt-cache knows no dependency of {KERNEL_META_PACKAGE}")))
}

impl DebianRoot {
    /// `packages` and the cloud kernel unpacked into `dir/root`, unless
    /// they are there already. Safe to call from several threads and
    /// processes at once (a lock file serialises them).
    pub fn prepare_in(dir: &Path, packages: &[&str]) -> Result<DebianRoot> {
        std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
        let lock = std::fs::File::create(dir.join(".lock")).map_err(io("the package folder's lock file"))?;
        // SAFETY: flock takes a descriptor we own for the duration of the
        // call and touches no memory of ours; the lock ends with `lock`.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(Error::Io {
                what: "locking the package folder".into(),
                source: std::io::Error::last_os_error(),
            });
        }
        let root = dir.join("root");
        let ready = root.join(".ready");
        let wanted = packages.join(" ");
        if std::fs::read_to_string(&ready).ok().as_deref() != Some(wanted.as_str()) {
            let debs = dir.join("debs");
            let _ = std::fs::remove_dir_all(&debs);
            let _ = std::fs::remove_dir_all(&root);
            std::fs::create_dir_all(&debs).map_err(io("creating the download folder"))?;
            let mut all: Vec<String> = packages.iter().map(|s| s.to_string()).collect();
            all.push(kernel_package()?);
            let download = || run(Command::new("apt-get").arg("download").args(&all).current_dir(&debs));
            if download().is_err() {
                apt_update()?;
                download()?;
            }
            for deb in std::fs::read_dir(&debs).map_err(io("listing the downloads"))?.flatten() {
                run(Command::new("dpkg-deb").arg("-x").arg(deb.path()).arg(&root))?;
            }
            std::fs::write(&ready, &wanted).map_err(io("marking the package folder ready"))?;
        }
        let modules = root.join("lib/modules");
        let kernel_version = std::fs::read_dir(&modules)
            .map_err(io(format!("listing {}", modules.display())))?
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .next()
            .ok_or_else(|| Error::Input(format!("{} holds no kernel", root.display())))?;
        Ok(DebianRoot { root, kernel_version })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn kernel_version(&self) -> &str {
        &self.kernel_version
    }

    /// The kernel image.
    pub fn kernel(&self) -> PathBuf {
        self.root.join(format!("boot/vmlinuz-{}", self.kernel_version))
    }

    /// A module by its path under the kernel's `kernel/` folder, without
    /// `.ko` (`drivers/block/virtio_blk`).
    pub fn module(&self, path: &str) -> PathBuf {
        self.modules_dir().join(format!("{path}.ko"))
    }

    fn modules_dir(&self) -> PathBuf {
        self.root.join("lib/modules").join(&self.kernel_version).join("kernel")
    }

    /// The module files for `names` (module names, `vmw_pvscsi`) and what
    /// they depend on, in an order they load in: each after its
    /// dependencies (read from the modules' own `depends=`, since the
    /// package ships no modules.dep). A name the kernel does not have as a
    /// module is refused by name.
    pub fn modules_in_load_order(&self, names: &[&str]) -> Result<Vec<PathBuf>> {
        let mut by_name = std::collections::HashMap::new();
        index_modules(&self.modules_dir(), &mut by_name)?;
        let mut order = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for name in names {
            visit(name, &by_name, &mut seen, &mut order, 0)?;
        }
        Ok(order)
    }

    /// A command for a tool of the unpacked packages (their folders first
    /// on the PATH).
    pub fn tool(&self, name: &str) -> Command {
        let mut cmd = Command::new(name);
        let path = std::env::var_os("PATH").unwrap_or_default();
        let mut dirs = vec![self.root.join("usr/bin"), self.root.join("sbin"), self.root.join("usr/sbin")];
        dirs.extend(std::env::split_paths(&path));
        if let Ok(joined) = std::env::join_paths(dirs) {
            cmd.env("PATH", joined);
        }
        cmd
    }
}

/// Module name (dashes as underscores, as the kernel names them) to file.
fn index_modules(dir: &Path, out: &mut std::collections::HashMap<String, PathBuf>) -> Result<()> {
    for e in std::fs::read_dir(dir).map_err(io(format!("listing {}", dir.display())))?.flatten() {
        let p = e.path();
        if p.is_dir() {
            index_modules(&p, out)?;
        } else if let Some(stem) = p.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_suffix(".ko")) {
            out.insert(stem.replace('-', "_"), p);
        }
    }
    Ok(())
}

fn visit(
    name: &str,
    by_name: &std::collections::HashMap<String, PathBuf>,
    seen: &mut std::collections::HashSet<String>,
    order: &mut Vec<PathBuf>,
    depth: usize,
) -> Result<()> {
    let key = name.replace('-', "_");
    if depth > 32 {
        return Err(Error::Input(format!("module dependencies through {name} go too deep (a cycle?)")));
    }
    if !seen.insert(key.clone()) {
        return Ok(());
    }
    let file = by_name
        .get(&key)
        .ok_or_else(|| Error::Input(format!("the kernel has no module {name} (built in, or not built)")))?;
    let bytes = std::fs::read(file).map_err(io(format!("reading {}", file.display())))?;
    for dep in module_depends(&bytes) {
        visit(&dep, by_name, seen, order, depth + 1)?;
    }
    order.push(file.clone());
    Ok(())
}

/// The `depends=` entry of a module's `.modinfo` strings.
fn module_depends(ko: &[u8]) -> Vec<String> {
    const KEY: &[u8] = b"\0depends=";
    let Some(at) = ko.windows(KEY.len()).position(|w| w == KEY) else { return Vec::new() };
    let rest = &ko[at + KEY.len()..];
    let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
    String::from_utf8_lossy(&rest[..end]).split(',').filter(|s| !s.is_empty()).map(str::to_string).collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_modules_dependencies_are_read_from_its_modinfo() {
        let ko = b"\x7fELF...\0license=GPL\0depends=scsi_mod,cdrom\0name=sr_mod\0";
        assert_eq!(super::module_depends(ko), ["scsi_mod", "cdrom"]);
        assert!(super::module_depends(b"\0depends=\0name=x\0").is_empty());
        assert!(super::module_depends(b"nothing").is_empty());
    }
}
