//! Move: a planned migration of a VPG to its recovery site with no data
//! lost (architecture.md §6). The source VDSAs power the VMs off through
//! their hypervisor (every write the VMs were told is done went through
//! the write-blocking taps first), a checkpoint is taken once they are
//! off (so it holds every write), the VPG fails over to it and the
//! failover is committed. Reverse protection follows (not built yet: the
//! VPG ends NeedReverseConfiguration).
//!
//! The steps run as one task of the site manager; a restart of the site
//! manager ends it (taken back), and the operator carries on from where it
//! stood with the failover and commit operations.

use super::extract::{ApiPath, Caller};
use super::failover::{start_commit, start_failover};
use super::{blocking, ApiError, ApiResult, AppState};
use crate::model::{CompletionCode, ErrorBody, Role, TaskDriver, TestState, VpgTask};
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use protection_groups::mgmt::RoleKind;
use protection_groups::{CheckpointKind, VpgId, VpgStatus};
use std::future::Future;
use std::time::{Duration, Instant};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(move_vpg))
}

/// How long each step may take before the move fails, naming the step.
const POWER_OFF_WAIT: Duration = Duration::from_secs(180);
const CHECKPOINT_WAIT: Duration = Duration::from_secs(120);
const FAILOVER_WAIT: Duration = Duration::from_secs(120);
const PROMOTION_WAIT: Duration = Duration::from_secs(24 * 3600);

/// Moves a VPG defined here to its recovery hosts at this site: powers its
/// VMs off, takes a checkpoint holding every write, fails over to it and
/// commits. The task's progress follows the steps; its result names the
/// checkpoint and the failover.
#[utoipa::path(post, path = "/api/v1/vpgs/{id}/move", tag = "failover", params(("id" = Uuid, Path)),
    responses((status = 202, body = VpgTask), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn move_vpg(
    State(sm): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult<(StatusCode, Json<VpgTask>)> {
    caller.require(Role::Operator)?;
    let sm2 = sm.clone();
    let started = blocking(move || {
        let sm = sm2;
        let mut v = sm
            .with_store(|s| s.vpgs.get(VpgId(id).as_bytes()))?
            .ok_or_else(|| ApiError::NotFound(format!("no VPG {} is defined at this site", VpgId(id))))?;
        if v.status != VpgStatus::Protecting || v.moving {
            return Err(ApiError::Conflict(format!(
                "VPG {:?} is {}{}; a move starts from Protecting",
                v.settings.name,
                v.status,
                if v.moving { " and moving" } else { "" }
            )));
        }
        if let Some(vm) = v.settings.vms.iter().find(|vm| vm.hypervisor_ref.is_empty()) {
            return Err(ApiError::Conflict(format!(
                "VM {:?} names no hypervisor reference (its QEMU monitor): a move powers the VMs off through it",
                vm.name
            )));
        }
        let (targets, _) = super::failover_tests::testable_checkpoints(&sm, v.id);
        if targets == 0 {
            return Err(ApiError::Conflict(format!(
                "VPG {:?} has no recovery VDSA of this site serving its journal: move it from its recovery site",
                v.settings.name
            )));
        }
        super::failover::refuse_while_testing(&sm, &v)?;
        let task = sm.start_task(
            "move",
            format!("move VPG {:?} to its recovery site", v.settings.name),
            Some(v.id),
            None,
            TaskDriver::SiteManager,
        )?;
        v.moving = true;
        v.status_reason = "moving: powering the VMs off".into();
        sm.with_store(|s| s.vpgs.put(v.id.as_bytes(), &v))?;
        tracing::warn!(vpg = %v.id, "VPG moving: powering its VMs off");
        sm.changed();
        Ok(VpgTask { vpg: v, task })
    })
    .await?;
    let (vpg, task) = (started.vpg.id, started.task.id);
    tokio::spawn(async move {
        let outcome = drive(&sm, vpg, task).await;
        let sm2 = sm.clone();
        let _ = tokio::task::spawn_blocking(move || {
            let (code, result, why) = match outcome {
                Ok(result) => (CompletionCode::Success, result, None),
                Err(why) => {
                    tracing::error!(%vpg, "the move failed: {why}");
                    // Still Protecting (the failover did not start): the
                    // VMs stay off until the operator starts them again.
                    let _ = sm2.with_store(|s| {
                        if let Some(mut v) = s.vpgs.get(vpg.as_bytes())? {
                            if v.moving {
                                v.moving = false;
                                v.status_reason = format!("the move failed: {why}");
                                s.vpgs.put(vpg.as_bytes(), &v)?;
                            }
                        }
                        Ok(())
                    });
                    sm2.changed();
                    (CompletionCode::Failed, serde_json::Value::Null, Some(why))
                }
            };
            if let Err(e) = sm2.finish_task(task, code, result, why) {
                tracing::error!(%vpg, "cannot record the move's end: {e}");
            }
        })
        .await;
    });
    Ok((StatusCode::ACCEPTED, Json(started)))
}

/// The move's steps; the error names the step that failed and why.
async fn drive(sm: &AppState, vpg: VpgId, task: Uuid) -> Result<serde_json::Value, String> {
    let progress = |pct: u8, reason: &str| {
        let (sm, reason) = (sm.clone(), reason.to_string());
        async move {
            let _ = tokio::task::spawn_blocking(move || {
                let _ = sm.update_task(task, |t| t.progress = pct);
                let _ = sm.with_store(|s| {
                    if let Some(mut v) = s.vpgs.get(vpg.as_bytes())? {
                        v.status_reason = reason;
                        s.vpgs.put(vpg.as_bytes(), &v)?;
                    }
                    Ok(())
                });
            })
            .await;
        }
    };
    // 1. The VMs go off; their source streams stay.
    let sources = crate::reconcile::desired_source_count(&read_vpg(sm, vpg).await?);
    wait_for(POWER_OFF_WAIT, "the source VDSAs to power the VMs off", || async {
        let off =
            sm.links.roles().iter().filter(|r| r.vpg == vpg && r.kind == RoleKind::Source && r.powered_off).count();
        Ok(off >= sources)
    })
    .await?;
    progress(30, "moving: the VMs are off; taking the last checkpoint").await;
    // 2. A checkpoint after the last write.
    let v = read_vpg(sm, vpg).await?;
    let id = off_thread(sm, |sm| sm.with_store(|s| s.next_checkpoint_id())).await?;
    let request = crate::coordinator::CheckpointRequest {
        vpg,
        hosts: v.settings.protected_hosts(),
        kind: CheckpointKind::Named,
        name: "move".into(),
        id,
        quiesce: false,
    };
    sm.take_checkpoint(request).await.map_err(|e| format!("taking the move's checkpoint: {e}"))?;
    wait_for(CHECKPOINT_WAIT, "the move's checkpoint to be durable at the recovery site", || async {
        let cp = off_thread(sm, move |sm| sm.with_store(|s| s.checkpoints.get(&crate::store::checkpoint_key(vpg, id))))
            .await?;
        match cp {
            Some(c) if !c.consistent && !c.reason.is_empty() => {
                Err(format!("the move's checkpoint {id} is not consistent: {}", c.reason))
            }
            Some(c) => Ok(c.consistent && c.durable),
            None => Ok(false),
        }
    })
    .await?;
    progress(50, "moving: failing over to the last checkpoint").await;
    // 3. Fail over to it.
    let ft = off_thread(sm, move |sm| start_failover(sm, vpg.0, Some(id.0)))
        .await
        .map_err(|e| format!("failing over to {id}: {e}"))?;
    let failover = ft.failover.id;
    wait_for(FAILOVER_WAIT, "the failover's disks to be served", || async {
        let t = off_thread(sm, move |sm| sm.with_store(|s| s.tests.get(failover.as_bytes()))).await?;
        match t {
            Some(t) if t.state == TestState::Failed => Err(format!("the failover failed: {}", t.detail)),
            Some(t) => Ok(t.state == TestState::Running),
            None => Err("the failover's record is gone".into()),
        }
    })
    .await?;
    let _ = tokio::task::spawn_blocking({
        let sm = sm.clone();
        move || sm.update_task(task, |t| t.progress = 70)
    })
    .await;
    // 4. Commit: the replica becomes the moved disks.
    let committed =
        off_thread(sm, move |sm| start_commit(sm, vpg.0)).await.map_err(|e| format!("committing the failover: {e}"))?;
    let commit_task = committed.task.id;
    wait_for(PROMOTION_WAIT, "the promotion", || async {
        let t = off_thread(sm, move |sm| sm.with_store(|s| s.tasks.get(&crate::store::uuid_key(&commit_task)))).await?;
        match t {
            Some(t) if t.is_finished() && t.completion != CompletionCode::Success => {
                Err(format!("the promotion ended {:?}: {}", t.completion, t.exception.unwrap_or_default()))
            }
            Some(t) => Ok(t.is_finished()),
            None => Err("the promotion's task is gone".into()),
        }
    })
    .await?;
    Ok(serde_json::json!({"checkpoint": id, "failover": failover, "commit_task": commit_task}))
}

async fn read_vpg(sm: &AppState, vpg: VpgId) -> Result<crate::model::Vpg, String> {
    off_thread(sm, move |sm| sm.with_store(|s| s.vpgs.get(vpg.as_bytes())))
        .await?
        .ok_or_else(|| format!("VPG {vpg} was removed"))
}

/// Runs a store or API step of the move off the async threads; its error
/// as text (the move's task names it).
async fn off_thread<T, E>(
    sm: &AppState,
    f: impl FnOnce(&AppState) -> Result<T, E> + Send + 'static,
) -> Result<T, String>
where
    T: Send + 'static,
    E: std::fmt::Display + Send + 'static,
{
    let sm = sm.clone();
    tokio::task::spawn_blocking(move || f(&sm)).await.map_err(|e| e.to_string())?.map_err(|e| e.to_string())
}

/// Polls `done` until it says yes (or fails), or `limit` passes.
async fn wait_for<F, Fut>(limit: Duration, what: &str, mut done: F) -> Result<(), String>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<bool, String>>,
{
    let start = Instant::now();
    loop {
        if done().await? {
            return Ok(());
        }
        if start.elapsed() > limit {
            return Err(format!("timed out after {} s waiting for {what}", limit.as_secs()));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
