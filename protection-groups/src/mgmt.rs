//! The management link between a site manager and its VDSAs: one message
//! enum per direction, shared by both daemons (docs/management-protocol.md).
//!
//! Each frame is a 4-byte big-endian length and that many bytes of one JSON
//! message; the framing and the TLS transport live in each daemon. The VDSA
//! always dials. Words kept apart: the *registration token* a VDSA presents
//! once to get its certificate, the *manager generation* that fences a
//! stale site manager, and the wire's *replication epoch* (in a role).

use crate::{
    CheckpointId, CheckpointKind, DiskId, DiskSpec, HostId, QuiesceSpec, RetentionPolicy, SiteId, StackId, StreamId,
    VmId, VpgId,
};
use serde::{Deserialize, Serialize};

/// The protocol version both sides put in their first message. A peer of
/// another version is refused with a message that names both.
pub const PROTOCOL_VERSION: u32 = 5;

/// The largest frame either side accepts.
pub const MAX_FRAME_BYTES: u32 = 4 << 20;

/// The name the site manager's certificate carries on the management link.
pub const SITE_MANAGER_NAME: &str = "site-manager";

/// VDSA → site manager.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum VdsaMessage {
    /// First frame of a link without a certificate (server-authenticated TLS
    /// whose CA the VDSA checked against the hash its token carries).
    Register {
        protocol: u32,
        /// The one-time registration token.
        token: String,
        /// This host's name, as the hypervisor knows it.
        host_name: String,
        /// A PKCS#10 request for the VDSA's own key: the key never leaves it.
        csr_pem: String,
        software_version: String,
    },
    /// First frame of a mutual-TLS link.
    Hello {
        protocol: u32,
        host: HostId,
        /// The newest manager generation this VDSA has obeyed.
        newest_generation: u64,
        /// The newest checkpoint id it has placed, in any VPG (so that a
        /// site manager restored from a backup can `reclaim` above it).
        newest_checkpoint: CheckpointId,
        /// How long it holds tap acknowledgements for a barrier at most.
        hold_limit_ms: u64,
        /// HOST:PORT its replication listener accepts source links on.
        replication_address: String,
        software_version: String,
    },
    /// What the VDSA runs, every heartbeat interval and after each change.
    Report { actual: ActualState },
    /// PREPARE done: every source role of the VPG holds its acknowledgements
    /// and has placed the marker.
    Prepared { vpg: VpgId, checkpoint: CheckpointId },
    /// PREPARE could not be done; the VDSA holds nothing for it.
    PrepareFailed { vpg: VpgId, checkpoint: CheckpointId, reason: String },
    /// The decision for a marker is written into the stream and the hold
    /// released; `committed: false` also when the VDSA's own hold limit
    /// ran out first.
    Decided { vpg: VpgId, checkpoint: CheckpointId, committed: bool, reason: String },
    /// A command this VDSA does not obey, and why (an older generation, a
    /// role it cannot run).
    Refused { reason: String },
    /// QUIESCE done: every VM of the VPG on this host that names a way to
    /// quiesce was tried; `failures` says which could not be, and why
    /// (empty: all are quiesced until THAW).
    Quiesced { vpg: VpgId, checkpoint: CheckpointId, failures: Vec<String> },
    /// The answer to `CollectLogs`: the records, newest kept when they are
    /// more than [`MAX_LOG_BYTES`] (then `truncated`).
    Logs { request: u64, text: String, truncated: bool },
}

/// The most log text one `Logs` answer carries (a frame holds 4 MiB).
pub const MAX_LOG_BYTES: usize = 3 << 20;

/// Site manager → VDSA. Every command carries the manager generation; a
/// VDSA ignores one older than the newest it has obeyed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ManagerMessage {
    /// Answer to `Register`: the VDSA's identity. From now on it dials with
    /// mutual TLS.
    Registered {
        host: HostId,
        certificate_pem: String,
        /// The site CA: the only CA the VDSA trusts for its site manager.
        site_ca_pem: String,
    },
    /// Answer to `Hello`.
    Welcome { protocol: u32, generation: u64 },
    /// The whole desired state; the VDSA reconciles towards it.
    Desired { generation: u64, state: DesiredState },
    /// Phase one of the checkpoint barrier (docs/architecture.md §3).
    Prepare { generation: u64, vpg: VpgId, checkpoint: CheckpointId, kind: CheckpointKind, name: String },
    /// Phase two: every source VDSA of the VPG answered.
    Commit { generation: u64, vpg: VpgId, checkpoint: CheckpointId },
    /// Phase two when one did not answer in time or failed.
    Abort { generation: u64, vpg: VpgId, checkpoint: CheckpointId, reason: String },
    /// The link is refused (bad or reused token, unknown host, wrong
    /// protocol version); the VDSA logs it and retries later.
    Refused { reason: String },
    /// Before an application-consistent checkpoint's PREPARE: quiesce the
    /// VPG's VMs on this host (the VDSA thaws them on THAW, or on its own
    /// after a limit if THAW never comes).
    Quiesce { generation: u64, vpg: VpgId, checkpoint: CheckpointId },
    /// After the checkpoint's decision: thaw what QUIESCE froze.
    Thaw { generation: u64, vpg: VpgId, checkpoint: CheckpointId },
    /// The log collector: send the records of this VDSA's log file from
    /// `since_ms` to `until_ms` at `level` or more severe.
    CollectLogs { generation: u64, request: u64, since_ms: u64, until_ms: u64, level: crate::logs::LogLevel },
}

impl ManagerMessage {
    /// The manager generation a command carries (None for answers that
    /// are not commands).
    pub fn generation(&self) -> Option<u64> {
        match self {
            ManagerMessage::Welcome { generation, .. }
            | ManagerMessage::Desired { generation, .. }
            | ManagerMessage::Prepare { generation, .. }
            | ManagerMessage::Commit { generation, .. }
            | ManagerMessage::Abort { generation, .. }
            | ManagerMessage::CollectLogs { generation, .. }
            | ManagerMessage::Quiesce { generation, .. }
            | ManagerMessage::Thaw { generation, .. } => Some(*generation),
            ManagerMessage::Registered { .. } | ManagerMessage::Refused { .. } => None,
        }
    }
}

/// Everything a VDSA should run. `version` grows with each change, so a
/// report says which desired state it has reached.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DesiredState {
    pub version: u64,
    pub sources: Vec<SourceRole>,
    pub targets: Vec<TargetRole>,
    /// The paired sites whose VDSAs this VDSA's replication links accept
    /// (and whose VDSAs it dials). Its own site's CA is always trusted; a
    /// site missing here is refused in the TLS handshake, and links of a
    /// site that was dropped are closed.
    #[serde(default)]
    pub trusted_sites: Vec<TrustedSite>,
}

/// One VM a source role quiesces for application-consistent checkpoints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmQuiesce {
    pub vm: VmId,
    pub name: String,
    pub spec: QuiesceSpec,
}

/// A paired site's CA, as the VDSAs trust it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustedSite {
    pub site: SiteId,
    pub name: String,
    /// The site CA certificate, PEM.
    pub ca_pem: String,
}

/// One stream at its source VDSA: the VPG's disks on this host that recover
/// to one target VDSA.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceRole {
    pub vpg: VpgId,
    pub stream: StreamId,
    /// The replication epoch; a target refuses an older one.
    pub epoch: u64,
    pub target_host: HostId,
    /// HOST:PORT of the target VDSA's replication listener.
    pub target_address: String,
    pub disks: Vec<DiskSpec>,
    /// Streams of the VPG into the same target (each places every marker).
    pub streams_to_target: u16,
    /// Link bandwidth limit in bytes per second, 0 for none.
    pub bandwidth_bytes_per_sec: u64,
    /// Taps the VDSA attaches itself (KVM: QEMU's block mirror over the
    /// VM's QMP socket). Disks not listed are tapped from outside.
    #[serde(default)]
    pub taps: Vec<TapAttach>,
    /// How to quiesce the stream's VMs (those that name a way).
    #[serde(default)]
    pub quiesce: Vec<VmQuiesce>,
    /// A move: power the VMs of `taps` off (a clean shutdown, then QEMU's
    /// quit) and keep the stream so that their last writes drain. Changing
    /// it does not restart the role.
    #[serde(default)]
    pub power_off: bool,
}

impl SourceRole {
    /// Whether `other` is the same run of the role (only `power_off` may
    /// differ: it is obeyed by the running role).
    pub fn same_run(&self, other: &SourceRole) -> bool {
        SourceRole { power_off: other.power_off, ..self.clone() } == *other
    }
}

/// A disk whose tap the VDSA attaches through its host's QEMU monitor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TapAttach {
    pub disk: crate::DiskId,
    /// The QMP socket of the VM's QEMU on this host.
    pub qmp_socket: String,
    /// The block node the mirror job taps.
    pub device: String,
}

/// One VPG's journal at a target VDSA.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetRole {
    pub vpg: VpgId,
    pub epoch: u64,
    /// The streams it accepts; any other is refused.
    pub streams: Vec<StreamId>,
    pub disks: Vec<DiskSpec>,
    pub retention: RetentionPolicy,
    /// Processing stacks to serve over this journal (failover tests): a
    /// stack not listed is discarded, its overlays freed.
    #[serde(default)]
    pub stacks: Vec<StackSpec>,
    /// Disks whose replica starts as a copy of a file on this host (reverse
    /// protection: the former source disk), so that the initial sync sends
    /// only the blocks that differ. Used when the disk is first added.
    #[serde(default)]
    pub seeds: Vec<DiskSeed>,
}

/// A disk's seed: a file on the target host the replica starts from.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskSeed {
    pub disk: crate::DiskId,
    pub path: String,
}

/// A processing stack the target VDSA serves: the VPG's disks at
/// `checkpoint` with a private write overlay each (architecture.md §6).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StackSpec {
    pub id: StackId,
    pub checkpoint: CheckpointId,
    /// A committed failover: promote the stack into the replica, in the
    /// background, while it keeps serving (docs/recovery.md).
    #[serde(default)]
    pub promote: bool,
    /// Per VM, a read-only config disk served beside the stack's disks: its
    /// network settings at recovery, for the guest to apply (KVM).
    #[serde(default)]
    pub vm_configs: Vec<VmConfig>,
}

/// A VM's config disk: `text` at its start, zeros after.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    pub vm: crate::VmId,
    pub text: String,
}

/// A VM's config disk as an NBD export.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigExport {
    pub vm: crate::VmId,
    pub uri: String,
}

/// A stack as its VDSA serves it.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StackState {
    pub id: StackId,
    pub checkpoint: CheckpointId,
    /// One NBD export per disk; empty while it cannot be served.
    pub exports: Vec<StackExport>,
    /// Bytes written to it since it was opened.
    pub written_bytes: u64,
    /// What its overlays occupy on the VDSA's volume.
    pub allocated_bytes: u64,
    /// Why it cannot be served (the checkpoint is no longer retained, the
    /// volume failed), or empty.
    pub problem: String,
    /// Discarded (its overlays freed); reported for a while so that the
    /// site manager learns its final `written_bytes`.
    #[serde(default)]
    pub discarded: bool,
    /// Its promotion, once asked for.
    #[serde(default)]
    pub promotion: Option<PromotionState>,
    /// The VMs' config disks (read-only NBD exports).
    #[serde(default)]
    pub configs: Vec<ConfigExport>,
}

/// How far a stack's promotion got.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromotionState {
    /// Overlay bytes copied onto the replica, of `total_bytes` (which grows
    /// while the recovered VMs write).
    pub done_bytes: u64,
    pub total_bytes: u64,
    /// Blocks the journal wrote into the replica.
    pub journal_blocks: u64,
    /// Done: the stack's disks are the replica files.
    pub promoted: bool,
    /// Why the last attempt failed (it is tried again), or empty.
    pub error: String,
}

/// One disk of a stack, as an NBD export.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StackExport {
    pub disk: DiskId,
    /// `nbd://HOST:PORT/NAME`, for qemu, qemu-img or nbdcopy.
    pub uri: String,
    pub size_bytes: u64,
}

/// What a VDSA runs now.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActualState {
    /// The desired-state version it has reconciled to.
    pub desired_version: u64,
    pub roles: Vec<RoleState>,
    /// Free bytes on the volume of its journals and spill files.
    pub data_free_bytes: u64,
    /// The VDSA process's resident memory.
    #[serde(default)]
    pub memory_bytes: u64,
}

/// Source or target.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RoleKind {
    Source,
    Target,
}

/// Where a role is.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RolePhase {
    /// Created, not yet linked to its peer.
    Starting,
    /// Initial or delta sync running: checkpoints are inconsistent.
    Syncing,
    /// Replicating write by write.
    Protecting,
    /// Stopped on purpose (a full journal volume pauses a VPG).
    Paused,
    /// Failed; `detail` says why.
    Failed,
}

/// One role's state.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleState {
    pub vpg: VpgId,
    pub kind: RoleKind,
    /// The stream (sources only).
    pub stream: Option<StreamId>,
    pub phase: RolePhase,
    pub detail: String,
    pub sync_done_bytes: u64,
    pub sync_total_bytes: u64,
    /// Source: the newest checkpoint the target acknowledged durable.
    /// Target: the newest checkpoint recorded in its journal.
    pub durable_checkpoint: CheckpointId,
    /// Target only: the newest recoverable checkpoints its journal holds
    /// durably, complete from every stream (at most 256). A checkpoint is
    /// durable for the VPG when every target lists it.
    #[serde(default)]
    pub recoverable_checkpoints: Vec<CheckpointId>,
    /// Target only: the oldest recoverable checkpoint its journal still
    /// holds (retention moves it on): how far back a failover can go.
    #[serde(default)]
    pub oldest_recoverable_checkpoint: Option<CheckpointId>,
    /// Source only: guest writes the tap passed on (IOPS by their rate),
    /// blocks offered to the target and blocks it lacked and was sent
    /// (the rest were deduplicated), and the send queue in memory and
    /// spilled to disk.
    #[serde(default)]
    pub write_count: u64,
    #[serde(default)]
    pub blocks_offered: u64,
    #[serde(default)]
    pub blocks_sent: u64,
    #[serde(default)]
    pub queue_bytes: u64,
    #[serde(default)]
    pub spill_bytes: u64,
    /// Source: what the tap wrote; target: its journal's bytes on disk.
    pub written_bytes: u64,
    /// Source: bytes on the link.
    pub link_bytes: u64,
    /// Target: the processing stacks it serves.
    #[serde(default)]
    pub stacks: Vec<StackState>,
    /// Source: asked to power its VMs off, it did (every VM's QEMU is gone).
    #[serde(default)]
    pub powered_off: bool,
    /// Source: the encryption signal's last checkpoint intervals, oldest
    /// first (`crate::encryption`).
    #[serde(default)]
    pub entropy: Vec<crate::encryption::EntropySample>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_and_unknown_fields_are_refused() {
        let m = ManagerMessage::Prepare {
            generation: 3,
            vpg: VpgId::new(),
            checkpoint: CheckpointId(9),
            kind: CheckpointKind::Automatic,
            name: String::new(),
        };
        let json = serde_json::to_string(&m).unwrap_or_default();
        assert!(json.contains(r#""type":"prepare""#), "{json}");
        let back: ManagerMessage = serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(back, m);
        assert_eq!(back.generation(), Some(3));
        let bad = json.replace(r#""generation":3"#, r#""generation":3,"extra":1"#);
        assert!(serde_json::from_str::<ManagerMessage>(&bad).is_err());
        let v = VdsaMessage::Refused { reason: "old".into() };
        let json = serde_json::to_string(&v).unwrap_or_default();
        assert_eq!(serde_json::from_str::<VdsaMessage>(&json).ok(), Some(v));
    }
}
