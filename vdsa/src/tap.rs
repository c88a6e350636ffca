//! The tap side of a VDSA: every write a hypervisor tap delivers is numbered
//! by the stream's sequencer, put into the stream (here: the journal), and
//! only then acknowledged, unless a checkpoint barrier holds
//! acknowledgements (architecture.md §3).

use crate::journal::{Checkpoint, CheckpointSpec, Cut, Journal, JournalError, StreamPosition, TapWrite, WriteData};
use crate::nbd::export::{BlockExport, ExportError};
use crate::nbd::proto::{EINVAL, EIO, ENOSPC};
use protection_groups::{CheckpointId, CheckpointKind, DiskId, StreamId};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Holds acknowledgements of tap writes while a checkpoint's marker is
/// placed, so that no write acknowledged after the marker can have caused
/// a write before it (architecture.md §3).
#[derive(Debug, Default)]
pub struct CheckpointBarrier {
    state: Mutex<BarrierState>,
    released: Condvar,
}

#[derive(Debug, Default)]
struct BarrierState {
    held: bool,
    /// The last write acknowledged to the tap.
    acked: StreamPosition,
}

impl CheckpointBarrier {
    /// Starts with `acked` as the last acknowledged write (after a restart:
    /// the journal's stream position).
    pub fn new(acked: StreamPosition) -> Self {
        CheckpointBarrier { state: Mutex::new(BarrierState { held: false, acked }), released: Condvar::new() }
    }

    /// Waits while the barrier is held, then records the write as
    /// acknowledged. Call just before replying to the tap. A poisoned
    /// barrier (a thread panicked holding it) refuses: no write is
    /// acknowledged past a barrier that may be held (fail stop).
    pub fn acknowledge(&self, written: StreamPosition) -> Result<(), BarrierPoisoned> {
        let mut st = self.state.lock().map_err(|_| BarrierPoisoned)?;
        while st.held {
            st = self.released.wait(st).map_err(|_| BarrierPoisoned)?;
        }
        if written.seq > st.acked.seq {
            st.acked = written;
        }
        Ok(())
    }

    /// PREPARE: stop acknowledging; returns the last acknowledged write,
    /// where the marker goes.
    pub fn prepare(&self) -> Result<StreamPosition, BarrierPoisoned> {
        let mut st = self.state.lock().map_err(|_| BarrierPoisoned)?;
        st.held = true;
        Ok(st.acked)
    }

    /// COMMIT or ABORT: acknowledge again. (On a poisoned barrier the
    /// waiters wake to refuse.)
    pub fn release(&self) {
        if let Ok(mut st) = self.state.lock() {
            st.held = false;
        }
        self.released.notify_all();
    }
}

/// The barrier's lock was poisoned by a panic: the tap stream stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the checkpoint barrier failed (a thread panicked holding it); the tap stream stops")]
pub struct BarrierPoisoned;

impl From<BarrierPoisoned> for ExportError {
    fn from(e: BarrierPoisoned) -> Self {
        ExportError::new(EIO, e.to_string())
    }
}

/// One stream of tapped writes (one VDSA's writes of one VPG) into a journal.
#[derive(Debug)]
pub struct TapStream {
    journal: Journal,
    stream: StreamId,
    /// The sequencer: the next seq, held while a write is put into the
    /// stream, so that seq order is stream order.
    next_seq: Mutex<u64>,
    barrier: CheckpointBarrier,
    /// Set while a full or bitmap sync runs: checkpoints are then not a
    /// consistent cut (architecture.md §5) and are recorded as inconsistent.
    syncing: AtomicBool,
}

impl TapStream {
    pub fn new(journal: Journal, stream: StreamId) -> Result<Arc<TapStream>, JournalError> {
        let pos = journal.stream_position(stream)?.map(|c| c.position()).unwrap_or_default();
        Ok(Arc::new(TapStream {
            journal,
            stream,
            next_seq: Mutex::new(pos.seq + 1),
            barrier: CheckpointBarrier::new(pos),
            syncing: AtomicBool::new(true),
        }))
    }

    pub fn journal(&self) -> &Journal {
        &self.journal
    }

    /// The stream's last write put into the journal.
    pub fn position(&self) -> Result<Option<Cut>, JournalError> {
        self.journal.stream_position(self.stream)
    }

    pub fn set_syncing(&self, syncing: bool) {
        self.syncing.store(syncing, Ordering::SeqCst);
    }

    pub fn is_syncing(&self) -> bool {
        self.syncing.load(Ordering::SeqCst)
    }

    fn put(&self, disk: DiskId, offset: u64, data: WriteData<'_>) -> Result<(), ExportError> {
        let written = {
            let mut next = self.next_seq.lock().map_err(|_| ExportError::new(EIO, "sequencer poisoned"))?;
            let seq = *next;
            let w = TapWrite { seq, disk, offset, data };
            let lsn = self.journal.ingest(self.stream, &[w]).map_err(to_export_error)?;
            *next += 1;
            StreamPosition { lsn, seq }
        };
        Ok(self.barrier.acknowledge(written)?)
    }

    /// Inserts a checkpoint: holds acknowledgements, cuts the stream after
    /// the last acknowledged write, makes the checkpoint durable, releases.
    pub fn checkpoint(&self, id: CheckpointId, name: &str, kind: CheckpointKind) -> Result<Checkpoint, JournalError> {
        let acked = self.barrier.prepare().map_err(|e| JournalError::Failed(e.to_string()))?;
        let kind = if self.is_syncing() { CheckpointKind::Inconsistent } else { kind };
        let source_time_ms = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO).as_millis() as u64;
        let r = self.journal.mark_checkpoint(CheckpointSpec {
            id,
            kind,
            name: name.to_string(),
            source_time_ms,
            cuts: vec![Cut { stream: self.stream, lsn: acked.lsn, seq: acked.seq }],
        });
        self.barrier.release();
        r
    }
}

fn to_export_error(e: JournalError) -> ExportError {
    let errno = match e {
        JournalError::OutOfRange { .. } => ENOSPC,
        JournalError::DiskFull { .. } => ENOSPC,
        JournalError::InvalidWrite(_) => EINVAL,
        _ => EIO,
    };
    ExportError::new(errno, e.to_string())
}

/// One protected disk as an NBD export: the mirror target of a QEMU block
/// mirror, or any other tap that speaks NBD.
#[derive(Debug)]
pub struct TapDisk {
    pub stream: Arc<TapStream>,
    pub disk: DiskId,
    pub size: u64,
}

impl BlockExport for TapDisk {
    fn size(&self) -> u64 {
        self.size
    }

    /// Serves the head of the journal: what the tap wrote last.
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), ExportError> {
        self.stream.journal.read_head(self.disk, offset, buf).map_err(to_export_error)
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), ExportError> {
        if data.is_empty() {
            return Ok(());
        }
        self.stream.put(self.disk, offset, WriteData::Data(data))
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), ExportError> {
        if len == 0 {
            return Ok(());
        }
        self.stream.put(self.disk, offset, WriteData::Zero { len })
    }

    fn trim(&self, offset: u64, len: u64) -> Result<(), ExportError> {
        if len == 0 {
            return Ok(());
        }
        self.stream.put(self.disk, offset, WriteData::Trim { len })
    }

    /// Makes everything acknowledged so far durable.
    fn flush(&self) -> Result<(), ExportError> {
        self.stream.journal.sync().map(|_| ()).map_err(to_export_error)
    }
}
