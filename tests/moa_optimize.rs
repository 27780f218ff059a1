//! moa-optimize end to end: the CLI on a synthetic profile (plan file within the density band,
//! JSON report, clear errors for a profile that does not fit the model), response-token
//! validation on a tiny synthetic model, and (ignored, run with `--ignored --nocapture` in
//! release) the solver timing harness on the default model's and Llama-3-70B's shapes.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use moa::formats::GgmlType;
use moa::moa::optimize::pareto::synthetic_profile;
use moa::moa::optimize::solver::{solve, Coef, Problem, Row, SolveOptions};
use moa::moa::optimize::validate::{plan_loss, Sample};
use moa::moa::optimize::{Candidates, Grid};
use moa::moa::{Plan, Rule};
use moa::model::synth::{write_synthetic, SynthSpec};
use moa::model::Model;

/// The solver's density band: `plan`'s mean density lies in [0.9 b, b] at every length.
fn assert_density_band(plan: &Plan, lengths: &[usize], b: f64, what: &str) {
    for &n in lengths {
        let d = plan.density_at(n);
        assert!(
            d <= b + 1e-9 && d >= 0.9 * b - 1e-9,
            "{what}: density {d:.4} at {n} outside [{:.3}, {b:.3}]",
            0.9 * b
        );
    }
}

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_moa-optimize")
}

fn run(args: &[&str]) -> (bool, String, String) {
    let o = Command::new(bin()).args(args).output().unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into(),
        String::from_utf8_lossy(&o.stderr).into(),
    )
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn cli_writes_a_plan_in_the_band() {
    let dir = tempfile::tempdir().unwrap();
    let prof = dir.path().join("p.bin");
    synthetic_profile(4, 2, &[1024, 2048], 3)
        .save(&prof)
        .unwrap();
    let out = dir.path().join("plan.json");
    let (ok, stdout, stderr) = run(&[
        "--profile",
        s(&prof),
        "--density",
        "0.5",
        "--lengths",
        "1024,2048,4096",
        "--grid",
        "-1024:2048:512,0.125",
        "-o",
        s(&out),
    ]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("optimal"), "{stdout}");
    let plan = Plan::load_json(&out).unwrap();
    assert_eq!((plan.n_layer, plan.n_head_kv), (4, 2));
    assert_eq!(plan.source, "profiled");
    assert_density_band(&plan, &[1024, 2048, 4096], 0.5, "cli plan");
    // JSON report with a Pareto front.
    let (ok, stdout, stderr) = run(&[
        "--profile",
        s(&prof),
        "--lengths",
        "1024,2048,4096",
        "--front",
        "weighted",
        "--max-rules-per-layer",
        "1",
        "--json",
    ]);
    assert!(ok, "{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert!(!v["points"].as_array().unwrap().is_empty());
    assert_eq!(v["points"][0]["solve"]["optimal"], true);
    let pd = v["points"][0]["report"]["dropped"][0]["dropped"]
        .as_f64()
        .unwrap();
    let ud = v["uniform"]["dropped"][0]["dropped"].as_f64().unwrap();
    assert!(pd <= ud, "plan {pd} vs uniform {ud}");
}

#[test]
fn cli_errors_are_clear() {
    let dir = tempfile::tempdir().unwrap();
    let prof = dir.path().join("p.bin");
    synthetic_profile(3, 2, &[1024], 3).save(&prof).unwrap();
    let model = dir.path().join("tiny.gguf");
    write_synthetic(&SynthSpec::tiny(GgmlType::F32, 1), &model).unwrap();
    let (ok, _, stderr) = run(&["--profile", s(&prof), "-m", s(&model), "--lengths", "1024"]);
    assert!(!ok);
    assert!(
        stderr.contains("3 layers x 2 KV heads") && stderr.contains("2 x 2"),
        "{stderr}"
    );
    let (ok, _, stderr) = run(&["--profile", s(&dir.path().join("missing.bin"))]);
    assert!(!ok && stderr.contains("missing.bin"), "{stderr}");
    let (ok, _, stderr) = run(&["--profile", s(&prof), "--density", "0", "--lengths", "1024"]);
    assert!(!ok && stderr.contains("density"), "{stderr}");
    std::fs::write(&prof, b"garbage").unwrap();
    let (ok, _, stderr) = run(&["--profile", s(&prof)]);
    assert!(!ok && stderr.contains("magic"), "{stderr}");
    assert!(!stderr.contains("panicked"));
}

#[test]
fn validation_loss_is_response_cross_entropy() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write_synthetic(&SynthSpec::tiny(GgmlType::F32, 7), &path).unwrap();
    let model = Arc::new(Model::load(&path).unwrap());
    let n = 200;
    let tokens: Vec<u32> = (0..n).map(|i| ((i * 37 + 11) % 290) as u32).collect();
    let scored: Vec<bool> = (0..n).map(|i| i >= 150).collect();
    let samples = vec![Sample { tokens, scored }];
    let dense = plan_loss(&model, None, &samples, 64, 2).unwrap();
    // A plan covering the sequence is dense attention.
    let full = Plan::new(
        2,
        2,
        vec![
            Rule {
                alpha: 0.0,
                beta: 1.0
            };
            4
        ],
        "t",
    );
    let same = plan_loss(&model, Some(&full), &samples, 17, 2).unwrap();
    assert!((dense - same).abs() < 1e-4, "{dense} vs {same}");
    assert!(dense.is_finite() && dense > 0.0);
    // A short plan (small constants so it bites at 200 tokens) changes the loss.
    let mut short = Plan::new(
        2,
        2,
        vec![
            Rule {
                alpha: 0.0,
                beta: 0.0
            };
            4
        ],
        "t",
    );
    short.sink = 4;
    short.min_span = 8;
    short.align = 4;
    let other = plan_loss(&model, Some(&short), &samples, 64, 2).unwrap();
    assert!((other - dense).abs() > 1e-4, "{other} vs {dense}");
    // A plan of the wrong shape is an error, not a panic.
    let wrong = Plan::uniform(3, 2, 0.5);
    assert!(plan_loss(&model, Some(&wrong), &samples, 64, 2).is_err());
}

/// The plan problem of a synthetic model of the given shape: the default grid at 2k..16k,
/// costs shaped like real heads (a share of global influence, the rest decaying with distance).
fn plan_problem(
    n_layer: usize,
    n_head: usize,
    density: f64,
    k: Option<usize>,
    seed: u64,
) -> Problem {
    let consts = Plan::new(0, 0, vec![], "c");
    let profiled = [2048usize, 4096, 8192];
    let lengths = [2048usize, 4096, 8192, 16384];
    let cands = Candidates::build(&Grid::default(), &consts, &profiled, &lengths).unwrap();
    let mut st = seed;
    let mut rnd = || {
        st = st
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((st >> 11) as f64) / (1u64 << 53) as f64
    };
    let nh = n_layer * n_head;
    let mut cost = Vec::with_capacity(nh * cands.list.len());
    for _ in 0..nh {
        let g = rnd().powi(3);
        let reach = 64.0 * (1.0 + 40.0 * rnd());
        for c in &cands.list {
            let mut x = 0.0;
            for (k, &n) in profiled.iter().enumerate() {
                let cap = c.spans[k].min(n) as f64;
                x += g * (1.0 - cap / n as f64) + (1.0 - g) * (-cap / reach).exp();
            }
            cost.push(x / (3.0 * nh as f64));
        }
    }
    let rows = lengths
        .iter()
        .enumerate()
        .map(|(k, &n)| Row {
            name: format!("density@{n}"),
            coef: Coef::PerOption(cands.list.iter().map(|c| c.density[k]).collect()),
            lo: 0.9 * density * nh as f64,
            hi: density * nh as f64,
        })
        .collect();
    Problem {
        n_groups: n_layer,
        group_size: n_head,
        n_opt: cands.list.len(),
        cost,
        rows,
        max_distinct: k,
    }
}

/// Solver timings: `cargo test --release --test moa_optimize -- --ignored --nocapture`.
#[test]
#[ignore]
fn solver_timing() {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("solver timing ({threads} cores available; the solver is single-threaded)");
    println!("shape      density  K     seconds  nodes      active  dual_it  rel_gap    optimal");
    for &(l, h) in &[(30usize, 3usize), (80, 8), (80, 64)] {
        for &b in &[0.25, 0.5, 0.75] {
            for &k in &[None, Some(2)] {
                for seed in 1..=2 {
                    let p = plan_problem(l, h, b, k, seed);
                    let t = Instant::now();
                    let opt = SolveOptions {
                        time_limit: std::time::Duration::from_secs(20),
                        ..SolveOptions::default()
                    };
                    let s = solve(&p, &opt).unwrap();
                    let secs = t.elapsed().as_secs_f64();
                    assert!(p.feasible(&s.choice));
                    println!(
                        "{:<10} {b:<8} {:<5} {secs:<8.3} {:<10} {:<7} {:<8} {:<10.2e} {}",
                        format!("{l}x{h}"),
                        k.map_or("-".into(), |k| k.to_string()),
                        s.nodes,
                        s.active_heads,
                        s.dual_iters,
                        s.rel_gap(),
                        s.optimal
                    );
                }
            }
        }
    }
}

/// Solver against brute force on plan-shaped problems small enough to enumerate.
#[test]
fn plan_shaped_problems_match_brute_force() {
    use moa::moa::optimize::solver::brute_force;
    let mut checked = 0;
    for seed in 0..24u64 {
        let mut p = plan_problem(
            2,
            3,
            [0.25, 0.5, 0.75][seed as usize % 3],
            [None, Some(1), Some(2)][(seed / 3) as usize % 3],
            seed,
        );
        // Keep 7 options (spread over the grid) so 7^6 assignments can be enumerated.
        let keep: Vec<usize> = (0..p.n_opt).step_by(p.n_opt / 7 + 1).collect();
        let nh = p.n_heads();
        p.cost = (0..nh)
            .flat_map(|h| keep.iter().map(move |&c| (h, c)))
            .map(|(h, c)| p.cost[h * p.n_opt + c])
            .collect();
        for r in &mut p.rows {
            if let Coef::PerOption(v) = &r.coef {
                r.coef = Coef::PerOption(keep.iter().map(|&c| v[c]).collect());
            }
        }
        p.n_opt = keep.len();
        let bf = brute_force(&p);
        match (bf, solve(&p, &SolveOptions::default())) {
            (Some((c, _)), Ok(s)) => {
                assert!(
                    s.optimal && (s.cost - c).abs() <= 1e-12 + 1e-9 * c,
                    "seed {seed}: {} vs {c}",
                    s.cost
                );
                checked += 1;
            }
            (None, Err(_)) => {}
            (bf, s) => panic!("seed {seed}: brute force {bf:?} vs {s:?}"),
        }
    }
    assert!(checked >= 8, "{checked}");
}

/// Every plan shipped under `plans/` loads, has valid rules, and keeps its mean density (the
/// runtime's span formula) within the solver's band [0.9 b, b] at every length it was built
/// for: a hand-edited or stale plan file fails here.
#[test]
fn shipped_plans_hold_their_density_band() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("plans");
    let mut seen = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let path = e.unwrap().path();
        if path.extension().and_then(|x| x.to_str()) != Some("json") {
            continue;
        }
        let plan = Plan::load_json(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        plan.validate_rules().unwrap();
        assert_eq!(plan.rules.len(), plan.n_layer * plan.n_head_kv);
        let b = plan.density.expect("a shipped plan records its density") as f64;
        assert!(!plan.lengths.is_empty(), "{}: no lengths", path.display());
        let lengths: Vec<usize> = plan.lengths.iter().map(|&n| n as usize).collect();
        assert_density_band(&plan, &lengths, b, &path.display().to_string());
        seen += 1;
    }
    assert!(seen > 0, "no plan under {}", dir.display());
}
