//! Reading a payload whose length the peer announced (a tap's write, a
//! replication frame) into a buffer: without zeroing the buffer first (a
//! payload is up to megabytes, and the memset showed in profiles), and
//! with a short payload named as such.

use std::fmt::Display;
use std::io::{self, Read};

/// Reads exactly `len` bytes from `r` into `buf` (cleared first; its
/// capacity is reused). A peer that goes away sooner is an
/// `UnexpectedEof` naming `inside` and how much arrived.
pub(crate) fn read_payload<R: Read + ?Sized>(
    r: &mut R,
    len: u64,
    buf: &mut Vec<u8>,
    inside: &dyn Display,
) -> io::Result<()> {
    make_room(buf, len);
    r.take(len).read_to_end(buf)?;
    whole(buf, len, inside)
}

/// [`read_payload`] from a tokio stream.
pub(crate) async fn read_payload_async<R: tokio::io::AsyncRead + Unpin + ?Sized>(
    r: &mut R,
    len: u64,
    buf: &mut Vec<u8>,
    inside: &(dyn Display + Sync),
) -> io::Result<()> {
    use tokio::io::AsyncReadExt;
    make_room(buf, len);
    (&mut *r).take(len).read_to_end(buf).await?;
    whole(buf, len, inside)
}

/// Empties `buf` and makes room for `len` bytes (its capacity reused).
fn make_room(buf: &mut Vec<u8>, len: u64) {
    buf.clear();
    buf.reserve(usize::try_from(len).unwrap_or(usize::MAX));
}

/// Whether all `len` bytes arrived; if not, an `UnexpectedEof` naming
/// `inside` and how much did.
fn whole(buf: &[u8], len: u64, inside: &dyn Display) -> io::Result<()> {
    if buf.len() as u64 != len {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("the peer went away inside {inside} ({} of {len} bytes)", buf.len()),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_payload_reads_whole_or_names_what_was_short() {
        let mut buf = vec![9u8; 3];
        read_payload(&mut &b"abcdef"[..], 4, &mut buf, &"a test").expect("four bytes");
        assert_eq!(buf, b"abcd");
        let short = read_payload(&mut &b"ab"[..], 4, &mut buf, &"a test").expect_err("short");
        assert_eq!(short.kind(), io::ErrorKind::UnexpectedEof);
        assert!(short.to_string().contains("inside a test (2 of 4 bytes)"), "{short}");
    }
}
