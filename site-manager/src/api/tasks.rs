//! The command tracker: every long operation is a task.

use super::extract::{ApiPath, ApiQuery, Caller};
use super::{blocking, ApiError, ApiResult, AppState};
use crate::model::{ErrorBody, Task};
use crate::store::uuid_key;
use axum::extract::State;
use axum::Json;
use serde::Deserialize;
use std::time::{Duration, Instant};
use utoipa::IntoParams;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(list_tasks)).routes(routes!(get_task)).routes(routes!(wait_task))
}

/// Every task, newest first.
#[utoipa::path(get, path = "/api/v1/tasks", tag = "tasks", responses((status = 200, body = Vec<Task>)))]
async fn list_tasks(State(sm): State<AppState>, _caller: Caller) -> ApiResult<Json<Vec<Task>>> {
    blocking(move || {
        let mut all = sm.with_store(|s| s.tasks.list())?;
        all.sort_by_key(|t| std::cmp::Reverse(t.started_ms));
        Ok(Json(all))
    })
    .await
}

fn task(sm: &AppState, id: Uuid) -> ApiResult<Task> {
    sm.with_store(|s| s.tasks.get(&uuid_key(&id)))?.ok_or_else(|| ApiError::NotFound(format!("no task {id}")))
}

/// One task.
#[utoipa::path(get, path = "/api/v1/tasks/{id}", tag = "tasks", params(("id" = Uuid, Path)),
    responses((status = 200, body = Task), (status = 404, body = ErrorBody)))]
async fn get_task(State(sm): State<AppState>, _caller: Caller, ApiPath(id): ApiPath<Uuid>) -> ApiResult<Json<Task>> {
    blocking(move || Ok(Json(task(&sm, id)?))).await
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct WaitQuery {
    /// How long to wait at most (default 30000, at most 600000).
    pub timeout_ms: Option<u64>,
}

/// Waits until the task ends or the timeout passes, then returns it as it
/// is (check `status`).
#[utoipa::path(get, path = "/api/v1/tasks/{id}/wait", tag = "tasks", params(("id" = Uuid, Path), WaitQuery),
    responses((status = 200, body = Task), (status = 404, body = ErrorBody)))]
async fn wait_task(
    State(sm): State<AppState>,
    _caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
    ApiQuery(q): ApiQuery<WaitQuery>,
) -> ApiResult<Json<Task>> {
    let deadline = Instant::now() + Duration::from_millis(q.timeout_ms.unwrap_or(30_000).min(600_000));
    loop {
        let sm2 = sm.clone();
        let t = blocking(move || task(&sm2, id)).await?;
        if t.is_finished() || Instant::now() >= deadline {
            return Ok(Json(t));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
