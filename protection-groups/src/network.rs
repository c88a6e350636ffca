//! A VM's network at recovery: the network it joins and, to re-IP it, its
//! address, gateway and DNS servers, separately for failover and for
//! failover tests (docs/api.md). The hypervisor adapter applies them: on
//! vSphere as guest customisation, on KVM handed to the guest as a kernel
//! `ip=` argument and a config disk (docs/recovery.md).

use serde::{Deserialize, Serialize};
use std::net::Ipv4Addr;

/// Where a recovered (or test) VM is attached and how it is re-addressed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
        if self.address.is_empty() {
            if !self.gateway.is_empty() || !self.dns.is_empty() {
                return Err("gateway and dns need an address".into());
            }
            return Ok(());
        }
        let (ip, prefix) = self.cidr()?;
        if !self.gateway.is_empty() {
            let gw: Ipv4Addr =
                self.gateway.parse().map_err(|_| format!("gateway: {:?} is not an IPv4 address", self.gateway))?;
            let mask = mask_of(prefix);
            if u32::from(gw) & mask != u32::from(ip) & mask {
                return Err(format!("gateway: {gw} is outside {}", self.address));
            }
        }
        if self.dns.len() > 2 {
            return Err("dns: at most 2 servers".into());
        }
        for d in &self.dns {
            d.parse::<Ipv4Addr>().map_err(|_| format!("dns: {d:?} is not an IPv4 address"))?;
        }
        Ok(())
    }

    fn cidr(&self) -> Result<(Ipv4Addr, u8), String> {
        let bad = || format!("address: {:?} is not an IPv4 address with a prefix (10.1.2.3/24)", self.address);
        let (ip, prefix) = self.address.split_once('/').ok_or_else(bad)?;
        let ip: Ipv4Addr = ip.parse().map_err(|_| bad())?;
        let prefix: u8 = prefix.parse().ok().filter(|p| (1..=32).contains(p)).ok_or_else(bad)?;
        Ok((ip, prefix))
    }

    /// The Linux kernel's `ip=` argument for these settings (static, on
    /// the first interface), or None if the address is kept.
    pub fn kernel_ip_arg(&self, hostname: &str) -> Option<String> {
        let (ip, prefix) = self.cidr().ok()?;
        let mask = Ipv4Addr::from(mask_of(prefix));
        let dns: Vec<&str> = self.dns.iter().map(String::as_str).collect();
        let host: String = hostname.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-').take(63).collect();
        Some(
            format!("ip={ip}::{}:{mask}:{host}:eth0:off:{}", self.gateway, dns.join(":"))
                .trim_end_matches(':')
                .to_string(),
        )
    }
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
