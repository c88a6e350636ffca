//! A bound on the connections a listener serves at once. Past it a new
//! connection is closed at once and the refusal logged, so a client that
//! opens connections without end cannot exhaust the process (its memory
//! and file descriptors; docs/architecture.md, "Threads").

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Tap connections (NBD or native) served at once by one listener: a
/// QEMU mirror job or an ESXi filter holds one per protected disk.
pub const MAX_TAP_CONNECTIONS: usize = 1024;
/// Replication links a target VDSA serves at once: one per stream (a VPG
/// has one per protected host).
pub const MAX_REPLICATION_LINKS: usize = 1024;

/// How many connections are being served, against the most allowed.
#[derive(Debug)]
pub struct ConnectionLimit {
    active: AtomicUsize,
    max: usize,
    what: &'static str,
}

/// A served connection's place under its limit, given back when dropped.
#[derive(Debug)]
pub struct ConnectionSlot(Arc<ConnectionLimit>);

impl ConnectionLimit {
    /// `what` names the connections in the refusal's log line.
    pub fn new(max: usize, what: &'static str) -> Arc<ConnectionLimit> {
        Arc::new(ConnectionLimit { active: AtomicUsize::new(0), max, what })
    }

    /// A place for one more connection, or None (logged) at the limit.
    pub fn try_take(self: &Arc<Self>) -> Option<ConnectionSlot> {
        let taken = self.active.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| (n < self.max).then_some(n + 1));
        match taken {
            Ok(_) => Some(ConnectionSlot(self.clone())),
            Err(n) => {
                tracing::warn!("{n} {} are open, the most this VDSA serves at once: closing a new one", self.what);
                None
            }
        }
    }

    pub fn active(&self) -> usize {
        self.active.load(Ordering::SeqCst)
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_are_refused_at_the_limit_and_given_back_when_dropped() {
        let limit = ConnectionLimit::new(2, "test connections");
        let (a, b) = (limit.try_take(), limit.try_take());
        assert!(a.is_some() && b.is_some());
        assert!(limit.try_take().is_none(), "a third is refused");
        drop(a);
        assert_eq!(limit.active(), 1);
        assert!(limit.try_take().is_some(), "a place given back is taken again");
    }
}
