//! The Lagrangian dual of the plan problem, maximized with Kelley's cutting-plane method.
//!
//! Relaxing the side constraints `lo_r <= sum_h a_r(h, c_h) <= hi_r` with one free multiplier
//! `lambda_r` per row (positive: the upper side is charged, negative: the lower side) gives
//!
//! ```text
//! g(lambda) = sum_groups min_{assignment} sum_h (cost(h,c) + lambda . a(h,c))
//!             - sum_r lambda_r * (hi_r if lambda_r > 0 else lo_r)
//! ```
//!
//! a concave piecewise-linear lower bound on the optimum for every `lambda`. Without the per-group
//! distinct-rule limit the inner minimum is per head, and `max g` equals the LP relaxation's
//! value. Kelley's method keeps the cuts `t <= g(lambda_k) + s_k . (lambda - lambda_k)` and
//! maximizes their minimum over a box with a small LP; the LP has one row per constraint plus one
//! (so at most a handful), and is solved here by a revised simplex with Bland's rule on the dual
//! side (`min sum mu_k c_k + M |box|`, `sum mu_k = 1`, `sum mu_k s_k = u - v`), whose first basis
//! is known to be feasible. The LP's value is an upper bound on `max g`, so the loop stops with a
//! certified dual gap.

/// Solves the square system `a x = b` (row-major `m x m`) by Gaussian elimination with partial
/// pivoting; `None` when singular.
pub fn solve_dense(a: &[f64], b: &[f64], m: usize) -> Option<Vec<f64>> {
    let mut a = a.to_vec();
    let mut b = b.to_vec();
    for col in 0..m {
        let piv =
            (col..m).max_by(|&i, &j| a[i * m + col].abs().total_cmp(&a[j * m + col].abs()))?;
        if a[piv * m + col].abs() < 1e-300 {
            return None;
        }
        if piv != col {
            for k in 0..m {
                a.swap(piv * m + k, col * m + k);
            }
            b.swap(piv, col);
        }
        let d = a[col * m + col];
        for i in col + 1..m {
            let f = a[i * m + col] / d;
            if f != 0.0 {
                for k in col..m {
                    a[i * m + k] -= f * a[col * m + k];
                }
                b[i] -= f * b[col];
            }
        }
    }
    let mut x = vec![0.0; m];
    for i in (0..m).rev() {
        let mut s = b[i];
        for k in i + 1..m {
            s -= a[i * m + k] * x[k];
        }
        x[i] = s / a[i * m + i];
    }
    Some(x)
}

/// The cutting-plane master LP in its dual form (standard form `min c x, A x = b, x >= 0`).
pub struct Master {
    /// Number of multipliers (rows of the original problem).
    n: usize,
    /// Columns of A (each `n + 1` long): first the 2n box columns, then one per cut.
    cols: Vec<Vec<f64>>,
    cost: Vec<f64>,
    basis: Vec<usize>,
}

impl Master {
    /// A master with box `-bound[r].0 <= lambda_r <= bound[r].1` and its first cut `g0, s0`
    /// taken at `lam0` (which must lie in the box).
    pub fn new(bound: &[(f64, f64)], lam0: &[f64], g0: f64, s0: &[f64]) -> Master {
        let n = bound.len();
        let mut cols = Vec::with_capacity(2 * n + 1);
        let mut cost = Vec::with_capacity(2 * n + 1);
        for (r, &(below, above)) in bound.iter().enumerate() {
            // u_r: lambda_r <= above; v_r: -lambda_r <= below.
            let mut u = vec![0.0; n + 1];
            u[r + 1] = 1.0;
            let mut v = vec![0.0; n + 1];
            v[r + 1] = -1.0;
            cols.push(u);
            cost.push(above);
            cols.push(v);
            cost.push(below);
        }
        let mut m = Master {
            n,
            cols,
            cost,
            basis: Vec::new(),
        };
        m.add_cut(lam0, g0, s0);
        // Feasible first basis: the cut (mu = 1) and, per row, u_r or v_r absorbing s0_r.
        let mut basis = vec![2 * n];
        for (r, &s) in s0.iter().enumerate() {
            basis.push(if s >= 0.0 { 2 * r } else { 2 * r + 1 });
        }
        m.basis = basis;
        m
    }

    /// Adds the cut `t <= g + s . (lambda - lam)`.
    pub fn add_cut(&mut self, lam: &[f64], g: f64, s: &[f64]) {
        let mut col = Vec::with_capacity(self.n + 1);
        col.push(1.0);
        col.extend(s.iter().map(|v| -v));
        let c = g - s.iter().zip(lam).map(|(a, b)| a * b).sum::<f64>();
        self.cols.push(col);
        self.cost.push(c);
    }

    /// Optimizes; returns `(t, lambda)`: the maximum of the cut model and where it is reached.
    pub fn optimize(&mut self) -> Option<(f64, Vec<f64>)> {
        let m = self.n + 1;
        let mut rhs = vec![0.0; m];
        rhs[0] = 1.0;
        for _ in 0..100_000 {
            let mut bm = vec![0.0; m * m];
            let mut bt = vec![0.0; m * m];
            for (j, &bj) in self.basis.iter().enumerate() {
                for i in 0..m {
                    bm[i * m + j] = self.cols[bj][i];
                    bt[j * m + i] = self.cols[bj][i];
                }
            }
            let cb: Vec<f64> = self.basis.iter().map(|&j| self.cost[j]).collect();
            let xb = solve_dense(&bm, &rhs, m)?;
            let y = solve_dense(&bt, &cb, m)?;
            // Bland: lowest index with negative reduced cost.
            let mut enter = None;
            for (j, col) in self.cols.iter().enumerate() {
                if self.basis.contains(&j) {
                    continue;
                }
                let rc = self.cost[j] - col.iter().zip(&y).map(|(a, b)| a * b).sum::<f64>();
                if rc < -1e-12 * (1.0 + self.cost[j].abs()) {
                    enter = Some(j);
                    break;
                }
            }
            let Some(j) = enter else {
                let t = y[0];
                return Some((t, y[1..].to_vec()));
            };
            let d = solve_dense(&bm, &self.cols[j], m)?;
            let mut leave: Option<(usize, f64)> = None;
            for i in 0..m {
                if d[i] > 1e-12 {
                    let ratio = xb[i].max(0.0) / d[i];
                    leave = match leave {
                        None => Some((i, ratio)),
                        Some((k, r)) => {
                            if ratio < r - 1e-15
                                || (ratio <= r + 1e-15 && self.basis[i] < self.basis[k])
                            {
                                Some((i, ratio))
                            } else {
                                Some((k, r))
                            }
                        }
                    };
                }
            }
            let (i, _) = leave?;
            self.basis[i] = j;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dense_solve() {
        let a = [2.0, 1.0, 1.0, 3.0];
        let x = solve_dense(&a, &[3.0, 5.0], 2).unwrap();
        assert!((x[0] - 0.8).abs() < 1e-12 && (x[1] - 1.4).abs() < 1e-12);
        assert!(solve_dense(&[1.0, 2.0, 2.0, 4.0], &[1.0, 1.0], 2).is_none());
    }

    #[test]
    fn kelley_master_finds_the_max_of_a_concave_function() {
        // g(l) = min(1 + l, 3 - l, 2 - 0.1 l^2 ...) approximated by cuts; here use the exact
        // piecewise-linear g(l) = min(1 + l, 3 - l) with max 2 at l = 1.
        let g = |l: f64| (1.0 + l).min(3.0 - l);
        let s = |l: f64| if 1.0 + l <= 3.0 - l { 1.0 } else { -1.0 };
        let mut m = Master::new(&[(100.0, 100.0)], &[0.0], g(0.0), &[s(0.0)]);
        let mut best = g(0.0);
        for _ in 0..20 {
            let (t, lam) = m.optimize().unwrap();
            let v = g(lam[0]);
            best = best.max(v);
            if t - best < 1e-12 {
                break;
            }
            m.add_cut(&lam, v, &[s(lam[0])]);
        }
        assert!((best - 2.0).abs() < 1e-12, "{best}");
    }
}
