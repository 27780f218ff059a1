//! Unit tests on tiny synthetic vocabularies written as GGUF metadata.

use super::*;
use crate::gguf::{GgufBuilder, Value, ValueType};

const NORMAL: i32 = 1;
const UNKNOWN: i32 = 2;
const CONTROL: i32 = 3;
const USER: i32 = 4;
const UNUSED: i32 = 5;
const BYTE: i32 = 6;

fn strings(items: &[String]) -> Value {
    Value::Array(
        ValueType::String,
        items.iter().map(|s| Value::string(s.as_str())).collect(),
    )
}

fn parse(meta: Vec<(&str, Value)>) -> Gguf {
    let mut b = GgufBuilder::new();
    for (k, v) in meta {
        b.set(k, v);
    }
    let mut bytes = Vec::new();
    b.write_to(&mut bytes).unwrap();
    Gguf::parse(&bytes).unwrap()
}

/// A byte-level BPE vocabulary: the 256 byte characters, a few merges, special tokens.
fn gpt2_meta(pre: &str) -> Vec<(&'static str, Value)> {
    let table = unicode::byte_to_char();
    let mut tokens: Vec<String> = table.iter().map(|c| c.to_string()).collect();
    let mut types = vec![NORMAL; 256];
    let merges = [
        "h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld", "Ġ Ġ",
    ];
    for m in merges {
        tokens.push(m.replace(' ', ""));
        types.push(NORMAL);
    }
    for (t, ty) in [
        ("<|endoftext|>", CONTROL),
        ("<|im_end|>", CONTROL),
        ("<tool>", USER),
        ("<fim_pad>", NORMAL),
    ] {
        tokens.push(t.into());
        types.push(ty);
    }
    vec![
        ("tokenizer.ggml.model", Value::string("gpt2")),
        ("tokenizer.ggml.pre", Value::string(pre)),
        ("tokenizer.ggml.tokens", strings(&tokens)),
        (
            "tokenizer.ggml.token_type",
            Value::Array(ValueType::I32, types.into_iter().map(Value::I32).collect()),
        ),
        ("tokenizer.ggml.merges", strings(&merges.map(String::from))),
    ]
}

fn with(
    mut meta: Vec<(&'static str, Value)>,
    key: &'static str,
    v: Value,
) -> Vec<(&'static str, Value)> {
    meta.retain(|(k, _)| *k != key);
    meta.push((key, v));
    meta
}

fn gpt2(pre: &str) -> Tokenizer {
    let meta = with(
        gpt2_meta(pre),
        "tokenizer.ggml.eos_token_id",
        Value::U32(266),
    );
    Tokenizer::from_gguf(&parse(meta)).unwrap()
}

fn id(tok: &Tokenizer, text: &str) -> u32 {
    tok.token_id(text)
        .unwrap_or_else(|| panic!("{text:?} not in the vocabulary"))
}

#[test]
fn bpe_merges_by_rank() {
    let tok = gpt2("gpt-2");
    assert_eq!(
        tok.encode("hello world", false, false).unwrap(),
        [id(&tok, "hello"), id(&tok, "Ġworld")]
    );
    // Two spaces: the first stands alone (\s+(?!\S)), the second starts " world".
    assert_eq!(
        tok.encode("hello  world", false, false).unwrap(),
        [id(&tok, "hello"), id(&tok, "Ġ"), id(&tok, "Ġworld")]
    );
    // Unmerged bytes stay byte characters.
    let ids = tok.encode("hé!", false, false).unwrap();
    assert_eq!(
        ids,
        [id(&tok, "h"), id(&tok, "Ã"), id(&tok, "©"), id(&tok, "!")]
    );
    assert_eq!(tok.decode(&ids), "hé!");
    assert_eq!(tok.token_bytes(id(&tok, "Ġworld")), b" world");
    assert_eq!(tok.token_bytes(id(&tok, "Ã")), &[0xC3]);
    assert_eq!(tok.encode("", true, true).unwrap(), Vec::<u32>::new());
}

#[test]
fn bpe_special_tokens() {
    let tok = gpt2("gpt-2");
    let im_end = id(&tok, "<|im_end|>");
    let tool = id(&tok, "<tool>");
    let hello = id(&tok, "hello");
    assert_eq!(
        tok.encode("hello<|im_end|>hello", false, true).unwrap(),
        [hello, im_end, hello]
    );
    let plain = tok.encode("hello<|im_end|>", false, false).unwrap();
    assert!(!plain.contains(&im_end));
    assert_eq!(tok.decode(&plain), "hello<|im_end|>");
    // User-defined tokens are split out even without parse_special.
    assert_eq!(
        tok.encode("<tool>hello", false, false).unwrap(),
        [tool, hello]
    );
    assert_eq!(tok.token_bytes(im_end), b"<|im_end|>");
}

#[test]
fn bpe_metadata_defaults() {
    let tok = gpt2("gpt-2");
    // BPE vocabularies default to no BOS; the BOS id defaults to 11 as in llama.cpp.
    assert!(!tok.add_bos());
    assert_eq!(tok.bos(), Some(11));
    assert_eq!(tok.eos(), Some(266));
    assert_eq!(
        tok.encode("hello", true, true).unwrap(),
        [id(&tok, "hello")]
    );
    // End of generation: EOS and the tokens llama.cpp knows by text; "<fim_pad>" is found as
    // the FIM pad token, which makes it control and end-of-generation.
    for t in ["<|endoftext|>", "<|im_end|>", "<fim_pad>"] {
        assert!(tok.is_eog(id(&tok, t)), "{t}");
        assert!(tok.is_control(id(&tok, t)), "{t}");
    }
    assert!(tok.is_eog(266));
    assert!(!tok.is_eog(id(&tok, "<tool>")));
    // Several end-of-turn texts: the lowest id is taken.
    assert_eq!(tok.eot(), Some(id(&tok, "<|endoftext|>")));

    // llama-bpe adds BOS by default, from the bos id in the metadata.
    let meta = with(
        gpt2_meta("llama-bpe"),
        "tokenizer.ggml.bos_token_id",
        Value::U32(256),
    );
    let tok = Tokenizer::from_gguf(&parse(meta.clone())).unwrap();
    assert!(tok.add_bos());
    assert_eq!(
        tok.encode("hello", true, false).unwrap(),
        [256, id(&tok, "hello")]
    );
    // ... unless the metadata says otherwise.
    let meta = with(meta, "tokenizer.ggml.add_bos_token", Value::Bool(false));
    assert!(!Tokenizer::from_gguf(&parse(meta)).unwrap().add_bos());
}

#[test]
fn smollm_style_digits() {
    let tok = gpt2("smollm");
    let ids = tok.encode("a 12", false, false).unwrap();
    assert_eq!(
        ids,
        [id(&tok, "a"), id(&tok, "Ġ"), id(&tok, "1"), id(&tok, "2")]
    );
}

#[test]
fn errors_name_the_value() {
    let e = Tokenizer::from_gguf(&parse(gpt2_meta("no-such-pre"))).unwrap_err();
    assert!(e.to_string().contains("no-such-pre"), "{e}");
    assert!(matches!(e, TokenizerError::UnknownPre(_)));

    let e = Tokenizer::from_gguf(&parse(gpt2_meta("kimi-k2"))).unwrap_err();
    assert!(e.to_string().contains("kimi-k2"), "{e}");

    let meta = with(
        gpt2_meta("gpt-2"),
        "tokenizer.ggml.model",
        Value::string("wordpiece9"),
    );
    let e = Tokenizer::from_gguf(&parse(meta)).unwrap_err();
    assert!(e.to_string().contains("wordpiece9"), "{e}");

    let mut meta = gpt2_meta("gpt-2");
    meta.retain(|(k, _)| *k != "tokenizer.ggml.merges");
    let e = Tokenizer::from_gguf(&parse(meta)).unwrap_err();
    assert!(e.to_string().contains("tokenizer.ggml.merges"), "{e}");

    let meta = with(
        gpt2_meta("gpt-2"),
        "tokenizer.ggml.scores",
        Value::string("x"),
    );
    let e = Tokenizer::from_gguf(&parse(meta)).unwrap_err();
    assert!(e.to_string().contains("tokenizer.ggml.scores"), "{e}");

    let meta = with(
        gpt2_meta("gpt-2"),
        "tokenizer.ggml.tokens",
        strings(&["a".into(), "b".into(), "a".into()]),
    );
    let e = Tokenizer::from_gguf(&parse(meta)).unwrap_err();
    assert!(e.to_string().contains("duplicate token \"a\""), "{e}");

    let e = Tokenizer::from_gguf(&parse(vec![])).unwrap_err();
    assert!(e.to_string().contains("tokenizer.ggml.model"), "{e}");

    // add_bos without a BOS token.
    let meta = with(
        gpt2_meta("glm4"),
        "tokenizer.ggml.add_bos_token",
        Value::Bool(true),
    );
    let e = Tokenizer::from_gguf(&parse(meta)).unwrap_err();
    assert!(e.to_string().contains("tokenizer.ggml.bos_token_id"), "{e}");
}

/// A SentencePiece vocabulary: ids 0..=2 unk/bos/eos, 256 byte tokens, pieces with scores.
fn spm_meta(extra: &[(&str, f32, i32)]) -> Vec<(&'static str, Value)> {
    let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
    let mut scores = vec![0.0f32; 3];
    let mut types = vec![UNKNOWN, CONTROL, CONTROL];
    for b in 0..=255u8 {
        tokens.push(format!("<0x{b:02X}>"));
        scores.push(0.0);
        types.push(BYTE);
    }
    for &(t, s, ty) in extra {
        tokens.push(t.into());
        scores.push(s);
        types.push(ty);
    }
    vec![
        ("tokenizer.ggml.model", Value::string("llama")),
        ("tokenizer.ggml.tokens", strings(&tokens)),
        (
            "tokenizer.ggml.scores",
            Value::Array(ValueType::F32, scores.into_iter().map(Value::F32).collect()),
        ),
        (
            "tokenizer.ggml.token_type",
            Value::Array(ValueType::I32, types.into_iter().map(Value::I32).collect()),
        ),
    ]
}

const SPM_PIECES: &[(&str, f32, i32)] = &[
    ("▁", -10.0, NORMAL),
    ("h", -10.0, NORMAL),
    ("e", -10.0, NORMAL),
    ("l", -10.0, NORMAL),
    ("o", -10.0, NORMAL),
    ("w", -10.0, NORMAL),
    ("r", -10.0, NORMAL),
    ("d", -10.0, NORMAL),
    ("a", -10.0, NORMAL),
    ("b", -10.0, NORMAL),
    ("c", -10.0, NORMAL),
    ("ll", -1.0, NORMAL),
    ("he", -4.0, NORMAL),
    ("▁h", -5.0, NORMAL),
    ("▁he", -3.0, NORMAL),
    ("hell", -2.0, NORMAL),
    ("▁hell", -1.5, NORMAL),
    ("▁hello", -0.5, NORMAL),
    ("or", -2.5, NORMAL),
    ("ld", -2.6, NORMAL),
    ("▁w", -6.0, NORMAL),
    ("▁wor", -3.0, NORMAL),
    ("▁world", -1.0, NORMAL),
    ("ab", -1.0, NORMAL),
    ("bc", -1.0, NORMAL),
    ("<start_of_turn>", 0.0, CONTROL),
    ("\n", 0.0, USER),
    ("  ", 0.0, USER),
    ("<unused0>", 0.0, UNUSED),
    ("<|end|>", 0.0, CONTROL),
];

#[test]
fn spm_merges_by_score() {
    let tok = Tokenizer::from_gguf(&parse(spm_meta(SPM_PIECES))).unwrap();
    assert!(tok.add_bos());
    assert_eq!(tok.bos(), Some(1));
    assert_eq!(tok.eos(), Some(2));
    assert_eq!(tok.unk(), Some(0));
    // Space prefix by default; the first text after the start gets "▁".
    assert_eq!(
        tok.encode("hello world", true, false).unwrap(),
        [1, id(&tok, "▁hello"), id(&tok, "▁world")]
    );
    assert_eq!(
        tok.decode(&tok.encode("hello world", false, false).unwrap()),
        " hello world"
    );
    // Byte fallback for a code point the vocabulary lacks.
    assert_eq!(
        tok.encode("é", false, false).unwrap(),
        [id(&tok, "▁"), id(&tok, "<0xC3>"), id(&tok, "<0xA9>")]
    );
    // Equal scores: the leftmost pair merges first.
    let meta = with(
        spm_meta(SPM_PIECES),
        "tokenizer.ggml.add_space_prefix",
        Value::Bool(false),
    );
    let tok = Tokenizer::from_gguf(&parse(meta)).unwrap();
    assert_eq!(
        tok.encode("abc", false, false).unwrap(),
        [id(&tok, "ab"), id(&tok, "c")]
    );
}

#[test]
fn spm_special_tokens_and_pieces() {
    let tok = Tokenizer::from_gguf(&parse(spm_meta(SPM_PIECES))).unwrap();
    let sot = id(&tok, "<start_of_turn>");
    let nl = id(&tok, "\n");
    let two = id(&tok, "  ");
    // Text after any special token gets the space prefix again.
    assert_eq!(
        tok.encode("<start_of_turn>hello\nworld", false, true)
            .unwrap(),
        [sot, id(&tok, "▁hello"), nl, id(&tok, "▁world")]
    );
    // User-defined tokens ("\n", "  ") are split out without parse_special too.
    let ids = tok.encode("a  b", false, false).unwrap();
    assert_eq!(
        ids,
        [
            id(&tok, "▁"),
            id(&tok, "a"),
            two,
            id(&tok, "▁"),
            id(&tok, "b")
        ]
    );
    assert!(!tok
        .encode("<start_of_turn>", false, false)
        .unwrap()
        .contains(&sot));

    assert_eq!(tok.token_bytes(id(&tok, "▁hello")), b" hello");
    assert_eq!(tok.token_bytes(id(&tok, "<0x41>")), b"A");
    assert_eq!(tok.token_bytes(sot), b"<start_of_turn>");
    assert_eq!(tok.token_bytes(nl), b"\n");
    assert_eq!(tok.token_bytes(id(&tok, "<unused0>")), b"");
    assert_eq!(tok.token_bytes(u32::MAX), b"");
    assert!(tok.is_eog(2)); // "</s>"
    assert!(tok.is_eog(id(&tok, "<|end|>")));
    assert!(!tok.is_eog(1));
}

#[test]
fn phi3_strips_whitespace_after_special_tokens() {
    let meta = with(
        spm_meta(SPM_PIECES),
        "tokenizer.ggml.add_space_prefix",
        Value::Bool(false),
    );
    let phi3 = with(meta.clone(), "general.name", Value::string("Phi-3 mini"));
    let tok = Tokenizer::from_gguf(&parse(phi3)).unwrap();
    let end = id(&tok, "<|end|>");
    let ids = tok.encode("<|end|> \t hello", false, true).unwrap();
    assert_eq!(ids, [end, id(&tok, "hell"), id(&tok, "o")]);
    assert_eq!(tok.decode(&ids), "<|end|>hello");
    // Without the model name the whitespace stays.
    let tok = Tokenizer::from_gguf(&parse(meta)).unwrap();
    let ids = tok.encode("<|end|> \t hello", false, true).unwrap();
    assert_eq!(ids[0], end);
    assert_eq!(tok.decode(&ids), "<|end|> \t hello");
}

#[test]
fn stream_decoder_waits_for_whole_characters() {
    let tok = Tokenizer::from_gguf(&parse(spm_meta(SPM_PIECES))).unwrap();
    let bytes = |b: u8| id(&tok, &format!("<0x{b:02X}>"));
    let mut s = StreamDecoder::new(&tok);
    // "✓" is E2 9C 93.
    assert_eq!(s.push(bytes(b'a')), "a");
    assert_eq!(s.push(bytes(0xE2)), "");
    assert_eq!(s.push(bytes(0x9C)), "");
    assert_eq!(s.push(bytes(0x93)), "✓");
    assert_eq!(s.push(id(&tok, "▁hello")), " hello");
    // Bytes that can never be valid come out as U+FFFD, like decode.
    assert_eq!(s.push(bytes(0xFF)), "\u{FFFD}");
    assert_eq!(s.push(bytes(0xE2)), "");
    assert_eq!(s.push(bytes(b'x')), "\u{FFFD}x");
    assert_eq!(s.push(bytes(0xF0)), "");
    assert_eq!(s.finish(), "\u{FFFD}");
    assert_eq!(s.finish(), "");

    let ids = [bytes(0xE2), bytes(0x9C), bytes(b'y'), bytes(0xC3)];
    let mut s = StreamDecoder::new(&tok);
    let mut out: String = ids.iter().map(|&i| s.push(i)).collect();
    out += &s.finish();
    assert_eq!(out, tok.decode(&ids));
}

#[test]
fn tokenizer_is_shareable() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Tokenizer>();
    send_sync::<StreamDecoder<'static>>();
}
