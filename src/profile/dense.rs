//! The model as the profiler computes with it: every weight dequantized once to f32 (row-major,
//! a row per output, as GGUF stores them), next to the configuration. About 4 bytes per
//! parameter (540 MB for SmolLM2-135M).

use crate::model::{Model, ModelConfig, ModelError};

/// One transformer block's weights, dequantized. Shapes as (rows, cols) = (out, in).
pub struct DenseLayer {
    /// (n_embd)
    pub attn_norm: Vec<f32>,
    /// (n_head * head_dim, n_embd)
    pub wq: Vec<f32>,
    /// (n_head_kv * head_dim, n_embd)
    pub wk: Vec<f32>,
    /// (n_head_kv * head_dim, n_embd)
    pub wv: Vec<f32>,
    /// (n_embd, n_head * head_dim)
    pub wo: Vec<f32>,
    /// (n_embd)
    pub ffn_norm: Vec<f32>,
    /// (n_ff, n_embd)
    pub gate: Vec<f32>,
    /// (n_ff, n_embd)
    pub up: Vec<f32>,
    /// (n_embd, n_ff)
    pub down: Vec<f32>,
}

/// All weights of a llama-family model in f32.
pub struct DenseModel {
    pub config: ModelConfig,
    /// (n_vocab, n_embd)
    pub token_embd: Vec<f32>,
    /// (n_embd)
    pub output_norm: Vec<f32>,
    /// (n_vocab, n_embd); `None` when tied to `token_embd`.
    pub output: Option<Vec<f32>>,
    pub layers: Vec<DenseLayer>,
}

impl DenseModel {
    /// Dequantizes every weight of `model`.
    pub fn from_model(model: &Model) -> Result<DenseModel, ModelError> {
        let w = &model.weights;
        let f = |id| model.weight_f32(id);
        let layers = w
            .layers
            .iter()
            .map(|lw| {
                Ok(DenseLayer {
                    attn_norm: f(lw.attn_norm)?,
                    wq: f(lw.wq)?,
                    wk: f(lw.wk)?,
                    wv: f(lw.wv)?,
                    wo: f(lw.wo)?,
                    ffn_norm: f(lw.ffn_norm)?,
                    gate: f(lw.gate)?,
                    up: f(lw.up)?,
                    down: f(lw.down)?,
                })
            })
            .collect::<Result<Vec<_>, ModelError>>()?;
        Ok(DenseModel {
            config: model.config.clone(),
            token_embd: f(w.token_embd)?,
            output_norm: f(w.output_norm)?,
            output: if w.output == w.token_embd {
                None
            } else {
                Some(f(w.output)?)
            },
            layers,
        })
    }

    /// The output projection (tied or separate).
    pub fn output(&self) -> &[f32] {
        self.output.as_deref().unwrap_or(&self.token_embd)
    }
}
