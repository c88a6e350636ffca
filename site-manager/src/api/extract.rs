//! Request extractors whose rejections are [`ApiError`]s naming the field
//! at fault, and the caller's identity that the auth layer attaches.

use super::error::ApiError;
use crate::model::{Role, Token};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

/// A JSON body. A wrong type names the field's path
/// (`settings.vms[0].disks`); a missing field names the field.
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

/// Bodies larger than this are refused.
const BODY_LIMIT: usize = 1 << 20;

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let json =
            req.headers().get(axum::http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|v| {
                v.split(';').next().is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
            });
        if !json {
            return Err(ApiError::BadRequest {
                field: None,
                message: "the body must be JSON, sent with Content-Type: application/json".into(),
            });
        }
        let bytes = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(|e| ApiError::BadRequest { field: None, message: format!("cannot read the body: {e}") })?;
        if bytes.len() > BODY_LIMIT {
            return Err(ApiError::BadRequest { field: None, message: format!("the body is over {BODY_LIMIT} bytes") });
        }
        parse_json(&bytes).map(ApiJson)
    }
}

/// Deserializes `bytes`, naming the field at fault on error.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let msg = inner.to_string();
        // serde names a missing field in its message, at the path of the
        // object that lacks it; an unknown field's path already ends in it.
        let missing = msg.split('`').nth(1).filter(|_| msg.starts_with("missing field"));
        let unknown = msg.split('`').nth(1).filter(|_| msg.starts_with("unknown field"));
        let field = match (path.as_str(), missing.or(unknown)) {
            (".", Some(f)) => Some(f.to_string()),
            (".", None) => None,
            (p, Some(f)) if missing.is_some() => Some(format!("{p}.{f}")),
            (p, _) => Some(p.to_string()),
        };
        let message = match &field {
            Some(f) => format!("{f}: {msg}"),
            None => format!("the body is not valid JSON for this request: {msg}"),
        };
        ApiError::BadRequest { field, message }
    })
}

/// Query parameters, with rejections naming the problem.
#[derive(Debug)]
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        axum::extract::Query::<T>::try_from_uri(&parts.uri)
            .map(|q| ApiQuery(q.0))
            .map_err(|e| ApiError::BadRequest { field: None, message: format!("query: {}", e.body_text()) })
    }
}

/// Path parameters; a malformed id is a 400 naming it.
#[derive(Debug)]
pub struct ApiPath<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|p| ApiPath(p.0))
            .map_err(|e| ApiError::BadRequest { field: Some("path".into()), message: e.body_text() })
    }
}

/// What the auth layer found: the token, or why there is none. A handler
/// that takes a [`Caller`] refuses with 401 in the second case; a request
/// no handler takes (404, 405) is answered before that.
#[derive(Debug, Clone)]
pub struct Authenticated(pub Result<Token, String>);

/// Who sent the request: the token the auth layer accepted.
#[derive(Debug, Clone)]
pub struct Caller {
    pub token: Token,
}

impl Caller {
    /// Refuses unless the caller's role is at least `role`.
    pub fn require(&self, role: Role) -> Result<(), ApiError> {
        if self.token.role >= role {
            Ok(())
        } else {
            Err(ApiError::Forbidden(format!(
                "token {:?} has role {:?}; this needs {:?}",
                self.token.name, self.token.role, role
            )))
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        match parts.extensions.get::<Authenticated>() {
            Some(Authenticated(Ok(token))) => Ok(Caller { token: token.clone() }),
            Some(Authenticated(Err(why))) => Err(ApiError::Unauthorized(why.clone())),
            None => Err(ApiError::Unauthorized("no token".into())),
        }
    }
}
