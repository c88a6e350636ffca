//! The domain model shared by every part of the product.
//!
//! This crate owns the vocabulary: identifiers (site, host, VM, disk, VPG,
//! checkpoint, replication stream), checkpoint kinds, retention policies, VPG
//! settings, and the VPG status state machine with the transitions it allows.
//!
//! It must not do I/O, spawn tasks or know about wire or disk formats: the
//! appliance, the site manager and the clients all depend on it, so it stays
//! small, pure and cheap to compile.

pub mod appliance;
pub mod clean_point;
pub mod encryption;
mod ids;
pub mod logs;
pub mod mgmt;
mod network;
mod retention;
mod status;
mod vpg;

pub use ids::{CheckpointId, DiskId, HostId, SiteId, StackId, StreamId, VmId, VpgId};
pub use network::{host_name, StaticIpv4, VmNetwork};
pub use retention::{RetentionPolicy, SparseTier};
pub use status::{IllegalTransition, VpgStatus};
pub use vpg::{
    DiskSpec, InvalidSetting, Priority, ProtectedVm, QuiesceSpec, VpgSettings, APP_CONSISTENT_MIN_SECS,
    CHECKPOINT_INTERVAL_MS, JOURNAL_HISTORY_SECS,
};

use serde::{Deserialize, Serialize};

/// What a guest write did to its range. One vocabulary for the tap, the
/// journal's log, the wire and the send queue; each format has its own
/// byte code for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum WriteKind {
    /// New bytes for the range.
    Data,
    /// WRITE_ZEROES: the range reads as zeros.
    Zero,
    /// TRIM/discard: recorded as such; the range reads as zeros.
    Trim,
    /// The disk grew: from here on in the stream it is `len` bytes (the
    /// offset is 0). Ordered with the writes, so a checkpoint before it
    /// has the old size and one after it the new. Disks never shrink.
    Resize,
}

/// What kind of recovery point a checkpoint is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum CheckpointKind {
    /// Inserted by the site manager on its timer (every few seconds).
    Automatic,
    /// Inserted on an operator's request, with a name ("before patch").
    Named,
    /// Inserted after a quiesce hook ran in the guests.
    ApplicationConsistent,
    /// Taken while a bitmap or delta sync ran: the disks were not a
    /// consistent cut, so it is kept for the record but never offered as a
    /// recovery point.
    Inconsistent,
}

impl CheckpointKind {
    /// Whether an operator may recover to a checkpoint of this kind.
    pub fn is_recoverable(self) -> bool {
        !matches!(self, CheckpointKind::Inconsistent)
    }

    /// Checkpoints kept forever by sparse tiers (until time or space evicts
    /// them) are the ones an operator named or an application quiesced.
    pub fn is_notable(self) -> bool {
        matches!(self, CheckpointKind::Named | CheckpointKind::ApplicationConsistent)
    }
}
