//! The batch-1 decode step's layer tail as one persistent kernel (`layer_tail` in
//! cuda/layer_tail.cu): finds the spans of the graph it can run (output projection, residual
//! add, FFN norm, gate/up, SwiGLU, down projection, residual add, and the next layer's norm and
//! q/k/v products), writes their phase tables to the device once, and launches one kernel per
//! span instead of seven.
//!
//! With an f16 cache the kernel also does the next layer's RoPE, K/V staging and cache store
//! (rope_kv's work) per head, so attention follows it directly (`MOA_TL_ROPE=0`: rope_kv runs).
//!
//! `MOA_LAYER_TAIL=1` runs it for one-token steps (default [`DEFAULT_ON`]); `0` does not build
//! it at all.
//! `MOA_TL_TILE` sets the bytes of weight rows per tile (default [`TILE`]), `MOA_TL_BUFS` the
//! tile buffers per block (default [`BUFS`]) and `MOA_TL_BLOCKS` the blocks per multiprocessor
//! (default [`BLOCKS_PER_SM`], at most what fits), `MOA_TL_ACCOUNT` how often a block adds its
//! tiles to their groups' counters (0, the default: once per phase, after its last tile of the
//! phase; N: every N tiles, 1 being the first version's once per tile), `MOA_TL_PREFETCH` how
//! many of a block's tiles past those in its buffers it asks L2 for (default [`PREFETCH`]; 0:
//! none).

use std::collections::HashMap;

use cudarc::driver::CudaFunction;
use ggml_compat::GgmlType;

use super::device::{lcfg, DevBuf, Gpu, A};
use super::matmul::{units_per_row, GpuMatrix};
use crate::backend::BackendError;
use crate::graph::{ActId, Op};

/// Whether one-token steps take the kernel without being asked: `MOA_LAYER_TAIL=1` turns it on,
/// `0` off (nothing built then); the default is [`DEFAULT_ON`].
pub fn on_by_default() -> bool {
    match std::env::var("MOA_LAYER_TAIL").as_deref() {
        Ok("1") => true,
        Ok("0") => false,
        _ => DEFAULT_ON,
    }
}

/// Off until it measures faster than the separate kernels (see docs/cuda-sessions.md, nineteenth and twentieth sessions).
pub const DEFAULT_ON: bool = false;

/// Target bytes of weight rows per tile (the streamed one-token kernel's default).
pub const TILE: usize = 8 << 10;
/// Most rows per tile (a group of 32 rows then spans at most two tiles' worth of counters).
const TILE_ROWS: usize = 16;
/// Widest input a phase may take (it is copied into shared memory as int8 plus scales).
const MAX_K: usize = 16384;
/// Tile buffers per block by default (`MOA_TL_BUFS`, 2 to 4): tiles in flight while one is
/// computed, plus one.
pub const BUFS: usize = 2;
/// Tiles past its buffers' a block asks L2 for by default (`MOA_TL_PREFETCH`): with 4 blocks of
/// 8 KiB tiles per multiprocessor, about 17 MB of the 50 MB L2 on an H100/H200, what 5 us of
/// the step's bandwidth moves, so the weights keep streaming through a phase boundary.
pub const PREFETCH: usize = 4;
/// Blocks per multiprocessor by default.
pub const BLOCKS_PER_SM: usize = 4;
const THREADS: u32 = 128;
const MAX_PHASES: usize = 4;

// Epilogues and input kinds (TL_* in layer_tail.cu).
const EPI_STORE: u64 = 0;
const EPI_RESID: u64 = 1;
const EPI_RESID_NORM: u64 = 2;
const EPI_SWIGLU: u64 = 3;
const EPI_ROPE: u64 = 4;
const IN_PREV_KERNEL: u64 = 0;
const IN_Q8: u64 = 1;
const IN_NORM: u64 = 2;

/// u64 words of `TlMat`, `TlPhase` and `TlDesc` (every field 8 bytes).
const MAT_WORDS: usize = 8;
const PHASE_WORDS: usize = 3 * MAT_WORDS + 3 + 6 + 3 + 3 + 4;
const DESC_WORDS: usize = MAX_PHASES * PHASE_WORDS + 4;

/// One fused span of the graph: ops `first..first + n_ops`.
#[derive(Clone, Debug)]
pub struct Span {
    pub n_ops: usize,
    /// The attention output it reads from the q8_1 buffer.
    pub att: ActId,
    /// Activations the span writes (their versions move on).
    pub writes: Vec<ActId>,
    /// The next layer's RoPE and attention ops after the span, whose RoPE and K/V staging
    /// and store the kernel can do ([`LayerTail::launch`] with `rope`).
    pub rope: Option<RopeOps>,
    /// The last layer's span has a fourth phase, the final norm and the output matrix into
    /// the logits (one row), run when the step wants logits: the two ops after the span.
    pub logits: bool,
    desc: usize,
}

/// A matrix of a phase: weights, output, shape.
struct PhaseMat {
    m: (u64, GgmlType, usize, usize, usize),
    out: u64,
}

/// A phase as the kernel's table wants it.
struct Phase {
    mats: Vec<PhaseMat>,
    in_kind: u64,
    k: usize,
    yq: u64,
    yds: u64,
    ss: u64,
    eps: f32,
    epi: u64,
    h: u64,
    nw: u64,
    out_q: (u64, u64, u64),
    /// Counters: group counters, target per group, groups, phase counter.
    gcnt: u64,
    group_target: u64,
    n_groups: u64,
    pcnt: u64,
}

/// The fused spans and what their kernel needs.
pub struct LayerTail {
    func: CudaFunction,
    spans: HashMap<usize, Span>,
    desc: DevBuf,
    _counters: DevBuf,
    _inputs: DevBuf,
    grid: u32,
    smem: u32,
    tile_words: i32,
    nbuf: i32,
    acct_every: i32,
    pf_tiles: i32,
}

/// Whether a matrix can be a phase's: a quantized type the kernel computes, rows of whole
/// 16-byte pieces, inputs in q8_1 blocks.
fn fits(m: &GpuMatrix) -> bool {
    matches!(
        m.ty,
        GgmlType::Q4_0
            | GgmlType::Q4_1
            | GgmlType::Q5_0
            | GgmlType::Q5_1
            | GgmlType::Q8_0
            | GgmlType::Q4_K
            | GgmlType::Q5_K
            | GgmlType::Q6_K
    ) && m.row_bytes.is_multiple_of(16)
        && m.cols.is_multiple_of(32)
        && m.cols <= MAX_K
        && m.row_bytes <= 32 << 10
}

fn reads(op: &Op) -> Vec<ActId> {
    match *op {
        Op::Embed { .. } => vec![],
        Op::RmsNorm { x, .. } | Op::MatMul { x, .. } | Op::Rope { x, .. } => vec![x],
        Op::Attention { q, k, v, .. } => vec![q, k, v],
        Op::SwiGlu { gate, up } => vec![gate, up],
        Op::Add { x, y } => vec![x, y],
        Op::Logits { x, .. } => vec![x],
    }
}

fn writes(op: &Op) -> Vec<ActId> {
    match *op {
        Op::Embed { out, .. }
        | Op::RmsNorm { out, .. }
        | Op::MatMul { out, .. }
        | Op::Attention { out, .. } => vec![out],
        Op::Rope { x, .. } | Op::Add { x, .. } => vec![x],
        Op::SwiGlu { gate, .. } => vec![gate],
        Op::Logits { .. } => vec![],
    }
}

/// Whether `act` is dead after op `end` (its next use, if any, writes it first).
fn dead_after(ops: &[Op], end: usize, act: ActId) -> bool {
    for op in &ops[end..] {
        if reads(op).contains(&act) {
            return false;
        }
        if writes(op).contains(&act) {
            return true;
        }
    }
    true
}

/// The span starting at op `i`, if the ops there are the llama layer tail: (output projection
/// weight, attention output, residual, FFN norm (weight, eps), gate, up, down, the next layer's
/// norm (weight, eps) and q/k/v products, if present, and the number of ops).
#[allow(clippy::type_complexity)]
struct Match {
    wo: usize,
    att: ActId,
    h: ActId,
    ffn_norm: (usize, f32),
    gate: (usize, ActId),
    up: (usize, ActId),
    down: usize,
    next: Option<((usize, f32), Vec<(usize, ActId)>)>,
    /// The ops after the next q/k/v are RoPE on q, on k, then attention of q/k/v: the layer
    /// and the attention's q, k, v and output.
    rope: Option<RopeOps>,
    /// The last layer: the final norm (weight, eps) and the output matrix follow.
    logits: Option<((usize, f32), usize)>,
    n_ops: usize,
    dead: Vec<ActId>,
}

/// The attention op (and its two RoPE ops before it) after a span's q/k/v.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RopeOps {
    pub layer: usize,
    pub q: ActId,
    pub k: ActId,
    pub v: ActId,
    pub out: ActId,
}

/// The parts of a product op.
fn matmul_op(op: Option<&Op>) -> Option<(usize, ActId, ActId)> {
    match *op? {
        Op::MatMul { w, x, out } => Some((w, x, out)),
        _ => None,
    }
}

/// The parts of a residual add op.
fn add_op(op: Option<&Op>) -> Option<(ActId, ActId)> {
    match *op? {
        Op::Add { x, y } => Some((x, y)),
        _ => None,
    }
}

/// The parts of a norm op: input, weight, eps, output.
fn norm_op(op: Option<&Op>) -> Option<(ActId, usize, f32, ActId)> {
    match *op? {
        Op::RmsNorm { x, w, eps, out } => Some((x, w, eps, out)),
        _ => None,
    }
}

fn match_at(ops: &[Op], i: usize) -> Option<Match> {
    let (wo, att, proj) = matmul_op(ops.get(i))?;
    let (h, y) = add_op(ops.get(i + 1))?;
    let (h2, nw2, eps2, xn) = norm_op(ops.get(i + 2))?;
    let (wg, xg, gate) = matmul_op(ops.get(i + 3))?;
    let (wu, xu, up) = matmul_op(ops.get(i + 4))?;
    let Some(&Op::SwiGlu { gate: g2, up: u2 }) = ops.get(i + 5) else {
        return None;
    };
    let (wd, xd, proj2) = matmul_op(ops.get(i + 6))?;
    let (h3, y3) = add_op(ops.get(i + 7))?;
    let distinct = [h, proj, xn, gate, up, att];
    let all_distinct = distinct
        .iter()
        .enumerate()
        .all(|(a, x)| distinct[a + 1..].iter().all(|y| y != x));
    if y != proj
        || h2 != h
        || xg != xn
        || xu != xn
        || (g2, u2) != (gate, up)
        || xd != gate
        || h3 != h
        || y3 != proj2
        || proj2 == h
        || !all_distinct
    {
        return None;
    }
    let mut n_ops = 8;
    let mut next = None;
    let mut dead = vec![proj, proj2, xn, gate, up];
    if let Some((x, w, eps, out)) = norm_op(ops.get(i + 8)) {
        let mut qkv: Vec<(usize, ActId)> = Vec::new();
        while qkv.len() < 3 {
            match matmul_op(ops.get(i + 9 + qkv.len())) {
                Some((wq, xq, oq))
                    if xq == out && oq != out && oq != h && !qkv.iter().any(|&(_, o)| o == oq) =>
                {
                    qkv.push((wq, oq))
                }
                _ => break,
            }
        }
        if x == h && out != h && !qkv.is_empty() {
            n_ops = 9 + qkv.len();
            dead.push(out);
            next = Some(((w, eps), qkv));
        }
    }
    if !dead.iter().all(|&a| dead_after(ops, i + n_ops, a)) {
        return None;
    }
    let mut logits = None;
    if next.is_none() {
        if let (Some((x, w, eps, out)), Some(&Op::Logits { w: wl, x: xl })) =
            (norm_op(ops.get(i + 8)), ops.get(i + 9))
        {
            if x == h && xl == out && out != h && dead_after(ops, i + 10, out) {
                logits = Some(((w, eps), wl));
            }
        }
    }
    let mut rope = None;
    if let Some((_, qkv)) = &next {
        if let (
            Some(&Op::Rope { x: rq, .. }),
            Some(&Op::Rope { x: rk, .. }),
            Some(&Op::Attention {
                layer,
                q,
                k,
                v,
                out,
            }),
        ) = (
            ops.get(i + n_ops),
            ops.get(i + n_ops + 1),
            ops.get(i + n_ops + 2),
        ) {
            let outs: Vec<ActId> = qkv.iter().map(|&(_, o)| o).collect();
            if outs == [q, k, v] && (rq, rk) == (q, k) {
                rope = Some(RopeOps {
                    layer,
                    q,
                    k,
                    v,
                    out,
                });
            }
        }
    }
    Some(Match {
        wo,
        att,
        h,
        ffn_norm: (nw2, eps2),
        gate: (wg, gate),
        up: (wu, up),
        down: wd,
        next,
        rope,
        logits,
        n_ops,
        dead,
    })
}

/// Rows per tile of a matrix with `row_bytes` rows for a target of `tile` bytes.
fn tile_rows(row_bytes: usize, tile: usize) -> usize {
    (tile / row_bytes).clamp(1, TILE_ROWS)
}

impl LayerTail {
    /// The spans of `ops` the kernel can run with these matrices and norm vectors, and their
    /// tables on the device; None when there are none (or `MOA_LAYER_TAIL=0`). Whether steps use
    /// it is the backend's choice ([`on_by_default`], `CudaBackend::set_layer_tail`).
    #[allow(clippy::too_many_arguments)]
    pub fn build(
        gpu: &Gpu,
        func: CudaFunction,
        ops: &[Op],
        matrices: &[Option<GpuMatrix>],
        vectors: &[Option<DevBuf>],
        acts: &[DevBuf],
        att_q8: (u64, u64),
        logits_out: u64,
        head_dim: usize,
        scratch_bytes: &mut usize,
    ) -> Result<Option<LayerTail>, BackendError> {
        if std::env::var("MOA_LAYER_TAIL").is_ok_and(|v| v == "0") {
            return Ok(None);
        }
        let var = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<usize>().ok());
        let tile = var("MOA_TL_TILE").unwrap_or(TILE).max(16);
        let mut found = Vec::new();
        for i in 0..ops.len() {
            let Some(mut m) = match_at(ops, i) else {
                continue;
            };
            let mat = |w: usize| matrices[w].as_ref().filter(|m| fits(m));
            let mut ws = vec![m.wo, m.gate.0, m.up.0, m.down];
            if let Some((_, qkv)) = &m.next {
                ws.extend(qkv.iter().map(|&(w, _)| w));
            }
            let norms_ok = vectors[m.ffn_norm.0].is_some()
                && m.next
                    .as_ref()
                    .is_none_or(|((w, _), _)| vectors[*w].is_some());
            if !norms_ok || ws.iter().any(|&w| mat(w).is_none()) {
                continue;
            }
            let (wo, g, u, d) = (
                mat(m.wo).unwrap(),
                mat(m.gate.0).unwrap(),
                mat(m.up.0).unwrap(),
                mat(m.down).unwrap(),
            );
            let e = wo.rows;
            let shapes_ok = e % 32 == 0
                && g.cols == e
                && u.cols == e
                && g.rows == u.rows
                && g.rows % 32 == 0
                && d.cols == g.rows
                && d.rows == e
                && m.next
                    .as_ref()
                    .is_none_or(|(_, qkv)| qkv.iter().all(|&(w, _)| mat(w).unwrap().cols == e));
            // The logits phase where the final norm and output matrix fit (else the last
            // layer's span ends with the down projection).
            let logits_ok = m.logits.is_some_and(|((nw, _), wl)| {
                vectors[nw].is_some() && mat(wl).is_some_and(|o| o.cols == e)
            });
            if !logits_ok {
                m.logits = None;
            }
            if shapes_ok {
                found.push((i, m));
            }
        }
        if found.is_empty() {
            return Ok(None);
        }
        // Inputs formed inside the kernel: the normed residual (n_embd) and SwiGLU (n_ff).
        let e = matrices[found[0].1.wo].as_ref().unwrap().rows;
        let f = found
            .iter()
            .map(|(_, m)| matrices[m.gate.0].as_ref().unwrap().rows)
            .max()
            .unwrap_or(0);
        let inputs_bytes = e + e / 32 * 8 + e / 32 * 8 + f + f / 32 * 8;
        let inputs = gpu.alloc(inputs_bytes, "layer tail inputs")?;
        let (nq, nds, nss) = (inputs.at(0), inputs.at(e), inputs.at(e + e / 4));
        let (sq, sds) = (inputs.at(e + e / 2), inputs.at(e + e / 2 + f));
        // Counters per span: exit, 4 phase counters, then the group counters (the last phase's
        // per head of q, k and v).
        let heads = found
            .iter()
            .map(|(_, m)| {
                m.next.as_ref().map_or(0, |(_, qkv)| {
                    qkv.iter()
                        .map(|&(w, _)| matrices[w].as_ref().unwrap().rows / head_dim.max(1))
                        .sum::<usize>()
                })
            })
            .max()
            .unwrap_or(0);
        let per_span = 5 + e / 32 + f / 32 + e / 32 + heads;
        let rope_off = std::env::var("MOA_TL_ROPE").is_ok_and(|v| v == "0");
        let counters = gpu.alloc(found.len() * per_span * 4, "layer tail counters")?;
        *scratch_bytes += inputs_bytes + found.len() * per_span * 4;

        let mut words: Vec<u64> = Vec::with_capacity(found.len() * DESC_WORDS);
        let mut spans = HashMap::new();
        let mut tile_cap = 16usize;
        let mut max_k = 0usize;
        for (si, (i, m)) in found.iter().enumerate() {
            let c0 = counters.at(si * per_span * 4);
            let cnt = |word: usize| c0 + word as u64 * 4;
            let pm = |w: usize, out: u64| {
                let g = matrices[w].as_ref().unwrap();
                PhaseMat {
                    m: (g.ptr, g.ty, g.rows, g.cols, g.row_bytes),
                    out,
                }
            };
            let vec_ptr = |w: usize| vectors[w].as_ref().unwrap().ptr;
            let h = acts[m.h].ptr;
            let n_ff = matrices[m.gate.0].as_ref().unwrap().rows;
            let (g_cnt0, g_cnt1, g_cnt2) = (5, 5 + e / 32, 5 + e / 32 + n_ff / 32);
            let g_cnt3 = g_cnt2 + e / 32;
            // RoPE in the last phase: q, k, v of whole heads each.
            let rope_ok = !rope_off
                && head_dim > 0
                && m.next.as_ref().is_some_and(|(_, qkv)| {
                    qkv.len() == 3
                        && qkv.iter().all(|&(w, _)| {
                            matrices[w].as_ref().unwrap().rows.is_multiple_of(head_dim)
                        })
                })
                && m.rope.is_some();
            let mut phases = vec![
                Phase {
                    mats: vec![pm(m.wo, 0)],
                    in_kind: IN_PREV_KERNEL,
                    k: matrices[m.wo].as_ref().unwrap().cols,
                    yq: att_q8.0,
                    yds: att_q8.1,
                    ss: 0,
                    eps: 0.0,
                    epi: EPI_RESID_NORM,
                    h,
                    nw: vec_ptr(m.ffn_norm.0),
                    out_q: (nq, nds, nss),
                    gcnt: cnt(g_cnt0),
                    group_target: 32,
                    n_groups: (e / 32) as u64,
                    pcnt: cnt(1),
                },
                Phase {
                    mats: vec![
                        pm(m.gate.0, acts[m.gate.1].ptr),
                        pm(m.up.0, acts[m.up.1].ptr),
                    ],
                    in_kind: IN_NORM,
                    k: e,
                    yq: nq,
                    yds: nds,
                    ss: nss,
                    eps: m.ffn_norm.1,
                    epi: EPI_SWIGLU,
                    h: 0,
                    nw: 0,
                    out_q: (sq, sds, 0),
                    gcnt: cnt(g_cnt1),
                    group_target: 64,
                    n_groups: (n_ff / 32) as u64,
                    pcnt: cnt(2),
                },
            ];
            let mut down = Phase {
                mats: vec![pm(m.down, 0)],
                in_kind: IN_Q8,
                k: n_ff,
                yq: sq,
                yds: sds,
                ss: 0,
                eps: 0.0,
                epi: EPI_RESID,
                h,
                nw: 0,
                out_q: (0, 0, 0),
                gcnt: 0,
                group_target: 0,
                n_groups: 0,
                pcnt: cnt(3),
            };
            let mut writes = vec![m.h];
            writes.extend(m.dead.iter().copied());
            // A fourth phase on the normed residual: the next layer's q/k/v, or the logits.
            let last = if let Some(((nw, eps), qkv)) = &m.next {
                writes.extend(qkv.iter().map(|&(_, o)| o));
                let mats = qkv.iter().map(|&(w, o)| pm(w, acts[o].ptr)).collect();
                // RoPE's groups are heads.
                let (epi, target) = if rope_ok {
                    (EPI_ROPE, head_dim as u64)
                } else {
                    (EPI_STORE, 0)
                };
                Some((*nw, *eps, mats, epi, cnt(g_cnt3), target))
            } else {
                m.logits
                    .map(|((nw, eps), wl)| (nw, eps, vec![pm(wl, logits_out)], EPI_STORE, 0, 0))
            };
            if let Some((nw, eps, mats, epi, gcnt, group_target)) = last {
                down.epi = EPI_RESID_NORM;
                down.nw = vec_ptr(nw);
                down.out_q = (nq, nds, nss);
                down.gcnt = cnt(g_cnt2);
                down.group_target = 32;
                down.n_groups = (e / 32) as u64;
                phases.push(down);
                phases.push(Phase {
                    mats,
                    in_kind: IN_NORM,
                    k: e,
                    yq: nq,
                    yds: nds,
                    ss: nss,
                    eps,
                    epi,
                    h: 0,
                    nw: 0,
                    out_q: (0, 0, 0),
                    gcnt,
                    group_target,
                    n_groups: 0,
                    pcnt: cnt(4),
                });
            } else {
                phases.push(down);
            }
            let base = words.len();
            words.resize(base + DESC_WORDS, 0);
            let d = &mut words[base..];
            for (pi, p) in phases.iter().enumerate() {
                let w = &mut d[pi * PHASE_WORDS..(pi + 1) * PHASE_WORDS];
                let mut tiles = Vec::new();
                for (mi, pm) in p.mats.iter().enumerate() {
                    let (ptr, ty, rows, cols, row_bytes) = pm.m;
                    let r = tile_rows(row_bytes, tile);
                    tile_cap = tile_cap.max(r * row_bytes);
                    let t = rows.div_ceil(r);
                    tiles.push(t);
                    let mw = &mut w[mi * MAT_WORDS..(mi + 1) * MAT_WORDS];
                    mw.copy_from_slice(&[
                        ptr,
                        pm.out,
                        row_bytes as u64,
                        rows as u64,
                        ty as u32 as u64,
                        units_per_row(ty, cols) as u64,
                        r as u64,
                        t as u64,
                    ]);
                }
                max_k = max_k.max(p.k);
                let interleave = tiles.len() == 2 && tiles[0] == tiles[1];
                let rest = &mut w[3 * MAT_WORDS..];
                rest.copy_from_slice(&[
                    p.mats.len() as u64,
                    tiles.iter().sum::<usize>() as u64,
                    interleave as u64,
                    p.in_kind,
                    p.k as u64,
                    p.yq,
                    p.yds,
                    p.ss,
                    p.eps.to_bits() as u64,
                    p.epi,
                    p.h,
                    p.nw,
                    p.out_q.0,
                    p.out_q.1,
                    p.out_q.2,
                    p.gcnt,
                    p.group_target,
                    p.n_groups,
                    p.pcnt,
                ]);
            }
            let tail = &mut d[MAX_PHASES * PHASE_WORDS..];
            tail.copy_from_slice(&[phases.len() as u64, cnt(0), c0, per_span as u64]);
            spans.insert(
                *i,
                Span {
                    n_ops: m.n_ops,
                    att: m.att,
                    writes,
                    rope: m.rope.filter(|_| rope_ok),
                    logits: m.logits.is_some(),
                    desc: si,
                },
            );
        }
        let desc = gpu.alloc(words.len() * 8, "layer tail tables")?;
        gpu.upload(&desc, &words)?;
        let tile_cap = tile_cap.next_multiple_of(16);
        let nbuf = var("MOA_TL_BUFS").unwrap_or(BUFS).clamp(2, 4);
        let smem = nbuf * tile_cap + max_k.next_multiple_of(16) + max_k / 32 * 8;
        if smem > 48 << 10 {
            func.set_attribute(
                cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                smem as i32,
            )
            .map_err(|e| super::device::driver_err("shared memory size of layer_tail", e))?;
        }
        // Every block must be resident at once (the blocks wait on each other's counters).
        let fit = func
            .occupancy_max_active_blocks_per_multiprocessor(THREADS, smem, None)
            .map_err(|e| super::device::driver_err("occupancy of layer_tail", e))?
            as usize;
        let want = var("MOA_TL_BLOCKS").unwrap_or(BLOCKS_PER_SM).max(1);
        let per_sm = want.min(fit);
        if per_sm == 0 {
            return Ok(None);
        }
        Ok(Some(LayerTail {
            func,
            spans,
            desc,
            _counters: counters,
            _inputs: inputs,
            grid: (per_sm * gpu.sms) as u32,
            smem: smem as u32,
            tile_words: (tile_cap / 16) as i32,
            nbuf: nbuf as i32,
            acct_every: var("MOA_TL_ACCOUNT").unwrap_or(0).min(1 << 20) as i32,
            pf_tiles: var("MOA_TL_PREFETCH").unwrap_or(PREFETCH).min(64) as i32,
        }))
    }

    /// How many spans there are.
    pub fn n_spans(&self) -> usize {
        self.spans.len()
    }

    /// The span starting at op `i`, if any.
    pub fn span_at(&self, i: usize) -> Option<&Span> {
        self.spans.get(&i)
    }

    /// Runs a span (its input, the attention output, in the q8_1 buffer). With `rope` (the
    /// span's [`Span::rope`] and an f16 cache) its last phase also does the next layer's RoPE,
    /// K/V staging and cache store, so the attention kernel comes next. `logits`: run the last
    /// span's logits phase (the step wants its one row of logits).
    pub fn launch(
        &self,
        gpu: &Gpu,
        span: &Span,
        rope: Option<&RopeArgs>,
        logits: bool,
    ) -> Result<(), BackendError> {
        let mut c = lcfg((self.grid, 1, 1), THREADS);
        c.shared_mem_bytes = self.smem;
        let r = rope.copied().unwrap_or_default();
        gpu.launch_pdl(
            &self.func,
            c,
            &[
                A::P(self.desc.at(span.desc * DESC_WORDS * 8)),
                A::I(self.tile_words),
                A::I(self.nbuf),
                A::I(if span.logits && !logits { 3 } else { 4 }),
                A::I(self.acct_every),
                A::I(self.pf_tiles),
                A::I(i32::from(rope.is_some())),
                A::I(r.head_dim),
                A::I(r.half_rot),
                A::I(r.rows_per_seq),
                A::I(r.sink),
                A::P(r.cs),
                A::P(r.k16),
                A::P(r.v16),
                A::P(r.kc),
                A::P(r.vc),
                A::P(r.tok_pos),
                A::P(r.tok_seq),
                A::P(r.caps),
                A::P(r.offs),
            ],
        )
    }
}

/// rope_kv's arguments for one token (`TlRope` in layer_tail.cu).
#[derive(Clone, Copy, Debug, Default)]
pub struct RopeArgs {
    pub head_dim: i32,
    pub half_rot: i32,
    pub rows_per_seq: i32,
    pub sink: i32,
    pub cs: u64,
    pub k16: u64,
    pub v16: u64,
    pub kc: u64,
    pub vc: u64,
    pub tok_pos: u64,
    pub tok_seq: u64,
    pub caps: u64,
    pub offs: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_words_match_the_kernel_structs() {
        // TlMat 8 fields, TlPhase 3 mats + 19 fields, TlDesc 4 phases + 4 fields.
        assert_eq!(PHASE_WORDS, 3 * 8 + 19);
        assert_eq!(DESC_WORDS, 4 * PHASE_WORDS + 4);
        let src = include_str!("../../../cuda/layer_tail.cu");
        let fields = |name: &str| {
            let start = src
                .find(&format!("struct {name} {{"))
                .expect("struct in source");
            let body = &src[start..start + src[start..].find("};").unwrap()];
            body.lines()
                .skip(1)
                .map(|l| l.split("//").next().unwrap())
                .filter(|l| l.contains("u64") || l.contains("TlMat") || l.contains("TlPhase"))
                .map(|l| {
                    let l = l.trim().trim_end_matches(';');
                    if let Some(rest) = l.strip_prefix("TlMat m[TL_MAX_MATS]") {
                        assert!(rest.is_empty());
                        3 * MAT_WORDS
                    } else if let Some(rest) = l.strip_prefix("TlPhase p[TL_MAX_PHASES]") {
                        assert!(rest.is_empty());
                        MAX_PHASES * PHASE_WORDS
                    } else {
                        l.trim_start_matches("u64").split(',').count()
                    }
                })
                .sum::<usize>()
        };
        assert_eq!(fields("TlMat"), MAT_WORDS);
        assert_eq!(fields("TlPhase"), PHASE_WORDS);
        assert_eq!(fields("TlDesc"), DESC_WORDS);
    }

    fn tiny_model(name: &str) -> crate::model::Model {
        use crate::model::synth::{write_synthetic, SynthSpec};
        let spec = SynthSpec::tiny(GgmlType::Q4_0, 1);
        let path =
            std::env::temp_dir().join(format!("moa-tail-{name}-{}.gguf", std::process::id()));
        write_synthetic(&spec, &path).expect("synthetic model");
        let model = crate::model::Model::load(&path).expect("loads");
        std::fs::remove_file(&path).ok();
        model
    }

    #[test]
    fn the_llama_graph_has_one_span_per_layer() {
        let model = tiny_model("spans");
        let ops = &model.graph.ops;
        let starts: Vec<usize> = (0..ops.len())
            .filter(|&i| match_at(ops, i).is_some())
            .collect();
        assert_eq!(starts.len(), model.config.n_layer);
        for (l, &i) in starts.iter().enumerate() {
            let m = match_at(ops, i).unwrap();
            assert!(matches!(ops[i], Op::MatMul { w, .. } if w == model.weights.layers[l].wo));
            let last = l + 1 == model.config.n_layer;
            // The last layer's span ends before the final norm (the logits' input).
            assert_eq!(m.n_ops, if last { 8 } else { 12 }, "layer {l}");
            assert_eq!(m.next.is_some(), !last);
            // ... where the final norm and the output matrix may join it.
            assert_eq!(m.logits.is_some(), last);
            if let Some((_, qkv)) = &m.next {
                let next = &model.weights.layers[l + 1];
                let ws: Vec<usize> = qkv.iter().map(|&(w, _)| w).collect();
                assert_eq!(ws, vec![next.wq, next.wk, next.wv]);
            }
        }
    }

    #[test]
    fn no_span_where_a_skipped_activation_is_read_later() {
        let model = tiny_model("dead");
        let mut ops = model.graph.ops.clone();
        let i = (0..ops.len())
            .find(|&i| match_at(&ops, i).is_some())
            .unwrap();
        let m = match_at(&ops, i).unwrap();
        // Something after the span reads the FFN's gate output, which the kernel never forms.
        ops.insert(
            i + m.n_ops,
            Op::Add {
                x: m.h,
                y: m.gate.1,
            },
        );
        assert!(match_at(&ops, i).is_none());
        // The span's own structure broken: the residual add reads another activation.
        let mut ops = model.graph.ops.clone();
        if let Op::Add { x, .. } = ops[i + 1] {
            ops[i + 1] = Op::Add { x, y: m.gate.1 };
        }
        assert!(match_at(&ops, i).is_none());
    }
}
