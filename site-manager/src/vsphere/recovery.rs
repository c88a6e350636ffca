//! The vSphere side of recovery: recovery and test VMs made from specs
//! (disks, networks, markers, guest customisation), powered on in boot
//! order; isolated test networks (a switch without uplinks per host); and
//! the removal of a test's or a failover's VMs by their marker.

use std::time::{Duration, Instant};

use vsphere_client::{Customization, DiskSpec, MoRef, NicSpec, VmSpec};

use super::{Error, Result, VsphereSite, MARK_BOOT_GROUP, MARK_ROLE, MARK_TEST, ROLE_RECOVERY};

/// A recovery (or test) VM to create.
#[derive(Debug, Clone)]
pub struct RecoveryVmSpec {
    pub name: String,
    pub host: String,
    pub datastore: String,
    pub guest_id: String,
    pub cpus: u32,
    pub memory_mb: u64,
    /// Disk sizes in bytes.
    pub disks: Vec<u64>,
    /// Network names, one NIC each.
    pub networks: Vec<String>,
    /// Lower groups power on first.
    pub boot_group: u32,
    /// Marks the VM as belonging to a failover test (or a failover: the
    /// id of its record), for removal.
    pub test_id: Option<String>,
    /// More extra-config entries (the disks' exports, say).
    pub extra_config: Vec<(String, String)>,
    /// Re-IP settings, applied by the server at the first power-on.
    pub customization: Option<Customization>,
}

/// When a VM was powered on, from the server's task record.
#[derive(Debug, Clone)]
pub struct PowerOnRecord {
    pub vm: MoRef,
    pub boot_group: u32,
    pub start_time: Option<String>,
    pub complete_time: Option<String>,
}

/// An isolated test network: a standard switch without uplinks and a port
/// group of the same name on each host.
#[derive(Debug, Clone)]
pub struct TestNetwork {
    pub name: String,
    /// (host name, its network system, whether we added the switch, whether
    /// we added the port group on it).
    pub hosts: Vec<(String, MoRef, bool, bool)>,
}

impl VsphereSite {
    /// Creates a recovery VM on its host, datastore and networks (powered
    /// off).
    pub fn create_recovery_vm(&self, spec: &RecoveryVmSpec) -> Result<MoRef> {
        let inv = self.client.inventory()?;
        let host = inv.host(&spec.host)?;
        // No datastore named: the host's first one.
        let datastore = if spec.datastore.is_empty() {
            let first = host.datastores.first().and_then(|d| inv.datastores.iter().find(|x| &x.moref == d));
            first
                .ok_or_else(|| Error::Settings(format!("host {} has no datastore for recovery VMs", host.name)))?
                .name
                .clone()
        } else {
            inv.datastore_for(host, &spec.datastore)?.name.clone()
        };
        let nics = spec
            .networks
            .iter()
            .map(|n| Ok(NicSpec { network: inv.network_for(host, n)?.clone(), adapter: None }))
            .collect::<Result<Vec<_>>>()?;
        let dc = inv.datacenter_of(host)?;
        let pool = inv.resource_pool_of(host)?;
        let mut extra = vec![
            (MARK_ROLE.to_string(), ROLE_RECOVERY.to_string()),
            (MARK_BOOT_GROUP.to_string(), spec.boot_group.to_string()),
        ];
        if let Some(t) = &spec.test_id {
            extra.push((MARK_TEST.to_string(), t.clone()));
        }
        extra.extend(spec.extra_config.iter().cloned());
        let vm_spec = VmSpec {
            name: spec.name.clone(),
            guest_id: spec.guest_id.clone(),
            num_cpus: spec.cpus,
            memory_mb: spec.memory_mb,
            datastore,
            disks: spec.disks.iter().map(|b| DiskSpec { capacity_bytes: *b, thin: true, datastore: None }).collect(),
            nics,
            annotation: Some(match &spec.test_id {
                Some(t) => format!("Failover test {t}: removed when the test ends"),
                None => "Recovery VM".to_string(),
            }),
            extra_config: extra,
        };
        let vm = self.client.create_vm(&dc.vm_folder, &pool, Some(&host.moref), &vm_spec)?;
        if let Some(c) = &spec.customization {
            if let Err(e) = self.client.customize_vm(&vm, c) {
                // No half-made VM: one without its addresses could clash
                // with the original on a network.
                if let Err(cleanup) = self.client.destroy(&vm) {
                    tracing::warn!(vm = %spec.name, error = %cleanup, "removing an uncustomised VM failed");
                }
                return Err(e.into());
            }
        }
        Ok(vm)
    }

    /// Powers VMs on one after another, each followed by its delay (the
    /// VPG's boot order).
    pub fn power_on_in_order(&self, vms: &[(MoRef, Duration)]) -> Result<Vec<PowerOnRecord>> {
        let mut records = Vec::new();
        for (i, (vm, delay)) in vms.iter().enumerate() {
            let info = self.client.power_on(vm)?;
            records.push(PowerOnRecord {
                vm: vm.clone(),
                boot_group: i as u32,
                start_time: info.start_time,
                complete_time: info.complete_time,
            });
            if i + 1 < vms.len() && !delay.is_zero() {
                std::thread::sleep(*delay);
            }
        }
        Ok(records)
    }

    /// Whether a network of that name exists.
    pub fn network_exists(&self, name: &str) -> Result<bool> {
        Ok(self.client.inventory()?.networks.iter().any(|n| n.name == name))
    }

    /// Powers VMs on by boot group: every VM of a group is on before the
    /// next group starts, then `pause` passes. VMs of one group start
    /// together.
    pub fn power_on_in_boot_order(&self, vms: &[(MoRef, u32)], pause: Duration) -> Result<Vec<PowerOnRecord>> {
        let mut groups: Vec<u32> = vms.iter().map(|(_, g)| *g).collect();
        groups.sort_unstable();
        groups.dedup();
        let mut records = Vec::new();
        for (gi, g) in groups.iter().enumerate() {
            if gi > 0 && !pause.is_zero() {
                std::thread::sleep(pause);
            }
            let members: Vec<&MoRef> = vms.iter().filter(|(_, vg)| vg == g).map(|(m, _)| m).collect();
            let started = Instant::now();
            let results: Vec<vsphere_client::Result<vsphere_client::TaskInfo>> = std::thread::scope(|s| {
                let handles: Vec<_> = members.iter().map(|m| s.spawn(|| self.client.power_on(m))).collect();
                handles
                    .into_iter()
                    .map(|h| {
                        h.join()
                            .unwrap_or_else(|_| Err(vsphere_client::Error::Protocol("power-on thread panicked".into())))
                    })
                    .collect()
            });
            for (m, r) in members.iter().zip(results) {
                let info = r?;
                records.push(PowerOnRecord {
                    vm: (*m).clone(),
                    boot_group: *g,
                    start_time: info.start_time,
                    complete_time: info.complete_time,
                });
            }
            tracing::info!(group = g, vms = members.len(), ms = started.elapsed().as_millis() as u64, "boot group on");
        }
        Ok(records)
    }

    /// Creates an isolated test network on `hosts`. Refused when any
    /// network of that name exists: a test VM must never land on a real
    /// network because of a name clash.
    pub fn create_test_network(&self, name: &str, hosts: &[String]) -> Result<TestNetwork> {
        let inv = self.client.inventory()?;
        if inv.networks.iter().any(|n| n.name == name) {
            return Err(Error::NetworkExists { name: name.to_string() });
        }
        let mut net = TestNetwork { name: name.to_string(), hosts: Vec::new() };
        let r = (|| -> Result<()> {
            for h in hosts {
                let host = inv.host(h)?;
                let ns = host
                    .network_system
                    .clone()
                    .ok_or_else(|| Error::Settings(format!("host {h} has no network system to add a switch to")))?;
                self.client.add_virtual_switch(&ns, name, 128)?;
                net.hosts.push((h.clone(), ns.clone(), true, false));
                match self.client.add_port_group(&ns, name, name, 0) {
                    Ok(()) => {
                        if let Some(last) = net.hosts.last_mut() {
                            last.3 = true;
                        }
                    }
                    // vCenter has one network object per name in a
                    // datacenter; vcsim refuses the second host's port
                    // group as a duplicate of the network we just made.
                    Err(vsphere_client::Error::AlreadyExists { .. }) if net.hosts.iter().any(|x| x.3) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            Ok(())
        })();
        if let Err(e) = r {
            if let Err(cleanup) = self.remove_test_network(&net) {
                tracing::warn!(network = name, error = %cleanup, "removing a half-made test network failed");
            }
            return Err(e);
        }
        Ok(net)
    }

    /// The test network `name` as it stands on `hosts` (for a cleanup by
    /// another process than the one that made it): what switch and port
    /// group each host has.
    pub fn find_test_network(&self, name: &str, hosts: &[String]) -> Result<TestNetwork> {
        let inv = self.client.inventory()?;
        let mut net = TestNetwork { name: name.to_string(), hosts: Vec::new() };
        for h in hosts {
            if let Some(ns) = &inv.host(h)?.network_system {
                let info = self.client.host_network_info(ns)?;
                net.hosts.push((h.clone(), ns.clone(), info.has_vswitch(name), info.has_portgroup(name)));
            }
        }
        Ok(net)
    }

    /// Removes what `create_test_network` added.
    pub fn remove_test_network(&self, net: &TestNetwork) -> Result<()> {
        for (_, ns, switch, pg) in &net.hosts {
            if *pg {
                self.client.remove_port_group(ns, &net.name)?;
            }
            if *switch {
                self.client.remove_virtual_switch(ns, &net.name)?;
            }
        }
        Ok(())
    }

    /// Powers off and removes every VM of failover test `test_id`; returns
    /// their names.
    pub fn remove_test_vms(&self, test_id: &str) -> Result<Vec<String>> {
        let mut removed = Vec::new();
        for v in self.client.vms()? {
            if v.extra(MARK_TEST) == Some(test_id) && v.extra(MARK_ROLE) == Some(ROLE_RECOVERY) {
                self.client.power_off_and_destroy(&v.moref)?;
                removed.push(v.name);
            }
        }
        Ok(removed)
    }
}
