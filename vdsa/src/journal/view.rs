//! A read-only view of the VPG's disks at one checkpoint.

use super::chunks::ChunkId;
use super::error::{JournalError, Result};
use super::index::{CutSet, ZERO_CHUNK};
use super::model::{Checkpoint, BLOCK_SIZE};
use super::replica::read_replica;
use super::{Journal, Source, State};
use protection_groups::DiskId;
use std::collections::HashMap;

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
        let view = st.views.get(&self.id).ok_or_else(|| JournalError::Failed("view state missing".into()))?;
        st.read_range(disk, &view.cuts, &view.preserved, &view.sizes, offset, buf)
    }

    /// The disk's size at this checkpoint (a later resize does not show).
    pub fn disk_size(&self, disk: DiskId) -> Result<u64> {
        let st = self.journal.read_state()?;
        let view = st.views.get(&self.id).ok_or_else(|| JournalError::Failed("view state missing".into()))?;
        let d = st.disk(disk)?;
        Ok(view.sizes.get(&d).copied().unwrap_or_else(|| st.disks[d as usize].size_at(&view.cuts)))
    }

    /// Which blocks of `offset..offset + len` read as zeroes without
    /// storing anything (a zero block in the journal, a hole in the
    /// replica): consecutive runs `(length, zero)` covering the range.
    pub fn zero_runs(&self, disk: DiskId, offset: u64, len: u64) -> Result<Vec<(u64, bool)>> {
        let st = self.journal.read_state()?;
        let view = st.views.get(&self.id).ok_or_else(|| JournalError::Failed("view state missing".into()))?;
        st.zero_runs(disk, &view.cuts, &view.preserved, &view.sizes, offset, len)
    }

    /// blake3 of the whole disk as this view sees it.
    pub fn disk_hash(&self, disk: DiskId) -> Result<blake3::Hash> {
        let size = self.disk_size(disk)?;
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
                let _ = st.chunks.decref_all(view.preserved.into_values().filter(|&c| c != ZERO_CHUNK));
            }
        }
    }
}

impl State {
    /// Where each block of `offset..offset + len` of `disk` comes from for
    /// a reader at `cuts`: the blocks in `preserved` (copied out by
    /// retention for a view), else each block's newest version visible at
    /// `cuts`, else the replica. Returns the disk's index, the first block
    /// and the sources (None for an empty range).
    fn block_sources(
        &self,
        disk: DiskId,
        cuts: &CutSet,
        preserved: &HashMap<(u32, u64), ChunkId>,
        sizes: &HashMap<u32, u64>,
        offset: u64,
        len: u64,
    ) -> Result<Option<(u32, u64, Vec<Source>)>> {
        let d = self.disk(disk)?;
        let size = sizes.get(&d).copied().unwrap_or_else(|| self.disks[d as usize].size_at(cuts));
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(JournalError::OutOfRange { disk, offset, len, size });
        }
        if len == 0 {
            return Ok(None);
        }
        let bs = BLOCK_SIZE as u64;
        let (first, last) = (offset / bs, (offset + len - 1) / bs);
        let mut sources = vec![Source::Replica; (last - first + 1) as usize];
        let mut found = Vec::new();
        self.disks[d as usize].index.visible_in_range(first, last, cuts, &mut found);
        for (b, v) in &found {
            sources[(b - first) as usize] = Source::Chunk(v.chunk);
        }
        if !preserved.is_empty() {
            for (i, src) in sources.iter_mut().enumerate() {
                if let Some(&c) = preserved.get(&(d, first + i as u64)) {
                    *src = Source::Chunk(c);
                }
            }
        }
        Ok(Some((d, first, sources)))
    }

    /// See [`PitView::zero_runs`].
    pub(super) fn zero_runs(
        &self,
        disk: DiskId,
        cuts: &CutSet,
        preserved: &HashMap<(u32, u64), ChunkId>,
        sizes: &HashMap<u32, u64>,
        offset: u64,
        len: u64,
    ) -> Result<Vec<(u64, bool)>> {
        let Some((d, first, sources)) = self.block_sources(disk, cuts, preserved, sizes, offset, len)? else {
            return Ok(Vec::new());
        };
        let bs = BLOCK_SIZE as u64;
        let end = offset + len;
        let last = first + sources.len() as u64 - 1;
        let holes = replica_holes(&self.disks[d as usize].replica, first * bs, (last + 1) * bs)?;
        let mut runs: Vec<(u64, bool)> = Vec::new();
        let mut hole = holes.iter().peekable();
        for (i, src) in sources.iter().enumerate() {
            let start = (first + i as u64) * bs;
            let zero = match src {
                Source::Chunk(c) => *c == ZERO_CHUNK,
                Source::Replica => {
                    while hole.next_if(|&&(_, e)| e <= start).is_some() {}
                    hole.peek().is_some_and(|&&(s, e)| s <= start && start + bs <= e)
                }
            };
            let piece = (start + bs).min(end) - start.max(offset);
            match runs.last_mut() {
                Some((l, z)) if *z == zero => *l += piece,
                _ => runs.push((piece, zero)),
            }
        }
        Ok(runs)
    }

    /// Reads `buf.len()` bytes of `disk` at `offset` as a reader at `cuts`
    /// sees them (sources as [`State::block_sources`] finds them).
    pub(super) fn read_range(
        &self,
        disk: DiskId,
        cuts: &CutSet,
        preserved: &HashMap<(u32, u64), ChunkId>,
        sizes: &HashMap<u32, u64>,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<()> {
        let len = buf.len() as u64;
        let Some((d, first, sources)) = self.block_sources(disk, cuts, preserved, sizes, offset, len)? else {
            return Ok(());
        };
        let bs = BLOCK_SIZE as u64;
        let end = offset + len;
        let n = sources.len();
        // Replica blocks: run by run when the runs are few, else the whole
        // range in one read, overwritten below by the journal's blocks.
        let disk = &self.disks[d as usize];
        let runs = sources
            .iter()
            .enumerate()
            .filter(|&(i, s)| *s == Source::Replica && (i == 0 || sources[i - 1] != Source::Replica))
            .count();
        if runs > 4 {
            read_replica(disk, offset, buf)?;
        } else if runs > 0 {
            let mut i = 0;
            while i < n {
                if sources[i] != Source::Replica {
                    i += 1;
                    continue;
                }
                let mut j = i;
                while j < n && sources[j] == Source::Replica {
                    j += 1;
                }
                let lo = ((first + i as u64) * bs).max(offset);
                let hi = ((first + j as u64) * bs).min(end);
                read_replica(disk, lo, &mut buf[(lo - offset) as usize..(hi - offset) as usize])?;
                i = j;
            }
        }
        // Journal blocks: whole ones straight into `buf`, batched; edges
        // through a scratch block.
        let mut whole = Vec::new();
        let mut scratch = vec![0u8; BLOCK_SIZE];
        for (i, src) in sources.iter().enumerate() {
            let Source::Chunk(chunk) = *src else { continue };
            let start = (first + i as u64) * bs;
            let lo = start.max(offset);
            let hi = (start + bs).min(end);
            let out = &mut buf[(lo - offset) as usize..(hi - offset) as usize];
            if chunk == ZERO_CHUNK {
                out.fill(0);
            } else if hi - lo == bs {
                whole.push((chunk, (lo - offset) as usize));
            } else {
                self.chunks.read(chunk, &mut scratch)?;
                out.copy_from_slice(&scratch[(lo - start) as usize..(hi - start) as usize]);
            }
        }
        self.chunks.read_many(&whole, buf)
    }
}

/// The holes of `file` within `lo..hi` (SEEK_DATA/SEEK_HOLE), as ranges.
fn replica_holes(file: &std::fs::File, lo: u64, want_hi: u64) -> Result<Vec<(u64, u64)>> {
    use std::os::fd::AsRawFd;
    let len = file.metadata().map_err(|e| JournalError::Failed(format!("replica metadata: {e}")))?.len();
    let hi = want_hi.min(len);
    let mut holes = Vec::new();
    let mut pos = lo;
    while pos < hi {
        // SAFETY: lseek on a file descriptor this File owns; it changes only
        // the descriptor's offset, which nothing here relies on (reads are
        // positional).
        let data = unsafe { libc::lseek(file.as_raw_fd(), pos as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            // ENXIO: no data after `pos`; another error: say nothing is a
            // hole (data is always a true answer).
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO) {
                holes.push((pos, hi));
            }
            break;
        }
        let data = data as u64;
        if data > pos {
            holes.push((pos, data.min(hi)));
        }
        if data >= hi {
            break;
        }
        // SAFETY: as above.
        let next_hole = unsafe { libc::lseek(file.as_raw_fd(), data as libc::off_t, libc::SEEK_HOLE) };
        if next_hole < 0 {
            break;
        }
        pos = next_hole as u64;
    }
    // Past the file's end (a replica shorter than the disk) reads zeroes.
    if len < want_hi {
        holes.push((len.max(lo), want_hi));
    }
    Ok(holes)
}
