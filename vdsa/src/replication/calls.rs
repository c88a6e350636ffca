//! The replication links' calls that may block (a journal's ingest, group
//! commit or open; a send queue's spill read): run on a fixed pool of
//! threads, so that a VDSA's threads stay the same whatever the number of
//! links (docs/architecture.md, "Threads"). A link's task waits for its
//! call without a thread; calls past the pool's size wait their turn.
//!
//! What this module must not do: know what the calls do.

use super::LinkError;
use std::io;
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex, OnceLock};

/// Threads of the pool. The journals' file writes go through four writer
/// threads of their own; these wait for them, for fsync and for locks.
const THREADS: usize = 16;

type Call = Box<dyn FnOnce() + Send>;

/// The process's pool, started on first use: where calls are sent.
fn pool() -> io::Result<&'static Sender<Call>> {
    static POOL: OnceLock<Result<Sender<Call>, String>> = OnceLock::new();
    let started = POOL.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Call>();
        let rx = Arc::new(Mutex::new(rx));
        for _ in 0..THREADS {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name("link-calls".into())
                .spawn(move || loop {
                    // Only the thread taking the next call holds the lock.
                    let call = match rx.lock() {
                        Ok(rx) => rx.recv(),
                        Err(_) => return,
                    };
                    let Ok(call) = call else { return };
                    // A call that panics fails its link (its reply is
                    // dropped), not the pool's thread.
                    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(call));
                })
                .map_err(|e| format!("starting the links' call threads: {e}"))?;
        }
        Ok(tx)
    });
    started.as_ref().map_err(|e| io::Error::other(e.clone()))
}

/// Runs `f` on the pool and waits for it without holding a thread.
pub(super) async fn blocking_call<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, LinkError> {
    let (reply, replied) = tokio::sync::oneshot::channel();
    let call: Call = Box::new(move || {
        let _ = reply.send(f());
    });
    pool()?.send(call).map_err(|_| io::Error::other("the links' call threads are gone"))?;
    replied.await.map_err(|_| LinkError::Io(io::Error::other("a blocking call of the link panicked")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn calls_run_on_the_pool_and_a_panic_fails_only_its_call() {
        let name = blocking_call(|| std::thread::current().name().map(str::to_string)).await.expect("a call");
        assert_eq!(name.as_deref(), Some("link-calls"));
        let panicked = blocking_call(|| -> u32 { panic!("a call that fails") }).await;
        assert!(matches!(&panicked, Err(LinkError::Io(e)) if e.to_string().contains("panicked")), "{panicked:?}");
        // Every thread still serves: more calls than threads, all at once.
        let calls: Vec<_> = (0..THREADS * 2).map(|i| tokio::spawn(blocking_call(move || i * 2))).collect();
        for (i, c) in calls.into_iter().enumerate() {
            assert_eq!(c.await.expect("joined").expect("a call"), i * 2);
        }
    }
}
