//! Child processes that harnesses start: each is owned by a [`ChildGuard`]
//! from the moment it is spawned, so that every path out of a test,
//! benchmark or the lab (an error, a panic, an early return) stops it.
//! Ctrl-C reaches the children too: they share the terminal's process
//! group.

use std::process::{Child, Command};

/// A started child process, killed and reaped when dropped.
#[derive(Debug)]
pub struct ChildGuard {
    child: Option<Child>,
    what: String,
}

impl ChildGuard {
    /// Spawns `cmd`; `what` names it in errors.
    pub fn spawn(cmd: &mut Command, what: &str) -> std::io::Result<ChildGuard> {
        let child = cmd.spawn().map_err(|e| std::io::Error::new(e.kind(), format!("starting {what}: {e}")))?;
        Ok(ChildGuard { child: Some(child), what: what.to_string() })
    }

    /// Takes over an already spawned child.
    pub fn adopt(child: Child, what: &str) -> ChildGuard {
        ChildGuard { child: Some(child), what: what.to_string() }
    }

    pub fn id(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn child_mut(&mut self) -> Option<&mut Child> {
        self.child.as_mut()
    }

    /// Whether it is still running (reaping it if it ended).
    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// SIGKILL and reap now.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Gives the child up: the caller stops it from now on.
    pub fn release(mut self) -> Option<Child> {
        self.child.take()
    }

    /// Waits for it to end by itself and gives up ownership.
    pub fn wait(&mut self) -> std::io::Result<std::process::ExitStatus> {
        match self.child.take() {
            Some(mut c) => c.wait(),
            None => Err(std::io::Error::other(format!("{} was already stopped", self.what))),
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The last `n` lines of a process's log, for a failure's report.
pub fn last_lines(log: &str, n: usize) -> String {
    let tail: Vec<&str> = log.lines().rev().take(n).collect();
    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
}
