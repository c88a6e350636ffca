//! What the send queue holds: a stream's writes with their bytes, and its
//! checkpoint markers, in stream order.

use crate::wire::msg::{Marker, StreamWrite};
use std::sync::Arc;

/// One write of the stream with its bytes, numbered by the local
/// sequencer (its seq counts from the queue's base).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedWrite {
    pub write: StreamWrite,
    pub data: Arc<Vec<u8>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    Write(QueuedWrite),
    Marker(Marker),
}

impl Entry {
    /// What the entry counts against the queue's memory or spill budget.
    pub fn cost(&self) -> u64 {
        match self {
            Entry::Write(w) => w.data.len() as u64 + 96,
            Entry::Marker(m) => m.name.len() as u64 + 96,
        }
    }
}

#[cfg(test)]
impl QueuedWrite {
    /// A data write of `data` at block `seq` of one fixed disk.
    pub fn for_test(seq: u64, data: Vec<u8>) -> QueuedWrite {
        QueuedWrite {
            write: StreamWrite {
                seq,
                disk: protection_groups::DiskId::from_bytes([1; 16]),
                offset: seq * 4096,
                len: data.len() as u64,
                kind: protection_groups::WriteKind::Data,
                sync: false,
            },
            data: Arc::new(data),
        }
    }
}
