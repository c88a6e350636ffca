//! The native tap protocol (docs/tap-protocol.md): how an I/O filter that
//! is not QEMU hands every write of a disk to its VDSA. Serves the same
//! exports as the NBD server, so both kinds of tap feed the same streams,
//! served on tokio's streams (see `vdsa::serving`).

use crate::conn_task::{blocking, peer_gone};
use crate::nbd::export::{BlockExport, ExportError, Exports};
use crate::payload::read_payload_async;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};

pub const MAGIC: u32 = 0x5654_4150; // "VTAP"
pub const VERSION: u16 = 1;
pub const HEADER_LEN: usize = 36;
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// Requests a filter may have unacknowledged (the VDSA may stop reading
/// while its ACKs are not read).
pub const MAX_IN_FLIGHT: usize = 256;

pub const WRITE: u8 = 1;
pub const ZERO: u8 = 2;
pub const TRIM: u8 = 3;
pub const FLUSH: u8 = 4;
pub const BYE: u8 = 5;

pub const ENOENT: u32 = 2;
pub const EINVAL: u32 = 22;
pub const EBADMSG: u32 = 74;
pub const EPROTONOSUPPORT: u32 = 93;

/// How a session ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Ending {
    Bye,
    Closed,
    /// The peer broke the protocol; why.
    Refused(String),
}

/// One request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub kind: u8,
    pub id: u64,
    pub offset: u64,
    pub length: u32,
}

impl Header {
    /// The header's bytes with the CRC of the header and `payload`.
    pub fn encode(&self, payload: &[u8]) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&MAGIC.to_be_bytes());
        b[4] = self.kind;
        b[8..16].copy_from_slice(&self.id.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.length.to_be_bytes());
        let crc = crc(&b[..28], payload);
        b[28..32].copy_from_slice(&crc.to_be_bytes());
        b
    }
}

fn crc(header: &[u8], payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(header);
    h.update(payload);
    h.finalize()
}

fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn ack(out: &mut Vec<u8>, status: u32, id: u64) {
    out.extend_from_slice(&MAGIC.to_be_bytes());
    out.extend_from_slice(&status.to_be_bytes());
    out.extend_from_slice(&id.to_be_bytes());
}

/// One filter connection's protocol state, apart from its I/O: the
/// driver ([`serve`]) reads whole units (the hello, the disk's name and
/// size, a request with its payload) and hands them here; ACKs collect in
/// `out` until the driver sends them.
struct Session<'a> {
    exports: &'a Exports,
    export: Option<Arc<dyn BlockExport>>,
    out: Vec<u8>,
    payload: Vec<u8>,
}

impl<'a> Session<'a> {
    fn new(exports: &'a Exports) -> Session<'a> {
        Session { exports, export: None, out: Vec::new(), payload: Vec::new() }
    }

    fn welcome(&mut self, status: u32, size: u64) {
        self.out.extend_from_slice(&MAGIC.to_be_bytes());
        self.out.extend_from_slice(&VERSION.to_be_bytes());
        self.out.extend_from_slice(&[0u8; 2]);
        self.out.extend_from_slice(&status.to_be_bytes());
        self.out.extend_from_slice(&size.to_be_bytes());
    }

    /// The hello; the length of the disk name that follows it.
    fn hello(&mut self, hello: &[u8; 8]) -> Result<usize, Ending> {
        if be_u32(hello) != MAGIC {
            return Err(Ending::Refused("bad hello magic".into()));
        }
        let version = u16::from_be_bytes([hello[4], hello[5]]);
        let name_len = u16::from_be_bytes([hello[6], hello[7]]) as usize;
        if version != VERSION {
            self.welcome(EPROTONOSUPPORT, 0);
            return Err(Ending::Refused(format!("protocol version {version}")));
        }
        if name_len == 0 || name_len > 255 {
            self.welcome(EINVAL, 0);
            return Err(Ending::Refused(format!("disk name of {name_len} bytes")));
        }
        Ok(name_len)
    }

    /// The disk's name and the size the filter sees.
    fn disk(&mut self, name: &[u8], size: [u8; 8]) -> Result<(), Ending> {
        let name = String::from_utf8_lossy(name).into_owned();
        let Some(export) = self.exports.find(&name) else {
            self.welcome(ENOENT, 0);
            return Err(Ending::Refused(format!("no disk named {name:?}")));
        };
        if u64::from_be_bytes(size) != export.size() {
            self.welcome(EINVAL, export.size());
            return Err(Ending::Refused(format!(
                "disk {name} is {} bytes, the filter says {}",
                export.size(),
                u64::from_be_bytes(size)
            )));
        }
        self.welcome(0, export.size());
        self.export = Some(export);
        Ok(())
    }

    /// A request's header: the request and the payload that follows it.
    fn header(&mut self, h: &[u8; HEADER_LEN]) -> Result<(Header, u64), Ending> {
        let id = be_u64(&h[8..16]);
        if be_u32(h) != MAGIC {
            return Err(Ending::Refused("bad request magic".into()));
        }
        let header = Header { kind: h[4], id, offset: be_u64(&h[16..24]), length: be_u32(&h[24..28]) };
        if header.length > MAX_PAYLOAD {
            ack(&mut self.out, EBADMSG, id);
            return Err(Ending::Refused(format!("request of {} bytes", header.length)));
        }
        let payload = if header.kind == WRITE { u64::from(header.length) } else { 0 };
        Ok((header, payload))
    }

    /// A request with its payload (in `self.payload`); Some at its end.
    fn request(&mut self, h: &[u8; HEADER_LEN], header: Header) -> Option<Ending> {
        let id = header.id;
        if crc(&h[..28], &self.payload) != be_u32(&h[28..32]) {
            ack(&mut self.out, EBADMSG, id);
            return Some(Ending::Refused(format!("request {id}: bad CRC")));
        }
        let Some(export) = self.export.clone() else {
            return Some(Ending::Refused("a request before the hello".into()));
        };
        // Flags are reserved in version 1: a filter that sets them expects
        // something this VDSA does not do.
        let result = match h[5] {
            0 => apply(export.as_ref(), &header, &mut self.payload),
            flags => Err(ExportError::new(EINVAL, format!("request flags {flags:#x}; version 1 has none"))),
        };
        if header.kind == BYE {
            return Some(Ending::Bye);
        }
        let status = match result {
            Ok(()) => 0,
            Err(e) => {
                tracing::warn!(errno = e.errno, "native tap request {id} refused: {}", e.message);
                e.errno
            }
        };
        ack(&mut self.out, status, id);
        None
    }
}

/// Names request `id`'s payload in a short-read error, formatted only
/// then (not once per write).
struct PayloadOf(u64);

impl std::fmt::Display for PayloadOf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "request {}'s payload", self.0)
    }
}

/// ACKs held back while more requests are buffered, at most.
const HOLD_ACKS: usize = 64 << 10;

fn closed(end: io::Result<Ending>) -> io::Result<Ending> {
    match end {
        Ok(end) => Ok(end),
        Err(e) if peer_gone(&e) => Ok(Ending::Closed),
        Err(e) => Err(e),
    }
}

/// Serves one filter connection until BYE, close, or a protocol breach
/// (on tokio's streams; see [`crate::nbd::server::serve`]).
pub async fn serve<R, W>(reader: R, mut writer: W, exports: &Exports) -> io::Result<Ending>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut r = tokio::io::BufReader::with_capacity(256 << 10, reader);
    let mut s = Session::new(exports);
    let end = drive(&mut s, &mut r, &mut writer).await;
    closed(end)
}

async fn drive<R, W>(s: &mut Session<'_>, r: &mut tokio::io::BufReader<R>, w: &mut W) -> io::Result<Ending>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    async fn send<W: AsyncWrite + Unpin>(s: &mut Session<'_>, w: &mut W) -> io::Result<()> {
        crate::conn_task::send_out(&mut s.out, w).await
    }
    let mut hello = [0u8; 8];
    r.read_exact(&mut hello).await?;
    let name_len = match s.hello(&hello) {
        Ok(n) => n,
        Err(end) => return send(s, w).await.map(|()| end),
    };
    let mut name = vec![0u8; name_len];
    r.read_exact(&mut name).await?;
    let mut size = [0u8; 8];
    r.read_exact(&mut size).await?;
    let welcomed = s.disk(&name, size);
    send(s, w).await?;
    if let Err(end) = welcomed {
        return Ok(end);
    }
    let mut h = [0u8; HEADER_LEN];
    loop {
        if r.buffer().is_empty() || s.out.len() >= HOLD_ACKS {
            send(s, w).await?;
        }
        r.read_exact(&mut h).await?;
        let (header, len) = match s.header(&h) {
            Ok(x) => x,
            Err(end) => return send(s, w).await.map(|()| end),
        };
        s.payload.clear();
        if len > 0 {
            read_payload_async(r, len, &mut s.payload, &PayloadOf(header.id)).await?;
        }
        if let Some(export) = s.export.clone().filter(|_| matches!(header.kind, WRITE | ZERO | TRIM)) {
            if let Some(wait) = export.write_wait() {
                wait.await;
            }
        }
        if let Some(end) = blocking(|| s.request(&h, header)) {
            return send(s, w).await.map(|()| end);
        }
    }
}

/// Applies a checked request; a write's payload goes to an export that
/// keeps it without a copy (the buffer is then replaced).
fn apply(export: &dyn BlockExport, h: &Header, payload: &mut Vec<u8>) -> Result<(), ExportError> {
    let size = export.size();
    let len = u64::from(h.length);
    let in_range = h.offset.checked_add(len).is_some_and(|end| end <= size);
    match h.kind {
        FLUSH => export.flush(),
        BYE => Ok(()),
        WRITE | ZERO | TRIM if !in_range => Err(ExportError::new(
            crate::nbd::proto::ENOSPC,
            format!("range {}+{len} beyond the end ({size})", h.offset),
        )),
        WRITE if payload.is_empty() => Ok(()),
        WRITE if export.keeps_write_buffers() => export.write_owned(h.offset, std::mem::take(payload)),
        WRITE => export.write(h.offset, payload),
        ZERO | TRIM if len == 0 => Ok(()),
        ZERO => export.write_zeroes(h.offset, len),
        TRIM => export.trim(h.offset, len),
        other => Err(ExportError::new(EINVAL, format!("unknown request type {other}"))),
    }
}

/// A filter's side of the protocol (for tests and tools): requests are sent
/// at once and acknowledged in order. The caller keeps at most
/// [`MAX_IN_FLIGHT`] requests unacknowledged.
#[derive(Debug)]
pub struct NativeTapClient<R: Read, W: Write> {
    r: BufReader<R>,
    w: BufWriter<W>,
    next_id: u64,
    pub size: u64,
}

impl<R: Read, W: Write> NativeTapClient<R, W> {
    /// Says hello for `disk` of `size` bytes; the VDSA's status is an error
    /// if not 0.
    pub fn connect(reader: R, writer: W, disk: &str, size: u64) -> io::Result<Self> {
        let mut c = NativeTapClient { r: BufReader::new(reader), w: BufWriter::new(writer), next_id: 1, size };
        c.w.write_all(&MAGIC.to_be_bytes())?;
        c.w.write_all(&VERSION.to_be_bytes())?;
        c.w.write_all(&(disk.len() as u16).to_be_bytes())?;
        c.w.write_all(disk.as_bytes())?;
        c.w.write_all(&size.to_be_bytes())?;
        c.w.flush()?;
        let mut b = [0u8; 20];
        c.r.read_exact(&mut b)?;
        let status = be_u32(&b[8..12]);
        if be_u32(&b) != MAGIC || status != 0 {
            return Err(io::Error::other(format!("the VDSA refused the tap: status {status}")));
        }
        c.size = be_u64(&b[12..20]);
        Ok(c)
    }

    /// Sends a request (not waiting for its ACK); returns its id.
    pub fn send(&mut self, kind: u8, offset: u64, length: u32, payload: &[u8]) -> io::Result<u64> {
        let id = self.next_id;
        self.next_id += 1;
        let h = Header { kind, id, offset, length }.encode(payload);
        self.w.write_all(&h)?;
        self.w.write_all(payload)?;
        Ok(id)
    }

    /// Sends raw bytes (for tests of malformed input).
    pub fn send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.w.write_all(bytes)
    }

    /// Waits for the next ACK: (status, id).
    pub fn ack(&mut self) -> io::Result<(u32, u64)> {
        self.w.flush()?;
        let mut b = [0u8; 16];
        self.r.read_exact(&mut b)?;
        if be_u32(&b) != MAGIC {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "bad ACK magic"));
        }
        Ok((be_u32(&b[4..8]), be_u64(&b[8..16])))
    }

    /// Writes and waits for the ACK; a non-zero status is an error.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        let id = self.send(WRITE, offset, data.len() as u32, data)?;
        match self.ack()? {
            (0, got) if got == id => Ok(()),
            (status, _) => Err(io::Error::other(format!("write refused: status {status}"))),
        }
    }
}
