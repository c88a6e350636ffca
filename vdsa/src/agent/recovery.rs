//! The processing stacks this VDSA serves, reconciled to the stacks its
//! target roles name (docs/recovery.md): each opened over its VPG's
//! journal, its disks published on the stack export listener, promoted in
//! the background when its failover is committed, and discarded (exports
//! gone, overlays freed) once no role names it.

use crate::journal::Journal;
use crate::nbd::export::{BlockExport, Exports};
use crate::recovery::{config_export_name, export_name, ConfigDisk, ProcessingStack, PromotionProgress};
use protection_groups::mgmt::{ConfigExport, PromotionState, StackExport, StackSpec, StackState, VmConfig};
use protection_groups::{StackId, VpgId};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A failed promotion is tried again after this long (a test still open
/// at another checkpoint, a full volume).
const PROMOTION_RETRY: Duration = Duration::from_secs(3);

/// A promotion running in the background.
#[derive(Debug, Default)]
struct PromotionJob {
    progress: PromotionProgress,
    /// The last attempt's error, or empty.
    error: Mutex<String>,
    /// Set when the stack is discarded: no further attempt.
    cancelled: AtomicBool,
}

/// How many discarded stacks are remembered for the reports.
const DISCARDED_KEPT: usize = 256;

/// An open stack: its VPG, the stack, and the VMs' config disks served
/// beside it.
type OpenStack = (VpgId, Arc<ProcessingStack>, Vec<VmConfig>);

/// Every stack of this VDSA.
#[derive(Debug)]
pub struct Stacks {
    root: PathBuf,
    exports: Arc<Exports>,
    /// HOST:PORT of the stack export listener.
    address: String,
    open: Mutex<HashMap<StackId, OpenStack>>,
    promotions: Mutex<HashMap<StackId, Arc<PromotionJob>>>,
    /// Paces promotions' overlay copies (0: unpaced).
    promotion_bytes_per_sec: u64,
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
    pub fn new(root: PathBuf, exports: Arc<Exports>, address: String, promotion_bytes_per_sec: u64) -> Stacks {
        Stacks {
            root,
            exports,
            address,
            open: Mutex::default(),
            promotions: Mutex::default(),
            promotion_bytes_per_sec,
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
            let keep = open.get(&id).is_some_and(|(vpg, s, _)| {
                want.iter().any(|(v, w)| w.id == id && w.checkpoint == s.checkpoint && v == vpg)
            });
            if keep {
                continue;
            }
            if let Some((vpg, stack, configs)) = open.remove(&id) {
                for d in stack.disks() {
                    self.exports.remove(&export_name(id, d.disk));
                }
                for c in configs {
                    self.exports.remove(&config_export_name(id, c.vm));
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
                            promotion: None,
                            configs: Vec::new(),
                        },
                    ));
                    let excess = d.len().saturating_sub(DISCARDED_KEPT);
                    d.drain(..excess);
                }
                if let Some(job) = self.promotions.lock().ok().and_then(|mut p| p.remove(&id)) {
                    job.cancelled.store(true, Ordering::SeqCst);
                }
                match ProcessingStack::discard_shared(stack) {
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
                    for c in &spec.vm_configs {
                        let disk = Arc::new(ConfigDisk::new(&c.text));
                        self.exports.insert(config_export_name(spec.id, c.vm), disk as Arc<dyn BlockExport>);
                    }
                    tracing::info!(%vpg, stack = %spec.id, checkpoint = %spec.checkpoint,
                        ms = started.elapsed().as_millis() as u64, "processing stack served");
                    problems.remove(&spec.id);
                    open.insert(spec.id, (*vpg, Arc::new(stack), spec.vm_configs.clone()));
                }
                Err(e) => {
                    if problems.get(&spec.id).is_none_or(|(_, _, p)| *p != e) {
                        tracing::error!(%vpg, stack = %spec.id, "cannot serve the processing stack: {e}");
                    }
                    problems.insert(spec.id, (*vpg, spec.clone(), e));
                }
            }
        }
        for (vpg, spec) in want.iter().filter(|(_, s)| s.promote) {
            if let (Some((_, stack, _)), Ok(journal)) = (open.get(&spec.id), journal_of(*vpg)) {
                self.start_promotion(*vpg, stack.clone(), journal);
            }
        }
    }

    /// Starts promoting `stack` in the background unless it is promoted or
    /// on its way; a failed attempt is retried until it succeeds or the
    /// stack is discarded.
    fn start_promotion(&self, vpg: VpgId, stack: Arc<ProcessingStack>, journal: Journal) {
        let Ok(mut jobs) = self.promotions.lock() else { return };
        if jobs.contains_key(&stack.id) {
            return;
        }
        let job = Arc::new(PromotionJob::default());
        jobs.insert(stack.id, job.clone());
        let pace = Some(self.promotion_bytes_per_sec).filter(|&r| r > 0);
        let id = stack.id;
        let spawned = std::thread::Builder::new().name("promotion".into()).spawn(move || {
            let started = std::time::Instant::now();
            tracing::info!(%vpg, stack = %stack.id, checkpoint = %stack.checkpoint, "promotion started");
            while !job.cancelled.load(Ordering::SeqCst) {
                match stack.promote(&journal, pace, &job.progress) {
                    Ok(()) => {
                        if let Ok(mut e) = job.error.lock() {
                            e.clear();
                        }
                        tracing::info!(%vpg, stack = %stack.id, ms = started.elapsed().as_millis() as u64,
                            bytes = job.progress.done_bytes.load(Ordering::Relaxed), "promotion complete");
                        return;
                    }
                    Err(e) => {
                        tracing::error!(%vpg, stack = %stack.id, "promotion failed, trying again: {e}");
                        if let Ok(mut slot) = job.error.lock() {
                            *slot = e.to_string();
                        }
                        std::thread::sleep(PROMOTION_RETRY);
                    }
                }
            }
        });
        if let Err(e) = spawned {
            tracing::error!(%vpg, "cannot start the promotion thread: {e}");
            jobs.remove(&id);
        }
    }

    /// The stacks of `vpg`, as its target role reports them.
    pub fn states(&self, vpg: VpgId) -> Vec<StackState> {
        let mut out = Vec::new();
        if let Ok(open) = self.open.lock() {
            for (id, (v, s, configs)) in open.iter() {
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
                let job = self.promotions.lock().ok().and_then(|p| p.get(id).cloned());
                let promoted = s.is_promoted();
                let promotion = match job {
                    Some(j) => Some(PromotionState {
                        done_bytes: j.progress.done_bytes.load(Ordering::Relaxed),
                        total_bytes: j.progress.total_bytes.load(Ordering::Relaxed),
                        journal_blocks: j.progress.journal_blocks.load(Ordering::Relaxed),
                        promoted,
                        error: if promoted {
                            String::new()
                        } else {
                            j.error.lock().map(|e| e.clone()).unwrap_or_default()
                        },
                    }),
                    None if promoted => Some(PromotionState { promoted, ..PromotionState::default() }),
                    None => None,
                };
                let configs = configs
                    .iter()
                    .map(|c| ConfigExport {
                        vm: c.vm,
                        uri: format!("nbd://{}/{}", self.address, config_export_name(*id, c.vm)),
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
                    promotion,
                    configs,
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
                        promotion: None,
                        configs: Vec::new(),
                    });
                }
            }
        }
        out.sort_by_key(|s| s.id);
        out
    }
}
