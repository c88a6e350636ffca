//! A VPG's definition: its VMs with their disks and placement, and the
//! settings an operator chooses (docs/api.md). The site manager
//! stores it, the API carries it and a paired site keeps a copy of it.

use crate::{DiskId, HostId, RetentionPolicy, SiteId, VmId};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::time::Duration;

/// A protected virtual disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct DiskSpec {
    pub id: DiskId,
    /// Its name on the tap (the NBD export name) and in tables.
    pub name: String,
    pub size_bytes: u64,
    /// How the hypervisor names it: on KVM the QEMU block node or device
    /// that the mirror job taps, on vSphere the virtual disk's key.
    #[serde(default)]
    pub device: String,
}

/// A VM of a VPG, where it runs and where it recovers to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ProtectedVm {
    pub id: VmId,
    pub name: String,
    /// The protected host it runs on (its VDSA taps its disks).
    pub host: HostId,
    /// How its hypervisor reaches it: on KVM the QMP socket of its QEMU on
    /// that host, on vSphere its managed object reference.
    #[serde(default)]
    pub hypervisor_ref: String,
    pub disks: Vec<DiskSpec>,
    /// The recovery host whose VDSA keeps its journal and runs it after a
    /// failover.
    pub recovery_host: HostId,
    /// The datastore (or folder) for its recovered disks.
    #[serde(default)]
    pub recovery_datastore: String,
    /// Seconds to wait after this VM boots before the next one in the boot
    /// order.
    #[serde(default)]
    pub boot_delay_secs: u32,
    /// How to quiesce it for an application-consistent checkpoint (none:
    /// its checkpoints are crash-consistent).
    #[serde(default)]
    pub quiesce: Option<QuiesceSpec>,
    /// Its network and address after a failover (none: the VPG's failover
    /// network, addresses kept).
    #[serde(default)]
    pub failover_network: Option<crate::VmNetwork>,
    /// Its network and address in failover tests (none: the VPG's test
    /// network, addresses kept).
    #[serde(default)]
    pub test_network: Option<crate::VmNetwork>,
}

/// How a VM is quiesced around the barrier, on its host: the QEMU guest
/// agent's fsfreeze through the agent socket, else a command hook run with
/// `freeze` or `thaw` appended (exit 0 is success).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct QuiesceSpec {
    /// The guest agent's socket on the VM's host (`-chardev socket` of
    /// the VM's `virtio-serial` port `org.qemu.guest_agent.0`).
    #[serde(default)]
    pub guest_agent_socket: String,
    /// The hook's program and arguments.
    #[serde(default)]
    pub hook: Vec<String>,
}

/// Which VPG's checkpoints and link bandwidth come first under contention.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum Priority {
    Low,
    #[default]
    Medium,
    High,
}

/// The definition of one virtual protection group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct VpgSettings {
    pub name: String,
    /// The site it recovers to.
    pub recovery_site: SiteId,
    /// VMs in boot order.
    #[serde(default)]
    pub vms: Vec<ProtectedVm>,
    /// How much history the journal keeps.
    #[serde(default = "defaults::journal_history_secs")]
    pub journal_history_secs: u64,
    /// The journal's size limit (log and chunk packs), if any.
    #[serde(default)]
    pub journal_size_limit_bytes: Option<u64>,
    /// Alert when the RPO exceeds this.
    #[serde(default = "defaults::rpo_alert_secs")]
    pub rpo_alert_secs: u64,
    /// How often an automatic checkpoint is inserted.
    #[serde(default = "defaults::checkpoint_interval_ms")]
    pub checkpoint_interval_ms: u64,
    /// The isolated network failover tests run on.
    #[serde(default)]
    pub test_network: String,
    /// The network recovered VMs join after a failover.
    #[serde(default)]
    pub failover_network: String,
    #[serde(default)]
    pub priority: Priority,
    /// Every this many seconds an application-consistent checkpoint (its
    /// VMs quiesced); 0: only on demand.
    #[serde(default)]
    pub app_consistent_interval_secs: u64,
}

/// Application-consistent checkpoints at most this often (quiescing
/// stalls the guests' writes).
pub const APP_CONSISTENT_MIN_SECS: u64 = 60;

mod defaults {
    pub fn journal_history_secs() -> u64 {
        24 * 3600
    }
    pub fn rpo_alert_secs() -> u64 {
        30
    }
    pub fn checkpoint_interval_ms() -> u64 {
        5000
    }
}

/// A setting out of its range, naming the field and the problem.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct InvalidSetting {
    pub field: String,
    pub problem: String,
}

fn invalid(field: impl Into<String>, problem: impl Into<String>) -> InvalidSetting {
    InvalidSetting { field: field.into(), problem: problem.into() }
}

/// Checkpoints at most this often and at least this rarely.
pub const CHECKPOINT_INTERVAL_MS: std::ops::RangeInclusive<u64> = 1000..=3_600_000;
/// Journal history between ten seconds (labs) and thirty days.
pub const JOURNAL_HISTORY_SECS: std::ops::RangeInclusive<u64> = 10..=30 * 24 * 3600;
const NAME_MAX: usize = 128;

fn check_name(field: &str, name: &str) -> Result<(), InvalidSetting> {
    if name.trim().is_empty() {
        return Err(invalid(field, "must not be empty"));
    }
    if name.len() > NAME_MAX {
        return Err(invalid(field, format!("is {} bytes long; at most {NAME_MAX}", name.len())));
    }
    if name.chars().any(char::is_control) {
        return Err(invalid(field, "must not hold control characters"));
    }
    Ok(())
}

impl VpgSettings {
    /// A VPG with no VMs and the default settings: 5 s checkpoints, 24 h of
    /// history, an RPO alert at 30 s.
    pub fn new(name: impl Into<String>, recovery_site: SiteId) -> Self {
        VpgSettings {
            name: name.into(),
            recovery_site,
            vms: Vec::new(),
            journal_history_secs: defaults::journal_history_secs(),
            journal_size_limit_bytes: None,
            rpo_alert_secs: defaults::rpo_alert_secs(),
            checkpoint_interval_ms: defaults::checkpoint_interval_ms(),
            test_network: String::new(),
            failover_network: String::new(),
            priority: Priority::default(),
            app_consistent_interval_secs: 0,
        }
    }

    /// Every range and uniqueness rule, the first broken one named.
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        check_name("name", &self.name)?;
        if !CHECKPOINT_INTERVAL_MS.contains(&self.checkpoint_interval_ms) {
            return Err(invalid(
                "checkpoint_interval_ms",
                format!(
                    "{} is out of range {}..={}",
                    self.checkpoint_interval_ms,
                    CHECKPOINT_INTERVAL_MS.start(),
                    CHECKPOINT_INTERVAL_MS.end()
                ),
            ));
        }
        if !JOURNAL_HISTORY_SECS.contains(&self.journal_history_secs) {
            return Err(invalid(
                "journal_history_secs",
                format!(
                    "{} is out of range {}..={}",
                    self.journal_history_secs,
                    JOURNAL_HISTORY_SECS.start(),
                    JOURNAL_HISTORY_SECS.end()
                ),
            ));
        }
        if let Some(limit) = self.journal_size_limit_bytes {
            if limit < 64 << 20 {
                return Err(invalid("journal_size_limit_bytes", format!("{limit} is below the minimum of 64 MiB")));
            }
        }
        if self.rpo_alert_secs == 0 {
            return Err(invalid("rpo_alert_secs", "must be at least 1"));
        }
        if self.app_consistent_interval_secs != 0 && self.app_consistent_interval_secs < APP_CONSISTENT_MIN_SECS {
            return Err(invalid(
                "app_consistent_interval_secs",
                format!(
                    "{} is below {APP_CONSISTENT_MIN_SECS} (0 turns the schedule off)",
                    self.app_consistent_interval_secs
                ),
            ));
        }
        let (mut vms, mut disks) = (HashSet::new(), HashSet::new());
        for (i, vm) in self.vms.iter().enumerate() {
            let at = format!("vms[{i}]");
            check_name(&format!("{at}.name"), &vm.name)?;
            if !vms.insert(vm.id) {
                return Err(invalid(format!("{at}.id"), format!("{} is listed twice", vm.id)));
            }
            if vm.disks.is_empty() {
                return Err(invalid(format!("{at}.disks"), "a protected VM needs at least one disk"));
            }
            for (field, n) in [("failover_network", &vm.failover_network), ("test_network", &vm.test_network)] {
                if let Some(n) = n {
                    n.check().map_err(|problem| invalid(format!("{at}.{field}"), problem))?;
                }
            }
            if let Some(q) = &vm.quiesce {
                if q.guest_agent_socket.is_empty() && q.hook.first().is_none_or(|p| p.trim().is_empty()) {
                    return Err(invalid(format!("{at}.quiesce"), "names neither a guest agent socket nor a hook"));
                }
            }
            for (j, d) in vm.disks.iter().enumerate() {
                let at = format!("{at}.disks[{j}]");
                check_name(&format!("{at}.name"), &d.name)?;
                if !disks.insert(d.id) {
                    return Err(invalid(format!("{at}.id"), format!("{} is listed twice", d.id)));
                }
                if d.size_bytes == 0 || d.size_bytes % 4096 != 0 {
                    return Err(invalid(
                        format!("{at}.size_bytes"),
                        format!("{} is not a positive multiple of 4096", d.size_bytes),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Checks what a change from `before` may not do: shrink a protected
    /// disk (a disk only grows; its journal keeps the old size for the
    /// checkpoints before the change).
    pub fn validate_change(&self, before: &VpgSettings) -> Result<(), InvalidSetting> {
        for (i, vm) in self.vms.iter().enumerate() {
            for (j, d) in vm.disks.iter().enumerate() {
                let old = before.vms.iter().flat_map(|v| &v.disks).find(|o| o.id == d.id);
                if let Some(old) = old.filter(|o| d.size_bytes < o.size_bytes) {
                    return Err(invalid(
                        format!("vms[{i}].disks[{j}].size_bytes"),
                        format!(
                            "{} is below {}: a protected disk can grow but not shrink",
                            d.size_bytes, old.size_bytes
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The journal retention these settings ask for.
    pub fn retention(&self) -> RetentionPolicy {
        let history = Duration::from_secs(self.journal_history_secs);
        match self.journal_size_limit_bytes {
            Some(max_bytes) => RetentionPolicy::TimeAndSpace { history, max_bytes },
            None => RetentionPolicy::Time { history },
        }
    }

    pub fn vm(&self, id: VmId) -> Option<&ProtectedVm> {
        self.vms.iter().find(|v| v.id == id)
    }

    /// The protected hosts the VPG's VMs run on, each once, in VM order.
    pub fn protected_hosts(&self) -> Vec<HostId> {
        let mut seen = Vec::new();
        for vm in &self.vms {
            if !seen.contains(&vm.host) {
                seen.push(vm.host);
            }
        }
        seen
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(name: &str) -> ProtectedVm {
        ProtectedVm {
            quiesce: None,
            failover_network: None,
            test_network: None,
            id: VmId::new(),
            name: name.into(),
            host: HostId::new(),
            hypervisor_ref: String::new(),
            disks: vec![DiskSpec {
                id: DiskId::new(),
                name: format!("{name}-disk"),
                size_bytes: 1 << 20,
                device: "".into(),
            }],
            recovery_host: HostId::new(),
            recovery_datastore: String::new(),
            boot_delay_secs: 0,
        }
    }

    #[test]
    fn validation_names_the_field() {
        let mut s = VpgSettings::new("web", SiteId::new());
        s.vms = vec![vm("a"), vm("b")];
        assert_eq!(s.validate(), Ok(()));
        s.vms[1].disks[0].size_bytes = 100;
        assert_eq!(s.validate().map_err(|e| e.field), Err("vms[1].disks[0].size_bytes".to_string()));
        s.vms[1].disks[0].size_bytes = 4096;
        s.vms[1].id = s.vms[0].id;
        assert_eq!(s.validate().map_err(|e| e.field), Err("vms[1].id".to_string()));
        let mut s = VpgSettings::new("", SiteId::new());
        assert_eq!(s.validate().map_err(|e| e.field), Err("name".to_string()));
        s.name = "x".into();
        s.checkpoint_interval_ms = 10;
        assert_eq!(s.validate().map_err(|e| e.field), Err("checkpoint_interval_ms".to_string()));
    }

    #[test]
    fn defaults_fill_missing_settings_and_unknown_fields_are_refused() {
        let site = SiteId::new();
        let json = format!(r#"{{"name":"db","recovery_site":"{}"}}"#, site.0);
        let s: VpgSettings = serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(s, VpgSettings::new("db", site));
        let json = format!(r#"{{"name":"db","recovery_site":"{}","colour":1}}"#, site.0);
        assert!(serde_json::from_str::<VpgSettings>(&json).is_err());
    }
}
