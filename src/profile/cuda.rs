//! The profiler on a GPU: [`CudaProfiler`] computes what [`super::Profiler`] computes on the CPU
//! (the loss of the response tokens, dL/d(hidden) and dL/dO per layer, and the influence block
//! sums), step for step and in f32, with the kernels of `cuda/profile.cu` and cuBLAS (plain f32
//! arithmetic: `CUBLAS_COMPUTE_32F_PEDANTIC`, no TF32).
//!
//! - Weights are dequantized on the host ([`DenseModel`]) and uploaded once as f32 (about 4 bytes
//!   per parameter; a model that does not fit is an out-of-memory error that says so).
//! - The forward pass keeps the same checkpoints as [`super::forward`] on the device: every
//!   layer's input, its attention output and the rows' log-sum-exp. The backward pass recomputes
//!   each layer from them, last to first, as [`super::backward`] does.
//! - Attention runs in 64 x 64 tiles (`prof_attn_*`): the influence of every entry is summed per
//!   fine block of `min(block, 64)` tokens and query head on the device, and those sums are
//!   added per profile block and KV group on the host (f64). Hence the block size must divide 64
//!   or be a multiple of it.
//! - Buffers for the activations are sized for the longest sample seen so far and reused.
//! - `MOA_KERNEL_TIMES=1` times every kernel and cuBLAS call ([`timer`]); the table goes to
//!   stderr when the tool exits.
//!
//! Nothing here panics without a GPU: [`CudaProfiler::new`] reports why it cannot run, and
//! [`super::profiler_for`] falls back to the CPU when asked for `auto`.

use std::ops::Range;
use std::sync::{Arc, Mutex};

use cudarc::cublas::{result as blas, sys as blas_sys, CudaBlas};
use cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute};
use cudarc::driver::{CudaFunction, LaunchConfig};

use super::backward::Captured;
use super::dense::DenseModel;
use super::influence::SampleInfluence;
use super::linalg::RopeTable;
use super::{sample_targets, SampleError, SampleProfiler, SampleResult};
use crate::backend::cuda::device::{blocks, driver_err, lcfg, DevBuf, Gpu, A};
use crate::backend::cuda::{kernels, timer};
use crate::backend::BackendError;
use crate::moa::profile_file::packed_index;
use crate::model::{Model, ModelConfig, ModelError};

/// Tile edge of the attention kernels (`PA_T` in profile.cu).
const TILE: usize = 64;
/// Threads per attention block (`PA_THREADS`), and per block of the element-wise kernels.
const THREADS: u32 = 256;
/// Target rows whose logits exist at once (the loss is computed in chunks of this many).
const LOSS_ROWS: usize = 256;

/// Why the GPU profiler cannot run.
#[derive(Debug, thiserror::Error)]
pub enum CudaProfileError {
    /// A GPU error: no device, a failed allocation (out of memory), a failed launch.
    #[error(transparent)]
    Device(#[from] BackendError),
    /// The model or settings are outside what the kernels support (the CPU profiler can run it).
    #[error("{0}")]
    Unsupported(String),
    #[error(transparent)]
    Model(#[from] ModelError),
}

/// Dynamic shared memory of the attention kernels (bytes), as laid out in profile.cu.
pub fn attn_smem_bytes(head_dim: usize, fine_block: usize) -> [usize; 3] {
    let row = TILE * (head_dim + 1);
    let p = TILE * (TILE + 1);
    let nsub = TILE / fine_block.max(1);
    [
        (2 * row + p) * 4,
        (3 * row + p + 2 * TILE + nsub * nsub) * 4,
        (4 * row + p + 2 * TILE) * 4,
    ]
}

/// The edge of the blocks the kernels sum influence over: the profile block when it divides 64,
/// the 64-token tile when the block is a multiple of 64.
pub fn fine_block(block: usize) -> Option<usize> {
    if block == 0 {
        None
    } else if block <= TILE && TILE.is_multiple_of(block) {
        Some(block)
    } else if block.is_multiple_of(TILE) {
        Some(TILE)
    } else {
        None
    }
}

struct LayerW {
    attn_norm: DevBuf,
    wq: DevBuf,
    wk: DevBuf,
    wv: DevBuf,
    wo: DevBuf,
    ffn_norm: DevBuf,
    gate: DevBuf,
    up: DevBuf,
    down: DevBuf,
}

struct Weights {
    embd: DevBuf,
    out_norm: DevBuf,
    /// `None` when tied to `embd`.
    output: Option<DevBuf>,
    layers: Vec<LayerW>,
}

impl Weights {
    fn output(&self) -> u64 {
        self.output.as_ref().unwrap_or(&self.embd).ptr
    }
}

struct Fns {
    gather: CudaFunction,
    scatter_add: CudaFunction,
    add: CudaFunction,
    swiglu: CudaFunction,
    swiglu_bwd: CudaFunction,
    rms_norm: CudaFunction,
    rms_norm_bwd: CudaFunction,
    rope: CudaFunction,
    xent: CudaFunction,
    dsum: CudaFunction,
    attn_fwd: CudaFunction,
    attn_bwd_q: CudaFunction,
    attn_bwd_kv: CudaFunction,
}

/// Device buffers for samples of up to `cap` tokens (f32 unless noted).
struct Work {
    cap: usize,
    /// Layer inputs, then the final hidden state: (n_layer + 1) x n x n_embd.
    ckx: DevBuf,
    /// Attention outputs: n_layer x n x q_dim.
    cko: DevBuf,
    /// Log-sum-exp: n_layer x n_head x n.
    cklse: DevBuf,
    xn: DevBuf,
    q: DevBuf,
    k: DevBuf,
    v: DevBuf,
    x2: DevBuf,
    xn2: DevBuf,
    gate: DevBuf,
    up: DevBuf,
    /// SwiGLU output in the forward pass, dL/d(hidden of the MLP) then dL/d(gate) backward.
    hmid: DevBuf,
    du: DevBuf,
    /// dL/d(current hidden state), n x n_embd.
    dx: DevBuf,
    dxn: DevBuf,
    d_o: DevBuf,
    dq: DevBuf,
    dk: DevBuf,
    dv: DevBuf,
    dsum: DevBuf,
    /// Influence per layer and query head, packed fine blocks: n_layer x n_head x cells.
    infl: DevBuf,
    /// Token ids (i32).
    tok: DevBuf,
    /// Rope (cos, sin) per token and rotated pair.
    cs: DevBuf,
}

/// Scratch of the loss: up to [`LOSS_ROWS`] target rows.
struct LossWork {
    pos: DevBuf,
    ids: DevBuf,
    xs: DevBuf,
    xn: DevBuf,
    logits: DevBuf,
    dxn: DevBuf,
    dxs: DevBuf,
    /// Per-row loss (f64).
    loss: DevBuf,
}

/// The profiler on one GPU.
pub struct CudaProfiler {
    // Device buffers first: fields drop in order, and the buffers must go while the context
    // (held by `gpu` and `blas`) still lives.
    w: Weights,
    loss_work: LossWork,
    work: Mutex<Option<Work>>,
    f: Fns,
    blas: CudaBlas,
    gpu: Gpu,
    cfg: ModelConfig,
    block: usize,
    fine: usize,
    smem: [usize; 3],
    half_rot: usize,
    weight_bytes: usize,
}

fn gib(bytes: usize) -> String {
    format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
}

impl CudaProfiler {
    /// Opens GPU 0, compiles (or loads the cached) kernels and uploads `model`'s weights as f32.
    pub fn new(model: &Model, block: usize) -> Result<CudaProfiler, CudaProfileError> {
        let c = &model.config;
        let unsupported = |s: String| Err(CudaProfileError::Unsupported(s));
        let Some(fine) = fine_block(block) else {
            return unsupported(format!(
                "block {block}: the GPU kernels' 64-token tiles need a block that divides 64 or \
                 is a multiple of 64"
            ));
        };
        if c.head_dim != 64 && c.head_dim != 128 {
            return unsupported(format!(
                "head dimension {}: the GPU attention kernels take 64 or 128",
                c.head_dim
            ));
        }
        if c.n_head_kv == 0 || !c.n_head.is_multiple_of(c.n_head_kv) {
            return unsupported(format!(
                "{} query heads over {} KV heads",
                c.n_head, c.n_head_kv
            ));
        }
        let gpu = Gpu::open(0)?;
        if gpu.cc < (8, 0) {
            return unsupported(format!(
                "{} has compute capability {}.{}; the CUDA kernels need 8.0 or newer",
                gpu.name, gpu.cc.0, gpu.cc.1
            ));
        }
        let smem = attn_smem_bytes(c.head_dim, fine);
        let optin = gpu
            .ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
            .unwrap_or(0)
            .max(0) as usize;
        let need = smem.iter().copied().max().unwrap_or(0);
        if need > optin {
            return unsupported(format!(
                "the attention kernels at head dimension {} need {need} bytes of shared memory \
                 per block, {} allows {optin}",
                c.head_dim, gpu.name
            ));
        }
        let module = kernels::load_module(&gpu.ctx, kernels::arch_for(gpu.cc))?;
        let get = |name: &str| kernels::load_named(&module, name);
        let d = c.head_dim;
        let f = Fns {
            gather: get("prof_gather")?,
            scatter_add: get("prof_scatter_add")?,
            add: get("prof_add")?,
            swiglu: get("prof_swiglu")?,
            swiglu_bwd: get("prof_swiglu_bwd")?,
            rms_norm: get("prof_rms_norm")?,
            rms_norm_bwd: get("prof_rms_norm_bwd")?,
            rope: get("prof_rope")?,
            xent: get("prof_xent")?,
            dsum: get("prof_attn_dsum")?,
            attn_fwd: get(&format!("prof_attn_fwd_d{d}"))?,
            attn_bwd_q: get(&format!("prof_attn_bwd_q_d{d}"))?,
            attn_bwd_kv: get(&format!("prof_attn_bwd_kv_d{d}"))?,
        };
        for (func, bytes, name) in [
            (&f.attn_fwd, smem[0], "prof_attn_fwd"),
            (&f.attn_bwd_q, smem[1], "prof_attn_bwd_q"),
            (&f.attn_bwd_kv, smem[2], "prof_attn_bwd_kv"),
        ] {
            func.set_attribute(
                CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                bytes as i32,
            )
            .map_err(|e| driver_err(&format!("shared memory size of {name}"), e))?;
        }
        let blas = CudaBlas::new(Arc::clone(&gpu.stream))
            .map_err(|e| BackendError::Device(format!("cuBLAS: {e:?}")))?;

        let dense = DenseModel::from_model(model)?;
        let total_floats = dense.token_embd.len()
            + dense.output_norm.len()
            + dense.output.as_ref().map_or(0, Vec::len)
            + dense
                .layers
                .iter()
                .map(|l| {
                    l.attn_norm.len()
                        + l.wq.len()
                        + l.wk.len()
                        + l.wv.len()
                        + l.wo.len()
                        + l.ffn_norm.len()
                        + l.gate.len()
                        + l.up.len()
                        + l.down.len()
                })
                .sum::<usize>();
        let weight_bytes = total_floats * 4;
        let (free, total) = gpu.mem_info();
        if free > 0 && weight_bytes > free {
            return Err(BackendError::DeviceOutOfMemory {
                what: format!(
                    "the GPU profiler's f32 weights ({}; --device cpu profiles on the CPU)",
                    gib(weight_bytes)
                ),
                bytes: weight_bytes,
                free,
                total,
            }
            .into());
        }
        let up = |v: &[f32], name: &str| -> Result<DevBuf, BackendError> {
            let what = format!(
                "f32 weight {name} (the GPU profiler keeps every weight dequantized to f32, {} \
                 in all; --device cpu profiles on the CPU)",
                gib(weight_bytes)
            );
            let b = gpu.alloc(v.len() * 4, &what)?;
            gpu.upload(&b, v)?;
            Ok(b)
        };
        let layers = dense
            .layers
            .iter()
            .enumerate()
            .map(|(l, lw)| {
                let n = |s: &str| format!("blk.{l}.{s}");
                Ok(LayerW {
                    attn_norm: up(&lw.attn_norm, &n("attn_norm"))?,
                    wq: up(&lw.wq, &n("attn_q"))?,
                    wk: up(&lw.wk, &n("attn_k"))?,
                    wv: up(&lw.wv, &n("attn_v"))?,
                    wo: up(&lw.wo, &n("attn_output"))?,
                    ffn_norm: up(&lw.ffn_norm, &n("ffn_norm"))?,
                    gate: up(&lw.gate, &n("ffn_gate"))?,
                    up: up(&lw.up, &n("ffn_up"))?,
                    down: up(&lw.down, &n("ffn_down"))?,
                })
            })
            .collect::<Result<Vec<_>, BackendError>>()?;
        let w = Weights {
            embd: up(&dense.token_embd, "token_embd")?,
            out_norm: up(&dense.output_norm, "output_norm")?,
            output: match &dense.output {
                Some(o) => Some(up(o, "output")?),
                None => None,
            },
            layers,
        };
        let (e, v) = (c.n_embd, c.n_vocab);
        let r = LOSS_ROWS;
        let a = |floats: usize, what: &str| gpu.alloc(floats * 4, what);
        let loss_work = LossWork {
            pos: a(r, "loss target positions")?,
            ids: a(r, "loss target ids")?,
            xs: a(r * e, "loss rows")?,
            xn: a(r * e, "loss rows")?,
            logits: a(r * v, "logits of the loss rows")?,
            dxn: a(r * e, "loss gradient rows")?,
            dxs: a(r * e, "loss gradient rows")?,
            loss: a(2 * r, "per-row loss")?,
        };
        let half_rot = (c.rope.n_rot / 2).min(c.head_dim / 2);
        Ok(CudaProfiler {
            gpu,
            blas,
            f,
            cfg: c.clone(),
            block,
            fine,
            smem,
            half_rot,
            w,
            loss_work,
            work: Mutex::new(None),
            weight_bytes,
        })
    }

    /// Bytes of f32 weights on the device.
    pub fn weight_bytes(&self) -> usize {
        self.weight_bytes
    }

    /// Packed fine cells per head for `n` tokens.
    fn cells(&self, n: usize) -> usize {
        let nf = n.div_ceil(self.fine);
        nf * (nf + 1) / 2
    }

    fn alloc_work(&self, cap: usize) -> Result<Work, BackendError> {
        let c = &self.cfg;
        let (l, e, qd, kvd, f, h) = (c.n_layer, c.n_embd, c.q_dim(), c.kv_dim(), c.n_ff, c.n_head);
        let per_tok = (l + 1) * e + l * qd + l * h + 5 * e + 3 * qd + 4 * kvd + 4 * f + h + 1;
        let total = (per_tok * cap + l * h * self.cells(cap) + cap * self.half_rot * 2) * 4;
        let what = |part: &str| {
            format!(
                "{part} of the profiler's activations for {cap} tokens ({} in all)",
                gib(total)
            )
        };
        let a = |floats: usize, part: &str| self.gpu.alloc(floats * 4, &what(part));
        Ok(Work {
            cap,
            ckx: a((l + 1) * cap * e, "layer inputs")?,
            cko: a(l * cap * qd, "attention outputs")?,
            cklse: a(l * h * cap, "log-sum-exp")?,
            xn: a(cap * e, "normed hidden")?,
            q: a(cap * qd, "queries")?,
            k: a(cap * kvd, "keys")?,
            v: a(cap * kvd, "values")?,
            x2: a(cap * e, "hidden")?,
            xn2: a(cap * e, "normed hidden")?,
            gate: a(cap * f, "gate")?,
            up: a(cap * f, "up")?,
            hmid: a(cap * f, "MLP hidden")?,
            du: a(cap * f, "MLP gradient")?,
            dx: a(cap * e, "hidden gradient")?,
            dxn: a(cap * e, "hidden gradient")?,
            d_o: a(cap * qd, "attention output gradient")?,
            dq: a(cap * qd, "query gradient")?,
            dk: a(cap * kvd, "key gradient")?,
            dv: a(cap * kvd, "value gradient")?,
            dsum: a(h * cap, "attention row sums")?,
            infl: a(l * h * self.cells(cap), "influence sums")?,
            tok: a(cap, "token ids")?,
            cs: a(cap * self.half_rot.max(1) * 2, "rope tables")?,
        })
    }

    fn launch(&self, f: &CudaFunction, c: LaunchConfig, args: &[A]) -> Result<(), BackendError> {
        self.gpu.launch(f, c, args)
    }

    /// One thread per item.
    fn cfg1(n: usize) -> LaunchConfig {
        lcfg((blocks(n, THREADS as usize), 1, 1), THREADS)
    }

    /// One block per row.
    fn cfg_rows(rows: usize) -> LaunchConfig {
        lcfg((rows.max(1) as u32, 1, 1), THREADS)
    }

    fn attn_cfg(&self, grid: (usize, usize), smem: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (grid.0 as u32, grid.1 as u32, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: smem as u32,
        }
    }

    fn zero(&self, ptr: u64, bytes: usize) -> Result<(), BackendError> {
        // SAFETY: callers pass a region inside one live allocation; ordered on our stream.
        unsafe {
            cudarc::driver::result::memset_d8_async(ptr, 0, bytes, self.gpu.stream.cu_stream())
        }
        .map_err(|e| driver_err("clearing memory", e))
    }

    /// Column-major `C (m x n) = op(A) op(B) (+ C)` in f32 (cuBLAS, no reduced precision).
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        &self,
        ta: bool,
        m: usize,
        n: usize,
        k: usize,
        a: u64,
        lda: usize,
        b: u64,
        ldb: usize,
        c: u64,
        ldc: usize,
        acc: bool,
    ) -> Result<(), BackendError> {
        if m == 0 || n == 0 {
            return Ok(());
        }
        let (alpha, beta) = (1.0f32, if acc { 1.0f32 } else { 0.0 });
        let op = |t: bool| {
            if t {
                blas_sys::cublasOperation_t::CUBLAS_OP_T
            } else {
                blas_sys::cublasOperation_t::CUBLAS_OP_N
            }
        };
        let f32t = blas_sys::cudaDataType_t::CUDA_R_32F;
        let timed = timer::enabled().then(|| timer::start(&self.gpu.stream));
        // SAFETY: callers pass device pointers covering the operands' shapes with these leading
        // dimensions; the handle is bound to our stream.
        let r = unsafe {
            blas::gemm_ex(
                *self.blas.handle(),
                op(ta),
                op(false),
                m as i32,
                n as i32,
                k as i32,
                &alpha as *const f32 as *const _,
                a as *const _,
                f32t,
                lda as i32,
                b as *const _,
                f32t,
                ldb as i32,
                &beta as *const f32 as *const _,
                c as *mut _,
                f32t,
                ldc as i32,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F_PEDANTIC,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| BackendError::Device(format!("cuBLAS sgemm: {e:?}")));
        if let Some(Some(start)) = timed {
            timer::stop_as(&self.gpu.stream, "cublas_sgemm (profiler, f32)", start);
        }
        r
    }

    /// Row-major `y (m x out) (+)= x (m x inp) w^T` for a weight of `out` rows of `inp` (as
    /// linalg::matmul_wt).
    #[allow(clippy::too_many_arguments)]
    fn mm_wt(
        &self,
        x: u64,
        m: usize,
        inp: usize,
        w: u64,
        out: usize,
        y: u64,
        acc: bool,
    ) -> Result<(), BackendError> {
        // Column-major: y^T (out x m) = w (the col-major inp x out array, transposed) x^T.
        self.gemm(true, out, m, inp, w, inp, x, inp, y, out, acc)
    }

    /// Row-major `dx (m x inp) (+)= dy (m x out) w` (as linalg::matmul_w).
    #[allow(clippy::too_many_arguments)]
    fn mm_w(
        &self,
        dy: u64,
        m: usize,
        out: usize,
        w: u64,
        inp: usize,
        dx: u64,
        acc: bool,
    ) -> Result<(), BackendError> {
        // Column-major: dx^T (inp x m) = w^T (the col-major inp x out array) dy^T.
        self.gemm(false, inp, m, out, w, inp, dy, out, dx, inp, acc)
    }

    fn rms_norm(&self, x: u64, w: u64, rows: usize, y: u64) -> Result<(), BackendError> {
        let c = &self.cfg;
        self.launch(
            &self.f.rms_norm,
            Self::cfg_rows(rows),
            &[
                A::P(x),
                A::P(w),
                A::F(c.rms_eps),
                A::I(c.n_embd as i32),
                A::P(y),
            ],
        )
    }

    /// `dx += ` the gradient of `rms_norm(x) * w` given `dy`.
    fn rms_norm_bwd(
        &self,
        x: u64,
        w: u64,
        dy: u64,
        rows: usize,
        dx: u64,
    ) -> Result<(), BackendError> {
        let c = &self.cfg;
        self.launch(
            &self.f.rms_norm_bwd,
            Self::cfg_rows(rows),
            &[
                A::P(x),
                A::P(w),
                A::F(c.rms_eps),
                A::P(dy),
                A::I(c.n_embd as i32),
                A::P(dx),
            ],
        )
    }

    fn add(&self, x: u64, y: u64, len: usize) -> Result<(), BackendError> {
        self.launch(
            &self.f.add,
            Self::cfg1(len),
            &[A::P(x), A::P(y), A::P(len as u64)],
        )
    }

    fn rope(
        &self,
        x: u64,
        n: usize,
        heads: usize,
        cs: u64,
        inverse: bool,
    ) -> Result<(), BackendError> {
        if self.half_rot == 0 {
            return Ok(());
        }
        self.launch(
            &self.f.rope,
            Self::cfg1(n * heads * self.half_rot),
            &[
                A::P(x),
                A::I(n as i32),
                A::I(heads as i32),
                A::I(self.cfg.head_dim as i32),
                A::I(self.half_rot as i32),
                A::P(cs),
                A::F(if inverse { -1.0 } else { 1.0 }),
            ],
        )
    }

    /// Norm, projections and rotation of layer `l` for input `x` (as forward::attn_inputs).
    fn attn_inputs(&self, wk: &Work, l: usize, x: u64, n: usize) -> Result<(), BackendError> {
        let c = &self.cfg;
        let lw = &self.w.layers[l];
        let (e, qd, kvd) = (c.n_embd, c.q_dim(), c.kv_dim());
        self.rms_norm(x, lw.attn_norm.ptr, n, wk.xn.ptr)?;
        self.mm_wt(wk.xn.ptr, n, e, lw.wq.ptr, qd, wk.q.ptr, false)?;
        self.mm_wt(wk.xn.ptr, n, e, lw.wk.ptr, kvd, wk.k.ptr, false)?;
        self.mm_wt(wk.xn.ptr, n, e, lw.wv.ptr, kvd, wk.v.ptr, false)?;
        self.rope(wk.q.ptr, n, c.n_head, wk.cs.ptr, false)?;
        self.rope(wk.k.ptr, n, c.n_head_kv, wk.cs.ptr, false)
    }

    /// The rest of layer `l` after attention (as forward::mlp_half): x2, xn2, gate, up, and with
    /// `out` the SwiGLU output and the layer output written there.
    fn mlp_half(
        &self,
        wk: &Work,
        l: usize,
        x: u64,
        o: u64,
        n: usize,
        out: Option<u64>,
    ) -> Result<(), BackendError> {
        let c = &self.cfg;
        let lw = &self.w.layers[l];
        let (e, qd, f) = (c.n_embd, c.q_dim(), c.n_ff);
        self.mm_wt(o, n, qd, lw.wo.ptr, e, wk.x2.ptr, false)?;
        self.add(wk.x2.ptr, x, n * e)?;
        self.rms_norm(wk.x2.ptr, lw.ffn_norm.ptr, n, wk.xn2.ptr)?;
        self.mm_wt(wk.xn2.ptr, n, e, lw.gate.ptr, f, wk.gate.ptr, false)?;
        self.mm_wt(wk.xn2.ptr, n, e, lw.up.ptr, f, wk.up.ptr, false)?;
        if let Some(out) = out {
            self.launch(
                &self.f.swiglu,
                Self::cfg1(n * f),
                &[
                    A::P(wk.gate.ptr),
                    A::P(wk.up.ptr),
                    A::P(wk.hmid.ptr),
                    A::P((n * f) as u64),
                ],
            )?;
            self.mm_wt(wk.hmid.ptr, n, f, lw.down.ptr, e, out, false)?;
            self.add(out, wk.x2.ptr, n * e)?;
        }
        Ok(())
    }

    fn layer_ptrs(&self, wk: &Work, l: usize, n: usize) -> (u64, u64, u64) {
        let c = &self.cfg;
        (
            wk.ckx.at(l * n * c.n_embd * 4),
            wk.cko.at(l * n * c.q_dim() * 4),
            wk.cklse.at(l * c.n_head * n * 4),
        )
    }

    /// Runs the network over the uploaded tokens, keeping the checkpoints (as forward::forward).
    fn forward(&self, wk: &Work, n: usize) -> Result<(), BackendError> {
        let c = &self.cfg;
        let e = c.n_embd;
        // Embedding rows: a gather with the token ids as rows.
        self.launch(
            &self.f.gather,
            Self::cfg1(n * e),
            &[
                A::P(self.w.embd.ptr),
                A::P(wk.tok.ptr),
                A::I(n as i32),
                A::I(e as i32),
                A::P(wk.ckx.ptr),
            ],
        )?;
        let scale = 1.0 / (c.head_dim as f32).sqrt();
        for l in 0..c.n_layer {
            let (x, o, lse) = self.layer_ptrs(wk, l, n);
            self.attn_inputs(wk, l, x, n)?;
            self.launch(
                &self.f.attn_fwd,
                self.attn_cfg((n.div_ceil(TILE), c.n_head), self.smem[0]),
                &[
                    A::P(wk.q.ptr),
                    A::P(wk.k.ptr),
                    A::P(wk.v.ptr),
                    A::I(n as i32),
                    A::I(c.n_head as i32),
                    A::I(c.n_head_kv as i32),
                    A::F(scale),
                    A::P(o),
                    A::P(lse),
                ],
            )?;
            let next = wk.ckx.at((l + 1) * n * e * 4);
            self.mlp_half(wk, l, x, o, n, Some(next))?;
        }
        Ok(())
    }

    /// The mean cross-entropy of `targets` and its gradient at the final hidden state, written
    /// to `wk.dx` (as forward::loss_and_grad), in chunks of [`LOSS_ROWS`] target rows.
    fn loss(&self, wk: &Work, n: usize, targets: &[(usize, u32)]) -> Result<f64, BackendError> {
        let c = &self.cfg;
        let (e, v) = (c.n_embd, c.n_vocab);
        let lw = &self.loss_work;
        let final_x = wk.ckx.at(c.n_layer * n * e * 4);
        self.zero(wk.dx.ptr, n * e * 4)?;
        let total = targets.len();
        let mut loss = 0f64;
        let mut row_loss = vec![0f64; LOSS_ROWS];
        for chunk in targets.chunks(LOSS_ROWS) {
            let r = chunk.len();
            let pos: Vec<i32> = chunk.iter().map(|&(p, _)| p as i32).collect();
            let ids: Vec<i32> = chunk.iter().map(|&(_, t)| t as i32).collect();
            self.gpu.upload(&lw.pos, &pos)?;
            self.gpu.upload(&lw.ids, &ids)?;
            self.launch(
                &self.f.gather,
                Self::cfg1(r * e),
                &[
                    A::P(final_x),
                    A::P(lw.pos.ptr),
                    A::I(r as i32),
                    A::I(e as i32),
                    A::P(lw.xs.ptr),
                ],
            )?;
            self.rms_norm(lw.xs.ptr, self.w.out_norm.ptr, r, lw.xn.ptr)?;
            self.mm_wt(lw.xn.ptr, r, e, self.w.output(), v, lw.logits.ptr, false)?;
            self.launch(
                &self.f.xent,
                Self::cfg_rows(r),
                &[
                    A::P(lw.logits.ptr),
                    A::I(v as i32),
                    A::P(lw.ids.ptr),
                    A::I(total as i32),
                    A::P(lw.loss.ptr),
                ],
            )?;
            self.mm_w(lw.logits.ptr, r, v, self.w.output(), e, lw.dxn.ptr, false)?;
            self.zero(lw.dxs.ptr, r * e * 4)?;
            self.rms_norm_bwd(lw.xs.ptr, self.w.out_norm.ptr, lw.dxn.ptr, r, lw.dxs.ptr)?;
            self.launch(
                &self.f.scatter_add,
                Self::cfg1(r * e),
                &[
                    A::P(lw.dxs.ptr),
                    A::P(lw.pos.ptr),
                    A::I(r as i32),
                    A::I(e as i32),
                    A::P(wk.dx.ptr),
                ],
            )?;
            self.gpu.download(&mut row_loss[..r], &lw.loss)?;
            loss += row_loss[..r].iter().sum::<f64>();
        }
        Ok(loss / total as f64)
    }

    /// Backpropagates `wk.dx` through every layer (as backward::backward), leaving each layer's
    /// influence in `wk.infl`.
    fn backward(
        &self,
        wk: &Work,
        n: usize,
        mut capture: Option<&mut Captured>,
    ) -> Result<(), BackendError> {
        let c = &self.cfg;
        let (e, f, qd, kvd) = (c.n_embd, c.n_ff, c.q_dim(), c.kv_dim());
        let scale = 1.0 / (c.head_dim as f32).sqrt();
        let cells = self.cells(n);
        if let Some(cap) = capture.as_deref_mut() {
            cap.d_hidden = vec![Vec::new(); c.n_layer];
            cap.d_attn_out = vec![Vec::new(); c.n_layer];
        }
        for l in (0..c.n_layer).rev() {
            let lw = &self.w.layers[l];
            let (x, o, lse) = self.layer_ptrs(wk, l, n);
            self.mlp_half(wk, l, x, o, n, None)?;
            // MLP: out = x2 + down(silu(gate) * up); hmid holds dL/d(silu(gate) * up), then
            // dL/d(gate).
            self.mm_w(wk.dx.ptr, n, e, lw.down.ptr, f, wk.hmid.ptr, false)?;
            self.launch(
                &self.f.swiglu_bwd,
                Self::cfg1(n * f),
                &[
                    A::P(wk.gate.ptr),
                    A::P(wk.up.ptr),
                    A::P(wk.hmid.ptr),
                    A::P(wk.du.ptr),
                    A::P((n * f) as u64),
                ],
            )?;
            self.mm_w(wk.hmid.ptr, n, f, lw.gate.ptr, e, wk.dxn.ptr, false)?;
            self.mm_w(wk.du.ptr, n, f, lw.up.ptr, e, wk.dxn.ptr, true)?;
            // dx becomes dL/dx2.
            self.rms_norm_bwd(wk.x2.ptr, lw.ffn_norm.ptr, wk.dxn.ptr, n, wk.dx.ptr)?;
            // Attention: x2 = x + wo(o).
            self.mm_w(wk.dx.ptr, n, e, lw.wo.ptr, qd, wk.d_o.ptr, false)?;
            self.attn_inputs(wk, l, x, n)?;
            self.launch(
                &self.f.dsum,
                Self::cfg1(n * c.n_head * 32),
                &[
                    A::P(wk.d_o.ptr),
                    A::P(o),
                    A::I(n as i32),
                    A::I(c.n_head as i32),
                    A::I(c.head_dim as i32),
                    A::P(wk.dsum.ptr),
                ],
            )?;
            let infl_l = wk.infl.at(l * c.n_head * cells * 4);
            self.launch(
                &self.f.attn_bwd_q,
                self.attn_cfg((n.div_ceil(TILE), c.n_head), self.smem[1]),
                &[
                    A::P(wk.q.ptr),
                    A::P(wk.k.ptr),
                    A::P(wk.v.ptr),
                    A::P(wk.d_o.ptr),
                    A::P(lse),
                    A::P(wk.dsum.ptr),
                    A::I(n as i32),
                    A::I(c.n_head as i32),
                    A::I(c.n_head_kv as i32),
                    A::F(scale),
                    A::I(self.fine as i32),
                    A::P(cells as u64),
                    A::P(wk.dq.ptr),
                    A::P(infl_l),
                ],
            )?;
            self.launch(
                &self.f.attn_bwd_kv,
                self.attn_cfg((n.div_ceil(TILE), c.n_head_kv), self.smem[2]),
                &[
                    A::P(wk.q.ptr),
                    A::P(wk.k.ptr),
                    A::P(wk.v.ptr),
                    A::P(wk.d_o.ptr),
                    A::P(lse),
                    A::P(wk.dsum.ptr),
                    A::I(n as i32),
                    A::I(c.n_head as i32),
                    A::I(c.n_head_kv as i32),
                    A::F(scale),
                    A::P(wk.dk.ptr),
                    A::P(wk.dv.ptr),
                ],
            )?;
            self.rope(wk.dq.ptr, n, c.n_head, wk.cs.ptr, true)?;
            self.rope(wk.dk.ptr, n, c.n_head_kv, wk.cs.ptr, true)?;
            self.mm_w(wk.dq.ptr, n, qd, lw.wq.ptr, e, wk.dxn.ptr, false)?;
            self.mm_w(wk.dk.ptr, n, kvd, lw.wk.ptr, e, wk.dxn.ptr, true)?;
            self.mm_w(wk.dv.ptr, n, kvd, lw.wv.ptr, e, wk.dxn.ptr, true)?;
            // dx becomes dL/d(layer input).
            self.rms_norm_bwd(x, lw.attn_norm.ptr, wk.dxn.ptr, n, wk.dx.ptr)?;
            if let Some(cap) = capture.as_deref_mut() {
                let mut dh = vec![0f32; n * e];
                self.gpu.download(&mut dh, &wk.dx)?;
                let mut dob = vec![0f32; n * qd];
                self.gpu.download(&mut dob, &wk.d_o)?;
                cap.d_hidden[l] = dh;
                cap.d_attn_out[l] = dob;
            }
        }
        Ok(())
    }

    /// Adds the device's per-head fine-block sums into per-KV-group profile blocks.
    fn collect_influence(
        &self,
        wk: &Work,
        n: usize,
        length: usize,
    ) -> Result<SampleInfluence, BackendError> {
        let c = &self.cfg;
        let cells = self.cells(n);
        let nf = n.div_ceil(self.fine);
        let mut host = vec![0f32; c.n_layer * c.n_head * cells];
        self.gpu.download(&mut host, &wk.infl)?;
        let mut infl = SampleInfluence::new(c.n_layer, c.n_head_kv, length.div_ceil(self.block));
        let gs = c.n_head / c.n_head_kv;
        let (fb, b) = (self.fine, self.block);
        for l in 0..c.n_layer {
            for h in 0..c.n_head {
                let src = &host[(l * c.n_head + h) * cells..(l * c.n_head + h + 1) * cells];
                let dst = &mut infl.sums[l][h / gs];
                for fq in 0..nf {
                    let base = fq * (fq + 1) / 2;
                    for fk in 0..=fq {
                        dst[packed_index(fq * fb / b, fk * fb / b)] += src[base + fk] as f64;
                    }
                }
            }
        }
        Ok(infl)
    }

    fn run_sample(
        &self,
        tokens: &[u32],
        targets: &[(usize, u32)],
        length: usize,
        capture: Option<&mut Captured>,
    ) -> Result<SampleOutput, BackendError> {
        let c = &self.cfg;
        let n = tokens.len();
        // Kernels index rows with 32-bit ints (the loss rows are chunked, so the vocabulary
        // does not count here).
        let widest = c.n_ff.max(c.n_embd).max(c.q_dim()).max(32 * c.n_head);
        if n.checked_mul(widest).is_none_or(|v| v > i32::MAX as usize) {
            return Err(BackendError::Device(format!(
                "{n} tokens are too many for the GPU profiler's 32-bit sizes"
            )));
        }
        self.gpu
            .ctx
            .bind_to_thread()
            .map_err(|e| driver_err("binding the context", e))?;
        let mut guard = self
            .work
            .lock()
            .map_err(|_| BackendError::Device("the profiler's buffers were poisoned".into()))?;
        if guard.as_ref().is_none_or(|w| w.cap < n) {
            // Free the old buffers first.
            *guard = None;
            *guard = Some(self.alloc_work(n.next_multiple_of(512))?);
        }
        let Some(wk) = guard.as_ref() else {
            return Err(BackendError::Device("no profiler buffers".into()));
        };
        let tok: Vec<i32> = tokens.iter().map(|&t| t as i32).collect();
        self.gpu.upload(&wk.tok, &tok)?;
        let rope = RopeTable::new(&c.rope, n);
        let mut cs = Vec::with_capacity(n * self.half_rot * 2);
        for row in rope.cs.chunks(rope.pairs.max(1)).take(n) {
            for &(co, si) in &row[..self.half_rot.min(row.len())] {
                cs.push(co);
                cs.push(si);
            }
        }
        if self.half_rot > 0 {
            self.gpu.upload(&wk.cs, &cs)?;
        }
        self.forward(wk, n)?;
        let loss = self.loss(wk, n, targets)?;
        self.backward(wk, n, capture)?;
        let influence = self.collect_influence(wk, n, length)?;
        Ok(SampleOutput { loss, influence })
    }
}

struct SampleOutput {
    loss: f64,
    influence: SampleInfluence,
}

impl SampleProfiler for CudaProfiler {
    fn block(&self) -> usize {
        self.block
    }

    fn profile_sample(
        &self,
        tokens: &[u32],
        response: &[Range<usize>],
        length: usize,
        capture: Option<&mut Captured>,
    ) -> Result<SampleResult, SampleError> {
        let targets = sample_targets(&self.cfg, tokens, response, length)?;
        let r = self
            .run_sample(tokens, &targets, length, capture)
            .map_err(|e| SampleError::Device(e.to_string()))?;
        Ok(SampleResult {
            loss: r.loss,
            n_targets: targets.len(),
            influence: r.influence,
        })
    }

    fn describe(&self) -> String {
        format!(
            "GPU {} (compute {}.{}), {} of f32 weights",
            self.gpu.name,
            self.gpu.cc.0,
            self.gpu.cc.1,
            gib(self.weight_bytes)
        )
    }
}
