//! Causal grouped-query attention for the profiler, tile by tile (flash-attention style), so no
//! N x N matrix ever exists: the forward pass keeps per row only the output and the
//! log-sum-exp of the scores; the backward pass recomputes each (query tile, key tile) of
//! probabilities from Q, K and the log-sum-exp, forms `G = dO V^T` (= dL/dA) and
//! `dS = A (G - rowsum(G A))`, and from them the gradients of Q, K, V and, in the same sweep, the
//! attention influence of every entry (see [`super::influence`]), summed per tile.
//!
//! Layouts: `q`, `o`, `dq`: rows of `n_head * head_dim`; `k`, `v`, `dk`, `dv`: rows of
//! `n_head_kv * head_dim`; `lse`: `n_head` rows of `n` values. The tile edge equals the profile's
//! block size, so one tile's influence is one block's.

use std::sync::Mutex;

use rayon::prelude::*;

use super::influence;
use super::linalg::{exp_approx, sgemm_strided};

/// Shape of one attention call.
#[derive(Debug, Clone, Copy)]
pub struct AttnShape {
    pub n: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    /// Tile edge in tokens (the profile block size).
    pub tile: usize,
}

impl AttnShape {
    fn q_width(&self) -> usize {
        self.n_head * self.head_dim
    }
    fn kv_width(&self) -> usize {
        self.n_head_kv * self.head_dim
    }
    fn group(&self) -> usize {
        self.n_head / self.n_head_kv
    }
    fn scale(&self) -> f32 {
        1.0 / (self.head_dim as f32).sqrt()
    }
    /// Number of tiles along the sequence.
    pub fn tiles(&self) -> usize {
        self.n.div_ceil(self.tile)
    }
    fn range(&self, t: usize) -> (usize, usize) {
        (t * self.tile, ((t + 1) * self.tile).min(self.n))
    }
}

/// `row[j] = exp(row[j] - sub)`, with AVX2+FMA code when the CPU has it.
fn exp_sub_row(row: &mut [f32], sub: f32) {
    #[inline(always)]
    fn body(row: &mut [f32], sub: f32) {
        for v in row.iter_mut() {
            *v = exp_approx(*v - sub);
        }
    }
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2(row: &mut [f32], sub: f32) {
            body(row, sub)
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports the features the function was compiled for.
            unsafe { avx2(row, sub) };
            return;
        }
    }
    body(row, sub)
}

/// Forward attention. Returns the head outputs `o` (rows of `n_head * head_dim`) and the
/// log-sum-exp of each head's scaled scores (`n_head` rows of `n`).
pub fn forward(s: AttnShape, q: &[f32], k: &[f32], v: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let (qw, kvw, d, t) = (s.q_width(), s.kv_width(), s.head_dim, s.tile);
    let nt = s.tiles();
    let scale = s.scale();
    let tiles: Vec<(usize, usize)> = (0..s.n_head)
        .flat_map(|h| (0..nt).map(move |qb| (h, qb)))
        .collect();
    let outs: Vec<(Vec<f32>, Vec<f32>)> = tiles
        .par_iter()
        .map(|&(h, qb)| {
            let g = h / s.group();
            let (r0, r1) = s.range(qb);
            let tr = r1 - r0;
            let mut acc = vec![0f32; tr * d];
            let mut m = vec![f32::NEG_INFINITY; tr];
            let mut l = vec![0f32; tr];
            let mut sc = vec![0f32; tr * t];
            for kb in 0..=qb {
                let (c0, c1) = s.range(kb);
                let tc = c1 - c0;
                sgemm_strided(
                    tr,
                    d,
                    tc,
                    scale,
                    &q[r0 * qw + h * d..],
                    (qw, 1),
                    &k[c0 * kvw + g * d..],
                    (1, kvw),
                    0.0,
                    &mut sc,
                    tc,
                );
                for i in 0..tr {
                    let row = &mut sc[i * tc..(i + 1) * tc];
                    // Causal: keys after the query are masked (only in the diagonal tile).
                    let visible = (r0 + i + 1).saturating_sub(c0).min(tc);
                    let mx = row[..visible]
                        .iter()
                        .fold(f32::NEG_INFINITY, |a, &b| a.max(b));
                    let m_new = m[i].max(mx);
                    let corr = if m[i] == f32::NEG_INFINITY {
                        0.0
                    } else {
                        (m[i] - m_new).exp()
                    };
                    exp_sub_row(&mut row[..visible], m_new);
                    row[visible..].fill(0.0);
                    l[i] = l[i] * corr + row[..visible].iter().sum::<f32>();
                    m[i] = m_new;
                    for a in &mut acc[i * d..(i + 1) * d] {
                        *a *= corr;
                    }
                }
                sgemm_strided(
                    tr,
                    tc,
                    d,
                    1.0,
                    &sc,
                    (tc, 1),
                    &v[c0 * kvw + g * d..],
                    (kvw, 1),
                    1.0,
                    &mut acc,
                    d,
                );
            }
            for i in 0..tr {
                let inv = 1.0 / l[i];
                for a in &mut acc[i * d..(i + 1) * d] {
                    *a *= inv;
                }
                m[i] += l[i].ln();
            }
            (acc, m)
        })
        .collect();
    let mut o = vec![0f32; s.n * qw];
    let mut lse = vec![0f32; s.n_head * s.n];
    for (&(h, qb), (acc, m)) in tiles.iter().zip(outs) {
        let (r0, r1) = s.range(qb);
        for i in r0..r1 {
            o[i * qw + h * d..i * qw + (h + 1) * d]
                .copy_from_slice(&acc[(i - r0) * d..(i - r0 + 1) * d]);
        }
        lse[h * s.n + r0..h * s.n + r1].copy_from_slice(&m);
    }
    (o, lse)
}

/// What the backward pass of one attention layer produces.
pub struct AttnGrads {
    /// dL/dq (rows of `n_head * head_dim`), before the inverse rotation.
    pub dq: Vec<f32>,
    /// dL/dk, dL/dv (rows of `n_head_kv * head_dim`).
    pub dk: Vec<f32>,
    pub dv: Vec<f32>,
    /// Per KV head, the packed lower-triangular block sums of |E| over the group's query heads
    /// (`tiles * (tiles + 1) / 2` values per KV head, index `qb * (qb + 1) / 2 + kb`).
    pub influence: Vec<Vec<f64>>,
}

/// Backward attention: given the forward inputs, the outputs `o`, their log-sum-exp and
/// `do_ = dL/do`, returns the input gradients and the influence block sums.
pub fn backward(
    s: AttnShape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    o: &[f32],
    lse: &[f32],
    do_: &[f32],
) -> AttnGrads {
    let (qw, kvw, d, t) = (s.q_width(), s.kv_width(), s.head_dim, s.tile);
    let nt = s.tiles();
    let gs = s.group();
    let scale = s.scale();
    // Thread-local dK / dV accumulators, at most one per concurrently running task.
    let pool: Mutex<Vec<(Vec<f32>, Vec<f32>)>> = Mutex::new(Vec::new());
    // Longest tasks (last query tiles) first, for load balance.
    let tasks: Vec<(usize, usize)> = (0..nt)
        .rev()
        .flat_map(|qb| (0..s.n_head_kv).map(move |g| (g, qb)))
        .collect();
    let outs: Vec<(Vec<f32>, Vec<f64>)> = tasks
        .par_iter()
        .map(|&(g, qb)| {
            let (mut dk, mut dv) = pool
                .lock()
                .unwrap()
                .pop()
                .unwrap_or_else(|| (vec![0f32; s.n * kvw], vec![0f32; s.n * kvw]));
            let (r0, r1) = s.range(qb);
            let tr = r1 - r0;
            let mut dq = vec![0f32; gs * tr * d];
            let mut infl = vec![0f64; qb + 1];
            let mut sc = vec![0f32; tr * t];
            let mut dp = vec![0f32; tr * t];
            let mut dsum = vec![0f32; tr];
            for hh in 0..gs {
                let h = g * gs + hh;
                let dq_h = &mut dq[hh * tr * d..(hh + 1) * tr * d];
                for (i, ds) in dsum.iter_mut().enumerate() {
                    let r = (r0 + i) * qw + h * d;
                    *ds = do_[r..r + d]
                        .iter()
                        .zip(&o[r..r + d])
                        .map(|(a, b)| a * b)
                        .sum();
                }
                let lse_h = &lse[h * s.n..(h + 1) * s.n];
                for (kb, infl_kb) in infl.iter_mut().enumerate() {
                    let (c0, c1) = s.range(kb);
                    let tc = c1 - c0;
                    sgemm_strided(
                        tr,
                        d,
                        tc,
                        scale,
                        &q[r0 * qw + h * d..],
                        (qw, 1),
                        &k[c0 * kvw + g * d..],
                        (1, kvw),
                        0.0,
                        &mut sc,
                        tc,
                    );
                    sgemm_strided(
                        tr,
                        d,
                        tc,
                        1.0,
                        &do_[r0 * qw + h * d..],
                        (qw, 1),
                        &v[c0 * kvw + g * d..],
                        (1, kvw),
                        0.0,
                        &mut dp,
                        tc,
                    );
                    let mut tile_sum = 0f64;
                    for i in 0..tr {
                        let row = &mut sc[i * tc..(i + 1) * tc];
                        let visible = (r0 + i + 1).saturating_sub(c0).min(tc);
                        exp_sub_row(&mut row[..visible], lse_h[r0 + i]);
                        row[visible..].fill(0.0);
                        let dpr = &mut dp[i * tc..(i + 1) * tc];
                        dpr[visible..].fill(0.0);
                        // sc now holds A, dp holds G; turn dp into dS and sum |E|.
                        tile_sum += influence::row_abs_influence(
                            &row[..visible],
                            &mut dpr[..visible],
                            dsum[i],
                            r0 + i == 0,
                        );
                    }
                    *infl_kb += tile_sum;
                    // dq += scale * dS K
                    sgemm_strided(
                        tr,
                        tc,
                        d,
                        scale,
                        &dp,
                        (tc, 1),
                        &k[c0 * kvw + g * d..],
                        (kvw, 1),
                        1.0,
                        dq_h,
                        d,
                    );
                    // dk += scale * dS^T Q
                    sgemm_strided(
                        tc,
                        tr,
                        d,
                        scale,
                        &dp,
                        (1, tc),
                        &q[r0 * qw + h * d..],
                        (qw, 1),
                        1.0,
                        &mut dk[c0 * kvw + g * d..],
                        kvw,
                    );
                    // dv += A^T dO
                    sgemm_strided(
                        tc,
                        tr,
                        d,
                        1.0,
                        &sc,
                        (1, tc),
                        &do_[r0 * qw + h * d..],
                        (qw, 1),
                        1.0,
                        &mut dv[c0 * kvw + g * d..],
                        kvw,
                    );
                }
            }
            pool.lock().unwrap().push((dk, dv));
            (dq, infl)
        })
        .collect();
    let mut dq = vec![0f32; s.n * qw];
    let mut infl_out = vec![vec![0f64; nt * (nt + 1) / 2]; s.n_head_kv];
    for (&(g, qb), (dqt, infl)) in tasks.iter().zip(outs) {
        let (r0, r1) = s.range(qb);
        let tr = r1 - r0;
        for hh in 0..gs {
            let h = g * gs + hh;
            for i in 0..tr {
                let src = &dqt[(hh * tr + i) * d..(hh * tr + i + 1) * d];
                dq[(r0 + i) * qw + h * d..(r0 + i) * qw + (h + 1) * d].copy_from_slice(src);
            }
        }
        let base = qb * (qb + 1) / 2;
        infl_out[g][base..base + qb + 1].copy_from_slice(&infl);
    }
    let mut accs = pool.into_inner().unwrap().into_iter();
    let (mut dk, mut dv) = accs
        .next()
        .unwrap_or_else(|| (vec![0f32; s.n * kvw], vec![0f32; s.n * kvw]));
    for (k2, v2) in accs {
        dk.iter_mut().zip(&k2).for_each(|(a, b)| *a += b);
        dv.iter_mut().zip(&v2).for_each(|(a, b)| *a += b);
    }
    AttnGrads {
        dq,
        dk,
        dv,
        influence: infl_out,
    }
}
