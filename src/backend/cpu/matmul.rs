//! Quantized matrix products on the CPU: activations quantized once per row into the weight
//! type's activation format (as llama.cpp does), then one ggml-compat dot kernel call per
//! (weight row, token), parallel over blocks of weight rows with rayon so each block of weights
//! is read once from memory for all tokens of the batch.

use ggml_compat::dot::DotFn;
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

/// Quantizes `n` rows of `width` f32 values into `out` (rows of `act_row_bytes` of type `ty`).
pub fn quantize_rows(ty: GgmlType, x: &[f32], width: usize, n: usize, out: &mut [u8]) {
    let rb = ty
        .bytes_for(width as u64)
        .expect("activation widths are whole blocks") as usize;
    out[..n * rb]
        .par_chunks_mut(rb)
        .zip(x[..n * width].par_chunks(width))
        .for_each(|(dst, src)| ggml_compat::quantize_row(ty, src, dst).expect("sizes checked"));
}

/// `out[t * out_stride + r] = dot(W row r, xq row t)` for `r < rows`, `t < n`.
///
/// `w` holds `rows` rows of `row_bytes`; `xq` holds `n` quantized activation rows of
/// `act_row_bytes`, each `cols` elements.
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    dot: DotFn,
    w: &[u8],
    rows: usize,
    row_bytes: usize,
    cols: usize,
    xq: &[u8],
    act_row_bytes: usize,
    n: usize,
    out: &mut [f32],
    out_stride: usize,
) {
    assert!(w.len() >= rows * row_bytes && xq.len() >= n * act_row_bytes);
    assert!(n == 0 || out.len() >= (n - 1) * out_stride + rows);
    let threads = rayon::current_num_threads().max(1);
    // Blocks small enough to balance the threads, large enough to amortize task overhead.
    let block = (rows / (threads * 8)).clamp(4, 256);
    let out_ptr = SharedMut(out.as_mut_ptr());
    (0..rows.div_ceil(block)).into_par_iter().for_each(|b| {
        let r0 = b * block;
        let r1 = (r0 + block).min(rows);
        for t in 0..n {
            let a = &xq[t * act_row_bytes..(t + 1) * act_row_bytes];
            for r in r0..r1 {
                let v = dot(cols, &w[r * row_bytes..(r + 1) * row_bytes], a);
                // SAFETY: block b writes only rows r0..r1 of each output row t; blocks are
                // disjoint, and the index is inside `out` by the assertion above.
                unsafe { *out_ptr.ptr().add(t * out_stride + r) = v };
            }
        }
    });
}
