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
