//! Alerts: the active and recently cleared ones, and where they are sent
//! (`crate::alerts` evaluates them).

use super::extract::{ApiJson, Caller};
use super::{blocking, ApiError, ApiResult, AppState};
use crate::alerts::SETTINGS_KEY;
use crate::model::{Alert, AlertSettings};
use crate::model::{ErrorBody, Role};
use axum::extract::State;
use axum::Json;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(list_alerts)).routes(routes!(get_settings, put_settings))
}

/// Active alerts (newest first), then the recently cleared ones.
#[utoipa::path(get, path = "/api/v1/alerts", tag = "alerts", responses((status = 200, body = Vec<Alert>)))]
async fn list_alerts(State(sm): State<AppState>, _caller: Caller) -> ApiResult<Json<Vec<Alert>>> {
    Ok(Json(sm.alerts.list()))
}

/// Where alerts are posted, and the failover test time limit.
#[utoipa::path(get, path = "/api/v1/site/alerts", tag = "alerts", responses((status = 200, body = AlertSettings)))]
async fn get_settings(State(sm): State<AppState>, _caller: Caller) -> ApiResult<Json<AlertSettings>> {
    blocking(move || Ok(Json(sm.with_store(|s| s.alert_settings.get(SETTINGS_KEY))?.unwrap_or_default()))).await
}

/// Sets where alerts are posted (an http or https URL, or empty) and the
/// failover test time limit.
#[utoipa::path(put, path = "/api/v1/site/alerts", tag = "alerts", request_body = AlertSettings,
    responses((status = 200, body = AlertSettings), (status = 400, body = ErrorBody)))]
async fn put_settings(
    State(sm): State<AppState>,
    caller: Caller,
    ApiJson(settings): ApiJson<AlertSettings>,
) -> ApiResult<Json<AlertSettings>> {
    caller.require(Role::Admin)?;
    let url = settings.webhook_url.trim();
    if !url.is_empty() {
        let ok = reqwest::Url::parse(url).is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some());
        if !ok {
            return Err(ApiError::bad("webhook_url", format!("webhook_url: {url:?} is not an http or https URL")));
        }
    }
    if settings.test_running_limit_secs == 0 {
        return Err(ApiError::bad("test_running_limit_secs", "test_running_limit_secs: must be at least 1"));
    }
    blocking(move || {
        sm.with_store(|s| {
            s.alert_settings.put(SETTINGS_KEY, &settings)?;
            s.flush()
        })?;
        Ok(Json(settings))
    })
    .await
}
