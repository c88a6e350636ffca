//! Reading a failover test's (or failover's) NBD exports from outside, as
//! the tests and the lab check them: the URI split for our own client,
//! a whole export hashed as a real NBD client (qemu-img) reads it, and the
//! SHA-256 a test VM prints of its data area.

use anyhow::{bail, Context, Result};
use std::path::Path;
use std::process::Command;

/// `nbd://HOST:PORT/NAME` as (`HOST:PORT`, `NAME`).
pub fn split_uri(uri: &str) -> Result<(String, String)> {
    let rest = uri.strip_prefix("nbd://").with_context(|| format!("{uri:?} is not an nbd:// URI"))?;
    let (addr, name) = rest.split_once('/').with_context(|| format!("{uri:?} names no export"))?;
    Ok((addr.to_string(), name.to_string()))
}

/// blake3 of a whole export, copied by qemu-img into `scratch`.
pub fn export_hash(uri: &str, scratch: &Path) -> Result<blake3::Hash> {
    let out = scratch.join("copy.raw");
    let _ = std::fs::remove_file(&out);
    let r = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw", uri])
        .arg(&out)
        .output()
        .context("running qemu-img")?;
    if !r.status.success() {
        bail!("qemu-img convert {uri}: {}", String::from_utf8_lossy(&r.stderr));
    }
    let h = blake3::hash(&std::fs::read(&out)?);
    let _ = std::fs::remove_file(&out);
    Ok(h)
}

/// SHA-256 (hex) of `bytes` as `sha256sum` prints it (what the test VM's
/// init prints of its data area), through a file in `scratch`.
pub fn sha256_hex(bytes: &[u8], scratch: &Path) -> Result<String> {
    let f = scratch.join("area.bin");
    std::fs::write(&f, bytes)?;
    let out = Command::new("sha256sum").arg(&f).output().context("running sha256sum")?;
    Ok(String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap_or_default().to_string())
}
