//! The send queue's spill file (architecture.md §5): the entries that do
//! not fit the queue's memory, as one stream of records, written and read
//! back a page ([`PAGE`]) at a time with `O_DIRECT`. Spilled bytes are
//! read back once and soon, and a buffered write cost the source more than
//! everything else its spill does (docs/performance.md, "The spill past
//! the page cache").
//!
//! The queue's lock is held while a record is copied into the page being
//! filled. A full page is written by the thread that filled it after the
//! lock is let go ([`FullPage`]), and is read back from memory until the
//! write is done. A page the disk refused (a full disk) stays in memory
//! until it is read back, and the spill takes nothing more until it
//! empties, so the queue's back-pressure policy decides what the next
//! writes do: nothing spilled is lost.
//!
//! Not crash-safe by design: after a source restart the queue is gone and
//! a delta sync follows.

use super::entry::{Entry, QueuedWrite};
use crate::direct_io::{or_through_page_cache, AlignedBuf};
use crate::wire::msg::{kind_code, kind_from_code, write_kind_code, write_kind_from_code, Marker, StreamWrite};
use protection_groups::DiskId;
use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The unit of the spill's reads and writes, and of the space it gives up.
pub const PAGE: usize = 1 << 20;
const PAGE_BYTES: u64 = PAGE as u64;
/// Page buffers kept for reuse while the spill is in use.
const SPARE_PAGES: usize = 2;

/// A full page, to be written without the queue's lock
/// ([`FullPage::write`]) and then handed back ([`Spill::page_written`]).
#[derive(Debug)]
pub struct FullPage {
    start: u64,
    buf: Arc<AlignedBuf>,
    file: Arc<File>,
}

impl FullPage {
    pub fn write(&self) -> io::Result<()> {
        let bytes = self.buf.first(PAGE).ok_or_else(|| io::Error::other("a spill page shorter than a page"))?;
        or_through_page_cache(&self.file, "the spill file", || self.file.write_all_at(bytes, self.start))
    }
}

/// A full page not on the disk: being written, or refused by it.
#[derive(Debug)]
struct Unwritten {
    start: u64,
    buf: Arc<AlignedBuf>,
    refused: bool,
}

#[derive(Debug)]
pub struct Spill {
    file: Arc<File>,
    path: PathBuf,
    /// Stream positions: the oldest record still held, the next record
    /// not yet handed to the sender, and the end.
    read_at: u64,
    send_at: u64,
    write_at: u64,
    entries: u64,
    /// Records between `read_at` and `send_at`: on the link, kept here
    /// until acknowledged (the queue's memory is not their send window).
    sent_entries: u64,
    /// Everything before this was read back and its space given up.
    released_to: u64,
    /// The page being filled: the stream's bytes from `tail_start` (a page
    /// boundary) to `write_at`.
    tail: Option<AlignedBuf>,
    tail_start: u64,
    /// Full pages not on the disk, oldest first.
    unwritten: VecDeque<Unwritten>,
    /// The page last read from the file, and its start.
    head: Option<(u64, AlignedBuf)>,
    spare: Vec<AlignedBuf>,
    /// Why the disk refused a page: the spill takes nothing more until it
    /// empties.
    refused: Option<String>,
}

impl Spill {
    /// Creates (or empties) the spill file, with direct I/O where the
    /// filesystem has it.
    pub fn create(path: &Path) -> io::Result<Spill> {
        use std::os::unix::fs::OpenOptionsExt;
        let mut open = std::fs::OpenOptions::new();
        open.read(true).write(true).create(true).truncate(true);
        let file = match open.clone().custom_flags(libc::O_DIRECT).open(path) {
            Ok(f) => f,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                tracing::debug!(path = %path.display(), "no direct I/O for the spill: {e}");
                open.open(path)?
            }
            Err(e) => return Err(e),
        };
        Ok(Spill {
            file: Arc::new(file),
            path: path.to_path_buf(),
            read_at: 0,
            send_at: 0,
            write_at: 0,
            entries: 0,
            sent_entries: 0,
            released_to: 0,
            tail: None,
            tail_start: 0,
            unwritten: VecDeque::new(),
            head: None,
            spare: Vec::new(),
            refused: None,
        })
    }

    /// Entries spilled and not yet read back or dropped (sent ones too).
    pub fn entries(&self) -> u64 {
        self.entries
    }

    /// Entries spilled and not yet handed to the sender.
    pub fn unsent_entries(&self) -> u64 {
        self.entries - self.sent_entries
    }

    /// Bytes spilled and not yet read back.
    pub fn bytes(&self) -> u64 {
        self.write_at - self.read_at
    }

    /// Whether an entry of budget cost `cost` fits under `limit`.
    pub fn has_room(&self, cost: u64, limit: u64) -> bool {
        self.refused.is_none() && self.bytes() + cost <= limit
    }

    /// Appends `e`. The pages it filled must be written (without the
    /// queue's lock) and handed back to [`Spill::page_written`].
    pub fn push(&mut self, e: &Entry) -> io::Result<Vec<FullPage>> {
        let (head, data) = encode(e)?;
        let mut full = Vec::new();
        self.put(&head, &mut full);
        self.put(data, &mut full);
        self.entries += 1;
        Ok(full)
    }

    fn put(&mut self, mut bytes: &[u8], full: &mut Vec<FullPage>) {
        while !bytes.is_empty() {
            let off = (self.write_at - self.tail_start) as usize;
            let spare = &mut self.spare;
            let tail = self.tail.get_or_insert_with(|| spare.pop().unwrap_or_else(|| AlignedBuf::with_len(PAGE)));
            let n = (PAGE - off).min(bytes.len());
            tail.get(PAGE)[off..off + n].copy_from_slice(&bytes[..n]);
            self.write_at += n as u64;
            bytes = &bytes[n..];
            if off + n == PAGE {
                if let Some(page) = self.tail.take() {
                    let buf = Arc::new(page);
                    self.unwritten.push_back(Unwritten { start: self.tail_start, buf: buf.clone(), refused: false });
                    full.push(FullPage { start: self.tail_start, buf, file: self.file.clone() });
                }
                self.tail_start += PAGE_BYTES;
            }
        }
    }

    /// A page's write is over. A refused page stays in memory until read
    /// back; the spill takes nothing more until it empties.
    pub fn page_written(&mut self, page: FullPage, result: io::Result<()>) {
        let start = page.start;
        drop(page);
        let Some(i) = self.unwritten.iter().position(|u| u.start == start) else {
            return;
        };
        match result {
            Ok(()) => {
                if let Some(u) = self.unwritten.remove(i) {
                    self.recycle(u.buf);
                }
            }
            Err(e) => {
                let why = format!("writing {} at {start}: {e}", self.path.display());
                if self.refused.is_none() {
                    tracing::warn!("the spill file is full or failing ({why}): the queue is full until it empties");
                }
                self.unwritten[i].refused = true;
                self.refused = Some(why);
            }
        }
        self.reset_if_empty();
    }

    fn recycle(&mut self, buf: Arc<AlignedBuf>) {
        if let Ok(buf) = Arc::try_unwrap(buf) {
            if self.spare.len() < SPARE_PAGES {
                self.spare.push(buf);
            }
        }
    }

    /// Reads back the oldest spilled entry, and whether it was handed to
    /// the sender already ([`Spill::next_unsent`]); None when there is none.
    pub fn pop(&mut self) -> io::Result<Option<(Entry, bool)>> {
        if self.entries == 0 {
            return Ok(None);
        }
        let (entry, next) = self.read_entry(self.read_at)?;
        let sent = self.read_at < self.send_at;
        if sent {
            self.sent_entries -= 1;
        }
        self.give_up_to(next);
        Ok(Some((entry, sent)))
    }

    /// The oldest entry not yet handed to the sender, which stays here
    /// until [`Spill::drop_sent`] (acknowledged) or [`Spill::pop`]; and
    /// where its record ends.
    pub fn next_unsent(&mut self) -> io::Result<Option<(Entry, u64)>> {
        if self.unsent_entries() == 0 {
            return Ok(None);
        }
        let (entry, next) = self.read_entry(self.send_at)?;
        self.send_at = next;
        self.sent_entries += 1;
        Ok(Some((entry, next)))
    }

    /// The cost of the oldest entry not yet handed to the sender, as
    /// [`Entry::cost`] counts it, without reading its bytes.
    pub fn next_unsent_cost(&mut self) -> io::Result<Option<u64>> {
        if self.unsent_entries() == 0 {
            return Ok(None);
        }
        let lead = self.read_lead(self.send_at)?;
        // A marker's record holds its name and fixed fields: a cost at
        // least the name's, which only makes a batch end sooner.
        Ok(Some(lead.write_data.unwrap_or(lead.body) as u64 + 96))
    }

    /// The oldest entry, which was sent and whose record ends at `end`,
    /// was acknowledged: it leaves without being read again.
    pub fn drop_sent(&mut self, end: u64) -> io::Result<()> {
        if self.sent_entries == 0 || end <= self.read_at || end > self.send_at {
            return Err(io::Error::other(format!(
                "spill file: dropping a sent entry ending at {end}, with {} sent between {} and {}",
                self.sent_entries, self.read_at, self.send_at
            )));
        }
        self.sent_entries -= 1;
        self.give_up_to(end);
        Ok(())
    }

    /// The link broke: entries handed to the sender are handed out again.
    pub fn rewind_sends(&mut self) {
        self.send_at = self.read_at;
        self.sent_entries = 0;
    }

    /// The oldest entry, whose record ends at `next`, leaves the spill.
    fn give_up_to(&mut self, next: u64) {
        self.read_at = next;
        self.send_at = self.send_at.max(next);
        self.entries -= 1;
        // Refused pages wholly read back leave memory.
        while self.unwritten.front().is_some_and(|u| u.refused && u.start + PAGE_BYTES <= self.read_at) {
            if let Some(u) = self.unwritten.pop_front() {
                self.recycle(u.buf);
            }
        }
        if !self.reset_if_empty() {
            self.release_read_back();
        }
    }

    /// The length of the record at `at` and, for a write, of its data:
    /// checked against the spill's end and a write's fields.
    fn read_lead(&mut self, at: u64) -> io::Result<RecordLead> {
        // The length and the kind byte after it.
        let mut lead = Vec::with_capacity(5);
        self.read(at, 5, &mut lead)?;
        let body = u32::from_be_bytes([lead[0], lead[1], lead[2], lead[3]]) as usize;
        if at + 4 + body as u64 > self.write_at {
            return Err(unreadable(at, "runs past the spill's end"));
        }
        let write_data = match lead[4] {
            1 => Some(body.checked_sub(WRITE_FIELDS).ok_or_else(|| unreadable(at, "shorter than a write's fields"))?),
            _ => None,
        };
        Ok(RecordLead { body, write_data })
    }

    /// The record at `at`, and where the next one starts.
    fn read_entry(&mut self, at: u64) -> io::Result<(Entry, u64)> {
        let RecordLead { body: n, write_data } = self.read_lead(at)?;
        let entry = if let Some(data_len) = write_data {
            let mut head = Vec::with_capacity(WRITE_FIELDS);
            self.read(at + 4, WRITE_FIELDS, &mut head)?;
            // Read into the vector's spare room: no zeroing of bytes that
            // the copy overwrites at once.
            let mut data = Vec::with_capacity(data_len);
            self.read(at + 4 + WRITE_FIELDS as u64, data_len, &mut data)?;
            decode_write(&head, data)
        } else {
            let mut body = Vec::with_capacity(n);
            self.read(at + 4, n, &mut body)?;
            decode_marker(&body)
        };
        Ok((entry.ok_or_else(|| unreadable(at, "bad fields"))?, at + 4 + n as u64))
    }

    /// Appends the stream's `len` bytes at `at` to `out`.
    fn read(&mut self, mut at: u64, mut len: usize, out: &mut Vec<u8>) -> io::Result<()> {
        if at + len as u64 > self.write_at {
            return Err(io::Error::other(format!(
                "spill file entry at {} unreadable: runs past the spill's end ({} bytes from {at}, the spill ends at {})",
                self.read_at, len, self.write_at
            )));
        }
        while len > 0 {
            let start = at / PAGE_BYTES * PAGE_BYTES;
            let off = (at - start) as usize;
            let n = (PAGE - off).min(len);
            let page = if start == self.tail_start {
                self.tail.as_ref()
            } else if let Some(u) = self.unwritten.iter().find(|u| u.start == start) {
                Some(&*u.buf)
            } else {
                self.load(start)?;
                self.head.as_ref().map(|(_, b)| b)
            };
            let bytes = page.and_then(|p| p.first(PAGE)).ok_or_else(|| {
                io::Error::other(format!("spill file page at {start} missing while reading back {at}"))
            })?;
            out.extend_from_slice(&bytes[off..off + n]);
            at += n as u64;
            len -= n;
        }
        Ok(())
    }

    /// Makes the page at `start`, written whole, the head page.
    fn load(&mut self, start: u64) -> io::Result<()> {
        if self.head.as_ref().is_some_and(|(s, _)| *s == start) {
            return Ok(());
        }
        let mut buf = match self.head.take() {
            Some((_, b)) => b,
            None => self.spare.pop().unwrap_or_default(),
        };
        let bytes = buf.get(PAGE);
        let file = &self.file;
        or_through_page_cache(file, "the spill file", || file.read_exact_at(bytes, start)).map_err(|e| {
            io::Error::other(format!("reading back the spill page at {start} of {}: {e}", self.path.display()))
        })?;
        self.head = Some((start, buf));
        Ok(())
    }

    /// When everything was read back and no page is being written, the
    /// file is cut to nothing and the memory given back.
    fn reset_if_empty(&mut self) -> bool {
        if self.entries > 0 || !self.unwritten.is_empty() || self.write_at == 0 {
            return false;
        }
        if let Err(e) = self.file.set_len(0) {
            tracing::warn!(path = %self.path.display(), "cutting the emptied spill file: {e}");
        }
        self.read_at = 0;
        self.send_at = 0;
        self.sent_entries = 0;
        self.write_at = 0;
        self.released_to = 0;
        self.tail = None;
        self.tail_start = 0;
        self.head = None;
        self.spare.clear();
        self.refused = None;
        true
    }

    /// Gives up the disk space of whole pages read back (a hole punched),
    /// in steps of a page: a spill that never empties would otherwise
    /// grow the file without end. Where the filesystem cannot punch holes
    /// the space stays until the spill empties.
    fn release_read_back(&mut self) {
        let mut end = self.read_at.min(self.tail_start) / PAGE_BYTES * PAGE_BYTES;
        if let Some(u) = self.unwritten.front() {
            end = end.min(u.start);
        }
        if end < self.released_to + PAGE_BYTES {
            return;
        }
        let (Ok(off), Ok(len)) = (i64::try_from(self.released_to), i64::try_from(end - self.released_to)) else {
            return;
        };
        use std::os::fd::AsRawFd;
        // SAFETY: fallocate reads no memory of ours; the descriptor is
        // open (we hold the File). The range lies before `read_at` and
        // before every page still being written: nothing in it is read or
        // written again.
        let r = unsafe {
            libc::fallocate(self.file.as_raw_fd(), libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, off, len)
        };
        self.released_to = if r == 0 { end } else { u64::MAX / 2 };
    }
}

fn unreadable(at: u64, what: &str) -> io::Error {
    io::Error::other(format!("spill file entry at {at} unreadable: {what}"))
}

/// What a record's first bytes say: the length of its body (all after the
/// length field) and, for a write, of the write's bytes at its end.
#[derive(Debug, Clone, Copy)]
struct RecordLead {
    body: usize,
    write_data: Option<usize>,
}

/// A spill record: the length of what follows (u32), then the entry: its
/// kind and fields, and a write's bytes last, copied into the page from
/// the queued buffer and out of the page into the buffer the entry keeps.
const WRITE_FIELDS: usize = 43;

/// A record's head (length, kind, fields) and the bytes that follow it.
fn encode(e: &Entry) -> io::Result<(Vec<u8>, &[u8])> {
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
    Ok((head, data))
}

fn u64_at(b: &[u8], i: usize) -> Option<u64> {
    Some(u64::from_be_bytes(b.get(i..i + 8)?.try_into().ok()?))
}

/// A write's fields (kind byte first) and its bytes.
fn decode_write(head: &[u8], data: Vec<u8>) -> Option<Entry> {
    let seq = u64_at(head, 1)?;
    let disk = DiskId::from_bytes(head.get(9..25)?.try_into().ok()?);
    let offset = u64_at(head, 25)?;
    let len = u64_at(head, 33)?;
    let kind = write_kind_from_code(*head.get(41)?)?;
    let sync = *head.get(42)? != 0;
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
    use protection_groups::CheckpointKind;

    fn w(seq: u64, n: usize) -> Entry {
        let bytes: Vec<u8> = (0..n).map(|i| (seq as usize * 31 + i / 4096) as u8).collect();
        let mut x = QueuedWrite::for_test(seq, bytes);
        x.write.sync = seq.is_multiple_of(3);
        Entry::Write(x)
    }

    fn marker(id: u64) -> Entry {
        Entry::Marker(Marker {
            id,
            kind: CheckpointKind::Named,
            name: format!("checkpoint {id}"),
            source_time_ms: 1_700_000_000_000 + id,
            cut_seq: id,
            streams: 2,
        })
    }

    /// A spill in a new folder with `entries` pushed, and the pages they
    /// filled (not yet written).
    fn spill_with(entries: &[Entry]) -> io::Result<(tempfile::TempDir, Spill, Vec<FullPage>)> {
        let dir = tempfile::tempdir()?;
        let mut s = Spill::create(&dir.path().join("spill"))?;
        let mut full = Vec::new();
        for e in entries {
            full.extend(s.push(e)?);
        }
        Ok((dir, s, full))
    }

    /// Entries of every size, across page boundaries and larger than a
    /// page, come back as they went: from the page being filled, from
    /// pages still being written, and from the file.
    #[test]
    fn entries_come_back_from_memory_and_from_the_file_as_they_went() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let mut s = Spill::create(&dir.path().join("spill"))?;
        let sizes = [4096, 5, 65536, PAGE + 12_345, 3 * PAGE, 0, 4096, 777_777];
        let mut sent = Vec::new();
        let mut full = Vec::new();
        for (i, n) in sizes.iter().enumerate() {
            let e = if i == 5 { marker(i as u64) } else { w(i as u64, *n) };
            full.extend(s.push(&e)?);
            sent.push(e);
        }
        assert!(full.len() >= 4, "{} pages filled", full.len());
        // The first three entries come back while no page is written yet.
        let mut got = Vec::new();
        for _ in 0..3 {
            got.extend(s.pop()?.map(|(e, _)| e));
        }
        // Then every page is written; the rest is read from the file.
        for page in full {
            let r = page.write();
            s.page_written(page, r);
        }
        assert!(s.unwritten.is_empty());
        while let Some((e, _)) = s.pop()? {
            got.push(e);
        }
        assert_eq!(got, sent);
        // Emptied: the file is cut to nothing and the positions start over.
        assert_eq!((s.bytes(), s.write_at), (0, 0));
        assert_eq!(std::fs::metadata(dir.path().join("spill"))?.len(), 0);
        Ok(())
    }

    /// A page the disk refused stays in memory until read back, and the
    /// spill takes nothing more until it empties.
    #[test]
    fn a_refused_page_loses_nothing_and_fills_the_spill_until_it_empties() -> io::Result<()> {
        let sent: Vec<Entry> = (1..=3).map(|i| w(i, PAGE / 2)).collect();
        let (_dir, mut s, full) = spill_with(&sent)?;
        assert_eq!(full.len(), 1);
        assert!(s.has_room(4096, 1 << 30));
        for page in full {
            s.page_written(page, Err(io::Error::from_raw_os_error(libc::ENOSPC)));
        }
        assert!(!s.has_room(4096, 1 << 30), "the spill takes more after the disk refused a page");
        let mut got = Vec::new();
        while let Some((e, _)) = s.pop()? {
            got.push(e);
        }
        assert_eq!(got, sent);
        assert!(s.has_room(4096, 1 << 30), "the emptied spill stays full");
        Ok(())
    }

    /// Entries handed to the sender stay in the spill until acknowledged
    /// (dropped), are handed out again after a rewind, and come back from
    /// `pop` marked as sent.
    #[test]
    fn sent_entries_stay_until_dropped_and_come_again_after_a_rewind() -> io::Result<()> {
        let all: Vec<Entry> = (1..=8).map(|i| w(i, PAGE / 3)).collect();
        let (_dir, mut s, full) = spill_with(&all)?;
        for page in full {
            let r = page.write();
            s.page_written(page, r);
        }
        let mut ends = Vec::new();
        for want in &all[..5] {
            let (e, end) = s.next_unsent()?.ok_or_else(|| io::Error::other("nothing to send"))?;
            assert_eq!(&e, want);
            ends.push(end);
        }
        assert_eq!((s.entries(), s.unsent_entries()), (8, 3));
        // The first two are acknowledged; the link then breaks.
        s.drop_sent(ends[0])?;
        s.drop_sent(ends[1])?;
        assert!(s.drop_sent(ends[4] + 1).is_err(), "dropped an entry that was never sent");
        s.rewind_sends();
        assert_eq!((s.entries(), s.unsent_entries()), (6, 6));
        let (e, _) = s.next_unsent()?.ok_or_else(|| io::Error::other("nothing to send"))?;
        assert_eq!(e, all[2]);
        // Popped: the sent one says so, the rest not.
        let mut got = Vec::new();
        while let Some(e) = s.pop()? {
            got.push(e);
        }
        let want: Vec<(Entry, bool)> = all[2..].iter().enumerate().map(|(i, e)| (e.clone(), i == 0)).collect();
        assert_eq!(got, want);
        assert_eq!((s.bytes(), s.entries()), (0, 0));
        Ok(())
    }

    #[test]
    fn a_damaged_spill_record_is_an_error_that_names_it() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let mut s = Spill::create(&dir.path().join("spill"))?;
        s.push(&w(1, 4096))?;
        fn damage(s: &mut Spill, len: u32) {
            if let Some(t) = s.tail.as_mut() {
                t.get(PAGE)[..4].copy_from_slice(&len.to_be_bytes());
            }
        }
        damage(&mut s, 7);
        let e = s.pop().err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("spill file entry at 0 unreadable: shorter than a write's fields"), "{e}");
        // A length past the spill's end.
        damage(&mut s, 4096 + 43 + 100);
        let e = s.pop().err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("spill file entry at 0 unreadable: runs past the spill's end"), "{e}");
        // Nothing was taken: the entry is still there.
        assert_eq!(s.entries(), 1);
        Ok(())
    }
}
