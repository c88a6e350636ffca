//! The encryption signal at the source (architecture.md, "The encryption
//! signal"): each whole block a guest writes is classed as zeros, plain or
//! encrypted-looking, and a block that turns encrypted where it held plain
//! content is an *encrypting rewrite*. The counts are kept per checkpoint
//! interval, cut exactly where the checkpoint's marker goes into the
//! stream, for the site manager's detector
//! (`protection_groups::encryption`).
//!
//! The class of every block's last content is kept in memory: 2 bits per
//! 4 KiB block (64 KiB per GiB of disk). It starts unknown (as zeros): the
//! initial sync, which writes every block through the tap, fills it in.

use protection_groups::encryption::EntropySample;
use protection_groups::{CheckpointId, DiskId};
use std::collections::VecDeque;

use crate::journal::BLOCK_SIZE;

/// A block's content, as the signal tells it.
pub const ZEROS: u8 = 0;
pub const PLAIN: u8 = 1;
pub const ENCRYPTED: u8 = 2;

/// Bytes of a block the estimate reads: every 32nd.
const STRIDE: usize = 32;
const SAMPLES: u32 = (BLOCK_SIZE / STRIDE) as u32;
/// The sum of the squared byte counts of the samples at or below which
/// they look encrypted. It estimates the collision entropy (Rényi order
/// 2): Σc² ≈ N + N(N−1)·Σp², so uniform bytes give 192 ± 11 for 128
/// samples, text (Σp² ≈ 0.05) about 940 and machine code (≈ 0.02) about
/// 450; 350 is about 6.6 bits per byte. Compressed bytes measure as
/// random ones.
const ENCRYPTED_MAX_SQUARES: u32 = 350;
/// Intervals kept for the report.
const KEPT: usize = 64;

/// The class of one 4 KiB block: the collision entropy of every 32nd
/// byte against 6.6 bits per byte. One pass of 128 loads and adds, no
/// logarithm: about 50 ns.
pub fn classify_block(block: &[u8]) -> u8 {
    if crate::journal::is_zero_block(block) {
        return ZEROS;
    }
    let mut counts = [0u16; 256];
    let mut squares = 0u32;
    for &b in block.iter().step_by(STRIDE) {
        let c = &mut counts[b as usize];
        // (c + 1)² − c² = 2c + 1
        squares += 2 * u32::from(*c) + 1;
        *c += 1;
    }
    debug_assert!(squares >= SAMPLES);
    if squares <= ENCRYPTED_MAX_SQUARES {
        ENCRYPTED
    } else {
        PLAIN
    }
}

/// The classes of the whole blocks of a write of `data` at `offset`, and
/// the first whole block's number.
pub fn classify_write(offset: u64, data: &[u8]) -> (u64, Vec<u8>) {
    let bs = BLOCK_SIZE as u64;
    let first = offset.div_ceil(bs);
    let skip = (first * bs - offset) as usize;
    let classes = data.get(skip..).unwrap_or_default().chunks_exact(BLOCK_SIZE).map(classify_block).collect();
    (first, classes)
}

#[derive(Debug)]
struct DiskClasses {
    id: DiskId,
    /// 2 bits per block, 32 blocks per word.
    bits: Vec<u64>,
}

impl DiskClasses {
    fn new(id: DiskId, size: u64) -> DiskClasses {
        DiskClasses { id, bits: vec![0; Self::words(size)] }
    }

    fn words(size: u64) -> usize {
        (size / BLOCK_SIZE as u64).div_ceil(32) as usize
    }

    /// Sets block `b`'s class, returning the one before (out of range:
    /// nothing kept, zeros).
    fn swap(&mut self, b: u64, class: u8) -> u8 {
        let (w, shift) = ((b / 32) as usize, (b % 32) * 2);
        let Some(word) = self.bits.get_mut(w) else { return ZEROS };
        let old = ((*word >> shift) & 3) as u8;
        *word = (*word & !(3 << shift)) | (u64::from(class) << shift);
        old
    }
}

/// One stream's signal: the blocks' classes and the counts per interval.
#[derive(Debug)]
pub struct EntropySignal {
    disks: Vec<DiskClasses>,
    open: EntropySample,
    closed: VecDeque<EntropySample>,
}

impl EntropySignal {
    pub fn new(disks: &[(DiskId, u64)]) -> EntropySignal {
        EntropySignal {
            disks: disks.iter().map(|&(id, size)| DiskClasses::new(id, size)).collect(),
            open: empty(CheckpointId(0)),
            closed: VecDeque::new(),
        }
    }

    /// A data write's whole blocks, classed by [`classify_write`], in seq
    /// order.
    pub fn note_write(&mut self, disk: DiskId, first: u64, classes: &[u8]) {
        let Some(d) = self.disks.iter_mut().find(|d| d.id == disk) else { return };
        let mut rewritten = 0;
        for (i, &class) in classes.iter().enumerate() {
            let old = d.swap(first + i as u64, class);
            if class == ENCRYPTED {
                self.open.encrypted_blocks += 1;
                if old == PLAIN {
                    rewritten += 1;
                }
            }
        }
        self.open.written_blocks += classes.len() as u64;
        if rewritten > 0 {
            self.open.rewritten_blocks += rewritten;
            match self.open.rewritten_by_disk.iter_mut().find(|(x, _)| *x == disk) {
                Some((_, n)) => *n += rewritten,
                None => self.open.rewritten_by_disk.push((disk, rewritten)),
            }
        }
    }

    /// A zero or trim write: its whole blocks read as zeros.
    pub fn note_cleared(&mut self, disk: DiskId, offset: u64, len: u64) {
        let Some(d) = self.disks.iter_mut().find(|d| d.id == disk) else { return };
        let bs = BLOCK_SIZE as u64;
        for b in offset.div_ceil(bs)..(offset + len) / bs {
            d.swap(b, ZEROS);
        }
    }

    /// The disk grew.
    pub fn resize(&mut self, disk: DiskId, size: u64) {
        if let Some(d) = self.disks.iter_mut().find(|d| d.id == disk) {
            let words = DiskClasses::words(size);
            if words > d.bits.len() {
                d.bits.resize(words, 0);
            }
        }
    }

    /// Checkpoint `checkpoint`'s marker goes into the stream: the counts
    /// since the previous one are its interval's.
    pub fn close(&mut self, checkpoint: CheckpointId) {
        let mut done = std::mem::replace(&mut self.open, empty(checkpoint));
        done.checkpoint = checkpoint;
        self.closed.push_back(done);
        if self.closed.len() > KEPT {
            self.closed.pop_front();
        }
    }

    /// The last intervals closed, oldest first.
    pub fn samples(&self) -> Vec<EntropySample> {
        self.closed.iter().cloned().collect()
    }
}

fn empty(checkpoint: CheckpointId) -> EntropySample {
    EntropySample {
        checkpoint,
        written_blocks: 0,
        encrypted_blocks: 0,
        rewritten_blocks: 0,
        rewritten_by_disk: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random_block(seed: u64) -> Vec<u8> {
        let mut out = vec![0u8; BLOCK_SIZE];
        blake3::Hasher::new().update(&seed.to_le_bytes()).finalize_xof().fill(&mut out);
        out
    }

    fn text_block(seed: u64) -> Vec<u8> {
        let words = ["the ", "journal ", "holds ", "every ", "write ", "of ", "a ", "protected ", "disk\n"];
        let mut out = Vec::new();
        let mut i = seed as usize;
        while out.len() < BLOCK_SIZE {
            out.extend_from_slice(words[i % words.len()].as_bytes());
            i = i.wrapping_mul(31).wrapping_add(7);
        }
        out.truncate(BLOCK_SIZE);
        out
    }

    #[test]
    fn blocks_are_classed_by_their_entropy() {
        for seed in 0..200 {
            assert_eq!(classify_block(&random_block(seed)), ENCRYPTED, "random block {seed}");
            assert_eq!(classify_block(&text_block(seed)), PLAIN, "text block {seed}");
        }
        assert_eq!(classify_block(&[0u8; BLOCK_SIZE]), ZEROS);
        // Compressed text looks encrypted too: that is why the signal
        // counts rewrites of plain content, not encrypted-looking blocks.
        let text: Vec<u8> = (0..64).flat_map(text_block).collect();
        let packed = zstd::bulk::compress(&text, 19).unwrap_or_default();
        assert!(packed.len() >= BLOCK_SIZE, "{} bytes", packed.len());
        assert_eq!(classify_block(&packed[..BLOCK_SIZE]), ENCRYPTED);
    }

    #[test]
    fn only_plain_content_turned_encrypted_counts_as_a_rewrite_in_the_interval_it_was_written() {
        let disk = DiskId::new();
        let mut s = EntropySignal::new(&[(disk, 64 * BLOCK_SIZE as u64)]);
        let plain: Vec<u8> = (0..8).flat_map(text_block).collect();
        let enc: Vec<u8> = (0..8).flat_map(random_block).collect();
        let (first, classes) = classify_write(0, &plain);
        s.note_write(disk, first, &classes);
        let (first, classes) = classify_write(16 * BLOCK_SIZE as u64, &enc);
        s.note_write(disk, first, &classes); // new encrypted content on zeros
        s.close(CheckpointId(1));
        let (first, classes) = classify_write(0, &enc);
        s.note_write(disk, first, &classes); // plain turned encrypted: 8
        let (first, classes) = classify_write(16 * BLOCK_SIZE as u64, &enc);
        s.note_write(disk, first, &classes); // encrypted over encrypted: 0
        s.note_cleared(disk, 0, 4 * BLOCK_SIZE as u64);
        s.close(CheckpointId(2));
        let (first, classes) = classify_write(0, &enc);
        s.note_write(disk, first, &classes); // 4 zeroed, 4 encrypted before: 0
        s.close(CheckpointId(3));
        let got: Vec<(u64, u64, u64, u64)> = s
            .samples()
            .iter()
            .map(|x| (x.checkpoint.0, x.written_blocks, x.encrypted_blocks, x.rewritten_blocks))
            .collect();
        assert_eq!(got, [(1, 16, 8, 0), (2, 16, 16, 8), (3, 8, 8, 0)]);
        assert_eq!(s.samples()[1].rewritten_by_disk, [(disk, 8)]);
    }
}
