//! The lab, the README's first command: with no subcommand it runs the
//! two-site lab (`integration::two_site_lab`: two paired site managers,
//! five hosts with their VDSAs, six VMs in two VPGs, parallel failover
//! tests with real guests, failover, commit, reverse protection and
//! failback, all verified, with a JSON report).
//!
//! Subcommands run the data path's demos (`data-path-demos`: the journal
//! engine against a reference model, power cuts of a VDSA in a real
//! guest, the KVM tap through the real QEMU, two VDSAs through a faulty
//! link, write order under a site manager, the vSphere side against the
//! vCenter simulator) and the torture runs (`power-loss`, `write-order`,
//! with `--long`). `lab vdsa …` and `lab site-manager …` run the daemons
//! themselves, so that tests always run the code of this tree.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use integration::workload::{Mix, ReferenceModel, Workload};
use integration::{checkpoint_spec, crash_child_stream, tap_write};
use protection_groups::{CheckpointId, CheckpointKind, DiskId, RetentionPolicy, SparseTier};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use vdsa::journal::{Journal, JournalConfig, TapWrite};

#[derive(Parser, Debug)]
#[command(about = "The replication lab: runs the end-to-end path and verifies it")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Write the two-site lab's report here as JSON.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Leave both sites running at the end (until Ctrl-C) and print their
    /// API addresses and admin tokens.
    #[arg(long)]
    keep: bool,
    /// Kill a VDSA, the site-to-site link and a site manager during the
    /// run: every check must still pass.
    #[arg(long)]
    faults: bool,
    /// Keep the sites' folders here (default: a temporary folder).
    #[arg(long)]
    dir: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// The journal demo.
    JournalDemo(DemoArgs),
    /// The data path's demos one after another (journal, power loss, KVM
    /// tap, two VDSAs over a faulty link, write order, vSphere), as the
    /// lab ran them before the two-site lab.
    DataPathDemos,
    /// The KVM tap demo: real QEMU mirroring a guest's writes to the VDSA.
    KvmTapDemo,
    /// Two sites on this machine: QEMU taps, a source and a target VDSA
    /// over TLS through a fault proxy, cuts, a stall and SIGKILLs.
    TwoSiteDemo {
        /// Seconds of guest writes.
        #[arg(long, default_value_t = 30.0)]
        seconds: f64,
    },
    /// vSphere: the VDSA OVA deployed to every host of a simulated vCenter,
    /// recovery VMs of a failover test booted in order and removed.
    VsphereDemo,
    /// Power cuts of a VDSA in a real guest (`integration::power_loss`):
    /// it must start after every cut and keep every write it acknowledged
    /// with FLUSH or FUA. The suite runs 10 cuts; `--long` runs 100.
    PowerLoss {
        /// Run 100 cuts (unless --cuts says otherwise).
        #[arg(long)]
        long: bool,
        #[arg(long)]
        cuts: Option<u64>,
        /// Seed of the cut times and writes (default: from the clock).
        #[arg(long)]
        seed: Option<u64>,
    },
    /// Write order across three hosts under a real site manager
    /// (`integration::write_order`): causal chains of guest writes, and
    /// checkpoints inserted back to back through the API; every offered
    /// checkpoint must hold every write its writes refer to. The suite runs
    /// 50 checkpoints; `--long` runs 500. `--control` switches the barrier
    /// off and must find violations.
    WriteOrder {
        #[arg(long)]
        long: bool,
        #[arg(long)]
        checkpoints: Option<usize>,
        #[arg(long)]
        seed: Option<u64>,
        #[arg(long)]
        control: bool,
        /// SIGKILL between PREPARE and COMMIT of the 8th barrier: `vdsa`
        /// (a protected host's VDSA) or `site-manager`.
        #[arg(long)]
        fault: Option<String>,
        /// Keep the processes' folders and logs here.
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Change the VMs while the chains run: add a disk, remove it,
        /// move a VM to another host.
        #[arg(long)]
        changes: bool,
    },
    /// SIGKILL of a process ingesting into two journals that share a chunk
    /// store while it removes and creates one of them
    /// (`integration::store_crash`). The suite runs 100 kills; `--long`
    /// runs 1000.
    StoreCrash {
        #[arg(long)]
        long: bool,
        #[arg(long)]
        runs: Option<u64>,
        #[arg(long)]
        seed: Option<u64>,
    },
    /// A host-side check for the clean-point search, on the first disk in
    /// `CLEAN_POINT_EXPORTS`: with `--expect`, its ext4 file system's files
    /// that the JSON file lists (name to blake3 hash) must read back with
    /// their hashes; with `--region OFFSET:LEN:HASH`, those bytes must.
    /// Exits 0 if so, 1 if not.
    CleanPointCheck {
        #[arg(long)]
        expect: Option<PathBuf>,
        #[arg(long)]
        region: Option<String>,
    },
    /// A check for the clean-point search run inside a VM: boots a check
    /// VM (the guest kit's kernel under QEMU) with every disk of
    /// `CLEAN_POINT_EXPORTS` attached over NBD (`/dev/vda`, `/dev/vdb`,
    /// ...), runs the shell `--command` in it, and exits with the
    /// command's exit code (1 if the VM does not report one in time).
    CleanPointGuestCheck {
        #[arg(long)]
        command: String,
        #[arg(long, default_value_t = 300)]
        timeout_secs: u64,
    },
    /// Used by the store crash test: ingests into two journals until killed.
    StoreCrashChild {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        seed: u64,
    },
    /// Used by the crash test: ingests and checkpoints until killed,
    /// printing "DURABLE <id>" after each checkpoint is durable.
    CrashChild {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        seed: u64,
        #[arg(long, default_value_t = 16)]
        writes_per_checkpoint: u64,
    },
}

#[derive(clap::Args, Debug)]
struct DemoArgs {
    /// Journal directory (default: a temporary one, removed at the end).
    #[arg(long)]
    dir: Option<PathBuf>,
    #[arg(long, default_value_t = 3)]
    disks: usize,
    #[arg(long, default_value_t = 64)]
    disk_mib: u64,
    #[arg(long, default_value_t = 60)]
    checkpoints: u64,
    #[arg(long, default_value_t = 64)]
    writes_per_checkpoint: u64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

impl Default for DemoArgs {
    fn default() -> Self {
        DemoArgs { dir: None, disks: 3, disk_mib: 64, checkpoints: 60, writes_per_checkpoint: 64, seed: 1 }
    }
}

fn main() -> Result<()> {
    // `lab vdsa ...` runs the appliance daemon itself (the same code as the
    // `vdsa` binary), so tests always run the daemon built from this tree.
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("vdsa") {
        return vdsa::daemon::main(args.into_iter().skip(1));
    }
    if args.get(1).map(String::as_str) == Some("site-manager") {
        std::process::exit(match site_manager::cli::main_with(args.into_iter().skip(1)) {
            std::process::ExitCode::SUCCESS => 0,
            _ => 1,
        });
    }
    let cli = Cli::parse();
    match cli.command {
        None => {
            let lab = std::env::current_exe().context("finding the lab binary")?;
            let opts = integration::two_site_lab::LabOptions { dir: cli.dir, keep: cli.keep, faults: cli.faults };
            let report = integration::two_site_lab::run(&lab, &opts)?;
            report.print_summary();
            if let Some(path) = &cli.report {
                std::fs::write(path, serde_json::to_vec_pretty(&report.to_json())?)
                    .with_context(|| format!("writing the report to {}", path.display()))?;
                println!("  report written to {}", path.display());
            }
            if !report.verified() {
                bail!("the lab found failed checks (above)");
            }
            Ok(())
        }
        Some(Command::DataPathDemos) => {
            journal_demo(DemoArgs::default())?;
            power_loss_demo()?;
            kvm_tap_demo()?;
            two_site_demo(30.0)?;
            site_manager_demo()?;
            vsphere_demo()
        }
        Some(Command::VsphereDemo) => vsphere_demo(),
        Some(Command::KvmTapDemo) => kvm_tap_demo(),
        Some(Command::TwoSiteDemo { seconds }) => two_site_demo(seconds),
        Some(Command::JournalDemo(args)) => journal_demo(args),
        Some(Command::PowerLoss { long, cuts, seed }) => {
            println!("lab: power loss of a VDSA in a real guest");
            power_loss(cuts.unwrap_or(if long { 100 } else { 10 }), seed)
        }
        Some(Command::CrashChild { dir, seed, writes_per_checkpoint }) => crash_child(dir, seed, writes_per_checkpoint),
        Some(Command::StoreCrash { long, runs, seed }) => {
            store_crash(runs.unwrap_or(if long { 1000 } else { 100 }), seed)
        }
        Some(Command::StoreCrashChild { dir, seed }) => integration::store_crash::child(&dir, seed),
        Some(Command::CleanPointCheck { expect, region }) => clean_point_check(expect.as_deref(), region.as_deref()),
        Some(Command::CleanPointGuestCheck { command, timeout_secs }) => {
            let exports = std::env::var("CLEAN_POINT_EXPORTS").context("CLEAN_POINT_EXPORTS is not set")?;
            let uris: Vec<String> = exports.split_whitespace().map(str::to_string).collect();
            let code = integration::guest::run_check_vm(&uris, &command, Duration::from_secs(timeout_secs))?;
            std::process::exit(code);
        }
        Some(Command::WriteOrder { long, checkpoints, seed, control, fault, dir, changes }) => {
            use integration::write_order::Fault;
            let fault = match fault.as_deref() {
                None => None,
                Some("vdsa") => Some((Fault::Vdsa, 8)),
                Some("site-manager") => Some((Fault::SiteManager, 8)),
                Some(other) => bail!("--fault {other:?}: expected vdsa or site-manager"),
            };
            write_order(checkpoints.unwrap_or(if long { 500 } else { 50 }), seed, control, fault, changes, dir)
        }
    }
}

fn write_order(
    checkpoints: usize,
    seed: Option<u64>,
    control: bool,
    fault: Option<(integration::write_order::Fault, u64)>,
    changes: bool,
    keep: Option<PathBuf>,
) -> Result<()> {
    let seed = seed.unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64)
    });
    let what = if control { "control run, barrier off" } else { "two-phase barrier" };
    println!("lab: write order across 3 hosts ({what}), {checkpoints} checkpoints, seed {seed}");
    let lab = std::env::current_exe()?;
    let temp = tempfile::tempdir()?;
    let dir = keep.unwrap_or_else(|| temp.path().to_path_buf());
    let opts = integration::write_order::WriteOrderOptions { checkpoints, seed, control, fault, changes };
    let r = integration::write_order::run(&lab, &dir, &opts, |m| println!("  {m}"))?;
    println!(
        "  {} checkpoints checked of {} inserted, {} chain writes, {} violations",
        r.checked, r.inserted, r.writes, r.violations
    );
    if let Some(v) = &r.first_violation {
        println!("  first violation: {v}");
    }
    println!("  longest guest write per host: {:?} ms", r.max_write_ms);
    if let Some((id, rec)) = &r.faulted {
        println!(
            "  the checkpoint in flight at the fault, {id}: {}",
            rec.as_ref().map_or("never recorded".to_string(), |v| v.to_string())
        );
        println!("  {} checkpoints offered after it", r.offered_after_fault);
    }
    if !r.changes.is_empty() {
        for (what, after) in &r.changes {
            println!("  changed the VMs after checkpoint {after}: {what}");
        }
        println!("  {} checkpoints offered after the last change", r.offered_after_changes);
        let sizes: Vec<String> = r.grown_disk_sizes.iter().map(|(id, s)| format!("{id}:{}MiB", s >> 20)).collect();
        println!("  vm-1's disk per offered checkpoint: {}", sizes.join(" "));
        if !r.size_problems.is_empty() {
            bail!("the grown disk's sizes are wrong: {}", r.size_problems.join("; "));
        }
    }
    if control {
        if r.violations == 0 {
            bail!("the control run found no violation: the checker cannot be shown to fail");
        }
        println!("lab: verified\n  with the barrier off the checker finds violations");
    } else {
        if r.violations > 0 || r.checked == 0 {
            bail!("write order not kept ({} violations, {} checked)", r.violations, r.checked);
        }
        println!("lab: verified\n  every offered checkpoint holds every write its writes depend on");
    }
    Ok(())
}

/// The default run's power-loss stage: a few cuts, skipped (saying why)
/// where the guest kit cannot be had.
fn power_loss_demo() -> Result<()> {
    if let Err(e) = integration::guest::GuestKit::prepare() {
        println!("lab: power-loss demo skipped: the guest kit (Debian's qemu-system, kernel, busybox) is not available: {e:#}");
        return Ok(());
    }
    println!("lab: power-loss demo — a VDSA in a real guest (TCG) with its journal on the guest's disk; its power is cut at random moments while it starts and while the host writes with FLUSH and FUA");
    power_loss(3, None)?;
    println!("lab: verified\n  after every cut the VDSA started, and every write acknowledged by a FLUSH or as a FUA write read back");
    Ok(())
}

fn power_loss(cuts: u64, seed: Option<u64>) -> Result<()> {
    let seed = seed.unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_secs())
    });
    println!("  {cuts} cuts, seed {seed}");
    let vdsa = integration::vsphere_lab::workspace_binary("vdsa", "vdsa")?;
    let dir = tempfile::tempdir()?;
    let started = Instant::now();
    let opts = integration::power_loss::PowerLossOptions { cuts, seed, control: false };
    let r = integration::power_loss::run(dir.path(), opts, &vdsa)?;
    println!(
        "  {} cuts ({} while the VDSA started), {} writes acknowledged ({} FUA), {} flushes, {} blocks verified, every restart succeeded, in {:.0} s",
        r.cuts,
        r.cuts_while_starting,
        r.writes_acknowledged,
        r.fua_writes,
        r.flushes,
        r.blocks_verified,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn clean_point_check(expect: Option<&std::path::Path>, region: Option<&str>) -> Result<()> {
    let exports = std::env::var("CLEAN_POINT_EXPORTS").context("CLEAN_POINT_EXPORTS is not set")?;
    let uri = exports.split_whitespace().next().context("no export")?;
    if let Some(region) = region {
        let parts: Vec<&str> = region.split(':').collect();
        let [off, len, hash] = parts[..] else { bail!("--region {region}: OFFSET:LEN:HASH") };
        let (off, len): (u64, usize) = (off.parse()?, len.parse()?);
        let want = blake3::Hash::from_hex(hash).map_err(|e| anyhow::anyhow!("{hash}: {e}"))?;
        let (addr, name) = integration::exports::split_uri(uri)?;
        let mut c = vdsa::nbd::client::NbdClient::connect_tcp(&addr, &name)?;
        let mut buf = vec![0u8; len];
        c.read(off, &mut buf)?;
        if blake3::hash(&buf) == want {
            println!("the region reads back with its hash");
            return Ok(());
        }
        println!("the region differs");
        std::process::exit(1);
    }
    let expect = expect.context("--expect or --region")?;
    let text = std::fs::read(expect).with_context(|| format!("reading {}", expect.display()))?;
    // "DISK:NAME" (DISK the export's index, 0 if left out) to the hash.
    let map: std::collections::BTreeMap<String, String> = serde_json::from_slice(&text)?;
    let expected: Vec<(usize, String, blake3::Hash)> = map
        .into_iter()
        .map(|(key, h)| {
            let (disk, name) = match key.split_once(':') {
                Some((d, n)) => (d.parse().with_context(|| format!("{key}: DISK:NAME"))?, n.to_string()),
                None => (0, key),
            };
            Ok((disk, name, blake3::Hash::from_hex(&h).map_err(|e| anyhow::anyhow!("{h}: {e}"))?))
        })
        .collect::<Result<_>>()?;
    let uris: Vec<&str> = exports.split_whitespace().collect();
    let scratch = tempfile::tempdir()?;
    match integration::ext4_lab::check_exports(&uris, scratch.path(), &expected)? {
        None => {
            println!("{} files read back with their hashes", expected.len());
            Ok(())
        }
        Some(why) => {
            println!("{why}");
            std::process::exit(1);
        }
    }
}

fn store_crash(runs: u64, seed: Option<u64>) -> Result<()> {
    let seed = seed.unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_secs())
    });
    println!("lab: the shared chunk store under SIGKILL — {runs} kills, seed {seed}");
    let dir = tempfile::tempdir()?;
    let started = Instant::now();
    let r = integration::store_crash::run(dir.path(), &std::env::current_exe()?, runs, seed)?;
    println!(
        "  {} kills ({} during a removal, {} during a move into the store; {} removals, {} moves finished), {} checkpoints verified, {} chunks scrubbed: no orphan, nothing missing, in {:.0} s",
        r.runs,
        r.kills_during_removal,
        r.kills_during_move,
        r.removals_finished,
        r.moves_finished,
        r.checkpoints_verified,
        r.chunks_scrubbed,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn journal_demo(args: DemoArgs) -> Result<()> {
    let started = Instant::now();
    let tmp;
    let dir = match args.dir {
        Some(d) => d,
        None => {
            tmp = tempfile::tempdir().context("creating a temporary directory")?;
            tmp.path().to_path_buf()
        }
    };
    let sizes = vec![args.disk_mib << 20; args.disks];
    let disks: Vec<DiskId> = (0..args.disks).map(|_| DiskId::new()).collect();
    let stream = protection_groups::StreamId::new();
    let mut journal = Journal::open(&dir, JournalConfig::default())?;
    for (d, &size) in disks.iter().zip(&sizes) {
        journal.add_disk(*d, size)?;
    }
    println!(
        "lab: journal demo in {} — {} disks of {} MiB, {} checkpoints of {} writes",
        dir.display(),
        args.disks,
        args.disk_mib,
        args.checkpoints,
        args.writes_per_checkpoint
    );
    let mut workload = Workload::new(args.seed, &sizes, Mix::default());
    let mut model = ReferenceModel::new(&sizes);
    let mut expected: BTreeMap<CheckpointId, Vec<blake3::Hash>> = BTreeMap::new();
    let policy = RetentionPolicy::Tiered {
        base: Box::new(RetentionPolicy::Time { history: Duration::from_secs(120) }),
        tiers: vec![SparseTier { after: Duration::from_secs(60), every: Some(Duration::from_secs(20)) }],
    };
    let (mut seq, mut bytes, mut retention_runs, mut verified) = (0u64, 0u64, 0u64, 0u64);
    let mut held = None;
    for cp in 1..=args.checkpoints {
        let writes: Vec<_> = (0..args.writes_per_checkpoint).map(|_| workload.next_write()).collect();
        for batch in writes.chunks(8) {
            let taps: Vec<TapWrite<'_>> = batch
                .iter()
                .map(|w| {
                    seq += 1;
                    tap_write(w, &disks, seq)
                })
                .collect();
            journal.ingest(stream, &taps)?;
            for w in batch {
                model.apply(w);
                bytes += w.len();
            }
        }
        let kind = if cp % 10 == 0 { CheckpointKind::Named } else { CheckpointKind::Automatic };
        let now_ms = cp * 5000;
        journal.mark_checkpoint(checkpoint_spec(cp, now_ms, kind))?;
        expected.insert(CheckpointId(cp), model.hashes());
        if cp == 3 {
            held = Some(journal.open_view(CheckpointId(3))?);
        }
        if cp % 10 == 0 {
            let report = journal.apply_retention(&policy, now_ms)?;
            retention_runs += 1;
            println!(
                "  cp {cp:>3}: retention -> replica at {:?}, {} thinned, {} aged out, {} blocks applied, {} KiB reclaimed",
                report.base,
                report.thinned.len(),
                report.aged_out.len(),
                report.blocks_applied,
                report.bytes_reclaimed / 1024
            );
            verified += verify(&journal, &disks, &expected)?;
        }
        if cp == args.checkpoints / 2 {
            if let Some(view) = held.take() {
                let want = &expected[&CheckpointId(3)];
                for (i, d) in disks.iter().enumerate() {
                    if view.disk_hash(*d)? != want[i] {
                        bail!("the view held at cp-3 changed under retention (disk {i})");
                    }
                }
                println!("  a view held at cp-3 across {retention_runs} retention runs still reads cp-3 exactly");
            }
            drop(journal);
            journal = Journal::open(&dir, JournalConfig::default())?;
            println!("  cp {cp:>3}: journal closed and reopened from disk");
        }
    }
    verified += verify(&journal, &disks, &expected)?;
    let stats = journal.stats()?;
    let list = journal.checkpoints()?;
    println!("lab: verified");
    println!(
        "  {} MiB written in {seq} writes; {} checkpoint views compared with the reference model (blake3), all exact",
        bytes >> 20,
        verified
    );
    println!(
        "  {} checkpoints retained ({} .. {}), replica at the oldest; {} dedup hits, {} zero blocks stored as markers",
        list.len(),
        list.first().map(|c| c.id.to_string()).unwrap_or_default(),
        list.last().map(|c| c.id.to_string()).unwrap_or_default(),
        stats.dedup_hits,
        stats.zero_blocks
    );
    println!(
        "  journal on disk: {} KiB log + {} KiB chunk packs; {} block versions indexed",
        stats.log_bytes / 1024,
        stats.pack_bytes / 1024,
        stats.index_versions
    );
    println!("  took {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// QEMU's write-blocking mirror taps a guest's writes into the `vdsa`
/// daemon; checkpoints are taken as the guest writes, the VDSA is killed
/// and catches up by a delta sync, and every checkpoint is then compared
/// with the reference model.
/// The default run's site manager stage: a site manager with three
/// protected hosts and a recovery host (each a `vdsa agent` that registered
/// with a one-time token), one VPG over three QEMU VMs, checkpoints through
/// the API under the two-phase barrier, write order checked on each.
fn site_manager_demo() -> Result<()> {
    if !integration::kvm_lab::qemu_available() {
        println!("lab: site manager demo skipped: qemu-storage-daemon is not installed (apt-get install qemu-utils)");
        return Ok(());
    }
    println!("lab: site manager demo — a site manager, four VDSAs registering with one-time tokens, a VPG over VMs on three hosts, checkpoints through the API under the two-phase barrier");
    write_order(20, None, false, None, false, None)
}

fn kvm_tap_demo() -> Result<()> {
    use integration::kvm_lab::{guest_write, qemu_available, StorageDaemon, VdsaProcess};
    use serde_json::json;
    if !qemu_available() {
        println!("lab: KVM tap demo skipped: qemu-storage-daemon is not installed (apt-get install qemu-utils)");
        return Ok(());
    }
    let started = Instant::now();
    let tmp = tempfile::tempdir().context("creating a temporary directory")?;
    let dir = tmp.path();
    let size = 256u64 << 20;
    let mut model = ReferenceModel::new(&[size]);
    let mut workload = Workload::new(5, &[size], Mix::default());
    for _ in 0..300 {
        model.apply(&workload.next_write()); // the disk's content before protection
    }
    let image = dir.join("vm-disk.raw");
    std::fs::write(&image, &model.images[0])?;
    let lab = std::env::current_exe()?;
    let mut vdsa = VdsaProcess::start(&lab, dir, "vmdisk=256M")?;
    let mut qsd = StorageDaemon::start(dir, &image, false)?;
    qsd.attach("tap0", &vdsa.tap_sock, "vmdisk")?;
    vdsa.call(json!({"op": "sync", "syncing": false}))?;
    println!("lab: KVM tap demo — qemu-storage-daemon holds a 256 MiB VM disk; its write-blocking mirror taps every write into the vdsa daemon (initial sync done)");
    let mut guest = qsd.guest()?;
    let mut expected: BTreeMap<u64, blake3::Hash> = BTreeMap::new();
    let (mut bytes, mut writes) = (0u64, 0u64);
    for round in 0..12 {
        if round == 6 {
            vdsa.kill();
            // The guest goes on writing while the VDSA is down; QEMU finds
            // the target gone at the first write that reaches it.
            for _ in 0..200 {
                let w = workload.next_write();
                guest_write(&mut guest, &w)?;
                model.apply_unless_trim(&w);
            }
            let failed = vdsa::kvm::wait_for(
                &mut qsd.qmp,
                "tap0",
                Duration::from_secs(30),
                "the tap to end",
                vdsa::kvm::stopped_mirroring,
            )?;
            vdsa = VdsaProcess::start(&lab, dir, "vmdisk=256M")?;
            qsd.detach("tap0")?;
            qsd.attach("tap1", &vdsa.tap_sock, "vmdisk")?;
            vdsa.call(json!({"op": "sync", "syncing": false}))?;
            println!(
                "  vdsa killed with SIGKILL (QEMU's tap job: {}); guest kept writing; vdsa restarted, tap re-attached, delta sync done",
                failed.status
            );
        }
        for _ in 0..400 {
            let w = workload.next_write();
            guest_write(&mut guest, &w)?;
            model.apply_unless_trim(&w);
            bytes += w.len();
            writes += 1;
        }
        let cp = vdsa.call(json!({"op": "checkpoint", "name": format!("round {round}")}))?;
        if cp["kind"] != "Named" {
            bail!("checkpoint {cp} should be consistent");
        }
        expected.insert(cp["id"].as_u64().unwrap_or(0), blake3::hash(&model.images[0]));
    }
    let source = qsd.image_hash()?;
    if source != blake3::hash(&model.images[0]) {
        bail!("QEMU's source disk differs from the model");
    }
    qsd.detach("tap1")?;
    let journal_dir = vdsa.journal.clone();
    vdsa.shutdown()?;
    drop(qsd);
    let journal = Journal::open(&journal_dir, JournalConfig::default())?;
    let disk = DiskId::from_bytes(vdsa::daemon::derived_id("disk", "vmdisk"));
    for (id, want) in &expected {
        if journal.open_view(CheckpointId(*id))?.disk_hash(disk)? != *want {
            bail!("checkpoint {id} differs from the guest's disk at that point");
        }
    }
    println!("lab: verified");
    println!(
        "  {} MiB in {writes} guest writes through QEMU; {} checkpoints read back from the journal equal the guest's disk at each (blake3), the last equals QEMU's source disk",
        bytes >> 20,
        expected.len()
    );
    println!("  took {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

fn vsphere_demo() -> Result<()> {
    let started = Instant::now();
    if !integration::vsphere_lab::simulator_available() {
        println!("lab: vSphere demo skipped: the vCenter simulator needs apt-get install golang-go golang-github-vmware-govmomi-dev (integration/run-tests installs them)");
        return Ok(());
    }
    println!("lab: vSphere demo — the VDSA OVA (packaging) deployed by the site manager's vSphere adapter to a simulated vCenter (vcsim from Debian's govmomi) with 2 clusters of 3 hosts");
    let r = integration::vsphere_lab::run(|line| println!("  {line}"))?;
    println!("lab: verified");
    println!(
        "  the {} B OVA deployed in parallel to {} of {} hosts in {:.2} s; each shows its VDSA installed, running on its own host, with its vApp properties ({} checked) as given",
        r.ova_bytes, r.deployed, r.hosts, r.deploy_secs, r.properties_checked
    );
    println!(
        "  {} recovery VMs of a failover test powered on in {} boot groups on an isolated network, then removed ({}) with the network",
        r.recovery_vms, r.boot_groups, r.removed_test_vms
    );
    println!("  took {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

fn two_site_demo(seconds: f64) -> Result<()> {
    use integration::two_sites::{run, TwoSiteOptions};
    if !integration::kvm_lab::qemu_available() {
        println!("lab: two-site demo skipped: qemu-storage-daemon is not installed (apt-get install qemu-utils)");
        return Ok(());
    }
    let started = Instant::now();
    let tmp = tempfile::tempdir().context("creating a temporary directory")?;
    println!("lab: two-site demo — sites \"prod\" and \"dr\" paired (TLS 1.3, mutual auth); 3 VM disks of 32 MiB behind QEMU's block mirror; source VDSA -> fault proxy -> target VDSA; a guest writes, a checkpoint every second");
    let lab = std::env::current_exe()?;
    let o = TwoSiteOptions { seconds, ..TwoSiteOptions::default() };
    let r = run(&lab, tmp.path(), &o, |line| println!("  {line}"))?;
    let st = &r.source_status;
    println!("lab: verified");
    println!(
        "  {} MiB in {} guest writes replicated; the link came back {} times (after {} cuts, {} stall, a target and a source SIGKILL)",
        r.guest_bytes >> 20,
        r.guest_writes,
        r.links_up.saturating_sub(1),
        r.cuts,
        r.stalls
    );
    println!(
        "  {} checkpoints offered as consistent by the target each equal the source at that checkpoint (blake3); the newest equals QEMU's source disks",
        r.consistent_verified
    );
    println!(
        "  {} checkpoints taken while the source resynced are recorded inconsistent and never offered",
        r.inconsistent_during_resync
    );
    println!(
        "  since the source's restart: {} of {} offered blocks crossed the link (the rest the target held); RPO at the end {} ms",
        st["blocks_sent"], st["blocks_offered"], st["rpo_ms"]
    );
    println!("  took {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// Every retained checkpoint reads back exactly the model at it.
fn verify(journal: &Journal, disks: &[DiskId], expected: &BTreeMap<CheckpointId, Vec<blake3::Hash>>) -> Result<u64> {
    let mut n = 0;
    for cp in journal.checkpoints()? {
        let Some(want) = expected.get(&cp.id) else {
            bail!("the journal offers {}, which was never taken", cp.id);
        };
        let view = journal.open_view(cp.id)?;
        for (i, d) in disks.iter().enumerate() {
            if view.disk_hash(*d)? != want[i] {
                bail!("{} disk {i} differs from the reference model", cp.id);
            }
        }
        n += 1;
    }
    Ok(n)
}

/// Ingests the workload of `seed`, continuing the stream where the journal
/// has it, and checkpoints every `per` writes until killed. The parent
/// replays the same workload to know what each checkpoint must hold.
fn crash_child(dir: PathBuf, seed: u64, per: u64) -> Result<()> {
    let journal = Journal::open(&dir, JournalConfig::default())?;
    let disks: Vec<DiskId> = journal.disks()?.iter().map(|d| d.id).collect();
    let sizes: Vec<u64> = journal.disks()?.iter().map(|d| d.size).collect();
    let stream = crash_child_stream();
    let mut seq = journal.stream_position(stream)?.map_or(0, |c| c.seq);
    let mut cp = journal.checkpoints()?.last().map_or(0, |c| c.id.0);
    let mut workload = Workload::new(seed, &sizes, Mix::default());
    let out = std::io::stdout();
    println!("READY {seq} {cp}");
    out.lock().flush()?;
    loop {
        for _ in 0..per {
            let w = workload.next_write();
            seq += 1;
            journal.ingest(stream, &[tap_write(&w, &disks, seq)])?;
        }
        cp += 1;
        journal.mark_checkpoint(checkpoint_spec(cp, cp * 1000, CheckpointKind::Automatic))?;
        let mut lock = out.lock();
        writeln!(lock, "DURABLE {cp}")?;
        lock.flush()?;
        drop(lock);
        if cp % 7 == 0 {
            let policy = RetentionPolicy::Time { history: Duration::from_secs(12) };
            let r = journal.apply_retention(&policy, cp * 1000)?;
            let mut lock = out.lock();
            writeln!(lock, "BASE {}", r.base.map_or(0, |b| b.0))?;
            lock.flush()?;
        }
    }
}
