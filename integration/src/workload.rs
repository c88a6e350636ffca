//! A deterministic workload of hypervisor writes and the reference model it
//! is checked against.
//!
//! The same seed gives the same writes, so a parent process can replay what
//! a killed child wrote and know what each checkpoint must contain.

use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

const BLOCK: u64 = 4096;

/// What a generated write does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    Data(Vec<u8>),
    Zero(u64),
    Trim(u64),
}

/// One generated write, addressed by disk index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GenWrite {
    pub disk: usize,
    pub offset: u64,
    pub payload: Payload,
}

impl GenWrite {
    pub fn len(&self) -> u64 {
        match &self.payload {
            Payload::Data(d) => d.len() as u64,
            Payload::Zero(n) | Payload::Trim(n) => *n,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The mix of a workload, in percent of writes.
#[derive(Debug, Clone, Copy)]
pub struct Mix {
    /// 4 KiB-aligned random writes of 4–64 KiB.
    pub random: u32,
    /// Runs of 64 KiB writes continuing the last offset.
    pub sequential: u32,
    /// 1 byte to 12 KiB at any offset.
    pub unaligned: u32,
    /// Blocks from a small pool shared by every disk (clones patched alike).
    pub duplicate: u32,
    /// WRITE_ZEROES and TRIM.
    pub zero: u32,
}

impl Default for Mix {
    fn default() -> Self {
        Mix { random: 35, sequential: 25, unaligned: 15, duplicate: 15, zero: 10 }
    }
}

/// Generates writes over disks of the given sizes.
#[derive(Debug)]
pub struct Workload {
    rng: StdRng,
    sizes: Vec<u64>,
    mix: Mix,
    next_seq_offset: Vec<u64>,
    pool: Vec<Vec<u8>>,
    /// Percent of data writes that are half-compressible (the rest random).
    compressible: u32,
}

impl Workload {
    pub fn new(seed: u64, sizes: &[u64], mix: Mix) -> Workload {
        let mut rng = StdRng::seed_from_u64(seed);
        let pool = (0..16)
            .map(|i| {
                let mut b = vec![0u8; BLOCK as usize];
                fill(&mut rng, &mut b, i % 2 == 0);
                b
            })
            .collect();
        Workload { rng, sizes: sizes.to_vec(), mix, next_seq_offset: vec![0; sizes.len()], pool, compressible: 50 }
    }

    /// Percent of data writes that are half-compressible; 0 makes every
    /// (non-duplicate) data write incompressible.
    pub fn with_compressible(mut self, percent: u32) -> Workload {
        self.compressible = percent.min(100);
        self
    }

    pub fn next_write(&mut self) -> GenWrite {
        let disk = self.rng.gen_range(0..self.sizes.len());
        let size = self.sizes[disk];
        let m = self.mix;
        let total = m.random + m.sequential + m.unaligned + m.duplicate + m.zero;
        let mut pick = self.rng.gen_range(0..total.max(1));
        let mut is = |share: u32| {
            if pick < share {
                true
            } else {
                pick -= share;
                false
            }
        };
        if is(m.random) {
            let blocks = self.rng.gen_range(1..=16u64).min(size / BLOCK);
            let offset = self.rng.gen_range(0..=size / BLOCK - blocks) * BLOCK;
            self.data(disk, offset, blocks * BLOCK)
        } else if is(m.sequential) {
            let len = (64 * 1024).min(size);
            let mut offset = self.next_seq_offset[disk];
            if offset + len > size {
                offset = 0;
            }
            self.next_seq_offset[disk] = offset + len;
            self.data(disk, offset, len)
        } else if is(m.unaligned) {
            let len = self.rng.gen_range(1..=12 * 1024u64).min(size);
            let offset = self.rng.gen_range(0..=size - len);
            self.data(disk, offset, len)
        } else if is(m.duplicate) {
            let blocks = self.rng.gen_range(1..=8u64).min(size / BLOCK);
            let offset = self.rng.gen_range(0..=size / BLOCK - blocks) * BLOCK;
            let mut data = Vec::with_capacity((blocks * BLOCK) as usize);
            for _ in 0..blocks {
                let b = self.rng.gen_range(0..self.pool.len());
                data.extend_from_slice(&self.pool[b]);
            }
            GenWrite { disk, offset, payload: Payload::Data(data) }
        } else {
            let len = self.rng.gen_range(1..=256 * 1024u64).min(size);
            let offset = self.rng.gen_range(0..=size - len);
            let payload = if self.rng.gen_bool(0.5) { Payload::Zero(len) } else { Payload::Trim(len) };
            GenWrite { disk, offset, payload }
        }
    }

    fn data(&mut self, disk: usize, offset: u64, len: u64) -> GenWrite {
        let mut data = vec![0u8; len as usize];
        let compressible = self.rng.gen_bool(f64::from(self.compressible) / 100.0);
        fill(&mut self.rng, &mut data, compressible);
        GenWrite { disk, offset, payload: Payload::Data(data) }
    }
}

/// Holds a generator to a set rate: call [`Pacer::pace`] after each write.
#[derive(Debug)]
pub struct Pacer {
    start: std::time::Instant,
    bytes_per_sec: f64,
    done: u64,
}

impl Pacer {
    pub fn new(bytes_per_sec: u64) -> Pacer {
        Pacer { start: std::time::Instant::now(), bytes_per_sec: bytes_per_sec as f64, done: 0 }
    }

    /// Counts `bytes` written and sleeps until the rate allows more.
    pub fn pace(&mut self, bytes: u64) {
        self.done += bytes;
        let due = std::time::Duration::from_secs_f64(self.done as f64 / self.bytes_per_sec);
        if let Some(wait) = due.checked_sub(self.start.elapsed()) {
            std::thread::sleep(wait);
        }
    }
}

/// Random bytes, or bytes of which half are runs (about 2:1 under zstd).
pub fn fill(rng: &mut StdRng, buf: &mut [u8], compressible: bool) {
    rng.fill_bytes(buf);
    if compressible {
        for chunk in buf.chunks_mut(64) {
            let half = chunk.len() / 2;
            let v = chunk[0];
            chunk[..half].fill(v);
        }
    }
}

/// The disks as a simple in-memory image each: the truth a journal's views
/// are compared with.
#[derive(Debug, Clone)]
pub struct ReferenceModel {
    pub images: Vec<Vec<u8>>,
}

impl ReferenceModel {
    pub fn new(sizes: &[u64]) -> Self {
        ReferenceModel { images: sizes.iter().map(|&s| vec![0u8; s as usize]).collect() }
    }

    pub fn apply(&mut self, w: &GenWrite) {
        let range = w.offset as usize..(w.offset + w.len()) as usize;
        match &w.payload {
            Payload::Data(d) => self.images[w.disk][range].copy_from_slice(d),
            Payload::Zero(_) | Payload::Trim(_) => self.images[w.disk][range].fill(0),
        }
    }

    /// As a disk behind QEMU's block mirror sees the write: the mirror
    /// drops discards, so a trim changes nothing.
    pub fn apply_unless_trim(&mut self, w: &GenWrite) {
        if !matches!(w.payload, Payload::Trim(_)) {
            self.apply(w);
        }
    }

    pub fn hashes(&self) -> Vec<blake3::Hash> {
        self.images.iter().map(|i| blake3::hash(i)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_writes_and_they_stay_in_bounds() {
        let sizes = [1 << 20, 3 << 20];
        let mut a = Workload::new(7, &sizes, Mix::default());
        let mut b = Workload::new(7, &sizes, Mix::default());
        for _ in 0..2000 {
            let (x, y) = (a.next_write(), b.next_write());
            assert_eq!(x, y);
            assert!(!x.is_empty() && x.offset + x.len() <= sizes[x.disk]);
        }
    }
}
