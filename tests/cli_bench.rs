//! moa-bench end to end: the parallel mode (llama-batched-bench: S sequences with their own
//! prompts, lockstep decode; one JSON row per count, the KV cache growing with S) and span plans
//! planned for each depth's own length.

use std::process::Command;

use moa::formats::GgmlType;
use moa::model::synth::{write_synthetic, SynthSpec};

fn bench(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_moa-bench"))
        .args(args)
        .output()
        .expect("moa-bench runs")
}

/// moa-bench with `args` that must succeed; its JSON output.
fn bench_json(args: &[&str]) -> serde_json::Value {
    let out = bench(args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn parallel_mode_reports_one_row_per_sequence_count() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write_synthetic(&SynthSpec::tiny(GgmlType::Q8_0, 3), &path).unwrap();
    let m = path.to_str().unwrap();
    let v = bench_json(&[
        "-m",
        m,
        "--parallel",
        "1,3",
        "-p",
        "8",
        "-n",
        "4",
        "--json",
        "--device",
        "cpu",
        "-t",
        "1",
    ]);
    let rows = v["parallel"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["sequences"], 1);
    assert_eq!(rows[1]["sequences"], 3);
    let kv = |r: &serde_json::Value| r["kv_bytes"].as_u64().unwrap();
    assert_eq!(kv(&rows[1]), 3 * kv(&rows[0]));
    for r in rows {
        assert!(r["tg_tps"].as_f64().unwrap() > 0.0 && r["pp_tps"].as_f64().unwrap() > 0.0);
    }

    let bad = bench(&[
        "-m",
        m,
        "--parallel",
        "0",
        "-p",
        "8",
        "-n",
        "4",
        "--device",
        "cpu",
    ]);
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("--parallel counts must be positive"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
}

#[test]
fn span_plans_are_planned_for_each_depth() {
    // With a span plan, each depth runs on a cache planned for its own length (as a run at that
    // context would): a list of depths reports what each depth alone reports.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write_synthetic(&SynthSpec::tiny(GgmlType::Q8_0, 5), &path).unwrap();
    let m = path.to_str().unwrap();
    let run = |depths: &str| {
        let v = bench_json(&[
            "-m",
            m,
            "--uniform",
            "0.5",
            "-p",
            "0",
            "-n",
            "4",
            "-d",
            depths,
            "-r",
            "1",
            "--json",
            "--device",
            "cpu",
            "-t",
            "1",
        ]);
        v["results"].as_array().unwrap().clone()
    };
    let both = run("900,300");
    assert_eq!(both.len(), 2);
    for (row, d) in both.iter().zip([900u64, 300]) {
        assert_eq!(row["depth"], d);
        assert_eq!(row["planned_n"], d + 5);
        let alone = run(&d.to_string());
        assert_eq!(row["kv_bytes"], alone[0]["kv_bytes"], "depth {d}");
    }
    let kv = |r: &serde_json::Value| r["kv_bytes"].as_u64().unwrap();
    assert!(kv(&both[1]) < kv(&both[0]), "{both:?}");
}

/// `moa-bench kernels`: a malformed architecture is a clear error before anything loads; without
/// libnvrtc on the search path, a clear error naming NVRTC (never a panic), and with it a cache
/// file that exists.
#[test]
fn kernels_subcommand_errors_are_clear() {
    for arch in ["90", "sm_", "sm_9", "sm_x0", "compute_90"] {
        let out = bench(&["kernels", "--arch", arch]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "--arch {arch} accepted");
        assert!(err.contains("--arch") && !err.contains("panicked"), "{err}");
    }
    let cache = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_moa-bench"))
        .args(["kernels", "--arch", "sm_90"])
        .env_remove("LD_LIBRARY_PATH")
        .env("MOA_CACHE", cache.path())
        .output()
        .expect("moa-bench runs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    if out.status.success() {
        // libnvrtc is on the default search path: the compiled PTX is in the cache.
        let stdout = String::from_utf8_lossy(&out.stdout);
        let path = stdout.split(" (").next().unwrap().trim();
        assert!(
            path.ends_with("-sm_90.ptx") && std::path::Path::new(path).is_file(),
            "{stdout}"
        );
    } else {
        assert!(err.contains("NVRTC"), "{err}");
    }
}
