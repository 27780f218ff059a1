//! Real model shapes with random weights (`moa-bench synth`): the hyperparameters of Llama-3 /
//! Llama-3.2 / SmolLM2, a tensor-type mix like llama-quantize's, a byte-level BPE vocabulary of
//! the real size, and random quantized blocks written directly (fast: an 8B file streams out
//! at disk speed). llama.cpp loads and runs the files, so both runtimes bench the same bytes.
//!
//! Type mixes (following llama.cpp's `llama_tensor_get_type`, b11434):
//! - `q4_k_m`: Q4_K matrices; Q6_K for `attn_v` and `ffn_down` in the layers where
//!   `use_more_bits(i, n) = i < n/8 || i >= 7n/8 || (i - n/8) % 3 == 2`; on the 70B shape the
//!   other `attn_v` are Q5_K; `output` Q6_K; `token_embd` Q4_K, or the output's type when the
//!   embeddings are tied.
//! - `q4_0` / `q8_0`: every matrix of that type; `output` (and tied embeddings) Q6_K for q4_0,
//!   Q8_0 for q8_0.
//! - `q4_k`: every matrix Q4_K (no Q6_K layers), `output` Q6_K.
//! - everywhere: output type Q8_0 when the width is not a multiple of the default type's block;
//!   a K-quant whose row width is not a multiple of 256 falls back as llama.cpp does (Q4_K ->
//!   Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0), and to F16 when even that does not fit; norms F32.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Instant;

use ggml_compat::GgmlType;

use super::{add_generated, llama_slots, set_llama_metadata, BpeVocab, Fill, Hparams, Role};
use crate::gguf::{GgufBuilder, GgufError, Value};

/// The largest `--ctx` accepted (Llama-3.1/3.2's trained context).
pub const MAX_SYNTH_CTX: usize = 131072;

#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    #[error("unknown shape {0:?}; valid shapes: {valid}", valid = Shape::names().join(", "))]
    UnknownShape(String),
    #[error("unknown type {0:?}; valid types: {valid}", valid = SynthType::names().join(", "))]
    UnknownType(String),
    #[error("{0}")]
    BadOption(String),
    #[error(transparent)]
    Gguf(#[from] GgufError),
}

/// A real model's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    Llama3_8B,
    Llama3_70B,
    Llama32_1B,
    Llama32_3B,
    SmolLM2_135M,
}

/// Vocabulary family of a shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum VocabKind {
    Llama3,
    SmolLM2,
}

/// Hyperparameters of a shape.
#[derive(Debug, Clone)]
pub struct ShapeParams {
    pub name: &'static str,
    pub size_label: &'static str,
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub n_ff: usize,
    pub n_vocab: usize,
    /// Default `context_length` written (`--ctx` overrides).
    pub n_ctx: usize,
    pub rope_base: f32,
    pub rms_eps: f32,
    /// Output matrix shared with the token embeddings (no `output.weight`).
    pub tied: bool,
    /// Llama-3.1-style long-context RoPE (a `rope_freqs.weight` tensor).
    pub llama3_rope: bool,
    vocab: VocabKind,
}

impl Shape {
    pub const ALL: [Shape; 5] = [
        Shape::Llama3_8B,
        Shape::Llama3_70B,
        Shape::Llama32_1B,
        Shape::Llama32_3B,
        Shape::SmolLM2_135M,
    ];

    pub fn name(self) -> &'static str {
        self.params().name
    }

    pub fn names() -> Vec<&'static str> {
        Shape::ALL.iter().map(|s| s.name()).collect()
    }

    pub fn params(self) -> ShapeParams {
        let llama3 = |name, size_label, n_layer, n_embd, n_head, n_ff, tied| ShapeParams {
            name,
            size_label,
            n_layer,
            n_embd,
            n_head,
            n_head_kv: 8,
            n_ff,
            n_vocab: 128256,
            n_ctx: 8192,
            rope_base: 500000.0,
            rms_eps: 1e-5,
            tied,
            llama3_rope: tied,
            vocab: VocabKind::Llama3,
        };
        match self {
            Shape::Llama3_8B => llama3("llama3-8b", "8B", 32, 4096, 32, 14336, false),
            Shape::Llama3_70B => llama3("llama3-70b", "70B", 80, 8192, 64, 28672, false),
            Shape::Llama32_1B => llama3("llama3.2-1b", "1B", 16, 2048, 32, 8192, true),
            Shape::Llama32_3B => llama3("llama3.2-3b", "3B", 28, 3072, 24, 8192, true),
            Shape::SmolLM2_135M => ShapeParams {
                name: "smollm2-135m",
                size_label: "135M",
                n_layer: 30,
                n_embd: 576,
                n_head: 9,
                n_head_kv: 3,
                n_ff: 1536,
                n_vocab: 49152,
                n_ctx: 8192,
                rope_base: 100000.0,
                rms_eps: 1e-5,
                tied: true,
                llama3_rope: false,
                vocab: VocabKind::SmolLM2,
            },
        }
    }
}

impl FromStr for Shape {
    type Err = SynthError;
    fn from_str(s: &str) -> Result<Shape, SynthError> {
        let want = s.trim().to_ascii_lowercase();
        Shape::ALL
            .into_iter()
            .find(|x| x.name() == want)
            .ok_or_else(|| SynthError::UnknownShape(s.to_string()))
    }
}

/// The quantization mix (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SynthType {
    Q4KM,
    Q4_0,
    Q8_0,
    Q4K,
}

impl SynthType {
    pub const ALL: [SynthType; 4] = [
        SynthType::Q4KM,
        SynthType::Q4_0,
        SynthType::Q8_0,
        SynthType::Q4K,
    ];

    pub fn name(self) -> &'static str {
        match self {
            SynthType::Q4KM => "q4_k_m",
            SynthType::Q4_0 => "q4_0",
            SynthType::Q8_0 => "q8_0",
            SynthType::Q4K => "q4_k",
        }
    }

    pub fn names() -> Vec<&'static str> {
        SynthType::ALL.iter().map(|s| s.name()).collect()
    }

    /// `general.file_type` (llama_ftype): Q4_K_M 15, Q4_0 2, Q8_0 7, and Q4_K_S 14 for q4_k
    /// (llama.cpp only uses it to describe the model).
    pub fn file_type(self) -> u32 {
        match self {
            SynthType::Q4KM => 15,
            SynthType::Q4_0 => 2,
            SynthType::Q8_0 => 7,
            SynthType::Q4K => 14,
        }
    }

    fn default_type(self) -> GgmlType {
        match self {
            SynthType::Q4KM | SynthType::Q4K => GgmlType::Q4_K,
            SynthType::Q4_0 => GgmlType::Q4_0,
            SynthType::Q8_0 => GgmlType::Q8_0,
        }
    }

    /// The type of one tensor of a model with these hyperparameters.
    fn tensor_type(
        self,
        role: Role,
        layer: usize,
        ncols: u64,
        h: &Hparams,
        tied: bool,
    ) -> GgmlType {
        use GgmlType::*;
        let base = self.default_type();
        let n = h.n_layer;
        let more_bits = |i: usize| i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2;
        // llama.cpp's LLM_TYPE_70B: 80 layers with grouped-query attention.
        let is_70b = n == 80 && h.n_head_kv != h.n_head;
        let output = || {
            if !ncols.is_multiple_of(base.block_size() as u64) {
                Q8_0
            } else if base != Q8_0 {
                Q6_K
            } else {
                Q8_0
            }
        };
        let ty = match role {
            r if r.is_norm() => return F32,
            Role::Output => output(),
            Role::TokenEmbd if tied => output(),
            Role::AttnV if self == SynthType::Q4KM => {
                if more_bits(layer) {
                    Q6_K
                } else if is_70b {
                    Q5_K
                } else {
                    base
                }
            }
            Role::FfnDown if self == SynthType::Q4KM && more_bits(layer) => Q6_K,
            _ => base,
        };
        fallback(ty, ncols)
    }
}

/// llama.cpp's fallback for rows that are not a whole number of blocks.
fn fallback(ty: GgmlType, ncols: u64) -> GgmlType {
    use GgmlType::*;
    if ncols.is_multiple_of(ty.block_size() as u64) {
        return ty;
    }
    let t = match ty {
        Q4_K => Q5_0,
        Q5_K => Q5_1,
        Q6_K => Q8_0,
        Q2_K | Q3_K => Q4_0,
        t => t,
    };
    if ncols.is_multiple_of(t.block_size() as u64) {
        t
    } else {
        F16
    }
}

impl FromStr for SynthType {
    type Err = SynthError;
    fn from_str(s: &str) -> Result<SynthType, SynthError> {
        let want = s.trim().to_ascii_lowercase();
        SynthType::ALL
            .into_iter()
            .find(|x| x.name() == want)
            .ok_or_else(|| SynthError::UnknownType(s.to_string()))
    }
}

/// Options of a synthetic file beyond shape and type.
#[derive(Debug, Clone, Default)]
pub struct SynthOptions {
    /// Seed of the weights (the tokenizer does not depend on it).
    pub seed: u64,
    /// `context_length` (default: the shape's).
    pub n_ctx: Option<usize>,
    /// Vocabulary size override (default: the shape's).
    pub n_vocab: Option<usize>,
    /// Layer count override (default: the shape's); the type mix follows the new count.
    pub n_layer: Option<usize>,
}

/// One tensor of a synthetic file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorPlan {
    pub name: String,
    pub ty: GgmlType,
    /// ggml order: `[columns, rows]`.
    pub dims: Vec<u64>,
}

struct Plan {
    params: ShapeParams,
    h: Hparams,
    vocab: BpeVocab,
    tensors: Vec<(TensorPlan, Fill)>,
}

fn build_plan(shape: Shape, ty: SynthType, opts: &SynthOptions) -> Result<Plan, SynthError> {
    let p = shape.params();
    let n_ctx = opts.n_ctx.unwrap_or(p.n_ctx);
    if n_ctx == 0 || n_ctx > MAX_SYNTH_CTX {
        return Err(SynthError::BadOption(format!(
            "--ctx {n_ctx}: must be in 1..={MAX_SYNTH_CTX}"
        )));
    }
    let n_layer = opts.n_layer.unwrap_or(p.n_layer);
    if n_layer == 0 || n_layer > 1024 {
        return Err(SynthError::BadOption(format!(
            "--n-layer {n_layer}: must be in 1..=1024"
        )));
    }
    let h = Hparams {
        n_layer,
        n_embd: p.n_embd,
        n_head: p.n_head,
        n_head_kv: p.n_head_kv,
        n_ff: p.n_ff,
        n_vocab: opts.n_vocab.unwrap_or(p.n_vocab),
        n_ctx,
        rope_base: p.rope_base,
        rms_eps: p.rms_eps,
    };
    let vocab = vocab_for(p.vocab, h.n_vocab);
    let min_vocab = vocab.specials.len() + 256;
    if h.n_vocab < min_vocab || h.n_vocab > 1 << 20 {
        return Err(SynthError::BadOption(format!(
            "--n-vocab {}: the {} vocabulary needs {min_vocab}..={} tokens ({} specials + 256 bytes + merges)",
            h.n_vocab,
            p.name,
            1 << 20,
            vocab.specials.len()
        )));
    }
    let mut tensors = Vec::new();
    if p.llama3_rope {
        tensors.push((
            TensorPlan {
                name: "rope_freqs.weight".into(),
                ty: GgmlType::F32,
                dims: vec![(h.head_dim() / 2) as u64],
            },
            Fill::Values(llama3_rope_factors(h.head_dim(), h.rope_base)),
        ));
    }
    for s in llama_slots(&h, !p.tied) {
        let ncols = s.dims[0];
        let t = ty.tensor_type(s.role, s.layer, ncols, &h, p.tied);
        let fill = if s.role.is_norm() {
            Fill::Norm
        } else {
            // Unit-variance inputs give unit-variance outputs; embeddings too (tied ones are
            // also the output matrix, where this keeps the logits near unit scale).
            Fill::Random(1.0 / (ncols as f32).sqrt())
        };
        tensors.push((
            TensorPlan {
                name: s.name,
                ty: t,
                dims: s.dims,
            },
            fill,
        ));
    }
    Ok(Plan {
        params: p,
        h,
        vocab,
        tensors,
    })
}

/// The tensors (names, types, shapes) that [`write_shape`] writes, without writing anything.
pub fn shape_plan(
    shape: Shape,
    ty: SynthType,
    opts: &SynthOptions,
) -> Result<Vec<TensorPlan>, SynthError> {
    Ok(build_plan(shape, ty, opts)?
        .tensors
        .into_iter()
        .map(|(t, _)| t)
        .collect())
}

/// Llama-3.1 RoPE frequency divisors (factor 32, low / high frequency factors 1 / 4, original
/// context 8192), as stored in `rope_freqs.weight`.
fn llama3_rope_factors(head_dim: usize, base: f32) -> Vec<f32> {
    let (factor, low, high, old_ctx) = (32.0f64, 1.0f64, 4.0f64, 8192.0f64);
    let (low_wavelen, high_wavelen) = (old_ctx / low, old_ctx / high);
    (0..head_dim / 2)
        .map(|i| {
            let freq = 1.0 / (base as f64).powf(2.0 * i as f64 / head_dim as f64);
            let wavelen = 2.0 * std::f64::consts::PI / freq;
            let f = if wavelen < high_wavelen {
                1.0
            } else if wavelen > low_wavelen {
                factor
            } else {
                let smooth = (old_ctx / wavelen - low) / (high - low);
                1.0 / ((1.0 - smooth) / factor + smooth)
            };
            f as f32
        })
        .collect()
}

const LLAMA3_TEMPLATE: &str = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";

const CHATML_TEMPLATE: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

fn vocab_for(kind: VocabKind, n_vocab: usize) -> BpeVocab {
    match kind {
        VocabKind::Llama3 => {
            // Llama 3.1's 256 special tokens at the end of the id range.
            let named = [
                "<|begin_of_text|>",
                "<|end_of_text|>",
                "<|reserved_special_token_0|>",
                "<|reserved_special_token_1|>",
                "<|finetune_right_pad_id|>",
                "<|reserved_special_token_2|>",
                "<|start_header_id|>",
                "<|end_header_id|>",
                "<|eom_id|>",
                "<|eot_id|>",
                "<|python_tag|>",
            ];
            let specials = named
                .iter()
                .map(|s| s.to_string())
                .chain((3..248).map(|i| format!("<|reserved_special_token_{i}|>")))
                .collect();
            BpeVocab {
                n_vocab,
                specials,
                specials_first: false,
                pre: "llama-bpe",
                bos: 0,
                eos: 1,
                eot: Some(9),
                unk: None,
                pad: None,
                add_bos: true,
                chat_template: Some(LLAMA3_TEMPLATE),
            }
        }
        VocabKind::SmolLM2 => BpeVocab {
            n_vocab,
            specials: [
                "<|endoftext|>",
                "<|im_start|>",
                "<|im_end|>",
                "<repo_name>",
                "<reponame>",
                "<file_sep>",
                "<filename>",
                "<gh_stars>",
                "<issue_start>",
                "<issue_comment>",
                "<issue_closed>",
                "<jupyter_start>",
                "<jupyter_text>",
                "<jupyter_code>",
                "<jupyter_output>",
                "<jupyter_script>",
                "<empty_output>",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
            specials_first: true,
            pre: "smollm",
            bos: 1,
            eos: 2,
            eot: None,
            unk: Some(0),
            pad: Some(2),
            add_bos: false,
            chat_template: Some(CHATML_TEMPLATE),
        },
    }
}

/// What [`write_shape`] wrote.
#[derive(Debug, Clone)]
pub struct SynthReport {
    pub path: PathBuf,
    pub bytes: u64,
    pub n_tensors: usize,
    pub params: u64,
    /// Tensor count per type, in first-use order.
    pub types: Vec<(GgmlType, usize)>,
    pub seconds: f64,
}

/// Writes a synthetic model of `shape` with the `ty` mix to `path`, atomically (temporary file
/// beside it, removed on any error such as a full disk) and streamed: memory use is a few MiB
/// per thread whatever the size. Weights are random quantized blocks (seeded by `opts.seed`).
pub fn write_shape(
    shape: Shape,
    ty: SynthType,
    opts: &SynthOptions,
    path: &Path,
) -> Result<SynthReport, SynthError> {
    let t0 = Instant::now();
    let plan = build_plan(shape, ty, opts)?;
    let p = &plan.params;
    let mut b = GgufBuilder::new();
    set_llama_metadata(
        &mut b,
        &plan.h,
        &format!("moa synthetic {} {}", p.name, ty.name()),
    );
    b.set("general.size_label", Value::string(p.size_label));
    b.set("general.file_type", Value::U32(ty.file_type()));
    b.set("general.quantization_version", Value::U32(2));
    plan.vocab.set(&mut b);
    let mut types: Vec<(GgmlType, usize)> = Vec::new();
    let mut params = 0u64;
    let n_tensors = plan.tensors.len();
    for (i, (t, fill)) in plan.tensors.into_iter().enumerate() {
        match types.iter_mut().find(|(x, _)| *x == t.ty) {
            Some(c) => c.1 += 1,
            None => types.push((t.ty, 1)),
        }
        params += t.dims.iter().product::<u64>();
        let seed = opts
            .seed
            .wrapping_mul(0x9E3779B97F4A7C15)
            .wrapping_add(i as u64 + 1);
        add_generated(&mut b, &t.name, t.ty, &t.dims, fill, seed)?;
    }
    let bytes = b.write_atomic(path)?;
    Ok(SynthReport {
        path: path.to_path_buf(),
        bytes,
        n_tensors,
        params,
        types,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// `moa-bench synth` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct SynthArgs {
    /// Model shape: llama3-8b, llama3-70b, llama3.2-1b, llama3.2-3b, smollm2-135m.
    #[arg(long)]
    pub shape: Shape,
    /// Quantization mix: q4_k_m, q4_0, q8_0, q4_k (all Q4_K, Q6_K output).
    #[arg(long = "type", default_value = "q4_k_m")]
    pub ty: SynthType,
    /// Output file (written atomically).
    #[arg(short = 'o', long = "output")]
    pub output: PathBuf,
    /// Seed of the random weights.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// context_length written to the file (default 8192; at most 131072).
    #[arg(long)]
    pub ctx: Option<usize>,
    /// Vocabulary size instead of the shape's.
    #[arg(long = "n-vocab")]
    pub n_vocab: Option<usize>,
    /// Layer count instead of the shape's (the type mix follows it).
    #[arg(long = "n-layer")]
    pub n_layer: Option<usize>,
}

/// Runs `moa-bench synth`: writes the file and prints a summary line.
pub fn run_synth(a: &SynthArgs) -> Result<SynthReport, SynthError> {
    let opts = SynthOptions {
        seed: a.seed,
        n_ctx: a.ctx,
        n_vocab: a.n_vocab,
        n_layer: a.n_layer,
    };
    let r = write_shape(a.shape, a.ty, &opts, &a.output)?;
    let types: Vec<String> = r
        .types
        .iter()
        .map(|(t, n)| format!("{n} {}", t.name()))
        .collect();
    println!(
        "wrote {}: {} {}, {} tensors ({}), {:.2} M params, {:.2} GiB in {:.1} s ({:.0} MiB/s)",
        r.path.display(),
        a.shape.name(),
        a.ty.name(),
        r.n_tensors,
        types.join(", "),
        r.params as f64 / 1e6,
        r.bytes as f64 / (1u64 << 30) as f64,
        r.seconds,
        r.bytes as f64 / (1u64 << 20) as f64 / r.seconds.max(1e-9)
    );
    Ok(r)
}

/// Writes only the metadata of a [`write_shape`] file (hyperparameters and tokenizer, no
/// tensors), like llama.cpp's `ggml-vocab-*.gguf`: enough for tokenizers, cheap for tests.
pub fn write_shape_vocab(
    shape: Shape,
    opts: &SynthOptions,
    path: &Path,
) -> Result<u64, SynthError> {
    let plan = build_plan(shape, SynthType::Q8_0, opts)?;
    let mut b = GgufBuilder::new();
    set_llama_metadata(
        &mut b,
        &plan.h,
        &format!("moa synthetic {} vocab", plan.params.name),
    );
    plan.vocab.set(&mut b);
    Ok(b.write_atomic(path)?)
}
