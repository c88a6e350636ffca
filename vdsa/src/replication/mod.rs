//! Replication between VDSAs (architecture.md §2, §3, §5): the source stream with
//! its send queue and link, and the target server that ingests streams
//! into per-VPG journals.

mod calls;
pub mod queue;
pub mod source;
pub mod target;
pub mod throttle;

use crate::journal::JournalError;
use crate::wire::frame::FrameError;

/// Why a replication link ended, on either side. The link is then redialed
/// (source) or dropped (target); `Refused` carries the reason the peer is,
/// or was, told.
#[derive(Debug, thiserror::Error)]
enum LinkError {
    #[error("{0}")]
    Frame(#[from] FrameError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("journal: {0}")]
    Journal(#[from] JournalError),
    #[error("{0}")]
    Refused(String),
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("a newer link of the same stream took over")]
    Superseded,
}

/// Wall-clock time in ms since the Unix epoch: checkpoints carry their
/// source time in it, and the RPO is measured against it.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or(std::time::Duration::ZERO).as_millis()
        as u64
}
