//! Log requests to VDSAs waiting for their answers; `crate::logs` asks
//! and bundles what they answer.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use tokio::sync::oneshot;

/// Requests to VDSAs waiting for their answer.
#[derive(Debug, Default)]
pub struct LogCollector {
    next: AtomicU64,
    pending: Mutex<HashMap<u64, oneshot::Sender<(String, bool)>>>,
}

impl LogCollector {
    /// A VDSA's answer arrived.
    pub fn on_answer(&self, request: u64, text: String, truncated: bool) {
        let waiter = self.pending.lock().ok().and_then(|mut p| p.remove(&request));
        if let Some(tx) = waiter {
            let _ = tx.send((text, truncated));
        }
    }

    /// A new request: its number, and where its answer will arrive.
    pub(crate) fn ask(&self) -> (u64, oneshot::Receiver<(String, bool)>) {
        let request = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let (tx, rx) = oneshot::channel();
        if let Ok(mut p) = self.pending.lock() {
            p.insert(request, tx);
        }
        (request, rx)
    }

    /// Gives up on a request (its VDSA did not answer in time).
    pub(crate) fn forget(&self, request: u64) {
        if let Ok(mut p) = self.pending.lock() {
            p.remove(&request);
        }
    }
}
