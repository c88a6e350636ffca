//! The vSphere part of the lab: the VDSA OVA built by `packaging` from the
//! real `vdsa` binary, deployed by the site manager's vSphere adapter to
//! every host of a simulated vCenter (vcsim), then a failover test's
//! recovery VMs on an isolated network, booted in order and removed.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use site_manager::vsphere::{DeployEvent, DeploySettings, RecoveryVmSpec, VdsaState, VsphereSite};
use vsphere_client::{Ova, ServerTrust};

use crate::vcsim::{Vcsim, VcsimOptions};

pub const LAB_USER: &str = "administrator@vsphere.local";
pub const LAB_PASSWORD: &str = "lab-password";

/// A workspace binary beside the running executable (tests and benchmarks
/// live one folder further down, in `deps/`). Under `cargo run` it is
/// built when missing.
pub fn workspace_binary(package: &str, name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let mut dir = exe.parent().context("the executable's folder")?.to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let bin = dir.join(name);
    if bin.is_file() {
        return Ok(bin);
    }
    if let Some(cargo) = std::env::var_os("CARGO") {
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "-q", "-p", package, "--bin", name]);
        if dir.ends_with("release") {
            cmd.arg("--release");
        }
        let status = cmd.status().with_context(|| format!("running cargo build for {name}"))?;
        ensure!(status.success(), "cargo build -p {package} failed ({status})");
        if bin.is_file() {
            return Ok(bin);
        }
    }
    bail!("{} is missing: build the workspace first (cargo build --release --workspace)", bin.display())
}

/// Whether the vCenter simulator can be built here (Go and Debian's
/// govmomi source).
pub fn simulator_available() -> bool {
    let have_go = Command::new("go").arg("version").output().is_ok_and(|o| o.status.success());
    have_go && Path::new("/usr/share/gocode/src/github.com/vmware/govmomi/simulator").is_dir()
}

/// The release `vdsa` binary.
pub fn vdsa_binary() -> Result<PathBuf> {
    workspace_binary("vdsa", "vdsa")
}

/// Builds the VDSA OVA into `dir` from the real binary (debug info
/// stripped) and the guest kit's Debian packages.
pub fn build_vdsa_ova(dir: &Path) -> Result<PathBuf> {
    let vdsa = packaging::stripped_copy(&vdsa_binary()?, dir)?;
    let out = dir.join("vdsa.ova");
    let debian = crate::guest::GuestKit::prepare()?.debian().clone();
    let version = env!("CARGO_PKG_VERSION").into();
    packaging::build_ova(&packaging::OvaInputs { vdsa, version, debian, out: out.clone() })?;
    Ok(out)
}

/// The simulator's trust: the CA the harness made.
pub fn lab_trust(sim: &Vcsim) -> Result<ServerTrust> {
    let ca = sim.ca_pem.as_ref().context("the simulator serves no TLS")?;
    Ok(ServerTrust::ca_pem(&std::fs::read(ca)?)?)
}

/// A registration token of the right shape (vcsim runs no appliance that
/// would use it).
pub const LAB_REGISTRATION_TOKEN: &str = "lab-secret.abababababababababababababababababababababababababababababababab";

pub fn lab_settings(first_ip: Ipv4Addr) -> DeploySettings {
    DeploySettings {
        datastore: "LocalDS_0".into(),
        network: "VM Network".into(),
        ip: first_ip,
        netmask: Ipv4Addr::new(255, 255, 255, 0),
        // The subnet's first address.
        gateway: Some(Ipv4Addr::from((u32::from(first_ip) & 0xffff_ff00) | 1)),
        dns: vec![Ipv4Addr::new(192, 0, 2, 53)],
        site_manager: "127.0.0.1:8443".into(),
        registration_token: LAB_REGISTRATION_TOKEN.into(),
    }
}

/// What the lab's vSphere stage verified.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub hosts: usize,
    pub deployed: usize,
    pub ova_bytes: u64,
    pub deploy_secs: f64,
    pub properties_checked: usize,
    pub recovery_vms: usize,
    pub boot_groups: usize,
    pub removed_test_vms: usize,
}

/// Runs the stage: 2 clusters × 3 hosts.
pub fn run(say: impl Fn(&str)) -> Result<Report> {
    let dir = tempfile::tempdir()?;
    let ova_path = build_vdsa_ova(dir.path())?;
    let ova = Ova::open(&ova_path)?;
    let ova_bytes = std::fs::metadata(&ova_path)?.len();
    say(&format!(
        "OVA built and checked against its manifest: {ova_bytes} bytes, vApp properties {}",
        ova.properties.join(", ")
    ));

    let sim = Vcsim::start(&VcsimOptions { clusters: 2, hosts_per_cluster: 3, vms: 1, ..Default::default() })?;
    let site = VsphereSite::connect(&sim.url, lab_trust(&sim)?, LAB_USER, LAB_PASSWORD)?;
    let mut reqs = site.plan_cluster("DC0_C0", &lab_settings(Ipv4Addr::new(192, 0, 2, 10)))?.requests;
    reqs.extend(site.plan_cluster("DC0_C1", &lab_settings(Ipv4Addr::new(192, 0, 2, 20)))?.requests);
    let started = Instant::now();
    let seen = Mutex::new(Vec::<String>::new());
    let results = site.deploy_many(&ova, &reqs, reqs.len(), &|host, e| {
        if let DeployEvent::Installed { vm } | DeployEvent::Failed { error: vm } = &e {
            let line = format!(
                "{host}: {}",
                if matches!(e, DeployEvent::Installed { .. }) {
                    format!("installed ({vm})")
                } else {
                    format!("FAILED: {vm}")
                }
            );
            seen.lock().unwrap_or_else(|p| p.into_inner()).push(line);
        }
    })?;
    let deploy_secs = started.elapsed().as_secs_f64();
    for line in seen.into_inner().unwrap_or_else(|p| p.into_inner()) {
        say(&line);
    }
    for (h, r) in &results {
        if let Err(e) = r {
            bail!("deploying to {h}: {e}");
        }
    }
    let hosts = site.hosts()?;
    let mut properties_checked = 0;
    for r in &reqs {
        let h = hosts.iter().find(|h| h.host == r.host).context("host")?;
        ensure!(h.state == VdsaState::Installed, "{} shows {}", r.host, h.state);
        let vm = h.vm.as_ref().context("VDSA VM")?;
        ensure!(vm.host.as_ref() == Some(&h.host_ref), "{} runs elsewhere", vm.name);
        ensure!(vm.vapp_property("ip") == Some(r.ip.to_string().as_str()), "{} ip", vm.name);
        ensure!(vm.vapp_property("registration_token") == Some(LAB_REGISTRATION_TOKEN), "{} token", vm.name);
        properties_checked += 2;
    }

    // A failover test: an isolated network, recovery VMs in two boot groups.
    let test_hosts = vec!["DC0_C0_H0".to_string(), "DC0_C1_H1".to_string()];
    let net = site.create_test_network("lab-test-net", &test_hosts)?;
    let mut vms = Vec::new();
    for (i, (host, group)) in [("DC0_C0_H0", 1), ("DC0_C1_H1", 1), ("DC0_C0_H0", 2)].iter().enumerate() {
        let vm = site.create_recovery_vm(&RecoveryVmSpec {
            name: format!("lab-test-vm{i}"),
            host: host.to_string(),
            datastore: "LocalDS_0".into(),
            guest_id: "otherLinux64Guest".into(),
            cpus: 2,
            memory_mb: 2048,
            disks: vec![8 << 30],
            networks: vec!["lab-test-net".into()],
            boot_group: *group,
            test_id: Some("lab".into()),
            extra_config: Vec::new(),
            customization: None,
        })?;
        vms.push((vm, *group));
    }
    let records = site.power_on_in_boot_order(&vms, Duration::from_millis(10))?;
    ensure!(records.len() == 3, "three VMs powered on");
    say("failover test: 3 recovery VMs on isolated network lab-test-net (no uplinks) powered on in 2 boot groups");
    let removed = site.remove_test_vms("lab")?;
    site.remove_test_network(&net)?;
    ensure!(removed.len() == 3, "removed {removed:?}");
    ensure!(site.client().inventory()?.networks.iter().all(|n| n.name != "lab-test-net"), "test network left");
    site.undeploy("DC0_C1_H2")?;
    ensure!(
        site.hosts()?.iter().find(|h| h.host == "DC0_C1_H2").map(|h| h.state) == Some(VdsaState::NotInstalled),
        "undeploy left the VDSA"
    );
    say("undeployed the VDSA of DC0_C1_H2; it shows not installed");
    site.logout()?;
    Ok(Report {
        hosts: hosts.len(),
        deployed: reqs.len(),
        ova_bytes,
        deploy_secs,
        properties_checked,
        recovery_vms: vms.len(),
        boot_groups: 2,
        removed_test_vms: removed.len(),
    })
}
