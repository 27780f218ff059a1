//! The CPU backend against the naive reference forward pass on tiny random models written by our
//! own writer (no download): dense causal attention and span-aware (MoA) caches with ring
//! wrap-around, in one-shot prefill, chunked prefill and token-by-token decode, one sequence or
//! several in one batch.

mod common;

use std::sync::Arc;

use common::reference::RefModel;
use moa::backend::cpu::CpuBackend;
use moa::backend::{Backend, BackendError, BackendOptions};
use moa::formats::GgmlType;
use moa::graph::BatchBuf;
use moa::kv::{visible, KvLayout};
use moa::model::synth::{write_synthetic, SynthSpec};
use moa::model::Model;

fn tiny_model(ty: GgmlType, seed: u64) -> (tempfile::TempDir, Arc<Model>) {
    let mut spec = SynthSpec::tiny(ty, seed);
    if ty.block_size() > 64 {
        // K-quant rows are 256-element super-blocks.
        spec.n_embd = 256;
        spec.n_ff = 512;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write_synthetic(&spec, &path).unwrap();
    let m = Arc::new(Model::load(&path).unwrap());
    (dir, m)
}

fn tokens(n: usize, seed: u32, vocab: u32) -> Vec<u32> {
    let mut x = seed.wrapping_mul(2654435761) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x % vocab
        })
        .collect()
}

fn backend(m: &Arc<Model>, layout: KvLayout, max_batch: usize) -> CpuBackend {
    CpuBackend::new(
        Arc::clone(m),
        BackendOptions {
            max_batch,
            threads: 2,
            layout,
        },
    )
    .unwrap()
}

/// Feeds `toks` to sequence `seq` in chunks of the given sizes (cycled), collecting the logits of
/// every position.
fn run_chunks(be: &mut CpuBackend, seq: u32, toks: &[u32], chunks: &[usize]) -> Vec<Vec<f32>> {
    let nv = be.n_vocab();
    let mut out = Vec::new();
    let mut b = BatchBuf::default();
    let mut i = 0;
    let mut c = 0;
    while i < toks.len() {
        let n = chunks[c % chunks.len()].min(toks.len() - i);
        c += 1;
        b.clear();
        for (t, &tok) in toks.iter().enumerate().skip(i).take(n) {
            b.push(tok, t as u32, seq, true);
        }
        be.forward(&b.as_batch()).unwrap();
        out.extend(be.logits().chunks(nv).map(|r| r.to_vec()));
        i += n;
    }
    out
}

/// Tolerance against the reference for f16 K/V: batches under 64 tokens accumulate values in an
/// f16 accumulator rounded after every key, as llama.cpp's CPU flash attention does (batches of
/// 64+ keep f32 queries where the reference rounds them to f16); both differ from the f64
/// reference by a few f16 ulps of the attention output.
const F16_TOL: f32 = 1e-3;

fn assert_close(ours: &[Vec<f32>], reference: &[Vec<f32>], tol: f32, what: &str) {
    assert_eq!(ours.len(), reference.len());
    let mut worst = 0f32;
    for (p, (a, b)) in ours.iter().zip(reference).enumerate() {
        for (v, (x, y)) in a.iter().zip(b).enumerate() {
            let err = (x - y).abs() / (1.0 + y.abs());
            worst = worst.max(err);
            assert!(
                err <= tol,
                "{what}: position {p} token {v}: {x} vs reference {y}"
            );
        }
    }
    println!("{what}: max rel err {worst:.2e}");
}

#[test]
fn dense_prefill_chunks_and_decode_match_reference() {
    let (_d, m) = tiny_model(GgmlType::F32, 1);
    let c = &m.config;
    let r = RefModel::new(&m);
    let toks = tokens(40, 7, c.n_vocab as u32);
    let reference = r.logits(&toks, |_, _, _, _| true);
    for chunks in [&[40][..], &[1], &[7, 1, 13, 3]] {
        let mut be = backend(
            &m,
            KvLayout::dense(1, c.n_layer, c.n_head_kv, c.head_dim, 64),
            64,
        );
        let ours = run_chunks(&mut be, 0, &toks, chunks);
        assert_close(
            &ours,
            &reference,
            F16_TOL,
            &format!("dense chunks {chunks:?}"),
        );
    }
}

#[test]
fn span_aware_cache_matches_masked_reference_across_ring_wrap() {
    let (_d, m) = tiny_model(GgmlType::F32, 2);
    let c = &m.config;
    let r = RefModel::new(&m);
    let sink = 4;
    // Per (layer, kv head): rings of 4, 7 and 24 slots, and one head that keeps everything.
    let caps = vec![8, 11, 28, 512];
    let layout = KvLayout::with_capacities(
        1,
        c.n_layer,
        c.n_head_kv,
        c.head_dim,
        512,
        sink,
        caps.clone(),
    )
    .unwrap();
    let n = 70;
    let toks = tokens(n, 11, c.n_vocab as u32);
    let reference = r.logits(&toks, |l, g, i, j| {
        visible(caps[l * c.n_head_kv + g], sink, i, j)
    });
    let dense = r.logits(&toks, |_, _, _, _| true);
    for chunks in [&[n][..], &[1], &[5, 1, 17, 2, 9], &[30, 1]] {
        let mut be = backend(&m, layout.clone(), 80);
        let ours = run_chunks(&mut be, 0, &toks, chunks);
        assert_close(
            &ours,
            &reference,
            F16_TOL,
            &format!("spans, chunks {chunks:?}"),
        );
    }
    // The spans really change the result once the rings wrap (the test is not vacuous).
    let diff = (10..n)
        .map(|p| (dense[p][0] - reference[p][0]).abs())
        .fold(0f32, f32::max);
    assert!(diff > 1e-3, "spans made no difference: {diff}");
}

#[test]
fn several_sequences_in_one_batch() {
    let (_d, m) = tiny_model(GgmlType::F32, 3);
    let c = &m.config;
    let r = RefModel::new(&m);
    let sink = 2;
    let caps = vec![6, 9, 12, 300];
    let layout = KvLayout::with_capacities(
        3,
        c.n_layer,
        c.n_head_kv,
        c.head_dim,
        300,
        sink,
        caps.clone(),
    )
    .unwrap();
    let seqs: Vec<Vec<u32>> = (0..3)
        .map(|s| tokens(25 + 5 * s, 100 + s as u32, c.n_vocab as u32))
        .collect();
    let refs: Vec<_> = seqs
        .iter()
        .map(|t| {
            r.logits(t, |l, g, i, j| {
                visible(caps[l * c.n_head_kv + g], sink, i, j)
            })
        })
        .collect();
    let mut be = backend(&m, layout, 64);
    let mut got: Vec<Vec<Vec<f32>>> = vec![Vec::new(); 3];
    let mut done = [0usize; 3];
    let mut b = BatchBuf::default();
    // Interleave: each step takes a few tokens from every unfinished sequence.
    let step = [3usize, 1, 4];
    while done.iter().zip(&seqs).any(|(d, s)| *d < s.len()) {
        b.clear();
        let mut order = Vec::new();
        for s in (0..3).rev() {
            let n = step[s].min(seqs[s].len() - done[s]);
            for (t, &tok) in seqs[s].iter().enumerate().skip(done[s]).take(n) {
                b.push(tok, t as u32, s as u32, true);
                order.push(s);
            }
            done[s] += n;
        }
        be.forward(&b.as_batch()).unwrap();
        for (row, &s) in be.logits().chunks(c.n_vocab).zip(&order) {
            got[s].push(row.to_vec());
        }
    }
    for s in 0..3 {
        assert_close(&got[s], &refs[s], F16_TOL, &format!("sequence {s}"));
    }
}

#[test]
fn quantized_weights_match_reference_within_activation_quantization() {
    for (ty, tol) in [
        (GgmlType::Q8_0, 2e-2),
        (GgmlType::Q4_0, 3e-2),
        (GgmlType::Q4_K, 3e-2),
        (GgmlType::Q6_K, 4e-2),
    ] {
        let (_d, m) = tiny_model(ty, 4);
        let c = &m.config;
        let r = RefModel::new(&m);
        let toks = tokens(24, 5, c.n_vocab as u32);
        let reference = r.logits(&toks, |_, _, _, _| true);
        let mut be = backend(
            &m,
            KvLayout::dense(1, c.n_layer, c.n_head_kv, c.head_dim, 64),
            64,
        );
        let ours = run_chunks(&mut be, 0, &toks, &[9, 1]);
        assert_close(&ours, &reference, tol, &format!("{ty} weights"));
    }
}

#[test]
fn bad_batches_are_errors() {
    let (_d, m) = tiny_model(GgmlType::F32, 5);
    let c = &m.config;
    let mut be = backend(
        &m,
        KvLayout::dense(1, c.n_layer, c.n_head_kv, c.head_dim, 8),
        4,
    );
    let mut b = BatchBuf::default();
    b.push(1, 1, 0, true);
    assert!(matches!(
        be.forward(&b.as_batch()),
        Err(BackendError::BadPosition {
            seq: 0,
            expected: 0,
            found: 1
        })
    ));
    b.clear();
    b.push(1, 0, 3, true);
    assert!(matches!(
        be.forward(&b.as_batch()),
        Err(BackendError::BadSequence { seq: 3, .. })
    ));
    b.clear();
    b.push(c.n_vocab as u32, 0, 0, true);
    assert!(matches!(
        be.forward(&b.as_batch()),
        Err(BackendError::BadToken { .. })
    ));
    b.clear();
    for p in 0..5 {
        b.push(1, p, 0, false);
    }
    assert!(matches!(
        be.forward(&b.as_batch()),
        Err(BackendError::BatchTooLarge { n: 5, max: 4 })
    ));
    for p in 0..8u32 {
        b.clear();
        b.push(1, p, 0, true);
        be.forward(&b.as_batch()).unwrap();
    }
    b.clear();
    b.push(1, 8, 0, true);
    let e = be.forward(&b.as_batch()).unwrap_err();
    assert!(e.to_string().contains("beyond the context of 8"), "{e}");
}
