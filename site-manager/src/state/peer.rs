//! What the site knows of its paired site besides the store: the API's
//! check of the peer's client certificates and what the last exchange
//! said (`crate::peering` runs the pairing and the exchange).

use std::sync::{Arc, Mutex};

use protection_groups::mgmt::RoleState;

use crate::model::PeerHost;
use crate::pki::peer::PeerClientVerifier;

/// What the site knows of its paired site besides the store.
#[derive(Debug, Default)]
pub struct Peering {
    /// The API's check of client certificates.
    pub verifier: Arc<PeerClientVerifier>,
    /// The other site's hosts, from the last exchange.
    hosts: Mutex<Vec<PeerHost>>,
    /// The target roles the other site's VDSAs run for this site's VPGs.
    target_roles: Mutex<Vec<RoleState>>,
}

impl Peering {
    pub fn hosts(&self) -> Vec<PeerHost> {
        self.hosts.lock().map(|h| h.clone()).unwrap_or_default()
    }

    pub fn target_roles(&self) -> Vec<RoleState> {
        self.target_roles.lock().map(|r| r.clone()).unwrap_or_default()
    }

    pub(crate) fn forget(&self) {
        if let Ok(mut h) = self.hosts.lock() {
            h.clear();
        }
        if let Ok(mut r) = self.target_roles.lock() {
            r.clear();
        }
    }

    /// Keeps what the last exchange said: the other site's hosts and the
    /// target roles it runs for this site's VPGs.
    pub(crate) fn remember(&self, hosts: Vec<PeerHost>, target_roles: Vec<RoleState>) {
        if let Ok(mut h) = self.hosts.lock() {
            *h = hosts;
        }
        if let Ok(mut r) = self.target_roles.lock() {
            *r = target_roles;
        }
    }
}
