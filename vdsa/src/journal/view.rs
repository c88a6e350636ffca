//! A read-only view of the VPG's disks at one checkpoint.

use super::error::{JournalError, Result};
use super::index::ZERO_CHUNK;
use super::model::{Checkpoint, BLOCK_SIZE};
use super::{read_replica, Journal, Source};
use protection_groups::DiskId;

/// The disks as they were at a checkpoint. Opening one copies nothing; it
/// pins what it reads, so retention running meanwhile does not change it.
/// Dropping it releases the pin.
#[derive(Debug)]
pub struct PitView {
    journal: Journal,
    id: u64,
    checkpoint: Checkpoint,
}

impl PitView {
    pub(super) fn new(journal: Journal, id: u64, checkpoint: Checkpoint) -> Self {
        PitView { journal, id, checkpoint }
    }

    pub fn checkpoint(&self) -> &Checkpoint {
        &self.checkpoint
    }

    /// Reads `buf.len()` bytes of `disk` at `offset` (any alignment).
    pub fn read(&self, disk: DiskId, offset: u64, buf: &mut [u8]) -> Result<()> {
        let st = self.journal.read_state()?;
        let d = st.disk(disk)?;
        let size = st.disks[d as usize].info.size;
        let len = buf.len() as u64;
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(JournalError::OutOfRange { disk, offset, len, size });
        }
        let view = st
            .views
            .get(&self.id)
            .ok_or_else(|| JournalError::Failed("view state missing".into()))?;
        let bs = BLOCK_SIZE as u64;
        let end = offset + len;
        let mut pos = offset;
        let mut scratch = vec![0u8; BLOCK_SIZE];
        while pos < end {
            let block = pos / bs;
            match st.source_for(d, block, view) {
                Source::Replica => {
                    // Coalesce the run of blocks the replica serves into one read.
                    let mut run_end = (block + 1) * bs;
                    while run_end < end && st.source_for(d, run_end / bs, view) == Source::Replica {
                        run_end += bs;
                    }
                    let run_end = run_end.min(end);
                    let out = &mut buf[(pos - offset) as usize..(run_end - offset) as usize];
                    read_replica(&st.disks[d as usize], pos, out)?;
                    pos = run_end;
                }
                Source::Chunk(chunk) => {
                    let in_block = (pos - block * bs) as usize;
                    let n = (BLOCK_SIZE - in_block).min((end - pos) as usize);
                    let out = &mut buf[(pos - offset) as usize..(pos - offset) as usize + n];
                    if chunk == ZERO_CHUNK {
                        out.fill(0);
                    } else if n == BLOCK_SIZE {
                        st.chunks.read(chunk, out)?;
                    } else {
                        st.chunks.read(chunk, &mut scratch)?;
                        out.copy_from_slice(&scratch[in_block..in_block + n]);
                    }
                    pos += n as u64;
                }
            }
        }
        Ok(())
    }

    /// blake3 of the whole disk as this view sees it.
    pub fn disk_hash(&self, disk: DiskId) -> Result<blake3::Hash> {
        let size = {
            let st = self.journal.read_state()?;
            let d = st.disk(disk)?;
            st.disks[d as usize].info.size
        };
        let mut hasher = blake3::Hasher::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut pos = 0;
        while pos < size {
            let n = (size - pos).min(buf.len() as u64) as usize;
            self.read(disk, pos, &mut buf[..n])?;
            hasher.update(&buf[..n]);
            pos += n as u64;
        }
        Ok(hasher.finalize())
    }
}

impl Drop for PitView {
    fn drop(&mut self) {
        // A poisoned lock means the journal is being torn down anyway.
        if let Ok(mut st) = self.journal.inner.state.write() {
            if let Some(view) = st.views.remove(&self.id) {
                for chunk in view.preserved.into_values() {
                    if chunk != ZERO_CHUNK {
                        st.chunks.decref(chunk);
                    }
                }
            }
        }
    }
}
