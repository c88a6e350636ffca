//! The NBD protocol state of one connection, apart from its I/O: the
//! driver in [`super::server`] reads whole units from the client (its
//! flags, an option with its data, a request with its payload) and hands
//! them here; the replies collect in [`Session::out`] until the driver
//! sends them. Kept apart so that the protocol's decisions read (and are
//! checked) without the asynchronous I/O around them (docs/architecture.md,
//! "Threads").

use super::export::{BlockExport, ExportError, Exports, Extent};
use super::proto::*;
use std::io;
use std::sync::Arc;

/// Longest option payload accepted in the handshake.
pub(super) const MAX_OPTION: u32 = 64 << 10;

/// The most descriptors one block status reply carries (the protocol lets
/// a server answer less than asked; the client asks again from there).
const MAX_EXTENTS: usize = 4096;

/// The context id `base:allocation` gets on a connection.
const ALLOCATION_CONTEXT: u32 = 1;

/// What the handshake does after an option.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum AfterOption {
    /// Another option follows.
    More,
    /// An export was chosen: the transmission phase begins.
    Transmission,
    /// The client aborted (the reply is a courtesy: it may be gone).
    Abort,
}

/// What the transmission phase does after a request.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum AfterRequest {
    More,
    /// NBD_CMD_DISC: the connection ends, unanswered.
    Disconnect,
}

/// The export a connection chose, and what it offers.
struct Chosen {
    export: Arc<dyn BlockExport>,
    /// `base:allocation` was selected for it.
    allocation: bool,
    size: u64,
    durable: bool,
    keeps_buffers: bool,
}

pub(super) fn protocol(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

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

/// One connection's protocol state.
pub(super) struct Session<'a> {
    exports: &'a Exports,
    no_zeroes: bool,
    /// NBD_OPT_STRUCTURED_REPLY was negotiated.
    structured: bool,
    /// The export the last NBD_OPT_SET_META_CONTEXT selected
    /// `base:allocation` for (block status is allowed on it only).
    allocation_for: Option<String>,
    chosen: Option<Chosen>,
    /// Replies not sent yet.
    pub(super) out: Vec<u8>,
    /// A read's buffer, and a write's when the export does not keep it.
    buf: Vec<u8>,
    /// A large read's data, to be sent right after `out` (not copied into
    /// it).
    data: Option<Vec<u8>>,
}

/// Reads of at least this many bytes are sent from their own buffer.
const SEND_APART: usize = 64 << 10;

impl<'a> Session<'a> {
    /// A new connection; the server's greeting is in `out`.
    pub(super) fn new(exports: &'a Exports) -> Session<'a> {
        let mut out = Vec::with_capacity(18);
        out.extend_from_slice(&NBDMAGIC.to_be_bytes());
        out.extend_from_slice(&IHAVEOPT.to_be_bytes());
        out.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        Session {
            exports,
            no_zeroes: false,
            structured: false,
            allocation_for: None,
            chosen: None,
            out,
            buf: Vec::new(),
            data: None,
        }
    }

    /// The client's flags, the first thing it sends.
    pub(super) fn client_flags(&mut self, client_flags: u32) -> io::Result<()> {
        if client_flags & CLIENT_FIXED_NEWSTYLE == 0 || client_flags & !(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES) != 0
        {
            return Err(protocol(format!("unsupported client flags {client_flags:#x}")));
        }
        self.no_zeroes = client_flags & CLIENT_NO_ZEROES != 0;
        Ok(())
    }

    /// An option's header: the option and the length of its data.
    pub(super) fn option_header(header: &[u8; 16]) -> io::Result<(u32, u32)> {
        let magic = u64::from_be_bytes([
            header[0], header[1], header[2], header[3], header[4], header[5], header[6], header[7],
        ]);
        if magic != IHAVEOPT {
            return Err(protocol(format!("bad option magic {magic:#x}")));
        }
        let (option, len) = (u32_at(header, 8), u32_at(header, 12));
        if len > MAX_OPTION {
            return Err(protocol(format!("option {option} of {len} bytes")));
        }
        Ok((option, len))
    }

    fn option_reply(&mut self, option: u32, kind: u32, data: &[u8]) {
        self.out.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
        self.out.extend_from_slice(&option.to_be_bytes());
        self.out.extend_from_slice(&kind.to_be_bytes());
        self.out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        self.out.extend_from_slice(data);
    }

    fn choose(&mut self, export: Arc<dyn BlockExport>, name: &str) {
        self.chosen = Some(Chosen {
            allocation: self.allocation_for.as_deref() == Some(name),
            size: export.size(),
            durable: export.offers_durability(),
            keeps_buffers: export.keeps_write_buffers(),
            export,
        });
    }

    /// One option of the handshake, with its data.
    pub(super) fn option(&mut self, option: u32, data: &[u8]) -> io::Result<AfterOption> {
        match option {
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(data).into_owned();
                let Some(export) = self.exports.find(&name) else {
                    return Err(protocol(format!("no export named {name:?}")));
                };
                self.out.extend_from_slice(&export.size().to_be_bytes());
                self.out.extend_from_slice(&transmission_flags(export.as_ref(), self.structured).to_be_bytes());
                if !self.no_zeroes {
                    self.out.extend_from_slice(&[0u8; 124]);
                }
                self.choose(export, &name);
                return Ok(AfterOption::Transmission);
            }
            OPT_ABORT => {
                self.option_reply(option, REP_ACK, &[]);
                return Ok(AfterOption::Abort);
            }
            OPT_LIST => {
                if !data.is_empty() {
                    self.option_reply(option, REP_ERR_INVALID, b"NBD_OPT_LIST takes no data");
                    return Ok(AfterOption::More);
                }
                for name in self.exports.names() {
                    let mut d = (name.len() as u32).to_be_bytes().to_vec();
                    d.extend_from_slice(name.as_bytes());
                    self.option_reply(option, REP_SERVER, &d);
                }
                self.option_reply(option, REP_ACK, &[]);
            }
            OPT_INFO | OPT_GO => {
                let Some(name) = parse_info_request(data) else {
                    self.option_reply(option, REP_ERR_INVALID, b"malformed NBD_OPT_INFO/GO");
                    return Ok(AfterOption::More);
                };
                let Some(export) = self.exports.find(&name) else {
                    self.option_reply(option, REP_ERR_UNKNOWN, format!("no export named {name:?}").as_bytes());
                    return Ok(AfterOption::More);
                };
                let mut info = INFO_EXPORT.to_be_bytes().to_vec();
                info.extend_from_slice(&export.size().to_be_bytes());
                info.extend_from_slice(&transmission_flags(export.as_ref(), self.structured).to_be_bytes());
                self.option_reply(option, REP_INFO, &info);
                // Minimum 1: sub-4 KiB writes arrive as they are, with no
                // read-modify-write by the client.
                let mut bs = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                bs.extend_from_slice(&1u32.to_be_bytes());
                bs.extend_from_slice(&4096u32.to_be_bytes());
                bs.extend_from_slice(&MAX_REQUEST.to_be_bytes());
                self.option_reply(option, REP_INFO, &bs);
                self.option_reply(option, REP_ACK, &[]);
                if option == OPT_GO {
                    self.choose(export, &name);
                    return Ok(AfterOption::Transmission);
                }
            }
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    self.option_reply(option, REP_ERR_INVALID, b"NBD_OPT_STRUCTURED_REPLY takes no data");
                    return Ok(AfterOption::More);
                }
                self.structured = true;
                self.option_reply(option, REP_ACK, &[]);
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => self.meta_context(option, data),
            _ => self.option_reply(option, REP_ERR_UNSUP, &[]),
        }
        Ok(AfterOption::More)
    }

    /// NBD_OPT_LIST_META_CONTEXT and NBD_OPT_SET_META_CONTEXT: the only
    /// context is `base:allocation`.
    fn meta_context(&mut self, option: u32, data: &[u8]) {
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
        if self.exports.find(&name).is_none() {
            return self.option_reply(option, REP_ERR_UNKNOWN, format!("no export named {name:?}").as_bytes());
        }
        // LIST with no query, or with `base:`, lists everything.
        let wanted = queries.iter().any(|q| q == BASE_ALLOCATION)
            || (option == OPT_LIST_META_CONTEXT && (queries.is_empty() || queries.iter().any(|q| q == "base:")));
        if wanted {
            let id = if option == OPT_SET_META_CONTEXT { ALLOCATION_CONTEXT } else { 0 };
            let mut d = id.to_be_bytes().to_vec();
            d.extend_from_slice(BASE_ALLOCATION.as_bytes());
            self.option_reply(option, REP_META_CONTEXT, &d);
            if option == OPT_SET_META_CONTEXT {
                self.allocation_for = Some(name);
            }
        }
        self.option_reply(option, REP_ACK, &[])
    }

    /// The payload that follows `req` (a write's), or the protocol error
    /// that drops the peer (a write too long to skip safely).
    pub(super) fn payload_len(&self, req: &Request) -> io::Result<u64> {
        if req.kind != CMD_WRITE {
            return Ok(0);
        }
        if req.length > MAX_REQUEST {
            return Err(protocol(format!("write of {} bytes exceeds {MAX_REQUEST}", req.length)));
        }
        Ok(u64::from(req.length))
    }

    /// The buffer a write's payload is read into: a fresh one when the
    /// export keeps it (no copy after), else the session's own.
    pub(super) fn payload_buffer(&mut self) -> Vec<u8> {
        match &self.chosen {
            Some(c) if c.keeps_buffers => Vec::new(),
            _ => std::mem::take(&mut self.buf),
        }
    }

    /// One request of the transmission phase, with its payload (empty but
    /// for a write). Errors are the connection's (a protocol breach);
    /// an export's refusal is answered.
    pub(super) fn request(&mut self, req: Request, payload: Vec<u8>) -> io::Result<AfterRequest> {
        let Some(chosen) = &self.chosen else {
            return Err(protocol("a request before an export was chosen"));
        };
        let export = chosen.export.clone();
        let (size, durable, allocation, keeps_buffers) =
            (chosen.size, chosen.durable, chosen.allocation, chosen.keeps_buffers);
        let (off, len) = (req.offset, u64::from(req.length));
        let in_range = off.checked_add(len).is_some_and(|end| end <= size);
        let unknown_flags = req.flags & !allowed_flags(req.kind, durable);
        let result = match req.kind {
            // Refused after its payload was read, so the stream stays in
            // step.
            CMD_WRITE if unknown_flags != 0 => {
                self.give_back(payload, keeps_buffers);
                Err(ExportError::new(EINVAL, format!("flags {unknown_flags:#x} are not offered for a write")))
            }
            CMD_READ | CMD_FLUSH | CMD_TRIM | CMD_WRITE_ZEROES | CMD_BLOCK_STATUS if unknown_flags != 0 => Err(
                ExportError::new(EINVAL, format!("flags {unknown_flags:#x} are not offered for command {}", req.kind)),
            ),
            CMD_DISC => return Ok(AfterRequest::Disconnect),
            CMD_WRITE => {
                if !in_range {
                    self.give_back(payload, keeps_buffers);
                    Err(ExportError::new(ENOSPC, format!("write {off}+{len} beyond the end ({size})")))
                } else if keeps_buffers {
                    export.write_owned(off, payload)
                } else {
                    let done = export.write(off, &payload);
                    self.buf = payload;
                    done
                }
            }
            CMD_READ => {
                if req.length > MAX_REQUEST {
                    Err(ExportError::new(EOVERFLOW, format!("read of {len} bytes exceeds {MAX_REQUEST}")))
                } else if !in_range {
                    Err(ExportError::new(EINVAL, format!("read {off}+{len} beyond the end ({size})")))
                } else {
                    let mut buf = std::mem::take(&mut self.buf);
                    buf.resize(req.length as usize, 0);
                    let read = export.read(off, &mut buf);
                    if read.is_ok() {
                        if self.structured {
                            // One data chunk: nothing to fragment, so DF
                            // holds whatever the client asked.
                            let h = chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, req.handle, 8 + req.length);
                            self.out.extend_from_slice(&h);
                            self.out.extend_from_slice(&off.to_be_bytes());
                        } else {
                            self.out.extend_from_slice(&simple_reply(0, req.handle));
                        }
                        if buf.len() >= SEND_APART {
                            self.data = Some(buf);
                        } else {
                            self.out.extend_from_slice(&buf);
                            self.buf = buf;
                        }
                        return Ok(AfterRequest::More);
                    }
                    self.buf = buf;
                    read
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
                self.block_status(export.as_ref(), req.handle, off, len, req.flags & CMD_FLAG_REQ_ONE != 0);
                return Ok(AfterRequest::More);
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
                    self.error_chunk(req.handle, &e);
                    return Ok(AfterRequest::More);
                }
                e.errno
            }
        };
        self.out.extend_from_slice(&simple_reply(errno, req.handle));
        Ok(AfterRequest::More)
    }

    /// The export chosen, once the transmission phase began.
    pub(super) fn export(&self) -> Option<Arc<dyn BlockExport>> {
        self.chosen.as_ref().map(|c| c.export.clone())
    }

    /// A large read's data, to be sent right after [`Session::out`]; give
    /// the buffer back with [`Session::data_sent`].
    pub(super) fn take_data(&mut self) -> Option<Vec<u8>> {
        self.data.take()
    }

    pub(super) fn data_sent(&mut self, buf: Vec<u8>) {
        self.buf = buf;
    }

    /// Keeps a payload's buffer for the next request when it is ours.
    fn give_back(&mut self, payload: Vec<u8>, keeps_buffers: bool) {
        if !keeps_buffers {
            self.buf = payload;
        }
    }

    /// A structured error chunk (the last of its reply).
    fn error_chunk(&mut self, handle: u64, e: &ExportError) {
        let msg = &e.message.as_bytes()[..e.message.len().min(4096)];
        self.out.extend_from_slice(&chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_ERROR, handle, 6 + msg.len() as u32));
        self.out.extend_from_slice(&e.errno.to_be_bytes());
        self.out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
        self.out.extend_from_slice(msg);
    }

    /// Answers NBD_CMD_BLOCK_STATUS for `off..off + len` (in range).
    fn block_status(&mut self, export: &dyn BlockExport, handle: u64, off: u64, len: u64, one: bool) {
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
        self.out.extend_from_slice(&chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, handle, payload));
        self.out.extend_from_slice(&ALLOCATION_CONTEXT.to_be_bytes());
        for (l, s) in out {
            self.out.extend_from_slice(&l.to_be_bytes());
            self.out.extend_from_slice(&s.to_be_bytes());
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
