//! A chunk pack's bytes on disk (docs/journal-format.md, "Chunk packs"):
//! its header and the entries appended after it. Only the layout: which
//! packs exist, which entries are live and the catalog belong to
//! `chunks`, which writes and reads the files.

use super::format::crc32c;
use super::model::BLOCK_SIZE;
use std::path::{Path, PathBuf};

pub const PACK_MAGIC: &[u8; 8] = b"VDSAPAK1";
pub const PACK_HEADER_LEN: usize = 32;
pub const CHUNK_MAGIC: u32 = 0x4B4E_4843; // "CHNK"
pub const CHUNK_HEADER_LEN: usize = 4 + 32 + 1 + 4 + 4;
/// An entry's flag: its stored bytes are a zstd frame.
pub const FLAG_ZSTD: u8 = 1;

/// The blake3-256 hash of a 4 KiB block: a chunk's name.
pub type Hash = [u8; 32];

pub fn pack_path(dir: &Path, no: u32) -> PathBuf {
    dir.join(format!("{no:08}.pack"))
}

/// A pack's 32-byte header: magic, version, its number and their CRC.
pub fn pack_header(no: u32) -> [u8; PACK_HEADER_LEN] {
    let mut h = [0u8; PACK_HEADER_LEN];
    h[..8].copy_from_slice(PACK_MAGIC);
    h[8..12].copy_from_slice(&1u32.to_le_bytes());
    h[12..16].copy_from_slice(&no.to_le_bytes());
    let crc = crc32c(&h[..16]);
    h[16..20].copy_from_slice(&crc.to_le_bytes());
    h
}

/// One entry's header: magic, hash, flags, stored length and the CRC of
/// those and of the stored bytes, which follow it in the pack.
pub fn entry_header(hash: &Hash, flags: u8, stored: &[u8]) -> [u8; CHUNK_HEADER_LEN] {
    let mut h = [0u8; CHUNK_HEADER_LEN];
    h[..4].copy_from_slice(&CHUNK_MAGIC.to_le_bytes());
    h[4..36].copy_from_slice(hash);
    h[36] = flags;
    h[37..41].copy_from_slice(&(stored.len() as u32).to_le_bytes());
    let mut crc = crc32fast::Hasher::new();
    crc.update(&h[4..41]);
    crc.update(stored);
    h[41..45].copy_from_slice(&crc.finalize().to_le_bytes());
    h
}

/// Parses one entry at the start of `buf`: (hash, flags, stored length).
pub fn parse_entry(buf: &[u8]) -> std::result::Result<(Hash, u8, usize), String> {
    if buf.len() < CHUNK_HEADER_LEN {
        return Err("chunk entry header cut short".into());
    }
    let mut m = [0u8; 4];
    m.copy_from_slice(&buf[0..4]);
    if u32::from_le_bytes(m) != CHUNK_MAGIC {
        return Err("bad chunk magic".into());
    }
    let mut hash = [0u8; 32];
    hash.copy_from_slice(&buf[4..36]);
    let flags = buf[36];
    m.copy_from_slice(&buf[37..41]);
    let stored_len = u32::from_le_bytes(m) as usize;
    if stored_len == 0 || stored_len > BLOCK_SIZE || flags & !FLAG_ZSTD != 0 {
        return Err(format!("chunk entry with flags {flags} and length {stored_len}"));
    }
    if buf.len() < CHUNK_HEADER_LEN + stored_len {
        return Err("chunk data cut short".into());
    }
    m.copy_from_slice(&buf[41..45]);
    let crc = u32::from_le_bytes(m);
    let mut h = crc32fast::Hasher::new();
    h.update(&buf[4..41]);
    h.update(&buf[CHUNK_HEADER_LEN..CHUNK_HEADER_LEN + stored_len]);
    if h.finalize() != crc {
        return Err("chunk checksum mismatch".into());
    }
    Ok((hash, flags, stored_len))
}

/// Where the next valid entry starts at or after `from`, if any.
pub fn next_valid_entry(bytes: &[u8], from: usize) -> Option<usize> {
    let magic = CHUNK_MAGIC.to_le_bytes();
    (from..bytes.len().saturating_sub(CHUNK_HEADER_LEN))
        .filter(|&i| bytes[i..i + 4] == magic)
        .find(|&i| parse_entry(&bytes[i..]).is_ok())
}
