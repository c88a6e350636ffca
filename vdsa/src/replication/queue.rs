//! The source's send queue (architecture.md §5): writes wait here, in stream
//! order, until the target has made them durable. Memory first, up to a
//! budget; then a spill file; when both are full, either the tap waits
//! (back-pressure) or writes are only marked in a dirty-block bitmap and
//! the stream needs a resync.

use crate::journal::BLOCK_SIZE;
use crate::wire::msg::{kind_code, kind_from_code, write_kind_code, write_kind_from_code, Marker, StreamWrite};
use protection_groups::{CheckpointKind, DiskId};
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
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
    fn cost(&self) -> u64 {
        match self {
            Entry::Write(w) => w.data.len() as u64 + 96,
            Entry::Marker(m) => m.name.len() as u64 + 96,
        }
    }
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
struct Spill {
    file: File,
    read_at: u64,
    write_at: u64,
    entries: u64,
    /// Everything before this has been read back and its space given up.
    released_to: u64,
}

/// Read-back spill is given up in steps of at least this much.
const RELEASE_STEP: u64 = 1 << 20;

impl Spill {
    /// Gives up the space, and the page cache, of what was read back
    /// (a hole punched in the file): a spill that never empties would
    /// otherwise fill the page cache with bytes nobody reads again, and
    /// write them all to the disk. Where the filesystem cannot punch
    /// holes the bytes stay until the spill empties, as before.
    fn release_read_back(&mut self) {
        let end = self.read_at / 4096 * 4096;
        if end < self.released_to + RELEASE_STEP {
            return;
        }
        let (Ok(off), Ok(len)) = (i64::try_from(self.released_to), i64::try_from(end - self.released_to)) else {
            return;
        };
        use std::os::fd::AsRawFd;
        // SAFETY: fallocate reads no memory of ours; the descriptor is
        // open (we hold the File). The range lies before `read_at`: only
        // entries already read back are in it.
        let r = unsafe {
            libc::fallocate(self.file.as_raw_fd(), libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, off, len)
        };
        if r == 0 {
            self.released_to = end;
        } else {
            // Not supported here: stop trying until the spill empties.
            self.released_to = u64::MAX / 2;
        }
    }
}

#[derive(Debug)]
struct State {
    /// The oldest entries, in stream order; `sent` of them are on the link.
    mem: VecDeque<Entry>,
    mem_bytes: u64,
    sent: usize,
    /// Newer entries than all of `mem`.
    spill: Spill,
    spilled_total: u64,
    /// Writes dropped for lack of room: (disk, block). While non-empty (or
    /// until a resync starts) the stream is not a consistent copy.
    dirty: HashMap<DiskId, BTreeSet<u64>>,
    needs_resync: bool,
    closed: bool,
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
        let file =
            std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&cfg.spill_path)?;
        Ok(SendQueue {
            cfg,
            state: Mutex::new(State {
                mem: VecDeque::new(),
                mem_bytes: 0,
                sent: 0,
                spill: Spill { file, read_at: 0, write_at: 0, entries: 0, released_to: 0 },
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
    /// [`SendQueue::resync_started`]). Writes of a sync always wait.
    pub fn push_write(&self, w: QueuedWrite) -> io::Result<Pushed> {
        let mut st = lock(&self.state)?;
        loop {
            if st.needs_resync && !w.write.sync {
                mark_dirty(&mut st, &w);
                return Ok(Pushed::Dirty);
            }
            let e = Entry::Write(w.clone());
            if self.room(&st, &e) {
                self.append(&mut st, e)?;
                return Ok(Pushed::Queued);
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
                    return Ok(Pushed::Dirty);
                }
            }
        }
    }

    /// Appends a checkpoint marker (small: never refused for room). A marker
    /// placed while writes were dropped to the bitmap is inconsistent.
    pub fn push_marker(&self, mut m: Marker) -> io::Result<CheckpointKind> {
        let mut st = lock(&self.state)?;
        if st.needs_resync || !st.dirty.is_empty() {
            m.kind = CheckpointKind::Inconsistent;
        }
        let kind = m.kind;
        self.append(&mut st, Entry::Marker(m))?;
        Ok(kind)
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
        st.spill.entries == 0 && st.mem_bytes + c <= self.cfg.memory_bytes
    }

    fn room(&self, st: &State, e: &Entry) -> bool {
        let c = e.cost();
        self.fits_memory(st, c) || st.spill.write_at - st.spill.read_at + c <= self.cfg.spill_bytes
    }

    fn append(&self, st: &mut State, e: Entry) -> io::Result<()> {
        let c = e.cost();
        if self.fits_memory(st, c) {
            st.mem_bytes += c;
            st.mem.push_back(e);
        } else {
            st.spill.write_at += write_spilled(&st.spill.file, st.spill.write_at, &e)?;
            st.spill.entries += 1;
            st.spilled_total += 1;
        }
        self.changed.notify_all();
        self.arrived.notify_one();
        Ok(())
    }

    /// Moves spilled entries back into memory while there is room.
    fn refill(&self, st: &mut State) -> io::Result<()> {
        while st.spill.entries > 0 && st.mem_bytes < self.cfg.memory_bytes {
            let (e, n) = read_spilled(&st.spill.file, st.spill.read_at)?;
            st.spill.read_at += n;
            st.spill.entries -= 1;
            st.mem_bytes += e.cost();
            st.mem.push_back(e);
        }
        if st.spill.entries == 0 && st.spill.write_at > 0 {
            st.spill.file.set_len(0)?;
            st.spill.read_at = 0;
            st.spill.write_at = 0;
            st.spill.released_to = 0;
        } else {
            st.spill.release_read_back();
        }
        Ok(())
    }

    /// Up to `max_bytes` of entries not yet on the link (at least one if
    /// any), waiting up to `wait` for one to arrive. The wait holds no
    /// thread: a notification left by an arrival while the sender was busy
    /// ends the next wait at once, so none is missed.
    pub async fn next_unsent_or_wait(
        &self,
        max_bytes: u64,
        max_items: usize,
        wait: Duration,
    ) -> io::Result<Vec<Entry>> {
        let found = self.next_unsent(max_bytes, max_items)?;
        if !found.is_empty() || wait.is_zero() {
            return Ok(found);
        }
        let _ = tokio::time::timeout(wait, self.arrived.notified()).await;
        self.next_unsent(max_bytes, max_items)
    }

    /// Up to `max_bytes` of entries not yet on the link (at least one if
    /// any), without waiting.
    pub fn next_unsent(&self, max_bytes: u64, max_items: usize) -> io::Result<Vec<Entry>> {
        let mut st = lock(&self.state)?;
        if st.sent >= st.mem.len() {
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
        Ok(out)
    }

    /// The link broke: everything not acknowledged is sent again.
    pub fn rewind(&self) -> io::Result<()> {
        lock(&self.state)?.sent = 0;
        Ok(())
    }

    /// The target made writes up to `seq` and markers up to checkpoint
    /// `checkpoint` durable: they leave the queue.
    pub fn acknowledge(&self, seq: u64, checkpoint: u64) -> io::Result<()> {
        let mut st = lock(&self.state)?;
        while let Some(front) = st.mem.front() {
            let done = match front {
                Entry::Write(w) => w.write.seq <= seq,
                Entry::Marker(m) => m.id <= checkpoint && m.cut_seq <= seq,
            };
            if !done {
                break;
            }
            let c = front.cost();
            st.mem.pop_front();
            st.mem_bytes -= c;
            st.sent = st.sent.saturating_sub(1);
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
                entries: st.mem.len() as u64 + st.spill.entries,
                memory_bytes: st.mem_bytes,
                spill_bytes: st.spill.write_at - st.spill.read_at,
                spilled_total: st.spilled_total,
                dirty_blocks: st.dirty.values().map(|s| s.len() as u64).sum(),
                needs_resync: st.needs_resync,
            },
            Err(_) => QueueStats::default(),
        }
    }

    /// Whether every queued entry has been acknowledged.
    pub fn is_empty(&self) -> bool {
        self.state.lock().is_ok_and(|st| st.mem.is_empty() && st.spill.entries == 0)
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

/// Spill file records: the length of what follows (u32), then the entry:
/// its kind and fields, and a write's bytes last, so that they go to the
/// file from the queued buffer and come back into the buffer the entry
/// keeps, with no copy on either side (docs/performance.md, "Copies of a
/// block"). Not crash-safe by design: after a source restart the queue is
/// gone and a delta sync follows.
const WRITE_FIELDS: usize = 43;

/// Writes `e` at `at`; returns the bytes the record takes.
fn write_spilled(file: &File, at: u64, e: &Entry) -> io::Result<u64> {
    let mut head = vec![0u8; 4];
    let data: &[u8] = match e {
        Entry::Write(w) => {
            head.push(1);
            head.extend_from_slice(&w.write.seq.to_be_bytes());
            head.extend_from_slice(w.write.disk.as_bytes());
            head.extend_from_slice(&w.write.offset.to_be_bytes());
            head.extend_from_slice(&w.write.len.to_be_bytes());
            head.push(write_kind_code(w.write.kind));
            head.push(w.write.sync as u8);
            &w.data
        }
        Entry::Marker(m) => {
            head.push(2);
            head.extend_from_slice(&m.id.to_be_bytes());
            head.push(kind_code(m.kind));
            head.extend_from_slice(&m.source_time_ms.to_be_bytes());
            head.extend_from_slice(&m.cut_seq.to_be_bytes());
            head.extend_from_slice(&m.streams.to_be_bytes());
            head.extend_from_slice(m.name.as_bytes());
            &[]
        }
    };
    let body = head.len() - 4 + data.len();
    let n = u32::try_from(body).map_err(|_| io::Error::other(format!("a queued entry of {body} bytes")))?;
    head[..4].copy_from_slice(&n.to_be_bytes());
    file.write_all_at(&head, at)?;
    file.write_all_at(data, at + head.len() as u64)?;
    Ok(4 + body as u64)
}

/// Reads the record at `at`: the entry and the bytes the record took.
fn read_spilled(file: &File, at: u64) -> io::Result<(Entry, u64)> {
    let unreadable = |what: &str| io::Error::other(format!("spill file entry at {at} unreadable: {what}"));
    // The length and the kind byte after it, in one read.
    let mut lead = [0u8; 5];
    file.read_exact_at(&mut lead, at)?;
    let n = u32::from_be_bytes([lead[0], lead[1], lead[2], lead[3]]) as usize;
    let entry = if lead[4] == 1 {
        let data_len = n.checked_sub(WRITE_FIELDS).ok_or_else(|| unreadable("shorter than a write's fields"))?;
        let mut head = [0u8; WRITE_FIELDS];
        file.read_exact_at(&mut head, at + 4)?;
        // Read into the vector's spare room: no zeroing of bytes that the
        // read overwrites at once.
        let mut data = Vec::with_capacity(data_len);
        let mut f = file;
        f.seek(SeekFrom::Start(at + 4 + WRITE_FIELDS as u64))?;
        f.take(data_len as u64).read_to_end(&mut data)?;
        if data.len() != data_len {
            return Err(unreadable("cut short"));
        }
        decode_write(&head, data)
    } else {
        let mut body = vec![0u8; n];
        file.read_exact_at(&mut body, at + 4)?;
        decode_marker(&body)
    };
    Ok((entry.ok_or_else(|| unreadable("bad fields"))?, 4 + n as u64))
}

fn u64_at(b: &[u8], i: usize) -> Option<u64> {
    Some(u64::from_be_bytes(b.get(i..i + 8)?.try_into().ok()?))
}

/// A write's fields (kind byte first) and its bytes.
fn decode_write(head: &[u8; WRITE_FIELDS], data: Vec<u8>) -> Option<Entry> {
    let seq = u64_at(head, 1)?;
    let disk = DiskId::from_bytes(head.get(9..25)?.try_into().ok()?);
    let offset = u64_at(head, 25)?;
    let len = u64_at(head, 33)?;
    let kind = write_kind_from_code(head[41])?;
    let sync = head[42] != 0;
    let write = StreamWrite { seq, disk, offset, len, kind, sync };
    Some(Entry::Write(QueuedWrite { write, data: Arc::new(data) }))
}

fn decode_marker(b: &[u8]) -> Option<Entry> {
    if b.first() != Some(&2) {
        return None;
    }
    let id = u64_at(b, 1)?;
    let kind = kind_from_code(*b.get(9)?)?;
    let source_time_ms = u64_at(b, 10)?;
    let cut_seq = u64_at(b, 18)?;
    let streams = u16::from_be_bytes(b.get(26..28)?.try_into().ok()?);
    let name = String::from_utf8(b.get(28..)?.to_vec()).ok()?;
    Some(Entry::Marker(Marker { id, kind, name, source_time_ms, cut_seq, streams }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use protection_groups::WriteKind;

    fn w(seq: u64, n: usize) -> QueuedWrite {
        QueuedWrite {
            write: StreamWrite {
                seq,
                disk: DiskId::from_bytes([1; 16]),
                offset: seq * 4096,
                len: n as u64,
                kind: WriteKind::Data,
                sync: false,
            },
            data: Arc::new(vec![seq as u8; n]),
        }
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
                q.push_write(w(1, 4096))
            })
        };
        let start = std::time::Instant::now();
        let got = q.next_unsent_or_wait(1 << 20, 10, long).await?;
        assert_eq!(got.len(), 1);
        assert!(producer.join().map_err(|_| io::Error::other("producer panicked"))?.is_ok());
        // Two arrivals while the sender is away: the next wait returns at once.
        q.push_write(w(2, 4096))?;
        assert_eq!(q.next_unsent(1 << 20, 10)?.len(), 1);
        q.push_write(w(3, 4096))?;
        assert_eq!(q.next_unsent_or_wait(1 << 20, 10, long).await?.len(), 1);
        // A notification left over with nothing new costs one empty look.
        let empty = q.next_unsent_or_wait(1 << 20, 10, Duration::from_millis(20)).await?;
        assert!(empty.is_empty());
        assert!(start.elapsed() < Duration::from_secs(2), "a wait ran to its timeout: {:?}", start.elapsed());
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
            assert_eq!(q.push_write(w(s, 4096))?, Pushed::Queued);
        }
        assert_eq!(q.push_write(w(7, 4096))?, Pushed::Dirty);
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
        q.push_write(w(1, 4096))?;
        q.push_write(w(2, 8192))?;
        q.push_marker(marker.clone())?;
        sent.push(Entry::Marker(marker));
        let mut odd = w(3, 5);
        odd.write.sync = true;
        q.push_write(odd.clone())?;
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
            q.push_write(w(s, 1 << 20))?;
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

    #[test]
    fn a_damaged_spill_record_is_an_error_that_names_it() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let file =
            std::fs::OpenOptions::new().read(true).write(true).create_new(true).open(dir.path().join("spill"))?;
        let n = write_spilled(&file, 0, &Entry::Write(w(1, 4096)))?;
        assert_eq!(read_spilled(&file, 0)?, (Entry::Write(w(1, 4096)), n));
        file.write_all_at(&7u32.to_be_bytes(), 0)?;
        let e = read_spilled(&file, 0).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("spill file entry at 0 unreadable"), "{e}");
        // A length past the file's end.
        file.write_all_at(&(n as u32 + 100).to_be_bytes(), 0)?;
        let e = read_spilled(&file, 0).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("spill file entry at 0 unreadable: cut short"), "{e}");
        Ok(())
    }
}
