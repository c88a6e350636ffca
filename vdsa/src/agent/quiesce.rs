//! Quiescing VMs for application-consistent checkpoints: before the
//! barrier the site manager asks (QUIESCE), after its decision it says
//! THAW. A VM is frozen through the QEMU guest agent's fsfreeze on its
//! agent socket, or else by its command hook (`… freeze` / `… thaw`).
//! A VM that cannot be frozen within the limit is reported, and the
//! checkpoint is then crash-consistent. Nothing stays frozen for long: a
//! watchdog thaws whatever no THAW came for (a site manager that died).

use protection_groups::mgmt::VmQuiesce;
use protection_groups::{CheckpointId, VpgId};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long freezing (or thawing) one VM may take.
pub const QUIESCE_LIMIT: Duration = Duration::from_secs(5);
/// Frozen VMs are thawed after this even without THAW.
pub const THAW_LIMIT: Duration = Duration::from_secs(30);

/// A VM frozen for a checkpoint.
#[derive(Debug)]
struct Frozen {
    vm: VmQuiesce,
    since: Instant,
}

/// The VMs frozen now, per (VPG, checkpoint), and the rounds still
/// freezing (QUIESCE and THAW run on threads of their own, so a THAW can
/// come while its round still freezes: what freezes after it is thawed at
/// once).
#[derive(Debug, Default)]
pub struct Quiescer {
    frozen: Mutex<HashMap<(VpgId, CheckpointId), Vec<Frozen>>>,
    /// Rounds freezing now: whether their THAW came already.
    freezing: Mutex<HashMap<(VpgId, CheckpointId), bool>>,
}

impl Quiescer {
    /// Freezes each VM; returns why some could not be (empty: all are).
    pub fn quiesce(&self, vpg: VpgId, checkpoint: CheckpointId, vms: &[VmQuiesce]) -> Vec<String> {
        let key = (vpg, checkpoint);
        if let Ok(mut r) = self.freezing.lock() {
            r.insert(key, false);
        }
        let mut failures = Vec::new();
        for vm in vms {
            match freeze(vm) {
                Ok(()) => {
                    // Listed at once, so a THAW finds it; frozen after the
                    // THAW came, thawed at once. (Lock order: freezing,
                    // then frozen.)
                    let late = match self.freezing.lock() {
                        Ok(r) if r.get(&key) != Some(&true) => {
                            if let Ok(mut f) = self.frozen.lock() {
                                f.entry(key).or_default().push(Frozen { vm: vm.clone(), since: Instant::now() });
                            }
                            false
                        }
                        _ => true,
                    };
                    if late {
                        thaw_one(vm);
                    }
                }
                Err(why) => {
                    tracing::warn!(vm = %vm.name, %checkpoint, "cannot quiesce: {why}");
                    failures.push(format!("VM {}: {why}", vm.name));
                }
            }
        }
        if let Ok(mut r) = self.freezing.lock() {
            r.remove(&key);
        }
        failures
    }

    /// Thaws what was frozen for this checkpoint (and, if its round still
    /// freezes, what it freezes from now on).
    pub fn thaw(&self, vpg: VpgId, checkpoint: CheckpointId) {
        let key = (vpg, checkpoint);
        let vms = {
            let mut r = self.freezing.lock().ok();
            if let Some(thawed) = r.as_mut().and_then(|r| r.get_mut(&key)) {
                *thawed = true;
            }
            self.frozen.lock().ok().and_then(|mut f| f.remove(&key)).unwrap_or_default()
        };
        for f in vms {
            thaw_one(&f.vm);
        }
    }

    /// Thaws every VM frozen longer than [`THAW_LIMIT`].
    pub fn thaw_overdue(&self) {
        let overdue: Vec<Frozen> = match self.frozen.lock() {
            Ok(mut f) => {
                let mut out = Vec::new();
                for list in f.values_mut() {
                    let (old, keep): (Vec<Frozen>, Vec<Frozen>) =
                        std::mem::take(list).into_iter().partition(|x| x.since.elapsed() > THAW_LIMIT);
                    *list = keep;
                    out.extend(old);
                }
                f.retain(|_, l| !l.is_empty());
                out
            }
            Err(_) => Vec::new(),
        };
        for f in overdue {
            tracing::warn!(vm = %f.vm.name, "no THAW came in {} s: thawing on our own", THAW_LIMIT.as_secs());
            thaw_one(&f.vm);
        }
    }
}

fn freeze(vm: &VmQuiesce) -> Result<(), String> {
    if !vm.spec.guest_agent_socket.is_empty() {
        guest_agent(Path::new(&vm.spec.guest_agent_socket), "guest-fsfreeze-freeze")
            .map(|_| ())
            .map_err(|e| format!("the guest agent could not freeze: {e}"))
    } else {
        hook(&vm.spec.hook, "freeze", &vm.name).map_err(|e| format!("the freeze hook failed: {e}"))
    }
}

fn thaw_one(vm: &VmQuiesce) {
    let r = if !vm.spec.guest_agent_socket.is_empty() {
        guest_agent(Path::new(&vm.spec.guest_agent_socket), "guest-fsfreeze-thaw").map(|_| ())
    } else {
        hook(&vm.spec.hook, "thaw", &vm.name)
    };
    if let Err(e) = r {
        tracing::error!(vm = %vm.name, "cannot thaw: {e}");
    }
}

/// One guest agent command after a `guest-sync` (which skips any stale
/// answer left in the channel); an `error` answer is an error.
pub fn guest_agent(socket: &Path, command: &str) -> Result<serde_json::Value, String> {
    let s = UnixStream::connect(socket).map_err(|e| format!("{}: {e}", socket.display()))?;
    s.set_read_timeout(Some(QUIESCE_LIMIT)).map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(QUIESCE_LIMIT)).map_err(|e| e.to_string())?;
    let mut w = s.try_clone().map_err(|e| e.to_string())?;
    let mut r = BufReader::new(s);
    let token = u64::from(std::process::id()) << 20 | u64::from(rand_u16());
    let read_answer = |r: &mut BufReader<UnixStream>| -> Result<serde_json::Value, String> {
        let mut line = String::new();
        if r.read_line(&mut line).map_err(|e| format!("no answer: {e}"))? == 0 {
            return Err("the guest agent closed the channel".into());
        }
        serde_json::from_str(line.trim()).map_err(|e| format!("not JSON from the guest agent: {e}"))
    };
    writeln!(w, "{}", serde_json::json!({"execute": "guest-sync", "arguments": {"id": token}}))
        .map_err(|e| e.to_string())?;
    let deadline = Instant::now() + QUIESCE_LIMIT;
    loop {
        let v = read_answer(&mut r)?;
        if v.get("return").and_then(serde_json::Value::as_u64) == Some(token) {
            break;
        }
        if Instant::now() > deadline {
            return Err("the guest agent did not answer guest-sync".into());
        }
    }
    writeln!(w, "{}", serde_json::json!({"execute": command})).map_err(|e| e.to_string())?;
    let v = read_answer(&mut r)?;
    if let Some(e) = v.get("error") {
        return Err(format!("{command}: {}", e.get("desc").and_then(serde_json::Value::as_str).unwrap_or("error")));
    }
    v.get("return").cloned().ok_or_else(|| format!("{command}: unexpected answer {v}"))
}

fn rand_u16() -> u16 {
    let n = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    (n ^ (n >> 16)) as u16
}

/// Runs the hook with `verb` appended; exit 0 within the limit succeeds.
fn hook(argv: &[String], verb: &str, vm: &str) -> Result<(), String> {
    let (program, args) = argv.split_first().ok_or("no hook is set")?;
    let mut child = std::process::Command::new(program)
        .args(args)
        .arg(verb)
        .env("VDSA_VM_NAME", vm)
        .stdin(std::process::Stdio::null())
        .spawn()
        .map_err(|e| format!("{program}: {e}"))?;
    let start = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return Ok(()),
            Ok(Some(status)) => return Err(format!("{program} {verb} exited with {status}")),
            Ok(None) if start.elapsed() > QUIESCE_LIMIT => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{program} {verb} took longer than {} s", QUIESCE_LIMIT.as_secs()));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => return Err(format!("{program}: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// A scripted guest agent: answers guest-sync with a stale line first,
    /// then each command as `answer` says.
    fn agent(path: &Path, answer: &'static str) -> std::thread::JoinHandle<Vec<String>> {
        let l = UnixListener::bind(path).unwrap_or_else(|e| panic!("{e}"));
        std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap_or_else(|e| panic!("{e}"));
            let mut w = s.try_clone().unwrap_or_else(|e| panic!("{e}"));
            let mut r = BufReader::new(s);
            let mut seen = Vec::new();
            let mut line = String::new();
            while r.read_line(&mut line).unwrap_or(0) > 0 {
                let v: serde_json::Value = serde_json::from_str(line.trim()).unwrap_or_default();
                seen.push(v["execute"].as_str().unwrap_or("").to_string());
                if v["execute"] == "guest-sync" {
                    let _ = writeln!(w, r#"{{"return": 1}}"#);
                    let _ = writeln!(w, "{}", serde_json::json!({"return": v["arguments"]["id"]}));
                } else {
                    let _ = writeln!(w, "{answer}");
                }
                line.clear();
            }
            seen
        })
    }

    #[test]
    fn the_guest_agent_is_synced_then_asked() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let sock = dir.path().join("qga.sock");
        let t = agent(&sock, r#"{"return": 2}"#);
        let v = guest_agent(&sock, "guest-fsfreeze-freeze").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(v, serde_json::json!(2));
        assert_eq!(t.join().unwrap_or_default(), vec!["guest-sync", "guest-fsfreeze-freeze"]);
    }

    #[test]
    fn a_guest_agent_error_is_named() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let sock = dir.path().join("qga.sock");
        let _t = agent(&sock, r#"{"error": {"class": "GenericError", "desc": "fsfreeze is disabled"}}"#);
        let e = guest_agent(&sock, "guest-fsfreeze-freeze").err().unwrap_or_default();
        assert!(e.contains("fsfreeze is disabled"), "{e}");
    }
}
