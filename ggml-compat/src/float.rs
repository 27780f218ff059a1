//! Plain float rows: F32, F16 (IEEE half) and BF16 (bfloat16), little-endian.

pub fn dequantize_f32(src: &[u8], dst: &mut [f32]) {
    for (d, s) in dst.iter_mut().zip(src.chunks_exact(4)) {
        *d = f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
    }
}

pub fn quantize_f32(src: &[f32], dst: &mut [u8]) {
    for (s, d) in src.iter().zip(dst.chunks_exact_mut(4)) {
        d.copy_from_slice(&s.to_le_bytes());
    }
}

pub fn dequantize_f16(_src: &[u8], _dst: &mut [f32]) {
    unimplemented!("F16 dequantize")
}
pub fn quantize_f16(_src: &[f32], _dst: &mut [u8]) {
    unimplemented!("F16 quantize")
}
pub fn dequantize_bf16(_src: &[u8], _dst: &mut [f32]) {
    unimplemented!("BF16 dequantize")
}
pub fn quantize_bf16(_src: &[f32], _dst: &mut [u8]) {
    unimplemented!("BF16 quantize")
}
