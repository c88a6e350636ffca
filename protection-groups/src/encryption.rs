//! The in-line encryption signal of a VPG (docs/architecture.md, "The
//! encryption signal"): what a source VDSA counts per checkpoint interval,
//! and the detector that tells a sudden rise from the VPG's own baseline.
//!
//! The counted event is an *encrypting rewrite*: a block whose new content
//! looks encrypted (high entropy) overwriting content that did not (text,
//! binaries, databases: anything but zeros and other high-entropy data).
//! Ransomware that encrypts files in place does exactly that, at a high
//! rate; ordinary workloads rarely do: a copy of compressed files (video,
//! zip) mostly fills free or zeroed space, a database dump writes
//! low-entropy text, and on a disk encrypted from the start new encrypted
//! content replaces encrypted content. The detector alerts when the share
//! of written blocks that are encrypting rewrites jumps well above the
//! share the VPG showed before, over a short run of checkpoints with a
//! volume that rules out noise.

use crate::{CheckpointId, DiskId};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;

/// One stream's counts between two checkpoints: the writes sequenced after
/// the previous checkpoint's marker and before `checkpoint`'s.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntropySample {
    pub checkpoint: CheckpointId,
    /// Whole 4 KiB blocks of data writes (zero blocks included).
    pub written_blocks: u64,
    /// Of those, blocks whose content looks encrypted.
    pub encrypted_blocks: u64,
    /// Of those, blocks that overwrote content that did not look encrypted
    /// (and was not zeros): encrypting rewrites.
    pub rewritten_blocks: u64,
    /// Encrypting rewrites per disk (disks with none left out).
    #[serde(default)]
    pub rewritten_by_disk: Vec<(DiskId, u64)>,
}

impl EntropySample {
    /// Adds another stream's counts for the same checkpoint.
    pub fn add(&mut self, other: &EntropySample) {
        self.written_blocks += other.written_blocks;
        self.encrypted_blocks += other.encrypted_blocks;
        self.rewritten_blocks += other.rewritten_blocks;
        for &(disk, n) in &other.rewritten_by_disk {
            match self.rewritten_by_disk.iter_mut().find(|(d, _)| *d == disk) {
                Some((_, m)) => *m += n,
                None => self.rewritten_by_disk.push((disk, n)),
            }
        }
    }
}

/// The detector's thresholds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DetectorSettings {
    /// Checkpoint intervals summed before a decision (a short run, so one
    /// interval's burst of a normal workload does not decide alone).
    pub window: usize,
    /// Encrypting rewrites in the window below which nothing is decided
    /// (1 MiB: a few files).
    pub min_rewritten_blocks: u64,
    /// The window's rewrite share must be at least this...
    pub min_share: f64,
    /// ...and this many times the baseline share, plus `min_share`.
    pub baseline_factor: f64,
    /// Written blocks the baseline averages over (an exponential average
    /// weighted by blocks written: about an hour of a busy VPG).
    pub baseline_blocks: f64,
    /// Checkpoint intervals after the last suspicious one before the alert
    /// clears.
    pub clear_after: u64,
}

impl Default for DetectorSettings {
    fn default() -> Self {
        DetectorSettings {
            window: 3,
            min_rewritten_blocks: 256,
            min_share: 0.2,
            baseline_factor: 4.0,
            baseline_blocks: 4.0e6,
            clear_after: 600,
        }
    }
}

/// An alert: the VPG's encrypting rewrites left their baseline.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EncryptionAlert {
    /// The first checkpoint whose interval holds the rise: the newest clean
    /// point is the one before it.
    pub first_checkpoint: CheckpointId,
    /// The checkpoint whose interval completed the decision.
    pub decided_at: CheckpointId,
    /// The window's share of encrypting rewrites, and the baseline's.
    pub share: f64,
    pub baseline_share: f64,
    pub rewritten_blocks: u64,
    /// The disks with encrypting rewrites, most first.
    pub disks: Vec<DiskId>,
}

/// One VPG's detector: fed each checkpoint interval's counts in order.
#[derive(Debug, Clone)]
pub struct EncryptionDetector {
    settings: DetectorSettings,
    /// Block-weighted averages of written blocks and rewrites, over the
    /// intervals before the window.
    base_written: f64,
    base_rewritten: f64,
    window: VecDeque<EntropySample>,
    /// The last intervals' (checkpoint, written, rewritten), newest last:
    /// where a rise is traced back to its start.
    recent: VecDeque<(CheckpointId, u64, u64)>,
    alert: Option<EncryptionAlert>,
    quiet: u64,
}

/// Intervals a rise is traced back over.
const TRACE_BACK: usize = 64;

impl Default for EncryptionDetector {
    fn default() -> Self {
        EncryptionDetector::new(DetectorSettings::default())
    }
}

impl EncryptionDetector {
    pub fn new(settings: DetectorSettings) -> EncryptionDetector {
        EncryptionDetector {
            settings,
            base_written: 0.0,
            base_rewritten: 0.0,
            window: VecDeque::new(),
            recent: VecDeque::new(),
            alert: None,
            quiet: 0,
        }
    }

    /// The baseline share of encrypting rewrites.
    pub fn baseline_share(&self) -> f64 {
        if self.base_written > 0.0 {
            self.base_rewritten / self.base_written
        } else {
            0.0
        }
    }

    /// The alert raised, while it holds.
    pub fn alert(&self) -> Option<&EncryptionAlert> {
        self.alert.as_ref()
    }

    /// Takes in the next checkpoint interval; returns the alert if this
    /// interval raised it.
    pub fn observe(&mut self, sample: EntropySample) -> Option<&EncryptionAlert> {
        let s = self.settings;
        self.recent.push_back((sample.checkpoint, sample.written_blocks, sample.rewritten_blocks));
        if self.recent.len() > TRACE_BACK {
            self.recent.pop_front();
        }
        self.window.push_back(sample);
        if self.window.len() > s.window.max(1) {
            if let Some(old) = self.window.pop_front() {
                self.learn(&old);
            }
        }
        // The newest interval alone, the newest two, ... the whole window:
        // a sharp rise is seen at once, a slower one over the window.
        let baseline = self.baseline_share();
        let alert_level = s.min_share.max(baseline * s.baseline_factor + s.min_share);
        let (mut written, mut rewritten) = (0u64, 0u64);
        let mut found = None;
        for w in self.window.iter().rev() {
            written += w.written_blocks;
            rewritten += w.rewritten_blocks;
            let share = if written > 0 { rewritten as f64 / written as f64 } else { 0.0 };
            if rewritten >= s.min_rewritten_blocks && share >= alert_level {
                found = Some((share, rewritten));
                break;
            }
        }
        let Some((share, rewritten)) = found else {
            self.quiet += 1;
            if self.quiet >= s.clear_after {
                self.alert = None;
            }
            return None;
        };
        self.quiet = 0;
        if self.alert.is_some() {
            return None;
        }
        // The rise began where the run of intervals whose own share left
        // the baseline began, traced back from now. "Left" is half the
        // alert level, and at least a third of the share that raised the
        // alert: an ordinary workload with a raised share of its own (a
        // copy into deleted files' blocks, 10 %) just before an attack is
        // not the attack's start, while the attack's first, partial
        // interval usually still is.
        let level = ((baseline * s.baseline_factor + s.min_share) / 2.0).max(share / 3.0);
        let left = |&(_, written, rewritten): &(CheckpointId, u64, u64)| {
            written > 0 && rewritten as f64 / written as f64 >= level
        };
        let mut first = self.recent.back().map_or(CheckpointId(0), |r| r.0);
        for r in self.recent.iter().rev().skip_while(|r| !left(r)) {
            if !left(r) {
                break;
            }
            first = r.0;
        }
        let mut disks: Vec<(DiskId, u64)> = Vec::new();
        for w in &self.window {
            for &(d, n) in &w.rewritten_by_disk {
                match disks.iter_mut().find(|(x, _)| *x == d) {
                    Some((_, m)) => *m += n,
                    None => disks.push((d, n)),
                }
            }
        }
        disks.sort_by_key(|(_, n)| std::cmp::Reverse(*n));
        self.alert = Some(EncryptionAlert {
            first_checkpoint: first,
            decided_at: self.window.back().map_or(CheckpointId(0), |w| w.checkpoint),
            share,
            baseline_share: baseline,
            rewritten_blocks: rewritten,
            disks: disks.into_iter().map(|(d, _)| d).collect(),
        });
        self.alert.as_ref()
    }

    /// Folds an interval that left the window into the baseline, unless it
    /// was part of a rise (an attack must not teach the baseline).
    fn learn(&mut self, w: &EntropySample) {
        if self.alert.is_some() && self.quiet == 0 {
            return;
        }
        let n = w.written_blocks as f64;
        let keep = (1.0 - n / self.settings.baseline_blocks).clamp(0.0, 1.0);
        self.base_written = self.base_written * keep + n;
        self.base_rewritten = self.base_rewritten * keep + w.rewritten_blocks as f64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(cp: u64, written: u64, rewritten: u64) -> EntropySample {
        EntropySample {
            checkpoint: CheckpointId(cp),
            written_blocks: written,
            encrypted_blocks: rewritten,
            rewritten_blocks: rewritten,
            rewritten_by_disk: Vec::new(),
        }
    }

    #[test]
    fn a_jump_in_encrypting_rewrites_alerts_at_its_first_checkpoint_and_a_steady_rate_does_not() {
        let mut d = EncryptionDetector::default();
        for cp in 1..=500 {
            assert!(d.observe(sample(cp, 2000, 20)).is_none(), "1 % rewrites is this VPG's normal");
        }
        assert!(d.observe(sample(501, 3000, 1500)).is_some_and(|a| a.first_checkpoint == CheckpointId(501)));
        // A VPG whose normal is many rewrites (a disk encrypted from the
        // start rewrites its encrypted files: not counted; this one has a
        // real high baseline) needs a far bigger jump.
        let mut high = EncryptionDetector::default();
        for cp in 1..=2000 {
            assert!(high.observe(sample(cp, 2000, 300)).is_none());
        }
        assert!(high.observe(sample(2001, 2000, 700)).is_none(), "35 % against a 15 % baseline");
    }

    #[test]
    fn a_copy_with_some_rewrites_just_before_an_attack_is_not_taken_for_its_start() {
        let mut d = EncryptionDetector::default();
        for cp in 1..=500 {
            assert!(d.observe(sample(cp, 50, 0)).is_none());
        }
        // A copy of compressed files reusing deleted text: 15 % rewrites.
        for cp in 501..=510 {
            assert!(d.observe(sample(cp, 300, 45)).is_none());
        }
        // The attack's first interval is partial (40 % of its writes).
        assert!(d.observe(sample(511, 300, 120)).is_none());
        let a = d.observe(sample(512, 800, 800)).cloned();
        assert_eq!(a.map(|a| a.first_checkpoint), Some(CheckpointId(511)));
    }
}
