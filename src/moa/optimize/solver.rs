//! The exact solver: choose one option per head (a multiple-choice knapsack) minimizing a cost,
//! subject to a few two-sided linear rows (`lo_r <= sum_h a_r(h, c_h) <= hi_r`) and, optionally,
//! at most K distinct options per group of heads (per layer).
//!
//! Method (all in this crate, no external MILP solver):
//! 1. **Bound**: the Lagrangian dual over the rows ([`super::dual`]), maximized with Kelley's
//!    cutting planes. With a K limit, the inner problem keeps the limit per group (enumerating the
//!    K-subsets of options when that is affordable), which gives a stronger bound than the LP.
//! 2. **Incumbent**: the dual's minimizer, repaired to feasibility by greedy moves (best ratio of
//!    violation removed to cost added), then improved by single and paired moves.
//! 3. **Proof**: reduced-cost fixing removes every option whose Lagrangian bound already reaches
//!    the incumbent, then a depth-first branch and bound over the heads that keep several options,
//!    bounding each node by the Lagrangian at the dual's multipliers (with the K limit per group)
//!    and pruning rows that can no longer be met. A complete search proves optimality (the
//!    reported bound is the smallest bound among pruned nodes); a search stopped by the time or
//!    node limit reports the dual bound, and the gap between them.

use std::time::{Duration, Instant};

use super::dual::Master;

/// Coefficients of one row: the same for every head (by option), or per (head, option).
#[derive(Debug, Clone, PartialEq)]
pub enum Coef {
    /// `n_opt` values.
    PerOption(Vec<f64>),
    /// `n_heads * n_opt` values, head-major.
    PerChoice(Vec<f64>),
}

/// A side constraint `lo <= sum_h a(h, c_h) <= hi`.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub name: String,
    pub coef: Coef,
    pub lo: f64,
    pub hi: f64,
}

/// The problem: `n_groups * group_size` heads (group-major), `n_opt` options each.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    pub n_groups: usize,
    pub group_size: usize,
    pub n_opt: usize,
    /// `n_heads * n_opt` costs, head-major.
    pub cost: Vec<f64>,
    pub rows: Vec<Row>,
    /// At most this many distinct options per group.
    pub max_distinct: Option<usize>,
}

/// Limits of the search.
#[derive(Debug, Clone)]
pub struct SolveOptions {
    pub time_limit: Duration,
    pub node_limit: u64,
    /// Stop when `cost - bound <= max(abs_gap, rel_gap * |cost|)`.
    pub rel_gap: f64,
    pub abs_gap: f64,
    /// Kelley iterations of the dual.
    pub dual_iters: usize,
}

impl Default for SolveOptions {
    fn default() -> Self {
        SolveOptions {
            time_limit: Duration::from_secs(60),
            node_limit: 20_000_000,
            rel_gap: 1e-9,
            abs_gap: 1e-12,
            dual_iters: 400,
        }
    }
}

/// A solution with its certificate.
#[derive(Debug, Clone, PartialEq)]
pub struct Solution {
    /// Option per head.
    pub choice: Vec<usize>,
    pub cost: f64,
    /// Proven lower bound on the optimum.
    pub bound: f64,
    /// True when the search completed (gap within the tolerance).
    pub optimal: bool,
    /// Value of each row at the solution.
    pub row_values: Vec<f64>,
    pub nodes: u64,
    pub dual_iters: usize,
    /// Heads left with several options after reduced-cost fixing.
    pub active_heads: usize,
    pub seconds: f64,
}

impl Solution {
    /// `cost - bound` (>= 0).
    pub fn gap(&self) -> f64 {
        (self.cost - self.bound).max(0.0)
    }

    /// Gap relative to the cost (0 when the cost is 0).
    pub fn rel_gap(&self) -> f64 {
        if self.cost.abs() > 0.0 {
            self.gap() / self.cost.abs()
        } else {
            0.0
        }
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SolveError {
    #[error("invalid problem: {0}")]
    Invalid(String),
    #[error("no assignment satisfies the constraints: {0}")]
    Infeasible(String),
    #[error("no feasible assignment found within the limits ({nodes} nodes, {seconds:.1} s)")]
    NotFound { nodes: u64, seconds: f64 },
}

/// Beyond this many (subset, head) evaluations per group, the K limit is relaxed in bounds.
const ENUM_CAP: usize = 400_000;

impl Problem {
    pub fn n_heads(&self) -> usize {
        self.n_groups * self.group_size
    }

    /// Coefficient of row `r` for head `h` choosing option `c`.
    #[inline]
    pub fn coef(&self, r: usize, h: usize, c: usize) -> f64 {
        match &self.rows[r].coef {
            Coef::PerOption(v) => v[c],
            Coef::PerChoice(v) => v[h * self.n_opt + c],
        }
    }

    /// The K limit when it actually restricts something.
    fn k_limit(&self) -> Option<usize> {
        self.max_distinct
            .filter(|&k| k < self.n_opt && k < self.group_size)
    }

    /// Checks sizes and values.
    pub fn check(&self) -> Result<(), SolveError> {
        let bad = |s: String| Err(SolveError::Invalid(s));
        if self.n_heads() == 0 || self.n_opt == 0 {
            return bad("no heads or no options".into());
        }
        if self.cost.len() != self.n_heads() * self.n_opt {
            return bad(format!(
                "{} costs for {} heads x {} options",
                self.cost.len(),
                self.n_heads(),
                self.n_opt
            ));
        }
        if let Some(i) = self.cost.iter().position(|v| !v.is_finite()) {
            return bad(format!("cost {i} is not finite"));
        }
        if self.max_distinct == Some(0) {
            return bad("at most 0 distinct options per group".into());
        }
        for r in &self.rows {
            let (n, v) = match &r.coef {
                Coef::PerOption(v) => (self.n_opt, v),
                Coef::PerChoice(v) => (self.n_heads() * self.n_opt, v),
            };
            if v.len() != n {
                return bad(format!(
                    "row {}: {} coefficients, expected {n}",
                    r.name,
                    v.len()
                ));
            }
            if v.iter().any(|x| !x.is_finite()) || r.lo.is_nan() || r.hi.is_nan() {
                return bad(format!("row {}: non-finite coefficient or bound", r.name));
            }
            if r.lo > r.hi {
                return bad(format!(
                    "row {}: lower bound {} above upper bound {}",
                    r.name, r.lo, r.hi
                ));
            }
        }
        Ok(())
    }

    /// Cost and row values of an assignment.
    pub fn evaluate(&self, choice: &[usize]) -> (f64, Vec<f64>) {
        let mut cost = 0.0;
        let mut rows = vec![0.0; self.rows.len()];
        for (h, &c) in choice.iter().enumerate() {
            cost += self.cost[h * self.n_opt + c];
            for (r, v) in rows.iter_mut().enumerate() {
                *v += self.coef(r, h, c);
            }
        }
        (cost, rows)
    }

    fn row_tol(&self, r: usize) -> f64 {
        let fin = |x: f64| if x.is_finite() { x.abs() } else { 0.0 };
        1e-9 * (1.0 + fin(self.rows[r].lo).max(fin(self.rows[r].hi)))
    }

    /// Whether an assignment satisfies every row (with a 1e-9 relative tolerance) and the K limit.
    pub fn feasible(&self, choice: &[usize]) -> bool {
        if choice.len() != self.n_heads() || choice.iter().any(|&c| c >= self.n_opt) {
            return false;
        }
        let (_, rows) = self.evaluate(choice);
        for (r, &v) in rows.iter().enumerate() {
            let t = self.row_tol(r);
            if v < self.rows[r].lo - t || v > self.rows[r].hi + t {
                return false;
            }
        }
        if let Some(k) = self.max_distinct {
            for g in 0..self.n_groups {
                let mut seen: Vec<usize> =
                    choice[g * self.group_size..(g + 1) * self.group_size].to_vec();
                seen.sort_unstable();
                seen.dedup();
                if seen.len() > k {
                    return false;
                }
            }
        }
        true
    }

    /// Lagrangian values `cost + lambda . a` for every (head, option).
    fn values(&self, lam: &[f64]) -> Vec<f64> {
        let mut v = self.cost.clone();
        for (r, &l) in lam.iter().enumerate() {
            if l == 0.0 {
                continue;
            }
            match &self.rows[r].coef {
                Coef::PerOption(a) => {
                    for row in v.chunks_mut(self.n_opt) {
                        for (x, &ac) in row.iter_mut().zip(a) {
                            *x += l * ac;
                        }
                    }
                }
                Coef::PerChoice(a) => {
                    for (x, &ac) in v.iter_mut().zip(a) {
                        *x += l * ac;
                    }
                }
            }
        }
        v
    }

    fn lambda_const(&self, lam: &[f64]) -> f64 {
        lam.iter()
            .zip(&self.rows)
            .map(|(&l, r)| {
                if l > 0.0 {
                    -l * r.hi
                } else if l < 0.0 {
                    -l * r.lo
                } else {
                    0.0
                }
            })
            .sum()
    }
}

/// Visits every `k`-subset of `pool` (indices in increasing order).
fn for_each_subset(pool: &[usize], k: usize, mut f: impl FnMut(&[usize])) {
    let n = pool.len();
    if k > n {
        return;
    }
    let mut idx: Vec<usize> = (0..k).collect();
    let mut set = vec![0; k];
    loop {
        for (s, &i) in set.iter_mut().zip(&idx) {
            *s = pool[i];
        }
        f(&set);
        // Next combination.
        let mut i = k;
        loop {
            if i == 0 {
                return;
            }
            i -= 1;
            if idx[i] != i + n - k {
                break;
            }
            if i == 0 {
                return;
            }
        }
        if idx[i] == i + n - k {
            return;
        }
        idx[i] += 1;
        for j in i + 1..k {
            idx[j] = idx[j - 1] + 1;
        }
    }
}

fn binom(n: usize, k: usize) -> usize {
    let k = k.min(n - k.min(n));
    let mut r: usize = 1;
    for i in 0..k {
        r = r.saturating_mul(n - i) / (i + 1);
        if r > usize::MAX / 4 {
            return usize::MAX / 4;
        }
    }
    r
}

/// The inner minimum of one group: heads `free` (each with its allowed options) plus the options
/// `must` already in use, at most `k` distinct options in all (no limit when `k` is `None`).
/// Returns the minimum of `sum_free min_{c in S} v`, the minimizing option per free head, and, when
/// `fix` is given, for each free head and allowed option the minimum with that head forced to it.
struct GroupMin {
    value: f64,
    choice: Vec<usize>,
    exact: bool,
}

fn group_min(
    v: &[f64],
    n_opt: usize,
    free: &[(usize, &[usize])],
    must: &[usize],
    k: Option<usize>,
    mut fix: Option<&mut Vec<Vec<f64>>>,
) -> Option<GroupMin> {
    let relaxed =
        |fix: Option<&mut Vec<Vec<f64>>>, restrict: Option<&[usize]>| -> Option<GroupMin> {
            let mut value = 0.0;
            let mut choice = Vec::with_capacity(free.len());
            let mut mins = Vec::with_capacity(free.len());
            for &(h, allowed) in free {
                let mut best: Option<(usize, f64)> = None;
                for &c in allowed {
                    if restrict.is_some_and(|s| !s.contains(&c)) {
                        continue;
                    }
                    let x = v[h * n_opt + c];
                    if best.is_none_or(|(_, b)| x < b) {
                        best = Some((c, x));
                    }
                }
                let (c, x) = best?;
                value += x;
                choice.push(c);
                mins.push(x);
            }
            if let Some(fx) = fix {
                for (i, &(h, allowed)) in free.iter().enumerate() {
                    fx[i] = allowed
                        .iter()
                        .map(|&c| value - mins[i] + v[h * n_opt + c])
                        .collect();
                }
            }
            Some(GroupMin {
                value,
                choice,
                exact: true,
            })
        };
    let Some(k) = k else {
        return relaxed(fix, None);
    };
    if must.len() > k {
        return None;
    }
    if must.len() == k {
        let r = relaxed(None, Some(must))?;
        if let Some(fx) = fix {
            // Forcing a head to an option outside `must` breaks the limit.
            for (i, &(h, allowed)) in free.iter().enumerate() {
                let mh = v[h * n_opt + r.choice[i]];
                fx[i] = allowed
                    .iter()
                    .map(|&c| {
                        if must.contains(&c) {
                            r.value - mh + v[h * n_opt + c]
                        } else {
                            f64::INFINITY
                        }
                    })
                    .collect();
            }
        }
        return Some(r);
    }
    let mut pool: Vec<usize> = free
        .iter()
        .flat_map(|&(_, a)| a.iter().copied())
        .filter(|c| !must.contains(c))
        .collect();
    pool.sort_unstable();
    pool.dedup();
    let extra = (k - must.len()).min(pool.len());
    let n_sets = binom(pool.len(), extra);
    if n_sets.saturating_mul(free.len().max(1)) > ENUM_CAP {
        // Too many subsets: relax the limit (a valid, weaker bound).
        let mut r = relaxed(fix, None)?;
        r.exact = false;
        return Some(r);
    }
    let mut best: Option<(f64, Vec<usize>)> = None;
    let mut set = must.to_vec();
    let mut mins = vec![0.0; free.len()];
    let mut arg = vec![0usize; free.len()];
    if let Some(fx) = fix.as_deref_mut() {
        for (i, &(_, allowed)) in free.iter().enumerate() {
            fx[i] = vec![f64::INFINITY; allowed.len()];
        }
    }
    // Position of each option in each free head's allowed list (usize::MAX: not allowed).
    let pos: Vec<Vec<usize>> = free
        .iter()
        .map(|&(_, allowed)| {
            let mut q = vec![usize::MAX; n_opt];
            for (j, &c) in allowed.iter().enumerate() {
                q[c] = j;
            }
            q
        })
        .collect();
    for_each_subset(&pool, extra, |ext| {
        set.truncate(must.len());
        set.extend_from_slice(ext);
        let mut total = 0.0;
        for (i, &(h, _)) in free.iter().enumerate() {
            let mut m = f64::INFINITY;
            let mut a = usize::MAX;
            for &c in &set {
                if pos[i][c] != usize::MAX {
                    let x = v[h * n_opt + c];
                    if x < m {
                        m = x;
                        a = c;
                    }
                }
            }
            if a == usize::MAX {
                return; // a free head has no option in this set
            }
            mins[i] = m;
            arg[i] = a;
            total += m;
        }
        if best.as_ref().is_none_or(|(b, _)| total < *b) {
            best = Some((total, arg.clone()));
        }
        if let Some(fx) = fix.as_deref_mut() {
            for (i, &(h, _)) in free.iter().enumerate() {
                for &c in &set {
                    let j = pos[i][c];
                    if j != usize::MAX {
                        let x = total - mins[i] + v[h * n_opt + c];
                        if x < fx[i][j] {
                            fx[i][j] = x;
                        }
                    }
                }
            }
        }
    });
    let (value, choice) = best?;
    Some(GroupMin {
        value,
        choice,
        exact: true,
    })
}

/// One evaluation of the Lagrangian: bound, supergradient, minimizer, minimizer's row values.
struct LagEval {
    g: f64,
    sub: Vec<f64>,
    choice: Vec<usize>,
}

fn lagrangian(p: &Problem, lam: &[f64], use_k: bool, all: &[usize]) -> Option<LagEval> {
    let v = p.values(lam);
    let k = if use_k { p.k_limit() } else { None };
    let mut g = p.lambda_const(lam);
    let mut choice = Vec::with_capacity(p.n_heads());
    for grp in 0..p.n_groups {
        let free: Vec<(usize, &[usize])> = (grp * p.group_size..(grp + 1) * p.group_size)
            .map(|h| (h, all))
            .collect();
        let m = group_min(&v, p.n_opt, &free, &[], k, None)?;
        g += m.value;
        choice.extend(m.choice);
    }
    let (_, d) = p.evaluate(&choice);
    let sub = d
        .iter()
        .zip(&p.rows)
        .zip(lam)
        .map(|((&d, r), &l)| {
            if l > 0.0 {
                d - r.hi
            } else if l < 0.0 {
                d - r.lo
            } else if d > r.hi {
                d - r.hi
            } else if d < r.lo {
                d - r.lo
            } else {
                0.0
            }
        })
        .collect();
    Some(LagEval { g, sub, choice })
}

/// Maximizes the Lagrangian with Kelley's method from `lam0`; returns the best evaluation, its
/// multipliers and the iterations used.
fn maximize_dual(
    p: &Problem,
    use_k: bool,
    lam0: &[f64],
    box_bound: &[(f64, f64)],
    iters: usize,
    deadline: Instant,
    found: &mut Option<(f64, Vec<usize>)>,
) -> Option<(LagEval, Vec<f64>, usize)> {
    let all: Vec<usize> = (0..p.n_opt).collect();
    let first = lagrangian(p, lam0, use_k, &all)?;
    offer(found, p, &first.choice);
    if p.rows.is_empty() {
        return Some((first, vec![], 0));
    }
    if !first.g.is_finite() {
        return None;
    }
    let mut master = Master::new(box_bound, lam0, first.g, &first.sub);
    let mut best = (first, lam0.to_vec());
    let mut it = 0;
    while it < iters && Instant::now() < deadline {
        it += 1;
        let Some((t, lam)) = master.optimize() else {
            break;
        };
        if t - best.0.g <= 1e-11 * (1.0 + best.0.g.abs()) {
            break;
        }
        let e = lagrangian(p, &lam, use_k, &all)?;
        master.add_cut(&lam, e.g, &e.sub);
        offer(found, p, &e.choice);
        if e.g > best.0.g {
            best = (e, lam);
        }
    }
    Some((best.0, best.1, it))
}

/// Keeps `x` as the incumbent when it is feasible and cheaper.
fn offer(found: &mut Option<(f64, Vec<usize>)>, p: &Problem, x: &[usize]) {
    if p.feasible(x) {
        let (c, _) = p.evaluate(x);
        if found.as_ref().is_none_or(|(b, _)| c < *b) {
            *found = Some((c, x.to_vec()));
        }
    }
}

/// Incremental state of an assignment for the primal heuristic.
struct Walk<'a> {
    p: &'a Problem,
    x: Vec<usize>,
    rows: Vec<f64>,
    cost: f64,
    /// Per group, how many heads use each option.
    counts: Vec<Vec<u32>>,
    distinct: Vec<usize>,
    scale: Vec<f64>,
}

impl<'a> Walk<'a> {
    fn new(p: &'a Problem, x: Vec<usize>) -> Walk<'a> {
        let (cost, rows) = p.evaluate(&x);
        let mut counts = vec![vec![0u32; p.n_opt]; p.n_groups];
        for (h, &c) in x.iter().enumerate() {
            counts[h / p.group_size][c] += 1;
        }
        let distinct = counts
            .iter()
            .map(|c| c.iter().filter(|&&n| n > 0).count())
            .collect();
        // Row scale: the largest change one head can make (violations in "head moves").
        let scale = (0..p.rows.len())
            .map(|r| {
                let mut s: f64 = 0.0;
                for h in 0..p.n_heads() {
                    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
                    for c in 0..p.n_opt {
                        let a = p.coef(r, h, c);
                        lo = lo.min(a);
                        hi = hi.max(a);
                    }
                    s = s.max(hi - lo);
                }
                if s > 0.0 {
                    s
                } else {
                    1.0
                }
            })
            .collect();
        Walk {
            p,
            x,
            rows,
            cost,
            counts,
            distinct,
            scale,
        }
    }

    fn violation_of(&self, rows: &[f64]) -> f64 {
        let mut s = 0.0;
        for (r, &v) in rows.iter().enumerate() {
            let row = &self.p.rows[r];
            let t = self.p.row_tol(r);
            let over = (v - row.hi - t).max(0.0) + (row.lo - t - v).max(0.0);
            s += over / self.scale[r];
        }
        s
    }

    fn allowed_move(&self, h: usize, c: usize) -> bool {
        let Some(k) = self.p.max_distinct else {
            return true;
        };
        let g = h / self.p.group_size;
        let old = self.x[h];
        if c == old || self.counts[g][c] > 0 {
            return true;
        }
        // A new option: allowed if the limit has room or h was the only user of its option.
        self.distinct[g] < k || self.counts[g][old] == 1
    }

    fn moved_rows(&self, h: usize, c: usize, out: &mut [f64]) {
        let old = self.x[h];
        for (r, o) in out.iter_mut().enumerate() {
            *o = self.rows[r] - self.p.coef(r, h, old) + self.p.coef(r, h, c);
        }
    }

    fn apply(&mut self, h: usize, c: usize) {
        let p = self.p;
        let old = self.x[h];
        if old == c {
            return;
        }
        let g = h / p.group_size;
        for r in 0..self.rows.len() {
            self.rows[r] += p.coef(r, h, c) - p.coef(r, h, old);
        }
        self.cost += p.cost[h * p.n_opt + c] - p.cost[h * p.n_opt + old];
        self.counts[g][old] -= 1;
        if self.counts[g][old] == 0 {
            self.distinct[g] -= 1;
        }
        if self.counts[g][c] == 0 {
            self.distinct[g] += 1;
        }
        self.counts[g][c] += 1;
        self.x[h] = c;
    }

    /// Greedy repair: moves removing the most violation per cost added.
    fn repair(&mut self) -> bool {
        let p = self.p;
        let mut buf = vec![0.0; self.rows.len()];
        for _ in 0..(4 * p.n_heads() + 16) {
            let viol = self.violation_of(&self.rows);
            if viol == 0.0 {
                return true;
            }
            let mut best: Option<(f64, usize, usize)> = None;
            for h in 0..p.n_heads() {
                for c in 0..p.n_opt {
                    if c == self.x[h] || !self.allowed_move(h, c) {
                        continue;
                    }
                    self.moved_rows(h, c, &mut buf);
                    let gain = viol - self.violation_of(&buf);
                    if gain <= 1e-15 {
                        continue;
                    }
                    let dc = p.cost[h * p.n_opt + c] - p.cost[h * p.n_opt + self.x[h]];
                    let score = dc / gain;
                    if best.is_none_or(|(s, _, _)| score < s) {
                        best = Some((score, h, c));
                    }
                }
            }
            let Some((_, h, c)) = best else {
                return false;
            };
            self.apply(h, c);
        }
        self.violation_of(&self.rows) == 0.0
    }

    /// The best improving feasible move of a whole rule of a group to another option (keeps
    /// the number of distinct options); applies it and returns true if there is one.
    fn group_move(&mut self, eps: f64) -> bool {
        let p = self.p;
        let mut buf = vec![0.0; self.rows.len()];
        let mut best: Option<(f64, usize, usize, usize)> = None;
        for g in 0..p.n_groups {
            let heads = g * p.group_size..(g + 1) * p.group_size;
            for c in 0..p.n_opt {
                if self.counts[g][c] == 0 {
                    continue;
                }
                for d in 0..p.n_opt {
                    if d == c {
                        continue;
                    }
                    let mut dc = 0.0;
                    buf.copy_from_slice(&self.rows);
                    for h in heads.clone() {
                        if self.x[h] == c {
                            dc += p.cost[h * p.n_opt + d] - p.cost[h * p.n_opt + c];
                            for (r, b) in buf.iter_mut().enumerate() {
                                *b += p.coef(r, h, d) - p.coef(r, h, c);
                            }
                        }
                    }
                    if dc < -eps && best.is_none_or(|b| dc < b.0) && self.violation_of(&buf) == 0.0
                    {
                        best = Some((dc, g, c, d));
                    }
                }
            }
        }
        let Some((_, g, c, d)) = best else {
            return false;
        };
        for h in g * p.group_size..(g + 1) * p.group_size {
            if self.x[h] == c {
                self.apply(h, d);
            }
        }
        true
    }

    /// Improving single moves, then pairs of moves, while feasible.
    fn improve(&mut self, deadline: Instant) {
        let p = self.p;
        let mut buf = vec![0.0; self.rows.len()];
        let eps = 1e-13 * (1.0 + self.cost.abs());
        for _round in 0..200 {
            if Instant::now() > deadline {
                return;
            }
            let mut improved = false;
            // Best single move.
            let mut best: Option<(f64, usize, usize)> = None;
            for h in 0..p.n_heads() {
                let base = p.cost[h * p.n_opt + self.x[h]];
                for c in 0..p.n_opt {
                    let dc = p.cost[h * p.n_opt + c] - base;
                    if dc >= -eps || !self.allowed_move(h, c) {
                        continue;
                    }
                    self.moved_rows(h, c, &mut buf);
                    if self.violation_of(&buf) == 0.0 && best.is_none_or(|(b, _, _)| dc < b) {
                        best = Some((dc, h, c));
                    }
                }
            }
            if let Some((_, h, c)) = best {
                self.apply(h, c);
                continue;
            }
            // With a K limit: move every head of a group using option `c` to option `d`.
            if p.max_distinct.is_some() && self.group_move(eps) {
                continue;
            }
            // Pairs: a cost-reducing move made feasible by a second one.
            let mut moves: Vec<(f64, usize, usize)> = Vec::new();
            for h in 0..p.n_heads() {
                let base = p.cost[h * p.n_opt + self.x[h]];
                for c in 0..p.n_opt {
                    if c != self.x[h] {
                        moves.push((p.cost[h * p.n_opt + c] - base, h, c));
                    }
                }
            }
            moves.sort_by(|a, b| a.0.total_cmp(&b.0));
            let neg: Vec<_> = moves
                .iter()
                .filter(|m| m.0 < -eps)
                .take(150)
                .copied()
                .collect();
            let cheap: Vec<_> = moves.iter().take(600).copied().collect();
            type Move = (usize, usize);
            let mut pair: Option<(f64, Move, Move)> = None;
            for &(d1, h1, c1) in &neg {
                for &(d2, h2, c2) in &cheap {
                    if h1 == h2 || d1 + d2 >= -eps {
                        continue;
                    }
                    if pair.is_some_and(|(b, _, _)| d1 + d2 >= b) {
                        continue;
                    }
                    let (o1, o2) = (self.x[h1], self.x[h2]);
                    if !self.allowed_move(h1, c1) {
                        continue;
                    }
                    self.apply(h1, c1);
                    let ok = self.allowed_move(h2, c2) && {
                        self.moved_rows(h2, c2, &mut buf);
                        self.violation_of(&buf) == 0.0
                    };
                    self.apply(h1, o1);
                    debug_assert_eq!(self.x[h2], o2);
                    if ok {
                        pair = Some((d1 + d2, (h1, c1), (h2, c2)));
                    }
                }
            }
            if let Some((_, (h1, c1), (h2, c2))) = pair {
                self.apply(h1, c1);
                self.apply(h2, c2);
                improved = true;
            }
            if !improved {
                return;
            }
        }
    }
}

/// Depth-first branch and bound at fixed multipliers.
struct Bnb<'a> {
    p: &'a Problem,
    v: Vec<f64>,
    k: Option<usize>,
    base: f64,
    /// Allowed options per head, sorted by Lagrangian value.
    allowed: Vec<Vec<usize>>,
    assign: Vec<Option<usize>>,
    order: Vec<usize>,
    /// Per group: (bound, row min, row max, ok).
    groups: Vec<(f64, Vec<f64>, Vec<f64>, bool)>,
    bound: f64,
    rmin: Vec<f64>,
    rmax: Vec<f64>,
    n_bad: usize,
    ub: f64,
    best: Option<Vec<usize>>,
    min_pruned: f64,
    nodes: u64,
    node_limit: u64,
    deadline: Instant,
    aborted: bool,
    rel_gap: f64,
    abs_gap: f64,
}

impl Bnb<'_> {
    fn tol(&self) -> f64 {
        if self.ub.is_finite() {
            self.abs_gap.max(self.rel_gap * self.ub.abs())
        } else {
            0.0
        }
    }

    fn eval_group(&self, g: usize) -> (f64, Vec<f64>, Vec<f64>, bool) {
        let p = self.p;
        let nr = p.rows.len();
        let (mut rmin, mut rmax) = (vec![0.0; nr], vec![0.0; nr]);
        let mut fixed_v = 0.0;
        let mut used: Vec<usize> = Vec::new();
        let heads = g * p.group_size..(g + 1) * p.group_size;
        for h in heads.clone() {
            if let Some(c) = self.assign[h] {
                fixed_v += self.v[h * p.n_opt + c];
                for r in 0..nr {
                    let a = p.coef(r, h, c);
                    rmin[r] += a;
                    rmax[r] += a;
                }
                if !used.contains(&c) {
                    used.push(c);
                }
            }
        }
        if self.k.is_some_and(|k| used.len() > k) {
            return (f64::INFINITY, rmin, rmax, false);
        }
        let full = self.k.is_some_and(|k| used.len() == k);
        let mut restricted: Vec<Vec<usize>> = Vec::new();
        let mut free_heads: Vec<usize> = Vec::new();
        for h in heads {
            if self.assign[h].is_some() {
                continue;
            }
            let a: Vec<usize> = if full {
                self.allowed[h]
                    .iter()
                    .copied()
                    .filter(|c| used.contains(c))
                    .collect()
            } else {
                self.allowed[h].clone()
            };
            if a.is_empty() {
                return (f64::INFINITY, rmin, rmax, false);
            }
            for r in 0..nr {
                let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
                for &c in &a {
                    let x = p.coef(r, h, c);
                    lo = lo.min(x);
                    hi = hi.max(x);
                }
                rmin[r] += lo;
                rmax[r] += hi;
            }
            free_heads.push(h);
            restricted.push(a);
        }
        let free: Vec<(usize, &[usize])> = free_heads
            .iter()
            .zip(&restricted)
            .map(|(&h, a)| (h, a.as_slice()))
            .collect();
        match group_min(&self.v, p.n_opt, &free, &used, self.k, None) {
            Some(m) => (fixed_v + m.value, rmin, rmax, true),
            None => (f64::INFINITY, rmin, rmax, false),
        }
    }

    fn rows_ok(&self) -> bool {
        self.p.rows.iter().enumerate().all(|(r, row)| {
            let t = self.p.row_tol(r);
            self.rmin[r] <= row.hi + t && self.rmax[r] >= row.lo - t
        })
    }

    fn set_group(&mut self, g: usize, new: (f64, Vec<f64>, Vec<f64>, bool)) {
        let old = std::mem::replace(&mut self.groups[g], new);
        let new = &self.groups[g];
        if !old.3 {
            self.n_bad -= 1;
        }
        if !new.3 {
            self.n_bad += 1;
        }
        self.bound += finite(new.0) - finite(old.0);
        for r in 0..self.rmin.len() {
            self.rmin[r] += new.1[r] - old.1[r];
            self.rmax[r] += new.2[r] - old.2[r];
        }
    }

    /// Options head `h` may still take (its group's K limit may be reached).
    fn allowed_now(&self, h: usize) -> Vec<usize> {
        let p = self.p;
        let Some(k) = self.k else {
            return self.allowed[h].clone();
        };
        let g = h / p.group_size;
        let mut used: Vec<usize> = Vec::new();
        for x in g * p.group_size..(g + 1) * p.group_size {
            if let Some(c) = self.assign[x] {
                if !used.contains(&c) {
                    used.push(c);
                }
            }
        }
        if used.len() < k {
            return self.allowed[h].clone();
        }
        self.allowed[h]
            .iter()
            .copied()
            .filter(|c| used.contains(c))
            .collect()
    }

    /// A bound that sees the rows: with every free head at its cheapest option, the rows it
    /// violates must be repaired by moves whose cost per unit of repair is at least each head's
    /// best ratio (a fractional knapsack per row; the largest over rows is added). Returns the
    /// bound without the multiplier constant, or `None` when a row cannot be repaired at all.
    fn repair_bound(&self, depth: usize) -> Option<f64> {
        let p = self.p;
        let nr = p.rows.len();
        let mut sum = 0.0;
        let mut rows = vec![0.0; nr];
        for (h, a) in self.assign.iter().enumerate() {
            if let Some(c) = *a {
                sum += self.v[h * p.n_opt + c];
                for (r, x) in rows.iter_mut().enumerate() {
                    *x += p.coef(r, h, c);
                }
            }
        }
        let mut free: Vec<(usize, usize, Vec<usize>)> = Vec::new();
        for &h in &self.order[depth..] {
            let a = self.allowed_now(h);
            let c0 = *a
                .iter()
                .min_by(|&&x, &&y| self.v[h * p.n_opt + x].total_cmp(&self.v[h * p.n_opt + y]))?;
            sum += self.v[h * p.n_opt + c0];
            for (r, x) in rows.iter_mut().enumerate() {
                *x += p.coef(r, h, c0);
            }
            free.push((h, c0, a));
        }
        let mut extra: f64 = 0.0;
        let mut items: Vec<(f64, f64)> = Vec::new();
        for (r, &value) in rows.iter().enumerate() {
            let row = &p.rows[r];
            let t = p.row_tol(r);
            // sign +1: the row must go down by `need`; -1: up.
            let (need, sign) = if value > row.hi + t {
                (value - row.hi - t, 1.0)
            } else if value < row.lo - t {
                (row.lo - t - value, -1.0)
            } else {
                continue;
            };
            items.clear();
            for (h, c0, a) in &free {
                let (h, c0) = (*h, *c0);
                let a0 = p.coef(r, h, c0);
                let v0 = self.v[h * p.n_opt + c0];
                let (mut ratio, mut cap) = (f64::INFINITY, 0.0f64);
                for &c in a {
                    let d = sign * (a0 - p.coef(r, h, c));
                    if d > 0.0 {
                        ratio = ratio.min((self.v[h * p.n_opt + c] - v0).max(0.0) / d);
                        cap = cap.max(d);
                    }
                }
                if cap > 0.0 {
                    items.push((ratio, cap));
                }
            }
            items.sort_by(|x, y| x.0.total_cmp(&y.0));
            let (mut left, mut cost) = (need, 0.0);
            for &(ratio, cap) in &items {
                let take = cap.min(left);
                cost += take * ratio;
                left -= take;
                if left <= 0.0 {
                    break;
                }
            }
            if left > 0.0 {
                return None;
            }
            extra = extra.max(cost);
        }
        Some(sum + extra)
    }

    fn dfs(&mut self, depth: usize) {
        self.nodes += 1;
        if self.nodes.is_multiple_of(2048) && Instant::now() > self.deadline
            || self.nodes > self.node_limit
        {
            self.aborted = true;
        }
        if self.aborted {
            return;
        }
        if depth == self.order.len() {
            let x: Vec<usize> = self.assign.iter().map(|c| c.expect("all fixed")).collect();
            if self.p.feasible(&x) {
                let (cost, _) = self.p.evaluate(&x);
                if cost < self.ub {
                    self.ub = cost;
                    self.best = Some(x);
                }
            }
            return;
        }
        let h = self.order[depth];
        let g = h / self.p.group_size;
        let opts = self.allowed[h].clone();
        for c in opts {
            self.assign[h] = Some(c);
            let saved = self.groups[g].clone();
            let new = self.eval_group(g);
            self.set_group(g, new);
            let mut bound = self.bound + self.base;
            let mut ok = self.n_bad == 0 && self.rows_ok();
            if ok && bound < self.ub - self.tol() {
                match self.repair_bound(depth + 1) {
                    Some(b) => bound = bound.max(b + self.base),
                    None => ok = false,
                }
            }
            if ok {
                if bound < self.ub - self.tol() {
                    self.dfs(depth + 1);
                } else {
                    self.min_pruned = self.min_pruned.min(bound);
                }
            }
            self.set_group(g, saved);
            if self.aborted {
                break;
            }
        }
        self.assign[h] = None;
    }
}

fn finite(x: f64) -> f64 {
    if x.is_finite() {
        x
    } else {
        0.0
    }
}

/// Solves the problem (see the module documentation).
pub fn solve(p: &Problem, opt: &SolveOptions) -> Result<Solution, SolveError> {
    let t0 = Instant::now();
    let deadline = t0 + opt.time_limit;
    p.check()?;
    let nh = p.n_heads();
    let nr = p.rows.len();
    // Rows that no assignment can meet.
    for (r, row) in p.rows.iter().enumerate() {
        let (mut lo, mut hi) = (0.0, 0.0);
        for h in 0..nh {
            let (mut a, mut b) = (f64::INFINITY, f64::NEG_INFINITY);
            for c in 0..p.n_opt {
                let x = p.coef(r, h, c);
                a = a.min(x);
                b = b.max(x);
            }
            lo += a;
            hi += b;
        }
        let t = p.row_tol(r);
        if lo > row.hi + t || hi < row.lo - t {
            return Err(SolveError::Infeasible(format!(
                "row {} ranges over [{lo}, {hi}], needs [{}, {}]",
                row.name, row.lo, row.hi
            )));
        }
    }
    // 1. Dual bound. Box: lambda_r at most 10x (total cost spread) / (smallest row step).
    let spread: f64 = (0..nh)
        .map(|h| {
            let c = &p.cost[h * p.n_opt..(h + 1) * p.n_opt];
            c.iter().copied().fold(f64::NEG_INFINITY, f64::max)
                - c.iter().copied().fold(f64::INFINITY, f64::min)
        })
        .sum::<f64>()
        .max(1e-12);
    let box_bound: Vec<(f64, f64)> = (0..nr)
        .map(|r| {
            let mut step = f64::INFINITY;
            for h in 0..nh {
                let mut vals: Vec<f64> = (0..p.n_opt).map(|c| p.coef(r, h, c)).collect();
                vals.sort_by(f64::total_cmp);
                for w in vals.windows(2) {
                    let d = w[1] - w[0];
                    if d > 1e-12 * (1.0 + w[1].abs()) {
                        step = step.min(d);
                    }
                }
                if p.rows[r].coef_is_per_option() {
                    break;
                }
            }
            let b = if step.is_finite() {
                10.0 * spread / step
            } else {
                1.0
            };
            // A side without a bound cannot be charged: its multiplier's sign is fixed.
            let row = &p.rows[r];
            (
                if row.lo.is_finite() { b } else { 0.0 },
                if row.hi.is_finite() { b } else { 0.0 },
            )
        })
        .collect();
    let zero = vec![0.0; nr];
    let mut found: Option<(f64, Vec<usize>)> = None;
    let (mut ev, mut lam, mut iters) = maximize_dual(
        p,
        false,
        &zero,
        &box_bound,
        opt.dual_iters,
        deadline,
        &mut found,
    )
    .ok_or_else(|| SolveError::Invalid("dual evaluation failed".into()))?;
    if p.k_limit().is_some() {
        if let Some((e2, l2, i2)) = maximize_dual(
            p,
            true,
            &lam,
            &box_bound,
            opt.dual_iters,
            deadline,
            &mut found,
        ) {
            iters += i2;
            if e2.g >= ev.g {
                ev = e2;
                lam = l2;
            }
        }
    }
    let lb = ev.g;
    // 2. Incumbent: the Lagrangian minimizers met on the way and at multipliers scaled past the
    // optimum (pricing the rows harder pushes toward feasibility), and the optimum's minimizer
    // repaired; each improved by local moves.
    let all: Vec<usize> = (0..p.n_opt).collect();
    let use_k = p.k_limit().is_some();
    for scale in [1.001, 1.01, 1.03, 1.1, 1.3, 2.0] {
        let l: Vec<f64> = lam.iter().map(|x| x * scale).collect();
        if let Some(e) = lagrangian(p, &l, use_k, &all) {
            offer(&mut found, p, &e.choice);
        }
    }
    let mut starts = vec![ev.choice.clone()];
    if let Some((_, x)) = &found {
        starts.push(x.clone());
    }
    for x in starts {
        let mut walk = Walk::new(p, x);
        if walk.repair() {
            walk.improve(deadline);
            offer(&mut found, p, &walk.x);
        }
    }
    let (mut ub, mut best) = match found {
        Some((c, x)) => (c, Some(x)),
        None => (f64::INFINITY, None),
    };
    let _ = &mut ub;
    let _ = &mut best;
    // 3. Reduced-cost fixing and branch and bound.
    let v = p.values(&lam);
    let base = p.lambda_const(&lam);
    let k = p.k_limit();
    let mut allowed: Vec<Vec<usize>> = vec![Vec::new(); nh];
    let mut min_eliminated = f64::INFINITY;
    for g in 0..p.n_groups {
        let free: Vec<(usize, &[usize])> = (g * p.group_size..(g + 1) * p.group_size)
            .map(|h| (h, all.as_slice()))
            .collect();
        let mut fix = vec![Vec::new(); free.len()];
        let m = group_min(&v, p.n_opt, &free, &[], k, Some(&mut fix))
            .ok_or_else(|| SolveError::Invalid("group minimum failed".into()))?;
        for (i, &(h, _)) in free.iter().enumerate() {
            let mut opts: Vec<(f64, usize)> = Vec::new();
            for c in 0..p.n_opt {
                let b = lb - m.value + fix[i][c];
                let tol = opt.abs_gap.max(opt.rel_gap * ub.abs());
                if !ub.is_finite() || b < ub - tol {
                    opts.push((v[h * p.n_opt + c], c));
                } else {
                    min_eliminated = min_eliminated.min(b);
                }
            }
            opts.sort_by(|a, b| a.0.total_cmp(&b.0));
            allowed[h] = opts.into_iter().map(|(_, c)| c).collect();
        }
    }
    let finish = |best: Option<Vec<usize>>,
                  bound: f64,
                  optimal: bool,
                  nodes: u64,
                  active: usize|
     -> Result<Solution, SolveError> {
        let Some(choice) = best else {
            if optimal {
                return Err(SolveError::Infeasible(
                    "the search proved that no assignment meets every row and the distinct-option limit".into(),
                ));
            }
            return Err(SolveError::NotFound {
                nodes,
                seconds: t0.elapsed().as_secs_f64(),
            });
        };
        let (cost, row_values) = p.evaluate(&choice);
        Ok(Solution {
            choice,
            cost,
            bound: bound.min(cost),
            optimal,
            row_values,
            nodes,
            dual_iters: iters,
            active_heads: active,
            seconds: t0.elapsed().as_secs_f64(),
        })
    };
    if allowed.iter().any(|a| a.is_empty()) {
        // Every option of some head already reaches the incumbent: it is optimal.
        return finish(
            best,
            lb.max(ub - opt.abs_gap.max(opt.rel_gap * ub.abs())),
            true,
            0,
            0,
        );
    }
    let mut assign: Vec<Option<usize>> = vec![None; nh];
    let mut order = Vec::new();
    for h in 0..nh {
        if allowed[h].len() == 1 {
            assign[h] = Some(allowed[h][0]);
        } else {
            order.push(h);
        }
    }
    let active = order.len();
    let mut bnb = Bnb {
        p,
        v,
        k,
        base,
        allowed,
        assign,
        order,
        groups: Vec::new(),
        bound: 0.0,
        rmin: vec![0.0; nr],
        rmax: vec![0.0; nr],
        n_bad: 0,
        ub,
        best,
        min_pruned: f64::INFINITY,
        nodes: 0,
        node_limit: opt.node_limit,
        deadline,
        aborted: false,
        rel_gap: opt.rel_gap,
        abs_gap: opt.abs_gap,
    };
    for g in 0..p.n_groups {
        let e = bnb.eval_group(g);
        if !e.3 {
            bnb.n_bad += 1;
        }
        bnb.bound += finite(e.0);
        for r in 0..nr {
            bnb.rmin[r] += e.1[r];
            bnb.rmax[r] += e.2[r];
        }
        bnb.groups.push(e);
    }
    let root = bnb.bound + base;
    if bnb.n_bad == 0 && bnb.rows_ok() {
        if root < bnb.ub - bnb.tol() {
            bnb.dfs(0);
        } else {
            bnb.min_pruned = root;
        }
    }
    if bnb.aborted {
        // Only the dual bound is certain when the search stopped early.
        return finish(bnb.best, lb, false, bnb.nodes, active);
    }
    // Complete search: every solution is either in a pruned node, a leaf, or uses an option
    // removed by reduced-cost fixing, so the smallest of their bounds is a proven bound.
    let bound = lb.max(bnb.ub.min(bnb.min_pruned).min(min_eliminated));
    finish(bnb.best, bound, true, bnb.nodes, active)
}

impl Row {
    fn coef_is_per_option(&self) -> bool {
        matches!(self.coef, Coef::PerOption(_))
    }
}

/// Enumerates every assignment (tests, tiny problems): the optimum, or `None` when infeasible.
pub fn brute_force(p: &Problem) -> Option<(f64, Vec<usize>)> {
    let nh = p.n_heads();
    let mut x = vec![0usize; nh];
    let mut best: Option<(f64, Vec<usize>)> = None;
    loop {
        if p.feasible(&x) {
            let (c, _) = p.evaluate(&x);
            if best.as_ref().is_none_or(|(b, _)| c < *b) {
                best = Some((c, x.clone()));
            }
        }
        let mut i = 0;
        loop {
            if i == nh {
                return best;
            }
            x[i] += 1;
            if x[i] < p.n_opt {
                break;
            }
            x[i] = 0;
            i += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> f64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((self.0 >> 11) as f64) / (1u64 << 53) as f64
        }
    }

    /// A random instance shaped like the plan problem: option "spans" with density rows (per
    /// option) at several lengths, per-head costs decreasing with the span, plus an optional
    /// per-choice row (an epsilon constraint on a second objective).
    fn instance(
        rng: &mut Rng,
        groups: usize,
        size: usize,
        n_opt: usize,
        n_rows: usize,
        k: Option<usize>,
        eps_row: bool,
    ) -> Problem {
        let nh = groups * size;
        let spans: Vec<f64> = (0..n_opt).map(|_| rng.next()).collect();
        let mut cost = Vec::new();
        for _ in 0..nh {
            let scale = rng.next();
            for &s in &spans {
                cost.push(scale * (1.0 - s) * (0.5 + rng.next()));
            }
        }
        let mut rows = Vec::new();
        for r in 0..n_rows {
            let coef: Vec<f64> = spans
                .iter()
                .map(|&s| (s * (1.0 + 0.3 * r as f64)).min(1.0))
                .collect();
            let mean: f64 = coef.iter().sum::<f64>() / n_opt as f64;
            let b = mean * (0.6 + 0.5 * rng.next()) * nh as f64;
            rows.push(Row {
                name: format!("d{r}"),
                coef: Coef::PerOption(coef),
                lo: 0.9 * b,
                hi: b,
            });
        }
        if eps_row {
            let coef: Vec<f64> = (0..nh * n_opt).map(|_| rng.next()).collect();
            rows.push(Row {
                name: "eps".into(),
                coef: Coef::PerChoice(coef),
                lo: f64::NEG_INFINITY,
                hi: 0.5 * nh as f64,
            });
        }
        Problem {
            n_groups: groups,
            group_size: size,
            n_opt,
            cost,
            rows,
            max_distinct: k,
        }
    }

    #[test]
    fn matches_brute_force_on_random_instances() {
        let mut rng = Rng(1);
        let (mut feasible, mut infeasible) = (0, 0);
        for case in 0..300 {
            let groups = 1 + case % 3;
            let size = 1 + (case / 3) % 3;
            let n_opt = 2 + case % 4;
            if (n_opt as f64).powi((groups * size) as i32) > 60_000.0 {
                continue;
            }
            let n_rows = case % 4;
            let k = match case % 3 {
                0 => None,
                1 => Some(1),
                _ => Some(2),
            };
            let p = instance(&mut rng, groups, size, n_opt, n_rows, k, case % 5 == 0);
            let bf = brute_force(&p);
            let s = solve(&p, &SolveOptions::default());
            match (bf, s) {
                (Some((c, _)), Ok(s)) => {
                    feasible += 1;
                    assert!(p.feasible(&s.choice), "case {case}: infeasible answer");
                    assert!(s.optimal, "case {case}");
                    assert!(
                        (s.cost - c).abs() <= 1e-9 * (1.0 + c.abs()),
                        "case {case}: {} vs brute force {c}",
                        s.cost
                    );
                    assert!(
                        s.bound <= c + 1e-9,
                        "case {case}: bound {} above optimum {c}",
                        s.bound
                    );
                }
                (None, Err(SolveError::Infeasible(_))) => infeasible += 1,
                (bf, s) => panic!("case {case}: brute force {bf:?}, solver {s:?}"),
            }
        }
        assert!(
            feasible > 100 && infeasible > 5,
            "{feasible} feasible, {infeasible} infeasible"
        );
    }

    #[test]
    fn subsets_are_enumerated() {
        let mut n = 0;
        for_each_subset(&[1, 2, 3, 4, 5], 2, |s| {
            assert!(s[0] < s[1]);
            n += 1;
        });
        assert_eq!(n, 10);
        let mut n = 0;
        for_each_subset(&[7], 1, |_| n += 1);
        assert_eq!(n, 1);
        let mut n = 0;
        for_each_subset(&[1, 2], 0, |_| n += 1);
        assert_eq!(n, 1);
        assert_eq!(binom(49, 2), 1176);
    }

    #[test]
    fn bad_problems_are_errors() {
        let mut rng = Rng(3);
        let mut p = instance(&mut rng, 1, 2, 3, 1, None, false);
        p.cost[0] = f64::NAN;
        assert!(matches!(
            solve(&p, &SolveOptions::default()),
            Err(SolveError::Invalid(_))
        ));
        let mut p = instance(&mut rng, 1, 2, 3, 1, None, false);
        p.rows[0].lo = 1e9;
        p.rows[0].hi = 2e9;
        assert!(matches!(
            solve(&p, &SolveOptions::default()),
            Err(SolveError::Infeasible(_))
        ));
        let mut p = instance(&mut rng, 1, 2, 3, 1, None, false);
        p.cost.pop();
        assert!(matches!(
            solve(&p, &SolveOptions::default()),
            Err(SolveError::Invalid(_))
        ));
    }
}
