//! Site certificates and the TLS 1.3 link with mutual authentication.
//!
//! Each site has a CA (`ca.pem`, `ca.key`) that signs its VDSAs' node
//! certificates (`node.pem`, `node.key`). A VDSA trusts exactly the CAs in
//! its `peers/` folder: pairing two sites is copying each site's `ca.pem`
//! there. A certificate signed by any other CA is refused in the handshake.

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, ClientConnection, Connection, RootCertStore, ServerConfig, ServerConnection};
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The name every node certificate carries and every client checks.
pub const NODE_NAME: &str = "vdsa";

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: {why}")]
    Bad { path: PathBuf, why: String },
    #[error("creating a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("no peer site is trusted: {0} holds no CA certificate (pair the sites first)")]
    NoPeers(PathBuf),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> CertError + '_ {
    move |source| CertError::Io { path: path.to_path_buf(), source }
}

fn ca_params(site: &str) -> Result<CertificateParams, CertError> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.distinguished_name.push(DnType::OrganizationName, site);
    p.distinguished_name.push(DnType::CommonName, format!("{site} replication CA"));
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    Ok(p)
}

/// Creates the site's CA in `dir` unless it is there, then a node
/// certificate `node.pem`/`node.key` signed by it. Returns what it wrote.
pub fn create_site_certificates(dir: &Path, site: &str) -> Result<Vec<PathBuf>, CertError> {
    std::fs::create_dir_all(dir.join("peers")).map_err(io_err(dir))?;
    let ca_key_path = dir.join("ca.key");
    let mut written = Vec::new();
    let ca_key = if ca_key_path.exists() {
        let pem = std::fs::read_to_string(&ca_key_path).map_err(io_err(&ca_key_path))?;
        KeyPair::from_pem(&pem)?
    } else {
        let k = KeyPair::generate()?;
        write_private(&ca_key_path, &k.serialize_pem())?;
        written.push(ca_key_path.clone());
        k
    };
    // The same DN and key give a CA certificate that verifies the same
    // chains, so re-deriving it to sign another node is sound.
    let ca = ca_params(site)?.self_signed(&ca_key)?;
    let ca_path = dir.join("ca.pem");
    if !ca_path.exists() {
        std::fs::write(&ca_path, ca.pem()).map_err(io_err(&ca_path))?;
        written.push(ca_path);
    }
    let node_key = KeyPair::generate()?;
    let mut p = CertificateParams::new(vec![NODE_NAME.to_string(), "localhost".to_string()])?;
    p.subject_alt_names.push(SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()));
    p.distinguished_name.push(DnType::OrganizationName, site);
    p.distinguished_name.push(DnType::CommonName, format!("{site} vdsa"));
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    let node = p.signed_by(&node_key, &ca, &ca_key)?;
    let (cert_path, key_path) = (dir.join("node.pem"), dir.join("node.key"));
    std::fs::write(&cert_path, node.pem()).map_err(io_err(&cert_path))?;
    write_private(&key_path, &node_key.serialize_pem())?;
    written.push(cert_path);
    written.push(key_path);
    Ok(written)
}

fn write_private(path: &Path, pem: &str) -> Result<(), CertError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io_err(path))?;
    f.write_all(pem.as_bytes()).map_err(io_err(path))
}

/// Trusts the CA of a paired site: copies its `ca.pem` into `peers/`.
pub fn trust_peer(dir: &Path, peer_site: &str, peer_ca: &Path) -> Result<PathBuf, CertError> {
    let pem = std::fs::read(peer_ca).map_err(io_err(peer_ca))?;
    if CertificateDer::pem_slice_iter(&pem).next().is_none() {
        return Err(CertError::Bad { path: peer_ca.to_path_buf(), why: "holds no PEM certificate".into() });
    }
    let out = dir.join("peers").join(format!("{peer_site}.pem"));
    std::fs::create_dir_all(dir.join("peers")).map_err(io_err(dir))?;
    std::fs::write(&out, pem).map_err(io_err(&out))?;
    Ok(out)
}

/// A VDSA's identity and the peer sites it trusts, loaded from its folder.
/// Under a site manager the folder is the agent's `identity/` (its node
/// certificate signed by the site CA; `peers/` holds the site CA and the
/// paired sites' CAs).
#[derive(Debug)]
pub struct SiteIdentity {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    peers: RootCertStore,
}

impl Clone for SiteIdentity {
    fn clone(&self) -> Self {
        SiteIdentity { chain: self.chain.clone(), key: self.key.clone_key(), peers: self.peers.clone() }
    }
}

impl SiteIdentity {
    pub fn load(dir: &Path) -> Result<SiteIdentity, CertError> {
        let cert_path = dir.join("node.pem");
        let chain = CertificateDer::pem_file_iter(&cert_path)
            .map_err(|e| CertError::Bad { path: cert_path.clone(), why: e.to_string() })?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| CertError::Bad { path: cert_path.clone(), why: e.to_string() })?;
        if chain.is_empty() {
            return Err(CertError::Bad { path: cert_path, why: "holds no certificate".into() });
        }
        let key_path = dir.join("node.key");
        let key = PrivateKeyDer::from_pem_file(&key_path)
            .map_err(|e| CertError::Bad { path: key_path.clone(), why: e.to_string() })?;
        let peers_dir = dir.join("peers");
        let mut peers = RootCertStore::empty();
        let entries = std::fs::read_dir(&peers_dir).map_err(io_err(&peers_dir))?;
        for entry in entries {
            let path = entry.map_err(io_err(&peers_dir))?.path();
            if path.extension().and_then(|e| e.to_str()) != Some("pem") {
                continue;
            }
            for cert in CertificateDer::pem_file_iter(&path)
                .map_err(|e| CertError::Bad { path: path.clone(), why: e.to_string() })?
            {
                let cert = cert.map_err(|e| CertError::Bad { path: path.clone(), why: e.to_string() })?;
                peers.add(cert).map_err(|e| CertError::Bad { path: path.clone(), why: e.to_string() })?;
            }
        }
        if peers.is_empty() {
            return Err(CertError::NoPeers(peers_dir));
        }
        Ok(SiteIdentity { chain, key, peers })
    }

    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    /// The listening side: TLS 1.3 only, client certificates required and
    /// checked against the trusted peer CAs.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, CertError> {
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(self.peers.clone()), Self::provider())
            .build()
            .map_err(|e| CertError::Tls(rustls::Error::General(e.to_string())))?;
        let cfg = ServerConfig::builder_with_provider(Self::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())?;
        Ok(Arc::new(cfg))
    }

    /// The connecting side: TLS 1.3 only, the server checked against the
    /// trusted peer CAs, our node certificate presented.
    pub fn client_config(&self) -> Result<Arc<ClientConfig>, CertError> {
        let cfg = ClientConfig::builder_with_provider(Self::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(self.peers.clone())
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())?;
        Ok(Arc::new(cfg))
    }
}

/// Completes the handshake as a client over `tcp` with a VDSA.
pub fn connect(cfg: Arc<ClientConfig>, tcp: TcpStream) -> io::Result<(LinkReader, LinkWriter)> {
    connect_to(cfg, tcp, NODE_NAME)
}

/// Completes the handshake as a client over `tcp`, checking that the
/// server's certificate names `server_name`.
pub fn connect_to(cfg: Arc<ClientConfig>, tcp: TcpStream, server_name: &str) -> io::Result<(LinkReader, LinkWriter)> {
    handshake(client_connection(cfg, server_name)?, tcp)
}

/// A client's TLS state before its handshake, for a server whose
/// certificate must name `server_name`.
pub(super) fn client_connection(cfg: Arc<ClientConfig>, server_name: &str) -> io::Result<Connection> {
    let name =
        ServerName::try_from(server_name.to_string()).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    Ok(Connection::Client(ClientConnection::new(cfg, name).map_err(io::Error::other)?))
}

pub(super) fn server_connection(cfg: Arc<ServerConfig>) -> io::Result<Connection> {
    Ok(Connection::Server(ServerConnection::new(cfg).map_err(io::Error::other)?))
}

fn handshake(mut conn: Connection, mut tcp: TcpStream) -> io::Result<(LinkReader, LinkWriter)> {
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp)?;
    }
    while conn.wants_write() {
        conn.write_tls(&mut tcp)?;
    }
    let conn = Arc::new(Mutex::new(conn));
    let w = tcp.try_clone()?;
    Ok((LinkReader { conn: conn.clone(), tcp, cipher: CipherIn::new() }, LinkWriter { conn, tcp: w, out: Vec::new() }))
}

pub(super) fn poisoned() -> io::Error {
    io::Error::other("TLS state poisoned by a panic")
}

/// Ciphertext read from the socket and not yet given to rustls. Shared by
/// the blocking and the asynchronous link halves: only where the bytes
/// come from differs.
#[derive(Debug)]
pub(super) struct CipherIn {
    pub(super) buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl CipherIn {
    pub(super) fn new() -> CipherIn {
        CipherIn { buf: vec![0u8; 64 << 10], start: 0, end: 0 }
    }

    /// `n` bytes were read into the start of `buf`.
    pub(super) fn filled(&mut self, n: usize) {
        self.start = 0;
        self.end = n;
    }

    /// Hands plaintext to `take` (the reader of the connection), feeding
    /// rustls the ciphertext held here as needed. None: rustls needs more
    /// ciphertext from the socket first.
    pub(super) fn plaintext<T>(
        &mut self,
        conn: &Mutex<Connection>,
        mut take: impl FnMut(&mut rustls::Reader<'_>) -> io::Result<T>,
    ) -> io::Result<Option<T>> {
        let mut conn = conn.lock().map_err(|_| poisoned())?;
        loop {
            match take(&mut conn.reader()) {
                Ok(t) => return Ok(Some(t)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            // Feed ciphertext only once the plaintext is drained: rustls
            // refuses more while its plaintext buffer is full.
            if self.is_empty() {
                return Ok(None);
            }
            self.feed(&mut conn)?;
        }
    }

    /// Whether rustls has taken all the ciphertext held here.
    pub(super) fn is_empty(&self) -> bool {
        self.start >= self.end
    }

    /// Gives rustls what it takes of the ciphertext held here, and has it
    /// processed.
    pub(super) fn feed(&mut self, conn: &mut Connection) -> io::Result<()> {
        let mut rest = &self.buf[self.start..self.end];
        let before = rest.len();
        conn.read_tls(&mut rest)?;
        self.start += before - rest.len();
        conn.process_new_packets().map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        Ok(())
    }
}

/// Encrypts `pieces`, one stream of bytes, into `out` (emptied first):
/// rustls encrypts them into records that span pieces. The blocking
/// writer sends `out` after letting go of the connection's lock, so a
/// slow send never holds up the reader.
fn encrypt_pieces(conn: &Mutex<Connection>, pieces: &[&[u8]], out: &mut Vec<u8>) -> io::Result<()> {
    out.clear();
    let mut conn = conn.lock().map_err(|_| poisoned())?;
    let mut left = Pieces::new(pieces);
    while !left.is_empty() {
        left.give_to(&mut conn)?;
        while conn.wants_write() {
            conn.write_tls(out)?;
        }
    }
    Ok(())
}

/// The part of a message's pieces that rustls has not taken yet.
pub(super) struct Pieces<'a> {
    pieces: &'a [&'a [u8]],
    /// The first piece with bytes left (past the end: none left).
    first: usize,
    /// Bytes of `pieces[first]` already taken.
    skip: usize,
}

impl<'a> Pieces<'a> {
    pub(super) fn new(pieces: &'a [&'a [u8]]) -> Self {
        let mut p = Pieces { pieces, first: 0, skip: 0 };
        p.advance(0); // past empty pieces at the start
        p
    }

    pub(super) fn is_empty(&self) -> bool {
        self.first >= self.pieces.len()
    }

    /// Has rustls encrypt what it takes of the rest into its records.
    pub(super) fn give_to(&mut self, conn: &mut Connection) -> io::Result<()> {
        let mut slices = Vec::with_capacity(self.pieces.len() - self.first);
        if let Some(p) = self.pieces.get(self.first) {
            slices.push(io::IoSlice::new(&p[self.skip..]));
        }
        slices.extend(self.pieces.iter().skip(self.first + 1).map(|p| io::IoSlice::new(p)));
        let n = conn.writer().write_vectored(&slices)?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::WriteZero, "TLS took no bytes"));
        }
        self.advance(n);
        Ok(())
    }

    /// Past `n` more bytes, and past any piece that has none left.
    fn advance(&mut self, mut n: usize) {
        while let Some(p) = self.pieces.get(self.first) {
            let rest = p.len() - self.skip;
            if n < rest {
                self.skip += n;
                return;
            }
            n -= rest;
            self.first += 1;
            self.skip = 0;
        }
    }
}

/// The receiving half of a link: one thread reads while another writes.
#[derive(Debug)]
pub struct LinkReader {
    conn: Arc<Mutex<Connection>>,
    tcp: TcpStream,
    cipher: CipherIn,
}

impl LinkReader {
    /// A read blocked longer than this fails (the peer went silent).
    pub fn set_timeout(&self, t: Option<std::time::Duration>) -> io::Result<()> {
        self.tcp.set_read_timeout(t)
    }
}

impl Read for LinkReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if let Some(n) = self.cipher.plaintext(&self.conn, |r| r.read(buf))? {
                return Ok(n);
            }
            // Read ciphertext without the lock, so the writer is never
            // held up by a quiet peer.
            let n = self.tcp.read(&mut self.cipher.buf)?;
            if n == 0 {
                return Err(peer_closed());
            }
            self.cipher.filled(n);
        }
    }
}

pub(super) fn peer_closed() -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, "the peer closed the link")
}

/// The sending half of a link.
#[derive(Debug)]
pub struct LinkWriter {
    conn: Arc<Mutex<Connection>>,
    tcp: TcpStream,
    out: Vec<u8>,
}

impl LinkWriter {
    /// Closes the TCP connection both ways (the reader then fails at once).
    pub fn shutdown(&self) {
        let _ = self.tcp.shutdown(std::net::Shutdown::Both);
    }

    pub fn set_timeout(&self, t: Option<std::time::Duration>) -> io::Result<()> {
        self.tcp.set_write_timeout(t)
    }

    /// Sends `pieces` as one stream of bytes, encrypted in one go
    /// ([`encrypt_pieces`]) and sent in one send. This spares the caller
    /// gathering a message into one buffer first.
    pub fn write_all_pieces(&mut self, pieces: &[&[u8]]) -> io::Result<()> {
        encrypt_pieces(&self.conn, pieces, &mut self.out)?;
        self.tcp.write_all(&self.out)
    }
}

impl Write for LinkWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_all(buf)?;
        Ok(buf.len())
    }

    /// Encrypts under the lock, sends without it.
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.write_all_pieces(&[buf])
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
