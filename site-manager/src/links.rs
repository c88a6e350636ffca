//! The VDSAs connected right now: one session each, with the channel to
//! send it commands and what it last reported. The management link fills
//! it; the coordinator, the reconciler and host health read it.

use crate::model::now_ms;
use protection_groups::mgmt::{ActualState, ManagerMessage, RoleState};
use protection_groups::HostId;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use tokio::sync::mpsc;

/// A connected VDSA.
#[derive(Debug, Clone)]
pub struct VdsaLink {
    pub host: HostId,
    /// Commands to send on its session.
    pub tx: mpsc::Sender<ManagerMessage>,
    pub last_seen_ms: u64,
    pub actual: ActualState,
    pub hold_limit_ms: u64,
    /// Which session this is (a reconnect replaces the entry).
    pub session: u64,
}

/// Every connected VDSA, by host.
#[derive(Debug)]
pub struct Links {
    by_host: Mutex<HashMap<HostId, VdsaLink>>,
    next_session: AtomicU64,
}

impl Default for Links {
    fn default() -> Self {
        Links { by_host: Mutex::default(), next_session: AtomicU64::new(1) }
    }
}

impl Links {
    /// Registers a session (replacing an older one of the same host);
    /// returns its number.
    pub fn attach(&self, mut link: VdsaLink) -> u64 {
        let n = self.next_session.fetch_add(1, Ordering::Relaxed);
        link.session = n;
        if let Ok(mut l) = self.by_host.lock() {
            l.insert(link.host, link);
        }
        n
    }

    /// Removes the session, unless a newer one of the host replaced it.
    pub fn detach(&self, host: HostId, session: u64) {
        if let Ok(mut l) = self.by_host.lock() {
            if l.get(&host).is_some_and(|x| x.session == session) {
                l.remove(&host);
            }
        }
    }

    pub fn on_report(&self, host: HostId, session: u64, actual: ActualState) {
        if let Ok(mut l) = self.by_host.lock() {
            if let Some(link) = l.get_mut(&host).filter(|x| x.session == session) {
                link.last_seen_ms = now_ms();
                link.actual = actual;
            }
        }
    }

    /// Where to send commands for `host`'s VDSA, if it is connected.
    pub fn sender(&self, host: HostId) -> Option<mpsc::Sender<ManagerMessage>> {
        self.by_host.lock().ok()?.get(&host).map(|l| l.tx.clone())
    }

    pub fn snapshot(&self) -> HashMap<HostId, VdsaLink> {
        self.by_host.lock().map(|l| l.clone()).unwrap_or_default()
    }

    pub fn connected(&self) -> HashSet<HostId> {
        self.by_host.lock().map(|l| l.keys().copied().collect()).unwrap_or_default()
    }

    /// (host, session) of every connected VDSA.
    pub fn sessions(&self) -> Vec<(HostId, u64)> {
        self.by_host.lock().map(|l| l.values().map(|x| (x.host, x.session)).collect()).unwrap_or_default()
    }

    /// Every role every connected VDSA reported last, with its host.
    pub fn roles_by_host(&self) -> Vec<(HostId, RoleState)> {
        self.by_host
            .lock()
            .map(|l| l.values().flat_map(|x| x.actual.roles.iter().map(|r| (x.host, r.clone()))).collect())
            .unwrap_or_default()
    }

    /// What every connected VDSA reported last, by host.
    pub fn actual_states(&self) -> HashMap<HostId, ActualState> {
        self.by_host.lock().map(|l| l.iter().map(|(h, x)| (*h, x.actual.clone())).collect()).unwrap_or_default()
    }

    /// Every role every connected VDSA reported last.
    pub fn roles(&self) -> Vec<RoleState> {
        self.by_host.lock().map(|l| l.values().flat_map(|x| x.actual.roles.clone()).collect()).unwrap_or_default()
    }

    /// The checkpoints every recovery VDSA of this site holds for `vpg`,
    /// oldest first, and how many recovery VDSAs serve it (none: its tests
    /// run at the site it recovers to).
    pub fn testable_checkpoints(&self, vpg: protection_groups::VpgId) -> (usize, Vec<protection_groups::CheckpointId>) {
        let targets: Vec<RoleState> = self
            .roles()
            .into_iter()
            .filter(|r| r.vpg == vpg && r.kind == protection_groups::mgmt::RoleKind::Target)
            .collect();
        let mut common = targets.first().map(|t| t.recoverable_checkpoints.clone()).unwrap_or_default();
        for t in targets.iter().skip(1) {
            common.retain(|c| t.recoverable_checkpoints.contains(c));
        }
        common.sort();
        (targets.len(), common)
    }
}
