//! The KV cache type flags (`-ctk` / `-ctv`, llama.cpp's names) on moa-run, moa-perplexity,
//! moa-bench and moa-eval, on tiny random models: the JSON outputs carry the exact bytes of the
//! chosen types and name them; unknown types and head dims that are not whole q8_0 blocks are
//! clear errors; `--device cuda` takes q8_0 caches (an error only without a GPU).

mod common;

use moa::formats::GgmlType;
use moa::model::synth::{write_synthetic, SynthSpec};

/// A tiny model with `n_embd / 4` values per head (the plain tiny spec has head_dim 16).
fn model(dir: &std::path::Path, n_embd: usize) -> std::path::PathBuf {
    let p = dir.join(format!("tiny-{n_embd}.gguf"));
    let spec = SynthSpec {
        n_embd,
        n_ff: 2 * n_embd,
        ..SynthSpec::tiny(GgmlType::Q8_0, 17)
    };
    write_synthetic(&spec, &p).unwrap();
    p
}

use common::run_bin as run;

/// Bytes of K plus V for `rows` rows of head_dim `hd` in the given types.
fn bytes(rows: u64, hd: u64, k: &str, v: &str) -> u64 {
    let row = |t: &str| if t == "q8_0" { hd / 32 * 34 } else { hd * 2 };
    rows * (row(k) + row(v))
}

#[test]
fn moa_run_reports_exact_q8_0_bytes_and_the_types() {
    let dir = tempfile::tempdir().unwrap();
    let m = model(dir.path(), 256); // head_dim 64: two q8_0 blocks per row
    for (k, v) in [
        ("q8_0", "q8_0"),
        ("q8_0", "f16"),
        ("f16", "q8_0"),
        ("f16", "f16"),
    ] {
        let (ok, out, err) = run(
            env!("CARGO_BIN_EXE_moa-run"),
            &[
                "-m",
                m.to_str().unwrap(),
                "-p",
                "the rain in spain",
                "-n",
                "8",
                "--temp",
                "0",
                "-t",
                "2",
                "--device",
                "cpu",
                "-ctk",
                k,
                "-ctv",
                v,
                "--json",
            ],
        );
        assert!(ok, "{k}/{v}: {err}");
        let j: serde_json::Value = serde_json::from_str(&out).unwrap();
        // Dense: 2 layers x 2 KV heads x n_plan rows.
        let rows = 2 * 2 * j["n_plan"].as_u64().unwrap();
        assert_eq!(
            j["kv_bytes"].as_u64().unwrap(),
            bytes(rows, 64, k, v),
            "{j}"
        );
        assert_eq!(j["kv_bytes_dense"], j["kv_bytes"]);
        assert_eq!(j["cache_type_k"], k);
        assert_eq!(j["cache_type_v"], v);
        assert!(!j["generated_ids"].as_array().unwrap().is_empty());
    }
    // The start-up line states the types beside the bytes.
    let (ok, _, err) = run(
        env!("CARGO_BIN_EXE_moa-run"),
        &[
            "-m",
            m.to_str().unwrap(),
            "-p",
            "hello",
            "-n",
            "2",
            "--device",
            "cpu",
            "--cache-type-k=q8_0",
            "-ctv=q8_0",
            "--uniform",
            "0.5",
        ],
    );
    assert!(ok, "{err}");
    assert!(err.contains("(dense: ") && err.contains("), q8_0"), "{err}");
}

#[test]
fn perplexity_bench_and_eval_take_the_flags() {
    let dir = tempfile::tempdir().unwrap();
    let m = model(dir.path(), 128); // head_dim 32: one q8_0 block per row
    let m = m.to_str().unwrap();
    let text = dir.path().join("text.txt");
    std::fs::write(
        &text,
        "the quick brown fox jumps over the lazy dog. ".repeat(40),
    )
    .unwrap();
    let text = text.to_str().unwrap();

    let (ok, out, err) = run(
        env!("CARGO_BIN_EXE_moa-perplexity"),
        &[
            "-m", m, "-f", text, "-c", "64", "--chunks", "2", "-t", "2", "--device", "cpu", "-ctk",
            "q8_0", "-ctv", "q8_0", "--json",
        ],
    );
    assert!(ok, "{err}");
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        j["kv_bytes"].as_u64().unwrap(),
        bytes(2 * 2 * 64, 32, "q8_0", "q8_0")
    );
    assert_eq!(j["cache_type_k"], "q8_0");
    assert!(j["ppl"].as_f64().unwrap().is_finite());

    let (ok, out, err) = run(
        env!("CARGO_BIN_EXE_moa-bench"),
        &[
            "-m", m, "-p", "8", "-n", "4", "-r", "1", "-t", "1", "--device", "cpu", "-ctk", "q8_0",
            "--json",
        ],
    );
    assert!(ok, "{err}");
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    // n_ctx = depth 0 + the longest test + 1.
    assert_eq!(
        j["kv_bytes"].as_u64().unwrap(),
        bytes(2 * 2 * 9, 32, "q8_0", "f16")
    );
    assert_eq!(
        (j["cache_type_k"].as_str(), j["cache_type_v"].as_str()),
        (Some("q8_0"), Some("f16"))
    );

    let (ok, out, err) = run(
        env!("CARGO_BIN_EXE_moa-eval"),
        &[
            "ppl", "-m", m, "-f", text, "-c", "64", "--chunks", "1", "-t", "1", "-q", "-ctk",
            "q8_0", "-ctv", "q8_0", "--json",
        ],
    );
    assert!(ok, "{err}");
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(j["cache_type_v"], "q8_0");
    let r = &j["results"][0];
    assert_eq!(
        r["kv_bytes"].as_u64().unwrap(),
        bytes(2 * 2 * 64, 32, "q8_0", "q8_0"),
        "{j}"
    );
    assert_eq!(r["kv_bytes_dense"], r["kv_bytes"]);
}

#[test]
fn cache_type_errors_are_clear() {
    let dir = tempfile::tempdir().unwrap();
    let hd64 = model(dir.path(), 256);
    let hd16 = model(dir.path(), 64);
    let base = |m: &std::path::Path| -> Vec<String> {
        ["-m", m.to_str().unwrap(), "-p", "hello", "-n", "2"]
            .map(String::from)
            .to_vec()
    };
    let with = |m: &std::path::Path, extra: &[&str]| {
        let mut a = base(m);
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let moa_run = |args: Vec<String>| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run(env!("CARGO_BIN_EXE_moa-run"), &args)
    };

    // An unknown type names the accepted ones.
    let (ok, _, err) = moa_run(with(&hd64, &["-ctk", "q4_0"]));
    assert!(!ok);
    assert!(
        err.contains("q4_0") && err.contains("accepted types are f16, q8_0"),
        "{err}"
    );
    let (ok, _, err) = moa_run(with(&hd64, &["-ctv", "f32"]));
    assert!(
        !ok && err.contains("--cache-type-v") && err.contains("f16, q8_0"),
        "{err}"
    );

    // q8_0 needs whole 32-value blocks per row.
    let (ok, _, err) = moa_run(with(&hd16, &["--device", "cpu", "-ctk", "q8_0"]));
    assert!(!ok);
    assert!(
        err.contains("head_dim 16") && err.contains("blocks of 32"),
        "{err}"
    );

    // The CUDA backend holds q8_0 caches too: `--device cuda` fails only for want of a GPU (a
    // clear error) and runs on one; `--device auto` takes the GPU when one is usable.
    let gpu = moa::backend::cuda::probe().is_ok();
    let (ok, _, err) = moa_run(with(&hd64, &["--device", "cuda", "-ctv", "q8_0"]));
    if gpu {
        assert!(ok && err.contains("backend: cuda"), "{err}");
    } else {
        assert!(!ok && err.contains("no usable GPU"), "{err}");
    }
    let (ok, _, err) = moa_run(with(
        &hd64,
        &["--device", "auto", "-ctk", "q8_0", "-ctv", "q8_0"],
    ));
    assert!(ok, "{err}");
    let want = if gpu { "backend: cuda" } else { "backend: cpu" };
    assert!(err.contains(want), "{err}");
}
