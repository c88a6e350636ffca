//! Per disk, an index from block number to the block's versions in the
//! journal (those not yet applied to the replica).
//!
//! A B-tree keyed by (block, lsn): finding the newest version at or before
//! a checkpoint is one descent, whatever the size of the disk, and a
//! version costs about 30 bytes (measured by the journal benchmark).

use std::collections::BTreeMap;

/// The chunk id that stands for a block of zeros (no chunk stored).
pub const ZERO_CHUNK: u32 = u32::MAX;
/// Stands, during replay only, for a chunk garbage collection freed.
pub const MISSING_CHUNK: u32 = u32::MAX - 1;

/// Whether a version's chunk id names a chunk in the store (and holds a
/// reference to it).
pub fn is_stored(chunk: u32) -> bool {
    chunk < MISSING_CHUNK
}

/// One version of one block: its content (chunk id or zero) and the
/// interned stream that wrote it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Version {
    pub chunk: u32,
    pub stream: u16,
}

/// A checkpoint's per-stream cut, resolved to interned stream indexes so
/// that a visibility test is an array lookup.
#[derive(Debug, Clone)]
pub struct CutSet {
    by_stream: Vec<u64>,
    /// The checkpoint record's lsn: the cut of streams it does not name, and
    /// an upper bound of every cut.
    pub max: u64,
}

impl CutSet {
    pub fn new(by_stream: Vec<u64>, max: u64) -> Self {
        CutSet { by_stream, max }
    }

    /// The cut that contains every write: the head of the journal.
    pub fn everything() -> Self {
        CutSet::new(Vec::new(), u64::MAX)
    }

    /// The last lsn of `stream` this cut contains.
    pub fn cut(&self, stream: u16) -> u64 {
        self.by_stream.get(stream as usize).copied().unwrap_or(self.max)
    }

    pub fn visible(&self, lsn: u64, stream: u16) -> bool {
        lsn <= self.cut(stream)
    }
}

#[derive(Debug, Default)]
pub struct DiskIndex {
    map: BTreeMap<(u64, u64), Version>,
}

impl DiskIndex {
    pub fn insert(&mut self, block: u64, lsn: u64, v: Version) {
        self.map.insert((block, lsn), v);
    }

    /// The newest version of `block` visible at `cut`.
    pub fn newest_visible(&self, block: u64, cut: &CutSet) -> Option<(u64, Version)> {
        self.map
            .range((block, 0)..=(block, cut.max))
            .rev()
            .find(|((_, lsn), v)| cut.visible(*lsn, v.stream))
            .map(|(&(_, lsn), &v)| (lsn, v))
    }

    /// For each block in `first..=last` that has a version visible at `cut`,
    /// the newest such version, in block order: one descent of the tree.
    pub fn visible_in_range(&self, first: u64, last: u64, cut: &CutSet, out: &mut Vec<(u64, Version)>) {
        out.clear();
        for (&(b, lsn), &v) in self.map.range((first, 0)..=(last, cut.max)) {
            if lsn > cut.max || !cut.visible(lsn, v.stream) {
                continue;
            }
            match out.last_mut() {
                Some((lb, lv)) if *lb == b => *lv = v,
                _ => out.push((b, v)),
            }
        }
    }

    /// The newest version of `block`, whatever its checkpoint.
    pub fn head(&self, block: u64) -> Option<Version> {
        self.map.range((block, 0)..=(block, u64::MAX)).next_back().map(|(_, &v)| v)
    }

    pub fn get(&self, block: u64, lsn: u64) -> Option<Version> {
        self.map.get(&(block, lsn)).copied()
    }

    pub fn remove(&mut self, block: u64, lsn: u64) -> Option<Version> {
        self.map.remove(&(block, lsn))
    }

    /// Every version, by block then lsn.
    pub fn iter(&self) -> impl Iterator<Item = (u64, u64, Version)> + '_ {
        self.map.iter().map(|(&(b, l), &v)| (b, l, v))
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }
}
