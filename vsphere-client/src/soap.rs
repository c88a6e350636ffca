//! The SOAP transport: TLS trust, the HTTP session cookie, the envelope, and
//! faults mapped to [`Error`].

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

use crate::error::{Error, Result};
use crate::xml::{self, Node};

/// The vim25 namespace and the API version we speak (vSphere 6.5 and later
/// accept it).
pub const VIM25_NS: &str = "urn:vim25";
pub const SOAP_ACTION: &str = "urn:vim25/6.5";
const SESSION_COOKIE: &str = "vmware_soap_session";

/// How the server's certificate is checked. vCenters and ESXi hosts usually
/// have self-signed certificates, so a CA is often not at hand; pinning the
/// thumbprint the operator saw is the usual way, and `Insecure` exists for
/// labs only.
#[derive(Clone)]
pub enum ServerTrust {
    /// The certificate must chain to one of these and name the host.
    Ca(Vec<CertificateDer<'static>>),
    /// The certificate's SHA-1 (20 bytes) or SHA-256 (32 bytes) thumbprint
    /// must equal this.
    Thumbprint(Vec<u8>),
    /// Any certificate (the handshake's signature is still checked).
    Insecure,
}

impl std::fmt::Debug for ServerTrust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ServerTrust::Ca(c) => write!(f, "Ca({} certificates)", c.len()),
            ServerTrust::Thumbprint(t) => write!(f, "Thumbprint({})", format_thumbprint(t)),
            ServerTrust::Insecure => write!(f, "Insecure"),
        }
    }
}

impl ServerTrust {
    /// Trust the CA certificates in a PEM file's contents.
    pub fn ca_pem(pem: &[u8]) -> Result<Self> {
        use rustls::pki_types::pem::PemObject;
        let certs: Vec<_> = CertificateDer::pem_slice_iter(pem)
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| Error::Trust(format!("the CA file is not PEM: {e}")))?;
        if certs.is_empty() {
            return Err(Error::Trust("the CA file holds no certificate".into()));
        }
        Ok(ServerTrust::Ca(certs))
    }

    /// Parses a thumbprint as vSphere shows it: hex bytes, with or without
    /// colons, SHA-1 or SHA-256.
    pub fn thumbprint(s: &str) -> Result<Self> {
        let hex: String = s.chars().filter(|c| *c != ':' && !c.is_whitespace()).collect();
        let bad = || Error::Trust(format!("{s:?} is not a SHA-1 or SHA-256 thumbprint (hex bytes, colons optional)"));
        if !hex.len().is_multiple_of(2) {
            return Err(bad());
        }
        let bytes = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(hex.get(i..i + 2).unwrap_or("zz"), 16))
            .collect::<std::result::Result<Vec<u8>, _>>()
            .map_err(|_| bad())?;
        if bytes.len() != 20 && bytes.len() != 32 {
            return Err(bad());
        }
        Ok(ServerTrust::Thumbprint(bytes))
    }

    pub(crate) fn rustls_config(&self) -> Result<rustls::ClientConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| Error::Trust(e.to_string()))?;
        let config = match self {
            ServerTrust::Ca(certs) => {
                let mut roots = rustls::RootCertStore::empty();
                for c in certs {
                    roots.add(c.clone()).map_err(|e| Error::Trust(format!("the CA certificate is unusable: {e}")))?;
                }
                builder.with_root_certificates(roots).with_no_client_auth()
            }
            ServerTrust::Thumbprint(t) => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(PinnedCertificate { thumbprint: Some(t.clone()), provider }))
                .with_no_client_auth(),
            ServerTrust::Insecure => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(PinnedCertificate { thumbprint: None, provider }))
                .with_no_client_auth(),
        };
        Ok(config)
    }
}

/// Hex with colons, as vSphere prints thumbprints.
pub fn format_thumbprint(t: &[u8]) -> String {
    t.iter().map(|b| format!("{b:02X}")).collect::<Vec<_>>().join(":")
}

/// The SHA-1 and SHA-256 thumbprints of a DER certificate.
pub fn thumbprints(der: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let sha1 = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, der);
    let sha256 = ring::digest::digest(&ring::digest::SHA256, der);
    (sha1.as_ref().to_vec(), sha256.as_ref().to_vec())
}

/// The certificate a TLS server presents, unchecked, for an operator to
/// compare with what the vCenter's console shows and then pin. Returns the
/// DER certificate; [`thumbprints`] gives its SHA-1 and SHA-256.
pub fn fetch_server_certificate(url: &str) -> Result<Vec<u8>> {
    let parsed = reqwest::Url::parse(url).map_err(|e| Error::InvalidArgument {
        property: Some("url".into()),
        message: format!("{url:?} is not a URL: {e}"),
    })?;
    let host = parsed.host_str().unwrap_or_default().to_string();
    let port = parsed.port_or_known_default().unwrap_or(443);
    let conn_err = |m: String| Error::Connection { url: url.to_string(), message: m };
    let config = Arc::new(ServerTrust::Insecure.rustls_config()?);
    let name = ServerName::try_from(host.clone()).map_err(|e| conn_err(format!("bad host name: {e}")))?;
    let mut tls = rustls::ClientConnection::new(config, name).map_err(|e| conn_err(e.to_string()))?;
    let mut tcp = std::net::TcpStream::connect((host.as_str(), port)).map_err(|e| conn_err(e.to_string()))?;
    tcp.set_read_timeout(Some(Duration::from_secs(15))).map_err(|e| conn_err(e.to_string()))?;
    while tls.is_handshaking() {
        tls.complete_io(&mut tcp).map_err(|e| Error::Tls { url: url.to_string(), message: e.to_string() })?;
    }
    tls.peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.as_ref().to_vec())
        .ok_or_else(|| Error::Tls { url: url.to_string(), message: "the server sent no certificate".into() })
}

struct ThumbprintMismatch(String);

// rustls shows a custom certificate error through its Debug form: the
// operator reads the message, not a structure.
impl std::fmt::Debug for ThumbprintMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::fmt::Display for ThumbprintMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ThumbprintMismatch {}

/// Accepts exactly the certificate with the pinned thumbprint (or any, when
/// none is pinned), and checks that the peer holds its key.
#[derive(Debug)]
struct PinnedCertificate {
    thumbprint: Option<Vec<u8>>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCertificate {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        let Some(want) = &self.thumbprint else { return Ok(ServerCertVerified::assertion()) };
        let (sha1, sha256) = thumbprints(end_entity);
        let got = if want.len() == 20 { sha1 } else { sha256 };
        if &got == want {
            Ok(ServerCertVerified::assertion())
        } else {
            let mismatch = ThumbprintMismatch(format!(
                "the server's certificate has thumbprint {}, not the pinned {}",
                format_thumbprint(&got),
                format_thumbprint(want)
            ));
            Err(rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(Arc::new(
                mismatch,
            )))))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// Builds an HTTP client that checks the server as `trust` says.
pub(crate) fn http_client(trust: &ServerTrust, timeout: Option<Duration>) -> Result<reqwest::blocking::Client> {
    reqwest::blocking::Client::builder()
        .use_preconfigured_tls(trust.rustls_config()?)
        .connect_timeout(Duration::from_secs(15))
        .timeout(timeout)
        .pool_max_idle_per_host(64)
        .build()
        .map_err(|e| Error::Tls { url: String::new(), message: e.to_string() })
}

/// Maps a failed HTTP exchange to a TLS or a connection error.
/// A TLS failure as an operator reads it: the pinned thumbprint's
/// mismatch in its own words (not rustls's debug form of a custom error),
/// and a bad signature with its usual cause named.
fn tls_message(e: &rustls::Error) -> String {
    use rustls::CertificateError;
    match e {
        rustls::Error::InvalidCertificate(CertificateError::Other(o)) => o.0.to_string(),
        rustls::Error::InvalidCertificate(CertificateError::BadSignature) => {
            "the server's certificate has a signature \
            this client does not accept: RSA keys under 2048 bits (and SHA-1 signatures) are refused; give the \
            server a certificate with a 2048-bit or larger key"
                .into()
        }
        other => other.to_string(),
    }
}

/// [`tls_message`] for a rustls error seen only as text.
fn tls_text(detail: &str) -> String {
    if let Some(i) = detail.find("the server's certificate has thumbprint") {
        return detail[i..].trim_end_matches([')', '"']).to_string();
    }
    if detail.contains("BadSignature") {
        return tls_message(&rustls::Error::InvalidCertificate(rustls::CertificateError::BadSignature));
    }
    detail.to_string()
}

pub(crate) fn transport_error(url: &str, e: &reqwest::Error) -> Error {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    let mut detail = e.to_string();
    while let Some(s) = source {
        let tls = s.downcast_ref::<rustls::Error>().or_else(|| {
            s.downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        });
        if let Some(t) = tls {
            return Error::Tls { url: url.to_string(), message: tls_message(t) };
        }
        detail = s.to_string();
        // hyper-util boxes the rustls error in ways a downcast cannot see
        // through; its text is rustls's own.
        if ["invalid peer certificate", "peer is incompatible", "received fatal alert", "HandshakeFailure"]
            .iter()
            .any(|m| detail.contains(m))
        {
            return Error::Tls { url: url.to_string(), message: tls_text(&detail) };
        }
        source = s.source();
    }
    let message = if e.is_timeout() { format!("timed out ({detail})") } else { detail };
    Error::Connection { url: url.to_string(), message }
}

/// One HTTP session with a vim25 endpoint. Safe to share between threads:
/// calls run concurrently over pooled connections.
pub struct Soap {
    http: reqwest::blocking::Client,
    url: reqwest::Url,
    trust: ServerTrust,
    cookie: Mutex<Option<String>>,
}

impl std::fmt::Debug for Soap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Soap").field("url", &self.url.as_str()).field("trust", &self.trust).finish()
    }
}

impl Soap {
    pub fn new(url: reqwest::Url, trust: ServerTrust, timeout: Duration) -> Result<Self> {
        let http = http_client(&trust, Some(timeout)).map_err(|e| with_url(e, url.as_str()))?;
        Ok(Soap { http, url, trust, cookie: Mutex::new(None) })
    }

    pub fn url(&self) -> &reqwest::Url {
        &self.url
    }

    pub fn trust(&self) -> &ServerTrust {
        &self.trust
    }

    pub(crate) fn http(&self) -> &reqwest::blocking::Client {
        &self.http
    }

    /// The session cookie, as a `Cookie` header value.
    pub(crate) fn cookie(&self) -> Option<String> {
        self.cookie.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub(crate) fn forget_session(&self) {
        *self.cookie.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// Calls `method` with `body` (the method element's children, already
    /// escaped) and returns the method's response element.
    pub fn call(&self, method: &str, body: &str) -> Result<Node> {
        let envelope = format!(
            concat!(
                r#"<?xml version="1.0" encoding="UTF-8"?>"#,
                r#"<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" "#,
                r#"xmlns:xsd="http://www.w3.org/2001/XMLSchema" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">"#,
                r#"<soapenv:Body><{m} xmlns="{ns}">{b}</{m}></soapenv:Body></soapenv:Envelope>"#
            ),
            m = method,
            ns = VIM25_NS,
            b = body
        );
        let mut req = self
            .http
            .post(self.url.clone())
            .header("Content-Type", "text/xml; charset=utf-8")
            .header("SOAPAction", SOAP_ACTION)
            .body(envelope);
        if let Some(c) = self.cookie() {
            req = req.header("Cookie", c);
        }
        let resp = req.send().map_err(|e| transport_error(self.url.as_str(), &e))?;
        let status = resp.status();
        for v in resp.headers().get_all("set-cookie") {
            if let Some(c) = v.to_str().ok().and_then(session_cookie) {
                *self.cookie.lock().unwrap_or_else(|p| p.into_inner()) = Some(c);
            }
        }
        let bytes = resp.bytes().map_err(|e| transport_error(self.url.as_str(), &e))?;
        parse_response(method, status.as_u16(), &bytes)
    }
}

fn with_url(e: Error, url: &str) -> Error {
    match e {
        Error::Tls { message, .. } => Error::Tls { url: url.to_string(), message },
        other => other,
    }
}

/// `vmware_soap_session=…` out of a Set-Cookie header.
fn session_cookie(header: &str) -> Option<String> {
    let pair = header.split(';').next()?.trim();
    let (name, value) = pair.split_once('=')?;
    (name == SESSION_COOKIE && !value.is_empty()).then(|| pair.to_string())
}

/// Reads a SOAP response: the method's response element, or the fault
/// mapped to an error.
pub fn parse_response(method: &str, status: u16, body: &[u8]) -> Result<Node> {
    let envelope = match xml::parse(body) {
        Ok(e) => e,
        Err(e) if !(200..300).contains(&status) => {
            let snippet = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
            return Err(Error::Protocol(format!("{method}: HTTP {status} without a SOAP body ({e}): {snippet:?}")));
        }
        Err(e) => return Err(e),
    };
    let body =
        envelope.child("Body").ok_or_else(|| Error::Protocol(format!("{method}: the answer has no SOAP Body")))?;
    let first = body.children.first().ok_or_else(|| Error::Protocol(format!("{method}: the SOAP Body is empty")))?;
    if first.name == "Fault" {
        return Err(fault_error(method, first));
    }
    if !(200..300).contains(&status) {
        return Err(Error::Protocol(format!("{method}: HTTP {status} with a non-fault body <{}>", first.name)));
    }
    Ok(first.clone())
}

/// The vim25 type of a fault's detail: the `xsi:type`, else the element name
/// less its `Fault` suffix.
fn fault_kind(detail: &Node) -> Option<(String, &Node)> {
    let f = detail.children.first()?;
    let kind = f.xsi_type.clone().unwrap_or_else(|| f.name.trim_end_matches("Fault").to_string());
    Some((kind, f))
}

fn fault_error(method: &str, fault: &Node) -> Error {
    let message = fault.text_of("faultstring").unwrap_or("").trim().to_string();
    let Some((kind, f)) = fault.child("detail").and_then(fault_kind) else {
        return Error::Fault { method: method.to_string(), fault: "unknown".into(), message };
    };
    typed_fault(method, &kind, f, message)
}

/// Maps a vim25 fault (from a SOAP fault or a task's error) to an error.
pub(crate) fn typed_fault(method: &str, kind: &str, f: &Node, message: String) -> Error {
    match kind {
        "InvalidLogin" => Error::InvalidLogin { user: String::new() },
        "NotAuthenticated" => Error::NotAuthenticated { message },
        "ManagedObjectNotFound" => match f.child("obj").map(Node::moref) {
            Some(Ok(obj)) => Error::ObjectNotFound { obj },
            _ => Error::Fault { method: method.into(), fault: kind.into(), message },
        },
        "InvalidArgument" | "InvalidRequest" | "InvalidType" => {
            let property = f.text_of("invalidProperty").map(str::to_string);
            let message = if message.is_empty() { kind.to_string() } else { message };
            Error::InvalidArgument { property, message }
        }
        "DuplicateName" | "AlreadyExists" => {
            let name = f.text_of("name").unwrap_or(&message).to_string();
            Error::AlreadyExists { name }
        }
        _ => {
            let message = if message.is_empty() { kind.to_string() } else { message };
            Error::Fault { method: method.into(), fault: kind.into(), message }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_map_to_typed_errors() {
        let fault = |detail: &str| {
            format!(
                r#"<?xml version="1.0"?><soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><soapenv:Body><soapenv:Fault><faultcode>ServerFaultCode</faultcode><faultstring>boom</faultstring><detail>{detail}</detail></soapenv:Fault></soapenv:Body></soapenv:Envelope>"#
            )
        };
        let e = parse_response("Login", 500, fault(r#"<InvalidLoginFault xsi:type="InvalidLogin"/>"#).as_bytes());
        assert!(matches!(e, Err(Error::InvalidLogin { .. })), "{e:?}");
        let e = parse_response(
            "X",
            500,
            fault(r#"<ManagedObjectNotFoundFault xsi:type="ManagedObjectNotFound"><obj type="VirtualMachine">vm-9</obj></ManagedObjectNotFoundFault>"#).as_bytes(),
        );
        assert!(matches!(&e, Err(Error::ObjectNotFound { obj }) if obj.value == "vm-9"), "{e:?}");
        let e = parse_response(
            "X",
            500,
            fault(r#"<InvalidArgumentFault xsi:type="InvalidArgument"><invalidProperty>name</invalidProperty></InvalidArgumentFault>"#).as_bytes(),
        );
        assert!(matches!(&e, Err(Error::InvalidArgument { property: Some(p), .. }) if p == "name"), "{e:?}");
        // No xsi:type: the element name tells.
        let e = parse_response("X", 500, fault("<NotAuthenticatedFault/>").as_bytes());
        assert!(matches!(e, Err(Error::NotAuthenticated { .. })), "{e:?}");
        let e = parse_response("X", 500, fault(r#"<WeirdFault xsi:type="Weird"/>"#).as_bytes());
        assert!(matches!(&e, Err(Error::Fault { fault, .. }) if fault == "Weird"), "{e:?}");
        let e = parse_response("X", 502, b"<html>bad gateway</html>");
        assert!(matches!(e, Err(Error::Protocol(_))), "{e:?}");
        let e = parse_response("X", 502, b"Bad Gateway");
        assert!(matches!(&e, Err(Error::Protocol(m)) if m.contains("HTTP 502")), "{e:?}");
    }

    #[test]
    fn thumbprints_parse_in_vsphere_form() {
        let t = ServerTrust::thumbprint("AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89:AB:CD:EF:01").expect("sha1");
        assert!(matches!(t, ServerTrust::Thumbprint(ref b) if b.len() == 20));
        assert!(ServerTrust::thumbprint(&"ab".repeat(32)).is_ok());
        for bad in ["", "AB:CD", "zz".repeat(20).as_str(), "ABC"] {
            assert!(ServerTrust::thumbprint(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn only_the_session_cookie_is_kept() {
        assert_eq!(session_cookie("vmware_soap_session=abc; HttpOnly").as_deref(), Some("vmware_soap_session=abc"));
        assert_eq!(session_cookie("other=1; Path=/"), None);
        assert_eq!(session_cookie("vmware_soap_session=; HttpOnly"), None);
    }
}
