//! The clean-point search as a task on a VPG (docs/architecture.md, "The
//! clean-point search"): each round starts failover tests at the
//! checkpoints `protection_groups::clean_point` picks, runs the check on
//! each (a command on this host that reads the test's exports), stops
//! each test with the check's verdict, and narrows the range. Every
//! round, test and verdict is kept in the task's result (its progress
//! while it runs) and in the VPG's test records; the answer is a
//! checkpoint an operator can fail over to in one step.
//!
//! The check gets the test's exports in its environment:
//! `CLEAN_POINT_CHECKPOINT` (the id), `CLEAN_POINT_EXPORTS` (the disks'
//! NBD URIs, space-separated, in the VPG's disk order) and
//! `CLEAN_POINT_TEST` (the test's id). Exit 0 passes; anything else, or
//! running past the per-test timeout, fails.

use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use protection_groups::clean_point::{CleanPointSearch, Outcome, TestedPoint, Verdict};
use protection_groups::CheckpointId;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::model::{CompletionCode, TaskDriver, TestResult, TestState, Vpg};
use crate::state::SiteManager;

/// What to search and how (`POST /vpgs/{id}/clean-point-search`).
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CleanPointRequest {
    /// The oldest checkpoint of the range (default: the oldest held).
    #[serde(default)]
    pub from: Option<u64>,
    /// The newest (default: the newest held; give the alert's first
    /// checkpoint to search back from an attack).
    #[serde(default)]
    pub to: Option<u64>,
    /// Tests at a time, 1 to 16 (default 4).
    #[serde(default = "default_k")]
    pub k: usize,
    /// 1, or 3: each verdict is the best two of three runs.
    #[serde(default = "default_repeats")]
    pub repeats: u8,
    /// The check: a program and its arguments, run on the site manager's
    /// host for each test.
    pub check: Vec<String>,
    /// Seconds a test may take to start and its check to run (default 600).
    #[serde(default = "default_timeout")]
    pub test_timeout_secs: u64,
}

fn default_k() -> usize {
    4
}
fn default_repeats() -> u8 {
    1
}
fn default_timeout() -> u64 {
    600
}

/// The task's result, as it grows.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CleanPointProgress {
    pub range: (CheckpointId, CheckpointId),
    pub checkpoints_in_range: usize,
    pub k: usize,
    pub rounds: u32,
    /// Every checkpoint tested, oldest first, with its runs and verdict.
    pub map: Vec<TestedPoint>,
    /// False when a checkpoint passed after an older one failed (dormant
    /// malware, or a flaky check): the answer trusts the fails.
    pub monotonic: bool,
    /// Set when the search is done.
    pub outcome: Option<Outcome>,
    /// In words: the answer, or what happened.
    pub summary: String,
}

/// Checks the request against the VPG's testable checkpoints and starts
/// the search's task and its thread.
pub fn start(sm: &Arc<SiteManager>, v: &Vpg, req: CleanPointRequest) -> Result<crate::model::Task, String> {
    if req.check.is_empty() || req.check[0].is_empty() {
        return Err("check: a program and its arguments".into());
    }
    if !(1..=16).contains(&req.k) {
        return Err(format!("k: 1 to 16 tests at a time, not {}", req.k));
    }
    let (targets, testable) = sm.links.testable_checkpoints(v.id);
    if targets == 0 {
        return Err(format!("VPG {:?} has no recovery VDSA of this site serving its journal", v.settings.name));
    }
    let points: Vec<CheckpointId> =
        testable.into_iter().filter(|c| req.from.is_none_or(|f| c.0 >= f) && req.to.is_none_or(|t| c.0 <= t)).collect();
    let search = CleanPointSearch::new(points.clone(), req.k, req.repeats)?;
    let range = (points[0], points[points.len() - 1]);
    let task = sm
        .start_task(
            "clean_point_search",
            format!(
                "clean-point search of VPG {:?} over {} checkpoints ({} to {}), {} at a time",
                v.settings.name,
                points.len(),
                range.0,
                range.1,
                req.k
            ),
            Some(v.id),
            None,
            TaskDriver::SiteManager,
        )
        .map_err(|e| e.to_string())?;
    let progress = CleanPointProgress {
        range,
        checkpoints_in_range: points.len(),
        k: req.k,
        rounds: 0,
        map: Vec::new(),
        monotonic: true,
        outcome: None,
        summary: "starting".into(),
    };
    let (sm2, v2, id, mut progress) = (sm.clone(), v.clone(), task.id, progress);
    std::thread::Builder::new()
        .name("clean-point-search".into())
        .spawn(move || {
            let r = run(&sm2, &v2, id, &req, search, &mut progress);
            let result = serde_json::to_value(&progress).unwrap_or_default();
            let (code, why) = match r {
                Ok(()) => (CompletionCode::Success, None),
                Err(why) => (CompletionCode::Failed, Some(why)),
            };
            if let Err(e) = sm2.finish_task(id, code, result, why) {
                tracing::error!(task = %id, "cannot finish the clean-point search's task: {e}");
            }
        })
        .map_err(|e| format!("starting the search: {e}"))?;
    Ok(task)
}

fn run(
    sm: &SiteManager,
    v: &Vpg,
    task: Uuid,
    req: &CleanPointRequest,
    mut search: CleanPointSearch,
    p: &mut CleanPointProgress,
) -> Result<(), String> {
    let timeout = Duration::from_secs(req.test_timeout_secs.max(1));
    loop {
        let round = search.next_round();
        if round.is_empty() {
            break;
        }
        p.rounds = search.rounds();
        p.summary = format!("round {}: testing {}", p.rounds, list(&round));
        publish(sm, task, p, &search);
        let verdicts = run_round(sm, v, task, p.rounds, &round, &req.check, timeout)?;
        for (cp, verdict) in verdicts {
            search.record(cp, verdict);
        }
        p.map = search.map();
        p.monotonic = search.monotonic();
    }
    p.outcome = search.outcome();
    p.map = search.map();
    p.monotonic = search.monotonic();
    p.summary = match &p.outcome {
        Some(Outcome::Found { clean, first_failing }) => format!(
            "the last clean checkpoint is {clean} (the check fails from {first_failing} on){}; fail over to it with \
             POST /api/v1/vpgs/{}/failover {{\"checkpoint\": {}}}",
            if p.monotonic {
                ""
            } else {
                ", but the map is not monotonic: a checkpoint passed after an older one failed"
            },
            v.id.0,
            clean.0
        ),
        Some(Outcome::NoFailingPoint { newest }) => {
            format!("no failing point in the range: the newest checkpoint {newest} passes the check")
        }
        Some(Outcome::NoPassingPoint { oldest }) => {
            format!("no passing point in the range: even the oldest checkpoint {oldest} fails the check")
        }
        None => "the search ended without an answer".into(),
    };
    Ok(())
}

fn list(cps: &[CheckpointId]) -> String {
    cps.iter().map(|c| c.0.to_string()).collect::<Vec<_>>().join(", ")
}

fn publish(sm: &SiteManager, task: Uuid, p: &CleanPointProgress, search: &CleanPointSearch) {
    // Progress: rounds against about log_(k+1)(n + 1), capped below done.
    let expected = ((p.checkpoints_in_range as f64 + 1.0).ln() / ((p.k as f64) + 1.0).ln()).ceil().max(1.0);
    let pct = ((f64::from(search.rounds()) / expected) * 100.0).min(95.0) as u8;
    let result = serde_json::to_value(p).unwrap_or_default();
    let _ = sm.update_task(task, |t| {
        t.progress = pct;
        t.result = result;
    });
}

/// One round: a failover test per run, started together; the check on
/// each once it runs; each stopped with its verdict.
fn run_round(
    sm: &SiteManager,
    v: &Vpg,
    task: Uuid,
    round: u32,
    cps: &[CheckpointId],
    check: &[String],
    timeout: Duration,
) -> Result<Vec<(CheckpointId, Verdict)>, String> {
    let what =
        format!("clean-point search round {round}: failover tests of VPG {:?} at {}", v.settings.name, list(cps));
    let (_, tests) = crate::failover_tests::start(sm, v, cps, what).map_err(|e| e.to_string())?;
    let order: Vec<protection_groups::DiskId> =
        v.settings.vms.iter().flat_map(|vm| vm.disks.iter().map(|d| d.id)).collect();
    let results: Vec<(CheckpointId, Verdict, String)> = std::thread::scope(|scope| {
        let handles: Vec<_> = tests
            .iter()
            .map(|t| {
                let (id, cp, order) = (t.id, t.checkpoint, &order);
                scope.spawn(move || one_test(sm, id, cp, order, check, timeout, task))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or((CheckpointId(0), Verdict::Fail, "check panicked".into())))
            .collect()
    });
    for (t, (_, verdict, notes)) in tests.iter().zip(&results) {
        stop(sm, t.id, *verdict, notes);
    }
    Ok(results.into_iter().map(|(cp, v, _)| (cp, v)).collect())
}

/// Waits for test `id` to run, runs the check on it; the verdict and what
/// the check said.
fn one_test(
    sm: &SiteManager,
    id: protection_groups::StackId,
    cp: CheckpointId,
    order: &[protection_groups::DiskId],
    check: &[String],
    timeout: Duration,
    task: Uuid,
) -> (CheckpointId, Verdict, String) {
    let deadline = Instant::now() + timeout;
    let test = loop {
        match sm.with_store(|s| s.tests.get(id.as_bytes())) {
            Ok(Some(t)) if t.state == TestState::Running && !t.exports.is_empty() => break t,
            Ok(Some(t)) if t.state == TestState::Failed => {
                return (cp, Verdict::Fail, format!("the test could not start: {}", t.detail))
            }
            Ok(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(200)),
            Ok(_) => return (cp, Verdict::Fail, "the test did not start in time".into()),
            Err(e) => return (cp, Verdict::Fail, format!("reading the test: {e}")),
        }
    };
    let mut exports = test.exports.clone();
    exports.sort_by_key(|e| order.iter().position(|d| *d == e.disk).unwrap_or(usize::MAX));
    let uris: Vec<String> = exports.into_iter().map(|e| e.uri).collect();
    let mut cmd = Command::new(&check[0]);
    cmd.args(&check[1..])
        .env("CLEAN_POINT_CHECKPOINT", cp.0.to_string())
        .env("CLEAN_POINT_EXPORTS", uris.join(" "))
        .env("CLEAN_POINT_TEST", id.0.to_string())
        .env("CLEAN_POINT_TASK", task.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: prctl in the forked child before exec touches no memory of
    // ours; it has the kernel SIGKILL the check if the thread that started
    // it dies (the site manager killed mid-search), so no check outlives it.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return (cp, Verdict::Fail, format!("the check {:?} did not start: {e}", check[0])),
    };
    let mut out = child.stdout.take();
    let mut err = child.stderr.take();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        if let Some(o) = out.as_mut() {
            let _ = o.take(8 << 10).read_to_string(&mut text);
        }
        if let Some(e) = err.as_mut() {
            let _ = e.take(8 << 10).read_to_string(&mut text);
        }
        text
    });
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
        }
    };
    let said = reader.join().unwrap_or_default();
    match status {
        Some(s) if s.success() => (cp, Verdict::Pass, format!("check passed: {}", said.trim())),
        Some(s) => (cp, Verdict::Fail, format!("check failed ({s}): {}", said.trim())),
        None => (cp, Verdict::Fail, "check ran past the test timeout and was killed".into()),
    }
}

/// Stops a test with the check's verdict (as `POST /failover-tests/{id}/stop`).
fn stop(sm: &SiteManager, id: protection_groups::StackId, verdict: Verdict, notes: &str) {
    let r = sm.with_store(|s| s.tests.get(id.as_bytes())).and_then(|t| match t {
        Some(t) if t.serves() => {
            let result = if verdict == Verdict::Pass { TestResult::Pass } else { TestResult::Fail };
            let notes = format!("clean-point search: {}", notes.chars().take(4000).collect::<String>());
            crate::failover_tests::stop(sm, t, result, notes).map(|_| ())
        }
        _ => Ok(()),
    });
    if let Err(e) = r {
        tracing::error!(test = %id, "cannot stop a clean-point search's test: {e}");
    }
}
