//! Pre-tokenization of byte-level BPE vocabularies: splitting text into words before merging.
//!
//! `tokenizer.ggml.pre` names a list of regexes. As in llama.cpp, they are applied one after the
//! other: each regex splits every piece left by the previous one, and the text between two
//! matches becomes a piece of its own (nothing is dropped). Two regexes are not run as regexes
//! but by hand-written scanners, because llama.cpp does the same and its scanners *define* the
//! behaviour we must reproduce: the GPT-2 pattern and the Llama-3 pattern (see [`gpt2_split`] and
//! [`llama3_split`]). Every other regex runs through `tokenizers`' regex engine (fancy-regex,
//! which supports the look-aheads these patterns use).
//!
//! Why not `tokenizers`' own `Split`/`ByteLevel` pre-tokenizers: llama.cpp does not use the
//! patterns of `tokenizer.json` but its own list per `pre` value (several patterns in sequence,
//! with the gaps between matches kept as pieces), so the split points differ from a single
//! `Split` over the original pattern.

use std::ops::Range;

use tokenizers::utils::SysRegex;

use super::unicode::{is_letter, is_number, is_whitespace};

/// GPT-2's pattern; llama.cpp runs it with a hand-written scanner.
pub(crate) const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
/// Llama 3's pattern (case-insensitive contractions spelled out); scanned by hand as well.
pub(crate) const LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Llama 3's pattern as written in its tokenizer.json (also recognised as the scanner).
const LLAMA3_ORIGINAL: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN35: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const PUNCT_RUN: &str = r"[\p{P}\$\+<=>\^~\|]+";
const TEKKEN: &str = r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const GPT4O: &str = r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const SEED_CODER: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+|\s+(?!\S)|\s+";
const UFAKZEKA: &str =
    r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const MINICPM5: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}+| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const BLOOM: &str = r" ?[^(\s|.,!?…。，、।۔،)]+";

/// What a `tokenizer.ggml.pre` value means for a byte-level BPE vocabulary (llama.cpp's table).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct PreConfig {
    /// The regexes, applied in order.
    pub regexes: &'static [&'static str],
    /// A word that is a whole vocabulary entry becomes that token without merging.
    pub ignore_merges: bool,
    /// The default of `add_bos` when `tokenizer.ggml.add_bos_token` is absent.
    pub add_bos: bool,
    /// The model has no BOS token by default (llama.cpp's ChatGLM handling).
    pub no_bos: bool,
}

impl PreConfig {
    const fn new(regexes: &'static [&'static str]) -> PreConfig {
        PreConfig {
            regexes,
            ignore_merges: false,
            add_bos: false,
            no_bos: false,
        }
    }
}

/// The pre-tokenizer for a `tokenizer.ggml.pre` value (`None` when the value is unknown or
/// names a pre-tokenizer that moa does not implement). A missing key means `"default"`.
pub(crate) fn pre_config(pre: &str) -> Option<PreConfig> {
    const DEFAULT: PreConfig =
        PreConfig::new(&[PUNCT_RUN, GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"]);
    const LLAMA3_CFG: PreConfig = PreConfig {
        ignore_merges: true,
        add_bos: true,
        ..PreConfig::new(&[LLAMA3])
    };
    Some(match pre {
        "" | "default" => DEFAULT,
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0"
        | "lfm2" | "jina-v5-nano" => LLAMA3_CFG,
        "dbrx" | "smaug-bpe" => PreConfig::new(&[LLAMA3]),
        "glm4" | "chatglm-bpe" => PreConfig {
            no_bos: true,
            ..PreConfig::new(&[LLAMA3])
        },
        // "gpt2" is not a llama.cpp name (it writes "gpt-2"); accepted as an alias.
        "gpt-2" | "gpt2" | "phi-2" | "jina-es" | "jina-de" | "gigachat" | "jina-v2-es"
        | "jina-v2-de" | "a.x-4.0" | "mellum" | "modern-bert" | "jina-v1-en" | "jina-v2-code"
        | "roberta-bpe" | "exaone4" | "mpt" | "olmo" | "jais" | "trillion" | "granite-docling" => {
            PreConfig::new(&[GPT2])
        }
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b"
        | "mellum2" => PreConfig::new(&[r"\p{N}", GPT2]),
        "falcon" => PreConfig::new(&[PUNCT_RUN, GPT2, r"[0-9][0-9][0-9]"]),
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "megrez" | "stablelm2" | "hunyuan"
        | "solar-open" | "grok-2" => PreConfig::new(&[QWEN2]),
        "qwen35" => PreConfig::new(&[QWEN35]),
        "deepseek-coder" => PreConfig::new(&[
            r"[\r\n]",
            r"\s?\p{L}+",
            r"\s?\p{P}+",
            r"[一-龥ࠀ-一가-퟿]+",
            r"\p{N}",
        ]),
        "seed-coder" => PreConfig::new(&[SEED_CODER]),
        "ufakzeka" => PreConfig::new(&[UFAKZEKA]),
        "tekken" => PreConfig {
            ignore_merges: true,
            add_bos: true,
            ..PreConfig::new(&[TEKKEN])
        },
        "gpt-4o" | "llama4" | "kanana2" | "talkie" | "minimax-m2" => PreConfig::new(&[GPT4O]),
        "minicpm5" => PreConfig {
            ignore_merges: true,
            ..PreConfig::new(&[r"\p{N}{1,3}", MINICPM5])
        },
        "poro-chat" | "bloom" | "gpt3-finnish" => PreConfig::new(&[BLOOM]),
        "viking" => PreConfig::new(&[BLOOM, r"\p{N}"]),
        _ => return None,
    })
}

/// `tokenizer.ggml.pre` values llama.cpp knows that moa does not implement: their patterns
/// depend on details of llama.cpp's regex emulation that fancy-regex does not share, or they need
/// tokenizer code of their own.
pub(crate) fn is_known_unsupported(pre: &str) -> bool {
    matches!(
        pre,
        "deepseek-llm"
            | "deepseek-v3"
            | "hunyuan-dense"
            | "joyai-llm"
            | "hy_v4"
            | "spark2_5"
            | "youtu"
            | "jais-2"
            | "gemma4"
            | "granite-embed-multi-311m"
            | "sarvam-moe"
            | "whitespace"
            | "chameleon"
            | "granite-embed-multi-97m"
            | "tiny_aya"
            | "cohere2moe"
            | "superbpe"
            | "bailingmoe"
            | "bailingmoe2"
            | "llada-moe"
            | "kimi-k2"
            | "afmoe"
            | "laguna"
            | "exaone-moe"
    )
}

enum Pass {
    Gpt2,
    Llama3,
    Regex(SysRegex),
}

/// A compiled list of pre-tokenizer regexes.
pub(crate) struct PreTokenizer {
    passes: Vec<Pass>,
}

impl std::fmt::Debug for PreTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreTokenizer")
            .field("passes", &self.passes.len())
            .finish()
    }
}

impl PreTokenizer {
    pub(crate) fn new(regexes: &[&str]) -> Result<PreTokenizer, (String, String)> {
        let passes = regexes
            .iter()
            .map(|&re| match re {
                GPT2 => Ok(Pass::Gpt2),
                LLAMA3 | LLAMA3_ORIGINAL => Ok(Pass::Llama3),
                _ => SysRegex::new(re)
                    .map(Pass::Regex)
                    .map_err(|e| (re.to_string(), e.to_string())),
            })
            .collect::<Result<_, _>>()?;
        Ok(PreTokenizer { passes })
    }

    /// Splits `text` into words (non-empty byte ranges that cover it in order).
    pub(crate) fn split(&self, text: &str) -> Vec<Range<usize>> {
        let mut pieces = if text.is_empty() {
            Vec::new()
        } else {
            vec![0..text.len()]
        };
        let mut next = Vec::new();
        for pass in &self.passes {
            next.clear();
            for piece in &pieces {
                let sub = &text[piece.clone()];
                let base = piece.start;
                match pass {
                    Pass::Gpt2 => gpt2_split(sub, base, &mut next),
                    Pass::Llama3 => llama3_split(sub, base, &mut next),
                    Pass::Regex(re) => regex_split(re, sub, base, &mut next),
                }
            }
            std::mem::swap(&mut pieces, &mut next);
        }
        pieces
    }
}

/// Matches and the gaps between them, each as a piece.
fn regex_split(re: &SysRegex, text: &str, base: usize, out: &mut Vec<Range<usize>>) {
    let mut prev = 0;
    for (start, end) in re.find_iter(text) {
        if start > prev {
            out.push(base + prev..base + start);
        }
        if end > start {
            out.push(base + start..base + end);
        }
        prev = prev.max(end);
    }
    if prev < text.len() {
        out.push(base + prev..base + text.len());
    }
}

/// What a scanner needs to know about one code point.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Class {
    Letter,
    Number,
    Space,
    /// Anything else: `[^\s\p{L}\p{N}]`.
    Other,
    /// Past the end of the piece.
    End,
}

/// The code points of a piece with their byte offsets, for the scanners.
struct Scan {
    chars: Vec<char>,
    /// `offsets[i]` is the byte offset of `chars[i]`; `offsets[len]` is the piece's length.
    offsets: Vec<usize>,
}

impl Scan {
    fn new(text: &str) -> Scan {
        let mut chars = Vec::with_capacity(text.len());
        let mut offsets = Vec::with_capacity(text.len() + 1);
        for (i, c) in text.char_indices() {
            chars.push(c);
            offsets.push(i);
        }
        offsets.push(text.len());
        Scan { chars, offsets }
    }

    fn len(&self) -> usize {
        self.chars.len()
    }

    fn get(&self, i: usize) -> Option<char> {
        self.chars.get(i).copied()
    }

    fn class(&self, i: usize) -> Class {
        match self.get(i) {
            None => Class::End,
            Some(c) if is_whitespace(c) => Class::Space,
            Some(c) if is_letter(c) => Class::Letter,
            Some(c) if is_number(c) => Class::Number,
            Some(_) => Class::Other,
        }
    }

    fn is(&self, i: usize, class: Class) -> bool {
        self.class(i) == class
    }

    /// The length of an apostrophe contraction (`'s`, `'t`, `'m`, `'d`, `'re`, `'ve`, `'ll`)
    /// at `pos`, or 0.
    fn contraction(&self, pos: usize, fold_case: bool) -> usize {
        if self.get(pos) != Some('\'') {
            return 0;
        }
        let at = |i: usize| {
            self.get(i).map(|c| {
                if fold_case {
                    c.to_ascii_lowercase()
                } else {
                    c
                }
            })
        };
        match (at(pos + 1), at(pos + 2)) {
            (Some('s' | 't' | 'm' | 'd'), _) => 2,
            (Some('r' | 'v'), Some('e')) | (Some('l'), Some('l')) => 3,
            _ => 0,
        }
    }

    /// The end of a run of whitespace starting at `pos` (`pos` when there is none), and the
    /// position just after the last `\r` or `\n` in it (0 when there is none).
    fn whitespace_run(&self, pos: usize) -> (usize, usize) {
        let mut end = pos;
        let mut after_newline = 0;
        while self.is(end, Class::Space) {
            if matches!(self.chars[end], '\r' | '\n') {
                after_newline = end + 1;
            }
            end += 1;
        }
        (end, after_newline)
    }

    /// Where a run of whitespace starting at `pos` ends as a word: `\s+(?!\S)` keeps the last
    /// whitespace for the next word when something follows; a lone whitespace is its own word;
    /// with no whitespace at all the single code point at `pos` is a word.
    fn whitespace_word_end(&self, pos: usize) -> usize {
        let (end, _) = self.whitespace_run(pos);
        let n = end - pos;
        if n > 1 && end < self.len() {
            end - 1
        } else if n > 0 {
            end
        } else {
            pos + 1
        }
    }

    fn skip(&self, mut pos: usize, class: Class) -> usize {
        while self.is(pos, class) {
            pos += 1;
        }
        pos
    }
}

/// Collects words as byte ranges from code point positions.
struct Words<'a> {
    scan: &'a Scan,
    base: usize,
    out: &'a mut Vec<Range<usize>>,
}

impl Words<'_> {
    fn push(&mut self, from: usize, to: usize) -> usize {
        if to > from {
            let o = &self.scan.offsets;
            self.out.push(self.base + o[from]..self.base + o[to]);
        }
        to
    }
}

/// The GPT-2 pattern `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)`,
/// scanned by hand as llama.cpp does. A code point that no alternative matches (a lone
/// whitespace before a non-space) is a word by itself, like the gaps of a regex split.
pub(crate) fn gpt2_split(text: &str, base: usize, out: &mut Vec<Range<usize>>) {
    let scan = Scan::new(text);
    let mut words = Words {
        scan: &scan,
        base,
        out,
    };
    let n = scan.len();
    let mut pos = 0;
    while pos < n {
        let len = scan.contraction(pos, false);
        if len > 0 {
            pos = words.push(pos, pos + len);
            continue;
        }
        // An optional leading space, then a run of one class.
        let first = pos + usize::from(scan.chars[pos] == ' ');
        let class = scan.class(first);
        if matches!(class, Class::Letter | Class::Number | Class::Other) {
            pos = words.push(pos, scan.skip(first, class));
            continue;
        }
        let end = scan.whitespace_word_end(pos);
        pos = words.push(pos, end);
    }
}

/// The Llama-3 pattern
/// `(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`,
/// scanned by hand as llama.cpp does.
pub(crate) fn llama3_split(text: &str, base: usize, out: &mut Vec<Range<usize>>) {
    let scan = Scan::new(text);
    let mut words = Words {
        scan: &scan,
        base,
        out,
    };
    let n = scan.len();
    let mut pos = 0;
    while pos < n {
        let c = scan.chars[pos];
        let len = scan.contraction(pos, true);
        if len > 0 {
            pos = words.push(pos, pos + len);
            continue;
        }
        // [^\r\n\p{L}\p{N}]?\p{L}+
        if !matches!(c, '\r' | '\n') && !scan.is(pos, Class::Number) {
            if scan.is(pos, Class::Letter) || scan.is(pos + 1, Class::Letter) {
                pos = words.push(pos, scan.skip(pos + 1, Class::Letter));
                continue;
            }
        }
        // \p{N}{1,3}
        if scan.is(pos, Class::Number) {
            let end = scan.skip(pos, Class::Number);
            while pos < end {
                pos = words.push(pos, (pos + 3).min(end));
            }
            continue;
        }
        // " ?[^\s\p{L}\p{N}]+[\r\n]*" (a space at the very end also lands here, alone)
        let first = pos + usize::from(c == ' ');
        let class = scan.class(first);
        if class == Class::Other || (class == Class::End && first > pos) {
            let mut end = scan.skip(first, Class::Other);
            while matches!(scan.get(end), Some('\r' | '\n')) {
                end += 1;
            }
            pos = words.push(pos, end);
            continue;
        }
        // \s*[\r\n]+
        let (_, after_newline) = scan.whitespace_run(pos);
        if after_newline > 0 {
            pos = words.push(pos, after_newline);
            continue;
        }
        let end = scan.whitespace_word_end(pos);
        pos = words.push(pos, end);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(regexes: &[&str], text: &str) -> Vec<String> {
        let pre = PreTokenizer::new(regexes).unwrap();
        let words = pre.split(text);
        // The words cover the text in order.
        let joined: String = words.iter().map(|r| &text[r.clone()]).collect();
        assert_eq!(joined, text);
        words.into_iter().map(|r| text[r].to_string()).collect()
    }

    /// The scanners agree with the same pattern run by the regex engine.
    fn agree(scanner: &str, text: &str) {
        let by_regex = {
            let re = SysRegex::new(scanner).unwrap();
            let mut out = Vec::new();
            regex_split(&re, text, 0, &mut out);
            out.into_iter()
                .map(|r| text[r].to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(split(&[scanner], text), by_regex, "{text:?}");
    }

    const SAMPLES: &[&str] = &[
        "Hello world",
        "Hello  world's  ",
        "   leading and trailing spaces   ",
        "\n\nnewlines\n\n\nand\ttabs\t\t",
        "I've been there, you'll see, they're DONE, we'd go. 'x 'LL 'Re",
        "The year 1984 had 365 days; π ≈ 3.14159265358979.",
        "1234567890 12 345 6789 00001",
        "emoji: 🦀🚀👩\u{200d}👩\u{200d}👧 ✓ ✗",
        "def f(x):\n    return x ** 2  # square\n\nprint(f(3))",
        "\u{a0}non-breaking\u{a0}space and zero\u{200b}width",
        "日本語のテキストと中文文本和한국어 Привет, мир!",
        "a \r\n b  \n\n  c ?!\n\n",
        " ",
        "  ",
        "x ",
        "x  ",
        "½²٣ Ⅻ",
    ];

    #[test]
    fn gpt2_scanner_matches_the_regex() {
        for text in SAMPLES {
            agree(GPT2, text);
        }
    }

    #[test]
    fn llama3_scanner_matches_the_regex() {
        for text in SAMPLES {
            agree(LLAMA3, text);
        }
    }

    #[test]
    fn gpt2_words() {
        assert_eq!(
            split(&[GPT2], "Hello  world's 123!!"),
            ["Hello", " ", " world", "'s", " 123", "!!"]
        );
        assert_eq!(split(&[GPT2], "a\tb"), ["a", "\t", "b"]);
    }

    #[test]
    fn llama3_words() {
        assert_eq!(
            split(&[LLAMA3], "Hello  WORLD'S 12345\n\n x"),
            ["Hello", " ", " WORLD", "'S", " ", "123", "45", "\n\n", " x"]
        );
    }

    #[test]
    fn smollm_splits_every_digit() {
        assert_eq!(
            split(&[r"\p{N}", GPT2], "in 1984, x2"),
            ["in", " ", "1", "9", "8", "4", ",", " x", "2"]
        );
    }

    #[test]
    fn every_configured_regex_compiles() {
        for pre in [
            "default",
            "llama-bpe",
            "dbrx",
            "glm4",
            "gpt-2",
            "smollm",
            "falcon",
            "qwen2",
            "qwen35",
            "deepseek-coder",
            "seed-coder",
            "ufakzeka",
            "tekken",
            "gpt-4o",
            "minicpm5",
            "bloom",
            "viking",
        ] {
            let cfg = pre_config(pre).unwrap();
            let pre_tok = PreTokenizer::new(cfg.regexes).unwrap();
            for text in SAMPLES {
                let words = pre_tok.split(text);
                let joined: String = words.iter().map(|r| &text[r.clone()]).collect();
                assert_eq!(&joined, text, "{pre}");
            }
        }
        assert!(pre_config("no-such-pre").is_none());
        assert!(pre_config("kimi-k2").is_none() && is_known_unsupported("kimi-k2"));
    }
}
