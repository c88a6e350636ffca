//! The site service: site details and settings, the audit log, reclaim.

use super::extract::{ApiJson, ApiQuery, Caller};
use super::{blocking, ApiError, ApiResult, AppState};
use crate::model::{AuditEntry, ErrorBody, Role, Site, SiteUpdate};
use axum::extract::State;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(get_site, update_site))
        .routes(routes!(list_audit))
        .routes(routes!(reclaim))
        .routes(routes!(get_vcenter, set_vcenter))
}

/// This site's details.
#[utoipa::path(get, path = "/api/v1/site", tag = "site",
    responses((status = 200, body = Site), (status = 401, body = ErrorBody)))]
async fn get_site(State(sm): State<AppState>, _caller: Caller) -> ApiResult<Json<Site>> {
    blocking(move || Ok(Json(sm.site()?))).await
}

fn check_text(field: &str, v: &str, max: usize) -> ApiResult<()> {
    if v.len() > max {
        return Err(ApiError::bad(field, format!("{field}: {} bytes; at most {max}", v.len())));
    }
    if v.chars().any(char::is_control) {
        return Err(ApiError::bad(field, format!("{field}: must not hold control characters")));
    }
    Ok(())
}

/// Changes the site's name, location, contact, address or replication port.
#[utoipa::path(patch, path = "/api/v1/site", tag = "site", request_body = SiteUpdate,
    responses((status = 200, body = Site), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody)))]
async fn update_site(
    State(sm): State<AppState>,
    caller: Caller,
    ApiJson(u): ApiJson<SiteUpdate>,
) -> ApiResult<Json<Site>> {
    caller.require(Role::Admin)?;
    for (field, v) in [("name", &u.name), ("location", &u.location), ("contact", &u.contact), ("address", &u.address)] {
        if let Some(v) = v {
            check_text(field, v, 256)?;
        }
    }
    if u.name.as_deref().is_some_and(|n| n.trim().is_empty()) {
        return Err(ApiError::bad("name", "name: must not be empty"));
    }
    if u.replication_port == Some(0) {
        return Err(ApiError::bad("replication_port", "replication_port: must not be 0"));
    }
    blocking(move || {
        let mut site = sm.site()?;
        if let Some(v) = u.name {
            site.name = v;
        }
        if let Some(v) = u.location {
            site.location = v;
        }
        if let Some(v) = u.contact {
            site.contact = v;
        }
        if let Some(v) = u.address {
            site.address = v;
        }
        if let Some(v) = u.replication_port {
            site.replication_port = v;
        }
        sm.with_store(|s| s.site.put(b"site", &site))?;
        Ok(Json(site))
    })
    .await
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
struct AuditQuery {
    /// Entries after this sequence number.
    after: Option<u64>,
    /// At most this many (default 1000).
    limit: Option<usize>,
}

/// The audit log: who changed what, and who was refused.
#[utoipa::path(get, path = "/api/v1/audit", tag = "site", params(AuditQuery),
    responses((status = 200, body = Vec<AuditEntry>), (status = 403, body = ErrorBody)))]
async fn list_audit(
    State(sm): State<AppState>,
    caller: Caller,
    ApiQuery(q): ApiQuery<AuditQuery>,
) -> ApiResult<Json<Vec<AuditEntry>>> {
    caller.require(Role::Admin)?;
    blocking(move || {
        let after = q.after.unwrap_or(0);
        let mut all = sm.with_store(|s| s.audit.list())?;
        all.retain(|e| e.seq > after || (after == 0 && e.seq == 0));
        all.truncate(q.limit.unwrap_or(1000));
        Ok(Json(all))
    })
    .await
}

/// What `reclaim` did.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Reclaimed {
    pub generation: u64,
    /// Checkpoint ids from now on are above this.
    pub checkpoint_floor: u64,
}

/// After a restore from a backup: raises the manager generation above
/// every generation and the next checkpoint id above every checkpoint the
/// connected VDSAs report, so that they obey this site manager again.
#[utoipa::path(post, path = "/api/v1/site/reclaim", tag = "site",
    responses((status = 200, body = Reclaimed), (status = 403, body = ErrorBody)))]
async fn reclaim(State(sm): State<AppState>, caller: Caller) -> ApiResult<Json<Reclaimed>> {
    caller.require(Role::Admin)?;
    blocking(move || {
        let (generation, floor) = sm.reclaim()?;
        Ok(Json(Reclaimed { generation, checkpoint_floor: floor }))
    })
    .await
}

/// How this site reaches vCenter (the password is never returned).
#[utoipa::path(get, path = "/api/v1/site/vcenter", tag = "site",
    responses((status = 200, body = crate::model::VcenterSettings), (status = 404, body = ErrorBody)))]
async fn get_vcenter(State(sm): State<AppState>, caller: Caller) -> ApiResult<Json<crate::model::VcenterSettings>> {
    caller.require(Role::Admin)?;
    blocking(move || {
        let mut v = sm
            .with_store(|s| s.vcenter.get(crate::deploy::VCENTER_KEY))?
            .ok_or_else(|| ApiError::NotFound("no vCenter is set".into()))?;
        v.password.clear();
        Ok(Json(v))
    })
    .await
}

/// Sets how this site reaches vCenter and the VDSA OVA it deploys.
#[utoipa::path(put, path = "/api/v1/site/vcenter", tag = "site", request_body = crate::model::VcenterSettings,
    responses((status = 200, body = crate::model::VcenterSettings), (status = 400, body = ErrorBody)))]
async fn set_vcenter(
    State(sm): State<AppState>,
    caller: Caller,
    ApiJson(v): ApiJson<crate::model::VcenterSettings>,
) -> ApiResult<Json<crate::model::VcenterSettings>> {
    caller.require(Role::Admin)?;
    if !v.url.starts_with("https://") {
        return Err(ApiError::bad("url", "url: must be https://HOST/sdk"));
    }
    if v.ca_pem.is_empty() && v.thumbprint.is_empty() {
        return Err(ApiError::bad("thumbprint", "thumbprint: give the certificate's thumbprint or ca_pem"));
    }
    if !v.thumbprint.is_empty() {
        vsphere_client::ServerTrust::thumbprint(&v.thumbprint)
            .map_err(|e| ApiError::bad("thumbprint", format!("thumbprint: {e}")))?;
    }
    if !v.ca_pem.is_empty() {
        vsphere_client::ServerTrust::ca_pem(v.ca_pem.as_bytes())
            .map_err(|e| ApiError::bad("ca_pem", format!("ca_pem: {e}")))?;
    }
    if !v.ova_path.is_empty() && !std::path::Path::new(&v.ova_path).is_file() {
        return Err(ApiError::bad("ova_path", format!("ova_path: {} is not a file here", v.ova_path)));
    }
    blocking(move || {
        sm.with_store(|s| {
            s.vcenter.put(crate::deploy::VCENTER_KEY, &v)?;
            s.flush()
        })?;
        let mut shown = v;
        shown.password.clear();
        Ok(Json(shown))
    })
    .await
}
