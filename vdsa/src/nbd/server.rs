//! An NBD server (fixed newstyle handshake; simple replies, or structured
//! ones with the `base:allocation` metadata context when the client asks)
//! over any tokio byte stream, serving named exports: many connections on
//! a few threads ([`crate::serving`]). The protocol logic, apart from the
//! I/O, is [`super::session`].
//!
//! Requests are handled one at a time in arrival order and each is answered
//! before the next is read: replies in order are always allowed, and a
//! write is acknowledged only once its export accepted it (and, with FUA,
//! made it durable). Hostile input
//! (bad magic, oversized lengths, ranges beyond the end, unknown commands, a
//! peer that vanishes mid-request) gets an NBD error or a clean disconnect;
//! a write whose payload did not arrive whole is never applied.

use super::proto::{Request, CMD_TRIM, CMD_WRITE, CMD_WRITE_ZEROES};
use super::session::{AfterOption, AfterRequest, Session};
use crate::payload::read_payload_async;
use std::collections::BTreeMap;
use std::io;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

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

/// How a connection ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Ending {
    /// NBD_CMD_DISC or NBD_OPT_ABORT.
    Disconnect,
    /// The peer closed the connection.
    Closed,
    /// The peer broke the protocol; the connection was dropped.
    Protocol(String),
}

fn ending(e: io::Error) -> io::Result<Ending> {
    match e.kind() {
        io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe => Ok(Ending::Closed),
        io::ErrorKind::InvalidData => Ok(Ending::Protocol(e.to_string())),
        _ => Err(e),
    }
}

/// Replies held back while more requests are buffered, at most: then they
/// go out anyway.
const HOLD_REPLIES: usize = 256 << 10;

/// Serves one client until it disconnects, reading requests from `reader`
/// and writing replies to `writer` (two halves of one socket; the reader is
/// buffered here). I/O errors other than the peer going away are returned.
/// The connection holds no thread while it waits for its client. The
/// exports are called in place ([`blocking`]: a slow disk read holds one
/// thread, and the runtime moves the other connections off it).
pub async fn serve<R, W>(reader: R, mut writer: W, exports: &Exports) -> io::Result<Ending>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut r = tokio::io::BufReader::with_capacity(256 << 10, reader);
    let mut s = Session::new(exports);
    match drive(&mut s, &mut r, &mut writer).await {
        Ok(end) => Ok(end),
        Err(e) => ending(e),
    }
}

/// Runs `f` where blocking is allowed: in place on a multi-threaded
/// runtime's worker (its other tasks move to another thread), else as is.
pub(crate) fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => tokio::task::block_in_place(f),
        _ => f(),
    }
}

async fn drive<R, W>(s: &mut Session<'_>, r: &mut tokio::io::BufReader<R>, w: &mut W) -> io::Result<Ending>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    async fn send<W: AsyncWrite + Unpin>(s: &mut Session<'_>, w: &mut W) -> io::Result<()> {
        crate::serving::send_out(&mut s.out, w).await
    }
    send(s, w).await?;
    let flags = r.read_u32().await?;
    s.client_flags(flags)?;
    loop {
        let mut header = [0u8; 16];
        r.read_exact(&mut header).await?;
        let (option, len) = Session::option_header(&header)?;
        let mut data = vec![0u8; len as usize];
        r.read_exact(&mut data).await?;
        match s.option(option, &data)? {
            AfterOption::More => send(s, w).await?,
            AfterOption::Transmission => {
                send(s, w).await?;
                break;
            }
            AfterOption::Abort => {
                let _ = send(s, w).await;
                return Ok(Ending::Disconnect);
            }
        }
    }
    let mut header = [0u8; Request::LEN];
    loop {
        if r.buffer().is_empty() || s.out.len() >= HOLD_REPLIES {
            send(s, w).await?;
        }
        match r.read_exact(&mut header).await {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(Ending::Closed),
            Err(e) => return Err(e),
        }
        let req = Request::parse(&header).map_err(|m| super::session::protocol(format!("bad request magic {m:#x}")))?;
        let len = s.payload_len(&req)?;
        let mut payload = Vec::new();
        if len > 0 {
            payload = s.payload_buffer();
            read_payload_async(r, len, &mut payload, &"a write's payload").await?;
        }
        if let Some(export) = s.export().filter(|_| matches!(req.kind, CMD_WRITE | CMD_WRITE_ZEROES | CMD_TRIM)) {
            if let Some(wait) = export.write_wait() {
                wait.await;
            }
        }
        if blocking(|| s.request(req, payload))? == AfterRequest::Disconnect {
            return Ok(Ending::Disconnect);
        }
        if let Some(data) = s.take_data() {
            send(s, w).await?;
            w.write_all(&data).await?;
            s.data_sent(data);
        }
    }
}
