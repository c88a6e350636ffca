//! Power cuts of a VDSA in a real guest: it starts after every one, and
//! keeps every write it acknowledged with FLUSH or FUA
//! (`integration::power_loss`). The suite runs a short seeded version;
//! `lab power-loss --long` runs at least 100 cuts.

use integration::power_loss;
use integration::vsphere_lab::workspace_binary;

#[test]
fn a_vdsa_in_a_guest_starts_after_every_power_cut_and_keeps_what_it_acknowledged() {
    let seed = std::env::var("POWER_LOSS_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_secs())
    });
    println!("power-loss seed {seed} (POWER_LOSS_SEED={seed} repeats this run)");
    let vdsa = workspace_binary("vdsa", "vdsa").unwrap_or_else(|e| panic!("{e:#}"));
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let report = power_loss::run(dir.path(), 10, seed, &vdsa).unwrap_or_else(|e| panic!("seed {seed}: {e:#}"));
    println!("{report:?}");
    assert!(report.writes_acknowledged > 0, "{report:?}");
    assert!(report.fua_writes > 0 && report.flushes > 0, "{report:?}");
    assert!(report.blocks_verified > 0, "{report:?}");
}
