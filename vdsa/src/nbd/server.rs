//! An NBD server (fixed newstyle handshake; simple replies, or structured
//! ones with the `base:allocation` metadata context when the client asks)
//! over any byte stream, serving named exports.
//!
//! Requests are handled one at a time in arrival order and each is answered
//! before the next is read: replies in order are always allowed, and a
//! write is acknowledged only once its export accepted it (and, with FUA,
//! made it durable). Hostile input
//! (bad magic, oversized lengths, ranges beyond the end, unknown commands, a
//! peer that vanishes mid-request) gets an NBD error or a clean disconnect;
//! a write whose payload did not arrive whole is never applied.

use super::proto::*;
use crate::payload::read_payload;
use std::collections::BTreeMap;
use std::io::{self, BufReader, BufWriter, Read, Write};
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
    /// `base:allocation`'s: [`STATE_HOLE`] and [`STATE_ZERO`]; 0 (data) is
    /// always a true answer, so that is the default.
    fn block_status(&self, _offset: u64, len: u64) -> Result<Vec<Extent>, ExportError> {
        Ok(vec![Extent { length: len, state: 0 }])
    }
}

/// One run of a block status answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub length: u64,
    /// [`STATE_HOLE`] | [`STATE_ZERO`], or 0 for data.
    pub state: u32,
}

/// The most descriptors one block status reply carries (the protocol lets
/// a server answer less than asked; the client asks again from there).
const MAX_EXTENTS: usize = 4096;

/// The context id `base:allocation` gets on a connection.
const ALLOCATION_CONTEXT: u32 = 1;

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

/// Longest option payload accepted in the handshake.
const MAX_OPTION: u32 = 64 << 10;

/// The transmission flags offered for `export` (DF only with structured
/// replies, which it is about).
fn transmission_flags(export: &dyn BlockExport, structured: bool) -> u16 {
    let mut base = TFLAG_HAS_FLAGS | TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES | TFLAG_SEND_FAST_ZERO;
    if structured {
        base |= TFLAG_SEND_DF;
    }
    if export.read_only() {
        base |= TFLAG_READ_ONLY;
    }
    if export.offers_durability() {
        base | TFLAG_SEND_FLUSH | TFLAG_SEND_FUA
    } else {
        base
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

/// Serves one client until it disconnects, reading requests from `reader`
/// and writing replies to `writer` (two handles of one socket; both are
/// buffered here). I/O errors other than the peer going away are returned.
pub fn serve<R: Read, W: Write>(reader: R, writer: W, exports: &Exports) -> io::Result<Ending> {
    let mut conn = Conn {
        r: BufReader::with_capacity(256 << 10, reader),
        w: BufWriter::with_capacity(256 << 10, writer),
        no_zeroes: false,
        structured: false,
        allocation_for: None,
    };
    let (export, name) = match conn.handshake(exports) {
        Ok(Some(e)) => e,
        Ok(None) => return Ok(Ending::Disconnect),
        Err(e) => return ending(e),
    };
    match conn.transmission(export.as_ref(), &name) {
        Ok(end) => Ok(end),
        Err(e) => ending(e),
    }
}

fn ending(e: io::Error) -> io::Result<Ending> {
    match e.kind() {
        io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe => Ok(Ending::Closed),
        io::ErrorKind::InvalidData => Ok(Ending::Protocol(e.to_string())),
        _ => Err(e),
    }
}

fn protocol(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

struct Conn<R: Read, W: Write> {
    r: BufReader<R>,
    w: BufWriter<W>,
    no_zeroes: bool,
    /// NBD_OPT_STRUCTURED_REPLY was negotiated.
    structured: bool,
    /// The export the last NBD_OPT_SET_META_CONTEXT selected
    /// `base:allocation` for (block status is allowed on it only).
    allocation_for: Option<String>,
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

impl<R: Read, W: Write> Conn<R, W> {
    fn read_u32(&mut self) -> io::Result<u32> {
        let mut b = [0u8; 4];
        self.r.read_exact(&mut b)?;
        Ok(u32::from_be_bytes(b))
    }

    fn read_u64(&mut self) -> io::Result<u64> {
        let mut b = [0u8; 8];
        self.r.read_exact(&mut b)?;
        Ok(u64::from_be_bytes(b))
    }

    fn option_reply(&mut self, option: u32, kind: u32, data: &[u8]) -> io::Result<()> {
        let mut b = Vec::with_capacity(20 + data.len());
        b.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
        b.extend_from_slice(&option.to_be_bytes());
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.w.write_all(&b)?;
        self.w.flush()
    }

    /// Returns the export chosen and its name, or None if the client
    /// aborted.
    fn handshake(&mut self, exports: &Exports) -> io::Result<Option<(Arc<dyn BlockExport>, String)>> {
        let mut hello = Vec::with_capacity(18);
        hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
        hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
        hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        self.w.write_all(&hello)?;
        self.w.flush()?;
        let client_flags = self.read_u32()?;
        if client_flags & CLIENT_FIXED_NEWSTYLE == 0 || client_flags & !(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES) != 0
        {
            return Err(protocol(format!("unsupported client flags {client_flags:#x}")));
        }
        self.no_zeroes = client_flags & CLIENT_NO_ZEROES != 0;
        loop {
            let magic = self.read_u64()?;
            if magic != IHAVEOPT {
                return Err(protocol(format!("bad option magic {magic:#x}")));
            }
            let option = self.read_u32()?;
            let len = self.read_u32()?;
            if len > MAX_OPTION {
                return Err(protocol(format!("option {option} of {len} bytes")));
            }
            let mut data = vec![0u8; len as usize];
            self.r.read_exact(&mut data)?;
            match option {
                OPT_EXPORT_NAME => {
                    let name = String::from_utf8_lossy(&data).into_owned();
                    let Some(export) = exports.find(&name) else {
                        return Err(protocol(format!("no export named {name:?}")));
                    };
                    let mut b = Vec::with_capacity(134);
                    b.extend_from_slice(&export.size().to_be_bytes());
                    b.extend_from_slice(&transmission_flags(export.as_ref(), self.structured).to_be_bytes());
                    if !self.no_zeroes {
                        b.extend_from_slice(&[0u8; 124]);
                    }
                    self.w.write_all(&b)?;
                    self.w.flush()?;
                    return Ok(Some((export, name)));
                }
                OPT_ABORT => {
                    // The reply is a courtesy; the client may be gone already.
                    let _ = self.option_reply(option, REP_ACK, &[]);
                    return Ok(None);
                }
                OPT_LIST => {
                    if !data.is_empty() {
                        self.option_reply(option, REP_ERR_INVALID, b"NBD_OPT_LIST takes no data")?;
                        continue;
                    }
                    let names: Vec<String> = exports.names();
                    for name in names {
                        let mut d = (name.len() as u32).to_be_bytes().to_vec();
                        d.extend_from_slice(name.as_bytes());
                        self.option_reply(option, REP_SERVER, &d)?;
                    }
                    self.option_reply(option, REP_ACK, &[])?;
                }
                OPT_INFO | OPT_GO => {
                    let Some(name) = parse_info_request(&data) else {
                        self.option_reply(option, REP_ERR_INVALID, b"malformed NBD_OPT_INFO/GO")?;
                        continue;
                    };
                    let Some(export) = exports.find(&name) else {
                        self.option_reply(option, REP_ERR_UNKNOWN, format!("no export named {name:?}").as_bytes())?;
                        continue;
                    };
                    let mut info = INFO_EXPORT.to_be_bytes().to_vec();
                    info.extend_from_slice(&export.size().to_be_bytes());
                    info.extend_from_slice(&transmission_flags(export.as_ref(), self.structured).to_be_bytes());
                    self.option_reply(option, REP_INFO, &info)?;
                    // Minimum 1: sub-4 KiB writes arrive as they are, with no
                    // read-modify-write by the client.
                    let mut bs = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                    bs.extend_from_slice(&1u32.to_be_bytes());
                    bs.extend_from_slice(&4096u32.to_be_bytes());
                    bs.extend_from_slice(&MAX_REQUEST.to_be_bytes());
                    self.option_reply(option, REP_INFO, &bs)?;
                    self.option_reply(option, REP_ACK, &[])?;
                    if option == OPT_GO {
                        return Ok(Some((export, name)));
                    }
                }
                OPT_STRUCTURED_REPLY => {
                    if !data.is_empty() {
                        self.option_reply(option, REP_ERR_INVALID, b"NBD_OPT_STRUCTURED_REPLY takes no data")?;
                        continue;
                    }
                    self.structured = true;
                    self.option_reply(option, REP_ACK, &[])?;
                }
                OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => self.meta_context(option, &data, exports)?,
                _ => self.option_reply(option, REP_ERR_UNSUP, &[])?,
            }
        }
    }

    /// Queues a reply; replies go out when no further request is buffered
    /// (one send for a burst of requests, none held back while waiting).
    fn reply(&mut self, error: u32, handle: u64, data: Option<&[u8]>) -> io::Result<()> {
        self.w.write_all(&simple_reply(error, handle))?;
        if let Some(d) = data {
            self.w.write_all(d)?;
        }
        Ok(())
    }

    /// NBD_OPT_LIST_META_CONTEXT and NBD_OPT_SET_META_CONTEXT: the only
    /// context is `base:allocation`.
    fn meta_context(&mut self, option: u32, data: &[u8], exports: &Exports) -> io::Result<()> {
        if option == OPT_SET_META_CONTEXT {
            // A SET replaces the selection, also when it fails.
            self.allocation_for = None;
        }
        if !self.structured {
            return self.option_reply(option, REP_ERR_INVALID, b"negotiate structured replies first");
        }
        let Some((name, queries)) = parse_meta_request(data) else {
            return self.option_reply(option, REP_ERR_INVALID, b"malformed metadata context request");
        };
        if exports.find(&name).is_none() {
            return self.option_reply(option, REP_ERR_UNKNOWN, format!("no export named {name:?}").as_bytes());
        }
        // LIST with no query, or with `base:`, lists everything.
        let wanted = queries.iter().any(|q| q == BASE_ALLOCATION)
            || (option == OPT_LIST_META_CONTEXT && (queries.is_empty() || queries.iter().any(|q| q == "base:")));
        if wanted {
            let id = if option == OPT_SET_META_CONTEXT { ALLOCATION_CONTEXT } else { 0 };
            let mut d = id.to_be_bytes().to_vec();
            d.extend_from_slice(BASE_ALLOCATION.as_bytes());
            self.option_reply(option, REP_META_CONTEXT, &d)?;
            if option == OPT_SET_META_CONTEXT {
                self.allocation_for = Some(name);
            }
        }
        self.option_reply(option, REP_ACK, &[])
    }

    /// A structured error chunk (the last of its reply).
    fn error_chunk(&mut self, handle: u64, e: &ExportError) -> io::Result<()> {
        let msg = &e.message.as_bytes()[..e.message.len().min(4096)];
        self.w.write_all(&chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_ERROR, handle, 6 + msg.len() as u32))?;
        self.w.write_all(&e.errno.to_be_bytes())?;
        self.w.write_all(&(msg.len() as u16).to_be_bytes())?;
        self.w.write_all(msg)
    }

    /// Answers NBD_CMD_BLOCK_STATUS for `off..off + len` (in range).
    fn block_status(&mut self, export: &dyn BlockExport, handle: u64, off: u64, len: u64, one: bool) -> io::Result<()> {
        let extents = match export.block_status(off, len) {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(errno = e.errno, "NBD block status refused: {}", e.message);
                return self.error_chunk(handle, &e);
            }
        };
        // Clipped to the request, each under 4 GiB, none empty, adjacent
        // equal states merged.
        let mut out: Vec<(u32, u32)> = Vec::new();
        let mut left = len;
        for Extent { length, state } in extents {
            let mut length = length.min(left);
            left -= length;
            while length > 0 {
                let piece = length.min(u64::from(u32::MAX) & !4095) as u32;
                match out.last_mut() {
                    Some((l, s)) if *s == state && u64::from(*l) + u64::from(piece) <= u64::from(u32::MAX) => {
                        *l += piece
                    }
                    _ => out.push((piece, state)),
                }
                length -= u64::from(piece);
            }
            if left == 0 || out.len() >= MAX_EXTENTS {
                break;
            }
        }
        if out.is_empty() {
            // An export that answered nothing: data is always true.
            out.push((len as u32, 0));
        }
        out.truncate(if one { 1 } else { MAX_EXTENTS });
        let payload = 4 + 8 * out.len() as u32;
        self.w.write_all(&chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, handle, payload))?;
        self.w.write_all(&ALLOCATION_CONTEXT.to_be_bytes())?;
        for (l, s) in out {
            self.w.write_all(&l.to_be_bytes())?;
            self.w.write_all(&s.to_be_bytes())?;
        }
        Ok(())
    }

    fn transmission(&mut self, export: &dyn BlockExport, name: &str) -> io::Result<Ending> {
        let allocation = self.allocation_for.as_deref() == Some(name);
        let size = export.size();
        let durable = export.offers_durability();
        let keeps_buffers = export.keeps_write_buffers();
        let mut header = [0u8; Request::LEN];
        let mut buf = Vec::new();
        loop {
            if self.r.buffer().is_empty() {
                self.w.flush()?;
            }
            match self.r.read_exact(&mut header) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(Ending::Closed),
                Err(e) => return Err(e),
            }
            let req = Request::parse(&header).map_err(|m| protocol(format!("bad request magic {m:#x}")))?;
            let (off, len) = (req.offset, u64::from(req.length));
            let in_range = off.checked_add(len).is_some_and(|end| end <= size);
            let unknown_flags = req.flags & !allowed_flags(req.kind, durable);
            let result = match req.kind {
                // Refused after its payload was read, so the stream stays
                // in step.
                CMD_WRITE if unknown_flags != 0 && req.length <= MAX_REQUEST => {
                    buf.resize(req.length as usize, 0);
                    self.r.read_exact(&mut buf)?;
                    Err(ExportError::new(EINVAL, format!("flags {unknown_flags:#x} are not offered for a write")))
                }
                CMD_READ | CMD_FLUSH | CMD_TRIM | CMD_WRITE_ZEROES | CMD_BLOCK_STATUS if unknown_flags != 0 => {
                    Err(ExportError::new(
                        EINVAL,
                        format!("flags {unknown_flags:#x} are not offered for command {}", req.kind),
                    ))
                }
                CMD_DISC => return Ok(Ending::Disconnect),
                CMD_WRITE => {
                    if req.length > MAX_REQUEST {
                        // Its payload cannot be skipped safely: drop the peer.
                        return Err(protocol(format!("write of {len} bytes exceeds {MAX_REQUEST}")));
                    }
                    // Into a buffer of its own when the export keeps it (no
                    // copy after).
                    let mut data = if keeps_buffers { Vec::new() } else { std::mem::take(&mut buf) };
                    read_payload(&mut self.r, len, &mut data, &"a write's payload")?;
                    if !in_range {
                        Err(ExportError::new(ENOSPC, format!("write {off}+{len} beyond the end ({size})")))
                    } else if keeps_buffers {
                        export.write_owned(off, data)
                    } else {
                        let done = export.write(off, &data);
                        buf = data;
                        done
                    }
                }
                CMD_READ => {
                    if req.length > MAX_REQUEST {
                        Err(ExportError::new(EOVERFLOW, format!("read of {len} bytes exceeds {MAX_REQUEST}")))
                    } else if !in_range {
                        Err(ExportError::new(EINVAL, format!("read {off}+{len} beyond the end ({size})")))
                    } else {
                        buf.resize(req.length as usize, 0);
                        match export.read(off, &mut buf) {
                            Ok(()) if self.structured => {
                                // One data chunk: nothing to fragment, so DF
                                // holds whatever the client asked.
                                let h =
                                    chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, req.handle, 8 + req.length);
                                self.w.write_all(&h)?;
                                self.w.write_all(&off.to_be_bytes())?;
                                self.w.write_all(&buf)?;
                                continue;
                            }
                            Ok(()) => {
                                let data = std::mem::take(&mut buf);
                                self.reply(0, req.handle, Some(&data))?;
                                buf = data;
                                continue;
                            }
                            Err(e) => Err(e),
                        }
                    }
                }
                CMD_WRITE_ZEROES if in_range && req.flags & CMD_FLAG_NO_HOLE != 0 => export.write_zeroes(off, len),
                CMD_WRITE_ZEROES if in_range => export.write_zeroes_may_punch(off, len),
                CMD_TRIM if in_range => export.trim(off, len),
                CMD_WRITE_ZEROES | CMD_TRIM => {
                    Err(ExportError::new(ENOSPC, format!("range {off}+{len} beyond the end ({size})")))
                }
                CMD_FLUSH => export.flush(),
                CMD_BLOCK_STATUS if !allocation => {
                    Err(ExportError::new(EINVAL, "block status without the base:allocation context selected"))
                }
                CMD_BLOCK_STATUS if !in_range || len == 0 => {
                    Err(ExportError::new(EINVAL, format!("block status of {off}+{len} beyond the end ({size})")))
                }
                CMD_BLOCK_STATUS => {
                    self.block_status(export, req.handle, off, len, req.flags & CMD_FLAG_REQ_ONE != 0)?;
                    continue;
                }
                other => Err(ExportError::new(EINVAL, format!("unknown command {other}"))),
            };
            // FUA: the write is durable before it is acknowledged. A flush
            // makes everything acknowledged so far durable, this write
            // included.
            let fua = req.flags & CMD_FLAG_FUA != 0 && matches!(req.kind, CMD_WRITE | CMD_WRITE_ZEROES | CMD_TRIM);
            let result = match result {
                Ok(()) if fua => export.flush(),
                other => other,
            };
            let errno = match result {
                Ok(()) => 0,
                Err(e) => {
                    tracing::warn!(errno = e.errno, "NBD request refused: {}", e.message);
                    // With structured replies a read (and block status) is
                    // never answered simply.
                    if self.structured && matches!(req.kind, CMD_READ | CMD_BLOCK_STATUS) {
                        self.error_chunk(req.handle, &e)?;
                        continue;
                    }
                    e.errno
                }
            };
            self.reply(errno, req.handle, None)?;
        }
    }
}

/// The command flags a client may set on `kind` given what was offered
/// (FUA only where durability is offered; DF is harmless without
/// structured replies). Any other flag is refused with EINVAL, as the
/// protocol recommends, rather than silently ignored.
fn allowed_flags(kind: u16, durable: bool) -> u16 {
    let fua = if durable { CMD_FLAG_FUA } else { 0 };
    match kind {
        CMD_WRITE | CMD_TRIM => fua,
        CMD_WRITE_ZEROES => fua | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
        CMD_READ => CMD_FLAG_DF,
        CMD_BLOCK_STATUS => CMD_FLAG_REQ_ONE,
        _ => 0,
    }
}

/// Parses NBD_OPT_INFO/GO data: the export name (the requested info types
/// are accepted and answered with what we always send).
fn parse_info_request(data: &[u8]) -> Option<String> {
    if data.len() < 6 {
        return None;
    }
    let name_len = u32_at(data, 0) as usize;
    let rest = data.get(4..)?;
    let name = rest.get(..name_len)?;
    let after = rest.get(name_len..)?;
    if after.len() < 2 {
        return None;
    }
    let n = u16_at(after, 0) as usize;
    if after.len() != 2 + 2 * n {
        return None;
    }
    String::from_utf8(name.to_vec()).ok()
}

/// Parses NBD_OPT_LIST/SET_META_CONTEXT data: the export name and the
/// queries.
fn parse_meta_request(data: &[u8]) -> Option<(String, Vec<String>)> {
    let name_len = u32_at(data.get(..4)?, 0) as usize;
    let name = String::from_utf8(data.get(4..4 + name_len)?.to_vec()).ok()?;
    let mut rest = data.get(4 + name_len..)?;
    let n = u32_at(rest.get(..4)?, 0);
    rest = &rest[4..];
    let mut queries = Vec::new();
    for _ in 0..n {
        let l = u32_at(rest.get(..4)?, 0) as usize;
        queries.push(String::from_utf8(rest.get(4..4 + l)?.to_vec()).ok()?);
        rest = &rest[4 + l..];
    }
    rest.is_empty().then_some((name, queries))
}
