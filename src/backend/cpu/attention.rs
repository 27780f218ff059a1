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
use crate::kv::{ring_slot, visible, KvLayout};

/// One layer's cache: K and V rows of `head_dim` f16 values, and each slot's absolute position.
pub struct LayerKv {
    pub k: Vec<f16>,
    pub v: Vec<f16>,
    pub pos: Vec<u32>,
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
        let pc = &cache.pos[off..off + filled];
        let slot = rayon::current_thread_index().unwrap_or(0) % scratch.len();
        let mut guard = scratch[slot].lock().unwrap_or_else(|e| e.into_inner());
        let Scratch { scores, q16, acc } = &mut *guard;

        for t in tile * QUERY_TILE..((tile + 1) * QUERY_TILE).min(n) {
            let i = p0 + t;
            {
                simd::f32_to_f16(&q[t * q_dim + h * hd..t * q_dim + (h + 1) * hd], q16);
                // Pass 1: scores of the visible keys, cached slots first, then the run's own.
                let mut m = f32::NEG_INFINITY;
                let mut c = 0;
                for (s, &j) in pc.iter().enumerate() {
                    if visible(cap, sink, i, j as usize) {
                        let sc = simd::dot_f16(q16, &kc[s * hd..(s + 1) * hd]) * scale;
                        m = m.max(sc);
                        scores[c] = sc;
                        c += 1;
                    }
                }
                for t2 in 0..=t {
                    if visible(cap, sink, i, p0 + t2) {
                        let kr = &k_new[t2 * kv_dim + g * hd..t2 * kv_dim + (g + 1) * hd];
                        let sc = simd::dot_f16(q16, kr) * scale;
                        m = m.max(sc);
                        scores[c] = sc;
                        c += 1;
                    }
                }
                // Pass 2: softmax weights and the weighted sum of values, same order.
                acc.fill(0.0);
                let mut sum = 0.0f32;
                let mut c = 0;
                for (s, &j) in pc.iter().enumerate() {
                    if visible(cap, sink, i, j as usize) {
                        let p = (scores[c] - m).exp();
                        sum += p;
                        simd::axpy_f16(acc, p, &vc[s * hd..(s + 1) * hd]);
                        c += 1;
                    }
                }
                for t2 in 0..=t {
                    if visible(cap, sink, i, p0 + t2) {
                        let p = (scores[c] - m).exp();
                        sum += p;
                        simd::axpy_f16(
                            acc,
                            p,
                            &v_new[t2 * kv_dim + g * hd..t2 * kv_dim + (g + 1) * hd],
                        );
                        c += 1;
                    }
                }
                let inv = 1.0 / sum;
                for (d, &a) in acc.iter().enumerate() {
                    // SAFETY: task (h, tile) writes only head h of the rows t of its tile;
                    // (h, tile) pairs are distinct, so writes never overlap, and the index is
                    // below n * q_dim = out.len().
                    unsafe { *out_ptr.ptr().add(t * q_dim + h * hd + d) = a * inv };
                }
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
            kv.pos[row] = p as u32;
        }
    }
}
