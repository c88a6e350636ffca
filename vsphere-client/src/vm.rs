//! VM operations: create from a spec, reconfigure (disks, NICs, extra
//! config), power on/off, destroy.
//!
//! Elements are written in vim25 schema order: real vCenters reject a
//! `VirtualMachineConfigSpec` whose children are out of order.

use crate::client::{Client, TaskInfo};
use crate::error::{Error, Result};
use crate::inventory::Network;
use crate::moref::MoRef;
use crate::xml::Writer;

/// A disk to add.
#[derive(Debug, Clone)]
pub struct DiskSpec {
    pub capacity_bytes: u64,
    pub thin: bool,
    /// The datastore's name; the VM's own when `None`.
    pub datastore: Option<String>,
}

/// A network adapter to add, on a network from the inventory.
#[derive(Debug, Clone)]
pub struct NicSpec {
    pub network: Network,
    /// `VirtualVmxnet3` unless set.
    pub adapter: Option<String>,
}

/// What a new VM is made of.
#[derive(Debug, Clone)]
pub struct VmSpec {
    pub name: String,
    pub guest_id: String,
    pub num_cpus: u32,
    pub memory_mb: u64,
    /// Where its configuration files go.
    pub datastore: String,
    pub disks: Vec<DiskSpec>,
    pub nics: Vec<NicSpec>,
    pub annotation: Option<String>,
    pub extra_config: Vec<(String, String)>,
}

/// A change to an existing VM.
#[derive(Debug, Clone, Default)]
pub struct VmChange {
    pub add_disks: Vec<DiskSpec>,
    pub add_nics: Vec<NicSpec>,
    /// Device keys of disks or NICs to remove (disk files are kept: a
    /// recovery VM's disks may be replicas).
    pub remove_devices: Vec<i32>,
    pub extra_config: Vec<(String, String)>,
}

/// The SCSI controller a new VM gets, by its temporary key.
const NEW_CONTROLLER_KEY: i32 = -100;

/// SCSI unit numbers a disk may take (7 is the controller's own).
fn scsi_units() -> impl Iterator<Item = i32> {
    (0..16).filter(|u| *u != 7)
}

fn write_disk(w: &mut Writer, key: i32, controller: i32, unit: i32, disk: &DiskSpec, default_ds: &str) {
    let ds = disk.datastore.as_deref().unwrap_or(default_ds);
    w.open("deviceChange").text("operation", "add").text("fileOperation", "create");
    w.open_typed("device", "VirtualDisk").text("key", &key.to_string());
    w.open_typed("backing", "VirtualDiskFlatVer2BackingInfo")
        .text("fileName", &format!("[{ds}]"))
        .text("diskMode", "persistent")
        .text("thinProvisioned", if disk.thin { "true" } else { "false" })
        .close("backing");
    w.text("controllerKey", &controller.to_string())
        .text("unitNumber", &unit.to_string())
        .text("capacityInKB", &disk.capacity_bytes.div_ceil(1024).to_string())
        .close("device")
        .close("deviceChange");
}

fn write_nic(w: &mut Writer, key: i32, nic: &NicSpec) {
    let adapter = nic.adapter.as_deref().unwrap_or("VirtualVmxnet3");
    w.open("deviceChange").text("operation", "add");
    w.open_typed("device", adapter).text("key", &key.to_string());
    match &nic.network.distributed {
        None => {
            w.open_typed("backing", "VirtualEthernetCardNetworkBackingInfo")
                .text("deviceName", &nic.network.name)
                .moref("network", &nic.network.moref)
                .close("backing");
        }
        Some((portgroup_key, switch_uuid)) => {
            w.open_typed("backing", "VirtualEthernetCardDistributedVirtualPortBackingInfo")
                .open("port")
                .text("switchUuid", switch_uuid)
                .text("portgroupKey", portgroup_key)
                .close("port")
                .close("backing");
        }
    }
    w.open("connectable")
        .text("startConnected", "true")
        .text("allowGuestControl", "true")
        .text("connected", "true")
        .close("connectable");
    w.text("addressType", "generated").close("device").close("deviceChange");
}

fn write_extra_config(w: &mut Writer, extra: &[(String, String)]) {
    for (k, v) in extra {
        w.open("extraConfig").text("key", k).typed_text("value", "xsd:string", v).close("extraConfig");
    }
}

fn check_units(vm: &str, n: usize) -> Result<()> {
    if n > scsi_units().count() {
        return Err(Error::InvalidArgument {
            property: Some("disks".into()),
            message: format!("VM {vm:?} would have {n} disks; one SCSI controller takes at most 15"),
        });
    }
    Ok(())
}

impl Client {
    /// Creates a VM in `folder` and `pool`, on `host`, and returns it.
    pub fn create_vm(&self, folder: &MoRef, pool: &MoRef, host: Option<&MoRef>, spec: &VmSpec) -> Result<MoRef> {
        check_units(&spec.name, spec.disks.len())?;
        let info = self.run_task("CreateVM_Task", folder, |w| {
            w.open("config").text("name", &spec.name).text("guestId", &spec.guest_id);
            if let Some(a) = &spec.annotation {
                w.text("annotation", a);
            }
            w.open("files").text("vmPathName", &format!("[{}]", spec.datastore)).close("files");
            w.text("numCPUs", &spec.num_cpus.to_string()).text("memoryMB", &spec.memory_mb.to_string());
            w.open("deviceChange").text("operation", "add");
            w.open_typed("device", "VirtualLsiLogicController")
                .text("key", &NEW_CONTROLLER_KEY.to_string())
                .text("busNumber", "0")
                .text("sharedBus", "noSharing")
                .close("device")
                .close("deviceChange");
            for (i, (disk, unit)) in spec.disks.iter().zip(scsi_units()).enumerate() {
                write_disk(w, -1 - i as i32, NEW_CONTROLLER_KEY, unit, disk, &spec.datastore);
            }
            for (i, nic) in spec.nics.iter().enumerate() {
                write_nic(w, -200 - i as i32, nic);
            }
            write_extra_config(w, &spec.extra_config);
            w.close("config");
            w.moref("pool", pool);
            if let Some(h) = host {
                w.moref("host", h);
            }
        })?;
        info.result_moref()
    }

    /// Applies `change` to `vm`.
    pub fn reconfigure_vm(&self, vm: &MoRef, change: &VmChange) -> Result<()> {
        let current =
            if change.add_disks.is_empty() && change.remove_devices.is_empty() { None } else { Some(self.vm(vm)?) };
        let mut free_units = Vec::new();
        let mut controller = NEW_CONTROLLER_KEY;
        let mut default_ds = String::new();
        // The devices to remove, whole, as the server knows them: servers
        // read a removed device's backing to unhook its network.
        let mut removed = Vec::new();
        if let Some(cur) = &current {
            for key in &change.remove_devices {
                let device = cur
                    .disks
                    .iter()
                    .find(|d| d.key == *key)
                    .map(|d| &d.device)
                    .or_else(|| cur.nics.iter().find(|n| n.key == *key).map(|n| &n.device))
                    .ok_or_else(|| Error::NotFound {
                        kind: "device",
                        name: format!("key {key} on VM {}", cur.name),
                        known: Vec::new(),
                    })?;
                let mut device = device.clone();
                device.name = "device".into();
                removed.push(device);
            }
            if !change.add_disks.is_empty() {
                controller = *cur.scsi_controllers.first().ok_or_else(|| Error::InvalidArgument {
                    property: Some("disks".into()),
                    message: format!("VM {} has no SCSI controller to add disks to", cur.name),
                })?;
                let used: Vec<i32> = cur
                    .disks
                    .iter()
                    .filter(|d| d.controller_key == Some(controller))
                    .filter_map(|d| d.unit_number)
                    .collect();
                free_units = scsi_units().filter(|u| !used.contains(u)).collect();
                check_units(&cur.name, used.len() + change.add_disks.len())?;
                default_ds = cur.disks.first().map(|d| datastore_name(&d.file)).unwrap_or_default();
            }
        }
        self.run_task("ReconfigVM_Task", vm, |w| {
            w.open("spec");
            for (i, (disk, unit)) in change.add_disks.iter().zip(free_units.iter()).enumerate() {
                write_disk(w, -1 - i as i32, controller, *unit, disk, &default_ds);
            }
            for (i, nic) in change.add_nics.iter().enumerate() {
                write_nic(w, -200 - i as i32, nic);
            }
            // No fileOperation: a removed disk's file stays (it may be a
            // replica).
            for device in &removed {
                w.open("deviceChange").text("operation", "remove").node(device).close("deviceChange");
            }
            write_extra_config(w, &change.extra_config);
            w.close("spec");
        })?;
        Ok(())
    }

    pub fn power_on(&self, vm: &MoRef) -> Result<TaskInfo> {
        self.run_task("PowerOnVM_Task", vm, |_| {})
    }

    pub fn power_off(&self, vm: &MoRef) -> Result<TaskInfo> {
        self.run_task("PowerOffVM_Task", vm, |_| {})
    }

    /// Removes the VM and its files.
    pub fn destroy(&self, obj: &MoRef) -> Result<()> {
        self.run_task("Destroy_Task", obj, |_| {})?;
        Ok(())
    }

    /// Powers the VM off if it is on, then destroys it.
    pub fn power_off_and_destroy(&self, vm: &MoRef) -> Result<()> {
        let state = self.retrieve_one(vm, &["runtime.powerState"])?;
        if state.text("runtime.powerState") == Some("poweredOn") {
            self.power_off(vm)?;
        }
        self.destroy(vm)
    }
}

/// `ds1` of `[ds1] folder/file.vmdk`.
pub fn datastore_name(path: &str) -> String {
    path.strip_prefix('[').and_then(|p| p.split_once(']')).map(|(ds, _)| ds.to_string()).unwrap_or_default()
}
