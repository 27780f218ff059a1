//! Quantized matrix products on the CPU: activations quantized once per row into the weight
//! type's activation format (as llama.cpp does), then ggml-compat dot kernels: two rows by four
//! tokens per call where a tile kernel exists and the batch has four tokens, else one or two rows
//! per (token) call, every product equal to the single-row kernel's. Parallel over blocks of
//! weight rows with rayon so each block of weights is read once from memory for all tokens of
//! the batch.

use ggml_compat::dot::{Dot2Fn, DotFn, DotTileFn, TILE_TOKENS};
use ggml_compat::GgmlType;
use rayon::prelude::*;

/// A pointer that may be shared across rayon tasks that write disjoint elements.
#[derive(Clone, Copy)]
pub struct SharedMut<T>(pub *mut T);
// SAFETY: used only to let parallel tasks write disjoint index sets of one buffer (each use
// site documents why its sets are disjoint); the buffer outlives the parallel region.
unsafe impl<T: Send> Send for SharedMut<T> {}
// SAFETY: as above.
unsafe impl<T: Send> Sync for SharedMut<T> {}

impl<T> SharedMut<T> {
    /// The pointer (a method, so closures capture the `Send` wrapper, not the raw field).
    pub fn ptr(self) -> *mut T {
        self.0
    }
}

/// Quantizes `n` rows of `width` f32 values into `out` (rows of `act_row_bytes` of type `ty`),
/// with the arithmetic of llama.cpp's x86 CPU backend ([`ggml_compat::quantize_row_activations`]).
pub fn quantize_rows(ty: GgmlType, x: &[f32], width: usize, n: usize, out: &mut [u8]) {
    let rb = ty
        .bytes_for(width as u64)
        .expect("activation widths are whole blocks") as usize;
    out[..n * rb]
        .par_chunks_mut(rb)
        .zip(x[..n * width].par_chunks(width))
        .for_each(|(dst, src)| {
            ggml_compat::quantize_row_activations(ty, src, dst).expect("sizes checked")
        });
}

/// Most matrices one [`matmul`] call takes.
pub const MAX_JOBS: usize = 4;

/// One weight matrix of a [`matmul`] call and where its products go.
pub struct MatJob<'a> {
    pub dot: DotFn,
    /// Two rows at a time with the same results as `dot`, where such a kernel exists.
    pub dot2: Option<Dot2Fn>,
    /// Two rows by [`TILE_TOKENS`] tokens with the same results as `dot` (batches of at least
    /// that many tokens), where such a kernel exists.
    pub tile: Option<DotTileFn>,
    /// `rows` rows of `row_bytes`.
    pub w: &'a [u8],
    pub rows: usize,
    pub row_bytes: usize,
    pub cols: usize,
    /// `n` output rows of `rows` values (at least `n * rows` elements).
    pub out: &'a mut [f32],
}

/// For every job, `out[t * rows + r] = dot(W row r, xq row t)` for `r < rows`, `t < n`.
///
/// All jobs share the quantized activations `xq` (`n` rows of `act_row_bytes`) and run in one
/// parallel region, split into blocks of weight rows so each block of weights is read from
/// memory once for all tokens. Several matrices of one input (Q, K and V; gate and up) in one
/// call save a fork-join per matrix, which dominates small decode steps.
///
/// `tasks` is caller-owned scratch (its capacity is kept between calls, so steady-state calls
/// allocate nothing).
pub fn matmul(
    jobs: &mut [MatJob],
    xq: &[u8],
    act_row_bytes: usize,
    n: usize,
    tasks: &mut Vec<(usize, usize, usize)>,
) {
    assert!(
        jobs.len() <= MAX_JOBS,
        "at most {MAX_JOBS} matrices per call"
    );
    let threads = rayon::current_num_threads().max(1);
    let total_rows: usize = jobs.iter().map(|j| j.rows).sum();
    // Blocks small enough to balance the threads, large enough to amortize task overhead.
    let block = (total_rows / (threads * 8)).clamp(4, 256);
    tasks.clear();
    for (j, job) in jobs.iter().enumerate() {
        assert!(job.w.len() >= job.rows * job.row_bytes && job.out.len() >= n * job.rows);
        let mut r0 = 0;
        while r0 < job.rows {
            tasks.push((j, r0, (r0 + block).min(job.rows)));
            r0 += block;
        }
    }
    assert!(xq.len() >= n * act_row_bytes);
    let mut outs = [SharedMut(std::ptr::null_mut::<f32>()); MAX_JOBS];
    for (o, j) in outs.iter_mut().zip(jobs.iter_mut()) {
        *o = SharedMut(j.out.as_mut_ptr());
    }
    let jobs = &*jobs;
    tasks.par_iter().for_each(|&(j, r0, r1)| {
        let job = &jobs[j];
        let out = outs[j];
        let act = |t: usize| &xq[t * act_row_bytes..(t + 1) * act_row_bytes];
        let row = |r: usize| &job.w[r * job.row_bytes..(r + 1) * job.row_bytes];
        // SAFETY (every write below): each task writes rows r0..r1 of one job's output, for
        // every token; tasks of a job cover disjoint row ranges and jobs have distinct buffers
        // (distinct &mut slices), and t * rows + r < n * rows <= out.len() (asserted).
        let put = |t: usize, r: usize, v: f32| {
            debug_assert!(t < n && (r0..r1).contains(&r));
            unsafe { *out.ptr().add(t * job.rows + r) = v }
        };
        // Whole tiles of tokens first: each weight row pair unpacked once per four tokens.
        let mut t0 = 0;
        if let Some(tile) = job.tile {
            while t0 + TILE_TOKENS <= n {
                let a: [&[u8]; TILE_TOKENS] = std::array::from_fn(|k| act(t0 + k));
                let mut r = r0;
                while r + 1 < r1 {
                    let v = tile(job.cols, row(r), row(r + 1), a);
                    for (k, (&v0, &v1)) in v[0].iter().zip(&v[1]).enumerate() {
                        put(t0 + k, r, v0);
                        put(t0 + k, r + 1, v1);
                    }
                    r += 2;
                }
                if r < r1 {
                    for (k, ak) in a.iter().enumerate() {
                        put(t0 + k, r, (job.dot)(job.cols, row(r), ak));
                    }
                }
                t0 += TILE_TOKENS;
            }
        }
        for t in t0..n {
            let a = act(t);
            let mut r = r0;
            if let Some(dot2) = job.dot2 {
                while r + 1 < r1 {
                    let (v0, v1) = dot2(job.cols, row(r), row(r + 1), a);
                    put(t, r, v0);
                    put(t, r + 1, v1);
                    r += 2;
                }
            }
            for r in r..r1 {
                put(t, r, (job.dot)(job.cols, row(r), a));
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use ggml_compat::dot::{dot2_kernel, dot_kernel, dot_tile_kernel, vec_dot_type};

    /// Every (row, token) product of [`matmul`] equals one call of the single-row kernel, bit
    /// for bit, whatever path computed it: four-token tiles with an odd row left over, two-row
    /// pairs for the tokens past the last tile, rows split over tasks; several jobs at once.
    #[test]
    fn matmul_products_equal_single_row_dots() {
        let mut seed = 0x5eed_u64;
        let mut rnd = move || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) as u32
        };
        for ty in [GgmlType::Q4_1, GgmlType::Q8_0, GgmlType::Q4_K] {
            let cols = 256;
            let at = vec_dot_type(ty).unwrap();
            let arb = at.bytes_for(cols as u64).unwrap() as usize;
            let rb = ty.bytes_for(cols as u64).unwrap() as usize;
            for n in [1usize, 3, 4, 6, 9] {
                let x: Vec<f32> = (0..n * cols)
                    .map(|_| rnd() as f32 / u32::MAX as f32 - 0.5)
                    .collect();
                let mut xq = vec![0u8; n * arb];
                quantize_rows(at, &x, cols, n, &mut xq);
                // Random bytes with small f16 scales, so every block decodes to finite values.
                let weights = |rows: usize, rnd: &mut dyn FnMut() -> u32| -> Vec<u8> {
                    let w: Vec<f32> = (0..rows * cols)
                        .map(|_| rnd() as f32 / u32::MAX as f32 - 0.5)
                        .collect();
                    let mut q = vec![0u8; rows * rb];
                    for (dst, src) in q.chunks_mut(rb).zip(w.chunks(cols)) {
                        ggml_compat::quantize_row(ty, src, dst).unwrap();
                    }
                    q
                };
                let (ra, rbows) = (7, 38);
                let (wa, wb) = (weights(ra, &mut rnd), weights(rbows, &mut rnd));
                let (mut oa, mut ob) = (vec![0f32; n * ra], vec![0f32; n * rbows]);
                let dot = dot_kernel(ty).unwrap();
                let mut jobs = [
                    MatJob {
                        dot,
                        dot2: dot2_kernel(ty),
                        tile: dot_tile_kernel(ty),
                        w: &wa,
                        rows: ra,
                        row_bytes: rb,
                        cols,
                        out: &mut oa,
                    },
                    MatJob {
                        dot,
                        dot2: dot2_kernel(ty),
                        tile: dot_tile_kernel(ty),
                        w: &wb,
                        rows: rbows,
                        row_bytes: rb,
                        cols,
                        out: &mut ob,
                    },
                ];
                matmul(&mut jobs, &xq, arb, n, &mut Vec::new());
                for (w, rows, out) in [(&wa, ra, &oa), (&wb, rbows, &ob)] {
                    for t in 0..n {
                        for r in 0..rows {
                            let want =
                                dot(cols, &w[r * rb..(r + 1) * rb], &xq[t * arb..(t + 1) * arb]);
                            assert_eq!(
                                out[t * rows + r].to_bits(),
                                want.to_bits(),
                                "{ty} n={n} row {r} of {rows} token {t}"
                            );
                        }
                    }
                }
            }
        }
    }
}
