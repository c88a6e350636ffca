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

use protection_groups::appliance::ApplianceSettings;
use vsphere_client::{
    Client, ImportDeadlines, ImportProgress, ImportTarget, Inventory, MoRef, Ova, ServerTrust, VirtualDiskInfo, Vm,
    VmChange,
};

/// Extra-config keys the product sets on the VMs it owns.
pub const MARK_ROLE: &str = "vdsa.role";
pub const MARK_STATE: &str = "vdsa.state";
pub const MARK_HOST: &str = "vdsa.host";
pub const MARK_TEST: &str = "vdsa.test";
pub const MARK_BOOT_GROUP: &str = "vdsa.bootGroup";
/// Until when (ms since the epoch) the deploy that made a VDSA VM owns it:
/// another deploy leaves an `installing` VDSA alone until then.
pub const MARK_DEPLOY_UNTIL: &str = "vdsa.deployUntil";
/// The deploy that made it (a random id), to tell two deploys apart.
pub const MARK_DEPLOY_ID: &str = "vdsa.deployId";
const ROLE_VDSA: &str = "vdsa";
const ROLE_RECOVERY: &str = "recovery";

mod recovery;
pub use recovery::{PowerOnRecord, RecoveryVmSpec, TestNetwork};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Vsphere(#[from] vsphere_client::Error),
    #[error("host {host} already has a VDSA ({vm}); undeploy it first")]
    AlreadyDeployed { host: String, vm: String, vm_ref: MoRef },
    #[error("host {host} has no VDSA to undeploy")]
    NotDeployed { host: String },
    #[error("a network named {name:?} exists already; a test network must not share a name with a real one")]
    NetworkExists { name: String },
    #[error("bad settings: {0}")]
    Settings(String),
    #[error("host {host} is skipped: {reason}")]
    HostUnavailable { host: String, reason: String },
    #[error("another deploy is installing the VDSA of host {host} ({vm}) until {until_ms} ms since the epoch; wait for it, or undeploy the host if that deploy is gone")]
    DeployInProgress { host: String, vm: String, until_ms: u64 },
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
    /// The host itself: connected, maintenance, disconnected, notResponding.
    pub host_state: String,
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

impl DeploySettings {
    /// The appliance's settings for a VDSA at `ip`, checked by the rule the
    /// appliance applies when it boots: what it would refuse is refused
    /// here, before any call to vCenter.
    pub fn appliance(&self, ip: Ipv4Addr) -> Result<ApplianceSettings> {
        let a = ApplianceSettings {
            ip,
            netmask: self.netmask,
            gateway: self.gateway,
            dns: self.dns.clone(),
            site_manager: self.site_manager.clone(),
            registration_token: self.registration_token.clone(),
        };
        a.check().map_err(|e| Error::Settings(e.to_string()))?;
        Ok(a)
    }
}

/// How long each phase of a deploy may take before it fails with the
/// phase named: a vCenter that stops answering (frozen, the connection
/// still open) must not hold a deploy forever. SOAP calls are bounded by
/// the client's call timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeployDeadlines {
    /// The lease and the disk upload.
    pub import: ImportDeadlines,
    /// Power-on.
    pub power_on: std::time::Duration,
}

impl Default for DeployDeadlines {
    fn default() -> Self {
        DeployDeadlines { import: ImportDeadlines::default(), power_on: std::time::Duration::from_secs(300) }
    }
}

impl DeployDeadlines {
    /// The longest a deploy uploading `bytes` may own its VM.
    pub fn total(&self, bytes: u64) -> std::time::Duration {
        self.import.lease_ready + self.import.upload(bytes) + self.power_on
    }
}

/// A cluster's deploy, as planned: one request per host that can take a
/// VDSA, and the hosts skipped with the reason.
#[derive(Debug, Clone, Default)]
pub struct ClusterPlan {
    pub requests: Vec<DeployRequest>,
    pub skipped: Vec<(String, String)>,
}

/// Why a host cannot take a VDSA now, if it cannot.
fn unavailable(h: &vsphere_client::Host) -> Option<String> {
    if h.in_maintenance {
        Some("it is in maintenance mode".into())
    } else if h.connection_state != "connected" {
        Some(format!("it is {} (not connected to vCenter)", h.connection_state))
    } else {
        None
    }
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
    Uploading {
        done: u64,
        total: u64,
    },
    PoweringOn,
    Installed {
        vm: String,
    },
    /// A re-run found the host's VDSA installed already.
    AlreadyInstalled {
        vm: String,
    },
    /// The host cannot take a VDSA now.
    Skipped {
        reason: String,
    },
    Failed {
        error: String,
    },
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
    deadlines: DeployDeadlines,
}

impl VsphereSite {
    /// Connects and logs in.
    pub fn connect(url: &str, trust: ServerTrust, user: &str, password: &str) -> Result<Self> {
        let client = Client::connect(url, trust)?;
        client.login(user, password)?;
        Ok(VsphereSite { client: Arc::new(client), deadlines: DeployDeadlines::default() })
    }

    /// Connects with a SOAP call timeout of `call_timeout`.
    pub fn connect_within(
        url: &str,
        trust: ServerTrust,
        user: &str,
        password: &str,
        call_timeout: std::time::Duration,
    ) -> Result<Self> {
        let client = Client::connect_with_timeout(url, trust, call_timeout)?;
        client.login(user, password)?;
        Ok(VsphereSite { client: Arc::new(client), deadlines: DeployDeadlines::default() })
    }

    /// The deploys' phase deadlines.
    pub fn with_deadlines(mut self, deadlines: DeployDeadlines) -> Self {
        self.deadlines = deadlines;
        self
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

    /// The deploy of every host of `cluster` that can take a VDSA. A host
    /// whose VDSA exists keeps its address; the others get the free
    /// addresses from `settings.ip` on, in host name order, skipping every
    /// address a VDSA of this vCenter holds: an address is never handed out
    /// twice. A gateway equal to a VDSA's address is refused. Every request is checked by the appliance's
    /// rule before anything is deployed.
    pub fn plan_cluster(&self, cluster: &str, settings: &DeploySettings) -> Result<ClusterPlan> {
        let inv = self.client.inventory()?;
        let vms = self.client.vms()?;
        let c = inv.cluster(cluster)?;
        let held: std::collections::HashSet<Ipv4Addr> = vms
            .iter()
            .filter(|v| v.extra(MARK_ROLE) == Some(ROLE_VDSA))
            .filter_map(|v| v.vapp_property("ip").and_then(|ip| ip.parse().ok()))
            .collect();
        let mask = u32::from(settings.netmask);
        let subnet = u32::from(settings.ip) & mask;
        let mut next = u32::from(settings.ip);
        if let Some(gw) = settings.gateway.filter(|g| held.contains(g)) {
            return Err(Error::Settings(format!(
                "the property gateway: {gw} is the address of a VDSA of this vCenter"
            )));
        }
        let mut plan = ClusterPlan::default();
        for h in inv.hosts_of(c) {
            if let Some(reason) = unavailable(h) {
                plan.skipped.push((h.name.clone(), reason));
                continue;
            }
            let kept = vdsa_of(&vms, &h.moref).and_then(|v| v.vapp_property("ip")).and_then(|ip| ip.parse().ok());
            let ip = match kept {
                Some(ip) => ip,
                None => loop {
                    let candidate = Ipv4Addr::from(next);
                    if next & mask != subnet {
                        return Err(Error::Settings(format!(
                            "the subnet {}/{} has no free address left for host {} (from {} on; held by VDSAs: {})",
                            Ipv4Addr::from(subnet),
                            mask.count_ones(),
                            h.name,
                            settings.ip,
                            held.len()
                        )));
                    }
                    next = next.wrapping_add(1);
                    let network_or_broadcast =
                        protection_groups::appliance::check_host_address(candidate, settings.netmask).is_err();
                    if !held.contains(&candidate) && !network_or_broadcast {
                        break candidate;
                    }
                },
            };
            settings.appliance(ip).map_err(|e| Error::Settings(format!("host {}: {e}", h.name)))?;
            plan.requests.push(DeployRequest { host: h.name.clone(), ip, settings: settings.clone() });
        }
        Ok(plan)
    }

    /// One host's deploy request, checked by the appliance's rule and
    /// against the addresses the VDSAs of this vCenter hold.
    pub fn plan_host(&self, host: &str, ip: Ipv4Addr, settings: &DeploySettings) -> Result<DeployRequest> {
        settings.appliance(ip)?;
        let vms = self.client.vms()?;
        let inv = self.client.inventory()?;
        let h = inv.host(host)?;
        let others = || {
            vms.iter()
                .filter(|v| v.extra(MARK_ROLE) == Some(ROLE_VDSA) && v.extra(MARK_HOST) != Some(h.moref.value.as_str()))
        };
        if let Some(other) = others().find(|v| v.vapp_property("ip") == Some(ip.to_string().as_str())) {
            return Err(Error::Settings(format!("{ip} is held by the VDSA {}; choose another address", other.name)));
        }
        if let Some(gw) = settings.gateway {
            if let Some(other) = others().find(|v| v.vapp_property("ip") == Some(gw.to_string().as_str())) {
                return Err(Error::Settings(format!(
                    "the property gateway: {gw} is the address of the VDSA {}",
                    other.name
                )));
            }
        }
        Ok(DeployRequest { host: host.to_string(), ip, settings: settings.clone() })
    }

    /// Deploys the VDSA to one host: import (marked installing, owned by
    /// this deploy until its deadlines run out), power on, mark installed.
    /// A VDSA left `installing` by a deploy whose time is up, or
    /// `uninstalling`, is removed first; one another deploy still owns is
    /// left alone (`DeployInProgress`).
    pub fn deploy(&self, ova: &Ova, req: &DeployRequest, progress: &(dyn Fn(DeployEvent) + Sync)) -> Result<MoRef> {
        let r = self.deploy_inner(ova, req, progress);
        report_end(&r, progress);
        r
    }

    /// Deploys to several hosts, `parallel` at a time; one result per host,
    /// in the order given. Progress names the host. A host whose VDSA is
    /// installed already is reported so (`AlreadyInstalled`, and its VM as
    /// the result): a re-run finishes what a partial deploy left.
    pub fn deploy_many(
        &self,
        ova: &Ova,
        reqs: &[DeployRequest],
        parallel: usize,
        progress: &(dyn Fn(&str, DeployEvent) + Sync),
    ) -> Result<Vec<(String, Result<MoRef>)>> {
        let next = AtomicUsize::new(0);
        let results: Mutex<Vec<Option<Result<MoRef>>>> = Mutex::new((0..reqs.len()).map(|_| None).collect());
        std::thread::scope(|s| {
            for _ in 0..parallel.max(1).min(reqs.len().max(1)) {
                s.spawn(|| loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(req) = reqs.get(i) else { return };
                    let host_progress = |e| progress(&req.host, e);
                    let r = match self.deploy_inner(ova, req, &host_progress) {
                        Err(Error::AlreadyDeployed { vm, vm_ref, .. }) => {
                            host_progress(DeployEvent::AlreadyInstalled { vm });
                            Ok(vm_ref)
                        }
                        r => {
                            report_end(&r, &host_progress);
                            r
                        }
                    };
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

    fn deploy_inner(&self, ova: &Ova, req: &DeployRequest, progress: &(dyn Fn(DeployEvent) + Sync)) -> Result<MoRef> {
        let s = &req.settings;
        let appliance = s.appliance(req.ip)?;
        let inv = self.client.inventory()?;
        let host = inv.host(&req.host)?;
        if let Some(reason) = unavailable(host) {
            return Err(Error::HostUnavailable { host: host.name.clone(), reason });
        }
        let datastore = inv.datastore_for(host, &s.datastore)?;
        let network = inv.network_for(host, &s.network)?;
        let dc = inv.datacenter_of(host)?;
        let pool = inv.resource_pool_of(host)?;
        let vms = self.client.vms()?;
        if let Some(existing) = vdsa_of(&vms, &host.moref) {
            match state_of(existing) {
                VdsaState::Installed => {
                    return Err(Error::AlreadyDeployed {
                        host: host.name.clone(),
                        vm: existing.name.clone(),
                        vm_ref: existing.moref.clone(),
                    })
                }
                VdsaState::Installing if owned_until(existing) > now_ms() => {
                    return Err(Error::DeployInProgress {
                        host: host.name.clone(),
                        vm: existing.name.clone(),
                        until_ms: owned_until(existing),
                    })
                }
                _ => {
                    tracing::info!(host = %host.name, vm = %existing.name, "removing a VDSA an interrupted run left");
                    self.client.power_off_and_destroy(&existing.moref)?;
                }
            }
        }
        let upload_bytes: u64 = ova.references.iter().filter_map(|r| ova.entry(r)).map(|e| e.size).sum();
        let until = now_ms() + self.deadlines.total(upload_bytes).as_millis() as u64;
        let deploy_id = uuid::Uuid::new_v4().to_string();
        let ovf_network = ova.networks.first().cloned().unwrap_or_default();
        let target = ImportTarget {
            name: format!("VDSA-{}", host.name),
            host: host.moref.clone(),
            resource_pool: pool,
            folder: dc.vm_folder.clone(),
            datastore: datastore.moref.clone(),
            network_mapping: vec![(ovf_network, network.moref.clone())],
            properties: appliance.properties(),
            extra_config: vec![
                (MARK_ROLE.into(), ROLE_VDSA.into()),
                (MARK_STATE.into(), "installing".into()),
                (MARK_HOST.into(), host.moref.value.clone()),
                (MARK_DEPLOY_UNTIL.into(), until.to_string()),
                (MARK_DEPLOY_ID.into(), deploy_id.clone()),
            ],
        };
        let imported = self.client.import_ova_within(ova, &target, &self.deadlines.import, &|p| match p {
            ImportProgress::Preparing | ImportProgress::Completing => progress(DeployEvent::Preparing),
            ImportProgress::Uploading { done, total } => progress(DeployEvent::Uploading { done, total }),
        });
        let vm = match imported {
            Ok(vm) => vm,
            // The VM's name or files exist: another deploy made them since
            // we looked.
            Err(e @ vsphere_client::Error::Fault { .. }) | Err(e @ vsphere_client::Error::AlreadyExists { .. })
                if ["FileAlreadyExists", "DuplicateName", "exists already"]
                    .iter()
                    .any(|m| e.to_string().contains(m)) =>
            {
                let vms = self.client.vms()?;
                return Err(match vdsa_of(&vms, &host.moref) {
                    Some(v) if state_of(v) == VdsaState::Installed => {
                        Error::AlreadyDeployed { host: host.name.clone(), vm: v.name.clone(), vm_ref: v.moref.clone() }
                    }
                    Some(v) => Error::DeployInProgress {
                        host: host.name.clone(),
                        vm: v.name.clone(),
                        until_ms: owned_until(v),
                    },
                    None => Error::Vsphere(e),
                });
            }
            Err(e) => return Err(e.into()),
        };
        // Two deploys to one host at once: the one that started first keeps
        // the host; the other removes what it made.
        let rivals: Vec<Vm> = self
            .client
            .vms()?
            .into_iter()
            .filter(|v| v.moref != vm && v.extra(MARK_ROLE) == Some(ROLE_VDSA))
            .filter(|v| v.extra(MARK_HOST) == Some(host.moref.value.as_str()))
            .collect();
        let first = rivals.iter().find(|r| {
            state_of(r) == VdsaState::Installed
                || (owned_until(r) > now_ms()
                    && (owned_until(r), r.extra(MARK_DEPLOY_ID).unwrap_or("")) < (until, deploy_id.as_str()))
        });
        if let Some(first) = first {
            self.client.power_off_and_destroy(&vm)?;
            return Err(Error::DeployInProgress {
                host: host.name.clone(),
                vm: first.name.clone(),
                until_ms: owned_until(first),
            });
        }
        // Marked installed only once it runs: a VDSA that failed to start
        // stays `installing`, and the next deploy replaces it.
        progress(DeployEvent::PoweringOn);
        self.client.run_task_within("PowerOnVM_Task", &vm, self.deadlines.power_on, |_| {})?;
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

/// The event that ends a host's deploy.
fn report_end(r: &Result<MoRef>, progress: &(dyn Fn(DeployEvent) + Sync)) {
    progress(match r {
        Ok(vm) => DeployEvent::Installed { vm: vm.value.clone() },
        Err(Error::HostUnavailable { reason, .. }) => DeployEvent::Skipped { reason: reason.clone() },
        Err(e) => DeployEvent::Failed { error: e.to_string() },
    });
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Until when the deploy that made `vm` owns it (0: no deploy does).
fn owned_until(vm: &Vm) -> u64 {
    vm.extra(MARK_DEPLOY_UNTIL).and_then(|v| v.parse().ok()).unwrap_or(0)
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
                host_state: if h.in_maintenance { "maintenance".into() } else { h.connection_state.clone() },
            }
        })
        .collect();
    out.sort_by(|a, b| a.host.cmp(&b.host));
    out
}
