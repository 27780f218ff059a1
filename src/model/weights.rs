//! The model's tensors bound by name: a table of weight descriptions (type, shape, where the
//! bytes are in the memory-mapped file) and, per layer, which table entry plays which role.
//! Weights stay quantized in the map; backends read or upload them through the table.

use ggml_compat::GgmlType;

use super::config::{ModelConfig, ModelError};
use crate::gguf::GgufFile;
use crate::graph::WeightId;

/// A tensor of the model as a matrix of `rows` rows of `cols` elements (ggml dims `[cols, rows]`),
/// or a vector (`rows == 1`).
#[derive(Debug, Clone, PartialEq)]
pub struct WeightTensor {
    pub name: String,
    pub ty: GgmlType,
    pub cols: usize,
    pub rows: usize,
    /// Absolute byte offset in the file.
    pub offset: usize,
    pub n_bytes: usize,
}

impl WeightTensor {
    pub fn row_bytes(&self) -> usize {
        self.n_bytes / self.rows
    }
}

/// Table entries of one transformer block.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerWeights {
    pub attn_norm: WeightId,
    pub wq: WeightId,
    pub wk: WeightId,
    pub wv: WeightId,
    pub wo: WeightId,
    pub ffn_norm: WeightId,
    pub gate: WeightId,
    pub up: WeightId,
    pub down: WeightId,
}

/// All weights of a llama-family model.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelWeights {
    pub table: Vec<WeightTensor>,
    pub token_embd: WeightId,
    pub output_norm: WeightId,
    /// The output projection; equal to `token_embd` for models with tied embeddings.
    pub output: WeightId,
    pub layers: Vec<LayerWeights>,
}

impl ModelWeights {
    /// Binds every tensor the architecture needs, checking names, shapes and types.
    pub fn bind(file: &GgufFile, cfg: &ModelConfig) -> Result<ModelWeights, ModelError> {
        let mut table = Vec::new();
        let mut get = |name: &str, shape: &[usize], matmul: bool| -> Result<WeightId, ModelError> {
            let t = file
                .tensor_info(name)
                .ok_or_else(|| ModelError::MissingTensor(name.into()))?;
            let found: Vec<u64> = t.dims.clone();
            let expected: Vec<u64> = shape.iter().map(|&d| d as u64).collect();
            // Trailing 1-dims are insignificant in ggml shapes.
            let trim = |v: &[u64]| {
                let mut v = v.to_vec();
                while v.len() > 1 && v.last() == Some(&1) {
                    v.pop();
                }
                v
            };
            if trim(&found) != trim(&expected) {
                return Err(ModelError::BadTensorShape {
                    name: name.into(),
                    expected,
                    found,
                });
            }
            let ok = if matmul {
                ggml_compat::dot::vec_dot_type(t.ty).is_some()
            } else {
                t.ty.can_dequantize()
            };
            if !ok {
                return Err(ModelError::UnsupportedTensorType {
                    name: name.into(),
                    ty: t.ty.name().into(),
                });
            }
            table.push(WeightTensor {
                name: name.into(),
                ty: t.ty,
                cols: shape[0],
                rows: shape.get(1).copied().unwrap_or(1),
                offset: (file.data_offset + t.offset) as usize,
                n_bytes: t.n_bytes as usize,
            });
            Ok(table.len() - 1)
        };
        let (e, q, kv, ff, v) = (cfg.n_embd, cfg.q_dim(), cfg.kv_dim(), cfg.n_ff, cfg.n_vocab);
        let token_embd = get("token_embd.weight", &[e, v], false)?;
        let output_norm = get("output_norm.weight", &[e], false)?;
        let output = if file.tensor_info("output.weight").is_some() {
            get("output.weight", &[e, v], true)?
        } else {
            // Tied embeddings: the embedding table doubles as the output matrix.
            if ggml_compat::dot::vec_dot_type(file.tensor_info("token_embd.weight").unwrap().ty)
                .is_none()
            {
                return Err(ModelError::UnsupportedTensorType {
                    name: "token_embd.weight".into(),
                    ty: file
                        .tensor_info("token_embd.weight")
                        .unwrap()
                        .ty
                        .name()
                        .into(),
                });
            }
            token_embd
        };
        let mut layers = Vec::with_capacity(cfg.n_layer);
        for l in 0..cfg.n_layer {
            let n = |s: &str| format!("blk.{l}.{s}.weight");
            layers.push(LayerWeights {
                attn_norm: get(&n("attn_norm"), &[e], false)?,
                wq: get(&n("attn_q"), &[e, q], true)?,
                wk: get(&n("attn_k"), &[e, kv], true)?,
                wv: get(&n("attn_v"), &[e, kv], true)?,
                wo: get(&n("attn_output"), &[q, e], true)?,
                ffn_norm: get(&n("ffn_norm"), &[e], false)?,
                gate: get(&n("ffn_gate"), &[e, ff], true)?,
                up: get(&n("ffn_up"), &[e, ff], true)?,
                down: get(&n("ffn_down"), &[ff, e], true)?,
            });
        }
        Ok(ModelWeights {
            table,
            token_embd,
            output_norm,
            output,
            layers,
        })
    }
}
