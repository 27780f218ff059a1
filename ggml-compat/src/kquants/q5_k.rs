//! Q5_K: 5-bit levels, 8 sub-blocks of 32 with 6-bit scales and mins, f16 `d` and `dmin`.
//!
//! Layout (176 bytes): `d: f16`, `dmin: f16`, `scales[12]` (as Q4_K), `qh[32]`, `qs[128]`.
//! The low 4 bits are stored exactly like Q4_K's `qs`; bit 4 of element `32 s + l`
//! (sub-block `s`) is bit `s` of `qh[l]`. Element value: `d * sc * q - dmin * m`.

use super::q4_k::quantize_scales_mins;
use super::scale_min_k4;
use crate::float::{read_f16, write_f16};
use crate::QK_K;

const BLOCK: usize = 176;
const D: usize = 0;
const DMIN: usize = 2;
const SCALES: usize = 4;
const QH: usize = 16;
const QS: usize = 48;

/// Decodes Q5_K super-blocks.
pub fn dequantize_q5_k(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(BLOCK).zip(dst.chunks_exact_mut(QK_K)) {
        let d = read_f16(&b[D..]);
        let dmin = read_f16(&b[DMIN..]);
        let scales = &b[SCALES..QH];
        let qh = &b[QH..QS];
        for (c, (q, y)) in b[QS..]
            .chunks_exact(32)
            .zip(y.chunks_exact_mut(64))
            .enumerate()
        {
            let (sc1, m1) = scale_min_k4(2 * c, scales);
            let (sc2, m2) = scale_min_k4(2 * c + 1, scales);
            let (d1, m1) = (d * f32::from(sc1), dmin * f32::from(m1));
            let (d2, m2) = (d * f32::from(sc2), dmin * f32::from(m2));
            let (u1, u2) = (1u8 << (2 * c), 2u8 << (2 * c));
            for l in 0..32 {
                let h1 = if qh[l] & u1 != 0 { 16 } else { 0 };
                let h2 = if qh[l] & u2 != 0 { 16 } else { 0 };
                y[l] = d1 * f32::from((q[l] & 0x0f) + h1) - m1;
                y[l + 32] = d2 * f32::from((q[l] >> 4) + h2) - m2;
            }
        }
    }
}

/// Encodes Q5_K super-blocks with ggml's reference algorithm (`quantize_row_q5_K_ref`).
pub fn quantize_q5_k(src: &[f32], dst: &mut [u8]) {
    let mut levels = [0u8; QK_K];
    for (x, b) in src.chunks_exact(QK_K).zip(dst.chunks_exact_mut(BLOCK)) {
        let (scales, d, dmin) = quantize_scales_mins(x, 31, -0.5, 15, &mut levels);
        write_f16(&mut b[D..], d);
        write_f16(&mut b[DMIN..], dmin);
        b[SCALES..QH].copy_from_slice(&scales);
        let (head, qs) = b.split_at_mut(QS);
        let qh = &mut head[QH..];
        qh.fill(0);
        for (c, (q, lv)) in qs
            .chunks_exact_mut(32)
            .zip(levels.chunks_exact(64))
            .enumerate()
        {
            for l in 0..32 {
                let (lo, hi) = (lv[l], lv[l + 32]);
                qh[l] |= ((lo >> 4) & 1) << (2 * c) | ((hi >> 4) & 1) << (2 * c + 1);
                q[l] = (lo & 0x0f) | ((hi & 0x0f) << 4);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kquants::pack_scale_min_k4;
    use crate::kquants::testutil::check_common_cases;
    use crate::GgmlType;

    #[test]
    fn common_cases() {
        check_common_cases(GgmlType::Q5_K, 0.06);
    }

    #[test]
    fn hand_made_block_layout() {
        // d = 0.25, dmin = 2, sub-block j has scale 8 - j and min j; q = element % 32.
        let mut b = vec![0u8; BLOCK];
        b[0..2].copy_from_slice(&half::f16::from_f32(0.25).to_le_bytes());
        b[2..4].copy_from_slice(&half::f16::from_f32(2.0).to_le_bytes());
        let sc: [u8; 8] = std::array::from_fn(|j| 8 - j as u8);
        let m: [u8; 8] = std::array::from_fn(|j| j as u8);
        b[4..16].copy_from_slice(&pack_scale_min_k4(&sc, &m));
        for e in 0..QK_K {
            let q = (e % 32) as u8;
            let (c, half, l) = (e / 64, (e % 64) / 32, e % 32);
            b[QS + 32 * c + l] |= (q & 0x0f) << (4 * half);
            b[QH + l] |= (q >> 4) << (e / 32);
        }
        let mut y = vec![0f32; QK_K];
        dequantize_q5_k(&b, &mut y);
        for (e, v) in y.iter().enumerate() {
            let j = e / 32;
            let expect = 0.25 * (8 - j) as f32 * (e % 32) as f32 - 2.0 * j as f32;
            assert_eq!(*v, expect, "element {e}");
        }
    }
}
