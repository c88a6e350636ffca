//! The source's side of the link: connect and resume, offer each batch's
//! hashes, send the blocks the target lacks, read its acknowledgements
//! (architecture.md §5; the copies a block takes: docs/performance.md).

use crate::journal::{hash_nonzero_blocks, BLOCK_SIZE};
use crate::replication::calls::blocking_call;
use crate::replication::now_ms;
use crate::replication::queue::Entry;
use crate::replication::LinkError;
use crate::serving::{self, Pool};
use crate::wire::async_link::{self, AsyncLinkReader, AsyncLinkWriter};
use crate::wire::frame::{
    encode_header, encode_header_of_pieces, read_frame_async, write_frame_async, FrameError, HEADER_LEN, VERSION,
};
use crate::wire::msg::{
    self, Ack, Blocks, Hello, Marker, Need, Offer, OfferItem, OfferedBlock, OfferedWrite, Refuse, StreamWrite, Welcome,
};
use protection_groups::WriteKind;
use std::collections::VecDeque;
use std::io;
use std::net::ToSocketAddrs;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

use super::SourceStream;

/// How long the send loop waits for a need while batches are offered and
/// the queue has nothing new: at most what a write arriving meanwhile waits
/// before it is offered (a busy queue is read again at once).
const NEED_WAIT_WHEN_IDLE: Duration = Duration::from_millis(1);

/// How long connecting to the target may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

fn reader_gone() -> LinkError {
    LinkError::Protocol("reader gone".into())
}

fn refused_by_target(reason: String) -> LinkError {
    LinkError::Refused(format!("the target refused: {reason}"))
}

impl SourceStream {
    /// Starts the stream's link on the links' runtime (it holds no thread
    /// of its own: docs/architecture.md, "Threads"). Until
    /// [`SourceStream::stop`] it connects, resumes where the target is,
    /// sends, and reconnects after any failure.
    pub fn start_link(self: &Arc<Self>, cfg: Arc<rustls::ClientConfig>) -> io::Result<()> {
        let me = self.clone();
        serving::runtime(Pool::Links)?.spawn(async move { me.run_link(cfg).await });
        Ok(())
    }

    async fn run_link(self: &Arc<Self>, cfg: Arc<rustls::ClientConfig>) {
        let mut backoff = Duration::from_millis(50);
        while !self.stop.load(Ordering::SeqCst) {
            let started = Instant::now();
            let r = self.one_link(&cfg).await;
            if let Ok(mut l) = self.link.lock() {
                l.connected = false;
                l.last_error = r.as_ref().err().map(|e| e.to_string());
            }
            if let Err(e) = r {
                tracing::warn!(target = %self.opts.target, "replication link lost: {e}");
            }
            if let Err(e) = self.queue.rewind() {
                tracing::error!("send queue: {e}");
                return;
            }
            backoff = if started.elapsed() > Duration::from_secs(5) {
                Duration::from_millis(50)
            } else {
                (backoff * 2).min(Duration::from_secs(1))
            };
            tokio::time::sleep(backoff).await;
        }
    }

    async fn one_link(self: &Arc<Self>, cfg: &Arc<rustls::ClientConfig>) -> Result<(), LinkError> {
        let hb = self.opts.heartbeat;
        let target = self.opts.target.clone();
        let addr = blocking_call(move || target.to_socket_addrs())
            .await??
            .next()
            .ok_or_else(|| LinkError::Protocol(format!("{} resolves to nothing", self.opts.target)))?;
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(addr))
            .await
            .map_err(|_| LinkError::Protocol(format!("connecting to {addr} took longer than {CONNECT_TIMEOUT:?}")))??;
        tcp.set_nodelay(true)?;
        let (mut r, mut w) = async_link::connect(cfg.clone(), tcp, hb * 3).await?;
        let hello = Hello {
            site: self.opts.site.clone(),
            vpg: self.opts.vpg,
            stream: self.opts.stream,
            epoch: self.opts.epoch,
            disks: self.disks(),
        };
        write_frame_async(&mut w, msg::HELLO, &hello.encode()).await?;
        let f = read_frame_async(&mut r).await?;
        let welcome = match f.kind {
            msg::WELCOME => Welcome::decode(&f.payload)?,
            msg::REFUSE => return Err(refused_by_target(Refuse::decode(&f.payload)?.reason)),
            k => return Err(FrameError::UnexpectedKind(k).into()),
        };
        let base = {
            let mut l = self.link.lock().map_err(|_| LinkError::Protocol("poisoned".into()))?;
            l.connected = true;
            *l.base.get_or_insert(welcome.resume_after_seq)
        };
        if welcome.resume_after_seq < base {
            return Err(LinkError::Protocol(format!(
                "the target holds the stream only up to seq {}, before this source's start at {base}: it lost writes; a full sync is needed",
                welcome.resume_after_seq
            )));
        }
        self.counters.links.fetch_add(1, Ordering::Relaxed);
        tracing::info!(target = %self.opts.target, resume_after = welcome.resume_after_seq, "replication link up");
        let skip_seq = welcome.resume_after_seq - base;
        let skip_cp = welcome.last_checkpoint;

        let (tx, mut rx) = mpsc::unbounded_channel::<Result<Need, LinkError>>();
        let me = self.clone();
        let reader = tokio::spawn(async move {
            let r = me.read_replies(&mut r, base, &tx).await;
            let _ = tx.send(Err(r));
        });
        let result = self.send_loop(&mut w, &mut rx, base, skip_seq, skip_cp).await;
        w.shutdown().await;
        reader.abort();
        let _ = reader.await;
        result
    }

    /// Reads needs, acks and heartbeats until the link fails.
    async fn read_replies(
        self: &Arc<Self>,
        r: &mut AsyncLinkReader,
        base: u64,
        tx: &mpsc::UnboundedSender<Result<Need, LinkError>>,
    ) -> LinkError {
        loop {
            let f = match read_frame_async(r).await {
                Ok(f) => f,
                Err(e) => return e.into(),
            };
            match f.kind {
                msg::NEED => match Need::decode(&f.payload) {
                    Ok(n) => {
                        if tx.send(Ok(n)).is_err() {
                            return LinkError::Protocol("sender gone".into());
                        }
                    }
                    Err(e) => return e.into(),
                },
                msg::ACK => match Ack::decode(&f.payload) {
                    Ok(a) => {
                        self.counters.durable_seq.store(a.durable_seq, Ordering::Relaxed);
                        if a.newest_consistent_ms > 0 {
                            self.counters.newest_consistent_ms.fetch_max(a.newest_consistent_ms, Ordering::Relaxed);
                        }
                        // Refilling the queue from its spill reads the file.
                        let me = self.clone();
                        let (seq, checkpoint) = (a.durable_seq.saturating_sub(base), a.durable_checkpoint);
                        match blocking_call(move || me.queue.acknowledge(seq, checkpoint)).await {
                            Ok(Ok(())) => {}
                            Ok(Err(e)) => return e.into(),
                            Err(e) => return e,
                        }
                    }
                    Err(e) => return e.into(),
                },
                msg::HEARTBEAT => {}
                msg::REFUSE => {
                    return match Refuse::decode(&f.payload) {
                        Ok(r) => refused_by_target(r.reason),
                        Err(e) => e.into(),
                    }
                }
                k => return FrameError::UnexpectedKind(k).into(),
            }
        }
    }

    async fn send_loop(
        self: &Arc<Self>,
        w: &mut AsyncLinkWriter,
        rx: &mut mpsc::UnboundedReceiver<Result<Need, LinkError>>,
        base: u64,
        skip_seq: u64,
        skip_cp: u64,
    ) -> Result<(), LinkError> {
        let hb = self.opts.heartbeat;
        let mut pending: VecDeque<PendingBatch> = VecDeque::new();
        let mut next_batch = 1u64;
        let mut last_send = Instant::now();
        let mut compress = CompressProbe::default();
        // The queue had nothing new at the last look: with batches offered,
        // wait a little for their needs rather than spinning between the
        // two (one spinning loop per stream burnt both cores at scale).
        let mut nothing_new = false;
        while !self.stop.load(Ordering::SeqCst) {
            // Needs first: they unblock the target.
            let wait = if pending.len() >= self.opts.window {
                Duration::from_millis(20)
            } else if nothing_new && !pending.is_empty() {
                NEED_WAIT_WHEN_IDLE
            } else {
                Duration::ZERO
            };
            let need = if wait.is_zero() {
                match rx.try_recv() {
                    Ok(n) => Some(n),
                    Err(mpsc::error::TryRecvError::Empty) => None,
                    Err(mpsc::error::TryRecvError::Disconnected) => return Err(reader_gone()),
                }
            } else {
                match tokio::time::timeout(wait, rx.recv()).await {
                    Ok(Some(n)) => Some(n),
                    Ok(None) => return Err(reader_gone()),
                    Err(_) => None,
                }
            };
            if let Some(need) = need {
                let need = need?;
                let batch = pending.pop_front().ok_or_else(|| {
                    LinkError::Protocol(format!("need for batch {} that was not offered", need.batch))
                })?;
                self.send_blocks(w, batch, need, &mut compress).await?;
                last_send = Instant::now();
                continue;
            }
            if pending.len() < self.opts.window {
                let wait = if pending.is_empty() { Duration::from_millis(5) } else { Duration::ZERO };
                let max_bytes = self.throttle.batch_bytes(self.opts.batch_bytes);
                let entries = if self.queue.wants_spill_read() {
                    // Reading the spill waits for the disk: not on the
                    // link's runtime.
                    let me = self.clone();
                    blocking_call(move || me.queue.next_unsent(max_bytes, 4096)).await??
                } else {
                    self.queue.next_unsent_or_wait(max_bytes, 4096, wait).await?
                };
                let entries: Vec<Entry> = entries
                    .into_iter()
                    .filter(|e| match e {
                        Entry::Write(x) => x.write.seq > skip_seq,
                        Entry::Marker(m) => m.id > skip_cp,
                    })
                    .collect();
                nothing_new = entries.is_empty();
                if !entries.is_empty() {
                    let batch = self.offer(w, next_batch, entries, base).await?;
                    next_batch += 1;
                    pending.push_back(batch);
                    last_send = Instant::now();
                    continue;
                }
            }
            if last_send.elapsed() >= hb {
                self.send_frame(w, msg::HEARTBEAT, &now_ms().to_be_bytes()).await?;
                last_send = Instant::now();
            }
        }
        Ok(())
    }

    /// Sends a frame. Under a bandwidth limit it goes in pieces of at most
    /// 16 KiB, each after its tokens, so that a slow link trickles rather
    /// than falling silent for longer than the peer's heartbeat timeout.
    async fn send_frame(&self, w: &mut AsyncLinkWriter, kind: u16, payload: &[u8]) -> Result<(), LinkError> {
        let n = (HEADER_LEN + payload.len()) as u64;
        if self.throttle.rate() == 0 {
            write_frame_async(w, kind, payload).await.map_err(stalled)?;
        } else {
            let header = encode_header(VERSION, kind, payload);
            self.throttle.take(HEADER_LEN as u64).await;
            w.write_all_pieces(&[&header]).await.map_err(stalled)?;
            for piece in payload.chunks(16 << 10) {
                self.throttle.take(piece.len() as u64).await;
                w.write_all_pieces(&[piece]).await.map_err(stalled)?;
            }
        }
        self.counters.wire_bytes.fetch_add(n, Ordering::Relaxed);
        Ok(())
    }

    /// Sends a frame whose payload is `pieces` one after another, without
    /// gathering them first unless the link is throttled.
    async fn send_frame_pieces(&self, w: &mut AsyncLinkWriter, kind: u16, pieces: &[&[u8]]) -> Result<(), LinkError> {
        if self.throttle.rate() != 0 {
            return self.send_frame(w, kind, &pieces.concat()).await;
        }
        let header = encode_header_of_pieces(VERSION, kind, pieces);
        let mut all = Vec::with_capacity(pieces.len() + 1);
        all.push(&header[..]);
        all.extend_from_slice(pieces);
        w.write_all_pieces(&all).await.map_err(stalled)?;
        let n: usize = all.iter().map(|p| p.len()).sum();
        self.counters.wire_bytes.fetch_add(n as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Hashes the batch's whole blocks and offers them.
    async fn offer(
        &self,
        w: &mut AsyncLinkWriter,
        batch: u64,
        entries: Vec<Entry>,
        base: u64,
    ) -> Result<PendingBatch, LinkError> {
        let mut items = Vec::with_capacity(entries.len());
        let mut raw = 0u64;
        let mut writes = 0u64;
        // The whole blocks of the batch's data writes, hashed together
        // (four side by side where the CPU allows), zero blocks excepted.
        let whole: Vec<&[u8]> = entries
            .iter()
            .filter_map(|e| match e {
                Entry::Write(x) if x.write.kind == WriteKind::Data => {
                    let (head, full, _) = split(x.write.offset, x.write.len);
                    Some(x.data[head..head + full * BLOCK_SIZE].chunks_exact(BLOCK_SIZE))
                }
                _ => None,
            })
            .flatten()
            .collect();
        let hashes = hash_nonzero_blocks(&whole);
        let zero: Vec<bool> = hashes.iter().map(Option::is_none).collect();
        let hashed = hashes.iter().flatten().count() as u64;
        let mut offered = hashes.into_iter().map(|h| h.map_or(OfferedBlock::Zero, OfferedBlock::Hash));
        for e in &entries {
            items.push(match e {
                Entry::Write(x) => {
                    let blocks = if x.write.kind == WriteKind::Data {
                        let (_, full, _) = split(x.write.offset, x.write.len);
                        offered.by_ref().take(full).collect()
                    } else {
                        Vec::new()
                    };
                    raw += x.data.len() as u64;
                    writes += 1;
                    OfferItem::Write(OfferedWrite { write: StreamWrite { seq: base + x.write.seq, ..x.write }, blocks })
                }
                Entry::Marker(m) => OfferItem::Marker(Marker { cut_seq: base + m.cut_seq, ..m.clone() }),
            });
        }
        let offer = Offer { batch, epoch: self.opts.epoch, items };
        self.send_frame(w, msg::OFFER, &offer.encode()).await?;
        self.counters.raw_bytes.fetch_add(raw, Ordering::Relaxed);
        self.counters.blocks_offered.fetch_add(hashed, Ordering::Relaxed);
        self.counters.writes.fetch_add(writes, Ordering::Relaxed);
        Ok(PendingBatch { batch, entries, zero, hashed: hashed as usize })
    }

    /// Sends the bytes the target lacks: partial blocks always, whole
    /// blocks as asked.
    async fn send_blocks(
        &self,
        w: &mut AsyncLinkWriter,
        p: PendingBatch,
        need: Need,
        compress: &mut CompressProbe,
    ) -> Result<(), LinkError> {
        if need.batch != p.batch || need.bits.len() != p.hashed {
            return Err(LinkError::Protocol(format!(
                "need for batch {} with {} bits, but batch {} offered {} hashes",
                need.batch,
                need.bits.len(),
                p.batch,
                p.hashed
            )));
        }
        // The data as ranges of the queued writes' buffers (adjacent ones
        // joined): the bytes are copied only by TLS, unless the batch is
        // compressed or the link throttled.
        type Ranges<'a> = Vec<(&'a [u8], std::ops::Range<usize>)>;
        fn push<'a>(ranges: &mut Ranges<'a>, data: &'a [u8], r: std::ops::Range<usize>) {
            if r.is_empty() {
                return;
            }
            match ranges.last_mut() {
                Some((d, last)) if std::ptr::eq(*d, data) && last.end == r.start => last.end = r.end,
                _ => ranges.push((data, r)),
            }
        }
        let mut ranges: Ranges<'_> = Vec::new();
        let mut bit = 0usize;
        let mut sent = 0u64;
        let mut zero = p.zero.iter();
        for e in &p.entries {
            let Entry::Write(x) = e else { continue };
            if x.write.kind != WriteKind::Data {
                continue;
            }
            let (head, full, _) = split(x.write.offset, x.write.len);
            push(&mut ranges, &x.data, 0..head);
            for b in 0..full {
                if zero.next().copied().unwrap_or(false) {
                    continue;
                }
                if need.bits[bit] {
                    let start = head + b * BLOCK_SIZE;
                    push(&mut ranges, &x.data, start..start + BLOCK_SIZE);
                    sent += 1;
                }
                bit += 1;
            }
            push(&mut ranges, &x.data, head + full * BLOCK_SIZE..x.data.len());
        }
        let pieces: Vec<&[u8]> = ranges.into_iter().map(|(d, r)| &d[r]).collect();
        let raw_len: usize = pieces.iter().map(|p| p.len()).sum();
        let raw_len32 = u32::try_from(raw_len)
            .map_err(|_| LinkError::Protocol(format!("batch {} of {raw_len} bytes does not fit a frame", p.batch)))?;
        let compressed = compress.compress(&pieces, raw_len);
        let mut header = [0u8; Blocks::HEADER_LEN];
        Blocks::put_header(&mut header, p.batch, compressed.is_some(), raw_len32);
        let mut frame = vec![&header[..]];
        match &compressed {
            Some(c) => frame.push(c),
            None => frame.extend_from_slice(&pieces),
        }
        self.send_frame_pieces(w, msg::BLOCKS, &frame).await?;
        self.counters.blocks_sent.fetch_add(sent, Ordering::Relaxed);
        Ok(())
    }
}

/// A write to the link that timed out (the socket's timeout is three
/// heartbeats) means the link is stalled.
fn stalled(e: io::Error) -> LinkError {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
            LinkError::Protocol("the link took nothing within three heartbeats: it is stalled".into())
        }
        _ => LinkError::Io(e),
    }
}

/// (bytes of a partial first block, whole blocks, bytes of a partial last
/// block) of a write at `offset` of `len` bytes.
pub fn split(offset: u64, len: u64) -> (usize, usize, usize) {
    let bs = BLOCK_SIZE as u64;
    let head = if offset.is_multiple_of(bs) { 0 } else { (bs - offset % bs).min(len) };
    let rest = len - head;
    (head as usize, (rest / bs) as usize, (rest % bs) as usize)
}

#[derive(Debug)]
struct PendingBatch {
    batch: u64,
    entries: Vec<Entry>,
    /// Per whole block of the batch's data writes, in order: all zeros
    /// (offered as such, never sent), as found when the batch was offered.
    zero: Vec<bool>,
    hashed: usize,
}

/// zstd per batch where it pays. A batch's sample (up to [`SAMPLES`]
/// pieces of [`SAMPLE_LEN`] spread over it) is compressed first, and the
/// whole batch only if the sample saves at least a tenth: incompressible
/// data (encrypted, already compressed) then costs about 1/64 of a batch's
/// compression, and data that turns compressible is found at the next
/// batch.
#[derive(Debug, Default)]
struct CompressProbe {
    sample: Vec<u8>,
}

const SAMPLES: usize = 4;
const SAMPLE_LEN: usize = 16 << 10;

/// Whether `compressed` bytes save at least a tenth of `raw`.
fn saves_a_tenth(compressed: usize, raw: usize) -> bool {
    compressed < raw - raw / 10
}

impl CompressProbe {
    /// The batch (`pieces`, `len` bytes in all) compressed, if its sample
    /// says it may pay and it saves at least a tenth.
    fn compress(&mut self, pieces: &[&[u8]], len: usize) -> Option<Vec<u8>> {
        if len < 512 {
            return None;
        }
        // A small batch is its own sample.
        if len > 4 * SAMPLES * SAMPLE_LEN {
            self.take_sample(pieces, len);
            let c = zstd::bulk::compress(&self.sample, 1).ok()?;
            if !saves_a_tenth(c.len(), self.sample.len()) {
                return None;
            }
        }
        let data = pieces.concat();
        let c = zstd::bulk::compress(&data, 1).ok()?;
        saves_a_tenth(c.len(), data.len()).then_some(c)
    }

    /// Copies [`SAMPLES`] ranges of [`SAMPLE_LEN`] bytes, at even steps
    /// through the batch's `len` bytes, into `self.sample`.
    fn take_sample(&mut self, pieces: &[&[u8]], len: usize) {
        self.sample.clear();
        for k in 0..SAMPLES {
            let (start, end) = (len * k / SAMPLES, (len * k / SAMPLES + SAMPLE_LEN).min(len));
            let mut at = 0usize;
            for p in pieces {
                let (from, to) = (start.max(at), end.min(at + p.len()));
                if from < to {
                    self.sample.extend_from_slice(&p[from - at..to - at]);
                }
                at += p.len();
                if at >= end {
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sample_is_taken_across_pieces_at_even_steps() {
        let data: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
        // Pieces of uneven sizes, so that sample ranges straddle them.
        let pieces: Vec<&[u8]> = data.chunks(7_777).collect();
        let mut probe = CompressProbe::default();
        probe.take_sample(&pieces, data.len());
        let want: Vec<u8> = (0..SAMPLES)
            .flat_map(|k| {
                let start = data.len() * k / SAMPLES;
                data[start..start + SAMPLE_LEN].iter().copied()
            })
            .collect();
        assert_eq!(probe.sample, want);
    }

    #[test]
    fn a_batch_is_compressed_only_where_it_pays() {
        let mut probe = CompressProbe::default();
        let text: Vec<u8> = b"a protected disk holds text too. ".iter().copied().cycle().take(1 << 20).collect();
        let c = probe.compress(&[&text[..4096], &text[4096..]], text.len()).expect("text compresses");
        assert_eq!(zstd::bulk::decompress(&c, text.len()).expect("it decompresses"), text);
        let mut noise = vec![0u8; 1 << 20];
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        for b in &mut noise {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        assert!(probe.compress(&[&noise], noise.len()).is_none(), "random bytes were sent compressed");
        // Noise where the sample falls, text elsewhere: not worth trying.
        let mut mixed = text.clone();
        for k in 0..SAMPLES {
            let start = mixed.len() * k / SAMPLES;
            mixed[start..start + SAMPLE_LEN].copy_from_slice(&noise[start..start + SAMPLE_LEN]);
        }
        assert!(probe.compress(&[&mixed], mixed.len()).is_none());
    }
}
