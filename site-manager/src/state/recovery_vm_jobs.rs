//! Recovery VM jobs in flight and their results waiting for the
//! reconciler; `crate::recovery_vms` plans the jobs and runs them against
//! vCenter.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use protection_groups::StackId;

use crate::model::RecoveryVms;

/// Jobs in flight and results waiting for the reconciler.
#[derive(Debug, Default)]
pub struct RecoveryVmJobs {
    inner: Mutex<JobsInner>,
}

#[derive(Debug, Default)]
struct JobsInner {
    in_flight: HashSet<StackId>,
    done: HashMap<StackId, RecoveryVms>,
}

impl RecoveryVmJobs {
    pub(crate) fn take_done(&self, id: StackId) -> Option<RecoveryVms> {
        self.inner.lock().ok()?.done.remove(&id)
    }

    pub(crate) fn in_flight(&self, id: StackId) -> bool {
        self.inner.lock().map(|i| i.in_flight.contains(&id)).unwrap_or(true)
    }

    /// Runs `job` for test `id` on a thread unless one runs already, and
    /// calls `done` once its result is kept.
    pub(crate) fn spawn(
        self: &Arc<Self>,
        id: StackId,
        job: impl FnOnce() -> RecoveryVms + Send + 'static,
        done: impl FnOnce() + Send + 'static,
    ) {
        let started = self.inner.lock().map(|mut i| i.in_flight.insert(id)).unwrap_or(false);
        if !started {
            return;
        }
        let jobs = self.clone();
        std::thread::spawn(move || {
            let result = job();
            if let Ok(mut i) = jobs.inner.lock() {
                i.in_flight.remove(&id);
                i.done.insert(id, result);
            }
            done();
        });
    }
}
