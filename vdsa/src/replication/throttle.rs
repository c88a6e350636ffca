//! A token bucket: the bandwidth limit of a site pair, changeable while
//! the link runs (architecture.md §5).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct Throttle {
    /// Bytes per second; 0 is no limit.
    rate: AtomicU64,
    bucket: Mutex<(f64, Instant)>,
}

impl Throttle {
    pub fn new(bytes_per_sec: u64) -> Throttle {
        Throttle { rate: AtomicU64::new(bytes_per_sec), bucket: Mutex::new((0.0, Instant::now())) }
    }

    pub fn set_rate(&self, bytes_per_sec: u64) {
        self.rate.store(bytes_per_sec, Ordering::Relaxed);
    }

    pub fn rate(&self) -> u64 {
        self.rate.load(Ordering::Relaxed)
    }

    /// Takes `n` bytes' worth of tokens, sleeping until the bucket allows
    /// it. The bucket holds at most a tenth of a second of tokens, so a
    /// quiet spell does not turn into a burst. The wait re-reads the rate
    /// every 50 ms, so lifting or changing the limit acts at once.
    pub async fn take(&self, n: u64) {
        let mut charge = n as f64;
        while let Some(wait) = self.charge(&mut charge) {
            tokio::time::sleep(wait.min(Duration::from_millis(50))).await;
        }
    }

    /// Charges `charge` (then zero) to the bucket: None when the bucket
    /// allows it, else how long until it does.
    fn charge(&self, charge: &mut f64) -> Option<Duration> {
        let rate = self.rate();
        let Ok(mut b) = self.bucket.lock() else { return None };
        let now = Instant::now();
        if rate == 0 {
            b.0 = 0.0;
            return None;
        }
        let burst = (rate as f64 / 10.0).max(64.0 * 1024.0);
        let refill = now.duration_since(b.1).as_secs_f64() * rate as f64;
        b.0 = (b.0 + refill).min(burst) - *charge;
        b.1 = now;
        *charge = 0.0;
        if b.0 >= 0.0 {
            return None;
        }
        Some(Duration::from_secs_f64(-b.0 / rate as f64))
    }

    /// A batch size that keeps the link smooth at the current rate: a
    /// quarter second's worth, within [64 KiB, `max`].
    pub fn batch_bytes(&self, max: u64) -> u64 {
        match self.rate() {
            0 => max,
            r => (r / 4).clamp(64 << 10, max.max(64 << 10)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn holds_the_rate() {
        let t = Throttle::new(10 << 20);
        let start = Instant::now();
        for _ in 0..40 {
            t.take(128 << 10).await;
        }
        // 5 MiB at 10 MiB/s: about half a second (less the first burst).
        let took = start.elapsed().as_secs_f64();
        assert!(took > 0.35, "5 MiB at 10 MiB/s took only {took:.3}s");
    }
}
