//! The protection groups service: VPGs, their VMs and status.

use super::extract::{ApiJson, ApiPath, ApiQuery, Caller};
use super::{blocking, ApiError, ApiResult, AppState};
use crate::model::{
    now_ms, Checkpoint, ErrorBody, InsertedCheckpoint, NewCheckpoint, NewVm, Role, TaskDriver, Vpg, VpgRole, VpgTask,
};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use protection_groups::{CheckpointId, CheckpointKind, VpgId, VpgSettings, VpgStatus};
use serde::Deserialize;
use utoipa::IntoParams;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_vpgs, create_vpg))
        .routes(routes!(get_vpg, update_vpg, remove_vpg))
        .routes(routes!(add_vm))
        .routes(routes!(remove_vm))
        .routes(routes!(list_checkpoints, insert_checkpoint))
        .routes(routes!(vpg_roles))
        .routes(routes!(wait_checkpoint))
}

/// Every VPG of this site.
#[utoipa::path(get, path = "/api/v1/vpgs", tag = "vpgs", responses((status = 200, body = Vec<Vpg>)))]
async fn list_vpgs(State(sm): State<AppState>, _caller: Caller) -> ApiResult<axum::response::Response> {
    // The list is read often (consoles poll it): its JSON is kept until the
    // next change.
    let bytes = blocking(move || Ok(sm.with_store(|s| s.vpgs.list_json())?)).await?;
    Ok(([(axum::http::header::CONTENT_TYPE, "application/json")], bytes.as_ref().clone()).into_response())
}

/// Checks settings against this site's inventory: known hosts, a known
/// recovery site, names and VMs not used by another VPG.
fn check_inventory(sm: &AppState, settings: &VpgSettings, this: Option<VpgId>) -> ApiResult<()> {
    settings.validate()?;
    let site = sm.site()?;
    let peer = sm.peer_site_id()?;
    let local_recovery = settings.recovery_site == site.id;
    if !local_recovery && Some(settings.recovery_site) != peer {
        return Err(ApiError::bad(
            "recovery_site",
            format!("recovery_site: {} is neither this site nor its paired site", settings.recovery_site),
        ));
    }
    let hosts = sm.with_store(|s| s.hosts.list())?;
    let peer_hosts = sm.peering.hosts();
    for (i, vm) in settings.vms.iter().enumerate() {
        if !hosts.iter().any(|h| h.id == vm.host) {
            return Err(ApiError::bad(format!("vms[{i}].host"), format!("vms[{i}].host: no host {}", vm.host)));
        }
        if local_recovery && !hosts.iter().any(|h| h.id == vm.recovery_host) {
            return Err(ApiError::bad(
                format!("vms[{i}].recovery_host"),
                format!("vms[{i}].recovery_host: no host {}", vm.recovery_host),
            ));
        }
        if !local_recovery && !peer_hosts.iter().any(|h| h.id == vm.recovery_host) {
            let why = if peer_hosts.is_empty() {
                "the paired site's hosts are not known yet (it has not answered); try again".to_string()
            } else {
                format!("no host {} at the paired site", vm.recovery_host)
            };
            return Err(ApiError::bad(format!("vms[{i}].recovery_host"), format!("vms[{i}].recovery_host: {why}")));
        }
    }
    for other in sm.with_store(|s| s.vpgs.list())?.into_iter().filter(|v| Some(v.id) != this) {
        if other.settings.name == settings.name {
            return Err(ApiError::Conflict(format!("a VPG named {:?} exists", settings.name)));
        }
        for vm in &settings.vms {
            if other.settings.vm(vm.id).is_some() {
                return Err(ApiError::Conflict(format!(
                    "VM {} ({}) is already protected by VPG {:?}",
                    vm.name, vm.id, other.settings.name
                )));
            }
        }
    }
    Ok(())
}

/// Creates a VPG; the returned task ends when its initial sync is done.
#[utoipa::path(post, path = "/api/v1/vpgs", tag = "vpgs", request_body = VpgSettings,
    responses((status = 202, body = VpgTask), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn create_vpg(
    State(sm): State<AppState>,
    caller: Caller,
    ApiJson(settings): ApiJson<VpgSettings>,
) -> ApiResult<(StatusCode, Json<VpgTask>)> {
    caller.require(Role::Operator)?;
    blocking(move || {
        check_inventory(&sm, &settings, None)?;
        let vpg = Vpg {
            id: VpgId::new(),
            status: VpgStatus::Initializing,
            status_reason: "initial sync".into(),
            created_ms: now_ms(),
            revision: 1,
            epoch: 1,
            settings,
            paused: false,
            moving: false,
            seeds: Vec::new(),
        };
        let task = sm.start_task(
            "create_vpg",
            format!("protect VPG {:?}", vpg.settings.name),
            Some(vpg.id),
            None,
            TaskDriver::Vdsa,
        )?;
        sm.with_store(|s| s.vpgs.put(vpg.id.as_bytes(), &vpg))?;
        sm.changed();
        Ok((StatusCode::ACCEPTED, Json(VpgTask { vpg, task })))
    })
    .await
}

fn vpg(sm: &AppState, id: Uuid) -> ApiResult<Vpg> {
    sm.with_store(|s| s.vpgs.get(VpgId(id).as_bytes()))?
        .ok_or_else(|| ApiError::NotFound(format!("no VPG {}", VpgId(id))))
}

/// One VPG.
#[utoipa::path(get, path = "/api/v1/vpgs/{id}", tag = "vpgs", params(("id" = Uuid, Path)),
    responses((status = 200, body = Vpg), (status = 404, body = ErrorBody)))]
async fn get_vpg(State(sm): State<AppState>, _caller: Caller, ApiPath(id): ApiPath<Uuid>) -> ApiResult<Json<Vpg>> {
    blocking(move || Ok(Json(vpg(&sm, id)?))).await
}

/// Statuses in which a VPG's definition may change.
fn editable(status: VpgStatus) -> bool {
    matches!(
        status,
        VpgStatus::Initializing | VpgStatus::Protecting | VpgStatus::MissingConfiguration | VpgStatus::Error
    )
}

fn save_settings(sm: &AppState, mut v: Vpg, settings: VpgSettings) -> ApiResult<Vpg> {
    if !editable(v.status) {
        return Err(ApiError::Conflict(format!(
            "VPG {:?} is {}; its definition can change only while protecting",
            v.settings.name, v.status
        )));
    }
    if settings.recovery_site != v.settings.recovery_site {
        return Err(ApiError::bad("recovery_site", "recovery_site: cannot change; create a new VPG"));
    }
    check_inventory(sm, &settings, Some(v.id))?;
    settings.validate_change(&v.settings)?;
    v.settings = settings;
    v.revision += 1;
    sm.with_store(|s| s.vpgs.put(v.id.as_bytes(), &v))?;
    sm.changed();
    Ok(v)
}

/// Replaces a VPG's settings (VMs included).
#[utoipa::path(put, path = "/api/v1/vpgs/{id}", tag = "vpgs", params(("id" = Uuid, Path)), request_body = VpgSettings,
    responses((status = 200, body = Vpg), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn update_vpg(
    State(sm): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
    ApiJson(settings): ApiJson<VpgSettings>,
) -> ApiResult<Json<Vpg>> {
    caller.require(Role::Operator)?;
    blocking(move || {
        let v = vpg(&sm, id)?;
        Ok(Json(save_settings(&sm, v, settings)?))
    })
    .await
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
struct RemoveQuery {
    /// Remove whatever the VPG's state (a failover or test in progress is
    /// abandoned).
    force: Option<bool>,
}

/// Removes a VPG: its roles are taken down at every VDSA, then its record.
#[utoipa::path(delete, path = "/api/v1/vpgs/{id}", tag = "vpgs", params(("id" = Uuid, Path), RemoveQuery),
    responses((status = 202, body = VpgTask), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn remove_vpg(
    State(sm): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
    ApiQuery(q): ApiQuery<RemoveQuery>,
) -> ApiResult<(StatusCode, Json<VpgTask>)> {
    caller.require(Role::Operator)?;
    let force = q.force.unwrap_or(false);
    blocking(move || {
        let mut v = vpg(&sm, id)?;
        if !force && !editable(v.status) {
            return Err(ApiError::Conflict(format!(
                "VPG {:?} is {}; remove it with force=true, or end what runs first",
                v.settings.name, v.status
            )));
        }
        v.status = v.status.transition(VpgStatus::RemoveInProgress)?;
        v.status_reason = if force { "removal forced by an operator".into() } else { "removal".into() };
        let task = sm.start_task(
            "remove_vpg",
            format!("remove VPG {:?}", v.settings.name),
            Some(v.id),
            None,
            TaskDriver::SiteManager,
        )?;
        sm.with_store(|s| s.vpgs.put(v.id.as_bytes(), &v))?;
        sm.changed();
        Ok((StatusCode::ACCEPTED, Json(VpgTask { vpg: v, task })))
    })
    .await
}

/// Adds a VM (with its disks) to a VPG.
#[utoipa::path(post, path = "/api/v1/vpgs/{id}/vms", tag = "vpgs", params(("id" = Uuid, Path)), request_body = NewVm,
    responses((status = 200, body = Vpg), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn add_vm(
    State(sm): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
    ApiJson(vm): ApiJson<NewVm>,
) -> ApiResult<Json<Vpg>> {
    caller.require(Role::Operator)?;
    blocking(move || {
        let v = vpg(&sm, id)?;
        if v.settings.vm(vm.id).is_some() {
            return Err(ApiError::Conflict(format!("VM {} is already in VPG {:?}", vm.id, v.settings.name)));
        }
        let mut settings = v.settings.clone();
        settings.vms.push(vm);
        Ok(Json(save_settings(&sm, v, settings)?))
    })
    .await
}

/// Removes a VM from a VPG (its history stays in the journal until it
/// ages out).
#[utoipa::path(delete, path = "/api/v1/vpgs/{id}/vms/{vm}", tag = "vpgs", params(("id" = Uuid, Path), ("vm" = Uuid, Path)),
    responses((status = 200, body = Vpg), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn remove_vm(
    State(sm): State<AppState>,
    caller: Caller,
    ApiPath((id, vm)): ApiPath<(Uuid, Uuid)>,
) -> ApiResult<Json<Vpg>> {
    caller.require(Role::Operator)?;
    blocking(move || {
        let v = vpg(&sm, id)?;
        let mut settings = v.settings.clone();
        let before = settings.vms.len();
        settings.vms.retain(|m| m.id.0 != vm);
        if settings.vms.len() == before {
            return Err(ApiError::NotFound(format!(
                "VPG {:?} has no VM {}",
                v.settings.name,
                protection_groups::VmId(vm)
            )));
        }
        Ok(Json(save_settings(&sm, v, settings)?))
    })
    .await
}

/// The VPG's roles as its connected VDSAs reported them last (sources:
/// sync progress, bytes written and on the link; targets: journal,
/// checkpoints, stacks).
#[utoipa::path(get, path = "/api/v1/vpgs/{id}/roles", tag = "vpgs", params(("id" = Uuid, Path)),
    responses((status = 200, body = Vec<VpgRole>), (status = 404, body = ErrorBody)))]
async fn vpg_roles(
    State(sm): State<AppState>,
    _caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult<Json<Vec<VpgRole>>> {
    blocking(move || {
        let v = vpg(&sm, id)?;
        let mut roles: Vec<VpgRole> = sm
            .links
            .roles_by_host()
            .into_iter()
            .filter(|(_, r)| r.vpg == v.id)
            .map(|(host, role)| VpgRole { host, role })
            .collect();
        roles.sort_by_key(|r| (r.host, r.role.stream));
        Ok(Json(roles))
    })
    .await
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
struct CheckpointQuery {
    /// Only checkpoints recorded at or after this time (ms since the epoch).
    since_ms: Option<u64>,
    /// Only the newest this many (of those since `since_ms`).
    limit: Option<usize>,
}

/// A VPG's checkpoints, oldest first.
#[utoipa::path(get, path = "/api/v1/vpgs/{id}/checkpoints", tag = "vpgs", params(("id" = Uuid, Path), CheckpointQuery),
    responses((status = 200, body = Vec<Checkpoint>), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn list_checkpoints(
    State(sm): State<AppState>,
    _caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
    ApiQuery(q): ApiQuery<CheckpointQuery>,
) -> ApiResult<Json<Vec<Checkpoint>>> {
    blocking(move || {
        let v = vpg(&sm, id)?;
        let mut all: Vec<Checkpoint> = sm.with_store(|s| s.checkpoints.list_prefix(v.id.as_bytes()))?;
        if let Some(since) = q.since_ms {
            all.retain(|c| c.time_ms >= since);
        }
        if let Some(limit) = q.limit {
            all.drain(..all.len().saturating_sub(limit));
        }
        Ok(Json(all))
    })
    .await
}

/// Inserts a named checkpoint; returns at once with its id.
#[utoipa::path(post, path = "/api/v1/vpgs/{id}/checkpoints", tag = "vpgs", params(("id" = Uuid, Path)),
    request_body = NewCheckpoint,
    responses((status = 202, body = InsertedCheckpoint), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn insert_checkpoint(
    State(sm): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
    ApiJson(req): ApiJson<NewCheckpoint>,
) -> ApiResult<(StatusCode, Json<InsertedCheckpoint>)> {
    caller.require(Role::Operator)?;
    if req.name.trim().is_empty() || req.name.len() > 1024 || req.name.chars().any(char::is_control) {
        return Err(ApiError::bad("name", "name: 1 to 1024 bytes of printable characters"));
    }
    let sm2 = sm.clone();
    let (v, cp) = blocking(move || {
        let v = vpg(&sm2, id)?;
        if !matches!(v.status, VpgStatus::Protecting | VpgStatus::Test | VpgStatus::Initializing) {
            return Err(ApiError::Conflict(format!(
                "VPG {:?} is {}; checkpoints are inserted while it replicates",
                v.settings.name, v.status
            )));
        }
        let cp = sm2.with_store(|s| s.next_checkpoint_id())?;
        Ok((v, cp))
    })
    .await?;
    let hosts = v.settings.protected_hosts();
    let sm3 = sm.clone();
    tokio::spawn(async move {
        let request = crate::coordinator::CheckpointRequest {
            vpg: v.id,
            hosts,
            kind: CheckpointKind::Named,
            name: req.name,
            id: cp,
            quiesce: req.application_consistent,
        };
        if let Err(e) = sm3.take_checkpoint(request).await {
            tracing::error!(vpg = %v.id, error = %e, "cannot record a checkpoint");
        }
    });
    Ok((StatusCode::ACCEPTED, Json(InsertedCheckpoint { vpg: v.id, id: cp })))
}

/// Waits until the checkpoint is durable at every target VDSA of the VPG,
/// or known not to be consistent, or the timeout passes; returns the record
/// as it is then (404 if it was never recorded in that time).
#[utoipa::path(get, path = "/api/v1/vpgs/{id}/checkpoints/{checkpoint}/wait", tag = "vpgs",
    params(("id" = Uuid, Path), ("checkpoint" = u64, Path), super::tasks::WaitQuery),
    responses((status = 200, body = Checkpoint), (status = 404, body = ErrorBody)))]
async fn wait_checkpoint(
    State(sm): State<AppState>,
    _caller: Caller,
    ApiPath((id, checkpoint)): ApiPath<(Uuid, u64)>,
    ApiQuery(q): ApiQuery<super::tasks::WaitQuery>,
) -> ApiResult<Json<Checkpoint>> {
    let deadline =
        std::time::Instant::now() + std::time::Duration::from_millis(q.timeout_ms.unwrap_or(30_000).min(600_000));
    let sm2 = sm.clone();
    let v = blocking(move || vpg(&sm2, id)).await?;
    loop {
        let sm2 = sm.clone();
        let cp = blocking(move || {
            Ok(sm2.with_store(|s| s.checkpoints.get(&crate::store::checkpoint_key(v.id, CheckpointId(checkpoint))))?)
        })
        .await?;
        let now = std::time::Instant::now();
        match cp {
            Some(cp) if cp.durable || !cp.consistent || now >= deadline => return Ok(Json(cp)),
            None if now >= deadline => {
                return Err(ApiError::NotFound(format!("VPG {} has no checkpoint {checkpoint}", v.id)))
            }
            _ => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
        }
    }
}
