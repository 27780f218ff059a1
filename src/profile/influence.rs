//! Attention influence (moa-method.md section 5). For a head's attention probabilities A and
//! G = dL/dA, masking entry (i, j) and renormalizing its row changes the loss, to first order, by
//!
//! ```text
//! E_ij = -A_ij (G_ij - sum_k G_ik A_ik) / (1 - A_ij + eps)
//! ```
//!
//! and row 0, whose only key cannot be renormalized, by `E_00 = -G_00 A_00`. The profiler sums
//! |E| over 64 x 64 (query, key) blocks, over the query heads of each KV group, and over samples.
//! `sum_k G_ik A_ik = dO_i . O_i`, and `A_ij (G_ij - sum_k G_ik A_ik)` is the softmax backward
//! `dS_ij`, so the influence falls out of the attention backward pass at no extra matrix cost.

use super::attention::AttnGrads;
use crate::moa::profile_file::{Profile, ProfileError};

/// The epsilon of the denominator (the reference implementation adds one too).
pub const EPS: f32 = 1e-6;

/// Influence of one entry: `a = A_ij`, `g = G_ij`, `gbar = sum_k G_ik A_ik`; `only_key` for a
/// row with a single visible key.
#[inline(always)]
pub fn entry(a: f32, g: f32, gbar: f32, only_key: bool) -> f32 {
    if only_key {
        -g * a
    } else {
        -a * (g - gbar) / (1.0 - a + EPS)
    }
}

/// For one query row of a tile: `a` the probabilities of its visible keys, `g` their G (turned
/// into the softmax backward `dS = A (G - gbar)` in place). Returns the sum of |E| over the row.
#[inline]
pub fn row_abs_influence(a: &[f32], g: &mut [f32], gbar: f32, only_key: bool) -> f64 {
    let mut sum = 0f32;
    for (&a, g) in a.iter().zip(g.iter_mut()) {
        sum += entry(a, *g, gbar, only_key).abs();
        *g = a * (*g - gbar);
    }
    sum as f64
}

/// Influence block sums of one sample at one length: per layer, per KV head, the packed
/// lower-triangular block matrix (f64 while accumulating).
pub struct SampleInfluence {
    pub n_layer: usize,
    pub n_head_kv: usize,
    /// Blocks along one side.
    pub blocks: usize,
    /// `[layer][kv_head]` -> packed block sums.
    pub sums: Vec<Vec<Vec<f64>>>,
}

impl SampleInfluence {
    pub fn new(n_layer: usize, n_head_kv: usize, blocks: usize) -> SampleInfluence {
        SampleInfluence {
            n_layer,
            n_head_kv,
            blocks,
            sums: vec![vec![vec![0.0; blocks * (blocks + 1) / 2]; n_head_kv]; n_layer],
        }
    }

    /// Stores the influence of layer `layer` from its attention backward pass.
    pub fn set_layer(&mut self, layer: usize, grads: &AttnGrads) {
        for (g, m) in grads.influence.iter().enumerate() {
            // A sample shorter than the profiled length fills only the leading blocks; the
            // packed layout is row by row, so they are a prefix.
            let dst = &mut self.sums[layer][g];
            dst[..m.len()].copy_from_slice(m);
        }
    }

    /// Adds this sample into `profile` at length index `li` and counts it.
    pub fn add_to(&self, profile: &mut Profile, li: usize) -> Result<(), ProfileError> {
        let h = &profile.header;
        let nb = crate::moa::profile_file::blocks_per_side(h.lengths[li].length, h.block);
        if h.model.n_layer != self.n_layer
            || h.model.n_head_kv != self.n_head_kv
            || nb != self.blocks
        {
            return Err(ProfileError::Shape(format!(
                "sample influence is {} layers x {} KV heads x {} blocks, the profile at length {} is {} x {} x {nb}",
                self.n_layer, self.n_head_kv, self.blocks, h.lengths[li].length, h.model.n_layer, h.model.n_head_kv
            )));
        }
        for l in 0..self.n_layer {
            for g in 0..self.n_head_kv {
                for (d, s) in profile
                    .head_sums_mut(li, l, g)
                    .iter_mut()
                    .zip(&self.sums[l][g])
                {
                    *d += *s as f32;
                }
            }
        }
        profile.header.lengths[li].samples += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first-order formula equals the exact change of a loss linear in A when the entry is
    /// masked and the row renormalized (for a linear loss, first order is exact).
    #[test]
    fn entry_matches_masking_for_linear_loss() {
        let a = [0.1f32, 0.2, 0.3, 0.4];
        let g = [0.5f32, -1.0, 2.0, 0.25];
        let gbar: f32 = a.iter().zip(&g).map(|(a, g)| a * g).sum();
        for j in 0..4 {
            let masked: f32 = (0..4)
                .filter(|&k| k != j)
                .map(|k| g[k] * a[k] / (1.0 - a[j]))
                .sum();
            let exact = masked - gbar;
            let e = entry(a[j], g[j], gbar, false);
            assert!((e - exact).abs() < 1e-5, "{j}: {e} vs {exact}");
        }
        assert_eq!(entry(1.0, 3.0, 3.0, true), -3.0);
    }
}
