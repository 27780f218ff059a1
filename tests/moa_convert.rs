//! moa-convert end to end: plans embedded into GGUF files read back exactly (our reader and
//! gguf-py) with every tensor byte unchanged; re-embedding replaces, strip removes; the reference
//! implementation's per-query-head JSON imports onto Llama-3.2-1B's attention shape with the
//! density a hand computation gives; malformed plans are errors naming the field and leave no
//! output; llama.cpp still runs a converted model to the same greedy output.

mod common;
use common::*;

use std::path::{Path, PathBuf};
use std::process::Command;

use moa::formats::GgmlType;
use moa::gguf::{GgufBuilder, GgufFile, Value, ValueType};
use moa::moa::{Plan, Rule, MOA_KEYS};
use moa::model::synth::{write_synthetic, SynthSpec};
use serde_json::Value as Json;
use sha2::{Digest, Sha256};

const BIN: &str = env!("CARGO_BIN_EXE_moa-convert");

fn sha256(b: &[u8]) -> String {
    Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

fn convert(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(BIN).args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn tiny(dir: &Path) -> PathBuf {
    let p = dir.join("tiny.gguf");
    write_synthetic(&SynthSpec::tiny(GgmlType::Q8_0, 3), &p).unwrap();
    p
}

/// Tensor names and the SHA-256 of their bytes, read by our reader.
fn tensor_hashes(path: &Path) -> Vec<(String, String)> {
    let f = GgufFile::open(path).unwrap();
    f.tensors
        .iter()
        .map(|t| (t.name.clone(), sha256(f.tensor_data(t))))
        .collect()
}

fn file_hash(path: &Path) -> String {
    sha256(&std::fs::read(path).unwrap())
}

fn py_dump(path: &Path) -> Json {
    serde_json::from_str(&run_py("gguf_ref.py", &["dump", s(path)])).unwrap()
}

/// A plan with values that are not round in decimal, to check f32 bits survive.
fn odd_plan(n_layer: usize, n_head_kv: usize) -> Plan {
    let rules = (0..n_layer * n_head_kv)
        .map(|i| Rule {
            alpha: [0.1f32, -1024.0, 333.3, 2048.0, -0.0][i % 5],
            beta: [1.0f32 / 3.0, 0.875, 0.0, 1.0, 0.1][(i / 2) % 5],
        })
        .collect();
    let mut p = Plan::new(n_layer, n_head_kv, rules, "test \"plan\"");
    p.density = Some(0.37);
    p.lengths = vec![2048, 4096, 8192];
    p.note = "calibration: none ✓".into();
    p
}

/// Checks the file's `moa.*` keys equal the plan's (our reader, f32 bit-exact), that the
/// non-`moa.*` metadata equals `orig`'s in order, and tensor bytes equal `orig`'s; with gguf-py
/// too when it is installed.
fn check_embedded(path: &Path, orig: &Path, plan: &Plan) {
    let f = GgufFile::open(path).unwrap();
    let o = GgufFile::open(orig).unwrap();
    let expect = plan.to_metadata();
    let moa_keys: Vec<&(String, Value)> = f
        .metadata
        .iter()
        .filter(|(k, _)| k.starts_with("moa."))
        .collect();
    assert_eq!(
        moa_keys.len(),
        expect.len(),
        "no duplicate or stale moa.* keys"
    );
    for (k, v) in &expect {
        assert!(MOA_KEYS.contains(&k.as_str()));
        let got = f.get(k).unwrap_or_else(|| panic!("{k} missing"));
        assert_eq!(got.type_description(), v.type_description(), "{k}");
        assert_eq!(format!("{got:?}"), format!("{v:?}"), "{k}");
        if let (Value::Array(_, a), Value::Array(_, b)) = (got, v) {
            for (x, y) in a.iter().zip(b) {
                if let (Value::F32(x), Value::F32(y)) = (x, y) {
                    assert_eq!(x.to_bits(), y.to_bits(), "{k}");
                }
            }
        }
    }
    assert_eq!(Plan::from_gguf(&f).unwrap().as_ref(), Some(plan));
    let rest: Vec<_> = f
        .metadata
        .iter()
        .filter(|(k, _)| !k.starts_with("moa."))
        .collect();
    let orig_rest: Vec<_> = o
        .metadata
        .iter()
        .filter(|(k, _)| !k.starts_with("moa."))
        .collect();
    assert_eq!(rest, orig_rest);
    assert_eq!(tensor_hashes(path), tensor_hashes(orig));
    assert_eq!(f.alignment, o.alignment);

    if python_gguf() {
        let d = py_dump(path);
        let meta = d["metadata"].as_array().unwrap();
        let mut keys: Vec<&str> = meta.iter().map(|m| m["key"].as_str().unwrap()).collect();
        let n = keys.len();
        keys.sort_unstable();
        keys.dedup();
        assert_eq!(keys.len(), n, "gguf-py sees duplicate keys");
        for (k, v) in &expect {
            let m = meta
                .iter()
                .find(|m| m["key"] == k.as_str())
                .unwrap_or_else(|| panic!("gguf-py: {k} missing"));
            assert_eq!(m["type"], v.value_type().name(), "{k}");
            let (ours, theirs) = (moa::inspect::value_to_json(v, None), &m["value"]);
            match v {
                Value::F32(x) => assert_eq!(
                    (theirs.as_f64().unwrap() as f32).to_bits(),
                    x.to_bits(),
                    "{k}"
                ),
                Value::Array(t, items) => {
                    assert_eq!(m["element_type"], t.name(), "{k}");
                    let theirs = theirs.as_array().unwrap();
                    assert_eq!(theirs.len(), items.len(), "{k}");
                    for (a, b) in theirs.iter().zip(items) {
                        match b {
                            Value::F32(x) => assert_eq!(
                                (a.as_f64().unwrap() as f32).to_bits(),
                                x.to_bits(),
                                "{k}"
                            ),
                            Value::U32(x) => assert_eq!(a.as_u64(), Some(*x as u64), "{k}"),
                            _ => unreachable!(),
                        }
                    }
                }
                _ => assert_eq!(theirs, &ours, "{k}"),
            }
        }
        let tensors = d["tensors"].as_array().unwrap();
        let orig_hashes = tensor_hashes(orig);
        assert_eq!(tensors.len(), orig_hashes.len());
        for (t, (name, hash)) in tensors.iter().zip(&orig_hashes) {
            assert_eq!(t["name"], name.as_str());
            assert_eq!(t["sha256"], hash.as_str(), "gguf-py: tensor {name} changed");
        }
    }
}

#[test]
fn embed_reembed_strip_export_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny(dir.path());
    let before = file_hash(&model);
    let plan = odd_plan(2, 2);
    let plan_path = dir.path().join("plan.json");
    plan.save_json(&plan_path, true).unwrap();

    let out = dir.path().join("out.gguf");
    let (ok, stdout, stderr) = convert(&[
        "embed",
        "-m",
        s(&model),
        "--plan",
        s(&plan_path),
        "-o",
        s(&out),
    ]);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("density") && stdout.contains("wrote"),
        "{stdout}"
    );
    check_embedded(&out, &model, &plan);
    assert_eq!(file_hash(&model), before, "the input must not change");

    // Re-embedding replaces the section (a plan without density: the key disappears).
    let mut plan2 = Plan::uniform(2, 2, 0.25);
    plan2.density = None;
    plan2.source = "second".into();
    let plan2_path = dir.path().join("plan2.json");
    plan2.save_json(&plan2_path, false).unwrap();
    let out2 = dir.path().join("out2.gguf");
    let (ok, _, stderr) = convert(&[
        "embed",
        "-m",
        s(&out),
        "--plan",
        s(&plan2_path),
        "-o",
        s(&out2),
    ]);
    assert!(ok, "{stderr}");
    assert!(stderr.contains("replacing the plan"), "{stderr}");
    check_embedded(&out2, &model, &plan2);
    assert!(GgufFile::open(&out2).unwrap().get("moa.density").is_none());

    // In place (output = input) works and is atomic.
    let inplace = dir.path().join("inplace.gguf");
    std::fs::copy(&out, &inplace).unwrap();
    let (ok, _, stderr) = convert(&[
        "embed",
        "-m",
        s(&inplace),
        "--plan",
        s(&plan2_path),
        "-o",
        s(&inplace),
    ]);
    assert!(ok, "{stderr}");
    check_embedded(&inplace, &model, &plan2);

    // Strip gives back the original metadata exactly.
    let stripped = dir.path().join("stripped.gguf");
    let (ok, stdout, stderr) = convert(&["strip", "-m", s(&out2), "-o", s(&stripped)]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("removed 10 moa.* keys"), "{stdout}");
    let f = GgufFile::open(&stripped).unwrap();
    assert!(f.metadata.iter().all(|(k, _)| !k.starts_with("moa.")));
    assert_eq!(f.metadata, GgufFile::open(&model).unwrap().metadata);
    assert_eq!(tensor_hashes(&stripped), tensor_hashes(&model));
    assert_eq!(Plan::from_gguf(&f).unwrap(), None);
    if python_gguf() {
        let d = py_dump(&stripped);
        assert!(d["metadata"]
            .as_array()
            .unwrap()
            .iter()
            .all(|m| !m["key"].as_str().unwrap().starts_with("moa.")));
    }

    // Export writes the embedded plan as our JSON.
    let exported = dir.path().join("exported.json");
    let (ok, _, stderr) = convert(&["export", "-m", s(&out), "-o", s(&exported)]);
    assert!(ok, "{stderr}");
    assert_eq!(Plan::load_json(&exported).unwrap(), plan);

    // Show: text, JSON and a PNG heatmap.
    let (ok, stdout, stderr) = convert(&["show", "-m", s(&out), "--lengths", "1024,4096"]);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("spans C_h at N = 4096") && stdout.contains("test \\\"plan\\\""),
        "{stdout}"
    );
    let png = dir.path().join("heat.png");
    let (ok, stdout, stderr) = convert(&[
        "show",
        "-m",
        s(&out),
        "--json",
        "--png",
        s(&png),
        "--length",
        "2048",
    ]);
    assert!(ok, "{stderr}");
    let j: Json = serde_json::from_str(&stdout).unwrap();
    assert_eq!(j["spans"]["n"], 2048);
    assert_eq!(j["n_kv_heads"], 2);
    let spans = plan.spans(2048);
    assert_eq!(j["spans"]["rows"][1][0], spans[2].min(2048));
    // head_dim 16: KV bytes = sum C_h * 16 * 2 * 2.
    let rows: usize = plan.spans(8192).iter().map(|&c| c.min(8192)).sum();
    let at8k = j["summary"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["n"] == 8192)
        .unwrap();
    assert_eq!(at8k["kv_bytes"], (rows * 16 * 4) as u64);
    assert_eq!(at8k["dense_kv_bytes"], (2 * 2 * 8192 * 16 * 4) as u64);
    assert_eq!(&std::fs::read(&png).unwrap()[1..4], b"PNG");

    // The uniform baseline.
    let uni = dir.path().join("uniform.gguf");
    let (ok, stdout, stderr) = convert(&[
        "uniform",
        "-m",
        s(&model),
        "--density",
        "0.5",
        "-o",
        s(&uni),
    ]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("0.5000"), "{stdout}");
    let p = Plan::from_gguf(&GgufFile::open(&uni).unwrap())
        .unwrap()
        .unwrap();
    assert_eq!(
        (p.source.as_str(), p.density, p.rules[3]),
        (
            "uniform",
            Some(0.5),
            Rule {
                alpha: 0.0,
                beta: 0.5
            }
        )
    );
    assert_eq!(tensor_hashes(&uni), tensor_hashes(&model));
    assert_eq!(file_hash(&model), before, "the input must not change");
}

/// The reference format for Llama-3.2-1B's attention: 16 layers, 32 query heads, 8 KV heads.
/// Layers 0-14: in each group of 4 query heads, members (0, 1/8), (1024, 1/8), then for even
/// groups (-1024, 7/8), (0, 1/2) and for odd groups (0, 1/2), (2048, 1/4). Layer 15: (0, 1).
fn llama32_reference(pretty: bool) -> String {
    let (mut alphas, mut betas) = (vec![], vec![]);
    for l in 0..16 {
        let (mut a, mut b) = (vec![], vec![]);
        for q in 0..32 {
            let (g, m) = (q / 4, q % 4);
            let (alpha, beta) = match (l == 15, m, g % 2 == 0) {
                (true, _, _) => (0.0, 1.0),
                (_, 0, _) => (0.0, 0.125),
                (_, 1, _) => (1024.0, 0.125),
                (_, 2, true) => (-1024.0, 0.875),
                (_, 3, true) => (0.0, 0.5),
                (_, 2, false) => (0.0, 0.5),
                _ => (2048.0, 0.25),
            };
            a.push(alpha);
            b.push(beta);
        }
        alphas.push(a);
        betas.push(b);
    }
    if pretty {
        // The reference's other style: indented, integer alphas.
        let ints: Vec<Vec<i64>> = alphas
            .iter()
            .map(|r: &Vec<f64>| r.iter().map(|&x| x as i64).collect())
            .collect();
        serde_json::to_string_pretty(&serde_json::json!({"alphas": ints, "betas": betas})).unwrap()
    } else {
        serde_json::json!({"alphas": alphas, "betas": betas}).to_string()
    }
}

fn llama32_shape(dir: &Path) -> PathBuf {
    let p = dir.join("llama32-1b-shape.gguf");
    let spec = SynthSpec {
        n_layer: 16,
        n_embd: 256,
        n_head: 32,
        n_head_kv: 8,
        n_ff: 64,
        n_vocab: 300,
        n_ctx: 8192,
        weight_type: GgmlType::Q8_0,
        embd_type: GgmlType::Q8_0,
        untied_output: false,
        rope_base: 500000.0,
        seed: 5,
        chat_template: None,
    };
    write_synthetic(&spec, &p).unwrap();
    p
}

#[test]
fn reference_json_imports_onto_llama32_1b_shape() {
    let dir = tempfile::tempdir().unwrap();
    let model = llama32_shape(dir.path());
    let lengths = [2048, 4096, 8192];
    let (plan, report) =
        Plan::from_reference_json(&llama32_reference(false), 16, 32, 8, &lengths).unwrap();
    let (plan_b, _) =
        Plan::from_reference_json(&llama32_reference(true), 16, 32, 8, &lengths).unwrap();
    assert_eq!(plan, plan_b);

    // Collapse: even groups keep (-1024, 7/8) (6144 at 8192, the widest); odd groups tie at 8192
    // between (0, 1/2) and (2048, 1/4) (4096 each), and 4096 decides: 2048 vs 3072.
    for l in 0..15 {
        for g in 0..8 {
            let expect = if g % 2 == 0 {
                Rule {
                    alpha: -1024.0,
                    beta: 0.875,
                }
            } else {
                Rule {
                    alpha: 2048.0,
                    beta: 0.25,
                }
            };
            assert_eq!(plan.rules[l * 8 + g], expect, "layer {l} group {g}");
        }
    }
    assert!(plan.rules[15 * 8..].iter().all(|r| *r
        == Rule {
            alpha: 0.0,
            beta: 1.0
        }));
    assert_eq!(plan.source, "reference-json");

    // Spans by hand (trunc, clamp to [128, N], round up to 64):
    //   rule        N=2048  4096  8192
    //   (0, 1/8)      256    512  1024
    //   (1024, 1/8)  1280   1536  2048
    //   (-1024, 7/8)  768   2560  6144
    //   (0, 1/2)     1024   2048  4096
    //   (2048, 1/4)  2048   3072  4096     (2560 at 2048 is capped at N)
    //   (0, 1)       2048   4096  8192
    // Per query head, N = 8192: a layer has 4 even groups (1024+2048+6144+4096 = 13312) and 4
    // odd (1024+2048+4096+4096 = 11264): 98304; layer 15: 32 * 8192.
    let before_8k = (15.0 * 98304.0 + 32.0 * 8192.0) / (16.0 * 32.0 * 8192.0);
    // After, per KV head: 4 * 6144 + 4 * 4096 = 40960 per layer; layer 15: 8 * 8192.
    let after_8k = (15.0 * 40960.0 + 8.0 * 8192.0) / (16.0 * 8.0 * 8192.0);
    // N = 2048: groups 256+1280+768+1024 = 3328 and 256+1280+1024+2048 = 4608; after 768 and 2048.
    let before_2k = (15.0 * 4.0 * (3328.0 + 4608.0) + 32.0 * 2048.0) / (16.0 * 32.0 * 2048.0);
    let after_2k = (15.0 * 4.0 * (768.0 + 2048.0) + 8.0 * 2048.0) / (16.0 * 8.0 * 2048.0);
    // N = 4096: 512+1536+2560+2048 = 6656 and 512+1536+2048+3072 = 7168; after 2560 and 3072.
    let before_4k = (15.0 * 4.0 * (6656.0 + 7168.0) + 32.0 * 4096.0) / (16.0 * 32.0 * 4096.0);
    let after_4k = (15.0 * 4.0 * (2560.0 + 3072.0) + 8.0 * 4096.0) / (16.0 * 8.0 * 4096.0);
    assert_eq!((before_8k, after_8k), (0.4140625, 0.6484375));
    assert_eq!(report.lengths, vec![2048, 4096, 8192]);
    assert_eq!(
        report.density_query_heads,
        vec![before_2k, before_4k, before_8k]
    );
    assert_eq!(report.density_kv_heads, vec![after_2k, after_4k, after_8k]);
    assert_eq!(report.groups_mixed, 15 * 8);
    // In even groups (1024, 1/8) and (0, 1/2) span 1280 and 1024 at 2048, more than the chosen
    // rule's 768: two narrowed heads in each of 4 even groups of 15 layers.
    assert_eq!(report.heads_narrowed, 15 * 4 * 2);
    assert_eq!((report.n_head, report.group), (32, 4));

    // The tool prints the same figures and embeds the same plan.
    let reference = dir.path().join("moa_alpha_beta.json");
    std::fs::write(&reference, llama32_reference(true)).unwrap();
    let out = dir.path().join("converted.gguf");
    let (ok, stdout, stderr) = convert(&[
        "embed",
        "-m",
        s(&model),
        "--reference-json",
        s(&reference),
        "-o",
        s(&out),
    ]);
    assert!(ok, "{stderr}");
    let line = format!("N =   8192: density per query head {before_8k:.4} -> per KV head after collapse {after_8k:.4}");
    assert!(stderr.contains(&line), "{stderr}\nexpected: {line}");
    assert!(
        stderr.contains("0.4141") && stderr.contains("0.6484"),
        "{stderr}"
    );
    assert!(stdout.contains(&format!("{after_2k:.4}")), "{stdout}");
    check_embedded(&out, &model, &plan);

    // KV bytes at 8192 (head_dim 256 / 32 = 8): rows * 8 * 2 * 2.
    let (ok, stdout, stderr) = convert(&["show", "-m", s(&out), "--json"]);
    assert!(ok, "{stderr}");
    let j: Json = serde_json::from_str(&stdout).unwrap();
    let at8k = j["summary"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["n"] == 8192)
        .unwrap()
        .clone();
    assert_eq!(at8k["kv_bytes"], (15 * 40960 + 8 * 8192) * 8 * 4);
    assert_eq!(at8k["dense_kv_bytes"], 16 * 8 * 8192 * 8 * 4);
    assert_eq!(at8k["density"], after_8k);
}

/// Runs `args`, expects failure with `needle` in the message, and no file at `out` (nor any
/// temporary file: the folder holds exactly `keep` entries).
fn expect_error(dir: &Path, args: &[&str], out: &Path, needle: &str, keep: usize) {
    let (ok, stdout, stderr) = convert(args);
    assert!(!ok, "{args:?} succeeded: {stdout}");
    assert!(stderr.starts_with("moa-convert: error: "), "{stderr}");
    assert!(
        stderr.contains(needle),
        "{args:?}: expected {needle:?} in: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!out.exists(), "{args:?} left {}", out.display());
    let entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        entries.len(),
        keep,
        "{args:?}: unexpected files {entries:?}"
    );
}

#[test]
fn malformed_plans_are_errors_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny(dir.path());
    let out = dir.path().join("out.gguf");
    let good = odd_plan(2, 2).to_json_string();
    let doc: Json = serde_json::from_str(&good).unwrap();
    let edit = |f: &dyn Fn(&mut Json)| {
        let mut d = doc.clone();
        f(&mut d);
        d.to_string()
    };
    let cases: Vec<(String, &str)> = vec![
        (
            edit(&|d| {
                d["rules"].as_array_mut().unwrap().pop();
            }),
            "rules: has 1 layers, n_layer is 2",
        ),
        (
            edit(&|d| {
                d["rules"][1].as_array_mut().unwrap().pop();
            }),
            "rules[1]: has 1 rules, n_kv_heads is 2",
        ),
        (
            edit(&|d| {
                d["n_layer"] = 3.into();
                let r = d["rules"][0].clone();
                d["rules"].as_array_mut().unwrap().push(r);
            }),
            "the plan is for 3 layers x 2 KV heads",
        ),
        (
            good.replacen("\"alpha\": 333.3", "\"alpha\": NaN", 1),
            "rules[1][0].alpha",
        ),
        (
            edit(&|d| d["rules"][0][1]["beta"] = 1.5.into()),
            "rules[0][1].beta: layer 0 head 1: beta = 1.5 is outside [0, 1]",
        ),
        (
            edit(&|d| d["rules"][0][1]["beta"] = (-0.5).into()),
            "rules[0][1].beta",
        ),
        (
            edit(&|d| d["granularity"] = "q_head".into()),
            "granularity: \"q_head\"",
        ),
        (
            edit(&|d| d["granularity"] = "layer".into()),
            "granularity: unknown granularity \"layer\"",
        ),
        (
            edit(&|d| d["span_align"] = 48.into()),
            "span_align = 48: must be a power of two",
        ),
        (
            edit(&|d| d["version"] = 7.into()),
            "version: unsupported version 7",
        ),
        (
            edit(&|d| d["rules"][0][0]["alpha"] = "wide".into()),
            "rules[0][0].alpha: expected a number",
        ),
        ("{\"version\": 1, \"rules\": [".into(), "invalid JSON"),
    ];
    let plan_path = dir.path().join("plan.json");
    for (text, needle) in &cases {
        std::fs::write(&plan_path, text).unwrap();
        let args = [
            "embed",
            "-m",
            s(&model),
            "--plan",
            s(&plan_path),
            "-o",
            s(&out),
        ];
        expect_error(dir.path(), &args, &out, needle, 2);
        // The same message names the file.
        let (_, _, stderr) = convert(&args);
        assert!(stderr.contains("plan.json"), "{stderr}");
    }
    std::fs::remove_file(&plan_path).unwrap();

    let missing = dir.path().join("missing.json");
    expect_error(
        dir.path(),
        &[
            "embed",
            "-m",
            s(&model),
            "--plan",
            s(&missing),
            "-o",
            s(&out),
        ],
        &out,
        "missing.json: No such file",
        1,
    );
    let no_model = dir.path().join("missing.gguf");
    std::fs::write(&plan_path, &good).unwrap();
    expect_error(
        dir.path(),
        &[
            "embed",
            "-m",
            s(&no_model),
            "--plan",
            s(&plan_path),
            "-o",
            s(&out),
        ],
        &out,
        "missing.gguf",
        2,
    );
    // Reference format: 4 query heads per layer expected, 3 given.
    std::fs::write(
        &plan_path,
        r#"{"alphas": [[0, 0, 0], [0, 0, 0]], "betas": [[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]]}"#,
    )
    .unwrap();
    expect_error(
        dir.path(),
        &[
            "embed",
            "-m",
            s(&model),
            "--reference-json",
            s(&plan_path),
            "-o",
            s(&out),
        ],
        &out,
        "alphas[0]: has 3 heads",
        2,
    );
    std::fs::write(&plan_path, r#"{"alphas": [[0, 0, 0, 0], [0, 0, 0, 0]], "betas": [[0.5, 0.5, 0.5, 0.5], [0.5, 2, 0.5, 0.5]]}"#).unwrap();
    expect_error(
        dir.path(),
        &[
            "embed",
            "-m",
            s(&model),
            "--reference-json",
            s(&plan_path),
            "-o",
            s(&out),
        ],
        &out,
        "betas[1][1]",
        2,
    );
    expect_error(
        dir.path(),
        &[
            "uniform",
            "-m",
            s(&model),
            "--density",
            "1.5",
            "-o",
            s(&out),
        ],
        &out,
        "--density 1.5",
        2,
    );
    // An output folder that does not exist: an error, nothing written.
    let deep = dir.path().join("no/such/dir/out.gguf");
    expect_error(
        dir.path(),
        &[
            "uniform",
            "-m",
            s(&model),
            "--density",
            "0.5",
            "-o",
            s(&deep),
        ],
        &deep,
        "no/such/dir/out.gguf",
        2,
    );
}

#[test]
fn malformed_gguf_sections_are_errors_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny(dir.path());
    let file = GgufFile::open(&model).unwrap();
    let bad = dir.path().join("bad.gguf");
    let f32s = |v: &[f32]| Value::Array(ValueType::F32, v.iter().map(|&x| Value::F32(x)).collect());
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "moa.alpha",
            f32s(&[0.0; 3]),
            "moa.alpha: has 3 values, the model needs 4 (2 layers x 2 KV heads)",
        ),
        (
            "moa.beta",
            f32s(&[0.5, 0.5, 1.5, 0.5]),
            "moa.beta: layer 1 head 0: beta = 1.5 is outside [0, 1]",
        ),
        (
            "moa.alpha",
            f32s(&[0.0, f32::NAN, 0.0, 0.0]),
            "moa.alpha: layer 0 head 1: alpha = NaN is not finite",
        ),
        (
            "moa.granularity",
            Value::string("q_head"),
            "moa.granularity: \"q_head\"",
        ),
        (
            "moa.granularity",
            Value::string("block"),
            "moa.granularity: unknown granularity \"block\"",
        ),
        (
            "moa.version",
            Value::U32(2),
            "moa.version: unsupported version 2",
        ),
        (
            "moa.span_align",
            Value::U32(96),
            "moa.span_align = 96: must be a power of two",
        ),
        (
            "moa.min_span",
            Value::string("128"),
            "moa.min_span: expected an unsigned integer",
        ),
    ];
    for (key, value, needle) in cases {
        let mut b = GgufBuilder::from_file(&file);
        odd_plan(2, 2).embed_into(&mut b);
        b.set(key, value);
        b.write_atomic(&bad).unwrap();
        let e = Plan::from_gguf(&GgufFile::open(&bad).unwrap())
            .unwrap_err()
            .to_string();
        assert!(e.contains(needle), "{e}\nexpected: {needle}");
        let json = dir.path().join("x.json");
        for args in [
            vec!["show", "-m", s(&bad)],
            vec!["export", "-m", s(&bad), "-o", s(&json)],
        ] {
            let (ok, _, stderr) = convert(&args);
            assert!(!ok && stderr.contains(needle), "{args:?}: {stderr}");
            assert!(!json.exists());
        }
        // Embedding over a broken section replaces it.
        let fixed = dir.path().join("fixed.gguf");
        let (ok, _, stderr) = convert(&[
            "uniform",
            "-m",
            s(&bad),
            "--density",
            "0.5",
            "-o",
            s(&fixed),
        ]);
        assert!(ok, "{stderr}");
        assert!(
            stderr.contains("replacing an invalid moa.* section"),
            "{stderr}"
        );
        assert!(Plan::from_gguf(&GgufFile::open(&fixed).unwrap())
            .unwrap()
            .is_some());
    }
    // A section without moa.version is an error, not "no plan".
    let mut b = GgufBuilder::from_file(&file);
    b.set("moa.alpha", f32s(&[0.0; 4]));
    b.write_atomic(&bad).unwrap();
    let e = Plan::from_gguf(&GgufFile::open(&bad).unwrap())
        .unwrap_err()
        .to_string();
    assert!(e.contains("moa.version: missing"), "{e}");
}

#[test]
fn real_model_round_trip() {
    let Some(src) = model(SMOLLM) else { return };
    let dir = tempfile::tempdir().unwrap();
    let f = GgufFile::open(&src).unwrap();
    let cfg = moa::model::ModelConfig::from_gguf(&f).unwrap();
    let plan = odd_plan(cfg.n_layer, cfg.n_head_kv);
    let plan_path = dir.path().join("plan.json");
    plan.save_json(&plan_path, true).unwrap();
    let before = std::fs::metadata(&src).unwrap().modified().unwrap();
    let out = dir.path().join("smollm-moa.gguf");
    let (ok, stdout, stderr) = convert(&[
        "embed",
        "-m",
        s(&src),
        "--plan",
        s(&plan_path),
        "-o",
        s(&out),
    ]);
    assert!(ok, "{stderr}");
    println!("{stdout}");
    check_embedded(&out, &src, &plan);
    assert_eq!(std::fs::metadata(&src).unwrap().modified().unwrap(), before);
}

/// llama.cpp (when built locally by tests/fixtures/llamacpp/make_refs.sh) loads the converted
/// default model and generates the same greedy text as from the original.
#[test]
fn llama_cpp_runs_converted_model_identically() {
    let Some(src) = model(SMOLLM) else { return };
    let bin_dir =
        std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/moa/llama.cpp/bin"));
    let Some(bin_dir) = bin_dir else {
        println!("SKIP: HOME is not set");
        return;
    };
    let prompt = "The capital of France is";
    let (exe, args): (PathBuf, Vec<&str>) = if bin_dir.join("llama-completion").is_file() {
        (
            bin_dir.join("llama-completion"),
            vec![
                "-p", prompt, "-n", "16", "--temp", "0", "-no-cnv", "-t", "2", "--seed", "1",
            ],
        )
    } else if bin_dir.join("llama-simple").is_file() {
        (bin_dir.join("llama-simple"), vec!["-n", "16", prompt])
    } else {
        println!(
            "SKIP: llama.cpp binaries not found in {} (see tests/fixtures/llamacpp/make_refs.sh)",
            bin_dir.display()
        );
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("converted.gguf");
    let f = GgufFile::open(&src).unwrap();
    let cfg = moa::model::ModelConfig::from_gguf(&f).unwrap();
    let plan_path = dir.path().join("plan.json");
    odd_plan(cfg.n_layer, cfg.n_head_kv)
        .save_json(&plan_path, true)
        .unwrap();
    let (ok, _, stderr) = convert(&[
        "embed",
        "-m",
        s(&src),
        "--plan",
        s(&plan_path),
        "-o",
        s(&out),
    ]);
    assert!(ok, "{stderr}");
    let run = |m: &Path| {
        let o = Command::new(&exe)
            .arg("-m")
            .arg(m)
            .args(&args)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{} failed on {}: {}",
            exe.display(),
            m.display(),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let (a, b) = (run(&src), run(&out));
    println!("llama.cpp on the original: {a:?}");
    assert!(a.contains(prompt), "{a}");
    assert_eq!(a, b, "llama.cpp output differs on the converted model");
}
