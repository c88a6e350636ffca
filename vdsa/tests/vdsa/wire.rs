//! The replication wire: frames and messages round-trip, and no input a
//! peer can send makes a decoder panic or allocate what is not there.

use proptest::prelude::*;
use protection_groups::{CheckpointKind, DiskId, StreamId, VpgId, WriteKind};
use std::sync::Arc;
use std::time::Duration;
use vdsa::wire::frame::{encode_header, read_frame, FrameError, HEADER_LEN, VERSION};
use vdsa::wire::msg::*;

fn offer() -> Offer {
    Offer {
        batch: 7,
        epoch: 3,
        items: vec![
            OfferItem::Write(OfferedWrite {
                write: StreamWrite {
                    seq: 41,
                    disk: DiskId::from_bytes([2; 16]),
                    offset: 4096 * 3 + 17,
                    len: 4096 * 2 + 100,
                    kind: WriteKind::Data,
                    sync: true,
                },
                blocks: vec![OfferedBlock::Hash([9; 32])],
            }),
            OfferItem::Write(OfferedWrite {
                write: StreamWrite {
                    seq: 42,
                    disk: DiskId::from_bytes([2; 16]),
                    offset: 0,
                    len: 1 << 20,
                    kind: WriteKind::Zero,
                    sync: false,
                },
                blocks: vec![],
            }),
            OfferItem::Marker(Marker {
                id: 12,
                kind: CheckpointKind::Named,
                name: "before patch".into(),
                source_time_ms: 1_700_000_000_000,
                cut_seq: 42,
                streams: 2,
            }),
        ],
    }
}

#[test]
fn messages_round_trip() {
    let o = offer();
    assert_eq!(Offer::decode(&o.encode()).ok(), Some(o));
    let h = Hello {
        site: "prod".into(),
        vpg: VpgId::from_bytes([1; 16]),
        stream: StreamId::from_bytes([3; 16]),
        epoch: 5,
        disks: vec![(DiskId::from_bytes([4; 16]), 1 << 30)],
    };
    assert_eq!(Hello::decode(&h.encode()).ok(), Some(h));
    let n = Need { batch: 9, bits: vec![true, false, false, true, true, false, true, false, true] };
    assert_eq!(Need::decode(&n.encode()).ok(), Some(n));
    let a = Ack { durable_seq: 1, durable_checkpoint: 2, newest_consistent_ms: 3 };
    assert_eq!(Ack::decode(&a.encode()).ok(), Some(a));
    let w = Welcome { resume_after_seq: 4, last_checkpoint: 5 };
    assert_eq!(Welcome::decode(&w.encode()).ok(), Some(w));
    let mut b = vec![0u8; Blocks::HEADER_LEN];
    b.extend_from_slice(b"block bytes");
    Blocks::put_header(&mut b, 12, true, 4096);
    let got = Blocks::decode_owned(b).ok();
    assert_eq!(got.as_ref().map(|b| (b.batch, b.compressed, b.raw_len)), Some((12, true, 4096)));
    assert_eq!(got.as_ref().map(Blocks::data), Some(&b"block bytes"[..]));
}

#[test]
fn frames_refuse_bad_checksum_version_magic_and_length() {
    let payload = offer().encode();
    let mut f = encode_header(VERSION, OFFER, &payload).to_vec();
    f.extend_from_slice(&payload);
    assert!(read_frame(&mut &f[..]).is_ok());

    let mut bad = f.clone();
    bad[HEADER_LEN + 5] ^= 1;
    assert!(matches!(read_frame(&mut &bad[..]), Err(FrameError::Checksum { .. })));
    let mut bad = f.clone();
    bad[4..6].copy_from_slice(&(VERSION + 1).to_be_bytes());
    assert!(matches!(read_frame(&mut &bad[..]), Err(FrameError::Version { got }) if got == VERSION + 1));
    let mut bad = f.clone();
    bad[0] = b'X';
    assert!(matches!(read_frame(&mut &bad[..]), Err(FrameError::BadMagic(_))));
    let mut bad = f.clone();
    bad[8..12].copy_from_slice(&u32::MAX.to_be_bytes());
    assert!(matches!(read_frame(&mut &bad[..]), Err(FrameError::TooLong { .. })));
    // Truncated: an I/O error, never a short frame.
    assert!(matches!(read_frame(&mut &f[..f.len() - 1]), Err(FrameError::Io(_))));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Any bytes: every decoder answers Ok or a Malformed error.
    #[test]
    fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let _ = Hello::decode(&bytes);
        let _ = Welcome::decode(&bytes);
        let _ = Refuse::decode(&bytes);
        let _ = Offer::decode(&bytes);
        let _ = Need::decode(&bytes);
        let _ = Blocks::decode(&bytes);
        let _ = Ack::decode(&bytes);
        let _ = read_frame(&mut &bytes[..]);
    }

    /// A valid offer with bytes flipped or cut decodes to an error or to
    /// some offer, never a panic.
    #[test]
    fn damaged_offers_never_panic(cut in 0usize..400, flip in 0usize..400, bit in 0u8..8) {
        let mut b = offer().encode();
        if flip < b.len() {
            b[flip] ^= 1 << bit;
        }
        b.truncate(cut.min(b.len()));
        let _ = Offer::decode(&b);
    }
}

mod journal_side {
    use protection_groups::{DiskId, StreamId};
    use vdsa::journal::{BlockQuery, Journal, JournalConfig, JournalError, TapWrite, WireBlock, WriteData};

    fn block(v: u8) -> Vec<u8> {
        (0..4096).map(|i| (i as u8).wrapping_mul(v) ^ v).collect()
    }

    /// Blocks that arrive as hashes only: taken from the store or from the
    /// block's content at its position; one that is not here refuses the
    /// whole batch and changes nothing.
    #[test]
    fn held_blocks_come_from_the_journal_or_refuse_the_batch() -> Result<(), JournalError> {
        let dir = tempfile::tempdir().map_err(|e| JournalError::InvalidWrite(e.to_string()))?;
        let j = Journal::open(dir.path(), JournalConfig::default())?;
        let (disk, s) = (DiskId::from_bytes([1; 16]), StreamId::from_bytes([2; 16]));
        j.add_disk(disk, 1 << 20)?;
        let (a, b) = (block(3), block(5));
        let h = |x: &[u8]| *blake3::hash(x).as_bytes();
        j.ingest(s, &[TapWrite { seq: 1, disk, offset: 0, data: WriteData::Data(&a) }])?;
        let q = |blk: u64, hash, at_position| BlockQuery { disk, block: blk, hash, at_position };
        assert_eq!(
            j.holds(&[q(9, h(&a), false), q(9, h(&b), false), q(0, h(&a), true), q(1, h(&b), true)])?,
            vec![true, false, true, false]
        );

        // `b` is not here: refused whole, nothing written.
        let placeholder = vec![0u8; 8192];
        let w = [TapWrite { seq: 2, disk, offset: 4096, data: WriteData::Data(&placeholder) }];
        let r = j.ingest_wire(s, &w, &[WireBlock::Held { hash: h(&a) }, WireBlock::Held { hash: h(&b) }]);
        assert!(matches!(r, Err(JournalError::BlockNotHeld { block: 2, .. })), "{r:?}");
        assert_eq!(j.stream_position(s)?.map(|c| c.seq), Some(1));

        // Sent and held together.
        let mut data = vec![0u8; 4096];
        data.extend_from_slice(&b);
        let w = [TapWrite { seq: 2, disk, offset: 4096, data: WriteData::Data(&data) }];
        j.ingest_wire(s, &w, &[WireBlock::Held { hash: h(&a) }, WireBlock::Sent { hash: h(&b) }])?;
        let mut got = vec![0u8; 3 * 4096];
        j.read_head(disk, 0, &mut got)?;
        assert_eq!(&got[..4096], &a[..]);
        assert_eq!(&got[4096..8192], &a[..]);
        assert_eq!(&got[8192..], &b[..]);

        // A new block sent once and named again, as a hash only, later in
        // the same batch (and in the same write).
        let c = block(7);
        let mut data = c.clone();
        data.extend_from_slice(&[0u8; 4096]);
        let w = [
            TapWrite { seq: 3, disk, offset: 8 * 4096, data: WriteData::Data(&data) },
            TapWrite { seq: 4, disk, offset: 20 * 4096, data: WriteData::Data(&placeholder[..4096]) },
        ];
        j.ingest_wire(
            s,
            &w,
            &[WireBlock::Sent { hash: h(&c) }, WireBlock::Held { hash: h(&c) }, WireBlock::Held { hash: h(&c) }],
        )?;
        let mut got = vec![0u8; 4096];
        for blk in [8u64, 9, 20] {
            j.read_head(disk, blk * 4096, &mut got)?;
            assert_eq!(got, c, "block {blk}");
        }
        Ok(())
    }
}

/// A frame sent as pieces (`AsyncLinkWriter::write_all_pieces`, the BLOCKS
/// path) arrives over a real TLS link as the one frame their concatenation
/// makes, read as the target reads it (plaintext appended across TLS
/// records), with pieces of every size around a TLS record (16 KiB), empty
/// ones included. The frames are larger than what rustls holds for the
/// socket (1 MiB) and the socket's buffers, and the reader starts late,
/// so the writer waits with records held back in rustls.
#[tokio::test]
async fn a_frame_sent_as_pieces_arrives_whole_over_tls() {
    use vdsa::wire::async_link::{accept, connect};
    use vdsa::wire::frame::{encode_header_of_pieces, read_frame_async};
    let (_dir, server, client) = paired_sites();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("a port");
    let port = listener.local_addr().expect("its address").port();
    let sizes = [0usize, 1, 13, 4096, 16384, 16385, 70000, 0, 5, 300_000, 16379, 3_000_000, 7];
    let data: Vec<Vec<u8>> =
        sizes.iter().enumerate().map(|(i, n)| (0..*n).map(|j| (i * 31 + j * 7) as u8).collect()).collect();
    let pieces: Vec<&[u8]> = data.iter().map(Vec::as_slice).collect();
    let whole = pieces.concat();
    let timeout = Duration::from_secs(10);
    let reader = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.expect("a connection");
        let (mut r, _w) = accept(server, tcp, timeout).await.expect("TLS accepted");
        tokio::time::sleep(Duration::from_millis(300)).await;
        (read_frame_async(&mut r).await.expect("frame 1"), read_frame_async(&mut r).await.expect("frame 2"))
    });
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.expect("connected");
    let (_r, mut w) = connect(client, tcp, timeout).await.expect("TLS connected");
    for _ in 0..2 {
        let header = encode_header_of_pieces(VERSION, 7, &pieces);
        let mut all = vec![&header[..]];
        all.extend_from_slice(&pieces);
        w.write_all_pieces(&all).await.expect("sent");
    }
    let (f1, f2) = reader.await.expect("the reader");
    assert_eq!((f1.kind, f1.payload.len()), (7, whole.len()));
    assert!(f1.payload == whole && f2.payload == whole, "the payload is the pieces in order");
}

/// Two paired sites' TLS configurations: (their folder, server, client).
fn paired_sites() -> (tempfile::TempDir, Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>) {
    use vdsa::wire::tls::{create_site_certificates, trust_peer, SiteIdentity};
    let dir = tempfile::tempdir().expect("a folder");
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    create_site_certificates(&a, "site-a").expect("site a");
    create_site_certificates(&b, "site-b").expect("site b");
    trust_peer(&a, "site-b", &b.join("ca.pem")).expect("a trusts b");
    trust_peer(&b, "site-a", &a.join("ca.pem")).expect("b trusts a");
    let server = SiteIdentity::load(&b).and_then(|i| i.server_config()).expect("server config");
    let client = SiteIdentity::load(&a).and_then(|i| i.client_config()).expect("client config");
    (dir, server, client)
}

/// A peer that stops reading: the writer's wait for the socket ends at
/// the link's timeout with `TimedOut`, whatever rustls still holds,
/// instead of waiting for ever.
#[tokio::test]
async fn a_write_to_a_peer_that_reads_nothing_times_out() {
    use vdsa::wire::async_link::{accept, connect};
    let (_dir, server, client) = paired_sites();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("a port");
    let port = listener.local_addr().expect("its address").port();
    let timeout = Duration::from_millis(500);
    let (held, hold) = tokio::sync::oneshot::channel::<()>();
    let peer = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.expect("a connection");
        let link = accept(server, tcp, Duration::from_secs(10)).await.expect("TLS accepted");
        let _ = hold.await;
        drop(link);
    });
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.expect("connected");
    let (_r, mut w) = connect(client, tcp, timeout).await.expect("TLS connected");
    let big = vec![5u8; 64 << 20];
    let started = std::time::Instant::now();
    let err = w.write_all_pieces(&[&big[..]]).await.expect_err("a peer that reads nothing");
    assert_eq!(err.kind(), std::io::ErrorKind::TimedOut, "{err}");
    assert!(started.elapsed() < Duration::from_secs(5), "gave up after {:?}", started.elapsed());
    let _ = held.send(());
    peer.await.expect("the peer");
}
