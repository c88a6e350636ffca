//! Where taps connect: each `--listen` address (NBD or the native tap
//! protocol, over a unix or TCP socket), its unix path claimed for this
//! process, and its connections served on the connection runtime.

use super::control::{claim_path, PathClaim};
use crate::conn_limit::{ConnectionLimit, MAX_TAP_CONNECTIONS};
use crate::nbd::export::{BlockExport, ExportError, Exports};
use crate::serving::{accept_each, Listener, Pool, Protocol};
use crate::tap::TapDisk;
use anyhow::{bail, Context, Result};
use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::Arc;

/// One `--listen` address of a tap.
#[derive(Debug, Clone)]
pub(crate) struct TapListener {
    pub(crate) native: bool,
    pub(crate) endpoint: Endpoint,
}

#[derive(Debug, Clone)]
pub(crate) enum Endpoint {
    Unix(PathBuf),
    Tcp(String),
}

impl TapListener {
    pub(crate) fn parse_all(specs: &[String]) -> Result<Vec<TapListener>> {
        specs
            .iter()
            .map(|spec| {
                let (native, rest) = match spec.strip_prefix("native-") {
                    Some(rest) => (true, rest),
                    None => (false, spec.as_str()),
                };
                let endpoint = if let Some(path) = rest.strip_prefix("unix:") {
                    Endpoint::Unix(PathBuf::from(path))
                } else if let Some(addr) = rest.strip_prefix("tcp:") {
                    Endpoint::Tcp(addr.to_string())
                } else {
                    bail!("--listen {spec:?}: expected [native-]unix:PATH or [native-]tcp:HOST:PORT");
                };
                Ok(TapListener { native, endpoint })
            })
            .collect()
    }

    /// The `--listen` form of this address.
    pub(crate) fn spec(&self) -> String {
        let native = if self.native { "native-" } else { "" };
        match &self.endpoint {
            Endpoint::Unix(p) => format!("{native}unix:{}", p.display()),
            Endpoint::Tcp(a) => format!("{native}tcp:{a}"),
        }
    }
}

/// The longest path a unix socket address holds (`sun_path`, with its NUL).
const UNIX_PATH_MAX: usize = 107;

/// Adds, in front of the first NBD unix listener `PATH`, a listener at a
/// path fresh for this process run (`PATH.run-XXXXXXXX`) for the mirror
/// jobs this process attaches itself, after removing the sockets earlier
/// runs left at `PATH.run-*`; `PATH` stays served for taps from outside.
/// Call it after the paths are claimed, so no live process owns those. Why:
/// a mirror job an earlier run attached keeps reconnecting to the address
/// it was given; at a fresh address it never reaches this run, so
/// cancelling it never races a reconnect (QEMU 10.0 has crashed in that
/// race; docs/architecture.md, "Taps").
pub(crate) fn add_per_run_nbd_listener(listeners: &mut Vec<TapListener>) {
    let Some((i, path)) = listeners.iter().enumerate().find_map(|(i, l)| match (&l.endpoint, l.native) {
        (Endpoint::Unix(p), false) => Some((i, p.clone())),
        _ => None,
    }) else {
        return;
    };
    let run = &uuid::Uuid::new_v4().simple().to_string()[..8];
    let fresh = PathBuf::from(format!("{}.run-{run}", path.display()));
    if fresh.as_os_str().len() > UNIX_PATH_MAX {
        tracing::warn!(path = %path.display(), "the tap path is too long for a per-run suffix; mirror jobs use it as given");
        return;
    }
    if let (Some(dir), Some(name)) = (path.parent(), path.file_name().and_then(|n| n.to_str())) {
        let earlier = format!("{name}.run-");
        let dir = if dir.as_os_str().is_empty() { std::path::Path::new(".") } else { dir };
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if e.file_name().to_str().is_some_and(|n| n.starts_with(&earlier)) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    listeners.insert(i, TapListener { native: false, endpoint: Endpoint::Unix(fresh) });
}

/// Claims every unix path among `listeners` (see [`claim_path`]).
pub(crate) fn claim_listeners(listeners: &[TapListener]) -> Result<Vec<PathClaim>> {
    listeners
        .iter()
        .filter_map(|l| match &l.endpoint {
            Endpoint::Unix(p) => Some(claim_path(p)),
            Endpoint::Tcp(_) => None,
        })
        .collect()
}

/// Serves the exports to taps on each listener: NBD (QEMU's block mirror)
/// or the native tap protocol, unix or TCP, every connection on the
/// process's connection runtime ([`crate::serving`]). The claims of the
/// unix paths are held for the life of the process.
pub(crate) fn serve_taps(listeners: Vec<TapListener>, claims: Vec<PathClaim>, exports: Arc<Exports>) -> Result<()> {
    for TapListener { native, endpoint } in listeners {
        let listener = match endpoint {
            Endpoint::Unix(path) => {
                Listener::Unix(UnixListener::bind(&path).with_context(|| format!("listening on {}", path.display()))?)
            }
            Endpoint::Tcp(addr) => {
                Listener::Tcp(TcpListener::bind(&addr).with_context(|| format!("listening on {addr}"))?)
            }
        };
        let (protocol, what) =
            if native { (Protocol::NativeTap, "native tap connections") } else { (Protocol::Nbd, "tap connections") };
        let limit = ConnectionLimit::new(MAX_TAP_CONNECTIONS, what);
        accept_each(listener, exports.clone(), limit, Pool::Taps, protocol, what).context("serving taps")?;
    }
    // The paths stay ours until the process ends.
    std::mem::forget(claims);
    Ok(())
}

/// A tap disk whose FLUSH (and so FUA) makes nothing durable: only for the
/// control runs that show a durability checker catches the loss.
#[derive(Debug)]
pub(crate) struct NoDurability(pub(crate) Arc<TapDisk>);

impl BlockExport for NoDurability {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), ExportError> {
        self.0.read(offset, buf)
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), ExportError> {
        self.0.write(offset, data)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), ExportError> {
        self.0.write_zeroes(offset, len)
    }
    fn trim(&self, offset: u64, len: u64) -> Result<(), ExportError> {
        self.0.trim(offset, len)
    }
    fn flush(&self) -> Result<(), ExportError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::io::{Read, Write};

    /// Whether the server closed `c` (EOF) rather than holding it open.
    fn closed_by_server(c: &mut std::os::unix::net::UnixStream) -> bool {
        c.set_read_timeout(Some(std::time::Duration::from_millis(300))).expect("a timeout");
        matches!(c.read(&mut [0u8; 1]), Ok(0))
    }

    /// Connects and reads the NBD greeting; None if the server closed the
    /// connection instead.
    fn greeted(path: &std::path::Path) -> Option<std::os::unix::net::UnixStream> {
        let mut c = std::os::unix::net::UnixStream::connect(path).expect("connected");
        c.set_read_timeout(Some(std::time::Duration::from_secs(5))).expect("a timeout");
        let mut greeting = [0u8; 18];
        c.read_exact(&mut greeting).ok().map(|()| c)
    }

    /// An NBD tap listener serving no export, at most `limit` connections
    /// at once: its folder (kept while the test runs) and socket.
    fn served(limit: usize) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().expect("a folder");
        let path = dir.path().join("tap.sock");
        let l = UnixListener::bind(&path).expect("a listener");
        let limit = ConnectionLimit::new(limit, "test connections");
        accept_each(
            Listener::Unix(l),
            Arc::new(Exports::default()),
            limit,
            Pool::Taps,
            Protocol::Nbd,
            "test connections",
        )
        .expect("served");
        (dir, path)
    }

    #[test]
    fn connections_past_the_limit_are_closed_and_a_freed_place_serves_again() {
        let (_dir, path) = served(2);
        let (Some(mut a), Some(mut b)) = (greeted(&path), greeted(&path)) else { panic!("two are served") };
        assert!(greeted(&path).is_none(), "the third is closed at once");
        // Flags no server accepts end the first session.
        a.write_all(&[0xff; 4]).expect("bad flags");
        assert!(closed_by_server(&mut a), "the first session ended");
        // Its place is given back just after its socket closes.
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert!(greeted(&path).is_some(), "its place serves a new connection");
        assert!(!closed_by_server(&mut b), "the second is still served");
    }

    /// Many connections at once are served by the runtime's fixed threads,
    /// not a thread each (a thread each would add 300; other tests of this
    /// process may start a few meanwhile).
    #[test]
    fn three_hundred_waiting_connections_hold_no_thread_each() {
        let threads = || std::fs::read_dir("/proc/self/task").map(|d| d.count()).unwrap_or(0);
        let (_dir, path) = served(MAX_TAP_CONNECTIONS);
        assert!(greeted(&path).is_some());
        let before = threads();
        let conns: Vec<_> = (0..300).filter_map(|_| greeted(&path)).collect();
        assert_eq!(conns.len(), 300, "every connection is greeted");
        let during = threads();
        assert!(during < before + 100, "{before} threads before, {during} with 300 connections waiting");
    }

    #[test]
    fn the_per_run_listener_comes_first_and_earlier_runs_sockets_go() {
        let dir = tempfile::tempdir().expect("a folder");
        let base = dir.path().join("tap.sock");
        std::fs::write(dir.path().join("tap.sock.run-deadbeef"), b"").expect("a leftover");
        std::fs::write(dir.path().join("tap.sock.lock"), b"").expect("the claim");
        let specs = vec![format!("native-unix:{}/n.sock", dir.path().display()), format!("unix:{}", base.display())];
        let mut listeners = TapListener::parse_all(&specs).expect("addresses");
        add_per_run_nbd_listener(&mut listeners);
        let specs: Vec<String> = listeners.iter().map(TapListener::spec).collect();
        assert_eq!(specs.len(), 3);
        assert!(specs[0].starts_with("native-unix:"), "{specs:?}");
        let fresh = specs[1].strip_prefix("unix:").expect("an NBD unix listener");
        assert!(fresh.starts_with(&format!("{}.run-", base.display())) && !fresh.ends_with("deadbeef"), "{specs:?}");
        assert_eq!(specs[2], format!("unix:{}", base.display()), "the configured path stays served");
        assert!(!dir.path().join("tap.sock.run-deadbeef").exists(), "an earlier run's socket is removed");
        assert!(dir.path().join("tap.sock.lock").exists(), "the claim is not touched");
    }
}
