//! The ops of one forward step, as data: a list of operations over named activation buffers
//! (`[n_tokens, width]` f32 rows) and model weights (by index into the model's weight table).
//! Model code builds a [`Graph`] once; a backend (cpu, cuda) allocates the buffers once for its
//! largest batch and executes the ops for each [`Batch`]. Neither side knows the other's details.

/// Index of an activation buffer in [`Graph::acts`].
pub type ActId = usize;
/// Index of a tensor in the model's weight table.
pub type WeightId = usize;

/// An activation buffer: one row of `width` f32 values per token of the batch.
#[derive(Debug, Clone, PartialEq)]
pub struct Activation {
    pub name: &'static str,
    pub width: usize,
}

/// One operation. Shapes are per token row; every op applies to all rows of the batch.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    /// `out[t] = dequantize(table row tokens[t])`.
    Embed { table: WeightId, out: ActId },
    /// `out[t] = x[t] / sqrt(mean(x[t]^2) + eps) * w` (w: a vector weight of length width).
    RmsNorm {
        x: ActId,
        w: WeightId,
        eps: f32,
        out: ActId,
    },
    /// `out[t][r] = dot(W row r, x[t])`, W of shape `[rows, width(x)]` (ggml dims `[width, rows]`).
    MatMul { w: WeightId, x: ActId, out: ActId },
    /// Rotary embedding in place on `x` viewed as `n_heads` heads of `head_dim`, at the batch
    /// positions.
    Rope {
        x: ActId,
        n_heads: usize,
        head_dim: usize,
    },
    /// Causal attention of layer `layer` under the KV cache's span mask: appends the batch's
    /// `k`/`v` rows to the cache and writes the attention output (all query heads) to `out`.
    Attention {
        layer: usize,
        q: ActId,
        k: ActId,
        v: ActId,
        out: ActId,
    },
    /// `gate[t] = silu(gate[t]) * up[t]`, in place.
    SwiGlu { gate: ActId, up: ActId },
    /// `x[t] += y[t]`.
    Add { x: ActId, y: ActId },
    /// Logits for the rows the batch asks for: `logits[k][v] = dot(W row v, x[t_k])`.
    Logits { w: WeightId, x: ActId },
}

/// A forward step: activation buffers and the ops over them, in execution order.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Graph {
    pub acts: Vec<Activation>,
    pub ops: Vec<Op>,
}

impl Graph {
    /// Adds an activation buffer and returns its id.
    pub fn act(&mut self, name: &'static str, width: usize) -> ActId {
        self.acts.push(Activation { name, width });
        self.acts.len() - 1
    }
    pub fn push(&mut self, op: Op) {
        self.ops.push(op);
    }
}

/// The tokens of one forward step. Tokens of a sequence are contiguous and in position order,
/// continuing that sequence's cache (the first token of a sequence in the batch has position
/// equal to the number of tokens the sequence already holds).
#[derive(Debug, Clone, Copy)]
pub struct Batch<'a> {
    pub tokens: &'a [u32],
    pub positions: &'a [u32],
    /// Sequence index of each token.
    pub seq_ids: &'a [u32],
    /// Which tokens need logits; the backend returns them in batch order.
    pub want_logits: &'a [bool],
}

impl<'a> Batch<'a> {
    pub fn len(&self) -> usize {
        self.tokens.len()
    }
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
    /// Maximal runs of consecutive tokens of one sequence: `(seq, start, len)`.
    pub fn runs(&self) -> impl Iterator<Item = (u32, usize, usize)> + 'a {
        let seq = self.seq_ids;
        let mut start = 0;
        std::iter::from_fn(move || {
            if start >= seq.len() {
                return None;
            }
            let s = seq[start];
            let len = seq[start..].iter().take_while(|&&x| x == s).count();
            let run = (s, start, len);
            start += len;
            Some(run)
        })
    }
}

/// An owned batch, for callers that build one token list at a time.
#[derive(Debug, Clone, Default)]
pub struct BatchBuf {
    pub tokens: Vec<u32>,
    pub positions: Vec<u32>,
    pub seq_ids: Vec<u32>,
    pub want_logits: Vec<bool>,
}

impl BatchBuf {
    pub fn with_capacity(n: usize) -> BatchBuf {
        BatchBuf {
            tokens: Vec::with_capacity(n),
            positions: Vec::with_capacity(n),
            seq_ids: Vec::with_capacity(n),
            want_logits: Vec::with_capacity(n),
        }
    }
    pub fn clear(&mut self) {
        self.tokens.clear();
        self.positions.clear();
        self.seq_ids.clear();
        self.want_logits.clear();
    }
    pub fn push(&mut self, token: u32, pos: u32, seq: u32, logits: bool) {
        self.tokens.push(token);
        self.positions.push(pos);
        self.seq_ids.push(seq);
        self.want_logits.push(logits);
    }
    pub fn len(&self) -> usize {
        self.tokens.len()
    }
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
    pub fn as_batch(&self) -> Batch<'_> {
        Batch {
            tokens: &self.tokens,
            positions: &self.positions,
            seq_ids: &self.seq_ids,
            want_logits: &self.want_logits,
        }
    }
}
