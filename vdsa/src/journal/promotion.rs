//! Promotion: a committed failover makes the replica the image at the
//! failover's checkpoint and drops everything the journal held after it
//! (docs/journal-format.md, "Promotion").
//!
//! Crash-safe by redo, like a retention step: the checkpoint is written to
//! the metadata as the promotion in flight first; the replica is advanced
//! to it (itself redone from its intent); then the log and the packs are
//! deleted and the in-flight mark cleared. A journal reopened with the
//! mark set whose base already is the checkpoint deletes the log and packs
//! before reading them, so a half-deleted history is never replayed.

use super::error::Result;
use super::log::Log;
use super::{fsutil, Journal, JournalError, State};
use protection_groups::CheckpointId;
use std::collections::BTreeMap;
use std::path::Path;

impl Journal {
    /// Promotes the journal up to checkpoint `id` into the replica and
    /// discards every write and checkpoint after it: afterwards the
    /// replica files are the disks at `id` and the journal is empty, based
    /// there. Returns the blocks written to the replica. Refused while a
    /// view at another checkpoint is open (what it reads would change).
    pub fn promote_to(&self, id: CheckpointId) -> Result<u64> {
        let dir = self.inner.dir.clone();
        let (segment_bytes, pack_bytes) = (self.inner.config.segment_bytes, self.inner.config.pack_bytes);
        self.mutate(|st| {
            let Some(target) = st.checkpoints.get(&id).cloned() else {
                return Err(JournalError::UnknownCheckpoint(id));
            };
            if let Some(other) = st.views.values().find(|v| v.checkpoint.id != id) {
                return Err(JournalError::ViewsOpen { promote: id, open: other.checkpoint.id });
            }
            st.sync()?;
            st.meta.promote = Some(target.clone());
            st.write_meta(&dir)?;
            let blocks = if st.base_id() < Some(id) { st.advance_base(&dir, &target)?.0 } else { 0 };
            st.discard_after_base(&dir, segment_bytes, pack_bytes)?;
            Ok(blocks)
        })
    }

    /// The checkpoint the journal was last promoted to, if its base is one
    /// (the replica is then the recovered disks, see [`Journal::promote_to`]).
    pub fn base(&self) -> Result<Option<CheckpointId>> {
        Ok(self.read_state()?.base_id())
    }
}

impl State {
    /// Drops the log, the packs and every version and checkpoint after the
    /// base, in memory and on disk, then clears the promotion mark.
    pub(super) fn discard_after_base(&mut self, dir: &Path, segment_bytes: u64, pack_bytes: u64) -> Result<()> {
        self.chunks.sync()?;
        self.log.sync(&mut self.writer)?;
        wipe_history(dir)?;
        // Own packs were just deleted; a shared store gets back the
        // references of the versions dropped below.
        self.chunks.reset_private(&dir.join("chunks"), pack_bytes)?;
        if self.chunks.root().is_some() {
            self.chunks.decref_all(self.indexed_chunks())?;
        }
        self.log = Log::open(&dir.join("log"), segment_bytes, BTreeMap::new())?;
        for disk in &mut self.disks {
            disk.index = Default::default();
            disk.resizes.clear();
        }
        self.reset_to_base();
        self.durable_lsn = self.head_lsn;
        self.meta.promote = None;
        self.write_meta(dir)
    }
}

/// Deletes the log segments, then the pack indexes and packs: the history after a promoted
/// base. Other files are left alone.
pub(super) fn wipe_history(dir: &Path) -> Result<()> {
    // Pack indexes before their packs: an index never outlives its pack.
    for (sub, ext) in [("log", "log"), ("chunks", "idx"), ("chunks", "pack")] {
        let folder = dir.join(sub);
        if !folder.exists() {
            continue;
        }
        for no in fsutil::numbered_files(&folder, ext)? {
            let path = match (ext, u32::try_from(no)) {
                ("pack", Ok(no)) => super::pack_format::pack_path(&folder, no),
                ("idx", Ok(no)) => super::pack_index::index_path(&folder, no),
                _ => super::log::segment_path(&folder, no),
            };
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(JournalError::io("removing", &path, e)),
            }
        }
        fsutil::sync_dir(&folder)?;
    }
    Ok(())
}
