//! One accepted link after its welcome, as a pipeline of two tasks on the
//! links' runtime (docs/architecture.md §5 and "Threads",
//! docs/performance.md "Replication"):
//!
//! - the link's own task receives: TLS decryption, frame checks,
//!   decoding, answering each offer with the blocks this site lacks, and
//!   decompressing each batch's blocks;
//! - an ingest task takes the received batches in order, assembles each
//!   write and ingests it into the journal, places markers and acknowledges
//!   what is durable. The journal calls block (fsync), so they run on the
//!   links' fixed pool of threads (`replication::calls`).
//!
//! A bounded queue of [`RECEIVED_BATCHES`] sits between the two, so a slow
//! journal stops the reader (and through TCP the source) rather than
//! growing memory.

use super::VpgReplica;
use crate::journal::{
    BlockQuery, CheckpointSpec, Cut, HashSetOfBlocks, JournalError, TapWrite, WireBlock, WriteData, BLOCK_SIZE,
};
use crate::replication::calls::blocking_call;
use crate::replication::now_ms;
use crate::replication::source::split;
use crate::replication::LinkError;
use crate::wire::async_link::{AsyncLinkReader, AsyncLinkWriter};
use crate::wire::frame::{read_frame_async, write_frame_async, FrameError};
use crate::wire::msg::{self, Ack, Blocks, Marker, Need, Offer, OfferItem, OfferedBlock, OfferedWrite};
use protection_groups::{CheckpointId, CheckpointKind, StreamId, WriteKind};
use std::borrow::Cow;
use std::collections::VecDeque;
use std::io;
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Batches received and waiting for the ingest task. Two keep the
/// journal busy while the next one is decrypted; a batch is a few MiB.
pub(super) const RECEIVED_BATCHES: usize = 2;

/// A stream's ingest slot: one link at a time ingests it.
#[derive(Debug, Default)]
pub(super) struct StreamSlot {
    pub(super) generation: AtomicU64,
    pub(super) ingest: Mutex<()>,
}

/// What makes a link current: its stream's slot generation and its epoch.
/// Both halves of the pipeline check it before they act.
#[derive(Debug, Clone)]
pub(super) struct LinkLease {
    pub(super) replica: Arc<VpgReplica>,
    pub(super) stream: StreamId,
    pub(super) epoch: u64,
    pub(super) slot: Arc<StreamSlot>,
    pub(super) generation: u64,
}

impl LinkLease {
    fn check_current(&self) -> Result<(), LinkError> {
        if self.slot.generation.load(Ordering::SeqCst) != self.generation {
            return Err(LinkError::Superseded);
        }
        let epoch = self.replica.epoch();
        if self.epoch < epoch {
            return Err(LinkError::Refused(format!(
                "epoch {} is older than the VPG's epoch {epoch}: this source was demoted",
                self.epoch
            )));
        }
        Ok(())
    }
}

/// Hashes asked for in offers whose blocks are not ingested yet: a later
/// offer need not ask for them again. The receiver adds, the ingest task
/// removes once the batch that carries them is in the journal.
type Promised = Arc<Mutex<HashSetOfBlocks>>;

/// Blocks of a batch that another VPG's journal on this VDSA holds: they
/// are not asked for, and are copied from that journal at ingest
/// (docs/architecture.md §5, "Site-wide dedup on the link").
type Borrowed = std::collections::HashMap<[u8; 32], Arc<VpgReplica>>;

/// Blocks of a batch asked about first in each other journal.
const SIBLING_SAMPLE: usize = 8;

/// The other VPG replicas of this VDSA, asked when an offer's block is not
/// in the link's own journal.
pub(super) type Siblings = Arc<dyn Fn() -> Vec<Arc<VpgReplica>> + Send + Sync>;

/// An offer answered: which of its hashed blocks are to be sent, which are
/// borrowed from another VPG's journal, and the hashes this offer
/// promised (given up once its batch is ingested).
struct Answered {
    offer: Offer,
    sent: Vec<bool>,
    borrowed: Borrowed,
    promised: Vec<[u8; 32]>,
}

/// A batch whose blocks arrived, checked and decompressed, with the offer
/// it fills.
struct ReceivedBatch {
    answered: Answered,
    data: BatchData,
}

/// The batch's bytes: where they arrived when they came uncompressed.
enum BatchData {
    Plain(Blocks),
    Decompressed(Vec<u8>),
}

impl BatchData {
    fn bytes(&self) -> &[u8] {
        match self {
            BatchData::Plain(b) => b.data(),
            BatchData::Decompressed(v) => v,
        }
    }
}

/// The receiving half: offers answered and waiting for their blocks.
struct Receiver {
    lease: LinkLease,
    pending: VecDeque<Answered>,
    promised: Promised,
    siblings: Siblings,
}

impl Receiver {
    /// Which offered blocks this site lacks.
    fn on_offer(&mut self, offer: Offer) -> Result<Need, LinkError> {
        self.lease.check_current()?;
        if offer.epoch != self.lease.epoch {
            return Err(LinkError::Refused(format!(
                "batch {} carries epoch {}, the link was opened with {}",
                offer.batch, offer.epoch, self.lease.epoch
            )));
        }
        if self.pending.len() >= MAX_OFFERS_AHEAD {
            return Err(LinkError::Refused(format!(
                "batch {}: {} batches offered and not yet filled; a source may offer at most {MAX_OFFERS_AHEAD} ahead",
                offer.batch,
                self.pending.len()
            )));
        }
        let mut queries = Vec::new();
        for item in &offer.items {
            if let OfferItem::Write(w) = item {
                check_shape(w)?;
                let first = w.write.offset / BLOCK_SIZE as u64 + u64::from(w.write.offset % BLOCK_SIZE as u64 != 0);
                for (i, b) in w.blocks.iter().enumerate() {
                    if let OfferedBlock::Hash(h) = b {
                        queries.push(BlockQuery {
                            disk: w.write.disk,
                            block: first + i as u64,
                            hash: *h,
                            at_position: w.write.sync,
                        });
                    }
                }
            }
        }
        let held = self.lease.replica.journal.holds(&queries)?;
        let mut promised = self.promised.lock().map_err(|_| io::Error::other("promised blocks poisoned"))?;
        // A hash promised by an earlier batch is not asked again: that batch
        // is ingested first. One whose batch was ingested between `holds`
        // and here is asked again, which costs a block on the link only.
        let mut bits: Vec<bool> = queries.iter().zip(held).map(|(q, held)| !held && promised.insert(q.hash)).collect();
        drop(promised);
        let promised = queries.iter().zip(&bits).filter(|(_, &b)| b).map(|(q, _)| q.hash).collect();
        let borrowed = self.borrow(&queries, &mut bits);
        let batch = offer.batch;
        self.pending.push_back(Answered { offer, sent: bits.clone(), borrowed, promised });
        Ok(Need { batch, bits })
    }

    /// Of the blocks still to ask for, those another VPG's journal on this
    /// VDSA holds are borrowed from it instead (their bits cleared): a site
    /// whose VMs share content receives it once. They stay promised: this
    /// batch brings them into the link's own journal.
    fn borrow(&self, queries: &[BlockQuery], bits: &mut [bool]) -> Borrowed {
        let mut borrowed = Borrowed::new();
        let wanted: Vec<usize> = (0..bits.len()).filter(|&i| bits[i]).collect();
        if wanted.is_empty() {
            return borrowed;
        }
        let own = self.lease.replica.vpg;
        // A few blocks spread over the batch first: a journal holding none
        // of them is not asked about the rest, so that many VPGs with
        // nothing in common cost a few lookups per batch, not one per block
        // and VPG. Shared content (clones of a template) comes in runs.
        let sample: Vec<[u8; 32]> =
            wanted.iter().step_by((wanted.len() / SIBLING_SAMPLE).max(1)).map(|&i| queries[i].hash).collect();
        for sibling in (self.siblings)().into_iter().filter(|r| r.vpg != own) {
            let open: Vec<usize> = wanted.iter().copied().filter(|&i| bits[i]).collect();
            if open.is_empty() {
                break;
            }
            // A sibling that cannot answer (being removed, say) lends nothing.
            if !sibling.journal.holds_chunks(&sample).is_ok_and(|h| h.contains(&true)) {
                continue;
            }
            let hashes: Vec<[u8; 32]> = open.iter().map(|&i| queries[i].hash).collect();
            let Ok(held) = sibling.journal.holds_chunks(&hashes) else { continue };
            for (&i, held) in open.iter().zip(held) {
                if held {
                    bits[i] = false;
                    borrowed.insert(queries[i].hash, sibling.clone());
                }
            }
        }
        borrowed
    }

    /// Matches the blocks to their offer and decompresses them.
    fn on_blocks(&mut self, blocks: Blocks) -> Result<ReceivedBatch, LinkError> {
        self.lease.check_current()?;
        let answered = self
            .pending
            .pop_front()
            .ok_or_else(|| LinkError::Refused(format!("blocks for batch {} that was never offered", blocks.batch)))?;
        if answered.offer.batch != blocks.batch {
            return Err(LinkError::Refused(format!(
                "blocks for batch {} arrived, batch {} was next",
                blocks.batch, answered.offer.batch
            )));
        }
        let raw_len = blocks.raw_len as usize;
        let batch = blocks.batch;
        let data = if blocks.compressed {
            BatchData::Decompressed(
                zstd::bulk::decompress(blocks.data(), raw_len)
                    .map_err(|e| LinkError::Refused(format!("batch {batch}: zstd data does not decompress: {e}")))?,
            )
        } else {
            BatchData::Plain(blocks)
        };
        let got = data.bytes().len();
        if got != raw_len {
            return Err(LinkError::Refused(format!("batch {batch}: {got} data bytes, {raw_len} announced")));
        }
        Ok(ReceivedBatch { answered, data })
    }
}

/// Writes of a batch between two markers, ready for the journal: each with
/// its bytes (borrowed from the batch where possible) and block kinds.
type Run<'a> = Vec<(&'a OfferedWrite, Cow<'a, [u8]>, Vec<WireBlock>)>;

/// The ingesting half: the ingest task's, which also commits the group.
#[derive(Debug)]
struct StreamIngest {
    lease: LinkLease,
    promised: Promised,
    /// What the last ACK said: the stream's durable seq and its newest
    /// marker.
    acked: AtomicU64,
    acked_marker: AtomicU64,
    /// The newest marker of this stream placed (recorded, or waiting for
    /// the VPG's other streams): the source may forget it once durable.
    last_marker: AtomicU64,
}

impl StreamIngest {
    /// Ingests the batch, in order, with its markers.
    fn ingest(&self, batch: &ReceivedBatch) -> Result<Option<Ack>, LinkError> {
        let _g = self.lease.slot.ingest.lock().map_err(|_| io::Error::other("stream slot poisoned"))?;
        self.lease.check_current()?;
        let data = batch.data.bytes();
        let Answered { offer, sent, borrowed, .. } = &batch.answered;
        let mut cursor = 0usize;
        let mut bit = 0usize;
        let mut run: Run<'_> = Vec::new();
        let mut ack = None;
        for item in &offer.items {
            match item {
                OfferItem::Write(w) => {
                    let (buf, wb) = assemble(w, data, &mut cursor, sent, &mut bit, borrowed)?;
                    run.push((w, buf, wb));
                }
                OfferItem::Marker(m) => {
                    self.ingest_run(&mut run)?;
                    if self.on_marker(m)? {
                        ack = self.durable_ack(true)?;
                    }
                }
            }
        }
        self.ingest_run(&mut run)?;
        if cursor != data.len() {
            return Err(LinkError::Refused(format!(
                "batch {}: {} data bytes left over",
                offer.batch,
                data.len() - cursor
            )));
        }
        let mut promised = self.promised.lock().map_err(|_| io::Error::other("promised blocks poisoned"))?;
        for h in &batch.answered.promised {
            promised.remove(h);
        }
        Ok(ack)
    }

    fn ingest_run(&self, run: &mut Run<'_>) -> Result<(), LinkError> {
        if run.is_empty() {
            return Ok(());
        }
        let writes: Vec<TapWrite<'_>> = run
            .iter()
            .map(|(w, buf, _)| TapWrite {
                seq: w.write.seq,
                disk: w.write.disk,
                offset: w.write.offset,
                data: match w.write.kind {
                    WriteKind::Data => WriteData::Data(buf),
                    WriteKind::Zero => WriteData::Zero { len: w.write.len },
                    WriteKind::Trim => WriteData::Trim { len: w.write.len },
                    WriteKind::Resize => WriteData::Resize { size: w.write.len },
                },
            })
            .collect();
        let blocks: Vec<WireBlock> = run.iter().flat_map(|(_, _, b)| b.iter().copied()).collect();
        self.lease.replica.journal.ingest_wire(self.lease.stream, &writes, &blocks)?;
        run.clear();
        Ok(())
    }

    /// Places this stream's cut for the checkpoint; records the checkpoint
    /// (durably) once every stream of the VPG has. Returns whether it did.
    fn on_marker(&self, m: &Marker) -> Result<bool, LinkError> {
        let replica = &self.lease.replica;
        let stream = self.lease.stream;
        let pos = replica.journal.stream_position(stream)?;
        let cut = pos.unwrap_or(Cut { stream, lsn: 0, seq: 0 });
        if cut.seq != m.cut_seq {
            return Err(LinkError::Refused(format!(
                "checkpoint {} is cut at seq {}, but the stream is at seq {}",
                m.id, m.cut_seq, cut.seq
            )));
        }
        self.last_marker.fetch_max(m.id, Ordering::Relaxed);
        if m.id <= replica.newest_checkpoint()? {
            return Ok(false); // a resent marker
        }
        let mut pending = replica.pending.lock().map_err(|_| io::Error::other("checkpoints poisoned"))?;
        let p = pending.entry(m.id).or_insert_with(|| super::PendingCheckpoint { marker: m.clone(), cuts: Vec::new() });
        p.cuts.retain(|c| c.stream != stream);
        p.cuts.push(cut);
        // Any stream's marker saying inconsistent makes the cut inconsistent.
        if m.kind == CheckpointKind::Inconsistent {
            p.marker.kind = CheckpointKind::Inconsistent;
        }
        if p.cuts.len() < m.streams.max(1) as usize {
            return Ok(false);
        }
        let Some(p) = pending.remove(&m.id) else { return Ok(false) };
        // Older checkpoints some stream never completed are abandoned.
        pending.retain(|&id, _| id > m.id);
        drop(pending);
        let cp = replica.journal.mark_checkpoint(CheckpointSpec {
            id: CheckpointId(m.id),
            kind: p.marker.kind,
            name: p.marker.name.clone(),
            source_time_ms: p.marker.source_time_ms,
            cuts: p.cuts,
        })?;
        if cp.kind.is_recoverable() {
            replica.newest_consistent_ms.fetch_max(cp.source_time_ms, Ordering::Relaxed);
        }
        Ok(true)
    }

    /// Makes the stream durable and returns the ack to send, if its seq or
    /// its newest marker moved (or `force`). A marker alone in its batch
    /// moves no seq, and the source keeps it queued until it is acked.
    fn durable_ack(&self, force: bool) -> Result<Option<Ack>, JournalError> {
        let journal = &self.lease.replica.journal;
        let seq = journal.stream_position(self.lease.stream)?.map_or(0, |c| c.seq);
        let marker = self.last_marker.load(Ordering::Relaxed);
        if !force && seq == self.acked.load(Ordering::Relaxed) && marker == self.acked_marker.load(Ordering::Relaxed) {
            return Ok(None);
        }
        journal.sync()?;
        self.acked.store(seq, Ordering::Relaxed);
        if self.acked_marker.swap(marker, Ordering::Relaxed) != marker {
            self.lease.replica.markers_made_durable.fetch_add(1, Ordering::Relaxed);
        }
        Ok(Some(Ack {
            durable_seq: seq,
            durable_checkpoint: marker,
            newest_consistent_ms: self.lease.replica.newest_consistent_ms.load(Ordering::Relaxed),
        }))
    }
}

/// The link's sending half, shared by its receiving and ingest tasks.
pub(super) type SharedWriter = Arc<tokio::sync::Mutex<AsyncLinkWriter>>;

/// Sends one frame on the link.
pub(super) async fn send(w: &SharedWriter, kind: u16, payload: &[u8]) -> Result<(), LinkError> {
    write_frame_async(&mut *w.lock().await, kind, payload).await?;
    Ok(())
}

/// Where the stream stood when its link was welcomed.
pub(super) struct Welcomed {
    pub(super) durable_seq: u64,
    pub(super) last_checkpoint: u64,
}

/// What a link runs with besides its socket: the heartbeat interval and
/// the VDSA's other VPG replicas.
pub(super) struct LinkSurroundings {
    pub(super) heartbeat: Duration,
    pub(super) siblings: Siblings,
}

/// Runs the link from its welcome until it fails or closes: the calling
/// task receives, a task of its own ingests. `tcp` is the link's socket,
/// shut for reading when ingest fails so that the receiver stops at once;
/// the error returned is then the ingest's (the one the source is told).
pub(super) async fn serve(
    lease: LinkLease,
    welcomed: Welcomed,
    r: &mut AsyncLinkReader,
    w: &SharedWriter,
    tcp: &TcpStream,
    around: LinkSurroundings,
) -> Result<(), LinkError> {
    let LinkSurroundings { heartbeat, siblings } = around;
    let promised: Promised = Arc::default();
    let ingest = Arc::new(StreamIngest {
        lease: lease.clone(),
        promised: promised.clone(),
        acked: AtomicU64::new(welcomed.durable_seq),
        acked_marker: AtomicU64::new(welcomed.last_checkpoint),
        last_marker: AtomicU64::new(welcomed.last_checkpoint),
    });
    let receiver = Receiver { lease, pending: VecDeque::new(), promised, siblings };
    let (to_ingest, received) = mpsc::channel::<ReceivedBatch>(RECEIVED_BATCHES);
    let ingest_failed: Arc<Mutex<Option<LinkError>>> = Arc::default();
    let (failed, socket, writer) = (ingest_failed.clone(), tcp.try_clone()?, w.clone());
    let ingesting = tokio::spawn(async move {
        if let Err(e) = ingest_and_commit(&ingest, received, &writer, heartbeat).await {
            if let Ok(mut slot) = failed.lock() {
                *slot = Some(e);
            }
            let _ = socket.shutdown(Shutdown::Read);
        }
    });
    let result = receive(receiver, r, w, &to_ingest).await;
    // The ingest task takes what was received, then ends.
    drop(to_ingest);
    let _ = ingesting.await;
    result.map_err(|e| ingest_failed.lock().ok().and_then(|mut f| f.take()).unwrap_or(e))
}

/// Batches a link may offer before it fills the oldest: a source offers
/// at most its window ahead (`source::OFFER_WINDOW`), and this leaves room
/// for an older or differently tuned one. A link that offers more is
/// refused: its offers would hold the target's memory without end.
const MAX_OFFERS_AHEAD: usize = 4 * crate::replication::source::OFFER_WINDOW;

/// How often the ingest task makes its stream durable (group commit) and
/// acknowledges it, if it moved.
const GROUP_COMMIT: Duration = Duration::from_millis(50);

/// The ingest task: ingests each received batch in order and acknowledges
/// what its markers made durable; every [`GROUP_COMMIT`] makes the stream
/// durable and acknowledges it if it moved, and sends a heartbeat at least
/// every `heartbeat`. Ends when the receiver does (Ok), or at the first
/// failure, which ends the link.
async fn ingest_and_commit(
    ingest: &Arc<StreamIngest>,
    mut received: mpsc::Receiver<ReceivedBatch>,
    w: &SharedWriter,
    heartbeat: Duration,
) -> Result<(), LinkError> {
    let (mut next_commit, mut last_beat) = (Instant::now() + GROUP_COMMIT, Instant::now());
    loop {
        tokio::select! {
            batch = received.recv() => {
                let Some(batch) = batch else { return Ok(()) };
                let ingesting = ingest.clone();
                if let Some(ack) = blocking_call(move || ingesting.ingest(&batch)).await?? {
                    send(w, msg::ACK, &ack.encode()).await?;
                }
            }
            () = tokio::time::sleep_until(next_commit) => {}
        }
        if Instant::now() >= next_commit {
            next_commit = Instant::now() + GROUP_COMMIT;
            let committing = ingest.clone();
            if let Some(ack) = blocking_call(move || committing.durable_ack(false)).await?? {
                send(w, msg::ACK, &ack.encode()).await?;
            }
            if last_beat.elapsed() >= heartbeat {
                send(w, msg::HEARTBEAT, &now_ms().to_be_bytes()).await?;
                last_beat = Instant::now();
            }
        }
    }
}

/// The receiving loop: runs until the link fails or ingest stops.
async fn receive(
    mut receiver: Receiver,
    r: &mut AsyncLinkReader,
    w: &SharedWriter,
    to_ingest: &mpsc::Sender<ReceivedBatch>,
) -> Result<(), LinkError> {
    loop {
        let f = read_frame_async(r).await?;
        match f.kind {
            msg::OFFER => {
                let offer = Offer::decode(&f.payload)?;
                // Asks the journals, which may wait for an ingest's fsync.
                let (back, need) = blocking_call(move || {
                    let need = receiver.on_offer(offer);
                    (receiver, need)
                })
                .await?;
                receiver = back;
                let need = need?;
                send(w, msg::NEED, &need.encode()).await?;
            }
            msg::BLOCKS => {
                let batch = receiver.on_blocks(Blocks::decode_owned(f.payload)?)?;
                if to_ingest.send(batch).await.is_err() {
                    return Err(io::Error::other("the link's ingest stopped").into());
                }
            }
            msg::HEARTBEAT => {}
            k => return Err(FrameError::UnexpectedKind(k).into()),
        }
    }
}

fn check_shape(w: &OfferedWrite) -> Result<(), LinkError> {
    let (_, full, _) = split(w.write.offset, w.write.len);
    let want = if w.write.kind == WriteKind::Data { full } else { 0 };
    if w.write.kind == WriteKind::Resize && w.write.offset != 0 {
        return Err(LinkError::Refused(format!("resize seq {} names offset {}, not 0", w.write.seq, w.write.offset)));
    }
    if w.blocks.len() != want || w.write.len == 0 {
        return Err(LinkError::Refused(format!(
            "write seq {} of {} bytes at {} lists {} whole blocks, not {want}",
            w.write.seq,
            w.write.len,
            w.write.offset,
            w.blocks.len()
        )));
    }
    Ok(())
}

/// The write's bytes from the batch data: partial edges and the blocks
/// that were sent; held blocks are left zero (the journal supplies them).
/// When every block was sent the bytes are one piece of the batch data and
/// are not copied.
fn assemble<'a>(
    w: &OfferedWrite,
    data: &'a [u8],
    cursor: &mut usize,
    bits: &[bool],
    bit: &mut usize,
    borrowed: &Borrowed,
) -> Result<(Cow<'a, [u8]>, Vec<WireBlock>), LinkError> {
    if w.write.kind != WriteKind::Data {
        return Ok((Cow::Borrowed(&[]), Vec::new()));
    }
    let n_hashed = w.blocks.iter().filter(|b| matches!(b, OfferedBlock::Hash(_))).count();
    let all_sent = n_hashed == w.blocks.len() && bits.get(*bit..*bit + n_hashed).is_some_and(|b| b.iter().all(|&x| x));
    if all_sent {
        let piece = data
            .get(*cursor..*cursor + w.write.len as usize)
            .ok_or_else(|| LinkError::Refused(format!("batch data ends inside write seq {}", w.write.seq)))?;
        *cursor += w.write.len as usize;
        *bit += n_hashed;
        let wb = w
            .blocks
            .iter()
            .map(|b| match b {
                OfferedBlock::Hash(h) => WireBlock::Sent { hash: *h },
                OfferedBlock::Zero => WireBlock::Zero,
            })
            .collect();
        return Ok((Cow::Borrowed(piece), wb));
    }
    let short = || LinkError::Refused(format!("batch data ends inside write seq {}", w.write.seq));
    let take = |n: usize, cursor: &mut usize| -> Result<&[u8], LinkError> {
        let s = data.get(*cursor..*cursor + n).ok_or_else(short)?;
        *cursor += n;
        Ok(s)
    };
    let (head, _, tail) = split(w.write.offset, w.write.len);
    let mut buf = Vec::with_capacity(w.write.len as usize);
    buf.extend_from_slice(take(head, cursor)?);
    let mut wb = Vec::with_capacity(w.blocks.len());
    for b in &w.blocks {
        match b {
            OfferedBlock::Zero => {
                buf.resize(buf.len() + BLOCK_SIZE, 0);
                wb.push(WireBlock::Zero);
            }
            OfferedBlock::Hash(h) => {
                let sent = bits.get(*bit).copied().ok_or_else(short)?;
                *bit += 1;
                if sent {
                    buf.extend_from_slice(take(BLOCK_SIZE, cursor)?);
                    wb.push(WireBlock::Sent { hash: *h });
                } else if let Some(lender) = borrowed.get(h) {
                    // Copied from the other VPG's journal (its read checks
                    // the chunk); if that journal dropped the block since
                    // the offer, the batch is refused and sent again.
                    let at = buf.len();
                    buf.resize(at + BLOCK_SIZE, 0);
                    if !lender.journal.read_chunk(h, &mut buf[at..])? {
                        return Err(LinkError::Refused(format!(
                            "write seq {}: a block borrowed from VPG {} is no longer there; send the batch again",
                            w.write.seq, lender.vpg.0
                        )));
                    }
                    wb.push(WireBlock::Sent { hash: *h });
                } else {
                    buf.resize(buf.len() + BLOCK_SIZE, 0);
                    wb.push(WireBlock::Held { hash: *h });
                }
            }
        }
    }
    buf.extend_from_slice(take(tail, cursor)?);
    Ok((Cow::Owned(buf), wb))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::JournalConfig;
    use crate::wire::msg::StreamWrite;
    use protection_groups::{DiskId, VpgId};

    /// A block borrowed from another VPG's journal is copied from it; if
    /// that journal no longer holds it, the batch is refused (and sent
    /// again by the source), never filled with anything else.
    #[test]
    fn a_borrowed_block_is_copied_from_its_lender_or_the_batch_is_refused() {
        let dir = tempfile::tempdir().expect("a folder");
        let lender = Arc::new(
            VpgReplica::open(dir.path(), VpgId::new(), JournalConfig::default(), Arc::default()).expect("a replica"),
        );
        let block: Vec<u8> = (0..BLOCK_SIZE).map(|i| (i * 7 % 251) as u8).collect();
        let hash = *blake3::hash(&block).as_bytes();
        let disk = DiskId::new();
        let w = OfferedWrite {
            write: StreamWrite { seq: 1, disk, offset: 0, len: BLOCK_SIZE as u64, kind: WriteKind::Data, sync: false },
            blocks: vec![OfferedBlock::Hash(hash)],
        };
        let borrowed = Borrowed::from([(hash, lender.clone())]);
        let refused = assemble(&w, &[], &mut 0, &[false], &mut 0, &borrowed);
        assert!(
            matches!(&refused, Err(LinkError::Refused(why)) if why.contains("no longer there")),
            "{:?}",
            refused.map(|(b, _)| b.len())
        );
        lender.journal.add_disk(disk, 1 << 20).expect("a disk");
        let tap = TapWrite { seq: 1, disk, offset: 0, data: WriteData::Data(&block) };
        lender.journal.ingest(StreamId::new(), &[tap]).expect("the lender holds the block");
        let (bytes, kinds) = assemble(&w, &[], &mut 0, &[false], &mut 0, &borrowed).expect("borrowed");
        assert_eq!(&bytes[..], &block[..]);
        assert_eq!(kinds, vec![WireBlock::Sent { hash }]);
    }
}
