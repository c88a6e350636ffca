//! The content-addressed chunk store: each distinct 4 KiB block once, keyed
//! by its blake3 hash, zstd-compressed when that pays, appended to pack
//! files, reference counted, and compacted when packs fill with garbage.
//!
//! Packs are append-only. A chunk's bytes are made durable (pack fsync)
//! before any log record that names it is, so a durable record never points
//! at a chunk that a crash could lose.

use super::error::{JournalError, Result};
use super::fsutil;
use super::model::BLOCK_SIZE;
use super::pack_format::{
    entry_header, next_valid_entry, pack_header, parse_entry, CHUNK_HEADER_LEN, FLAG_ZSTD, PACK_HEADER_LEN,
};
pub use super::pack_format::{pack_path, Hash};
use super::pack_index::{self, IndexedChunk};
use super::writer::Writer;
use crate::direct_io::{AlignedVec, PaddedBuf, DIRECT_ALIGN};
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::hash::{BuildHasherDefault, Hasher};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Store compressed only if it saves at least an eighth of the block.
const COMPRESSED_LIMIT: usize = BLOCK_SIZE - BLOCK_SIZE / 8;
const FREE: u32 = u32::MAX;
/// `active` before the first insert after an open: pack numbers start at 1.
const NO_PACK: u32 = 0;

pub type ChunkId = u32;

/// The hash's own bytes are uniformly random; hashing them again is waste.
#[derive(Debug, Default)]
pub struct PrefixHasher(u64);

impl Hasher for PrefixHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes.iter().take(8) {
            self.0 = (self.0 << 8) | u64::from(b);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

type PrefixMap = HashMap<u64, ChunkId, BuildHasherDefault<PrefixHasher>>;

/// A set of block hashes, hashed by their own first bytes.
pub type HashSetOfBlocks = std::collections::HashSet<Hash, BuildHasherDefault<PrefixHasher>>;
/// A map keyed by block hashes, hashed by their own first bytes.
pub type HashMapOfBlocks<V> = HashMap<Hash, V, BuildHasherDefault<PrefixHasher>>;

/// Where one chunk lives. 48 bytes: the catalog is the store's only
/// per-chunk memory besides the 12-byte prefix map entry.
#[derive(Debug, Clone)]
struct ChunkEntry {
    hash: Hash,
    pack: u32,
    /// Offset of the chunk's header in its pack.
    offset: u32,
    stored_len: u16,
    refs: u32,
}

#[derive(Debug)]
struct Pack {
    file: Arc<File>,
    /// The active pack's descriptor opened with `O_DIRECT`, which the
    /// writer appends through (none where the filesystem refuses it, and
    /// for sealed packs).
    direct: Option<Arc<File>>,
    path: PathBuf,
    /// Bytes in the file (for the active pack: written, not pending).
    len: u64,
    live_bytes: u64,
}

/// A buffer of entries handed to the writer.
#[derive(Debug)]
struct Inflight {
    pack: u32,
    /// The pack offset of the first entry byte (after the prefix).
    offset: u64,
    data: Arc<PaddedBuf>,
    /// Bytes before the first entry: the file's bytes from a block boundary.
    prefix: usize,
    /// The writer's sequence number for it.
    seq: u64,
}

impl Inflight {
    fn entries(&self) -> &[u8] {
        &self.data.as_slice()[self.prefix..]
    }
}

/// A block made ready for the store outside the journal's lock.
#[derive(Debug)]
pub struct PreparedChunk {
    pub hash: Hash,
    /// The zstd frame, when compression saved enough.
    pub compressed: Option<Vec<u8>>,
}

#[derive(Debug)]
pub struct ChunkStore {
    dir: PathBuf,
    catalog: Vec<ChunkEntry>,
    free_ids: Vec<ChunkId>,
    by_prefix: PrefixMap,
    /// Chunks whose 8-byte prefix collides with another's; almost always empty.
    overflow: HashMap<Hash, ChunkId>,
    packs: BTreeMap<u32, Pack>,
    active: u32,
    /// Entries appended to the active pack but not yet handed to the
    /// writer, after `pending_prefix` bytes the pack's file already holds.
    pending: AlignedVec,
    /// For a pack written with `O_DIRECT`: its bytes from the last block
    /// boundary to its length, at the start of `pending`, so that the
    /// buffer is written as it is from that boundary on (a direct write
    /// starts on one). Zero for a pack written through the page cache.
    pending_prefix: usize,
    /// Buffers handed to the writer, readable here until it wrote them.
    inflight: Vec<Inflight>,
    /// Written buffers kept for reuse (fresh ones cost page faults).
    spare: Vec<AlignedVec>,
    unsynced: Vec<u32>,
    dir_dirty: bool,
    pack_bytes: u64,
    live_chunks: u64,
    /// The active pack's entries in pack order: its index once sealed.
    active_index: Vec<IndexedChunk>,
    /// Sealed packs whose index is written at the next sync, after the
    /// pack's own fsync: (pack, length, entries).
    sealed: Vec<(u32, u64, Vec<IndexedChunk>)>,
}

fn prefix(hash: &Hash) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&hash[..8]);
    u64::from_le_bytes(a)
}

/// zstd at `level`, if that saves at least an eighth of the block. Each
/// thread keeps its own context: creating one costs more than compressing
/// a block.
pub fn compress_block(block: &[u8], level: i32) -> Option<Vec<u8>> {
    COMPRESSOR.with(|c| {
        let mut c = c.borrow_mut();
        if c.as_ref().is_none_or(|(l, _)| *l != level) {
            *c = zstd::bulk::Compressor::new(level).ok().map(|z| (level, z));
        }
        let (_, z) = c.as_mut()?;
        let mut out = vec![0u8; COMPRESSED_LIMIT];
        let n = z.compress_to_buffer(block, &mut out[..]).ok()?;
        out.truncate(n);
        Some(out)
    })
}

pub fn hash_block(block: &[u8]) -> Hash {
    *blake3::hash(block).as_bytes()
}

thread_local! {
    static COMPRESSOR: RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> = const { RefCell::new(None) };
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
}

/// The hashes of the chunks stored in the packs of `dir`, read from the
/// files alone (no catalog, no index): what a scrub compares with what the
/// journals reference. A pack is read up to its first damaged entry.
pub fn stored_chunk_hashes(dir: &Path) -> Result<HashSetOfBlocks> {
    let mut out = HashSetOfBlocks::default();
    for no in fsutil::numbered_files(dir, "pack")? {
        let no =
            u32::try_from(no).map_err(|_| JournalError::corrupt(pack_path(dir, 0), 0, "pack number out of range"))?;
        let path = pack_path(dir, no);
        let bytes = std::fs::read(&path).map_err(|e| JournalError::io("reading", &path, e))?;
        let mut pos = PACK_HEADER_LEN;
        while pos < bytes.len() {
            let Ok((hash, _flags, stored_len)) = parse_entry(&bytes[pos..]) else { break };
            out.insert(hash);
            pos += CHUNK_HEADER_LEN + stored_len;
        }
    }
    Ok(out)
}

impl ChunkStore {
    /// Opens (or creates) the store in `dir`, rebuilding the catalog from the
    /// packs. A pack that holds nothing is removed, a torn tail is cut and
    /// damaged entries between good ones are passed over (see `load_pack`);
    /// a bad header is corruption.
    pub fn open(dir: &Path, pack_bytes: u64) -> Result<ChunkStore> {
        fsutil::create_dir(dir)?;
        let mut store = ChunkStore {
            dir: dir.to_path_buf(),
            catalog: Vec::new(),
            free_ids: Vec::new(),
            by_prefix: PrefixMap::default(),
            overflow: HashMap::new(),
            packs: BTreeMap::new(),
            active: 0,
            pending: AlignedVec::default(),
            pending_prefix: 0,
            inflight: Vec::new(),
            spare: Vec::new(),
            unsynced: Vec::new(),
            dir_dirty: false,
            pack_bytes: pack_bytes.clamp(64 << 10, 1 << 30),
            live_chunks: 0,
            active_index: Vec::new(),
            sealed: Vec::new(),
        };
        let numbers = fsutil::numbered_files(dir, "pack")?;
        for no in numbers {
            let no32 = u32::try_from(no)
                .map_err(|_| JournalError::corrupt(pack_path(dir, 0), 0, "pack number out of range"))?;
            store.load_pack(no32)?;
        }
        // An index whose pack is gone (removed between the two, or a
        // leftover temporary file) is removed.
        for no in fsutil::numbered_files(dir, "idx")? {
            match u32::try_from(no) {
                Ok(no) if store.packs.contains_key(&no) => {}
                Ok(no) => pack_index::remove(dir, no)?,
                Err(_) => {}
            }
        }
        // The next pack is created at the first insert: opening writes
        // nothing, so a journal on a full disk still opens.
        store.active = NO_PACK;
        Ok(store)
    }

    fn load_pack(&mut self, no: u32) -> Result<()> {
        if self.load_indexed_pack(no)? {
            return Ok(());
        }
        let path = pack_path(&self.dir, no);
        let bytes = std::fs::read(&path).map_err(|e| JournalError::io("reading", &path, e))?;
        if bytes.len() < PACK_HEADER_LEN {
            if bytes.iter().all(|&b| b == 0) {
                // Created, header never made durable: nothing in it was
                // either (a pack's header is synced before any entry).
                tracing::warn!(path = %path.display(), "removing a chunk pack that holds nothing");
                std::fs::remove_file(&path).map_err(|e| JournalError::io("removing empty pack", &path, e))?;
                self.dir_dirty = true;
                return Ok(());
            }
            return Err(JournalError::corrupt(&path, 0, "pack shorter than its header"));
        }
        let header = pack_header(no);
        if bytes[..8] != header[..8] {
            return Err(JournalError::corrupt(&path, 0, "bad pack magic"));
        }
        if bytes[..PACK_HEADER_LEN] != header[..] {
            return Err(JournalError::corrupt(&path, 0, "pack header does not match its file name or checksum"));
        }
        let mut pos = PACK_HEADER_LEN;
        let mut index = Vec::new();
        while pos < bytes.len() {
            match parse_entry(&bytes[pos..]) {
                Ok((hash, _flags, stored_len)) => {
                    let total = CHUNK_HEADER_LEN + stored_len;
                    index.push(IndexedChunk { hash, offset: pos as u32, stored_len: stored_len as u16 });
                    if self.lookup(&hash).is_none() {
                        let offset = u32::try_from(pos)
                            .map_err(|_| JournalError::corrupt(&path, pos as u64, "pack larger than 4 GiB"))?;
                        self.add_entry(ChunkEntry { hash, pack: no, offset, stored_len: stored_len as u16, refs: 0 });
                    }
                    pos += total;
                }
                Err(reason) => match next_valid_entry(&bytes, pos + 1) {
                    // Pages of a pack reach the disk in any order before its
                    // fsync, so after a power cut entries that were never
                    // durable can be missing between good ones. They are
                    // passed over: a durable log record that names one of
                    // them is reported by the replay (MissingChunk).
                    Some(next) => {
                        tracing::warn!(path = %path.display(), offset = pos, %reason, "passing over a damaged chunk entry");
                        pos = next;
                    }
                    None => {
                        tracing::warn!(path = %path.display(), offset = pos, %reason, "cutting torn tail of chunk pack");
                        fsutil::truncate(&path, pos as u64)?;
                        break;
                    }
                },
            }
        }
        let file = File::open(&path).map_err(|e| JournalError::io("opening", &path, e))?;
        // What survived a kill may not have been synced yet.
        file.sync_data().map_err(|e| JournalError::io("syncing", &path, e))?;
        let len = pos.min(bytes.len()) as u64;
        self.packs.insert(no, Pack { file: Arc::new(file), direct: None, path, len, live_bytes: 0 });
        // Every pack is sealed at open (the next insert starts a new one)
        // and now synced: a journal written before pack indexes gets them
        // here, once. Best effort: opening must work on a full disk.
        if let Err(e) = pack_index::write(&self.dir, no, len, &index) {
            tracing::warn!(pack = no, "could not write the pack's index (it is scanned at the next open): {e}");
        }
        Ok(())
    }

    /// Loads a pack from its index, reading only the pack's header. False
    /// when it has no usable index.
    fn load_indexed_pack(&mut self, no: u32) -> Result<bool> {
        let path = pack_path(&self.dir, no);
        let file = File::open(&path).map_err(|e| JournalError::io("opening", &path, e))?;
        let len = file.metadata().map_err(|e| JournalError::io("reading the size of", &path, e))?.len();
        let mut header = [0u8; PACK_HEADER_LEN];
        if len < PACK_HEADER_LEN as u64 || file.read_exact_at(&mut header, 0).is_err() || header != pack_header(no) {
            return Ok(false); // the scan names the problem
        }
        let Some(entries) = pack_index::read(&self.dir, no, len)? else {
            return Ok(false);
        };
        for e in &entries {
            if self.lookup(&e.hash).is_none() {
                self.add_entry(ChunkEntry {
                    hash: e.hash,
                    pack: no,
                    offset: e.offset,
                    stored_len: e.stored_len,
                    refs: 0,
                });
            }
        }
        self.packs.insert(no, Pack { file: Arc::new(file), direct: None, path, len, live_bytes: 0 });
        Ok(true)
    }

    /// Creates the pack after the newest and makes it the active one.
    fn start_pack(&mut self) -> Result<()> {
        self.active = self.packs.keys().next_back().map_or(1, |n| n + 1);
        let path = pack_path(&self.dir, self.active);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| JournalError::io("creating", &path, e))?;
        // Header and directory entry are durable before any entry goes in.
        file.write_all_at(&pack_header(self.active), 0)
            .and_then(|()| file.sync_data())
            .map_err(|e| JournalError::io("writing the header of", &path, e))?;
        fsutil::sync_dir(&self.dir)?;
        let direct = open_direct(&path);
        self.pending.clear();
        self.pending_prefix = 0;
        if direct.is_some() {
            self.pending.extend_from_slice(&pack_header(self.active));
            self.pending_prefix = PACK_HEADER_LEN;
        }
        let pack = Pack { file: Arc::new(file), direct, path, len: PACK_HEADER_LEN as u64, live_bytes: 0 };
        self.packs.insert(self.active, pack);
        Ok(())
    }

    fn add_entry(&mut self, entry: ChunkEntry) -> ChunkId {
        let hash = entry.hash;
        let id = match self.free_ids.pop() {
            Some(id) => {
                self.catalog[id as usize] = entry;
                id
            }
            None => {
                self.catalog.push(entry);
                (self.catalog.len() - 1) as ChunkId
            }
        };
        let p = prefix(&hash);
        if let std::collections::hash_map::Entry::Vacant(e) = self.by_prefix.entry(p) {
            e.insert(id);
        } else {
            self.overflow.insert(hash, id);
        }
        id
    }

    fn remove_entry(&mut self, id: ChunkId) {
        let hash = self.catalog[id as usize].hash;
        let p = prefix(&hash);
        if self.by_prefix.get(&p) == Some(&id) {
            self.by_prefix.remove(&p);
            // Promote a colliding chunk, if any, so lookups by prefix find it.
            if let Some((&h, &other)) = self.overflow.iter().find(|(h, _)| prefix(h) == p) {
                self.overflow.remove(&h);
                self.by_prefix.insert(p, other);
            }
        } else {
            self.overflow.remove(&hash);
        }
        let e = &mut self.catalog[id as usize];
        e.pack = FREE;
        e.refs = 0;
        self.free_ids.push(id);
    }

    /// The id of the chunk with this hash, if the store holds it (live or
    /// garbage not yet collected).
    pub fn lookup(&self, hash: &Hash) -> Option<ChunkId> {
        let id = *self.by_prefix.get(&prefix(hash))?;
        if &self.catalog[id as usize].hash == hash {
            return Some(id);
        }
        self.overflow.get(hash).copied()
    }

    pub fn hash_of(&self, id: ChunkId) -> Hash {
        self.catalog[id as usize].hash
    }

    /// Appends a new chunk (its hash must not be in the store) with no
    /// references yet.
    pub fn insert(&mut self, block: &[u8], prepared: &PreparedChunk, w: &mut Writer) -> Result<ChunkId> {
        let offset = self.next_offset(w)?;
        let (flags, stored): (u8, &[u8]) = match &prepared.compressed {
            Some(c) => (FLAG_ZSTD, c),
            None => (0, block),
        };
        self.pending.reserve(CHUNK_HEADER_LEN + stored.len());
        self.pending.extend_from_slice(&entry_header(&prepared.hash, flags, stored));
        self.pending.extend_from_slice(stored);
        self.active_index.push(IndexedChunk { hash: prepared.hash, offset, stored_len: stored.len() as u16 });
        Ok(self.add_entry(ChunkEntry {
            hash: prepared.hash,
            pack: self.active,
            offset,
            stored_len: stored.len() as u16,
            refs: 0,
        }))
    }

    /// Where the next entry goes in the active pack, after rolling to a new
    /// pack if this one is full.
    fn next_offset(&mut self, w: &mut Writer) -> Result<u32> {
        match self.packs.get(&self.active) {
            Some(p) if p.len + self.pending_len() as u64 >= self.pack_bytes => self.roll_pack(w)?,
            Some(_) => {}
            None => self.start_pack()?,
        }
        let offset = self.packs.get(&self.active).map_or(0, |p| p.len) + self.pending_len() as u64;
        u32::try_from(offset).map_err(|_| JournalError::InvalidWrite("pack offset overflow".into()))
    }

    fn roll_pack(&mut self, w: &mut Writer) -> Result<()> {
        self.flush_pending(w)?;
        if let Some(p) = self.packs.get_mut(&self.active) {
            p.direct = None;
            self.sealed.push((self.active, p.len, std::mem::take(&mut self.active_index)));
        }
        self.start_pack()
    }

    /// Bytes of entries not yet handed to the writer.
    pub fn pending_len(&self) -> usize {
        self.pending.len() - self.pending_prefix
    }

    /// Hands pending entries to the writer for the active pack (no fsync).
    pub fn flush_pending(&mut self, w: &mut Writer) -> Result<()> {
        self.reclaim(w.completed()?);
        if self.pending_len() == 0 {
            return Ok(());
        }
        let Some(pack) = self.packs.get_mut(&self.active) else {
            return Ok(());
        };
        let prefix = self.pending_prefix;
        let len = (self.pending.len() - prefix) as u64;
        // Spare buffers come back emptied (`into_empty`).
        let mut fresh = self.spare.pop().unwrap_or_default();
        self.pending_prefix = 0;
        if pack.direct.is_some() {
            // The next buffer starts at the block boundary before the new
            // end of the pack, with the bytes from there on.
            let r = ((pack.len + len) % DIRECT_ALIGN as u64) as usize;
            let content = self.pending.as_slice();
            fresh.extend_from_slice(&content[content.len() - r..]);
            self.pending_prefix = r;
        }
        let data = Arc::new(std::mem::replace(&mut self.pending, fresh).into_padded());
        let seq = match &pack.direct {
            Some(direct) => w.submit_direct(direct, &pack.path, pack.len - prefix as u64, data.clone())?,
            None => w.submit_pack(&pack.file, &pack.path, pack.len, data.clone())?,
        };
        self.inflight.push(Inflight { pack: self.active, offset: pack.len, data, prefix, seq });
        pack.len += len;
        if !self.unsynced.contains(&self.active) {
            self.unsynced.push(self.active);
        }
        Ok(())
    }

    /// Forgets in-flight buffers the writer has written, keeping them for reuse.
    fn reclaim(&mut self, completed: u64) {
        let (done, waiting): (Vec<Inflight>, Vec<Inflight>) =
            std::mem::take(&mut self.inflight).into_iter().partition(|b| b.seq <= completed);
        self.inflight = waiting;
        for b in done {
            if let Ok(buf) = Arc::try_unwrap(b.data) {
                if self.spare.len() < super::writer::QUEUE_DEPTH {
                    self.spare.push(buf.into_empty());
                }
            }
        }
    }

    /// Makes every chunk inserted so far durable.
    pub fn sync(&mut self, w: &mut Writer) -> Result<()> {
        self.flush_pending(w)?;
        w.drain()?;
        self.sync_files(w)
    }

    /// fsync of the packs written since the last sync, once the writer has
    /// written them (the caller drained it).
    pub fn sync_files(&mut self, w: &Writer) -> Result<()> {
        self.reclaim(w.completed()?);
        // A sealed pack's last direct write was padded to a block boundary:
        // the padding is cut before the fsync, so that the index written
        // after it covers the file exactly.
        for (no, len, _) in &self.sealed {
            if let Some(p) = self.packs.get(no) {
                cut_padding(p, *len)?;
            }
        }
        for no in std::mem::take(&mut self.unsynced) {
            if let Some(p) = self.packs.get(&no) {
                p.file.sync_data().map_err(|e| JournalError::io("syncing", &p.path, e))?;
            }
        }
        if std::mem::take(&mut self.dir_dirty) {
            fsutil::sync_dir(&self.dir)?;
        }
        // The sealed packs were among those just synced.
        for (no, len, entries) in std::mem::take(&mut self.sealed) {
            if self.packs.contains_key(&no) {
                if let Err(e) = pack_index::write(&self.dir, no, len, &entries) {
                    tracing::warn!(pack = no, "could not write the pack's index (it is scanned at the next open): {e}");
                }
            }
        }
        Ok(())
    }

    /// Cuts the active pack's padding after its last direct write, when
    /// the store closes (the caller drained the writer). Best effort: a
    /// pack left padded has its zeros cut as a torn tail at the next open.
    pub fn cut_active_padding(&self) {
        if let Some(p) = self.packs.get(&self.active).filter(|p| p.direct.is_some()) {
            if let Err(e) = cut_padding(p, p.len) {
                tracing::warn!("{e}");
            }
        }
    }

    fn entry_bytes(e: &ChunkEntry) -> u64 {
        (CHUNK_HEADER_LEN + e.stored_len as usize) as u64
    }

    pub fn incref(&mut self, id: ChunkId) {
        let e = &mut self.catalog[id as usize];
        e.refs += 1;
        if e.refs == 1 {
            let bytes = Self::entry_bytes(e);
            if let Some(p) = self.packs.get_mut(&e.pack) {
                p.live_bytes += bytes;
            }
            self.live_chunks += 1;
        }
    }

    pub fn decref(&mut self, id: ChunkId) {
        let e = &mut self.catalog[id as usize];
        debug_assert!(e.refs > 0, "decref of an unreferenced chunk");
        e.refs = e.refs.saturating_sub(1);
        if e.refs == 0 {
            let bytes = Self::entry_bytes(e);
            if let Some(p) = self.packs.get_mut(&e.pack) {
                p.live_bytes = p.live_bytes.saturating_sub(bytes);
            }
            self.live_chunks -= 1;
        }
    }

    /// Reads a chunk's 4 KiB into `out`, checking its checksum.
    pub fn read(&self, id: ChunkId, out: &mut [u8]) -> Result<()> {
        let e = &self.catalog[id as usize];
        let Some(pack) = self.packs.get(&e.pack) else {
            return Err(JournalError::corrupt(&self.dir, 0, format!("chunk {id} has no pack")));
        };
        let total = CHUNK_HEADER_LEN + e.stored_len as usize;
        let mut stack = [0u8; CHUNK_HEADER_LEN + BLOCK_SIZE];
        let buf = &mut stack[..total];
        let off = u64::from(e.offset);
        if let Some(bytes) = self.in_memory(e.pack, off, total) {
            buf.copy_from_slice(bytes);
        } else {
            pack.file.read_exact_at(buf, off).map_err(|err| JournalError::io("reading", &pack.path, err))?;
        }
        self.decode(id, &pack.path, off, buf, out)
    }

    /// The bytes at `off..off + len` of pack `pack_no` if they have not
    /// reached its file yet: still pending, or handed to the writer.
    fn in_memory(&self, pack_no: u32, off: u64, len: usize) -> Option<&[u8]> {
        let (data, start) = self.buffer_at(pack_no, off)?;
        data.get((off - start) as usize..(off - start) as usize + len)
    }

    /// The in-memory buffer holding byte `off` of pack `pack_no`, if any,
    /// and the pack offset where that buffer starts.
    fn buffer_at(&self, pack_no: u32, off: u64) -> Option<(&[u8], u64)> {
        let file_len = self.packs.get(&pack_no)?.len;
        if pack_no == self.active && off >= file_len {
            return Some((&self.pending.as_slice()[self.pending_prefix..], file_len));
        }
        self.inflight
            .iter()
            .find(|b| b.pack == pack_no && off >= b.offset && off < b.offset + b.entries().len() as u64)
            .map(|b| (b.entries(), b.offset))
    }

    /// Reads several chunks, each into `out[at..at + BLOCK_SIZE]`. Entries
    /// that lie next to each other in a pack are read with one call.
    pub fn read_many(&self, reqs: &[(ChunkId, usize)], out: &mut [u8]) -> Result<()> {
        let mut order: Vec<(u32, u64, usize, ChunkId, usize)> = reqs
            .iter()
            .map(|&(id, at)| {
                let e = &self.catalog[id as usize];
                (e.pack, u64::from(e.offset), CHUNK_HEADER_LEN + e.stored_len as usize, id, at)
            })
            .collect();
        order.sort_unstable_by_key(|r| (r.0, r.1));
        // Where each entry's bytes are now: a run is read in one piece only
        // if all of it is in the same place (the file, or one buffer).
        let place = |pack_no: u32, off: u64| self.buffer_at(pack_no, off).map(|(_, start)| start);
        let mut scratch = Vec::new();
        let mut i = 0;
        while i < order.len() {
            let (pack_no, start, _, _, _) = order[i];
            let here = place(pack_no, start);
            let mut j = i;
            let mut end = start;
            while j < order.len()
                && order[j].0 == pack_no
                && order[j].1 == end
                && end - start < (1 << 20)
                && place(pack_no, end) == here
            {
                end += order[j].2 as u64;
                j += 1;
            }
            let Some(pack) = self.packs.get(&pack_no) else {
                return Err(JournalError::corrupt(&self.dir, start, format!("pack {pack_no} is missing")));
            };
            let bytes = match self.in_memory(pack_no, start, (end - start) as usize) {
                Some(bytes) => bytes,
                None => {
                    scratch.resize((end - start) as usize, 0);
                    pack.file
                        .read_exact_at(&mut scratch, start)
                        .map_err(|err| JournalError::io("reading", &pack.path, err))?;
                    &scratch[..]
                }
            };
            for &(_, off, total, id, at) in &order[i..j] {
                let k = (off - start) as usize;
                self.decode(id, &pack.path, off, &bytes[k..k + total], &mut out[at..at + BLOCK_SIZE])?;
            }
            i = j;
        }
        Ok(())
    }

    /// Checks one entry's bytes against the catalog and unpacks its block.
    fn decode(&self, id: ChunkId, path: &Path, off: u64, buf: &[u8], out: &mut [u8]) -> Result<()> {
        let e = &self.catalog[id as usize];
        let (hash, flags, stored_len) = parse_entry(buf).map_err(|reason| JournalError::corrupt(path, off, reason))?;
        if hash != e.hash || stored_len != e.stored_len as usize {
            return Err(JournalError::corrupt(path, off, "chunk entry does not match the catalog"));
        }
        let stored = &buf[CHUNK_HEADER_LEN..CHUNK_HEADER_LEN + stored_len];
        if flags & FLAG_ZSTD == 0 {
            out.copy_from_slice(stored);
            return Ok(());
        }
        let n = DECOMPRESSOR.with(|d| {
            let mut d = d.borrow_mut();
            if d.is_none() {
                *d = zstd::bulk::Decompressor::new().ok();
            }
            match d.as_mut() {
                Some(d) => d.decompress_to_buffer(stored, out).map_err(|e| e.to_string()),
                None => Err("cannot create a zstd decompressor".to_string()),
            }
        });
        match n {
            Ok(n) if n == out.len() => Ok(()),
            Ok(n) => Err(JournalError::corrupt(path, off, format!("chunk decompressed to {n} bytes"))),
            Err(reason) => Err(JournalError::corrupt(path, off, format!("chunk does not decompress: {reason}"))),
        }
    }

    /// Drops garbage: deletes packs with nothing live and copies the live
    /// chunks of mostly-dead packs (with `all`, of every pack holding any
    /// garbage, the active one included) into the active pack. The copies
    /// are made durable before an old pack is deleted. Returns bytes
    /// reclaimed.
    pub fn collect_garbage(&mut self, w: &mut Writer, all: bool) -> Result<u64> {
        let has_garbage = |p: &Pack| p.live_bytes + (PACK_HEADER_LEN as u64) < p.len;
        if all && self.packs.get(&self.active).is_some_and(has_garbage) {
            self.roll_pack(w)?;
        }
        self.sync(w)?; // victims are read from their files below
        let victims: Vec<u32> = self
            .packs
            .iter()
            .filter(|(&no, p)| no != self.active && (p.live_bytes * 2 < p.len || (all && has_garbage(p))))
            .map(|(&no, _)| no)
            .collect();
        if victims.is_empty() {
            return Ok(0);
        }
        let mut moved = Vec::new();
        for id in 0..self.catalog.len() as ChunkId {
            let e = &self.catalog[id as usize];
            if e.pack == FREE || !victims.contains(&e.pack) {
                continue;
            }
            if e.refs == 0 {
                self.remove_entry(id);
            } else {
                moved.push(id);
            }
        }
        for &id in &moved {
            // Re-store the stored bytes as they are (no recompression).
            let e = self.catalog[id as usize].clone();
            let pack = &self.packs[&e.pack];
            let total = CHUNK_HEADER_LEN + e.stored_len as usize;
            let mut raw = vec![0u8; total];
            pack.file
                .read_exact_at(&mut raw, u64::from(e.offset))
                .map_err(|err| JournalError::io("reading", &pack.path, err))?;
            parse_entry(&raw).map_err(|reason| JournalError::corrupt(&pack.path, u64::from(e.offset), reason))?;
            let offset = self.next_offset(w)?;
            self.pending.extend_from_slice(&raw);
            self.active_index.push(IndexedChunk { hash: e.hash, offset, stored_len: e.stored_len });
            let bytes = total as u64;
            if let Some(p) = self.packs.get_mut(&e.pack) {
                p.live_bytes = p.live_bytes.saturating_sub(bytes);
            }
            if let Some(p) = self.packs.get_mut(&self.active) {
                p.live_bytes += bytes;
            }
            let entry = &mut self.catalog[id as usize];
            entry.pack = self.active;
            entry.offset = offset;
        }
        self.sync(w)?;
        let mut reclaimed = 0;
        for no in victims {
            if let Some(p) = self.packs.remove(&no) {
                reclaimed += p.len;
                // The index first: an index never outlives its pack.
                pack_index::remove(&self.dir, no)?;
                std::fs::remove_file(&p.path).map_err(|e| JournalError::io("removing", &p.path, e))?;
            }
        }
        fsutil::sync_dir(&self.dir)?;
        Ok(reclaimed)
    }

    /// Bytes of pack files (including pending).
    pub fn bytes(&self) -> u64 {
        self.packs.values().map(|p| p.len).sum::<u64>() + self.pending_len() as u64
    }

    /// Bytes of pack entries that something still references.
    pub fn live_bytes(&self) -> u64 {
        self.packs.values().map(|p| p.live_bytes).sum()
    }

    /// Bytes of the distinct chunks among `ids` (each counted once), as
    /// stored in their packs.
    pub fn bytes_of_distinct(&self, ids: impl Iterator<Item = ChunkId>) -> u64 {
        let mut seen = vec![0u64; self.catalog.len().div_ceil(64)];
        let mut total = 0;
        for id in ids {
            let Some(e) = self.catalog.get(id as usize) else { continue };
            let (word, bit) = (id as usize / 64, 1u64 << (id % 64));
            if e.pack != FREE && seen[word] & bit == 0 {
                seen[word] |= bit;
                total += Self::entry_bytes(e);
            }
        }
        total
    }

    pub fn live_chunks(&self) -> u64 {
        self.live_chunks
    }

    pub fn stored_chunks(&self) -> u64 {
        (self.catalog.len() - self.free_ids.len()) as u64
    }
}

/// The pack file opened again with `O_DIRECT`, for appends that skip the
/// page cache (docs/journal-format.md, "Direct writes"); None where the
/// filesystem has no direct I/O (tmpfs), and then appends go through the
/// page cache.
fn open_direct(path: &Path) -> Option<Arc<File>> {
    match crate::direct_io::open_write(path) {
        Ok(f) => Some(Arc::new(f)),
        Err(e) => {
            tracing::debug!(path = %path.display(), "no direct I/O for the pack: {e}");
            None
        }
    }
}

/// Cuts a pack file longer than `len` (the zeros after a direct write).
fn cut_padding(p: &Pack, len: u64) -> Result<()> {
    let on_disk = p.file.metadata().map_err(|e| JournalError::io("reading the length of", &p.path, e))?.len();
    if on_disk > len {
        p.file.set_len(len).map_err(|e| JournalError::io("cutting the padding of", &p.path, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, RngCore, SeedableRng};

    /// Entries appended through the aligned pending buffer (direct writes
    /// where the filesystem has them) read back from every place they can
    /// be: the pending buffer, a buffer the writer holds, the file; and
    /// again after the store is closed and opened, with every pack exactly
    /// as long as its entries (no padding left).
    #[test]
    fn chunks_read_back_from_pending_buffers_the_writer_and_the_file_and_after_reopen() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| JournalError::Failed(e.to_string()))?;
        let seed = rand::random::<u64>();
        println!("seed {seed}");
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut blocks: Vec<(ChunkId, Vec<u8>)> = Vec::new();
        {
            let mut store = ChunkStore::open(dir.path(), 64 << 10)?;
            let mut w = Writer::start()?;
            for i in 0..400 {
                let mut block = vec![0u8; BLOCK_SIZE];
                if i % 3 == 0 {
                    // Compressible: a shorter entry, so that entries end
                    // anywhere within a block boundary.
                    block[..rng.gen_range(1..600)].iter_mut().for_each(|b| *b = rng.gen());
                } else {
                    rng.fill_bytes(&mut block);
                }
                let prepared = PreparedChunk { hash: hash_block(&block), compressed: compress_block(&block, 1) };
                let id = store.insert(&block, &prepared, &mut w)?;
                store.incref(id);
                blocks.push((id, block));
                match rng.gen_range(0..10) {
                    0..=2 => store.flush_pending(&mut w)?,
                    3 => store.sync(&mut w)?,
                    _ => {}
                }
                // Any earlier block, wherever its bytes are now.
                let (id, want) = &blocks[rng.gen_range(0..blocks.len())];
                let mut out = vec![0u8; BLOCK_SIZE];
                store.read(*id, &mut out)?;
                assert_eq!(&out, want, "block {id} read back while being written");
            }
            // Where the filesystem has no direct I/O (tmpfs) the same
            // buffers go through the page cache.
            println!("direct writes: {}", store.packs.get(&store.active).is_some_and(|p| p.direct.is_some()));
            store.sync(&mut w)?;
            w.drain()?;
            store.cut_active_padding();
        }
        let store = ChunkStore::open(dir.path(), 64 << 10)?;
        assert!(store.packs.len() > 10, "the test rolled too few packs: {}", store.packs.len());
        for (id, want) in &blocks {
            let found = store.lookup(&hash_block(want)).ok_or_else(|| JournalError::Failed("chunk lost".into()))?;
            let mut out = vec![0u8; BLOCK_SIZE];
            store.read(found, &mut out)?;
            assert_eq!(&out, want, "block {id} after reopen");
        }
        for p in store.packs.values() {
            let on_disk = std::fs::metadata(&p.path).map_err(|e| JournalError::Failed(e.to_string()))?.len();
            assert_eq!(on_disk, p.len, "{} holds padding or lost bytes", p.path.display());
        }
        Ok(())
    }
}
