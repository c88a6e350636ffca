//! Alerts as the API shows them and the webhook receives them, and their
//! settings (docs/api.md, "Alerts").

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Alert settings (`PUT /site/alerts`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AlertSettings {
    /// Where raised and cleared alerts are posted (JSON); empty: nowhere.
    #[serde(default)]
    pub webhook_url: String,
    /// A failover test running longer than this raises an alert.
    #[serde(default = "default_test_limit")]
    pub test_running_limit_secs: u64,
    /// A recovery VDSA whose journal volume has less free space than this
    /// raises an alert (before its journals fill and pause their VPGs).
    #[serde(default = "default_journal_volume_free")]
    pub journal_volume_free_min_bytes: u64,
}

fn default_test_limit() -> u64 {
    4 * 3600
}

fn default_journal_volume_free() -> u64 {
    2 << 30
}

impl Default for AlertSettings {
    fn default() -> Self {
        AlertSettings {
            webhook_url: String::new(),
            test_running_limit_secs: default_test_limit(),
            journal_volume_free_min_bytes: default_journal_volume_free(),
        }
    }
}

/// What an alert is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AlertKind {
    RpoOverThreshold,
    VdsaDown,
    SiteLinkDown,
    TestRunningLong,
    JournalFull,
    HistoryBelowPolicy,
    JournalVolumeLow,
    /// Writes that look encrypted overwrite a VPG's data at a rate far
    /// above its own baseline: ransomware at work, most likely.
    EncryptionSuspected,
}

/// One alert, raised while its condition holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Alert {
    pub kind: AlertKind,
    /// What it is about: a VPG, host, test id, or the paired site.
    pub subject: String,
    /// The subject's name, for people.
    pub subject_name: String,
    pub message: String,
    pub raised_ms: u64,
    /// Set when the condition ended.
    pub cleared_ms: Option<u64>,
}

/// What the webhook receives.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AlertEvent {
    /// `raised` or `cleared`.
    pub event: String,
    pub site: String,
    pub alert: Alert,
}
