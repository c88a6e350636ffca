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
use super::model::BLOCK_SIZE;
use super::store::{self, Store};
use super::{read_meta, write_meta_file, Journal, JournalConfig, JournalError, Result, META_FORMAT_SHARED_CHUNKS};
use std::path::Path;

/// The folder of a format-2 journal's own chunk store.
pub(super) const PRIVATE_CHUNKS_DIR: &str = "chunks";

/// Moves the format-2 journal in `dir` into the shared store at `root`.
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
        if !journal.read_chunk(hash, &mut block)? {
            moved = Err(JournalError::corrupt(
                dir.join(PRIVATE_CHUNKS_DIR),
                0,
                format!("a chunk the journal references is missing: {}", super::hex(hash)),
            ));
            break;
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
    shared.decref_all(copied.into_iter())?;
    moved?;
    shared.sync()?;
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
    #[test]
    fn a_move_a_crash_stopped_before_the_metadata_is_done_again_leaving_no_orphan() {
        let root = tempfile::tempdir().expect("a folder");
        let (dir, store_root) = (root.path().join("j"), root.path().join("chunk-store"));
        let own = JournalConfig {
            segment_bytes: 64 << 10,
            pack_bytes: 64 << 10,
            compression_level: None,
            workers: 1,
            chunk_store: None,
        };
        let disk = DiskId::new();
        let want = {
            let j = Journal::open(&dir, own.clone()).expect("a format 2 journal");
            j.add_disk(disk, 1 << 20).expect("a disk");
            let data: Vec<u8> = (0..(1u32 << 20)).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
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
            blake3::hash(&data)
        };
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
}
