//! moa-run and moa-perplexity end to end on a tiny random model written by our own writer (no
//! download): generation with --json output, greedy determinism, chat errors, prompt longer than
//! the context, perplexity output format.

mod common;

use std::process::Command;

use moa::formats::GgmlType;
use moa::model::synth::{write_synthetic, SynthSpec};

fn tiny(dir: &std::path::Path) -> std::path::PathBuf {
    let p = dir.join("tiny.gguf");
    write_synthetic(&SynthSpec::tiny(GgmlType::Q8_0, 9), &p).unwrap();
    p
}

use common::run_bin as run;

#[test]
fn moa_run_generates_deterministically_with_json() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny(dir.path());
    let args = [
        "-m",
        m.to_str().unwrap(),
        "-p",
        "the rain in spain",
        "-n",
        "12",
        "--temp",
        "0",
        "-t",
        "2",
        "--json",
    ];
    let (ok, out, err) = run(env!("CARGO_BIN_EXE_moa-run"), &args);
    assert!(ok, "{err}");
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    let gen = j["generated_ids"].as_array().unwrap();
    assert!(!gen.is_empty() && gen.len() <= 12, "{j}");
    assert!(j["prompt_ids"].as_array().unwrap().len() > 3);
    assert!(j["kv_bytes"].as_u64().unwrap() > 0);
    assert_eq!(
        j["timings"]["gen_tokens"].as_u64().unwrap() as usize + 1,
        gen.len() + usize::from(!j["stopped_on_eog"].as_bool().unwrap())
    );
    // Greedy decoding is deterministic, and sampling with a seed too.
    let (_, out2, _) = run(env!("CARGO_BIN_EXE_moa-run"), &args);
    let j2: serde_json::Value = serde_json::from_str(&out2).unwrap();
    assert_eq!(j["generated_ids"], j2["generated_ids"]);
    let seeded = [
        "-m",
        m.to_str().unwrap(),
        "-p",
        "abc",
        "-n",
        "10",
        "--temp",
        "1.0",
        "--seed",
        "42",
        "--json",
    ];
    let a: serde_json::Value =
        serde_json::from_str(&run(env!("CARGO_BIN_EXE_moa-run"), &seeded).1).unwrap();
    let b: serde_json::Value =
        serde_json::from_str(&run(env!("CARGO_BIN_EXE_moa-run"), &seeded).1).unwrap();
    assert_eq!(a["generated_ids"], b["generated_ids"]);

    // Text mode streams the prompt and the continuation, timings on stderr.
    let (ok, out, err) = run(
        env!("CARGO_BIN_EXE_moa-run"),
        &[
            "-m",
            m.to_str().unwrap(),
            "-p",
            "hello",
            "-n",
            "4",
            "--temp",
            "0",
        ],
    );
    assert!(ok, "{err}");
    assert!(out.starts_with("hello"), "{out}");
    assert!(
        err.contains("tokens per second") && err.contains("KV cache"),
        "{err}"
    );
}

#[test]
fn moa_run_errors_are_clear() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny(dir.path());
    let long = "word ".repeat(400);
    let (ok, _, err) = run(
        env!("CARGO_BIN_EXE_moa-run"),
        &[
            "-m",
            m.to_str().unwrap(),
            "-p",
            &long,
            "-c",
            "64",
            "-n",
            "4",
        ],
    );
    assert!(!ok);
    assert!(err.contains("the context holds 64"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let (ok, _, err) = run(
        env!("CARGO_BIN_EXE_moa-run"),
        &["-m", m.to_str().unwrap(), "-p", "x", "--chat"],
    );
    assert!(!ok);
    assert!(err.contains("no chat template"), "{err}");
    let (ok, _, err) = run(
        env!("CARGO_BIN_EXE_moa-run"),
        &["-m", "/no/such.gguf", "-p", "x"],
    );
    assert!(!ok);
    assert!(err.contains("/no/such.gguf"), "{err}");
    let (ok, _, err) = run(env!("CARGO_BIN_EXE_moa-run"), &["-m", m.to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("-p TEXT or -f FILE"), "{err}");
}

#[test]
fn moa_perplexity_prints_llama_style_estimates() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny(dir.path());
    let text = dir.path().join("t.txt");
    std::fs::write(
        &text,
        "the quick brown fox jumps over the lazy dog. ".repeat(40),
    )
    .unwrap();
    let (ok, out, err) = run(
        env!("CARGO_BIN_EXE_moa-perplexity"),
        &[
            "-m",
            m.to_str().unwrap(),
            "-f",
            text.to_str().unwrap(),
            "-c",
            "64",
            "--chunks",
            "3",
        ],
    );
    assert!(ok, "{err}");
    assert!(
        out.contains("[1]") && out.contains("[3]") && !out.contains("[4]"),
        "{out}"
    );
    assert!(out.contains("Final estimate: PPL = "), "{out}");
    let (ok, out, _) = run(
        env!("CARGO_BIN_EXE_moa-perplexity"),
        &[
            "-m",
            m.to_str().unwrap(),
            "-f",
            text.to_str().unwrap(),
            "-c",
            "64",
            "--json",
        ],
    );
    assert!(ok);
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    let ppl = j["ppl"].as_f64().unwrap();
    // A random model is close to uniform over its 300 tokens, never better than perfect.
    assert!(ppl > 1.0 && ppl.is_finite(), "{ppl}");
    let (ok, _, err) = run(
        env!("CARGO_BIN_EXE_moa-perplexity"),
        &[
            "-m",
            m.to_str().unwrap(),
            "-f",
            text.to_str().unwrap(),
            "-c",
            "1024",
        ],
    );
    assert!(!ok);
    assert!(err.contains("need at least 2048 tokens"), "{err}");
}

#[test]
fn moa_run_chat_mode_answers_each_turn() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("chat.gguf");
    let mut spec = SynthSpec::tiny(GgmlType::Q8_0, 10);
    spec.chat_template = Some(
        "{% for m in messages %}<|bos|>{{ m['role'] }}: {{ m['content'] }}<|eos|>{% endfor %}{% if add_generation_prompt %}<|bos|>assistant: {% endif %}".into(),
    );
    write_synthetic(&spec, &p).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_moa-run"))
        .args([
            "-m",
            p.to_str().unwrap(),
            "-cnv",
            "--system",
            "be brief",
            "--temp",
            "0",
            "-n",
            "5",
            "-c",
            "256",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"hello there\nsecond turn\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("chat mode"), "{err}");
    // Two turns were answered: two prompts printed after the banner, then the final one at EOF.
    assert_eq!(err.matches("\n> ").count(), 3, "{err}");
    assert!(err.contains("eval time"), "{err}");
}
