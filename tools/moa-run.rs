//! moa-run: text generation with a GGUF model, llama.cpp style: a prompt (`-p` or `-f`) completed
//! with streaming output and timings, or an interactive chat (`-cnv`) in the model's template.

use std::io::{BufRead, Write};
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Parser;
use moa::backend::Backend;
use moa::chat::{ChatTemplate, Message};
use moa::generate::Session;
use moa::runtime;
use moa::sampling::{Sampler, SamplerConfig};
use moa::tokenizer::{StreamDecoder, Tokenizer};

#[derive(Parser)]
#[command(name = "moa-run", version = concat!(env!("CARGO_PKG_VERSION"), " (", env!("MOA_GIT_REV"), ")"))]
#[command(about = "Generate text with a GGUF model (llama architecture) on the CPU")]
struct Args {
    /// Model file (default: the default model in the local model folder).
    #[arg(short = 'm', long = "model")]
    model: Option<PathBuf>,
    /// Prompt text.
    #[arg(short = 'p', long = "prompt", conflicts_with = "file")]
    prompt: Option<String>,
    /// Read the prompt from a file.
    #[arg(short = 'f', long = "file")]
    file: Option<PathBuf>,
    /// Tokens to generate (-1: until end of generation or a full context).
    #[arg(short = 'n', long = "n-predict", default_value_t = -1, allow_negative_numbers = true)]
    n_predict: i64,
    /// Context size in tokens (0: the model's training context).
    #[arg(short = 'c', long = "ctx-size", default_value_t = 4096)]
    ctx: usize,
    /// Threads (default: all cores).
    #[arg(short = 't', long = "threads")]
    threads: Option<usize>,
    /// Tokens per forward batch when reading the prompt.
    #[arg(short = 'b', long = "batch-size", default_value_t = 512)]
    batch: usize,
    /// Sampling temperature (0: greedy).
    #[arg(long, default_value_t = 0.8)]
    temp: f32,
    #[arg(long = "top-k", default_value_t = 40)]
    top_k: usize,
    #[arg(long = "top-p", default_value_t = 0.95)]
    top_p: f32,
    #[arg(long = "min-p", default_value_t = 0.05)]
    min_p: f32,
    #[arg(long = "repeat-penalty", default_value_t = 1.0)]
    repeat_penalty: f32,
    #[arg(long = "repeat-last-n", default_value_t = 64)]
    repeat_last_n: usize,
    /// Random seed (-1: random).
    #[arg(short = 's', long, default_value_t = -1, allow_negative_numbers = true)]
    seed: i64,
    /// Interactive chat in the model's chat template.
    #[arg(long = "conversation", visible_alias = "cnv")]
    conversation: bool,
    /// System message for chat mode.
    #[arg(long = "system", visible_alias = "sys")]
    system: Option<String>,
    /// Apply the chat template to the prompt (one user turn) instead of completing raw text.
    #[arg(long)]
    chat: bool,
    /// Do not echo the prompt.
    #[arg(long = "no-display-prompt")]
    no_display_prompt: bool,
    /// Print one JSON object at the end instead of streaming text.
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

fn sampler_config(a: &Args) -> SamplerConfig {
    SamplerConfig {
        temp: a.temp,
        top_k: a.top_k,
        top_p: a.top_p,
        min_p: a.min_p,
        repeat_penalty: a.repeat_penalty,
        repeat_last_n: a.repeat_last_n,
        seed: if a.seed < 0 { u64::MAX } else { a.seed as u64 },
        ..SamplerConfig::default()
    }
}

/// Generates until end-of-generation, `limit` tokens, or a full context. Streams through `out`
/// (if any); returns the generated ids and whether it stopped on an end-of-generation token.
fn generate(
    session: &mut Session,
    tok: &Tokenizer,
    sampler: &mut Sampler,
    history: &mut Vec<u32>,
    mut logits: Vec<f32>,
    limit: Option<usize>,
    mut out: Option<&mut dyn Write>,
) -> Result<(Vec<u32>, bool)> {
    let mut decoder = StreamDecoder::new(tok);
    let mut generated = Vec::new();
    let mut hit_eog = false;
    while limit.is_none_or(|l| generated.len() < l) {
        let id = sampler.sample(&logits, history);
        if tok.is_eog(id) {
            hit_eog = true;
            generated.push(id);
            break;
        }
        generated.push(id);
        history.push(id);
        if let Some(o) = out.as_deref_mut() {
            let s = decoder.push(id);
            if !s.is_empty() {
                o.write_all(s.as_bytes())?;
                o.flush()?;
            }
        }
        if session.remaining() == 0 {
            break;
        }
        logits.clear();
        logits.extend_from_slice(session.step(id)?);
    }
    if let Some(o) = out {
        o.write_all(decoder.finish().as_bytes())?;
        o.flush()?;
    }
    Ok((generated, hit_eog))
}

fn main() -> Result<()> {
    // llama.cpp spells the chat flag `-cnv` (and `-ctk`, `-ctv`), which clap would read as
    // `-c nv`.
    let a = Args::parse_from(runtime::llama_flags(std::env::args_os()));
    let path = runtime::resolve_model(a.model.as_deref())?;
    let loaded = runtime::load(&path).with_context(|| format!("cannot load {}", path.display()))?;
    let tok = &loaded.tokenizer;
    let threads = a.threads.unwrap_or_else(runtime::default_threads);
    let n_ctx = runtime::context_size(&loaded.model, a.ctx)?;
    let plan = a.spans.resolve(&loaded.model)?;
    let mut sampler = Sampler::new(sampler_config(&a), tok.vocab_size());
    let limit = (a.n_predict >= 0).then_some(a.n_predict as usize);
    if a.conversation {
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
        print_setup(&a, &path, &loaded, be.as_ref(), plan.as_ref(), n_ctx);
        return chat_loop(&a, &loaded, be.as_mut(), &mut sampler);
    }

    let prompt = match (&a.prompt, &a.file) {
        (Some(p), _) => p.clone(),
        (None, Some(f)) => {
            std::fs::read_to_string(f).with_context(|| format!("cannot read {}", f.display()))?
        }
        (None, None) => bail!("give a prompt with -p TEXT or -f FILE, or use -cnv for a chat"),
    };
    let text = if a.chat {
        let tmpl = ChatTemplate::from_gguf(&loaded.model.file)?
            .context("the model has no chat template")?;
        let mut msgs = Vec::new();
        if let Some(s) = &a.system {
            msgs.push(Message::new("system", s.as_str()));
        }
        msgs.push(Message::new("user", prompt.as_str()));
        tmpl.render(&msgs, true)?
    } else {
        prompt.clone()
    };
    let ids = tok.encode(&text, true, true)?;
    if ids.is_empty() {
        bail!("the prompt is empty after tokenization");
    }
    if ids.len() >= n_ctx {
        bail!(
            "the prompt has {} tokens, but the context holds {} (raise -c)",
            ids.len(),
            n_ctx
        );
    }
    // The planned length N: the prompt and every token asked for, within the context
    // (moa-method.md section 1); spans are sized for it and the cache holds at most N tokens.
    let n_plan = limit.map_or(n_ctx, |l| (ids.len() + l).clamp(ids.len() + 1, n_ctx));
    let mut be = runtime::backend_with_plan(
        &loaded.model,
        plan.as_ref(),
        n_plan,
        1,
        a.batch,
        threads,
        a.device,
        a.cache.types(),
    )?;
    print_setup(&a, &path, &loaded, be.as_ref(), plan.as_ref(), n_plan);
    let mut session = Session::new(be.as_mut(), 0, a.batch);
    session.timings.load_ms = loaded.load_ms;
    let logits = session.prompt(&ids)?.to_vec();
    let mut history = ids.clone();
    let mut stdout = std::io::stdout().lock();
    if !a.json && !a.no_display_prompt {
        stdout.write_all(text.as_bytes())?;
        stdout.flush()?;
    }
    let out: Option<&mut dyn Write> = if a.json { None } else { Some(&mut stdout) };
    let (generated, eog) = generate(
        &mut session,
        tok,
        &mut sampler,
        &mut history,
        logits,
        limit,
        out,
    )?;
    let t = session.timings.clone();
    if a.json {
        let text_ids: Vec<u32> = generated
            .iter()
            .copied()
            .filter(|&i| !tok.is_eog(i))
            .collect();
        println!(
            "{}",
            serde_json::json!({
                "model": path, "prompt": text, "prompt_ids": ids, "generated_ids": generated,
                "text": tok.decode(&text_ids), "stopped_on_eog": eog, "timings": t,
                "kv_bytes": session.backend().kv_bytes(), "kv_bytes_dense": session.backend().kv_layout().dense_bytes(),
                "cache_type_k": a.cache.cache_type_k.name(), "cache_type_v": a.cache.cache_type_v.name(),
                "n_ctx": n_ctx, "n_plan": n_plan, "attention": runtime::describe_plan(plan.as_ref(), n_plan), "threads": threads,
            })
        );
    } else {
        writeln!(stdout)?;
        eprintln!("\n{}", t.report());
    }
    Ok(())
}

/// The start-up lines: model shape, backend, attention and KV cache bytes beside the dense figure.
fn print_setup(
    a: &Args,
    path: &std::path::Path,
    loaded: &runtime::Loaded,
    be: &dyn Backend,
    plan: Option<&moa::moa::Plan>,
    n: usize,
) {
    if a.json {
        return;
    }
    let c = &loaded.model.config;
    eprintln!(
        "model: {} ({} layers, d {}, {} heads / {} KV heads, vocab {})",
        path.display(),
        c.n_layer,
        c.n_embd,
        c.n_head,
        c.n_head_kv,
        c.n_vocab
    );
    eprintln!("backend: {}; context {} tokens", be.describe(), n);
    eprintln!(
        "attention: {}; {}",
        runtime::describe_plan(plan, n),
        runtime::describe_kv(be)
    );
}

/// Interactive chat: each user line is a turn; the model answers in its chat template.
fn chat_loop(
    a: &Args,
    loaded: &runtime::Loaded,
    be: &mut dyn Backend,
    sampler: &mut Sampler,
) -> Result<()> {
    let tok = &loaded.tokenizer;
    let tmpl = ChatTemplate::from_gguf(&loaded.model.file)?
        .context("the model has no chat template; -cnv needs one")?;
    let mut session = Session::new(be, 0, a.batch);
    session.timings.load_ms = loaded.load_ms;
    let mut msgs: Vec<Message> = Vec::new();
    if let Some(s) = &a.system {
        msgs.push(Message::new("system", s.as_str()));
    }
    let mut rendered_past = String::new();
    let mut history: Vec<u32> = Vec::new();
    let stdin = std::io::stdin();
    let mut stdout = std::io::stdout();
    let limit = (a.n_predict >= 0).then_some(a.n_predict as usize);
    eprintln!("chat mode: type a message and press Enter; end with Ctrl-D.");
    loop {
        eprint!("\n> ");
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            break;
        }
        let line = line.trim_end_matches(['\n', '\r']);
        if line.is_empty() {
            continue;
        }
        msgs.push(Message::new("user", line));
        let rendered = tmpl.render(&msgs, true)?;
        // Feed only what the cache does not hold yet (as llama.cpp's chat does).
        let new_text = rendered
            .strip_prefix(rendered_past.as_str())
            .unwrap_or(&rendered);
        let add_special = session.is_empty();
        let ids = tok.encode(new_text, add_special, true)?;
        if ids.len() >= session.remaining() {
            bail!(
                "the conversation no longer fits in the context of {} tokens (raise -c)",
                session.backend().kv_layout().n_ctx
            );
        }
        history.extend_from_slice(&ids);
        let logits = session.prompt(&ids)?.to_vec();
        let (generated, eog) = generate(
            &mut session,
            tok,
            sampler,
            &mut history,
            logits,
            limit,
            Some(&mut stdout),
        )?;
        let reply: Vec<u32> = generated
            .iter()
            .copied()
            .filter(|&i| !tok.is_eog(i))
            .collect();
        if eog && session.remaining() > 0 {
            // Keep the end-of-turn token in the cache so the next turn continues the template.
            let last = *generated.last().expect("eog was generated");
            session.step(last)?;
        }
        msgs.push(Message::new("assistant", tok.decode(&reply)));
        rendered_past = tmpl.render(&msgs, false)?;
        writeln!(stdout)?;
    }
    eprintln!("\n{}", session.timings.report());
    Ok(())
}
