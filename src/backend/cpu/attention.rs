//! Span-aware attention on the CPU over the per-head KV regions of [`crate::kv::KvLayout`].
//!
//! For a run of `n` new tokens of one sequence at positions `p0..p0+n`, each query at position
//! `i` attends to the keys the token-exact mask allows (`j <= i` and `j < sink` or
//! `i - j < C_h - sink`): the head's cached slots (at most `C_h` of them, whatever the sequence
//! length) and the run's own keys. Keys outside the mask are skipped, never computed. The run's
//! K/V rows are first stored in the cache's element type (rounded to f16, or quantized to q8_0
//! blocks), so prefill sees exactly what decode will read back from the cache, and written into
//! the ring after all queries of the run are done, so no query loses a key that a later token of
//! the same run overwrites.
//!
//! Element types ([`KvType`], K and V independently), as llama.cpp's CPU flash attention does:
//! with f16 keys the query is rounded to f16 and scored with f32 dot products; with q8_0 keys the
//! query is quantized once per (token, head) to q8_0 and scored with integer block dot products.
//! f16 values are accumulated in f32; q8_0 values are dequantized block by block into the f32
//! accumulator.

use std::sync::Mutex;

use half::f16;
use rayon::prelude::*;

use super::ggml_attn;
use super::ggml_decode;
use super::ggml_tile;
use super::matmul::SharedMut;
use super::simd;
use super::{alloc, BackendError};
use crate::kv::{ring_slot, KvLayout, KvType};

/// K or V rows in the cache's element type: f16 values, or q8_0 blocks as bytes. Positions are
/// counted in values (always a multiple of the block size).
pub enum KvRows {
    F16(Vec<f16>),
    Q8_0(Vec<u8>),
}

impl KvRows {
    /// Zeroed storage for `n` values of type `ty`.
    pub fn alloc(ty: KvType, n: usize, what: &str) -> Result<KvRows, BackendError> {
        Ok(match ty {
            KvType::F16 => KvRows::F16(alloc(n, f16::ZERO, what)?),
            KvType::Q8_0 => KvRows::Q8_0(alloc(ty.bytes_for(n), 0u8, what)?),
        })
    }

    /// Stores `src` from value `at` on: rounded to f16 (nearest even) or quantized to q8_0
    /// (ggml's reference quantizer; `src.len()` a whole number of blocks).
    pub fn store_f32(&mut self, at: usize, src: &[f32]) {
        match self {
            KvRows::F16(d) => simd::f32_to_f16(src, &mut d[at..at + src.len()]),
            KvRows::Q8_0(d) => {
                let t = KvType::Q8_0;
                ggml_compat::q8::quantize_q8_0(
                    src,
                    &mut d[t.bytes_for(at)..t.bytes_for(at + src.len())],
                )
            }
        }
    }

    /// A read-only view of all rows.
    pub fn view(&self) -> Rows<'_> {
        match self {
            KvRows::F16(d) => Rows::F16(d),
            KvRows::Q8_0(d) => Rows::Q8_0(d),
        }
    }

    /// Copies `n` values of `src` from value `from` to value `at` (same type).
    fn copy_from(&mut self, at: usize, src: Rows, from: usize, n: usize) {
        match (self, src) {
            (KvRows::F16(d), Rows::F16(s)) => d[at..at + n].copy_from_slice(&s[from..from + n]),
            (KvRows::Q8_0(d), Rows::Q8_0(s)) => {
                let b = |v: usize| KvType::Q8_0.bytes_for(v);
                d[b(at)..b(at + n)].copy_from_slice(&s[b(from)..b(from + n)])
            }
            _ => unreachable!("the run's rows have the cache's type"),
        }
    }
}

/// A view of K or V rows; [`Rows::skip`] moves it by a number of values.
#[derive(Clone, Copy)]
pub enum Rows<'a> {
    F16(&'a [f16]),
    Q8_0(&'a [u8]),
}

impl<'a> Rows<'a> {
    /// The rows from value `v` on (`v` a multiple of the block size).
    fn skip(self, v: usize) -> Rows<'a> {
        match self {
            Rows::F16(d) => Rows::F16(&d[v..]),
            Rows::Q8_0(d) => Rows::Q8_0(&d[KvType::Q8_0.bytes_for(v)..]),
        }
    }

    /// Values `a..b` of the view.
    pub fn range(self, a: usize, b: usize) -> Rows<'a> {
        match self {
            Rows::F16(d) => Rows::F16(&d[a..b]),
            Rows::Q8_0(d) => {
                let t = KvType::Q8_0;
                Rows::Q8_0(&d[t.bytes_for(a)..t.bytes_for(b)])
            }
        }
    }
}

/// One layer's cache: K and V rows of `head_dim` values. Which position a slot holds follows
/// from the ring placement ([`ring_slot`]): the sinks, then the most recent tokens.
pub struct LayerKv {
    pub k: KvRows,
    pub v: KvRows,
}

/// Per-thread buffers, allocated once.
pub struct Scratch {
    scores: Vec<f32>,
    /// The tiled path's scores (`LANES` per key), key positions, transposed queries, converted
    /// key rows, one tile's weights (`LANES` per key) and the tile sum's slots.
    lane_scores: Vec<f32>,
    kpos: Vec<u32>,
    qt: Vec<f32>,
    kbuf: Vec<f32>,
    ptile: Vec<f32>,
    slots: Vec<f32>,
    /// The query in the K type: f16 values, or q8_0 blocks.
    q16: Vec<f16>,
    q8: Vec<u8>,
    /// Output accumulators: one query's, or `LANES` queries' on the tiled path (up to
    /// [`ggml_decode::MAX_HEADS`] heads' on the grouped decode path).
    acc: Vec<f32>,
    /// The grouped decode path's f16 queries (one per head) and its scores and weights.
    q16s: Vec<f16>,
    dec: Vec<f32>,
}

impl Scratch {
    pub fn new(max_keys: usize, head_dim: usize, k_type: KvType) -> Scratch {
        let (n16, n8) = match k_type {
            KvType::F16 => (head_dim, 0),
            KvType::Q8_0 => (0, k_type.bytes_for(head_dim)),
        };
        Scratch {
            scores: vec![0.0; max_keys],
            lane_scores: vec![0.0; max_keys * ggml_attn::LANES],
            kpos: vec![0; max_keys],
            qt: vec![0.0; head_dim * ggml_attn::LANES],
            kbuf: vec![0.0; ggml_attn::KBUF_ROWS * head_dim],
            ptile: vec![0.0; ggml_attn::KV_TILE * ggml_attn::LANES],
            slots: vec![0.0; ggml_attn::KV_TILE * ggml_attn::LANES],
            q16: vec![f16::ZERO; n16],
            q8: vec![0; n8],
            acc: vec![0.0; head_dim * ggml_attn::LANES.max(ggml_decode::MAX_HEADS)],
            q16s: vec![f16::ZERO; head_dim * ggml_decode::MAX_HEADS],
            dec: vec![0.0; ggml_decode::BUF_LEN],
        }
    }
}

/// A run of visible keys: (key rows, value rows, row stride in values, first row, rows,
/// position of the first row).
type Span<'a> = (Rows<'a>, Rows<'a>, usize, usize, usize, usize);

/// Scores of the query (`q16` or `q8`, whichever matches the keys' type) against `len` key rows
/// `stride` values apart from row `start`, into `out`.
fn score_rows(
    q16: &[f16],
    q8: &[u8],
    k: Rows,
    stride: usize,
    start: usize,
    scale: f32,
    out: &mut [f32],
) {
    match k.skip(start * stride) {
        Rows::F16(k) => simd::dot_rows_f16(q16, k, stride, scale, out),
        Rows::Q8_0(k) => simd::dot_rows_q8_0(q8, k, KvType::Q8_0.bytes_for(stride), scale, out),
    }
}

/// `acc += sum_r p[r] * v_row(start + r)` over value rows `stride` values apart.
fn accumulate_rows(acc: &mut [f32], p: &[f32], v: Rows, stride: usize, start: usize) {
    match v.skip(start * stride) {
        Rows::F16(v) => simd::axpy_rows_f16(acc, p, v, stride),
        Rows::Q8_0(v) => simd::axpy_rows_q8_0(acc, p, v, KvType::Q8_0.bytes_for(stride)),
    }
}

/// The end of the key tile starting at `kpos[cs]`: keys up to the next one in another aligned
/// tile of [`ggml_attn::KV_TILE`] positions (`kpos` ascends).
fn key_tile_end(kpos: &[u32], cs: usize) -> usize {
    let tile = kpos[cs] as usize / ggml_attn::KV_TILE;
    let limit = (cs + ggml_attn::KV_TILE).min(kpos.len());
    (cs + 1..limit)
        .find(|&c| kpos[c] as usize / ggml_attn::KV_TILE != tile)
        .unwrap_or(limit)
}

/// Where one KV head's keys are for a run: the cached rows `kc`/`vc` (`filled` slots of a ring of
/// `cap`), the run's own rows `kn`/`vn` (`kv_dim` values apart).
#[derive(Clone, Copy)]
struct Geom<'a> {
    kc: Rows<'a>,
    vc: Rows<'a>,
    kn: Rows<'a>,
    vn: Rows<'a>,
    hd: usize,
    kv_dim: usize,
    sink: usize,
    cap: usize,
    filled: usize,
    p0: usize,
}

impl<'a> Geom<'a> {
    /// The keys query t sees, as at most five runs of rows in position order: cached sinks,
    /// the cached ring (two runs when the visible part wraps), the run's own sinks and its
    /// recent keys. With `new_upto`, the run's own keys are all rows before it instead (the
    /// union over a tile of queries; the caller masks them per query).
    fn spans(&self, t: usize, new_upto: Option<usize>) -> ([Span<'a>; 5], usize) {
        let Geom {
            kc,
            vc,
            kn,
            vn,
            hd,
            kv_dim,
            sink,
            cap,
            filled,
            p0,
        } = *self;
        let w = cap.saturating_sub(sink);
        let i = p0 + t;
        let lo = (i + 1).saturating_sub(w); // oldest visible non-sink position
        let mut spans: [Span; 5] = [(kc, vc, 0, 0, 0, 0); 5];
        let mut ns = 0;
        macro_rules! push {
            ($span:expr) => {{
                let span: Span = $span;
                if span.4 > 0 {
                    spans[ns] = span;
                    ns += 1;
                }
            }};
        }
        push!((kc, vc, hd, 0, sink.min(filled), 0));
        let a = sink.max(lo);
        if a < p0 && p0 > sink {
            let len = p0 - a;
            let s0 = sink + (a - sink) % w;
            let first = len.min(cap - s0);
            push!((kc, vc, hd, s0, first, a));
            push!((kc, vc, hd, sink, len - first, a + first));
        }
        if let Some(upto) = new_upto {
            push!((kn, vn, kv_dim, 0, upto, p0));
        } else {
            let sinks_new = sink.saturating_sub(p0).min(t + 1);
            push!((kn, vn, kv_dim, 0, sinks_new, p0));
            let b = sinks_new.max(lo.saturating_sub(p0));
            push!((kn, vn, kv_dim, b, (t + 1).saturating_sub(b), p0 + b));
        }
        (spans, ns)
    }
}

/// Queries per parallel task (a tile of one KV head's group).
const QUERY_TILE: usize = 8;

/// What one run of attention reads and writes.
pub struct Run<'a> {
    pub layout: &'a KvLayout,
    pub layer: usize,
    pub seq: usize,
    /// Position of the first new token (= tokens already cached).
    pub p0: usize,
    pub n: usize,
    pub n_head: usize,
    /// Tokens in the whole batch (all runs): batches of at least
    /// [`ggml_attn::TILED_MIN_BATCH`] take llama.cpp's tiled numerics, smaller ones its per-key
    /// numerics (f16 K and V only; see [`ggml_attn`]).
    pub n_batch: usize,
    /// `n` rows of `n_head * head_dim` (after RoPE).
    pub q: &'a [f32],
    /// `n` rows of `n_head_kv * head_dim`, already in the cache's K and V types.
    pub k_new: Rows<'a>,
    pub v_new: Rows<'a>,
    /// `n` rows of `n_head * head_dim`.
    pub out: &'a mut [f32],
}

/// Computes attention for a run, then stores its keys and values in the cache.
pub fn attend_and_store(run: Run, kv: &mut LayerKv, scratch: &[Mutex<Scratch>]) {
    attend_and_store_with(run, kv, scratch, true)
}

/// [`attend_and_store`]; `grouped` runs llama.cpp's per-key numerics (f16 K/V, small batches)
/// on [`ggml_decode`]'s grouped path, else one query head at a time (the same bits).
fn attend_and_store_with(run: Run, kv: &mut LayerKv, scratch: &[Mutex<Scratch>], grouped: bool) {
    let Run {
        layout,
        layer,
        seq,
        p0,
        n,
        n_head,
        n_batch,
        q,
        k_new,
        v_new,
        out,
    } = run;
    let hd = layout.head_dim;
    let n_kv = layout.n_head_kv;
    let group = n_head / n_kv;
    let (q_dim, kv_dim) = (n_head * hd, n_kv * hd);
    let scale = 1.0 / (hd as f32).sqrt();
    let sink = layout.sink;
    let tiles = n.div_ceil(QUERY_TILE);
    let out_ptr = SharedMut(out.as_mut_ptr());
    let cache: &LayerKv = kv;
    let k_type = layout.types().k;

    let types = layout.types();
    let f16_kv = types.k == KvType::F16 && types.v == KvType::F16;
    let tiled = f16_kv && n_batch >= ggml_attn::TILED_MIN_BATCH;

    let geom_of = |g: usize| {
        let cap = layout.capacity(layer, g);
        let off = layout.region_offset(seq, layer, g);
        let filled = layout.filled(layer, g, p0);
        Geom {
            kc: cache.k.view().range(off * hd, (off + filled) * hd),
            vc: cache.v.view().range(off * hd, (off + filled) * hd),
            kn: k_new.skip(g * hd),
            vn: v_new.skip(g * hd),
            hd,
            kv_dim,
            sink,
            cap,
            filled,
            p0,
        }
    };

    if grouped && f16_kv && !tiled {
        // llama.cpp's per-key path with the query heads of a KV head run together in blocks
        // of up to MAX_HEADS (see ggml_decode): enough blocks to give every thread two tasks.
        let mut nb = group.div_ceil(ggml_decode::MAX_HEADS);
        while n_kv * nb * tiles < 2 * rayon::current_num_threads() && nb < group {
            nb += 1;
        }
        (0..n_kv * nb * tiles).into_par_iter().for_each(|task| {
            let (b, tile) = (task % (n_kv * nb), task / (n_kv * nb));
            let (g, bi) = (b / nb, b % nb);
            let h0 = g * group + bi * group / nb;
            let hb = g * group + (bi + 1) * group / nb - h0;
            let geom = geom_of(g);
            let slot = rayon::current_thread_index().unwrap_or(0) % scratch.len();
            let mut guard = scratch[slot].lock().unwrap_or_else(|e| e.into_inner());
            let sc = &mut *guard;
            for t in tile * QUERY_TILE..((tile + 1) * QUERY_TILE).min(n) {
                for j in 0..hb {
                    let at = t * q_dim + (h0 + j) * hd;
                    simd::f32_to_f16(&q[at..at + hd], &mut sc.q16s[j * hd..(j + 1) * hd]);
                }
                let (spans, ns) = geom.spans(t, None);
                let mut m = [f32::NEG_INFINITY; ggml_decode::MAX_HEADS];
                let mut s = [0f32; ggml_decode::MAX_HEADS];
                let acc = &mut sc.acc[..hb * hd];
                acc.fill(0.0);
                for &(k, v, stride, start, len, _) in &spans[..ns] {
                    let (Rows::F16(k), Rows::F16(v)) =
                        (k.skip(start * stride), v.skip(start * stride))
                    else {
                        unreachable!("f16 keys and values")
                    };
                    ggml_decode::online_heads(
                        &sc.q16s,
                        hd,
                        k,
                        v,
                        stride,
                        len,
                        scale,
                        &mut m[..hb],
                        &mut s[..hb],
                        acc,
                        &mut sc.dec,
                    );
                }
                for j in 0..hb {
                    let inv = if s[j] == 0.0 { 0.0 } else { 1.0 / s[j] };
                    for (d, &a) in acc[j * hd..(j + 1) * hd].iter().enumerate() {
                        // SAFETY: task (block, tile) writes only the heads h0..h0 + hb of the
                        // rows t of its tile; blocks partition the heads and (block, tile)
                        // pairs are distinct, so writes never overlap; the index is below
                        // n * q_dim = out.len().
                        unsafe { *out_ptr.ptr().add(t * q_dim + (h0 + j) * hd + d) = a * inv };
                    }
                }
            }
        });
    } else {
        // One task per (query head, tile of queries): enough tasks to keep every thread busy even
        // for a single decoded token.
        (0..n_head * tiles).into_par_iter().for_each(|task| {
            let h = task % n_head;
            let g = h / group;
            let tile = task / n_head;
            let geom = geom_of(g);
            let cap = geom.cap;
            let slot = rayon::current_thread_index().unwrap_or(0) % scratch.len();
            let mut guard = scratch[slot].lock().unwrap_or_else(|e| e.into_inner());
            let sc = &mut *guard;
            // Window slots (none when the whole context fits in the sinks: cap <= sink).
            let w = cap.saturating_sub(sink);
            let spans_of = |t: usize, new_upto: Option<usize>| geom.spans(t, new_upto);

            let t0 = tile * QUERY_TILE;
            let t1 = ((tile + 1) * QUERY_TILE).min(n);
            let write = |t: usize, acc: &[f32], inv: f32| {
                for (d, &a) in acc.iter().enumerate() {
                    // SAFETY: task (h, tile) writes only head h of the rows t of its tile;
                    // (h, tile) pairs are distinct, so writes never overlap, and the index is
                    // below n * q_dim = out.len().
                    unsafe { *out_ptr.ptr().add(t * q_dim + h * hd + d) = a * inv };
                }
            };

            if tiled {
                // llama.cpp's tiled path: score the tile's queries against the union of the keys
                // they see, then each query's online softmax over aligned 64-position key tiles,
                // all queries of the tile at once (see ggml_tile).
                let (spans, ns) = spans_of(t0, Some(t1));
                let spans = &spans[..ns];
                let nq = t1 - t0;
                sc.qt.fill(0.0);
                for l in 0..nq {
                    let qh = &q[(t0 + l) * q_dim + h * hd..(t0 + l) * q_dim + (h + 1) * hd];
                    for (d, &x) in qh.iter().enumerate() {
                        sc.qt[d * ggml_attn::LANES + l] = x;
                    }
                }
                let mut c = 0;
                for &(k, _, stride, start, len, pos) in spans {
                    let Rows::F16(k) = k.skip(start * stride) else {
                        unreachable!("tiled attention reads f16 keys")
                    };
                    ggml_attn::score_lanes(
                        &sc.qt,
                        hd,
                        k,
                        stride,
                        len,
                        scale,
                        &mut sc.kbuf,
                        &mut sc.lane_scores[c * ggml_attn::LANES..(c + len) * ggml_attn::LANES],
                    );
                    for (r, kp) in sc.kpos[c..c + len].iter_mut().enumerate() {
                        *kp = (pos + r) as u32;
                    }
                    c += len;
                }
                let n_keys = c;
                let mask = ggml_tile::LaneMask {
                    first: p0 + t0,
                    n_queries: nq,
                    sink,
                    window: w,
                };
                let mut state = ggml_tile::LaneState::new();
                let acc = &mut sc.acc[..ggml_attn::LANES * hd];
                acc.fill(0.0);
                let mut cs = 0;
                while cs < n_keys {
                    let ce = key_tile_end(&sc.kpos[..n_keys], cs);
                    let lanes = ggml_tile::tile_weights(
                        &sc.lane_scores[cs * ggml_attn::LANES..ce * ggml_attn::LANES],
                        &sc.kpos[cs..ce],
                        mask,
                        &mut state,
                        acc,
                        &mut sc.ptile,
                        &mut sc.slots,
                    );
                    // Values of the tile's keys, span by span, for the queries that saw the tile.
                    let mut c0 = 0;
                    for &(_, v, stride, start, len, _) in spans {
                        let (a, b) = (cs.max(c0), ce.min(c0 + len));
                        if a < b && lanes != 0 {
                            let Rows::F16(v) = v.skip((start + a - c0) * stride) else {
                                unreachable!("tiled attention reads f16 values")
                            };
                            ggml_tile::accumulate_lanes(
                                acc,
                                hd,
                                lanes,
                                &sc.ptile[(a - cs) * ggml_attn::LANES..],
                                v,
                                stride,
                                b - a,
                            );
                        }
                        c0 += len;
                    }
                    cs = ce;
                }
                for l in 0..nq {
                    let s = state.s[l];
                    let inv = if s == 0.0 { 0.0 } else { 1.0 / s };
                    write(t0 + l, &acc[l * hd..(l + 1) * hd], inv);
                }
                return;
            }

            for t in t0..t1 {
                let qh = &q[t * q_dim + h * hd..t * q_dim + (h + 1) * hd];
                match k_type {
                    KvType::F16 => simd::f32_to_f16(qh, &mut sc.q16),
                    KvType::Q8_0 => ggml_compat::q8::quantize_q8_0(qh, &mut sc.q8),
                }
                let (spans, ns) = spans_of(t, None);
                let spans = &spans[..ns];
                if f16_kv {
                    // llama.cpp's per-key path: online softmax, f16 value accumulator.
                    let (mut m, mut s) = (f32::NEG_INFINITY, 0f32);
                    let acc = &mut sc.acc[..hd];
                    acc.fill(0.0);
                    for &(k, v, stride, start, len, _) in spans {
                        let (Rows::F16(k), Rows::F16(v)) =
                            (k.skip(start * stride), v.skip(start * stride))
                        else {
                            unreachable!("f16 keys and values")
                        };
                        let scores = &mut sc.scores[..len];
                        ggml_attn::dot_rows_f16_ggml(&sc.q16, k, stride, scale, scores);
                        ggml_attn::online_f16(scores, v, stride, &mut m, &mut s, acc);
                    }
                    let inv = if s == 0.0 { 0.0 } else { 1.0 / s };
                    write(t, acc, inv);
                    continue;
                }

                let mut c = 0;
                for &(k, _, stride, start, len, _) in spans {
                    score_rows(
                        &sc.q16,
                        &sc.q8,
                        k,
                        stride,
                        start,
                        scale,
                        &mut sc.scores[c..c + len],
                    );
                    c += len;
                }
                let m = sc.scores[..c]
                    .iter()
                    .copied()
                    .fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0.0f32;
                for x in &mut sc.scores[..c] {
                    *x = (*x - m).exp();
                    sum += *x;
                }
                let acc = &mut sc.acc[..hd];
                acc.fill(0.0);
                let mut c = 0;
                for &(_, v, stride, start, len, _) in spans {
                    accumulate_rows(acc, &sc.scores[c..c + len], v, stride, start);
                    c += len;
                }
                write(t, acc, 1.0 / sum);
            }
        });
    }

    // Store the run's keys and values. A run longer than a ring overwrites its own early
    // tokens; the last writer of each slot is the newest token, as the ring requires.
    for t in 0..n {
        let p = p0 + t;
        for g in 0..n_kv {
            let row =
                layout.region_offset(seq, layer, g) + ring_slot(layout.capacity(layer, g), sink, p);
            kv.k.copy_from(row * hd, k_new, t * kv_dim + g * hd, hd);
            kv.v.copy_from(row * hd, v_new, t * kv_dim + g * hd, hd);
        }
    }
}

/// One attention call on given f16 inputs, for comparing backends kernel against kernel (the
/// CUDA backend's exact attention, `cuda::exact_attention_harness`, in tests/cuda_backend.rs):
/// a run of `n` tokens of sequence `seq` at positions `p0..p0 + n` in a batch of `n_batch`
/// tokens (which picks llama.cpp's regime, as in [`Run::n_batch`]).
pub struct AttnCase {
    /// f16 K/V; its layer `layer` is the cache read.
    pub layout: KvLayout,
    pub layer: usize,
    pub seq: usize,
    pub p0: usize,
    pub n: usize,
    pub n_head: usize,
    pub n_batch: usize,
    /// `n` rows of `n_head * head_dim`.
    pub q: Vec<f32>,
    /// `n` rows of `n_head_kv * head_dim` each: the run's own keys and values.
    pub k_new: Vec<f16>,
    pub v_new: Vec<f16>,
    /// The layer's whole K and V cache buffers (`rows_per_layer(layer) * head_dim` each).
    pub k_cache: Vec<f16>,
    pub v_cache: Vec<f16>,
}

/// The CPU backend's attention output for `case` (`n` rows of `n_head * head_dim`), computed
/// as a forward step computes it (the given cache buffers are copied, not changed).
pub fn attention_reference(case: &AttnCase) -> Vec<f32> {
    let layout = &case.layout;
    assert_eq!(layout.types(), crate::kv::KvTypes::default(), "f16 K/V");
    let hd = layout.head_dim;
    let rows = layout.rows_per_layer(case.layer) * hd;
    assert!(case.k_cache.len() >= rows && case.v_cache.len() >= rows);
    let mut kv = LayerKv {
        k: KvRows::F16(case.k_cache[..rows].to_vec()),
        v: KvRows::F16(case.v_cache[..rows].to_vec()),
    };
    let threads = rayon::current_num_threads();
    let scratch: Vec<Mutex<Scratch>> = (0..threads)
        .map(|_| Mutex::new(Scratch::new(layout.n_ctx + case.n, hd, KvType::F16)))
        .collect();
    let mut out = vec![0f32; case.n * case.n_head * hd];
    let run = Run {
        layout,
        layer: case.layer,
        seq: case.seq,
        p0: case.p0,
        n: case.n,
        n_head: case.n_head,
        n_batch: case.n_batch,
        q: &case.q,
        k_new: Rows::F16(&case.k_new),
        v_new: Rows::F16(&case.v_new),
        out: &mut out,
    };
    attend_and_store(run, &mut kv, &scratch);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::simd::tests::data_in;
    use crate::kv::KvTypes;

    /// One case: a layer of `n_kv` KV heads with the given capacities, `group` query heads per
    /// KV head, `n` new tokens after `p0` cached ones of sequence `seq` (of 2). Returns the
    /// outputs of the grouped decode path and of the per-head path, and whether the grouped
    /// one ran.
    #[allow(clippy::too_many_arguments)]
    fn both_paths(
        types: KvTypes,
        hd: usize,
        n_kv: usize,
        group: usize,
        caps: &[usize],
        sink: usize,
        p0: usize,
        n: usize,
        amp: f32,
        seed: u32,
    ) -> (Vec<f32>, Vec<f32>) {
        let n_ctx = 1000;
        let layout = KvLayout::with_capacities(2, 1, n_kv, hd, n_ctx, sink, caps.to_vec())
            .unwrap()
            .with_types(types)
            .unwrap();
        let n_head = n_kv * group;
        let kv_dim = n_kv * hd;
        let rows = layout.rows_per_layer(0) * hd;
        let fill = |data: &[f32], ty: KvType| {
            let mut r = KvRows::alloc(ty, data.len(), "test").unwrap();
            r.store_f32(0, data);
            r
        };
        let kc = data_in(rows, seed, amp);
        let vc = data_in(rows, seed + 1, 1.0);
        let q = data_in(n * n_head * hd, seed + 2, amp);
        let kn = fill(&data_in(n * kv_dim, seed + 3, amp), types.k);
        let vn = fill(&data_in(n * kv_dim, seed + 4, 1.0), types.v);
        let threads = rayon::current_num_threads();
        let scratch: Vec<Mutex<Scratch>> = (0..threads)
            .map(|_| Mutex::new(Scratch::new(n_ctx + n, hd, types.k)))
            .collect();
        let mut outs = Vec::new();
        for grouped in [true, false] {
            let mut kv = LayerKv {
                k: fill(&kc, types.k),
                v: fill(&vc, types.v),
            };
            let mut out = vec![f32::NAN; n * n_head * hd];
            let run = Run {
                layout: &layout,
                layer: 0,
                seq: 1,
                p0,
                n,
                n_head,
                n_batch: n,
                q: &q,
                k_new: kn.view(),
                v_new: vn.view(),
                out: &mut out,
            };
            attend_and_store_with(run, &mut kv, &scratch, grouped);
            outs.push(out);
        }
        let b = outs.pop().unwrap();
        (outs.pop().unwrap(), b)
    }

    fn bits(x: &[f32]) -> Vec<u32> {
        x.iter().map(|v| v.to_bits()).collect()
    }

    #[test]
    fn grouped_decode_equals_per_head_path_bit_for_bit() {
        let f16 = KvTypes::both(KvType::F16);
        let q8 = KvTypes::both(KvType::Q8_0);
        let mixed = KvTypes {
            k: KvType::F16,
            v: KvType::Q8_0,
        };
        let mut cases = 0;
        let mut seed = 1;
        for &hd in &[64usize, 128, 32, 96] {
            for &(n_kv, group) in &[(1, 1), (2, 3), (3, 3), (1, 4), (2, 5), (1, 8), (1, 9)] {
                for &(sink, caps) in &[
                    (0, [1000usize, 1000, 1000]),
                    (4, [1000, 300, 37]),
                    (0, [200, 1000, 65]),
                    (16, [700, 17, 999]),
                ] {
                    for &(p0, n) in &[
                        (0, 1),
                        (3, 1),
                        (299, 1),
                        (650, 1),
                        (700, 2),
                        (980, 5),
                        (64, 9),
                    ] {
                        for (ty, amp) in [(f16, 2.0), (f16, 6.0), (q8, 2.0), (mixed, 2.0)] {
                            if ty != f16 && (amp != 2.0 || hd % 32 != 0 || seed % 5 != 0) {
                                seed += 1;
                                continue;
                            }
                            seed += 1;
                            let (a, b) = both_paths(
                                ty,
                                hd,
                                n_kv,
                                group,
                                &caps[..n_kv],
                                sink,
                                p0,
                                n,
                                amp,
                                seed,
                            );
                            assert!(a.iter().all(|x| x.is_finite()));
                            assert_eq!(
                                bits(&a),
                                bits(&b),
                                "hd {hd} n_kv {n_kv} group {group} sink {sink} caps {caps:?} \
                                 p0 {p0} n {n} {ty:?} amp {amp}"
                            );
                            cases += 1;
                        }
                    }
                }
            }
        }
        assert!(cases > 1000, "{cases}");
    }
}

#[cfg(test)]
mod bench {
    use super::*;
    use crate::backend::cpu::simd::tests::data_in;

    /// Decode attention of the default model's shape (9 query heads, 3 KV heads, head_dim 64)
    /// at depth 8000 for one layer, grouped vs per-head: `cargo test --release --lib
    /// decode_attention_timing -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn decode_attention_timing() {
        let (hd, n_kv, n_head, depth) = (64, 3, 9, 8000);
        for &(cap, sink) in &[(8192usize, 0usize), (4096, 4)] {
            let layout =
                KvLayout::with_capacities(1, 1, n_kv, hd, 8192, sink, vec![cap; n_kv]).unwrap();
            let rows = layout.rows_per_layer(0) * hd;
            let fill = |d: &[f32]| {
                let mut r = KvRows::alloc(KvType::F16, d.len(), "bench").unwrap();
                r.store_f32(0, d);
                r
            };
            let mut kv = LayerKv {
                k: fill(&data_in(rows, 1, 2.0)),
                v: fill(&data_in(rows, 2, 1.0)),
            };
            let q = data_in(n_head * hd, 3, 2.0);
            let kn = fill(&data_in(n_kv * hd, 4, 2.0));
            let vn = fill(&data_in(n_kv * hd, 5, 1.0));
            for threads in [1, 2] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                let scratch: Vec<Mutex<Scratch>> = (0..threads)
                    .map(|_| Mutex::new(Scratch::new(8193, hd, KvType::F16)))
                    .collect();
                for grouped in [false, true, false, true] {
                    let mut times = Vec::new();
                    let mut out = vec![0f32; n_head * hd];
                    for _ in 0..40 {
                        let t = std::time::Instant::now();
                        pool.install(|| {
                            let run = Run {
                                layout: &layout,
                                layer: 0,
                                seq: 0,
                                p0: depth,
                                n: 1,
                                n_head,
                                n_batch: 1,
                                q: &q,
                                k_new: kn.view(),
                                v_new: vn.view(),
                                out: &mut out,
                            };
                            attend_and_store_with(run, &mut kv, &scratch, grouped)
                        });
                        times.push(t.elapsed().as_secs_f64() * 1e3);
                    }
                    times.sort_by(f64::total_cmp);
                    println!(
                        "cap {cap} threads {threads} grouped {grouped}: min {:.3} ms, median {:.3} ms",
                        times[0], times[20]
                    );
                }
            }
        }
    }
}
