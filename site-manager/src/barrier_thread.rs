//! The thread the checkpoint barrier runs on: the management links (PREPARE
//! out, answers in, COMMIT out) and the coordinator's rounds, on a tokio
//! runtime of their own whose one thread has real-time priority
//! (SCHED_FIFO, reset on fork: the blocking threads it starts for the
//! store run as normal ones). Guests wait while a barrier is open, and on
//! a busy machine a normal thread waits its turn for a CPU for tens of
//! milliseconds (docs/performance.md, "The barrier with 16 VDSAs"). The API,
//! the reconciler and the paired-site exchange stay on the main runtime.
//! Without the privilege (CAP_SYS_NICE) the thread runs as a normal one.

use std::future::Future;
use tokio::runtime::Handle;

/// Real-time priority of the barrier thread (1 to 99; low, above every
/// normal thread).
const PRIORITY: libc::c_int = 10;

/// A handle to the barrier thread's runtime; the thread lives as long as
/// the process.
#[derive(Debug, Clone)]
pub struct BarrierThread {
    handle: Handle,
}

impl BarrierThread {
    /// Starts the thread and its runtime.
    pub fn start() -> std::io::Result<BarrierThread> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let handle = rt.handle().clone();
        std::thread::Builder::new().name("barrier".into()).spawn(move || {
            raise_priority();
            rt.block_on(std::future::pending::<()>());
        })?;
        Ok(BarrierThread { handle })
    }

    /// Runs `f` on the barrier thread and waits for its result; a panic
    /// in `f` goes on in the caller, as if `f` had run there.
    pub async fn run<T: Send + 'static>(&self, f: impl Future<Output = T> + Send + 'static) -> T {
        match self.handle.spawn(f).await {
            Ok(t) => t,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => panic!("the barrier thread's runtime dropped a round: {e}"),
        }
    }

    /// Starts `f` on the barrier thread.
    pub fn spawn<T: Send + 'static>(&self, f: impl Future<Output = T> + Send + 'static) -> tokio::task::JoinHandle<T> {
        self.handle.spawn(f)
    }
}

fn raise_priority() {
    let param = libc::sched_param { sched_priority: PRIORITY };
    // SAFETY: `param` outlives the call; pid 0 is the calling thread, the
    // only one changed.
    let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO | libc::SCHED_RESET_ON_FORK, &param) };
    if rc != 0 {
        tracing::info!("the barrier thread runs at normal priority: {}", std::io::Error::last_os_error());
    }
}
