//! Bootable images made from files alone (no root, no loop device): an
//! initramfs (busybox, kernel modules, programs with their shared
//! libraries, an init script) and a disk that boots it through its
//! firmware (an MBR, a FAT32 partition with SYSLINUX, the kernel and the
//! initramfs, and an optional data area after it).

use crate::debian::DebianRoot;
use crate::{io, put, run, Error, Result};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// What an initramfs holds besides busybox (at `/bin/busybox`).
#[derive(Debug, Clone, Default)]
pub struct InitramfsSpec {
    /// Module files, in load order; they go to `/mods/NAME.ko`.
    pub modules: Vec<PathBuf>,
    /// Programs: host path -> path in the image (stripped of debug
    /// information), each with the shared libraries `ldd` lists.
    pub programs: Vec<(PathBuf, String)>,
    /// Other files: path in the image, bytes, mode.
    pub files: Vec<(String, Vec<u8>, u32)>,
    /// The whole `/init` script.
    pub init: String,
}

/// Builds an initramfs at `out` (an uncompressed newc cpio, which the
/// kernel reads as it is).
pub fn build_initramfs(debian: &DebianRoot, spec: &InitramfsSpec, out: &Path) -> Result<()> {
    let stage = tempfile::tempdir().map_err(io("making a staging folder"))?;
    let s = stage.path();
    for d in ["bin", "dev", "proc", "sys", "mods", "data", "run", "tmp", "etc", "mnt"] {
        std::fs::create_dir_all(s.join(d)).map_err(io("making the image's folders"))?;
    }
    std::fs::copy(debian.root().join("bin/busybox"), s.join("bin/busybox")).map_err(io("copying busybox"))?;
    for m in &spec.modules {
        let name = m.file_name().ok_or_else(|| Error::Input(format!("{} is not a module file", m.display())))?;
        std::fs::copy(m, s.join("mods").join(name)).map_err(io(format!("copying {}", m.display())))?;
    }
    for (host, guest) in &spec.programs {
        copy_program(host, &s.join(guest.trim_start_matches('/')))?;
        for lib in shared_libraries(host)? {
            let to = s.join(lib.strip_prefix("/").unwrap_or(&lib));
            if !to.exists() {
                if let Some(parent) = to.parent() {
                    std::fs::create_dir_all(parent).map_err(io("making a library folder"))?;
                }
                std::fs::copy(&lib, &to).map_err(io(format!("copying {}", lib.display())))?;
            }
        }
    }
    for (path, bytes, mode) in &spec.files {
        put(s, path.trim_start_matches('/'), bytes, *mode)?;
    }
    put(s, "init", spec.init.as_bytes(), 0o755)?;
    let f = std::fs::File::create(out).map_err(io(format!("creating {}", out.display())))?;
    let status = Command::new("sh")
        .args(["-c", "find . | ./bin/busybox cpio -o -H newc"])
        .current_dir(s)
        .stdout(f)
        .stderr(Stdio::null())
        .status()
        .map_err(io("running busybox cpio"))?;
    if !status.success() {
        return Err(Error::Tool { tool: "busybox cpio".into(), status: status.to_string(), stderr: String::new() });
    }
    Ok(())
}

/// Copies a program without its debug information (a release build of ours
/// carries tens of MB of it).
fn copy_program(host: &Path, to: &Path) -> Result<()> {
    if let Some(parent) = to.parent() {
        std::fs::create_dir_all(parent).map_err(io("making a program folder"))?;
    }
    let stripped = Command::new("objcopy").arg("--strip-debug").arg(host).arg(to).status();
    if !stripped.is_ok_and(|s| s.success()) {
        std::fs::copy(host, to).map_err(io(format!("copying {}", host.display())))?;
    }
    Ok(())
}

/// The shared libraries `program` loads, as `ldd` lists them (the loader
/// included).
fn shared_libraries(program: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd").arg(program).output().map_err(io("running ldd"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text.lines().filter_map(|l| l.split_whitespace().find(|w| w.starts_with('/'))).map(PathBuf::from).collect())
}

/// A disk that boots by itself: an MBR partition table, a FAT32 partition
/// holding SYSLINUX, the kernel and an initramfs, and after it an optional
/// data area (a second partition).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootDisk {
    pub path: PathBuf,
    /// Where the data area starts in the image, and its length (bytes).
    pub data_offset: u64,
    pub data_len: u64,
}

/// Builds a bootable raw disk at `out`: `boot_mb` MiB for the partition
/// table and the boot partition (at least 48), then `data_mb` MiB of data
/// area; SYSLINUX boots the kernel with `cmdline`.
pub fn build_boot_disk(
    debian: &DebianRoot,
    initramfs: &Path,
    cmdline: &str,
    boot_mb: u64,
    data_mb: u64,
    out: &Path,
) -> Result<BootDisk> {
    if boot_mb < 48 {
        return Err(Error::Input(format!(
            "a boot partition of {boot_mb} MiB is too small for FAT32 and the kernel (48 at least)"
        )));
    }
    const SECTOR: u64 = 512;
    let (part_start, part_sectors) = (2048u64, boot_mb * 2048 - 2048);
    let disk = std::fs::File::create(out).map_err(io(format!("creating {}", out.display())))?;
    disk.set_len((boot_mb + data_mb) << 20).map_err(io("sizing the disk"))?;
    drop(disk);
    let mut table = format!("label: dos\nstart={part_start}, size={part_sectors}, type=c, bootable\n");
    if data_mb > 0 {
        table.push_str(&format!("start={}, size={}, type=83\n", boot_mb * 2048, data_mb * 2048));
    }
    let mut sfdisk = debian
        .tool("sfdisk")
        .arg("-q")
        .arg(out)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(io("running sfdisk"))?;
    sfdisk
        .stdin
        .take()
        .ok_or_else(|| Error::Input("sfdisk has no stdin".into()))?
        .write_all(table.as_bytes())
        .map_err(io("writing sfdisk's table"))?;
    let done = sfdisk.wait_with_output().map_err(io("waiting for sfdisk"))?;
    if !done.status.success() {
        return Err(Error::Tool {
            tool: "sfdisk".into(),
            status: done.status.to_string(),
            stderr: String::from_utf8_lossy(&done.stderr).trim().to_string(),
        });
    }
    let stage = tempfile::tempdir().map_err(io("making a staging folder"))?;
    let part = stage.path().join("part.img");
    std::fs::File::create(&part)
        .and_then(|f| f.set_len(part_sectors * SECTOR))
        .map_err(io("making the boot partition"))?;
    run(debian.tool("mkfs.vfat").args(["-F", "32", "-n", "VDSA"]).arg(&part))?;
    run(debian.tool("syslinux").arg("--install").arg(&part))?;
    let cfg = stage.path().join("syslinux.cfg");
    std::fs::write(
        &cfg,
        format!(
            "DEFAULT boot\nPROMPT 0\nTIMEOUT 0\nLABEL boot\n  KERNEL /vmlinuz\n  INITRD /initrd\n  APPEND {cmdline}\n"
        ),
    )
    .map_err(io("writing syslinux.cfg"))?;
    for (file, name) in [(cfg.as_path(), "::/syslinux.cfg"), (&debian.kernel(), "::/vmlinuz"), (initramfs, "::/initrd")]
    {
        run(debian.tool("mcopy").arg("-i").arg(&part).arg(file).arg(name))?;
    }
    // The partition goes in at its place, and SYSLINUX's MBR code in front
    // of the partition table.
    let disk = std::fs::OpenOptions::new().write(true).open(out).map_err(io(format!("opening {}", out.display())))?;
    let bytes = std::fs::read(&part).map_err(io("reading the boot partition"))?;
    std::os::unix::fs::FileExt::write_all_at(&disk, &bytes, part_start * SECTOR)
        .map_err(io("writing the partition"))?;
    let mbr = std::fs::read(debian.root().join("usr/lib/syslinux/mbr/mbr.bin")).map_err(io("SYSLINUX's mbr.bin"))?;
    if mbr.len() < 440 {
        return Err(Error::Input(format!("mbr.bin is {} bytes", mbr.len())));
    }
    std::os::unix::fs::FileExt::write_all_at(&disk, &mbr[..440], 0).map_err(io("writing the MBR"))?;
    disk.sync_all().map_err(io("syncing the disk"))?;
    Ok(BootDisk { path: out.to_path_buf(), data_offset: boot_mb << 20, data_len: data_mb << 20 })
}
