//! The API's resources, typed once: the REST API serves them, the store
//! keeps them as they are served, and the CLI reads them back
//! (docs/api.md). Plain serde types with their OpenAPI schemas.

use protection_groups::{CheckpointId, CheckpointKind, HostId, SiteId, VpgId, VpgSettings, VpgStatus};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

mod alerts;
mod stats;

pub use alerts::{Alert, AlertEvent, AlertKind, AlertSettings};
pub use stats::{HealthDay, VpgStats};

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// What a token may do. Each role may do everything of the roles below it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Reads only.
    Viewer,
    /// VPGs, checkpoints, tests, failover.
    Operator,
    /// Tokens, pairing, site settings, hosts, and all below.
    Admin,
}

/// The site this manager runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Site {
    pub id: SiteId,
    pub name: String,
    pub location: String,
    pub contact: String,
    /// Where the API and console are served, as operators reach it.
    pub address: String,
    pub api_port: u16,
    /// Where VDSAs dial their site manager.
    pub management_port: u16,
    /// The port VDSAs of this site accept replication links on.
    pub replication_port: u16,
    /// SHA-256 of the site CA certificate (DER), hex: what registration
    /// tokens carry and what operators compare.
    pub ca_sha256: String,
    /// The current manager generation.
    pub generation: u64,
}

/// Site settings an admin may change (absent fields are left as they are).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SiteUpdate {
    pub name: Option<String>,
    pub location: Option<String>,
    pub contact: Option<String>,
    pub address: Option<String>,
    pub replication_port: Option<u16>,
}

/// An API token as listed (the secret itself is shown once, at creation).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Token {
    pub id: Uuid,
    pub name: String,
    pub role: Role,
    pub created_ms: u64,
    pub revoked_ms: Option<u64>,
}

/// A request for a new API token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewToken {
    pub name: String,
    pub role: Role,
}

/// A new token and its secret, shown only in this answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CreatedToken {
    pub token: Token,
    pub secret: String,
}

/// One line of the audit log: who did what, and how it ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct AuditEntry {
    pub seq: u64,
    pub time_ms: u64,
    /// The token's name, or why none was accepted.
    pub who: String,
    pub token: Option<Uuid>,
    pub method: String,
    pub path: String,
    pub status: u16,
}

/// The civil date (year, month, day) of a count of days since
/// 1970-01-01 (the proleptic Gregorian calendar, in 400-year eras).
pub fn civil_date(days: u64) -> (i64, i64, i64) {
    let z = i64::try_from(days).unwrap_or(0) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// The hypervisor a host runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Hypervisor {
    Kvm,
    Vsphere,
}

/// Where a host's VDSA is (DESIGN's host states, plus down).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum VdsaState {
    NotInstalled,
    /// Its VM is being made (vSphere), or a registration token waits for
    /// it (KVM).
    Installing,
    /// Its VM is powered on; the appliance boots and has not registered.
    Booting,
    /// It registered and has not reported yet.
    Registering,
    /// Registered and answering heartbeats.
    Installed,
    /// The deploy failed: `vdsa_reason` says why. Deploy again.
    Failed,
    /// Registered, but no heartbeat for longer than the limit.
    Down,
    Uninstalling,
}

/// A hypervisor host and its VDSA.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Host {
    pub id: HostId,
    pub name: String,
    pub hypervisor: Hypervisor,
    pub vdsa: VdsaState,
    /// Why the VDSA is in its state, where that needs saying (Failed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vdsa_reason: Option<String>,
    /// HOST:PORT of its VDSA's replication listener, once it registered.
    pub replication_address: Option<String>,
    pub last_heartbeat_ms: Option<u64>,
    pub software_version: Option<String>,
    /// The newest manager generation the VDSA reported obeying.
    pub vdsa_generation: u64,
    /// The newest checkpoint id the VDSA reported placing.
    pub vdsa_newest_checkpoint: u64,
}

impl Host {
    /// A host just added: no VDSA yet.
    pub fn new(name: String, hypervisor: Hypervisor) -> Host {
        Host {
            id: HostId::new(),
            name,
            hypervisor,
            vdsa: VdsaState::NotInstalled,
            vdsa_reason: None,
            replication_address: None,
            last_heartbeat_ms: None,
            software_version: None,
            vdsa_generation: 0,
            vdsa_newest_checkpoint: 0,
        }
    }
}

/// A request to add a host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewHost {
    pub name: String,
    pub hypervisor: Hypervisor,
}

/// A one-time registration token for a host's VDSA: give it to the VDSA's
/// configuration (the deb's config file, the OVA's properties).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RegistrationToken {
    pub host: HostId,
    /// `<secret>.<site CA SHA-256>`: the VDSA checks the CA before it
    /// sends the secret.
    pub token: String,
    pub expires_ms: u64,
    /// HOST:PORT where the VDSA dials its site manager.
    pub management_address: String,
    /// The task that ends when the VDSA has registered and reported.
    #[serde(default)]
    pub task: Option<Uuid>,
}

/// A protection group as served.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Vpg {
    pub id: VpgId,
    pub settings: VpgSettings,
    pub status: VpgStatus,
    /// Why the status is what it is, when that needs saying.
    pub status_reason: String,
    pub created_ms: u64,
    /// Grows with every change of the definition.
    pub revision: u64,
    /// The replication epoch its streams carry.
    pub epoch: u64,
    /// Protection is paused (status Error) because a recovery journal
    /// refuses writes (its volume is full): its roles keep running, the
    /// writes wait in the protected site's queues, and it goes back to
    /// Protecting on its own once the journal takes writes again.
    #[serde(default)]
    pub paused: bool,
    /// A move is under way: its source VDSAs power the VMs off (their
    /// streams stay, so that the last writes drain).
    #[serde(default)]
    pub moving: bool,
    /// Reverse protection: the files the new recovery hosts' replicas
    /// start as (the former source disks), so that the sync sends only
    /// the blocks that differ.
    #[serde(default)]
    pub seeds: Vec<protection_groups::mgmt::DiskSeed>,
}

/// A VPG and the task that brings it to Protecting (or removes it, or
/// moves it).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct VpgTask {
    pub vpg: Vpg,
    pub task: Task,
}

/// The id a checkpoint insertion was given: it is recorded once its
/// barrier ends (wait for it with the wait call).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct InsertedCheckpoint {
    pub vpg: VpgId,
    pub id: CheckpointId,
}

/// Reverse protection of a committed failover: for each VM, how the
/// recovered VM's hypervisor reaches it at its recovery host (where it runs
/// now) and, per disk, its device there and the former source disk at the
/// original host that the new replica starts from.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReverseProtection {
    pub vms: Vec<ReversedVm>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReversedVm {
    pub vm: protection_groups::VmId,
    /// KVM: the QMP socket of the recovered VM's QEMU on its recovery host.
    pub hypervisor_ref: String,
    pub disks: Vec<ReversedDisk>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReversedDisk {
    pub disk: protection_groups::DiskId,
    /// The block node the tap mirrors in the recovered VM's QEMU.
    pub device: String,
    /// The former source disk's file at the original host (none: the whole
    /// disk is sent).
    #[serde(default)]
    pub seed_path: Option<String>,
}

/// A role of a VPG as the VDSA of `host` reported it last.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct VpgRole {
    pub host: HostId,
    pub role: protection_groups::mgmt::RoleState,
}

/// A VM to add to a VPG.
pub type NewVm = protection_groups::ProtectedVm;

/// One recovery point of a VPG, as the coordinator recorded it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Checkpoint {
    pub vpg: VpgId,
    pub id: CheckpointId,
    pub time_ms: u64,
    pub kind: CheckpointKind,
    pub name: String,
    /// Every source VDSA placed it before the deadline (COMMIT), and no
    /// sync made the cut inconsistent.
    pub consistent: bool,
    /// Every target VDSA of the VPG holds it durably.
    pub durable: bool,
    /// Why it is not consistent, when it is not.
    pub reason: String,
    /// How long the barrier held the guests' writes: first PREPARE sent
    /// to last decision sent (µs).
    #[serde(default)]
    pub hold_us: u64,
    /// Every VM that names a way to quiesce was quiesced around the barrier
    /// (and the checkpoint is consistent).
    #[serde(default)]
    pub application_consistent: bool,
    /// Why an application-consistent checkpoint that was asked for is only
    /// crash-consistent.
    #[serde(default)]
    pub quiesce_reason: String,
}

/// A request to insert a named checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewCheckpoint {
    pub name: String,
    /// Quiesce the VPG's VMs around the barrier (those that name a way).
    #[serde(default)]
    pub application_consistent: bool,
}

/// A task's state (DESIGN's command tracker).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
pub enum TaskStatus {
    Active,
    Running,
    Aborted,
    Completed,
}

/// How a task ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
pub enum CompletionCode {
    /// Still running.
    NotAvailable,
    Success,
    Aborted,
    Failed,
    HadException,
}

/// Who carries a task's work: after a site manager restart, work a VDSA
/// carries is taken back; steps the site manager drove are aborted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TaskDriver {
    SiteManager,
    Vdsa,
}

/// A long operation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Task {
    pub id: Uuid,
    pub kind: String,
    pub description: String,
    pub vpg: Option<VpgId>,
    pub host: Option<HostId>,
    pub status: TaskStatus,
    pub completion: CompletionCode,
    pub driver: TaskDriver,
    /// 0 to 100.
    pub progress: u8,
    pub started_ms: u64,
    pub ended_ms: Option<u64>,
    #[schema(value_type = Object)]
    pub result: serde_json::Value,
    pub exception: Option<String>,
}

impl Task {
    pub fn is_finished(&self) -> bool {
        matches!(self.status, TaskStatus::Aborted | TaskStatus::Completed)
    }
}

/// The error body of every 4xx and 5xx answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// A stable word for scripts: bad_request, unauthorized, forbidden,
    /// not_found, conflict, internal.
    pub error: String,
    /// The request field at fault, when one is.
    pub field: Option<String>,
    pub message: String,
}

/// A one-time site pairing token: the other site's admin gives it to
/// their site manager's pair call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PairingToken {
    /// `<secret>.<site CA SHA-256>`: the pairing site checks this site's CA
    /// before it sends the secret.
    pub token: String,
    pub expires_ms: u64,
    /// HOST:PORT of this site's API, where the other site dials.
    pub address: String,
}

/// A request to pair with another site.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PairRequest {
    /// HOST:PORT of the other site manager's API.
    pub address: String,
    /// The pairing token the other site made.
    pub token: String,
}

/// The paired site.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Peer {
    pub site: SiteId,
    pub name: String,
    /// HOST:PORT of its API.
    pub address: String,
    /// SHA-256 of its site CA (DER), hex.
    pub ca_sha256: String,
    pub paired_ms: u64,
    /// When the last exchange with it succeeded.
    pub last_contact_ms: Option<u64>,
    /// Why the last exchange failed, if it did.
    pub last_error: String,
}

/// What a pairing site sends: the token's secret, who it is, its CA.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PairingOffer {
    pub secret: String,
    pub site: SiteId,
    pub name: String,
    /// HOST:PORT of its API.
    pub address: String,
    /// Its site CA, PEM.
    pub ca_pem: String,
}

/// The answer to a pairing offer: who this site is and its CA.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PairingAnswer {
    pub site: SiteId,
    pub name: String,
    pub ca_pem: String,
}

/// A host of the paired site, as replication needs it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PeerHost {
    pub id: HostId,
    pub name: String,
    pub replication_address: Option<String>,
}

/// One round of the site-to-site exchange (each side sends its own): its
/// VPGs that recover to the other site (the other keeps copies), its
/// hosts, and the target roles its VDSAs run for the other's VPGs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PeerExchange {
    pub site: SiteId,
    pub vpgs: Vec<Vpg>,
    pub hosts: Vec<PeerHost>,
    pub target_roles: Vec<protection_groups::mgmt::RoleState>,
    /// The other site's VPGs this site failed over (as recovery site):
    /// their status here, which the defining site takes (its sources stop).
    #[serde(default)]
    pub failed_over: Vec<RemoteFailover>,
}

/// A VPG failed over at its recovery site, as that site tells the site
/// that defines it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RemoteFailover {
    pub vpg: VpgId,
    pub status: VpgStatus,
    pub reason: String,
}

/// How the site manager reaches its vCenter, and the VDSA OVA it deploys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VcenterSettings {
    /// https://vcenter/sdk
    pub url: String,
    pub user: String,
    /// Write-only: never returned.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub password: String,
    /// Trust: the CA (PEM) that signed vCenter's certificate, or its SHA-1
    /// or SHA-256 thumbprint.
    #[serde(default)]
    pub ca_pem: String,
    #[serde(default)]
    pub thumbprint: String,
    /// The VDSA OVA on the site manager's machine (empty: this site
    /// deploys no VDSAs, it only recovers to vSphere hosts).
    #[serde(default)]
    pub ova_path: String,
}

/// Where and how to deploy a host's VDSA (its appliance's network).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DeployVdsa {
    pub datastore: String,
    pub network: String,
    #[schema(value_type = String)]
    pub ip: std::net::Ipv4Addr,
    #[schema(value_type = String)]
    pub netmask: std::net::Ipv4Addr,
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    pub gateway: Option<std::net::Ipv4Addr>,
    #[serde(default)]
    #[schema(value_type = Vec<String>)]
    pub dns: Vec<std::net::Ipv4Addr>,
}

/// Where a failover test is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub enum TestState {
    /// Its stacks are being opened at the recovery VDSAs.
    Starting,
    /// Every disk is exported: test VMs can boot from `exports`.
    Running,
    /// Stopped by the operator; its stacks are being discarded.
    Stopping,
    /// Its stacks are discarded and their space freed: a record.
    Stopped,
    /// It could not start (`detail` says why); nothing is kept.
    Failed,
}

/// The operator's verdict on a test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TestResult {
    Pass,
    Fail,
}

/// What a stack of a VPG is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum StackPurpose {
    /// A failover test: replication goes on.
    #[default]
    Test,
    /// The VPG's failover: replication stopped, the recovered VMs run on
    /// it until it is committed or rolled back.
    Failover,
}

/// A failover test (or the VPG's failover): a VPG's disks at one
/// checkpoint, exported with a private write overlay (a processing stack
/// per recovery VDSA), and afterwards the record of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct FailoverTest {
    /// The test's stack id at every recovery VDSA.
    pub id: protection_groups::StackId,
    #[serde(default)]
    pub purpose: StackPurpose,
    pub vpg: VpgId,
    pub vpg_name: String,
    pub checkpoint: protection_groups::CheckpointId,
    pub state: TestState,
    pub started_ms: u64,
    /// When every disk was exported (start to ready is the test's start
    /// time).
    pub ready_ms: Option<u64>,
    pub stopped_ms: Option<u64>,
    pub result: Option<TestResult>,
    pub notes: String,
    /// Bytes the test VMs wrote (to the overlays only).
    pub written_bytes: u64,
    /// One NBD export per disk while it runs.
    pub exports: Vec<protection_groups::mgmt::StackExport>,
    pub detail: String,
    /// The task that starts it, and the one that stops it.
    pub start_task: Uuid,
    pub stop_task: Option<Uuid>,
    /// A failover's commit: its task, when it was asked for and when the
    /// stacks were promoted (the replicas are the recovered disks).
    #[serde(default)]
    pub commit_task: Option<Uuid>,
    #[serde(default)]
    pub committed_ms: Option<u64>,
    #[serde(default)]
    pub promoted_ms: Option<u64>,
    /// Per VM, the network it joins and how it is re-addressed (the VM's
    /// test or failover settings, else the VPG's network), with the KVM
    /// guest's `ip=` argument and its config disk's export while it runs.
    #[serde(default)]
    pub vm_networks: Vec<RecoveryNetwork>,
    /// The VMs the hypervisor adapter brought up from the exports, where
    /// the VMs recover to vSphere hosts (docs/recovery.md).
    #[serde(default)]
    pub recovery_vms: RecoveryVms,
}

/// The test (or recovered) VMs the vSphere adapter made for a test or a
/// failover, and where that work stands.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
pub struct RecoveryVms {
    pub phase: RecoveryVmsPhase,
    /// The isolated network made for a test (removed with its VMs).
    pub made_network: Option<String>,
    /// In boot order.
    pub vms: Vec<RecoveryVm>,
    /// Why the VMs could not be made or removed.
    pub detail: String,
}

/// Where a test's (or failover's) vSphere VMs are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RecoveryVmsPhase {
    /// No VM of the VPG recovers to a vSphere host: nothing to make.
    #[default]
    None,
    /// Being made, customised and powered on in boot order.
    Creating,
    /// Made and powered on.
    Ready,
    /// They could not be made (`detail`); whatever was made is removed.
    Failed,
    /// Being powered off and removed (the test stopped, the failover was
    /// rolled back).
    Removing,
    Removed,
}

/// One VM the vSphere adapter made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RecoveryVm {
    pub vm: protection_groups::VmId,
    /// Its name in vCenter.
    pub name: String,
    /// Its managed object reference (`vm-123`).
    pub moref: String,
    pub host: String,
    pub network: String,
    /// When the server powered it on (its task's completion time).
    pub powered_on: Option<String>,
    /// Whether guest customisation re-addresses it at power-on.
    pub customized: bool,
}

/// A recovered (or test) VM's network, as the hypervisor adapter applies
/// it (docs/recovery.md).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RecoveryNetwork {
    pub vm: protection_groups::VmId,
    pub name: String,
    pub settings: protection_groups::VmNetwork,
    /// The Linux kernel's `ip=` argument, when the VM is re-addressed.
    pub kernel_ip: Option<String>,
    /// The VM's config disk (read-only NBD) while the stack runs.
    #[serde(default)]
    pub config_uri: String,
}

impl RecoveryNetwork {
    /// Every VM of `vpg` with its settings for a test or a failover.
    pub fn of(vpg: &Vpg, purpose: StackPurpose) -> Vec<RecoveryNetwork> {
        vpg.settings
            .vms
            .iter()
            .map(|vm| {
                let (own, network) = match purpose {
                    StackPurpose::Test => (&vm.test_network, &vpg.settings.test_network),
                    StackPurpose::Failover => (&vm.failover_network, &vpg.settings.failover_network),
                };
                let mut settings = own.clone().unwrap_or_default();
                if settings.network.is_empty() {
                    settings.network.clone_from(network);
                }
                RecoveryNetwork {
                    vm: vm.id,
                    name: vm.name.clone(),
                    kernel_ip: settings.kernel_ip_arg(&vm.name),
                    settings,
                    config_uri: String::new(),
                }
            })
            .collect()
    }

    /// The config disk's text: one `key=value` per line.
    pub fn config_text(&self) -> String {
        let s = &self.settings;
        format!(
            "# VDSA recovery network (docs/recovery.md)\nvm={}\nname={}\nnetwork={}\naddress={}\ngateway={}\ndns={}\nkernel_ip={}\n",
            self.vm,
            self.name,
            s.network,
            s.address,
            s.gateway,
            s.dns.join(","),
            self.kernel_ip.as_deref().unwrap_or("")
        )
    }
}

impl FailoverTest {
    /// A test (or failover) of `vpg` at `checkpoint`, started by `task`.
    pub fn starting(purpose: StackPurpose, vpg: &Vpg, checkpoint: CheckpointId, task: Uuid) -> FailoverTest {
        FailoverTest {
            id: protection_groups::StackId::new(),
            purpose,
            vpg: vpg.id,
            vpg_name: vpg.settings.name.clone(),
            checkpoint,
            state: TestState::Starting,
            started_ms: now_ms(),
            ready_ms: None,
            stopped_ms: None,
            result: None,
            notes: String::new(),
            written_bytes: 0,
            exports: Vec::new(),
            detail: String::new(),
            start_task: task,
            stop_task: None,
            commit_task: None,
            committed_ms: None,
            promoted_ms: None,
            vm_networks: RecoveryNetwork::of(vpg, purpose),
            recovery_vms: RecoveryVms::default(),
        }
    }

    /// Whether its stacks should be served.
    pub fn serves(&self) -> bool {
        matches!(self.state, TestState::Starting | TestState::Running)
    }
}

/// Tests to start: one per entry, at that checkpoint, or at the newest
/// testable one where the entry is null.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewTests {
    pub checkpoints: Vec<Option<u64>>,
}

/// The tests started and the task that ends when all of them run.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct StartedTests {
    pub task: Task,
    pub tests: Vec<FailoverTest>,
}

/// The verdict that stops a test.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StopTest {
    pub result: TestResult,
    #[serde(default)]
    pub notes: String,
}

/// A stop and the task that ends when its space is freed.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct StoppingTest {
    pub task: Task,
    pub test: FailoverTest,
}

/// How many records were discarded.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Discarded {
    pub discarded: usize,
}

/// Where to fail a VPG over to.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewFailover {
    /// A checkpoint id, or null for the newest one every recovery VDSA
    /// holds.
    #[serde(default)]
    pub checkpoint: Option<u64>,
}

/// A failover (or its roll back) under way: the VPG, its stack and the
/// task that ends when the stack is served (or discarded).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct FailoverTask {
    pub vpg: Vpg,
    pub failover: FailoverTest,
    pub task: Task,
}
