//! The f32 arithmetic the profiler is built from: matrix products on row-major buffers (the
//! `matrixmultiply` crate's sgemm, rows split across the rayon pool), RMSNorm and rotary
//! embedding forward and backward, SwiGLU, and a vectorizable `exp`. Pure functions on slices;
//! nothing here knows of models or files.

use rayon::prelude::*;

/// A row-major matrix view: `rows x cols` elements with `stride` elements between rows.
#[derive(Clone, Copy)]
pub struct Mat<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub stride: usize,
}

impl<'a> Mat<'a> {
    pub fn new(data: &'a [f32], rows: usize, cols: usize) -> Mat<'a> {
        assert!(data.len() >= rows * cols, "matrix buffer too small");
        Mat {
            data,
            rows,
            cols,
            stride: cols,
        }
    }
}

/// `c (m x n, row stride ldc) = alpha * op(a) * op(b) + beta * c` where `op(a)` is `m x k` and
/// `op(b)` is `k x n`, each given by its row and column strides. One thread.
#[allow(clippy::too_many_arguments)]
pub fn sgemm_strided(
    m: usize,
    k: usize,
    n: usize,
    alpha: f32,
    a: &[f32],
    (rsa, csa): (usize, usize),
    b: &[f32],
    (rsb, csb): (usize, usize),
    beta: f32,
    c: &mut [f32],
    ldc: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    // Bounds of every element the product reads or writes (strides are non-negative).
    let last = |r: usize, c: usize, rs: usize, cs: usize| (r - 1) * rs + (c - 1) * cs;
    if k > 0 {
        assert!(last(m, k, rsa, csa) < a.len(), "sgemm: a out of bounds");
        assert!(last(k, n, rsb, csb) < b.len(), "sgemm: b out of bounds");
    }
    assert!(last(m, n, ldc, 1) < c.len(), "sgemm: c out of bounds");
    // SAFETY: the asserts above check that every index the product touches is inside the
    // slices; `c` is borrowed mutably and does not alias `a` or `b`.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            alpha,
            a.as_ptr(),
            rsa as isize,
            csa as isize,
            b.as_ptr(),
            rsb as isize,
            csb as isize,
            beta,
            c.as_mut_ptr(),
            ldc as isize,
            1,
        );
    }
}

/// Rows per parallel task for `m` rows.
fn row_chunk(m: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    m.div_ceil(threads * 4).clamp(16, 256)
}

/// `y (m x out) = x (m x in) * w^T` for a weight `w` of `out` rows of `in` elements (the GGUF
/// layout: a row per output). Overwrites `y`.
pub fn matmul_wt(x: Mat, w: &[f32], out: usize, y: &mut [f32]) {
    let (m, k) = (x.rows, x.cols);
    assert_eq!(w.len(), out * k, "weight shape");
    assert!(y.len() >= m * out);
    let chunk = row_chunk(m);
    y[..m * out]
        .par_chunks_mut(chunk * out)
        .enumerate()
        .for_each(|(ci, yc)| {
            let r0 = ci * chunk;
            let rows = yc.len() / out;
            sgemm_strided(
                rows,
                k,
                out,
                1.0,
                &x.data[r0 * x.stride..],
                (x.stride, 1),
                w,
                (1, k),
                0.0,
                yc,
                out,
            );
        });
}

/// `dx (m x in) (+)= dy (m x out) * w` for the same weight layout; accumulates when `acc`.
pub fn matmul_w(dy: Mat, w: &[f32], inp: usize, dx: &mut [f32], acc: bool) {
    let (m, out) = (dy.rows, dy.cols);
    assert_eq!(w.len(), out * inp, "weight shape");
    assert!(dx.len() >= m * inp);
    let chunk = row_chunk(m);
    let beta = if acc { 1.0 } else { 0.0 };
    dx[..m * inp]
        .par_chunks_mut(chunk * inp)
        .enumerate()
        .for_each(|(ci, xc)| {
            let r0 = ci * chunk;
            let rows = xc.len() / inp;
            sgemm_strided(
                rows,
                out,
                inp,
                1.0,
                &dy.data[r0 * dy.stride..],
                (dy.stride, 1),
                w,
                (inp, 1),
                beta,
                xc,
                inp,
            );
        });
}

/// RMSNorm of each row of `x` (`n` wide) times `w`, into `y`.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, y: &mut [f32]) {
    let n = w.len();
    y.par_chunks_mut(n)
        .zip(x.par_chunks(n))
        .for_each(|(yr, xr)| {
            let ms = xr.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / n as f64;
            let r = (1.0 / (ms + eps as f64).sqrt()) as f32;
            for ((o, &v), &g) in yr.iter_mut().zip(xr).zip(w) {
                *o = v * r * g;
            }
        });
}

/// Backward of [`rms_norm`]: adds `dL/dx` to `dx` given `dy = dL/dy`.
pub fn rms_norm_backward(x: &[f32], w: &[f32], eps: f32, dy: &[f32], dx: &mut [f32]) {
    let n = w.len();
    dx.par_chunks_mut(n)
        .zip(x.par_chunks(n).zip(dy.par_chunks(n)))
        .for_each(|(dxr, (xr, dyr))| {
            let ms = xr.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / n as f64;
            let r = 1.0 / (ms + eps as f64).sqrt();
            // dx = r * (dy*w) - x * r^3 * <dy*w, x> / n
            let dot: f64 = dyr
                .iter()
                .zip(w)
                .zip(xr)
                .map(|((&d, &g), &v)| (d * g) as f64 * v as f64)
                .sum();
            let c = (r * r * r * dot / n as f64) as f32;
            let r = r as f32;
            for (((o, &d), &g), &v) in dxr.iter_mut().zip(dyr).zip(w).zip(xr) {
                *o += r * d * g - c * v;
            }
        });
}

/// Rotary embedding tables: `(cos, sin)` of every (position, pair), `n_rot / 2` pairs per
/// position, as llama.cpp's rope type NORM computes the angles (linear scaling and Llama-3
/// frequency factors included), in f64 then rounded.
pub struct RopeTable {
    pub pairs: usize,
    pub cs: Vec<(f32, f32)>,
}

impl RopeTable {
    pub fn new(rope: &crate::model::RopeConfig, n: usize) -> RopeTable {
        let pairs = rope.n_rot / 2;
        let mut cs = Vec::with_capacity(n * pairs);
        for pos in 0..n {
            for i in 0..pairs {
                let ff = rope.freq_factors.as_ref().map_or(1.0, |f| f[i] as f64);
                let inv = (rope.freq_base as f64).powf(-2.0 * i as f64 / rope.n_rot as f64);
                let theta = rope.freq_scale as f64 * pos as f64 * inv / ff;
                let (s, c) = theta.sin_cos();
                cs.push((c as f32, s as f32));
            }
        }
        RopeTable { pairs, cs }
    }

    /// Rotates every head of every row of `x` (rows of `width`, heads of `head_dim`) by its
    /// position's angles; `inverse` rotates backwards (the gradient of the rotation).
    pub fn apply(&self, x: &mut [f32], width: usize, head_dim: usize, inverse: bool) {
        let sign = if inverse { -1.0 } else { 1.0 };
        x.par_chunks_mut(width).enumerate().for_each(|(pos, row)| {
            let cs = &self.cs[pos * self.pairs..(pos + 1) * self.pairs];
            for head in row.chunks_exact_mut(head_dim) {
                for (pair, &(c, s)) in head.chunks_exact_mut(2).zip(cs) {
                    let s = sign * s;
                    let (a, b) = (pair[0], pair[1]);
                    pair[0] = a * c - b * s;
                    pair[1] = a * s + b * c;
                }
            }
        });
    }
}

/// `silu(g) * u` elementwise into `h`.
pub fn swiglu(g: &[f32], u: &[f32], h: &mut [f32]) {
    h.par_chunks_mut(4096)
        .zip(g.par_chunks(4096).zip(u.par_chunks(4096)))
        .for_each(|(h, (g, u))| {
            for ((o, &g), &u) in h.iter_mut().zip(g).zip(u) {
                *o = g / (1.0 + (-g).exp()) * u;
            }
        });
}

/// Backward of [`swiglu`]: given `dh`, writes `dg` over `dh`'s buffer and `du` into `du`.
pub fn swiglu_backward(g: &[f32], u: &[f32], dh_dg: &mut [f32], du: &mut [f32]) {
    dh_dg
        .par_chunks_mut(4096)
        .zip(du.par_chunks_mut(4096))
        .zip(g.par_chunks(4096).zip(u.par_chunks(4096)))
        .for_each(|((dh, du), (g, u))| {
            for (((d, du), &g), &u) in dh.iter_mut().zip(du.iter_mut()).zip(g).zip(u) {
                let sig = 1.0 / (1.0 + (-g).exp());
                let silu = g * sig;
                *du = *d * silu;
                // d silu / dg = sig * (1 + g * (1 - sig))
                *d = *d * u * sig * (1.0 + g * (1.0 - sig));
            }
        });
}

/// `e^x` for f32 without a library call, so loops over it vectorize: Cephes' range reduction
/// `x = n ln2 + r` and degree-5 polynomial (relative error about 2e-7); `e^x = 0` below -87.3.
#[inline(always)]
pub fn exp_approx(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const C1: f32 = 0.693_359_4;
    const C2: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.3, 88.3);
    let n = (x * LOG2E + 0.5).floor();
    let r = x - n * C1 - n * C2;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 5e-1;
    let y = p * r * r + r + 1.0;
    // 2^n by building the exponent bits (n is in [-126, 127] after the clamp).
    let pow2 = f32::from_bits(((n as i32 + 127) as u32) << 23);
    y * pow2
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_approx_is_accurate() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let e = (x as f64).exp();
            let rel = ((exp_approx(x) as f64 - e) / e).abs();
            worst = worst.max(rel);
            x += 0.0137;
        }
        assert!(worst < 1e-6, "worst relative error {worst}");
        assert_eq!(exp_approx(-1000.0), exp_approx(-87.3));
        assert!(exp_approx(-87.3) < 1e-37);
    }

    #[test]
    fn matmuls_match_naive() {
        let (m, k, n) = (37, 19, 23);
        let x: Vec<f32> = (0..m * k)
            .map(|i| ((i * 7 % 13) as f32 - 6.0) / 5.0)
            .collect();
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i * 5 % 11) as f32 - 5.0) / 3.0)
            .collect();
        let mut y = vec![0f32; m * n];
        matmul_wt(Mat::new(&x, m, k), &w, n, &mut y);
        for i in 0..m {
            for o in 0..n {
                let want: f32 = (0..k).map(|c| x[i * k + c] * w[o * k + c]).sum();
                assert!((y[i * n + o] - want).abs() < 1e-4);
            }
        }
        let mut dx = vec![1f32; m * k];
        matmul_w(Mat::new(&y, m, n), &w, k, &mut dx, true);
        for i in 0..m {
            for c in 0..k {
                let want: f32 = 1.0 + (0..n).map(|o| y[i * n + o] * w[o * k + c]).sum::<f32>();
                assert!((dx[i * k + c] - want).abs() < 1e-2 * want.abs().max(1.0));
            }
        }
    }
}
