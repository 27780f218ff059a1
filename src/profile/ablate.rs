//! Head ablation: the measured (not first-order) cost of taking the long-range keys from one KV
//! head. Every KV head in turn gets a short rule (sink plus a local window) while all the other
//! heads keep a base attention (dense, or the short rule too: then the measure is what opening
//! that one head back to full attention recovers); the change of the mean response-token loss
//! over calibration conversations is the head's importance. `moa-optimize --head-weights` uses
//! it to weigh the heads' profiled influence (whose scale is first-order and, on the default
//! model, largest in the early layers, where the long-range keys matter least for retrieval).
//! Runs on any backend through [`crate::eval::runner::Runner`] (one GPU backend re-planned for
//! every conversation), so a 30-layer model costs `n_layer * n_head_kv + 1` passes over the
//! conversations.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::eval::runner::{AttnConfig, Runner};
use crate::eval::EvalError;
use crate::moa::optimize::validate::{sample_loss, Sample};
use crate::moa::plan::{Plan, Rule};

/// What the other heads keep while one head is ablated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum AblateBase {
    /// Every other head sees everything: the loss the short rule costs this head alone.
    Dense,
    /// Every other head has the short rule too, the ablated head is dense: the loss this head
    /// recovers (reported as `base loss - loss`, so larger is more important in both modes).
    Short,
    /// Every other head keeps its rule of a given plan: the loss change of moving one head to
    /// another rule inside that plan (a measured cost table for `moa-optimize --measured`).
    Plan,
}

/// The result: per KV head (layer-major) the loss change of each measured rule, with what
/// produced it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct HeadAblation {
    pub model: String,
    pub n_layer: usize,
    pub n_head_kv: usize,
    /// The first measured rule (tokens, fraction of the length).
    pub alpha: f32,
    pub beta: f32,
    pub base: AblateBase,
    /// With base `plan`: the plan's rules (layer-major).
    #[serde(default)]
    pub base_rules: Vec<Rule>,
    pub samples: usize,
    pub tokens_scored: usize,
    /// Mean response-token loss of the base configuration.
    pub base_loss: f64,
    /// Loss change per head for the first rule, layer-major (`dense` / `plan`: loss - base;
    /// `short`: base - loss).
    pub delta: Vec<f64>,
    /// Every measured rule.
    #[serde(default)]
    pub rules: Vec<Rule>,
    /// Loss change per head and rule, head-major (`table[h * rules.len() + r]`).
    #[serde(default)]
    pub table: Vec<f64>,
}

/// The configuration the heads are ablated from.
#[derive(Debug, Clone, Copy)]
pub enum Base<'a> {
    Dense,
    Short,
    Plan(&'a Plan),
}

#[derive(Debug, thiserror::Error)]
pub enum AblateError {
    #[error(transparent)]
    Eval(#[from] EvalError),
    #[error("calibration: {0}")]
    Data(String),
    #[error("{path}: {reason}")]
    File { path: String, reason: String },
}

impl HeadAblation {
    pub fn save(&self, path: &Path) -> Result<(), AblateError> {
        write_atomic(
            path,
            &serde_json::to_string_pretty(self).expect("serializable"),
        )
    }

    pub fn load(path: &Path) -> Result<HeadAblation, AblateError> {
        let bad = |reason: String| AblateError::File {
            path: path.display().to_string(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        let a: HeadAblation =
            serde_json::from_str(&text).map_err(|e| bad(format!("not a head ablation: {e}")))?;
        if a.delta.len() != a.n_layer * a.n_head_kv {
            return Err(bad(format!(
                "{} values for {} layers x {} KV heads",
                a.delta.len(),
                a.n_layer,
                a.n_head_kv
            )));
        }
        if let Some(v) = a.delta.iter().chain(&a.table).find(|v| !v.is_finite()) {
            return Err(bad(format!("loss change {v} is not finite")));
        }
        if a.table.len() != a.rules.len() * a.delta.len() {
            return Err(bad(format!(
                "table of {} values for {} rules x {} heads",
                a.table.len(),
                a.rules.len(),
                a.delta.len()
            )));
        }
        Ok(a)
    }
}

/// Writes `text` to `path` atomically (a table or a checkpoint: never half a file).
fn write_atomic(path: &Path, text: &str) -> Result<(), AblateError> {
    crate::util::write_file_atomic(path, text.as_bytes()).map_err(|e| AblateError::File {
        path: path.display().to_string(),
        reason: e.to_string(),
    })
}

/// Mean response-token loss of `plan` (dense when `None`) over `samples`.
pub fn mean_loss(
    runner: &Runner,
    plan: Option<&Plan>,
    samples: &[Sample],
) -> Result<(f64, usize), AblateError> {
    let cfg = AttnConfig {
        label: "ablation".into(),
        plan: plan.cloned(),
    };
    let (mut sum, mut count) = (0.0, 0usize);
    for s in samples {
        let (s_sum, s_count) = runner.with_backend(&cfg, s.tokens.len().max(2), |be| {
            sample_loss(be, s, runner.n_batch)
                .map_err(|e| EvalError::invalid("sample", e.to_string()))
        })?;
        sum += s_sum;
        count += s_count;
    }
    if count == 0 {
        return Err(AblateError::Data("no token is scored".into()));
    }
    Ok((sum / count as f64, count))
}

/// Ablates every KV head in turn with each of `rules` (`Base::Short` takes one rule);
/// `progress(done, total)` after each pass.
pub fn ablate(
    runner: &Runner,
    samples: &[Sample],
    rules: &[Rule],
    base: Base,
    progress: impl FnMut(usize, usize),
) -> Result<HeadAblation, AblateError> {
    ablate_resumable(runner, samples, rules, base, None, progress)
}

/// What an unfinished run has measured (`checkpoint` of [`ablate_resumable`]): the inputs it
/// measured (`key`), the base loss and every finished head's row.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct Partial {
    key: serde_json::Value,
    base_loss: f64,
    tokens_scored: usize,
    rows: Vec<Vec<f64>>,
}

/// The inputs a table depends on: model, rules, base rules and the samples (an FNV-1a hash of
/// their tokens and scored flags).
fn partial_key(
    model: &str,
    rules: &[Rule],
    base: Base,
    base_rules: &[Rule],
    samples: &[Sample],
) -> serde_json::Value {
    let mut bytes = Vec::new();
    for s in samples {
        for (t, &f) in s.tokens.iter().zip(&s.scored) {
            bytes.extend(t.to_le_bytes());
            bytes.push(u8::from(f));
        }
        bytes.push(0xff);
    }
    let h = super::calib::fnv1a(&bytes);
    serde_json::json!({
        "model": model,
        "rules": rules,
        "base": match base {
            Base::Dense => "dense",
            Base::Short => "short",
            Base::Plan(_) => "plan",
        },
        "base_rules": base_rules,
        "samples": samples.len(),
        "fnv1a": format!("{h:016x}"),
    })
}

/// [`ablate`] that keeps its progress in `checkpoint` (a JSON file, rewritten after every
/// head): a run stopped midway and started again with the same inputs goes on after the last
/// finished head instead of starting over; a checkpoint of other inputs is ignored and
/// replaced. The caller removes it once the table is saved.
pub fn ablate_resumable(
    runner: &Runner,
    samples: &[Sample],
    rules: &[Rule],
    base: Base,
    checkpoint: Option<&Path>,
    mut progress: impl FnMut(usize, usize),
) -> Result<HeadAblation, AblateError> {
    let c = &runner.model.config;
    let (n_layer, n_kv) = (c.n_layer, c.n_head_kv);
    let heads = n_layer * n_kv;
    let full = Rule {
        alpha: 0.0,
        beta: 1.0,
    };
    if rules.is_empty() {
        return Err(AblateError::Data("no rule to measure".into()));
    }
    let base_rules: Vec<Rule> = match base {
        Base::Dense => vec![full; heads],
        Base::Short if rules.len() == 1 => vec![rules[0]; heads],
        Base::Short => {
            return Err(AblateError::Data(
                "base short measures one rule (the short one)".into(),
            ))
        }
        Base::Plan(p) => {
            p.validate(c).map_err(|e| {
                AblateError::Data(format!("the base plan does not fit the model: {e}"))
            })?;
            p.rules.clone()
        }
    };
    let consts = match base {
        Base::Plan(p) => p.clone(),
        _ => Plan::new(n_layer, n_kv, vec![], "head ablation"),
    };
    let plan_of = |rules: Vec<Rule>| -> Plan {
        let mut p = consts.clone();
        p.rules = rules;
        p.source = "head ablation".into();
        p
    };
    // The rule the ablated head gets for each measured rule (`short`: dense among short ones).
    let other = |r: Rule| if matches!(base, Base::Short) { full } else { r };
    let total = 1 + heads * rules.len();
    let base_plan = match base {
        Base::Dense => None,
        _ => Some(plan_of(base_rules.clone())),
    };
    let model_name = super::model_identity(&runner.model).name;
    let key = partial_key(&model_name, rules, base, &base_rules, samples);
    let resumed = checkpoint
        .and_then(|p| std::fs::read_to_string(p).ok())
        .and_then(|t| serde_json::from_str::<Partial>(&t).ok())
        .filter(|p| {
            p.key == key && p.rows.len() <= heads && p.rows.iter().all(|r| r.len() == rules.len())
        });
    let mut part = match resumed {
        Some(p) => p,
        None => {
            let (base_loss, tokens_scored) = mean_loss(runner, base_plan.as_ref(), samples)?;
            Partial {
                key,
                base_loss,
                tokens_scored,
                rows: Vec::new(),
            }
        }
    };
    let (base_loss, tokens) = (part.base_loss, part.tokens_scored);
    let mut done = 1 + part.rows.len() * rules.len();
    progress(done, total);
    for h in part.rows.len()..heads {
        let mut row = Vec::with_capacity(rules.len());
        for &r in rules {
            let r = other(r);
            let d = if r == base_rules[h] {
                0.0 // the base itself
            } else {
                let mut v = base_rules.clone();
                v[h] = r;
                let (loss, _) = mean_loss(runner, Some(&plan_of(v)), samples)?;
                match base {
                    Base::Short => base_loss - loss,
                    _ => loss - base_loss,
                }
            };
            row.push(d);
            done += 1;
            progress(done, total);
        }
        part.rows.push(row);
        if let Some(path) = checkpoint {
            write_atomic(path, &serde_json::to_string(&part).expect("serializable"))?;
        }
    }
    let n_rules = rules.len();
    let table: Vec<f64> = part.rows.concat();
    Ok(HeadAblation {
        model: model_name,
        n_layer,
        n_head_kv: n_kv,
        alpha: rules[0].alpha,
        beta: rules[0].beta,
        base: match base {
            Base::Dense => AblateBase::Dense,
            Base::Short => AblateBase::Short,
            Base::Plan(_) => AblateBase::Plan,
        },
        base_rules: if matches!(base, Base::Plan(_)) {
            base_rules
        } else {
            Vec::new()
        },
        samples: samples.len(),
        tokens_scored: tokens,
        base_loss,
        delta: (0..heads).map(|h| table[h * n_rules]).collect(),
        rules: rules.to_vec(),
        table,
    })
}
