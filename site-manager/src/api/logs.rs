//! The log collector service (admin: logs can hold addresses and names).

use super::extract::{ApiJson, ApiPath, Caller};
use super::{blocking, ApiError, ApiResult, AppState};
use crate::logs::{BundleError, LogBundleRequest};
use crate::model::{ErrorBody, Role, Task};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(collect)).routes(routes!(download))
}

/// Starts a bundle of this site manager's and its VDSAs' logs; answers at
/// once with its task (the task's id names the bundle).
#[utoipa::path(post, path = "/api/v1/logs/bundles", tag = "logs", request_body = LogBundleRequest,
    responses((status = 202, body = Task), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody)))]
async fn collect(
    State(sm): State<AppState>,
    caller: Caller,
    ApiJson(req): ApiJson<LogBundleRequest>,
) -> ApiResult<(StatusCode, Json<Task>)> {
    caller.require(Role::Admin)?;
    let task = crate::logs::start_bundle(&sm, req).map_err(|e| match e {
        BundleError::Range { .. } => ApiError::bad("since_ms", e.to_string()),
        BundleError::Store(e) => e.into(),
    })?;
    Ok((StatusCode::ACCEPTED, Json(task)))
}

/// A finished bundle, as application/gzip (a tar.gz).
#[utoipa::path(get, path = "/api/v1/logs/bundles/{id}", tag = "logs", params(("id" = Uuid, Path)),
    responses((status = 200, content_type = "application/gzip"), (status = 404, body = ErrorBody)))]
async fn download(
    State(sm): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult<axum::response::Response> {
    caller.require(Role::Admin)?;
    let bytes = blocking(move || match std::fs::read(crate::logs::bundle_path(&sm, id)) {
        Ok(b) => Ok(b),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(ApiError::NotFound(format!("no log bundle {id} (is its task finished?)")))
        }
        Err(e) => Err(ApiError::Internal(format!("reading log bundle {id}: {e}"))),
    })
    .await?;
    let disposition = format!("attachment; filename=\"logs-{id}.tar.gz\"");
    Ok((
        [
            (axum::http::header::CONTENT_TYPE, "application/gzip".to_string()),
            (axum::http::header::CONTENT_DISPOSITION, disposition),
        ],
        bytes,
    )
        .into_response())
}
