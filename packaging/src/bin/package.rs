//! `package ova|deb`: builds the VDSA OVA or the Debian package from the
//! release binaries (`cargo build --release` first).

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser)]
#[command(about = "Build the VDSA OVA or the Debian package")]
struct Cli {
    #[command(subcommand)]
    what: What,
}

#[derive(Subcommand)]
enum What {
    /// The VDSA appliance OVA (OVF + streamOptimized VMDK + SHA-256 manifest).
    Ova {
        #[arg(long, default_value = "target/release/vdsa")]
        vdsa: PathBuf,
        #[arg(long, default_value = "dist/vdsa.ova")]
        out: PathBuf,
        #[arg(long, default_value = env!("CARGO_PKG_VERSION"))]
        version: String,
        /// Where Debian's packages for the appliance are downloaded and
        /// unpacked (kept for the next build).
        #[arg(long, default_value = "target/appliance-packages")]
        packages: PathBuf,
    },
    /// The Debian package of vdsa and site-manager for KVM hosts.
    Deb {
        #[arg(long, default_value = "target/release/vdsa")]
        vdsa: PathBuf,
        #[arg(long, default_value = "target/release/site-manager")]
        site_manager: PathBuf,
        #[arg(long, default_value = "dist")]
        out_dir: PathBuf,
        #[arg(long, default_value = concat!(env!("CARGO_PKG_VERSION"), "-1"))]
        version: String,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let scratch = tempfile::tempdir()?;
    match cli.what {
        What::Ova { vdsa, out, version, packages } => {
            let vdsa = packaging::stripped_copy(&vdsa, scratch.path())?;
            let debian = packaging::debian::DebianRoot::prepare_in(&packages, packaging::debian::IMAGE_PACKAGES)
                .context("unpacking Debian's packages for the appliance")?;
            let built = packaging::build_ova(&packaging::OvaInputs { vdsa, version, debian, out })
                .context("building the OVA")?;
            println!("{} ({} bytes)", built.path.display(), built.size);
            for (name, sha) in &built.files {
                println!("  SHA256({name})= {sha}");
            }
        }
        What::Deb { vdsa, site_manager, out_dir, version } => {
            let vdsa = packaging::stripped_copy(&vdsa, scratch.path())?;
            let site_manager = packaging::stripped_copy(&site_manager, scratch.path())?;
            let deb = packaging::build_deb(&packaging::DebInputs { vdsa, site_manager, version, out_dir })
                .context("building the Debian package")?;
            println!("{}", deb.display());
        }
    }
    Ok(())
}
