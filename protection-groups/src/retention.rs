//! Retention policy: how much history a VPG's journal keeps.
//!
//! The policy only decides; the journal does the work (applies aged-out
//! writes to the replica, frees what nobody needs).

use crate::{CheckpointId, CheckpointKind};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Duration;

/// From `after` (age of a checkpoint) on, keep one checkpoint per `every`
/// (the newest of each interval), or with `every: None` only the named and
/// application-consistent ones. A tier runs until the next tier's `after`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SparseTier {
    pub after: Duration,
    pub every: Option<Duration>,
}

/// Journal history: by time, by space, or whichever limit comes first, with
/// optional sparse tiers that thin older checkpoints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RetentionPolicy {
    /// Keep `history` of checkpoints.
    Time { history: Duration },
    /// Keep as much as fits in `max_bytes` of journal (log + chunk packs).
    Space { max_bytes: u64 },
    /// Whichever of the two evicts first.
    TimeAndSpace { history: Duration, max_bytes: u64 },
    /// A base policy plus sparse tiers, ordered by `after`.
    Tiered { base: Box<RetentionPolicy>, tiers: Vec<SparseTier> },
}

impl RetentionPolicy {
    /// How long checkpoints are kept, if time limits this policy.
    pub fn history(&self) -> Option<Duration> {
        match self {
            RetentionPolicy::Time { history } | RetentionPolicy::TimeAndSpace { history, .. } => Some(*history),
            RetentionPolicy::Space { .. } => None,
            RetentionPolicy::Tiered { base, .. } => base.history(),
        }
    }

    /// The journal size limit, if space limits this policy.
    pub fn max_bytes(&self) -> Option<u64> {
        match self {
            RetentionPolicy::Space { max_bytes } | RetentionPolicy::TimeAndSpace { max_bytes, .. } => Some(*max_bytes),
            RetentionPolicy::Time { .. } => None,
            RetentionPolicy::Tiered { base, .. } => base.max_bytes(),
        }
    }

    pub fn tiers(&self) -> &[SparseTier] {
        match self {
            RetentionPolicy::Tiered { tiers, .. } => tiers,
            _ => &[],
        }
    }

    /// The checkpoints that sparse tiers drop, given every retained
    /// checkpoint as (id, source time in ms since the epoch, kind) and the
    /// time now. The newest checkpoint is never dropped.
    pub fn thinned(&self, now_ms: u64, checkpoints: &[(CheckpointId, u64, CheckpointKind)]) -> Vec<CheckpointId> {
        let mut tiers = self.tiers().to_vec();
        if tiers.is_empty() {
            return Vec::new();
        }
        tiers.sort_by_key(|t| t.after);
        let newest = checkpoints.iter().map(|c| c.0).max();
        // Per (tier index, interval number): the newest checkpoint in it.
        let mut keepers: BTreeMap<(usize, u64), CheckpointId> = BTreeMap::new();
        let mut candidates = Vec::new();
        for &(id, time, kind) in checkpoints {
            let age = Duration::from_millis(now_ms.saturating_sub(time));
            let Some(tier_ix) = tiers.iter().rposition(|t| age >= t.after) else {
                continue; // younger than every tier: kept
            };
            if Some(id) == newest || kind.is_notable() {
                continue;
            }
            match tiers[tier_ix].every {
                None => candidates.push((id, None)),
                Some(every) => {
                    let every_ms = u64::try_from(every.as_millis()).unwrap_or(u64::MAX).max(1);
                    let bucket = (tier_ix, time / every_ms);
                    let slot = keepers.entry(bucket).or_insert(id);
                    if id > *slot {
                        *slot = id;
                    }
                    candidates.push((id, Some(bucket)));
                }
            }
        }
        candidates
            .into_iter()
            .filter(|(id, bucket)| match bucket {
                None => true,
                Some(b) => keepers.get(b) != Some(id),
            })
            .map(|(id, _)| id)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: u64 = 3_600_000;

    #[test]
    fn limits_are_read_through_tiers() {
        let p = RetentionPolicy::Tiered {
            base: Box::new(RetentionPolicy::TimeAndSpace { history: Duration::from_secs(48 * 3600), max_bytes: 10 }),
            tiers: vec![],
        };
        assert_eq!(p.history(), Some(Duration::from_secs(48 * 3600)));
        assert_eq!(p.max_bytes(), Some(10));
        assert_eq!(RetentionPolicy::Space { max_bytes: 5 }.history(), None);
    }

    #[test]
    fn sparse_tiers_keep_one_per_interval_and_notable_ones() {
        let policy = RetentionPolicy::Tiered {
            base: Box::new(RetentionPolicy::Time { history: Duration::from_secs(72 * 3600) }),
            tiers: vec![
                SparseTier { after: Duration::from_secs(24 * 3600), every: Some(Duration::from_secs(4 * 3600)) },
                SparseTier { after: Duration::from_secs(48 * 3600), every: None },
            ],
        };
        let now = 100 * H;
        // One checkpoint per hour from 70 h ago to now.
        let cps: Vec<_> = (0..=70u64)
            .map(|i| {
                let kind = if i == 10 { CheckpointKind::Named } else { CheckpointKind::Automatic };
                (CheckpointId(i), now - (70 - i) * H, kind)
            })
            .collect();
        let dropped = policy.thinned(now, &cps);
        let kept: Vec<u64> = cps.iter().map(|c| c.0 .0).filter(|i| !dropped.contains(&CheckpointId(*i))).collect();
        // Younger than 24 h: all 25 kept (ages 0..=24 h has age 24 in tier 1).
        for i in 47..=70 {
            assert!(kept.contains(&i), "young checkpoint {i} kept");
        }
        // Older than 48 h: only the named one.
        assert!(kept.contains(&10));
        for i in 0..=22 {
            if i != 10 {
                assert!(!kept.contains(&i), "old checkpoint {i} dropped");
            }
        }
        // 24..48 h: one per 4 h bucket.
        let mid: Vec<u64> = kept.iter().copied().filter(|i| (23..=46).contains(i)).collect();
        assert!(mid.len() >= 6 && mid.len() <= 7, "one per 4 h: {mid:?}");
    }
}
