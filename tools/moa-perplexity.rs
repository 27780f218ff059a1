//! moa-perplexity: perplexity of a model on a text file, with llama-perplexity's semantics and
//! output (running estimates per chunk, then `Final estimate: PPL = x +/- y`).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Parser;
use moa::perplexity::perplexity;
use moa::runtime;

#[derive(Parser)]
#[command(name = "moa-perplexity", version = concat!(env!("CARGO_PKG_VERSION"), " (", env!("MOA_GIT_REV"), ")"))]
#[command(about = "Perplexity of a GGUF model on a text file (llama-perplexity semantics)")]
struct Args {
    /// Model file (default: the default model in the local model folder).
    #[arg(short = 'm', long = "model")]
    model: Option<PathBuf>,
    /// Text file to evaluate.
    #[arg(short = 'f', long = "file")]
    file: PathBuf,
    /// Context size (tokens per chunk).
    #[arg(short = 'c', long = "ctx-size", default_value_t = 512)]
    ctx: usize,
    /// Maximum number of chunks (default: all).
    #[arg(long = "chunks")]
    chunks: Option<usize>,
    /// Tokens per forward batch.
    #[arg(short = 'b', long = "batch-size", default_value_t = 512)]
    batch: usize,
    /// Threads (default: all cores).
    #[arg(short = 't', long = "threads")]
    threads: Option<usize>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    spans: runtime::PlanArgs,
    /// Where to run: auto (the GPU when usable), cpu or cuda.
    #[arg(long, value_enum, default_value = "auto")]
    device: runtime::Device,
    #[command(flatten)]
    cache: runtime::CacheTypeArgs,
}

fn main() -> Result<()> {
    let a = Args::parse_from(runtime::llama_flags(std::env::args_os()));
    let path = runtime::resolve_model(a.model.as_deref())?;
    let loaded = runtime::load(&path).with_context(|| format!("cannot load {}", path.display()))?;
    let text = std::fs::read_to_string(&a.file)
        .with_context(|| format!("cannot read {}", a.file.display()))?;
    let threads = a.threads.unwrap_or_else(runtime::default_threads);
    let n_ctx = runtime::context_size(&loaded.model, a.ctx)?;
    let tok = &loaded.tokenizer;
    let t0 = Instant::now();
    // As llama-perplexity: special tokens added as the model says, none parsed from the text.
    let tokens = tok.encode(&text, true, false)?;
    let tokenize_ms = t0.elapsed().as_secs_f64() * 1000.0;
    let plan = a.spans.resolve(&loaded.model)?;
    let mut be = runtime::backend_with_plan(
        &loaded.model,
        plan.as_ref(),
        n_ctx,
        1,
        a.batch,
        threads,
        a.device,
        a.cache.types(),
    )?;
    let attention = runtime::describe_plan(plan.as_ref(), n_ctx);
    let bos = if tok.add_bos() { tok.bos() } else { None };
    let n_batch = a.batch.min(n_ctx);
    if !a.json {
        eprintln!(
            "model: {} ({} layers, {} KV heads)",
            path.display(),
            loaded.model.config.n_layer,
            loaded.model.config.n_head_kv
        );
        eprintln!(
            "attention: {attention}; {}",
            runtime::describe_kv(be.as_ref())
        );
        eprintln!(
            "tokenized {} bytes into {} tokens in {:.1} ms",
            text.len(),
            tokens.len(),
            tokenize_ms
        );
        eprintln!(
            "perplexity: calculating perplexity over {} chunks, n_ctx={}, batch_size={}, threads={}",
            (tokens.len() / n_ctx).min(a.chunks.unwrap_or(usize::MAX)),
            n_ctx,
            n_batch,
            threads
        );
    }
    let t1 = Instant::now();
    let r = perplexity(
        be.as_mut(),
        &tokens,
        n_ctx,
        n_batch,
        bos,
        a.chunks,
        |i, _, est| {
            if !a.json {
                print!("[{}]{:.4},", i + 1, est);
                use std::io::Write;
                let _ = std::io::stdout().flush();
            }
        },
    )?;
    let secs = t1.elapsed().as_secs_f64();
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "model": path, "file": a.file, "n_ctx": n_ctx, "n_batch": n_batch, "threads": threads,
                "n_tokens": tokens.len(), "ppl": r.ppl, "err": r.err, "running": r.running,
                "n_chunks": r.n_chunks, "tokens_scored": r.tokens_scored, "seconds": secs,
                "kv_bytes": be.kv_bytes(),
                "kv_bytes_dense": be.kv_layout().dense_bytes(),
                "cache_type_k": a.cache.cache_type_k.name(), "cache_type_v": a.cache.cache_type_v.name(),
                "attention": attention,
            })
        );
    } else {
        println!();
        println!("Final estimate: PPL = {:.4} +/- {:.5}", r.ppl, r.err);
        eprintln!(
            "{} chunks in {:.2} s ({:.1} tokens/s)",
            r.n_chunks,
            secs,
            (r.n_chunks * n_ctx) as f64 / secs
        );
    }
    Ok(())
}
