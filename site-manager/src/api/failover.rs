//! Failover to a checkpoint and its roll back (architecture.md §6): the
//! VPG's replication stops, its disks at the checkpoint are served as a
//! processing stack per recovery VDSA, and the recovered VMs' writes go to
//! the stacks' overlays; nothing touches the replica, so a roll back (and
//! a failover to another checkpoint) is always possible until commit.

use super::extract::{ApiJson, ApiPath, Caller};
use super::failover_tests::{find_vpg_or_copy, testable_checkpoints};
use super::{blocking, ApiError, ApiResult, AppState};
use crate::model::{
    ErrorBody, FailoverTask, FailoverTest, NewFailover, Role, StackPurpose, TaskDriver, TestState, Vpg,
};
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use protection_groups::{CheckpointId, VpgStatus};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(fail_over)).routes(routes!(roll_back)).routes(routes!(commit))
}

/// Refuses a failover or a move while a test (or a failover) of the VPG
/// is served.
pub(super) fn refuse_while_testing(sm: &AppState, v: &Vpg) -> ApiResult<()> {
    if sm.with_store(|s| s.tests.list())?.iter().any(|t| t.vpg == v.id && t.serves()) {
        return Err(ApiError::Conflict(format!(
            "VPG {:?} has failover tests running; stop them first",
            v.settings.name
        )));
    }
    Ok(())
}

/// Stores a failover's record and its VPG (or the VPG's copy: this site
/// fails over a paired site's VPG, also while that site is gone, and the
/// defining site takes the status from the exchange).
fn store_failover(sm: &AppState, failover: &FailoverTest, v: &Vpg, copy: bool) -> ApiResult<()> {
    sm.with_store(|s| {
        s.tests.put(failover.id.as_bytes(), failover)?;
        s.put_vpg(v, copy)
    })?;
    Ok(())
}

/// Fails the VPG over to a checkpoint (the newest if none is named): its
/// replication stops and its disks at that checkpoint are exported; the
/// task ends when every disk is served.
#[utoipa::path(post, path = "/api/v1/vpgs/{id}/failover", tag = "failover", params(("id" = Uuid, Path)),
    request_body = NewFailover,
    responses((status = 202, body = FailoverTask), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody)))]
async fn fail_over(
    State(sm): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
    ApiJson(req): ApiJson<NewFailover>,
) -> ApiResult<(StatusCode, Json<FailoverTask>)> {
    caller.require(Role::Operator)?;
    let checkpoint = req.checkpoint;
    let ft = blocking(move || start_failover(&sm, id, checkpoint)).await?;
    Ok((StatusCode::ACCEPTED, Json(ft)))
}

/// Fails VPG `id` over to `checkpoint` (the newest if none): what the API
/// and a move do.
pub(crate) fn start_failover(sm: &AppState, id: Uuid, checkpoint: Option<u64>) -> ApiResult<FailoverTask> {
    let (mut v, copy) = find_vpg_or_copy(sm, id)?;
    if !v.status.can_recover() {
        return Err(ApiError::Conflict(format!(
            "VPG {:?} is {}; it fails over from Protecting",
            v.settings.name, v.status
        )));
    }
    refuse_while_testing(sm, &v)?;
    let (targets, held) = testable_checkpoints(sm, v.id);
    if targets == 0 {
        return Err(ApiError::Conflict(format!(
            "VPG {:?} has no recovery VDSA of this site serving its journal",
            v.settings.name
        )));
    }
    let checkpoint = match checkpoint {
        None => *held.last().ok_or_else(|| {
            ApiError::Conflict(format!("VPG {:?} has no recoverable checkpoint yet", v.settings.name))
        })?,
        Some(n) if held.contains(&CheckpointId(n)) => CheckpointId(n),
        Some(n) => {
            return Err(ApiError::bad(
                "checkpoint",
                format!(
                    "checkpoint: {} is not a recoverable checkpoint held by every recovery VDSA of VPG {:?}",
                    CheckpointId(n),
                    v.settings.name
                ),
            ))
        }
    };
    let task = sm.start_task(
        "failover",
        format!("fail VPG {:?} over to {checkpoint}", v.settings.name),
        Some(v.id),
        None,
        TaskDriver::Vdsa,
    )?;
    let failover = FailoverTest::starting(StackPurpose::Failover, &v, checkpoint, task.id);
    v.status = v.status.transition(VpgStatus::Failover).map_err(|e| ApiError::Conflict(e.to_string()))?;
    v.moving = false;
    v.status_reason = format!("failed over to {checkpoint}: commit or roll back");
    store_failover(sm, &failover, &v, copy)?;
    tracing::warn!(vpg = %v.id, %checkpoint, "VPG failing over");
    sm.changed();
    Ok(FailoverTask { vpg: v, failover, task })
}

/// Rolls a failover back: its stacks (and every write the recovered VMs
/// made) are discarded and the VPG protects again from its source. The
/// task ends when every recovery VDSA has discarded the stack.
#[utoipa::path(post, path = "/api/v1/vpgs/{id}/failover/rollback", tag = "failover", params(("id" = Uuid, Path)),
    responses((status = 202, body = FailoverTask), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn roll_back(
    State(sm): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult<(StatusCode, Json<FailoverTask>)> {
    caller.require(Role::Operator)?;
    blocking(move || {
        let (mut v, copy) = find_vpg_or_copy(&sm, id)?;
        let failover = sm
            .with_store(|s| s.tests.list())?
            .into_iter()
            .find(|t| t.vpg == v.id && t.purpose == StackPurpose::Failover && t.serves());
        if v.status.is_failed_over() && v.status != VpgStatus::Failover {
            return Err(ApiError::Conflict(format!(
                "VPG {:?} is {}: its failover was committed and cannot be rolled back",
                v.settings.name, v.status
            )));
        }
        let (Some(mut failover), VpgStatus::Failover) = (failover, v.status) else {
            return Err(ApiError::Conflict(format!("VPG {:?} is {}, not failed over", v.settings.name, v.status)));
        };
        let task = sm.start_task(
            "rollback",
            format!("roll VPG {:?} back from its failover to {}", v.settings.name, failover.checkpoint),
            Some(v.id),
            None,
            TaskDriver::Vdsa,
        )?;
        if failover.state == TestState::Starting {
            sm.finish_task(
                failover.start_task,
                crate::model::CompletionCode::Aborted,
                serde_json::json!({"failover": failover.id}),
                Some("rolled back before it was served".into()),
            )?;
        }
        failover.state = TestState::Stopping;
        failover.notes = "rolled back".into();
        failover.stop_task = Some(task.id);
        v.status = v.status.transition(VpgStatus::Protecting).map_err(|e| ApiError::Conflict(e.to_string()))?;
        v.status_reason = format!("rolled back from the failover to {}", failover.checkpoint);
        store_failover(&sm, &failover, &v, copy)?;
        tracing::warn!(vpg = %v.id, "failover rolled back");
        sm.changed();
        Ok((StatusCode::ACCEPTED, Json(FailoverTask { vpg: v, failover, task })))
    })
    .await
}

/// Commits a failover: the journal up to its checkpoint and the recovered
/// VMs' writes are promoted into the replica in the background while the
/// VMs keep running from the exports (task progress: bytes copied); no
/// roll back after this. The task ends when every recovery VDSA has
/// promoted its stack; the VPG then needs reverse protection.
#[utoipa::path(post, path = "/api/v1/vpgs/{id}/failover/commit", tag = "failover", params(("id" = Uuid, Path)),
    responses((status = 202, body = FailoverTask), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn commit(
    State(sm): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult<(StatusCode, Json<FailoverTask>)> {
    caller.require(Role::Operator)?;
    let ft = blocking(move || start_commit(&sm, id)).await?;
    Ok((StatusCode::ACCEPTED, Json(ft)))
}

/// Commits VPG `id`'s failover: what the API and a move do.
pub(crate) fn start_commit(sm: &AppState, id: Uuid) -> ApiResult<FailoverTask> {
    let (mut v, copy) = find_vpg_or_copy(sm, id)?;
    if v.status != VpgStatus::Failover {
        return Err(ApiError::Conflict(format!("VPG {:?} is {}, not failed over", v.settings.name, v.status)));
    }
    let failover = sm
        .with_store(|s| s.tests.list())?
        .into_iter()
        .find(|t| t.vpg == v.id && t.purpose == StackPurpose::Failover && t.serves());
    let Some(mut failover) = failover else {
        return Err(ApiError::Conflict(format!("VPG {:?} has no failover to commit", v.settings.name)));
    };
    if failover.state != TestState::Running {
        return Err(ApiError::Conflict(format!(
            "the failover of VPG {:?} to {} is not served yet: wait for its task {}",
            v.settings.name, failover.checkpoint, failover.start_task
        )));
    }
    let task = sm.start_task(
        "commit",
        format!("commit VPG {:?}'s failover to {}: promote it into the replica", v.settings.name, failover.checkpoint),
        Some(v.id),
        None,
        TaskDriver::Vdsa,
    )?;
    failover.commit_task = Some(task.id);
    failover.committed_ms = Some(crate::model::now_ms());
    v.status = v
        .status
        .transition(VpgStatus::PromotingAndNeedReverseConfiguration)
        .map_err(|e| ApiError::Conflict(e.to_string()))?;
    v.status_reason = format!(
        "failed over to {} and committed: promoting the journal and the recovered VMs' writes into the replica",
        failover.checkpoint
    );
    store_failover(sm, &failover, &v, copy)?;
    tracing::warn!(vpg = %v.id, checkpoint = %failover.checkpoint, "failover committed");
    sm.changed();
    Ok(FailoverTask { vpg: v, failover, task })
}
