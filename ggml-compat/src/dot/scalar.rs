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
// 32-element blocks.

/// Sum over a block of `wq(j) * a[j]` for the 32 activation quants `a`.
#[inline(always)]
fn isum32(a: &[u8], wq: impl Fn(usize) -> i32) -> i32 {
    let a = i8s(&a[..QK]);
    (0..QK).map(|j| wq(j) * a[j] as i32).sum()
}

/// Quant `j` (0..32) of a block's 16 nibble bytes: low nibbles first, then high nibbles.
#[inline(always)]
fn nibble(qs: &[u8], j: usize) -> i32 {
    if j < 16 {
        (qs[j] & 0x0F) as i32
    } else {
        (qs[j - 16] >> 4) as i32
    }
}

/// The fifth bit of quant `j` in a Q5 block's `qh`, as 0 or 16.
#[inline(always)]
fn fifth_bit(qh: u32, j: usize) -> i32 {
    (((qh >> j) & 1) << 4) as i32
}

pub(super) fn q4_0_q8_0(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let nb = check_blocks(n, QK, w, Q4_0_BYTES, a, Q8_0_BYTES);
    let mut sum = 0f32;
    for (x, y) in w
        .chunks_exact(Q4_0_BYTES)
        .zip(a.chunks_exact(Q8_0_BYTES))
        .take(nb)
    {
        let qs = &x[2..18];
        let isum = isum32(&y[2..], |j| nibble(qs, j) - 8);
        sum += isum as f32 * (f16_at(x, 0) * f16_at(y, 0));
    }
    sum
}

pub(super) fn q4_1_q8_1(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let nb = check_blocks(n, QK, w, Q4_1_BYTES, a, Q8_1_BYTES);
    let mut sum = 0f32;
    for (x, y) in w
        .chunks_exact(Q4_1_BYTES)
        .zip(a.chunks_exact(Q8_1_BYTES))
        .take(nb)
    {
        let qs = &x[4..20];
        let isum = isum32(&y[4..], |j| nibble(qs, j));
        sum += isum as f32 * (f16_at(x, 0) * f16_at(y, 0)) + f16_at(x, 2) * f16_at(y, 2);
    }
    sum
}

pub(super) fn q5_0_q8_0(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let nb = check_blocks(n, QK, w, Q5_0_BYTES, a, Q8_0_BYTES);
    let mut sum = 0f32;
    for (x, y) in w
        .chunks_exact(Q5_0_BYTES)
        .zip(a.chunks_exact(Q8_0_BYTES))
        .take(nb)
    {
        let qh = u32::from_le_bytes([x[2], x[3], x[4], x[5]]);
        let qs = &x[6..22];
        let isum = isum32(&y[2..], |j| (nibble(qs, j) | fifth_bit(qh, j)) - 16);
        sum += isum as f32 * (f16_at(x, 0) * f16_at(y, 0));
    }
    sum
}

pub(super) fn q5_1_q8_1(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let nb = check_blocks(n, QK, w, Q5_1_BYTES, a, Q8_1_BYTES);
    let mut sum = 0f32;
    for (x, y) in w
        .chunks_exact(Q5_1_BYTES)
        .zip(a.chunks_exact(Q8_1_BYTES))
        .take(nb)
    {
        let qh = u32::from_le_bytes([x[4], x[5], x[6], x[7]]);
        let qs = &x[8..24];
        let isum = isum32(&y[4..], |j| nibble(qs, j) | fifth_bit(qh, j));
        sum += isum as f32 * (f16_at(x, 0) * f16_at(y, 0)) + f16_at(x, 2) * f16_at(y, 2);
    }
    sum
}

pub(super) fn q8_0_q8_0(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let nb = check_blocks(n, QK, w, Q8_0_BYTES, a, Q8_0_BYTES);
    let mut sum = 0f32;
    for (x, y) in w
        .chunks_exact(Q8_0_BYTES)
        .zip(a.chunks_exact(Q8_0_BYTES))
        .take(nb)
    {
        let qx = i8s(&x[2..34]);
        let isum = isum32(&y[2..], |j| qx[j] as i32);
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

    /// Sum of `wq(l) * qs[start + l]` for `l < len`.
    #[inline(always)]
    fn isum(&self, start: usize, len: usize, wq: impl Fn(usize) -> i32) -> i32 {
        let q = &self.qs[start..start + len];
        (0..len).map(|l| wq(l) * q[l] as i32).sum()
    }
}

pub(super) fn q2_k_q8_k(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let nb = check_blocks(n, QK_K, w, Q2_K_BYTES, a, Q8_K_BYTES);
    let mut sum = 0f32;
    for (x, y) in w
        .chunks_exact(Q2_K_BYTES)
        .zip(a.chunks_exact(Q8_K_BYTES))
        .take(nb)
    {
        let y = Q8K::new(y);
        let scales = &x[0..16];
        let qs = &x[16..80];
        // Element 128h + 32j + l holds bits 2j..2j+2 of qs[32h + l]; its 16-element group is
        // 8h + 2j + l/16, whose scale is the low nibble and min the high nibble of scales[group].
        let mut isum = 0i32;
        for (g, &sc) in scales.iter().enumerate() {
            let (h, j, half) = (g / 8, (g % 8) / 2, g % 2);
            let q = &qs[32 * h + 16 * half..][..16];
            let part = y.isum(16 * g, 16, |l| ((q[l] >> (2 * j)) & 3) as i32);
            isum += (sc & 0x0F) as i32 * part;
        }
        let msum: i32 = scales
            .iter()
            .zip(&y.bsum)
            .map(|(&sc, &b)| (sc >> 4) as i32 * b)
            .sum();
        sum += y.d * f16_at(x, 80) * isum as f32 - y.d * f16_at(x, 82) * msum as f32;
    }
    sum
}

/// The sixteen signed 6-bit scales of a Q3_K block (already offset by -32).
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
    for (x, y) in w
        .chunks_exact(Q3_K_BYTES)
        .zip(a.chunks_exact(Q8_K_BYTES))
        .take(nb)
    {
        let y = Q8K::new(y);
        let hmask = &x[0..32];
        let qs = &x[32..96];
        let scales = q3_k_scales(&x[96..108]);
        // Element 128h + 32j + l: low two bits are bits 2j..2j+2 of qs[32h + l]; bit 4h + j of
        // hmask[l] set means +0, clear means -4. Group (and scale) 8h + 2j + l/16.
        let mut isum = 0i32;
        for (g, &sc) in scales.iter().enumerate() {
            let (h, j, half) = (g / 8, (g % 8) / 2, g % 2);
            let q = &qs[32 * h + 16 * half..][..16];
            let m = &hmask[16 * half..][..16];
            let bit = 4 * h + j;
            let part = y.isum(16 * g, 16, |l| {
                let low = ((q[l] >> (2 * j)) & 3) as i32;
                low - if (m[l] >> bit) & 1 != 0 { 0 } else { 4 }
            });
            isum += sc * part;
        }
        sum += y.d * f16_at(x, 108) * isum as f32;
    }
    sum
}

/// Scale and min of sub-block `j` (0..8) from the 12 packed bytes of a Q4_K / Q5_K block.
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

pub(super) fn q4_k_q8_k(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let nb = check_blocks(n, QK_K, w, Q4_K_BYTES, a, Q8_K_BYTES);
    let mut sum = 0f32;
    for (x, y) in w
        .chunks_exact(Q4_K_BYTES)
        .zip(a.chunks_exact(Q8_K_BYTES))
        .take(nb)
    {
        let y = Q8K::new(y);
        let packed = &x[4..16];
        let qs = &x[16..144];
        // Sub-block s (32 elements): the low nibbles of qs[32(s/2)..] for even s, high for odd.
        let mut isum = 0i32;
        let mut msum = 0i32;
        for s in 0..8 {
            let (sc, m) = scale_min_k4(s, packed);
            let q = &qs[32 * (s / 2)..][..32];
            let shift = 4 * (s % 2);
            isum += sc * y.isum(32 * s, 32, |l| ((q[l] >> shift) & 0x0F) as i32);
            msum += m * (y.bsum[2 * s] + y.bsum[2 * s + 1]);
        }
        sum += y.d * f16_at(x, 0) * isum as f32 - y.d * f16_at(x, 2) * msum as f32;
    }
    sum
}

pub(super) fn q5_k_q8_k(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let nb = check_blocks(n, QK_K, w, Q5_K_BYTES, a, Q8_K_BYTES);
    let mut sum = 0f32;
    for (x, y) in w
        .chunks_exact(Q5_K_BYTES)
        .zip(a.chunks_exact(Q8_K_BYTES))
        .take(nb)
    {
        let y = Q8K::new(y);
        let packed = &x[4..16];
        let qh = &x[16..48];
        let qs = &x[48..176];
        // As Q4_K, plus a fifth bit: bit s of qh[l] for element l of sub-block s.
        let mut isum = 0i32;
        let mut msum = 0i32;
        for s in 0..8 {
            let (sc, m) = scale_min_k4(s, packed);
            let q = &qs[32 * (s / 2)..][..32];
            let shift = 4 * (s % 2);
            let part = y.isum(32 * s, 32, |l| {
                (((q[l] >> shift) & 0x0F) | (((qh[l] >> s) & 1) << 4)) as i32
            });
            isum += sc * part;
            msum += m * (y.bsum[2 * s] + y.bsum[2 * s + 1]);
        }
        sum += y.d * f16_at(x, 0) * isum as f32 - y.d * f16_at(x, 2) * msum as f32;
    }
    sum
}

pub(super) fn q6_k_q8_k(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let nb = check_blocks(n, QK_K, w, Q6_K_BYTES, a, Q8_K_BYTES);
    let mut sum = 0f32;
    for (x, y) in w
        .chunks_exact(Q6_K_BYTES)
        .zip(a.chunks_exact(Q8_K_BYTES))
        .take(nb)
    {
        let y = Q8K::new(y);
        let ql = &x[0..128];
        let qh = &x[128..192];
        let scales = i8s(&x[192..208]);
        // Element 128h + 32k + l (k 0..4, l 0..32): the low four bits are the low (k < 2) or
        // high (k >= 2) nibble of ql[64h + 32(k%2) + l], the top two are bits 2k..2k+2 of
        // qh[32h + l]; the value is that minus 32. Group (and scale) 8h + 2k + l/16.
        let mut isum = 0i32;
        for (g, &sc) in scales.iter().enumerate() {
            let (h, k, half) = (g / 8, (g % 8) / 2, g % 2);
            let lo = &ql[64 * h + 32 * (k % 2) + 16 * half..][..16];
            let hi = &qh[32 * h + 16 * half..][..16];
            let nib_shift = 4 * (k / 2);
            let part = y.isum(16 * g, 16, |l| {
                let low = (lo[l] >> nib_shift) & 0x0F;
                let top = (hi[l] >> (2 * k)) & 3;
                (low | (top << 4)) as i32 - 32
            });
            isum += sc as i32 * part;
        }
        sum += y.d * f16_at(x, 208) * isum as f32;
    }
    sum
}
