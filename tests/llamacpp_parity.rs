//! The default model on the CPU backend against llama.cpp's own outputs (fixtures made once by
//! tests/fixtures/llamacpp/make_refs.sh; CI never builds llama.cpp): teacher-forced top-1
//! agreement over a 548-token text, logits of the top candidates, and greedy continuations.

mod common;
use common::*;

use moa::backend::Backend;
use moa::generate::Session;
use serde_json::Value;

fn fixture(name: &str) -> Value {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llamacpp").join(name);
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn argmax(x: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best as u32
}

#[test]
fn teacher_forced_top1_agrees_with_llama_cpp() {
    let Some(path) = model(SMOLLM) else { return };
    let f = fixture("teacher_forced_smollm.json");
    let toks = ids(&f["ids"]);
    let loaded = moa::runtime::load(&path).unwrap();
    let mut be = moa::runtime::cpu_backend(&loaded.model, 1024, 1, 1024, 2).unwrap();
    let mut b = moa::graph::BatchBuf::default();
    for (p, &t) in toks.iter().enumerate() {
        b.push(t, p as u32, 0, true);
    }
    be.forward(&b.as_batch()).unwrap();
    let nv = be.n_vocab();
    let logits = be.logits();
    let (mut agree, mut worst) = (0, 0f32);
    for (p, (top_ids, top_logits)) in f["top5_ids"].as_array().unwrap().iter().zip(f["top5_logits"].as_array().unwrap()).enumerate() {
        let row = &logits[p * nv..(p + 1) * nv];
        let want = ids(top_ids);
        if argmax(row) == want[0] {
            agree += 1;
        }
        for (&id, l) in want.iter().zip(top_logits.as_array().unwrap()) {
            worst = worst.max((row[id as usize] - l.as_f64().unwrap() as f32).abs());
        }
    }
    let n = toks.len();
    let rate = agree as f64 / n as f64;
    println!("teacher-forced top-1 agreement with llama.cpp: {agree}/{n} = {:.2}%; max |logit diff| on llama.cpp's top-5: {worst:.4}", rate * 100.0);
    assert!(rate >= 0.99, "top-1 agreement {rate:.4} below 0.99");
    assert!(worst < 0.5, "logits differ by {worst}");
}

#[test]
fn greedy_continuations_agree_with_llama_cpp() {
    let Some(path) = model(SMOLLM) else { return };
    let f = fixture("greedy_smollm.json");
    let loaded = moa::runtime::load(&path).unwrap();
    let mut be = moa::runtime::cpu_backend(&loaded.model, 512, 1, 512, 2).unwrap();
    let cases = f["cases"].as_array().unwrap();
    let mut full16 = 0;
    for (i, c) in cases.iter().enumerate() {
        let prompt = ids(&c["prompt_ids"]);
        let want = ids(&c["generated_ids"]);
        // The tokenizer must give llama.cpp's prompt ids, too.
        let ours = loaded.tokenizer.encode(c["prompt"].as_str().unwrap(), true, true).unwrap();
        assert_eq!(ours, prompt, "case {i}: prompt tokenization differs");
        be.clear(0);
        let mut s = Session::new(&mut be, 0, 512);
        let mut next = argmax(s.prompt(&prompt).unwrap());
        let mut got = Vec::new();
        for _ in 0..16.min(want.len()) {
            got.push(next);
            if loaded.tokenizer.is_eog(next) {
                break;
            }
            next = argmax(s.step(next).unwrap());
        }
        let same = got.iter().zip(&want).take_while(|(a, b)| a == b).count();
        println!("case {i}: {same}/{} leading tokens equal", got.len());
        if same == got.len() {
            full16 += 1;
        }
    }
    println!("greedy: {full16}/{} prompts equal llama.cpp for their first 16 tokens", cases.len());
    assert!(full16 * 4 >= cases.len() * 3, "only {full16}/{} prompts agree", cases.len());
}
