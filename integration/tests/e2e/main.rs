//! End-to-end tests that run, kill and verify real processes: the journal
//! under SIGKILL, and the KVM tap with the real QEMU.

mod crash;
mod full_disk;
mod guest_kit;
mod kvm_tap;
mod power_loss;
mod replication;
mod vsphere;

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
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}
