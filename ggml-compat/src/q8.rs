//! The 8-bit block formats: Q8_0, Q8_1 and Q8_K, decoding and encoding.
//!
//! This module owns the byte layouts and the reference quantizers of ggml's three 8-bit formats.
//! Q8_0 is both a weight format (it appears in model files) and the activation format that
//! Q4_0 / Q5_0 / Q8_0 weights are dotted with; Q8_1 is the activation format of Q4_1 / Q5_1;
//! Q8_K is the activation format of the K-quants (see [`crate::dot`]).
//!
//! Layouts (little-endian, blocks follow each other, no padding):
//!
//! | type | elements | bytes | layout                                              |
//! |------|----------|-------|-----------------------------------------------------|
//! | Q8_0 | 32       | 34    | `d: f16`, `qs: [i8; 32]`                            |
//! | Q8_1 | 32       | 36    | `d: f16`, `s: f16` (= d * sum(qs)), `qs: [i8; 32]`  |
//! | Q8_K | 256      | 292   | `d: f32`, `qs: [i8; 256]`, `bsums: [i16; 16]`       |
//!
//! Element `i` of a block decodes to `d * qs[i]`. Q8_1's `s` and Q8_K's `bsums` (the sum of each
//! run of 16 quants) only serve the dot products, where they fold the weight formats' offsets
//! ("min" terms) into one multiply per block.
//!
//! The encoders are bit-exact ports of the arithmetic of ggml's reference quantizers
//! (`quantize_row_q8_0_ref`, `quantize_row_q8_1_ref`, `quantize_row_q8_K_ref`):
//!
//! - Q8_0 / Q8_1: `d = max|x| / 127`, `q = round(x * (1/d))` with ties away from zero, `d` stored
//!   as f16 after quantizing with the f32 value. Q8_0 output equals gguf-py's
//!   `gguf.quants.quantize(x, Q8_0)` byte for byte (tested against it when it is installed).
//!   Q8_1's `s` is `sum(q) * d` with the f32 `d`, then rounded to f16.
//! - Q8_K: `max` is the value of largest magnitude (first one on ties, sign kept),
//!   `iscale = -127 / max`, `q = min(127, nearest(iscale * x))` with ties to even, `d = 1 / iscale`
//!   stored as f32. A block whose largest magnitude is 0 encodes as all zeros.
//!
//! Activations produced by these encoders always lie in `[-127, 127]`; the AVX2 dot kernels rely
//! on that (an activation quant of -128 could saturate a 16-bit intermediate there).

use crate::{QK, QK_K};
use half::f16;

/// Bytes per Q8_0 block.
pub const Q8_0_BYTES: usize = 2 + QK;
/// Bytes per Q8_1 block.
pub const Q8_1_BYTES: usize = 2 + 2 + QK;
/// Bytes per Q8_K block.
pub const Q8_K_BYTES: usize = 4 + QK_K + 2 * (QK_K / 16);
/// Byte offset of `qs` within a Q8_K block.
pub(crate) const Q8_K_QS: usize = 4;
/// Byte offset of `bsums` within a Q8_K block.
pub(crate) const Q8_K_BSUMS: usize = 4 + QK_K;

#[inline]
fn read_f16(b: &[u8]) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32()
}

#[inline]
fn write_f16(b: &mut [u8], v: f32) {
    b[..2].copy_from_slice(&f16::from_f32(v).to_bits().to_le_bytes());
}

/// Largest absolute value of `x` (0 for an empty slice). NaNs are ignored, as `fmaxf` does.
#[inline]
fn max_abs(x: &[f32]) -> f32 {
    x.iter().fold(0.0f32, |m, v| m.max(v.abs()))
}

/// Decodes Q8_0 blocks. `src` holds exactly `dst.len() / 32` blocks (checked by the caller).
pub fn dequantize_q8_0(src: &[u8], dst: &mut [f32]) {
    for (blk, out) in src.chunks_exact(Q8_0_BYTES).zip(dst.chunks_exact_mut(QK)) {
        let d = read_f16(&blk[0..2]);
        for (o, &q) in out.iter_mut().zip(&blk[2..]) {
            *o = d * (q as i8) as f32;
        }
    }
}

/// Encodes one Q8_0-style block: returns the f32 scale and fills `qs` (32 quants).
#[inline]
fn quantize_block_8bit(x: &[f32], qs: &mut [u8]) -> f32 {
    let amax = max_abs(x);
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    for (q, &v) in qs.iter_mut().zip(x) {
        // `round` is ties-away-from-zero, like C's roundf and gguf-py's np_roundf.
        *q = ((v * id).round() as i8) as u8;
    }
    d
}

/// Encodes `src` (a whole number of 32-element blocks) as Q8_0 into `dst`.
pub fn quantize_q8_0(src: &[f32], dst: &mut [u8]) {
    for (x, blk) in src.chunks_exact(QK).zip(dst.chunks_exact_mut(Q8_0_BYTES)) {
        let (dh, qs) = blk.split_at_mut(2);
        let d = quantize_block_8bit(x, qs);
        write_f16(dh, d);
    }
}

/// Decodes Q8_1 blocks (the `s` field is redundant for decoding and ignored).
pub fn dequantize_q8_1(src: &[u8], dst: &mut [f32]) {
    for (blk, out) in src.chunks_exact(Q8_1_BYTES).zip(dst.chunks_exact_mut(QK)) {
        let d = read_f16(&blk[0..2]);
        for (o, &q) in out.iter_mut().zip(&blk[4..]) {
            *o = d * (q as i8) as f32;
        }
    }
}

/// Encodes `src` (a whole number of 32-element blocks) as Q8_1 into `dst`.
pub fn quantize_q8_1(src: &[f32], dst: &mut [u8]) {
    for (x, blk) in src.chunks_exact(QK).zip(dst.chunks_exact_mut(Q8_1_BYTES)) {
        let (head, qs) = blk.split_at_mut(4);
        let d = quantize_block_8bit(x, qs);
        let sum: i32 = qs.iter().map(|&q| (q as i8) as i32).sum();
        write_f16(&mut head[0..2], d);
        write_f16(&mut head[2..4], sum as f32 * d);
    }
}

/// One block as ggml's x86 SIMD quantizers encode it: `d = max / 127` (stored as f16),
/// `q = round_half_even(x * (127 / max))`. Differs from [`quantize_block_8bit`] in the inverse
/// scale (`127 / max` rather than `1 / d`, which can differ in the last bit) and in how ties
/// round; returns the f32 `d`.
#[inline]
fn quantize_block_8bit_x86(x: &[f32], qs: &mut [u8]) -> f32 {
    let amax = max_abs(x);
    let d = amax / 127.0;
    let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
    for (q, &v) in qs.iter_mut().zip(x) {
        // Round half to even (as `_mm256_round_ps`): adding and subtracting 1.5 * 2^23 leaves
        // the nearest integer for |x| < 2^22 (here |x| <= 127); faster than `round_ties_even`,
        // which is a libm call without SSE4.1.
        let r = f32::from_bits(0x4b40_0000);
        *q = (((v * id) + r - r) as i8) as u8;
    }
    d
}

/// Encodes `src` (whole 32-element blocks) as Q8_0 with the arithmetic of ggml's x86
/// `quantize_row_q8_0` (AVX/AVX2), which the x86 CPU backend applies to activations.
pub fn quantize_q8_0_x86(src: &[f32], dst: &mut [u8]) {
    for (x, blk) in src.chunks_exact(QK).zip(dst.chunks_exact_mut(Q8_0_BYTES)) {
        let (dh, qs) = blk.split_at_mut(2);
        let d = quantize_block_8bit_x86(x, qs);
        write_f16(dh, d);
    }
}

/// Encodes `src` (whole 32-element blocks) as Q8_1 with the arithmetic of ggml's x86
/// `quantize_row_q8_1`: as [`quantize_q8_0_x86`], plus `s = f16(d * sum(q))`.
pub fn quantize_q8_1_x86(src: &[f32], dst: &mut [u8]) {
    for (x, blk) in src.chunks_exact(QK).zip(dst.chunks_exact_mut(Q8_1_BYTES)) {
        let (head, qs) = blk.split_at_mut(4);
        let d = quantize_block_8bit_x86(x, qs);
        let sum: i32 = qs.iter().map(|&q| (q as i8) as i32).sum();
        write_f16(&mut head[0..2], d);
        write_f16(&mut head[2..4], d * sum as f32);
    }
}

/// Decodes Q8_K blocks (`bsums` is ignored).
pub fn dequantize_q8_k(src: &[u8], dst: &mut [f32]) {
    for (blk, out) in src.chunks_exact(Q8_K_BYTES).zip(dst.chunks_exact_mut(QK_K)) {
        let d = f32::from_le_bytes([blk[0], blk[1], blk[2], blk[3]]);
        for (o, &q) in out.iter_mut().zip(&blk[Q8_K_QS..Q8_K_BSUMS]) {
            *o = d * (q as i8) as f32;
        }
    }
}

/// Encodes `src` (a whole number of 256-element blocks) as Q8_K into `dst`.
pub fn quantize_q8_k(src: &[f32], dst: &mut [u8]) {
    for (x, blk) in src.chunks_exact(QK_K).zip(dst.chunks_exact_mut(Q8_K_BYTES)) {
        // The signed value of largest magnitude; the first one wins ties.
        let mut amax = 0.0f32;
        let mut max = 0.0f32;
        for &v in x {
            if v.abs() > amax {
                amax = v.abs();
                max = v;
            }
        }
        if amax == 0.0 {
            blk.fill(0);
            continue;
        }
        let iscale = -127.0f32 / max;
        let (dh, rest) = blk.split_at_mut(Q8_K_QS);
        let (qs, bsums) = rest.split_at_mut(QK_K);
        // Nearest integer, ties to even (ggml's `nearest_int`, which adds 1.5 * 2^23 the same
        // way; `round_ties_even` is a libm call without SSE4.1); |iscale * v| <= 127 up to
        // rounding, so only the upper bound needs clamping.
        let magic = f32::from_bits(0x4b40_0000);
        for (q, &v) in qs.iter_mut().zip(x) {
            let r = ((iscale * v) + magic - magic) as i32;
            *q = (r.min(127) as i8) as u8;
        }
        for (s, group) in bsums.chunks_exact_mut(2).zip(qs.chunks_exact(16)) {
            let sum: i32 = group.iter().map(|&q| (q as i8) as i32).sum();
            s.copy_from_slice(&(sum as i16).to_le_bytes());
        }
        dh.copy_from_slice(&(1.0f32 / iscale).to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// splitmix64: a tiny deterministic generator for test data.
    struct Rng(u64);
    impl Rng {
        fn next_u64(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }
        /// Uniform in [-1, 1).
        fn f32(&mut self) -> f32 {
            (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        }
    }

    /// Random rows with blocks of varied magnitude, including an all-zero block.
    fn sample(n: usize, block: usize, seed: u64) -> Vec<f32> {
        let mut rng = Rng(seed);
        let mut x = Vec::with_capacity(n);
        for b in 0..n / block {
            let scale = match b % 5 {
                0 => 1.0,
                1 => 1e-3,
                2 => 300.0,
                3 => 0.0,
                _ => 2.5e-2,
            };
            for _ in 0..block {
                x.push(rng.f32() * scale);
            }
        }
        x
    }

    /// Every element decodes within half a step `d` of its input. The quants are chosen with the
    /// f32 scale while decoding uses the stored one, so the storage rounding of `d`
    /// (`d_half_ulp`: half a unit in the last place of the stored scale) adds up to 127 of it.
    fn check_round_trip(
        x: &[f32],
        deq: &[f32],
        scales: &[f32],
        block: usize,
        d_half_ulp: fn(f32) -> f32,
    ) {
        for (b, (xb, yb)) in x.chunks(block).zip(deq.chunks(block)).enumerate() {
            let d = scales[b].abs();
            for (i, (&v, &r)) in xb.iter().zip(yb).enumerate() {
                let bound = d / 2.0 * (1.0 + 1e-6) + 127.0 * d_half_ulp(d) + 1e-37;
                assert!(
                    (v - r).abs() <= bound,
                    "block {b} elem {i}: {v} -> {r} (d = {d})"
                );
            }
        }
    }

    /// Half an f16 ulp of a (non-negative) f16 value, subnormals included.
    fn half_ulp_f16(d: f32) -> f32 {
        (d * (2.0f32).powi(-11)).max((2.0f32).powi(-25))
    }

    fn half_ulp_f32(d: f32) -> f32 {
        d * (2.0f32).powi(-24)
    }

    #[test]
    fn q8_0_round_trip_within_half_step() {
        let x = sample(32 * 20, 32, 1);
        let mut q = vec![0u8; Q8_0_BYTES * 20];
        quantize_q8_0(&x, &mut q);
        let mut y = vec![0f32; x.len()];
        dequantize_q8_0(&q, &mut y);
        let scales: Vec<f32> = q.chunks(Q8_0_BYTES).map(read_f16).collect();
        check_round_trip(&x, &y, &scales, 32, half_ulp_f16);
        // The all-zero block encodes to all zeros.
        assert!(q[3 * Q8_0_BYTES..4 * Q8_0_BYTES].iter().all(|&b| b == 0));
    }

    #[test]
    fn q8_0_known_block() {
        // max 127 gives d = 1 exactly; halves round away from zero.
        let mut x = [0f32; 32];
        x[0] = 127.0;
        x[1] = -2.5;
        x[2] = 2.5;
        x[3] = -0.4;
        x[4] = 126.5;
        x[5] = -127.0;
        let mut q = [0u8; Q8_0_BYTES];
        quantize_q8_0(&x, &mut q);
        assert_eq!(&q[0..2], &f16::from_f32(1.0).to_bits().to_le_bytes());
        let qs: Vec<i8> = q[2..8].iter().map(|&b| b as i8).collect();
        assert_eq!(qs, [127, -3, 3, 0, 127, -127]);
    }

    #[test]
    fn q8_1_round_trip_and_sum() {
        let x = sample(32 * 20, 32, 2);
        let mut q = vec![0u8; Q8_1_BYTES * 20];
        quantize_q8_1(&x, &mut q);
        let mut y = vec![0f32; x.len()];
        dequantize_q8_1(&q, &mut y);
        let scales: Vec<f32> = q.chunks(Q8_1_BYTES).map(read_f16).collect();
        check_round_trip(&x, &y, &scales, 32, half_ulp_f16);
        for (b, blk) in q.chunks(Q8_1_BYTES).enumerate() {
            let d = max_abs(&x[b * 32..b * 32 + 32]) / 127.0;
            let sum: i32 = blk[4..].iter().map(|&v| v as i8 as i32).sum();
            assert_eq!(
                read_f16(&blk[2..4]),
                f16::from_f32(sum as f32 * d).to_f32(),
                "block {b}"
            );
        }
        // Q8_0 and Q8_1 carry the same d and quants.
        let mut q0 = vec![0u8; Q8_0_BYTES * 20];
        quantize_q8_0(&x, &mut q0);
        for (a, b) in q0.chunks(Q8_0_BYTES).zip(q.chunks(Q8_1_BYTES)) {
            assert_eq!(&a[0..2], &b[0..2]);
            assert_eq!(&a[2..], &b[4..]);
        }
    }

    #[test]
    fn q8_k_round_trip_and_bsums() {
        let x = sample(256 * 6, 256, 3);
        let mut q = vec![0u8; Q8_K_BYTES * 6];
        quantize_q8_k(&x, &mut q);
        let mut y = vec![0f32; x.len()];
        dequantize_q8_k(&q, &mut y);
        let scales: Vec<f32> = q
            .chunks(Q8_K_BYTES)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        check_round_trip(&x, &y, &scales, 256, half_ulp_f32);
        for blk in q.chunks(Q8_K_BYTES) {
            let qs = &blk[Q8_K_QS..Q8_K_BSUMS];
            assert!(qs.iter().all(|&v| v as i8 >= -127));
            for (g, s) in blk[Q8_K_BSUMS..].chunks(2).enumerate() {
                let want: i32 = qs[g * 16..g * 16 + 16]
                    .iter()
                    .map(|&v| v as i8 as i32)
                    .sum();
                assert_eq!(i16::from_le_bytes([s[0], s[1]]) as i32, want);
            }
        }
        assert!(q[3 * Q8_K_BYTES..4 * Q8_K_BYTES].iter().all(|&b| b == 0));
    }

    #[test]
    fn q8_k_sign_of_max_and_ties() {
        // The first value of largest magnitude (here negative) maps to -127; a later value of
        // equal magnitude and opposite sign maps to +127. max = -127/64 makes iscale exactly 64,
        // so the scaled images below are exact and show the ties-to-even rounding.
        let m = 127.0f32 / 64.0;
        let mut x = [0f32; 256];
        x[0] = 0.5;
        x[1] = -m;
        x[2] = m;
        x[3] = 1.5 / 64.0;
        x[4] = 2.5 / 64.0;
        x[5] = -0.5 / 64.0;
        x[6] = -3.5 / 64.0;
        let mut q = [0u8; Q8_K_BYTES];
        quantize_q8_k(&x, &mut q);
        let d = f32::from_le_bytes([q[0], q[1], q[2], q[3]]);
        assert_eq!(d, 1.0 / 64.0);
        let qs: Vec<i8> = q[Q8_K_QS..Q8_K_QS + 7].iter().map(|&v| v as i8).collect();
        assert_eq!(qs, [32, -127, 127, 2, 2, 0, -4]);
    }
}
