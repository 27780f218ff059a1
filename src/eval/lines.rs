//! LongEval's "lines" retrieval task, as LongChat defines it and the MoA paper uses it: a record
//! of lines `line <adjective-noun>: REGISTER_CONTENT is <N>`, then a question about one line;
//! the last integer of the greedy answer is scored against that line's number.
//!
//! The prompt is wrapped in the model's chat template (one user turn); without one (raw mode)
//! the question is followed by `Answer: The <REGISTER_CONTENT> in line NAME is`. The length in
//! tokens is reached by the number of lines (so within about half a line of the request), and
//! the depth picks which line is asked about (0 = the first, 1 = the last).

use super::report::Trial;
use super::runner::{AttnConfig, Runner};
use super::{integers, trial_seed, EvalError, Rng};
use crate::chat::{ChatTemplate, Message};
use crate::tokenizer::Tokenizer;

pub const HEADER: &str = "Below is a record of lines I want you to remember. Each line begins with 'line <line index>' and contains a '<REGISTER_CONTENT>' at the end of the line as a numerical value. For each line index, memorize its corresponding <REGISTER_CONTENT>. At the end of the record, I will ask you to retrieve the corresponding <REGISTER_CONTENT> of a certain line index. Now the record start:\n\n";

const ADJECTIVES: &[&str] = &[
    "able",
    "acid",
    "agile",
    "amber",
    "ancient",
    "angry",
    "bold",
    "brave",
    "brief",
    "bright",
    "busy",
    "calm",
    "cheap",
    "chilly",
    "clever",
    "cloudy",
    "cosmic",
    "crisp",
    "curious",
    "damp",
    "dark",
    "deep",
    "eager",
    "early",
    "easy",
    "elated",
    "empty",
    "fancy",
    "fast",
    "fierce",
    "fluffy",
    "foggy",
    "fresh",
    "gentle",
    "giant",
    "glad",
    "golden",
    "grumpy",
    "happy",
    "hollow",
    "humble",
    "icy",
    "jolly",
    "keen",
    "lazy",
    "little",
    "lively",
    "lucky",
    "mellow",
    "misty",
    "modern",
    "narrow",
    "noisy",
    "odd",
    "plain",
    "polite",
    "proud",
    "quick",
    "quiet",
    "rapid",
    "righteous",
    "rusty",
    "shiny",
    "silent",
];

const NOUNS: &[&str] = &[
    "anchor", "apple", "arrow", "badge", "barrel", "basket", "beacon", "bottle", "bridge",
    "bucket", "cabin", "camera", "candle", "canyon", "castle", "cherry", "circuit", "cloud",
    "comet", "compass", "cookie", "crystal", "desert", "dragon", "engine", "ethernet", "falcon",
    "feather", "forest", "garden", "glacier", "hammer", "harbor", "helmet", "island", "jacket",
    "jungle", "kettle", "ladder", "lantern", "lemon", "magnet", "meadow", "mirror", "monkey",
    "needle", "ocean", "orchard", "panda", "pepper", "pillow", "planet", "pocket", "rabbit",
    "river", "rocket", "saddle", "school", "shadow", "spider", "tiger", "tunnel", "violin",
    "window",
];

/// All adjective-noun words of the task's vocabulary (for the copy task's passages too).
pub fn words() -> impl Iterator<Item = &'static str> {
    ADJECTIVES.iter().chain(NOUNS.iter()).copied()
}

/// One generated lines prompt.
#[derive(Debug, Clone)]
pub struct Prompt {
    pub text: String,
    pub ids: Vec<u32>,
    /// `(name, value)` of every line, in order.
    pub lines: Vec<(String, u32)>,
    /// Index of the line asked about.
    pub target: usize,
    /// Token index where the asked line starts.
    pub target_pos: usize,
}

impl Prompt {
    pub fn answer(&self) -> u32 {
        self.lines[self.target].1
    }
}

fn line(name: &str, value: u32) -> String {
    format!("line {name}: REGISTER_CONTENT is <{value}>\n")
}

fn render(
    chat: Option<&ChatTemplate>,
    lines: &[(String, u32)],
    target: &str,
) -> Result<String, EvalError> {
    let mut ctx = String::from(HEADER);
    for (n, v) in lines {
        ctx.push_str(&line(n, *v));
    }
    ctx.push_str(&format!("Now the record is over. Tell me what is the <REGISTER_CONTENT> in line {target}? I need the number."));
    Ok(match chat {
        Some(t) => t.render(&[Message::new("user", ctx)], true)?,
        None => format!("{ctx}\nAnswer: The <REGISTER_CONTENT> in line {target} is"),
    })
}

/// Builds a record of about `length` tokens and asks about the line at `depth` (seeded).
pub fn generate(
    tok: &Tokenizer,
    chat: Option<&ChatTemplate>,
    length: usize,
    depth: f64,
    seed: u64,
) -> Result<Prompt, EvalError> {
    let mut rng = Rng::new(seed);
    let mut names: Vec<String> = ADJECTIVES
        .iter()
        .flat_map(|a| NOUNS.iter().map(move |n| format!("{a}-{n}")))
        .collect();
    rng.shuffle(&mut names);
    let pool: Vec<(String, u32)> = names
        .into_iter()
        .map(|n| {
            let v = rng.range(1, 50_001) as u32;
            (n, v)
        })
        .collect();
    let count = |n: usize, t: usize| -> Result<(String, Vec<u32>), EvalError> {
        let text = render(chat, &pool[..n], &pool[t].0)?;
        let ids = tok.encode(&text, true, true)?;
        Ok((text, ids))
    };
    let fixed = count(1, 0)?.1.len();
    let per_line = (count(11, 0)?.1.len() - fixed) as f64 / 10.0;
    if fixed + 2 * per_line as usize > length {
        return Err(EvalError::TooShort {
            length,
            fixed,
            min: fixed + 2 * per_line.ceil() as usize,
        });
    }
    let target_of = |n: usize| (depth * (n - 1) as f64).round() as usize;
    let mut n = (1 + ((length - fixed) as f64 / per_line).round() as usize).clamp(2, pool.len());
    let mut best: Option<(usize, usize, String, Vec<u32>)> = None;
    for _ in 0..8 {
        let (text, ids) = count(n, target_of(n))?;
        let miss = ids.len().abs_diff(length);
        if best.as_ref().is_none_or(|b| miss < b.0) {
            best = Some((miss, n, text, ids.clone()));
        }
        let step = ((length as f64 - ids.len() as f64) / per_line).round() as i64;
        let next = (n as i64 + step).clamp(2, pool.len() as i64) as usize;
        if next == n {
            break;
        }
        n = next;
    }
    let (_, n, text, ids) = best.expect("at least one attempt");
    let target = target_of(n);
    let at = text
        .find(&line(&pool[target].0, pool[target].1))
        .ok_or_else(|| EvalError::invalid("lines prompt", "the asked line was lost"))?;
    let target_pos = tok.encode(&text[..at], true, true)?.len();
    Ok(Prompt {
        text,
        ids,
        lines: pool[..n].to_vec(),
        target,
        target_pos,
    })
}

/// LongEval's scoring: the last integer of the answer must equal the line's number.
pub fn score(answer: &str, value: u32) -> bool {
    integers(answer)
        .last()
        .is_some_and(|d| d.trim_start_matches('0') == value.to_string())
}

/// Settings of a lines run.
pub struct Settings<'a> {
    pub chat: Option<&'a ChatTemplate>,
    pub n_predict: usize,
    pub seed: u64,
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
    let seed = trial_seed(s.seed, "lines", length, depth, index);
    let p = generate(&runner.tokenizer, s.chat, length, depth, seed)?;
    let a = runner.greedy(cfg, &p.ids, s.n_predict)?;
    let ok = score(&a.text, p.answer());
    Ok(Trial {
        config: cfg.label.clone(),
        length,
        depth,
        index,
        seed,
        prompt_tokens: p.ids.len(),
        target_pos: p.target_pos,
        score: if ok { 1.0 } else { 0.0 },
        loss: None,
        baseline_loss: None,
        first_loss: None,
        expected: p.answer().to_string(),
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
    fn scorer_takes_the_last_integer() {
        assert!(score("The <REGISTER_CONTENT> in line 3 is <19147>.", 19147));
        assert!(score("19147", 19147));
        assert!(score("It is 123, sorry, 19147", 19147));
        assert!(!score("19147, or maybe 123", 19147));
        assert!(!score("1914", 19147));
        assert!(!score("no idea", 19147));
        assert!(!score("", 19147));
    }

    #[test]
    fn vocabulary_is_large_and_unique() {
        let mut w: Vec<&str> = words().collect();
        let n = w.len();
        w.sort();
        w.dedup();
        assert_eq!(w.len(), n, "duplicate words");
        assert!(ADJECTIVES.len() * NOUNS.len() >= 4000);
    }
}
