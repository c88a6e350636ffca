//! Power cuts of a VDSA: the `vdsa tap-serve` daemon in a real guest (the
//! guest kit), its journal on the guest's ext4 disk, writes over NBD from
//! the host with FLUSH and FUA, and the guest's power cut (SIGKILL of
//! QEMU) at random moments: while the journal is created, while it opens
//! after the previous cut, while it writes, flushes and rolls segments and
//! packs over (they are kept small for that).
//!
//! One boot per cut: boot, wait for the VDSA, verify what the previous
//! rounds made durable, write, cut. After every reboot the VDSA must start,
//! and every write acknowledged by a FLUSH or as a FUA write must read back.
//! What was written after the last of those may or may not be there, but
//! what is there must be a prefix of the writes in the order they were
//! acknowledged (the log keeps a stream's order; nothing half-applied).

use crate::guest::{free_port, make_ext4, Boot, GuestConfig, GuestKit, Initramfs, BLOCK_MODULES, NET_MODULES};
use anyhow::{bail, Context, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};
use vdsa::nbd::client::NbdClient;

/// The protected disk the host writes, as the VDSA exports it.
const DISK_BYTES: u64 = 16 << 20;
const BLOCK: usize = 4096;
const GUEST_PORT: u16 = 10809;

/// What a run found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PowerLossReport {
    pub seed: u64,
    pub cuts: u64,
    /// Cuts made before the VDSA answered (journal creation or opening).
    pub cuts_while_starting: u64,
    pub writes_acknowledged: u64,
    pub fua_writes: u64,
    pub flushes: u64,
    /// Blocks compared after reboots (each a block that was durable).
    pub blocks_verified: u64,
}

/// One write the host made, in acknowledgement order.
#[derive(Debug, Clone)]
struct Acked {
    block: u64,
    /// The block's bytes are a pattern of this value (see `pattern`).
    value: u64,
}

fn pattern(block: u64, value: u64) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK];
    for (i, chunk) in b.chunks_exact_mut(16).enumerate() {
        chunk[..8].copy_from_slice(&value.to_le_bytes());
        chunk[8..].copy_from_slice(&(block ^ (i as u64) << 40).to_le_bytes());
    }
    b
}

/// The disk as the host knows it: each block's durable value (0: never
/// written, reads as zeros).
#[derive(Debug, Default)]
struct Model {
    durable: HashMap<u64, u64>,
}

/// How to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PowerLossOptions {
    pub cuts: u64,
    pub seed: u64,
    /// The control run: the VDSA acknowledges FLUSH and FUA without making
    /// anything durable (and takes no automatic checkpoints, which would),
    /// and every cut comes while the host writes. The checker must then
    /// find acknowledged writes missing.
    pub control: bool,
}

/// Runs the power cuts; `dir` holds the guest's disk, its consoles and the
/// kit's images.
pub fn run(dir: &Path, opts: PowerLossOptions, vdsa: &Path) -> Result<PowerLossReport> {
    let PowerLossOptions { cuts, seed, control } = opts;
    let durability = if control { "--unsafe-no-durability" } else { "--checkpoint-interval-ms 300" };
    let kit = GuestKit::prepare()?;
    let initramfs = dir.join("vdsa-guest.cpio");
    kit.build_initramfs(
        &Initramfs {
            modules: BLOCK_MODULES.iter().chain(NET_MODULES).copied().collect(),
            programs: vec![(vdsa.to_path_buf(), "/usr/bin/vdsa".into())],
            init: format!(
                "mount -t ext4 /dev/vda /data || {{ echo 'GUEST: cannot mount the data disk'; poweroff -f; }}\n\
                 ip link set lo up; ip link set eth0 up; ip addr add 10.0.2.15/24 dev eth0; ip route add default via 10.0.2.2\n\
                 echo GUEST: booted\n\
                 /usr/bin/vdsa tap-serve --journal /data/journal --disk d0={DISK_BYTES} \
                 --listen tcp:0.0.0.0:{GUEST_PORT} --control /run/ctl.sock \
                 {durability} --segment-bytes 64K --pack-bytes 64K > /dev/console 2>&1\n\
                 echo \"GUEST: vdsa exited with $?\""
            ),
        },
        &initramfs,
    )?;
    let data = dir.join("data.img");
    make_ext4(&data, 256)?;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut report = PowerLossReport { seed, cuts, ..Default::default() };
    let mut model = Model::default();
    // Writes acknowledged after the last durable one, not yet settled by a
    // reboot: a prefix of them may have survived.
    let mut pending: Vec<Acked> = Vec::new();
    let mut next_value = 1u64;
    // One boot per cut, and a last one to verify the last cut.
    for round in 0..=cuts {
        let port = free_port()?;
        let config = GuestConfig {
            boot: Boot::Kernel { initramfs: initramfs.clone(), append: String::new() },
            memory_mb: 384,
            disks: vec![data.clone()],
            forwards: vec![(port, GUEST_PORT)],
            nbd_disks: Vec::new(),
            read_only_nbd_disks: Vec::new(),
            console: dir.join(format!("console-{round}.log")),
        };
        let mut guest = kit.boot(&config)?;
        // About one cut in four comes while the VDSA starts: creating its
        // journal on the first boot, opening it after a cut later.
        if round < cuts && !control && rng.gen_bool(0.25) {
            guest.wait_for("GUEST: booted", Duration::from_secs(120))?;
            std::thread::sleep(Duration::from_millis(rng.gen_range(0..400)));
            guest.power_cut();
            report.cuts_while_starting += 1;
            continue;
        }
        // A VDSA that does not start ends the run: a report means every
        // restart succeeded.
        if let Err(e) = guest.wait_for("READY", Duration::from_secs(120)) {
            bail!("boot {round} (seed {seed}): the VDSA did not start after a power cut: {e:#}");
        }
        let addr = format!("127.0.0.1:{port}");
        let mut nbd = connect(&addr)?;
        let unsettled = pending.len();
        report.blocks_verified += verify(&mut nbd, &model, &mut pending)
            .with_context(|| format!("boot {round} (seed {seed}), {unsettled} writes after the last durable one"))?;
        for a in pending.drain(..) {
            model.durable.insert(a.block, a.value);
        }
        if round == cuts {
            break;
        }
        let cut = guest.power_cut_after(Duration::from_millis(rng.gen_range(50..1500)));
        let (acked, durable_upto, (fua, flushes), in_flight) = write_until_error(&mut nbd, &mut rng, &mut next_value);
        let _ = cut.join();
        guest.power_cut();
        report.writes_acknowledged += (acked.len() - usize::from(in_flight)) as u64;
        report.fua_writes += fua;
        report.flushes += flushes;
        for a in &acked[..durable_upto] {
            model.durable.insert(a.block, a.value);
        }
        pending = acked[durable_upto..].to_vec();
    }
    Ok(report)
}

fn connect(addr: &str) -> Result<NbdClient> {
    let start = Instant::now();
    loop {
        match NbdClient::connect_tcp(addr, "d0") {
            Ok(c) => return Ok(c),
            Err(e) if start.elapsed() > Duration::from_secs(30) => bail!("connecting to the VDSA at {addr}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// Writes random blocks (some FUA, a FLUSH now and then) until the
/// connection fails (the power cut), at most a minute. Returns the writes
/// acknowledged in order (and last the one in flight at the cut, if any), how many of them were durable (acknowledged
/// before or by the last FLUSH or FUA reply), (FUA writes, flushes)
/// acknowledged, and whether the last write was in flight.
fn write_until_error(
    nbd: &mut NbdClient,
    rng: &mut StdRng,
    next_value: &mut u64,
) -> (Vec<Acked>, usize, (u64, u64), bool) {
    let start = Instant::now();
    let mut acked = Vec::new();
    let (mut durable_upto, mut fua, mut flushes) = (0usize, 0u64, 0u64);
    let blocks = DISK_BYTES / BLOCK as u64;
    while start.elapsed() < Duration::from_secs(60) {
        let r: f64 = rng.gen();
        if r < 0.1 {
            if nbd.flush().is_err() {
                break;
            }
            flushes += 1;
            durable_upto = acked.len();
            continue;
        }
        // Half the writes go to a small hot set, so blocks are overwritten
        // and segments and packs roll over.
        let block = if rng.gen_bool(0.5) { rng.gen_range(0..64) } else { rng.gen_range(0..blocks) };
        let value = *next_value;
        *next_value += 1;
        let data = pattern(block, value);
        let with_fua = r < 0.3;
        let offset = block * BLOCK as u64;
        let ok = if with_fua { nbd.write_fua(offset, &data) } else { nbd.write(offset, &data) };
        acked.push(Acked { block, value });
        if ok.is_err() {
            // In flight when the power went: it may or may not have been
            // applied, and if it was, it is the last write that survived.
            // It stays at the end of the unsettled writes.
            return (acked, durable_upto, (fua, flushes), true);
        }
        if with_fua {
            fua += 1;
            // Durable, and the log keeps order: so is all before it.
            durable_upto = acked.len();
        }
    }
    (acked, durable_upto, (fua, flushes), false)
}

/// Reads every block the model knows and those `tail` touches. Each block
/// must hold its durable value, or, for blocks `tail` wrote, the value of
/// some prefix of `tail`: the longest prefix consistent with every block is
/// found and `tail` is cut to it. Returns the blocks compared.
fn verify(nbd: &mut NbdClient, model: &Model, tail: &mut Vec<Acked>) -> Result<u64> {
    let mut read = |block: u64| -> Result<Vec<u8>> {
        let mut buf = vec![0u8; BLOCK];
        nbd.read(block * BLOCK as u64, &mut buf).with_context(|| format!("reading block {block}"))?;
        Ok(buf)
    };
    let mut seen: HashMap<u64, Vec<u8>> = HashMap::new();
    for &block in model.durable.keys().chain(tail.iter().map(|a| &a.block)) {
        if let std::collections::hash_map::Entry::Vacant(e) = seen.entry(block) {
            e.insert(read(block)?);
        }
    }
    let value_of = |block: u64, upto: usize| -> u64 {
        tail[..upto]
            .iter()
            .rev()
            .find(|a| a.block == block)
            .map(|a| a.value)
            .or_else(|| model.durable.get(&block).copied())
            .unwrap_or(0)
    };
    let expect = |block: u64, value: u64| if value == 0 { vec![0u8; BLOCK] } else { pattern(block, value) };
    let prefix = (0..=tail.len()).rev().find(|&k| seen.iter().all(|(&b, got)| *got == expect(b, value_of(b, k))));
    match prefix {
        Some(k) => {
            tail.truncate(k);
            Ok(seen.len() as u64)
        }
        None => {
            let wrong: Vec<String> = seen
                .iter()
                .filter(|(&b, got)| **got != expect(b, value_of(b, 0)))
                .map(|(&b, got)| {
                    let mut v = [0u8; 8];
                    v.copy_from_slice(&got[..8]);
                    format!("block {b}: durable value {}, found {}", value_of(b, 0), u64::from_le_bytes(v))
                })
                .take(8)
                .collect();
            bail!("no prefix of the writes after the last durable one explains the disk: {wrong:?}")
        }
    }
}
