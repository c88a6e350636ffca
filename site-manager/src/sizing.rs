//! The sizing analyzer: from a change rate (typed in, or observed by the
//! VDSAs' taps for a VPG), the link bandwidth a target RPO needs and the
//! journal a target history needs, with and without compression
//! (docs/api.md, "Sizing").
//!
//! The rules, as the InMage/Cisco sizing guide puts them:
//! - the link must carry the peak change rate, averaged over windows as
//!   long as the RPO (a longer RPO smooths bursts): bandwidth = peak rate
//!   (× the compression ratio when the link compresses);
//! - the journal holds the history at the average rate: journal = average
//!   rate × history × (compression ratio when stored compressed) × (1 +
//!   the journal's metadata overhead).

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;

use protection_groups::VpgId;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The journal's metadata over its data (index, packs' headers, maps):
/// measured at under 1 % (docs/performance.md); 5 % leaves room.
pub const JOURNAL_OVERHEAD: f64 = 0.05;

/// What to size for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SizingRequest {
    /// A VPG whose observed change rate (and compression) to use where
    /// the rates below are not given.
    #[serde(default)]
    pub vpg: Option<VpgId>,
    /// The average change rate, bytes per second.
    #[serde(default)]
    pub average_bytes_per_sec: Option<f64>,
    /// The peak change rate over RPO-long windows, bytes per second (the
    /// average when neither this nor an observation is there).
    #[serde(default)]
    pub peak_bytes_per_sec: Option<f64>,
    /// Link bytes per written byte after dedup and compression (observed,
    /// else 0.5).
    #[serde(default)]
    pub compression_ratio: Option<f64>,
    pub rpo_secs: u64,
    pub history_secs: u64,
}

/// The answer, with the inputs it used and where each came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SizingAnswer {
    pub average_bytes_per_sec: f64,
    pub peak_bytes_per_sec: f64,
    pub compression_ratio: f64,
    /// `typed`, `observed` or `default`, per input, in the order above.
    pub sources: Vec<String>,
    pub bandwidth_bytes_per_sec: f64,
    pub bandwidth_with_compression_bytes_per_sec: f64,
    pub journal_bytes: f64,
    pub journal_with_compression_bytes: f64,
}

/// What the taps observed for a VPG.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Observed {
    pub average_bytes_per_sec: f64,
    pub peak_bytes_per_sec: f64,
    pub compression_ratio: Option<f64>,
}

/// The sizing for `req`, given what was observed (if anything).
pub fn size(req: &SizingRequest, observed: Option<Observed>) -> Result<SizingAnswer, String> {
    if req.rpo_secs == 0 || req.history_secs == 0 {
        return Err("rpo_secs and history_secs must be at least 1".into());
    }
    let pick = |typed: Option<f64>, seen: Option<f64>, default: Option<f64>| match (typed, seen, default) {
        (Some(t), _, _) => Some((t, "typed")),
        (None, Some(o), _) => Some((o, "observed")),
        (None, None, Some(d)) => Some((d, "default")),
        _ => None,
    };
    let (average, a_src) = pick(req.average_bytes_per_sec, observed.map(|o| o.average_bytes_per_sec), None)
        .ok_or("no change rate: give average_bytes_per_sec, or a VPG whose taps have been observed")?;
    let (peak, p_src) = pick(req.peak_bytes_per_sec, observed.map(|o| o.peak_bytes_per_sec), Some(average))
        .unwrap_or((average, "default"));
    let (ratio, c_src) =
        pick(req.compression_ratio, observed.and_then(|o| o.compression_ratio), Some(0.5)).unwrap_or((0.5, "default"));
    for (name, v) in [("average_bytes_per_sec", average), ("peak_bytes_per_sec", peak)] {
        if !v.is_finite() || v < 0.0 {
            return Err(format!("{name}: {v} is not a rate"));
        }
    }
    if !(ratio > 0.0 && ratio <= 1.0) {
        return Err(format!("compression_ratio: {ratio} is not in (0, 1]"));
    }
    if peak < average {
        return Err(format!("peak_bytes_per_sec {peak} is below the average {average}"));
    }
    let journal = average * req.history_secs as f64 * (1.0 + JOURNAL_OVERHEAD);
    Ok(SizingAnswer {
        average_bytes_per_sec: average,
        peak_bytes_per_sec: peak,
        compression_ratio: ratio,
        sources: vec![a_src.into(), p_src.into(), c_src.into()],
        bandwidth_bytes_per_sec: peak,
        bandwidth_with_compression_bytes_per_sec: peak * ratio,
        journal_bytes: journal,
        journal_with_compression_bytes: journal * ratio,
    })
}

/// One sample: (time in ms, bytes written, bytes on the link).
type RateSample = (u64, u64, u64);

/// Samples of each VPG's figures, taken every few seconds, an hour's
/// worth.
#[derive(Debug, Default)]
pub struct RateRecorder {
    samples: Mutex<BTreeMap<VpgId, VecDeque<RateSample>>>,
}

/// Samples kept per VPG (an hour at one every 10 s).
const KEEP: usize = 360;

impl RateRecorder {
    pub fn record(&self, vpg: VpgId, at_ms: u64, written: u64, link: u64) {
        if let Ok(mut s) = self.samples.lock() {
            let q = s.entry(vpg).or_default();
            // A restarted VDSA counts from zero: start the series again.
            if q.back().is_some_and(|&(_, w, _)| written < w) {
                q.clear();
            }
            q.push_back((at_ms, written, link));
            while q.len() > KEEP {
                q.pop_front();
            }
        }
    }

    /// The average over the samples, the peak over windows of `window_secs`
    /// (at least one sampling interval), and link bytes per written byte.
    pub fn observed(&self, vpg: VpgId, window_secs: u64) -> Option<Observed> {
        let s = self.samples.lock().ok()?;
        let q = s.get(&vpg)?;
        let (first, last) = (q.front()?, q.back()?);
        let span = last.0.saturating_sub(first.0) as f64 / 1000.0;
        if span <= 0.0 {
            return None;
        }
        let written = last.1.saturating_sub(first.1) as f64;
        let average = written / span;
        let mut peak = average;
        let window_ms = window_secs.saturating_mul(1000);
        for (i, a) in q.iter().enumerate() {
            // The shortest stretch from `a` that spans the window.
            if let Some(b) = q.iter().skip(i + 1).find(|b| b.0.saturating_sub(a.0) >= window_ms) {
                let secs = b.0.saturating_sub(a.0) as f64 / 1000.0;
                peak = peak.max(b.1.saturating_sub(a.1) as f64 / secs);
            }
        }
        let link = last.2.saturating_sub(first.2) as f64;
        let ratio = (written > 0.0 && link > 0.0).then(|| (link / written).min(1.0));
        Some(Observed { average_bytes_per_sec: average, peak_bytes_per_sec: peak, compression_ratio: ratio })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(average: Option<f64>, peak: Option<f64>, ratio: Option<f64>) -> SizingRequest {
        SizingRequest {
            vpg: None,
            average_bytes_per_sec: average,
            peak_bytes_per_sec: peak,
            compression_ratio: ratio,
            rpo_secs: 10,
            history_secs: 4 * 3600,
        }
    }

    #[test]
    fn a_typed_rate_is_sized_as_by_hand() {
        // 10 MB/s on average, 25 MB/s at peak, compression to half, 4 h:
        // the link carries the peak, 25 MB/s (200 Mbit/s), 12.5 MB/s
        // compressed; the journal holds 10 MB/s × 14,400 s × 1.05 =
        // 151.2 GB, 75.6 GB compressed.
        let a = size(&req(Some(10e6), Some(25e6), Some(0.5)), None).expect("an answer");
        assert_eq!(a.bandwidth_bytes_per_sec, 25e6);
        assert_eq!(a.bandwidth_with_compression_bytes_per_sec, 12.5e6);
        assert!((a.journal_bytes - 151.2e9).abs() < 1.0, "{}", a.journal_bytes);
        assert!((a.journal_with_compression_bytes - 75.6e9).abs() < 1.0);
        assert_eq!(a.sources, vec!["typed", "typed", "typed"]);
        // Without a peak or a ratio: the average and the default ratio.
        let a = size(&req(Some(10e6), None, None), None).expect("an answer");
        assert_eq!((a.bandwidth_bytes_per_sec, a.compression_ratio), (10e6, 0.5));
        assert_eq!(a.sources, vec!["typed", "default", "default"]);
        assert!(size(&req(None, None, None), None).is_err_and(|e| e.contains("no change rate")));
        assert!(size(&req(Some(1.0), Some(0.5), None), None).is_err());
        assert!(size(&req(Some(1.0), None, Some(1.5)), None).is_err());
    }

    #[test]
    fn observed_rates_come_from_the_samples() {
        let r = RateRecorder::default();
        let v = VpgId::new();
        // 1 MB/s for 60 s, then 5 MB/s for 10 s; the link carried 40 %.
        let mut w = 0u64;
        for s in 0..=60u64 {
            r.record(v, s * 1000, w, w * 2 / 5);
            w += 1_000_000;
        }
        w -= 1_000_000;
        for s in 61..=70u64 {
            w += 5_000_000;
            r.record(v, s * 1000, w, w * 2 / 5);
        }
        let o = r.observed(v, 10).expect("observed");
        assert!((o.average_bytes_per_sec - 110e6 / 70.0).abs() < 1.0, "{o:?}");
        assert!((o.peak_bytes_per_sec - 5e6).abs() < 1.0, "{o:?}");
        assert!(o.compression_ratio.is_some_and(|c| (c - 0.4).abs() < 1e-3));
        // A restarted VDSA's counter restarts the series.
        r.record(v, 71_000, 10, 4);
        assert!(r.observed(v, 10).is_none());
    }
}
