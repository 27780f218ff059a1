//! Synthetic llama-architecture models with random weights, written with our GGUF writer: tiny
//! ones for tests (no download), and later real shapes for benchmarks (speed does not depend on
//! the values). The tokenizer is a valid byte-level BPE vocabulary (`gpt2`, 256 byte tokens,
//! merges for the rest, `<|bos|>`/`<|eos|>` specials), so every tool can run the file.

use std::io::Write;
use std::path::Path;

use ggml_compat::GgmlType;
use rayon::prelude::*;

use crate::gguf::{GgufBuilder, GgufError, TensorData, Value, ValueType};

mod blocks;
mod shapes;

pub use shapes::{
    run_synth, shape_plan, write_shape, write_shape_vocab, Shape, ShapeParams, SynthArgs,
    SynthError, SynthOptions, SynthReport, SynthType, TensorPlan, MAX_SYNTH_CTX,
};

/// Shape and format of a synthetic model.
#[derive(Debug, Clone)]
pub struct SynthSpec {
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub n_ff: usize,
    /// At least 258 (256 bytes + 2 specials).
    pub n_vocab: usize,
    pub n_ctx: usize,
    /// Type of the matrices (norms are F32).
    pub weight_type: GgmlType,
    /// Type of the embedding table; the output matrix is tied to it unless `untied_output`.
    pub embd_type: GgmlType,
    pub untied_output: bool,
    pub rope_base: f32,
    pub seed: u64,
    /// `tokenizer.chat_template`, if any.
    pub chat_template: Option<String>,
}

impl SynthSpec {
    /// A tiny model for tests: 2 layers, width 64, 4 query heads over 2 KV heads.
    pub fn tiny(weight_type: GgmlType, seed: u64) -> SynthSpec {
        SynthSpec {
            n_layer: 2,
            n_embd: 64,
            n_head: 4,
            n_head_kv: 2,
            n_ff: 128,
            n_vocab: 300,
            n_ctx: 1024,
            weight_type,
            embd_type: GgmlType::F32,
            untied_output: true,
            rope_base: 10000.0,
            seed,
            chat_template: None,
        }
    }
}

/// The GPT-2 byte-to-unicode map: printable bytes map to themselves, others to U+0100 onward.
fn byte_char(b: u8) -> char {
    let printable = |b: u8| {
        (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b)
    };
    if printable(b) {
        return b as char;
    }
    let offset = (0..b).filter(|&x| !printable(x)).count() as u32;
    char::from_u32(256 + offset).unwrap()
}

/// Hyperparameters written as `llama.*` metadata.
#[derive(Debug, Clone)]
pub(crate) struct Hparams {
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub n_ff: usize,
    pub n_vocab: usize,
    pub n_ctx: usize,
    pub rope_base: f32,
    pub rms_eps: f32,
}

impl Hparams {
    fn from_spec(spec: &SynthSpec) -> Hparams {
        Hparams {
            n_layer: spec.n_layer,
            n_embd: spec.n_embd,
            n_head: spec.n_head,
            n_head_kv: spec.n_head_kv,
            n_ff: spec.n_ff,
            n_vocab: spec.n_vocab,
            n_ctx: spec.n_ctx,
            rope_base: spec.rope_base,
            rms_eps: 1e-5,
        }
    }
    pub fn head_dim(&self) -> usize {
        self.n_embd / self.n_head
    }
}

/// Writes the `general.architecture` and `llama.*` hyperparameter keys.
fn set_llama_metadata(b: &mut GgufBuilder, h: &Hparams, name: &str) {
    let a = "llama";
    let u = |x: usize| Value::U32(x as u32);
    b.set("general.architecture", Value::string(a));
    b.set("general.name", Value::string(name));
    b.set(&format!("{a}.block_count"), u(h.n_layer));
    b.set(&format!("{a}.context_length"), u(h.n_ctx));
    b.set(&format!("{a}.embedding_length"), u(h.n_embd));
    b.set(&format!("{a}.feed_forward_length"), u(h.n_ff));
    b.set(&format!("{a}.attention.head_count"), u(h.n_head));
    b.set(&format!("{a}.attention.head_count_kv"), u(h.n_head_kv));
    b.set(&format!("{a}.rope.freq_base"), Value::F32(h.rope_base));
    b.set(
        &format!("{a}.attention.layer_norm_rms_epsilon"),
        Value::F32(h.rms_eps),
    );
    b.set(&format!("{a}.rope.dimension_count"), u(h.head_dim()));
    b.set(&format!("{a}.vocab_size"), u(h.n_vocab));
}

/// What a tensor is in the llama graph (decides its type in a quantization mix).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    TokenEmbd,
    AttnNorm,
    AttnQ,
    AttnK,
    AttnV,
    AttnOutput,
    FfnNorm,
    FfnGate,
    FfnUp,
    FfnDown,
    OutputNorm,
    Output,
}

impl Role {
    pub fn is_norm(self) -> bool {
        matches!(self, Role::AttnNorm | Role::FfnNorm | Role::OutputNorm)
    }
}

/// One tensor of a llama model: name, role, layer (for block tensors), shape in ggml order
/// (`[columns, rows]`, columns = the input width of a matrix).
#[derive(Debug, Clone)]
pub(crate) struct Slot {
    pub name: String,
    pub role: Role,
    pub layer: usize,
    pub dims: Vec<u64>,
}

/// The tensors of a llama model in llama.cpp's file order; `output.weight` only when untied.
pub(crate) fn llama_slots(h: &Hparams, untied_output: bool) -> Vec<Slot> {
    let (e, kv, ff, v) = (
        h.n_embd as u64,
        (h.n_head_kv * h.head_dim()) as u64,
        h.n_ff as u64,
        h.n_vocab as u64,
    );
    let slot = |name: String, role, layer, dims: &[u64]| Slot {
        name,
        role,
        layer,
        dims: dims.to_vec(),
    };
    let mut out = vec![slot(
        "token_embd.weight".into(),
        Role::TokenEmbd,
        0,
        &[e, v],
    )];
    for l in 0..h.n_layer {
        let n = |s: &str| format!("blk.{l}.{s}.weight");
        out.push(slot(n("attn_norm"), Role::AttnNorm, l, &[e]));
        out.push(slot(n("attn_q"), Role::AttnQ, l, &[e, e]));
        out.push(slot(n("attn_k"), Role::AttnK, l, &[e, kv]));
        out.push(slot(n("attn_v"), Role::AttnV, l, &[e, kv]));
        out.push(slot(n("attn_output"), Role::AttnOutput, l, &[e, e]));
        out.push(slot(n("ffn_norm"), Role::FfnNorm, l, &[e]));
        out.push(slot(n("ffn_gate"), Role::FfnGate, l, &[e, ff]));
        out.push(slot(n("ffn_up"), Role::FfnUp, l, &[e, ff]));
        out.push(slot(n("ffn_down"), Role::FfnDown, l, &[ff, e]));
    }
    out.push(slot("output_norm.weight".into(), Role::OutputNorm, 0, &[e]));
    if untied_output {
        out.push(slot("output.weight".into(), Role::Output, 0, &[e, v]));
    }
    out
}

/// How a tensor's values are made.
pub(crate) enum Fill {
    /// Uniform f32 in `[-scale, scale)` (or `1 +- 0.2` when `scale < 0`, for norms), quantized
    /// row by row (the tiny test models; exact values are part of the tests' expectations).
    Quantize(f32),
    /// Random quantized blocks written directly, elements with this standard deviation.
    Random(f32),
    /// Norm weights: F32 `1 +- 0.2`.
    Norm,
    /// These exact values (F32).
    Values(Vec<f32>),
}

/// A tensor generator (the writer's `TensorGenerator`).
type Gen = Box<dyn FnMut(&mut dyn Write) -> std::io::Result<()>>;

/// Bytes generated per parallel work item of a [`Fill::Random`] tensor.
const CHUNK_BYTES: usize = 1 << 20;

/// Adds a generated tensor; `seed` makes its values (independent of the thread count).
pub(crate) fn add_generated(
    b: &mut GgufBuilder,
    name: &str,
    ty: GgmlType,
    dims: &[u64],
    fill: Fill,
    seed: u64,
) -> Result<(), GgufError> {
    let cols = dims[0] as usize;
    let rows: usize = dims[1..].iter().product::<u64>() as usize;
    let row_bytes = ty
        .bytes_for(cols as u64)
        .map_err(|e| GgufError::BadTensorData {
            name: name.into(),
            reason: e.to_string(),
        })? as usize;
    let gen: Gen = match fill {
        Fill::Quantize(scale) => Box::new(move |w: &mut dyn Write| {
            let mut rng = blocks::Rng(seed | 1);
            let mut row = vec![0f32; cols];
            let mut bytes = vec![0u8; row_bytes];
            for _ in 0..rows {
                for x in row.iter_mut() {
                    *x = if scale < 0.0 {
                        1.0 + 0.2 * rng.unit()
                    } else {
                        scale * rng.unit()
                    };
                }
                ggml_compat::quantize_row(ty, &row, &mut bytes).map_err(std::io::Error::other)?;
                w.write_all(&bytes)?;
            }
            Ok(())
        }),
        Fill::Norm => {
            let mut rng = blocks::Rng::new(seed);
            let v: Vec<f32> = (0..cols * rows).map(|_| 1.0 + 0.2 * rng.unit()).collect();
            values_generator(ty, v)
        }
        Fill::Values(v) => values_generator(ty, v),
        Fill::Random(sd) => {
            if !blocks::supported(ty) {
                return Err(GgufError::BadTensorData {
                    name: name.into(),
                    reason: format!("random {ty} blocks are not supported"),
                });
            }
            let rows_per_chunk = (CHUNK_BYTES / row_bytes.max(1)).max(1);
            let n_chunks = rows.div_ceil(rows_per_chunk);
            Box::new(move |w: &mut dyn Write| {
                let group = 2 * rayon::current_num_threads().max(1);
                let mut bufs: Vec<Vec<u8>> = Vec::new();
                let mut c0 = 0;
                while c0 < n_chunks {
                    let c1 = (c0 + group).min(n_chunks);
                    bufs.resize_with(c1 - c0, Vec::new);
                    bufs.par_iter_mut().enumerate().for_each(|(i, buf)| {
                        let c = c0 + i;
                        let n_rows = rows_per_chunk.min(rows - c * rows_per_chunk);
                        buf.resize(n_rows * row_bytes, 0);
                        let mut rng =
                            blocks::Rng::new(seed ^ (c as u64).wrapping_mul(0xD1B54A32D192ED03));
                        blocks::fill_random(ty, &mut rng, sd, buf);
                    });
                    for buf in &bufs {
                        w.write_all(buf)?;
                    }
                    c0 = c1;
                }
                Ok(())
            })
        }
    };
    b.add_tensor(name, ty, dims, TensorData::Generated(gen))?;
    Ok(())
}

fn values_generator(ty: GgmlType, v: Vec<f32>) -> Gen {
    Box::new(move |w: &mut dyn Write| {
        let mut bytes = vec![
            0u8;
            ty.bytes_for(v.len() as u64)
                .map_err(std::io::Error::other)? as usize
        ];
        ggml_compat::quantize_row(ty, &v, &mut bytes).map_err(std::io::Error::other)?;
        w.write_all(&bytes)
    })
}

/// The tiny models' vocabulary: 256 byte tokens, merges of frequent letters, `<|unusedN|>`
/// fillers, then `<|bos|>` and `<|eos|>`.
fn set_tiny_vocab(b: &mut GgufBuilder, n_vocab: usize) {
    let mut tokens: Vec<String> = (0..=255u8).map(|b| byte_char(b).to_string()).collect();
    let mut merges = Vec::new();
    let letters: Vec<String> = "etaoinshrdlucmfwypvbgk "
        .chars()
        .map(|c| byte_char(c as u8).to_string())
        .collect();
    'pairs: for l in &letters {
        for r in &letters {
            if tokens.len() >= n_vocab - 2 {
                break 'pairs;
            }
            merges.push(format!("{l} {r}"));
            tokens.push(format!("{l}{r}"));
        }
    }
    while tokens.len() < n_vocab - 2 {
        tokens.push(format!("<|unused{}|>", tokens.len()));
    }
    tokens.push("<|bos|>".into());
    tokens.push("<|eos|>".into());
    let types: Vec<i32> = (0..tokens.len())
        .map(|i| {
            let special = i >= n_vocab - 2 || tokens[i].starts_with("<|unused");
            if special {
                3
            } else {
                1
            }
        })
        .collect();
    b.set("tokenizer.ggml.model", Value::string("gpt2"));
    b.set("tokenizer.ggml.pre", Value::string("default"));
    set_token_arrays(b, tokens, types, merges);
    b.set(
        "tokenizer.ggml.bos_token_id",
        Value::U32(n_vocab as u32 - 2),
    );
    b.set(
        "tokenizer.ggml.eos_token_id",
        Value::U32(n_vocab as u32 - 1),
    );
    b.set("tokenizer.ggml.add_bos_token", Value::Bool(true));
}

fn set_token_arrays(
    b: &mut GgufBuilder,
    tokens: Vec<String>,
    types: Vec<i32>,
    merges: Vec<String>,
) {
    b.set(
        "tokenizer.ggml.tokens",
        Value::Array(
            ValueType::String,
            tokens.into_iter().map(Value::string).collect(),
        ),
    );
    b.set(
        "tokenizer.ggml.token_type",
        Value::Array(ValueType::I32, types.into_iter().map(Value::I32).collect()),
    );
    b.set(
        "tokenizer.ggml.merges",
        Value::Array(
            ValueType::String,
            merges.into_iter().map(Value::string).collect(),
        ),
    );
}

/// A byte-level BPE vocabulary of a real model's size: the special tokens (at the start or the
/// end of the id range), 256 byte tokens, and `n_vocab - specials - 256` merged tokens built
/// from lowercase words (`Ġ` + letters and letter strings, each merge = prefix + one letter,
/// shortest strings first), so every merge joins two existing tokens into a new one.
#[derive(Debug, Clone)]
pub(crate) struct BpeVocab {
    pub n_vocab: usize,
    pub specials: Vec<String>,
    pub specials_first: bool,
    pub pre: &'static str,
    /// Token ids as offsets into `specials`.
    pub bos: usize,
    pub eos: usize,
    pub eot: Option<usize>,
    pub unk: Option<usize>,
    pub pad: Option<usize>,
    pub add_bos: bool,
    pub chat_template: Option<&'static str>,
}

impl BpeVocab {
    /// Id of the `i`-th special token.
    fn special_id(&self, i: usize) -> u32 {
        if self.specials_first {
            i as u32
        } else {
            (self.n_vocab - self.specials.len() + i) as u32
        }
    }

    fn set(&self, b: &mut GgufBuilder) {
        let n_regular = self.n_vocab - self.specials.len();
        let mut regular: Vec<String> = (0..=255u8).map(|b| byte_char(b).to_string()).collect();
        let merges = letter_merges(n_regular - 256);
        let mut merge_lines = Vec::with_capacity(merges.len());
        for (l, r) in merges {
            regular.push(format!("{l}{r}"));
            merge_lines.push(format!("{l} {r}"));
        }
        let specials = self.specials.iter().cloned();
        let (tokens, types): (Vec<String>, Vec<i32>) = if self.specials_first {
            specials
                .map(|s| (s, 3))
                .chain(regular.into_iter().map(|s| (s, 1)))
                .unzip()
        } else {
            regular
                .into_iter()
                .map(|s| (s, 1))
                .chain(specials.map(|s| (s, 3)))
                .unzip()
        };
        b.set("tokenizer.ggml.model", Value::string("gpt2"));
        b.set("tokenizer.ggml.pre", Value::string(self.pre));
        set_token_arrays(b, tokens, types, merge_lines);
        let id = |i: usize| Value::U32(self.special_id(i));
        b.set("tokenizer.ggml.bos_token_id", id(self.bos));
        b.set("tokenizer.ggml.eos_token_id", id(self.eos));
        if let Some(i) = self.eot {
            b.set("tokenizer.ggml.eot_token_id", id(i));
        }
        if let Some(i) = self.unk {
            b.set("tokenizer.ggml.unknown_token_id", id(i));
        }
        if let Some(i) = self.pad {
            b.set("tokenizer.ggml.padding_token_id", id(i));
        }
        b.set("tokenizer.ggml.add_bos_token", Value::Bool(self.add_bos));
        if let Some(t) = self.chat_template {
            b.set("tokenizer.chat_template", Value::string(t));
        }
    }
}

/// `n` merges `(left, right)`: level by level, every string of the previous level (starting
/// with `Ġ` and the single letters) extended by each lowercase letter.
fn letter_merges(n: usize) -> Vec<(String, String)> {
    let letters: Vec<String> = ('a'..='z').map(String::from).collect();
    let mut prev: Vec<String> = std::iter::once(byte_char(b' ').to_string())
        .chain(letters.iter().cloned())
        .collect();
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let mut next = Vec::with_capacity(prev.len() * letters.len());
        for p in &prev {
            for c in &letters {
                if out.len() == n {
                    return out;
                }
                out.push((p.clone(), c.clone()));
                next.push(format!("{p}{c}"));
            }
        }
        prev = next;
    }
    out
}

/// Writes a synthetic model to `path` (atomically); weights are streamed, so the size is not
/// limited by memory. Panics when `spec.n_vocab < 258` (a programming error in a test).
pub fn write_synthetic(spec: &SynthSpec, path: &Path) -> Result<u64, GgufError> {
    assert!(
        spec.n_vocab >= 258,
        "synthetic vocabularies need at least 258 tokens"
    );
    let h = Hparams::from_spec(spec);
    let mut b = GgufBuilder::new();
    set_llama_metadata(&mut b, &h, "moa synthetic");
    set_tiny_vocab(&mut b, spec.n_vocab);
    if let Some(t) = &spec.chat_template {
        b.set("tokenizer.chat_template", Value::string(t.as_str()));
    }
    let (e, q, ff) = (spec.n_embd as f32, spec.n_embd as f32, spec.n_ff as f32);
    for (i, s) in llama_slots(&h, spec.untied_output).into_iter().enumerate() {
        let s_in = 1.0 / e.sqrt();
        let (ty, scale) = match s.role {
            Role::TokenEmbd => (spec.embd_type, 1.0),
            r if r.is_norm() => (GgmlType::F32, -1.0),
            Role::AttnQ | Role::AttnK => (spec.weight_type, s_in * 2.0),
            Role::AttnOutput => (spec.weight_type, 1.0 / q.sqrt()),
            Role::FfnDown => (spec.weight_type, 1.0 / ff.sqrt()),
            _ => (spec.weight_type, s_in),
        };
        let seed = spec.seed.wrapping_mul(1000003).wrapping_add(i as u64 + 1);
        add_generated(&mut b, &s.name, ty, &s.dims, Fill::Quantize(scale), seed)?;
    }
    b.write_atomic(path)
}
