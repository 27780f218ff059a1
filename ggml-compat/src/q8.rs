//! STUB: to be written.
pub fn dequantize_q8_0(_src: &[u8], _dst: &mut [f32]) {
    unimplemented!("q8_0")
}
pub fn quantize_q8_0(_src: &[f32], _dst: &mut [u8]) {
    unimplemented!("q8_0")
}
pub fn dequantize_q8_1(_src: &[u8], _dst: &mut [f32]) {
    unimplemented!("q8_1")
}
pub fn quantize_q8_1(_src: &[f32], _dst: &mut [u8]) {
    unimplemented!("q8_1")
}
pub fn dequantize_q8_k(_src: &[u8], _dst: &mut [f32]) {
    unimplemented!("q8_k")
}
pub fn quantize_q8_k(_src: &[f32], _dst: &mut [u8]) {
    unimplemented!("q8_k")
}
