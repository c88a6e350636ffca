//! The index of a sealed chunk pack (`NNNNNNNN.idx` beside
//! `NNNNNNNN.pack`): every entry's hash, offset and stored length, so that
//! opening a journal reads about 40 bytes per chunk instead of the chunk
//! (docs/journal-format.md, "Pack indexes").
//!
//! An index is written only for a pack that is sealed (no entry will be
//! appended to it again) and fsynced, and is itself made durable (write a
//! temporary file, fsync, rename, fsync the folder). It is never trusted
//! beyond its checksum and the pack's length: a damaged or mismatched one
//! is removed, and the pack is scanned as if it had none.

use super::error::{JournalError, Result};
use super::fsutil;
use super::pack_format::{Hash, CHUNK_HEADER_LEN, PACK_HEADER_LEN};
use std::path::{Path, PathBuf};

pub const INDEX_MAGIC: &[u8; 8] = b"VDSAIDX1";
const INDEX_VERSION: u32 = 1;
/// magic, version u32, pack number u32, pack length u64, entry count u32.
const HEADER_LEN: usize = 8 + 4 + 4 + 8 + 4;
/// hash, offset u32, stored length u16.
const ENTRY_LEN: usize = 32 + 4 + 2;

/// One chunk entry of a pack, as its index records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexedChunk {
    pub hash: Hash,
    /// Offset of the entry's header in the pack.
    pub offset: u32,
    pub stored_len: u16,
}

pub fn index_path(dir: &Path, pack: u32) -> PathBuf {
    dir.join(format!("{pack:08}.idx"))
}

/// The index's bytes: header, entries, CRC-32 of everything before it.
pub fn encode(pack: u32, pack_len: u64, entries: &[IndexedChunk]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + entries.len() * ENTRY_LEN + 4);
    out.extend_from_slice(INDEX_MAGIC);
    out.extend_from_slice(&INDEX_VERSION.to_le_bytes());
    out.extend_from_slice(&pack.to_le_bytes());
    out.extend_from_slice(&pack_len.to_le_bytes());
    out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    for e in entries {
        out.extend_from_slice(&e.hash);
        out.extend_from_slice(&e.offset.to_le_bytes());
        out.extend_from_slice(&e.stored_len.to_le_bytes());
    }
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// The entries an index lists for `pack` of `pack_len` bytes, or why it
/// cannot be used.
pub fn decode(bytes: &[u8], pack: u32, pack_len: u64) -> std::result::Result<Vec<IndexedChunk>, String> {
    if bytes.len() < HEADER_LEN + 4 {
        return Err(format!("{} bytes, shorter than an index header", bytes.len()));
    }
    let (body, crc) = bytes.split_at(bytes.len() - 4);
    let want = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
    if crc32fast::hash(body) != want {
        return Err("checksum mismatch".into());
    }
    if &body[..8] != INDEX_MAGIC {
        return Err("bad magic".into());
    }
    let u32_at = |i: usize| u32::from_le_bytes([body[i], body[i + 1], body[i + 2], body[i + 3]]);
    let version = u32_at(8);
    if version != INDEX_VERSION {
        return Err(format!("index version {version}, this build reads {INDEX_VERSION}"));
    }
    let (no, count) = (u32_at(12), u32_at(24) as usize);
    let mut len8 = [0u8; 8];
    len8.copy_from_slice(&body[16..24]);
    let covered = u64::from_le_bytes(len8);
    if no != pack {
        return Err(format!("it indexes pack {no}"));
    }
    if covered != pack_len {
        return Err(format!("it covers {covered} bytes of a pack of {pack_len}"));
    }
    if body.len() != HEADER_LEN + count * ENTRY_LEN {
        return Err(format!("{count} entries announced in {} bytes", body.len()));
    }
    let entries = body[HEADER_LEN..]
        .chunks_exact(ENTRY_LEN)
        .map(|e| {
            let mut hash = [0u8; 32];
            hash.copy_from_slice(&e[..32]);
            IndexedChunk {
                hash,
                offset: u32::from_le_bytes([e[32], e[33], e[34], e[35]]),
                stored_len: u16::from_le_bytes([e[36], e[37]]),
            }
        })
        .collect::<Vec<_>>();
    // Entries in pack order, inside the pack: anything else is not an index
    // this code wrote.
    let mut end = PACK_HEADER_LEN as u64;
    for e in &entries {
        let start = u64::from(e.offset);
        if start < end || e.stored_len == 0 || e.stored_len as usize > super::model::BLOCK_SIZE {
            return Err(format!("entry at {start} out of order or malformed"));
        }
        end = start + (CHUNK_HEADER_LEN + e.stored_len as usize) as u64;
    }
    if end > pack_len {
        return Err(format!("entries run to {end}, past the pack's end"));
    }
    Ok(entries)
}

/// Reads the index of `pack`, if it has a usable one. A damaged or
/// mismatched index is removed (the caller scans the pack instead).
pub fn read(dir: &Path, pack: u32, pack_len: u64) -> Result<Option<Vec<IndexedChunk>>> {
    let path = index_path(dir, pack);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(JournalError::io("reading", &path, e)),
    };
    match decode(&bytes, pack, pack_len) {
        Ok(entries) => Ok(Some(entries)),
        Err(reason) => {
            tracing::warn!(path = %path.display(), %reason, "removing an unusable pack index; the pack is scanned");
            remove(dir, pack)?;
            Ok(None)
        }
    }
}

/// Writes the index of a sealed, fsynced pack durably.
pub fn write(dir: &Path, pack: u32, pack_len: u64, entries: &[IndexedChunk]) -> Result<()> {
    fsutil::write_atomic(&index_path(dir, pack), &encode(pack, pack_len, entries))
}

/// Removes the index of `pack`, if any (before the pack itself goes).
pub fn remove(dir: &Path, pack: u32) -> Result<()> {
    let path = index_path(dir, pack);
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(JournalError::io("removing", &path, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries() -> Vec<IndexedChunk> {
        vec![
            IndexedChunk { hash: [1; 32], offset: 32, stored_len: 4096 },
            IndexedChunk { hash: [2; 32], offset: 32 + 45 + 4096, stored_len: 100 },
        ]
    }

    #[test]
    fn an_index_reads_back_and_refuses_damage_and_mismatch() {
        let len = 32 + 45 + 4096 + 45 + 100;
        let bytes = encode(7, len, &entries());
        assert_eq!(decode(&bytes, 7, len), Ok(entries()));
        assert!(decode(&bytes, 8, len).is_err_and(|e| e.contains("pack 7")));
        assert!(decode(&bytes, 7, len + 1).is_err_and(|e| e.contains("covers")));
        let mut flipped = bytes.clone();
        flipped[40] ^= 1;
        assert!(decode(&flipped, 7, len).is_err_and(|e| e.contains("checksum")));
        assert!(decode(&bytes[..bytes.len() - 1], 7, len).is_err());
        let overlapping = vec![entries()[0], IndexedChunk { offset: 40, ..entries()[1] }];
        assert!(decode(&encode(7, len, &overlapping), 7, len).is_err_and(|e| e.contains("out of order")));
    }
}
