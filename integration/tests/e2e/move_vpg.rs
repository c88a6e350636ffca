//! Move: a planned migration with no data lost. The protected VM writes
//! without a pause until the move powers it off (through its QEMU
//! monitor, from its VDSA); the move takes a last checkpoint, fails over
//! to it and commits, from the operator command. The promoted replica,
//! and the export the moved VM runs from, equal the source disk as the VM
//! left it: every write it was told is done, none lost.

use crate::failover_test::{export_hash, FailoverSite, FO_SIZE};
use integration::kvm_lab::qemu_available;
use serde_json::Value;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

fn ok<T, E: std::fmt::Display>(r: Result<T, E>) -> T {
    r.unwrap_or_else(|e| panic!("{e:#}"))
}

#[test]
fn a_move_powers_the_vm_off_and_loses_no_write() {
    if !qemu_available() {
        panic!("qemu-storage-daemon is missing: integration/run-tests installs qemu-utils");
    }
    let _turn = crate::take_turns();
    let mut fs = FailoverSite::start(Vec::new());
    let vpg = fs.vpg();
    let scratch = fs.dir.path().join("scratch");
    ok(std::fs::create_dir_all(&scratch));
    // The VM writes until it is powered off; `acked` counts the writes it
    // was told are done.
    let mut guest = std::mem::replace(&mut fs.guest, ok(fs.site.vms[0].guest()));
    let writer = std::thread::spawn(move || {
        let mut acked = 0u64;
        let mut x = 99u64;
        loop {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let len = 512 + (x >> 20) % 30_000;
            let off = (x >> 7) % (FO_SIZE - len);
            let data: Vec<u8> = (0..len).map(|i| ((x >> 3) as u8).wrapping_add(i as u8)).collect();
            if guest.write(off, &data).is_err() {
                return acked;
            }
            acked += 1;
            std::thread::sleep(Duration::from_millis(1));
        }
    });
    std::thread::sleep(Duration::from_secs(1));
    // The move, from the operator command.
    let lab = Path::new(env!("CARGO_BIN_EXE_lab"));
    let api = format!("https://127.0.0.1:{}", fs.site.api_port);
    let out = ok(Command::new(lab)
        .args(["site-manager", "vpg", "--data"])
        .arg(fs.site.site_manager_dir.join("data"))
        .args(["--api", &api, "--json", "move", &vpg])
        .output());
    assert!(out.status.success(), "vpg move: {}", String::from_utf8_lossy(&out.stderr));
    let v: Value = ok(serde_json::from_slice(&out.stdout));
    assert_eq!(v["status"], "NeedReverseConfiguration", "{v}");
    let acked = writer.join().unwrap_or_else(|_| panic!("the writer panicked"));
    assert!(acked > 100, "the VM wrote until the move: {acked} writes");
    assert!(!fs.site.vms[0].is_running(), "the move powered the VM off");
    let source = ok(fs.site.vms[0].image_hash());
    assert_eq!(fs.replica_hash(), source, "the moved disk equals the source disk: no write lost");
    let tasks: Vec<Value> = ok(ok(fs.site.sm()).get("/api/v1/tasks")).as_array().cloned().unwrap_or_default();
    let moved = tasks.iter().find(|t| t["kind"] == "move").cloned().unwrap_or_default();
    assert_eq!(moved["completion"], "Success", "{moved}");
    let failover = moved["result"]["failover"].as_str().unwrap_or_default().to_string();
    let f = ok(ok(fs.site.sm()).get(&format!("/api/v1/failover-tests/{failover}")));
    let uri = f["exports"][0]["uri"].as_str().unwrap_or_default().to_string();
    assert_eq!(export_hash(&uri, &scratch), source, "the moved VM's export serves the source disk");
    println!("moved after {acked} acknowledged writes, at checkpoint {}", moved["result"]["checkpoint"]);
}
