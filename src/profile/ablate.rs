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
}

/// The result: one importance per KV head (layer-major), with what produced it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct HeadAblation {
    pub model: String,
    pub n_layer: usize,
    pub n_head_kv: usize,
    /// The short rule (tokens, fraction of the length).
    pub alpha: f32,
    pub beta: f32,
    pub base: AblateBase,
    pub samples: usize,
    pub tokens_scored: usize,
    /// Mean response-token loss of the base configuration.
    pub base_loss: f64,
    /// Loss change per head, layer-major (`dense`: loss - base; `short`: base - loss).
    pub delta: Vec<f64>,
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
        let text = serde_json::to_string_pretty(self).expect("serializable");
        crate::util::write_file_atomic(path, text.as_bytes()).map_err(|e| AblateError::File {
            path: path.display().to_string(),
            reason: e.to_string(),
        })
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
        if let Some(v) = a.delta.iter().find(|v| !v.is_finite()) {
            return Err(bad(format!("loss change {v} is not finite")));
        }
        Ok(a)
    }
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

/// Ablates every KV head in turn; `progress(done, total)` after each pass.
pub fn ablate(
    runner: &Runner,
    samples: &[Sample],
    short: Rule,
    base: AblateBase,
    mut progress: impl FnMut(usize, usize),
) -> Result<HeadAblation, AblateError> {
    let c = &runner.model.config;
    let (n_layer, n_kv) = (c.n_layer, c.n_head_kv);
    let full = Rule {
        alpha: 0.0,
        beta: 1.0,
    };
    let (fill, other) = match base {
        AblateBase::Dense => (full, short),
        AblateBase::Short => (short, full),
    };
    let plan_with = |head: Option<usize>| -> Plan {
        let mut rules = vec![fill; n_layer * n_kv];
        if let Some(h) = head {
            rules[h] = other;
        }
        Plan::new(n_layer, n_kv, rules, "head ablation")
    };
    let total = n_layer * n_kv + 1;
    let base_plan = match base {
        AblateBase::Dense => None,
        AblateBase::Short => Some(plan_with(None)),
    };
    let (base_loss, tokens) = mean_loss(runner, base_plan.as_ref(), samples)?;
    progress(1, total);
    let mut delta = Vec::with_capacity(n_layer * n_kv);
    for h in 0..n_layer * n_kv {
        let (loss, _) = mean_loss(runner, Some(&plan_with(Some(h))), samples)?;
        delta.push(match base {
            AblateBase::Dense => loss - base_loss,
            AblateBase::Short => base_loss - loss,
        });
        progress(h + 2, total);
    }
    Ok(HeadAblation {
        model: super::model_identity(&runner.model).name,
        n_layer,
        n_head_kv: n_kv,
        alpha: short.alpha,
        beta: short.beta,
        base,
        samples: samples.len(),
        tokens_scored: tokens,
        base_loss,
        delta,
    })
}
