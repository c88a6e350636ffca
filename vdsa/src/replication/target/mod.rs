//! The target side of replication: accepts TLS links from source VDSAs,
//! checks who they are and their epoch, tells each source where to resume,
//! asks only for the blocks its journal lacks, ingests each stream strictly
//! in seq order, records checkpoints once every stream of the VPG placed
//! its marker, and acknowledges what is durable (architecture.md §2–§5).
//! Each link is served on the links' runtime (no thread of its own), after
//! its welcome as a receive/ingest pipeline ([`link`]).

mod link;

use self::link::{send, LinkLease, SharedWriter, StreamSlot, Welcomed};
use super::calls::blocking_call;
use super::now_ms;
use super::LinkError;
use crate::conn_limit::{ConnectionLimit, MAX_REPLICATION_LINKS};
use crate::journal::{Cut, Journal, JournalConfig, JournalError};
use crate::serving::{self, Pool};
use crate::wire::async_link::{self, AsyncLinkReader};
use crate::wire::frame::{read_frame_async, write_frame_async, FrameError};
use crate::wire::msg::{self, Hello, Marker, Refuse, Welcome};
use protection_groups::{StreamId, VpgId};
use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The shared chunk store's folder under a target's root (its name is no
/// VPG id, so [`TargetServer::open_existing`] passes it over).
pub const CHUNK_STORE_DIR: &str = "chunk-store";

#[derive(Debug, Clone)]
pub struct TargetOptions {
    /// One folder per VPG under here: `<vpg id>/journal`, `<vpg id>/epoch`.
    pub root: PathBuf,
    pub heartbeat: Duration,
    pub journal: JournalConfig,
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
    /// The target's count of acknowledged markers, shared by its VPGs (see
    /// [`TargetServer::markers_made_durable`]).
    markers_made_durable: Arc<AtomicU64>,
}

impl VpgReplica {
    /// `markers_made_durable`: the target's count it adds to.
    fn open(
        root: &Path,
        vpg: VpgId,
        cfg: JournalConfig,
        markers_made_durable: Arc<AtomicU64>,
    ) -> Result<VpgReplica, LinkError> {
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
            markers_made_durable,
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

/// A live link, so it can be closed from outside its task.
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
    /// Held while a journal opens or closes: one at a time, as the members
    /// of the shared chunk store have always opened, but without holding
    /// `vpgs`, so that the links of other VPGs (which ask the map for
    /// their siblings at every offer) never wait for an open, which takes
    /// seconds for a large journal and minutes for one moving into the
    /// shared store.
    opening: Mutex<()>,
    /// Under a site manager: only these VPGs and streams are accepted.
    /// None (the standalone `target` command) accepts any VPG a trusted
    /// peer sends.
    defined: Mutex<Option<HashMap<VpgId, TargetDefinition>>>,
    live: Mutex<HashMap<u64, LiveLink>>,
    next_link: AtomicU64,
    markers_made_durable: Arc<AtomicU64>,
}

impl TargetServer {
    /// How many times a stream's newest marker became durable and was
    /// acknowledged, over all VPGs: the agent reports soon after it moves,
    /// so that the site manager learns of a durable checkpoint within a
    /// fraction of a heartbeat (the RPO it shows includes that delay).
    pub fn markers_made_durable(&self) -> u64 {
        self.markers_made_durable.load(Ordering::Relaxed)
    }

    /// The VPGs' journals under `opts.root` share one chunk store there
    /// (`chunk-store`) unless `opts.journal` names another: a block that
    /// many VPGs hold is stored once (architecture.md §4).
    pub fn new(mut opts: TargetOptions) -> Arc<TargetServer> {
        if opts.journal.chunk_store.is_none() {
            opts.journal.chunk_store = Some(opts.root.join(CHUNK_STORE_DIR));
        }
        Arc::new(TargetServer {
            opts,
            vpgs: Mutex::new(HashMap::new()),
            opening: Mutex::new(()),
            defined: Mutex::new(None),
            live: Mutex::new(HashMap::new()),
            next_link: AtomicU64::new(1),
            markers_made_durable: Arc::default(),
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
        {
            let _opening = self.opening.lock().map_err(|_| "poisoned".to_string())?;
            if let Ok(mut m) = self.vpgs.lock() {
                m.remove(&vpg);
            }
        }
        self.replica(vpg).map(|_| ())
    }

    /// Closes a VPG's journal (its role was removed); its files stay. An
    /// open of it under way finishes first, so it does not stay open.
    pub fn close(&self, vpg: VpgId) {
        let _opening = self.opening.lock();
        let removed = self.vpgs.lock().ok().and_then(|mut m| m.remove(&vpg));
        if let Some(r) = removed {
            if let Err(e) = r.journal.sync() {
                tracing::error!(%vpg, "sync on close failed: {e}");
            }
        }
    }

    /// The replica of `vpg`, opened on first use.
    pub fn replica(&self, vpg: VpgId) -> Result<Arc<VpgReplica>, String> {
        let open = |m: &HashMap<VpgId, Arc<VpgReplica>>| m.get(&vpg).cloned();
        if let Some(r) = open(&*self.vpgs.lock().map_err(|_| "poisoned".to_string())?) {
            return Ok(r);
        }
        let _opening = self.opening.lock().map_err(|_| "poisoned".to_string())?;
        // Another caller may have opened it while this one waited.
        if let Some(r) = open(&*self.vpgs.lock().map_err(|_| "poisoned".to_string())?) {
            return Ok(r);
        }
        let r = VpgReplica::open(&self.opts.root, vpg, self.opts.journal.clone(), self.markers_made_durable.clone())
            .map_err(|e| e.to_string())?;
        let r = Arc::new(r);
        self.vpgs.lock().map_err(|_| "poisoned".to_string())?.insert(vpg, r.clone());
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

    /// Accepts links forever on the calling thread; each is served on the
    /// links' runtime (docs/architecture.md, "Threads").
    pub fn serve(self: &Arc<Self>, listener: TcpListener, tls: ServerTls) {
        let limit = ConnectionLimit::new(MAX_REPLICATION_LINKS, "replication links");
        let rt = match serving::runtime(Pool::Links) {
            Ok(rt) => rt,
            Err(e) => {
                tracing::error!("replication links cannot be served: {e}");
                return;
            }
        };
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
            // Past the limit the connection is closed before its handshake;
            // the source retries with its back-off.
            let Some(slot) = limit.try_take() else { continue };
            let me = self.clone();
            rt.spawn(async move {
                me.serve_link(tcp, cfg).await;
                drop(slot);
            });
        }
    }

    async fn serve_link(self: &Arc<Self>, tcp: TcpStream, cfg: Arc<rustls::ServerConfig>) {
        let peer = tcp.peer_addr().map_or_else(|_| "?".to_string(), |a: SocketAddr| a.to_string());
        let registered = tcp.set_nodelay(true).and_then(|_| tcp.try_clone());
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
        self.serve_tls(link_id, &peer, tcp, cfg).await;
        if let Ok(mut live) = self.live.lock() {
            live.remove(&link_id);
        }
    }

    async fn serve_tls(self: &Arc<Self>, link_id: u64, peer: &str, tcp: TcpStream, cfg: Arc<rustls::ServerConfig>) {
        let timeout = self.opts.heartbeat * 3;
        let setup = tcp.try_clone().and_then(|socket| {
            tcp.set_nonblocking(true)?;
            Ok((socket, tokio::net::TcpStream::from_std(tcp)?))
        });
        let (socket, tcp) = match setup {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(%peer, "link setup failed: {e}");
                return;
            }
        };
        let (mut r, w) = match async_link::accept(cfg, tcp, timeout).await {
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
        let w: SharedWriter = Arc::new(tokio::sync::Mutex::new(w));
        let result = self.run_link(link_id, peer, &mut r, &w, &socket).await;
        let refusal = match result {
            Ok(()) => {
                tracing::info!(%peer, "link closed");
                None
            }
            Err(LinkError::Refused(reason)) => {
                tracing::warn!(%peer, "refused link: {reason}");
                Some(reason)
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
                Some(reason)
            }
            // The journal failed (a full disk, an I/O error): the source is
            // told why, so its status names the cause rather than a closed
            // link.
            Err(LinkError::Journal(e)) => {
                let reason = format!("the recovery site's journal failed: {e}");
                tracing::error!(%peer, "{reason}");
                Some(reason)
            }
            Err(e) => {
                tracing::warn!(%peer, "link lost: {e}");
                None
            }
        };
        if let Some(reason) = refusal {
            let _ = write_frame_async(&mut *w.lock().await, msg::REFUSE, &Refuse { reason }.encode()).await;
        }
        let _ = socket.shutdown(std::net::Shutdown::Both);
    }

    async fn run_link(
        self: &Arc<Self>,
        link_id: u64,
        peer: &str,
        r: &mut AsyncLinkReader,
        w: &SharedWriter,
        tcp: &TcpStream,
    ) -> Result<(), LinkError> {
        let f = read_frame_async(r).await?;
        if f.kind != msg::HELLO {
            return Err(FrameError::UnexpectedKind(f.kind).into());
        }
        let hello = Hello::decode(&f.payload)?;
        // Opening the journal, adding disks and the sync block.
        let (me, hi) = (self.clone(), hello.clone());
        let (lease, welcome) = blocking_call(move || me.welcome(link_id, &hi)).await??;
        send(w, msg::WELCOME, &welcome.encode()).await?;
        tracing::info!(%peer, site = %hello.site, vpg = %hello.vpg.0, resume_after = welcome.resume_after_seq, "link up");
        let welcomed = Welcomed { durable_seq: welcome.resume_after_seq, last_checkpoint: welcome.last_checkpoint };
        let server = Arc::downgrade(self);
        let siblings: link::Siblings = Arc::new(move || server.upgrade().map(|s| s.replicas()).unwrap_or_default());
        let around = link::LinkSurroundings { heartbeat: self.opts.heartbeat, siblings };
        link::serve(lease, welcomed, r, w, tcp, around).await
    }

    /// Checks a link's hello against the VPG's definition and epoch, adds
    /// the disks the journal does not have yet, and takes the stream's
    /// slot: the lease the link runs under and where its stream resumes.
    fn welcome(&self, link_id: u64, hello: &Hello) -> Result<(LinkLease, Welcome), LinkError> {
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
        Ok((LinkLease { replica, stream: hello.stream, epoch: hello.epoch, slot, generation }, welcome))
    }
}
