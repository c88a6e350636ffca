//! A processing stack's private write overlay for one disk: a sparse data
//! file as large as the disk, and an allocation map with one bit per 4 KiB
//! block saying the block is read from the data file rather than from the
//! view below (docs/recovery.md).
//!
//! A write lands in the data file before its bit is set, and the map is
//! written (temporary file, fsync, rename, fsync of the folder) on flush
//! only: after a crash the overlay holds every write acknowledged before
//! the last flush, as a disk does.

use super::error::{Error, Result};
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};

/// The overlay's block: the journal's.
pub const BLOCK: u64 = crate::journal::BLOCK_SIZE as u64;

const MAP_MAGIC: &[u8; 8] = b"VDSAOVL1";
/// magic, disk size, block size.
const MAP_HEADER: usize = 8 + 8 + 8;

/// Reads the layer below the overlay (the view at the stack's checkpoint).
pub type Base<'a> = &'a dyn Fn(u64, &mut [u8]) -> Result<()>;

/// One disk's overlay.
#[derive(Debug)]
pub struct Overlay {
    data: File,
    data_path: PathBuf,
    map_path: PathBuf,
    size: u64,
    /// One bit per block: written here.
    map: RwLock<Vec<u64>>,
    /// Set bits not yet in the map file.
    dirty: AtomicBool,
    /// Writes one at a time: a partial block is read, merged and written.
    writing: Mutex<()>,
    /// Bytes the stack's users wrote (and zeroed), for the test record.
    written_bytes: AtomicU64,
    /// While a promotion copies the overlay: blocks written since its pass
    /// began, which the next pass copies again.
    changed: Mutex<Option<Vec<u64>>>,
}

impl Overlay {
    /// Opens the overlay `name` in `dir`, creating an empty one if there is
    /// none. An existing one must be for a disk of `size` bytes.
    pub fn open(dir: &Path, name: &str, size: u64) -> Result<Overlay> {
        let data_path = dir.join(format!("{name}.overlay"));
        let map_path = dir.join(format!("{name}.map"));
        let io = |action: &'static str, path: &Path| {
            let path = path.to_path_buf();
            move |e| Error::io(action, &path, e)
        };
        let data = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&data_path)
            .map_err(io("opening", &data_path))?;
        let blocks = size.div_ceil(BLOCK);
        let words = blocks.div_ceil(64) as usize;
        // No map yet: nothing written (or nothing flushed), all from below.
        // It is written at the first flush that has something to say, so
        // opening costs the same for any disk size.
        let map = match std::fs::read(&map_path) {
            Ok(bytes) => {
                parse_map(&bytes, size, words).map_err(|reason| Error::Corrupt { path: map_path.clone(), reason })?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => vec![0u64; words],
            Err(e) => return Err(Error::io("reading", &map_path, e)),
        };
        // The data file is as long as the disk (sparse); a shorter one
        // after a crash reads as zeroes where its map says written, which
        // cannot happen as the map is written after the data is synced.
        if data.metadata().map_err(io("reading the size of", &data_path))?.len() != size {
            data.set_len(size).map_err(io("sizing", &data_path))?;
        }
        Ok(Overlay {
            data,
            data_path,
            map_path,
            size,
            map: RwLock::new(map),
            dirty: AtomicBool::new(false),
            writing: Mutex::new(()),
            written_bytes: AtomicU64::new(0),
            changed: Mutex::new(None),
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Bytes written (or zeroed) through this overlay since it was opened.
    pub fn written_bytes(&self) -> u64 {
        self.written_bytes.load(Ordering::Relaxed)
    }

    /// What the overlay occupies on its volume: the data file's allocated
    /// blocks and the map file.
    pub fn allocated_bytes(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        let data = self.data.metadata().map(|m| m.blocks() * 512).unwrap_or(0);
        let map = std::fs::metadata(&self.map_path).map(|m| m.len()).unwrap_or(0);
        data + map
    }

    fn map_read(&self) -> Result<std::sync::RwLockReadGuard<'_, Vec<u64>>> {
        self.map.read().map_err(|_| Error::Failed("the overlay map lock is poisoned".into()))
    }

    /// Whether `block` is read from the overlay.
    pub fn is_written(&self, block: u64) -> bool {
        self.map_read().is_ok_and(|m| bit(&m, block))
    }

    fn check(&self, offset: u64, len: u64) -> Result<()> {
        check_range(offset, len, self.size)
    }

    /// Reads `buf.len()` bytes at `offset`: written blocks from the data
    /// file, the others from `base`.
    pub fn read(&self, offset: u64, buf: &mut [u8], base: Base<'_>) -> Result<()> {
        self.check(offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        let end = offset + buf.len() as u64;
        // Runs of blocks with the same source, read in one call each.
        let runs = {
            let map = self.map_read()?;
            let (first, last) = (offset / BLOCK, (end - 1) / BLOCK);
            let mut runs: Vec<(u64, u64, bool)> = Vec::new();
            for b in first..=last {
                let w = bit(&map, b);
                let (lo, hi) = ((b * BLOCK).max(offset), ((b + 1) * BLOCK).min(end));
                match runs.last_mut() {
                    Some((_, h, lw)) if *lw == w => *h = hi,
                    _ => runs.push((lo, hi, w)),
                }
            }
            runs
        };
        for (lo, hi, written) in runs {
            let out = &mut buf[(lo - offset) as usize..(hi - offset) as usize];
            if written {
                self.data.read_exact_at(out, lo).map_err(|e| Error::io("reading", &self.data_path, e))?;
            } else {
                base(lo, out)?;
            }
        }
        Ok(())
    }

    /// Writes `data` at `offset`. A block written for the first time in
    /// part takes the rest of its bytes from `base`.
    pub fn write(&self, offset: u64, data: &[u8], base: Base<'_>) -> Result<()> {
        self.check(offset, data.len() as u64)?;
        if data.is_empty() {
            return Ok(());
        }
        let _one = self.writing.lock().map_err(|_| Error::Failed("the overlay write lock is poisoned".into()))?;
        let end = offset + data.len() as u64;
        let (first, last) = (offset / BLOCK, (end - 1) / BLOCK);
        // Edge blocks not yet here are completed from below first.
        let mut scratch = vec![0u8; BLOCK as usize];
        for b in [first, last] {
            let (start, stop) = (b * BLOCK, ((b + 1) * BLOCK).min(self.size));
            let partial = offset > start || end < stop;
            if partial && !self.is_written(b) {
                let block = &mut scratch[..(stop - start) as usize];
                base(start, block)?;
                let (lo, hi) = (offset.max(start), end.min(stop));
                block[(lo - start) as usize..(hi - start) as usize]
                    .copy_from_slice(&data[(lo - offset) as usize..(hi - offset) as usize]);
                self.pwrite(block, start)?;
            }
        }
        self.pwrite(data, offset)?;
        self.mark(first, last)?;
        self.written_bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Makes `offset..offset + len` read as zeroes: whole blocks by
    /// punching a hole (`trim`) or zeroing the range in place (write
    /// zeroes: stays provisioned), edges by writing zeroes.
    pub fn zero(&self, offset: u64, len: u64, punch: bool, base: Base<'_>) -> Result<()> {
        self.check(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let end = offset + len;
        let (whole_lo, whole_hi) = (offset.div_ceil(BLOCK) * BLOCK, (end / BLOCK * BLOCK).max(offset));
        let whole_hi = if end == self.size { end } else { whole_hi };
        if whole_lo >= whole_hi {
            return self.write(offset, &vec![0u8; len as usize], base);
        }
        if offset < whole_lo {
            self.write(offset, &vec![0u8; (whole_lo - offset) as usize], base)?;
        }
        if whole_hi < end {
            self.write(whole_hi, &vec![0u8; (end - whole_hi) as usize], base)?;
        }
        let _one = self.writing.lock().map_err(|_| Error::Failed("the overlay write lock is poisoned".into()))?;
        zero_range(&self.data, &self.data_path, whole_lo, whole_hi - whole_lo, punch)?;
        self.mark(whole_lo / BLOCK, (whole_hi - 1) / BLOCK)?;
        self.written_bytes.fetch_add(whole_hi - whole_lo, Ordering::Relaxed);
        Ok(())
    }

    fn pwrite(&self, data: &[u8], offset: u64) -> Result<()> {
        self.data.write_all_at(data, offset).map_err(|e| Error::io("writing", &self.data_path, e))
    }

    fn mark(&self, first: u64, last: u64) -> Result<()> {
        let mut map = self.map.write().map_err(|_| Error::Failed("the overlay map lock is poisoned".into()))?;
        for b in first..=last {
            map[(b / 64) as usize] |= 1 << (b % 64);
        }
        self.dirty.store(true, Ordering::SeqCst);
        if let Some(changed) = self.changed.lock().map_err(|_| poisoned("changed"))?.as_mut() {
            for b in first..=last {
                changed[(b / 64) as usize] |= 1 << (b % 64);
            }
        }
        Ok(())
    }

    /// The blocks read from the overlay, ascending; from now on, blocks
    /// written are also collected for [`Overlay::take_changed`].
    pub fn track_changes(&self) -> Result<Vec<u64>> {
        let map = self.map_read()?;
        *self.changed.lock().map_err(|_| poisoned("changed"))? = Some(vec![0u64; map.len()]);
        Ok(set_bits(&map))
    }

    /// The blocks written since the last call (or [`Overlay::track_changes`]).
    pub fn take_changed(&self) -> Result<Vec<u64>> {
        let mut changed = self.changed.lock().map_err(|_| poisoned("changed"))?;
        Ok(changed
            .as_mut()
            .map(|c| {
                let blocks = set_bits(c);
                c.fill(0);
                blocks
            })
            .unwrap_or_default())
    }

    /// The overlay's own bytes at `offset` (whatever the map says).
    pub fn read_own(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check(offset, buf.len() as u64)?;
        self.data.read_exact_at(buf, offset).map_err(|e| Error::io("reading", &self.data_path, e))
    }

    /// Removes the overlay's files (after it was promoted: nothing reads
    /// them any more).
    pub fn remove_files(dir: &Path, name: &str) -> Result<()> {
        for path in [dir.join(format!("{name}.overlay")), dir.join(format!("{name}.map"))] {
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io("removing", &path, e)),
            }
        }
        Ok(())
    }

    /// Whether each block of `first..=last` is in a hole of the data file
    /// (a trimmed block: reads zeroes, holds nothing).
    pub fn holes(&self, first: u64, last: u64) -> Vec<bool> {
        holes(&self.data, first, last, self.size)
    }

    /// Makes every write acknowledged so far durable: the data file first,
    /// then the map.
    pub fn flush(&self) -> Result<()> {
        self.data.sync_data().map_err(|e| Error::io("syncing", &self.data_path, e))?;
        if !self.dirty.swap(false, Ordering::SeqCst) {
            return Ok(());
        }
        let bytes = {
            let map = self.map_read()?;
            encode_map(&map, self.size)
        };
        let r = write_durably(&self.map_path, &bytes);
        if r.is_err() {
            self.dirty.store(true, Ordering::SeqCst);
        }
        r
    }
}

/// Whether each block of `first..=last` of `file` (`size` bytes) is in a
/// hole (reads zeroes, holds nothing).
pub(super) fn holes(file: &File, first: u64, last: u64, size: u64) -> Vec<bool> {
    let mut out = vec![false; (last - first + 1) as usize];
    let fd = file.as_raw_fd();
    let (lo, hi) = (first * BLOCK, ((last + 1) * BLOCK).min(size));
    let mut pos = lo;
    while pos < hi {
        // SAFETY: lseek on a descriptor this File owns; reads and
        // writes here are positional, so its offset does not matter.
        let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
        let data = if data < 0 { hi } else { (data as u64).min(hi) };
        for b in pos.div_ceil(BLOCK)..data / BLOCK {
            if b >= first && b <= last && (b + 1) * BLOCK <= data {
                out[(b - first) as usize] = true;
            }
        }
        if data >= hi {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data as libc::off_t, libc::SEEK_HOLE) };
        if hole < 0 {
            break;
        }
        pos = hole as u64;
    }
    out
}

/// Makes `len` bytes at `offset` of `file` read as zeroes: a hole punched
/// (`punch`) or the range zeroed in place (stays provisioned); written
/// zeroes where the file system has neither.
pub(super) fn zero_range(file: &File, path: &Path, offset: u64, len: u64, punch: bool) -> Result<()> {
    let mode = if punch {
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
    } else {
        libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
    };
    // SAFETY: fallocate on a descriptor `file` owns; it touches no memory
    // of ours.
    let r = unsafe { libc::fallocate(file.as_raw_fd(), mode, offset as libc::off_t, len as libc::off_t) };
    if r != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EOPNOTSUPP) {
            return Err(Error::io("zeroing", path, e));
        }
        let zeroes = vec![0u8; (1 << 20).min(len) as usize];
        let mut pos = offset;
        while pos < offset + len {
            let n = (offset + len - pos).min(zeroes.len() as u64) as usize;
            file.write_all_at(&zeroes[..n], pos).map_err(|e| Error::io("writing", path, e))?;
            pos += n as u64;
        }
    }
    Ok(())
}

/// `offset..offset + len` within a disk of `size` bytes, or the error
/// naming all three.
pub(super) fn check_range(offset: u64, len: u64, size: u64) -> Result<()> {
    if offset.checked_add(len).is_none_or(|end| end > size) {
        return Err(Error::OutOfRange { offset, len, size });
    }
    Ok(())
}

fn poisoned(what: &str) -> Error {
    Error::Failed(format!("the overlay's {what} lock is poisoned"))
}

fn set_bits(map: &[u64]) -> Vec<u64> {
    let mut out = Vec::new();
    for (i, &w) in map.iter().enumerate() {
        let mut w = w;
        while w != 0 {
            let t = w.trailing_zeros() as u64;
            out.push(i as u64 * 64 + t);
            w &= w - 1;
        }
    }
    out
}

fn bit(map: &[u64], b: u64) -> bool {
    map.get((b / 64) as usize).is_some_and(|w| w & (1 << (b % 64)) != 0)
}

fn encode_map(map: &[u64], size: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(MAP_HEADER + map.len() * 8 + 32);
    out.extend_from_slice(MAP_MAGIC);
    out.extend_from_slice(&size.to_le_bytes());
    out.extend_from_slice(&BLOCK.to_le_bytes());
    for w in map {
        out.extend_from_slice(&w.to_le_bytes());
    }
    let sum = blake3::hash(&out);
    out.extend_from_slice(sum.as_bytes());
    out
}

fn parse_map(bytes: &[u8], size: u64, words: usize) -> std::result::Result<Vec<u64>, String> {
    let want = MAP_HEADER + words * 8 + 32;
    if bytes.len() != want {
        return Err(format!("{} bytes where a map of this disk has {want}", bytes.len()));
    }
    let (body, sum) = bytes.split_at(want - 32);
    if blake3::hash(body).as_bytes() != sum {
        return Err("checksum mismatch".into());
    }
    if &body[..8] != MAP_MAGIC {
        return Err("not an overlay map".into());
    }
    let u64_at = |at: usize| body.get(at..at + 8).and_then(|b| b.try_into().ok()).map_or(0, u64::from_le_bytes);
    if u64_at(8) != size || u64_at(16) != BLOCK {
        return Err(format!("made for a disk of {} bytes in {}-byte blocks", u64_at(8), u64_at(16)));
    }
    Ok((0..words).map(|i| u64_at(MAP_HEADER + i * 8)).collect())
}

/// Writes `bytes` to `path` so that after a crash it holds either the old
/// or the new content.
pub(super) fn write_durably(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let io = |action: &'static str, p: &Path| {
        let p = p.to_path_buf();
        move |e| Error::io(action, &p, e)
    };
    let f = File::create(&tmp).map_err(io("creating", &tmp))?;
    f.write_all_at(bytes, 0).map_err(io("writing", &tmp))?;
    f.sync_all().map_err(io("syncing", &tmp))?;
    std::fs::rename(&tmp, path).map_err(io("renaming", &tmp))?;
    if let Some(dir) = path.parent() {
        File::open(dir).and_then(|d| d.sync_all()).map_err(io("syncing", dir))?;
    }
    Ok(())
}
