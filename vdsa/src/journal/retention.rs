//! Retention: moving the replica's checkpoint (the oldest retained point)
//! forward, thinning versions no retained checkpoint needs, and collecting
//! the garbage both leave.
//!
//! A step to a new base is crash-safe by redo: the target is written to the
//! metadata as an intent first; the replica writes are idempotent (each
//! block gets its newest version at the target), and the log records they
//! come from are deleted only after the new base is durable. Reopening with
//! an intent simply runs the step again.

use super::chunks::{hash_block, ChunkId};
use super::error::Result;
use super::format::Record;
use super::index::{is_stored, CutSet, ZERO_CHUNK};
use super::ingest::is_zero;
use super::model::{Checkpoint, BLOCK_SIZE};
use super::replica::read_replica;
use super::{Journal, JournalError, Source, State};
use protection_groups::{CheckpointId, RetentionPolicy};
use serde::Serialize;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// What one retention run did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RetentionReport {
    /// Checkpoints dropped by sparse tiers.
    pub thinned: Vec<CheckpointId>,
    /// The replica's checkpoint after the run.
    pub base: Option<CheckpointId>,
    /// Checkpoints older than the new base, no longer offered.
    pub aged_out: Vec<CheckpointId>,
    /// Blocks written to replicas.
    pub blocks_applied: u64,
    /// Block versions removed from the index (applied or thinned).
    pub versions_freed: u64,
    /// Bytes of log segments and packs deleted.
    pub bytes_reclaimed: u64,
    /// Log bytes plus live chunk bytes after the run (what space limits).
    pub journal_bytes: u64,
}

impl Journal {
    /// Applies `policy` as of `now_ms` (ms since the Unix epoch). Open views
    /// keep reading what they read before.
    pub fn apply_retention(&self, policy: &RetentionPolicy, now_ms: u64) -> Result<RetentionReport> {
        self.apply_retention_keeping(policy, now_ms, &[])
    }

    /// As [`Journal::apply_retention`], but the checkpoints in `keep` (those
    /// running failover tests read) stay retained against the history and
    /// thinning rules, so a restarted VDSA can open them again. A space
    /// limit still moves past them: space is the hard limit (a test's open
    /// view keeps reading what it read either way).
    pub fn apply_retention_keeping(
        &self,
        policy: &RetentionPolicy,
        now_ms: u64,
        keep: &[CheckpointId],
    ) -> Result<RetentionReport> {
        let dir = self.inner.dir.clone();
        self.mutate(|st| st.apply_retention(&dir, policy, now_ms, keep))
    }
}

impl State {
    pub(super) fn base_id(&self) -> Option<CheckpointId> {
        self.meta.base.as_ref().map(|b| b.id)
    }

    /// The log and the chunks this journal references (each once; in a
    /// shared store, what it alone would occupy).
    fn journal_bytes(&self) -> Result<u64> {
        let chunks = match self.chunks.root() {
            None => self.chunks.live_bytes()?,
            Some(_) => self.chunks.bytes_of_distinct(self.held_chunks())?,
        };
        Ok(self.log.bytes() + chunks)
    }

    fn apply_retention(
        &mut self,
        dir: &Path,
        policy: &RetentionPolicy,
        now_ms: u64,
        keep: &[CheckpointId],
    ) -> Result<RetentionReport> {
        // Retention frees chunks; replay tells a freed chunk from a lost one
        // only for records before a commit, so commit everything first.
        self.sync()?;
        let mut report = RetentionReport::default();
        let before: Vec<CheckpointId> = self.checkpoints.keys().copied().collect();
        let base_id = self.base_id();
        let oldest_kept = keep.iter().min().copied();
        let candidates: Vec<_> = self
            .checkpoints
            .values()
            .filter(|c| Some(c.id) != base_id && !keep.contains(&c.id))
            .map(|c| (c.id, c.source_time_ms, c.kind))
            .collect();
        let thinned = policy.thinned(now_ms, &candidates);
        if !thinned.is_empty() {
            let drops: Vec<Record> = thinned.iter().map(|id| Record::DropCheckpoint { id: *id }).collect();
            for id in &thinned {
                self.checkpoints.remove(id);
            }
            // Noted at the head lsn so that their segment outlives the
            // checkpoint records they cancel.
            self.commit_records(&drops, Some(self.head_lsn))?;
        }
        report.thinned = thinned;
        report.versions_freed += self.thin_versions();

        if let Some(history) = policy.history() {
            let horizon = now_ms.saturating_sub(u64::try_from(history.as_millis()).unwrap_or(u64::MAX));
            let target = self
                .checkpoints
                .values()
                .rfind(|c| {
                    Some(c.id) > self.base_id() && c.source_time_ms <= horizon && oldest_kept.is_none_or(|k| c.id <= k)
                })
                .cloned();
            if let Some(target) = target {
                let (blocks, versions) = self.advance_base(dir, &target)?;
                report.blocks_applied += blocks;
                report.versions_freed += versions;
            }
        }
        if let Some(max) = policy.max_bytes() {
            while self.journal_bytes()? > max {
                let base = self.base_id();
                let Some(next) = self.checkpoints.values().find(|c| Some(c.id) > base).cloned() else {
                    break;
                };
                let (blocks, versions) = self.advance_base(dir, &next)?;
                report.blocks_applied += blocks;
                report.versions_freed += versions;
            }
        }
        let log_before = self.log.bytes();
        let base_cuts = self.base_cuts.clone();
        let base_lsn = self.meta.base.as_ref().map_or(0, |b| b.lsn);
        self.log.remove_segments(|s| {
            s.max_lsn <= base_lsn && s.stream_max.iter().all(|&(st, lsn)| base_cuts.visible(lsn, st))
        })?;
        report.bytes_reclaimed += log_before - self.log.bytes();
        match self.chunks.collect_garbage(false)? {
            Ok(bytes) => report.bytes_reclaimed += bytes,
            Err(why) => tracing::debug!("chunk store garbage left for later: {why}"),
        }
        report.base = self.base_id();
        report.aged_out = before
            .into_iter()
            .filter(|id| !self.checkpoints.contains_key(id) && !report.thinned.contains(id))
            .collect();
        report.journal_bytes = self.journal_bytes()?;
        Ok(report)
    }

    /// Removes versions that no retained checkpoint and no open view can
    /// read: a version is needed only if some cut sees it but not the next
    /// version of the same block. The newest version of a block is always
    /// kept (it is the head, and every future checkpoint sees it).
    pub(super) fn thin_versions(&mut self) -> u64 {
        let n = self.streams.len();
        let mut cuts: Vec<CutSet> = self.checkpoints.values().map(|c| self.cutset(c)).collect();
        cuts.extend(self.views.values().map(|v| v.cuts.clone()));
        let mut per_stream: Vec<Vec<u64>> = vec![Vec::with_capacity(cuts.len()); n];
        for c in &cuts {
            for (s, list) in per_stream.iter_mut().enumerate() {
                list.push(c.cut(s as u16));
            }
        }
        for list in &mut per_stream {
            list.sort_unstable();
            list.dedup();
        }
        let mut freed = 0;
        for d in 0..self.disks.len() {
            let mut victims = Vec::new();
            let mut prev: Option<(u64, u64, super::index::Version)> = None;
            for (b, l, v) in self.disks[d].index.iter() {
                if let Some((pb, pl, pv)) = prev {
                    if pb == b && pv.stream == v.stream {
                        let list = &per_stream[pv.stream as usize];
                        let i = list.partition_point(|&c| c < pl);
                        if i == list.len() || list[i] >= l {
                            victims.push((pb, pl));
                        }
                    }
                }
                prev = Some((b, l, v));
            }
            for (b, l) in victims {
                if let Some(v) = self.disks[d].index.remove(b, l) {
                    if is_stored(v.chunk) {
                        // Fails only on a poisoned store; the count then
                        // leaks, which keeps the chunk, never loses it.
                        let _ = self.chunks.decref(v.chunk);
                    }
                    freed += 1;
                }
            }
        }
        freed
    }

    /// Moves the replica to `target`: every block's newest version visible
    /// at `target` is written to the replica and the versions it replaces
    /// leave the index. Views older than `target` first get a copy of what
    /// they read there. Returns (blocks applied, versions freed).
    pub(super) fn advance_base(&mut self, dir: &Path, target: &Checkpoint) -> Result<(u64, u64)> {
        self.meta.intent = Some(target.clone());
        self.write_meta(dir)?;
        let cuts = self.cutset(target);
        let older_views: Vec<u64> =
            self.views.iter().filter(|(_, v)| v.checkpoint.id < target.id).map(|(&k, _)| k).collect();
        let mut scratch = vec![0u8; BLOCK_SIZE];
        let (mut blocks, mut versions) = (0, 0);
        for d in 0..self.disks.len() as u32 {
            // Per block: the newest version visible at the target, and the
            // lsns of all visible versions.
            let mut changes: Vec<(u64, ChunkId, Vec<u64>)> = Vec::new();
            for (b, l, v) in self.disks[d as usize].index.iter() {
                if !cuts.visible(l, v.stream) {
                    continue;
                }
                match changes.last_mut() {
                    Some((cb, chunk, lsns)) if *cb == b => {
                        *chunk = v.chunk;
                        lsns.push(l);
                    }
                    _ => changes.push((b, v.chunk, vec![l])),
                }
            }
            for (b, chunk, lsns) in changes {
                for &view in &older_views {
                    self.preserve(view, d, b, &mut scratch)?;
                }
                if chunk == ZERO_CHUNK {
                    scratch.fill(0);
                } else {
                    self.chunks.read(chunk, &mut scratch)?;
                }
                let disk = &self.disks[d as usize];
                disk.replica
                    .write_all_at(&scratch, b * BLOCK_SIZE as u64)
                    .map_err(|e| JournalError::io("writing replica", &disk.replica_path, e))?;
                for l in lsns {
                    if let Some(v) = self.disks[d as usize].index.remove(b, l) {
                        if is_stored(v.chunk) {
                            self.chunks.decref(v.chunk)?;
                        }
                        versions += 1;
                    }
                }
                blocks += 1;
            }
            let disk = &self.disks[d as usize];
            disk.replica.sync_data().map_err(|e| JournalError::io("syncing replica", &disk.replica_path, e))?;
        }
        self.chunks.sync()?; // blocks preserved for views
                             // Resizes the new base holds become the disks' base sizes; older
                             // views keep the sizes they saw.
        for &view in &older_views {
            for (d, disk) in self.disks.iter().enumerate() {
                if let Some(v) = self.views.get_mut(&view) {
                    let size = disk.size_at(&v.cuts);
                    v.sizes.entry(d as u32).or_insert(size);
                }
            }
        }
        for disk in &mut self.disks {
            disk.info.size = disk.size_at(&cuts);
            disk.resizes.retain(|r| !cuts.visible(r.lsn, r.stream));
        }
        self.meta.disks = self.disks.iter().map(|d| d.info).collect();
        self.meta.base = Some(target.clone());
        self.meta.intent = None;
        self.write_meta(dir)?;
        self.base_cuts = cuts;
        self.checkpoints.retain(|id, _| *id >= target.id);
        self.checkpoints.insert(target.id, target.clone());
        Ok((blocks, versions))
    }

    /// Saves, for an open view, what it reads at (disk, block) before
    /// retention overwrites that.
    fn preserve(&mut self, view_id: u64, d: u32, b: u64, scratch: &mut [u8]) -> Result<()> {
        let Some(view) = self.views.get(&view_id) else {
            return Ok(());
        };
        if view.preserved.contains_key(&(d, b)) {
            return Ok(());
        }
        let chunk = match self.source_for(d, b, view) {
            Source::Chunk(c) => {
                if c != ZERO_CHUNK {
                    self.chunks.incref(c)?;
                }
                c
            }
            Source::Replica => {
                read_replica(&self.disks[d as usize], b * BLOCK_SIZE as u64, scratch)?;
                let hash = if is_zero(scratch) { None } else { Some(hash_block(scratch)) };
                let content = scratch.to_vec();
                self.store_block(&content, hash, None)?
            }
        };
        if let Some(view) = self.views.get_mut(&view_id) {
            view.preserved.insert((d, b), chunk);
        }
        Ok(())
    }
}
