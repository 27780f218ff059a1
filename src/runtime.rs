//! What every tool does before its real work: find the model file (the `-m` default is the
//! default model in the local model folder), load it with its tokenizer, and start a backend
//! on the requested device (`--device`: CPU, GPU, or the GPU when usable) with a KV cache for
//! the requested context, span plan and cache element types (`-ctk`/`-ctv`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use crate::backend::cpu::CpuBackend;
use crate::backend::cuda::CudaBackend;
use crate::backend::{Backend, BackendError, BackendOptions};
use crate::kv::{KvError, KvLayout, KvType, KvTypes};
use crate::moa::{Plan, PlanError, PlanFileError};
use crate::model::{Model, ModelError};
use crate::tokenizer::{Tokenizer, TokenizerError};

/// File name of the default model (SmolLM2-135M-Instruct, Q4_1).
pub const DEFAULT_MODEL: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("no model given and the default model {DEFAULT_MODEL} was not found in: {tried}\n(fetch it with `bash tools/fetch-models.sh`, or pass -m FILE)")]
    NoDefaultModel { tried: String },
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error("context size {n_ctx} is invalid: {reason}")]
    BadContext { n_ctx: usize, reason: String },
    #[error("span plan: {0}")]
    Plan(#[from] PlanError),
    #[error("span plan: {0}")]
    PlanFile(#[from] PlanFileError),
    #[error("--uniform {0}: the density must be in (0, 1]")]
    BadDensity(f32),
    #[error("KV cache: {0}")]
    Kv(#[from] KvError),
    #[error("--device cuda: no usable GPU ({0}); use --device cpu, or --device auto to fall back to the CPU")]
    NoGpu(crate::backend::cuda::CudaUnavailable),
}

/// The KV cache element types (llama.cpp's `-ctk` / `-ctv`; see [`llama_flags`]), shared by the
/// tools. K and V may differ.
#[derive(Debug, Clone, Copy, Default, clap::Args)]
pub struct CacheTypeArgs {
    /// K cache type (-ctk): f16 or q8_0 (34 bytes per 32 values).
    #[arg(long = "cache-type-k", value_name = "TYPE", default_value = "f16")]
    pub cache_type_k: KvType,
    /// V cache type (-ctv): f16 or q8_0.
    #[arg(long = "cache-type-v", value_name = "TYPE", default_value = "f16")]
    pub cache_type_v: KvType,
}

impl CacheTypeArgs {
    pub fn types(&self) -> KvTypes {
        KvTypes {
            k: self.cache_type_k,
            v: self.cache_type_v,
        }
    }
}

/// Rewrites llama.cpp's multi-letter short flags, which clap would split into single letters
/// (`-ctk` as `-c tk`), to their long names: `-ctk` / `-ctv` (also `-ctk=TYPE`) become
/// `--cache-type-k` / `--cache-type-v`, `-cnv` becomes `--conversation`.
pub fn llama_flags(args: impl IntoIterator<Item = std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    const MAP: [(&str, &str); 3] = [
        ("-ctk", "--cache-type-k"),
        ("-ctv", "--cache-type-v"),
        ("-cnv", "--conversation"),
    ];
    args.into_iter()
        .map(|a| {
            let Some(s) = a.to_str() else { return a };
            for (short, long) in MAP {
                if s == short {
                    return long.into();
                }
                if let Some(v) = s.strip_prefix(short).and_then(|r| r.strip_prefix('=')) {
                    return format!("{long}={v}").into();
                }
            }
            a
        })
        .collect()
}

/// Which attention spans a run uses (flags shared by the tools).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct PlanArgs {
    /// Ignore the model's embedded span plan: every head attends to the whole context.
    #[arg(long, conflicts_with_all = ["plan", "uniform"])]
    pub dense: bool,
    /// Apply a span plan file (JSON) without converting the model.
    #[arg(long, value_name = "FILE", conflicts_with = "uniform")]
    pub plan: Option<PathBuf>,
    /// Apply the uniform StreamingLLM-style baseline (alpha 0, beta D, same sinks).
    #[arg(long, value_name = "D")]
    pub uniform: Option<f32>,
}

impl PlanArgs {
    /// The plan to run with: `--dense` none, `--plan` the file, `--uniform` the baseline, and
    /// otherwise the plan embedded in the model, if any. Validated against the model.
    pub fn resolve(&self, model: &Model) -> Result<Option<Plan>, RuntimeError> {
        let c = &model.config;
        let plan = if self.dense {
            None
        } else if let Some(p) = &self.plan {
            Some(Plan::load_json(p)?)
        } else if let Some(d) = self.uniform {
            if !(d > 0.0 && d <= 1.0) {
                return Err(RuntimeError::BadDensity(d));
            }
            Some(Plan::uniform(c.n_layer, c.n_head_kv, d))
        } else {
            Plan::from_gguf(&model.file)?
        };
        if let Some(p) = &plan {
            p.validate(c)?;
        }
        Ok(plan)
    }
}

/// One line describing the attention of a run at planned length `n`.
pub fn describe_plan(plan: Option<&Plan>, n: usize) -> String {
    match plan {
        None => "dense".into(),
        Some(p) => format!(
            "MoA plan ({}), density {:.3} at N = {n}",
            p.source,
            p.density_at(n)
        ),
    }
}

/// The folders searched for models: `$MOA_MODELS`, `./models`, and `models/` beside the
/// repository the binary was built in (`target/<profile>/../../models`).
pub fn model_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(d) = std::env::var_os("MOA_MODELS") {
        dirs.push(PathBuf::from(d));
    }
    dirs.push(PathBuf::from("models"));
    if let Ok(exe) = std::env::current_exe() {
        if let Some(repo) = exe.parent().and_then(Path::parent).and_then(Path::parent) {
            dirs.push(repo.join("models"));
        }
    }
    dirs
}

/// The model to use: the given path, or the default model from the first folder holding it.
pub fn resolve_model(path: Option<&Path>) -> Result<PathBuf, RuntimeError> {
    if let Some(p) = path {
        return Ok(p.to_path_buf());
    }
    let dirs = model_dirs();
    for d in &dirs {
        let p = d.join(DEFAULT_MODEL);
        if p.is_file() {
            return Ok(p);
        }
    }
    Err(RuntimeError::NoDefaultModel {
        tried: dirs
            .iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
    })
}

/// Default worker threads: the machine's available parallelism.
pub fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// A loaded model and tokenizer, with the load time.
pub struct Loaded {
    pub model: Arc<Model>,
    pub tokenizer: Tokenizer,
    pub load_ms: f64,
}

pub fn load(path: &Path) -> Result<Loaded, RuntimeError> {
    let t0 = Instant::now();
    let model = Arc::new(Model::load(path)?);
    let tokenizer = Tokenizer::from_gguf(&model.file)?;
    Ok(Loaded {
        model,
        tokenizer,
        load_ms: t0.elapsed().as_secs_f64() * 1000.0,
    })
}

/// Resolves a requested context size: 0 means the model's training context.
pub fn context_size(model: &Model, n_ctx: usize) -> Result<usize, RuntimeError> {
    let n = if n_ctx == 0 {
        model.config.n_ctx_train
    } else {
        n_ctx
    };
    if n < 2 {
        return Err(RuntimeError::BadContext {
            n_ctx: n,
            reason: "must be at least 2".into(),
        });
    }
    Ok(n)
}

/// A CPU backend with a dense cache of `n_ctx` tokens for `n_seq` sequences.
pub fn cpu_backend(
    model: &Arc<Model>,
    n_ctx: usize,
    n_seq: usize,
    n_batch: usize,
    threads: usize,
) -> Result<CpuBackend, RuntimeError> {
    cpu_backend_with_plan(model, None, n_ctx, n_seq, n_batch, threads)
}

/// The KV layout of `plan` (dense when `None`) for `n_seq` sequences of planned length `n`.
pub fn layout_for(model: &Model, plan: Option<&Plan>, n_seq: usize, n: usize) -> KvLayout {
    let c = &model.config;
    match plan {
        Some(p) => p.layout(c, n_seq, n),
        None => KvLayout::dense(n_seq, c.n_layer, c.n_head_kv, c.head_dim, n),
    }
}

/// Backend options for `n_seq` sequences of planned length `n` under `plan` with K/V stored as
/// `types` (batches of at most `n_batch` tokens, never more than `n`).
fn backend_options(
    model: &Model,
    plan: Option<&Plan>,
    types: KvTypes,
    n: usize,
    n_seq: usize,
    n_batch: usize,
    threads: usize,
) -> Result<BackendOptions, RuntimeError> {
    Ok(BackendOptions {
        max_batch: n_batch.min(n).max(1),
        threads,
        layout: layout_for(model, plan, n_seq, n).with_types(types)?,
    })
}

/// A CPU backend whose f16 cache follows `plan` (dense when `None`) for sequences of planned
/// length `n`, which is also the context (positions stay below `n`).
pub fn cpu_backend_with_plan(
    model: &Arc<Model>,
    plan: Option<&Plan>,
    n: usize,
    n_seq: usize,
    n_batch: usize,
    threads: usize,
) -> Result<CpuBackend, RuntimeError> {
    cpu_backend_with_types(model, plan, KvTypes::default(), n, n_seq, n_batch, threads)
}

/// [`cpu_backend_with_plan`] with K/V stored as `types`.
pub fn cpu_backend_with_types(
    model: &Arc<Model>,
    plan: Option<&Plan>,
    types: KvTypes,
    n: usize,
    n_seq: usize,
    n_batch: usize,
    threads: usize,
) -> Result<CpuBackend, RuntimeError> {
    Ok(CpuBackend::new(
        Arc::clone(model),
        backend_options(model, plan, types, n, n_seq, n_batch, threads)?,
    )?)
}

/// Where the forward pass runs (`--device`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Device {
    /// The GPU when one is usable, else the CPU (with a notice saying why).
    #[default]
    Auto,
    Cpu,
    Cuda,
}

impl Device {
    /// The flag's spelling: `auto`, `cpu`, `cuda`.
    pub fn name(self) -> &'static str {
        match self {
            Device::Auto => "auto",
            Device::Cpu => "cpu",
            Device::Cuda => "cuda",
        }
    }
}

/// The device a run with K/V stored as `types` goes to: `cpu` stays; `cuda` when the CUDA backend
/// can hold the cache types and a GPU is usable, else an error saying why; `auto` is `cuda` when
/// it would be, else `cpu` with a notice on stderr saying why.
pub fn resolve_device(device: Device, types: KvTypes) -> Result<Device, RuntimeError> {
    use crate::backend::cuda::{check_kv_types, probe};
    match device {
        Device::Cpu => Ok(Device::Cpu),
        // The cache types first: that error needs no GPU to be found.
        Device::Cuda => {
            check_kv_types(types)?;
            probe().map_err(RuntimeError::NoGpu)?;
            Ok(Device::Cuda)
        }
        Device::Auto => {
            if let Err(e) = probe() {
                eprintln!("note: no usable GPU ({e}); running on the CPU");
                return Ok(Device::Cpu);
            }
            match check_kv_types(types) {
                Ok(()) => Ok(Device::Cuda),
                Err(BackendError::Unsupported { reason, .. }) => {
                    eprintln!("note: the GPU backend cannot hold a {types} KV cache ({reason}); running on the CPU");
                    Ok(Device::Cpu)
                }
                Err(e) => Err(e.into()),
            }
        }
    }
}

/// A backend on `device` (resolved first with [`resolve_device`]) set up with `opts`.
pub fn backend_with_options(
    model: &Arc<Model>,
    opts: BackendOptions,
    device: Device,
) -> Result<Box<dyn Backend>, RuntimeError> {
    Ok(match resolve_device(device, opts.layout.types())? {
        Device::Cuda => Box::new(CudaBackend::new(Arc::clone(model), opts)?),
        _ => Box::new(CpuBackend::new(Arc::clone(model), opts)?),
    })
}

/// A backend on `device` whose cache follows `plan` (dense when `None`) for sequences of
/// planned length `n`, K/V stored as `types`. `auto` falls back to the CPU (with a notice) only
/// when no GPU is usable (missing driver, libraries or device) or the GPU backend cannot hold
/// the cache types (q8_0 for now), never after a GPU error such as out-of-memory.
#[allow(clippy::too_many_arguments)]
pub fn backend_with_plan(
    model: &Arc<Model>,
    plan: Option<&Plan>,
    n: usize,
    n_seq: usize,
    n_batch: usize,
    threads: usize,
    device: Device,
    types: KvTypes,
) -> Result<Box<dyn Backend>, RuntimeError> {
    let opts = backend_options(model, plan, types, n, n_seq, n_batch, threads)?;
    backend_with_options(model, opts, device)
}

/// The start-up line's KV cache figure: bytes allocated, the dense figure in the same types, and
/// the types, e.g. `KV cache 12.00 MiB (dense: 24.00 MiB), q8_0`.
pub fn describe_kv(be: &dyn Backend) -> String {
    let l = be.kv_layout();
    format!(
        "KV cache {} (dense: {}), {}",
        mib(be.kv_bytes()),
        mib(l.dense_bytes()),
        l.types()
    )
}

/// Formats a byte count as MiB with two decimals.
pub fn mib(bytes: usize) -> String {
    format!("{:.2} MiB", bytes as f64 / (1024.0 * 1024.0))
}
