//! One 64-key tile of ggml's tiled flash-attention path ([`super::ggml_attn`]) for up to
//! [`LANES`] queries at once. The arithmetic of every query is the one ggml applies to it alone
//! (the same operations on the same values in the same order); only the work is arranged across
//! queries, so each key's score, mask and value row are read once for all of them:
//!
//! - [`tile_weights`]: per query, the tile's maximum over the keys it sees, the rescale of its
//!   running maximum, sum and accumulator (libm `expf`), the keys' weights
//!   `v_expf(score - max)` (0 for keys it does not see) and the tile's sum ([`tile_sum`]) added
//!   to its running sum in f64. A query that sees none of the tile's keys is left untouched.
//! - [`accumulate_lanes`]: `acc_l += p[r][l] * v_r` for the queries that saw the tile, key after
//!   key in order, one fused multiply-add per value on x86 (as ggml's `ggml_vec_mad_f32`; in
//!   AVX-512 registers where the CPU has them, the same operation per value); the portable
//!   fallback multiplies and adds like [`super::simd::axpy_rows_f16`]'s.
//!
//! Scores and weights are lane-major: the value for key `r` and query `l` is at `r * LANES + l`.

use half::f16;

use super::ggml_attn::{tile_sum, v_expf, KV_TILE, LANES};

/// Which keys the tile's queries see: query `l` sits at position `first + l` (lanes from
/// `n_queries` on are empty) and sees key position `j` when `j <= i` and `j < sink` or
/// `j + window > i` (the token-exact span mask, `window` = span - sink).
#[derive(Clone, Copy, Debug)]
pub struct LaneMask {
    pub first: usize,
    pub n_queries: usize,
    pub sink: usize,
    pub window: usize,
}

impl LaneMask {
    /// Whether every query sees every key of `kpos` (ascending, not empty).
    #[inline(always)]
    pub fn sees_all(&self, kpos: &[u32]) -> bool {
        let (j0, j1) = (kpos[0] as usize, kpos[kpos.len() - 1] as usize);
        let last = self.first + self.n_queries - 1;
        j1 <= self.first && (j1 < self.sink || j0 + self.window > last)
    }

    /// Whether query `l` sees key position `j`.
    #[inline(always)]
    pub fn visible(&self, l: usize, j: usize) -> bool {
        let i = self.first + l;
        l < self.n_queries && j <= i && (j < self.sink || j + self.window > i)
    }
}

/// The online softmax's running state of each query: maximum `m` and sum `s`.
#[derive(Clone, Copy, Debug)]
pub struct LaneState {
    pub m: [f32; LANES],
    pub s: [f32; LANES],
}

impl LaneState {
    pub fn new() -> LaneState {
        LaneState {
            m: [f32::NEG_INFINITY; LANES],
            s: [0.0; LANES],
        }
    }
}

impl Default for LaneState {
    fn default() -> Self {
        Self::new()
    }
}

/// Bit `l` set: query `l` sees at least one key of the tile.
pub type Lanes = u32;

/// The softmax step of one tile for all queries: `scores` (lane-major, `kpos.len()` keys of one
/// aligned 64-position tile, in position order) against the running `state`; rescales query
/// `l`'s accumulator `acc[l * hd..][..hd]` when its maximum grows, writes the weights into `p`
/// (lane-major, same keys) and returns the queries that see the tile (their `p` only is
/// meaningful). `slots` is scratch of `KV_TILE * LANES`.
pub fn tile_weights(
    scores: &[f32],
    kpos: &[u32],
    mask: LaneMask,
    state: &mut LaneState,
    acc: &mut [f32],
    p: &mut [f32],
    slots: &mut [f32],
) -> Lanes {
    let n = kpos.len();
    assert!(n <= KV_TILE && scores.len() >= n * LANES && p.len() >= n * LANES);
    assert!(slots.len() >= KV_TILE * LANES && acc.len().is_multiple_of(LANES));
    assert!(mask.n_queries <= LANES && mask.first + LANES < i32::MAX as usize);
    // Positions ascend, so the last is the largest.
    assert!(kpos
        .last()
        .is_none_or(|&j| j as usize + mask.window < i32::MAX as usize));
    #[cfg(target_arch = "x86_64")]
    if ggml_compat::dot::kernel_set() == ggml_compat::dot::KernelSet::Avx2 {
        // SAFETY: the AVX2 kernel set implies avx2 and fma; lengths asserted above.
        return unsafe { x86::tile_weights(scores, kpos, mask, state, acc, p, slots) };
    }
    portable::tile_weights(scores, kpos, mask, state, acc, p)
}

/// Head dimensions up to this many values take the x86 kernel (the limit of
/// [`super::simd::axpy_rows_f16`]'s, whose arithmetic it keeps).
const MAX_D: usize = 256;

/// `acc[l * hd + d] += p[r * LANES + l] * v[r * stride + d]` for the queries in `lanes`, keys
/// `r < n` in order.
pub fn accumulate_lanes(
    acc: &mut [f32],
    hd: usize,
    lanes: Lanes,
    p: &[f32],
    v: &[f16],
    stride: usize,
    n: usize,
) {
    if n == 0 || lanes == 0 {
        return;
    }
    assert!(acc.len() >= LANES * hd && p.len() >= n * LANES && lanes < 1 << LANES);
    assert!((n - 1) * stride + hd <= v.len(), "rows too short");
    #[cfg(target_arch = "x86_64")]
    if ggml_compat::dot::kernel_set() == ggml_compat::dot::KernelSet::Avx2
        && hd.is_multiple_of(8)
        && hd <= MAX_D
    {
        // SAFETY: the AVX2 kernel set implies avx2, fma and f16c; lengths asserted above.
        return unsafe { x86::accumulate_lanes(acc, hd, lanes, p, v, stride, n) };
    }
    portable::accumulate_lanes(acc, hd, lanes, p, v, stride, n)
}

/// The running maximum update of one query for a tile maximum `tmax` (not -inf): when the
/// maximum grows, its sum and accumulator are scaled by libm `expf(m_old - m_new)`.
#[inline(always)]
fn raise_max(m: &mut f32, s: &mut f32, acc: &mut [f32], tmax: f32) {
    let mnew = m.max(tmax);
    if mnew > *m {
        let ms = (*m - mnew).exp();
        for a in acc.iter_mut() {
            *a *= ms;
        }
        *s *= ms;
    }
    *m = mnew;
}

/// Lanes of `lanes`, lowest first.
fn lane_list(lanes: Lanes) -> impl Iterator<Item = usize> {
    (0..LANES).filter(move |l| lanes & (1 << l) != 0)
}

/// The lanes of `lanes` in order, and how many there are.
#[cfg(target_arch = "x86_64")]
fn lane_array(lanes: Lanes) -> ([usize; LANES], usize) {
    let mut list = [0usize; LANES];
    let mut k = 0;
    for l in lane_list(lanes) {
        list[k] = l;
        k += 1;
    }
    (list, k)
}

pub mod portable {
    use super::*;

    /// One query at a time, as ggml's tiled path does.
    pub fn tile_weights(
        scores: &[f32],
        kpos: &[u32],
        mask: LaneMask,
        state: &mut LaneState,
        acc: &mut [f32],
        p: &mut [f32],
    ) -> Lanes {
        let hd = acc.len() / LANES;
        let mut seen = 0;
        for l in 0..mask.n_queries {
            let visible = |c: usize| mask.visible(l, kpos[c] as usize);
            let tmax = (0..kpos.len())
                .filter(|&c| visible(c))
                .fold(f32::NEG_INFINITY, |t, c| t.max(scores[c * LANES + l]));
            if tmax == f32::NEG_INFINITY {
                continue;
            }
            let (m, s) = (&mut state.m[l], &mut state.s[l]);
            raise_max(m, s, &mut acc[l * hd..(l + 1) * hd], tmax);
            let mut slots = [0f32; KV_TILE];
            for (c, &j) in kpos.iter().enumerate() {
                let w = if visible(c) {
                    v_expf(scores[c * LANES + l] - *m)
                } else {
                    0.0
                };
                p[c * LANES + l] = w;
                slots[j as usize % KV_TILE] = w;
            }
            *s = (*s as f64 + tile_sum(&slots)) as f32;
            seen |= 1 << l;
        }
        seen
    }

    pub fn accumulate_lanes(
        acc: &mut [f32],
        hd: usize,
        lanes: Lanes,
        p: &[f32],
        v: &[f16],
        stride: usize,
        n: usize,
    ) {
        for l in lane_list(lanes) {
            let a = &mut acc[l * hd..(l + 1) * hd];
            for r in 0..n {
                let w = p[r * LANES + l];
                for (a, x) in a.iter_mut().zip(&v[r * stride..r * stride + hd]) {
                    *a += w * x.to_f32();
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::*;
    use std::arch::x86_64::*;

    /// [`v_expf`] on eight lanes: the same operations lane by lane.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn v_expf8(x: __m256) -> __m256 {
        let c = |b: u32| _mm256_set1_ps(f32::from_bits(b));
        let r = c(0x4b40_0000);
        let z = _mm256_fmadd_ps(x, c(0x3fb8_aa3b), r);
        let n = _mm256_sub_ps(z, r);
        let neg_n = _mm256_xor_ps(n, _mm256_set1_ps(-0.0));
        let b = _mm256_fmadd_ps(
            neg_n,
            c(0x35bf_be8e),
            _mm256_fmadd_ps(neg_n, c(0x3f31_7200), x),
        );
        let u = _mm256_mul_ps(b, b);
        let j = _mm256_fmadd_ps(
            _mm256_fmadd_ps(
                _mm256_fmadd_ps(c(0x3c07_2010), b, c(0x3d2b_9f17)),
                u,
                _mm256_fmadd_ps(c(0x3e2a_af33), b, c(0x3eff_fedb)),
            ),
            u,
            _mm256_fmadd_ps(c(0x3f7f_fff6), b, _mm256_set1_ps(1.0)),
        );
        // scalef: j * 2^n as (j * 2^e1) * 2^e2, with e2 = -+100 outside the normal exponents
        // and 0 (a multiplication by one) inside.
        let ni = _mm256_cvttps_epi32(n);
        let below = _mm256_cmpgt_epi32(_mm256_set1_epi32(-126), ni);
        let above = _mm256_cmpgt_epi32(ni, _mm256_set1_epi32(127));
        let shift = _mm256_or_si256(
            _mm256_and_si256(below, _mm256_set1_epi32(100)),
            _mm256_and_si256(above, _mm256_set1_epi32(-100)),
        );
        let pow2 = |e: __m256i| {
            _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
                e,
                _mm256_set1_epi32(127),
            )))
        };
        let e1 = _mm256_add_epi32(ni, shift);
        let e2 = _mm256_sub_epi32(_mm256_setzero_si256(), shift);
        let scaled = _mm256_mul_ps(_mm256_mul_ps(j, pow2(e1)), pow2(e2));
        // |n| > 192: 0 or infinity; NaN stays NaN.
        let abs_n = _mm256_andnot_ps(_mm256_set1_ps(-0.0), n);
        let huge = _mm256_cmp_ps::<_CMP_GT_OQ>(abs_n, _mm256_set1_ps(192.0));
        let pos = _mm256_cmp_ps::<_CMP_GT_OQ>(n, _mm256_setzero_ps());
        let edge = _mm256_and_ps(pos, _mm256_set1_ps(f32::INFINITY));
        let out = _mm256_blendv_ps(scaled, edge, huge);
        _mm256_blendv_ps(out, n, _mm256_cmp_ps::<_CMP_UNORD_Q>(n, n))
    }

    /// All-ones in the lanes whose query sees key position `j`.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn visible8(ipos: __m256i, j: u32, mask: &LaneMask) -> __m256 {
        let after = _mm256_cmpgt_epi32(_mm256_set1_epi32(j as i32), ipos);
        let seen = if (j as usize) < mask.sink {
            _mm256_cmpeq_epi32(after, after)
        } else {
            _mm256_cmpgt_epi32(_mm256_set1_epi32((j as usize + mask.window) as i32), ipos)
        };
        _mm256_castsi256_ps(_mm256_andnot_si256(after, seen))
    }

    /// [`tile_sum`] of each lane: `slots[slot * LANES + l]` holds lane `l`'s weights by slot.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn tile_sums8(slots: &[f32]) -> (__m256d, __m256d) {
        // SAFETY: slots holds KV_TILE * LANES values (asserted by `tile_weights`).
        let row = |k: usize| unsafe { _mm256_loadu_ps(slots.as_ptr().add(k * LANES)) };
        let mut total = (_mm256_setzero_pd(), _mm256_setzero_pd());
        for g in 0..KV_TILE / 16 {
            let a: [__m256; 8] =
                std::array::from_fn(|i| _mm256_add_ps(row(16 * g + 8 + i), row(16 * g + i)));
            let b0 = _mm256_add_ps(a[4], a[0]);
            let b1 = _mm256_add_ps(a[5], a[1]);
            let b2 = _mm256_add_ps(a[6], a[2]);
            let b3 = _mm256_add_ps(a[7], a[3]);
            let r = _mm256_add_ps(_mm256_add_ps(b0, b2), _mm256_add_ps(b1, b3));
            let lo = _mm256_cvtps_pd(_mm256_castps256_ps128(r));
            let hi = _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(r));
            // The f64 sum starts at zero; groups are never -0, so 0 + r0 = r0.
            total = if g == 0 {
                (lo, hi)
            } else {
                (_mm256_add_pd(total.0, lo), _mm256_add_pd(total.1, hi))
            };
        }
        total
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn tile_weights(
        scores: &[f32],
        kpos: &[u32],
        mask: LaneMask,
        state: &mut LaneState,
        acc: &mut [f32],
        p: &mut [f32],
        slots: &mut [f32],
    ) -> Lanes {
        let n = kpos.len();
        let hd = acc.len() / LANES;
        let ipos = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        let ipos = _mm256_add_epi32(ipos, _mm256_set1_epi32(mask.first as i32));
        // Empty lanes sit at position -1, before every key.
        let empty = _mm256_cmpgt_epi32(
            ipos,
            _mm256_set1_epi32((mask.first + mask.n_queries) as i32 - 1),
        );
        let ipos = _mm256_or_si256(ipos, empty);
        // SAFETY (loads and stores below): scores and p hold n * LANES values (asserted).
        let score = |c: usize| unsafe { _mm256_loadu_ps(scores.as_ptr().add(c * LANES)) };

        // Most tiles lie wholly inside every query's span: no mask to apply then.
        let all = n > 0 && mask.sees_all(kpos);
        let mut tmax = _mm256_set1_ps(f32::NEG_INFINITY);
        if all {
            for c in 0..n {
                tmax = _mm256_max_ps(tmax, score(c));
            }
        } else {
            for (c, &j) in kpos.iter().enumerate() {
                let seen = visible8(ipos, j, &mask);
                tmax = _mm256_blendv_ps(tmax, _mm256_max_ps(tmax, score(c)), seen);
            }
        }
        let lanes = if all {
            (1 << mask.n_queries) - 1
        } else {
            let any = _mm256_cmp_ps::<_CMP_NEQ_OQ>(tmax, _mm256_set1_ps(f32::NEG_INFINITY));
            _mm256_movemask_ps(any) as Lanes
        };
        if lanes == 0 {
            return 0;
        }
        let mut t = [0f32; LANES];
        // SAFETY: t holds LANES values.
        unsafe { _mm256_storeu_ps(t.as_mut_ptr(), tmax) };
        for l in lane_list(lanes) {
            let (m, s) = (&mut state.m[l], &mut state.s[l]);
            raise_max(m, s, &mut acc[l * hd..(l + 1) * hd], t[l]);
        }

        // SAFETY: state.m holds LANES values.
        let m = unsafe { _mm256_loadu_ps(state.m.as_ptr()) };
        for (c, &j) in kpos.iter().enumerate() {
            let mut w = v_expf8(_mm256_sub_ps(score(c), m));
            if !all {
                w = _mm256_and_ps(w, visible8(ipos, j, &mask));
            }
            // SAFETY: as above.
            unsafe { _mm256_storeu_ps(p.as_mut_ptr().add(c * LANES), w) };
        }
        // A whole tile holds every slot in order; a partial one is scattered by position.
        let sums = if n == KV_TILE {
            // SAFETY: p holds KV_TILE * LANES values here.
            unsafe { tile_sums8(p) }
        } else {
            slots[..KV_TILE * LANES].fill(0.0);
            for (c, &j) in kpos.iter().enumerate() {
                let k = j as usize % KV_TILE;
                slots[k * LANES..(k + 1) * LANES].copy_from_slice(&p[c * LANES..(c + 1) * LANES]);
            }
            // SAFETY: slots holds KV_TILE * LANES values (asserted).
            unsafe { tile_sums8(slots) }
        };
        let mut sum = [0f64; LANES];
        // SAFETY: sum holds 2 * 4 values.
        unsafe {
            _mm256_storeu_pd(sum.as_mut_ptr(), sums.0);
            _mm256_storeu_pd(sum.as_mut_ptr().add(4), sums.1);
        }
        for l in lane_list(lanes) {
            state.s[l] = (state.s[l] as f64 + sum[l]) as f32;
        }
        lanes
    }

    /// Queries accumulated together: `BLOCK` accumulators of `2 * 8` values each stay in
    /// registers while the tile's value rows stream by.
    const BLOCK: usize = 4;

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn accumulate_lanes(
        acc: &mut [f32],
        hd: usize,
        lanes: Lanes,
        p: &[f32],
        v: &[f16],
        stride: usize,
        n: usize,
    ) {
        if hd.is_multiple_of(16) && std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: AVX-512F detected; the bounds are the caller's.
            return unsafe { avx512::accumulate_lanes(acc, hd, lanes, p, v, stride, n) };
        }
        let (list, k) = lane_array(lanes);
        for group in list[..k].chunks(BLOCK) {
            let mut d = 0;
            // SAFETY (all blocks): each lane's accumulator spans l * hd .. (l + 1) * hd within
            // acc, and rows r < n span r * stride .. r * stride + hd within v (asserted).
            while d + 16 <= hd {
                unsafe {
                    match group.len() {
                        4 => block::<4, 2>(acc, hd, group, p, v, stride, n, d),
                        3 => block::<3, 2>(acc, hd, group, p, v, stride, n, d),
                        2 => block::<2, 2>(acc, hd, group, p, v, stride, n, d),
                        _ => block::<1, 2>(acc, hd, group, p, v, stride, n, d),
                    }
                }
                d += 16;
            }
            if d < hd {
                unsafe {
                    match group.len() {
                        4 => block::<4, 1>(acc, hd, group, p, v, stride, n, d),
                        3 => block::<3, 1>(acc, hd, group, p, v, stride, n, d),
                        2 => block::<2, 1>(acc, hd, group, p, v, stride, n, d),
                        _ => block::<1, 1>(acc, hd, group, p, v, stride, n, d),
                    }
                }
            }
        }
    }

    /// Values `d0..d0 + 8 * C` of the `Q` queries `group` over keys `0..n`: per key one load
    /// and conversion of the row part, then a fused multiply-add per query and 8 values.
    #[allow(clippy::too_many_arguments)]
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn block<const Q: usize, const C: usize>(
        acc: &mut [f32],
        hd: usize,
        group: &[usize],
        p: &[f32],
        v: &[f16],
        stride: usize,
        n: usize,
        d0: usize,
    ) {
        // SAFETY: the caller guarantees the bounds described in `accumulate_lanes`.
        unsafe {
            let ap = acc.as_mut_ptr();
            let mut a = [[_mm256_setzero_ps(); C]; Q];
            for (q, aq) in a.iter_mut().enumerate() {
                for (c, x) in aq.iter_mut().enumerate() {
                    *x = _mm256_loadu_ps(ap.add(group[q] * hd + d0 + 8 * c));
                }
            }
            let lane: [usize; Q] = std::array::from_fn(|q| group[q]);
            for r in 0..n {
                let row = v.as_ptr().add(r * stride + d0);
                let x: [__m256; C] = std::array::from_fn(|c| {
                    _mm256_cvtph_ps(_mm_loadu_si128(row.add(8 * c) as *const __m128i))
                });
                let pr = p.as_ptr().add(r * LANES);
                for (q, aq) in a.iter_mut().enumerate() {
                    let w = _mm256_broadcast_ss(&*pr.add(lane[q]));
                    for (c, x) in x.iter().enumerate() {
                        aq[c] = _mm256_fmadd_ps(w, *x, aq[c]);
                    }
                }
            }
            for (q, aq) in a.iter().enumerate() {
                for (c, x) in aq.iter().enumerate() {
                    _mm256_storeu_ps(ap.add(group[q] * hd + d0 + 8 * c), *x);
                }
            }
        }
    }
}

/// [`x86`]'s value accumulation on 16-value registers where the CPU has AVX-512 (the same
/// fused multiply-add per value, so the same results).
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::*;
    use std::arch::x86_64::*;

    /// Queries accumulated together, and 16-value registers per query and pass.
    const BLOCK: usize = 4;
    const WIDE: usize = 4;

    /// `hd` a multiple of 16; see [`super::accumulate_lanes`].
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn accumulate_lanes(
        acc: &mut [f32],
        hd: usize,
        lanes: Lanes,
        p: &[f32],
        v: &[f16],
        stride: usize,
        n: usize,
    ) {
        let (list, k) = lane_array(lanes);
        for group in list[..k].chunks(BLOCK) {
            let mut d = 0;
            // SAFETY (all blocks): as in `x86::accumulate_lanes`.
            while d + 16 * WIDE <= hd {
                unsafe {
                    match group.len() {
                        4 => block::<4, WIDE>(acc, hd, group, p, v, stride, n, d),
                        3 => block::<3, WIDE>(acc, hd, group, p, v, stride, n, d),
                        2 => block::<2, WIDE>(acc, hd, group, p, v, stride, n, d),
                        _ => block::<1, WIDE>(acc, hd, group, p, v, stride, n, d),
                    }
                }
                d += 16 * WIDE;
            }
            while d < hd {
                unsafe {
                    match group.len() {
                        4 => block::<4, 1>(acc, hd, group, p, v, stride, n, d),
                        3 => block::<3, 1>(acc, hd, group, p, v, stride, n, d),
                        2 => block::<2, 1>(acc, hd, group, p, v, stride, n, d),
                        _ => block::<1, 1>(acc, hd, group, p, v, stride, n, d),
                    }
                }
                d += 16;
            }
        }
    }

    /// Values `d0..d0 + 16 * C` of the `Q` queries `group` over keys `0..n`.
    #[allow(clippy::too_many_arguments)]
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn block<const Q: usize, const C: usize>(
        acc: &mut [f32],
        hd: usize,
        group: &[usize],
        p: &[f32],
        v: &[f16],
        stride: usize,
        n: usize,
        d0: usize,
    ) {
        // SAFETY: the caller guarantees the bounds described in `accumulate_lanes`.
        unsafe {
            let ap = acc.as_mut_ptr();
            let lane: [usize; Q] = std::array::from_fn(|q| group[q]);
            let mut a = [[_mm512_setzero_ps(); C]; Q];
            for (q, aq) in a.iter_mut().enumerate() {
                for (c, x) in aq.iter_mut().enumerate() {
                    *x = _mm512_loadu_ps(ap.add(lane[q] * hd + d0 + 16 * c));
                }
            }
            for r in 0..n {
                let row = v.as_ptr().add(r * stride + d0);
                let x: [__m512; C] = std::array::from_fn(|c| {
                    _mm512_cvtph_ps(_mm256_loadu_si256(row.add(16 * c) as *const __m256i))
                });
                let pr = p.as_ptr().add(r * LANES);
                for (q, aq) in a.iter_mut().enumerate() {
                    let w = _mm512_set1_ps(*pr.add(lane[q]));
                    for (c, x) in x.iter().enumerate() {
                        aq[c] = _mm512_fmadd_ps(w, *x, aq[c]);
                    }
                }
            }
            for (q, aq) in a.iter().enumerate() {
                for (c, x) in aq.iter().enumerate() {
                    _mm512_storeu_ps(ap.add(lane[q] * hd + d0 + 16 * c), *x);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: u32, r: f32) -> Vec<f32> {
        crate::backend::cpu::simd::tests::data_in(n, seed, r)
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn v_expf8_equals_v_expf_lane_by_lane() {
        if ggml_compat::dot::kernel_set() != ggml_compat::dot::KernelSet::Avx2 {
            return;
        }
        use std::arch::x86_64::*;
        let mut xs: Vec<f32> = (-200_000..20_000).map(|i| i as f32 * 1e-3).collect();
        xs.extend([
            f32::NEG_INFINITY,
            f32::INFINITY,
            f32::NAN,
            -0.0,
            0.0,
            -87.5,
            -103.9,
            -126.1,
            -150.0,
            88.5,
            130.0,
            -1e30,
            1e30,
        ]);
        xs.extend((0..20_000).map(|i| f32::from_bits(0xc2a0_0000 + i * 97)));
        while !xs.len().is_multiple_of(8) {
            xs.push(0.5);
        }
        for x in xs.chunks_exact(8) {
            let mut y = [0f32; 8];
            // SAFETY: AVX2 kernel set checked; x and y hold 8 values.
            unsafe { _mm256_storeu_ps(y.as_mut_ptr(), x86::v_expf8(_mm256_loadu_ps(x.as_ptr()))) };
            for (&x, &y) in x.iter().zip(&y) {
                let want = v_expf(x);
                assert!(
                    y.to_bits() == want.to_bits() || (y.is_nan() && want.is_nan()),
                    "{x}: {y} vs {want}"
                );
            }
        }
    }

    /// A tile layout: key positions (in order, within one aligned tile) and the mask.
    fn cases() -> Vec<(Vec<u32>, LaneMask)> {
        let mask = |first, n_queries, sink, window| LaneMask {
            first,
            n_queries,
            sink,
            window,
        };
        vec![
            ((128..192).collect(), mask(180, 8, 4, 1 << 20)),
            ((128..192).collect(), mask(100, 8, 4, 1 << 20)),
            ((128..192).collect(), mask(125, 8, 4, 1 << 20)),
            ((0..64).collect(), mask(60, 5, 4, 1 << 20)),
            ((0..4).chain(40..64).collect(), mask(90, 8, 4, 30)),
            ((64..100).collect(), mask(120, 8, 4, 40)),
            ((193..200).collect(), mask(190, 7, 0, 8)),
            ((0..64).collect(), mask(300, 8, 4, 16)),
            ((64..128).collect(), mask(200, 8, 4, 1 << 20)),
            ((64..128).collect(), mask(127, 3, 4, 1 << 20)),
            ((0..4).collect(), mask(500, 8, 4, 20)),
        ]
    }

    #[test]
    fn tile_kernels_match_portable_bit_for_bit() {
        let hd = 64;
        for (case, (kpos, mask)) in cases().into_iter().enumerate() {
            let n = kpos.len();
            let every = (0..mask.n_queries).all(|l| kpos.iter().all(|&j| mask.visible(l, j as _)));
            assert_eq!(mask.sees_all(&kpos), every, "case {case}");
            let scores = data(n * LANES, 7 + case as u32, 6.0);
            let vals: Vec<f16> = data(n * 96, 9, 2.0)
                .iter()
                .map(|&x| f16::from_f32(x))
                .collect();
            let mut state = LaneState::new();
            // A running state from an earlier tile, empty in lane 2.
            for l in 0..LANES {
                state.m[l] = if l == 2 { f32::NEG_INFINITY } else { 1.0 };
                state.s[l] = if l == 2 { 0.0 } else { 3.5 };
            }
            let acc0 = data(LANES * hd, 11, 1.0);
            let (mut acc_a, mut acc_b) = (acc0.clone(), acc0);
            let (mut pa, mut pb) = (vec![0f32; n * LANES], vec![0f32; n * LANES]);
            let mut slots = vec![0f32; KV_TILE * LANES];
            let (mut sa, mut sb) = (state, state);
            let la = tile_weights(
                &scores, &kpos, mask, &mut sa, &mut acc_a, &mut pa, &mut slots,
            );
            let lb = portable::tile_weights(&scores, &kpos, mask, &mut sb, &mut acc_b, &mut pb);
            assert_eq!(la, lb, "case {case}: lanes");
            assert_eq!(sa.m, sb.m, "case {case}: maxima");
            assert_eq!(
                sa.s.map(f32::to_bits),
                sb.s.map(f32::to_bits),
                "case {case}"
            );
            assert_eq!(acc_a, acc_b, "case {case}: rescaled accumulators");
            if case == 1 {
                // The queries all come before the tile: nothing changes.
                assert_eq!((la, sa.m, sa.s), (0, state.m, state.s));
            }
            for l in lane_list(la) {
                for c in 0..n {
                    let (x, y) = (pa[c * LANES + l], pb[c * LANES + l]);
                    assert_eq!(x.to_bits(), y.to_bits(), "case {case} lane {l} key {c}");
                }
            }
            // Values: against one query at a time with the row kernel ggml's path used.
            accumulate_lanes(&mut acc_a, hd, la, &pa, &vals, 96, n);
            for l in lane_list(la) {
                let w: Vec<f32> = (0..n).map(|c| pa[c * LANES + l]).collect();
                let a = &mut acc_b[l * hd..(l + 1) * hd];
                crate::backend::cpu::simd::axpy_rows_f16(a, &w, &vals, 96);
            }
            assert_eq!(acc_a, acc_b, "case {case}: values");
        }
    }

    #[test]
    fn lanes_blocking_covers_odd_head_dims() {
        for hd in [8, 24, 40, 48, 64, 72, 80, 128] {
            let n = 9;
            let p = data(n * LANES, 3, 1.0);
            let vals: Vec<f16> = data(n * hd, 4, 2.0)
                .iter()
                .map(|&x| f16::from_f32(x))
                .collect();
            for lanes in [0b1111_1111, 0b1011_0110, 0b0000_0001, 0b1110_0000] {
                let mut a = data(LANES * hd, 5, 1.0);
                let mut b = a.clone();
                accumulate_lanes(&mut a, hd, lanes, &p, &vals, hd, n);
                for l in 0..LANES {
                    if lanes & (1 << l) != 0 {
                        let w: Vec<f32> = (0..n).map(|c| p[c * LANES + l]).collect();
                        crate::backend::cpu::simd::axpy_rows_f16(
                            &mut b[l * hd..(l + 1) * hd],
                            &w,
                            &vals,
                            hd,
                        );
                    }
                }
                assert_eq!(a, b, "hd {hd} lanes {lanes:b}");
            }
        }
    }
}
