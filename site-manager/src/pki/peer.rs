//! TLS between paired site managers (docs/architecture.md §8): the API
//! asks for a client certificate and accepts one only if the paired
//! site's CA signed it; the calling side checks the other's certificate
//! against the CA it pinned (by hash while pairing, by the stored CA
//! after) and the site manager's fixed name, whatever address it dialled.

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use std::sync::{Arc, RwLock};

use crate::pki::{provider, sha256_hex, PkiError, SitePki};

fn signature_schemes() -> Vec<SignatureScheme> {
    provider().signature_verification_algorithms.supported_schemes()
}

fn tls13_signature(
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    rustls::crypto::verify_tls13_signature(message, cert, dss, &provider().signature_verification_algorithms)
}

fn tls12_signature(
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    rustls::crypto::verify_tls12_signature(message, cert, dss, &provider().signature_verification_algorithms)
}

/// Parses one PEM certificate.
pub fn parse_ca(pem: &str) -> Result<CertificateDer<'static>, String> {
    CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| format!("not a PEM certificate: {e}"))
}

/// The API's client-certificate check: optional (operators and VDSAs
/// present none), and only the paired site's CA is accepted. Replaced in
/// place when the site pairs or unpairs.
#[derive(Debug, Default)]
pub struct PeerClientVerifier {
    inner: RwLock<Option<Arc<dyn ClientCertVerifier>>>,
}

impl PeerClientVerifier {
    /// Trusts `ca` (the paired site's CA), or nobody.
    pub fn set_peer(&self, ca: Option<&CertificateDer<'static>>) -> Result<(), PkiError> {
        let verifier = match ca {
            None => None,
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                roots.add(ca.clone())?;
                Some(
                    rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                        .allow_unauthenticated()
                        .build()
                        .map_err(|e| PkiError::Tls(rustls::Error::General(e.to_string())))?,
                )
            }
        };
        if let Ok(mut inner) = self.inner.write() {
            *inner = verifier;
        }
        Ok(())
    }

    fn current(&self) -> Option<Arc<dyn ClientCertVerifier>> {
        self.inner.read().ok().and_then(|i| i.clone())
    }
}

impl ClientCertVerifier for PeerClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        match self.current() {
            Some(v) => v.verify_client_cert(end_entity, intermediates, now),
            None => Err(rustls::Error::General("this site is not paired: no client certificate is accepted".into())),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        signature_schemes()
    }
}

/// What the calling side trusts the other site manager by.
#[derive(Debug, Clone)]
pub enum PeerPin {
    /// While pairing: the CA whose SHA-256 the pairing token names, found
    /// in the chain the server presents.
    Sha256(String),
    /// Once paired: the stored CA.
    Ca(CertificateDer<'static>),
}

#[derive(Debug)]
struct PinnedPeerVerifier {
    pin: PeerPin,
}

impl ServerCertVerifier for PinnedPeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _dialled: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = match &self.pin {
            PeerPin::Ca(ca) => ca.clone(),
            PeerPin::Sha256(pin) => {
                intermediates.iter().find(|c| sha256_hex(c) == *pin).map(|c| c.clone().into_owned()).ok_or_else(
                    || rustls::Error::General("the other site's CA is not the one the pairing token names".into()),
                )?
            }
        };
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca)?;
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        // The address dialled may be any name or IP; the certificate must
        // name a site manager.
        let name = ServerName::try_from(protection_groups::mgmt::SITE_MANAGER_NAME)
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        inner.verify_server_cert(end_entity, intermediates, &name, ocsp, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        signature_schemes()
    }
}

/// TLS 1.3 to the other site manager, trusted by `pin`. Once paired this
/// site manager's certificate is presented; while pairing none is (the
/// other site does not know this site's CA yet and would refuse it).
pub fn peer_client_config(pki: &SitePki, pin: PeerPin) -> Result<rustls::ClientConfig, PkiError> {
    let pairing = matches!(pin, PeerPin::Sha256(_));
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedPeerVerifier { pin }));
    if pairing {
        return Ok(builder.with_no_client_auth());
    }
    let (chain, key) = pki.own_certificate();
    Ok(builder.with_client_auth_cert(chain, key)?)
}
