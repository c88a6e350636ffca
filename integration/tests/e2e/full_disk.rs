//! A VDSA whose journal disk is full still starts, says so, serves what it
//! holds, and refuses new writes with ENOSPC (it used to fail to open: an
//! open created a new segment and pack).

use crate::replication::{lab, ok};
use crate::SmallDisk;
use integration::kvm_lab::VdsaProcess;
use rand::{RngCore, SeedableRng};
use serde_json::json;
use vdsa::nbd::client::NbdClient;

fn start(dir: &std::path::Path, journal: &std::path::Path) -> VdsaProcess {
    ok(VdsaProcess::start_with_journal(lab(), dir, journal, "d0=256M"))
}

#[test]
fn a_vdsa_on_a_full_journal_disk_starts_and_says_so() {
    let dir = ok(tempfile::tempdir().map_err(Into::into));
    let small = SmallDisk::mount(&dir.path().join("small"), "24M");
    full_journal_disk(&dir, small);
}

/// The same on ext4, where the journal's packs are written with `O_DIRECT`
/// (tmpfs has no direct I/O, so the test above writes them through the
/// page cache).
#[test]
fn a_vdsa_on_a_full_ext4_journal_disk_starts_and_says_so() {
    if !std::path::Path::new("/dev/loop-control").exists() {
        eprintln!("no loop devices on this machine: the ext4 case is left out (the tmpfs one ran)");
        return;
    }
    let dir = ok(tempfile::tempdir().map_err(Into::into));
    let small = SmallDisk::mount_ext4(&dir.path().join("small"), 32 << 20);
    full_journal_disk(&dir, small);
}

fn full_journal_disk(dir: &tempfile::TempDir, small: SmallDisk) {
    let journal = small.0.join("journal");
    let daemon = start(dir.path(), &journal);
    let mut tap = ok(NbdClient::connect_unix(&daemon.tap_sock, "d0").map_err(Into::into));
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut buf = vec![0u8; 1 << 20];
    rng.fill_bytes(&mut buf);
    ok(tap.write(0, &buf).map_err(Into::into));
    ok(tap.flush().map_err(Into::into));
    let first = buf.clone();
    // Incompressible data until the disk is full and a write is refused.
    let mut refused = None;
    for i in 1..64u64 {
        rng.fill_bytes(&mut buf);
        if let Err(e) = tap.write(i << 20, &buf).and_then(|()| tap.flush()) {
            refused = Some(e);
            break;
        }
    }
    let refused = refused.unwrap_or_else(|| panic!("64 MiB fit on a 24 MiB disk"));
    eprintln!("refused when full: {refused}");
    drop(tap);
    daemon.kill();
    // The restart on the full disk.
    let daemon = start(dir.path(), &journal);
    let st = ok(daemon.call(json!({"op": "status"})));
    assert_eq!(st["journal_disk_full"], json!(true), "{st}");
    assert!(daemon.log_text().contains("the journal's disk is full"), "{}", daemon.log_text());
    let mut tap = ok(NbdClient::connect_unix(&daemon.tap_sock, "d0").map_err(Into::into));
    let mut got = vec![0u8; 1 << 20];
    ok(tap.read(0, &mut got).map_err(Into::into));
    assert!(got == first, "the flushed first MiB reads back");
    rng.fill_bytes(&mut buf);
    let e = tap.write(100 << 20, &buf).and_then(|()| tap.flush()).err();
    let e = e.unwrap_or_else(|| panic!("a write on a full disk was accepted"));
    assert!(e.to_string().contains(&format!("NBD error {}", libc::ENOSPC)), "ENOSPC expected, got {e}");
    drop(tap);
    drop(daemon);
    drop(small);
}
