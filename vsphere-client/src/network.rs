//! Standard virtual switches and port groups of a host (HostNetworkSystem):
//! what an isolated test network is built from.

use crate::client::Client;
use crate::error::Result;
use crate::moref::MoRef;

/// A host's virtual switches and port groups.
#[derive(Debug, Clone, Default)]
pub struct HostNetworkInfo {
    /// (switch name, its port group names, its uplink NICs)
    pub vswitches: Vec<(String, Vec<String>, Vec<String>)>,
    /// (port group name, its switch)
    pub portgroups: Vec<(String, String)>,
}

impl HostNetworkInfo {
    pub fn has_portgroup(&self, name: &str) -> bool {
        self.portgroups.iter().any(|(n, _)| n == name)
    }

    pub fn has_vswitch(&self, name: &str) -> bool {
        self.vswitches.iter().any(|(n, _, _)| n == name)
    }
}

impl Client {
    /// Adds a standard switch with no uplinks: its port groups reach no
    /// physical network.
    pub fn add_virtual_switch(&self, network_system: &MoRef, name: &str, ports: u32) -> Result<()> {
        self.invoke("AddVirtualSwitch", network_system, |w| {
            w.text("vswitchName", name).open("spec").text("numPorts", &ports.to_string()).close("spec");
        })?;
        Ok(())
    }

    pub fn remove_virtual_switch(&self, network_system: &MoRef, name: &str) -> Result<()> {
        self.invoke("RemoveVirtualSwitch", network_system, |w| {
            w.text("vswitchName", name);
        })?;
        Ok(())
    }

    pub fn add_port_group(&self, network_system: &MoRef, vswitch: &str, name: &str, vlan: u16) -> Result<()> {
        self.invoke("AddPortGroup", network_system, |w| {
            w.open("portgrp")
                .text("name", name)
                .text("vlanId", &vlan.to_string())
                .text("vswitchName", vswitch)
                .open("policy")
                .close("policy")
                .close("portgrp");
        })?;
        Ok(())
    }

    pub fn remove_port_group(&self, network_system: &MoRef, name: &str) -> Result<()> {
        self.invoke("RemovePortGroup", network_system, |w| {
            w.text("pgName", name);
        })?;
        Ok(())
    }

    pub fn host_network_info(&self, network_system: &MoRef) -> Result<HostNetworkInfo> {
        let o = self.retrieve_one(network_system, &["networkInfo"])?;
        let mut info = HostNetworkInfo::default();
        let Some(v) = o.get("networkInfo") else { return Ok(info) };
        for s in v.children_named("vswitch") {
            let name = s.text_of("name").unwrap_or_default().to_string();
            // Port groups are listed by key ("key-vim.host.PortGroup-NAME").
            let pgs = s
                .children_named("portgroup")
                .map(|p| p.text.strip_prefix("key-vim.host.PortGroup-").unwrap_or(&p.text).to_string())
                .collect();
            let nics = s.children_named("pnic").map(|p| p.text.clone()).collect();
            info.vswitches.push((name, pgs, nics));
        }
        for p in v.children_named("portgroup") {
            if let Some(spec) = p.child("spec") {
                info.portgroups.push((
                    spec.text_of("name").unwrap_or_default().to_string(),
                    spec.text_of("vswitchName").unwrap_or_default().to_string(),
                ));
            }
        }
        Ok(info)
    }
}
