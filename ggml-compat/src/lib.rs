//! ggml-compat: everything about ggml's tensor formats and nothing about files or models.
//!
//! - [`types`]: the type table (ids, names, block geometry).
//! - [`float`]: F32 / F16 / BF16 rows.
//! - [`legacy`]: the 32-element block quants Q4_0, Q4_1, Q5_0, Q5_1.
//! - [`q8`]: the 8-bit formats Q8_0, Q8_1, Q8_K (weights and activation formats for dot products).
//! - [`kquants`]: the 256-element super-block quants Q2_K .. Q6_K.
//! - [`dot`]: quantized-weight x quantized-activation dot products (scalar reference + AVX2).
//!
//! Element order is ggml's: a row is `ne[0]` contiguous elements, blocks follow each other.
#![deny(unsafe_op_in_unsafe_fn)]

pub mod dot;
pub mod float;
pub mod kquants;
pub mod legacy;
pub mod q8;
pub mod types;

pub use types::{GgmlType, QK, QK_K};

/// Errors from format operations. Each names the type and the sizes involved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("{ty}: {n} elements is not a whole number of {block}-element blocks")]
    NotWholeBlocks { ty: GgmlType, n: u64, block: usize },
    #[error("{ty}: byte size of {n} elements overflows")]
    SizeOverflow { ty: GgmlType, n: u64 },
    #[error("{ty}: {n} elements need {expected} bytes, got a buffer of {got}")]
    BufferSize {
        ty: GgmlType,
        n: usize,
        expected: usize,
        got: usize,
    },
    #[error("{ty}: {op} is not supported for this type")]
    Unsupported { ty: GgmlType, op: &'static str },
}

/// Checks that `bytes` holds exactly `n` elements of `ty`.
pub(crate) fn check_sizes(ty: GgmlType, n: usize, bytes: usize) -> Result<(), FormatError> {
    let expected = ty.bytes_for(n as u64)? as usize;
    if expected != bytes {
        return Err(FormatError::BufferSize {
            ty,
            n,
            expected,
            got: bytes,
        });
    }
    Ok(())
}

/// Decodes `dst.len()` elements of type `ty` from `src` (exactly that many elements' bytes).
pub fn dequantize_row(ty: GgmlType, src: &[u8], dst: &mut [f32]) -> Result<(), FormatError> {
    check_sizes(ty, dst.len(), src.len())?;
    use GgmlType::*;
    match ty {
        F32 => float::dequantize_f32(src, dst),
        F16 => float::dequantize_f16(src, dst),
        BF16 => float::dequantize_bf16(src, dst),
        Q4_0 => legacy::dequantize_q4_0(src, dst),
        Q4_1 => legacy::dequantize_q4_1(src, dst),
        Q5_0 => legacy::dequantize_q5_0(src, dst),
        Q5_1 => legacy::dequantize_q5_1(src, dst),
        Q8_0 => q8::dequantize_q8_0(src, dst),
        Q8_1 => q8::dequantize_q8_1(src, dst),
        Q8_K => q8::dequantize_q8_k(src, dst),
        Q2_K => kquants::dequantize_q2_k(src, dst),
        Q3_K => kquants::dequantize_q3_k(src, dst),
        Q4_K => kquants::dequantize_q4_k(src, dst),
        Q5_K => kquants::dequantize_q5_k(src, dst),
        Q6_K => kquants::dequantize_q6_k(src, dst),
        _ => {
            return Err(FormatError::Unsupported {
                ty,
                op: "dequantize",
            })
        }
    }
    Ok(())
}

/// Encodes `src` (a whole number of blocks) as type `ty` into `dst` (exactly that many bytes).
pub fn quantize_row(ty: GgmlType, src: &[f32], dst: &mut [u8]) -> Result<(), FormatError> {
    check_sizes(ty, src.len(), dst.len())?;
    use GgmlType::*;
    match ty {
        F32 => float::quantize_f32(src, dst),
        F16 => float::quantize_f16(src, dst),
        BF16 => float::quantize_bf16(src, dst),
        Q4_0 => legacy::quantize_q4_0(src, dst),
        Q4_1 => legacy::quantize_q4_1(src, dst),
        Q5_0 => legacy::quantize_q5_0(src, dst),
        Q5_1 => legacy::quantize_q5_1(src, dst),
        Q8_0 => q8::quantize_q8_0(src, dst),
        Q8_1 => q8::quantize_q8_1(src, dst),
        Q8_K => q8::quantize_q8_k(src, dst),
        Q2_K => kquants::quantize_q2_k(src, dst),
        Q3_K => kquants::quantize_q3_k(src, dst),
        Q4_K => kquants::quantize_q4_k(src, dst),
        Q5_K => kquants::quantize_q5_k(src, dst),
        Q6_K => kquants::quantize_q6_k(src, dst),
        _ => return Err(FormatError::Unsupported { ty, op: "quantize" }),
    }
    Ok(())
}

/// Encodes activations the way ggml's x86 CPU backend does before a quantized dot product
/// (`quantize_row_q8_0` / `quantize_row_q8_1` of ggml-cpu/arch/x86/quants.c, used whenever
/// AVX or AVX2 is available): Q8_0 and Q8_1 with [`q8::quantize_q8_0_x86`] /
/// [`q8::quantize_q8_1_x86`], every other type as [`quantize_row`]. The x86 encoders round some
/// values differently from the reference ones, so logits computed from them match llama.cpp's
/// on x86 more closely.
pub fn quantize_row_activations(
    ty: GgmlType,
    src: &[f32],
    dst: &mut [u8],
) -> Result<(), FormatError> {
    match ty {
        GgmlType::Q8_0 => {
            check_sizes(ty, src.len(), dst.len())?;
            q8::quantize_q8_0_x86(src, dst);
            Ok(())
        }
        GgmlType::Q8_1 => {
            check_sizes(ty, src.len(), dst.len())?;
            q8::quantize_q8_1_x86(src, dst);
            Ok(())
        }
        _ => quantize_row(ty, src, dst),
    }
}
