//! Writing and reading files with `O_DIRECT`, past the page cache: the
//! journal's chunk packs and the send queue's spill file
//! (docs/performance.md, "Copies of a block"). On this kind of VM a
//! buffered write costs the writer many times the copy it makes, and the
//! bytes either way are read again at most once.
//!
//! The offset, length and memory of a direct transfer must be aligned; a
//! filesystem without direct I/O (tmpfs) refuses the open or the first
//! transfer, and the caller then goes through the page cache.

use std::fs::File;
use std::path::Path;

/// The alignment of a direct transfer's offset, length and memory: the
/// page size, which covers every logical block size a disk reports.
pub const DIRECT_ALIGN: usize = 4096;

/// A buffer whose start is aligned for `O_DIRECT`, kept and reused by its
/// owner (a fresh one per transfer would cost page faults).
#[derive(Debug, Default)]
pub struct AlignedBuf {
    bytes: Vec<u8>,
    start: usize,
}

impl AlignedBuf {
    /// A zeroed buffer of at least `len` aligned bytes.
    pub fn with_len(len: usize) -> AlignedBuf {
        let mut b = AlignedBuf::default();
        b.get(len);
        b
    }

    /// The first `len` aligned bytes; a buffer shorter than that is
    /// replaced by a zeroed one (its bytes are not kept).
    pub fn get(&mut self, len: usize) -> &mut [u8] {
        if self.bytes.len() < self.start + len {
            self.bytes = vec![0; len + DIRECT_ALIGN];
            self.start = self.bytes.as_ptr().align_offset(DIRECT_ALIGN).min(DIRECT_ALIGN);
        }
        &mut self.bytes[self.start..self.start + len]
    }

    /// The first `len` aligned bytes, if the buffer has them.
    pub fn first(&self, len: usize) -> Option<&[u8]> {
        self.bytes.get(self.start..self.start + len)
    }
}

/// `path` opened again for writing with `O_DIRECT`, or the reason the
/// filesystem has none.
pub fn open_write(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new().write(true).custom_flags(libc::O_DIRECT).open(path)
}

/// Runs the transfer `op` on `file`; if the filesystem refuses it as a
/// direct transfer (EINVAL), turns `O_DIRECT` off on the descriptor and
/// runs it again through the page cache, as every later transfer on it
/// goes. `what` names the file's role in the warning.
pub fn or_through_page_cache<T>(
    file: &File,
    what: &str,
    mut op: impl FnMut() -> std::io::Result<T>,
) -> std::io::Result<T> {
    match op() {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            tracing::warn!("the filesystem refused a direct transfer to {what} ({e}); going through the page cache");
            clear_direct(file)?;
            op()
        }
        r => r,
    }
}

/// Turns `O_DIRECT` off on an open descriptor, after the filesystem
/// refused a direct transfer (EINVAL) that the caller then repeats.
fn clear_direct(file: &File) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    // SAFETY: F_GETFL and F_SETFL read and set the descriptor's status
    // flags and touch no memory of ours; the descriptor is open (we hold
    // the File).
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_DIRECT) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_start_aligned_and_grow_on_demand() {
        let mut b = AlignedBuf::default();
        assert!(b.first(1).is_none());
        let s = b.get(8192);
        assert_eq!(s.len(), 8192);
        assert_eq!(s.as_ptr() as usize % DIRECT_ALIGN, 0);
        s[0] = 7;
        // Asking for no more keeps the bytes.
        assert_eq!(b.get(4096)[0], 7);
        assert_eq!(b.first(8192).map(|s| s[0]), Some(7));
        let big = AlignedBuf::with_len(1 << 20);
        assert_eq!(big.first(1 << 20).map(|s| s.as_ptr() as usize % DIRECT_ALIGN), Some(0));
    }
}
