//! Pairing with the other site and the site-to-site exchange
//! (docs/architecture.md §8, docs/api.md "Pairing").
//!
//! Pairing: one site's admin makes a site pairing token
//! (`SECRET.CA_SHA256`); the other site's admin gives it to their site
//! manager, which dials the first over HTTPS, checks its CA against the
//! hash before sending anything, and offers the secret with its own CA.
//! Both store the other's CA: from then on their API calls to each other
//! are mutual TLS, and their VDSAs trust each other's (the CA goes into
//! every desired state).
//!
//! The exchange: every second each site sends the other its VPGs that
//! recover there, its hosts' replication addresses, and the target roles
//! its VDSAs run for the other's VPGs; each keeps the other's VPGs as
//! copies, so the recovery site can fail over without the protected one.
//!
//! Unpairing refuses while any VPG spans the two sites; afterwards neither
//! site's VDSAs accept the other's.

use crate::model::{
    now_ms, PairRequest, PairingAnswer, PairingOffer, PairingToken, Peer, PeerExchange, PeerHost, RemoteFailover, Vpg,
};
use crate::pki::peer::{parse_ca, PeerPin};
use crate::pki::sha256_hex;
use crate::state::SiteManager;
use crate::store::{StoreError, StoredPairingToken, StoredPeer, PEER_KEY};
use protection_groups::mgmt::{RoleKind, TrustedSite};
use protection_groups::{SiteId, VpgStatus};
use std::sync::Arc;
use std::time::Duration;

/// How long a site pairing token is good for.
pub const PAIRING_TOKEN_TTL_MS: u64 = 60 * 60 * 1000;
/// How often the sites exchange VPGs, hosts and target states.
const EXCHANGE_EVERY: Duration = Duration::from_secs(1);
/// A call to the other site that takes longer fails.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors of pairing, grouped by what the caller does.
#[derive(Debug, thiserror::Error)]
pub enum PeeringError {
    /// Fix the request (`field` names what is wrong).
    #[error("{message}")]
    BadRequest { field: &'static str, message: String },
    /// The token or certificate is wrong, used or expired: get a new one.
    #[error("{0}")]
    Refused(String),
    /// The pairing state does not allow this now.
    #[error("{0}")]
    Conflict(String),
    /// This site is not paired.
    #[error("this site is not paired")]
    NotPaired,
    /// The other site could not be reached or failed: try again.
    #[error("{0}")]
    Unreachable(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("TLS: {0}")]
    Tls(#[from] crate::pki::PkiError),
}

/// The paired site's CA as the VDSAs are to trust it.
pub fn trusted_sites(sm: &SiteManager) -> Result<Vec<TrustedSite>, StoreError> {
    Ok(sm
        .stored_peer()?
        .map(|p| TrustedSite { site: p.peer.site, name: p.peer.name, ca_pem: p.ca_pem })
        .into_iter()
        .collect())
}

/// Loads the paired site's CA into the API's verifier (at start).
pub fn load(sm: &SiteManager) -> Result<(), PeeringError> {
    if let Some(p) = sm.stored_peer()? {
        let ca = parse_ca(&p.ca_pem).map_err(|why| StoreError::Corrupt { tree: "peer", key: "peer".into(), why })?;
        sm.peering.verifier.set_peer(Some(&ca))?;
    }
    Ok(())
}

/// Makes a one-time site pairing token.
pub fn create_pairing_token(sm: &SiteManager) -> Result<PairingToken, PeeringError> {
    let secret = crate::state::new_secret();
    let expires_ms = now_ms() + PAIRING_TOKEN_TTL_MS;
    let stored = StoredPairingToken { expires_ms, used: false };
    sm.with_store(|s| s.pairing_tokens.put(sha256_hex(secret.as_bytes()).as_bytes(), &stored))?;
    Ok(PairingToken { token: format!("{secret}.{}", sm.pki.ca_sha256()), expires_ms, address: sm.api_address() })
}

fn refuse_if_paired(sm: &SiteManager, other: Option<SiteId>) -> Result<(), PeeringError> {
    if let Some(p) = sm.stored_peer()? {
        if Some(p.peer.site) != other {
            return Err(PeeringError::Conflict(format!(
                "this site is already paired with {:?} ({}): unpair it first",
                p.peer.name, p.peer.site
            )));
        }
    }
    Ok(())
}

fn record_peer(sm: &SiteManager, peer: Peer, ca_pem: String) -> Result<Peer, PeeringError> {
    let ca = parse_ca(&ca_pem).map_err(|why| PeeringError::BadRequest { field: "ca_pem", message: why })?;
    sm.with_store(|s| {
        s.peer.put(PEER_KEY, &StoredPeer { peer: peer.clone(), ca_pem })?;
        s.flush()
    })?;
    sm.peering.verifier.set_peer(Some(&ca))?;
    sm.changed();
    tracing::info!(site = %peer.site, name = %peer.name, address = %peer.address, "paired");
    Ok(peer)
}

/// The answering side of pairing: checks the token's secret (once), keeps
/// the pairing site's CA, answers with this site's.
pub fn accept_offer(sm: &SiteManager, offer: PairingOffer) -> Result<PairingAnswer, PeeringError> {
    let site = sm.site()?;
    if offer.site == site.id {
        return Err(PeeringError::BadRequest { field: "site", message: "site: a site cannot pair with itself".into() });
    }
    let key = sha256_hex(offer.secret.trim().as_bytes());
    let token = sm.with_store(|s| s.pairing_tokens.get(key.as_bytes()))?;
    match token {
        None => return Err(PeeringError::Refused("the site pairing token is unknown".into())),
        Some(t) if t.used => return Err(PeeringError::Refused("the site pairing token was used already".into())),
        Some(t) if t.expires_ms < now_ms() => {
            return Err(PeeringError::Refused("the site pairing token expired".into()))
        }
        Some(_) => {}
    }
    refuse_if_paired(sm, Some(offer.site))?;
    parse_ca(&offer.ca_pem).map_err(|why| PeeringError::BadRequest { field: "ca_pem", message: why })?;
    sm.with_store(|s| {
        s.pairing_tokens.put(key.as_bytes(), &StoredPairingToken { expires_ms: 0, used: true })?;
        s.flush()
    })?;
    let peer = Peer {
        site: offer.site,
        name: offer.name,
        address: offer.address,
        ca_sha256: ca_hash(&offer.ca_pem)?,
        paired_ms: now_ms(),
        last_contact_ms: Some(now_ms()),
        last_error: String::new(),
    };
    record_peer(sm, peer, offer.ca_pem)?;
    Ok(PairingAnswer { site: site.id, name: site.name, ca_pem: sm.pki.ca_pem().to_string() })
}

fn ca_hash(pem: &str) -> Result<String, PeeringError> {
    let der = parse_ca(pem).map_err(|why| PeeringError::BadRequest { field: "ca_pem", message: why })?;
    Ok(sha256_hex(&der))
}

fn client(sm: &SiteManager, pin: PeerPin) -> Result<reqwest::Client, PeeringError> {
    let cfg = crate::pki::peer::peer_client_config(&sm.pki, pin)?;
    reqwest::Client::builder()
        .use_preconfigured_tls(cfg)
        .timeout(CALL_TIMEOUT)
        .build()
        .map_err(|e| PeeringError::Unreachable(format!("HTTP client: {e}")))
}

/// Sends `body` to the other site and reads its JSON answer.
async fn call<T: serde::de::DeserializeOwned>(
    client: &reqwest::Client,
    address: &str,
    path: &str,
    body: &impl serde::Serialize,
) -> Result<T, PeeringError> {
    let url = format!("https://{address}{path}");
    let bytes = serde_json::to_vec(body).map_err(|e| PeeringError::Unreachable(e.to_string()))?;
    let resp =
        client.post(&url).header(reqwest::header::CONTENT_TYPE, "application/json").body(bytes).send().await.map_err(
            |e| {
                let why = crate::client::chain(&e);
                // The pinned CA did not match: a wrong token, not an outage.
                if why.contains("token names") {
                    PeeringError::Refused(format!("{url}: {why}"))
                } else {
                    PeeringError::Unreachable(format!("{url}: {why}"))
                }
            },
        )?;
    let status = resp.status();
    let text = resp.text().await.map_err(|e| PeeringError::Unreachable(format!("{url}: {e}")))?;
    if !status.is_success() {
        let message = serde_json::from_str::<crate::model::ErrorBody>(&text).map_or(text.clone(), |b| b.message);
        return Err(match status.as_u16() {
            401 | 403 => PeeringError::Refused(format!("the other site refused: {message}")),
            409 => PeeringError::Conflict(format!("the other site refused: {message}")),
            _ => PeeringError::Unreachable(format!("{url}: {status}: {message}")),
        });
    }
    serde_json::from_str(&text).map_err(|e| PeeringError::Unreachable(format!("{url}: not the expected answer: {e}")))
}

/// Pairs with the site at `req.address` using its token.
pub async fn pair(sm: Arc<SiteManager>, req: PairRequest) -> Result<Peer, PeeringError> {
    let address = req.address.trim().to_string();
    if address.is_empty() || address.contains('/') || !address.contains(':') {
        return Err(PeeringError::BadRequest {
            field: "address",
            message: format!("address: {:?} is not HOST:PORT of the other site manager's API", req.address),
        });
    }
    let Some((secret, pin)) = req.token.trim().rsplit_once('.') else {
        return Err(PeeringError::BadRequest { field: "token", message: "token: expected SECRET.CA_SHA256".into() });
    };
    let pin = pin.to_ascii_lowercase();
    if pin.len() != 64 || !pin.bytes().all(|b| b.is_ascii_hexdigit()) || secret.is_empty() {
        return Err(PeeringError::BadRequest {
            field: "token",
            message: "token: expected SECRET.CA_SHA256 (the hash is 64 hex digits)".into(),
        });
    }
    if pin == sm.pki.ca_sha256() {
        return Err(PeeringError::BadRequest {
            field: "token",
            message: "token: it is this site's own token; pair with it from the other site".into(),
        });
    }
    let sm2 = sm.clone();
    tokio::task::spawn_blocking(move || refuse_if_paired(&sm2, None))
        .await
        .map_err(|e| PeeringError::Unreachable(e.to_string()))??;
    let site = sm.site()?;
    let offer = PairingOffer {
        secret: secret.to_string(),
        site: site.id,
        name: site.name.clone(),
        address: sm.api_address(),
        ca_pem: sm.pki.ca_pem().to_string(),
    };
    let c = client(&sm, PeerPin::Sha256(pin.clone()))?;
    let answer: PairingAnswer = call(&c, &address, "/api/v1/pairing", &offer).await?;
    if ca_hash(&answer.ca_pem)? != pin {
        return Err(PeeringError::Refused("the other site answered with a CA other than its token names".into()));
    }
    let peer = Peer {
        site: answer.site,
        name: answer.name,
        address,
        ca_sha256: pin,
        paired_ms: now_ms(),
        last_contact_ms: Some(now_ms()),
        last_error: String::new(),
    };
    tokio::task::spawn_blocking(move || record_peer(&sm, peer, answer.ca_pem))
        .await
        .map_err(|e| PeeringError::Unreachable(e.to_string()))?
}

/// The VPGs that span the two sites: this site's that recover there, and
/// the copies of the other's.
fn spanning_vpgs(sm: &SiteManager, peer: SiteId) -> Result<Vec<String>, StoreError> {
    let own = sm.with_store(|s| s.vpgs.list())?;
    let copies = sm.with_store(|s| s.peer_vpgs.list())?;
    Ok(own
        .iter()
        .filter(|v| v.settings.recovery_site == peer)
        .chain(copies.iter())
        .map(|v| v.settings.name.clone())
        .collect())
}

fn drop_peer(sm: &SiteManager) -> Result<(), PeeringError> {
    sm.with_store(|s| {
        for v in s.peer_vpgs.list()? {
            s.peer_vpgs.remove(v.id.as_bytes())?;
        }
        s.peer.remove(PEER_KEY)?;
        s.flush()
    })?;
    sm.peering.verifier.set_peer(None)?;
    sm.peering.forget();
    sm.changed();
    Ok(())
}

/// Unpairs: refused while a VPG spans the sites; tells the other site
/// (it unpairs too) and forgets its CA, so neither site's VDSAs accept the
/// other's any longer. Returns the peer and whether the other site heard.
pub async fn unpair(sm: Arc<SiteManager>) -> Result<(Peer, Option<String>), PeeringError> {
    let sm2 = sm.clone();
    let stored = tokio::task::spawn_blocking(move || -> Result<_, PeeringError> {
        let p = sm2.stored_peer()?.ok_or(PeeringError::NotPaired)?;
        let spanning = spanning_vpgs(&sm2, p.peer.site)?;
        if !spanning.is_empty() {
            return Err(PeeringError::Conflict(format!(
                "VPGs span this site and {:?}: {}; remove them before unpairing",
                p.peer.name,
                spanning.join(", ")
            )));
        }
        Ok(p)
    })
    .await
    .map_err(|e| PeeringError::Unreachable(e.to_string()))??;
    let ca = parse_ca(&stored.ca_pem).map_err(|why| StoreError::Corrupt { tree: "peer", key: "peer".into(), why })?;
    let site = sm.site()?;
    let told = match client(&sm, PeerPin::Ca(ca)) {
        Ok(c) => call::<serde_json::Value>(&c, &stored.peer.address, "/api/v1/peer/unpair", &site.id).await,
        Err(e) => Err(e),
    };
    let unheard = told.err().map(|e| e.to_string());
    let sm2 = sm.clone();
    tokio::task::spawn_blocking(move || drop_peer(&sm2))
        .await
        .map_err(|e| PeeringError::Unreachable(e.to_string()))??;
    tracing::warn!(site = %stored.peer.site, name = %stored.peer.name, unheard = ?unheard, "unpaired");
    Ok((stored.peer, unheard))
}

/// The other site unpaired: forget it here too.
pub fn peer_unpaired(sm: &SiteManager, from: SiteId) -> Result<(), PeeringError> {
    let p = sm.stored_peer()?.ok_or(PeeringError::NotPaired)?;
    if p.peer.site != from {
        return Err(PeeringError::Refused(format!("site {from} is not the paired site")));
    }
    drop_peer(sm)?;
    tracing::warn!(site = %p.peer.site, name = %p.peer.name, "the paired site unpaired");
    Ok(())
}

/// Whether a client certificate offered on the API is the paired site
/// manager's (checked again per call: the site may have unpaired since
/// the connection was made).
pub fn is_peer_certificate(sm: &SiteManager, cert: &rustls::pki_types::CertificateDer<'static>) -> bool {
    use rustls::server::danger::ClientCertVerifier;
    sm.peering.verifier.verify_client_cert(cert, &[], rustls::pki_types::UnixTime::now()).is_ok()
}

/// This site's half of the exchange.
pub fn own_exchange(sm: &SiteManager) -> Result<PeerExchange, PeeringError> {
    let p = sm.stored_peer()?.ok_or(PeeringError::NotPaired)?;
    let vpgs: Vec<Vpg> =
        sm.with_store(|s| s.vpgs.list())?.into_iter().filter(|v| v.settings.recovery_site == p.peer.site).collect();
    let hosts = sm
        .with_store(|s| s.hosts.list())?
        .into_iter()
        .map(|h| PeerHost { id: h.id, name: h.name, replication_address: h.replication_address })
        .collect();
    let copies = sm.with_store(|s| s.peer_vpgs.list())?;
    let failed_over = copies
        .iter()
        .filter(|v| v.status.is_failed_over())
        .map(|v| RemoteFailover { vpg: v.id, status: v.status, reason: v.status_reason.clone() })
        .collect();
    let copies: Vec<_> = copies.into_iter().map(|v| v.id).collect();
    let target_roles =
        sm.links.roles().into_iter().filter(|r| r.kind == RoleKind::Target && copies.contains(&r.vpg)).collect();
    Ok(PeerExchange { site: sm.site()?.id, vpgs, hosts, target_roles, failed_over })
}

/// Takes in the other site's half: its VPGs that recover here become the
/// copies, its hosts and target roles are remembered.
pub fn take_exchange(sm: &SiteManager, theirs: PeerExchange) -> Result<(), PeeringError> {
    let p = sm.stored_peer()?.ok_or(PeeringError::NotPaired)?;
    if theirs.site != p.peer.site {
        return Err(PeeringError::Refused(format!("site {} is not the paired site", theirs.site)));
    }
    let here = sm.site()?.id;
    let own: Vec<Vpg> = sm.with_store(|s| s.vpgs.list())?;
    let mine: Vec<protection_groups::VpgId> = own.iter().map(|v| v.id).collect();
    let changed = sm.with_store(|s| {
        let old = s.peer_vpgs.list()?;
        // One VPG, one defining site: where both define it, the higher
        // epoch wins (the site that reverse-protected it took it over).
        let new: Vec<&Vpg> = theirs
            .vpgs
            .iter()
            .filter(|v| v.settings.recovery_site == here)
            .filter(|v| own.iter().find(|o| o.id == v.id).is_none_or(|o| o.epoch < v.epoch))
            .collect();
        let mut changed = false;
        for v in new.iter().filter(|v| mine.contains(&v.id)) {
            tracing::warn!(vpg = %v.id, epoch = v.epoch, "the paired site took the VPG over (reverse protection there): \
                           this site keeps its copy");
            s.vpgs.remove(v.id.as_bytes())?;
            changed = true;
        }
        for v in &old {
            if !new.iter().any(|n| n.id == v.id) {
                s.peer_vpgs.remove(v.id.as_bytes())?;
                changed = true;
            }
        }
        for v in new {
            // A copy failed over here keeps its status: this site decides
            // it, and the defining site takes it from the exchange.
            let mut v = v.clone();
            if let Some(local) = old.iter().find(|o| o.id == v.id && o.status.is_failed_over()) {
                v.status = local.status;
                v.status_reason.clone_from(&local.status_reason);
            }
            if !old.contains(&v) {
                s.peer_vpgs.put(v.id.as_bytes(), &v)?;
                changed = true;
            }
        }
        // This site's VPGs that recover there take the status of their
        // failover there; one no longer failed over there was rolled back.
        for mut v in s.vpgs.list()?.into_iter().filter(|v| v.settings.recovery_site == theirs.site) {
            let remote = theirs.failed_over.iter().find(|f| f.vpg == v.id);
            let (status, reason) = match remote {
                Some(f) => (f.status, format!("at the recovery site: {}", f.reason)),
                None if v.status.is_failed_over() => {
                    (VpgStatus::Protecting, "the recovery site rolled its failover back".to_string())
                }
                None => continue,
            };
            if v.status == status {
                continue;
            }
            tracing::warn!(vpg = %v.id, from = %v.status, to = %status, "the recovery site changed the VPG's failover");
            v.status = status;
            v.status_reason = reason;
            s.vpgs.put(v.id.as_bytes(), &v)?;
            changed = true;
        }
        if changed {
            s.flush()?;
        }
        Ok(changed)
    })?;
    sm.peering.remember(theirs.hosts, theirs.target_roles.into_iter().filter(|r| mine.contains(&r.vpg)).collect());
    if changed {
        sm.changed();
    }
    Ok(())
}

fn note_contact(sm: &SiteManager, error: Option<String>) {
    let r = sm.with_store(|s| {
        let Some(mut p) = s.peer.get(PEER_KEY)? else { return Ok(()) };
        let was = p.peer.last_error.clone();
        match &error {
            None => {
                p.peer.last_contact_ms = Some(now_ms());
                p.peer.last_error.clear();
            }
            Some(e) => p.peer.last_error.clone_from(e),
        }
        // Contact times are not flushed on their own: losing one in a
        // crash loses nothing.
        if error.is_some() && was != p.peer.last_error {
            tracing::warn!(error = %p.peer.last_error, "the paired site does not answer");
        }
        s.peer.put(PEER_KEY, &p)
    });
    if let Err(e) = r {
        tracing::error!(error = %e, "cannot record contact with the paired site");
    }
}

/// Exchanges with the paired site every second until the daemon stops.
pub async fn run(sm: Arc<SiteManager>) {
    let mut client_for: Option<(String, reqwest::Client)> = None;
    loop {
        tokio::time::sleep(EXCHANGE_EVERY).await;
        let sm2 = sm.clone();
        let ours = tokio::task::spawn_blocking(move || -> Result<_, PeeringError> {
            let Some(p) = sm2.stored_peer()? else { return Ok(None) };
            Ok(Some((p, own_exchange(&sm2)?)))
        })
        .await;
        let (peer, ours) = match ours {
            Ok(Ok(Some(x))) => x,
            Ok(Ok(None)) => {
                client_for = None;
                continue;
            }
            Ok(Err(e)) => {
                tracing::error!(error = %e, "cannot prepare the exchange with the paired site");
                continue;
            }
            Err(_) => continue,
        };
        if client_for.as_ref().is_none_or(|(hash, _)| *hash != peer.peer.ca_sha256) {
            let made = parse_ca(&peer.ca_pem)
                .map_err(|why| PeeringError::BadRequest { field: "ca_pem", message: why })
                .and_then(|ca| client(&sm, PeerPin::Ca(ca)));
            match made {
                Ok(c) => client_for = Some((peer.peer.ca_sha256.clone(), c)),
                Err(e) => {
                    tracing::error!(error = %e, "cannot make a client for the paired site");
                    continue;
                }
            }
        }
        let Some((_, c)) = &client_for else { continue };
        let result = call::<PeerExchange>(c, &peer.peer.address, "/api/v1/peer/exchange", &ours).await;
        let sm2 = sm.clone();
        let _ = tokio::task::spawn_blocking(move || match result {
            Ok(theirs) => match take_exchange(&sm2, theirs) {
                Ok(()) => note_contact(&sm2, None),
                Err(e) => note_contact(&sm2, Some(e.to_string())),
            },
            Err(e) => note_contact(&sm2, Some(e.to_string())),
        })
        .await;
    }
}
