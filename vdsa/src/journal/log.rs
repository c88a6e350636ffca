//! The segmented, append-only redo log.
//!
//! Each open starts a new segment, so only the newest segment can end in a
//! torn record; a bad frame anywhere else is corruption.

use super::error::{JournalError, Result};
use super::format::{self, Frame, HeaderError, Record};
use super::fsutil;
use super::writer::Writer;
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A record found when scanning the log, with where it is.
#[derive(Debug)]
pub struct ScannedRecord {
    pub segment: u64,
    pub offset: u64,
    pub record: Record,
}

/// What retention needs to know to delete a segment: the highest lsn in it,
/// and per stream (interned index) the highest lsn of a write in it.
#[derive(Debug, Clone, Default)]
pub struct SegmentSummary {
    pub max_lsn: u64,
    pub stream_max: Vec<(u16, u64)>,
}

impl SegmentSummary {
    pub fn merge(&mut self, other: &SegmentSummary) {
        self.note(other.max_lsn, None);
        for &(s, lsn) in &other.stream_max {
            self.note(lsn, Some(s));
        }
    }

    pub fn note(&mut self, lsn: u64, stream: Option<u16>) {
        self.max_lsn = self.max_lsn.max(lsn);
        if let Some(s) = stream {
            match self.stream_max.iter_mut().find(|(x, _)| *x == s) {
                Some(e) => e.1 = e.1.max(lsn),
                None => self.stream_max.push((s, lsn)),
            }
        }
    }
}

#[derive(Debug)]
struct Segment {
    path: PathBuf,
    len: u64,
    summary: SegmentSummary,
}

#[derive(Debug)]
pub struct Log {
    dir: PathBuf,
    segment_bytes: u64,
    segments: BTreeMap<u64, Segment>,
    /// The segment appends go to, created at the first append after an
    /// open or a rollover (so that opening writes nothing: a journal on a
    /// full disk still opens).
    active: Option<(u64, Arc<File>)>,
    unsynced: Vec<u64>,
    /// Records appended but not yet handed to the writer, and their summary.
    pending: Vec<u8>,
    pending_summary: SegmentSummary,
}

pub fn segment_path(dir: &Path, no: u64) -> PathBuf {
    dir.join(format!("{no:012}.log"))
}

/// Reads every record of every segment in order.
///
/// What a power cut can leave, and what is done with it:
/// - a segment that holds nothing (shorter than its header and all zeros:
///   created, never made durable) is removed, wherever it is;
/// - a bad frame with no valid commit-class record (Commit, Checkpoint,
///   DropCheckpoint) anywhere after it is an unacknowledged tail: such
///   records are appended only once everything before them is durable
///   (`State::commit_records`), so what follows a bad frame was never
///   acknowledged.
///   The segment is cut there and later segments are removed, durably;
/// - a bad frame followed by a valid commit-class record was durable, so it
///   is corruption, reported with the file and offset and nothing changed.
pub fn scan(dir: &Path) -> Result<Vec<ScannedRecord>> {
    fsutil::create_dir(dir)?;
    let mut segments = Vec::new();
    let mut removed = false;
    for no in fsutil::numbered_files(dir, "log")? {
        let path = segment_path(dir, no);
        let bytes = std::fs::read(&path).map_err(|e| JournalError::io("reading", &path, e))?;
        match format::parse_segment_header(&bytes) {
            Ok(n) if n == no => {
                // What survived a process kill may be in the page cache
                // only: durable before anything new builds on it.
                std::fs::File::open(&path)
                    .and_then(|f| f.sync_data())
                    .map_err(|e| JournalError::io("syncing", &path, e))?;
                segments.push((no, path, bytes));
            }
            Ok(n) => return Err(JournalError::corrupt(&path, 0, format!("segment header says segment {n}"))),
            Err(HeaderError::Short) if bytes.iter().all(|&b| b == 0) => {
                tracing::warn!(path = %path.display(), "removing a log segment that holds nothing");
                std::fs::remove_file(&path).map_err(|e| JournalError::io("removing empty segment", &path, e))?;
                removed = true;
            }
            Err(HeaderError::Version(v)) => {
                return Err(JournalError::UnsupportedVersion {
                    path,
                    found: v,
                    supported: u32::from(format::FORMAT_VERSION),
                })
            }
            Err(e) => return Err(JournalError::corrupt(&path, 0, format!("segment header: {e:?}"))),
        }
    }
    let mut out = Vec::new();
    for (i, (no, path, bytes)) in segments.iter().enumerate() {
        let mut pos = format::SEGMENT_HEADER_LEN;
        while pos < bytes.len() {
            let reason = match format::read_frame(&bytes[pos..]) {
                Frame::Ok { kind, payload, len } => {
                    let record = format::decode_payload(kind, payload)
                        .map_err(|reason| JournalError::corrupt(path, pos as u64, reason))?;
                    out.push(ScannedRecord { segment: *no, offset: pos as u64, record });
                    pos += len;
                    continue;
                }
                Frame::Invalid(r) => r,
                Frame::Incomplete => "record cut short".to_string(),
            };
            let later = segments[i + 1..].iter().map(|(_, _, b)| (b.as_slice(), format::SEGMENT_HEADER_LEN));
            let mut rest = std::iter::once((bytes.as_slice(), pos + 1)).chain(later);
            if rest.any(|(b, from)| commit_frame_after(b, from)) {
                return Err(JournalError::corrupt(path, pos as u64, reason));
            }
            tracing::warn!(path = %path.display(), offset = pos, %reason, "cutting the unacknowledged tail of the log");
            fsutil::truncate(path, pos as u64)?;
            for (_, later, _) in &segments[i + 1..] {
                std::fs::remove_file(later).map_err(|e| JournalError::io("removing", later, e))?;
            }
            if removed || i + 1 < segments.len() {
                fsutil::sync_dir(dir)?;
            }
            return Ok(out);
        }
    }
    if removed {
        fsutil::sync_dir(dir)?;
    }
    Ok(out)
}

/// Whether a valid commit-class frame starts anywhere in `bytes` at or
/// after `from`.
fn commit_frame_after(bytes: &[u8], from: usize) -> bool {
    let magic = format::RECORD_MAGIC.to_le_bytes();
    (from..bytes.len().saturating_sub(format::RECORD_HEADER_LEN))
        .filter(|&i| bytes[i..i + 4] == magic)
        .any(|i| matches!(format::read_frame(&bytes[i..]), Frame::Ok { kind, .. } if format::is_commit_class(kind)))
}

impl Log {
    /// Opens the log for appending after the existing segments, whose
    /// summaries the caller rebuilt from the scan. Creates nothing yet.
    pub fn open(dir: &Path, segment_bytes: u64, existing: BTreeMap<u64, SegmentSummary>) -> Result<Log> {
        let mut segments = BTreeMap::new();
        for no in fsutil::numbered_files(dir, "log")? {
            let path = segment_path(dir, no);
            let len = std::fs::metadata(&path).map_err(|e| JournalError::io("reading", &path, e))?.len();
            let summary = existing.get(&no).cloned().unwrap_or_default();
            segments.insert(no, Segment { path, len, summary });
        }
        Ok(Log {
            dir: dir.to_path_buf(),
            segment_bytes: segment_bytes.max(1 << 16),
            segments,
            active: None,
            unsynced: Vec::new(),
            pending: Vec::new(),
            pending_summary: SegmentSummary::default(),
        })
    }

    /// Appends encoded records in memory; [`Log::flush`] hands them to the
    /// writer (callers flush the chunk store first).
    pub fn append(&mut self, bytes: &[u8], summary: &SegmentSummary) {
        self.pending.extend_from_slice(bytes);
        self.pending_summary.merge(summary);
    }

    /// Bytes appended and not yet handed to the writer.
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// Hands appended records to the writer (no fsync). Each open writes a
    /// fresh segment, and a full one is followed by the next; a new segment
    /// is durable, header and directory entry, before any record goes in.
    pub fn flush(&mut self, w: &mut Writer) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let full = match &self.active {
            Some((no, _)) => self.segments.get(no).is_none_or(|s| s.len >= self.segment_bytes),
            None => true,
        };
        if full {
            let no = self.segments.keys().next_back().map_or(1, |n| n + 1);
            let (file, seg) = create_segment(&self.dir, no)?;
            self.segments.insert(no, seg);
            self.active = Some((no, Arc::new(file)));
        }
        let Some((no, file)) = &self.active else {
            return Err(JournalError::Failed("active log segment missing".into()));
        };
        let Some(seg) = self.segments.get_mut(no) else {
            return Err(JournalError::Failed("active log segment missing".into()));
        };
        let bytes = std::mem::take(&mut self.pending);
        let len = bytes.len() as u64;
        w.submit(file, &seg.path, seg.len, Arc::new(bytes))?;
        seg.len += len;
        seg.summary.merge(&std::mem::take(&mut self.pending_summary));
        if !self.unsynced.contains(no) {
            self.unsynced.push(*no);
        }
        Ok(())
    }

    /// fsync of every segment written since the last sync, once the writer
    /// has written everything queued.
    pub fn sync(&mut self, w: &mut Writer) -> Result<()> {
        self.flush(w)?;
        w.drain()?;
        self.sync_files()
    }

    /// fsync of the segments written since the last sync (the caller
    /// drained the writer).
    pub fn sync_files(&mut self) -> Result<()> {
        for no in std::mem::take(&mut self.unsynced) {
            let Some(seg) = self.segments.get(&no) else { continue };
            let r = match &self.active {
                Some((active, file)) if *active == no => file.sync_data(),
                _ => OpenOptions::new().write(true).open(&seg.path).and_then(|f| f.sync_data()),
            };
            r.map_err(|e| JournalError::io("syncing", &seg.path, e))?;
        }
        Ok(())
    }

    /// Deletes the closed segments `done` says retention has fully consumed.
    pub fn remove_segments(&mut self, done: impl Fn(&SegmentSummary) -> bool) -> Result<u64> {
        let active = self.active.as_ref().map(|(no, _)| *no);
        let victims: Vec<u64> =
            self.segments.iter().filter(|(&no, s)| Some(no) != active && done(&s.summary)).map(|(&no, _)| no).collect();
        let mut freed = 0;
        for no in &victims {
            if let Some(seg) = self.segments.remove(no) {
                std::fs::remove_file(&seg.path).map_err(|e| JournalError::io("removing", &seg.path, e))?;
                freed += seg.len;
            }
        }
        if !victims.is_empty() {
            fsutil::sync_dir(&self.dir)?;
        }
        Ok(freed)
    }

    pub fn bytes(&self) -> u64 {
        self.segments.values().map(|s| s.len).sum::<u64>() + self.pending.len() as u64
    }
}

/// Creates segment `no` with its header, durable with its directory entry.
fn create_segment(dir: &Path, no: u64) -> Result<(File, Segment)> {
    let path = segment_path(dir, no);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|e| JournalError::io("creating", &path, e))?;
    file.write_all_at(&format::segment_header(no), 0)
        .and_then(|()| file.sync_data())
        .map_err(|e| JournalError::io("writing the header of", &path, e))?;
    fsutil::sync_dir(dir)?;
    Ok((file, Segment { path, len: format::SEGMENT_HEADER_LEN as u64, summary: SegmentSummary::default() }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::format::{encode_record, WriteRecord};
    use protection_groups::WriteKind;
    use protection_groups::{DiskId, StreamId};

    fn write(lsn: u64) -> Record {
        Record::Write(WriteRecord {
            lsn,
            stream: StreamId::from_bytes([1; 16]),
            seq: lsn,
            disk: DiskId::from_bytes([2; 16]),
            kind: WriteKind::Zero,
            offset: 0,
            len: 4096,
            blocks: Vec::new(),
        })
    }

    fn frames(records: &[Record]) -> Vec<u8> {
        let mut out = Vec::new();
        for r in records {
            assert_eq!(encode_record(r, &mut out), Ok(()));
        }
        out
    }

    fn segment(dir: &Path, no: u64, body: &[u8]) {
        let mut bytes = format::segment_header(no).to_vec();
        bytes.extend_from_slice(body);
        std::fs::write(segment_path(dir, no), bytes).unwrap_or_else(|e| panic!("{e}"));
    }

    /// Pages reach the disk in any order before an fsync: a write record
    /// can survive a power cut while an earlier one did not. With no commit
    /// after the hole, nothing from it on was acknowledged: cut, not
    /// corruption.
    #[test]
    fn a_hole_followed_only_by_unacknowledged_writes_is_cut() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let mut body = frames(&[write(1), Record::Commit { lsn: 1 }]);
        let hole = body.len();
        body.extend(vec![0u8; 200]);
        body.extend(frames(&[write(3)]));
        segment(dir.path(), 1, &body);
        segment(dir.path(), 2, &frames(&[write(4)]));
        let records = scan(dir.path()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(records.len(), 2);
        let len = std::fs::metadata(segment_path(dir.path(), 1)).map(|m| m.len()).unwrap_or(0);
        assert_eq!(len, (format::SEGMENT_HEADER_LEN + hole) as u64);
        assert!(!segment_path(dir.path(), 2).exists(), "segments after the cut are removed");
    }

    /// A commit after the hole proves the hole was durable: corruption,
    /// reported, nothing cut.
    #[test]
    fn a_hole_followed_by_a_commit_is_corruption() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let mut body = frames(&[write(1)]);
        let hole = body.len();
        body.extend(vec![0u8; 200]);
        segment(dir.path(), 1, &body);
        segment(dir.path(), 2, &frames(&[write(3), Record::Commit { lsn: 3 }]));
        match scan(dir.path()) {
            Err(JournalError::Corrupt { path, offset, .. }) => {
                assert_eq!(path, segment_path(dir.path(), 1));
                assert_eq!(offset, (format::SEGMENT_HEADER_LEN + hole) as u64);
            }
            other => panic!("expected Corrupt, got {other:?}"),
        }
        assert!(segment_path(dir.path(), 2).exists());
    }

    /// A segment created but never made durable reads back empty; it must
    /// not block opening wherever it is (it used to, when not the newest).
    #[test]
    fn an_empty_segment_before_the_newest_is_removed() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        segment(dir.path(), 1, &frames(&[write(1), Record::Commit { lsn: 1 }]));
        std::fs::write(segment_path(dir.path(), 2), b"").unwrap_or_else(|e| panic!("{e}"));
        segment(dir.path(), 3, &frames(&[write(2), Record::Commit { lsn: 2 }]));
        let records = scan(dir.path()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(records.len(), 4);
        assert!(!segment_path(dir.path(), 2).exists());
    }
}
