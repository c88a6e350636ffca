//! Starts `site-manager serve` in a folder and talks to its API.

use reqwest::blocking::{Client, Response};
use reqwest::Method;
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running daemon; killed when dropped.
pub struct Daemon {
    child: Option<Child>,
    pub port: u16,
    pub admin: String,
    client: Client,
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).unwrap_or(0)
}

impl Daemon {
    /// Starts on `dir` with a fresh pair of ports, or `port` again.
    pub fn start(dir: &Path, port: Option<u16>) -> Daemon {
        let port = port.unwrap_or_else(free_port);
        let mgmt = free_port();
        let mut child = Command::new(env!("CARGO_BIN_EXE_site-manager"))
            .args(["serve", "--data"])
            .arg(dir)
            .args(["--listen", &format!("127.0.0.1:{port}"), "--management-listen", &format!("127.0.0.1:{mgmt}")])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("starting site-manager: {e}"));
        let stdout = child.stdout.take().unwrap_or_else(|| panic!("no stdout"));
        let mut lines = BufReader::new(stdout).lines();
        let mut daemon = Daemon { child: Some(child), port, admin: String::new(), client: Client::new() };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            assert!(Instant::now() < deadline, "the site manager did not start");
            match lines.next() {
                Some(Ok(l)) if l.starts_with("site manager: API") => break,
                Some(Ok(_)) => {}
                _ => panic!("the site manager exited before serving"),
            }
        }
        std::thread::spawn(move || for _ in lines {});
        daemon.admin = std::fs::read_to_string(dir.join("admin-token")).unwrap_or_default().trim().to_string();
        let ca = std::fs::read(dir.join("pki/ca.pem")).unwrap_or_else(|e| panic!("ca.pem: {e}"));
        let ca = reqwest::Certificate::from_pem(&ca).unwrap_or_else(|e| panic!("{e}"));
        daemon.client = Client::builder()
            .add_root_certificate(ca)
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap_or_else(|e| panic!("{e}"));
        daemon
    }

    pub fn url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}{path}", self.port)
    }

    /// `GET path` without a token: status, headers and body as text.
    pub fn get_raw(&self, path: &str) -> (u16, reqwest::header::HeaderMap, String) {
        let resp = self.client.get(self.url(path)).send().unwrap_or_else(|e| panic!("{path}: {e}"));
        let (status, headers) = (resp.status().as_u16(), resp.headers().clone());
        (status, headers, resp.text().unwrap_or_default())
    }

    /// Sends a request with `token` (None: no Authorization header) and a
    /// raw JSON body.
    pub fn send(&self, method: Method, path: &str, token: Option<&str>, body: Option<&str>) -> (u16, Value) {
        let mut r = self.client.request(method, self.url(path));
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        if let Some(b) = body {
            r = r.header("content-type", "application/json").body(b.to_string());
        }
        let resp: Response = r.send().unwrap_or_else(|e| panic!("{path}: {e}"));
        let status = resp.status().as_u16();
        let text = resp.text().unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    /// As the admin; panics unless the status is 2xx.
    pub fn ok(&self, method: Method, path: &str, body: Option<&str>) -> Value {
        let (status, v) = self.send(method, path, Some(&self.admin.clone()), body);
        assert!((200..300).contains(&status), "{path}: {status} {v}");
        v
    }

    pub fn sigkill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on our own child's pid, not yet reaped.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let _ = c.wait();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.sigkill();
    }
}
