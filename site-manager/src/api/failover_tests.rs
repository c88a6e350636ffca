//! Failover tests: several at once, each at its own checkpoint, served by
//! this site's recovery VDSAs as processing stacks (docs/recovery.md);
//! stopped with a verdict and kept as records.

use super::extract::{ApiJson, ApiPath, ApiQuery, Caller};
use super::{blocking, ApiError, ApiResult, AppState};
use crate::model::{
    Discarded, ErrorBody, FailoverTest, NewTests, Role, StackPurpose, StartedTests, StopTest, StoppingTest, TestState,
    Vpg,
};
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use protection_groups::{CheckpointId, StackId, VpgId};
use serde::Deserialize;
use utoipa::IntoParams;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_tests, start_tests, discard_records))
        .routes(routes!(get_test))
        .routes(routes!(stop_test))
        .routes(routes!(clean_point_search))
}

/// Starts a clean-point search on the VPG: rounds of `k` failover tests,
/// each checked by `check` on this host, narrowing to the newest
/// checkpoint that passes with the next one failing. The task's result
/// shows the rounds, the map of verdicts and, at the end, the answer.
#[utoipa::path(post, path = "/api/v1/vpgs/{id}/clean-point-search", tag = "failover tests", params(("id" = Uuid, Path)),
    request_body = crate::clean_point::CleanPointRequest,
    responses((status = 202, body = crate::model::Task), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody)))]
async fn clean_point_search(
    State(sm): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
    ApiJson(req): ApiJson<crate::clean_point::CleanPointRequest>,
) -> ApiResult<(StatusCode, Json<crate::model::Task>)> {
    caller.require(Role::Operator)?;
    blocking(move || {
        let v = find_vpg(&sm, id)?;
        let task = crate::clean_point::start(&sm, &v, req).map_err(|why| ApiError::bad("clean-point search", why))?;
        Ok((StatusCode::ACCEPTED, Json(task)))
    })
    .await
}

/// The most tests one request starts.
const MAX_TESTS_AT_ONCE: usize = 16;

/// Which records to discard.
#[derive(Debug, Deserialize, IntoParams)]
pub struct DiscardQuery {
    /// Only records of tests stopped before this time (ms since the epoch);
    /// all stopped ones if absent.
    pub before_ms: Option<u64>,
}

/// The VPG `id`, whether defined here or a paired site's copy that
/// recovers to this site; the flag says it is a copy.
pub(super) fn find_vpg_or_copy(sm: &AppState, id: Uuid) -> ApiResult<(Vpg, bool)> {
    let key = VpgId(id);
    sm.with_store(|s| s.vpg_or_copy(key))?.ok_or_else(|| ApiError::NotFound(format!("no VPG {key}")))
}

/// As [`find_vpg_or_copy`], the VPG alone.
pub(super) fn find_vpg(sm: &AppState, id: Uuid) -> ApiResult<Vpg> {
    find_vpg_or_copy(sm, id).map(|(v, _)| v)
}

/// The checkpoints every recovery VDSA of this site holds for `vpg`
/// ([`crate::links::Links::testable_checkpoints`]).
pub(crate) fn testable_checkpoints(sm: &AppState, vpg: VpgId) -> (usize, Vec<CheckpointId>) {
    sm.links.testable_checkpoints(vpg)
}

/// Starts one failover test per entry, each at its own checkpoint; the
/// task ends when every one is exported. Replication goes on meanwhile.
#[utoipa::path(post, path = "/api/v1/vpgs/{id}/failover-tests", tag = "failover tests", params(("id" = Uuid, Path)),
    request_body = NewTests,
    responses((status = 202, body = StartedTests), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody)))]
async fn start_tests(
    State(sm): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
    ApiJson(req): ApiJson<NewTests>,
) -> ApiResult<(StatusCode, Json<StartedTests>)> {
    caller.require(Role::Operator)?;
    if req.checkpoints.is_empty() || req.checkpoints.len() > MAX_TESTS_AT_ONCE {
        return Err(ApiError::bad("checkpoints", format!("checkpoints: 1 to {MAX_TESTS_AT_ONCE} entries")));
    }
    blocking(move || {
        let v = find_vpg(&sm, id)?;
        let (targets, testable) = testable_checkpoints(&sm, v.id);
        if targets == 0 {
            return Err(ApiError::Conflict(format!(
                "VPG {:?} has no recovery VDSA of this site serving its journal; start its tests at the site it \
                 recovers to",
                v.settings.name
            )));
        }
        let mut picked = Vec::new();
        for (i, want) in req.checkpoints.iter().enumerate() {
            let cp = match want {
                None => *testable.last().ok_or_else(|| {
                    ApiError::Conflict(format!("VPG {:?} has no recoverable checkpoint yet", v.settings.name))
                })?,
                Some(n) if testable.contains(&CheckpointId(*n)) => CheckpointId(*n),
                Some(n) => {
                    return Err(ApiError::bad(
                        format!("checkpoints[{i}]"),
                        format!(
                            "checkpoints[{i}]: {} is not a recoverable checkpoint held by every recovery VDSA of VPG \
                             {:?}",
                            CheckpointId(*n),
                            v.settings.name
                        ),
                    ))
                }
            };
            picked.push(cp);
        }
        let list: Vec<String> = picked.iter().map(ToString::to_string).collect();
        let what = format!("failover test of VPG {:?} at {}", v.settings.name, list.join(", "));
        let (task, tests) = crate::failover_tests::start(&sm, &v, &picked, what)?;
        Ok((StatusCode::ACCEPTED, Json(StartedTests { task, tests })))
    })
    .await
}

/// The VPG's failover tests, running and recorded, oldest first.
#[utoipa::path(get, path = "/api/v1/vpgs/{id}/failover-tests", tag = "failover tests", params(("id" = Uuid, Path)),
    responses((status = 200, body = Vec<FailoverTest>), (status = 404, body = ErrorBody)))]
async fn list_tests(
    State(sm): State<AppState>,
    _caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult<Json<Vec<FailoverTest>>> {
    blocking(move || {
        let v = find_vpg(&sm, id)?;
        let mut tests: Vec<FailoverTest> =
            sm.with_store(|s| s.tests.list())?.into_iter().filter(|t| t.vpg == v.id).collect();
        tests.sort_by_key(|t| (t.started_ms, t.id));
        Ok(Json(tests))
    })
    .await
}

fn test(sm: &AppState, id: Uuid) -> ApiResult<FailoverTest> {
    sm.with_store(|s| s.tests.get(StackId(id).as_bytes()))?
        .ok_or_else(|| ApiError::NotFound(format!("no failover test {id}")))
}

/// One failover test.
#[utoipa::path(get, path = "/api/v1/failover-tests/{id}", tag = "failover tests", params(("id" = Uuid, Path)),
    responses((status = 200, body = FailoverTest), (status = 404, body = ErrorBody)))]
async fn get_test(
    State(sm): State<AppState>,
    _caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult<Json<FailoverTest>> {
    blocking(move || Ok(Json(test(&sm, id)?))).await
}

/// Stops a test with its verdict: its overlays are freed and its record
/// kept; the task ends when every recovery VDSA has discarded it.
#[utoipa::path(post, path = "/api/v1/failover-tests/{id}/stop", tag = "failover tests", params(("id" = Uuid, Path)),
    request_body = StopTest,
    responses((status = 202, body = StoppingTest), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody)))]
async fn stop_test(
    State(sm): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
    ApiJson(req): ApiJson<StopTest>,
) -> ApiResult<(StatusCode, Json<StoppingTest>)> {
    caller.require(Role::Operator)?;
    if req.notes.len() > 64 << 10 {
        return Err(ApiError::bad("notes", "notes: at most 64 KiB"));
    }
    blocking(move || {
        let t = test(&sm, id)?;
        if t.purpose == StackPurpose::Failover {
            return Err(ApiError::Conflict(format!(
                "{id} is VPG {:?}'s failover: commit it or roll it back",
                t.vpg_name
            )));
        }
        if !t.serves() {
            return Err(ApiError::Conflict(format!("failover test {id} is {:?}, not running", t.state)));
        }
        let (task, t) = crate::failover_tests::stop(&sm, t, req.result, req.notes)?;
        Ok((StatusCode::ACCEPTED, Json(StoppingTest { task, test: t })))
    })
    .await
}

/// Discards the records of stopped (and failed) tests of the VPG.
#[utoipa::path(delete, path = "/api/v1/vpgs/{id}/failover-tests", tag = "failover tests",
    params(("id" = Uuid, Path), DiscardQuery),
    responses((status = 200, body = Discarded), (status = 404, body = ErrorBody)))]
async fn discard_records(
    State(sm): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
    ApiQuery(q): ApiQuery<DiscardQuery>,
) -> ApiResult<Json<Discarded>> {
    caller.require(Role::Operator)?;
    blocking(move || {
        let v = find_vpg(&sm, id)?;
        let old: Vec<FailoverTest> = sm
            .with_store(|s| s.tests.list())?
            .into_iter()
            .filter(|t| t.vpg == v.id && matches!(t.state, TestState::Stopped | TestState::Failed))
            .filter(|t| q.before_ms.is_none_or(|b| t.stopped_ms.is_some_and(|s| s < b)))
            .collect();
        sm.with_store(|s| old.iter().try_for_each(|t| s.tests.remove(t.id.as_bytes())))?;
        Ok(Json(Discarded { discarded: old.len() }))
    })
    .await
}
