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
    active: u64,
    file: Arc<File>,
    unsynced: Vec<u64>,
    dir_dirty: bool,
    /// Records appended but not yet handed to the writer, and their summary.
    pending: Vec<u8>,
    pending_summary: SegmentSummary,
}

pub fn segment_path(dir: &Path, no: u64) -> PathBuf {
    dir.join(format!("{no:012}.log"))
}

/// Reads every record of every segment in order. A torn tail of the newest
/// segment is cut (and the cut made durable); a frame that fails anywhere
/// else, or followed by a valid frame, is corruption, reported with the file
/// and offset.
pub fn scan(dir: &Path) -> Result<Vec<ScannedRecord>> {
    fsutil::create_dir(dir)?;
    let numbers = fsutil::numbered_files(dir, "log")?;
    let newest = numbers.last().copied();
    let mut out = Vec::new();
    for no in numbers {
        let is_newest = Some(no) == newest;
        let path = segment_path(dir, no);
        let bytes = std::fs::read(&path).map_err(|e| JournalError::io("reading", &path, e))?;
        match format::parse_segment_header(&bytes) {
            Ok(n) if n == no => {}
            Ok(n) => return Err(JournalError::corrupt(&path, 0, format!("segment header says segment {n}"))),
            Err(HeaderError::Short) if is_newest && bytes.iter().all(|&b| b == 0) => {
                // Created, header never made durable, so nothing after it was.
                std::fs::remove_file(&path).map_err(|e| JournalError::io("removing torn segment", &path, e))?;
                continue;
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
        let mut pos = format::SEGMENT_HEADER_LEN;
        while pos < bytes.len() {
            match format::read_frame(&bytes[pos..]) {
                Frame::Ok { kind, payload, len } => {
                    let record = format::decode_payload(kind, payload)
                        .map_err(|reason| JournalError::corrupt(&path, pos as u64, reason))?;
                    out.push(ScannedRecord {
                        segment: no,
                        offset: pos as u64,
                        record,
                    });
                    pos += len;
                }
                bad => {
                    let reason = match bad {
                        Frame::Invalid(r) => r,
                        _ => "record cut short".to_string(),
                    };
                    if is_newest && !valid_frame_after(&bytes, pos + 1) {
                        tracing::warn!(path = %path.display(), offset = pos, %reason, "cutting torn tail of the log");
                        fsutil::truncate(&path, pos as u64)?;
                        break;
                    }
                    return Err(JournalError::corrupt(&path, pos as u64, reason));
                }
            }
        }
    }
    Ok(out)
}

fn valid_frame_after(bytes: &[u8], from: usize) -> bool {
    let magic = format::RECORD_MAGIC.to_le_bytes();
    (from..bytes.len().saturating_sub(format::RECORD_HEADER_LEN))
        .filter(|&i| bytes[i..i + 4] == magic)
        .any(|i| matches!(format::read_frame(&bytes[i..]), Frame::Ok { .. }))
}

impl Log {
    /// Opens the log for appending in a fresh segment after the existing
    /// ones, whose summaries the caller rebuilt from the scan.
    pub fn open(dir: &Path, segment_bytes: u64, existing: BTreeMap<u64, SegmentSummary>) -> Result<Log> {
        let mut segments = BTreeMap::new();
        for no in fsutil::numbered_files(dir, "log")? {
            let path = segment_path(dir, no);
            let len = std::fs::metadata(&path).map_err(|e| JournalError::io("reading", &path, e))?.len();
            let summary = existing.get(&no).cloned().unwrap_or_default();
            segments.insert(no, Segment { path, len, summary });
        }
        let active = segments.keys().next_back().map_or(1, |n| n + 1);
        let (file, seg) = create_segment(dir, active)?;
        segments.insert(active, seg);
        Ok(Log {
            dir: dir.to_path_buf(),
            segment_bytes: segment_bytes.max(1 << 16),
            segments,
            active,
            file: Arc::new(file),
            unsynced: vec![active],
            dir_dirty: true,
            pending: Vec::new(),
            pending_summary: SegmentSummary::default(),
        })
    }

    /// Appends encoded records in memory; [`Log::flush`] hands them to the
    /// writer (callers flush the chunk store first).
    pub fn append(&mut self, bytes: &[u8], summary: &SegmentSummary) {
        self.pending.extend_from_slice(bytes);
        self.pending_summary.note(summary.max_lsn, None);
        for &(s, lsn) in &summary.stream_max {
            self.pending_summary.note(lsn, Some(s));
        }
    }

    /// Bytes appended and not yet handed to the writer.
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// Hands appended records to the writer (no fsync), rolling to a new
    /// segment first when the active one is full.
    pub fn flush(&mut self, w: &mut Writer) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let bytes = std::mem::take(&mut self.pending);
        let summary = std::mem::take(&mut self.pending_summary);
        let active_len = self.segments.get(&self.active).map_or(0, |s| s.len);
        if active_len >= self.segment_bytes {
            self.active += 1;
            let (file, seg) = create_segment(&self.dir, self.active)?;
            self.file = Arc::new(file);
            self.segments.insert(self.active, seg);
            self.unsynced.push(self.active);
            self.dir_dirty = true;
        }
        let Some(seg) = self.segments.get_mut(&self.active) else {
            return Err(JournalError::Failed("active log segment missing".into()));
        };
        let len = bytes.len() as u64;
        w.submit(&self.file, &seg.path, seg.len, Arc::new(bytes))?;
        seg.len += len;
        seg.summary.note(summary.max_lsn, None);
        for &(s, lsn) in &summary.stream_max {
            seg.summary.note(lsn, Some(s));
        }
        if self.unsynced.last() != Some(&self.active) {
            self.unsynced.push(self.active);
        }
        Ok(())
    }

    /// fsync of every segment written since the last sync, once the writer
    /// has written everything queued.
    pub fn sync(&mut self, w: &mut Writer) -> Result<()> {
        self.flush(w)?;
        w.drain()?;
        for no in std::mem::take(&mut self.unsynced) {
            let Some(seg) = self.segments.get(&no) else { continue };
            let f = if no == self.active {
                self.file.sync_data()
            } else {
                OpenOptions::new().write(true).open(&seg.path).and_then(|f| f.sync_data())
            };
            f.map_err(|e| JournalError::io("syncing", &seg.path, e))?;
        }
        if std::mem::take(&mut self.dir_dirty) {
            fsutil::sync_dir(&self.dir)?;
        }
        Ok(())
    }

    /// Deletes the closed segments `done` says retention has fully consumed.
    pub fn remove_segments(&mut self, done: impl Fn(&SegmentSummary) -> bool) -> Result<u64> {
        let victims: Vec<u64> = self
            .segments
            .iter()
            .filter(|(&no, s)| no != self.active && done(&s.summary))
            .map(|(&no, _)| no)
            .collect();
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

fn create_segment(dir: &Path, no: u64) -> Result<(File, Segment)> {
    let path = segment_path(dir, no);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|e| JournalError::io("creating", &path, e))?;
    file.write_all_at(&format::segment_header(no), 0)
        .map_err(|e| JournalError::io("writing", &path, e))?;
    Ok((
        file,
        Segment {
            path,
            len: format::SEGMENT_HEADER_LEN as u64,
            summary: SegmentSummary::default(),
        },
    ))
}
