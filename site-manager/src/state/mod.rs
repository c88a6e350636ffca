//! The running site manager: its store, its CA, and the services the API
//! and the management link share (tokens, audit, tasks), with the parts
//! the daemon's services keep in memory (the alert book, log requests,
//! what the paired site said, recovery VM jobs). Nothing here imports
//! the services that use it: they take a `&SiteManager`, so the imports
//! run one way (docs/architecture.md, "The site manager's modules").

use crate::model::{now_ms, AuditEntry, CompletionCode, CreatedToken, Role, Site, Task, TaskDriver, TaskStatus, Token};
use crate::pki::{sha256_hex, SitePki};
use crate::store::{uuid_key, Store, StoreError, StoredToken};
use protection_groups::{HostId, VpgId};
use rand::RngCore;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use uuid::Uuid;

mod alerts;
mod log_requests;
mod peer;
mod recovery_vm_jobs;

pub use alerts::Alerts;
pub use log_requests::LogCollector;
pub use peer::Peering;
pub use recovery_vm_jobs::RecoveryVmJobs;

/// What `serve` was started with.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub data: PathBuf,
    pub api_listen: std::net::SocketAddr,
    pub management_listen: std::net::SocketAddr,
    /// Control runs of the write-order checker only: checkpoints without
    /// the barrier.
    pub unsafe_no_barrier: bool,
    /// Fault injection for tests: die after the PREPAREs of the Nth
    /// barrier (0: never).
    pub fault_kill_after_prepare: u64,
}

/// The daemon's shared state.
#[derive(Debug)]
pub struct SiteManager {
    pub store: RwLock<Store>,
    pub pki: SitePki,
    pub config: ServeConfig,
    /// Woken when desired state changed: the reconciler runs.
    pub changes: tokio::sync::Notify,
    /// Connected VDSAs.
    pub links: crate::links::Links,
    pub coordinator: crate::coordinator::Coordinator,
    /// The paired site: the API's certificate check, its hosts and the
    /// target roles it runs for this site's VPGs.
    pub peering: Peering,
    /// Log requests to VDSAs waiting for their answers.
    pub logs: LogCollector,
    /// Where the management links and the barrier's rounds run.
    pub barrier: crate::barrier_thread::BarrierThread,
    /// vCenter jobs that make and remove tests' VMs.
    pub recovery_vms: Arc<RecoveryVmJobs>,
    /// Raised and cleared alerts, and the webhook's queue.
    pub alerts: Alerts,
    /// Each VPG's bytes written and sent over the last hour, for sizing.
    pub rates: crate::sizing::RateRecorder,
    /// Each protected VPG's encryption detector.
    pub encryption: crate::encryption::EncryptionWatch,
}

/// A VDSA without a heartbeat for this long shows as down.
pub const HEARTBEAT_LIMIT_MS: u64 = 10_000;

/// A random secret, hex.
pub fn new_secret() -> String {
    let mut b = [0u8; 24];
    rand::thread_rng().fill_bytes(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn poisoned() -> StoreError {
    StoreError::Corrupt { tree: "meta", key: "store".into(), why: "lock poisoned".into() }
}

impl SiteManager {
    /// Runs `f` with the store (shared).
    pub fn with_store<T>(&self, f: impl FnOnce(&Store) -> Result<T, StoreError>) -> Result<T, StoreError> {
        let s = self.store.read().map_err(|_| poisoned())?;
        f(&s)
    }

    pub fn with_store_mut<T>(&self, f: impl FnOnce(&mut Store) -> Result<T, StoreError>) -> Result<T, StoreError> {
        let mut s = self.store.write().map_err(|_| poisoned())?;
        f(&mut s)
    }

    pub fn new(store: Store, pki: SitePki, config: ServeConfig, barrier: crate::barrier_thread::BarrierThread) -> Self {
        SiteManager {
            barrier,
            store: RwLock::new(store),
            pki,
            config,
            changes: tokio::sync::Notify::new(),
            links: Default::default(),
            coordinator: Default::default(),
            peering: Default::default(),
            logs: Default::default(),
            recovery_vms: Default::default(),
            alerts: Default::default(),
            encryption: Default::default(),
            rates: Default::default(),
        }
    }

    /// Takes a checkpoint of a VPG through the barrier (on the barrier
    /// thread) and records it.
    pub async fn take_checkpoint(
        self: &std::sync::Arc<Self>,
        req: crate::coordinator::CheckpointRequest,
    ) -> Result<crate::coordinator::BarrierOutcome, StoreError> {
        let sm = self.clone();
        let round = async move { sm.coordinator.take_checkpoint(&sm.links, &sm.store, sm.generation(), req).await };
        self.barrier.run(round).await
    }

    /// Says that desired state changed.
    pub fn changed(&self) {
        self.changes.notify_one();
    }

    /// Where VDSAs dial: the site's address and the management port.
    pub fn management_address(&self) -> String {
        let port = self.config.management_listen.port();
        match self.site() {
            Ok(site) if !site.address.is_empty() => format!("{}:{port}", site.address),
            _ => self.config.management_listen.to_string(),
        }
    }

    /// The paired site as stored, if the site is paired.
    pub fn stored_peer(&self) -> Result<Option<crate::store::StoredPeer>, StoreError> {
        self.with_store(|s| s.peer.get(crate::store::PEER_KEY))
    }

    /// The paired site's id, if the site is paired.
    pub fn peer_site_id(&self) -> Result<Option<protection_groups::SiteId>, StoreError> {
        Ok(self.stored_peer()?.map(|p| p.peer.site))
    }

    /// Where the other site and operators reach the API: the site's
    /// address and the API port.
    pub fn api_address(&self) -> String {
        let port = self.config.api_listen.port();
        match self.site() {
            Ok(site) if !site.address.is_empty() => format!("{}:{port}", site.address),
            _ => self.config.api_listen.to_string(),
        }
    }

    /// Hosts with their VDSA's health: a registered VDSA counts as
    /// installed only while it is connected and reporting; otherwise it
    /// shows as down (also right after a site manager restart, until it
    /// dials back in).
    pub fn hosts_with_health(&self) -> Result<Vec<crate::model::Host>, StoreError> {
        let now = now_ms();
        let mut hosts = self.with_store(|s| s.hosts.list())?;
        let links = self.links.snapshot();
        for h in &mut hosts {
            let live = links.get(&h.id).filter(|l| now.saturating_sub(l.last_seen_ms) <= HEARTBEAT_LIMIT_MS);
            if let Some(l) = links.get(&h.id) {
                h.last_heartbeat_ms = Some(l.last_seen_ms);
            }
            if matches!(h.vdsa, crate::model::VdsaState::Installed | crate::model::VdsaState::Down) {
                h.vdsa =
                    if live.is_some() { crate::model::VdsaState::Installed } else { crate::model::VdsaState::Down };
            }
        }
        Ok(hosts)
    }

    /// Raises the generation and the checkpoint ids above what the VDSAs
    /// reported. Returns (generation, checkpoint floor).
    pub fn reclaim(&self) -> Result<(u64, u64), StoreError> {
        let hosts = self.with_store(|s| s.hosts.list())?;
        let generation_seen = hosts.iter().map(|h| h.vdsa_generation).max().unwrap_or(0);
        let cp_seen = hosts.iter().map(|h| h.vdsa_newest_checkpoint).max().unwrap_or(0);
        let g = self.with_store_mut(|s| s.reclaim(protection_groups::CheckpointId(cp_seen), generation_seen))?;
        tracing::warn!(
            generation = g,
            checkpoint_floor = cp_seen,
            "reclaimed: this site manager steers its VDSAs again"
        );
        self.changed();
        Ok((g, cp_seen))
    }

    pub fn generation(&self) -> u64 {
        self.store.read().map_or(0, |s| s.generation())
    }

    pub fn site(&self) -> Result<Site, StoreError> {
        let mut site = self.with_store(|s| s.site.get(b"site"))?.ok_or_else(|| StoreError::Corrupt {
            tree: "site",
            key: "site".into(),
            why: "missing".into(),
        })?;
        site.generation = self.generation();
        Ok(site)
    }

    /// Creates a token; the secret is returned once and only its hash kept.
    pub fn create_token(&self, name: &str, role: Role) -> Result<CreatedToken, StoreError> {
        let secret = format!("smt_{}", new_secret());
        let token = Token { id: Uuid::new_v4(), name: name.to_string(), role, created_ms: now_ms(), revoked_ms: None };
        let stored = StoredToken { token: token.clone(), secret_hash: sha256_hex(secret.as_bytes()) };
        self.with_store(|s| s.tokens.put(&uuid_key(&token.id), &stored))?;
        Ok(CreatedToken { token, secret })
    }

    /// The live token whose secret this is.
    pub fn authenticate(&self, secret: &str) -> Result<Option<Token>, StoreError> {
        let hash = sha256_hex(secret.as_bytes());
        let tokens = self.with_store(|s| s.tokens.list())?;
        // Hashes are compared, not secrets: how long a comparison takes
        // tells nothing usable about a secret.
        let found = tokens.into_iter().find(|t| t.secret_hash == hash).map(|t| t.token);
        Ok(found.filter(|t| t.revoked_ms.is_none()))
    }

    pub fn audit(&self, who: &str, token: Option<Uuid>, method: &str, path: &str, status: u16) {
        let r = self.with_store(|s| {
            let seq = s.next_audit_seq()?;
            let e = AuditEntry {
                seq,
                time_ms: now_ms(),
                who: who.to_string(),
                token,
                method: method.to_string(),
                path: path.to_string(),
                status,
            };
            s.audit.put(&seq.to_be_bytes(), &e)
        });
        if let Err(e) = r {
            tracing::error!(error = %e, "cannot write the audit log");
        }
    }

    /// Starts a task (Running, NotAvailable).
    pub fn start_task(
        &self,
        kind: &str,
        description: String,
        vpg: Option<VpgId>,
        host: Option<HostId>,
        driver: TaskDriver,
    ) -> Result<Task, StoreError> {
        let t = Task {
            id: Uuid::new_v4(),
            kind: kind.to_string(),
            description,
            vpg,
            host,
            status: TaskStatus::Running,
            completion: CompletionCode::NotAvailable,
            driver,
            progress: 0,
            started_ms: now_ms(),
            ended_ms: None,
            result: serde_json::Value::Null,
            exception: None,
        };
        self.with_store(|s| s.tasks.put(&uuid_key(&t.id), &t))?;
        Ok(t)
    }

    /// Changes a running task; a finished one is left as it is.
    pub fn update_task(&self, id: Uuid, f: impl FnOnce(&mut Task)) -> Result<Option<Task>, StoreError> {
        self.with_store(|s| {
            let Some(mut t) = s.tasks.get(&uuid_key(&id))? else { return Ok(None) };
            if t.is_finished() {
                return Ok(Some(t));
            }
            f(&mut t);
            if t.is_finished() && t.ended_ms.is_none() {
                t.ended_ms = Some(now_ms());
            }
            s.tasks.put(&uuid_key(&id), &t)?;
            Ok(Some(t))
        })
    }

    pub fn finish_task(
        &self,
        id: Uuid,
        completion: CompletionCode,
        result: serde_json::Value,
        exception: Option<String>,
    ) -> Result<Option<Task>, StoreError> {
        self.update_task(id, |t| {
            t.status = if completion == CompletionCode::Aborted { TaskStatus::Aborted } else { TaskStatus::Completed };
            t.completion = completion;
            if completion == CompletionCode::Success {
                t.progress = 100;
            }
            t.result = result;
            t.exception = exception;
        })
    }

    /// After a restart: steps this site manager drove are aborted with the
    /// reason; work a VDSA carries is taken back (left running).
    pub fn take_back_tasks(&self) -> Result<(usize, usize), StoreError> {
        let tasks = self.with_store(|s| s.tasks.list())?;
        let (mut aborted, mut resumed) = (0, 0);
        for t in tasks.into_iter().filter(|t| !t.is_finished()) {
            match t.driver {
                TaskDriver::SiteManager => {
                    self.finish_task(
                        t.id,
                        CompletionCode::Aborted,
                        serde_json::Value::Null,
                        Some("the site manager restarted while it ran this step".into()),
                    )?;
                    aborted += 1;
                }
                TaskDriver::Vdsa => resumed += 1,
            }
        }
        Ok((aborted, resumed))
    }
}
