//! Journals that share one chunk store (format 3): a block many VPGs hold
//! is stored once, a removed journal's blocks go while the others' stay,
//! and a crash in a membership change is finished at the next open.

use protection_groups::{CheckpointId, CheckpointKind, DiskId, StreamId};
use std::path::{Path, PathBuf};
use vdsa::journal::{stored_chunk_hashes, CheckpointSpec, Journal, JournalConfig, TapWrite, WriteData, BLOCK_SIZE};

const DISK: u64 = 2 << 20;

fn config(store: Option<&Path>) -> JournalConfig {
    JournalConfig {
        segment_bytes: 64 << 10,
        pack_bytes: 64 << 10,
        compression_level: None,
        workers: 1,
        chunk_store: store.map(Path::to_path_buf),
    }
}

/// Block `i` of template `t`: incompressible, distinct per (t, i).
fn block(t: u8, i: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(BLOCK_SIZE);
    let mut h = blake3::Hasher::new();
    h.update(&[t]);
    h.update(&i.to_le_bytes());
    let mut r = h.finalize_xof();
    out.resize(BLOCK_SIZE, 0);
    r.fill(&mut out);
    out
}

/// A journal at `dir` with one disk written whole from `templates` (block
/// i from template `templates[i % len]`) and one checkpoint; returns the
/// disk and the hash it must read back.
fn written(dir: &Path, store: Option<&Path>, templates: &[u8]) -> (DiskId, blake3::Hash) {
    let j = Journal::open(dir, config(store)).unwrap_or_else(|e| panic!("opening {}: {e}", dir.display()));
    let disk = DiskId::new();
    j.add_disk(disk, DISK).unwrap_or_else(|e| panic!("{e}"));
    let image: Vec<u8> =
        (0..DISK / BLOCK_SIZE as u64).flat_map(|i| block(templates[i as usize % templates.len()], i)).collect();
    let stream = StreamId::new();
    let writes: Vec<TapWrite<'_>> = image
        .chunks(256 << 10)
        .enumerate()
        .map(|(k, data)| TapWrite {
            seq: k as u64 + 1,
            disk,
            offset: k as u64 * (256 << 10),
            data: WriteData::Data(data),
        })
        .collect();
    j.ingest(stream, &writes).unwrap_or_else(|e| panic!("{e}"));
    let spec = CheckpointSpec {
        id: CheckpointId(1),
        kind: CheckpointKind::Automatic,
        name: "cp1".into(),
        source_time_ms: 1000,
        cuts: vec![],
    };
    j.mark_checkpoint(spec).unwrap_or_else(|e| panic!("{e}"));
    (disk, blake3::hash(&image))
}

fn reads_back(dir: &Path, disk: DiskId, want: blake3::Hash) {
    let j = Journal::open(dir, config(None)).unwrap_or_else(|e| panic!("reopening {}: {e}", dir.display()));
    let view = j.open_view(CheckpointId(1)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(view.disk_hash(disk).unwrap_or_else(|e| panic!("{e}")), want, "{} at its checkpoint", dir.display());
}

fn bytes_under(dir: &Path) -> u64 {
    let mut total = 0;
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let Ok(m) = e.metadata() else { continue };
        total += if m.is_dir() { bytes_under(&e.path()) } else { m.len() };
    }
    total
}

fn write_json(path: &Path, value: &serde_json::Value) {
    std::fs::write(path, serde_json::to_vec(value).unwrap_or_default()).unwrap_or_else(|e| panic!("{e}"));
}

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap_or_default())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Two journals in one store hold the same content once (control: two
/// journals with their own stores hold it twice). Garbage collection is
/// refused while one member is closed (it could not count that member's
/// references). Removing one journal keeps every block the other needs
/// and, once collected, leaves no chunk nothing references.
#[test]
fn journals_sharing_a_store_hold_a_block_once_and_a_removal_keeps_what_the_other_needs() {
    let root = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let store = root.path().join("chunk-store");
    let (a, b) = (root.path().join("a"), root.path().join("b"));
    // a: templates 1 and 2; b: templates 1 and 3. Half of each is shared.
    let (disk_a, want_a) = written(&a, Some(&store), &[1, 2]);
    let (disk_b, want_b) = written(&b, Some(&store), &[1, 3]);
    let shared_bytes = bytes_under(&store.join("chunks"));
    let one_disk = DISK;
    assert!(
        shared_bytes < one_disk * 3 / 2 + (one_disk / 10),
        "two half-shared disks in one store: {shared_bytes} bytes of packs for 1.5 disks of distinct blocks"
    );
    assert!(bytes_under(&a.join("chunks")) == 0 && bytes_under(&b.join("chunks")) == 0, "no chunk outside the store");

    let control = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    written(&control.path().join("a"), None, &[1, 2]);
    written(&control.path().join("b"), None, &[1, 3]);
    let private_bytes = bytes_under(&control.path().join("a/chunks")) + bytes_under(&control.path().join("b/chunks"));
    assert!(private_bytes >= one_disk * 2, "control: own stores hold both copies ({private_bytes} bytes)");

    reads_back(&a, disk_a, want_a);
    reads_back(&b, disk_b, want_b);

    // a alone is open: b's references are not counted, so nothing is
    // collected (or b's blocks would go).
    {
        let ja = Journal::open(&a, config(None)).unwrap_or_else(|e| panic!("{e}"));
        let refused = ja.collect_chunk_garbage(true);
        assert!(refused.as_ref().is_err_and(|e| e.to_string().contains("not open")), "{refused:?}");
    }
    reads_back(&b, disk_b, want_b);

    Journal::remove(&b).unwrap_or_else(|e| panic!("removing b: {e}"));
    assert!(!b.exists(), "the removed journal's folder is gone");
    let ja = Journal::open(&a, config(None)).unwrap_or_else(|e| panic!("{e}"));
    ja.collect_chunk_garbage(true).unwrap_or_else(|e| panic!("a is the only member now: {e}"));
    let referenced = ja.referenced_chunks().unwrap_or_else(|e| panic!("{e}"));
    let stored = stored_chunk_hashes(&store.join("chunks")).unwrap_or_else(|e| panic!("{e}"));
    let orphans = stored.iter().filter(|h| !referenced.contains(*h)).count();
    let missing = referenced.iter().filter(|h| !stored.contains(*h)).count();
    assert_eq!((orphans, missing), (0, 0), "after the removal and a collection: orphans, missing");
    assert_eq!(referenced.len() as u64, DISK / BLOCK_SIZE as u64);
    drop(ja);
    reads_back(&a, disk_a, want_a);
}

fn members(store: &Path) -> Vec<PathBuf> {
    read_json(&store.join("store.json"))["members"]
        .as_array()
        .map(|m| m.iter().filter_map(|x| x["journal"].as_str()).map(PathBuf::from).collect())
        .unwrap_or_default()
}

/// A crash during a removal (the member marked, its folder still there)
/// is finished when the store next opens; a member listed by a creation
/// that crashed before its journal named the store is dropped; and a
/// journal the store does not list is refused by name.
#[test]
fn a_membership_change_a_crash_interrupted_is_finished_at_the_next_open() {
    let root = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let store = root.path().join("chunk-store");
    let (a, b, c) = (root.path().join("a"), root.path().join("b"), root.path().join("c"));
    let (disk_a, want_a) = written(&a, Some(&store), &[1, 2]);
    written(&b, Some(&store), &[1, 3]);
    assert_eq!(members(&store), [PathBuf::from("../a"), PathBuf::from("../b")]);

    // b was being removed; c was being created (listed, no journal yet).
    let mut meta = read_json(&store.join("store.json"));
    meta["members"][1]["removing"] = serde_json::json!(true);
    meta["members"].as_array_mut().unwrap_or_else(|| panic!("members")).push(serde_json::json!({"journal": "../c"}));
    write_json(&store.join("store.json"), &meta);
    std::fs::create_dir_all(&c).unwrap_or_else(|e| panic!("{e}"));

    let ja = Journal::open(&a, config(None)).unwrap_or_else(|e| panic!("{e}"));
    assert!(!b.exists(), "the interrupted removal was finished");
    assert_eq!(members(&store), [PathBuf::from("../a")], "c never named the store and is dropped");
    ja.collect_chunk_garbage(true).unwrap_or_else(|e| panic!("{e}"));
    drop(ja);
    reads_back(&a, disk_a, want_a);

    // A format 3 journal the store does not list: refused, naming the store.
    let mut meta = read_json(&store.join("store.json"));
    meta["members"] = serde_json::json!([]);
    write_json(&store.join("store.json"), &meta);
    match Journal::open(&a, config(None)) {
        Err(e) => assert!(e.to_string().contains("does not list this journal"), "{e}"),
        Ok(_) => panic!("a journal its store does not list opened"),
    }
}

/// A journal an earlier build wrote with its own chunk store (format 2)
/// moves into the shared store when it is opened with one configured: the
/// blocks the store holds already are not stored again, it reads back as
/// before, its own packs go, and after a collection a scrub finds nothing
/// missing and no orphan. Old packs that a crash left after the move are
/// removed at the next open.
#[test]
fn a_journal_with_its_own_store_moves_into_the_shared_store() {
    let root = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let store = root.path().join("chunk-store");
    let (a, old) = (root.path().join("a"), root.path().join("old"));
    let (disk_a, want_a) = written(&a, Some(&store), &[1, 2]);
    let (disk_old, want_old) = written(&old, None, &[1, 3]);
    assert_eq!(read_json(&old.join("journal.json"))["format"], 2);
    assert!(bytes_under(&old.join("chunks")) >= DISK, "the old journal keeps its own packs");
    let before = bytes_under(&store.join("chunks"));

    drop(Journal::open(&old, config(Some(&store))).unwrap_or_else(|e| panic!("moving: {e}")));
    let meta = read_json(&old.join("journal.json"));
    assert_eq!(meta["format"], 3, "{meta}");
    assert!(meta["chunk_store"].is_string(), "{meta}");
    assert!(members(&store).iter().any(|m| m.ends_with("old")), "the store lists the moved journal");
    assert!(!old.join("chunks").exists(), "its own packs are gone");
    let grown = bytes_under(&store.join("chunks")) - before;
    assert!(
        grown < DISK / 2 + DISK / 10,
        "half its blocks were in the store already: the store grew by {grown} bytes for {} of new blocks",
        DISK / 2
    );
    reads_back(&old, disk_old, want_old);
    reads_back(&a, disk_a, want_a);

    let ja = Journal::open(&a, config(None)).unwrap_or_else(|e| panic!("{e}"));
    let jo = Journal::open(&old, config(None)).unwrap_or_else(|e| panic!("{e}"));
    ja.collect_chunk_garbage(true).unwrap_or_else(|e| panic!("both members are open: {e}"));
    let mut referenced = ja.referenced_chunks().unwrap_or_else(|e| panic!("{e}"));
    referenced.extend(jo.referenced_chunks().unwrap_or_else(|e| panic!("{e}")));
    let stored = stored_chunk_hashes(&store.join("chunks")).unwrap_or_else(|e| panic!("{e}"));
    let orphans = stored.iter().filter(|h| !referenced.contains(*h)).count();
    let missing = referenced.iter().filter(|h| !stored.contains(*h)).count();
    assert_eq!((orphans, missing), (0, 0), "after the move and a collection: orphans, missing");
    drop((ja, jo));

    // A crash between the metadata naming the store and the removal of
    // the old packs: they go at the next open.
    std::fs::create_dir_all(old.join("chunks")).unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(old.join("chunks/00000001.pack"), [7u8; 4096]).unwrap_or_else(|e| panic!("{e}"));
    reads_back(&old, disk_old, want_old);
    assert!(!old.join("chunks").exists(), "left-over packs of the move are removed");
}
