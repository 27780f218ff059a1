//! Running a task's prompt on the model under one attention configuration: greedy answers and
//! teacher-forced losses, each on a backend whose KV cache is planned for the sequence's planned
//! length (prompt + tokens to generate, as `moa-run` plans it), on the device `--device` chose.
//!
//! A span plan's capacities depend on the planned length, so every trial needs its own cache
//! layout. The runner keeps the last trial's backend and re-plans it for the next
//! ([`Backend::replan`]): on the GPU the weights, buffers and kernels stay, only the cache
//! grows when a longer length needs it. A backend that cannot re-plan (the CPU's, cheap to make)
//! is made anew for each trial.
//!
//! An [`AttnConfig`] is one column of a comparison: dense, the model's embedded plan, a plan
//! file, or the uniform baseline at a density. `moa-eval --configs dense,uniform:0.5,...` runs
//! several on the same prompts.

use std::cell::{Cell, RefCell};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use super::EvalError;
use crate::backend::{Backend, BackendOptions};
use crate::generate::Session;
use crate::graph::BatchBuf;
use crate::kv::KvTypes;
use crate::moa::Plan;
use crate::model::Model;
use crate::perplexity::nll;
use crate::runtime::{self, Device, PlanArgs, RuntimeError};
use crate::tokenizer::Tokenizer;

/// What attention a configuration asks for, before it is resolved against a model.
#[derive(Debug, Clone, PartialEq)]
pub enum AttnSpec {
    Dense,
    /// The plan embedded in the model (an error if it has none).
    Embedded,
    /// The plan embedded in the model, or dense when it has none (the tools' default).
    Default,
    Uniform(f32),
    PlanFile(PathBuf),
}

impl AttnSpec {
    /// Parses one item of `--configs`: `dense`, `embedded`, `uniform:D`, `plan:FILE`.
    pub fn parse(s: &str) -> Result<AttnSpec, EvalError> {
        let s = s.trim();
        let bad = |reason: &str| EvalError::invalid(format!("config {s:?}"), reason);
        match s.split_once(':') {
            None if s == "dense" => Ok(AttnSpec::Dense),
            None if s == "embedded" => Ok(AttnSpec::Embedded),
            Some(("uniform", d)) => match d.parse::<f32>() {
                Ok(d) if d > 0.0 && d <= 1.0 => Ok(AttnSpec::Uniform(d)),
                _ => Err(bad("the uniform density must be a number in (0, 1]")),
            },
            Some(("plan", f)) if !f.is_empty() => Ok(AttnSpec::PlanFile(f.into())),
            _ => Err(bad(
                "expected dense, embedded, uniform:D (0 < D <= 1) or plan:FILE",
            )),
        }
    }

    /// Parses a comma-separated `--configs` list.
    pub fn parse_list(s: &str) -> Result<Vec<AttnSpec>, EvalError> {
        let v: Vec<AttnSpec> = s
            .split(',')
            .filter(|p| !p.trim().is_empty())
            .map(AttnSpec::parse)
            .collect::<Result<_, _>>()?;
        if v.is_empty() {
            return Err(EvalError::invalid("--configs", "the list is empty"));
        }
        Ok(v)
    }

    /// The configuration the shared plan flags (`--dense`, `--plan`, `--uniform`) ask for.
    pub fn from_plan_args(a: &PlanArgs) -> AttnSpec {
        if a.dense {
            AttnSpec::Dense
        } else if let Some(p) = &a.plan {
            AttnSpec::PlanFile(p.clone())
        } else if let Some(d) = a.uniform {
            AttnSpec::Uniform(d)
        } else {
            AttnSpec::Default
        }
    }

    /// Resolves against a model (loading and validating the plan).
    pub fn resolve(&self, model: &Model) -> Result<AttnConfig, EvalError> {
        let args = |a: PlanArgs| a.resolve(model);
        let (label, plan) = match self {
            AttnSpec::Dense => ("dense".to_string(), None),
            AttnSpec::Default => {
                let plan = args(PlanArgs::default())?;
                let label = if plan.is_some() { "embedded" } else { "dense" };
                (label.to_string(), plan)
            }
            AttnSpec::Embedded => {
                let plan = args(PlanArgs::default())?;
                if plan.is_none() {
                    return Err(EvalError::invalid(
                        "config embedded",
                        "the model has no embedded span plan (moa.* keys); embed one with moa-convert or use plan:FILE",
                    ));
                }
                ("embedded".to_string(), plan)
            }
            AttnSpec::Uniform(d) => (
                format!("uniform {d}"),
                args(PlanArgs {
                    uniform: Some(*d),
                    ..PlanArgs::default()
                })?,
            ),
            AttnSpec::PlanFile(p) => {
                let name = p
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_else(|| p.display().to_string());
                (
                    format!("plan {name}"),
                    args(PlanArgs {
                        plan: Some(p.clone()),
                        ..PlanArgs::default()
                    })?,
                )
            }
        };
        Ok(AttnConfig { label, plan })
    }
}

/// A resolved attention configuration.
#[derive(Debug, Clone)]
pub struct AttnConfig {
    /// Column name in the reports: `dense`, `embedded`, `uniform 0.5`, `plan NAME`.
    pub label: String,
    /// `None` is dense attention.
    pub plan: Option<Plan>,
}

impl AttnConfig {
    pub fn dense() -> AttnConfig {
        AttnConfig {
            label: "dense".into(),
            plan: None,
        }
    }

    /// Density at planned length `n` (1 for dense).
    pub fn density_at(&self, n: usize) -> f64 {
        self.plan.as_ref().map_or(1.0, |p| p.density_at(n))
    }

    /// f16 KV cache bytes of one sequence at planned length `n`, and the dense figure.
    pub fn kv_bytes(&self, model: &Model, n: usize) -> (u64, u64) {
        let c = &model.config;
        let dense = (c.n_layer * c.n_head_kv * n) as u64 * c.head_dim as u64 * 4;
        let kv = self
            .plan
            .as_ref()
            .map_or(dense, |p| crate::moa::report::kv_bytes(p, c.head_dim, n));
        (kv, dense)
    }
}

/// The model, tokenizer and run settings shared by every trial, and the backend they run on.
pub struct Runner {
    pub model: Arc<Model>,
    pub tokenizer: Tokenizer,
    /// Largest planned length (prompt + generated) a trial may have.
    pub n_ctx: usize,
    pub n_batch: usize,
    pub threads: usize,
    /// KV cache element types of every trial's backend.
    pub kv_types: KvTypes,
    /// `cpu` or `cuda` (`auto` is resolved when the runner is made).
    device: Device,
    /// The last trial's backend, kept for the next one to re-plan.
    spare: RefCell<Option<Box<dyn Backend>>>,
    stats: Cell<BackendStats>,
    /// [`Backend::describe`] of the last backend made.
    described: RefCell<Option<String>>,
}

/// How the trials got their backends.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct BackendStats {
    /// Backends made (weights set up, buffers allocated).
    pub made: usize,
    /// Trials that re-planned the previous trial's backend instead.
    pub replanned: usize,
    /// Seconds spent making and re-planning backends, in all.
    pub setup_seconds: f64,
}

/// A greedy answer.
#[derive(Debug, Clone)]
pub struct Answer {
    /// Generated ids, without the end-of-generation token that stopped it (if any).
    pub ids: Vec<u32>,
    pub text: String,
    /// Planned length the cache was sized for.
    pub n_plan: usize,
    pub kv_bytes: usize,
    pub kv_bytes_dense: usize,
    pub seconds: f64,
}

/// Teacher-forced scores of a span of tokens.
#[derive(Debug, Clone)]
pub struct Scored {
    /// Negative log-likelihood (nats) of each scored token given everything before it.
    pub nll: Vec<f64>,
    /// Whether each scored token was the model's top-1 prediction.
    pub top1: Vec<bool>,
    pub kv_bytes: usize,
    pub kv_bytes_dense: usize,
    pub seconds: f64,
}

impl Scored {
    pub fn mean_nll(&self, range: std::ops::Range<usize>) -> f64 {
        let v = &self.nll[range];
        v.iter().sum::<f64>() / v.len().max(1) as f64
    }
    pub fn top1_rate(&self, range: std::ops::Range<usize>) -> f64 {
        let v = &self.top1[range];
        v.iter().filter(|&&b| b).count() as f64 / v.len().max(1) as f64
    }
}

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

impl Runner {
    /// A runner on `device`; `auto` is resolved here (the GPU when usable, else the CPU with a
    /// notice), and `cuda` without a usable GPU is an error.
    pub fn new(
        model: Arc<Model>,
        tokenizer: Tokenizer,
        n_ctx: usize,
        n_batch: usize,
        threads: usize,
        kv_types: KvTypes,
        device: Device,
    ) -> Result<Runner, EvalError> {
        if n_batch == 0 {
            return Err(EvalError::invalid("batch size", "must be at least 1"));
        }
        Ok(Runner {
            model,
            tokenizer,
            n_ctx,
            n_batch,
            threads,
            kv_types,
            device: runtime::resolve_device(device, kv_types)?,
            spare: RefCell::new(None),
            stats: Cell::new(BackendStats::default()),
            described: RefCell::new(None),
        })
    }

    /// The device trials run on: `cpu` or `cuda`.
    pub fn device(&self) -> Device {
        self.device
    }

    /// The backend's own description (`cuda (NVIDIA H100 ...)`, `cpu (avx2, 2 threads)`) once
    /// a trial has made one.
    pub fn backend_description(&self) -> Option<String> {
        self.described.borrow().clone()
    }

    /// How the trials so far got their backends.
    pub fn backend_stats(&self) -> BackendStats {
        self.stats.get()
    }

    /// Runs `f` on a backend holding one empty sequence of planned length `n` under `cfg`: the
    /// previous trial's backend re-planned when it can be, else a new one. Batches may hold up
    /// to `n_batch` tokens (at most `n_ctx`) whatever `n` is, so the backend can be re-planned
    /// for any length up to `n_ctx`.
    pub fn with_backend<R>(
        &self,
        cfg: &AttnConfig,
        n: usize,
        f: impl FnOnce(&mut dyn Backend) -> Result<R, EvalError>,
    ) -> Result<R, EvalError> {
        let t0 = Instant::now();
        let layout = runtime::layout_for(&self.model, cfg.plan.as_ref(), 1, n)
            .with_types(self.kv_types)
            .map_err(RuntimeError::from)?;
        let mut stats = self.stats.get();
        let mut spare = self.spare.borrow_mut().take();
        let replanned = match spare.as_mut() {
            Some(be) => be.replan(&layout)?,
            None => false,
        };
        let mut be = match spare {
            Some(be) if replanned => {
                stats.replanned += 1;
                be
            }
            spare => {
                // The old backend goes before the new one is made (its memory with it).
                drop(spare);
                let opts = BackendOptions {
                    max_batch: self.n_batch.min(self.n_ctx.max(n)).max(1),
                    threads: self.threads,
                    layout,
                };
                let be = runtime::backend_with_options(&self.model, opts, self.device)?;
                *self.described.borrow_mut() = Some(be.describe());
                stats.made += 1;
                be
            }
        };
        stats.setup_seconds += t0.elapsed().as_secs_f64();
        self.stats.set(stats);
        let r = f(be.as_mut())?;
        *self.spare.borrow_mut() = Some(be);
        Ok(r)
    }

    fn check_fits(&self, prompt: usize, n_predict: usize) -> Result<usize, EvalError> {
        if prompt == 0 {
            return Err(EvalError::invalid("prompt", "is empty"));
        }
        if prompt + n_predict > self.n_ctx {
            return Err(EvalError::TooLong {
                prompt,
                n_predict,
                n_ctx: self.n_ctx,
            });
        }
        Ok(prompt + n_predict.max(1))
    }

    /// Greedy continuation of `prompt`: at most `n_predict` tokens, stopping at end of
    /// generation. The cache is planned for `prompt + n_predict` tokens.
    pub fn greedy(
        &self,
        cfg: &AttnConfig,
        prompt: &[u32],
        n_predict: usize,
    ) -> Result<Answer, EvalError> {
        let n_plan = self.check_fits(prompt.len(), n_predict)?;
        let t0 = Instant::now();
        self.with_backend(cfg, n_plan, |be| {
            let (kv_bytes, kv_bytes_dense) = (be.kv_bytes(), be.kv_layout().dense_bytes());
            let mut s = Session::new(be, 0, self.n_batch);
            let mut next = argmax(s.prompt(prompt)?);
            let mut ids = Vec::new();
            while ids.len() < n_predict && !self.tokenizer.is_eog(next) {
                ids.push(next);
                if ids.len() == n_predict || s.remaining() == 0 {
                    break;
                }
                next = argmax(s.step(next)?);
            }
            Ok(Answer {
                text: self.tokenizer.decode(&ids),
                ids,
                n_plan,
                kv_bytes,
                kv_bytes_dense,
                seconds: t0.elapsed().as_secs_f64(),
            })
        })
    }

    /// Feeds `ids` (planned length `ids.len()`) and scores the tokens at positions `from..`
    /// (each given all tokens before it). `from` must be at least 1.
    pub fn teacher_forced(
        &self,
        cfg: &AttnConfig,
        ids: &[u32],
        from: usize,
    ) -> Result<Scored, EvalError> {
        if from == 0 || from >= ids.len() {
            return Err(EvalError::invalid(
                "scored range",
                format!("must start in 1..{} (got {from})", ids.len()),
            ));
        }
        let n = self.check_fits(ids.len(), 0)?;
        let t0 = Instant::now();
        self.with_backend(cfg, n, |be| {
            let (kv_bytes, kv_bytes_dense) = (be.kv_bytes(), be.kv_layout().dense_bytes());
            let nv = be.n_vocab();
            let n_batch = self.n_batch.min(n).max(1);
            let mut batch = BatchBuf::with_capacity(n_batch);
            let (mut nlls, mut top1) = (Vec::new(), Vec::new());
            let mut pos = 0;
            // Position p's logits predict token p + 1; positions from - 1 .. len - 2 are needed.
            let wants = |p: usize| p + 1 >= from && p + 1 < ids.len();
            while pos < ids.len() {
                let k = n_batch.min(ids.len() - pos);
                batch.clear();
                for (p, &id) in ids.iter().enumerate().skip(pos).take(k) {
                    batch.push(id, p as u32, 0, wants(p));
                }
                be.forward(&batch.as_batch())?;
                let logits = be.logits();
                for (row, p) in (pos..pos + k).filter(|&p| wants(p)).enumerate() {
                    let l = &logits[row * nv..(row + 1) * nv];
                    nlls.push(nll(l, ids[p + 1]));
                    top1.push(argmax(l) == ids[p + 1]);
                }
                pos += k;
            }
            Ok(Scored {
                nll: nlls,
                top1,
                kv_bytes,
                kv_bytes_dense,
                seconds: t0.elapsed().as_secs_f64(),
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_specs_parse() {
        assert_eq!(AttnSpec::parse("dense").unwrap(), AttnSpec::Dense);
        assert_eq!(AttnSpec::parse("embedded").unwrap(), AttnSpec::Embedded);
        assert_eq!(
            AttnSpec::parse("uniform:0.25").unwrap(),
            AttnSpec::Uniform(0.25)
        );
        assert_eq!(
            AttnSpec::parse("plan:plans/x.json").unwrap(),
            AttnSpec::PlanFile("plans/x.json".into())
        );
        for bad in [
            "uniform:0",
            "uniform:1.5",
            "uniform:x",
            "plan:",
            "sparse",
            "",
        ] {
            let e = AttnSpec::parse(bad).unwrap_err().to_string();
            assert!(e.contains("config"), "{bad}: {e}");
        }
        assert_eq!(
            AttnSpec::parse_list("dense, uniform:0.5").unwrap(),
            vec![AttnSpec::Dense, AttnSpec::Uniform(0.5)]
        );
        assert!(AttnSpec::parse_list(" , ").is_err());
    }
}
