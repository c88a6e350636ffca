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
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Debian packages unpacked into the kit (the kernel's comes from
/// `linux-image-cloud-amd64`'s dependency): QEMU and its firmware, busybox
/// for the guests' userland, and what makes a bootable disk from files
/// alone (sfdisk, mkfs.vfat, SYSLINUX with mtools).
const PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "qemu-system-common",
    "qemu-system-data",
    "seabios",
    "busybox-static",
    "syslinux",
    "syslinux-common",
    "mtools",
    "dosfstools",
    "fdisk",
];

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
    root: PathBuf,
    kernel_version: String,
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

fn apt_update() -> Result<()> {
    run(Command::new("apt-get").args(["update", "-qq"]), "apt-get update")
}

/// The kernel package the cloud kernel's meta package points at.
fn kernel_package() -> Result<String> {
    for attempt in 0..2 {
        let out = Command::new("apt-cache")
            .args(["depends", "linux-image-cloud-amd64"])
            .output()
            .context("running apt-cache (is this Debian?)")?;
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
    bail!("apt-cache knows no dependency of linux-image-cloud-amd64")
}

impl GuestKit {
    /// The kit in [`default_kit_dir`], unpacked on first use.
    pub fn prepare() -> Result<GuestKit> {
        GuestKit::prepare_in(&default_kit_dir())
    }

    /// Unpacks the kit into `dir` unless it is there already. Safe to call
    /// from several threads and processes at once (a lock file serialises
    /// them).
    pub fn prepare_in(dir: &Path) -> Result<GuestKit> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let lock = std::fs::File::create(dir.join(".lock")).context("the guest kit's lock file")?;
        // SAFETY: flock takes a descriptor we own for the duration of the
        // call and touches no memory of ours.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
            bail!("locking the guest kit: {}", std::io::Error::last_os_error());
        }
        let root = dir.join("root");
        let ready = root.join(".ready");
        let wanted = PACKAGES.join(" ");
        if std::fs::read_to_string(&ready).ok().as_deref() != Some(wanted.as_str()) {
            let debs = dir.join("debs");
            let _ = std::fs::remove_dir_all(&debs);
            let _ = std::fs::remove_dir_all(&root);
            std::fs::create_dir_all(&debs)?;
            let mut packages: Vec<String> = PACKAGES.iter().map(|s| s.to_string()).collect();
            packages.push(kernel_package()?);
            let download =
                || run(Command::new("apt-get").arg("download").args(&packages).current_dir(&debs), "apt-get download");
            if download().is_err() {
                apt_update()?;
                download()?;
            }
            for deb in std::fs::read_dir(&debs)?.flatten() {
                run(Command::new("dpkg-deb").arg("-x").arg(deb.path()).arg(&root), "dpkg-deb -x")?;
            }
        }
        let modules = root.join("lib/modules");
        let kernel_version = std::fs::read_dir(&modules)
            .with_context(|| format!("listing {}", modules.display()))?
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .next()
            .context("the kit holds no kernel")?;
        let kit = GuestKit { root, kernel_version };
        if kit.qemu_version().is_err() {
            let mut apt = Command::new("apt-get");
            apt.args(["install", "-y", "-qq"]).args(QEMU_LIBRARIES).env("DEBIAN_FRONTEND", "noninteractive");
            if run(&mut apt, "apt-get install").is_err() {
                apt_update()?;
                run(&mut apt, "apt-get install")?;
            }
            kit.qemu_version()?;
        }
        std::fs::write(&ready, wanted)?;
        Ok(kit)
    }

    fn qemu(&self) -> Command {
        let mut cmd = Command::new(self.root.join("usr/bin/qemu-system-x86_64"));
        cmd.env("QEMU_MODULE_DIR", self.root.join("usr/lib/x86_64-linux-gnu/qemu"));
        cmd
    }

    fn qemu_version(&self) -> Result<String> {
        let out = self.qemu().arg("--version").output().context("running the kit's QEMU")?;
        ensure!(out.status.success(), "the kit's QEMU does not run: {}", String::from_utf8_lossy(&out.stderr).trim());
        Ok(String::from_utf8_lossy(&out.stdout).lines().next().unwrap_or_default().to_string())
    }

    pub fn kernel(&self) -> PathBuf {
        self.root.join(format!("boot/vmlinuz-{}", self.kernel_version))
    }

    fn module(&self, name: &str) -> PathBuf {
        self.root.join("lib/modules").join(&self.kernel_version).join("kernel").join(format!("{name}.ko"))
    }

    /// Builds an initramfs at `out` from `spec` (an uncompressed newc cpio,
    /// which the kernel reads as it is).
    pub fn build_initramfs(&self, spec: &Initramfs, out: &Path) -> Result<()> {
        let stage = tempfile::tempdir().context("staging folder")?;
        let s = stage.path();
        for d in ["bin", "dev", "proc", "sys", "mods", "data", "run", "tmp", "etc"] {
            std::fs::create_dir_all(s.join(d))?;
        }
        std::fs::copy(self.root.join("bin/busybox"), s.join("bin/busybox")).context("copying busybox")?;
        let mut load = String::new();
        for m in &spec.modules {
            let src = self.module(m);
            let name = Path::new(m).file_name().and_then(|n| n.to_str()).context("module name")?;
            std::fs::copy(&src, s.join("mods").join(format!("{name}.ko")))
                .with_context(|| format!("copying {}", src.display()))?;
            load.push_str(&format!("insmod /mods/{name}.ko\n"));
        }
        for (host, guest) in &spec.programs {
            copy_program(host, &s.join(guest.trim_start_matches('/')))?;
            for lib in shared_libraries(host)? {
                let to = s.join(lib.strip_prefix("/").unwrap_or(&lib));
                if !to.exists() {
                    std::fs::create_dir_all(to.parent().context("library folder")?)?;
                    std::fs::copy(&lib, &to).with_context(|| format!("copying {}", lib.display()))?;
                }
            }
        }
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
        write_mode(&s.join("init"), init.as_bytes(), 0o755)?;
        let f = std::fs::File::create(out).with_context(|| format!("creating {}", out.display()))?;
        let status = Command::new("sh")
            .args(["-c", "find . | ./bin/busybox cpio -o -H newc"])
            .current_dir(s)
            .stdout(f)
            .stderr(Stdio::null())
            .status()
            .context("running busybox cpio")?;
        ensure!(status.success(), "busybox cpio failed ({status})");
        Ok(())
    }

    /// Boots a guest. Its serial console goes to `config.console`.
    pub fn boot(&self, config: &GuestConfig) -> Result<Guest> {
        let mut cmd = self.qemu();
        cmd.arg("-L")
            .arg(self.root.join("usr/share/qemu"))
            .arg("-L")
            .arg(self.root.join("usr/share/seabios"))
            .args(["-machine", "q35,accel=tcg", "-display", "none", "-monitor", "none", "-no-reboot"])
            .args(["-m", &config.memory_mb.to_string()])
            .arg("-serial")
            .arg(format!("file:{}", config.console.display()));
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
        let _ = std::fs::remove_file(&config.console);
        let child = ChildGuard::spawn(&mut cmd, "QEMU")?;
        Ok(Guest { child, console: config.console.clone() })
    }
}

/// The kernel command line every guest gets: the serial console, and a
/// panic powers the guest off rather than hanging it.
const KERNEL_COMMAND_LINE: &str = "console=ttyS0 quiet panic=-1";

/// A disk that boots by itself: an MBR partition table, a FAT32 partition
/// holding SYSLINUX, the kit's kernel and an initramfs, and after it an
/// optional data area (a second partition, `/dev/vda2` in the guest).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootDisk {
    pub path: PathBuf,
    /// Where the data area starts in the image, and its length (bytes).
    pub data_offset: u64,
    pub data_len: u64,
}

impl GuestKit {
    fn tool(&self, name: &str) -> Command {
        let mut cmd = Command::new(name);
        let path = std::env::var_os("PATH").unwrap_or_default();
        let mut dirs = vec![self.root.join("usr/bin"), self.root.join("sbin"), self.root.join("usr/sbin")];
        dirs.extend(std::env::split_paths(&path));
        if let Ok(joined) = std::env::join_paths(dirs) {
            cmd.env("PATH", joined);
        }
        cmd
    }

    /// Builds a bootable raw disk at `out` (made from files alone: no root,
    /// no loop device): `boot_mb` MiB for the partition table and the boot
    /// partition (at least 48), then `data_mb` MiB of data area.
    pub fn build_boot_disk(
        &self,
        initramfs: &Path,
        append: &str,
        boot_mb: u64,
        data_mb: u64,
        out: &Path,
    ) -> Result<BootDisk> {
        ensure!(boot_mb >= 48, "a boot partition of {boot_mb} MiB is too small for FAT32 and the kernel (48 at least)");
        const SECTOR: u64 = 512;
        let (part_start, part_sectors) = (2048u64, boot_mb * 2048 - 2048);
        let total = (boot_mb + data_mb) << 20;
        let disk = std::fs::File::create(out).with_context(|| format!("creating {}", out.display()))?;
        disk.set_len(total)?;
        drop(disk);
        let mut table = format!("label: dos\nstart={part_start}, size={part_sectors}, type=c, bootable\n");
        if data_mb > 0 {
            table.push_str(&format!("start={}, size={}, type=83\n", boot_mb * 2048, data_mb * 2048));
        }
        let mut sfdisk = self
            .tool("sfdisk")
            .arg("-q")
            .arg(out)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("running sfdisk")?;
        sfdisk.stdin.take().context("sfdisk stdin")?.write_all(table.as_bytes())?;
        let done = sfdisk.wait_with_output()?;
        ensure!(done.status.success(), "sfdisk failed: {}", String::from_utf8_lossy(&done.stderr).trim());
        let stage = tempfile::tempdir().context("staging folder")?;
        let part = stage.path().join("part.img");
        std::fs::File::create(&part)?.set_len(part_sectors * SECTOR)?;
        run(self.tool("mkfs.vfat").args(["-F", "32", "-n", "VDSA"]).arg(&part), "mkfs.vfat")?;
        run(self.tool("syslinux").arg("--install").arg(&part), "syslinux --install")?;
        let cfg = stage.path().join("syslinux.cfg");
        std::fs::write(
            &cfg,
            format!(
                "DEFAULT guest\nPROMPT 0\nTIMEOUT 0\nLABEL guest\n  KERNEL /vmlinuz\n  INITRD /initrd\n  APPEND {KERNEL_COMMAND_LINE} {append}\n"
            ),
        )?;
        for (file, name) in
            [(cfg.as_path(), "::/syslinux.cfg"), (&self.kernel(), "::/vmlinuz"), (initramfs, "::/initrd")]
        {
            run(self.tool("mcopy").arg("-i").arg(&part).arg(file).arg(name), "mcopy")?;
        }
        // The partition goes in at its place, and SYSLINUX's MBR code in
        // front of the partition table.
        let disk = std::fs::OpenOptions::new().write(true).open(out)?;
        let bytes = std::fs::read(&part)?;
        std::os::unix::fs::FileExt::write_all_at(&disk, &bytes, part_start * SECTOR)?;
        let mbr = std::fs::read(self.root.join("usr/lib/syslinux/mbr/mbr.bin")).context("SYSLINUX's mbr.bin")?;
        ensure!(mbr.len() >= 440, "mbr.bin is {} bytes", mbr.len());
        std::os::unix::fs::FileExt::write_all_at(&disk, &mbr[..440], 0)?;
        disk.sync_all()?;
        Ok(BootDisk { path: out.to_path_buf(), data_offset: boot_mb << 20, data_len: data_mb << 20 })
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

fn write_mode(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mut f = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    f.write_all(bytes)?;
    f.set_permissions(std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// Copies a program without its debug information (a release build of ours
/// carries tens of MB of it, which a guest would have to unpack).
fn copy_program(host: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to.parent().context("program folder")?)?;
    let stripped = Command::new("objcopy").arg("--strip-debug").arg(host).arg(to).status();
    if !stripped.is_ok_and(|s| s.success()) {
        std::fs::copy(host, to).with_context(|| format!("copying {}", host.display()))?;
    }
    Ok(())
}

/// The shared libraries `program` loads, as `ldd` lists them (the loader
/// included).
fn shared_libraries(program: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd").arg(program).output().context("running ldd")?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text.lines().filter_map(|l| l.split_whitespace().find(|w| w.starts_with('/'))).map(PathBuf::from).collect())
}

/// Makes an ext4 image of `size_mb` MiB at `path` (mkfs.ext4 works on a
/// plain file, no root needed).
pub fn make_ext4(path: &Path, size_mb: u64) -> Result<()> {
    let f = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    f.set_len(size_mb << 20)?;
    drop(f);
    run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(path), "mkfs.ext4")
}
