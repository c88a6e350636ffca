//! What the site manager measures, for the API (`GET /vpgs/{id}/stats`)
//! and for Prometheus (`GET /metrics`, the text exposition format 0.0.4).
//! Both read the same [`VpgStats`], so that a scrape and an API call agree
//! (docs/api.md, "Metrics").
//!
//! The figures come from what the site manager holds anyway: the
//! checkpoint store (RPO), the VDSAs' role reports (bytes written, sent on
//! the link, held by the journals), the host records (VDSA heartbeats),
//! the pairing record (the site-to-site link) and the failover test
//! records; the barrier's hold times are counted as the coordinator
//! records each checkpoint.

use std::fmt::Write as _;

use protection_groups::mgmt::{ActualState, RoleKind, RoleState};
use protection_groups::HostId;
use protection_groups::VpgId;
use std::collections::HashMap;

use crate::model::{now_ms, Checkpoint, TestState, VdsaState, Vpg, VpgStats};
use crate::state::SiteManager;
use crate::store::StoreError;

/// What every VPG's stats are computed from, read once per pass over
/// the VPGs (not once per VPG): this site's VDSAs' reports, the target
/// roles the paired site reported for this site's VPGs, and the failover
/// test records.
#[derive(Debug)]
pub struct StatsSources {
    vdsas: HashMap<HostId, ActualState>,
    peer_targets: Vec<RoleState>,
    tests: Vec<crate::model::FailoverTest>,
}

impl StatsSources {
    pub fn read(sm: &SiteManager) -> Result<StatsSources, StoreError> {
        Ok(StatsSources {
            vdsas: sm.links.actual_states(),
            peer_targets: sm.peering.target_roles(),
            tests: sm.with_store(|s| s.tests.list())?,
        })
    }

    pub fn tests(&self) -> &[crate::model::FailoverTest] {
        &self.tests
    }

    /// What `host`'s VDSA reported last, if it is connected.
    pub fn vdsa(&self, host: HostId) -> Option<&ActualState> {
        self.vdsas.get(&host)
    }

    /// The role reports that concern `vpg`: this site's, and for a VPG
    /// recovering to the paired site, the targets that site reported.
    pub fn roles_of(&self, vpg: VpgId) -> Vec<&RoleState> {
        let mut roles: Vec<&RoleState> =
            self.vdsas.values().flat_map(|a| a.roles.iter()).filter(|r| r.vpg == vpg).collect();
        if !roles.iter().any(|r| r.kind == RoleKind::Target) {
            roles.extend(self.peer_targets.iter().filter(|r| r.vpg == vpg));
        }
        roles
    }
}

/// The stats of `v` now.
pub fn vpg_stats(sm: &SiteManager, src: &StatsSources, v: &Vpg) -> Result<VpgStats, StoreError> {
    let newest: Option<Checkpoint> = sm.with_store(|s| s.newest_durable_checkpoint(v.id))?;
    let now = now_ms();
    let history_policy_secs = v.settings.journal_history_secs;
    let roles = src.roles_of(v.id);
    // The oldest point every recovery journal still holds (retention moves
    // it on; the catalog keeps older records): none if any journal holds
    // none.
    let oldest_held: Option<Vec<_>> =
        roles.iter().filter(|r| r.kind == RoleKind::Target).map(|r| r.oldest_recoverable_checkpoint).collect();
    let oldest_time = match oldest_held.and_then(|ids| ids.into_iter().max()) {
        Some(id) => sm.with_store(|s| s.checkpoints.get(&crate::store::checkpoint_key(v.id, id)))?.map(|c| c.time_ms),
        None => None,
    };
    let (mut written, mut link, mut journal) = (0, 0, 0);
    let (mut writes, mut offered, mut sent) = (0, 0, 0);
    for r in &roles {
        match r.kind {
            RoleKind::Source => {
                written += r.written_bytes;
                link += r.link_bytes;
                writes += r.write_count;
                offered += r.blocks_offered;
                sent += r.blocks_sent;
            }
            RoleKind::Target => journal += r.written_bytes,
        }
    }
    let (mut running, mut stopped, mut failovers) = (0, 0, 0);
    for t in src.tests.iter().filter(|t| t.vpg == v.id) {
        match (t.purpose, t.state) {
            (crate::model::StackPurpose::Failover, _) => failovers += 1,
            (_, TestState::Starting | TestState::Running | TestState::Stopping) => running += 1,
            (_, TestState::Stopped | TestState::Failed) => stopped += 1,
        }
    }
    Ok(VpgStats {
        vpg: v.id,
        rpo_ms: newest.as_ref().map(|c| now.saturating_sub(c.time_ms)),
        newest_durable_checkpoint: newest.map(|c| c.id.0),
        rpo_threshold_ms: v.settings.rpo_alert_secs.saturating_mul(1000),
        written_bytes: written,
        link_bytes: link,
        journal_bytes: journal,
        write_count: writes,
        blocks_offered: offered,
        blocks_sent: sent,
        history_available_secs: oldest_time.map_or(0, |t| now.saturating_sub(t) / 1000).min(history_policy_secs),
        history_policy_secs,
        tests_running: running,
        tests_stopped: stopped,
        failovers,
        at_ms: now,
    })
}

/// How often [`run_sampler`] samples.
pub const SAMPLE_SECS: u64 = 10;

/// Samples every VPG's stats every [`SAMPLE_SECS`]: its rates for the
/// sizing analyzer and its day for the health report. Runs for the
/// daemon's life.
pub async fn run_sampler(sm: std::sync::Arc<SiteManager>) {
    loop {
        tokio::time::sleep(std::time::Duration::from_secs(SAMPLE_SECS)).await;
        let sm2 = sm.clone();
        let r = tokio::task::spawn_blocking(move || -> Result<(), StoreError> {
            let src = StatsSources::read(&sm2)?;
            for v in sm2.with_store(|s| s.vpgs.list())? {
                let st = vpg_stats(&sm2, &src, &v)?;
                sm2.rates.record(v.id, st.at_ms, st.written_bytes, st.link_bytes);
                sm2.with_store(|s| crate::health::record(s, &st, SAMPLE_SECS))?;
            }
            Ok(())
        })
        .await;
        if let Ok(Err(e)) = r {
            tracing::warn!(error = %e, "cannot sample the VPGs' figures");
        }
    }
}

/// A label value, escaped as the exposition format asks.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// A host's labels: its id and name.
fn host_label(h: &crate::model::Host) -> String {
    format!("host=\"{}\",name=\"{}\"", h.id.0, label(&h.name))
}

/// `GET /metrics`: the text exposition format, one family after another,
/// each with its HELP and TYPE.
pub fn render(sm: &SiteManager) -> Result<String, StoreError> {
    let mut out = String::new();
    let mut family = |name: &str, kind: &str, help: &str, samples: Vec<(String, f64)>| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (labels, value) in samples {
            if labels.is_empty() {
                let _ = writeln!(out, "{name} {value}");
            } else {
                let _ = writeln!(out, "{name}{{{labels}}} {value}");
            }
        }
    };
    let own = sm.with_store(|s| s.vpgs.list())?;
    let copies = sm.with_store(|s| s.peer_vpgs.list())?;
    let src = StatsSources::read(sm)?;
    let mut stats = Vec::new();
    for (v, side) in own.iter().map(|v| (v, "protected")).chain(copies.iter().map(|v| (v, "recovery"))) {
        stats.push((v, side, vpg_stats(sm, &src, v)?));
    }
    let l =
        |v: &Vpg, side: &str| format!("vpg=\"{}\",name=\"{}\",site_role=\"{side}\"", v.id.0, label(&v.settings.name));
    family(
        "vdsa_vpg_status",
        "gauge",
        "1 for the VPG's current status.",
        stats.iter().map(|(v, side, _)| (format!("{},status=\"{}\"", l(v, side), v.status), 1.0)).collect(),
    );
    family(
        "vdsa_vpg_rpo_seconds",
        "gauge",
        "Now minus the newest checkpoint durable at the recovery site.",
        stats.iter().filter_map(|(v, side, s)| s.rpo_ms.map(|ms| (l(v, side), ms as f64 / 1000.0))).collect(),
    );
    family(
        "vdsa_vpg_encrypting_rewrite_share",
        "gauge",
        "Of the blocks written in the newest checkpoint interval, the share that overwrote plain content with \
         encrypted-looking content (the encryption signal).",
        stats
            .iter()
            .filter_map(|(v, side, _)| sm.encryption.signal(v.id).map(|s| (l(v, side), s.newest_rewritten_share)))
            .collect(),
    );
    family(
        "vdsa_vpg_encryption_suspected",
        "gauge",
        "1 while the VPG's encryption alert holds.",
        stats
            .iter()
            .filter(|(_, side, _)| *side == "protected")
            .map(|(v, side, _)| (l(v, side), f64::from(u8::from(sm.encryption.alert(v.id).is_some()))))
            .collect(),
    );
    family(
        "vdsa_vpg_rpo_threshold_seconds",
        "gauge",
        "The VPG's RPO alert threshold.",
        stats.iter().map(|(v, side, s)| (l(v, side), s.rpo_threshold_ms as f64 / 1000.0)).collect(),
    );
    family(
        "vdsa_vpg_written_bytes_total",
        "counter",
        "Bytes the protected VMs wrote, as the source VDSAs' taps saw them.",
        stats.iter().map(|(v, side, s)| (l(v, side), s.written_bytes as f64)).collect(),
    );
    family(
        "vdsa_vpg_link_bytes_total",
        "counter",
        "Bytes sent on the site-to-site link for the VPG (after dedup and compression).",
        stats.iter().map(|(v, side, s)| (l(v, side), s.link_bytes as f64)).collect(),
    );
    family(
        "vdsa_vpg_journal_bytes",
        "gauge",
        "Bytes the VPG's recovery journals hold.",
        stats.iter().map(|(v, side, s)| (l(v, side), s.journal_bytes as f64)).collect(),
    );
    family(
        "vdsa_vpg_writes_total",
        "counter",
        "Guest writes the source VDSAs passed on (IOPS by its rate).",
        stats.iter().map(|(v, side, s)| (l(v, side), s.write_count as f64)).collect(),
    );
    family(
        "vdsa_vpg_dedup_ratio",
        "gauge",
        "Share of offered blocks the recovery site held already (sent as hashes only).",
        stats
            .iter()
            .filter(|(_, _, s)| s.blocks_offered > 0)
            .map(|(v, side, s)| (l(v, side), 1.0 - s.blocks_sent as f64 / s.blocks_offered as f64))
            .collect(),
    );
    family(
        "vdsa_vpg_compression_ratio",
        "gauge",
        "Link bytes per written byte (after dedup and compression; lower is better).",
        stats
            .iter()
            .filter(|(_, _, s)| s.written_bytes > 0)
            .map(|(v, side, s)| (l(v, side), s.link_bytes as f64 / s.written_bytes as f64))
            .collect(),
    );
    family(
        "vdsa_vpg_history_available_seconds",
        "gauge",
        "How far back a failover can go: the age of the oldest checkpoint every recovery journal holds, at most the policy.",
        stats.iter().map(|(v, side, s)| (l(v, side), s.history_available_secs as f64)).collect(),
    );
    family(
        "vdsa_vpg_history_policy_seconds",
        "gauge",
        "The journal history the VPG's policy asks for.",
        stats.iter().map(|(v, side, s)| (l(v, side), s.history_policy_secs as f64)).collect(),
    );
    family(
        "vdsa_vpg_failover_tests",
        "gauge",
        "Failover tests of the VPG by state (running or stopped), and its failovers.",
        stats
            .iter()
            .flat_map(|(v, side, s)| {
                [("running", s.tests_running), ("stopped", s.tests_stopped), ("failover", s.failovers)]
                    .into_iter()
                    .map(move |(state, n)| (format!("{},state=\"{state}\"", l(v, side)), n as f64))
            })
            .collect(),
    );
    let hosts = sm.with_store(|s| s.hosts.list())?;
    let now = now_ms();
    family(
        "vdsa_host_up",
        "gauge",
        "1 if the host's VDSA is installed and answers heartbeats.",
        hosts.iter().map(|h| (host_label(h), f64::from(u8::from(h.vdsa == VdsaState::Installed)))).collect(),
    );
    let per_host = |what: &dyn Fn(&ActualState) -> u64| -> Vec<(String, f64)> {
        hosts.iter().filter_map(|h| src.vdsa(h.id).map(|a| (host_label(h), what(a) as f64))).collect()
    };
    family(
        "vdsa_host_queue_bytes",
        "gauge",
        "Bytes in the VDSA's send queues in memory.",
        per_host(&|a| a.roles.iter().map(|r| r.queue_bytes).sum()),
    );
    family(
        "vdsa_host_spill_bytes",
        "gauge",
        "Bytes the VDSA's send queues spilled to disk.",
        per_host(&|a| a.roles.iter().map(|r| r.spill_bytes).sum()),
    );
    family("vdsa_host_memory_bytes", "gauge", "The VDSA process's resident memory.", per_host(&|a| a.memory_bytes));
    family(
        "vdsa_host_heartbeat_age_seconds",
        "gauge",
        "Seconds since the host's VDSA last reported.",
        hosts
            .iter()
            .filter_map(|h| h.last_heartbeat_ms.map(|t| (host_label(h), now.saturating_sub(t) as f64 / 1000.0)))
            .collect(),
    );
    if let Some(p) = sm.stored_peer().ok().flatten() {
        let up = p.peer.last_error.is_empty() && p.peer.last_contact_ms.is_some_and(|t| now.saturating_sub(t) < 15_000);
        family(
            "vdsa_site_link_up",
            "gauge",
            "1 if the last exchange with the paired site succeeded within 15 s.",
            vec![(format!("peer=\"{}\",name=\"{}\"", p.peer.site.0, label(&p.peer.name)), f64::from(u8::from(up)))],
        );
    }
    // The barrier's hold histogram: cumulative buckets, +Inf, sum, count.
    let h = &crate::barrier_hold::BARRIER_HOLD;
    let _ = writeln!(out, "# HELP vdsa_barrier_hold_seconds How long the checkpoint barrier held the guests' writes.");
    let _ = writeln!(out, "# TYPE vdsa_barrier_hold_seconds histogram");
    for (bound, cumulative) in h.cumulative() {
        let _ = writeln!(out, "vdsa_barrier_hold_seconds_bucket{{le=\"{bound}\"}} {cumulative}");
    }
    let count = h.count();
    let _ = writeln!(out, "vdsa_barrier_hold_seconds_bucket{{le=\"+Inf\"}} {count}");
    let _ = writeln!(out, "vdsa_barrier_hold_seconds_sum {}", h.sum_secs());
    let _ = writeln!(out, "vdsa_barrier_hold_seconds_count {count}");
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
