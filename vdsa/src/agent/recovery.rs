//! The processing stacks this VDSA serves, reconciled to the stacks its
//! target roles name (docs/recovery.md): each opened over its VPG's
//! journal, its disks published on the stack export listener, and
//! discarded (exports gone, overlays freed) once no role names it.

use crate::journal::Journal;
use crate::nbd::server::{BlockExport, Exports};
use crate::recovery::{export_name, ProcessingStack};
use protection_groups::mgmt::{StackExport, StackSpec, StackState};
use protection_groups::{StackId, VpgId};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// How many discarded stacks are remembered for the reports.
const DISCARDED_KEPT: usize = 256;

/// Every stack of this VDSA.
#[derive(Debug)]
pub struct Stacks {
    root: PathBuf,
    exports: Arc<Exports>,
    /// HOST:PORT of the stack export listener.
    address: String,
    open: Mutex<HashMap<StackId, (VpgId, ProcessingStack)>>,
    /// Stacks named but not served, and why.
    problems: Mutex<HashMap<StackId, (VpgId, StackSpec, String)>>,
    /// Stacks discarded lately, as last seen (reported until no role
    /// names them, at most [`DISCARDED_KEPT`]).
    discarded: Mutex<Vec<(VpgId, StackState)>>,
    /// Folders of stacks no role names are removed once, at the first
    /// desired state after a start.
    swept: AtomicBool,
}

impl Stacks {
    pub fn new(root: PathBuf, exports: Arc<Exports>, address: String) -> Stacks {
        Stacks {
            root,
            exports,
            address,
            open: Mutex::default(),
            problems: Mutex::default(),
            discarded: Mutex::default(),
            swept: AtomicBool::new(false),
        }
    }

    /// Serves exactly the stacks in `want`, each over the journal
    /// `journal_of` gives for its VPG.
    pub fn apply(&self, want: &[(VpgId, StackSpec)], journal_of: impl Fn(VpgId) -> Result<Journal, String>) {
        let Ok(mut open) = self.open.lock() else { return };
        let Ok(mut problems) = self.problems.lock() else { return };
        problems.retain(|id, _| want.iter().any(|(_, s)| s.id == *id));
        for id in open.keys().copied().collect::<Vec<_>>() {
            let keep = open.get(&id).is_some_and(|(vpg, s)| {
                want.iter().any(|(v, w)| w.id == id && w.checkpoint == s.checkpoint && v == vpg)
            });
            if keep {
                continue;
            }
            if let Some((vpg, stack)) = open.remove(&id) {
                for d in stack.disks() {
                    self.exports.remove(&export_name(id, d.disk));
                }
                let written = stack.written_bytes();
                if let Ok(mut d) = self.discarded.lock() {
                    d.push((
                        vpg,
                        StackState {
                            id,
                            checkpoint: stack.checkpoint,
                            exports: Vec::new(),
                            written_bytes: written,
                            allocated_bytes: 0,
                            problem: String::new(),
                            discarded: true,
                        },
                    ));
                    let excess = d.len().saturating_sub(DISCARDED_KEPT);
                    d.drain(..excess);
                }
                match stack.discard() {
                    Ok(()) => tracing::info!(%vpg, stack = %id, written, "processing stack discarded"),
                    Err(e) => tracing::error!(%vpg, stack = %id, "cannot free the stack's overlays: {e}"),
                }
            }
        }
        if !self.swept.swap(true, Ordering::SeqCst) {
            for entry in std::fs::read_dir(&self.root).into_iter().flatten().flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if !want.iter().any(|(_, s)| s.id.0.to_string() == name) {
                    tracing::info!(stack = %name, "removing a stack no role names any more");
                    if let Err(e) = std::fs::remove_dir_all(entry.path()) {
                        tracing::error!(stack = %name, "cannot remove: {e}");
                    }
                }
            }
        }
        for (vpg, spec) in want {
            if open.contains_key(&spec.id) {
                continue;
            }
            let started = std::time::Instant::now();
            let opened = journal_of(*vpg).and_then(|j| {
                ProcessingStack::open(&j, &self.root.join(spec.id.0.to_string()), spec.id, spec.checkpoint)
                    .map_err(|e| e.to_string())
            });
            match opened {
                Ok(stack) => {
                    for d in stack.disks() {
                        self.exports.insert(export_name(spec.id, d.disk), d.clone() as Arc<dyn BlockExport>);
                    }
                    tracing::info!(%vpg, stack = %spec.id, checkpoint = %spec.checkpoint,
                        ms = started.elapsed().as_millis() as u64, "processing stack served");
                    problems.remove(&spec.id);
                    open.insert(spec.id, (*vpg, stack));
                }
                Err(e) => {
                    if problems.get(&spec.id).is_none_or(|(_, _, p)| *p != e) {
                        tracing::error!(%vpg, stack = %spec.id, "cannot serve the processing stack: {e}");
                    }
                    problems.insert(spec.id, (*vpg, spec.clone(), e));
                }
            }
        }
    }

    /// The stacks of `vpg`, as its target role reports them.
    pub fn states(&self, vpg: VpgId) -> Vec<StackState> {
        let mut out = Vec::new();
        if let Ok(open) = self.open.lock() {
            for (id, (v, s)) in open.iter() {
                if *v != vpg {
                    continue;
                }
                let exports = s
                    .disks()
                    .iter()
                    .map(|d| StackExport {
                        disk: d.disk,
                        uri: format!("nbd://{}/{}", self.address, export_name(*id, d.disk)),
                        size_bytes: d.size(),
                    })
                    .collect();
                out.push(StackState {
                    id: *id,
                    checkpoint: s.checkpoint,
                    exports,
                    written_bytes: s.written_bytes(),
                    allocated_bytes: s.allocated_bytes(),
                    problem: String::new(),
                    discarded: false,
                });
            }
        }
        if let Ok(d) = self.discarded.lock() {
            out.extend(d.iter().filter(|(v, _)| *v == vpg).map(|(_, s)| s.clone()));
        }
        if let Ok(problems) = self.problems.lock() {
            for (id, (v, spec, why)) in problems.iter() {
                if *v == vpg {
                    out.push(StackState {
                        id: *id,
                        checkpoint: spec.checkpoint,
                        exports: Vec::new(),
                        written_bytes: 0,
                        allocated_bytes: 0,
                        problem: why.clone(),
                        discarded: false,
                    });
                }
            }
        }
        out.sort_by_key(|s| s.id);
        out
    }
}
