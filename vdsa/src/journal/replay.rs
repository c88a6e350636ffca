//! Rebuilding a journal's memory from its log at open: the index, the
//! streams' positions and the checkpoints, with the checks that tell a
//! write never made durable from a chunk that was lost (journal-format.md,
//! "Recovery").

use super::format::{BlockRef, Record, WriteRecord};
use super::index::{Version, MISSING_CHUNK, ZERO_CHUNK};
use super::log::{self, SegmentSummary};
use super::replica::SizeChange;
use super::{fsutil, hex, JournalError, Result, State, StreamPosition, BLOCK_SIZE};
use protection_groups::WriteKind;
use std::collections::BTreeMap;
use std::path::Path;

impl State {
    /// Rebuilds index, streams and checkpoints from the scanned log.
    pub(super) fn replay(
        &mut self,
        dir: &Path,
        records: Vec<log::ScannedRecord>,
    ) -> Result<BTreeMap<u64, SegmentSummary>> {
        let last_commit =
            records.iter().rposition(|r| matches!(r.record, Record::Commit { .. } | Record::Checkpoint(_)));
        let base_id = self.meta.base.as_ref().map(|b| b.id);
        let mut summaries: BTreeMap<u64, SegmentSummary> = BTreeMap::new();
        let mut missing_at = Vec::new();
        for (i, rec) in records.into_iter().enumerate() {
            let summary = summaries.entry(rec.segment).or_default();
            match rec.record {
                Record::Write(w) => {
                    let s = self.intern(w.stream);
                    summary.note(w.lsn, Some(s));
                    let missing = w.blocks.iter().find_map(|(_, r)| match r {
                        BlockRef::Chunk(h) if !self.chunks.lookup(h).is_ok_and(|c| c.is_some()) => Some(*h),
                        _ => None,
                    });
                    let path = log::segment_path(&dir.join("log"), rec.segment);
                    if missing.is_some() && last_commit.is_none_or(|c| i > c) {
                        // Never made durable: the packs lost the tail the log
                        // kept. Cut the log here.
                        tracing::warn!(path = %path.display(), offset = rec.offset, "cutting log tail whose chunks were not durable");
                        fsutil::truncate(&path, rec.offset)?;
                        for no in fsutil::numbered_files(&dir.join("log"), "log")? {
                            if no > rec.segment {
                                let p = log::segment_path(&dir.join("log"), no);
                                std::fs::remove_file(&p).map_err(|e| JournalError::io("removing", &p, e))?;
                            }
                        }
                        break;
                    }
                    self.head_lsn = self.head_lsn.max(w.lsn);
                    self.stream_pos[s as usize] = Some(StreamPosition { lsn: w.lsn, seq: w.seq });
                    if self.base_cuts.visible(w.lsn, s) {
                        continue; // already in the replica; its chunks may be gone
                    }
                    let d = self.disk_ix.get(&w.disk).copied().ok_or_else(|| {
                        JournalError::corrupt(
                            &path,
                            rec.offset,
                            format!("write record for {}, which the journal metadata does not list", w.disk),
                        )
                    })?;
                    if let Some(hash) = missing {
                        // Durable, yet its chunk is gone: legitimate only if
                        // thinning had dropped this version; checked below.
                        for (block, r) in &w.blocks {
                            if matches!(r, BlockRef::Chunk(h) if !self.chunks.lookup(h).is_ok_and(|c| c.is_some())) {
                                missing_at.push((d, *block, w.lsn, path.clone(), rec.offset, hash));
                            }
                        }
                    }
                    self.index_write(d, s, &w);
                }
                Record::Checkpoint(cp) => {
                    summary.note(cp.lsn, None);
                    self.head_lsn = self.head_lsn.max(cp.lsn);
                    if base_id.is_none_or(|b| cp.id > b) {
                        self.checkpoints.insert(cp.id, cp);
                    }
                }
                Record::Commit { lsn } => summary.note(lsn, None),
                Record::DropCheckpoint { id } => {
                    self.checkpoints.remove(&id);
                }
            }
        }
        // Thinning is deterministic given the retained checkpoints, and the
        // checkpoints only shrank since it last ran: it drops again every
        // version whose chunk it let garbage collection free.
        self.thin_versions();
        for (d, block, lsn, path, offset, hash) in missing_at {
            if self.disks[d as usize].index.get(block, lsn).is_some() {
                return Err(JournalError::MissingChunk { path, offset, hash: hex(&hash) });
            }
        }
        Ok(summaries)
    }

    /// Adds a logged write's block versions to the index, with references.
    pub(super) fn index_write(&mut self, d: u32, s: u16, w: &WriteRecord) {
        if w.kind == WriteKind::Resize {
            self.disks[d as usize].resizes.push(SizeChange { lsn: w.lsn, stream: s, size: w.len });
            return;
        }
        let put = |st: &mut State, block: u64, r: &BlockRef| {
            let chunk = match r {
                BlockRef::Zero => {
                    st.zero_blocks += 1;
                    ZERO_CHUNK
                }
                // Found and counted at once: another journal's collection
                // may run meanwhile.
                BlockRef::Chunk(h) => match st.chunks.reference(h) {
                    Ok(Some(id)) => id,
                    _ => MISSING_CHUNK, // checked by replay
                },
            };
            st.disks[d as usize].index.insert(block, w.lsn, Version { chunk, stream: s });
        };
        for (block, r) in &w.blocks {
            put(self, *block, r);
        }
        if w.kind != WriteKind::Data {
            // Interior blocks of a zero/trim range are zero; the edges were
            // listed above.
            let bs = BLOCK_SIZE as u64;
            let first = w.offset.div_ceil(bs);
            let end = (w.offset + w.len) / bs;
            for block in first..end {
                put(self, block, &BlockRef::Zero);
            }
        }
    }
}
