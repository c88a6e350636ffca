//! The health report: per VPG and UTC day, the data its VMs changed (as
//! written, and as sent after dedup and compression), the RPO at its
//! worst, the time spent over the RPO threshold, the consistent points
//! taken, and the journal history available against the policy; as JSON
//! and CSV (docs/api.md, "Health report").
//!
//! The running figures are accumulated from the samples the site manager
//! takes every 10 s (`crate::metrics::run_sampler`) and kept in the store,
//! so a restart loses at most one sample; checkpoints are counted from
//! the checkpoint store when the report is asked for.

use protection_groups::VpgId;

use crate::model::{HealthDay, VpgStats};
use crate::store::{Store, StoreError};

/// `YYYY-MM-DD` of a time in ms since the epoch (UTC).
pub fn day_of(ms: u64) -> String {
    let (y, m, d) = crate::model::civil_date(ms / 86_400_000);
    format!("{y:04}-{m:02}-{d:02}")
}

fn key(vpg: VpgId, day: &str) -> Vec<u8> {
    let mut k = vpg.as_bytes().to_vec();
    k.extend_from_slice(day.as_bytes());
    k
}

/// Adds one sample (`interval_secs` long) of `stats` to its day.
pub fn record(s: &Store, stats: &VpgStats, interval_secs: u64) -> Result<(), StoreError> {
    let day = day_of(stats.at_ms);
    let k = key(stats.vpg, &day);
    let mut h = s.health.get(&k)?.unwrap_or(HealthDay {
        vpg: stats.vpg,
        day,
        written_bytes: 0,
        link_bytes: 0,
        max_rpo_ms: 0,
        over_threshold_secs: 0,
        sampled_secs: 0,
        consistent_points: 0,
        history_available_secs: 0,
        history_policy_secs: stats.history_policy_secs,
        last_written_counter: None,
        last_link_counter: None,
    });
    // A restarted VDSA counts from zero: its first sample adds nothing.
    if let (Some(w), Some(l)) = (h.last_written_counter, h.last_link_counter) {
        if stats.written_bytes >= w && stats.link_bytes >= l {
            h.written_bytes += stats.written_bytes - w;
            h.link_bytes += stats.link_bytes - l;
        }
    }
    h.last_written_counter = Some(stats.written_bytes);
    h.last_link_counter = Some(stats.link_bytes);
    if let Some(rpo) = stats.rpo_ms {
        h.max_rpo_ms = h.max_rpo_ms.max(rpo);
        if rpo > stats.rpo_threshold_ms {
            h.over_threshold_secs += interval_secs;
        }
    }
    h.sampled_secs += interval_secs;
    h.history_available_secs = stats.history_available_secs;
    h.history_policy_secs = stats.history_policy_secs;
    s.health.put_unflushed(&k, &h)
}

/// The report of `vpg`, oldest day first, with the checkpoints counted
/// per day.
pub fn report(s: &Store, vpg: VpgId) -> Result<Vec<HealthDay>, StoreError> {
    let mut days = s.health.list_prefix(vpg.as_bytes())?;
    let checkpoints = s.checkpoints.list_prefix(vpg.as_bytes())?;
    let mut points: std::collections::HashMap<String, u64> = std::collections::HashMap::new();
    for c in checkpoints.iter().filter(|c| c.consistent) {
        *points.entry(day_of(c.time_ms)).or_default() += 1;
    }
    for d in &mut days {
        d.consistent_points = points.get(&d.day).copied().unwrap_or(0);
    }
    Ok(days)
}

/// The report as CSV, a header line first.
pub fn csv(days: &[HealthDay]) -> String {
    let mut out = String::from(
        "vpg,day,written_bytes,link_bytes,max_rpo_ms,over_threshold_secs,sampled_secs,consistent_points,\
         history_available_secs,history_policy_secs\n",
    );
    for d in days {
        out.push_str(&format!(
            "{},{},{},{},{},{},{},{},{},{}\n",
            d.vpg.0,
            d.day,
            d.written_bytes,
            d.link_bytes,
            d.max_rpo_ms,
            d.over_threshold_secs,
            d.sampled_secs,
            d.consistent_points,
            d.history_available_secs,
            d.history_policy_secs
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_are_utc_calendar_days() {
        assert_eq!(day_of(0), "1970-01-01");
        assert_eq!(day_of(951_782_400_000), "2000-02-29");
        assert_eq!(day_of(1_795_737_600_000 - 1), "2026-11-26");
        assert_eq!(day_of(1_795_737_600_000), "2026-11-27");
    }

    #[test]
    fn samples_add_up_per_day() {
        let dir = tempfile::tempdir().expect("a folder");
        let (s, _) = Store::open(dir.path()).expect("a store");
        let v = VpgId::new();
        let at = 1_795_737_600_000;
        let stats = |i: u64, written: u64, rpo: u64| VpgStats {
            rpo_ms: Some(rpo),
            rpo_threshold_ms: 5000,
            written_bytes: written,
            link_bytes: written / 2,
            history_policy_secs: 3600,
            at_ms: at + i * 10_000,
            ..VpgStats::empty(v)
        };
        for (i, (w, rpo)) in [(100, 1000), (300, 7000), (600, 2000), (50, 9000), (150, 1000)].iter().enumerate() {
            record(&s, &stats(i as u64, *w, *rpo), 10).expect("a sample");
        }
        let r = report(&s, v).expect("a report");
        assert_eq!(r.len(), 1);
        let d = &r[0];
        // 200 + 300, then a restart (50 < 600) adds nothing, then 100.
        assert_eq!((d.written_bytes, d.link_bytes), (600, 300));
        assert_eq!((d.max_rpo_ms, d.over_threshold_secs, d.sampled_secs), (9000, 20, 50));
        assert!(csv(&r).lines().nth(1).is_some_and(|l| l.contains(",2026-11-27,600,300,9000,20,50,0,0,3600")));
    }
}
