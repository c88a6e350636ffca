//! Hashing many 4 KiB blocks at once: BLAKE3, byte for byte the hash
//! `blake3::hash` gives, with the blocks' chunks side by side in SIMD
//! lanes (docs/performance.md, "Hashing blocks side by side").
//!
//! The `blake3` crate hashes one input at a time. A 4 KiB block is four
//! 1 KiB chunks, so its SIMD code runs four lanes wide; its interface for
//! hashing many inputs together is marked as for benchmarks only. Here
//! four blocks (sixteen chunks) go through the sixteen 32-bit lanes of
//! AVX-512 at once, then their parents and roots. Blocks left over, and
//! machines without AVX-512, use `blake3::hash`. Every hash is checked
//! against `blake3::hash` by the tests below. (Eight lanes of AVX2 were
//! tried first: 1.06 times the crate's speed, not worth the code.)

use super::chunks::Hash;
use super::ingest::is_zero;
use super::BLOCK_SIZE;

/// The hash of each block (each exactly [`BLOCK_SIZE`] bytes), in order.
pub fn hash_blocks(blocks: &[&[u8]]) -> Vec<Hash> {
    let mut out = vec![[0u8; 32]; blocks.len()];
    let done = hash_side_by_side(blocks, &mut out);
    for (b, h) in blocks[done..].iter().zip(&mut out[done..]) {
        *h = *blake3::hash(b).as_bytes();
    }
    out
}

/// Hashes the blocks in groups of four where the CPU allows; returns how
/// many it hashed (a multiple of four from the start, or none).
#[cfg(target_arch = "x86_64")]
fn hash_side_by_side(blocks: &[&[u8]], out: &mut [Hash]) -> usize {
    if !blocks.iter().all(|b| b.len() == BLOCK_SIZE) || !std::arch::is_x86_feature_detected!("avx512f") {
        return 0;
    }
    let mut done = 0;
    for (group, hashes) in blocks.chunks_exact(4).zip(out.chunks_exact_mut(4)) {
        let group = [group[0], group[1], group[2], group[3]];
        // SAFETY: AVX-512F is present (checked above) and every block is
        // BLOCK_SIZE bytes long, as `hash4` reads.
        unsafe { avx512::hash4(group, hashes) };
        done += 4;
    }
    done
}

#[cfg(not(target_arch = "x86_64"))]
fn hash_side_by_side(_: &[&[u8]], _: &mut [Hash]) -> usize {
    0
}

/// Each block's hash, or None for a zero block (which is stored, and
/// offered, as no chunk), the others hashed together as above.
pub fn hash_nonzero_blocks(blocks: &[&[u8]]) -> Vec<Option<Hash>> {
    let zero: Vec<bool> = blocks.iter().map(|b| is_zero(b)).collect();
    let nonzero: Vec<&[u8]> = blocks.iter().zip(&zero).filter(|(_, z)| !**z).map(|(b, _)| *b).collect();
    let hashes = hash_blocks(&nonzero);
    let mut next = 0;
    zero.iter()
        .map(|&z| {
            (!z).then(|| {
                next += 1;
                hashes[next - 1]
            })
        })
        .collect()
}

/// BLAKE3's constants (the BLAKE3 specification, section 2).
#[cfg(target_arch = "x86_64")]
mod consts {
    pub(super) const IV: [u32; 8] =
        [0x6A09E667, 0xBB67AE85, 0x3C6EF372, 0xA54FF53A, 0x510E527F, 0x9B05688C, 0x1F83D9AB, 0x5BE0CD19];
    pub(super) const CHUNK_START: u32 = 1;
    pub(super) const CHUNK_END: u32 = 2;
    pub(super) const PARENT: u32 = 4;
    pub(super) const ROOT: u32 = 8;
    const PERMUTATION: [usize; 16] = [2, 6, 3, 10, 7, 0, 4, 13, 1, 11, 12, 5, 9, 14, 15, 8];

    /// The message word each round takes at each position: round 0 in
    /// order, each later round the one before permuted.
    pub(super) const SCHEDULE: [[usize; 16]; 7] = {
        let mut s = [[0usize; 16]; 7];
        let mut i = 0;
        while i < 16 {
            s[0][i] = i;
            i += 1;
        }
        let mut r = 1;
        while r < 7 {
            let mut i = 0;
            while i < 16 {
                s[r][i] = s[r - 1][PERMUTATION[i]];
                i += 1;
            }
            r += 1;
        }
        s
    };
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::consts::{CHUNK_END, CHUNK_START, IV, PARENT, ROOT, SCHEDULE};
    use super::Hash;
    use crate::journal::BLOCK_SIZE;
    use std::arch::x86_64::*;

    const CHUNK_LEN: usize = 1024;
    const BLOCK_LEN: usize = 64;
    /// Lane indexes: the even lanes first, then the odd ones; and the odd
    /// ones first.
    const EVEN_FIRST: [i32; 16] = [0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15];
    const ODD_FIRST: [i32; 16] = [1, 3, 5, 7, 9, 11, 13, 15, 0, 2, 4, 6, 8, 10, 12, 14];
    /// Each lane's chunk within its block: the chunk counter.
    const CHUNK_OF_LANE: [i32; 16] = [0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3];

    // Every function below is reached only from `hash4`, which requires
    // AVX-512F: that is the safety argument of each `unsafe` block in
    // them; a load's also rests on the bounds its comment names.

    #[inline(always)]
    unsafe fn splat(w: u32) -> __m512i {
        // SAFETY: see above.
        unsafe { _mm512_set1_epi32(w as i32) }
    }

    #[inline(always)]
    unsafe fn lanes(idx: &[i32; 16]) -> __m512i {
        // SAFETY: see above; `idx` is 64 bytes.
        unsafe { _mm512_loadu_si512(idx.as_ptr().cast()) }
    }

    #[inline(always)]
    unsafe fn iv() -> [__m512i; 8] {
        // SAFETY: see above.
        unsafe {
            [
                splat(IV[0]),
                splat(IV[1]),
                splat(IV[2]),
                splat(IV[3]),
                splat(IV[4]),
                splat(IV[5]),
                splat(IV[6]),
                splat(IV[7]),
            ]
        }
    }

    #[inline(always)]
    unsafe fn g(v: &mut [__m512i; 16], a: usize, b: usize, c: usize, d: usize, x: __m512i, y: __m512i) {
        // SAFETY: see above.
        unsafe {
            v[a] = _mm512_add_epi32(_mm512_add_epi32(v[a], v[b]), x);
            v[d] = _mm512_ror_epi32::<16>(_mm512_xor_si512(v[d], v[a]));
            v[c] = _mm512_add_epi32(v[c], v[d]);
            v[b] = _mm512_ror_epi32::<12>(_mm512_xor_si512(v[b], v[c]));
            v[a] = _mm512_add_epi32(_mm512_add_epi32(v[a], v[b]), y);
            v[d] = _mm512_ror_epi32::<8>(_mm512_xor_si512(v[d], v[a]));
            v[c] = _mm512_add_epi32(v[c], v[d]);
            v[b] = _mm512_ror_epi32::<7>(_mm512_xor_si512(v[b], v[c]));
        }
    }

    /// BLAKE3's compression of sixteen lanes at once: `cv` and `m` hold
    /// word `i` of every lane in their element `i`; the new chaining value
    /// replaces `cv`. Counters stay below 2^32 here: the high word is 0.
    #[inline(always)]
    unsafe fn compress(cv: &mut [__m512i; 8], m: &[__m512i; 16], counter: __m512i, flags: u32) {
        // SAFETY: see above.
        unsafe {
            let mut v = [
                cv[0],
                cv[1],
                cv[2],
                cv[3],
                cv[4],
                cv[5],
                cv[6],
                cv[7],
                splat(IV[0]),
                splat(IV[1]),
                splat(IV[2]),
                splat(IV[3]),
                counter,
                _mm512_setzero_si512(),
                splat(BLOCK_LEN as u32),
                splat(flags),
            ];
            for s in &SCHEDULE {
                g(&mut v, 0, 4, 8, 12, m[s[0]], m[s[1]]);
                g(&mut v, 1, 5, 9, 13, m[s[2]], m[s[3]]);
                g(&mut v, 2, 6, 10, 14, m[s[4]], m[s[5]]);
                g(&mut v, 3, 7, 11, 15, m[s[6]], m[s[7]]);
                g(&mut v, 0, 5, 10, 15, m[s[8]], m[s[9]]);
                g(&mut v, 1, 6, 11, 12, m[s[10]], m[s[11]]);
                g(&mut v, 2, 7, 8, 13, m[s[12]], m[s[13]]);
                g(&mut v, 3, 4, 9, 14, m[s[14]], m[s[15]]);
            }
            for i in 0..8 {
                cv[i] = _mm512_xor_si512(v[i], v[i + 8]);
            }
        }
    }

    /// Transposes sixteen rows of sixteen 32-bit words: out[w] holds word
    /// `w` of each row.
    #[inline(always)]
    unsafe fn transpose(r: &[__m512i; 16]) -> [__m512i; 16] {
        // SAFETY: see above.
        unsafe {
            // Pairs of rows interleaved by word, then by two words: u[4k+j]
            // holds, in its 128-bit part q, word 4q+j of rows 4k..4k+3.
            let mut t = [_mm512_setzero_si512(); 16];
            for k in 0..8 {
                t[2 * k] = _mm512_unpacklo_epi32(r[2 * k], r[2 * k + 1]);
                t[2 * k + 1] = _mm512_unpackhi_epi32(r[2 * k], r[2 * k + 1]);
            }
            let mut u = [_mm512_setzero_si512(); 16];
            for k in 0..4 {
                u[4 * k] = _mm512_unpacklo_epi64(t[4 * k], t[4 * k + 2]);
                u[4 * k + 1] = _mm512_unpackhi_epi64(t[4 * k], t[4 * k + 2]);
                u[4 * k + 2] = _mm512_unpacklo_epi64(t[4 * k + 1], t[4 * k + 3]);
                u[4 * k + 3] = _mm512_unpackhi_epi64(t[4 * k + 1], t[4 * k + 3]);
            }
            // Then the 128-bit parts, four by four.
            let mut out = [_mm512_setzero_si512(); 16];
            for j in 0..4 {
                let (a, b, c, d) = (u[j], u[4 + j], u[8 + j], u[12 + j]);
                let x0 = _mm512_shuffle_i32x4::<0x44>(a, b);
                let x1 = _mm512_shuffle_i32x4::<0xEE>(a, b);
                let y0 = _mm512_shuffle_i32x4::<0x44>(c, d);
                let y1 = _mm512_shuffle_i32x4::<0xEE>(c, d);
                out[j] = _mm512_shuffle_i32x4::<0x88>(x0, y0);
                out[4 + j] = _mm512_shuffle_i32x4::<0xDD>(x0, y0);
                out[8 + j] = _mm512_shuffle_i32x4::<0x88>(x1, y1);
                out[12 + j] = _mm512_shuffle_i32x4::<0xDD>(x1, y1);
            }
            out
        }
    }

    /// Hashes four blocks of BLOCK_SIZE bytes into `out` (four hashes).
    /// Lane `k` hashes chunk `k % 4` of block `k / 4`.
    ///
    /// # Safety
    /// The CPU must support AVX-512F, and every block must be BLOCK_SIZE
    /// bytes long.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn hash4(blocks: [&[u8]; 4], out: &mut [Hash]) {
        debug_assert!(blocks.iter().all(|b| b.len() == BLOCK_SIZE) && out.len() == 4);
        // SAFETY: AVX-512F is enabled for this function; the loads stay
        // inside the blocks (offsets below CHUNK_LEN * 4 = BLOCK_SIZE, the
        // caller's promise) and the 64-byte arrays named.
        unsafe {
            let mut cv = iv();
            let counter = lanes(&CHUNK_OF_LANE);
            for step in 0..CHUNK_LEN / BLOCK_LEN {
                let mut flags = 0;
                if step == 0 {
                    flags |= CHUNK_START;
                }
                if step == CHUNK_LEN / BLOCK_LEN - 1 {
                    flags |= CHUNK_END;
                }
                let mut rows = [_mm512_setzero_si512(); 16];
                for (lane, row) in rows.iter_mut().enumerate() {
                    let at = (lane % 4) * CHUNK_LEN + step * BLOCK_LEN;
                    *row = _mm512_loadu_si512(blocks[lane / 4][at..at + BLOCK_LEN].as_ptr().cast());
                }
                compress(&mut cv, &transpose(&rows), counter, flags);
            }
            // Parents: lane p (of the first eight) joins chunks 2p and
            // 2p + 1, block p / 2's left or right pair.
            let (even, odd) = (lanes(&EVEN_FIRST), lanes(&ODD_FIRST));
            let mut m = [_mm512_setzero_si512(); 16];
            for w in 0..8 {
                m[w] = _mm512_permutexvar_epi32(even, cv[w]);
                m[w + 8] = _mm512_permutexvar_epi32(odd, cv[w]);
            }
            let zero = _mm512_setzero_si512();
            let mut parents = iv();
            compress(&mut parents, &m, zero, PARENT);
            // Roots: lane b (of the first four) joins block b's pairs.
            for w in 0..8 {
                m[w] = _mm512_permutexvar_epi32(even, parents[w]);
                m[w + 8] = _mm512_permutexvar_epi32(odd, parents[w]);
            }
            let mut roots = iv();
            compress(&mut roots, &m, zero, PARENT | ROOT);
            let mut words = [[0u32; 16]; 8];
            for (w, v) in roots.iter().enumerate() {
                _mm512_storeu_si512(words[w].as_mut_ptr().cast(), *v);
            }
            for (lane, hash) in out.iter_mut().enumerate() {
                for (w, word) in words.iter().enumerate() {
                    hash[w * 4..w * 4 + 4].copy_from_slice(&word[lane].to_le_bytes());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{RngCore, SeedableRng};

    #[test]
    fn every_hash_equals_blake3s_own() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for n in [0usize, 1, 3, 4, 5, 8, 9, 17, 64] {
            let data: Vec<Vec<u8>> = (0..n)
                .map(|i| {
                    let mut b = vec![0u8; BLOCK_SIZE];
                    match i % 3 {
                        0 => rng.fill_bytes(&mut b),
                        1 => b.iter_mut().enumerate().for_each(|(j, x)| *x = (j / 64) as u8),
                        _ => {}
                    }
                    b
                })
                .collect();
            let blocks: Vec<&[u8]> = data.iter().map(Vec::as_slice).collect();
            let got = hash_blocks(&blocks);
            for (i, (b, h)) in blocks.iter().zip(&got).enumerate() {
                assert_eq!(h, blake3::hash(b).as_bytes(), "block {i} of {n}");
            }
        }
    }

    #[test]
    fn zero_blocks_have_no_hash_and_the_others_keep_their_place() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let data: Vec<Vec<u8>> = (0..11)
            .map(|i| {
                let mut b = vec![0u8; BLOCK_SIZE];
                if i % 3 != 1 {
                    rng.fill_bytes(&mut b);
                }
                b
            })
            .collect();
        let blocks: Vec<&[u8]> = data.iter().map(Vec::as_slice).collect();
        let got = hash_nonzero_blocks(&blocks);
        assert_eq!(got.len(), blocks.len());
        for (i, (b, h)) in blocks.iter().zip(&got).enumerate() {
            let want = (i % 3 != 1).then(|| *blake3::hash(b).as_bytes());
            assert_eq!(*h, want, "block {i}");
        }
    }

    #[test]
    fn one_bit_changed_anywhere_changes_only_its_blocks_hash() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let mut data: Vec<Vec<u8>> = (0..4)
            .map(|_| {
                let mut b = vec![0u8; BLOCK_SIZE];
                rng.fill_bytes(&mut b);
                b
            })
            .collect();
        for _ in 0..200 {
            let (blk, byte, bit) =
                (rng.next_u32() as usize % 4, rng.next_u32() as usize % BLOCK_SIZE, rng.next_u32() % 8);
            data[blk][byte] ^= 1 << bit;
            let blocks: Vec<&[u8]> = data.iter().map(Vec::as_slice).collect();
            let got = hash_blocks(&blocks);
            for (b, h) in blocks.iter().zip(&got) {
                assert_eq!(h, blake3::hash(b).as_bytes());
            }
        }
    }
}
