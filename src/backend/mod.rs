//! Backends execute a model's [`crate::graph::Graph`] on a device. The trait is all model and
//! generation code sees; buffers, kernels and threads belong to each backend.

pub mod cpu;
pub mod cuda;

use crate::graph::Batch;
use crate::kv::KvLayout;

/// Errors from executing a batch; each says what was asked and what the limit is.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("batch of {n} tokens exceeds the backend's maximum batch of {max}")]
    BatchTooLarge { n: usize, max: usize },
    #[error("batch asks logits for {n} tokens; at most {max} per batch")]
    TooManyLogits { n: usize, max: usize },
    #[error("sequence {seq} does not exist (the cache holds {n_seq} sequences)")]
    BadSequence { seq: usize, n_seq: usize },
    #[error("sequence {seq}: token at position {found} does not continue the cache, which holds {expected} tokens")]
    BadPosition {
        seq: usize,
        expected: usize,
        found: usize,
    },
    #[error("sequence {seq}: position {pos} is beyond the context of {n_ctx} tokens")]
    ContextFull {
        seq: usize,
        pos: usize,
        n_ctx: usize,
    },
    #[error("token id {token} is outside the vocabulary of {n_vocab}")]
    BadToken { token: u32, n_vocab: usize },
    #[error("batch arrays differ in length: {tokens} tokens, {positions} positions, {seqs} sequence ids, {logits} logit flags")]
    RaggedBatch {
        tokens: usize,
        positions: usize,
        seqs: usize,
        logits: usize,
    },
    #[error("out of memory: {what} needs {bytes} bytes")]
    OutOfMemory { what: String, bytes: usize },
    #[error("GPU out of memory: {what} needs {bytes} bytes, {free} of {total} bytes are free on the device")]
    DeviceOutOfMemory {
        what: String,
        bytes: usize,
        free: usize,
        total: usize,
    },
    #[error("GPU: {0}")]
    Device(String),
    #[error("the {backend} backend cannot run tensor {tensor} of type {ty}: {reason}")]
    Unsupported {
        backend: &'static str,
        tensor: String,
        ty: String,
        reason: String,
    },
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
}

/// The `tensor` an [`BackendError::Unsupported`] names when a backend cannot hold the KV cache
/// types asked for.
pub const KV_CACHE: &str = "KV cache";

/// How a backend is set up for a run.
#[derive(Debug, Clone)]
pub struct BackendOptions {
    /// Most tokens per forward call.
    pub max_batch: usize,
    /// Worker threads (CPU backend).
    pub threads: usize,
    /// KV cache layout (dense or per-head spans) for all sequences, with its K/V element types.
    pub layout: KvLayout,
}

/// A device that runs the forward step.
pub trait Backend {
    /// A short description, e.g. `cpu (avx2, 2 threads)`.
    fn describe(&self) -> String;
    /// Runs one forward step; afterwards [`Backend::logits`] holds one row per token that asked.
    fn forward(&mut self, batch: &Batch) -> Result<(), BackendError>;
    /// Logits of the last forward call, `n_vocab` values per requested token, in batch order.
    fn logits(&self) -> &[f32];
    fn n_vocab(&self) -> usize;
    /// Tokens sequence `seq` holds in its cache.
    fn seq_len(&self, seq: usize) -> usize;
    /// Empties a sequence's cache.
    fn clear(&mut self, seq: usize);
    /// Drops the tokens of `seq` after its first `len` (nothing if it holds fewer). Exact when
    /// every head keeps the whole sequence (dense caches); in a span cache, ring slots that later
    /// tokens took over keep those tokens' keys. Benchmarks use it to repeat a test at one depth
    /// without filling the cache again (the cost of a step does not depend on the values).
    fn rewind(&mut self, seq: usize, len: usize);
    fn kv_layout(&self) -> &KvLayout;
    /// Bytes allocated for the KV cache.
    fn kv_bytes(&self) -> usize;
    /// Re-plans the KV cache for `layout` (another span plan or planned length, for a model of
    /// the same shape with the same cache types) and empties every sequence, keeping the weights
    /// and the other buffers. `Ok(false)`, with nothing changed, when this backend cannot (make a
    /// new one instead): the default, and for a layout of another shape or other types.
    /// Evaluations use it to run many sequences of different lengths and plans on one backend.
    fn replan(&mut self, layout: &KvLayout) -> Result<bool, BackendError> {
        let _ = layout;
        Ok(false)
    }
}

/// Checks the parts of a batch every backend needs checked, against the current sequence lengths.
pub fn validate_batch(
    batch: &Batch,
    seq_len: impl Fn(usize) -> usize,
    layout: &KvLayout,
    max_batch: usize,
    max_logits: usize,
    n_vocab: usize,
) -> Result<(), BackendError> {
    let n = batch.tokens.len();
    if batch.positions.len() != n || batch.seq_ids.len() != n || batch.want_logits.len() != n {
        return Err(BackendError::RaggedBatch {
            tokens: n,
            positions: batch.positions.len(),
            seqs: batch.seq_ids.len(),
            logits: batch.want_logits.len(),
        });
    }
    if n > max_batch {
        return Err(BackendError::BatchTooLarge { n, max: max_batch });
    }
    let n_logits = batch.want_logits.iter().filter(|&&b| b).count();
    if n_logits > max_logits {
        return Err(BackendError::TooManyLogits {
            n: n_logits,
            max: max_logits,
        });
    }
    if let Some(&t) = batch.tokens.iter().find(|&&t| t as usize >= n_vocab) {
        return Err(BackendError::BadToken { token: t, n_vocab });
    }
    for (seq, start, len) in batch.runs() {
        let s = seq as usize;
        if s >= layout.n_seq {
            return Err(BackendError::BadSequence {
                seq: s,
                n_seq: layout.n_seq,
            });
        }
        if batch.runs().take_while(|r| r.1 < start).any(|r| r.0 == seq) {
            // A sequence split into two runs would need the first run's keys before the cache
            // is written; keep batches simple instead.
            return Err(BackendError::BadPosition {
                seq: s,
                expected: seq_len(s) + len,
                found: batch.positions[start] as usize,
            });
        }
        for (expected, &p) in (seq_len(s)..).zip(&batch.positions[start..start + len]) {
            if p as usize != expected {
                return Err(BackendError::BadPosition {
                    seq: s,
                    expected,
                    found: p as usize,
                });
            }
            if expected >= layout.n_ctx {
                return Err(BackendError::ContextFull {
                    seq: s,
                    pos: expected,
                    n_ctx: layout.n_ctx,
                });
            }
        }
    }
    Ok(())
}
