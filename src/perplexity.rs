//! Perplexity with llama-perplexity's semantics, so numbers compare directly: the text is cut
//! into non-overlapping chunks of `n_ctx` tokens; each chunk starts from an empty cache (its first
//! token replaced by BOS when the model adds one); the loss is the mean negative log-likelihood of
//! the tokens in the second half of each chunk; the running estimate `exp(mean nll)` is reported
//! after every chunk and the final `PPL = x +/- y` uses the standard error of the mean nll.

use crate::backend::{Backend, BackendError};
use crate::graph::BatchBuf;

#[derive(Debug, thiserror::Error)]
pub enum PerplexityError {
    #[error("need at least {needed} tokens (2 x context) to evaluate perplexity with a context of {n_ctx}; the text has {have}")]
    TooShort {
        needed: usize,
        have: usize,
        n_ctx: usize,
    },
    #[error(transparent)]
    Backend(#[from] BackendError),
}

/// Result of a perplexity run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Perplexity {
    pub ppl: f64,
    /// Uncertainty of `ppl` (one standard error, as llama-perplexity prints it).
    pub err: f64,
    /// Running estimate after each chunk.
    pub running: Vec<f64>,
    pub n_chunks: usize,
    pub n_ctx: usize,
    pub tokens_scored: usize,
}

/// Negative log-likelihood of `target` under `logits` (softmax in f64, as llama.cpp).
pub fn nll(logits: &[f32], target: u32) -> f64 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| ((l - max) as f64).exp()).sum();
    sum.ln() - (logits[target as usize] - max) as f64
}

/// Runs perplexity on sequence 0 of `backend`, whose context must hold `n_ctx` tokens and whose
/// batches `n_batch`. `bos` is the token that replaces each chunk's first token, if any.
pub fn perplexity(
    backend: &mut dyn Backend,
    tokens: &[u32],
    n_ctx: usize,
    n_batch: usize,
    bos: Option<u32>,
    max_chunks: Option<usize>,
    mut on_chunk: impl FnMut(usize, usize, f64),
) -> Result<Perplexity, PerplexityError> {
    if tokens.len() < 2 * n_ctx {
        return Err(PerplexityError::TooShort {
            needed: 2 * n_ctx,
            have: tokens.len(),
            n_ctx,
        });
    }
    let n_chunk_max = tokens.len() / n_ctx;
    let n_chunks = max_chunks.map_or(n_chunk_max, |m| m.min(n_chunk_max));
    let n_batch = n_batch.min(n_ctx);
    let first = n_ctx / 2;
    let nv = backend.n_vocab();
    let (mut sum, mut sum2, mut count) = (0f64, 0f64, 0usize);
    let mut running = Vec::with_capacity(n_chunks);
    let mut batch = BatchBuf::with_capacity(n_batch);
    for i in 0..n_chunks {
        let start = i * n_ctx;
        backend.clear(0);
        let mut pos = 0;
        while pos < n_ctx {
            let n = n_batch.min(n_ctx - pos);
            batch.clear();
            for k in 0..n {
                let p = pos + k;
                let tok = if p == 0 {
                    bos.unwrap_or(tokens[start])
                } else {
                    tokens[start + p]
                };
                // Logits are needed for positions first .. n_ctx - 2 (each predicts the next).
                batch.push(tok, p as u32, 0, p >= first && p + 1 < n_ctx);
            }
            backend.forward(&batch.as_batch())?;
            let logits = backend.logits();
            let mut row = 0;
            for p in pos..pos + n {
                if p >= first && p + 1 < n_ctx {
                    let v = nll(&logits[row * nv..(row + 1) * nv], tokens[start + p + 1]);
                    sum += v;
                    sum2 += v * v;
                    count += 1;
                    row += 1;
                }
            }
            pos += n;
        }
        let est = (sum / count as f64).exp();
        running.push(est);
        on_chunk(i, n_chunks, est);
    }
    let mean = sum / count as f64;
    let var = sum2 / count as f64 - mean * mean;
    let ppl = mean.exp();
    let err = if var > 0.0 && count > 1 {
        (var / (count - 1) as f64).sqrt() * ppl
    } else {
        0.0
    };
    Ok(Perplexity {
        ppl,
        err,
        running,
        n_chunks,
        n_ctx,
        tokens_scored: count,
    })
}
