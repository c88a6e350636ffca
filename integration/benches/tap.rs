//! Tap benchmark: a guest writes through qemu-storage-daemon (source opened
//! with O_DIRECT and native AIO, as a VM with cache=none) with
//! (a) no mirror, (b) QEMU's write-blocking mirror to a plain NBD server
//! (qemu-nbd on a raw file: the peer), (c) the same mirror to the VDSA.
//! Prints throughput (4 KiB random at queue depth 16, 1 MiB sequential at
//! depth 8) and p99 latency (depth 1), and the ratios c/b and c/a. The three
//! run side by side, each with its own qemu-storage-daemon, and take turns
//! in small chunks of the workload.
//!
//! `cargo bench -p integration --bench tap [-- --reps N --random-mib N --seq-mib N --dir PATH]`

use anyhow::{Context, Result};
use integration::kvm_lab::{qemu_available, PlainNbd, StorageDaemon, VdsaProcess};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use vdsa::nbd::client::NbdClient;

const IMAGE: u64 = 1 << 30;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    None,
    Plain,
    Vdsa,
}

#[derive(Debug, Default, Clone, Copy)]
struct Figures {
    random_mibs: f64,
    random_p99_us: f64,
    seq_mibs: f64,
    seq_p99_us: f64,
}

struct Args {
    reps: usize,
    random_mib: usize,
    seq_mib: usize,
    dir: PathBuf,
}

fn args() -> Args {
    let mut a = Args { reps: 3, random_mib: 64, seq_mib: 256, dir: std::env::temp_dir() };
    let v: Vec<String> = std::env::args().collect();
    let mut i = 1;
    while i + 1 < v.len() {
        match v[i].as_str() {
            "--reps" => a.reps = v[i + 1].parse().unwrap_or(a.reps),
            "--random-mib" => a.random_mib = v[i + 1].parse().unwrap_or(a.random_mib),
            "--seq-mib" => a.seq_mib = v[i + 1].parse().unwrap_or(a.seq_mib),
            "--dir" => a.dir = PathBuf::from(&v[i + 1]),
            _ => {
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    a
}

fn preallocated(path: &Path) -> Result<()> {
    let st = Command::new("fallocate").args(["-l", &IMAGE.to_string()]).arg(path).status()?;
    anyhow::ensure!(st.success(), "fallocate {} failed", path.display());
    Ok(())
}

fn p99(mut v: Vec<Duration>) -> f64 {
    v.sort();
    v[(v.len() * 99 / 100).min(v.len() - 1)].as_secs_f64() * 1e6
}

/// One configuration, set up and ready for the guest.
struct Setup {
    target: Target,
    guest: NbdClient,
    qsd: StorageDaemon,
    vdsa: Option<VdsaProcess>,
    _plain: Option<PlainNbd>,
    _dir: tempfile::TempDir,
    /// Where this guest is in the data pool and on its disk.
    at: usize,
    seq_off: u64,
}

impl Setup {
    fn new(target: Target, a: &Args) -> Result<Setup> {
        let tmp = tempfile::tempdir_in(&a.dir)?;
        let dir = tmp.path();
        let image = dir.join("source.raw");
        preallocated(&image)?;
        let mut qsd = StorageDaemon::start(dir, &image, true)?;
        let mut plain = None;
        let mut vdsa = None;
        match target {
            Target::None => {}
            Target::Plain => {
                let target_image = dir.join("target.raw");
                preallocated(&target_image)?;
                let p = PlainNbd::start(&dir.join("plain.sock"), &target_image)?;
                qsd.attach("tap", &p.sock, "")?;
                plain = Some(p);
            }
            Target::Vdsa => {
                let v = VdsaProcess::start(Path::new(env!("CARGO_BIN_EXE_lab")), dir, "vmdisk=1G")?;
                qsd.attach("tap", &v.tap_sock, "vmdisk")?;
                v.call(json!({"op": "sync", "syncing": false}))?;
                vdsa = Some(v);
            }
        }
        let guest = qsd.guest()?;
        Ok(Setup { target, guest, qsd, vdsa, _plain: plain, _dir: tmp, at: 0, seq_off: 0 })
    }

    /// The next `n` bytes of the pool: data no write of this guest repeats
    /// (dedup would flatter the VDSA).
    fn take(&mut self, pool: &[u8], n: usize) -> usize {
        if self.at + n > pool.len() {
            self.at = 0;
        }
        self.at += n;
        self.at - n
    }

    fn finish(mut self) -> Result<()> {
        if self.target != Target::None {
            self.qsd.detach("tap")?;
        }
        if let Some(v) = self.vdsa.take() {
            v.shutdown()?;
        }
        Ok(())
    }
}

/// All three configurations run side by side and take turns in small
/// chunks, so that each sees the same machine (its disk's speed drifts by
/// 2-3x within a minute).
fn measure_all(a: &Args, pool: &[u8], rng: &mut StdRng) -> Result<Vec<Figures>> {
    let mut setups: Vec<Setup> =
        [Target::None, Target::Plain, Target::Vdsa].into_iter().map(|t| Setup::new(t, a)).collect::<Result<_>>()?;
    let k = setups.len();
    let mut busy = vec![Duration::ZERO; k];
    // 4 KiB random, queue depth 16: turns of 16 batches.
    let batches = a.random_mib * 256 / 16;
    for _ in 0..batches / 16 {
        for (i, s) in setups.iter_mut().enumerate() {
            let t = Instant::now();
            for _ in 0..16 {
                let offs: Vec<(u64, usize)> =
                    (0..16).map(|_| (rng.gen_range(0..IMAGE / 4096) * 4096, s.take(pool, 4096))).collect();
                let batch: Vec<(u64, &[u8])> = offs.iter().map(|&(off, o)| (off, &pool[o..o + 4096])).collect();
                s.guest.write_many(&batch).with_context(|| format!("{:?}", s.target))?;
            }
            busy[i] += t.elapsed();
        }
    }
    let random_mibs: Vec<f64> = busy.iter().map(|b| (batches / 16 * 256) as f64 / 256.0 / b.as_secs_f64()).collect();
    // 4 KiB random, queue depth 1: one write each in turn.
    let mut lat = vec![Vec::new(); k];
    for _ in 0..3000 {
        let off = rng.gen_range(0..IMAGE / 4096) * 4096;
        for (i, s) in setups.iter_mut().enumerate() {
            let o = s.take(pool, 4096);
            let t = Instant::now();
            s.guest.write(off, &pool[o..o + 4096])?;
            lat[i].push(t.elapsed());
        }
    }
    let random_p99: Vec<f64> = lat.into_iter().map(p99).collect();
    // 1 MiB sequential, queue depth 8: one batch each in turn.
    let mut busy = vec![Duration::ZERO; k];
    for _ in 0..a.seq_mib / 8 {
        for (i, s) in setups.iter_mut().enumerate() {
            let offs: Vec<(u64, usize)> = (0..8)
                .map(|_| {
                    let w = (s.seq_off, s.take(pool, 1 << 20));
                    s.seq_off = (s.seq_off + (1 << 20)) % IMAGE;
                    w
                })
                .collect();
            let batch: Vec<(u64, &[u8])> = offs.iter().map(|&(off, o)| (off, &pool[o..o + (1 << 20)])).collect();
            let t = Instant::now();
            s.guest.write_many(&batch)?;
            busy[i] += t.elapsed();
        }
    }
    let seq_mibs: Vec<f64> = busy.iter().map(|b| (a.seq_mib / 8 * 8) as f64 / b.as_secs_f64()).collect();
    let mut lat = vec![Vec::new(); k];
    for _ in 0..200 {
        for (i, s) in setups.iter_mut().enumerate() {
            let o = s.take(pool, 1 << 20);
            let t = Instant::now();
            s.guest.write(s.seq_off, &pool[o..o + (1 << 20)])?;
            lat[i].push(t.elapsed());
            s.seq_off = (s.seq_off + (1 << 20)) % IMAGE;
        }
    }
    let seq_p99: Vec<f64> = lat.into_iter().map(p99).collect();
    for s in setups {
        s.finish()?;
    }
    Ok((0..k)
        .map(|i| Figures {
            random_mibs: random_mibs[i],
            random_p99_us: random_p99[i],
            seq_mibs: seq_mibs[i],
            seq_p99_us: seq_p99[i],
        })
        .collect())
}

/// A printed row: its name, which figure, and whether higher is better.
type Row = (&'static str, fn(&Figures) -> f64, bool);

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() -> Result<()> {
    let a = args();
    anyhow::ensure!(qemu_available(), "qemu-storage-daemon is needed (apt-get install qemu-utils)");
    let mut rng = StdRng::seed_from_u64(1);
    let mut pool = vec![0u8; (a.random_mib + a.seq_mib + 16) << 20];
    rng.fill_bytes(&mut pool);
    println!(
        "tap benchmark: 4 KiB random {} MiB at QD16, 1 MiB sequential {} MiB at QD8, p99 at QD1; {} repetitions (medians)",
        a.random_mib, a.seq_mib, a.reps
    );
    let mut all: Vec<Vec<Figures>> = vec![Vec::new(); 3];
    for rep in 0..a.reps {
        for (i, f) in measure_all(&a, &pool, &mut rng)?.into_iter().enumerate() {
            eprintln!("rep {rep} {:?}: {f:?}", [Target::None, Target::Plain, Target::Vdsa][i]);
            all[i].push(f);
        }
    }
    let med = |i: usize, g: fn(&Figures) -> f64| median(all[i].iter().map(g).collect());
    let rows: [Row; 4] = [
        ("4 KiB random, QD16, MiB/s", |f| f.random_mibs, true),
        ("4 KiB random, QD1, p99 us", |f| f.random_p99_us, false),
        ("1 MiB sequential, QD8, MiB/s", |f| f.seq_mibs, true),
        ("1 MiB sequential, QD1, p99 us", |f| f.seq_p99_us, false),
    ];
    println!("{:<32} {:>10} {:>14} {:>10} {:>8} {:>8}", "", "no mirror", "mirror->plain", "mirror->vdsa", "c/b", "c/a");
    for (name, g, higher_better) in rows {
        let (na, pb, vc) = (med(0, g), med(1, g), med(2, g));
        let (cb, ca) = (vc / pb, vc / na);
        let goal = if higher_better {
            format!("(goal c/b >= 0.8) {}", if cb >= 0.8 { "ok" } else { "MISSED" })
        } else {
            format!("(goal c/b <= 1.3) {}", if cb <= 1.3 { "ok" } else { "MISSED" })
        };
        println!("{name:<32} {na:>10.0} {pb:>14.0} {vc:>10.0} {cb:>8.2} {ca:>8.2} {goal}");
    }
    Ok(())
}
