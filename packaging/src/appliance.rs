//! The VDSA appliance's boot disk: Debian's cloud kernel and an initramfs
//! holding busybox, the drivers of ESXi's and QEMU's virtual hardware, the
//! `vdsa` binary, the ext4 tools for its data volume, and its init
//! (`files/appliance-init`, docs/appliance.md).

use crate::debian::DebianRoot;
use crate::image::{build_boot_disk, build_initramfs, BootDisk, InitramfsSpec};
use crate::{io, read_elf, Result};
use std::path::{Path, PathBuf};

/// The appliance's init script.
pub const APPLIANCE_INIT: &str = include_str!("../files/appliance-init");

/// Modules the appliance loads (with what they depend on): ESXi's usual
/// virtual hardware (PVSCSI disks, vmxnet3, VMCI), the IDE CD-ROM that
/// carries the OVF environment and its file system, and virtio for KVM.
/// e1000 and AHCI are not in the cloud kernel: the OVF asks for PVSCSI
/// and vmxnet3.
pub const APPLIANCE_MODULES: &[&str] = &[
    "vmw_pvscsi",
    "sd_mod",
    "vmxnet3",
    "vmw_vmci",
    "ata_piix",
    "sr_mod",
    "isofs",
    "virtio_pci",
    "virtio_blk",
    "virtio_scsi",
    "virtio_net",
];

/// The kernel command line: messages on the serial port and the screen
/// (the last is /dev/console: the serial port, which tests read); a
/// panic reboots after 10 s.
pub const APPLIANCE_CMDLINE: &str = "console=tty0 console=ttyS0 quiet panic=10";

/// The boot partition's size: kernel and initramfs with room to spare.
const BOOT_MB: u64 = 96;

/// The ext4 tools the init runs on the data volume, from this machine's
/// Debian e2fsprogs (with the libraries `ldd` lists).
const EXT4_TOOLS: &[(&str, &str)] = &[("/sbin/mke2fs", "/sbin/mkfs.ext4"), ("/sbin/e2fsck", "/sbin/e2fsck")];

/// Builds the appliance's bootable raw disk at `out` around `vdsa`.
pub fn build_appliance_disk(debian: &DebianRoot, vdsa: &Path, out: &Path) -> Result<BootDisk> {
    read_elf(vdsa)?;
    let modules = debian.modules_in_load_order(APPLIANCE_MODULES)?;
    let order: String =
        modules.iter().filter_map(|m| m.file_name().and_then(|n| n.to_str())).map(|n| format!("{n}\n")).collect();
    let mut programs: Vec<(PathBuf, String)> = vec![(vdsa.to_path_buf(), "/usr/bin/vdsa".into())];
    programs.extend(EXT4_TOOLS.iter().map(|(host, image)| (PathBuf::from(host), image.to_string())));
    let mut files = vec![("mods/order".to_string(), order.into_bytes(), 0o644)];
    if let Ok(conf) = std::fs::read("/etc/mke2fs.conf") {
        files.push(("etc/mke2fs.conf".into(), conf, 0o644));
    }
    let spec = InitramfsSpec { modules, programs, files, init: APPLIANCE_INIT.into() };
    let work = tempfile::tempdir().map_err(io("making a work folder"))?;
    let initramfs = work.path().join("initrd");
    build_initramfs(debian, &spec, &initramfs)?;
    build_boot_disk(debian, &initramfs, APPLIANCE_CMDLINE, BOOT_MB, 0, out)
}
