//! Calibration sets (moa-method.md section 6): conversations built from long documents found
//! offline (license texts, documentation files), each a user turn holding the documents and a
//! request that needs all of them (summarize each; recall facts from its start and end; recall
//! the reference number of a note put somewhere into the documents), answered
//! by the dense model itself (greedy), rendered in the model's chat template. Stored as JSONL,
//! one [`CalibRecord`] per line: token ids and the response ranges the loss is taken on.
//!
//! Deterministic given the documents, the model and the seed: documents are read in sorted path
//! order, split into calibration and validation pools by a hash of their path, and every choice
//! comes from a seeded generator.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::chat::{ChatError, ChatTemplate, Message};
use crate::generate::Session;
use crate::model::Model;
use crate::tokenizer::{Tokenizer, TokenizerError};

/// One calibration or validation conversation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CalibRecord {
    pub id: String,
    /// `calib` or `val`.
    pub split: String,
    /// The length bucket the conversation was built for (it has at most this many tokens).
    pub length: usize,
    pub task: String,
    /// Document paths, in the order they appear.
    pub sources: Vec<String>,
    pub n_tokens: usize,
    /// Token ranges `[start, end)` of the response (the loss mask).
    pub response: Vec<[usize; 2]>,
    pub tokens: Vec<u32>,
}

impl CalibRecord {
    pub fn response_ranges(&self) -> Vec<Range<usize>> {
        self.response.iter().map(|r| r[0]..r[1]).collect()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CalibError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}: {reason}")]
    BadRecord {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("no usable documents (UTF-8 text of at least {min_chars} characters) under {sources}")]
    NoDocuments { sources: String, min_chars: usize },
    #[error("length {length} leaves no room for documents after {overhead} tokens of template, request and answer")]
    TooShort { length: usize, overhead: usize },
    #[error("the documents hold {have} tokens, a {length}-token conversation needs about {need}; add sources")]
    NotEnoughText {
        length: usize,
        need: usize,
        have: usize,
    },
    #[error("unknown calibration task {0:?} (known: summarize, recall, compare, fact, facts)")]
    UnknownTask(String),
    #[error("the model has no chat template")]
    NoTemplate,
    #[error(transparent)]
    Chat(#[from] ChatError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error("generation failed: {0}")]
    Generate(String),
}

/// Reads and validates a JSONL calibration file.
pub fn read_jsonl(path: &Path) -> Result<Vec<CalibRecord>, CalibError> {
    let text = std::fs::read_to_string(path).map_err(|source| CalibError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |reason: String| CalibError::BadRecord {
            path: path.to_path_buf(),
            line: i + 1,
            reason,
        };
        let r: CalibRecord = serde_json::from_str(line).map_err(|e| bad(e.to_string()))?;
        if r.tokens.len() != r.n_tokens {
            return Err(bad(format!(
                "n_tokens is {} but there are {} tokens",
                r.n_tokens,
                r.tokens.len()
            )));
        }
        if r.n_tokens > r.length {
            return Err(bad(format!(
                "{} tokens exceed the length bucket {}",
                r.n_tokens, r.length
            )));
        }
        for s in &r.response {
            if s[0] < 1 || s[0] > s[1] || s[1] > r.n_tokens {
                return Err(bad(format!(
                    "response range {}..{} is not inside 1..{}",
                    s[0], s[1], r.n_tokens
                )));
            }
        }
        if r.response.iter().all(|s| s[0] == s[1]) {
            return Err(bad("no response tokens".into()));
        }
        out.push(r);
    }
    Ok(out)
}

/// A source document.
#[derive(Debug, Clone)]
pub struct Document {
    pub name: String,
    pub text: String,
}

/// Reads every UTF-8 file of at least `min_chars` characters under `sources` (files or folders,
/// recursively), in sorted path order. Unreadable or binary files are skipped.
pub fn collect_documents(
    sources: &[PathBuf],
    min_chars: usize,
) -> Result<Vec<Document>, CalibError> {
    fn walk(p: &Path, out: &mut Vec<PathBuf>) -> Result<(), CalibError> {
        let meta = std::fs::metadata(p).map_err(|source| CalibError::Io {
            path: p.to_path_buf(),
            source,
        })?;
        if meta.is_dir() {
            let rd = std::fs::read_dir(p).map_err(|source| CalibError::Io {
                path: p.to_path_buf(),
                source,
            })?;
            let mut entries: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
            entries.sort();
            for e in entries {
                // Symlinks to folders could loop; files behind links are fine.
                if e.is_dir() && std::fs::symlink_metadata(&e).is_ok_and(|m| m.is_symlink()) {
                    continue;
                }
                walk(&e, out)?;
            }
        } else if meta.is_file() {
            out.push(p.to_path_buf());
        }
        Ok(())
    }
    let mut files = Vec::new();
    for s in sources {
        walk(s, &mut files)?;
    }
    files.sort();
    files.dedup();
    let mut docs = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for f in files {
        let Ok(bytes) = std::fs::read(&f) else {
            continue;
        };
        let Ok(text) = String::from_utf8(bytes) else {
            continue;
        };
        // Skip binary files, short ones, and copies (symlinks, duplicated texts).
        if text.contains('\0')
            || text.chars().count() < min_chars
            || !seen.insert(fnv1a(text.as_bytes()))
        {
            continue;
        }
        docs.push(Document {
            name: f.display().to_string(),
            text: text.replace("\r\n", "\n"),
        });
    }
    if docs.is_empty() {
        return Err(CalibError::NoDocuments {
            sources: sources
                .iter()
                .map(|s| s.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
            min_chars,
        });
    }
    Ok(docs)
}

/// 64-bit FNV-1a, for the document split and file fingerprints.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Splits documents into (calibration, validation) pools: a document goes to validation when
/// the hash of its file name falls in the `val_fraction` share. The file name, not the whole
/// path: the split must not depend on where the folder lives (a temporary folder's random name
/// made it change from run to run).
pub fn split_documents(docs: Vec<Document>, val_fraction: f64) -> (Vec<Document>, Vec<Document>) {
    docs.into_iter().partition(|d| {
        let key = Path::new(&d.name)
            .file_name()
            .map_or(d.name.as_bytes(), |n| n.as_encoded_bytes());
        (fnv1a(key) % 1000) as f64 >= val_fraction * 1000.0
    })
}

/// The requests; each needs the whole of the documents to answer. `fact` and `facts` also put
/// notes with five-digit reference numbers into the documents (`fact`: one note anywhere;
/// `facts`: notes A, B and C, one in each third, and the request names one of them, `{label}`),
/// so that the dense model's answer has to recall something from a place the request does not
/// point to: the long-range retrieval a small model can actually do.
pub const TASKS: &[(&str, &str)] = &[
    (
        "summarize",
        "Summarize the documents above. For each document, in the order given, write its title and two sentences on what it says.",
    ),
    (
        "recall",
        "Answer from the documents above: what is the title of the first document, what does its first paragraph say, what does the last paragraph of the last document say, and how many documents are there?",
    ),
    (
        "compare",
        "List the documents above in order. For each, say what it permits, what it requires, and what it says about warranty, quoting a few words where you can.",
    ),
    (
        "fact",
        "What is the reference number in the note of the documents above?",
    ),
    ("facts", "What is the reference number in note {label}?"),
];

/// The default task rotation of [`Builder::build`] (`moa-profile calib --tasks`).
pub const DEFAULT_TASKS: &str = "summarize,recall,compare,fact,facts";

/// Indices into [`TASKS`] of comma-separated task names (repeats allowed: they weigh a task).
pub fn parse_tasks(names: &str) -> Result<Vec<usize>, CalibError> {
    let mut out = Vec::new();
    for n in names.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        let i = TASKS
            .iter()
            .position(|(t, _)| *t == n)
            .ok_or_else(|| CalibError::UnknownTask(n.to_string()))?;
        out.push(i);
    }
    if out.is_empty() {
        return Err(CalibError::UnknownTask(names.to_string()));
    }
    Ok(out)
}

/// Puts `notes` (depth in [0, 1] of `body`, sentence) into `body`, each on its own line after
/// the first line break at or after its depth (at the end when there is none).
pub fn insert_notes(body: &str, notes: &[(f64, String)]) -> String {
    let mut at: Vec<(usize, &str)> = notes
        .iter()
        .map(|(d, text)| {
            let mut p = ((d.clamp(0.0, 1.0) * body.len() as f64) as usize).min(body.len());
            while !body.is_char_boundary(p) {
                p += 1;
            }
            let p = body[p..].find('\n').map_or(body.len(), |k| p + k + 1);
            (p, text.as_str())
        })
        .collect();
    at.sort_by_key(|&(p, _)| p);
    let mut out = String::with_capacity(body.len() + 64 * notes.len());
    let mut last = 0;
    for (p, text) in at {
        out.push_str(&body[last..p]);
        if !out.is_empty() && !out.ends_with('\n') {
            out.push('\n');
        }
        out.push_str(text);
        out.push('\n');
        last = p;
    }
    out.push_str(&body[last..]);
    out
}

/// splitmix64.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// A five-digit number.
    fn key(&mut self) -> u32 {
        10_000 + self.below(90_000) as u32
    }
}

/// What the builder needs from the model.
pub struct Builder<'a> {
    pub model: &'a Arc<Model>,
    pub tokenizer: &'a Tokenizer,
    pub template: ChatTemplate,
    pub threads: usize,
    /// Most tokens of the dense model's answer.
    pub max_new: usize,
    /// Indices into [`TASKS`]: conversation `i` of a length gets `tasks[i % tasks.len()]`.
    pub tasks: Vec<usize>,
    /// Key loss: in conversations that ask for a note's reference number (`fact`, `facts`),
    /// take the loss only on the answer's tokens that spell the number, and drop the
    /// conversations whose answer does not contain it (the dense model did not retrieve it).
    pub key_loss: bool,
    /// Where the dense model answers (the CPU unless set).
    pub device: crate::runtime::Device,
}

/// A conversation before the answer: the prompt tokens and what went into it.
pub struct Prompt {
    pub tokens: Vec<u32>,
    pub task: String,
    pub sources: Vec<String>,
    /// The reference number the request asks for (`fact`, `facts`).
    pub key: Option<u32>,
}

/// The tokens of `answer` that spell `key` (its first occurrence in the decoded text): the
/// range of answer token indices whose decoded pieces overlap the key's characters.
pub fn key_token_range(tokenizer: &Tokenizer, answer: &[u32], key: &str) -> Option<Range<usize>> {
    let text = tokenizer.decode(answer);
    let at = text.find(key)?;
    let end = at + key.len();
    // Decoded length after each token (prefix decoding keeps multi-byte pieces whole).
    let mut first = None;
    for i in 0..answer.len() {
        let len = tokenizer.decode(&answer[..=i]).len();
        if first.is_none() && len > at {
            first = Some(i);
        }
        if len >= end {
            return first.map(|f| f..i + 1);
        }
    }
    None
}

impl<'a> Builder<'a> {
    pub fn new(
        model: &'a Arc<Model>,
        tokenizer: &'a Tokenizer,
        threads: usize,
        max_new: usize,
    ) -> Result<Builder<'a>, CalibError> {
        let template = ChatTemplate::from_gguf(&model.file)?.ok_or(CalibError::NoTemplate)?;
        Ok(Builder {
            model,
            tokenizer,
            template,
            threads,
            max_new,
            tasks: parse_tasks(DEFAULT_TASKS)?,
            key_loss: false,
            device: crate::runtime::Device::Cpu,
        })
    }

    fn render(&self, user: &str) -> Result<Vec<u32>, CalibError> {
        let text = self.template.render(&[Message::new("user", user)], true)?;
        Ok(self.tokenizer.encode(&text, true, true)?)
    }

    /// A prompt of at most `length - max_new` tokens from `docs` for the `index`-th task of the
    /// rotation, chosen by `rng`.
    fn prompt(
        &self,
        docs: &[Document],
        length: usize,
        index: usize,
        rng: &mut Rng,
    ) -> Result<Prompt, CalibError> {
        let (task, request) = TASKS[self.tasks[index % self.tasks.len()]];
        // Notes (depth in the body, sentence) and the request naming them.
        let mut notes: Vec<(f64, String)> = Vec::new();
        let mut asked = None;
        let request = match task {
            "fact" => {
                let d = 0.02 + 0.96 * rng.unit();
                let key = rng.key();
                notes.push((
                    d,
                    format!("Note: the reference number of this part is {key}."),
                ));
                asked = Some(key);
                request.to_string()
            }
            "facts" => {
                let mut keys = [0u32; 3];
                for (k, label) in ["A", "B", "C"].iter().enumerate() {
                    let d = (k as f64 + 0.05 + 0.9 * rng.unit()) / 3.0;
                    let key = rng.key();
                    keys[k] = key;
                    notes.push((
                        d,
                        format!("Note {label}: the reference number of this part is {key}."),
                    ));
                }
                let which = rng.below(3);
                asked = Some(keys[which]);
                request.replace("{label}", ["A", "B", "C"][which])
            }
            _ => request.to_string(),
        };
        let request = request.as_str();
        let overhead = self.render(request)?.len() + self.max_new + 16 + 24 * notes.len();
        if length <= overhead + 64 {
            return Err(CalibError::TooShort { length, overhead });
        }
        let budget = length - self.max_new;
        // Documents in a seeded order, starting anywhere; header + text each.
        let start = rng.below(docs.len());
        let mut body_tokens = Vec::new();
        let mut sources = Vec::new();
        let mut parts: Vec<(usize, Vec<u32>)> = Vec::new();
        let need = length - overhead;
        for k in 0..docs.len() {
            let d = &docs[(start + k) % docs.len()];
            let title = Path::new(&d.name)
                .file_name()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| d.name.clone());
            let text = format!(
                "### Document {}: {}\n\n{}\n\n",
                parts.len() + 1,
                title,
                d.text.trim()
            );
            let ids = self.tokenizer.encode(&text, false, false)?;
            body_tokens.push(ids.len());
            sources.push(d.name.clone());
            parts.push((ids.len(), ids));
            if body_tokens.iter().sum::<usize>() >= need {
                break;
            }
        }
        let have: usize = body_tokens.iter().sum();
        if have < need / 2 {
            return Err(CalibError::NotEnoughText { length, need, have });
        }
        // Trim the last document until the rendered prompt fits the budget.
        let mut keep = need.min(have);
        loop {
            let mut ids: Vec<u32> = parts.iter().flat_map(|(_, v)| v.iter().copied()).collect();
            ids.truncate(keep);
            let body = insert_notes(&self.tokenizer.decode(&ids), &notes);
            let user = format!("{}\n\n{}", body.trim_end(), request);
            let tokens = self.render(&user)?;
            if tokens.len() <= budget {
                return Ok(Prompt {
                    tokens,
                    task: task.into(),
                    sources,
                    key: asked,
                });
            }
            keep = keep.saturating_sub(tokens.len() - budget + 8);
            if keep == 0 {
                return Err(CalibError::TooShort { length, overhead });
            }
        }
    }

    /// The dense model's greedy answer to `prompt` (stops at end of generation; the
    /// end-of-generation token is part of the answer).
    pub fn answer(&self, prompt: &[u32]) -> Result<Vec<u32>, CalibError> {
        let gen = |e: &dyn std::fmt::Display| CalibError::Generate(e.to_string());
        let n_ctx = prompt.len() + self.max_new;
        let mut be = crate::runtime::backend_with_plan(
            self.model,
            None,
            n_ctx,
            1,
            512,
            self.threads,
            self.device,
            crate::kv::KvTypes::default(),
        )
        .map_err(|e| gen(&e))?;
        let mut s = Session::new(be.as_mut(), 0, 512);
        let mut logits = s.prompt(prompt).map_err(|e| gen(&e))?.to_vec();
        let mut out = Vec::new();
        while out.len() < self.max_new {
            let next = logits
                .iter()
                .enumerate()
                .fold((0usize, f32::NEG_INFINITY), |b, (i, &v)| {
                    if v > b.1 {
                        (i, v)
                    } else {
                        b
                    }
                })
                .0 as u32;
            out.push(next);
            if self.tokenizer.is_eog(next) || out.len() == self.max_new {
                break;
            }
            logits = s.step(next).map_err(|e| gen(&e))?.to_vec();
        }
        Ok(out)
    }

    /// Builds `count` conversations of at most `length` tokens from `docs` (fewer with
    /// [`Builder::key_loss`]: a conversation whose answer misses the asked number is dropped).
    pub fn build(
        &self,
        docs: &[Document],
        split: &str,
        length: usize,
        count: usize,
        seed: u64,
        mut progress: impl FnMut(&CalibRecord),
    ) -> Result<Vec<CalibRecord>, CalibError> {
        if docs.is_empty() {
            return Err(CalibError::NoDocuments {
                sources: format!("the {split} split"),
                min_chars: 0,
            });
        }
        let mut rng = Rng(seed ^ fnv1a(split.as_bytes()) ^ (length as u64).wrapping_mul(0x9e37));
        let mut out = Vec::new();
        for i in 0..count {
            let p = self.prompt(docs, length, i, &mut rng)?;
            let answer = self.answer(&p.tokens)?;
            let start = p.tokens.len();
            let mut response = [start, start + answer.len()];
            if let (true, Some(key)) = (self.key_loss, p.key) {
                match key_token_range(self.tokenizer, &answer, &key.to_string()) {
                    Some(r) => response = [start + r.start, start + r.end],
                    None => continue,
                }
            }
            let mut tokens = p.tokens;
            tokens.extend(&answer);
            let rec = CalibRecord {
                id: format!("{split}-{length}-{i}"),
                split: split.into(),
                length,
                task: p.task,
                sources: p.sources,
                n_tokens: tokens.len(),
                response: vec![response],
                tokens,
            };
            progress(&rec);
            out.push(rec);
        }
        Ok(out)
    }
}

/// Writes records as JSONL atomically.
pub fn write_jsonl(path: &Path, records: &[CalibRecord]) -> Result<(), CalibError> {
    let mut text = String::new();
    for r in records {
        text.push_str(&serde_json::to_string(r).expect("record serializes"));
        text.push('\n');
    }
    crate::util::write_file_atomic(path, text.as_bytes()).map_err(|source| CalibError::Io {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn document_split_follows_file_names_not_folders() {
        let docs = |dir: &str| -> Vec<Document> {
            (0..40)
                .map(|k| Document {
                    name: format!("{dir}/doc{k}.txt"),
                    text: String::new(),
                })
                .collect()
        };
        let names = |v: &[Document]| -> Vec<String> {
            v.iter()
                .map(|d| d.name.rsplit('/').next().unwrap().to_string())
                .collect()
        };
        let (ca, va) = split_documents(docs("/tmp/.tmpA1b2C3/docs"), 0.3);
        let (cb, vb) = split_documents(docs("/data/elsewhere"), 0.3);
        assert_eq!(names(&ca), names(&cb));
        assert_eq!(names(&va), names(&vb));
        // Roughly the asked share (40 documents, 30%).
        assert!(
            (6..=18).contains(&va.len()),
            "{} of 40 for validation",
            va.len()
        );
    }

    #[test]
    fn notes_go_on_their_own_lines_at_their_depths() {
        let body = "one\ntwo\nthree\nfour\n";
        let notes = vec![(0.9, "N2".to_string()), (0.0, "N1".to_string())];
        assert_eq!(
            insert_notes(body, &notes),
            "one\nN1\ntwo\nthree\nfour\nN2\n"
        );
        // No line break after the depth: at the end; multi-byte text is cut on a boundary.
        assert_eq!(
            insert_notes("ab\nc\u{e9}d", &[(0.8, "N".into())]),
            "ab\nc\u{e9}d\nN\n"
        );
        assert_eq!(insert_notes("x", &[]), "x");
    }

    #[test]
    fn tasks_parse_by_name() {
        assert_eq!(parse_tasks("fact,summarize,fact").unwrap(), [3, 0, 3]);
        assert_eq!(parse_tasks(DEFAULT_TASKS).unwrap(), [0, 1, 2, 3, 4]);
        assert!(matches!(
            parse_tasks("nope"),
            Err(CalibError::UnknownTask(_))
        ));
        assert!(parse_tasks("").is_err());
    }
}
