//! Offline profiling of attention influence (moa-method.md sections 5-6), the input of
//! `moa-optimize`: calibration conversations ([`calib`]), a forward pass that keeps checkpoints
//! ([`forward`]), an activations-only backward pass ([`backward`]) whose tiled attention backward
//! ([`attention`]) yields each entry's influence ([`influence`]), summed into the 64 x 64 block
//! matrices of the profile file ([`crate::moa::profile_file`]), and the resumable driver over a
//! calibration file ([`run`]). Everything is f32 on dequantized weights ([`dense`]) with the
//! matrix products of [`linalg`], parallel on the rayon pool. [`cuda`] is the same computation on
//! a GPU; [`SampleProfiler`] is what both offer the driver, and [`profiler_for`] picks one for
//! `--device`. [`ablate`] measures instead of estimating: the loss change when one head loses its
//! long-range keys.

pub mod ablate;
pub mod attention;
pub mod backward;
pub mod calib;
pub mod cuda;
pub mod dense;
pub mod forward;
pub mod influence;
pub mod linalg;
pub mod run;

use std::ops::Range;

pub use backward::Captured;
pub use dense::DenseModel;
pub use influence::SampleInfluence;

use crate::moa::profile_file::ModelIdentity;
use crate::model::{Model, ModelError};

/// Why a sample cannot be profiled.
#[derive(Debug, thiserror::Error)]
pub enum SampleError {
    #[error("the sample has no tokens")]
    Empty,
    #[error("the sample has {n} tokens, more than the profiled length {length}")]
    TooLong { n: usize, length: usize },
    #[error("token {pos} is id {id}, outside the vocabulary of {n_vocab}")]
    BadToken { pos: usize, id: u32, n_vocab: usize },
    #[error(
        "response range {start}..{end} is not inside 1..{n} (the first token cannot be a target)"
    )]
    BadRange { start: usize, end: usize, n: usize },
    #[error("the sample has no response tokens to take the loss on")]
    NoTargets,
    /// A GPU error (its message names the GPU).
    #[error("{0}")]
    Device(String),
}

/// Checks a sample against the model and the profiled length; returns its targets as
/// (position whose logits predict, target id), in response order.
pub fn sample_targets(
    c: &crate::model::ModelConfig,
    tokens: &[u32],
    response: &[Range<usize>],
    length: usize,
) -> Result<Vec<(usize, u32)>, SampleError> {
    let n = tokens.len();
    if n == 0 {
        return Err(SampleError::Empty);
    }
    if n > length {
        return Err(SampleError::TooLong { n, length });
    }
    if let Some((pos, &id)) = tokens
        .iter()
        .enumerate()
        .find(|(_, &t)| t as usize >= c.n_vocab)
    {
        return Err(SampleError::BadToken {
            pos,
            id,
            n_vocab: c.n_vocab,
        });
    }
    let mut targets = Vec::new();
    for r in response {
        if r.start < 1 || r.end > n || r.start > r.end {
            return Err(SampleError::BadRange {
                start: r.start,
                end: r.end,
                n,
            });
        }
        targets.extend(r.clone().map(|t| (t - 1, tokens[t])));
    }
    if targets.is_empty() {
        return Err(SampleError::NoTargets);
    }
    Ok(targets)
}

/// What the profiling driver needs of a profiler, on whichever device it runs.
pub trait SampleProfiler {
    /// Block (and tile) edge in tokens.
    fn block(&self) -> usize;
    /// See [`Profiler::profile_sample`]; every implementation computes the same quantities.
    fn profile_sample(
        &self,
        tokens: &[u32],
        response: &[Range<usize>],
        length: usize,
        capture: Option<&mut Captured>,
    ) -> Result<SampleResult, SampleError>;
    /// Where it runs, for messages (e.g. "CPU, 2 threads").
    fn describe(&self) -> String;
}

/// The result of profiling one sample.
pub struct SampleResult {
    /// Mean cross-entropy over the response tokens.
    pub loss: f64,
    pub n_targets: usize,
    pub influence: SampleInfluence,
}

/// A model ready for profiling: its f32 weights and the block size.
pub struct Profiler {
    pub dense: DenseModel,
    /// Block (and tile) edge in tokens.
    pub block: usize,
}

impl Profiler {
    pub fn new(model: &Model, block: usize) -> Result<Profiler, ModelError> {
        Ok(Profiler {
            dense: DenseModel::from_model(model)?,
            block: block.max(1),
        })
    }

    pub fn from_dense(dense: DenseModel, block: usize) -> Profiler {
        Profiler {
            dense,
            block: block.max(1),
        }
    }

    /// Loss of `tokens` with targets in `response` (each a range of token positions whose
    /// tokens are predicted by the positions before them), its gradient everywhere, and the
    /// influence block sums for a profile of length `length` (the sample may be shorter: its
    /// blocks are then a prefix). `capture` keeps per-layer gradients.
    pub fn profile_sample(
        &self,
        tokens: &[u32],
        response: &[Range<usize>],
        length: usize,
        capture: Option<&mut Captured>,
    ) -> Result<SampleResult, SampleError> {
        let c = &self.dense.config;
        let n = tokens.len();
        let targets = sample_targets(c, tokens, response, length)?;
        let rope = linalg::RopeTable::new(&c.rope, n);
        let ck = forward::forward(&self.dense, tokens, &rope, self.block);
        let lg = forward::loss_and_grad(&self.dense, &ck.final_x, &targets);
        let mut infl = SampleInfluence::new(c.n_layer, c.n_head_kv, length.div_ceil(self.block));
        backward::backward(
            &self.dense,
            &ck,
            lg.d_final,
            &rope,
            self.block,
            &mut infl,
            capture,
        );
        Ok(SampleResult {
            loss: lg.loss,
            n_targets: targets.len(),
            influence: infl,
        })
    }
}

impl SampleProfiler for Profiler {
    fn block(&self) -> usize {
        self.block
    }

    fn profile_sample(
        &self,
        tokens: &[u32],
        response: &[Range<usize>],
        length: usize,
        capture: Option<&mut Captured>,
    ) -> Result<SampleResult, SampleError> {
        Profiler::profile_sample(self, tokens, response, length, capture)
    }

    fn describe(&self) -> String {
        format!("CPU, {} threads", rayon::current_num_threads())
    }
}

/// A profiler for `model` on `device`: the GPU ([`cuda::CudaProfiler`]) or the CPU
/// ([`Profiler`]). `auto` takes the GPU when one is usable and falls back to the CPU with a
/// notice on stderr when none is (no driver, libraries or device) or the GPU profiler does not
/// support the model or block size; a GPU error (out of memory, a failed launch) is an error.
pub fn profiler_for(
    model: &Model,
    block: usize,
    device: crate::runtime::Device,
) -> Result<Box<dyn SampleProfiler>, ProfilerInitError> {
    use crate::runtime::Device;
    let cpu = || -> Result<Box<dyn SampleProfiler>, ProfilerInitError> {
        Ok(Box::new(Profiler::new(model, block)?))
    };
    match device {
        Device::Cpu => cpu(),
        Device::Cuda => Ok(Box::new(cuda::CudaProfiler::new(model, block)?)),
        Device::Auto => {
            if let Err(e) = crate::backend::cuda::probe() {
                eprintln!("note: no usable GPU ({e}); profiling on the CPU");
                return cpu();
            }
            match cuda::CudaProfiler::new(model, block) {
                Ok(p) => Ok(Box::new(p)),
                Err(cuda::CudaProfileError::Unsupported(why)) => {
                    eprintln!(
                        "note: the GPU profiler cannot run this ({why}); profiling on the CPU"
                    );
                    cpu()
                }
                Err(e) => Err(e.into()),
            }
        }
    }
}

/// Why no profiler could be made.
#[derive(Debug, thiserror::Error)]
pub enum ProfilerInitError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Cuda(#[from] cuda::CudaProfileError),
}

/// The identity a profile records for `model`.
pub fn model_identity(model: &Model) -> ModelIdentity {
    let c = &model.config;
    ModelIdentity {
        name: model
            .file
            .get_str("general.name")
            .map(|s| s.to_string())
            .unwrap_or_default(),
        arch: c.arch.clone(),
        n_layer: c.n_layer,
        n_head: c.n_head,
        n_head_kv: c.n_head_kv,
        head_dim: c.head_dim,
        n_ctx_train: c.n_ctx_train,
    }
}
