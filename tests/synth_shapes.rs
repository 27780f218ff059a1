//! `moa-bench synth`: synthetic files of real model shapes. The type mixes of the real shapes
//! (without writing them), a SmolLM2-135M-shaped Q4_K_M file checked by gguf-py against
//! llama.cpp's quantization rules and run by our CPU backend (finite logits), the tokenizers of
//! both vocabulary families round-tripping text, and bad input giving errors.

mod common;

use std::collections::BTreeMap;

use moa::formats::GgmlType;
use moa::generate::Session;
use moa::model::synth::{
    shape_plan, write_shape, write_shape_vocab, Shape, SynthOptions, SynthType, TensorPlan,
};
use moa::runtime;
use moa::tokenizer::Tokenizer;

fn plan(shape: Shape, ty: SynthType) -> Vec<TensorPlan> {
    shape_plan(shape, ty, &SynthOptions::default()).unwrap()
}

fn type_counts(p: &[TensorPlan]) -> BTreeMap<&'static str, usize> {
    let mut m = BTreeMap::new();
    for t in p {
        *m.entry(t.ty.name()).or_default() += 1;
    }
    m
}

fn bytes(p: &[TensorPlan]) -> u64 {
    p.iter()
        .map(|t| t.ty.bytes_for(t.dims.iter().product()).unwrap())
        .sum()
}

fn ty_of(p: &[TensorPlan], name: &str) -> GgmlType {
    p.iter().find(|t| t.name == name).unwrap().ty
}

#[test]
fn real_shapes_have_llama_cpp_type_mixes() {
    // Meta-Llama-3-8B Q4_K_M as llama-quantize writes it: 193 q4_K, 33 q6_K, 65 f32, 4.92 GB.
    let p = plan(Shape::Llama3_8B, SynthType::Q4KM);
    let c = type_counts(&p);
    assert_eq!(c["Q4_K"], 193, "{c:?}");
    assert_eq!(c["Q6_K"], 33, "{c:?}");
    assert_eq!(c["F32"], 65, "{c:?}");
    let gb = bytes(&p) as f64 / 1e9;
    assert!((4.90..4.93).contains(&gb), "{gb} GB");
    assert_eq!(ty_of(&p, "token_embd.weight"), GgmlType::Q4_K);
    assert_eq!(ty_of(&p, "output.weight"), GgmlType::Q6_K);
    assert_eq!(ty_of(&p, "blk.0.attn_v.weight"), GgmlType::Q6_K);
    assert_eq!(ty_of(&p, "blk.4.attn_v.weight"), GgmlType::Q4_K);
    assert_eq!(ty_of(&p, "blk.6.ffn_down.weight"), GgmlType::Q6_K);
    assert_eq!(ty_of(&p, "blk.31.ffn_down.weight"), GgmlType::Q6_K);
    let dims = &p
        .iter()
        .find(|t| t.name == "blk.0.ffn_down.weight")
        .unwrap()
        .dims;
    assert_eq!(dims, &[14336, 4096]);

    // 70B: the attn_v that do not get Q6_K get Q5_K.
    let p = plan(Shape::Llama3_70B, SynthType::Q4KM);
    assert_eq!(ty_of(&p, "blk.40.attn_v.weight"), GgmlType::Q5_K);
    assert_eq!(ty_of(&p, "blk.0.attn_v.weight"), GgmlType::Q6_K);
    assert_eq!(p.len(), 80 * 9 + 3);

    // Llama-3.2-1B: tied embeddings take the output's type; Llama-3.1 RoPE factors.
    let p = plan(Shape::Llama32_1B, SynthType::Q4KM);
    assert!(p.iter().all(|t| t.name != "output.weight"));
    assert_eq!(ty_of(&p, "token_embd.weight"), GgmlType::Q6_K);
    assert_eq!(ty_of(&p, "rope_freqs.weight"), GgmlType::F32);
    let mb = bytes(&p) as f64 / 1e6;
    assert!((790.0..815.0).contains(&mb), "{mb} MB");

    // SmolLM2: width 576 is not a multiple of 256, so K-quants fall back like llama.cpp's.
    let p = plan(Shape::SmolLM2_135M, SynthType::Q4KM);
    assert_eq!(ty_of(&p, "blk.5.attn_q.weight"), GgmlType::Q5_0);
    assert_eq!(ty_of(&p, "blk.0.attn_v.weight"), GgmlType::Q8_0);
    assert_eq!(ty_of(&p, "blk.0.ffn_down.weight"), GgmlType::Q6_K);
    assert_eq!(ty_of(&p, "token_embd.weight"), GgmlType::Q8_0);

    // Uniform mixes.
    let c = type_counts(&plan(Shape::Llama3_8B, SynthType::Q4_0));
    assert_eq!((c["Q4_0"], c["Q6_K"]), (225, 1), "{c:?}");
    let c = type_counts(&plan(Shape::Llama3_8B, SynthType::Q8_0));
    assert_eq!(c["Q8_0"], 226, "{c:?}");
    let c = type_counts(&plan(Shape::Llama3_8B, SynthType::Q4K));
    assert_eq!((c["Q4_K"], c["Q6_K"]), (225, 1), "{c:?}");
}

#[test]
fn smollm2_shape_matches_gguf_py_and_runs() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("smollm2.gguf");
    let opts = SynthOptions {
        seed: 3,
        ..Default::default()
    };
    let r = write_shape(Shape::SmolLM2_135M, SynthType::Q4KM, &opts, &path).unwrap();
    assert_eq!(r.bytes, std::fs::metadata(&path).unwrap().len());
    assert_eq!(r.n_tensors, 30 * 9 + 2);
    if common::python_gguf() {
        let out = common::run_py(
            "synth_check.py",
            &[path.to_str().unwrap(), "--type", "q4_k_m", "--tied"],
        );
        println!("{out}");
    }
    let loaded = runtime::load(&path).unwrap();
    let c = &loaded.model.config;
    assert_eq!((c.n_layer, c.n_embd, c.n_vocab), (30, 576, 49152));
    let mut be = runtime::cpu_backend(&loaded.model, 64, 1, 16, 2).unwrap();
    let mut s = Session::new(&mut be, 0, 16);
    let toks = loaded
        .tokenizer
        .encode("the quick brown fox", true, false)
        .unwrap();
    let logits = s.prompt(&toks).unwrap().to_vec();
    assert_eq!(logits.len(), 49152);
    let mut all = logits;
    for t in [100u32, 2000, 49151] {
        all.extend_from_slice(s.step(t).unwrap());
    }
    assert!(all.iter().all(|x| x.is_finite()), "non-finite logits");
    let sd = (all.iter().map(|x| x * x).sum::<f32>() / all.len() as f32).sqrt();
    assert!(sd > 1e-3 && sd < 100.0, "logit scale {sd}");
}

#[test]
fn generated_vocabularies_round_trip_text() {
    let dir = tempfile::tempdir().unwrap();
    let texts = [
        "the quick brown fox jumps over the lazy dog",
        "Hello, World! 12345 tabs\tand\nnewlines\n\n  spaces",
        "unicode: caf\u{e9} \u{4e2d}\u{6587} \u{1f600} \u{3b1}\u{3b2}\u{3b3}",
        "",
    ];
    for (shape, bos, eos, n_vocab) in [
        (Shape::Llama32_1B, 128000, 128001, 128256),
        (Shape::SmolLM2_135M, 1, 2, 49152),
    ] {
        let path = dir.path().join(format!("{}.gguf", shape.name()));
        write_shape_vocab(shape, &SynthOptions::default(), &path).unwrap();
        let g = moa::gguf::GgufFile::open(&path).unwrap();
        let tok = Tokenizer::from_gguf(&g).unwrap();
        assert_eq!(tok.vocab_size(), n_vocab);
        assert_eq!((tok.bos(), tok.eos()), (Some(bos), Some(eos)));
        for t in texts {
            let ids = tok.encode(t, false, false).unwrap();
            assert_eq!(tok.decode(&ids), t, "{}: {ids:?}", shape.name());
        }
        // Merges apply: fewer tokens than bytes (Llama 3's ignore_merges takes the whole word;
        // SmolLM2's rank order stops at "Ġt" + "he").
        let ids = tok.encode(" the", false, false).unwrap();
        assert!(ids.len() <= 2, "{}: {ids:?}", shape.name());
    }
    // Llama 3's special tokens are parsed as such.
    let g = moa::gguf::GgufFile::open(dir.path().join("llama3.2-1b.gguf")).unwrap();
    let tok = Tokenizer::from_gguf(&g).unwrap();
    let ids = tok.encode("hi<|eot_id|>", true, true).unwrap();
    assert_eq!(ids.first(), Some(&128000));
    assert_eq!(ids.last(), Some(&128009));
}

#[test]
fn bad_synth_input_is_an_error() {
    let e = "llama4".parse::<Shape>().unwrap_err().to_string();
    assert!(e.contains("llama3-8b") && e.contains("smollm2-135m"), "{e}");
    let e = "q5_k".parse::<SynthType>().unwrap_err().to_string();
    assert!(e.contains("q4_k_m") && e.contains("q8_0"), "{e}");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.gguf");
    for opts in [
        SynthOptions {
            n_ctx: Some(0),
            ..Default::default()
        },
        SynthOptions {
            n_ctx: Some(1 << 20),
            ..Default::default()
        },
        SynthOptions {
            n_vocab: Some(300),
            ..Default::default()
        },
        SynthOptions {
            n_layer: Some(0),
            ..Default::default()
        },
    ] {
        let e = write_shape(Shape::Llama32_1B, SynthType::Q4KM, &opts, &path).unwrap_err();
        println!("{e}");
    }
    // An unwritable destination is an error and leaves nothing behind.
    let missing = dir.path().join("no/such/dir/x.gguf");
    let opts = SynthOptions {
        n_layer: Some(1),
        n_vocab: Some(1000),
        ..Default::default()
    };
    assert!(write_shape(Shape::SmolLM2_135M, SynthType::Q8_0, &opts, &missing).is_err());
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}
