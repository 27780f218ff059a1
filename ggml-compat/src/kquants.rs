//! STUB: to be written.
pub fn dequantize_q2_k(_src: &[u8], _dst: &mut [f32]) {
    unimplemented!("q2_k")
}
pub fn quantize_q2_k(_src: &[f32], _dst: &mut [u8]) {
    unimplemented!("q2_k")
}
pub fn dequantize_q3_k(_src: &[u8], _dst: &mut [f32]) {
    unimplemented!("q3_k")
}
pub fn quantize_q3_k(_src: &[f32], _dst: &mut [u8]) {
    unimplemented!("q3_k")
}
pub fn dequantize_q4_k(_src: &[u8], _dst: &mut [f32]) {
    unimplemented!("q4_k")
}
pub fn quantize_q4_k(_src: &[f32], _dst: &mut [u8]) {
    unimplemented!("q4_k")
}
pub fn dequantize_q5_k(_src: &[u8], _dst: &mut [f32]) {
    unimplemented!("q5_k")
}
pub fn quantize_q5_k(_src: &[f32], _dst: &mut [u8]) {
    unimplemented!("q5_k")
}
pub fn dequantize_q6_k(_src: &[u8], _dst: &mut [f32]) {
    unimplemented!("q6_k")
}
pub fn quantize_q6_k(_src: &[f32], _dst: &mut [u8]) {
    unimplemented!("q6_k")
}
