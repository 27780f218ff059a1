//! Head ablation (`moa::profile::ablate`, `moa-profile ablate`) against independent loss
//! computations, and its use by `moa-optimize --head-weights` on a synthetic profile.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use moa::eval::runner::Runner;
use moa::formats::GgmlType;
use moa::moa::optimize::pareto::synthetic_profile;
use moa::moa::optimize::validate::{plan_loss, Sample};
use moa::moa::{Plan, Rule};
use moa::model::synth::{write_synthetic, SynthSpec};
use moa::model::Model;
use moa::profile::ablate::{ablate, ablate_resumable, AblateBase, Base, HeadAblation};
use moa::runtime::Device;
use moa::tokenizer::Tokenizer;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A hand-made ablation result of `n_layer x n_head_kv` heads (`rules` / `table` may be empty).
fn ablation(n_layer: usize, n_head_kv: usize, delta: Vec<f64>) -> HeadAblation {
    HeadAblation {
        model: "synthetic".into(),
        n_layer,
        n_head_kv,
        alpha: 256.0,
        beta: 0.0,
        base: AblateBase::Dense,
        base_rules: vec![],
        samples: 1,
        tokens_scored: 1,
        base_loss: 1.0,
        delta,
        rules: vec![],
        table: vec![],
    }
}

fn sample(n: usize, seed: usize) -> Sample {
    let tokens: Vec<u32> = (0..n)
        .map(|i| ((i * 37 + seed * 101 + 11) % 290) as u32)
        .collect();
    let scored: Vec<bool> = (0..n).map(|i| i >= n / 2).collect();
    Sample { tokens, scored }
}

/// The plan with `fill` everywhere and `other` at head `h`.
fn plan_with(fill: Rule, other: Rule, h: usize) -> Plan {
    let mut rules = vec![fill; 4];
    rules[h] = other;
    Plan::new(2, 2, rules, "t")
}

#[test]
fn ablation_matches_plan_losses_computed_separately() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write_synthetic(&SynthSpec::tiny(GgmlType::F32, 3), &path).unwrap();
    let model = Arc::new(Model::load(&path).unwrap());
    let tok = Tokenizer::from_gguf(&model.file).unwrap();
    let runner = Runner::new(
        model.clone(),
        tok,
        700,
        64,
        2,
        Default::default(),
        Device::Cpu,
    )
    .unwrap();
    // 600 and 450 tokens: the short rule (span 128, the plan's minimum) drops far keys.
    let samples = vec![sample(600, 1), sample(450, 2)];
    let short = Rule {
        alpha: 0.0,
        beta: 0.0,
    };
    let full = Rule {
        alpha: 0.0,
        beta: 1.0,
    };
    let dense = ablate(&runner, &samples, &[short], Base::Dense, |_, _| {}).unwrap();
    assert_eq!(
        (dense.n_layer, dense.n_head_kv, dense.delta.len()),
        (2, 2, 4)
    );
    let base = plan_loss(&model, None, &samples, 64, 2).unwrap();
    assert!(
        (dense.base_loss - base).abs() < 1e-9,
        "{} vs {base}",
        dense.base_loss
    );
    for h in 0..4 {
        let l = plan_loss(&model, Some(&plan_with(full, short, h)), &samples, 64, 2).unwrap();
        assert!((dense.delta[h] - (l - base)).abs() < 1e-9, "head {h}");
    }
    assert!(
        dense.delta.iter().any(|d| d.abs() > 1e-5),
        "{:?}",
        dense.delta
    );
    // The other base: what one dense head recovers among short ones.
    let rec = ablate(&runner, &samples, &[short], Base::Short, |_, _| {}).unwrap();
    let all_short = Plan::new(2, 2, vec![short; 4], "t");
    let base = plan_loss(&model, Some(&all_short), &samples, 64, 2).unwrap();
    assert!((rec.base_loss - base).abs() < 1e-9);
    for h in 0..4 {
        let l = plan_loss(&model, Some(&plan_with(short, full, h)), &samples, 64, 2).unwrap();
        assert!((rec.delta[h] - (base - l)).abs() < 1e-9, "head {h}");
    }
    // Conversations within the short span: nothing to ablate, every change exactly 0.
    let within = ablate(&runner, &[sample(120, 3)], &[short], Base::Dense, |_, _| {}).unwrap();
    assert!(within.delta.iter().all(|&d| d == 0.0), "{:?}", within.delta);
    // A cost table inside a plan: every head moved to each rule, the rest keeping the plan's.
    let base_plan = plan_with(
        Rule {
            alpha: 0.0,
            beta: 0.5,
        },
        full,
        2,
    );
    let rules = [short, full];
    let t = ablate(&runner, &samples, &rules, Base::Plan(&base_plan), |_, _| {}).unwrap();
    assert_eq!(
        (t.base, t.table.len(), t.rules.len()),
        (AblateBase::Plan, 8, 2)
    );
    assert_eq!(t.base_rules, base_plan.rules);
    let base = plan_loss(&model, Some(&base_plan), &samples, 64, 2).unwrap();
    assert!((t.base_loss - base).abs() < 1e-9);
    for h in 0..4 {
        for (r, &rule) in rules.iter().enumerate() {
            let got = t.table[h * 2 + r];
            if rule == base_plan.rules[h] {
                assert_eq!(got, 0.0, "head {h} keeps its own rule");
                continue;
            }
            let mut p = base_plan.clone();
            p.rules[h] = rule;
            let l = plan_loss(&model, Some(&p), &samples, 64, 2).unwrap();
            assert!((got - (l - base)).abs() < 1e-9, "head {h} rule {r}");
        }
        assert_eq!(t.delta[h], t.table[h * 2]);
    }
    // Resumable: the checkpoint holds every finished head's row; a run started again with the
    // same inputs takes the rows it finds (a marked value proves they are not recomputed) and
    // measures only the rest; a checkpoint of other inputs, or not JSON, is ignored.
    let cp = dir.path().join("t.json.partial");
    let run = |rules: &[Rule], passes: &mut usize| {
        ablate_resumable(
            &runner,
            &samples,
            rules,
            Base::Plan(&base_plan),
            Some(&cp),
            |_, _| *passes += 1,
        )
        .unwrap()
    };
    let mut passes = 0;
    assert_eq!(run(&rules, &mut passes).table, t.table);
    let mut part: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cp).unwrap()).unwrap();
    assert_eq!(part["rows"].as_array().unwrap().len(), 4);
    part["rows"].as_array_mut().unwrap().truncate(2);
    part["rows"][0][0] = serde_json::json!(123.0);
    std::fs::write(&cp, part.to_string()).unwrap();
    let mut passes = 0;
    let resumed = run(&rules, &mut passes);
    assert_eq!(resumed.table[0], 123.0);
    assert_eq!(resumed.table[1..], t.table[1..]);
    assert_eq!(resumed.base_loss, t.base_loss);
    assert_eq!(
        passes,
        1 + 2 * 2,
        "the first call, then the two remaining heads' two rules"
    );
    std::fs::write(&cp, part.to_string()).unwrap();
    let other = [full, short];
    let fresh = run(&other, &mut 0);
    assert!(fresh.table.iter().all(|&v| v != 123.0));
    std::fs::write(&cp, "not json").unwrap();
    assert_eq!(run(&rules, &mut 0).table, t.table);
    // The command line keeps its checkpoint beside the output while it runs and removes it
    // once the table is written.
    let data = dir.path().join("d.jsonl");
    let lines: Vec<String> = samples
        .iter()
        .map(|x| {
            let mask: Vec<u8> = x.scored.iter().map(|&f| u8::from(f)).collect();
            serde_json::json!({"tokens": x.tokens, "response_mask": mask}).to_string()
        })
        .collect();
    std::fs::write(&data, lines.join("\n")).unwrap();
    let out = dir.path().join("cli.json");
    let o = Command::new(env!("CARGO_BIN_EXE_moa-profile"))
        .args([
            "ablate",
            "-m",
            s(&path),
            "--data",
            s(&data),
            "--rules",
            "0:0,0:1",
        ])
        .args(["-b", "64", "-t", "2", "--device", "cpu", "-o", s(&out)])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let cli = HeadAblation::load(&out).unwrap();
    assert_eq!((cli.table.len(), cli.samples), (8, 2));
    assert!(!dir.path().join("cli.json.partial").exists());
    // The short base measures one rule only.
    assert!(ablate(&runner, &samples, &rules, Base::Short, |_, _| {}).is_err());
    // Round trip through the file, and a file of the wrong shape is an error.
    let f = dir.path().join("a.json");
    dense.save(&f).unwrap();
    assert_eq!(HeadAblation::load(&f).unwrap(), dense);
    let mut bad = dense.clone();
    bad.delta.pop();
    std::fs::write(&f, serde_json::to_string(&bad).unwrap()).unwrap();
    let e = HeadAblation::load(&f).unwrap_err().to_string();
    assert!(e.contains("3 values for 2 layers x 2 KV heads"), "{e}");
    let mut bad = t.clone();
    bad.table.pop();
    std::fs::write(&f, serde_json::to_string(&bad).unwrap()).unwrap();
    let e = HeadAblation::load(&f).unwrap_err().to_string();
    assert!(e.contains("table of 7 values for 2 rules x 4 heads"), "{e}");
}

#[test]
fn measured_costs_make_the_plan() {
    // A table over the rules of the grid 0:0:1,0.25 (beta 0.25 .. 1) for 4 x 2 heads where
    // heads 1 and 6 lose much below full span and the others nothing: at density 0.5 those two
    // get full span and the plan stays in the band.
    let dir = tempfile::tempdir().unwrap();
    let prof = dir.path().join("p.bin");
    synthetic_profile(4, 2, &[1024, 2048], 3)
        .save(&prof)
        .unwrap();
    let rules: Vec<Rule> = [0.25f32, 0.5, 0.75, 1.0]
        .iter()
        .map(|&beta| Rule { alpha: 0.0, beta })
        .collect();
    let mut table = vec![0.0; 8 * 4];
    for h in [1usize, 6] {
        table[h * 4..h * 4 + 4].copy_from_slice(&[3.0, 2.0, 1.0, 0.0]);
    }
    let a = HeadAblation {
        alpha: 0.0,
        beta: 0.25,
        rules,
        ..ablation(4, 2, (0..8).map(|h| table[h * 4]).collect())
    };
    let a = HeadAblation { table, ..a };
    let w = dir.path().join("t.json");
    a.save(&w).unwrap();
    let out = dir.path().join("plan.json");
    // moa-optimize with the measured tables `tables` (comma-separated) on `grid`.
    let run = |tables: &str, grid: &str| {
        Command::new(env!("CARGO_BIN_EXE_moa-optimize"))
            .args(["--profile", s(&prof), "--lengths", "1024,2048,4096"])
            .args(["--measured", tables, "--grid", grid, "-o", s(&out)])
            .output()
            .unwrap()
    };
    let o = run(s(&w), "0:0:1,0.25");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let plan = Plan::load_json(&out).unwrap();
    assert!(plan.note.contains("measured costs"), "{}", plan.note);
    for n in [1024, 2048, 4096] {
        let d = plan.density_at(n);
        assert!(
            (0.45 - 1e-9..=0.5 + 1e-9).contains(&d),
            "density {d} at {n}"
        );
        let spans = plan.spans(n);
        for h in [1, 6] {
            assert_eq!(spans[h], n, "head {h} at {n}: {spans:?}");
        }
    }
    // Averaging a table with itself changes nothing.
    let once = Plan::load_json(&out).unwrap().rules;
    let both = format!("{},{}", s(&w), s(&w));
    let o = run(&both, "0:0:1,0.25");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(Plan::load_json(&out).unwrap().rules, once);
    // Weighted: a second table that wants heads 2 and 5 instead; the weights decide which
    // pair gets full span, and a weight count that does not match the tables is refused.
    let mut t2 = vec![0.0; 8 * 4];
    for h in [2usize, 5] {
        t2[h * 4..h * 4 + 4].copy_from_slice(&[3.0, 2.0, 1.0, 0.0]);
    }
    let b = HeadAblation {
        table: t2,
        ..a.clone()
    };
    let wb = dir.path().join("tb.json");
    b.save(&wb).unwrap();
    let weighted = |weights: &str| {
        let o = Command::new(env!("CARGO_BIN_EXE_moa-optimize"))
            .args(["--profile", s(&prof), "--lengths", "1024,2048,4096"])
            .args(["--measured", &format!("{},{}", s(&w), s(&wb))])
            .args(["--measured-weights", weights, "--grid", "0:0:1,0.25"])
            .args(["-o", s(&out)])
            .output()
            .unwrap();
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stderr).to_string(),
        )
    };
    for (weights, full) in [
        ("1,0", [1usize, 6]),
        ("0,1", [2, 5]),
        ("1,10", [2, 5]),
        ("10,1", [1, 6]),
    ] {
        let (ok, e) = weighted(weights);
        assert!(ok, "{e}");
        let spans = Plan::load_json(&out).unwrap().spans(4096);
        for h in full {
            assert_eq!(spans[h], 4096, "weights {weights}, head {h}: {spans:?}");
        }
    }
    // The profile's first-order costs added at a weight: far above the table's, the plan is
    // the profile's own (the same grid, no table); at 0 the table's.
    let profile_plan = |extra: &[&str]| {
        let o = Command::new(env!("CARGO_BIN_EXE_moa-optimize"))
            .args(["--profile", s(&prof), "--lengths", "1024,2048,4096"])
            .args(["--grid", "0:0:1,0.25", "-o", s(&out)])
            .args(extra)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        Plan::load_json(&out).unwrap()
    };
    let first_order = profile_plan(&[]).rules;
    let mixed = profile_plan(&["--measured", s(&w), "--measured-profile-weight", "1e6"]);
    assert_eq!(mixed.rules, first_order);
    assert!(
        mixed.note.contains("measured costs + profile x 1000000"),
        "{}",
        mixed.note
    );
    let table_only = profile_plan(&["--measured", s(&w), "--measured-profile-weight", "0"]);
    assert_eq!(table_only.rules, once);
    assert_ne!(
        first_order, once,
        "the test needs a profile that disagrees with the table"
    );
    let (ok, e) = weighted("1");
    assert!(!ok && e.contains("1 weights for 2 tables"), "{e}");
    let (ok, e) = weighted("0,0");
    assert!(!ok && e.contains("not all 0"), "{e}");
    // Tables of other rules cannot be averaged.
    let mut other = a.clone();
    other.rules[0].beta = 0.3;
    let w2 = dir.path().join("t2.json");
    other.save(&w2).unwrap();
    let mixed = format!("{},{}", s(&w), s(&w2));
    let o = run(&mixed, "0:0:1,0.25");
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("must share them"), "{e}");
    // A grid with rules that were not measured is refused by name.
    let o = run(s(&w), "-1024:2048:512,0.125");
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("was not measured"), "{e}");
}

#[test]
fn head_weights_steer_the_plan() {
    let dir = tempfile::tempdir().unwrap();
    let prof = dir.path().join("p.bin");
    synthetic_profile(4, 2, &[1024, 2048], 3)
        .save(&prof)
        .unwrap();
    let run = |extra: &[&str], out: &Path| {
        let mut args = vec![
            "--profile",
            s(&prof),
            "--lengths",
            "1024,2048,4096",
            "--grid",
            "-1024:2048:512,0.125",
            "--balance",
            "head:1",
            "-o",
            s(out),
        ];
        args.extend(extra);
        let o = Command::new(env!("CARGO_BIN_EXE_moa-optimize"))
            .args(&args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr).to_string();
        (o.status.success(), stderr)
    };
    // Only heads 5 and 6 matter (layer 2 KV head 1, layer 3 KV head 0), the rest nearly not.
    for favoured in [[5usize, 6], [0, 7]] {
        let mut delta = vec![0.0; 8];
        for &h in &favoured {
            delta[h] = 1.0;
        }
        let a = ablation(4, 2, delta);
        let w = dir.path().join("w.json");
        a.save(&w).unwrap();
        let out = dir.path().join("plan.json");
        let (ok, stderr) = run(
            &["--head-weights", s(&w), "--head-weight-floor", "0.001"],
            &out,
        );
        assert!(ok, "{stderr}");
        let plan = Plan::load_json(&out).unwrap();
        assert!(plan.note.contains("head weights"), "{}", plan.note);
        for n in [1024, 2048, 4096] {
            let d = plan.density_at(n);
            assert!(
                (0.45 - 1e-9..=0.5 + 1e-9).contains(&d),
                "density {d} at {n}"
            );
            let spans = plan.spans(n);
            for &h in &favoured {
                assert_eq!(spans[h], n, "favoured head {h} at {n}: {spans:?}");
            }
        }
    }
    // A weights file for another shape is refused by name.
    let a = ablation(3, 2, vec![0.0; 6]);
    let w = dir.path().join("w3.json");
    a.save(&w).unwrap();
    let (ok, stderr) = run(&["--head-weights", s(&w)], &dir.path().join("x.json"));
    assert!(!ok && stderr.contains("3 layers x 2 KV heads"), "{stderr}");
}
