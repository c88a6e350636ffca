//! What a connection's task needs around its protocol's logic: calling an
//! export where blocking is allowed, and sending the replies collected
//! (docs/architecture.md, "Threads").

use std::io;

/// Runs `f` where blocking is allowed: in place on a multi-threaded
/// runtime's worker (its other tasks move to another thread), else as is.
pub(crate) fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// Whether an I/O error means the peer went away (it closed or reset the
/// connection): a normal end of a connection, not a failure.
pub(crate) fn peer_gone(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe)
}

/// Reply buffers beyond this size are not kept between sends.
const KEEP_REPLY_BUFFER: usize = 1 << 20;

/// Sends the replies collected in `out` and empties it (keeping a buffer
/// of modest size for the next ones).
pub(crate) async fn send_out<W: tokio::io::AsyncWrite + Unpin>(out: &mut Vec<u8>, w: &mut W) -> io::Result<()> {
    use tokio::io::AsyncWriteExt;
    w.write_all(out).await?;
    out.clear();
    if out.capacity() > KEEP_REPLY_BUFFER {
        out.shrink_to(KEEP_REPLY_BUFFER);
    }
    w.flush().await
}
