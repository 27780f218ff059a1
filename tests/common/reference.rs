//! An independent, deliberately naive forward pass of the llama architecture (f64 arithmetic,
//! weights dequantized once, every attention score computed densely and then masked), used as
//! the reference the backends are tested against. K, V and queries are rounded to the cache's
//! element type as llama.cpp does (f16; or q8_0 blocks per head row through ggml-compat's
//! reference quantizer, the query then quantized to q8_0 too); nothing else is shared with the
//! runtime.

use half::f16;
use moa::kv::{KvType, KvTypes};
use moa::model::Model;

pub struct RefModel {
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    pub n_vocab: usize,
    pub eps: f64,
    pub rope_base: f64,
    pub n_rot: usize,
    embd: Vec<Vec<f64>>,
    layers: Vec<RefLayer>,
    out_norm: Vec<f64>,
    output: Vec<Vec<f64>>,
}

struct RefLayer {
    attn_norm: Vec<f64>,
    wq: Vec<Vec<f64>>,
    wk: Vec<Vec<f64>>,
    wv: Vec<Vec<f64>>,
    wo: Vec<Vec<f64>>,
    ffn_norm: Vec<f64>,
    gate: Vec<Vec<f64>>,
    up: Vec<Vec<f64>>,
    down: Vec<Vec<f64>>,
}

fn matrix(m: &Model, name: &str) -> Vec<Vec<f64>> {
    let t = m.file.tensor_info(name).unwrap();
    let cols = t.dims[0] as usize;
    m.file
        .dequantize(name)
        .unwrap()
        .chunks(cols)
        .map(|r| r.iter().map(|&x| x as f64).collect())
        .collect()
}

fn vector(m: &Model, name: &str) -> Vec<f64> {
    m.file
        .dequantize(name)
        .unwrap()
        .iter()
        .map(|&x| x as f64)
        .collect()
}

fn matvec(w: &[Vec<f64>], x: &[f64]) -> Vec<f64> {
    w.iter()
        .map(|row| row.iter().zip(x).map(|(a, b)| a * b).sum())
        .collect()
}

fn rms_norm(x: &[f64], w: &[f64], eps: f64) -> Vec<f64> {
    let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
    let s = 1.0 / (ms + eps).sqrt();
    x.iter().zip(w).map(|(v, g)| v * s * g).collect()
}

/// Rounds each head row of `x` (`head_dim` values) to what a cache of type `ty` holds.
fn round_to(ty: KvType, x: &mut [f64], head_dim: usize) {
    match ty {
        KvType::F16 => {
            for v in x {
                *v = f16::from_f64(*v).to_f64();
            }
        }
        KvType::Q8_0 => {
            for row in x.chunks_mut(head_dim) {
                let f: Vec<f32> = row.iter().map(|&v| v as f32).collect();
                let mut q = vec![0u8; head_dim / 32 * 34];
                moa::formats::q8::quantize_q8_0(&f, &mut q);
                let mut d = vec![0f32; head_dim];
                moa::formats::q8::dequantize_q8_0(&q, &mut d);
                for (v, r) in row.iter_mut().zip(d) {
                    *v = r as f64;
                }
            }
        }
    }
}

impl RefModel {
    pub fn new(m: &Model) -> RefModel {
        let c = &m.config;
        let out_name = if m.file.tensor_info("output.weight").is_some() {
            "output.weight"
        } else {
            "token_embd.weight"
        };
        RefModel {
            n_layer: c.n_layer,
            n_embd: c.n_embd,
            n_head: c.n_head,
            n_head_kv: c.n_head_kv,
            head_dim: c.head_dim,
            n_vocab: c.n_vocab,
            eps: c.rms_eps as f64,
            rope_base: c.rope.freq_base as f64,
            n_rot: c.rope.n_rot,
            embd: matrix(m, "token_embd.weight"),
            layers: (0..c.n_layer)
                .map(|l| {
                    let n = |s: &str| format!("blk.{l}.{s}.weight");
                    RefLayer {
                        attn_norm: vector(m, &n("attn_norm")),
                        wq: matrix(m, &n("attn_q")),
                        wk: matrix(m, &n("attn_k")),
                        wv: matrix(m, &n("attn_v")),
                        wo: matrix(m, &n("attn_output")),
                        ffn_norm: vector(m, &n("ffn_norm")),
                        gate: matrix(m, &n("ffn_gate")),
                        up: matrix(m, &n("ffn_up")),
                        down: matrix(m, &n("ffn_down")),
                    }
                })
                .collect(),
            out_norm: vector(m, "output_norm.weight"),
            output: matrix(m, out_name),
        }
    }

    fn rope(&self, x: &mut [f64], pos: usize) {
        for head in x.chunks_mut(self.head_dim) {
            for i in 0..self.n_rot / 2 {
                let theta = pos as f64 * self.rope_base.powf(-2.0 * i as f64 / self.n_rot as f64);
                let (s, c) = theta.sin_cos();
                let (a, b) = (head[2 * i], head[2 * i + 1]);
                head[2 * i] = a * c - b * s;
                head[2 * i + 1] = a * s + b * c;
            }
        }
    }

    /// Logits at every position of `tokens`; `mask(layer, kv_head, i, j)` says whether query `i`
    /// may see key `j` (it is only asked for `j <= i`).
    pub fn logits(
        &self,
        tokens: &[u32],
        mask: impl Fn(usize, usize, usize, usize) -> bool,
    ) -> Vec<Vec<f32>> {
        self.logits_kv(tokens, KvTypes::default(), mask)
    }

    /// [`RefModel::logits`] with K and V rounded to `kv` (and queries to the K type).
    pub fn logits_kv(
        &self,
        tokens: &[u32],
        kv: KvTypes,
        mask: impl Fn(usize, usize, usize, usize) -> bool,
    ) -> Vec<Vec<f32>> {
        let n = tokens.len();
        let hd = self.head_dim;
        let group = self.n_head / self.n_head_kv;
        let mut x: Vec<Vec<f64>> = tokens
            .iter()
            .map(|&t| self.embd[t as usize].clone())
            .collect();
        for (l, lw) in self.layers.iter().enumerate() {
            let mut qs = Vec::new();
            let mut ks = Vec::new();
            let mut vs = Vec::new();
            for (i, xi) in x.iter().enumerate() {
                let xn = rms_norm(xi, &lw.attn_norm, self.eps);
                let (mut q, mut k, mut v) = (
                    matvec(&lw.wq, &xn),
                    matvec(&lw.wk, &xn),
                    matvec(&lw.wv, &xn),
                );
                self.rope(&mut q, i);
                self.rope(&mut k, i);
                round_to(kv.k, &mut q, hd);
                round_to(kv.k, &mut k, hd);
                round_to(kv.v, &mut v, hd);
                qs.push(q);
                ks.push(k);
                vs.push(v);
            }
            for i in 0..n {
                let mut att = vec![0.0; self.n_head * hd];
                for h in 0..self.n_head {
                    let g = h / group;
                    let q = &qs[i][h * hd..(h + 1) * hd];
                    let scores: Vec<f64> = (0..=i)
                        .map(|j| {
                            let k = &ks[j][g * hd..(g + 1) * hd];
                            q.iter().zip(k).map(|(a, b)| a * b).sum::<f64>() / (hd as f64).sqrt()
                        })
                        .collect();
                    let visible: Vec<bool> = (0..=i).map(|j| mask(l, g, i, j)).collect();
                    let m = scores
                        .iter()
                        .zip(&visible)
                        .filter(|(_, &v)| v)
                        .map(|(s, _)| *s)
                        .fold(f64::NEG_INFINITY, f64::max);
                    let mut sum = 0.0;
                    for j in 0..=i {
                        if visible[j] {
                            let p = (scores[j] - m).exp();
                            sum += p;
                            for d in 0..hd {
                                att[h * hd + d] += p * vs[j][g * hd + d];
                            }
                        }
                    }
                    for d in 0..hd {
                        att[h * hd + d] /= sum;
                    }
                }
                let o = matvec(&lw.wo, &att);
                for (a, b) in x[i].iter_mut().zip(&o) {
                    *a += b;
                }
                let xn = rms_norm(&x[i], &lw.ffn_norm, self.eps);
                let g = matvec(&lw.gate, &xn);
                let u = matvec(&lw.up, &xn);
                let hmid: Vec<f64> = g
                    .iter()
                    .zip(&u)
                    .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
                    .collect();
                let d = matvec(&lw.down, &hmid);
                for (a, b) in x[i].iter_mut().zip(&d) {
                    *a += b;
                }
            }
        }
        x.iter()
            .map(|xi| {
                matvec(&self.output, &rms_norm(xi, &self.out_norm, self.eps))
                    .iter()
                    .map(|&v| v as f32)
                    .collect()
            })
            .collect()
    }
}
