//! Filler text, and fitting a prompt to a length in tokens.
//!
//! A [`Filler`] is a long token stream (cycled when a prompt needs more) with its sentence ends
//! marked: the classic pass-key sentences repeated, or natural text read from a file. [`fit`]
//! builds a prompt around two filler slices (before and after an inserted piece) so the whole
//! prompt, as tokenized, has the requested length: the slice before is cut at a sentence end
//! near the requested depth, and the slice after is adjusted until the count is exact (or off
//! by the one or two tokens that merge across a boundary).

use std::path::Path;

use super::{EvalError, Rng};
use crate::tokenizer::Tokenizer;

/// The filler of the pass-key test as the Landmark-attention and MoA papers use it.
pub const REPEAT_TEXT: &str =
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ";

/// Sentence ends are searched for this many tokens on either side of the requested cut.
pub const SNAP_WINDOW: usize = 48;

/// A source of filler tokens.
#[derive(Debug, Clone)]
pub struct Filler {
    /// `repeat` or the file name the text came from.
    pub name: String,
    /// The token stream; position `i` of the filler is `ids[i % len]`.
    ids: Vec<u32>,
    /// `ends[i]`: token `i` ends a sentence (its text ends in `.`, `!`, `?` or a newline).
    ends: Vec<bool>,
    /// Whether the start offset is drawn from the seed (natural text) or fixed at 0.
    random_start: bool,
}

impl Filler {
    /// The repeated pass-key sentences.
    pub fn repeat(tok: &Tokenizer) -> Result<Filler, EvalError> {
        Filler::from_text(tok, "repeat", &REPEAT_TEXT.repeat(8), false)
    }

    /// Natural text from a file (at least 64 tokens); cycled from a seeded sentence start.
    pub fn from_file(tok: &Tokenizer, path: &Path) -> Result<Filler, EvalError> {
        let text = std::fs::read_to_string(path).map_err(|e| EvalError::Io {
            path: path.display().to_string(),
            source: e,
        })?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| path.display().to_string());
        Filler::from_text(tok, &name, &text, true)
    }

    /// Filler from a text (at least 64 tokens, with at least one sentence end).
    pub fn from_text(
        tok: &Tokenizer,
        name: &str,
        text: &str,
        random_start: bool,
    ) -> Result<Filler, EvalError> {
        // Whitespace runs collapse to one space, so a cut never lands inside layout.
        let flat: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
        let mut body = flat.trim().to_string();
        body.push(' ');
        let ids = tok.encode(&body, false, false)?;
        if ids.len() < 64 {
            return Err(EvalError::invalid(
                format!("filler {name}"),
                format!("has {} tokens; at least 64 are needed", ids.len()),
            ));
        }
        let ends: Vec<bool> = ids
            .iter()
            .map(|&id| {
                let b = tok.token_bytes(id);
                let t = b.trim_ascii_end();
                t.ends_with(b".") || t.ends_with(b"!") || t.ends_with(b"?")
            })
            .collect();
        if !ends.iter().any(|&e| e) {
            return Err(EvalError::invalid(
                format!("filler {name}"),
                "has no sentence end (., ! or ?)",
            ));
        }
        Ok(Filler {
            name: name.into(),
            ids,
            ends,
            random_start,
        })
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Where a prompt's filler starts: 0, or (natural text) a sentence start drawn from `rng`.
    pub fn start(&self, rng: &mut Rng) -> usize {
        if !self.random_start {
            return 0;
        }
        let starts: Vec<usize> = (0..self.ids.len())
            .filter(|&i| self.ends[i])
            .map(|i| (i + 1) % self.ids.len())
            .collect();
        starts[rng.range(0, starts.len() as u64) as usize]
    }

    /// Whether filler position `pos` (cycled) ends a sentence.
    pub fn ends_sentence(&self, pos: usize) -> bool {
        self.ends[pos % self.ids.len()]
    }

    /// The tokens of filler positions `start .. start + n` (cycled).
    pub fn ids(&self, start: usize, n: usize) -> Vec<u32> {
        (start..start + n)
            .map(|i| self.ids[i % self.ids.len()])
            .collect()
    }

    /// The text of filler positions `start .. start + n`.
    pub fn text(&self, tok: &Tokenizer, start: usize, n: usize) -> String {
        tok.decode(&self.ids(start, n))
    }

    /// The cut nearest to `want` tokens after `start` that falls right after a sentence end,
    /// searching `SNAP_WINDOW` tokens either way (within `0..=max`); `want` itself if none.
    pub fn snap(&self, start: usize, want: usize, max: usize) -> usize {
        if want == 0 || want >= max {
            return want.min(max);
        }
        for d in 0..=SNAP_WINDOW {
            for cut in [want.checked_sub(d), Some(want + d)].into_iter().flatten() {
                if cut > 0 && cut <= max && self.ends_sentence(start + cut - 1) {
                    return cut;
                }
            }
        }
        want
    }
}

/// A prompt fitted to a length.
#[derive(Debug, Clone)]
pub struct Fitted {
    pub text: String,
    /// The prompt's tokens (`encode(text, add_special = true, parse_special = true)`).
    pub ids: Vec<u32>,
    /// Tokens of the prompt without any filler.
    pub fixed: usize,
    /// Filler tokens before and after the inserted piece.
    pub before: usize,
    pub after: usize,
}

/// Builds `render(before_text, after_text)` with filler slices (from `start`) sized so the
/// tokenized prompt has `length` tokens, the cut between them placed at `depth` of the filler
/// (snapped to a sentence end). Errors when even no filler is longer than `length`.
pub fn fit(
    tok: &Tokenizer,
    filler: &Filler,
    start: usize,
    length: usize,
    depth: f64,
    render: impl Fn(&str, &str) -> Result<String, EvalError>,
) -> Result<Fitted, EvalError> {
    let encode = |t: &str| tok.encode(t, true, true);
    let empty = render("", "")?;
    let fixed = encode(&empty)?.len();
    if fixed + 8 > length {
        return Err(EvalError::TooShort {
            length,
            fixed,
            min: fixed + 8,
        });
    }
    let budget = length - fixed;
    let before = filler.snap(start, (depth * budget as f64).round() as usize, budget);
    let mut after = budget - before;
    let mut best: Option<(usize, Fitted)> = None;
    for _ in 0..8 {
        let text = render(
            &filler.text(tok, start, before),
            &filler.text(tok, start + before, after),
        )?;
        let ids = encode(&text)?;
        let n = ids.len();
        let miss = n.abs_diff(length);
        if best.as_ref().is_none_or(|(m, _)| miss < *m) {
            best = Some((
                miss,
                Fitted {
                    text,
                    ids,
                    fixed,
                    before,
                    after,
                },
            ));
        }
        if miss == 0 {
            break;
        }
        let next = (after as i64 + length as i64 - n as i64).max(0) as usize;
        if next == after {
            break;
        }
        after = next;
    }
    Ok(best.expect("at least one attempt").1)
}
