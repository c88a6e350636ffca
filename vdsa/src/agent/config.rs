//! The agent's own configuration: identity, data folder, listen
//! addresses and its site manager's address (what the OVA's first boot
//! and the deb write). Everything else comes from the site manager.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The configuration file (JSON); flags override each field.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// This host's name, as the site manager lists it (empty: the
    /// machine's host name).
    pub name: String,
    /// Journals, spill files, identity, state.
    pub data: PathBuf,
    /// HOST:PORT of the site manager's management listener.
    pub site_manager: String,
    /// The one-time registration token (needed only until registered).
    #[serde(default)]
    pub registration_token: Option<String>,
    /// HOST:PORT to accept replication links on.
    pub replication_listen: String,
    /// HOST:PORT peers dial (default: the listen address).
    #[serde(default)]
    pub replication_address: Option<String>,
    /// Where taps connect: unix:PATH, tcp:HOST:PORT, native-unix:PATH,
    /// native-tcp:HOST:PORT.
    #[serde(default)]
    pub tap_listen: Vec<String>,
    /// HOST:PORT where processing stacks are served over NBD (plain NBD,
    /// for the recovery host's hypervisor: keep it on a trusted network).
    /// Port 0 lets the kernel choose; the bound address is reported.
    #[serde(default = "defaults::export_listen")]
    pub export_listen: String,
    /// Paces a committed failover's promotion (copying the recovered VMs'
    /// writes onto the replica), so that the running VMs keep their I/O;
    /// 0: as fast as the disk goes.
    #[serde(default)]
    pub promotion_bytes_per_sec: u64,
    /// The longest a checkpoint barrier may hold tap acknowledgements.
    #[serde(default = "defaults::hold_limit_ms")]
    pub hold_limit_ms: u64,
    #[serde(default = "defaults::heartbeat_ms")]
    pub heartbeat_ms: u64,
    /// Memory for each source stream's queue before it spills.
    #[serde(default = "defaults::queue_memory_bytes")]
    pub queue_memory_bytes: u64,
    /// Spill file size per source stream.
    #[serde(default = "defaults::spill_bytes")]
    pub spill_bytes: u64,
    /// Fault injection for tests: SIGKILL itself after answering the Nth
    /// PREPARE (0: never).
    #[serde(default)]
    pub fault_kill_after_prepare: u64,
}

mod defaults {
    pub fn export_listen() -> String {
        "127.0.0.1:0".into()
    }
    pub fn hold_limit_ms() -> u64 {
        1000
    }
    pub fn heartbeat_ms() -> u64 {
        1000
    }
    pub fn queue_memory_bytes() -> u64 {
        128 << 20
    }
    pub fn spill_bytes() -> u64 {
        4 << 30
    }
}

/// The site manager's barrier deadline (500 ms) must stay strictly shorter
/// than the hold limit: below this the agent refuses to start.
pub const MIN_HOLD_LIMIT_MS: u64 = 600;

impl AgentConfig {
    /// Where the agent keeps its log (besides stderr): what the log
    /// collector reads.
    pub fn log_file(&self) -> PathBuf {
        self.data.join("logs/vdsa.log")
    }

    pub fn load(path: &Path) -> Result<AgentConfig> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{}: not a valid agent configuration", path.display()))
    }

    pub fn check(&self) -> Result<()> {
        if self.name.trim().is_empty() {
            bail!("name: must not be empty");
        }
        if self.hold_limit_ms < MIN_HOLD_LIMIT_MS {
            bail!(
                "hold_limit_ms: {} is too short; at least {MIN_HOLD_LIMIT_MS} (the site manager's barrier deadline is 500 ms)",
                self.hold_limit_ms
            );
        }
        if self.heartbeat_ms == 0 || self.heartbeat_ms > 5000 {
            bail!("heartbeat_ms: {} is out of range 1..=5000", self.heartbeat_ms);
        }
        Ok(())
    }

    pub fn advertised_replication_address(&self) -> String {
        self.replication_address.clone().unwrap_or_else(|| self.replication_listen.clone())
    }
}
