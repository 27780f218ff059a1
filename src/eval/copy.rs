//! Long-range copying: a random passage (seeded words) placed at a chosen depth of the filler,
//! then repeated at the end of a prompt of a chosen length; the repeat is scored teacher-forced:
//! mean loss (nats per token) and top-1 accuracy on its tokens. The first occurrence, unseen
//! random words, gives the loss to compare with. It shows whether far tokens stay reachable,
//! even for models too small to answer questions: a head whose window no longer covers the
//! first occurrence cannot copy from it.
//!
//! Layout: `<filler>\nSecret passage: w1 w2 ... wk\n<filler>\nSecret passage: w1 w2 ... wk`
//! Both occurrences follow the same marker, so they tokenize identically; the scored tokens are
//! the repeated words (no punctuation, which could merge with the newline). Note that the first 64 tokens of a sequence are
//! sinks (always visible), so a passage at depth 0 is partly visible to every head.

use super::filler::{fit, Filler};
use super::report::Trial;
use super::runner::{AttnConfig, Runner};
use super::{trial_seed, EvalError, Rng};
use crate::tokenizer::Tokenizer;

pub const MARKER: &str = "\nSecret passage:";

/// One generated copy prompt.
#[derive(Debug, Clone)]
pub struct Prompt {
    pub text: String,
    pub ids: Vec<u32>,
    pub passage: String,
    /// Token ranges of the passage's first occurrence and of its repeat (the prompt's end).
    pub first: std::ops::Range<usize>,
    pub repeat: std::ops::Range<usize>,
}

/// `words` random words from the task vocabulary.
pub fn passage(rng: &mut Rng, words: usize) -> String {
    let vocab: Vec<&str> = super::lines::words().collect();
    let w: Vec<&str> = (0..words)
        .map(|_| vocab[rng.range(0, vocab.len() as u64) as usize])
        .collect();
    format!(" {}", w.join(" "))
}

/// Builds a prompt of `length` tokens whose passage of `words` words sits at `depth`.
pub fn generate(
    tok: &Tokenizer,
    filler: &Filler,
    length: usize,
    depth: f64,
    words: usize,
    seed: u64,
) -> Result<Prompt, EvalError> {
    if words == 0 {
        return Err(EvalError::invalid("--passage-words", "must be at least 1"));
    }
    let mut rng = Rng::new(seed);
    let passage = passage(&mut rng, words);
    let start = filler.start(&mut rng);
    let block = format!("{MARKER}{passage}\n");
    let render = |before: &str, after: &str| -> Result<String, EvalError> {
        Ok(format!("{before}{block}{after}{MARKER}{passage}"))
    };
    let f = fit(tok, filler, start, length, depth, render)?;
    let enc = |t: &str| tok.encode(t, true, true).map(|v| v.len());
    let first_at = f.text.find(&block).expect("the passage is in the prompt") + MARKER.len();
    let first_start = enc(&f.text[..first_at])?;
    let first_end = enc(&f.text[..first_at + passage.len()])?;
    let repeat_at = f.text.len() - passage.len();
    let repeat_start = enc(&f.text[..repeat_at])?;
    let (first, repeat) = (first_start..first_end, repeat_start..f.ids.len());
    if f.ids[first.clone()] != f.ids[repeat.clone()] {
        return Err(EvalError::invalid(
            "copy prompt",
            "the two occurrences of the passage tokenize differently",
        ));
    }
    Ok(Prompt {
        text: f.text,
        ids: f.ids,
        passage,
        first,
        repeat,
    })
}

/// Loss and accuracy of one copy trial.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CopyScore {
    /// Mean nats per token on the repeat.
    pub repeat_loss: f64,
    /// Mean nats per token on the first occurrence (nothing to copy from).
    pub first_loss: f64,
    /// Fraction of repeated tokens that were the top-1 prediction.
    pub top1: f64,
}

/// Scores the passage's two occurrences from per-position losses and top-1 hits, where entry
/// `i` is about prompt token `from + i`.
pub fn score(p: &Prompt, from: usize, nll: &[f64], top1: &[bool]) -> CopyScore {
    let mean = |r: &std::ops::Range<usize>| {
        let v = &nll[r.start - from..r.end - from];
        v.iter().sum::<f64>() / v.len().max(1) as f64
    };
    let hits = &top1[p.repeat.start - from..p.repeat.end - from];
    CopyScore {
        repeat_loss: mean(&p.repeat),
        first_loss: mean(&p.first),
        top1: hits.iter().filter(|&&h| h).count() as f64 / hits.len().max(1) as f64,
    }
}

/// Settings of a copy run.
pub struct Settings<'a> {
    pub filler: &'a Filler,
    pub words: usize,
    pub seed: u64,
}

/// Generates and runs one trial (score = top-1 accuracy on the repeat, loss = its mean nll).
pub fn trial(
    runner: &Runner,
    cfg: &AttnConfig,
    s: &Settings,
    length: usize,
    depth: f64,
    index: usize,
) -> Result<Trial, EvalError> {
    let seed = trial_seed(s.seed, "copy", length, depth, index);
    let p = generate(&runner.tokenizer, s.filler, length, depth, s.words, seed)?;
    let from = p.first.start.max(1);
    let r = runner.teacher_forced(cfg, &p.ids, from)?;
    let c = score(&p, from, &r.nll, &r.top1);
    Ok(Trial {
        config: cfg.label.clone(),
        length,
        depth,
        index,
        seed,
        prompt_tokens: p.ids.len(),
        target_pos: p.first.start,
        score: c.top1,
        loss: Some(c.repeat_loss),
        baseline_loss: Some(c.first_loss),
        first_loss: None,
        expected: p.passage,
        answer: String::new(),
        n_plan: p.ids.len(),
        kv_bytes: r.kv_bytes,
        kv_bytes_dense: r.kv_bytes_dense,
        seconds: r.seconds,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake(first: std::ops::Range<usize>, repeat: std::ops::Range<usize>) -> Prompt {
        Prompt {
            text: String::new(),
            ids: vec![0; repeat.end],
            passage: String::new(),
            first,
            repeat,
        }
    }

    #[test]
    fn scorer_on_hand_made_losses() {
        // Tokens 2..4 first occurrence, 8..10 the repeat; losses given from token 1.
        let p = fake(2..4, 8..10);
        let nll = [9.0, 6.0, 8.0, 1.0, 1.0, 1.0, 1.0, 0.5, 0.1];
        let top1 = [false, false, false, true, true, true, true, true, false];
        let s = score(&p, 1, &nll, &top1);
        assert!((s.first_loss - 7.0).abs() < 1e-12, "{s:?}");
        assert!((s.repeat_loss - 0.3).abs() < 1e-12, "{s:?}");
        assert!((s.top1 - 0.5).abs() < 1e-12, "{s:?}");
    }

    #[test]
    fn passages_are_seeded() {
        let a = passage(&mut Rng::new(3), 12);
        assert_eq!(a, passage(&mut Rng::new(3), 12));
        assert_ne!(a, passage(&mut Rng::new(4), 12));
        assert_eq!(a.split_whitespace().count(), 12);
        assert!(a.starts_with(' ') && !a.ends_with(' '));
    }
}
