//! The profiler's backward pass for activations only (no weight gradients): from dL/d(final
//! hidden) down through every layer, last to first. Each layer is first recomputed from its
//! checkpoint (norm, projections, rotation; the MLP half from the saved attention output), then
//! differentiated: residual, SwiGLU MLP, RMSNorm, output projection, attention (tiled softmax
//! backward, which also yields the layer's influence), inverse rotation, Q/K/V projections.

use super::attention;
use super::forward::{self, Checkpoints};
use super::influence::SampleInfluence;
use super::linalg::{self, Mat, RopeTable};
use super::DenseModel;

/// Optional copies of intermediate gradients, for tests and comparisons.
#[derive(Default)]
pub struct Captured {
    /// Per layer, dL/d(layer input hidden) (n x n_embd).
    pub d_hidden: Vec<Vec<f32>>,
    /// Per layer, dL/d(attention output before the output projection) (n x n_head*head_dim).
    pub d_attn_out: Vec<Vec<f32>>,
}

/// Backpropagates `d_final` through all layers, filling `infl` with each layer's influence.
/// With `capture`, the per-layer gradients are kept (layer order).
pub fn backward(
    dm: &DenseModel,
    ck: &Checkpoints,
    d_final: Vec<f32>,
    rope: &RopeTable,
    tile: usize,
    infl: &mut SampleInfluence,
    capture: Option<&mut Captured>,
) {
    let c = &dm.config;
    let (e, f, qd, kvd) = (c.n_embd, c.n_ff, c.q_dim(), c.kv_dim());
    let n = d_final.len() / e;
    let shape = forward::attn_shape(dm, n, tile);
    let mut dx = d_final;
    let mut caps = capture;
    if let Some(cap) = caps.as_deref_mut() {
        cap.d_hidden = vec![Vec::new(); c.n_layer];
        cap.d_attn_out = vec![Vec::new(); c.n_layer];
    }
    for l in (0..c.n_layer).rev() {
        let lw = &dm.layers[l];
        let x = &ck.x[l];
        let o = &ck.o[l];
        let (mlp, _) = forward::mlp_half(dm, l, x, o);
        // MLP: out = x2 + down(silu(gate) * up)
        let mut dh = vec![0f32; n * f];
        linalg::matmul_w(Mat::new(&dx, n, e), &lw.down, f, &mut dh, false);
        let mut du = vec![0f32; n * f];
        linalg::swiglu_backward(&mlp.gate, &mlp.up, &mut dh, &mut du);
        let mut dxn2 = vec![0f32; n * e];
        linalg::matmul_w(Mat::new(&dh, n, f), &lw.gate, e, &mut dxn2, false);
        linalg::matmul_w(Mat::new(&du, n, f), &lw.up, e, &mut dxn2, true);
        drop((dh, du));
        let mut dx2 = dx;
        linalg::rms_norm_backward(&mlp.x2, &lw.ffn_norm, c.rms_eps, &dxn2, &mut dx2);
        drop((mlp, dxn2));
        // Attention: x2 = x + wo(o)
        let mut d_o = vec![0f32; n * qd];
        linalg::matmul_w(Mat::new(&dx2, n, e), &lw.wo, qd, &mut d_o, false);
        let a = forward::attn_inputs(dm, l, x, rope);
        let mut g = attention::backward(shape, &a.q, &a.k, &a.v, o, &ck.lse[l], &d_o);
        infl.set_layer(l, &g);
        rope.apply(&mut g.dq, qd, c.head_dim, true);
        rope.apply(&mut g.dk, kvd, c.head_dim, true);
        let mut dxn = vec![0f32; n * e];
        linalg::matmul_w(Mat::new(&g.dq, n, qd), &lw.wq, e, &mut dxn, false);
        linalg::matmul_w(Mat::new(&g.dk, n, kvd), &lw.wk, e, &mut dxn, true);
        linalg::matmul_w(Mat::new(&g.dv, n, kvd), &lw.wv, e, &mut dxn, true);
        let mut dxl = dx2;
        linalg::rms_norm_backward(x, &lw.attn_norm, c.rms_eps, &dxn, &mut dxl);
        if let Some(cap) = caps.as_deref_mut() {
            cap.d_hidden[l] = dxl.clone();
            cap.d_attn_out[l] = d_o;
        }
        dx = dxl;
    }
}
