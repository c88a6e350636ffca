//! Errors of the journal engine. Callers branch on the kind: a corrupt file
//! needs an operator, a sequence gap needs a resync, a full disk needs space.

use protection_groups::{CheckpointId, DiskId, StreamId};
use std::io;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("no space left on the device holding {path} while {action}")]
    DiskFull { action: &'static str, path: PathBuf },
    #[error("{path} is corrupt at offset {offset}: {reason}")]
    Corrupt { path: PathBuf, offset: u64, reason: String },
    #[error("{path} has format version {found}; this build reads versions up to {supported}")]
    UnsupportedVersion { path: PathBuf, found: u32, supported: u32 },
    #[error("the write record at {path} offset {offset} (before a durable commit) references chunk {hash}, which no pack holds: a pack file was lost or truncated")]
    MissingChunk { path: PathBuf, offset: u64, hash: String },
    #[error("{0} is not a disk of this journal")]
    UnknownDisk(DiskId),
    #[error("{0} is already a disk of this journal")]
    DiskExists(DiskId),
    #[error("write of {len} bytes at offset {offset} is beyond the end of {disk} ({size} bytes)")]
    OutOfRange { disk: DiskId, offset: u64, len: u64, size: u64 },
    #[error("invalid write: {0}")]
    InvalidWrite(String),
    #[error("{stream}: write seq {got} arrived but {expected} is next; a gap is never skipped")]
    SeqGap { stream: StreamId, expected: u64, got: u64 },
    #[error("{0} is not a retained checkpoint of this journal")]
    UnknownCheckpoint(CheckpointId),
    #[error("checkpoint refused: {0}")]
    InvalidCheckpoint(String),
    #[error("checkpoint {id} is not newer than the newest checkpoint {newest}")]
    CheckpointNotNewer { id: CheckpointId, newest: CheckpointId },
    #[error("checkpoint cut for {stream} at lsn {lsn} is beyond the journal head {head}")]
    BadCut { stream: StreamId, lsn: u64, head: u64 },
    #[error("checkpoint cut for {stream} at lsn {lsn} is before the previous checkpoint's cut {previous}")]
    CutGoesBack { stream: StreamId, lsn: u64, previous: u64 },
    #[error("block {block} of {disk} arrived as hash {hash} only, and the journal holds no such content")]
    BlockNotHeld { disk: DiskId, block: u64, hash: String },
    #[error("cannot promote to checkpoint {promote} while a view at checkpoint {open} is open: stop the failover tests first")]
    ViewsOpen { promote: CheckpointId, open: CheckpointId },
    #[error("the journal at {0} is open in another process")]
    Locked(PathBuf),
    #[error("the journal failed earlier ({0}) and accepts no more writes; reopen it")]
    Failed(String),
}

impl JournalError {
    /// Wraps an I/O error with what was being done and to which file; a full
    /// disk gets its own kind so that callers can report it as such.
    pub(crate) fn io(action: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        let path = path.into();
        if source.raw_os_error() == Some(libc::ENOSPC) {
            JournalError::DiskFull { action, path }
        } else {
            JournalError::Io { action, path, source }
        }
    }

    pub(crate) fn corrupt(path: impl Into<PathBuf>, offset: u64, reason: impl Into<String>) -> Self {
        JournalError::Corrupt { path: path.into(), offset, reason: reason.into() }
    }
}

pub type Result<T, E = JournalError> = std::result::Result<T, E>;
