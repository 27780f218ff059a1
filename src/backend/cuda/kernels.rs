//! The kernel program: the sources in `cuda/` (embedded in the binary), compiled with NVRTC for
//! the device's compute capability on first use and cached on disk as PTX.
//!
//! Why NVRTC at run time rather than nvcc at build time: the binary then needs no CUDA toolkit to
//! build (CI and most developers have none), runs on any GPU generation with the code generated
//! for that exact chip, and the kernels need only libnvrtc (no CUDA headers: half conversions
//! are PTX instructions, see `cuda/common.cuh`). Compiling takes about a second once; the PTX is
//! cached under `$MOA_CACHE` (default `~/.cache/moa`)/kernels keyed by a hash of source, target
//! and NVRTC version. CI compiles the program through NVRTC (from NVIDIA's PyPI wheel) so a
//! kernel that does not compile fails CI even without a GPU.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaFunction, CudaModule};
use cudarc::nvrtc::{compile_ptx_with_opts, CompileError, CompileOptions, Ptx};

use crate::backend::BackendError;
use crate::kv::{KvType, KvTypes};

/// The kernel sources, in the order they are concatenated.
pub const SOURCES: &[(&str, &str)] = &[
    ("common.cuh", include_str!("../../../cuda/common.cuh")),
    ("quant.cu", include_str!("../../../cuda/quant.cu")),
    ("ops.cu", include_str!("../../../cuda/ops.cu")),
    ("layer_tail.cu", include_str!("../../../cuda/layer_tail.cu")),
    ("attention.cu", include_str!("../../../cuda/attention.cu")),
    (
        "attention_exact.cu",
        include_str!("../../../cuda/attention_exact.cu"),
    ),
    ("profile.cu", include_str!("../../../cuda/profile.cu")),
];

/// The whole program as one translation unit (no include paths needed).
pub fn program_source() -> String {
    let mut s = String::new();
    for (name, src) in SOURCES {
        s.push_str(&format!("// ---- {name}\n"));
        s.push_str(src);
        s.push('\n');
    }
    s
}

/// NVRTC's `--gpu-architecture` value for a compute capability.
pub fn arch_for(cc: (i32, i32)) -> &'static str {
    match cc {
        (7, 0) => "sm_70",
        (7, 5) => "sm_75",
        (8, 0) => "sm_80",
        (8, 6) => "sm_86",
        (8, 7) => "sm_87",
        (8, 9) => "sm_89",
        (9, 0) => "sm_90",
        (10, 0) => "sm_100",
        (12, 0) => "sm_120",
        (a, b) => Box::leak(format!("sm_{a}{b}").into_boxed_str()),
    }
}

fn compile_error(e: CompileError) -> BackendError {
    match e {
        CompileError::CompileError { log, .. } => BackendError::Device(format!(
            "NVRTC could not compile the kernels:\n{}",
            log.to_string_lossy()
        )),
        other => BackendError::Device(format!("NVRTC: {other:?}")),
    }
}

/// An error naming the missing library unless libnvrtc loads: checked before any NVRTC call,
/// which would otherwise panic inside cudarc.
fn require_nvrtc() -> Result<(), BackendError> {
    if super::device::nvrtc_present() {
        Ok(())
    } else {
        Err(BackendError::Device(
            super::device::CudaUnavailable::NoNvrtc.to_string(),
        ))
    }
}

/// Compiles the program to PTX for `arch` (needs only libnvrtc, no GPU).
pub fn compile(arch: &'static str) -> Result<String, BackendError> {
    require_nvrtc()?;
    let opts = CompileOptions {
        arch: Some(arch),
        options: [
            vec!["-std=c++17".into(), format!("-DFA_STAGES={}", fa_stages())],
            extra_defines(),
        ]
        .concat(),
        name: Some("moa_kernels.cu".into()),
        ..Default::default()
    };
    let ptx = compile_ptx_with_opts(program_source(), opts).map_err(compile_error)?;
    Ok(ptx.to_src())
}

fn cache_path(arch: &str) -> Option<PathBuf> {
    let base = std::env::var_os("MOA_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/moa")))?;
    let mut h = DefaultHasher::new();
    program_source().hash(&mut h);
    arch.hash(&mut h);
    fa_stages().hash(&mut h);
    extra_defines().hash(&mut h);
    let (mut major, mut minor) = (0, 0);
    // SAFETY: plain version query of a loaded library.
    unsafe {
        let _ = cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor);
    }
    (major, minor).hash(&mut h);
    Some(
        base.join("kernels")
            .join(format!("{:016x}-{arch}.ptx", h.finish())),
    )
}

/// Compiles the kernels for `arch` into the disk cache (what the first use on such a GPU would
/// do, with the same `MOA_FA_STAGES` / `MOA_NVRTC_DEFINES` / `MOA_CACHE`), on a machine that
/// needs only libnvrtc; returns the cache file, if there is a cache folder. A GPU machine whose
/// libnvrtc has the same version then skips the compile (about 35 s for sm_90).
pub fn precompile(arch: &'static str) -> Result<Option<PathBuf>, BackendError> {
    ptx_cached(arch)?;
    Ok(cache_path(arch).filter(|p| p.is_file()))
}

/// PTX for `arch`, from the disk cache or compiled (and then cached; a cache that cannot be
/// written is not an error).
pub fn ptx_cached(arch: &'static str) -> Result<String, BackendError> {
    require_nvrtc()?; // before the cache key, which asks libnvrtc for its version
    let path = cache_path(arch);
    if let Some(p) = &path {
        if let Ok(s) = std::fs::read_to_string(p) {
            return Ok(s);
        }
    }
    let ptx = compile(arch)?;
    if let Some(p) = &path {
        if let Some(dir) = p.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let _ = crate::util::write_file_atomic(p, ptx.as_bytes());
    }
    Ok(ptx)
}

/// Macro definitions for the kernel sources from `MOA_NVRTC_DEFINES` (`NAME=VALUE` items
/// separated by spaces or commas, each passed as `-DNAME=VALUE`), for measuring variants of a
/// kernel with one binary: a variant is a macro the sources guard with `#ifndef` (the fifteenth
/// session timed its L1 and scale-decoding variants this way, one NVRTC compile each).
/// Items that are not a plain name with an optional value are ignored.
pub fn extra_defines() -> Vec<String> {
    let raw = std::env::var("MOA_NVRTC_DEFINES").unwrap_or_default();
    raw.split(|c: char| c == ',' || c.is_whitespace())
        .filter(|item| {
            let name = item.split('=').next().unwrap_or("");
            !name.is_empty()
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                && item
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '=' || c == '-')
        })
        .map(|item| format!("-D{item}"))
        .collect()
}

/// Key-tile stages of the attention kernels' cp.async pipeline (`FA_STAGES` in attention.cu,
/// passed to NVRTC): two (68 KiB per block at head dimension 128, so three blocks fit an
/// H100's multiprocessor). Measured on an H100 (uniform 0.5 decode at depth 32768, synthetic
/// Llama-3-8B): 2 stages with 2 blocks per SM 257 t/s, 3 stages with 4 blocks per SM 246, 4
/// stages 240 at best. `MOA_FA_STAGES` (2 to 4) overrides it, for measuring.
pub fn fa_stages() -> usize {
    let forced = std::env::var("MOA_FA_STAGES")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|s| (2..=4).contains(s));
    forced.unwrap_or(2)
}

/// Dynamic shared memory of one attention block with head dimension `d` and cache types `types`
/// (`FaSmem` in attention.cu): stages x (K tile + V tile), an f16 tile being FA_KEYS rows of
/// d + 8 halves and a q8_0 tile FA_KEYS rows of d / 32 blocks of 34 bytes, then one f16 tile
/// for each q8_0 part (the converted tile the tensor cores read).
pub fn fa_smem_bytes(d: usize, stages: usize, types: KvTypes) -> usize {
    const FA_KEYS: usize = 64;
    let tile16 = FA_KEYS * (d + 8) * 2;
    let part = |t: KvType| match t {
        KvType::F16 => tile16,
        KvType::Q8_0 => FA_KEYS * t.bytes_for(d),
    };
    let conv = |t: KvType| if t == KvType::Q8_0 { tile16 } else { 0 };
    stages * (part(types.k) + part(types.v)) + conv(types.k) + conv(types.v)
}

/// The attention kernels' cache type combinations, in [`Kernels::attn`] order.
pub const ATTN_TYPES: [KvTypes; 4] = [
    KvTypes {
        k: KvType::F16,
        v: KvType::F16,
    },
    KvTypes {
        k: KvType::Q8_0,
        v: KvType::Q8_0,
    },
    KvTypes {
        k: KvType::Q8_0,
        v: KvType::F16,
    },
    KvTypes {
        k: KvType::F16,
        v: KvType::Q8_0,
    },
];

/// Index of `types` in [`ATTN_TYPES`].
pub fn attn_types_index(types: KvTypes) -> usize {
    ATTN_TYPES
        .iter()
        .position(|&t| t == types)
        .expect("every K/V type pair has attention kernels")
}

/// Name of the attention kernel for prefill or decode, head dimension `d` and cache `types`
/// (attention.cu: `attn_dec_d64`, `attn_pre_d128_k8v8`, ...).
pub fn attn_kernel_name(prefill: bool, d: usize, types: KvTypes) -> String {
    let base = format!("attn_{}_d{d}", if prefill { "pre" } else { "dec" });
    let suffix = |t: KvType| if t == KvType::Q8_0 { "8" } else { "16" };
    if types == KvTypes::default() {
        base
    } else {
        format!("{base}_k{}v{}", suffix(types.k), suffix(types.v))
    }
}

/// One attention kernel with its dynamic shared memory.
pub struct AttnKernel {
    pub func: CudaFunction,
    pub smem: usize,
}

/// Every kernel function of the program.
pub struct Kernels {
    pub quantize_q8_1: CudaFunction,
    /// q8_1 activations rearranged for the tensor-core small-batch kernels.
    pub q8_1_mma_layout: CudaFunction,
    /// f32 activations as q8_K in the same order, for the K-quants' tensor-core kernels.
    pub q8k_mma_layout: CudaFunction,
    pub rope: CudaFunction,
    pub swiglu: CudaFunction,
    pub add: CudaFunction,
    pub to_f16: CudaFunction,
    pub gather_rows: CudaFunction,
    pub kv_store: CudaFunction,
    pub argmax_rows: CudaFunction,
    /// Span attention by [`ATTN_TYPES`] index, then prefill (`attn_pre_*`) or decode
    /// (`attn_dec_*`), then head dimension 64 or 128.
    pub attn: Vec<[[AttnKernel; 2]; 2]>,
    pub attn_merge: CudaFunction,
    pub attn_merge_wide: CudaFunction,
    /// Exact attention (attention_exact.cu: the CPU backend's arithmetic, f16 K/V) for head
    /// dimension 64 and 128.
    pub attn_exact: [CudaFunction; 2],
    /// `add_rms_norm_q8_<PER>` for PER = 4, 8, 16 values per thread.
    pub add_rms_norm_q8: [CudaFunction; 3],
    /// The same writing the q8_K mma layout (`add_rms_norm_q8k_<PER>`).
    pub add_rms_norm_q8k: [CudaFunction; 3],
    pub swiglu_q8: CudaFunction,
    /// SwiGLU writing the q8_K mma layout (the down projection on the K-quant tensor cores).
    pub swiglu_q8k: CudaFunction,
    pub rope_kv: CudaFunction,
    /// q8_0 caches: quantize staged K/V rows (and store them when decoding), and the
    /// type-generic store of staged rows.
    pub kv_quant_q8_0: CudaFunction,
    pub kv_store_rows: CudaFunction,
    module: Arc<CudaModule>,
}

/// The compiled program (from the disk cache or NVRTC) loaded into `ctx`.
pub fn load_module(
    ctx: &Arc<CudaContext>,
    arch: &'static str,
) -> Result<Arc<CudaModule>, BackendError> {
    let ptx = ptx_cached(arch)?;
    ctx.load_module(Ptx::from_src(ptx))
        .map_err(|e| super::device::driver_err("loading the kernel module", e))
}

impl Kernels {
    pub fn load(ctx: &Arc<CudaContext>, arch: &'static str) -> Result<Kernels, BackendError> {
        let module = load_module(ctx, arch)?;
        let f = |name: &str| load_named(&module, name);
        // The attention kernels take more than the default 48 KiB of dynamic shared memory.
        let stages = fa_stages();
        let fa = |prefill: bool, d: usize, types: KvTypes| {
            let name = attn_kernel_name(prefill, d, types);
            let smem = fa_smem_bytes(d, stages, types);
            let func = f(&name)?;
            func.set_attribute(
                cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                smem as i32,
            )
            .map_err(|e| super::device::driver_err(&format!("shared memory size of {name}"), e))?;
            Ok::<_, BackendError>(AttnKernel { func, smem })
        };
        let mut attn = Vec::with_capacity(ATTN_TYPES.len());
        for types in ATTN_TYPES {
            attn.push([
                [fa(true, 64, types)?, fa(true, 128, types)?],
                [fa(false, 64, types)?, fa(false, 128, types)?],
            ]);
        }
        Ok(Kernels {
            quantize_q8_1: f("quantize_q8_1")?,
            q8_1_mma_layout: f("q8_1_mma_layout")?,
            q8k_mma_layout: f("q8k_mma_layout")?,
            rope: f("rope")?,
            swiglu: f("swiglu")?,
            add: f("add")?,
            to_f16: f("to_f16")?,
            gather_rows: f("gather_rows")?,
            kv_store: f("kv_store")?,
            argmax_rows: f("argmax_rows")?,
            attn,
            attn_merge: f("attn_merge")?,
            attn_merge_wide: f("attn_merge_wide")?,
            attn_exact: [f("attn_exact_d64")?, f("attn_exact_d128")?],
            add_rms_norm_q8: [
                f("add_rms_norm_q8_4")?,
                f("add_rms_norm_q8_8")?,
                f("add_rms_norm_q8_16")?,
            ],
            add_rms_norm_q8k: [
                f("add_rms_norm_q8k_4")?,
                f("add_rms_norm_q8k_8")?,
                f("add_rms_norm_q8k_16")?,
            ],
            swiglu_q8: f("swiglu_q8")?,
            swiglu_q8k: f("swiglu_q8k")?,
            rope_kv: f("rope_kv")?,
            kv_quant_q8_0: f("kv_quant_q8_0")?,
            kv_store_rows: f("kv_store_rows")?,
            module,
        })
    }

    /// A kernel by name (per-type kernels: `mmvq_q4_k`, `dequant_f16_q6_k`, `embed_q4_1`, ...).
    pub fn get(&self, name: &str) -> Result<CudaFunction, BackendError> {
        load_named(&self.module, name)
    }
}

/// Loads a kernel and records its name for the kernel timer ([`super::timer`]).
pub fn load_named(module: &Arc<CudaModule>, name: &str) -> Result<CudaFunction, BackendError> {
    let f = module
        .load_function(name)
        .map_err(|e| super::device::driver_err(&format!("kernel {name}"), e))?;
    super::timer::name_kernel(&f, name);
    Ok(f)
}

impl Kernels {
    /// The attention kernel for prefill (`attn_pre_*`) or decode (`attn_dec_*`), head dimension
    /// `d` (64 or 128) and cache `types`.
    pub fn attn_kernel(&self, prefill: bool, d: usize, types: KvTypes) -> &AttnKernel {
        &self.attn[attn_types_index(types)][usize::from(!prefill)][usize::from(d == 128)]
    }
}
