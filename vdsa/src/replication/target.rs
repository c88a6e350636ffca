//! The target side of replication: accepts TLS links from source VDSAs,
//! checks who they are and their epoch, tells each source where to resume,
//! asks only for the blocks its journal lacks, ingests each stream strictly
//! in seq order, records checkpoints once every stream of the VPG placed
//! its marker, and acknowledges what is durable (architecture.md §2–§5).

use super::now_ms;
use super::source::split;
use super::LinkError;
use crate::journal::{
    BlockQuery, CheckpointSpec, Cut, Journal, JournalConfig, JournalError, TapWrite, WireBlock, WriteData, BLOCK_SIZE,
};
use crate::wire::frame::{read_frame, write_frame, FrameError, VERSION};
use crate::wire::msg::{
    self, Ack, Blocks, Hello, Marker, Need, Offer, OfferItem, OfferedBlock, OfferedWrite, Refuse, Welcome,
};
use crate::wire::tls::{self, LinkWriter};
use protection_groups::{CheckpointId, CheckpointKind, StreamId, VpgId, WriteKind};
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct TargetOptions {
    /// One folder per VPG under here: `<vpg id>/journal`, `<vpg id>/epoch`.
    pub root: PathBuf,
    pub heartbeat: Duration,
    pub journal: JournalConfig,
}

/// A stream's ingest slot: one link at a time ingests it.
#[derive(Debug, Default)]
struct StreamSlot {
    generation: AtomicU64,
    ingest: Mutex<()>,
}

#[derive(Debug)]
struct PendingCheckpoint {
    marker: Marker,
    cuts: Vec<Cut>,
}

/// The replica of one VPG at this site.
#[derive(Debug)]
pub struct VpgReplica {
    pub vpg: VpgId,
    pub journal: Journal,
    dir: PathBuf,
    /// The replication epoch: an atomic, so that no panic elsewhere can
    /// turn it into a default that accepts any epoch.
    epoch: AtomicU64,
    streams: Mutex<HashMap<StreamId, Arc<StreamSlot>>>,
    pending: Mutex<BTreeMap<u64, PendingCheckpoint>>,
    newest_consistent_ms: AtomicU64,
}

impl VpgReplica {
    fn open(root: &Path, vpg: VpgId, cfg: JournalConfig) -> Result<VpgReplica, LinkError> {
        let dir = root.join(vpg.0.to_string());
        std::fs::create_dir_all(&dir)?;
        let journal = Journal::open(dir.join("journal"), cfg)?;
        let epoch = match std::fs::read_to_string(dir.join("epoch")) {
            Ok(s) => s
                .trim()
                .parse()
                .map_err(|_| LinkError::Refused(format!("{}: not an epoch number", dir.join("epoch").display())))?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
            Err(e) => return Err(e.into()),
        };
        let newest = journal
            .checkpoints()?
            .iter()
            .filter(|c| c.kind.is_recoverable())
            .map(|c| c.source_time_ms)
            .max()
            .unwrap_or(0);
        Ok(VpgReplica {
            vpg,
            journal,
            dir,
            epoch: AtomicU64::new(epoch),
            streams: Mutex::new(HashMap::new()),
            pending: Mutex::new(BTreeMap::new()),
            newest_consistent_ms: AtomicU64::new(newest),
        })
    }

    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    /// Persists a new epoch (write, fsync, rename): after a crash the VPG
    /// never goes back to an older one.
    fn store_epoch(&self, epoch: u64) -> io::Result<()> {
        let tmp = self.dir.join("epoch.tmp");
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp)?;
            writeln!(f, "{epoch}")?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, self.dir.join("epoch"))?;
        std::fs::File::open(&self.dir)?.sync_all()?;
        self.epoch.store(epoch, Ordering::SeqCst);
        Ok(())
    }

    /// Failover or reverse protection: links of the old direction's epoch
    /// are refused from now on. Returns the new epoch.
    pub fn bump_epoch(&self) -> io::Result<u64> {
        let next = self.epoch() + 1;
        self.store_epoch(next)?;
        Ok(next)
    }

    /// The stream's slot. A poisoned map fails the link (fail stop) rather
    /// than hand out a fresh slot that would let two links of one stream
    /// ingest at once.
    fn slot(&self, stream: StreamId) -> io::Result<Arc<StreamSlot>> {
        let mut m = self.streams.lock().map_err(|_| io::Error::other("stream slots poisoned"))?;
        Ok(m.entry(stream).or_default().clone())
    }

    fn newest_checkpoint(&self) -> Result<u64, JournalError> {
        Ok(self.journal.checkpoints()?.last().map_or(0, |c| c.id.0))
    }

    /// Now minus the source time of the newest consistent checkpoint
    /// durable here; None before the first.
    pub fn rpo_ms(&self) -> Option<u64> {
        match self.newest_consistent_ms.load(Ordering::Relaxed) {
            0 => None,
            t => Some(now_ms().saturating_sub(t)),
        }
    }

    pub fn status(&self) -> serde_json::Value {
        let cps = self.journal.checkpoints().unwrap_or_default();
        let consistent = cps.iter().filter(|c| c.kind.is_recoverable()).count();
        serde_json::json!({
            "vpg": self.vpg.0.to_string(),
            "epoch": self.epoch(),
            "checkpoints": cps.len(),
            "consistent_checkpoints": consistent,
            "newest_checkpoint": cps.last().map(|c| c.id.0),
            "rpo_ms": self.rpo_ms(),
            "stats": self.journal.stats().ok(),
        })
    }
}

/// A VPG its site manager defined at this target: the streams it accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetDefinition {
    pub streams: Vec<StreamId>,
    /// Files that disks first added start as (reverse protection).
    pub seeds: HashMap<protection_groups::DiskId, std::path::PathBuf>,
}

/// The TLS configuration links are accepted with; replaced when the
/// trusted sites change (pairing, unpairing), read at each accept.
pub type ServerTls = Arc<std::sync::RwLock<Arc<rustls::ServerConfig>>>;

/// A live link, so it can be closed from outside its thread.
#[derive(Debug)]
struct LiveLink {
    tcp: TcpStream,
    /// Set once its hello was accepted.
    stream: Option<(VpgId, StreamId)>,
}

/// The target daemon's state: the VPG replicas it holds.
#[derive(Debug)]
pub struct TargetServer {
    opts: TargetOptions,
    vpgs: Mutex<HashMap<VpgId, Arc<VpgReplica>>>,
    /// Under a site manager: only these VPGs and streams are accepted.
    /// None (the standalone `target` command) accepts any VPG a trusted
    /// peer sends.
    defined: Mutex<Option<HashMap<VpgId, TargetDefinition>>>,
    live: Mutex<HashMap<u64, LiveLink>>,
    next_link: AtomicU64,
}

impl TargetServer {
    pub fn new(opts: TargetOptions) -> Arc<TargetServer> {
        Arc::new(TargetServer {
            opts,
            vpgs: Mutex::new(HashMap::new()),
            defined: Mutex::new(None),
            live: Mutex::new(HashMap::new()),
            next_link: AtomicU64::new(1),
        })
    }

    /// From now on only these VPGs and streams are accepted; live links of
    /// streams no longer defined are closed.
    pub fn set_defined(&self, defined: HashMap<VpgId, TargetDefinition>) {
        self.close_links(|s| {
            s.is_some_and(|(vpg, stream)| !defined.get(&vpg).is_some_and(|d| d.streams.contains(&stream)))
        });
        if let Ok(mut d) = self.defined.lock() {
            *d = Some(defined);
        }
    }

    /// Closes every live link (the trusted sites narrowed: each link must
    /// pass the handshake again with the new configuration).
    pub fn close_all_links(&self) {
        self.close_links(|_| true);
    }

    fn close_links(&self, close: impl Fn(Option<(VpgId, StreamId)>) -> bool) {
        if let Ok(live) = self.live.lock() {
            for (id, l) in live.iter().filter(|(_, l)| close(l.stream)) {
                tracing::info!(link = id, "closing a replication link that is no longer allowed");
                let _ = l.tcp.shutdown(std::net::Shutdown::Both);
            }
        }
    }

    /// Refuses a stream its site manager did not define here.
    /// The file disk `disk` of `vpg` starts as, if its site manager named one.
    fn seed_of(&self, vpg: VpgId, disk: protection_groups::DiskId) -> Option<std::path::PathBuf> {
        let d = self.defined.lock().ok()?;
        d.as_ref()?.get(&vpg)?.seeds.get(&disk).cloned()
    }

    fn check_defined(&self, vpg: VpgId, stream: StreamId) -> Result<(), LinkError> {
        let d = self.defined.lock().map_err(|_| LinkError::Refused("definitions poisoned".into()))?;
        match d.as_ref() {
            None => Ok(()),
            Some(d) => match d.get(&vpg) {
                Some(def) if def.streams.contains(&stream) => Ok(()),
                Some(_) => Err(LinkError::Refused(format!("stream {stream} is not a stream of VPG {vpg} here"))),
                None => Err(LinkError::Refused(format!("VPG {vpg} is not defined at this VDSA by its site manager"))),
            },
        }
    }

    /// Reopens a VPG's journal that failed (a full disk that has space
    /// again): its live links are closed (the sources reconnect and resume
    /// from what is durable) and the journal is rebuilt from its files.
    pub fn reopen(&self, vpg: VpgId) -> Result<(), String> {
        self.close_links(|s| s.is_some_and(|(v, _)| v == vpg));
        if let Ok(mut m) = self.vpgs.lock() {
            m.remove(&vpg);
        }
        self.replica(vpg).map(|_| ())
    }

    /// Closes a VPG's journal (its role was removed); its files stay.
    pub fn close(&self, vpg: VpgId) {
        if let Ok(mut m) = self.vpgs.lock() {
            if let Some(r) = m.remove(&vpg) {
                if let Err(e) = r.journal.sync() {
                    tracing::error!(%vpg, "sync on close failed: {e}");
                }
            }
        }
    }

    /// The replica of `vpg`, opened on first use.
    pub fn replica(&self, vpg: VpgId) -> Result<Arc<VpgReplica>, String> {
        let mut m = self.vpgs.lock().map_err(|_| "poisoned".to_string())?;
        if let Some(r) = m.get(&vpg) {
            return Ok(r.clone());
        }
        let r = Arc::new(VpgReplica::open(&self.opts.root, vpg, self.opts.journal.clone()).map_err(|e| e.to_string())?);
        m.insert(vpg, r.clone());
        Ok(r)
    }

    /// Opens every VPG replica found under the root (after a restart).
    pub fn open_existing(&self) -> io::Result<()> {
        for entry in std::fs::read_dir(&self.opts.root)? {
            let entry = entry?;
            if let Some(id) = entry.file_name().to_str().and_then(|s| uuid::Uuid::parse_str(s).ok()) {
                self.replica(VpgId(id)).map_err(io::Error::other)?;
            }
        }
        Ok(())
    }

    pub fn replicas(&self) -> Vec<Arc<VpgReplica>> {
        self.vpgs.lock().map(|m| m.values().cloned().collect()).unwrap_or_default()
    }

    /// Makes every journal durable (before a clean shutdown).
    pub fn sync_all(&self) {
        for r in self.replicas() {
            if let Err(e) = r.journal.sync() {
                tracing::error!(vpg = %r.vpg.0, "sync before shutdown failed: {e}");
            }
        }
    }

    /// Accepts links forever, each on a thread of its own.
    pub fn serve(self: &Arc<Self>, listener: TcpListener, tls: ServerTls) {
        for conn in listener.incoming() {
            let tcp = match conn {
                Ok(t) => t,
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    continue;
                }
            };
            let cfg = match tls.read() {
                Ok(c) => c.clone(),
                Err(_) => continue,
            };
            let me = self.clone();
            std::thread::spawn(move || me.serve_link(tcp, cfg));
        }
    }

    fn serve_link(self: &Arc<Self>, tcp: TcpStream, cfg: Arc<rustls::ServerConfig>) {
        let peer = tcp.peer_addr().map_or_else(|_| "?".to_string(), |a: SocketAddr| a.to_string());
        let hb = self.opts.heartbeat;
        let setup = tcp
            .set_nodelay(true)
            .and_then(|_| tcp.set_read_timeout(Some(hb * 3)))
            .and_then(|_| tcp.set_write_timeout(Some(hb * 3)));
        let registered = setup.and_then(|_| tcp.try_clone());
        let tcp_clone = match registered {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(%peer, "link setup failed: {e}");
                return;
            }
        };
        let link_id = self.next_link.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut live) = self.live.lock() {
            live.insert(link_id, LiveLink { tcp: tcp_clone, stream: None });
        }
        self.serve_tls(link_id, &peer, tcp, cfg);
        if let Ok(mut live) = self.live.lock() {
            live.remove(&link_id);
        }
    }

    fn serve_tls(self: &Arc<Self>, link_id: u64, peer: &str, tcp: TcpStream, cfg: Arc<rustls::ServerConfig>) {
        let (mut r, w) = match tls::accept(cfg, tcp) {
            Ok(x) => x,
            Err(e) => {
                let hint = if e.to_string().contains("certificate") {
                    " (the peer's certificate is not signed by the CA of a paired site)"
                } else {
                    ""
                };
                tracing::warn!(%peer, "refused link: TLS handshake failed: {e}{hint}");
                return;
            }
        };
        let w = Arc::new(Mutex::new(w));
        let stop = Arc::new(AtomicBool::new(false));
        let result = self.run_link(link_id, peer, &mut r, &w, &stop);
        stop.store(true, Ordering::SeqCst);
        match result {
            Ok(()) => tracing::info!(%peer, "link closed"),
            Err(LinkError::Refused(reason)) => {
                tracing::warn!(%peer, "refused link: {reason}");
                if let Ok(mut w) = w.lock() {
                    let _ = write_frame(&mut *w, VERSION, msg::REFUSE, &Refuse { reason }.encode());
                }
            }
            Err(LinkError::Frame(
                e @ (FrameError::Checksum { .. }
                | FrameError::Version { .. }
                | FrameError::BadMagic(_)
                | FrameError::Malformed { .. }
                | FrameError::TooLong { .. }
                | FrameError::UnexpectedKind(_)),
            )) => {
                let reason = format!("bad frame: {e}");
                tracing::warn!(%peer, "refused link: {reason}");
                if let Ok(mut w) = w.lock() {
                    let _ = write_frame(&mut *w, VERSION, msg::REFUSE, &Refuse { reason }.encode());
                }
            }
            // The journal failed (a full disk, an I/O error): the source is
            // told why, so its status names the cause rather than a closed
            // link.
            Err(LinkError::Journal(e)) => {
                let reason = format!("the recovery site's journal failed: {e}");
                tracing::error!(%peer, "{reason}");
                if let Ok(mut w) = w.lock() {
                    let _ = write_frame(&mut *w, VERSION, msg::REFUSE, &Refuse { reason }.encode());
                }
            }
            Err(e) => tracing::warn!(%peer, "link lost: {e}"),
        }
        let guard = w.lock();
        if let Ok(w) = guard {
            w.shutdown();
        }
    }

    fn run_link(
        self: &Arc<Self>,
        link_id: u64,
        peer: &str,
        r: &mut tls::LinkReader,
        w: &Arc<Mutex<LinkWriter>>,
        stop: &Arc<AtomicBool>,
    ) -> Result<(), LinkError> {
        let f = read_frame(r)?;
        if f.kind != msg::HELLO {
            return Err(FrameError::UnexpectedKind(f.kind).into());
        }
        let hello = Hello::decode(&f.payload)?;
        self.check_defined(hello.vpg, hello.stream)?;
        if let Ok(mut live) = self.live.lock() {
            if let Some(l) = live.get_mut(&link_id) {
                l.stream = Some((hello.vpg, hello.stream));
            }
        }
        let replica = self.replica(hello.vpg).map_err(LinkError::Refused)?;
        let epoch = replica.epoch();
        if hello.epoch < epoch {
            return Err(LinkError::Refused(format!(
                "site {} sends VPG {} with epoch {}, older than the VPG's epoch {epoch}: that source was demoted",
                hello.site, hello.vpg.0, hello.epoch
            )));
        }
        if hello.epoch > epoch {
            replica.store_epoch(hello.epoch)?;
        }
        let known = replica.journal.disks()?;
        for (disk, size) in &hello.disks {
            match known.iter().find(|d| d.id == *disk) {
                // A larger size is a resize the stream still carries (in
                // order with the writes); a protected disk never shrinks.
                Some(d) if d.size > *size => {
                    return Err(LinkError::Refused(format!(
                        "disk {} is {} bytes here, the source says {size}: a protected disk cannot shrink",
                        disk.0, d.size
                    )))
                }
                Some(_) => {}
                None => match self.seed_of(hello.vpg, *disk) {
                    Some(seed) => {
                        let seeded = std::fs::metadata(&seed).map(|m| m.len()).unwrap_or(0);
                        if seeded != *size {
                            return Err(LinkError::Refused(format!(
                                "disk {} is {size} bytes at the source, its seed {} here is {seeded}",
                                disk.0,
                                seed.display()
                            )));
                        }
                        replica.journal.add_seeded_disk(*disk, &seed)?;
                        tracing::info!(vpg = %hello.vpg, disk = %disk.0, seed = %seed.display(), "disk seeded");
                    }
                    None => replica.journal.add_disk(*disk, *size)?,
                },
            }
        }
        let slot = replica.slot(hello.stream)?;
        let generation = slot.generation.fetch_add(1, Ordering::SeqCst) + 1;
        let welcome = {
            let _g = slot.ingest.lock();
            // Synced first: what the welcome says the target holds is durable.
            replica.journal.sync()?;
            let seq = replica.journal.stream_position(hello.stream)?.map_or(0, |c| c.seq);
            Welcome { resume_after_seq: seq, last_checkpoint: replica.newest_checkpoint()? }
        };
        send(w, msg::WELCOME, &welcome.encode())?;
        tracing::info!(%peer, site = %hello.site, vpg = %hello.vpg.0, resume_after = welcome.resume_after_seq, "link up");
        let link = Link {
            replica: replica.clone(),
            stream: hello.stream,
            epoch: hello.epoch,
            slot,
            generation,
            pending: VecDeque::new(),
            promised: HashSet::new(),
            acked: AtomicU64::new(welcome.resume_after_seq),
            acked_marker: AtomicU64::new(welcome.last_checkpoint),
            last_marker: AtomicU64::new(welcome.last_checkpoint),
        };
        let link = Arc::new(Mutex::new(link));
        self.spawn_ticker(link.clone(), w.clone(), stop.clone());
        loop {
            let f = read_frame(r)?;
            let mut l = link.lock().map_err(|_| io::Error::other("link poisoned"))?;
            match f.kind {
                msg::OFFER => {
                    let need = l.on_offer(Offer::decode(&f.payload)?)?;
                    send(w, msg::NEED, &need.encode())?;
                }
                msg::BLOCKS => {
                    let acked = l.on_blocks(Blocks::decode_owned(f.payload)?)?;
                    if let Some(ack) = acked {
                        send(w, msg::ACK, &ack.encode())?;
                    }
                }
                msg::HEARTBEAT => {}
                k => return Err(FrameError::UnexpectedKind(k).into()),
            }
        }
    }

    /// Group commit and liveness: every 50 ms makes the stream durable and
    /// acknowledges it if it moved; a heartbeat at least every interval.
    fn spawn_ticker(&self, link: Arc<Mutex<Link>>, w: Arc<Mutex<LinkWriter>>, stop: Arc<AtomicBool>) {
        let hb = self.opts.heartbeat;
        std::thread::spawn(move || {
            let mut last_beat = Instant::now();
            while !stop.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(50));
                let ack = match link.lock() {
                    Ok(l) => l.durable_ack(false),
                    Err(_) => return,
                };
                match ack {
                    Ok(Some(a)) => {
                        if send(&w, msg::ACK, &a.encode()).is_err() {
                            return;
                        }
                    }
                    Ok(None) => {}
                    Err(e) => {
                        tracing::error!("group commit failed: {e}");
                        return;
                    }
                }
                if last_beat.elapsed() >= hb {
                    if send(&w, msg::HEARTBEAT, &now_ms().to_be_bytes()).is_err() {
                        return;
                    }
                    last_beat = Instant::now();
                }
            }
        });
    }
}

fn send(w: &Arc<Mutex<LinkWriter>>, kind: u16, payload: &[u8]) -> Result<(), LinkError> {
    let mut w = w.lock().map_err(|_| io::Error::other("link writer poisoned"))?;
    write_frame(&mut *w, VERSION, kind, payload)?;
    Ok(())
}

/// Writes of a batch between two markers, ready for the journal: each with
/// its bytes (borrowed from the batch where possible) and block kinds.
type Run<'a> = Vec<(OfferedWrite, Cow<'a, [u8]>, Vec<WireBlock>)>;

/// One link's ingest state.
#[derive(Debug)]
struct Link {
    replica: Arc<VpgReplica>,
    stream: StreamId,
    epoch: u64,
    slot: Arc<StreamSlot>,
    generation: u64,
    /// Offers answered and waiting for their blocks, with which hashed
    /// blocks were asked for.
    pending: VecDeque<(Offer, Vec<bool>)>,
    /// Hashes asked for in pending offers: a later offer need not ask again.
    promised: HashSet<[u8; 32]>,
    /// What the last ACK said: the stream's durable seq and its newest
    /// marker.
    acked: AtomicU64,
    acked_marker: AtomicU64,
    /// The newest marker of this stream placed (recorded, or waiting for
    /// the VPG's other streams): the source may forget it once durable.
    last_marker: AtomicU64,
}

impl Link {
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

    /// Which offered blocks this site lacks.
    fn on_offer(&mut self, offer: Offer) -> Result<Need, LinkError> {
        self.check_current()?;
        if offer.epoch != self.epoch {
            return Err(LinkError::Refused(format!(
                "batch {} carries epoch {}, the link was opened with {}",
                offer.batch, offer.epoch, self.epoch
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
        let held = self.replica.journal.holds(&queries)?;
        let mut bits = Vec::with_capacity(queries.len());
        for (q, held) in queries.iter().zip(held) {
            let need = !held && self.promised.insert(q.hash);
            bits.push(need);
        }
        self.pending.push_back((offer, bits.clone()));
        Ok(Need { batch: self.pending.back().map_or(0, |p| p.0.batch), bits })
    }

    /// Ingests the batch the blocks fill, in order, with its markers.
    fn on_blocks(&mut self, blocks: Blocks) -> Result<Option<Ack>, LinkError> {
        self.check_current()?;
        let (offer, bits) = self
            .pending
            .pop_front()
            .ok_or_else(|| LinkError::Refused(format!("blocks for batch {} that was never offered", blocks.batch)))?;
        if offer.batch != blocks.batch {
            return Err(LinkError::Refused(format!(
                "blocks for batch {} arrived, batch {} was next",
                blocks.batch, offer.batch
            )));
        }
        let data = if blocks.compressed {
            zstd::bulk::decompress(&blocks.data, blocks.raw_len as usize).map_err(|e| {
                LinkError::Refused(format!("batch {}: zstd data does not decompress: {e}", blocks.batch))
            })?
        } else {
            blocks.data
        };
        if data.len() != blocks.raw_len as usize {
            return Err(LinkError::Refused(format!(
                "batch {}: {} data bytes, {} announced",
                blocks.batch,
                data.len(),
                blocks.raw_len
            )));
        }
        let _g = self.slot.ingest.lock().map_err(|_| io::Error::other("stream slot poisoned"))?;
        self.check_current()?;
        let mut cursor = 0usize;
        let mut bit = 0usize;
        let mut run: Run<'_> = Vec::new();
        let mut ack = None;
        for item in &offer.items {
            match item {
                OfferItem::Write(w) => {
                    let (buf, wb) = assemble(w, &data, &mut cursor, &bits, &mut bit)?;
                    run.push((w.clone(), buf, wb));
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
        for item in &offer.items {
            if let OfferItem::Write(w) = item {
                for b in &w.blocks {
                    if let OfferedBlock::Hash(h) = b {
                        self.promised.remove(h);
                    }
                }
            }
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
        self.replica.journal.ingest_wire(self.stream, &writes, &blocks)?;
        run.clear();
        Ok(())
    }

    /// Places this stream's cut for the checkpoint; records the checkpoint
    /// (durably) once every stream of the VPG has. Returns whether it did.
    fn on_marker(&self, m: &Marker) -> Result<bool, LinkError> {
        let pos = self.replica.journal.stream_position(self.stream)?;
        let cut = pos.unwrap_or(Cut { stream: self.stream, lsn: 0, seq: 0 });
        if cut.seq != m.cut_seq {
            return Err(LinkError::Refused(format!(
                "checkpoint {} is cut at seq {}, but the stream is at seq {}",
                m.id, m.cut_seq, cut.seq
            )));
        }
        self.last_marker.fetch_max(m.id, Ordering::Relaxed);
        if m.id <= self.replica.newest_checkpoint()? {
            return Ok(false); // a resent marker
        }
        let mut pending = self.replica.pending.lock().map_err(|_| io::Error::other("checkpoints poisoned"))?;
        let p = pending.entry(m.id).or_insert_with(|| PendingCheckpoint { marker: m.clone(), cuts: Vec::new() });
        p.cuts.retain(|c| c.stream != self.stream);
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
        let cp = self.replica.journal.mark_checkpoint(CheckpointSpec {
            id: CheckpointId(m.id),
            kind: p.marker.kind,
            name: p.marker.name.clone(),
            source_time_ms: p.marker.source_time_ms,
            cuts: p.cuts,
        })?;
        if cp.kind.is_recoverable() {
            self.replica.newest_consistent_ms.fetch_max(cp.source_time_ms, Ordering::Relaxed);
        }
        Ok(true)
    }

    /// Makes the stream durable and returns the ack to send, if its seq or
    /// its newest marker moved (or `force`). A marker alone in its batch
    /// moves no seq, and the source keeps it queued until it is acked.
    fn durable_ack(&self, force: bool) -> Result<Option<Ack>, JournalError> {
        let seq = self.replica.journal.stream_position(self.stream)?.map_or(0, |c| c.seq);
        let marker = self.last_marker.load(Ordering::Relaxed);
        if !force && seq == self.acked.load(Ordering::Relaxed) && marker == self.acked_marker.load(Ordering::Relaxed) {
            return Ok(None);
        }
        self.replica.journal.sync()?;
        self.acked.store(seq, Ordering::Relaxed);
        self.acked_marker.store(marker, Ordering::Relaxed);
        Ok(Some(Ack {
            durable_seq: seq,
            durable_checkpoint: marker,
            newest_consistent_ms: self.replica.newest_consistent_ms.load(Ordering::Relaxed),
        }))
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
