//! A span plan: per layer and KV head an elastic rule `(alpha, beta)`, and the constants of the
//! span formula (../shared/docs/moa-method.md section 1):
//!
//! ```text
//! raw_h  = trunc(alpha_h + beta_h * N)
//! C_h(N) = align * ceil(max(min(raw_h, N), min_span) / align)     (then at most N)
//! ```
//!
//! The first `sink` tokens are always visible and counted inside `C_h`. The optimizer, the
//! converter's reports and the runtime all use [`Plan::span`], so they cannot disagree.

use crate::kv::KvLayout;
use crate::model::ModelConfig;

/// One head's elastic rule.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Rule {
    /// Tokens (may be negative).
    pub alpha: f32,
    /// Fraction of the sequence length, in [0, 1].
    pub beta: f32,
}

/// Errors in a plan; each names the offending field and value.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PlanError {
    #[error("plan has {found} rules, the model needs {expected} ({n_layer} layers x {n_head_kv} KV heads)")]
    WrongShape {
        expected: usize,
        found: usize,
        n_layer: usize,
        n_head_kv: usize,
    },
    #[error("layer {layer} head {head}: {what} = {value} is not finite")]
    NotFinite {
        layer: usize,
        head: usize,
        what: &'static str,
        value: f32,
    },
    #[error("layer {layer} head {head}: beta = {beta} is outside [0, 1]")]
    BetaRange {
        layer: usize,
        head: usize,
        beta: f32,
    },
    #[error("{what} = {value}: {reason}")]
    BadConstant {
        what: &'static str,
        value: u32,
        reason: &'static str,
    },
}

/// A span plan for a model.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub n_layer: usize,
    pub n_head_kv: usize,
    /// `n_layer * n_head_kv` rules, layer-major.
    pub rules: Vec<Rule>,
    /// Always-visible leading tokens (64).
    pub sink: u32,
    /// Smallest span (128).
    pub min_span: u32,
    /// Spans are rounded up to a multiple of this (64); a power of two.
    pub align: u32,
    /// Mean density the plan was built for, if known.
    pub density: Option<f32>,
    /// Where the plan came from: `profiled`, `reference-json`, `uniform`, ...
    pub source: String,
    /// Lengths the plan was profiled or constrained at.
    pub lengths: Vec<u32>,
    /// Free text: calibration data, date, tool version.
    pub note: String,
}

/// Default constants of the method.
pub const DEFAULT_SINK: u32 = 64;
pub const DEFAULT_MIN_SPAN: u32 = 128;
pub const DEFAULT_ALIGN: u32 = 64;

impl Plan {
    /// A plan with the default constants.
    pub fn new(n_layer: usize, n_head_kv: usize, rules: Vec<Rule>, source: &str) -> Plan {
        Plan {
            n_layer,
            n_head_kv,
            rules,
            sink: DEFAULT_SINK,
            min_span: DEFAULT_MIN_SPAN,
            align: DEFAULT_ALIGN,
            density: None,
            source: source.into(),
            lengths: Vec::new(),
            note: String::new(),
        }
    }

    /// The StreamingLLM-style baseline: every head `alpha = 0, beta = density`.
    pub fn uniform(n_layer: usize, n_head_kv: usize, density: f32) -> Plan {
        let mut p = Plan::new(
            n_layer,
            n_head_kv,
            vec![
                Rule {
                    alpha: 0.0,
                    beta: density
                };
                n_layer * n_head_kv
            ],
            "uniform",
        );
        p.density = Some(density);
        p
    }

    /// Checks the constants and every rule, and the shape against a model.
    pub fn validate(&self, cfg: &ModelConfig) -> Result<(), PlanError> {
        let expected = cfg.n_layer * cfg.n_head_kv;
        if self.n_layer != cfg.n_layer
            || self.n_head_kv != cfg.n_head_kv
            || self.rules.len() != expected
        {
            return Err(PlanError::WrongShape {
                expected,
                found: self.rules.len(),
                n_layer: cfg.n_layer,
                n_head_kv: cfg.n_head_kv,
            });
        }
        self.validate_rules()
    }

    /// Checks the constants and every rule (shape-independent part of [`Plan::validate`]).
    pub fn validate_rules(&self) -> Result<(), PlanError> {
        if self.rules.len() != self.n_layer * self.n_head_kv {
            return Err(PlanError::WrongShape {
                expected: self.n_layer * self.n_head_kv,
                found: self.rules.len(),
                n_layer: self.n_layer,
                n_head_kv: self.n_head_kv,
            });
        }
        if self.align == 0 || !self.align.is_power_of_two() {
            return Err(PlanError::BadConstant {
                what: "span_align",
                value: self.align,
                reason: "must be a power of two",
            });
        }
        if self.min_span == 0 {
            return Err(PlanError::BadConstant {
                what: "min_span",
                value: self.min_span,
                reason: "must be positive",
            });
        }
        if self.sink == 0 {
            return Err(PlanError::BadConstant {
                what: "sink_tokens",
                value: self.sink,
                reason: "must be positive",
            });
        }
        if self.min_span <= self.sink {
            return Err(PlanError::BadConstant {
                what: "min_span",
                value: self.min_span,
                reason: "must exceed sink_tokens",
            });
        }
        for (i, r) in self.rules.iter().enumerate() {
            let (layer, head) = (i / self.n_head_kv, i % self.n_head_kv);
            if !r.alpha.is_finite() {
                return Err(PlanError::NotFinite {
                    layer,
                    head,
                    what: "alpha",
                    value: r.alpha,
                });
            }
            if !r.beta.is_finite() {
                return Err(PlanError::NotFinite {
                    layer,
                    head,
                    what: "beta",
                    value: r.beta,
                });
            }
            if !(0.0..=1.0).contains(&r.beta) {
                return Err(PlanError::BetaRange {
                    layer,
                    head,
                    beta: r.beta,
                });
            }
        }
        Ok(())
    }

    /// `C_h(N)` of one rule: the formula of the module documentation.
    pub fn span_of(&self, rule: Rule, n: usize) -> usize {
        let raw = (rule.alpha as f64 + rule.beta as f64 * n as f64).trunc();
        let clamped = raw.min(n as f64).max(self.min_span as f64) as usize;
        let a = self.align as usize;
        (clamped.div_ceil(a) * a).min(n.max(self.min_span as usize).div_ceil(a) * a)
    }

    /// `C_h(N)` of head `head` of layer `layer`.
    pub fn span(&self, layer: usize, head: usize, n: usize) -> usize {
        self.span_of(self.rules[layer * self.n_head_kv + head], n)
    }

    /// All spans at length `n`, layer-major.
    pub fn spans(&self, n: usize) -> Vec<usize> {
        self.rules.iter().map(|&r| self.span_of(r, n)).collect()
    }

    /// Mean density at length `n`: `mean_h min(C_h, N) / N`.
    pub fn density_at(&self, n: usize) -> f64 {
        let s: usize = self.spans(n).iter().map(|&c| c.min(n)).sum();
        s as f64 / (self.rules.len() * n) as f64
    }

    /// The KV cache layout for `n_seq` sequences planned at length `n` (capacities clamped to
    /// `n`, so a head whose span covers the sequence is dense).
    pub fn layout(&self, cfg: &ModelConfig, n_seq: usize, n: usize) -> KvLayout {
        KvLayout::with_capacities(
            n_seq,
            cfg.n_layer,
            cfg.n_head_kv,
            cfg.head_dim,
            n,
            self.sink as usize,
            self.spans(n),
        )
        .expect("validated plans give valid capacities (spans >= min_span > sink)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(rules: Vec<Rule>) -> Plan {
        let n = rules.len();
        Plan::new(1, n, rules, "test")
    }

    #[test]
    fn span_formula_matches_the_method() {
        let p = plan(vec![]);
        let r = |alpha, beta| Rule { alpha, beta };
        // Hand-computed: raw, clamp to [128, N], round up to 64.
        assert_eq!(p.span_of(r(0.0, 0.5), 8192), 4096);
        assert_eq!(p.span_of(r(1000.0, 0.0), 8192), 1024);
        assert_eq!(p.span_of(r(-2048.0, 0.25), 8192), 128); // raw 0 -> minimum
        assert_eq!(p.span_of(r(-2048.0, 0.5), 8192), 2048);
        assert_eq!(p.span_of(r(100.0, 0.0), 8192), 128);
        assert_eq!(p.span_of(r(129.0, 0.0), 8192), 192);
        assert_eq!(p.span_of(r(0.0, 1.0), 8192), 8192);
        assert_eq!(p.span_of(r(8192.0, 1.0), 4096), 4096); // never more than N
        assert_eq!(p.span_of(r(0.0, 0.3), 1000), 320); // trunc(300) -> 320
        assert_eq!(p.span_of(r(0.0, 1.0), 1000), 1024); // N not a multiple of 64: C >= N covers it
    }

    #[test]
    fn density_and_validation() {
        let u = Plan::uniform(2, 2, 0.5);
        assert!((u.density_at(8192) - 0.5).abs() < 1e-9);
        let mut bad = Plan::uniform(2, 2, 0.5);
        bad.rules[3].beta = 1.5;
        assert_eq!(
            bad.validate_rules(),
            Err(PlanError::BetaRange {
                layer: 1,
                head: 1,
                beta: 1.5
            })
        );
        bad.rules[3] = Rule {
            alpha: f32::NAN,
            beta: 0.5,
        };
        assert!(matches!(
            bad.validate_rules(),
            Err(PlanError::NotFinite { what: "alpha", .. })
        ));
        let mut bad = Plan::uniform(2, 2, 0.5);
        bad.align = 48;
        assert!(bad
            .validate_rules()
            .unwrap_err()
            .to_string()
            .contains("span_align = 48"));
    }
}
