//! The VDSA OVA: an OVF 1.0 descriptor (the appliance's virtual hardware,
//! its vApp properties, the ISO transport of its OVF environment), two
//! streamOptimized VMDKs (the boot disk, and a blank data disk for the
//! journals that the appliance formats at first boot), and a SHA-256
//! manifest, in a tar with the descriptor first.

use crate::appliance::build_appliance_disk;
use crate::debian::DebianRoot;
use crate::{io, run, sha256_file, Result};
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The vApp properties the OVA asks for at deploy: (key, label,
/// description, password). The keys are the appliance's
/// (`protection_groups::appliance::APPLIANCE_PROPERTIES`).
pub const VAPP_PROPERTIES: &[(&str, &str, &str, bool)] = &[
    ("ip", "IP address", "The VDSA's IPv4 address on the replication network", false),
    ("netmask", "Netmask", "Netmask of that network, e.g. 255.255.255.0", false),
    ("gateway", "Gateway", "Default gateway (empty for none)", false),
    ("dns", "DNS servers", "Comma-separated DNS servers, at most 3 (empty for none)", false),
    ("site_manager", "Site manager", "HOST:PORT of this site's site manager", false),
    ("registration_token", "Registration token", "One-time token the site manager issued for this VDSA", true),
];

/// The OVF network the appliance's NIC is mapped from at deploy.
pub const OVF_NETWORK: &str = "VDSA Network";

/// The boot disk's and the data disk's file names in the OVA.
pub const BOOT_DISK_FILE: &str = "vdsa-disk1.vmdk";
pub const DATA_DISK_FILE: &str = "vdsa-disk2.vmdk";

/// The data disk's capacity (thin: it costs what the journals use).
pub const DATA_DISK_BYTES: u64 = 32 << 30;

/// The guest OS type: "Other Linux (64-bit)", which every vSphere from 6.5
/// on knows (debian12_64Guest is vSphere 8 only).
pub const GUEST_OS_TYPE: &str = "otherLinux64Guest";

/// What the OVA is built from.
#[derive(Debug, Clone)]
pub struct OvaInputs {
    /// The `vdsa` binary for the appliance.
    pub vdsa: PathBuf,
    pub version: String,
    /// Debian's packages the appliance is made of.
    pub debian: DebianRoot,
    /// The .ova to write.
    pub out: PathBuf,
}

/// What was built.
#[derive(Debug, Clone)]
pub struct OvaBuilt {
    pub path: PathBuf,
    /// (file name in the OVA, SHA-256 hex), as in the manifest.
    pub files: Vec<(String, String)>,
    /// The boot disk's capacity in bytes.
    pub disk_capacity: u64,
    /// The .ova's size in bytes.
    pub size: u64,
}

/// A raw image converted to a streamOptimized VMDK.
fn vmdk(raw: &Path, out: &Path) -> Result<u64> {
    run(Command::new("qemu-img")
        .args(["convert", "-q", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized"])
        .arg(raw)
        .arg(out))?;
    Ok(fs::metadata(out).map_err(io("reading the VMDK's size"))?.len())
}

/// Builds the VDSA OVA.
pub fn build_ova(inputs: &OvaInputs) -> Result<OvaBuilt> {
    let work = tempfile::tempdir().map_err(io("making a work folder"))?;
    let boot_raw = work.path().join("boot.raw");
    let boot = build_appliance_disk(&inputs.debian, &inputs.vdsa, &boot_raw)?;
    let boot_capacity = boot.data_offset;
    let data_raw = work.path().join("data.raw");
    fs::File::create(&data_raw).and_then(|f| f.set_len(DATA_DISK_BYTES)).map_err(io("making the data disk"))?;
    let boot_size = vmdk(&boot_raw, &work.path().join(BOOT_DISK_FILE))?;
    let data_size = vmdk(&data_raw, &work.path().join(DATA_DISK_FILE))?;

    let ovf_name = "vdsa.ovf";
    let ovf = descriptor(&inputs.version, [(boot_size, boot_capacity), (data_size, DATA_DISK_BYTES)]);
    fs::write(work.path().join(ovf_name), &ovf).map_err(io("writing the descriptor"))?;

    let mut files = Vec::new();
    for name in [ovf_name, BOOT_DISK_FILE, DATA_DISK_FILE] {
        files.push((name.to_string(), sha256_file(&work.path().join(name))?));
    }
    let mf_name = "vdsa.mf";
    let manifest: String = files.iter().map(|(n, h)| format!("SHA256({n})= {h}\n")).collect();
    fs::write(work.path().join(mf_name), &manifest).map_err(io("writing the manifest"))?;

    // OVF 1.x: the descriptor first, then the manifest, then the disks;
    // ustar headers.
    if let Some(parent) = inputs.out.parent() {
        fs::create_dir_all(parent).map_err(io(format!("creating {}", parent.display())))?;
    }
    let tmp = inputs.out.with_extension("ova.partial");
    let out = fs::File::create(&tmp).map_err(io(format!("creating {}", tmp.display())))?;
    let mut tar = tar::Builder::new(out);
    for name in [ovf_name, mf_name, BOOT_DISK_FILE, DATA_DISK_FILE] {
        let p = work.path().join(name);
        let mut f = fs::File::open(&p).map_err(io(format!("opening {}", p.display())))?;
        let mut h = tar::Header::new_ustar();
        h.set_size(f.metadata().map_err(io("stat"))?.len());
        h.set_mode(0o644);
        h.set_mtime(0);
        h.set_cksum();
        tar.append_data(&mut h, name, &mut f).map_err(io(format!("adding {name} to the OVA")))?;
    }
    let f = tar.into_inner().map_err(io("finishing the OVA"))?;
    f.sync_all().map_err(io("syncing the OVA"))?;
    let size = f.metadata().map_err(io("stat the OVA"))?.len();
    fs::rename(&tmp, &inputs.out).map_err(io(format!("renaming to {}", inputs.out.display())))?;
    Ok(OvaBuilt { path: inputs.out.clone(), files, disk_capacity: boot_capacity, size })
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// The OVF 1.0 descriptor: one VM with 2 vCPUs and 4 GiB, a PVSCSI
/// controller with the boot disk and the data disk, an IDE CD-ROM for the
/// OVF environment (transport `iso`), one vmxnet3 NIC on [`OVF_NETWORK`],
/// and a ProductSection with [`VAPP_PROPERTIES`]. `disks`: (file size,
/// capacity) of the boot and the data disk.
pub fn descriptor(version: &str, disks: [(u64, u64); 2]) -> String {
    let mut props = String::new();
    for (key, label, desc, password) in VAPP_PROPERTIES {
        let password = if *password { r#" ovf:password="true""# } else { "" };
        let _ = write!(
            props,
            r#"
      <Property ovf:key="{key}" ovf:type="string" ovf:userConfigurable="true" ovf:value=""{password}>
        <Label>{label}</Label>
        <Description>{desc}</Description>
      </Property>"#,
            label = xml_escape(label),
            desc = xml_escape(desc)
        );
    }
    let version = xml_escape(version);
    let [(boot_size, boot_capacity), (data_size, data_capacity)] = disks;
    format!(
        r#"<?xml version="1.0" encoding="UTF-8"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1"
    xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1"
    xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData"
    xmlns:vssd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData"
    xmlns:vmw="http://www.vmware.com/schema/ovf"
    xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">
  <References>
    <File ovf:href="{BOOT_DISK_FILE}" ovf:id="file1" ovf:size="{boot_size}"/>
    <File ovf:href="{DATA_DISK_FILE}" ovf:id="file2" ovf:size="{data_size}"/>
  </References>
  <DiskSection>
    <Info>The VDSA's boot disk and its data disk (journals)</Info>
    <Disk ovf:capacity="{boot_capacity}" ovf:capacityAllocationUnits="byte" ovf:diskId="vmdisk1" ovf:fileRef="file1"
          ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"/>
    <Disk ovf:capacity="{data_capacity}" ovf:capacityAllocationUnits="byte" ovf:diskId="vmdisk2" ovf:fileRef="file2"
          ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"/>
  </DiskSection>
  <NetworkSection>
    <Info>The networks the VDSA uses</Info>
    <Network ovf:name="{net}">
      <Description>Replication and management network of the VDSA</Description>
    </Network>
  </NetworkSection>
  <VirtualSystem ovf:id="vdsa">
    <Info>Virtual data services appliance</Info>
    <Name>vdsa</Name>
    <ProductSection ovf:required="true">
      <Info>VDSA settings, read by the appliance at every boot from its OVF environment</Info>
      <Product>VDSA</Product>
      <Vendor>Hypervisor-level replication</Vendor>
      <Version>{version}</Version>{props}
    </ProductSection>
    <OperatingSystemSection ovf:id="101" vmw:osType="{GUEST_OS_TYPE}">
      <Info>The guest operating system</Info>
    </OperatingSystemSection>
    <VirtualHardwareSection ovf:transport="iso">
      <Info>Virtual hardware</Info>
      <System>
        <vssd:ElementName>Virtual Hardware Family</vssd:ElementName>
        <vssd:InstanceID>0</vssd:InstanceID>
        <vssd:VirtualSystemIdentifier>vdsa</vssd:VirtualSystemIdentifier>
        <vssd:VirtualSystemType>vmx-13</vssd:VirtualSystemType>
      </System>
      <Item>
        <rasd:AllocationUnits>hertz * 10^6</rasd:AllocationUnits>
        <rasd:Description>Number of virtual CPUs</rasd:Description>
        <rasd:ElementName>2 virtual CPUs</rasd:ElementName>
        <rasd:InstanceID>1</rasd:InstanceID>
        <rasd:ResourceType>3</rasd:ResourceType>
        <rasd:VirtualQuantity>2</rasd:VirtualQuantity>
      </Item>
      <Item>
        <rasd:AllocationUnits>byte * 2^20</rasd:AllocationUnits>
        <rasd:Description>Memory size</rasd:Description>
        <rasd:ElementName>4096 MB of memory</rasd:ElementName>
        <rasd:InstanceID>2</rasd:InstanceID>
        <rasd:ResourceType>4</rasd:ResourceType>
        <rasd:VirtualQuantity>4096</rasd:VirtualQuantity>
      </Item>
      <Item>
        <rasd:Address>0</rasd:Address>
        <rasd:Description>SCSI controller</rasd:Description>
        <rasd:ElementName>SCSI controller 0</rasd:ElementName>
        <rasd:InstanceID>3</rasd:InstanceID>
        <rasd:ResourceSubType>VirtualSCSI</rasd:ResourceSubType>
        <rasd:ResourceType>6</rasd:ResourceType>
      </Item>
      <Item>
        <rasd:Address>0</rasd:Address>
        <rasd:Description>IDE controller</rasd:Description>
        <rasd:ElementName>IDE controller 0</rasd:ElementName>
        <rasd:InstanceID>4</rasd:InstanceID>
        <rasd:ResourceType>5</rasd:ResourceType>
      </Item>
      <Item>
        <rasd:AddressOnParent>0</rasd:AddressOnParent>
        <rasd:ElementName>Hard disk 1</rasd:ElementName>
        <rasd:HostResource>ovf:/disk/vmdisk1</rasd:HostResource>
        <rasd:InstanceID>5</rasd:InstanceID>
        <rasd:Parent>3</rasd:Parent>
        <rasd:ResourceType>17</rasd:ResourceType>
      </Item>
      <Item>
        <rasd:AddressOnParent>1</rasd:AddressOnParent>
        <rasd:ElementName>Hard disk 2</rasd:ElementName>
        <rasd:HostResource>ovf:/disk/vmdisk2</rasd:HostResource>
        <rasd:InstanceID>6</rasd:InstanceID>
        <rasd:Parent>3</rasd:Parent>
        <rasd:ResourceType>17</rasd:ResourceType>
      </Item>
      <Item ovf:required="false">
        <rasd:AddressOnParent>0</rasd:AddressOnParent>
        <rasd:AutomaticAllocation>false</rasd:AutomaticAllocation>
        <rasd:Description>CD-ROM for the OVF environment</rasd:Description>
        <rasd:ElementName>CD/DVD drive 1</rasd:ElementName>
        <rasd:InstanceID>7</rasd:InstanceID>
        <rasd:Parent>4</rasd:Parent>
        <rasd:ResourceType>15</rasd:ResourceType>
      </Item>
      <Item>
        <rasd:AddressOnParent>7</rasd:AddressOnParent>
        <rasd:AutomaticAllocation>true</rasd:AutomaticAllocation>
        <rasd:Connection>{net}</rasd:Connection>
        <rasd:Description>VmxNet3 ethernet adapter on "{net}"</rasd:Description>
        <rasd:ElementName>Network adapter 1</rasd:ElementName>
        <rasd:InstanceID>8</rasd:InstanceID>
        <rasd:ResourceSubType>VmxNet3</rasd:ResourceSubType>
        <rasd:ResourceType>10</rasd:ResourceType>
      </Item>
    </VirtualHardwareSection>
  </VirtualSystem>
</Envelope>
"#,
        net = OVF_NETWORK,
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_ova_asks_for_exactly_the_appliances_properties_and_hides_the_token() {
        let keys: Vec<&str> = super::VAPP_PROPERTIES.iter().map(|p| p.0).collect();
        assert_eq!(keys, protection_groups::appliance::APPLIANCE_PROPERTIES);
        let d = super::descriptor("1", [(1, 2), (3, 4)]);
        assert!(d.contains(r#"ovf:key="registration_token" ovf:type="string" ovf:userConfigurable="true" ovf:value="" ovf:password="true""#));
        assert!(d.contains(r#"<VirtualHardwareSection ovf:transport="iso">"#));
    }
}
