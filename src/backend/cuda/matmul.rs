//! Matrix products with quantized weights on the GPU.
//!
//! - Up to [`MV_MAXT`] tokens (decode): `mmvq_<type>` with the activations quantized once to
//!   q8_1 (reused by every matrix that reads the same activation), or `mv_<type>` with f32
//!   activations for float weights. One warp per weight row; the weights are read once for all
//!   tokens. One token takes `mmvs_<type>` where the rows allow: tiles of whole rows streamed
//!   into shared memory first (see [`DecodePath::Stream`]); 2..16 tokens the tensor-core `mmqs`.
//! - More tokens (prefill): the weight is dequantized in row chunks to an f16 scratch tile
//!   (bounded, so no dequantized copy of any matrix is kept) and multiplied with cuBLAS
//!   (f16 x f16, f32 accumulation and output).
//!
//! [`MatmulHarness`] runs one product on fresh data (kernel tests) and times the decode kernels
//! on large shapes (bandwidth report of `moa-bench kernels`).

use std::sync::Arc;
use std::time::Instant;

use cudarc::cublas::{result as blas, sys as blas_sys, CudaBlas};
use cudarc::driver::CudaFunction;
use ggml_compat::GgmlType;

use super::device::{blocks, cfg_1d, lcfg, DevBuf, Gpu, A};
use super::kernels::Kernels;
use crate::backend::BackendError;

/// Most tokens the matrix-vector kernels take (`MV_MAXT` in quant.cu).
pub const MV_MAXT: usize = 16;
/// Token-count variants of each quantized matrix-vector kernel: `mmvq_<type>_<nt>` takes up to
/// `nt` tokens (one token, the batch-1 decode step, has its own).
const MV_VARIANTS: [usize; 3] = [1, 8, 16];
/// Halves of the f16 weight scratch used by prefill products (64 MiB).
pub const DQ_SCRATCH_HALVES: usize = 32 << 20;

/// Kernel-name suffix of a weight type, if the GPU supports it.
pub fn type_suffix(ty: GgmlType) -> Option<&'static str> {
    Some(match ty {
        GgmlType::F32 => "f32",
        GgmlType::F16 => "f16",
        GgmlType::BF16 => "bf16",
        GgmlType::Q4_0 => "q4_0",
        GgmlType::Q4_1 => "q4_1",
        GgmlType::Q5_0 => "q5_0",
        GgmlType::Q5_1 => "q5_1",
        GgmlType::Q8_0 => "q8_0",
        GgmlType::Q4_K => "q4_k",
        GgmlType::Q5_K => "q5_k",
        GgmlType::Q6_K => "q6_k",
        _ => return None,
    })
}

/// Weight types the GPU kernels support.
pub const GPU_TYPES: &[GgmlType] = &[
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
];

pub fn is_float(ty: GgmlType) -> bool {
    matches!(ty, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16)
}

/// Work units per row of the mmvq kernels: blocks of 32, or pairs of 32 (64 values) for the
/// 256-value K-quant super-blocks.
pub(crate) fn units_per_row(ty: GgmlType, cols: usize) -> usize {
    match ty {
        GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K => cols / 64,
        _ => cols / 32,
    }
}

/// Work units per row of the tensor-core small-batch kernels (`Frag<T>` in quant.cu): blocks of
/// 32, super-blocks (256 values) for Q4_K/Q5_K, super-block halves (128) for Q6_K.
fn mmqs_units_per_row(ty: GgmlType, cols: usize) -> usize {
    match ty {
        GgmlType::Q4_K | GgmlType::Q5_K => cols / 256,
        GgmlType::Q6_K => cols / 128,
        _ => cols / 32,
    }
}

/// Column family of a type's tensor-core fragments (`Frag<T>::load` / `FragI<T>::load` in
/// quant.cu: family 0 = columns 4c.., 16+4c.. of a 32-value block per lane, family 1 = columns
/// 8c..8c+7), which the activations' mma layout must follow.
fn mma_family(ty: GgmlType) -> i32 {
    matches!(ty, GgmlType::Q4_K | GgmlType::Q5_K) as i32
}

/// Whether the tensor-core kernels of a type take q8_K activations (one scale per 256 values,
/// `q8k_mma_layout` from the f32 input) instead of q8_1 ones: the K-quants, whose block scales
/// are then applied to the integer dots as integers (quant.cu: `mmqk_units`).
fn mma_q8k(ty: GgmlType) -> bool {
    matches!(ty, GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K)
}

/// Weight rows per block of the tensor-core small-batch kernels (`mmqs`).
const MQ_ROWS: usize = 16;
/// Threads per block of `mmqs` (MQ_WARPS warps).
const MQ_THREADS: u32 = 256;
/// Warps per block of `mmvq` and `mmvs` (MV_WARPS).
const MV_WARPS: usize = 4;
/// Default bytes of weight rows per `mmvs` block (`MOA_MV_TILE`). Measured on an H100 (one
/// token, % of copy bandwidth on 14336x4096 / 4096x14336 / 128256x4096): Q6_K 67 / 61 / 82 with
/// 8 KiB tiles, 64 / 61 / 79 with 16 KiB, 51-76 with 32 KiB (dp4a: 53 / 53 / 58).
pub const MV_TILE: usize = 8 << 10;
/// Most shared memory an `mmvs` block may take (its tile).
const MV_TILE_MAX: usize = 96 << 10;
/// Most rows per `mmvs` tile.
const MV_TILE_ROWS: usize = 16;

/// Which decode kernel runs a product of `n` tokens, and how (see [`DecodeKernels::choose`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodePath {
    /// `mmvq` with `wpr` warps per weight row.
    Dp4a { wpr: usize },
    /// `mmqs`: int8 tensor-core MMAs, 16 rows per block.
    Mma,
    /// `mmvs` (one token): each block copies a tile of `rows` whole weight rows into shared
    /// memory with 16-byte asynchronous copies, all in flight at once, then one warp per row
    /// computes from there. Needs 16-byte aligned rows (else the dp4a kernel runs).
    Stream { rows: usize },
}

/// Decode-kernel choices, from the environment once (for measuring the alternatives):
/// `MOA_MV_WPR` (1, 2 or 4: warps per row of the dp4a kernels, which then also take every
/// one-token product; default 1) and `MOA_MMQS_MIN` (fewest tokens that take the tensor-core
/// kernels; default 2, 0 = never) and `MOA_QPREFILL_MAX` (batches of quantized weights up to
/// this many tokens also take the decode kernels, 16 tokens at a time, default
/// [`QUANT_PREFILL_MAX`]) and `MOA_MV_TILE` (bytes of weight rows per block of the streamed
/// one-token kernel, default [`MV_TILE`] for the types of [`streams`]; set, every quantized
/// type streams with that tile; 0 = never stream), `MOA_WIDE_WPR` (1, 2 or 4: warps per row of
/// the dp4a kernel on one-token Q4_K/Q5_K down projections, default [`WIDE_WPR`]; 0 = the
/// tensor cores there) and `MOA_MQS1=0` (9-16 token K-quant products through `mmqs`, not
/// `mmqs1`).
#[derive(Clone, Copy, Debug)]
pub struct DecodeKernels {
    wpr: Option<usize>,
    mma_min: usize,
    pub quant_prefill_max: usize,
    /// Target tile bytes of `mmvs` (0: off).
    stream_tile: usize,
    /// Stream every quantized type; else only those measured faster streamed ([`streams`]).
    stream_all: bool,
    /// Warps per row of the dp4a kernel on wide Q4_K/Q5_K matrices with few rows (the down
    /// projection) at one token; 0: the tensor-core kernel there (`MOA_WIDE_WPR`).
    wide_wpr: usize,
    /// 9-16 token K-quant products through `mmqs1` (one unit per warp in flight, three blocks
    /// per multiprocessor) on rows up to [`MQS1_MAX_COLS`] wide, instead of `mmqs`
    /// (`MOA_MQS1=0`: never).
    one_unit: bool,
}

/// Types whose one-token products stream by default: Q6_K (the output matrix of Q4_K_M files;
/// tg128 of the 8B shape on an H100: Q4_K through the dp4a / tensor-core kernels 351.5 t/s,
/// streamed 349.2, so Q4_K keeps them; Q6_K's 210-byte blocks only allow 2-byte loads from
/// global memory, which streaming avoids: 74 vs 101 us on the 49152-row output).
fn streams(ty: GgmlType) -> bool {
    ty == GgmlType::Q6_K
}

/// Widest rows the 9-16 token K-quant products take `mmqs1` for (one unit per warp in flight,
/// three blocks per multiprocessor); wider ones keep `mmqs` (two units per warp in flight).
/// Nsight Compute on an H100, 16 tokens, 8B shape, `mmqs1` vs `mmqs`: q/k/v 14.7 vs 17.4 us,
/// gate/up 42.3 vs 44.9, output projection 10.4 vs 10.2, and the 14336-wide down projection
/// 24.9 vs 23.4 (each warp there loops over 7 units, one load round trip per unit); the Q6_K
/// output matrix (49152 x 4096) 113 vs 122 us.
pub const MQS1_MAX_COLS: usize = 4096;

/// Warps per row of the one-token dp4a kernel on the wide, short Q4_K/Q5_K matrices (the down
/// projection) by default. tg128 of the 8B shape on an H100, same calls (thirteenth session):
/// 395.1, 395.7, 396.2, 395.7, 395.7 t/s with 4 against 384.1-389.5 (six runs) on the
/// tensor-core kernel, 385.3 and 386.0 with 2; @ d32768 uniform 0.5 302.5 vs 300.0. (Measured
/// slower before the one-token kernel came down from 80 to 56 registers: sixth session 352.7
/// vs 360.9 with 2, eleventh 359.1 vs 367.8 with 4.)
pub const WIDE_WPR: usize = 4;

/// Batches of quantized weights up to this many tokens run through the decode kernels on
/// q8_1 activations, 16 tokens per launch, rather than through f16 tiles and cuBLAS: short
/// prompts then see the same integer dot products as the CPU backend (and llama.cpp), which
/// quantize activations at every batch size; longer prompts take cuBLAS, which reads the
/// weights once for the whole batch.
pub const QUANT_PREFILL_MAX: usize = 64;

impl DecodeKernels {
    /// Always the dp4a kernels, with `wpr` warps per row (None: 1).
    pub fn dp4a(wpr: Option<usize>) -> DecodeKernels {
        DecodeKernels {
            wpr,
            mma_min: 0,
            quant_prefill_max: QUANT_PREFILL_MAX,
            stream_tile: 0,
            stream_all: false,
            wide_wpr: 0,
            one_unit: true,
        }
    }

    /// One token always through the streamed kernel with tiles of about `tile` bytes (several
    /// tokens: the tensor-core kernels).
    pub fn stream(tile: usize) -> DecodeKernels {
        DecodeKernels {
            wpr: None,
            mma_min: 2,
            quant_prefill_max: QUANT_PREFILL_MAX,
            stream_tile: tile,
            stream_all: true,
            wide_wpr: 0,
            one_unit: true,
        }
    }

    /// The tensor-core kernels from `min` tokens on (1: always).
    pub fn mma_from(min: usize) -> DecodeKernels {
        DecodeKernels {
            wpr: None,
            mma_min: min,
            quant_prefill_max: QUANT_PREFILL_MAX,
            stream_tile: 0,
            stream_all: false,
            wide_wpr: 0,
            one_unit: true,
        }
    }

    pub fn from_env() -> DecodeKernels {
        let var = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<usize>().ok());
        let (wpr_var, tile) = (var("MOA_MV_WPR"), var("MOA_MV_TILE"));
        DecodeKernels {
            wpr: wpr_var.filter(|w| [1, 2, 4].contains(w)),
            mma_min: var("MOA_MMQS_MIN").unwrap_or(2),
            quant_prefill_max: var("MOA_QPREFILL_MAX").unwrap_or(QUANT_PREFILL_MAX),
            // A warps-per-row override measures the dp4a kernels: no streaming then.
            stream_tile: tile.unwrap_or(if wpr_var.is_some() { 0 } else { MV_TILE }),
            // An explicit tile size streams every type.
            stream_all: tile.is_some(),
            wide_wpr: var("MOA_WIDE_WPR")
                .filter(|w| [0, 1, 2, 4].contains(w))
                .unwrap_or(WIDE_WPR),
            one_unit: var("MOA_MQS1") != Some(0),
        }
    }

    /// Rows per tile of the streamed one-token kernel for rows of `row_bytes` bytes, or None
    /// when it does not apply (turned off, rows not a multiple of 16 bytes, a row larger than
    /// the most shared memory a block may take).
    pub fn stream_rows(&self, row_bytes: usize) -> Option<usize> {
        if self.stream_tile == 0 || !row_bytes.is_multiple_of(16) || row_bytes > MV_TILE_MAX {
            return None;
        }
        Some(
            (self.stream_tile / row_bytes)
                .clamp(1, MV_TILE_ROWS)
                .min(MV_TILE_MAX / row_bytes),
        )
    }

    /// The kernel for `n` tokens over a `rows x cols` matrix of type `ty` on a GPU with `sms`
    /// multiprocessors: the tensor-core kernels from `mma_min` tokens on, and for one token
    /// on wide matrices with few rows (Q4_K/Q5_K); else the dp4a kernels.
    pub fn choose(
        &self,
        ty: GgmlType,
        n: usize,
        cols: usize,
        rows: usize,
        sms: usize,
    ) -> DecodePath {
        if self.mma_min > 0 && n >= self.mma_min {
            return DecodePath::Mma;
        }
        if n == 1 && (self.stream_all || streams(ty)) {
            let row_bytes = ty.bytes_for(cols as u64).unwrap_or(1) as usize;
            if let Some(rows) = self.stream_rows(row_bytes) {
                return DecodePath::Stream { rows };
            }
        }
        // One token, measured on an H100 (matvec_bandwidth_report, % of copy bandwidth, with
        // the K-quant scales in registers): the dp4a kernel with one warp per row wins on Q4_K's
        // 14336 x 4096 (75 vs 64 for the tensor-core kernel) and 128256 x 4096 (80 vs 70). On
        // the wide, short 4096 x 14336 down projection dp4a with four warps per row is the
        // default ([`WIDE_WPR`]); `MOA_WIDE_WPR=0` takes the tensor-core kernel there.
        // Splitting rows over more warps never beats one warp elsewhere (Q4_1 90 vs 103 on the
        // down projection).
        let wide_short = cols >= 8192 && rows < sms * 64;
        if self.wpr.is_none()
            && self.mma_min > 0
            && wide_short
            && matches!(ty, GgmlType::Q4_K | GgmlType::Q5_K)
        {
            if self.wide_wpr > 0 {
                return DecodePath::Dp4a { wpr: self.wide_wpr };
            }
            return DecodePath::Mma;
        }
        let wpr = self.wpr.unwrap_or(1);
        DecodePath::Dp4a { wpr }
    }
}

/// A weight matrix on the device (a pointer into an uploaded tensor) and its kernels.
pub struct GpuMatrix {
    pub ptr: u64,
    pub ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
    pub row_bytes: usize,
    /// Matrix-vector kernels by [`MV_VARIANTS`] (float weights: one kernel, repeated).
    mv: [CudaFunction; 3],
    /// Tensor-core small-batch kernels for up to 8 and up to 16 tokens, and the streamed
    /// one-token kernel (quantized weights).
    mq: Option<[CudaFunction; 3]>,
    /// The exact-order kernel (`mvx_<type>`, legacy quantized types; see [`MatScratch::exact`]).
    mvx: Option<CudaFunction>,
    /// The K-quants' 9-16 token kernel with one unit per warp in flight (`mmqs1_<type>_16`).
    mq1: Option<CudaFunction>,
    dq: CudaFunction,
    pub decode: DecodeKernels,
}

impl GpuMatrix {
    /// The matrix-vector kernel for `n` tokens.
    fn mv_for(&self, n: usize) -> &CudaFunction {
        let i = MV_VARIANTS.iter().position(|&v| n <= v).unwrap_or(2);
        &self.mv[i]
    }
}

impl GpuMatrix {
    /// Looks up the kernels for `ty`; `None` when the GPU has none for it.
    pub fn new(
        k: &Kernels,
        ptr: u64,
        ty: GgmlType,
        rows: usize,
        cols: usize,
    ) -> Result<Option<GpuMatrix>, BackendError> {
        let Some(suffix) = type_suffix(ty) else {
            return Ok(None);
        };
        // The prefill dequantizer writes rows in pieces of 8 values.
        if !cols.is_multiple_of(ty.block_size()) || !cols.is_multiple_of(8) {
            return Ok(None);
        }
        let (mv, mq) = if is_float(ty) {
            let f = k.get(&format!("mv_{suffix}"))?;
            ([f.clone(), f.clone(), f], None)
        } else {
            let f = |nt: usize| k.get(&format!("mmvq_{suffix}_{nt}"));
            let g = |nt: usize| k.get(&format!("mmqs_{suffix}_{nt}"));
            let st = k.get(&format!("mmvs_{suffix}"))?;
            st.set_attribute(
                cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                MV_TILE_MAX as i32,
            )
            .map_err(|e| super::device::driver_err(&format!("shared memory size of mmvs_{suffix}"), e))?;
            (
                [f(MV_VARIANTS[0])?, f(MV_VARIANTS[1])?, f(MV_VARIANTS[2])?],
                Some([g(8)?, g(16)?, st]),
            )
        };
        let legacy = matches!(
            ty,
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q8_0
        );
        let mvx = if legacy {
            Some(k.get(&format!("mvx_{suffix}"))?)
        } else {
            None
        };
        let mq1 = if mma_q8k(ty) {
            Some(k.get(&format!("mmqs1_{suffix}_16"))?)
        } else {
            None
        };
        let dq = k.get(&format!("dequant_f16_{suffix}"))?;
        let row_bytes = ty.bytes_for(cols as u64).expect("validated shape") as usize;
        Ok(Some(GpuMatrix {
            ptr,
            ty,
            rows,
            cols,
            row_bytes,
            mv,
            mq,
            mvx,
            mq1,
            dq,
            decode: DecodeKernels::from_env(),
        }))
    }
}

/// One product: `n` input rows of `ldx` floats at `x`, output rows of `ldo` floats at `out`.
#[derive(Clone, Copy)]
pub struct MatArgs {
    pub x: u64,
    pub ldx: usize,
    pub n: usize,
    pub out: u64,
    pub ldo: usize,
}

/// Buffers the products share: q8_1 activations (and which input they hold), f16 activations
/// and the f16 weight tile.
pub struct MatScratch {
    yq: DevBuf,
    yds: DevBuf,
    /// The q8_1 activations in the tensor-core kernels' fragment order (16 token slots), and
    /// which input, version and layout family they hold.
    yq_m: DevBuf,
    yds_m: DevBuf,
    mkey: Option<(u64, u64, i32)>,
    x16: DevBuf,
    wdq: DevBuf,
    qkey: Option<(u64, u64)>,
    /// The backend's exact mode (`MOA_EXACT=1` at creation, or
    /// `CudaBackend::set_exact_attention`): decode-sized products of the legacy quantized types
    /// sum in the CPU backend's order (`mvx_<type>`), and attention runs the exact kernel
    /// (`cuda/attention_exact.cu`, f16 K/V caches), so both backends give the same bits.
    pub exact: bool,
}

impl MatScratch {
    /// Scratch for inputs of up to `max_batch` rows of `max_cols`, weights of up to
    /// `max_mat` values.
    pub fn new(
        gpu: &Gpu,
        max_batch: usize,
        max_cols: usize,
        max_mat: usize,
    ) -> Result<MatScratch, BackendError> {
        let prefill = max_batch > MV_MAXT;
        let mv_rows = max_batch.min(MV_MAXT);
        let mma_rows = MV_MAXT;
        Ok(MatScratch {
            yq: gpu.alloc(mv_rows * max_cols, "quantized activations")?,
            yds: gpu.alloc(mv_rows * max_cols / 32 * 8, "activation scales")?,
            yq_m: gpu.alloc(mma_rows * max_cols, "quantized activations (mma layout)")?,
            yds_m: gpu.alloc(
                mma_rows * max_cols / 32 * 8,
                "activation scales (mma layout)",
            )?,
            mkey: None,
            x16: gpu.alloc(
                if prefill { max_batch * max_cols * 2 } else { 0 },
                "f16 activations",
            )?,
            wdq: gpu.alloc(
                if prefill {
                    max_mat.min(DQ_SCRATCH_HALVES.max(max_cols)) * 2
                } else {
                    0
                },
                "f16 weight tile",
            )?,
            qkey: None,
            exact: false,
        })
    }

    pub fn bytes(&self) -> usize {
        self.yq.bytes
            + self.yds.bytes
            + self.yq_m.bytes
            + self.yds_m.bytes
            + self.x16.bytes
            + self.wdq.bytes
    }

    /// Forgets which activation the q8_1 buffer holds.
    pub fn invalidate(&mut self) {
        self.qkey = None;
        self.mkey = None;
    }

    /// Device pointers of the q8_1 values and scales (for kernels that quantize as they write).
    pub fn q8_ptrs(&self) -> (u64, u64) {
        (self.yq.ptr, self.yds.ptr)
    }

    /// Records that a fused kernel left input `x` at `version` in the q8_1 buffer.
    pub fn mark_quantized(&mut self, x: u64, version: u64) {
        self.qkey = Some((x, version));
    }

    /// Whether the q8_1 buffer holds input `x` at `version`.
    pub fn holds_q8(&self, x: u64, version: u64) -> bool {
        self.qkey == Some((x, version))
    }

    /// Device pointers of the mma-layout activations and their scales (for kernels that write
    /// the q8_K layout as they produce their output: `swiglu_q8k`).
    pub fn mma_ptrs(&self) -> (u64, u64) {
        (self.yq_m.ptr, self.yds_m.ptr)
    }

    /// Records that a fused kernel left input `x` at `version` in the mma buffers as q8_K of
    /// layout family `fam` (see [`q8k_family`]).
    pub fn mark_q8k(&mut self, x: u64, version: u64, fam: i32) {
        self.mkey = Some((x, version, fam + 2));
    }

    /// Whether a q8_1 copy of rows of `cols` values fits (decode-sized batches).
    pub fn can_hold_q8(&self, n: usize, cols: usize) -> bool {
        n * cols <= self.yq.bytes
    }
}

/// `out[t] = W x[t]`. `x_version` identifies the input's contents so the q8_1 quantization is
/// shared by consecutive products of the same input.
pub fn matmul(
    gpu: &Gpu,
    k: &Kernels,
    blas_h: &CudaBlas,
    s: &mut MatScratch,
    m: &GpuMatrix,
    a: MatArgs,
    x_version: u64,
) -> Result<(), BackendError> {
    if a.n <= MV_MAXT {
        let grid = (blocks(m.rows, 4), 1, 1);
        if is_float(m.ty) {
            return gpu.launch(
                m.mv_for(a.n),
                lcfg(grid, 128),
                &[
                    A::P(m.ptr),
                    A::P(m.row_bytes as u64),
                    A::P(a.x),
                    A::I(a.ldx as i32),
                    A::I(m.cols as i32),
                    A::I(a.n as i32),
                    A::P(a.out),
                    A::I(a.ldo as i32),
                    A::I(m.rows as i32),
                ],
            );
        }
        let t = [(m, a.out, a.ldo)];
        prepare_q8_1(gpu, k, s, &t, a.x, a.ldx, a.n, x_version)?;
        return launch_mmvq(gpu, k, s, &t, a.n, (a.x, x_version, a.ldx));
    }
    if a.n <= m.decode.quant_prefill_max && !is_float(m.ty) {
        // A short prompt: decode-sized chunks (matmul_multi owns the chunking).
        let target = [(m, a.out, a.ldo)];
        return matmul_multi(gpu, k, blas_h, s, &target, a.x, a.ldx, a.n, x_version);
    }
    assert_eq!(a.ldx, m.cols, "prefill inputs are dense rows");
    let nx = a.n * m.cols;
    assert!(
        nx * 2 <= s.x16.bytes,
        "batch larger than the scratch was sized for"
    );
    gpu.launch(
        &k.to_f16,
        cfg_1d(nx),
        &[A::P(a.x), A::P(s.x16.ptr), A::I(nx as i32)],
    )?;
    let chunk = (s.wdq.bytes / 2 / m.cols).clamp(1, m.rows);
    let mut r0 = 0;
    while r0 < m.rows {
        let rc = chunk.min(m.rows - r0);
        let pieces = rc * m.cols / 8;
        gpu.launch(
            &m.dq,
            lcfg((blocks(pieces, 256), 1, 1), 256),
            &[
                A::P(m.ptr + (r0 * m.row_bytes) as u64),
                A::P(m.row_bytes as u64),
                A::I(m.cols as i32),
                A::I(rc as i32),
                A::P(s.wdq.ptr),
            ],
        )?;
        let (alpha, beta) = (1.0f32, 0.0f32);
        let timed = super::timer::enabled().then(|| super::timer::start(&gpu.stream));
        // Column-major view: C (rc x n, ldc = ldo) = Wtile^T (rc x K) * X (K x n).
        // SAFETY: the pointers cover rc x K halves, n x K halves and n rows of ldo floats.
        unsafe {
            blas::gemm_ex(
                *blas_h.handle(),
                blas_sys::cublasOperation_t::CUBLAS_OP_T,
                blas_sys::cublasOperation_t::CUBLAS_OP_N,
                rc as i32,
                a.n as i32,
                m.cols as i32,
                &alpha as *const f32 as *const _,
                s.wdq.ptr as *const _,
                blas_sys::cudaDataType_t::CUDA_R_16F,
                m.cols as i32,
                s.x16.ptr as *const _,
                blas_sys::cudaDataType_t::CUDA_R_16F,
                m.cols as i32,
                &beta as *const f32 as *const _,
                (a.out + (r0 * 4) as u64) as *mut _,
                blas_sys::cudaDataType_t::CUDA_R_32F,
                a.ldo as i32,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT_TENSOR_OP,
            )
        }
        .map_err(|e| BackendError::Device(format!("cuBLAS gemm: {e:?}")))?;
        if let Some(Some(start)) = timed {
            super::timer::stop_as(&gpu.stream, "cublas_gemm_ex (prefill)", start);
        }
        r0 += rc;
    }
    Ok(())
}

/// The decode path of one fused launch over `t` (`(matrix, out, ldo)`, one type and width) for
/// `n` tokens on a GPU with `sms` multiprocessors.
fn decode_path(t: &[(&GpuMatrix, u64, usize)], n: usize, sms: usize) -> DecodePath {
    let m = t[0].0;
    let rows = t.iter().map(|x| x.0.rows).sum();
    match &m.mq {
        Some(_) => m.decode.choose(m.ty, n, m.cols, rows, sms),
        None => DecodePath::Dp4a { wpr: 1 },
    }
}

/// The mma layout family when a decode product of `n` tokens over matrix `m` takes the K-quant
/// tensor-core path (q8_K activations, written from the f32 input by `q8k_mma_layout` or by a
/// fused producer: `swiglu_q8k`); None when it reads q8_1.
pub fn q8k_family(m: &GpuMatrix, n: usize, sms: usize) -> Option<i32> {
    let path = decode_path(&[(m, 0, 0)], n, sms);
    (path == DecodePath::Mma && mma_q8k(m.ty)).then(|| mma_family(m.ty))
}

/// Quantizes input `x` (rows of `ldx` floats, `n` tokens) to q8_1 for the products over `t`,
/// unless the scratch holds it already or they take the K-quant tensor-core path, which reads
/// the f32 input instead.
#[allow(clippy::too_many_arguments)]
fn prepare_q8_1(
    gpu: &Gpu,
    k: &Kernels,
    s: &mut MatScratch,
    t: &[(&GpuMatrix, u64, usize)],
    x: u64,
    ldx: usize,
    n: usize,
    x_version: u64,
) -> Result<(), BackendError> {
    let m = t[0].0;
    let key = (x, x_version);
    let q8k = decode_path(t, n, gpu.sms) == DecodePath::Mma && mma_q8k(m.ty);
    if s.qkey == Some(key) || q8k {
        return Ok(());
    }
    let nb = n * m.cols / 32;
    gpu.launch_pdl(
        &k.quantize_q8_1,
        lcfg((blocks(nb, 8), 1, 1), 256),
        &[
            A::P(x),
            A::I(ldx as i32),
            A::I(m.cols as i32),
            A::I(n as i32),
            A::P(s.yq.ptr),
            A::P(s.yds.ptr),
        ],
    )?;
    s.qkey = Some(key);
    Ok(())
}

/// One fused decode launch over up to three matrices of one type and width, for input
/// `(x, version, ldx)`: its q8_1 copy is in the scratch, except on the K-quant tensor-core path
/// (the q8_K layout comes from the f32 input, or is there already from a fused producer).
fn launch_mmvq(
    gpu: &Gpu,
    k: &Kernels,
    s: &mut MatScratch,
    t: &[(&GpuMatrix, u64, usize)],
    n: usize,
    input: (u64, u64, usize),
) -> Result<(), BackendError> {
    let m = t[0].0;
    let get = |i: usize| {
        t.get(i)
            .map_or((0u64, 0usize, 0u64, 0usize), |&(mm, o, l)| {
                (mm.ptr, mm.rows, o, l)
            })
    };
    let (w0, r0, o0, l0) = get(0);
    let (w1, r1, o1, l1) = get(1);
    let (w2, r2, o2, l2) = get(2);
    let rows = r0 + r1 + r2;
    let mut args = vec![
        A::P(w0),
        A::P(w1),
        A::P(w2),
        A::I(r0 as i32),
        A::I(r1 as i32),
        A::I(r2 as i32),
        A::P(o0),
        A::P(o1),
        A::P(o2),
        A::I(l0 as i32),
        A::I(l1 as i32),
        A::I(l2 as i32),
        A::P(m.row_bytes as u64),
    ];
    let units = units_per_row(m.ty, m.cols);
    if let (true, Some(f)) = (s.exact, &m.mvx) {
        // Eight threads per row, 16 rows per block.
        args.extend([
            A::I(units as i32),
            A::P(s.yq.ptr),
            A::P(s.yds.ptr),
            A::I(m.cols as i32),
            A::I(n as i32),
            A::I(1),
        ]);
        return gpu.launch_pdl(
            f,
            lcfg((blocks(rows, MV_WARPS * 4), 1, 1), (MV_WARPS * 32) as u32),
            &args,
        );
    }
    let mut path = decode_path(t, n, gpu.sms);
    if matches!(path, DecodePath::Stream { .. }) && t.iter().any(|&(mm, _, _)| mm.ptr % 16 != 0) {
        // Rows that do not start 16-byte aligned cannot be copied in 16-byte pieces.
        let mut d = m.decode;
        d.stream_tile = 0;
        path = d.choose(m.ty, n, m.cols, rows, gpu.sms);
    }
    match (&m.mq, path) {
        (Some(mq), DecodePath::Mma) => {
            let fam = mma_family(m.ty);
            let q8k = mma_q8k(m.ty);
            let (x, version, ldx) = input;
            let key = Some((x, version, fam + 2 * q8k as i32));
            if s.mkey != key {
                if q8k {
                    // One warp per (super-block, token), from the f32 input.
                    gpu.launch_pdl(
                        &k.q8k_mma_layout,
                        lcfg((blocks(m.cols / 256 * n, 8), 1, 1), 256),
                        &[
                            A::P(x),
                            A::I(ldx as i32),
                            A::I(m.cols as i32),
                            A::I(n as i32),
                            A::I(fam),
                            A::P(s.yq_m.ptr),
                            A::P(s.yds_m.ptr),
                        ],
                    )?;
                } else {
                    let nb = m.cols / 32;
                    gpu.launch_pdl(
                        &k.q8_1_mma_layout,
                        cfg_1d(nb * 64),
                        &[
                            A::P(s.yq.ptr),
                            A::P(s.yds.ptr),
                            A::I(m.cols as i32),
                            A::I(n as i32),
                            A::P(s.yq_m.ptr),
                            A::P(s.yds_m.ptr),
                        ],
                    )?;
                }
                s.mkey = key;
            }
            args.extend([
                A::I(mmqs_units_per_row(m.ty, m.cols) as i32),
                A::P(s.yq_m.ptr),
                A::P(s.yds_m.ptr),
                A::I(m.cols as i32),
                A::I(n as i32),
            ]);
            let f = match &m.mq1 {
                _ if n <= 8 => &mq[0],
                Some(f) if m.decode.one_unit && m.cols <= MQS1_MAX_COLS => f,
                _ => &mq[1],
            };
            gpu.launch_pdl(f, lcfg((blocks(rows, MQ_ROWS), 1, 1), MQ_THREADS), &args)
        }
        (Some(mq), DecodePath::Stream { rows: tile }) => {
            args.extend([
                A::I(units as i32),
                A::P(s.yq.ptr),
                A::P(s.yds.ptr),
                A::I(tile as i32),
            ]);
            let mut c = lcfg((blocks(rows, tile), 1, 1), (MV_WARPS * 32) as u32);
            c.shared_mem_bytes = (tile * m.row_bytes) as u32;
            gpu.launch_pdl(&mq[2], c, &args)
        }
        (None, DecodePath::Mma | DecodePath::Stream { .. }) => {
            unreachable!("float weights never take the quantized kernels")
        }
        (_, DecodePath::Dp4a { wpr }) => {
            args.extend([
                A::I(units as i32),
                A::P(s.yq.ptr),
                A::P(s.yds.ptr),
                A::I(m.cols as i32),
                A::I(n as i32),
                A::I(wpr as i32),
            ]);
            gpu.launch_pdl(
                m.mv_for(n),
                lcfg((blocks(rows, MV_WARPS / wpr), 1, 1), (MV_WARPS * 32) as u32),
                &args,
            )
        }
    }
}

/// Products of one input with several matrices (`(matrix, out, ldo)` each). Decode-sized
/// batches of up to three quantized matrices of one type and width run as one launch.
#[allow(clippy::too_many_arguments)]
pub fn matmul_multi(
    gpu: &Gpu,
    k: &Kernels,
    blas_h: &CudaBlas,
    s: &mut MatScratch,
    targets: &[(&GpuMatrix, u64, usize)],
    x: u64,
    ldx: usize,
    n: usize,
    x_version: u64,
) -> Result<(), BackendError> {
    let m0 = targets[0].0;
    if n > MV_MAXT && n <= m0.decode.quant_prefill_max && !is_float(m0.ty) {
        // A short prompt: decode-sized chunks, each fused as a decode step would be.
        let mut t0 = 0;
        while t0 < n {
            let c = MV_MAXT.min(n - t0);
            let shifted: Vec<(&GpuMatrix, u64, usize)> = targets
                .iter()
                .map(|&(m, out, ldo)| (m, out + (t0 * ldo * 4) as u64, ldo))
                .collect();
            let xc = x + (t0 * ldx * 4) as u64;
            matmul_multi(gpu, k, blas_h, s, &shifted, xc, ldx, c, x_version)?;
            t0 += c;
        }
        return Ok(());
    }
    let fusable = n <= MV_MAXT
        && targets.len() <= 3
        && !is_float(m0.ty)
        && targets
            .iter()
            .all(|t| t.0.ty == m0.ty && t.0.cols == m0.cols);
    if fusable {
        prepare_q8_1(gpu, k, s, targets, x, ldx, n, x_version)?;
        return launch_mmvq(gpu, k, s, targets, n, (x, x_version, ldx));
    }
    for &(m, out, ldo) in targets {
        let a = MatArgs {
            x,
            ldx,
            n,
            out,
            ldo,
        };
        matmul(gpu, k, blas_h, s, m, a, x_version)?;
    }
    Ok(())
}

/// One product staged by [`MatmulHarness::stage`] (its buffers live as long as it does).
struct Staged {
    _w: DevBuf,
    _x: DevBuf,
    out: DevBuf,
    m: GpuMatrix,
    s: MatScratch,
    a: MatArgs,
}

/// A GPU, its kernels and cuBLAS, for running single products (tests, benchmarks).
pub struct MatmulHarness {
    pub gpu: Gpu,
    pub k: Kernels,
    blas: CudaBlas,
}

impl MatmulHarness {
    pub fn new() -> Result<MatmulHarness, BackendError> {
        let gpu = Gpu::open(0)?;
        let k = Kernels::load(&gpu.ctx, super::kernels::arch_for(gpu.cc))?;
        let blas = CudaBlas::new(Arc::clone(&gpu.stream))
            .map_err(|e| BackendError::Device(format!("cuBLAS: {e:?}")))?;
        Ok(MatmulHarness { gpu, k, blas })
    }

    /// Uploads a weight of `rows x cols` (ggml bytes `w`) and `n` input rows `x`, and makes
    /// the matrix (decode kernels chosen by `dk`), the scratch and the product's arguments.
    #[allow(clippy::too_many_arguments)]
    fn stage(
        &self,
        ty: GgmlType,
        rows: usize,
        cols: usize,
        w: &[u8],
        x: &[f32],
        n: usize,
        max_mat: usize,
        dk: DecodeKernels,
    ) -> Result<Staged, BackendError> {
        let wb = self.gpu.alloc(w.len(), "harness weight")?;
        self.gpu.upload(&wb, w)?;
        let xb = self.gpu.alloc(x.len() * 4, "harness input")?;
        self.gpu.upload(&xb, x)?;
        let ob = self.gpu.alloc(n * rows * 4, "harness output")?;
        let mut m = GpuMatrix::new(&self.k, wb.ptr, ty, rows, cols)?
            .ok_or_else(|| BackendError::Device(format!("no GPU kernel for {}", ty.name())))?;
        m.decode = dk;
        let s = MatScratch::new(&self.gpu, n, cols, max_mat)?;
        let a = MatArgs {
            x: xb.ptr,
            ldx: cols,
            n,
            out: ob.ptr,
            ldo: rows,
        };
        Ok(Staged {
            _w: wb,
            _x: xb,
            out: ob,
            m,
            s,
            a,
        })
    }

    /// `n` rows of `W x` for a weight of `rows x cols` given as ggml bytes, with the decode
    /// kernels chosen by `dk`; `exact`: in exact mode (the legacy types' products in the CPU
    /// backend's summation order, `mvx_<type>`).
    #[allow(clippy::too_many_arguments)]
    pub fn run(
        &self,
        ty: GgmlType,
        rows: usize,
        cols: usize,
        w: &[u8],
        x: &[f32],
        n: usize,
        dk: DecodeKernels,
        exact: bool,
    ) -> Result<Vec<f32>, BackendError> {
        let mut st = self.stage(ty, rows, cols, w, x, n, rows * cols, dk)?;
        st.s.exact = exact;
        matmul(&self.gpu, &self.k, &self.blas, &mut st.s, &st.m, st.a, 1)?;
        let mut out = vec![0f32; n * rows];
        self.gpu.download(&mut out, &st.out)?;
        Ok(out)
    }

    /// Mean seconds of one decode product (`n` tokens, activations already quantized, kernels
    /// chosen by `dk`) on a weight of `rows x cols` filled with `w_bytes` repeated, over `iters`
    /// runs after warm-up.
    #[allow(clippy::too_many_arguments)]
    pub fn time_matvec(
        &self,
        ty: GgmlType,
        rows: usize,
        cols: usize,
        block_bytes: &[u8],
        n: usize,
        iters: usize,
        dk: DecodeKernels,
    ) -> Result<f64, BackendError> {
        let row_bytes = ty.bytes_for(cols as u64).expect("shape") as usize;
        let host: Vec<u8> = block_bytes
            .iter()
            .copied()
            .cycle()
            .take(rows * row_bytes)
            .collect();
        let x: Vec<f32> = (0..n * cols)
            .map(|i| ((i % 17) as f32 - 8.0) * 0.01)
            .collect();
        // Bound whole: the staged buffers must outlive the products.
        let mut st = self.stage(ty, rows, cols, &host, &x, n, 0, dk)?;
        for _ in 0..3 {
            matmul(&self.gpu, &self.k, &self.blas, &mut st.s, &st.m, st.a, 1)?;
        }
        self.gpu.sync()?;
        let t0 = Instant::now();
        for _ in 0..iters {
            matmul(&self.gpu, &self.k, &self.blas, &mut st.s, &st.m, st.a, 1)?;
        }
        self.gpu.sync()?;
        Ok(t0.elapsed().as_secs_f64() / iters as f64)
    }

    /// Device-to-device copy bandwidth in bytes per second (bytes read + written), the ceiling
    /// the decode kernels are compared against.
    pub fn copy_bandwidth(&self, bytes: usize) -> Result<f64, BackendError> {
        let a = self.gpu.alloc(bytes, "copy source")?;
        let b = self.gpu.alloc(bytes, "copy destination")?;
        let copy = || {
            // SAFETY: both buffers hold `bytes`.
            unsafe {
                cudarc::driver::result::memcpy_dtod_async(
                    b.ptr,
                    a.ptr,
                    bytes,
                    self.gpu.stream.cu_stream(),
                )
            }
            .map_err(|e| super::device::driver_err("device copy", e))
        };
        copy()?;
        self.gpu.sync()?;
        let iters = 10;
        let t0 = Instant::now();
        for _ in 0..iters {
            copy()?;
        }
        self.gpu.sync()?;
        Ok(2.0 * bytes as f64 * iters as f64 / t0.elapsed().as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_kernel_choice_follows_token_count_and_shape() {
        use DecodePath::{Dp4a, Mma, Stream};
        let st = DecodeKernels::stream(MV_TILE);
        let auto = DecodeKernels::mma_from(2);
        let mut def = auto;
        def.stream_tile = MV_TILE;
        let forced = DecodeKernels::dp4a(Some(4));
        let mut wide2 = auto;
        wide2.wide_wpr = 2;
        let q4k_row = 4096 / 256 * 144;
        // (kernels, type, tokens, cols, rows, expected path)
        let cases = [
            // Streaming everything: one token in tiles of whole rows near the target size
            // (at least one row); several tokens on the tensor cores.
            (
                st,
                GgmlType::Q4_K,
                1,
                4096,
                14336,
                Stream {
                    rows: MV_TILE / q4k_row,
                },
            ),
            (st, GgmlType::Q6_K, 1, 14336, 4096, Stream { rows: 1 }),
            (st, GgmlType::Q4_K, 2, 4096, 14336, Mma),
            // Rows that are not a multiple of 16 bytes (Q4_1 at width 576: 360) never stream.
            (st, GgmlType::Q4_1, 1, 576, 100, Dp4a { wpr: 1 }),
            // By default only Q6_K streams (at one token).
            (def, GgmlType::Q6_K, 1, 4096, 49152, Stream { rows: 2 }),
            (def, GgmlType::Q4_K, 1, 4096, 14336, Dp4a { wpr: 1 }),
            // Without streaming, one token: dp4a with one warp per row, the tensor cores on wide
            // matrices with few rows in Q4_K/Q5_K.
            (auto, GgmlType::Q4_K, 1, 4096, 14336, Dp4a { wpr: 1 }),
            (auto, GgmlType::Q4_K, 1, 14336, 4096, Mma),
            (wide2, GgmlType::Q4_K, 1, 14336, 4096, Dp4a { wpr: 2 }),
            (auto, GgmlType::Q6_K, 1, 14336, 4096, Dp4a { wpr: 1 }),
            // Forced dp4a never takes the tensor cores; a warps-per-row override is kept.
            (forced, GgmlType::Q4_K, 16, 14336, 4096, Dp4a { wpr: 4 }),
            (
                DecodeKernels::dp4a(None),
                GgmlType::Q4_K,
                1,
                14336,
                4096,
                Dp4a { wpr: 1 },
            ),
        ];
        for (i, &(dk, ty, n, cols, rows, want)) in cases.iter().enumerate() {
            assert_eq!(dk.choose(ty, n, cols, rows, 132), want, "case {i}");
        }
        // Several tokens: the tensor-core kernels, whatever the shape.
        for n in 2..=MV_MAXT {
            assert_eq!(auto.choose(GgmlType::Q4_1, n, 4096, 14336, 132), Mma);
        }
        assert_eq!(st.stream_rows(144), Some(16));
        assert_eq!(st.stream_rows(360), None);
        assert_eq!(st.stream_rows(MV_TILE_MAX + 16), None);
        // Units per row of the two kernel families.
        assert_eq!(units_per_row(GgmlType::Q4_K, 4096), 64);
        assert_eq!(mmqs_units_per_row(GgmlType::Q4_K, 4096), 16);
        assert_eq!(mmqs_units_per_row(GgmlType::Q6_K, 4096), 32);
        assert_eq!(mmqs_units_per_row(GgmlType::Q8_0, 4096), 128);
    }
}
