//! A VM's network at recovery: the network it joins and, to re-IP it, its
//! address, gateway and DNS servers, separately for failover and for
//! failover tests (docs/api.md). The hypervisor adapter applies them: on
//! vSphere as guest customisation, on KVM handed to the guest as a kernel
//! `ip=` argument and a config disk (docs/recovery.md).

use serde::{Deserialize, Serialize};
use std::net::Ipv4Addr;

/// Where a recovered (or test) VM is attached and how it is re-addressed
/// (the default: the VPG's network, addresses kept).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct VmNetwork {
    /// The network (port group, bridge) to attach; empty: the VPG's.
    #[serde(default)]
    pub network: String,
    /// The IPv4 address with its prefix (`10.1.2.3/24`); empty: the guest
    /// keeps its own.
    #[serde(default)]
    pub address: String,
    #[serde(default)]
    pub gateway: String,
    #[serde(default)]
    pub dns: Vec<String>,
}

impl VmNetwork {
    /// Why the settings cannot be applied, if they cannot.
    pub fn check(&self) -> Result<(), String> {
        if self.network.chars().any(char::is_control) || self.network.len() > 128 {
            return Err("network: at most 128 printable characters".into());
        }
        if self.address.is_empty() && (!self.gateway.is_empty() || !self.dns.is_empty()) {
            return Err("gateway and dns need an address".into());
        }
        self.static_ipv4().map(|_| ())
    }

    /// The re-addressing parsed and checked (None: the guest keeps its
    /// own address); an error names the field.
    pub fn static_ipv4(&self) -> Result<Option<StaticIpv4>, String> {
        if self.address.is_empty() {
            return Ok(None);
        }
        let bad = || format!("address: {:?} is not an IPv4 address with a prefix (10.1.2.3/24)", self.address);
        let (ip, prefix) = self.address.split_once('/').ok_or_else(bad)?;
        let address: Ipv4Addr = ip.parse().map_err(|_| bad())?;
        let prefix: u8 = prefix.parse().ok().filter(|p| (1..=32).contains(p)).ok_or_else(bad)?;
        let mask = mask_of(prefix);
        let gateway = if self.gateway.is_empty() {
            None
        } else {
            let gw: Ipv4Addr =
                self.gateway.parse().map_err(|_| format!("gateway: {:?} is not an IPv4 address", self.gateway))?;
            if u32::from(gw) & mask != u32::from(address) & mask {
                return Err(format!("gateway: {gw} is outside {}", self.address));
            }
            Some(gw)
        };
        if self.dns.len() > 2 {
            return Err("dns: at most 2 servers".into());
        }
        let dns = self
            .dns
            .iter()
            .map(|d| d.parse::<Ipv4Addr>().map_err(|_| format!("dns: {d:?} is not an IPv4 address")))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Some(StaticIpv4 { address, netmask: Ipv4Addr::from(mask), gateway, dns }))
    }

    /// The Linux kernel's `ip=` argument for these settings (static, on
    /// the first interface), or None if the address is kept.
    pub fn kernel_ip_arg(&self, vm_name: &str) -> Option<String> {
        let ip = self.static_ipv4().ok()??;
        let dns: Vec<String> = ip.dns.iter().map(Ipv4Addr::to_string).collect();
        let gateway = ip.gateway.map(|g| g.to_string()).unwrap_or_default();
        Some(
            format!("ip={}::{gateway}:{}:{}:eth0:off:{}", ip.address, ip.netmask, host_name(vm_name), dns.join(":"))
                .trim_end_matches(':')
                .to_string(),
        )
    }
}

/// Static IPv4 settings, parsed from a [`VmNetwork`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticIpv4 {
    pub address: Ipv4Addr,
    pub netmask: Ipv4Addr,
    pub gateway: Option<Ipv4Addr>,
    pub dns: Vec<Ipv4Addr>,
}

/// A guest host name from a VM's name: its letters, digits and hyphens,
/// at most 63.
pub fn host_name(vm_name: &str) -> String {
    vm_name.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-').take(63).collect()
}

fn mask_of(prefix: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(address: &str, gateway: &str, dns: &[&str]) -> VmNetwork {
        VmNetwork {
            network: "dr-test".into(),
            address: address.into(),
            gateway: gateway.into(),
            dns: dns.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn settings_are_checked_and_become_a_kernel_argument() {
        let ok = net("10.1.2.3/24", "10.1.2.1", &["10.0.0.53"]);
        assert_eq!(ok.check(), Ok(()));
        assert_eq!(
            ok.kernel_ip_arg("vm 0").as_deref(),
            Some("ip=10.1.2.3::10.1.2.1:255.255.255.0:vm0:eth0:off:10.0.0.53")
        );
        assert!(net("10.1.2.3", "", &[]).check().is_err_and(|e| e.contains("prefix")));
        assert!(net("10.1.2.3/24", "10.9.9.1", &[]).check().is_err_and(|e| e.contains("outside")));
        assert!(net("10.1.2.3/24", "", &["x"]).check().is_err_and(|e| e.contains("dns")));
        assert!(net("", "10.1.2.1", &[]).check().is_err());
        assert_eq!(net("", "", &[]).kernel_ip_arg("a"), None);
    }
}
