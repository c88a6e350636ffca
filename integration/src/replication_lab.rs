//! Real processes for replication tests and benchmarks: a source and a
//! target `vdsa` daemon with site certificates, and a fault proxy on the
//! link between them. Each process is stopped when dropped.

use crate::process::ChildGuard;
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A daemon started as `lab vdsa ARGS`, answering on a control socket.
/// Its log (stderr) goes to a file tests can search.
#[derive(Debug)]
pub struct Daemon {
    child: ChildGuard,
    pub control: PathBuf,
    pub log: PathBuf,
}

impl Daemon {
    /// Starts it and waits for READY.
    pub fn start(lab: &Path, args: &[String], control: &Path, log: &Path) -> Result<Daemon> {
        let logf = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
        let mut child = ChildGuard::spawn(
            Command::new(lab).arg("vdsa").args(args).env("RUST_LOG", "info").stdout(Stdio::piped()).stderr(logf),
            "a vdsa daemon",
        )?;
        // From here on, an error drops `child`, which stops the daemon.
        let out = child.child_mut().and_then(|c| c.stdout.take()).context("vdsa stdout")?;
        let mut line = String::new();
        BufReader::new(out).read_line(&mut line)?;
        if line.trim() != "READY" {
            child.kill();
            let log = std::fs::read_to_string(log).unwrap_or_default();
            bail!("vdsa {} did not start (said {line:?}); log:\n{log}", args.first().map_or("", |s| s.as_str()));
        }
        Ok(Daemon { child, control: control.to_path_buf(), log: log.to_path_buf() })
    }

    /// One control request; an `"ok": false` answer is an error.
    pub fn call(&self, req: Value) -> Result<Value> {
        let mut s = UnixStream::connect(&self.control).context("control socket")?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        writeln!(s, "{req}")?;
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line)?;
        let v: Value = serde_json::from_str(&line).with_context(|| format!("control answer {line:?}"))?;
        if v["ok"] != json!(true) {
            bail!("control {req} failed: {v}");
        }
        Ok(v)
    }

    /// Stops it cleanly (the daemon makes its state durable first).
    pub fn shutdown(mut self) -> Result<()> {
        self.call(json!({"op": "shutdown"}))?;
        self.child.wait()?;
        Ok(())
    }

    /// SIGKILL.
    pub fn kill(mut self) {
        self.child.kill();
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Runs `lab vdsa ARGS` to completion.
pub fn run_vdsa(lab: &Path, args: &[&str]) -> Result<()> {
    let out = Command::new(lab).arg("vdsa").args(args).output()?;
    if !out.status.success() {
        bail!("vdsa {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// Certificates for two paired sites: `<dir>/<a>` and `<dir>/<b>`, each
/// trusting the other's CA.
pub fn paired_sites(lab: &Path, dir: &Path, a: &str, b: &str) -> Result<(PathBuf, PathBuf)> {
    let (da, db) = (dir.join(a), dir.join(b));
    for (site, d) in [(a, &da), (b, &db)] {
        run_vdsa(lab, &["certs", "create", "--site", site, "--dir", &d.display().to_string()])?;
    }
    for (d, peer, peer_dir) in [(&da, b, &db), (&db, a, &da)] {
        let ca = peer_dir.join("ca.pem").display().to_string();
        run_vdsa(lab, &["certs", "trust", "--dir", &d.display().to_string(), "--peer-site", peer, "--ca", &ca])?;
    }
    Ok((da, db))
}

/// A loopback port free right now.
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Where a target daemon lives.
#[derive(Debug, Clone)]
pub struct TargetSpec {
    pub port: u16,
    pub root: PathBuf,
    pub certs: PathBuf,
    pub control: PathBuf,
    pub log: PathBuf,
    pub heartbeat_ms: u64,
}

impl TargetSpec {
    pub fn new(dir: &Path, certs: &Path, heartbeat_ms: u64) -> Result<TargetSpec> {
        Ok(TargetSpec {
            port: free_port()?,
            root: dir.join("target"),
            certs: certs.to_path_buf(),
            control: dir.join("target.ctl"),
            log: dir.join("target.log"),
            heartbeat_ms,
        })
    }

    pub fn start(&self, lab: &Path) -> Result<Daemon> {
        let args: Vec<String> = vec![
            "target".into(),
            "--listen".into(),
            format!("127.0.0.1:{}", self.port),
            "--root".into(),
            self.root.display().to_string(),
            "--certs".into(),
            self.certs.display().to_string(),
            "--control".into(),
            self.control.display().to_string(),
            "--heartbeat-ms".into(),
            self.heartbeat_ms.to_string(),
        ];
        Daemon::start(lab, &args, &self.control, &self.log)
    }

    /// The journal folder of VPG `name` (named as the daemon derives ids).
    pub fn journal_dir(&self, vpg: &str) -> PathBuf {
        let id = uuid::Uuid::from_bytes(vdsa::daemon::derived_id("vpg", vpg));
        self.root.join(id.to_string()).join("journal")
    }
}

/// Where a source daemon lives and what it protects.
#[derive(Debug, Clone)]
pub struct SourceSpec {
    pub site: String,
    pub vpg: String,
    pub epoch: u64,
    pub target: String,
    pub certs: PathBuf,
    /// NBD tap socket (unix).
    pub tap_sock: PathBuf,
    pub control: PathBuf,
    pub log: PathBuf,
    pub spill: PathBuf,
    pub disks: Vec<(String, u64)>,
    pub extra: Vec<String>,
}

impl SourceSpec {
    pub fn new(dir: &Path, certs: &Path, target: &str, vpg: &str, disks: &[(String, u64)]) -> SourceSpec {
        SourceSpec {
            site: "prod".into(),
            vpg: vpg.into(),
            epoch: 1,
            target: target.into(),
            certs: certs.to_path_buf(),
            tap_sock: dir.join("src-tap.sock"),
            control: dir.join("source.ctl"),
            log: dir.join("source.log"),
            spill: dir.join("source.spill"),
            disks: disks.to_vec(),
            extra: Vec::new(),
        }
    }

    pub fn start(&self, lab: &Path) -> Result<Daemon> {
        let mut args: Vec<String> = vec![
            "source".into(),
            "--site".into(),
            self.site.clone(),
            "--vpg".into(),
            self.vpg.clone(),
            "--epoch".into(),
            self.epoch.to_string(),
            "--target".into(),
            self.target.clone(),
            "--certs".into(),
            self.certs.display().to_string(),
            "--listen".into(),
            format!("unix:{}", self.tap_sock.display()),
            "--listen".into(),
            format!("native-unix:{}.native", self.tap_sock.display()),
            "--control".into(),
            self.control.display().to_string(),
            "--spill".into(),
            self.spill.display().to_string(),
        ];
        for (name, size) in &self.disks {
            args.push("--disk".into());
            args.push(format!("{name}={size}"));
        }
        args.extend(self.extra.iter().cloned());
        Daemon::start(lab, &args, &self.control, &self.log)
    }

    pub fn native_sock(&self) -> PathBuf {
        PathBuf::from(format!("{}.native", self.tap_sock.display()))
    }
}

/// Waits until `f` holds, polling; fails after `timeout` naming `what`.
pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> Result<bool>) -> Result<()> {
    let start = Instant::now();
    loop {
        if f()? {
            return Ok(());
        }
        if start.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[derive(Debug, Default)]
struct ProxyState {
    stalled: AtomicBool,
    delay_us: AtomicU64,
    /// Bytes per second each direction; 0 is no limit.
    rate: AtomicU64,
    conns: Mutex<Vec<TcpStream>>,
    forwarded: AtomicU64,
}

/// A TCP proxy on a link that cuts, stalls, delays and throttles it on
/// command: the WAN between two sites.
#[derive(Debug)]
pub struct FaultProxy {
    pub port: u16,
    state: Arc<ProxyState>,
}

impl FaultProxy {
    pub fn start(upstream: u16) -> Result<FaultProxy> {
        let l = TcpListener::bind("127.0.0.1:0")?;
        let port = l.local_addr()?.port();
        let state = Arc::new(ProxyState::default());
        let st = state.clone();
        std::thread::spawn(move || {
            for c in l.incoming().flatten() {
                let Ok(up) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    let _ = c.shutdown(Shutdown::Both);
                    continue;
                };
                let _ = (c.set_nodelay(true), up.set_nodelay(true));
                if let Ok(mut conns) = st.conns.lock() {
                    conns.extend([c.try_clone(), up.try_clone()].into_iter().flatten());
                }
                for (from, to) in [(c.try_clone(), up.try_clone()), (up.try_clone(), c.try_clone())] {
                    if let (Ok(from), Ok(to)) = (from, to) {
                        let st = st.clone();
                        std::thread::spawn(move || pump(from, to, &st));
                    }
                }
            }
        });
        Ok(FaultProxy { port, state })
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Cuts every connection now (new ones are accepted).
    pub fn cut(&self) {
        if let Ok(mut conns) = self.state.conns.lock() {
            for c in conns.drain(..) {
                let _ = c.shutdown(Shutdown::Both);
            }
        }
    }

    /// Holds every byte (both ways) until unstalled: a link that is up but
    /// says nothing.
    pub fn stall(&self, on: bool) {
        self.state.stalled.store(on, Ordering::SeqCst);
    }

    pub fn delay(&self, d: Duration) {
        self.state.delay_us.store(d.as_micros() as u64, Ordering::SeqCst);
    }

    pub fn limit(&self, bytes_per_sec: u64) {
        self.state.rate.store(bytes_per_sec, Ordering::SeqCst);
    }

    /// Bytes forwarded so far, both ways.
    pub fn forwarded(&self) -> u64 {
        self.state.forwarded.load(Ordering::Relaxed)
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream, st: &ProxyState) {
    let mut buf = vec![0u8; 64 << 10];
    let start = Instant::now();
    let mut sent = 0u64;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let delay = st.delay_us.load(Ordering::SeqCst);
        if delay > 0 {
            std::thread::sleep(Duration::from_micros(delay));
        }
        while st.stalled.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(10));
        }
        let rate = st.rate.load(Ordering::SeqCst);
        sent += n as u64;
        if rate > 0 {
            let due = Duration::from_secs_f64(sent as f64 / rate as f64);
            if let Some(w) = due.checked_sub(start.elapsed()) {
                std::thread::sleep(w);
            }
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
        st.forwarded.fetch_add(n as u64, Ordering::Relaxed);
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}
