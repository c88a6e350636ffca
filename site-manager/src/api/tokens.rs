//! API tokens: created and revoked by admins.

use super::extract::{ApiJson, ApiPath, Caller};
use super::{blocking, ApiError, ApiResult, AppState};
use crate::model::{now_ms, CreatedToken, ErrorBody, NewToken, Role, Token};
use crate::store::uuid_key;
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_tokens, create_token))
        .routes(routes!(revoke_token))
        .routes(routes!(session))
}

/// Every token (secrets are never shown again).
#[utoipa::path(get, path = "/api/v1/tokens", tag = "site",
    responses((status = 200, body = Vec<Token>), (status = 403, body = ErrorBody)))]
async fn list_tokens(State(sm): State<AppState>, caller: Caller) -> ApiResult<Json<Vec<Token>>> {
    caller.require(Role::Admin)?;
    blocking(move || {
        let mut all: Vec<Token> = sm.with_store(|s| s.tokens.list())?.into_iter().map(|t| t.token).collect();
        all.sort_by_key(|t| t.created_ms);
        Ok(Json(all))
    })
    .await
}

/// The caller's own token: its name and role, so that a client (the
/// console) offers only what the role may do.
#[utoipa::path(get, path = "/api/v1/session", tag = "site",
    responses((status = 200, body = Token), (status = 401, body = ErrorBody)))]
async fn session(caller: Caller) -> Json<Token> {
    Json(caller.token)
}

/// A new token with a role; its secret is in this answer only.
#[utoipa::path(post, path = "/api/v1/tokens", tag = "site", request_body = NewToken,
    responses((status = 201, body = CreatedToken), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody)))]
async fn create_token(
    State(sm): State<AppState>,
    caller: Caller,
    ApiJson(req): ApiJson<NewToken>,
) -> ApiResult<(StatusCode, Json<CreatedToken>)> {
    caller.require(Role::Admin)?;
    if req.name.trim().is_empty() || req.name.len() > 128 || req.name.chars().any(char::is_control) {
        return Err(ApiError::bad("name", "name: 1 to 128 printable characters"));
    }
    blocking(move || Ok((StatusCode::CREATED, Json(sm.create_token(&req.name, req.role)?)))).await
}

/// Revokes a token: it is refused from now on.
#[utoipa::path(delete, path = "/api/v1/tokens/{id}", tag = "site", params(("id" = Uuid, Path)),
    responses((status = 204), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn revoke_token(State(sm): State<AppState>, caller: Caller, ApiPath(id): ApiPath<Uuid>) -> ApiResult<StatusCode> {
    caller.require(Role::Admin)?;
    blocking(move || {
        let key = uuid_key(&id);
        let mut t =
            sm.with_store(|s| s.tokens.get(&key))?.ok_or_else(|| ApiError::NotFound(format!("no token {id}")))?;
        if t.token.revoked_ms.is_some() {
            return Err(ApiError::Conflict(format!("token {id} is already revoked")));
        }
        t.token.revoked_ms = Some(now_ms());
        sm.with_store(|s| s.tokens.put(&key, &t))?;
        Ok(StatusCode::NO_CONTENT)
    })
    .await
}
