//! moa-bench: llama-bench-style throughput of prompt processing (`pp`, a batch of `-p` tokens)
//! and generation (`tg`, `-n` single-token steps), each at the given context depths (`-d`,
//! tokens already in the cache), repeated `-r` times; markdown or `--json`.
//! `moa-bench synth --shape S --type T -o FILE` writes a synthetic model of a real shape
//! (`moa::model::synth::run_synth`).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use moa::generate::Session;
use moa::runtime;

#[derive(Parser)]
#[command(name = "moa-bench", version = concat!(env!("CARGO_PKG_VERSION"), " (", env!("MOA_GIT_REV"), ")"))]
#[command(about = "Measure prompt-processing and generation speed (llama-bench style)")]
#[command(args_conflicts_with_subcommands = true)]
struct Args {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    /// Model file (default: the default model in the local model folder).
    #[arg(short = 'm', long = "model")]
    model: Option<PathBuf>,
    /// Prompt lengths to test (0 to skip).
    #[arg(
        short = 'p',
        long = "n-prompt",
        value_delimiter = ',',
        default_value = "512"
    )]
    n_prompt: Vec<usize>,
    /// Generation lengths to test (0 to skip).
    #[arg(
        short = 'n',
        long = "n-gen",
        value_delimiter = ',',
        default_value = "128"
    )]
    n_gen: Vec<usize>,
    /// Context depths: tokens already in the cache before each test.
    #[arg(
        short = 'd',
        long = "n-depth",
        value_delimiter = ',',
        default_value = "0"
    )]
    depth: Vec<usize>,
    /// Repetitions of each test.
    #[arg(short = 'r', long = "repetitions", default_value_t = 3)]
    reps: usize,
    /// Threads (default: all cores).
    #[arg(short = 't', long = "threads")]
    threads: Option<usize>,
    /// Tokens per forward batch.
    #[arg(short = 'b', long = "batch-size", default_value_t = 512)]
    batch: usize,
    /// Print JSON instead of a markdown table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    spans: runtime::PlanArgs,
    /// Where to run: auto (the GPU when usable), cpu or cuda.
    #[arg(long, value_enum, default_value = "auto")]
    device: runtime::Device,
    #[command(flatten)]
    cache: runtime::CacheTypeArgs,
    /// Parallel mode (llama-batched-bench): for each count S, S sequences each get their own
    /// prompt of the first -p tokens, then generate the first -n tokens in lockstep (one batch of
    /// S tokens per step); reports prompt and aggregate generation t/s and the KV bytes.
    #[arg(long = "parallel", value_delimiter = ',', value_name = "S,..")]
    parallel: Vec<usize>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Write a synthetic model of a real shape (random weights, valid tokenizer; llama.cpp loads it too).
    Synth(moa::model::synth::SynthArgs),
    /// Compile the CUDA kernels for a GPU architecture into the kernel cache (needs only
    /// libnvrtc, no GPU), so a GPU machine with the same NVRTC version starts without compiling.
    Kernels {
        /// Compute capability as NVRTC names it.
        #[arg(long, default_value = "sm_90")]
        arch: String,
    },
}

/// `moa-bench kernels --arch sm_XY`: the kernel cache entry for that architecture.
fn precompile(arch: &str) -> Result<()> {
    use moa::backend::cuda::kernels;
    let cc = arch
        .strip_prefix("sm_")
        .filter(|d| d.len() >= 2 && d.chars().all(|c| c.is_ascii_digit()))
        .map(|d| {
            (
                d[..d.len() - 1].parse::<i32>(),
                d[d.len() - 1..].parse::<i32>(),
            )
        })
        .and_then(|(a, b)| Some((a.ok()?, b.ok()?)))
        .with_context(|| {
            format!("--arch {arch:?}: expected sm_ and the compute capability, e.g. sm_90")
        })?;
    let t0 = Instant::now();
    match kernels::precompile(kernels::arch_for(cc))? {
        Some(p) => println!("{} ({:.1} s)", p.display(), t0.elapsed().as_secs_f64()),
        None => println!("compiled; no cache folder (set MOA_CACHE or HOME)"),
    }
    Ok(())
}

/// Deterministic token ids (the values do not change the cost).
fn tokens(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut x = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % vocab as u64) as u32
        })
        .collect()
}

fn main() -> Result<()> {
    let a = Args::parse_from(runtime::llama_flags(std::env::args_os()));
    if let Some(Cmd::Synth(s)) = &a.cmd {
        moa::model::synth::run_synth(s)?;
        return Ok(());
    }
    if let Some(Cmd::Kernels { arch }) = &a.cmd {
        return precompile(arch);
    }
    let path = runtime::resolve_model(a.model.as_deref())?;
    let loaded = runtime::load(&path).with_context(|| format!("cannot load {}", path.display()))?;
    let threads = a.threads.unwrap_or_else(runtime::default_threads);
    if !a.parallel.is_empty() {
        return parallel(&a, &path, &loaded, threads);
    }
    let vocab = loaded.model.config.n_vocab;
    let max_d = a.depth.iter().copied().max().unwrap_or(0);
    let max_t = a
        .n_prompt
        .iter()
        .chain(&a.n_gen)
        .copied()
        .max()
        .unwrap_or(0);
    // A span plan's spans follow the planned length N: each depth gets a cache planned for its own
    // N = d + (longest test) + 1, as a run at that context would (one backend re-planned in place
    // where the backend can; dense caches are planned once for the deepest test).
    let n_ctx_at = |d: usize| d + max_t + 1;
    let n_ctx = n_ctx_at(max_d);
    let plan = a.spans.resolve(&loaded.model)?;
    let make = |n: usize| {
        runtime::backend_with_plan(
            &loaded.model,
            plan.as_ref(),
            n,
            1,
            a.batch,
            threads,
            a.device,
            a.cache.types(),
        )
    };
    let per_depth = plan.is_some() && a.depth.len() > 1;
    // Made for the deepest test first, whatever the order of -d: its batch capacity (at most
    // N) then serves every depth's fill and pp test after a re-plan in place; one made for a
    // shallow first depth (-p 0 -d 0,32768: N = 129) would refuse the deeper fill's 512-token
    // batches.
    let mut be = make(n_ctx)?;
    let attention = runtime::describe_plan(plan.as_ref(), n_ctx);
    let size: u64 = loaded.model.file.tensors.iter().map(|t| t.n_bytes).sum();
    let params: u64 = loaded
        .model
        .file
        .tensors
        .iter()
        .map(|t| t.n_elements())
        .sum();
    let name = format!(
        "{} {} {}",
        loaded.model.config.arch,
        loaded
            .model
            .file
            .get("general.size_label")
            .and_then(|v| v.as_str())
            .unwrap_or("?"),
        loaded
            .model
            .file
            .tensors
            .iter()
            .find(|t| t.name == "blk.0.attn_q.weight")
            .map_or("?", |t| t.ty.name())
    );
    let mut rows = Vec::new();
    let tests: Vec<(&str, usize)> = a
        .n_prompt
        .iter()
        .filter(|&&n| n > 0)
        .map(|&n| ("pp", n))
        .chain(a.n_gen.iter().filter(|&&n| n > 0).map(|&n| ("tg", n)))
        .collect();
    let mut fills = Vec::new();
    for &d in &a.depth {
        let planned = if per_depth { n_ctx_at(d) } else { n_ctx };
        if per_depth && be.kv_layout().n_ctx != planned {
            let layout = runtime::layout_for(&loaded.model, plan.as_ref(), 1, planned)
                .with_types(a.cache.types())?;
            if !be.replan(&layout)? {
                drop(be);
                be = make(planned)?;
            }
        }
        if per_depth && !a.json {
            eprintln!(
                "depth {d}: attention: {}; {}",
                runtime::describe_plan(plan.as_ref(), planned),
                runtime::describe_kv(be.as_ref())
            );
        }
        // Fill the cache to depth d once; every repetition rewinds to it.
        be.clear(0);
        let t0 = Instant::now();
        Session::new(be.as_mut(), 0, a.batch).prompt(&tokens(d, vocab, 7))?;
        let fill_s = t0.elapsed().as_secs_f64();
        if d > 0 {
            fills
                .push(serde_json::json!({"depth": d, "seconds": fill_s, "tps": d as f64 / fill_s}));
            if !a.json {
                eprintln!(
                    "depth {d}: filled in {fill_s:.2} s ({:.0} t/s)",
                    d as f64 / fill_s
                );
            }
        }
        for &(kind, n) in &tests {
            let mut samples = Vec::with_capacity(a.reps);
            // Repetition 0 is an untimed warm-up (as llama-bench does): kernel caches, cuBLAS
            // heuristics, CUDA graph capture.
            for r in 0..=a.reps {
                if kind == "tg" && r == 0 {
                    // With MOA_KERNEL_TIMES=1 the kernel table covers the generation steps only.
                    moa::backend::cuda::timer::reset();
                }
                be.rewind(0, d);
                let mut s = Session::new(be.as_mut(), 0, a.batch);
                let toks = tokens(n, vocab, 100 + r as u64);
                let t0 = Instant::now();
                if kind == "pp" {
                    s.prompt(&toks)?;
                } else {
                    for &t in &toks {
                        s.step(t)?;
                    }
                }
                if r > 0 {
                    samples.push(n as f64 / t0.elapsed().as_secs_f64());
                }
            }
            let mean = samples.iter().sum::<f64>() / samples.len() as f64;
            let sd = (samples.iter().map(|s| (s - mean).powi(2)).sum::<f64>()
                / (samples.len().max(2) - 1) as f64)
                .sqrt();
            let test = if d > 0 {
                format!("{kind}{n} @ d{d}")
            } else {
                format!("{kind}{n}")
            };
            rows.push(serde_json::json!({"test": test, "n": n, "depth": d, "kind": kind, "tps_mean": mean, "tps_sd": sd, "samples": samples,
                "planned_n": planned, "kv_bytes": be.kv_bytes()}));
        }
    }
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "model": path, "model_name": name, "size_bytes": size, "params": params,
                "backend": be.describe(), "threads": threads, "n_batch": a.batch, "results": rows,
                "attention": attention, "depth_fills": fills, "kv_bytes": be.kv_bytes(), "kv_bytes_dense": be.kv_layout().dense_bytes(),
                "cache_type_k": a.cache.cache_type_k.name(), "cache_type_v": a.cache.cache_type_v.name(),
            }))?
        );
    } else {
        eprintln!(
            "attention: {attention}; {}",
            runtime::describe_kv(be.as_ref())
        );
        println!("| model | size | params | backend | threads | test | t/s |");
        println!("| --- | ---: | ---: | --- | ---: | ---: | ---: |");
        for r in &rows {
            println!(
                "| {name} | {} | {:.2} M | {} | {threads} | {} | {:.2} ± {:.2} |",
                runtime::mib(size as usize),
                params as f64 / 1e6,
                be.describe(),
                r["test"].as_str().unwrap(),
                r["tps_mean"].as_f64().unwrap(),
                r["tps_sd"].as_f64().unwrap()
            );
        }
    }
    Ok(())
}

/// llama-batched-bench's measurement: S sequences, each with its own prompt of `p` tokens
/// (filled one sequence at a time in batches of `-b`), then `n` lockstep decode steps of S tokens.
fn parallel(
    a: &Args,
    path: &std::path::Path,
    loaded: &runtime::Loaded,
    threads: usize,
) -> Result<()> {
    let p = a.n_prompt.first().copied().unwrap_or(512);
    let n = a.n_gen.first().copied().unwrap_or(128);
    anyhow::ensure!(p > 0 && n > 0, "--parallel needs -p and -n above 0");
    let vocab = loaded.model.config.n_vocab;
    let n_ctx = p + n + 1;
    let plan = a.spans.resolve(&loaded.model)?;
    let attention = runtime::describe_plan(plan.as_ref(), n_ctx);
    let mut rows = Vec::new();
    for &s in &a.parallel {
        anyhow::ensure!(s > 0, "--parallel counts must be positive");
        let mut be = runtime::backend_with_plan(
            &loaded.model,
            plan.as_ref(),
            n_ctx,
            s,
            a.batch.max(s),
            threads,
            a.device,
            a.cache.types(),
        )?;
        let t0 = Instant::now();
        for seq in 0..s {
            Session::new(be.as_mut(), seq as u32, a.batch).prompt(&tokens(
                p,
                vocab,
                7 + seq as u64,
            ))?;
        }
        let pp_s = t0.elapsed().as_secs_f64();
        let mut b = moa::graph::BatchBuf::default();
        let steps: Vec<Vec<u32>> = (0..s).map(|q| tokens(n, vocab, 1000 + q as u64)).collect();
        // With MOA_KERNEL_TIMES=1 the kernel table covers the generation steps only.
        moa::backend::cuda::timer::reset();
        let t1 = Instant::now();
        for i in 0..n {
            b.clear();
            for (seq, toks) in steps.iter().enumerate() {
                b.push(toks[i], (p + i) as u32, seq as u32, true);
            }
            be.forward(&b.as_batch())?;
        }
        let tg_s = t1.elapsed().as_secs_f64();
        rows.push(serde_json::json!({
            "sequences": s, "prompt": p, "gen": n,
            "pp_tps": (s * p) as f64 / pp_s, "tg_tps": (s * n) as f64 / tg_s,
            "pp_seconds": pp_s, "tg_seconds": tg_s,
            "kv_bytes": be.kv_bytes(), "kv_bytes_dense": be.kv_layout().dense_bytes(),
            "backend": be.describe(),
        }));
    }
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "model": path, "attention": attention, "threads": threads, "n_batch": a.batch,
                "parallel": rows,
                "cache_type_k": a.cache.cache_type_k.name(), "cache_type_v": a.cache.cache_type_v.name(),
            }))?
        );
    } else {
        eprintln!("attention: {attention}; KV cache {}", a.cache.types());
        println!("| S | prompt | gen | backend | KV cache | pp t/s | tg t/s (aggregate) |");
        println!("| ---: | ---: | ---: | --- | ---: | ---: | ---: |");
        for r in &rows {
            println!(
                "| {} | {p} | {n} | {} | {} (dense {}) | {:.1} | {:.1} |",
                r["sequences"],
                r["backend"].as_str().unwrap_or("?"),
                runtime::mib(r["kv_bytes"].as_u64().unwrap_or(0) as usize),
                runtime::mib(r["kv_bytes_dense"].as_u64().unwrap_or(0) as usize),
                r["pp_tps"].as_f64().unwrap_or(0.0),
                r["tg_tps"].as_f64().unwrap_or(0.0)
            );
        }
    }
    Ok(())
}
