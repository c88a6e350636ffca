//! What the site manager measures of a VPG and a VPG's day: the API's
//! stats and health report, which the metrics, the sampler and the store
//! share (docs/api.md, "Metrics" and "Health report").

use protection_groups::VpgId;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A VPG's measured state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VpgStats {
    pub vpg: VpgId,
    /// Now minus the time of the newest checkpoint durable at the recovery
    /// site: what a failover now would lose at most. None until a
    /// checkpoint is durable.
    pub rpo_ms: Option<u64>,
    pub newest_durable_checkpoint: Option<u64>,
    /// The VPG's RPO threshold (its alert setting).
    pub rpo_threshold_ms: u64,
    /// Bytes the protected VMs wrote, as the source VDSAs' taps saw them
    /// (since each VDSA started).
    pub written_bytes: u64,
    /// Bytes the source VDSAs sent on the site-to-site link for them.
    pub link_bytes: u64,
    /// Bytes the recovery journals hold (log and packs).
    pub journal_bytes: u64,
    /// Guest writes the source VDSAs passed on (IOPS by their rate).
    #[serde(default)]
    pub write_count: u64,
    /// Blocks offered to the recovery VDSAs, and those they lacked and
    /// were sent: the rest crossed the link as hashes only.
    #[serde(default)]
    pub blocks_offered: u64,
    #[serde(default)]
    pub blocks_sent: u64,
    /// From the oldest checkpoint every recovery journal still holds to
    /// now, at most the policy's history: how far back a failover can go.
    pub history_available_secs: u64,
    /// The VPG's journal history setting.
    pub history_policy_secs: u64,
    /// Failover tests (and failovers) by state.
    pub tests_running: u64,
    pub tests_stopped: u64,
    pub failovers: u64,
    /// When the figures were taken.
    pub at_ms: u64,
}

impl VpgStats {
    /// Nothing measured yet for `vpg` (what a sample is built on in
    /// tests).
    pub fn empty(vpg: VpgId) -> VpgStats {
        VpgStats {
            vpg,
            rpo_ms: None,
            newest_durable_checkpoint: None,
            rpo_threshold_ms: 0,
            written_bytes: 0,
            link_bytes: 0,
            journal_bytes: 0,
            write_count: 0,
            blocks_offered: 0,
            blocks_sent: 0,
            history_available_secs: 0,
            history_policy_secs: 0,
            tests_running: 0,
            tests_stopped: 0,
            failovers: 0,
            at_ms: 0,
        }
    }
}

/// One VPG's day.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct HealthDay {
    pub vpg: VpgId,
    /// `YYYY-MM-DD`, UTC.
    pub day: String,
    /// Bytes the VMs wrote, as the taps saw them.
    pub written_bytes: u64,
    /// Bytes sent for them on the site-to-site link.
    pub link_bytes: u64,
    pub max_rpo_ms: u64,
    /// Seconds during which the RPO was over the VPG's threshold.
    pub over_threshold_secs: u64,
    /// Seconds sampled (a day has 86,400).
    pub sampled_secs: u64,
    /// Consistent checkpoints taken that day.
    pub consistent_points: u64,
    /// The history the recovery journals held at the day's last sample
    /// (up to the policy): from the oldest checkpoint they all still hold.
    pub history_available_secs: u64,
    pub history_policy_secs: u64,
    /// The taps' and the link's counters at the last sample: the next
    /// sample's deltas are taken from them.
    #[serde(default)]
    pub last_written_counter: Option<u64>,
    #[serde(default)]
    pub last_link_counter: Option<u64>,
}
