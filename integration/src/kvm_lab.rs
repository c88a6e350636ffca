//! Real processes for KVM tap tests and benchmarks: the `vdsa` daemon,
//! qemu-storage-daemon holding a source disk (the hypervisor), and qemu-nbd
//! as a plain NBD mirror target (the peer the VDSA is measured against).
//! Each is stopped when dropped.

use crate::process::ChildGuard;
use crate::replication_lab::Daemon;
use crate::workload::{GenWrite, Payload};
use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use vdsa::kvm::{self, NbdAddress, Qmp, TapSpec, TapState};
use vdsa::nbd::client::NbdClient;

/// A generated write made by a guest through QEMU. Returns whether it
/// reaches a tap: QEMU's mirror drops discards (the source ignores them
/// too), so a trim changes nothing on either side.
pub fn guest_write(guest: &mut NbdClient, w: &GenWrite) -> std::io::Result<bool> {
    match &w.payload {
        Payload::Data(d) => guest.write(w.offset, d)?,
        Payload::Zero(n) => guest.write_zeroes(w.offset, *n as u32, false)?,
        Payload::Trim(n) => {
            guest.trim(w.offset, *n as u32)?;
            return Ok(false);
        }
    }
    Ok(true)
}

fn wait_for_path(p: &Path) -> Result<()> {
    let start = Instant::now();
    while !p.exists() {
        if start.elapsed() > Duration::from_secs(20) {
            bail!("{} never appeared", p.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Whether qemu-storage-daemon can be run here.
pub fn qemu_available() -> bool {
    Command::new("qemu-storage-daemon").arg("--version").output().is_ok_and(|o| o.status.success())
}

/// The `vdsa tap-serve` daemon for one disk, its tap socket and journal in
/// `dir`.
#[derive(Debug)]
pub struct VdsaProcess {
    daemon: Daemon,
    pub control: PathBuf,
    pub tap_sock: PathBuf,
    pub journal: PathBuf,
}

impl VdsaProcess {
    /// `lab` is the lab binary (`lab vdsa ...` runs the daemon); `disk` is
    /// NAME=SIZE.
    pub fn start(lab: &Path, dir: &Path, disk: &str) -> Result<VdsaProcess> {
        VdsaProcess::start_with_journal(lab, dir, &dir.join("journal"), disk)
    }

    /// The same, with the journal at `journal` (on another file system,
    /// say).
    pub fn start_with_journal(lab: &Path, dir: &Path, journal: &Path, disk: &str) -> Result<VdsaProcess> {
        let control = dir.join("ctl.sock");
        let tap_sock = dir.join("tap.sock");
        let journal = journal.to_path_buf();
        let args: Vec<String> = vec![
            "tap-serve".into(),
            "--disk".into(),
            disk.into(),
            "--journal".into(),
            journal.display().to_string(),
            "--listen".into(),
            format!("unix:{}", tap_sock.display()),
            "--control".into(),
            control.display().to_string(),
        ];
        let daemon = Daemon::start(lab, &args, &control, &dir.join("vdsa.log"))?;
        Ok(VdsaProcess { daemon, control, tap_sock, journal })
    }

    /// One control request; an `"ok": false` answer is an error.
    pub fn call(&self, req: Value) -> Result<Value> {
        self.daemon.call(req)
    }

    /// Makes the journal durable and stops the daemon.
    pub fn shutdown(self) -> Result<()> {
        self.daemon.shutdown()
    }

    /// SIGKILL.
    pub fn kill(self) {
        self.daemon.kill()
    }

    /// What it logged so far.
    pub fn log_text(&self) -> String {
        self.daemon.log_text()
    }
}

/// qemu-storage-daemon exporting `image` as NBD export "vmdisk" to the
/// guest, with its QMP monitor connected.
#[derive(Debug)]
pub struct StorageDaemon {
    child: ChildGuard,
    /// Its stderr: what QEMU says when it fails.
    log: PathBuf,
    pub qmp: Qmp,
    pub guest_sock: PathBuf,
    /// The monitor a VDSA agent uses to attach its taps.
    pub vdsa_qmp_sock: PathBuf,
    pub image: PathBuf,
}

impl StorageDaemon {
    /// `direct`: open the source as a VM with cache=none would
    /// (O_DIRECT, native AIO).
    pub fn start(dir: &Path, image: &Path, direct: bool) -> Result<StorageDaemon> {
        let qmp_sock = dir.join("qmp.sock");
        let vdsa_qmp_sock = dir.join("vdsa-qmp.sock");
        let guest_sock = dir.join("qsd.sock");
        let cache = if direct { ",cache.direct=on,aio=native" } else { "" };
        // What QEMU says when it fails (an assertion, a crash) is kept.
        let log_path = dir.join("qsd.log");
        let log = std::fs::File::create(&log_path).context("creating qsd.log")?;
        // A socket left by an earlier run would pass for this one's.
        for p in [&qmp_sock, &guest_sock, &vdsa_qmp_sock] {
            let _ = std::fs::remove_file(p);
        }
        let child = ChildGuard::spawn(
            Command::new("qemu-storage-daemon")
                .arg("--blockdev")
                .arg(format!("driver=file,node-name=src-file,filename={}{cache}", image.display()))
                .args(["--blockdev", "driver=raw,node-name=src,file=src-file"])
                .arg("--nbd-server")
                .arg(format!("addr.type=unix,addr.path={}", guest_sock.display()))
                .args(["--export", "type=nbd,id=exp0,node-name=src,name=vmdisk,writable=on"])
                .arg("--chardev")
                .arg(format!("socket,id=qmp0,path={},server=on,wait=off", qmp_sock.display()))
                .args(["--monitor", "chardev=qmp0"])
                // A second monitor for a VDSA agent that attaches its own
                // taps (a monitor serves one client at a time).
                .arg("--chardev")
                .arg(format!("socket,id=qmp1,path={},server=on,wait=off", vdsa_qmp_sock.display()))
                .args(["--monitor", "chardev=qmp1"])
                .stdout(Stdio::null())
                .stderr(log),
            "qemu-storage-daemon",
        )
        .context("is qemu-utils installed?")?;
        // From here on, an error drops `child`, which stops the daemon.
        wait_for_path(&qmp_sock)?;
        wait_for_path(&vdsa_qmp_sock)?;
        wait_for_path(&guest_sock)?;
        let qmp = Qmp::connect(&qmp_sock)?;
        Ok(StorageDaemon { child, log: log_path, qmp, guest_sock, vdsa_qmp_sock, image: image.to_path_buf() })
    }

    /// Tap target nodes (`JOB-tgt`) whose job `JOB` QEMU no longer runs:
    /// what a tap that ended left behind and nobody removed.
    pub fn stray_tap_nodes(&mut self) -> Result<Vec<String>> {
        let jobs = kvm::job_ids(&mut self.qmp)?;
        Ok(kvm::node_names(&mut self.qmp)?
            .into_iter()
            .filter(|n| kvm::job_of_target_node(n).is_some_and(|job| !jobs.iter().any(|j| j == job)))
            .collect())
    }

    /// Whether the daemon has exited, and what it wrote to stderr, for a
    /// failure's report (a VM whose QEMU died explains a tap that cannot
    /// attach).
    pub fn report(&mut self) -> String {
        let state = if self.child.is_running() { "running" } else { "exited" };
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        format!("qemu-storage-daemon {state}; its stderr ends:\n{}", crate::process::last_lines(&log, 10))
    }

    /// A guest: an NBD client writing through QEMU.
    pub fn guest(&self) -> Result<NbdClient> {
        Ok(NbdClient::connect_unix(&self.guest_sock, "vmdisk")?)
    }

    /// Attaches a write-blocking mirror of the disk to `tap_sock` (export
    /// `export`), full sync first, and waits until it is in sync.
    pub fn attach(&mut self, job: &str, tap_sock: &Path, export: &str) -> Result<TapState> {
        let spec = TapSpec {
            job_id: job.into(),
            device: "src".into(),
            target_node: kvm::target_node(job),
            server: NbdAddress::Unix(tap_sock.display().to_string()),
            export: export.into(),
            sync_full: true,
            reconnect_delay: None,
        };
        Ok(kvm::attach(&mut self.qmp, &spec, Duration::from_secs(300))?)
    }

    /// Detaches the tap (gracefully unless its target failed; see
    /// `vdsa::kvm::detach`).
    pub fn detach(&mut self, job: &str) -> Result<()> {
        Ok(kvm::detach(&mut self.qmp, job, &kvm::target_node(job))?)
    }

    /// Whether the daemon still runs (a move powers it off).
    pub fn is_running(&mut self) -> bool {
        self.child.is_running()
    }

    pub fn image_hash(&self) -> Result<blake3::Hash> {
        Ok(blake3::hash(&std::fs::read(&self.image)?))
    }
}

/// qemu-nbd serving a raw file: a plain NBD server as mirror target.
#[derive(Debug)]
pub struct PlainNbd {
    _child: ChildGuard,
    pub sock: PathBuf,
}

impl PlainNbd {
    pub fn start(sock: &Path, image: &Path) -> Result<PlainNbd> {
        let _ = std::fs::remove_file(sock);
        let child = ChildGuard::spawn(
            Command::new("qemu-nbd")
                .args(["--persistent", "--format=raw", "--shared=4"])
                .arg(format!("--socket={}", sock.display()))
                .arg(image)
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
            "qemu-nbd",
        )?;
        wait_for_path(sock)?;
        Ok(PlainNbd { _child: child, sock: sock.to_path_buf() })
    }
}
