//! The replicas: one sparse image per disk holding it at the base (the
//! oldest retained checkpoint), with the disk's index of later versions
//! and its logged resizes (docs/journal-format.md, "journal.json" and
//! "Write and fsync order").

use super::error::{JournalError, Result};
use super::fsutil;
use super::index::{CutSet, DiskIndex};
use super::model::DiskInfo;
use protection_groups::DiskId;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

#[derive(Debug)]
pub(super) struct DiskState {
    /// The disk at the base (the replica's checkpoint): its size then.
    pub(super) info: DiskInfo,
    pub(super) index: DiskIndex,
    /// Resizes logged after the base, oldest first (docs/journal-format.md:
    /// a disk only grows, and its replica file is at least the newest size).
    pub(super) resizes: Vec<SizeChange>,
    pub(super) replica: File,
    pub(super) replica_path: PathBuf,
}

/// A logged resize: from `lsn` of interned `stream` on, the disk is `size`.
#[derive(Debug, Clone, Copy)]
pub(super) struct SizeChange {
    pub(super) lsn: u64,
    pub(super) stream: u16,
    pub(super) size: u64,
}

impl DiskState {
    /// The size a reader at `cuts` sees.
    pub(super) fn size_at(&self, cuts: &CutSet) -> u64 {
        self.resizes.iter().rev().find(|r| cuts.visible(r.lsn, r.stream)).map_or(self.info.size, |r| r.size)
    }

    /// The size after the newest logged write.
    pub(super) fn head_size(&self) -> u64 {
        self.resizes.last().map_or(self.info.size, |r| r.size)
    }

    /// Makes the replica file at least `size` bytes (the grown part reads
    /// as zeros). Not synced: after a crash, open grows it again from the
    /// log.
    pub(super) fn grow_replica(&self, size: u64) -> Result<()> {
        let len = self.replica.metadata().map_err(|e| JournalError::io("reading", &self.replica_path, e))?.len();
        if len < size {
            self.replica.set_len(size).map_err(|e| JournalError::io("growing replica", &self.replica_path, e))?;
        }
        Ok(())
    }
}

pub(super) fn replica_path(dir: &Path, id: DiskId) -> PathBuf {
    dir.join("replica").join(format!("{}.img", id.0))
}

pub(super) fn open_replica(dir: &Path, info: DiskInfo, create: bool) -> Result<DiskState> {
    let path = replica_path(dir, info.id);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(create)
        .truncate(false)
        .open(&path)
        .map_err(|e| JournalError::io("opening replica", &path, e))?;
    let len = file.metadata().map_err(|e| JournalError::io("reading", &path, e))?.len();
    if create {
        // Zeros, whatever an interrupted earlier add left there.
        file.set_len(0)
            .and_then(|_| file.set_len(info.size))
            .map_err(|e| JournalError::io("sizing replica", &path, e))?;
        file.sync_all().map_err(|e| JournalError::io("syncing", &path, e))?;
        if let Some(parent) = path.parent() {
            fsutil::sync_dir(parent)?;
        }
    } else if len < info.size {
        // Longer is fine: a resize grew the file before its record was
        // durable, or one after the base did.
        return Err(JournalError::corrupt(&path, len, format!("replica is {len} bytes, the disk {}", info.size)));
    }
    Ok(DiskState { info, index: DiskIndex::default(), resizes: Vec::new(), replica: file, replica_path: path })
}

pub(super) fn read_replica(disk: &DiskState, offset: u64, out: &mut [u8]) -> Result<()> {
    disk.replica.read_exact_at(out, offset).map_err(|e| JournalError::io("reading replica", &disk.replica_path, e))
}
