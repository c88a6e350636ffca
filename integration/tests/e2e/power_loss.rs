//! Power cuts of a VDSA in a real guest: it starts after every one, and
//! keeps every write it acknowledged with FLUSH or FUA
//! (`integration::power_loss`). The suite runs a short seeded version;
//! `lab power-loss --long` runs at least 100 cuts.

use integration::power_loss::{self, PowerLossOptions};
use integration::vsphere_lab::workspace_binary;

#[test]
fn a_vdsa_in_a_guest_starts_after_every_power_cut_and_keeps_what_it_acknowledged() {
    let _turn = crate::take_turns();
    let seed = std::env::var("POWER_LOSS_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_secs())
    });
    println!("power-loss seed {seed} (POWER_LOSS_SEED={seed} repeats this run)");
    let vdsa = workspace_binary("vdsa", "vdsa").unwrap_or_else(|e| panic!("{e:#}"));
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let opts = PowerLossOptions { cuts: 10, seed, control: false };
    let report = power_loss::run(dir.path(), opts, &vdsa).unwrap_or_else(|e| panic!("seed {seed}: {e:#}"));
    println!("{report:?}");
    assert!(report.writes_acknowledged > 0, "{report:?}");
    assert!(report.fua_writes > 0 && report.flushes > 0, "{report:?}");
    assert!(report.blocks_verified > 0, "{report:?}");
}

/// The control run: with FLUSH and FUA acknowledged but not made durable,
/// the same checker must find acknowledged writes missing after a cut.
#[test]
fn the_power_loss_checker_catches_a_vdsa_that_acknowledges_without_durability() {
    let _turn = crate::take_turns();
    let seed = 7;
    let vdsa = workspace_binary("vdsa", "vdsa").unwrap_or_else(|e| panic!("{e:#}"));
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let opts = PowerLossOptions { cuts: 3, seed, control: true };
    match power_loss::run(dir.path(), opts, &vdsa) {
        Ok(r) => panic!("the control run went unnoticed: {r:?}"),
        Err(e) => {
            let e = format!("{e:#}");
            println!("control run caught: {e}");
            assert!(e.contains("no prefix of the writes"), "the control run failed for another reason: {e}");
        }
    }
}
