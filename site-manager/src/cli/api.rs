//! The operator command over the API (docs/api.md): one subcommand per
//! operation, tables for people, `--json` for scripts, a progress bar
//! while a task runs, and a non-zero exit with the server's message when
//! it refuses.

use super::output::fields;
use crate::client::{ApiClient, ClientError};
use crate::model::{
    AuditEntry, Checkpoint, CreatedToken, Discarded, FailoverTask, FailoverTest, Host, Hypervisor, InsertedCheckpoint,
    NewCheckpoint, NewFailover, NewHost, NewTests, NewToken, PairRequest, PairingToken, Peer, RegistrationToken,
    ReverseProtection, Role, Site, SiteUpdate, StartedTests, StopTest, StoppingTest, Task, TestResult, Token, Vpg,
    VpgRole, VpgTask,
};
use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use reqwest::Method;
use serde::Serialize;
use std::path::PathBuf;
use std::time::Duration;

/// Where the API is and how to authenticate.
#[derive(Args, Debug)]
pub struct ApiConnection {
    /// https://HOST:PORT of the site manager's API.
    #[arg(long, global = true, env = "SITE_MANAGER_API")]
    api: Option<String>,
    /// A file holding the API token.
    #[arg(long, global = true, env = "SITE_MANAGER_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// The site CA (PEM) the API's certificate must chain to.
    #[arg(long, global = true, env = "SITE_MANAGER_CA")]
    ca_file: Option<PathBuf>,
    /// A local site manager's data folder: its API address, admin token
    /// and CA are taken from there unless given.
    #[arg(long, global = true, env = "SITE_MANAGER_DATA")]
    data: Option<PathBuf>,
    /// Print JSON (the API's own) instead of tables.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Subcommand, Debug)]
pub enum ApiOp {
    /// This site: show, change, reclaim, the audit log.
    Site {
        #[command(flatten)]
        conn: ApiConnection,
        #[command(subcommand)]
        op: SiteOp,
    },
    /// API tokens.
    Token {
        #[command(flatten)]
        conn: ApiConnection,
        #[command(subcommand)]
        op: TokenOp,
    },
    /// Hypervisor hosts and their VDSAs.
    Host {
        #[command(flatten)]
        conn: ApiConnection,
        #[command(subcommand)]
        op: HostOp,
    },
    /// Protection groups.
    Vpg {
        #[command(flatten)]
        conn: ApiConnection,
        #[command(subcommand)]
        op: VpgOp,
    },
    /// Checkpoints of a VPG.
    Checkpoint {
        #[command(flatten)]
        conn: ApiConnection,
        #[command(subcommand)]
        op: CheckpointOp,
    },
    /// Failover tests: several checkpoints at once, each exported over NBD.
    Test {
        #[command(flatten)]
        conn: ApiConnection,
        #[command(subcommand)]
        op: TestOp,
    },
    /// The command tracker.
    Task {
        #[command(flatten)]
        conn: ApiConnection,
        #[command(subcommand)]
        op: TaskOp,
    },
    /// Pairing with the other site.
    Peer {
        #[command(flatten)]
        conn: ApiConnection,
        #[command(subcommand)]
        op: PeerOp,
    },
    /// Alerts, a VPG's stats and health report, the sizing analyzer.
    Monitor {
        #[command(flatten)]
        conn: ApiConnection,
        #[command(subcommand)]
        op: super::monitor::MonitorOp,
    },
    /// The log collector.
    #[command(subcommand_required = true)]
    Logs {
        #[command(flatten)]
        conn: ApiConnection,
        #[command(subcommand)]
        op: LogsOp,
    },
}

#[derive(Subcommand, Debug)]
pub enum SiteOp {
    /// This site's details.
    Show,
    /// Change the site's settings.
    Set {
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        location: Option<String>,
        #[arg(long)]
        contact: Option<String>,
        #[arg(long)]
        address: Option<String>,
        #[arg(long)]
        replication_port: Option<u16>,
    },
    /// After a restore from a backup: steer the VDSAs again.
    Reclaim,
    /// The newest entries of the audit log.
    Audit {
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
}

#[derive(Subcommand, Debug)]
pub enum TokenOp {
    /// Every token (never a secret).
    List,
    /// Prints the secret once.
    Create {
        #[arg(long)]
        name: String,
        #[arg(long, value_parser = ["admin", "operator", "viewer"])]
        role: String,
    },
    /// Revoke a token by id.
    Revoke { id: String },
}

#[derive(Subcommand, Debug)]
pub enum HostOp {
    /// Every host with its VDSA's state.
    List,
    /// One host.
    Show { id: String },
    /// Add a host (its VDSA is not installed yet).
    Add {
        #[arg(long)]
        name: String,
        #[arg(long, value_parser = ["kvm", "vsphere"], default_value = "kvm")]
        hypervisor: String,
    },
    /// Remove a host no VPG uses.
    Remove { id: String },
    /// A one-time registration token for the host's VDSA.
    RegistrationToken { id: String },
}

#[derive(Subcommand, Debug)]
pub enum VpgOp {
    /// Every VPG with its status.
    List,
    /// One VPG.
    Show { id: String },
    /// Create from a JSON file of settings (docs/api.md); waits for the
    /// initial sync unless --no-wait.
    Create {
        #[arg(long)]
        file: PathBuf,
        #[arg(long)]
        no_wait: bool,
    },
    /// Replace the settings from a JSON file.
    Update {
        id: String,
        #[arg(long)]
        file: PathBuf,
    },
    /// Remove a VPG (waits for its roles to stop unless --no-wait).
    Remove {
        id: String,
        #[arg(long)]
        force: bool,
        #[arg(long)]
        no_wait: bool,
    },
    /// Add a VM from a JSON file.
    AddVm {
        id: String,
        #[arg(long)]
        file: PathBuf,
    },
    /// Remove a VM from a VPG.
    RemoveVm { id: String, vm: String },
    /// Fail over to a checkpoint (the newest with none named): replication
    /// stops and the disks at it are exported; waits until they are.
    Failover {
        id: String,
        #[arg(long)]
        checkpoint: Option<u64>,
        #[arg(long)]
        no_wait: bool,
    },
    /// Roll a failover back (before commit): its writes are discarded and
    /// protection resumes.
    Rollback {
        id: String,
        #[arg(long)]
        no_wait: bool,
    },
    /// Commit a failover: promote it into the replica (no roll back after).
    Commit {
        id: String,
        #[arg(long)]
        no_wait: bool,
    },
    /// Reverse-protect a committed failover from a JSON file
    /// (`{vms: [{vm, hypervisor_ref, disks: [{disk, device, seed_path}]}]}`,
    /// docs/api.md); waits for the delta sync unless --no-wait.
    ReverseProtect {
        id: String,
        #[arg(long)]
        file: PathBuf,
        #[arg(long)]
        no_wait: bool,
    },
    /// The VPG's roles as their VDSAs report them.
    Roles { id: String },
    /// Move to the recovery site with no data lost: power the VMs off, take
    /// a last checkpoint, fail over to it and commit.
    Move {
        id: String,
        #[arg(long)]
        no_wait: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum CheckpointOp {
    /// The VPG's checkpoint catalog.
    List { vpg: String },
    /// Insert a named checkpoint; with --wait, until it is durable.
    Insert {
        vpg: String,
        #[arg(long)]
        name: String,
        #[arg(long)]
        wait: bool,
        /// Quiesce the VMs around it (those that name a way).
        #[arg(long)]
        app_consistent: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum TestOp {
    /// Start one test per --checkpoint (an id, or `latest`), at once;
    /// waits until every one is exported unless --no-wait.
    Start {
        vpg: String,
        #[arg(long = "checkpoint", required = true)]
        checkpoints: Vec<String>,
        #[arg(long)]
        no_wait: bool,
    },
    /// The VPG's tests, running and recorded.
    List { vpg: String },
    /// One test, with its export URIs while it runs.
    Show { id: String },
    /// Stop a test with a verdict: its overlays are freed, its record kept.
    Stop {
        id: String,
        /// pass or fail.
        #[arg(long)]
        result: String,
        #[arg(long, default_value = "")]
        notes: String,
    },
    /// Discard the VPG's records of stopped tests (older than --before-ms).
    Discard {
        vpg: String,
        #[arg(long)]
        before_ms: Option<u64>,
    },
    /// The clean-point search: rounds of --k failover tests, each checked
    /// by the command after `--` on the site manager's host (exit 0
    /// passes; the test's exports are in CLEAN_POINT_EXPORTS), narrowing
    /// to the newest checkpoint that passes. Prints each round as it
    /// ends, then the map of verdicts and the answer.
    CleanPoint {
        vpg: String,
        #[arg(long)]
        from: Option<u64>,
        #[arg(long)]
        to: Option<u64>,
        #[arg(long, default_value_t = 4)]
        k: usize,
        /// 1, or 3 (each verdict the best two of three runs).
        #[arg(long, default_value_t = 1)]
        repeats: u8,
        #[arg(long, default_value_t = 600)]
        test_timeout_secs: u64,
        #[arg(last = true, required = true)]
        check: Vec<String>,
    },
}

#[derive(Subcommand, Debug)]
pub enum TaskOp {
    /// Every task.
    List,
    /// One task.
    Show { id: String },
    /// Follow a task to its end with a progress bar.
    Wait { id: String },
}

#[derive(Subcommand, Debug)]
pub enum LogsOp {
    /// Bundle the site manager's and its VDSAs' logs into a tar.gz.
    Collect {
        /// How far back, in minutes.
        #[arg(long, default_value_t = 60)]
        minutes: u64,
        #[arg(long, value_parser = ["trace", "debug", "info", "warn", "error"], default_value = "info")]
        level: String,
        /// Where to write the bundle.
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
pub enum PeerOp {
    /// The paired site and its last contact.
    Show,
    /// Make a site pairing token for the other site's admin.
    Token,
    /// Pair with the site at ADDRESS using its token.
    Pair {
        #[arg(long)]
        address: String,
        #[arg(long, env = "SITE_PAIRING_TOKEN")]
        token: String,
    },
    /// Unpair (refused while a VPG spans the sites).
    Unpair,
    /// The copies of the paired site's VPGs that recover here.
    Vpgs,
}

fn client(c: &ApiConnection) -> Result<ApiClient> {
    let api = c.api.clone().unwrap_or_else(|| "https://127.0.0.1:9440".to_string());
    let token_file = c.token_file.clone().or_else(|| c.data.as_ref().map(|d| d.join("admin-token")));
    let token = match (token_file, std::env::var("SITE_MANAGER_TOKEN").ok()) {
        (Some(f), _) => std::fs::read_to_string(&f).with_context(|| format!("reading the token {}", f.display()))?,
        (None, Some(t)) => t,
        (None, None) => anyhow::bail!("give --token-file (or --data, or set SITE_MANAGER_TOKEN)"),
    };
    let ca_file = c.ca_file.clone().or_else(|| c.data.as_ref().map(|d| d.join("pki/ca.pem")));
    let ca_file = ca_file.context("give --ca-file with the site CA (or --data)")?;
    let ca = std::fs::read(&ca_file).with_context(|| format!("reading the site CA {}", ca_file.display()))?;
    Ok(ApiClient::new(&api, &token, &ca)?)
}

/// Prints `value` as JSON (`--json`), or `table` for people.
fn show<T: Serialize>(c: &ApiConnection, value: &T, table: impl FnOnce(&T) -> Vec<Vec<String>>) -> Result<()> {
    super::output::show(c.json, value, table)
}

/// UTC time of milliseconds since the epoch, for tables.
fn when(ms: u64) -> String {
    let secs = ms / 1000;
    let (h, m, s) = (secs / 3600 % 24, secs / 60 % 60, secs % 60);
    let (y, mo, d) = crate::model::civil_date(secs / 86_400);
    format!("{y:04}-{mo:02}-{d:02} {h:02}:{m:02}:{s:02}Z")
}

/// An enum as the API spells it.
fn word<T: Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        Ok(other) => other.to_string(),
        Err(_) => String::new(),
    }
}

fn json_file<T: serde::de::DeserializeOwned>(path: &PathBuf) -> Result<T> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    crate::api::parse_json(&bytes).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// Follows a task with a progress bar (or silently with --json) and fails
/// unless it succeeded.
fn follow(client: &ApiClient, c: &ApiConnection, task: &Task) -> Result<Task> {
    let bar = if c.json { ProgressBar::hidden() } else { ProgressBar::new(100) };
    bar.set_style(
        ProgressStyle::with_template("{msg:40} [{bar:30}] {pos:>3}%")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_message(task.description.clone());
    let done =
        client.wait_task(task.id, Duration::from_secs(24 * 3600), |t| bar.set_position(u64::from(t.progress)))?;
    bar.finish_and_clear();
    if done.completion != crate::model::CompletionCode::Success {
        anyhow::bail!(
            "task {} ({}) ended {:?}: {}",
            done.id,
            done.description,
            done.completion,
            done.exception.as_deref().unwrap_or("no reason given")
        );
    }
    Ok(done)
}

/// Follows a failover, roll back or commit task (unless `no_wait`), then
/// shows the failover's record as it stands.
fn failover_outcome(api: &ApiClient, c: &ApiConnection, ft: &FailoverTask, no_wait: bool) -> Result<()> {
    if !no_wait {
        follow(api, c, &ft.task)?;
    }
    let t: FailoverTest = api.get(&format!("/api/v1/failover-tests/{}", ft.failover.id.0))?;
    show(c, &t, |t| test_rows(std::slice::from_ref(t)))
}

fn vpg_rows(v: &[Vpg]) -> Vec<Vec<String>> {
    let mut rows = vec![vec!["ID".into(), "NAME".into(), "STATUS".into(), "VMS".into(), "RECOVERY SITE".into()]];
    rows.extend(v.iter().map(|v| {
        vec![
            v.id.to_string(),
            v.settings.name.clone(),
            v.status.to_string(),
            v.settings.vms.len().to_string(),
            v.settings.recovery_site.to_string(),
        ]
    }));
    rows
}

/// Runs one API operation.
pub fn run(op: ApiOp) -> Result<()> {
    let (c, op) = match op {
        ApiOp::Site { conn, op } => (conn, Op::Site(op)),
        ApiOp::Token { conn, op } => (conn, Op::Token(op)),
        ApiOp::Host { conn, op } => (conn, Op::Host(op)),
        ApiOp::Vpg { conn, op } => (conn, Op::Vpg(op)),
        ApiOp::Checkpoint { conn, op } => (conn, Op::Checkpoint(op)),
        ApiOp::Task { conn, op } => (conn, Op::Task(op)),
        ApiOp::Test { conn, op } => (conn, Op::Test(op)),
        ApiOp::Peer { conn, op } => (conn, Op::Peer(op)),
        ApiOp::Logs { conn, op } => (conn, Op::Logs(op)),
        ApiOp::Monitor { conn, op } => (conn, Op::Monitor(op)),
    };
    let c = &c;
    let api = client(c)?;
    let r = run_op(&api, c, op);
    // The server's refusal is the message, as it said it.
    r.map_err(|e| match e.downcast::<ClientError>() {
        Ok(ClientError::Refused { body, status, .. }) => {
            let field = body.field.map(|f| format!(" (field {f})")).unwrap_or_default();
            anyhow::anyhow!("the site manager refused ({status} {}): {}{field}", body.error, body.message)
        }
        Ok(other) => other.into(),
        Err(e) => e,
    })
}

/// An operation without its connection.
enum Op {
    Site(SiteOp),
    Token(TokenOp),
    Host(HostOp),
    Vpg(VpgOp),
    Checkpoint(CheckpointOp),
    Test(TestOp),
    Task(TaskOp),
    Peer(PeerOp),
    Logs(LogsOp),
    Monitor(super::monitor::MonitorOp),
}

fn run_op(api: &ApiClient, c: &ApiConnection, op: Op) -> Result<()> {
    match op {
        Op::Site(op) => match op {
            SiteOp::Show => show(c, &api.get::<Site>("/api/v1/site")?, site_rows),
            SiteOp::Set { name, location, contact, address, replication_port } => {
                let u = SiteUpdate { name, location, contact, address, replication_port };
                show(c, &api.call::<Site>(Method::PATCH, "/api/v1/site", Some(&u))?, site_rows)
            }
            SiteOp::Reclaim => {
                let v: serde_json::Value = api.post("/api/v1/site/reclaim", &serde_json::json!({}))?;
                show(c, &v, |v| fields(&[("result", v.to_string())]))
            }
            SiteOp::Audit { limit } => {
                let a: Vec<AuditEntry> = api.get(&format!("/api/v1/audit?limit={limit}"))?;
                show(c, &a, |a| {
                    let mut rows = vec![vec!["SEQ".into(), "WHO".into(), "STATUS".into(), "CALL".into()]];
                    rows.extend(a.iter().map(|e| {
                        vec![e.seq.to_string(), e.who.clone(), e.status.to_string(), format!("{} {}", e.method, e.path)]
                    }));
                    rows
                })
            }
        },
        Op::Token(op) => match op {
            TokenOp::List => show(c, &api.get::<Vec<Token>>("/api/v1/tokens")?, |t| {
                let mut rows = vec![vec!["ID".into(), "NAME".into(), "ROLE".into(), "REVOKED".into()]];
                rows.extend(t.iter().map(|t| {
                    vec![
                        t.id.to_string(),
                        t.name.clone(),
                        word(&t.role),
                        if t.revoked_ms.is_some() { "yes".into() } else { "no".into() },
                    ]
                }));
                rows
            }),
            TokenOp::Create { name, role } => {
                let role = match role.as_str() {
                    "admin" => Role::Admin,
                    "operator" => Role::Operator,
                    _ => Role::Viewer,
                };
                let t: CreatedToken = api.post("/api/v1/tokens", &NewToken { name, role })?;
                show(c, &t, |t| fields(&[("id", t.token.id.to_string()), ("secret", t.secret.clone())]))
            }
            TokenOp::Revoke { id } => {
                let t: Token = api.call(Method::DELETE, &format!("/api/v1/tokens/{id}"), None::<&()>)?;
                show(c, &t, |t| fields(&[("revoked", t.id.to_string())]))
            }
        },
        Op::Host(op) => match op {
            HostOp::List => show(c, &api.get::<Vec<Host>>("/api/v1/hosts")?, |h| host_rows(h)),
            HostOp::Show { id } => {
                show(c, &api.get::<Host>(&format!("/api/v1/hosts/{id}"))?, |h| host_rows(std::slice::from_ref(h)))
            }
            HostOp::Add { name, hypervisor } => {
                let hypervisor = if hypervisor == "vsphere" { Hypervisor::Vsphere } else { Hypervisor::Kvm };
                let h: Host = api.post("/api/v1/hosts", &NewHost { name, hypervisor })?;
                show(c, &h, |h| host_rows(std::slice::from_ref(h)))
            }
            HostOp::Remove { id } => {
                let h: serde_json::Value = api.call(Method::DELETE, &format!("/api/v1/hosts/{id}"), None::<&()>)?;
                show(c, &h, |_| fields(&[("removed", id.clone())]))
            }
            HostOp::RegistrationToken { id } => {
                let t: RegistrationToken =
                    api.call(Method::POST, &format!("/api/v1/hosts/{id}/registration-token"), None::<&()>)?;
                show(c, &t, |t| fields(&[("token", t.token.clone()), ("site manager", t.management_address.clone())]))
            }
        },
        Op::Vpg(op) => match op {
            VpgOp::List => show(c, &api.get::<Vec<Vpg>>("/api/v1/vpgs")?, |v| vpg_rows(v)),
            VpgOp::Show { id } => {
                show(c, &api.get::<Vpg>(&format!("/api/v1/vpgs/{id}"))?, |v| vpg_rows(std::slice::from_ref(v)))
            }
            VpgOp::Create { file, no_wait } => {
                let settings: protection_groups::VpgSettings = json_file(&file)?;
                let vt: VpgTask = api.post("/api/v1/vpgs", &settings)?;
                if !no_wait {
                    follow(api, c, &vt.task)?;
                }
                let v: Vpg = api.get(&format!("/api/v1/vpgs/{}", vt.vpg.id))?;
                show(c, &v, |v| vpg_rows(std::slice::from_ref(v)))
            }
            VpgOp::Update { id, file } => {
                let settings: protection_groups::VpgSettings = json_file(&file)?;
                let v: Vpg = api.call(Method::PUT, &format!("/api/v1/vpgs/{id}"), Some(&settings))?;
                show(c, &v, |v| vpg_rows(std::slice::from_ref(v)))
            }
            VpgOp::Remove { id, force, no_wait } => {
                let vt: VpgTask = api.call(Method::DELETE, &format!("/api/v1/vpgs/{id}?force={force}"), None::<&()>)?;
                let t = if no_wait { vt.task } else { follow(api, c, &vt.task)? };
                show(c, &t, |t| task_rows(std::slice::from_ref(t)))
            }
            VpgOp::AddVm { id, file } => {
                let vm: protection_groups::ProtectedVm = json_file(&file)?;
                let v: Vpg = api.post(&format!("/api/v1/vpgs/{id}/vms"), &vm)?;
                show(c, &v, |v| vpg_rows(std::slice::from_ref(v)))
            }
            VpgOp::RemoveVm { id, vm } => {
                let v: Vpg = api.call(Method::DELETE, &format!("/api/v1/vpgs/{id}/vms/{vm}"), None::<&()>)?;
                show(c, &v, |v| vpg_rows(std::slice::from_ref(v)))
            }
            VpgOp::Failover { id, checkpoint, no_wait } => {
                let ft: FailoverTask = api.post(&format!("/api/v1/vpgs/{id}/failover"), &NewFailover { checkpoint })?;
                failover_outcome(api, c, &ft, no_wait)
            }
            VpgOp::Rollback { id, no_wait } => {
                let ft: FailoverTask = api.post(&format!("/api/v1/vpgs/{id}/failover/rollback"), &())?;
                failover_outcome(api, c, &ft, no_wait)
            }
            VpgOp::Commit { id, no_wait } => {
                let ft: FailoverTask = api.post(&format!("/api/v1/vpgs/{id}/failover/commit"), &())?;
                failover_outcome(api, c, &ft, no_wait)
            }
            VpgOp::ReverseProtect { id, file, no_wait } => {
                let req: ReverseProtection = json_file(&file)?;
                let vt: VpgTask = api.post(&format!("/api/v1/vpgs/{id}/reverse-protection"), &req)?;
                let t = if no_wait { vt.task } else { follow(api, c, &vt.task)? };
                show(c, &t, |t| task_rows(std::slice::from_ref(t)))
            }
            VpgOp::Roles { id } => {
                let roles: Vec<VpgRole> = api.get(&format!("/api/v1/vpgs/{id}/roles"))?;
                show(c, &roles, |roles| {
                    let mut rows =
                        vec![["HOST", "KIND", "PHASE", "SYNC", "WRITTEN", "LINK", "DETAIL"].map(String::from).to_vec()];
                    for r in roles {
                        rows.push(vec![
                            r.host.to_string(),
                            word(&r.role.kind),
                            word(&r.role.phase),
                            format!("{}/{}", r.role.sync_done_bytes, r.role.sync_total_bytes),
                            r.role.written_bytes.to_string(),
                            r.role.link_bytes.to_string(),
                            r.role.detail.clone(),
                        ]);
                    }
                    rows
                })
            }
            VpgOp::Move { id, no_wait } => {
                let vt: VpgTask = api.post(&format!("/api/v1/vpgs/{id}/move"), &())?;
                if !no_wait {
                    follow(api, c, &vt.task)?;
                }
                let v: Vpg = api.get(&format!("/api/v1/vpgs/{id}"))?;
                show(c, &v, |v| vpg_rows(std::slice::from_ref(v)))
            }
        },
        Op::Checkpoint(op) => match op {
            CheckpointOp::List { vpg } => {
                show(c, &api.get::<Vec<Checkpoint>>(&format!("/api/v1/vpgs/{vpg}/checkpoints"))?, |cps| {
                    checkpoint_rows(cps)
                })
            }
            CheckpointOp::Insert { vpg, name, wait, app_consistent } => {
                let new = NewCheckpoint { name, application_consistent: app_consistent };
                let ins: InsertedCheckpoint = api.post(&format!("/api/v1/vpgs/{vpg}/checkpoints"), &new)?;
                if !wait {
                    return show(c, &ins, |i| fields(&[("checkpoint", i.id.0.to_string())]));
                }
                let cp: Checkpoint =
                    api.get(&format!("/api/v1/vpgs/{vpg}/checkpoints/{}/wait?timeout_ms=600000", ins.id.0))?;
                show(c, &cp, |cp| checkpoint_rows(std::slice::from_ref(cp)))?;
                if !(cp.consistent && cp.durable) {
                    anyhow::bail!(
                        "checkpoint {} is not usable: {}",
                        cp.id.0,
                        if cp.reason.is_empty() { "not durable in time" } else { &cp.reason }
                    );
                }
                Ok(())
            }
        },
        Op::Test(op) => run_test_op(api, c, op),
        Op::Task(op) => match op {
            TaskOp::List => show(c, &api.get::<Vec<Task>>("/api/v1/tasks")?, |t| task_rows(t)),
            TaskOp::Show { id } => {
                show(c, &api.get::<Task>(&format!("/api/v1/tasks/{id}"))?, |t| task_rows(std::slice::from_ref(t)))
            }
            TaskOp::Wait { id } => {
                let t: Task = api.get(&format!("/api/v1/tasks/{id}"))?;
                let t = follow(api, c, &t)?;
                show(c, &t, |t| task_rows(std::slice::from_ref(t)))
            }
        },
        Op::Peer(op) => match op {
            PeerOp::Show => show(c, &api.get::<Peer>("/api/v1/site/peer")?, peer_rows),
            PeerOp::Token => {
                let t: PairingToken = api.post("/api/v1/site/pairing-tokens", &serde_json::json!({}))?;
                show(c, &t, |t| fields(&[("token", t.token.clone()), ("address", t.address.clone())]))
            }
            PeerOp::Pair { address, token } => {
                show(c, &api.post::<Peer>("/api/v1/site/peer", &PairRequest { address, token })?, peer_rows)
            }
            PeerOp::Unpair => show(c, &api.call::<Peer>(Method::DELETE, "/api/v1/site/peer", None::<&()>)?, peer_rows),
            PeerOp::Vpgs => show(c, &api.get::<Vec<Vpg>>("/api/v1/site/peer/vpgs")?, |v| vpg_rows(v)),
        },
        Op::Monitor(op) => super::monitor::run(api, c.json, op),
        Op::Logs(LogsOp::Collect { minutes, level, out }) => {
            let level: protection_groups::logs::LogLevel = serde_json::from_value(serde_json::json!(level))?;
            let until = crate::model::now_ms();
            let req = crate::logs::LogBundleRequest {
                since_ms: Some(until.saturating_sub(minutes.saturating_mul(60_000))),
                until_ms: Some(until),
                level: Some(level),
            };
            let task: Task = api.post("/api/v1/logs/bundles", &req)?;
            let done = follow(api, c, &task)?;
            let bytes = api.get_bytes(&format!("/api/v1/logs/bundles/{}", task.id))?;
            std::fs::write(&out, &bytes).with_context(|| format!("writing {}", out.display()))?;
            show(c, &done.result, |r| {
                fields(&[
                    ("bundle", out.display().to_string()),
                    ("bytes", bytes.len().to_string()),
                    ("VDSAs missing", r["vdsas_missing"].to_string()),
                ])
            })
        }
    }
}

fn site_rows(s: &Site) -> Vec<Vec<String>> {
    fields(&[
        ("id", s.id.to_string()),
        ("name", s.name.clone()),
        ("address", s.address.clone()),
        ("api port", s.api_port.to_string()),
        ("management port", s.management_port.to_string()),
        ("CA SHA-256", s.ca_sha256.clone()),
        ("generation", s.generation.to_string()),
    ])
}

fn host_rows(h: &[Host]) -> Vec<Vec<String>> {
    let mut rows = vec![vec!["ID".into(), "NAME".into(), "HYPERVISOR".into(), "VDSA".into(), "REPLICATION".into()]];
    rows.extend(h.iter().map(|h| {
        vec![
            h.id.to_string(),
            h.name.clone(),
            word(&h.hypervisor),
            word(&h.vdsa),
            h.replication_address.clone().unwrap_or_else(|| "-".into()),
        ]
    }));
    rows
}

fn checkpoint_rows(cps: &[Checkpoint]) -> Vec<Vec<String>> {
    let mut rows =
        vec![vec!["ID".into(), "TIME".into(), "KIND".into(), "NAME".into(), "CONSISTENT".into(), "DURABLE".into()]];
    rows.extend(cps.iter().map(|cp| {
        vec![
            cp.id.0.to_string(),
            when(cp.time_ms),
            word(&cp.kind),
            cp.name.clone(),
            match (cp.consistent, cp.application_consistent) {
                (true, true) => "application".into(),
                (true, false) if !cp.quiesce_reason.is_empty() => format!("crash: {}", cp.quiesce_reason),
                (true, false) => "crash".into(),
                (false, _) => format!("no: {}", cp.reason),
            },
            if cp.durable { "yes".into() } else { "no".into() },
        ]
    }));
    rows
}

fn task_rows(t: &[Task]) -> Vec<Vec<String>> {
    let mut rows = vec![vec!["ID".into(), "KIND".into(), "STATUS".into(), "PROGRESS".into(), "DESCRIPTION".into()]];
    rows.extend(t.iter().map(|t| {
        vec![
            t.id.to_string(),
            t.kind.clone(),
            format!("{} {}", word(&t.status), word(&t.completion)),
            format!("{}%", t.progress),
            t.description.clone(),
        ]
    }));
    rows
}

fn peer_rows(p: &Peer) -> Vec<Vec<String>> {
    fields(&[
        ("site", p.site.to_string()),
        ("name", p.name.clone()),
        ("address", p.address.clone()),
        ("CA SHA-256", p.ca_sha256.clone()),
        ("last contact", p.last_contact_ms.map_or("never".into(), when)),
        ("last error", if p.last_error.is_empty() { "-".into() } else { p.last_error.clone() }),
    ])
}

fn test_rows(tests: &[FailoverTest]) -> Vec<Vec<String>> {
    let mut rows =
        vec![["TEST", "CHECKPOINT", "STATE", "STARTED", "RESULT", "WRITTEN", "EXPORTS"].map(String::from).to_vec()];
    for t in tests {
        rows.push(vec![
            t.id.0.to_string(),
            t.checkpoint.0.to_string(),
            match (t.commit_task, t.promoted_ms) {
                (_, Some(_)) => format!("{}, promoted", word(&t.state)),
                (Some(_), None) => format!("{}, promoting", word(&t.state)),
                _ => word(&t.state),
            },
            when(t.started_ms),
            t.result.as_ref().map(word).unwrap_or_default(),
            t.written_bytes.to_string(),
            t.exports.iter().map(|e| e.uri.as_str()).collect::<Vec<_>>().join(" "),
        ]);
    }
    rows
}

fn run_test_op(api: &ApiClient, c: &ApiConnection, op: TestOp) -> Result<()> {
    match op {
        TestOp::Start { vpg, checkpoints, no_wait } => {
            let checkpoints = checkpoints
                .iter()
                .map(|s| match s.as_str() {
                    "latest" => Ok(None),
                    n => n.parse().map(Some).with_context(|| format!("--checkpoint {n}: an id or `latest`")),
                })
                .collect::<Result<Vec<_>>>()?;
            let started: StartedTests =
                api.post(&format!("/api/v1/vpgs/{vpg}/failover-tests"), &NewTests { checkpoints })?;
            if !no_wait {
                let t = follow(api, c, &started.task)?;
                if t.completion != crate::model::CompletionCode::Success {
                    anyhow::bail!("the tests did not start: {}", t.exception.unwrap_or_default());
                }
            }
            let tests: Vec<FailoverTest> = started
                .tests
                .iter()
                .map(|t| api.get(&format!("/api/v1/failover-tests/{}", t.id.0)))
                .collect::<Result<_, _>>()?;
            show(c, &tests, |t| test_rows(t))
        }
        TestOp::List { vpg } => {
            show(c, &api.get::<Vec<FailoverTest>>(&format!("/api/v1/vpgs/{vpg}/failover-tests"))?, |t| test_rows(t))
        }
        TestOp::Show { id } => {
            let t: FailoverTest = api.get(&format!("/api/v1/failover-tests/{id}"))?;
            show(c, &t, |t| test_rows(std::slice::from_ref(t)))
        }
        TestOp::Stop { id, result, notes } => {
            let result = match result.as_str() {
                "pass" => TestResult::Pass,
                "fail" => TestResult::Fail,
                other => anyhow::bail!("--result {other}: pass or fail"),
            };
            let stopping: StoppingTest =
                api.post(&format!("/api/v1/failover-tests/{id}/stop"), &StopTest { result, notes })?;
            follow(api, c, &stopping.task)?;
            let t: FailoverTest = api.get(&format!("/api/v1/failover-tests/{id}"))?;
            show(c, &t, |t| test_rows(std::slice::from_ref(t)))
        }
        TestOp::CleanPoint { vpg, from, to, k, repeats, test_timeout_secs, check } => {
            let req = crate::clean_point::CleanPointRequest { from, to, k, repeats, check, test_timeout_secs };
            let task: Task = api.post(&format!("/api/v1/vpgs/{vpg}/clean-point-search"), &req)?;
            let mut said = String::new();
            let done = api.wait_task(task.id, Duration::from_secs(24 * 3600), |t| {
                let summary = t.result["summary"].as_str().unwrap_or_default().to_string();
                if !c.json && !summary.is_empty() && summary != said {
                    println!("{summary}");
                    said = summary;
                }
            })?;
            let p: crate::clean_point::CleanPointProgress = serde_json::from_value(done.result.clone())
                .with_context(|| format!("the search's result: {}", done.result))?;
            show(c, &p, |p| {
                let mut rows = vec![vec!["checkpoint".into(), "round".into(), "runs".into(), "verdict".into()]];
                for t in &p.map {
                    rows.push(vec![t.checkpoint.0.to_string(), t.round.to_string(), word(&t.runs), word(&t.verdict)]);
                }
                rows.push(vec![String::new(); 4]);
                rows.push(vec!["answer".into(), p.summary.clone(), String::new(), String::new()]);
                rows
            })?;
            if done.completion != crate::model::CompletionCode::Success {
                anyhow::bail!("the search ended {:?}: {}", done.completion, done.exception.unwrap_or_default());
            }
            Ok(())
        }
        TestOp::Discard { vpg, before_ms } => {
            let q = before_ms.map(|b| format!("?before_ms={b}")).unwrap_or_default();
            let d: Discarded =
                api.call(Method::DELETE, &format!("/api/v1/vpgs/{vpg}/failover-tests{q}"), None::<&()>)?;
            show(c, &d, |d| fields(&[("discarded", d.discarded.to_string())]))
        }
    }
}
