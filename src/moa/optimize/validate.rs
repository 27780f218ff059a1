//! Choosing among the front's plans: mean cross-entropy of the response tokens of held-out
//! conversations, run on the CPU backend with each plan (moa-method.md section 7: the final plan
//! is the front point with the lowest validation loss at a length that was not profiled).
//!
//! Input: JSONL, one conversation per line, either the calibration format written by
//! `moa-profile` (`{"tokens": [...], "response": [[start, end], ...], "split": "val", ...}`;
//! other fields ignored; lines whose `split` is present and not `val` are skipped unless none
//! is `val`) or `{"tokens": [...], "response_mask": [0/1, ...]}` with one mask entry per token.
//! A token at position `t` is scored when it is a response token and `t >= 1` (its logits come
//! from position `t - 1`). Each conversation runs from an empty cache with the plan's spans
//! planned at its own length (as the runtime plans `N` = prompt length).

use std::path::Path;
use std::sync::Arc;

use serde_json::Value;

use crate::backend::Backend;
use crate::graph::BatchBuf;
use crate::moa::plan::Plan;
use crate::model::Model;
use crate::perplexity::nll;
use crate::runtime;

/// One validation conversation.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub tokens: Vec<u32>,
    /// Per token: scored or not.
    pub scored: Vec<bool>,
}

#[derive(Debug, thiserror::Error)]
pub enum ValidateError {
    #[error("{path}: {err}")]
    Io { path: String, err: std::io::Error },
    #[error("{path}:{line}: {reason}")]
    Bad {
        path: String,
        line: usize,
        reason: String,
    },
    #[error("{0}")]
    Run(String),
}

fn parse_line(v: &Value) -> Result<Sample, String> {
    let o = v.as_object().ok_or("not a JSON object")?;
    let tokens: Vec<u32> = o
        .get("tokens")
        .and_then(Value::as_array)
        .ok_or("missing \"tokens\" array")?
        .iter()
        .map(|t| t.as_u64().and_then(|x| u32::try_from(x).ok()))
        .collect::<Option<_>>()
        .ok_or("\"tokens\" must hold unsigned 32-bit integers")?;
    let n = tokens.len();
    let mut scored = vec![false; n];
    if let Some(m) = o.get("response_mask") {
        let m = m.as_array().ok_or("\"response_mask\" must be an array")?;
        if m.len() != n {
            return Err(format!(
                "\"response_mask\" has {} entries for {n} tokens",
                m.len()
            ));
        }
        for (i, x) in m.iter().enumerate() {
            scored[i] = match x.as_u64() {
                Some(0) => false,
                Some(1) => true,
                _ => return Err(format!("response_mask[{i}] must be 0 or 1")),
            };
        }
    } else if let Some(r) = o.get("response") {
        let r = r
            .as_array()
            .ok_or("\"response\" must be an array of [start, end]")?;
        for (i, range) in r.iter().enumerate() {
            let pair = range
                .as_array()
                .filter(|a| a.len() == 2)
                .and_then(|a| Some((a[0].as_u64()? as usize, a[1].as_u64()? as usize)))
                .ok_or_else(|| format!("response[{i}] must be [start, end]"))?;
            if pair.0 > pair.1 || pair.1 > n {
                return Err(format!(
                    "response[{i}] = {pair:?} is outside the {n} tokens"
                ));
            }
            for s in &mut scored[pair.0..pair.1] {
                *s = true;
            }
        }
    } else {
        return Err("needs \"response\" ranges or a \"response_mask\"".into());
    }
    if n > 0 {
        scored[0] = false;
    }
    if !scored.iter().any(|&s| s) {
        return Err("no response token to score".into());
    }
    Ok(Sample { tokens, scored })
}

/// Reads a validation file (see the module documentation).
pub fn load(path: &Path) -> Result<Vec<Sample>, ValidateError> {
    let p = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|err| ValidateError::Io {
        path: p.clone(),
        err,
    })?;
    let mut all = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |reason: String| ValidateError::Bad {
            path: p.clone(),
            line: i + 1,
            reason,
        };
        let v: Value = serde_json::from_str(line).map_err(|e| bad(e.to_string()))?;
        let split = v.get("split").and_then(Value::as_str).map(str::to_string);
        all.push((split, parse_line(&v).map_err(bad)?));
    }
    if all.is_empty() {
        return Err(ValidateError::Bad {
            path: p,
            line: 0,
            reason: "no conversations".into(),
        });
    }
    let has_val = all.iter().any(|(s, _)| s.as_deref() == Some("val"));
    Ok(all
        .into_iter()
        .filter(|(s, _)| !has_val || s.as_deref().is_none_or(|s| s == "val"))
        .map(|(_, x)| x)
        .collect())
}

/// Mean cross-entropy of the scored tokens of one conversation on `backend` (sequence 0, cleared
/// first); returns `(sum of nll, tokens scored)`.
pub fn sample_loss(
    backend: &mut dyn Backend,
    s: &Sample,
    n_batch: usize,
) -> Result<(f64, usize), ValidateError> {
    let n_batch = n_batch.max(1);
    let nv = backend.n_vocab();
    if let Some(&t) = s.tokens.iter().find(|&&t| t as usize >= nv) {
        return Err(ValidateError::Run(format!(
            "token id {t} is outside the vocabulary ({nv})"
        )));
    }
    backend.clear(0);
    let mut batch = BatchBuf::with_capacity(n_batch);
    let (mut sum, mut count) = (0.0, 0);
    let n = s.tokens.len();
    let mut pos = 0;
    while pos < n {
        let m = n_batch.min(n - pos);
        batch.clear();
        for k in 0..m {
            let p = pos + k;
            let want = p + 1 < n && s.scored[p + 1];
            batch.push(s.tokens[p], p as u32, 0, want);
        }
        backend
            .forward(&batch.as_batch())
            .map_err(|e| ValidateError::Run(e.to_string()))?;
        let logits = backend.logits();
        let mut row = 0;
        for p in pos..pos + m {
            if p + 1 < n && s.scored[p + 1] {
                sum += nll(&logits[row * nv..(row + 1) * nv], s.tokens[p + 1]);
                count += 1;
                row += 1;
            }
        }
        pos += m;
    }
    Ok((sum, count))
}

/// Mean response-token cross-entropy of `plan` (dense when `None`) over `samples`, each run with
/// the plan planned at the sample's own length.
pub fn plan_loss(
    model: &Arc<Model>,
    plan: Option<&Plan>,
    samples: &[Sample],
    n_batch: usize,
    threads: usize,
) -> Result<f64, ValidateError> {
    if let Some(p) = plan {
        p.validate(&model.config)
            .map_err(|e| ValidateError::Run(format!("plan does not fit the model: {e}")))?;
    }
    let (mut sum, mut count) = (0.0, 0usize);
    for s in samples {
        let n = s.tokens.len();
        let mut be = runtime::cpu_backend_with_plan(model, plan, n.max(2), 1, n_batch, threads)
            .map_err(|e| ValidateError::Run(e.to_string()))?;
        let (s_sum, s_count) = sample_loss(&mut be, s, n_batch)?;
        sum += s_sum;
        count += s_count;
    }
    if count == 0 {
        return Err(ValidateError::Run("no token scored".into()));
    }
    Ok(sum / count as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_formats_parse() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("v.jsonl");
        std::fs::write(
            &f,
            "{\"tokens\":[1,2,3,4],\"response_mask\":[0,0,1,1]}\n\
             {\"id\":\"a\",\"split\":\"val\",\"tokens\":[5,6,7],\"response\":[[1,3]]}\n",
        )
        .unwrap();
        let s = load(&f).unwrap();
        // The second line says split=val, so the line without a split is kept too.
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].scored, vec![false, false, true, true]);
        assert_eq!(s[1].scored, vec![false, true, true]);
        std::fs::write(&f, "{\"tokens\":[1,2],\"split\":\"calib\",\"response\":[[1,2]]}\n{\"tokens\":[1,2],\"split\":\"val\",\"response\":[[1,2]]}\n").unwrap();
        assert_eq!(load(&f).unwrap().len(), 1);
        for bad in [
            "{\"tokens\":[1,2],\"response_mask\":[0]}",
            "{\"tokens\":[1,2]}",
            "{\"tokens\":[1,-2],\"response_mask\":[0,1]}",
            "{\"tokens\":[1,2],\"response\":[[1,5]]}",
            "{\"tokens\":[1,2],\"response_mask\":[1,0]}",
            "[1,2]",
        ] {
            std::fs::write(&f, bad).unwrap();
            let e = load(&f).unwrap_err().to_string();
            assert!(e.contains(":1:"), "{bad}: {e}");
        }
    }
}
