//! Byte-level BPE (`tokenizer.ggml.model = "gpt2"`): llama.cpp's pre-tokenizer (see
//! [`super::pretok`]), GPT-2's byte-to-character mapping, then merges by rank.
//!
//! The merging itself is `tokenizers`' BPE model: like llama.cpp it repeatedly merges the
//! adjacent pair with the lowest rank, the leftmost first among equal ranks, and with
//! `ignore_merges` a word that is itself a vocabulary entry becomes that token directly. Two
//! differences in how the vocabulary is given are bridged here:
//! - llama.cpp keeps the *first* of duplicate merge lines (`emplace`); `tokenizers` would keep
//!   the last, so duplicates are dropped before building;
//! - `tokenizers` requires both halves and the result of every merge to be vocabulary entries.
//!   llama.cpp does not check, but a merge whose result is not a token can only produce a symbol
//!   that llama.cpp then cannot emit, so such lines are dropped (files converted from Hugging Face
//!   tokenizers never have them).

use std::collections::{HashMap, HashSet};

use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::Model;

use super::pretok::{PreConfig, PreTokenizer};
use super::unicode::byte_encode;
use super::TokenizerError;

pub(crate) struct BpeModel {
    model: BPE,
    pre: PreTokenizer,
}

impl std::fmt::Debug for BpeModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BpeModel")
            .field("model", &self.model)
            .field("pre", &self.pre)
            .finish()
    }
}

impl BpeModel {
    /// `tokens` are the vocabulary texts by id (`None` for a text that is not UTF-8, which no
    /// merge can produce); `merges` the lines of `tokenizer.ggml.merges` ("left right").
    pub(crate) fn new<'a>(
        tokens: impl Iterator<Item = Option<&'a str>>,
        merges: impl Iterator<Item = &'a [u8]>,
        cfg: &PreConfig,
    ) -> Result<BpeModel, TokenizerError> {
        let pre = PreTokenizer::new(cfg.regexes)
            .map_err(|(regex, message)| TokenizerError::Regex { regex, message })?;

        let mut ids: HashMap<&str, u32> = HashMap::new();
        for (id, text) in tokens.enumerate() {
            if let Some(text) = text {
                ids.insert(text, id as u32);
            }
        }
        let mut seen: HashSet<(&str, &str)> = HashSet::new();
        let mut pairs: Vec<(String, String)> = Vec::new();
        let mut joined = String::new();
        for line in merges {
            // llama.cpp splits at the first space after the first byte; a line without one
            // cannot match any pair.
            let Some(space) = line.iter().skip(1).position(|&b| b == b' ').map(|p| p + 1) else {
                continue;
            };
            let (Ok(left), Ok(right)) = (
                std::str::from_utf8(&line[..space]),
                std::str::from_utf8(&line[space + 1..]),
            ) else {
                continue;
            };
            if !seen.insert((left, right)) {
                continue;
            }
            joined.clear();
            joined.push_str(left);
            joined.push_str(right);
            if ids.contains_key(left) && ids.contains_key(right) && ids.contains_key(&*joined) {
                pairs.push((left.to_string(), right.to_string()));
            }
        }

        let vocab: Vocab = ids.iter().map(|(&t, &id)| (t.to_string(), id)).collect();
        let model = BPE::builder()
            .vocab_and_merges(vocab, pairs)
            .ignore_merges(cfg.ignore_merges)
            .build()
            .map_err(|e| TokenizerError::Merges(e.to_string()))?;
        Ok(BpeModel { model, pre })
    }

    /// Appends the tokens of a piece of text (no special tokens in it).
    pub(crate) fn tokenize(&self, text: &str, out: &mut Vec<u32>) -> Result<(), TokenizerError> {
        let mut encoded = String::new();
        for word in self.pre.split(text) {
            byte_encode(&text[word], &mut encoded);
            let tokens = self
                .model
                .tokenize(&encoded)
                .map_err(|e| TokenizerError::Bpe(e.to_string()))?;
            out.extend(tokens.iter().map(|t| t.id));
        }
        Ok(())
    }
}
