//! Failover tests and a failover whose VMs recover to a vSphere host: the
//! site manager makes the VMs in the real vCenter simulator from the
//! exports of real VDSAs (vcsim runs no guests), on an isolated network per
//! test, re-addressed by guest customisation and powered on in the VPG's
//! boot order, and removes them when the test stops or the failover is
//! rolled back.

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use integration::site_lab::{ProtectedSite, SiteSpec};
use integration::vcsim::{Vcsim, VcsimOptions};
use integration::vsphere_lab;
use serde_json::{json, Value};
use site_manager::vsphere::VsphereSite;

fn vsphere(sim: &Vcsim) -> Result<VsphereSite> {
    Ok(VsphereSite::connect(&sim.url, vsphere_lab::lab_trust(sim)?, vsphere_lab::LAB_USER, vsphere_lab::LAB_PASSWORD)?)
}

/// The product's VMs in vCenter with a marker of `record` (a test's or a
/// failover's id): (name, power state, guest address, network names,
/// extra config).
type SimVm = (String, String, String, Vec<String>, Vec<(String, String)>);

fn vms_of(site: &VsphereSite, record: &str) -> Result<Vec<SimVm>> {
    let c = site.client();
    let inv = c.inventory()?;
    let mut out = Vec::new();
    for v in c.vms()? {
        if v.extra("vdsa.test") != Some(record) {
            continue;
        }
        let guest = c.retrieve_one(&v.moref, &["guest.ipAddress"])?;
        let nets = v
            .networks
            .iter()
            .filter_map(|m| inv.networks.iter().find(|n| &n.moref == m).map(|n| n.name.clone()))
            .collect();
        out.push((
            v.name.clone(),
            v.power_state.clone(),
            guest.text("guest.ipAddress").unwrap_or_default().to_string(),
            nets,
            v.extra_config.clone(),
        ));
    }
    out.sort();
    Ok(out)
}

fn network_names(site: &VsphereSite) -> Result<HashSet<String>> {
    Ok(site.client().inventory()?.networks.into_iter().map(|n| n.name).collect())
}

fn wait_task(site: &ProtectedSite, task: &Value) -> Result<Value> {
    let id = task["id"].as_str().context("task id")?;
    site.sm()?
        .wait_until(&format!("/api/v1/tasks/{id}"), Duration::from_secs(120), "the task", |t| t["status"] != "Running")
}

#[test]
fn tests_and_a_failover_on_a_vsphere_host_make_customised_vms_in_boot_order_and_remove_them() -> Result<()> {
    ensure!(
        integration::kvm_lab::qemu_available(),
        "qemu-storage-daemon is missing: integration/run-tests installs it"
    );
    let sim =
        Vcsim::start(&VcsimOptions { clusters: 1, hosts_per_cluster: 2, standalone_hosts: 0, ..Default::default() })?;
    let vc = vsphere(&sim)?;
    let host = vc.hosts()?.first().context("a simulated host")?.host.clone();
    let dir = tempfile::tempdir()?;
    let lab = Path::new(env!("CARGO_BIN_EXE_lab"));
    let spec = SiteSpec {
        hosts: 2,
        checkpoint_interval_ms: 3_600_000,
        recovery_vsphere_host: Some(host.clone()),
        ..SiteSpec::one_vm()
    };
    let site = ProtectedSite::start(lab, dir.path(), &spec, |m| println!("{m}"))?;
    let sm = site.sm()?;
    let vpg = site.vpg.clone();

    // Re-IP for tests, a real network for failover, a boot delay after
    // the first VM; the VMs are listed with vm-1 first: boot order is the
    // VPG's order, not the name's.
    let mut v = sm.get(&format!("/api/v1/vpgs/{vpg}"))?;
    let mut vms = v["settings"]["vms"].as_array().cloned().context("the VPG's VMs")?;
    vms.reverse();
    for (i, vm) in vms.iter_mut().enumerate() {
        vm["test_network"] = json!({"address": format!("10.9.0.{}/24", 10 + i), "gateway": "10.9.0.1",
                                   "dns": ["10.9.0.53"]});
        vm["failover_network"] = json!({"network": "VM Network", "address": format!("10.20.0.{}/24", 10 + i)});
        vm["boot_delay_secs"] = json!(if i == 0 { 2 } else { 0 });
    }
    v["settings"]["vms"] = Value::Array(vms.clone());
    v["settings"]["test_network"] = json!("dr-isolated");
    sm.call("PUT", &format!("/api/v1/vpgs/{vpg}"), Some(v["settings"].clone()))?;
    let names: Vec<String> = vms.iter().map(|m| m["name"].as_str().unwrap_or_default().to_string()).collect();

    // Without vCenter settings the test's exports serve, and the start
    // task fails naming what to do.
    let cp = |name: &str| -> Result<u64> {
        let c = sm.post(&format!("/api/v1/vpgs/{vpg}/checkpoints"), json!({ "name": name }))?;
        let id = c["id"].as_u64().context("checkpoint id")?;
        let w = sm.get(&format!("/api/v1/vpgs/{vpg}/checkpoints/{id}/wait?timeout_ms=30000"))?;
        ensure!(w["durable"] == true, "checkpoint {id}: {w}");
        Ok(id)
    };
    let c1 = cp("one")?;
    let r = sm.post(&format!("/api/v1/vpgs/{vpg}/failover-tests"), json!({"checkpoints": [c1]}))?;
    let t = wait_task(&site, &r["task"])?;
    ensure!(t["completion"] == "Failed", "{t}");
    ensure!(t["exception"].as_str().unwrap_or_default().contains("PUT /api/v1/site/vcenter"), "{t}");
    let test = &r["tests"][0]["id"];
    let stop = sm.post(
        &format!("/api/v1/failover-tests/{}/stop", test.as_str().unwrap_or_default()),
        json!({"result": "fail", "notes": "no vCenter"}),
    )?;
    ensure!(wait_task(&site, &stop["task"])?["completion"] == "Success");

    let ca = std::fs::read_to_string(sim.ca_pem.as_ref().context("the simulator's CA")?)?;
    sm.call(
        "PUT",
        "/api/v1/site/vcenter",
        Some(json!({"url": sim.url, "user": vsphere_lab::LAB_USER, "password": vsphere_lab::LAB_PASSWORD,
                    "ca_pem": ca})),
    )?;
    let networks_before = network_names(&vc)?;

    // Two tests at two checkpoints at once.
    let c2 = cp("two")?;
    let r = sm.post(&format!("/api/v1/vpgs/{vpg}/failover-tests"), json!({"checkpoints": [c1, c2]}))?;
    let t = wait_task(&site, &r["task"])?;
    ensure!(t["completion"] == "Success", "{t}");
    let mut made_networks = HashSet::new();
    for test in r["tests"].as_array().context("tests")? {
        let id = test["id"].as_str().context("test id")?;
        let rec = sm.get(&format!("/api/v1/failover-tests/{id}"))?;
        let rv = &rec["recovery_vms"];
        ensure!(rv["phase"] == "ready", "{rec}");
        let net = rv["made_network"].as_str().context("an isolated network per test")?.to_string();
        ensure!(net.starts_with("dr-isolated-") && !networks_before.contains(&net), "{net}");
        made_networks.insert(net.clone());
        let in_vc = vms_of(&vc, id)?;
        ensure!(in_vc.len() == 2, "{in_vc:?} {rec}");
        for (i, name) in names.iter().enumerate() {
            let want = format!("{name} - test {}", &id[..8]);
            let (_, power, ip, nets, extra) =
                in_vc.iter().find(|x| x.0 == want).with_context(|| format!("{want} in {in_vc:?}"))?;
            ensure!(power == "poweredOn", "{want}: {power}");
            ensure!(*ip == format!("10.9.0.{}", 10 + i), "{want}: guest customisation gave {ip:?}");
            ensure!(nets == &vec![net.clone()], "{want}: {nets:?}");
            // Each disk's export is named on the VM.
            let vm_disks = vms[i]["disks"].as_array().context("disks")?;
            for d in vm_disks {
                let key = format!("vdsa.export.{}", d["id"].as_str().unwrap_or_default());
                let uri = extra.iter().find(|(k, _)| *k == key).map(|(_, v)| v.clone()).unwrap_or_default();
                let served = rec["exports"].as_array().context("exports")?.iter().any(|e| e["uri"] == uri.as_str());
                ensure!(served && uri.starts_with("nbd://"), "{want}: {key}={uri:?} not among {}", rec["exports"]);
            }
        }
        // Boot order: the VPG's first VM is on, then its 2 s delay, then
        // the second.
        let on: Vec<(u64, u32)> = rv["vms"]
            .as_array()
            .context("vms")?
            .iter()
            .map(|x| crate::vsphere::instant(x["powered_on"].as_str().unwrap_or_default()))
            .collect::<Result<_>>()?;
        ensure!(rv["vms"][0]["name"].as_str().unwrap_or_default().starts_with(names[0].as_str()), "{rv}");
        let ns = |(secs, nanos): (u64, u32)| i128::from(secs) * 1_000_000_000 + i128::from(nanos);
        let gap = ns(on[1]) - ns(on[0]);
        ensure!(gap >= 1_900_000_000, "the second VM powered on {gap} ns after the first: {rv}");
    }
    ensure!(made_networks.len() == 2, "{made_networks:?}");

    // Stopping the tests removes their VMs and networks.
    for test in r["tests"].as_array().context("tests")? {
        let id = test["id"].as_str().context("test id")?;
        let stop = sm.post(&format!("/api/v1/failover-tests/{id}/stop"), json!({"result": "pass"}))?;
        ensure!(wait_task(&site, &stop["task"])?["completion"] == "Success");
        let rec = sm.get(&format!("/api/v1/failover-tests/{id}"))?;
        ensure!(rec["state"] == "Stopped" && rec["recovery_vms"]["phase"] == "removed", "{rec}");
        ensure!(vms_of(&vc, id)?.is_empty(), "test {id}'s VMs are still in vCenter");
    }
    ensure!(network_names(&vc)? == networks_before, "a test network was left behind");

    // A failover: the VMs keep their names, join the failover network
    // re-addressed; a roll back removes them.
    let r = sm.post(&format!("/api/v1/vpgs/{vpg}/failover"), json!({ "checkpoint": c2 }))?;
    ensure!(wait_task(&site, &r["task"])?["completion"] == "Success");
    let id = r["failover"]["id"].as_str().context("failover id")?;
    let in_vc = vms_of(&vc, id)?;
    for (i, name) in names.iter().enumerate() {
        let (_, power, ip, nets, _) = in_vc.iter().find(|x| &x.0 == name).with_context(|| format!("{in_vc:?}"))?;
        ensure!(
            power == "poweredOn" && *ip == format!("10.20.0.{}", 10 + i) && nets == &vec!["VM Network".to_string()],
            "{name}: {in_vc:?}"
        );
    }
    let rb = sm.post(&format!("/api/v1/vpgs/{vpg}/failover/rollback"), json!({}))?;
    ensure!(wait_task(&site, &rb["task"])?["completion"] == "Success");
    sm.wait_until(
        &format!("/api/v1/failover-tests/{id}"),
        Duration::from_secs(60),
        "the roll back's VMs removed",
        |f| f["recovery_vms"]["phase"] == "removed",
    )?;
    ensure!(vms_of(&vc, id)?.is_empty(), "the rolled-back failover's VMs are still in vCenter");

    // A failover network that does not exist: the failover's exports
    // serve, the task fails naming the network, nothing is left in vCenter.
    for vm in vms.iter_mut() {
        vm["failover_network"]["network"] = json!("no-such-network");
    }
    let mut v = sm.get(&format!("/api/v1/vpgs/{vpg}"))?;
    v["settings"]["vms"] = Value::Array(vms);
    sm.call("PUT", &format!("/api/v1/vpgs/{vpg}"), Some(v["settings"].clone()))?;
    let r = sm.post(&format!("/api/v1/vpgs/{vpg}/failover"), json!({ "checkpoint": c2 }))?;
    let t = wait_task(&site, &r["task"])?;
    ensure!(
        t["completion"] == "Failed" && t["exception"].as_str().unwrap_or_default().contains("no-such-network"),
        "{t}"
    );
    let id = r["failover"]["id"].as_str().context("failover id")?;
    ensure!(vms_of(&vc, id)?.is_empty(), "a failed failover left VMs behind");
    let rb = sm.post(&format!("/api/v1/vpgs/{vpg}/failover/rollback"), json!({}))?;
    ensure!(wait_task(&site, &rb["task"])?["completion"] == "Success");
    Ok(())
}
