//! Values the journal API hands out and takes in.

use protection_groups::{CheckpointId, CheckpointKind, DiskId, StreamId, WriteKind};
use serde::{Deserialize, Serialize};

/// The journal's block size: dedup, index and replica all work in 4 KiB.
pub const BLOCK_SIZE: usize = 4096;

/// Where a stream stands: its last write's position in the journal (lsn)
/// and in the stream (seq). Both grow with every write of the stream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamPosition {
    pub lsn: u64,
    pub seq: u64,
}

/// A stream's position at a checkpoint: its writes up to `lsn` (the last
/// being `seq`) are in the checkpoint, later ones are not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cut {
    pub stream: StreamId,
    pub lsn: u64,
    pub seq: u64,
}

/// A durable checkpoint: a consistent cut across the VPG's streams.
///
/// A stream without a cut of its own is cut at `lsn`, the position of the
/// checkpoint record itself; with one stream that is all a caller needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub id: CheckpointId,
    pub kind: CheckpointKind,
    pub name: String,
    /// When the source placed the checkpoint (ms since the Unix epoch).
    pub source_time_ms: u64,
    /// Position of the checkpoint record in the journal.
    pub lsn: u64,
    pub cuts: Vec<Cut>,
}

impl Cut {
    pub fn position(&self) -> StreamPosition {
        StreamPosition { lsn: self.lsn, seq: self.seq }
    }
}

impl Checkpoint {
    /// The last lsn of `stream` this checkpoint contains.
    pub fn cut_of(&self, stream: StreamId) -> u64 {
        self.cuts.iter().find(|c| c.stream == stream).map_or(self.lsn, |c| c.lsn)
    }
}

/// What a caller asks for when it marks a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointSpec {
    pub id: CheckpointId,
    pub kind: CheckpointKind,
    pub name: String,
    pub source_time_ms: u64,
    /// Per-stream positions (architecture.md §3: where each source VDSA placed its
    /// marker). Streams left out are cut at the checkpoint record.
    pub cuts: Vec<Cut>,
}

/// What a tapped write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteData<'a> {
    Data(&'a [u8]),
    /// WRITE_ZEROES: the range reads as zeros.
    Zero {
        len: u64,
    },
    /// TRIM/discard: recorded as such; the range reads as zeros.
    Trim {
        len: u64,
    },
    /// The disk grows to `size` bytes (the write's offset is 0): a
    /// checkpoint before it keeps the old size.
    Resize {
        size: u64,
    },
}

impl WriteData<'_> {
    pub fn kind(&self) -> WriteKind {
        match self {
            WriteData::Data(_) => WriteKind::Data,
            WriteData::Zero { .. } => WriteKind::Zero,
            WriteData::Trim { .. } => WriteKind::Trim,
            WriteData::Resize { .. } => WriteKind::Resize,
        }
    }

    /// Bytes of the range written (a resize writes none).
    pub fn len(&self) -> u64 {
        match self {
            WriteData::Data(d) => d.len() as u64,
            WriteData::Zero { len } | WriteData::Trim { len } => *len,
            WriteData::Resize { .. } => 0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One write from a tap, numbered by its stream's sequencer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TapWrite<'a> {
    pub seq: u64,
    pub disk: DiskId,
    pub offset: u64,
    pub data: WriteData<'a>,
}

/// A disk the journal protects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskInfo {
    pub id: DiskId,
    pub size: u64,
}

/// Counters an operator or a benchmark looks at.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct JournalStats {
    /// Last lsn assigned.
    pub head_lsn: u64,
    /// Last lsn known durable.
    pub durable_lsn: u64,
    pub disks: usize,
    pub checkpoints: usize,
    /// Block versions in the index (journal entries not yet in the replica).
    pub index_versions: u64,
    /// Distinct chunks referenced by the index or open views.
    pub live_chunks: u64,
    /// Chunks in packs, live or awaiting garbage collection.
    pub stored_chunks: u64,
    /// Bytes of log segments on disk.
    pub log_bytes: u64,
    /// Bytes of chunk packs on disk.
    pub pack_bytes: u64,
    /// Blocks ingested whose content the store already held.
    pub dedup_hits: u64,
    /// Zero blocks recorded without a chunk.
    pub zero_blocks: u64,
    pub open_views: usize,
}

/// How a whole, aligned block of a replicated data write arrives: the
/// sender hashed it and, when the journal said it holds that content, did
/// not send the bytes (architecture.md §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireBlock {
    /// All zeros; no hash, no bytes.
    Zero,
    /// The bytes are in the write's data; `hash` is the sender's blake3.
    Sent { hash: [u8; 32] },
    /// Only the hash came: the journal's chunk store, or the block's head
    /// content at its position, holds it.
    Held { hash: [u8; 32] },
}

/// A question to [`crate::journal::Journal::holds`]: is this content
/// available without its bytes?
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockQuery {
    pub disk: DiskId,
    pub block: u64,
    pub hash: [u8; 32],
    /// Also count the block's current (head) content at `block` (a resync
    /// or a pre-seeded replica), not only the chunk store.
    pub at_position: bool,
}
