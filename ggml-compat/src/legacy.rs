//! STUB: to be written.
pub fn dequantize_q4_0(_src: &[u8], _dst: &mut [f32]) {
    unimplemented!("q4_0")
}
pub fn quantize_q4_0(_src: &[f32], _dst: &mut [u8]) {
    unimplemented!("q4_0")
}
pub fn dequantize_q4_1(_src: &[u8], _dst: &mut [f32]) {
    unimplemented!("q4_1")
}
pub fn quantize_q4_1(_src: &[f32], _dst: &mut [u8]) {
    unimplemented!("q4_1")
}
pub fn dequantize_q5_0(_src: &[u8], _dst: &mut [f32]) {
    unimplemented!("q5_0")
}
pub fn quantize_q5_0(_src: &[f32], _dst: &mut [u8]) {
    unimplemented!("q5_0")
}
pub fn dequantize_q5_1(_src: &[u8], _dst: &mut [f32]) {
    unimplemented!("q5_1")
}
pub fn quantize_q5_1(_src: &[f32], _dst: &mut [u8]) {
    unimplemented!("q5_1")
}
