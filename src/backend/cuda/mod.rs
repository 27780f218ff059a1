//! The CUDA backend: executes the same [`crate::graph::Graph`] as the CPU backend on one GPU.
//!
//! - Weights are uploaded as they sit in the GGUF file (quantized blocks; no dequantized copies
//!   kept), norms as f32.
//! - Matrix products: up to 8 tokens use the matrix-vector kernels (`mmvq_*` with activations
//!   quantized once to q8_1, or `mv_*` for float weights); larger batches dequantize the weight
//!   in row chunks to an f16 scratch tile and multiply with cuBLAS (f32 accumulation).
//! - Attention: the span-aware kernel of `cuda/attention.cu` over per-head KV regions of the
//!   [`KvLayout`] (dense is the layout with one region of `n_ctx` per head), K and V each f16
//!   or q8_0 (ggml blocks, quantized on the device as ggml's reference quantizer does; the
//!   kernels copy the raw blocks into shared memory and convert them to f16 there).
//! - Every buffer is allocated in [`CudaBackend::new`]; a forward step uploads the batch's
//!   metadata in one copy and downloads only the requested logits.

pub mod device;
pub mod kernels;
pub mod layer_tail;
pub mod matmul;
pub mod prefetch;
pub mod timer;

use std::sync::Arc;

use cudarc::cublas::CudaBlas;
use cudarc::driver::CudaFunction;

use self::device::{blocks, cfg_1d, lcfg, A};
pub use self::device::{probe, CudaUnavailable, DevBuf, Gpu};
use self::kernels::Kernels;
pub use self::matmul::{
    DecodeKernels, GpuMatrix, MatArgs, MatScratch, MatmulHarness, GPU_TYPES, MV_MAXT,
    QUANT_PREFILL_MAX,
};
use self::prefetch::{L2Prefetch, Prefetch};

use super::{validate_batch, Backend, BackendError, BackendOptions};
use crate::backend::cpu::ops::rope_angles;
use crate::graph::{ActId, Batch, Op};
use crate::kv::{KvLayout, KvType, KvTypes};
use crate::model::Model;

/// Query rows per prefill attention block (`attn_pre_*` in attention.cu: 4 warps x 16 rows).
const TC_ROWS: usize = 64;
/// Query rows per decode attention block (`attn_dec_*`: 4 warps sharing 16 rows).
const ATT_RMAX: usize = 16;
/// Most (token, head, split) partial rows of split attention.
const PART_ROWS: usize = 65536;
/// Thread groups of the wide split merge (`MERGE_GROUPS` in attention.cu: D threads each).
const MERGE_GROUPS: usize = 4;
/// Most splits the merge takes (`MERGE_MAX_SPLIT`).
const MERGE_MAX_SPLIT: usize = 1024;
/// Fewest keys a split takes (`FA_MIN_PER` in attention.cu).
const ATT_MIN_PER: usize = 128;
/// Attention blocks to aim for per multiprocessor when splitting long key ranges: one wave
/// (fewer, longer splits beat more waves: 257 vs 245 t/s at 4 per SM, H100, 0.5 density at
/// depth 32768). `MOA_ATT_BLOCKS` overrides the total (for tuning).
const ATT_BLOCKS_PER_SM: usize = 2;

pub struct CudaBackend {
    model: Arc<Model>,
    gpu: Gpu,
    k: Kernels,
    blas: CudaBlas,
    max_batch: usize,
    max_logits: usize,
    layout: KvLayout,
    /// Raw weight tensors by upload order; `matrices`/`vectors` index into it.
    weight_bufs: Vec<DevBuf>,
    /// Index into `weight_bufs` of each uploaded weight id (`usize::MAX` if not uploaded).
    buf_of: Vec<usize>,
    matrices: Vec<Option<GpuMatrix>>,
    vectors: Vec<Option<DevBuf>>,
    embed_fn: CudaFunction,
    acts: Vec<DevBuf>,
    act_version: Vec<u64>,
    mats: MatScratch,
    k16: DevBuf,
    v16: DevBuf,
    /// The batch's K / V rows as q8_0 blocks (allocated for a q8_0 cache type only).
    k8: DevBuf,
    v8: DevBuf,
    kv: Vec<(DevBuf, DevBuf)>,
    caps: DevBuf,
    offs: DevBuf,
    /// Batch metadata: tokens, positions, sequence ids, run first positions, run starts, logit
    /// rows (i32 each, `max_batch` apart), then tiles (int2) and rope (cos, sin) pairs.
    meta: DevBuf,
    meta_host: Vec<u32>,
    /// One position's rope (cos, sin) pairs, computed on the host (as the CPU backend does).
    rope_host: Vec<(f32, f32)>,
    part: DevBuf,
    logit_x: DevBuf,
    logits_d: DevBuf,
    argmax_d: DevBuf,
    /// Logit rows copied back (page-locked host memory).
    logits: device::HostBuf,
    n_logits: usize,
    seq_len: Vec<usize>,
    n_tiles: usize,
    weight_bytes: usize,
    scratch_bytes: usize,
    /// Captured decode steps by (tokens, logit rows, attention tiles, key reach).
    graphs: std::collections::HashMap<(usize, usize, usize, usize), cudarc::driver::CudaGraph>,
    /// The step's key reach: the batch's largest position + 1, rounded up to a power of two.
    /// Decode attention splits its keys by this rather than by the cache capacity, so short
    /// contexts run unsplit (no merge launch); a decode graph is captured per reach.
    key_reach: usize,
    /// Every run of the current batch is one token (decode): keys may be stored before attention.
    single_token_runs: bool,
    /// `MOA_CUDA_GRAPHS=0` turns graph replay off (for debugging and comparisons).
    use_graphs: bool,
    /// Attention blocks to aim for when splitting key ranges.
    att_target_blocks: usize,
    /// `MOA_ATT_SPLIT=floor`: splits per (tile, KV head) rounded down, so the blocks stay
    /// within one wave of `att_target_blocks` (default: rounded up; for measuring: 1346.0 vs
    /// 1426.4 t/s rounded up, 16 x 16384 parallel decode on an H100).
    att_split_floor: bool,
    /// `MOA_L2_PF`: L2 prefetch of the next product's weights by the small decode kernels.
    l2_pf: L2Prefetch,
    /// The split merge fetches the output projection's weights into L2 again (after the
    /// attention's K/V went through L2); `MOA_PF_MERGE=0` leaves it to RoPE alone.
    pf_merge: bool,
    /// One-token steps run each layer's tail (output projection to the next layer's q/k/v) as
    /// one persistent kernel (`MOA_LAYER_TAIL=0`: the separate kernels).
    tail: Option<layer_tail::LayerTail>,
    tail_on: bool,
}

/// Offsets (in u32 words) of the metadata sections.
struct MetaLayout {
    tokens: usize,
    pos: usize,
    seq: usize,
    p0: usize,
    rs: usize,
    lrows: usize,
    last: usize,
    tiles: usize,
    cs: usize,
    words: usize,
}

/// Values per thread at most in the norm kernels (`add_rms_norm_q8_<PER>` in ops.cu).
const NORM_PER: usize = 16;

/// Threads of the norm kernel for rows of `width` (about 4 values each, a multiple of 32, at
/// most 1024: rows up to 16384 wide) and which of the kernels (PER = 4, 8, 16 values per
/// thread) holds the row.
fn norm_shape(width: usize) -> (u32, usize) {
    let threads = (width.div_ceil(4).div_ceil(32) * 32).clamp(32, 1024);
    let per = width.div_ceil(threads);
    let variant = [4, 8, 16].iter().position(|&p| per <= p).unwrap_or(2);
    (threads as u32, variant)
}

fn meta_layout(max_batch: usize, half_rot: usize) -> MetaLayout {
    // An even section length keeps every section 8-byte aligned: the kernels read the cos/sin
    // pairs (and the tile table) as 8-byte float2 / int2 (a batch of one token misaligned them:
    // `moa-bench -p 0` failed with CUDA_ERROR_MISALIGNED_ADDRESS in rope_kv).
    let b = max_batch.next_multiple_of(2);
    MetaLayout {
        tokens: 0,
        pos: b,
        seq: 2 * b,
        p0: 3 * b,
        rs: 4 * b,
        lrows: 5 * b,
        last: 6 * b,
        tiles: 7 * b,
        cs: 9 * b,
        words: 9 * b + 2 * b * half_rot,
    }
}

/// Each (layer, KV head)'s capacity and region offset (first sequence), as the kernels read them.
fn head_tables(layout: &KvLayout) -> (Vec<i32>, Vec<i32>) {
    let hk = layout.n_head_kv;
    let nh = layout.n_layer * hk;
    let caps = (0..nh)
        .map(|i| layout.capacity(i / hk, i % hk) as i32)
        .collect();
    let offs = (0..nh)
        .map(|i| layout.region_offset(0, i / hk, i % hk) as i32)
        .collect();
    (caps, offs)
}

/// Whether the CUDA backend can hold a KV cache of these element types (every [`KvType`], K and
/// V independently: f16 and q8_0); checked before any GPU is touched.
pub fn check_kv_types(types: KvTypes) -> Result<(), BackendError> {
    for ty in [types.k, types.v] {
        if !KvType::ALL.contains(&ty) {
            return Err(BackendError::Unsupported {
                backend: "cuda",
                tensor: super::KV_CACHE.into(),
                ty: types.to_string(),
                reason: "the CUDA attention kernels read f16 or q8_0 K/V".into(),
            });
        }
    }
    Ok(())
}

/// Bytes of one layer's K (or V) cache buffer holding `rows` rows of `head_dim` values of `ty`.
fn kv_buffer_bytes(rows: usize, head_dim: usize, ty: KvType) -> usize {
    rows * ty.bytes_for(head_dim)
}

/// Allocates one layer's K and V cache buffers for `layout`.
fn alloc_layer_kv(
    gpu: &Gpu,
    layout: &KvLayout,
    l: usize,
) -> Result<(DevBuf, DevBuf), BackendError> {
    let (rows, hd, types) = (layout.rows_per_layer(l), layout.head_dim, layout.types());
    Ok((
        gpu.alloc(
            kv_buffer_bytes(rows, hd, types.k),
            &format!("KV cache (K, layer {l})"),
        )?,
        gpu.alloc(
            kv_buffer_bytes(rows, hd, types.v),
            &format!("KV cache (V, layer {l})"),
        )?,
    ))
}

/// Runs the cache-append kernel of a q8_0 cache (`kv_quant_q8_0`) on `x`: `n_tok` rows of
/// `n_head_kv x head_dim` floats, positions `0..n_tok` of one sequence stored into a cache of one
/// region of `n_tok` rows per head. Returns the staging blocks and the cache bytes (tests: both
/// against the CPU quantizer).
pub fn quantize_kv_q8_0(
    gpu: &Gpu,
    k: &Kernels,
    x: &[f32],
    n_head_kv: usize,
    head_dim: usize,
) -> Result<(Vec<u8>, Vec<u8>), BackendError> {
    let row = n_head_kv * head_dim;
    if head_dim == 0 || !head_dim.is_multiple_of(32) || x.is_empty() || !x.len().is_multiple_of(row)
    {
        return Err(BackendError::Device(format!(
            "quantize_kv_q8_0: {} values are not whole rows of {n_head_kv} x {head_dim} (a \
             multiple of 32)",
            x.len()
        )));
    }
    let n_tok = x.len() / row;
    let bytes = KvType::Q8_0.bytes_for(x.len());
    let pos: Vec<i32> = (0..n_tok as i32).collect();
    let seq = vec![0i32; n_tok];
    let caps = vec![n_tok as i32; n_head_kv];
    let offs: Vec<i32> = (0..n_head_kv).map(|h| (h * n_tok) as i32).collect();
    let xb = gpu.alloc(x.len() * 4, "harness rows")?;
    gpu.upload(&xb, x)?;
    let ints = |v: &[i32], what: &str| -> Result<DevBuf, BackendError> {
        let b = gpu.alloc(v.len() * 4, what)?;
        gpu.upload(&b, v)?;
        Ok(b)
    };
    let (pb, sb, cb, ob) = (
        ints(&pos, "harness positions")?,
        ints(&seq, "harness sequences")?,
        ints(&caps, "harness capacities")?,
        ints(&offs, "harness offsets")?,
    );
    let stage = gpu.alloc(bytes, "harness staging")?;
    let cache = gpu.alloc(bytes, "harness cache")?;
    gpu.launch(
        &k.kv_quant_q8_0,
        lcfg((blocks(x.len() / 32, 8), 1, 1), 256),
        &[
            A::P(xb.ptr),
            A::I(n_tok as i32),
            A::I(n_head_kv as i32),
            A::I(head_dim as i32),
            A::P(stage.ptr),
            A::I(1),
            A::P(pb.ptr),
            A::P(sb.ptr),
            A::P(cb.ptr),
            A::P(ob.ptr),
            A::I((n_head_kv * n_tok) as i32),
            A::I(0),
            A::P(cache.ptr),
        ],
    )?;
    let mut staged = vec![0u8; bytes];
    let mut stored = vec![0u8; bytes];
    gpu.download(&mut staged, &stage)?;
    gpu.download(&mut stored, &cache)?;
    gpu.sync()?;
    Ok((staged, stored))
}

/// Runs the exact attention kernel (`attn_exact_d*`, cuda/attention_exact.cu) on `case`, with
/// the layout's capacities, region offsets and sinks as a forward step passes them (tests:
/// against [`crate::backend::cpu::attention_reference`], bit for bit). Returns `n` rows of
/// `n_head * head_dim`.
pub fn exact_attention_harness(
    gpu: &Gpu,
    k: &Kernels,
    case: &crate::backend::cpu::AttnCase,
) -> Result<Vec<f32>, BackendError> {
    let layout = &case.layout;
    let (hd, hk, n) = (layout.head_dim, layout.n_head_kv, case.n);
    let g = case.n_head / hk;
    let bad = |what: &str| {
        Err(BackendError::Device(format!(
            "exact_attention_harness: {what}"
        )))
    };
    if hd != 64 && hd != 128 {
        return bad("head_dim must be 64 or 128");
    }
    if layout.types() != KvTypes::default() {
        return bad("the exact kernel reads f16 K/V");
    }
    if n == 0 || case.q.len() != n * case.n_head * hd || case.k_new.len() != n * hk * hd {
        return bad("q / k_new are not n rows");
    }
    let rows = layout.rows_per_layer(case.layer) * hd;
    let ints = |v: &[i32], what: &str| -> Result<DevBuf, BackendError> {
        let b = gpu.alloc(v.len() * 4, what)?;
        gpu.upload(&b, v)?;
        Ok(b)
    };
    let pos: Vec<i32> = (0..n).map(|t| (case.p0 + t) as i32).collect();
    let caps: Vec<i32> = (0..hk)
        .map(|h| layout.capacity(case.layer, h) as i32)
        .collect();
    let offs: Vec<i32> = (0..hk)
        .map(|h| layout.region_offset(0, case.layer, h) as i32)
        .collect();
    let (pb, sb, p0b, rsb, cb, ob) = (
        ints(&pos, "harness positions")?,
        ints(&vec![case.seq as i32; n], "harness sequences")?,
        ints(&vec![case.p0 as i32; n], "harness run starts")?,
        ints(&vec![0; n], "harness run rows")?,
        ints(&caps, "harness capacities")?,
        ints(&offs, "harness offsets")?,
    );
    let f16s = |v: &[half::f16], what: &str| -> Result<DevBuf, BackendError> {
        let b = gpu.alloc(v.len() * 2, what)?;
        gpu.upload(&b, v)?;
        Ok(b)
    };
    let qb = gpu.alloc(case.q.len() * 4, "harness queries")?;
    gpu.upload(&qb, &case.q)?;
    let (knb, vnb) = (
        f16s(&case.k_new, "harness new keys")?,
        f16s(&case.v_new, "harness new values")?,
    );
    let (kcb, vcb) = (
        f16s(&case.k_cache[..rows], "harness K cache")?,
        f16s(&case.v_cache[..rows], "harness V cache")?,
    );
    let out = gpu.alloc(case.q.len() * 4, "harness output")?;
    let tiled = case.n_batch >= crate::backend::cpu::ggml_attn::TILED_MIN_BATCH;
    gpu.launch(
        &k.attn_exact[usize::from(hd == 128)],
        lcfg((n as u32, case.n_head as u32, 1), 32),
        &[
            A::P(qb.ptr),
            A::P(knb.ptr),
            A::P(vnb.ptr),
            A::P(kcb.ptr),
            A::P(vcb.ptr),
            A::P(pb.ptr),
            A::P(sb.ptr),
            A::P(p0b.ptr),
            A::P(rsb.ptr),
            A::I(g as i32),
            A::I(case.n_head as i32),
            A::I(hk as i32),
            A::P(cb.ptr),
            A::P(ob.ptr),
            A::I(layout.rows_per_layer(case.layer) as i32 / layout.n_seq as i32),
            A::I(layout.sink as i32),
            A::I(i32::from(tiled)),
            A::F(1.0 / (hd as f32).sqrt()),
            A::P(out.ptr),
        ],
    )?;
    let mut o = vec![0f32; case.q.len()];
    gpu.download(&mut o, &out)?;
    Ok(o)
}

/// Whether `MOA_EXACT=1` (or its older name `MOA_EXACT_ATTN=1`) asks for exact mode (read once
/// per backend, when it is made). With a q8_0 K or V cache the request is noted on stderr and
/// the fast attention kernels run (the exact kernel reads f16 rows; the CPU scores q8_0 keys
/// with a q8_0 query, another arithmetic).
fn exact_attn_from_env(types: KvTypes) -> bool {
    let on = ["MOA_EXACT", "MOA_EXACT_ATTN"]
        .iter()
        .any(|k| std::env::var(k).is_ok_and(|v| v == "1"));
    if on && types != KvTypes::default() {
        eprintln!(
            "MOA_EXACT=1: the exact attention kernel reads f16 K/V only; the {types} cache \
             uses the fast kernels"
        );
    }
    on
}

impl CudaBackend {
    pub fn new(model: Arc<Model>, opts: BackendOptions) -> Result<CudaBackend, BackendError> {
        Self::on_device(model, opts, 0)
    }

    pub fn on_device(
        model: Arc<Model>,
        opts: BackendOptions,
        ordinal: usize,
    ) -> Result<CudaBackend, BackendError> {
        check_kv_types(opts.layout.types())?;
        let gpu = Gpu::open(ordinal)?;
        let cfg = model.config.clone();
        let layout = opts.layout;
        assert_eq!(
            (layout.n_layer, layout.n_head_kv, layout.head_dim),
            (cfg.n_layer, cfg.n_head_kv, cfg.head_dim)
        );
        if cfg.head_dim != 64 && cfg.head_dim != 128 {
            return Err(BackendError::Unsupported {
                backend: "cuda",
                tensor: "attention".into(),
                ty: format!("head_dim {}", cfg.head_dim),
                reason: "the attention kernels exist for head dimensions 64 and 128".into(),
            });
        }
        if cfg.n_embd > 1024 * NORM_PER {
            return Err(BackendError::Unsupported {
                backend: "cuda",
                tensor: "norm".into(),
                ty: format!("embedding width {}", cfg.n_embd),
                reason: format!(
                    "the norm kernel holds rows of at most {} values",
                    1024 * NORM_PER
                ),
            });
        }
        let group = cfg.n_head / cfg.n_head_kv.max(1);
        if group > ATT_RMAX {
            return Err(BackendError::Unsupported {
                backend: "cuda",
                tensor: "attention".into(),
                ty: format!("{} query heads per KV head", group),
                reason: format!(
                    "the decode attention kernel holds at most {ATT_RMAX} query rows per block"
                ),
            });
        }
        if gpu.cc < (8, 0) {
            return Err(BackendError::Device(format!(
                "{} has compute capability {}.{}; the CUDA kernels (tensor-core attention, \
                 asynchronous copies) need 8.0 or newer",
                gpu.name, gpu.cc.0, gpu.cc.1
            )));
        }
        let k = Kernels::load(&gpu.ctx, kernels::arch_for(gpu.cc))?;
        let blas = CudaBlas::new(Arc::clone(&gpu.stream))
            .map_err(|e| BackendError::Device(format!("cuBLAS: {e:?}")))?;
        let max_batch = opts.max_batch.max(1);
        let max_logits = max_batch;

        // Weights: each tensor once, raw.
        let graph = &model.graph;
        let n_w = model.weights.table.len();
        let mut weight_bufs = Vec::new();
        let mut buf_of = vec![usize::MAX; n_w];
        let mut matrices: Vec<Option<GpuMatrix>> = (0..n_w).map(|_| None).collect();
        let mut vectors: Vec<Option<DevBuf>> = (0..n_w).map(|_| None).collect();
        let mut weight_bytes = 0usize;
        let mut max_cols = 0usize;
        let mut max_mat = 0usize;
        let upload = |id: usize,
                      bufs: &mut Vec<DevBuf>,
                      buf_of: &mut Vec<usize>,
                      weight_bytes: &mut usize|
         -> Result<usize, BackendError> {
            if buf_of[id] == usize::MAX {
                let wt = &model.weights.table[id];
                let b = gpu.alloc(wt.n_bytes, &format!("weight {}", wt.name))?;
                gpu.upload(&b, model.weight_bytes(id))?;
                *weight_bytes += wt.n_bytes;
                bufs.push(b);
                buf_of[id] = bufs.len() - 1;
            }
            Ok(buf_of[id])
        };
        let unsupported = |id: usize, reason: &str| {
            let wt = &model.weights.table[id];
            BackendError::Unsupported {
                backend: "cuda",
                tensor: wt.name.clone(),
                ty: wt.ty.name().into(),
                reason: reason.into(),
            }
        };
        let mut embed_fn = None;
        for op in &graph.ops {
            match *op {
                Op::RmsNorm { w, .. } if vectors[w].is_none() => {
                    let v = model.weight_f32(w)?;
                    let b = gpu.alloc(v.len() * 4, "norm weights")?;
                    gpu.upload(&b, &v)?;
                    weight_bytes += v.len() * 4;
                    vectors[w] = Some(b);
                }
                Op::Embed { table, .. } => {
                    let ty = model.weights.table[table].ty;
                    let suffix = matmul::type_suffix(ty)
                        .ok_or_else(|| unsupported(table, "no GPU kernel for this type"))?;
                    embed_fn = Some(k.get(&format!("embed_{suffix}"))?);
                    upload(table, &mut weight_bufs, &mut buf_of, &mut weight_bytes)?;
                }
                Op::MatMul { w, .. } | Op::Logits { w, .. } => {
                    if matrices[w].is_some() {
                        continue;
                    }
                    let wt = &model.weights.table[w];
                    let buf = upload(w, &mut weight_bufs, &mut buf_of, &mut weight_bytes)?;
                    let m = GpuMatrix::new(&k, weight_bufs[buf].ptr, wt.ty, wt.rows, wt.cols)?
                        .ok_or_else(|| {
                            unsupported(w, "no GPU kernel for this type and row length")
                        })?;
                    max_cols = max_cols.max(wt.cols);
                    max_mat = max_mat.max(wt.rows * wt.cols);
                    matrices[w] = Some(m);
                }
                _ => {}
            }
        }
        let embed_fn =
            embed_fn.ok_or_else(|| BackendError::Device("graph has no embedding".into()))?;

        let mut mats = MatScratch::new(&gpu, max_batch, max_cols, max_mat)?;
        mats.exact = exact_attn_from_env(layout.types());
        let mut scratch_bytes = mats.bytes();
        let mut salloc = |bytes: usize, what: &str| -> Result<DevBuf, BackendError> {
            scratch_bytes += bytes;
            gpu.alloc(bytes, what)
        };
        let mut acts = Vec::with_capacity(graph.acts.len());
        for a in &graph.acts {
            acts.push(salloc(max_batch * a.width * 4, a.name)?);
        }
        let kv_dim = cfg.kv_dim();
        let k16 = salloc(max_batch * kv_dim * 2, "new keys")?;
        let v16 = salloc(max_batch * kv_dim * 2, "new values")?;
        // q8_0 staging rows only for a q8_0 part (a 1-byte placeholder otherwise).
        let q8_stage = |ty: KvType| match ty {
            KvType::Q8_0 => max_batch * ty.bytes_for(kv_dim),
            KvType::F16 => 0,
        };
        let types = layout.types();
        let k8 = salloc(q8_stage(types.k), "new keys (q8_0)")?;
        let v8 = salloc(q8_stage(types.v), "new values (q8_0)")?;
        let mut kv = Vec::with_capacity(cfg.n_layer);
        for l in 0..cfg.n_layer {
            kv.push(alloc_layer_kv(&gpu, &layout, l)?);
        }
        let nh = cfg.n_layer * cfg.n_head_kv;
        let (caps_h, offs_h) = head_tables(&layout);
        let caps = salloc(nh * 4, "head capacities")?;
        let offs = salloc(nh * 4, "head offsets")?;
        gpu.upload(&caps, &caps_h)?;
        gpu.upload(&offs, &offs_h)?;
        let ml = meta_layout(max_batch, cfg.rope.n_rot / 2);
        let meta = salloc(ml.words * 4, "batch metadata")?;
        let part = salloc(PART_ROWS * (cfg.head_dim + 2) * 4, "attention partials")?;
        let logit_x = salloc(max_logits * cfg.n_embd * 4, "logit inputs")?;
        let logits_d = salloc(max_logits * cfg.n_vocab * 4, "logits")?;
        let argmax_d = salloc(max_logits * 4, "argmax")?;
        let tail = layer_tail::LayerTail::build(
            &gpu,
            k.get("layer_tail")?,
            &graph.ops,
            &matrices,
            &vectors,
            &acts,
            mats.q8_ptrs(),
            logits_d.ptr,
            cfg.head_dim,
            &mut scratch_bytes,
        );
        // While the kernel is off by default, a failure to set it up costs nothing else.
        let tail = match tail {
            Ok(t) => t,
            Err(e) if !layer_tail::on_by_default() => {
                if std::env::var("MOA_LAYER_TAIL").is_ok() {
                    eprintln!("the layer-tail kernel is not available: {e}");
                }
                None
            }
            Err(e) => return Err(e),
        };
        gpu.sync()?;
        let sms = gpu.sms;
        let att_target_blocks = std::env::var("MOA_ATT_BLOCKS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(ATT_BLOCKS_PER_SM * sms)
            .max(1);
        Ok(CudaBackend {
            k,
            blas,
            max_batch,
            max_logits,
            weight_bufs,
            buf_of,
            matrices,
            vectors,
            embed_fn,
            act_version: vec![0; acts.len()],
            acts,
            mats,
            k16,
            v16,
            k8,
            v8,
            kv,
            caps,
            offs,
            meta,
            meta_host: vec![0; ml.words],
            rope_host: vec![(0.0, 0.0); cfg.rope.n_rot / 2],
            part,
            logit_x,
            logits_d,
            argmax_d,
            logits: device::HostBuf::new(max_logits * cfg.n_vocab),
            n_logits: 0,
            seq_len: vec![0; layout.n_seq],
            n_tiles: 0,
            weight_bytes,
            scratch_bytes,
            graphs: Default::default(),
            key_reach: 1,
            single_token_runs: false,
            // The kernel timer records events around every launch, which a graph would not.
            use_graphs: std::env::var("MOA_CUDA_GRAPHS").map_or(true, |v| v != "0")
                && !timer::enabled(),
            att_target_blocks,
            att_split_floor: std::env::var("MOA_ATT_SPLIT").is_ok_and(|v| v == "floor"),
            pf_merge: std::env::var("MOA_PF_MERGE").map_or(true, |v| v != "0"),
            l2_pf: L2Prefetch::from_env(gpu.cc),
            tail,
            tail_on: layer_tail::on_by_default(),
            layout,
            gpu,
            model,
        })
    }

    /// Turns exact mode (exact attention and the legacy types' products in the CPU's order) on
    /// or off (see [`exact_attn_from_env`]); captured decode graphs are dropped so the next steps
    /// capture the chosen kernels. With a q8_0 K or V cache the fast attention kernels run
    /// either way ([`CudaBackend::exact_attention`] then says false).
    pub fn set_exact_attention(&mut self, on: bool) {
        if on != self.mats.exact {
            self.graphs.clear();
        }
        self.mats.exact = on;
    }

    /// Turns the one-kernel layer tail ([`layer_tail`]) on or off for later one-token steps
    /// (captured decode graphs are dropped); for comparing it with the separate kernels.
    pub fn set_layer_tail(&mut self, on: bool) {
        if on != self.tail_on {
            self.graphs.clear();
        }
        self.tail_on = on;
    }

    /// Spans of the graph the layer-tail kernel runs (0: none fit, or `MOA_LAYER_TAIL=0`).
    pub fn layer_tail_spans(&self) -> usize {
        self.tail.as_ref().map_or(0, |t| t.n_spans())
    }

    /// Whether attention runs the exact kernels (requested and the cache is f16 K/V).
    pub fn exact_attention(&self) -> bool {
        self.mats.exact && self.layout.types() == KvTypes::default()
    }

    /// Device name and compute capability.
    pub fn device_name(&self) -> String {
        format!("{} (sm_{}{})", self.gpu.name, self.gpu.cc.0, self.gpu.cc.1)
    }

    /// Bytes of weights on the device (their file size, plus norms as f32).
    pub fn weight_bytes(&self) -> usize {
        self.weight_bytes
    }

    /// Bytes of scratch buffers (activations, staging, logits).
    pub fn scratch_bytes(&self) -> usize {
        self.scratch_bytes
    }

    /// Bytes of the K and V cache buffers as allocated (equal to [`KvLayout::bytes`] for a
    /// fresh backend; a re-planned one keeps buffers that were large enough).
    pub fn kv_alloc_bytes(&self) -> usize {
        self.kv.iter().map(|(k, v)| k.bytes + v.bytes).sum()
    }

    /// One layer's raw K and V cache bytes (tests: the stored rows against the CPU's).
    pub fn download_kv(&self, layer: usize) -> Result<(Vec<u8>, Vec<u8>), BackendError> {
        let (kb, vb) = &self.kv[layer];
        let mut k = vec![0u8; kb.bytes];
        let mut v = vec![0u8; vb.bytes];
        self.gpu.download(&mut k, kb)?;
        self.gpu.download(&mut v, vb)?;
        Ok((k, v))
    }

    fn meta_ptr(&self, word: usize) -> u64 {
        self.meta.at(word * 4)
    }

    /// Layer `layer`'s ring region: its per-head capacities and region offsets (device
    /// pointers), the rows of one sequence and the sink count.
    fn ring(&self, layer: usize) -> (u64, u64, i32, i32) {
        // Byte offset of this layer's per-head capacity and region-offset entries (i32 each).
        let head_off = layer * self.model.config.n_head_kv * 4;
        let rows_per_seq = self.layout.rows_per_layer(layer) / self.layout.n_seq;
        (
            self.caps.at(head_off),
            self.offs.at(head_off),
            rows_per_seq as i32,
            self.layout.sink as i32,
        )
    }

    /// The ring-region arguments of every kernel that finds a key's slot (KeySpan in
    /// cuda/attention.cu, the store kernels in cuda/ops.cu), in their order: layer `layer`'s
    /// per-head capacities and region offsets, the rows of one sequence and the sink count.
    fn ring_args(&self, layer: usize) -> [A; 4] {
        let (caps, offs, rows_per_seq, sink) = self.ring(layer);
        [A::P(caps), A::P(offs), A::I(rows_per_seq), A::I(sink)]
    }

    /// rope_kv's arguments for one token of layer `layer` (the layer-tail kernel's RoPE).
    fn rope_args(&self, layer: usize) -> layer_tail::RopeArgs {
        let cfg = &self.model.config;
        let ml = meta_layout(self.max_batch, cfg.rope.n_rot / 2);
        let (caps, offs, rows_per_seq, sink) = self.ring(layer);
        layer_tail::RopeArgs {
            head_dim: cfg.head_dim as i32,
            half_rot: (cfg.rope.n_rot / 2) as i32,
            rows_per_seq,
            sink,
            cs: self.meta_ptr(ml.cs),
            k16: self.k16.ptr,
            v16: self.v16.ptr,
            kc: self.kv[layer].0.ptr,
            vc: self.kv[layer].1.ptr,
            tok_pos: self.meta_ptr(ml.pos),
            tok_seq: self.meta_ptr(ml.seq),
            caps,
            offs,
        }
    }

    fn matmul(&mut self, w: usize, a: MatArgs, x_version: u64) -> Result<(), BackendError> {
        let m = self.matrices[w].as_ref().expect("matrix prepared");
        matmul::matmul(
            &self.gpu,
            &self.k,
            &self.blas,
            &mut self.mats,
            m,
            a,
            x_version,
        )
    }

    fn act(&self, id: ActId) -> u64 {
        self.acts[id].ptr
    }

    fn upload_meta(&mut self, batch: &Batch) -> Result<(), BackendError> {
        let cfg = &self.model.config;
        let half = cfg.rope.n_rot / 2;
        let ml = meta_layout(self.max_batch, half);
        let n = batch.len();
        let h = &mut self.meta_host;
        for t in 0..n {
            h[ml.tokens + t] = batch.tokens[t];
            h[ml.pos + t] = batch.positions[t];
            h[ml.seq + t] = batch.seq_ids[t];
        }
        let mut m = 0;
        for (t, _) in batch.want_logits.iter().enumerate().filter(|(_, &b)| b) {
            h[ml.lrows + m] = t as u32;
            m += 1;
        }
        self.n_logits = m;
        let g = cfg.n_head / cfg.n_head_kv;
        // Prefill batches use the tensor-core kernel (64 query rows per block), decode steps
        // the split kernel (16 rows).
        let rows = if batch.len() > MV_MAXT {
            TC_ROWS
        } else {
            ATT_RMAX
        };
        let tq = (rows / g).max(1);
        let mut nt = 0;
        for (_, start, len) in batch.runs() {
            for t in start..start + len {
                h[ml.p0 + t] = batch.positions[start];
                h[ml.rs + t] = start as u32;
                h[ml.last + t] = batch.positions[start + len - 1];
            }
            let mut tb = 0;
            while tb < len {
                let c = tq.min(len - tb);
                h[ml.tiles + 2 * nt] = (start + tb) as u32;
                h[ml.tiles + 2 * nt + 1] = c as u32;
                nt += 1;
                tb += c;
            }
        }
        self.n_tiles = nt;
        self.single_token_runs = batch.runs().all(|(_, _, len)| len == 1);
        let cs = &mut self.rope_host;
        for t in 0..n {
            rope_angles(&cfg.rope, batch.positions[t], cs);
            for (i, &(c, s)) in cs.iter().enumerate() {
                h[ml.cs + 2 * (t * half + i)] = c.to_bits();
                h[ml.cs + 2 * (t * half + i) + 1] = s.to_bits();
            }
        }
        let words = ml.cs + 2 * n * half;
        self.gpu.upload(&self.meta, &self.meta_host[..words])
    }

    #[allow(clippy::too_many_arguments)]
    fn attention(
        &mut self,
        layer: usize,
        q: ActId,
        kx: ActId,
        vx: ActId,
        out: ActId,
        batch: &Batch,
        fused_rope: Option<(ActId, ActId, Prefetch)>,
        q8_out: bool,
        staged: bool,
    ) -> Result<bool, BackendError> {
        let model = Arc::clone(&self.model);
        let cfg = &model.config;
        let n = batch.len();
        let kvn = n * cfg.kv_dim();
        let ml = meta_layout(self.max_batch, cfg.rope.n_rot / 2);
        let hk = cfg.n_head_kv;
        let g = cfg.n_head / hk;
        let (kc, vc) = (self.kv[layer].0.ptr, self.kv[layer].1.ptr);
        // With every run one token long, the new keys can go straight into the ring: the slot a
        // token takes held a key no query of this batch can see.
        let store_now = fused_rope.is_some() && self.single_token_runs;
        let types = self.layout.types();
        let (kq8, vq8) = (types.k == KvType::Q8_0, types.v == KvType::Q8_0);
        // rope_kv stores the f16 parts when decoding (bit 0 K, bit 1 V); kv_quant_q8_0 the others.
        let store_f16 = if store_now {
            i32::from(!kq8) | (i32::from(!vq8) << 1)
        } else {
            0
        };
        // The split merge (when there is one) repeats RoPE's prefetch of the output projection.
        let merge_pf = match fused_rope {
            Some((_, _, pf)) if self.pf_merge => pf,
            _ => Prefetch::default(),
        };
        if staged {
            // The layer-tail kernel did RoPE, the f16 staging and the cache store.
        } else if let Some((qx, kxr, pf)) = fused_rope {
            let half = cfg.rope.n_rot / 2;
            let mut shape = cfg_1d(n * (cfg.n_head + 2 * hk) * (cfg.head_dim / 2));
            shape.grid_dim.0 += pf.blocks;
            let mut args = vec![
                A::P(self.act(qx)),
                A::P(self.act(kxr)),
                A::P(self.act(vx)),
                A::I(n as i32),
                A::I(cfg.n_head as i32),
                A::I(hk as i32),
                A::I(cfg.head_dim as i32),
                A::I(half as i32),
                A::P(self.meta_ptr(ml.cs)),
                A::P(self.k16.ptr),
                A::P(self.v16.ptr),
                A::I(store_f16),
                A::P(self.meta_ptr(ml.pos)),
                A::P(self.meta_ptr(ml.seq)),
            ];
            args.extend(self.ring_args(layer));
            args.extend([A::P(kc), A::P(vc)]);
            args.extend(pf.args());
            self.gpu.launch_pdl(&self.k.rope_kv, shape, &args)?;
        } else {
            for (src, dst, q8) in [(kx, self.k16.ptr, kq8), (vx, self.v16.ptr, vq8)] {
                if q8 {
                    continue;
                }
                self.gpu.launch(
                    &self.k.to_f16,
                    cfg_1d(kvn),
                    &[A::P(self.act(src)), A::P(dst), A::I(kvn as i32)],
                )?;
            }
        }
        // q8_0 parts: the new rows (K after RoPE) quantized into their staging blocks, and into
        // the ring when decoding.
        for (src, stage, cache, q8) in [(kx, self.k8.ptr, kc, kq8), (vx, self.v8.ptr, vc, vq8)] {
            if !q8 {
                continue;
            }
            let mut args = vec![
                A::P(self.act(src)),
                A::I(n as i32),
                A::I(hk as i32),
                A::I(cfg.head_dim as i32),
                A::P(stage),
                A::I(store_now as i32),
                A::P(self.meta_ptr(ml.pos)),
                A::P(self.meta_ptr(ml.seq)),
            ];
            args.extend(self.ring_args(layer));
            args.push(A::P(cache));
            self.gpu.launch(
                &self.k.kv_quant_q8_0,
                lcfg((blocks(kvn / 32, 8), 1, 1), 256),
                &args,
            )?;
        }
        let (knew, vnew) = (
            if kq8 { self.k8.ptr } else { self.k16.ptr },
            if vq8 { self.v8.ptr } else { self.v16.ptr },
        );
        let scale = 1.0 / (cfg.head_dim as f32).sqrt();
        // Both attention kernels take the queries, new rows, caches and per-token metadata,
        // then (the fast one after its tile table) the head tables.
        let mut args = vec![
            A::P(self.act(q)),
            A::P(knew),
            A::P(vnew),
            A::P(kc),
            A::P(vc),
            A::P(self.meta_ptr(ml.pos)),
            A::P(self.meta_ptr(ml.seq)),
            A::P(self.meta_ptr(ml.p0)),
            A::P(self.meta_ptr(ml.rs)),
        ];
        let [caps, offs, rows_per_seq, sink] = self.ring_args(layer);
        let heads = [
            A::I(g as i32),
            A::I(cfg.n_head as i32),
            A::I(hk as i32),
            caps,
            offs,
            rows_per_seq,
            sink,
        ];
        if self.mats.exact && !kq8 && !vq8 {
            // One warp per (token, query head); the regime follows the batch size as on the CPU.
            // Grid and arguments depend on the batch shape only, so decode graphs capture it.
            let tiled = n >= crate::backend::cpu::ggml_attn::TILED_MIN_BATCH;
            args.extend(heads);
            args.extend([A::I(i32::from(tiled)), A::F(scale), A::P(self.act(out))]);
            self.gpu.launch(
                &self.k.attn_exact[usize::from(cfg.head_dim == 128)],
                lcfg((n as u32, cfg.n_head as u32, 1), 32),
                &args,
            )?;
            if !store_now {
                self.store_f16_rows(layer, n)?;
            }
            return Ok(false);
        }
        args.push(A::P(self.meta_ptr(ml.tiles)));
        args.extend(heads);
        // Splits depend only on the layout, the batch shape and the key reach (a power of two),
        // so a decode step's launches are the same for every step of one graph key and can be
        // replayed as a CUDA graph. Up to ATT_MIN_PER reachable keys run unsplit: no merge.
        let max_keys = (0..hk)
            .map(|h| self.layout.capacity(layer, h))
            .max()
            .unwrap_or(1)
            .min(self.layout.n_ctx)
            .min(self.key_reach);
        let pairs = self.n_tiles * hk;
        let per_pair = if self.att_split_floor {
            self.att_target_blocks / pairs
        } else {
            self.att_target_blocks.div_ceil(pairs)
        };
        let mut n_split = per_pair.min(max_keys.div_ceil(ATT_MIN_PER)).max(1);
        n_split = n_split.min(MERGE_MAX_SPLIT);
        while n_split > 1 && n * cfg.n_head * n_split > PART_ROWS {
            n_split -= 1;
        }
        // Prefill: each warp owns 16 of 64 query rows; decode: the warps split the keys of up
        // to 16 rows.
        let prefill = n > MV_MAXT;
        let f = self.k.attn_kernel(prefill, cfg.head_dim, types);
        // The output in q8_1 for the output projection as well: from the merge when split,
        // else from the decode kernel itself.
        let quantized = q8_out && (n_split > 1 || !prefill);
        let (yq, yds) = if quantized {
            self.mats.q8_ptrs()
        } else {
            (0, 0)
        };
        let (kq, kds) = if n_split == 1 { (yq, yds) } else { (0, 0) };
        args.extend([
            A::I(n_split as i32),
            A::F(scale),
            A::P(self.act(out)),
            A::P(self.part.ptr),
            A::P(kq),
            A::P(kds),
        ]);
        let mut lc = lcfg((self.n_tiles as u32, hk as u32, n_split as u32), 128);
        lc.shared_mem_bytes = f.smem as u32;
        self.gpu.launch_pdl(&f.func, lc, &args)?;
        if n_split > 1 {
            // Few rows with many splits (decode) take a thread group per quarter of the splits.
            let (merge, groups) = if n_split >= 4 * MERGE_GROUPS {
                (&self.k.attn_merge_wide, MERGE_GROUPS)
            } else {
                (&self.k.attn_merge, 1)
            };
            let mut args = vec![
                A::P(self.part.ptr),
                A::I(n_split as i32),
                A::I(cfg.head_dim as i32),
                A::P(self.act(out)),
                A::P(yq),
                A::P(yds),
            ];
            args.extend(merge_pf.args());
            self.gpu.launch_pdl(
                merge,
                lcfg(
                    ((n * cfg.n_head) as u32 + merge_pf.blocks, 1, 1),
                    (groups * cfg.head_dim) as u32,
                ),
                &args,
            )?;
        }
        if store_now {
            return Ok(quantized);
        }
        if kq8 || vq8 {
            self.store_rows(layer, n, [(knew, types.k), (vnew, types.v)])?;
            return Ok(quantized);
        }
        self.store_f16_rows(layer, n)?;
        Ok(quantized)
    }

    /// Copies the batch's f16 staging rows of K and V (`k16`, `v16`) into layer `layer`'s cache
    /// ring (`kv_store`).
    fn store_f16_rows(&self, layer: usize, n: usize) -> Result<(), BackendError> {
        let cfg = &self.model.config;
        let ml = meta_layout(self.max_batch, cfg.rope.n_rot / 2);
        let hk = cfg.n_head_kv;
        let (kc, vc) = (self.kv[layer].0.ptr, self.kv[layer].1.ptr);
        let chunks = n * hk * (cfg.head_dim / 8);
        let mut args = vec![
            A::P(self.k16.ptr),
            A::P(self.v16.ptr),
            A::I(n as i32),
            A::I(hk as i32),
            A::I(cfg.head_dim as i32),
            A::P(self.meta_ptr(ml.pos)),
            A::P(self.meta_ptr(ml.seq)),
            A::P(self.meta_ptr(ml.last)),
        ];
        args.extend(self.ring_args(layer));
        args.extend([A::P(kc), A::P(vc)]);
        self.gpu.launch(&self.k.kv_store, cfg_1d(chunks), &args)?;
        Ok(())
    }

    /// Copies the batch's staged K and V rows (`(staging buffer, type)` each) into layer
    /// `layer`'s cache ring, one launch per part (kv_store_rows: any row format).
    fn store_rows(
        &self,
        layer: usize,
        n: usize,
        parts: [(u64, KvType); 2],
    ) -> Result<(), BackendError> {
        let cfg = &self.model.config;
        let ml = meta_layout(self.max_batch, cfg.rope.n_rot / 2);
        let hk = cfg.n_head_kv;
        let caches = [self.kv[layer].0.ptr, self.kv[layer].1.ptr];
        for ((stage, ty), cache) in parts.into_iter().zip(caches) {
            let row_words = ty.bytes_for(cfg.head_dim) / 4;
            let mut args = vec![
                A::P(stage),
                A::I(row_words as i32),
                A::I(n as i32),
                A::I(hk as i32),
                A::P(self.meta_ptr(ml.pos)),
                A::P(self.meta_ptr(ml.seq)),
                A::P(self.meta_ptr(ml.last)),
            ];
            args.extend(self.ring_args(layer));
            args.push(A::P(cache));
            self.gpu
                .launch(&self.k.kv_store_rows, cfg_1d(n * hk * row_words), &args)?;
        }
        Ok(())
    }

    fn run_op(&mut self, op: &Op, batch: &Batch) -> Result<(), BackendError> {
        let model = Arc::clone(&self.model);
        let cfg = &model.config;
        let n = batch.len();
        let ml = meta_layout(self.max_batch, cfg.rope.n_rot / 2);
        match *op {
            Op::Embed { table, out } => {
                let wt = &model.weights.table[table];
                let buf = self.weight_bufs[self.buf_of[table]].ptr;
                let groups = n * wt.cols / 32;
                self.gpu.launch(
                    &self.embed_fn,
                    cfg_1d(groups),
                    &[
                        A::P(buf),
                        A::P(wt.row_bytes() as u64),
                        A::I(wt.cols as i32),
                        A::P(self.meta_ptr(ml.tokens)),
                        A::I(n as i32),
                        A::P(self.act(out)),
                    ],
                )?;
                self.act_version[out] += 1;
            }
            Op::RmsNorm { x, w, eps, out } => self.norm(None, x, w, eps, out, &[], n)?,
            Op::MatMul { w, x, out } => {
                let width = model.graph.acts[x].width;
                let ow = model.graph.acts[out].width;
                let a = MatArgs {
                    x: self.act(x),
                    ldx: width,
                    n,
                    out: self.act(out),
                    ldo: ow,
                };
                self.matmul(w, a, self.act_version[x])?;
                self.act_version[out] += 1;
            }
            Op::Rope {
                x,
                n_heads,
                head_dim,
            } => {
                let half = cfg.rope.n_rot / 2;
                self.gpu.launch(
                    &self.k.rope,
                    cfg_1d(n * n_heads * half),
                    &[
                        A::P(self.act(x)),
                        A::I(n as i32),
                        A::I(n_heads as i32),
                        A::I(head_dim as i32),
                        A::I(half as i32),
                        A::P(self.meta_ptr(ml.cs)),
                    ],
                )?;
                self.act_version[x] += 1;
            }
            Op::Attention {
                layer,
                q,
                k,
                v,
                out,
            } => {
                self.attention(layer, q, k, v, out, batch, None, false, false)?;
                self.act_version[out] += 1;
            }
            Op::SwiGlu { gate, up } => {
                let len = n * model.graph.acts[gate].width;
                self.gpu.launch(
                    &self.k.swiglu,
                    cfg_1d(len),
                    &[A::P(self.act(gate)), A::P(self.act(up)), A::I(len as i32)],
                )?;
                self.act_version[gate] += 1;
            }
            Op::Add { x, y } => {
                let len = n * model.graph.acts[x].width;
                self.gpu.launch(
                    &self.k.add,
                    cfg_1d(len),
                    &[A::P(self.act(x)), A::P(self.act(y)), A::I(len as i32)],
                )?;
                self.act_version[x] += 1;
            }
            Op::Logits { w, x } => {
                let m = self.n_logits;
                if m == 0 {
                    return Ok(());
                }
                let width = model.graph.acts[x].width;
                self.gpu.launch(
                    &self.k.gather_rows,
                    cfg_1d(m * width),
                    &[
                        A::P(self.act(x)),
                        A::P(self.meta_ptr(ml.lrows)),
                        A::I(m as i32),
                        A::I(width as i32),
                        A::P(self.logit_x.ptr),
                    ],
                )?;
                self.mats.invalidate();
                let a = MatArgs {
                    x: self.logit_x.ptr,
                    ldx: width,
                    n: m,
                    out: self.logits_d.ptr,
                    ldo: cfg.n_vocab,
                };
                self.matmul(w, a, 0)?;
                self.mats.invalidate();
            }
        }
        Ok(())
    }

    /// Whether `op` is a decode product that reads `x` from the q8_1 buffer.
    fn reads_q8(&self, op: Option<&Op>, x: ActId, n: usize) -> bool {
        match op {
            Some(&Op::MatMul { w, x: x2, .. }) if x2 == x && n <= MV_MAXT => self.matrices[w]
                .as_ref()
                .is_some_and(|m| !matmul::is_float(m.ty) && self.mats.can_hold_q8(n, m.cols)),
            _ => false,
        }
    }

    /// The q8_K layout family when `op` is a decode product of `n` tokens on the K-quant
    /// tensor-core path (its input can then be written in that layout by the kernel before it).
    fn q8k_next(&self, op: Option<&Op>, x: ActId, n: usize) -> Option<i32> {
        match op {
            Some(&Op::MatMul { w, x: x2, .. }) if x2 == x && n <= MV_MAXT => self.matrices[w]
                .as_ref()
                .and_then(|m| matmul::q8k_family(m, n, self.gpu.sms)),
            _ => None,
        }
    }

    /// The L2 prefetch of the decode products of `x` that start `after` (up to three of one
    /// input); none when `MOA_L2_PF` is off or the step is a prefill.
    fn prefetch_next(&self, after: &[Op], x: ActId, n: usize) -> Prefetch {
        if self.l2_pf.budget == 0 || n > MV_MAXT {
            return Prefetch::default();
        }
        let mats: Vec<&matmul::GpuMatrix> = after
            .iter()
            .map_while(|op| match *op {
                Op::MatMul { w, x: x2, .. } if x2 == x => self.matrices[w].as_ref(),
                _ => None,
            })
            .collect();
        self.l2_pf.plan(&mats)
    }

    /// `x += y` (when given), `out = rms_norm(x) * w`, and `out` as q8_1 when the next op
    /// (`after[0]`) is a decode product reading it: one launch.
    #[allow(clippy::too_many_arguments)]
    fn norm(
        &mut self,
        y: Option<ActId>,
        x: ActId,
        w: usize,
        eps: f32,
        out: ActId,
        after: &[Op],
        n: usize,
    ) -> Result<(), BackendError> {
        let next = after.first();
        let pf = self.prefetch_next(after, out, n);
        let width = self.model.graph.acts[x].width;
        // The next product's input as q8_K in the mma layout (K-quant tensor cores), else q8_1.
        let fam = if width.is_multiple_of(256) {
            self.q8k_next(next, out, n)
        } else {
            None
        };
        let q8 = fam.is_none() && width.is_multiple_of(32) && self.reads_q8(next, out, n);
        let (yq, yds) = if q8 { self.mats.q8_ptrs() } else { (0, 0) };
        let (yq_m, ysc) = if fam.is_some() {
            self.mats.mma_ptrs()
        } else {
            (0, 0)
        };
        let wv = self.vectors[w].as_ref().expect("norm prepared").ptr;
        let (threads, variant) = norm_shape(width);
        let mut args = vec![
            A::P(self.act(x)),
            A::P(y.map_or(0, |y| self.act(y))),
            A::P(wv),
            A::F(eps),
            A::I(width as i32),
            A::P(self.act(out)),
            A::P(yq),
            A::P(yds),
            A::I(fam.unwrap_or(0)),
            A::P(yq_m),
            A::P(ysc),
        ];
        args.extend(pf.args());
        let kernels = if fam.is_some() {
            &self.k.add_rms_norm_q8k
        } else {
            &self.k.add_rms_norm_q8
        };
        self.gpu.launch_pdl(
            &kernels[variant],
            lcfg((n as u32 + pf.blocks, 1, 1), threads),
            &args,
        )?;
        if y.is_some() {
            self.act_version[x] += 1;
        }
        self.act_version[out] += 1;
        if q8 {
            self.mats
                .mark_quantized(self.act(out), self.act_version[out]);
        }
        if let Some(f) = fam {
            self.mats.mark_q8k(self.act(out), self.act_version[out], f);
        }
        Ok(())
    }

    /// RoPE on q and k, the K/V staging and store, and attention (the ops RoPE q, RoPE k,
    /// Attention); `after`: the ops after them. With `staged` the layer-tail kernel already did
    /// the RoPE, staging and store. RoPE (or its prefetch blocks) fetches the output
    /// projection's weights into L2 meanwhile.
    fn rope_attention(
        &mut self,
        after: &[Op],
        r: layer_tail::RopeOps,
        batch: &Batch,
        staged: bool,
    ) -> Result<(), BackendError> {
        let n = batch.len();
        let q8 = self.reads_q8(after.first(), r.out, n);
        let pf = self.prefetch_next(after, r.out, n);
        let quantized = self.attention(
            r.layer,
            r.q,
            r.k,
            r.v,
            r.out,
            batch,
            Some((r.q, r.k, pf)),
            q8,
            staged,
        )?;
        self.act_version[r.q] += 1;
        self.act_version[r.k] += 1;
        self.act_version[r.out] += 1;
        if quantized {
            self.mats
                .mark_quantized(self.act(r.out), self.act_version[r.out]);
        }
        Ok(())
    }

    /// Executes the ops, fusing the patterns the llama graph has: residual add + norm (+ q8_1,
    /// or q8_K in the mma layout), products of one input (q/k/v, gate/up), RoPE + f16 staging
    /// (+ cache store) before attention, SwiGLU + q8_1 (or q8_K) before the down projection.
    fn run_ops(&mut self, ops: &[Op], batch: &Batch) -> Result<(), BackendError> {
        let n = batch.len();
        let mut i = 0;
        while i < ops.len() {
            if n == 1 && self.tail_on && !self.mats.exact {
                if let Some(span) = self.tail.as_ref().and_then(|t| t.span_at(i)) {
                    // Only with the attention output in the q8_1 buffer (the attention or its
                    // merge wrote it there).
                    if self
                        .mats
                        .holds_q8(self.act(span.att), self.act_version[span.att])
                    {
                        let span = span.clone();
                        // The next layer's RoPE and K/V store too, with an f16 cache.
                        let rope = span
                            .rope
                            .filter(|_| self.layout.types() == KvTypes::default());
                        let rope_args = rope.map(|r| self.rope_args(r.layer));
                        let tail = self.tail.as_ref().expect("span of a layer tail");
                        // The last layer's span computes the logits row when there is one.
                        let logits = span.logits && self.n_logits == 1;
                        tail.launch(&self.gpu, &span, rope_args.as_ref(), logits)?;
                        for &a in &span.writes {
                            self.act_version[a] += 1;
                        }
                        self.mats.invalidate();
                        i += span.n_ops + if logits { 2 } else { 0 };
                        if let Some(r) = rope {
                            // Then attention (ops i, i + 1 are the RoPE ops the kernel did).
                            self.rope_attention(&ops[i + 3..], r, batch, true)?;
                            i += 3;
                        }
                        continue;
                    }
                }
            }
            match ops[i] {
                Op::Add { x, y } => {
                    if let Some(&Op::RmsNorm {
                        x: x2, w, eps, out, ..
                    }) = ops.get(i + 1)
                    {
                        if x2 == x {
                            self.norm(Some(y), x, w, eps, out, &ops[i + 2..], n)?;
                            i += 2;
                            continue;
                        }
                    }
                    self.run_op(&ops[i], batch)?;
                    i += 1;
                }
                Op::RmsNorm { x, w, eps, out } => {
                    self.norm(None, x, w, eps, out, &ops[i + 1..], n)?;
                    i += 1;
                }
                Op::MatMul { x, .. } => {
                    // Up to three products of the same input (q/k/v, gate/up) go together.
                    let mut group = [(0usize, 0u64, 0usize); 3];
                    let mut k = 0;
                    while k < 3 {
                        match ops.get(i + k) {
                            Some(&Op::MatMul { w, x: x2, out }) if x2 == x && out != x => {
                                group[k] = (w, self.act(out), self.model.graph.acts[out].width);
                                k += 1;
                            }
                            _ => break,
                        }
                    }
                    let width = self.model.graph.acts[x].width;
                    let t: [(&GpuMatrix, u64, usize); 3] = std::array::from_fn(|j| {
                        let (w, o, l) = group[j.min(k - 1)];
                        (self.matrices[w].as_ref().expect("matrix prepared"), o, l)
                    });
                    matmul::matmul_multi(
                        &self.gpu,
                        &self.k,
                        &self.blas,
                        &mut self.mats,
                        &t[..k],
                        self.acts[x].ptr,
                        width,
                        n,
                        self.act_version[x],
                    )?;
                    for j in 0..k {
                        let Op::MatMul { out, .. } = ops[i + j] else {
                            unreachable!("the group holds MatMul ops")
                        };
                        self.act_version[out] += 1;
                    }
                    i += k;
                }
                Op::Rope { x: q, .. } => {
                    if let (
                        Some(&Op::Rope { x: k, .. }),
                        Some(&Op::Attention {
                            layer,
                            q: q2,
                            k: k2,
                            v,
                            out,
                        }),
                    ) = (ops.get(i + 1), ops.get(i + 2))
                    {
                        if q2 == q && k2 == k {
                            let r = layer_tail::RopeOps {
                                layer,
                                q,
                                k,
                                v,
                                out,
                            };
                            self.rope_attention(&ops[i + 3..], r, batch, false)?;
                            i += 3;
                            continue;
                        }
                    }
                    self.run_op(&ops[i], batch)?;
                    i += 1;
                }
                Op::SwiGlu { gate, up } if self.reads_q8(ops.get(i + 1), gate, n) => {
                    let width = self.model.graph.acts[gate].width;
                    // SwiGLU fetches the down projection's weights into L2 meanwhile.
                    let pf = self.prefetch_next(&ops[i + 1..], gate, n);
                    if let Some(fam) = self.q8k_next(ops.get(i + 1), gate, n) {
                        // The down projection takes q8_K on the tensor cores: written here.
                        let (yq_m, ysc) = self.mats.mma_ptrs();
                        let mut args = vec![
                            A::P(self.act(gate)),
                            A::P(self.act(up)),
                            A::I(width as i32),
                            A::I(n as i32),
                            A::I(fam),
                            A::P(yq_m),
                            A::P(ysc),
                        ];
                        args.extend(pf.args());
                        self.gpu.launch_pdl(
                            &self.k.swiglu_q8k,
                            lcfg((blocks(width / 256 * n, 8) + pf.blocks, 1, 1), 256),
                            &args,
                        )?;
                        self.act_version[gate] += 1;
                        self.mats
                            .mark_q8k(self.act(gate), self.act_version[gate], fam);
                        i += 1;
                        continue;
                    }
                    let (yq, yds) = self.mats.q8_ptrs();
                    let mut args = vec![
                        A::P(self.act(gate)),
                        A::P(self.act(up)),
                        A::I(width as i32),
                        A::I(n as i32),
                        A::P(yq),
                        A::P(yds),
                    ];
                    args.extend(pf.args());
                    self.gpu.launch_pdl(
                        &self.k.swiglu_q8,
                        lcfg((blocks(n * width / 32, 8) + pf.blocks, 1, 1), 256),
                        &args,
                    )?;
                    self.act_version[gate] += 1;
                    self.mats
                        .mark_quantized(self.act(gate), self.act_version[gate]);
                    i += 1;
                }
                _ => {
                    self.run_op(&ops[i], batch)?;
                    i += 1;
                }
            }
        }
        Ok(())
    }

    /// Runs the forward step on the device without copying logits back.
    fn forward_device(&mut self, batch: &Batch) -> Result<(), BackendError> {
        validate_batch(
            batch,
            |s| self.seq_len[s],
            &self.layout,
            self.max_batch,
            self.max_logits,
            self.model.config.n_vocab,
        )?;
        self.upload_meta(batch)?;
        self.mats.invalidate();
        let model = Arc::clone(&self.model);
        // Decode-sized steps replay a CUDA graph of the whole step (one launch instead of a
        // few hundred); every per-step value lives in the metadata buffer uploaded above.
        self.key_reach = batch
            .positions
            .iter()
            .map(|&p| p as usize + 1)
            .max()
            .unwrap_or(1)
            .next_power_of_two();
        let key = (batch.len(), self.n_logits, self.n_tiles, self.key_reach);
        if self.use_graphs && batch.len() <= MV_MAXT {
            if !self.graphs.contains_key(&key) {
                let stream = Arc::clone(&self.gpu.stream);
                stream
                    .begin_capture(
                        cudarc::driver::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
                    )
                    .map_err(|e| device::driver_err("starting a graph capture", e))?;
                let result = self.run_ops(&model.graph.ops, batch);
                let graph = stream
                    .end_capture(cudarc::driver::sys::CUgraphInstantiate_flags(0))
                    .map_err(|e| device::driver_err("capturing the decode graph", e))?;
                result?;
                let graph = graph.ok_or_else(|| {
                    BackendError::Device("the decode graph capture came back empty".into())
                })?;
                self.graphs.insert(key, graph);
            }
            self.graphs[&key]
                .launch()
                .map_err(|e| device::driver_err("launching the decode graph", e))?;
        } else {
            self.run_ops(&model.graph.ops, batch)?;
        }
        for (seq, _, len) in batch.runs() {
            self.seq_len[seq as usize] += len;
        }
        Ok(())
    }

    /// Greedy tokens of the last forward step's logit rows, computed on the device (only
    /// `4 * rows` bytes come back instead of the logits).
    pub fn argmax(&mut self) -> Result<Vec<u32>, BackendError> {
        let m = self.n_logits;
        if m == 0 {
            return Ok(Vec::new());
        }
        self.gpu.launch(
            &self.k.argmax_rows,
            lcfg((m as u32, 1, 1), 1024),
            &[
                A::P(self.logits_d.ptr),
                A::I(self.model.config.n_vocab as i32),
                A::P(self.argmax_d.ptr),
            ],
        )?;
        let mut out = vec![0u32; m];
        self.gpu.download(&mut out, &self.argmax_d)?;
        Ok(out)
    }

    /// Runs a forward step and returns the greedy tokens without downloading logits.
    pub fn forward_greedy(&mut self, batch: &Batch) -> Result<Vec<u32>, BackendError> {
        self.forward_device(batch)?;
        self.argmax()
    }
}

impl Backend for CudaBackend {
    fn describe(&self) -> String {
        format!("cuda ({})", self.device_name())
    }

    fn forward(&mut self, batch: &Batch) -> Result<(), BackendError> {
        self.forward_device(batch)?;
        let nv = self.model.config.n_vocab;
        let m = self.n_logits;
        if m > 0 {
            let (dst, src) = (&mut self.logits[..m * nv], &self.logits_d);
            self.gpu.download(dst, src)?;
        } else {
            self.gpu.sync()?;
        }
        Ok(())
    }

    fn logits(&self) -> &[f32] {
        &self.logits[..self.n_logits * self.model.config.n_vocab]
    }

    fn n_vocab(&self) -> usize {
        self.model.config.n_vocab
    }

    fn seq_len(&self, seq: usize) -> usize {
        self.seq_len[seq]
    }

    fn clear(&mut self, seq: usize) {
        self.seq_len[seq] = 0;
    }

    fn rewind(&mut self, seq: usize, len: usize) {
        self.seq_len[seq] = self.seq_len[seq].min(len);
    }

    fn kv_layout(&self) -> &KvLayout {
        &self.layout
    }

    fn kv_bytes(&self) -> usize {
        self.layout.bytes()
    }

    /// Layers whose cache buffers are too small for `layout` get new ones, one layer at a time
    /// (the new buffer before the old is freed, so running out of memory leaves buffers that
    /// still hold the old layout); then the head tables are uploaded and the captured decode
    /// graphs dropped (they hold the old buffers and splits). Weights and scratch stay on the
    /// device. The same layout again only empties the sequences (graphs kept).
    fn replan(&mut self, layout: &KvLayout) -> Result<bool, BackendError> {
        let cfg = &self.model.config;
        if (layout.n_layer, layout.n_head_kv, layout.head_dim)
            != (cfg.n_layer, cfg.n_head_kv, cfg.head_dim)
            || layout.types() != self.layout.types()
        {
            return Ok(false);
        }
        if *layout != self.layout {
            let (hd, types) = (cfg.head_dim, layout.types());
            for l in 0..cfg.n_layer {
                let rows = layout.rows_per_layer(l);
                if kv_buffer_bytes(rows, hd, types.k) > self.kv[l].0.bytes
                    || kv_buffer_bytes(rows, hd, types.v) > self.kv[l].1.bytes
                {
                    self.kv[l] = alloc_layer_kv(&self.gpu, layout, l)?;
                }
            }
            let (caps, offs) = head_tables(layout);
            self.gpu.upload(&self.caps, &caps)?;
            self.gpu.upload(&self.offs, &offs)?;
            self.gpu.sync()?;
            self.graphs.clear();
            self.layout = layout.clone();
        }
        self.seq_len = vec![0; layout.n_seq];
        self.n_logits = 0;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_sections_are_8_byte_aligned_for_any_batch() {
        for b in 1..40 {
            let ml = meta_layout(b, 3);
            for off in [
                ml.tokens, ml.pos, ml.seq, ml.p0, ml.rs, ml.lrows, ml.last, ml.tiles, ml.cs,
            ] {
                assert_eq!(off % 2, 0, "batch {b}: section at word {off}");
            }
            assert!(ml.words >= ml.cs + 2 * b * 3);
        }
    }

    #[test]
    fn norm_shape_picks_the_smallest_kernel_that_holds_the_row() {
        assert_eq!(norm_shape(576), (160, 0));
        assert_eq!(norm_shape(4096), (1024, 0));
        assert_eq!(norm_shape(5000), (1024, 1));
        assert_eq!(norm_shape(8192), (1024, 1));
        assert_eq!(norm_shape(16384), (1024, 2));
        for w in (32..=16384).step_by(32) {
            let (t, v) = norm_shape(w);
            assert!(t as usize * [4, 8, 16][v] >= w, "width {w}");
        }
    }
}
