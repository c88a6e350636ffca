//! Replication between VDSAs (architecture.md §2, §3, §5): the source stream with
//! its send queue and link, and the target server that ingests streams
//! into per-VPG journals.

pub mod queue;
pub mod source;
pub mod target;
pub mod throttle;

/// Wall-clock time in ms since the Unix epoch: checkpoints carry their
/// source time in it, and the RPO is measured against it.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or(std::time::Duration::ZERO).as_millis()
        as u64
}
