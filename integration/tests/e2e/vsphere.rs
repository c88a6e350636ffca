//! The vSphere adapter against the real vCenter simulator (vcsim built from
//! Debian's govmomi): the OVA built by `packaging` deployed to every host of
//! two clusters, typed errors, recovery VMs in boot order, isolated test
//! networks.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use anyhow::{Context, Result};
use integration::vcsim::{Vcsim, VcsimOptions};
use integration::vsphere_lab;
use site_manager::vsphere::{DeployEvent, DeploySettings, RecoveryVmSpec, VdsaState, VsphereSite};
use vsphere_client::{Client, DiskSpec, Error, MoRef, NicSpec, Ova, ServerTrust, VmChange};

const USER: &str = vsphere_lab::LAB_USER;
const PASSWORD: &str = vsphere_lab::LAB_PASSWORD;

/// The VDSA OVA, built once per test run by the packaging crate from the
/// real `vdsa` binary.
fn vdsa_ova() -> Result<PathBuf> {
    static OVA: OnceLock<Result<(tempfile::TempDir, PathBuf), String>> = OnceLock::new();
    let r = OVA.get_or_init(|| {
        (|| -> Result<(tempfile::TempDir, PathBuf)> {
            let dir = tempfile::tempdir()?;
            let ova = vsphere_lab::build_vdsa_ova(dir.path())?;
            Ok((dir, ova))
        })()
        .map_err(|e| format!("{e:#}"))
    });
    match r {
        Ok((_, p)) => Ok(p.clone()),
        Err(e) => anyhow::bail!("building the OVA: {e}"),
    }
}

fn trust(sim: &Vcsim) -> Result<ServerTrust> {
    vsphere_lab::lab_trust(sim)
}

fn site(sim: &Vcsim) -> Result<VsphereSite> {
    Ok(VsphereSite::connect(&sim.url, trust(sim)?, USER, PASSWORD)?)
}

fn settings() -> DeploySettings {
    let mut s = vsphere_lab::lab_settings(Ipv4Addr::new(192, 0, 2, 10));
    s.dns = vec![Ipv4Addr::new(192, 0, 2, 53), Ipv4Addr::new(192, 0, 2, 54)];
    s.site_manager = "192.0.2.2:8443".into();
    s.registration_token = vsphere_lab::LAB_REGISTRATION_TOKEN.into();
    s
}

#[test]
fn deploys_the_ova_to_every_host_of_two_clusters_then_undeploys_one() -> Result<()> {
    let sim =
        Vcsim::start(&VcsimOptions { clusters: 2, hosts_per_cluster: 2, standalone_hosts: 1, ..Default::default() })?;
    let site = site(&sim)?;
    let ova_path = vdsa_ova()?;
    let ova = Ova::open(&ova_path)?;
    let vmdk_size = ova.entry("vdsa-disk1.vmdk").context("the OVA's boot disk")?.size
        + ova.entry("vdsa-disk2.vmdk").context("the OVA's data disk")?.size;

    let before = site.hosts()?;
    assert_eq!(before.len(), 5, "{before:?}");
    assert!(before.iter().all(|h| h.state == VdsaState::NotInstalled));

    // Both clusters, one plan each, run together with every deploy in
    // parallel.
    let mut reqs = site.plan_cluster("DC0_C0", &settings())?.requests;
    let mut c1 = settings();
    c1.ip = Ipv4Addr::new(192, 0, 2, 20);
    reqs.extend(site.plan_cluster("DC0_C1", &c1)?.requests);
    assert_eq!(reqs.len(), 4);
    let events: Mutex<Vec<(String, DeployEvent)>> = Mutex::new(Vec::new());
    let results = site.deploy_many(&ova, &reqs, 4, &|h, e| {
        events.lock().unwrap_or_else(|p| p.into_inner()).push((h.to_string(), e));
    })?;
    for (h, r) in &results {
        assert!(r.is_ok(), "{h}: {r:?}");
    }
    let events = events.into_inner().unwrap_or_else(|p| p.into_inner());
    for r in &reqs {
        let mine: Vec<&DeployEvent> = events.iter().filter(|(h, _)| h == &r.host).map(|(_, e)| e).collect();
        assert!(
            mine.iter()
                .any(|e| matches!(e, DeployEvent::Uploading { done, total } if done == total && *total == vmdk_size)),
            "{}: no complete upload of {vmdk_size} bytes in {mine:?}",
            r.host
        );
        assert!(matches!(mine.last(), Some(DeployEvent::Installed { .. })), "{}: {mine:?}", r.host);
    }

    let inv = site.client().inventory()?;
    let hosts = site.hosts()?;
    for r in &reqs {
        let h = hosts.iter().find(|h| h.host == r.host).context("host listed")?;
        assert_eq!(h.state, VdsaState::Installed, "{}", r.host);
        let vm = h.vm.as_ref().context("its VDSA VM")?;
        assert_eq!(vm.name, format!("VDSA-{}", r.host));
        assert_eq!(vm.host.as_ref(), Some(&h.host_ref), "the VDSA runs on its own host");
        assert_eq!(vm.power_state, "poweredOn");
        let ds = inv.datastore_for(inv.host(&r.host)?, "LocalDS_0")?;
        assert!(vm.datastores.contains(&ds.moref), "{} is on {:?}", vm.name, vm.datastores);
        assert_eq!(vm.nics.len(), 1);
        assert_eq!(vm.nics[0].network_name, "VM Network");
        // The vApp properties read back as given.
        let s = &r.settings;
        for (k, want) in [
            ("ip", r.ip.to_string()),
            ("netmask", "255.255.255.0".to_string()),
            ("gateway", "192.0.2.1".to_string()),
            ("dns", "192.0.2.53,192.0.2.54".to_string()),
            ("site_manager", s.site_manager.clone()),
            ("registration_token", s.registration_token.clone()),
        ] {
            assert_eq!(vm.vapp_property(k), Some(want.as_str()), "{} property {k}", vm.name);
        }
    }
    // Consecutive addresses per cluster, in host name order.
    let ips: Vec<String> = reqs.iter().map(|r| r.ip.to_string()).collect();
    assert_eq!(ips, ["192.0.2.10", "192.0.2.11", "192.0.2.20", "192.0.2.21"]);
    // The standalone host was not in either cluster.
    assert_eq!(hosts.iter().find(|h| h.host == "DC0_H0").map(|h| h.state), Some(VdsaState::NotInstalled));
    // VDSAs are not offered for protection.
    assert!(site.vms_with_disks()?.iter().all(|v| !v.name.starts_with("VDSA-")));

    // An interrupted deploy (imported, marked installing, never powered on)
    // shows as installing; deploying again replaces it.
    let c1h1 = inv.host("DC0_C1_H1")?;
    site.undeploy("DC0_C1_H1")?;
    let half = site.client().import_ova(
        &ova,
        &vsphere_client::ImportTarget {
            name: "VDSA-DC0_C1_H1".into(),
            host: c1h1.moref.clone(),
            resource_pool: inv.resource_pool_of(c1h1)?,
            folder: inv.datacenter_of(c1h1)?.vm_folder.clone(),
            datastore: inv.datastore_for(c1h1, "LocalDS_0")?.moref.clone(),
            network_mapping: vec![(packaging::OVF_NETWORK.into(), inv.network_for(c1h1, "VM Network")?.moref.clone())],
            properties: Vec::new(),
            extra_config: vec![
                (site_manager::vsphere::MARK_ROLE.into(), "vdsa".into()),
                (site_manager::vsphere::MARK_STATE.into(), "installing".into()),
                (site_manager::vsphere::MARK_HOST.into(), c1h1.moref.value.clone()),
            ],
        },
        &|_| {},
    )?;
    let state = |name: &str| -> Result<VdsaState> {
        Ok(site.hosts()?.into_iter().find(|h| h.host == name).context("host")?.state)
    };
    assert_eq!(state("DC0_C1_H1")?, VdsaState::Installing);
    let c1 = reqs.iter().find(|r| r.host == "DC0_C1_H1").context("request")?;
    let replaced = site.deploy(&ova, c1, &|_| {})?;
    assert_ne!(replaced, half, "a new VDSA, not the half-made one");
    assert!(matches!(site.client().vm(&half), Err(Error::ObjectNotFound { .. })), "the half-made VDSA is gone");
    assert_eq!(state("DC0_C1_H1")?, VdsaState::Installed);
    // One marked uninstalling (an undeploy cut short) shows so.
    site.client().reconfigure_vm(
        &replaced,
        &VmChange {
            extra_config: vec![(site_manager::vsphere::MARK_STATE.into(), "uninstalling".into())],
            ..Default::default()
        },
    )?;
    assert_eq!(state("DC0_C1_H1")?, VdsaState::Uninstalling);
    site.deploy(&ova, c1, &|_| {})?;
    assert_eq!(state("DC0_C1_H1")?, VdsaState::Installed);

    // Deploying twice is refused; undeploy removes exactly one.
    let again = site.deploy(&ova, &reqs[0], &|_| {});
    assert!(matches!(again, Err(site_manager::vsphere::Error::AlreadyDeployed { .. })), "{again:?}");
    site.undeploy("DC0_C1_H0")?;
    let after = site.hosts()?;
    for h in &after {
        let want = match h.host.as_str() {
            "DC0_C1_H0" | "DC0_H0" => VdsaState::NotInstalled,
            _ => VdsaState::Installed,
        };
        assert_eq!(h.state, want, "{}", h.host);
    }
    let gone = site.undeploy("DC0_C1_H0");
    assert!(matches!(gone, Err(site_manager::vsphere::Error::NotDeployed { .. })), "{gone:?}");
    site.logout()?;
    Ok(())
}

#[test]
fn bad_logins_names_certificates_and_dropped_connections_give_typed_errors() -> Result<()> {
    let mut sim = Vcsim::start(&VcsimOptions::default())?;
    let trust = trust(&sim)?;

    // A wrong password.
    let c = Client::connect(&sim.url, trust.clone())?;
    let e = c.login(USER, "wrong").expect_err("a wrong password is refused");
    assert!(matches!(&e, Error::InvalidLogin { user } if user == USER), "{e:?}");
    assert!(e.to_string().contains("wrong user name or password"), "{e}");

    // Not logged in, or logged out.
    let e = c.inventory().expect_err("no session");
    assert!(matches!(e, Error::NotAuthenticated { .. }), "{e:?}");
    c.login(USER, PASSWORD)?;
    c.inventory()?;
    // The server ends the session behind the client's back (as vCenter
    // does after idle time): the client logs in again and goes on.
    c.soap().call("Logout", r#"<_this type="SessionManager">SessionManager</_this>"#)?;
    c.inventory()?;
    c.logout()?;
    let e = c.inventory().expect_err("logged out");
    assert!(matches!(e, Error::NotAuthenticated { .. }), "{e:?}");

    // The server's certificate: the CA, the pinned thumbprint (SHA-256 and
    // SHA-1) and the insecure switch work; another thumbprint does not.
    let pem = std::fs::read(sim.cert_pem.as_ref().context("cert")?)?;
    let der = {
        use rustls_pki_types::pem::PemObject;
        rustls_pki_types::CertificateDer::from_pem_slice(&pem)?
    };
    let (sha1, sha256) = vsphere_client::soap::thumbprints(&der);
    for t in [&sha256, &sha1] {
        let pinned = ServerTrust::thumbprint(&vsphere_client::soap::format_thumbprint(t))?;
        Client::connect(&sim.url, pinned)?.login(USER, PASSWORD)?;
    }
    Client::connect(&sim.url, ServerTrust::Insecure)?.login(USER, PASSWORD)?;
    let mut wrong = sha256.clone();
    wrong[0] ^= 0xff;
    let e = Client::connect(&sim.url, ServerTrust::Thumbprint(wrong)).expect_err("another thumbprint");
    assert!(matches!(&e, Error::Tls { message, .. } if message.contains("not the pinned")), "{e:?}");
    // In the operator's words, not rustls's debug form of a custom error.
    assert!(!e.to_string().contains("OtherError") && !e.to_string().contains("Other("), "{e}");
    // A trust setting that is wrong before any connection names no URL.
    let e = ServerTrust::thumbprint("zz").expect_err("not a thumbprint");
    assert!(matches!(e, Error::Trust(_)) && e.to_string().starts_with("bad certificate trust setting"), "{e}");
    let elsewhere = tempfile::tempdir()?;
    vdsa::wire::tls::create_site_certificates(elsewhere.path(), "elsewhere")?;
    let other_ca = std::fs::read(elsewhere.path().join("ca.pem"))?;
    let e = Client::connect(&sim.url, ServerTrust::ca_pem(&other_ca)?).expect_err("another CA");
    assert!(matches!(&e, Error::Tls { .. }), "{e:?}");
    // A server whose key has under 2048 bits: refused, saying why (it
    // read as a bad signature).
    let weak = tempfile::tempdir()?;
    let (cert, key) = (weak.path().join("cert.pem"), weak.path().join("key.pem"));
    let made = std::process::Command::new("openssl")
        .args(["req", "-x509", "-newkey", "rsa:1024", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()?;
    anyhow::ensure!(made.status.success(), "openssl: {}", String::from_utf8_lossy(&made.stderr));
    let weak_sim = Vcsim::start(&VcsimOptions { cert: Some((cert, key)), ..Default::default() })?;
    let e = Client::connect(&weak_sim.url, ServerTrust::Insecure).expect_err("a 1024-bit server key");
    assert!(matches!(&e, Error::Tls { .. }) && e.to_string().contains("under 2048 bits"), "{e}");
    drop(weak_sim);

    // Names not in the inventory.
    let site = site(&sim)?;
    let ova = Ova::open(&vdsa_ova()?)?;
    let mut req = site.plan_cluster("DC0_C0", &settings())?.requests.remove(0);
    req.host = "esx-nowhere".into();
    let e = site.deploy(&ova, &req, &|_| {}).expect_err("an unknown host");
    assert!(
        matches!(&e, site_manager::vsphere::Error::Vsphere(Error::NotFound { kind: "host", known, .. }) if known.contains(&"DC0_C0_H0".to_string())),
        "{e:?}"
    );
    assert!(e.to_string().contains("no host named esx-nowhere in the inventory"), "{e}");
    let mut req = site.plan_cluster("DC0_C0", &settings())?.requests.remove(0);
    req.settings.datastore = "NoSuchDS".into();
    let e = site.deploy(&ova, &req, &|_| {}).expect_err("a bad datastore");
    assert!(
        matches!(&e, site_manager::vsphere::Error::Vsphere(Error::NotFound { kind: "datastore", known, .. }) if known == &["LocalDS_0".to_string()]),
        "{e:?}"
    );
    let mut near_end = settings();
    near_end.ip = Ipv4Addr::new(192, 0, 2, 254);
    let e = site.plan_cluster("DC0_C0", &near_end).expect_err("addresses past the subnet");
    assert!(e.to_string().contains("the subnet 192.0.2.0/24 has no free address left"), "{e}");
    let e = site.plan_cluster("NoCluster", &settings()).expect_err("an unknown cluster");
    assert!(matches!(&e, site_manager::vsphere::Error::Vsphere(Error::NotFound { kind: "cluster", .. })), "{e:?}");
    // A reference the server does not know.
    let e = site.client().vm(&MoRef::new("VirtualMachine", "vm-404")).expect_err("unknown VM");
    assert!(matches!(&e, Error::ObjectNotFound { obj } if obj.value == "vm-404"), "{e:?}");
    // A failing task: powering on a VM that is on.
    let on = site.client().vms()?.into_iter().find(|v| v.power_state == "poweredOn").context("a running VM")?;
    let e = site.client().power_on(&on.moref).expect_err("already on");
    assert!(matches!(&e, Error::TaskFailed { fault, .. } if fault == "InvalidPowerState"), "{e:?}");

    // The server goes away mid-session.
    sim.kill();
    let e = site.hosts().expect_err("the server is gone");
    assert!(matches!(&e, site_manager::vsphere::Error::Vsphere(err) if err.is_connection()), "{e:?}");
    Ok(())
}

/// Seconds and nanoseconds of an xsd:dateTime in UTC ("…T01:32:37.8998Z").
pub(crate) fn instant(t: &str) -> Result<(u64, u32)> {
    let (date, time) = t.trim_end_matches('Z').split_once('T').context("dateTime")?;
    let d: Vec<u64> = date.split('-').map(str::parse).collect::<Result<_, _>>()?;
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let h: Vec<u64> = hms.split(':').map(str::parse).collect::<Result<_, _>>()?;
    let nanos: u32 = format!("{frac:0<9}")[..9].parse()?;
    // Days are compared within one run, so a month length of 31 suffices.
    let secs = ((d[0] * 12 + d[1]) * 31 + d[2]) * 86400 + h[0] * 3600 + h[1] * 60 + h[2];
    Ok((secs, nanos))
}

#[test]
fn recovery_vms_land_on_their_host_datastore_and_networks_and_boot_in_order() -> Result<()> {
    let sim = Vcsim::start(&VcsimOptions { datastores: 2, dv_portgroups: 1, vms: 0, ..Default::default() })?;
    let site = site(&sim)?;
    let specs = [
        ("db", "DC0_C0_H0", "LocalDS_0", vec!["VM Network"], 1, vec![4u64 << 30, 8 << 30]),
        ("app-1", "DC0_C0_H1", "LocalDS_1", vec!["DC0_DVPG0"], 2, vec![2 << 30]),
        ("app-2", "DC0_C1_H0", "LocalDS_1", vec!["VM Network", "DC0_DVPG0"], 2, vec![2 << 30]),
        ("web", "DC0_C1_H1", "LocalDS_0", vec!["VM Network"], 3, vec![1 << 30]),
    ];
    let mut created = Vec::new();
    // Created in reverse boot order, so creation order cannot pass for
    // boot order.
    for (name, host, ds, nets, group, disks) in specs.iter().rev() {
        let vm = site.create_recovery_vm(&RecoveryVmSpec {
            name: name.to_string(),
            host: host.to_string(),
            datastore: ds.to_string(),
            guest_id: "otherLinux64Guest".into(),
            cpus: 2,
            memory_mb: 2048,
            disks: disks.clone(),
            networks: nets.iter().map(|n| n.to_string()).collect(),
            boot_group: *group,
            test_id: None,
            extra_config: Vec::new(),
            customization: None,
        })?;
        created.push((vm, *group));
    }
    let inv = site.client().inventory()?;
    for ((name, host, ds, nets, _, disks), (vm, _)) in specs.iter().rev().zip(&created) {
        let v = site.client().vm(vm)?;
        assert_eq!(&v.name, name);
        assert_eq!(v.host.as_ref(), Some(&inv.host(host)?.moref), "{name} host");
        assert_eq!(v.power_state, "poweredOff");
        let ds_ref = inv.datastore_for(inv.host(host)?, ds)?.moref.clone();
        assert_eq!(v.disks.len(), disks.len(), "{name} disks");
        for (d, want) in v.disks.iter().zip(disks) {
            assert_eq!(d.capacity_bytes, *want, "{name} disk size");
            assert_eq!(vsphere_client::datastore_name(&d.file), *ds, "{name} disk file {}", d.file);
            assert!(d.datastore.is_none() || d.datastore.as_ref() == Some(&ds_ref), "{name} disk datastore");
        }
        let mut got: Vec<MoRef> = v.networks.clone();
        got.sort();
        let mut want: Vec<MoRef> = nets
            .iter()
            .map(|n| inv.network_for(inv.host(host).expect("host"), n).map(|n| n.moref.clone()))
            .collect::<Result<_, _>>()?;
        want.sort();
        assert_eq!(got, want, "{name} networks");
        assert_eq!(v.nics.len(), nets.len());
    }
    // Reconfigure "web" (created first): a disk and a NIC more, then its
    // first NIC removed.
    let web = &created[0].0;
    let web_host = inv.host("DC0_C1_H1")?;
    site.client().reconfigure_vm(
        web,
        &VmChange {
            add_disks: vec![DiskSpec { capacity_bytes: 3 << 30, thin: true, datastore: None }],
            add_nics: vec![NicSpec { network: inv.network_for(web_host, "DC0_DVPG0")?.clone(), adapter: None }],
            ..Default::default()
        },
    )?;
    let v = site.client().vm(web)?;
    assert_eq!(v.disks.len(), 2);
    assert_eq!(v.disks[1].capacity_bytes, 3 << 30);
    assert_eq!(vsphere_client::datastore_name(&v.disks[1].file), "LocalDS_0", "a new disk goes beside the first");
    assert_ne!(v.disks[0].unit_number, v.disks[1].unit_number);
    assert_eq!(v.nics.len(), 2);
    let first_nic = v.nics[0].key;
    site.client().reconfigure_vm(web, &VmChange { remove_devices: vec![first_nic], ..Default::default() })?;
    let v = site.client().vm(web)?;
    assert_eq!(v.nics.len(), 1);
    assert_eq!(
        v.networks,
        vec![inv.network_for(web_host, "DC0_DVPG0")?.moref.clone()],
        "only the DV port group is left"
    );
    assert_eq!(v.disks.len(), 2);
    let e = site.client().reconfigure_vm(web, &VmChange { remove_devices: vec![first_nic], ..Default::default() });
    assert!(matches!(e, Err(Error::NotFound { kind: "device", .. })), "{e:?}");

    // An unknown network is refused before anything is made.
    let e = site
        .create_recovery_vm(&RecoveryVmSpec {
            name: "stray".into(),
            host: "DC0_C0_H0".into(),
            datastore: "LocalDS_0".into(),
            guest_id: "otherLinux64Guest".into(),
            cpus: 1,
            memory_mb: 512,
            disks: vec![1 << 30],
            networks: vec!["No Such Net".into()],
            boot_group: 1,
            test_id: None,
            extra_config: Vec::new(),
            customization: None,
        })
        .expect_err("unknown network");
    assert!(matches!(&e, site_manager::vsphere::Error::Vsphere(Error::NotFound { kind: "network", .. })), "{e:?}");
    assert!(site.client().vms()?.iter().all(|v| v.name != "stray"));

    let records = site.power_on_in_boot_order(&created, Duration::from_millis(50))?;
    assert_eq!(records.len(), 4);
    for r in &records {
        assert_eq!(site.client().vm(&r.vm)?.power_state, "poweredOn");
    }
    // By the server's own clock: every VM of a group was on before any VM
    // of the next group started.
    for g in 1..3u32 {
        let last_on = records
            .iter()
            .filter(|r| r.boot_group == g)
            .map(|r| instant(r.complete_time.as_deref().unwrap_or("")))
            .collect::<Result<Vec<_>>>()?
            .into_iter()
            .max()
            .context("group has VMs")?;
        let first_start = records
            .iter()
            .filter(|r| r.boot_group == g + 1)
            .map(|r| instant(r.start_time.as_deref().unwrap_or("")))
            .collect::<Result<Vec<_>>>()?
            .into_iter()
            .min()
            .context("next group has VMs")?;
        assert!(last_on < first_start, "group {g} finished at {last_on:?}, group {} started at {first_start:?}", g + 1);
    }
    Ok(())
}

#[test]
fn test_vms_on_an_isolated_network_are_removed_with_it() -> Result<()> {
    let sim = Vcsim::start(&VcsimOptions { vms: 1, ..Default::default() })?;
    let site = site(&sim)?;
    let production_before: Vec<String> = site.vms_with_disks()?.into_iter().map(|v| v.name).collect();
    assert!(!production_before.is_empty());

    // A real network's name is refused.
    let e = site.create_test_network("VM Network", &["DC0_C0_H0".to_string()]).expect_err("a real network's name");
    assert!(matches!(e, site_manager::vsphere::Error::NetworkExists { .. }), "{e:?}");

    let hosts = vec!["DC0_C0_H0".to_string(), "DC0_C1_H1".to_string()];
    let net = site.create_test_network("test-net-42", &hosts)?;
    let inv = site.client().inventory()?;
    for h in &hosts {
        let ns = inv.host(h)?.network_system.clone().context("network system")?;
        let info = site.client().host_network_info(&ns)?;
        let sw = info.vswitches.iter().find(|(n, _, _)| n == "test-net-42").context("the switch")?;
        assert!(sw.2.is_empty(), "{h}: the test switch has uplinks {:?}", sw.2);
    }
    let first_ns = inv.host("DC0_C0_H0")?.network_system.clone().context("ns")?;
    assert!(site.client().host_network_info(&first_ns)?.has_portgroup("test-net-42"));

    let mut test_vms = Vec::new();
    for (i, h) in hosts.iter().enumerate() {
        test_vms.push(site.create_recovery_vm(&RecoveryVmSpec {
            name: format!("test-42-vm{i}"),
            host: h.clone(),
            datastore: "LocalDS_0".into(),
            guest_id: "otherLinux64Guest".into(),
            cpus: 1,
            memory_mb: 1024,
            disks: vec![1 << 30],
            networks: vec!["test-net-42".into()],
            boot_group: 1,
            test_id: Some("42".into()),
            extra_config: Vec::new(),
            customization: None,
        })?);
    }
    let test_net_ref = site.client().inventory()?.network_for(inv.host("DC0_C0_H0")?, "test-net-42")?.moref.clone();
    for vm in &test_vms {
        let v = site.client().vm(vm)?;
        assert_eq!(v.networks, vec![test_net_ref.clone()], "{} is only on the test network", v.name);
        assert_eq!(v.nics[0].network_name, "test-net-42");
    }
    site.power_on_in_boot_order(&test_vms.iter().map(|v| (v.clone(), 1)).collect::<Vec<_>>(), Duration::ZERO)?;

    let mut removed = site.remove_test_vms("42")?;
    removed.sort();
    assert_eq!(removed, ["test-42-vm0", "test-42-vm1"]);
    // Another process finds what this one made, and removes it.
    let found = site.find_test_network("test-net-42", &hosts)?;
    assert_eq!(
        found.hosts.iter().map(|(h, _, sw, pg)| (h.clone(), *sw, *pg)).collect::<Vec<_>>(),
        net.hosts.iter().map(|(h, _, sw, pg)| (h.clone(), *sw, *pg)).collect::<Vec<_>>()
    );
    site.remove_test_network(&found)?;

    let names: Vec<String> = site.client().vms()?.into_iter().map(|v| v.name).collect();
    assert!(names.iter().all(|n| !n.starts_with("test-42")), "{names:?}");
    let production_after: Vec<String> = site.vms_with_disks()?.into_iter().map(|v| v.name).collect();
    assert_eq!(production_after, production_before, "production VMs untouched");
    let inv = site.client().inventory()?;
    assert!(inv.networks.iter().all(|n| n.name != "test-net-42"), "the network is gone");
    for h in &hosts {
        let ns = inv.host(h)?.network_system.clone().context("ns")?;
        let info = site.client().host_network_info(&ns)?;
        assert!(!info.has_vswitch("test-net-42") && !info.has_portgroup("test-net-42"), "{h}: {info:?}");
    }
    Ok(())
}

#[test]
fn the_operator_command_deploys_lists_and_undeploys_with_clear_errors() -> Result<()> {
    let sim = Vcsim::start(&VcsimOptions { clusters: 1, hosts_per_cluster: 2, ..Default::default() })?;
    let bin = vsphere_lab::workspace_binary("site-manager", "site-manager")?;
    let dir = tempfile::tempdir()?;
    let password = dir.path().join("password");
    std::fs::write(&password, format!("{PASSWORD}\n"))?;
    let ca = sim.ca_pem.clone().context("CA")?;
    let run = |pw: &std::path::Path, args: &[&str]| -> Result<(bool, String, String)> {
        let out = std::process::Command::new(&bin)
            .args(["vsphere", "--url", &sim.url, "--user", USER, "--password-file"])
            .arg(pw)
            .arg("--ca-file")
            .arg(&ca)
            .args(args)
            .env_remove("VSPHERE_PASSWORD")
            .output()?;
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    };
    let ova = vdsa_ova()?;
    let (ok, out, err) = run(
        &password,
        &[
            "deploy",
            "--ova",
            ova.to_str().context("path")?,
            "--cluster",
            "DC0_C0",
            "--datastore",
            "LocalDS_0",
            "--network",
            "VM Network",
            "--ip",
            "192.0.2.30",
            "--netmask",
            "255.255.255.0",
            "--site-manager",
            "192.0.2.2:8443",
            "--registration-token",
            vsphere_lab::LAB_REGISTRATION_TOKEN,
        ],
    )?;
    assert!(ok, "deploy failed: {out}{err}");
    assert!(out.contains("2 of 2 hosts have the VDSA installed"), "{out}");
    // Without a terminal, one line per state change per host.
    assert!(err.contains("DC0_C0_H0: uploading") && err.contains("DC0_C0_H1: installed"), "{err}");
    let (ok, out, _) = run(&password, &["hosts"])?;
    assert!(ok);
    let line = out.lines().find(|l| l.starts_with("DC0_C0_H1")).context("host line")?;
    assert!(line.contains("installed") && line.contains("VDSA-DC0_C0_H1"), "{out}");
    let (ok, out, _) = run(&password, &["undeploy", "--host", "DC0_C0_H1"])?;
    assert!(ok && out.contains("VDSA removed"), "{out}");
    let (_, out, _) = run(&password, &["hosts"])?;
    let line = out.lines().find(|l| l.starts_with("DC0_C0_H1")).context("host line")?;
    assert!(line.contains("not installed"), "{out}");

    // The thumbprint an operator pins is the one the server presents.
    let out = std::process::Command::new(&bin).args(["thumbprint", "--url", &sim.url]).output()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let pinned = text.lines().find_map(|l| l.strip_prefix("SHA-256 ")).context("SHA-256 line")?.trim().to_string();
    let out = std::process::Command::new(&bin)
        .args(["vsphere", "--url", &sim.url, "--user", USER, "--password-file"])
        .arg(&password)
        .args(["--thumbprint", &pinned, "hosts"])
        .output()?;
    assert!(out.status.success(), "pinned {pinned}: {}", String::from_utf8_lossy(&out.stderr));

    let wrong = dir.path().join("wrong");
    std::fs::write(&wrong, "nope\n")?;
    let (ok, _, err) = run(&wrong, &["hosts"])?;
    assert!(!ok && err.contains("wrong user name or password"), "{err}");
    let (ok, _, err) = run(&password, &["undeploy", "--host", "esx-99"])?;
    assert!(!ok && err.contains("no host named esx-99 in the inventory"), "{err}");
    let (ok, _, err) = run(
        &password,
        &[
            "deploy",
            "--ova",
            ova.to_str().context("path")?,
            "--datastore",
            "NoDS",
            "--network",
            "VM Network",
            "--host",
            "DC0_C0_H0",
            "--ip",
            "192.0.2.40",
            "--netmask",
            "255.255.255.0",
            "--site-manager",
            "192.0.2.2:8443",
            "--registration-token",
            vsphere_lab::LAB_REGISTRATION_TOKEN,
        ],
    )?;
    assert!(!ok && err.contains("no datastore named NoDS on host DC0_C0_H0 in the inventory"), "{err}");
    // A malformed URL is the operator's, not vCenter's.
    let out = std::process::Command::new(&bin)
        .args(["vsphere", "--url", "https//vc", "--user", USER, "--password-file"])
        .arg(&password)
        .args(["--insecure", "hosts"])
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("bad vCenter URL \"https//vc\"") && !err.contains("vCenter rejected"),
        "{err}"
    );
    // Output into a pipe closed early (`| head -1`) ends quietly.
    let mut child = std::process::Command::new(&bin)
        .args(["vsphere", "--url", &sim.url, "--user", USER, "--password-file"])
        .arg(&password)
        .arg("--ca-file")
        .arg(&ca)
        .arg("hosts")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    drop(child.stdout.take());
    let out = child.wait_with_output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "a closed pipe made it panic: {err}");
    Ok(())
}

/// The site manager's API deploys a host's VDSA to vCenter as a task (the
/// appliance carries a registration token minted for it; the host shows
/// booting until a VDSA registers with it, then installed) and undeploys
/// it as a task.
#[test]
fn the_site_manager_deploys_and_undeploys_a_vdsa_as_tasks() -> Result<()> {
    use integration::site_lab::SiteManagerProcess;
    use serde_json::json;
    let sim =
        Vcsim::start(&VcsimOptions { clusters: 1, hosts_per_cluster: 1, standalone_hosts: 0, ..Default::default() })?;
    let ova = vdsa_ova()?;
    let dir = tempfile::tempdir()?;
    let lab = std::path::Path::new(env!("CARGO_BIN_EXE_lab"));
    let sm = SiteManagerProcess::start(lab, &dir.path().join("sm"), &[])?;
    let host_name = site(&sim)?.hosts()?.first().context("a simulated host")?.host.clone();
    let h = sm.post("/api/v1/hosts", json!({"name": host_name, "hypervisor": "vsphere"}))?;
    let id = h["id"].as_str().context("host id")?.to_string();
    let deploy = json!({"datastore": "LocalDS_0", "network": "VM Network", "ip": "192.0.2.30",
                        "netmask": "255.255.255.0", "gateway": "192.0.2.1", "dns": ["192.0.2.53"]});
    // Without vCenter settings the deploy is refused, naming what to do.
    let refused = sm.post(&format!("/api/v1/hosts/{id}/deploy"), deploy.clone()).err().context("refused")?;
    assert!(format!("{refused:#}").contains("PUT /api/v1/site/vcenter"), "{refused:#}");
    let ca = std::fs::read_to_string(sim.ca_pem.as_ref().context("the simulator's CA")?)?;
    let set = sm.call(
        "PUT",
        "/api/v1/site/vcenter",
        Some(json!({"url": sim.url, "user": USER, "password": PASSWORD, "ca_pem": ca, "ova_path": ova})),
    )?;
    assert!(set.get("password").is_none(), "the password came back: {set}");
    // What the appliance would refuse is refused before any vCenter call.
    for (field, value) in [("netmask", "255.0.255.0"), ("gateway", "192.0.3.1"), ("ip", "192.0.2.255")] {
        let mut bad = deploy.clone();
        bad[field] = json!(value);
        let (code, body) = sm.call_as("POST", &format!("/api/v1/hosts/{id}/deploy"), Some(bad), Some(&sm.admin))?;
        assert_eq!(code, 400, "{field}={value}: {body}");
        assert_eq!(body["field"], field, "{body}");
    }
    let task = sm.post(&format!("/api/v1/hosts/{id}/deploy"), deploy)?;
    let t = sm.get(&format!("/api/v1/tasks/{}/wait?timeout_ms=120000", task["id"].as_str().unwrap_or_default()))?;
    assert_eq!(t["completion"], "Success", "{t}");
    // Powered on is not installed: the host waits for its VDSA to boot
    // and register.
    assert_eq!(sm.get(&format!("/api/v1/hosts/{id}"))?["vdsa"], "booting");
    let deployed = site(&sim)?.hosts()?;
    let vm = deployed.iter().find(|x| x.host == host_name).context("the host")?;
    assert_eq!(vm.state, VdsaState::Installed, "{deployed:?}");
    // vcsim runs no guests: a real VDSA started with the properties read
    // back from the deployed VM stands in for the appliance's boot.
    let vdsa_vm = vm.vm.as_ref().context("the VDSA VM")?;
    let prop = |k: &str| vdsa_vm.vapp_property(k).map(str::to_string).with_context(|| format!("property {k}"));
    assert_eq!(prop("site_manager")?, sm.management_address());
    let mut agent = integration::site_lab::AgentProcess::start(
        lab,
        &dir.path().join("appliance"),
        &format!("vdsa-{}", prop("ip")?),
        &prop("site_manager")?,
        &prop("registration_token")?,
    )?;
    sm.wait_until(&format!("/api/v1/hosts/{id}"), Duration::from_secs(30), "installed", |h| h["vdsa"] == "installed")?;
    agent.stop();
    let task = sm.post(&format!("/api/v1/hosts/{id}/undeploy"), json!({}))?;
    let t = sm.get(&format!("/api/v1/tasks/{}/wait?timeout_ms=120000", task["id"].as_str().unwrap_or_default()))?;
    assert_eq!(t["completion"], "Success", "{t}");
    assert_eq!(sm.get(&format!("/api/v1/hosts/{id}"))?["vdsa"], "not_installed");
    assert!(site(&sim)?.hosts()?.iter().all(|x| x.state == VdsaState::NotInstalled));
    Ok(())
}

/// What an independent run of `site-manager vsphere deploy` found, each
/// shown failing before its fix: addresses handed out twice on a re-run,
/// settings the appliance would refuse accepted, a re-run failing on the
/// hosts already done, hosts in maintenance mode or disconnected deployed
/// to, two deploys at once tearing down each other's VMs, and a deploy
/// that waited forever on a frozen vCenter.
#[test]
fn deploys_keep_addresses_refuse_bad_settings_finish_re_runs_skip_unavailable_hosts_serialise_and_time_out(
) -> Result<()> {
    use site_manager::vsphere::{DeployDeadlines, Error as DeployError};
    let sim =
        Vcsim::start(&VcsimOptions { clusters: 1, hosts_per_cluster: 3, standalone_hosts: 0, ..Default::default() })?;
    let site = site(&sim)?;
    let ova = Ova::open(&vdsa_ova()?)?;
    let mut hosts: Vec<String> = site.hosts()?.into_iter().map(|h| h.host).collect();
    hosts.sort();
    assert_eq!(hosts.len(), 3);

    // Settings the appliance would refuse, on both paths, before any call.
    type Spoil = Box<dyn Fn(&mut DeploySettings)>;
    let bad: Vec<(&str, Spoil)> = vec![
        ("netmask", Box::new(|s| s.netmask = Ipv4Addr::new(255, 0, 255, 0))),
        ("site_manager", Box::new(|s| s.site_manager = String::new())),
        ("site_manager", Box::new(|s| s.site_manager = "192.0.2.2".into())),
        ("registration_token", Box::new(|s| s.registration_token = String::new())),
        ("gateway", Box::new(|s| s.gateway = Some(Ipv4Addr::new(198, 51, 100, 1)))),
        // The cluster's addresses run from .10: the first VDSA would be
        // the gateway.
        ("gateway", Box::new(|s| s.gateway = Some(Ipv4Addr::new(192, 0, 2, 10)))),
    ];
    for (property, spoil) in &bad {
        let mut s = settings();
        spoil(&mut s);
        let e = site.plan_cluster("DC0_C0", &s).expect_err("refused");
        assert!(e.to_string().contains(&format!("the property {property}:")), "{property}: {e}");
    }
    let mut s = settings();
    s.gateway = Some(Ipv4Addr::new(192, 0, 2, 11));
    let e = site.plan_host(&hosts[0], Ipv4Addr::new(192, 0, 2, 11), &s).expect_err("the gateway as the address");
    assert!(e.to_string().contains("the property gateway:"), "{e}");
    let e = site.plan_host(&hosts[0], Ipv4Addr::new(192, 0, 2, 255), &settings()).expect_err("broadcast");
    assert!(e.to_string().contains("broadcast address"), "{e}");

    // One host first (as if it had joined the cluster's VDSAs earlier) at
    // .10; then the cluster from .10: the held address is kept by its host
    // and never handed to another.
    let one = site.plan_host(&hosts[1], Ipv4Addr::new(192, 0, 2, 10), &settings())?;
    site.deploy(&ova, &one, &|_| {})?;
    let plan = site.plan_cluster("DC0_C0", &settings())?;
    let ips: Vec<(String, String)> = plan.requests.iter().map(|r| (r.host.clone(), r.ip.to_string())).collect();
    assert_eq!(
        ips,
        [
            (hosts[0].clone(), "192.0.2.11".to_string()),
            (hosts[1].clone(), "192.0.2.10".to_string()),
            (hosts[2].clone(), "192.0.2.12".to_string())
        ]
    );
    // The address another VDSA holds is refused for a single host, and as
    // the gateway.
    let e = site.plan_host(&hosts[0], Ipv4Addr::new(192, 0, 2, 10), &settings()).expect_err("held");
    assert!(e.to_string().contains("is held by the VDSA"), "{e}");
    let mut s = settings();
    s.gateway = Some(Ipv4Addr::new(192, 0, 2, 10));
    s.ip = Ipv4Addr::new(192, 0, 2, 20);
    let e = site.plan_cluster("DC0_C0", &s).expect_err("a VDSA as the gateway");
    assert!(e.to_string().contains("the property gateway: 192.0.2.10 is the address of a VDSA"), "{e}");

    // A host in maintenance mode is skipped with the reason and shown so.
    let inv = site.client().inventory()?;
    let h2 = inv.host(&hosts[2])?.moref.clone();
    site.client().run_task("EnterMaintenanceMode_Task", &h2, |w| {
        w.text("timeout", "0");
    })?;
    let plan = site.plan_cluster("DC0_C0", &settings())?;
    assert_eq!(plan.skipped, [(hosts[2].clone(), "it is in maintenance mode".to_string())]);
    assert_eq!(
        site.hosts()?.iter().find(|h| h.host == hosts[2]).map(|h| h.host_state.clone()).as_deref(),
        Some("maintenance")
    );

    // Two deploys of the cluster at once (two operators): every host ends
    // with exactly one VDSA, installed; nothing installed is torn down;
    // the re-run reports the host that was done as already installed.
    let other = VsphereSite::connect(&sim.url, trust(&sim)?, USER, PASSWORD)?;
    let events: Mutex<Vec<(String, DeployEvent)>> = Mutex::new(Vec::new());
    let (a, b) = std::thread::scope(|sc| {
        let ta = sc.spawn(|| {
            site.deploy_many(&ova, &plan.requests, 2, &|h, e| {
                events.lock().unwrap_or_else(|p| p.into_inner()).push((h.into(), e))
            })
        });
        let tb = sc.spawn(|| {
            other.deploy_many(&ova, &plan.requests, 2, &|h, e| {
                events.lock().unwrap_or_else(|p| p.into_inner()).push((h.into(), e))
            })
        });
        (ta.join(), tb.join())
    });
    let (a, b) = (a.map_err(|_| anyhow::anyhow!("panicked"))??, b.map_err(|_| anyhow::anyhow!("panicked"))??);
    for ((host, ra), (_, rb)) in a.iter().zip(&b) {
        let ok_or_busy = |r: &std::result::Result<MoRef, DeployError>| {
            r.is_ok() || matches!(r, Err(DeployError::DeployInProgress { .. }))
        };
        assert!(ok_or_busy(ra) && ok_or_busy(rb), "{host}: {ra:?} / {rb:?}");
    }
    let events = events.into_inner().unwrap_or_else(|p| p.into_inner());
    assert!(
        events.iter().any(|(h, e)| h == &hosts[1] && matches!(e, DeployEvent::AlreadyInstalled { .. })),
        "{events:?}"
    );
    let vms = site.client().vms()?;
    for h in &hosts[..2] {
        let href = inv.host(h)?.moref.value.clone();
        let vdsas: Vec<&vsphere_client::Vm> = vms
            .iter()
            .filter(|v| v.extra(site_manager::vsphere::MARK_ROLE) == Some("vdsa"))
            .filter(|v| v.extra(site_manager::vsphere::MARK_HOST) == Some(href.as_str()))
            .collect();
        assert_eq!(vdsas.len(), 1, "{h}: {:?}", vdsas.iter().map(|v| &v.name).collect::<Vec<_>>());
        assert_eq!(vdsas[0].extra(site_manager::vsphere::MARK_STATE), Some("installed"), "{h}");
    }

    // A frozen vCenter (SIGSTOP: the connection stays open) during the
    // upload: the upload's deadline fails the deploy, naming the phase.
    site.client().run_task("ExitMaintenanceMode_Task", &h2, |w| {
        w.text("timeout", "0");
    })?;
    let mut deadlines = DeployDeadlines::default();
    deadlines.import.upload_base = Duration::from_secs(5);
    deadlines.import.upload_min_rate = 1 << 40;
    let quick = VsphereSite::connect_within(&sim.url, trust(&sim)?, USER, PASSWORD, Duration::from_secs(5))?
        .with_deadlines(deadlines);
    let req =
        quick.plan_cluster("DC0_C0", &settings())?.requests.into_iter().find(|r| r.host == hosts[2]).context("plan")?;
    let frozen = std::sync::atomic::AtomicBool::new(false);
    let started = std::time::Instant::now();
    let r = quick.deploy(&ova, &req, &|e| {
        if matches!(e, DeployEvent::Uploading { .. }) && !frozen.swap(true, std::sync::atomic::Ordering::SeqCst) {
            sim.freeze();
        }
    });
    let took = started.elapsed();
    sim.thaw();
    let e = r.expect_err("a frozen vCenter fails the deploy");
    assert!(frozen.load(std::sync::atomic::Ordering::SeqCst), "the upload never started");
    assert!(e.to_string().contains("timed out") && e.to_string().contains("disk upload"), "{e}");
    assert!(took < Duration::from_secs(40), "the deploy took {took:?} with a 5 s upload deadline");
    Ok(())
}
