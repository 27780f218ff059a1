//! From a profile to plans: the optimization instance (per-head dropped influence of every
//! candidate at every profiled length, candidate densities at every constrained length), the
//! solver problem for one trade-off between the per-length objectives, and the Pareto front
//! (weighted sums, or an epsilon-constraint grid as the reference) with reports.
//!
//! Objective at profiled length `N_l`: the fraction of the profile's total influence at `N_l`
//! (all heads) that the plan's masks drop. Constraint at each constrained length `N`: mean
//! density `mean_h min(C_h(N), N) / N` in `[lower * b, b]` (default lower 0.9).

use crate::moa::plan::{Plan, Rule};
use crate::moa::profile_file::{packed_index, ModelIdentity, Profile, ProfileError};

use super::balance::{Balance, HeadWeights};
use super::candidates::{CandidateError, Candidates, Grid};
use super::cost::{CostError, HeadBlocks};
use super::measured::{normalize_rows, MeasuredCosts};
use super::solver::{self, Coef, Problem, Row, Solution, SolveError, SolveOptions};

#[derive(Debug, thiserror::Error)]
pub enum OptimizeError {
    #[error(transparent)]
    Profile(#[from] ProfileError),
    #[error("profile length {length}, layer {layer}, KV head {head}: {err}")]
    Cost {
        length: usize,
        layer: usize,
        head: usize,
        err: CostError,
    },
    #[error(transparent)]
    Candidates(#[from] CandidateError),
    #[error(transparent)]
    Solve(#[from] SolveError),
    #[error("{0}")]
    Settings(String),
}

/// What to optimize for.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Target mean density b.
    pub density: f64,
    /// Lower end of the density band as a fraction of b (0.9).
    pub lower: f64,
    /// Constrained lengths.
    pub lengths: Vec<usize>,
    /// At most this many distinct rules per layer.
    pub max_distinct: Option<usize>,
    /// How the heads' influence is weighed against each other (default: as profiled).
    pub balance: Balance,
    /// Measured importance per KV head; see [`HeadWeights`].
    pub head_weights: Option<HeadWeights>,
    /// Measured loss changes per head and rule replacing the profile's dropped influence.
    pub measured: Option<MeasuredCosts>,
    pub grid: Grid,
    pub solve: SolveOptions,
}

impl Settings {
    pub fn new(density: f64) -> Settings {
        Settings {
            density,
            lower: 0.9,
            lengths: vec![2048, 4096, 8192, 16384],
            max_distinct: None,
            balance: Balance::default(),
            head_weights: None,
            measured: None,
            grid: Grid::default(),
            solve: SolveOptions::default(),
        }
    }

    /// For plan notes: how the objective departs from the plain profiled influence.
    pub fn objective_label(&self) -> String {
        if let Some(m) = &self.measured {
            if m.profile_weight > 0.0 {
                return format!(", measured costs + profile x {}", m.profile_weight);
            }
            return ", measured costs".into();
        }
        let w = match &self.head_weights {
            Some(h) if h.calibrate.is_some() => ", head weights (calibrated)",
            Some(_) => ", head weights",
            None => "",
        };
        self.balance.label() + w
    }

    fn check(&self) -> Result<(), OptimizeError> {
        let bad = |s: String| Err(OptimizeError::Settings(s));
        if !(self.density > 0.0 && self.density <= 1.0) {
            return bad(format!("density {} must be in (0, 1]", self.density));
        }
        if !(0.0..=1.0).contains(&self.lower) {
            return bad(format!("lower fraction {} must be in [0, 1]", self.lower));
        }
        if self.lengths.is_empty() || self.lengths.contains(&0) {
            return bad("constrained lengths must be positive and not empty".into());
        }
        if self.max_distinct == Some(0) {
            return bad("at most 0 distinct rules per layer is impossible".into());
        }
        Ok(())
    }
}

/// The optimization instance built from a profile.
pub struct Instance {
    pub n_layer: usize,
    pub n_head_kv: usize,
    /// Span constants (sink, min_span, align) of the plans produced.
    pub consts: Plan,
    /// Profiled lengths (objectives), in profile order.
    pub profiled: Vec<usize>,
    /// Candidates evaluated at `profiled` followed by the constrained lengths not profiled.
    pub cands: Candidates,
    /// Per profiled length: per head aggregated block influence.
    pub blocks: Vec<Vec<HeadBlocks>>,
    /// Per profiled length: total influence of all heads.
    pub totals: Vec<f64>,
    /// Per profiled length: `[head][candidate]` dropped fraction of the total.
    pub dropped: Vec<Vec<f64>>,
}

/// Densities and dropped influence of one plan.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PlanReport {
    /// `(length, mean density)` at each constrained length.
    pub density: Vec<(usize, f64)>,
    /// `(length, dropped fraction)` at each profiled length.
    pub dropped: Vec<(usize, f64)>,
}

/// One plan of the front with its solver certificate.
#[derive(Debug, Clone)]
pub struct FrontPoint {
    /// Objective weights per profiled length (weighted) or the epsilon caps (epsilon mode).
    pub label: String,
    pub choice: Vec<usize>,
    pub plan: Plan,
    pub report: PlanReport,
    pub solution: Solution,
}

impl Instance {
    /// Builds the instance. `consts` carries the span constants; the profile's shape is
    /// checked against `expect` `(n_layer, n_head_kv)` when given.
    pub fn from_profile(
        profile: &Profile,
        settings: &Settings,
        consts: &Plan,
        expect: Option<(usize, usize)>,
    ) -> Result<Instance, OptimizeError> {
        settings.check()?;
        let m = &profile.header.model;
        if let Some((nl, nh)) = expect {
            if (nl, nh) != (m.n_layer, m.n_head_kv) {
                return Err(OptimizeError::Settings(format!(
                    "the profile was measured on a model with {} layers x {} KV heads; this model has {nl} x {nh}",
                    m.n_layer, m.n_head_kv
                )));
            }
        }
        let profiled: Vec<usize> = profile.header.lengths.iter().map(|e| e.length).collect();
        for e in &profile.header.lengths {
            if e.samples == 0 {
                return Err(OptimizeError::Settings(format!(
                    "profile length {} has no samples",
                    e.length
                )));
            }
        }
        let mut uniq = profiled.clone();
        uniq.sort_unstable();
        uniq.dedup();
        if uniq.len() != profiled.len() {
            return Err(OptimizeError::Settings("profile repeats a length".into()));
        }
        let mut all = profiled.clone();
        for &n in &settings.lengths {
            if !all.contains(&n) {
                all.push(n);
            }
        }
        let cands = Candidates::build(&settings.grid, consts, &profiled, &all)?;
        let heads = m.n_layer * m.n_head_kv;
        let mut blocks = Vec::with_capacity(profiled.len());
        let mut totals = Vec::with_capacity(profiled.len());
        let mut dropped = Vec::with_capacity(profiled.len());
        for (li, &n) in profiled.iter().enumerate() {
            let mut hb = Vec::with_capacity(heads);
            for layer in 0..m.n_layer {
                for head in 0..m.n_head_kv {
                    let mean = profile.mean(li, layer, head);
                    let b = HeadBlocks::new(&mean, n, profile.header.block, consts.sink as usize)
                        .map_err(|err| OptimizeError::Cost {
                        length: n,
                        layer,
                        head,
                        err,
                    })?;
                    hb.push(b);
                }
            }
            let total: f64 = hb.iter().map(|b| b.total).sum();
            if !(total > 0.0 && total.is_finite()) {
                return Err(OptimizeError::Settings(format!(
                    "profile length {n}: total influence is {total} (nothing to optimize)"
                )));
            }
            let k = cands
                .length_index(n)
                .expect("profiled lengths are candidate lengths");
            let mut scales = settings.balance.scales(&hb, m.n_head_kv);
            if let Some(hw) = &settings.head_weights {
                if hw.weights.len() != heads {
                    return Err(OptimizeError::Settings(format!(
                        "{} head weights for {heads} KV heads",
                        hw.weights.len()
                    )));
                }
                hw.apply(&mut scales, &hb, consts);
            }
            let first_order = || {
                let mut d = Vec::with_capacity(heads * cands.list.len());
                for (b, &scale) in hb.iter().zip(&scales) {
                    for c in &cands.list {
                        d.push(b.dropped(c.spans[k]) * scale);
                    }
                }
                d
            };
            let d = match &settings.measured {
                Some(m) => {
                    let mut d = m.costs(&cands, heads)?;
                    if m.profile_weight > 0.0 {
                        let mut fo = first_order();
                        normalize_rows(&mut fo, cands.list.len());
                        d.iter_mut()
                            .zip(&fo)
                            .for_each(|(v, f)| *v += m.profile_weight * f);
                    }
                    d
                }
                None => first_order(),
            };
            blocks.push(hb);
            totals.push(total);
            dropped.push(d);
        }
        Ok(Instance {
            n_layer: m.n_layer,
            n_head_kv: m.n_head_kv,
            consts: consts.clone(),
            profiled,
            cands,
            blocks,
            totals,
            dropped,
        })
    }

    pub fn n_heads(&self) -> usize {
        self.n_layer * self.n_head_kv
    }

    fn density_rows(&self, settings: &Settings) -> Vec<Row> {
        let h = self.n_heads() as f64;
        settings
            .lengths
            .iter()
            .map(|&n| {
                let k = self
                    .cands
                    .length_index(n)
                    .expect("constrained lengths are candidate lengths");
                Row {
                    name: format!("density@{n}"),
                    coef: Coef::PerOption(self.cands.list.iter().map(|c| c.density[k]).collect()),
                    lo: settings.lower * settings.density * h,
                    hi: settings.density * h,
                }
            })
            .collect()
    }

    /// The problem minimizing `sum_l w_l * dropped_l` subject to the density band, plus
    /// `dropped_l <= cap` for each `(l, cap)` in `caps` (epsilon constraints).
    pub fn problem(&self, settings: &Settings, weights: &[f64], caps: &[(usize, f64)]) -> Problem {
        let nc = self.cands.list.len();
        let mut cost = vec![0.0; self.n_heads() * nc];
        for (li, &w) in weights.iter().enumerate() {
            if w != 0.0 {
                for (x, &d) in cost.iter_mut().zip(&self.dropped[li]) {
                    *x += w * d;
                }
            }
        }
        let mut rows = self.density_rows(settings);
        for &(li, cap) in caps {
            rows.push(Row {
                name: format!("dropped@{}", self.profiled[li]),
                coef: Coef::PerChoice(self.dropped[li].clone()),
                lo: f64::NEG_INFINITY,
                hi: cap,
            });
        }
        Problem {
            n_groups: self.n_layer,
            group_size: self.n_head_kv,
            n_opt: nc,
            cost,
            rows,
            max_distinct: settings.max_distinct,
        }
    }

    /// The plan of a choice (one candidate per head).
    pub fn plan(&self, choice: &[usize], settings: &Settings, note: &str) -> Plan {
        let rules: Vec<Rule> = choice.iter().map(|&c| self.cands.list[c].rule).collect();
        let mut p = Plan::new(self.n_layer, self.n_head_kv, rules, "profiled");
        p.sink = self.consts.sink;
        p.min_span = self.consts.min_span;
        p.align = self.consts.align;
        p.density = Some(settings.density as f32);
        p.lengths = settings.lengths.iter().map(|&n| n as u32).collect();
        p.note = note.to_string();
        p
    }

    /// Density at the constrained lengths and dropped influence at the profiled lengths of any
    /// plan of this shape (for example the uniform baseline), with the runtime's span formula.
    pub fn report(&self, plan: &Plan, lengths: &[usize]) -> PlanReport {
        let density = lengths.iter().map(|&n| (n, plan.density_at(n))).collect();
        let dropped = self
            .profiled
            .iter()
            .enumerate()
            .map(|(li, &n)| {
                let d: f64 = self.blocks[li]
                    .iter()
                    .enumerate()
                    .map(|(h, b)| b.dropped(plan.span(h / self.n_head_kv, h % self.n_head_kv, n)))
                    .sum();
                (n, d / self.totals[li])
            })
            .collect();
        PlanReport { density, dropped }
    }

    /// Solves one weighted problem and builds its plan.
    pub fn solve_weighted(
        &self,
        settings: &Settings,
        weights: &[f64],
        caps: &[(usize, f64)],
        label: &str,
    ) -> Result<FrontPoint, OptimizeError> {
        if weights.len() != self.profiled.len()
            || weights.iter().any(|w| !w.is_finite() || *w < 0.0)
        {
            return Err(OptimizeError::Settings(format!(
                "need {} non-negative weights (one per profiled length), got {weights:?}",
                self.profiled.len()
            )));
        }
        let p = self.problem(settings, weights, caps);
        let s = solver::solve(&p, &settings.solve)?;
        let note = format!(
            "moa-optimize: {label}{}; density in [{:.3}, {:.3}] at {:?}; {}; gap {:.3e} ({})",
            settings.objective_label(),
            settings.lower * settings.density,
            settings.density,
            settings.lengths,
            match settings.max_distinct {
                Some(k) => format!("at most {k} rules per layer"),
                None => "no rule limit per layer".into(),
            },
            s.gap(),
            if s.optimal {
                "optimal"
            } else {
                "limit reached"
            },
        );
        let plan = self.plan(&s.choice, settings, &note);
        let report = self.report(&plan, &settings.lengths);
        Ok(FrontPoint {
            label: label.to_string(),
            choice: s.choice.clone(),
            plan,
            report,
            solution: s,
        })
    }
}

/// How the front is spanned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrontMode {
    /// Equal weights, each length alone, and each pair of lengths.
    Weighted,
    /// Minimize the longest length's objective with the others capped on a grid of `points`
    /// values between their best and worst values over the single-objective optima.
    Epsilon { points: usize },
}

fn dominates(a: &PlanReport, b: &PlanReport) -> bool {
    let tol = 1e-12;
    let le = a
        .dropped
        .iter()
        .zip(&b.dropped)
        .all(|(x, y)| x.1 <= y.1 + tol);
    let lt = a
        .dropped
        .iter()
        .zip(&b.dropped)
        .any(|(x, y)| x.1 < y.1 - tol);
    le && lt
}

/// The Pareto front: distinct, non-dominated plans. The first point is the equal-weights one.
pub fn front(
    inst: &Instance,
    settings: &Settings,
    mode: FrontMode,
) -> Result<Vec<FrontPoint>, OptimizeError> {
    let n = inst.profiled.len();
    let mut pts: Vec<FrontPoint> = Vec::new();
    let equal = vec![1.0 / n as f64; n];
    pts.push(inst.solve_weighted(settings, &equal, &[], "weights equal")?);
    let unit = |i: usize| {
        let mut w = vec![1e-3; n];
        w[i] = 1.0;
        w
    };
    let mut anchors = Vec::new();
    for i in 0..n {
        if n > 1 {
            let p = inst.solve_weighted(
                settings,
                &unit(i),
                &[],
                &format!("weight on {}", inst.profiled[i]),
            )?;
            anchors.push(p.report.clone());
            pts.push(p);
        }
    }
    match mode {
        FrontMode::Weighted => {
            for i in 0..n {
                for j in i + 1..n {
                    if n > 2 {
                        let mut w = vec![1e-3; n];
                        w[i] = 0.5;
                        w[j] = 0.5;
                        let label =
                            format!("weights on {} and {}", inst.profiled[i], inst.profiled[j]);
                        pts.push(inst.solve_weighted(settings, &w, &[], &label)?);
                    }
                }
            }
        }
        FrontMode::Epsilon { points } if n > 1 && points > 0 => {
            // Primary: the longest profiled length.
            let primary = (0..n).max_by_key(|&i| inst.profiled[i]).unwrap_or(0);
            let others: Vec<usize> = (0..n).filter(|&i| i != primary).collect();
            let ranges: Vec<(f64, f64)> = others
                .iter()
                .map(|&i| {
                    let v = anchors.iter().map(|r| r.dropped[i].1);
                    (
                        v.clone().fold(f64::INFINITY, f64::min),
                        v.fold(0.0, f64::max),
                    )
                })
                .collect();
            let total = points.pow(others.len() as u32);
            for idx in 0..total {
                let mut caps = Vec::new();
                let mut rest = idx;
                for (k, &i) in others.iter().enumerate() {
                    let step = rest % points;
                    rest /= points;
                    let (lo, hi) = ranges[k];
                    let t = (step + 1) as f64 / points as f64;
                    caps.push((i, lo + t * (hi - lo)));
                }
                let mut w = vec![1e-3; n];
                w[primary] = 1.0;
                let label = format!(
                    "min dropped@{} with {}",
                    inst.profiled[primary],
                    caps.iter()
                        .map(|&(i, c)| format!("dropped@{} <= {c:.5}", inst.profiled[i]))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                match inst.solve_weighted(settings, &w, &caps, &label) {
                    Ok(p) => pts.push(p),
                    Err(OptimizeError::Solve(SolveError::Infeasible(_))) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        FrontMode::Epsilon { .. } => {}
    }
    // Distinct plans, non-dominated (the equal-weights point always stays first).
    let mut out: Vec<FrontPoint> = Vec::new();
    for p in pts {
        if out.iter().any(|q| q.choice == p.choice) {
            continue;
        }
        out.push(p);
    }
    let keep: Vec<bool> = out
        .iter()
        .enumerate()
        .map(|(i, p)| i == 0 || !out.iter().any(|q| dominates(&q.report, &p.report)))
        .collect();
    Ok(out
        .into_iter()
        .zip(keep)
        .filter_map(|(p, k)| k.then_some(p))
        .collect())
}

/// A synthetic profile (tests, benchmarks): each head's influence is a mix of a local band (within `local`
/// tokens of the diagonal) and far keys, with a per-head global share.
pub fn synthetic_profile(
    n_layer: usize,
    n_head_kv: usize,
    lengths: &[usize],
    seed: u64,
) -> Profile {
    let model = ModelIdentity {
        name: "synthetic".into(),
        arch: "llama".into(),
        n_layer,
        n_head: n_head_kv,
        n_head_kv,
        head_dim: 64,
        n_ctx_train: 8192,
    };
    let mut p = Profile::new(model, 64, lengths, "synthetic");
    let mut s = seed;
    let mut rnd = || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((s >> 11) as f64) / (1u64 << 53) as f64
    };
    let shares: Vec<(f64, f64)> = (0..n_layer * n_head_kv)
        .map(|_| {
            let g = rnd();
            (g * g * g, 2.0 + 30.0 * rnd())
        })
        .collect();
    for (li, &length) in lengths.iter().enumerate() {
        p.header.lengths[li].samples = 2;
        let nb = length.div_ceil(64);
        for layer in 0..n_layer {
            for head in 0..n_head_kv {
                let (global, reach) = shares[layer * n_head_kv + head];
                let m = p.head_sums_mut(li, layer, head);
                for qb in 0..nb {
                    for kb in 0..=qb {
                        let d = (qb - kb) as f64;
                        let local = (-d / reach).exp();
                        let far = if kb == 0 { 0.5 } else { 1.0 / nb as f64 };
                        m[packed_index(qb, kb)] =
                            2.0 * ((1.0 - global) * local + global * far) as f32;
                    }
                }
            }
        }
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_meet_the_constraints_and_beat_uniform() {
        let prof = synthetic_profile(6, 3, &[1024, 2048, 4096], 5);
        let consts = Plan::new(1, 1, vec![], "c");
        for &(b, k) in &[(0.5, None), (0.25, None), (0.75, Some(2)), (0.5, Some(1))] {
            let mut st = Settings::new(b);
            st.lengths = vec![1024, 2048, 4096, 8192];
            st.grid = Grid::parse("-1024:4096:512,0.125").unwrap();
            st.max_distinct = k;
            let inst = Instance::from_profile(&prof, &st, &consts, Some((6, 3))).unwrap();
            let pts = front(&inst, &st, FrontMode::Weighted).unwrap();
            assert!(!pts.is_empty());
            for p in &pts {
                assert!(p.solution.optimal, "b {b} k {k:?}: not optimal");
                for &(n, d) in &p.report.density {
                    assert!(
                        d <= b + 1e-9 && d >= 0.9 * b - 1e-9,
                        "b {b}: density {d} at {n}"
                    );
                    assert!((d - p.plan.density_at(n)).abs() < 1e-12);
                }
                if let Some(k) = k {
                    for l in 0..6 {
                        let mut r: Vec<(u32, u32)> = (0..3)
                            .map(|h| {
                                let x = p.plan.rules[l * 3 + h];
                                (x.alpha.to_bits(), x.beta.to_bits())
                            })
                            .collect();
                        r.sort_unstable();
                        r.dedup();
                        assert!(r.len() <= k);
                    }
                }
                // The objective the solver saw equals the report recomputed from the plan.
                for (li, &(_, d)) in p.report.dropped.iter().enumerate() {
                    let from_choice: f64 = p
                        .choice
                        .iter()
                        .enumerate()
                        .map(|(h, &c)| inst.dropped[li][h * inst.cands.list.len() + c])
                        .sum();
                    assert!((from_choice - d).abs() < 1e-9);
                }
            }
            let eq = &pts[0];
            let uni = inst.report(&Plan::uniform(6, 3, b as f32), &st.lengths);
            let mean = |r: &PlanReport| r.dropped.iter().map(|x| x.1).sum::<f64>();
            assert!(
                mean(&eq.report) < mean(&uni),
                "b {b}: {:?} vs uniform {:?}",
                eq.report,
                uni
            );
        }
    }

    #[test]
    fn per_head_objective_weighs_every_head_the_same() {
        let prof = synthetic_profile(4, 2, &[1024, 2048], 3);
        let consts = Plan::new(1, 1, vec![], "c");
        let mut st = Settings::new(0.5);
        st.lengths = vec![1024, 2048];
        st.grid = Grid::parse("-1024:2048:512,0.125").unwrap();
        let plain = Instance::from_profile(&prof, &st, &consts, Some((4, 2))).unwrap();
        st.balance = Balance::per_head();
        let inst = Instance::from_profile(&prof, &st, &consts, Some((4, 2))).unwrap();
        let nc = inst.cands.list.len();
        let heads = inst.n_heads();
        for li in 0..2 {
            for h in 0..heads {
                let b = &inst.blocks[li][h];
                for c in 0..nc {
                    let d = inst.dropped[li][h * nc + c];
                    // Each head's share is its own dropped fraction over the number of heads.
                    assert!(d >= 0.0 && d <= 1.0 / heads as f64 + 1e-12);
                    let want = plain.dropped[li][h * nc + c] * plain.totals[li] / b.total;
                    assert!((d * heads as f64 - want).abs() < 1e-9);
                }
            }
        }
        let pts = front(&inst, &st, FrontMode::Weighted).unwrap();
        for p in &pts {
            assert!(p.plan.note.contains(", per head;"), "{}", p.plan.note);
            for &(n, d) in &p.report.density {
                assert!(
                    (0.45 - 1e-9..=0.5 + 1e-9).contains(&d),
                    "density {d} at {n}"
                );
            }
        }
    }

    #[test]
    fn shape_and_sample_errors() {
        let prof = synthetic_profile(2, 2, &[1024], 1);
        let consts = Plan::new(1, 1, vec![], "c");
        let st = Settings::new(0.5);
        let e = Instance::from_profile(&prof, &st, &consts, Some((30, 3)))
            .err()
            .unwrap();
        assert!(e.to_string().contains("2 layers x 2 KV heads"), "{e}");
        let mut p2 = prof.clone();
        p2.header.lengths[0].samples = 0;
        assert!(Instance::from_profile(&p2, &st, &consts, None)
            .err()
            .unwrap()
            .to_string()
            .contains("no samples"));
        let mut p3 = prof.clone();
        p3.sums[0][5] = f32::NAN;
        assert!(matches!(
            Instance::from_profile(&p3, &st, &consts, None),
            Err(OptimizeError::Cost { .. })
        ));
        let st = Settings::new(1.5);
        assert!(Instance::from_profile(&prof, &st, &consts, None).is_err());
    }

    #[test]
    fn epsilon_front_is_non_dominated() {
        let prof = synthetic_profile(4, 2, &[1024, 2048], 9);
        let consts = Plan::new(1, 1, vec![], "c");
        let mut st = Settings::new(0.5);
        st.lengths = vec![1024, 2048, 4096];
        let inst = Instance::from_profile(&prof, &st, &consts, None).unwrap();
        let pts = front(&inst, &st, FrontMode::Epsilon { points: 3 }).unwrap();
        for (i, a) in pts.iter().enumerate().skip(1) {
            for b in &pts {
                assert!(!dominates(&b.report, &a.report), "point {i} dominated");
            }
        }
    }
}
