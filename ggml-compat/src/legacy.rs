//! The legacy 32-element block quants Q4_0, Q4_1, Q5_0 and Q5_1: block layouts,
//! dequantization, and ggml's reference quantizers (`quantize_row_q4_0_ref` etc.).
//!
//! Block layouts (little-endian, no padding; [`QK`] = 32 elements per block):
//!
//! | type | bytes | layout |
//! |------|-------|--------|
//! | Q4_0 | 18 | `d: f16`, `qs: [u8; 16]` |
//! | Q4_1 | 20 | `d: f16`, `m: f16`, `qs: [u8; 16]` |
//! | Q5_0 | 22 | `d: f16`, `qh: [u8; 4]`, `qs: [u8; 16]` |
//! | Q5_1 | 24 | `d: f16`, `m: f16`, `qh: [u8; 4]`, `qs: [u8; 16]` |
//!
//! Element `j < 16` of a block is the low nibble of `qs[j]`, element `j + 16` the high nibble.
//! For the 5-bit types, bit `j` of the little-endian u32 `qh` is bit 4 of element `j`.
//! Symmetric types decode as `d * (q - 2^(bits-1))`, the `_1` types as `d * q + m`.
//!
//! The quantizers reproduce ggml's reference rounding exactly (single-precision arithmetic,
//! truncation after adding 0.5 / 8.5 / 16.5), so their output is byte-identical to
//! `quantize_row_*_ref` and to gguf-py's `gguf.quants.quantize` on finite input.

use crate::float::{read_f16, write_f16};
use crate::QK;

const HALF: usize = QK / 2;

/// Bytes per block of each type.
const Q4_0_SIZE: usize = 2 + HALF;
const Q4_1_SIZE: usize = 4 + HALF;
const Q5_0_SIZE: usize = 6 + HALF;
const Q5_1_SIZE: usize = 8 + HALF;

/// The signed value of largest magnitude (the first one, on ties) and its magnitude.
fn signed_absmax(x: &[f32]) -> f32 {
    let mut amax = 0.0f32;
    let mut max = 0.0f32;
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    max
}

/// Minimum and maximum of a block, as ggml computes them (NaN never wins a comparison).
fn min_max(x: &[f32]) -> (f32, f32) {
    let mut min = f32::MAX;
    let mut max = -f32::MAX;
    for &v in x {
        if v < min {
            min = v;
        }
        if v > max {
            max = v;
        }
    }
    (min, max)
}

#[inline]
fn inverse(d: f32) -> f32 {
    if d != 0.0 {
        1.0 / d
    } else {
        0.0
    }
}

/// Truncates `v` toward zero and clamps to `0..=top` (ggml: `MIN(top, (int8_t)v)`).
#[inline]
fn trunc_level(v: f32, top: i32) -> u8 {
    // `as i32` truncates toward zero and saturates (NaN becomes 0).
    (v as i32).clamp(0, top) as u8
}

/// Symmetric quantization of one block into levels `0..2^bits`: returns the scale `d`.
fn quantize_symmetric(x: &[f32], bits: u32, levels: &mut [u8; QK]) -> f32 {
    let offset = (1i32 << (bits - 1)) as f32; // 8 or 16
    let top = (1i32 << bits) - 1;
    let d = signed_absmax(x) / -offset;
    let id = inverse(d);
    let bias = offset + 0.5;
    for (l, &v) in levels.iter_mut().zip(x) {
        *l = trunc_level(v * id + bias, top);
    }
    d
}

/// Asymmetric (scale + min) quantization of one block: returns `(d, min)`.
fn quantize_affine(x: &[f32], bits: u32, levels: &mut [u8; QK]) -> (f32, f32) {
    let top = (1i32 << bits) - 1;
    let (min, max) = min_max(x);
    let d = (max - min) / top as f32;
    let id = inverse(d);
    for (l, &v) in levels.iter_mut().zip(x) {
        *l = trunc_level((v - min) * id + 0.5, top);
    }
    (d, min)
}

/// Packs the low nibbles of 32 levels into 16 bytes (element j low, j + 16 high).
fn pack_nibbles(levels: &[u8; QK], qs: &mut [u8]) {
    for j in 0..HALF {
        qs[j] = (levels[j] & 0x0f) | ((levels[j + HALF] & 0x0f) << 4);
    }
}

/// Bit 4 of every level, as the 4 little-endian bytes of a u32.
fn pack_high_bits(levels: &[u8; QK]) -> [u8; 4] {
    let mut qh = 0u32;
    for (j, &l) in levels.iter().enumerate() {
        qh |= u32::from((l >> 4) & 1) << j;
    }
    qh.to_le_bytes()
}

/// The 32 levels (0..16 or 0..32) of a block from its nibbles and optional high bits.
fn unpack_levels(qs: &[u8], qh: Option<&[u8]>) -> [u8; QK] {
    let high = qh.map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    let mut levels = [0u8; QK];
    for j in 0..HALF {
        levels[j] = qs[j] & 0x0f;
        levels[j + HALF] = qs[j] >> 4;
    }
    for (j, l) in levels.iter_mut().enumerate() {
        *l |= (((high >> j) & 1) as u8) << 4;
    }
    levels
}

fn dequantize_blocks(src: &[u8], dst: &mut [f32], size: usize, decode: impl Fn(&[u8], &mut [f32])) {
    for (b, out) in src.chunks_exact(size).zip(dst.chunks_exact_mut(QK)) {
        decode(b, out);
    }
}

fn quantize_blocks(src: &[f32], dst: &mut [u8], size: usize, encode: impl Fn(&[f32], &mut [u8])) {
    for (x, b) in src.chunks_exact(QK).zip(dst.chunks_exact_mut(size)) {
        encode(x, b);
    }
}

/// Decodes Q4_0 blocks: `d * (q - 8)`.
pub fn dequantize_q4_0(src: &[u8], dst: &mut [f32]) {
    dequantize_blocks(src, dst, Q4_0_SIZE, |b, out| {
        let d = read_f16(&b[0..2]);
        let levels = unpack_levels(&b[2..], None);
        for (y, &l) in out.iter_mut().zip(&levels) {
            *y = (i32::from(l) - 8) as f32 * d;
        }
    });
}

/// Encodes Q4_0 blocks with ggml's reference rounding.
pub fn quantize_q4_0(src: &[f32], dst: &mut [u8]) {
    quantize_blocks(src, dst, Q4_0_SIZE, |x, b| {
        let mut levels = [0u8; QK];
        let d = quantize_symmetric(x, 4, &mut levels);
        write_f16(&mut b[0..2], d);
        pack_nibbles(&levels, &mut b[2..]);
    });
}

/// Decodes Q4_1 blocks: `d * q + m`.
pub fn dequantize_q4_1(src: &[u8], dst: &mut [f32]) {
    dequantize_blocks(src, dst, Q4_1_SIZE, |b, out| {
        let d = read_f16(&b[0..2]);
        let m = read_f16(&b[2..4]);
        let levels = unpack_levels(&b[4..], None);
        for (y, &l) in out.iter_mut().zip(&levels) {
            *y = f32::from(l) * d + m;
        }
    });
}

/// Encodes Q4_1 blocks with ggml's reference rounding.
pub fn quantize_q4_1(src: &[f32], dst: &mut [u8]) {
    quantize_blocks(src, dst, Q4_1_SIZE, |x, b| {
        let mut levels = [0u8; QK];
        let (d, m) = quantize_affine(x, 4, &mut levels);
        write_f16(&mut b[0..2], d);
        write_f16(&mut b[2..4], m);
        pack_nibbles(&levels, &mut b[4..]);
    });
}

/// Decodes Q5_0 blocks: `d * (q - 16)`.
pub fn dequantize_q5_0(src: &[u8], dst: &mut [f32]) {
    dequantize_blocks(src, dst, Q5_0_SIZE, |b, out| {
        let d = read_f16(&b[0..2]);
        let levels = unpack_levels(&b[6..], Some(&b[2..6]));
        for (y, &l) in out.iter_mut().zip(&levels) {
            *y = (i32::from(l) - 16) as f32 * d;
        }
    });
}

/// Encodes Q5_0 blocks with ggml's reference rounding.
pub fn quantize_q5_0(src: &[f32], dst: &mut [u8]) {
    quantize_blocks(src, dst, Q5_0_SIZE, |x, b| {
        let mut levels = [0u8; QK];
        let d = quantize_symmetric(x, 5, &mut levels);
        write_f16(&mut b[0..2], d);
        b[2..6].copy_from_slice(&pack_high_bits(&levels));
        pack_nibbles(&levels, &mut b[6..]);
    });
}

/// Decodes Q5_1 blocks: `d * q + m`.
pub fn dequantize_q5_1(src: &[u8], dst: &mut [f32]) {
    dequantize_blocks(src, dst, Q5_1_SIZE, |b, out| {
        let d = read_f16(&b[0..2]);
        let m = read_f16(&b[2..4]);
        let levels = unpack_levels(&b[8..], Some(&b[4..8]));
        for (y, &l) in out.iter_mut().zip(&levels) {
            *y = f32::from(l) * d + m;
        }
    });
}

/// Encodes Q5_1 blocks with ggml's reference rounding.
pub fn quantize_q5_1(src: &[f32], dst: &mut [u8]) {
    quantize_blocks(src, dst, Q5_1_SIZE, |x, b| {
        let mut levels = [0u8; QK];
        let (d, m) = quantize_affine(x, 5, &mut levels);
        write_f16(&mut b[0..2], d);
        write_f16(&mut b[2..4], m);
        b[4..8].copy_from_slice(&pack_high_bits(&levels));
        pack_nibbles(&levels, &mut b[8..]);
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{dequantize_row, quantize_row, GgmlType};

    const TYPES: [GgmlType; 4] = [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
    ];

    fn round_trip(ty: GgmlType, x: &[f32]) -> (Vec<u8>, Vec<f32>) {
        let mut q = vec![0u8; ty.bytes_for(x.len() as u64).unwrap() as usize];
        quantize_row(ty, x, &mut q).unwrap();
        let mut y = vec![0f32; x.len()];
        dequantize_row(ty, &q, &mut y).unwrap();
        (q, y)
    }

    /// Deterministic pseudo-random values in [-1, 1).
    fn noise(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }

    /// Worst error allowed per element: one step for the symmetric types (the extreme on the
    /// side opposite the max is clamped to level 2^bits - 1), half a step for the affine
    /// ones, plus the f16 rounding of the scale and min.
    fn tolerance(ty: GgmlType, x: &[f32]) -> f32 {
        let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
        let (min, max) = min_max(x);
        let step = match ty {
            GgmlType::Q4_0 => amax / 8.0,
            GgmlType::Q5_0 => amax / 16.0,
            GgmlType::Q4_1 => 0.5 * (max - min) / 15.0,
            _ => 0.5 * (max - min) / 31.0,
        };
        step * 1.001 + amax * 2e-3
    }

    #[test]
    fn random_blocks_round_trip_within_a_step() {
        for ty in TYPES {
            for seed in 0..20 {
                let scale = [1e-3f32, 1.0, 300.0][seed as usize % 3];
                let x: Vec<f32> = noise(4 * QK, seed).iter().map(|v| v * scale).collect();
                let (_, y) = round_trip(ty, &x);
                for (xb, yb) in x.chunks(QK).zip(y.chunks(QK)) {
                    let tol = tolerance(ty, xb);
                    for (a, b) in xb.iter().zip(yb) {
                        assert!((a - b).abs() <= tol, "{ty} {a} vs {b} (tol {tol})");
                    }
                }
            }
        }
    }

    #[test]
    fn all_zero_block_is_all_zero() {
        for ty in TYPES {
            let (q, y) = round_trip(ty, &[0.0; QK]);
            assert!(y.iter().all(|v| *v == 0.0), "{ty}");
            // The scale is zero (-0.0 for the symmetric types: 0 / -8, as in ggml and gguf-py).
            assert_eq!(read_f16(&q[0..2]), 0.0);
        }
    }

    #[test]
    fn constant_blocks_are_exact_where_representable() {
        for ty in TYPES {
            for c in [1.0f32, -2.0, 0.5, 1024.0] {
                let (_, y) = round_trip(ty, &[c; QK]);
                for v in &y {
                    assert_eq!(*v, c, "{ty} constant {c}");
                }
            }
        }
    }

    #[test]
    fn signed_extreme_is_exact_for_symmetric_types() {
        // The element of largest magnitude maps to the lowest level and decodes exactly
        // when the scale is representable in f16.
        let mut x = noise(QK, 7);
        x[5] = -4.0;
        for ty in [GgmlType::Q4_0, GgmlType::Q5_0] {
            let (_, y) = round_trip(ty, &x);
            assert_eq!(y[5], -4.0, "{ty}");
        }
        x[5] = 4.0;
        for ty in [GgmlType::Q4_0, GgmlType::Q5_0] {
            let (_, y) = round_trip(ty, &x);
            assert_eq!(y[5], 4.0, "{ty}");
        }
    }

    #[test]
    fn negative_only_and_huge_small_magnitudes() {
        for ty in TYPES {
            let neg: Vec<f32> = noise(QK, 3).iter().map(|v| -1.5 - v.abs()).collect();
            let (_, y) = round_trip(ty, &neg);
            let tol = tolerance(ty, &neg);
            for (a, b) in neg.iter().zip(&y) {
                assert!((a - b).abs() <= tol, "{ty} {a} {b}");
            }
            // Near the top of the f16 range: still finite and close.
            let big: Vec<f32> = noise(QK, 4).iter().map(|v| v * 60000.0).collect();
            let (_, y) = round_trip(ty, &big);
            assert!(y.iter().all(|v| v.is_finite()), "{ty}");
            let tol = tolerance(ty, &big);
            for (a, b) in big.iter().zip(&y) {
                assert!((a - b).abs() <= tol, "{ty} {a} {b}");
            }
            // Far below the f16 range: the scale underflows to 0, decoding gives ~0.
            let tiny: Vec<f32> = noise(QK, 5).iter().map(|v| v * 1e-12).collect();
            let (_, y) = round_trip(ty, &tiny);
            assert!(y.iter().all(|v| v.abs() <= 1e-11), "{ty}");
        }
    }

    #[test]
    fn non_finite_input_does_not_panic() {
        let mut x = noise(2 * QK, 11);
        x[1] = f32::NAN;
        x[40] = f32::INFINITY;
        x[41] = f32::NEG_INFINITY;
        for ty in TYPES {
            let _ = round_trip(ty, &x);
        }
    }

    #[test]
    fn layout_of_a_hand_made_q5_0_block() {
        // d = 1.0 (0x3c00); qh bit j set for j odd; nibbles: qs[j] = j | (15 - j) << 4.
        let mut b = vec![0x00, 0x3c];
        b.extend_from_slice(&0xaaaa_aaaau32.to_le_bytes());
        b.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let mut y = [0f32; QK];
        dequantize_q5_0(&b, &mut y);
        for j in 0..16 {
            let hi = |e: usize| if e % 2 == 1 { 16 } else { 0 };
            assert_eq!(y[j], (j as i32 + hi(j) - 16) as f32);
            assert_eq!(y[j + 16], (15 - j as i32 + hi(j + 16) - 16) as f32);
        }
        // And quantizing those values gives back the same bytes (max |v| = -16 -> d = 1).
        let mut q = vec![0u8; Q5_0_SIZE];
        quantize_q5_0(&y, &mut q);
        assert_eq!(q, b);
    }

    #[test]
    fn q4_1_layout_and_exact_grid() {
        // Values on the grid m + d*q are reproduced exactly.
        let x: Vec<f32> = (0..QK).map(|j| -3.0 + 0.5 * (j % 16) as f32).collect();
        let (q, y) = round_trip(GgmlType::Q4_1, &x);
        assert_eq!(y, x);
        assert_eq!(read_f16(&q[0..2]), 0.5);
        assert_eq!(read_f16(&q[2..4]), -3.0);
        assert_eq!(q[4], 0x00);
        assert_eq!(q[5], 0x11);
    }
}
