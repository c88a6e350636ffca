//! Measurements: a VPG's stats, and the Prometheus exposition of every
//! VPG, host and the site link (`crate::metrics` computes both).

use super::extract::{ApiJson, ApiPath, ApiQuery, Caller};
use super::failover_tests::find_vpg;
use super::{blocking, ApiError, ApiResult, AppState};
use crate::model::ErrorBody;
use crate::model::VpgStats;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::Json;
use protection_groups::VpgId;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(vpg_stats))
        .routes(routes!(metrics))
        .routes(routes!(sizing))
        .routes(routes!(health_report))
        .routes(routes!(encryption_signal))
}

/// A protected VPG's encryption signal: its alert while it holds, its
/// baseline share of encrypting rewrites and the newest interval's
/// (docs/architecture.md, "The encryption signal"). Zeros before the first
/// interval was taken in.
#[utoipa::path(get, path = "/api/v1/vpgs/{id}/encryption", tag = "metrics", params(("id" = Uuid, Path)),
    responses((status = 200, body = crate::encryption::EncryptionSignal), (status = 404, body = ErrorBody)))]
async fn encryption_signal(
    State(sm): State<AppState>,
    _caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult<Json<crate::encryption::EncryptionSignal>> {
    blocking(move || {
        let v = find_vpg(&sm, id)?;
        Ok(Json(sm.encryption.signal(v.id).unwrap_or_default()))
    })
    .await
}

/// A VPG's RPO, bytes written, sent and journalled, and test counts (a
/// VPG defined here or recovering here).
#[utoipa::path(get, path = "/api/v1/vpgs/{id}/stats", tag = "metrics", params(("id" = Uuid, Path)),
    responses((status = 200, body = VpgStats), (status = 404, body = ErrorBody)))]
async fn vpg_stats(
    State(sm): State<AppState>,
    _caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult<Json<VpgStats>> {
    blocking(move || {
        let v = find_vpg(&sm, id)?;
        let src = crate::metrics::StatsSources::read(&sm)?;
        Ok(Json(crate::metrics::vpg_stats(&sm, &src, &v)?))
    })
    .await
}

/// Prometheus metrics (text exposition format 0.0.4); scrape with a
/// viewer token as the bearer.
#[utoipa::path(get, path = "/metrics", tag = "metrics",
    responses((status = 200, content_type = "text/plain; version=0.0.4", body = String)))]
async fn metrics(State(sm): State<AppState>, _caller: Caller) -> ApiResult<impl IntoResponse> {
    let text = blocking(move || Ok(crate::metrics::render(&sm)?)).await?;
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text))
}

/// The sizing analyzer: the bandwidth a target RPO needs and the journal a
/// target history needs, from a typed change rate or the one the taps
/// observed for `vpg` (over the last hour).
#[utoipa::path(post, path = "/api/v1/sizing", tag = "metrics", request_body = crate::sizing::SizingRequest,
    responses((status = 200, body = crate::sizing::SizingAnswer), (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody)))]
async fn sizing(
    State(sm): State<AppState>,
    _caller: Caller,
    ApiJson(req): ApiJson<crate::sizing::SizingRequest>,
) -> ApiResult<Json<crate::sizing::SizingAnswer>> {
    blocking(move || {
        let observed = match req.vpg {
            Some(id) => {
                find_vpg(&sm, id.0)?;
                sm.rates.observed(id, req.rpo_secs.max(10))
            }
            None => None,
        };
        crate::sizing::size(&req, observed).map(Json).map_err(|e| ApiError::bad("sizing", e))
    })
    .await
}

#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
struct HealthQuery {
    /// `json` (the default) or `csv`.
    format: Option<String>,
}

/// A VPG's health report: one row per UTC day (data changed as written and
/// as sent, worst RPO, time over the threshold, consistent points, history
/// available against the policy), as JSON or CSV.
#[utoipa::path(get, path = "/api/v1/vpgs/{id}/health", tag = "metrics", params(("id" = Uuid, Path), HealthQuery),
    responses((status = 200, body = Vec<crate::model::HealthDay>), (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody)))]
async fn health_report(
    State(sm): State<AppState>,
    _caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
    ApiQuery(q): ApiQuery<HealthQuery>,
) -> ApiResult<axum::response::Response> {
    let csv = match q.format.as_deref() {
        None | Some("json") => false,
        Some("csv") => true,
        Some(other) => return Err(ApiError::bad("format", format!("format: {other:?} is not json or csv"))),
    };
    blocking(move || {
        find_vpg(&sm, id)?;
        let days = sm.with_store(|s| crate::health::report(s, VpgId(id)))?;
        Ok(if csv {
            ([(header::CONTENT_TYPE, "text/csv; charset=utf-8")], crate::health::csv(&days)).into_response()
        } else {
            Json(days).into_response()
        })
    })
    .await
}
