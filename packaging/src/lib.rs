//! Packaging of the product: the VDSA OVA (OVF descriptor with vApp
//! properties, a streamOptimized VMDK holding the appliance payload, a
//! SHA-256 manifest) and the Debian package of `vdsa` and `site-manager`
//! with systemd units for KVM hosts.
//!
//! It must not contain product logic: it only assembles what the other
//! crates build. It shells out to `mkfs.ext4` (e2fsprogs, which populates a
//! file system image from a folder without root), `qemu-img` (the
//! streamOptimized VMDK) and `dpkg-deb`.

use std::fmt::Write as _;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The appliance's files, kept as real files beside this crate.
pub const UNIT_VDSA: &str = include_str!("../files/vdsa@.service");
pub const UNIT_FIRSTBOOT: &str = include_str!("../files/vdsa-firstboot.service");
pub const FIRST_BOOT: &str = include_str!("../files/first-boot");
/// A Grafana dashboard over the site manager's `/metrics` (import it and
/// pick the Prometheus data source that scrapes the site manager).
pub const GRAFANA_DASHBOARD: &str = include_str!("../files/grafana-dashboard.json");

/// The vApp properties the OVA asks for at deploy: (key, label, description).
pub const VAPP_PROPERTIES: &[(&str, &str, &str)] = &[
    ("ip", "IP address", "The VDSA's IPv4 address on the replication network"),
    ("netmask", "Netmask", "Netmask of that network, e.g. 255.255.255.0"),
    ("gateway", "Gateway", "Default gateway (empty for none)"),
    ("dns", "DNS servers", "Comma-separated DNS servers (empty for none)"),
    ("site_manager", "Site manager", "HOST:PORT of this site's site manager"),
    ("registration_token", "Registration token", "One-time token the site manager issued for this VDSA"),
];

/// The OVF network the appliance's NIC is mapped from at deploy.
pub const OVF_NETWORK: &str = "VDSA Network";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("{tool} failed ({status}): {stderr}")]
    Tool { tool: String, status: String, stderr: String },
    #[error("{0}")]
    Input(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

fn run(cmd: &mut Command) -> Result<()> {
    let tool = cmd.get_program().to_string_lossy().into_owned();
    let out = cmd.output().map_err(io(format!("running {tool} (is it installed?)")))?;
    if !out.status.success() {
        return Err(Error::Tool {
            tool,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// What the OVA is built from.
#[derive(Debug, Clone)]
pub struct OvaInputs {
    /// The `vdsa` binary for the appliance.
    pub vdsa: PathBuf,
    pub version: String,
    /// The .ova to write.
    pub out: PathBuf,
}

/// What was built.
#[derive(Debug, Clone)]
pub struct OvaBuilt {
    pub path: PathBuf,
    /// (file name in the OVA, SHA-256 hex), as in the manifest.
    pub files: Vec<(String, String)>,
    /// The payload disk's capacity in bytes.
    pub disk_capacity: u64,
}

/// Writes `bytes` to `root/rel` with `mode`, making folders on the way.
fn put(root: &Path, rel: &str, bytes: &[u8], mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let p = root.join(rel);
    if let Some(parent) = p.parent() {
        fs::create_dir_all(parent).map_err(io(format!("creating {}", parent.display())))?;
    }
    fs::write(&p, bytes).map_err(io(format!("writing {}", p.display())))?;
    fs::set_permissions(&p, fs::Permissions::from_mode(mode)).map_err(io(format!("chmod {}", p.display())))
}

/// An executable's bytes; anything but an ELF file is refused.
fn read_elf(path: &Path) -> Result<Vec<u8>> {
    let bytes = fs::read(path).map_err(io(format!("reading {}", path.display())))?;
    if !bytes.starts_with(b"\x7fELF") {
        return Err(Error::Input(format!("{} is not an ELF executable", path.display())));
    }
    Ok(bytes)
}

/// Paths and modes of the appliance payload, relative to the disk's root.
fn payload(dir: &Path, vdsa: &Path) -> Result<()> {
    let put = |rel: &str, bytes: &[u8], mode: u32| put(dir, rel, bytes, mode);
    put("usr/bin/vdsa", &read_elf(vdsa)?, 0o755)?;
    put("usr/lib/vdsa/first-boot", FIRST_BOOT.as_bytes(), 0o755)?;
    put("lib/systemd/system/vdsa@.service", UNIT_VDSA.as_bytes(), 0o644)?;
    put("lib/systemd/system/vdsa-firstboot.service", UNIT_FIRSTBOOT.as_bytes(), 0o644)?;
    // Enabled as `systemctl enable` would: links in the wants folder.
    let wants = dir.join("etc/systemd/system/multi-user.target.wants");
    fs::create_dir_all(&wants).map_err(io("creating the wants folder"))?;
    std::os::unix::fs::symlink("/lib/systemd/system/vdsa-firstboot.service", wants.join("vdsa-firstboot.service"))
        .map_err(io("enabling vdsa-firstboot"))?;
    std::os::unix::fs::symlink("/lib/systemd/system/vdsa@.service", wants.join("vdsa@target.service"))
        .map_err(io("enabling vdsa@target"))?;
    Ok(())
}

fn dir_size(dir: &Path) -> u64 {
    let mut total = 0;
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            match e.file_type() {
                Ok(t) if t.is_dir() => total += dir_size(&e.path()) + 4096,
                Ok(_) => total += e.metadata().map(|m| m.len()).unwrap_or(0) + 4096,
                Err(_) => {}
            }
        }
    }
    total
}

/// A file's SHA-256 in hex (over ring, the provider the workspace already
/// builds).
fn sha256_file(p: &Path) -> Result<String> {
    let mut f = fs::File::open(p).map_err(io(format!("opening {}", p.display())))?;
    let mut h = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io(format!("reading {}", p.display())))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finish().as_ref().iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    }))
}

/// Builds the VDSA OVA: payload folder → ext4 image → streamOptimized VMDK,
/// the OVF descriptor, the manifest, and the tar (descriptor first).
pub fn build_ova(inputs: &OvaInputs) -> Result<OvaBuilt> {
    let work = tempfile::tempdir().map_err(io("making a work folder"))?;
    let root = work.path().join("payload");
    payload(&root, &inputs.vdsa)?;

    // Room for the payload, the file system's own metadata and logs.
    let used = dir_size(&root);
    let capacity = ((used + used / 4 + (32 << 20)) >> 20 << 20).max(64 << 20);
    let raw = work.path().join("payload.raw");
    fs::File::create(&raw).and_then(|f| f.set_len(capacity)).map_err(io("making the raw disk image"))?;
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "vdsa-payload", "-E", "root_owner=0:0", "-d"])
        .arg(&root)
        .arg(&raw))?;

    let disk_name = "vdsa-disk1.vmdk";
    let vmdk = work.path().join(disk_name);
    run(Command::new("qemu-img")
        .args(["convert", "-q", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized"])
        .arg(&raw)
        .arg(&vmdk))?;
    let vmdk_size = fs::metadata(&vmdk).map_err(io("reading the VMDK's size"))?.len();

    let ovf_name = "vdsa.ovf";
    let ovf = descriptor(&inputs.version, disk_name, vmdk_size, capacity, used);
    fs::write(work.path().join(ovf_name), &ovf).map_err(io("writing the descriptor"))?;

    let files = vec![
        (ovf_name.to_string(), sha256_file(&work.path().join(ovf_name))?),
        (disk_name.to_string(), sha256_file(&vmdk)?),
    ];
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
    for name in [ovf_name, mf_name, disk_name] {
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
    fs::rename(&tmp, &inputs.out).map_err(io(format!("renaming to {}", inputs.out.display())))?;
    Ok(OvaBuilt { path: inputs.out.clone(), files, disk_capacity: capacity })
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// The OVF 1.0 descriptor: one VM with 2 vCPUs, 4 GiB, a SCSI controller,
/// the payload disk, one vmxnet3 NIC on [`OVF_NETWORK`], and a
/// ProductSection with [`VAPP_PROPERTIES`].
pub fn descriptor(version: &str, disk_file: &str, file_size: u64, capacity: u64, populated: u64) -> String {
    let mut props = String::new();
    for (key, label, desc) in VAPP_PROPERTIES {
        let _ = write!(
            props,
            r#"
      <Property ovf:key="{key}" ovf:type="string" ovf:userConfigurable="true" ovf:value="">
        <Label>{label}</Label>
        <Description>{desc}</Description>
      </Property>"#,
            label = xml_escape(label),
            desc = xml_escape(desc)
        );
    }
    let version = xml_escape(version);
    format!(
        r#"<?xml version="1.0" encoding="UTF-8"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1"
    xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1"
    xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData"
    xmlns:vssd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData"
    xmlns:vmw="http://www.vmware.com/schema/ovf"
    xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">
  <References>
    <File ovf:href="{disk_file}" ovf:id="file1" ovf:size="{file_size}"/>
  </References>
  <DiskSection>
    <Info>The VDSA payload disk</Info>
    <Disk ovf:capacity="{capacity}" ovf:capacityAllocationUnits="byte" ovf:diskId="vmdisk1" ovf:fileRef="file1"
          ovf:populatedSize="{populated}"
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
      <Info>VDSA settings, read by the appliance at first boot</Info>
      <Product>VDSA</Product>
      <Vendor>Hypervisor-level replication</Vendor>
      <Version>{version}</Version>{props}
    </ProductSection>
    <OperatingSystemSection ovf:id="96" vmw:osType="debian12_64Guest">
      <Info>The guest operating system</Info>
    </OperatingSystemSection>
    <VirtualHardwareSection ovf:transport="com.vmware.guestInfo">
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
        <rasd:AddressOnParent>0</rasd:AddressOnParent>
        <rasd:ElementName>Hard disk 1</rasd:ElementName>
        <rasd:HostResource>ovf:/disk/vmdisk1</rasd:HostResource>
        <rasd:InstanceID>4</rasd:InstanceID>
        <rasd:Parent>3</rasd:Parent>
        <rasd:ResourceType>17</rasd:ResourceType>
      </Item>
      <Item>
        <rasd:AddressOnParent>7</rasd:AddressOnParent>
        <rasd:AutomaticAllocation>true</rasd:AutomaticAllocation>
        <rasd:Connection>{net}</rasd:Connection>
        <rasd:Description>VmxNet3 ethernet adapter on "{net}"</rasd:Description>
        <rasd:ElementName>Network adapter 1</rasd:ElementName>
        <rasd:InstanceID>5</rasd:InstanceID>
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

/// What the Debian package is built from.
#[derive(Debug, Clone)]
pub struct DebInputs {
    pub vdsa: PathBuf,
    pub site_manager: PathBuf,
    /// Debian version, e.g. `0.1.0-1`.
    pub version: String,
    /// The folder to write the .deb into.
    pub out_dir: PathBuf,
}

pub const DEB_PACKAGE: &str = "hypervisor-replication";

/// Builds `hypervisor-replication_VERSION_amd64.deb` with both binaries,
/// the `vdsa@.service` template unit and an example role file.
pub fn build_deb(inputs: &DebInputs) -> Result<PathBuf> {
    let work = tempfile::tempdir().map_err(io("making a work folder"))?;
    let root = work.path().join("root");
    let put = |rel: &str, bytes: &[u8], mode: u32| put(&root, rel, bytes, mode);
    for (bin, name) in [(&inputs.vdsa, "vdsa"), (&inputs.site_manager, "site-manager")] {
        put(&format!("usr/bin/{name}"), &read_elf(bin)?, 0o755)?;
    }
    put("lib/systemd/system/vdsa@.service", UNIT_VDSA.as_bytes(), 0o644)?;
    put(
        "etc/vdsa/target.env.example",
        b"# Copy to /etc/vdsa/target.env and `systemctl enable --now vdsa@target`.\n\
          VDSA_MODE=target\n\
          VDSA_ARGS=--listen 0.0.0.0:4007 --root /var/lib/vdsa --certs /etc/vdsa/certs --control /run/vdsa/target/control.sock\n",
        0o644,
    )?;
    let installed_kb = dir_size(&root) / 1024;
    let control = format!(
        "Package: {DEB_PACKAGE}\n\
         Version: {v}\n\
         Architecture: amd64\n\
         Maintainer: Hypervisor-level replication developers <dev@localhost>\n\
         Installed-Size: {installed_kb}\n\
         Depends: libc6 (>= 2.31)\n\
         Recommends: qemu-system-x86 | qemu-utils\n\
         Section: admin\n\
         Priority: optional\n\
         Description: hypervisor-level replication: VDSA and site manager\n \
         The virtual data services appliance (vdsa) taps VM disk writes on a KVM\n \
         host, journals them and replicates them to a peer site; site-manager is\n \
         the operator command for the site's hypervisors.\n",
        v = inputs.version
    );
    put("DEBIAN/control", control.as_bytes(), 0o644)?;
    put(
        "DEBIAN/postinst",
        b"#!/bin/sh\nset -e\nmkdir -p /var/lib/vdsa /etc/vdsa/certs\nchmod 700 /etc/vdsa/certs\n\
          if [ -d /run/systemd/system ]; then systemctl daemon-reload || true; fi\n",
        0o755,
    )?;
    put(
        "DEBIAN/postrm",
        b"#!/bin/sh\nset -e\nif [ -d /run/systemd/system ]; then systemctl daemon-reload || true; fi\n",
        0o755,
    )?;
    fs::create_dir_all(&inputs.out_dir).map_err(io(format!("creating {}", inputs.out_dir.display())))?;
    let out = inputs.out_dir.join(format!("{DEB_PACKAGE}_{}_amd64.deb", inputs.version));
    run(Command::new("dpkg-deb").args(["--root-owner-group", "-Zxz", "--build"]).arg(&root).arg(&out))?;
    Ok(out)
}

/// Strips debug information into a copy (release builds keep it for
/// profiling; an appliance need not ship it). Falls back to the original.
pub fn stripped_copy(bin: &Path, dir: &Path) -> Result<PathBuf> {
    let name = bin.file_name().ok_or_else(|| Error::Input(format!("{} has no file name", bin.display())))?;
    let out = dir.join(name);
    match run(Command::new("strip").arg("--strip-debug").arg("-o").arg(&out).arg(bin)) {
        Ok(()) => Ok(out),
        Err(_) => Ok(bin.to_path_buf()),
    }
}
