//! Q3_K: 3-bit signed levels, 16 sub-blocks of 16 with 6-bit signed scales, f16 `d`.
//!
//! Layout (110 bytes): `hmask[32]`, `qs[64]`, `scales[12]`, `d: f16`.
//! - The low 2 bits of each level are packed like Q2_K (see [`super::pack_2bit`]); bit 2 of
//!   element `e` is bit `e / 32` of `hmask[e % 32]`. The stored 3-bit value `q` in 0..8 means
//!   level `q - 4` (so a *clear* hmask bit subtracts 4).
//! - Scale `s` (0..16, biased by 32) has its low nibble in `scales[s]` (s < 8, low nibble) or
//!   `scales[s - 8]` (high nibble), and its top 2 bits at bit `2 (s / 4)` of `scales[8 + s % 4]`.
//!
//! Element value: `d * (scale - 32) * (q - 4)`.

use super::{level_2bit, nearest_int, pack_2bit, signed_absmax, GROUP_MAX_EPS};
use crate::float::{read_f16, write_f16};
use crate::QK_K;

const BLOCK: usize = 110;
const HMASK: usize = 0;
const QS: usize = 32;
const SCALES: usize = 96;
const D: usize = 108;

/// The 6-bit scale of sub-block `s`, unbiased (-32..32).
#[inline]
fn scale(scales: &[u8], s: usize) -> i8 {
    let low = if s < 8 {
        scales[s] & 0x0f
    } else {
        scales[s - 8] >> 4
    };
    let high = (scales[8 + s % 4] >> (2 * (s / 4))) & 3;
    (low | (high << 4)) as i8 - 32
}

/// Packs sixteen biased 6-bit scales (0..64) into 12 bytes.
fn pack_scales(ls: &[u8; 16]) -> [u8; 12] {
    let mut out = [0u8; 12];
    for (s, &l) in ls.iter().enumerate() {
        if s < 8 {
            out[s] |= l & 0x0f;
        } else {
            out[s - 8] |= (l & 0x0f) << 4;
        }
        out[8 + s % 4] |= (l >> 4) << (2 * (s / 4));
    }
    out
}

/// Decodes Q3_K super-blocks.
pub fn dequantize_q3_k(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(BLOCK).zip(dst.chunks_exact_mut(QK_K)) {
        let d = read_f16(&b[D..]);
        let hmask = &b[HMASK..QS];
        let qs = &b[QS..SCALES];
        let scales = &b[SCALES..D];
        for (s, y) in y.chunks_exact_mut(16).enumerate() {
            let dl = d * f32::from(scale(scales, s));
            for (i, y) in y.iter_mut().enumerate() {
                let e = 16 * s + i;
                let high = (hmask[e % 32] >> (e / 32)) & 1;
                let q = level_2bit(qs, e) as i8 - if high != 0 { 0 } else { 4 };
                *y = dl * f32::from(q);
            }
        }
    }
}

/// ggml's `make_q3_quants` with `do_rmse`: levels `-nmax..nmax` for one group, refined by
/// coordinate descent on the `x^2`-weighted squared error. Writes `level + nmax`, returns the
/// scale.
fn make_q3_quants(nmax: i32, x: &[f32], out: &mut [u8]) -> f32 {
    let max = signed_absmax(x);
    if max.abs() < GROUP_MAX_EPS {
        out.fill(0);
        return 0.0;
    }
    let iscale = -(nmax as f32) / max;
    let clamp = |l: i32| l.clamp(-nmax, nmax - 1);
    let mut levels = [0i32; 16];
    let levels = &mut levels[..x.len()];
    let (mut sumlx, mut suml2) = (0.0f32, 0.0f32);
    for (l, &v) in levels.iter_mut().zip(x) {
        *l = clamp(nearest_int(iscale * v));
        let w = v * v;
        sumlx += w * v * *l as f32;
        suml2 += w * *l as f32 * *l as f32;
    }
    for _ in 0..5 {
        let mut changed = false;
        for (l, &v) in levels.iter_mut().zip(x) {
            let w = v * v;
            let lf = *l as f32;
            let mut slx = sumlx - w * v * lf;
            if slx > 0.0 {
                let mut sl2 = suml2 - w * lf * lf;
                let new_l = clamp(nearest_int(v * sl2 / slx));
                if new_l != *l {
                    let nf = new_l as f32;
                    slx += w * v * nf;
                    sl2 += w * nf * nf;
                    if sl2 > 0.0 && slx * slx * suml2 > sumlx * sumlx * sl2 {
                        *l = new_l;
                        sumlx = slx;
                        suml2 = sl2;
                        changed = true;
                    }
                }
            }
        }
        if !changed {
            break;
        }
    }
    for (o, &l) in out.iter_mut().zip(levels.iter()) {
        *o = (l + nmax) as u8;
    }
    if suml2 > 0.0 {
        sumlx / suml2
    } else {
        0.0
    }
}

/// Encodes Q3_K super-blocks with ggml's reference algorithm (`quantize_row_q3_K_ref`).
pub fn quantize_q3_k(src: &[f32], dst: &mut [u8]) {
    let mut levels = [0u8; QK_K];
    for (x, b) in src.chunks_exact(QK_K).zip(dst.chunks_exact_mut(BLOCK)) {
        let mut scales = [0f32; 16];
        let mut max_scale = 0f32;
        let mut amax = 0f32;
        for (j, (xs, lv)) in x
            .chunks_exact(16)
            .zip(levels.chunks_exact_mut(16))
            .enumerate()
        {
            scales[j] = make_q3_quants(4, xs, lv);
            if scales[j].abs() > amax {
                amax = scales[j].abs();
                max_scale = scales[j];
            }
        }

        let packed = if max_scale != 0.0 {
            let iscale = -32.0 / max_scale;
            let ls: [u8; 16] = std::array::from_fn(|j| {
                (nearest_int(iscale * scales[j]).clamp(-32, 31) + 32) as u8
            });
            write_f16(&mut b[D..], 1.0 / iscale);
            pack_scales(&ls)
        } else {
            write_f16(&mut b[D..], 0.0);
            [0u8; 12]
        };
        b[SCALES..D].copy_from_slice(&packed);

        // Requantize against the scales as they will be decoded.
        let df = read_f16(&b[D..]);
        for (j, (xs, lv)) in x
            .chunks_exact(16)
            .zip(levels.chunks_exact_mut(16))
            .enumerate()
        {
            let dj = df * f32::from(scale(&packed, j));
            if dj == 0.0 {
                continue;
            }
            for (l, &v) in lv.iter_mut().zip(xs) {
                *l = (nearest_int(v / dj).clamp(-4, 3) + 4) as u8;
            }
        }

        let (hmask, rest) = b.split_at_mut(QS);
        hmask.fill(0);
        for (e, l) in levels.iter_mut().enumerate() {
            if *l > 3 {
                hmask[e % 32] |= 1 << (e / 32);
                *l -= 4;
            }
        }
        pack_2bit(&levels, &mut rest[..SCALES - QS]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kquants::testutil::check_common_cases;
    use crate::GgmlType;

    #[test]
    fn common_cases() {
        check_common_cases(GgmlType::Q3_K, 0.25);
    }

    #[test]
    fn scale_packing_round_trips() {
        let ls: [u8; 16] = std::array::from_fn(|s| ((s * 37 + 5) % 64) as u8);
        let packed = pack_scales(&ls);
        for (s, &l) in ls.iter().enumerate() {
            assert_eq!(scale(&packed, s), l as i8 - 32, "scale {s}");
        }
    }

    #[test]
    fn hand_made_block_layout() {
        // d = 0.5; scale of sub-block s is s - 8 (biased s + 24); level (e / 5) % 8 - 4.
        let mut b = vec![0u8; BLOCK];
        b[D..].copy_from_slice(&half::f16::from_f32(0.5).to_le_bytes());
        let ls: [u8; 16] = std::array::from_fn(|s| s as u8 + 24);
        b[SCALES..D].copy_from_slice(&pack_scales(&ls));
        let q: Vec<u8> = (0..QK_K).map(|e| ((e / 5) % 8) as u8).collect();
        let low: Vec<u8> = q.iter().map(|v| v & 3).collect();
        pack_2bit(&low, &mut b[QS..SCALES]);
        for (e, v) in q.iter().enumerate() {
            b[HMASK + e % 32] |= (v >> 2) << (e / 32);
        }
        let mut y = vec![0f32; QK_K];
        dequantize_q3_k(&b, &mut y);
        for (e, v) in y.iter().enumerate() {
            let expect = 0.5 * (e as i32 / 16 - 8) as f32 * (q[e] as i32 - 4) as f32;
            assert_eq!(*v, expect, "element {e}");
        }
    }
}
