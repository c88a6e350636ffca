//! The management link's server side: VDSAs dial in over TLS 1.3. A VDSA
//! without a certificate may only register (with a one-time registration
//! token, answered with its certificate); one with a certificate signed by
//! the site CA opens a session: Hello, Welcome with the manager
//! generation, then desired state down and reports up
//! (docs/management-protocol.md).

use crate::links::VdsaLink;
use crate::model::{now_ms, VdsaState};
use crate::pki::sha256_hex;
use crate::state::SiteManager;
use protection_groups::mgmt::{ActualState, ManagerMessage, VdsaMessage, MAX_FRAME_BYTES, PROTOCOL_VERSION};
use protection_groups::{CheckpointId, HostId};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

/// A first message that takes longer is dropped.
const FIRST_MESSAGE_TIMEOUT: Duration = Duration::from_secs(10);
/// A session that sends nothing (not even a report) for this long is closed.
const SESSION_IDLE_LIMIT: Duration = Duration::from_secs(15);

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("link: {0}")]
    Io(#[from] std::io::Error),
    #[error("frame of {0} bytes is over the limit of {MAX_FRAME_BYTES}")]
    TooLarge(u32),
    #[error("bad message: {0}")]
    Decode(#[from] serde_json::Error),
}

pub async fn read_message<R: AsyncRead + Unpin>(r: &mut R) -> Result<VdsaMessage, FrameError> {
    let len = r.read_u32().await?;
    if len > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge(len));
    }
    let mut buf = vec![0u8; len as usize];
    r.read_exact(&mut buf).await?;
    Ok(serde_json::from_slice(&buf)?)
}

pub async fn write_message<W: AsyncWrite + Unpin>(w: &mut W, m: &ManagerMessage) -> Result<(), FrameError> {
    let bytes = serde_json::to_vec(m)?;
    let len = u32::try_from(bytes.len()).map_err(|_| FrameError::TooLarge(u32::MAX))?;
    if len > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge(len));
    }
    w.write_u32(len).await?;
    w.write_all(&bytes).await?;
    w.flush().await?;
    Ok(())
}

/// Accepts VDSA links until the task is dropped.
pub async fn serve(sm: Arc<SiteManager>, listener: TcpListener) {
    let cfg = match sm.pki.management_server_config() {
        Ok(c) => c,
        Err(e) => return tracing::error!(error = %e, "cannot configure the management link"),
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "management accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (sm, acceptor) = (sm.clone(), acceptor.clone());
        tokio::spawn(async move {
            let _ = tcp.set_nodelay(true);
            let stream = match tokio::time::timeout(FIRST_MESSAGE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return tracing::info!(%peer, error = %e, "management TLS handshake refused"),
                Err(_) => return tracing::info!(%peer, "management TLS handshake timed out"),
            };
            if let Err(e) = handle(sm, stream).await {
                tracing::info!(%peer, error = %e, "management link ended");
            }
        });
    }
}

/// The host id a VDSA certificate names (`CN=vdsa <host id>`).
fn certified_host(der: &[u8]) -> Option<HostId> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?.as_str().ok()?.to_string();
    let id = cn.strip_prefix("vdsa ")?;
    uuid::Uuid::parse_str(id).ok().map(HostId)
}

async fn refuse<W: AsyncWrite + Unpin>(w: &mut W, reason: String) -> Result<(), FrameError> {
    tracing::info!(%reason, "refusing a VDSA");
    write_message(w, &ManagerMessage::Refused { reason }).await
}

async fn handle(
    sm: Arc<SiteManager>,
    stream: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
) -> Result<(), FrameError> {
    let certified = stream.get_ref().1.peer_certificates().and_then(|c| c.first()).and_then(|c| certified_host(c));
    let (mut rd, mut wr) = tokio::io::split(stream);
    let first = match tokio::time::timeout(FIRST_MESSAGE_TIMEOUT, read_message(&mut rd)).await {
        Ok(m) => m?,
        Err(_) => return Ok(()),
    };
    match first {
        VdsaMessage::Register { protocol, token, host_name, csr_pem, software_version } => {
            if protocol != PROTOCOL_VERSION {
                return refuse(&mut wr, format!("protocol {protocol}; this site manager speaks {PROTOCOL_VERSION}"))
                    .await;
            }
            let sm2 = sm.clone();
            let answer =
                tokio::task::spawn_blocking(move || register(&sm2, &token, &host_name, &csr_pem, &software_version))
                    .await
                    .map_err(|e| FrameError::Io(std::io::Error::other(e)))?;
            match answer {
                Ok(m) => write_message(&mut wr, &m).await,
                Err(reason) => refuse(&mut wr, reason).await,
            }
        }
        VdsaMessage::Hello {
            protocol,
            host,
            newest_generation,
            newest_checkpoint,
            hold_limit_ms,
            replication_address,
            software_version,
        } => {
            if protocol != PROTOCOL_VERSION {
                return refuse(&mut wr, format!("protocol {protocol}; this site manager speaks {PROTOCOL_VERSION}"))
                    .await;
            }
            if certified != Some(host) {
                return refuse(&mut wr, format!("the link's certificate does not name host {host}: register first"))
                    .await;
            }
            let known = {
                let sm = sm.clone();
                tokio::task::spawn_blocking(move || sm.with_store(|s| s.hosts.get(host.as_bytes()))).await
            };
            let Ok(Ok(Some(mut record))) = known else {
                return refuse(&mut wr, format!("host {host} is not a host of this site (undeployed?)")).await;
            };
            let generation = sm.generation();
            if newest_generation > generation {
                tracing::error!(%host, vdsa_generation = newest_generation, generation,
                    "this VDSA obeys a newer site manager: this one is stale (restored from a backup?) and cannot steer it; run reclaim");
                // What it reported is kept for reclaim; it is not counted
                // as installed, since it will not obey.
                record.vdsa_generation = newest_generation;
                record.vdsa_newest_checkpoint = record.vdsa_newest_checkpoint.max(newest_checkpoint.0);
                let sm = sm.clone();
                let r = record.clone();
                let _ = tokio::task::spawn_blocking(move || sm.with_store(|s| s.hosts.put(r.id.as_bytes(), &r))).await;
                return write_message(&mut wr, &ManagerMessage::Welcome { protocol: PROTOCOL_VERSION, generation })
                    .await;
            }
            if hold_limit_ms <= crate::coordinator::PREPARE_DEADLINE.as_millis() as u64 {
                tracing::warn!(%host, hold_limit_ms, "the VDSA's hold limit is not longer than the barrier deadline");
            }
            record.vdsa = VdsaState::Installed;
            record.vdsa_reason = None;
            record.software_version = Some(software_version);
            record.replication_address = Some(replication_address);
            record.vdsa_generation = newest_generation;
            record.vdsa_newest_checkpoint = newest_checkpoint.0;
            record.last_heartbeat_ms = Some(now_ms());
            {
                let sm = sm.clone();
                let r = record.clone();
                let _ = tokio::task::spawn_blocking(move || -> Result<(), crate::store::StoreError> {
                    sm.with_store(|s| s.hosts.put(r.id.as_bytes(), &r))?;
                    // A KVM deploy's task ends when its VDSA first reports.
                    crate::deploy::finish_register_wait(&sm, &r)
                })
                .await;
            }
            write_message(&mut wr, &ManagerMessage::Welcome { protocol: PROTOCOL_VERSION, generation }).await?;
            session(sm, host, hold_limit_ms, newest_checkpoint, rd, wr).await
        }
        other => refuse(&mut wr, format!("the first message must be register or hello, not {other:?}")).await,
    }
}

/// Checks a registration token and signs the VDSA's certificate.
fn register(
    sm: &SiteManager,
    token: &str,
    host_name: &str,
    csr_pem: &str,
    version: &str,
) -> Result<ManagerMessage, String> {
    let Some((secret, ca_hash)) = token.rsplit_once('.') else {
        return Err("the registration token is malformed (expected SECRET.CA_SHA256)".into());
    };
    if ca_hash != sm.pki.ca_sha256() {
        return Err("the registration token was made by another site manager".into());
    }
    let key = sha256_hex(secret.as_bytes());
    let fail = |e: crate::store::StoreError| e.to_string();
    let Some(mut reg) = sm.with_store(|s| s.registrations.get(key.as_bytes())).map_err(fail)? else {
        return Err("the registration token is unknown".into());
    };
    if reg.used {
        return Err("the registration token was already used".into());
    }
    if reg.expires_ms < now_ms() {
        return Err("the registration token has expired".into());
    }
    let Some(mut host) = sm.with_store(|s| s.hosts.get(reg.host.as_bytes())).map_err(fail)? else {
        return Err(format!("host {} was removed", reg.host));
    };
    let cert = sm.pki.sign_vdsa(csr_pem, &host.id.0.to_string()).map_err(|e| e.to_string())?;
    reg.used = true;
    sm.with_store(|s| s.registrations.put(key.as_bytes(), &reg)).map_err(fail)?;
    // Installed once it reports (its first hello).
    host.vdsa = VdsaState::Registering;
    host.vdsa_reason = None;
    host.software_version = Some(version.to_string());
    sm.with_store(|s| s.hosts.put(host.id.as_bytes(), &host)).map_err(fail)?;
    tracing::info!(host = %host.id, name = %host.name, vdsa_name = %host_name, "VDSA registered");
    Ok(ManagerMessage::Registered { host: host.id, certificate_pem: cert, site_ca_pem: sm.pki.ca_pem().to_string() })
}

async fn session<R, W>(
    sm: Arc<SiteManager>,
    host: HostId,
    hold_limit_ms: u64,
    newest_checkpoint: CheckpointId,
    mut rd: R,
    mut wr: W,
) -> Result<(), FrameError>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (tx, mut rx) = mpsc::channel::<ManagerMessage>(256);
    let session = sm.links.attach(VdsaLink {
        host,
        tx,
        last_seen_ms: now_ms(),
        actual: ActualState::default(),
        hold_limit_ms,
        session: 0,
    });
    tracing::info!(%host, newest_checkpoint = %newest_checkpoint, "VDSA connected");
    sm.changed();
    let writer = tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            write_message(&mut wr, &m).await?;
        }
        Ok::<(), FrameError>(())
    });
    let result = loop {
        let m = match tokio::time::timeout(SESSION_IDLE_LIMIT, read_message(&mut rd)).await {
            Ok(Ok(m)) => m,
            Ok(Err(e)) => break Err(e),
            Err(_) => {
                break Err(FrameError::Io(std::io::Error::new(std::io::ErrorKind::TimedOut, "no report in time")))
            }
        };
        match m {
            VdsaMessage::Report { actual } => {
                sm.links.on_report(host, session, actual);
                sm.changed();
            }
            VdsaMessage::Prepared { .. }
            | VdsaMessage::PrepareFailed { .. }
            | VdsaMessage::Decided { .. }
            | VdsaMessage::Quiesced { .. } => sm.coordinator.on_answer(host, m),
            VdsaMessage::Logs { request, text, truncated } => sm.logs.on_answer(request, text, truncated),
            VdsaMessage::Refused { reason } => tracing::warn!(%host, %reason, "the VDSA refused a command"),
            other => tracing::warn!(%host, "unexpected message on a session: {other:?}"),
        }
    };
    sm.links.detach(host, session);
    sm.changed();
    writer.abort();
    tracing::info!(%host, "VDSA disconnected");
    result
}
