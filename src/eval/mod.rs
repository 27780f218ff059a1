//! The evaluation suite behind `moa-eval`: long-context tasks that show what a span plan keeps.
//!
//! This module owns what the tasks share: the error type, the seeded random numbers every
//! generator draws from, and the parsing of length / depth lists. Each task has its own module
//! (generator + scorer + one trial on a model): [`passkey`], [`lines`], [`copy`], [`ppl`]. Text
//! to fill a context comes from [`filler`]; running a model under a span plan (greedy answers,
//! teacher-forced losses) is [`runner`]; tables, JSON and heatmaps are [`report`].
//!
//! Every generator is a pure function of (tokenizer, settings, length, depth, seed): the same
//! seed gives the same prompt, and every attention configuration of a run sees the same prompts,
//! so configurations are compared on identical inputs.

pub mod copy;
pub mod filler;
mod font;
pub mod lines;
pub mod passkey;
pub mod ppl;
pub mod report;
pub mod runner;

use crate::backend::BackendError;
use crate::chat::ChatError;
use crate::runtime::RuntimeError;
use crate::tokenizer::TokenizerError;

/// Why an evaluation could not be set up or run; each names the setting or input at fault.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("{what}: {reason}")]
    Invalid { what: String, reason: String },
    #[error("length {length}: too short for this task, whose fixed text alone takes {fixed} tokens (use a length of at least {min})")]
    TooShort {
        length: usize,
        fixed: usize,
        min: usize,
    },
    #[error("prompt of {prompt} tokens plus {n_predict} generated does not fit the context of {n_ctx} tokens (raise -c or lower the length)")]
    TooLong {
        prompt: usize,
        n_predict: usize,
        n_ctx: usize,
    },
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error("chat template: {0}")]
    Chat(#[from] ChatError),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error(transparent)]
    Perplexity(#[from] crate::perplexity::PerplexityError),
    #[error("heatmap {path}: {reason}")]
    Png { path: String, reason: String },
}

impl EvalError {
    pub fn invalid(what: impl Into<String>, reason: impl Into<String>) -> EvalError {
        EvalError::Invalid {
            what: what.into(),
            reason: reason.into(),
        }
    }
}

/// SplitMix64: small, fast, and the same on every platform, so a seed means the same prompt
/// everywhere (no dependency whose stream could change between versions).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..hi` (`hi > lo`).
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        debug_assert!(hi > lo);
        lo + self.next_u64() % (hi - lo)
    }

    /// Fisher-Yates shuffle.
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.range(0, i as u64 + 1) as usize;
            v.swap(i, j);
        }
    }
}

/// The seed of one trial: a hash of the run's seed, the task, the length, the depth and the
/// trial index, so a cell's prompt does not depend on which other cells were asked for.
pub fn trial_seed(seed: u64, task: &str, length: usize, depth: f64, index: usize) -> u64 {
    let mut h = Rng::new(seed);
    let mut x = h.next_u64();
    for b in task.bytes() {
        x = Rng::new(x ^ b as u64).next_u64();
    }
    x = Rng::new(x ^ length as u64).next_u64();
    x = Rng::new(x ^ depth.to_bits()).next_u64();
    Rng::new(x ^ index as u64).next_u64()
}

/// Parses a list of lengths in tokens: `1024,2048`, with `k` meaning 1024 (`1k,4k,7.5k`).
pub fn parse_lengths(s: &str) -> Result<Vec<usize>, EvalError> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let lower = part.to_ascii_lowercase();
        let n = if let Some(k) = lower.strip_suffix('k') {
            k.parse::<f64>()
                .ok()
                .filter(|v| v.is_finite() && *v > 0.0)
                .map(|v| (v * 1024.0).round() as usize)
        } else {
            lower.parse::<usize>().ok()
        };
        match n {
            Some(n) if n > 0 => out.push(n),
            _ => {
                return Err(EvalError::invalid(
                    format!("length {part:?}"),
                    "expected a positive number of tokens such as 2048 or 2k",
                ))
            }
        }
    }
    if out.is_empty() {
        return Err(EvalError::invalid("lengths", "the list is empty"));
    }
    Ok(out)
}

/// Parses a list of depths, fractions of the context in `[0, 1]`: `0,0.25,0.5`.
pub fn parse_depths(s: &str) -> Result<Vec<f64>, EvalError> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.parse::<f64>() {
            Ok(d) if (0.0..=1.0).contains(&d) => out.push(d),
            _ => {
                return Err(EvalError::invalid(
                    format!("depth {part:?}"),
                    "expected a fraction of the context between 0 and 1",
                ))
            }
        }
    }
    if out.is_empty() {
        return Err(EvalError::invalid("depths", "the list is empty"));
    }
    Ok(out)
}

/// The digit runs of a text, in order (`"a 12, b 345"` -> `["12", "345"]`).
pub fn integers(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = None;
    for (i, c) in text.char_indices() {
        match (c.is_ascii_digit(), start) {
            (true, None) => start = Some(i),
            (false, Some(s)) => {
                out.push(&text[s..i]);
                start = None;
            }
            _ => {}
        }
    }
    if let Some(s) = start {
        out.push(&text[s..]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rng_is_deterministic_and_spread() {
        let a: Vec<u64> = (0..4).map(|_| Rng::new(7).next_u64()).collect();
        assert!(a.iter().all(|&x| x == a[0]));
        let mut r = Rng::new(1);
        let v: Vec<u64> = (0..1000).map(|_| r.range(0, 10)).collect();
        for k in 0..10 {
            let c = v.iter().filter(|&&x| x == k).count();
            assert!((60..140).contains(&c), "value {k} drawn {c} times of 1000");
        }
    }

    #[test]
    fn trial_seeds_differ_by_cell() {
        let s = trial_seed(42, "passkey", 1024, 0.5, 0);
        assert_eq!(s, trial_seed(42, "passkey", 1024, 0.5, 0));
        assert_ne!(s, trial_seed(42, "passkey", 2048, 0.5, 0));
        assert_ne!(s, trial_seed(42, "passkey", 1024, 0.25, 0));
        assert_ne!(s, trial_seed(42, "passkey", 1024, 0.5, 1));
        assert_ne!(s, trial_seed(43, "passkey", 1024, 0.5, 0));
        assert_ne!(s, trial_seed(42, "copy", 1024, 0.5, 0));
    }

    #[test]
    fn lists_parse_and_reject() {
        assert_eq!(
            parse_lengths("1k, 2048,7.5k").unwrap(),
            vec![1024, 2048, 7680]
        );
        assert!(parse_lengths("0").is_err());
        assert!(parse_lengths("abc").is_err());
        assert!(parse_lengths("").is_err());
        assert_eq!(parse_depths("0,0.5,1").unwrap(), vec![0.0, 0.5, 1.0]);
        let e = parse_depths("1.5").unwrap_err().to_string();
        assert!(e.contains("1.5") && e.contains("between 0 and 1"), "{e}");
    }

    #[test]
    fn integers_in_text() {
        assert_eq!(integers("a 12, b 345."), vec!["12", "345"]);
        assert_eq!(integers("7"), vec!["7"]);
        assert!(integers("none").is_empty());
    }
}
