//! The `vdsa` daemon as a process: what it acknowledges with FUA survives
//! SIGKILL, it refuses a second daemon on its socket paths and bad
//! arguments before creating anything, and its control socket refuses bad
//! requests by name.

use protection_groups::DiskId;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use vdsa::daemon::derived_id;
use vdsa::journal::{Journal, JournalConfig};
use vdsa::nbd::client::NbdClient;

/// A `vdsa tap-serve` child, killed when dropped.
struct TapServe(Child);

impl Drop for TapServe {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn tap_serve(dir: &Path, journal: &str, disk: &str) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vdsa"));
    cmd.arg("tap-serve")
        .arg("--journal")
        .arg(dir.join(journal))
        .arg("--listen")
        .arg(format!("unix:{}", dir.join("tap.sock").display()))
        .arg("--control")
        .arg(dir.join("ctl.sock"))
        .args(["--disk", disk])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

fn start(dir: &Path, journal: &str) -> TapServe {
    let mut child = tap_serve(dir, journal, "d0=16M").spawn().unwrap_or_else(|e| panic!("{e}"));
    let out = child.stdout.take().unwrap_or_else(|| panic!("no stdout"));
    let child = TapServe(child);
    let mut line = String::new();
    let _ = BufReader::new(out).read_line(&mut line);
    assert_eq!(line.trim(), "READY");
    child
}

fn call(dir: &Path, line: &[u8]) -> Value {
    let mut s = UnixStream::connect(dir.join("ctl.sock")).unwrap_or_else(|e| panic!("{e}"));
    s.write_all(line).unwrap_or_else(|e| panic!("{e}"));
    s.write_all(b"\n").unwrap_or_else(|e| panic!("{e}"));
    let mut reply = String::new();
    let _ = BufReader::new(s).read_line(&mut reply);
    serde_json::from_str(&reply).unwrap_or_else(|e| panic!("reply {reply:?}: {e}"))
}

/// FUA writes were acknowledged while only in memory, and lost on SIGKILL
/// (10 of 10). Each is durable before its reply now.
#[test]
fn fua_writes_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let mut daemon = start(dir.path(), "journal");
    let mut guest = NbdClient::connect_unix(&dir.path().join("tap.sock"), "d0").unwrap_or_else(|e| panic!("{e}"));
    let blocks: Vec<Vec<u8>> = (0..10u8).map(|i| vec![i + 1; 4096]).collect();
    for (i, b) in blocks.iter().enumerate() {
        guest.write_fua(i as u64 * 8192, b).unwrap_or_else(|e| panic!("{e}"));
    }
    let _ = daemon.0.kill();
    let _ = daemon.0.wait();
    let journal = Journal::open(dir.path().join("journal"), JournalConfig::default()).unwrap_or_else(|e| panic!("{e}"));
    let disk = DiskId::from_bytes(derived_id("disk", "d0"));
    for (i, b) in blocks.iter().enumerate() {
        let mut got = vec![0u8; 4096];
        journal.read_head(disk, i as u64 * 8192, &mut got).unwrap_or_else(|e| panic!("{e}"));
        assert!(got == *b, "FUA write {i} was acknowledged and lost");
    }
}

/// A second daemon given the same socket paths used to take them over
/// silently, leaving the first unreachable.
#[test]
fn a_second_daemon_on_the_same_sockets_is_refused_naming_the_first() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let first = start(dir.path(), "journal-a");
    let out = tap_serve(dir.path(), "journal-b", "d0=16M").output().unwrap_or_else(|e| panic!("{e}"));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("process {}", first.0.id())), "{err}");
    assert!(!dir.path().join("journal-b").exists(), "the refused daemon created its journal");
    // The first still answers.
    assert_eq!(call(dir.path(), br#"{"op":"status"}"#)["ok"], json!(true));
}

/// An invalid size used to be refused only after the journal folder was
/// created.
#[test]
fn a_bad_disk_size_is_refused_before_anything_is_created() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    for disk in ["d0=5000", "d0=0", "d0=12Q", "d0"] {
        let out = tap_serve(dir.path(), "journal", disk).output().unwrap_or_else(|e| panic!("{e}"));
        assert!(!out.status.success(), "{disk} accepted");
        assert!(String::from_utf8_lossy(&out.stderr).contains("d0"), "the error names the disk");
        assert!(!dir.path().join("journal").exists(), "{disk}: journal folder created");
        assert!(!dir.path().join("ctl.sock").exists(), "{disk}: control socket created");
    }
}

#[test]
fn the_control_socket_refuses_bad_requests_by_name() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let _daemon = start(dir.path(), "journal");
    let refused = |line: &[u8], needle: &str| {
        let r = call(dir.path(), line);
        assert_eq!(r["ok"], json!(false), "{}", String::from_utf8_lossy(line));
        let e = r["error"].as_str().unwrap_or_default().to_string();
        assert!(e.contains(needle), "{e}");
    };
    refused(&[0xff, 0xfe, b'{', b'}'], "UTF-8");
    refused(br#"{"op":"status","extra":1}"#, "extra");
    refused(br#"{"op":"checkpoint","name":7}"#, "invalid type");
    refused(br#"{"op":"promote","vpg":"x"}"#, "not served");
    refused(br#"{"op":"nope"}"#, "nope");
    // A name far larger than a record may hold: refused, and nothing
    // recorded that a restart could not read back.
    let big = format!(r#"{{"op":"checkpoint","name":"{}"}}"#, "n".repeat(60_000));
    refused(big.as_bytes(), "name");
    // An unbounded line is refused without being buffered, and the
    // connection closed.
    let mut s = UnixStream::connect(dir.path().join("ctl.sock")).unwrap_or_else(|e| panic!("{e}"));
    let chunk = vec![b'x'; 1 << 20];
    for _ in 0..4 {
        if s.write_all(&chunk).is_err() {
            break;
        }
    }
    let mut reply = String::new();
    let _ = s.read_to_string(&mut reply);
    assert!(reply.contains("at most"), "{reply}");
    let ok = call(dir.path(), br#"{"op":"checkpoint","name":"before patch"}"#);
    assert_eq!(ok["ok"], json!(true), "{ok}");
}

/// A second target given the running one's port is refused before it
/// creates or opens anything.
#[test]
fn a_second_target_on_the_same_port_creates_nothing() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let (certs, peer) = (dir.path().join("certs"), dir.path().join("peer"));
    let vdsa = |args: &[&std::ffi::OsStr]| {
        let out = Command::new(env!("CARGO_BIN_EXE_vdsa")).args(args).output().unwrap_or_else(|e| panic!("{e}"));
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    };
    let os = std::ffi::OsStr::new;
    vdsa(&[os("certs"), os("create"), os("--site"), os("dr"), os("--dir"), certs.as_os_str()]);
    vdsa(&[os("certs"), os("create"), os("--site"), os("prod"), os("--dir"), peer.as_os_str()]);
    let peer_ca = peer.join("ca.pem");
    vdsa(&[
        os("certs"),
        os("trust"),
        os("--dir"),
        certs.as_os_str(),
        os("--peer-site"),
        os("prod"),
        os("--ca"),
        peer_ca.as_os_str(),
    ]);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("{e}"));
    let target = |n: &str| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_vdsa"));
        cmd.args(["target", "--listen", &format!("127.0.0.1:{port}"), "--certs"])
            .arg(&certs)
            .arg("--root")
            .arg(dir.path().join(format!("root-{n}")))
            .arg("--control")
            .arg(dir.path().join(format!("ctl-{n}.sock")))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    };
    let mut first = target("a").spawn().unwrap_or_else(|e| panic!("{e}"));
    let out = first.stdout.take().unwrap_or_else(|| panic!("no stdout"));
    let first = TapServe(first);
    let mut line = String::new();
    let _ = BufReader::new(out).read_line(&mut line);
    assert_eq!(line.trim(), "READY");
    let second = target("b").output().unwrap_or_else(|e| panic!("{e}"));
    assert!(!second.status.success());
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(err.contains(&format!("127.0.0.1:{port}")), "the error names the address: {err}");
    assert!(!dir.path().join("root-b").exists(), "the refused target created its root");
    drop(first);
}
