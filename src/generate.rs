//! Feeding tokens to a backend for one sequence: prompts in batches of at most `n_batch` tokens
//! (logits only for the last one), then one token per step; with the timings llama.cpp prints.

use std::time::{Duration, Instant};

use crate::backend::{Backend, BackendError};
use crate::graph::BatchBuf;

/// Time spent and tokens processed, for the llama.cpp-style summary.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Timings {
    pub load_ms: f64,
    pub prompt_tokens: usize,
    pub prompt_ms: f64,
    pub gen_tokens: usize,
    pub gen_ms: f64,
}

impl Timings {
    pub fn prompt_tps(&self) -> f64 {
        self.prompt_tokens as f64 / (self.prompt_ms / 1000.0).max(1e-9)
    }
    pub fn gen_tps(&self) -> f64 {
        self.gen_tokens as f64 / (self.gen_ms / 1000.0).max(1e-9)
    }
    /// The summary block, in llama.cpp's wording.
    pub fn report(&self) -> String {
        format!(
            "load time = {:10.2} ms\nprompt eval time = {:10.2} ms / {:5} tokens ({:8.2} ms per token, {:8.2} tokens per second)\n       eval time = {:10.2} ms / {:5} runs   ({:8.2} ms per token, {:8.2} tokens per second)",
            self.load_ms,
            self.prompt_ms,
            self.prompt_tokens,
            self.prompt_ms / self.prompt_tokens.max(1) as f64,
            self.prompt_tps(),
            self.gen_ms,
            self.gen_tokens,
            self.gen_ms / self.gen_tokens.max(1) as f64,
            self.gen_tps(),
        )
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// One sequence on a backend.
pub struct Session<'b> {
    backend: &'b mut dyn Backend,
    seq: u32,
    n_batch: usize,
    batch: BatchBuf,
    pub timings: Timings,
}

impl<'b> Session<'b> {
    pub fn new(backend: &'b mut dyn Backend, seq: u32, n_batch: usize) -> Session<'b> {
        let n_batch = n_batch.max(1);
        Session {
            backend,
            seq,
            n_batch,
            batch: BatchBuf::with_capacity(n_batch),
            timings: Timings::default(),
        }
    }

    /// Tokens the sequence holds.
    pub fn len(&self) -> usize {
        self.backend.seq_len(self.seq as usize)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Room left in the context.
    pub fn remaining(&self) -> usize {
        self.backend.kv_layout().n_ctx.saturating_sub(self.len())
    }

    /// Feeds a prompt (or a chat turn) in batches; returns the logits after its last token.
    pub fn prompt(&mut self, tokens: &[u32]) -> Result<&[f32], BackendError> {
        let t0 = Instant::now();
        let mut pos = self.len();
        for (c, chunk) in tokens.chunks(self.n_batch).enumerate() {
            let last_chunk = (c + 1) * self.n_batch >= tokens.len();
            self.batch.clear();
            for (k, &tok) in chunk.iter().enumerate() {
                self.batch.push(
                    tok,
                    pos as u32,
                    self.seq,
                    last_chunk && k + 1 == chunk.len(),
                );
                pos += 1;
            }
            self.backend.forward(&self.batch.as_batch())?;
        }
        self.timings.prompt_ms += ms(t0.elapsed());
        self.timings.prompt_tokens += tokens.len();
        Ok(self.backend.logits())
    }

    /// Feeds one generated token; returns the logits for the next one.
    pub fn step(&mut self, token: u32) -> Result<&[f32], BackendError> {
        let t0 = Instant::now();
        self.batch.clear();
        self.batch.push(token, self.len() as u32, self.seq, true);
        self.backend.forward(&self.batch.as_batch())?;
        self.timings.gen_ms += ms(t0.elapsed());
        self.timings.gen_tokens += 1;
        Ok(self.backend.logits())
    }

    pub fn backend(&self) -> &dyn Backend {
        &*self.backend
    }
}
