//! moa-profile: the offline profiling of attention influence (moa-method.md sections 5-6).
//! `calib` builds calibration and validation conversations answered by the dense model; `run`
//! profiles a calibration file into a profile file for moa-optimize (progress, ETA, resumable;
//! on the GPU with `--device cuda`, the default `auto` when one is usable); `show` summarizes a
//! profile file; `diff` compares two profiles of the same shape (e.g. GPU vs CPU).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use moa::moa::profile_file::{blocks_per_side, packed_index, Profile};
use moa::profile::calib::{self, Builder, CalibRecord};
use moa::profile::run::{self, RunConfig, RunEvent};
use moa::profile::{model_identity, profiler_for};
use moa::runtime::{self, Device};

#[derive(Parser)]
#[command(name = "moa-profile", version = concat!(env!("CARGO_PKG_VERSION"), " (", env!("MOA_GIT_REV"), ")"))]
#[command(about = "Profile attention influence for MoA span plans")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build calibration and validation conversations (JSONL) answered by the dense model.
    Calib(CalibArgs),
    /// Profile a calibration file into a profile file (resumes an existing output).
    Run(RunArgs),
    /// Summarize a profile file.
    Show(ShowArgs),
    /// Add profiles of the same model, block and lengths (sums and sample counts): the profile
    /// of their calibration sets together; merging a profile of a subset weighs it double.
    Merge(MergeArgs),
    /// Write the loss and dL/d(hidden) at every layer's input for one calibration record (for
    /// the comparison with PyTorch autograd: tests/py/autograd_check.py).
    Grads(GradsArgs),
    /// Compare two profiles of the same model, block and lengths: per length, the largest
    /// difference of a block's mean |E| relative to the largest block of its head.
    Diff(DiffArgs),
    /// Measure each KV head's long-range importance: the response-token loss change when the
    /// head keeps only its sink and a local window (for moa-optimize --head-weights).
    Ablate(AblateArgs),
}

#[derive(clap::Args)]
struct AblateArgs {
    #[arg(short = 'm', long = "model")]
    model: Option<PathBuf>,
    /// Calibration or validation JSONL files (moa-profile calib records, or
    /// {"tokens":[..],"response_mask":[..]}), comma-separated or repeated.
    #[arg(long, value_delimiter = ',', required = true)]
    data: Vec<PathBuf>,
    /// Use at most this many conversations of each file.
    #[arg(long)]
    max_per_file: Option<usize>,
    /// Skip conversations longer than this many tokens.
    #[arg(long)]
    max_tokens: Option<usize>,
    /// The short rule "ALPHA:BETA" an ablated head gets (span = ALPHA + BETA * N, sink
    /// included).
    #[arg(long, default_value = "256:0")]
    short: String,
    /// Rules to measure, "ALPHA:BETA" comma-separated: each head gets each in turn (a cost
    /// table for moa-optimize --measured). Default: the --short rule alone.
    #[arg(long, value_delimiter = ',', allow_hyphen_values = true)]
    rules: Vec<String>,
    /// What the other heads keep: dense (the loss one head's short rule costs), short (the
    /// loss one dense head recovers among short ones) or plan (--base-plan's rules).
    #[arg(long, value_enum, default_value = "dense")]
    base: moa::profile::ablate::AblateBase,
    /// With --base plan: the plan file (JSON, or a GGUF with an embedded plan).
    #[arg(long, value_name = "FILE")]
    base_plan: Option<PathBuf>,
    /// Tokens per forward batch.
    #[arg(short = 'b', long = "batch-size", default_value_t = 512)]
    batch: usize,
    #[arg(short = 't', long = "threads")]
    threads: Option<usize>,
    /// Where to compute: cuda (GPU), cpu, or auto.
    #[arg(long, value_enum, default_value_t = Device::Auto)]
    device: Device,
    /// Output JSON.
    #[arg(short = 'o', long = "out")]
    out: PathBuf,
}

#[derive(clap::Args)]
struct DiffArgs {
    /// Profile files.
    a: PathBuf,
    b: PathBuf,
    /// Fail (exit status 1) when a length's largest relative difference exceeds this.
    #[arg(long)]
    tol: Option<f64>,
}

#[derive(clap::Args)]
struct GradsArgs {
    /// Model file (default: the default model).
    #[arg(short = 'm', long = "model")]
    model: Option<PathBuf>,
    /// Calibration JSONL (moa-profile calib).
    #[arg(long)]
    data: PathBuf,
    /// Which record (0-based).
    #[arg(long, default_value_t = 0)]
    index: usize,
    /// Keep at most N tokens: the window ending where the first response ends.
    #[arg(long)]
    max_tokens: Option<usize>,
    /// Output: one JSON header line, then per layer n x n_embd f32 little-endian values.
    #[arg(short = 'o', long)]
    out: PathBuf,
    /// Where to compute: cuda (GPU), cpu, or auto (the GPU when one is usable).
    #[arg(long, value_enum, default_value_t = Device::Auto)]
    device: Device,
}

fn parse_lengths(s: &str) -> Result<Vec<usize>, String> {
    if s.trim().is_empty() {
        return Ok(Vec::new());
    }
    s.split(',')
        .map(|v| {
            v.trim()
                .parse::<usize>()
                .map_err(|e| format!("length {v:?}: {e}"))
                .and_then(|n| {
                    if n == 0 {
                        Err("lengths must be positive".into())
                    } else {
                        Ok(n)
                    }
                })
        })
        .collect()
}

#[derive(clap::Args)]
struct CalibArgs {
    /// Model file (default: the default model in the local model folder).
    #[arg(short = 'm', long = "model")]
    model: Option<PathBuf>,
    /// Files or folders of documents (UTF-8 text), read recursively in sorted order.
    #[arg(long = "source", default_value = "/usr/share/common-licenses")]
    sources: Vec<PathBuf>,
    /// Length buckets of the calibration conversations (tokens, answer included).
    #[arg(long, value_parser = parse_lengths, default_value = "2048,4096,8192")]
    lengths: std::vec::Vec<usize>,
    /// Calibration conversations per length.
    #[arg(long = "per-length", default_value_t = 4)]
    per_length: usize,
    /// Length buckets of the validation conversations (empty: none).
    #[arg(long = "val-lengths", value_parser = parse_lengths, default_value = "6144")]
    val_lengths: std::vec::Vec<usize>,
    /// Validation conversations per validation length.
    #[arg(long = "val-per-length", default_value_t = 2)]
    val_per_length: usize,
    /// Share of the documents (by a hash of their file name) kept for validation.
    #[arg(long = "val-fraction", default_value_t = 0.25)]
    val_fraction: f64,
    /// Documents shorter than this many characters are skipped.
    #[arg(long = "min-chars", default_value_t = 2000)]
    min_chars: usize,
    /// Most tokens of the dense model's greedy answer.
    #[arg(long = "max-new", default_value_t = 128)]
    max_new: usize,
    /// Task rotation (summarize, recall, compare, fact, facts; repeats weigh a task):
    /// conversation i of each length gets task i modulo the list.
    #[arg(long, default_value = calib::DEFAULT_TASKS)]
    tasks: String,
    /// In `fact` / `facts` conversations take the loss only on the answer tokens that spell the
    /// asked reference number, and drop those whose answer lacks it (a retrieval-focused set).
    #[arg(long = "key-loss")]
    key_loss: bool,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Where the dense model answers: cpu, cuda (GPU) or auto. The GPU's answers can differ
    /// from the CPU's in a few tokens (its attention rounds differently).
    #[arg(long, value_enum, default_value_t = Device::Cpu)]
    device: Device,
    /// Threads (default: all cores).
    #[arg(short = 't', long = "threads")]
    threads: Option<usize>,
    /// Calibration output (JSONL).
    #[arg(short = 'o', long = "out", default_value = "calib.jsonl")]
    out: PathBuf,
    /// Validation output (JSONL).
    #[arg(long = "val-out", default_value = "val.jsonl")]
    val_out: PathBuf,
}

#[derive(clap::Args)]
struct RunArgs {
    #[arg(short = 'm', long = "model")]
    model: Option<PathBuf>,
    /// Calibration file written by `moa-profile calib`.
    #[arg(long)]
    data: PathBuf,
    /// Profiled lengths: each uses the file's calibration records of that length bucket.
    #[arg(long, value_parser = parse_lengths, default_value = "2048,4096,8192")]
    lengths: std::vec::Vec<usize>,
    /// At most this many samples per length (default: all).
    #[arg(long = "per-length")]
    per_length: Option<usize>,
    /// Block edge in tokens.
    #[arg(long, default_value_t = 64)]
    block: usize,
    #[arg(short = 't', long = "threads")]
    threads: Option<usize>,
    /// Where to compute: cuda (GPU), cpu, or auto (the GPU when one is usable, else the CPU
    /// with a notice).
    #[arg(long, value_enum, default_value_t = Device::Auto)]
    device: Device,
    /// Profile file; an existing one from the same model, data and lengths is resumed.
    #[arg(short = 'o', long = "out")]
    out: PathBuf,
}

#[derive(clap::Args)]
struct MergeArgs {
    /// Profile files (two or more).
    #[arg(num_args = 2.., required = true)]
    profiles: Vec<PathBuf>,
    /// Output profile file.
    #[arg(short = 'o', long = "out")]
    out: PathBuf,
    /// Scale every further profile, at each length, to this share of the first profile's
    /// summed influence before adding it (e.g. 1: a retrieval profile weighs as much as the
    /// main one, whatever its sample count and loss scale).
    #[arg(long, value_name = "SHARE")]
    balance: Option<f64>,
}

#[derive(clap::Args)]
struct ShowArgs {
    /// Profile file.
    profile: PathBuf,
    /// Length to show (default: the longest).
    #[arg(long)]
    length: Option<usize>,
}

fn main() {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Calib(a) => cmd_calib(a),
        Cmd::Run(a) => cmd_run(a),
        Cmd::Show(a) => cmd_show(a),
        Cmd::Merge(a) => cmd_merge(a),
        Cmd::Grads(a) => cmd_grads(a),
        Cmd::Diff(a) => cmd_diff(a),
        Cmd::Ablate(a) => cmd_ablate(a),
    };
    if let Err(e) = r {
        // The chain of causes, skipping a cause its message already quotes.
        let mut msg = String::new();
        for c in e.chain() {
            let t = c.to_string();
            if !msg.contains(&t) {
                if !msg.is_empty() {
                    msg.push_str(": ");
                }
                msg.push_str(&t);
            }
        }
        eprintln!("moa-profile: error: {msg}");
        std::process::exit(1);
    }
}

fn pool(threads: Option<usize>) -> Result<()> {
    let n = threads.unwrap_or_else(runtime::default_threads).max(1);
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global()
        .context("starting the thread pool")
}

fn fmt_dur(s: f64) -> String {
    let s = s.max(0.0).round() as u64;
    if s >= 3600 {
        format!("{}h{:02}m{:02}s", s / 3600, s / 60 % 60, s % 60)
    } else {
        format!("{}m{:02}s", s / 60, s % 60)
    }
}

fn cmd_calib(a: CalibArgs) -> Result<()> {
    if a.lengths.is_empty() {
        bail!("--lengths is empty");
    }
    if !(0.0..1.0).contains(&a.val_fraction) {
        bail!("--val-fraction {} must be in [0, 1)", a.val_fraction);
    }
    let threads = a.threads.unwrap_or_else(runtime::default_threads).max(1);
    let path = runtime::resolve_model(a.model.as_deref())?;
    let loaded = runtime::load(&path).with_context(|| format!("loading {}", path.display()))?;
    let n_ctx = loaded.model.config.n_ctx_train;
    for &l in a.lengths.iter().chain(&a.val_lengths) {
        if l > n_ctx {
            bail!("length {l} exceeds the model's training context {n_ctx}");
        }
    }
    let docs = calib::collect_documents(&a.sources, a.min_chars)?;
    let (cal_docs, val_docs) = calib::split_documents(docs, a.val_fraction);
    eprintln!(
        "documents: {} for calibration, {} for validation",
        cal_docs.len(),
        val_docs.len()
    );
    if cal_docs.is_empty() || (!a.val_lengths.is_empty() && val_docs.is_empty()) {
        bail!("a split has no documents: add sources or change --val-fraction");
    }
    let mut b = Builder::new(&loaded.model, &loaded.tokenizer, threads, a.max_new)?;
    b.tasks = calib::parse_tasks(&a.tasks)?;
    b.key_loss = a.key_loss;
    b.device = a.device;
    let t0 = Instant::now();
    let report = |r: &CalibRecord| {
        let resp = r.response[0];
        eprintln!(
            "{:>16}: {:>5} tokens, answer {:>3} tokens ({}), {} documents  [{}]",
            r.id,
            r.n_tokens,
            resp[1] - resp[0],
            r.task,
            r.sources.len(),
            fmt_dur(t0.elapsed().as_secs_f64())
        );
    };
    let mut cal = Vec::new();
    for &l in &a.lengths {
        let got = b.build(&cal_docs, "calib", l, a.per_length, a.seed, report)?;
        if a.key_loss && got.len() < a.per_length {
            eprintln!(
                "length {l}: kept {} of {} calibration conversations (the others' answers lack the number)",
                got.len(),
                a.per_length
            );
        }
        cal.extend(got);
    }
    calib::write_jsonl(&a.out, &cal)?;
    let mut val = Vec::new();
    for &l in &a.val_lengths {
        let got = b.build(&val_docs, "val", l, a.val_per_length, a.seed, report)?;
        if a.key_loss && got.len() < a.val_per_length {
            eprintln!(
                "length {l}: kept {} of {} validation conversations (the others' answers lack the number)",
                got.len(),
                a.val_per_length
            );
        }
        val.extend(got);
    }
    if !a.val_lengths.is_empty() {
        calib::write_jsonl(&a.val_out, &val)?;
    }
    eprintln!(
        "wrote {} calibration conversations to {}{} in {}",
        cal.len(),
        a.out.display(),
        if val.is_empty() {
            String::new()
        } else {
            format!(
                " and {} validation conversations to {}",
                val.len(),
                a.val_out.display()
            )
        },
        fmt_dur(t0.elapsed().as_secs_f64())
    );
    Ok(())
}

/// Relative cost of a sample of `n` tokens (linear layers vs attention), for the ETA.
fn cost(c: &moa::model::ModelConfig, n: usize) -> f64 {
    let lin = (c.n_embd * (2 * c.q_dim() + 2 * c.kv_dim()) + 3 * c.n_embd * c.n_ff) as f64 * 3.0;
    let quad = 3.5 * (c.n_head * c.head_dim) as f64;
    n as f64 * lin + (n as f64).powi(2) * quad
}

struct Progress {
    total_cost: f64,
    done_cost: f64,
    /// Cost and time spent in this process (for the rate).
    run_cost: f64,
    run_secs: f64,
    done: usize,
    total: usize,
    current: Option<(String, usize, usize, f64, Instant)>,
    start: Instant,
}

impl Progress {
    fn line(&self) -> String {
        let width = 30;
        let frac = if self.total_cost > 0.0 {
            (self.done_cost / self.total_cost).clamp(0.0, 1.0)
        } else {
            1.0
        };
        let fill = (frac * width as f64).round() as usize;
        let bar: String = "=".repeat(fill) + &" ".repeat(width - fill);
        let mut s = format!(
            "[{bar}] {}/{} samples {:5.1}%  elapsed {}",
            self.done,
            self.total,
            frac * 100.0,
            fmt_dur(self.start.elapsed().as_secs_f64())
        );
        if let Some((id, length, n, c, t)) = &self.current {
            let cur = t.elapsed().as_secs_f64();
            s += &format!("  | {id} ({n} tok @ {length}) {}", fmt_dur(cur));
            if self.run_cost > 0.0 {
                let rate = self.run_secs / self.run_cost;
                let left =
                    (self.total_cost - self.done_cost - c) * rate + (c * rate - cur).max(0.0);
                s += &format!("  ETA {}", fmt_dur(left));
            }
        }
        s
    }
}

fn cmd_run(a: RunArgs) -> Result<()> {
    pool(a.threads)?;
    if a.block == 0 || a.block > 4096 {
        bail!("--block {} must be in 1..=4096", a.block);
    }
    let path = runtime::resolve_model(a.model.as_deref())?;
    let t_load = Instant::now();
    let model =
        moa::model::Model::load(&path).with_context(|| format!("loading {}", path.display()))?;
    let (records, fp) = run::read_data(&a.data)?;
    for &l in &a.lengths {
        if l > model.config.n_ctx_train {
            eprintln!(
                "warning: length {l} exceeds the model's training context {}",
                model.config.n_ctx_train
            );
        }
    }
    let profiler = profiler_for(&model, a.block, a.device)?;
    let identity = model_identity(&model);
    eprintln!(
        "model {} ({} layers, {} query / {} KV heads), weights dequantized in {:.1} s; data {} ({} records); {}",
        path.display(),
        model.config.n_layer,
        model.config.n_head,
        model.config.n_head_kv,
        t_load.elapsed().as_secs_f64(),
        a.data.display(),
        records.len(),
        profiler.describe()
    );
    let cfg = RunConfig {
        lengths: a.lengths.clone(),
        per_length: a.per_length,
        data_name: a
            .data
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default(),
        data_fingerprint: fp,
        out: a.out.clone(),
    };
    // Planned cost per length bucket, for the ETA.
    let plan_cost: f64 = a
        .lengths
        .iter()
        .map(|&l| {
            records
                .iter()
                .filter(|r| r.split == "calib" && r.length == l)
                .take(a.per_length.unwrap_or(usize::MAX))
                .map(|r| cost(&model.config, r.n_tokens))
                .sum::<f64>()
        })
        .sum();
    let tty = std::io::stderr().is_terminal();
    let prog = Arc::new(Mutex::new(Progress {
        total_cost: plan_cost,
        done_cost: 0.0,
        run_cost: 0.0,
        run_secs: 0.0,
        done: 0,
        total: 0,
        current: None,
        start: Instant::now(),
    }));
    let stop = Arc::new(AtomicBool::new(false));
    let ticker = tty.then(|| {
        let (prog, stop) = (Arc::clone(&prog), Arc::clone(&stop));
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                eprint!("\r{}\x1b[K", prog.lock().unwrap().line());
                std::thread::sleep(Duration::from_millis(500));
            }
        })
    });
    let mut per_length: Vec<(usize, usize, f64)> = Vec::new();
    let cfgm = &model.config;
    let result = run::run(&*profiler, &identity, &records, &cfg, |e| {
        let mut p = prog.lock().unwrap();
        match e {
            RunEvent::Start { done, total } => {
                p.done = done;
                p.total = total;
                // Cost of the samples already in the file (first `done` of each length).
                let mut already = 0.0;
                if done > 0 {
                    if let Ok(old) = Profile::load(&cfg.out) {
                        for e in &old.header.lengths {
                            already += records
                                .iter()
                                .filter(|r| r.split == "calib" && r.length == e.length)
                                .take(e.samples)
                                .map(|r| cost(cfgm, r.n_tokens))
                                .sum::<f64>();
                        }
                    }
                    eprintln!(
                        "resuming {}: {done} of {total} samples already done",
                        cfg.out.display()
                    );
                }
                p.done_cost = already;
            }
            RunEvent::Begin {
                id,
                length,
                n_tokens,
            } => {
                p.current = Some((
                    id.to_string(),
                    length,
                    n_tokens,
                    cost(cfgm, n_tokens),
                    Instant::now(),
                ));
            }
            RunEvent::Done {
                id,
                length,
                n_tokens,
                loss,
                seconds,
                done,
                total,
            } => {
                let c = cost(cfgm, n_tokens);
                p.done_cost += c;
                p.run_cost += c;
                p.run_secs += seconds;
                p.done = done;
                p.total = total;
                p.current = None;
                let line = p.line();
                if tty {
                    eprint!("\r\x1b[K");
                }
                eprintln!(
                    "{id}: length {length}, {n_tokens} tokens, loss {loss:.4}, {seconds:.1} s ({:.2} ms/token)",
                    seconds * 1000.0 / n_tokens as f64
                );
                if !tty {
                    eprintln!("{line}");
                }
                match per_length.iter_mut().find(|e| e.0 == length) {
                    Some(e) => {
                        e.1 += 1;
                        e.2 += seconds;
                    }
                    None => per_length.push((length, 1, seconds)),
                }
            }
        }
    });
    stop.store(true, Ordering::Relaxed);
    if let Some(t) = ticker {
        let _ = t.join();
        eprint!("\r\x1b[K");
    }
    let profile = result?;
    per_length.sort_by_key(|e| e.0);
    for (l, n, s) in &per_length {
        eprintln!(
            "length {l}: {n} samples in {}, {:.1} s per sample",
            fmt_dur(*s),
            s / *n as f64
        );
    }
    eprintln!("profile {}: {}", a.out.display(), samples_line(&profile));
    Ok(())
}

/// "N samples at L, ..." for every profiled length.
fn samples_line(p: &Profile) -> String {
    p.header
        .lengths
        .iter()
        .map(|e| format!("{} samples at {}", e.samples, e.length))
        .collect::<Vec<_>>()
        .join(", ")
}

fn cmd_merge(a: MergeArgs) -> Result<()> {
    let mut p = Profile::load(&a.profiles[0])?;
    for f in &a.profiles[1..] {
        let q = Profile::load(f)?;
        match a.balance {
            None => p.merge(&q),
            Some(share) => p.merge_balanced(&q, share),
        }
        .map_err(|e| anyhow::anyhow!("{}: {e}", f.display()))?;
    }
    p.save(&a.out)?;
    eprintln!("profile {}: {}", a.out.display(), samples_line(&p));
    Ok(())
}

fn cmd_show(a: ShowArgs) -> Result<()> {
    let p = Profile::load(&a.profile)?;
    let h = &p.header;
    println!(
        "model {:?} ({}, {} layers, {} query / {} KV heads, head_dim {}, n_ctx_train {})",
        h.model.name,
        h.model.arch,
        h.model.n_layer,
        h.model.n_head,
        h.model.n_head_kv,
        h.model.head_dim,
        h.model.n_ctx_train
    );
    println!("block {}; provenance: {}", h.block, h.provenance);
    for e in &h.lengths {
        println!("length {:>6}: {} samples", e.length, e.samples);
    }
    let li = match a.length {
        Some(l) => p
            .length_index(l)
            .with_context(|| format!("length {l} is not in the profile"))?,
        None => (0..h.lengths.len())
            .max_by_key(|&i| h.lengths[i].length)
            .unwrap_or(0),
    };
    let length = h.lengths[li].length;
    let nb = blocks_per_side(length, h.block);
    println!(
        "\nat length {length}: per layer and KV head, mean total |E| and the share of it in the sink \
         column (key block 0) / the local band (query block - key block <= 1) / the rest"
    );
    for l in 0..h.model.n_layer {
        let mut cells = Vec::new();
        for g in 0..h.model.n_head_kv {
            let m = p.mean(li, l, g);
            let (mut tot, mut sink, mut local) = (0f64, 0f64, 0f64);
            for qb in 0..nb {
                for kb in 0..=qb {
                    let v = m[packed_index(qb, kb)] as f64;
                    tot += v;
                    if kb == 0 {
                        sink += v;
                    } else if qb - kb <= 1 {
                        local += v;
                    }
                }
            }
            let t = tot.max(1e-30);
            cells.push(format!(
                "{tot:9.3e} {:3.0}/{:3.0}/{:3.0}%",
                100.0 * sink / t,
                100.0 * local / t,
                100.0 * (tot - sink - local) / t
            ));
        }
        println!("layer {l:>3}: {}", cells.join("  "));
    }
    Ok(())
}

fn cmd_grads(a: GradsArgs) -> Result<()> {
    let path = runtime::resolve_model(a.model.as_deref())?;
    let loaded = runtime::load(&path).with_context(|| format!("cannot load {}", path.display()))?;
    let records = calib::read_jsonl(&a.data)?;
    let Some(rec) = records.get(a.index) else {
        bail!(
            "{} holds {} records; --index {} is out of range",
            a.data.display(),
            records.len(),
            a.index
        );
    };
    // A window of at most --max-tokens ending at the end of the first response range, so the
    // loss still has targets; response ranges are shifted into it.
    let all = rec.response_ranges();
    let end = all
        .first()
        .map_or(rec.tokens.len(), |r| r.end)
        .min(rec.tokens.len());
    let m = a.max_tokens.unwrap_or(end).min(end);
    let start = end - m;
    let tokens = &rec.tokens[start..end];
    let n = tokens.len();
    let response: Vec<std::ops::Range<usize>> = all
        .into_iter()
        .map(|r| r.start.saturating_sub(start).max(1)..r.end.saturating_sub(start).min(n))
        .filter(|r| r.start < r.end)
        .collect();
    let prof = profiler_for(&loaded.model, 64, a.device)?;
    let mut cap = moa::profile::backward::Captured::default();
    let res = prof.profile_sample(tokens, &response, n.div_ceil(64) * 64, Some(&mut cap))?;
    let c = &loaded.model.config;
    let header = serde_json::json!({
        "model": path, "record": a.index, "n_tokens": n, "n_embd": c.n_embd, "n_layer": c.n_layer,
        "tokens": tokens, "response": response.iter().map(|r| [r.start, r.end]).collect::<Vec<_>>(),
        "loss": res.loss, "n_targets": res.n_targets,
    });
    let mut bytes = serde_json::to_vec(&header)?;
    bytes.push(b'\n');
    for d in &cap.d_hidden {
        for v in d {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
    }
    moa::util::write_file_atomic(&a.out, &bytes)
        .with_context(|| format!("cannot write {}", a.out.display()))?;
    eprintln!(
        "{} tokens, {} response targets, loss {:.6}; dL/d(hidden) of {} layers -> {}",
        n,
        res.n_targets,
        res.loss,
        cap.d_hidden.len(),
        a.out.display()
    );
    Ok(())
}

fn cmd_diff(a: DiffArgs) -> Result<()> {
    let pa = Profile::load(&a.a)?;
    let pb = Profile::load(&a.b)?;
    let (ha, hb) = (&pa.header, &pb.header);
    if ha.model != hb.model {
        bail!(
            "the profiles are of different models ({:?} and {:?})",
            ha.model.name,
            hb.model.name
        );
    }
    if ha.block != hb.block {
        bail!("the profiles have blocks {} and {}", ha.block, hb.block);
    }
    let la: Vec<usize> = ha.lengths.iter().map(|e| e.length).collect();
    let lb: Vec<usize> = hb.lengths.iter().map(|e| e.length).collect();
    if la != lb {
        bail!("the profiles have lengths {la:?} and {lb:?}");
    }
    let mut worst_all = 0f64;
    for (li, e) in ha.lengths.iter().enumerate() {
        let nb = blocks_per_side(e.length, ha.block);
        // (relative difference, layer, head, query block, key block)
        let mut worst = (0f64, 0, 0, 0, 0);
        let mut sum_rel = 0f64;
        let mut heads = 0usize;
        for l in 0..ha.model.n_layer {
            for g in 0..ha.model.n_head_kv {
                let (ma, mb) = (pa.mean(li, l, g), pb.mean(li, l, g));
                let scale = ma
                    .iter()
                    .chain(&mb)
                    .fold(0f64, |m, &v| m.max((v as f64).abs()))
                    .max(1e-30);
                let mut head_worst = 0f64;
                for qb in 0..nb {
                    for kb in 0..=qb {
                        let i = packed_index(qb, kb);
                        let d = (ma[i] as f64 - mb[i] as f64).abs() / scale;
                        head_worst = head_worst.max(d);
                        if d > worst.0 {
                            worst = (d, l, g, qb, kb);
                        }
                    }
                }
                sum_rel += head_worst;
                heads += 1;
            }
        }
        println!(
            "length {:>6}: samples {} / {}; largest block difference {:.2e} of its head's largest block \
             (layer {}, KV head {}, block ({}, {})); mean over heads {:.2e}",
            e.length,
            e.samples,
            hb.lengths[li].samples,
            worst.0,
            worst.1,
            worst.2,
            worst.3,
            worst.4,
            sum_rel / heads.max(1) as f64
        );
        worst_all = worst_all.max(worst.0);
    }
    if let Some(tol) = a.tol {
        if worst_all > tol {
            bail!("largest relative block difference {worst_all:.2e} exceeds --tol {tol:.2e}");
        }
        println!("within --tol {tol:.2e}");
    }
    Ok(())
}

fn parse_rule(s: &str) -> Result<moa::moa::plan::Rule> {
    let (a, b) = s
        .split_once(':')
        .with_context(|| format!("rule {s:?}: expected ALPHA:BETA"))?;
    let alpha: f32 = a
        .trim()
        .parse()
        .with_context(|| format!("rule {s:?}: alpha"))?;
    let beta: f32 = b
        .trim()
        .parse()
        .with_context(|| format!("rule {s:?}: beta"))?;
    if !alpha.is_finite() || !(0.0..=1.0).contains(&beta) {
        bail!("rule {s:?}: alpha must be finite and beta in [0, 1]");
    }
    Ok(moa::moa::plan::Rule { alpha, beta })
}

fn cmd_ablate(a: AblateArgs) -> Result<()> {
    use moa::eval::runner::Runner;
    use moa::moa::optimize::validate;
    use moa::profile::ablate::{self, AblateBase, Base};
    let rules: Vec<moa::moa::plan::Rule> = if a.rules.is_empty() {
        vec![parse_rule(&a.short)?]
    } else {
        a.rules
            .iter()
            .map(|r| parse_rule(r))
            .collect::<Result<_>>()?
    };
    if a.batch == 0 {
        bail!("--batch-size must be at least 1");
    }
    let path = runtime::resolve_model(a.model.as_deref())?;
    let loaded = runtime::load(&path).with_context(|| format!("cannot load {}", path.display()))?;
    let mut samples = Vec::new();
    for f in &a.data {
        let mut v = validate::load(f)?;
        if let Some(m) = a.max_tokens {
            v.retain(|s| s.tokens.len() <= m);
        }
        if let Some(k) = a.max_per_file {
            v.truncate(k);
        }
        samples.extend(v);
    }
    if samples.is_empty() {
        bail!("no conversation left to score (check --data, --max-tokens)");
    }
    let n_ctx = samples
        .iter()
        .map(|s| s.tokens.len())
        .max()
        .unwrap_or(2)
        .max(2);
    let runner = Runner::new(
        loaded.model,
        loaded.tokenizer,
        n_ctx,
        a.batch,
        a.threads.unwrap_or_else(runtime::default_threads),
        moa::kv::KvTypes::default(),
        a.device,
    )?;
    let base_plan = match (a.base, &a.base_plan) {
        (AblateBase::Plan, Some(f)) => Some(
            runtime::PlanArgs {
                plan: Some(f.clone()),
                ..Default::default()
            }
            .resolve(&runner.model)?
            .with_context(|| format!("{}: no plan", f.display()))?,
        ),
        (AblateBase::Plan, None) => bail!("--base plan needs --base-plan FILE"),
        (_, Some(_)) => bail!("--base-plan goes with --base plan"),
        _ => None,
    };
    let base = match (a.base, &base_plan) {
        (AblateBase::Dense, _) => Base::Dense,
        (AblateBase::Short, _) => Base::Short,
        (AblateBase::Plan, p) => Base::Plan(p.as_ref().expect("checked above")),
    };
    let tokens: usize = samples.iter().map(|s| s.tokens.len()).sum();
    let listed: Vec<String> = rules
        .iter()
        .map(|r| format!("{}:{}", r.alpha, r.beta))
        .collect();
    eprintln!(
        "ablate: {} conversations ({tokens} tokens), rules {}, base {:?}, device {:?}",
        samples.len(),
        listed.join(","),
        a.base,
        runner.device()
    );
    let t0 = std::time::Instant::now();
    // Progress is kept beside the output: a stopped run, started again, goes on from there.
    let partial = {
        let mut p = a.out.clone().into_os_string();
        p.push(".partial");
        std::path::PathBuf::from(p)
    };
    let mut resumed_at = None;
    let r = ablate::ablate_resumable(
        &runner,
        &samples,
        &rules,
        base,
        Some(&partial),
        |done, total| {
            // A resumed run starts at the passes it found done: the rate counts this run's
            // (a fresh run's first call comes after its base pass: done - first + 1 = done).
            let first = *resumed_at.get_or_insert(done);
            let s = t0.elapsed().as_secs_f64();
            let rate = s / (done - first + 1) as f64;
            eprint!(
                "\r  pass {done}/{total}  {}  eta {}   ",
                fmt_dur(s),
                fmt_dur(rate * (total - done) as f64)
            );
        },
    )?;
    eprintln!();
    r.save(&a.out)?;
    let _ = std::fs::remove_file(&partial);
    let per_layer: Vec<String> = r
        .delta
        .chunks(r.n_head_kv)
        .enumerate()
        .map(|(l, d)| {
            let v: Vec<String> = d.iter().map(|x| format!("{x:+.4}")).collect();
            format!("  layer {l:>2}: {}", v.join(" "))
        })
        .collect();
    println!(
        "base loss {:.5} over {} scored tokens; loss change per KV head (first rule):\n{}",
        r.base_loss,
        r.tokens_scored,
        per_layer.join("\n")
    );
    eprintln!(
        "wrote {} ({})",
        a.out.display(),
        fmt_dur(t0.elapsed().as_secs_f64())
    );
    Ok(())
}
