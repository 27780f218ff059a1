//! The CUDA backend against CPU references on fresh random data.
//!
//! - Every kernel compiles through NVRTC (CI has no GPU but installs NVRTC; with
//!   `MOA_REQUIRE_NVRTC=1` a missing NVRTC fails instead of skipping).
//! - On a GPU (`MOA_REQUIRE_GPU=1` makes its absence a failure): each weight type's decode
//!   (1..8 tokens, q8_1 activations) and prefill (f16 tiles + cuBLAS) products against the f64
//!   product of the dequantized weight with the activations as the kernel sees them; and whole
//!   models (every op, dense and random span plans, prefill in chunks and decode across ring
//!   wrap-around) against the CPU backend, for each K/V cache type pair (f16, q8_0, mixed: the
//!   same cache bytes on both sides); a backend re-planned for other plans and lengths
//!   against a fresh one, and moa-eval's runner on the GPU (one backend for every trial).
//! - Exact attention (cuda/attention_exact.cu): the kernel against the CPU backend's attention
//!   bit for bit on random inputs (the same cases run under CPU emulation in
//!   tools/cuda-emu/attn_exact_check.sh), and the default model's greedy continuations with it.

mod common;

use std::sync::Arc;

use common::{gpu_or_skip, require};
use moa::backend::cpu::CpuBackend;
use moa::backend::cuda::{self, CudaBackend, DecodeKernels, MatmulHarness, GPU_TYPES};
use moa::backend::BackendOptions;
use moa::formats::GgmlType;
use moa::kv::{KvLayout, KvType, KvTypes};
use moa::moa::{Plan, Rule};
use moa::model::synth::{write_synthetic, SynthSpec};
use moa::model::Model;

#[test]
fn kernels_compile_through_nvrtc() {
    if !cuda::device::nvrtc_present() {
        assert!(
            !require("MOA_REQUIRE_NVRTC"),
            "MOA_REQUIRE_NVRTC=1 but libnvrtc.so.13 cannot be loaded (LD_LIBRARY_PATH?)"
        );
        eprintln!("skipping: NVRTC is not installed (libnvrtc.so.13 not found)");
        return;
    }
    // sm_90 covers the bulk L2 prefetch asm; sm_80 and sm_86 the older targets (every one builds
    // the attention pipeline with fa_stages() stages).
    for arch in ["sm_90", "sm_80", "sm_86"] {
        let ptx = cuda::kernels::compile(arch).unwrap_or_else(|e| panic!("{arch}: {e}"));
        if let Ok(dir) = std::env::var("MOA_DUMP_PTX") {
            std::fs::write(format!("{dir}/{arch}.ptx"), &ptx).unwrap();
        }
        for name in [
            "quantize_q8_1",
            "mmvq_q4_k_1",
            "mmvq_q6_k_16",
            "mmvq_q5_0_8",
            "mv_f32",
            "dequant_f16_q5_k",
            "embed_q4_1",
            "attn_dec_d64",
            "attn_dec_d128",
            "attn_pre_d64",
            "attn_pre_d128",
            "attn_dec_d64_k8v8",
            "attn_dec_d128_k8v16",
            "attn_pre_d64_k16v8",
            "attn_pre_d128_k8v8",
            "kv_quant_q8_0",
            "kv_store_rows",
            "attn_merge",
            "attn_merge_wide",
            "attn_exact_d64",
            "attn_exact_d128",
            "add_rms_norm_q8_4",
            "add_rms_norm_q8_8",
            "add_rms_norm_q8_16",
            "swiglu_q8",
            "rope_kv",
            "kv_store",
            "argmax_rows",
            // The profiler's kernels (cuda/profile.cu; tests/cuda_profile.rs runs them).
            "prof_gather",
            "prof_scatter_add",
            "prof_add",
            "prof_swiglu",
            "prof_swiglu_bwd",
            "prof_rms_norm",
            "prof_rms_norm_bwd",
            "prof_rope",
            "prof_xent",
            "prof_attn_dsum",
            "prof_attn_fwd_d64",
            "prof_attn_fwd_d128",
            "prof_attn_bwd_q_d64",
            "prof_attn_bwd_q_d128",
            "prof_attn_bwd_kv_d64",
            "prof_attn_bwd_kv_d128",
        ] {
            assert!(
                ptx.contains(&format!(".entry {name}(")),
                "{arch}: kernel {name} missing from the PTX"
            );
        }
    }
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn f(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
}

/// What the decode kernels see of an activation row: its q8_1 blocks as ggml's x86 quantizer
/// writes them (`d = f16(max / 127)`, ties to even, `s = f16(d * sum q)`): the values `q * d`
/// and, per 32-value block, how far the stored `s` is from `d * sum q` (the kernels take a
/// weight block's additive offset times `s`, see [`block_offsets`]).
fn q8_1_view(x: &[f32]) -> (Vec<f64>, Vec<f64>) {
    let mut q8 = vec![0u8; x.len() / 32 * 36];
    ggml_compat::q8::quantize_q8_1_x86(x, &mut q8);
    let (mut vals, mut s_err) = (Vec::with_capacity(x.len()), Vec::new());
    for blk in q8.chunks_exact(36) {
        let d = f16_at(blk, 0);
        let s = f16_at(blk, 2);
        let qs = blk[4..].iter().map(|&q| q as i8 as f64);
        let sum: f64 = qs.clone().sum();
        vals.extend(qs.map(|q| q * d));
        s_err.push(s - d * sum);
    }
    (vals, s_err)
}

/// What the K-quants' tensor-core kernels see: the values as ggml's q8_K holds them (one f32
/// scale per 256 values; the block sums of the min terms are exact integers, so no correction).
fn q8_k_view(x: &[f32]) -> Vec<f64> {
    const BYTES: usize = 4 + 256 + 32;
    let mut q8 = vec![0u8; x.len() / 256 * BYTES];
    ggml_compat::q8::quantize_q8_k(x, &mut q8);
    let mut vals = Vec::with_capacity(x.len());
    for blk in q8.chunks_exact(BYTES) {
        let d = f32::from_le_bytes([blk[0], blk[1], blk[2], blk[3]]) as f64;
        vals.extend(blk[4..260].iter().map(|&q| q as i8 as f64 * d));
    }
    vals
}

fn f16_at(b: &[u8], at: usize) -> f64 {
    half::f16::from_le_bytes([b[at], b[at + 1]]).to_f64()
}

/// Per 32 values of a quantized row, the constant the decode kernels add as `offset * s` with
/// the activation block's `s` instead of folding it into the integer dot: the -8 d / -16 d of
/// Q4_0 / Q5_0, the min of Q4_1 / Q5_1, -dmin * m of each Q4_K / Q5_K sub-block; zero for the
/// types without one.
fn block_offsets(ty: GgmlType, row: &[u8]) -> Vec<f64> {
    let per = |bytes: usize| row.chunks_exact(bytes);
    match ty {
        GgmlType::Q4_0 => per(18).map(|b| -8.0 * f16_at(b, 0)).collect(),
        GgmlType::Q5_0 => per(22).map(|b| -16.0 * f16_at(b, 0)).collect(),
        GgmlType::Q4_1 => per(20).map(|b| f16_at(b, 2)).collect(),
        GgmlType::Q5_1 => per(24).map(|b| f16_at(b, 2)).collect(),
        GgmlType::Q4_K | GgmlType::Q5_K => per(if ty == GgmlType::Q4_K { 144 } else { 176 })
            .flat_map(|b| {
                let dmin = f16_at(b, 2) as f32;
                let sc = &b[4..16];
                (0..8).map(move |j| {
                    let m = if j < 4 {
                        sc[j + 4] & 63
                    } else {
                        (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4)
                    };
                    -((dmin * m as f32) as f64)
                })
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// What the prefill path sees: f16-rounded values.
fn f16_view(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| half::f16::from_f32(v).to_f64()).collect()
}

#[test]
fn matmul_kernels_match_dequantized_reference() {
    if !gpu_or_skip("matmul_kernels_match_dequantized_reference") {
        return;
    }
    let h = MatmulHarness::new().unwrap();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    for &ty in GPU_TYPES {
        // Wide rows take the kernels' unrolled paths (2 and 4 units per lane in flight).
        for &(rows, cols) in &[(37usize, 256usize), (130, 512), (9, 4096), (6, 14336)] {
            let wf: Vec<f32> = (0..rows * cols).map(|_| rng.f() * 0.5).collect();
            let mut w = vec![0u8; ty.bytes_for((rows * cols) as u64).unwrap() as usize];
            for (src, dst) in wf
                .chunks(cols)
                .zip(w.chunks_mut(ty.bytes_for(cols as u64).unwrap() as usize))
            {
                ggml_compat::quantize_row(ty, src, dst).unwrap();
            }
            let row_bytes = ty.bytes_for(cols as u64).unwrap() as usize;
            let mut wd = vec![0f32; rows * cols];
            for (src, dst) in w
                .chunks(ty.bytes_for(cols as u64).unwrap() as usize)
                .zip(wd.chunks_mut(cols))
            {
                ggml_compat::dequantize_row(ty, src, dst).unwrap();
            }
            for &n in &[1usize, 3, 8, 13, 16, 40, 90] {
                let x: Vec<f32> = (0..n * cols).map(|_| rng.f()).collect();
                // Quantized weights take the decode kernels (16 tokens per launch) up to
                // QUANT_PREFILL_MAX tokens, float weights up to MV_MAXT; larger batches cuBLAS.
                let float = matches!(ty, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16);
                let decode = n <= cuda::MV_MAXT || (!float && n <= cuda::QUANT_PREFILL_MAX);
                let quantized_acts = decode && !float;
                // Quantized decode products: the dp4a kernels (warps per row by shape, and 4)
                // and the tensor-core kernels, each against the reference.
                let variants: Vec<(&str, DecodeKernels)> = if quantized_acts {
                    vec![
                        ("dp4a", DecodeKernels::dp4a(None)),
                        ("dp4a wpr=4", DecodeKernels::dp4a(Some(4))),
                        ("mma", DecodeKernels::mma_from(1)),
                        // One token streamed: default tiles, and one row per tile.
                        ("stream", DecodeKernels::stream(cuda::matmul::MV_TILE)),
                        ("stream 1 row", DecodeKernels::stream(1)),
                    ]
                } else {
                    vec![("", DecodeKernels::from_env())]
                };
                for (kname, dk) in variants {
                    let got = h.run(ty, rows, cols, &w, &x, n, dk, false).unwrap();
                    let mut max_err = 0f64;
                    let mut scale = 0f64;
                    // (token, row, got, want) of the worst entry and how many exceed the tolerance.
                    let mut worst = (0usize, 0usize, 0f64, 0f64);
                    let mut n_bad = 0usize;
                    for t in 0..n {
                        let xr = &x[t * cols..(t + 1) * cols];
                        // Tokens go 16 at a time; the K-quants' tensor-core path takes q8_K.
                        let chunk = (n - t / cuda::MV_MAXT * cuda::MV_MAXT).min(cuda::MV_MAXT);
                        let mma = quantized_acts
                            && dk.choose(ty, chunk, cols, rows, h.gpu.sms)
                                == cuda::matmul::DecodePath::Mma;
                        let q8k =
                            mma && matches!(ty, GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K);
                        let (xv, s_err): (Vec<f64>, Vec<f64>) = if q8k {
                            (q8_k_view(xr), Vec::new())
                        } else if quantized_acts {
                            q8_1_view(xr)
                        } else if decode {
                            (xr.iter().map(|&v| v as f64).collect(), Vec::new())
                        } else {
                            (f16_view(xr), Vec::new())
                        };
                        for r in 0..rows {
                            let wr = &wd[r * cols..(r + 1) * cols];
                            let wv: Vec<f64> = if decode {
                                wr.iter().map(|&v| v as f64).collect()
                            } else {
                                f16_view(wr)
                            };
                            let offsets = if s_err.is_empty() {
                                Vec::new()
                            } else {
                                block_offsets(ty, &w[r * row_bytes..(r + 1) * row_bytes])
                            };
                            let want: f64 = wv.iter().zip(&xv).map(|(a, b)| a * b).sum::<f64>()
                                + offsets.iter().zip(&s_err).map(|(o, e)| o * e).sum::<f64>();
                            let abs: f64 = wv.iter().zip(&xv).map(|(a, b)| (a * b).abs()).sum();
                            scale = scale.max(abs);
                            let g = got[t * rows + r] as f64;
                            let err = (g - want).abs() / (abs + 1e-6);
                            n_bad += (err >= 2e-5) as usize;
                            if err > max_err {
                                max_err = err;
                                worst = (t, r, g, want);
                            }
                        }
                    }
                    assert!(
                    max_err < 2e-5,
                    "{} {kname} {rows}x{cols} n={n}: relative error {max_err:e} (scale {scale}); \
                     worst at token {} row {}: got {} want {}; {n_bad} of {} entries off",
                    ty.name(),
                    worst.0,
                    worst.1,
                    worst.2,
                    worst.3,
                    n * rows
                );
                }
            }
        }
    }
}

/// A random span plan for `c` (rules alpha in [alpha0, alpha0 + alpha_range), beta in steps of
/// `beta_step`) with the given constants, sized for `n` tokens.
#[allow(clippy::too_many_arguments)]
fn random_plan_layout(
    rng: &mut Rng,
    c: &moa::model::ModelConfig,
    n: usize,
    alpha0: f32,
    alpha_range: u64,
    beta_steps: u64,
    beta_step: f32,
    (sink, min_span, align): (u32, u32, u32),
) -> KvLayout {
    let rules = (0..c.n_layer * c.n_head_kv)
        .map(|_| Rule {
            alpha: (rng.next() % alpha_range) as f32 + alpha0,
            beta: (rng.next() % beta_steps) as f32 * beta_step,
        })
        .collect();
    let mut p = Plan::new(c.n_layer, c.n_head_kv, rules, "test");
    p.sink = sink;
    p.min_span = min_span;
    p.align = align;
    p.layout(c, 1, n)
}

/// Worst relative logit difference (per row, against the row's largest CPU logit) between the
/// CPU and CUDA backends over `toks`: `prompt` tokens in chunks of `chunk`, then one at a time.
fn gpu_vs_cpu_worst(
    model: &Arc<Model>,
    layout: &KvLayout,
    max_batch: usize,
    toks: &[u32],
    prompt: usize,
    chunk: usize,
) -> f32 {
    let opts = BackendOptions {
        max_batch,
        threads: 2,
        layout: layout.clone(),
    };
    let mut cpu = CpuBackend::new(Arc::clone(model), opts.clone()).unwrap();
    let mut gpu = CudaBackend::new(Arc::clone(model), opts).unwrap();
    // The cache takes exactly the layout's bytes in its types, as on the CPU.
    {
        use moa::backend::Backend;
        assert_eq!(gpu.kv_alloc_bytes(), layout.bytes(), "{}", layout.types());
        assert_eq!(gpu.kv_bytes(), cpu.kv_bytes());
    }
    let a = common::logits_all(&mut cpu, toks, prompt, chunk);
    let b = common::logits_all(&mut gpu, toks, prompt, chunk);
    worst_relative(&a, &b)
}

/// Worst difference between two runs' logit rows, each relative to the row's largest `want`
/// logit (at least 1).
fn worst_relative(want: &[Vec<f32>], got: &[Vec<f32>]) -> f32 {
    let mut worst = 0f32;
    for (ra, rb) in want.iter().zip(got) {
        let scale = ra.iter().fold(0f32, |m, v| m.max(v.abs())).max(1.0);
        for (x, y) in ra.iter().zip(rb) {
            worst = worst.max((x - y).abs() / scale);
        }
    }
    worst
}

fn gpu_spec(ty: GgmlType, seed: u64) -> SynthSpec {
    let mut s = SynthSpec::tiny(ty, seed);
    s.n_embd = 256;
    s.n_head = 4; // head_dim 64
    s.n_head_kv = 2;
    s.n_ff = 512;
    s
}

/// The K/V cache type pairs the attention tests run: f16 (llama.cpp's default), q8_0 for both,
/// and each mixed pair (every combination the attention kernels are built for).
const KV_TYPES: [KvTypes; 4] = moa::backend::cuda::kernels::ATTN_TYPES;

/// Extra logit difference (relative to the row's largest logit) allowed when K is q8_0: both
/// backends read the same q8_0 cache blocks, but the CPU scores them with the query quantized to
/// q8_0 too (as llama.cpp's CPU flash attention does) while the GPU keeps the query in f16.
/// Estimate: a q8_0 rounding error is uniform within half a step of `amax / 127`, so its RMS is
/// about `2.5 / 127 / sqrt(12)` = 0.6% of the RMS of a 32-value block (amax about 2.5 RMS); each
/// score moves by about 0.6% of the scores' spread, as much as the K cache's own quantization
/// moves it. Measured on the CPU with the synthetic models of these tests (1200 tokens, dense),
/// the f16-vs-q8_0-K logit difference, which holds the K and the Q quantization together, is at
/// most 5.2e-3 (F32 weights; 6.1e-3 with V q8_0 as well), so the Q term alone is below that:
/// the allowance is twice the largest of these. q8_0 V adds only the f16 rounding of `d * q` in
/// shared memory (2^-12 relative) on the GPU, within the f16 bound. A span or ring error moves
/// logits by tens of percent.
fn q8_allowance(types: KvTypes) -> f32 {
    if types.k == KvType::Q8_0 {
        1e-2
    } else {
        0.0
    }
}

#[test]
fn cuda_backend_matches_cpu_backend() {
    if !gpu_or_skip("cuda_backend_matches_cpu_backend") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(77);
    for (ti, &ty) in [
        GgmlType::F32,
        GgmlType::Q8_0,
        GgmlType::Q4_K,
        GgmlType::Q6_K,
    ]
    .iter()
    .enumerate()
    {
        let path = dir.path().join(format!("m{ti}.gguf"));
        write_synthetic(&gpu_spec(ty, 5 + ti as u64), &path).unwrap();
        let model = Arc::new(Model::load(&path).unwrap());
        let c = model.config.clone();
        for case in 0..4 {
            let n = 60 + (rng.next() % 80) as usize;
            let prompt = 1 + (rng.next() % (n as u64 - 1)) as usize;
            let chunk = [1usize, 5, 16, 32][case];
            let layout = if case == 0 {
                KvLayout::dense(1, c.n_layer, c.n_head_kv, c.head_dim, n)
            } else {
                random_plan_layout(&mut rng, &c, n, -10.0, 40, 5, 0.2, (4, 8, 4))
            };
            let toks: Vec<u32> = (0..n)
                .map(|_| (rng.next() % c.n_vocab as u64) as u32)
                .collect();
            for types in KV_TYPES {
                let layout = layout.clone().with_types(types).unwrap();
                let worst = gpu_vs_cpu_worst(&model, &layout, 32, &toks, prompt, chunk);
                // Activations differ in format between the backends (q8_K/q8_0 on the CPU; q8_1,
                // f16, or q8_K on the K-quant tensor-core path on the GPU); a span or ring error
                // moves logits by far more.
                let tol = if ty == GgmlType::F32 { 2e-3 } else { 3e-2 } + q8_allowance(types);
                assert!(
                    worst < tol,
                    "{} KV {types} case {case} (n {n}, prompt {prompt}, chunk {chunk}): worst relative logit difference {worst}",
                    ty.name()
                );
                eprintln!("{} KV {types} case {case}: worst {worst:.2e}", ty.name());
            }
        }
    }
}

/// A Q4_K/Q5_K model with rows as wide as real ones (2048 and 5120) takes the width-dependent
/// product paths: the one-unit 16-token kernels (`mmqs1`, rows up to 4096 wide) and the two-unit
/// ones on wider rows (the 5120-wide down projection), at 1, 5 and 16 tokens per step: the
/// GPU's logits stay within the quantized-activation tolerance of the CPU backend's.
#[test]
fn cuda_backend_wide_k_quant_model_matches_cpu() {
    if !gpu_or_skip("cuda_backend_wide_k_quant_model_matches_cpu") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(91);
    for (ti, &ty) in [GgmlType::Q4_K, GgmlType::Q5_K].iter().enumerate() {
        let mut spec = SynthSpec::tiny(ty, 40 + ti as u64);
        spec.n_embd = 2048;
        spec.n_head = 16; // head_dim 128
        spec.n_head_kv = 4;
        spec.n_ff = 5120;
        let path = dir.path().join(format!("w{ti}.gguf"));
        write_synthetic(&spec, &path).unwrap();
        let model = Arc::new(Model::load(&path).unwrap());
        let c = model.config.clone();
        let n = 48;
        let toks: Vec<u32> = (0..n)
            .map(|_| (rng.next() % c.n_vocab as u64) as u32)
            .collect();
        for chunk in [1usize, 5, 16] {
            let layout = KvLayout::dense(1, c.n_layer, c.n_head_kv, c.head_dim, n);
            let worst = gpu_vs_cpu_worst(&model, &layout, 16, &toks, 8, chunk);
            assert!(
                worst < 3e-2,
                "{} chunk {chunk}: worst relative logit difference {worst}",
                ty.name()
            );
            eprintln!("{} wide, chunk {chunk}: worst {worst:.2e}", ty.name());
        }
    }
}

/// The one-kernel layer tail of one-token steps (cuda/layer_tail.cu: output projection to the
/// next layer's q/k/v, blocks waiting on each other's group counters) gives the logits of the
/// separate kernels, on every quantized type it takes (one type per model, and the wide Q4_K
/// model whose 5120-wide down projection takes one row per tile), dense and with a span plan,
/// with an f16 cache (the kernel then also does the next layer's RoPE and K/V store) or q8_0.
/// The two differ in float summation order (the kernel sums a row as the streamed one-token
/// product does, the separate path mostly through the dp4a kernel) and where quantizing h * w
/// before dividing by the RMS rounds differently; either moves an activation across an int8
/// rounding boundary now and then, which the next layers carry: 6.0e-3 measured on the Q4_0
/// model (an H100), so the bound is 1.5e-2, half the GPU-vs-CPU one. A missed group, a wrong
/// row or a stale input moves logits by far more.
#[test]
fn layer_tail_matches_separate_kernels() {
    if !gpu_or_skip("layer_tail_matches_separate_kernels") {
        return;
    }
    use moa::backend::Backend;
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(123);
    // Every quantized type the GPU takes.
    let mut specs: Vec<SynthSpec> = moa::backend::cuda::matmul::GPU_TYPES
        .iter()
        .filter(|&&ty| !moa::backend::cuda::matmul::is_float(ty))
        .enumerate()
        .map(|(i, &ty)| gpu_spec(ty, 300 + i as u64))
        .collect();
    let mut wide = SynthSpec::tiny(GgmlType::Q4_K, 321);
    wide.n_embd = 2048;
    wide.n_head = 16;
    wide.n_head_kv = 4;
    wide.n_ff = 5120;
    specs.push(wide);
    let mut failed = Vec::new();
    for (si, spec) in specs.iter().enumerate() {
        let path = dir.path().join(format!("t{si}.gguf"));
        write_synthetic(spec, &path).unwrap();
        let model = Arc::new(Model::load(&path).unwrap());
        let c = model.config.clone();
        let n = 40;
        let toks: Vec<u32> = (0..n)
            .map(|_| (rng.next() % c.n_vocab as u64) as u32)
            .collect();
        for plan in 0..2 {
            let layout = if plan == 0 {
                KvLayout::dense(1, c.n_layer, c.n_head_kv, c.head_dim, n)
            } else {
                random_plan_layout(&mut rng, &c, n, -10.0, 40, 5, 0.2, (4, 8, 4))
            };
            // An f16 cache takes the kernel's RoPE and K/V store; a q8_0 one keeps rope_kv's
            // successors (kv_quant_q8_0).
            let layout = layout.with_types(KV_TYPES[si % 2]).unwrap();
            let opts = BackendOptions {
                max_batch: 16,
                threads: 2,
                layout,
            };
            let mut fused = CudaBackend::new(Arc::clone(&model), opts.clone()).unwrap();
            fused.set_layer_tail(true);
            assert_eq!(
                fused.layer_tail_spans(),
                c.n_layer,
                "{}",
                spec.weight_type.name()
            );
            let mut separate = CudaBackend::new(Arc::clone(&model), opts).unwrap();
            separate.set_layer_tail(false);
            // A 5-token prompt (separate kernels in both), then one token per step.
            let a = common::logits_all(&mut fused, &toks, 5, 5);
            let b = common::logits_all(&mut separate, &toks, 5, 5);
            let worst = worst_relative(&a, &b);
            eprintln!(
                "{} model {si} plan {plan}: worst {worst:.2e}",
                spec.weight_type.name()
            );
            if worst >= 1.5e-2 {
                failed.push(format!(
                    "{} model {si} plan {plan}: worst relative logit difference {worst}",
                    spec.weight_type.name()
                ));
            }
            assert_eq!(fused.seq_len(0), n);
        }
    }
    assert!(failed.is_empty(), "{failed:#?}");
}

/// Exact mode's products (`mvx_<type>`, the legacy quantized types) equal the CPU backend's dot
/// kernels bit for bit: weights from the reference quantizer, activations quantized on the CPU
/// as the CPU backend does (x86 q8_0 / q8_1) and on the GPU by quantize_q8_1, 1 to 16 tokens.
#[test]
fn exact_matvec_matches_cpu_dot_bitwise() {
    if !gpu_or_skip("exact_matvec_matches_cpu_dot_bitwise") {
        return;
    }
    let h = MatmulHarness::new().unwrap();
    let mut rng = Rng(0x5151);
    for ty in [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
    ] {
        let at = ggml_compat::dot::vec_dot_type(ty).unwrap();
        let dot = ggml_compat::dot::dot_kernel(ty).unwrap();
        for &(rows, cols) in &[(37usize, 576usize), (70, 1536), (5, 4096)] {
            let row_bytes = ty.bytes_for(cols as u64).unwrap() as usize;
            let mut w = vec![0u8; rows * row_bytes];
            for dst in w.chunks_mut(row_bytes) {
                let src: Vec<f32> = (0..cols).map(|_| rng.f() * 0.5).collect();
                ggml_compat::quantize_row(ty, &src, dst).unwrap();
            }
            for &n in &[1usize, 3, 16] {
                let x: Vec<f32> = (0..n * cols).map(|_| rng.f() * 3.0).collect();
                let got = h
                    .run(ty, rows, cols, &w, &x, n, DecodeKernels::from_env(), true)
                    .unwrap();
                let abytes = at.bytes_for(cols as u64).unwrap() as usize;
                let mut differ = 0;
                for t in 0..n {
                    let mut a = vec![0u8; abytes];
                    ggml_compat::quantize_row_activations(at, &x[t * cols..(t + 1) * cols], &mut a)
                        .unwrap();
                    for r in 0..rows {
                        let want = dot(cols, &w[r * row_bytes..(r + 1) * row_bytes], &a);
                        differ += usize::from(got[t * rows + r].to_bits() != want.to_bits());
                    }
                }
                assert_eq!(
                    differ,
                    0,
                    "{} {rows}x{cols}, {n} tokens: {differ} of {} products differ from the CPU's",
                    ty.name(),
                    n * rows
                );
                eprintln!("{} {rows}x{cols} n={n}: bit-identical", ty.name());
            }
        }
    }
}

/// The attention kernels at the shapes real models have (head dims 64 and 128, GQA groups of
/// 1, 4 and 8 query heads) over long sequences: prefill in chunks of several sizes then decode
/// steps, dense and with span plans whose rings wrap many times, so key ranges are split over
/// many blocks and tiles end mid-way. F32 weights: the backends differ only in f16 K/V, Q and
/// P rounding.
#[test]
fn cuda_attention_long_sequences_match_cpu() {
    if !gpu_or_skip("cuda_attention_long_sequences_match_cpu") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(1234);
    // (head_dim, n_head, n_head_kv)
    for (si, &(hd, nh, nkv)) in [
        (128usize, 4usize, 1usize),
        (64, 8, 1),
        (64, 2, 2),
        (128, 8, 2),
    ]
    .iter()
    .enumerate()
    {
        let mut spec = SynthSpec::tiny(GgmlType::F32, 40 + si as u64);
        spec.n_layer = 1;
        spec.n_head = nh;
        spec.n_head_kv = nkv;
        spec.n_embd = hd * nh;
        spec.n_ff = 256;
        spec.n_ctx = 2048;
        let path = dir.path().join(format!("a{si}.gguf"));
        write_synthetic(&spec, &path).unwrap();
        let model = Arc::new(Model::load(&path).unwrap());
        let c = model.config.clone();
        for case in 0..3 {
            let n = 900 + (rng.next() % 700) as usize;
            let prompt = 300 + (rng.next() % 500) as usize;
            let chunk = [32usize, 64, 200][case];
            let layout = if case == 0 {
                KvLayout::dense(1, c.n_layer, c.n_head_kv, c.head_dim, n)
            } else {
                random_plan_layout(&mut rng, &c, n, 0.0, 400, 3, 0.1, (64, 128, 64))
            };
            let toks: Vec<u32> = (0..n)
                .map(|_| (rng.next() % c.n_vocab as u64) as u32)
                .collect();
            let caps: Vec<usize> = (0..c.n_head_kv).map(|h| layout.capacity(0, h)).collect();
            for types in KV_TYPES {
                let layout = layout.clone().with_types(types).unwrap();
                let worst = gpu_vs_cpu_worst(&model, &layout, 256, &toks, prompt, chunk);
                assert!(
                    worst < 2e-3 + q8_allowance(types),
                    "hd {hd} heads {nh}/{nkv} KV {types} case {case} (n {n}, prompt {prompt}, \
                     chunk {chunk}, capacities {caps:?}): worst relative logit difference {worst}"
                );
                eprintln!(
                    "hd {hd} heads {nh}/{nkv} KV {types} case {case} caps {caps:?}: worst {worst:.2e}"
                );
            }
        }
    }
}

/// Dense attention over more than 65536 keys (a 64k-context cache: key counts, splits and row
/// offsets past 16 bits), prefill in 512-token chunks then decode: the moa-bench runs at
/// n_ctx > 65536 measured depth-independent speed on the H100 (2026-12-06), which only skipped
/// keys can explain; this is the check for it. Slow on the CPU side (tens of seconds).
#[test]
fn cuda_attention_beyond_64k_keys_matches_cpu() {
    if !gpu_or_skip("cuda_attention_beyond_64k_keys_matches_cpu") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut spec = SynthSpec::tiny(GgmlType::F32, 91);
    spec.n_layer = 1;
    spec.n_head = 2;
    spec.n_head_kv = 1;
    spec.n_embd = 128;
    spec.n_ff = 128;
    spec.n_ctx = 70000;
    let path = dir.path().join("long.gguf");
    write_synthetic(&spec, &path).unwrap();
    let model = Arc::new(Model::load(&path).unwrap());
    let c = model.config.clone();
    let mut rng = Rng(5);
    let n = 66_000 + 8;
    let toks: Vec<u32> = (0..n)
        .map(|_| (rng.next() % c.n_vocab as u64) as u32)
        .collect();
    for types in [KV_TYPES[0], KV_TYPES[1]] {
        let layout = KvLayout::dense(1, c.n_layer, c.n_head_kv, c.head_dim, n)
            .with_types(types)
            .unwrap();
        let worst = gpu_vs_cpu_worst(&model, &layout, 512, &toks, n - 8, 512);
        eprintln!("{n} tokens, dense, KV {types}: worst {worst:.2e}");
        // The CPU reference accumulates f16 values in f16 as llama.cpp's CPU path does, so its
        // rounding grows with the key count (5.6e-3 measured on an H100 at 66008 keys, 9.6e-4
        // before the CPU took llama.cpp's arithmetic; its q8_0 path accumulates in f32); losing
        // the keys past 65536 would change the attention output itself, far more than this.
        assert!(
            worst < 1.5e-2 + q8_allowance(types),
            "KV {types}: worst relative logit difference {worst}"
        );
    }
}

/// The q8_0 cache-append kernel writes the bytes of the CPU backend's quantizer (ggml's reference
/// `quantize_row_q8_0`: `d = amax / 127`, ties away from zero) into the staging rows and the
/// cache ring, on random rows, rows with exact ties (x * (1 / d) = k + 0.5) and zero blocks.
#[test]
fn kv_quant_q8_0_matches_cpu_quantizer() {
    if !gpu_or_skip("kv_quant_q8_0_matches_cpu_quantizer") {
        return;
    }
    let h = MatmulHarness::new().unwrap();
    let mut rng = Rng(99);
    for (hk, hd, n_tok) in [(2usize, 64usize, 37usize), (1, 128, 5), (8, 128, 64)] {
        let mut x: Vec<f32> = (0..n_tok * hk * hd)
            .map(|i| rng.f() * [1.0, 0.01, 300.0][i / 32 % 3])
            .collect();
        // Block 1: amax 127 so d = 1 and the quants are x itself: ties round away from zero.
        for (i, v) in x[32..64].iter_mut().enumerate() {
            *v = [127.0, -0.5, 0.5, 1.5, -2.5, 126.5, -126.5, 3.0][i % 8];
        }
        x[64..96].fill(0.0);
        let (staged, stored) = cuda::quantize_kv_q8_0(&h.gpu, &h.k, &x, hk, hd).unwrap();
        let mut want = vec![0u8; KvType::Q8_0.bytes_for(x.len())];
        ggml_compat::q8::quantize_q8_0(&x, &mut want);
        let diff = staged.iter().zip(&want).filter(|(a, b)| a != b).count();
        assert_eq!(diff, 0, "hk {hk} hd {hd}: {diff} staged bytes differ");
        // Cache: head g's region holds rows 0..n_tok at slots equal to their positions.
        let rb = KvType::Q8_0.bytes_for(hd);
        for t in 0..n_tok {
            for g in 0..hk {
                let src = &want[(t * hk + g) * rb..(t * hk + g + 1) * rb];
                let dst = &stored[(g * n_tok + t) * rb..(g * n_tok + t + 1) * rb];
                assert_eq!(src, dst, "hk {hk} hd {hd}: token {t} head {g} stored row");
            }
        }
    }
}

/// One exact-attention case and its label.
struct ExactCase {
    label: String,
    case: moa::backend::cpu::AttnCase,
}

/// The exact-attention cases: head dims 64 and 128; GQA groups of 1, 3 and 4; a dense layout
/// and span layouts (sinks + rings far shorter than the position, so the visible window wraps
/// around the ring; heads of different capacities; layer 1 of 2 and sequence 1 of 2, so the
/// region tables are offset); decode (one row, first token and deep), multi-row runs in the
/// per-key regime (batches below 64 tokens), a few rows of a 64-token batch (tiled regime, as
/// when several sequences prefill together) and whole tiled prefills from position 0 and after
/// cached keys (runs longer than the ring: queries see the run's own keys only).
fn exact_cases() -> Vec<ExactCase> {
    let mut rng = Rng(4242);
    let mut cases = Vec::new();
    let n_ctx = 400;
    for &(hd, n_head, n_kv) in &[
        (64usize, 4usize, 1usize),
        (64, 6, 2),
        (128, 4, 1),
        (128, 2, 2),
    ] {
        for &(sink, caps) in &[(0usize, [n_ctx, n_ctx]), (4, [37, 300]), (16, [200, 81])] {
            let caps: Vec<usize> = (0..2 * n_kv).map(|i| caps[i % 2]).collect();
            let layout = KvLayout::with_capacities(2, 2, n_kv, hd, n_ctx, sink, caps).unwrap();
            for &(p0, n, n_batch) in &[
                (0usize, 1usize, 1usize),
                (250, 1, 1),
                (100, 9, 9),
                (311, 3, 16),
                (200, 5, 64),
                (0, 70, 70),
                (130, 80, 80),
            ] {
                for amp in [2.0f32, 6.0] {
                    if amp > 2.0 && n > 9 {
                        continue;
                    }
                    let mut data = |len: usize, a: f32| -> Vec<f32> {
                        (0..len).map(|_| rng.f() * a).collect()
                    };
                    let h16 = |v: Vec<f32>| -> Vec<half::f16> {
                        v.into_iter().map(half::f16::from_f32).collect()
                    };
                    let rows = layout.rows_per_layer(1) * hd;
                    cases.push(ExactCase {
                        label: format!(
                            "hd {hd} heads {n_head}/{n_kv} sink {sink} caps {:?} p0 {p0} n {n} \
                             batch {n_batch} amp {amp}",
                            (0..n_kv).map(|h| layout.capacity(1, h)).collect::<Vec<_>>()
                        ),
                        case: moa::backend::cpu::AttnCase {
                            layer: 1,
                            seq: 1,
                            p0,
                            n,
                            n_head,
                            n_batch,
                            q: data(n * n_head * hd, amp),
                            k_new: h16(data(n * n_kv * hd, amp)),
                            v_new: h16(data(n * n_kv * hd, 1.0)),
                            k_cache: h16(data(rows, amp)),
                            v_cache: h16(data(rows, 1.0)),
                            layout: layout.clone(),
                        },
                    });
                }
            }
        }
    }
    cases
}

/// The exact attention kernel (cuda/attention_exact.cu) against the CPU backend's attention on
/// the same inputs ([`exact_cases`]): every output bit-identical. Both sides run the same
/// operations in the same order (f16 rounding points, dot-product sums, glibc's expf ported to
/// the device, ggml_v_expf); the CPU's arithmetic is its x86 FMA kernels', so a CPU without FMA
/// (portable kernels: separate multiply and add in the tiled value sums) only prints the count.
#[test]
fn exact_attention_kernel_matches_cpu_bitwise() {
    if !gpu_or_skip("exact_attention_kernel_matches_cpu_bitwise") {
        return;
    }
    let fma_cpu = ggml_compat::dot::kernel_set() == ggml_compat::dot::KernelSet::Avx2;
    let h = MatmulHarness::new().unwrap();
    let (mut values, mut differ, mut worst) = (0usize, 0usize, 0f32);
    for ec in exact_cases() {
        let case = &ec.case;
        let want = moa::backend::cpu::attention_reference(case);
        let got = cuda::exact_attention_harness(&h.gpu, &h.k, case).unwrap();
        assert!(want.iter().all(|x| x.is_finite()), "{}", ec.label);
        let mut d = 0;
        for (a, b) in want.iter().zip(&got) {
            if a.to_bits() != b.to_bits() {
                d += 1;
                worst = worst.max((a - b).abs() / a.abs().max(1e-30));
            }
        }
        eprintln!("{}: {d} of {} values differ", ec.label, want.len());
        values += want.len();
        differ += d;
        if fma_cpu {
            assert_eq!(
                d, 0,
                "{}: {d} values differ (worst relative {worst:.2e})",
                ec.label
            );
        }
    }
    eprintln!(
        "exact attention vs CPU: {differ} of {values} values differ (worst relative {worst:.2e})"
    );
}

/// Exact attention inside the backend (synthetic quantized models; dense and span layouts whose
/// rings wrap; prompts in chunks of 5 tokens, the per-key regime, and of 64, the tiled one; then
/// decode steps replayed as CUDA graphs): logits against the CPU backend's, with the fast
/// kernels for comparison. Exact mode leaves only the differences of the other ops (none where
/// they are bit-equal); a wrong region, mask or argument would move logits by far more than the
/// bound. Also: a q8_0 cache keeps the fast kernels.
#[test]
fn exact_attention_backend_matches_cpu() {
    if !gpu_or_skip("exact_attention_backend_matches_cpu") {
        return;
    }
    use moa::backend::Backend;
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(2024);
    for (ti, &ty) in [GgmlType::Q8_0, GgmlType::Q4_K].iter().enumerate() {
        let path = dir.path().join(format!("e{ti}.gguf"));
        write_synthetic(&gpu_spec(ty, 21 + ti as u64), &path).unwrap();
        let model = Arc::new(Model::load(&path).unwrap());
        let c = model.config.clone();
        for (case, chunk) in [5usize, 64, 5, 64].into_iter().enumerate() {
            let n = 150 + (rng.next() % 60) as usize;
            let prompt = 100 + (rng.next() % 40) as usize;
            let layout = if case < 2 {
                KvLayout::dense(1, c.n_layer, c.n_head_kv, c.head_dim, n)
            } else {
                random_plan_layout(&mut rng, &c, n, -10.0, 40, 5, 0.2, (4, 8, 4))
            };
            let toks: Vec<u32> = (0..n)
                .map(|_| (rng.next() % c.n_vocab as u64) as u32)
                .collect();
            let opts = BackendOptions {
                max_batch: 64,
                threads: 2,
                layout: layout.clone(),
            };
            let mut cpu = CpuBackend::new(Arc::clone(&model), opts.clone()).unwrap();
            let want = common::logits_all(&mut cpu, &toks, prompt, chunk);
            let mut worst = [0f32; 2];
            let mut rows_equal = 0;
            for (mode, exact) in [false, true].into_iter().enumerate() {
                let mut gpu = CudaBackend::new(Arc::clone(&model), opts.clone()).unwrap();
                gpu.set_exact_attention(exact);
                let got = common::logits_all(&mut gpu, &toks, prompt, chunk);
                worst[mode] = worst_relative(&want, &got);
                if exact {
                    for (ra, rb) in want.iter().zip(&got) {
                        rows_equal +=
                            ra.iter().zip(rb).all(|(x, y)| x.to_bits() == y.to_bits()) as usize;
                    }
                }
            }
            let caps: Vec<usize> = (0..c.n_head_kv).map(|h| layout.capacity(0, h)).collect();
            eprintln!(
                "{} case {case} (n {n}, prompt {prompt}, chunk {chunk}, layer 0 capacities \
                 {caps:?}): worst relative logit difference fast {:.2e}, exact {:.2e}; exact \
                 rows bit-identical {rows_equal}/{n}",
                ty.name(),
                worst[0],
                worst[1]
            );
            assert!(
                worst[1] < 3e-2,
                "{} case {case}: exact attention, worst relative logit difference {}",
                ty.name(),
                worst[1]
            );
        }
        let q8 = KvLayout::dense(1, c.n_layer, c.n_head_kv, c.head_dim, 64)
            .with_types(KV_TYPES[1])
            .unwrap();
        let opts = BackendOptions {
            max_batch: 8,
            threads: 2,
            layout: q8,
        };
        let mut gpu = CudaBackend::new(Arc::clone(&model), opts).unwrap();
        gpu.set_exact_attention(true);
        assert!(
            !gpu.exact_attention(),
            "a q8_0 cache keeps the fast kernels"
        );
        assert!(gpu.kv_bytes() > 0);
    }
}

/// Writes [`exact_cases`] with the CPU backend's outputs into `$MOA_EXACT_DUMP` (no GPU
/// needed) for the emulator check `tools/cuda-emu/attn_exact_check.sh`, which runs the exact
/// kernel on the CPU under emulation and compares bit for bit. Per case, little-endian:
/// i32 hd, n_head, n_kv, n, n_batch, p0, seq, sink, rows_per_seq, rows (of the layer buffer),
/// then i32 caps[n_kv], offs[n_kv] (sequence 0), then f32 q, u16 k_new, v_new, k_cache,
/// v_cache, f32 expected output.
#[test]
#[ignore]
fn exact_attention_cases_dump() {
    let Some(dir) = std::env::var_os("MOA_EXACT_DUMP") else {
        eprintln!("skipping: MOA_EXACT_DUMP is not set");
        return;
    };
    let dir = std::path::PathBuf::from(dir);
    for (i, ec) in exact_cases().iter().enumerate() {
        let case = &ec.case;
        let want = moa::backend::cpu::attention_reference(case);
        let l = &case.layout;
        let (hd, n_kv) = (l.head_dim, l.n_head_kv);
        let rows = l.rows_per_layer(case.layer);
        let mut b: Vec<u8> = Vec::new();
        let mut ints = |v: &[usize]| {
            for &x in v {
                b.extend_from_slice(&(x as i32).to_le_bytes());
            }
        };
        ints(&[
            hd,
            case.n_head,
            n_kv,
            case.n,
            case.n_batch,
            case.p0,
            case.seq,
            l.sink,
            rows / l.n_seq,
            rows,
        ]);
        ints(
            &(0..n_kv)
                .map(|h| l.capacity(case.layer, h))
                .collect::<Vec<_>>(),
        );
        ints(
            &(0..n_kv)
                .map(|h| l.region_offset(0, case.layer, h))
                .collect::<Vec<_>>(),
        );
        for x in &case.q {
            b.extend_from_slice(&x.to_le_bytes());
        }
        for v in [&case.k_new, &case.v_new] {
            for x in v.iter() {
                b.extend_from_slice(&x.to_bits().to_le_bytes());
            }
        }
        for v in [&case.k_cache, &case.v_cache] {
            for x in &v[..rows * hd] {
                b.extend_from_slice(&x.to_bits().to_le_bytes());
            }
        }
        for x in &want {
            b.extend_from_slice(&x.to_le_bytes());
        }
        std::fs::write(dir.join(format!("case{i:03}.bin")), b).unwrap();
        std::fs::write(dir.join(format!("case{i:03}.txt")), &ec.label).unwrap();
    }
    // The row ops the exact path also needs bit-equal (ops.cu rope_pair, silu_mul): i32 n, then
    // f32 x[2n], cs[2n] (cos, sin pairs), the CPU's rotated x[2n], gate[n], up[n], and the CPU's
    // silu(gate) * up[n].
    let mut rng = Rng(31337);
    let n = 1 << 16;
    let x: Vec<f32> = (0..2 * n).map(|i| rng.f() * [1.0, 40.0][i % 2]).collect();
    let cs: Vec<(f32, f32)> = (0..n)
        .map(|i| {
            let t = rng.f() * 1000.0 + i as f32;
            (t.cos(), t.sin())
        })
        .collect();
    let mut rot = x.clone();
    moa::backend::cpu::ops::rope_row(&mut rot, 2 * n, &cs);
    let gate: Vec<f32> = (0..n)
        .map(|i| rng.f() * [1.0, 10.0, 100.0][i % 3])
        .collect();
    let up: Vec<f32> = (0..n).map(|_| rng.f() * 4.0).collect();
    let mut act = gate.clone();
    moa::backend::cpu::ops::swiglu(&mut act, &up);
    let mut b: Vec<u8> = (n as i32).to_le_bytes().to_vec();
    let cs_flat: Vec<f32> = cs.iter().flat_map(|&(c, s)| [c, s]).collect();
    for v in [&x, &cs_flat, &rot, &gate, &up, &act] {
        for x in v.iter() {
            b.extend_from_slice(&x.to_le_bytes());
        }
    }
    std::fs::write(dir.join("ops.raw"), b).unwrap();
}

/// Decode matvec bandwidth on Llama-3-8B's largest matrices (run on the GPU machine with
/// `--ignored --nocapture`); the figures go to the README.
#[test]
#[ignore]
fn matvec_bandwidth_report() {
    if !gpu_or_skip("matvec_bandwidth_report") {
        return;
    }
    let h = MatmulHarness::new().unwrap();
    let copy = h.copy_bandwidth(2 << 30).unwrap();
    println!(
        "device copy bandwidth: {:.0} GB/s (read + write)",
        copy / 1e9
    );
    let mut rng = Rng(3);
    for &ty in &[
        GgmlType::Q4_K,
        GgmlType::Q6_K,
        GgmlType::Q5_K,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::F16,
    ] {
        // MOA_BW_TYPES=q4_k,q6_k limits the report to those types.
        if let Ok(only) = std::env::var("MOA_BW_TYPES") {
            if !only.split(',').any(|t| t.eq_ignore_ascii_case(ty.name())) {
                continue;
            }
        }
        for &(name, rows, cols) in &[
            ("ffn_up/gate 14336x4096", 14336usize, 4096usize),
            ("ffn_down 4096x14336", 4096, 14336),
            ("output 128256x4096", 128256, 4096),
            ("q/k/v 6144x4096", 6144, 4096),
            ("attn_output 4096x4096", 4096, 4096),
        ] {
            let row: Vec<f32> = (0..cols).map(|_| rng.f()).collect();
            let mut rb = vec![0u8; ty.bytes_for(cols as u64).unwrap() as usize];
            ggml_compat::quantize_row(ty, &row, &mut rb).unwrap();
            for &n in &[1usize, 4, 8, 16] {
                // The default choice, then the alternatives (float weights have one kernel).
                let mut variants = vec![("default", DecodeKernels::from_env())];
                if !cuda::matmul::is_float(ty) && n == 1 {
                    variants.extend([
                        ("dp4a wpr=1", DecodeKernels::dp4a(Some(1))),
                        ("dp4a wpr=2", DecodeKernels::dp4a(Some(2))),
                        ("dp4a wpr=4", DecodeKernels::dp4a(Some(4))),
                        ("mma", DecodeKernels::mma_from(1)),
                        ("stream 8K", DecodeKernels::stream(8 << 10)),
                        ("stream 16K", DecodeKernels::stream(16 << 10)),
                        ("stream 32K", DecodeKernels::stream(32 << 10)),
                    ]);
                } else if !cuda::matmul::is_float(ty) {
                    variants.push(("dp4a", DecodeKernels::dp4a(None)));
                }
                for (kname, dk) in variants {
                    let s = h.time_matvec(ty, rows, cols, &rb, n, 50, dk).unwrap();
                    let bytes = rows * rb.len();
                    println!(
                        "matvec {:5} {name:24} n={n} {kname:10}: {:8.1} us  {:6.0} GB/s  ({:.0}% of copy)",
                        ty.name(),
                        s * 1e6,
                        bytes as f64 / s / 1e9,
                        100.0 * bytes as f64 / s / copy
                    );
                }
            }
        }
    }
}

fn argmax(v: &[f32]) -> u32 {
    let mut b = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[b] {
            b = i;
        }
    }
    b as u32
}

/// A repository file: relative to the working directory first (the GPU machine runs the test
/// binary from a copy of the repository, not where it was built), then to the build checkout.
fn repo_file(rel: &str) -> std::path::PathBuf {
    let here = std::path::PathBuf::from(rel);
    if here.exists() {
        return here;
    }
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn top2_margin(v: &[f32]) -> f32 {
    let (mut a, mut b) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
    for &x in v {
        if x > a {
            b = a;
            a = x;
        } else if x > b {
            b = x;
        }
    }
    a - b
}

/// The default model on the GPU against the CPU backend on the llama.cpp fixture prompts: the
/// CPU's greedy 32-token continuation is fed to the GPU (teacher forcing); the GPU's top-1 must
/// equal the CPU's at every position where the CPU's top-2 margin is at least 0.5 and at 95% of
/// all positions (near-ties may flip: the fast attention kernels round differently). Then the
/// same with exact attention (`CudaBackend::set_exact_attention`, cuda/attention_exact.cu): the
/// attention output then has the CPU's bits, and so, as the other ops of the default model are
/// meant to (q8_1 activations, integer dots, RoPE, SwiGLU), the logits: the free-running 32
/// tokens must equal the CPU's on every prompt. Free-running agreement, bit-identical logit rows
/// and the largest logit difference are printed for both modes. The model comes from
/// tools/fetch-models.sh.
#[test]
fn default_model_greedy_matches_cpu() {
    if !gpu_or_skip("default_model_greedy_matches_cpu") {
        return;
    }
    let path = repo_file("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if !path.exists() {
        assert!(!require("MOA_REQUIRE_GPU"), "{} is missing", path.display());
        eprintln!("skipping: {} not found", path.display());
        return;
    }
    let fixture: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo_file("tests/fixtures/llamacpp/greedy_smollm.json")).unwrap(),
    )
    .unwrap();
    let model = Arc::new(Model::load(&path).unwrap());
    let c = model.config.clone();
    let cases = fixture["cases"].as_array().unwrap();
    // Per mode (fast, exact): free-running prompts equal, teacher-forced top-1 agreements,
    // decisive positions and their agreements, logit rows bit-identical, largest logit difference.
    let mut free_equal = [0usize; 2];
    let (mut agree, mut decisive_agree, mut rows_equal) = ([0usize; 2], [0usize; 2], [0usize; 2]);
    let mut worst = [0f32; 2];
    let (mut total, mut decisive) = (0, 0);
    for case in cases {
        let ids: Vec<u32> = case["prompt_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let n = ids.len() + 33;
        let opts = BackendOptions {
            max_batch: 512,
            threads: 8,
            layout: KvLayout::dense(1, c.n_layer, c.n_head_kv, c.head_dim, n),
        };
        // CPU greedy path, its logits and margins.
        let mut cpu = CpuBackend::new(Arc::clone(&model), opts.clone()).unwrap();
        let mut s = moa::generate::Session::new(&mut cpu, 0, 512);
        let mut logits = s.prompt(&ids).unwrap().to_vec();
        let (mut path, mut margins, mut cpu_logits) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..32 {
            let t = argmax(&logits);
            path.push(t);
            margins.push(top2_margin(&logits));
            let next = s.step(t).unwrap().to_vec();
            cpu_logits.push(std::mem::replace(&mut logits, next));
        }
        total += path.len();
        decisive += margins.iter().filter(|&&m| m >= 0.5).count();
        for (mode, exact) in [false, true].into_iter().enumerate() {
            // GPU along the CPU's path, and free-running.
            let mut gpu = CudaBackend::new(Arc::clone(&model), opts.clone()).unwrap();
            gpu.set_exact_attention(exact);
            assert_eq!(gpu.exact_attention(), exact);
            let mut s = moa::generate::Session::new(&mut gpu, 0, 512);
            let mut logits = s.prompt(&ids).unwrap().to_vec();
            for (k, &t) in path.iter().enumerate() {
                let g = argmax(&logits);
                agree[mode] += (g == t) as usize;
                if margins[k] >= 0.5 {
                    decisive_agree[mode] += (g == t) as usize;
                }
                let want = &cpu_logits[k];
                rows_equal[mode] +=
                    want.iter()
                        .zip(&logits)
                        .all(|(a, b)| a.to_bits() == b.to_bits()) as usize;
                for (a, b) in want.iter().zip(&logits) {
                    worst[mode] = worst[mode].max((a - b).abs());
                }
                logits = s.step(t).unwrap().to_vec();
            }
            let mut gpu = CudaBackend::new(Arc::clone(&model), opts.clone()).unwrap();
            gpu.set_exact_attention(exact);
            let mut s = moa::generate::Session::new(&mut gpu, 0, 512);
            let mut tok = argmax(s.prompt(&ids).unwrap());
            let mut free = vec![tok];
            for _ in 0..31 {
                tok = argmax(s.step(tok).unwrap());
                free.push(tok);
            }
            free_equal[mode] += (free == path) as usize;
        }
    }
    for (mode, name) in ["fast", "exact"].iter().enumerate() {
        eprintln!(
            "GPU ({name} attention) vs CPU: teacher-forced top-1 {}/{total}, at margin >= 0.5 \
             {}/{decisive}; logit rows bit-identical {}/{total} (largest difference {:.3e}); \
             free-running 32 tokens equal on {}/{} prompts",
            agree[mode],
            decisive_agree[mode],
            rows_equal[mode],
            worst[mode],
            free_equal[mode],
            cases.len()
        );
    }
    assert_eq!(decisive_agree[0], decisive);
    assert!(agree[0] * 100 >= total * 95, "{}/{total}", agree[0]);
    // Exact attention: the attention output has the CPU's bits (the kernel test), and RoPE,
    // SwiGLU, the norms and the q8_1 products are meant to (see the README); any logit row that
    // still differs is counted in the line printed above, with the largest difference.
    assert_eq!(
        decisive_agree[1], decisive,
        "exact attention: decisive positions"
    );
    assert_eq!(
        free_equal[1],
        cases.len(),
        "exact attention: free-running prompts ({}/{total} logit rows bit-identical, largest \
         difference {:.3e})",
        rows_equal[1],
        worst[1]
    );
}

/// `Backend::replan`: one CUDA backend re-planned through span plans and dense caches of other
/// lengths (growing and shrinking the cache, the same layout twice) gives the logits of a fresh
/// backend made for each layout, prefill in chunks then decode steps (graphs captured again);
/// with an f16 and with a q8_0 K/V cache.
#[test]
fn cuda_replan_matches_fresh_backend() {
    if !gpu_or_skip("cuda_replan_matches_fresh_backend") {
        return;
    }
    use moa::backend::Backend;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    write_synthetic(&gpu_spec(GgmlType::Q8_0, 11), &path).unwrap();
    let model = Arc::new(Model::load(&path).unwrap());
    let c = model.config.clone();
    for (types, other) in [(KV_TYPES[0], KV_TYPES[1]), (KV_TYPES[1], KV_TYPES[0])] {
        let mut rng = Rng(5);
        let typed = |l: KvLayout| l.with_types(types).unwrap();
        let dense = |n| typed(KvLayout::dense(1, c.n_layer, c.n_head_kv, c.head_dim, n));
        let layouts = [
            typed(random_plan_layout(
                &mut rng,
                &c,
                90,
                -10.0,
                40,
                5,
                0.2,
                (4, 8, 4),
            )),
            dense(160),
            typed(random_plan_layout(
                &mut rng,
                &c,
                300,
                -10.0,
                40,
                5,
                0.2,
                (4, 8, 4),
            )),
            typed(random_plan_layout(
                &mut rng,
                &c,
                70,
                -10.0,
                40,
                5,
                0.2,
                (4, 8, 4),
            )),
            dense(160),
            dense(160),
        ];
        let opts = |layout: &KvLayout| BackendOptions {
            max_batch: 32,
            threads: 2,
            layout: layout.clone(),
        };
        let mut reused = CudaBackend::new(Arc::clone(&model), opts(&layouts[0])).unwrap();
        for (i, layout) in layouts.iter().enumerate() {
            assert!(reused.replan(layout).unwrap(), "KV {types} layout {i}");
            assert_eq!(reused.kv_layout(), layout);
            assert_eq!(reused.seq_len(0), 0);
            let n = layout.n_ctx;
            let toks: Vec<u32> = (0..n)
                .map(|_| (rng.next() % c.n_vocab as u64) as u32)
                .collect();
            let prompt = n - 8;
            let a = common::logits_all(&mut reused, &toks, prompt, 32);
            let mut fresh = CudaBackend::new(Arc::clone(&model), opts(layout)).unwrap();
            let b = common::logits_all(&mut fresh, &toks, prompt, 32);
            let worst = worst_relative(&b, &a);
            eprintln!(
                "KV {types} layout {i} (n {n}): worst relative difference re-planned vs fresh \
                 {worst:.2e}"
            );
            // The same kernels on the same data: equal unless a buffer or table is stale.
            assert!(worst < 1e-5, "KV {types} layout {i}: {worst}");
        }
        // Another cache type is not a re-plan: nothing changes.
        let o = KvLayout::dense(1, c.n_layer, c.n_head_kv, c.head_dim, 64)
            .with_types(other)
            .unwrap();
        assert!(!reused.replan(&o).unwrap());
        assert_eq!(reused.kv_layout(), &layouts[5]);
    }
}

/// moa-eval's runner on the GPU: the pass key over lengths, depths, trials and two
/// configurations, interleaved as moa-eval runs them, makes one backend and re-plans it for
/// every other trial; each trial's answer equals that of a runner made for it alone, and the
/// prompts and cache sizes equal the CPU runner's (answers may differ on near-ties: printed).
#[test]
fn eval_runner_reuses_one_gpu_backend() {
    if !gpu_or_skip("eval_runner_reuses_one_gpu_backend") {
        return;
    }
    use moa::eval::filler::Filler;
    use moa::eval::passkey;
    use moa::eval::runner::{AttnSpec, Runner};
    use moa::runtime::Device;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    write_synthetic(&gpu_spec(GgmlType::Q8_0, 5), &path).unwrap();
    let runner = |device| {
        let l = moa::runtime::load(&path).unwrap();
        Runner::new(
            l.model,
            l.tokenizer,
            1024,
            512,
            2,
            Default::default(),
            device,
        )
        .unwrap()
    };
    let gpu = runner(Device::Cuda);
    assert_eq!(gpu.device(), Device::Cuda);
    let configs: Vec<_> = [AttnSpec::Dense, AttnSpec::Uniform(0.5)]
        .iter()
        .map(|s| s.resolve(&gpu.model).unwrap())
        .collect();
    let f = Filler::repeat(&gpu.tokenizer).unwrap();
    let s = passkey::Settings {
        filler: &f,
        chat: None,
        n_predict: 6,
        seed: 42,
        key_loss: false,
    };
    let mut cells = Vec::new();
    for l in [256, 512, 384] {
        for d in [0.0, 1.0] {
            for i in 0..2 {
                for c in &configs {
                    cells.push((c, l, d, i));
                }
            }
        }
    }
    let trials: Vec<_> = cells
        .iter()
        .map(|&(c, l, d, i)| passkey::trial(&gpu, c, &s, l, d, i).unwrap())
        .collect();
    let st = gpu.backend_stats();
    assert_eq!((st.made, st.replanned), (1, cells.len() - 1), "{st:?}");
    assert!(gpu.backend_description().unwrap().starts_with("cuda"));
    let cpu = runner(Device::Cpu);
    let mut same_as_cpu = 0;
    for (&(c, l, d, i), t) in cells.iter().zip(&trials) {
        let alone = passkey::trial(&runner(Device::Cuda), c, &s, l, d, i).unwrap();
        assert_eq!(
            (&t.answer, t.kv_bytes, t.n_plan),
            (&alone.answer, alone.kv_bytes, alone.n_plan),
            "{} len {l} depth {d} trial {i}",
            c.label
        );
        let on_cpu = passkey::trial(&cpu, c, &s, l, d, i).unwrap();
        assert_eq!(
            (&t.expected, t.prompt_tokens, t.kv_bytes),
            (&on_cpu.expected, on_cpu.prompt_tokens, on_cpu.kv_bytes)
        );
        same_as_cpu += (t.answer == on_cpu.answer) as usize;
    }
    eprintln!(
        "{} trials on one GPU backend ({:.3} s making and re-planning it); answers equal to the CPU's in {same_as_cpu}",
        cells.len(),
        st.setup_seconds
    );
}
