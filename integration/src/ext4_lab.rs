//! A guest disk with a real ext4 file system, for the encryption signal
//! and the clean-point search: made with `mkfs.ext4 -d` from plain text
//! files (no root, no loop device), with each file's blocks and the free
//! blocks read back with `debugfs`, so that a workload can rewrite files
//! in place, copy compressed data into free space, or encrypt files the
//! way ransomware does, all through the tap at the blocks ext4 chose; and
//! a check that reads the files of an image back with `debugfs` and
//! compares their hashes.

use anyhow::{bail, Context, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Block size of the file systems made here.
pub const BLOCK: u64 = 4096;

/// One file of the image: its name, its blocks on the disk, and the hash
/// of its content as written.
#[derive(Debug, Clone)]
pub struct Ext4File {
    pub name: String,
    pub blocks: Vec<u64>,
    pub hash: blake3::Hash,
}

/// An ext4 image and what is on it.
#[derive(Debug, Clone)]
pub struct Ext4Image {
    pub path: PathBuf,
    pub files: Vec<Ext4File>,
    /// Free blocks, for copies into free space.
    pub free: Vec<u64>,
}

/// Plain text (words, lines): what office files, code and logs look like
/// to the signal. Different for every seed.
pub fn plain_text(seed: u64, len: usize) -> Vec<u8> {
    const WORDS: [&str; 24] = [
        "the",
        "journal",
        "holds",
        "every",
        "write",
        "of",
        "a",
        "protected",
        "disk",
        "and",
        "site",
        "manager",
        "checkpoint",
        "recovery",
        "order",
        "invoice",
        "customer",
        "total",
        "quarter",
        "report",
        "server",
        "config",
        "value",
        "line",
    ];
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = Vec::with_capacity(len + 16);
    while out.len() < len {
        out.extend_from_slice(WORDS[rng.gen_range(0..WORDS.len())].as_bytes());
        out.push(if rng.gen_ratio(1, 12) { b'\n' } else { b' ' });
        if rng.gen_ratio(1, 40) {
            out.extend_from_slice(format!("{} ", rng.gen_range(0..100_000u32)).as_bytes());
        }
    }
    out.truncate(len);
    out
}

/// A compressed archive of text (zstd at its best level: as random to
/// the signal as a zip or a video), at least `len` bytes.
pub fn compressed_archive(seed: u64, len: usize) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut k = 0;
    while out.len() < len {
        let text = plain_text(seed.wrapping_add(k), 1 << 20);
        out.extend(zstd::bulk::compress(&text, 19).context("compressing")?);
        k += 1;
    }
    Ok(out)
}

/// Bytes that look encrypted (and are what ransomware writes).
pub fn random_bytes(rng: &mut StdRng, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    rng.fill(&mut out[..]);
    out
}

/// What `debugfs -R request image` prints (a file's bytes, for `cat`).
fn debugfs_output(image: &Path, request: &str) -> Result<Vec<u8>> {
    let out = Command::new("debugfs")
        .args(["-R", request])
        .arg(image)
        .output()
        .context("running debugfs (apt-get install e2fsprogs)")?;
    if !out.status.success() {
        bail!("debugfs -R {request:?} {}: {}", image.display(), String::from_utf8_lossy(&out.stderr));
    }
    Ok(out.stdout)
}

fn debugfs(image: &Path, request: &str) -> Result<String> {
    Ok(String::from_utf8_lossy(&debugfs_output(image, request)?).into_owned())
}

/// Makes `dir/disk.raw`: `disk_bytes` of ext4 holding `files` plain text
/// files of `file_bytes` each.
pub fn build(dir: &Path, files: usize, file_bytes: usize, disk_bytes: u64, seed: u64) -> Result<Ext4Image> {
    let content = dir.join("content");
    std::fs::create_dir_all(&content)?;
    let mut hashes = Vec::new();
    for i in 0..files {
        let name = format!("doc-{i:04}.txt");
        let text = plain_text(seed.wrapping_mul(1_000_003).wrapping_add(i as u64), file_bytes);
        std::fs::write(content.join(&name), &text)?;
        hashes.push((name, blake3::hash(&text)));
    }
    let path = dir.join("disk.raw");
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-b", "4096", "-O", "^has_journal", "-d"])
        .arg(&content)
        .arg(&path)
        .arg(format!("{}k", disk_bytes / 1024))
        .output()
        .context("running mkfs.ext4 (apt-get install e2fsprogs)")?;
    if !out.status.success() {
        bail!("mkfs.ext4 -d {}: {}", content.display(), String::from_utf8_lossy(&out.stderr));
    }
    let mut files = Vec::new();
    for (name, hash) in hashes {
        let blocks: Vec<u64> = debugfs(&path, &format!("blocks /{name}"))?
            .split_whitespace()
            .map(|b| b.parse().with_context(|| format!("a block number of {name}: {b:?}")))
            .collect::<Result<_>>()?;
        if blocks.len() as u64 != (file_bytes as u64).div_ceil(BLOCK) {
            bail!("{name} has {} blocks, expected {}", blocks.len(), (file_bytes as u64).div_ceil(BLOCK));
        }
        files.push(Ext4File { name, blocks, hash });
    }
    let used: std::collections::HashSet<u64> = files.iter().flat_map(|f| f.blocks.iter().copied()).collect();
    let last = files.iter().flat_map(|f| f.blocks.iter().copied()).max().unwrap_or(0);
    let free: Vec<u64> = debugfs(&path, &format!("ffb 2048 {}", last + 1))?
        .split_whitespace()
        .filter_map(|w| w.parse::<u64>().ok())
        .filter(|b| !used.contains(b))
        .collect();
    Ok(Ext4Image { path, files, free })
}

/// The hashes of `names` as the ext4 image at `image` holds them (read
/// with `debugfs`, as a host-side check would).
pub fn file_hashes(image: &Path, names: &[&str]) -> Result<Vec<blake3::Hash>> {
    names.iter().map(|n| Ok(blake3::hash(&debugfs_output(image, &format!("cat /{n}"))?))).collect()
}

/// Copies the disk behind the NBD URI `nbd://HOST:PORT/EXPORT` into
/// the file `to`.
pub fn copy_export(uri: &str, to: &Path) -> Result<()> {
    let (addr, export) = crate::exports::split_uri(uri)?;
    let mut nbd =
        vdsa::nbd::client::NbdClient::connect_tcp(&addr, &export).with_context(|| format!("connecting to {uri}"))?;
    let size = nbd.size;
    let mut image = std::fs::File::create(to)?;
    let mut buf = vec![0u8; 4 << 20];
    let mut pos = 0u64;
    while pos < size {
        let n = (size - pos).min(buf.len() as u64) as usize;
        nbd.read(pos, &mut buf[..n]).with_context(|| format!("reading {uri} at {pos}"))?;
        std::io::Write::write_all(&mut image, &buf[..n])?;
        pos += n as u64;
    }
    Ok(())
}

/// The host-side check of the clean-point search: copies each disk a
/// file of `expected` is on (its index in `uris`, a test's exports in the
/// VPG's disk order) into `scratch` and compares the files' hashes as
/// `debugfs` reads them. Ok(None): every file is as expected; Ok(Some(why))
/// names the first that is not (or a file system `debugfs` cannot read).
pub fn check_exports(
    uris: &[&str],
    scratch: &Path,
    expected: &[(usize, String, blake3::Hash)],
) -> Result<Option<String>> {
    let mut disks: Vec<usize> = expected.iter().map(|(d, _, _)| *d).collect();
    disks.sort_unstable();
    disks.dedup();
    for d in disks {
        let uri = uris.get(d).with_context(|| format!("no export for disk {d} (of {})", uris.len()))?;
        let image = scratch.join(format!("disk-{d}.raw"));
        copy_export(uri, &image)?;
        let files: Vec<&(usize, String, blake3::Hash)> = expected.iter().filter(|(x, _, _)| *x == d).collect();
        let names: Vec<&str> = files.iter().map(|(_, n, _)| n.as_str()).collect();
        let got = match file_hashes(&image, &names) {
            Ok(h) => h,
            Err(e) => return Ok(Some(format!("disk {d}'s file system does not read: {e:#}"))),
        };
        if let Some(((_, name, _), _)) = files.iter().zip(got).find(|((_, _, want), got)| want != got) {
            return Ok(Some(format!("disk {d}: {name} differs")));
        }
    }
    Ok(None)
}
