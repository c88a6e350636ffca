//! Each protected VPG's encryption detector (docs/architecture.md, "The
//! encryption signal"): the source VDSAs report their counts per
//! checkpoint interval; once every source stream of the VPG has reported
//! an interval, its sum goes to the VPG's detector, in checkpoint order.
//! The alert it raises is evaluated with the others (`crate::alerts`).
//!
//! Detectors live in memory: after a restart each VPG learns its baseline
//! again from the intervals its VDSAs still report.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use protection_groups::encryption::{EncryptionAlert, EncryptionDetector, EntropySample};
use protection_groups::mgmt::{RoleKind, RoleState};
use protection_groups::{CheckpointId, StreamId, VpgId};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// What the API shows of a VPG's signal.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct EncryptionSignal {
    /// The alert, while it holds.
    pub alert: Option<EncryptionAlert>,
    /// The share of written blocks that were encrypting rewrites, on
    /// average before now: the VPG's own baseline.
    pub baseline_share: f64,
    /// The newest checkpoint interval taken in.
    pub newest_checkpoint: Option<CheckpointId>,
    /// Its share of encrypting rewrites, and of encrypted-looking blocks.
    pub newest_rewritten_share: f64,
    pub newest_encrypted_share: f64,
}

#[derive(Debug, Default)]
struct VpgWatch {
    detector: EncryptionDetector,
    /// The newest checkpoint fed to the detector.
    fed: Option<CheckpointId>,
    newest: Option<EntropySample>,
    /// When the alert was raised (ms), while it holds.
    raised_ms: Option<u64>,
}

/// The detectors of the protected VPGs.
#[derive(Debug, Default)]
pub struct EncryptionWatch {
    vpgs: Mutex<HashMap<VpgId, VpgWatch>>,
}

impl EncryptionWatch {
    /// Takes in what `vpg`'s source roles report now.
    pub fn update(&self, vpg: VpgId, roles: &[&RoleState]) {
        let sources: Vec<(StreamId, &[EntropySample])> = roles
            .iter()
            .filter(|r| r.kind == RoleKind::Source)
            .filter_map(|r| Some((r.stream?, r.entropy.as_slice())))
            .collect();
        if sources.is_empty() {
            return;
        }
        let Ok(mut vpgs) = self.vpgs.lock() else { return };
        let w = vpgs.entry(vpg).or_default();
        // Complete: every stream has reported that interval or a later one
        // (a stream that wrote nothing between two checkpoints still
        // reports the interval, empty).
        let complete_to = sources.iter().map(|(_, s)| s.last().map_or(CheckpointId(0), |x| x.checkpoint)).min();
        let Some(complete_to) = complete_to else { return };
        let mut sums: BTreeMap<CheckpointId, EntropySample> = BTreeMap::new();
        for (_, samples) in &sources {
            for s in samples.iter().filter(|s| s.checkpoint <= complete_to && w.fed.is_none_or(|f| s.checkpoint > f)) {
                match sums.get_mut(&s.checkpoint) {
                    Some(sum) => sum.add(s),
                    None => {
                        sums.insert(s.checkpoint, s.clone());
                    }
                }
            }
        }
        for (cp, sample) in sums {
            w.fed = Some(cp);
            w.newest = Some(sample.clone());
            if w.detector.observe(sample).is_some() {
                w.raised_ms = Some(crate::model::now_ms());
                tracing::warn!(%vpg, checkpoint = %cp, "writes that look encrypted are overwriting the VPG's data");
            }
        }
        if w.detector.alert().is_none() {
            w.raised_ms = None;
        }
    }

    /// The VPG's alert and when it was raised, while it holds.
    pub fn alert(&self, vpg: VpgId) -> Option<(EncryptionAlert, u64)> {
        let vpgs = self.vpgs.lock().ok()?;
        let w = vpgs.get(&vpg)?;
        Some((w.detector.alert()?.clone(), w.raised_ms?))
    }

    /// What the API shows for `vpg`.
    pub fn signal(&self, vpg: VpgId) -> Option<EncryptionSignal> {
        let vpgs = self.vpgs.lock().ok()?;
        let w = vpgs.get(&vpg)?;
        let share = |n: u64, of: u64| if of > 0 { n as f64 / of as f64 } else { 0.0 };
        let newest = w.newest.as_ref();
        Some(EncryptionSignal {
            alert: w.detector.alert().cloned(),
            baseline_share: w.detector.baseline_share(),
            newest_checkpoint: newest.map(|s| s.checkpoint),
            newest_rewritten_share: newest.map_or(0.0, |s| share(s.rewritten_blocks, s.written_blocks)),
            newest_encrypted_share: newest.map_or(0.0, |s| share(s.encrypted_blocks, s.written_blocks)),
        })
    }
}
