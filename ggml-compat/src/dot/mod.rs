//! Quantized dot products: one weight row times one activation row, the inner loop of every
//! matrix-vector product.
//!
//! This module owns the pairing of each weight format with the format its activations are
//! quantized to ([`vec_dot_type`]), the dot kernels for each pair, and the choice between the
//! portable scalar kernels (`scalar`, the reference) and the AVX2 ones (`avx2`, x86-64 only).
//!
//! | weights                      | activations | per block                                 |
//! |------------------------------|-------------|-------------------------------------------|
//! | Q4_0, Q5_0, Q8_0             | Q8_0        | `d_w * d_a * sum(q_w * q_a)`              |
//! | Q4_1, Q5_1                   | Q8_1        | the same plus `m_w * s_a`                 |
//! | Q2_K, Q3_K, Q4_K, Q5_K, Q6_K | Q8_K        | scales as integers; mins via `bsums`      |
//! | F32                          | F32         | f32 products and sums                     |
//! | F16                          | F16         | f32 products and sums                     |
//! | BF16                         | F32         | f32 products and sums                     |
//!
//! BF16 weights take F32 activations (ggml pairs them with BF16): the activation keeps its full
//! precision and needs no conversion.
//!
//! Usage: quantize the activation row once with [`crate::quantize_row`] into
//! `vec_dot_type(ty)`, then call the kernel from [`dot_kernel`] for each weight row.
//! [`vec_dot`] is the same with size checks and an error instead of a panic.
//!
//! Kernel selection happens once per process: AVX2 kernels are used when the CPU reports AVX2,
//! FMA and F16C (every AVX2 CPU made has F16C), unless the environment variable
//! `GGML_COMPAT_SCALAR` is set to something other than `0` or the empty string, which forces
//! the scalar kernels (for debugging and benchmarking).
//!
//! Results of the AVX2 and scalar kernels agree to f32 rounding (the integer parts are exact;
//! only the order of the f32 block sums differs). The AVX2 kernels assume activation quants in
//! `[-127, 127]`, which every encoder in [`crate::q8`] guarantees.

use crate::{FormatError, GgmlType};
use std::sync::OnceLock;

#[cfg(target_arch = "x86_64")]
mod avx2;
mod scalar;

/// A dot-product kernel: `n` elements of weights `w` (bytes of the weight type) times `n`
/// elements of activations `a` (bytes of the weight type's [`vec_dot_type`]).
///
/// `n` must be a whole number of blocks and the slices must hold at least `n` elements' bytes
/// (only those are read); the kernel panics otherwise. Use [`vec_dot`] for a checked call.
pub type DotFn = fn(n: usize, w: &[u8], a: &[u8]) -> f32;

/// Two weight rows against the same activations: `(dot(w0, a), dot(w1, a))`, each exactly as
/// [`dot_kernel`]'s kernel computes it (two independent chains run faster than one).
pub type Dot2Fn = fn(n: usize, w0: &[u8], w1: &[u8], a: &[u8]) -> (f32, f32);

/// The two-row kernel for `ty` where one exists (AVX2, 32-element block types).
pub fn dot2_kernel(ty: GgmlType) -> Option<Dot2Fn> {
    match kernel_set() {
        #[cfg(target_arch = "x86_64")]
        KernelSet::Avx2 => avx2::kernel2(ty),
        _ => {
            let _ = ty;
            None
        }
    }
}

/// Activation rows per call of a [`DotTileFn`].
pub const TILE_TOKENS: usize = 4;

/// Two weight rows against [`TILE_TOKENS`] activation rows: `out[r][t] = dot(w_r, a[t])`, each
/// exactly as [`dot_kernel`]'s kernel computes it (the weights are unpacked once for all
/// tokens, each activation block loaded once for both rows; the prefill products' kernel).
pub type DotTileFn =
    fn(n: usize, w0: &[u8], w1: &[u8], a: [&[u8]; TILE_TOKENS]) -> [[f32; TILE_TOKENS]; 2];

/// The two-row, four-token kernel for `ty` where one exists (AVX2, 32-element block types).
pub fn dot_tile_kernel(ty: GgmlType) -> Option<DotTileFn> {
    match kernel_set() {
        #[cfg(target_arch = "x86_64")]
        KernelSet::Avx2 => avx2::kernel_tile(ty),
        _ => {
            let _ = ty;
            None
        }
    }
}

/// Block byte sizes and the offsets shared by the kernels.
pub(crate) mod layout {
    pub const Q4_0_BYTES: usize = 18;
    pub const Q4_1_BYTES: usize = 20;
    pub const Q5_0_BYTES: usize = 22;
    pub const Q5_1_BYTES: usize = 24;
    pub const Q8_0_BYTES: usize = crate::q8::Q8_0_BYTES;
    pub const Q8_1_BYTES: usize = crate::q8::Q8_1_BYTES;
    pub const Q2_K_BYTES: usize = 84;
    pub const Q3_K_BYTES: usize = 110;
    pub const Q4_K_BYTES: usize = 144;
    pub const Q5_K_BYTES: usize = 176;
    pub const Q6_K_BYTES: usize = 210;
    pub const Q8_K_BYTES: usize = crate::q8::Q8_K_BYTES;
    /// Offset of the 256 quants in a Q8_K block.
    pub const Q8K_QS: usize = crate::q8::Q8_K_QS;
    /// Offset of the 16 group sums in a Q8_K block.
    pub const Q8K_BSUMS: usize = crate::q8::Q8_K_BSUMS;
}

/// The format activations are quantized to before a dot product with weights of type `ty`;
/// `None` when there is no kernel for `ty`.
pub fn vec_dot_type(ty: GgmlType) -> Option<GgmlType> {
    use GgmlType::*;
    Some(match ty {
        F32 => F32,
        F16 => F16,
        BF16 => F32,
        Q4_0 | Q5_0 | Q8_0 => Q8_0,
        Q4_1 | Q5_1 => Q8_1,
        Q2_K | Q3_K | Q4_K | Q5_K | Q6_K => Q8_K,
        _ => return None,
    })
}

/// The portable scalar kernel for weights of type `ty` (the reference implementation).
pub fn dot_kernel_scalar(ty: GgmlType) -> Option<DotFn> {
    use GgmlType::*;
    Some(match ty {
        F32 => scalar::f32_f32,
        F16 => scalar::f16_f16,
        BF16 => scalar::bf16_f32,
        Q4_0 => scalar::q4_0_q8_0,
        Q4_1 => scalar::q4_1_q8_1,
        Q5_0 => scalar::q5_0_q8_0,
        Q5_1 => scalar::q5_1_q8_1,
        Q8_0 => scalar::q8_0_q8_0,
        Q2_K => scalar::q2_k_q8_k,
        Q3_K => scalar::q3_k_q8_k,
        Q4_K => scalar::q4_k_q8_k,
        Q5_K => scalar::q5_k_q8_k,
        Q6_K => scalar::q6_k_q8_k,
        _ => return None,
    })
}

/// The AVX2+FMA kernel for `ty`, or `None` when this CPU (or target) lacks AVX2, FMA or F16C,
/// or no AVX2 kernel exists for `ty`. Ignores `GGML_COMPAT_SCALAR`.
pub fn dot_kernel_avx2(ty: GgmlType) -> Option<DotFn> {
    #[cfg(target_arch = "x86_64")]
    {
        avx2::kernel(ty)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = ty;
        None
    }
}

/// Which kernel family [`dot_kernel`] hands out on this machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelSet {
    Scalar,
    Avx2,
}

/// The kernel family chosen for this process (detected once, then cached).
pub fn kernel_set() -> KernelSet {
    static CHOICE: OnceLock<KernelSet> = OnceLock::new();
    *CHOICE.get_or_init(|| {
        let forced =
            std::env::var_os("GGML_COMPAT_SCALAR").is_some_and(|v| !v.is_empty() && v != "0");
        if !forced && dot_kernel_avx2(GgmlType::Q8_0).is_some() {
            KernelSet::Avx2
        } else {
            KernelSet::Scalar
        }
    })
}

/// The fastest kernel for weights of type `ty` on this CPU; `None` when `ty` has no kernel.
pub fn dot_kernel(ty: GgmlType) -> Option<DotFn> {
    match kernel_set() {
        KernelSet::Avx2 => dot_kernel_avx2(ty).or_else(|| dot_kernel_scalar(ty)),
        KernelSet::Scalar => dot_kernel_scalar(ty),
    }
}

/// Dot product of `n` weights of type `ty` (`w`) with `n` activations in `vec_dot_type(ty)`
/// (`a`), both exactly `n` elements' bytes.
pub fn vec_dot(ty: GgmlType, n: usize, w: &[u8], a: &[u8]) -> Result<f32, FormatError> {
    let (Some(at), Some(kernel)) = (vec_dot_type(ty), dot_kernel(ty)) else {
        return Err(FormatError::Unsupported { ty, op: "vec_dot" });
    };
    crate::check_sizes(ty, n, w.len())?;
    crate::check_sizes(at, n, a.len())?;
    Ok(kernel(n, w, a))
}

// ---------------------------------------------------------------------------------------------
// Helpers shared by the kernels.

/// Checks a kernel's arguments and returns the number of blocks: `n` must be a multiple of
/// `block`, and `w` / `a` must hold that many blocks of `wbytes` / `abytes` bytes. The AVX2
/// kernels rely on this check for the memory safety of their loads.
#[inline]
pub(crate) fn check_blocks(
    n: usize,
    block: usize,
    w: &[u8],
    wbytes: usize,
    a: &[u8],
    abytes: usize,
) -> usize {
    assert!(
        n.is_multiple_of(block),
        "dot: {n} elements is not a whole number of {block}-element blocks"
    );
    let nb = n / block;
    assert!(
        nb.checked_mul(wbytes).is_some_and(|b| w.len() >= b)
            && nb.checked_mul(abytes).is_some_and(|b| a.len() >= b),
        "dot: {n} elements need {} weight and {} activation bytes, got {} and {}",
        nb.saturating_mul(wbytes),
        nb.saturating_mul(abytes),
        w.len(),
        a.len()
    );
    nb
}

/// The f16 at byte offset `off`, widened.
#[inline(always)]
pub(crate) fn f16_at(b: &[u8], off: usize) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([b[off], b[off + 1]])).to_f32()
}

#[inline(always)]
pub(crate) fn f32_at(b: &[u8], off: usize) -> f32 {
    f32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

#[inline(always)]
pub(crate) fn i16_at(b: &[u8], off: usize) -> i16 {
    i16::from_le_bytes([b[off], b[off + 1]])
}

/// Views bytes as signed bytes.
#[inline(always)]
pub(crate) fn i8s(b: &[u8]) -> &[i8] {
    // SAFETY: i8 and u8 have the same size, alignment and validity (every bit pattern).
    unsafe { std::slice::from_raw_parts(b.as_ptr().cast::<i8>(), b.len()) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quantize_row;

    #[test]
    fn every_kernel_type_has_an_activation_type_and_back() {
        for ty in GgmlType::ALL {
            assert_eq!(
                vec_dot_type(ty).is_some(),
                dot_kernel_scalar(ty).is_some(),
                "{ty}"
            );
            assert_eq!(vec_dot_type(ty).is_some(), dot_kernel(ty).is_some(), "{ty}");
        }
        assert_eq!(vec_dot_type(GgmlType::Q4_1), Some(GgmlType::Q8_1));
        assert_eq!(vec_dot_type(GgmlType::Q6_K), Some(GgmlType::Q8_K));
        assert_eq!(vec_dot_type(GgmlType::IQ4_NL), None);
    }

    #[test]
    fn vec_dot_checks_sizes() {
        let w = vec![0u8; 34 * 2];
        let a = vec![0u8; 34 * 2];
        assert_eq!(vec_dot(GgmlType::Q8_0, 64, &w, &a), Ok(0.0));
        assert!(matches!(
            vec_dot(GgmlType::Q8_0, 48, &w, &a),
            Err(FormatError::NotWholeBlocks { .. })
        ));
        assert!(matches!(
            vec_dot(GgmlType::Q8_0, 64, &w[..34], &a),
            Err(FormatError::BufferSize { .. })
        ));
        assert!(matches!(
            vec_dot(GgmlType::Q4_1, 64, &w, &a),
            Err(FormatError::BufferSize { .. })
        ));
        assert!(matches!(
            vec_dot(GgmlType::IQ2_XS, 256, &w, &a),
            Err(FormatError::Unsupported { .. })
        ));
    }

    #[test]
    #[should_panic(expected = "whole number")]
    fn kernels_reject_partial_blocks() {
        let w = vec![0u8; 200];
        dot_kernel_scalar(GgmlType::Q4_0).unwrap()(40, &w, &w);
    }

    #[test]
    #[should_panic(expected = "need")]
    fn kernels_reject_short_buffers() {
        let w = vec![0u8; 200];
        let kernel = dot_kernel(GgmlType::Q6_K).unwrap();
        kernel(256, &w, &w);
    }

    /// Q8_0 x Q8_0 against the f64 dot of the decoded rows.
    #[test]
    fn q8_0_dot_matches_decoded_rows() {
        let w: Vec<f32> = (0..64).map(|i| (i as f32 - 30.0) / 4.0).collect();
        let a: Vec<f32> = (0..64)
            .map(|i| if i % 3 == 0 { 1.0 } else { -0.5 })
            .collect();
        let (mut qw, mut qa) = (vec![0u8; 68], vec![0u8; 68]);
        quantize_row(GgmlType::Q8_0, &w, &mut qw).unwrap();
        quantize_row(GgmlType::Q8_0, &a, &mut qa).unwrap();
        let mut dw = vec![0f32; 64];
        let mut da = vec![0f32; 64];
        crate::q8::dequantize_q8_0(&qw, &mut dw);
        crate::q8::dequantize_q8_0(&qa, &mut da);
        let want: f64 = dw.iter().zip(&da).map(|(x, y)| *x as f64 * *y as f64).sum();
        let got = vec_dot(GgmlType::Q8_0, 64, &qw, &qa).unwrap();
        assert!(
            (got as f64 - want).abs() <= 1e-6 * want.abs().max(1.0),
            "{got} vs {want}"
        );
        let scalar = dot_kernel_scalar(GgmlType::Q8_0).unwrap()(64, &qw, &qa);
        assert!(
            (scalar as f64 - want).abs() <= 1e-6 * want.abs().max(1.0),
            "{scalar} vs {want}"
        );
    }

    #[test]
    fn float_kernels_on_small_integers_are_exact() {
        for n in [0usize, 1, 7, 8, 9, 31, 33, 100] {
            let w: Vec<f32> = (0..n).map(|i| (i % 7) as f32 - 3.0).collect();
            let a: Vec<f32> = (0..n).map(|i| (i % 5) as f32 - 2.0).collect();
            let want: f32 = w.iter().zip(&a).map(|(x, y)| x * y).sum();
            let wb: Vec<u8> = w.iter().flat_map(|v| v.to_le_bytes()).collect();
            let ab: Vec<u8> = a.iter().flat_map(|v| v.to_le_bytes()).collect();
            let wh: Vec<u8> = w
                .iter()
                .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
                .collect();
            let ah: Vec<u8> = a
                .iter()
                .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
                .collect();
            let wbf: Vec<u8> = w
                .iter()
                .flat_map(|v| ((v.to_bits() >> 16) as u16).to_le_bytes())
                .collect();
            for get in [dot_kernel_scalar, dot_kernel] {
                assert_eq!(get(GgmlType::F32).unwrap()(n, &wb, &ab), want, "F32 n={n}");
                assert_eq!(get(GgmlType::F16).unwrap()(n, &wh, &ah), want, "F16 n={n}");
                assert_eq!(
                    get(GgmlType::BF16).unwrap()(n, &wbf, &ab),
                    want,
                    "BF16 n={n}"
                );
            }
        }
    }
}
