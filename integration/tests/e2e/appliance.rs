//! The VDSA appliance as an operator deploys it: the OVA built from the
//! real `vdsa` and Debian's packages, taken apart with tar and qemu-img,
//! its boot disk booted under QEMU on ESXi's usual virtual hardware
//! (PVSCSI, vmxnet3, an IDE CD-ROM with the OVF environment, as vSphere's
//! ISO transport attaches it), registering with a real site manager on
//! this machine's loopback (the guest reaches it as 10.0.2.2).

use integration::guest::{EsxiVmConfig, Guest, GuestKit};
use integration::site_lab::SiteManagerProcess;
use integration::vsphere_lab::build_vdsa_ova;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

fn lab() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_lab"))
}

fn ok<T>(r: anyhow::Result<T>) -> T {
    r.unwrap_or_else(|e| panic!("{e:#}"))
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn sha256(p: &Path) -> String {
    run(Command::new("sha256sum").arg(p)).split_whitespace().next().unwrap_or_default().to_string()
}

/// The OVA, built once for this test binary, and its parts.
struct BuiltOva {
    _dir: tempfile::TempDir,
    ova: PathBuf,
    /// The OVA's folder after `tar x`.
    parts: PathBuf,
    /// Its boot disk as a raw image.
    boot_raw: PathBuf,
}

fn built() -> &'static BuiltOva {
    static BUILT: OnceLock<BuiltOva> = OnceLock::new();
    BUILT.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let started = Instant::now();
        let ova = ok(build_vdsa_ova(dir.path()));
        let size = std::fs::metadata(&ova).map(|m| m.len()).unwrap_or(0);
        println!("appliance: OVA {:.1} MB, built in {:.1} s", size as f64 / 1e6, started.elapsed().as_secs_f64());
        let parts = dir.path().join("parts");
        std::fs::create_dir_all(&parts).unwrap_or_else(|e| panic!("{e}"));
        run(Command::new("tar").arg("xf").arg(&ova).arg("-C").arg(&parts));
        let boot_raw = dir.path().join("boot.raw");
        run(Command::new("qemu-img")
            .args(["convert", "-O", "raw"])
            .arg(parts.join(packaging::ova::BOOT_DISK_FILE))
            .arg(&boot_raw));
        BuiltOva { _dir: dir, ova, parts, boot_raw }
    })
}

/// An OVF environment document as vSphere writes it.
fn ovf_env(props: &[(&str, &str)]) -> String {
    let p: String = props
        .iter()
        .map(|(k, v)| {
            let v = v.replace('&', "&amp;").replace('"', "&quot;").replace('<', "&lt;");
            format!("      <Property oe:key=\"{k}\" oe:value=\"{v}\"/>\n")
        })
        .collect();
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n\
         <Environment xmlns=\"http://schemas.dmtf.org/ovf/environment/1\"\n\
             xmlns:xsi=\"http://www.w3.org/2001/XMLSchema-instance\"\n\
             xmlns:oe=\"http://schemas.dmtf.org/ovf/environment/1\"\n\
             xmlns:ve=\"http://www.vmware.com/schema/ovfenv\" oe:id=\"\" ve:vCenterId=\"vm-42\">\n\
           <PlatformSection>\n      <Kind>VMware ESXi</Kind>\n      <Version>7.0.3</Version>\n   </PlatformSection>\n\
           <PropertySection>\n{p}   </PropertySection>\n\
         </Environment>\n"
    )
}

/// The ISO vSphere attaches for the ISO transport: ovf-env.xml at its root.
fn ovf_env_iso(dir: &Path, xml: &str) -> PathBuf {
    let src = dir.join("ovf-env");
    std::fs::create_dir_all(&src).unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(src.join("ovf-env.xml"), xml).unwrap_or_else(|e| panic!("{e}"));
    let iso = dir.join("ovf-env.iso");
    run(Command::new("genisoimage").args(["-quiet", "-o"]).arg(&iso).args(["-V", "OVF_ENV", "-J", "-r"]).arg(&src));
    iso
}

/// The properties of an appliance at 10.0.2.15 (QEMU's user network)
/// registering with the site manager at `sm` with `token`.
fn props<'a>(sm: &'a str, token: &'a str) -> Vec<(&'static str, &'a str)> {
    vec![
        ("ip", "10.0.2.15"),
        ("netmask", "255.255.255.0"),
        ("gateway", "10.0.2.2"),
        ("dns", "10.0.2.3"),
        ("site_manager", sm),
        ("registration_token", token),
    ]
}

/// Boots the appliance's boot disk with `data` as its data disk and `xml`
/// on its CD-ROM.
fn boot(kit: &GuestKit, dir: &Path, xml: &str, data: &Path) -> Guest {
    let iso = ovf_env_iso(dir, xml);
    ok(kit.boot_esxi_like(&EsxiVmConfig {
        disks: vec![built().boot_raw.clone(), data.to_path_buf()],
        cdrom: Some(iso),
        memory_mb: 1024,
        console: dir.join("console.log"),
    }))
}

fn blank_disk(path: &Path, bytes: u64) -> PathBuf {
    std::fs::File::create(path).and_then(|f| f.set_len(bytes)).unwrap_or_else(|e| panic!("{e}"));
    path.to_path_buf()
}

/// "up N s" as the appliance's init prints it after `marker`.
fn uptime_at(console: &str, marker: &str) -> Option<f64> {
    let line = console.lines().find(|l| l.contains(marker))?;
    let up = line.split("up ").nth(1)?;
    up.split_whitespace().next()?.parse().ok()
}

#[test]
fn the_ova_holds_two_disks_its_manifest_names_and_the_properties_the_appliance_reads() {
    let b = built();
    let listing = run(Command::new("tar").arg("tf").arg(&b.ova));
    let names: Vec<&str> = listing.lines().collect();
    assert_eq!(names, ["vdsa.ovf", "vdsa.mf", "vdsa-disk1.vmdk", "vdsa-disk2.vmdk"]);
    let mf = std::fs::read_to_string(b.parts.join("vdsa.mf")).unwrap_or_else(|e| panic!("{e}"));
    for name in ["vdsa.ovf", "vdsa-disk1.vmdk", "vdsa-disk2.vmdk"] {
        let line = format!("SHA256({name})= {}", sha256(&b.parts.join(name)));
        assert!(mf.lines().any(|l| l == line), "{line} not in {mf}");
    }
    let ova = vsphere_client::Ova::open(&b.ova).unwrap_or_else(|e| panic!("{e}"));
    let keys: Vec<&str> = packaging::VAPP_PROPERTIES.iter().map(|p| p.0).collect();
    assert_eq!(ova.properties, keys);
    assert_eq!(keys, protection_groups::appliance::APPLIANCE_PROPERTIES);
    assert_eq!(ova.networks, [packaging::OVF_NETWORK]);
    assert_eq!(ova.references, ["vdsa-disk1.vmdk", "vdsa-disk2.vmdk"]);
    for needle in [r#"ovf:transport="iso""#, r#"vmw:osType="otherLinux64Guest""#, "<rasd:ResourceType>15<"] {
        assert!(ova.descriptor.contains(needle), "the descriptor lacks {needle}");
    }
    for name in ["vdsa-disk1.vmdk", "vdsa-disk2.vmdk"] {
        let info = run(Command::new("qemu-img").args(["info", "--output=json"]).arg(b.parts.join(name)));
        assert!(info.contains("\"create-type\": \"streamOptimized\""), "{info}");
    }
    let size = std::fs::metadata(&b.ova).map(|m| m.len()).unwrap_or(u64::MAX);
    assert!(size < 100_000_000, "the OVA is {size} bytes; the goal is under 100 MB");

    // One flipped byte in the boot disk: refused before any upload.
    let disk = ova.entry("vdsa-disk1.vmdk").unwrap_or_else(|| panic!("no disk entry")).clone();
    let mut bytes = std::fs::read(&b.ova).unwrap_or_else(|e| panic!("{e}"));
    bytes[(disk.offset + disk.size / 2) as usize] ^= 0x40;
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let bad = dir.path().join("bad.ova");
    std::fs::write(&bad, &bytes).unwrap_or_else(|e| panic!("{e}"));
    let e = vsphere_client::Ova::open(&bad).expect_err("a damaged disk");
    assert!(e.to_string().contains("vdsa-disk1.vmdk does not match the manifest"), "{e}");
}

#[test]
fn the_appliance_boots_reads_its_ovf_environment_registers_and_comes_back_after_a_power_cut() {
    let _turn = crate::take_turns();
    let kit = ok(GuestKit::prepare());
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let d = dir.path();
    let sm = ok(SiteManagerProcess::start(lab(), &d.join("sm"), &[]));
    let (host, token) = ok(sm.add_host_on("esxi-1", "vsphere"));
    let sm_addr = format!("10.0.2.2:{}", sm.management_port);
    // The OVA's own data disk: blank, formatted by the first boot.
    let data = d.join("data.raw");
    run(Command::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(built().parts.join(packaging::ova::DATA_DISK_FILE))
        .arg(&data));

    let xml = ovf_env(&props(&sm_addr, &token));
    let powered_on = Instant::now();
    let mut vm = boot(&kit, d, &xml, &data);
    ok(vm.wait_for("vdsa agent: host", Duration::from_secs(300)));
    ok(sm.wait_until(&format!("/api/v1/hosts/{host}"), Duration::from_secs(60), "installed", |h| {
        h["vdsa"] == "installed" && h["last_heartbeat_ms"].is_u64()
    }));
    let registered = powered_on.elapsed().as_secs_f64();
    let console = vm.console_text();
    assert!(console.contains("formatting the data volume /dev/sd"), "{console}");
    assert!(!console.contains("not found"), "the init ran a tool the image lacks:\n{console}");
    assert!(console.contains("network: eth0 10.0.2.15/24 gateway 10.0.2.2 dns 10.0.2.3"), "{console}");
    let h = ok(sm.get(&format!("/api/v1/hosts/{host}")));
    assert_eq!(h["replication_address"], "10.0.2.15:4007", "{h}");
    assert_eq!(h["software_version"], env!("CARGO_PKG_VERSION"), "{h}");
    let kernel_to_vdsa = uptime_at(&console, "starting the VDSA").unwrap_or(f64::NAN);
    println!(
        "appliance: power-on to registered {registered:.1} s under TCG (kernel start to the VDSA's start {kernel_to_vdsa:.1} s of guest uptime)"
    );

    // A power cut, then the same disks: the data volume is kept (not
    // formatted again), the VDSA comes back with the identity it registered
    // (the one-time token is spent) and the host is installed again.
    vm.power_cut();
    ok(sm.wait_until(&format!("/api/v1/hosts/{host}"), Duration::from_secs(60), "down", |h| h["vdsa"] == "down"));
    let mut vm = boot(&kit, d, &xml, &data);
    ok(vm.wait_for("vdsa agent: host", Duration::from_secs(300)));
    ok(sm.wait_until(&format!("/api/v1/hosts/{host}"), Duration::from_secs(60), "installed again", |h| {
        h["vdsa"] == "installed"
    }));
    let console = vm.console_text();
    assert!(!console.contains("formatting the data volume"), "formatted again after a power cut:\n{console}");
    assert!(!console.contains("REGISTRATION REFUSED"), "{console}");
    drop(vm);
    sm.stop();
}

#[test]
fn a_wrong_token_is_refused_and_a_bad_or_missing_property_stops_first_boot_with_its_name() {
    let _turn = crate::take_turns();
    let kit = ok(GuestKit::prepare());
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let sm = ok(SiteManagerProcess::start(lab(), &dir.path().join("sm"), &[]));
    let (host, token) = ok(sm.add_host_on("esxi-2", "vsphere"));
    let sm_addr = format!("10.0.2.2:{}", sm.management_port);
    let pin = token.rsplit_once('.').map(|(_, p)| p.to_string()).unwrap_or_default();
    let wrong = format!("0123abcd.{pin}");

    // A token of the right shape that the site manager never minted.
    let d = dir.path().join("wrong-token");
    std::fs::create_dir_all(&d).unwrap_or_else(|e| panic!("{e}"));
    let mut vm = boot(&kit, &d, &ovf_env(&props(&sm_addr, &wrong)), &blank_disk(&d.join("data.raw"), 1 << 30));
    ok(vm.wait_for("REGISTRATION REFUSED", Duration::from_secs(300)));
    let console = vm.console_text();
    assert!(console.contains("registration token is unknown"), "the site manager's reason is shown:\n{console}");
    assert_ne!(ok(sm.get(&format!("/api/v1/hosts/{host}")))["vdsa"], "installed");
    drop(vm);

    // Bad and missing properties: the boot stops, naming the property,
    // before any network or VDSA is started.
    type Props<'a> = Vec<(&'static str, &'a str)>;
    let cases: [(&str, Props, &str); 3] = [
        (
            "no-site-manager",
            props(&sm_addr, &token).into_iter().filter(|(k, _)| *k != "site_manager").collect(),
            "the property site_manager: is empty",
        ),
        (
            "bad-netmask",
            props(&sm_addr, &token)
                .into_iter()
                .map(|(k, v)| if k == "netmask" { (k, "255.0.255.0") } else { (k, v) })
                .collect(),
            "the property netmask: 255.0.255.0 is not a netmask",
        ),
        (
            "gateway-is-self",
            props(&sm_addr, &token)
                .into_iter()
                .map(|(k, v)| if k == "gateway" { (k, "10.0.2.15") } else { (k, v) })
                .collect(),
            "the property gateway: 10.0.2.15 is the appliance's own address",
        ),
    ];
    for (name, props, reason) in cases {
        let d = dir.path().join(name);
        std::fs::create_dir_all(&d).unwrap_or_else(|e| panic!("{e}"));
        let mut vm = boot(&kit, &d, &ovf_env(&props), &blank_disk(&d.join("data.raw"), 1 << 30));
        ok(vm.wait_for("FIRST BOOT STOPPED", Duration::from_secs(300)));
        // The reason follows on the same line.
        ok(vm.wait_for(reason, Duration::from_secs(5)));
        let console = vm.console_text();
        assert!(!console.contains("network:") && !console.contains("starting the VDSA"), "{name}:\n{console}");
    }
    // None of them registered; the token is still unused.
    assert_ne!(ok(sm.get(&format!("/api/v1/hosts/{host}")))["vdsa"], "installed");
    sm.stop();
}
