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
            (self.bytes, self.start) = aligned_zeroed(len);
        }
        &mut self.bytes[self.start..self.start + len]
    }

    /// The first `len` aligned bytes, if the buffer has them.
    pub fn first(&self, len: usize) -> Option<&[u8]> {
        self.bytes.get(self.start..self.start + len)
    }
}

/// A growable byte buffer whose content starts aligned for `O_DIRECT`, so
/// that it can be written straight to a file opened with it: the journal
/// assembles chunk pack entries in one and hands it to the writer without
/// a copy into an aligned buffer (docs/performance.md, "Copies of a
/// block"). Growing it copies the content into a new aligned allocation.
#[derive(Debug, Default)]
pub struct AlignedVec {
    bytes: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedVec {
    pub fn len(&self) -> usize {
        self.len
    }

    /// The content, starting at an aligned address.
    pub fn as_slice(&self) -> &[u8] {
        &self.bytes[self.start..self.start + self.len]
    }

    /// Empties the buffer, keeping its memory.
    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Room for `extra` more bytes without moving the content again.
    pub fn reserve(&mut self, extra: usize) {
        let need = self.len + extra;
        if self.start + need <= self.bytes.len() {
            return;
        }
        let cap = need.max(2 * self.bytes.len().saturating_sub(self.start)).next_multiple_of(DIRECT_ALIGN);
        let (mut bytes, start) = aligned_zeroed(cap);
        bytes[start..start + self.len].copy_from_slice(self.as_slice());
        self.bytes = bytes;
        self.start = start;
    }

    pub fn extend_from_slice(&mut self, more: &[u8]) {
        self.reserve(more.len());
        let at = self.start + self.len;
        self.bytes[at..at + more.len()].copy_from_slice(more);
        self.len += more.len();
    }

    /// The buffer made ready for a direct write: zeros from its end to the
    /// next aligned length.
    pub fn into_padded(mut self) -> PaddedBuf {
        let padded = self.len.next_multiple_of(DIRECT_ALIGN);
        self.reserve(padded - self.len);
        let end = self.start + self.len;
        self.bytes[end..self.start + padded].fill(0);
        PaddedBuf(self)
    }
}

/// An [`AlignedVec`] followed by zeros up to the next aligned length:
/// what a direct write of its content writes.
#[derive(Debug)]
pub struct PaddedBuf(AlignedVec);

impl PaddedBuf {
    /// The content, without the padding.
    pub fn as_slice(&self) -> &[u8] {
        self.0.as_slice()
    }

    /// The content and the zeros after it: an aligned length.
    pub fn padded(&self) -> &[u8] {
        let v = &self.0;
        &v.bytes[v.start..v.start + v.len.next_multiple_of(DIRECT_ALIGN)]
    }

    /// The buffer back, emptied, for reuse.
    pub fn into_empty(self) -> AlignedVec {
        let mut v = self.0;
        v.clear();
        v
    }
}

/// Zeroed memory with at least `len` bytes from an aligned address on, and
/// that address's index: the allocator promises no alignment, so the
/// vector has `DIRECT_ALIGN` bytes more to start within.
fn aligned_zeroed(len: usize) -> (Vec<u8>, usize) {
    let bytes = vec![0; len + DIRECT_ALIGN];
    let start = bytes.as_ptr().align_offset(DIRECT_ALIGN).min(DIRECT_ALIGN);
    (bytes, start)
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

    #[test]
    fn a_growing_vec_keeps_its_content_aligned_and_pads_with_zeros() {
        let mut v = AlignedVec::default();
        let mut model = Vec::new();
        for i in 0..3000u32 {
            let piece: Vec<u8> = (0..(i % 97) as u8).map(|b| b ^ i as u8).collect();
            v.extend_from_slice(&piece);
            model.extend_from_slice(&piece);
            if v.len() > 0 {
                assert_eq!(v.as_slice().as_ptr() as usize % DIRECT_ALIGN, 0);
            }
        }
        assert_eq!(v.as_slice(), &model[..]);
        assert_eq!(v.len(), model.len());
        // Dirty the bytes after the content, as a reused buffer has them.
        v.extend_from_slice(&[0xff; 5000]);
        let mut v = v.into_padded().into_empty();
        assert_eq!(v.len(), 0);
        v.extend_from_slice(&model);
        let p = v.into_padded();
        assert_eq!(p.as_slice(), &model[..]);
        assert_eq!(p.padded().len(), model.len().next_multiple_of(DIRECT_ALIGN));
        assert!(p.padded()[model.len()..].iter().all(|&b| b == 0));
        assert_eq!(p.padded().as_ptr() as usize % DIRECT_ALIGN, 0);
    }
}
