//! Alerts: conditions an operator must hear about, evaluated every second
//! from what the site manager measures (`crate::metrics`), raised while
//! they hold and cleared when they end, shown by the API and posted to a
//! webhook (docs/api.md, "Alerts").
//!
//! Conditions: a VPG's RPO over its threshold; a host's VDSA down; the
//! site-to-site link down; a failover test running longer than the set
//! limit; a recovery journal paused because its volume is full; writes
//! that look encrypted overwriting a VPG's data (`crate::encryption`).
//!
//! The webhook is posted from a task of its own through a bounded queue,
//! with retries and a timeout per attempt: a slow or failing receiver
//! never holds up the evaluation, the API or the reconciler. Alerts live
//! in memory: after a restart the conditions that still hold are raised
//! again.

use std::time::Duration;

use crate::model::{now_ms, AlertEvent, AlertKind, TestState, VdsaState, VpgStats};
use crate::state::SiteManager;
use crate::store::StoreError;

/// The key of the settings in their table.
pub const SETTINGS_KEY: &[u8] = b"alerts";

/// Attempts per delivery, and the first retry's wait (doubled each time).
const ATTEMPTS: u32 = 6;
const FIRST_RETRY: Duration = Duration::from_millis(500);

/// Whether a VPG's journals hold less history than its policy asks,
/// counted only once the VPG is older than that history (a young VPG
/// cannot have it yet). Retention trims at checkpoint granularity, so a
/// shortfall of two checkpoint intervals (or 5 % of the policy, if more)
/// is no alert.
fn history_short(age_ms: u64, stats: &VpgStats, checkpoint_interval_ms: u64) -> bool {
    let policy = stats.history_policy_secs;
    let slack = (2 * checkpoint_interval_ms / 1000).max(policy / 20).max(1);
    age_ms / 1000 > policy + slack && stats.history_available_secs + slack < policy
}

/// Names the VMs, disks and the first checkpoint of an encryption alert.
fn encryption_message(v: &crate::model::Vpg, a: &protection_groups::encryption::EncryptionAlert) -> String {
    let mut vms = Vec::new();
    let mut disks = Vec::new();
    for d in &a.disks {
        match v.settings.vms.iter().find(|vm| vm.disks.iter().any(|x| x.id == *d)) {
            Some(vm) => {
                if !vms.contains(&vm.name) {
                    vms.push(vm.name.clone());
                }
                let name = vm.disks.iter().find(|x| x.id == *d).map_or(String::new(), |x| x.name.clone());
                disks.push(format!("{}:{name}", vm.name));
            }
            None => disks.push(d.to_string()),
        }
    }
    format!(
        "writes that look encrypted overwrite existing data on VM(s) {} (disks {}): {:.0} % of the blocks written, \
         against a baseline of {:.1} %; they began in the interval of checkpoint {}, so the last clean checkpoint is \
         most likely {}",
        vms.join(", "),
        disks.join(", "),
        a.share * 100.0,
        a.baseline_share * 100.0,
        a.first_checkpoint.0,
        a.first_checkpoint.0.saturating_sub(1)
    )
}

/// The conditions that hold now: (kind, subject, subject name, message).
fn conditions(sm: &SiteManager) -> Result<Vec<(AlertKind, String, String, String)>, StoreError> {
    let settings = sm.with_store(|s| s.alert_settings.get(SETTINGS_KEY))?.unwrap_or_default();
    let mut out = Vec::new();
    let now = now_ms();
    let src = crate::metrics::StatsSources::read(sm)?;
    for v in sm.with_store(|s| s.vpgs.list())? {
        if v.paused {
            out.push((AlertKind::JournalFull, v.id.0.to_string(), v.settings.name.clone(), v.status_reason.clone()));
        }
        // RPO matters while the VPG protects (a failed-over or paused VPG
        // has its own alert or none).
        if !matches!(v.status, protection_groups::VpgStatus::Protecting | protection_groups::VpgStatus::Test) {
            continue;
        }
        sm.encryption.update(v.id, &src.roles_of(v.id));
        if let Some((a, _)) = sm.encryption.alert(v.id) {
            out.push((
                AlertKind::EncryptionSuspected,
                v.id.0.to_string(),
                v.settings.name.clone(),
                encryption_message(&v, &a),
            ));
        }
        let stats = crate::metrics::vpg_stats(sm, &src, &v)?;
        if history_short(now.saturating_sub(v.created_ms), &stats, v.settings.checkpoint_interval_ms) {
            out.push((
                AlertKind::HistoryBelowPolicy,
                v.id.0.to_string(),
                v.settings.name.clone(),
                format!(
                    "the recovery journals hold {} s of history, less than the policy's {} s",
                    stats.history_available_secs, stats.history_policy_secs
                ),
            ));
        }
        if let Some(rpo) = stats.rpo_ms.filter(|r| *r > stats.rpo_threshold_ms) {
            out.push((
                AlertKind::RpoOverThreshold,
                v.id.0.to_string(),
                v.settings.name.clone(),
                format!("RPO {:.1} s is over the threshold of {} s", rpo as f64 / 1000.0, v.settings.rpo_alert_secs),
            ));
        }
    }
    for h in sm.with_store(|s| s.hosts.list())? {
        let holds_journals =
            src.vdsa(h.id).filter(|a| a.roles.iter().any(|r| r.kind == protection_groups::mgmt::RoleKind::Target));
        if let Some(a) = holds_journals.filter(|a| a.data_free_bytes < settings.journal_volume_free_min_bytes) {
            out.push((
                AlertKind::JournalVolumeLow,
                h.id.0.to_string(),
                h.name.clone(),
                format!(
                    "the journal volume of host {} has {} MiB free, under the {} MiB alert level",
                    h.name,
                    a.data_free_bytes >> 20,
                    settings.journal_volume_free_min_bytes >> 20
                ),
            ));
        }
        if h.vdsa == VdsaState::Down {
            let age =
                h.last_heartbeat_ms.map_or("never".to_string(), |t| format!("{} s ago", now.saturating_sub(t) / 1000));
            out.push((
                AlertKind::VdsaDown,
                h.id.0.to_string(),
                h.name.clone(),
                format!("the VDSA of host {} does not answer (last heartbeat {age})", h.name),
            ));
        }
    }
    if let Some(p) = sm.stored_peer()? {
        let stale = p.peer.last_contact_ms.is_none_or(|t| now.saturating_sub(t) > 15_000);
        if !p.peer.last_error.is_empty() || stale {
            let why =
                if p.peer.last_error.is_empty() { "no exchange for 15 s".into() } else { p.peer.last_error.clone() };
            out.push((
                AlertKind::SiteLinkDown,
                p.peer.site.0.to_string(),
                p.peer.name.clone(),
                format!("the paired site {} does not answer: {why}", p.peer.name),
            ));
        }
    }
    let limit_ms = settings.test_running_limit_secs.saturating_mul(1000);
    for t in src.tests() {
        let running = matches!(t.state, TestState::Running) && t.purpose == crate::model::StackPurpose::Test;
        if running && now.saturating_sub(t.started_ms) > limit_ms {
            out.push((
                AlertKind::TestRunningLong,
                t.id.0.to_string(),
                t.vpg_name.clone(),
                format!(
                    "a failover test of {} has run {} min, longer than the limit of {} min",
                    t.vpg_name,
                    now.saturating_sub(t.started_ms) / 60_000,
                    settings.test_running_limit_secs / 60
                ),
            ));
        }
    }
    Ok(out)
}

/// Evaluates the conditions every second and posts what changed; runs
/// for the daemon's life.
pub async fn run(sm: std::sync::Arc<SiteManager>) {
    let rx = sm.alerts.take_receiver();
    if let Some(rx) = rx {
        tokio::spawn(deliver(sm.clone(), rx));
    }
    let site = sm.site().map(|s| s.id.0.to_string()).unwrap_or_default();
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let sm2 = sm.clone();
        let Ok(Ok(now)) = tokio::task::spawn_blocking(move || conditions(&sm2)).await else { continue };
        for (event, alert) in sm.alerts.update(now, now_ms()) {
            match event {
                "raised" => {
                    tracing::warn!(kind = ?alert.kind, subject = %alert.subject_name, "alert: {}", alert.message)
                }
                _ => tracing::info!(kind = ?alert.kind, subject = %alert.subject_name, "alert cleared"),
            }
            let e = AlertEvent { event: event.to_string(), site: site.clone(), alert };
            if !sm.alerts.queue(e) {
                tracing::warn!("the webhook queue is full: an alert event is dropped");
            }
        }
    }
}

/// Posts events to the webhook in order, each retried with a doubling
/// wait; the receiver's slowness delays only this task.
async fn deliver(sm: std::sync::Arc<SiteManager>, mut rx: tokio::sync::mpsc::Receiver<AlertEvent>) {
    let client = match reqwest::Client::builder().timeout(Duration::from_secs(5)).build() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "no HTTP client for the alert webhook");
            return;
        }
    };
    while let Some(e) = rx.recv().await {
        let sm2 = sm.clone();
        let settings = tokio::task::spawn_blocking(move || sm2.with_store(|s| s.alert_settings.get(SETTINGS_KEY)))
            .await
            .ok()
            .and_then(Result::ok)
            .flatten()
            .unwrap_or_default();
        if settings.webhook_url.is_empty() {
            continue;
        }
        let body = match serde_json::to_vec(&e) {
            Ok(b) => b,
            Err(err) => {
                tracing::error!(error = %err, "cannot encode an alert event");
                continue;
            }
        };
        let mut wait = FIRST_RETRY;
        for attempt in 1..=ATTEMPTS {
            let req = client
                .post(&settings.webhook_url)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body.clone());
            match req.send().await {
                Ok(r) if r.status().is_success() => break,
                Ok(r) => tracing::warn!(status = %r.status(), attempt, "the alert webhook refused an event"),
                Err(err) => tracing::warn!(error = %err, attempt, "the alert webhook did not answer"),
            }
            if attempt == ATTEMPTS {
                tracing::error!(kind = ?e.alert.kind, "an alert event could not be delivered to the webhook");
            } else {
                tokio::time::sleep(wait).await;
                wait *= 2;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_is_short_only_for_a_vpg_older_than_its_policy_and_beyond_the_slack() {
        let stats = |available: u64| VpgStats {
            history_available_secs: available,
            history_policy_secs: 3600,
            ..VpgStats::empty(protection_groups::VpgId::new())
        };
        let hour = 3_600_000;
        // Young: an hour's history cannot be there after ten minutes.
        assert!(!history_short(hour / 6, &stats(600), 5000));
        // Old enough, and the journals hold only half: short.
        assert!(history_short(2 * hour, &stats(1800), 5000));
        // Within the slack (5 % of an hour is 180 s): not short.
        assert!(!history_short(2 * hour, &stats(3600 - 170), 5000));
        assert!(history_short(2 * hour, &stats(3600 - 190), 5000));
        // Nothing held at all by an old VPG: short.
        assert!(history_short(2 * hour, &stats(0), 5000));
    }
}
