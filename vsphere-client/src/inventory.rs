//! The inventory: datacenters, compute resources (clusters and standalone
//! hosts), hosts, datastores, networks, resource pools and VMs with their
//! disks and NICs, each read in one retrieval through a container view.

use std::collections::HashMap;

use crate::client::{Client, ObjectContent, PropertySpec};
use crate::error::{Error, Result};
use crate::moref::MoRef;
use crate::xml::Node;

#[derive(Debug, Clone)]
pub struct Datacenter {
    pub moref: MoRef,
    pub name: String,
    pub vm_folder: MoRef,
    pub host_folder: MoRef,
    pub network_folder: MoRef,
}

/// A cluster, or the compute resource of a standalone host.
#[derive(Debug, Clone)]
pub struct ComputeResource {
    pub moref: MoRef,
    pub name: String,
    pub datacenter: MoRef,
    pub is_cluster: bool,
    pub resource_pool: MoRef,
    pub hosts: Vec<MoRef>,
}

#[derive(Debug, Clone)]
pub struct Host {
    pub moref: MoRef,
    pub name: String,
    pub datacenter: MoRef,
    pub compute_resource: MoRef,
    pub datastores: Vec<MoRef>,
    pub networks: Vec<MoRef>,
    pub network_system: Option<MoRef>,
    /// connected, disconnected, notResponding.
    pub connection_state: String,
    pub in_maintenance: bool,
}

#[derive(Debug, Clone)]
pub struct Datastore {
    pub moref: MoRef,
    pub name: String,
    pub datacenter: MoRef,
    pub capacity: u64,
    /// Bytes free as the server reports them: a vim25 `long`, and below
    /// zero on a datastore whose thin disks promise more than it holds
    /// (vcsim reports that on a small disk; so can a real one).
    pub free_space: i64,
    pub accessible: bool,
}

#[derive(Debug, Clone)]
pub struct Network {
    pub moref: MoRef,
    pub name: String,
    pub datacenter: MoRef,
    /// For a distributed port group: its key and its switch's UUID, which a
    /// NIC backing needs.
    pub distributed: Option<(String, String)>,
}

#[derive(Debug, Clone)]
pub struct ResourcePool {
    pub moref: MoRef,
    pub name: String,
    pub owner: MoRef,
}

/// Everything but the VMs, as of one retrieval.
#[derive(Debug, Clone, Default)]
pub struct Inventory {
    pub datacenters: Vec<Datacenter>,
    pub compute_resources: Vec<ComputeResource>,
    pub hosts: Vec<Host>,
    pub datastores: Vec<Datastore>,
    pub networks: Vec<Network>,
    pub resource_pools: Vec<ResourcePool>,
}

fn name_of(o: &ObjectContent) -> Result<String> {
    o.text("name").map(str::to_string).ok_or_else(|| Error::Protocol(format!("{} has no name", o.obj)))
}

fn req_moref(o: &ObjectContent, path: &str) -> Result<MoRef> {
    o.moref(path)?.ok_or_else(|| Error::Protocol(format!("{} has no {path}", o.obj)))
}

impl Client {
    /// Reads the whole inventory but the VMs in one round-trip series.
    pub fn inventory(&self) -> Result<Inventory> {
        let root = self.content().root_folder.clone();
        let specs = [
            PropertySpec { kind: "Folder", paths: &["name", "parent"] },
            PropertySpec { kind: "Datacenter", paths: &["name", "parent", "vmFolder", "hostFolder", "networkFolder"] },
            PropertySpec { kind: "ComputeResource", paths: &["name", "parent", "resourcePool", "host"] },
            PropertySpec {
                kind: "HostSystem",
                paths: &[
                    "name",
                    "parent",
                    "datastore",
                    "network",
                    "configManager.networkSystem",
                    "runtime.connectionState",
                    "runtime.inMaintenanceMode",
                ],
            },
            PropertySpec {
                kind: "Datastore",
                paths: &["name", "parent", "summary.capacity", "summary.freeSpace", "summary.accessible"],
            },
            PropertySpec { kind: "Network", paths: &["name", "parent"] },
            PropertySpec { kind: "DistributedVirtualPortgroup", paths: &["key", "config.distributedVirtualSwitch"] },
            PropertySpec { kind: "DistributedVirtualSwitch", paths: &["name", "parent", "uuid"] },
            PropertySpec { kind: "ResourcePool", paths: &["name", "parent", "owner"] },
        ];
        let objects = self.retrieve_from_view(&root, &specs)?;

        // Datacenter of each entity by walking parents.
        let mut parents: HashMap<MoRef, MoRef> = HashMap::new();
        for o in &objects {
            if let Some(p) = o.moref("parent")? {
                parents.insert(o.obj.clone(), p);
            }
        }
        let datacenter_of = |m: &MoRef| -> Result<MoRef> {
            let mut cur = m.clone();
            for _ in 0..64 {
                if cur.kind == "Datacenter" {
                    return Ok(cur);
                }
                match parents.get(&cur) {
                    Some(p) => cur = p.clone(),
                    None => break,
                }
            }
            Err(Error::Protocol(format!("{m} is in no datacenter")))
        };
        let switch_uuid: HashMap<MoRef, String> = objects
            .iter()
            .filter(|o| o.obj.kind.ends_with("DistributedVirtualSwitch"))
            .filter_map(|o| o.text("uuid").map(|u| (o.obj.clone(), u.to_string())))
            .collect();

        let mut inv = Inventory::default();
        for o in &objects {
            match o.obj.kind.as_str() {
                "Datacenter" => inv.datacenters.push(Datacenter {
                    moref: o.obj.clone(),
                    name: name_of(o)?,
                    vm_folder: req_moref(o, "vmFolder")?,
                    host_folder: req_moref(o, "hostFolder")?,
                    network_folder: req_moref(o, "networkFolder")?,
                }),
                "ComputeResource" | "ClusterComputeResource" => inv.compute_resources.push(ComputeResource {
                    moref: o.obj.clone(),
                    name: name_of(o)?,
                    datacenter: datacenter_of(&o.obj)?,
                    is_cluster: o.obj.kind == "ClusterComputeResource",
                    resource_pool: req_moref(o, "resourcePool")?,
                    hosts: o.morefs("host")?,
                }),
                "HostSystem" => inv.hosts.push(Host {
                    moref: o.obj.clone(),
                    name: name_of(o)?,
                    datacenter: datacenter_of(&o.obj)?,
                    compute_resource: req_moref(o, "parent")?,
                    datastores: o.morefs("datastore")?,
                    networks: o.morefs("network")?,
                    network_system: o.moref("configManager.networkSystem")?,
                    connection_state: o.text("runtime.connectionState").unwrap_or("unknown").to_string(),
                    in_maintenance: o.text("runtime.inMaintenanceMode") == Some("true"),
                }),
                "Datastore" => inv.datastores.push(datastore_from(o, datacenter_of(&o.obj)?)?),
                "Network" | "DistributedVirtualPortgroup" | "OpaqueNetwork" => {
                    let distributed = if o.obj.kind == "DistributedVirtualPortgroup" {
                        let key = o.text("key").unwrap_or(&o.obj.value).to_string();
                        let dvs = o.moref("config.distributedVirtualSwitch")?;
                        let uuid = dvs.and_then(|d| switch_uuid.get(&d).cloned()).unwrap_or_default();
                        Some((key, uuid))
                    } else {
                        None
                    };
                    inv.networks.push(Network {
                        moref: o.obj.clone(),
                        name: name_of(o)?,
                        datacenter: datacenter_of(&o.obj)?,
                        distributed,
                    })
                }
                "ResourcePool" => inv.resource_pools.push(ResourcePool {
                    moref: o.obj.clone(),
                    name: name_of(o)?,
                    owner: req_moref(o, "owner")?,
                }),
                _ => {}
            }
        }
        Ok(inv)
    }
}

fn not_found<T>(kind: &'static str, name: &str, known: impl Iterator<Item = String>) -> Result<T> {
    let mut known: Vec<String> = known.collect();
    known.sort();
    known.truncate(20);
    Err(Error::NotFound { kind, name: name.to_string(), known })
}

impl Inventory {
    pub fn host(&self, name: &str) -> Result<&Host> {
        match self.hosts.iter().find(|h| h.name == name) {
            Some(h) => Ok(h),
            None => not_found("host", name, self.hosts.iter().map(|h| h.name.clone())),
        }
    }

    pub fn host_by_ref(&self, m: &MoRef) -> Option<&Host> {
        self.hosts.iter().find(|h| &h.moref == m)
    }

    pub fn cluster(&self, name: &str) -> Result<&ComputeResource> {
        match self.compute_resources.iter().find(|c| c.is_cluster && c.name == name) {
            Some(c) => Ok(c),
            None => not_found(
                "cluster",
                name,
                self.compute_resources.iter().filter(|c| c.is_cluster).map(|c| c.name.clone()),
            ),
        }
    }

    pub fn compute_resource(&self, m: &MoRef) -> Option<&ComputeResource> {
        self.compute_resources.iter().find(|c| &c.moref == m)
    }

    pub fn datacenter(&self, m: &MoRef) -> Option<&Datacenter> {
        self.datacenters.iter().find(|d| &d.moref == m)
    }

    /// The host's datacenter, an error when the inventory is inconsistent.
    pub fn datacenter_of(&self, host: &Host) -> Result<&Datacenter> {
        self.datacenter(&host.datacenter)
            .ok_or_else(|| Error::Protocol(format!("host {} names an unknown datacenter", host.name)))
    }

    /// The root resource pool of the host's cluster or standalone resource.
    pub fn resource_pool_of(&self, host: &Host) -> Result<MoRef> {
        self.compute_resource(&host.compute_resource)
            .map(|c| c.resource_pool.clone())
            .ok_or_else(|| Error::Protocol(format!("host {} has no compute resource", host.name)))
    }

    /// A datastore by name that `host` mounts.
    pub fn datastore_for(&self, host: &Host, name: &str) -> Result<&Datastore> {
        let mounted = || self.datastores.iter().filter(|d| host.datastores.contains(&d.moref));
        match mounted().find(|d| d.name == name) {
            Some(d) => Ok(d),
            None => not_found("datastore", &format!("{name} on host {}", host.name), mounted().map(|d| d.name.clone())),
        }
    }

    /// A network by name in the host's datacenter.
    pub fn network_for(&self, host: &Host, name: &str) -> Result<&Network> {
        let here = || self.networks.iter().filter(|n| n.datacenter == host.datacenter);
        match here().find(|n| n.name == name) {
            Some(n) => Ok(n),
            None => not_found("network", name, here().map(|n| n.name.clone())),
        }
    }

    /// Hosts of a cluster, in name order.
    pub fn hosts_of(&self, cluster: &ComputeResource) -> Vec<&Host> {
        let mut hosts: Vec<&Host> = self.hosts.iter().filter(|h| cluster.hosts.contains(&h.moref)).collect();
        hosts.sort_by(|a, b| a.name.cmp(&b.name));
        hosts
    }
}

/// A virtual disk of a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VirtualDiskInfo {
    pub key: i32,
    pub label: String,
    pub capacity_bytes: u64,
    /// `[datastore] folder/file.vmdk`
    pub file: String,
    pub datastore: Option<MoRef>,
    pub controller_key: Option<i32>,
    pub unit_number: Option<i32>,
    pub thin: bool,
    /// The device as the server described it (a removal sends it back).
    pub device: Node,
}

/// A network adapter of a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NicInfo {
    pub key: i32,
    pub label: String,
    pub adapter: String,
    /// The port group name of a standard network, or the distributed port
    /// group key.
    pub network_name: String,
    pub network: Option<MoRef>,
    pub mac: Option<String>,
    /// The device as the server described it (a removal sends it back).
    pub device: Node,
}

#[derive(Debug, Clone)]
pub struct Vm {
    pub moref: MoRef,
    pub name: String,
    pub host: Option<MoRef>,
    pub resource_pool: Option<MoRef>,
    /// poweredOn, poweredOff, suspended.
    pub power_state: String,
    pub template: bool,
    pub instance_uuid: String,
    pub guest_id: String,
    pub num_cpu: u32,
    pub memory_mb: u64,
    pub disks: Vec<VirtualDiskInfo>,
    pub nics: Vec<NicInfo>,
    /// The SCSI controllers' keys, for adding disks.
    pub scsi_controllers: Vec<i32>,
    pub extra_config: Vec<(String, String)>,
    /// vApp properties (id, value) of `config.vAppConfig`.
    pub vapp_properties: Vec<(String, String)>,
    pub datastores: Vec<MoRef>,
    pub networks: Vec<MoRef>,
    /// When it was last powered on (server time, xsd:dateTime).
    pub boot_time: Option<String>,
}

impl Vm {
    /// An extra-config value. The last entry of a key wins: vCenter keeps
    /// one per key, but vcsim appends on every reconfigure.
    pub fn extra(&self, key: &str) -> Option<&str> {
        self.extra_config.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// A vApp property as deployed: from `config.vAppConfig`, or from extra
    /// config where the server keeps them there (vcsim).
    pub fn vapp_property(&self, key: &str) -> Option<&str> {
        self.vapp_properties.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str()).or_else(|| self.extra(key))
    }
}

const VM_PATHS: &[&str] = &[
    "name",
    "runtime.host",
    "resourcePool",
    "runtime.powerState",
    "config.template",
    "config.instanceUuid",
    "config.guestId",
    "config.hardware.numCPU",
    "config.hardware.memoryMB",
    "config.hardware.device",
    "config.extraConfig",
    "config.vAppConfig",
    "datastore",
    "network",
    "summary.runtime.bootTime",
];

const NIC_TYPES: &[&str] = &[
    "VirtualVmxnet3",
    "VirtualVmxnet2",
    "VirtualVmxnet",
    "VirtualE1000",
    "VirtualE1000e",
    "VirtualPCNet32",
    "VirtualSriovEthernetCard",
    "VirtualVmxnet3Vrdma",
];

fn device_key(d: &Node) -> Result<i32> {
    d.parse_of("key")?
        .ok_or_else(|| Error::Protocol(format!("a {} device has no key", d.xsi_type.as_deref().unwrap_or("?"))))
}

fn vm_from(o: &ObjectContent) -> Result<Vm> {
    let mut disks = Vec::new();
    let mut nics = Vec::new();
    let mut scsi_controllers = Vec::new();
    if let Some(devs) = o.get("config.hardware.device") {
        for d in &devs.children {
            let t = d.xsi_type.as_deref().unwrap_or("");
            let label = d.child("deviceInfo").and_then(|i| i.text_of("label")).unwrap_or_default().to_string();
            if t == "VirtualDisk" {
                let backing = d.child("backing");
                let bytes: Option<u64> = d.parse_of("capacityInBytes")?;
                let kb: Option<u64> = d.parse_of("capacityInKB")?;
                disks.push(VirtualDiskInfo {
                    key: device_key(d)?,
                    label,
                    capacity_bytes: bytes.or(kb.and_then(|k| k.checked_mul(1024))).unwrap_or(0),
                    file: backing.and_then(|b| b.text_of("fileName")).unwrap_or_default().to_string(),
                    datastore: backing.map(|b| b.moref_of("datastore")).transpose()?.flatten(),
                    controller_key: d.parse_of("controllerKey")?,
                    unit_number: d.parse_of("unitNumber")?,
                    thin: backing.and_then(|b| b.text_of("thinProvisioned")) == Some("true"),
                    device: d.clone(),
                });
            } else if NIC_TYPES.contains(&t) {
                let backing = d.child("backing");
                let network_name = backing
                    .and_then(|b| {
                        b.text_of("deviceName").or_else(|| b.child("port").and_then(|p| p.text_of("portgroupKey")))
                    })
                    .unwrap_or_default()
                    .to_string();
                nics.push(NicInfo {
                    key: device_key(d)?,
                    label,
                    adapter: t.to_string(),
                    network_name,
                    network: backing.map(|b| b.moref_of("network")).transpose()?.flatten(),
                    mac: d.text_of("macAddress").map(str::to_string),
                    device: d.clone(),
                });
            } else if t.ends_with("SCSIController")
                || t == "VirtualLsiLogicController"
                || t == "ParaVirtualSCSIController"
            {
                scsi_controllers.push(device_key(d)?);
            }
        }
    }
    let extra_config = o
        .get("config.extraConfig")
        .map(|v| {
            v.children
                .iter()
                .filter_map(|ov| Some((ov.text_of("key")?.to_string(), ov.text_of("value").unwrap_or("").to_string())))
                .collect()
        })
        .unwrap_or_default();
    let vapp_properties = o
        .get("config.vAppConfig")
        .map(|v| {
            v.children_named("property")
                .filter_map(|p| Some((p.text_of("id")?.to_string(), p.text_of("value").unwrap_or("").to_string())))
                .collect()
        })
        .unwrap_or_default();
    Ok(Vm {
        moref: o.obj.clone(),
        name: name_of(o)?,
        host: o.moref("runtime.host")?,
        resource_pool: o.moref("resourcePool")?,
        power_state: o.text("runtime.powerState").unwrap_or("unknown").to_string(),
        template: o.text("config.template") == Some("true"),
        instance_uuid: o.text("config.instanceUuid").unwrap_or_default().to_string(),
        guest_id: o.text("config.guestId").unwrap_or_default().to_string(),
        num_cpu: o.number("config.hardware.numCPU")?.unwrap_or(0),
        memory_mb: o.number("config.hardware.memoryMB")?.unwrap_or(0),
        disks,
        nics,
        scsi_controllers,
        extra_config,
        vapp_properties,
        datastores: o.morefs("datastore")?,
        networks: o.morefs("network")?,
        boot_time: o.text("summary.runtime.bootTime").map(str::to_string),
    })
}

/// The VMs of a listing. A VM listed without a name is being created (an
/// import in progress: vcsim lists it so for a moment) and is passed over,
/// not an error for the whole listing: another deploy running at the same
/// time must not fail because of it.
fn vms_from(objects: &[ObjectContent]) -> Result<Vec<Vm>> {
    objects.iter().filter(|o| o.text("name").is_some()).map(vm_from).collect()
}

impl Client {
    /// Every VM with its disks and NICs, in one round-trip series.
    pub fn vms(&self) -> Result<Vec<Vm>> {
        let root = self.content().root_folder.clone();
        let objects = self.retrieve_from_view(&root, &[PropertySpec { kind: "VirtualMachine", paths: VM_PATHS }])?;
        vms_from(&objects)
    }

    /// One VM.
    pub fn vm(&self, vm: &MoRef) -> Result<Vm> {
        vm_from(&self.retrieve_one(vm, VM_PATHS)?)
    }
}

fn datastore_from(o: &ObjectContent, datacenter: MoRef) -> Result<Datastore> {
    Ok(Datastore {
        moref: o.obj.clone(),
        name: name_of(o)?,
        datacenter,
        capacity: o.number("summary.capacity")?.unwrap_or(0),
        free_space: o.number("summary.freeSpace")?.unwrap_or(0),
        accessible: o.text("summary.accessible") != Some("false"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_over_committed_datastore_reports_negative_free_space_and_is_listed() {
        let doc =
            br#"<objects xmlns:x="http://www.w3.org/2001/XMLSchema-instance"><obj type="Datastore">datastore-5</obj>
          <propSet><name>name</name><val x:type="xsd:string">LocalDS_0</val></propSet>
          <propSet><name>summary.capacity</name><val x:type="xsd:long">10737418240</val></propSet>
          <propSet><name>summary.freeSpace</name><val x:type="xsd:long">-2286350336</val></propSet></objects>"#;
        let node = crate::xml::parse(doc).expect("parses");
        let o = ObjectContent::from_node(&node).expect("object");
        let ds = datastore_from(&o, MoRef::new("Datacenter", "datacenter-2")).expect("a datastore");
        assert_eq!((ds.capacity, ds.free_space, ds.accessible), (10737418240, -2286350336, true));
    }

    #[test]
    fn a_vm_listed_without_a_name_is_passed_over_in_a_listing_but_not_alone() {
        let doc = br#"<r xmlns:x="http://www.w3.org/2001/XMLSchema-instance"><objects>
          <obj type="VirtualMachine">vm-1</obj>
          <propSet><name>name</name><val x:type="xsd:string">kept</val></propSet>
        </objects><objects>
          <obj type="VirtualMachine">vm-2</obj>
          <propSet><name>runtime.powerState</name><val x:type="VirtualMachinePowerState">poweredOff</val></propSet>
        </objects></r>"#;
        let node = crate::xml::parse(doc).expect("parses");
        let objects: Vec<ObjectContent> =
            node.children.iter().map(|o| ObjectContent::from_node(o).expect("object")).collect();
        let vms = vms_from(&objects).expect("a listing");
        assert_eq!(vms.iter().map(|v| v.name.as_str()).collect::<Vec<_>>(), ["kept"]);
        assert!(vm_from(&objects[1]).is_err_and(|e| e.to_string().contains("vm-2 has no name")));
    }

    #[test]
    fn disks_nics_and_extra_config_are_read_from_device_lists() {
        let doc = br#"<objects xmlns:x="http://www.w3.org/2001/XMLSchema-instance">
          <obj type="VirtualMachine">vm-1</obj>
          <propSet><name>name</name><val x:type="xsd:string">a &amp; b</val></propSet>
          <propSet><name>config.hardware.device</name><val x:type="ArrayOfVirtualDevice">
            <VirtualDevice x:type="VirtualLsiLogicController"><key>1000</key><busNumber>0</busNumber></VirtualDevice>
            <VirtualDevice x:type="VirtualDisk"><key>2000</key><deviceInfo><label>Hard disk 1</label></deviceInfo>
              <backing x:type="VirtualDiskFlatVer2BackingInfo"><fileName>[ds1] a/a.vmdk</fileName><datastore type="Datastore">ds-1</datastore><thinProvisioned>true</thinProvisioned></backing>
              <controllerKey>1000</controllerKey><unitNumber>0</unitNumber><capacityInKB>1024</capacityInKB><capacityInBytes>1048576</capacityInBytes></VirtualDevice>
            <VirtualDevice x:type="VirtualVmxnet3"><key>4000</key><backing x:type="VirtualEthernetCardNetworkBackingInfo"><deviceName>VM Network</deviceName><network type="Network">network-7</network></backing><macAddress>00:0c:29:00:00:01</macAddress></VirtualDevice>
          </val></propSet>
          <propSet><name>config.extraConfig</name><val x:type="ArrayOfOptionValue"><OptionValue x:type="OptionValue"><key>ip</key><value x:type="xsd:string">192.0.2.1</value></OptionValue></val></propSet>
        </objects>"#;
        let node = crate::xml::parse(doc).expect("parses");
        let o = ObjectContent::from_node(&node).expect("object");
        let vm = vm_from(&o).expect("vm");
        assert_eq!(vm.name, "a & b");
        assert_eq!(vm.disks.len(), 1);
        assert_eq!(vm.disks[0].capacity_bytes, 1 << 20);
        assert_eq!(vm.disks[0].datastore, Some(MoRef::new("Datastore", "ds-1")));
        assert!(vm.disks[0].thin);
        assert_eq!(vm.nics[0].network_name, "VM Network");
        assert_eq!(vm.scsi_controllers, vec![1000]);
        assert_eq!(vm.extra("ip"), Some("192.0.2.1"));
    }

    #[test]
    fn a_bad_number_from_the_server_is_an_error_not_a_panic() {
        let doc = br#"<objects xmlns:x="http://www.w3.org/2001/XMLSchema-instance"><obj type="VirtualMachine">vm-1</obj>
          <propSet><name>name</name><val>n</val></propSet>
          <propSet><name>config.hardware.device</name><val><VirtualDevice x:type="VirtualDisk"><key>x</key></VirtualDevice></val></propSet></objects>"#;
        let node = crate::xml::parse(doc).expect("parses");
        let o = ObjectContent::from_node(&node).expect("object");
        assert!(matches!(vm_from(&o), Err(Error::Protocol(_))));
    }
}
