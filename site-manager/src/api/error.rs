//! Errors of the API, grouped by what the caller does about them; each is
//! one status code and an [`ErrorBody`] naming the problem.

use crate::model::ErrorBody;
use crate::store::StoreError;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Fix the request: `field` names what is wrong, when one field is.
    #[error("{message}")]
    BadRequest { field: Option<String>, message: String },
    /// Send a valid token.
    #[error("{0}")]
    Unauthorized(String),
    /// Use a token with a role that may do this.
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    /// The resource's state does not allow this now.
    #[error("{0}")]
    Conflict(String),
    /// Another party (the paired site) failed or could not be reached:
    /// try again.
    #[error("{0}")]
    Upstream(String),
    /// The site manager failed; the message says where.
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    pub fn bad(field: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError::BadRequest { field: Some(field.into()), message: message.into() }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Upstream(_) => StatusCode::BAD_GATEWAY,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn word(&self) -> &'static str {
        match self {
            ApiError::BadRequest { .. } => "bad_request",
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::NotFound(_) => "not_found",
            ApiError::Conflict(_) => "conflict",
            ApiError::Upstream(_) => "bad_gateway",
            ApiError::Internal(_) => "internal",
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let ApiError::Internal(m) = &self {
            tracing::error!(error = %m, "API request failed");
        }
        let field = match &self {
            ApiError::BadRequest { field, .. } => field.clone(),
            _ => None,
        };
        let body = ErrorBody { error: self.word().to_string(), field, message: self.to_string() };
        let mut r = (self.status(), Json(body)).into_response();
        if matches!(self, ApiError::Unauthorized(_)) {
            if let Ok(v) = axum::http::HeaderValue::from_str("Bearer") {
                r.headers_mut().insert(axum::http::header::WWW_AUTHENTICATE, v);
            }
        }
        r
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        ApiError::Internal(e.to_string())
    }
}

impl From<protection_groups::InvalidSetting> for ApiError {
    fn from(e: protection_groups::InvalidSetting) -> Self {
        ApiError::BadRequest { field: Some(e.field.clone()), message: e.to_string() }
    }
}

impl From<protection_groups::IllegalTransition> for ApiError {
    fn from(e: protection_groups::IllegalTransition) -> Self {
        ApiError::Conflict(e.to_string())
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
