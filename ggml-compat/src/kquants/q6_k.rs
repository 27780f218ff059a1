//! Q6_K: 6-bit signed levels, 16 sub-blocks of 16 with signed 8-bit scales, f16 `d`.
//!
//! Layout (210 bytes): `ql[128]`, `qh[64]`, `scales[16]: i8`, `d: f16`. In each 128-element
//! half `h`, with `ql = ql[64h..]`, `qh = qh[32h..]` and `l` in 0..32, the 6-bit levels are
//! element `128h + l`: low nibble of `ql[l]`, bits 0-1 of `qh[l]`;
//! `+32`: low nibble of `ql[l + 32]`, bits 2-3; `+64`: high nibble of `ql[l]`, bits 4-5;
//! `+96`: high nibble of `ql[l + 32]`, bits 6-7. Element value: `d * scale * (q - 32)` with
//! the scale of sub-block `element / 16`.

use super::{make_qx_quants, nearest_int, GROUP_MAX_EPS};
use crate::float::{read_f16, round_f16, write_f16};
use crate::QK_K;

const BLOCK: usize = 210;
const QL: usize = 0;
const QH: usize = 128;
const SCALES: usize = 192;
const D: usize = 208;

/// Decodes Q6_K super-blocks.
pub fn dequantize_q6_k(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(BLOCK).zip(dst.chunks_exact_mut(QK_K)) {
        let d = read_f16(&b[D..]);
        let scales = &b[SCALES..D];
        for h in 0..2 {
            let ql = &b[QL + 64 * h..QL + 64 * h + 64];
            let qh = &b[QH + 32 * h..QH + 32 * h + 32];
            let y = &mut y[128 * h..128 * h + 128];
            for l in 0..32 {
                let q = [
                    (ql[l] & 0x0f) | ((qh[l] & 3) << 4),
                    (ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4),
                    (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4),
                    (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4),
                ];
                for (k, &q) in q.iter().enumerate() {
                    let e = 32 * k + l;
                    let sc = scales[8 * h + e / 16] as i8;
                    y[e] = d * f32::from(sc) * f32::from(q as i8 - 32);
                }
            }
        }
    }
}

/// Encodes Q6_K super-blocks with ggml's reference algorithm (`quantize_row_q6_K_ref`).
pub fn quantize_q6_k(src: &[f32], dst: &mut [u8]) {
    let mut levels = [0u8; QK_K];
    let mut weights = [0f32; 16];
    for (x, b) in src.chunks_exact(QK_K).zip(dst.chunks_exact_mut(BLOCK)) {
        let mut scales = [0f32; 16];
        let mut max_scale = 0f32;
        let mut max_abs_scale = 0f32;
        for (j, (xs, lv)) in x
            .chunks_exact(16)
            .zip(levels.chunks_exact_mut(16))
            .enumerate()
        {
            for (w, v) in weights.iter_mut().zip(xs) {
                *w = v * v;
            }
            scales[j] = make_qx_quants(32, xs, &weights, lv);
            if scales[j].abs() > max_abs_scale {
                max_abs_scale = scales[j].abs();
                max_scale = scales[j];
            }
        }

        if max_abs_scale < GROUP_MAX_EPS {
            b.fill(0);
            continue;
        }

        let iscale = -128.0 / max_scale;
        let d = 1.0 / iscale;
        write_f16(&mut b[D..], d);
        let sc: [i8; 16] =
            std::array::from_fn(|j| nearest_int(iscale * scales[j]).clamp(-128, 127) as i8);
        for (o, s) in b[SCALES..D].iter_mut().zip(&sc) {
            *o = *s as u8;
        }

        let df = round_f16(d);
        for (j, (xs, lv)) in x
            .chunks_exact(16)
            .zip(levels.chunks_exact_mut(16))
            .enumerate()
        {
            let dj = df * f32::from(sc[j]);
            if dj == 0.0 {
                continue;
            }
            for (l, &v) in lv.iter_mut().zip(xs) {
                *l = (nearest_int(v / dj).clamp(-32, 31) + 32) as u8;
            }
        }

        for h in 0..2 {
            let lv = &levels[128 * h..128 * h + 128];
            for l in 0..32 {
                let (q1, q2, q3, q4) = (lv[l], lv[l + 32], lv[l + 64], lv[l + 96]);
                b[QL + 64 * h + l] = (q1 & 0x0f) | ((q3 & 0x0f) << 4);
                b[QL + 64 * h + l + 32] = (q2 & 0x0f) | ((q4 & 0x0f) << 4);
                b[QH + 32 * h + l] =
                    (q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6);
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
        check_common_cases(GgmlType::Q6_K, 0.03);
    }

    #[test]
    fn hand_made_block_layout() {
        // d = 0.5, sub-block j has scale j - 8; level of element e is e % 64.
        let mut b = vec![0u8; BLOCK];
        b[D..].copy_from_slice(&half::f16::from_f32(0.5).to_le_bytes());
        for j in 0..16 {
            b[SCALES + j] = (j as i8 - 8) as u8;
        }
        for e in 0..QK_K {
            let q = (e % 64) as u8;
            let (h, k, l) = (e / 128, (e % 128) / 32, e % 32);
            let ql = QL + 64 * h + l + 32 * (k % 2);
            b[ql] |= (q & 0x0f) << (4 * (k / 2));
            b[QH + 32 * h + l] |= (q >> 4) << (2 * k);
        }
        let mut y = vec![0f32; QK_K];
        dequantize_q6_k(&b, &mut y);
        for (e, v) in y.iter().enumerate() {
            let expect = 0.5 * (e as i32 / 16 - 8) as f32 * ((e % 64) as i32 - 32) as f32;
            assert_eq!(*v, expect, "element {e}");
        }
    }

    #[test]
    fn all_zero_block_is_zero_bytes() {
        let mut b = vec![0xffu8; BLOCK];
        quantize_q6_k(&[0.0; QK_K], &mut b);
        assert!(b.iter().all(|v| *v == 0));
    }
}
