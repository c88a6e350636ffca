//! The daemon's local control socket: line-delimited JSON, one request per
//! line, one reply per request, for operators' scripts and tests.
//!
//! Requests are typed ([`ControlRequest`]): an unknown op, an unknown field
//! or a field of the wrong type is refused with a reply naming it, never
//! ignored. A line is at most [`MAX_LINE`] bytes (a longer one is refused
//! and the connection closed, without buffering it), and a line that is not
//! UTF-8 gets an error reply.
//!
//! A unix socket path (and a source's spill file) is claimed with a lock
//! file beside it, so a second daemon given the same path refuses to start
//! and names the running one instead of silently taking the path over.

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use serde_json::{json, Value};
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The longest request line accepted, in bytes (newline excluded).
pub const MAX_LINE: usize = 64 << 10;

/// A control request. Each service serves the ops that make sense for it
/// and refuses the others by name.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum ControlRequest {
    /// Insert a checkpoint now: named if `name` is given, with `id` if
    /// given (it must be newer than the newest).
    Checkpoint {
        #[serde(default)]
        id: Option<u64>,
        #[serde(default)]
        name: Option<String>,
    },
    /// A full or delta sync through the tap begins (true) or is done.
    Sync { syncing: bool },
    /// The link's bandwidth limit (0: none).
    Bandwidth { bytes_per_sec: u64 },
    /// (Unit-like variants are written `{}` so that unknown fields are
    /// refused for them too: serde ignores them on unit variants.)
    Status {},
    /// Promote a VPG's replica (a new replication epoch).
    Promote { vpg: String },
    /// Make everything durable and exit.
    Shutdown {},
}

impl ControlRequest {
    pub fn op(&self) -> &'static str {
        match self {
            ControlRequest::Checkpoint { .. } => "checkpoint",
            ControlRequest::Sync { .. } => "sync",
            ControlRequest::Bandwidth { .. } => "bandwidth",
            ControlRequest::Status {} => "status",
            ControlRequest::Promote { .. } => "promote",
            ControlRequest::Shutdown {} => "shutdown",
        }
    }
}

/// The refusal of an op a service does not serve.
pub fn not_served(service: &str, req: &ControlRequest) -> anyhow::Error {
    anyhow::anyhow!("op {:?} is not served by `vdsa {service}`", req.op())
}

/// Holds a path for this process alone (a unix socket it listens on, a
/// spill file it truncates): a lock file `PATH.lock` with our pid, locked
/// for as long as the value lives.
#[derive(Debug)]
pub struct PathClaim {
    _lock: File,
    pub path: PathBuf,
}

/// Claims `path`: refuses, naming the holder, if a running process holds
/// it; otherwise removes what a process that died left there (a stale
/// socket, an old spill file), so the caller creates it afresh.
pub fn claim_path(path: &Path) -> Result<PathClaim> {
    let lock_path = PathBuf::from(format!("{}.lock", path.display()));
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("opening {}", lock_path.display()))?;
    // SAFETY: flock takes a descriptor we own for the duration of the call
    // and touches no memory of ours.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let mut holder = String::new();
        let _ = f.read_to_string(&mut holder);
        let holder = holder.trim();
        let who = if holder.is_empty() { "another process".to_string() } else { format!("process {holder}") };
        bail!(
            "{} is in use by a running vdsa ({who}, holding {}); stop it or choose another path",
            path.display(),
            lock_path.display()
        );
    }
    f.set_len(0)
        .and_then(|()| f.write_all(format!("{}\n", std::process::id()).as_bytes()))
        .with_context(|| format!("writing {}", lock_path.display()))?;
    match std::fs::remove_file(path) {
        Ok(()) => tracing::info!(path = %path.display(), "removed what a stopped process left there"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing the stale {}", path.display())),
    }
    Ok(PathClaim { _lock: f, path: path.to_path_buf() })
}

/// Answers control requests on the claimed socket, one at a time (under
/// `lock`); prints READY once listening. A reply with "bye" ends the
/// process.
pub fn serve_control(
    claim: PathClaim,
    lock: Arc<Mutex<()>>,
    handler: impl Fn(ControlRequest) -> Result<Value> + Send + Sync + 'static,
) -> Result<()> {
    let l = UnixListener::bind(&claim.path).with_context(|| format!("control socket {}", claim.path.display()))?;
    println!("READY");
    std::io::stdout().flush()?;
    let handler = Arc::new(handler);
    for conn in l.incoming().flatten() {
        let (handler, lock) = (handler.clone(), lock.clone());
        std::thread::spawn(move || session(conn, &lock, &*handler));
    }
    Ok(())
}

/// What one line of a session asks for.
#[derive(Debug)]
enum Line {
    Request(Vec<u8>),
    TooLong,
    End,
}

/// Reads one line of at most [`MAX_LINE`] bytes without buffering more.
fn read_line(r: &mut impl BufRead) -> std::io::Result<Line> {
    let mut line = Vec::new();
    loop {
        let buf = r.fill_buf()?;
        if buf.is_empty() {
            return Ok(if line.is_empty() { Line::End } else { Line::Request(line) });
        }
        let (take, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (i, true),
            None => (buf.len(), false),
        };
        if line.len() + take > MAX_LINE {
            return Ok(Line::TooLong);
        }
        line.extend_from_slice(&buf[..take]);
        r.consume(if done { take + 1 } else { take });
        if done {
            return Ok(Line::Request(line));
        }
    }
}

/// The reply to one request line.
fn reply_to(line: &[u8], lock: &Mutex<()>, handler: &dyn Fn(ControlRequest) -> Result<Value>) -> Value {
    let Ok(text) = std::str::from_utf8(line) else {
        return json!({"ok": false, "error": "bad request: the line is not UTF-8"});
    };
    match serde_json::from_str::<ControlRequest>(text) {
        Err(e) => json!({"ok": false, "error": format!("bad request: {e}")}),
        Ok(req) => {
            let _guard = lock.lock();
            handler(req).unwrap_or_else(|e| json!({"ok": false, "error": format!("{e:#}")}))
        }
    }
}

fn session(conn: UnixStream, lock: &Mutex<()>, handler: &dyn Fn(ControlRequest) -> Result<Value>) {
    let Ok(w) = conn.try_clone() else { return };
    let mut w = std::io::BufWriter::new(w);
    let mut r = BufReader::new(conn);
    loop {
        let reply = match read_line(&mut r) {
            Ok(Line::Request(line)) => reply_to(&line, lock, handler),
            Ok(Line::TooLong) => {
                let reply = json!({"ok": false, "error": format!("bad request: a line is at most {MAX_LINE} bytes")});
                let _ = writeln!(w, "{reply}").and_then(|_| w.flush());
                return;
            }
            Ok(Line::End) | Err(_) => return,
        };
        if writeln!(w, "{reply}").and_then(|_| w.flush()).is_err() {
            return;
        }
        if reply.get("bye").is_some() {
            std::process::exit(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<ControlRequest, String> {
        serde_json::from_str(s).map_err(|e| e.to_string())
    }

    #[test]
    fn requests_are_typed_and_unknown_or_mistyped_fields_refused() {
        assert_eq!(parse(r#"{"op":"status"}"#), Ok(ControlRequest::Status {}));
        assert_eq!(
            parse(r#"{"op":"checkpoint","name":"x"}"#),
            Ok(ControlRequest::Checkpoint { id: None, name: Some("x".into()) })
        );
        let e = parse(r#"{"op":"status","verbose":true}"#).err().unwrap_or_default();
        assert!(e.contains("verbose"), "{e}");
        let e = parse(r#"{"op":"sync","syncing":"yes"}"#).err().unwrap_or_default();
        assert!(e.contains("invalid type"), "{e}");
        let e = parse(r#"{"op":"sync"}"#).err().unwrap_or_default();
        assert!(e.contains("syncing"), "{e}");
        let e = parse(r#"{"op":"explode"}"#).err().unwrap_or_default();
        assert!(e.contains("explode"), "{e}");
        let e = parse(r#"{"op":"checkpoint","id":-1}"#).err().unwrap_or_default();
        assert!(e.contains("invalid value"), "{e}");
    }

    #[test]
    fn lines_are_bounded_and_read_without_buffering_past_the_bound() {
        let mut input = vec![b'a'; MAX_LINE + 1];
        input.push(b'\n');
        let mut r = std::io::BufReader::with_capacity(1024, &input[..]);
        assert!(matches!(read_line(&mut r), Ok(Line::TooLong)));
        let mut ok = b"{\"op\":\"status\"}\nrest".to_vec();
        let mut r = std::io::BufReader::with_capacity(4, &ok[..]);
        assert!(matches!(read_line(&mut r), Ok(Line::Request(l)) if l == b"{\"op\":\"status\"}"));
        assert!(matches!(read_line(&mut r), Ok(Line::Request(l)) if l == b"rest"));
        assert!(matches!(read_line(&mut r), Ok(Line::End)));
        ok.clear();
    }

    #[test]
    fn a_non_utf8_line_gets_a_reply() {
        let lock = Mutex::new(());
        let reply = reply_to(&[0xff, 0xfe, b'{'], &lock, &|_| Ok(json!({"ok": true})));
        assert_eq!(reply["ok"], json!(false));
        assert!(reply["error"].as_str().is_some_and(|e| e.contains("UTF-8")));
    }

    #[test]
    fn a_claimed_socket_path_is_refused_naming_the_holder() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("ctl.sock");
        let first = claim_path(&path).unwrap_or_else(|e| panic!("{e:#}"));
        // flock locks belong to the open file description: a second open
        // in this process conflicts like another process would.
        let e = claim_path(&path).err().map(|e| format!("{e:#}")).unwrap_or_default();
        assert!(e.contains(&format!("process {}", std::process::id())), "{e}");
        drop(first);
        assert!(claim_path(&path).is_ok());
    }
}
