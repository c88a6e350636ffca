//! Serving tap and export connections: one thread per listener accepts,
//! and every connection, whatever their number, is served on a shared
//! tokio runtime of a fixed size, one for the taps and one for the
//! recovery exports (docs/architecture.md, "Threads"). The replication
//! links run on a third ([`Pool::Links`]). A connection
//! waiting for its client holds no thread; a request calls its export in
//! place, on a thread the runtime can spare while it blocks. Short timers
//! ([`after`]) run on one thread of their own.
//!
//! What this module must not do: speak a protocol (that is
//! [`crate::nbd::server`] and [`crate::native_tap`]).

use crate::conn_limit::ConnectionLimit;
use crate::nbd::export::Exports;
use std::io;
use std::sync::{Arc, OnceLock};

/// Worker threads of a connection runtime: the protocol work is small
/// (headers, copies into buffers), so two keep up with this machine's
/// disks.
const WORKERS: usize = 2;
/// Threads of a runtime that may be blocked in exports at once (a tap
/// write waiting out its VPG's checkpoint hold or, under the block policy,
/// for room in a full send queue; a slow disk read); past them a request
/// waits for one to come free. So more than this many disks blocked at
/// once delay the writes of other VPGs' disks on the same VDSA.
const BLOCKED_AT_MOST: usize = 128;

/// Which runtime serves a listener's connections. Taps and exports apart,
/// so that taps blocked by a full send queue never hold up a failover
/// test's reads; links apart, so that neither holds up replication.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pool {
    /// Tap connections (QEMU's mirror jobs, native filters).
    Taps,
    /// Readers and writers of recovery exports (failover tests).
    Exports,
    /// Replication links, both their ends: a source stream's sender and
    /// the reader of its replies, a target's receiver and ingest
    /// (`crate::replication`). What blocks (ingest, fsync, a journal's
    /// open) runs on the links' own pool of threads, not here.
    Links,
}

type Started = OnceLock<Result<tokio::runtime::Runtime, String>>;

/// The process's connection runtime for `pool`, started on first use.
pub fn runtime(pool: Pool) -> io::Result<&'static tokio::runtime::Runtime> {
    static TAPS: Started = OnceLock::new();
    static EXPORTS: Started = OnceLock::new();
    static LINKS: Started = OnceLock::new();
    let (cell, name) = match pool {
        Pool::Taps => (&TAPS, "vdsa-tap"),
        Pool::Exports => (&EXPORTS, "vdsa-export"),
        Pool::Links => (&LINKS, "vdsa-link"),
    };
    let rt = cell.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(WORKERS)
            .max_blocking_threads(BLOCKED_AT_MOST)
            .thread_name(name)
            .enable_io()
            .enable_time()
            .build()
            .map_err(|e| e.to_string())
    });
    rt.as_ref().map_err(|e| io::Error::other(format!("starting the {name} runtime: {e}")))
}

/// Runs `f` once `delay` has passed, on the process's timer thread: a
/// timer per held checkpoint costs no thread. Not on the connection
/// runtime: a hold limit must fire even while every thread that runtime may
/// block is blocked in a tap write waiting for that hold to end. `f` must
/// be short (it delays the timers after it). If the timer thread cannot
/// start, a thread of its own sleeps instead.
pub fn after(delay: std::time::Duration, f: impl FnOnce() + Send + 'static) {
    static TIMERS: OnceLock<Option<tokio::runtime::Handle>> = OnceLock::new();
    let timers = TIMERS.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel();
        let started = std::thread::Builder::new().name("vdsa-timers".into()).spawn(move || {
            match tokio::runtime::Builder::new_current_thread().enable_time().build() {
                Ok(rt) => {
                    let _ = tx.send(Some(rt.handle().clone()));
                    rt.block_on(std::future::pending::<()>());
                }
                Err(e) => {
                    tracing::warn!("starting the timer thread: {e}");
                    let _ = tx.send(None);
                }
            }
        });
        started.ok().and_then(|_| rx.recv().ok().flatten())
    });
    match timers {
        Some(h) => {
            h.spawn(async move {
                tokio::time::sleep(delay).await;
                f();
            });
        }
        None => {
            std::thread::spawn(move || {
                std::thread::sleep(delay);
                f();
            });
        }
    }
}

/// A listening socket.
#[derive(Debug)]
pub enum Listener {
    Unix(std::os::unix::net::UnixListener),
    Tcp(std::net::TcpListener),
}

/// An accepted connection, not yet handed to the runtime.
#[derive(Debug)]
pub enum Accepted {
    Unix(std::os::unix::net::UnixStream),
    Tcp(std::net::TcpStream),
}

impl Listener {
    fn accept(&self) -> io::Result<Accepted> {
        match self {
            Listener::Unix(l) => l.accept().map(|(c, _)| Accepted::Unix(c)),
            Listener::Tcp(l) => l.accept().map(|(c, _)| {
                let _ = c.set_nodelay(true);
                Accepted::Tcp(c)
            }),
        }
    }
}

/// The protocol a listener's connections speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// NBD: QEMU's block mirror as a tap, or a reader of recovery exports.
    Nbd,
    /// The native tap protocol (docs/tap-protocol.md).
    NativeTap,
}

/// Serves each connection `listener` accepts on `pool`'s runtime, as many
/// at once as `limit` allows: past that a connection is closed at once.
/// `what` names the connections in the log.
pub fn accept_each(
    listener: Listener,
    exports: Arc<Exports>,
    limit: Arc<ConnectionLimit>,
    pool: Pool,
    protocol: Protocol,
    what: &'static str,
) -> io::Result<()> {
    let rt = runtime(pool)?;
    std::thread::Builder::new().name("vdsa-accept".into()).spawn(move || loop {
        let conn = match listener.accept() {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("accepting {what}: {e}");
                std::thread::sleep(std::time::Duration::from_millis(50));
                continue;
            }
        };
        let Some(slot) = limit.try_take() else { continue };
        let exports = exports.clone();
        rt.spawn(async move {
            let end = serve(conn, &exports, protocol).await;
            log_end(what, end);
            drop(slot);
        });
    })?;
    Ok(())
}

/// How a connection ended, for the log.
enum End {
    Nbd(crate::nbd::server::Ending),
    Native(crate::native_tap::Ending),
}

async fn serve(conn: Accepted, exports: &Exports, protocol: Protocol) -> io::Result<End> {
    match conn {
        Accepted::Unix(c) => {
            c.set_nonblocking(true)?;
            let (r, w) = tokio::net::UnixStream::from_std(c)?.into_split();
            speak(r, w, exports, protocol).await
        }
        Accepted::Tcp(c) => {
            c.set_nonblocking(true)?;
            let (r, w) = tokio::net::TcpStream::from_std(c)?.into_split();
            speak(r, w, exports, protocol).await
        }
    }
}

async fn speak<R, W>(r: R, w: W, exports: &Exports, protocol: Protocol) -> io::Result<End>
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    Ok(match protocol {
        Protocol::Nbd => End::Nbd(crate::nbd::server::serve(r, w, exports).await?),
        Protocol::NativeTap => End::Native(crate::native_tap::serve(r, w, exports).await?),
    })
}

fn log_end(what: &str, end: io::Result<End>) {
    use crate::{native_tap::Ending as NativeEnding, nbd::server::Ending};
    match end {
        Ok(End::Nbd(Ending::Protocol(why))) => tracing::warn!("{what}: one dropped: {why}"),
        Ok(End::Native(NativeEnding::Refused(why))) => tracing::warn!("{what}: one refused: {why}"),
        Ok(End::Nbd(end)) => tracing::info!("{what}: one ended: {end:?}"),
        Ok(End::Native(end)) => tracing::info!("{what}: one ended: {end:?}"),
        Err(e) => tracing::warn!("{what}: one failed: {e}"),
    }
}
