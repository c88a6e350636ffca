//! The byte layout of log segments and their records (docs/journal-format.md).
//!
//! A record is framed so that a reader can tell a torn tail (the process or
//! machine died mid-append) from corruption (bytes changed after they were
//! written): header magic, format version, type, payload length, payload,
//! CRC-32C of everything before it, and a trailer repeating the length and a
//! second magic.

use super::model::{Checkpoint, Cut};
use protection_groups::{CheckpointId, CheckpointKind, DiskId, StreamId, WriteKind};

pub const FORMAT_VERSION: u8 = 1;

pub const SEGMENT_MAGIC: &[u8; 8] = b"VDSALOG1";
pub const SEGMENT_HEADER_LEN: usize = 32;
pub const RECORD_MAGIC: u32 = 0x4A52_4E4C; // "JRNL"
pub const TRAILER_MAGIC: u32 = 0x4C4E_524A; // "LNRJ"
pub const RECORD_HEADER_LEN: usize = 12;
pub const RECORD_TRAILER_LEN: usize = 12;
/// Refuses a length field larger than this before allocating for it.
pub const MAX_PAYLOAD: usize = 64 << 20;

/// The longest checkpoint name, in bytes of UTF-8. Names come from
/// operators and control clients: bounded so that every record fits far
/// inside `MAX_PAYLOAD`.
pub const MAX_CHECKPOINT_NAME: usize = 1024;

/// Why `name` cannot be a checkpoint's name, if it cannot: the one check
/// for the journal and for a source that queues a marker.
pub fn check_checkpoint_name(name: &str) -> Result<(), String> {
    if name.len() > MAX_CHECKPOINT_NAME {
        return Err(format!("its name is {} bytes; at most {MAX_CHECKPOINT_NAME} are kept", name.len()));
    }
    Ok(())
}

pub const TYPE_WRITE: u8 = 1;
pub const TYPE_CHECKPOINT: u8 = 2;
pub const TYPE_COMMIT: u8 = 3;
pub const TYPE_DROP_CHECKPOINT: u8 = 4;

/// A block's content as a record names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockRef {
    Zero,
    Chunk([u8; 32]),
}

/// One logged write. `blocks` lists the content of every block the write
/// touched, after read-modify-write of partial blocks; for zero and trim
/// writes it lists only the partial edge blocks (interior blocks are zero).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteRecord {
    pub lsn: u64,
    pub stream: StreamId,
    pub seq: u64,
    pub disk: DiskId,
    pub kind: WriteKind,
    pub offset: u64,
    pub len: u64,
    pub blocks: Vec<(u64, BlockRef)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    Write(WriteRecord),
    Checkpoint(Checkpoint),
    /// Group commit: everything before it was made durable, packs first.
    Commit {
        lsn: u64,
    },
    /// A sparse tier dropped this checkpoint.
    DropCheckpoint {
        id: CheckpointId,
    },
}

pub fn segment_header(segment_no: u64) -> [u8; SEGMENT_HEADER_LEN] {
    let mut h = [0u8; SEGMENT_HEADER_LEN];
    h[..8].copy_from_slice(SEGMENT_MAGIC);
    h[8..12].copy_from_slice(&u32::from(FORMAT_VERSION).to_le_bytes());
    h[12..20].copy_from_slice(&segment_no.to_le_bytes());
    let crc = crc32c(&h[..20]);
    h[20..24].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Why a segment header is unusable.
#[derive(Debug)]
pub enum HeaderError {
    Short,
    BadMagic,
    BadChecksum,
    Version(u32),
}

pub fn parse_segment_header(bytes: &[u8]) -> Result<u64, HeaderError> {
    if bytes.len() < SEGMENT_HEADER_LEN {
        return Err(HeaderError::Short);
    }
    if &bytes[..8] != SEGMENT_MAGIC {
        return Err(HeaderError::BadMagic);
    }
    if crc32c(&bytes[..20]) != le_u32(&bytes[20..24]) {
        return Err(HeaderError::BadChecksum);
    }
    let version = le_u32(&bytes[8..12]);
    if version != u32::from(FORMAT_VERSION) {
        return Err(HeaderError::Version(version));
    }
    Ok(le_u64(&bytes[12..20]))
}

pub fn crc32c(bytes: &[u8]) -> u32 {
    crc32fast::hash(bytes)
}

fn le_u32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_le_bytes(a)
}

fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

/// Whether records of this type are appended only after everything
/// before them is durable (see `Log::commit`).
pub fn is_commit_class(kind: u8) -> bool {
    matches!(kind, TYPE_CHECKPOINT | TYPE_COMMIT | TYPE_DROP_CHECKPOINT)
}

/// Appends one framed record to `out`. A record larger than a reader
/// accepts is refused (and `out` left as it was): what cannot be read back
/// is never written, let alone acknowledged.
pub fn encode_record(record: &Record, out: &mut Vec<u8>) -> Result<(), String> {
    let start = out.len();
    out.extend_from_slice(&RECORD_MAGIC.to_le_bytes());
    out.push(FORMAT_VERSION);
    out.push(record_type(record));
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&[0, 0, 0, 0]); // payload length, patched below
    let payload_start = out.len();
    encode_payload(record, out);
    let payload_len = out.len() - payload_start;
    if payload_len > MAX_PAYLOAD {
        out.truncate(start);
        return Err(format!("a record of {payload_len} bytes exceeds the largest a reader accepts ({MAX_PAYLOAD})"));
    }
    let len32 = payload_len as u32;
    out[start + 8..start + 12].copy_from_slice(&len32.to_le_bytes());
    let crc = crc32c(&out[start + 4..]);
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(&len32.to_le_bytes());
    out.extend_from_slice(&TRAILER_MAGIC.to_le_bytes());
    Ok(())
}

fn record_type(record: &Record) -> u8 {
    match record {
        Record::Write(_) => TYPE_WRITE,
        Record::Checkpoint(_) => TYPE_CHECKPOINT,
        Record::Commit { .. } => TYPE_COMMIT,
        Record::DropCheckpoint { .. } => TYPE_DROP_CHECKPOINT,
    }
}

fn encode_payload(record: &Record, out: &mut Vec<u8>) {
    match record {
        Record::Write(w) => {
            out.extend_from_slice(&w.lsn.to_le_bytes());
            out.extend_from_slice(w.stream.as_bytes());
            out.extend_from_slice(&w.seq.to_le_bytes());
            out.extend_from_slice(w.disk.as_bytes());
            out.push(write_kind_code(w.kind));
            out.extend_from_slice(&w.offset.to_le_bytes());
            out.extend_from_slice(&w.len.to_le_bytes());
            out.extend_from_slice(&(w.blocks.len() as u32).to_le_bytes());
            for (block, r) in &w.blocks {
                out.extend_from_slice(&block.to_le_bytes());
                match r {
                    BlockRef::Zero => out.push(0),
                    BlockRef::Chunk(h) => {
                        out.push(1);
                        out.extend_from_slice(h);
                    }
                }
            }
        }
        Record::Checkpoint(c) => {
            out.extend_from_slice(&c.lsn.to_le_bytes());
            out.extend_from_slice(&c.id.0.to_le_bytes());
            out.push(kind_code(c.kind));
            out.extend_from_slice(&c.source_time_ms.to_le_bytes());
            let name = c.name.as_bytes();
            out.extend_from_slice(&(name.len() as u32).to_le_bytes());
            out.extend_from_slice(name);
            out.extend_from_slice(&(c.cuts.len() as u32).to_le_bytes());
            for cut in &c.cuts {
                out.extend_from_slice(cut.stream.as_bytes());
                out.extend_from_slice(&cut.lsn.to_le_bytes());
                out.extend_from_slice(&cut.seq.to_le_bytes());
            }
        }
        Record::Commit { lsn } => out.extend_from_slice(&lsn.to_le_bytes()),
        Record::DropCheckpoint { id } => out.extend_from_slice(&id.0.to_le_bytes()),
    }
}

/// A write kind's code in the log (docs/journal-format.md).
fn write_kind_code(kind: WriteKind) -> u8 {
    match kind {
        WriteKind::Data => 0,
        WriteKind::Zero => 1,
        WriteKind::Trim => 2,
        WriteKind::Resize => 3,
    }
}

fn kind_code(kind: CheckpointKind) -> u8 {
    match kind {
        CheckpointKind::Automatic => 0,
        CheckpointKind::Named => 1,
        CheckpointKind::ApplicationConsistent => 2,
        CheckpointKind::Inconsistent => 3,
    }
}

fn kind_from_code(code: u8) -> Option<CheckpointKind> {
    Some(match code {
        0 => CheckpointKind::Automatic,
        1 => CheckpointKind::Named,
        2 => CheckpointKind::ApplicationConsistent,
        3 => CheckpointKind::Inconsistent,
        _ => return None,
    })
}

/// The outcome of reading a frame at some offset of a segment.
#[derive(Debug)]
pub enum Frame<'a> {
    /// A whole, checksummed frame: its type, payload and total length.
    Ok { kind: u8, payload: &'a [u8], len: usize },
    /// The bytes end before the frame does.
    Incomplete,
    /// The bytes are all there but are not a valid frame.
    Invalid(String),
}

pub fn read_frame(buf: &[u8]) -> Frame<'_> {
    if buf.len() < RECORD_HEADER_LEN {
        return Frame::Incomplete;
    }
    if le_u32(&buf[0..4]) != RECORD_MAGIC {
        return Frame::Invalid("bad record magic".into());
    }
    if buf[4] != FORMAT_VERSION {
        return Frame::Invalid(format!("record format version {} (expected {FORMAT_VERSION})", buf[4]));
    }
    let payload_len = le_u32(&buf[8..12]) as usize;
    if payload_len > MAX_PAYLOAD {
        return Frame::Invalid(format!("record length {payload_len} exceeds {MAX_PAYLOAD}"));
    }
    let total = RECORD_HEADER_LEN + payload_len + RECORD_TRAILER_LEN;
    if buf.len() < total {
        return Frame::Incomplete;
    }
    let body_end = RECORD_HEADER_LEN + payload_len;
    let crc = le_u32(&buf[body_end..body_end + 4]);
    if crc32c(&buf[4..body_end]) != crc {
        return Frame::Invalid("record checksum mismatch".into());
    }
    if le_u32(&buf[body_end + 4..body_end + 8]) as usize != payload_len
        || le_u32(&buf[body_end + 8..body_end + 12]) != TRAILER_MAGIC
    {
        return Frame::Invalid("record trailer mismatch".into());
    }
    Frame::Ok { kind: buf[5], payload: &buf[RECORD_HEADER_LEN..body_end], len: total }
}

/// A bounds-checked little-endian reader over a payload.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        match end {
            Some(end) => {
                let s = &self.buf[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => Err(format!("payload ends at {} but {} more bytes are needed", self.buf.len(), n)),
        }
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(le_u32(self.take(4)?))
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(le_u64(self.take(8)?))
    }
    fn id16(&mut self) -> Result<[u8; 16], String> {
        let mut a = [0u8; 16];
        a.copy_from_slice(self.take(16)?);
        Ok(a)
    }
    fn done(&self) -> Result<(), String> {
        if self.pos == self.buf.len() {
            Ok(())
        } else {
            Err(format!("{} trailing payload bytes", self.buf.len() - self.pos))
        }
    }
}

/// Parses a checksummed payload. An error here means a writer bug or a
/// checksum collision: it is reported as corruption.
pub fn decode_payload(kind: u8, payload: &[u8]) -> Result<Record, String> {
    let mut r = Reader { buf: payload, pos: 0 };
    let rec = match kind {
        TYPE_WRITE => {
            let lsn = r.u64()?;
            let stream = StreamId::from_bytes(r.id16()?);
            let seq = r.u64()?;
            let disk = DiskId::from_bytes(r.id16()?);
            let kind = match r.u8()? {
                0 => WriteKind::Data,
                1 => WriteKind::Zero,
                2 => WriteKind::Trim,
                3 => WriteKind::Resize,
                other => return Err(format!("unknown write kind {other}")),
            };
            let offset = r.u64()?;
            let len = r.u64()?;
            let n = r.u32()? as usize;
            if n > payload.len() / 9 {
                return Err(format!("block count {n} cannot fit the payload"));
            }
            let mut blocks = Vec::with_capacity(n);
            for _ in 0..n {
                let block = r.u64()?;
                let r = match r.u8()? {
                    0 => BlockRef::Zero,
                    1 => {
                        let mut h = [0u8; 32];
                        h.copy_from_slice(r.take(32)?);
                        BlockRef::Chunk(h)
                    }
                    other => return Err(format!("unknown block tag {other}")),
                };
                blocks.push((block, r));
            }
            if kind == WriteKind::Resize && (offset != 0 || !blocks.is_empty()) {
                return Err("a resize record with an offset or blocks".into());
            }
            Record::Write(WriteRecord { lsn, stream, seq, disk, kind, offset, len, blocks })
        }
        TYPE_CHECKPOINT => {
            let lsn = r.u64()?;
            let id = CheckpointId(r.u64()?);
            let kind = kind_from_code(r.u8()?).ok_or("unknown checkpoint kind")?;
            let source_time_ms = r.u64()?;
            let name_len = r.u32()? as usize;
            let name = String::from_utf8(r.take(name_len)?.to_vec()).map_err(|_| "checkpoint name is not UTF-8")?;
            let n = r.u32()? as usize;
            if n > payload.len() / 32 {
                return Err(format!("cut count {n} cannot fit the payload"));
            }
            let mut cuts = Vec::with_capacity(n);
            for _ in 0..n {
                cuts.push(Cut { stream: StreamId::from_bytes(r.id16()?), lsn: r.u64()?, seq: r.u64()? });
            }
            Record::Checkpoint(Checkpoint { id, kind, name, source_time_ms, lsn, cuts })
        }
        TYPE_COMMIT => Record::Commit { lsn: r.u64()? },
        TYPE_DROP_CHECKPOINT => Record::DropCheckpoint { id: CheckpointId(r.u64()?) },
        other => return Err(format!("unknown record type {other}")),
    };
    r.done()?;
    Ok(rec)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<Record> {
        vec![
            Record::Write(WriteRecord {
                lsn: 7,
                stream: StreamId::new(),
                seq: 3,
                disk: DiskId::new(),
                kind: WriteKind::Data,
                offset: 4096 + 17,
                len: 9000,
                blocks: vec![(1, BlockRef::Chunk([9; 32])), (2, BlockRef::Zero), (3, BlockRef::Chunk([1; 32]))],
            }),
            Record::Checkpoint(Checkpoint {
                id: CheckpointId(4),
                kind: CheckpointKind::Named,
                name: "before patch".into(),
                source_time_ms: 123,
                lsn: 8,
                cuts: vec![Cut { stream: StreamId::new(), lsn: 7, seq: 3 }],
            }),
            Record::Commit { lsn: 8 },
            Record::DropCheckpoint { id: CheckpointId(2) },
        ]
    }

    #[test]
    fn a_record_larger_than_a_reader_accepts_is_refused_and_nothing_written() {
        let mut big = sample()[1].clone();
        if let Record::Checkpoint(c) = &mut big {
            c.name = "x".repeat(MAX_PAYLOAD + 1);
        }
        let mut buf = vec![7u8];
        assert!(encode_record(&big, &mut buf).is_err());
        assert_eq!(buf, vec![7u8]);
    }

    #[test]
    fn records_round_trip() {
        for rec in sample() {
            let mut buf = Vec::new();
            assert_eq!(encode_record(&rec, &mut buf), Ok(()));
            match read_frame(&buf) {
                Frame::Ok { kind, payload, len } => {
                    assert_eq!(len, buf.len());
                    assert_eq!(decode_payload(kind, payload).ok(), Some(rec));
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn torn_and_flipped_frames_are_told_apart() {
        let mut buf = Vec::new();
        assert_eq!(encode_record(&sample()[0], &mut buf), Ok(()));
        for cut in 0..buf.len() {
            assert!(matches!(read_frame(&buf[..cut]), Frame::Incomplete), "cut at {cut}");
        }
        for i in 0..buf.len() {
            let mut bad = buf.clone();
            bad[i] ^= 0x40;
            assert!(!matches!(read_frame(&bad), Frame::Ok { .. }), "flip at {i} went unnoticed");
        }
    }
}
