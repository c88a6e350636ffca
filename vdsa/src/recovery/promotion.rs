//! Promotion of a failover's stack (docs/recovery.md, "Promotion"): the
//! journal up to the stack's checkpoint goes into the replica (and what it
//! held after is dropped), then the overlays' blocks are copied onto the
//! replica while the recovered VMs keep writing, and each disk switches to
//! its replica file in place.
//!
//! Every step is redone after a crash: the journal's promotion is
//! idempotent and an overlay block copied twice lands the same. A disk's
//! switch is recorded in the stack's record (with its replica synced)
//! before any request reaches the replica, so a restart never puts the
//! overlay back over writes made to the replica.

use super::error::{Error, Result};
use super::overlay::{write_durably, Overlay, BLOCK};
use super::stack::{Layer, ProcessingStack, ReplicaFile, StackDisk, StackRecord, RECORD_FILE};
use crate::journal::Journal;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Copy passes over blocks rewritten meanwhile before the last one, which
/// holds the disk's writes while it runs.
const MAX_PASSES: usize = 8;
/// A pass that finds no more than this many blocks rewritten is the last.
const LAST_PASS_BLOCKS: usize = 256;
/// Blocks copied in one read and one write.
const RUN_BLOCKS: u64 = 256;

/// How far a promotion got, for the reports.
#[derive(Debug, Default)]
pub struct PromotionProgress {
    /// Blocks the journal wrote into the replica.
    pub journal_blocks: AtomicU64,
    /// Overlay bytes to copy (grows when the VMs write meanwhile).
    pub total_bytes: AtomicU64,
    pub done_bytes: AtomicU64,
}

impl ProcessingStack {
    /// Promotes the stack: afterwards its disks are the replica files, at
    /// the stack's checkpoint plus every write made to the stack. Exports
    /// keep serving throughout; `bytes_per_sec` paces the overlay copy so
    /// that the running VMs keep their I/O (`None`: as fast as it goes).
    pub fn promote(&self, journal: &Journal, bytes_per_sec: Option<u64>, progress: &PromotionProgress) -> Result<()> {
        if self.is_promoted() {
            return Ok(());
        }
        // Blocks rewritten from here on are copied again.
        let mut first_pass = Vec::new();
        for d in &self.disks {
            first_pass.push(match &*d.layer()? {
                Layer::Overlay(o) => o.track_changes()?,
                Layer::Replica(_) => Vec::new(),
            });
        }
        let blocks = journal.promote_to(self.checkpoint)?;
        progress.journal_blocks.store(blocks, Ordering::Relaxed);
        let total: usize = first_pass.iter().map(Vec::len).sum();
        progress.total_bytes.store(total as u64 * BLOCK, Ordering::Relaxed);
        let pace = Pace::new(bytes_per_sec);
        for (d, list) in self.disks.iter().zip(&first_pass) {
            let replica = ReplicaFile::open(&journal.replica_path(d.disk)?)?;
            if let Layer::Overlay(o) = &*d.layer()? {
                copy_blocks(o, &replica, list, &pace, progress)?;
            }
            let mut passes = 1;
            loop {
                let again = match &*d.layer()? {
                    Layer::Overlay(o) => o.take_changed()?,
                    Layer::Replica(_) => break,
                };
                progress.total_bytes.fetch_add(again.len() as u64 * BLOCK, Ordering::Relaxed);
                if again.len() <= LAST_PASS_BLOCKS || passes >= MAX_PASSES {
                    self.switch(d, replica, &again, progress)?;
                    break;
                }
                if let Layer::Overlay(o) = &*d.layer()? {
                    copy_blocks(o, &replica, &again, &pace, progress)?;
                }
                passes += 1;
            }
        }
        for d in &self.disks {
            Overlay::remove_files(&self.dir, &d.disk.0.to_string())?;
        }
        Ok(())
    }

    /// The last pass: with the disk's requests held, copies the blocks
    /// rewritten since the previous pass, syncs the replica, records the
    /// disk as promoted and makes the replica its layer.
    fn switch(&self, d: &StackDisk, replica: ReplicaFile, blocks: &[u64], progress: &PromotionProgress) -> Result<()> {
        let mut layer = d.layer.write().map_err(|_| Error::Failed("the stack disk's layer lock is poisoned".into()))?;
        if let Layer::Overlay(o) = &*layer {
            copy_blocks(o, &replica, blocks, &Pace::new(None), progress)?;
            replica.file.sync_data().map_err(|e| Error::io("syncing", &replica.path, e))?;
            let path = self.dir.join(RECORD_FILE);
            let mut record = StackRecord::read(&path)
                .filter(|r| r.id == self.id && r.checkpoint == self.checkpoint)
                .unwrap_or(StackRecord { id: self.id, checkpoint: self.checkpoint, promoted: Vec::new() });
            if !record.promoted.contains(&d.disk) {
                record.promoted.push(d.disk);
            }
            let bytes = serde_json::to_vec(&record).map_err(|e| Error::Failed(e.to_string()))?;
            write_durably(&path, &bytes)?;
            *layer = Layer::Replica(replica);
        }
        Ok(())
    }
}

/// Copies `blocks` (ascending) of the overlay onto the replica, in runs.
fn copy_blocks(
    o: &Overlay,
    replica: &ReplicaFile,
    blocks: &[u64],
    pace: &Pace,
    progress: &PromotionProgress,
) -> Result<()> {
    let mut buf = Vec::new();
    let mut i = 0;
    while i < blocks.len() {
        let first = blocks[i];
        let mut last = first;
        while i + 1 < blocks.len() && blocks[i + 1] == last + 1 && last + 1 - first < RUN_BLOCKS {
            i += 1;
            last = blocks[i];
        }
        i += 1;
        let offset = first * BLOCK;
        let len = ((last + 1) * BLOCK).min(o.size()) - offset;
        if o.holes(first, last).iter().all(|&h| h) {
            // Trimmed in the overlay: a hole in the replica too.
            super::overlay::zero_range(&replica.file, &replica.path, offset, len, true)?;
        } else {
            buf.resize(len as usize, 0);
            o.read_own(offset, &mut buf)?;
            replica.file.write_all_at(&buf, offset).map_err(|e| Error::io("writing", &replica.path, e))?;
        }
        progress.done_bytes.fetch_add(len, Ordering::Relaxed);
        pace.wait(len);
    }
    Ok(())
}

/// Paces a copy to a rate.
struct Pace {
    bytes_per_sec: Option<u64>,
    start: Instant,
    sent: AtomicU64,
}

impl Pace {
    fn new(bytes_per_sec: Option<u64>) -> Pace {
        Pace { bytes_per_sec: bytes_per_sec.filter(|&r| r > 0), start: Instant::now(), sent: AtomicU64::new(0) }
    }

    fn wait(&self, bytes: u64) {
        let Some(rate) = self.bytes_per_sec else { return };
        let sent = self.sent.fetch_add(bytes, Ordering::Relaxed) + bytes;
        let due = Duration::from_secs_f64(sent as f64 / rate as f64);
        if let Some(ahead) = due.checked_sub(self.start.elapsed()) {
            std::thread::sleep(ahead);
        }
    }
}
