//! The pass-key test: a random five-digit key hidden in filler at a chosen depth of a prompt of
//! a chosen length (in tokens), then the question; the greedy answer is right when the key
//! appears in it as a whole number.
//!
//! Prompt (raw completion, as in the Landmark-attention and MoA papers):
//!
//! ```text
//! There is an important info hidden inside a lot of irrelevant text. Find it and memorize it.
//! I will quiz you about the important information there.
//! <filler> The pass key is 71432. Remember it. 71432 is the pass key.<filler>
//! What is the pass key? The pass key is
//! ```
//!
//! With a chat template, everything up to the question is the user turn, and the assistant turn
//! starts with `The pass key is`.

use super::filler::{fit, Filler};
use super::report::Trial;
use super::runner::{AttnConfig, Runner};
use super::{integers, trial_seed, EvalError, Rng};
use crate::chat::{ChatTemplate, Message};
use crate::tokenizer::Tokenizer;

pub const INTRO: &str = "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. I will quiz you about the important information there.";
pub const QUESTION: &str = "What is the pass key?";
pub const ANSWER_PREFIX: &str = "The pass key is";

/// The needle sentence for a key.
pub fn needle(key: &str) -> String {
    format!(" The pass key is {key}. Remember it. {key} is the pass key.")
}

/// One generated pass-key prompt.
#[derive(Debug, Clone)]
pub struct Prompt {
    pub text: String,
    pub ids: Vec<u32>,
    pub key: String,
    /// Token index where the needle starts.
    pub needle_pos: usize,
    /// Filler tokens before and after the needle.
    pub before: usize,
    pub after: usize,
}

impl Prompt {
    /// Where the needle sits, as a fraction of the filler (0 = right after the introduction).
    pub fn depth(&self) -> f64 {
        self.before as f64 / (self.before + self.after).max(1) as f64
    }
}

/// Builds the prompt of `length` tokens with the key at `depth` of the filler (seeded).
pub fn generate(
    tok: &Tokenizer,
    filler: &Filler,
    chat: Option<&ChatTemplate>,
    length: usize,
    depth: f64,
    seed: u64,
) -> Result<Prompt, EvalError> {
    let mut rng = Rng::new(seed);
    let key = rng.range(10_000, 100_000).to_string();
    let start = filler.start(&mut rng);
    let needle = needle(&key);
    let render = |before: &str, after: &str| -> Result<String, EvalError> {
        let context = format!("{INTRO}\n{before}{needle}{after}\n{QUESTION}");
        Ok(match chat {
            None => format!("{context} {ANSWER_PREFIX}"),
            Some(t) => {
                let mut s = t.render(&[Message::new("user", context)], true)?;
                s.push_str(ANSWER_PREFIX);
                s
            }
        })
    };
    let f = fit(tok, filler, start, length, depth, render)?;
    let at = f
        .text
        .find(&needle)
        .ok_or_else(|| EvalError::invalid("pass-key prompt", "the needle was lost"))?;
    let needle_pos = tok.encode(&f.text[..at], true, true)?.len();
    Ok(Prompt {
        text: f.text,
        ids: f.ids,
        key,
        needle_pos,
        before: f.before,
        after: f.after,
    })
}

/// Whether the answer contains the key as a whole number.
pub fn score(answer: &str, key: &str) -> bool {
    integers(answer).contains(&key)
}

/// Settings of a pass-key run.
pub struct Settings<'a> {
    pub filler: &'a Filler,
    pub chat: Option<&'a ChatTemplate>,
    pub n_predict: usize,
    pub seed: u64,
    /// Also score the key itself: the mean loss of its tokens (` 71432` after the prompt),
    /// teacher-forced in a second pass (a continuous measure next to the all-or-nothing answer).
    pub key_loss: bool,
}

/// The tokens of the right answer after the prompt: the key with its leading space.
pub fn key_tokens(tok: &Tokenizer, key: &str) -> Result<Vec<u32>, EvalError> {
    Ok(tok.encode(&format!(" {key}"), false, false)?)
}

/// Generates and runs one trial.
pub fn trial(
    runner: &Runner,
    cfg: &AttnConfig,
    s: &Settings,
    length: usize,
    depth: f64,
    index: usize,
) -> Result<Trial, EvalError> {
    let seed = trial_seed(s.seed, "passkey", length, depth, index);
    let p = generate(&runner.tokenizer, s.filler, s.chat, length, depth, seed)?;
    let a = runner.greedy(cfg, &p.ids, s.n_predict)?;
    let ok = score(&a.text, &p.key);
    let (loss, first_loss) = if s.key_loss {
        let mut ids = p.ids.clone();
        ids.extend(key_tokens(&runner.tokenizer, &p.key)?);
        let r = runner.teacher_forced(cfg, &ids, p.ids.len())?;
        (Some(r.mean_nll(0..r.nll.len())), r.nll.first().copied())
    } else {
        (None, None)
    };
    Ok(Trial {
        config: cfg.label.clone(),
        length,
        depth,
        index,
        seed,
        prompt_tokens: p.ids.len(),
        target_pos: p.needle_pos,
        score: if ok { 1.0 } else { 0.0 },
        loss,
        baseline_loss: None,
        first_loss,
        expected: p.key,
        answer: a.text,
        n_plan: a.n_plan,
        kv_bytes: a.kv_bytes,
        kv_bytes_dense: a.kv_bytes_dense,
        seconds: a.seconds,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scorer_on_hand_made_answers() {
        assert!(score(" 71432. Remember it.", "71432"));
        assert!(score("71432", "71432"));
        assert!(score(" is 12345, no wait, 71432", "71432"));
        assert!(!score(" 7143.", "71432"));
        assert!(!score(" 714321", "71432"));
        assert!(!score(" 71 432", "71432"));
        assert!(!score(" I don't know", "71432"));
        assert!(!score("", "71432"));
    }

    #[test]
    fn needle_holds_the_key_twice() {
        let n = needle("55555");
        assert_eq!(integers(&n), vec!["55555", "55555"]);
    }
}
