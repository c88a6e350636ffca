//! A processing stack: a VPG's disks at one checkpoint, read through a
//! pinned journal view, each disk with its private write overlay and
//! served as an NBD export (docs/recovery.md).

use super::error::{Error, Result};
use super::overlay::{Overlay, BLOCK};
use crate::journal::{Journal, PitView};
use crate::nbd::proto::{EINVAL, EIO, ENOSPC, STATE_HOLE, STATE_ZERO};
use crate::nbd::server::{BlockExport, ExportError, Extent};
use protection_groups::{CheckpointId, DiskId, StackId};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// What `stack.json` records, so that a restarted VDSA reopens a stack's
/// overlays only at the checkpoint they were written over.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct StackRecord {
    id: StackId,
    checkpoint: CheckpointId,
}

/// The most a block status answer covers (the client asks again from
/// where it stopped).
const STATUS_SPAN: u64 = 1 << 30;

/// One VPG's disks at one checkpoint, with private overlays.
#[derive(Debug)]
pub struct ProcessingStack {
    pub id: StackId,
    pub checkpoint: CheckpointId,
    dir: PathBuf,
    disks: Vec<Arc<StackDisk>>,
}

/// One disk of a stack: what its NBD export serves.
#[derive(Debug)]
pub struct StackDisk {
    pub disk: DiskId,
    view: Arc<PitView>,
    overlay: Overlay,
}

impl ProcessingStack {
    /// Opens stack `id` of `journal` at `checkpoint` in `dir`: its overlays
    /// are kept if they were made over the same checkpoint (a VDSA
    /// restart), else started empty. Opening copies nothing: its cost does
    /// not grow with disk or journal size.
    pub fn open(journal: &Journal, dir: &Path, id: StackId, checkpoint: CheckpointId) -> Result<ProcessingStack> {
        let view = Arc::new(journal.open_view(checkpoint)?);
        let record_path = dir.join("stack.json");
        let want = StackRecord { id, checkpoint };
        let existing: Option<StackRecord> =
            std::fs::read(&record_path).ok().and_then(|b| serde_json::from_slice(&b).ok());
        if existing.as_ref() != Some(&want) && dir.exists() {
            std::fs::remove_dir_all(dir).map_err(|e| Error::io("clearing", dir, e))?;
        }
        std::fs::create_dir_all(dir).map_err(|e| Error::io("creating", dir, e))?;
        if existing.as_ref() != Some(&want) {
            let bytes = serde_json::to_vec(&want).map_err(|e| Error::Failed(e.to_string()))?;
            std::fs::write(&record_path, bytes).map_err(|e| Error::io("writing", &record_path, e))?;
        }
        let mut disks = Vec::new();
        for info in journal.disks()? {
            let size = view.disk_size(info.id)?;
            let overlay = Overlay::open(dir, &info.id.0.to_string(), size)?;
            disks.push(Arc::new(StackDisk { disk: info.id, view: view.clone(), overlay }));
        }
        Ok(ProcessingStack { id, checkpoint, dir: dir.to_path_buf(), disks })
    }

    pub fn disks(&self) -> &[Arc<StackDisk>] {
        &self.disks
    }

    /// Bytes its users wrote since it was opened.
    pub fn written_bytes(&self) -> u64 {
        self.disks.iter().map(|d| d.overlay.written_bytes()).sum()
    }

    /// What its overlays occupy on the volume.
    pub fn allocated_bytes(&self) -> u64 {
        self.disks.iter().map(|d| d.overlay.allocated_bytes()).sum()
    }

    /// Makes every write to it durable (before it is handed over, e.g.
    /// promoted into the replica).
    pub fn flush(&self) -> Result<()> {
        self.disks.iter().try_for_each(|d| d.overlay.flush())
    }

    /// Discards the stack: its overlays' space is freed and its pin on the
    /// journal released. Exports of it must be gone first (a client still
    /// connected keeps the files open until it leaves).
    pub fn discard(self) -> Result<()> {
        let dir = self.dir.clone();
        drop(self);
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io("removing", &dir, e)),
        }
    }
}

impl StackDisk {
    fn base(&self) -> impl Fn(u64, &mut [u8]) -> Result<()> + '_ {
        move |offset, buf| Ok(self.view.read(self.disk, offset, buf)?)
    }

    /// Bytes written to this disk's overlay since the stack was opened.
    pub fn written_bytes(&self) -> u64 {
        self.overlay.written_bytes()
    }
}

fn export_error(e: Error) -> ExportError {
    let errno = match &e {
        Error::DiskFull { .. } => ENOSPC,
        Error::OutOfRange { .. } => EINVAL,
        _ => EIO,
    };
    ExportError::new(errno, e.to_string())
}

impl BlockExport for StackDisk {
    fn size(&self) -> u64 {
        self.overlay.size()
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> std::result::Result<(), ExportError> {
        self.overlay.read(offset, buf, &self.base()).map_err(export_error)
    }

    fn write(&self, offset: u64, data: &[u8]) -> std::result::Result<(), ExportError> {
        self.overlay.write(offset, data, &self.base()).map_err(export_error)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> std::result::Result<(), ExportError> {
        self.overlay.zero(offset, len, false, &self.base()).map_err(export_error)
    }

    fn write_zeroes_may_punch(&self, offset: u64, len: u64) -> std::result::Result<(), ExportError> {
        self.overlay.zero(offset, len, true, &self.base()).map_err(export_error)
    }

    fn trim(&self, offset: u64, len: u64) -> std::result::Result<(), ExportError> {
        self.overlay.zero(offset, len, true, &self.base()).map_err(export_error)
    }

    fn flush(&self) -> std::result::Result<(), ExportError> {
        self.overlay.flush().map_err(export_error)
    }

    /// Overlay blocks are data unless trimmed (a hole); the others are as
    /// the view sees them (a zero block or a replica hole reads zeroes and
    /// holds nothing).
    fn block_status(&self, offset: u64, len: u64) -> std::result::Result<Vec<Extent>, ExportError> {
        let len = len.min(STATUS_SPAN);
        let end = offset + len;
        let (first, last) = (offset / BLOCK, (end - 1) / BLOCK);
        let below = self.view.zero_runs(self.disk, offset, len).map_err(|e| export_error(e.into()))?;
        let holes = self.overlay.holes(first, last);
        let mut below = below.into_iter();
        let (mut run_left, mut run_zero) = below.next().unwrap_or((len, false));
        let mut out: Vec<Extent> = Vec::new();
        for b in first..=last {
            let (lo, hi) = ((b * BLOCK).max(offset), ((b + 1) * BLOCK).min(end));
            let mut piece = hi - lo;
            // The view's answer for these bytes (its runs cover the range
            // exactly, so consume `piece` bytes of them).
            let mut zero_below = true;
            while piece > 0 {
                let take = piece.min(run_left);
                zero_below &= run_zero;
                piece -= take;
                run_left -= take;
                if run_left == 0 {
                    (run_left, run_zero) = below.next().unwrap_or((u64::MAX, false));
                }
            }
            let state = if self.overlay.is_written(b) {
                if holes[(b - first) as usize] {
                    STATE_HOLE | STATE_ZERO
                } else {
                    0
                }
            } else if zero_below {
                STATE_HOLE | STATE_ZERO
            } else {
                0
            };
            match out.last_mut() {
                Some(e) if e.state == state => e.length += hi - lo,
                _ => out.push(Extent { length: hi - lo, state }),
            }
        }
        Ok(out)
    }
}
