//! Errors of the recovery stacks, grouped by what the caller does: an
//! input out of range is the client's; a full volume pauses writes; a
//! corrupt overlay map or an I/O failure is the operator's.

use std::io;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("no space left on the device holding {path} while {action}")]
    DiskFull { action: &'static str, path: PathBuf },
    #[error("{path} is corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("{offset}+{len} is beyond the end of the disk ({size} bytes)")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error(transparent)]
    Journal(#[from] crate::journal::JournalError),
    #[error("{0}")]
    Failed(String),
}

impl Error {
    pub fn io(action: &'static str, path: &Path, source: io::Error) -> Error {
        if source.raw_os_error() == Some(libc::ENOSPC) || source.raw_os_error() == Some(libc::EDQUOT) {
            return Error::DiskFull { action, path: path.to_path_buf() };
        }
        Error::Io { action, path: path.to_path_buf(), source }
    }
}

pub type Result<T> = std::result::Result<T, Error>;
