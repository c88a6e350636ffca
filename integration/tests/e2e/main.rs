//! End-to-end tests that run, kill and verify real processes: the journal
//! under SIGKILL, and the KVM tap with the real QEMU.

mod alerts;
mod appliance;
mod console;
mod crash;
mod encryption;
mod failover_test;
mod full_disk;
mod guest_kit;
mod journal_full;
mod kvm_tap;
mod main_job;
mod metrics;
mod move_vpg;
mod pairing;
mod power_loss;
mod quiesce;
mod replication;
mod site_loss;
mod site_manager;
mod vsphere;
mod vsphere_recovery;
mod write_order;

/// Tests that keep a core busy for a long time (guests under TCG) and tests
/// whose faults are timed (the two-site scenario's cuts and kills) take
/// turns: on two cores a TCG guest beside timed link cuts starves the link
/// of CPU and blurs what the timing checks.
pub fn take_turns() -> std::sync::MutexGuard<'static, ()> {
    static TURNS: std::sync::Mutex<()> = std::sync::Mutex::new(());
    TURNS.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Unmounts a small tmpfs when dropped.
#[derive(Debug)]
pub struct SmallDisk(pub std::path::PathBuf);

impl SmallDisk {
    pub fn mount(path: &std::path::Path, size: &str) -> SmallDisk {
        std::fs::create_dir_all(path).unwrap_or_else(|e| panic!("{e}"));
        let st = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .status();
        assert!(
            st.is_ok_and(|s| s.success()),
            "mounting a {size} tmpfs at {} (the test suite runs as root)",
            path.display()
        );
        SmallDisk(path.to_path_buf())
    }

    /// A small ext4 file system on a loop device (its image beside `path`).
    pub fn mount_ext4(path: &std::path::Path, bytes: u64) -> SmallDisk {
        std::fs::create_dir_all(path).unwrap_or_else(|e| panic!("{e}"));
        let image = path.with_extension("img");
        let f = std::fs::File::create(&image).unwrap_or_else(|e| panic!("{}: {e}", image.display()));
        f.set_len(bytes).unwrap_or_else(|e| panic!("{}: {e}", image.display()));
        drop(f);
        let run = |cmd: &str, args: &[&std::ffi::OsStr]| {
            let st = std::process::Command::new(cmd).args(args).status();
            assert!(st.is_ok_and(|s| s.success()), "{cmd} {args:?} (the test suite runs as root, with loop devices)");
        };
        run("mkfs.ext4", &["-q".as_ref(), "-F".as_ref(), image.as_os_str()]);
        run("mount", &["-o".as_ref(), "loop".as_ref(), image.as_os_str(), path.as_os_str()]);
        SmallDisk(path.to_path_buf())
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_file(self.0.with_extension("img"));
    }
}
