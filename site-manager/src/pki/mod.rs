//! The site's certificate authority: it signs the site manager's own
//! certificate (the API and the management link) and each VDSA's node
//! certificate from the VDSA's signing request, so that no private key
//! leaves the machine that made it (docs/architecture.md §8).
//!
//! Files under `DIR/pki/`: `ca.pem`, `ca.key` (0600), `server.pem`,
//! `server.key` (0600). Peer sites' CAs are kept in the store, not here.

pub mod peer;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The names a VDSA's node certificate carries (what replication peers
/// check, see the vdsa crate's TLS module).
pub const VDSA_NAME: &str = "vdsa";

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: {why}")]
    Bad { path: PathBuf, why: String },
    #[error("certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("the signing request is not acceptable: {0}")]
    BadRequest(String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io { path: path.to_path_buf(), source }
}

/// The site CA and the site manager's certificate.
pub struct SitePki {
    ca_key: KeyPair,
    ca: rcgen::Certificate,
    ca_pem: String,
    ca_der: CertificateDer<'static>,
    server_chain: Vec<CertificateDer<'static>>,
    server_key: PrivateKeyDer<'static>,
}

impl std::fmt::Debug for SitePki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SitePki").field("ca_sha256", &self.ca_sha256()).finish_non_exhaustive()
    }
}

fn ca_params(site_name: &str) -> Result<CertificateParams, PkiError> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.distinguished_name.push(DnType::OrganizationName, site_name);
    p.distinguished_name.push(DnType::CommonName, format!("{site_name} site CA"));
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    Ok(p)
}

fn write_private(path: &Path, pem: &str) -> Result<(), PkiError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io_err(path))?;
    f.write_all(pem.as_bytes()).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))
}

fn write_public(path: &Path, pem: &str) -> Result<(), PkiError> {
    let mut f = std::fs::File::create(path).map_err(io_err(path))?;
    f.write_all(pem.as_bytes()).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))
}

impl SitePki {
    /// Loads the CA from `dir/pki`, creating it on the first start; the
    /// server certificate is made anew for `server_names` each start.
    pub fn load_or_create(dir: &Path, site_name: &str, server_names: &[String]) -> Result<SitePki, PkiError> {
        let pki = dir.join("pki");
        std::fs::create_dir_all(&pki).map_err(io_err(&pki))?;
        let (key_path, ca_path) = (pki.join("ca.key"), pki.join("ca.pem"));
        let ca_key = if key_path.exists() {
            let pem = std::fs::read_to_string(&key_path).map_err(io_err(&key_path))?;
            KeyPair::from_pem(&pem).map_err(|e| PkiError::Bad { path: key_path.clone(), why: e.to_string() })?
        } else {
            let k = KeyPair::generate()?;
            write_private(&key_path, &k.serialize_pem())?;
            k
        };
        // The CA certificate is written once; re-signing it each start
        // would change its hash, which registration tokens and the peer
        // site pin.
        let ca = ca_params(site_name)?.self_signed(&ca_key)?;
        let ca_pem = if ca_path.exists() {
            std::fs::read_to_string(&ca_path).map_err(io_err(&ca_path))?
        } else {
            write_public(&ca_path, &ca.pem())?;
            ca.pem()
        };
        let ca_der = CertificateDer::from_pem_slice(ca_pem.as_bytes())
            .map_err(|e| PkiError::Bad { path: ca_path.clone(), why: e.to_string() })?;
        let server_key = KeyPair::generate()?;
        let mut names = vec![protection_groups::mgmt::SITE_MANAGER_NAME.to_string(), "localhost".to_string()];
        names.extend(server_names.iter().filter(|n| n.parse::<std::net::IpAddr>().is_err()).cloned());
        let mut p = CertificateParams::new(names)?;
        p.subject_alt_names.push(SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()));
        for ip in server_names.iter().filter_map(|n| n.parse::<std::net::IpAddr>().ok()) {
            p.subject_alt_names.push(SanType::IpAddress(ip));
        }
        p.distinguished_name.push(DnType::OrganizationName, site_name);
        p.distinguished_name.push(DnType::CommonName, format!("{site_name} site manager"));
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let server = p.signed_by(&server_key, &ca, &ca_key)?;
        let server_pem = server.pem();
        write_public(&pki.join("server.pem"), &server_pem)?;
        write_private(&pki.join("server.key"), &server_key.serialize_pem())?;
        let server_key = PrivateKeyDer::from_pem_slice(server_key.serialize_pem().as_bytes())
            .map_err(|e| PkiError::Bad { path: pki.join("server.key"), why: e.to_string() })?;
        Ok(SitePki { server_chain: vec![server.der().clone(), ca_der.clone()], server_key, ca_key, ca, ca_pem, ca_der })
    }

    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// SHA-256 of the CA certificate's DER, lower-case hex.
    pub fn ca_sha256(&self) -> String {
        sha256_hex(&self.ca_der)
    }

    /// Signs a VDSA's certificate request. Only the public key is taken
    /// from the request: the names and usages are the site's own.
    pub fn sign_vdsa(&self, csr_pem: &str, host: &str) -> Result<String, PkiError> {
        let csr =
            CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| PkiError::BadRequest(e.to_string()))?;
        let mut p = CertificateParams::new(vec![VDSA_NAME.to_string(), "localhost".to_string()])?;
        p.subject_alt_names.push(SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()));
        p.distinguished_name.push(DnType::CommonName, format!("vdsa {host}"));
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let cert = p.signed_by(&csr.public_key, &self.ca, &self.ca_key)?;
        Ok(cert.pem())
    }

    /// The site manager's certificate chain and key (the API's, and what
    /// it presents to the paired site).
    pub fn own_certificate(&self) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        (self.server_chain.clone(), self.server_key.clone_key())
    }

    /// The server side of the API: TLS 1.3; a client certificate is asked
    /// for and, when offered, must be signed by the paired site's CA
    /// (`peer`: the peering's verifier, replaced at pairing and unpairing).
    pub fn api_server_config(
        &self,
        peer: Arc<dyn rustls::server::danger::ClientCertVerifier>,
    ) -> Result<Arc<rustls::ServerConfig>, PkiError> {
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(peer)
            .with_single_cert(self.server_chain.clone(), self.server_key.clone_key())?;
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(cfg))
    }

    /// The server side of the management link: TLS 1.3; a client
    /// certificate signed by the site CA is checked when offered (a VDSA
    /// that has not registered yet has none, and may only register).
    pub fn management_server_config(&self) -> Result<Arc<rustls::ServerConfig>, PkiError> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca_der.clone()).map_err(PkiError::Tls)?;
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
            .allow_unauthenticated()
            .build()
            .map_err(|e| PkiError::Tls(rustls::Error::General(e.to_string())))?;
        let cfg = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.server_chain.clone(), self.server_key.clone_key())?;
        Ok(Arc::new(cfg))
    }
}

pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, bytes).as_ref().iter().map(|b| format!("{b:02x}")).collect()
}
