//! The GPU profiler (`moa::profile::cuda`) against the CPU profiler on tiny random models.
//!
//! - Without a GPU (CI): the GPU profiler refuses what its kernels cannot do (block sizes, head
//!   dimensions) with a clear error before touching a device, reports a missing GPU as an error
//!   rather than a panic, and `--device auto` falls back to the CPU.
//! - On a GPU (`MOA_REQUIRE_GPU=1` makes its absence a failure): for GQA and MHA, head dimensions
//!   64 and 128, samples shorter than their length bucket, partial tiles, several (also
//!   overlapping) response ranges, tied and untied output, and block sizes 16, 64 and 128: the
//!   loss agrees within 1e-5 relative, dL/d(hidden) and dL/dO of every layer within 1e-4
//!   (sum of |difference| over sum of |CPU value|), and every influence block within 5e-2 of
//!   the largest block of its (layer, KV head) beyond the part of it that f32 cannot resolve
//!   (rows where one key takes nearly all the attention: `ill_conditioned`), their mean within
//!   5e-3. Each case prints its measurements before it checks them.
//!
//! The kernels themselves compile through NVRTC in tests/cuda_backend.rs (`kernels_compile`).

// One-range response lists are what they say.
#![allow(clippy::single_range_in_vec_init)]

mod common;

use std::ops::Range;

use common::gpu_or_skip;
use moa::backend::cuda;
use moa::formats::GgmlType;
use moa::moa::profile_file::packed_index;
use moa::model::synth::{write_synthetic, SynthSpec};
use moa::model::Model;
use moa::profile::cuda::{CudaProfileError, CudaProfiler};
use moa::profile::{forward, influence, linalg};
use moa::profile::{profiler_for, Captured, Profiler, SampleError, SampleProfiler};
use moa::runtime::Device;

fn model(spec: &SynthSpec) -> (tempfile::TempDir, Model) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    write_synthetic(spec, &path).unwrap();
    let m = Model::load(&path).unwrap();
    (dir, m)
}

fn tokens(n: usize, seed: u64, vocab: usize) -> Vec<u32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s % vocab as u64) as u32
        })
        .collect()
}

/// A model shape: query heads, KV heads, head dimension, layers, MLP width.
fn spec(n_head: usize, n_head_kv: usize, head_dim: usize, seed: u64) -> SynthSpec {
    let mut s = SynthSpec::tiny(GgmlType::Q8_0, seed);
    s.n_head = n_head;
    s.n_head_kv = n_head_kv;
    s.n_embd = n_head * head_dim;
    s.n_ff = 2 * s.n_embd;
    s
}

/// sum |a - b| / sum |b|.
fn rel_l1(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let num: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).abs())
        .sum();
    let den: f64 = b.iter().map(|y| (*y as f64).abs()).sum();
    num / den.max(1e-30)
}

struct Case {
    name: &'static str,
    spec: SynthSpec,
    block: usize,
    n: usize,
    length: usize,
    response: Vec<Range<usize>>,
}

/// Rows whose largest attention probability is within this of 1 are ill-conditioned in f32 (see
/// [`ill_conditioned`]).
const ILL_TAU: f64 = 1e-4;

/// Whether `new` is a worse error than `old` (NaN is the worst).
fn worse(new: f64, old: f64) -> bool {
    !old.is_nan() && (new.is_nan() || new > old)
}

/// Per layer, KV head and profile block (packed): the sum of |E_ij| (in f64, from the CPU
/// profiler's f32 activations) over the entries of the query rows i > 0 where one key takes all
/// but less than [`ILL_TAU`] of the row's attention. There E_ij = -A_ij (G_ij - gbar_i) /
/// (1 - A_ij + eps) divides a difference of nearly equal numbers by another: 1 - A_ij (from
/// exp(s - lse), lse rounded to an ulp of the row's largest score, about 1e-6) and G_ij - gbar_i
/// = dO_i . (V_j - O_i) (O_i rounded to a few ulp of V_j) both carry absolute errors near
/// 1e-7..1e-6 against values below 1e-4 here, so each device's f32 result for these entries is
/// off by percents up to their whole size, differently on each device. Measured on the
/// 350-token "again, shorter" sample of the 700-token d128 case (every row a target): layer 0,
/// KV head 0 attends almost only to the diagonal, and these rows make 20-46% of its diagonal
/// blocks (block 0: 32% of the head's largest); the kernels under the emulator (tools/cuda-emu)
/// given one-ulp changes of V and dO move block 0 by 1% of the largest, two CPU runs (dK, dV
/// added in another order) by 0.8%, while the other heads' blocks agree to 1e-7.
fn ill_conditioned(
    cpu: &Profiler,
    toks: &[u32],
    d_attn_out: &[Vec<f32>],
    blocks: usize,
) -> Vec<Vec<Vec<f64>>> {
    let dm = &cpu.dense;
    let c = &dm.config;
    let n = toks.len();
    let (d, qw, kvw) = (c.head_dim, c.q_dim(), c.kv_dim());
    let gs = c.n_head / c.n_head_kv;
    let scale = 1.0 / (d as f64).sqrt();
    let rope = linalg::RopeTable::new(&c.rope, n);
    let ck = forward::forward(dm, toks, &rope, cpu.block);
    let mut out = vec![vec![vec![0f64; blocks * (blocks + 1) / 2]; c.n_head_kv]; c.n_layer];
    let dot =
        |a: &[f32], b: &[f32]| -> f64 { a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum() };
    for l in 0..c.n_layer {
        let a = forward::attn_inputs(dm, l, &ck.x[l], &rope);
        let d_o = &d_attn_out[l];
        for h in 0..c.n_head {
            let g = h / gs;
            let mut sc = vec![0f64; n];
            for i in 1..n {
                let qi = &a.q[i * qw + h * d..i * qw + (h + 1) * d];
                for (j, s) in sc[..=i].iter_mut().enumerate() {
                    *s = scale * dot(qi, &a.k[j * kvw + g * d..j * kvw + (g + 1) * d]);
                }
                let m = sc[..=i].iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b));
                let z: f64 = sc[..=i].iter().map(|s| (s - m).exp()).sum();
                // The largest probability is 1 / z.
                if 1.0 - 1.0 / z >= ILL_TAU {
                    continue;
                }
                let doi = &d_o[i * qw + h * d..i * qw + (h + 1) * d];
                let gm: Vec<f64> = (0..=i)
                    .map(|j| dot(doi, &a.v[j * kvw + g * d..j * kvw + (g + 1) * d]))
                    .collect();
                let p: Vec<f64> = sc[..=i].iter().map(|s| (s - m).exp() / z).collect();
                let gbar: f64 = p.iter().zip(&gm).map(|(p, g)| p * g).sum();
                for j in 0..=i {
                    let e = p[j] * (gm[j] - gbar) / (1.0 - p[j] + influence::EPS as f64);
                    out[l][g][packed_index(i / cpu.block, j / cpu.block)] += e.abs();
                }
            }
        }
    }
    out
}

/// Profiles one sample on both devices, prints what it measured (the line survives
/// `gpu-check.sh gprofile`'s filter, also when a check then fails) and checks the tolerances;
/// returns the worst errors (loss, hidden, attention output, influence beyond the
/// ill-conditioned part).
fn compare(gpu: &dyn SampleProfiler, cpu: &Profiler, m: &Model, case: &Case) -> [f64; 4] {
    let toks = tokens(case.n, case.n as u64 + 7, m.config.n_vocab);
    let mut cap_c = Captured::default();
    let rc = cpu
        .profile_sample(&toks, &case.response, case.length, Some(&mut cap_c))
        .unwrap();
    let mut cap_g = Captured::default();
    let rg = gpu
        .profile_sample(&toks, &case.response, case.length, Some(&mut cap_g))
        .unwrap_or_else(|e| panic!("{}: GPU profile failed: {e}", case.name));
    let name = case.name;
    assert_eq!(rg.n_targets, rc.n_targets);
    let el = (rg.loss - rc.loss).abs() / rc.loss.abs();
    let c = &m.config;
    // Worst (error, layer) of dL/d(hidden) and dL/dO.
    let (mut eh, mut eo) = ((0f64, 0), (0f64, 0));
    for l in 0..c.n_layer {
        let h = rel_l1(&cap_g.d_hidden[l], &cap_c.d_hidden[l]);
        let o = rel_l1(&cap_g.d_attn_out[l], &cap_c.d_attn_out[l]);
        if worse(h, eh.0) {
            eh = (h, l);
        }
        if worse(o, eo.0) {
            eo = (o, l);
        }
    }
    let (ig, ic) = (&rg.influence, &rc.influence);
    assert_eq!(
        (ig.n_layer, ig.n_head_kv, ig.blocks),
        (ic.n_layer, ic.n_head_kv, ic.blocks)
    );
    // Influence blocks: E_ij = -A_ij (G_ij - sum_k G_ik A_ik) / (1 - A_ij) cancels in both
    // numerator and denominator where one key takes almost all of a row's attention (the
    // first rows of a sequence, sink columns), so the devices' last-bit differences grow there
    // (measured on an H100: up to 1.8% of the head's largest block in the diagonal block of a
    // d128 case; more where such rows carry a larger part of a block, see `ill_conditioned`).
    // Each block's difference beyond its ill-conditioned part (the |E| sum of those rows,
    // computed in f64) must stay within 5e-2 of its head's largest block, their mean over the
    // head's blocks within 5e-3; the raw difference is printed next to it.
    let ill = ill_conditioned(cpu, &toks, &cap_c.d_attn_out, ic.blocks);
    #[derive(Default, Clone, Copy)]
    struct Worst {
        excess: f64,
        raw: f64,
        ill: f64,
        at: (usize, usize, usize),
        gpu: f64,
        cpu: f64,
        scale: f64,
    }
    let (mut worst, mut worst_raw, mut worst_mean) =
        (Worst::default(), Worst::default(), (0f64, 0, 0));
    let mut no_influence = None;
    for (l, ill_l) in ill.iter().enumerate() {
        for (g, ill_g) in ill_l.iter().enumerate() {
            let (a, b) = (&ig.sums[l][g], &ic.sums[l][g]);
            let scale = b.iter().fold(0f64, |m, v| m.max(v.abs()));
            if scale.is_nan() || scale <= 0.0 {
                no_influence.get_or_insert((l, g));
                continue;
            }
            let mut sum = 0f64;
            for (k, (x, y)) in a.iter().zip(b).enumerate() {
                let raw = (x - y).abs() / scale;
                let share = ill_g[k] / scale;
                // NaN-propagating: a NaN block is the worst.
                let excess = if raw.is_nan() {
                    f64::NAN
                } else {
                    (raw - share).max(0.0)
                };
                let here = Worst {
                    excess,
                    raw,
                    ill: share,
                    at: (l, g, k),
                    gpu: *x,
                    cpu: *y,
                    scale,
                };
                if worse(excess, worst.excess) || (excess == worst.excess && worse(raw, worst.raw))
                {
                    worst = here;
                }
                if worse(raw, worst_raw.raw) {
                    worst_raw = here;
                }
                sum += excess;
            }
            let mean = sum / a.len().max(1) as f64;
            if worse(mean, worst_mean.0) {
                worst_mean = (mean, l, g);
            }
        }
    }
    let (wl, wg, wk) = worst.at;
    println!(
        "{name}: loss {:.6} rel {el:.1e}; dL/d(hidden) {:.1e} (layer {}); dL/dO {:.1e} (layer {}); \
         influence blocks {:.1e} of the largest (layer {} KV head {} block {}, ill-conditioned \
         {:.1e}), beyond the ill-conditioned part {:.1e} \
         (layer {wl} KV head {wg} block {wk}: {:.6e} GPU vs {:.6e} CPU, largest {:.6e}, \
         difference {:.1e}, ill-conditioned {:.1e}), worst head mean {:.1e} (layer {} KV head {})",
        rg.loss,
        eh.0,
        eh.1,
        eo.0,
        eo.1,
        worst_raw.raw,
        worst_raw.at.0,
        worst_raw.at.1,
        worst_raw.at.2,
        worst_raw.ill,
        worst.excess,
        worst.gpu,
        worst.cpu,
        worst.scale,
        worst.raw,
        worst.ill,
        worst_mean.0,
        worst_mean.1,
        worst_mean.2,
    );
    assert!(
        el < 1e-5,
        "{name}: loss {} (GPU) vs {} (CPU)",
        rg.loss,
        rc.loss
    );
    assert!(
        eh.0 < 1e-4,
        "{name}: layer {} dL/d(hidden) relative error {:.2e}",
        eh.1,
        eh.0
    );
    assert!(
        eo.0 < 1e-4,
        "{name}: layer {} dL/dO relative error {:.2e}",
        eo.1,
        eo.0
    );
    if let Some((l, g)) = no_influence {
        panic!("{name}: layer {l} head {g}: no influence at all");
    }
    assert!(
        worst.excess < 5e-2,
        "{name}: layer {wl} KV head {wg} block {wk}: {} (GPU) vs {} (CPU), largest {}: \
         difference {:.2e} of the largest, {:.2e} beyond the ill-conditioned part",
        worst.gpu,
        worst.cpu,
        worst.scale,
        worst.raw,
        worst.excess
    );
    assert!(
        worst_mean.0 < 5e-3,
        "{name}: layer {} KV head {}: mean block difference beyond the ill-conditioned part \
         {:.2e} of the largest",
        worst_mean.1,
        worst_mean.2,
        worst_mean.0
    );
    [el, eh.0, eo.0, worst.excess]
}

#[test]
fn gpu_profile_matches_cpu() {
    if !gpu_or_skip("gpu_profile_matches_cpu") {
        return;
    }
    let mut tied = spec(4, 1, 64, 31);
    tied.untied_output = false;
    let cases = vec![
        Case {
            name: "GQA 4/2, d64, 150 tokens at 256, two ranges",
            spec: spec(4, 2, 64, 11),
            block: 64,
            n: 150,
            length: 256,
            response: vec![60..90, 120..150],
        },
        Case {
            name: "GQA 2/1, d128, 200 tokens at 256, early and late ranges",
            spec: spec(2, 1, 128, 12),
            block: 64,
            n: 200,
            length: 256,
            response: vec![1..10, 100..200],
        },
        Case {
            name: "MHA 2/2, d64, block 16, 100 tokens at 128, overlapping ranges",
            spec: spec(2, 2, 64, 13),
            block: 16,
            n: 100,
            length: 128,
            response: vec![50..80, 70..90],
        },
        Case {
            name: "GQA 6/2, d64, block 128, 300 tokens at 384",
            spec: spec(6, 2, 64, 14),
            block: 128,
            n: 300,
            length: 384,
            response: vec![250..300],
        },
        Case {
            name: "GQA 4/1, d64, tied output, 64 tokens at 64 (one full tile)",
            spec: tied,
            block: 64,
            n: 64,
            length: 64,
            response: vec![32..64],
        },
        Case {
            name: "GQA 4/2, d128, 700 tokens at 1024 (11 tiles, 300 targets: two loss chunks)",
            spec: spec(4, 2, 128, 15),
            block: 64,
            n: 700,
            length: 1024,
            response: vec![400..700],
        },
        Case {
            name: "GQA 3/1, d64, 5 tokens at 64",
            spec: spec(3, 1, 64, 16),
            block: 64,
            n: 5,
            length: 64,
            response: vec![1..5],
        },
    ];
    let mut worst = [0f64; 4];
    for case in &cases {
        let (_dir, m) = model(&case.spec);
        let gpu = CudaProfiler::new(&m, case.block)
            .unwrap_or_else(|e| panic!("{}: GPU profiler: {e}", case.name));
        let cpu = Profiler::new(&m, case.block).unwrap();
        let e = compare(&gpu, &cpu, &m, case);
        for (w, v) in worst.iter_mut().zip(e) {
            *w = w.max(v);
        }
        // The same profiler again on a shorter sample reuses its buffers.
        let short = Case {
            name: "again, shorter",
            spec: case.spec.clone(),
            block: case.block,
            n: case.n.div_ceil(2).max(2),
            length: case.length,
            response: vec![1..case.n.div_ceil(2).max(2)],
        };
        compare(&gpu, &cpu, &m, &short);
    }
    println!(
        "worst: loss {:.1e}, dL/d(hidden) {:.1e}, dL/dO {:.1e}, influence {:.1e}",
        worst[0], worst[1], worst[2], worst[3]
    );
}

/// Runs everywhere: the comparison itself (`compare`, `ill_conditioned`) on the CPU profiler
/// against a second CPU profiler of the same model, on the sample where an H100 run first
/// exceeded the old plain 5e-2 bound (the 350-token "again, shorter" sample of the 700-token d128
/// case: every row a target, so the ill-conditioned diagonal rows of layer 0 carry much of their
/// blocks). Two CPU runs differ only in the order rayon adds dK and dV, yet those rows' blocks
/// move (up to 8e-3 of the head's largest block, measured); all of it within the ill-conditioned
/// part.
#[test]
fn influence_check_on_cpu() {
    let (_dir, m) = model(&spec(4, 2, 128, 15));
    let a = Profiler::new(&m, 64).unwrap();
    let b = Profiler::new(&m, 64).unwrap();
    let case = Case {
        name: "CPU vs CPU, GQA 4/2, d128, 350 tokens at 1024",
        spec: spec(4, 2, 128, 15),
        block: 64,
        n: 350,
        length: 1024,
        response: vec![1..350],
    };
    let e = compare(&a, &b, &m, &case);
    assert!(e[0] < 1e-12 && e[3] < 1e-3, "{e:?}");
}

/// Bad samples are errors on the GPU as on the CPU.
#[test]
fn gpu_profile_rejects_bad_samples() {
    if !gpu_or_skip("gpu_profile_rejects_bad_samples") {
        return;
    }
    let s = spec(4, 2, 64, 3);
    let (_dir, m) = model(&s);
    let gpu = CudaProfiler::new(&m, 64).unwrap();
    let toks = tokens(40, 1, m.config.n_vocab);
    let too_long = gpu.profile_sample(&toks, &[1..40], 32, None);
    assert!(matches!(too_long, Err(SampleError::TooLong { .. })));
    let mut bad = toks.clone();
    bad[5] = m.config.n_vocab as u32;
    let e = gpu.profile_sample(&bad, &[1..40], 64, None);
    assert!(matches!(e, Err(SampleError::BadToken { pos: 5, .. })));
    let e = gpu.profile_sample(&toks, &[0..3], 64, None);
    assert!(matches!(e, Err(SampleError::BadRange { .. })));
    // Still usable after the refusals.
    assert!(gpu.profile_sample(&toks, &[10..40], 64, None).is_ok());
}

/// Runs everywhere: what the GPU profiler cannot do is refused before any device is touched,
/// a missing GPU is an error (never a panic), and `auto` falls back to the CPU.
#[test]
fn gpu_profiler_refusals_and_fallback() {
    let s = spec(4, 2, 64, 4);
    let (_dir, m) = model(&s);
    for block in [48, 96, 0] {
        match CudaProfiler::new(&m, block) {
            Err(CudaProfileError::Unsupported(why)) => {
                assert!(why.contains("divides 64"), "{why}")
            }
            Err(e) => panic!("block {block}: {e}"),
            Ok(_) => panic!("block {block} accepted"),
        }
    }
    let (_dir32, m32) = model(&spec(4, 2, 32, 5));
    match CudaProfiler::new(&m32, 64) {
        Err(CudaProfileError::Unsupported(why)) => assert!(why.contains("head dimension 32")),
        Err(e) => panic!("head dim 32: {e}"),
        Ok(_) => panic!("head dimension 32 accepted"),
    }
    // Auto falls back to the CPU for what the kernels cannot do.
    let p = profiler_for(&m32, 64, Device::Auto).unwrap();
    assert!(p.describe().starts_with("CPU"), "{}", p.describe());
    let p = profiler_for(&m, 64, Device::Cpu).unwrap();
    assert!(p.describe().starts_with("CPU"));
    if cuda::probe().is_err() {
        let e = CudaProfiler::new(&m, 64)
            .err()
            .expect("no GPU, yet a profiler");
        assert!(matches!(e, CudaProfileError::Device(_)), "{e}");
        assert!(profiler_for(&m, 64, Device::Cuda).is_err());
        let p = profiler_for(&m, 64, Device::Auto).unwrap();
        assert!(p.describe().starts_with("CPU"), "{}", p.describe());
    }
}
