//! The agent's identity: registration with a one-time token, and the
//! certificate it receives. Files under `DATA/identity/`: `node.key`
//! (0600, made here and never sent), `node.pem`, `peers/site.pem` (the
//! site CA), and `host` (the host id: written last, so its presence means
//! a complete identity). The newest manager generation obeyed is kept in
//! `DATA/manager-generation`.

use super::link::{read_message, write_message};
use super::AgentConfig;
use crate::wire::tls;
use anyhow::{anyhow, bail, Context, Result};
use protection_groups::mgmt::{ManagerMessage, VdsaMessage, PROTOCOL_VERSION, SITE_MANAGER_NAME};
use protection_groups::HostId;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use std::io::Write;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// A registered VDSA.
#[derive(Debug, Clone)]
pub struct Identity {
    pub host: HostId,
    pub dir: PathBuf,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, bytes).as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes `bytes` durably: temporary file, fsync, rename, fsync of the
/// folder.
pub fn write_durably(path: &Path, bytes: &[u8], private: bool) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if private { 0o600 } else { 0o644 })
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

impl Identity {
    /// The identity in `data`, if registration completed.
    pub fn load(data: &Path) -> Result<Option<Identity>> {
        let dir = data.join("identity");
        match std::fs::read_to_string(dir.join("host")) {
            Ok(s) => {
                let id = uuid::Uuid::parse_str(s.trim())
                    .map_err(|e| anyhow!("{}: not a host id: {e}", dir.join("host").display()))?;
                Ok(Some(Identity { host: HostId(id), dir }))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", dir.join("host").display())),
        }
    }

    /// TLS to the site manager: its certificate checked against the site
    /// CA, ours presented.
    pub fn management_client(&self) -> Result<Arc<rustls::ClientConfig>> {
        let mut roots = rustls::RootCertStore::empty();
        let ca = self.dir.join("peers/site.pem");
        for c in CertificateDer::pem_file_iter(&ca).map_err(|e| anyhow!("{}: {e}", ca.display()))? {
            roots.add(c.map_err(|e| anyhow!("{}: {e}", ca.display()))?)?;
        }
        let chain = CertificateDer::pem_file_iter(self.dir.join("node.pem"))
            .map_err(|e| anyhow!("node.pem: {e}"))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| anyhow!("node.pem: {e}"))?;
        let key = rustls::pki_types::PrivateKeyDer::from_pem_file(self.dir.join("node.key"))
            .map_err(|e| anyhow!("node.key: {e}"))?;
        let cfg = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)?;
        Ok(Arc::new(cfg))
    }

    /// The replication identity: the node certificate, trusting the site
    /// CA and the paired sites' CAs in `peers/`.
    pub fn replication(&self) -> Result<tls::SiteIdentity> {
        Ok(tls::SiteIdentity::load(&self.dir)?)
    }
}

/// Accepts the site manager's certificate only if its chain carries the
/// CA whose SHA-256 the registration token names, and that CA signed it
/// for the site manager's name.
#[derive(Debug)]
struct PinnedCa {
    pin: String,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(ca) = intermediates.iter().find(|c| sha256_hex(c) == self.pin) else {
            return Err(rustls::Error::General(
                "the site manager's CA is not the one the registration token names".into(),
            ));
        };
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        inner.verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// Registers with the site manager using the configured token and stores
/// the identity it answers with.
pub fn register(cfg: &AgentConfig) -> Result<Identity> {
    let Some(token) = cfg.registration_token.as_deref().map(str::trim).filter(|t| !t.is_empty()) else {
        bail!("this VDSA is not registered yet: give it a registration token (from the site manager's hosts API)");
    };
    let Some((_, pin)) = token.rsplit_once('.') else {
        bail!("the registration token is malformed: expected SECRET.CA_SHA256");
    };
    if pin.len() != 64 || !pin.bytes().all(|b| b.is_ascii_hexdigit()) {
        bail!("the registration token is malformed: its CA hash is not 64 hex digits");
    }
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::new(vec![tls::NODE_NAME.to_string()])?;
    params.distinguished_name.push(rcgen::DnType::CommonName, format!("vdsa {}", cfg.name));
    let csr = params.serialize_request(&key)?.pem()?;
    let client = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedCa { pin: pin.to_ascii_lowercase(), provider: provider() }))
        .with_no_client_auth();
    let tcp = connect_tcp(&cfg.site_manager)?;
    let (mut r, mut w) = tls::connect_to(Arc::new(client), tcp, SITE_MANAGER_NAME)
        .with_context(|| format!("TLS with the site manager at {}", cfg.site_manager))?;
    write_message(
        &mut w,
        &VdsaMessage::Register {
            protocol: PROTOCOL_VERSION,
            token: token.to_string(),
            host_name: cfg.name.clone(),
            csr_pem: csr,
            software_version: env!("CARGO_PKG_VERSION").to_string(),
        },
    )?;
    let (host, cert, site_ca) = match read_message(&mut r)? {
        ManagerMessage::Registered { host, certificate_pem, site_ca_pem } => (host, certificate_pem, site_ca_pem),
        ManagerMessage::Refused { reason } => bail!("the site manager refused the registration: {reason}"),
        other => bail!("unexpected answer to the registration: {other:?}"),
    };
    // The CA it sends must be the one the token pinned.
    let ca_der = CertificateDer::from_pem_slice(site_ca.as_bytes()).map_err(|e| anyhow!("site CA: {e}"))?;
    if sha256_hex(&ca_der) != pin.to_ascii_lowercase() {
        bail!("the site manager sent a CA other than the one the registration token names");
    }
    let dir = cfg.data.join("identity");
    std::fs::create_dir_all(dir.join("peers"))?;
    write_durably(&dir.join("node.key"), key.serialize_pem().as_bytes(), true)?;
    write_durably(&dir.join("node.pem"), cert.as_bytes(), false)?;
    write_durably(&dir.join("peers/site.pem"), site_ca.as_bytes(), false)?;
    write_durably(&dir.join("host"), host.0.to_string().as_bytes(), false)?;
    tracing::info!(%host, "registered with the site manager");
    Ok(Identity { host, dir })
}

pub fn connect_tcp(addr: &str) -> Result<TcpStream> {
    use std::net::ToSocketAddrs;
    let mut last = None;
    for a in addr.to_socket_addrs().with_context(|| format!("resolving {addr}"))? {
        match TcpStream::connect_timeout(&a, Duration::from_secs(5)) {
            Ok(t) => {
                let _ = t.set_nodelay(true);
                return Ok(t);
            }
            Err(e) => last = Some(e),
        }
    }
    Err(last.map_or_else(|| anyhow!("{addr}: no address"), |e| anyhow!("connecting to {addr}: {e}")))
}

/// The newest manager generation this VDSA obeyed (0 if none).
pub fn newest_generation(data: &Path) -> u64 {
    std::fs::read_to_string(data.join("manager-generation")).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0)
}

pub fn store_generation(data: &Path, g: u64) -> Result<()> {
    write_durably(&data.join("manager-generation"), g.to_string().as_bytes(), false)
}
