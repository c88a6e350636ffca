//! The target-side journal engine of one VPG (architecture.md §4).
//!
//! Writes of the VPG's streams are ingested in seq order, their 4 KiB
//! blocks stored once in the chunk store, and logged as records that name
//! the blocks by hash. Checkpoints are consistent cuts across streams; a
//! read view at a checkpoint reads each block's newest version at or before
//! it, else the replica, which holds the image at the oldest retained
//! checkpoint. Retention moves that oldest point forward.
//!
//! On-disk layout, write order and crash assumptions: docs/journal-format.md.

mod block_hash;
mod chunks;
mod error;
mod format;
mod fsutil;
mod index;
mod ingest;
mod log;
mod meta;
mod migrate;
mod model;
mod pack_format;
mod pack_index;
mod promotion;
mod replay;
mod replica;
mod retention;
mod store;
mod view;
mod writer;

pub use block_hash::{hash_blocks, hash_nonzero_blocks};
pub use chunks::{stored_chunk_hashes, HashSetOfBlocks};
pub use error::{JournalError, Result};
pub use format::check_checkpoint_name;
pub use fsutil::free_bytes as free_bytes_at;
/// Whether a block is all zeros (word at a time).
pub(crate) use ingest::is_zero as is_zero_block;
pub use model::{
    BlockQuery, Checkpoint, CheckpointSpec, Cut, DiskInfo, JournalStats, StreamPosition, TapWrite, WireBlock,
    WriteData, BLOCK_SIZE,
};
pub use retention::RetentionReport;
pub use view::PitView;

use chunks::{ChunkId, Hash};
use format::Record;
use index::{CutSet, ZERO_CHUNK};
use ingest::{full_blocks, par_map, par_map_parts, Compression};
use log::{Log, SegmentSummary};
use meta::{read_meta, write_meta_file, Meta, META_FILE, META_FORMAT, META_FORMAT_SHARED_CHUNKS};
use protection_groups::{CheckpointId, DiskId, StreamId};
use replica::{open_replica, read_replica, replica_path, DiskState};
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU32;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use store::Store;

/// Tunables of a journal. The defaults suit a VPG of a few disks.
#[derive(Debug, Clone)]
pub struct JournalConfig {
    /// A log segment is closed once it reaches this size.
    pub segment_bytes: u64,
    /// A chunk pack is closed once it reaches this size.
    pub pack_bytes: u64,
    /// zstd level for chunks, or `None` to store them raw.
    pub compression_level: Option<i32>,
    /// Threads that hash and compress a batch.
    pub workers: usize,
    /// A journal created with this set keeps its chunks in the chunk store
    /// shared by the journals of this folder (format 3), so that a block
    /// many VPGs hold is stored once; None: in its own folder (format 2).
    /// An existing journal keeps where it has them.
    pub chunk_store: Option<PathBuf>,
}

impl Default for JournalConfig {
    fn default() -> Self {
        JournalConfig {
            segment_bytes: 64 << 20,
            pack_bytes: 256 << 20,
            compression_level: Some(1),
            // The ingesting thread and the background writer already keep two
            // cores busy; helpers only pay with more cores than that.
            workers: std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).clamp(1, 4)),
            chunk_store: None,
        }
    }
}

/// Appended bytes kept in memory before they go to the writer thread.
const HANDOFF_BYTES: usize = 256 << 10;
/// The largest data write accepted in one piece (taps send at most 32 MiB):
/// its record, which lists every block, stays far inside what a reader
/// accepts.
pub const MAX_DATA_WRITE: u64 = 256 << 20;

/// An open view's checkpoint and the blocks retention copied out for it.
#[derive(Debug)]
struct ViewState {
    checkpoint: Checkpoint,
    cuts: CutSet,
    /// (disk, block) -> chunk (or ZERO_CHUNK) the view reads there, saved
    /// because retention moved the replica past the view's checkpoint.
    preserved: HashMap<(u32, u64), ChunkId>,
    /// disk -> its size at the view's checkpoint, saved when retention
    /// folded a later resize into the base.
    sizes: HashMap<u32, u64>,
}

/// Where a view reads a block from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Replica,
    Chunk(ChunkId),
}

#[derive(Debug)]
struct State {
    failed: Option<String>,
    meta: Meta,
    disks: Vec<DiskState>,
    disk_ix: HashMap<DiskId, u32>,
    streams: Vec<StreamId>,
    stream_ix: HashMap<StreamId, u16>,
    /// Per interned stream: where its last write stands.
    stream_pos: Vec<Option<StreamPosition>>,
    /// This journal's own store, or the one it shares (`store`).
    chunks: Arc<Store>,
    log: Log,
    /// Writes the log on its own thread (declared after it, so it is
    /// dropped, and finishes its queue, after its last use).
    writer: writer::Writer,
    checkpoints: BTreeMap<CheckpointId, Checkpoint>,
    base_cuts: CutSet,
    head_lsn: u64,
    durable_lsn: u64,
    views: HashMap<u64, ViewState>,
    next_view: u64,
    dedup_hits: u64,
    zero_blocks: u64,
    compression_level: Option<i32>,
}

#[derive(Debug)]
struct Inner {
    dir: PathBuf,
    /// Helps the ingesting thread hash and compress large batches (none
    /// with one worker).
    pool: Option<rayon::ThreadPool>,
    /// Compression attempts that did not pay, in a row.
    compress_misses: AtomicU32,
    /// Held for the journal's life: the directory's exclusive lock.
    _lock: File,
    config: JournalConfig,
    state: RwLock<State>,
}

/// A VPG's journal on the recovery site. Cheap to clone; all clones share
/// one journal.
#[derive(Debug, Clone)]
pub struct Journal {
    inner: Arc<Inner>,
}

impl Journal {
    /// Opens the journal in `dir`, creating it if empty. Rebuilds the index
    /// from the log, cuts a torn tail, finishes a retention step a crash
    /// interrupted, and refuses corruption with an error naming file and
    /// offset.
    pub fn open(dir: impl AsRef<Path>, config: JournalConfig) -> Result<Journal> {
        let dir = dir.as_ref().to_path_buf();
        fsutil::create_dir(&dir)?;
        if let Some(root) = &config.chunk_store {
            // A journal that keeps its own chunks (format 2, an earlier
            // build's) moves into the shared store first.
            // A move that fails (a full disk) leaves it in its own store,
            // opened as it is; the move is tried again at the next open.
            if read_meta(&dir)?.is_some_and(|m| m.format == META_FORMAT && m.chunk_store.is_none()) {
                if let Err(e) = migrate::into_shared_store(&dir, &config, root) {
                    tracing::warn!(dir = %dir.display(), "the journal stays in its own chunk store for now: {e}");
                }
            }
        }
        let lock = fsutil::lock_dir(&dir)?;
        let (meta, chunks) = open_meta(&dir, &config)?;
        if let (Some(p), Some(b)) = (&meta.promote, &meta.base) {
            if p.id == b.id {
                // A promotion was deleting the history after its base.
                promotion::wipe_history(&dir)?;
                chunks.reset_private(&dir.join("chunks"), config.pack_bytes)?;
            }
        }
        let records = log::scan(&dir.join("log"))?;
        fsutil::create_dir(&dir.join("replica"))?;
        let mut disks = Vec::new();
        let mut disk_ix = HashMap::new();
        for info in &meta.disks {
            disk_ix.insert(info.id, disks.len() as u32);
            disks.push(open_replica(&dir, *info, false)?);
        }
        let mut st = State {
            failed: None,
            meta,
            disks,
            disk_ix,
            streams: Vec::new(),
            stream_ix: HashMap::new(),
            stream_pos: Vec::new(),
            chunks,
            // Replaced below, once the replay knew the segment summaries
            // and cut what a crash left unacknowledged (opening creates
            // nothing).
            log: Log::open(&dir.join("log"), config.segment_bytes, BTreeMap::new())?,
            writer: writer::Writer::start()?,
            checkpoints: BTreeMap::new(),
            base_cuts: CutSet::new(Vec::new(), 0),
            head_lsn: 0,
            durable_lsn: 0,
            views: HashMap::new(),
            next_view: 1,
            dedup_hits: 0,
            zero_blocks: 0,
            compression_level: config.compression_level,
        };
        st.reset_to_base();
        let summaries = st.replay(&dir, records)?;
        for d in &st.disks {
            d.grow_replica(d.head_size())?;
        }
        st.log = Log::open(&dir.join("log"), config.segment_bytes, summaries)?;
        if let Some(intent) = st.meta.intent.clone() {
            tracing::info!(checkpoint = %intent.id, "finishing a retention step interrupted by a crash");
            st.advance_base(&dir, &intent)?;
        }
        if let Some(target) = st.meta.promote.clone() {
            tracing::info!(checkpoint = %target.id, "finishing a promotion interrupted by a crash");
            if st.base_id() < Some(target.id) {
                st.advance_base(&dir, &target)?;
            }
            st.discard_after_base(&dir, config.segment_bytes, config.pack_bytes)?;
        }
        st.chunks.sync()?;
        st.log.sync(&mut st.writer)?;
        st.durable_lsn = st.head_lsn;
        st.chunks.attach(&dir)?;
        Ok(Journal {
            inner: Arc::new(Inner {
                pool: match config.workers {
                    0 | 1 => None,
                    n => Some(
                        rayon::ThreadPoolBuilder::new()
                            .num_threads(n - 1)
                            .thread_name(|i| format!("journal-helper-{i}"))
                            .build()
                            .map_err(|e| JournalError::Failed(format!("starting journal helpers: {e}")))?,
                    ),
                },
                compress_misses: AtomicU32::new(0),
                dir,
                _lock: lock,
                config,
                state: RwLock::new(st),
            }),
        })
    }

    fn read_state(&self) -> Result<RwLockReadGuard<'_, State>> {
        self.inner.state.read().map_err(|_| JournalError::Failed("a thread panicked while holding the journal".into()))
    }

    fn write_state(&self) -> Result<RwLockWriteGuard<'_, State>> {
        let st = self
            .inner
            .state
            .write()
            .map_err(|_| JournalError::Failed("a thread panicked while holding the journal".into()))?;
        if let Some(why) = &st.failed {
            return Err(JournalError::Failed(why.clone()));
        }
        Ok(st)
    }

    /// Runs a mutation; if it fails after it may have changed memory or disk,
    /// the journal refuses further writes until it is reopened (which
    /// rebuilds everything from what is durable).
    fn mutate<T>(&self, f: impl FnOnce(&mut State) -> Result<T>) -> Result<T> {
        let mut st = self.write_state()?;
        let r = f(&mut st);
        if let Err(e) = &r {
            // The first failure is the cause; later ones only repeat it.
            if !is_refusal(e) && st.failed.is_none() {
                st.failed = Some(match e {
                    JournalError::Failed(cause) => cause.clone(),
                    e => e.to_string(),
                });
            }
        }
        r
    }

    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Removes the journal in `dir` for good; it must not be open. A
    /// journal in a shared chunk store is first marked as being removed
    /// there, so that a crash midway is finished when the store next opens,
    /// and its chunks no other journal uses become garbage.
    pub fn remove(dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        if !dir.exists() {
            return Ok(());
        }
        let lock = fsutil::lock_dir(dir)?;
        match read_meta(dir)?.and_then(|m| m.chunk_store) {
            Some(rel) => {
                let store = Store::shared(&dir.join(rel), JournalConfig::default().pack_bytes)?;
                store.remove_member(dir)?;
                drop(lock);
                if let Err(why) = store.collect_garbage(false)? {
                    tracing::info!("the removed journal's chunks are collected later: {why}");
                }
                Ok(())
            }
            None => {
                drop(lock);
                store::remove_journal_dir(dir)
            }
        }
    }

    /// Collects the chunk store's garbage now; with `all`, every pack
    /// holding any garbage is compacted (a scrub then finds no chunk that
    /// nothing references). A shared store refuses while one of its member
    /// journals is not open in this process. Returns the bytes reclaimed.
    pub fn collect_chunk_garbage(&self, all: bool) -> Result<u64> {
        let st = self.write_state()?;
        st.chunks.collect_garbage(all)?.map_err(|why| JournalError::Failed(format!("garbage not collected: {why}")))
    }

    /// The hashes of every chunk this journal references.
    pub fn referenced_chunks(&self) -> Result<HashSetOfBlocks> {
        let st = self.read_state()?;
        st.held_chunks().map(|c| st.chunks.hash_of(c)).collect()
    }

    /// Why the journal refuses writes until it is reopened, if it does.
    pub fn failure(&self) -> Option<String> {
        self.inner.state.read().ok().and_then(|st| st.failed.clone())
    }

    /// Adds a disk of `size` bytes (a multiple of 4 KiB); its replica starts
    /// as zeros.
    pub fn add_disk(&self, id: DiskId, size: u64) -> Result<()> {
        self.register_disk(id, size, None)
    }

    /// Adds a disk whose replica starts as a copy of `seed` (a pre-seeded
    /// disk: an earlier copy of the source brought to the recovery site).
    /// An initial sync then sends only the blocks that differ. Returns the
    /// disk's size.
    pub fn add_seeded_disk(&self, id: DiskId, seed: &Path) -> Result<u64> {
        let size = std::fs::metadata(seed).map_err(|e| JournalError::io("reading", seed, e))?.len();
        self.register_disk(id, size, Some(seed))?;
        Ok(size)
    }

    fn register_disk(&self, id: DiskId, size: u64, seed: Option<&Path>) -> Result<()> {
        if size == 0 || !size.is_multiple_of(BLOCK_SIZE as u64) {
            return Err(JournalError::InvalidWrite(format!(
                "disk size {size} is not a positive multiple of {BLOCK_SIZE}"
            )));
        }
        let dir = self.inner.dir.clone();
        self.mutate(|st| {
            if st.disk_ix.contains_key(&id) {
                return Err(JournalError::DiskExists(id));
            }
            let info = DiskInfo { id, size };
            // The replica is complete and durable before the metadata names
            // the disk; a crash in between leaves a file the next add
            // overwrites.
            let disk = match seed {
                None => open_replica(&dir, info, true)?,
                Some(seed) => {
                    let path = replica_path(&dir, id);
                    let tmp = path.with_extension("seeding");
                    std::fs::copy(seed, &tmp).map_err(|e| JournalError::io("copying the seed", &tmp, e))?;
                    File::open(&tmp).and_then(|f| f.sync_all()).map_err(|e| JournalError::io("syncing", &tmp, e))?;
                    std::fs::rename(&tmp, &path).map_err(|e| JournalError::io("renaming", &path, e))?;
                    fsutil::sync_dir(&dir.join("replica"))?;
                    open_replica(&dir, info, false)?
                }
            };
            st.meta.disks.push(info);
            st.write_meta(&dir)?;
            st.disk_ix.insert(id, st.disks.len() as u32);
            st.disks.push(disk);
            Ok(())
        })
    }

    /// The disks and their sizes now (after the newest logged resize).
    /// The replica file of `disk` (a promoted stack reads and writes it in
    /// place; nothing else may).
    pub fn replica_path(&self, disk: DiskId) -> Result<PathBuf> {
        let st = self.read_state()?;
        let d = st.disk(disk)?;
        Ok(st.disks[d as usize].replica_path.clone())
    }

    pub fn disks(&self) -> Result<Vec<DiskInfo>> {
        Ok(self.read_state()?.disks.iter().map(|d| DiskInfo { id: d.info.id, size: d.head_size() }).collect())
    }

    /// Ingests writes of one stream, in seq order. The whole batch is
    /// checked first and refused whole if any write is invalid. Returns the
    /// lsn of the last write; durable after the next [`Journal::sync`] or
    /// checkpoint.
    pub fn ingest(&self, stream: StreamId, writes: &[TapWrite<'_>]) -> Result<u64> {
        // Hash full blocks before taking the lock: it is most of the CPU.
        // Large batches are shared with the helpers, a run of blocks each,
        // hashed side by side (block_hash); zero blocks get no hash.
        let full: Vec<&[u8]> = writes.iter().flat_map(full_blocks).collect();
        let hashes: Vec<Option<Hash>> = par_map_parts(self.inner.pool.as_ref(), &full, hash_nonzero_blocks);
        self.ingest_hashed(stream, writes, &hashes, &[])
    }

    /// Which of `queries` the journal can supply without the bytes: the
    /// chunk store holds the hash, or (with `at_position`) the block's head
    /// content has it. A yes is re-checked at ingest, so a race with
    /// retention or compaction is an error, never wrong data.
    pub fn holds(&self, queries: &[BlockQuery]) -> Result<Vec<bool>> {
        let st = self.read_state()?;
        let mut scratch = vec![0u8; BLOCK_SIZE];
        queries
            .iter()
            .map(|q| {
                if st.chunks.lookup(&q.hash)?.is_some() {
                    return Ok(true);
                }
                if !q.at_position {
                    return Ok(false);
                }
                let d = st.disk(q.disk)?;
                if q.block >= st.disks[d as usize].head_size() / BLOCK_SIZE as u64 {
                    return Ok(false);
                }
                st.read_head(d, q.block, &mut scratch)?;
                Ok(chunks::hash_block(&scratch) == q.hash)
            })
            .collect()
    }

    /// Whether the chunk store holds each of `hashes` (the content alone,
    /// at any position): what another journal of the same VDSA asks before
    /// it borrows a block instead of receiving it.
    pub fn holds_chunks(&self, hashes: &[[u8; 32]]) -> Result<Vec<bool>> {
        let st = self.read_state()?;
        hashes.iter().map(|h| Ok(st.chunks.lookup(h)?.is_some())).collect()
    }

    /// Reads the block whose hash is `hash` from the chunk store into `out`
    /// (4 KiB), checked as every chunk read is; false if the store no
    /// longer holds it (collected since it was asked about).
    pub fn read_chunk(&self, hash: &[u8; 32], out: &mut [u8]) -> Result<bool> {
        let st = self.read_state()?;
        match st.chunks.lookup(hash)? {
            Some(id) => st.chunks.read(id, out).map(|()| true),
            None => Ok(false),
        }
    }

    /// Ingests replicated writes whose whole blocks come as [`WireBlock`]s,
    /// in the order of [`TapWrite`] data's aligned whole blocks. Sent blocks
    /// are not hashed again; a held block's bytes in `writes` are ignored.
    pub fn ingest_wire(&self, stream: StreamId, writes: &[TapWrite<'_>], blocks: &[WireBlock]) -> Result<u64> {
        let expected: usize = writes.iter().map(|w| full_blocks(w).count()).sum();
        if blocks.len() != expected {
            return Err(JournalError::InvalidWrite(format!(
                "{} block descriptions for {expected} whole blocks",
                blocks.len()
            )));
        }
        let hashes: Vec<Option<Hash>> = blocks
            .iter()
            .map(|b| match b {
                WireBlock::Zero => None,
                WireBlock::Sent { hash } | WireBlock::Held { hash } => Some(*hash),
            })
            .collect();
        let held: Vec<bool> = blocks.iter().map(|b| matches!(b, WireBlock::Held { .. })).collect();
        self.ingest_hashed(stream, writes, &hashes, &held)
    }

    fn ingest_hashed(
        &self,
        stream: StreamId,
        writes: &[TapWrite<'_>],
        hashes: &[Option<Hash>],
        held: &[bool],
    ) -> Result<u64> {
        let full: Vec<&[u8]> = writes.iter().flat_map(full_blocks).collect();
        let pool = self.inner.pool.as_ref();
        let level = self.inner.config.compression_level;
        self.mutate(|st| {
            st.validate(stream, writes)?;
            // Compress, in parallel, only blocks the store lacks (each
            // distinct one once) and that the sampling of misses says are
            // worth a try: the store is asked only about those, since a
            // look-up of a block not in the cache costs as much as storing
            // it. Indexed like `full`.
            let c = Compression { level, misses: &self.inner.compress_misses };
            let mut seen = HashSetOfBlocks::default();
            let new: Vec<usize> = hashes
                .iter()
                .enumerate()
                .filter_map(|(i, h)| h.map(|h| (i, h)))
                .filter(|(i, _)| !held.get(*i).copied().unwrap_or(false))
                .filter(|(_, h)| seen.insert(*h) && c.worth_trying() && !matches!(st.chunks.lookup(h), Ok(Some(_))))
                .map(|(i, _)| i)
                .collect();
            let mut compressed: Vec<Option<Vec<u8>>> = vec![None; full.len()];
            let done = par_map(pool, &new, |&i| c.compress(full[i]));
            for (&i, out) in new.iter().zip(done) {
                compressed[i] = out;
            }
            let found = st.capture_held(writes, hashes, held)?;
            let applied = st.apply_batch(stream, writes, hashes, held, &found, compressed);
            // The batch's versions hold their own references now.
            st.chunks.decref_all(found.pinned.into_values())?;
            applied
        })
    }

    /// Makes everything ingested so far durable (group commit). Returns the
    /// durable lsn.
    pub fn sync(&self) -> Result<u64> {
        self.mutate(|st| st.sync())
    }

    /// The stream's position now (last write's lsn and seq), to build a cut.
    pub fn stream_position(&self, stream: StreamId) -> Result<Option<Cut>> {
        let st = self.read_state()?;
        Ok(st
            .stream_ix
            .get(&stream)
            .and_then(|&s| st.stream_pos[s as usize].map(|p| Cut { stream, lsn: p.lsn, seq: p.seq })))
    }

    /// Records a checkpoint and makes it durable: when this returns Ok, the
    /// checkpoint and every write it contains survive a crash.
    pub fn mark_checkpoint(&self, spec: CheckpointSpec) -> Result<Checkpoint> {
        self.mutate(|st| st.mark_checkpoint(spec))
    }

    /// Retained checkpoints, oldest first (the oldest is the replica's).
    pub fn checkpoints(&self) -> Result<Vec<Checkpoint>> {
        Ok(self.read_state()?.checkpoints.values().cloned().collect())
    }

    /// Opens a read view at a retained checkpoint. It costs the same for any
    /// disk size and stays valid while retention runs.
    pub fn open_view(&self, id: CheckpointId) -> Result<PitView> {
        let mut st = self.write_state()?;
        let cp = st.checkpoints.get(&id).cloned().ok_or(JournalError::UnknownCheckpoint(id))?;
        let cuts = st.cutset(&cp);
        let view_id = st.next_view;
        st.next_view += 1;
        st.views.insert(
            view_id,
            ViewState { checkpoint: cp.clone(), cuts, preserved: HashMap::new(), sizes: HashMap::new() },
        );
        Ok(PitView::new(self.clone(), view_id, cp))
    }

    /// Reads the disk as the newest ingested writes left it (not only what
    /// a checkpoint holds): what a tap's own reads must see.
    pub fn read_head(&self, disk: DiskId, offset: u64, buf: &mut [u8]) -> Result<()> {
        let st = self.read_state()?;
        st.read_range(disk, &CutSet::everything(), &HashMap::new(), &HashMap::new(), offset, buf)
    }

    /// Bytes free for the journal on its file system (as an unprivileged
    /// writer sees them).
    pub fn free_bytes(&self) -> Result<u64> {
        fsutil::free_bytes(&self.inner.dir)
    }

    pub fn stats(&self) -> Result<JournalStats> {
        let st = self.read_state()?;
        let (live_chunks, stored_chunks, pack_bytes) = st.chunks.counts()?;
        Ok(JournalStats {
            head_lsn: st.head_lsn,
            durable_lsn: st.durable_lsn,
            disks: st.disks.len(),
            checkpoints: st.checkpoints.len(),
            index_versions: st.disks.iter().map(|d| d.index.len() as u64).sum(),
            live_chunks,
            stored_chunks,
            log_bytes: st.log.bytes(),
            pack_bytes,
            dedup_hits: st.dedup_hits,
            zero_blocks: st.zero_blocks,
            open_views: st.views.len(),
        })
    }
}

impl Drop for Inner {
    /// A clean close makes everything ingested durable, and gives a shared
    /// store back this journal's references.
    fn drop(&mut self) {
        let Ok(st) = self.state.get_mut() else { return };
        if st.failed.is_none() {
            if let Err(e) = st.sync() {
                tracing::error!(dir = %self.dir.display(), error = %e, "syncing the journal at close failed");
            }
        }
        if st.chunks.root().is_some() {
            // Every reference was counted before its version entered the
            // index and is given back after it left, so what the index
            // holds is never more than what was counted (a failure in
            // between leaks a count, never frees a chunk in use).
            let released = st.chunks.decref_all(st.held_chunks());
            st.chunks.detach(&self.dir, st.failed.is_none() && released.is_ok());
        }
    }
}

/// Reads the metadata (a new journal's is written first) and opens the
/// chunk store it names: its own, or the shared one (format 3), which
/// must list it as a member.
fn open_meta(dir: &Path, config: &JournalConfig) -> Result<(Meta, Arc<Store>)> {
    let path = dir.join(META_FILE);
    let meta = match read_meta(dir)? {
        Some(meta) => meta,
        None => {
            let mut meta = Meta {
                format: META_FORMAT,
                disks: Vec::new(),
                base: None,
                intent: None,
                promote: None,
                chunk_store: None,
            };
            if let Some(root) = &config.chunk_store {
                // Listed in the store before anything names it; a crash in
                // between leaves a member the store drops when it opens.
                let store = Store::shared(root, config.pack_bytes)?;
                store.add_member(dir)?;
                let root = store.root().unwrap_or(root);
                meta.format = META_FORMAT_SHARED_CHUNKS;
                meta.chunk_store = Some(store::relative_path(&store::canonical(dir)?, root));
            }
            write_meta_file(dir, &meta)?;
            meta
        }
    };
    let store = match (&meta.chunk_store, meta.format) {
        (None, META_FORMAT) => Store::private(&dir.join(migrate::PRIVATE_CHUNKS_DIR), config.pack_bytes)?,
        (Some(rel), META_FORMAT_SHARED_CHUNKS) => {
            let store = Store::shared(&dir.join(rel), config.pack_bytes)?;
            if !store.is_member(dir)? {
                return Err(JournalError::corrupt(
                    &path,
                    0,
                    format!("the chunk store {} does not list this journal as a member", dir.join(rel).display()),
                ));
            }
            // Left by a move into the store that a crash interrupted.
            migrate::remove_private_chunks(dir);
            store
        }
        (None, _) => return Err(JournalError::corrupt(&path, 0, "a format 3 journal that names no chunk store")),
        (Some(_), _) => return Err(JournalError::corrupt(&path, 0, "a format 2 journal that names a chunk store")),
    };
    Ok((meta, store))
}

/// Errors that refuse a request before anything changed.
fn is_refusal(e: &JournalError) -> bool {
    matches!(
        e,
        JournalError::UnknownDisk(_)
            | JournalError::DiskExists(_)
            | JournalError::OutOfRange { .. }
            | JournalError::InvalidWrite(_)
            | JournalError::SeqGap { .. }
            | JournalError::UnknownCheckpoint(_)
            | JournalError::CheckpointNotNewer { .. }
            | JournalError::InvalidCheckpoint(_)
            | JournalError::BadCut { .. }
            | JournalError::CutGoesBack { .. }
            | JournalError::BlockNotHeld { .. }
            | JournalError::ViewsOpen { .. }
    )
}

impl State {
    /// Stream positions, head and checkpoints as the base alone says: at
    /// open before the log is replayed, and after a promotion dropped the
    /// log.
    fn reset_to_base(&mut self) {
        self.checkpoints.clear();
        for pos in &mut self.stream_pos {
            *pos = None;
        }
        if let Some(base) = self.meta.base.clone() {
            for cut in &base.cuts {
                let s = self.intern(cut.stream);
                self.stream_pos[s as usize] = Some(cut.position());
            }
            self.head_lsn = base.lsn;
            self.base_cuts = self.cutset(&base);
            self.checkpoints.insert(base.id, base);
        }
    }

    fn intern(&mut self, stream: StreamId) -> u16 {
        if let Some(&s) = self.stream_ix.get(&stream) {
            return s;
        }
        let s = self.streams.len() as u16;
        self.streams.push(stream);
        self.stream_ix.insert(stream, s);
        self.stream_pos.push(None);
        s
    }

    fn cutset(&self, cp: &Checkpoint) -> CutSet {
        let mut by_stream = vec![cp.lsn; self.streams.len()];
        for cut in &cp.cuts {
            if let Some(&s) = self.stream_ix.get(&cut.stream) {
                by_stream[s as usize] = cut.lsn;
            }
        }
        CutSet::new(by_stream, cp.lsn)
    }

    fn write_meta(&self, dir: &Path) -> Result<()> {
        write_meta_file(dir, &self.meta)
    }

    fn disk(&self, id: DiskId) -> Result<u32> {
        self.disk_ix.get(&id).copied().ok_or(JournalError::UnknownDisk(id))
    }

    /// The block's content at the head of the journal, into `out`.
    fn read_head(&self, d: u32, block: u64, out: &mut [u8]) -> Result<()> {
        let disk = &self.disks[d as usize];
        match disk.index.head(block) {
            Some(v) if v.chunk == ZERO_CHUNK => {
                out.fill(0);
                Ok(())
            }
            Some(v) => self.chunks.read(v.chunk, out),
            None => read_replica(disk, block * BLOCK_SIZE as u64, out),
        }
    }

    fn sync(&mut self) -> Result<u64> {
        if self.durable_lsn < self.head_lsn {
            self.commit_records(&[Record::Commit { lsn: self.head_lsn }], None)?;
        }
        Ok(self.durable_lsn)
    }

    /// Group commit: makes everything ingested durable, and only then
    /// appends the commit-class `records` and makes them durable too. So a
    /// valid commit-class record on disk proves every record before it
    /// durable, whatever order the page cache wrote pages back in
    /// (`log::scan` relies on it after a power cut). Packs go first, so a
    /// durable record never names a chunk a crash could lose. (fsyncing
    /// packs and log at once on two threads measured no faster here.)
    /// `noted` is the lsn the records' segment must be kept for (see
    /// `SegmentSummary`), if any.
    pub(super) fn commit_records(&mut self, records: &[Record], noted: Option<u64>) -> Result<()> {
        let mut buf = Vec::new();
        for r in records {
            format::encode_record(r, &mut buf).map_err(JournalError::Failed)?;
        }
        self.chunks.sync()?;
        self.log.sync(&mut self.writer)?;
        let mut summary = SegmentSummary::default();
        if let Some(lsn) = noted {
            summary.note(lsn, None);
        }
        self.log.append(&buf, &summary);
        self.log.sync(&mut self.writer)?;
        self.durable_lsn = self.head_lsn;
        Ok(())
    }

    fn mark_checkpoint(&mut self, spec: CheckpointSpec) -> Result<Checkpoint> {
        format::check_checkpoint_name(&spec.name).map_err(JournalError::InvalidCheckpoint)?;
        if spec.cuts.len() > usize::from(u16::MAX) {
            return Err(JournalError::InvalidCheckpoint(format!(
                "{} cuts; a journal holds at most {} streams",
                spec.cuts.len(),
                u16::MAX
            )));
        }
        if let Some((&newest, _)) = self.checkpoints.iter().next_back() {
            if spec.id <= newest {
                return Err(JournalError::CheckpointNotNewer { id: spec.id, newest });
            }
        }
        let previous = self.checkpoints.values().next_back();
        let mut cuts = Vec::new();
        for cut in &spec.cuts {
            if cut.lsn > self.head_lsn {
                return Err(JournalError::BadCut { stream: cut.stream, lsn: cut.lsn, head: self.head_lsn });
            }
            if let Some(prev) = previous.and_then(|p| p.cuts.iter().find(|c| c.stream == cut.stream)) {
                if cut.lsn < prev.lsn {
                    return Err(JournalError::CutGoesBack { stream: cut.stream, lsn: cut.lsn, previous: prev.lsn });
                }
            }
            cuts.push(*cut);
        }
        // Streams the caller left out are cut where they are now, so that
        // the checkpoint records every stream's position (kept in the base
        // after retention has deleted the stream's records).
        for (ix, stream) in self.streams.iter().enumerate() {
            if let (Some(StreamPosition { lsn, seq }), false) =
                (self.stream_pos[ix], cuts.iter().any(|c| c.stream == *stream))
            {
                cuts.push(Cut { stream: *stream, lsn, seq });
            }
        }
        let cp = Checkpoint {
            id: spec.id,
            kind: spec.kind,
            name: spec.name,
            source_time_ms: spec.source_time_ms,
            lsn: self.head_lsn + 1,
            cuts,
        };
        self.head_lsn = cp.lsn;
        self.commit_records(&[Record::Checkpoint(cp.clone())], Some(cp.lsn))?;
        self.checkpoints.insert(cp.id, cp.clone());
        Ok(cp)
    }

    /// The chunk of every version in the index, one per reference it holds.
    fn indexed_chunks(&self) -> impl Iterator<Item = ChunkId> + '_ {
        self.disks.iter().flat_map(|d| d.index.iter()).map(|(_, _, v)| v.chunk).filter(|&c| index::is_stored(c))
    }

    /// Every reference this journal holds: its versions', and those of the
    /// blocks retention kept for its open views.
    fn held_chunks(&self) -> impl Iterator<Item = ChunkId> + '_ {
        let preserved = self.views.values().flat_map(|v| v.preserved.values().copied());
        self.indexed_chunks().chain(preserved.filter(|&c| c != ZERO_CHUNK))
    }

    /// Where `view` reads `block` of disk `d`.
    fn source_for(&self, d: u32, block: u64, view: &ViewState) -> Source {
        if let Some(&c) = view.preserved.get(&(d, block)) {
            return Source::Chunk(c);
        }
        match self.disks[d as usize].index.newest_visible(block, &view.cuts) {
            Some((_, v)) => Source::Chunk(v.chunk),
            None => Source::Replica,
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
