//! moa-inspect as a user runs it: text and JSON output, tensor extraction, and clear errors
//! (non-zero exit, message naming the problem) for bad files and bad arguments.

use std::process::Command;

use moa::formats::GgmlType;
use moa::gguf::{GgufBuilder, TensorData, Value, ValueType};

fn inspect(args: &[&std::ffi::OsStr]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_moa-inspect"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

fn tiny(dir: &std::path::Path) -> std::path::PathBuf {
    let mut b = GgufBuilder::new();
    b.set("general.architecture", Value::string("llama"));
    b.set(
        "tokens",
        Value::Array(
            ValueType::String,
            (0..20).map(|i| Value::string(format!("tok{i}"))).collect(),
        ),
    );
    let vals: Vec<u8> = (0..64)
        .flat_map(|i| (i as f32 * 0.5).to_le_bytes())
        .collect();
    b.add_tensor("w", GgmlType::F32, &[32, 2], TensorData::Owned(vals))
        .unwrap();
    b.add_tensor(
        "iq",
        GgmlType::IQ2_XXS,
        &[256],
        TensorData::Owned(vec![0; 66]),
    )
    .unwrap();
    let p = dir.join("tiny.gguf");
    b.write_atomic(&p).unwrap();
    p
}

#[test]
fn text_json_and_tensor_extraction() {
    let dir = tempfile::tempdir().unwrap();
    let p = tiny(dir.path());
    let (ok, text, _) = inspect(&[p.as_os_str()]);
    assert!(ok);
    assert!(text.contains("general.architecture = \"llama\""), "{text}");
    assert!(text.contains("\"tok7\", ... (12 more)]"), "{text}");
    assert!(text.contains("IQ2_XXS"), "{text}");

    let (ok, json, _) = inspect(&[p.as_os_str(), "--json".as_ref()]);
    assert!(ok);
    let j: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(j["metadata"][1]["len"], 20);
    assert_eq!(j["metadata"][1]["value"].as_array().unwrap().len(), 8);
    assert_eq!(j["metadata"][1]["truncated"], true);
    assert_eq!(j["tensors"][0]["shape"], serde_json::json!([32, 2]));
    let (_, json, _) = inspect(&[p.as_os_str(), "--json".as_ref(), "--full".as_ref()]);
    let j: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(j["metadata"][1]["value"].as_array().unwrap().len(), 20);

    let out = dir.path().join("w.f32");
    let (ok, _, err) = inspect(&[
        p.as_os_str(),
        "--tensor".as_ref(),
        "w".as_ref(),
        "--out".as_ref(),
        out.as_os_str(),
    ]);
    assert!(ok, "{err}");
    let bytes = std::fs::read(&out).unwrap();
    let vals: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(vals.len(), 64);
    assert_eq!(vals[33], 16.5);
}

#[test]
fn errors_name_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let p = tiny(dir.path());
    let out = dir.path().join("x.f32");
    let (ok, _, err) = inspect(&[
        p.as_os_str(),
        "--tensor".as_ref(),
        "nope".as_ref(),
        "--out".as_ref(),
        out.as_os_str(),
    ]);
    assert!(!ok);
    assert!(err.contains("no tensor named \"nope\""), "{err}");
    let (ok, _, err) = inspect(&[
        p.as_os_str(),
        "--tensor".as_ref(),
        "iq".as_ref(),
        "--out".as_ref(),
        out.as_os_str(),
    ]);
    assert!(!ok);
    assert!(
        err.contains("IQ2_XXS") && err.contains("cannot dequantize"),
        "{err}"
    );
    assert!(!out.exists());

    let bad = dir.path().join("bad.gguf");
    let mut bytes = std::fs::read(&p).unwrap();
    bytes.truncate(bytes.len() - 40); // past the 30 padding bytes after the last tensor
    std::fs::write(&bad, &bytes).unwrap();
    let (ok, _, err) = inspect(&[bad.as_os_str()]);
    assert!(!ok);
    assert!(
        err.contains("bad.gguf") && err.contains("tensor \"iq\""),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");

    let (ok, _, err) = inspect(&["/no/such/file.gguf".as_ref()]);
    assert!(!ok);
    assert!(err.contains("/no/such/file.gguf"), "{err}");
}
