//! llama.cpp's CPU flash-attention numerics (ggml as of b11434 on x86-64 with AVX-512, the build
//! our reference fixtures come from), reproduced operation for operation so that attention over
//! f16 K/V rows gives the same f32 results as llama.cpp's, not just close ones. The rounding
//! details matter: this 135M model turns differences in the last bits into different top-1
//! tokens at near-ties.
//!
//! ggml has two regimes, chosen by the number of query rows in the batch:
//!
//! - **tiled** (at least [`TILED_MIN_BATCH`] tokens; prefill, perplexity): f32 queries; each
//!   score is one sequential chain of fused multiply-adds over the head dimension (its SIMD GEMM
//!   runs across keys, so no lane sums are involved) times the scale; keys are taken in aligned
//!   tiles of 64 positions with an online softmax per tile: the tile's maximum, a rescale of the
//!   accumulator by libm `expf(M_old - M_new)`, the tile's exponentials by [`v_expf`] and their
//!   sum as [`tile_sum`] forms it; values accumulated in f32 with one fused multiply-add per key.
//!   [`score_lanes`] scores eight queries at once, and [`super::ggml_tile`] runs each tile's
//!   softmax and value accumulation for the eight at once, every query's arithmetic unchanged.
//! - **per key** (smaller batches; decode): the query rounded to f16; scores summed as
//!   `ggml_vec_dot_f16` sums them ([`dot_rows_f16_ggml`]); a per-key online softmax with libm
//!   `expf`; values accumulated into an f16 accumulator rounded after every key
//!   ([`mad_f16_round`], [`scale_f16_round`]); the running sum updated as `fma(S, ms, vs)`.

use half::f16;
use std::sync::OnceLock;

/// Batches of at least this many tokens take ggml's tiled path (`GGML_FA_TILE_Q`).
pub const TILED_MIN_BATCH: usize = 64;
/// Keys per tile of the tiled path (`GGML_FA_TILE_KV`): tiles cover positions `64k..64k+64`.
pub const KV_TILE: usize = 64;
/// Query rows scored together by [`score_lanes`].
pub const LANES: usize = 8;
/// [`score_lanes`]' scratch holds this many rows of the head dimension.
pub const KBUF_ROWS: usize = 32;

/// ggml's vectorized `expf` (`ggml_v_expf`, AVX-512 form) for one lane: a polynomial in the
/// reduced argument, scaled by `2^n` with one rounding. Within about 1.5 ulp of `expf`, not
/// always equal to it.
#[inline(always)]
pub fn v_expf(x: f32) -> f32 {
    let r = f32::from_bits(0x4b40_0000); // 0x1.8p23
    let z = x.mul_add(f32::from_bits(0x3fb8_aa3b), r); // 0x1.715476p+0
    let n = z - r;
    let b = (-n).mul_add(
        f32::from_bits(0x35bf_be8e),                  // 0x1.7f7d1cp-20
        (-n).mul_add(f32::from_bits(0x3f31_7200), x), // 0x1.62e4p-1
    );
    let u = b * b;
    let j = f32::from_bits(0x3c07_2010) // 0x1.0e4020p-7
        .mul_add(b, f32::from_bits(0x3d2b_9f17)) // 0x1.573e2ep-5
        .mul_add(
            u,
            // 0x1.555e66p-3, 0x1.fffdb6p-2
            f32::from_bits(0x3e2a_af33).mul_add(b, f32::from_bits(0x3eff_fedb)),
        )
        .mul_add(u, f32::from_bits(0x3f7f_fff6).mul_add(b, 1.0)); // 0x1.ffffecp-1
    if n.is_nan() {
        return n;
    }
    if n.abs() > 192.0 {
        return if n <= 0.0 { 0.0 } else { f32::INFINITY };
    }
    scalef(j, n as i32)
}

/// `j * 2^n` rounded once, for integral `n` in [-192, 192] (AVX-512 `scalef`).
#[inline(always)]
fn scalef(j: f32, n: i32) -> f32 {
    let p2 = |e: i32| f32::from_bits(((e + 127) as u32) << 23);
    if n < -126 {
        (j * p2(n + 100)) * p2(-100)
    } else if n > 127 {
        (j * p2(n - 100)) * p2(100)
    } else {
        j * p2(n)
    }
}

/// ggml's vectorized SiLU (`ggml_v_silu`): `x / (1 + v_expf(0 - x))`.
#[inline(always)]
pub fn v_silu(x: f32) -> f32 {
    x / (1.0 + v_expf(0.0 - x))
}

/// `_mm512_reduce_add_ps` as GCC implements it: halves added pairwise down to one lane.
#[inline(always)]
pub fn reduce16(x: &[f32]) -> f32 {
    let a: [f32; 8] = std::array::from_fn(|i| x[8 + i] + x[i]);
    let b = [a[4] + a[0], a[5] + a[1], a[6] + a[2], a[7] + a[3]];
    (b[0] + b[2]) + (b[1] + b[3])
}

/// The sum `ggml_vec_soft_max_f32` returns for a 64-key tile whose exponentials (0 for masked
/// keys) are `p[slot]`: each group of 16 reduced as [`reduce16`], the four added in f64.
#[inline(always)]
pub fn tile_sum(p: &[f32; KV_TILE]) -> f64 {
    p.chunks_exact(16).map(|g| reduce16(g) as f64).sum()
}

/// Round to f16 and back (nearest even).
#[inline(always)]
fn f16r(x: f32) -> f32 {
    f16::from_f32(x).to_f32()
}

/// `out[r * LANES + l] = scale * (q_l . k_r)` for `r < n`: each dot product one chain of fused
/// multiply-adds in order over the head dimension. `qt` holds the queries transposed (`qt[d *
/// LANES + l]`); key row `r` starts at `rows[r * stride]`. `kbuf` is scratch of `4 * hd`.
pub type ScoreLanesFn = fn(&[f32], usize, &[f16], usize, usize, f32, &mut [f32], &mut [f32]);
/// `out[r] = scale * dot(q, row r)` summed as `ggml_vec_dot_f16` does on AVX-512.
pub type DotRowsFn = fn(&[f16], &[f16], usize, f32, &mut [f32]);
/// `acc[i] = f16(fma(v[i], w, acc[i]))`.
pub type MadFn = fn(&mut [f32], &[f16], f32);

struct Kernels {
    score_lanes: ScoreLanesFn,
    dot_rows: DotRowsFn,
    mad: MadFn,
}

fn kernels() -> &'static Kernels {
    static K: OnceLock<Kernels> = OnceLock::new();
    K.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        if ggml_compat::dot::kernel_set() == ggml_compat::dot::KernelSet::Avx2 {
            return Kernels {
                score_lanes: x86::score_lanes,
                dot_rows: x86::dot_rows_f16_ggml,
                mad: x86::mad_f16_round,
            };
        }
        Kernels {
            score_lanes: portable::score_lanes,
            dot_rows: portable::dot_rows_f16_ggml,
            mad: portable::mad_f16_round,
        }
    })
}

/// See [`ScoreLanesFn`].
#[allow(clippy::too_many_arguments)]
#[inline]
pub fn score_lanes(
    qt: &[f32],
    hd: usize,
    rows: &[f16],
    stride: usize,
    n: usize,
    scale: f32,
    kbuf: &mut [f32],
    out: &mut [f32],
) {
    if n > 0 {
        assert!((n - 1) * stride + hd <= rows.len() && qt.len() >= hd * LANES);
        assert!(out.len() >= n * LANES && kbuf.len() >= KBUF_ROWS * hd);
    }
    (kernels().score_lanes)(qt, hd, rows, stride, n, scale, kbuf, out)
}

/// See [`DotRowsFn`].
#[inline]
pub fn dot_rows_f16_ggml(q: &[f16], rows: &[f16], stride: usize, scale: f32, out: &mut [f32]) {
    if let Some(last) = out.len().checked_sub(1) {
        assert!(last * stride + q.len() <= rows.len(), "rows too short");
    }
    (kernels().dot_rows)(q, rows, stride, scale, out)
}

/// See [`MadFn`].
#[inline]
pub fn mad_f16_round(acc: &mut [f32], v: &[f16], w: f32) {
    assert!(v.len() >= acc.len());
    (kernels().mad)(acc, v, w)
}

/// `acc[i] = f16(acc[i] * s)` (`ggml_vec_scale_f16`).
#[inline]
pub fn scale_f16_round(acc: &mut [f32], s: f32) {
    for a in acc {
        *a = f16r(*a * s);
    }
}

/// `out[r] = v_expf(x[r * LANES] - m)` for `r < out.len()` (one lane of [`score_lanes`]'
/// output). The fused multiply-adds of [`v_expf`] compile to instructions where the CPU has
/// them (a libm `fmaf` call each otherwise).
pub fn exp_lane(x: &[f32], m: f32, out: &mut [f32]) {
    assert!(out.is_empty() || (out.len() - 1) * LANES < x.len());
    #[cfg(target_arch = "x86_64")]
    if ggml_compat::dot::kernel_set() == ggml_compat::dot::KernelSet::Avx2 {
        // SAFETY: the AVX2 kernel set implies FMA support.
        return unsafe { exp_lane_fma(x, m, out) };
    }
    exp_lane_generic(x, m, out)
}

#[inline(always)]
fn exp_lane_generic(x: &[f32], m: f32, out: &mut [f32]) {
    for (r, o) in out.iter_mut().enumerate() {
        *o = v_expf(x[r * LANES] - m);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_lane_fma(x: &[f32], m: f32, out: &mut [f32]) {
    exp_lane_generic(x, m, out)
}

/// llama.cpp's per-key online softmax over one run of keys: `scores[r]` against value row `r`
/// (`v[r * stride..][..acc.len()]`), updating the running maximum `m`, sum `s` and the f16
/// accumulator `acc`.
pub fn online_f16(
    scores: &[f32],
    v: &[f16],
    stride: usize,
    m: &mut f32,
    s: &mut f32,
    acc: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if ggml_compat::dot::kernel_set() == ggml_compat::dot::KernelSet::Avx2 {
        // SAFETY: the AVX2 kernel set implies FMA support.
        return unsafe { online_f16_fma(scores, v, stride, m, s, acc) };
    }
    online_f16_generic(scores, v, stride, m, s, acc)
}

#[inline(always)]
fn online_f16_generic(
    scores: &[f32],
    v: &[f16],
    stride: usize,
    m: &mut f32,
    s: &mut f32,
    acc: &mut [f32],
) {
    let hd = acc.len();
    for (r, &x) in scores.iter().enumerate() {
        let (mut ms, mut vs) = (1.0f32, 1.0f32);
        if x > *m {
            ms = (*m - x).exp();
            *m = x;
            scale_f16_round(acc, ms);
        } else {
            vs = (x - *m).exp();
        }
        mad_f16_round(acc, &v[r * stride..r * stride + hd], vs);
        *s = s.mul_add(ms, vs);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn online_f16_fma(
    scores: &[f32],
    v: &[f16],
    stride: usize,
    m: &mut f32,
    s: &mut f32,
    acc: &mut [f32],
) {
    online_f16_generic(scores, v, stride, m, s, acc)
}

pub mod portable {
    use super::*;

    #[allow(clippy::too_many_arguments)]
    pub fn score_lanes(
        qt: &[f32],
        hd: usize,
        rows: &[f16],
        stride: usize,
        n: usize,
        scale: f32,
        _kbuf: &mut [f32],
        out: &mut [f32],
    ) {
        for r in 0..n {
            let k = &rows[r * stride..r * stride + hd];
            let mut acc = [0f32; LANES];
            for (d, kd) in k.iter().enumerate() {
                let kd = kd.to_f32();
                for (l, a) in acc.iter_mut().enumerate() {
                    *a = qt[d * LANES + l].mul_add(kd, *a);
                }
            }
            for (o, a) in out[r * LANES..(r + 1) * LANES].iter_mut().zip(acc) {
                *o = a * scale;
            }
        }
    }

    /// One `ggml_vec_dot_f16`: four 16-lane accumulators over steps of 64 values, reduced as
    /// `(s0 + s2) + (s1 + s3)` then [`reduce16`], leftovers added in f64.
    pub fn dot_f16_ggml(q: &[f16], k: &[f16]) -> f32 {
        let n = q.len();
        let np = n - n % 64;
        let mut s = [[0f32; 16]; 4];
        for st in (0..np).step_by(64) {
            for (j, sj) in s.iter_mut().enumerate() {
                for (l, a) in sj.iter_mut().enumerate() {
                    let i = st + 16 * j + l;
                    *a = q[i].to_f32().mul_add(k[i].to_f32(), *a);
                }
            }
        }
        let t: [f32; 16] = std::array::from_fn(|l| (s[0][l] + s[2][l]) + (s[1][l] + s[3][l]));
        let mut sum = reduce16(&t) as f64;
        for i in np..n {
            sum += (q[i].to_f32() * k[i].to_f32()) as f64;
        }
        sum as f32
    }

    pub fn dot_rows_f16_ggml(q: &[f16], rows: &[f16], stride: usize, scale: f32, out: &mut [f32]) {
        let d = q.len();
        for (r, o) in out.iter_mut().enumerate() {
            *o = dot_f16_ggml(q, &rows[r * stride..r * stride + d]) * scale;
        }
    }

    pub fn mad_f16_round(acc: &mut [f32], v: &[f16], w: f32) {
        for (a, x) in acc.iter_mut().zip(v) {
            *a = f16r(x.to_f32().mul_add(w, *a));
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::*;
    use std::arch::x86_64::*;

    /// Head dimensions up to this many values use the kernels below.
    const MAX_D: usize = 256;
    /// Keys scored together by `score_lanes_avx2`.
    const KEY_BLOCK: usize = 8;

    #[allow(clippy::too_many_arguments)]
    pub fn score_lanes(
        qt: &[f32],
        hd: usize,
        rows: &[f16],
        stride: usize,
        n: usize,
        scale: f32,
        kbuf: &mut [f32],
        out: &mut [f32],
    ) {
        if !hd.is_multiple_of(8) || hd > MAX_D {
            return portable::score_lanes(qt, hd, rows, stride, n, scale, kbuf, out);
        }
        let mut done = 0;
        if hd.is_multiple_of(16) && std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: AVX-512F detected; lengths asserted by the caller.
            done = unsafe { avx512::score_lanes(qt, hd, rows, stride, n, scale, kbuf, out) };
        }
        // SAFETY: the CPU features were detected (kernel set AVX2 = avx2+fma+f16c); the
        // lengths were asserted by the caller (`score_lanes`).
        unsafe { score_lanes_avx2(qt, hd, rows, stride, done, n, scale, kbuf, out) }
    }

    /// Keys `r0..n` of [`score_lanes`].
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn score_lanes_avx2(
        qt: &[f32],
        hd: usize,
        rows: &[f16],
        stride: usize,
        r0: usize,
        n: usize,
        scale: f32,
        kbuf: &mut [f32],
        out: &mut [f32],
    ) {
        let mut r = r0;
        // SAFETY: row r reads rows[r * stride .. r * stride + hd] (in bounds, asserted by the
        // caller), kbuf holds KEY_BLOCK * hd, qt hd * 8 and out n * 8 values (asserted).
        unsafe {
            // The common head dimension as a constant (HD = 64): the key buffer's rows are
            // then immediate offsets from one pointer.
            let whole = n - (n - r) % KEY_BLOCK;
            if hd == 64 {
                while r < whole {
                    r += score_keys::<KEY_BLOCK, 64>(qt, hd, rows, stride, r, scale, kbuf, out);
                }
            }
            while r < n {
                r += match n - r {
                    KEY_BLOCK.. => {
                        score_keys::<KEY_BLOCK, 0>(qt, hd, rows, stride, r, scale, kbuf, out)
                    }
                    4.. => score_keys::<4, 0>(qt, hd, rows, stride, r, scale, kbuf, out),
                    _ => score_keys::<1, 0>(qt, hd, rows, stride, r, scale, kbuf, out),
                };
            }
        }
    }

    /// Scores of keys `r..r + K` for all lanes: the keys converted to f32 in `kbuf`, then `K`
    /// independent chains of fused multiply-adds over the head dimension (enough chains to
    /// hide the latency of each). Returns `K`. `HD`, when not 0, is `hd` known at compile
    /// time.
    #[allow(clippy::too_many_arguments)]
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn score_keys<const K: usize, const HD: usize>(
        qt: &[f32],
        hd: usize,
        rows: &[f16],
        stride: usize,
        r: usize,
        scale: f32,
        kbuf: &mut [f32],
        out: &mut [f32],
    ) -> usize {
        let hd = if HD == 0 { hd } else { HD };
        // SAFETY: the caller guarantees rows r..r + K, kbuf (K * hd), qt and out in bounds.
        unsafe {
            let kp = kbuf.as_mut_ptr();
            for k in 0..K {
                let src = rows.as_ptr().add((r + k) * stride);
                for c in (0..hd).step_by(8) {
                    let v = _mm256_cvtph_ps(_mm_loadu_si128(src.add(c) as *const __m128i));
                    _mm256_storeu_ps(kp.add(k * hd + c), v);
                }
            }
            let qp = qt.as_ptr();
            let mut a = [_mm256_setzero_ps(); K];
            for d in 0..hd {
                let q = _mm256_loadu_ps(qp.add(d * LANES));
                for (k, a) in a.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(q, _mm256_broadcast_ss(&*kp.add(k * hd + d)), *a);
                }
            }
            let sv = _mm256_set1_ps(scale);
            let o = out.as_mut_ptr().add(r * LANES);
            for (k, a) in a.iter().enumerate() {
                _mm256_storeu_ps(o.add(k * LANES), _mm256_mul_ps(*a, sv));
            }
            K
        }
    }

    /// [`score_lanes`] in AVX-512 registers: a register holds two keys' scores for the eight
    /// queries (lanes `2l` and `2l + 1`: query `l` against keys `r` and `r + 1`), the same FMA
    /// chain per score as the AVX2 kernel.
    mod avx512 {
        use super::*;

        /// Key pairs scored together.
        const PAIRS: usize = 8;

        /// Scores keys `0..n - n % 2` into `out` and returns how many; `scratch` holds the
        /// queries duplicated lane by lane (`16 * hd`) and the converted key pairs (`16 * hd`).
        #[allow(clippy::too_many_arguments)]
        #[target_feature(enable = "avx512f")]
        pub(super) unsafe fn score_lanes(
            qt: &[f32],
            hd: usize,
            rows: &[f16],
            stride: usize,
            n: usize,
            scale: f32,
            scratch: &mut [f32],
            out: &mut [f32],
        ) -> usize {
            let (q2, kb) = scratch.split_at_mut(2 * LANES * hd);
            for (d, q) in qt[..hd * LANES].chunks_exact(LANES).enumerate() {
                for (l, &x) in q.iter().enumerate() {
                    q2[d * 2 * LANES + 2 * l] = x;
                    q2[d * 2 * LANES + 2 * l + 1] = x;
                }
            }
            let mut r = 0;
            // SAFETY: keys r..r + 2P are in bounds (r + 2P <= n, rows asserted by the caller);
            // kb holds 2 * PAIRS * hd values, out n * LANES.
            unsafe {
                while r + 2 * PAIRS <= n {
                    score_pairs::<PAIRS>(q2, hd, rows, stride, r, scale, kb, out);
                    r += 2 * PAIRS;
                }
                while r + 2 <= n {
                    score_pairs::<1>(q2, hd, rows, stride, r, scale, kb, out);
                    r += 2;
                }
            }
            r
        }

        /// Keys `r..r + 2P`, as pairs `(r + 2m, r + 2m + 1)`: each pair's rows interleaved
        /// value by value in `kb`, so one 64-bit broadcast gives a register of both keys'
        /// value `d`.
        #[allow(clippy::too_many_arguments)]
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn score_pairs<const P: usize>(
            q2: &[f32],
            hd: usize,
            rows: &[f16],
            stride: usize,
            r: usize,
            scale: f32,
            kb: &mut [f32],
            out: &mut [f32],
        ) {
            // SAFETY: the caller guarantees the bounds given in `score_lanes`.
            unsafe {
                let kp = kb.as_mut_ptr();
                let lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
                let hi = _mm512_add_epi32(lo, _mm512_set1_epi32(8));
                for m in 0..P {
                    let a = rows.as_ptr().add((r + 2 * m) * stride);
                    let b = a.add(stride);
                    for c in (0..hd).step_by(16) {
                        let ka = _mm512_cvtph_ps(_mm256_loadu_si256(a.add(c) as *const __m256i));
                        let kb = _mm512_cvtph_ps(_mm256_loadu_si256(b.add(c) as *const __m256i));
                        let dst = kp.add(m * 2 * hd + 2 * c);
                        _mm512_storeu_ps(dst, _mm512_permutex2var_ps(ka, lo, kb));
                        _mm512_storeu_ps(dst.add(16), _mm512_permutex2var_ps(ka, hi, kb));
                    }
                }
                let qp = q2.as_ptr();
                let mut acc = [_mm512_setzero_ps(); P];
                for d in 0..hd {
                    let q = _mm512_loadu_ps(qp.add(d * 2 * LANES));
                    for (m, a) in acc.iter_mut().enumerate() {
                        let pair = (kp.add(m * 2 * hd + 2 * d) as *const i64).read_unaligned();
                        let k = _mm512_castsi512_ps(_mm512_set1_epi64(pair));
                        *a = _mm512_fmadd_ps(q, k, *a);
                    }
                }
                // Lanes (l, key) back to key-major order: key r + 2m's eight lanes, then
                // key r + 2m + 1's.
                let split = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
                let sv = _mm512_set1_ps(scale);
                for (m, a) in acc.iter().enumerate() {
                    let s = _mm512_permutexvar_ps(split, _mm512_mul_ps(*a, sv));
                    _mm512_storeu_ps(out.as_mut_ptr().add((r + 2 * m) * LANES), s);
                }
            }
        }
    }

    pub fn dot_rows_f16_ggml(q: &[f16], rows: &[f16], stride: usize, scale: f32, out: &mut [f32]) {
        let d = q.len();
        if !d.is_multiple_of(64) || d > MAX_D {
            return portable::dot_rows_f16_ggml(q, rows, stride, scale, out);
        }
        // SAFETY: features detected; rows in bounds (asserted by the caller).
        unsafe { dot_rows_avx2(q, rows, stride, scale, out) }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_rows_avx2(q: &[f16], rows: &[f16], stride: usize, scale: f32, out: &mut [f32]) {
        let d = q.len();
        // SAFETY: q holds d values, row r spans r * stride .. r * stride + d (asserted).
        unsafe {
            let ld = |p: *const f16, i: usize| {
                _mm256_cvtph_ps(_mm_loadu_si128(p.add(i) as *const __m128i))
            };
            for (r, o) in out.iter_mut().enumerate() {
                let k = rows.as_ptr().add(r * stride);
                // s[j][h]: accumulator j (values 16j.. of each step of 64), lanes 8h..8h+8.
                let mut s = [[_mm256_setzero_ps(); 2]; 4];
                for st in (0..d).step_by(64) {
                    for (j, sj) in s.iter_mut().enumerate() {
                        for (h, a) in sj.iter_mut().enumerate() {
                            let i = st + 16 * j + 8 * h;
                            *a = _mm256_fmadd_ps(ld(q.as_ptr(), i), ld(k, i), *a);
                        }
                    }
                }
                let t = |h: usize| {
                    _mm256_add_ps(
                        _mm256_add_ps(s[0][h], s[2][h]),
                        _mm256_add_ps(s[1][h], s[3][h]),
                    )
                };
                // reduce16: lanes 8..16 + lanes 0..8, then the upper four + the lower four,
                // then (0 + 2) + (1 + 3).
                let a = _mm256_add_ps(t(1), t(0));
                let b = _mm_add_ps(_mm256_extractf128_ps(a, 1), _mm256_castps256_ps128(a));
                let c = _mm_add_ps(b, _mm_movehl_ps(b, b));
                let e = _mm_add_ss(c, _mm_movehdup_ps(c));
                *o = _mm_cvtss_f32(e) * scale;
            }
        }
    }

    pub fn mad_f16_round(acc: &mut [f32], v: &[f16], w: f32) {
        if !acc.len().is_multiple_of(8) {
            return portable::mad_f16_round(acc, v, w);
        }
        // SAFETY: features detected; v holds at least acc.len() values (asserted).
        unsafe { mad_avx2(acc, v, w) }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn mad_avx2(acc: &mut [f32], v: &[f16], w: f32) {
        // SAFETY: acc.len() is a multiple of 8 and v is at least as long.
        unsafe {
            let wv = _mm256_set1_ps(w);
            for c in (0..acc.len()).step_by(8) {
                let a = _mm256_loadu_ps(acc.as_ptr().add(c));
                let x = _mm256_cvtph_ps(_mm_loadu_si128(v.as_ptr().add(c) as *const __m128i));
                let y = _mm256_fmadd_ps(x, wv, a);
                let y = _mm256_cvtph_ps(_mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(y));
                _mm256_storeu_ps(acc.as_mut_ptr().add(c), y);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: u32) -> Vec<f32> {
        crate::backend::cpu::simd::tests::data_in(n, seed, 2.0)
    }

    #[test]
    fn v_expf_is_close_to_expf_and_exact_at_the_edges() {
        assert_eq!(v_expf(0.0), 1.0);
        assert_eq!(v_expf(f32::NEG_INFINITY), 0.0);
        assert_eq!(v_expf(-200.0), 0.0);
        assert_eq!(v_expf(100.0), f32::INFINITY);
        // Normal results (x above about -87.3): within 2 ulp of libm's expf.
        for i in -87_000..10_000 {
            let x = i as f32 * 1e-3;
            let (a, b) = (v_expf(x), x.exp());
            assert!((a - b).abs() <= 2.0 * f32::EPSILON * b, "{x}: {a} vs {b}");
        }
        // Results below the normal range are rounded once, as scalef does.
        let x = -95.0f32;
        assert!((v_expf(x) / x.exp() - 1.0).abs() < 1e-3);
    }

    #[test]
    fn kernels_match_portable_bit_for_bit() {
        for (hd, stride, n) in [
            (64, 192, 11),
            (128, 128, 5),
            (64, 64, 4),
            (24, 24, 3),
            (64, 64, 21),
            (64, 64, 40),
            (48, 96, 19),
        ] {
            let rows: Vec<f16> = data(stride * n, 3)
                .iter()
                .map(|&x| f16::from_f32(x))
                .collect();
            let q32 = data(hd * LANES, 4);
            let (mut a, mut b) = (vec![0f32; n * LANES], vec![0f32; n * LANES]);
            let mut kbuf = vec![0f32; KBUF_ROWS * hd];
            score_lanes(&q32, hd, &rows, stride, n, 0.125, &mut kbuf, &mut a);
            portable::score_lanes(&q32, hd, &rows, stride, n, 0.125, &mut kbuf, &mut b);
            assert_eq!(a, b, "score_lanes hd={hd}");
            let q: Vec<f16> = q32[..hd].iter().map(|&x| f16::from_f32(x)).collect();
            let (mut a, mut b) = (vec![0f32; n], vec![0f32; n]);
            dot_rows_f16_ggml(&q, &rows, stride, 0.125, &mut a);
            portable::dot_rows_f16_ggml(&q, &rows, stride, 0.125, &mut b);
            assert_eq!(a, b, "dot_rows hd={hd}");
            let mut a: Vec<f32> = data(hd, 5).iter().map(|&x| f16r(x)).collect();
            let mut b = a.clone();
            for r in 0..n {
                mad_f16_round(&mut a, &rows[r * stride..], 0.37);
                portable::mad_f16_round(&mut b, &rows[r * stride..], 0.37);
            }
            assert_eq!(a, b, "mad hd={hd}");
        }
    }

    #[test]
    fn sums_follow_the_documented_order() {
        let x: Vec<f32> = (0..16).map(|i| 1.0 + i as f32 * 1e-7).collect();
        let a: [f32; 8] = std::array::from_fn(|i| x[8 + i] + x[i]);
        let b = [a[4] + a[0], a[5] + a[1], a[6] + a[2], a[7] + a[3]];
        assert_eq!(reduce16(&x), (b[0] + b[2]) + (b[1] + b[3]));
        let p: [f32; 64] = std::array::from_fn(|i| 1.0 / (1.0 + i as f32));
        let want: f64 = (0..4)
            .map(|g| reduce16(&p[16 * g..16 * g + 16]) as f64)
            .sum();
        assert_eq!(tile_sum(&p), want);
    }
}
