//! Write order across hosts under the site manager's two-phase barrier,
//! and the control run that shows the checker can fail
//! (`integration::write_order`; `lab write-order --long` runs 500).

use integration::kvm_lab::qemu_available;
use integration::write_order::{run, WriteOrderOptions};
use std::path::Path;

fn seed() -> u64 {
    std::env::var("WRITE_ORDER_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64)
    })
}

#[test]
fn every_offered_checkpoint_keeps_write_order_across_three_hosts() {
    if !qemu_available() {
        panic!("qemu-storage-daemon is missing: integration/run-tests installs qemu-utils");
    }
    let _turn = crate::take_turns();
    let seed = seed();
    println!("write order: 50 checkpoints, seed {seed} (WRITE_ORDER_SEED)");
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let lab = Path::new(env!("CARGO_BIN_EXE_lab"));
    let r = run(
        lab,
        dir.path(),
        &WriteOrderOptions { checkpoints: 50, seed, control: false, fault: None, changes: false },
        |m| println!("{m}"),
    )
    .unwrap_or_else(|e| panic!("seed {seed}: {e:#}"));
    assert_eq!(r.violations, 0, "seed {seed}: {:?}", r.first_violation);
    assert!(r.checked >= 45, "seed {seed}: only {} of {} checkpoints were offered", r.checked, r.inserted);
    assert!(r.writes > 1000, "seed {seed}: only {} chain writes", r.writes);
}

#[test]
fn with_the_barrier_off_the_checker_finds_violations() {
    if !qemu_available() {
        panic!("qemu-storage-daemon is missing: integration/run-tests installs qemu-utils");
    }
    let _turn = crate::take_turns();
    let seed = seed();
    println!("write order control run: 20 checkpoints, seed {seed}");
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let lab = Path::new(env!("CARGO_BIN_EXE_lab"));
    let r = run(
        lab,
        dir.path(),
        &WriteOrderOptions { checkpoints: 20, seed, control: true, fault: None, changes: false },
        |m| println!("{m}"),
    )
    .unwrap_or_else(|e| panic!("seed {seed}: {e:#}"));
    assert!(r.violations > 0, "seed {seed}: the barrier was off, yet {} checkpoints showed no violation", r.checked);
}

/// SIGKILL of a VDSA between PREPARE and COMMIT, and of the site manager
/// there: the checkpoint in flight is never offered, no guest write waits
/// longer than the hold limit (1 s) on a host whose VDSA lives, and
/// protection resumes.
#[test]
fn a_sigkill_between_prepare_and_commit_offers_no_half_made_checkpoint() {
    if !qemu_available() {
        panic!("qemu-storage-daemon is missing: integration/run-tests installs qemu-utils");
    }
    use integration::write_order::Fault;
    for fault in [Fault::Vdsa, Fault::SiteManager] {
        let _turn = crate::take_turns();
        let seed = seed();
        println!("write order with {fault:?} killed after PREPARE 8: 15 checkpoints, seed {seed}");
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let lab = Path::new(env!("CARGO_BIN_EXE_lab"));
        let opts = WriteOrderOptions { checkpoints: 15, seed, control: false, fault: Some((fault, 8)), changes: false };
        let r =
            run(lab, dir.path(), &opts, |m| println!("{m}")).unwrap_or_else(|e| panic!("{fault:?} seed {seed}: {e:#}"));
        assert_eq!(r.violations, 0, "{fault:?} seed {seed}: {:?}", r.first_violation);
        let (id, record) = r.faulted.clone().unwrap_or_else(|| panic!("{fault:?}: the fault never struck"));
        assert!(
            record.as_ref().is_none_or(|c| c["durable"] != true),
            "{fault:?}: checkpoint {id}, cut short by the fault, is durable: {record:?}"
        );
        assert!(r.offered_after_fault > 0, "{fault:?}: protection did not resume");
        // The tap the dead VDSA left ended by itself; its node went with
        // the next attach.
        assert!(r.stray_tap_nodes.iter().all(Vec::is_empty), "{fault:?}: {:?}", r.stray_tap_nodes);
        for (host, ms) in r.max_write_ms.iter().enumerate() {
            if fault == Fault::Vdsa && host == 1 {
                continue; // its VDSA died: its writes waited for the new one
            }
            assert!(*ms <= 1500, "{fault:?}: a guest write on host {host} waited {ms} ms (hold limit 1000 ms)");
        }
    }
}

/// Changes to the protected VMs while the chains run: a disk added to a
/// VM, then removed, then a disk grown, then a VM moved to another host
/// (its stream handed over). Write order still holds on every checkpoint
/// offered, protection resumes after each change, and the checkpoints
/// before the grow keep the old size while the newest has the new one.
#[test]
fn write_order_holds_while_disks_are_added_grown_and_removed_and_a_vm_moves() {
    if !qemu_available() {
        panic!("qemu-storage-daemon is missing: integration/run-tests installs qemu-utils");
    }
    let _turn = crate::take_turns();
    let seed = seed();
    println!("write order with VM changes: 24 checkpoints, seed {seed}");
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let lab = Path::new(env!("CARGO_BIN_EXE_lab"));
    let opts = WriteOrderOptions { checkpoints: 24, seed, control: false, fault: None, changes: true };
    let r = run(lab, dir.path(), &opts, |m| println!("{m}")).unwrap_or_else(|e| panic!("seed {seed}: {e:#}"));
    assert_eq!(r.violations, 0, "seed {seed}: {:?}", r.first_violation);
    assert_eq!(r.changes.len(), 4, "{:?}", r.changes);
    assert!(r.size_problems.is_empty(), "seed {seed}: {:?} (sizes {:?})", r.size_problems, r.grown_disk_sizes);
    assert!(r.offered_after_changes > 0, "seed {seed}: no checkpoint offered after the VM moved");
    assert!(r.checked >= 3, "seed {seed}: only {} checkpoints checked", r.checked);
    assert!(r.stray_tap_nodes.iter().all(Vec::is_empty), "seed {seed}: {:?}", r.stray_tap_nodes);
}
