//! The site manager's persistent state in an embedded sled database: one
//! tree per resource, values as the API serves them (JSON), a schema
//! version with migrations, the manager generation and the checkpoint id
//! counter (docs/site-manager-store.md).
//!
//! Every change is flushed (sled fsyncs) before the call returns, so a
//! change the API acknowledged survives a SIGKILL or power cut.

use crate::model::{AuditEntry, Checkpoint, Host, Site, Task, Token, Vpg};
use protection_groups::{CheckpointId, HostId, VpgId};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::path::Path;
use std::sync::Mutex;
use uuid::Uuid;

/// The schema this build writes. Older stores are migrated at open; a newer
/// one is refused.
pub const SCHEMA_VERSION: u64 = 1;

/// Checkpoint ids are leased from the store this many at a time, so that
/// ids keep growing across restarts without a flush per checkpoint.
const CHECKPOINT_ID_LEASE: u64 = 1024;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store: {0}")]
    Sled(#[from] sled::Error),
    #[error("store: {tree} entry {key} is corrupt: {why}")]
    Corrupt { tree: &'static str, key: String, why: String },
    #[error("store schema version {found} is newer than this build's {supported}: run a newer site manager")]
    Newer { found: u64, supported: u64 },
    #[error("store: {0}")]
    Encode(#[from] serde_json::Error),
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// A registration token as stored: only its hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct StoredRegistration {
    pub host: HostId,
    pub expires_ms: u64,
    pub used: bool,
}

/// A site pairing token as stored, keyed by the hash of its secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct StoredPairingToken {
    pub expires_ms: u64,
    pub used: bool,
}

/// The paired site as stored: what the API shows and its CA.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct StoredPeer {
    pub peer: crate::model::Peer,
    pub ca_pem: String,
}

/// The key of the one paired site in the `peer` tree.
pub const PEER_KEY: &[u8] = b"peer";

/// An API token as stored: its public part and the hash of its secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct StoredToken {
    pub token: Token,
    pub secret_hash: String,
}

/// One resource kind: a sled tree of JSON values.
#[derive(Debug, Clone)]
pub struct Table<T> {
    name: &'static str,
    tree: sled::Tree,
    _t: std::marker::PhantomData<fn() -> T>,
}

impl<T: Serialize + DeserializeOwned> Table<T> {
    fn open(db: &sled::Db, name: &'static str) -> Result<Self> {
        Ok(Table { name, tree: db.open_tree(name)?, _t: std::marker::PhantomData })
    }

    fn decode(&self, key: &[u8], bytes: &[u8]) -> Result<T> {
        serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
            tree: self.name,
            key: hex(key),
            why: e.to_string(),
        })
    }

    pub fn get(&self, key: &[u8]) -> Result<Option<T>> {
        match self.tree.get(key)? {
            Some(v) => Ok(Some(self.decode(key, &v)?)),
            None => Ok(None),
        }
    }

    /// Writes without flushing: for callers that flush once after several.
    pub(crate) fn put_unflushed(&self, key: &[u8], value: &T) -> Result<()> {
        self.tree.insert(key, serde_json::to_vec(value)?)?;
        Ok(())
    }

    pub fn put(&self, key: &[u8], value: &T) -> Result<()> {
        self.put_unflushed(key, value)?;
        self.tree.flush()?;
        Ok(())
    }

    pub fn remove(&self, key: &[u8]) -> Result<()> {
        self.tree.remove(key)?;
        self.tree.flush()?;
        Ok(())
    }

    pub fn list(&self) -> Result<Vec<T>> {
        self.tree.iter().map(|kv| kv.map_err(StoreError::from).and_then(|(k, v)| self.decode(&k, &v))).collect()
    }

    /// Entries whose key starts with `prefix`, in key order.
    pub fn list_prefix(&self, prefix: &[u8]) -> Result<Vec<T>> {
        self.tree
            .scan_prefix(prefix)
            .map(|kv| kv.map_err(StoreError::from).and_then(|(k, v)| self.decode(&k, &v)))
            .collect()
    }

    /// The last entry under `prefix` (in key order) for which `keep`
    /// holds, scanning from the end.
    pub fn last_prefix_where(&self, prefix: &[u8], keep: impl Fn(&T) -> bool) -> Result<Option<T>> {
        for kv in self.tree.scan_prefix(prefix).rev() {
            let (k, v) = kv?;
            let t = self.decode(&k, &v)?;
            if keep(&t) {
                return Ok(Some(t));
            }
        }
        Ok(None)
    }

    pub fn len(&self) -> usize {
        self.tree.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tree.is_empty()
    }
}

/// A table kept in memory as well: reads never touch sled nor decode
/// JSON (the VPG list is read often and by everyone). Writes go to sled
/// first, flushed, then to memory.
#[derive(Debug)]
pub struct CachedTable<T> {
    table: Table<T>,
    memory: std::sync::RwLock<std::collections::BTreeMap<Vec<u8>, T>>,
    /// The whole list as JSON, made on the first read after a change.
    list_json: std::sync::Mutex<Option<std::sync::Arc<Vec<u8>>>>,
}

impl<T: Serialize + DeserializeOwned + Clone> CachedTable<T> {
    fn open(db: &sled::Db, name: &'static str) -> Result<Self> {
        let table = Table::open(db, name)?;
        let mut memory = std::collections::BTreeMap::new();
        for kv in table.tree.iter() {
            let (k, v) = kv?;
            memory.insert(k.to_vec(), table.decode(&k, &v)?);
        }
        Ok(CachedTable { table, memory: std::sync::RwLock::new(memory), list_json: std::sync::Mutex::new(None) })
    }

    fn poisoned(&self) -> StoreError {
        StoreError::Corrupt { tree: self.table.name, key: "cache".into(), why: "lock poisoned".into() }
    }

    pub fn get(&self, key: &[u8]) -> Result<Option<T>> {
        Ok(self.memory.read().map_err(|_| self.poisoned())?.get(key).cloned())
    }

    pub fn put(&self, key: &[u8], value: &T) -> Result<()> {
        let mut m = self.memory.write().map_err(|_| self.poisoned())?;
        self.table.put(key, value)?;
        m.insert(key.to_vec(), value.clone());
        self.forget_list();
        Ok(())
    }

    fn forget_list(&self) {
        if let Ok(mut j) = self.list_json.lock() {
            *j = None;
        }
    }

    /// Every value as one JSON array, in key order (the same as
    /// serializing [`CachedTable::list`]), kept until the next change.
    pub fn list_json(&self) -> Result<std::sync::Arc<Vec<u8>>> {
        let mut j = self.list_json.lock().map_err(|_| self.poisoned())?;
        if let Some(bytes) = j.as_ref() {
            return Ok(bytes.clone());
        }
        let m = self.memory.read().map_err(|_| self.poisoned())?;
        let values: Vec<&T> = m.values().collect();
        let bytes = std::sync::Arc::new(serde_json::to_vec(&values)?);
        *j = Some(bytes.clone());
        Ok(bytes)
    }

    pub fn remove(&self, key: &[u8]) -> Result<()> {
        let mut m = self.memory.write().map_err(|_| self.poisoned())?;
        self.table.remove(key)?;
        m.remove(key);
        self.forget_list();
        Ok(())
    }

    pub fn list(&self) -> Result<Vec<T>> {
        Ok(self.memory.read().map_err(|_| self.poisoned())?.values().cloned().collect())
    }

    pub fn len(&self) -> usize {
        self.memory.read().map_or(0, |m| m.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The checkpoint id counter: the next id in memory, the leased bound on
/// disk.
#[derive(Debug)]
struct CheckpointIds {
    next: u64,
    leased: u64,
}

/// The store. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct Store {
    db: sled::Db,
    meta: sled::Tree,
    pub site: Table<Site>,
    pub tokens: Table<StoredToken>,
    pub audit: Table<AuditEntry>,
    pub hosts: CachedTable<Host>,
    pub registrations: Table<StoredRegistration>,
    pub vpgs: CachedTable<Vpg>,
    pub checkpoints: Table<Checkpoint>,
    pub tasks: Table<Task>,
    /// Failover tests, running and recorded (key: the test's id).
    pub tests: Table<crate::model::FailoverTest>,
    /// Peer VPG definitions kept for a failover without the protected site.
    pub peer_vpgs: Table<Vpg>,
    /// The paired site (at most one, under [`PEER_KEY`]).
    pub peer: Table<StoredPeer>,
    pub pairing_tokens: Table<StoredPairingToken>,
    /// How to reach vCenter (under `deploy::VCENTER_KEY`).
    pub vcenter: Table<crate::model::VcenterSettings>,
    /// Alert settings (under `alerts::SETTINGS_KEY`).
    pub alert_settings: Table<crate::model::AlertSettings>,
    /// Health report days (key: VPG id ‖ `YYYY-MM-DD`).
    pub health: Table<crate::model::HealthDay>,
    checkpoint_ids: Mutex<CheckpointIds>,
    generation: u64,
}

const META_SCHEMA: &[u8] = b"schema_version";
const META_GENERATION: &[u8] = b"manager_generation";
const META_CHECKPOINT_LEASE: &[u8] = b"checkpoint_id_lease";

fn read_u64(tree: &sled::Tree, key: &'static [u8]) -> Result<Option<u64>> {
    match tree.get(key)? {
        None => Ok(None),
        Some(v) => {
            let bytes: [u8; 8] = v.as_ref().try_into().map_err(|_| StoreError::Corrupt {
                tree: "meta",
                key: String::from_utf8_lossy(key).into_owned(),
                why: format!("{} bytes, expected 8", v.len()),
            })?;
            Ok(Some(u64::from_be_bytes(bytes)))
        }
    }
}

/// Migrations: entry `i` takes a store from schema `i + 1` to `i + 2`.
const MIGRATIONS: &[fn(&sled::Db) -> Result<()>] = &[];

impl Store {
    /// Opens (or creates) the store in `dir` and takes a new manager
    /// generation. Returns whether the store was new.
    pub fn open(dir: &Path) -> Result<(Store, bool)> {
        let db = sled::Config::new().path(dir.join("store")).open()?;
        let meta = db.open_tree("meta")?;
        let fresh = read_u64(&meta, META_SCHEMA)?.is_none();
        let mut version = read_u64(&meta, META_SCHEMA)?.unwrap_or(SCHEMA_VERSION);
        if version > SCHEMA_VERSION {
            return Err(StoreError::Newer { found: version, supported: SCHEMA_VERSION });
        }
        while version < SCHEMA_VERSION {
            let step = usize::try_from(version - 1).unwrap_or(usize::MAX);
            if let Some(migrate) = MIGRATIONS.get(step) {
                migrate(&db)?;
            }
            version += 1;
            meta.insert(META_SCHEMA, &version.to_be_bytes())?;
            db.flush()?;
        }
        meta.insert(META_SCHEMA, &SCHEMA_VERSION.to_be_bytes())?;
        let generation = read_u64(&meta, META_GENERATION)?.unwrap_or(0) + 1;
        meta.insert(META_GENERATION, &generation.to_be_bytes())?;
        let leased = read_u64(&meta, META_CHECKPOINT_LEASE)?.unwrap_or(1);
        db.flush()?;
        let store = Store {
            site: Table::open(&db, "site")?,
            tokens: Table::open(&db, "tokens")?,
            audit: Table::open(&db, "audit")?,
            hosts: CachedTable::open(&db, "hosts")?,
            registrations: Table::open(&db, "registrations")?,
            vpgs: CachedTable::open(&db, "vpgs")?,
            checkpoints: Table::open(&db, "checkpoints")?,
            tasks: Table::open(&db, "tasks")?,
            tests: Table::open(&db, "tests")?,
            peer_vpgs: Table::open(&db, "peer_vpgs")?,
            peer: Table::open(&db, "peer")?,
            pairing_tokens: Table::open(&db, "pairing_tokens")?,
            vcenter: Table::open(&db, "vcenter")?,
            alert_settings: Table::open(&db, "alert_settings")?,
            health: Table::open(&db, "health")?,
            checkpoint_ids: Mutex::new(CheckpointIds { next: leased, leased }),
            generation,
            meta,
            db,
        };
        Ok((store, fresh))
    }

    /// This run's manager generation (one more than the last run's).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// A fresh checkpoint id, greater than every id handed out before, by
    /// this run or an earlier one.
    pub fn next_checkpoint_id(&self) -> Result<CheckpointId> {
        let mut ids = self.checkpoint_ids.lock().map_err(|_| poisoned())?;
        if ids.next >= ids.leased {
            let leased = ids.next + CHECKPOINT_ID_LEASE;
            self.meta.insert(META_CHECKPOINT_LEASE, &leased.to_be_bytes())?;
            self.meta.flush()?;
            ids.leased = leased;
        }
        let id = ids.next;
        ids.next += 1;
        Ok(CheckpointId(id))
    }

    /// After a restore from a backup: makes the next checkpoint id greater
    /// than `seen` and the generation greater than `generation_seen`.
    /// Returns the new generation (in effect at once).
    pub fn reclaim(&mut self, seen: CheckpointId, generation_seen: u64) -> Result<u64> {
        {
            let mut ids = self.checkpoint_ids.lock().map_err(|_| poisoned())?;
            if seen.0 >= ids.next {
                ids.next = seen.0 + 1;
                ids.leased = ids.next;
            }
        }
        self.next_checkpoint_id()?; // leases above the new floor
        if generation_seen >= self.generation {
            self.generation = generation_seen + 1;
            self.meta.insert(META_GENERATION, &self.generation.to_be_bytes())?;
            self.meta.flush()?;
        }
        Ok(self.generation)
    }

    /// A sequence number for the audit log, unique and growing across
    /// restarts.
    pub fn next_audit_seq(&self) -> Result<u64> {
        Ok(self.db.generate_id()?)
    }

    pub fn flush(&self) -> Result<()> {
        self.db.flush()?;
        Ok(())
    }

    /// VPG `id`, defined here (`false`) or the paired site's copy kept
    /// here (`true`).
    pub fn vpg_or_copy(&self, id: protection_groups::VpgId) -> Result<Option<(Vpg, bool)>> {
        if let Some(v) = self.vpgs.get(id.as_bytes())? {
            return Ok(Some((v, false)));
        }
        Ok(self.peer_vpgs.get(id.as_bytes())?.map(|v| (v, true)))
    }

    /// Stores a VPG where [`Store::vpg_or_copy`] found it.
    pub fn put_vpg(&self, v: &Vpg, copy: bool) -> Result<()> {
        if copy {
            self.peer_vpgs.put(v.id.as_bytes(), v)
        } else {
            self.vpgs.put(v.id.as_bytes(), v)
        }
    }

    /// Stores a checkpoint record without flushing (the coordinator flushes
    /// once per barrier).
    pub fn put_checkpoint_unflushed(&self, cp: &Checkpoint) -> Result<()> {
        self.checkpoints.put_unflushed(&checkpoint_key(cp.vpg, cp.id), cp)
    }

    /// A VPG's newest checkpoint that is consistent and durable at the
    /// recovery site.
    pub fn newest_durable_checkpoint(&self, vpg: protection_groups::VpgId) -> Result<Option<Checkpoint>> {
        self.checkpoints.last_prefix_where(vpg.as_bytes(), |c| c.consistent && c.durable)
    }
}

fn poisoned() -> StoreError {
    StoreError::Corrupt { tree: "meta", key: "checkpoint ids".into(), why: "lock poisoned".into() }
}

/// Keys: ids as their 16 bytes; checkpoints as VPG id then big-endian id,
/// so a VPG's checkpoints list in id order.
pub fn checkpoint_key(vpg: VpgId, id: CheckpointId) -> Vec<u8> {
    let mut k = vpg.as_bytes().to_vec();
    k.extend_from_slice(&id.0.to_be_bytes());
    k
}

pub fn uuid_key(id: &Uuid) -> [u8; 16] {
    *id.as_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reopens a store just dropped in this process: sled's background
    /// flusher lets go of the file lock a moment after the drop (a new
    /// process, as in a real restart, never waits for it).
    fn reopen(dir: &Path) -> (Store, bool) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match Store::open(dir) {
                Ok(s) => return s,
                Err(e) if e.to_string().contains("could not acquire lock") && std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => panic!("{e}"),
            }
        }
    }

    #[test]
    fn generation_and_checkpoint_ids_grow_across_reopens() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let (s, fresh) = Store::open(dir.path()).unwrap_or_else(|e| panic!("{e}"));
        assert!(fresh);
        let g1 = s.generation();
        let a = s.next_checkpoint_id().unwrap_or_else(|e| panic!("{e}"));
        let b = s.next_checkpoint_id().unwrap_or_else(|e| panic!("{e}"));
        assert!(b > a);
        drop(s);
        let (mut s, fresh) = reopen(dir.path());
        assert!(!fresh);
        assert_eq!(s.generation(), g1 + 1);
        let c = s.next_checkpoint_id().unwrap_or_else(|e| panic!("{e}"));
        assert!(c > b, "{c} after {b}");
        let g = s.reclaim(CheckpointId(c.0 + 10_000), 50).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(g, 51);
        assert!(s.next_checkpoint_id().unwrap_or_else(|e| panic!("{e}")).0 > c.0 + 10_000);
        drop(s);
        let (s, _) = reopen(dir.path());
        assert_eq!(s.generation(), 52);
        assert!(s.next_checkpoint_id().unwrap_or_else(|e| panic!("{e}")).0 > c.0 + 10_000);
    }
}
