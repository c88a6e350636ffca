//! `site-manager serve`: opens the store, takes a new manager generation,
//! serves the API over HTTPS and the management link over TLS, and runs
//! the reconciler until Ctrl-C or SIGTERM.

use crate::model::{Role, Site};
use crate::pki::SitePki;
use crate::state::{ServeConfig, SiteManager};
use crate::store::Store;
use anyhow::{Context, Result};
use hyper_util::rt::{TokioExecutor, TokioIo};
use protection_groups::SiteId;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

/// A TLS handshake that takes longer is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Loads or creates everything `serve` needs, without listening yet.
pub fn open(config: ServeConfig, site_name: &str) -> Result<Arc<SiteManager>> {
    std::fs::create_dir_all(&config.data).with_context(|| format!("creating {}", config.data.display()))?;
    let (store, fresh) = Store::open(&config.data).with_context(|| {
        format!("opening the store in {} (is another site manager running on it?)", config.data.display())
    })?;
    let stored_site = store.site.get(b"site")?;
    let name = stored_site.as_ref().map_or(site_name.to_string(), |s| s.name.clone());
    let names = [config.api_listen.ip().to_string(), config.management_listen.ip().to_string()];
    let pki = SitePki::load_or_create(&config.data, &name, &names)?;
    let mut site = stored_site.unwrap_or_else(|| Site {
        id: SiteId::new(),
        name: name.clone(),
        location: String::new(),
        contact: String::new(),
        address: String::new(),
        api_port: 0,
        management_port: 0,
        replication_port: 4700,
        ca_sha256: String::new(),
        generation: 0,
    });
    site.api_port = config.api_listen.port();
    site.management_port = config.management_listen.port();
    site.ca_sha256 = pki.ca_sha256();
    site.generation = store.generation();
    store.site.put(b"site", &site)?;
    let unsafe_no_barrier = config.unsafe_no_barrier;
    let fault = config.fault_kill_after_prepare;
    let barrier = crate::barrier_thread::BarrierThread::start().context("starting the barrier thread")?;
    let sm = Arc::new(SiteManager::new(store, pki, config, barrier));
    if unsafe_no_barrier {
        tracing::warn!("control run: checkpoints are taken without the barrier; write order is not kept");
        sm.coordinator.unsafe_no_barrier.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    sm.coordinator.fault_kill_after_prepare.store(fault, std::sync::atomic::Ordering::SeqCst);
    if fresh || sm.with_store(|s| Ok(s.tokens.is_empty()))? {
        write_admin_token(&sm, &sm.config.data)?;
    }
    crate::peering::load(&sm)?;
    let (aborted, resumed) = sm.take_back_tasks()?;
    tracing::info!(
        generation = sm.generation(),
        site = %site.id,
        aborted_tasks = aborted,
        resumed_tasks = resumed,
        "site manager store open"
    );
    Ok(sm)
}

fn write_admin_token(sm: &SiteManager, dir: &Path) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let created = sm.create_token("admin", Role::Admin)?;
    let path = dir.join("admin-token");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("writing {}", path.display()))?;
    writeln!(f, "{}", created.secret)?;
    f.sync_all()?;
    println!("wrote the admin token to {} (mode 0600)", path.display());
    Ok(())
}

/// Runs the daemon until Ctrl-C or SIGTERM.
pub async fn serve(config: ServeConfig, site_name: &str) -> Result<()> {
    // The addresses are taken before anything is created: a site manager
    // that cannot have them changes nothing.
    let api =
        TcpListener::bind(config.api_listen).await.with_context(|| format!("listening on {}", config.api_listen))?;
    let mgmt = TcpListener::bind(config.management_listen)
        .await
        .with_context(|| format!("listening on {}", config.management_listen))?;
    let mut config = config;
    config.api_listen = api.local_addr()?;
    config.management_listen = mgmt.local_addr()?;
    let name = site_name.to_string();
    let sm = tokio::task::spawn_blocking(move || open(config, &name)).await??;
    println!(
        "site manager: API https://{} , VDSAs dial {} , generation {}",
        sm.config.api_listen,
        sm.config.management_listen,
        sm.generation()
    );
    let app = crate::api::router(sm.clone()).merge(crate::console::router());
    let tls = tokio_rustls::TlsAcceptor::from(sm.pki.api_server_config(sm.peering.verifier.clone())?);
    let api_task = tokio::spawn(serve_api(api, tls, app));
    // The management links run on the barrier thread (its own runtime:
    // the listener moves there).
    let mgmt = mgmt.into_std()?;
    let sm_mgmt = sm.clone();
    let mgmt_task = sm.barrier.spawn(async move {
        match TcpListener::from_std(mgmt) {
            Ok(l) => crate::mgmt::serve(sm_mgmt, l).await,
            Err(e) => tracing::error!(error = %e, "cannot take over the management listener"),
        }
    });
    let reconciler = tokio::spawn(crate::reconcile::run(sm.clone()));
    let peering = tokio::spawn(crate::peering::run(sm.clone()));
    let alerts = tokio::spawn(crate::alerts::run(sm.clone()));
    tokio::spawn(crate::metrics::run_sampler(sm.clone()));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupted"),
        _ = term.recv() => tracing::info!("terminated"),
        r = api_task => tracing::error!("the API server stopped: {r:?}"),
        r = mgmt_task => tracing::error!("the management server stopped: {r:?}"),
        r = reconciler => tracing::error!("the reconciler stopped: {r:?}"),
        r = peering => tracing::error!("the exchange with the paired site stopped: {r:?}"),
        r = alerts => tracing::error!("the alert evaluation stopped: {r:?}"),
    }
    let sm2 = sm.clone();
    tokio::task::spawn_blocking(move || sm2.with_store(|s| s.flush())).await??;
    println!("site manager stopped");
    Ok(())
}

async fn serve_api(listener: TcpListener, tls: tokio_rustls::TlsAcceptor, app: axum::Router) {
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "API accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // Without it, a large answer's last segment waits for the client's
        // delayed ACK (40 ms).
        let _ = tcp.set_nodelay(true);
        let (tls, app) = (tls.clone(), app.clone());
        tokio::spawn(async move {
            let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return tracing::debug!(%peer, error = %e, "API TLS handshake failed"),
                Err(_) => return tracing::debug!(%peer, "API TLS handshake timed out"),
            };
            // The paired site manager identifies by its certificate; the
            // handshake checked it, the peer routes check it again.
            let cert = stream.get_ref().1.peer_certificates().and_then(|c| c.first()).map(|c| c.clone().into_owned());
            let app = app.layer(axum::Extension(crate::api::ClientCertificate(cert)));
            let svc = hyper_util::service::TowerToHyperService::new(app);
            if let Err(e) = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await
            {
                tracing::debug!(%peer, error = %e, "API connection ended");
            }
        });
    }
}
