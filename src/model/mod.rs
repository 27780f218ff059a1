//! The model: configuration from metadata, weights bound by name in the memory map, and the
//! forward graph of the architecture. Backends execute the graph; the model never computes.

mod config;
mod llama;
pub mod synth;
mod weights;

use std::path::Path;
use std::sync::Arc;

pub use config::{ModelConfig, ModelError, RopeConfig};
pub use llama::build_graph;
pub use weights::{LayerWeights, ModelWeights, WeightTensor};

use crate::gguf::GgufFile;
use crate::graph::{Graph, WeightId};

/// A loaded model: the mapped file, its configuration, weights and forward graph.
pub struct Model {
    pub file: Arc<GgufFile>,
    pub config: ModelConfig,
    pub weights: ModelWeights,
    pub graph: Graph,
}

impl Model {
    /// Maps and validates a model file.
    pub fn load(path: impl AsRef<Path>) -> Result<Model, ModelError> {
        Model::from_file(Arc::new(GgufFile::open(path)?))
    }

    pub fn from_file(file: Arc<GgufFile>) -> Result<Model, ModelError> {
        let mut config = ModelConfig::from_gguf(&file)?;
        let weights = ModelWeights::bind(&file, &config)?;
        if let Some(t) = file.tensor_info("rope_freqs.weight") {
            let n = config.rope.n_rot / 2;
            if t.n_elements() as usize != n {
                return Err(ModelError::BadTensorShape {
                    name: "rope_freqs.weight".into(),
                    expected: vec![n as u64],
                    found: t.dims.clone(),
                });
            }
            config.rope.freq_factors = Some(file.dequantize("rope_freqs.weight")?);
        }
        let graph = build_graph(&config, &weights);
        Ok(Model {
            file,
            config,
            weights,
            graph,
        })
    }

    /// The bytes of a weight.
    pub fn weight_bytes(&self, id: WeightId) -> &[u8] {
        let w = &self.weights.table[id];
        &self.file.bytes()[w.offset..w.offset + w.n_bytes]
    }

    /// A vector weight (norm) dequantized to f32.
    pub fn weight_f32(&self, id: WeightId) -> Result<Vec<f32>, ModelError> {
        let w = &self.weights.table[id];
        let mut out = vec![0f32; w.rows * w.cols];
        ggml_compat::dequantize_row(w.ty, self.weight_bytes(id), &mut out)?;
        Ok(out)
    }
}
