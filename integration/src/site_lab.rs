//! A site as real processes: `site-manager serve` and `vdsa agent`s that
//! register with it, each started from the lab binary (`lab site-manager
//! …`, `lab vdsa agent …`) so that tests run the daemons of this tree, and
//! an API client. Every process is stopped when dropped.

use crate::process::ChildGuard;
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map_or(0, |a| a.port())
}

/// Appends a child's output to a log file.
fn log_to(path: &Path) -> Result<(Stdio, Stdio)> {
    let f = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
    Ok((Stdio::from(f.try_clone()?), Stdio::from(f)))
}

/// A running site manager and a client of its API.
#[derive(Debug)]
pub struct SiteManagerProcess {
    child: ChildGuard,
    pub dir: PathBuf,
    pub api_port: u16,
    pub management_port: u16,
    pub admin: String,
    client: reqwest::blocking::Client,
}

impl SiteManagerProcess {
    /// Starts on `dir` (`extra`: more `serve` flags); waits until it serves.
    pub fn start(lab: &Path, dir: &Path, extra: &[&str]) -> Result<SiteManagerProcess> {
        SiteManagerProcess::start_on(lab, dir, free_port(), free_port(), extra)
    }

    pub fn start_on(
        lab: &Path,
        dir: &Path,
        api_port: u16,
        management_port: u16,
        extra: &[&str],
    ) -> Result<SiteManagerProcess> {
        std::fs::create_dir_all(dir)?;
        let (_, err) = log_to(&dir.join("site-manager.log"))?;
        let mut child = ChildGuard::spawn(
            Command::new(lab)
                .args(["site-manager", "serve", "--data"])
                .arg(dir.join("data"))
                .args(["--listen", &format!("127.0.0.1:{api_port}")])
                .args(["--management-listen", &format!("127.0.0.1:{management_port}")])
                .args(extra)
                .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
                .stdout(Stdio::piped())
                .stderr(err),
            "site-manager",
        )?;
        let out = child.child_mut().and_then(|c| c.stdout.take()).context("no stdout")?;
        let mut lines = BufReader::new(out).lines();
        loop {
            match lines.next() {
                Some(Ok(l)) if l.starts_with("site manager: API") => break,
                Some(Ok(_)) => {}
                _ => bail!("the site manager exited before serving (see {})", dir.join("site-manager.log").display()),
            }
        }
        std::thread::spawn(move || for _ in lines {});
        let data = dir.join("data");
        let admin = std::fs::read_to_string(data.join("admin-token"))?.trim().to_string();
        let ca = reqwest::Certificate::from_pem(&std::fs::read(data.join("pki/ca.pem"))?)?;
        let client =
            reqwest::blocking::Client::builder().add_root_certificate(ca).timeout(Duration::from_secs(60)).build()?;
        Ok(SiteManagerProcess { child, dir: dir.to_path_buf(), api_port, management_port, admin, client })
    }

    pub fn management_address(&self) -> String {
        format!("127.0.0.1:{}", self.management_port)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// One API call as the admin; a non-2xx answer is an error naming it.
    pub fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value> {
        let (status, v) = self.call_as(method, path, body, Some(&self.admin))?;
        let status = reqwest::StatusCode::from_u16(status)?;
        if !status.is_success() {
            bail!("{method} {path}: {status}: {v}");
        }
        Ok(v)
    }

    pub fn get(&self, path: &str) -> Result<Value> {
        self.call("GET", path, None)
    }

    /// A call with `token` as the bearer (none: no Authorization): the
    /// status and the body, whatever the status.
    pub fn call_as(&self, method: &str, path: &str, body: Option<Value>, token: Option<&str>) -> Result<(u16, Value)> {
        let url = format!("https://127.0.0.1:{}{path}", self.api_port);
        let mut req = self.client.request(reqwest::Method::from_bytes(method.as_bytes())?, &url);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.header("content-type", "application/json").body(b.to_string());
        }
        let resp = req.send().with_context(|| format!("{method} {path}"))?;
        let status = resp.status().as_u16();
        let text = resp.text()?;
        Ok((status, serde_json::from_str(&text).unwrap_or(Value::String(text))))
    }

    /// `GET path` with `token` as the bearer (none: no Authorization):
    /// the status and the body's bytes as they came, whatever the status.
    pub fn get_as(&self, path: &str, token: Option<&str>) -> Result<(u16, Vec<u8>)> {
        let url = format!("https://127.0.0.1:{}{path}", self.api_port);
        let mut req = self.client.get(&url);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().with_context(|| format!("GET {path}"))?;
        Ok((resp.status().as_u16(), resp.bytes()?.to_vec()))
    }

    pub fn get_bytes(&self, path: &str) -> Result<Vec<u8>> {
        let url = format!("https://127.0.0.1:{}{path}", self.api_port);
        let resp = self.client.get(&url).bearer_auth(&self.admin).send().with_context(|| format!("GET {path}"))?;
        if !resp.status().is_success() {
            bail!("GET {path}: {}", resp.status());
        }
        Ok(resp.bytes()?.to_vec())
    }

    pub fn post(&self, path: &str, body: Value) -> Result<Value> {
        self.call("POST", path, Some(body))
    }

    /// Adds a KVM host and returns its id and a registration token.
    pub fn add_host(&self, name: &str) -> Result<(String, String)> {
        self.add_host_on(name, "kvm")
    }

    /// Adds a host of `hypervisor` (`kvm`, `vsphere`) and returns its id
    /// and a registration token.
    pub fn add_host_on(&self, name: &str, hypervisor: &str) -> Result<(String, String)> {
        let h = self.post("/api/v1/hosts", json!({"name": name, "hypervisor": hypervisor}))?;
        let id = h["id"].as_str().context("host id")?.to_string();
        let t = self.call("POST", &format!("/api/v1/hosts/{id}/registration-token"), None)?;
        Ok((id, t["token"].as_str().context("token")?.to_string()))
    }

    /// `POST /api/v1/vpgs`; a cross-site VPG is retried (up to 30 s) while
    /// this site has not yet learnt the paired site's hosts from an
    /// exchange.
    pub fn create_vpg(&self, settings: &Value) -> Result<Value> {
        let start = Instant::now();
        loop {
            match self.post("/api/v1/vpgs", settings.clone()) {
                Ok(v) => return Ok(v),
                Err(e) if format!("{e:#}").contains("not known yet") && start.elapsed() < Duration::from_secs(30) => {
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Waits until `done` holds for `GET path`.
    pub fn wait_until(
        &self,
        path: &str,
        timeout: Duration,
        what: &str,
        done: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        let start = Instant::now();
        loop {
            let v = self.get(path)?;
            if done(&v) {
                return Ok(v);
            }
            if start.elapsed() > timeout {
                bail!("timed out after {timeout:?} waiting for {what}: {v}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGTERM, and wait for the clean exit.
    pub fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            // SAFETY: kill(2) on our own child, not reaped yet.
            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
            let _ = self.child.wait();
        }
    }

    pub fn kill(mut self) {
        self.child.kill();
    }
}

/// A running `vdsa agent`.
#[derive(Debug)]
pub struct AgentProcess {
    child: ChildGuard,
    pub dir: PathBuf,
    pub tap_sock: PathBuf,
    pub replication_port: u16,
}

impl AgentProcess {
    /// Starts an agent in `dir` that registers with `token` (ignored once
    /// registered).
    pub fn start(lab: &Path, dir: &Path, name: &str, site_manager: &str, token: &str) -> Result<AgentProcess> {
        AgentProcess::start_on(lab, dir, name, site_manager, token, free_port(), &[])
    }

    pub fn start_on(
        lab: &Path,
        dir: &Path,
        name: &str,
        site_manager: &str,
        token: &str,
        replication_port: u16,
        extra: &[&str],
    ) -> Result<AgentProcess> {
        std::fs::create_dir_all(dir)?;
        let tap_sock = dir.join("tap.sock");
        let (out, err) = log_to(&dir.join("vdsa.log"))?;
        let child = ChildGuard::spawn(
            Command::new(lab)
                .args(["vdsa", "agent", "--name", name, "--data"])
                .arg(dir.join("data"))
                .args(["--site-manager", site_manager, "--registration-token", token])
                .args(["--replication-listen", &format!("127.0.0.1:{replication_port}")])
                .arg("--tap-listen")
                .arg(format!("unix:{}", tap_sock.display()))
                .args(extra)
                .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
                .stdout(out)
                .stderr(err),
            "vdsa agent",
        )?;
        Ok(AgentProcess { child, dir: dir.to_path_buf(), tap_sock, replication_port })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// The journal folder of a VPG at this (recovery) VDSA.
    pub fn journal(&self, vpg: &str) -> PathBuf {
        self.dir.join("data/journals").join(vpg).join("journal")
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.dir.join("vdsa.log")).unwrap_or_default()
    }

    pub fn is_running(&mut self) -> bool {
        self.child.is_running()
    }

    /// SIGTERM: a clean stop (queues drained, journals synced).
    pub fn stop(&mut self) {
        if let Some(pid) = self.child.id() {
            // SAFETY: kill(2) on our own child, not reaped yet.
            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
            let _ = self.child.wait();
        }
    }

    pub fn kill(&mut self) {
        self.child.kill();
    }
}

/// What [`ProtectedSite::start`] builds.
#[derive(Debug, Clone)]
pub struct SiteSpec {
    /// Protected hosts, one VM with one disk each; one recovery host more.
    pub hosts: usize,
    pub disk_bytes: u64,
    /// More `serve` flags for the site manager.
    pub site_manager_args: Vec<String>,
    /// More `vdsa agent` flags for protected host `i`.
    pub vdsa_args: Vec<(usize, Vec<String>)>,
    pub checkpoint_interval_ms: u64,
    /// A quiesce hook for every VM (empty: none).
    pub quiesce_hook: Vec<String>,
    /// A template every VM's disk starts as (a bootable image, say); its
    /// size replaces `disk_bytes`.
    pub disk_image: Option<PathBuf>,
    /// The recovery host is this vSphere host (a vcsim host's name) rather
    /// than a KVM one: its tests' VMs are made in vCenter.
    pub recovery_vsphere_host: Option<String>,
    /// The recovery VDSA is reached through a fault proxy (it advertises
    /// the proxy's address), so that the link can be cut and stalled.
    pub recovery_link_proxy: bool,
}

impl SiteSpec {
    /// One protected VM with an 8 MiB disk, checkpoints every second.
    pub fn one_vm() -> SiteSpec {
        SiteSpec {
            hosts: 1,
            disk_bytes: 8 << 20,
            site_manager_args: Vec::new(),
            vdsa_args: Vec::new(),
            checkpoint_interval_ms: 1000,
            quiesce_hook: Vec::new(),
            disk_image: None,
            recovery_vsphere_host: None,
            recovery_link_proxy: false,
        }
    }
}

/// A site manager, `hosts` protected hosts (each a qemu-storage-daemon
/// VM whose disk its `vdsa agent` taps) and one recovery host, with one
/// VPG over all the VMs, protecting.
#[derive(Debug)]
pub struct ProtectedSite {
    pub site_manager: Option<SiteManagerProcess>,
    pub site_manager_dir: PathBuf,
    pub api_port: u16,
    pub management_port: u16,
    /// Protected hosts first, the recovery host last.
    pub agents: Vec<AgentProcess>,
    /// (name, registration token, replication port) per agent.
    pub agent_names: Vec<(String, String, u16)>,
    pub host_ids: Vec<String>,
    pub vms: Vec<crate::kvm_lab::StorageDaemon>,
    pub disks: Vec<protection_groups::DiskId>,
    /// Each VM's disk size.
    pub disk_bytes: Vec<u64>,
    pub vpg: String,
    /// The link to the recovery VDSA, when the spec asked for a proxy.
    pub recovery_link: Option<crate::replication_lab::FaultProxy>,
}

impl ProtectedSite {
    pub fn start(lab: &Path, dir: &Path, spec: &SiteSpec, mut say: impl FnMut(String)) -> Result<ProtectedSite> {
        let mut site = ProtectedSite::start_unprotected(lab, dir, spec, &mut say)?;
        site.protect(spec)?;
        say("the VPG protects: every tap is in sync".into());
        Ok(site)
    }

    /// The VMs of one VPG, as `protect` defines it: one per protected host,
    /// recovering to the recovery host.
    pub fn vm_specs(&self, spec: &SiteSpec) -> Vec<serde_json::Value> {
        let recovery = self.host_ids.len() - 1;
        self.vms
            .iter()
            .enumerate()
            .map(|(i, qsd)| {
                let mut vm = json!({
                    "id": uuid::Uuid::new_v4(),
                    "name": format!("vm-{i}"),
                    "host": self.host_ids[i],
                    "hypervisor_ref": qsd.vdsa_qmp_sock,
                    "disks": [{"id": self.disks[i].0, "name": format!("vm-{i}-disk"), "size_bytes": self.disk_bytes[i], "device": "src"}],
                    "recovery_host": self.host_ids[recovery],
                });
                if !spec.quiesce_hook.is_empty() {
                    vm["quiesce"] = json!({"hook": spec.quiesce_hook});
                }
                vm
            })
            .collect()
    }

    /// Defines the VPG over every VM and waits until it protects.
    pub fn protect(&mut self, spec: &SiteSpec) -> Result<()> {
        let sm = self.sm()?;
        let site = sm.get("/api/v1/site")?["id"].as_str().context("site id")?.to_string();
        let created = sm.post(
            "/api/v1/vpgs",
            json!({"name": "vpg-1", "recovery_site": site, "vms": self.vm_specs(spec),
                   "checkpoint_interval_ms": spec.checkpoint_interval_ms}),
        )?;
        let vpg = created["vpg"]["id"].as_str().context("vpg id")?.to_string();
        let task = created["task"]["id"].as_str().context("task id")?.to_string();
        let t = sm.get(&format!("/api/v1/tasks/{task}/wait?timeout_ms=300000"))?;
        if t["completion"] != "Success" {
            bail!("the VPG did not reach Protecting: {t}");
        }
        self.vpg = vpg;
        Ok(())
    }

    /// The site manager, every host with its registered VDSA and every VM
    /// running, but no VPG yet (`vpg` is empty).
    pub fn start_unprotected(
        lab: &Path,
        dir: &Path,
        spec: &SiteSpec,
        mut say: impl FnMut(String),
    ) -> Result<ProtectedSite> {
        let site_manager_dir = dir.join("site-manager");
        let (api_port, management_port) = (free_port(), free_port());
        let args: Vec<&str> = spec.site_manager_args.iter().map(String::as_str).collect();
        let sm = SiteManagerProcess::start_on(lab, &site_manager_dir, api_port, management_port, &args)?;
        let (mut agents, mut host_ids, mut agent_names) = (Vec::new(), Vec::new(), Vec::new());
        let mut recovery_link = None;
        for i in 0..=spec.hosts {
            let (name, hypervisor) = match (i < spec.hosts, &spec.recovery_vsphere_host) {
                (true, _) => (format!("kvm-{i}"), "kvm"),
                (false, None) => ("recovery-0".to_string(), "kvm"),
                (false, Some(h)) => (h.clone(), "vsphere"),
            };
            let (id, token) = sm.add_host_on(&name, hypervisor)?;
            let mut extra: Vec<String> =
                spec.vdsa_args.iter().filter(|(h, _)| *h == i).flat_map(|(_, a)| a.iter().cloned()).collect();
            let port = free_port();
            if i == spec.hosts && spec.recovery_link_proxy {
                let proxy = crate::replication_lab::FaultProxy::start(port)?;
                extra.extend(["--replication-address".to_string(), proxy.addr()]);
                recovery_link = Some(proxy);
            }
            let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
            agents.push(AgentProcess::start_on(
                lab,
                &dir.join(&name),
                &name,
                &sm.management_address(),
                &token,
                port,
                &extra,
            )?);
            host_ids.push(id);
            agent_names.push((name, token, port));
        }
        let n = spec.hosts + 1;
        sm.wait_until("/api/v1/hosts", Duration::from_secs(120), "every VDSA to register", |v| {
            v.as_array().is_some_and(|hs| hs.len() == n && hs.iter().all(|h| h["vdsa"] == "installed"))
        })?;
        say(format!("{n} VDSAs registered"));
        let (mut vms, mut disks, mut disk_bytes) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..spec.hosts {
            let d = dir.join(format!("vm-{i}"));
            std::fs::create_dir_all(&d)?;
            let image = d.join("disk.raw");
            let bytes = match &spec.disk_image {
                Some(template) => std::fs::copy(template, &image)
                    .with_context(|| format!("copying {} to {}", template.display(), image.display()))?,
                None => {
                    std::fs::File::create(&image)?.set_len(spec.disk_bytes)?;
                    spec.disk_bytes
                }
            };
            vms.push(crate::kvm_lab::StorageDaemon::start(&d, &image, false)?);
            disks.push(protection_groups::DiskId::new());
            disk_bytes.push(bytes);
        }
        Ok(ProtectedSite {
            site_manager: Some(sm),
            site_manager_dir,
            api_port,
            management_port,
            agents,
            agent_names,
            host_ids,
            vms,
            disks,
            disk_bytes,
            vpg: String::new(),
            recovery_link,
        })
    }

    pub fn sm(&self) -> Result<&SiteManagerProcess> {
        self.site_manager.as_ref().context("the site manager is not running")
    }

    /// Starts the site manager again on its folder and ports and waits for
    /// every VDSA to dial back in.
    pub fn restart_site_manager(&mut self, lab: &Path, args: &[&str]) -> Result<()> {
        if let Some(old) = self.site_manager.take() {
            old.kill();
        }
        let sm = SiteManagerProcess::start_on(lab, &self.site_manager_dir, self.api_port, self.management_port, args)?;
        sm.wait_until("/api/v1/hosts", Duration::from_secs(60), "the VDSAs to dial back in", |v| {
            v.as_array().is_some_and(|hs| hs.iter().all(|h| h["vdsa"] == "installed"))
        })?;
        self.site_manager = Some(sm);
        Ok(())
    }

    /// Stops every VDSA (queues drained, journals synced) and hashes disk
    /// `i` of the VPG as the recovery journal holds it at `checkpoint`.
    pub fn recovered_hash(&mut self, checkpoint: u64, i: usize, size: u64) -> Result<blake3::Hash> {
        for a in self.agents.iter_mut() {
            a.stop();
        }
        let recovery = self.agents.last().context("no recovery VDSA")?;
        let journal =
            vdsa::journal::Journal::open(recovery.journal(&self.vpg), vdsa::journal::JournalConfig::default())?;
        let view = journal.open_view(protection_groups::CheckpointId(checkpoint))?;
        let mut bytes = vec![0u8; usize::try_from(size)?];
        view.read(*self.disks.get(i).context("no such disk")?, 0, &mut bytes)?;
        Ok(blake3::hash(&bytes))
    }

    /// Starts agent `i` again (it is registered already) with the flags
    /// `extra`: a caller that injected a fault at the first start leaves
    /// it out, so that it strikes once.
    pub fn restart_agent(&mut self, lab: &Path, dir: &Path, i: usize, extra: &[&str]) -> Result<()> {
        let (name, token, port) = self.agent_names[i].clone();
        let addr = format!("127.0.0.1:{}", self.management_port);
        self.agents[i].kill();
        self.agents[i] = AgentProcess::start_on(lab, &dir.join(&name), &name, &addr, &token, port, extra)?;
        Ok(())
    }
}
