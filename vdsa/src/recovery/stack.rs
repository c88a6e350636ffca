//! A processing stack: a VPG's disks at one checkpoint, read through a
//! pinned journal view, each disk with its private write overlay and
//! served as an NBD export (docs/recovery.md). Once promoted, each disk is
//! its replica file itself.

use super::error::{Error, Result};
use super::overlay::{check_range, holes, zero_range, Overlay, BLOCK};
use crate::journal::{Journal, PitView};
use crate::nbd::export::{BlockExport, ExportError, Extent};
use crate::nbd::proto::{EINVAL, EIO, ENOSPC, STATE_HOLE, STATE_ZERO};
use protection_groups::{CheckpointId, DiskId, StackId};
use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock, RwLockReadGuard};

/// What `stack.json` records, so that a restarted VDSA reopens a stack's
/// overlays only at the checkpoint they were written over, and a promoted
/// stack as its replica files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct StackRecord {
    pub id: StackId,
    pub checkpoint: CheckpointId,
    /// Disks whose promotion switched them to their replica file.
    #[serde(default)]
    pub promoted: Vec<DiskId>,
}

impl StackRecord {
    pub(super) fn read(path: &Path) -> Option<StackRecord> {
        std::fs::read(path).ok().and_then(|b| serde_json::from_slice(&b).ok())
    }
}

pub(super) const RECORD_FILE: &str = "stack.json";

/// The most a block status answer covers (the client asks again from
/// where it stopped).
const STATUS_SPAN: u64 = 1 << 30;

/// One VPG's disks at one checkpoint, with private overlays.
#[derive(Debug)]
pub struct ProcessingStack {
    pub id: StackId,
    pub checkpoint: CheckpointId,
    pub(super) dir: PathBuf,
    pub(super) disks: Vec<Arc<StackDisk>>,
}

/// One disk of a stack: what its NBD export serves.
#[derive(Debug)]
pub struct StackDisk {
    pub disk: DiskId,
    pub(super) view: Arc<PitView>,
    size: u64,
    /// Where writes go: the overlay, or (promoted) the replica. A
    /// promotion's last step swaps it while no request is in flight.
    pub(super) layer: RwLock<Layer>,
}

/// The top of a stack's disk.
#[derive(Debug)]
pub(super) enum Layer {
    /// The private overlay over the view.
    Overlay(Overlay),
    /// Promoted: the replica file, read and written in place.
    Replica(ReplicaFile),
}

/// A disk's replica file, once the stack owns it.
#[derive(Debug)]
pub(super) struct ReplicaFile {
    pub file: File,
    pub path: PathBuf,
}

impl ReplicaFile {
    pub(super) fn open(path: &Path) -> Result<ReplicaFile> {
        let file = OpenOptions::new().read(true).write(true).open(path).map_err(|e| Error::io("opening", path, e))?;
        Ok(ReplicaFile { file, path: path.to_path_buf() })
    }
}

impl ProcessingStack {
    /// Opens stack `id` of `journal` at `checkpoint` in `dir`: its overlays
    /// are kept if they were made over the same checkpoint (a VDSA
    /// restart), else started empty. Opening copies nothing: its cost does
    /// not grow with disk or journal size.
    pub fn open(journal: &Journal, dir: &Path, id: StackId, checkpoint: CheckpointId) -> Result<ProcessingStack> {
        let view = Arc::new(journal.open_view(checkpoint)?);
        let record_path = dir.join(RECORD_FILE);
        let existing = StackRecord::read(&record_path);
        let same = existing.as_ref().is_some_and(|r| r.id == id && r.checkpoint == checkpoint);
        if !same && dir.exists() {
            std::fs::remove_dir_all(dir).map_err(|e| Error::io("clearing", dir, e))?;
        }
        std::fs::create_dir_all(dir).map_err(|e| Error::io("creating", dir, e))?;
        if !same {
            let bytes = serde_json::to_vec(&StackRecord { id, checkpoint, promoted: Vec::new() })
                .map_err(|e| Error::Failed(e.to_string()))?;
            std::fs::write(&record_path, bytes).map_err(|e| Error::io("writing", &record_path, e))?;
        }
        let promoted = existing.filter(|_| same).map(|r| r.promoted).unwrap_or_default();
        let mut disks = Vec::new();
        for info in journal.disks()? {
            let size = view.disk_size(info.id)?;
            let name = info.id.0.to_string();
            let layer = if promoted.contains(&info.id) {
                // A crash may have come between the record and the removal.
                Overlay::remove_files(dir, &name)?;
                Layer::Replica(ReplicaFile::open(&journal.replica_path(info.id)?)?)
            } else {
                Layer::Overlay(Overlay::open(dir, &name, size)?)
            };
            disks.push(Arc::new(StackDisk { disk: info.id, view: view.clone(), size, layer: RwLock::new(layer) }));
        }
        Ok(ProcessingStack { id, checkpoint, dir: dir.to_path_buf(), disks })
    }

    pub fn disks(&self) -> &[Arc<StackDisk>] {
        &self.disks
    }

    /// Bytes its users wrote to its overlays since it was opened.
    pub fn written_bytes(&self) -> u64 {
        self.disks.iter().map(|d| d.written_bytes()).sum()
    }

    /// What its overlays occupy on the volume.
    pub fn allocated_bytes(&self) -> u64 {
        self.disks
            .iter()
            .map(|d| match d.layer().as_deref() {
                Ok(Layer::Overlay(o)) => o.allocated_bytes(),
                _ => 0,
            })
            .sum()
    }

    /// Makes every write to it durable.
    pub fn flush(&self) -> Result<()> {
        self.disks.iter().try_for_each(|d| d.flush_layer())
    }

    /// Whether its disks are their replica files (a finished promotion).
    pub fn is_promoted(&self) -> bool {
        self.disks.iter().all(|d| matches!(d.layer().as_deref(), Ok(Layer::Replica(_))))
    }

    /// Discards a stack others may still hold (a promotion thread): its
    /// folder goes now, its pin on the journal when the last holder lets go.
    pub fn discard_shared(stack: Arc<ProcessingStack>) -> Result<()> {
        match Arc::try_unwrap(stack) {
            Ok(stack) => stack.discard(),
            Err(shared) => match std::fs::remove_dir_all(&shared.dir) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(Error::io("removing", &shared.dir, e)),
            },
        }
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

    /// The layer, for one request (a promotion's switch waits for it).
    pub(super) fn layer(&self) -> std::result::Result<RwLockReadGuard<'_, Layer>, Error> {
        self.layer.read().map_err(|_| Error::Failed("the stack disk's layer lock is poisoned".into()))
    }

    /// Bytes written to this disk's overlay since the stack was opened.
    pub fn written_bytes(&self) -> u64 {
        match self.layer().as_deref() {
            Ok(Layer::Overlay(o)) => o.written_bytes(),
            _ => 0,
        }
    }

    fn flush_layer(&self) -> Result<()> {
        match &*self.layer()? {
            Layer::Overlay(o) => o.flush(),
            Layer::Replica(r) => r.file.sync_data().map_err(|e| Error::io("syncing", &r.path, e)),
        }
    }

    fn check(&self, offset: u64, len: u64) -> Result<()> {
        check_range(offset, len, self.size)
    }

    fn zero(&self, offset: u64, len: u64, punch: bool) -> Result<()> {
        match &*self.layer()? {
            Layer::Overlay(o) => o.zero(offset, len, punch, &self.base()),
            Layer::Replica(r) => {
                self.check(offset, len)?;
                zero_range(&r.file, &r.path, offset, len, punch)
            }
        }
    }
}

/// Appends `length` bytes in `state`, merged into the last extent when it
/// is in the same state.
fn push_extent(out: &mut Vec<Extent>, length: u64, state: u32) {
    match out.last_mut() {
        Some(e) if e.state == state => e.length += length,
        _ => out.push(Extent { length, state }),
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
        self.size
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> std::result::Result<(), ExportError> {
        let r = self.layer().and_then(|layer| match &*layer {
            Layer::Overlay(o) => o.read(offset, buf, &self.base()),
            Layer::Replica(r) => self
                .check(offset, buf.len() as u64)
                .and_then(|()| r.file.read_exact_at(buf, offset).map_err(|e| Error::io("reading", &r.path, e))),
        });
        r.map_err(export_error)
    }

    fn write(&self, offset: u64, data: &[u8]) -> std::result::Result<(), ExportError> {
        let r = self.layer().and_then(|layer| match &*layer {
            Layer::Overlay(o) => o.write(offset, data, &self.base()),
            Layer::Replica(r) => self
                .check(offset, data.len() as u64)
                .and_then(|()| r.file.write_all_at(data, offset).map_err(|e| Error::io("writing", &r.path, e))),
        });
        r.map_err(export_error)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> std::result::Result<(), ExportError> {
        self.zero(offset, len, false).map_err(export_error)
    }

    fn write_zeroes_may_punch(&self, offset: u64, len: u64) -> std::result::Result<(), ExportError> {
        self.zero(offset, len, true).map_err(export_error)
    }

    fn trim(&self, offset: u64, len: u64) -> std::result::Result<(), ExportError> {
        self.zero(offset, len, true).map_err(export_error)
    }

    fn flush(&self) -> std::result::Result<(), ExportError> {
        self.flush_layer().map_err(export_error)
    }

    /// Overlay blocks are data unless trimmed (a hole); the others are as
    /// the view sees them (a zero block or a replica hole reads zeroes and
    /// holds nothing).
    fn block_status(&self, offset: u64, len: u64) -> std::result::Result<Vec<Extent>, ExportError> {
        let len = len.min(STATUS_SPAN);
        let end = offset + len;
        let (first, last) = (offset / BLOCK, (end - 1) / BLOCK);
        let layer = self.layer().map_err(export_error)?;
        let overlay = match &*layer {
            Layer::Overlay(o) => o,
            Layer::Replica(r) => {
                // Promoted: the replica file's holes read zeroes.
                let holes = holes(&r.file, first, last, self.size);
                let mut out: Vec<Extent> = Vec::new();
                for b in first..=last {
                    let (lo, hi) = ((b * BLOCK).max(offset), ((b + 1) * BLOCK).min(end));
                    let state = if holes[(b - first) as usize] { STATE_HOLE | STATE_ZERO } else { 0 };
                    push_extent(&mut out, hi - lo, state);
                }
                return Ok(out);
            }
        };
        let below = self.view.zero_runs(self.disk, offset, len).map_err(|e| export_error(e.into()))?;
        let holes = overlay.holes(first, last);
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
            let state = if overlay.is_written(b) {
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
            push_extent(&mut out, hi - lo, state);
        }
        Ok(out)
    }
}
