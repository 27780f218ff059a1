//! Helpers shared by the integration tests: where the real models are, whether the Python
//! reference (gguf-py) is installed, and running the reference scripts.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

pub mod reference;

pub const SMOLLM: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
pub const GEMMA: &str = "gemma-3-270m-q4_k_m.gguf";

/// The local model folder: `$MOA_MODELS` or `<repo>/models` (filled by `.ci/run`).
pub fn models_dir() -> PathBuf {
    std::env::var_os("MOA_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("models"))
}

/// The path of a real model, or `None` after printing why the test skips.
pub fn model(name: &str) -> Option<PathBuf> {
    let p = models_dir().join(name);
    if p.is_file() {
        Some(p)
    } else {
        println!(
            "SKIP: model {} not found (run .ci/run or see README to fetch it)",
            p.display()
        );
        None
    }
}

/// True when `python3` can import gguf and numpy; otherwise prints why the test skips.
pub fn python_gguf() -> bool {
    let ok = Command::new("python3")
        .args(["-c", "import gguf, numpy"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        println!("SKIP: python3 with the gguf package is not available (pip install gguf)");
    }
    ok
}

pub fn py_script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/py")
        .join(name)
}

/// Runs a reference script; panics with its output when it fails. Returns stdout.
pub fn run_py(script: &str, args: &[&str]) -> String {
    let out = Command::new("python3")
        .arg(py_script(script))
        .args(args)
        .output()
        .expect("run python3");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{script} {args:?} failed:\n{stdout}\n{stderr}"
    );
    stdout
}

/// Logits for every position of `toks`: the first `prompt` tokens in batches of `chunk`, then
/// one token per step (prefill across chunk borders and decode across ring wrap-around).
pub fn logits_all(
    be: &mut dyn moa::backend::Backend,
    toks: &[u32],
    prompt: usize,
    chunk: usize,
) -> Vec<Vec<f32>> {
    let nv = be.n_vocab();
    let mut out = Vec::new();
    let mut b = moa::graph::BatchBuf::default();
    let mut i = 0;
    while i < toks.len() {
        let n = if i < prompt { chunk.min(prompt - i) } else { 1 };
        b.clear();
        for (p, &t) in toks.iter().enumerate().skip(i).take(n) {
            b.push(t, p as u32, 0, true);
        }
        be.forward(&b.as_batch()).unwrap();
        out.extend(be.logits().chunks(nv).map(|r| r.to_vec()));
        i += n;
    }
    out
}

/// Runs a binary: (success, stdout, stderr).
pub fn run_bin(bin: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(bin).args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

/// Whether the environment variable `var` is `1` (`MOA_REQUIRE_GPU`, `MOA_REQUIRE_NVRTC`: turn
/// a skip into a failure on machines that must have the thing).
pub fn require(var: &str) -> bool {
    std::env::var(var).is_ok_and(|v| v == "1")
}

/// Whether a GPU test can run here; prints why it skips otherwise (a failure with
/// `MOA_REQUIRE_GPU=1`).
pub fn gpu_or_skip(test: &str) -> bool {
    match moa::backend::cuda::probe() {
        Ok(()) => true,
        Err(e) if require("MOA_REQUIRE_GPU") => panic!("MOA_REQUIRE_GPU=1 but no GPU: {e}"),
        Err(e) => {
            eprintln!("skipping {test}: no usable GPU ({e})");
            false
        }
    }
}
