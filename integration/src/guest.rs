//! The guest kit: real Linux guests under QEMU, for tests, benchmarks and
//! the lab.
//!
//! It unpacks Debian's qemu-system, the cloud kernel, busybox and the disk
//! tools (sfdisk, mkfs.vfat, SYSLINUX) into a private folder (no
//! system-wide QEMU: Debian's qemu-system conflicts with the qemu-utils the
//! taps use), builds initramfs images holding given programs and an init
//! script, and bootable disks holding them, and boots guests under TCG
//! (nested KVM does not boot here), from the kernel or through the firmware
//! from a disk, with virtio disks and user-mode networking. A guest is a
//! [`Guest`]: stopped when dropped, and killed with its parent should the
//! test process die. SIGKILL of QEMU is a power cut for the guest: what it
//! had not written to its virtual disk is lost, what it had stays.

use crate::process::ChildGuard;
use anyhow::{bail, ensure, Context, Result};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use packaging::debian::{DebianRoot, IMAGE_PACKAGES};
pub use packaging::image::BootDisk;
use packaging::image::{build_boot_disk, build_initramfs, InitramfsSpec};

/// Debian packages unpacked into the kit besides the image packages
/// (`packaging::debian::IMAGE_PACKAGES`) and the kernel: QEMU and its
/// firmware.
const QEMU_PACKAGES: &[&str] = &["qemu-system-x86", "qemu-system-common", "qemu-system-data", "seabios"];

/// Shared libraries the unpacked QEMU links against, installed with apt
/// when missing (they do not conflict with anything).
pub const QEMU_LIBRARIES: &[&str] =
    &["libcapstone4", "libfdt1", "libpmem1", "librdmacm1", "libibverbs1", "libslirp0", "libvdeplug2"];

/// Kernel modules (under `kernel/`, without `.ko`) for virtio disks, in
/// load order: the cloud kernel builds them as modules.
pub const BLOCK_MODULES: &[&str] = &[
    "drivers/virtio/virtio_ring",
    "drivers/virtio/virtio",
    "drivers/virtio/virtio_pci_modern_dev",
    "drivers/virtio/virtio_pci_legacy_dev",
    "drivers/virtio/virtio_pci",
    "drivers/block/virtio_blk",
];

/// The test VM's init: waits for its data area, prints its SHA-256 and a
/// marker of its own, writes the marker into the data area (sector 3) and
/// powers off.
pub const TEST_VM_INIT: &str = "i=0; while [ ! -b /dev/vda2 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done\n\
    echo \"TESTVM: data $(sha256sum /dev/vda2 | cut -d' ' -f1)\"\n\
    m=test-vm-$(cat /proc/sys/kernel/random/uuid)\n\
    echo $m | dd of=/dev/vda2 bs=512 seek=3 conv=notrunc,fsync 2>/dev/null\n\
    echo \"TESTVM: wrote $m\"\n\
    [ -b /dev/vdb ] && dd if=/dev/vdb bs=512 count=1 2>/dev/null | while read l; do case \"$l\" in address=*) echo \"TESTVM: config $l\";; esac; done";

/// Kernel modules for a virtio NIC, loaded after [`BLOCK_MODULES`].
pub const NET_MODULES: &[&str] = &["net/core/failover", "drivers/net/net_failover", "drivers/net/virtio_net"];

/// The unpacked kit.
#[derive(Debug, Clone)]
pub struct GuestKit {
    debian: DebianRoot,
}

/// The kit's folder: under the build's target folder, shared by every test
/// and run of this checkout.
pub fn default_kit_dir() -> PathBuf {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| workspace.join("target"));
    target.join("guest-kit")
}

fn run(cmd: &mut Command, what: &str) -> Result<()> {
    let out = cmd.stdin(Stdio::null()).output().with_context(|| format!("running {what}"))?;
    ensure!(out.status.success(), "{what} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    Ok(())
}

impl GuestKit {
    /// The kit in [`default_kit_dir`], unpacked on first use.
    pub fn prepare() -> Result<GuestKit> {
        GuestKit::prepare_in(&default_kit_dir())
    }

    /// Unpacks the kit into `dir` unless it is there already. Safe to call
    /// from several threads and processes at once.
    pub fn prepare_in(dir: &Path) -> Result<GuestKit> {
        let packages: Vec<&str> = IMAGE_PACKAGES.iter().chain(QEMU_PACKAGES).copied().collect();
        let debian = DebianRoot::prepare_in(dir, &packages).context("unpacking the guest kit")?;
        let kit = GuestKit { debian };
        if kit.qemu_version().is_err() {
            let mut apt = Command::new("apt-get");
            apt.args(["install", "-y", "-qq"]).args(QEMU_LIBRARIES).env("DEBIAN_FRONTEND", "noninteractive");
            if run(&mut apt, "apt-get install").is_err() {
                run(Command::new("apt-get").args(["update", "-qq"]), "apt-get update")?;
                run(&mut apt, "apt-get install")?;
            }
            kit.qemu_version()?;
        }
        Ok(kit)
    }

    /// The Debian packages the kit is made of (for images built by
    /// `packaging`, such as the appliance).
    pub fn debian(&self) -> &DebianRoot {
        &self.debian
    }

    fn qemu(&self) -> Command {
        let root = self.debian.root();
        let mut cmd = Command::new(root.join("usr/bin/qemu-system-x86_64"));
        cmd.env("QEMU_MODULE_DIR", root.join("usr/lib/x86_64-linux-gnu/qemu"));
        cmd
    }

    fn qemu_version(&self) -> Result<String> {
        let out = self.qemu().arg("--version").output().context("running the kit's QEMU")?;
        ensure!(out.status.success(), "the kit's QEMU does not run: {}", String::from_utf8_lossy(&out.stderr).trim());
        Ok(String::from_utf8_lossy(&out.stdout).lines().next().unwrap_or_default().to_string())
    }

    pub fn kernel(&self) -> PathBuf {
        self.debian.kernel()
    }

    /// Builds an initramfs at `out` from `spec` (an uncompressed newc cpio,
    /// which the kernel reads as it is).
    pub fn build_initramfs(&self, spec: &Initramfs, out: &Path) -> Result<()> {
        let load: String = spec
            .modules
            .iter()
            .filter_map(|m| Path::new(m).file_name().and_then(|n| n.to_str()))
            .map(|name| format!("insmod /mods/{name}.ko\n"))
            .collect();
        let init = format!(
            "#!/bin/busybox sh\n\
             /bin/busybox --install -s /bin\n\
             mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev\n\
             dmesg -n 1\n\
             {load}\
             {body}\n\
             poweroff -f\n",
            body = spec.init
        );
        let image = InitramfsSpec {
            modules: spec.modules.iter().map(|m| self.debian.module(m)).collect(),
            programs: spec.programs.clone(),
            files: Vec::new(),
            init,
        };
        Ok(build_initramfs(&self.debian, &image, out)?)
    }

    /// QEMU for a `machine` (q35, pc) under TCG with its firmware, no
    /// display, `memory_mb` and the serial console into `console`.
    fn machine(&self, machine: &str, memory_mb: u32, console: &Path) -> Command {
        let mut cmd = self.qemu();
        cmd.arg("-L")
            .arg(self.debian.root().join("usr/share/qemu"))
            .arg("-L")
            .arg(self.debian.root().join("usr/share/seabios"))
            .args(["-machine", &format!("{machine},accel=tcg"), "-display", "none", "-monitor", "none", "-no-reboot"])
            .args(["-m", &memory_mb.to_string()])
            .arg("-serial")
            .arg(format!("file:{}", console.display()));
        cmd
    }

    /// Boots a guest. Its serial console goes to `config.console`.
    pub fn boot(&self, config: &GuestConfig) -> Result<Guest> {
        let mut cmd = self.machine("q35", config.memory_mb, &config.console);
        if let Boot::Kernel { initramfs, append } = &config.boot {
            cmd.arg("-kernel")
                .arg(self.kernel())
                .arg("-initrd")
                .arg(initramfs)
                .arg("-append")
                .arg(format!("{KERNEL_COMMAND_LINE} {append}"));
        }
        for d in &config.disks {
            cmd.arg("-drive").arg(format!("file={},format=raw,if=virtio,cache=writeback", d.display()));
        }
        for uri in &config.nbd_disks {
            cmd.arg("-drive").arg(format!("file={uri},format=raw,if=virtio,cache=writeback"));
        }
        for uri in &config.read_only_nbd_disks {
            cmd.arg("-drive").arg(format!("file={uri},format=raw,if=virtio,readonly=on"));
        }
        if config.forwards.is_empty() {
            cmd.args(["-nic", "none"]);
        } else {
            let fwd: String = config
                .forwards
                .iter()
                .map(|(host, guest)| format!(",hostfwd=tcp:127.0.0.1:{host}-10.0.2.15:{guest}"))
                .collect();
            cmd.args(["-netdev", &format!("user,id=n0{fwd}"), "-device", "virtio-net-pci,netdev=n0,romfile="]);
        }
        spawn(cmd, &config.console)
    }

    /// Boots a VM on ESXi's usual virtual hardware, as QEMU offers it: a
    /// PC with a PVSCSI controller holding `disks` (the first boots through
    /// the firmware), an IDE CD-ROM holding `cdrom`, and a vmxnet3 NIC on
    /// user-mode networking (the guest reaches this machine's loopback as
    /// 10.0.2.2). The first disk is opened as a snapshot: the VM's writes
    /// to it are dropped, so one image serves many boots.
    pub fn boot_esxi_like(&self, config: &EsxiVmConfig) -> Result<Guest> {
        let mut cmd = self.machine("pc", config.memory_mb, &config.console);
        cmd.args(["-device", "pvscsi,id=pvscsi0"]);
        for (i, d) in config.disks.iter().enumerate() {
            let snapshot = if i == 0 { ",snapshot=on" } else { "" };
            cmd.arg("-drive")
                .arg(format!("file={},format=raw,if=none,id=d{i},cache=writeback{snapshot}", d.display()))
                .arg("-device")
                .arg(format!(
                    "scsi-hd,drive=d{i},bus=pvscsi0.0,scsi-id={i}{}",
                    if i == 0 { ",bootindex=0" } else { "" }
                ));
        }
        if let Some(iso) = &config.cdrom {
            cmd.arg("-drive")
                .arg(format!("file={},format=raw,if=none,id=cd0,media=cdrom,readonly=on", iso.display()))
                .args(["-device", "ide-cd,drive=cd0,bus=ide.1"]);
        }
        cmd.args(["-netdev", "user,id=n0", "-device", "vmxnet3,netdev=n0,romfile="]);
        spawn(cmd, &config.console)
    }
}

/// Starts QEMU with its serial console in `console`; killed with its
/// parent.
fn spawn(mut cmd: Command, console: &Path) -> Result<Guest> {
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
    // SAFETY: prctl in the forked child before exec touches no memory of
    // ours; it asks the kernel to SIGKILL QEMU when the thread that
    // started it dies, so a killed test leaves no guest running.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let _ = std::fs::remove_file(console);
    let child = ChildGuard::spawn(&mut cmd, "QEMU")?;
    Ok(Guest { child, console: console.to_path_buf() })
}

/// A VM on ESXi-like virtual hardware ([`GuestKit::boot_esxi_like`]).
#[derive(Debug, Clone)]
pub struct EsxiVmConfig {
    /// Raw images on the PVSCSI controller; the first boots.
    pub disks: Vec<PathBuf>,
    /// An ISO image in the CD-ROM (the OVF environment).
    pub cdrom: Option<PathBuf>,
    pub memory_mb: u32,
    pub console: PathBuf,
}

/// The kernel command line every guest gets: the serial console, and a
/// panic powers the guest off rather than hanging it.
const KERNEL_COMMAND_LINE: &str = "console=ttyS0 quiet panic=-1";

impl GuestKit {
    /// Builds a bootable raw disk at `out` (made from files alone: no root,
    /// no loop device): `boot_mb` MiB for the partition table and the boot
    /// partition (at least 48), then `data_mb` MiB of data area
    /// (`/dev/vda2` in the guest).
    pub fn build_boot_disk(
        &self,
        initramfs: &Path,
        append: &str,
        boot_mb: u64,
        data_mb: u64,
        out: &Path,
    ) -> Result<BootDisk> {
        let cmdline = format!("{KERNEL_COMMAND_LINE} {append}");
        Ok(build_boot_disk(&self.debian, initramfs, cmdline.trim_end(), boot_mb, data_mb, out)?)
    }
}

/// What an initramfs holds besides busybox: kernel modules to load (in
/// order), programs (host path -> guest path, stripped of debug info, with
/// their shared libraries), and the body of the init script, run after the
/// modules are loaded; the guest powers off when it ends.
#[derive(Debug, Clone, Default)]
pub struct Initramfs {
    pub modules: Vec<&'static str>,
    pub programs: Vec<(PathBuf, String)>,
    pub init: String,
}

/// How a guest boots.
#[derive(Debug, Clone)]
pub enum Boot {
    /// QEMU loads the kit's kernel and this initramfs, with extra kernel
    /// command line.
    Kernel { initramfs: PathBuf, append: String },
    /// Through its firmware from the first of its disks (one made by
    /// [`GuestKit::build_boot_disk`], say), as a real VM boots.
    FirstDisk,
}

/// How to boot a guest.
#[derive(Debug, Clone)]
pub struct GuestConfig {
    pub boot: Boot,
    pub memory_mb: u32,
    /// Raw images, attached as virtio disks in order (/dev/vda, /dev/vdb…).
    pub disks: Vec<PathBuf>,
    /// NBD exports (`nbd://HOST:PORT/NAME`), attached after `disks`: a
    /// failover test's VM boots from its stacks' exports.
    pub nbd_disks: Vec<String>,
    /// Read-only NBD exports attached after those (a VM's config disk).
    pub read_only_nbd_disks: Vec<String>,
    /// TCP ports forwarded from 127.0.0.1 on the host to the guest (whose
    /// address is 10.0.2.15; it reaches the host as 10.0.2.2).
    pub forwards: Vec<(u16, u16)>,
    pub console: PathBuf,
}

/// A running guest, stopped (SIGKILL: a power cut) when dropped.
#[derive(Debug)]
pub struct Guest {
    child: ChildGuard,
    console: PathBuf,
}

impl Guest {
    pub fn console_text(&self) -> String {
        std::fs::read(&self.console).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default()
    }

    /// Waits until the console shows `needle`; fails if QEMU ends first or
    /// `timeout` passes, with the console's end in the error.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        loop {
            let text = self.console_text();
            if text.contains(needle) {
                return Ok(());
            }
            if !self.child.is_running() {
                bail!("the guest stopped before printing {needle:?}; console:\n{}", tail(&text));
            }
            if start.elapsed() > timeout {
                bail!("the guest did not print {needle:?} within {timeout:?}; console:\n{}", tail(&text));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Cuts the guest's power: SIGKILL of QEMU.
    pub fn power_cut(&mut self) {
        self.child.kill();
    }

    /// Cuts the guest's power after `delay`, from another thread (while
    /// the caller drives I/O). Join the handle, then call
    /// [`Guest::power_cut`] to reap QEMU.
    pub fn power_cut_after(&self, delay: Duration) -> std::thread::JoinHandle<()> {
        let pid = self.child.id();
        std::thread::spawn(move || {
            std::thread::sleep(delay);
            if let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()) {
                // SAFETY: kill(2) on our own child's pid, not yet reaped
                // (the Guest reaps it only in power_cut/drop, after this
                // thread is joined), has no memory effects.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        })
    }

    /// Waits for the guest to power off by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let start = Instant::now();
        while self.child.is_running() {
            if start.elapsed() > timeout {
                self.child.kill();
                bail!("the guest did not power off within {timeout:?}; console:\n{}", tail(&self.console_text()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(self.child.wait()?)
    }
}

fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// A free TCP port on 127.0.0.1 (for a guest's forwarded port).
pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Makes an ext4 image of `size_mb` MiB at `path` (mkfs.ext4 works on a
/// plain file, no root needed).
pub fn make_ext4(path: &Path, size_mb: u64) -> Result<()> {
    let f = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    f.set_len(size_mb << 20)?;
    drop(f);
    run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(path), "mkfs.ext4")
}

/// Runs the shell `command` inside a check VM (the kit's kernel, an
/// initramfs of busybox) with `uris` attached over NBD as `/dev/vda`,
/// `/dev/vdb`, ... (the clean-point search's in-guest check); returns the
/// command's exit code, or 1 if the VM reports none within `timeout`.
pub fn run_check_vm(uris: &[String], command: &str, timeout: Duration) -> Result<i32> {
    let kit = GuestKit::prepare()?;
    let dir = tempfile::tempdir()?;
    let initramfs = dir.path().join("check-initrd");
    let init = format!(
        "i=0; while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done\n\
         ( {command} ) > /dev/console 2>&1; echo \"CHECKVM: exit $?\""
    );
    kit.build_initramfs(&Initramfs { modules: BLOCK_MODULES.to_vec(), programs: Vec::new(), init }, &initramfs)?;
    let console = dir.path().join("console.log");
    let mut guest = kit.boot(&GuestConfig {
        boot: Boot::Kernel { initramfs, append: String::new() },
        memory_mb: 256,
        disks: Vec::new(),
        nbd_disks: uris.to_vec(),
        read_only_nbd_disks: Vec::new(),
        forwards: Vec::new(),
        console: console.clone(),
    })?;
    let reported = guest.wait_for("CHECKVM: exit ", timeout).is_ok();
    let _ = guest.wait_exit(Duration::from_secs(30));
    let text = guest.console_text();
    print!("{text}");
    if !reported {
        return Ok(1);
    }
    Ok(text
        .lines()
        .find_map(|l| l.trim().strip_prefix("CHECKVM: exit ").and_then(|c| c.trim().parse().ok()))
        .unwrap_or(1))
}
