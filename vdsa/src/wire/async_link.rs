//! The TLS link's two halves for a task on a tokio runtime
//! (docs/architecture.md, "Threads"): the same records and frames as the
//! blocking halves of [`super::tls`], but a link waiting for its peer holds
//! no thread. A read or a write that waits longer than the link's timeout
//! (three heartbeats) fails with `TimedOut`, which the frame layer
//! ([`super::frame`]) reports as a silent peer and the sender as a stalled
//! link.
//!
//! What this module must not do: decide anything about the replication
//! protocol (that is [`crate::replication`]).

use super::tls::{self, peer_closed, poisoned, CipherIn, Pieces};
use rustls::{ClientConfig, Connection, ServerConfig};
use std::io::{self, BufRead};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

/// Completes the handshake as a client with a VDSA (its certificate must
/// name [`tls::NODE_NAME`]) within `timeout`.
pub async fn connect(
    cfg: Arc<ClientConfig>,
    tcp: TcpStream,
    timeout: Duration,
) -> io::Result<(AsyncLinkReader, AsyncLinkWriter)> {
    handshake(tls::client_connection(cfg, tls::NODE_NAME)?, tcp, timeout).await
}

/// Completes the handshake as a server within `timeout`. A client
/// certificate not signed by a trusted peer CA fails here.
pub async fn accept(
    cfg: Arc<ServerConfig>,
    tcp: TcpStream,
    timeout: Duration,
) -> io::Result<(AsyncLinkReader, AsyncLinkWriter)> {
    handshake(tls::server_connection(cfg)?, tcp, timeout).await
}

/// Encrypted bytes rustls may hold for the socket.
const SENDABLE_TLS_LIMIT: usize = 1 << 20;

fn timed_out(what: &str, t: Duration) -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, format!("{what} took longer than {} ms", t.as_millis()))
}

async fn handshake(
    mut conn: Connection,
    mut tcp: TcpStream,
    timeout: Duration,
) -> io::Result<(AsyncLinkReader, AsyncLinkWriter)> {
    let mut cipher = CipherIn::new();
    let exchange = async {
        let mut out = Vec::new();
        loop {
            while conn.wants_write() {
                conn.write_tls(&mut out)?;
            }
            if !out.is_empty() {
                tcp.write_all(&out).await?;
                out.clear();
            }
            if !conn.is_handshaking() {
                return Ok(());
            }
            if !conn.wants_read() {
                return Err(io::Error::other("the TLS handshake stalled: it wants neither to read nor to write"));
            }
            let n = tcp.read(&mut cipher.buf).await?;
            if n == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the peer closed the link in the handshake"));
            }
            cipher.filled(n);
            // Records after the handshake (the peer's first frames) stay
            // here for the reader: rustls holds only so much plaintext.
            while conn.is_handshaking() && !cipher.is_empty() {
                if let Err(e) = cipher.feed(&mut conn) {
                    // The alert that says why goes to the peer first.
                    while conn.wants_write() && conn.write_tls(&mut out).is_ok() {}
                    let _ = tcp.write_all(&out).await;
                    return Err(e);
                }
            }
        }
    };
    tokio::time::timeout(timeout, exchange).await.map_err(|_| timed_out("the TLS handshake", timeout))??;
    // rustls holds the records of up to a mebibyte of a message before
    // the writer hands them to the socket in one vectored write (its
    // default of 64 KiB made a system call, and a wake-up of the peer's
    // loopback, per four records).
    conn.set_buffer_limit(Some(SENDABLE_TLS_LIMIT));
    let conn = Arc::new(Mutex::new(conn));
    let (r, w) = tcp.into_split();
    Ok((AsyncLinkReader { conn: conn.clone(), tcp: r, cipher, timeout }, AsyncLinkWriter { conn, tcp: w, timeout }))
}

/// The receiving half of a link.
#[derive(Debug)]
pub struct AsyncLinkReader {
    conn: Arc<Mutex<Connection>>,
    tcp: OwnedReadHalf,
    cipher: CipherIn,
    timeout: Duration,
}

impl AsyncLinkReader {
    /// Appends exactly `n` bytes of plaintext to `out`, straight from
    /// rustls's buffer (no zeroed buffer in between).
    pub async fn read_exact_into(&mut self, n: usize, out: &mut Vec<u8>) -> io::Result<()> {
        let want = out.len().saturating_add(n);
        out.reserve(n);
        while out.len() < want {
            let took = self.cipher.plaintext(&self.conn, |r| {
                let chunk = r.fill_buf()?;
                let k = chunk.len().min(want - out.len());
                out.extend_from_slice(&chunk[..k]);
                r.consume(k);
                Ok(k)
            })?;
            match took {
                // The peer closed the TLS session cleanly.
                Some(0) => return Err(peer_closed()),
                Some(_) => {}
                None => self.fill().await?,
            }
        }
        Ok(())
    }

    /// Reads ciphertext from the socket; the lock is not held meanwhile,
    /// so the writer is never held up by a quiet peer.
    async fn fill(&mut self) -> io::Result<()> {
        let read = self.tcp.read(&mut self.cipher.buf);
        let n = tokio::time::timeout(self.timeout, read).await.map_err(|_| timed_out("a read", self.timeout))??;
        if n == 0 {
            return Err(peer_closed());
        }
        self.cipher.filled(n);
        Ok(())
    }
}

/// The sending half of a link.
#[derive(Debug)]
pub struct AsyncLinkWriter {
    conn: Arc<Mutex<Connection>>,
    tcp: OwnedWriteHalf,
    timeout: Duration,
}

impl AsyncLinkWriter {
    /// Sends `pieces` as one stream of bytes, so a message need not be
    /// gathered into one buffer first. rustls encrypts them into its
    /// records (the only copy in user space) and the records go from its
    /// buffer to the socket: a socket that takes no more leaves them there
    /// until it is writable again, rather than being copied out to wait.
    pub async fn write_all_pieces(&mut self, pieces: &[&[u8]]) -> io::Result<()> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let mut left = Pieces::new(pieces);
        while self.send_some(&mut left)? {
            tokio::time::timeout_at(deadline, self.tcp.writable())
                .await
                .map_err(|_| timed_out("a write", self.timeout))??;
        }
        Ok(())
    }

    /// Encrypts and sends what the socket takes now. True: it would block
    /// with bytes left (rustls holds them).
    fn send_some(&mut self, left: &mut Pieces<'_>) -> io::Result<bool> {
        let mut conn = self.conn.lock().map_err(|_| poisoned())?;
        loop {
            // Records first: those of earlier pieces, and any the reading
            // half made rustls owe the peer (an alert, a key update).
            while conn.wants_write() {
                match conn.write_tls(&mut SocketNow(&self.tcp)) {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(true),
                    Err(e) => return Err(e),
                }
            }
            if left.is_empty() {
                return Ok(false);
            }
            left.give_to(&mut conn)?;
        }
    }

    /// Ends the sending direction (the peer reads the end of the link).
    pub async fn shutdown(&mut self) {
        let _ = self.tcp.shutdown().await;
    }
}

/// The socket as rustls's sink for records: takes what it can without
/// waiting (`WouldBlock` otherwise, and rustls keeps the rest).
struct SocketNow<'a>(&'a OwnedWriteHalf);

impl io::Write for SocketNow<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.try_write(buf)
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        self.0.try_write_vectored(bufs)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
