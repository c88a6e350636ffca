//! What the two-site lab verified and measured, printed and written as
//! JSON (`--report FILE`). Scripts read `verified`, `checks`, `rpo_ms`,
//! `barrier_hold_ms`, `failover_tests`, `rto_s`,
//! `link_bytes_per_written_byte` and `duration_s`.

use serde_json::{json, Value};

/// One verification.
#[derive(Debug, Clone)]
pub struct Check {
    pub name: String,
    pub ok: bool,
    pub detail: String,
}

/// One failover test as the report lists it.
#[derive(Debug, Clone)]
pub struct TestRun {
    pub checkpoint: u64,
    /// From the start command to every export readable.
    pub start_s: f64,
    pub verified: bool,
}

/// What the ransomware stage found.
#[derive(Debug, Clone, Default)]
pub struct CleanPoint {
    pub expected: u64,
    pub found: u64,
    pub rounds: u64,
    pub alert_delay_s: f64,
}

/// The lab's report, filled in as it runs.
#[derive(Debug, Default)]
pub struct Report {
    pub checks: Vec<Check>,
    /// Recovery point seen while the workload ran: now minus the newest
    /// durable checkpoint's time, sampled.
    pub rpo_ms: Vec<u64>,
    /// The barrier's hold of the guests' writes, per consistent checkpoint.
    pub barrier_hold_ms: Vec<f64>,
    pub failover_tests: Vec<TestRun>,
    pub rto_s: Option<f64>,
    /// What the guests wrote (the lab's count).
    pub written_bytes: u64,
    /// What the source VDSAs' taps saw, and what they sent on the
    /// site-to-site link (the product's counts, initial sync included).
    pub tapped_bytes: u64,
    pub link_bytes: u64,
    pub write_seconds: f64,
    /// The ransomware stage: the last clean checkpoint before the attack,
    /// the one the clean-point search found, its rounds, and the seconds
    /// from the attack's start to the alert.
    pub clean_point: Option<CleanPoint>,
    /// Steps the lab does not run yet, with the reason.
    pub not_run: Vec<(String, String)>,
    pub duration_s: f64,
}

/// p50, p99 and max of `v` (zeros when empty).
fn spread(mut v: Vec<f64>) -> Value {
    if v.is_empty() {
        return json!({"p50": 0, "p99": 0, "max": 0, "samples": 0});
    }
    let mut at = |q: f64| crate::measure::percentile(&mut v, q);
    let (p50, p99, max) = (at(0.5), at(0.99), at(1.0));
    json!({"p50": p50, "p99": p99, "max": max, "samples": v.len()})
}

impl Report {
    /// Records a check and says it.
    pub fn check(&mut self, name: &str, ok: bool, detail: impl Into<String>) {
        let detail = detail.into();
        println!("  [{}] {name}: {detail}", if ok { "ok" } else { "FAILED" });
        self.checks.push(Check { name: name.to_string(), ok, detail });
    }

    pub fn verified(&self) -> bool {
        !self.checks.is_empty() && self.checks.iter().all(|c| c.ok)
    }

    pub fn link_bytes_per_written_byte(&self) -> f64 {
        if self.tapped_bytes == 0 {
            0.0
        } else {
            self.link_bytes as f64 / self.tapped_bytes as f64
        }
    }

    pub fn to_json(&self) -> Value {
        json!({
            "verified": self.verified(),
            "checks": self.checks.iter().map(|c| json!({"name": c.name, "ok": c.ok, "detail": c.detail})).collect::<Vec<_>>(),
            "rpo_ms": spread(self.rpo_ms.iter().map(|x| *x as f64).collect()),
            "barrier_hold_ms": spread(self.barrier_hold_ms.clone()),
            "failover_tests": self.failover_tests.iter()
                .map(|t| json!({"checkpoint": t.checkpoint, "start_s": t.start_s, "verified": t.verified}))
                .collect::<Vec<_>>(),
            "rto_s": self.rto_s,
            "written_bytes": self.written_bytes,
            "tapped_bytes": self.tapped_bytes,
            "link_bytes": self.link_bytes,
            "link_bytes_per_written_byte": self.link_bytes_per_written_byte(),
            "write_throughput_mib_s": if self.write_seconds > 0.0 {
                self.written_bytes as f64 / f64::from(1u32 << 20) / self.write_seconds
            } else { 0.0 },
            "clean_point": self.clean_point.as_ref().map(|c| json!({
                "expected": c.expected, "found": c.found, "rounds": c.rounds, "alert_delay_s": c.alert_delay_s,
            })),
            "not_run": self.not_run.iter().map(|(s, why)| json!({"step": s, "why": why})).collect::<Vec<_>>(),
            "duration_s": self.duration_s,
        })
    }

    /// The short summary at the end of a run.
    pub fn print_summary(&self) {
        let j = self.to_json();
        let passed = self.checks.iter().filter(|c| c.ok).count();
        println!("\nlab report");
        println!("  checks: {passed} of {} passed", self.checks.len());
        for c in self.checks.iter().filter(|c| !c.ok) {
            println!("    FAILED {}: {}", c.name, c.detail);
        }
        println!(
            "  RPO seen: p50 {} ms, p99 {} ms, max {} ms ({} samples)",
            j["rpo_ms"]["p50"], j["rpo_ms"]["p99"], j["rpo_ms"]["max"], j["rpo_ms"]["samples"]
        );
        println!(
            "  barrier hold: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            j["barrier_hold_ms"]["p50"].as_f64().unwrap_or(0.0),
            j["barrier_hold_ms"]["p99"].as_f64().unwrap_or(0.0),
            j["barrier_hold_ms"]["max"].as_f64().unwrap_or(0.0)
        );
        for t in &self.failover_tests {
            println!(
                "  failover test at checkpoint {}: exported in {:.3} s, {}",
                t.checkpoint,
                t.start_s,
                if t.verified { "verified" } else { "NOT verified" }
            );
        }
        if let Some(c) = &self.clean_point {
            println!(
                "  ransomware: alert {:.1} s after the attack began; clean-point search found {} (expected {}) in {} rounds",
                c.alert_delay_s, c.found, c.expected, c.rounds
            );
        }
        if let Some(rto) = self.rto_s {
            println!("  failover RTO (command to the first block read from the export): {:.3} s", rto);
        }
        println!(
            "  written {:.1} MiB by the guests ({:.0} MiB/s); the taps saw {:.1} MiB, the link carried {:.1} MiB \
             ({:.3} link bytes per written byte: dedup and compression)",
            self.written_bytes as f64 / 1048576.0,
            self.to_json()["write_throughput_mib_s"].as_f64().unwrap_or(0.0),
            self.tapped_bytes as f64 / 1048576.0,
            self.link_bytes as f64 / 1048576.0,
            self.link_bytes_per_written_byte()
        );
        for (step, why) in &self.not_run {
            println!("  not run: {step} ({why})");
        }
        println!("  duration: {:.1} s", self.duration_s);
        println!("  verified: {}", self.verified());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_failed_check_makes_the_report_unverified() {
        let mut r = Report::default();
        assert!(!r.verified(), "no check at all is not verified");
        r.check("a", true, "fine");
        assert!(r.verified());
        r.check("b", false, "broken");
        let j = r.to_json();
        assert_eq!(j["verified"], false);
        assert_eq!(j["checks"][1]["name"], "b");
        r.rpo_ms = vec![10, 30, 20];
        assert_eq!(r.to_json()["rpo_ms"]["max"], 30.0);
        assert_eq!(r.to_json()["rpo_ms"]["p50"], 20.0);
    }
}
