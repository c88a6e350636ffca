//! The chunk store as a journal holds it: its own (`<journal>/chunks`, the
//! journal formats 1 and 2) or one shared by every journal of a VDSA
//! (format 3), so that a block that many VPGs hold is stored once
//! (docs/journal-format.md, "The shared chunk store").
//!
//! The store counts references: the sum, per chunk, of the references each
//! member journal holds (its index versions and the blocks retention kept
//! for its open views). A journal that closes gives its references back.
//! Garbage collection runs only while every member is open in this process,
//! so a chunk that a closed member needs is never taken for garbage; a
//! member removed for good gives its references back by not coming back.
//!
//! Lock order: a journal's state, then the store's. The store never waits
//! for a journal.

use super::chunks::{ChunkId, ChunkStore, Hash, PreparedChunk};
use super::error::{JournalError, Result};
use super::fsutil;
use super::writer::Writer;
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard, Weak};

const STORE_FILE: &str = "store.json";
const STORE_FORMAT: u32 = 1;

/// The store's metadata: which journals hold references into it, each by
/// its folder relative to the store, and which of them are being removed.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct StoreMeta {
    format: u32,
    members: Vec<Member>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Member {
    journal: PathBuf,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    removing: bool,
}

#[derive(Debug)]
struct Packs {
    store: ChunkStore,
    /// Queues the packs' writes (one queue for all member journals).
    writer: Writer,
}

impl Drop for Packs {
    /// The active pack's padding is cut once its writes are done.
    fn drop(&mut self) {
        if self.writer.drain().is_ok() {
            self.store.cut_active_padding();
        }
    }
}

#[derive(Debug, Default)]
struct Membership {
    meta: StoreMeta,
    /// Members whose journal is open here and has replayed its log (its
    /// references are counted).
    attached: Vec<PathBuf>,
    /// A member closed after a failure, with references it may not have
    /// given back exactly: collection waits for the next process.
    uncertain: bool,
}

/// One chunk store and the journals that use it.
#[derive(Debug)]
pub(super) struct Store {
    /// The shared store's folder; None for a journal's own store.
    root: Option<PathBuf>,
    packs: RwLock<Packs>,
    members: Mutex<Membership>,
    /// Held while the store is open here: one process at a time.
    _lock: Option<File>,
}

/// Shared stores open in this process, by canonical folder: every journal
/// of one store must count its references in the same memory.
static OPEN: Mutex<Vec<(PathBuf, Weak<Store>)>> = Mutex::new(Vec::new());

impl Store {
    /// A journal's own store in `dir` (its `chunks` folder).
    pub(super) fn private(dir: &Path, pack_bytes: u64) -> Result<Arc<Store>> {
        Ok(Arc::new(Store {
            root: None,
            packs: RwLock::new(Packs { store: ChunkStore::open(dir, pack_bytes)?, writer: Writer::start()? }),
            members: Mutex::new(Membership::default()),
            _lock: None,
        }))
    }

    /// The shared store in `root`, created if absent; the one already open
    /// in this process if there is one.
    pub(super) fn shared(root: &Path, pack_bytes: u64) -> Result<Arc<Store>> {
        fsutil::create_dir(root)?;
        let canon = canonical(root)?;
        let mut open = OPEN.lock().map_err(|_| JournalError::Failed("the open chunk stores are poisoned".into()))?;
        open.retain(|(_, w)| w.strong_count() > 0);
        if let Some(store) = open.iter().find(|(p, _)| *p == canon).and_then(|(_, w)| w.upgrade()) {
            return Ok(store);
        }
        let lock = fsutil::lock_dir(&canon)?;
        let meta = finish_membership(&canon)?;
        let store = Arc::new(Store {
            root: Some(canon.clone()),
            packs: RwLock::new(Packs {
                store: ChunkStore::open(&canon.join("chunks"), pack_bytes)?,
                writer: Writer::start()?,
            }),
            members: Mutex::new(Membership { meta, attached: Vec::new(), uncertain: false }),
            _lock: Some(lock),
        });
        open.push((canon, Arc::downgrade(&store)));
        Ok(store)
    }

    pub(super) fn root(&self) -> Option<&Path> {
        self.root.as_deref()
    }

    fn membership(&self) -> Result<std::sync::MutexGuard<'_, Membership>> {
        self.members.lock().map_err(|_| JournalError::Failed("chunk store membership poisoned".into()))
    }

    /// Lists `journal` as a member, durably, before it holds any
    /// reference (a new journal, before its metadata names the store).
    pub(super) fn add_member(&self, journal: &Path) -> Result<()> {
        let (Some(root), Some(rel)) = (&self.root, self.member_name(journal)?) else {
            return Ok(());
        };
        let mut m = self.membership()?;
        if !m.meta.members.iter().any(|x| x.journal == rel) {
            change_meta(root, &mut m, |meta| meta.members.push(Member { journal: rel, removing: false }))?;
        }
        Ok(())
    }

    /// Drops `journal` from the members, its folder untouched: a move into
    /// the store that failed before the journal's metadata named the store
    /// (left listed, it would block collection until the store reopens).
    pub(super) fn forget_member(&self, journal: &Path) -> Result<()> {
        let (Some(root), Some(rel)) = (&self.root, self.member_name(journal)?) else {
            return Ok(());
        };
        change_meta(root, &mut *self.membership()?, |meta| meta.members.retain(|x| x.journal != rel))
    }

    /// Whether `journal` is a member (not being removed).
    pub(super) fn is_member(&self, journal: &Path) -> Result<bool> {
        let Some(rel) = self.member_name(journal)? else {
            return Ok(true);
        };
        Ok(self.membership()?.meta.members.iter().any(|x| x.journal == rel && !x.removing))
    }

    /// `journal`'s folder as the store names it; None for a private store.
    fn member_name(&self, journal: &Path) -> Result<Option<PathBuf>> {
        match &self.root {
            None => Ok(None),
            Some(root) => Ok(Some(relative_path(root, &canonical(journal)?))),
        }
    }

    /// The member's references are all counted from now on.
    pub(super) fn attach(&self, journal: &Path) -> Result<()> {
        if let Some(rel) = self.member_name(journal)? {
            self.membership()?.attached.push(rel);
        }
        Ok(())
    }

    /// The member closed, having given back its references (`exact`: all
    /// of them, as far as it knows; a journal that failed may not know).
    pub(super) fn detach(&self, journal: &Path, exact: bool) {
        let Ok(Some(rel)) = self.member_name(journal) else { return };
        if let Ok(mut m) = self.members.lock() {
            if let Some(i) = m.attached.iter().position(|x| *x == rel) {
                m.attached.swap_remove(i);
            }
            if !exact {
                tracing::warn!(journal = %journal.display(), "a journal closed after a failure: the shared chunk store collects no garbage until the VDSA restarts");
                m.uncertain = true;
            }
        }
    }

    /// Why garbage cannot be collected now (None: it can): every member's
    /// references must be counted.
    pub(super) fn collection_blocked(&self) -> Option<String> {
        let m = match self.members.lock() {
            Ok(m) => m,
            Err(_) => return Some("chunk store membership poisoned".into()),
        };
        if m.uncertain {
            return Some("a member journal failed and closed in this process".into());
        }
        let closed: Vec<String> = m
            .meta
            .members
            .iter()
            .filter(|x| x.removing || !m.attached.contains(&x.journal))
            .map(|x| x.journal.display().to_string())
            .collect();
        match closed.len() {
            0 => None,
            n => Some(format!("{n} member journal(s) not open here: {}", closed.join(", "))),
        }
    }

    /// Removes a closed member journal for good: marked as being removed
    /// (durably), its folder deleted, then dropped from the list. A crash
    /// in between is finished when the store next opens.
    pub(super) fn remove_member(&self, journal: &Path) -> Result<()> {
        let (Some(root), Some(rel)) = (&self.root, self.member_name(journal)?) else {
            return Ok(());
        };
        {
            let mut m = self.membership()?;
            if m.attached.contains(&rel) {
                return Err(JournalError::Failed(format!(
                    "{} is open: close it before removing it",
                    journal.display()
                )));
            }
            change_meta(root, &mut m, |meta| {
                for x in meta.members.iter_mut().filter(|x| x.journal == rel) {
                    x.removing = true;
                }
            })?;
        }
        remove_journal_dir(journal)?;
        change_meta(root, &mut *self.membership()?, |meta| meta.members.retain(|x| x.journal != rel))
    }

    fn read_packs(&self) -> Result<RwLockReadGuard<'_, Packs>> {
        self.packs.read().map_err(|_| JournalError::Failed("a thread panicked while holding the chunk store".into()))
    }

    fn write_packs(&self) -> Result<RwLockWriteGuard<'_, Packs>> {
        self.packs.write().map_err(|_| JournalError::Failed("a thread panicked while holding the chunk store".into()))
    }

    /// The chunk with this hash, if stored (it may be garbage: only a
    /// reference keeps it).
    pub(super) fn lookup(&self, hash: &Hash) -> Result<Option<ChunkId>> {
        Ok(self.read_packs()?.store.lookup(hash))
    }

    pub(super) fn hash_of(&self, id: ChunkId) -> Result<Hash> {
        Ok(self.read_packs()?.store.hash_of(id))
    }

    /// A reference to the chunk with this hash, if stored: found and
    /// counted at once, so a collection in between cannot take it.
    pub(super) fn reference(&self, hash: &Hash) -> Result<Option<ChunkId>> {
        let mut p = self.write_packs()?;
        let id = p.store.lookup(hash);
        if let Some(id) = id {
            p.store.incref(id);
        }
        Ok(id)
    }

    /// A reference to the chunk holding `block`, stored first if new.
    /// Returns the chunk and whether it was already stored.
    pub(super) fn intern(&self, block: &[u8], prepared: PreparedChunk) -> Result<(ChunkId, bool)> {
        let mut guard = self.write_packs()?;
        let p = &mut *guard;
        let (id, hit) = match p.store.lookup(&prepared.hash) {
            Some(id) => (id, true),
            None => (p.store.insert(block, &prepared, &mut p.writer)?, false),
        };
        p.store.incref(id);
        Ok((id, hit))
    }

    /// One more reference to a chunk the caller already holds one to.
    pub(super) fn incref(&self, id: ChunkId) -> Result<()> {
        self.write_packs()?.store.incref(id);
        Ok(())
    }

    pub(super) fn decref(&self, id: ChunkId) -> Result<()> {
        self.write_packs()?.store.decref(id);
        Ok(())
    }

    /// Gives back one reference per id.
    pub(super) fn decref_all(&self, ids: impl Iterator<Item = ChunkId>) -> Result<()> {
        let mut p = self.write_packs()?;
        for id in ids {
            p.store.decref(id);
        }
        Ok(())
    }

    pub(super) fn read(&self, id: ChunkId, out: &mut [u8]) -> Result<()> {
        self.read_packs()?.store.read(id, out)
    }

    pub(super) fn read_many(&self, reqs: &[(ChunkId, usize)], out: &mut [u8]) -> Result<()> {
        self.read_packs()?.store.read_many(reqs, out)
    }

    pub(super) fn pending_len(&self) -> Result<usize> {
        Ok(self.read_packs()?.store.pending_len())
    }

    pub(super) fn flush_pending(&self) -> Result<()> {
        let mut guard = self.write_packs()?;
        let p = &mut *guard;
        p.store.flush_pending(&mut p.writer)
    }

    /// Makes every chunk stored so far durable, whichever journal stored it.
    pub(super) fn sync(&self) -> Result<()> {
        let mut guard = self.write_packs()?;
        let p = &mut *guard;
        p.store.sync(&mut p.writer)
    }

    /// Collects garbage if every member's references are counted; `all`
    /// also compacts packs with little garbage (a scrub). Returns the bytes
    /// reclaimed, or why nothing was collected.
    pub(super) fn collect_garbage(&self, all: bool) -> Result<std::result::Result<u64, String>> {
        if let Some(why) = self.collection_blocked() {
            return Ok(Err(why));
        }
        let mut guard = self.write_packs()?;
        let p = &mut *guard;
        p.store.collect_garbage(&mut p.writer, all).map(Ok)
    }

    /// (live chunks, stored chunks, pack bytes): store-wide for a shared store.
    pub(super) fn counts(&self) -> Result<(u64, u64, u64)> {
        let p = self.read_packs()?;
        Ok((p.store.live_chunks(), p.store.stored_chunks(), p.store.bytes()))
    }

    /// Bytes of the distinct chunks among `ids`: a journal's own share.
    pub(super) fn bytes_of_distinct(&self, ids: impl Iterator<Item = ChunkId>) -> Result<u64> {
        Ok(self.read_packs()?.store.bytes_of_distinct(ids))
    }

    pub(super) fn live_bytes(&self) -> Result<u64> {
        Ok(self.read_packs()?.store.live_bytes())
    }

    /// Starts over empty: a private store after a promotion deleted its packs.
    pub(super) fn reset_private(&self, dir: &Path, pack_bytes: u64) -> Result<()> {
        if self.root.is_some() {
            return Ok(());
        }
        self.write_packs()?.store = ChunkStore::open(dir, pack_bytes)?;
        Ok(())
    }
}

/// Reads the store's metadata and finishes what a crash interrupted: a
/// member being removed is removed, and a member whose journal does not
/// name this store (its creation stopped before its metadata was written;
/// it never held a reference) is dropped.
fn finish_membership(root: &Path) -> Result<StoreMeta> {
    let path = root.join(STORE_FILE);
    let mut meta = match std::fs::read(&path) {
        Ok(bytes) => {
            let meta: StoreMeta = serde_json::from_slice(&bytes)
                .map_err(|e| JournalError::corrupt(&path, e.column() as u64, format!("chunk store metadata: {e}")))?;
            if meta.format != STORE_FORMAT {
                return Err(JournalError::UnsupportedVersion { path, found: meta.format, supported: STORE_FORMAT });
            }
            meta
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => StoreMeta { format: STORE_FORMAT, members: Vec::new() },
        Err(e) => return Err(JournalError::io("reading", &path, e)),
    };
    let before = meta.members.clone();
    let mut kept = Vec::new();
    for m in std::mem::take(&mut meta.members) {
        let dir = root.join(&m.journal);
        if m.removing {
            tracing::info!(journal = %dir.display(), "finishing the removal of a journal interrupted by a crash");
            remove_journal_dir(&dir)?;
            continue;
        }
        if !super::meta::names_store(&dir, root)? {
            tracing::info!(journal = %dir.display(), "dropping a chunk store member whose journal never named the store");
            continue;
        }
        kept.push(m);
    }
    meta.members = kept;
    if meta.members != before || !path.exists() {
        write_store_meta(root, &meta)?;
    }
    Ok(meta)
}

/// Changes the members' list on disk (atomically), then in memory: a
/// failed write leaves both as they were.
fn change_meta(root: &Path, m: &mut Membership, change: impl FnOnce(&mut StoreMeta)) -> Result<()> {
    let mut meta = m.meta.clone();
    change(&mut meta);
    write_store_meta(root, &meta)?;
    m.meta = meta;
    Ok(())
}

fn write_store_meta(root: &Path, meta: &StoreMeta) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(meta)
        .map_err(|e| JournalError::Failed(format!("encoding chunk store metadata: {e}")))?;
    fsutil::write_atomic(&root.join(STORE_FILE), &bytes)
}

/// Deletes a journal's folder (gone already is fine) and makes that durable.
pub(super) fn remove_journal_dir(dir: &Path) -> Result<()> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(JournalError::io("removing journal", dir, e)),
    }
    match dir.parent() {
        Some(parent) if parent.exists() => fsutil::sync_dir(parent),
        _ => Ok(()),
    }
}

pub(super) fn canonical(path: &Path) -> Result<PathBuf> {
    path.canonicalize().map_err(|e| JournalError::io("resolving", path, e))
}

/// The path that leads from folder `from` to `to`, both absolute and
/// canonical (`..` where they part).
pub(super) fn relative_path(from: &Path, to: &Path) -> PathBuf {
    let a: Vec<Component> = from.components().collect();
    let b: Vec<Component> = to.components().collect();
    let common = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let mut out = PathBuf::new();
    for _ in common..a.len() {
        out.push("..");
    }
    for c in &b[common..] {
        out.push(c.as_os_str());
    }
    if out.as_os_str().is_empty() {
        out.push(".");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::relative_path;
    use std::path::Path;

    #[test]
    fn a_relative_path_climbs_to_where_the_paths_part() {
        assert_eq!(relative_path(Path::new("/a/b/store"), Path::new("/a/b/v1/journal")), Path::new("../v1/journal"));
        assert_eq!(relative_path(Path::new("/a/b/v1/journal"), Path::new("/a/b/store")), Path::new("../../store"));
        assert_eq!(relative_path(Path::new("/a"), Path::new("/a")), Path::new("."));
    }
}
