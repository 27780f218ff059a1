//! Synthetic llama-architecture models with random weights, written with our GGUF writer: tiny
//! ones for tests (no download), and later real shapes for benchmarks (speed does not depend on
//! the values). The tokenizer is a valid byte-level BPE vocabulary (`gpt2`, 256 byte tokens,
//! merges for the rest, `<|bos|>`/`<|eos|>` specials), so every tool can run the file.

use std::io::Write;
use std::path::Path;

use ggml_compat::GgmlType;

use crate::gguf::{GgufBuilder, GgufError, TensorData, Value, ValueType};

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

/// A small deterministic generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545F4914F6CDD1D)
    }
    /// Uniform in [-1, 1).
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
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

/// Writes a synthetic model to `path` (atomically); weights are streamed, so the size is not
/// limited by memory.
pub fn write_synthetic(spec: &SynthSpec, path: &Path) -> Result<u64, GgufError> {
    assert!(
        spec.n_vocab >= 258,
        "synthetic vocabularies need at least 258 tokens"
    );
    let head_dim = spec.n_embd / spec.n_head;
    let mut b = GgufBuilder::new();
    let a = "llama";
    b.set("general.architecture", Value::string(a));
    b.set("general.name", Value::string("moa synthetic"));
    b.set(&format!("{a}.block_count"), Value::U32(spec.n_layer as u32));
    b.set(
        &format!("{a}.context_length"),
        Value::U32(spec.n_ctx as u32),
    );
    b.set(
        &format!("{a}.embedding_length"),
        Value::U32(spec.n_embd as u32),
    );
    b.set(
        &format!("{a}.feed_forward_length"),
        Value::U32(spec.n_ff as u32),
    );
    b.set(
        &format!("{a}.attention.head_count"),
        Value::U32(spec.n_head as u32),
    );
    b.set(
        &format!("{a}.attention.head_count_kv"),
        Value::U32(spec.n_head_kv as u32),
    );
    b.set(&format!("{a}.rope.freq_base"), Value::F32(spec.rope_base));
    b.set(
        &format!("{a}.attention.layer_norm_rms_epsilon"),
        Value::F32(1e-5),
    );
    b.set(
        &format!("{a}.rope.dimension_count"),
        Value::U32(head_dim as u32),
    );
    b.set(&format!("{a}.vocab_size"), Value::U32(spec.n_vocab as u32));

    // Vocabulary: 256 byte tokens, merges of earlier tokens, then the two specials.
    let mut tokens: Vec<String> = (0..=255u8).map(|b| byte_char(b).to_string()).collect();
    let mut merges = Vec::new();
    let letters: Vec<String> = "etaoinshrdlucmfwypvbgk "
        .chars()
        .map(|c| byte_char(c as u8).to_string())
        .collect();
    'pairs: for l in &letters {
        for r in &letters {
            if tokens.len() >= spec.n_vocab - 2 {
                break 'pairs;
            }
            merges.push(format!("{l} {r}"));
            tokens.push(format!("{l}{r}"));
        }
    }
    while tokens.len() < spec.n_vocab - 2 {
        tokens.push(format!("<|unused{}|>", tokens.len()));
    }
    tokens.push("<|bos|>".into());
    tokens.push("<|eos|>".into());
    let types: Vec<Value> = (0..tokens.len())
        .map(|i| {
            let special = i >= spec.n_vocab - 2 || tokens[i].starts_with("<|unused");
            Value::I32(if special { 3 } else { 1 })
        })
        .collect();
    b.set("tokenizer.ggml.model", Value::string("gpt2"));
    b.set("tokenizer.ggml.pre", Value::string("default"));
    b.set(
        "tokenizer.ggml.tokens",
        Value::Array(
            ValueType::String,
            tokens.iter().map(|t| Value::string(t.as_str())).collect(),
        ),
    );
    b.set(
        "tokenizer.ggml.token_type",
        Value::Array(ValueType::I32, types),
    );
    b.set(
        "tokenizer.ggml.merges",
        Value::Array(
            ValueType::String,
            merges.into_iter().map(Value::string).collect(),
        ),
    );
    b.set(
        "tokenizer.ggml.bos_token_id",
        Value::U32(spec.n_vocab as u32 - 2),
    );
    b.set(
        "tokenizer.ggml.eos_token_id",
        Value::U32(spec.n_vocab as u32 - 1),
    );
    b.set("tokenizer.ggml.add_bos_token", Value::Bool(true));
    if let Some(t) = &spec.chat_template {
        b.set("tokenizer.chat_template", Value::string(t.as_str()));
    }

    let (e, q, kv, ff, v) = (
        spec.n_embd,
        spec.n_embd,
        spec.n_head_kv * head_dim,
        spec.n_ff,
        spec.n_vocab,
    );
    let mut tensors: Vec<(String, GgmlType, Vec<u64>, f32)> = vec![(
        "token_embd.weight".into(),
        spec.embd_type,
        vec![e as u64, v as u64],
        1.0,
    )];
    for l in 0..spec.n_layer {
        let n = |s: &str| format!("blk.{l}.{s}.weight");
        let wt = spec.weight_type;
        let s_in = 1.0 / (e as f32).sqrt();
        tensors.push((n("attn_norm"), GgmlType::F32, vec![e as u64], -1.0));
        tensors.push((n("attn_q"), wt, vec![e as u64, q as u64], s_in * 2.0));
        tensors.push((n("attn_k"), wt, vec![e as u64, kv as u64], s_in * 2.0));
        tensors.push((n("attn_v"), wt, vec![e as u64, kv as u64], s_in));
        tensors.push((
            n("attn_output"),
            wt,
            vec![q as u64, e as u64],
            1.0 / (q as f32).sqrt(),
        ));
        tensors.push((n("ffn_norm"), GgmlType::F32, vec![e as u64], -1.0));
        tensors.push((n("ffn_gate"), wt, vec![e as u64, ff as u64], s_in));
        tensors.push((n("ffn_up"), wt, vec![e as u64, ff as u64], s_in));
        tensors.push((
            n("ffn_down"),
            wt,
            vec![ff as u64, e as u64],
            1.0 / (ff as f32).sqrt(),
        ));
    }
    tensors.push((
        "output_norm.weight".into(),
        GgmlType::F32,
        vec![e as u64],
        -1.0,
    ));
    if spec.untied_output {
        tensors.push((
            "output.weight".into(),
            spec.weight_type,
            vec![e as u64, v as u64],
            1.0 / (e as f32).sqrt(),
        ));
    }
    for (i, (name, ty, dims, scale)) in tensors.into_iter().enumerate() {
        let seed = spec.seed.wrapping_mul(1000003).wrapping_add(i as u64 + 1);
        let (cols, rows) = (dims[0] as usize, dims.get(1).copied().unwrap_or(1) as usize);
        b.add_tensor(
            &name,
            ty,
            &dims,
            TensorData::Generated(Box::new(move |w: &mut dyn Write| {
                let mut rng = Rng(seed | 1);
                let mut row = vec![0f32; cols];
                let mut bytes = vec![0u8; ty.bytes_for(cols as u64).unwrap() as usize];
                for _ in 0..rows {
                    for x in row.iter_mut() {
                        // Norm weights (scale < 0) sit around 1; matrices are centered uniform.
                        *x = if scale < 0.0 {
                            1.0 + 0.2 * rng.unit()
                        } else {
                            scale * rng.unit()
                        };
                    }
                    ggml_compat::quantize_row(ty, &row, &mut bytes)
                        .map_err(std::io::Error::other)?;
                    w.write_all(&bytes)?;
                }
                Ok(())
            })),
        )?;
    }
    b.write_atomic(path)
}
