//! Replication between two real `vdsa` processes on loopback over the TLS
//! link: what the target holds at each checkpoint must be exactly what the
//! source disks held, through link cuts, stalls and SIGKILLs.

use integration::replication_lab::{paired_sites, wait_until, Daemon, FaultProxy, SourceSpec, TargetSpec};
use integration::workload::{GenWrite, Mix, Payload, ReferenceModel, Workload};
use protection_groups::{CheckpointId, DiskId};
use serde_json::json;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;
use vdsa::journal::{Journal, JournalConfig};
use vdsa::nbd::client::NbdClient;

pub fn lab() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_lab"))
}

pub fn ok<T>(r: anyhow::Result<T>) -> T {
    r.unwrap_or_else(|e| panic!("{e:#}"))
}

pub fn disk_id(name: &str) -> DiskId {
    DiskId::from_bytes(vdsa::daemon::derived_id("disk", name))
}

/// A guest write straight into the source VDSA's tap (NBD), as a
/// hypervisor filter delivers it.
fn tap_write(c: &mut NbdClient, w: &GenWrite) {
    let r = match &w.payload {
        Payload::Data(d) => c.write(w.offset, d),
        Payload::Zero(n) => c.write_zeroes(w.offset, *n as u32, false),
        Payload::Trim(n) => c.trim(w.offset, *n as u32),
    };
    r.unwrap_or_else(|e| panic!("tap write: {e}"));
}

/// Every checkpoint the target recorded as consistent reads back exactly
/// the model at that checkpoint; returns how many were checked.
pub fn verify_checkpoints(journal_dir: &Path, disks: &[String], expected: &BTreeMap<u64, Vec<blake3::Hash>>, must_be_inconsistent: &[u64]) -> usize {
    let j = ok(Journal::open(journal_dir, JournalConfig::default()).map_err(Into::into));
    let mut checked = 0;
    for cp in ok(j.checkpoints().map_err(Into::into)) {
        if !cp.kind.is_recoverable() {
            continue;
        }
        assert!(
            !must_be_inconsistent.contains(&cp.id.0),
            "checkpoint {} was taken during a resync but is offered as consistent ({:?})",
            cp.id.0,
            cp.kind
        );
        let Some(want) = expected.get(&cp.id.0) else {
            panic!("the target offers checkpoint {} as consistent, but the test never saw it consistent at the source", cp.id.0);
        };
        let v = ok(j.open_view(CheckpointId(cp.id.0)).map_err(Into::into));
        for (i, name) in disks.iter().enumerate() {
            let got = ok(v.disk_hash(disk_id(name)).map_err(Into::into));
            assert_eq!(got, want[i], "checkpoint {} disk {name}: target differs from the source", cp.id.0);
        }
        checked += 1;
    }
    checked
}

fn status(d: &Daemon) -> serde_json::Value {
    ok(d.call(json!({"op": "status"})))
}

/// Writes through the tap, checkpoints, and the target's checkpoints equal
/// the model: the plain path, no faults.
#[test]
fn replicates_writes_and_checkpoints_exactly() {
    let dir = ok(tempfile::tempdir().map_err(Into::into));
    let (src_certs, dst_certs) = ok(paired_sites(lab(), dir.path(), "prod", "dr"));
    let tspec = ok(TargetSpec::new(dir.path(), &dst_certs, 300));
    let target = ok(tspec.start(lab()));
    let disks: Vec<(String, u64)> = (0..3).map(|i| (format!("d{i}"), 8u64 << 20)).collect();
    let names: Vec<String> = disks.iter().map(|d| d.0.clone()).collect();
    let mut sspec = SourceSpec::new(dir.path(), &src_certs, &format!("127.0.0.1:{}", tspec.port), "vpg1", &disks);
    sspec.extra = vec!["--heartbeat-ms".into(), "300".into()];
    let source = ok(sspec.start(lab()));
    ok(source.call(json!({"op": "sync", "syncing": false})));
    let sizes: Vec<u64> = disks.iter().map(|d| d.1).collect();
    let mut model = ReferenceModel::new(&sizes);
    let mut work = Workload::new(11, &sizes, Mix::default());
    let mut taps: Vec<NbdClient> = names.iter().map(|n| ok(NbdClient::connect_unix(&sspec.tap_sock, n).map_err(Into::into))).collect();
    let mut expected = BTreeMap::new();
    for round in 1..=20u64 {
        for _ in 0..100 {
            let w = work.next_write();
            tap_write(&mut taps[w.disk], &w);
            model.apply(&w);
        }
        let r = ok(source.call(json!({"op": "checkpoint", "id": round})));
        assert_eq!(r["kind"], "Automatic");
        expected.insert(round, model.hashes());
    }
    ok(wait_until("the target to make everything durable", Duration::from_secs(60), || {
        Ok(status(&source)["drained"] == json!(true))
    }));
    let st = status(&source);
    assert!(st["rpo_ms"].as_u64().is_some(), "no RPO reported: {st}");
    let tst = status(&target);
    assert_eq!(tst["vpgs"][0]["consistent_checkpoints"], json!(20), "{tst}");
    ok(source.shutdown());
    ok(target.shutdown());
    let checked = verify_checkpoints(&tspec.journal_dir("vpg1"), &names, &expected, &[]);
    assert_eq!(checked, 20);
}
