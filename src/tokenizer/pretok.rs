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
pub(crate) const GPT2: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
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
const JAIS2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s{512}(?!\S)|\s{256}(?!\S)|\s{128}(?!\S)|\s{64}(?!\S)|\s{32}(?!\S)|\s{16}(?!\S)|\s{8}(?!\S)|\s{4}(?!\S)|\s{1,2}(?!\S)|\s{1}";
/// Written with escapes: the ranges include characters that text tools may normalize.
const DEEPSEEK_LLM_LETTERS: &str = "\\s?[A-Za-z\u{B5}\u{C0}-\u{D6}\u{D8}-\u{F6}\u{F8}-\u{1BA}\u{1BC}-\u{1BF}\u{1C4}-\u{293}\u{295}-\u{2AF}\u{370}-\u{373}\u{376}\u{377}\u{37B}-\u{37D}\u{37F}\u{386}\u{388}-\u{38A}\u{38C}\u{38E}-\u{3A1}\u{3A3}-\u{3F5}\u{3F7}-\u{481}\u{48A}-\u{52F}\u{531}-\u{556}\u{10A0}-\u{10C5}\u{13A0}-\u{13F5}\u{13F8}-\u{13FD}\u{1C90}-\u{1CBA}\u{1CBD}-\u{1CBF}\u{1D00}-\u{1D2B}\u{1D6B}-\u{1D77}\u{1D79}-\u{1D9A}\u{1E00}-\u{1F15}\u{1F18}-\u{1F1D}\u{1F20}-\u{1F45}\u{1F48}-\u{1F4D}\u{1F50}-\u{1F57}\u{1F59}\u{1F5B}\u{1F5D}\u{1F5F}-\u{1F7D}\u{1F80}-\u{1FB4}\u{1FB6}-\u{1FBC}\u{1FBE}\u{1FC2}-\u{1FC4}\u{1FC6}-\u{1FCC}\u{1FD0}-\u{1FD3}\u{1FD6}-\u{1FDB}\u{1FE0}-\u{1FEC}\u{1FF2}-\u{1FF4}\u{1FF6}-\u{1FFC}\u{2102}\u{2107}\u{210A}-\u{2113}\u{2115}\u{2119}-\u{211D}\u{2124}\u{2126}\u{2128}\u{212A}-\u{212D}\u{212F}-\u{2134}\u{2139}\u{213C}-\u{213F}\u{2145}-\u{2149}\u{214E}\u{2183}\u{2184}\u{2C00}-\u{2C7B}\u{2C7E}-\u{2CE4}\u{2CEB}-\u{2CEE}\u{2CF2}\u{2CF3}\u{A640}-\u{A66D}\u{A680}-\u{A69B}\u{A722}-\u{A76F}\u{A771}-\u{A787}\u{A78B}-\u{A78E}\u{AB70}-\u{ABBF}\u{FB00}-\u{FB06}\u{FB13}-\u{FB17}\u{FF21}-\u{FF3A}\u{FF41}-\u{FF5A}\u{10400}-\u{1044F}\u{104B0}-\u{104D3}\u{104D8}-\u{104FB}\u{10C80}-\u{10CB2}\u{10CC0}-\u{10CF2}\u{118A0}-\u{118DF}\u{1E900}-\u{1E943}]+";
const CJK: &str = r"[一-龥ࠀ-一가-퟿]+";
const HAN_KANA: &str = r"[一-龥぀-ゟ゠-ヿ]+";
const DEEPSEEK3: &str = r##"[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"##;
const SPARK2_5: &str = r##"[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+|[\r\n]|\s+(?!\S)|\s+"##;
const YOUTU_CJK: &str = r"[가-힣ㄱ-ㆎ]+|[！…“”‘’—：；，、-〿︰-﹏]+|[ㄅ-ㄯ]+|[一-龥぀-ゟ゠-ヿ]+";
const YOUTU: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const GRANITE_EMB_MULTI: &str = r"[^\r\n\p{L}\p{N}]?((?=[\p{L}\p{M}])([^a-z]))*((?=[\p{L}\p{M}])([^A-Z]))+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\r\n\p{L}\p{N}]?((?=[\p{L}\p{M}])([^a-z]))+((?=[\p{L}\p{M}])([^A-Z]))*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const BAILINGMOE: &str = r"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+";
const EXAONE_MOE: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?(?:\p{L}\p{M}*(?: \p{L}\p{M}*)*)+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]?|\s*[\r\n]|\s+(?!\S)|\s+";

/// What a `tokenizer.ggml.pre` value means for a byte-level BPE vocabulary (llama.cpp's table,
/// as of the llama.cpp version our reference fixtures come from, b11434).
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

    const fn ignore_merges(self) -> PreConfig {
        PreConfig {
            ignore_merges: true,
            ..self
        }
    }

    const fn add_bos(self) -> PreConfig {
        PreConfig {
            add_bos: true,
            ..self
        }
    }

    const fn no_bos(self) -> PreConfig {
        PreConfig {
            no_bos: true,
            ..self
        }
    }
}

/// The pre-tokenizer for a `tokenizer.ggml.pre` value (`None` when the value is unknown or
/// names a pre-tokenizer that moa does not implement). A missing key means `"default"`.
pub(crate) fn pre_config(pre: &str) -> Option<PreConfig> {
    const DEFAULT: PreConfig = PreConfig::new(&[PUNCT_RUN, GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"]);
    const DEEPSEEK3_CFG: PreConfig = PreConfig::new(&[r"\p{N}{1,3}", HAN_KANA, DEEPSEEK3]);
    const CHAMELEON: &[&str] = &[
        r"<sentinel:[0-9]+>",
        r"(IMGIMG)((A|B|C|D|E|F|G|H|I){1,4})Z",
        r"([\t\n]|    |  )",
        r"\p{N}",
        r"[\p{P}!-/:-@\[-`{-~]",
        GPT2,
    ];
    Some(match pre {
        "" | "default" => DEFAULT,
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0"
        | "lfm2" | "jina-v5-nano" => PreConfig::new(&[LLAMA3]).ignore_merges().add_bos(),
        "dbrx" | "smaug-bpe" => PreConfig::new(&[LLAMA3]),
        "chatglm-bpe" => PreConfig::new(&[LLAMA3]).no_bos(),
        "glm4" | "glm5" => PreConfig::new(&[LLAMA3]).no_bos().ignore_merges(),
        "jais-2" => PreConfig::new(&[JAIS2]),
        // "gpt2" is not a llama.cpp name (it writes "gpt-2"); accepted as an alias.
        "gpt-2" | "gpt2" | "phi-2" | "jina-es" | "jina-de" | "gigachat" | "jina-v2-es"
        | "jina-v2-de" | "a.x-4.0" | "mellum" | "modern-bert" | "jina-v1-en" | "jina-v2-code"
        | "roberta-bpe" | "exaone4" | "mpt" | "olmo" | "jais" | "trillion" | "granite-docling" => {
            PreConfig::new(&[GPT2])
        }
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b"
        | "mellum2" => PreConfig::new(&[r"\p{N}", GPT2]),
        "falcon" => PreConfig::new(&[r"[\p{P}\$\+<=>\^~\|`]+", GPT2, r"[0-9][0-9][0-9]"]),
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "megrez" | "stablelm2" | "hunyuan"
        | "solar-open" | "grok-2" => PreConfig::new(&[QWEN2]),
        "qwen35" => PreConfig::new(&[QWEN35]),
        "deepseek-llm" => PreConfig::new(&[
            r"[\r\n]",
            DEEPSEEK_LLM_LETTERS,
            r"\s?[!-/:-~！-／：-～‘-‟　-。]+",
            r"\s+$",
            CJK,
            r"\p{N}+",
        ]),
        "deepseek-coder" => PreConfig::new(&[r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", CJK, r"\p{N}"]),
        "deepseek-v3" | "hunyuan-dense" | "joyai-llm" | "hy_v4" => DEEPSEEK3_CFG,
        "spark2_5" => PreConfig::new(&[r"\p{N}{1,3}", HAN_KANA, SPARK2_5, r"\p{N}"]),
        "youtu" => PreConfig::new(&[YOUTU_CJK, YOUTU]).ignore_merges(),
        "seed-coder" => PreConfig::new(&[SEED_CODER]),
        "ufakzeka" => PreConfig::new(&[UFAKZEKA]),
        "tekken" => PreConfig::new(&[TEKKEN]).ignore_merges().add_bos(),
        "gpt-4o" | "llama4" | "kanana2" | "talkie" | "minimax-m2" => PreConfig::new(&[GPT4O]),
        "granite-embed-multi-97m" => PreConfig::new(&[GRANITE_EMB_MULTI]).ignore_merges(),
        "minicpm5" => PreConfig::new(&[r"\p{N}{1,3}", MINICPM5]).ignore_merges(),
        "poro-chat" | "bloom" | "gpt3-finnish" => PreConfig::new(&[BLOOM]),
        "viking" => PreConfig::new(&[BLOOM, r"\p{N}"]),
        "chameleon" => PreConfig::new(CHAMELEON).add_bos(),
        "bailingmoe" | "bailingmoe2" | "llada-moe" => PreConfig::new(&[BAILINGMOE]),
        "laguna" => PreConfig::new(&[r"[^\n]+|[\n]+", QWEN2]),
        "exaone-moe" => PreConfig::new(&[EXAONE_MOE]),
        _ => return None,
    })
}

/// `tokenizer.ggml.pre` values llama.cpp knows that moa does not implement: they need tokenizer
/// code of their own in llama.cpp (SentencePiece-style BPE, custom digit grouping, whitespace
/// splitting) or regex features whose emulation in llama.cpp (`\d`, `\b`, empty matches)
/// differs from fancy-regex.
pub(crate) fn is_known_unsupported(pre: &str) -> bool {
    matches!(
        pre,
        "gemma4"
            | "granite-embed-multi-311m"
            | "mmbert"
            | "sarvam-moe"
            | "whitespace"
            | "tiny_aya"
            | "cohere2moe"
            | "superbpe"
            | "kimi-k2"
            | "afmoe"
    )
}

/// llama.cpp runs regexes that use Unicode classes on text where every code point is replaced by
/// its category, and it maps the letter subclasses `\p{Lu}`, `\p{Ll}`, `\p{Lt}`, `\p{Lm}`,
/// `\p{Lo}` all to "any letter". The same regex on the real text needs the same widening.
fn widen_letter_classes(re: &str) -> String {
    let mut out = re.to_string();
    for sub in [r"\p{Lu}", r"\p{Ll}", r"\p{Lt}", r"\p{Lm}", r"\p{Lo}"] {
        out = out.replace(sub, r"\p{L}");
    }
    out
}

enum Pass {
    Gpt2,
    /// The Llama-3 scanner; numbers in groups of at most this many digits (Qwen2: 1).
    Llama3(usize),
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
                LLAMA3 | LLAMA3_ORIGINAL => Ok(Pass::Llama3(3)),
                QWEN2 => Ok(Pass::Llama3(1)),
                _ => SysRegex::new(&widen_letter_classes(re))
                    .map(Pass::Regex)
                    .map_err(|e| (re.to_string(), e.to_string())),
            })
            .collect::<Result<_, _>>()?;
        Ok(PreTokenizer { passes })
    }

    /// Splits `text` into words (non-empty byte ranges that cover it in order).
    pub(crate) fn split(&self, text: &str) -> Vec<Range<usize>> {
        let mut pieces = Vec::new();
        if !text.is_empty() {
            pieces.push(0..text.len());
        }
        let mut next = Vec::new();
        for pass in &self.passes {
            next.clear();
            for piece in &pieces {
                let sub = &text[piece.clone()];
                let base = piece.start;
                match pass {
                    Pass::Gpt2 => gpt2_split(sub, base, &mut next),
                    Pass::Llama3(digits) => llama3_split(sub, base, *digits, &mut next),
                    Pass::Regex(re) => regex_split(re, sub, base, &mut next),
                }
            }
            std::mem::swap(&mut pieces, &mut next);
        }
        pieces
    }
}

/// Matches and the gaps between them, each as a piece.
///
/// llama.cpp's regex engine (`std::regex`) only knows ASCII whitespace, so before matching it
/// replaces every other whitespace code point by U+000B (vertical tab). That matters for explicit
/// code point ranges, which then no longer contain them (`[ࠀ-一]` covers U+1680, U+2028 and
/// U+3000), so the same replacement is made here, on a copy, mapping the matches back.
fn regex_split(re: &SysRegex, text: &str, base: usize, out: &mut Vec<Range<usize>>) {
    let is_wide_space = |c: char| !c.is_ascii() && is_whitespace(c);
    if !text.chars().any(is_wide_space) {
        return regex_split_mapped(re, text, base, out, |i| i);
    }
    let mut replaced = String::with_capacity(text.len());
    // `origin[i]` is the offset in `text` of the code point that byte `i` of `replaced` is part
    // of; one more entry for the end.
    let mut origin = Vec::with_capacity(text.len() + 1);
    for (i, c) in text.char_indices() {
        let r = if is_wide_space(c) { '\u{b}' } else { c };
        replaced.push(r);
        origin.resize(replaced.len(), i);
    }
    origin.push(text.len());
    regex_split_mapped(re, &replaced, base, out, |i| origin[i]);
}

fn regex_split_mapped(
    re: &SysRegex,
    matched: &str,
    base: usize,
    out: &mut Vec<Range<usize>>,
    to_text: impl Fn(usize) -> usize,
) {
    let text_len = to_text(matched.len());
    let mut prev = 0;
    for (start, end) in re.find_iter(matched) {
        let (start, end) = (to_text(start), to_text(end));
        if start > prev {
            out.push(base + prev..base + start);
        }
        if end > start {
            out.push(base + start..base + end);
        }
        prev = prev.max(end);
    }
    if prev < text_len {
        out.push(base + prev..base + text_len);
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
            self.get(i)
                .map(|c| if fold_case { c.to_ascii_lowercase() } else { c })
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
/// scanned by hand as llama.cpp does. With `digits = 1` it is Qwen2's pattern (`\p{N}` instead
/// of `\p{N}{1,3}`), which llama.cpp scans the same way.
pub(crate) fn llama3_split(text: &str, base: usize, digits: usize, out: &mut Vec<Range<usize>>) {
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
        if !matches!(c, '\r' | '\n')
            && !scan.is(pos, Class::Number)
            && (scan.is(pos, Class::Letter) || scan.is(pos + 1, Class::Letter))
        {
            pos = words.push(pos, scan.skip(pos + 1, Class::Letter));
            continue;
        }
        // \p{N}{1,3}
        if scan.is(pos, Class::Number) {
            let end = scan.skip(pos, Class::Number);
            while pos < end {
                pos = words.push(pos, (pos + digits).min(end));
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
    fn qwen2_scanner_matches_the_regex() {
        for text in SAMPLES {
            agree(QWEN2, text);
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
        for pre in SUPPORTED {
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

    /// One name of each pre-tokenizer in the table.
    pub(crate) const SUPPORTED: &[&str] = &[
        "default",
        "llama-bpe",
        "dbrx",
        "chatglm-bpe",
        "glm4",
        "jais-2",
        "gpt-2",
        "smollm",
        "falcon",
        "qwen2",
        "qwen35",
        "deepseek-llm",
        "deepseek-coder",
        "deepseek-v3",
        "spark2_5",
        "youtu",
        "seed-coder",
        "ufakzeka",
        "tekken",
        "gpt-4o",
        "granite-embed-multi-97m",
        "minicpm5",
        "bloom",
        "viking",
        "chameleon",
        "bailingmoe",
        "laguna",
        "exaone-moe",
    ];

    #[test]
    fn letter_subclasses_widen() {
        assert_eq!(
            widen_letter_classes(r"[\p{Lu}\p{M}]\p{Ll}+"),
            r"[\p{L}\p{M}]\p{L}+"
        );
    }
}
