//! SIGKILL torture of the shared chunk store (docs/journal-format.md,
//! "The shared chunk store"): a child process ingests into two journals
//! that share one store (half its writes as a replication target receives
//! them: blocks the store or the disk already holds come as hashes only),
//! takes checkpoints, applies retention (which
//! collects garbage), and now and then removes the second journal and
//! creates it again, half the time as an earlier build made it (its own
//! chunk store) and then moves it into the shared store; it is killed at a
//! random moment, many times. After each kill:
//! - every checkpoint the child reported durable and retention kept is
//!   there and reads back the content the child computed for it (so no
//!   block one journal needs was taken by the other's collection or
//!   removal);
//! - a journal whose removal had begun is either whole or gone, and one
//!   whose move had begun is whole in its own store or in the shared one;
//! - after a full collection, a scrub of the packs finds no chunk that no
//!   journal references (nothing leaks forever) and no referenced chunk
//!   missing.
//!
//! The child is `lab store-crash-child`; the suite runs a short seeded
//! version, `lab store-crash --long` a long one.

use crate::process::ChildGuard;
use anyhow::{bail, Context, Result};
use protection_groups::{CheckpointId, CheckpointKind, DiskId, RetentionPolicy, StreamId};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;
use vdsa::journal::{
    stored_chunk_hashes, HashSetOfBlocks, Journal, JournalConfig, TapWrite, WireBlock, WriteData, BLOCK_SIZE,
};

const DISK_BYTES: u64 = 1 << 20;
const NAMES: [&str; 2] = ["a", "b"];

/// The journals' tunables: small packs and segments, so that packs seal,
/// fill with garbage and are compacted all the time.
fn config(store: &Path) -> JournalConfig {
    JournalConfig {
        segment_bytes: 64 << 10,
        pack_bytes: 64 << 10,
        compression_level: Some(1),
        workers: 1,
        chunk_store: Some(store.to_path_buf()),
    }
}

fn journal_dir(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}

fn store_dir(dir: &Path) -> PathBuf {
    dir.join("chunk-store")
}

/// Whether a journal was created there (its metadata exists). A folder
/// without it is a creation a kill interrupted: it holds nothing.
fn exists(dir: &Path, name: &str) -> bool {
    journal_dir(dir, name).join("journal.json").exists()
}

fn stream_of(name: &str) -> StreamId {
    let mut id = [0u8; 16];
    id.copy_from_slice(&blake3::hash(format!("store-crash stream {name}").as_bytes()).as_bytes()[..16]);
    StreamId::from_bytes(id)
}

/// Block contents: a pool of 48 shared by both journals (so they dedup
/// against each other), or, one write in four, unique.
fn content(rng: &mut StdRng) -> Vec<u8> {
    let mut h = blake3::Hasher::new();
    if rng.gen_ratio(1, 4) {
        h.update(&rng.gen::<u64>().to_le_bytes());
    } else {
        h.update(&[rng.gen_range(0..48u8)]);
    }
    let mut out = vec![0u8; BLOCK_SIZE];
    h.finalize_xof().fill(&mut out);
    out
}

struct Live {
    journal: Journal,
    disk: DiskId,
    stream: StreamId,
    seq: u64,
    next_cp: u64,
    image: Vec<u8>,
}

/// Opens (or creates) journal `name`: in the shared store, or with
/// `own_store` in a store of its own, as an earlier build (format 2) made
/// it. A format-2 journal opened in the shared store moves into it.
fn open_live(dir: &Path, name: &str, own_store: bool) -> Result<Live> {
    let mut config = config(&store_dir(dir));
    if own_store {
        config.chunk_store = None;
    }
    let journal = Journal::open(journal_dir(dir, name), config)?;
    let disk = match journal.disks()?.first() {
        Some(d) => d.id,
        None => {
            let d = DiskId::new();
            journal.add_disk(d, DISK_BYTES)?;
            d
        }
    };
    let stream = stream_of(name);
    let seq = journal.stream_position(stream)?.map_or(0, |c| c.seq);
    let next_cp = journal.checkpoints()?.last().map_or(1, |c| c.id.0 + 1);
    let mut image = vec![0u8; DISK_BYTES as usize];
    journal.read_head(disk, 0, &mut image)?;
    Ok(Live { journal, disk, stream, seq, next_cp, image })
}

fn say(line: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")?;
    out.flush()?;
    Ok(())
}

/// A few writes into journal `name`, then a checkpoint (and now and then
/// retention, which collects garbage).
fn round(l: &mut Live, name: &str, rng: &mut StdRng) -> Result<()> {
    let blocks = DISK_BYTES / BLOCK_SIZE as u64;
    for _ in 0..rng.gen_range(1..6) {
        let n = rng.gen_range(1..8u64);
        let first = rng.gen_range(0..blocks - n);
        let off = first * BLOCK_SIZE as u64;
        let range = off as usize..off as usize + (n as usize) * BLOCK_SIZE;
        // One write in six writes again what the disk holds there.
        let data: Vec<u8> = if rng.gen_ratio(1, 6) {
            l.image[range.clone()].to_vec()
        } else {
            (0..n).flat_map(|_| content(rng)).collect()
        };
        l.seq += 1;
        let write = |data| TapWrite { seq: l.seq, disk: l.disk, offset: off, data: WriteData::Data(data) };
        if rng.gen_bool(0.5) {
            let (sent, wire) = as_received(l, &data, off)?;
            l.journal.ingest_wire(l.stream, &[write(&sent)], &wire)?;
        } else {
            l.journal.ingest(l.stream, &[write(&data)])?;
        }
        l.image[range].copy_from_slice(&data);
    }
    let id = l.next_cp;
    l.next_cp += 1;
    say(&format!("PENDING {name} {id} {}", blake3::hash(&l.image)))?;
    l.journal.mark_checkpoint(crate::checkpoint_spec(id, id * 1000, CheckpointKind::Automatic))?;
    say(&format!("DURABLE {name} {id}"))?;
    if id.is_multiple_of(5) {
        let policy = RetentionPolicy::Time { history: Duration::from_secs(8) };
        l.journal.apply_retention(&policy, id * 1000)?;
    }
    Ok(())
}

/// A write's blocks as a replication target receives them: a block the
/// chunk store holds (another journal's, or garbage not yet collected) or
/// that the disk holds at its position comes as its hash only, its bytes
/// zeroed here (the journal must take them from what it holds); the rest
/// are sent.
fn as_received(l: &Live, data: &[u8], off: u64) -> Result<(Vec<u8>, Vec<WireBlock>)> {
    let hashes: Vec<[u8; 32]> = data.chunks(BLOCK_SIZE).map(|b| *blake3::hash(b).as_bytes()).collect();
    let in_store = l.journal.holds_chunks(&hashes)?;
    let mut sent = data.to_vec();
    let mut wire = Vec::new();
    for (i, (hash, stored)) in hashes.into_iter().zip(in_store).enumerate() {
        let at = off as usize + i * BLOCK_SIZE;
        let block = i * BLOCK_SIZE..(i + 1) * BLOCK_SIZE;
        if stored || l.image[at..at + BLOCK_SIZE] == data[block.clone()] {
            sent[block].fill(0);
            wire.push(WireBlock::Held { hash });
        } else {
            wire.push(WireBlock::Sent { hash });
        }
    }
    Ok((sent, wire))
}

/// The child: ingests into journals a and b until killed, printing
/// `PENDING name id hash` before each checkpoint, `DURABLE name id` once
/// it is durable, and `REMOVING b`, `REMOVED b`, `CREATED b` around a
/// removal and a creation. Half the time b is created as an earlier build
/// made it (its own chunk store), written, and then moved into the shared
/// store: `MOVING b`, `MOVED b`.
pub fn child(dir: &Path, seed: u64) -> Result<()> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut live: Vec<Option<Live>> = Vec::new();
    for name in NAMES {
        let fresh = !exists(dir, name);
        let moving = !fresh && !in_shared_store(dir, name);
        if moving {
            say(&format!("MOVING {name}"))?;
        }
        live.push(Some(open_live(dir, name, false)?));
        if fresh {
            say(&format!("CREATED {name}"))?;
        }
        if moving {
            say(&format!("MOVED {name}"))?;
        }
    }
    say("READY")?;
    loop {
        for (i, slot) in live.iter_mut().enumerate() {
            let Some(l) = slot else { continue };
            round(l, NAMES[i], &mut rng)?;
        }
        if rng.gen_ratio(1, 12) {
            say("REMOVING b")?;
            live[1] = None;
            Journal::remove(journal_dir(dir, "b"))?;
            say("REMOVED b")?;
            if rng.gen_bool(0.5) {
                let mut own = open_live(dir, "b", true)?;
                say("CREATED b")?;
                for _ in 0..rng.gen_range(1..4) {
                    round(&mut own, "b", &mut rng)?;
                }
                drop(own);
                say("MOVING b")?;
                live[1] = Some(open_live(dir, "b", false)?);
                say("MOVED b")?;
            } else {
                live[1] = Some(open_live(dir, "b", false)?);
                say("CREATED b")?;
            }
        }
    }
}

/// Whether journal `name` keeps its chunks in the shared store (format 3);
/// false for one with its own store (format 2).
fn in_shared_store(dir: &Path, name: &str) -> bool {
    std::fs::read(journal_dir(dir, name).join("journal.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .is_some_and(|m| m["format"] == 3)
}

/// What one run of the torture found.
#[derive(Debug, Default, Clone)]
pub struct StoreCrashReport {
    pub runs: u64,
    pub kills_during_removal: u64,
    pub removals_finished: u64,
    /// Moves of a format-2 journal into the shared store, and kills
    /// during one.
    pub kills_during_move: u64,
    pub moves_finished: u64,
    pub checkpoints_verified: u64,
    pub chunks_scrubbed: u64,
}

/// Runs the child `runs` times, killing it at a random moment each time,
/// and checks what survived (see the module's comment).
pub fn run(dir: &Path, lab: &Path, runs: u64, seed: u64) -> Result<StoreCrashReport> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut report = StoreCrashReport::default();
    // (journal, checkpoint) -> the content hash the child computed for it,
    // and whether the child saw it durable.
    let mut expected: HashMap<(usize, u64), (String, bool)> = HashMap::new();
    for run in 0..runs {
        let spawned = Command::new(lab)
            .args(["store-crash-child", "--seed", &(seed ^ (run + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)).to_string()])
            .arg("--dir")
            .arg(dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("spawning the store crash child")?;
        let mut child = ChildGuard::adopt(spawned, "the store crash child");
        let stdout = child.child_mut().and_then(|c| c.stdout.take()).context("the child's stdout")?;
        let reader =
            std::thread::spawn(move || BufReader::new(stdout).lines().map_while(Result::ok).collect::<Vec<_>>());
        std::thread::sleep(Duration::from_millis(rng.gen_range(5..350)));
        if let Some(status) = child.child_mut().and_then(|c| c.try_wait().ok().flatten()) {
            bail!("run {run}: the child exited by itself ({status})");
        }
        child.kill();
        let lines = reader.join().unwrap_or_default();
        let (mut removing, mut moving) = (false, false);
        for line in &lines {
            let words: Vec<&str> = line.split(' ').collect();
            let which = |w: &str| NAMES.iter().position(|n| *n == w);
            match words.as_slice() {
                ["PENDING", name, id, hash] => {
                    if let (Some(j), Ok(id)) = (which(name), id.parse::<u64>()) {
                        expected.insert((j, id), ((*hash).to_string(), false));
                    }
                }
                ["DURABLE", name, id] => {
                    if let (Some(j), Ok(id)) = (which(name), id.parse::<u64>()) {
                        if let Some(e) = expected.get_mut(&(j, id)) {
                            e.1 = true;
                        }
                    }
                }
                ["REMOVING", "b"] => removing = true,
                ["REMOVED", "b"] => {
                    removing = false;
                    report.removals_finished += 1;
                    expected.retain(|(j, _), _| *j != 1);
                }
                ["CREATED", "b"] => expected.retain(|(j, _), _| *j != 1),
                ["MOVING", _] => moving = true,
                ["MOVED", _] => {
                    moving = false;
                    report.moves_finished += 1;
                }
                _ => {}
            }
        }
        if removing {
            report.kills_during_removal += 1;
        }
        if moving {
            report.kills_during_move += 1;
        }
        report.checkpoints_verified += check(dir, &mut expected).with_context(|| format!("after kill {run}"))?;
        report.chunks_scrubbed += scrub(dir).with_context(|| format!("scrub after kill {run}"))?;
        report.runs += 1;
    }
    Ok(report)
}

/// Reopens both journals (the first open finishes an interrupted removal)
/// and checks every checkpoint against what the child computed.
fn check(dir: &Path, expected: &mut HashMap<(usize, u64), (String, bool)>) -> Result<u64> {
    let mut verified = 0;
    let mut open = Vec::new();
    for (j, name) in NAMES.iter().enumerate() {
        if !exists(dir, name) {
            if j == 0 {
                bail!("journal a is gone");
            }
            expected.retain(|(x, _), _| *x != j);
            continue;
        }
        let journal = Journal::open(journal_dir(dir, name), JournalConfig::default())
            .with_context(|| format!("reopening journal {name}"))?;
        open.push(journal.clone());
        let Some(disk) = journal.disks()?.first().map(|d| d.id) else { continue };
        let checkpoints = journal.checkpoints()?;
        let base = checkpoints.first().map_or(0, |c| c.id.0);
        for cp in &checkpoints {
            let Some((want, _)) = expected.get(&(j, cp.id.0)) else {
                bail!("journal {name} offers checkpoint {}, which the child never took", cp.id);
            };
            let got = journal.open_view(cp.id)?.disk_hash(disk)?;
            if got.to_string() != *want {
                bail!("journal {name} checkpoint {} reads {got}, the child wrote {want}", cp.id);
            }
            verified += 1;
        }
        for ((x, id), (_, durable)) in expected.iter() {
            if *x == j && *durable && *id >= base && !checkpoints.iter().any(|c| c.id == CheckpointId(*id)) {
                bail!("journal {name} lost checkpoint {id}, reported durable and not aged out (base {base})");
            }
        }
    }
    drop(open);
    Ok(verified)
}

/// A full collection with every member open, then the packs' own hashes
/// against every journal's references: no orphan, nothing missing.
fn scrub(dir: &Path) -> Result<u64> {
    let journals: Vec<Journal> = NAMES
        .iter()
        .filter(|n| exists(dir, n))
        .map(|n| Journal::open(journal_dir(dir, n), JournalConfig::default()))
        .collect::<Result<_, _>>()?;
    let Some(first) = journals.first() else { bail!("no journal to scrub") };
    first.collect_chunk_garbage(true)?;
    // A journal with its own store (a move a kill stopped before its
    // metadata named the shared store) references nothing in it.
    let mut referenced = HashSetOfBlocks::default();
    for (j, name) in journals.iter().zip(NAMES.iter().filter(|n| exists(dir, n))) {
        if in_shared_store(dir, name) {
            referenced.extend(j.referenced_chunks()?);
        }
    }
    let stored = stored_chunk_hashes(&store_dir(dir).join("chunks"))?;
    let orphans = stored.iter().filter(|h| !referenced.contains(*h)).count();
    let missing = referenced.iter().filter(|h| !stored.contains(*h)).count();
    if orphans != 0 || missing != 0 {
        bail!("{orphans} chunks stored that no journal references, {missing} referenced and not stored");
    }
    Ok(stored.len() as u64)
}
