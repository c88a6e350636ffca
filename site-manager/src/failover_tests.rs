//! Failover tests as the site manager starts and stops them, for the API
//! (`crate::api::failover_tests`) and the clean-point search
//! (`crate::clean_point`): records in the store that the reconciler turns
//! into processing stacks at the recovery VDSAs (docs/recovery.md).

use crate::model::{CompletionCode, FailoverTest, StackPurpose, Task, TaskDriver, TestResult, TestState, Vpg};
use crate::state::SiteManager;
use crate::store::StoreError;
use protection_groups::CheckpointId;

/// Starts a test of `v` at each of `checkpoints` (checked by the caller)
/// under one task, which ends when every one is exported.
pub fn start(
    sm: &SiteManager,
    v: &Vpg,
    checkpoints: &[CheckpointId],
    what: String,
) -> Result<(Task, Vec<FailoverTest>), StoreError> {
    let task = sm.start_task("failover_test", what, Some(v.id), None, TaskDriver::Vdsa)?;
    let tests: Vec<FailoverTest> =
        checkpoints.iter().map(|&cp| FailoverTest::starting(StackPurpose::Test, v, cp, task.id)).collect();
    sm.with_store(|s| tests.iter().try_for_each(|t| s.tests.put(t.id.as_bytes(), t)))?;
    sm.changed();
    Ok((task, tests))
}

/// Stops a serving test with its verdict (the caller checked it serves and
/// is a test): its overlays are freed, its record kept; returns the task
/// that ends when every recovery VDSA has discarded it, and the record.
pub fn stop(
    sm: &SiteManager,
    mut t: FailoverTest,
    result: TestResult,
    notes: String,
) -> Result<(Task, FailoverTest), StoreError> {
    let task = sm.start_task(
        "stop_failover_test",
        format!("stop the failover test of VPG {:?} at {}", t.vpg_name, t.checkpoint),
        Some(t.vpg),
        None,
        TaskDriver::Vdsa,
    )?;
    if t.state == TestState::Starting {
        // Stopped before it ran: its start task ends with it.
        sm.finish_task(
            t.start_task,
            CompletionCode::Aborted,
            serde_json::json!({"test": t.id}),
            Some("stopped before it ran".into()),
        )?;
    }
    t.state = TestState::Stopping;
    t.result = Some(result);
    t.notes = notes;
    t.stop_task = Some(task.id);
    sm.with_store(|s| s.tests.put(t.id.as_bytes(), &t))?;
    sm.changed();
    Ok((task, t))
}
