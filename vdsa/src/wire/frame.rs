//! Frames: the unit on the replication link (docs/wire-protocol.md).
//!
//! ```text
//! magic u32 "ZWIR" | version u16 | kind u16 | length u32 | crc32 u32 | payload
//! ```
//! All integers big-endian. The CRC covers the payload. TLS already
//! protects the link; the CRC catches our own bugs and a peer that lies.

use super::async_link::{AsyncLinkReader, AsyncLinkWriter};
use crate::payload::read_payload;
use std::io::{self, Read, Write};

pub const MAGIC: u32 = 0x5A57_4952;
pub const VERSION: u16 = 2;
pub const HEADER_LEN: usize = 16;
/// Largest payload a peer may send: a batch is at most a few MiB.
pub const MAX_PAYLOAD: u32 = 64 << 20;

/// Why a frame was refused. Each names what was wrong.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("link: {0}")]
    Io(#[from] io::Error),
    #[error("the peer sent nothing within the timeout (three heartbeats): the link is stalled or the peer hung")]
    Silent,
    #[error("bad frame magic {0:#010x}: the peer does not speak this protocol")]
    BadMagic(u32),
    #[error("protocol version {got} is not supported (this build speaks version {VERSION})")]
    Version { got: u16 },
    #[error("frame of kind {kind} announces {len} bytes, more than the {MAX_PAYLOAD} allowed")]
    TooLong { kind: u16, len: u32 },
    #[error(
        "frame of kind {kind} ({len} bytes) has checksum {got:#010x}, expected {want:#010x}: corrupted in transit"
    )]
    Checksum { kind: u16, len: u32, got: u32, want: u32 },
    #[error("malformed {what} message: {why}")]
    Malformed { what: &'static str, why: String },
    #[error("unexpected frame kind {0}")]
    UnexpectedKind(u16),
}

/// One frame as read from or written to the link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: u16,
    pub payload: Vec<u8>,
}

/// Writes a frame; `version` is [`VERSION`] except in tests of refusal.
pub fn write_frame(w: &mut impl Write, version: u16, kind: u16, payload: &[u8]) -> io::Result<()> {
    w.write_all(&encode_header(version, kind, payload))?;
    w.write_all(payload)
}

/// [`write_frame`] to a link half on a tokio runtime: header and payload
/// are encrypted together and go out in one write.
pub async fn write_frame_async(w: &mut AsyncLinkWriter, kind: u16, payload: &[u8]) -> io::Result<()> {
    let header = encode_header(VERSION, kind, payload);
    w.write_all_pieces(&[&header, payload]).await
}

pub fn encode_header(version: u16, kind: u16, payload: &[u8]) -> [u8; HEADER_LEN] {
    encode_header_of_pieces(version, kind, &[payload])
}

/// The header of a frame whose payload is `pieces` one after another.
pub fn encode_header_of_pieces(version: u16, kind: u16, pieces: &[&[u8]]) -> [u8; HEADER_LEN] {
    let mut crc = crc32fast::Hasher::new();
    let mut len = 0usize;
    for p in pieces {
        crc.update(p);
        len += p.len();
    }
    let mut h = [0u8; HEADER_LEN];
    h[0..4].copy_from_slice(&MAGIC.to_be_bytes());
    h[4..6].copy_from_slice(&version.to_be_bytes());
    h[6..8].copy_from_slice(&kind.to_be_bytes());
    h[8..12].copy_from_slice(&(len as u32).to_be_bytes());
    h[12..16].copy_from_slice(&crc.finalize().to_be_bytes());
    h
}

/// Reads one frame and checks magic, version, length and checksum.
pub fn read_frame(r: &mut impl Read) -> Result<Frame, FrameError> {
    let mut h = [0u8; HEADER_LEN];
    r.read_exact(&mut h).map_err(silent)?;
    let (kind, len, want) = parse_header(&h)?;
    let mut payload = Vec::new();
    read_payload(r, u64::from(len), &mut payload, &format_args!("a frame of kind {kind}")).map_err(silent)?;
    checked(kind, payload, want)
}

/// [`read_frame`] from a link half on a tokio runtime.
pub async fn read_frame_async(r: &mut AsyncLinkReader) -> Result<Frame, FrameError> {
    let mut h = Vec::with_capacity(HEADER_LEN);
    r.read_exact_into(HEADER_LEN, &mut h).await.map_err(silent)?;
    let h = <[u8; HEADER_LEN]>::try_from(h.as_slice())
        .map_err(|_| FrameError::Malformed { what: "frame header", why: format!("{} bytes", h.len()) })?;
    let (kind, len, want) = parse_header(&h)?;
    let mut payload = Vec::new();
    r.read_exact_into(len as usize, &mut payload).await.map_err(silent)?;
    checked(kind, payload, want)
}

/// (kind, payload length, payload CRC) of a frame header that passes its
/// checks.
fn parse_header(h: &[u8; HEADER_LEN]) -> Result<(u16, u32, u32), FrameError> {
    let be32 = |i: usize| u32::from_be_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
    let magic = be32(0);
    if magic != MAGIC {
        return Err(FrameError::BadMagic(magic));
    }
    let version = u16::from_be_bytes([h[4], h[5]]);
    let kind = u16::from_be_bytes([h[6], h[7]]);
    let len = be32(8);
    if version != VERSION {
        return Err(FrameError::Version { got: version });
    }
    if len > MAX_PAYLOAD {
        return Err(FrameError::TooLong { kind, len });
    }
    Ok((kind, len, be32(12)))
}

fn checked(kind: u16, payload: Vec<u8>, want: u32) -> Result<Frame, FrameError> {
    let got = crc32fast::hash(&payload);
    if got != want {
        return Err(FrameError::Checksum { kind, len: payload.len() as u32, got, want });
    }
    Ok(Frame { kind, payload })
}

/// A read timeout (the socket's, set to three heartbeats) means silence.
fn silent(e: io::Error) -> FrameError {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => FrameError::Silent,
        _ => FrameError::Io(e),
    }
}
