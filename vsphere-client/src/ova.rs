//! Reading an OVA (a tar of an OVF descriptor, a manifest and disk files)
//! and checking it against its manifest before anything is uploaded:
//! vCenter does not always check it, and vcsim never does.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::xml;

/// One file inside the OVA.
#[derive(Debug, Clone)]
pub struct OvaEntry {
    pub name: String,
    /// Where its bytes start in the OVA.
    pub offset: u64,
    pub size: u64,
}

/// An OVA whose every file matched its manifest when opened.
#[derive(Debug, Clone)]
pub struct Ova {
    pub path: PathBuf,
    pub descriptor_name: String,
    pub descriptor: String,
    pub entries: Vec<OvaEntry>,
    /// The VirtualSystem's id.
    pub virtual_system: String,
    /// The files the descriptor's References name.
    pub references: Vec<String>,
    /// The networks of its NetworkSection.
    pub networks: Vec<String>,
    /// The keys of its ProductSection properties (vApp properties).
    pub properties: Vec<String>,
}

impl Ova {
    /// Opens and checks an OVA: a descriptor first, a SHA-256 (or SHA-1)
    /// manifest covering every other file, every referenced file present.
    pub fn open(path: &Path) -> Result<Ova> {
        let bad = |m: String| Error::Ova { path: path.display().to_string(), message: m };
        let io = |what: &str, e: std::io::Error| Error::Io { what: format!("{what} {}", path.display()), source: e };
        let file = File::open(path).map_err(|e| io("opening", e))?;
        let mut archive = tar::Archive::new(file);
        let mut entries = Vec::new();
        for entry in archive.entries().map_err(|e| bad(format!("not a tar archive: {e}")))? {
            let entry = entry.map_err(|e| bad(format!("a damaged tar header: {e}")))?;
            let name = entry.path().map_err(|e| bad(format!("a bad file name: {e}")))?.display().to_string();
            if name.contains('/') || name.starts_with('.') {
                return Err(bad(format!("{name:?}: an OVA holds plain file names only")));
            }
            entries.push(OvaEntry { name, offset: entry.raw_file_position(), size: entry.size() });
        }
        let first = entries.first().ok_or_else(|| bad("the archive is empty".into()))?;
        if !first.name.ends_with(".ovf") {
            return Err(bad(format!("the first file is {:?}, not the .ovf descriptor", first.name)));
        }
        let mut ova = Ova {
            path: path.to_path_buf(),
            descriptor_name: first.name.clone(),
            descriptor: String::new(),
            entries,
            virtual_system: String::new(),
            references: Vec::new(),
            networks: Vec::new(),
            properties: Vec::new(),
        };
        let descriptor = ova.read_entry(&ova.descriptor_name.clone())?;
        ova.descriptor = String::from_utf8(descriptor).map_err(|_| bad("the descriptor is not UTF-8".into()))?;
        ova.check_manifest()?;
        ova.read_descriptor()?;
        Ok(ova)
    }

    pub fn entry(&self, name: &str) -> Option<&OvaEntry> {
        self.entries.iter().find(|e| e.name == name)
    }

    /// A reader over one file's bytes.
    pub fn open_entry(&self, name: &str) -> Result<(std::io::Take<File>, u64)> {
        let e = self.entry(name).ok_or_else(|| Error::Ova {
            path: self.path.display().to_string(),
            message: format!("it holds no file {name:?}"),
        })?;
        let mut f = File::open(&self.path)
            .map_err(|err| Error::Io { what: format!("opening {}", self.path.display()), source: err })?;
        f.seek(SeekFrom::Start(e.offset))
            .map_err(|err| Error::Io { what: format!("reading {}", self.path.display()), source: err })?;
        Ok((f.take(e.size), e.size))
    }

    fn read_entry(&self, name: &str) -> Result<Vec<u8>> {
        let (mut r, size) = self.open_entry(name)?;
        let mut buf = Vec::with_capacity(size.min(64 << 20) as usize);
        r.read_to_end(&mut buf)
            .map_err(|e| Error::Io { what: format!("reading {name} in {}", self.path.display()), source: e })?;
        Ok(buf)
    }

    fn bad(&self, message: String) -> Error {
        Error::Ova { path: self.path.display().to_string(), message }
    }

    fn check_manifest(&self) -> Result<()> {
        let mf = self
            .entries
            .iter()
            .find(|e| e.name.ends_with(".mf"))
            .ok_or_else(|| self.bad("it has no manifest (.mf), so its files cannot be checked".into()))?
            .name
            .clone();
        let text =
            String::from_utf8(self.read_entry(&mf)?).map_err(|_| self.bad("the manifest is not UTF-8".into()))?;
        let mut listed = Vec::new();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            // SHA256(name)= hex
            let parsed = line.split_once('(').and_then(|(algo, rest)| {
                let (name, hex) = rest.split_once(")=")?;
                Some((algo.trim(), name, hex.trim()))
            });
            let Some((algo, name, want)) = parsed else {
                return Err(self.bad(format!("manifest line {line:?} is not ALGO(file)= digest")));
            };
            let algorithm = match algo {
                "SHA256" => &ring::digest::SHA256,
                "SHA1" => &ring::digest::SHA1_FOR_LEGACY_USE_ONLY,
                "SHA512" => &ring::digest::SHA512,
                other => return Err(self.bad(format!("manifest digest {other} is not supported"))),
            };
            let (mut r, _) = self.open_entry(name)?;
            let mut ctx = ring::digest::Context::new(algorithm);
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = r
                    .read(&mut buf)
                    .map_err(|e| Error::Io { what: format!("reading {name} in {}", self.path.display()), source: e })?;
                if n == 0 {
                    break;
                }
                ctx.update(&buf[..n]);
            }
            let got: String = ctx.finish().as_ref().iter().map(|b| format!("{b:02x}")).collect();
            if !got.eq_ignore_ascii_case(want) {
                return Err(
                    self.bad(format!("{name} does not match the manifest: {algo} is {got}, the manifest says {want}"))
                );
            }
            listed.push(name.to_string());
        }
        for e in &self.entries {
            if e.name != mf && !e.name.ends_with(".cert") && !listed.contains(&e.name) {
                return Err(self.bad(format!("{} is not in the manifest", e.name)));
            }
        }
        Ok(())
    }

    fn read_descriptor(&mut self) -> Result<()> {
        let env =
            xml::parse(self.descriptor.as_bytes()).map_err(|e| self.bad(format!("the descriptor is not XML: {e}")))?;
        if env.name != "Envelope" {
            return Err(self.bad(format!("the descriptor's root is <{}>, not an OVF <Envelope>", env.name)));
        }
        if let Some(refs) = env.child("References") {
            for f in refs.children_named("File") {
                let href = f.attr("href").ok_or_else(|| self.bad("a <File> without href".into()))?;
                if self.entry(href).is_none() {
                    return Err(self.bad(format!("the descriptor references {href:?}, which is not in the archive")));
                }
                self.references.push(href.to_string());
            }
        }
        if let Some(ns) = env.child("NetworkSection") {
            self.networks = ns.children_named("Network").filter_map(|n| n.attr("name")).map(str::to_string).collect();
        }
        let vs = env.child("VirtualSystem").ok_or_else(|| self.bad("the descriptor has no <VirtualSystem>".into()))?;
        self.virtual_system = vs.attr("id").unwrap_or_default().to_string();
        for ps in vs.children_named("ProductSection") {
            for p in ps.children_named("Property") {
                if let Some(k) = p.attr("key") {
                    self.properties.push(k.to_string());
                }
            }
        }
        Ok(())
    }
}
