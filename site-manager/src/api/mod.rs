//! The REST API (docs/api.md): JSON over HTTPS, bearer tokens with roles,
//! every change audited, long operations returned as tasks. Routes and the
//! OpenAPI document at `/openapi.json` come from the same annotations, so
//! they cannot drift apart.

mod alerts;
mod error;
mod extract;
mod failover;
mod failover_tests;
mod hosts;
mod logs;
mod metrics;
mod migration;
mod peering;
mod reverse;
mod site;
mod tasks;
mod tokens;
mod vpgs;

pub use error::{ApiError, ApiResult};
pub use extract::{parse_json, ApiJson, Authenticated, Caller};

use crate::state::SiteManager;
use axum::extract::{Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::sync::Arc;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;

pub type AppState = Arc<SiteManager>;

/// The client certificate the connection's TLS handshake checked (only
/// the paired site manager presents one).
#[derive(Debug, Clone, Default)]
pub struct ClientCertificate(pub Option<rustls::pki_types::CertificateDer<'static>>);

#[derive(OpenApi)]
#[openapi(
    info(title = "Site manager API", description = "The control plane of one site: site, hosts, protection groups, command tracker, log collector."),
    modifiers(&BearerAuth),
    security(("bearer" = [])),
    tags(
        (name = "site", description = "This site, its tokens and audit log"),
        (name = "hosts", description = "Hypervisor hosts and their VDSAs"),
        (name = "vpgs", description = "Virtual protection groups"),
        (name = "tasks", description = "The command tracker"),
        (name = "logs", description = "The log collector"),
        (name = "pairing", description = "Pairing with the other site, and the calls between paired site managers"),
    )
)]
struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The documented routes and their OpenAPI document.
fn documented() -> (axum::Router<AppState>, utoipa::openapi::OpenApi) {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(site::routes())
        .merge(tokens::routes())
        .merge(hosts::routes())
        .merge(vpgs::routes())
        .merge(failover_tests::routes())
        .merge(failover::routes())
        .merge(migration::routes())
        .merge(reverse::routes())
        .merge(tasks::routes())
        .merge(peering::routes())
        .merge(logs::routes())
        .merge(metrics::routes())
        .merge(alerts::routes())
        .split_for_parts()
}

/// The OpenAPI document, as `/openapi.json` serves it.
pub fn openapi() -> utoipa::openapi::OpenApi {
    documented().1
}

/// The whole API: documented routes behind the auth and audit layer, and
/// the document itself (readable without a token).
pub fn router(state: AppState) -> axum::Router {
    let (routes, doc) = documented();
    let doc = Arc::new(doc);
    routes
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), authenticate))
        .route("/openapi.json", axum::routing::get(move || async move { axum::Json(doc.as_ref().clone()) }))
        .with_state(state)
}

/// Looks up the bearer token and attaches what it found for the
/// [`Caller`] extractor; records every change and every refusal in the
/// audit log.
async fn authenticate(State(sm): State<AppState>, mut req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let secret = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|s| s.trim().to_string());
    let found = match secret {
        None => Err("send a token: Authorization: Bearer <token>".to_string()),
        Some(secret) => {
            let sm = sm.clone();
            match tokio::task::spawn_blocking(move || sm.authenticate(&secret)).await {
                Ok(Ok(Some(t))) => Ok(t),
                Ok(Ok(None)) => Err("the token is unknown or revoked".to_string()),
                Ok(Err(e)) => return ApiError::from(e).into_response(),
                Err(e) => return ApiError::Internal(e.to_string()).into_response(),
            }
        }
    };
    let from_peer = req.extensions().get::<ClientCertificate>().is_some_and(|c| c.0.is_some());
    let who = match &found {
        Ok(t) => (t.name.clone(), Some(t.id)),
        Err(_) if from_peer => ("(the paired site manager)".to_string(), None),
        Err(_) if path == "/api/v1/pairing" => ("(a site pairing with this one)".to_string(), None),
        Err(_) => ("(no valid token)".to_string(), None),
    };
    req.extensions_mut().insert(Authenticated(found));
    let response = next.run(req).await;
    let status = response.status().as_u16();
    // The exchange runs every second and changes nothing an operator did:
    // only its refusals are recorded.
    let routine = path == "/api/v1/peer/exchange" && response.status().is_success();
    if (method != Method::GET || status == 401 || status == 403) && !routine {
        let m = method.to_string();
        let _ = tokio::task::spawn_blocking(move || sm.audit(&who.0, who.1, &m, &path, status)).await;
    }
    response
}

/// Runs blocking store work off the async threads.
pub async fn blocking<T: Send + 'static>(f: impl FnOnce() -> ApiResult<T> + Send + 'static) -> ApiResult<T> {
    tokio::task::spawn_blocking(f).await.map_err(|e| ApiError::Internal(format!("worker failed: {e}")))?
}
