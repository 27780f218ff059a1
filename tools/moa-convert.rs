//! moa-convert: put a span plan into a GGUF file as `moa.*` metadata (from our JSON plan, from
//! the reference implementation's per-query-head JSON, or the uniform baseline), remove it,
//! describe it, or export it as JSON. Tensors are copied byte for byte; outputs are written
//! atomically, so a failed conversion leaves no file behind and the input is never modified.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use moa::gguf::{Gguf, GgufBuilder, GgufFile};
use moa::moa::report;
use moa::moa::{Plan, MOA_PREFIX};
use moa::model::ModelConfig;

#[derive(Parser)]
#[command(name = "moa-convert", version = concat!(env!("CARGO_PKG_VERSION"), " (", env!("MOA_GIT_REV"), ")"))]
#[command(about = "Embed, show, export or strip a MoA span plan (`moa.*` GGUF metadata)")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Write a copy of the model with a span plan embedded (replacing any existing one).
    Embed(EmbedArgs),
    /// Write a copy of the model with the uniform StreamingLLM-style baseline (alpha 0, beta D).
    Uniform(UniformArgs),
    /// Write a copy of the model without any `moa.*` keys.
    Strip(StripArgs),
    /// Describe a plan: spans per layer and KV head, density and KV bytes at several lengths.
    Show(ShowArgs),
    /// Write the plan embedded in a model as a JSON plan file.
    Export(ExportArgs),
}

#[derive(Args)]
struct Model {
    /// The GGUF model (default: the default model in the local model folder).
    #[arg(short = 'm', long = "model", value_name = "FILE")]
    model: Option<PathBuf>,
}

#[derive(Args)]
#[group(required = true, multiple = false)]
struct PlanSource {
    /// A plan file in moa's JSON schema (see README).
    #[arg(long, value_name = "PLAN.json")]
    plan: Option<PathBuf>,
    /// A plan in the reference implementation's format ({"alphas": [[..]], "betas": [[..]]}, one
    /// rule per query head); each KV group keeps its widest rule at --lengths.
    #[arg(long, value_name = "FILE")]
    reference_json: Option<PathBuf>,
}

#[derive(Args)]
struct EmbedArgs {
    #[command(flatten)]
    model: Model,
    #[command(flatten)]
    source: PlanSource,
    /// The output GGUF file (may equal the input: the write replaces it atomically).
    #[arg(short = 'o', long = "output", value_name = "OUT.gguf")]
    output: PathBuf,
    /// Lengths for the summary, and for choosing each KV group's rule in --reference-json.
    #[arg(long, value_delimiter = ',', default_value = "2048,4096,8192")]
    lengths: Vec<usize>,
}

#[derive(Args)]
struct UniformArgs {
    #[command(flatten)]
    model: Model,
    /// Span of every head as a fraction of the length, in (0, 1].
    #[arg(long, value_name = "D")]
    density: f32,
    #[arg(short = 'o', long = "output", value_name = "OUT.gguf")]
    output: PathBuf,
    /// Lengths for the summary.
    #[arg(long, value_delimiter = ',', default_value = "2048,4096,8192")]
    lengths: Vec<usize>,
}

#[derive(Args)]
struct StripArgs {
    #[command(flatten)]
    model: Model,
    #[arg(short = 'o', long = "output", value_name = "OUT.gguf")]
    output: PathBuf,
}

#[derive(Args)]
struct ShowArgs {
    #[command(flatten)]
    model: Model,
    /// Show this plan file (validated against the model) instead of the embedded plan.
    #[arg(long, value_name = "PLAN.json", conflicts_with = "reference_json")]
    plan: Option<PathBuf>,
    /// Show the import of a reference-format plan instead of the embedded plan.
    #[arg(long, value_name = "FILE")]
    reference_json: Option<PathBuf>,
    /// Lengths for the density / KV bytes table (default: the plan's lengths, else 2048,4096,8192).
    #[arg(long, value_delimiter = ',')]
    lengths: Vec<usize>,
    /// Length of the span table and the heatmap (default: the largest of the lengths).
    #[arg(long, value_name = "N")]
    length: Option<usize>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    /// Also write a PNG heatmap of spans / N (layers down, KV heads across).
    #[arg(long, value_name = "FILE")]
    png: Option<PathBuf>,
}

#[derive(Args)]
struct ExportArgs {
    #[command(flatten)]
    model: Model,
    /// The JSON plan file to write.
    #[arg(short = 'o', long = "output", value_name = "PLAN.json")]
    output: PathBuf,
}

fn model_path(m: &Model) -> Result<PathBuf> {
    Ok(moa::runtime::resolve_model(m.model.as_deref())?)
}

fn open(path: &Path) -> Result<GgufFile> {
    GgufFile::open(path).with_context(|| format!("cannot read {}", path.display()))
}

fn config(path: &Path, g: &Gguf) -> Result<ModelConfig> {
    ModelConfig::from_gguf(g)
        .with_context(|| format!("{}: not a model moa can plan for", path.display()))
}

fn check_lengths(lengths: &[usize]) -> Result<()> {
    if lengths.is_empty() || lengths.contains(&0) {
        bail!("--lengths: give one or more positive lengths, e.g. 2048,4096,8192");
    }
    Ok(())
}

/// Reads a plan file and checks it against the model.
fn plan_file(path: &Path, model: &Path, cfg: &ModelConfig) -> Result<Plan> {
    let plan = Plan::load_json(path).context("invalid plan file")?;
    if plan.n_layer != cfg.n_layer || plan.n_head_kv != cfg.n_head_kv {
        bail!(
            "{}: the plan is for {} layers x {} KV heads (n_layer, n_kv_heads), but {} has {} layers x {} KV heads",
            path.display(),
            plan.n_layer,
            plan.n_head_kv,
            model.display(),
            cfg.n_layer,
            cfg.n_head_kv
        );
    }
    plan.validate(cfg)
        .with_context(|| format!("{}", path.display()))?;
    Ok(plan)
}

/// Imports a reference-format plan; prints what the import did to stderr.
fn reference_plan(path: &Path, cfg: &ModelConfig, lengths: &[usize]) -> Result<Plan> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let (plan, rep) =
        Plan::from_reference_json(&text, cfg.n_layer, cfg.n_head, cfg.n_head_kv, lengths)
            .with_context(|| format!("{}: invalid reference plan", path.display()))?;
    eprint!("{rep}");
    Ok(plan)
}

/// Writes a copy of `file` with `edit` applied to its metadata, atomically.
fn write_copy(file: &GgufFile, output: &Path, edit: impl FnOnce(&mut GgufBuilder)) -> Result<u64> {
    let mut b = GgufBuilder::from_file(file);
    edit(&mut b);
    b.write_atomic(output)
        .with_context(|| format!("cannot write {}", output.display()))
}

/// Embeds `plan` into a copy of the model and checks the result reads back as the same plan.
fn embed(
    path: &Path,
    file: &GgufFile,
    cfg: &ModelConfig,
    plan: &Plan,
    output: &Path,
    lengths: &[usize],
) -> Result<()> {
    match Plan::from_gguf(file) {
        Ok(Some(old)) => eprintln!(
            "replacing the plan already in {} (source {:?})",
            path.display(),
            old.source
        ),
        Ok(None) => {}
        Err(e) => eprintln!(
            "replacing an invalid moa.* section in {} ({e})",
            path.display()
        ),
    }
    let bytes = write_copy(file, output, |b| plan.embed_into(b))?;
    let back = open(output)?;
    let read = Plan::from_gguf(&back)
        .with_context(|| format!("{}: reading the written plan back", output.display()))?;
    if read.as_ref() != Some(plan) || back.tensors.len() != file.tensors.len() {
        bail!(
            "{}: the written file does not read back as the plan (a bug; please report it)",
            output.display()
        );
    }
    print!(
        "{}\n{}",
        report::describe(plan),
        report::summary_table(&report::summarize(plan, cfg.head_dim, lengths))
    );
    println!(
        "wrote {} ({bytes} bytes, {} tensors unchanged)",
        output.display(),
        file.tensors.len()
    );
    Ok(())
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Embed(a) => {
            check_lengths(&a.lengths)?;
            let path = model_path(&a.model)?;
            let file = open(&path)?;
            let cfg = config(&path, &file)?;
            let plan = match (&a.source.plan, &a.source.reference_json) {
                (Some(p), _) => plan_file(p, &path, &cfg)?,
                (None, Some(r)) => reference_plan(r, &cfg, &a.lengths)?,
                (None, None) => bail!("give --plan PLAN.json or --reference-json FILE"),
            };
            embed(&path, &file, &cfg, &plan, &a.output, &a.lengths)
        }
        Cmd::Uniform(a) => {
            check_lengths(&a.lengths)?;
            if !(a.density > 0.0 && a.density <= 1.0) {
                bail!("--density {}: must be in (0, 1]", a.density);
            }
            let path = model_path(&a.model)?;
            let file = open(&path)?;
            let cfg = config(&path, &file)?;
            let mut plan = Plan::uniform(cfg.n_layer, cfg.n_head_kv, a.density);
            plan.note = format!(
                "uniform baseline: {} sink tokens + one window of {} x N per KV head",
                plan.sink, a.density
            );
            embed(&path, &file, &cfg, &plan, &a.output, &a.lengths)
        }
        Cmd::Strip(a) => {
            let path = model_path(&a.model)?;
            let file = open(&path)?;
            let mut removed = 0;
            let bytes = write_copy(&file, &a.output, |b| removed = b.remove_prefix(MOA_PREFIX))?;
            println!(
                "removed {removed} moa.* keys; wrote {} ({bytes} bytes)",
                a.output.display()
            );
            Ok(())
        }
        Cmd::Show(a) => {
            let path = model_path(&a.model)?;
            let file = open(&path)?;
            let cfg = config(&path, &file)?;
            let plan = if let Some(p) = &a.plan {
                plan_file(p, &path, &cfg)?
            } else if let Some(r) = &a.reference_json {
                let lengths = if a.lengths.is_empty() {
                    vec![2048, 4096, 8192]
                } else {
                    a.lengths.clone()
                };
                check_lengths(&lengths)?;
                reference_plan(r, &cfg, &lengths)?
            } else {
                Plan::from_gguf(&file)
                    .with_context(|| format!("{}: invalid moa.* section", path.display()))?
                    .with_context(|| {
                        format!(
                            "{} has no span plan (no moa.version key); use --plan or embed one",
                            path.display()
                        )
                    })?
            };
            let lengths = if !a.lengths.is_empty() {
                a.lengths.clone()
            } else if !plan.lengths.is_empty() {
                plan.lengths.iter().map(|&n| n as usize).collect()
            } else {
                vec![2048, 4096, 8192]
            };
            check_lengths(&lengths)?;
            let n = a
                .length
                .unwrap_or_else(|| lengths.iter().copied().max().unwrap_or(4096));
            if n == 0 {
                bail!("--length: must be positive");
            }
            if a.json {
                let mut j = report::show_json(&plan, cfg.head_dim, &lengths, n);
                j["file"] = path.display().to_string().into();
                println!("{}", serde_json::to_string_pretty(&j)?);
            } else {
                print!("{}", report::show_text(&plan, cfg.head_dim, &lengths, n));
            }
            if let Some(png) = &a.png {
                report::write_heatmap_png(&plan, n, png).context("cannot write the heatmap")?;
                eprintln!("wrote heatmap of spans / N at N = {n} to {}", png.display());
            }
            Ok(())
        }
        Cmd::Export(a) => {
            let path = model_path(&a.model)?;
            let file = open(&path)?;
            let plan = Plan::from_gguf(&file)
                .with_context(|| format!("{}: invalid moa.* section", path.display()))?
                .with_context(|| {
                    format!("{} has no span plan (no moa.version key)", path.display())
                })?;
            plan.save_json(&a.output, true)?;
            println!(
                "wrote {} ({} layers x {} KV heads, source {:?})",
                a.output.display(),
                plan.n_layer,
                plan.n_head_kv,
                plan.source
            );
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Each cause once: some messages already include their cause's text.
            let mut msg = String::new();
            for cause in e.chain() {
                let s = cause.to_string();
                if !msg.contains(&s) {
                    if !msg.is_empty() {
                        msg.push_str(": ");
                    }
                    msg.push_str(&s);
                }
            }
            eprintln!("moa-convert: error: {msg}");
            ExitCode::FAILURE
        }
    }
}
