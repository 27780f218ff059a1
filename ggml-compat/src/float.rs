//! Plain float rows: F32, F16 (IEEE half) and BF16 (bfloat16), all little-endian.
//!
//! Owns the scalar float encodings and their exact rounding rules:
//! - F16 encoding rounds to nearest, ties to even (like numpy's `astype(np.float16)` and
//!   ggml's `GGML_FP32_TO_FP16`); NaN payloads are truncated the way numpy does it.
//! - BF16 encoding follows ggml's `ggml_compute_fp32_to_bf16` bit for bit (round to nearest
//!   even on the upper 16 bits, NaN forced quiet), which is also what gguf-py's
//!   `quants.BF16.quantize` computes.
//!
//! Callers ([`crate::dequantize_row`] / [`crate::quantize_row`]) check buffer sizes; these
//! functions process `min(src, dst)` elements.

use half::f16;

/// Decodes little-endian f32 values.
pub fn dequantize_f32(src: &[u8], dst: &mut [f32]) {
    for (d, s) in dst.iter_mut().zip(src.chunks_exact(4)) {
        *d = f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
    }
}

/// Encodes f32 values little-endian (a plain copy).
pub fn quantize_f32(src: &[f32], dst: &mut [u8]) {
    for (s, d) in src.iter().zip(dst.chunks_exact_mut(4)) {
        d.copy_from_slice(&s.to_le_bytes());
    }
}

/// Converts one f32 to IEEE half bits, rounding to nearest even.
///
/// Finite values and infinities go through `half` (correctly rounded, overflow to infinity,
/// gradual underflow). NaN is mapped like numpy's `npy_floatbits_to_halfbits`: sign kept,
/// the top 10 mantissa bits kept, and a payload that would become zero is set to 1 so the
/// result stays a NaN. (ggml itself canonicalises NaN differently depending on the CPU; no
/// model file should contain NaN weights.)
#[inline]
pub fn f32_to_f16_bits(x: f32) -> u16 {
    if x.is_nan() {
        let bits = x.to_bits();
        let sign = ((bits >> 16) & 0x8000) as u16;
        let payload = ((bits & 0x007f_ffff) >> 13) as u16;
        return sign | 0x7c00 | if payload == 0 { 1 } else { payload };
    }
    f16::from_f32(x).to_bits()
}

/// Converts IEEE half bits to f32 (exact). NaN payloads are carried over unchanged (shifted
/// into the top of the f32 mantissa, signalling NaNs stay signalling), as numpy does; `half`
/// alone would set the quiet bit.
#[inline]
pub fn f16_bits_to_f32(bits: u16) -> f32 {
    if bits & 0x7c00 == 0x7c00 && bits & 0x03ff != 0 {
        let sign = u32::from(bits & 0x8000) << 16;
        return f32::from_bits(sign | 0x7f80_0000 | (u32::from(bits & 0x03ff) << 13));
    }
    f16::from_bits(bits).to_f32()
}

/// Reads a little-endian f16 at `b[0..2]` as f32.
#[inline]
pub(crate) fn read_f16(b: &[u8]) -> f32 {
    f16_bits_to_f32(u16::from_le_bytes([b[0], b[1]]))
}

/// Writes `x` rounded to f16 at `b[0..2]`, little-endian.
#[inline]
pub(crate) fn write_f16(b: &mut [u8], x: f32) {
    b[..2].copy_from_slice(&f32_to_f16_bits(x).to_le_bytes());
}

/// `x` rounded through f16 and back, as ggml does with block scales before reusing them.
#[inline]
pub(crate) fn round_f16(x: f32) -> f32 {
    f16_bits_to_f32(f32_to_f16_bits(x))
}

/// Converts one f32 to bfloat16 bits exactly like ggml's `ggml_compute_fp32_to_bf16`:
/// NaN keeps its sign and upper mantissa bits and gets the quiet bit set; every other value
/// (infinities included) is rounded to nearest, ties to even, on the upper 16 bits.
#[inline]
pub fn f32_to_bf16_bits(x: f32) -> u16 {
    let u = x.to_bits();
    if (u & 0x7fff_ffff) > 0x7f80_0000 {
        return ((u >> 16) | 0x40) as u16;
    }
    // Cannot overflow: the largest non-NaN pattern is 0xff80_0000.
    ((u + (0x7fff + ((u >> 16) & 1))) >> 16) as u16
}

/// Converts bfloat16 bits to f32 (exact: the bits become the upper half, NaN payloads
/// included).
#[inline]
pub fn bf16_bits_to_f32(bits: u16) -> f32 {
    f32::from_bits(u32::from(bits) << 16)
}

/// Decodes little-endian IEEE half values.
pub fn dequantize_f16(src: &[u8], dst: &mut [f32]) {
    for (d, s) in dst.iter_mut().zip(src.chunks_exact(2)) {
        *d = read_f16(s);
    }
}

/// Encodes f32 values as little-endian IEEE half, round to nearest even.
pub fn quantize_f16(src: &[f32], dst: &mut [u8]) {
    for (s, d) in src.iter().zip(dst.chunks_exact_mut(2)) {
        write_f16(d, *s);
    }
}

/// Decodes little-endian bfloat16 values.
pub fn dequantize_bf16(src: &[u8], dst: &mut [f32]) {
    for (d, s) in dst.iter_mut().zip(src.chunks_exact(2)) {
        *d = bf16_bits_to_f32(u16::from_le_bytes([s[0], s[1]]));
    }
}

/// Encodes f32 values as little-endian bfloat16 with ggml's rounding.
pub fn quantize_bf16(src: &[f32], dst: &mut [u8]) {
    for (s, d) in src.iter().zip(dst.chunks_exact_mut(2)) {
        d.copy_from_slice(&f32_to_bf16_bits(*s).to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f16_round_trip(xs: &[f32]) -> Vec<f32> {
        let mut bytes = vec![0u8; xs.len() * 2];
        quantize_f16(xs, &mut bytes);
        let mut out = vec![0f32; xs.len()];
        dequantize_f16(&bytes, &mut out);
        out
    }

    fn bf16_round_trip(xs: &[f32]) -> Vec<f32> {
        let mut bytes = vec![0u8; xs.len() * 2];
        quantize_bf16(xs, &mut bytes);
        let mut out = vec![0f32; xs.len()];
        dequantize_bf16(&bytes, &mut out);
        out
    }

    #[test]
    fn f32_is_a_copy() {
        let xs = [
            0.0f32,
            -0.0,
            1.5,
            f32::MAX,
            f32::MIN_POSITIVE,
            f32::INFINITY,
        ];
        let mut bytes = [0u8; 24];
        quantize_f32(&xs, &mut bytes);
        let mut out = [0f32; 6];
        dequantize_f32(&bytes, &mut out);
        for (a, b) in xs.iter().zip(&out) {
            assert_eq!(a.to_bits(), b.to_bits());
        }
    }

    #[test]
    fn f16_exact_values_survive() {
        let xs = [
            0.0f32,
            -0.0,
            1.0,
            -2.5,
            65504.0,
            -65504.0,
            6.1035156e-5,
            5.9604645e-8,
        ];
        let out = f16_round_trip(&xs);
        for (a, b) in xs.iter().zip(&out) {
            assert_eq!(a.to_bits(), b.to_bits(), "{a}");
        }
    }

    #[test]
    fn f16_rounding_edges() {
        // 1 + 2^-11 is exactly half-way between 1 and 1 + 2^-10: ties to even (1.0).
        assert_eq!(f32_to_f16_bits(1.0 + 2f32.powi(-11)), 0x3c00);
        // 1 + 3*2^-11 is half-way between 1+2^-10 (odd) and 1+2^-9 (even): rounds up.
        assert_eq!(f32_to_f16_bits(1.0 + 3.0 * 2f32.powi(-11)), 0x3c02);
        // Overflow to infinity past the largest finite half, including the rounding boundary.
        assert_eq!(f32_to_f16_bits(65520.0), 0x7c00);
        assert_eq!(f32_to_f16_bits(65519.99), 0x7bff);
        assert_eq!(f32_to_f16_bits(-1e10), 0xfc00);
        assert_eq!(f32_to_f16_bits(f32::INFINITY), 0x7c00);
        // Underflow: below half the smallest subnormal goes to (signed) zero.
        assert_eq!(f32_to_f16_bits(2f32.powi(-26)), 0x0000);
        assert_eq!(f32_to_f16_bits(-1e-30), 0x8000);
        assert_eq!(f32_to_f16_bits(3.0 * 2f32.powi(-25)), 0x0002);
    }

    #[test]
    fn f16_nan_like_numpy() {
        assert_eq!(f32_to_f16_bits(f32::from_bits(0x7fc0_0000)), 0x7e00);
        assert_eq!(f32_to_f16_bits(f32::from_bits(0xffc0_0001)), 0xfe00);
        assert_eq!(f32_to_f16_bits(f32::from_bits(0x7f80_0001)), 0x7c01);
        assert_eq!(f32_to_f16_bits(f32::from_bits(0x7fbf_ffff)), 0x7dff);
        assert!(f16_round_trip(&[f32::NAN])[0].is_nan());
        // Decoding keeps payloads (signalling stays signalling), like numpy.
        assert_eq!(f16_bits_to_f32(0x7c01).to_bits(), 0x7f80_2000);
        assert_eq!(f16_bits_to_f32(0xfe00).to_bits(), 0xffc0_0000);
        assert_eq!(f16_bits_to_f32(0x7c00), f32::INFINITY);
        assert_eq!(f16_bits_to_f32(0x0001), 2f32.powi(-24));
        // Every half, NaNs included, survives f16 -> f32 -> f16.
        for bits in 0..=u16::MAX {
            let back = f32_to_f16_bits(f16_bits_to_f32(bits));
            assert_eq!(back, bits, "{bits:#06x}");
        }
    }

    #[test]
    fn bf16_rounding_matches_ggml_rule() {
        // Exact values.
        for x in [
            0.0f32,
            -0.0,
            1.0,
            -3.0,
            0.5,
            f32::INFINITY,
            f32::NEG_INFINITY,
        ] {
            assert_eq!(bf16_round_trip(&[x])[0].to_bits(), x.to_bits());
        }
        // Ties to even: 0x3f80_8000 is half-way between 0x3f80 (even) and 0x3f81.
        assert_eq!(f32_to_bf16_bits(f32::from_bits(0x3f80_8000)), 0x3f80);
        assert_eq!(f32_to_bf16_bits(f32::from_bits(0x3f81_8000)), 0x3f82);
        assert_eq!(f32_to_bf16_bits(f32::from_bits(0x3f80_8001)), 0x3f81);
        assert_eq!(f32_to_bf16_bits(f32::from_bits(0x3f80_7fff)), 0x3f80);
        // The largest finite f32 rounds to infinity.
        assert_eq!(f32_to_bf16_bits(f32::MAX), 0x7f80);
        assert_eq!(f32_to_bf16_bits(f32::MIN), 0xff80);
        // NaN stays NaN and becomes quiet, sign kept.
        assert_eq!(f32_to_bf16_bits(f32::from_bits(0x7f80_0001)), 0x7fc0);
        assert_eq!(f32_to_bf16_bits(f32::from_bits(0xff81_0000)), 0xffc1);
        assert_eq!(f32_to_bf16_bits(f32::from_bits(0xffff_ffff)), 0xffff);
        // Subnormals are rounded, not flushed.
        assert_eq!(f32_to_bf16_bits(f32::from_bits(0x0000_8000)), 0x0000);
        assert_eq!(f32_to_bf16_bits(f32::from_bits(0x0001_8000)), 0x0002);
    }

    #[test]
    fn bf16_relative_error_is_bounded() {
        let mut x = 1.234e-30f32;
        while x < 1e30 {
            for v in [x, -x] {
                let r = bf16_round_trip(&[v])[0];
                assert!(((r - v) / v).abs() <= 1.0 / 256.0, "{v} -> {r}");
            }
            x *= 1.7;
        }
    }

    #[test]
    fn f16_relative_error_is_bounded_in_normal_range() {
        let mut x = 6.2e-5f32;
        while x < 65000.0 {
            for v in [x, -x] {
                let r = f16_round_trip(&[v])[0];
                assert!(((r - v) / v).abs() <= 1.0 / 2048.0, "{v} -> {r}");
            }
            x *= 1.3;
        }
    }
}
