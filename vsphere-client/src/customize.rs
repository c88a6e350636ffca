//! Guest customisation (`CustomizeVM_Task`): a Linux guest's host name and
//! per-NIC fixed IPv4 settings, applied by the server at the VM's next
//! power-on. Used to re-IP a recovered VM.
//!
//! Elements follow the vim25 schema order of `CustomizationSpec`
//! (identity, globalIPSettings, nicSettingMap) and of its children.

use crate::client::Client;
use crate::error::{Error, Result};
use crate::moref::MoRef;
use crate::xml::Writer;
use std::net::Ipv4Addr;

/// One NIC's settings, in the VM's NIC order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NicIp {
    /// The guest asks DHCP (its address is not set).
    Dhcp,
    Fixed {
        address: Ipv4Addr,
        netmask: Ipv4Addr,
        gateway: Option<Ipv4Addr>,
        dns: Vec<Ipv4Addr>,
    },
}

/// What to apply to a guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Customization {
    /// The guest's host name (letters, digits and hyphens; at most 63).
    pub host_name: String,
    pub domain: String,
    /// DNS servers for the whole guest.
    pub dns_servers: Vec<Ipv4Addr>,
    /// One entry per NIC of the VM, in order: the server refuses a count
    /// that differs from the VM's.
    pub nics: Vec<NicIp>,
}

impl Customization {
    fn check(&self) -> Result<()> {
        let name_ok = !self.host_name.is_empty()
            && self.host_name.len() <= 63
            && self.host_name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            && !self.host_name.starts_with('-');
        if !name_ok {
            return Err(Error::InvalidArgument {
                property: Some("hostName".into()),
                message: format!(
                    "{:?} is not a host name (1 to 63 letters, digits or hyphens, not starting with one)",
                    self.host_name
                ),
            });
        }
        Ok(())
    }
}

impl Client {
    /// Sets `vm`'s guest customisation; the VM must be powered off, and the
    /// server applies it at the next power-on.
    pub fn customize_vm(&self, vm: &MoRef, c: &Customization) -> Result<()> {
        c.check()?;
        self.run_task("CustomizeVM_Task", vm, |w| write_spec(w, c))?;
        Ok(())
    }
}

fn write_spec(w: &mut Writer, c: &Customization) {
    w.open("spec");
    w.open_typed("identity", "CustomizationLinuxPrep");
    w.open_typed("hostName", "CustomizationFixedName").text("name", &c.host_name).close("hostName");
    w.text("domain", &c.domain).close("identity");
    w.open("globalIPSettings");
    for d in &c.dns_servers {
        w.text("dnsServerList", &d.to_string());
    }
    w.close("globalIPSettings");
    for nic in &c.nics {
        w.open("nicSettingMap").open("adapter");
        match nic {
            NicIp::Dhcp => {
                w.open_typed("ip", "CustomizationDhcpIpGenerator").close("ip");
            }
            NicIp::Fixed { address, netmask, gateway, dns } => {
                w.open_typed("ip", "CustomizationFixedIp").text("ipAddress", &address.to_string()).close("ip");
                w.text("subnetMask", &netmask.to_string());
                if let Some(g) = gateway {
                    w.text("gateway", &g.to_string());
                }
                for d in dns {
                    w.text("dnsServerList", &d.to_string());
                }
            }
        }
        w.close("adapter").close("nicSettingMap");
    }
    w.close("spec");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_spec_is_written_in_schema_order_and_bad_names_are_refused() {
        let c = Customization {
            host_name: "web-1".into(),
            domain: "dr.test".into(),
            dns_servers: vec![Ipv4Addr::new(10, 0, 0, 53)],
            nics: vec![NicIp::Fixed {
                address: Ipv4Addr::new(10, 1, 2, 3),
                netmask: Ipv4Addr::new(255, 255, 255, 0),
                gateway: Some(Ipv4Addr::new(10, 1, 2, 1)),
                dns: vec![],
            }],
        };
        let mut w = Writer::new();
        write_spec(&mut w, &c);
        let xml = w.finish();
        let order = ["<identity", "<hostName", "<domain>", "<globalIPSettings>", "<nicSettingMap>", "<ipAddress>"];
        let at: Vec<usize> = order.iter().map(|t| xml.find(t).unwrap_or(usize::MAX)).collect();
        assert!(at.windows(2).all(|p| p[0] < p[1]), "{xml}");
        assert!(xml.contains("<gateway>10.1.2.1</gateway>"), "{xml}");
        for bad in ["", "-a", "a b", &"x".repeat(64)] {
            let c = Customization { host_name: bad.into(), ..c.clone() };
            assert!(c.check().is_err(), "{bad:?}");
        }
    }
}
