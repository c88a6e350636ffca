//! An NBD server (fixed newstyle handshake; simple replies, or structured
//! ones with the `base:allocation` metadata context when the client asks)
//! over any tokio byte stream, serving named exports
//! ([`super::export`]): many connections on a few threads (see
//! `vdsa::serving`). The protocol logic, apart from the I/O, is
//! [`super::session`].
//!
//! Requests are handled one at a time in arrival order and each is answered
//! before the next is read: replies in order are always allowed, and a
//! write is acknowledged only once its export accepted it (and, with FUA,
//! made it durable). Hostile input
//! (bad magic, oversized lengths, ranges beyond the end, unknown commands, a
//! peer that vanishes mid-request) gets an NBD error or a clean disconnect;
//! a write whose payload did not arrive whole is never applied.

use super::export::Exports;
use super::proto::{Request, CMD_TRIM, CMD_WRITE, CMD_WRITE_ZEROES};
use super::session::{AfterOption, AfterRequest, Session};
use crate::conn_task::{blocking, peer_gone, send_out};
use crate::payload::read_payload_async;
use std::io;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

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
    if peer_gone(&e) {
        return Ok(Ending::Closed);
    }
    match e.kind() {
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
/// exports are called in place (`conn_task::blocking`: a slow disk read
/// holds one thread, and the runtime moves the other connections off it).
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

async fn drive<R, W>(s: &mut Session<'_>, r: &mut tokio::io::BufReader<R>, w: &mut W) -> io::Result<Ending>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    async fn send<W: AsyncWrite + Unpin>(s: &mut Session<'_>, w: &mut W) -> io::Result<()> {
        send_out(&mut s.out, w).await
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
        // A peer gone here is `Ending::Closed` (see `ending`).
        r.read_exact(&mut header).await?;
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
