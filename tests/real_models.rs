//! The real models (SmolLM2-135M Q4_1, Gemma 3 270M Q4_K_M) read by moa agree with gguf-py:
//! every key, value, tensor name, type, shape and offset, and every tensor's dequantized values.

mod common;
use common::*;

fn check(model_name: &str, what: &str) {
    let Some(path) = model(model_name) else {
        return;
    };
    if !python_gguf() {
        return;
    }
    let out = run_py(
        "gguf_ref.py",
        &[
            what,
            path.to_str().unwrap(),
            "--bin",
            env!("CARGO_BIN_EXE_moa-inspect"),
        ],
    );
    print!("{out}");
}

#[test]
fn smollm_header_matches_gguf_py() {
    check(SMOLLM, "check-inspect");
}

#[test]
fn gemma_header_matches_gguf_py() {
    check(GEMMA, "check-inspect");
}

#[test]
fn smollm_tensors_match_gguf_py() {
    check(SMOLLM, "check-tensors");
}

#[test]
fn gemma_tensors_match_gguf_py() {
    check(GEMMA, "check-tensors");
}
