//! The background writers: append to files on a few threads shared by the
//! whole process, each queue in submission order, so that the ingesting
//! thread only hashes and indexes. A journal has a queue for its log; a
//! chunk store has one for its packs.
//!
//! The two run apart, so after a kill the log may hold a record whose
//! chunk never reached its pack; such a record is always after the last
//! commit (a commit syncs the packs first) and replay cuts it
//! (docs/journal-format.md, "Recovery"). A buffer stays readable in memory
//! (the caller keeps its `Arc`) until the writer reports it done. The first
//! error is kept and returned by every later call: the journal then stops
//! accepting writes.

use super::error::{JournalError, Result};
use crate::direct_io::{or_through_page_cache, PaddedBuf, DIRECT_ALIGN};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Condvar, Mutex};

/// How many buffers may wait for a writer thread before submitters block.
pub const QUEUE_DEPTH: usize = 16;
/// Writer threads of the process, shared by every journal and chunk store:
/// their number does not grow with the number of VPGs.
const THREADS: usize = 4;

struct Job {
    seq: u64,
    file: Arc<File>,
    path: PathBuf,
    offset: u64,
    data: Payload,
    progress: Arc<(Mutex<Progress>, Condvar)>,
}

/// What a job writes at its offset.
enum Payload {
    /// These bytes, through the page cache (log segments; chunk packs
    /// where the filesystem has no direct I/O).
    Buffered(Arc<Vec<u8>>),
    /// A pack buffer's content, through the page cache.
    BufferedPack(Arc<PaddedBuf>),
    /// A pack buffer with its padding, to a file opened with `O_DIRECT`:
    /// the offset is on a block boundary and so is the length.
    Direct(Arc<PaddedBuf>),
}

/// The first write that failed: a full disk keeps its kind, so that the
/// caller answers it as such (a tap's ENOSPC), not as a failure.
#[derive(Debug, Clone)]
enum WriteFailure {
    DiskFull(PathBuf),
    Other(String),
}

impl WriteFailure {
    fn error(&self) -> JournalError {
        match self {
            WriteFailure::DiskFull(path) => JournalError::DiskFull { action: "writing", path: path.clone() },
            WriteFailure::Other(why) => JournalError::Failed(why.clone()),
        }
    }
}

#[derive(Debug, Default)]
struct Progress {
    completed: u64,
    error: Option<WriteFailure>,
}

/// One journal's (or chunk store's) queue on one of the shared writer
/// threads: always the same thread, so its writes are done in submission
/// order.
#[derive(Debug)]
pub struct Writer {
    tx: SyncSender<Job>,
    progress: Arc<(Mutex<Progress>, Condvar)>,
    submitted: u64,
}

/// The shared writer threads, started at first use.
static POOL: Mutex<Vec<SyncSender<Job>>> = Mutex::new(Vec::new());
static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

fn run(rx: Receiver<Job>) {
    for job in rx {
        let buffered = |bytes: &[u8]| {
            job.file.write_all_at(bytes, job.offset).map(|()| {
                start_writeback(&job.file, job.offset, bytes.len() as u64);
            })
        };
        let r = match &job.data {
            Payload::Buffered(bytes) => buffered(bytes),
            Payload::BufferedPack(buf) => buffered(buf.as_slice()),
            Payload::Direct(buf) => {
                or_through_page_cache(&job.file, "a chunk pack", || job.file.write_all_at(buf.padded(), job.offset))
            }
        };
        drop(job.data); // before reporting, so the owner can reuse it
        let (lock, cv) = &*job.progress;
        let Ok(mut st) = lock.lock() else { continue };
        if let Err(e) = r {
            if st.error.is_none() {
                st.error = Some(match JournalError::io("writing", &job.path, e) {
                    JournalError::DiskFull { path, .. } => WriteFailure::DiskFull(path),
                    other => WriteFailure::Other(other.to_string()),
                });
            }
        }
        st.completed = job.seq;
        cv.notify_all();
    }
}

impl Writer {
    pub fn start() -> Result<Writer> {
        let mut pool = POOL.lock().map_err(|_| JournalError::Failed("journal writer pool poisoned".into()))?;
        if pool.is_empty() {
            for i in 0..THREADS {
                let (tx, rx) = sync_channel::<Job>(QUEUE_DEPTH);
                std::thread::Builder::new()
                    .name(format!("journal-writer-{i}"))
                    .spawn(move || run(rx))
                    .map_err(|e| JournalError::Failed(format!("starting the journal writers: {e}")))?;
                pool.push(tx);
            }
        }
        let tx = pool[NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % pool.len()].clone();
        Ok(Writer { tx, progress: Arc::default(), submitted: 0 })
    }

    fn check(&self) -> Result<u64> {
        let st = self.progress.0.lock().map_err(|_| JournalError::Failed("journal writer state poisoned".into()))?;
        match &st.error {
            Some(e) => Err(e.error()),
            None => Ok(st.completed),
        }
    }

    /// Queues `data` to be written at `offset`; returns its sequence number.
    pub fn submit(&mut self, file: &Arc<File>, path: &std::path::Path, offset: u64, data: Arc<Vec<u8>>) -> Result<u64> {
        self.submit_job(file, path, offset, Payload::Buffered(data))
    }

    /// Queues a pack buffer's content to be written at `offset` through
    /// the page cache.
    pub fn submit_pack(
        &mut self,
        file: &Arc<File>,
        path: &std::path::Path,
        offset: u64,
        data: Arc<PaddedBuf>,
    ) -> Result<u64> {
        self.submit_job(file, path, offset, Payload::BufferedPack(data))
    }

    /// Queues a pack buffer to be written with its padding at `start` of a
    /// file opened with `O_DIRECT` (no copy into the page cache, none into
    /// another buffer). `start` is on a block boundary: the buffer begins
    /// with the file's bytes from that boundary on. The padding is
    /// overwritten by the next write and cut at the file's end by its
    /// owner.
    pub fn submit_direct(
        &mut self,
        file: &Arc<File>,
        path: &std::path::Path,
        start: u64,
        data: Arc<PaddedBuf>,
    ) -> Result<u64> {
        if !start.is_multiple_of(DIRECT_ALIGN as u64) {
            return Err(JournalError::Failed(format!(
                "{}: a direct write at {start} starts off a block boundary",
                path.display()
            )));
        }
        self.submit_job(file, path, start, Payload::Direct(data))
    }

    fn submit_job(&mut self, file: &Arc<File>, path: &std::path::Path, offset: u64, data: Payload) -> Result<u64> {
        self.check()?;
        self.submitted += 1;
        let job = Job {
            seq: self.submitted,
            file: file.clone(),
            path: path.to_path_buf(),
            offset,
            data,
            progress: self.progress.clone(),
        };
        self.tx.send(job).map_err(|_| JournalError::Failed("the journal writer stopped".into()))?;
        Ok(self.submitted)
    }

    /// The last sequence number written.
    pub fn completed(&self) -> Result<u64> {
        self.check()
    }

    /// Waits until everything submitted is written.
    pub fn drain(&self) -> Result<()> {
        let (lock, cv) = &*self.progress;
        let mut st = lock.lock().map_err(|_| JournalError::Failed("journal writer state poisoned".into()))?;
        while st.completed < self.submitted && st.error.is_none() {
            st = cv.wait(st).map_err(|_| JournalError::Failed("journal writer state poisoned".into()))?;
        }
        match &st.error {
            Some(e) => Err(e.error()),
            None => Ok(()),
        }
    }
}

/// Starts writing the range back to the device without waiting for it, so
/// that the next fsync (a checkpoint) finds little left to do and disk I/O
/// overlaps with hashing. Only a hint: failure changes nothing.
fn start_writeback(file: &File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    let (Ok(off), Ok(n)) = (i64::try_from(offset), i64::try_from(len)) else {
        return;
    };
    // SAFETY: sync_file_range reads no memory of ours; the descriptor is
    // open for the duration of the call (we hold the File).
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), off, n, libc::SYNC_FILE_RANGE_WRITE);
    }
}

impl Drop for Writer {
    /// What was submitted is written before the files' owner goes on.
    fn drop(&mut self) {
        let _ = self.drain();
    }
}
