//! The operator command: `site-manager serve` runs the daemon; `site`,
//! `token`, `host`, `vpg`, `checkpoint`, `task`, `peer`, `logs` and
//! `monitor` call its API (`api`, `monitor`); `site-manager vsphere …` lists hosts with their
//! VDSA state, deploys the VDSA OVA to a host or a whole cluster with a
//! progress bar per host, undeploys, lists VMs with their disks, and makes
//! or removes an isolated test network.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Mutex;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use vsphere_client::{Ova, ServerTrust};

use crate::vsphere::{ClusterPlan, DeployEvent, DeployRequest, DeploySettings, VsphereSite};

#[derive(Parser)]
#[command(name = "site-manager", about = "The site manager's operator command")]
struct Cli {
    #[command(subcommand)]
    command: Top,
}

mod api;
mod monitor;
mod output;

#[derive(Subcommand)]
enum Top {
    /// Print a vCenter's certificate thumbprints, to compare with its
    /// console and pin with --thumbprint.
    Thumbprint {
        /// https://vcenter/sdk
        #[arg(long)]
        url: String,
    },
    /// Run the site manager daemon: store, API over HTTPS, the management
    /// link its VDSAs dial, the reconciler and checkpoint coordinator.
    Serve(ServeArgs),
    #[command(flatten)]
    Api(api::ApiOp),
    /// Operations on a vCenter: VDSAs, VMs, test networks.
    Vsphere {
        #[command(flatten)]
        conn: Box<Connection>,
        #[command(subcommand)]
        op: VsphereOp,
    },
}

#[derive(Args)]
struct ServeArgs {
    /// The data folder: store, site CA, admin token.
    #[arg(long)]
    data: PathBuf,
    /// HOST:PORT for the API (port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:9440")]
    listen: std::net::SocketAddr,
    /// HOST:PORT VDSAs dial (default: the API's port plus one).
    #[arg(long)]
    management_listen: Option<std::net::SocketAddr>,
    /// The site's name on its first start.
    #[arg(long, default_value = "site")]
    name: String,
    /// For control runs of the write-order checker only: checkpoints are
    /// taken host by host without the barrier.
    #[arg(long, hide = true)]
    unsafe_no_barrier: bool,
    /// Fault injection for tests: SIGKILL itself after sending the
    /// PREPAREs of the Nth barrier.
    #[arg(long, hide = true, default_value_t = 0)]
    fault_kill_after_prepare: u64,
}

fn serve(a: ServeArgs) -> Result<()> {
    let management_listen = a.management_listen.unwrap_or_else(|| {
        let mut m = a.listen;
        m.set_port(if a.listen.port() == 0 { 0 } else { a.listen.port().wrapping_add(1) });
        m
    });
    let config = crate::state::ServeConfig {
        data: a.data,
        api_listen: a.listen,
        management_listen,
        unsafe_no_barrier: a.unsafe_no_barrier,
        fault_kill_after_prepare: a.fault_kill_after_prepare,
    };
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the runtime")?;
    rt.block_on(crate::server::serve(config, &a.name))
}

#[derive(Args)]
struct Connection {
    /// https://vcenter/sdk
    #[arg(long, env = "VSPHERE_URL")]
    url: String,
    #[arg(long, env = "VSPHERE_USER")]
    user: String,
    /// A file holding the password (or VSPHERE_PASSWORD).
    #[arg(long)]
    password_file: Option<PathBuf>,
    /// The server certificate's SHA-1 or SHA-256 thumbprint to pin.
    #[arg(long, conflicts_with_all = ["ca_file", "insecure"])]
    thumbprint: Option<String>,
    /// A PEM file of the CA that signed the server certificate.
    #[arg(long, conflicts_with = "insecure")]
    ca_file: Option<PathBuf>,
    /// Accept any server certificate (labs only).
    #[arg(long)]
    insecure: bool,
}

#[derive(Subcommand)]
enum VsphereOp {
    /// Hosts and the state of their VDSA.
    Hosts,
    /// Deploy the VDSA OVA to one host or every host of a cluster.
    Deploy {
        #[arg(long)]
        ova: PathBuf,
        #[arg(long, required_unless_present = "cluster", conflicts_with = "cluster")]
        host: Option<String>,
        #[arg(long)]
        cluster: Option<String>,
        #[arg(long)]
        datastore: String,
        #[arg(long)]
        network: String,
        /// The (first) VDSA address; a cluster's hosts get consecutive ones.
        #[arg(long)]
        ip: Ipv4Addr,
        #[arg(long)]
        netmask: Ipv4Addr,
        #[arg(long)]
        gateway: Option<Ipv4Addr>,
        #[arg(long, value_delimiter = ',')]
        dns: Vec<Ipv4Addr>,
        /// HOST:PORT of this site's site manager.
        #[arg(long)]
        site_manager: String,
        #[arg(long, env = "VDSA_REGISTRATION_TOKEN")]
        registration_token: String,
        /// Deploys running at once.
        #[arg(long, default_value_t = 8)]
        parallel: usize,
    },
    /// Remove the VDSA of a host.
    Undeploy {
        #[arg(long)]
        host: String,
    },
    /// VMs that can be protected, with their disks.
    Vms,
    /// Create an isolated test network (a switch without uplinks) on hosts.
    TestNetworkCreate {
        #[arg(long)]
        name: String,
        #[arg(long, value_delimiter = ',', required = true)]
        hosts: Vec<String>,
    },
    /// Remove an isolated test network and the VMs of a test.
    TestCleanup {
        #[arg(long)]
        name: String,
        #[arg(long, value_delimiter = ',', required = true)]
        hosts: Vec<String>,
        /// The failover test whose VMs go too.
        #[arg(long)]
        test_id: Option<String>,
    },
}

pub fn main() -> ExitCode {
    main_with(std::env::args())
}

/// Logs to stderr and, for the daemon, also to `file` (what the log
/// collector reads; moved to `.1` once it passes 32 MiB at a start).
fn init_tracing(default: &str, file: Option<&std::path::Path>) {
    use tracing_subscriber::prelude::*;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| default.into());
    let stderr = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let to_file = file.and_then(|p| match crate::logs::open_log_file(p) {
        Ok(f) => Some(tracing_subscriber::fmt::layer().with_writer(Mutex::new(f)).with_ansi(false)),
        Err(e) => {
            eprintln!("site-manager: cannot write the log file {}: {e}", p.display());
            None
        }
    });
    let _ = tracing_subscriber::registry().with(filter).with(stderr).with(to_file).try_init();
}

/// The command with `args` (the first is the program name).
pub fn main_with<I: IntoIterator<Item = String>>(args: I) -> ExitCode {
    let cli = Cli::parse_from(args);
    match &cli.command {
        Top::Serve(a) => init_tracing("info", Some(&a.data.join("logs/site-manager.log"))),
        _ => {
            init_tracing("warn", None);
            // A command's output piped into `head` ends it quietly, as
            // other tools do, rather than panicking in println!. Sockets
            // are written with MSG_NOSIGNAL and keep their errors.
            // SAFETY: setting a signal's disposition to its default before
            // any thread is started touches no memory of ours.
            unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
        }
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("site-manager: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn connect(c: &Connection) -> Result<VsphereSite> {
    let password = match &c.password_file {
        Some(p) => {
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?.trim_end().to_string()
        }
        None => std::env::var("VSPHERE_PASSWORD").context("give --password-file or set VSPHERE_PASSWORD")?,
    };
    let trust = if let Some(t) = &c.thumbprint {
        ServerTrust::thumbprint(t)?
    } else if let Some(ca) = &c.ca_file {
        ServerTrust::ca_pem(&std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?)?
    } else if c.insecure {
        ServerTrust::Insecure
    } else {
        bail!("say how to check the vCenter's certificate: --thumbprint, --ca-file or (labs only) --insecure");
    };
    Ok(VsphereSite::connect(&c.url, trust, &c.user, &password)?)
}

fn run(cli: Cli) -> Result<()> {
    let (conn, op) = match cli.command {
        Top::Serve(a) => return serve(a),
        Top::Thumbprint { url } => {
            let der = vsphere_client::soap::fetch_server_certificate(&url)?;
            let (sha1, sha256) = vsphere_client::soap::thumbprints(&der);
            println!("SHA-1   {}", vsphere_client::soap::format_thumbprint(&sha1));
            println!("SHA-256 {}", vsphere_client::soap::format_thumbprint(&sha256));
            return Ok(());
        }
        Top::Api(op) => return api::run(op),
        Top::Vsphere { conn, op } => (conn, op),
    };
    let site = connect(&conn)?;
    match op {
        VsphereOp::Hosts => {
            println!("{:<24} {:<16} {:<14} {:<14} VM", "HOST", "CLUSTER", "HOST STATE", "VDSA");
            for h in site.hosts()? {
                println!(
                    "{:<24} {:<16} {:<14} {:<14} {}",
                    h.host,
                    h.cluster.as_deref().unwrap_or("-"),
                    h.host_state,
                    h.state.to_string(),
                    h.vm.as_ref().map(|v| v.name.as_str()).unwrap_or("-")
                );
            }
        }
        VsphereOp::Deploy {
            ova,
            host,
            cluster,
            datastore,
            network,
            ip,
            netmask,
            gateway,
            dns,
            site_manager,
            registration_token,
            parallel,
        } => {
            let ova = Ova::open(&ova)?;
            let settings =
                DeploySettings { datastore, network, ip, netmask, gateway, dns, site_manager, registration_token };
            let plan = match (host, cluster) {
                (Some(h), _) => ClusterPlan { requests: vec![site.plan_host(&h, ip, &settings)?], skipped: Vec::new() },
                (None, Some(c)) => site.plan_cluster(&c, &settings)?,
                (None, None) => bail!("give --host or --cluster"),
            };
            for (host, reason) in &plan.skipped {
                println!("{host}: skipped: {reason}");
            }
            deploy_with_bars(&site, &ova, &plan.requests, parallel)?;
        }
        VsphereOp::Undeploy { host } => {
            site.undeploy(&host)?;
            println!("{host}: VDSA removed");
        }
        VsphereOp::Vms => {
            for v in site.vms_with_disks()? {
                println!("{} ({}, on {})", v.name, v.power_state, v.host.as_deref().unwrap_or("?"));
                for d in &v.disks {
                    println!("    {:>10} MiB  {}", d.capacity_bytes >> 20, d.file);
                }
            }
        }
        VsphereOp::TestNetworkCreate { name, hosts } => {
            let net = site.create_test_network(&name, &hosts)?;
            println!("test network {} on {} hosts (no uplinks)", net.name, net.hosts.len());
        }
        VsphereOp::TestCleanup { name, hosts, test_id } => {
            if let Some(t) = test_id {
                for vm in site.remove_test_vms(&t)? {
                    println!("removed test VM {vm}");
                }
            }
            let net = site.find_test_network(&name, &hosts)?;
            site.remove_test_network(&net)?;
            println!("test network {name} removed");
        }
    }
    site.logout()?;
    Ok(())
}

fn deploy_with_bars(site: &VsphereSite, ova: &Ova, reqs: &[DeployRequest], parallel: usize) -> Result<()> {
    let multi = MultiProgress::new();
    let style = ProgressStyle::with_template("{prefix:<20} {bar:30} {bytes:>10}/{total_bytes:<10} {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_bar());
    let bars: Vec<(String, ProgressBar)> = reqs
        .iter()
        .map(|r| {
            let b = multi.add(ProgressBar::new(0).with_style(style.clone()).with_prefix(r.host.clone()));
            b.set_message("waiting");
            (r.host.clone(), b)
        })
        .collect();
    let plain = multi.is_hidden();
    let last: Mutex<Vec<String>> = Mutex::new(vec![String::new(); reqs.len()]);
    let on_event = |host: &str, e: DeployEvent| {
        let Some(i) = bars.iter().position(|(h, _)| h == host) else { return };
        let bar = &bars[i].1;
        let msg = match &e {
            DeployEvent::Preparing => "preparing".to_string(),
            DeployEvent::Uploading { done, total } => {
                bar.set_length(*total);
                bar.set_position(*done);
                "uploading".to_string()
            }
            DeployEvent::PoweringOn => "powering on".to_string(),
            DeployEvent::Installed { vm } => format!("installed ({vm})"),
            DeployEvent::AlreadyInstalled { vm } => format!("already installed ({vm})"),
            DeployEvent::Skipped { reason } => format!("skipped: {reason}"),
            DeployEvent::Failed { error } => format!("FAILED: {error}"),
        };
        if !matches!(e, DeployEvent::Preparing | DeployEvent::Uploading { .. } | DeployEvent::PoweringOn) {
            bar.finish_with_message(msg.clone());
        } else {
            bar.set_message(msg.clone());
        }
        // Without a terminal, one line per state change.
        let mut last = last.lock().unwrap_or_else(|p| p.into_inner());
        if plain && last[i] != msg {
            eprintln!("{host}: {msg}");
            last[i] = msg;
        }
    };
    let results = site.deploy_many(ova, reqs, parallel, &on_event)?;
    let skipped =
        results.iter().filter(|(_, r)| matches!(r, Err(crate::vsphere::Error::HostUnavailable { .. }))).count();
    let failed: Vec<_> = results
        .iter()
        .filter(|(_, r)| r.as_ref().is_err_and(|e| !matches!(e, crate::vsphere::Error::HostUnavailable { .. })))
        .collect();
    println!(
        "{} of {} hosts have the VDSA installed{}",
        results.len() - failed.len() - skipped,
        results.len(),
        if skipped > 0 { format!(", {skipped} skipped") } else { String::new() }
    );
    if !failed.is_empty() {
        for (h, r) in &failed {
            if let Err(e) = r {
                eprintln!("{h}: {e}");
            }
        }
        bail!("{} deploys failed", failed.len());
    }
    Ok(())
}
