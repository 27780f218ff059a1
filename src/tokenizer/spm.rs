//! SentencePiece-style BPE driven by scores (`tokenizer.ggml.model = "llama"`), as llama.cpp
//! runs it.
//!
//! The text (spaces already escaped to `▁`) starts as one symbol per code point. Repeatedly, of
//! all adjacent pairs whose concatenation is a vocabulary entry, the one whose entry has the
//! highest score is merged (the leftmost among equal scores). At the end every symbol that is a
//! vocabulary entry becomes that token; any other (a single code point unknown to the vocabulary)
//! becomes its UTF-8 bytes as byte tokens `<0xXX>`.
//!
//! Implemented here rather than with `tokenizers`: its BPE model merges by *rank* from an
//! explicit merge list, and its Unigram model picks the most probable segmentation (Viterbi);
//! neither reproduces this greedy score-ordered merging over a vocabulary with scores and no
//! merge list, which is what a GGUF `llama` vocabulary provides.

use std::collections::BinaryHeap;

use super::Vocab;

#[derive(Clone, Copy)]
struct Symbol {
    /// Byte range in the text.
    start: usize,
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

/// A candidate merge of the symbols `left` and `right` (adjacent when queued).
struct Bigram {
    score: f32,
    left: usize,
    right: usize,
    /// Combined length when queued; a mismatch later means one side has changed.
    len: usize,
}

impl PartialEq for Bigram {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other).is_eq()
    }
}
impl Eq for Bigram {}
impl PartialOrd for Bigram {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Bigram {
    /// The greatest bigram is merged first: highest score, then leftmost.
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.score
            .total_cmp(&other.score)
            .then_with(|| other.left.cmp(&self.left))
    }
}

/// Appends the tokens of `text` (whitespace already escaped).
pub(crate) fn tokenize(vocab: &Vocab, text: &str, out: &mut Vec<u32>) {
    let bytes = text.as_bytes();
    let mut symbols: Vec<Symbol> = Vec::with_capacity(text.len());
    for (i, (start, c)) in text.char_indices().enumerate() {
        symbols.push(Symbol {
            start,
            len: c.len_utf8(),
            prev: i.checked_sub(1),
            next: Some(i + 1),
        });
    }
    if let Some(last) = symbols.last_mut() {
        last.next = None;
    }

    let mut queue = BinaryHeap::new();
    let try_add =
        |queue: &mut BinaryHeap<Bigram>, symbols: &[Symbol], left: usize, right: usize| {
            let (l, r) = (symbols[left], symbols[right]);
            let piece = &bytes[l.start..l.start + l.len + r.len];
            if let Some(id) = vocab.lookup(piece) {
                queue.push(Bigram {
                    score: vocab.score(id),
                    left,
                    right,
                    len: piece.len(),
                });
            }
        };
    for i in 1..symbols.len() {
        try_add(&mut queue, &symbols, i - 1, i);
    }

    while let Some(bigram) = queue.pop() {
        let (left, right) = (symbols[bigram.left], symbols[bigram.right]);
        // Skip merges made stale by an earlier merge of either side.
        if left.len == 0 || right.len == 0 || left.len + right.len != bigram.len {
            continue;
        }
        symbols[bigram.left].len += right.len;
        symbols[bigram.left].next = right.next;
        symbols[bigram.right].len = 0;
        if let Some(next) = right.next {
            symbols[next].prev = Some(bigram.left);
        }
        if let Some(prev) = left.prev {
            try_add(&mut queue, &symbols, prev, bigram.left);
        }
        if let Some(next) = right.next {
            try_add(&mut queue, &symbols, bigram.left, next);
        }
    }

    let mut i = if symbols.is_empty() { None } else { Some(0) };
    while let Some(at) = i {
        let s = symbols[at];
        let piece = &bytes[s.start..s.start + s.len];
        match vocab.lookup(piece) {
            Some(id) => out.push(id),
            None => {
                // Only a single code point can be unknown: merges only ever form entries.
                out.extend(piece.iter().filter_map(|&b| vocab.byte_token(b)));
            }
        }
        i = s.next;
    }
}
