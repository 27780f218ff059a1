//! Q2_K: 2-bit levels, 16 sub-blocks of 16 with 4-bit scales and mins, f16 `d` and `dmin`.
//!
//! Layout (84 bytes): `scales[16]` (scale in the low nibble, min in the high nibble, one byte
//! per sub-block), `qs[64]` (2-bit levels, see [`super::pack_2bit`]), `d: f16`, `dmin: f16`.
//! Element value: `d * (sc & 15) * q - dmin * (sc >> 4)`.

use super::{level_2bit, make_qkx2_quants, nearest_int, pack_2bit};
use crate::float::{read_f16, write_f16};
use crate::QK_K;

const BLOCK: usize = 84;
const SCALES: usize = 0;
const QS: usize = 16;
const D: usize = 80;
const DMIN: usize = 82;

/// Decodes Q2_K super-blocks.
pub fn dequantize_q2_k(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(BLOCK).zip(dst.chunks_exact_mut(QK_K)) {
        let d = read_f16(&b[D..]);
        let dmin = read_f16(&b[DMIN..]);
        let qs = &b[QS..D];
        for (j, y) in y.chunks_exact_mut(16).enumerate() {
            let sc = b[SCALES + j];
            let dl = d * f32::from(sc & 0x0f);
            let ml = dmin * f32::from(sc >> 4);
            for (i, y) in y.iter_mut().enumerate() {
                *y = dl * f32::from(level_2bit(qs, 16 * j + i)) - ml;
            }
        }
    }
}

/// Encodes Q2_K super-blocks with ggml's reference algorithm (`quantize_row_q2_K_ref`).
pub fn quantize_q2_k(src: &[f32], dst: &mut [u8]) {
    const Q4SCALE: f32 = 15.0;
    let mut levels = [0u8; QK_K];
    let mut weights = [0f32; 16];
    for (x, b) in src.chunks_exact(QK_K).zip(dst.chunks_exact_mut(BLOCK)) {
        let mut scales = [0f32; 16];
        let mut mins = [0f32; 16];
        let mut max_scale = 0f32;
        let mut max_min = 0f32;
        for (j, (xs, lv)) in x
            .chunks_exact(16)
            .zip(levels.chunks_exact_mut(16))
            .enumerate()
        {
            for (w, v) in weights.iter_mut().zip(xs) {
                *w = v.abs();
            }
            (scales[j], mins[j]) = make_qkx2_quants(3, xs, &weights, lv, -0.5, 0.1, 15, true);
            if scales[j] > max_scale {
                max_scale = scales[j];
            }
            if mins[j] > max_min {
                max_min = mins[j];
            }
        }

        // One byte per sub-block: 4-bit scale | 4-bit min << 4 (ggml keeps the low 8 bits).
        let mut packed = [0u8; 16];
        if max_scale > 0.0 {
            let iscale = Q4SCALE / max_scale;
            for (p, s) in packed.iter_mut().zip(&scales) {
                *p = nearest_int(iscale * s) as u8;
            }
            write_f16(&mut b[D..], max_scale / Q4SCALE);
        } else {
            write_f16(&mut b[D..], 0.0);
        }
        if max_min > 0.0 {
            let iscale = Q4SCALE / max_min;
            for (p, m) in packed.iter_mut().zip(&mins) {
                *p |= (nearest_int(iscale * m) << 4) as u8;
            }
            write_f16(&mut b[DMIN..], max_min / Q4SCALE);
        } else {
            write_f16(&mut b[DMIN..], 0.0);
        }
        b[SCALES..QS].copy_from_slice(&packed);

        // Requantize against the scales as they will be decoded.
        let df = read_f16(&b[D..]);
        let dminf = read_f16(&b[DMIN..]);
        for (j, (xs, lv)) in x
            .chunks_exact(16)
            .zip(levels.chunks_exact_mut(16))
            .enumerate()
        {
            let dj = df * f32::from(packed[j] & 0x0f);
            if dj == 0.0 {
                continue;
            }
            let mj = dminf * f32::from(packed[j] >> 4);
            for (l, &v) in lv.iter_mut().zip(xs) {
                *l = nearest_int((v + mj) / dj).clamp(0, 3) as u8;
            }
        }
        pack_2bit(&levels, &mut b[QS..D]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kquants::testutil::check_common_cases;
    use crate::GgmlType;

    #[test]
    fn common_cases() {
        check_common_cases(GgmlType::Q2_K, 0.45);
    }

    #[test]
    fn hand_made_block_layout() {
        // d = 0.5, dmin = 0.25; sub-block j: scale j % 16, min 15 - j; level (e / 3) % 4.
        let mut b = vec![0u8; BLOCK];
        b[D..D + 2].copy_from_slice(&half::f16::from_f32(0.5).to_le_bytes());
        b[DMIN..].copy_from_slice(&half::f16::from_f32(0.25).to_le_bytes());
        for j in 0..16 {
            b[SCALES + j] = (j as u8) | ((15 - j as u8) << 4);
        }
        let levels: Vec<u8> = (0..QK_K).map(|e| ((e / 3) % 4) as u8).collect();
        pack_2bit(&levels, &mut b[QS..D]);
        let mut y = vec![0f32; QK_K];
        dequantize_q2_k(&b, &mut y);
        for (e, v) in y.iter().enumerate() {
            let j = e / 16;
            let expect = 0.5 * j as f32 * levels[e] as f32 - 0.25 * (15 - j) as f32;
            assert_eq!(*v, expect, "element {e}");
        }
    }
}
