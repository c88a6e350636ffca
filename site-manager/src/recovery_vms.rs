//! The hypervisor adapter's part of a failover test or a failover on
//! vSphere recovery hosts: once a test's stacks run, its VMs are made from
//! the VPG's definition (one per protected VM that recovers to a vSphere
//! host, its disks sized as the protected ones, each disk's export named in
//! its extra config), attached to the test's network (an isolated one made
//! per test unless the named network exists) or the failover network,
//! re-addressed by guest customisation, and powered on in the VPG's boot
//! order; when the test stops or the failover is rolled back they are
//! powered off and removed, with the network made for them.
//!
//! The vCenter calls block, so each job runs on its own thread; the
//! reconciler is the only writer of a test's record: a job leaves its
//! result here and the next reconciler pass stores it
//! (docs/recovery.md, "Recovery VMs on vSphere").

use std::sync::Arc;
use std::time::Duration;

use protection_groups::{StackId, VmNetwork};

use crate::model::{
    FailoverTest, Hypervisor, RecoveryVm, RecoveryVms, RecoveryVmsPhase, StackPurpose, TestState, VcenterSettings,
};
use crate::state::SiteManager;
use crate::vsphere::{RecoveryVmSpec, VsphereSite};

/// Whether a test's VMs still exist (or may): its record may not become
/// a stopped one yet.
pub fn still_there(r: &RecoveryVms) -> bool {
    !matches!(r.phase, RecoveryVmsPhase::None | RecoveryVmsPhase::Removed)
}

/// Whether the test is ready as far as its VMs go: they run, or making
/// them ended (a failure is the start task's error).
pub fn settled(r: &RecoveryVms) -> bool {
    r.phase != RecoveryVmsPhase::Creating
}

/// Steps test `t` (whose next record is `next`) towards its VMs' desired
/// state: made while it runs, removed once it does not.
pub fn advance(sm: &Arc<SiteManager>, t: &FailoverTest, next: &mut FailoverTest) {
    let jobs = sm.recovery_vms.clone();
    if let Some(r) = jobs.take_done(t.id) {
        next.recovery_vms = r;
    }
    if jobs.in_flight(t.id) {
        return;
    }
    let phase = next.recovery_vms.phase;
    let wanted = next.serves();
    // Made once the stacks run; made again when a site manager restart
    // lost the job (it first removes what the lost one made).
    let just_running = next.state == TestState::Running && t.state == TestState::Starting;
    let make = wanted && (phase == RecoveryVmsPhase::Creating || (phase == RecoveryVmsPhase::None && just_running));
    match (wanted, phase) {
        _ if make => match plan(sm, next) {
            Ok(Some(work)) => {
                next.recovery_vms.phase = RecoveryVmsPhase::Creating;
                let sm = sm.clone();
                jobs.spawn(t.id, move || work.create(), move || sm.changed());
            }
            Ok(None) => next.recovery_vms.phase = RecoveryVmsPhase::None,
            Err(e) => {
                next.recovery_vms.phase = RecoveryVmsPhase::Failed;
                next.recovery_vms.detail = e;
            }
        },
        (false, RecoveryVmsPhase::Creating | RecoveryVmsPhase::Ready | RecoveryVmsPhase::Failed)
        | (_, RecoveryVmsPhase::Removing) => {
            next.recovery_vms.phase = RecoveryVmsPhase::Removing;
            let (id, made) = (t.id, next.recovery_vms.made_network.clone());
            match vcenter(sm) {
                Ok(v) => {
                    let sm = sm.clone();
                    jobs.spawn(t.id, move || remove(&v, id, made), move || sm.changed())
                }
                // Without a vCenter none were made.
                Err(_) if phase == RecoveryVmsPhase::Failed => next.recovery_vms.phase = RecoveryVmsPhase::Removed,
                // Set back to the vCenter that has them: tried again then.
                Err(e) => next.recovery_vms.detail = e,
            }
        }
        _ => {}
    }
}

/// The VMs to make for a test, or None if no VM recovers to vSphere.
struct Creation {
    vcenter: VcenterSettings,
    test: StackId,
    purpose: StackPurpose,
    /// (spec, boot delay, network settings) in boot order.
    vms: Vec<(RecoveryVmSpec, Duration, protection_groups::VmId)>,
    hosts: Vec<String>,
}

fn vcenter(sm: &SiteManager) -> Result<VcenterSettings, String> {
    sm.with_store(|s| s.vcenter.get(crate::deploy::VCENTER_KEY))
        .map_err(|e| e.to_string())?
        .ok_or_else(|| "the VPG recovers to vSphere hosts but no vCenter is set: PUT /api/v1/site/vcenter".into())
}

fn plan(sm: &SiteManager, t: &FailoverTest) -> Result<Option<Creation>, String> {
    let (vpg, hosts) =
        sm.with_store(|s| Ok((s.vpg_or_copy(t.vpg)?, s.hosts.list()?))).map_err(|e| format!("reading the VPG: {e}"))?;
    let (vpg, _) = vpg.ok_or_else(|| format!("VPG {} is gone", t.vpg))?;
    // Markers and names carry the record's id as the API shows it.
    let marker = t.id.0.to_string();
    let short = &marker[..8];
    let mut vms = Vec::new();
    let mut on_hosts = Vec::new();
    for vm in &vpg.settings.vms {
        let Some(host) = hosts.iter().find(|h| h.id == vm.recovery_host && h.hypervisor == Hypervisor::Vsphere) else {
            continue;
        };
        let net = t.vm_networks.iter().find(|n| n.vm == vm.id).map(|n| n.settings.clone()).unwrap_or_default();
        let customization = customization(&vm.name, &net)?;
        let mut extra_config = Vec::new();
        for d in &vm.disks {
            if let Some(e) = t.exports.iter().find(|e| e.disk == d.id) {
                extra_config.push((format!("vdsa.export.{}", d.id.0), e.uri.clone()));
            }
        }
        let name = match t.purpose {
            StackPurpose::Test => format!("{} - test {short}", vm.name),
            StackPurpose::Failover => vm.name.clone(),
        };
        vms.push((
            RecoveryVmSpec {
                name,
                host: host.name.clone(),
                datastore: vm.recovery_datastore.clone(),
                guest_id: "otherLinux64Guest".into(),
                cpus: 1,
                memory_mb: 1024,
                disks: vm.disks.iter().map(|d| d.size_bytes).collect(),
                networks: vec![net.network.clone()],
                boot_group: vms.len() as u32,
                test_id: Some(marker.clone()),
                extra_config,
                customization,
            },
            Duration::from_secs(u64::from(vm.boot_delay_secs)),
            vm.id,
        ));
        if !on_hosts.contains(&host.name) {
            on_hosts.push(host.name.clone());
        }
    }
    if vms.is_empty() {
        return Ok(None);
    }
    Ok(Some(Creation { vcenter: vcenter(sm)?, test: t.id, purpose: t.purpose, vms, hosts: on_hosts }))
}

/// Guest customisation for `net`, or None where the VM keeps its address.
fn customization(vm_name: &str, net: &VmNetwork) -> Result<Option<vsphere_client::Customization>, String> {
    let Some(ip) = net.static_ipv4()? else {
        return Ok(None);
    };
    Ok(Some(vsphere_client::Customization {
        // vSphere refuses a host name that starts with a hyphen.
        host_name: protection_groups::host_name(vm_name).trim_start_matches('-').to_string(),
        domain: "localdomain".into(),
        dns_servers: ip.dns.clone(),
        nics: vec![vsphere_client::NicIp::Fixed {
            address: ip.address,
            netmask: ip.netmask,
            gateway: ip.gateway,
            dns: ip.dns,
        }],
    }))
}

impl Creation {
    fn create(mut self) -> RecoveryVms {
        let mut out = RecoveryVms { phase: RecoveryVmsPhase::Creating, ..RecoveryVms::default() };
        let r = self.try_create(&mut out);
        match r {
            Ok(()) => out.phase = RecoveryVmsPhase::Ready,
            Err(e) => {
                tracing::warn!(test = %self.test, error = %e, "recovery VMs could not be made");
                // Nothing half-made stays behind.
                let removed = remove(&self.vcenter, self.test, out.made_network.take());
                out = RecoveryVms { phase: RecoveryVmsPhase::Failed, detail: e, ..RecoveryVms::default() };
                if removed.phase != RecoveryVmsPhase::Removed {
                    out.detail = format!("{}; removing what was made: {}", out.detail, removed.detail);
                }
            }
        }
        out
    }

    fn try_create(&mut self, out: &mut RecoveryVms) -> Result<(), String> {
        let site = crate::deploy::connect(&self.vcenter)?;
        let test = self.test.0.to_string();
        // What an earlier, interrupted job made.
        site.remove_test_vms(&test).map_err(|e| format!("removing an earlier attempt's VMs: {e}"))?;
        if self.purpose == StackPurpose::Test {
            self.isolate(&site, out)?;
        }
        let mut order = Vec::new();
        for (spec, delay, vm) in &self.vms {
            let moref = site.create_recovery_vm(spec).map_err(|e| format!("creating VM {:?}: {e}", spec.name))?;
            out.vms.push(RecoveryVm {
                vm: *vm,
                name: spec.name.clone(),
                moref: moref.value.clone(),
                host: spec.host.clone(),
                network: spec.networks.first().cloned().unwrap_or_default(),
                powered_on: None,
                customized: spec.customization.is_some(),
            });
            order.push((moref, *delay));
        }
        let records = site.power_on_in_order(&order).map_err(|e| format!("powering the VMs on: {e}"))?;
        for (v, r) in out.vms.iter_mut().zip(records) {
            v.powered_on = r.complete_time.or(r.start_time);
        }
        if let Err(e) = site.logout() {
            tracing::debug!(error = %e, "vCenter logout");
        }
        tracing::info!(test = %self.test, vms = out.vms.len(), "recovery VMs powered on in boot order");
        Ok(())
    }

    /// A test's VMs join the named network if it exists (the operator's
    /// own isolated network), else one made for this test alone, so that
    /// parallel tests of the same VMs (same addresses) never share one.
    fn isolate(&mut self, site: &VsphereSite, out: &mut RecoveryVms) -> Result<(), String> {
        let short = self.test.0.to_string()[..8].to_string();
        let mut made: Option<String> = None;
        for (spec, _, _) in &mut self.vms {
            let wanted = spec.networks.first().cloned().unwrap_or_default();
            if !wanted.is_empty() && site.network_exists(&wanted).map_err(|e| e.to_string())? {
                continue;
            }
            let name = made.get_or_insert_with(|| {
                format!("{}-{short}", if wanted.is_empty() { "vdsa-test" } else { wanted.as_str() })
            });
            if out.made_network.is_none() {
                site.create_test_network(name, &self.hosts)
                    .map_err(|e| format!("making the isolated test network {name:?}: {e}"))?;
                out.made_network = Some(name.clone());
            }
            spec.networks = vec![name.clone()];
        }
        Ok(())
    }
}

/// Powers off and removes test `id`'s VMs and the network made for it.
fn remove(v: &VcenterSettings, id: StackId, made_network: Option<String>) -> RecoveryVms {
    let r = (|| -> Result<(), String> {
        let site = crate::deploy::connect(v)?;
        let removed = site.remove_test_vms(&id.0.to_string()).map_err(|e| format!("removing the VMs: {e}"))?;
        if let Some(name) = &made_network {
            let hosts: Vec<String> = site.hosts().map_err(|e| e.to_string())?.into_iter().map(|h| h.host).collect();
            let net = site.find_test_network(name, &hosts).map_err(|e| e.to_string())?;
            site.remove_test_network(&net).map_err(|e| format!("removing the test network {name:?}: {e}"))?;
        }
        if let Err(e) = site.logout() {
            tracing::debug!(error = %e, "vCenter logout");
        }
        tracing::info!(test = %id, vms = removed.len(), "recovery VMs removed");
        Ok(())
    })();
    match r {
        Ok(()) => RecoveryVms { phase: RecoveryVmsPhase::Removed, ..RecoveryVms::default() },
        Err(detail) => {
            tracing::warn!(test = %id, error = %detail, "recovery VMs could not be removed; trying again");
            // Tried again at the next pass, not at once.
            std::thread::sleep(Duration::from_secs(5));
            RecoveryVms { phase: RecoveryVmsPhase::Removing, made_network, detail, vms: Vec::new() }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn re_ip_settings_become_a_customisation() {
        let net = VmNetwork {
            network: "dr".into(),
            address: "10.1.2.3/24".into(),
            gateway: "10.1.2.1".into(),
            dns: vec!["10.0.0.53".into()],
        };
        let c = customization("web 1", &net).ok().flatten().expect("a customisation");
        assert_eq!(c.host_name, "web1");
        assert_eq!(
            c.nics,
            vec![vsphere_client::NicIp::Fixed {
                address: [10, 1, 2, 3].into(),
                netmask: [255, 255, 255, 0].into(),
                gateway: Some([10, 1, 2, 1].into()),
                dns: vec![[10, 0, 0, 53].into()],
            }]
        );
        let kept = VmNetwork { address: String::new(), gateway: String::new(), dns: Vec::new(), ..net };
        assert_eq!(customization("a", &kept), Ok(None));
    }
}
