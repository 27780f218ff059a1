//! moa-optimize: turns an attention-influence profile (`moa-profile`) into a span plan: one rule
//! per KV head minimizing the dropped influence at the profiled lengths, with the mean density in
//! [lower * b, b] at every constrained length; optionally a Pareto front of plans scored on
//! held-out conversations, the lowest response-token loss winning. Writes our JSON plan format.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};
use moa::moa::optimize::{
    front, validate, Balance, FrontMode, FrontPoint, Grid, HeadWeights, Instance, MeasuredCosts,
    PlanReport, Settings,
};
use moa::moa::profile_file::Profile;
use moa::moa::Plan;
use moa::runtime;
use serde_json::json;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Front {
    /// Weighted sums when validating, else the equal-weights plan only.
    Auto,
    /// Only the equal-weights plan.
    None,
    /// Equal weights, each length alone, each pair of lengths.
    Weighted,
    /// Epsilon-constraint grid on the shorter lengths, minimizing the longest.
    Epsilon,
}

#[derive(Parser)]
#[command(name = "moa-optimize", version = concat!(env!("CARGO_PKG_VERSION"), " (", env!("MOA_GIT_REV"), ")"))]
#[command(
    about = "Span plan from an attention-influence profile (exact multiple-choice knapsack solver)"
)]
struct Args {
    /// Profile file written by moa-profile.
    #[arg(long)]
    profile: PathBuf,
    /// Target mean density b.
    #[arg(long, default_value_t = 0.5)]
    density: f64,
    /// Lengths at which the mean density must lie in [lower * b, b].
    #[arg(long, value_delimiter = ',', default_value = "2048,4096,8192,16384")]
    lengths: Vec<usize>,
    /// Lower end of the density band as a fraction of b.
    #[arg(long, default_value_t = 0.9)]
    lower: f64,
    /// At most K distinct rules per layer (the reference uses 2 on MHA models).
    #[arg(long = "max-rules-per-layer", value_name = "K")]
    max_rules: Option<usize>,
    /// Objective per head: the fraction of the head's own influence dropped (every head counts
    /// the same) instead of the fraction of all heads' influence.
    #[arg(long, conflicts_with = "balance")]
    per_head: bool,
    /// Weigh heads against each other: `head:P` or `layer:P` divides each head's influence by
    /// its head's (or its layer's) total to the power P (0 = as profiled, `head:1` =
    /// --per-head, `layer:1` = every layer counts the same); `none`.
    #[arg(long, value_name = "UNIT:P")]
    balance: Option<Balance>,
    /// Measured importance per KV head (`moa-profile ablate` JSON) multiplying each head's
    /// influence (after --balance).
    #[arg(long, value_name = "FILE")]
    head_weights: Option<PathBuf>,
    /// With --head-weights: the weight every head keeps, as a fraction of the largest.
    #[arg(long, default_value_t = 0.02)]
    head_weight_floor: f64,
    /// With --head-weights: calibrate instead of multiply: each head's profiled influence is
    /// scaled so that what the ablation's short rule drops costs the measured loss change.
    #[arg(long)]
    head_weight_calibrate: bool,
    /// Measured cost table (`moa-profile ablate --rules` JSON): the loss change of each head
    /// under each rule replaces the profile's dropped influence; the --grid must hold only
    /// measured rules (e.g. 0:0:1,0.125 with the rules 0:0.125,...,0:1 measured). Several
    /// files (comma-separated, the same rules; e.g. tables measured inside different plans) are
    /// averaged.
    #[arg(
        long,
        value_name = "FILE",
        value_delimiter = ',',
        conflicts_with_all = ["head_weights", "balance", "per_head"]
    )]
    measured: Vec<PathBuf>,
    /// With several --measured tables: their weights in the average (one per table; default
    /// equal), e.g. a retrieval table and a general response-loss table weighed 1,4.
    #[arg(long, value_delimiter = ',', requires = "measured")]
    measured_weights: Option<Vec<f64>>,
    /// With --measured: add the profile's first-order dropped influence at this weight
    /// (both normalized so the heads' cost ranges sum to 1), so that a retrieval table does not
    /// trade away what the profiled general conversations need. 0: the tables alone.
    #[arg(long, default_value_t = 0.0, requires = "measured")]
    measured_profile_weight: f64,
    /// Rule grid "amin:amax:astep,bstep[,bmin]" (bmin: the smallest beta, default 0).
    #[arg(
        long,
        default_value = "-2048:8192:1024,0.125",
        allow_hyphen_values = true
    )]
    grid: String,
    /// Objective weights per profiled length (one plan, no front).
    #[arg(long, value_delimiter = ',', conflicts_with = "front")]
    weights: Option<Vec<f64>>,
    /// Which Pareto front to build.
    #[arg(long, value_enum, default_value_t = Front::Auto)]
    front: Front,
    /// Grid points per capped objective in the epsilon front.
    #[arg(long, default_value_t = 3)]
    epsilon_points: usize,
    /// Solver time limit per plan, seconds.
    #[arg(long, default_value_t = 60.0)]
    time_limit: f64,
    /// Output plan (JSON).
    #[arg(short = 'o', long = "output")]
    output: Option<PathBuf>,
    /// Also write every front plan as DIR/front-<i>.json.
    #[arg(long, value_name = "DIR")]
    front_dir: Option<PathBuf>,
    /// Model: its shape is checked against the profile; needed by --validate.
    #[arg(short = 'm', long = "model")]
    model: Option<PathBuf>,
    /// Held-out conversations (JSONL: moa-profile calibration records, split "val", or
    /// {"tokens":[..],"response_mask":[..]}); the front plan with the lowest loss is chosen.
    #[arg(long, value_name = "FILE")]
    validate: Option<PathBuf>,
    /// Use at most this many validation conversations.
    #[arg(long, default_value_t = 8)]
    validate_max: usize,
    /// Also report the validation loss of dense attention and of the uniform plan.
    #[arg(long)]
    validate_baselines: bool,
    /// Tokens per forward batch (validation).
    #[arg(short = 'b', long = "batch-size", default_value_t = 512)]
    batch: usize,
    /// Threads (validation; default all cores).
    #[arg(short = 't', long = "threads")]
    threads: Option<usize>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

fn report_json(r: &PlanReport) -> serde_json::Value {
    json!({
        "density": r.density.iter().map(|&(n, d)| json!({"length": n, "density": d})).collect::<Vec<_>>(),
        "dropped": r.dropped.iter().map(|&(n, d)| json!({"length": n, "dropped": d})).collect::<Vec<_>>(),
    })
}

fn point_json(p: &FrontPoint, loss: Option<f64>) -> serde_json::Value {
    let s = &p.solution;
    json!({
        "label": p.label,
        "solve": {
            "seconds": s.seconds, "nodes": s.nodes, "dual_iters": s.dual_iters,
            "active_heads": s.active_heads, "cost": s.cost, "bound": s.bound,
            "gap": s.gap(), "rel_gap": s.rel_gap(), "optimal": s.optimal,
        },
        "report": report_json(&p.report),
        "validation_loss": loss,
    })
}

/// A `moa-profile ablate` file whose shape is the profile's.
fn load_ablation(
    f: &std::path::Path,
    profile: &Profile,
) -> Result<moa::profile::ablate::HeadAblation> {
    let h = moa::profile::ablate::HeadAblation::load(f)?;
    let m = &profile.header.model;
    if (h.n_layer, h.n_head_kv) != (m.n_layer, m.n_head_kv) {
        bail!(
            "{}: {} layers x {} KV heads, the profile has {} x {}",
            f.display(),
            h.n_layer,
            h.n_head_kv,
            m.n_layer,
            m.n_head_kv
        );
    }
    Ok(h)
}

fn main() -> Result<()> {
    let a = Args::parse();
    let profile = Profile::load(&a.profile)?;
    let mut settings = Settings::new(a.density);
    settings.lengths = a.lengths.clone();
    settings.lower = a.lower;
    settings.max_distinct = a.max_rules;
    settings.balance = match (a.per_head, a.balance) {
        (true, _) => Balance::per_head(),
        (false, Some(b)) => b,
        (false, None) => Balance::default(),
    };
    settings.grid = Grid::parse(&a.grid)?;
    let table_weights = match &a.measured_weights {
        None => vec![1.0; a.measured.len()],
        Some(w) if w.len() != a.measured.len() => bail!(
            "--measured-weights has {} weights for {} tables",
            w.len(),
            a.measured.len()
        ),
        Some(w)
            if w.iter().any(|x| !(x.is_finite() && *x >= 0.0)) || w.iter().sum::<f64>() <= 0.0 =>
        {
            bail!("--measured-weights must be finite, >= 0 and not all 0")
        }
        Some(w) => w.clone(),
    };
    let weight_sum: f64 = table_weights.iter().sum();
    if !(a.measured_profile_weight.is_finite() && a.measured_profile_weight >= 0.0) {
        bail!("--measured-profile-weight must be finite and >= 0");
    }
    for (f, &tw) in a.measured.iter().zip(&table_weights) {
        let h = load_ablation(f, &profile)?;
        if h.rules.is_empty() {
            bail!(
                "{}: no cost table (measure with moa-profile ablate --rules)",
                f.display()
            );
        }
        let k = weight_sum / tw;
        match &mut settings.measured {
            None => {
                settings.measured = Some(MeasuredCosts {
                    profile_weight: a.measured_profile_weight,
                    rules: h.rules,
                    table: h.table.iter().map(|v| v / k).collect(),
                })
            }
            Some(m) if m.rules == h.rules => {
                m.table
                    .iter_mut()
                    .zip(&h.table)
                    .for_each(|(s, v)| *s += v / k);
            }
            Some(_) => bail!(
                "{}: measured other rules than {} (tables to average must share them)",
                f.display(),
                a.measured[0].display()
            ),
        }
    }
    if let Some(f) = &a.head_weights {
        let h = load_ablation(f, &profile)?;
        if !(a.head_weight_floor >= 0.0 && a.head_weight_floor.is_finite()) {
            bail!("--head-weight-floor must be finite and >= 0");
        }
        settings.head_weights = Some(HeadWeights {
            calibrate: a.head_weight_calibrate.then_some(moa::moa::Rule {
                alpha: h.alpha,
                beta: h.beta,
            }),
            weights: h.delta,
            floor: a.head_weight_floor,
        });
    }
    if !(a.time_limit > 0.0 && a.time_limit.is_finite()) {
        bail!("--time-limit must be positive");
    }
    settings.solve.time_limit = Duration::from_secs_f64(a.time_limit);
    let consts = Plan::new(0, 0, vec![], "constants");
    // The model (for the shape check and validation).
    let want_model = a.model.is_some() || a.validate.is_some();
    let loaded = if want_model {
        let path = runtime::resolve_model(a.model.as_deref())?;
        let l = runtime::load(&path).with_context(|| format!("cannot load {}", path.display()))?;
        Some(l)
    } else {
        None
    };
    let expect = loaded
        .as_ref()
        .map(|l| (l.model.config.n_layer, l.model.config.n_head_kv));
    let t0 = Instant::now();
    let inst = Instance::from_profile(&profile, &settings, &consts, expect)
        .with_context(|| format!("profile {}", a.profile.display()))?;
    let build_s = t0.elapsed().as_secs_f64();
    let mode = match (a.front, a.validate.is_some()) {
        (Front::Auto, true) | (Front::Weighted, _) => Some(FrontMode::Weighted),
        (Front::Epsilon, _) => Some(FrontMode::Epsilon {
            points: a.epsilon_points,
        }),
        _ => None,
    };
    let points: Vec<FrontPoint> = match (&a.weights, mode) {
        (Some(w), _) => vec![inst.solve_weighted(&settings, w, &[], &format!("weights {w:?}"))?],
        (None, Some(m)) => front(&inst, &settings, m)?,
        (None, None) => {
            let n = inst.profiled.len();
            vec![inst.solve_weighted(&settings, &vec![1.0 / n as f64; n], &[], "weights equal")?]
        }
    };
    let uniform = Plan::uniform(inst.n_layer, inst.n_head_kv, a.density as f32);
    let uni = inst.report(&uniform, &settings.lengths);
    // Validation.
    let mut losses: Vec<Option<f64>> = vec![None; points.len()];
    let mut baselines = json!(null);
    if let Some(vpath) = &a.validate {
        let l = loaded.as_ref().expect("loaded for validation");
        let mut samples = validate::load(vpath)?;
        samples.truncate(a.validate_max.max(1));
        let threads = a.threads.unwrap_or_else(runtime::default_threads);
        let lens: Vec<usize> = samples.iter().map(|s| s.tokens.len()).collect();
        if !a.json {
            eprintln!(
                "validation: {} conversations of {:?} tokens from {}",
                samples.len(),
                lens,
                vpath.display()
            );
        }
        let model: &Arc<moa::model::Model> = &l.model;
        for (i, p) in points.iter().enumerate() {
            let t = Instant::now();
            let loss = validate::plan_loss(model, Some(&p.plan), &samples, a.batch, threads)?;
            if !a.json {
                eprintln!(
                    "  point {i} ({}): loss {loss:.5} ({:.1} s)",
                    p.label,
                    t.elapsed().as_secs_f64()
                );
            }
            losses[i] = Some(loss);
        }
        if a.validate_baselines {
            let dense = validate::plan_loss(model, None, &samples, a.batch, threads)?;
            let unif = validate::plan_loss(model, Some(&uniform), &samples, a.batch, threads)?;
            if !a.json {
                eprintln!(
                    "  dense: loss {dense:.5}; uniform {}: loss {unif:.5}",
                    a.density
                );
            }
            baselines = json!({"dense": dense, "uniform": unif});
        }
    }
    let chosen = match losses
        .iter()
        .enumerate()
        .filter_map(|(i, l)| l.map(|l| (i, l)))
        .min_by(|x, y| x.1.total_cmp(&y.1))
    {
        Some((i, _)) => i,
        None => 0,
    };
    let mut plan = points[chosen].plan.clone();
    if let Some(l) = losses[chosen] {
        plan.note = format!(
            "{}; validation loss {l:.5} (lowest of {} front plans)",
            plan.note,
            points.len()
        );
    }
    plan.note = format!("{}; profile: {}", plan.note, profile.header.provenance);
    if let Some(o) = &a.output {
        plan.save_json(o, true)?;
    }
    if let Some(dir) = &a.front_dir {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        for (i, p) in points.iter().enumerate() {
            p.plan
                .save_json(dir.join(format!("front-{i}.json")), true)?;
        }
    }
    if a.json {
        let out = json!({
            "profile": a.profile.display().to_string(),
            "model": profile.header.model.name,
            "n_layer": inst.n_layer, "n_kv_heads": inst.n_head_kv,
            "profiled_lengths": inst.profiled,
            "density": a.density, "lower": a.lower, "lengths": settings.lengths,
            "max_rules_per_layer": a.max_rules,
            "balance": settings.balance.to_string(),
            "head_weights": a.head_weights.as_ref().map(|p| p.display().to_string()),
            "measured": a.measured.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
            "measured_weights": a.measured_weights,
            "measured_profile_weight": a.measured_profile_weight,
            "candidates": inst.cands.list.len(),
            "build_seconds": build_s,
            "points": points.iter().zip(&losses).map(|(p, l)| point_json(p, *l)).collect::<Vec<_>>(),
            "chosen": chosen,
            "uniform": report_json(&uni),
            "validation_baselines": baselines,
            "output": a.output.as_ref().map(|p| p.display().to_string()),
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    let m = &profile.header.model;
    println!(
        "profile: {} ({} {}, {} layers x {} KV heads; lengths {:?}, samples {:?})",
        a.profile.display(),
        m.arch,
        m.name,
        m.n_layer,
        m.n_head_kv,
        inst.profiled,
        profile
            .header
            .lengths
            .iter()
            .map(|e| e.samples)
            .collect::<Vec<_>>()
    );
    println!(
        "candidates: {} rules (grid {}), built in {:.2} s; density band [{:.4}, {:.4}]{}",
        inst.cands.list.len(),
        a.grid,
        build_s,
        a.lower * a.density,
        a.density,
        a.max_rules
            .map(|k| format!(", at most {k} rules per layer"))
            .unwrap_or_default()
    );
    for (i, p) in points.iter().enumerate() {
        let s = &p.solution;
        println!(
            "{} point {i} ({}): {:.2} s, {} nodes, {} active heads, dropped (weighted) {:.6}, bound {:.6}, gap {:.2e} ({}){}",
            if i == chosen { "*" } else { " " },
            p.label,
            s.seconds,
            s.nodes,
            s.active_heads,
            s.cost,
            s.bound,
            s.rel_gap(),
            if s.optimal { "optimal" } else { "limit reached" },
            losses[i].map(|l| format!(", validation loss {l:.5}")).unwrap_or_default()
        );
    }
    let best = &points[chosen].report;
    println!("\n  length   density   uniform   dropped   uniform dropped   ratio");
    for &(n, d) in &best.density {
        let ud = uni.density.iter().find(|x| x.0 == n).map_or(0.0, |x| x.1);
        let dr = best.dropped.iter().find(|x| x.0 == n).map(|x| x.1);
        let udr = uni.dropped.iter().find(|x| x.0 == n).map(|x| x.1);
        match (dr, udr) {
            (Some(x), Some(y)) => println!(
                "  {n:>6}   {d:.4}    {ud:.4}    {x:.5}   {y:.5}           {:.3}",
                if y > 0.0 { x / y } else { f64::NAN }
            ),
            _ => println!("  {n:>6}   {d:.4}    {ud:.4}    (not profiled)"),
        }
    }
    if let Some(o) = &a.output {
        println!("\nwrote {}", o.display());
    }
    Ok(())
}
