//! Small file-system steps whose order the crash-safety argument relies on.

use super::error::{JournalError, Result};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;

pub fn create_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| JournalError::io("creating directory", dir, e))
}

/// fsync of a directory, so that files created, renamed or removed in it
/// stay so after a power loss.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| JournalError::io("syncing directory", dir, e))
}

/// The numbers of files named `<number>.<ext>` in `dir`, ascending. Other
/// files are left alone.
pub fn numbered_files(dir: &Path, ext: &str) -> Result<Vec<u64>> {
    let mut out = Vec::new();
    let entries = std::fs::read_dir(dir).map_err(|e| JournalError::io("listing", dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| JournalError::io("listing", dir, e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(stem) = name.strip_suffix(ext).and_then(|s| s.strip_suffix('.')) else {
            continue;
        };
        if let Ok(n) = stem.parse::<u64>() {
            out.push(n);
        }
    }
    out.sort_unstable();
    Ok(out)
}

/// Cuts a file to `len` and makes the cut durable.
pub fn truncate(path: &Path, len: u64) -> Result<()> {
    let f = OpenOptions::new().write(true).open(path).map_err(|e| JournalError::io("opening", path, e))?;
    f.set_len(len).map_err(|e| JournalError::io("truncating", path, e))?;
    f.sync_all().map_err(|e| JournalError::io("syncing", path, e))
}

/// Replaces `path` with `bytes` atomically: write a temporary file, fsync
/// it, rename it over, fsync the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp).map_err(|e| JournalError::io("creating", &tmp, e))?;
    f.write_all(bytes).map_err(|e| JournalError::io("writing", &tmp, e))?;
    f.sync_all().map_err(|e| JournalError::io("syncing", &tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| JournalError::io("renaming", path, e))?;
    match path.parent() {
        Some(dir) => sync_dir(dir),
        None => Ok(()),
    }
}

/// How long a journal waits for its lock before it says another process
/// holds it. A child forked by this process (a hook, qemu-img) shares the
/// lock's open file until it execs, so a journal closed and opened again
/// at that moment finds it held for a few milliseconds
/// (docs/journal-format.md).
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Takes an exclusive advisory lock on `dir/LOCK`, held as long as the
/// returned file is open: one process at a time writes a journal.
pub fn lock_dir(dir: &Path) -> Result<File> {
    use std::os::fd::AsRawFd;
    let path = dir.join("LOCK");
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| JournalError::io("opening", &path, e))?;
    let start = std::time::Instant::now();
    loop {
        // SAFETY: flock takes a file descriptor we own for the duration of
        // the call and touches no memory of ours.
        let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc == 0 {
            return Ok(f);
        }
        if start.elapsed() >= LOCK_WAIT {
            return Err(JournalError::Locked(dir.to_path_buf()));
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// Bytes free for unprivileged writers on the file system holding `path`.
pub fn free_bytes(path: &Path) -> Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| JournalError::io("checking free space of", path, std::io::ErrorKind::InvalidInput.into()))?;
    // SAFETY: statvfs reads the NUL-terminated path and writes only the
    // struct we pass, which lives for the call; all-zero is a valid value.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return Err(JournalError::io("checking free space of", path, std::io::Error::last_os_error()));
    }
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}
