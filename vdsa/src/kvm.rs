//! The KVM/QEMU hypervisor adapter: attaches a VDSA tap to a VM disk with
//! QEMU's block mirror in write-blocking mode (see
//! docs/architecture.md §10), reports its state, and detaches it.
//!
//! The tap never completes the mirror job (that would switch the VM's disk
//! to the target): it is ended with `block-job-cancel`.

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("QMP socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("QMP command {command} failed: {class}: {desc}")]
    Command { command: String, class: String, desc: String },
    #[error("QMP protocol: {0}")]
    Protocol(String),
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(Duration, String),
    #[error("the tap job {job} stopped before it was in sync (job {status}: {why})")]
    TapStopped { job: String, status: String, why: String },
}

/// A QMP connection. Events that arrive while waiting for a command's
/// reply are kept (QEMU sends job events only to connected clients).
///
/// Every command carries an id and only the reply with that id answers it:
/// a greeting or a stale reply that arrives where a reply was expected (a
/// monitor that only now took this connection, a reply to a command that
/// timed out earlier) is passed over rather than mistaken for the answer.
#[derive(Debug)]
pub struct Qmp {
    r: BufReader<UnixStream>,
    w: UnixStream,
    /// Bytes of a message whose line end has not arrived yet (a read that
    /// timed out mid-line keeps them for the next read).
    partial: Vec<u8>,
    next_id: u64,
    pub events: Vec<Value>,
}

impl Qmp {
    pub fn connect(path: &Path) -> Result<Qmp, QmpError> {
        let s = UnixStream::connect(path)?;
        let w = s.try_clone()?;
        let mut q = Qmp { r: BufReader::new(s), w, partial: Vec::new(), next_id: 1, events: Vec::new() };
        let greeting = q.read_message(Duration::from_secs(10))?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Protocol(format!("unexpected greeting {greeting}")));
        }
        q.execute("qmp_capabilities", json!({}))?;
        Ok(q)
    }

    fn read_message(&mut self, timeout: Duration) -> Result<Value, QmpError> {
        self.r.get_ref().set_read_timeout(Some(timeout))?;
        match self.r.read_until(b'\n', &mut self.partial) {
            Ok(0) => Err(QmpError::Protocol("QEMU closed the QMP connection".into())),
            Ok(_) if self.partial.last() != Some(&b'\n') => {
                Err(QmpError::Protocol("QEMU closed the QMP connection mid-message".into()))
            }
            Ok(_) => {
                let line = std::mem::take(&mut self.partial);
                serde_json::from_slice(&line)
                    .map_err(|e| QmpError::Protocol(format!("bad JSON {:?}: {e}", String::from_utf8_lossy(&line))))
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                Err(QmpError::Timeout(timeout, "a QMP message".into()))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The error job `job_id` ended with, as the `BLOCK_JOB_COMPLETED`
    /// event this connection received says (None: no such event yet, or
    /// the job ended without an error).
    pub fn job_error(&self, job_id: &str) -> Option<&str> {
        self.events
            .iter()
            .rev()
            .filter(|e| e.get("event").and_then(Value::as_str) == Some("BLOCK_JOB_COMPLETED"))
            .filter(|e| e.pointer("/data/device").and_then(Value::as_str) == Some(job_id))
            .find_map(|e| e.pointer("/data/error").and_then(Value::as_str))
    }

    /// Runs a command and returns its "return" value.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, QmpError> {
        let id = self.next_id;
        self.next_id += 1;
        let msg = json!({"execute": command, "arguments": arguments, "id": id});
        writeln!(self.w, "{msg}")?;
        loop {
            let m = self.read_message(Duration::from_secs(30))?;
            if m.get("event").is_some() {
                self.events.push(m);
                continue;
            }
            if m.get("QMP").is_some() || m.get("id") != Some(&json!(id)) {
                tracing::debug!(%m, "QMP message that answers no pending command, passed over");
                continue;
            }
            if let Some(r) = m.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = m.get("error") {
                return Err(QmpError::Command {
                    command: command.to_string(),
                    class: e.get("class").and_then(Value::as_str).unwrap_or("?").to_string(),
                    desc: e.get("desc").and_then(Value::as_str).unwrap_or("?").to_string(),
                });
            }
            return Err(QmpError::Protocol(format!("unexpected message {m}")));
        }
    }
}

/// Where the VDSA's tap target listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdAddress {
    Unix(String),
    Tcp { host: String, port: u16 },
}

/// A tap to attach: QEMU's block node `device` mirrored to `export` at
/// `server`, through a new NBD client node `target_node`.
#[derive(Debug, Clone)]
pub struct TapSpec {
    pub job_id: String,
    pub device: String,
    pub target_node: String,
    pub server: NbdAddress,
    pub export: String,
    /// Copy the whole disk first (initial or delta sync); without it the
    /// target is assumed in sync.
    pub sync_full: bool,
    /// Seconds the NBD client node waits for a restarting VDSA.
    pub reconnect_delay: Option<u32>,
}

/// The job's state as QEMU reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TapState {
    pub status: String,
    pub ready: bool,
    pub actively_synced: bool,
    pub io_status: String,
    pub offset: u64,
    pub len: u64,
}

impl TapState {
    /// Every write is mirrored synchronously: checkpoints are consistent.
    pub fn in_sync(&self) -> bool {
        self.ready && self.actively_synced && self.io_status == "ok" && self.status == "ready"
    }

    /// The target failed and the job stopped there (a job attached with
    /// `on-target-error: stop`, as by a VDSA before this one): it tracks
    /// dirty blocks and waits to be cancelled.
    pub fn failed(&self) -> bool {
        self.io_status == "failed" || self.status == "paused"
    }

    /// The job is on its way out by itself: QEMU accepts no cancel now
    /// and removes it when it has finished.
    pub fn ending(&self) -> bool {
        matches!(self.status.as_str(), "aborting" | "concluded" | "null" | "waiting" | "pending")
    }
}

/// Whether the tap no longer mirrors: its job is gone (it ended, as one
/// does when its target fails), ending, or stopped with a failed target.
pub fn stopped_mirroring(s: Option<&TapState>) -> bool {
    s.is_none_or(|s| s.failed() || s.ending())
}

/// Attaches the tap and waits until the initial copy is done and every
/// write is mirrored synchronously.
pub fn attach(qmp: &mut Qmp, spec: &TapSpec, timeout: Duration) -> Result<TapState, QmpError> {
    let server = match &spec.server {
        NbdAddress::Unix(path) => json!({"type": "unix", "path": path}),
        NbdAddress::Tcp { host, port } => json!({"type": "inet", "host": host, "port": port.to_string()}),
    };
    let mut node = json!({"driver": "nbd", "node-name": spec.target_node, "server": server, "export": spec.export});
    if let Some(d) = spec.reconnect_delay {
        node["reconnect-delay"] = json!(d);
    }
    qmp.execute("blockdev-add", node)?;
    let mirror = json!({
        "job-id": spec.job_id,
        "device": spec.device,
        "target": spec.target_node,
        "sync": if spec.sync_full { "full" } else { "none" },
        "copy-mode": "write-blocking",
        "filter-node-name": format!("{}-filter", spec.job_id),
        // A failed target ends the job by itself; a stopped one would have
        // to be force-cancelled while the guest writes, which QEMU 10.0
        // does not survive (docs/management-protocol.md, "Taps").
        "on-target-error": "report",
    });
    if let Err(e) = qmp.execute("blockdev-mirror", mirror) {
        let _ = qmp.execute("blockdev-del", json!({"node-name": spec.target_node}));
        return Err(e);
    }
    let s = wait_for(qmp, &spec.job_id, timeout, "the tap to be in sync", |s| {
        s.is_some_and(TapState::in_sync) || stopped_mirroring(s)
    })?;
    if s.in_sync() {
        return Ok(s);
    }
    // It ended (or stopped) during the copy: say why, as QEMU told it.
    let why = qmp.job_error(&spec.job_id).unwrap_or("no reason given").to_string();
    Err(QmpError::TapStopped { job: spec.job_id.clone(), status: s.status, why })
}

/// The NBD target node of tap job `job_id`: named after its job, so that
/// a node a job left behind can be told to whom it belonged.
pub fn target_node(job_id: &str) -> String {
    format!("{job_id}-tgt")
}

/// The job whose target node `node` is, if it is a tap's target node.
pub fn job_of_target_node(node: &str) -> Option<&str> {
    node.strip_suffix("-tgt")
}

/// The ids of the block jobs QEMU runs.
pub fn job_ids(qmp: &mut Qmp) -> Result<Vec<String>, QmpError> {
    Ok(strings_under(&qmp.execute("query-block-jobs", json!({}))?, "device"))
}

/// The names of QEMU's named block nodes.
pub fn node_names(qmp: &mut Qmp) -> Result<Vec<String>, QmpError> {
    Ok(strings_under(&qmp.execute("query-named-block-nodes", json!({"flat": true}))?, "node-name"))
}

/// The string at `key` of each object of the array `v`.
fn strings_under(v: &Value, key: &str) -> Vec<String> {
    v.as_array()
        .map(|a| a.iter().filter_map(|o| o.get(key).and_then(Value::as_str)).map(str::to_string).collect())
        .unwrap_or_default()
}

/// The job's state, or None if there is no such job.
pub fn state(qmp: &mut Qmp, job_id: &str) -> Result<Option<TapState>, QmpError> {
    let jobs = qmp.execute("query-block-jobs", json!({}))?;
    let Some(jobs) = jobs.as_array() else {
        return Err(QmpError::Protocol(format!("query-block-jobs returned {jobs}")));
    };
    Ok(jobs.iter().find(|j| j.get("device").and_then(Value::as_str) == Some(job_id)).map(|j| TapState {
        status: j.get("status").and_then(Value::as_str).unwrap_or("?").to_string(),
        ready: j.get("ready").and_then(Value::as_bool).unwrap_or(false),
        actively_synced: j.get("actively-synced").and_then(Value::as_bool).unwrap_or(false),
        io_status: j.get("io-status").and_then(Value::as_str).unwrap_or("?").to_string(),
        offset: j.get("offset").and_then(Value::as_u64).unwrap_or(0),
        len: j.get("len").and_then(Value::as_u64).unwrap_or(0),
    }))
}

/// Polls the job until `done` holds for its state (None: no such job).
pub fn wait_for(
    qmp: &mut Qmp,
    job_id: &str,
    timeout: Duration,
    what: &str,
    done: impl Fn(Option<&TapState>) -> bool,
) -> Result<TapState, QmpError> {
    let start = Instant::now();
    loop {
        let s = state(qmp, job_id)?;
        if done(s.as_ref()) {
            return Ok(s.unwrap_or(TapState {
                status: "gone".into(),
                ready: false,
                actively_synced: false,
                io_status: "ok".into(),
                offset: 0,
                len: 0,
            }));
        }
        if start.elapsed() > timeout {
            return Err(QmpError::Timeout(timeout, format!("{what} (job {job_id}: {s:?})")));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Detaches the tap, leaving the VM's disk as it is.
///
/// A working job is cancelled gracefully: it finishes its in-flight writes
/// to the target and ends without pivoting. Force-cancelling a ready
/// write-blocking mirror while the guest writes corrupts QEMU 10.0's heap
/// (the VM dies; docs/management-protocol.md), so force is used only on a job
/// whose target failed and that stopped there (left by a VDSA that attached
/// with `on-target-error: stop`) or one that did not end gracefully within
/// [`GRACEFUL_DETACH`]. A job that is ending by itself is waited for; one
/// that is gone leaves only its target node to remove.
pub fn detach(qmp: &mut Qmp, job_id: &str, target_node: &str) -> Result<(), QmpError> {
    if let Some(s) = state(qmp, job_id)? {
        let ended = if s.failed() {
            false
        } else if s.ending() {
            wait_for(qmp, job_id, GRACEFUL_DETACH, "the tap job to end", |s| s.is_none()).is_ok()
        } else {
            qmp.execute("block-job-cancel", json!({"device": job_id, "force": false}))?;
            let gone_or_failed = |s: Option<&TapState>| s.is_none_or(TapState::failed);
            wait_for(qmp, job_id, GRACEFUL_DETACH, "the tap job to end", gone_or_failed).is_ok()
                && state(qmp, job_id)?.is_none()
        };
        if !ended {
            qmp.execute("block-job-cancel", json!({"device": job_id, "force": true}))?;
            wait_for(qmp, job_id, Duration::from_secs(30), "the tap job to end", |s| s.is_none())?;
        }
    }
    qmp.execute("blockdev-del", json!({"node-name": target_node}))?;
    Ok(())
}

/// How long a graceful cancel may take before the job is forced.
pub const GRACEFUL_DETACH: Duration = Duration::from_secs(15);

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// A scripted monitor: greets, then answers each command with the
    /// lines `script` gives for it (`{id}` replaced by the command's id).
    fn monitor(path: &Path, script: Vec<Vec<&'static str>>) -> std::thread::JoinHandle<()> {
        let l = UnixListener::bind(path).unwrap_or_else(|e| panic!("{e}"));
        std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap_or_else(|e| panic!("{e}"));
            let mut w = s.try_clone().unwrap_or_else(|e| panic!("{e}"));
            let mut r = BufReader::new(s);
            let _ = writeln!(w, r#"{{"QMP": {{"version": {{}}, "capabilities": []}}}}"#);
            for lines in script {
                let mut cmd = String::new();
                if r.read_line(&mut cmd).unwrap_or(0) == 0 {
                    return;
                }
                let v: Value = serde_json::from_str(&cmd).unwrap_or_default();
                let id = v["id"].to_string();
                for line in lines {
                    let _ = writeln!(w, "{}", line.replace("{id}", &id));
                }
            }
        })
    }

    /// A connection to a scripted monitor (its first answer is to the
    /// capabilities negotiation), with the folder of its socket.
    fn scripted(script: Vec<Vec<&'static str>>) -> (tempfile::TempDir, Qmp, std::thread::JoinHandle<()>) {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("qmp.sock");
        let t = monitor(&path, script);
        let q = Qmp::connect(&path).unwrap_or_else(|e| panic!("{e}"));
        (dir, q, t)
    }

    #[test]
    fn a_greeting_or_stale_reply_where_a_reply_is_expected_is_passed_over() {
        let (_dir, mut q, t) = scripted(vec![
            vec![r#"{"return": {}, "id": {id}}"#],
            vec![
                r#"{"QMP": {"version": {}, "capabilities": []}}"#,
                r#"{"return": ["stale"], "id": 999}"#,
                r#"{"event": "JOB_STATUS_CHANGE", "data": {}}"#,
                r#"{"return": ["mine"], "id": {id}}"#,
            ],
        ]);
        let r = q.execute("query-block-jobs", json!({})).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r, json!(["mine"]));
        assert_eq!(q.events.len(), 1);
        let _ = t.join();
    }

    #[test]
    fn a_tap_whose_job_ends_during_the_copy_fails_its_attach_with_qemus_reason() {
        let (_dir, mut q, t) = scripted(vec![
            vec![r#"{"return": {}, "id": {id}}"#],
            vec![r#"{"return": {}, "id": {id}}"#],
            vec![r#"{"return": {}, "id": {id}}"#],
            vec![
                r#"{"event": "BLOCK_JOB_COMPLETED", "data": {"device": "other", "error": "not this one"}}"#,
                r#"{"event": "BLOCK_JOB_COMPLETED", "data": {"device": "tap9", "error": "Input/output error"}}"#,
                r#"{"return": [], "id": {id}}"#,
            ],
        ]);
        let spec = TapSpec {
            job_id: "tap9".into(),
            device: "src".into(),
            target_node: "tap9-tgt".into(),
            server: NbdAddress::Unix("/nowhere".into()),
            export: "vmdisk".into(),
            sync_full: true,
            reconnect_delay: Some(5),
        };
        let start = Instant::now();
        match attach(&mut q, &spec, Duration::from_secs(60)) {
            Err(QmpError::TapStopped { job, status, why }) => {
                assert_eq!((job.as_str(), status.as_str(), why.as_str()), ("tap9", "gone", "Input/output error"));
            }
            other => panic!("{other:?}"),
        }
        assert!(start.elapsed() < Duration::from_secs(5), "it waited for the job that had ended");
        let _ = t.join();
    }
}
