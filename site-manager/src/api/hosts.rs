//! The hosts service: hypervisor hosts, their VDSAs' state, and the
//! registration tokens that let a VDSA join.

use super::extract::{ApiJson, ApiPath, Caller};
use super::{blocking, ApiError, ApiResult, AppState};
use crate::model::{ErrorBody, Host, NewHost, RegistrationToken, Role, VdsaState};
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use protection_groups::HostId;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_hosts, add_host))
        .routes(routes!(get_host, remove_host))
        .routes(routes!(registration_token))
        .routes(routes!(deploy))
        .routes(routes!(undeploy))
}

/// Every host with its VDSA's state.
#[utoipa::path(get, path = "/api/v1/hosts", tag = "hosts", responses((status = 200, body = Vec<Host>)))]
async fn list_hosts(State(sm): State<AppState>, _caller: Caller) -> ApiResult<Json<Vec<Host>>> {
    blocking(move || {
        let mut all = sm.hosts_with_health()?;
        all.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Json(all))
    })
    .await
}

/// Adds a host (its VDSA is not installed yet).
#[utoipa::path(post, path = "/api/v1/hosts", tag = "hosts", request_body = NewHost,
    responses((status = 201, body = Host), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn add_host(
    State(sm): State<AppState>,
    caller: Caller,
    ApiJson(req): ApiJson<NewHost>,
) -> ApiResult<(StatusCode, Json<Host>)> {
    caller.require(Role::Admin)?;
    if req.name.trim().is_empty() || req.name.len() > 253 || req.name.chars().any(|c| c.is_control() || c == '/') {
        return Err(ApiError::bad("name", "name: 1 to 253 printable characters, no '/'"));
    }
    blocking(move || {
        let hosts = sm.with_store(|s| s.hosts.list())?;
        if hosts.iter().any(|h| h.name == req.name) {
            return Err(ApiError::Conflict(format!("a host named {:?} exists", req.name)));
        }
        let h = Host::new(req.name, req.hypervisor);
        sm.with_store(|s| s.hosts.put(h.id.as_bytes(), &h))?;
        Ok((StatusCode::CREATED, Json(h)))
    })
    .await
}

fn host(sm: &AppState, id: Uuid) -> ApiResult<Host> {
    sm.hosts_with_health()?
        .into_iter()
        .find(|h| h.id.0 == id)
        .ok_or_else(|| ApiError::NotFound(format!("no host {}", HostId(id))))
}

/// One host.
#[utoipa::path(get, path = "/api/v1/hosts/{id}", tag = "hosts", params(("id" = Uuid, Path)),
    responses((status = 200, body = Host), (status = 404, body = ErrorBody)))]
async fn get_host(State(sm): State<AppState>, _caller: Caller, ApiPath(id): ApiPath<Uuid>) -> ApiResult<Json<Host>> {
    blocking(move || Ok(Json(host(&sm, id)?))).await
}

/// Removes a host that no VPG uses.
#[utoipa::path(delete, path = "/api/v1/hosts/{id}", tag = "hosts", params(("id" = Uuid, Path)),
    responses((status = 204), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn remove_host(State(sm): State<AppState>, caller: Caller, ApiPath(id): ApiPath<Uuid>) -> ApiResult<StatusCode> {
    caller.require(Role::Admin)?;
    blocking(move || {
        let h = host(&sm, id)?;
        let vpgs = sm.with_store(|s| s.vpgs.list())?;
        if let Some(v) = vpgs.iter().find(|v| v.settings.vms.iter().any(|m| m.host == h.id || m.recovery_host == h.id))
        {
            return Err(ApiError::Conflict(format!("host {} is used by VPG {:?}", h.name, v.settings.name)));
        }
        sm.with_store(|s| s.hosts.remove(h.id.as_bytes()))?;
        Ok(StatusCode::NO_CONTENT)
    })
    .await
}

/// Mints a one-time registration token for the host's VDSA (the KVM
/// deploy: put it in the VDSA's config file). The host shows Installing
/// until its VDSA registers with it.
#[utoipa::path(post, path = "/api/v1/hosts/{id}/registration-token", tag = "hosts", params(("id" = Uuid, Path)),
    responses((status = 201, body = RegistrationToken), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn registration_token(
    State(sm): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult<(StatusCode, Json<RegistrationToken>)> {
    caller.require(Role::Admin)?;
    blocking(move || {
        let mut h = host(&sm, id)?;
        if matches!(h.vdsa, VdsaState::Installed | VdsaState::Down) {
            return Err(ApiError::Conflict(format!(
                "host {} already has a registered VDSA (state {:?}); undeploy it first",
                h.name, h.vdsa
            )));
        }
        let (token, expires_ms) = crate::deploy::mint_registration(&sm, &mut h)?;
        // The KVM deploy: done when the VDSA given this token reports.
        let task = crate::deploy::start_register_wait(&sm, &h)?;
        let token = RegistrationToken {
            host: h.id,
            token,
            expires_ms,
            management_address: sm.management_address(),
            task: Some(task.id),
        };
        Ok((StatusCode::CREATED, Json(token)))
    })
    .await
}

fn vcenter(sm: &AppState) -> ApiResult<crate::model::VcenterSettings> {
    sm.with_store(|s| s.vcenter.get(crate::deploy::VCENTER_KEY))?
        .ok_or_else(|| ApiError::Conflict("no vCenter is set: PUT /api/v1/site/vcenter first".into()))
}

/// Deploys the VDSA OVA to a vSphere host (a task); the appliance
/// registers with a token minted for it, and the host shows installing
/// until it does.
#[utoipa::path(post, path = "/api/v1/hosts/{id}/deploy", tag = "hosts", params(("id" = Uuid, Path)),
    request_body = crate::model::DeployVdsa,
    responses((status = 202, body = crate::model::Task), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody)))]
async fn deploy(
    State(sm): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
    ApiJson(req): ApiJson<crate::model::DeployVdsa>,
) -> ApiResult<(StatusCode, Json<crate::model::Task>)> {
    caller.require(Role::Admin)?;
    if req.datastore.trim().is_empty() {
        return Err(ApiError::bad("datastore", "datastore: must not be empty"));
    }
    if req.network.trim().is_empty() {
        return Err(ApiError::bad("network", "network: must not be empty"));
    }
    // What the appliance would refuse at boot is refused here, by field.
    let appliance = protection_groups::appliance::ApplianceSettings {
        ip: req.ip,
        netmask: req.netmask,
        gateway: req.gateway,
        dns: req.dns.clone(),
        site_manager: sm.management_address(),
        registration_token: format!("unminted.{}", sm.pki.ca_sha256()),
    };
    if let Err(e) = appliance.check() {
        return Err(ApiError::bad(e.property, e.to_string()));
    }
    blocking(move || {
        let h = host(&sm, id)?;
        crate::deploy::check_vsphere(&h).map_err(ApiError::Conflict)?;
        if !matches!(h.vdsa, VdsaState::NotInstalled | VdsaState::Failed) {
            return Err(ApiError::Conflict(format!(
                "host {} has a VDSA already (state {:?}); undeploy it first",
                h.name, h.vdsa
            )));
        }
        let v = vcenter(&sm)?;
        if v.ova_path.is_empty() {
            return Err(ApiError::Conflict("no VDSA OVA is set: PUT /api/v1/site/vcenter with ova_path first".into()));
        }
        Ok((StatusCode::ACCEPTED, Json(crate::deploy::start_deploy(&sm, h, v, req)?)))
    })
    .await
}

/// Removes a vSphere host's VDSA (a task).
#[utoipa::path(post, path = "/api/v1/hosts/{id}/undeploy", tag = "hosts", params(("id" = Uuid, Path)),
    responses((status = 202, body = crate::model::Task), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn undeploy(
    State(sm): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult<(StatusCode, Json<crate::model::Task>)> {
    caller.require(Role::Admin)?;
    blocking(move || {
        let h = host(&sm, id)?;
        crate::deploy::check_vsphere(&h).map_err(ApiError::Conflict)?;
        let vpgs = sm.with_store(|s| s.vpgs.list())?;
        if let Some(v) = vpgs.iter().find(|v| v.settings.vms.iter().any(|m| m.host == h.id || m.recovery_host == h.id))
        {
            return Err(ApiError::Conflict(format!("host {} is used by VPG {:?}", h.name, v.settings.name)));
        }
        let v = vcenter(&sm)?;
        Ok((StatusCode::ACCEPTED, Json(crate::deploy::start_undeploy(&sm, h, v)?)))
    })
    .await
}
