//! Deploying and undeploying a vSphere host's VDSA as tasks: the site
//! manager mints the host's registration token, deploys the OVA through
//! the vSphere adapter with it in the appliance's properties, and reports
//! the upload as the task's progress. The host shows installing until the
//! VDSA registers (docs/api.md "Hosts").

use crate::model::{
    now_ms, CompletionCode, DeployVdsa, Host, Hypervisor, Task, TaskDriver, VcenterSettings, VdsaState,
};
use crate::pki::sha256_hex;
use crate::state::{new_secret, SiteManager};
use crate::store::StoredRegistration;
use crate::vsphere::{DeployEvent, DeployRequest, DeploySettings, VsphereSite};
use std::sync::Arc;

/// A registration token is good for this long.
pub const REGISTRATION_VALID_MS: u64 = 24 * 3600 * 1000;

/// Key of the vCenter settings in the `settings` tree.
pub const VCENTER_KEY: &[u8] = b"vcenter";

/// Mints a one-time registration token for `h`'s VDSA and marks the host
/// installing. Returns `SECRET.CA_SHA256` and when it expires.
pub fn mint_registration(sm: &SiteManager, h: &mut Host) -> Result<(String, u64), crate::store::StoreError> {
    let secret = new_secret();
    let expires_ms = now_ms() + REGISTRATION_VALID_MS;
    let reg = StoredRegistration { host: h.id, expires_ms, used: false };
    sm.with_store(|s| s.registrations.put(sha256_hex(secret.as_bytes()).as_bytes(), &reg))?;
    h.vdsa = VdsaState::Installing;
    h.vdsa_reason = None;
    sm.with_store(|s| {
        s.hosts.put(h.id.as_bytes(), h)?;
        s.flush()
    })?;
    Ok((format!("{secret}.{}", sm.pki.ca_sha256()), expires_ms))
}

/// The KVM deploy's task: it ends when the VDSA given the host's newest
/// registration token has registered and reported.
const REGISTER_TASK: &str = "register_vdsa";

/// Starts the task that waits for `h`'s VDSA to register; an older one of
/// the host is aborted (its token was superseded).
pub fn start_register_wait(sm: &SiteManager, h: &Host) -> Result<Task, crate::store::StoreError> {
    for t in sm.with_store(|s| s.tasks.list())? {
        if t.kind == REGISTER_TASK && t.host == Some(h.id) && !t.is_finished() {
            let why = "a newer registration token was made for the host".to_string();
            sm.finish_task(t.id, CompletionCode::Aborted, serde_json::Value::Null, Some(why))?;
        }
    }
    sm.start_task(
        REGISTER_TASK,
        format!("wait for the VDSA of {} to register", h.name),
        None,
        Some(h.id),
        TaskDriver::Vdsa,
    )
}

/// `h`'s VDSA has registered and reported: its waiting task succeeds.
pub fn finish_register_wait(sm: &SiteManager, h: &Host) -> Result<(), crate::store::StoreError> {
    for t in sm.with_store(|s| s.tasks.list())? {
        if t.kind == REGISTER_TASK && t.host == Some(h.id) && !t.is_finished() {
            let result = serde_json::json!({"host": h.id, "software_version": h.software_version});
            sm.finish_task(t.id, CompletionCode::Success, result, None)?;
        }
    }
    Ok(())
}

/// Fails the waits whose registration token expired before its VDSA
/// registered (the host shows Failed with the reason; a deploy makes a new
/// token). Returns how many it failed.
pub fn expire_register_waits(sm: &SiteManager) -> Result<usize, crate::store::StoreError> {
    let mut failed = 0;
    for t in sm.with_store(|s| s.tasks.list())? {
        if t.kind != REGISTER_TASK || t.is_finished() || t.started_ms + REGISTRATION_VALID_MS > now_ms() {
            continue;
        }
        let why = format!(
            "the registration token expired after {} h before the VDSA registered; deploy again for a new one",
            REGISTRATION_VALID_MS / 3_600_000
        );
        sm.finish_task(t.id, CompletionCode::Failed, serde_json::Value::Null, Some(why.clone()))?;
        if let Some(h) = t.host {
            let waiting = sm
                .with_store(|s| s.hosts.get(h.as_bytes()))?
                .is_some_and(|h| matches!(h.vdsa, VdsaState::Installing | VdsaState::Booting));
            if waiting {
                set_host_state(sm, h, VdsaState::Failed, Some(why.clone()));
            }
        }
        failed += 1;
    }
    Ok(failed)
}

pub(crate) fn connect(v: &VcenterSettings) -> Result<VsphereSite, String> {
    let trust = if !v.thumbprint.is_empty() {
        vsphere_client::ServerTrust::thumbprint(&v.thumbprint).map_err(|e| e.to_string())?
    } else if !v.ca_pem.is_empty() {
        vsphere_client::ServerTrust::ca_pem(v.ca_pem.as_bytes()).map_err(|e| e.to_string())?
    } else {
        return Err("the vCenter settings name neither a CA nor a thumbprint".into());
    };
    VsphereSite::connect(&v.url, trust, &v.user, &v.password).map_err(|e| format!("vCenter {}: {e}", v.url))
}

fn set_host_state(sm: &SiteManager, id: protection_groups::HostId, state: VdsaState, reason: Option<String>) {
    let r = sm.with_store(|s| {
        if let Some(mut h) = s.hosts.get(id.as_bytes())? {
            h.vdsa = state;
            h.vdsa_reason = reason;
            s.hosts.put(id.as_bytes(), &h)?;
            s.flush()?;
        }
        Ok(())
    });
    if let Err(e) = r {
        tracing::error!(host = %id, error = %e, "cannot record the host's VDSA state");
    }
}

/// Starts the deploy of `h`'s VDSA as a task.
pub fn start_deploy(
    sm: &Arc<SiteManager>,
    mut h: Host,
    vcenter: VcenterSettings,
    req: DeployVdsa,
) -> Result<Task, crate::store::StoreError> {
    let task = sm.start_task(
        "deploy_vdsa",
        format!("deploy the VDSA to {}", h.name),
        None,
        Some(h.id),
        TaskDriver::SiteManager,
    )?;
    let (token, _) = mint_registration(sm, &mut h)?;
    let (sm, id) = (sm.clone(), task.id);
    std::thread::spawn(move || {
        let settings = DeploySettings {
            datastore: req.datastore,
            network: req.network,
            ip: req.ip,
            netmask: req.netmask,
            gateway: req.gateway,
            dns: req.dns,
            site_manager: sm.management_address(),
            registration_token: token,
        };
        let outcome = connect(&vcenter).and_then(|site| {
            let ova = vsphere_client::Ova::open(std::path::Path::new(&vcenter.ova_path))
                .map_err(|e| format!("the OVA {}: {e}", vcenter.ova_path))?;
            let request = DeployRequest { host: h.name.clone(), ip: req.ip, settings };
            let progress = |e: DeployEvent| {
                if let DeployEvent::Uploading { done, total } = e {
                    let pct = u8::try_from(done.saturating_mul(95).checked_div(total).unwrap_or(0)).unwrap_or(95);
                    let _ = sm.update_task(id, |t| t.progress = pct);
                }
            };
            let vm = site.deploy(&ova, &request, &progress).map_err(|e| e.to_string());
            let _ = site.logout();
            vm
        });
        match outcome {
            Ok(vm) => {
                // Installed only once the appliance has booted, registered
                // and reported: a task of the VDSA's waits for that.
                tracing::info!(host = %h.name, vm = ?vm, "VDSA deployed; waiting for it to boot and register");
                set_host_state(&sm, h.id, VdsaState::Booting, None);
                let wait = start_register_wait(&sm, &h).map(|t| t.id.to_string()).unwrap_or_default();
                let result = serde_json::json!({"vm": vm.value, "register_task": wait});
                let _ = sm.finish_task(id, CompletionCode::Success, result, None);
            }
            Err(e) => {
                tracing::error!(host = %h.name, error = %e, "VDSA deploy failed");
                set_host_state(&sm, h.id, VdsaState::Failed, Some(e.clone()));
                let _ = sm.finish_task(id, CompletionCode::Failed, serde_json::Value::Null, Some(e));
            }
        }
    });
    Ok(task)
}

/// Starts the undeploy of `h`'s VDSA as a task.
pub fn start_undeploy(
    sm: &Arc<SiteManager>,
    h: Host,
    vcenter: VcenterSettings,
) -> Result<Task, crate::store::StoreError> {
    let task = sm.start_task(
        "undeploy_vdsa",
        format!("undeploy the VDSA of {}", h.name),
        None,
        Some(h.id),
        TaskDriver::SiteManager,
    )?;
    set_host_state(sm, h.id, VdsaState::Uninstalling, None);
    let (sm, id) = (sm.clone(), task.id);
    std::thread::spawn(move || {
        let outcome = connect(&vcenter).and_then(|site| {
            let r = site.undeploy(&h.name).map_err(|e| e.to_string());
            let _ = site.logout();
            r
        });
        match outcome {
            Ok(()) => {
                set_host_state(&sm, h.id, VdsaState::NotInstalled, None);
                let _ = sm.finish_task(id, CompletionCode::Success, serde_json::json!({"host": h.name}), None);
            }
            Err(e) => {
                set_host_state(&sm, h.id, h.vdsa, Some(format!("the undeploy failed: {e}")));
                let _ = sm.finish_task(id, CompletionCode::Failed, serde_json::Value::Null, Some(e));
            }
        }
    });
    Ok(task)
}

/// Whether a host can take a vSphere deploy.
pub fn check_vsphere(h: &Host) -> Result<(), String> {
    if h.hypervisor != Hypervisor::Vsphere {
        return Err(format!(
            "host {} is a {:?} host: its VDSA is installed with its deb and a registration token",
            h.name, h.hypervisor
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Host, Hypervisor};

    /// A KVM deploy whose VDSA never registers: once its token expired,
    /// the wait fails with the reason and the host shows Failed with it; a
    /// wait still within its token's life is left running.
    #[test]
    fn a_wait_whose_registration_token_expired_fails_and_the_host_goes_back() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let config = crate::state::ServeConfig {
            data: dir.path().to_path_buf(),
            api_listen: ([127, 0, 0, 1], 1).into(),
            management_listen: ([127, 0, 0, 1], 2).into(),
            unsafe_no_barrier: false,
            fault_kill_after_prepare: 0,
        };
        let sm = crate::server::open(config, "test").unwrap_or_else(|e| panic!("{e:#}"));
        let mut hosts = Vec::new();
        for name in ["old", "new"] {
            let mut h = Host::new(name.into(), Hypervisor::Kvm);
            mint_registration(&sm, &mut h).unwrap_or_else(|e| panic!("{e}"));
            let t = start_register_wait(&sm, &h).unwrap_or_else(|e| panic!("{e}"));
            hosts.push((h, t));
        }
        // The first wait started longer ago than a token lives.
        let mut old = hosts[0].1.clone();
        old.started_ms -= REGISTRATION_VALID_MS + 1;
        sm.with_store(|s| s.tasks.put(old.id.as_bytes(), &old)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(expire_register_waits(&sm).unwrap_or_else(|e| panic!("{e}")), 1);
        let task = |id: uuid::Uuid| sm.with_store(|s| s.tasks.get(id.as_bytes())).ok().flatten();
        let host = |h: &Host| sm.with_store(|s| s.hosts.get(h.id.as_bytes())).ok().flatten().map(|h| h.vdsa);
        let t = task(old.id).unwrap_or_else(|| panic!("the task is gone"));
        assert_eq!(t.completion, CompletionCode::Failed);
        assert!(t.exception.as_deref().is_some_and(|e| e.contains("expired")), "{t:?}");
        assert_eq!(host(&hosts[0].0), Some(VdsaState::Failed));
        let reason =
            sm.with_store(|s| s.hosts.get(hosts[0].0.id.as_bytes())).ok().flatten().and_then(|h| h.vdsa_reason);
        assert!(reason.is_some_and(|r| r.contains("expired")), "the host names why");
        assert!(task(hosts[1].1.id).is_some_and(|t| !t.is_finished()), "a live wait was ended");
        assert_eq!(host(&hosts[1].0), Some(VdsaState::Installing));
    }
}
