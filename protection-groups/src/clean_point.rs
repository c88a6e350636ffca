//! The clean-point search (docs/architecture.md, "The clean-point
//! search"): over a VPG's checkpoints, oldest first, find the newest one
//! whose check passes with the next one failing, testing up to `k`
//! checkpoints side by side each round. With a check that passes before
//! an attack and fails after it, n checkpoints narrow to one in about
//! log_(k+1)(n + 1) rounds.
//!
//! A check may be flaky (a crash-consistent guest that fails to boot
//! once): with `repeats` 3 a checkpoint's verdict is the best two of three
//! runs (two runs, and a third only when they disagree). The search keeps
//! every run and verdict, and says when the verdicts are not monotonic (a
//! pass after a fail: dormant malware, or a flaky check): it then trusts
//! the fails and searches below the oldest one.
//!
//! This is the decision logic only; whoever runs the tests (the site
//! manager, a benchmark) asks it what to test next.

use crate::CheckpointId;
use serde::{Deserialize, Serialize};

/// One run's, or one checkpoint's, verdict.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Pass,
    Fail,
}

/// What the search found.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "outcome")]
pub enum Outcome {
    /// The newest passing checkpoint, and the next one, which fails.
    Found { clean: CheckpointId, first_failing: CheckpointId },
    /// The newest checkpoint of the range passes.
    NoFailingPoint { newest: CheckpointId },
    /// The oldest checkpoint of the range fails.
    NoPassingPoint { oldest: CheckpointId },
}

/// A checkpoint tested, with its runs and verdict.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TestedPoint {
    pub checkpoint: CheckpointId,
    pub runs: Vec<Verdict>,
    /// None while more runs are needed.
    pub verdict: Option<Verdict>,
    /// The round of its first run (1-based).
    pub round: u32,
}

/// The search's state.
#[derive(Debug, Clone)]
pub struct CleanPointSearch {
    points: Vec<CheckpointId>,
    k: usize,
    repeats: u8,
    /// Index of the newest known pass (-1: none), and of the oldest known
    /// fail (`points.len()`: none).
    lo: isize,
    hi: isize,
    tested: Vec<(usize, TestedPoint)>,
    rounds: u32,
}

impl CleanPointSearch {
    /// A search over `points` (oldest first, at least one), `k` tests at a
    /// time (1 to 16), each verdict from 1 run or the best 2 of 3.
    pub fn new(mut points: Vec<CheckpointId>, k: usize, repeats: u8) -> Result<CleanPointSearch, String> {
        points.sort();
        points.dedup();
        if points.is_empty() {
            return Err("no checkpoint in the range".into());
        }
        if !(1..=16).contains(&k) {
            return Err(format!("k is {k}: 1 to 16 tests at a time"));
        }
        if repeats != 1 && repeats != 3 {
            return Err(format!("repeats is {repeats}: 1, or 3 (best two of three)"));
        }
        let n = points.len() as isize;
        Ok(CleanPointSearch { points, k, repeats, lo: -1, hi: n, tested: Vec::new(), rounds: 0 })
    }

    /// Rounds started so far.
    pub fn rounds(&self) -> u32 {
        self.rounds
    }

    /// The checkpoints to run the check on in the next round (at most k;
    /// one entry per run, so a checkpoint may appear twice when it needs two
    /// runs); empty once the search is done.
    pub fn next_round(&mut self) -> Vec<CheckpointId> {
        if self.outcome().is_some() {
            return Vec::new();
        }
        let mut out = Vec::new();
        // Checkpoints still short of their verdict first.
        for (_, t) in self.tested.iter().filter(|(_, t)| t.verdict.is_none()) {
            for _ in 0..self.runs_needed(&t.runs) {
                if out.len() < self.k {
                    out.push(t.checkpoint);
                }
            }
        }
        // Then new checkpoints spread evenly over the open range.
        let undecided: Vec<usize> = self.tested.iter().filter(|(_, t)| t.verdict.is_none()).map(|(i, _)| *i).collect();
        // Both first runs of a point in one round, when k leaves room.
        let per_point = if self.repeats == 3 && self.k >= 2 { 2 } else { 1 };
        let free = (self.k - out.len()) / per_point;
        let candidates: Vec<usize> = ((self.lo + 1)..self.hi)
            .map(|i| i as usize)
            .filter(|i| !undecided.contains(i) && !self.tested.iter().any(|(j, _)| j == i))
            .collect();
        let m = candidates.len();
        let j = free.min(m);
        let round = self.rounds + 1;
        for s in 0..j {
            let pick = candidates[((s + 1) * (m + 1) / (j + 1)).saturating_sub(1).min(m - 1)];
            if self.tested.iter().any(|(i, _)| *i == pick) {
                continue;
            }
            self.tested
                .push((pick, TestedPoint { checkpoint: self.points[pick], runs: Vec::new(), verdict: None, round }));
            for _ in 0..per_point {
                out.push(self.points[pick]);
            }
        }
        if !out.is_empty() {
            self.rounds = round;
        }
        out
    }

    fn runs_needed(&self, runs: &[Verdict]) -> usize {
        match (self.repeats, runs) {
            (1, []) => 1,
            (3, []) => 2,
            (3, [_]) => 1,
            (3, [a, b]) if a != b => 1,
            _ => 0,
        }
    }

    /// One run of the check at `checkpoint` (runs beyond those needed are
    /// ignored).
    pub fn record(&mut self, checkpoint: CheckpointId, verdict: Verdict) {
        let repeats = self.repeats;
        let Some((i, t)) = self.tested.iter_mut().find(|(_, t)| t.checkpoint == checkpoint) else { return };
        if t.verdict.is_some() {
            return;
        }
        t.runs.push(verdict);
        let pass = t.runs.iter().filter(|v| **v == Verdict::Pass).count();
        let fail = t.runs.len() - pass;
        t.verdict = match repeats {
            1 => Some(verdict),
            _ if pass >= 2 => Some(Verdict::Pass),
            _ if fail >= 2 => Some(Verdict::Fail),
            _ => None,
        };
        let (i, decided) = (*i as isize, t.verdict);
        match decided {
            Some(Verdict::Fail) if i < self.hi => {
                self.hi = i;
                if self.lo >= self.hi {
                    // A pass above a fail: trust the fail, and the newest
                    // pass below it.
                    self.lo = self.newest_pass_below(self.hi);
                }
            }
            Some(Verdict::Pass) if i > self.lo && i < self.hi => self.lo = i,
            _ => {}
        }
    }

    fn newest_pass_below(&self, hi: isize) -> isize {
        self.tested
            .iter()
            .filter(|(i, t)| (*i as isize) < hi && t.verdict == Some(Verdict::Pass))
            .map(|(i, _)| *i as isize)
            .max()
            .unwrap_or(-1)
    }

    /// The answer, once the range has narrowed to it.
    pub fn outcome(&self) -> Option<Outcome> {
        if self.hi != self.lo + 1 {
            return None;
        }
        let n = self.points.len() as isize;
        Some(if self.lo < 0 {
            Outcome::NoPassingPoint { oldest: self.points[0] }
        } else if self.hi >= n {
            Outcome::NoFailingPoint { newest: self.points[(n - 1) as usize] }
        } else {
            Outcome::Found { clean: self.points[self.lo as usize], first_failing: self.points[self.hi as usize] }
        })
    }

    /// Every checkpoint tested, oldest first.
    pub fn map(&self) -> Vec<TestedPoint> {
        let mut m: Vec<TestedPoint> = self.tested.iter().map(|(_, t)| t.clone()).collect();
        m.sort_by_key(|t| t.checkpoint);
        m
    }

    /// False when a checkpoint passed after an older one failed.
    pub fn monotonic(&self) -> bool {
        let mut failed = false;
        for t in self.map() {
            match t.verdict {
                Some(Verdict::Fail) => failed = true,
                Some(Verdict::Pass) if failed => return false,
                _ => {}
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn points(n: u64) -> Vec<CheckpointId> {
        (1..=n).map(CheckpointId).collect()
    }

    /// Runs the search with `check`; returns the outcome and rounds.
    fn run(n: u64, k: usize, repeats: u8, mut check: impl FnMut(u64) -> Verdict) -> (Outcome, u32, bool) {
        let mut s = CleanPointSearch::new(points(n), k, repeats).unwrap_or_else(|e| panic!("{e}"));
        loop {
            let round = s.next_round();
            if round.is_empty() {
                break;
            }
            assert!(round.len() <= k, "{round:?} is more than {k} tests");
            for cp in round {
                s.record(cp, check(cp.0));
            }
            assert!(s.rounds() < 100, "no end");
        }
        (s.outcome().unwrap_or_else(|| panic!("no outcome")), s.rounds(), s.monotonic())
    }

    #[test]
    fn the_search_finds_the_last_clean_point_in_log_k_plus_1_rounds() {
        for (n, k, most) in [(10_000u64, 4usize, 6u32), (10_000, 1, 14), (100, 4, 3), (7, 1, 3), (1, 4, 1)] {
            for attack in [1, 2, n / 3 + 1, (n / 2).max(1), n] {
                let (o, rounds, mono) = run(n, k, 1, |cp| if cp < attack { Verdict::Pass } else { Verdict::Fail });
                let want = if attack == 1 {
                    Outcome::NoPassingPoint { oldest: CheckpointId(1) }
                } else if attack > n {
                    Outcome::NoFailingPoint { newest: CheckpointId(n) }
                } else {
                    Outcome::Found { clean: CheckpointId(attack - 1), first_failing: CheckpointId(attack) }
                };
                assert_eq!(o, want, "n {n} k {k} attack {attack}");
                assert!(rounds <= most, "n {n} k {k} attack {attack}: {rounds} rounds, at most {most}");
                assert!(mono);
            }
        }
    }

    #[test]
    fn a_check_that_always_passes_or_always_fails_gives_a_clear_answer() {
        let (o, _, _) = run(500, 4, 1, |_| Verdict::Pass);
        assert_eq!(o, Outcome::NoFailingPoint { newest: CheckpointId(500) });
        let (o, _, _) = run(500, 4, 1, |_| Verdict::Fail);
        assert_eq!(o, Outcome::NoPassingPoint { oldest: CheckpointId(1) });
    }

    #[test]
    fn a_flaky_check_is_outvoted_and_a_pass_after_a_fail_is_reported() {
        // Clean up to 300; the check fails once in a while on clean points.
        let mut calls = 0u64;
        let (o, _, mono) = run(1000, 4, 3, |cp| {
            calls += 1;
            // A clean point fails one run in seven.
            if cp <= 300 && !calls.is_multiple_of(7) {
                Verdict::Pass
            } else {
                Verdict::Fail
            }
        });
        assert_eq!(o, Outcome::Found { clean: CheckpointId(300), first_failing: CheckpointId(301) });
        assert!(mono);
        // Dormant malware: bad from 200, looks clean again from 600.
        let (o, _, mono) = run(1000, 4, 1, |cp| if (200..600).contains(&cp) { Verdict::Fail } else { Verdict::Pass });
        assert!(!mono, "the map says it is not monotonic");
        assert_eq!(o, Outcome::Found { clean: CheckpointId(199), first_failing: CheckpointId(200) }, "{o:?}");
    }
}
