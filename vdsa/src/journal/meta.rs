//! The journal's small metadata file, `journal.json`: its disks, the
//! replica's checkpoint (base), a retention step or promotion in flight,
//! and the chunk store it names; format versions and their upgrade
//! (docs/journal-format.md, "journal.json").

use super::error::{JournalError, Result};
use super::fsutil;
use super::model::{Checkpoint, DiskInfo};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub(super) const META_FILE: &str = "journal.json";
/// 2: chunk packs may have indexes (docs/journal-format.md). A format 1
/// journal is upgraded in place when it opens; a build that reads only 1
/// refuses a format 2 journal, so it never deletes a pack and leaves its
/// index behind.
pub(super) const META_FORMAT: u32 = 2;
const META_FORMAT_BEFORE_PACK_INDEXES: u32 = 1;
/// 3: the chunks are in a shared chunk store that `chunk_store` names; a
/// build that reads only 2 would find none of them, so it refuses.
pub(super) const META_FORMAT_SHARED_CHUNKS: u32 = 3;

/// The small metadata file, replaced atomically: the disks, the replica's
/// checkpoint (base), a retention step in flight (intent) and a promotion
/// in flight (promote; absent in journals written before promotion
/// existed, which read it as none).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Meta {
    pub(super) format: u32,
    pub(super) disks: Vec<DiskInfo>,
    pub(super) base: Option<Checkpoint>,
    pub(super) intent: Option<Checkpoint>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) promote: Option<Checkpoint>,
    /// Format 3: the shared chunk store's folder, relative to the journal's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) chunk_store: Option<PathBuf>,
}

/// Whether the journal in `dir` keeps its chunks in the shared store at
/// `root` (canonical). No journal there: false.
pub(super) fn names_store(dir: &Path, root: &Path) -> Result<bool> {
    let Some(meta) = read_meta(dir)? else { return Ok(false) };
    Ok(meta.chunk_store.is_some_and(|rel| dir.join(rel).canonicalize().is_ok_and(|p| p == root)))
}

/// The metadata of the journal in `dir`, upgraded from format 1; None if
/// there is none yet.
pub(super) fn read_meta(dir: &Path) -> Result<Option<Meta>> {
    let path = dir.join(META_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => {
            let mut meta: Meta = serde_json::from_slice(&bytes)
                .map_err(|e| JournalError::corrupt(&path, e.column() as u64, format!("journal metadata: {e}")))?;
            if meta.format == META_FORMAT_BEFORE_PACK_INDEXES {
                // Nothing else changed: the upgrade is the version number.
                // Best effort, so that a journal on a full disk still opens;
                // its packs are then indexed on a later open.
                meta.format = META_FORMAT;
                match write_meta_file(dir, &meta) {
                    Ok(()) => {
                        tracing::info!(path = %path.display(), "journal upgraded to format {META_FORMAT} (pack indexes)")
                    }
                    Err(e) => tracing::warn!(path = %path.display(), "journal left at format 1 for now: {e}"),
                }
            }
            if meta.format > META_FORMAT_SHARED_CHUNKS {
                return Err(JournalError::UnsupportedVersion {
                    path,
                    found: meta.format,
                    supported: META_FORMAT_SHARED_CHUNKS,
                });
            }
            Ok(Some(meta))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(JournalError::io("reading", &path, e)),
    }
}

/// Replaces the metadata file atomically (write-temp, fsync, rename,
/// fsync-directory).
pub(super) fn write_meta_file(dir: &Path, meta: &Meta) -> Result<()> {
    let bytes =
        serde_json::to_vec_pretty(meta).map_err(|e| JournalError::Failed(format!("encoding journal metadata: {e}")))?;
    fsutil::write_atomic(&dir.join(META_FILE), &bytes)
}
