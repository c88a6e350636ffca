//! A small blocking NBD client: fixed newstyle handshake with NBD_OPT_GO,
//! simple replies, one request at a time or a window of writes in flight.
//! It plays the guest when tests and benchmarks write through QEMU.

use super::proto::*;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

#[derive(Debug)]
pub struct NbdClient {
    r: BufReader<Box<dyn ReadStream>>,
    w: BufWriter<Box<dyn WriteStream>>,
    pub size: u64,
    pub flags: u16,
    next_handle: u64,
}

pub trait ReadStream: Read + Send + std::fmt::Debug {}
impl<T: Read + Send + std::fmt::Debug> ReadStream for T {}
pub trait WriteStream: Write + Send + std::fmt::Debug {}
impl<T: Write + Send + std::fmt::Debug> WriteStream for T {}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// An NBD error reply.
pub fn nbd_error(errno: u32) -> io::Error {
    io::Error::other(format!("NBD error {errno}"))
}

impl NbdClient {
    pub fn connect_unix(path: &Path, export: &str) -> io::Result<NbdClient> {
        let s = UnixStream::connect(path)?;
        let r = s.try_clone()?;
        Self::handshake(Box::new(r), Box::new(s), export)
    }

    pub fn connect_tcp(addr: &str, export: &str) -> io::Result<NbdClient> {
        let s = std::net::TcpStream::connect(addr)?;
        s.set_nodelay(true)?;
        let r = s.try_clone()?;
        Self::handshake(Box::new(r), Box::new(s), export)
    }

    fn handshake(r: Box<dyn ReadStream>, w: Box<dyn WriteStream>, export: &str) -> io::Result<NbdClient> {
        let mut c = NbdClient {
            r: BufReader::with_capacity(1 << 20, r),
            w: BufWriter::with_capacity(1 << 20, w),
            size: 0,
            flags: 0,
            next_handle: 1,
        };
        let mut hello = [0u8; 18];
        c.r.read_exact(&mut hello)?;
        if hello[..8] != NBDMAGIC.to_be_bytes() || hello[8..16] != IHAVEOPT.to_be_bytes() {
            return Err(invalid("not an NBD newstyle server"));
        }
        c.w.write_all(&(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES).to_be_bytes())?;
        let mut data = (export.len() as u32).to_be_bytes().to_vec();
        data.extend_from_slice(export.as_bytes());
        data.extend_from_slice(&0u16.to_be_bytes());
        c.w.write_all(&IHAVEOPT.to_be_bytes())?;
        c.w.write_all(&OPT_GO.to_be_bytes())?;
        c.w.write_all(&(data.len() as u32).to_be_bytes())?;
        c.w.write_all(&data)?;
        c.w.flush()?;
        loop {
            let mut h = [0u8; 20];
            c.r.read_exact(&mut h)?;
            if h[..8] != OPT_REPLY_MAGIC.to_be_bytes() {
                return Err(invalid("bad option reply magic"));
            }
            let kind = u32::from_be_bytes([h[12], h[13], h[14], h[15]]);
            let len = u32::from_be_bytes([h[16], h[17], h[18], h[19]]) as usize;
            if len > 1 << 16 {
                return Err(invalid("option reply too long"));
            }
            let mut d = vec![0u8; len];
            c.r.read_exact(&mut d)?;
            match kind {
                REP_ACK => return Ok(c),
                REP_INFO if len >= 12 && u16::from_be_bytes([d[0], d[1]]) == INFO_EXPORT => {
                    let mut s = [0u8; 8];
                    s.copy_from_slice(&d[2..10]);
                    c.size = u64::from_be_bytes(s);
                    c.flags = u16::from_be_bytes([d[10], d[11]]);
                }
                REP_INFO => {}
                k if k & (1 << 31) != 0 => {
                    return Err(invalid(format!(
                        "server refused export {export:?}: error {k:#x} {}",
                        String::from_utf8_lossy(&d)
                    )))
                }
                other => return Err(invalid(format!("unexpected option reply {other}"))),
            }
        }
    }

    fn send(&mut self, kind: u16, flags: u16, offset: u64, length: u32, data: Option<&[u8]>) -> io::Result<u64> {
        let handle = self.next_handle;
        self.next_handle += 1;
        let req = Request { flags, kind, handle, offset, length };
        self.w.write_all(&req.encode())?;
        if let Some(d) = data {
            self.w.write_all(d)?;
        }
        Ok(handle)
    }

    fn receive(&mut self, handle: u64, data: Option<&mut [u8]>) -> io::Result<()> {
        let mut h = [0u8; 16];
        self.r.read_exact(&mut h)?;
        if h[..4] != SIMPLE_REPLY_MAGIC.to_be_bytes() {
            return Err(invalid("bad reply magic"));
        }
        let errno = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
        let mut hb = [0u8; 8];
        hb.copy_from_slice(&h[8..16]);
        if u64::from_be_bytes(hb) != handle {
            return Err(invalid("reply for another request"));
        }
        if errno != 0 {
            return Err(nbd_error(errno));
        }
        if let Some(d) = data {
            self.r.read_exact(d)?;
        }
        Ok(())
    }

    fn call(&mut self, kind: u16, flags: u16, offset: u64, length: u32, data: Option<&[u8]>) -> io::Result<()> {
        let h = self.send(kind, flags, offset, length, data)?;
        self.w.flush()?;
        self.receive(h, None)
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.call(CMD_WRITE, 0, offset, data.len() as u32, Some(data))
    }

    /// A write with FUA: acknowledged only once durable.
    pub fn write_fua(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.call(CMD_WRITE, CMD_FLAG_FUA, offset, data.len() as u32, Some(data))
    }

    /// Sends all writes, then reads all replies: up to `writes.len()` in
    /// flight, as a guest with a queue depth does. Replies may come in any
    /// order; they are matched by handle.
    pub fn write_many(&mut self, writes: &[(u64, &[u8])]) -> io::Result<()> {
        let mut pending = std::collections::HashSet::with_capacity(writes.len());
        for (off, d) in writes {
            pending.insert(self.send(CMD_WRITE, 0, *off, d.len() as u32, Some(d))?);
        }
        self.w.flush()?;
        while !pending.is_empty() {
            let (errno, handle) = self.read_reply()?;
            if !pending.remove(&handle) {
                return Err(invalid(format!("reply for unknown request {handle}")));
            }
            if errno != 0 {
                return Err(nbd_error(errno));
            }
        }
        Ok(())
    }

    pub fn write_zeroes(&mut self, offset: u64, len: u32, fast: bool) -> io::Result<()> {
        let flags = if fast { CMD_FLAG_FAST_ZERO } else { 0 };
        self.call(CMD_WRITE_ZEROES, flags, offset, len, None)
    }

    pub fn trim(&mut self, offset: u64, len: u32) -> io::Result<()> {
        self.call(CMD_TRIM, 0, offset, len, None)
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.call(CMD_FLUSH, 0, 0, 0, None)
    }

    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let h = self.send(CMD_READ, 0, offset, buf.len() as u32, None)?;
        self.w.flush()?;
        self.receive(h, Some(buf))
    }

    /// Sends raw bytes (for tests of malformed input).
    pub fn send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.w.write_all(bytes)?;
        self.w.flush()
    }

    /// Reads one simple reply's errno and handle (for tests).
    pub fn read_reply(&mut self) -> io::Result<(u32, u64)> {
        let mut h = [0u8; 16];
        self.r.read_exact(&mut h)?;
        if h[..4] != SIMPLE_REPLY_MAGIC.to_be_bytes() {
            return Err(invalid("bad reply magic"));
        }
        let mut hb = [0u8; 8];
        hb.copy_from_slice(&h[8..16]);
        Ok((u32::from_be_bytes([h[4], h[5], h[6], h[7]]), u64::from_be_bytes(hb)))
    }

    pub fn disconnect(mut self) -> io::Result<()> {
        let _ = self.send(CMD_DISC, 0, 0, 0, None)?;
        self.w.flush()
    }
}
