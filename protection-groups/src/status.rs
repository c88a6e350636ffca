//! The VPG status state machine (architecture.md §7).

use serde::{Deserialize, Serialize};
use std::fmt;

/// Where a VPG is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum VpgStatus {
    /// Created; initial sync running.
    Initializing,
    /// Replicating; checkpoints are being inserted.
    Protecting,
    /// One or more failover tests are running; replication goes on.
    Test,
    /// Failed over; recovered VMs run from processing stacks, not committed.
    Failover,
    /// Failover committed; the journal is being promoted into the replica.
    Promoting,
    /// Committed and promoted, reverse protection not configured yet.
    NeedReverseConfiguration,
    /// Promoting, and reverse protection not configured yet.
    PromotingAndNeedReverseConfiguration,
    /// Promotion done; reverse replication not yet running.
    PromotionCompleteMirrorsNotYetActivated,
    /// A VM or disk of the VPG lost part of its configuration.
    MissingConfiguration,
    /// Promoting while configuration is missing.
    PromotingAndMissingConfiguration,
    /// Being removed.
    RemoveInProgress,
    /// Replication stopped on an error an operator must look at.
    Error,
}

/// A transition the state machine does not allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a VPG cannot go from {from} to {to}")]
pub struct IllegalTransition {
    pub from: VpgStatus,
    pub to: VpgStatus,
}

impl fmt::Display for VpgStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

impl VpgStatus {
    /// Every status, for tables and exhaustive tests.
    pub const ALL: [VpgStatus; 12] = [
        VpgStatus::Initializing,
        VpgStatus::Protecting,
        VpgStatus::Test,
        VpgStatus::Failover,
        VpgStatus::Promoting,
        VpgStatus::NeedReverseConfiguration,
        VpgStatus::PromotingAndNeedReverseConfiguration,
        VpgStatus::PromotionCompleteMirrorsNotYetActivated,
        VpgStatus::MissingConfiguration,
        VpgStatus::PromotingAndMissingConfiguration,
        VpgStatus::RemoveInProgress,
        VpgStatus::Error,
    ];

    /// Whether the machine allows going from `self` to `to`.
    pub fn allows(self, to: VpgStatus) -> bool {
        use VpgStatus::*;
        if self == to {
            return false;
        }
        // Any live VPG may be removed or hit an error; a removal is final.
        match (self, to) {
            (RemoveInProgress, _) => return false,
            (_, RemoveInProgress) | (_, Error) => return true,
            _ => {}
        }
        matches!(
            (self, to),
            (Initializing, Protecting)
                | (Protecting, Initializing) // a resync after a source restart
                | (Protecting, Test)
                | (Test, Protecting)
                | (Protecting, Failover)
                | (Test, Failover)
                | (Failover, Protecting) // roll back
                | (Failover, Promoting)
                | (Failover, PromotingAndNeedReverseConfiguration)
                | (Failover, PromotingAndMissingConfiguration)
                | (Promoting, PromotionCompleteMirrorsNotYetActivated)
                | (Promoting, PromotingAndMissingConfiguration)
                | (PromotingAndNeedReverseConfiguration, NeedReverseConfiguration)
                | (PromotingAndNeedReverseConfiguration, Promoting)
                | (PromotingAndMissingConfiguration, Promoting)
                | (PromotingAndMissingConfiguration, MissingConfiguration)
                | (NeedReverseConfiguration, PromotionCompleteMirrorsNotYetActivated)
                | (NeedReverseConfiguration, Initializing)
                | (PromotionCompleteMirrorsNotYetActivated, Initializing)
                | (PromotionCompleteMirrorsNotYetActivated, Protecting)
                | (Protecting, MissingConfiguration)
                | (Test, MissingConfiguration)
                | (MissingConfiguration, Protecting)
                | (MissingConfiguration, Initializing)
                | (Error, Initializing)
                | (Error, Protecting)
        )
    }

    /// The new status, or an error naming both states.
    pub fn transition(self, to: VpgStatus) -> Result<VpgStatus, IllegalTransition> {
        if self.allows(to) {
            Ok(to)
        } else {
            Err(IllegalTransition { from: self, to })
        }
    }

    /// Whether the VPG runs at its recovery site (failed over, committed or
    /// not): its sources stop, its target roles accept no stream and serve
    /// the failover's stack.
    pub fn is_failed_over(self) -> bool {
        use VpgStatus::*;
        matches!(
            self,
            Failover
                | Promoting
                | PromotingAndNeedReverseConfiguration
                | PromotingAndMissingConfiguration
                | NeedReverseConfiguration
                | PromotionCompleteMirrorsNotYetActivated
        )
    }

    /// Whether an operator may start a failover or failover test now.
    pub fn can_recover(self) -> bool {
        matches!(self, VpgStatus::Protecting | VpgStatus::Test)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_protect_test_failover_promote_cycle_is_allowed() {
        let path = [
            VpgStatus::Initializing,
            VpgStatus::Protecting,
            VpgStatus::Test,
            VpgStatus::Protecting,
            VpgStatus::Failover,
            VpgStatus::PromotingAndNeedReverseConfiguration,
            VpgStatus::NeedReverseConfiguration,
            VpgStatus::PromotionCompleteMirrorsNotYetActivated,
            VpgStatus::Protecting,
        ];
        let mut s = path[0];
        for &next in &path[1..] {
            s = match s.transition(next) {
                Ok(n) => n,
                Err(e) => panic!("{e}"),
            };
        }
        assert_eq!(s, VpgStatus::Protecting);
    }

    #[test]
    fn illegal_transitions_name_both_states() {
        let err = VpgStatus::Initializing.transition(VpgStatus::Failover);
        let Err(e) = err else { panic!("must be refused") };
        assert_eq!(e.to_string(), "a VPG cannot go from Initializing to Failover");
        assert!(VpgStatus::RemoveInProgress.transition(VpgStatus::Protecting).is_err());
        assert!(VpgStatus::Protecting.transition(VpgStatus::Protecting).is_err());
    }

    #[test]
    fn every_state_but_removal_can_be_removed_and_removal_is_final() {
        for s in VpgStatus::ALL {
            if s != VpgStatus::RemoveInProgress {
                assert!(s.allows(VpgStatus::RemoveInProgress), "{s}");
            }
            assert!(!VpgStatus::RemoveInProgress.allows(s));
        }
    }
}
