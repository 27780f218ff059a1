//! llama.cpp's per-key flash-attention numerics (see [`super::ggml_attn`]) restructured for
//! decode: the query heads of a block that share a KV head (GQA) are run together over the same
//! key and value rows, in chunks of [`CHUNK`] keys, in three passes per chunk:
//!
//! 1. the scores of every head against the chunk's keys, each summed exactly as
//!    [`ggml_attn::dot_rows_f16_ggml`] sums it;
//! 2. per head, the running maximum, its libm `expf` weights (`ms` when the maximum grows, `vs`
//!    otherwise) and the running sum `fma(S, ms, vs)`, key by key in order: the same scalar
//!    operations as [`ggml_attn::online_f16`], without the value accumulator in the loop, so the
//!    `expf` calls of consecutive keys overlap;
//! 3. the f16 value accumulators of all heads of the block held in registers (AVX-512) across
//!    the chunk, each value row loaded once for all heads, rounded to f16 at exactly the points
//!    ggml rounds (after the rescale `acc * ms` when the maximum grew, after every `fma(v, vs,
//!    acc)`).
//!
//! Every head's sequence of operations is that of [`ggml_attn::online_f16`], so the results are
//! the same bits (the unit tests compare the two paths bit for bit).

use half::f16;

use super::ggml_attn;

/// Keys per chunk: scores and weights of a chunk stay in L1.
pub const CHUNK: usize = 256;
/// Query heads run together at most.
pub const MAX_HEADS: usize = 4;
/// Scratch values [`online_heads`] needs.
pub const BUF_LEN: usize = 3 * MAX_HEADS * CHUNK;

/// Runs llama.cpp's per-key online softmax for `hb` query heads (f16 queries `q16[j * hd..][..hd]`)
/// over `n` key and value rows `stride` values apart, continuing each head's running maximum
/// `m[j]`, sum `s[j]` and f16 accumulator `acc[j * hd..][..hd]`. `buf` is scratch of
/// [`BUF_LEN`].
#[allow(clippy::too_many_arguments)]
pub fn online_heads(
    q16: &[f16],
    hd: usize,
    k: &[f16],
    v: &[f16],
    stride: usize,
    n: usize,
    scale: f32,
    m: &mut [f32],
    s: &mut [f32],
    acc: &mut [f32],
    buf: &mut [f32],
) {
    let hb = m.len();
    assert!((1..=MAX_HEADS).contains(&hb) && s.len() == hb);
    assert!(q16.len() >= hb * hd && acc.len() >= hb * hd && buf.len() >= BUF_LEN);
    if n == 0 {
        return;
    }
    assert!(
        (n - 1) * stride + hd <= k.len().min(v.len()),
        "rows too short"
    );
    let (scores, rest) = buf.split_at_mut(MAX_HEADS * CHUNK);
    let (ms, vs) = rest.split_at_mut(MAX_HEADS * CHUNK);
    let mut c0 = 0;
    while c0 < n {
        let len = CHUNK.min(n - c0);
        let kc = &k[c0 * stride..];
        score(q16, hd, hb, kc, stride, len, scale, scores);
        for j in 0..hb {
            weights(
                &scores[j * CHUNK..j * CHUNK + len],
                &mut m[j],
                &mut s[j],
                &mut ms[..len * hb],
                &mut vs[..len * hb],
                j,
                hb,
            );
        }
        accumulate(
            &v[c0 * stride..],
            stride,
            len,
            hd,
            hb,
            &ms[..len * hb],
            &vs[..len * hb],
            &mut acc[..hb * hd],
        );
        c0 += len;
    }
}

/// Whether the AVX-512 kernels below may run (x86 with AVX-512F, and ggml-compat not forced to
/// its portable kernels).
#[cfg(target_arch = "x86_64")]
fn avx512_kernels() -> bool {
    ggml_compat::dot::kernel_set() == ggml_compat::dot::KernelSet::Avx2
        && std::arch::is_x86_feature_detected!("avx512f")
}

/// Calls `x86::$f::<C, H>(args)` for the shapes the AVX-512 kernels are built for: head dim 64
/// (C = 4 vectors of 16) or 128 (C = 8), H = 1..4 query heads per block; `false` for others.
#[cfg(target_arch = "x86_64")]
macro_rules! by_shape {
    ($hd:expr, $hb:expr, $m:ident :: $f:ident ($($arg:expr),*)) => {
        match ($hd, $hb) {
            (64, 1) => $m::$f::<4, 1>($($arg),*),
            (64, 2) => $m::$f::<4, 2>($($arg),*),
            (64, 3) => $m::$f::<4, 3>($($arg),*),
            (64, 4) => $m::$f::<4, 4>($($arg),*),
            (128, 1) => $m::$f::<8, 1>($($arg),*),
            (128, 2) => $m::$f::<8, 2>($($arg),*),
            (128, 3) => $m::$f::<8, 3>($($arg),*),
            (128, 4) => $m::$f::<8, 4>($($arg),*),
            _ => false,
        }
    };
}

/// Pass 1: `scores[j * CHUNK + r]` = the score of head `j` against key row `r`, summed as
/// [`ggml_attn::dot_rows_f16_ggml`] sums it.
#[allow(clippy::too_many_arguments)]
fn score(
    q16: &[f16],
    hd: usize,
    hb: usize,
    k: &[f16],
    stride: usize,
    n: usize,
    scale: f32,
    scores: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if avx512_kernels() {
        // SAFETY: AVX-512F detected; n rows of hd values stride apart (asserted by
        // online_heads), hb queries of hd values, hb rows of CHUNK >= n scores.
        let done = unsafe { by_shape!(hd, hb, x86::score(q16, k, stride, n, scale, scores)) };
        if done {
            return;
        }
    }
    for j in 0..hb {
        ggml_attn::dot_rows_f16_ggml(
            &q16[j * hd..(j + 1) * hd],
            k,
            stride,
            scale,
            &mut scores[j * CHUNK..j * CHUNK + n],
        );
    }
}

/// Pass 2 for head `j` of `hb`: `ms[r * hb + j]` is the rescale of key `r` (`expf(M_old -
/// x)` when `x` raised the maximum, else exactly 1), `vs[r * hb + j]` its value weight.
fn weights(
    scores: &[f32],
    m: &mut f32,
    s: &mut f32,
    ms: &mut [f32],
    vs: &mut [f32],
    j: usize,
    hb: usize,
) {
    #[cfg(target_arch = "x86_64")]
    if ggml_compat::dot::kernel_set() == ggml_compat::dot::KernelSet::Avx2 {
        // SAFETY: the AVX2 kernel set implies FMA support.
        return unsafe { weights_fma(scores, m, s, ms, vs, j, hb) };
    }
    weights_generic(scores, m, s, ms, vs, j, hb)
}

#[inline(always)]
fn weights_generic(
    scores: &[f32],
    m: &mut f32,
    s: &mut f32,
    ms: &mut [f32],
    vs: &mut [f32],
    j: usize,
    hb: usize,
) {
    let (mut mm, mut ss) = (*m, *s);
    for (r, &x) in scores.iter().enumerate() {
        // The operations of ggml_attn::online_f16, in its order.
        let (mut a, mut b) = (1.0f32, 1.0f32);
        if x > mm {
            a = (mm - x).exp();
            mm = x;
        } else {
            b = (x - mm).exp();
        }
        ss = ss.mul_add(a, b);
        ms[r * hb + j] = a;
        vs[r * hb + j] = b;
    }
    *m = mm;
    *s = ss;
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn weights_fma(
    scores: &[f32],
    m: &mut f32,
    s: &mut f32,
    ms: &mut [f32],
    vs: &mut [f32],
    j: usize,
    hb: usize,
) {
    weights_generic(scores, m, s, ms, vs, j, hb)
}

/// Pass 3: for each key `r` in order and each head `j`: `acc_j = f16(acc_j * ms)` when the
/// maximum grew (skipped when `ms` is exactly 1: `acc_j` holds f16 values, so the rescale would
/// give them back unchanged), then `acc_j = f16(fma(v_r, vs, acc_j))`.
#[allow(clippy::too_many_arguments)]
fn accumulate(
    v: &[f16],
    stride: usize,
    n: usize,
    hd: usize,
    hb: usize,
    ms: &[f32],
    vs: &[f32],
    acc: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if avx512_kernels() {
        // SAFETY: AVX-512F detected; the rows, weights and accumulators are in bounds
        // (asserted by online_heads: n rows of stride values, hb weights per row, hb * hd
        // accumulators).
        let done = unsafe { by_shape!(hd, hb, x86::accumulate(v, stride, n, ms, vs, acc)) };
        if done {
            return;
        }
    }
    for r in 0..n {
        let row = &v[r * stride..r * stride + hd];
        for j in 0..hb {
            let a = &mut acc[j * hd..(j + 1) * hd];
            let w = ms[r * hb + j];
            if w != 1.0 {
                ggml_attn::scale_f16_round(a, w);
            }
            ggml_attn::mad_f16_round(a, row, vs[r * hb + j]);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::*;
    use std::arch::x86_64::*;

    /// [`super::score`] for `H` heads of `16 * C` values (`C` a multiple of 4): per head the
    /// sums of `ggml_vec_dot_f16` (four 16-lane accumulators over steps of 64 values, `(s0 +
    /// s2) + (s1 + s3)`, then [`ggml_attn::reduce16`]'s order), each key row converted once for
    /// all heads. Returns true.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn score<const C: usize, const H: usize>(
        q16: &[f16],
        k: &[f16],
        stride: usize,
        n: usize,
        scale: f32,
        scores: &mut [f32],
    ) -> bool {
        // SAFETY: the caller guarantees H queries of 16 * C values, n rows stride apart and
        // H rows of CHUNK >= n scores.
        unsafe {
            let ld = |p: *const f16| _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i));
            let mut q = [[_mm512_setzero_ps(); C]; H];
            for (j, qj) in q.iter_mut().enumerate() {
                for (c, x) in qj.iter_mut().enumerate() {
                    *x = ld(q16.as_ptr().add((j * C + c) * 16));
                }
            }
            let out = scores.as_mut_ptr();
            for r in 0..n {
                let kp = k.as_ptr().add(r * stride);
                let mut x = [_mm512_setzero_ps(); C];
                for (c, x) in x.iter_mut().enumerate() {
                    *x = ld(kp.add(16 * c));
                }
                for (j, qj) in q.iter().enumerate() {
                    let mut s = [_mm512_setzero_ps(); 4];
                    for c in 0..C {
                        s[c % 4] = _mm512_fmadd_ps(qj[c], x[c], s[c % 4]);
                    }
                    let t = _mm512_add_ps(_mm512_add_ps(s[0], s[2]), _mm512_add_ps(s[1], s[3]));
                    // reduce16: lanes 8..16 + lanes 0..8, then the upper four + the lower
                    // four, then (0 + 2) + (1 + 3).
                    let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(t)));
                    let a = _mm256_add_ps(hi, _mm512_castps512_ps256(t));
                    let b = _mm_add_ps(_mm256_extractf128_ps::<1>(a), _mm256_castps256_ps128(a));
                    let c = _mm_add_ps(b, _mm_movehl_ps(b, b));
                    let e = _mm_add_ss(c, _mm_movehdup_ps(c));
                    *out.add(j * CHUNK + r) = _mm_cvtss_f32(e) * scale;
                }
            }
        }
        true
    }

    /// [`super::accumulate`] for `H` heads of `16 * C` values in AVX-512 registers. Returns
    /// true.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn accumulate<const C: usize, const H: usize>(
        v: &[f16],
        stride: usize,
        n: usize,
        ms: &[f32],
        vs: &[f32],
        acc: &mut [f32],
    ) -> bool {
        const R: i32 = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
        // SAFETY: the caller guarantees n rows of 16 * C values stride apart, n * H weights
        // and H * 16 * C accumulators.
        unsafe {
            let round = |y: __m512| _mm512_cvtph_ps(_mm512_cvtps_ph::<R>(y));
            let ap = acc.as_mut_ptr();
            let mut a = [[_mm512_setzero_ps(); C]; H];
            for (j, aj) in a.iter_mut().enumerate() {
                for (c, x) in aj.iter_mut().enumerate() {
                    *x = _mm512_loadu_ps(ap.add((j * C + c) * 16));
                }
            }
            for r in 0..n {
                let vp = v.as_ptr().add(r * stride);
                let mut x = [_mm512_setzero_ps(); C];
                for (c, x) in x.iter_mut().enumerate() {
                    *x = _mm512_cvtph_ps(_mm256_loadu_si256(vp.add(16 * c) as *const __m256i));
                }
                for (j, aj) in a.iter_mut().enumerate() {
                    let w = *ms.get_unchecked(r * H + j);
                    if w != 1.0 {
                        let wv = _mm512_set1_ps(w);
                        for y in aj.iter_mut() {
                            *y = round(_mm512_mul_ps(*y, wv));
                        }
                    }
                    let wv = _mm512_set1_ps(*vs.get_unchecked(r * H + j));
                    for (y, x) in aj.iter_mut().zip(&x) {
                        *y = round(_mm512_fmadd_ps(*x, wv, *y));
                    }
                }
            }
            for (j, aj) in a.iter().enumerate() {
                for (c, x) in aj.iter().enumerate() {
                    _mm512_storeu_ps(ap.add((j * C + c) * 16), *x);
                }
            }
        }
        true
    }
}
