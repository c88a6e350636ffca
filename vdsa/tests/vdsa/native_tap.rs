//! The native tap protocol: a filter's writes reach the journal exactly,
//! acknowledged writes are in the next checkpoint, and bad input (wrong
//! version, unknown disk, wrong size, bad CRC, oversized request) is refused
//! without harming the disk.

use protection_groups::{CheckpointId, CheckpointKind, DiskId, StreamId};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use vdsa::journal::{Journal, JournalConfig};
use vdsa::native_tap::{self, NativeTapClient, EBADMSG, TRIM, WRITE, ZERO};
use vdsa::nbd::export::Exports;
use vdsa::tap::{TapDisk, TapStream};

const SIZE: u64 = 2 << 20;

type Client = NativeTapClient<UnixStream, UnixStream>;

fn connect(sock: &std::path::Path, disk: &str, size: u64) -> std::io::Result<Client> {
    let s = UnixStream::connect(sock)?;
    let r = s.try_clone()?;
    NativeTapClient::connect(r, s, disk, size)
}

#[test]
fn a_native_tap_feeds_the_journal_and_refuses_bad_input() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let journal = Journal::open(dir.path().join("journal"), JournalConfig::default()).unwrap_or_else(|e| panic!("{e}"));
    let disk = DiskId::new();
    journal.add_disk(disk, SIZE).unwrap_or_else(|e| panic!("{e}"));
    let tap = TapStream::new(journal.clone(), StreamId::new()).unwrap_or_else(|e| panic!("{e}"));
    tap.set_syncing(false);
    let exports = Exports::default();
    exports.insert("disk0", Arc::new(TapDisk { stream: tap.clone(), disk, size: SIZE }));
    let sock = dir.path().join("native.sock");
    super::serve_exports(&sock, exports, vdsa::serving::Protocol::NativeTap);

    // Refused at hello: unknown disk, wrong size.
    assert!(connect(&sock, "nope", SIZE).is_err());
    assert!(connect(&sock, "disk0", SIZE + 4096).is_err());

    let mut model = vec![0u8; SIZE as usize];
    let mut rng = StdRng::seed_from_u64(3);
    let mut c = connect(&sock, "disk0", SIZE).unwrap_or_else(|e| panic!("{e}"));
    // Many writes in flight (a window of 64), acknowledged in order.
    let mut ids = std::collections::VecDeque::new();
    for _ in 0..500 {
        if ids.len() == 64 {
            let id = ids.pop_front();
            assert_eq!(c.ack().ok().map(|a| (a.0, Some(a.1))), Some((0, id)));
        }
        let off = rng.gen_range(0..SIZE - 70_000);
        let len = rng.gen_range(1..70_000u64);
        let kind = [WRITE, WRITE, WRITE, ZERO, TRIM][rng.gen_range(0..5)];
        let mut d = vec![0u8; if kind == WRITE { len as usize } else { 0 }];
        rng.fill_bytes(&mut d);
        ids.push_back(c.send(kind, off, len as u32, &d).unwrap_or_else(|e| panic!("{e}")));
        let r = &mut model[off as usize..(off + len) as usize];
        if kind == WRITE {
            r.copy_from_slice(&d);
        } else {
            r.fill(0);
        }
    }
    for id in &ids {
        assert_eq!(c.ack().ok(), Some((0, *id)));
    }
    let cp =
        tap.checkpoint(CheckpointId(1), "after the burst", CheckpointKind::Named).unwrap_or_else(|e| panic!("{e}"));
    // Beyond the end: refused, the connection stays usable.
    let id = c.send(WRITE, SIZE - 10, 100, &[7u8; 100]).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.ack().ok(), Some((28, id)));
    c.write(0, &[9u8; 512]).unwrap_or_else(|e| panic!("{e}"));
    model[..512].fill(9);
    // A reserved flag set: refused with EINVAL, nothing applied, the
    // connection stays usable.
    let payload = vec![0x66u8; 4096];
    let mut frame = native_tap::Header { kind: WRITE, id: 77, offset: 4096, length: 4096 }.encode(&payload).to_vec();
    frame[5] = 1;
    let crc = {
        let mut h = crc32fast::Hasher::new();
        h.update(&frame[..28]);
        h.update(&payload);
        h.finalize()
    };
    frame[28..32].copy_from_slice(&crc.to_be_bytes());
    frame.extend_from_slice(&payload);
    c.send_raw(&frame).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.ack().ok(), Some((22, 77)));
    // A corrupted payload: refused with EBADMSG and the connection closed;
    // its bytes never reach the disk.
    let payload = vec![0x55u8; 4096];
    let mut frame = native_tap::Header { kind: WRITE, id: 999, offset: 8192, length: 4096 }.encode(&payload).to_vec();
    let mut bad = payload.clone();
    bad[100] ^= 1;
    frame.extend_from_slice(&bad);
    c.send_raw(&frame).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.ack().ok(), Some((EBADMSG, 999)));
    assert!(c.ack().is_err(), "the connection is closed after a bad frame");
    // An oversized request on a new connection.
    let mut c2 = connect(&sock, "disk0", SIZE).unwrap_or_else(|e| panic!("{e}"));
    let id = c2.send(ZERO, 0, native_tap::MAX_PAYLOAD + 1, &[]).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c2.ack().ok(), Some((EBADMSG, id)));

    let mut head = vec![0u8; SIZE as usize];
    journal.read_head(disk, 0, &mut head).unwrap_or_else(|e| panic!("{e}"));
    assert!(head == model, "the journal head is exactly what the filter wrote");
    // The checkpoint holds the burst, not what came after it.
    let view = journal.open_view(cp.id).unwrap_or_else(|e| panic!("{e}"));
    let mut at_cp = vec![0u8; 512];
    view.read(disk, 0, &mut at_cp).unwrap_or_else(|e| panic!("{e}"));
    assert_ne!(at_cp, vec![9u8; 512], "the later write is not in the earlier checkpoint");
}
