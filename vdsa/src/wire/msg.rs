//! The messages of the replication protocol and their encoding
//! (docs/wire-protocol.md). Decoding never trusts a length or count the
//! peer sends: each is checked against the bytes that are there.

use super::frame::FrameError;
use protection_groups::{CheckpointKind, DiskId, StreamId, VpgId, WriteKind};

pub const HELLO: u16 = 1;
pub const WELCOME: u16 = 2;
pub const REFUSE: u16 = 3;
pub const OFFER: u16 = 4;
pub const NEED: u16 = 5;
pub const BLOCKS: u16 = 6;
pub const ACK: u16 = 7;
pub const HEARTBEAT: u16 = 8;

/// Source → target, first on a link: who is sending what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub site: String,
    pub vpg: VpgId,
    pub stream: StreamId,
    /// The replication direction's epoch; a target refuses older ones.
    pub epoch: u64,
    pub disks: Vec<(DiskId, u64)>,
}

/// Target → source: where to resume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Welcome {
    /// The stream's last write the target holds (0: none); send from the next.
    pub resume_after_seq: u64,
    /// The newest checkpoint id the target recorded from any stream.
    pub last_checkpoint: u64,
}

/// Target → source, then the link closes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refuse {
    pub reason: String,
}

/// A whole aligned block of a data write, as offered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OfferedBlock {
    Zero,
    Hash([u8; 32]),
}

/// A write of a stream, without its bytes: which write it is and what it
/// did to which range (architecture.md §2). The send queue keeps it with
/// the bytes, the wire offers it with the blocks' hashes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamWrite {
    pub seq: u64,
    pub disk: DiskId,
    pub offset: u64,
    pub len: u64,
    pub kind: WriteKind,
    /// Sent by a full or delta sync: the target also counts a block as held
    /// when its current content at that position has the hash.
    pub sync: bool,
}

/// One write of the stream, by its blocks' hashes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OfferedWrite {
    pub write: StreamWrite,
    /// The whole aligned blocks of a data write, in order.
    pub blocks: Vec<OfferedBlock>,
}

/// A checkpoint marker placed in the stream after write `cut_seq`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Marker {
    pub id: u64,
    pub kind: CheckpointKind,
    pub name: String,
    pub source_time_ms: u64,
    pub cut_seq: u64,
    /// How many streams of the VPG place this marker (architecture.md §3).
    pub streams: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OfferItem {
    Write(OfferedWrite),
    Marker(Marker),
}

/// Source → target: a batch of the stream, hashes only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offer {
    pub batch: u64,
    pub epoch: u64,
    pub items: Vec<OfferItem>,
}

/// Target → source: which hashed blocks of the batch it lacks, one bit per
/// [`OfferedBlock::Hash`] in offer order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Need {
    pub batch: u64,
    pub bits: Vec<bool>,
}

/// Source → target: the batch's bytes. For each data write in order: the
/// bytes of a partial first block, the needed whole blocks, the bytes of a
/// partial last block. zstd-compressed as a whole when that pays.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blocks {
    pub batch: u64,
    pub compressed: bool,
    pub raw_len: u32,
    /// The frame's whole payload: the data is read where it arrived, after
    /// the header, never moved (a batch is megabytes).
    payload: Vec<u8>,
}

/// Target → source: what is durable (fsynced) at the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    pub durable_seq: u64,
    /// The stream's markers up to this checkpoint id are placed (recorded,
    /// or waiting for the VPG's other streams): the source may forget them.
    pub durable_checkpoint: u64,
    /// Source time of the newest consistent checkpoint durable at the
    /// target (0: none): the RPO's reference.
    pub newest_consistent_ms: u64,
}

/// Encoder of message payloads.
#[derive(Debug, Default)]
pub struct Enc(pub Vec<u8>);

impl Enc {
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    pub fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.u32(v.len() as u32);
        self.0.extend_from_slice(v);
        self
    }
    pub fn raw(&mut self, v: &[u8]) -> &mut Self {
        self.0.extend_from_slice(v);
        self
    }
}

/// Decoder of message payloads: every read is bounds-checked.
#[derive(Debug)]
pub struct Dec<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Dec<'a> {
    pub fn new(buf: &'a [u8], what: &'static str) -> Self {
        Dec { buf, what }
    }
    fn bad(&self, why: impl Into<String>) -> FrameError {
        FrameError::Malformed { what: self.what, why: why.into() }
    }
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], FrameError> {
        if self.buf.len() < n {
            return Err(self.bad(format!("needs {n} more bytes, {} left", self.buf.len())));
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Ok(a)
    }
    pub fn u8(&mut self) -> Result<u8, FrameError> {
        Ok(self.take(1)?[0])
    }
    pub fn u16(&mut self) -> Result<u16, FrameError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    pub fn u32(&mut self) -> Result<u32, FrameError> {
        let mut a = [0u8; 4];
        a.copy_from_slice(self.take(4)?);
        Ok(u32::from_be_bytes(a))
    }
    pub fn u64(&mut self) -> Result<u64, FrameError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_be_bytes(a))
    }
    pub fn id16(&mut self) -> Result<[u8; 16], FrameError> {
        let mut a = [0u8; 16];
        a.copy_from_slice(self.take(16)?);
        Ok(a)
    }
    pub fn hash(&mut self) -> Result<[u8; 32], FrameError> {
        let mut a = [0u8; 32];
        a.copy_from_slice(self.take(32)?);
        Ok(a)
    }
    pub fn bytes(&mut self) -> Result<&'a [u8], FrameError> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    pub fn string(&mut self) -> Result<String, FrameError> {
        let b = self.bytes()?;
        String::from_utf8(b.to_vec()).map_err(|_| self.bad("a string is not UTF-8"))
    }
    /// A count of items each at least `min_size` bytes long, checked
    /// against what is left (a lying count cannot make us allocate).
    pub fn count(&mut self, min_size: usize) -> Result<usize, FrameError> {
        let n = self.u32()? as usize;
        if n.saturating_mul(min_size.max(1)) > self.buf.len() {
            return Err(self.bad(format!("count {n} exceeds the {} bytes left", self.buf.len())));
        }
        Ok(n)
    }
    pub fn end(&self) -> Result<(), FrameError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(self.bad(format!("{} trailing bytes", self.buf.len())))
        }
    }
}

/// A checkpoint kind's code on the wire (and in the source's spill file).
pub fn kind_code(k: CheckpointKind) -> u8 {
    match k {
        CheckpointKind::Automatic => 1,
        CheckpointKind::Named => 2,
        CheckpointKind::ApplicationConsistent => 3,
        CheckpointKind::Inconsistent => 4,
    }
}

pub fn kind_from_code(code: u8) -> Option<CheckpointKind> {
    Some(match code {
        1 => CheckpointKind::Automatic,
        2 => CheckpointKind::Named,
        3 => CheckpointKind::ApplicationConsistent,
        4 => CheckpointKind::Inconsistent,
        _ => return None,
    })
}

fn kind_from(code: u8, d: &Dec<'_>) -> Result<CheckpointKind, FrameError> {
    kind_from_code(code).ok_or_else(|| d.bad(format!("unknown checkpoint kind {code}")))
}

/// A write kind's code on the wire and in the spill file.
pub fn write_kind_code(k: WriteKind) -> u8 {
    match k {
        WriteKind::Data => 1,
        WriteKind::Zero => 2,
        WriteKind::Trim => 3,
        WriteKind::Resize => 4,
    }
}

pub fn write_kind_from_code(code: u8) -> Option<WriteKind> {
    Some(match code {
        1 => WriteKind::Data,
        2 => WriteKind::Zero,
        3 => WriteKind::Trim,
        4 => WriteKind::Resize,
        _ => return None,
    })
}

impl Hello {
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Enc::default();
        e.bytes(self.site.as_bytes())
            .raw(self.vpg.as_bytes())
            .raw(self.stream.as_bytes())
            .u64(self.epoch)
            .u32(self.disks.len() as u32);
        for (d, size) in &self.disks {
            e.raw(d.as_bytes()).u64(*size);
        }
        e.0
    }
    pub fn decode(p: &[u8]) -> Result<Self, FrameError> {
        let mut d = Dec::new(p, "hello");
        let site = d.string()?;
        let vpg = VpgId::from_bytes(d.id16()?);
        let stream = StreamId::from_bytes(d.id16()?);
        let epoch = d.u64()?;
        let n = d.count(24)?;
        let mut disks = Vec::with_capacity(n);
        for _ in 0..n {
            disks.push((DiskId::from_bytes(d.id16()?), d.u64()?));
        }
        d.end()?;
        Ok(Hello { site, vpg, stream, epoch, disks })
    }
}

impl Welcome {
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Enc::default();
        e.u64(self.resume_after_seq).u64(self.last_checkpoint);
        e.0
    }
    pub fn decode(p: &[u8]) -> Result<Self, FrameError> {
        let mut d = Dec::new(p, "welcome");
        let w = Welcome { resume_after_seq: d.u64()?, last_checkpoint: d.u64()? };
        d.end()?;
        Ok(w)
    }
}

impl Refuse {
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Enc::default();
        e.bytes(self.reason.as_bytes());
        e.0
    }
    pub fn decode(p: &[u8]) -> Result<Self, FrameError> {
        let mut d = Dec::new(p, "refuse");
        let reason = d.string()?;
        d.end()?;
        Ok(Refuse { reason })
    }
}

impl Offer {
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Enc::default();
        e.u64(self.batch).u64(self.epoch).u32(self.items.len() as u32);
        for item in &self.items {
            match item {
                OfferItem::Write(w) => {
                    e.u8(1)
                        .u64(w.write.seq)
                        .raw(w.write.disk.as_bytes())
                        .u64(w.write.offset)
                        .u64(w.write.len)
                        .u8(write_kind_code(w.write.kind))
                        .u8(w.write.sync as u8)
                        .u32(w.blocks.len() as u32);
                    for b in &w.blocks {
                        match b {
                            OfferedBlock::Zero => e.u8(0),
                            OfferedBlock::Hash(h) => e.u8(1).raw(h),
                        };
                    }
                }
                OfferItem::Marker(m) => {
                    e.u8(2)
                        .u64(m.id)
                        .u8(kind_code(m.kind))
                        .bytes(m.name.as_bytes())
                        .u64(m.source_time_ms)
                        .u64(m.cut_seq)
                        .u16(m.streams);
                }
            }
        }
        e.0
    }
    pub fn decode(p: &[u8]) -> Result<Self, FrameError> {
        let mut d = Dec::new(p, "offer");
        let batch = d.u64()?;
        let epoch = d.u64()?;
        let n = d.count(1)?;
        let mut items = Vec::with_capacity(n);
        for _ in 0..n {
            match d.u8()? {
                1 => {
                    let seq = d.u64()?;
                    let disk = DiskId::from_bytes(d.id16()?);
                    let offset = d.u64()?;
                    let len = d.u64()?;
                    let code = d.u8()?;
                    let kind = write_kind_from_code(code).ok_or_else(|| d.bad(format!("unknown write kind {code}")))?;
                    let sync = d.u8()? != 0;
                    let nb = d.count(1)?;
                    let mut blocks = Vec::with_capacity(nb);
                    for _ in 0..nb {
                        blocks.push(match d.u8()? {
                            0 => OfferedBlock::Zero,
                            1 => OfferedBlock::Hash(d.hash()?),
                            t => return Err(d.bad(format!("unknown block tag {t}"))),
                        });
                    }
                    items.push(OfferItem::Write(OfferedWrite {
                        write: StreamWrite { seq, disk, offset, len, kind, sync },
                        blocks,
                    }));
                }
                2 => {
                    let id = d.u64()?;
                    let code = d.u8()?;
                    let kind = kind_from(code, &d)?;
                    let name = d.string()?;
                    let source_time_ms = d.u64()?;
                    let cut_seq = d.u64()?;
                    let streams = d.u16()?;
                    items.push(OfferItem::Marker(Marker { id, kind, name, source_time_ms, cut_seq, streams }));
                }
                t => return Err(d.bad(format!("unknown item tag {t}"))),
            }
        }
        d.end()?;
        Ok(Offer { batch, epoch, items })
    }
}

impl Need {
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Enc::default();
        e.u64(self.batch).u32(self.bits.len() as u32);
        let mut bytes = vec![0u8; self.bits.len().div_ceil(8)];
        for (i, &b) in self.bits.iter().enumerate() {
            if b {
                bytes[i / 8] |= 1 << (i % 8);
            }
        }
        e.raw(&bytes);
        e.0
    }
    pub fn decode(p: &[u8]) -> Result<Self, FrameError> {
        let mut d = Dec::new(p, "need");
        let batch = d.u64()?;
        let n = d.u32()? as usize;
        let bytes = d.take(n.div_ceil(8))?;
        d.end()?;
        let bits = (0..n).map(|i| bytes[i / 8] & (1 << (i % 8)) != 0).collect();
        Ok(Need { batch, bits })
    }
}

impl Blocks {
    pub fn decode(p: &[u8]) -> Result<Self, FrameError> {
        Self::decode_owned(p.to_vec())
    }

    /// Decodes a frame's payload it takes over: the data stays where it is
    /// (a batch is megabytes; a copy would cost more than the decoding).
    pub fn decode_owned(p: Vec<u8>) -> Result<Self, FrameError> {
        let mut d = Dec::new(&p, "blocks");
        let batch = d.u64()?;
        let compressed = d.u8()? != 0;
        let raw_len = d.u32()?;
        Ok(Blocks { batch, compressed, raw_len, payload: p })
    }

    /// The batch's bytes as sent (zstd-compressed if `compressed`).
    pub fn data(&self) -> &[u8] {
        self.payload.get(Self::HEADER_LEN..).unwrap_or_default()
    }

    /// Bytes before the data: batch, compressed flag, raw length.
    pub const HEADER_LEN: usize = 13;

    /// Writes the header into the first [`Blocks::HEADER_LEN`] bytes of
    /// `buf`, which the caller filled with data after them.
    pub fn put_header(buf: &mut [u8], batch: u64, compressed: bool, raw_len: u32) {
        buf[..8].copy_from_slice(&batch.to_be_bytes());
        buf[8] = compressed as u8;
        buf[9..13].copy_from_slice(&raw_len.to_be_bytes());
    }
}

impl Ack {
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Enc::default();
        e.u64(self.durable_seq).u64(self.durable_checkpoint).u64(self.newest_consistent_ms);
        e.0
    }
    pub fn decode(p: &[u8]) -> Result<Self, FrameError> {
        let mut d = Dec::new(p, "ack");
        let a = Ack { durable_seq: d.u64()?, durable_checkpoint: d.u64()?, newest_consistent_ms: d.u64()? };
        d.end()?;
        Ok(a)
    }
}
