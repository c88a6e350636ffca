//! Reverse protection (architecture.md §6): after a committed failover,
//! the recovered VMs become the protected ones and the former source disks
//! the replicas. The VPG's direction is swapped (each VM's host and
//! recovery host), the new streams carry a new epoch, and the new target
//! replicas start as copies of the former source disks, so that the
//! initial sync through the taps (hashes of every block, DESIGN's delta
//! sync) sends only the blocks that differ. Failback is then a failover
//! the other way. A VPG of the paired site failed over here is taken over:
//! its definition moves to this site with a higher epoch, and the other
//! site's stale definition becomes its copy at the next exchange.

use super::extract::{ApiJson, ApiPath, Caller};
use super::{blocking, ApiError, ApiResult, AppState};
use crate::model::{now_ms, ErrorBody, ReverseProtection, Role, StackPurpose, TaskDriver, TestState, VpgTask};
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use protection_groups::mgmt::DiskSeed;
use protection_groups::VpgStatus;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(reverse_protect))
}

/// Reverse-protects a VPG whose failover was committed and promoted: each
/// VM now runs at its recovery host (named by `hypervisor_ref`) and is
/// protected back to its original host, whose replica starts from the
/// former source disk (`seed_path`). 202 with a task that ends when the
/// delta sync is done and the VPG protects.
#[utoipa::path(post, path = "/api/v1/vpgs/{id}/reverse-protection", tag = "failover", params(("id" = Uuid, Path)),
    request_body = ReverseProtection,
    responses((status = 202, body = VpgTask), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody)))]
async fn reverse_protect(
    State(sm): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
    ApiJson(req): ApiJson<ReverseProtection>,
) -> ApiResult<(StatusCode, Json<VpgTask>)> {
    caller.require(Role::Operator)?;
    blocking(move || {
        let (mut v, copy) = super::failover_tests::find_vpg_or_copy(&sm, id)?;
        if !matches!(v.status, VpgStatus::NeedReverseConfiguration | VpgStatus::PromotionCompleteMirrorsNotYetActivated)
        {
            return Err(ApiError::Conflict(format!(
                "VPG {:?} is {}; reverse protection follows a committed and promoted failover",
                v.settings.name, v.status
            )));
        }
        let mut seeds = Vec::new();
        for (i, vm) in v.settings.vms.iter_mut().enumerate() {
            let field = format!("vms[{i}]");
            let Some(r) = req.vms.iter().find(|r| r.vm == vm.id) else {
                return Err(ApiError::bad(&field, format!("{field}: VM {:?} ({}) is not listed", vm.name, vm.id)));
            };
            if r.hypervisor_ref.trim().is_empty() {
                return Err(ApiError::bad(
                    format!("{field}.hypervisor_ref"),
                    format!("{field}.hypervisor_ref: how the recovered VM {:?} is reached", vm.name),
                ));
            }
            for disk in &mut vm.disks {
                let Some(d) = r.disks.iter().find(|d| d.disk == disk.id) else {
                    return Err(ApiError::bad(
                        format!("{field}.disks"),
                        format!("{field}.disks: disk {:?} ({}) is not listed", disk.name, disk.id),
                    ));
                };
                disk.device.clone_from(&d.device);
                if let Some(path) = &d.seed_path {
                    seeds.push(DiskSeed { disk: disk.id, path: path.clone() });
                }
            }
            std::mem::swap(&mut vm.host, &mut vm.recovery_host);
            vm.hypervisor_ref.clone_from(&r.hypervisor_ref);
        }
        if let Some(extra) = req.vms.iter().find(|r| !v.settings.vms.iter().any(|vm| vm.id == r.vm)) {
            return Err(ApiError::bad("vms", format!("vms: VM {} is not in the VPG", extra.vm)));
        }
        let task = sm.start_task(
            "reverse_protection",
            format!("reverse-protect VPG {:?}: delta sync from the recovered VMs", v.settings.name),
            Some(v.id),
            None,
            TaskDriver::Vdsa,
        )?;
        // The failover's stack goes: the recovered VMs run from their
        // disks, which the new source roles tap.
        let failover = sm
            .with_store(|s| s.tests.list())?
            .into_iter()
            .find(|t| t.vpg == v.id && t.purpose == StackPurpose::Failover && t.serves());
        // A VPG of the paired site failed over here: this site takes it
        // over (its definition moves here, a copy goes back there, fenced
        // by the new epoch: docs/recovery.md).
        let previous_owner = if copy {
            let peer = sm
                .stored_peer()?
                .ok_or_else(|| ApiError::Conflict("this site is no longer paired with the VPG's site".into()))?;
            Some(peer.peer.site)
        } else {
            None
        };
        if let Some(site) = previous_owner {
            v.settings.recovery_site = site;
        }
        v.status = v.status.transition(VpgStatus::Initializing).map_err(|e| ApiError::Conflict(e.to_string()))?;
        v.status_reason = "reverse protection: delta sync from the recovered VMs".into();
        v.epoch += 1;
        v.revision += 1;
        v.seeds = seeds;
        sm.with_store(|s| {
            if let Some(mut f) = failover {
                f.state = TestState::Stopped;
                f.stopped_ms = Some(now_ms());
                f.exports.clear();
                f.notes = "reverse protected: the recovered VMs are protected back".into();
                s.tests.put(f.id.as_bytes(), &f)?;
            }
            if copy {
                s.peer_vpgs.remove(v.id.as_bytes())?;
            }
            s.vpgs.put(v.id.as_bytes(), &v)?;
            s.flush()
        })?;
        tracing::warn!(vpg = %v.id, epoch = v.epoch, "VPG reverse-protected");
        sm.changed();
        Ok((StatusCode::ACCEPTED, Json(VpgTask { vpg: v, task })))
    })
    .await
}
