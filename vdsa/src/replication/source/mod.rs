//! The source side of replication: the tap's writes of one VPG stream are
//! numbered, queued, and sent to the target VDSA over the TLS link, batch
//! by batch: hashes first, then only the blocks the target lacks
//! (architecture.md §2, §5).
//!
//! Here: the stream (numbering, the checkpoint barrier's hold, sync
//! progress, status); `link`: the sending side of the link; `export`: the
//! stream's disks as tap exports.

use crate::journal::BLOCK_SIZE;
use crate::nbd::export::ExportError;
use crate::nbd::proto::EIO;
use crate::replication::now_ms;
use crate::replication::queue::{Pushed, QueueConfig, QueueStats, QueuedWrite, SendQueue};
use crate::replication::throttle::Throttle;
use crate::wire::msg::{Marker, StreamWrite};
use protection_groups::{CheckpointId, CheckpointKind, DiskId, StreamId, VpgId, WriteKind};
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

pub mod entropy;
mod export;
mod link;

pub use export::SourceDisk;
pub use link::split;

/// Data bytes per batch at most, for every source the VDSA runs.
pub const BATCH_BYTES: u64 = 4 << 20;
/// Batches offered and not yet filled, at most: enough that the offers'
/// round trips overlap with the blocks on the link (docs/performance.md,
/// "The offer window": 16 replicated about a tenth faster than 4).
pub const OFFER_WINDOW: usize = 16;

/// What a source stream replicates, and to where.
#[derive(Debug, Clone)]
pub struct SourceOptions {
    pub site: String,
    pub vpg: VpgId,
    pub stream: StreamId,
    pub epoch: u64,
    pub disks: Vec<(DiskId, u64)>,
    /// HOST:PORT of the target VDSA.
    pub target: String,
    pub heartbeat: Duration,
    /// Bytes per second on the link; 0 is no limit.
    pub bandwidth: u64,
    /// Streams of the VPG that place each checkpoint marker.
    pub streams: u16,
    /// Data bytes per batch at most ([`BATCH_BYTES`]).
    pub batch_bytes: u64,
    /// Batches offered and not yet filled, at most ([`OFFER_WINDOW`]).
    pub window: usize,
    /// Count encrypting rewrites per checkpoint interval (the encryption
    /// signal; off only to measure what it costs).
    pub entropy_signal: bool,
}

/// Counters of the link, for status and benchmarks.
#[derive(Debug, Default)]
pub struct LinkCounters {
    /// Bytes of write data offered (what the tap wrote).
    pub raw_bytes: AtomicU64,
    /// Bytes of frames sent (before TLS).
    pub wire_bytes: AtomicU64,
    pub blocks_offered: AtomicU64,
    pub blocks_sent: AtomicU64,
    /// Guest writes offered.
    pub writes: AtomicU64,
    pub links: AtomicU64,
    pub durable_seq: AtomicU64,
    /// Source time of the newest consistent checkpoint durable at the target.
    pub newest_consistent_ms: AtomicU64,
    /// Barrier holds: how many, their total and longest time (µs).
    pub holds: AtomicU64,
    pub hold_us_total: AtomicU64,
    pub hold_us_max: AtomicU64,
}

impl LinkCounters {
    fn note_hold(&self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.holds.fetch_add(1, Ordering::Relaxed);
        self.hold_us_total.fetch_add(us, Ordering::Relaxed);
        self.hold_us_max.fetch_max(us, Ordering::Relaxed);
    }
}

#[derive(Debug, Default)]
struct SyncProgress {
    started: Option<Instant>,
    /// Per disk, one bit per block the sync has covered.
    covered: Vec<Vec<u64>>,
    done_blocks: u64,
}

#[derive(Debug, Default)]
struct LinkState {
    connected: bool,
    last_error: Option<String>,
    /// Wire seq = base + local seq; set at the first welcome of this process.
    base: Option<u64>,
}

/// The sequencer's state.
#[derive(Debug)]
struct Sequencer {
    next: u64,
}

#[derive(Debug, Clone)]
struct HeldCut {
    id: u64,
    kind: CheckpointKind,
    name: String,
    time_ms: u64,
    since: Instant,
}

/// One VPG stream at the source.
#[derive(Debug)]
pub struct SourceStream {
    opts: SourceOptions,
    queue: SendQueue,
    /// The sequencer: the next local seq, locked while a write is queued,
    /// so that seq order is queue order.
    sequencer: Mutex<Sequencer>,
    /// The PREPAREd checkpoint's id (0: none): a write that finds it set
    /// waits, under the sequencer's lock, until it is decided. Set without
    /// that lock, so PREPARE never waits for a write being queued (which
    /// is then in the cut). Cleared only under the sequencer's lock.
    holding: AtomicU64,
    /// The PREPAREd checkpoint (what its marker will say).
    held: Mutex<Option<HeldCut>>,
    /// Signalled when a hold ends: threads blocked in a write, and tap
    /// connections waiting for the hold without a thread.
    released: Condvar,
    released_tasks: tokio::sync::Notify,
    syncing: AtomicBool,
    /// The sync ends by itself once every block of every disk was written
    /// through the tap since it began (taps outside this VDSA's control,
    /// which copy the whole disk first); otherwise whoever attached the
    /// taps ends it.
    sync_ends_when_covered: AtomicBool,
    progress: Mutex<SyncProgress>,
    /// The encryption signal: updated in seq order under the sequencer's
    /// lock, so a checkpoint's interval holds exactly its writes.
    entropy: Mutex<entropy::EntropySignal>,
    /// Each disk's size now: `opts.disks` until a resize.
    sizes: Mutex<Vec<(DiskId, u64)>>,
    pub throttle: Throttle,
    pub counters: LinkCounters,
    link: Mutex<LinkState>,
    stop: AtomicBool,
}

impl SourceStream {
    /// Starts in sync mode: until told the tap's full sync is done,
    /// checkpoints are inconsistent.
    pub fn new(opts: SourceOptions, queue: QueueConfig) -> io::Result<Arc<SourceStream>> {
        let covered =
            opts.disks.iter().map(|(_, size)| vec![0u64; (size / BLOCK_SIZE as u64).div_ceil(64) as usize]).collect();
        Ok(Arc::new(SourceStream {
            throttle: Throttle::new(opts.bandwidth),
            queue: SendQueue::new(queue)?,
            sequencer: Mutex::new(Sequencer { next: 1 }),
            holding: AtomicU64::new(0),
            held: Mutex::new(None),
            released: Condvar::new(),
            released_tasks: tokio::sync::Notify::new(),
            syncing: AtomicBool::new(false),
            sync_ends_when_covered: AtomicBool::new(false),
            progress: Mutex::new(SyncProgress { started: None, covered, done_blocks: 0 }),
            entropy: Mutex::new(entropy::EntropySignal::new(&opts.disks)),
            sizes: Mutex::new(opts.disks.clone()),
            counters: LinkCounters::default(),
            link: Mutex::new(LinkState::default()),
            stop: AtomicBool::new(false),
            opts,
        }))
        .inspect(|s| s.set_syncing(true))
    }

    pub fn options(&self) -> &SourceOptions {
        &self.opts
    }

    /// A full or delta sync through the tap begins (true) or is done.
    pub fn set_syncing(&self, syncing: bool) {
        if syncing {
            if let Ok(mut p) = self.progress.lock() {
                p.started = Some(Instant::now());
                p.done_blocks = 0;
                p.covered.iter_mut().for_each(|c| c.fill(0));
            }
            if let Err(e) = self.queue.resync_started() {
                tracing::error!("send queue: {e}");
            }
        }
        self.syncing.store(syncing, Ordering::SeqCst);
    }

    pub fn is_syncing(&self) -> bool {
        self.syncing.load(Ordering::SeqCst)
    }

    /// Lets the sync end by itself once the tap has covered every block of
    /// every disk (see `sync_ends_when_covered`); ends it now if it has.
    pub fn end_sync_when_covered(&self) {
        self.sync_ends_when_covered.store(true, Ordering::SeqCst);
        self.note_synced_blocks();
    }

    /// Numbers and queues one tap write and acknowledges it; while a
    /// checkpoint is PREPAREd, waits until it is decided first.
    pub fn put(&self, disk: DiskId, offset: u64, len: u64, kind: WriteKind, data: Vec<u8>) -> Result<(), ExportError> {
        let sync = self.is_syncing();
        if sync {
            self.note_synced(disk, offset, len);
        }
        // Classed before the sequencer's lock: it is the signal's CPU.
        let classes =
            (self.opts.entropy_signal && kind == WriteKind::Data).then(|| entropy::classify_write(offset, &data));
        self.sequence(StreamWrite { seq: 0, disk, offset, len, kind, sync }, data, classes)
    }

    /// The disks and their sizes now.
    pub fn disks(&self) -> Vec<(DiskId, u64)> {
        self.sizes.lock().map(|s| s.clone()).unwrap_or_else(|p| p.into_inner().clone())
    }

    /// Disk `disk`'s size now, if the stream has it.
    pub fn disk_size(&self, disk: DiskId) -> Option<u64> {
        let sizes = self.sizes.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        sizes.iter().find(|(id, _)| *id == disk).map(|(_, s)| *s)
    }

    /// The disk grew to `size` bytes: a resize goes into the stream in
    /// order with the writes (never dropped to the dirty bitmap), so the
    /// target's checkpoints before it keep the old size. A size equal to
    /// the current one states it again (see [`SourceStream::state_sizes`]).
    pub fn resize(&self, disk: DiskId, size: u64) -> Result<(), ExportError> {
        let current = self.disk_size(disk).ok_or_else(|| ExportError::new(EIO, format!("no disk {disk} here")))?;
        if size < current || size == 0 || !size.is_multiple_of(BLOCK_SIZE as u64) {
            return Err(ExportError::new(
                EIO,
                format!("disk {disk} cannot go from {current} to {size} bytes: it only grows, in whole 4 KiB blocks"),
            ));
        }
        self.sequence(
            StreamWrite { seq: 0, disk, offset: 0, len: size, kind: WriteKind::Resize, sync: true },
            Vec::new(),
            None,
        )?;
        if let Ok(mut e) = self.entropy.lock() {
            e.resize(disk, size);
        }
        if let Ok(mut sizes) = self.sizes.lock() {
            if let Some(d) = sizes.iter().position(|(id, _)| *id == disk) {
                sizes[d].1 = size;
                if let Ok(mut p) = self.progress.lock() {
                    if let Some(bits) = p.covered.get_mut(d) {
                        bits.resize((size / BLOCK_SIZE as u64).div_ceil(64) as usize, 0);
                    }
                }
            }
        }
        Ok(())
    }

    /// States every disk's size in the stream: a run that starts on a
    /// send queue a crash emptied still tells the target of a resize the
    /// lost queue held.
    pub fn state_sizes(&self) -> Result<(), ExportError> {
        for (disk, size) in self.disks() {
            self.resize(disk, size)?;
        }
        Ok(())
    }

    /// Numbers `w` (its seq is set here) and queues it; a data write's
    /// block `classes` go to the encryption signal in the same order.
    fn sequence(&self, w: StreamWrite, data: Vec<u8>, classes: Option<(u64, Vec<u8>)>) -> Result<(), ExportError> {
        let poisoned = || ExportError::new(EIO, "sequencer poisoned");
        let mut sq = self.sequencer.lock().map_err(|_| poisoned())?;
        while self.holding.load(Ordering::SeqCst) != 0 {
            sq = self.released.wait(sq).map_err(|_| poisoned())?;
        }
        if self.opts.entropy_signal {
            if let Ok(mut e) = self.entropy.lock() {
                match (&classes, w.kind) {
                    (Some((first, classes)), _) => e.note_write(w.disk, *first, classes),
                    (None, WriteKind::Zero | WriteKind::Trim) => e.note_cleared(w.disk, w.offset, w.len),
                    _ => {}
                }
            }
        }
        let w = QueuedWrite { write: StreamWrite { seq: sq.next, ..w }, data: Arc::new(data) };
        let (pushed, spill_writes) =
            self.queue.push_write(w).map_err(|e| ExportError::new(EIO, format!("send queue: {e}")))?;
        // A write only marked dirty takes no seq: the stream the target
        // sees has no gap.
        if pushed == Pushed::Queued {
            sq.next += 1;
        }
        // The spill's pages go to the disk after the sequencer is let go:
        // the other disks' writes are queued meanwhile.
        drop(sq);
        drop(spill_writes);
        Ok(())
    }

    fn note_synced(&self, disk: DiskId, offset: u64, len: u64) {
        let Some(d) = self.disks().iter().position(|(id, _)| *id == disk) else { return };
        let Ok(mut p) = self.progress.lock() else { return };
        let bs = BLOCK_SIZE as u64;
        let mut added = 0;
        if let Some(bits) = p.covered.get_mut(d) {
            for b in offset / bs..(offset + len).div_ceil(bs) {
                let (w, m) = ((b / 64) as usize, 1u64 << (b % 64));
                if let Some(word) = bits.get_mut(w) {
                    if *word & m == 0 {
                        *word |= m;
                        added += 1;
                    }
                }
            }
        }
        p.done_blocks += added;
        drop(p);
        if added > 0 {
            self.note_synced_blocks();
        }
    }

    /// Ends a sync that the tap has covered whole, if it may end so.
    fn note_synced_blocks(&self) {
        if !self.sync_ends_when_covered.load(Ordering::SeqCst) || !self.is_syncing() {
            return;
        }
        let total: u64 = self.disks().iter().map(|(_, size)| size.div_ceil(BLOCK_SIZE as u64)).sum();
        let done = self.progress.lock().map(|p| p.done_blocks).unwrap_or(0);
        if done >= total {
            tracing::info!(blocks = total, "every block of every disk came through the tap: the sync is done");
            self.syncing.store(false, Ordering::SeqCst);
        }
    }

    /// Places checkpoint `id` in the stream after the last queued write at
    /// once (PREPARE and COMMIT in one step, for a VPG of one stream).
    /// Returns the kind recorded: inconsistent while a sync runs or writes
    /// were dropped to the dirty bitmap.
    pub fn checkpoint(self: &Arc<Self>, id: u64, name: &str, kind: CheckpointKind) -> io::Result<CheckpointKind> {
        self.prepare(id, name, kind, None)?;
        self.decide(id, true)?.ok_or_else(|| io::Error::other(format!("checkpoint {id} was decided by another")))
    }

    /// PREPARE (docs/architecture.md §3): from now on no tap write starts
    /// being sequenced or is acknowledged until [`SourceStream::decide`]
    /// (one already being queued finishes, and is in the cut); the cut is
    /// the last write sequenced before the decision. It waits for no
    /// lock the data path holds. With a `hold_limit` the hold ends on its
    /// own after it, as an ABORT. Preparing the checkpoint that is already
    /// held again is a no-op.
    pub fn prepare(
        self: &Arc<Self>,
        id: u64,
        name: &str,
        kind: CheckpointKind,
        hold_limit: Option<Duration>,
    ) -> io::Result<()> {
        crate::journal::check_checkpoint_name(name)
            .map_err(|why| io::Error::new(io::ErrorKind::InvalidInput, format!("checkpoint refused: {why}")))?;
        if id == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "checkpoint id 0 is never used"));
        }
        let mut held = self.held.lock().map_err(|_| io::Error::other("hold poisoned"))?;
        match self.holding.load(Ordering::SeqCst) {
            0 => {}
            h if h == id => return Ok(()),
            h => return Err(io::Error::other(format!("checkpoint {h} is still held; {id} must wait"))),
        }
        *held = Some(HeldCut { id, kind, name: name.to_string(), time_ms: now_ms(), since: Instant::now() });
        self.holding.store(id, Ordering::SeqCst);
        drop(held);
        if let Some(limit) = hold_limit {
            let me = Arc::downgrade(self);
            crate::serving::after(limit, move || {
                if let Some(s) = me.upgrade() {
                    if let Ok(Some(_)) = s.decide(id, false) {
                        tracing::warn!(
                            checkpoint = id,
                            limit_ms = limit.as_millis() as u64,
                            "no decision within the hold limit: released and recorded as aborted"
                        );
                    }
                }
            });
        }
        Ok(())
    }

    /// COMMIT (`commit`) or ABORT of a held checkpoint: its marker goes
    /// into the stream (an aborted one as inconsistent, never offered for
    /// recovery) and the hold ends. Returns the kind recorded, or None if
    /// `id` is not held (decided already, or never prepared).
    pub fn decide(&self, id: u64, commit: bool) -> io::Result<Option<CheckpointKind>> {
        let sq = self.sequencer.lock().map_err(|_| io::Error::other("sequencer poisoned"))?;
        let mut held = self.held.lock().map_err(|_| io::Error::other("hold poisoned"))?;
        if self.holding.load(Ordering::SeqCst) != id {
            return Ok(None);
        }
        let Some(h) = held.take().filter(|h| h.id == id) else { return Ok(None) };
        self.holding.store(0, Ordering::SeqCst);
        drop(held);
        let kind = if !commit || self.is_syncing() { CheckpointKind::Inconsistent } else { h.kind };
        let marker = Marker {
            id,
            kind,
            name: h.name,
            source_time_ms: h.time_ms,
            cut_seq: sq.next - 1,
            streams: self.opts.streams,
        };
        let r = self.queue.push_marker(marker);
        if let Ok(mut e) = self.entropy.lock() {
            e.close(CheckpointId(id));
        }
        self.counters.note_hold(h.since.elapsed());
        drop(sq);
        self.released.notify_all();
        self.released_tasks.notify_waiters();
        // Any spill page the marker filled is written here, on drop.
        r.map(|(kind, _spill_writes)| Some(kind))
    }

    /// The checkpoint held now, if any.
    pub fn held(&self) -> Option<u64> {
        Some(self.holding.load(Ordering::SeqCst)).filter(|&id| id != 0)
    }

    /// Returns once no checkpoint is held, waiting without a thread: a tap
    /// connection awaits it before a write, so that a write arriving during
    /// a hold holds no thread while it waits (the write itself still waits
    /// under the sequencer's lock if a hold began meanwhile).
    pub async fn until_released(&self) {
        loop {
            let mut notified = std::pin::pin!(self.released_tasks.notified());
            // Registered before the check, so a release between the two
            // wakes it.
            notified.as_mut().enable();
            if self.holding.load(Ordering::SeqCst) == 0 {
                return;
            }
            notified.await;
        }
    }

    pub fn queue_stats(&self) -> QueueStats {
        self.queue.stats()
    }

    /// Whether the target has made everything queued durable.
    pub fn drained(&self) -> bool {
        self.queue.is_empty()
    }

    /// What an operator sees: link, queue, sync progress, RPO.
    pub fn status(&self) -> serde_json::Value {
        let c = &self.counters;
        let newest = c.newest_consistent_ms.load(Ordering::Relaxed);
        let link = self.link.lock().map(|l| (l.connected, l.last_error.clone())).unwrap_or((false, None));
        let total: u64 = self.disks().iter().map(|(_, s)| s).sum();
        let sync = self.progress.lock().ok().map(|p| {
            let done = p.done_blocks * BLOCK_SIZE as u64;
            let secs = p.started.map_or(0.0, |s| s.elapsed().as_secs_f64());
            let rate = if secs > 0.0 { done as f64 / secs } else { 0.0 };
            let eta = if rate > 0.0 { (total.saturating_sub(done)) as f64 / rate } else { f64::NAN };
            serde_json::json!({"done_bytes": done, "total_bytes": total, "rate_bytes_per_sec": rate as u64,
                "eta_sec": if eta.is_finite() { serde_json::json!(eta.round()) } else { serde_json::Value::Null }})
        });
        serde_json::json!({
            "syncing": self.is_syncing(),
            "sync": sync,
            "connected": link.0,
            "last_error": link.1,
            "queue": self.queue.stats(),
            "raw_bytes": c.raw_bytes.load(Ordering::Relaxed),
            "wire_bytes": c.wire_bytes.load(Ordering::Relaxed),
            "blocks_offered": c.blocks_offered.load(Ordering::Relaxed),
            "blocks_sent": c.blocks_sent.load(Ordering::Relaxed),
            "writes": c.writes.load(Ordering::Relaxed),
            "links": c.links.load(Ordering::Relaxed),
            "durable_seq": c.durable_seq.load(Ordering::Relaxed),
            "rpo_ms": if newest == 0 { serde_json::Value::Null } else { serde_json::json!(now_ms().saturating_sub(newest)) },
            "bandwidth": self.throttle.rate(),
            "entropy": self.entropy_samples(),
        })
    }

    /// The encryption signal's last checkpoint intervals, oldest first.
    pub fn entropy_samples(&self) -> Vec<protection_groups::encryption::EntropySample> {
        self.entropy.lock().map(|e| e.samples()).unwrap_or_default()
    }

    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.queue.close();
    }
}
