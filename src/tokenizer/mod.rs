//! Tokenization of GGUF vocabularies with llama.cpp's semantics (`llama_tokenize`,
//! `llama_token_to_piece(special = true)`, `llama_vocab_is_eog`).
//!
//! Two vocabulary types are supported, chosen by `tokenizer.ggml.model`:
//! - `"gpt2"`: byte-level BPE with merges (`bpe.rs`), the words first split by the pre-tokenizer
//!   regexes that `tokenizer.ggml.pre` names (`pretok.rs`);
//! - `"llama"`: SentencePiece vocabularies with scores (`spm.rs`): spaces become `▁`, an optional
//!   space prefix, greedy merges by score, byte fallback to `<0xXX>` tokens.
//!
//! Before either, special tokens written in the text are split out (`special.rs`).
//!
//! What comes from the `tokenizers` crate and what is ours: the BPE merge engine is `tokenizers`'
//! BPE model, and the generic pre-tokenizer regexes run on its fancy-regex engine. The rest is
//! implemented here because `tokenizers` has no equivalent that behaves like llama.cpp: the
//! GPT-2 and Llama-3 pre-tokenizer scanners and the sequence-of-regexes splitting, the
//! score-driven SentencePiece merging, the special-token partition (longest token first, with
//! llama.cpp's LSTRIP/RSTRIP rules), the vocabulary metadata rules (defaults per model type,
//! the control/EOG detection by token text) and `token_to_piece`. Each module says why.
//!
//! Loading reads the metadata once and builds flat tables (token texts in one buffer, an
//! open-addressing index over them, every piece precomputed), so a 262k-token vocabulary loads
//! in a few tens of milliseconds.
//!
//! Checked against llama.cpp b11434 (the version of tests/fixtures/llamacpp): the fixture cases
//! and pieces of SmolLM2 (gpt2/smollm) and Gemma 3 (llama/SentencePiece); every piece and the
//! control/end-of-generation sets of both vocabularies; and, with the SmolLM2 vocabulary relabelled
//! to each `tokenizer.ggml.pre` value of the table in `pretok.rs`, some 22,000 random strings each
//! (Gemma also with `add_space_prefix`, and with the Phi-3 / Jina / ModernBERT strip rules).
//!
//! Known differences from llama.cpp, all in vocabularies no converter writes:
//! - where several tokens carry texts of one of llama.cpp's lists (e.g. two FIM-pad texts),
//!   llama.cpp takes whichever its hash map yields first; we take the lowest id;
//! - special tokens whose text is not UTF-8 are never found in (UTF-8) text;
//! - merge lines whose halves or result are not tokens are ignored;
//! - SentencePiece byte fallback without a `<0xXX>` (or one-byte) token drops the byte, where
//!   llama.cpp throws.
//!
//! Not supported: tokenizer models other than "gpt2" and "llama" (bert, t5, rwkv, plamo2,
//! gemma4, ...) and the few pre-tokenizers listed in `pretok::is_known_unsupported`; loading them
//! is an error naming the value. [`Tokenizer::decode`] concatenates pieces as they are; it does
//! not apply llama_detokenize's optional clean-ups (leading-space removal, `clean_spaces`).

mod bpe;
mod pretok;
mod special;
mod spm;
mod stream;
mod unicode;

pub use stream::StreamDecoder;

use crate::gguf::{Gguf, Value, ValueType};

use special::{Fragment, Special};

/// Errors while loading a vocabulary (or, rarely, while tokenizing); each names the metadata key
/// or value at fault.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("missing metadata key {0:?}")]
    MissingKey(String),
    #[error("metadata key {key:?}: expected {expected}, found {found}")]
    WrongType {
        key: String,
        expected: String,
        found: String,
    },
    #[error("tokenizer.ggml.model = {0:?}: unknown tokenizer model (moa supports \"gpt2\" and \"llama\")")]
    UnknownModel(String),
    #[error("tokenizer.ggml.pre = {0:?}: unknown pre-tokenizer type")]
    UnknownPre(String),
    #[error("tokenizer.ggml.pre = {0:?}: pre-tokenizer not supported by moa")]
    UnsupportedPre(String),
    #[error("metadata key {key:?}: {len} entries, but tokenizer.ggml.tokens has {n_tokens}")]
    ShortArray {
        key: String,
        len: usize,
        n_tokens: usize,
    },
    #[error("tokenizer.ggml.tokens: duplicate token {text:?} at ids {first} and {second}")]
    DuplicateToken {
        text: String,
        first: u32,
        second: u32,
    },
    #[error("tokenizer.ggml.tokens: {0} tokens do not fit 32-bit ids")]
    TooManyTokens(usize),
    #[error("{add_key} is true, but {id_key} is not set")]
    MissingSpecialToken {
        add_key: &'static str,
        id_key: &'static str,
    },
    #[error("tokenizer.ggml.merges: {0}")]
    Merges(String),
    #[error("tokenizer.ggml.pre: regex {regex:?} does not compile: {message}")]
    Regex { regex: String, message: String },
    #[error("BPE tokenization failed: {0}")]
    Bpe(String),
}

/// llama.cpp's token attributes (`llama_token_attr`).
mod attr {
    pub const UNKNOWN: u16 = 1 << 0;
    pub const UNUSED: u16 = 1 << 1;
    pub const NORMAL: u16 = 1 << 2;
    pub const CONTROL: u16 = 1 << 3;
    pub const USER_DEFINED: u16 = 1 << 4;
    pub const BYTE: u16 = 1 << 5;
    pub const LSTRIP: u16 = 1 << 7;
    pub const RSTRIP: u16 = 1 << 8;

    /// From a GGUF token type (`tokenizer.ggml.token_type`).
    pub fn from_token_type(t: i128) -> u16 {
        match t {
            1 => NORMAL,
            2 => UNKNOWN,
            3 => CONTROL,
            4 => USER_DEFINED,
            5 => UNUSED,
            6 => BYTE,
            _ => 0, // undefined
        }
    }
}

const KEY_MODEL: &str = "tokenizer.ggml.model";
const KEY_PRE: &str = "tokenizer.ggml.pre";
const KEY_TOKENS: &str = "tokenizer.ggml.tokens";
const KEY_SCORES: &str = "tokenizer.ggml.scores";
const KEY_TYPES: &str = "tokenizer.ggml.token_type";
const KEY_MERGES: &str = "tokenizer.ggml.merges";
const KEY_ADD_BOS: &str = "tokenizer.ggml.add_bos_token";
const KEY_ADD_EOS: &str = "tokenizer.ggml.add_eos_token";
const KEY_ADD_PREFIX: &str = "tokenizer.ggml.add_space_prefix";
const KEY_BOS: &str = "tokenizer.ggml.bos_token_id";
const KEY_EOS: &str = "tokenizer.ggml.eos_token_id";

/// The escaped space of SentencePiece vocabularies (U+2581).
const SPM_SPACE: &str = "\u{2581}";

/// Token texts in one buffer, with an open-addressing index from text to id.
#[derive(Debug)]
pub(crate) struct Vocab {
    texts: Vec<u8>,
    /// `offsets[id]..offsets[id + 1]` is the text of `id`.
    offsets: Vec<usize>,
    scores: Vec<f32>,
    attrs: Vec<u16>,
    /// Ids (or `u32::MAX` for empty) in a power-of-two table, probed linearly.
    slots: Vec<u32>,
    shift: u32,
    /// The token of each byte for byte fallback (`<0xXX>`, else the one-byte text).
    bytes: [Option<u32>; 256],
}

fn hash_text(b: &[u8]) -> u64 {
    const K: u64 = 0x517c_c1b7_2722_0a95;
    let mut h = (b.len() as u64).wrapping_mul(K);
    let mut chunks = b.chunks_exact(8);
    for c in &mut chunks {
        let w = u64::from_le_bytes(c.try_into().expect("8 bytes"));
        h = (h.rotate_left(5) ^ w).wrapping_mul(K);
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        let mut buf = [0u8; 8];
        buf[..rest.len()].copy_from_slice(rest);
        h = (h.rotate_left(5) ^ u64::from_le_bytes(buf)).wrapping_mul(K);
    }
    h
}

impl Vocab {
    fn len(&self) -> usize {
        self.scores.len()
    }

    pub(crate) fn text(&self, id: u32) -> &[u8] {
        &self.texts[self.offsets[id as usize]..self.offsets[id as usize + 1]]
    }

    pub(crate) fn score(&self, id: u32) -> f32 {
        self.scores[id as usize]
    }

    pub(crate) fn byte_token(&self, b: u8) -> Option<u32> {
        self.bytes[b as usize]
    }

    /// The slot of `text`: where it is, or the empty slot where it would go.
    fn slot(&self, text: &[u8]) -> usize {
        let mask = self.slots.len() - 1;
        let mut i = (hash_text(text) >> self.shift) as usize;
        loop {
            let id = self.slots[i];
            if id == u32::MAX || self.text(id) == text {
                return i;
            }
            i = (i + 1) & mask;
        }
    }

    /// The id of the token whose text is exactly `text` (any token type, like llama.cpp's
    /// `text_to_token`).
    pub(crate) fn lookup(&self, text: &[u8]) -> Option<u32> {
        let id = self.slots[self.slot(text)];
        (id != u32::MAX).then_some(id)
    }

    /// Indexes the texts; fails on a duplicate text. Attributes are filled in by the caller.
    fn build(
        texts: Vec<u8>,
        offsets: Vec<usize>,
        scores: Vec<f32>,
    ) -> Result<Vocab, TokenizerError> {
        let n = scores.len();
        let size = (n * 2).next_power_of_two().max(2);
        let mut vocab = Vocab {
            texts,
            offsets,
            scores,
            attrs: Vec::new(),
            slots: vec![u32::MAX; size],
            shift: 64 - size.trailing_zeros(),
            bytes: [None; 256],
        };
        for id in 0..n as u32 {
            let slot = vocab.slot(vocab.text(id));
            match vocab.slots[slot] {
                u32::MAX => vocab.slots[slot] = id,
                first => {
                    return Err(TokenizerError::DuplicateToken {
                        text: String::from_utf8_lossy(vocab.text(id)).into_owned(),
                        first,
                        second: id,
                    })
                }
            }
        }
        Ok(vocab)
    }
}

/// The vocabulary type.
#[derive(Debug)]
enum Kind {
    Spm,
    Bpe(Box<bpe::BpeModel>),
}

/// A GGUF vocabulary, ready to encode and decode like llama.cpp.
pub struct Tokenizer {
    kind: Kind,
    vocab: Vocab,
    /// `llama_token_to_piece(special = true)` of every token, in one buffer.
    pieces: Vec<u8>,
    piece_offsets: Vec<usize>,
    /// Special-token candidates, longest text first.
    specials: Vec<Special>,
    /// End-of-generation ids, sorted.
    eog: Vec<u32>,
    bos: Option<u32>,
    eos: Option<u32>,
    eot: Option<u32>,
    unk: Option<u32>,
    add_bos: bool,
    add_eos: bool,
    add_space_prefix: bool,
    model: String,
    pre: String,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("model", &self.model)
            .field("pre", &self.pre)
            .field("vocab_size", &self.vocab.len())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("eot", &self.eot)
            .field("add_bos", &self.add_bos)
            .field("add_eos", &self.add_eos)
            .field("add_space_prefix", &self.add_space_prefix)
            .field("eog", &self.eog)
            .field("specials", &self.specials.len())
            .finish()
    }
}

// ---------------------------------------------------------------------------------------------
// Metadata access

fn wrong_type(key: &str, expected: &str, v: &Value) -> TokenizerError {
    TokenizerError::WrongType {
        key: key.into(),
        expected: expected.into(),
        found: v.type_description(),
    }
}

fn opt_str<'g>(g: &'g Gguf, key: &str) -> Result<Option<&'g str>, TokenizerError> {
    match g.get(key) {
        None => Ok(None),
        Some(v) => v
            .as_str()
            .map(Some)
            .ok_or_else(|| wrong_type(key, "a UTF-8 STRING", v)),
    }
}

fn opt_bool(g: &Gguf, key: &str) -> Result<Option<bool>, TokenizerError> {
    match g.get(key) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(v) => Err(wrong_type(key, "a BOOL", v)),
    }
}

fn opt_id(g: &Gguf, key: &str) -> Result<Option<u32>, TokenizerError> {
    match g.get(key) {
        None => Ok(None),
        Some(v @ Value::Bool(_)) => Err(wrong_type(key, "an unsigned integer", v)),
        Some(v) => v
            .as_integer()
            .and_then(|i| u32::try_from(i).ok())
            .map(Some)
            .ok_or_else(|| wrong_type(key, "an unsigned 32-bit integer", v)),
    }
}

fn opt_array<'g>(
    g: &'g Gguf,
    key: &str,
    n_tokens: usize,
) -> Result<Option<(ValueType, &'g [Value])>, TokenizerError> {
    let Some(v) = g.get(key) else {
        return Ok(None);
    };
    let (ty, items) = v.as_array().ok_or_else(|| wrong_type(key, "an ARRAY", v))?;
    if items.len() < n_tokens {
        return Err(TokenizerError::ShortArray {
            key: key.into(),
            len: items.len(),
            n_tokens,
        });
    }
    Ok(Some((ty, items)))
}

// ---------------------------------------------------------------------------------------------
// Token texts that llama.cpp recognises by name (llama-vocab.cpp, `load`)

const EOT_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "<｜end▁of▁sentence｜>",
    "<end_of_utterance>",
];
const EOM_TEXTS: &[&str] = &["<|eom_id|>"];
const FIM_PRE_TEXTS: &[&str] = &[
    "<|fim_prefix|>",
    "<fim-prefix>",
    "<fim_prefix>",
    "<｜fim▁begin｜>",
    "<PRE>",
    "▁<PRE>",
    "<|code_prefix|>",
    "<|prefix|>",
];
const FIM_SUF_TEXTS: &[&str] = &[
    "<|fim_suffix|>",
    "<fim-suffix>",
    "<fim_suffix>",
    "<｜fim▁hole｜>",
    "<SUF>",
    "▁<SUF>",
    "<|code_suffix|>",
    "<|suffix|>",
];
const FIM_MID_TEXTS: &[&str] = &[
    "<|fim_middle|>",
    "<fim-middle>",
    "<fim_middle>",
    "<｜fim▁end｜>",
    "<MID>",
    "▁<MID>",
    "<|code_middle|>",
    "<|middle|>",
];
const FIM_PAD_TEXTS: &[&str] = &["<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"];
const FIM_REP_TEXTS: &[&str] = &[
    "<|fim_repo|>",
    "<|repo_name|>",
    "<fim-repo>",
    "<REPO>",
    "<reponame>",
];
const FIM_SEP_TEXTS: &[&str] = &["<|file_sep|>"];
const EOG_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<|flush|>",
    "<|calls|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "</s>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "[EOS]",
    "<|end_of_text|>",
    "<end_of_utterance>",
    "<eos>",
    "<turn|>",
    "<|tool_response>",
    "<｜end▁of▁sentence｜>",
    "[e~[",
];
/// gpt-oss: always rendered, never control.
const FORCE_USER_DEFINED_TEXTS: &[&str] =
    &["<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"];

fn in_list(list: &[&str], text: &[u8]) -> bool {
    list.iter().any(|t| t.as_bytes() == text)
}

/// The value of a hex prefix, as C's `strtol(s, NULL, 16)` reads the `XX` of `<0xXX>`.
fn hex_prefix(s: &[u8]) -> u8 {
    let mut v: u32 = 0;
    for &b in s {
        let Some(d) = (b as char).to_digit(16) else {
            break;
        };
        v = v * 16 + d;
    }
    v as u8
}

/// GPT-2 byte-level text back to bytes (llama.cpp's `llama_decode_text`, including its marker
/// for characters outside the byte alphabet).
fn byte_decode(text: &[u8], out: &mut Vec<u8>) {
    let text = String::from_utf8_lossy(text);
    for c in text.chars() {
        match unicode::char_to_byte(c) {
            Some(b) => out.push(b),
            None => {
                out.extend_from_slice(b"[UNK_BYTE_0x");
                let mut buf = [0u8; 4];
                for b in c.encode_utf8(&mut buf).bytes() {
                    out.extend_from_slice(format!("{b:02x}").as_bytes());
                }
                out.extend_from_slice(text.as_bytes());
                out.push(b']');
            }
        }
    }
}

/// Special token ids, from the defaults per model type and the metadata.
#[derive(Debug, Clone, Copy, Default)]
struct SpecialIds {
    bos: Option<u32>,
    eos: Option<u32>,
    eot: Option<u32>,
    eom: Option<u32>,
    unk: Option<u32>,
    /// FIM prefix, suffix, middle, pad, repository, separator.
    fim: [Option<u32>; 6],
}

/// `tokenizer.ggml.tokens`, `.scores` and `.token_type`: the vocabulary and the attributes.
fn read_vocab(g: &Gguf) -> Result<(Vocab, Vec<u16>), TokenizerError> {
    let tokens_value = g
        .get(KEY_TOKENS)
        .ok_or_else(|| TokenizerError::MissingKey(KEY_TOKENS.into()))?;
    let tokens = match tokens_value.as_array() {
        Some((ValueType::String, items)) => items,
        _ => return Err(wrong_type(KEY_TOKENS, "an ARRAY[STRING]", tokens_value)),
    };
    let n = tokens.len();
    if n >= u32::MAX as usize {
        return Err(TokenizerError::TooManyTokens(n));
    }
    let scores = match opt_array(g, KEY_SCORES, n)? {
        None => vec![0.0; n],
        Some((ValueType::F32 | ValueType::I32, items)) => items[..n]
            .iter()
            .map(|v| v.as_f64().unwrap_or(0.0) as f32)
            .collect(),
        Some((ty, _)) => {
            return Err(TokenizerError::WrongType {
                key: KEY_SCORES.into(),
                expected: "an ARRAY[FLOAT32] or ARRAY[INT32]".into(),
                found: format!("ARRAY[{ty}]"),
            })
        }
    };
    let attrs = match opt_array(g, KEY_TYPES, n)? {
        None => vec![attr::NORMAL; n],
        Some((ty, items)) => items[..n]
            .iter()
            .map(|v| match v {
                Value::Bool(_) => None,
                v => v.as_integer().map(attr::from_token_type),
            })
            .collect::<Option<Vec<u16>>>()
            .ok_or_else(|| TokenizerError::WrongType {
                key: KEY_TYPES.into(),
                expected: "an ARRAY[INT32]".into(),
                found: format!("ARRAY[{ty}]"),
            })?,
    };

    let mut texts = Vec::new();
    let mut offsets = Vec::with_capacity(n + 1);
    offsets.push(0);
    for (i, v) in tokens.iter().enumerate() {
        let Value::String(s) = v else {
            return Err(wrong_type(KEY_TOKENS, "an ARRAY[STRING]", tokens_value));
        };
        if s.as_bytes().is_empty() {
            // llama.cpp's name for an empty entry.
            texts.extend_from_slice(format!("[EMPTY_{i}]").as_bytes());
        } else {
            texts.extend_from_slice(s.as_bytes());
        }
        offsets.push(texts.len());
    }
    Ok((Vocab::build(texts, offsets, scores)?, attrs))
}

/// The special ids: llama.cpp's defaults for the model type (dropped when out of range), then
/// the metadata's ids where they are in range.
fn read_special_ids(
    g: &Gguf,
    n: usize,
    is_spm: bool,
    no_bos: bool,
) -> Result<SpecialIds, TokenizerError> {
    let in_range = |id: u32| ((id as usize) < n).then_some(id);
    let mut ids = SpecialIds::default();
    if is_spm {
        (ids.bos, ids.eos, ids.unk) = (in_range(1), in_range(2), in_range(0));
    } else {
        (ids.bos, ids.eos) = (in_range(11), in_range(11));
    }
    if no_bos {
        ids.bos = None;
    }
    let set = |slot: &mut Option<u32>, key: &str| -> Result<(), TokenizerError> {
        if let Some(id) = opt_id(g, key)?.and_then(in_range) {
            *slot = Some(id);
        }
        Ok(())
    };
    set(&mut ids.bos, KEY_BOS)?;
    set(&mut ids.eos, KEY_EOS)?;
    set(&mut ids.eot, "tokenizer.ggml.eot_token_id")?;
    set(&mut ids.eom, "tokenizer.ggml.eom_token_id")?;
    set(&mut ids.unk, "tokenizer.ggml.unknown_token_id")?;
    // The deprecated prefix/suffix/middle keys come after the fim_* ones, as in llama.cpp.
    const FIM_KEYS: [&[&str]; 6] = [
        &[
            "tokenizer.ggml.fim_pre_token_id",
            "tokenizer.ggml.prefix_token_id",
        ],
        &[
            "tokenizer.ggml.fim_suf_token_id",
            "tokenizer.ggml.suffix_token_id",
        ],
        &[
            "tokenizer.ggml.fim_mid_token_id",
            "tokenizer.ggml.middle_token_id",
        ],
        &["tokenizer.ggml.fim_pad_token_id"],
        &["tokenizer.ggml.fim_rep_token_id"],
        &["tokenizer.ggml.fim_sep_token_id"],
    ];
    for (slot, keys) in ids.fim.iter_mut().zip(FIM_KEYS) {
        for key in keys {
            set(slot, key)?;
        }
    }
    Ok(ids)
}

/// llama.cpp's recognition by token text: unset EOT / EOM / FIM ids are found by name (those
/// tokens become control tokens), the end-of-generation set is built, and the gpt-oss,
/// o200k_harmony and gemma4 exceptions are applied. Returns the sorted end-of-generation ids.
fn mark_by_text(vocab: &Vocab, attrs: &mut [u16], ids: &mut SpecialIds) -> Vec<u32> {
    // llama.cpp walks a hash map, so when several texts of one list exist its pick is
    // arbitrary; we take the lowest id.
    {
        let [pre, suf, mid, pad, rep, sep] = &mut ids.fim;
        let mut detect: [(&mut Option<u32>, &[&str]); 8] = [
            (&mut ids.eot, EOT_TEXTS),
            (&mut ids.eom, EOM_TEXTS),
            (pre, FIM_PRE_TEXTS),
            (suf, FIM_SUF_TEXTS),
            (mid, FIM_MID_TEXTS),
            (pad, FIM_PAD_TEXTS),
            (rep, FIM_REP_TEXTS),
            (sep, FIM_SEP_TEXTS),
        ];
        for id in 0..vocab.len() as u32 {
            let text = vocab.text(id);
            for (slot, list) in detect.iter_mut() {
                if slot.is_none() && in_list(list, text) {
                    **slot = Some(id);
                    attrs[id as usize] |= attr::CONTROL;
                }
            }
        }
    }

    let mut eog: Vec<u32> = ids.fim[3..].iter().flatten().copied().collect();
    for id in 0..vocab.len() as u32 {
        let text = vocab.text(id);
        if in_list(EOG_TEXTS, text) {
            eog.push(id);
            attrs[id as usize] |= attr::CONTROL;
        }
        if in_list(FORCE_USER_DEFINED_TEXTS, text) {
            attrs[id as usize] = attr::USER_DEFINED;
        }
    }
    eog.extend([ids.eos, ids.eot, ids.eom].into_iter().flatten());
    eog.sort_unstable();
    eog.dedup();

    let find = |eog: &[u32], name: &str| {
        eog.iter()
            .copied()
            .find(|&id| vocab.text(id) == name.as_bytes())
    };
    let has = |eog: &[u32], name: &str| find(eog, name).is_some();
    // o200k_harmony / solar-open: "<|end|>" is not an end of generation there.
    if let Some(end) = find(&eog, "<|end|>") {
        let call = has(&eog, "<|call|>") || has(&eog, "<|calls|>");
        if call && (has(&eog, "<|return|>") || has(&eog, "<|flush|>")) {
            eog.retain(|&id| id != end);
            attrs[end as usize] = attr::USER_DEFINED;
        }
    }
    // gemma4 / paddleocr / plamo: "</s>" is not an end of generation when "<|tool_response>"
    // or "<|plamo:eos|>" is.
    if has(&eog, "<|tool_response>") || has(&eog, "<|plamo:eos|>") {
        if let Some(s) = find(&eog, "</s>") {
            eog.retain(|&id| id != s);
            attrs[s as usize] = attr::NORMAL;
        }
    }
    eog
}

/// llama.cpp's per-model LSTRIP / RSTRIP attributes, chosen by `tokenizer.ggml.pre`,
/// `general.architecture` and `general.name`.
fn apply_strip_rules(
    g: &Gguf,
    pre: &str,
    vocab: &Vocab,
    attrs: &mut [u16],
    special_ids: &[u32],
) -> Result<(), TokenizerError> {
    let name = opt_str(g, "general.name")?
        .unwrap_or("")
        .to_ascii_lowercase();
    let arch = opt_str(g, "general.architecture")?.unwrap_or("");
    let contains_any = |s: &str, subs: &[&str]| subs.iter().any(|x| s.contains(x));
    let set = |attrs: &mut [u16], text: &str, flag: u16, on: bool| {
        if let Some(id) = vocab.lookup(text.as_bytes()) {
            let a = &mut attrs[id as usize];
            *a = if on { *a | flag } else { *a & !flag };
        }
    };
    if contains_any(pre, &["jina-v2-de", "jina-v2-es", "jina-v2-code"])
        || contains_any(arch, &["nomic-bert-moe", "jina-bert-v3"])
    {
        set(attrs, "<mask>", attr::LSTRIP, true);
    } else if contains_any(&name, &["phi-3", "phi3"]) {
        for &id in special_ids {
            attrs[id as usize] |= attr::RSTRIP;
        }
        set(attrs, "</s>", attr::RSTRIP, true);
        for t in ["<unk>", "<s>", "<|endoftext|>"] {
            set(attrs, t, attr::RSTRIP, false);
        }
    } else if contains_any(&name, &["modern-bert"]) {
        set(attrs, "[MASK]", attr::LSTRIP, true);
    }
    Ok(())
}

/// `tokenizer.ggml.merges` (required for BPE vocabularies).
fn read_merges(g: &Gguf) -> Result<Vec<&[u8]>, TokenizerError> {
    let v = g
        .get(KEY_MERGES)
        .ok_or_else(|| TokenizerError::MissingKey(KEY_MERGES.into()))?;
    match v.as_array() {
        Some((ValueType::String, items)) => Ok(items
            .iter()
            .map(|m| match m {
                Value::String(s) => s.as_bytes(),
                _ => &[],
            })
            .collect()),
        _ => Err(wrong_type(KEY_MERGES, "an ARRAY[STRING]", v)),
    }
}

impl Tokenizer {
    /// Reads the vocabulary from GGUF metadata (`tokenizer.ggml.*`) with llama.cpp's rules.
    pub fn from_gguf(g: &Gguf) -> Result<Tokenizer, TokenizerError> {
        let model = opt_str(g, KEY_MODEL)?
            .ok_or_else(|| TokenizerError::MissingKey(KEY_MODEL.into()))?
            .to_string();
        let pre = opt_str(g, KEY_PRE)?.unwrap_or("").to_string();

        let is_spm = match model.as_str() {
            "llama" => true,
            "gpt2" => false,
            other => return Err(TokenizerError::UnknownModel(other.into())),
        };
        let pre_cfg = if is_spm {
            None // llama.cpp ignores tokenizer.ggml.pre for SentencePiece vocabularies
        } else {
            match pretok::pre_config(&pre) {
                Some(cfg) => Some(cfg),
                None if pretok::is_known_unsupported(&pre) => {
                    return Err(TokenizerError::UnsupportedPre(pre))
                }
                None => return Err(TokenizerError::UnknownPre(pre)),
            }
        };

        let (mut vocab, mut attrs) = read_vocab(g)?;
        let n = vocab.len();
        let mut ids = read_special_ids(g, n, is_spm, pre_cfg.is_some_and(|c| c.no_bos))?;

        // Flags: llama.cpp's defaults per model type, then the metadata.
        let mut add_bos = match pre_cfg {
            None => true,
            Some(cfg) => cfg.add_bos,
        };
        let mut add_eos = false;
        let mut add_space_prefix = is_spm;
        if let Some(b) = opt_bool(g, KEY_ADD_BOS)? {
            add_bos = b;
        }
        if let Some(b) = opt_bool(g, KEY_ADD_EOS)? {
            add_eos = b;
        }
        if let Some(b) = opt_bool(g, KEY_ADD_PREFIX)? {
            add_space_prefix = b;
        }
        if add_bos && ids.bos.is_none() {
            return Err(TokenizerError::MissingSpecialToken {
                add_key: KEY_ADD_BOS,
                id_key: KEY_BOS,
            });
        }
        if add_eos && ids.eos.is_none() {
            return Err(TokenizerError::MissingSpecialToken {
                add_key: KEY_ADD_EOS,
                id_key: KEY_EOS,
            });
        }

        let eog = mark_by_text(&vocab, &mut attrs, &mut ids);

        // Special-token candidates: control, user-defined and unknown tokens.
        let mut special_ids: Vec<u32> = (0..n as u32)
            .filter(|&id| {
                attrs[id as usize] & (attr::CONTROL | attr::USER_DEFINED | attr::UNKNOWN) != 0
            })
            .collect();
        apply_strip_rules(g, &pre, &vocab, &mut attrs, &special_ids)?;
        // Longest first, ties in the order llama.cpp's unstable sort leaves them.
        special::sort_like_llama_cpp(&mut special_ids, |&id| vocab.text(id).len());
        let specials: Vec<Special> = special_ids
            .iter()
            .filter_map(|&id| {
                // A text that is not UTF-8 cannot be matched in a Rust string.
                let text = std::str::from_utf8(vocab.text(id)).ok()?;
                let a = attrs[id as usize];
                Some(Special {
                    id,
                    text: text.to_string(),
                    needs_parse_special: a & (attr::CONTROL | attr::UNKNOWN) != 0,
                    lstrip: a & attr::LSTRIP != 0,
                    rstrip: a & attr::RSTRIP != 0,
                })
            })
            .collect();

        if is_spm {
            // Byte fallback: `<0xXX>`, else the one-byte text.
            for b in 0..=255u8 {
                vocab.bytes[b as usize] = vocab
                    .lookup(format!("<0x{b:02X}>").as_bytes())
                    .or_else(|| vocab.lookup(&[b]));
            }
        }
        vocab.attrs = attrs;

        let kind = match pre_cfg {
            None => Kind::Spm,
            Some(cfg) => {
                let merges = read_merges(g)?;
                let texts = (0..n as u32).map(|id| std::str::from_utf8(vocab.text(id)).ok());
                Kind::Bpe(Box::new(bpe::BpeModel::new(
                    texts,
                    merges.into_iter(),
                    &cfg,
                )?))
            }
        };

        let mut tok = Tokenizer {
            kind,
            vocab,
            pieces: Vec::new(),
            piece_offsets: Vec::new(),
            specials,
            eog,
            bos: ids.bos,
            eos: ids.eos,
            eot: ids.eot,
            unk: ids.unk,
            add_bos,
            add_eos,
            add_space_prefix,
            model,
            pre,
        };
        tok.build_pieces();
        Ok(tok)
    }

    /// `llama_token_to_piece(special = true)` of every token.
    fn build_pieces(&mut self) {
        let is_spm = matches!(self.kind, Kind::Spm);
        let mut pieces = Vec::with_capacity(self.vocab.texts.len());
        let mut offsets = Vec::with_capacity(self.vocab.len() + 1);
        offsets.push(0);
        for id in 0..self.vocab.len() as u32 {
            let a = self.vocab.attrs[id as usize];
            let text = self.vocab.text(id);
            if a & (attr::UNKNOWN | attr::CONTROL | attr::USER_DEFINED) != 0 {
                pieces.extend_from_slice(text);
            } else if a & attr::NORMAL != 0 {
                if is_spm {
                    let mut rest = text;
                    while let Some(p) = find_bytes(rest, SPM_SPACE.as_bytes()) {
                        pieces.extend_from_slice(&rest[..p]);
                        pieces.push(b' ');
                        rest = &rest[p + SPM_SPACE.len()..];
                    }
                    pieces.extend_from_slice(rest);
                } else {
                    byte_decode(text, &mut pieces);
                }
            } else if a & attr::BYTE != 0 {
                // The two characters after "<0x", as llama.cpp's `token_to_byte` reads them.
                let digits = &text[text.len().min(3)..text.len().min(5)];
                pieces.push(hex_prefix(digits));
            }
            // Unused and undefined tokens have an empty piece.
            offsets.push(pieces.len());
        }
        self.pieces = pieces;
        self.piece_offsets = offsets;
    }

    /// Tokenizes like `llama_tokenize`: with `add_special`, BOS / EOS are added as the
    /// vocabulary says (`add_bos` / `add_eos`); with `parse_special`, control tokens written in
    /// the text (e.g. `<|im_end|>`) become those tokens. User-defined tokens are always
    /// recognised.
    pub fn encode(
        &self,
        text: &str,
        add_special: bool,
        parse_special: bool,
    ) -> Result<Vec<u32>, TokenizerError> {
        let fragments = special::partition(text, &self.specials, parse_special);
        let mut out = Vec::with_capacity(text.len() / 3 + 2);
        if add_special && self.add_bos {
            out.extend(self.bos);
        }
        match &self.kind {
            Kind::Spm => {
                // A space prefix goes before text at the start or right after a special token.
                let mut after_special = true;
                let mut buf = String::new();
                for fragment in &fragments {
                    match fragment {
                        Fragment::Text(range) => {
                            buf.clear();
                            if self.add_space_prefix && after_special {
                                buf.push(' ');
                            }
                            buf.push_str(&text[range.clone()]);
                            let escaped = buf.replace(' ', SPM_SPACE);
                            spm::tokenize(&self.vocab, &escaped, &mut out);
                            after_special = false;
                        }
                        Fragment::Token(id) => {
                            out.push(*id);
                            after_special = true;
                        }
                    }
                }
            }
            Kind::Bpe(model) => {
                for fragment in &fragments {
                    match fragment {
                        Fragment::Text(range) => model.tokenize(&text[range.clone()], &mut out)?,
                        Fragment::Token(id) => out.push(*id),
                    }
                }
            }
        }
        if add_special && self.add_eos {
            out.extend(self.eos);
        }
        Ok(out)
    }

    /// The bytes of one token as `llama_token_to_piece(special = true)` gives them: byte tokens
    /// `<0x0A>` give the byte, SentencePiece `▁` gives a space, byte-level BPE text gives the raw
    /// bytes, control and user-defined tokens give their text. Empty for an id out of range.
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        let i = id as usize;
        if i + 1 >= self.piece_offsets.len() {
            return &[];
        }
        &self.pieces[self.piece_offsets[i]..self.piece_offsets[i + 1]]
    }

    /// The concatenated bytes of the tokens, as lossy UTF-8 (special tokens included as text).
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut bytes = Vec::new();
        for &id in ids {
            bytes.extend_from_slice(self.token_bytes(id));
        }
        match String::from_utf8(bytes) {
            Ok(s) => s,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        }
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab.len()
    }

    pub fn bos(&self) -> Option<u32> {
        self.bos
    }

    pub fn eos(&self) -> Option<u32> {
        self.eos
    }

    /// End of turn (`<|im_end|>`, `<end_of_turn>`, `<|eot_id|>`, ...), from metadata or found by
    /// text.
    pub fn eot(&self) -> Option<u32> {
        self.eot
    }

    pub fn unk(&self) -> Option<u32> {
        self.unk
    }

    /// Whether `encode(.., add_special = true, ..)` starts with BOS.
    pub fn add_bos(&self) -> bool {
        self.add_bos
    }

    /// Whether `encode(.., add_special = true, ..)` ends with EOS.
    pub fn add_eos(&self) -> bool {
        self.add_eos
    }

    /// End of generation, as `llama_vocab_is_eog`: EOS, EOT, EOM, the FIM pad/repo/separator
    /// tokens and the tokens llama.cpp recognises by text (`<|im_end|>`, `<end_of_turn>`,
    /// `<|eot_id|>`, `<|endoftext|>`, `</s>`, ...).
    pub fn is_eog(&self, id: u32) -> bool {
        self.eog.binary_search(&id).is_ok()
    }

    /// All end-of-generation ids, sorted.
    pub fn eog_ids(&self) -> &[u32] {
        &self.eog
    }

    /// Whether `id` is a control token (its piece is markup, not text), as llama.cpp marks them.
    pub fn is_control(&self, id: u32) -> bool {
        self.vocab
            .attrs
            .get(id as usize)
            .is_some_and(|a| a & attr::CONTROL != 0)
    }

    /// The id of the token whose vocabulary text is exactly `text` (e.g. `"<|im_end|>"`).
    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.vocab.lookup(text.as_bytes())
    }

    /// The raw vocabulary text of a token (`▁`-escaped or byte-level encoded as stored).
    pub fn token_text(&self, id: u32) -> Option<&[u8]> {
        ((id as usize) < self.vocab.len()).then(|| self.vocab.text(id))
    }

    /// `tokenizer.ggml.model` ("gpt2" or "llama").
    pub fn model_type(&self) -> &str {
        &self.model
    }
}

fn find_bytes(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests;
