//! The checkpoint barrier's hold times since the site manager started:
//! the coordinator observes each barrier, the metrics render them as a
//! Prometheus histogram (`vdsa_barrier_hold_seconds`).

use std::sync::atomic::{AtomicU64, Ordering};

/// The barrier's hold times, in seconds: the histogram's upper bounds.
const HOLD_BUCKETS: [f64; 10] = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1.0];

/// A histogram of the barrier's hold times since the site manager
/// started (counts per bucket, not cumulative; summed when rendered).
#[derive(Debug)]
pub struct HoldHistogram {
    buckets: [AtomicU64; HOLD_BUCKETS.len()],
    over: AtomicU64,
    sum_us: AtomicU64,
    count: AtomicU64,
}

impl Default for HoldHistogram {
    fn default() -> Self {
        HoldHistogram::new()
    }
}

/// The process's barrier hold times (one site manager per process).
pub static BARRIER_HOLD: HoldHistogram = HoldHistogram::new();

impl HoldHistogram {
    pub const fn new() -> Self {
        HoldHistogram {
            buckets: [const { AtomicU64::new(0) }; HOLD_BUCKETS.len()],
            over: AtomicU64::new(0),
            sum_us: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, hold_us: u64) {
        let secs = hold_us as f64 / 1e6;
        match HOLD_BUCKETS.iter().position(|b| secs <= *b) {
            Some(i) => self.buckets[i].fetch_add(1, Ordering::Relaxed),
            None => self.over.fetch_add(1, Ordering::Relaxed),
        };
        self.sum_us.fetch_add(hold_us, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// Each bucket's upper bound (seconds) with the count of holds up to
    /// it, as the exposition format's cumulative buckets.
    pub fn cumulative(&self) -> Vec<(f64, u64)> {
        let mut total = 0;
        HOLD_BUCKETS
            .iter()
            .zip(&self.buckets)
            .map(|(bound, n)| {
                total += n.load(Ordering::Relaxed);
                (*bound, total)
            })
            .collect()
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    pub fn sum_secs(&self) -> f64 {
        self.sum_us.load(Ordering::Relaxed) as f64 / 1e6
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hold_times_fall_into_their_buckets() {
        let h = HoldHistogram::new();
        for us in [100, 400, 1_500, 2_000_000] {
            h.observe(us);
        }
        assert_eq!(h.buckets[0].load(Ordering::Relaxed), 2);
        assert_eq!(h.buckets[2].load(Ordering::Relaxed), 1, "1.5 ms is under 2 ms");
        assert_eq!(h.over.load(Ordering::Relaxed), 1);
        assert_eq!(h.count(), 4);
        assert_eq!(h.cumulative()[2], (0.002, 3));
        assert!((h.sum_secs() - 2.002).abs() < 1e-9);
    }
}
