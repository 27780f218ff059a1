//! Perplexity under a span plan: `moa-perplexity`'s semantics (non-overlapping chunks of `n_ctx`
//! tokens from an empty cache, BOS first when the model adds one, loss over each chunk's second
//! half), delegated to [`crate::perplexity`], with the cache planned for `n_ctx` tokens.

use std::time::Instant;

use super::runner::{AttnConfig, Runner};
use super::EvalError;
use crate::perplexity::perplexity;

/// One perplexity measurement.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PplResult {
    pub config: String,
    pub n_ctx: usize,
    pub n_chunks: usize,
    pub tokens_scored: usize,
    pub ppl: f64,
    pub err: f64,
    pub running: Vec<f64>,
    /// Mean density of the plan at `n_ctx` (1 for dense).
    pub density: f64,
    pub kv_bytes: usize,
    pub kv_bytes_dense: usize,
    pub seconds: f64,
}

/// Tokenizes a corpus as llama-perplexity does (special tokens added, none parsed).
pub fn tokenize(runner: &Runner, text: &str) -> Result<Vec<u32>, EvalError> {
    Ok(runner.tokenizer.encode(text, true, false)?)
}

/// Runs perplexity at `n_ctx` over at most `chunks` chunks; `on_chunk(i, n)` after each.
pub fn run(
    runner: &Runner,
    cfg: &AttnConfig,
    tokens: &[u32],
    n_ctx: usize,
    chunks: Option<usize>,
    on_chunk: impl FnMut(usize, usize, f64),
) -> Result<PplResult, EvalError> {
    if n_ctx < 2 {
        return Err(EvalError::invalid(
            format!("context {n_ctx}"),
            "must be at least 2",
        ));
    }
    if chunks == Some(0) {
        return Err(EvalError::invalid("--chunks", "must be at least 1"));
    }
    let t0 = Instant::now();
    runner.with_backend(cfg, n_ctx, |be| {
        let (kv_bytes, kv_bytes_dense) = (be.kv_bytes(), be.kv_layout().dense_bytes());
        let tok = &runner.tokenizer;
        let bos = if tok.add_bos() { tok.bos() } else { None };
        let r = perplexity(
            be,
            tokens,
            n_ctx,
            runner.n_batch.min(n_ctx),
            bos,
            chunks,
            on_chunk,
        )?;
        Ok(PplResult {
            config: cfg.label.clone(),
            n_ctx,
            n_chunks: r.n_chunks,
            tokens_scored: r.tokens_scored,
            ppl: r.ppl,
            err: r.err,
            running: r.running,
            density: cfg.density_at(n_ctx),
            kv_bytes,
            kv_bytes_dense,
            seconds: t0.elapsed().as_secs_f64(),
        })
    })
}
