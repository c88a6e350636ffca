//! The encryption signal's cost (architecture.md, "The encryption
//! signal"): the source VDSA's intake of tap writes, with the signal and
//! without it, in the same process, taking turns in small chunks.
//!
//! The intake measured is what the source does with every written block
//! before it reaches the link: the tap's write into the stream (sequencing
//! and the send queue), the block's hash for the offer to the target, and,
//! with the signal, the block's class and the counters. 64 KiB writes of
//! half plain text and half random bytes.
//!
//! `cargo bench -p vdsa --bench signal [-- --mib N --reps N]`

use protection_groups::{DiskId, StreamId, VpgId};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vdsa::nbd::export::BlockExport;
use vdsa::replication::queue::{Backpressure, QueueConfig};
use vdsa::replication::source::entropy::classify_block;
use vdsa::replication::source::{SourceDisk, SourceOptions, SourceStream};

const WRITE: usize = 64 << 10;
const DISK: u64 = 1 << 30;

/// A stream whose queue holds `mib` in memory: the intake never waits for
/// the (absent) link.
fn stream(dir: &std::path::Path, signal: bool, disk: DiskId, mib: usize) -> Arc<SourceStream> {
    let opts = SourceOptions {
        site: "prod".into(),
        vpg: VpgId::new(),
        stream: StreamId::new(),
        epoch: 1,
        disks: vec![(disk, DISK)],
        target: "127.0.0.1:9".into(),
        heartbeat: Duration::from_secs(1),
        bandwidth: 0,
        streams: 1,
        batch_bytes: 1 << 20,
        window: 4,
        entropy_signal: signal,
    };
    let queue = QueueConfig {
        memory_bytes: ((mib + 64) as u64) << 20,
        spill_path: dir.join(if signal { "spill-on" } else { "spill-off" }),
        spill_bytes: 0,
        backpressure: Backpressure::Block,
    };
    SourceStream::new(opts, queue).unwrap_or_else(|e| panic!("a stream: {e}"))
}

fn arg(name: &str, default: usize) -> usize {
    let v: Vec<String> = std::env::args().collect();
    v.iter().position(|a| a == name).and_then(|i| v.get(i + 1)).and_then(|s| s.parse().ok()).unwrap_or(default)
}

fn main() {
    let (mib, reps) = (arg("--mib", 256), arg("--reps", 5));
    let mut rng = StdRng::seed_from_u64(3);
    let text: Vec<u8> =
        (0..WRITE).map(|i| b"the journal holds every write\n"[i % 30] ^ (rng.gen::<u8>() & 1)).collect();
    let mut random = vec![0u8; WRITE];
    rng.fill(&mut random[..]);

    // The classifier alone.
    for (name, block) in [("plain text", &text[..4096]), ("random", &random[..4096])] {
        let n = 200_000;
        let t = Instant::now();
        let mut x = 0u32;
        for _ in 0..n {
            x += u32::from(classify_block(std::hint::black_box(block)));
        }
        println!("classify_block, {name}: {:.0} ns per 4 KiB block ({x})", t.elapsed().as_nanos() as f64 / n as f64);
    }

    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let disk = DiskId::new();
    let writes = (mib << 20) / WRITE;
    let mut secs = [Vec::new(), Vec::new()];
    for rep in 0..reps {
        let (on, off) = (stream(dir.path(), true, disk, mib), stream(dir.path(), false, disk, mib));
        let mut took = [Duration::ZERO, Duration::ZERO];
        for chunk in 0..writes / 64 {
            for (k, s) in [&off, &on].into_iter().enumerate() {
                let d = SourceDisk { stream: s.clone(), disk };
                let t = Instant::now();
                for i in 0..64 {
                    let data = if (chunk + i) % 2 == 0 { text.clone() } else { random.clone() };
                    for b in data.chunks_exact(4096) {
                        std::hint::black_box(blake3::hash(b));
                    }
                    let off = ((chunk * 64 + i) * WRITE) as u64 % DISK;
                    d.write_owned(off, data).unwrap_or_else(|e| panic!("{e}"));
                }
                took[k] += t.elapsed();
            }
        }
        let mibs: Vec<f64> = took.iter().map(|t| mib as f64 / t.as_secs_f64()).collect();
        eprintln!("rep {rep}: without the signal {:.0} MiB/s, with it {:.0} MiB/s", mibs[0], mibs[1]);
        secs[0].push(took[0].as_secs_f64());
        secs[1].push(took[1].as_secs_f64());
        on.stop();
        off.stop();
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (off_s, on_s) = (median(&mut secs[0]), median(&mut secs[1]));
    println!(
        "source intake of {mib} MiB (64 KiB writes, half text, half random; medians of {reps}): without the signal \
         {:.0} MiB/s, with it {:.0} MiB/s: ratio {:.3} (goal >= 0.95)",
        mib as f64 / off_s,
        mib as f64 / on_s,
        off_s / on_s
    );
}
