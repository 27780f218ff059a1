//! moa-eval: long-context evaluation under span plans: pass key, LongEval lines, long-range
//! copy and perplexity, for one attention configuration (`--dense`, `--plan`, `--uniform`, or
//! the model's embedded plan) or several on the same prompts (`--configs`), on the CPU or the GPU
//! (`--device`; the reports say which). Markdown tables on stdout (or `--json`), a heatmap by
//! length x depth with `--png`, progress with ETA on stderr.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use moa::chat::ChatTemplate;
use moa::eval::filler::Filler;
use moa::eval::report::{self, Grid, Trial};
use moa::eval::runner::{AttnConfig, AttnSpec, Runner};
use moa::eval::{copy, lines, parse_depths, parse_lengths, passkey, ppl, EvalError};
use moa::runtime;

#[derive(Parser)]
#[command(name = "moa-eval", version = concat!(env!("CARGO_PKG_VERSION"), " (", env!("MOA_GIT_REV"), ")"))]
#[command(
    about = "Long-context evaluation of a GGUF model under span plans (pass key, lines, copy, perplexity)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// A pass key hidden in filler at chosen lengths and depths; exact match of the key.
    Passkey(PasskeyArgs),
    /// LongEval lines: retrieve the number of one line of a record (chat template).
    Lines(LinesArgs),
    /// A random passage repeated at the end: loss and top-1 accuracy on the repeat.
    Copy(CopyArgs),
    /// Perplexity (moa-perplexity's semantics) under each configuration.
    Ppl(PplArgs),
}

#[derive(clap::Args)]
struct Common {
    /// Model file (default: the default model in the local model folder).
    #[arg(short = 'm', long = "model")]
    model: Option<PathBuf>,
    /// Threads (default: all cores).
    #[arg(short = 't', long = "threads")]
    threads: Option<usize>,
    /// Where to run: auto (the GPU when usable, else the CPU with a notice), cpu or cuda.
    #[arg(long, value_enum, default_value = "auto")]
    device: runtime::Device,
    /// Tokens per forward batch.
    #[arg(short = 'b', long = "batch-size", default_value_t = 512)]
    batch: usize,
    /// Seed of the generated prompts (the same seed gives the same prompts).
    #[arg(short = 's', long, default_value_t = 42)]
    seed: u64,
    /// Attention configurations to compare, comma-separated: dense, embedded, uniform:D,
    /// plan:FILE (instead of --dense / --plan / --uniform).
    #[arg(long, value_name = "LIST")]
    configs: Option<String>,
    #[command(flatten)]
    spans: runtime::PlanArgs,
    #[command(flatten)]
    cache: runtime::CacheTypeArgs,
    /// Print one JSON object instead of markdown.
    #[arg(long)]
    json: bool,
    /// Also write the JSON report to this file (with the markdown on stdout).
    #[arg(long = "json-file", value_name = "FILE")]
    json_file: Option<PathBuf>,
    /// No progress output.
    #[arg(short = 'q', long)]
    quiet: bool,
}

#[derive(clap::Args)]
struct GridArgs {
    /// Largest planned length (prompt + generated tokens); 0: the model's training context.
    #[arg(short = 'c', long = "ctx-size", default_value_t = 0)]
    ctx: usize,
    /// Prompt lengths in tokens (k = 1024).
    #[arg(long, default_value = "1k,2k,4k")]
    lengths: String,
    /// Depths, fractions of the context (0 = start, 1 = end).
    #[arg(long, default_value = "0,0.25,0.5,0.75,1")]
    depths: String,
    /// Trials per length and depth (each with its own seed).
    #[arg(long, default_value_t = 1)]
    trials: usize,
    /// Write a heatmap of the score by length x depth (one panel per configuration).
    #[arg(long, value_name = "FILE")]
    png: Option<PathBuf>,
}

#[derive(clap::Args)]
struct PasskeyArgs {
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    grid: GridArgs,
    /// Filler: `repeat` (the classic repeated sentences) or a text file (natural text).
    #[arg(long, default_value = "repeat")]
    filler: String,
    /// Tokens to generate for the answer.
    #[arg(short = 'n', long = "n-predict", default_value_t = 12)]
    n_predict: usize,
    /// Wrap the prompt in the model's chat template.
    #[arg(long)]
    chat: bool,
    /// Also report the mean loss of the key's tokens after the prompt (a second,
    /// teacher-forced pass per trial).
    #[arg(long = "key-loss")]
    key_loss: bool,
}

#[derive(clap::Args)]
struct LinesArgs {
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    grid: GridArgs,
    /// Tokens to generate for the answer.
    #[arg(short = 'n', long = "n-predict", default_value_t = 24)]
    n_predict: usize,
    /// Raw completion instead of the model's chat template.
    #[arg(long = "no-chat")]
    no_chat: bool,
}

#[derive(clap::Args)]
struct CopyArgs {
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    grid: GridArgs,
    /// Filler: `repeat` or a text file.
    #[arg(long, default_value = "repeat")]
    filler: String,
    /// Words in the passage to copy.
    #[arg(long = "passage-words", default_value_t = 32)]
    words: usize,
}

#[derive(clap::Args)]
struct PplArgs {
    #[command(flatten)]
    common: Common,
    /// Text file to evaluate.
    #[arg(short = 'f', long = "file")]
    file: PathBuf,
    /// Context sizes (tokens per chunk), comma-separated (k = 1024).
    #[arg(short = 'c', long = "ctx-size", default_value = "512")]
    ctx: String,
    /// Maximum number of chunks per context size (default: all).
    #[arg(long)]
    chunks: Option<usize>,
}

struct Setup {
    runner: Runner,
    configs: Vec<AttnConfig>,
    model_name: String,
}

fn setup(c: &Common, n_ctx: usize) -> Result<Setup> {
    let path = runtime::resolve_model(c.model.as_deref())?;
    let loaded = runtime::load(&path).with_context(|| format!("cannot load {}", path.display()))?;
    let specs = match &c.configs {
        Some(list) => {
            if c.spans.dense || c.spans.plan.is_some() || c.spans.uniform.is_some() {
                bail!("use either --configs or --dense / --plan / --uniform, not both");
            }
            AttnSpec::parse_list(list)?
        }
        None => vec![AttnSpec::from_plan_args(&c.spans)],
    };
    let configs = specs
        .iter()
        .map(|s| s.resolve(&loaded.model))
        .collect::<Result<Vec<_>, _>>()?;
    let n_ctx = runtime::context_size(&loaded.model, n_ctx)?;
    if c.batch == 0 {
        bail!("--batch-size must be at least 1");
    }
    Ok(Setup {
        runner: Runner::new(
            loaded.model,
            loaded.tokenizer,
            n_ctx,
            c.batch,
            c.threads.unwrap_or_else(runtime::default_threads),
            c.cache.types(),
            c.device,
        )?,
        configs,
        model_name: path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
    })
}

fn filler(runner: &Runner, spec: &str) -> Result<Filler, EvalError> {
    if spec == "repeat" {
        Filler::repeat(&runner.tokenizer)
    } else {
        Filler::from_file(&runner.tokenizer, std::path::Path::new(spec))
    }
}

/// Progress on stderr: a bar with ETA on a terminal, one line per trial otherwise.
struct Progress {
    bar: Option<ProgressBar>,
    plain: bool,
    total: u64,
    done: u64,
    t0: Instant,
    n: usize,
    k: usize,
}

impl Progress {
    fn new(quiet: bool, total: u64, n: usize) -> Progress {
        let tty = std::io::stderr().is_terminal();
        let bar = (!quiet && tty).then(|| {
            let b = ProgressBar::new(total);
            b.set_style(
                ProgressStyle::with_template(
                    "{msg:28} [{bar:30}] {pos}/{len} tokens  {elapsed_precise} elapsed, ETA {eta_precise}",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
            b
        });
        Progress {
            bar,
            plain: !quiet && !tty,
            total,
            done: 0,
            t0: Instant::now(),
            n,
            k: 0,
        }
    }

    fn start(&self, msg: String) {
        if let Some(b) = &self.bar {
            b.set_message(msg);
        }
    }

    fn finish(&mut self, units: u64, line: String) {
        self.done += units;
        self.k += 1;
        if let Some(b) = &self.bar {
            b.inc(units);
            b.println(line);
        } else if self.plain {
            let el = self.t0.elapsed().as_secs_f64();
            let eta =
                el / self.done.max(1) as f64 * (self.total - self.done.min(self.total)) as f64;
            eprintln!(
                "[{}/{}] {line}  ({:.0} s elapsed, ETA {:.0} s)",
                self.k, self.n, el, eta
            );
        }
    }

    fn done(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

type TrialFn<'a> = dyn Fn(&Runner, &AttnConfig, usize, f64, usize) -> Result<Trial, EvalError> + 'a;

/// Names and the settings line of a grid task's report.
struct TaskInfo {
    task: &'static str,
    metric: &'static str,
    /// Heatmap title (the pixel font draws capitals).
    title: &'static str,
    /// The settings line printed above the tables.
    head: String,
}

/// Runs every (length, depth, trial) cell under every configuration, with progress.
fn run_grid(
    s: &Setup,
    c: &Common,
    g: &GridArgs,
    info: TaskInfo,
    check: &dyn Fn(usize) -> Result<usize, EvalError>,
    trial: &TrialFn,
) -> Result<()> {
    let lengths = parse_lengths(&g.lengths)?;
    let depths = parse_depths(&g.depths)?;
    if g.trials == 0 {
        bail!("--trials must be at least 1");
    }
    // Fail before any long run: the longest prompt must fit the context.
    for &l in &lengths {
        check(l)?;
    }
    let cells: Vec<(usize, f64, usize)> = lengths
        .iter()
        .flat_map(|&l| {
            depths
                .iter()
                .flat_map(move |&d| (0..g.trials).map(move |i| (l, d, i)))
        })
        .collect();
    let per_config: u64 = cells.iter().map(|c| c.0 as u64).sum();
    let total = per_config * s.configs.len() as u64;
    let mut progress = Progress::new(c.quiet || c.json, total, cells.len() * s.configs.len());
    let mut trials = Vec::new();
    for &(l, d, i) in &cells {
        for cfg in &s.configs {
            progress.start(format!("{} len {l} depth {d}", cfg.label));
            let t = trial(&s.runner, cfg, l, d, i)?;
            progress.finish(
                l as u64,
                format!(
                    "{:<14} len {:>5} depth {:<4} score {:.2}  loss {}  expected {:?} got {:?}  {:.1} s",
                    cfg.label, t.prompt_tokens, d, t.score, t.loss.map_or("-".into(), |l| format!("{l:.3}")), t.expected, t.answer, t.seconds
                ),
            );
            trials.push(t);
        }
    }
    progress.done();
    let grid = Grid {
        task: info.task.into(),
        metric: info.metric.into(),
        configs: s.configs.iter().map(|c| c.label.clone()).collect(),
        lengths,
        depths,
        trials,
    };
    if let Some(p) = &g.png {
        report::write_png(&grid, info.title, p)?;
    }
    let mut j = grid.json();
    j["model"] = s.model_name.clone().into();
    j["settings"] = info.head.clone().into();
    j["seed"] = c.seed.into();
    j["cache_type_k"] = c.cache.cache_type_k.name().into();
    j["cache_type_v"] = c.cache.cache_type_v.name().into();
    device_json(&s.runner, &mut j);
    emit_json(c, &j)?;
    if !c.json {
        println!("{} {}\n", info.head, ran_on(&s.runner));
        print!("{}", grid.markdown());
    }
    Ok(())
}

/// The report's device fields: `device` (cpu or cuda), `backend` (the backend's description)
/// and how trials got their backends (`backend_stats`: made, re-planned, seconds).
fn device_json(r: &Runner, j: &mut serde_json::Value) {
    j["device"] = r.device().name().into();
    j["backend"] = r.backend_description().into();
    j["backend_stats"] = serde_json::to_value(r.backend_stats()).unwrap_or_default();
}

/// The markdown's device sentence, e.g. `Ran on cuda (NVIDIA H100 80GB HBM3 (sm_90)).`
fn ran_on(r: &Runner) -> String {
    format!(
        "Ran on {}.",
        r.backend_description()
            .unwrap_or_else(|| r.device().name().to_string())
    )
}

/// The JSON report: on stdout with `--json`, into `--json-file` (written atomically).
fn emit_json(c: &Common, j: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(j)?;
    if c.json {
        println!("{text}");
    }
    if let Some(p) = &c.json_file {
        let tmp = p.with_extension(format!("tmp-{}", std::process::id()));
        std::fs::write(&tmp, text + "\n")
            .and_then(|_| std::fs::rename(&tmp, p))
            .with_context(|| format!("cannot write {}", p.display()))?;
    }
    Ok(())
}

fn fits(runner: &Runner, prompt: usize, n_predict: usize) -> Result<usize, EvalError> {
    if prompt + n_predict > runner.n_ctx {
        return Err(EvalError::TooLong {
            prompt,
            n_predict,
            n_ctx: runner.n_ctx,
        });
    }
    Ok(prompt)
}

fn chat_template(s: &Setup, required_by: &str) -> Result<ChatTemplate> {
    ChatTemplate::from_gguf(&s.runner.model.file)?
        .with_context(|| format!("the model has no chat template ({required_by})"))
}

fn main() -> Result<()> {
    match Cli::parse_from(runtime::llama_flags(std::env::args_os())).cmd {
        Cmd::Passkey(a) => {
            let s = setup(&a.common, a.grid.ctx)?;
            let f = filler(&s.runner, &a.filler)?;
            let tmpl = if a.chat {
                Some(chat_template(&s, "--chat needs one")?)
            } else {
                None
            };
            let settings = passkey::Settings {
                filler: &f,
                chat: tmpl.as_ref(),
                n_predict: a.n_predict,
                seed: a.common.seed,
                key_loss: a.key_loss,
            };
            let head = format!(
                "Model `{}`; filler `{}`{}; greedy answer of up to {} tokens, right when it contains the key; seed {}.",
                s.model_name,
                f.name,
                if a.chat { ", chat template" } else { "" },
                a.n_predict,
                a.common.seed
            );
            let check = |l: usize| {
                let p = passkey::generate(&s.runner.tokenizer, &f, tmpl.as_ref(), l, 0.0, 0)?;
                fits(&s.runner, p.ids.len(), a.n_predict)
            };
            run_grid(
                &s,
                &a.common,
                &a.grid,
                TaskInfo {
                    task: "passkey",
                    metric: "pass-key accuracy (%)",
                    title: "PASS KEY: ACCURACY (%)",
                    head,
                },
                &check,
                &|r, cfg, l, d, i| passkey::trial(r, cfg, &settings, l, d, i),
            )
        }
        Cmd::Lines(a) => {
            let s = setup(&a.common, a.grid.ctx)?;
            let tmpl = if a.no_chat {
                None
            } else {
                Some(chat_template(&s, "use --no-chat for raw completion")?)
            };
            let settings = lines::Settings {
                chat: tmpl.as_ref(),
                n_predict: a.n_predict,
                seed: a.common.seed,
            };
            let head = format!(
                "Model `{}`; LongEval lines{}; greedy answer of up to {} tokens, right when its last integer is the line's number; seed {}.",
                s.model_name,
                if a.no_chat { " (raw completion)" } else { " in the chat template" },
                a.n_predict,
                a.common.seed
            );
            let check = |l: usize| {
                let p = lines::generate(&s.runner.tokenizer, tmpl.as_ref(), l, 0.0, 0)?;
                fits(&s.runner, p.ids.len(), a.n_predict)
            };
            run_grid(
                &s,
                &a.common,
                &a.grid,
                TaskInfo {
                    task: "lines",
                    metric: "lines accuracy (%)",
                    title: "LONGEVAL LINES: ACCURACY (%)",
                    head,
                },
                &check,
                &|r, cfg, l, d, i| lines::trial(r, cfg, &settings, l, d, i),
            )
        }
        Cmd::Copy(a) => {
            let s = setup(&a.common, a.grid.ctx)?;
            let f = filler(&s.runner, &a.filler)?;
            let settings = copy::Settings {
                filler: &f,
                words: a.words,
                seed: a.common.seed,
            };
            let head = format!(
                "Model `{}`; filler `{}`; a passage of {} random words at the given depth, repeated at the end; teacher-forced top-1 accuracy and loss on the repeat; seed {}.",
                s.model_name, f.name, a.words, a.common.seed
            );
            let check = |l: usize| {
                let p = copy::generate(&s.runner.tokenizer, &f, l, 0.0, a.words, 0)?;
                fits(&s.runner, p.ids.len(), 0)
            };
            run_grid(
                &s,
                &a.common,
                &a.grid,
                TaskInfo {
                    task: "copy",
                    metric: "top-1 copy accuracy (%)",
                    title: "COPY: TOP-1 ACCURACY ON THE REPEAT (%)",
                    head,
                },
                &check,
                &|r, cfg, l, d, i| copy::trial(r, cfg, &settings, l, d, i),
            )
        }
        Cmd::Ppl(a) => {
            let ctxs = parse_lengths(&a.ctx)?;
            let max = *ctxs.iter().max().expect("non-empty");
            let s = setup(&a.common, max)?;
            let text = std::fs::read_to_string(&a.file)
                .with_context(|| format!("cannot read {}", a.file.display()))?;
            let tokens = ppl::tokenize(&s.runner, &text)?;
            let chunks_of = |n: usize| (tokens.len() / n).min(a.chunks.unwrap_or(usize::MAX));
            for &n in &ctxs {
                if tokens.len() < 2 * n {
                    bail!(
                        "{} has {} tokens; perplexity at a context of {n} needs at least {}",
                        a.file.display(),
                        tokens.len(),
                        2 * n
                    );
                }
            }
            let total: u64 = ctxs.iter().map(|&n| (chunks_of(n) * n) as u64).sum::<u64>()
                * s.configs.len() as u64;
            let n_runs: usize = ctxs.iter().map(|&n| chunks_of(n)).sum::<usize>() * s.configs.len();
            let mut progress = Progress::new(a.common.quiet || a.common.json, total, n_runs);
            let mut results = Vec::new();
            for &n in &ctxs {
                for cfg in &s.configs {
                    progress.start(format!("{} n_ctx {n}", cfg.label));
                    let r = ppl::run(&s.runner, cfg, &tokens, n, a.chunks, |i, _, est| {
                        progress.finish(
                            n as u64,
                            format!("{:<14} n_ctx {n} chunk {} PPL {est:.4}", cfg.label, i + 1),
                        )
                    })?;
                    results.push(r);
                }
            }
            progress.done();
            let corpus = a
                .file
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default();
            let mut j = serde_json::json!({
                "task": "ppl", "model": s.model_name, "file": corpus,
                "n_tokens": tokens.len(), "results": results,
                "cache_type_k": a.common.cache.cache_type_k.name(),
                "cache_type_v": a.common.cache.cache_type_v.name(),
            });
            device_json(&s.runner, &mut j);
            emit_json(&a.common, &j)?;
            if !a.common.json {
                println!(
                    "Model `{}`; corpus `{corpus}` ({} tokens); {} KV cache; loss over the second half of each chunk. {}\n",
                    s.model_name,
                    tokens.len(),
                    a.common.cache.types(),
                    ran_on(&s.runner)
                );
                print!("{}", report::ppl_markdown(&results));
            }
            Ok(())
        }
    }
}
