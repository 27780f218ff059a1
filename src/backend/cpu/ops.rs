//! Row-wise float ops of the CPU backend: embedding lookup, RMSNorm, rotary embedding, SwiGLU and
//! residual add, with the arithmetic order llama.cpp's CPU backend uses (so logits agree closely).

use ggml_compat::GgmlType;

use crate::model::RopeConfig;

/// `out` (one row of `width`) = row `token` of an embedding table of type `ty`.
pub fn embed_row(ty: GgmlType, table: &[u8], row_bytes: usize, token: usize, out: &mut [f32]) {
    let row = &table[token * row_bytes..(token + 1) * row_bytes];
    ggml_compat::dequantize_row(ty, row, out).expect("embedding rows were validated at load");
}

/// `out = x / sqrt(mean(x^2) + eps) * w`; the sum of squares is accumulated in f64 as ggml does.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let sum: f64 = x.iter().map(|&v| (v * v) as f64).sum();
    let mean = (sum / x.len() as f64) as f32;
    let scale = 1.0 / (mean + eps).sqrt();
    for ((o, &v), &g) in out.iter_mut().zip(x).zip(w) {
        *o = (v * scale) * g;
    }
}

/// Fills `cs` with `(cos, sin)` pairs of the rotation angles for position `pos`.
pub fn rope_angles(rope: &RopeConfig, pos: u32, cs: &mut [(f32, f32)]) {
    let n_pairs = rope.n_rot / 2;
    let theta_scale = rope.freq_base.powf(-2.0 / rope.n_rot as f32);
    let mut theta_base = pos as f32;
    for (i, c) in cs[..n_pairs].iter_mut().enumerate() {
        let ff = rope.freq_factors.as_ref().map_or(1.0, |f| f[i]);
        let theta = rope.freq_scale * (theta_base / ff);
        *c = (theta.cos(), theta.sin());
        theta_base *= theta_scale;
    }
}

/// Rotates adjacent pairs of the first `n_rot` dims of each head (llama.cpp's rope type NORM),
/// rounding as llama.cpp's x86 build does (its compiler fuses one product of each output:
/// `x0' = fma(x0, cos, -(x1 * sin))`, `x1' = fma(x0, sin, x1 * cos)`; checked against its
/// tensors).
pub fn rope_row(x: &mut [f32], head_dim: usize, cs: &[(f32, f32)]) {
    #[cfg(target_arch = "x86_64")]
    if ggml_compat::dot::kernel_set() == ggml_compat::dot::KernelSet::Avx2 {
        // SAFETY: the AVX2 kernel set implies FMA support.
        return unsafe { rope_row_fma(x, head_dim, cs) };
    }
    rope_row_generic(x, head_dim, cs)
}

#[inline(always)]
fn rope_row_generic(x: &mut [f32], head_dim: usize, cs: &[(f32, f32)]) {
    for head in x.chunks_exact_mut(head_dim) {
        for (pair, &(c, s)) in head.chunks_exact_mut(2).zip(cs) {
            let (x0, x1) = (pair[0], pair[1]);
            pair[0] = x0.mul_add(c, -(x1 * s));
            pair[1] = x0.mul_add(s, x1 * c);
        }
    }
}

/// [`rope_row_generic`] compiled with FMA instructions for `mul_add`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn rope_row_fma(x: &mut [f32], head_dim: usize, cs: &[(f32, f32)]) {
    rope_row_generic(x, head_dim, cs)
}

/// `gate = silu(gate) * up`, with SiLU computed as llama.cpp's CPU backend computes it
/// (`ggml_v_silu`: its own vectorized `expf`, see [`super::ggml_attn::v_silu`]).
pub fn swiglu(gate: &mut [f32], up: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if ggml_compat::dot::kernel_set() == ggml_compat::dot::KernelSet::Avx2 {
        // SAFETY: the AVX2 kernel set implies FMA support.
        return unsafe { swiglu_fma(gate, up) };
    }
    swiglu_generic(gate, up)
}

#[inline(always)]
fn swiglu_generic(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = super::ggml_attn::v_silu(*g) * u;
    }
}

/// [`swiglu_generic`] compiled with FMA instructions for `mul_add`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn swiglu_fma(gate: &mut [f32], up: &[f32]) {
    swiglu_generic(gate, up)
}

/// `x += y`.
pub fn add(x: &mut [f32], y: &[f32]) {
    for (a, &b) in x.iter_mut().zip(y) {
        *a += b;
    }
}
