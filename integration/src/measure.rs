//! Small measuring helpers shared by the lab's report and the benchmarks:
//! percentiles of samples, and a process's memory and threads.

/// The `p` quantile of `v` (0.0..=1.0) by nearest rank, rounding; NaN when
/// `v` is empty. Sorts `v`.
pub fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[(((v.len() - 1) as f64) * p).round() as usize]
}

/// What `/proc/PID/status` says of a process's size.
#[derive(Debug, Clone, Copy)]
pub struct ProcStatus {
    /// Peak resident set (VmHWM), MiB; NaN when the process is gone.
    pub peak_rss_mib: f64,
    /// Threads now; 0 when the process is gone.
    pub threads: u64,
}

/// Reads [`ProcStatus`] of `pid` (None: the process never started).
pub fn proc_status(pid: Option<u32>) -> ProcStatus {
    let s = pid.and_then(|p| std::fs::read_to_string(format!("/proc/{p}/status")).ok()).unwrap_or_default();
    let field = |name: &str| {
        s.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
    };
    ProcStatus {
        peak_rss_mib: field("VmHWM:").map_or(f64::NAN, |kib| kib as f64 / 1024.0),
        threads: field("Threads:").unwrap_or(0),
    }
}

/// A process's threads counted by name (`/proc/PID/task/*/comm`; an
/// unnamed thread has the process's name), most first.
pub fn threads_by_name(pid: u32) -> Vec<(String, usize)> {
    let mut names: std::collections::BTreeMap<String, usize> = std::collections::BTreeMap::new();
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).into_iter().flatten().flatten();
    for t in tasks {
        if let Ok(name) = std::fs::read_to_string(t.path().join("comm")) {
            *names.entry(name.trim().to_string()).or_default() += 1;
        }
    }
    let mut v: Vec<(String, usize)> = names.into_iter().collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_by_nearest_rank_and_this_process_has_a_size() {
        let mut v: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        assert_eq!((percentile(&mut v, 0.5), percentile(&mut v, 0.99), percentile(&mut v, 1.0)), (51.0, 99.0, 100.0));
        assert!(percentile(&mut [], 0.5).is_nan());
        let me = proc_status(Some(std::process::id()));
        assert!(me.peak_rss_mib > 0.0 && me.threads >= 1, "{me:?}");
        assert!(proc_status(None).peak_rss_mib.is_nan());
        let named: usize = threads_by_name(std::process::id()).iter().map(|(_, n)| n).sum();
        assert!(named >= 1);
    }
}
