//! The profiler's forward pass, in f32 on dequantized weights, over a whole sequence at once,
//! keeping only checkpoints: per layer its input hidden state and its attention output with the
//! rows' log-sum-exp (the expensive part to recompute). Everything else of a layer is recomputed
//! by the backward pass from these, so memory is `n_layer * n * (n_embd + n_head * head_dim)`
//! floats plus one layer's intermediates (about 1.2 GB at 8192 tokens for SmolLM2-135M). Then
//! the loss: mean cross-entropy of the response tokens, and its gradient at the final hidden
//! state (logits are computed only at the positions that predict a response token).

use super::attention::{self, AttnShape};
use super::dense::DenseModel;
use super::linalg::{self, Mat, RopeTable};

/// What the backward pass needs from the forward pass.
pub struct Checkpoints {
    /// Per layer: its input hidden state (n x n_embd).
    pub x: Vec<Vec<f32>>,
    /// Per layer: the attention output before the output projection (n x n_head*head_dim).
    pub o: Vec<Vec<f32>>,
    /// Per layer: log-sum-exp of each head's scaled scores (n_head x n).
    pub lse: Vec<Vec<f32>>,
    /// The last layer's output (n x n_embd).
    pub final_x: Vec<f32>,
}

/// A layer's attention inputs, recomputable from its input.
pub struct AttnInputs {
    /// RMSNorm of the input (n x n_embd).
    pub xn: Vec<f32>,
    /// Rotated queries (n x n_head*head_dim), rotated keys and values (n x n_head_kv*head_dim).
    pub q: Vec<f32>,
    pub k: Vec<f32>,
    pub v: Vec<f32>,
}

/// A layer's MLP half, recomputable from its input and attention output.
pub struct MlpActs {
    /// Hidden state after the attention residual (n x n_embd).
    pub x2: Vec<f32>,
    /// Its RMSNorm (n x n_embd).
    pub xn2: Vec<f32>,
    /// Gate and up projections (n x n_ff) and `silu(gate) * up`.
    pub gate: Vec<f32>,
    pub up: Vec<f32>,
    pub hmid: Vec<f32>,
}

pub fn attn_shape(dm: &DenseModel, n: usize, tile: usize) -> AttnShape {
    let c = &dm.config;
    AttnShape {
        n,
        n_head: c.n_head,
        n_head_kv: c.n_head_kv,
        head_dim: c.head_dim,
        tile,
    }
}

/// Norm, projections and rotation of layer `l` for input `x`.
pub fn attn_inputs(dm: &DenseModel, l: usize, x: &[f32], rope: &RopeTable) -> AttnInputs {
    let c = &dm.config;
    let lw = &dm.layers[l];
    let (e, n) = (c.n_embd, x.len() / c.n_embd);
    let mut xn = vec![0f32; n * e];
    linalg::rms_norm(x, &lw.attn_norm, c.rms_eps, &mut xn);
    let mut q = vec![0f32; n * c.q_dim()];
    let mut k = vec![0f32; n * c.kv_dim()];
    let mut v = vec![0f32; n * c.kv_dim()];
    let xm = Mat::new(&xn, n, e);
    linalg::matmul_wt(xm, &lw.wq, c.q_dim(), &mut q);
    linalg::matmul_wt(xm, &lw.wk, c.kv_dim(), &mut k);
    linalg::matmul_wt(xm, &lw.wv, c.kv_dim(), &mut v);
    rope.apply(&mut q, c.q_dim(), c.head_dim, false);
    rope.apply(&mut k, c.kv_dim(), c.head_dim, false);
    AttnInputs { xn, q, k, v }
}

/// The rest of layer `l` after attention: returns its activations and its output.
pub fn mlp_half(dm: &DenseModel, l: usize, x: &[f32], o: &[f32]) -> (MlpActs, Vec<f32>) {
    let c = &dm.config;
    let lw = &dm.layers[l];
    let (e, n, f) = (c.n_embd, x.len() / c.n_embd, c.n_ff);
    let mut x2 = vec![0f32; n * e];
    linalg::matmul_wt(Mat::new(o, n, c.q_dim()), &lw.wo, e, &mut x2);
    x2.iter_mut().zip(x).for_each(|(a, b)| *a += b);
    let mut xn2 = vec![0f32; n * e];
    linalg::rms_norm(&x2, &lw.ffn_norm, c.rms_eps, &mut xn2);
    let mut gate = vec![0f32; n * f];
    let mut up = vec![0f32; n * f];
    let xm = Mat::new(&xn2, n, e);
    linalg::matmul_wt(xm, &lw.gate, f, &mut gate);
    linalg::matmul_wt(xm, &lw.up, f, &mut up);
    let mut hmid = vec![0f32; n * f];
    linalg::swiglu(&gate, &up, &mut hmid);
    let mut out = vec![0f32; n * e];
    linalg::matmul_wt(Mat::new(&hmid, n, f), &lw.down, e, &mut out);
    out.iter_mut().zip(&x2).for_each(|(a, b)| *a += b);
    (
        MlpActs {
            x2,
            xn2,
            gate,
            up,
            hmid,
        },
        out,
    )
}

/// Runs the network over `tokens` (ids already checked against the vocabulary), keeping the
/// checkpoints.
pub fn forward(dm: &DenseModel, tokens: &[u32], rope: &RopeTable, tile: usize) -> Checkpoints {
    let c = &dm.config;
    let (e, n) = (c.n_embd, tokens.len());
    let mut x = vec![0f32; n * e];
    for (row, &t) in x.chunks_exact_mut(e).zip(tokens) {
        row.copy_from_slice(&dm.token_embd[t as usize * e..(t as usize + 1) * e]);
    }
    let shape = attn_shape(dm, n, tile);
    let mut ck = Checkpoints {
        x: Vec::with_capacity(c.n_layer),
        o: Vec::with_capacity(c.n_layer),
        lse: Vec::with_capacity(c.n_layer),
        final_x: Vec::new(),
    };
    for l in 0..c.n_layer {
        let a = attn_inputs(dm, l, &x, rope);
        let (o, lse) = attention::forward(shape, &a.q, &a.k, &a.v);
        drop(a);
        let (_, out) = mlp_half(dm, l, &x, &o);
        ck.x.push(std::mem::replace(&mut x, out));
        ck.o.push(o);
        ck.lse.push(lse);
    }
    ck.final_x = x;
    ck
}

/// The loss and its gradient at the final hidden state.
pub struct LossGrad {
    /// Mean cross-entropy over the targets (nats).
    pub loss: f64,
    /// dL/d(final hidden) (n x n_embd), zero except at predicting positions.
    pub d_final: Vec<f32>,
}

/// Mean cross-entropy of `targets` = (position whose logits predict, target id), and its
/// gradient through the final norm. Logits exist only at those positions.
pub fn loss_and_grad(dm: &DenseModel, final_x: &[f32], targets: &[(usize, u32)]) -> LossGrad {
    let c = &dm.config;
    let (e, v, n) = (c.n_embd, c.n_vocab, final_x.len() / c.n_embd);
    let r = targets.len();
    let mut xs = vec![0f32; r * e];
    for (row, &(p, _)) in xs.chunks_exact_mut(e).zip(targets) {
        row.copy_from_slice(&final_x[p * e..(p + 1) * e]);
    }
    let mut xn = vec![0f32; r * e];
    linalg::rms_norm(&xs, &dm.output_norm, c.rms_eps, &mut xn);
    let mut logits = vec![0f32; r * v];
    linalg::matmul_wt(Mat::new(&xn, r, e), dm.output(), v, &mut logits);
    let mut loss = 0f64;
    for (row, &(_, t)) in logits.chunks_exact_mut(v).zip(targets) {
        let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
        let z: f64 = row.iter().map(|&l| (l as f64 - m).exp()).sum();
        let lz = m + z.ln();
        loss += lz - row[t as usize] as f64;
        // d loss_mean / d logits = (softmax - onehot) / r
        for l in row.iter_mut() {
            *l = (((*l as f64 - lz).exp()) / r as f64) as f32;
        }
        row[t as usize] -= 1.0 / r as f32;
    }
    let mut dxn = vec![0f32; r * e];
    linalg::matmul_w(Mat::new(&logits, r, v), dm.output(), e, &mut dxn, false);
    let mut dxs = vec![0f32; r * e];
    linalg::rms_norm_backward(&xs, &dm.output_norm, c.rms_eps, &dxn, &mut dxs);
    let mut d_final = vec![0f32; n * e];
    for (row, &(p, _)) in dxs.chunks_exact(e).zip(targets) {
        d_final[p * e..(p + 1) * e]
            .iter_mut()
            .zip(row)
            .for_each(|(a, b)| *a += b);
    }
    LossGrad {
        loss: loss / r as f64,
        d_final,
    }
}
