//! moa-eval end to end on a tiny random model written by our own writer (no download): every
//! subcommand's JSON and markdown, several configurations on the same prompts, the heatmap file,
//! determinism, and clear errors for impossible requests.

use std::process::Command;

use moa::formats::GgmlType;
use moa::model::synth::{write_synthetic, SynthSpec};

fn tiny(dir: &std::path::Path) -> String {
    let p = dir.join("tiny.gguf");
    write_synthetic(&SynthSpec::tiny(GgmlType::Q8_0, 5), &p).unwrap();
    p.to_str().unwrap().to_string()
}

fn eval(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_moa-eval"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

fn json(args: &[&str]) -> serde_json::Value {
    let (ok, out, err) = eval(args);
    assert!(ok, "moa-eval {args:?} failed: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

#[test]
fn passkey_json_png_and_determinism() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny(dir.path());
    let png = dir.path().join("pk.png");
    let args = [
        "passkey",
        "-m",
        &m,
        "-t",
        "2",
        "--lengths",
        "256,384",
        "--depths",
        "0,1",
        "--configs",
        "dense,uniform:0.5",
        "-n",
        "4",
        "--json",
        "--png",
        png.to_str().unwrap(),
    ];
    let j = json(&args);
    let trials = j["trials"].as_array().unwrap();
    assert_eq!(trials.len(), 2 * 2 * 2);
    for t in trials {
        let (len, got) = (
            t["length"].as_u64().unwrap(),
            t["prompt_tokens"].as_u64().unwrap(),
        );
        assert!(len.abs_diff(got) <= 3, "{t}");
        assert!(t["score"] == 0.0 || t["score"] == 1.0);
    }
    // Both configurations see the same keys; the uniform plan's cache is smaller.
    for pair in trials.chunks(2) {
        assert_eq!(pair[0]["config"], "dense");
        assert_eq!(pair[1]["config"], "uniform 0.5");
        assert_eq!(pair[0]["expected"], pair[1]["expected"]);
        assert_eq!(pair[0]["seed"], pair[1]["seed"]);
        assert!(pair[1]["kv_bytes"].as_u64() < pair[0]["kv_bytes"].as_u64());
    }
    assert_eq!(j["summary"].as_array().unwrap().len(), 2);
    let bytes = std::fs::read(&png).unwrap();
    assert_eq!(&bytes[..4], b"\x89PNG");
    // The same seed gives the same prompts and answers.
    let j2 = json(&args);
    assert_eq!(
        j["trials"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| (&t["expected"], &t["answer"]))
            .collect::<Vec<_>>(),
        j2["trials"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| (&t["expected"], &t["answer"]))
            .collect::<Vec<_>>()
    );
    // Markdown by default, with --json-file beside it.
    let jf = dir.path().join("pk.json");
    let (ok, out, err) = eval(&[
        "passkey",
        "-m",
        &m,
        "--lengths",
        "256",
        "--depths",
        "0.5",
        "--uniform",
        "0.5",
        "-q",
        "--json-file",
        jf.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(
        out.contains("| uniform 0.5 |") && out.contains("| depth | 256 |"),
        "{out}"
    );
    let saved: serde_json::Value = serde_json::from_slice(&std::fs::read(&jf).unwrap()).unwrap();
    assert_eq!(saved["task"], "passkey");
}

#[test]
fn copy_lines_and_ppl_run() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny(dir.path());
    let j = json(&[
        "copy",
        "-m",
        &m,
        "--lengths",
        "300",
        "--depths",
        "0.2",
        "--passage-words",
        "8",
        "--json",
        "--configs",
        "dense,uniform:0.25",
    ]);
    for t in j["trials"].as_array().unwrap() {
        let (loss, base) = (
            t["loss"].as_f64().unwrap(),
            t["baseline_loss"].as_f64().unwrap(),
        );
        assert!(loss.is_finite() && base.is_finite() && loss > 0.0, "{t}");
        assert!((0.0..=1.0).contains(&t["score"].as_f64().unwrap()));
    }
    let (ok, out, err) = eval(&[
        "copy",
        "-m",
        &m,
        "--lengths",
        "300",
        "--depths",
        "0.2",
        "--passage-words",
        "8",
        "-q",
    ]);
    assert!(ok, "{err}");
    assert!(
        out.contains("repeated passage") && out.contains("first occurrence"),
        "{out}"
    );

    let j = json(&[
        "lines",
        "-m",
        &m,
        "--no-chat",
        "--lengths",
        "800",
        "--depths",
        "0.5",
        "-n",
        "4",
        "--json",
    ]);
    assert_eq!(j["trials"].as_array().unwrap().len(), 1);
    let (ok, _, err) = eval(&["lines", "-m", &m, "--lengths", "400"]);
    assert!(!ok && err.contains("no chat template"), "{err}");

    let corpus = concat!(env!("CARGO_MANIFEST_DIR"), "/README.md");
    let j = json(&[
        "ppl",
        "-m",
        &m,
        "-f",
        corpus,
        "-c",
        "64,128",
        "--chunks",
        "2",
        "--configs",
        "dense,uniform:0.5",
        "--json",
    ]);
    let r = j["results"].as_array().unwrap();
    assert_eq!(r.len(), 4);
    for x in r {
        assert!(x["ppl"].as_f64().unwrap() > 1.0, "{x}");
        assert_eq!(x["n_chunks"], 2);
    }
    // Dense and a window covering all of a 64-token chunk (span >= 128) agree.
    assert_eq!(r[0]["ppl"], r[1]["ppl"]);
    let (ok, out, err) = eval(&[
        "ppl", "-m", &m, "-f", corpus, "-c", "64", "--chunks", "1", "-q",
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("| dense | 64 | 1 |"), "{out}");
}

#[test]
fn impossible_requests_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny(dir.path());
    let cases: &[(&[&str], &str)] = &[
        (&["passkey", "--lengths", "4k"], "does not fit the context"),
        (&["passkey", "--lengths", "10"], "too short"),
        (&["passkey", "--depths", "1.5"], "between 0 and 1"),
        (&["passkey", "--lengths", "two"], "length \"two\""),
        (
            &["passkey", "--configs", "embedded"],
            "no embedded span plan",
        ),
        (&["passkey", "--configs", "uniform:2"], "uniform density"),
        (
            &["passkey", "--configs", "dense", "--uniform", "0.5"],
            "not both",
        ),
        (
            &["passkey", "--filler", "/no/such/file.txt"],
            "/no/such/file.txt",
        ),
        (&["passkey", "--trials", "0"], "--trials"),
        (&["ppl", "-f", "/no/such/corpus.txt"], "/no/such/corpus.txt"),
        (
            &[
                "ppl",
                "-f",
                concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"),
                "-c",
                "1k",
            ],
            "needs at least",
        ),
    ];
    for (args, want) in cases {
        let mut a: Vec<&str> = args.to_vec();
        a.extend(["-m", &m, "-q"]);
        let (ok, _, err) = eval(&a);
        assert!(!ok, "{a:?} should fail");
        assert!(err.contains(want), "{a:?}: wanted {want:?} in {err}");
        assert!(!err.contains("panicked"), "{a:?}: {err}");
    }
}

/// `--device`: the reports name the device; `--device cpu` makes a fresh CPU backend per trial
/// and a cell's result does not depend on which other cells and configurations ran before it;
/// without a GPU, `auto` falls back to the CPU with a notice (same report) and `cuda` is a clear
/// error (with a GPU, tests/cuda_backend.rs runs the GPU path).
#[test]
fn device_flag() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny(dir.path());
    let grid = |device: &str, lengths: &str, depths: &str, configs: &str| {
        let (ok, out, err) = eval(&[
            "passkey",
            "-m",
            &m,
            "-t",
            "2",
            "--lengths",
            lengths,
            "--depths",
            depths,
            "--configs",
            configs,
            "--trials",
            "2",
            "-n",
            "4",
            "--json",
            "--device",
            device,
        ]);
        assert!(ok, "--device {device}: {err}");
        let j: serde_json::Value = serde_json::from_str(&out).unwrap();
        (j, err)
    };
    // Everything a trial reports but its time.
    let key = |t: &serde_json::Value| {
        let mut t = t.clone();
        t.as_object_mut().unwrap().remove("seconds");
        t
    };
    let (j, _) = grid("cpu", "256,384", "0,1", "dense,uniform:0.5");
    assert_eq!(j["device"], "cpu");
    assert!(j["backend"].as_str().unwrap().starts_with("cpu ("), "{j}");
    let trials = j["trials"].as_array().unwrap();
    assert_eq!(trials.len(), 2 * 2 * 2 * 2);
    assert_eq!(j["backend_stats"]["made"], trials.len());
    assert_eq!(j["backend_stats"]["replanned"], 0);
    let (alone, _) = grid("cpu", "384", "1", "uniform:0.5");
    let alone = alone["trials"].as_array().unwrap();
    let in_grid: Vec<_> = trials
        .iter()
        .filter(|t| t["length"] == 384 && t["depth"] == 1.0 && t["config"] == "uniform 0.5")
        .map(key)
        .collect();
    assert_eq!(in_grid, alone.iter().map(key).collect::<Vec<_>>());

    if moa::backend::cuda::probe().is_ok() {
        return;
    }
    let (auto, err) = grid("auto", "256,384", "0,1", "dense,uniform:0.5");
    assert!(err.contains("note: no usable GPU"), "{err}");
    assert_eq!(auto["device"], "cpu");
    assert_eq!(
        auto["trials"]
            .as_array()
            .unwrap()
            .iter()
            .map(key)
            .collect::<Vec<_>>(),
        trials.iter().map(key).collect::<Vec<_>>()
    );
    for sub in ["passkey", "ppl"] {
        let mut a = vec![sub, "-m", &m, "--device", "cuda", "-q"];
        if sub == "ppl" {
            a.extend(["-f", concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")]);
        }
        let (ok, _, err) = eval(&a);
        assert!(!ok, "{a:?} should fail without a GPU");
        assert!(
            err.contains("--device cuda: no usable GPU") && err.contains("--device cpu"),
            "{err}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }
}
