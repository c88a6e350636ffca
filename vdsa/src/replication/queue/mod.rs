//! The source's send queue (architecture.md §5): writes wait here, in stream
//! order, until the target has made them durable. Memory first, up to a
//! budget; then a spill file; when both are full, either the tap waits
//! (back-pressure) or writes are only marked in a dirty-block bitmap and
//! the stream needs a resync.

mod entry;
mod spill;

pub use entry::{Entry, QueuedWrite};

use crate::journal::BLOCK_SIZE;
use crate::wire::msg::Marker;
use protection_groups::{CheckpointKind, DiskId};
use spill::{FullPage, Spill};
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::io;
use std::path::PathBuf;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

/// What the queue does when memory and spill file are both full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backpressure {
    /// The tap waits until the target acknowledges (no resync ever).
    Block,
    /// The tap goes on; writes are only marked dirty, and checkpoints are
    /// inconsistent until a resync.
    Bitmap,
}

/// Limits of a queue.
#[derive(Debug, Clone)]
pub struct QueueConfig {
    pub memory_bytes: u64,
    pub spill_path: PathBuf,
    pub spill_bytes: u64,
    pub backpressure: Backpressure,
}

/// Counters an operator looks at.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct QueueStats {
    pub entries: u64,
    pub memory_bytes: u64,
    pub spill_bytes: u64,
    pub spilled_total: u64,
    pub dirty_blocks: u64,
    pub needs_resync: bool,
}

#[derive(Debug)]
struct State {
    /// The oldest entries, in stream order; `sent` of them are on the link.
    mem: VecDeque<Entry>,
    mem_bytes: u64,
    sent: usize,
    /// Newer entries than all of `mem`.
    spill: Spill,
    /// The spilled entries on the link, oldest first: what acknowledges
    /// each and where its record ends. Sent from the spill when the memory
    /// is taken by entries on the link, they stay there until
    /// acknowledged, so the memory budget does not bound what is in flight
    /// (docs/architecture.md §5). Only while every entry in memory is sent.
    spill_sent: VecDeque<SpillSent>,
    spilled_total: u64,
    /// Writes dropped for lack of room: (disk, block). While non-empty (or
    /// until a resync starts) the stream is not a consistent copy.
    dirty: HashMap<DiskId, BTreeSet<u64>>,
    needs_resync: bool,
    closed: bool,
}

/// A spilled entry on the link.
#[derive(Debug)]
struct SpillSent {
    acked_by: AckedBy,
    end: u64,
}

/// What acknowledges an entry: a write by its seq, a marker by its id once
/// the writes it cuts are durable too.
#[derive(Debug, Clone, Copy)]
enum AckedBy {
    Write { seq: u64 },
    Marker { id: u64, cut_seq: u64 },
}

impl AckedBy {
    fn of(e: &Entry) -> AckedBy {
        match e {
            Entry::Write(w) => AckedBy::Write { seq: w.write.seq },
            Entry::Marker(m) => AckedBy::Marker { id: m.id, cut_seq: m.cut_seq },
        }
    }

    fn done(self, seq: u64, checkpoint: u64) -> bool {
        match self {
            AckedBy::Write { seq: s } => s <= seq,
            AckedBy::Marker { id, cut_seq } => id <= checkpoint && cut_seq <= seq,
        }
    }
}

/// The queue; shared by the tap threads (producers) and the sender.
#[derive(Debug)]
pub struct SendQueue {
    cfg: QueueConfig,
    state: Mutex<State>,
    /// Signalled when room is freed (producers wait).
    changed: Condvar,
    /// Signalled when entries arrive or come back from the spill, for the
    /// sender, a task that waits without a thread
    /// ([`SendQueue::next_unsent_or_wait`]).
    arrived: tokio::sync::Notify,
}

/// The spill pages an append filled, written to the disk when this is
/// dropped. The caller drops it after letting its own locks go (the
/// source's sequencer), so that other writes are queued meanwhile: until
/// written, the pages are read back from memory.
#[derive(Debug)]
#[must_use = "dropping it writes the spill pages: drop it once the caller's locks are let go"]
pub struct SpillWrites<'a> {
    queue: &'a SendQueue,
    pages: Vec<FullPage>,
}

impl Drop for SpillWrites<'_> {
    fn drop(&mut self) {
        if !self.pages.is_empty() {
            self.queue.write_pages(std::mem::take(&mut self.pages));
        }
    }
}

/// What became of a pushed write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    Queued,
    /// Only marked in the dirty bitmap.
    Dirty,
}

fn lock(m: &Mutex<State>) -> io::Result<MutexGuard<'_, State>> {
    m.lock().map_err(|_| io::Error::other("send queue poisoned"))
}

impl SendQueue {
    pub fn new(cfg: QueueConfig) -> io::Result<SendQueue> {
        let spill = Spill::create(&cfg.spill_path)?;
        Ok(SendQueue {
            cfg,
            state: Mutex::new(State {
                mem: VecDeque::new(),
                mem_bytes: 0,
                sent: 0,
                spill,
                spill_sent: VecDeque::new(),
                spilled_total: 0,
                dirty: HashMap::new(),
                needs_resync: false,
                closed: false,
            }),
            changed: Condvar::new(),
            arrived: tokio::sync::Notify::new(),
        })
    }

    /// Appends a write. With [`Backpressure::Block`] waits for room; with
    /// `Bitmap` marks it dirty when there is none (and from then on until
    /// [`SendQueue::resync_started`]). Writes of a sync always wait. The
    /// spill pages the write filled are written when the returned
    /// [`SpillWrites`] is dropped.
    pub fn push_write(&self, w: QueuedWrite) -> io::Result<(Pushed, SpillWrites<'_>)> {
        let mut st = lock(&self.state)?;
        loop {
            if st.needs_resync && !w.write.sync {
                mark_dirty(&mut st, &w);
                return Ok((Pushed::Dirty, self.no_writes()));
            }
            let e = Entry::Write(w.clone());
            if self.room(&st, &e) {
                let pages = match self.append(&mut st, e) {
                    Ok(pages) => pages,
                    Err(err) => {
                        // The tap is told the write failed, but the VM's
                        // disk may hold it: the stream is behind the disk
                        // until a resync, and no marker is consistent.
                        st.needs_resync = true;
                        mark_dirty(&mut st, &w);
                        return Err(err);
                    }
                };
                return Ok((Pushed::Queued, SpillWrites { queue: self, pages }));
            }
            // A sync's writes are never dropped (the sync would have to
            // start over): the sync goes at the link's pace.
            let policy = if w.write.sync { Backpressure::Block } else { self.cfg.backpressure };
            match policy {
                Backpressure::Block => {
                    if st.closed {
                        return Err(io::Error::other("send queue closed"));
                    }
                    st = self
                        .changed
                        .wait_timeout(st, Duration::from_millis(100))
                        .map_err(|_| io::Error::other("send queue poisoned"))?
                        .0;
                }
                Backpressure::Bitmap => {
                    if !st.needs_resync {
                        tracing::warn!(
                            "send queue and spill file full: writes are now only marked dirty; a resync is needed"
                        );
                    }
                    st.needs_resync = true;
                    mark_dirty(&mut st, &w);
                    return Ok((Pushed::Dirty, self.no_writes()));
                }
            }
        }
    }

    /// Appends a checkpoint marker (small: never refused for room). A marker
    /// placed while writes were dropped to the bitmap is inconsistent. As
    /// for a write, the spill pages it filled are written when the returned
    /// [`SpillWrites`] is dropped.
    pub fn push_marker(&self, mut m: Marker) -> io::Result<(CheckpointKind, SpillWrites<'_>)> {
        let mut st = lock(&self.state)?;
        if st.needs_resync || !st.dirty.is_empty() {
            m.kind = CheckpointKind::Inconsistent;
        }
        let kind = m.kind;
        let pages = self.append(&mut st, Entry::Marker(m))?;
        Ok((kind, SpillWrites { queue: self, pages }))
    }

    /// A resync (the tap re-sending every block) begins: writes are queued
    /// again, and the dirty bitmap is covered by it.
    pub fn resync_started(&self) -> io::Result<()> {
        let mut st = lock(&self.state)?;
        st.needs_resync = false;
        st.dirty.clear();
        Ok(())
    }

    /// Whether an entry of cost `c` goes to memory: only while nothing is
    /// spilled (order) and within the budget.
    fn fits_memory(&self, st: &State, c: u64) -> bool {
        st.spill.entries() == 0 && st.mem_bytes + c <= self.cfg.memory_bytes
    }

    fn room(&self, st: &State, e: &Entry) -> bool {
        let c = e.cost();
        self.fits_memory(st, c) || st.spill.has_room(c, self.cfg.spill_bytes)
    }

    /// Queues `e` in memory or in the spill; returns the spill pages it
    /// filled, for the caller to write once it has let the lock go
    /// ([`SpillWrites`]).
    fn append(&self, st: &mut State, e: Entry) -> io::Result<Vec<FullPage>> {
        let c = e.cost();
        let full = if self.fits_memory(st, c) {
            st.mem_bytes += c;
            st.mem.push_back(e);
            Vec::new()
        } else {
            let full = st.spill.push(&e)?;
            st.spilled_total += 1;
            full
        };
        self.changed.notify_all();
        self.arrived.notify_one();
        Ok(full)
    }

    fn no_writes(&self) -> SpillWrites<'_> {
        SpillWrites { queue: self, pages: Vec::new() }
    }

    /// Writes full spill pages without the lock: the tap threads and the
    /// sender go on meanwhile, reading the pages from memory. The entry
    /// is queued whatever happens here: a page the disk refused stays in
    /// memory (`spill.rs`).
    fn write_pages(&self, full: Vec<FullPage>) {
        for page in full {
            let r = page.write();
            match self.state.lock() {
                Ok(mut st) => st.spill.page_written(page, r),
                Err(_) => tracing::error!("send queue poisoned while a spill page was written"),
            }
        }
    }

    /// Moves spilled entries back into memory while there is room. One
    /// already on the link joins the sent ones (every entry in memory is
    /// sent while any spilled one is).
    fn refill(&self, st: &mut State) -> io::Result<()> {
        while st.mem_bytes < self.cfg.memory_bytes {
            let Some((e, sent)) = st.spill.pop()? else { break };
            if sent {
                st.spill_sent.pop_front();
                st.sent += 1;
            }
            st.mem_bytes += e.cost();
            st.mem.push_back(e);
        }
        Ok(())
    }

    /// Up to `max_bytes` of entries in memory not yet on the link (at least
    /// one if any), waiting up to `wait` for one to arrive. The wait holds
    /// no thread: a notification left by an arrival while the sender was
    /// busy ends the next wait at once, so none is missed. It never reads
    /// the spill file (an async task must not wait for the disk): when
    /// [`SendQueue::wants_spill_read`] says so, the caller takes entries
    /// with [`SendQueue::next_unsent`] on a thread that may block.
    pub async fn next_unsent_or_wait(
        &self,
        max_bytes: u64,
        max_items: usize,
        wait: Duration,
    ) -> io::Result<Vec<Entry>> {
        let found = self.take_unsent(max_bytes, max_items, false)?;
        if !found.is_empty() || wait.is_zero() {
            return Ok(found);
        }
        let _ = tokio::time::timeout(wait, self.arrived.notified()).await;
        self.take_unsent(max_bytes, max_items, false)
    }

    /// Whether every entry in memory is on the link and spilled ones wait
    /// for the room there is: taking the next entries reads the spill file.
    pub fn wants_spill_read(&self) -> bool {
        self.state.lock().is_ok_and(|st| self.spill_read_due(&st))
    }

    fn spill_read_due(&self, st: &State) -> bool {
        st.sent >= st.mem.len() && st.spill.unsent_entries() > 0
    }

    /// Up to `max_bytes` of entries not yet on the link (at least one if
    /// any), without waiting. When every entry in memory is on the link it
    /// reads spilled ones: back into memory while there is room, and past
    /// that straight from the spill, where they stay until acknowledged.
    pub fn next_unsent(&self, max_bytes: u64, max_items: usize) -> io::Result<Vec<Entry>> {
        self.take_unsent(max_bytes, max_items, true)
    }

    fn take_unsent(&self, max_bytes: u64, max_items: usize, read_spill: bool) -> io::Result<Vec<Entry>> {
        let mut st = lock(&self.state)?;
        if read_spill && self.spill_read_due(&st) {
            self.refill(&mut st)?;
        }
        let mut out = Vec::new();
        let mut bytes = 0;
        while st.sent < st.mem.len() && out.len() < max_items {
            let e = &st.mem[st.sent];
            if !out.is_empty() && bytes + e.cost() > max_bytes {
                break;
            }
            bytes += e.cost();
            out.push(e.clone());
            st.sent += 1;
        }
        // Memory is all on the link and full: the next entries go from
        // the spill, a record at a time, each checked against the budget
        // before its bytes are read.
        while read_spill && out.len() < max_items && self.spill_read_due(&st) {
            let Some(c) = st.spill.next_unsent_cost()? else { break };
            if !out.is_empty() && bytes + c > max_bytes {
                break;
            }
            let Some((e, end)) = st.spill.next_unsent()? else { break };
            bytes += c;
            st.spill_sent.push_back(SpillSent { acked_by: AckedBy::of(&e), end });
            out.push(e);
        }
        Ok(out)
    }

    /// The link broke: everything not acknowledged is sent again.
    pub fn rewind(&self) -> io::Result<()> {
        let mut st = lock(&self.state)?;
        st.sent = 0;
        st.spill.rewind_sends();
        st.spill_sent.clear();
        Ok(())
    }

    /// The target made writes up to `seq` and markers up to checkpoint
    /// `checkpoint` durable: they leave the queue.
    pub fn acknowledge(&self, seq: u64, checkpoint: u64) -> io::Result<()> {
        let mut st = lock(&self.state)?;
        while let Some(front) = st.mem.front() {
            if !AckedBy::of(front).done(seq, checkpoint) {
                break;
            }
            let c = front.cost();
            st.mem.pop_front();
            st.mem_bytes -= c;
            st.sent = st.sent.saturating_sub(1);
        }
        // Then the spilled entries on the link, newer than all of memory.
        while st.mem.is_empty() && st.spill_sent.front().is_some_and(|s| s.acked_by.done(seq, checkpoint)) {
            if let Some(s) = st.spill_sent.pop_front() {
                st.spill.drop_sent(s.end)?;
            }
        }
        self.refill(&mut st)?;
        self.changed.notify_all();
        self.arrived.notify_one();
        Ok(())
    }

    /// Wakes producers and the sender for shutdown.
    pub fn close(&self) {
        if let Ok(mut st) = self.state.lock() {
            st.closed = true;
        }
        self.changed.notify_all();
        self.arrived.notify_one();
    }

    pub fn stats(&self) -> QueueStats {
        match self.state.lock() {
            Ok(st) => QueueStats {
                entries: st.mem.len() as u64 + st.spill.entries(),
                memory_bytes: st.mem_bytes,
                spill_bytes: st.spill.bytes(),
                spilled_total: st.spilled_total,
                dirty_blocks: st.dirty.values().map(|s| s.len() as u64).sum(),
                needs_resync: st.needs_resync,
            },
            Err(_) => QueueStats::default(),
        }
    }

    /// Whether every queued entry has been acknowledged.
    pub fn is_empty(&self) -> bool {
        self.state.lock().is_ok_and(|st| st.mem.is_empty() && st.spill.entries() == 0)
    }
}

fn mark_dirty(st: &mut State, w: &QueuedWrite) {
    let bs = BLOCK_SIZE as u64;
    let set = st.dirty.entry(w.write.disk).or_default();
    if w.write.len > 0 {
        for b in w.write.offset / bs..=(w.write.offset + w.write.len - 1) / bs {
            set.insert(b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// Pushes `w`; its spill pages are written before this returns.
    fn push(q: &SendQueue, w: QueuedWrite) -> io::Result<Pushed> {
        Ok(q.push_write(w)?.0)
    }

    fn w(seq: u64, n: usize) -> QueuedWrite {
        QueuedWrite::for_test(seq, vec![seq as u8; n])
    }

    /// The sender's wait ends when a write arrives, and a write that
    /// arrived while the sender was busy elsewhere ends the next wait at
    /// once: none waits out the timeout.
    #[tokio::test]
    async fn the_sender_wakes_for_each_arrival_and_misses_none() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let q = Arc::new(SendQueue::new(QueueConfig {
            memory_bytes: 1 << 20,
            spill_path: dir.path().join("spill"),
            spill_bytes: 1 << 20,
            backpressure: Backpressure::Block,
        })?);
        let long = Duration::from_secs(10);
        let producer = {
            let q = q.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                q.push_write(w(1, 4096)).map(|(pushed, _)| pushed)
            })
        };
        let start = std::time::Instant::now();
        let got = q.next_unsent_or_wait(1 << 20, 10, long).await?;
        assert_eq!(got.len(), 1);
        assert!(producer.join().map_err(|_| io::Error::other("producer panicked"))?.is_ok());
        // Two arrivals while the sender is away: the next wait returns at once.
        push(&q, w(2, 4096))?;
        assert_eq!(q.next_unsent(1 << 20, 10)?.len(), 1);
        push(&q, w(3, 4096))?;
        assert_eq!(q.next_unsent_or_wait(1 << 20, 10, long).await?.len(), 1);
        // A notification left over with nothing new costs one empty look.
        let empty = q.next_unsent_or_wait(1 << 20, 10, Duration::from_millis(20)).await?;
        assert!(empty.is_empty());
        assert!(start.elapsed() < Duration::from_secs(2), "a wait ran to its timeout: {:?}", start.elapsed());
        Ok(())
    }

    /// Tap threads push through a sequencer (as the source does) into a
    /// small memory budget, so much goes through the spill's pages, each
    /// written while other threads append and the sender reads: every
    /// write arrives once, in order, with its bytes.
    #[test]
    fn writes_pushed_from_many_threads_through_the_spill_arrive_in_order_with_their_bytes() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let q = Arc::new(SendQueue::new(QueueConfig {
            memory_bytes: 256 << 10,
            spill_path: dir.path().join("spill"),
            spill_bytes: 6 << 20,
            backpressure: Backpressure::Block,
        })?);
        let sequencer = Arc::new(Mutex::new(0u64));
        let (threads, each) = (4u64, 150u64);
        let producers: Vec<_> = (0..threads)
            .map(|t| {
                let (q, sequencer) = (q.clone(), sequencer.clone());
                std::thread::spawn(move || -> io::Result<()> {
                    for i in 0..each {
                        let mut next = sequencer.lock().map_err(|_| io::Error::other("poisoned"))?;
                        *next += 1;
                        let n = 4096 * (1 + ((t + i) % 24) as usize);
                        let mut x = w(*next, n);
                        x.data = Arc::new((0..n).map(|b| (*next as usize * 7 + b / 512) as u8).collect());
                        let (pushed, spill_writes) = q.push_write(x)?;
                        assert_eq!(pushed, Pushed::Queued);
                        // As the source does: the pages are written after
                        // the sequencer is let go.
                        drop(next);
                        drop(spill_writes);
                    }
                    Ok(())
                })
            })
            .collect();
        let mut expected = 1u64;
        while expected <= threads * each {
            let batch = q.next_unsent(512 << 10, 64)?;
            if batch.is_empty() {
                std::thread::sleep(Duration::from_micros(200));
                continue;
            }
            for e in batch {
                let Entry::Write(x) = e else { return Err(io::Error::other("a marker nobody pushed")) };
                assert_eq!(x.write.seq, expected, "out of order");
                let good = x.data.iter().enumerate().all(|(b, v)| *v == (x.write.seq as usize * 7 + b / 512) as u8);
                assert!(good && x.data.len() as u64 == x.write.len, "write {} came back with other bytes", x.write.seq);
                expected += 1;
            }
            q.acknowledge(expected - 1, 0)?;
        }
        for p in producers {
            p.join().map_err(|_| io::Error::other("a producer panicked"))??;
        }
        assert!(q.stats().spilled_total > threads * each / 3, "too little went through the spill: {:?}", q.stats());
        assert!(q.is_empty());
        Ok(())
    }

    #[test]
    fn spills_in_order_and_falls_back_to_bitmap() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let q = SendQueue::new(QueueConfig {
            memory_bytes: 3 * (4096 + 96),
            spill_path: dir.path().join("spill"),
            spill_bytes: 3 * (4096 + 100),
            backpressure: Backpressure::Bitmap,
        })?;
        for s in 1..=6 {
            assert_eq!(push(&q, w(s, 4096))?, Pushed::Queued);
        }
        assert_eq!(push(&q, w(7, 4096))?, Pushed::Dirty);
        assert!(q.stats().needs_resync);
        let mut got = Vec::new();
        loop {
            let batch = q.next_unsent(1 << 20, 100)?;
            if batch.is_empty() {
                break;
            }
            for e in batch {
                if let Entry::Write(x) = e {
                    assert_eq!(x.data[0], x.write.seq as u8);
                    got.push(x.write.seq);
                    q.acknowledge(x.write.seq, 0)?;
                }
            }
        }
        assert_eq!(got, vec![1, 2, 3, 4, 5, 6]);
        assert!(q.is_empty());
        Ok(())
    }

    #[test]
    fn spilled_entries_come_back_as_they_went() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let q = SendQueue::new(QueueConfig {
            memory_bytes: 4096 + 96,
            spill_path: dir.path().join("spill"),
            spill_bytes: 1 << 20,
            backpressure: Backpressure::Block,
        })?;
        let marker = Marker {
            id: 9,
            kind: CheckpointKind::Named,
            name: "before the upgrade".into(),
            source_time_ms: 1_700_000_000_000,
            cut_seq: 2,
            streams: 3,
        };
        let mut sent = vec![Entry::Write(w(1, 4096)), Entry::Write(w(2, 8192))];
        push(&q, w(1, 4096))?;
        push(&q, w(2, 8192))?;
        drop(q.push_marker(marker.clone())?);
        sent.push(Entry::Marker(marker));
        let mut odd = w(3, 5);
        odd.write.sync = true;
        push(&q, odd.clone())?;
        sent.push(Entry::Write(odd));
        assert_eq!(q.stats().spilled_total, 3);
        let mut got = Vec::new();
        while got.len() < sent.len() {
            let batch = q.next_unsent(1 << 20, 100)?;
            assert!(!batch.is_empty(), "entries lost: got {} of {}", got.len(), sent.len());
            for e in batch {
                let (seq, id) = match &e {
                    Entry::Write(x) => (x.write.seq, 0),
                    Entry::Marker(m) => (m.cut_seq, m.id),
                };
                got.push(e);
                q.acknowledge(seq, id)?;
            }
        }
        assert_eq!(got, sent);
        assert!(q.is_empty());
        Ok(())
    }

    /// The memory budget bounds what waits in memory, not what is on the
    /// link: with 64 KiB of memory all on the link, 4 MiB of spilled
    /// writes are still handed out before any acknowledgement, stay
    /// queued until acknowledged, come again after a break, and leave the
    /// spill empty once acknowledged.
    #[test]
    fn a_small_memory_budget_does_not_bound_what_is_on_the_link() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let q = SendQueue::new(QueueConfig {
            memory_bytes: 64 << 10,
            spill_path: dir.path().join("spill"),
            spill_bytes: 64 << 20,
            backpressure: Backpressure::Block,
        })?;
        let all: Vec<QueuedWrite> = (1..=64).map(|i| w(i, 64 << 10)).collect();
        for x in &all {
            push(&q, x.clone())?;
        }
        let take_all = |q: &SendQueue| -> io::Result<Vec<Entry>> {
            let mut got = Vec::new();
            loop {
                let batch = q.next_unsent(1 << 20, 1000)?;
                if batch.is_empty() {
                    return Ok(got);
                }
                got.extend(batch);
            }
        };
        let want: Vec<Entry> = all.iter().cloned().map(Entry::Write).collect();
        assert_eq!(take_all(&q)?, want, "not everything went on the link without acknowledgements");
        // Memory holds its budget (a refill may pass it by one entry).
        assert!(q.stats().memory_bytes <= 2 * ((64 << 10) + 96), "{:?}", q.stats());
        // Half acknowledged, then the link breaks: the other half again.
        q.acknowledge(32, 0)?;
        assert_eq!(q.stats().entries, 32);
        q.rewind()?;
        assert_eq!(take_all(&q)?, want[32..].to_vec());
        q.acknowledge(64, 0)?;
        assert!(q.is_empty());
        assert_eq!(q.stats().spill_bytes, 0);
        Ok(())
    }

    #[test]
    fn spill_that_was_read_back_gives_up_its_space() -> io::Result<()> {
        use std::os::unix::fs::MetadataExt;
        // ext4, xfs and tmpfs all punch holes.
        let dir = tempfile::tempdir()?;
        let spill_path = dir.path().join("spill");
        let q = SendQueue::new(QueueConfig {
            memory_bytes: 1 << 20,
            spill_path: spill_path.clone(),
            spill_bytes: 64 << 20,
            backpressure: Backpressure::Block,
        })?;
        for s in 1..=40 {
            push(&q, w(s, 1 << 20))?;
        }
        let allocated = || std::fs::metadata(&spill_path).map(|m| m.blocks() * 512);
        let full = allocated()?;
        assert!(full >= 38 << 20, "{full} bytes allocated for 39 spilled MiB");
        // The sender takes and the target acknowledges 30 of the 40.
        let mut acked = 0;
        while acked < 30 {
            for e in q.next_unsent(1 << 20, 1)? {
                if let Entry::Write(x) = e {
                    assert_eq!(x.write.seq, acked + 1);
                    acked = x.write.seq;
                    q.acknowledge(acked, 0)?;
                }
            }
        }
        let left = allocated()?;
        assert!(left <= 12 << 20, "{left} bytes still allocated with 10 MiB queued: what was read back was kept");
        assert!(q.stats().spill_bytes > 0, "the spill is not empty (it would have been cut to nothing)");
        Ok(())
    }

    #[derive(Debug, Clone)]
    enum Op {
        /// A write of this many 4 KiB blocks.
        Push(usize),
        Marker,
        /// The sender takes up to this many entries.
        Take(usize),
        /// The target acknowledges this many of the entries sent.
        Ack(usize),
        /// The link broke.
        Rewind,
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        prop_oneof![
            6 => (1usize..=64).prop_map(Op::Push),
            1 => (300usize..=400).prop_map(Op::Push),
            1 => Just(Op::Marker),
            3 => (1usize..=20).prop_map(Op::Take),
            2 => (1usize..=20).prop_map(Op::Ack),
            1 => Just(Op::Rewind),
        ]
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 32, ..Default::default() })]

        /// Any mix of writes (most of them through the spill's pages,
        /// some larger than a page), markers, sends, acknowledgements and
        /// link breaks: the sender gets exactly the entries not yet
        /// acknowledged, in order, with their bytes, as a model queue says.
        #[test]
        fn the_queue_hands_out_what_a_model_queue_would(ops in proptest::collection::vec(op(), 1..120)) {
            let dir = tempfile::tempdir().map_err(|e| proptest::test_runner::TestCaseError::fail(e.to_string()))?;
            let q = SendQueue::new(QueueConfig {
                memory_bytes: 256 << 10,
                spill_path: dir.path().join("spill"),
                spill_bytes: 1 << 30,
                backpressure: Backpressure::Block,
            }).map_err(|e| proptest::test_runner::TestCaseError::fail(e.to_string()))?;
            let fail = |e: io::Error| proptest::test_runner::TestCaseError::fail(e.to_string());
            // The model: entries not acknowledged, and how many were sent.
            let mut model: VecDeque<Entry> = VecDeque::new();
            let mut sent = 0usize;
            let (mut seq, mut marker) = (0u64, 0u64);
            for op in ops {
                match op {
                    Op::Push(blocks) => {
                        seq += 1;
                        let data: Vec<u8> = (0..blocks * 4096).map(|i| (seq as usize * 13 + i / 4096 + i % 7) as u8).collect();
                        let w = QueuedWrite::for_test(seq, data);
                        proptest::prop_assert_eq!(push(&q, w.clone()).map_err(fail)?, Pushed::Queued);
                        model.push_back(Entry::Write(w));
                    }
                    Op::Marker => {
                        marker += 1;
                        let m = Marker {
                            id: marker,
                            kind: CheckpointKind::Automatic,
                            name: format!("m{marker}"),
                            source_time_ms: marker,
                            cut_seq: seq,
                            streams: 1,
                        };
                        drop(q.push_marker(m.clone()).map_err(fail)?);
                        model.push_back(Entry::Marker(m));
                    }
                    Op::Take(n) => {
                        // Up to `n`, in order.
                        let got = q.next_unsent(u64::MAX, n).map_err(fail)?;
                        let want: Vec<Entry> = model.iter().skip(sent).take(got.len()).cloned().collect();
                        // Something whenever something is unsent: even
                        // with the memory budget taken by entries on the
                        // link, spilled ones go from the spill.
                        proptest::prop_assert!(got.len() <= n && (model.len() > sent) != got.is_empty());
                        proptest::prop_assert!(got == want, "took {} entries that differ from the model's next", got.len());
                        sent += got.len();
                    }
                    Op::Ack(n) => {
                        let n = n.min(sent);
                        if n == 0 {
                            continue;
                        }
                        let (mut upto, mut cp) = (0, 0);
                        for e in model.iter().take(n) {
                            match e {
                                Entry::Write(w) => upto = upto.max(w.write.seq),
                                Entry::Marker(m) => cp = cp.max(m.id),
                            }
                        }
                        q.acknowledge(upto, cp).map_err(fail)?;
                        while let Some(front) = model.front() {
                            let done = match front {
                                Entry::Write(w) => w.write.seq <= upto,
                                Entry::Marker(m) => m.id <= cp && m.cut_seq <= upto,
                            };
                            if !done {
                                break;
                            }
                            model.pop_front();
                            sent = sent.saturating_sub(1);
                        }
                    }
                    Op::Rewind => {
                        q.rewind().map_err(fail)?;
                        sent = 0;
                    }
                }
                proptest::prop_assert_eq!(q.stats().entries, model.len() as u64);
            }
            // Whatever is left comes out whole, in order.
            q.rewind().map_err(fail)?;
            let mut rest = Vec::new();
            loop {
                let got = q.next_unsent(u64::MAX, 64).map_err(fail)?;
                if got.is_empty() {
                    break;
                }
                let (mut upto, mut cp) = (0, 0);
                for e in &got {
                    match e {
                        Entry::Write(w) => upto = upto.max(w.write.seq),
                        Entry::Marker(m) => (upto, cp) = (upto.max(m.cut_seq), cp.max(m.id)),
                    }
                }
                q.acknowledge(upto, cp).map_err(fail)?;
                rest.extend(got);
            }
            proptest::prop_assert!(model == rest, "the rest of the queue differs from the model");
            proptest::prop_assert!(q.is_empty());
        }
    }
}
