//! The vSphere hypervisor adapter: what the site manager does to a vCenter.
//!
//! - VDSAs: list hosts with their VDSA state, deploy the VDSA OVA to a host
//!   or to every host of a cluster in parallel with progress, undeploy.
//!   The state lives on the VDSA VM itself, in extra-config markers the
//!   deploy sets as the VM is created (so no VDSA VM is ever unmarked).
//! - Protection: VMs with their disks.
//! - Recovery (`recovery`): recovery VMs from specs with guest
//!   customisation, powered on in boot order; isolated test networks (a
//!   switch without uplinks per host) and removal of a test's VMs.
//!
//! It talks only through `vsphere_client`; it must not move disk data.

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use vsphere_client::{
    Client, ImportProgress, ImportTarget, Inventory, MoRef, Ova, ServerTrust, VirtualDiskInfo, Vm, VmChange,
};

/// Extra-config keys the product sets on the VMs it owns.
pub const MARK_ROLE: &str = "vdsa.role";
pub const MARK_STATE: &str = "vdsa.state";
pub const MARK_HOST: &str = "vdsa.host";
pub const MARK_TEST: &str = "vdsa.test";
pub const MARK_BOOT_GROUP: &str = "vdsa.bootGroup";
const ROLE_VDSA: &str = "vdsa";
const ROLE_RECOVERY: &str = "recovery";

mod recovery;
pub use recovery::{PowerOnRecord, RecoveryVmSpec, TestNetwork};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Vsphere(#[from] vsphere_client::Error),
    #[error("host {host} already has a VDSA ({vm}); undeploy it first")]
    AlreadyDeployed { host: String, vm: String },
    #[error("host {host} has no VDSA to undeploy")]
    NotDeployed { host: String },
    #[error("a network named {name:?} exists already; a test network must not share a name with a real one")]
    NetworkExists { name: String },
    #[error("bad settings: {0}")]
    Settings(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Where a host's VDSA is, as its marker says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VdsaState {
    NotInstalled,
    Installing,
    Installed,
    Uninstalling,
}

impl std::fmt::Display for VdsaState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            VdsaState::NotInstalled => "not installed",
            VdsaState::Installing => "installing",
            VdsaState::Installed => "installed",
            VdsaState::Uninstalling => "uninstalling",
        })
    }
}

/// A host and its VDSA.
#[derive(Debug, Clone)]
pub struct HostVdsa {
    pub host: String,
    pub host_ref: MoRef,
    pub cluster: Option<String>,
    pub datacenter: String,
    pub state: VdsaState,
    pub vm: Option<Vm>,
}

/// Network and site settings for deploying VDSAs.
#[derive(Debug, Clone)]
pub struct DeploySettings {
    pub datastore: String,
    pub network: String,
    /// The first host's address; the next hosts of a cluster get the
    /// following ones, in host name order.
    pub ip: Ipv4Addr,
    pub netmask: Ipv4Addr,
    pub gateway: Option<Ipv4Addr>,
    pub dns: Vec<Ipv4Addr>,
    pub site_manager: String,
    pub registration_token: String,
}

/// One host's deploy, as planned.
#[derive(Debug, Clone)]
pub struct DeployRequest {
    pub host: String,
    pub ip: Ipv4Addr,
    pub settings: DeploySettings,
}

/// Progress of one host's deploy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeployEvent {
    Preparing,
    Uploading { done: u64, total: u64 },
    PoweringOn,
    Installed { vm: String },
    Failed { error: String },
}

/// A VM with its disks, for protection groups.
#[derive(Debug, Clone)]
pub struct VmDisks {
    pub vm: MoRef,
    pub name: String,
    pub host: Option<String>,
    pub power_state: String,
    pub disks: Vec<VirtualDiskInfo>,
}

/// A vCenter, from the site manager's side.
#[derive(Debug, Clone)]
pub struct VsphereSite {
    client: Arc<Client>,
}

impl VsphereSite {
    /// Connects and logs in.
    pub fn connect(url: &str, trust: ServerTrust, user: &str, password: &str) -> Result<Self> {
        let client = Client::connect(url, trust)?;
        client.login(user, password)?;
        Ok(VsphereSite { client: Arc::new(client) })
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    pub fn logout(&self) -> Result<()> {
        Ok(self.client.logout()?)
    }

    /// Every host with its VDSA state.
    pub fn hosts(&self) -> Result<Vec<HostVdsa>> {
        let inv = self.client.inventory()?;
        let vms = self.client.vms()?;
        Ok(hosts_with_vdsas(&inv, &vms))
    }

    /// One deploy request per host of `cluster`, with consecutive addresses.
    pub fn plan_cluster(&self, cluster: &str, settings: &DeploySettings) -> Result<Vec<DeployRequest>> {
        let inv = self.client.inventory()?;
        let c = inv.cluster(cluster)?;
        let hosts = inv.hosts_of(c);
        let mask = u32::from(settings.netmask);
        let first = u32::from(settings.ip);
        let subnet = first & mask;
        let broadcast = subnet | !mask;
        let mut out = Vec::new();
        for (i, h) in hosts.iter().enumerate() {
            // Every address in the subnet, neither its network nor its
            // broadcast address.
            let ip = first
                .checked_add(i as u32)
                .filter(|ip| ip & mask == subnet && *ip != subnet && (*ip != broadcast || mask == u32::MAX))
                .map(Ipv4Addr::from)
                .ok_or_else(|| {
                    Error::Settings(format!(
                        "{} hosts from {} leave the subnet {}/{} at host {}",
                        hosts.len(),
                        settings.ip,
                        Ipv4Addr::from(subnet),
                        mask.count_ones(),
                        h.name
                    ))
                })?;
            out.push(DeployRequest { host: h.name.clone(), ip, settings: settings.clone() });
        }
        Ok(out)
    }

    /// Deploys the VDSA to one host: import (marked installing), power on,
    /// mark installed. A VDSA left `installing` or `uninstalling` by an
    /// interrupted run is removed first.
    pub fn deploy(&self, ova: &Ova, req: &DeployRequest, progress: &(dyn Fn(DeployEvent) + Sync)) -> Result<MoRef> {
        let inv = self.client.inventory()?;
        let vms = self.client.vms()?;
        self.deploy_with(&inv, &vms, ova, req, progress)
    }

    /// Deploys to several hosts, `parallel` at a time; one result per host,
    /// in the order given. Progress names the host.
    pub fn deploy_many(
        &self,
        ova: &Ova,
        reqs: &[DeployRequest],
        parallel: usize,
        progress: &(dyn Fn(&str, DeployEvent) + Sync),
    ) -> Result<Vec<(String, Result<MoRef>)>> {
        let inv = self.client.inventory()?;
        let vms = self.client.vms()?;
        let next = AtomicUsize::new(0);
        let results: Mutex<Vec<Option<Result<MoRef>>>> = Mutex::new((0..reqs.len()).map(|_| None).collect());
        std::thread::scope(|s| {
            for _ in 0..parallel.max(1).min(reqs.len().max(1)) {
                s.spawn(|| loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(req) = reqs.get(i) else { return };
                    let r = self.deploy_with(&inv, &vms, ova, req, &|e| progress(&req.host, e));
                    results.lock().unwrap_or_else(|p| p.into_inner())[i] = Some(r);
                });
            }
        });
        let results = results.into_inner().unwrap_or_else(|p| p.into_inner());
        Ok(reqs
            .iter()
            .zip(results)
            .map(|(r, res)| {
                let res = res.unwrap_or_else(|| Err(Error::Settings("the deploy did not run".into())));
                (r.host.clone(), res)
            })
            .collect())
    }

    fn deploy_with(
        &self,
        inv: &Inventory,
        vms: &[Vm],
        ova: &Ova,
        req: &DeployRequest,
        progress: &(dyn Fn(DeployEvent) + Sync),
    ) -> Result<MoRef> {
        let r = self.deploy_inner(inv, vms, ova, req, progress);
        match &r {
            Ok(vm) => progress(DeployEvent::Installed { vm: vm.value.clone() }),
            Err(e) => progress(DeployEvent::Failed { error: e.to_string() }),
        }
        r
    }

    fn deploy_inner(
        &self,
        inv: &Inventory,
        vms: &[Vm],
        ova: &Ova,
        req: &DeployRequest,
        progress: &(dyn Fn(DeployEvent) + Sync),
    ) -> Result<MoRef> {
        let s = &req.settings;
        let host = inv.host(&req.host)?;
        let datastore = inv.datastore_for(host, &s.datastore)?;
        let network = inv.network_for(host, &s.network)?;
        let dc = inv.datacenter_of(host)?;
        let pool = inv.resource_pool_of(host)?;
        if let Some(existing) = vdsa_of(vms, &host.moref) {
            match state_of(existing) {
                VdsaState::Installed => {
                    return Err(Error::AlreadyDeployed { host: host.name.clone(), vm: existing.name.clone() })
                }
                _ => {
                    tracing::info!(host = %host.name, vm = %existing.name, "removing a VDSA an interrupted run left");
                    self.client.power_off_and_destroy(&existing.moref)?;
                }
            }
        }
        let ovf_network = ova.networks.first().cloned().unwrap_or_default();
        let dns = s.dns.iter().map(Ipv4Addr::to_string).collect::<Vec<_>>().join(",");
        let target = ImportTarget {
            name: format!("VDSA-{}", host.name),
            host: host.moref.clone(),
            resource_pool: pool,
            folder: dc.vm_folder.clone(),
            datastore: datastore.moref.clone(),
            network_mapping: vec![(ovf_network, network.moref.clone())],
            properties: vec![
                ("ip".into(), req.ip.to_string()),
                ("netmask".into(), s.netmask.to_string()),
                ("gateway".into(), s.gateway.map(|g| g.to_string()).unwrap_or_default()),
                ("dns".into(), dns),
                ("site_manager".into(), s.site_manager.clone()),
                ("registration_token".into(), s.registration_token.clone()),
            ],
            extra_config: vec![
                (MARK_ROLE.into(), ROLE_VDSA.into()),
                (MARK_STATE.into(), "installing".into()),
                (MARK_HOST.into(), host.moref.value.clone()),
            ],
        };
        let vm = self.client.import_ova(ova, &target, &|p| match p {
            ImportProgress::Preparing | ImportProgress::Completing => progress(DeployEvent::Preparing),
            ImportProgress::Uploading { done, total } => progress(DeployEvent::Uploading { done, total }),
        })?;
        // Marked installed only once it runs: a VDSA that failed to start
        // stays `installing`, and the next deploy replaces it.
        progress(DeployEvent::PoweringOn);
        self.client.power_on(&vm)?;
        self.client.reconfigure_vm(
            &vm,
            &VmChange { extra_config: vec![(MARK_STATE.into(), "installed".into())], ..Default::default() },
        )?;
        Ok(vm)
    }

    /// Marks the host's VDSA uninstalling, powers it off and removes it.
    pub fn undeploy(&self, host: &str) -> Result<()> {
        let inv = self.client.inventory()?;
        let h = inv.host(host)?;
        let vms = self.client.vms()?;
        let vm = vdsa_of(&vms, &h.moref).ok_or_else(|| Error::NotDeployed { host: host.to_string() })?;
        self.client.reconfigure_vm(
            &vm.moref,
            &VmChange { extra_config: vec![(MARK_STATE.into(), "uninstalling".into())], ..Default::default() },
        )?;
        self.client.power_off_and_destroy(&vm.moref)?;
        Ok(())
    }

    /// The VMs that can be protected (not VDSAs, not templates), with disks.
    pub fn vms_with_disks(&self) -> Result<Vec<VmDisks>> {
        let inv = self.client.inventory()?;
        let mut out: Vec<VmDisks> = self
            .client
            .vms()?
            .into_iter()
            .filter(|v| !v.template && v.extra(MARK_ROLE) != Some(ROLE_VDSA))
            .map(|v| VmDisks {
                host: v.host.as_ref().and_then(|h| inv.host_by_ref(h)).map(|h| h.name.clone()),
                vm: v.moref,
                name: v.name,
                power_state: v.power_state,
                disks: v.disks,
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }
}

fn state_of(vm: &Vm) -> VdsaState {
    match vm.extra(MARK_STATE) {
        Some("installed") => VdsaState::Installed,
        Some("uninstalling") => VdsaState::Uninstalling,
        _ => VdsaState::Installing,
    }
}

/// The VDSA VM of a host, by its marker.
fn vdsa_of<'a>(vms: &'a [Vm], host: &MoRef) -> Option<&'a Vm> {
    vms.iter().find(|v| v.extra(MARK_ROLE) == Some(ROLE_VDSA) && v.extra(MARK_HOST) == Some(host.value.as_str()))
}

fn hosts_with_vdsas(inv: &Inventory, vms: &[Vm]) -> Vec<HostVdsa> {
    let mut out: Vec<HostVdsa> = inv
        .hosts
        .iter()
        .map(|h| {
            let cr = inv.compute_resource(&h.compute_resource);
            let vm = vdsa_of(vms, &h.moref);
            HostVdsa {
                host: h.name.clone(),
                host_ref: h.moref.clone(),
                cluster: cr.filter(|c| c.is_cluster).map(|c| c.name.clone()),
                datacenter: inv.datacenter(&h.datacenter).map(|d| d.name.clone()).unwrap_or_default(),
                state: vm.map(state_of).unwrap_or(VdsaState::NotInstalled),
                vm: vm.cloned(),
            }
        })
        .collect();
    out.sort_by(|a, b| a.host.cmp(&b.host));
    out
}
