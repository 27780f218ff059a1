//! Span-aware attention on the CPU over the per-head KV regions of [`crate::kv::KvLayout`].
//!
//! For a run of `n` new tokens of one sequence at positions `p0..p0+n`, each query at position
//! `i` attends to the keys the token-exact mask allows (`j <= i` and `j < sink` or
//! `i - j < C_h - sink`): the head's cached slots (at most `C_h` of them, whatever the sequence
//! length) and the run's own keys. Keys outside the mask are skipped, never computed. The run's
//! K/V rows are rounded to f16 first (so prefill sees exactly what decode will read back from the
//! cache) and written into the ring after all queries of the run are done, so no query loses a
//! key that a later token of the same run overwrites.

use std::sync::Mutex;

use half::f16;
use rayon::prelude::*;

use super::matmul::SharedMut;
use super::simd;
use crate::kv::{ring_slot, KvLayout};

/// One layer's cache: K and V rows of `head_dim` f16 values. Which position a slot holds
/// follows from the ring placement ([`ring_slot`]): the sinks, then the most recent tokens.
pub struct LayerKv {
    pub k: Vec<f16>,
    pub v: Vec<f16>,
}

/// Per-thread buffers, allocated once.
pub struct Scratch {
    scores: Vec<f32>,
    q16: Vec<f16>,
    acc: Vec<f32>,
}

impl Scratch {
    pub fn new(max_keys: usize, head_dim: usize) -> Scratch {
        Scratch {
            scores: vec![0.0; max_keys],
            q16: vec![f16::ZERO; head_dim],
            acc: vec![0.0; head_dim],
        }
    }
}

/// A run of visible keys: (key rows, value rows, row stride, first row, number of rows).
type Span<'a> = (&'a [f16], &'a [f16], usize, usize, usize);

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
    /// `n` rows of `n_head * head_dim` (after RoPE).
    pub q: &'a [f32],
    /// `n` rows of `n_head_kv * head_dim`, already rounded to f16.
    pub k_new: &'a [f16],
    pub v_new: &'a [f16],
    /// `n` rows of `n_head * head_dim`.
    pub out: &'a mut [f32],
}

/// Computes attention for a run, then stores its keys and values in the cache.
pub fn attend_and_store(run: Run, kv: &mut LayerKv, scratch: &[Mutex<Scratch>]) {
    let Run {
        layout,
        layer,
        seq,
        p0,
        n,
        n_head,
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

    // One task per (query head, tile of queries): enough tasks to keep every thread busy even
    // for a single decoded token.
    (0..n_head * tiles).into_par_iter().for_each(|task| {
        let h = task % n_head;
        let g = h / group;
        let tile = task / n_head;
        let cap = layout.capacity(layer, g);
        let off = layout.region_offset(seq, layer, g);
        let filled = layout.filled(layer, g, p0);
        let kc = &cache.k[off * hd..(off + filled) * hd];
        let vc = &cache.v[off * hd..(off + filled) * hd];
        let slot = rayon::current_thread_index().unwrap_or(0) % scratch.len();
        let mut guard = scratch[slot].lock().unwrap_or_else(|e| e.into_inner());
        let Scratch { scores, q16, acc } = &mut *guard;

        let w = cap - sink;
        for t in tile * QUERY_TILE..((tile + 1) * QUERY_TILE).min(n) {
            let i = p0 + t;
            simd::f32_to_f16(&q[t * q_dim + h * hd..t * q_dim + (h + 1) * hd], q16);
            // The visible keys as at most five runs of rows: cached sinks, the cached ring (two
            // runs when the visible part wraps), the run's own sinks and its recent keys.
            let lo = (i + 1).saturating_sub(w); // oldest visible non-sink position
                                                // (keys, values, row stride, first row, rows), bases already at head g.
            let kn = &k_new[g * hd..];
            let vn = &v_new[g * hd..];
            let mut spans: [Span; 5] = [(&[], &[], 0, 0, 0); 5];
            let mut ns = 0;
            macro_rules! push {
                ($span:expr) => {{
                    let span = $span;
                    if span.4 > 0 {
                        spans[ns] = span;
                        ns += 1;
                    }
                }};
            }
            push!((kc, vc, hd, 0, sink.min(filled)));
            let a = sink.max(lo);
            if a < p0 && p0 > sink {
                let len = p0 - a;
                let s0 = sink + (a - sink) % w;
                let first = len.min(cap - s0);
                push!((kc, vc, hd, s0, first));
                push!((kc, vc, hd, sink, len - first));
            }
            let sinks_new = sink.saturating_sub(p0).min(t + 1);
            push!((kn, vn, kv_dim, 0, sinks_new));
            let b = sinks_new.max(lo.saturating_sub(p0));
            push!((kn, vn, kv_dim, b, (t + 1).saturating_sub(b)));
            let spans = &spans[..ns];

            let mut c = 0;
            for &(k, _, stride, start, len) in spans {
                simd::dot_rows_f16(
                    q16,
                    &k[start * stride..],
                    stride,
                    scale,
                    &mut scores[c..c + len],
                );
                c += len;
            }
            let m = scores[..c]
                .iter()
                .copied()
                .fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0.0f32;
            for sc in &mut scores[..c] {
                *sc = (*sc - m).exp();
                sum += *sc;
            }
            acc.fill(0.0);
            let mut c = 0;
            for &(_, v, stride, start, len) in spans {
                simd::axpy_rows_f16(acc, &scores[c..c + len], &v[start * stride..], stride);
                c += len;
            }
            let inv = 1.0 / sum;
            for (d, &a) in acc.iter().enumerate() {
                // SAFETY: task (h, tile) writes only head h of the rows t of its tile;
                // (h, tile) pairs are distinct, so writes never overlap, and the index is
                // below n * q_dim = out.len().
                unsafe { *out_ptr.ptr().add(t * q_dim + h * hd + d) = a * inv };
            }
        }
    });

    // Store the run's keys and values. A run longer than a ring overwrites its own early
    // tokens; the last writer of each slot is the newest token, as the ring requires.
    for t in 0..n {
        let p = p0 + t;
        for g in 0..n_kv {
            let row =
                layout.region_offset(seq, layer, g) + ring_slot(layout.capacity(layer, g), sink, p);
            kv.k[row * hd..(row + 1) * hd]
                .copy_from_slice(&k_new[t * kv_dim + g * hd..t * kv_dim + (g + 1) * hd]);
            kv.v[row * hd..(row + 1) * hd]
                .copy_from_slice(&v_new[t * kv_dim + g * hd..t * kv_dim + (g + 1) * hd]);
        }
    }
}
