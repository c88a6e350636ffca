//! Moving a format-2 journal (its chunks in its own store) into the shared
//! chunk store its VDSA now configures (format 3), when it is opened with
//! one (docs/journal-format.md, "Moving a journal into the shared store").
//!
//! Crash assumptions: the journal is listed in the store (durably) before
//! any chunk is copied, every chunk it references is copied and the store
//! synced before its metadata names the store, and its own packs are
//! removed only after that. A crash before the metadata names the store
//! leaves a format-2 journal whole and a member the store drops at its
//! next open (the copies are then garbage, collected as any other); a crash
//! after it leaves a format-3 journal whose old packs the next open
//! removes.

use super::chunks::{compress_block, PreparedChunk};
use super::meta::{read_meta, write_meta_file, META_FORMAT_SHARED_CHUNKS};
use super::model::BLOCK_SIZE;
use super::store::{self, Store};
use super::{Journal, JournalConfig, JournalError, Result};
use std::path::Path;

/// The folder of a format-2 journal's own chunk store.
pub(super) const PRIVATE_CHUNKS_DIR: &str = "chunks";

/// Moves the format-2 journal in `dir` into the shared store at `root`. An
/// error before its metadata names the store (a full disk while copying)
/// leaves it a whole format-2 journal.
pub(super) fn into_shared_store(dir: &Path, config: &JournalConfig, root: &Path) -> Result<()> {
    let own = JournalConfig { chunk_store: None, ..config.clone() };
    let journal = Journal::open(dir, own)?;
    let hashes = journal.referenced_chunks()?;
    let shared = Store::shared(root, config.pack_bytes)?;
    shared.add_member(dir)?;
    let mut block = vec![0u8; BLOCK_SIZE];
    let mut copied = Vec::with_capacity(hashes.len());
    let mut moved = Ok(());
    for hash in &hashes {
        match journal.read_chunk(hash, &mut block) {
            Ok(true) => {}
            Ok(false) => {
                moved = Err(JournalError::corrupt(
                    dir.join(PRIVATE_CHUNKS_DIR),
                    0,
                    format!("a chunk the journal references is missing: {}", super::hex(hash)),
                ));
                break;
            }
            Err(e) => {
                moved = Err(e);
                break;
            }
        }
        let compressed = config.compression_level.and_then(|l| compress_block(&block, l));
        match shared.intern(&block, PreparedChunk { hash: *hash, compressed }) {
            Ok((id, _)) => copied.push(id),
            Err(e) => {
                moved = Err(e);
                break;
            }
        }
    }
    // The journal counts its references when it opens in the store; these
    // copies hold none until then (the store collects nothing meanwhile:
    // this member is not open).
    let copied = shared.decref_all(copied.into_iter()).and(moved).and_then(|()| shared.sync());
    if let Err(e) = copied {
        // Not moved: the journal stays whole in its own store; the copies
        // are garbage for the next collection.
        if let Err(f) = shared.forget_member(dir) {
            tracing::warn!(dir = %dir.display(), "a failed move stays listed in the chunk store until it reopens: {f}");
        }
        return Err(e);
    }
    let mut meta = read_meta(dir)?.ok_or_else(|| JournalError::corrupt(dir, 0, "the journal's metadata is gone"))?;
    meta.format = META_FORMAT_SHARED_CHUNKS;
    meta.chunk_store = Some(store::relative_path(&store::canonical(dir)?, shared.root().unwrap_or(root)));
    write_meta_file(dir, &meta)?;
    drop(journal);
    remove_private_chunks(dir);
    tracing::info!(
        dir = %dir.display(),
        chunks = hashes.len(),
        store = %root.display(),
        "journal moved into the shared chunk store (format {META_FORMAT_SHARED_CHUNKS})"
    );
    Ok(())
}

/// Removes a format-3 journal's old private packs, if a move left them.
pub(super) fn remove_private_chunks(dir: &Path) {
    let old = dir.join(PRIVATE_CHUNKS_DIR);
    if old.exists() {
        if let Err(e) = std::fs::remove_dir_all(&old) {
            tracing::warn!(path = %old.display(), "the old chunk packs of a moved journal stay for now: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::{stored_chunk_hashes, CheckpointSpec, TapWrite, WriteData};
    use protection_groups::{CheckpointId, CheckpointKind, DiskId, StreamId};

    /// A move that a crash stopped after copying but before the metadata
    /// named the store is done again at the next open, and the first
    /// copies are not left behind: after a collection the store holds
    /// exactly what the journal references.
    /// Small packs and segments, no compression, a chunk store of its own
    /// (format 2).
    fn own_store() -> JournalConfig {
        JournalConfig {
            segment_bytes: 64 << 10,
            pack_bytes: 64 << 10,
            compression_level: None,
            workers: 1,
            chunk_store: None,
        }
    }

    /// A format-2 journal at `dir`: one disk of `bytes` written whole with
    /// distinct blocks, and checkpoint 1; the disk and its content's hash.
    fn format_2_journal(dir: &Path, bytes: u32) -> (DiskId, blake3::Hash) {
        let j = Journal::open(dir, own_store()).expect("a format 2 journal");
        let disk = DiskId::new();
        j.add_disk(disk, u64::from(bytes)).expect("a disk");
        let data: Vec<u8> = (0..bytes).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        j.ingest(StreamId::new(), &[TapWrite { seq: 1, disk, offset: 0, data: WriteData::Data(&data) }])
            .expect("written");
        let cp = CheckpointSpec {
            id: CheckpointId(1),
            kind: CheckpointKind::Automatic,
            name: "cp1".into(),
            source_time_ms: 1,
            cuts: vec![],
        };
        j.mark_checkpoint(cp).expect("a checkpoint");
        (disk, blake3::hash(&data))
    }

    #[test]
    fn a_move_a_crash_stopped_before_the_metadata_is_done_again_leaving_no_orphan() {
        let root = tempfile::tempdir().expect("a folder");
        let (dir, store_root) = (root.path().join("j"), root.path().join("chunk-store"));
        let own = own_store();
        let (disk, want) = format_2_journal(&dir, 1 << 20);
        // The move's first steps, then the crash: listed, copied and
        // synced, the metadata not written, the counts lost.
        {
            let j = Journal::open(&dir, own.clone()).expect("reopened");
            let shared = Store::shared(&store_root, own.pack_bytes).expect("the store");
            shared.add_member(&dir).expect("listed");
            let mut block = vec![0u8; BLOCK_SIZE];
            let mut copied = Vec::new();
            for h in j.referenced_chunks().expect("its chunks") {
                assert!(j.read_chunk(&h, &mut block).expect("read"));
                copied.push(shared.intern(&block, PreparedChunk { hash: h, compressed: None }).expect("copied").0);
            }
            shared.decref_all(copied.into_iter()).expect("counts");
            shared.sync().expect("synced");
        }
        assert_eq!(read_meta(&dir).ok().flatten().map(|m| m.format), Some(super::super::META_FORMAT));

        let j = Journal::open(&dir, JournalConfig { chunk_store: Some(store_root.clone()), ..own })
            .expect("moved at the next open");
        assert_eq!(read_meta(&dir).ok().flatten().map(|m| m.format), Some(META_FORMAT_SHARED_CHUNKS));
        let view = j.open_view(CheckpointId(1)).expect("its checkpoint");
        assert_eq!(view.disk_hash(disk).expect("read"), want);
        drop(view);
        j.collect_chunk_garbage(true).expect("collected");
        let referenced = j.referenced_chunks().expect("referenced");
        let stored = stored_chunk_hashes(&store_root.join("chunks")).expect("stored");
        assert_eq!(stored, referenced, "the store holds exactly what the journal references");
        assert!(!dir.join(PRIVATE_CHUNKS_DIR).exists());
    }

    /// A move that fails while copying (here a damaged chunk) leaves the
    /// journal whole in its own store, opened as it is, and not listed in
    /// the shared store (where it would block collection).
    #[test]
    fn a_move_that_fails_leaves_the_journal_in_its_own_store_and_the_store_as_it_was() {
        let root = tempfile::tempdir().expect("a folder");
        let (dir, store_root) = (root.path().join("j"), root.path().join("chunk-store"));
        format_2_journal(&dir, 256 << 10);
        let pack = std::fs::read_dir(dir.join(PRIVATE_CHUNKS_DIR))
            .expect("its packs")
            .flatten()
            .map(|e| e.path())
            // A sealed pack (one with an index): an open reads its index,
            // not its chunks, so only the copy meets the damage.
            .find(|p| p.extension().is_some_and(|x| x == "pack") && p.with_extension("idx").exists())
            .expect("a sealed pack");
        let mut bytes = std::fs::read(&pack).expect("the pack");
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0xff;
        std::fs::write(&pack, &bytes).expect("damaged");

        let shared = JournalConfig { chunk_store: Some(store_root.clone()), ..own_store() };
        let j = Journal::open(&dir, shared).expect("opened in its own store");
        assert_eq!(read_meta(&dir).ok().flatten().map(|m| m.format), Some(super::super::META_FORMAT));
        assert!(dir.join(PRIVATE_CHUNKS_DIR).exists(), "its own packs stay");
        drop(j);
        let listed: serde_json::Value =
            serde_json::from_slice(&std::fs::read(store_root.join("store.json")).expect("the store's list"))
                .expect("its JSON");
        let members = listed["members"].as_array().cloned().unwrap_or_default();
        assert!(
            !members.iter().any(|m| m["journal"].as_str().is_some_and(|j| j.ends_with('j'))),
            "the failed move is not listed: {listed}"
        );
    }
}
