//! The vCenter simulator as a real process: the Go program in
//! `integration/vcsim/`, built against Debian's govmomi package
//! (golang-github-vmware-govmomi-dev) and started on a loopback port with a
//! chosen inventory. Stopped (SIGTERM, so it removes its datastore folders)
//! when dropped.

use crate::process::ChildGuard;
use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use crate::replication_lab::free_port;

/// The inventory and server settings of one simulator.
#[derive(Debug, Clone)]
pub struct VcsimOptions {
    pub datacenters: u32,
    pub clusters: u32,
    pub hosts_per_cluster: u32,
    pub standalone_hosts: u32,
    pub datastores: u32,
    /// VMs per resource pool.
    pub vms: u32,
    pub dv_portgroups: u32,
    /// Milliseconds every SOAP call waits before it is served.
    pub delay_ms: u32,
    pub tls: bool,
    /// Only this user and password are accepted.
    pub user: Option<(String, String)>,
    /// Serve this certificate and key (PEM files); by default one signed by
    /// a fresh lab CA ([`Vcsim::ca_pem`]). (govmomi's built-in certificate
    /// has a 1024-bit RSA key, which rustls rightly refuses.)
    pub cert: Option<(PathBuf, PathBuf)>,
}

impl Default for VcsimOptions {
    fn default() -> Self {
        VcsimOptions {
            datacenters: 1,
            clusters: 2,
            hosts_per_cluster: 2,
            standalone_hosts: 0,
            datastores: 1,
            vms: 1,
            dv_portgroups: 0,
            delay_ms: 0,
            tls: true,
            user: Some(("administrator@vsphere.local".into(), "lab-password".into())),
            cert: None,
        }
    }
}

/// A running simulator.
#[derive(Debug)]
pub struct Vcsim {
    child: Option<Child>,
    /// `https://127.0.0.1:PORT/sdk`
    pub url: String,
    /// The server's certificate (PEM), when it serves TLS.
    pub cert_pem: Option<PathBuf>,
    /// The CA that signed it, when the harness made the certificate.
    pub ca_pem: Option<PathBuf>,
    _dir: tempfile::TempDir,
}

static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();

/// Builds the simulator once per process (and only when its source is newer
/// than the binary) and returns the binary.
pub fn vcsim_binary() -> Result<PathBuf> {
    BUILT.get_or_init(|| build().map_err(|e| format!("{e:#}"))).clone().map_err(|e| anyhow::anyhow!(e))
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default()
}

fn build() -> Result<PathBuf> {
    let root = repo_root();
    let src = root.join("integration/vcsim");
    let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root.join("target"));
    let out_dir = target.join("vcsim");
    let out = out_dir.join("vcsim");
    let newest_src = std::fs::read_dir(&src)?
        .filter_map(|e| e.ok()?.metadata().ok()?.modified().ok())
        .max()
        .context("the vcsim source folder is empty")?;
    if let Ok(m) = std::fs::metadata(&out).and_then(|m| m.modified()) {
        if m >= newest_src {
            return Ok(out);
        }
    }
    std::fs::create_dir_all(&out_dir)?;
    if !Path::new("/usr/share/gocode/src/github.com/vmware/govmomi").is_dir() {
        bail!("govmomi's source is not installed: apt-get install golang-go golang-github-vmware-govmomi-dev");
    }
    // Built under a temporary name and renamed, so a concurrent build in
    // another test binary never runs a half-written file.
    let tmp = out_dir.join(format!("vcsim.{}", std::process::id()));
    let status = Command::new("go")
        .args(["build", "-o"])
        .arg(&tmp)
        .arg(".")
        .current_dir(&src)
        .env("GOPATH", "/usr/share/gocode")
        .env("GO111MODULE", "off")
        // Its own build cache: CI may run without a HOME for Go's default.
        .env("GOCACHE", out_dir.join("gocache"))
        .env_remove("GOFLAGS")
        .status()
        .context("running go build (is golang-go installed?)")?;
    if !status.success() {
        bail!("go build of integration/vcsim failed ({status})");
    }
    std::fs::rename(&tmp, &out)?;
    Ok(out)
}

/// A lab CA and a server certificate for 127.0.0.1 signed by it, as PEM
/// files: (CA, certificate, key). They are made as the VDSAs make their
/// site certificates.
fn lab_certificate(dir: &Path) -> Result<(PathBuf, PathBuf, PathBuf)> {
    let certs = dir.join("certs");
    vdsa::wire::tls::create_site_certificates(&certs, "vcsim-lab")?;
    Ok((certs.join("ca.pem"), certs.join("node.pem"), certs.join("node.key")))
}

impl Vcsim {
    pub fn start(opts: &VcsimOptions) -> Result<Vcsim> {
        let bin = vcsim_binary()?;
        let dir = tempfile::tempdir()?;
        let cert_pem = opts.tls.then(|| dir.path().join("server.pem"));
        let mut ca_pem = None;
        let mut cert = opts.cert.clone();
        if opts.tls && cert.is_none() {
            let (ca, c, k) = lab_certificate(dir.path())?;
            ca_pem = Some(ca);
            cert = Some((c, k));
        }
        // A port taken between our probe and the bind makes vcsim panic;
        // retry a few times.
        let mut last = String::new();
        for _ in 0..5 {
            let port = free_port()?;
            let mut cmd = Command::new(&bin);
            cmd.arg(format!("-listen=127.0.0.1:{port}"))
                .arg(format!("-tls={}", opts.tls))
                .arg(format!("-dc={}", opts.datacenters))
                .arg(format!("-cluster={}", opts.clusters))
                .arg(format!("-host={}", opts.hosts_per_cluster))
                .arg(format!("-standalone-host={}", opts.standalone_hosts))
                .arg(format!("-ds={}", opts.datastores))
                .arg(format!("-vm={}", opts.vms))
                .arg(format!("-pg={}", opts.dv_portgroups))
                .arg(format!("-delay={}", opts.delay_ms));
            if let Some(p) = &cert_pem {
                cmd.arg("-cert-out").arg(p);
            }
            if let Some((u, p)) = &opts.user {
                cmd.arg(format!("-user={u}:{p}"));
            }
            if let Some((c, k)) = &cert {
                cmd.arg("-cert").arg(c).arg("-key").arg(k);
            }
            let log = dir.path().join("vcsim.log");
            // Owned by a guard until it answered: an error on the way
            // stops it.
            let mut child =
                ChildGuard::spawn(cmd.stdout(Stdio::piped()).stderr(std::fs::File::create(&log)?), "vcsim")?;
            let out = child.child_mut().and_then(|c| c.stdout.take()).context("vcsim stdout")?;
            let mut line = String::new();
            BufReader::new(out).read_line(&mut line)?;
            if let Some(url) = line.trim().strip_prefix("VCSIM_URL ") {
                return Ok(Vcsim { child: child.release(), url: url.to_string(), cert_pem, ca_pem, _dir: dir });
            }
            child.kill();
            last = std::fs::read_to_string(&log).unwrap_or_default();
        }
        bail!("vcsim did not start; its log:\n{last}")
    }

    /// SIGSTOP: the server stops answering while its connections stay
    /// open (a frozen vCenter). [`Vcsim::thaw`] resumes it.
    pub fn freeze(&self) {
        if let Some(c) = &self.child {
            // SAFETY: kill(2) on our own child's pid has no memory effects.
            unsafe { libc::kill(c.id() as i32, libc::SIGSTOP) };
        }
    }

    pub fn thaw(&self) {
        if let Some(c) = &self.child {
            // SAFETY: as in freeze.
            unsafe { libc::kill(c.id() as i32, libc::SIGCONT) };
        }
    }

    /// SIGKILL: the server vanishes mid-session (a dropped connection).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Vcsim {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SIGTERM lets it remove its datastore folders (a frozen one is
            // resumed first, or it would not act on it).
            // SAFETY: kill(2) on our own child's pid has no memory effects.
            unsafe { libc::kill(c.id() as i32, libc::SIGCONT) };
            // SAFETY: as above.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            for _ in 0..50 {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
