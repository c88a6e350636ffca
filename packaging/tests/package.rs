//! The OVA and the Debian package, taken apart with the tools an operator's
//! system would use (tar, qemu-img, debugfs, dpkg-deb) and compared with
//! what went in; the first-boot script run against an OVF environment.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{ensure, Context, Result};

/// An ELF to package: this test binary without its debug information (any
/// executable will do for the packaging mechanics; the vSphere e2e test
/// packages the real vdsa).
fn some_elf() -> Result<PathBuf> {
    static DIR: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    let dir = DIR.get_or_init(|| tempfile::tempdir().expect("a temporary folder"));
    let exe = std::env::current_exe()?;
    let out = dir.path().join("some-elf");
    if !out.exists() {
        let tmp = dir.path().join(format!("some-elf.{:?}", std::thread::current().id()));
        run(Command::new("strip").arg("--strip-debug").arg("-o").arg(&tmp).arg(&exe))?;
        std::fs::rename(&tmp, &out)?;
    }
    Ok(out)
}

fn sha256(p: &Path) -> Result<String> {
    let out = Command::new("sha256sum").arg(p).output()?;
    ensure!(out.status.success(), "sha256sum {}", p.display());
    Ok(String::from_utf8(out.stdout)?.split_whitespace().next().unwrap_or_default().to_string())
}

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {:?}", cmd.get_program()))?;
    ensure!(out.status.success(), "{:?} failed: {}", cmd, String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn the_ova_holds_the_payload_its_manifest_and_properties_say() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let elf = some_elf()?;
    let out = dir.path().join("vdsa.ova");
    let built =
        packaging::build_ova(&packaging::OvaInputs { vdsa: elf.clone(), version: "9.9.9".into(), out: out.clone() })?;

    // Descriptor first, then the manifest, then the disk.
    let listing = run(Command::new("tar").arg("tf").arg(&out))?;
    let names: Vec<&str> = listing.lines().collect();
    assert_eq!(names, ["vdsa.ovf", "vdsa.mf", "vdsa-disk1.vmdk"]);
    let x = dir.path().join("x");
    std::fs::create_dir(&x)?;
    run(Command::new("tar").arg("xf").arg(&out).arg("-C").arg(&x))?;

    // The manifest matches every file, by an independent tool.
    let mf = std::fs::read_to_string(x.join("vdsa.mf"))?;
    for name in ["vdsa.ovf", "vdsa-disk1.vmdk"] {
        let line = format!("SHA256({name})= {}", sha256(&x.join(name))?);
        assert!(mf.lines().any(|l| l == line), "{line} not in {mf}");
    }
    assert_eq!(built.files.len(), 2);

    // The descriptor: properties, network, disk, as the client reads it.
    let ova = vsphere_client::Ova::open(&out)?;
    let keys: Vec<&str> = packaging::VAPP_PROPERTIES.iter().map(|p| p.0).collect();
    assert_eq!(ova.properties, keys);
    assert_eq!(ova.networks, [packaging::OVF_NETWORK]);
    assert_eq!(ova.references, ["vdsa-disk1.vmdk"]);
    assert!(ova.descriptor.contains("<Version>9.9.9</Version>"));

    // The disk is streamOptimized, and its file system holds the payload.
    let info = run(Command::new("qemu-img").args(["info", "--output=json"]).arg(x.join("vdsa-disk1.vmdk")))?;
    assert!(info.contains("\"create-type\": \"streamOptimized\""), "{info}");
    assert!(info.contains(&format!("\"virtual-size\": {}", built.disk_capacity)), "{info}");
    let raw = dir.path().join("disk.raw");
    run(Command::new("qemu-img").args(["convert", "-O", "raw"]).arg(x.join("vdsa-disk1.vmdk")).arg(&raw))?;
    let dumped = dir.path().join("vdsa.out");
    run(Command::new("debugfs").arg("-R").arg(format!("dump /usr/bin/vdsa {}", dumped.display())).arg(&raw))?;
    assert_eq!(sha256(&dumped)?, sha256(&elf)?, "the binary in the disk is the one given");
    let stat = run(Command::new("debugfs").arg("-R").arg("stat /usr/lib/vdsa/first-boot").arg(&raw))?;
    assert!(stat.contains("Mode:  0755") || stat.contains("Mode:  00755"), "{stat}");
    let ls = run(Command::new("debugfs").arg("-R").arg("ls -l /etc/systemd/system/multi-user.target.wants").arg(&raw))?;
    assert!(ls.contains("vdsa-firstboot.service") && ls.contains("vdsa@target.service"), "{ls}");
    let unit = dir.path().join("unit");
    run(Command::new("debugfs")
        .arg("-R")
        .arg(format!("dump /lib/systemd/system/vdsa@.service {}", unit.display()))
        .arg(&raw))?;
    assert_eq!(std::fs::read_to_string(&unit)?, packaging::UNIT_VDSA);
    Ok(())
}

#[test]
fn a_damaged_ova_is_refused_before_anything_is_uploaded() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("vdsa.ova");
    packaging::build_ova(&packaging::OvaInputs { vdsa: some_elf()?, version: "1".into(), out: out.clone() })?;
    let ova = vsphere_client::Ova::open(&out)?;
    let disk = ova.entry("vdsa-disk1.vmdk").context("disk")?.clone();

    // One flipped byte in the middle of the disk.
    let mut bytes = std::fs::read(&out)?;
    let at = (disk.offset + disk.size / 2) as usize;
    bytes[at] ^= 0x40;
    let bad = dir.path().join("bad.ova");
    std::fs::write(&bad, &bytes)?;
    let e = vsphere_client::Ova::open(&bad).expect_err("a damaged disk");
    assert!(e.to_string().contains("vdsa-disk1.vmdk does not match the manifest"), "{e}");

    // Not a tar at all, and a truncated one.
    std::fs::write(&bad, b"not an ova")?;
    assert!(vsphere_client::Ova::open(&bad).is_err());
    std::fs::write(&bad, &std::fs::read(&out)?[..4096])?;
    let e = vsphere_client::Ova::open(&bad).expect_err("truncated");
    assert!(matches!(e, vsphere_client::Error::Ova { .. } | vsphere_client::Error::Io { .. }), "{e:?}");

    // Not an executable as payload.
    let e = packaging::build_ova(&packaging::OvaInputs {
        vdsa: out.clone(),
        version: "1".into(),
        out: dir.path().join("o.ova"),
    })
    .expect_err("not ELF");
    assert!(e.to_string().contains("is not an ELF executable"), "{e}");
    Ok(())
}

fn ovf_env(props: &[(&str, &str)]) -> String {
    let mut s = String::from(
        r#"<?xml version="1.0" encoding="UTF-8"?>
<Environment xmlns="http://schemas.dmtf.org/ovf/environment/1" xmlns:oe="http://schemas.dmtf.org/ovf/environment/1">
  <PropertySection>
"#,
    );
    for (k, v) in props {
        s.push_str(&format!("    <Property oe:key=\"{k}\" oe:value=\"{v}\"/>\n"));
    }
    s.push_str("  </PropertySection>\n</Environment>\n");
    s
}

#[test]
fn first_boot_turns_ovf_properties_into_network_and_vdsa_settings() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let script = dir.path().join("first-boot");
    std::fs::write(&script, packaging::FIRST_BOOT)?;
    let env = dir.path().join("ovf-env.xml");
    std::fs::write(
        &env,
        ovf_env(&[
            ("ip", "192.0.2.10"),
            ("netmask", "255.255.254.0"),
            ("gateway", "192.0.2.1"),
            ("dns", "192.0.2.53,192.0.2.54"),
            ("site_manager", "sm.example:8443"),
            ("registration_token", "tok&amp;en"),
        ]),
    )?;
    let root = dir.path().join("root");
    let out = Command::new("sh").arg(&script).env("OVF_ENV_FILE", &env).env("ROOT", &root).output()?;
    ensure!(out.status.success(), "first-boot failed: {}", String::from_utf8_lossy(&out.stderr));
    let network = std::fs::read_to_string(root.join("etc/systemd/network/10-vdsa.network"))?;
    assert!(network.contains("Address=192.0.2.10/23"), "{network}");
    assert!(network.contains("Gateway=192.0.2.1"), "{network}");
    assert!(network.contains("DNS=192.0.2.53\nDNS=192.0.2.54"), "{network}");
    let appliance = std::fs::read_to_string(root.join("etc/vdsa/appliance.env"))?;
    assert!(appliance.contains("VDSA_SITE_MANAGER=sm.example:8443"), "{appliance}");
    assert!(appliance.contains("VDSA_REGISTRATION_TOKEN=tok&en"), "{appliance}");
    let target = std::fs::read_to_string(root.join("etc/vdsa/target.env"))?;
    assert!(target.contains("VDSA_MODE=target") && target.contains("--listen 192.0.2.10:4007"), "{target}");
    assert!(root.join("etc/vdsa/first-boot.done").exists());

    // A missing property and a bad netmask stop it with a reason.
    for (props, says) in [
        (
            vec![("ip", "192.0.2.10"), ("netmask", "255.255.255.0"), ("site_manager", "x:1")],
            "registration_token is empty",
        ),
        (
            vec![
                ("ip", "192.0.2.10"),
                ("netmask", "255.0.255.0"),
                ("site_manager", "x:1"),
                ("registration_token", "t"),
            ],
            "not a valid mask",
        ),
        (
            vec![
                ("ip", "192.0.2.10"),
                ("netmask", "255.255.3.0"),
                ("site_manager", "x:1"),
                ("registration_token", "t"),
            ],
            "not a valid mask",
        ),
    ] {
        std::fs::write(&env, ovf_env(&props))?;
        let root = tempfile::tempdir()?;
        let out = Command::new("sh").arg(&script).env("OVF_ENV_FILE", &env).env("ROOT", root.path()).output()?;
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{props:?} was accepted");
        assert!(err.contains(says), "{err}");
        assert!(!root.path().join("etc/vdsa/first-boot.done").exists());
    }
    Ok(())
}

#[test]
fn the_debian_package_installs_both_binaries_and_the_unit() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let elf = some_elf()?;
    let deb = packaging::build_deb(&packaging::DebInputs {
        vdsa: elf.clone(),
        site_manager: elf.clone(),
        version: "1.2.3-1".into(),
        out_dir: dir.path().to_path_buf(),
    })?;
    assert_eq!(deb.file_name().and_then(|n| n.to_str()), Some("hypervisor-replication_1.2.3-1_amd64.deb"));
    let field = |f: &str| run(Command::new("dpkg-deb").arg("-f").arg(&deb).arg(f));
    assert_eq!(field("Package")?.trim(), packaging::DEB_PACKAGE);
    assert_eq!(field("Version")?.trim(), "1.2.3-1");
    assert_eq!(field("Architecture")?.trim(), "amd64");
    let contents = run(Command::new("dpkg-deb").arg("-c").arg(&deb))?;
    for path in ["./usr/bin/vdsa", "./usr/bin/site-manager", "./lib/systemd/system/vdsa@.service"] {
        let line = contents.lines().find(|l| l.ends_with(path)).with_context(|| format!("{path} in {contents}"))?;
        assert!(line.contains("root/root"), "{line}");
    }
    let x = dir.path().join("x");
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&x))?;
    assert_eq!(sha256(&x.join("usr/bin/vdsa"))?, sha256(&elf)?);
    assert_eq!(std::fs::read_to_string(x.join("lib/systemd/system/vdsa@.service"))?, packaging::UNIT_VDSA);
    Ok(())
}
