//! Ingesting a batch of tap or wire writes: validation before anything
//! changes, hashing and compression (in parallel for large batches),
//! dedup against the chunk store, read-modify-write of partial blocks, and
//! the write records handed to the log after their chunks.

use super::chunks::{self, ChunkId, Hash, HashMapOfBlocks, HashSetOfBlocks, PreparedChunk};
use super::format::{self, BlockRef, Record, WriteRecord};
use super::index::{Version, ZERO_CHUNK};
use super::log::SegmentSummary;
use super::replica::SizeChange;
use super::{
    hex, JournalError, Result, State, StreamPosition, TapWrite, WriteData, BLOCK_SIZE, HANDOFF_BYTES, MAX_DATA_WRITE,
};
use protection_groups::WriteKind;
use protection_groups::{DiskId, StreamId};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};

/// The 4 KiB-aligned, whole blocks of a data write, in order.
pub(super) fn full_blocks<'a>(w: &TapWrite<'a>) -> impl Iterator<Item = &'a [u8]> {
    let (data, skip) = match w.data {
        WriteData::Data(d) => {
            let skip = ((BLOCK_SIZE as u64 - w.offset % BLOCK_SIZE as u64) % BLOCK_SIZE as u64) as usize;
            (d, skip.min(d.len()))
        }
        _ => (&[][..], 0),
    };
    data[skip..].chunks_exact(BLOCK_SIZE)
}

pub(crate) fn is_zero(b: &[u8]) -> bool {
    let (pre, mid, post) = {
        // SAFETY: u64 has no invalid bit patterns; align_to only splits the
        // slice at alignment boundaries.
        unsafe { b.align_to::<u64>() }
    };
    pre.iter().all(|&x| x == 0) && mid.iter().all(|&x| x == 0) && post.iter().all(|&x| x == 0)
}

/// zstd with a cheap escape for incompressible streams: after eight misses
/// in a row it tries one block in sixteen, after 256 one in 64. The run of
/// misses is shared by the journal's workers and outlives a batch.
#[derive(Debug, Clone, Copy)]
pub(super) struct Compression<'a> {
    pub(super) level: Option<i32>,
    pub(super) misses: &'a AtomicU32,
}

impl Compression<'_> {
    /// Whether to try compressing the next new block. After 8 misses in a
    /// row only one block in 16 is tried, after 256 one in 64: a stream of
    /// incompressible data costs a sample, not a compression per block.
    pub(super) fn worth_trying(&self) -> bool {
        if self.level.is_none() {
            return false;
        }
        let m = self.misses.fetch_add(1, Ordering::Relaxed);
        (m < 8 || m.is_multiple_of(16)) && (m < 256 || m.is_multiple_of(64))
    }

    /// The block compressed, if that saves enough (a success resets the
    /// misses, so compressible data is tried block by block again).
    pub(super) fn compress(&self, block: &[u8]) -> Option<Vec<u8>> {
        let out = chunks::compress_block(block, self.level?);
        if out.is_some() {
            self.misses.store(0, Ordering::Relaxed);
        }
        out
    }
}

pub(super) const PARALLEL_MIN_BLOCKS: usize = 128;

/// Maps `f` over `items`, in order. Large batches are split between the
/// calling thread and the pool's helpers (the caller works too, rather
/// than waiting: on two cores a waiting caller wastes one).
pub(super) fn par_map<T: Sync, R: Send>(
    pool: Option<&rayon::ThreadPool>,
    items: &[T],
    f: impl Fn(&T) -> R + Sync + Send,
) -> Vec<R> {
    par_map_parts(pool, items, |part| part.iter().map(&f).collect())
}

/// As [`par_map`], with `f` given each part (a run of items) whole, and
/// returning one result per item of it: for work that does better on many
/// items at once (hashing blocks side by side).
pub(super) fn par_map_parts<T: Sync, R: Send>(
    pool: Option<&rayon::ThreadPool>,
    items: &[T],
    f: impl Fn(&[T]) -> Vec<R> + Sync + Send,
) -> Vec<R> {
    // Handing work to another thread costs a wake-up each way (tens of us on
    // a VM): only worth it for batches of half a megabyte and more.
    let Some(pool) = pool.filter(|_| items.len() >= PARALLEL_MIN_BLOCKS) else {
        return f(items);
    };
    let per = items.len().div_ceil(pool.current_num_threads() + 1);
    let parts: Vec<&[T]> = items.chunks(per).collect();
    let mut outs: Vec<Vec<R>> = parts.iter().map(|_| Vec::new()).collect();
    let f = &f;
    pool.in_place_scope(|scope| {
        let (mine, theirs) = outs.split_at_mut(1);
        for (part, out) in parts[1..].iter().zip(theirs.iter_mut()) {
            scope.spawn(move |_| *out = f(part));
        }
        mine[0] = f(parts[0]);
    });
    outs.into_iter().flatten().collect()
}

/// What [`State::capture_held`] found for a batch's held blocks.
#[derive(Debug, Default)]
pub(super) struct HeldBlocks {
    /// Head contents that the batch may overwrite, by hash.
    pub(super) captured: HashMapOfBlocks<Vec<u8>>,
    /// Held blocks found in the store, each with a reference that is
    /// given back after the batch; the batch's versions take their own
    /// from the id, without finding the hash again.
    pub(super) pinned: HashMapOfBlocks<ChunkId>,
}

impl State {
    pub(super) fn validate(&self, stream: StreamId, writes: &[TapWrite<'_>]) -> Result<()> {
        if !self.stream_ix.contains_key(&stream) && self.streams.len() > usize::from(u16::MAX) {
            return Err(JournalError::InvalidWrite(format!("a journal holds at most {} streams", u16::MAX)));
        }
        let mut expected = self.stream_ix.get(&stream).and_then(|&s| self.stream_pos[s as usize]).map(|p| p.seq + 1);
        // Sizes as the batch's own resizes leave them.
        let mut grown: HashMap<u32, u64> = HashMap::new();
        for w in writes {
            let d = self.disk(w.disk)?;
            let size = grown.get(&d).copied().unwrap_or_else(|| self.disks[d as usize].head_size());
            if let WriteData::Resize { size: new } = w.data {
                if w.offset != 0 || new == 0 || !new.is_multiple_of(BLOCK_SIZE as u64) {
                    return Err(JournalError::InvalidWrite(format!(
                        "resize of {} at seq {} to {new} bytes (offset {}): a size is a positive multiple of \
                         {BLOCK_SIZE} and the offset 0",
                        w.disk, w.seq, w.offset
                    )));
                }
                if new < size {
                    return Err(JournalError::InvalidWrite(format!(
                        "resize of {} at seq {} from {size} to {new} bytes: a protected disk never shrinks",
                        w.disk, w.seq
                    )));
                }
                grown.insert(d, new);
            }
            let len = w.data.len();
            if len == 0 && !matches!(w.data, WriteData::Resize { .. }) {
                return Err(JournalError::InvalidWrite(format!("zero-length write at seq {}", w.seq)));
            }
            if matches!(w.data, WriteData::Data(_)) && len > MAX_DATA_WRITE {
                return Err(JournalError::InvalidWrite(format!(
                    "data write of {len} bytes at seq {} exceeds {MAX_DATA_WRITE}",
                    w.seq
                )));
            }
            if w.offset.checked_add(len).is_none_or(|end| end > size) {
                return Err(JournalError::OutOfRange { disk: w.disk, offset: w.offset, len, size });
            }
            if let Some(exp) = expected {
                if w.seq != exp {
                    return Err(JournalError::SeqGap { stream, expected: exp, got: w.seq });
                }
            }
            expected = Some(w.seq + 1);
        }
        Ok(())
    }

    /// The chunk for a block's content, stored if new; with a reference.
    pub(super) fn store_block(
        &mut self,
        block: &[u8],
        hash: Option<Hash>,
        prepared: Option<PreparedChunk>,
    ) -> Result<ChunkId> {
        let Some(hash) = hash else {
            self.zero_blocks += 1;
            return Ok(ZERO_CHUNK);
        };
        let prepared = match prepared {
            Some(p) => p,
            None => {
                // Compress only what the store lacks.
                if let Some(id) = self.chunks.reference(&hash)? {
                    self.dedup_hits += 1;
                    return Ok(id);
                }
                PreparedChunk {
                    hash,
                    compressed: self.compression_level.and_then(|l| chunks::compress_block(block, l)),
                }
            }
        };
        let (id, hit) = self.chunks.intern(block, prepared)?;
        if hit {
            self.dedup_hits += 1;
        }
        Ok(id)
    }

    /// A held block that capture_held did not pin: sent earlier in this
    /// batch (stored by now) or captured from the head it overwrites.
    fn store_unpinned_held(
        &mut self,
        content: &[u8],
        hash: Hash,
        block: u64,
        disk: DiskId,
        captured: &HashMapOfBlocks<Vec<u8>>,
    ) -> Result<ChunkId> {
        let content = match (self.chunks.lookup(&hash)?, captured.get(&hash)) {
            (Some(_), _) => content,
            (None, Some(c)) => c.as_slice(),
            // Not a refusal: the batch is half applied, so the journal
            // stops.
            (None, None) => {
                return Err(JournalError::Failed(format!("held block {block} of {disk} vanished mid-batch")));
            }
        };
        self.store_block(content, Some(hash), None)
    }

    /// Checks, before anything changes, that every block sent as a hash
    /// only is here: in the chunk store, or as the block's head content at
    /// its position (captured, since the batch may overwrite it). A batch
    /// with one block not held is refused whole. Held blocks found in the
    /// store are pinned (a reference each, returned to give back after the
    /// batch), so that another journal's garbage collection cannot take
    /// them before the batch stores its own references.
    pub(super) fn capture_held(
        &self,
        writes: &[TapWrite<'_>],
        hashes: &[Option<Hash>],
        held: &[bool],
    ) -> Result<HeldBlocks> {
        let mut out = HeldBlocks::default();
        if !held.contains(&true) {
            return Ok(out);
        }
        match self.capture_into(writes, hashes, held, &mut out.captured, &mut out.pinned) {
            Ok(()) => Ok(out),
            Err(e) => {
                self.chunks.decref_all(out.pinned.into_values())?;
                Err(e)
            }
        }
    }

    fn capture_into(
        &self,
        writes: &[TapWrite<'_>],
        hashes: &[Option<Hash>],
        held: &[bool],
        captured: &mut HashMapOfBlocks<Vec<u8>>,
        pinned: &mut HashMapOfBlocks<ChunkId>,
    ) -> Result<()> {
        let bs = BLOCK_SIZE as u64;
        let mut i = 0usize;
        // Blocks sent earlier in this batch are stored before a later held
        // block with their hash is.
        let mut sent_before = HashSetOfBlocks::default();
        for w in writes {
            let first = w.offset.div_ceil(bs);
            for k in 0..full_blocks(w).count() {
                let (is_held, hash) = (held.get(i).copied().unwrap_or(false), hashes.get(i).copied().flatten());
                i += 1;
                let Some(hash) = hash else { continue };
                if !is_held {
                    sent_before.insert(hash);
                    continue;
                }
                if pinned.contains_key(&hash) || captured.contains_key(&hash) || sent_before.contains(&hash) {
                    continue;
                }
                if let Some(id) = self.chunks.reference(&hash)? {
                    pinned.insert(hash, id);
                    continue;
                }
                let d = self.disk(w.disk)?;
                let mut content = vec![0u8; BLOCK_SIZE];
                self.read_head(d, first + k as u64, &mut content)?;
                if chunks::hash_block(&content) != hash {
                    return Err(JournalError::BlockNotHeld { disk: w.disk, block: first + k as u64, hash: hex(&hash) });
                }
                captured.insert(hash, content);
            }
        }
        Ok(())
    }

    pub(super) fn apply_batch(
        &mut self,
        stream: StreamId,
        writes: &[TapWrite<'_>],
        hashes: &[Option<Hash>],
        held: &[bool],
        found: &HeldBlocks,
        mut compressed: Vec<Option<Vec<u8>>>,
    ) -> Result<u64> {
        let s = self.intern(stream);
        let bs = BLOCK_SIZE as u64;
        let mut next_full = 0usize;
        let mut buf = Vec::new();
        let mut summary = SegmentSummary::default();
        let mut scratch = vec![0u8; BLOCK_SIZE];
        for w in writes {
            let d = self.disk(w.disk)?;
            let lsn = self.head_lsn + 1;
            if let WriteData::Resize { size } = w.data {
                self.disks[d as usize].grow_replica(size)?;
                self.disks[d as usize].resizes.push(SizeChange { lsn, stream: s, size });
                let rec = Record::Write(WriteRecord {
                    lsn,
                    stream,
                    seq: w.seq,
                    disk: w.disk,
                    kind: WriteKind::Resize,
                    offset: 0,
                    len: size,
                    blocks: Vec::new(),
                });
                format::encode_record(&rec, &mut buf).map_err(JournalError::Failed)?;
                summary.note(lsn, Some(s));
                self.head_lsn = lsn;
                self.stream_pos[s as usize] = Some(StreamPosition { lsn, seq: w.seq });
                continue;
            }
            let len = w.data.len();
            let (first, last) = (w.offset / bs, (w.offset + len - 1) / bs);
            let kind = w.data.kind();
            let mut blocks = Vec::new();
            for block in first..=last {
                let start = block * bs;
                let whole = start >= w.offset && start + bs <= w.offset + len;
                // The chunk, and its hash (known here: never looked up).
                let (chunk, hash) = match (w.data, whole) {
                    (WriteData::Data(data), true) => {
                        let from = (start - w.offset) as usize;
                        let content = &data[from..from + BLOCK_SIZE];
                        let h = hashes.get(next_full).copied().flatten();
                        let is_held = held.get(next_full).copied().unwrap_or(false);
                        let p = h.map(|hash| PreparedChunk {
                            hash,
                            compressed: compressed.get_mut(next_full).and_then(Option::take),
                        });
                        next_full += 1;
                        let chunk = match h {
                            Some(hash) if is_held => match found.pinned.get(&hash) {
                                Some(&id) => {
                                    // Pinned by capture_held: the id holds.
                                    self.chunks.incref(id)?;
                                    self.dedup_hits += 1;
                                    id
                                }
                                None => self.store_unpinned_held(content, hash, block, w.disk, &found.captured)?,
                            },
                            _ => self.store_block(content, h, p)?,
                        };
                        (chunk, h)
                    }
                    (_, true) => {
                        self.zero_blocks += 1;
                        (ZERO_CHUNK, None)
                    }
                    (data, false) => {
                        // A partial block: merge onto the block's current
                        // content, so every version is a whole block.
                        self.read_head(d, block, &mut scratch)?;
                        let lo = w.offset.max(start);
                        let hi = (w.offset + len).min(start + bs);
                        let dst = &mut scratch[(lo - start) as usize..(hi - start) as usize];
                        match data {
                            WriteData::Data(src) => {
                                dst.copy_from_slice(&src[(lo - w.offset) as usize..(hi - w.offset) as usize])
                            }
                            _ => dst.fill(0),
                        }
                        let h = if is_zero(&scratch) { None } else { Some(chunks::hash_block(&scratch)) };
                        let content = scratch.clone();
                        (self.store_block(&content, h, None)?, h)
                    }
                };
                let listed = kind == WriteKind::Data || !whole;
                if listed {
                    blocks.push((block, hash.map_or(BlockRef::Zero, BlockRef::Chunk)));
                }
                self.disks[d as usize].index.insert(block, lsn, Version { chunk, stream: s });
            }
            let rec = Record::Write(WriteRecord {
                lsn,
                stream,
                seq: w.seq,
                disk: w.disk,
                kind,
                offset: w.offset,
                len,
                blocks,
            });
            // validate() bounded every field, so this cannot fail; if it
            // did, the batch is half applied and the journal stops.
            format::encode_record(&rec, &mut buf).map_err(JournalError::Failed)?;
            summary.note(lsn, Some(s));
            self.head_lsn = lsn;
            self.stream_pos[s as usize] = Some(StreamPosition { lsn, seq: w.seq });
        }
        // Small batches (a tap's single writes) accumulate in memory and go
        // to the writer together: one hand-off per quarter megabyte rather
        // than per write. Chunks go before the records naming them, so the
        // page cache never holds a record without its data.
        self.log.append(&buf, &summary);
        if self.chunks.pending_len()? + self.log.pending_len() >= HANDOFF_BYTES {
            self.chunks.flush_pending()?;
            self.log.flush(&mut self.writer)?;
        }
        Ok(self.head_lsn)
    }
}
