//! Portable scalar dot kernels: the reference every SIMD kernel is tested against.
//!
//! Quantized kernels follow ggml's arithmetic: inside a block the weight quants times the
//! activation quants are summed exactly in integers (sub-block scales applied as integers
//! too), and each block contributes `d_w * d_a * isum` in f32; offsets ("min" terms) use the
//! activation's precomputed sums (Q8_1's `s`, Q8_K's `bsums`). Float kernels keep eight f32
//! partial sums, the shape LLVM vectorizes on any target.

use super::layout::*;
use super::{check_blocks, f16_at, f32_at, i16_at, i8s};
use crate::{QK, QK_K};

// ---------------------------------------------------------------------------------------------
// Float rows (block size 1).

/// Sums `f(i)` for `i < n` with eight interleaved f32 accumulators.
#[inline(always)]
fn lanes8(n: usize, f: impl Fn(usize) -> f32) -> f32 {
    let mut acc = [0f32; 8];
    let body = n / 8 * 8;
    for i in (0..body).step_by(8) {
        for (l, s) in acc.iter_mut().enumerate() {
            *s += f(i + l);
        }
    }
    let mut tail = 0f32;
    for i in body..n {
        tail += f(i);
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

pub(super) fn f32_f32(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let (w, a) = (&w[..n * 4], &a[..n * 4]);
    lanes8(n, |i| f32_at(w, 4 * i) * f32_at(a, 4 * i))
}

pub(super) fn f16_f16(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let (w, a) = (&w[..n * 2], &a[..n * 2]);
    lanes8(n, |i| f16_at(w, 2 * i) * f16_at(a, 2 * i))
}

/// BF16 weights times F32 activations.
pub(super) fn bf16_f32(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let (w, a) = (&w[..n * 2], &a[..n * 4]);
    lanes8(n, |i| {
        let bits = u16::from_le_bytes([w[2 * i], w[2 * i + 1]]);
        f32::from_bits((bits as u32) << 16) * f32_at(a, 4 * i)
    })
}

// ---------------------------------------------------------------------------------------------
// Quantized blocks. Each kernel unpacks a weight block into one signed byte per element, then
// takes integer dot products with the activation quants (loops LLVM vectorizes).

/// Pairs of (weight block, activation block) for the first `nb` blocks.
#[inline(always)]
fn block_pairs<'a>(
    w: &'a [u8],
    wbytes: usize,
    a: &'a [u8],
    abytes: usize,
    nb: usize,
) -> impl Iterator<Item = (&'a [u8], &'a [u8])> {
    w.chunks_exact(wbytes).zip(a.chunks_exact(abytes)).take(nb)
}

/// `sum(w[i] * a[i])` in exact integer arithmetic.
#[inline(always)]
fn idot(w: &[i8], a: &[i8]) -> i32 {
    w.iter().zip(a).map(|(&x, &y)| x as i32 * y as i32).sum()
}

/// The 32 quants of a legacy block: quant j < 16 is the low nibble of `qs[j]`, quant j + 16 its
/// high nibble; bit j of `qh` adds 16 to quant j (Q5 types; 0 for Q4); minus `offset`.
#[inline(always)]
fn unpack32(qs: &[u8], qh: u32, offset: i8) -> [i8; QK] {
    let qs = &qs[..16];
    let mut q = [0i8; QK];
    for j in 0..16 {
        let h0 = (((qh >> j) & 1) << 4) as u8;
        let h1 = (((qh >> (j + 16)) & 1) << 4) as u8;
        q[j] = ((qs[j] & 0x0F) | h0) as i8 - offset;
        q[j + 16] = ((qs[j] >> 4) | h1) as i8 - offset;
    }
    q
}

pub(super) fn q4_0_q8_0(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let nb = check_blocks(n, QK, w, Q4_0_BYTES, a, Q8_0_BYTES);
    let mut sum = 0f32;
    for (x, y) in block_pairs(w, Q4_0_BYTES, a, Q8_0_BYTES, nb) {
        let isum = idot(&unpack32(&x[2..18], 0, 8), i8s(&y[2..34]));
        sum += isum as f32 * (f16_at(x, 0) * f16_at(y, 0));
    }
    sum
}

pub(super) fn q4_1_q8_1(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let nb = check_blocks(n, QK, w, Q4_1_BYTES, a, Q8_1_BYTES);
    let mut sum = 0f32;
    for (x, y) in block_pairs(w, Q4_1_BYTES, a, Q8_1_BYTES, nb) {
        let isum = idot(&unpack32(&x[4..20], 0, 0), i8s(&y[4..36]));
        sum += isum as f32 * (f16_at(x, 0) * f16_at(y, 0)) + f16_at(x, 2) * f16_at(y, 2);
    }
    sum
}

pub(super) fn q5_0_q8_0(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let nb = check_blocks(n, QK, w, Q5_0_BYTES, a, Q8_0_BYTES);
    let mut sum = 0f32;
    for (x, y) in block_pairs(w, Q5_0_BYTES, a, Q8_0_BYTES, nb) {
        let qh = u32::from_le_bytes([x[2], x[3], x[4], x[5]]);
        let isum = idot(&unpack32(&x[6..22], qh, 16), i8s(&y[2..34]));
        sum += isum as f32 * (f16_at(x, 0) * f16_at(y, 0));
    }
    sum
}

pub(super) fn q5_1_q8_1(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let nb = check_blocks(n, QK, w, Q5_1_BYTES, a, Q8_1_BYTES);
    let mut sum = 0f32;
    for (x, y) in block_pairs(w, Q5_1_BYTES, a, Q8_1_BYTES, nb) {
        let qh = u32::from_le_bytes([x[4], x[5], x[6], x[7]]);
        let isum = idot(&unpack32(&x[8..24], qh, 0), i8s(&y[4..36]));
        sum += isum as f32 * (f16_at(x, 0) * f16_at(y, 0)) + f16_at(x, 2) * f16_at(y, 2);
    }
    sum
}

pub(super) fn q8_0_q8_0(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let nb = check_blocks(n, QK, w, Q8_0_BYTES, a, Q8_0_BYTES);
    let mut sum = 0f32;
    for (x, y) in block_pairs(w, Q8_0_BYTES, a, Q8_0_BYTES, nb) {
        let isum = idot(i8s(&x[2..34]), i8s(&y[2..34]));
        sum += isum as f32 * (f16_at(x, 0) * f16_at(y, 0));
    }
    sum
}

// ---------------------------------------------------------------------------------------------
// 256-element super-blocks, against Q8_K.

/// A Q8_K block's parts: scale, 256 quants, 16 sums of 16 quants.
struct Q8K<'a> {
    d: f32,
    qs: &'a [i8],
    bsum: [i32; QK_K / 16],
}

impl<'a> Q8K<'a> {
    #[inline(always)]
    fn new(y: &'a [u8]) -> Self {
        let mut bsum = [0i32; QK_K / 16];
        for (g, s) in bsum.iter_mut().enumerate() {
            *s = i16_at(y, Q8K_BSUMS + 2 * g) as i32;
        }
        Q8K {
            d: f32_at(y, 0),
            qs: i8s(&y[Q8K_QS..Q8K_QS + QK_K]),
            bsum,
        }
    }

    /// `sum(scale[g] * dot(q[g], a[g]))` over the groups of `len` elements (16 or 32).
    #[inline(always)]
    fn scaled_isum(&self, q: &[i8; QK_K], len: usize, scale: impl Fn(usize) -> i32) -> i32 {
        q.chunks_exact(len)
            .zip(self.qs.chunks_exact(len))
            .enumerate()
            .map(|(g, (w, a))| scale(g) * idot(w, a))
            .sum()
    }
}

pub(super) fn q2_k_q8_k(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let nb = check_blocks(n, QK_K, w, Q2_K_BYTES, a, Q8_K_BYTES);
    let mut sum = 0f32;
    for (x, y) in block_pairs(w, Q2_K_BYTES, a, Q8_K_BYTES, nb) {
        let y = Q8K::new(y);
        let scales = &x[0..16];
        let qs = &x[16..80];
        // Element 128h + 32j + l is bits 2j..2j+2 of qs[32h + l]. Each 16-element group g has
        // scale `scales[g] & 15` and min `scales[g] >> 4`.
        let mut q = [0i8; QK_K];
        for (h, out) in q.chunks_exact_mut(128).enumerate() {
            let src = &qs[32 * h..32 * h + 32];
            for (j, o) in out.chunks_exact_mut(32).enumerate() {
                for (v, &b) in o.iter_mut().zip(src) {
                    *v = ((b >> (2 * j)) & 3) as i8;
                }
            }
        }
        let isum = y.scaled_isum(&q, 16, |g| (scales[g] & 0x0F) as i32);
        let msum: i32 = scales
            .iter()
            .zip(&y.bsum)
            .map(|(&s, &b)| (s >> 4) as i32 * b)
            .sum();
        sum += y.d * f16_at(x, 80) * isum as f32 - y.d * f16_at(x, 82) * msum as f32;
    }
    sum
}

/// The sixteen signed 6-bit scales of a Q3_K block (already offset by -32): scale i has its
/// low four bits in the low (i < 8) or high (i >= 8) nibble of byte i % 8, its top two bits
/// in bits 2(i/4)..2(i/4)+2 of byte 8 + i % 4.
fn q3_k_scales(s: &[u8]) -> [i32; 16] {
    let mut out = [0i32; 16];
    for (i, o) in out.iter_mut().enumerate() {
        let low = if i < 8 { s[i] & 0x0F } else { s[i - 8] >> 4 };
        let high = (s[8 + i % 4] >> (2 * (i / 4))) & 3;
        *o = (low | (high << 4)) as i32 - 32;
    }
    out
}

pub(super) fn q3_k_q8_k(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let nb = check_blocks(n, QK_K, w, Q3_K_BYTES, a, Q8_K_BYTES);
    let mut sum = 0f32;
    for (x, y) in block_pairs(w, Q3_K_BYTES, a, Q8_K_BYTES, nb) {
        let y = Q8K::new(y);
        let hmask = &x[0..32];
        let qs = &x[32..96];
        let scales = q3_k_scales(&x[96..108]);
        // Element 128h + 32j + l: low two bits are bits 2j..2j+2 of qs[32h + l]; bit 4h + j of
        // hmask[l] set means +0, clear means -4.
        let mut q = [0i8; QK_K];
        for (h, out) in q.chunks_exact_mut(128).enumerate() {
            let src = &qs[32 * h..32 * h + 32];
            for (j, o) in out.chunks_exact_mut(32).enumerate() {
                let bit = 4 * h + j;
                for ((v, &b), &m) in o.iter_mut().zip(src).zip(hmask) {
                    let low = ((b >> (2 * j)) & 3) as i8;
                    *v = low - if (m >> bit) & 1 != 0 { 0 } else { 4 };
                }
            }
        }
        let isum = y.scaled_isum(&q, 16, |g| scales[g]);
        sum += y.d * f16_at(x, 108) * isum as f32;
    }
    sum
}

/// Scale and min of sub-block `j` (0..8) from the 12 packed bytes of a Q4_K / Q5_K block:
/// 6-bit values; for j < 4 the low six bits of bytes j (scale) and j + 4 (min); for j >= 4 the
/// nibbles of byte j + 4 with the top two bits of bytes j - 4 (scale) and j (min) above them.
#[inline(always)]
fn scale_min_k4(j: usize, s: &[u8]) -> (i32, i32) {
    if j < 4 {
        ((s[j] & 63) as i32, (s[j + 4] & 63) as i32)
    } else {
        let sc = (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4);
        let m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
        (sc as i32, m as i32)
    }
}

/// The common end of Q4_K and Q5_K: sub-block scales on the quants, mins on the group sums.
#[inline(always)]
fn k4_block_sum(x: &[u8], y: &Q8K, q: &[i8; QK_K]) -> f32 {
    let packed = &x[4..16];
    let isum = y.scaled_isum(q, 32, |s| scale_min_k4(s, packed).0);
    let msum: i32 = (0..8)
        .map(|s| scale_min_k4(s, packed).1 * (y.bsum[2 * s] + y.bsum[2 * s + 1]))
        .sum();
    y.d * f16_at(x, 0) * isum as f32 - y.d * f16_at(x, 2) * msum as f32
}

pub(super) fn q4_k_q8_k(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let nb = check_blocks(n, QK_K, w, Q4_K_BYTES, a, Q8_K_BYTES);
    let mut sum = 0f32;
    for (x, y) in block_pairs(w, Q4_K_BYTES, a, Q8_K_BYTES, nb) {
        let y = Q8K::new(y);
        let qs = &x[16..144];
        // Elements 64j + l and 64j + 32 + l are the low and high nibbles of qs[32j + l].
        let mut q = [0i8; QK_K];
        for (out, src) in q.chunks_exact_mut(64).zip(qs.chunks_exact(32)) {
            let (lo, hi) = out.split_at_mut(32);
            for ((l, h), &b) in lo.iter_mut().zip(hi).zip(src) {
                *l = (b & 0x0F) as i8;
                *h = (b >> 4) as i8;
            }
        }
        sum += k4_block_sum(x, &y, &q);
    }
    sum
}

pub(super) fn q5_k_q8_k(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let nb = check_blocks(n, QK_K, w, Q5_K_BYTES, a, Q8_K_BYTES);
    let mut sum = 0f32;
    for (x, y) in block_pairs(w, Q5_K_BYTES, a, Q8_K_BYTES, nb) {
        let y = Q8K::new(y);
        let qh = &x[16..48];
        let qs = &x[48..176];
        // As Q4_K, plus a fifth bit: bit s of qh[l] for element l of 32-element sub-block s.
        let mut q = [0i8; QK_K];
        for (j, (out, src)) in q.chunks_exact_mut(64).zip(qs.chunks_exact(32)).enumerate() {
            let (lo, hi) = out.split_at_mut(32);
            for (((l, h), &b), &bits) in lo.iter_mut().zip(hi).zip(src).zip(qh) {
                *l = ((b & 0x0F) | (((bits >> (2 * j)) & 1) << 4)) as i8;
                *h = ((b >> 4) | (((bits >> (2 * j + 1)) & 1) << 4)) as i8;
            }
        }
        sum += k4_block_sum(x, &y, &q);
    }
    sum
}

pub(super) fn q6_k_q8_k(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let nb = check_blocks(n, QK_K, w, Q6_K_BYTES, a, Q8_K_BYTES);
    let mut sum = 0f32;
    for (x, y) in block_pairs(w, Q6_K_BYTES, a, Q8_K_BYTES, nb) {
        let y = Q8K::new(y);
        let scales = i8s(&x[192..208]);
        // In half h, element 32k + l (k 0..4, l 0..32): the low four bits are the low (k < 2)
        // or high (k >= 2) nibble of ql[64h + 32(k%2) + l], the top two are bits 2k..2k+2 of
        // qh[32h + l]; the value is that minus 32.
        let mut q = [0i8; QK_K];
        for (h, out) in q.chunks_exact_mut(128).enumerate() {
            let ql = &x[64 * h..64 * h + 64];
            let qh = &x[128 + 32 * h..128 + 32 * h + 32];
            for (k, o) in out.chunks_exact_mut(32).enumerate() {
                let lo = &ql[32 * (k % 2)..32 * (k % 2) + 32];
                let nib_shift = 4 * (k / 2);
                for ((v, &b), &top) in o.iter_mut().zip(lo).zip(qh) {
                    let low = (b >> nib_shift) & 0x0F;
                    let high = (top >> (2 * k)) & 3;
                    *v = (low | (high << 4)) as i8 - 32;
                }
            }
        }
        let isum = y.scaled_isum(&q, 16, |g| scales[g] as i32);
        sum += y.d * f16_at(x, 208) * isum as f32;
    }
    sum
}
