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

/// The kernel sources, in the order they are concatenated.
pub const SOURCES: &[(&str, &str)] = &[
    ("common.cuh", include_str!("../../../cuda/common.cuh")),
    ("quant.cu", include_str!("../../../cuda/quant.cu")),
    ("ops.cu", include_str!("../../../cuda/ops.cu")),
    ("attention.cu", include_str!("../../../cuda/attention.cu")),
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

/// Compiles the program to PTX for `arch` (needs only libnvrtc, no GPU).
pub fn compile(arch: &'static str) -> Result<String, BackendError> {
    if !super::device::nvrtc_present() {
        return Err(BackendError::Device(
            super::device::CudaUnavailable::NoNvrtc.to_string(),
        ));
    }
    let opts = CompileOptions {
        arch: Some(arch),
        options: vec!["-std=c++17".into(), format!("-DFA_STAGES={}", fa_stages())],
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

/// PTX for `arch`, from the disk cache or compiled (and then cached; a cache that cannot be
/// written is not an error).
pub fn ptx_cached(arch: &'static str) -> Result<String, BackendError> {
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

/// Dynamic shared memory of one attention block with head dimension `d` (`FaSmem` in
/// attention.cu: stages x (K + V tile) of FA_KEYS rows of d + 8 halves).
pub fn fa_smem_bytes(d: usize, stages: usize) -> usize {
    const FA_KEYS: usize = 64;
    stages * 2 * FA_KEYS * (d + 8) * 2
}

/// Every kernel function of the program.
pub struct Kernels {
    pub quantize_q8_1: CudaFunction,
    /// q8_1 activations rearranged for the tensor-core small-batch kernels.
    pub q8_1_mma_layout: CudaFunction,
    pub rope: CudaFunction,
    pub swiglu: CudaFunction,
    pub add: CudaFunction,
    pub to_f16: CudaFunction,
    pub gather_rows: CudaFunction,
    pub kv_store: CudaFunction,
    pub argmax_rows: CudaFunction,
    pub attn_dec_d64: CudaFunction,
    pub attn_dec_d128: CudaFunction,
    pub attn_pre_d64: CudaFunction,
    pub attn_pre_d128: CudaFunction,
    pub attn_merge: CudaFunction,
    pub attn_merge_wide: CudaFunction,
    /// Dynamic shared memory of the attention kernels by head dimension (64, 128).
    pub fa_smem: [usize; 2],
    /// `add_rms_norm_q8_<PER>` for PER = 4, 8, 16 values per thread.
    pub add_rms_norm_q8: [CudaFunction; 3],
    pub swiglu_q8: CudaFunction,
    pub rope_kv: CudaFunction,
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
        let fa = |name: &str, d: usize| {
            let func = f(name)?;
            func.set_attribute(
                cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                fa_smem_bytes(d, stages) as i32,
            )
            .map_err(|e| super::device::driver_err(&format!("shared memory size of {name}"), e))?;
            Ok::<_, BackendError>(func)
        };
        Ok(Kernels {
            quantize_q8_1: f("quantize_q8_1")?,
            q8_1_mma_layout: f("q8_1_mma_layout")?,
            rope: f("rope")?,
            swiglu: f("swiglu")?,
            add: f("add")?,
            to_f16: f("to_f16")?,
            gather_rows: f("gather_rows")?,
            kv_store: f("kv_store")?,
            argmax_rows: f("argmax_rows")?,
            attn_dec_d64: fa("attn_dec_d64", 64)?,
            attn_dec_d128: fa("attn_dec_d128", 128)?,
            attn_pre_d64: fa("attn_pre_d64", 64)?,
            attn_pre_d128: fa("attn_pre_d128", 128)?,
            attn_merge: f("attn_merge")?,
            attn_merge_wide: f("attn_merge_wide")?,
            fa_smem: [fa_smem_bytes(64, stages), fa_smem_bytes(128, stages)],
            add_rms_norm_q8: [
                f("add_rms_norm_q8_4")?,
                f("add_rms_norm_q8_8")?,
                f("add_rms_norm_q8_16")?,
            ],
            swiglu_q8: f("swiglu_q8")?,
            rope_kv: f("rope_kv")?,
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
