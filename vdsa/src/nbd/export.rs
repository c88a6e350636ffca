//! What the NBD server and the native tap serve: named block devices
//! ([`BlockExport`]) and how one refuses a request ([`ExportError`]). The
//! protocols live in the NBD server and session and in `native_tap`; the
//! exports themselves are the source streams' disks, the journal taps and
//! the recovery stacks.

use std::collections::BTreeMap;
use std::sync::Arc;

/// Why an export refused a request: the errno the protocol carries and a
/// message for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportError {
    pub errno: u32,
    pub message: String,
}

impl ExportError {
    pub fn new(errno: u32, message: impl Into<String>) -> Self {
        ExportError { errno, message: message.into() }
    }
}

impl std::fmt::Display for ExportError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// A wait a write would block on, awaited by the server before it.
pub type WriteWait<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>>;

/// A block device an NBD client can read and write.
pub trait BlockExport: Send + Sync {
    fn size(&self) -> u64;
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), ExportError>;
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), ExportError>;
    /// A write whose payload buffer the server no longer needs: an export
    /// that keeps the bytes (a source VDSA's send queue) takes the buffer
    /// instead of copying it. By default [`BlockExport::write`].
    fn write_owned(&self, offset: u64, data: Vec<u8>) -> Result<(), ExportError> {
        self.write(offset, &data)
    }
    /// Whether [`BlockExport::write_owned`] keeps the buffer: the server
    /// then reads each write's payload into a buffer of its own, else it
    /// reuses one.
    fn keeps_write_buffers(&self) -> bool {
        false
    }
    /// What a write would wait for now (a source stream's checkpoint
    /// hold), for the server to await first without holding a thread; None
    /// when a write would not wait.
    fn write_wait(&self) -> Option<WriteWait<'_>> {
        None
    }
    /// WRITE_ZEROES with NBD_CMD_FLAG_NO_HOLE: the range reads as zeroes
    /// and stays provisioned.
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), ExportError>;
    /// WRITE_ZEROES without NBD_CMD_FLAG_NO_HOLE: the range reads as
    /// zeroes and may become a hole. By default as with the flag.
    fn write_zeroes_may_punch(&self, offset: u64, len: u64) -> Result<(), ExportError> {
        self.write_zeroes(offset, len)
    }
    fn trim(&self, offset: u64, len: u64) -> Result<(), ExportError>;
    fn flush(&self) -> Result<(), ExportError>;
    /// Whether a flush makes writes durable here, so that FLUSH and FUA are
    /// offered to clients. An export that only forwards writes (a source
    /// VDSA: the protected disk itself holds them, replication is
    /// asynchronous) offers neither rather than pretend.
    fn offers_durability(&self) -> bool {
        true
    }
    /// Whether the export is offered read-only (NBD_FLAG_READ_ONLY): its
    /// write, trim and zero calls then answer EPERM.
    fn read_only(&self) -> bool {
        false
    }
    /// What `offset..offset + len` holds, as consecutive extents from
    /// `offset` (at least one; they may stop short of `len`). States are
    /// `base:allocation`'s: [`STATE_HOLE`](super::proto::STATE_HOLE) and
    /// [`STATE_ZERO`](super::proto::STATE_ZERO); 0 (data) is always a true
    /// answer, so that is the default.
    fn block_status(&self, _offset: u64, len: u64) -> Result<Vec<Extent>, ExportError> {
        Ok(vec![Extent { length: len, state: 0 }])
    }
}

/// One run of a block status answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub length: u64,
    /// [`STATE_HOLE`](super::proto::STATE_HOLE) |
    /// [`STATE_ZERO`](super::proto::STATE_ZERO), or 0 for data.
    pub state: u32,
}

/// The exports a server offers, by name. A client asking for the empty
/// name gets the only export, if there is exactly one.
#[derive(Default)]
pub struct Exports {
    /// Exports come and go at run time (a VDSA's roles change); a
    /// connection keeps the export it opened.
    by_name: std::sync::RwLock<BTreeMap<String, Arc<dyn BlockExport>>>,
}

impl std::fmt::Debug for Exports {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.names()).finish()
    }
}

impl Exports {
    pub fn insert(&self, name: impl Into<String>, export: Arc<dyn BlockExport>) {
        if let Ok(mut m) = self.by_name.write() {
            m.insert(name.into(), export);
        }
    }

    pub fn remove(&self, name: &str) {
        if let Ok(mut m) = self.by_name.write() {
            m.remove(name);
        }
    }

    pub fn names(&self) -> Vec<String> {
        self.by_name.read().map(|m| m.keys().cloned().collect()).unwrap_or_default()
    }

    /// The export a client asked for; the empty name means the only one.
    pub fn find(&self, name: &str) -> Option<Arc<dyn BlockExport>> {
        let m = self.by_name.read().ok()?;
        if name.is_empty() && m.len() == 1 {
            return m.values().next().cloned();
        }
        m.get(name).cloned()
    }
}
