//! The NBD tap server under a bounded fuzz run: random valid requests,
//! checked against a model, mixed with malformed and hostile ones. The
//! server must answer each with the right error or a clean disconnect,
//! keep serving, and never let one export's traffic touch another's data.

use protection_groups::{DiskId, StreamId};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use vdsa::journal::{Journal, JournalConfig};
use vdsa::nbd::client::NbdClient;
use vdsa::nbd::export::Exports;
use vdsa::nbd::proto::*;
use vdsa::serving::Protocol;
use vdsa::tap::{TapDisk, TapStream};

pub const SIZE: u64 = 1 << 20;

fn start_server(dir: &Path) -> (Journal, [DiskId; 2], std::path::PathBuf) {
    let journal = Journal::open(dir.join("journal"), JournalConfig::default()).unwrap_or_else(|e| panic!("{e}"));
    let disks = [DiskId::new(), DiskId::new()];
    let tap = TapStream::new(journal.clone(), StreamId::new()).unwrap_or_else(|e| panic!("{e}"));
    let exports = Exports::default();
    for (name, d) in ["a", "b"].iter().zip(disks) {
        journal.add_disk(d, SIZE).unwrap_or_else(|e| panic!("{e}"));
        exports.insert(*name, Arc::new(TapDisk { stream: tap.clone(), disk: d, size: SIZE }));
    }
    let sock = dir.join("nbd.sock");
    super::serve_exports(&sock, exports, Protocol::Nbd);
    (journal, disks, sock)
}

/// Sends one raw request (and payload) and returns the reply's errno.
fn raw(c: &mut NbdClient, kind: u16, offset: u64, length: u32, payload: &[u8], handle: u64) -> std::io::Result<u32> {
    let req = Request { flags: 0, kind, handle, offset, length };
    let mut bytes = req.encode().to_vec();
    bytes.extend_from_slice(payload);
    c.send_raw(&bytes)?;
    let (errno, h) = c.read_reply()?;
    assert_eq!(h, handle, "reply for the request sent");
    Ok(errno)
}

#[test]
fn the_nbd_server_survives_random_and_hostile_requests() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let (journal, disks, sock) = start_server(dir.path());
    let mut model = [vec![0u8; SIZE as usize], vec![0u8; SIZE as usize]];
    fuzz(&sock, ["a", "b"], &mut model, 0xF022);
    for (i, name) in ["a", "b"].iter().enumerate() {
        let mut head = vec![0u8; SIZE as usize];
        journal.read_head(disks[i], 0, &mut head).unwrap_or_else(|e| panic!("{e}"));
        assert!(head == model[i], "journal head of {name} differs from its model");
    }
}

/// 200 connections of random valid requests (checked against `model`,
/// the exports' content, which it updates) mixed with malformed and
/// hostile ones, on the exports `names` (each `SIZE` bytes) served at
/// `sock`. Afterwards the server still serves and each export holds
/// exactly its model.
pub fn fuzz(sock: &Path, names: [&str; 2], model: &mut [Vec<u8>; 2], seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let (mut dropped, mut refused, mut served) = (0, 0, 0);
    for round in 0..200 {
        let which = rng.gen_range(0..2usize);
        let mut c = NbdClient::connect_unix(sock, names[which]).unwrap_or_else(|e| panic!("round {round}: {e}"));
        assert_eq!(c.size, SIZE);
        let mut handle = 1u64;
        for _ in 0..rng.gen_range(1..40) {
            handle += 1;
            let img = &mut model[which];
            match rng.gen_range(0..100) {
                0..=39 => {
                    let off = rng.gen_range(0..SIZE);
                    let len = rng.gen_range(1..=(SIZE - off).min(40_000));
                    let mut d = vec![0u8; len as usize];
                    rng.fill_bytes(&mut d);
                    assert_eq!(raw(&mut c, CMD_WRITE, off, len as u32, &d, handle).ok(), Some(0));
                    img[off as usize..(off + len) as usize].copy_from_slice(&d);
                    served += 1;
                }
                40..=54 => {
                    let off = rng.gen_range(0..SIZE);
                    let len = rng.gen_range(1..=(SIZE - off).min(100_000));
                    let mut buf = vec![0u8; len as usize];
                    c.read(off, &mut buf).unwrap_or_else(|e| panic!("read: {e}"));
                    assert!(
                        buf[..] == img[off as usize..(off + len) as usize],
                        "read {off}+{len} differs from the model"
                    );
                    served += 1;
                }
                55..=62 => {
                    let off = rng.gen_range(0..SIZE);
                    let len = rng.gen_range(1..=(SIZE - off).min(200_000));
                    let kind = if rng.gen_bool(0.5) { CMD_WRITE_ZEROES } else { CMD_TRIM };
                    assert_eq!(raw(&mut c, kind, off, len as u32, &[], handle).ok(), Some(0));
                    img[off as usize..(off + len) as usize].fill(0);
                    served += 1;
                }
                63..=66 => {
                    // Beyond the end: refused, nothing written.
                    let off = SIZE - rng.gen_range(0..100);
                    let d = vec![0xEEu8; 4096];
                    assert_eq!(raw(&mut c, CMD_WRITE, off, 4096, &d, handle).ok(), Some(ENOSPC));
                    assert_eq!(raw(&mut c, CMD_READ, u64::MAX - 10, 100, &[], handle + 1000).ok(), Some(EINVAL));
                    handle += 1;
                    refused += 2;
                }
                67..=69 => {
                    assert_eq!(raw(&mut c, 42, 0, 0, &[], handle).ok(), Some(EINVAL), "unknown command");
                    assert_eq!(raw(&mut c, CMD_READ, 0, MAX_REQUEST + 1, &[], handle + 1000).ok(), Some(EOVERFLOW));
                    refused += 2;
                }
                70..=72 => {
                    assert_eq!(raw(&mut c, CMD_FLUSH, 0, 0, &[], handle).ok(), Some(0));
                    served += 1;
                }
                73..=78 => {
                    // Garbage where a request header should be: dropped.
                    let mut junk = vec![0u8; rng.gen_range(28..200)];
                    rng.fill_bytes(&mut junk);
                    let _ = c.send_raw(&junk);
                    assert!(c.read_reply().is_err(), "garbage must end the connection");
                    dropped += 1;
                    break;
                }
                79..=84 => {
                    // A write whose payload never arrives whole: not applied.
                    let off = rng.gen_range(0..SIZE - 8192);
                    let req = Request { flags: 0, kind: CMD_WRITE, handle, offset: off, length: 8192 };
                    let mut bytes = req.encode().to_vec();
                    bytes.extend_from_slice(&vec![0xABu8; rng.gen_range(0..8192)]);
                    let _ = c.send_raw(&bytes);
                    dropped += 1;
                    break; // the client vanishes
                }
                85..=89 => {
                    // A write longer than the server accepts: dropped.
                    let req = Request { flags: 0, kind: CMD_WRITE, handle, offset: 0, length: MAX_REQUEST + 4096 };
                    let _ = c.send_raw(&req.encode());
                    assert!(c.read_reply().is_err(), "an oversized write must end the connection");
                    dropped += 1;
                    break;
                }
                _ => {
                    // Garbage in the handshake, on a connection of its own.
                    let mut s = UnixStream::connect(sock).unwrap_or_else(|e| panic!("{e}"));
                    let mut hello = [0u8; 18];
                    let _ = s.read_exact(&mut hello);
                    let mut junk = vec![0u8; rng.gen_range(1..64)];
                    rng.fill_bytes(&mut junk);
                    let _ = s.write_all(&junk);
                    dropped += 1;
                }
            }
        }
    }
    // The server still serves, and each export holds exactly its model.
    for (i, name) in names.iter().enumerate() {
        let mut c = NbdClient::connect_unix(sock, name).unwrap_or_else(|e| panic!("{e}"));
        let mut buf = vec![0u8; SIZE as usize];
        c.read(0, &mut buf).unwrap_or_else(|e| panic!("{e}"));
        assert!(buf == model[i], "export {name} differs from its model");
    }
    // A refused handshake option and an unknown export name.
    assert!(NbdClient::connect_unix(sock, "nope").is_err());
    assert!(served > 500 && refused > 50 && dropped > 30, "served {served}, refused {refused}, dropped {dropped}");
}

/// Flags the server did not offer for a command are refused with EINVAL
/// (a write's payload is still read, so the connection stays in step);
/// FUA on a write is honoured.
#[test]
fn unoffered_command_flags_are_refused_and_fua_is_honoured() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let (journal, disks, sock) = start_server(dir.path());
    let mut c = NbdClient::connect_unix(&sock, "a").unwrap_or_else(|e| panic!("{e}"));
    let send = |c: &mut NbdClient, flags: u16, kind: u16, length: u32, payload: &[u8], handle: u64| {
        let mut bytes = Request { flags, kind, handle, offset: 0, length }.encode().to_vec();
        bytes.extend_from_slice(payload);
        c.send_raw(&bytes).unwrap_or_else(|e| panic!("{e}"));
        let (errno, h) = c.read_reply().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(h, handle);
        errno
    };
    let block = vec![7u8; 4096];
    assert_eq!(send(&mut c, 0x40, CMD_WRITE, 4096, &block, 1), EINVAL);
    assert_eq!(send(&mut c, CMD_FLAG_NO_HOLE, CMD_TRIM, 4096, &[], 2), EINVAL);
    assert_eq!(send(&mut c, CMD_FLAG_FUA, CMD_FLUSH, 0, &[], 3), EINVAL);
    assert_eq!(send(&mut c, CMD_FLAG_FUA, CMD_WRITE, 4096, &block, 4), 0);
    assert_eq!(send(&mut c, CMD_FLAG_FUA | CMD_FLAG_NO_HOLE, CMD_WRITE_ZEROES, 4096, &[], 5), 0);
    let mut got = vec![1u8; 4096];
    journal.read_head(disks[0], 0, &mut got).unwrap_or_else(|e| panic!("{e}"));
    assert!(got.iter().all(|&b| b == 0), "the FUA zeroes after the FUA write");
    assert_eq!(journal.stats().map(|s| s.durable_lsn == s.head_lsn).ok(), Some(true), "FUA left writes undurable");
}
