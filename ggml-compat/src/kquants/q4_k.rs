//! Q4_K: 4-bit levels, 8 sub-blocks of 32 with 6-bit scales and mins, f16 `d` and `dmin`.
//!
//! Layout (144 bytes): `d: f16`, `dmin: f16`, `scales[12]` (see
//! [`super::pack_scale_min_k4`]), `qs[128]`. In each 64-element chunk `c`, byte `l` of
//! `qs[32c..32c+32]` holds element `64c + l` (low nibble, sub-block `2c`) and `64c + 32 + l`
//! (high nibble, sub-block `2c + 1`). Element value: `d * sc * q - dmin * m`.

use super::{make_qkx2_quants, nearest_int, pack_scale_min_k4, scale_min_k4};
use crate::float::{read_f16, round_f16, write_f16};
use crate::QK_K;

const BLOCK: usize = 144;
const D: usize = 0;
const DMIN: usize = 2;
const SCALES: usize = 4;
const QS: usize = 16;

/// Decodes Q4_K super-blocks.
pub fn dequantize_q4_k(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(BLOCK).zip(dst.chunks_exact_mut(QK_K)) {
        let d = read_f16(&b[D..]);
        let dmin = read_f16(&b[DMIN..]);
        let scales = &b[SCALES..QS];
        for (c, (q, y)) in b[QS..]
            .chunks_exact(32)
            .zip(y.chunks_exact_mut(64))
            .enumerate()
        {
            let (sc1, m1) = scale_min_k4(2 * c, scales);
            let (sc2, m2) = scale_min_k4(2 * c + 1, scales);
            let (d1, m1) = (d * f32::from(sc1), dmin * f32::from(m1));
            let (d2, m2) = (d * f32::from(sc2), dmin * f32::from(m2));
            for l in 0..32 {
                y[l] = d1 * f32::from(q[l] & 0x0f) - m1;
                y[l + 32] = d2 * f32::from(q[l] >> 4) - m2;
            }
        }
    }
}

/// Scale search shared by Q4_K and Q5_K (`quantize_row_q4_K_ref` / `_q5_K_ref`): returns the
/// 12 packed scale bytes, `d`, `dmin`, and the final levels (`0..=nmax`) of all 256 elements.
pub(super) fn quantize_scales_mins(
    x: &[f32],
    nmax: i32,
    rmin: f32,
    nstep: i32,
    levels: &mut [u8; QK_K],
) -> ([u8; 12], f32, f32) {
    let mut scales = [0f32; 8];
    let mut mins = [0f32; 8];
    let mut max_scale = 0f32;
    let mut max_min = 0f32;
    let mut weights = [0f32; 32];
    for (j, (xs, ls)) in x
        .chunks_exact(32)
        .zip(levels.chunks_exact_mut(32))
        .enumerate()
    {
        let sum_x2: f32 = xs.iter().fold(0.0, |s, v| s + v * v);
        let av_x = (sum_x2 / 32.0).sqrt();
        for (w, v) in weights.iter_mut().zip(xs) {
            *w = av_x + v.abs();
        }
        (scales[j], mins[j]) = make_qkx2_quants(nmax, xs, &weights, ls, rmin, 0.1, nstep, false);
        if scales[j] > max_scale {
            max_scale = scales[j];
        }
        if mins[j] > max_min {
            max_min = mins[j];
        }
    }

    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    // ggml stores nearest_int(..) in a u8 before clamping to 63.
    let six_bits = |v: f32| (nearest_int(v) as u8).min(63);
    let ls: [u8; 8] = std::array::from_fn(|j| six_bits(inv_scale * scales[j]));
    let lm: [u8; 8] = std::array::from_fn(|j| six_bits(inv_min * mins[j]));
    let packed = pack_scale_min_k4(&ls, &lm);
    let d = max_scale / 63.0;
    let dmin = max_min / 63.0;

    // Requantize against the scales as they will be decoded.
    let (df, dminf) = (round_f16(d), round_f16(dmin));
    for (j, (xs, lv)) in x
        .chunks_exact(32)
        .zip(levels.chunks_exact_mut(32))
        .enumerate()
    {
        let (sc, m) = scale_min_k4(j, &packed);
        let dj = df * f32::from(sc);
        if dj == 0.0 {
            continue;
        }
        let mj = dminf * f32::from(m);
        for (l, &v) in lv.iter_mut().zip(xs) {
            *l = nearest_int((v + mj) / dj).clamp(0, nmax) as u8;
        }
    }
    (packed, d, dmin)
}

/// Encodes Q4_K super-blocks with ggml's reference algorithm (`quantize_row_q4_K_ref`).
pub fn quantize_q4_k(src: &[f32], dst: &mut [u8]) {
    let mut levels = [0u8; QK_K];
    for (x, b) in src.chunks_exact(QK_K).zip(dst.chunks_exact_mut(BLOCK)) {
        let (scales, d, dmin) = quantize_scales_mins(x, 15, -1.0, 20, &mut levels);
        write_f16(&mut b[D..], d);
        write_f16(&mut b[DMIN..], dmin);
        b[SCALES..QS].copy_from_slice(&scales);
        for (q, lv) in b[QS..].chunks_exact_mut(32).zip(levels.chunks_exact(64)) {
            for l in 0..32 {
                q[l] = lv[l] | (lv[l + 32] << 4);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kquants::testutil::check_common_cases;
    use crate::GgmlType;

    #[test]
    fn common_cases() {
        check_common_cases(GgmlType::Q4_K, 0.12);
    }

    #[test]
    fn hand_made_block_layout() {
        // d = 1, dmin = 0.5, sub-block j has scale j + 1 and min 2j; q = element % 16.
        let mut b = vec![0u8; BLOCK];
        b[0..2].copy_from_slice(&half::f16::from_f32(1.0).to_le_bytes());
        b[2..4].copy_from_slice(&half::f16::from_f32(0.5).to_le_bytes());
        let sc: [u8; 8] = std::array::from_fn(|j| j as u8 + 1);
        let m: [u8; 8] = std::array::from_fn(|j| 2 * j as u8);
        b[4..16].copy_from_slice(&pack_scale_min_k4(&sc, &m));
        for c in 0..4 {
            for l in 0..32 {
                let lo = ((64 * c + l) % 16) as u8;
                let hi = ((64 * c + 32 + l) % 16) as u8;
                b[QS + 32 * c + l] = lo | (hi << 4);
            }
        }
        let mut y = vec![0f32; QK_K];
        dequantize_q4_k(&b, &mut y);
        for (e, v) in y.iter().enumerate() {
            let j = e / 32;
            let expect = (j + 1) as f32 * (e % 16) as f32 - 0.5 * (2 * j) as f32;
            assert_eq!(*v, expect, "element {e}");
        }
    }
}
