//! The reconciler: drives what the VDSAs run towards what the VPGs ask for.
//! It computes each host's desired state, sends it when it changed, moves
//! VPG statuses and their tasks on from the VDSAs' reports, inserts the
//! automatic checkpoints, and marks checkpoints durable.

use crate::coordinator::CheckpointRequest;
use crate::model::{now_ms, CompletionCode, Host, TestState, Vpg};
use crate::state::SiteManager;
use protection_groups::mgmt::{DesiredState, ManagerMessage, RoleKind, RolePhase, SourceRole, TapAttach, TargetRole};
use protection_groups::{CheckpointKind, HostId, StreamId, VpgId, VpgStatus};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// The stream of a VPG from one source host to one target host.
pub fn stream_id(vpg: VpgId, source: HostId, target: HostId) -> StreamId {
    let h = crate::pki::sha256_hex(format!("stream:{vpg}:{source}:{target}").as_bytes());
    let mut b = [0u8; 16];
    for (i, byte) in b.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&h[2 * i..2 * i + 2], 16).unwrap_or(0);
    }
    StreamId::from_bytes(b)
}

/// Whether a VPG replicates (has roles at its VDSAs): also while its
/// protection is paused on a full recovery journal.
fn replicates(v: &Vpg) -> bool {
    matches!(v.status, VpgStatus::Initializing | VpgStatus::Protecting | VpgStatus::Test)
        || (matches!(v.status, VpgStatus::Error | VpgStatus::MissingConfiguration) && v.paused)
}

/// What the reconciler knows of the paired site.
#[derive(Debug, Clone, Default)]
pub struct PeerView {
    /// Copies of its VPGs that recover to this site.
    pub vpgs: Vec<Vpg>,
    pub hosts: Vec<crate::model::PeerHost>,
    /// Its CA, for the VDSAs to trust.
    pub trusted: Vec<protection_groups::mgmt::TrustedSite>,
}

/// Every host's desired state for this site's VPGs and the paired site's
/// copies (hosts with nothing get an empty one, which takes their roles
/// down). A VPG's source roles run at this site's hosts only; its target
/// roles at the hosts of the site it recovers to, set up by that site's
/// manager from its copy. Each target role serves the stacks of the VPG's
/// running failover tests (`tests`).
pub fn desired_states(
    vpgs: &[Vpg],
    hosts: &[Host],
    peer: &PeerView,
    tests: &[crate::model::FailoverTest],
) -> BTreeMap<HostId, DesiredState> {
    let mut out: BTreeMap<HostId, DesiredState> = hosts
        .iter()
        .map(|h| (h.id, DesiredState { trusted_sites: peer.trusted.clone(), ..DesiredState::default() }))
        .collect();
    let own = |id: HostId| hosts.iter().any(|h| h.id == id);
    let address = |id: HostId| {
        hosts
            .iter()
            .find(|h| h.id == id)
            .and_then(|h| h.replication_address.clone())
            .or_else(|| peer.hosts.iter().find(|h| h.id == id).and_then(|h| h.replication_address.clone()))
    };
    let all = vpgs.iter().map(|v| (v, true)).chain(peer.vpgs.iter().map(|v| (v, false)));
    // A failed-over VPG keeps its target roles (journals open, no stream
    // accepted) for its failover stack; its sources stop.
    for (v, ours) in all.filter(|(v, _)| replicates(v) || v.status.is_failed_over()) {
        let failed_over = v.status.is_failed_over();
        // (source host, target host) -> disks
        let mut pairs: BTreeMap<(HostId, HostId), Vec<protection_groups::DiskSpec>> = BTreeMap::new();
        let mut taps: BTreeMap<(HostId, HostId), Vec<TapAttach>> = BTreeMap::new();
        let mut quiesce: BTreeMap<(HostId, HostId), Vec<protection_groups::mgmt::VmQuiesce>> = BTreeMap::new();
        for vm in &v.settings.vms {
            pairs.entry((vm.host, vm.recovery_host)).or_default().extend(vm.disks.iter().cloned());
            if let Some(spec) = &vm.quiesce {
                quiesce.entry((vm.host, vm.recovery_host)).or_default().push(protection_groups::mgmt::VmQuiesce {
                    vm: vm.id,
                    name: vm.name.clone(),
                    spec: spec.clone(),
                });
            }
            // A KVM VM names its QMP socket: its VDSA attaches the taps.
            if !vm.hypervisor_ref.is_empty() {
                taps.entry((vm.host, vm.recovery_host)).or_default().extend(
                    vm.disks.iter().filter(|d| !d.device.is_empty()).map(|d| TapAttach {
                        disk: d.id,
                        qmp_socket: vm.hypervisor_ref.clone(),
                        device: d.device.clone(),
                    }),
                );
            }
        }
        let mut into: BTreeMap<HostId, Vec<StreamId>> = BTreeMap::new();
        for &(src, dst) in pairs.keys() {
            into.entry(dst).or_default().push(stream_id(v.id, src, dst));
        }
        for (&(src, dst), disks) in pairs.iter().filter(|((src, _), _)| ours && own(*src) && !failed_over) {
            let Some(target_address) = address(dst) else { continue };
            let streams_to_target = u16::try_from(into.get(&dst).map_or(1, Vec::len)).unwrap_or(u16::MAX);
            out.entry(src).or_default().sources.push(SourceRole {
                vpg: v.id,
                stream: stream_id(v.id, src, dst),
                epoch: v.epoch,
                target_host: dst,
                target_address,
                disks: disks.clone(),
                streams_to_target,
                bandwidth_bytes_per_sec: 0,
                taps: taps.get(&(src, dst)).cloned().unwrap_or_default(),
                quiesce: quiesce.get(&(src, dst)).cloned().unwrap_or_default(),
                power_off: v.moving,
            });
        }
        for (dst, streams) in into.into_iter().filter(|(dst, _)| own(*dst)) {
            let disks: Vec<protection_groups::DiskSpec> =
                pairs.iter().filter(|((_, d), _)| *d == dst).flat_map(|(_, ds)| ds.iter().cloned()).collect();
            let seeds = v.seeds.iter().filter(|s| disks.iter().any(|d| d.id == s.disk)).cloned().collect();
            out.entry(dst).or_default().targets.push(TargetRole {
                vpg: v.id,
                epoch: v.epoch,
                streams: if failed_over { Vec::new() } else { streams },
                disks,
                retention: v.settings.retention(),
                stacks: tests
                    .iter()
                    .filter(|t| t.vpg == v.id && t.serves())
                    .map(|t| protection_groups::mgmt::StackSpec {
                        id: t.id,
                        checkpoint: t.checkpoint,
                        promote: t.commit_task.is_some(),
                        vm_configs: t
                            .vm_networks
                            .iter()
                            .map(|n| protection_groups::mgmt::VmConfig { vm: n.vm, text: n.config_text() })
                            .collect(),
                    })
                    .collect(),
                seeds,
            });
        }
    }
    out
}

/// Tasks that end when their VPG's initial sync does.
const INITIAL_SYNC_TASKS: [&str; 2] = ["create_vpg", "reverse_protection"];

/// The reconciler runs at least this often (automatic checkpoints are
/// scheduled to this resolution), and at once after any change.
const TICK: Duration = Duration::from_millis(100);

/// What the reconciler remembers between passes.
#[derive(Debug, Default)]
struct Memory {
    /// Per host: the desired state last sent, and to which session.
    sent: HashMap<HostId, (u64, DesiredState)>,
    /// When expired registration waits were last looked for.
    expiry_checked: Option<std::time::Instant>,
    version: u64,
    /// Per VPG: when its next automatic checkpoint is due, and the
    /// interval that was computed with (a changed interval reschedules).
    next_checkpoint: HashMap<VpgId, (Instant, u64)>,
    /// Per VPG with a schedule: when its next application-consistent
    /// checkpoint is due (the automatic one then quiesces).
    next_app_consistent: HashMap<VpgId, Instant>,
    in_flight: HashSet<VpgId>,
    /// Per VPG, the newest checkpoint whose durability was settled: only
    /// newer ones listed by the targets are looked up in the store.
    durable_seen: HashMap<VpgId, protection_groups::CheckpointId>,
}

/// Runs until the daemon stops.
pub async fn run(sm: Arc<SiteManager>) {
    let mut mem = Memory { version: sm.generation() << 32, ..Memory::default() };
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<VpgId>();
    loop {
        tokio::select! {
            _ = sm.changes.notified() => {}
            _ = tokio::time::sleep(TICK) => {}
            Some(v) = done_rx.recv() => { mem.in_flight.remove(&v); }
        }
        let sm2 = sm.clone();
        let loaded = tokio::task::spawn_blocking(move || -> Result<_, crate::store::StoreError> {
            let peer = PeerView {
                vpgs: sm2.with_store(|s| s.peer_vpgs.list())?,
                hosts: sm2.peering.hosts(),
                trusted: crate::peering::trusted_sites(&sm2)?,
            };
            Ok((
                sm2.with_store(|s| s.vpgs.list())?,
                sm2.with_store(|s| s.hosts.list())?,
                peer,
                sm2.with_store(|s| s.tests.list())?,
            ))
        })
        .await;
        let (vpgs, hosts, peer, tests) = match loaded {
            Ok(Ok(x)) => x,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "reconciler cannot read the store");
                continue;
            }
            Err(_) => continue,
        };
        push_desired(&sm, &mut mem, &vpgs, &hosts, &peer, &tests).await;
        {
            let (sm2, v2, t2) = (sm.clone(), vpgs.clone(), tests.clone());
            if let Ok(Err(e)) = tokio::task::spawn_blocking(move || test_status(&sm2, &v2, &t2)).await {
                tracing::error!(error = %e, "reconciler cannot set the test status");
            }
        }
        if tests.iter().any(|t| {
            matches!(t.state, TestState::Starting | TestState::Running | TestState::Stopping)
                || crate::recovery_vms::still_there(&t.recovery_vms)
        }) {
            let sm2 = sm.clone();
            if let Ok(Err(e)) = tokio::task::spawn_blocking(move || advance_tests(&sm2, &tests)).await {
                tracing::error!(error = %e, "reconciler cannot advance failover tests");
            }
        }
        let sm2 = sm.clone();
        let v2 = vpgs.clone();
        let mut seen = std::mem::take(&mut mem.durable_seen);
        match tokio::task::spawn_blocking(move || (advance_statuses(&sm2, &v2, &mut seen), seen)).await {
            Ok((r, seen)) => {
                mem.durable_seen = seen;
                if let Err(e) = r {
                    tracing::error!(error = %e, "reconciler cannot advance VPG statuses");
                }
            }
            Err(e) => tracing::error!(error = %e, "reconciler pass failed"),
        }
        schedule_checkpoints(&sm, &mut mem, &vpgs, &done_tx);
        if mem.expiry_checked.is_none_or(|t| t.elapsed() >= EXPIRY_CHECK_EVERY) {
            mem.expiry_checked = Some(std::time::Instant::now());
            let sm2 = sm.clone();
            if let Ok(Err(e)) = tokio::task::spawn_blocking(move || crate::deploy::expire_register_waits(&sm2)).await {
                tracing::error!(error = %e, "cannot expire registration waits");
            }
        }
    }
}

/// How often expired registration waits are looked for.
const EXPIRY_CHECK_EVERY: Duration = Duration::from_secs(60);

async fn push_desired(
    sm: &SiteManager,
    mem: &mut Memory,
    vpgs: &[Vpg],
    hosts: &[Host],
    peer: &PeerView,
    tests: &[crate::model::FailoverTest],
) {
    let links = sm.links.sessions();
    let generation = sm.generation();
    for (host, mut state) in desired_states(vpgs, hosts, peer, tests) {
        let Some(&(_, session)) = links.iter().find(|(h, _)| *h == host) else { continue };
        let unchanged = mem.sent.get(&host).is_some_and(|(s, d)| {
            *s == session
                && d.sources == state.sources
                && d.targets == state.targets
                && d.trusted_sites == state.trusted_sites
        });
        if unchanged {
            continue;
        }
        mem.version += 1;
        state.version = mem.version;
        if let Some(tx) = sm.links.sender(host) {
            if tx.send(ManagerMessage::Desired { generation, state: state.clone() }).await.is_ok() {
                mem.sent.insert(host, (session, state));
            }
        }
    }
}

/// Moves VPGs on from what the VDSAs report: Initializing to Protecting
/// once every source role protects; a removal finishes once no VDSA runs
/// a role of it. Marks checkpoints durable.
fn advance_statuses(
    sm: &SiteManager,
    vpgs: &[Vpg],
    seen: &mut HashMap<VpgId, protection_groups::CheckpointId>,
) -> Result<(), crate::store::StoreError> {
    // Target roles at the paired site count as this site's own do.
    let mut reports: Vec<protection_groups::mgmt::RoleState> = sm.links.roles();
    reports.extend(sm.peering.target_roles());
    // Tasks are read only when a VPG's status or progress moves.
    let mut tasks_cache: Option<Vec<crate::model::Task>> = None;
    let mut tasks = || -> Result<Vec<crate::model::Task>, crate::store::StoreError> {
        if tasks_cache.is_none() {
            tasks_cache = Some(sm.with_store(|s| s.tasks.list())?);
        }
        Ok(tasks_cache.clone().unwrap_or_default())
    };
    for v in vpgs {
        let roles: Vec<_> = reports.iter().filter(|r| r.vpg == v.id).collect();
        match v.status {
            VpgStatus::RemoveInProgress if roles.is_empty() => {
                sm.with_store(|s| {
                    for cp in s.checkpoints.list_prefix(v.id.as_bytes())? {
                        s.checkpoints.remove(&crate::store::checkpoint_key(v.id, cp.id))?;
                    }
                    s.vpgs.remove(v.id.as_bytes())
                })?;
                for t in tasks()?.iter().filter(|t| t.vpg == Some(v.id) && !t.is_finished()) {
                    let code = if t.kind == "remove_vpg" { CompletionCode::Success } else { CompletionCode::Aborted };
                    sm.finish_task(t.id, code, serde_json::json!({"removed": v.id}), None)?;
                }
                tracing::info!(vpg = %v.id, name = %v.settings.name, "VPG removed");
            }
            VpgStatus::Initializing => {
                let sources = desired_source_count(v);
                let protecting =
                    roles.iter().filter(|r| r.kind == RoleKind::Source && r.phase == RolePhase::Protecting).count();
                let (done, total) = roles
                    .iter()
                    .filter(|r| r.kind == RoleKind::Source)
                    .fold((0u64, 0u64), |(d, t), r| (d + r.sync_done_bytes, t + r.sync_total_bytes));
                if sources > 0 && protecting == sources {
                    let mut nv = v.clone();
                    nv.status = v.status.transition(VpgStatus::Protecting).map_err(|e| {
                        crate::store::StoreError::Corrupt { tree: "vpgs", key: v.id.to_string(), why: e.to_string() }
                    })?;
                    nv.status_reason = String::new();
                    sm.with_store(|s| s.vpgs.put(nv.id.as_bytes(), &nv))?;
                    for t in tasks()?.iter().filter(|t| {
                        t.vpg == Some(v.id) && INITIAL_SYNC_TASKS.contains(&t.kind.as_str()) && !t.is_finished()
                    }) {
                        sm.finish_task(
                            t.id,
                            CompletionCode::Success,
                            serde_json::json!({"status": "Protecting"}),
                            None,
                        )?;
                    }
                } else if let Some(pct) = done.saturating_mul(100).checked_div(total) {
                    let pct = u8::try_from(pct).unwrap_or(100).min(99);
                    for t in tasks()?.iter().filter(|t| {
                        t.vpg == Some(v.id) && INITIAL_SYNC_TASKS.contains(&t.kind.as_str()) && !t.is_finished()
                    }) {
                        if t.progress != pct {
                            sm.update_task(t.id, |t| t.progress = pct)?;
                        }
                    }
                }
            }
            _ => {}
        }
        pause_or_resume(sm, v, &roles)?;
        mark_durable(sm, v, &roles, seen)?;
    }
    Ok(())
}

/// A committed failover's stacks are promoted: its VPG's status says so.
fn promotion_complete(sm: &SiteManager, t: &crate::model::FailoverTest) -> Result<(), crate::store::StoreError> {
    // A copy of the other site's VPG is this site's to set; that site
    // learns it from the exchange.
    let Some((mut v, copy)) = sm.with_store(|s| s.vpg_or_copy(t.vpg))? else {
        return Ok(());
    };
    let next = match v.status {
        VpgStatus::PromotingAndNeedReverseConfiguration => VpgStatus::NeedReverseConfiguration,
        VpgStatus::Promoting => VpgStatus::PromotionCompleteMirrorsNotYetActivated,
        VpgStatus::PromotingAndMissingConfiguration => VpgStatus::MissingConfiguration,
        _ => return Ok(()),
    };
    v.status = next;
    v.status_reason = format!("failed over to {} and committed: the replica is the recovered disks", t.checkpoint);
    sm.with_store(|s| s.put_vpg(&v, copy))?;
    sm.changed();
    Ok(())
}

/// Pauses protection while a role cannot work, naming why: a target whose
/// journal refuses writes (status Error), a source whose VM's monitor does
/// not answer (status MissingConfiguration: the VM was deleted or shut
/// down). The roles keep running (`paused`), so it resumes on its own once
/// none fails.
fn pause_or_resume(
    sm: &SiteManager,
    v: &Vpg,
    roles: &[&protection_groups::mgmt::RoleState],
) -> Result<(), crate::store::StoreError> {
    let failed = |kind: RoleKind| -> Vec<&str> {
        roles.iter().filter(|r| r.kind == kind && r.phase == RolePhase::Failed).map(|r| r.detail.as_str()).collect()
    };
    let (targets_failed, sources_failed) = (failed(RoleKind::Target), failed(RoleKind::Source));
    let targets_reporting = roles.iter().any(|r| r.kind == RoleKind::Target);
    let next = match (v.status, v.paused) {
        (VpgStatus::Protecting | VpgStatus::Initializing | VpgStatus::Test, false)
            if !targets_failed.is_empty() || !sources_failed.is_empty() =>
        {
            let mut nv = v.clone();
            let (status, why) = if targets_failed.is_empty() {
                (
                    VpgStatus::MissingConfiguration,
                    format!("{}; it resumes when the VM answers again", sources_failed.join("; ")),
                )
            } else {
                (
                    VpgStatus::Error,
                    format!(
                        "{}; the protected site's writes wait in its queues until the recovery volume has room",
                        targets_failed.join("; ")
                    ),
                )
            };
            nv.status = v.status.transition(status).unwrap_or(VpgStatus::Error);
            nv.paused = true;
            nv.status_reason = format!("protection paused: {why}");
            tracing::error!(vpg = %v.id, reason = %nv.status_reason, "VPG paused");
            Some(nv)
        }
        (VpgStatus::Error | VpgStatus::MissingConfiguration, true)
            if targets_failed.is_empty() && sources_failed.is_empty() && targets_reporting =>
        {
            let mut nv = v.clone();
            // A source still copying (the pause came during the initial
            // sync) goes back to Initializing, which finishes on its own.
            let syncing = roles.iter().any(|r| r.kind == RoleKind::Source && r.phase == RolePhase::Syncing);
            nv.status = if syncing { VpgStatus::Initializing } else { VpgStatus::Protecting };
            nv.paused = false;
            nv.status_reason = "resumed: every role works again".into();
            tracing::warn!(vpg = %v.id, "VPG resumed");
            Some(nv)
        }
        _ => None,
    };
    if let Some(nv) = next {
        sm.with_store(|s| {
            s.vpgs.put(nv.id.as_bytes(), &nv)?;
            s.flush()
        })?;
    }
    Ok(())
}

/// How many source roles (one per protected host and recovery host pair)
/// the VPG runs.
pub(crate) fn desired_source_count(v: &Vpg) -> usize {
    let pairs: HashSet<(HostId, HostId)> = v.settings.vms.iter().map(|m| (m.host, m.recovery_host)).collect();
    pairs.len()
}

/// Marks a VPG's checkpoints durable once every target VDSA lists them as
/// recoverable in its journal. A checkpoint some stream never completed
/// (a VDSA died between PREPARE and COMMIT) is never listed, so never
/// offered.
fn mark_durable(
    sm: &SiteManager,
    v: &Vpg,
    roles: &[&protection_groups::mgmt::RoleState],
    seen: &mut HashMap<VpgId, protection_groups::CheckpointId>,
) -> Result<(), crate::store::StoreError> {
    let floor = seen.get(&v.id).copied().unwrap_or(protection_groups::CheckpointId(0));
    let targets: HashSet<HostId> = v.settings.vms.iter().map(|m| m.recovery_host).collect();
    let reported: Vec<_> = roles.iter().filter(|r| r.kind == RoleKind::Target).collect();
    if targets.is_empty() || reported.len() < targets.len() {
        return Ok(());
    }
    let Some(first) = reported.first() else { return Ok(()) };
    let mut everywhere: Vec<protection_groups::CheckpointId> = first
        .recoverable_checkpoints
        .iter()
        .filter(|id| **id > floor && reported.iter().all(|r| r.recoverable_checkpoints.contains(id)))
        .copied()
        .collect();
    if everywhere.is_empty() {
        return Ok(());
    }
    everywhere.sort();
    sm.with_store(|s| {
        let mut changed = false;
        for id in everywhere {
            let key = crate::store::checkpoint_key(v.id, id);
            // A target can list a checkpoint a moment before the
            // coordinator has recorded it: stop there and look again.
            let Some(mut cp) = s.checkpoints.get(&key)? else { break };
            if !cp.durable && cp.consistent {
                cp.durable = true;
                s.put_checkpoint_unflushed(&cp)?;
                changed = true;
            }
            seen.insert(v.id, id);
        }
        if changed {
            s.flush()?;
        }
        Ok(())
    })
}

fn schedule_checkpoints(
    sm: &Arc<SiteManager>,
    mem: &mut Memory,
    vpgs: &[Vpg],
    done: &tokio::sync::mpsc::UnboundedSender<VpgId>,
) {
    let now = Instant::now();
    let connected = sm.links.connected();
    for v in vpgs.iter().filter(|v| replicates(v)) {
        let interval = v.settings.checkpoint_interval_ms;
        let entry = mem.next_checkpoint.entry(v.id).or_insert((now, interval));
        if entry.1 != interval {
            *entry = (now + Duration::from_millis(interval).min(entry.0.saturating_duration_since(now)), interval);
        }
        if now < entry.0 || mem.in_flight.contains(&v.id) {
            continue;
        }
        // A VPG none of whose source VDSAs is connected gets no automatic
        // checkpoint (it could only be aborted); a named one still is
        // tried and recorded as not consistent, saying why.
        if !v.settings.protected_hosts().iter().any(|h| connected.contains(h)) {
            continue;
        }
        mem.next_checkpoint.insert(v.id, (now + Duration::from_millis(interval), interval));
        let app_every = Duration::from_secs(v.settings.app_consistent_interval_secs);
        let quiesce = if app_every.is_zero() {
            mem.next_app_consistent.remove(&v.id);
            false
        } else {
            let due = mem.next_app_consistent.entry(v.id).or_insert(now + app_every);
            if now >= *due {
                *due = now + app_every;
                true
            } else {
                false
            }
        };
        mem.in_flight.insert(v.id);
        let (sm, done, vpg) = (sm.clone(), done.clone(), v.id);
        let hosts = v.settings.protected_hosts();
        tokio::spawn(async move {
            let sm2 = sm.clone();
            let id = tokio::task::spawn_blocking(move || sm2.with_store(|s| s.next_checkpoint_id())).await;
            if let Ok(Ok(id)) = id {
                let name = if quiesce { "scheduled application-consistent".to_string() } else { String::new() };
                let req = CheckpointRequest { vpg, hosts, kind: CheckpointKind::Automatic, name, id, quiesce };
                if let Err(e) = sm.take_checkpoint(req).await {
                    tracing::error!(%vpg, error = %e, "cannot record a checkpoint");
                }
            }
            let _ = done.send(vpg);
        });
    }
}

/// Moves failover tests on from what this site's recovery VDSAs report: a
/// starting test runs once every target role of its VPG serves its stack
/// (or fails, naming why); a stopping one is a record once none does.
/// A VPG of this site is Test while a failover test of it runs, and
/// Protecting again when none does.
fn test_status(
    sm: &SiteManager,
    vpgs: &[Vpg],
    tests: &[crate::model::FailoverTest],
) -> Result<(), crate::store::StoreError> {
    for v in vpgs {
        let testing =
            tests.iter().any(|t| t.vpg == v.id && t.purpose == crate::model::StackPurpose::Test && t.serves());
        let next = match (v.status, testing) {
            (VpgStatus::Protecting, true) => VpgStatus::Test,
            (VpgStatus::Test, false) => VpgStatus::Protecting,
            _ => continue,
        };
        let changed = sm.with_store(|s| {
            // Read again: the API may have changed it since this pass read it.
            let Some(mut now) = s.vpgs.get(v.id.as_bytes())? else { return Ok(false) };
            if now.status != v.status {
                return Ok(false);
            }
            now.status = next;
            now.status_reason =
                if testing { "failover tests running; replication goes on".into() } else { String::new() };
            s.vpgs.put(v.id.as_bytes(), &now)?;
            Ok(true)
        })?;
        if changed {
            sm.changed();
        }
    }
    Ok(())
}

/// Whether a test runs with its VMs settled (made, or failed to be).
fn is_ready(t: &crate::model::FailoverTest) -> bool {
    t.state == TestState::Running && crate::recovery_vms::settled(&t.recovery_vms)
}

type Finish = (uuid::Uuid, CompletionCode, serde_json::Value, Option<String>);

/// The start task's end once `t` is ready: it completes when every test
/// it started is ready (`t`'s stored record is older), failed if any
/// test's VMs could not be made.
fn start_finished(
    sm: &SiteManager,
    t: &crate::model::FailoverTest,
) -> Result<Option<Finish>, crate::store::StoreError> {
    let siblings = sm.with_store(|s| s.tests.list())?;
    let others: Vec<_> = siblings.iter().filter(|o| o.start_task == t.start_task && o.id != t.id).collect();
    if !others.iter().all(|o| is_ready(o)) {
        return Ok(None);
    }
    let failed = std::iter::once(t)
        .chain(others.iter().copied())
        .find(|o| o.recovery_vms.phase == crate::model::RecoveryVmsPhase::Failed);
    let result = serde_json::to_value(t).unwrap_or_default();
    Ok(Some(match failed {
        None => (t.start_task, CompletionCode::Success, result, None),
        Some(f) => (
            t.start_task,
            CompletionCode::Failed,
            result,
            Some(format!(
                "test {} runs (its exports serve) but its VMs could not be made: {}",
                f.id, f.recovery_vms.detail
            )),
        ),
    }))
}

fn advance_tests(sm: &Arc<SiteManager>, tests: &[crate::model::FailoverTest]) -> Result<(), crate::store::StoreError> {
    let reports = sm.links.roles();
    for t in tests {
        let targets: Vec<_> = reports.iter().filter(|r| r.vpg == t.vpg && r.kind == RoleKind::Target).collect();
        let reported: Vec<_> = targets.iter().filter_map(|r| r.stacks.iter().find(|s| s.id == t.id)).collect();
        let stacks: Vec<_> = reported.iter().copied().filter(|s| !s.discarded).collect();
        let mut next = t.clone();
        // The task finishes only after the record is stored: a client that
        // sees the task completed reads the record with its exports.
        let mut finish = None;
        let mut promoted = false;
        match t.state {
            TestState::Starting | TestState::Running => {
                // Counted since each stack was opened: a VDSA restart (or a
                // promotion) starts it again, the record keeps the most.
                next.written_bytes = t.written_bytes.max(stacks.iter().map(|s| s.written_bytes).sum());
                if t.state == TestState::Running && !targets.is_empty() && stacks.len() == targets.len() {
                    // A restarted VDSA serves on a new address.
                    let mut exports: Vec<_> = stacks.iter().flat_map(|s| s.exports.iter().cloned()).collect();
                    exports.sort_by_key(|e| e.disk);
                    if !exports.is_empty() {
                        next.exports = exports;
                    }
                }
                // The VMs' config disks, as served.
                for n in &mut next.vm_networks {
                    if let Some(c) = stacks.iter().flat_map(|s| s.configs.iter()).find(|c| c.vm == n.vm) {
                        n.config_uri.clone_from(&c.uri);
                    }
                }
                if let Some(problem) = stacks.iter().find(|s| !s.problem.is_empty()).map(|s| s.problem.clone()) {
                    next.state = TestState::Failed;
                    next.detail = format!("a recovery VDSA cannot serve the test: {problem}");
                    next.stopped_ms = Some(now_ms());
                    next.exports.clear();
                    finish = Some((
                        t.start_task,
                        CompletionCode::Failed,
                        serde_json::json!({"test": t.id}),
                        Some(next.detail.clone()),
                    ));
                } else if t.state == TestState::Starting && !targets.is_empty() && stacks.len() == targets.len() {
                    next.state = TestState::Running;
                    next.ready_ms = Some(now_ms());
                    next.exports = stacks.iter().flat_map(|s| s.exports.iter().cloned()).collect();
                    next.exports.sort_by_key(|e| e.disk);
                    tracing::info!(vpg = %t.vpg, test = %t.id, checkpoint = %t.checkpoint,
                        ms = next.ready_ms.unwrap_or(0).saturating_sub(t.started_ms), "failover test running");
                } else if let (TestState::Running, Some(task), None) = (t.state, t.commit_task, t.promoted_ms) {
                    let promotions: Vec<_> = stacks.iter().filter_map(|s| s.promotion.as_ref()).collect();
                    let all_promoted = !targets.is_empty()
                        && stacks.len() == targets.len()
                        && promotions.len() == stacks.len()
                        && promotions.iter().all(|p| p.promoted);
                    if all_promoted {
                        next.promoted_ms = Some(now_ms());
                        promoted = true;
                        finish = Some((
                            task,
                            CompletionCode::Success,
                            serde_json::to_value(&next).unwrap_or_default(),
                            None,
                        ));
                        tracing::info!(vpg = %t.vpg, checkpoint = %t.checkpoint,
                            ms = now_ms().saturating_sub(t.committed_ms.unwrap_or(0)), "failover promoted");
                    } else {
                        let (done, total) =
                            promotions.iter().fold((0u64, 0u64), |(d, n), p| (d + p.done_bytes, n + p.total_bytes));
                        let pct = done.saturating_mul(100).checked_div(total).map_or(0, |p| p.min(99) as u8);
                        let error = promotions.iter().find(|p| !p.error.is_empty()).map(|p| p.error.clone());
                        sm.update_task(task, |k| {
                            k.progress = pct;
                            if let Some(e) = error {
                                k.exception = Some(format!("a recovery VDSA retries the promotion: {e}"));
                            }
                        })?;
                    }
                }
            }
            TestState::Stopping if stacks.is_empty() && !crate::recovery_vms::still_there(&t.recovery_vms) => {
                // The final count comes with the discarded stacks' reports.
                let last: u64 = reported.iter().map(|s| s.written_bytes).sum();
                next.written_bytes = next.written_bytes.max(last);
                next.state = TestState::Stopped;
                next.stopped_ms = Some(now_ms());
                next.exports.clear();
                if let Some(task) = t.stop_task {
                    finish =
                        Some((task, CompletionCode::Success, serde_json::to_value(&next).unwrap_or_default(), None));
                }
                tracing::info!(vpg = %t.vpg, test = %t.id, result = ?t.result, "failover test stopped");
            }
            _ => {}
        }
        crate::recovery_vms::advance(sm, t, &mut next);
        if is_ready(&next) && !is_ready(t) {
            finish = start_finished(sm, &next)?.or(finish);
        }
        if next != *t {
            sm.with_store(|s| s.tests.put(t.id.as_bytes(), &next))?;
        }
        if promoted {
            promotion_complete(sm, t)?;
        }
        if let Some((task, code, result, detail)) = finish {
            sm.finish_task(task, code, result, detail)?;
        }
    }
    Ok(())
}
