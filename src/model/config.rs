//! Model hyper-parameters read from GGUF metadata (`{arch}.block_count`, ...), validated so the
//! rest of the runtime can index without checks. Knows nothing of tensors or backends.

use crate::gguf::{Gguf, GgufError, Value};

/// Errors while reading a model; each names the key or tensor involved.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error("unsupported architecture {0:?} (supported: llama)")]
    UnsupportedArch(String),
    #[error("metadata key {key:?}: {reason}")]
    BadValue { key: String, reason: String },
    #[error("missing tensor {0:?}")]
    MissingTensor(String),
    #[error("tensor {name:?}: expected shape {expected:?}, found {found:?}")]
    BadTensorShape {
        name: String,
        expected: Vec<u64>,
        found: Vec<u64>,
    },
    #[error("tensor {name:?}: type {ty} has no matrix-product kernel")]
    UnsupportedTensorType { name: String, ty: String },
    #[error(transparent)]
    Format(#[from] ggml_compat::FormatError),
}

/// Rotary position embedding parameters, as llama.cpp applies them to the `llama` architecture
/// (rope type NORM: rotations of adjacent pairs `(x[2i], x[2i+1])`).
#[derive(Debug, Clone, PartialEq)]
pub struct RopeConfig {
    /// Number of leading dimensions of each head that are rotated (`rope.dimension_count`).
    pub n_rot: usize,
    pub freq_base: f32,
    /// Linear scaling: positions are multiplied by this (1 / `rope.scaling.factor` for linear).
    pub freq_scale: f32,
    /// Llama-3 per-frequency divisors from the `rope_freqs.weight` tensor (n_rot / 2 values).
    pub freq_factors: Option<Vec<f32>>,
}

/// Hyper-parameters of a decoder-only transformer of the llama family.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub arch: String,
    pub n_layer: usize,
    /// Model width (`embedding_length`).
    pub n_embd: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    /// Per-head dimension of queries and keys.
    pub head_dim: usize,
    pub n_ff: usize,
    pub n_vocab: usize,
    /// Context length the model was trained for.
    pub n_ctx_train: usize,
    pub rms_eps: f32,
    pub rope: RopeConfig,
}

fn key_usize(g: &Gguf, key: &str) -> Result<usize, ModelError> {
    let v = g.get_u64(key)?;
    usize::try_from(v).map_err(|_| ModelError::BadValue {
        key: key.into(),
        reason: format!("{v} is too large"),
    })
}

fn positive(g: &Gguf, key: &str) -> Result<usize, ModelError> {
    let v = key_usize(g, key)?;
    if v == 0 {
        return Err(ModelError::BadValue {
            key: key.into(),
            reason: "must be positive".into(),
        });
    }
    Ok(v)
}

fn optional_f32(g: &Gguf, key: &str, default: f32) -> Result<f32, ModelError> {
    match g.get(key) {
        None => Ok(default),
        Some(_) => {
            let v = g.get_f64(key)? as f32;
            if !v.is_finite() {
                return Err(ModelError::BadValue {
                    key: key.into(),
                    reason: format!("{v} is not finite"),
                });
            }
            Ok(v)
        }
    }
}

impl ModelConfig {
    /// Reads the configuration of a `llama`-architecture file.
    pub fn from_gguf(g: &Gguf) -> Result<ModelConfig, ModelError> {
        let arch = g.get_str("general.architecture")?.to_string();
        if arch != "llama" {
            return Err(ModelError::UnsupportedArch(arch));
        }
        let k = |s: &str| format!("{arch}.{s}");
        let n_layer = positive(g, &k("block_count"))?;
        let n_embd = positive(g, &k("embedding_length"))?;
        let n_ff = positive(g, &k("feed_forward_length"))?;
        let n_head = positive(g, &k("attention.head_count"))?;
        let n_head_kv = match g.get(&k("attention.head_count_kv")) {
            Some(_) => positive(g, &k("attention.head_count_kv"))?,
            None => n_head,
        };
        if n_head % n_head_kv != 0 {
            return Err(ModelError::BadValue {
                key: k("attention.head_count_kv"),
                reason: format!("{n_head} query heads are not a multiple of {n_head_kv} KV heads"),
            });
        }
        let head_dim = match g.get(&k("attention.key_length")) {
            Some(_) => positive(g, &k("attention.key_length"))?,
            None => {
                if n_embd % n_head != 0 {
                    return Err(ModelError::BadValue {
                        key: k("embedding_length"),
                        reason: format!("{n_embd} is not a multiple of the head count {n_head}"),
                    });
                }
                n_embd / n_head
            }
        };
        if let Some(Value::U32(vl)) = g.get(&k("attention.value_length")) {
            if *vl as usize != head_dim {
                return Err(ModelError::BadValue {
                    key: k("attention.value_length"),
                    reason: format!("{vl} differs from the key length {head_dim} (not supported)"),
                });
            }
        }
        let n_vocab = match g.get(&k("vocab_size")) {
            Some(_) => positive(g, &k("vocab_size"))?,
            None => g.get_array("tokenizer.ggml.tokens")?.1.len(),
        };
        let n_ctx_train = positive(g, &k("context_length"))?;
        let rms_eps = optional_f32(g, &k("attention.layer_norm_rms_epsilon"), 1e-5)?;
        let n_rot = match g.get(&k("rope.dimension_count")) {
            Some(_) => positive(g, &k("rope.dimension_count"))?,
            None => head_dim,
        };
        if n_rot > head_dim || n_rot % 2 != 0 {
            return Err(ModelError::BadValue {
                key: k("rope.dimension_count"),
                reason: format!("{n_rot} must be even and at most the head dimension {head_dim}"),
            });
        }
        let freq_base = optional_f32(g, &k("rope.freq_base"), 10000.0)?;
        let mut freq_scale = 1.0;
        let scaling_type = match g.get(&k("rope.scaling.type")) {
            Some(_) => Some(g.get_str(&k("rope.scaling.type"))?.to_string()),
            None => None,
        };
        match scaling_type.as_deref() {
            None | Some("none") => {}
            Some("linear") => {
                let factor = optional_f32(g, &k("rope.scaling.factor"), 1.0)?;
                if factor <= 0.0 {
                    return Err(ModelError::BadValue {
                        key: k("rope.scaling.factor"),
                        reason: format!("{factor} must be positive"),
                    });
                }
                freq_scale = 1.0 / factor;
            }
            // Llama-3.1 style scaling is carried by the rope_freqs tensor (read by the weights).
            Some("llama3") => {}
            Some(other) => {
                return Err(ModelError::BadValue {
                    key: k("rope.scaling.type"),
                    reason: format!(
                        "scaling type {other:?} is not supported (supported: none, linear, llama3)"
                    ),
                })
            }
        }
        Ok(ModelConfig {
            arch,
            n_layer,
            n_embd,
            n_head,
            n_head_kv,
            head_dim,
            n_ff,
            n_vocab,
            n_ctx_train,
            rms_eps,
            rope: RopeConfig {
                n_rot,
                freq_base,
                freq_scale,
                freq_factors: None,
            },
        })
    }

    /// Query heads per KV head.
    pub fn group_size(&self) -> usize {
        self.n_head / self.n_head_kv
    }
    /// Width of the query projection.
    pub fn q_dim(&self) -> usize {
        self.n_head * self.head_dim
    }
    /// Width of the key and value projections.
    pub fn kv_dim(&self) -> usize {
        self.n_head_kv * self.head_dim
    }
}
