//! Measured costs: a table of loss changes, one per KV head and rule, measured by moving that
//! one head to that rule inside a base configuration (`moa-profile ablate --rules`), used
//! instead of the profile's first-order dropped influence. The solver then picks one rule per
//! head minimizing the sum of the measured changes under the density constraints (the
//! additivity assumption of the first-order objective, with zeroth-order numbers). A head's
//! costs are shifted so its best rule costs 0 (one rule per head: the shift does not change
//! the optimum), and all are scaled so the heads' largest costs sum to 1. The profile's
//! first-order costs, normalized the same way, can be added at a weight (`profile_weight`):
//! a measured retrieval table alone trades away what general text needs, which the profile of
//! the general calibration set keeps.

use super::candidates::Candidates;
use super::pareto::OptimizeError;
use crate::moa::plan::Rule;

/// Loss change per head (layer-major) and rule, head-major: `table[h * rules.len() + r]`.
#[derive(Debug, Clone, PartialEq)]
pub struct MeasuredCosts {
    pub rules: Vec<Rule>,
    pub table: Vec<f64>,
    /// Weight of the profile's first-order dropped influence (normalized as the table) added
    /// to the measured costs; 0: the table alone.
    pub profile_weight: f64,
}

/// Shifts each head's row (`rows[h * n..(h + 1) * n]`) so its least cost is 0 and scales all
/// so the heads' ranges sum to 1 (nothing to scale when every row is flat).
pub fn normalize_rows(rows: &mut [f64], n: usize) {
    let mut scale = 0.0;
    for row in rows.chunks_mut(n.max(1)) {
        let lo = row.iter().cloned().fold(f64::INFINITY, f64::min);
        let hi = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        scale += hi - lo;
        row.iter_mut().for_each(|v| *v -= lo);
    }
    if scale > 0.0 {
        rows.iter_mut().for_each(|v| *v /= scale);
    }
}

impl MeasuredCosts {
    /// The cost of every candidate for every head (`[head][candidate]`, as the instance's
    /// `dropped`). Every candidate rule must have been measured.
    pub fn costs(&self, cands: &Candidates, heads: usize) -> Result<Vec<f64>, OptimizeError> {
        let nr = self.rules.len();
        if nr == 0 || self.table.len() != heads * nr {
            return Err(OptimizeError::Settings(format!(
                "measured costs: {} values for {heads} heads x {nr} rules",
                self.table.len()
            )));
        }
        let index: Vec<usize> = cands
            .list
            .iter()
            .map(|c| {
                self.rules.iter().position(|r| *r == c.rule).ok_or_else(|| {
                    OptimizeError::Settings(format!(
                        "candidate rule alpha {} beta {} was not measured (measured: {}); \
                         choose a --grid of measured rules",
                        c.rule.alpha,
                        c.rule.beta,
                        self.rules
                            .iter()
                            .map(|r| format!("{}:{}", r.alpha, r.beta))
                            .collect::<Vec<_>>()
                            .join(",")
                    ))
                })
            })
            .collect::<Result<_, _>>()?;
        let mut out = Vec::with_capacity(heads * index.len());
        for h in 0..heads {
            out.extend(index.iter().map(|&r| self.table[h * nr + r]));
        }
        normalize_rows(&mut out, index.len());
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::moa::optimize::Grid;
    use crate::moa::Plan;

    #[test]
    fn costs_shift_per_head_and_need_every_rule() {
        let grid = Grid::parse("0:0:1,0.5").unwrap();
        let consts = Plan::new(0, 0, vec![], "c");
        let cands = Candidates::build(&grid, &consts, &[1024], &[1024]).unwrap();
        let rules: Vec<Rule> = cands.list.iter().map(|c| c.rule).collect();
        assert_eq!(rules.len(), 2, "beta 0.5 and 1 (beta 0 has no span)");
        // Head 0: 0.3 at beta 0.5, -0.1 at full; head 1: 0.2 and 0.2.
        let m = MeasuredCosts {
            profile_weight: 0.0,
            rules: rules.clone(),
            table: vec![0.3, -0.1, 0.2, 0.2],
        };
        let c = m.costs(&cands, 2).unwrap();
        assert_eq!(c.len(), 4);
        assert!((c[0] - 1.0).abs() < 1e-12 && c[1] == 0.0, "{c:?}");
        assert_eq!((c[2], c[3]), (0.0, 0.0));
        // A candidate that was not measured is refused by name.
        let m = MeasuredCosts {
            profile_weight: 0.0,
            rules: rules[..1].to_vec(),
            table: vec![0.3, 0.2],
        };
        let e = m.costs(&cands, 2).unwrap_err().to_string();
        assert!(e.contains("beta 1 was not measured"), "{e}");
    }
}
