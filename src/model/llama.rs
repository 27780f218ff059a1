//! The forward graph of the `llama` architecture: pre-norm blocks of grouped-query attention
//! with rotary embeddings and a SwiGLU MLP, a final RMSNorm and the output projection.

use super::{ModelConfig, ModelWeights};
use crate::graph::{Graph, Op};

/// Builds the graph of one forward step.
pub fn build_graph(cfg: &ModelConfig, w: &ModelWeights) -> Graph {
    let mut g = Graph::default();
    let h = g.act("hidden", cfg.n_embd);
    let xn = g.act("normed", cfg.n_embd);
    let q = g.act("q", cfg.q_dim());
    let k = g.act("k", cfg.kv_dim());
    let v = g.act("v", cfg.kv_dim());
    let att = g.act("attn_out", cfg.q_dim());
    let proj = g.act("proj", cfg.n_embd);
    let gate = g.act("ffn_gate", cfg.n_ff);
    let up = g.act("ffn_up", cfg.n_ff);
    let eps = cfg.rms_eps;

    g.push(Op::Embed {
        table: w.token_embd,
        out: h,
    });
    for (layer, lw) in w.layers.iter().enumerate() {
        g.push(Op::RmsNorm {
            x: h,
            w: lw.attn_norm,
            eps,
            out: xn,
        });
        g.push(Op::MatMul {
            w: lw.wq,
            x: xn,
            out: q,
        });
        g.push(Op::MatMul {
            w: lw.wk,
            x: xn,
            out: k,
        });
        g.push(Op::MatMul {
            w: lw.wv,
            x: xn,
            out: v,
        });
        g.push(Op::Rope {
            x: q,
            n_heads: cfg.n_head,
            head_dim: cfg.head_dim,
        });
        g.push(Op::Rope {
            x: k,
            n_heads: cfg.n_head_kv,
            head_dim: cfg.head_dim,
        });
        g.push(Op::Attention {
            layer,
            q,
            k,
            v,
            out: att,
        });
        g.push(Op::MatMul {
            w: lw.wo,
            x: att,
            out: proj,
        });
        g.push(Op::Add { x: h, y: proj });
        g.push(Op::RmsNorm {
            x: h,
            w: lw.ffn_norm,
            eps,
            out: xn,
        });
        g.push(Op::MatMul {
            w: lw.gate,
            x: xn,
            out: gate,
        });
        g.push(Op::MatMul {
            w: lw.up,
            x: xn,
            out: up,
        });
        g.push(Op::SwiGlu { gate, up });
        g.push(Op::MatMul {
            w: lw.down,
            x: gate,
            out: proj,
        });
        g.push(Op::Add { x: h, y: proj });
    }
    g.push(Op::RmsNorm {
        x: h,
        w: w.output_norm,
        eps,
        out: xn,
    });
    g.push(Op::Logits { w: w.output, x: xn });
    g
}
