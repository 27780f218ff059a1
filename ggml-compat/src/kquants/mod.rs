//! The K-quant family: 256-element super-blocks ([`QK_K`]) with quantized per-sub-block scales.
//!
//! Owns the block layouts, dequantization and ggml's reference quantizers
//! (`quantize_row_q*_K_ref`, the path llama.cpp takes without an importance matrix) for
//! Q2_K, Q3_K, Q4_K, Q5_K and Q6_K, one file per type, plus the shared scale-search helpers
//! here. Q8_K (the activation format) lives in [`crate::q8`].
//!
//! | type | bytes | layout (in order) | sub-blocks |
//! |------|-------|-------------------|------------|
//! | Q2_K | 84  | `scales[16]`, `qs[64]`, `d: f16`, `dmin: f16` | 16 x 16, 4-bit scale + 4-bit min |
//! | Q3_K | 110 | `hmask[32]`, `qs[64]`, `scales[12]`, `d: f16` | 16 x 16, 6-bit signed scale |
//! | Q4_K | 144 | `d: f16`, `dmin: f16`, `scales[12]`, `qs[128]` | 8 x 32, 6-bit scale + 6-bit min |
//! | Q5_K | 176 | `d: f16`, `dmin: f16`, `scales[12]`, `qh[32]`, `qs[128]` | 8 x 32, as Q4_K |
//! | Q6_K | 210 | `ql[128]`, `qh[64]`, `scales[16]: i8`, `d: f16` | 16 x 16, 8-bit signed scale |
//!
//! All arithmetic is single precision in the same order as ggml's scalar reference code, so
//! dequantization is bit-identical to ggml's `dequantize_row_*` and gguf-py's
//! `gguf.quants.dequantize` (tests/pyref.rs), and quantization is byte-identical to
//! `quantize_row_*_ref` built without FMA contraction (`quantizers_match_ggml_reference_bytes`
//! below; rounding is ties-to-even like ggml's `nearest_int`).

mod q2_k;
mod q3_k;
mod q4_k;
mod q5_k;
mod q6_k;

pub use q2_k::{dequantize_q2_k, quantize_q2_k};
pub use q3_k::{dequantize_q3_k, quantize_q3_k};
pub use q4_k::{dequantize_q4_k, quantize_q4_k};
pub use q5_k::{dequantize_q5_k, quantize_q5_k};
pub use q6_k::{dequantize_q6_k, quantize_q6_k};

#[cfg(test)]
use crate::QK_K;

/// Below this magnitude a group counts as all zero (ggml's `GROUP_MAX_EPS`).
const GROUP_MAX_EPS: f32 = 1e-15;

/// Rounds to the nearest integer, ties to even, like ggml's `nearest_int` (which adds
/// 1.5 * 2^23 and reads the mantissa). ggml requires |x| <= 2^22; out-of-range values and NaN
/// saturate here instead of producing garbage.
#[inline]
fn nearest_int(x: f32) -> i32 {
    x.round_ties_even() as i32
}

/// The value of largest magnitude in `x` (the first one on ties; 0 for an empty or all-zero
/// slice). NaN never wins.
fn signed_absmax(x: &[f32]) -> f32 {
    let mut amax = 0.0f32;
    let mut max = 0.0f32;
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    max
}

/// Symmetric scale search (ggml's `make_qx_quants` with an explicit weight per element).
///
/// Finds `scale` and levels `l[i]` in `-nmax..nmax` minimising `sum w[i] (x[i] - scale l[i])^2`
/// over the 19 candidate inverse scales `-(nmax + 0.1 k) / max`, k = -9..=9, each followed by
/// the closed-form optimal scale for its levels. Writes `l[i] + nmax` to `levels` and returns
/// the scale (0 and all-zero levels for an all-zero group).
fn make_qx_quants(nmax: i32, x: &[f32], w: &[f32], levels: &mut [u8]) -> f32 {
    let max = signed_absmax(x);
    if max.abs() < GROUP_MAX_EPS {
        levels.fill(0);
        return 0.0;
    }
    let nmax_f = nmax as f32;
    let quant = |iscale: f32, v: f32| nearest_int(iscale * v).clamp(-nmax, nmax - 1);
    // Weighted sums for one candidate inverse scale.
    let sums = |iscale: f32| {
        let (mut sumlx, mut suml2) = (0.0f32, 0.0f32);
        for (&v, &wi) in x.iter().zip(w) {
            let l = quant(iscale, v) as f32;
            sumlx += wi * v * l;
            suml2 += wi * l * l;
        }
        (sumlx, suml2)
    };
    let fill = |iscale: f32, levels: &mut [u8]| {
        for (q, &v) in levels.iter_mut().zip(x) {
            *q = (quant(iscale, v) + nmax) as u8;
        }
    };

    let iscale = -nmax_f / max;
    fill(iscale, levels);
    let (sumlx, suml2) = sums(iscale);
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for k in (-9..=9).filter(|&k| k != 0) {
        let iscale = -(nmax_f + 0.1 * k as f32) / max;
        let (sumlx, suml2) = sums(iscale);
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            fill(iscale, levels);
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

/// Scale + min search for a group of unsigned levels `0..=nmax` (ggml's `make_qkx2_quants`).
///
/// Models `x[i] ~ scale * l[i] - the_min` with `the_min >= 0`. Starts from the min/max
/// range, then tries `nstep + 1` inverse scales `(nmax + rmin + rdelta k) / (max - min)`,
/// solving the weighted least-squares problem for scale and min for each, and keeps the
/// candidate with the smallest weighted error (absolute error when `use_mad`, else squared).
/// Returns `(scale, the_min)` and writes the levels.
#[allow(clippy::too_many_arguments)]
fn make_qkx2_quants(
    nmax: i32,
    x: &[f32],
    w: &[f32],
    levels: &mut [u8],
    rmin: f32,
    rdelta: f32,
    nstep: i32,
    use_mad: bool,
) -> (f32, f32) {
    let n = x.len();
    debug_assert!((1..=32).contains(&n) && w.len() == n && levels.len() == n);
    let mut min = x[0];
    let mut max = x[0];
    let mut sum_w = w[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        sum_w += w[i];
        sum_x += w[i] * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        levels.fill(0);
        return (0.0, -min);
    }
    let nmax_f = nmax as f32;
    let quant = |iscale: f32, v: f32, min: f32| nearest_int(iscale * (v - min)).clamp(0, nmax);
    let err = |d: f32| if use_mad { d.abs() } else { d * d };

    let iscale = nmax_f / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0.0f32;
    for i in 0..n {
        let l = quant(iscale, x[i], min);
        levels[i] = l as u8;
        best_error += w[i] * err(scale * l as f32 + min - x[i]);
    }

    let mut aux = [0u8; 32];
    let aux = &mut aux[..n];
    for step in 0..=nstep {
        let iscale = (rmin + rdelta * step as f32 + nmax_f) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0.0f32, 0.0f32, 0.0f32);
        for i in 0..n {
            let l = quant(iscale, x[i], min);
            aux[i] = l as u8;
            let l = l as f32;
            sum_l += w[i] * l;
            sum_l2 += w[i] * l * l;
            sum_xl += w[i] * l * x[i];
        }
        let det = sum_w * sum_l2 - sum_l * sum_l;
        if det > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut cur_error = 0.0f32;
            for i in 0..n {
                cur_error += w[i] * err(this_scale * aux[i] as f32 + this_min - x[i]);
            }
            if cur_error < best_error {
                levels.copy_from_slice(aux);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// Packs 256 2-bit levels the way Q2_K and Q3_K store them: in each 128-element half,
/// byte `l` (of 32) holds elements `l`, `l + 32`, `l + 64`, `l + 96` in bits 0-1, 2-3, 4-5,
/// 6-7.
fn pack_2bit(levels: &[u8], qs: &mut [u8]) {
    for (lv, q) in levels.chunks_exact(128).zip(qs.chunks_exact_mut(32)) {
        for l in 0..32 {
            q[l] =
                (lv[l] & 3) | (lv[l + 32] & 3) << 2 | (lv[l + 64] & 3) << 4 | (lv[l + 96] & 3) << 6;
        }
    }
}

/// The 2-bit level of element `e` (0..256) in Q2_K/Q3_K `qs`.
#[inline]
fn level_2bit(qs: &[u8], e: usize) -> u8 {
    (qs[32 * (e / 128) + e % 32] >> (2 * ((e % 128) / 32))) & 3
}

/// Packs eight 6-bit scales and mins into the 12 bytes Q4_K and Q5_K use: bytes 0-3 hold
/// scales 0-3 (low 6 bits) and the top 2 bits of scales 4-7; bytes 4-7 the same for mins;
/// bytes 8-11 the low nibbles of scale (low) and min (high) 4-7.
fn pack_scale_min_k4(sc: &[u8; 8], m: &[u8; 8]) -> [u8; 12] {
    let mut out = [0u8; 12];
    for j in 0..4 {
        out[j] = (sc[j] & 63) | ((sc[j + 4] >> 4) << 6);
        out[j + 4] = (m[j] & 63) | ((m[j + 4] >> 4) << 6);
        out[j + 8] = (sc[j + 4] & 0x0f) | ((m[j + 4] & 0x0f) << 4);
    }
    out
}

/// Scale and min of sub-block `j` (0..8) from the 12 packed bytes (ggml's `get_scale_min_k4`).
#[inline]
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

#[cfg(test)]
pub(crate) mod testutil {
    //! Shared helpers for the per-type unit tests.
    use super::QK_K;
    use crate::{dequantize_row, quantize_row, GgmlType};

    /// xorshift64* stream of uniform values in [-1, 1).
    pub struct Rng(u64);
    impl Rng {
        pub fn new(seed: u64) -> Self {
            Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
        }
        pub fn next_u64(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        pub fn uniform(&mut self) -> f32 {
            (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        }
        /// Approximately gaussian (sum of 4 uniforms, variance 1).
        pub fn gauss(&mut self) -> f32 {
            (self.uniform() + self.uniform() + self.uniform() + self.uniform()) * 0.866
        }
    }

    /// 64 super-blocks of varied, platform-independent data (integer RNG and exact f32
    /// arithmetic only): gaussian-like at several scales, outliers, one-signed, sparse,
    /// constant, all-zero and integer ramps.
    pub fn golden_input() -> Vec<f32> {
        let mut rng = Rng::new(2024);
        let mut x = Vec::with_capacity(64 * QK_K);
        let mut blocks = |n: usize, f: &mut dyn FnMut(&mut Rng, usize) -> f32| {
            for i in 0..n * QK_K {
                x.push(f(&mut rng, i));
            }
        };
        blocks(16, &mut |r, _| r.gauss());
        blocks(8, &mut |r, _| r.gauss() * 0.001);
        blocks(8, &mut |r, i| {
            r.gauss() * if i % 61 == 0 { 25.0 } else { 1.0 }
        });
        blocks(8, &mut |r, _| r.gauss().abs() + 0.1);
        blocks(8, &mut |r, _| {
            if r.next_u64() % 5 == 0 {
                r.gauss()
            } else {
                0.0
            }
        });
        blocks(8, &mut |r, _| r.gauss() * 1000.0);
        blocks(1, &mut |_, _| 0.0);
        blocks(1, &mut |_, _| 0.37);
        blocks(1, &mut |_, _| -2.0);
        blocks(1, &mut |_, i| (i % 7) as f32 - 3.0);
        blocks(4, &mut |r, _| -(r.gauss().abs() + 0.5));
        x
    }

    /// FNV-1a, 64-bit.
    pub fn fnv1a(bytes: &[u8]) -> u64 {
        bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
        })
    }

    pub fn round_trip(ty: GgmlType, x: &[f32]) -> (Vec<u8>, Vec<f32>) {
        let mut q = vec![0u8; ty.bytes_for(x.len() as u64).unwrap() as usize];
        quantize_row(ty, x, &mut q).unwrap();
        let mut y = vec![0f32; x.len()];
        dequantize_row(ty, &q, &mut y).unwrap();
        (q, y)
    }

    pub fn rms(x: &[f32]) -> f32 {
        (x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32).sqrt()
    }

    pub fn rmse(x: &[f32], y: &[f32]) -> f32 {
        let s: f32 = x.iter().zip(y).map(|(a, b)| (a - b) * (a - b)).sum();
        (s / x.len() as f32).sqrt()
    }

    /// Common edge cases every K-quant must survive: `max_rel` bounds rmse / rms for
    /// gaussian data; the other cases check exactness or finiteness.
    pub fn check_common_cases(ty: GgmlType, max_rel: f32) {
        let mut rng = Rng::new(ty.id() as u64);
        // Gaussian rows of several scales (kept inside f16's normal range for the super-block
        // scale; below it the f16 scale itself loses precision, as in ggml).
        for scale in [0.05f32, 1.0, 100.0, 1e4] {
            let x: Vec<f32> = (0..4 * QK_K).map(|_| rng.gauss() * scale).collect();
            let (_, y) = round_trip(ty, &x);
            assert!(y.iter().all(|v| v.is_finite()), "{ty}: x{scale} not finite");
            let rel = rmse(&x, &y) / rms(&x);
            assert!(
                rel < max_rel,
                "{ty}: gaussian x{scale}: relative rmse {rel}"
            );
        }
        // All zero.
        let (q, y) = round_trip(ty, &[0.0; QK_K]);
        assert!(y.iter().all(|v| *v == 0.0), "{ty}: zero block");
        let (q2, _) = round_trip(ty, &[0.0; QK_K]);
        assert_eq!(q, q2, "{ty}: deterministic");
        // Constant blocks (positive and negative): error small relative to the value.
        for c in [1.0f32, -1.0, 0.37, -1234.5] {
            let x = vec![c; QK_K];
            let (_, y) = round_trip(ty, &x);
            for v in &y {
                assert!((v - c).abs() <= c.abs() * 0.07, "{ty}: constant {c} -> {v}");
            }
        }
        // Negative-only and positive-only data.
        for sign in [-1.0f32, 1.0] {
            let x: Vec<f32> = (0..QK_K)
                .map(|_| sign * (0.5 + rng.uniform().abs()))
                .collect();
            let (_, y) = round_trip(ty, &x);
            let rel = rmse(&x, &y) / rms(&x);
            assert!(
                rel < max_rel,
                "{ty}: one-signed {sign}: relative rmse {rel}"
            );
        }
        // Small enough for the f16 super-block scale to be subnormal: still finite and sane.
        let x: Vec<f32> = (0..QK_K).map(|_| rng.gauss() * 1e-6).collect();
        let (_, y) = round_trip(ty, &x);
        assert!(y.iter().all(|v| v.is_finite()), "{ty}: x1e-6 not finite");
        // (With both f16 scales subnormal or zero the error can exceed the signal; ggml too.)
        assert!(
            rmse(&x, &y) < 4.0 * rms(&x),
            "{ty}: x1e-6 {} {}",
            rmse(&x, &y),
            rms(&x)
        );
        // Far below f16's range: decodes to (near) zero, never NaN.
        let x: Vec<f32> = (0..QK_K).map(|_| rng.gauss() * 1e-20).collect();
        let (_, y) = round_trip(ty, &x);
        assert!(y.iter().all(|v| v.abs() <= 1e-18), "{ty}: tiny");
        // A single outlier in an otherwise small block.
        let mut x: Vec<f32> = (0..QK_K).map(|_| rng.gauss() * 0.01).collect();
        x[77] = 50.0;
        let (_, y) = round_trip(ty, &x);
        assert!(
            (y[77] - 50.0).abs() < 50.0 * 0.07,
            "{ty}: outlier -> {}",
            y[77]
        );
        // Non-finite input must not panic.
        let mut x: Vec<f32> = (0..QK_K).map(|_| rng.gauss()).collect();
        x[3] = f32::NAN;
        x[9] = f32::INFINITY;
        let _ = round_trip(ty, &x);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_int_rounds_half_to_even() {
        assert_eq!(nearest_int(0.5), 0);
        assert_eq!(nearest_int(1.5), 2);
        assert_eq!(nearest_int(2.5), 2);
        assert_eq!(nearest_int(-0.5), 0);
        assert_eq!(nearest_int(-1.5), -2);
        assert_eq!(nearest_int(-2.49), -2);
        assert_eq!(nearest_int(4194303.0), 4194303);
        assert_eq!(nearest_int(f32::NAN), 0);
        assert_eq!(nearest_int(f32::INFINITY), i32::MAX);
    }

    #[test]
    fn scale_min_k4_packing_round_trips() {
        let sc = [0u8, 63, 17, 42, 1, 62, 33, 16];
        let m = [63u8, 0, 5, 31, 32, 15, 48, 7];
        let packed = pack_scale_min_k4(&sc, &m);
        for j in 0..8 {
            assert_eq!(scale_min_k4(j, &packed), (sc[j], m[j]), "sub-block {j}");
        }
    }

    #[test]
    fn two_bit_packing_round_trips() {
        let levels: Vec<u8> = (0..QK_K).map(|i| ((i * 7 + i / 5) % 4) as u8).collect();
        let mut qs = [0u8; 64];
        pack_2bit(&levels, &mut qs);
        for (e, &l) in levels.iter().enumerate() {
            assert_eq!(level_2bit(&qs, e), l, "element {e}");
        }
    }

    #[test]
    fn make_qx_quants_fits_exact_grids() {
        // Values exactly on a grid of step 0.5 with levels -4..=3 are reproduced.
        let x: Vec<f32> = (0..16).map(|i| 0.5 * ((i % 8) as f32 - 4.0)).collect();
        let w: Vec<f32> = x.iter().map(|v| v * v).collect();
        let mut l = [0u8; 16];
        let scale = make_qx_quants(4, &x, &w, &mut l);
        for (v, q) in x.iter().zip(&l) {
            assert_eq!(scale * (*q as f32 - 4.0), *v);
        }
    }

    #[test]
    fn make_qkx2_quants_fits_affine_grids() {
        // x = 0.25 * l - 1 with l covering 0..=15 is an exact Q4 grid with min 1.
        let x: Vec<f32> = (0..32).map(|i| 0.25 * (i % 16) as f32 - 1.0).collect();
        let w = vec![1.0f32; 32];
        let mut l = [0u8; 32];
        let (scale, min) = make_qkx2_quants(15, &x, &w, &mut l, -1.0, 0.1, 20, false);
        for (v, q) in x.iter().zip(&l) {
            assert!((scale * *q as f32 - min - v).abs() < 1e-6, "{v}");
        }
    }

    /// Hashes of what ggml's own C reference quantizers (`quantize_row_q*_K_ref` from
    /// ggml-org/ggml at d99724f, built with -O2 -ffp-contract=off on x86-64) produce for
    /// [`testutil::golden_input`]. Our encoders must reproduce them byte for byte. (gguf-py
    /// has no K-quant quantizers, so this is the only byte-level check for them.)
    #[test]
    fn quantizers_match_ggml_reference_bytes() {
        use crate::{quantize_row, GgmlType};
        let x = testutil::golden_input();
        let expected = [
            (GgmlType::Q2_K, 0x571b_c410_09f7_00df_u64),
            (GgmlType::Q3_K, 0xb282_6840_cb96_658f),
            (GgmlType::Q4_K, 0x4251_45b3_84cc_27ce),
            (GgmlType::Q5_K, 0xb5db_5760_8b9a_0766),
            (GgmlType::Q6_K, 0xe843_0728_7d03_d88d),
        ];
        for (ty, hash) in expected {
            let mut q = vec![0u8; ty.bytes_for(x.len() as u64).unwrap() as usize];
            quantize_row(ty, &x, &mut q).unwrap();
            assert_eq!(
                testutil::fnv1a(&q),
                hash,
                "{ty}: bytes differ from ggml's reference quantizer"
            );
        }
    }
}
