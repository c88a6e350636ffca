//! Pairing with the other site (admin), the paired site's view (viewer),
//! and the routes the paired site manager calls, authenticated by its
//! certificate rather than a token (docs/api.md "Pairing").

use super::extract::{ApiJson, Caller};
use super::{blocking, ApiError, ApiResult, AppState, ClientCertificate};
use crate::model::{
    ErrorBody, PairRequest, PairingAnswer, PairingOffer, PairingToken, Peer, PeerExchange, PeerHost, Vpg,
};
use crate::peering::{self, PeeringError};
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use protection_groups::SiteId;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(pairing_token))
        .routes(routes!(get_peer, pair, unpair))
        .routes(routes!(peer_vpgs))
        .routes(routes!(peer_hosts))
        .routes(routes!(pairing_offer))
        .routes(routes!(exchange))
        .routes(routes!(peer_unpaired))
}

impl From<PeeringError> for ApiError {
    fn from(e: PeeringError) -> Self {
        match e {
            PeeringError::BadRequest { field, message } => ApiError::bad(field, message),
            PeeringError::Refused(m) => ApiError::Forbidden(m),
            PeeringError::Conflict(m) => ApiError::Conflict(m),
            PeeringError::NotPaired => ApiError::NotFound(e.to_string()),
            PeeringError::Unreachable(m) => ApiError::Upstream(m),
            PeeringError::Store(e) => e.into(),
            PeeringError::Tls(e) => ApiError::Internal(e.to_string()),
        }
    }
}

/// Makes a one-time site pairing token for the other site's admin.
#[utoipa::path(post, path = "/api/v1/site/pairing-tokens", tag = "pairing",
    responses((status = 201, body = PairingToken), (status = 403, body = ErrorBody)))]
async fn pairing_token(State(sm): State<AppState>, caller: Caller) -> ApiResult<(StatusCode, Json<PairingToken>)> {
    caller.require(crate::model::Role::Admin)?;
    blocking(move || Ok((StatusCode::CREATED, Json(peering::create_pairing_token(&sm)?)))).await
}

/// The paired site.
#[utoipa::path(get, path = "/api/v1/site/peer", tag = "pairing",
    responses((status = 200, body = Peer), (status = 404, body = ErrorBody)))]
async fn get_peer(State(sm): State<AppState>, _caller: Caller) -> ApiResult<Json<Peer>> {
    blocking(move || Ok(Json(sm.stored_peer()?.ok_or(PeeringError::NotPaired)?.peer))).await
}

/// Pairs with the site whose API is at `address`, using its token.
#[utoipa::path(post, path = "/api/v1/site/peer", tag = "pairing", request_body = PairRequest,
    responses((status = 201, body = Peer), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 502, body = ErrorBody)))]
async fn pair(
    State(sm): State<AppState>,
    caller: Caller,
    ApiJson(req): ApiJson<PairRequest>,
) -> ApiResult<(StatusCode, Json<Peer>)> {
    caller.require(crate::model::Role::Admin)?;
    Ok((StatusCode::CREATED, Json(peering::pair(sm, req).await?)))
}

/// Unpairs (refused while a VPG spans the sites). The other site is told;
/// if it cannot be reached it is unpaired here all the same, and
/// `X-Peer-Not-Told` says why it was not told.
#[utoipa::path(delete, path = "/api/v1/site/peer", tag = "pairing",
    responses((status = 200, body = Peer), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn unpair(State(sm): State<AppState>, caller: Caller) -> ApiResult<axum::response::Response> {
    use axum::response::IntoResponse;
    caller.require(crate::model::Role::Admin)?;
    let (peer, unheard) = peering::unpair(sm).await?;
    let mut r = Json(peer).into_response();
    if let Some(why) = unheard.and_then(|w| axum::http::HeaderValue::from_str(&w.replace(['\r', '\n'], " ")).ok()) {
        r.headers_mut().insert("x-peer-not-told", why);
    }
    Ok(r)
}

/// The copies of the paired site's VPGs that recover to this site.
#[utoipa::path(get, path = "/api/v1/site/peer/vpgs", tag = "pairing", responses((status = 200, body = Vec<Vpg>)))]
async fn peer_vpgs(State(sm): State<AppState>, _caller: Caller) -> ApiResult<Json<Vec<Vpg>>> {
    blocking(move || {
        let mut v = sm.with_store(|s| s.peer_vpgs.list())?;
        v.sort_by(|a, b| a.settings.name.cmp(&b.settings.name));
        Ok(Json(v))
    })
    .await
}

/// The paired site's hosts, as its last exchange named them: where a VPG
/// defined here may recover to.
#[utoipa::path(get, path = "/api/v1/site/peer/hosts", tag = "pairing", responses((status = 200, body = Vec<PeerHost>)))]
async fn peer_hosts(State(sm): State<AppState>, _caller: Caller) -> Json<Vec<PeerHost>> {
    let mut hosts = sm.peering.hosts();
    hosts.sort_by(|a, b| a.name.cmp(&b.name));
    Json(hosts)
}

/// Called by a site manager that pairs with this one: the secret of this
/// site's pairing token proves it (no bearer token).
#[utoipa::path(post, path = "/api/v1/pairing", tag = "pairing", request_body = PairingOffer, security(()),
    responses((status = 200, body = PairingAnswer), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 409, body = ErrorBody)))]
async fn pairing_offer(
    State(sm): State<AppState>,
    ApiJson(offer): ApiJson<PairingOffer>,
) -> ApiResult<Json<PairingAnswer>> {
    blocking(move || Ok(Json(peering::accept_offer(&sm, offer)?))).await
}

/// The caller is the paired site manager, by its certificate (checked
/// before the body is read).
struct PairedSite;

impl axum::extract::FromRequestParts<AppState> for PairedSite {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, sm: &AppState) -> ApiResult<PairedSite> {
        match parts.extensions.get::<ClientCertificate>().and_then(|c| c.0.as_ref()) {
            Some(c) if peering::is_peer_certificate(sm, c) => Ok(PairedSite),
            Some(_) => Err(ApiError::Forbidden("the client certificate is not the paired site's".into())),
            None => {
                Err(ApiError::Unauthorized("only the paired site manager may call this, with its certificate".into()))
            }
        }
    }
}

/// The site-to-site exchange: the caller's half in, this site's half out.
#[utoipa::path(post, path = "/api/v1/peer/exchange", tag = "pairing", request_body = PeerExchange, security(()),
    responses((status = 200, body = PeerExchange), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
async fn exchange(
    State(sm): State<AppState>,
    _peer: PairedSite,
    ApiJson(theirs): ApiJson<PeerExchange>,
) -> ApiResult<Json<PeerExchange>> {
    blocking(move || {
        peering::take_exchange(&sm, theirs)?;
        Ok(Json(peering::own_exchange(&sm)?))
    })
    .await
}

/// The paired site unpaired: this site forgets it too.
#[utoipa::path(post, path = "/api/v1/peer/unpair", tag = "pairing", request_body = SiteId, security(()),
    responses((status = 200, body = SiteId), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
async fn peer_unpaired(
    State(sm): State<AppState>,
    _peer: PairedSite,
    ApiJson(from): ApiJson<SiteId>,
) -> ApiResult<Json<SiteId>> {
    blocking(move || {
        peering::peer_unpaired(&sm, from)?;
        Ok(Json(from))
    })
    .await
}
