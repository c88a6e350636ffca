//! Application-consistent checkpoints with a real site manager and VDSAs:
//! the VM's quiesce hook runs `freeze` before the barrier and `thaw`
//! after it; a failing or slow hook still gives the checkpoint, marked
//! crash-consistent with the reason; an ordinary checkpoint does not
//! quiesce.

use integration::kvm_lab::qemu_available;
use integration::site_lab::{ProtectedSite, SiteSpec};
use serde_json::{json, Value};
use std::path::Path;

fn ok<T>(r: anyhow::Result<T>) -> T {
    r.unwrap_or_else(|e| panic!("{e:#}"))
}

#[test]
fn quiesced_checkpoints_are_application_consistent_and_a_failed_quiesce_says_why() {
    assert!(qemu_available(), "qemu-storage-daemon is needed");
    let _turn = crate::take_turns();
    let dir = ok(tempfile::tempdir().map_err(Into::into));
    let d = dir.path();
    let hook = d.join("hook.sh");
    let (log, mode) = (d.join("hook.log"), d.join("mode"));
    ok(std::fs::write(&mode, "ok").map_err(Into::into));
    let script = format!(
        "#!/bin/sh\necho \"$1 $VDSA_VM_NAME\" >> {log}\nm=$(cat {mode})\n\
         if [ \"$1\" = freeze ] && [ \"$m\" = fail ]; then exit 3; fi\n\
         if [ \"$1\" = freeze ] && [ \"$m\" = slow ]; then sleep 8; fi\nexit 0\n",
        log = log.display(),
        mode = mode.display()
    );
    ok(std::fs::write(&hook, script).map_err(Into::into));
    let lab = Path::new(env!("CARGO_BIN_EXE_lab"));
    let spec = SiteSpec {
        checkpoint_interval_ms: 3_600_000,
        quiesce_hook: vec!["sh".into(), hook.display().to_string()],
        disk_image: None,
        ..SiteSpec::one_vm()
    };
    let site = ok(ProtectedSite::start(lab, d, &spec, |m| println!("{m}")));
    let sm = ok(site.sm());
    let vpg = site.vpg.clone();
    let take = |name: &str, app: bool| -> Value {
        let r = ok(
            sm.post(&format!("/api/v1/vpgs/{vpg}/checkpoints"), json!({"name": name, "application_consistent": app}))
        );
        let id = r["id"].as_u64().unwrap_or_default();
        ok(sm.get(&format!("/api/v1/vpgs/{vpg}/checkpoints/{id}/wait?timeout_ms=60000")))
    };
    let hook_log = || std::fs::read_to_string(&log).unwrap_or_default();

    let cp = take("app", true);
    assert!(cp["application_consistent"] == true && cp["consistent"] == true && cp["durable"] == true, "{cp}");
    assert_eq!(hook_log(), "freeze vm-0\nthaw vm-0\n");

    let plain = take("plain", false);
    assert!(plain["consistent"] == true && plain["application_consistent"] == false, "{plain}");
    assert_eq!(plain["quiesce_reason"], "");
    assert_eq!(hook_log().lines().count(), 2, "an ordinary checkpoint ran the hook");

    ok(std::fs::write(&mode, "fail").map_err(Into::into));
    let failed = take("failed-quiesce", true);
    assert!(failed["consistent"] == true && failed["application_consistent"] == false, "{failed}");
    assert!(failed["quiesce_reason"].as_str().is_some_and(|r| r.contains("vm-0") && r.contains("exit")), "{failed}");

    ok(std::fs::write(&mode, "slow").map_err(Into::into));
    let slow = take("slow-quiesce", true);
    assert!(slow["consistent"] == true && slow["application_consistent"] == false, "{slow}");
    assert!(slow["quiesce_reason"].as_str().is_some_and(|r| r.contains("longer than")), "{slow}");
}
