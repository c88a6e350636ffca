//! The source side of replication: the tap's writes of one VPG stream are
//! numbered, queued, and sent to the target VDSA over the TLS link, batch
//! by batch: hashes first, then only the blocks the target lacks
//! (architecture.md §2, §5).

use super::now_ms;
use super::queue::{Entry, Pushed, QueueConfig, QueueStats, QueuedWrite, SendQueue};
use super::throttle::Throttle;
use super::LinkError;
use crate::journal::BLOCK_SIZE;
use crate::nbd::proto::{EIO, ENOSPC};
use crate::nbd::server::{BlockExport, ExportError};
use crate::wire::frame::{
    encode_header, encode_header_of_pieces, read_frame, write_frame, FrameError, HEADER_LEN, VERSION,
};
use crate::wire::msg::{
    self, Ack, Blocks, Hello, Marker, Need, Offer, OfferItem, OfferedBlock, OfferedWrite, Refuse, StreamWrite, Welcome,
};
use crate::wire::tls::{self, LinkWriter};
use protection_groups::{CheckpointKind, DiskId, StreamId, VpgId, WriteKind};
use std::collections::VecDeque;
use std::io;
use std::io::Write;
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

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
    /// Data bytes per batch at most.
    pub batch_bytes: u64,
    /// Batches offered and not yet filled, at most.
    pub window: usize,
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
    /// Signalled when a hold ends.
    released: Condvar,
    syncing: AtomicBool,
    /// The sync ends by itself once every block of every disk was written
    /// through the tap since it began (taps outside this VDSA's control,
    /// which copy the whole disk first); otherwise whoever attached the
    /// taps ends it.
    sync_ends_when_covered: AtomicBool,
    progress: Mutex<SyncProgress>,
    /// Each disk's size now: `opts.disks` until a resize.
    sizes: Mutex<Vec<(DiskId, u64)>>,
    pub throttle: Throttle,
    pub counters: LinkCounters,
    link: Mutex<LinkState>,
    stop: AtomicBool,
}

/// How long the send loop waits for a need while batches are offered and
/// the queue has nothing new: at most what a write arriving meanwhile waits
/// before it is offered (a busy queue is read again at once).
const NEED_WAIT_WHEN_IDLE: Duration = Duration::from_millis(1);

fn refused_by_target(reason: String) -> LinkError {
    LinkError::Refused(format!("the target refused: {reason}"))
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
            syncing: AtomicBool::new(false),
            sync_ends_when_covered: AtomicBool::new(false),
            progress: Mutex::new(SyncProgress { started: None, covered, done_blocks: 0 }),
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
        self.sequence(StreamWrite { seq: 0, disk, offset, len, kind, sync }, data)
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
        )?;
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

    /// Numbers `w` (its seq is set here) and queues it.
    fn sequence(&self, w: StreamWrite, data: Vec<u8>) -> Result<(), ExportError> {
        let poisoned = || ExportError::new(EIO, "sequencer poisoned");
        let mut sq = self.sequencer.lock().map_err(|_| poisoned())?;
        while self.holding.load(Ordering::SeqCst) != 0 {
            sq = self.released.wait(sq).map_err(|_| poisoned())?;
        }
        let w = QueuedWrite { write: StreamWrite { seq: sq.next, ..w }, data: Arc::new(data) };
        match self.queue.push_write(w) {
            // A write only marked dirty takes no seq: the stream the
            // target sees has no gap.
            Ok(Pushed::Queued) => sq.next += 1,
            Ok(Pushed::Dirty) => {}
            Err(e) => return Err(ExportError::new(EIO, format!("send queue: {e}"))),
        }
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
            std::thread::spawn(move || {
                std::thread::sleep(limit);
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
        self.counters.note_hold(h.since.elapsed());
        drop(sq);
        self.released.notify_all();
        r.map(Some)
    }

    /// The checkpoint held now, if any.
    pub fn held(&self) -> Option<u64> {
        Some(self.holding.load(Ordering::SeqCst)).filter(|&id| id != 0)
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
        })
    }

    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.queue.close();
    }

    /// Runs the link until [`SourceStream::stop`]: connects, resumes where
    /// the target is, sends, and reconnects after any failure.
    pub fn run_link(self: &Arc<Self>, cfg: Arc<rustls::ClientConfig>) {
        let mut backoff = Duration::from_millis(50);
        while !self.stop.load(Ordering::SeqCst) {
            let started = Instant::now();
            let r = self.one_link(&cfg);
            if let Ok(mut l) = self.link.lock() {
                l.connected = false;
                l.last_error = r.as_ref().err().map(|e| e.to_string());
            }
            if let Err(e) = r {
                tracing::warn!(target = %self.opts.target, "replication link lost: {e}");
            }
            if let Err(e) = self.queue.rewind() {
                tracing::error!("send queue: {e}");
                return;
            }
            backoff = if started.elapsed() > Duration::from_secs(5) {
                Duration::from_millis(50)
            } else {
                (backoff * 2).min(Duration::from_secs(1))
            };
            std::thread::sleep(backoff);
        }
    }

    fn one_link(self: &Arc<Self>, cfg: &Arc<rustls::ClientConfig>) -> Result<(), LinkError> {
        let hb = self.opts.heartbeat;
        let addr = self
            .opts
            .target
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| LinkError::Protocol(format!("{} resolves to nothing", self.opts.target)))?;
        let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
        tcp.set_nodelay(true)?;
        tcp.set_read_timeout(Some(hb * 3))?;
        tcp.set_write_timeout(Some(hb * 3))?;
        let (mut r, mut w) = tls::connect(cfg.clone(), tcp)?;
        let hello = Hello {
            site: self.opts.site.clone(),
            vpg: self.opts.vpg,
            stream: self.opts.stream,
            epoch: self.opts.epoch,
            disks: self.disks(),
        };
        write_frame(&mut w, VERSION, msg::HELLO, &hello.encode())?;
        let f = read_frame(&mut r)?;
        let welcome = match f.kind {
            msg::WELCOME => Welcome::decode(&f.payload)?,
            msg::REFUSE => return Err(refused_by_target(Refuse::decode(&f.payload)?.reason)),
            k => return Err(FrameError::UnexpectedKind(k).into()),
        };
        let base = {
            let mut l = self.link.lock().map_err(|_| LinkError::Protocol("poisoned".into()))?;
            l.connected = true;
            *l.base.get_or_insert(welcome.resume_after_seq)
        };
        if welcome.resume_after_seq < base {
            return Err(LinkError::Protocol(format!(
                "the target holds the stream only up to seq {}, before this source's start at {base}: it lost writes; a full sync is needed",
                welcome.resume_after_seq
            )));
        }
        self.counters.links.fetch_add(1, Ordering::Relaxed);
        tracing::info!(target = %self.opts.target, resume_after = welcome.resume_after_seq, "replication link up");
        let skip_seq = welcome.resume_after_seq - base;
        let skip_cp = welcome.last_checkpoint;

        let (tx, rx) = mpsc::channel::<Result<Need, LinkError>>();
        let me = self.clone();
        let reader = std::thread::spawn(move || {
            let r = me.read_replies(&mut r, base, &tx);
            let _ = tx.send(Err(r));
        });
        let result = self.send_loop(&mut w, &rx, base, skip_seq, skip_cp);
        w.shutdown();
        let _ = reader.join();
        result
    }

    /// Reads needs, acks and heartbeats until the link fails.
    fn read_replies(
        &self,
        r: &mut tls::LinkReader,
        base: u64,
        tx: &mpsc::Sender<Result<Need, LinkError>>,
    ) -> LinkError {
        loop {
            let f = match read_frame(r) {
                Ok(f) => f,
                Err(e) => return e.into(),
            };
            match f.kind {
                msg::NEED => match Need::decode(&f.payload) {
                    Ok(n) => {
                        if tx.send(Ok(n)).is_err() {
                            return LinkError::Protocol("sender gone".into());
                        }
                    }
                    Err(e) => return e.into(),
                },
                msg::ACK => match Ack::decode(&f.payload) {
                    Ok(a) => {
                        self.counters.durable_seq.store(a.durable_seq, Ordering::Relaxed);
                        if a.newest_consistent_ms > 0 {
                            self.counters.newest_consistent_ms.fetch_max(a.newest_consistent_ms, Ordering::Relaxed);
                        }
                        if let Err(e) = self.queue.acknowledge(a.durable_seq.saturating_sub(base), a.durable_checkpoint)
                        {
                            return e.into();
                        }
                    }
                    Err(e) => return e.into(),
                },
                msg::HEARTBEAT => {}
                msg::REFUSE => {
                    return match Refuse::decode(&f.payload) {
                        Ok(r) => refused_by_target(r.reason),
                        Err(e) => e.into(),
                    }
                }
                k => return FrameError::UnexpectedKind(k).into(),
            }
        }
    }

    fn send_loop(
        &self,
        w: &mut LinkWriter,
        rx: &Receiver<Result<Need, LinkError>>,
        base: u64,
        skip_seq: u64,
        skip_cp: u64,
    ) -> Result<(), LinkError> {
        let hb = self.opts.heartbeat;
        let mut pending: VecDeque<PendingBatch> = VecDeque::new();
        let mut next_batch = 1u64;
        let mut last_send = Instant::now();
        let mut compress = CompressProbe::default();
        // The queue had nothing new at the last look: with batches offered,
        // wait a little for their needs rather than spinning between the
        // two (one spinning loop per stream burnt both cores at scale).
        let mut nothing_new = false;
        while !self.stop.load(Ordering::SeqCst) {
            // Needs first: they unblock the target.
            let wait = if pending.len() >= self.opts.window {
                Duration::from_millis(20)
            } else if nothing_new && !pending.is_empty() {
                NEED_WAIT_WHEN_IDLE
            } else {
                Duration::ZERO
            };
            match rx.recv_timeout(wait) {
                Ok(Ok(need)) => {
                    let batch = pending.pop_front().ok_or_else(|| {
                        LinkError::Protocol(format!("need for batch {} that was not offered", need.batch))
                    })?;
                    self.send_blocks(w, batch, need, &mut compress)?;
                    last_send = Instant::now();
                    continue;
                }
                Ok(Err(e)) => return Err(e),
                Err(RecvTimeoutError::Disconnected) => return Err(LinkError::Protocol("reader gone".into())),
                Err(RecvTimeoutError::Timeout) => {}
            }
            if pending.len() < self.opts.window {
                let wait = if pending.is_empty() { Duration::from_millis(5) } else { Duration::ZERO };
                let entries = self.queue.next_unsent(self.throttle.batch_bytes(self.opts.batch_bytes), 4096, wait)?;
                let entries: Vec<Entry> = entries
                    .into_iter()
                    .filter(|e| match e {
                        Entry::Write(x) => x.write.seq > skip_seq,
                        Entry::Marker(m) => m.id > skip_cp,
                    })
                    .collect();
                nothing_new = entries.is_empty();
                if !entries.is_empty() {
                    let batch = self.offer(w, next_batch, entries, base)?;
                    next_batch += 1;
                    pending.push_back(batch);
                    last_send = Instant::now();
                    continue;
                }
            }
            if last_send.elapsed() >= hb {
                self.send_frame(w, msg::HEARTBEAT, &now_ms().to_be_bytes())?;
                last_send = Instant::now();
            }
        }
        Ok(())
    }

    /// Sends a frame. Under a bandwidth limit it goes in pieces of at most
    /// 16 KiB, each after its tokens, so that a slow link trickles rather
    /// than falling silent for longer than the peer's heartbeat timeout.
    fn send_frame(&self, w: &mut LinkWriter, kind: u16, payload: &[u8]) -> Result<(), LinkError> {
        let stalled = |e: io::Error| match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                LinkError::Protocol("the link took nothing within three heartbeats: it is stalled".into())
            }
            _ => LinkError::Io(e),
        };
        let n = (HEADER_LEN + payload.len()) as u64;
        if self.throttle.rate() == 0 {
            write_frame(w, VERSION, kind, payload).map_err(stalled)?;
        } else {
            let header = encode_header(VERSION, kind, payload);
            self.throttle.take(HEADER_LEN as u64);
            w.write_all(&header).map_err(stalled)?;
            for piece in payload.chunks(16 << 10) {
                self.throttle.take(piece.len() as u64);
                w.write_all(piece).map_err(stalled)?;
            }
        }
        self.counters.wire_bytes.fetch_add(n, Ordering::Relaxed);
        Ok(())
    }

    /// Sends a frame whose payload is `pieces` one after another, without
    /// gathering them first unless the link is throttled.
    fn send_frame_pieces(&self, w: &mut LinkWriter, kind: u16, pieces: &[&[u8]]) -> Result<(), LinkError> {
        if self.throttle.rate() != 0 {
            return self.send_frame(w, kind, &pieces.concat());
        }
        let header = encode_header_of_pieces(VERSION, kind, pieces);
        let mut all = Vec::with_capacity(pieces.len() + 1);
        all.push(&header[..]);
        all.extend_from_slice(pieces);
        w.write_all_pieces(&all).map_err(|e| match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                LinkError::Protocol("the link took nothing within three heartbeats: it is stalled".into())
            }
            _ => LinkError::Io(e),
        })?;
        let n: usize = all.iter().map(|p| p.len()).sum();
        self.counters.wire_bytes.fetch_add(n as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Hashes the batch's whole blocks and offers them.
    fn offer(&self, w: &mut LinkWriter, batch: u64, entries: Vec<Entry>, base: u64) -> Result<PendingBatch, LinkError> {
        let mut items = Vec::with_capacity(entries.len());
        let mut raw = 0u64;
        let mut hashed = 0u64;
        let mut writes = 0u64;
        let mut zero = Vec::new();
        for e in &entries {
            items.push(match e {
                Entry::Write(x) => {
                    let blocks = if x.write.kind == WriteKind::Data {
                        let (head, full, _) = split(x.write.offset, x.write.len);
                        x.data[head..head + full * BLOCK_SIZE]
                            .chunks_exact(BLOCK_SIZE)
                            .map(|b| {
                                let is_zero = b.iter().all(|&v| v == 0);
                                zero.push(is_zero);
                                if is_zero {
                                    OfferedBlock::Zero
                                } else {
                                    hashed += 1;
                                    OfferedBlock::Hash(*blake3::hash(b).as_bytes())
                                }
                            })
                            .collect()
                    } else {
                        Vec::new()
                    };
                    raw += x.data.len() as u64;
                    writes += 1;
                    OfferItem::Write(OfferedWrite { write: StreamWrite { seq: base + x.write.seq, ..x.write }, blocks })
                }
                Entry::Marker(m) => OfferItem::Marker(Marker { cut_seq: base + m.cut_seq, ..m.clone() }),
            });
        }
        let offer = Offer { batch, epoch: self.opts.epoch, items };
        self.send_frame(w, msg::OFFER, &offer.encode())?;
        self.counters.raw_bytes.fetch_add(raw, Ordering::Relaxed);
        self.counters.blocks_offered.fetch_add(hashed, Ordering::Relaxed);
        self.counters.writes.fetch_add(writes, Ordering::Relaxed);
        Ok(PendingBatch { batch, entries, zero, hashed: hashed as usize })
    }

    /// Sends the bytes the target lacks: partial blocks always, whole
    /// blocks as asked.
    fn send_blocks(
        &self,
        w: &mut LinkWriter,
        p: PendingBatch,
        need: Need,
        compress: &mut CompressProbe,
    ) -> Result<(), LinkError> {
        if need.batch != p.batch || need.bits.len() != p.hashed {
            return Err(LinkError::Protocol(format!(
                "need for batch {} with {} bits, but batch {} offered {} hashes",
                need.batch,
                need.bits.len(),
                p.batch,
                p.hashed
            )));
        }
        // The data as ranges of the queued writes' buffers (adjacent ones
        // joined): the bytes are copied only by TLS, unless the batch is
        // compressed or the link throttled.
        let mut ranges: Vec<(usize, std::ops::Range<usize>)> = Vec::new();
        let mut push = |entry: usize, r: std::ops::Range<usize>| {
            if r.is_empty() {
                return;
            }
            match ranges.last_mut() {
                Some((e, last)) if *e == entry && last.end == r.start => last.end = r.end,
                _ => ranges.push((entry, r)),
            }
        };
        let mut bit = 0usize;
        let mut sent = 0u64;
        let mut zero = p.zero.iter();
        for (i, e) in p.entries.iter().enumerate() {
            let Entry::Write(x) = e else { continue };
            if x.write.kind != WriteKind::Data {
                continue;
            }
            let (head, full, _) = split(x.write.offset, x.write.len);
            push(i, 0..head);
            for b in 0..full {
                if zero.next().copied().unwrap_or(false) {
                    continue;
                }
                if need.bits[bit] {
                    let start = head + b * BLOCK_SIZE;
                    push(i, start..start + BLOCK_SIZE);
                    sent += 1;
                }
                bit += 1;
            }
            push(i, head + full * BLOCK_SIZE..x.data.len());
        }
        let pieces: Vec<&[u8]> = ranges
            .into_iter()
            .filter_map(|(i, r)| match &p.entries[i] {
                Entry::Write(x) => x.data.get(r),
                Entry::Marker(_) => None,
            })
            .collect();
        let raw_len: usize = pieces.iter().map(|p| p.len()).sum();
        let raw_len32 = u32::try_from(raw_len)
            .map_err(|_| LinkError::Protocol(format!("batch {} of {raw_len} bytes does not fit a frame", p.batch)))?;
        let mut header = [0u8; Blocks::HEADER_LEN];
        let compressed = if compress.worth_trying(raw_len) { compress.try_compress(&pieces.concat()) } else { None };
        match compressed {
            Some(c) => {
                Blocks::put_header(&mut header, p.batch, true, raw_len32);
                self.send_frame_pieces(w, msg::BLOCKS, &[&header, &c])?;
            }
            None => {
                Blocks::put_header(&mut header, p.batch, false, raw_len32);
                let mut all = Vec::with_capacity(pieces.len() + 1);
                all.push(&header[..]);
                all.extend_from_slice(&pieces);
                self.send_frame_pieces(w, msg::BLOCKS, &all)?;
            }
        }
        self.counters.blocks_sent.fetch_add(sent, Ordering::Relaxed);
        Ok(())
    }
}

/// (bytes of a partial first block, whole blocks, bytes of a partial last
/// block) of a write at `offset` of `len` bytes.
pub fn split(offset: u64, len: u64) -> (usize, usize, usize) {
    let bs = BLOCK_SIZE as u64;
    let head = if offset.is_multiple_of(bs) { 0 } else { (bs - offset % bs).min(len) };
    let rest = len - head;
    (head as usize, (rest / bs) as usize, (rest % bs) as usize)
}

#[derive(Debug)]
struct PendingBatch {
    batch: u64,
    entries: Vec<Entry>,
    /// Per whole block of the batch's data writes, in order: all zeros
    /// (offered as such, never sent), as found when the batch was offered.
    zero: Vec<bool>,
    hashed: usize,
}

/// zstd per batch, skipped when data does not compress: after a miss,
/// only every 8th batch is tried until one pays again.
#[derive(Debug, Default)]
struct CompressProbe {
    misses: u32,
}

impl CompressProbe {
    /// Whether to try compressing a batch of `len` bytes: always after a
    /// batch that compressed, one batch in 8 while they do not.
    fn worth_trying(&mut self, len: usize) -> bool {
        if len < 512 || (self.misses > 0 && !self.misses.is_multiple_of(8)) {
            self.misses += u32::from(self.misses > 0);
            return false;
        }
        true
    }

    /// The batch compressed, if that saves at least a tenth.
    fn try_compress(&mut self, data: &[u8]) -> Option<Vec<u8>> {
        match zstd::bulk::compress(data, 1) {
            Ok(c) if c.len() < data.len() - data.len() / 10 => {
                self.misses = 0;
                Some(c)
            }
            _ => {
                self.misses += 1;
                None
            }
        }
    }
}

/// One protected disk of a source stream as an NBD (or native tap) export.
#[derive(Debug)]
pub struct SourceDisk {
    pub stream: Arc<SourceStream>,
    pub disk: DiskId,
}

impl SourceDisk {
    fn check(&self, offset: u64, len: u64) -> Result<(), ExportError> {
        let size = self.size();
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(ExportError::new(ENOSPC, format!("{len} bytes at {offset} is beyond the disk's {size} bytes")));
        }
        Ok(())
    }
}

impl BlockExport for SourceDisk {
    /// The stream's size of the disk: a resize shows to the next client.
    fn size(&self) -> u64 {
        self.stream.disk_size(self.disk).unwrap_or(0)
    }

    /// A source VDSA holds no copy of the disk: the tap only writes.
    fn read(&self, _offset: u64, _buf: &mut [u8]) -> Result<(), ExportError> {
        Err(ExportError::new(EIO, "a source VDSA holds no copy of the disk to read"))
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), ExportError> {
        self.check(offset, data.len() as u64)?;
        if data.is_empty() {
            return Ok(());
        }
        self.stream.put(self.disk, offset, data.len() as u64, WriteKind::Data, data.to_vec())
    }

    /// The queue keeps the tap's buffer itself: no copy.
    fn write_owned(&self, offset: u64, data: Vec<u8>) -> Result<(), ExportError> {
        self.check(offset, data.len() as u64)?;
        if data.is_empty() {
            return Ok(());
        }
        self.stream.put(self.disk, offset, data.len() as u64, WriteKind::Data, data)
    }

    fn keeps_write_buffers(&self) -> bool {
        true
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), ExportError> {
        self.check(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        self.stream.put(self.disk, offset, len, WriteKind::Zero, Vec::new())
    }

    fn trim(&self, offset: u64, len: u64) -> Result<(), ExportError> {
        self.check(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        self.stream.put(self.disk, offset, len, WriteKind::Trim, Vec::new())
    }

    /// Replication is asynchronous: nothing is made durable here (the
    /// protected disk holds the writes; a restarted source resyncs), so
    /// FLUSH and FUA are not offered. A client that sends a flush anyway
    /// is answered at once.
    fn flush(&self) -> Result<(), ExportError> {
        Ok(())
    }

    fn offers_durability(&self) -> bool {
        false
    }
}
