//! The tokenizer against llama.cpp's reference ids (tests/fixtures/llamacpp/tokens_*.json, made
//! by tests/fixtures/llamacpp/make_refs.sh from llama.cpp's `llama_tokenize` and
//! `llama_token_to_piece(special = true)`) on the real models.

mod common;
use common::*;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use moa::gguf::GgufFile;
use moa::tokenizer::{StreamDecoder, Tokenizer};
use serde_json::Value as Json;

fn fixture(name: &str) -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/llamacpp")
        .join(name);
    if p.is_file() {
        Some(p)
    } else {
        println!("SKIP: fixture {} not found", p.display());
        None
    }
}

fn load(model_name: &str, fixture_name: &str) -> Option<(Tokenizer, Json)> {
    let path = model(model_name)?;
    let fixture = fixture(fixture_name)?;
    let json: Json = serde_json::from_slice(&std::fs::read(&fixture).unwrap()).unwrap();
    let file = GgufFile::open(&path).unwrap();
    let t0 = Instant::now();
    let tok = Tokenizer::from_gguf(file.header()).unwrap();
    println!(
        "{model_name}: tokenizer loaded in {:.1} ms ({} tokens)",
        t0.elapsed().as_secs_f64() * 1e3,
        tok.vocab_size()
    );
    Some((tok, json))
}

fn ids_of(v: &Json) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// Every fixture case: our ids equal llama.cpp's.
fn check_cases(tok: &Tokenizer, json: &Json) -> usize {
    let cases = json["cases"].as_array().unwrap();
    let mut failures = Vec::new();
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let add = case["add_special"].as_bool().unwrap();
        let parse = case["parse_special"].as_bool().unwrap();
        let want = ids_of(&case["ids"]);
        let got = tok.encode(text, add, parse).unwrap();
        if got != want {
            failures.push(format!(
                "{text:?} add_special={add} parse_special={parse}\n  llama.cpp {want:?}\n  moa       {got:?}"
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases differ:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    cases.len()
}

/// Every fixture piece: our token bytes equal `llama_token_to_piece(special = true)`.
fn check_pieces(tok: &Tokenizer, json: &Json) -> usize {
    let pieces = json["pieces"].as_array().unwrap();
    let mut failures = Vec::new();
    for p in pieces {
        let id = p["id"].as_u64().unwrap() as u32;
        let want: Vec<u8> = p["bytes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b.as_u64().unwrap() as u8)
            .collect();
        if tok.token_bytes(id) != want.as_slice() {
            failures.push(format!(
                "id {id}: llama.cpp {want:?}, moa {:?}",
                tok.token_bytes(id)
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "pieces differ:\n{}",
        failures.join("\n")
    );
    pieces.len()
}

/// The vocabulary summary (size, BOS/EOS/EOT, add_bos/add_eos).
fn check_vocab(tok: &Tokenizer, json: &Json) {
    let v = &json["vocab"];
    let id = |k: &str| v[k].as_i64().and_then(|x| u32::try_from(x).ok());
    assert_eq!(tok.vocab_size() as u64, v["n_vocab"].as_u64().unwrap());
    assert_eq!(tok.add_bos(), v["add_bos"].as_bool().unwrap());
    assert_eq!(tok.add_eos(), v["add_eos"].as_bool().unwrap());
    assert_eq!(tok.bos(), id("bos"));
    assert_eq!(tok.eos(), id("eos"));
    if !v["eot"].is_null() {
        let eot = id("eot");
        assert_eq!(tok.eot(), eot);
        if let Some(eot) = eot {
            assert!(tok.is_eog(eot));
        }
    }
    if let Some(eos) = tok.eos() {
        assert!(tok.is_eog(eos));
    }
}

/// decode(encode(x)) == x without added BOS/EOS (both vocabularies are lossless: byte-level BPE,
/// and SentencePiece with byte fallback and no space prefix); the streaming decoder gives the
/// same text token by token.
fn check_round_trip(tok: &Tokenizer, json: &Json) {
    for case in json["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        for parse in [false, true] {
            let ids = tok.encode(text, false, parse).unwrap();
            assert_eq!(tok.decode(&ids), text, "parse_special={parse}");
            let mut stream = StreamDecoder::new(tok);
            let mut streamed = String::new();
            for &id in &ids {
                streamed += &stream.push(id);
            }
            streamed += &stream.finish();
            assert_eq!(streamed, text);
        }
    }
}

#[test]
fn smollm_matches_llama_cpp() {
    let Some((tok, json)) = load(SMOLLM, "tokens_smollm.json") else {
        return;
    };
    check_vocab(&tok, &json);
    let cases = check_cases(&tok, &json);
    let pieces = check_pieces(&tok, &json);
    check_round_trip(&tok, &json);
    println!("smollm: {cases} cases and {pieces} pieces equal llama.cpp's");

    // End of generation, as llama.cpp b11434's llama_vocab_is_eog reports it over every id:
    // <|endoftext|>, <|im_end|> (EOS) and <reponame>, which llama.cpp takes for the FIM repo token.
    assert_eq!(tok.eog_ids(), [0, 2, 4]);

    // Chat markup: control tokens parse only with parse_special.
    let im_end = tok.token_id("<|im_end|>").unwrap();
    assert!(tok.is_eog(im_end));
    assert_eq!(tok.encode("<|im_end|>", false, true).unwrap(), [im_end]);
    assert_ne!(tok.encode("<|im_end|>", false, false).unwrap(), [im_end]);
}

#[test]
fn gemma_matches_llama_cpp() {
    let Some((tok, json)) = load(GEMMA, "tokens_gemma.json") else {
        return;
    };
    check_vocab(&tok, &json);
    let cases = check_cases(&tok, &json);
    let pieces = check_pieces(&tok, &json);
    check_round_trip(&tok, &json);
    println!("gemma: {cases} cases and {pieces} pieces equal llama.cpp's");

    // As llama.cpp b11434 reports it: <eos>, <end_of_turn> and "</s>" (a user-defined token that
    // llama.cpp's list of end texts turns into a control token).
    assert_eq!(tok.eog_ids(), [1, 106, 212]);
    let eot = tok.token_id("<end_of_turn>").unwrap();
    assert!(tok.is_eog(eot));
    assert!(!tok.is_eog(tok.bos().unwrap()));
}

/// Loading is fast: the 262k-token Gemma vocabulary well under a second (the bound is loose
/// for unoptimized builds and busy machines).
#[test]
fn loading_is_fast() {
    let Some(path) = model(GEMMA) else {
        return;
    };
    let file = GgufFile::open(&path).unwrap();
    let t0 = Instant::now();
    let tok = Tokenizer::from_gguf(file.header()).unwrap();
    let dt = t0.elapsed();
    println!("gemma tokenizer: {} tokens in {dt:?}", tok.vocab_size());
    assert!(dt.as_secs_f64() < 2.0, "{dt:?}");
}

/// llama.cpp's `dump_refs` driver, when tests/fixtures/llamacpp/make_refs.sh has built it.
fn dump_refs() -> Option<PathBuf> {
    let cache = std::env::var_os("MOA_LLAMA_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache/moa/llama.cpp")))?;
    let bin = cache.join("bin/dump_refs");
    bin.is_file().then_some(bin)
}

/// Deterministic tricky strings: code points from several scripts and classes, whitespace runs,
/// and special-token texts of both models.
fn random_texts(n: usize, seed: u64) -> Vec<String> {
    const PIECES: &[&str] = &[
        "a",
        "Z",
        "the",
        " of",
        "'s",
        "'LL",
        "don't",
        "1",
        "42",
        "2024",
        " ",
        "  ",
        "    ",
        "\t",
        "\n",
        "\n\n",
        "\r\n",
        ".",
        ",",
        "!?",
        "(",
        ")",
        "{",
        "}",
        "<",
        ">",
        "/",
        "\\",
        "#",
        "`",
        "~",
        "$",
        "é",
        "ß",
        "ñ",
        "Ω",
        "π",
        "≈",
        "—",
        "“",
        "’",
        "日本",
        "語",
        "한",
        "Привет",
        "مرحبا",
        "🦀",
        "👩\u{200d}👧",
        "\u{200b}",
        "\u{a0}",
        "\u{3000}",
        "\u{2028}",
        "\u{1680}",
        "\u{85}",
        "\u{301}",
        "²",
        "½",
        "٣",
        "Ⅻ",
        "<|im_start|>",
        "<|im_end|>",
        "<|endoftext|>",
        "<start_of_turn>",
        "<end_of_turn>",
        "<bos>",
        "<eos>",
        "</s>",
        "<s>",
        "<pad>",
        "<unk>",
        "<mask>",
        "<h1>",
        "</div>",
        "<reponame>",
        "<unused7>",
        "[multimodal]",
    ];
    let mut x = seed | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    (0..n)
        .map(|_| {
            let k = (next() % 24) as usize;
            (0..k)
                .map(|_| PIECES[(next() % PIECES.len() as u64) as usize])
                .collect()
        })
        .collect()
}

/// When llama.cpp's reference driver is built locally, compare against it live on a few
/// thousand random strings (every add_special / parse_special combination).
#[test]
fn random_strings_match_live_llama_cpp() {
    let Some(bin) = dump_refs() else {
        println!("SKIP: llama.cpp's dump_refs not built (tests/fixtures/llamacpp/make_refs.sh)");
        return;
    };
    for (name, seed) in [(SMOLLM, 1u64), (GEMMA, 2)] {
        let Some(path) = model(name) else {
            continue;
        };
        let file = GgufFile::open(&path).unwrap();
        let tok = Tokenizer::from_gguf(file.header()).unwrap();
        let texts = random_texts(1500, seed);
        let mut input = String::new();
        let mut cases = Vec::new();
        for text in &texts {
            for add in [false, true] {
                for parse in [false, true] {
                    let hex: String = text.bytes().map(|b| format!("{b:02x}")).collect();
                    input += &format!("{} {} {hex}\n", add as u8, parse as u8);
                    cases.push((text, add, parse));
                }
            }
        }
        let mut child = Command::new(&bin)
            .arg("tokenize")
            .arg(&path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()).unwrap());
        let out = child.wait_with_output().unwrap();
        writer.join().unwrap();
        assert!(out.status.success(), "dump_refs failed");
        let lines: Vec<&str> = std::str::from_utf8(&out.stdout).unwrap().lines().collect();
        assert_eq!(lines.len(), cases.len());
        let mut failures = Vec::new();
        for ((text, add, parse), line) in cases.iter().zip(&lines) {
            let want: Vec<u32> = line
                .split_whitespace()
                .map(|x| x.parse().unwrap())
                .collect();
            let got = tok.encode(text, *add, *parse).unwrap();
            if got != want {
                failures.push(format!(
                    "{text:?} add={add} parse={parse}\n  llama.cpp {want:?}\n  moa       {got:?}"
                ));
            }
        }
        assert!(
            failures.is_empty(),
            "{name}: {} of {} differ:\n{}",
            failures.len(),
            cases.len(),
            failures.join("\n")
        );
        println!("{name}: {} random cases equal llama.cpp's", cases.len());
    }
}
