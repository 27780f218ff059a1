//! Candidate rules: the `(alpha, beta)` grid the optimizer chooses from (moa-method.md section 7),
//! and each candidate's span and density at the lengths that matter, computed with the runtime's
//! own formula ([`Plan::span_of`]), so a plan's reported density is the density it runs at.
//!
//! Default grid (the reference's): alpha -2048..=8192 step 1024, beta 0..=1 step 0.125, keeping
//! the rules whose raw span `alpha + beta * N` is positive at the shortest profiled length and at
//! most N at the longest profiled length (48 rules for lengths 2k..8k, as the reference). Rules that give the same
//! span at every considered length are interchangeable for the optimizer; the first is kept.

use crate::moa::plan::{Plan, Rule};

/// The rule grid.
#[derive(Debug, Clone, PartialEq)]
pub struct Grid {
    pub alpha_min: f64,
    pub alpha_max: f64,
    pub alpha_step: f64,
    pub beta_step: f64,
    /// Smallest beta of the grid (0: from 0); e.g. 0.25 keeps every head at a quarter of the
    /// length or more.
    pub beta_min: f64,
}

impl Default for Grid {
    fn default() -> Self {
        Grid {
            alpha_min: -2048.0,
            alpha_max: 8192.0,
            alpha_step: 1024.0,
            beta_step: 0.125,
            beta_min: 0.0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CandidateError {
    #[error("bad rule grid: {0}")]
    BadGrid(String),
    #[error("no candidate rule survives the filter (raw span > 0 at N = {shortest}, <= N at N = {longest})")]
    Empty { shortest: usize, longest: usize },
    #[error("no lengths to filter the candidates at")]
    NoLengths,
}

/// One candidate rule with its span and density at each length of [`Candidates::lengths`].
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    pub rule: Rule,
    /// `C(N)` per length.
    pub spans: Vec<usize>,
    /// `min(C(N), N) / N` per length (as [`Plan::density_at`]).
    pub density: Vec<f64>,
}

/// The candidate set evaluated at a list of lengths.
#[derive(Debug, Clone)]
pub struct Candidates {
    pub lengths: Vec<usize>,
    pub list: Vec<Candidate>,
}

impl Grid {
    /// Parses `"amin:amax:astep,bstep[,bmin]"` (e.g. `-2048:8192:1024,0.125`, or
    /// `0:0:1,0.125,0.25` for beta 0.25, 0.375, ..., 1).
    pub fn parse(s: &str) -> Result<Grid, CandidateError> {
        let bad =
            || CandidateError::BadGrid(format!("{s:?}: expected amin:amax:astep,bstep[,bmin]"));
        let (a, b) = s.split_once(',').ok_or_else(bad)?;
        let (b, bmin) = match b.split_once(',') {
            Some((b, m)) => (b, Some(m)),
            None => (b, None),
        };
        let parts: Vec<&str> = a.split(':').collect();
        if parts.len() != 3 {
            return Err(bad());
        }
        let num = |t: &str| t.trim().parse::<f64>().map_err(|_| bad());
        let g = Grid {
            alpha_min: num(parts[0])?,
            alpha_max: num(parts[1])?,
            alpha_step: num(parts[2])?,
            beta_step: num(b)?,
            beta_min: bmin.map(num).transpose()?.unwrap_or(0.0),
        };
        g.check()?;
        Ok(g)
    }

    fn check(&self) -> Result<(), CandidateError> {
        let all = [
            self.alpha_min,
            self.alpha_max,
            self.alpha_step,
            self.beta_step,
            self.beta_min,
        ];
        if all.iter().any(|v| !v.is_finite()) {
            return Err(CandidateError::BadGrid("values must be finite".into()));
        }
        if self.alpha_step <= 0.0 || self.beta_step <= 0.0 || self.beta_step > 1.0 {
            return Err(CandidateError::BadGrid(
                "steps must be positive (beta step at most 1)".into(),
            ));
        }
        if !(0.0..=1.0).contains(&self.beta_min) {
            return Err(CandidateError::BadGrid(
                "beta min must lie in [0, 1]".into(),
            ));
        }
        if self.alpha_max < self.alpha_min {
            return Err(CandidateError::BadGrid("alpha max below alpha min".into()));
        }
        if (self.alpha_max - self.alpha_min) / self.alpha_step > 100_000.0
            || 1.0 / self.beta_step > 10_000.0
        {
            return Err(CandidateError::BadGrid("grid too fine".into()));
        }
        Ok(())
    }

    /// The grid's rules before filtering.
    pub fn rules(&self) -> Vec<Rule> {
        let na = ((self.alpha_max - self.alpha_min) / self.alpha_step + 1e-9).floor() as usize;
        let nbeta = (1.0 / self.beta_step + 1e-9).floor() as usize;
        let mut out = Vec::new();
        for ia in 0..=na {
            let alpha = self.alpha_min + ia as f64 * self.alpha_step;
            for ib in 0..=nbeta {
                let beta = (ib as f64 * self.beta_step).min(1.0);
                if beta < self.beta_min - 1e-9 {
                    continue;
                }
                out.push(Rule {
                    alpha: alpha as f32,
                    beta: beta as f32,
                });
            }
        }
        out
    }
}

impl Candidates {
    /// The filtered grid, evaluated at `lengths` with the span constants of `consts` (a plan's
    /// sink, min_span and align). `profiled` are the lengths the filter is applied at.
    pub fn build(
        grid: &Grid,
        consts: &Plan,
        profiled: &[usize],
        lengths: &[usize],
    ) -> Result<Candidates, CandidateError> {
        grid.check()?;
        let (Some(&shortest), Some(&longest)) = (profiled.iter().min(), profiled.iter().max())
        else {
            return Err(CandidateError::NoLengths);
        };
        if lengths.is_empty() {
            return Err(CandidateError::NoLengths);
        }
        let mut list: Vec<Candidate> = Vec::new();
        for rule in grid.rules() {
            let raw = |n: usize| rule.alpha as f64 + rule.beta as f64 * n as f64;
            if raw(shortest) <= 0.0 || raw(longest) > longest as f64 {
                continue;
            }
            let spans: Vec<usize> = lengths.iter().map(|&n| consts.span_of(rule, n)).collect();
            if list.iter().any(|c| c.spans == spans) {
                continue;
            }
            let density = lengths
                .iter()
                .zip(&spans)
                .map(|(&n, &c)| c.min(n) as f64 / n as f64)
                .collect();
            list.push(Candidate {
                rule,
                spans,
                density,
            });
        }
        if list.is_empty() {
            return Err(CandidateError::Empty { shortest, longest });
        }
        Ok(Candidates {
            lengths: lengths.to_vec(),
            list,
        })
    }

    /// Index of `n` in [`Candidates::lengths`].
    pub fn length_index(&self, n: usize) -> Option<usize> {
        self.lengths.iter().position(|&l| l == n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_grid_matches_the_reference_count() {
        let consts = Plan::new(1, 1, vec![], "t");
        let c = Candidates::build(
            &Grid::default(),
            &consts,
            &[2048, 4096, 8192],
            &[2048, 4096, 8192, 16384],
        )
        .unwrap();
        // 99 grid points; 48 pass the filter (the reference's count); all have distinct spans.
        assert_eq!(Grid::default().rules().len(), 99);
        assert_eq!(c.list.len(), 48);
        for cand in &c.list {
            for (k, &n) in c.lengths.iter().enumerate() {
                let p = Plan::new(1, 1, vec![cand.rule], "t");
                assert_eq!(cand.spans[k], p.span(0, 0, n));
                assert!((cand.density[k] - p.density_at(n)).abs() < 1e-12);
            }
        }
        // The dense rule is a candidate.
        assert!(c.list.iter().any(|c| c.density.iter().all(|&d| d == 1.0)));
    }

    #[test]
    fn parse_and_errors() {
        let g = Grid::parse("-1024:2048:512,0.25").unwrap();
        assert_eq!(g.rules().len(), 7 * 5);
        assert!(Grid::parse("1:2").is_err());
        assert!(Grid::parse("0:1:0,0.5").is_err());
        assert!(Grid::parse("0:1:1,nan").is_err());
        // A smallest beta: 0.25, 0.375, ..., 1 only.
        let g = Grid::parse("0:0:1,0.125,0.25").unwrap();
        let betas: Vec<f32> = g.rules().iter().map(|r| r.beta).collect();
        assert_eq!(betas, [0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0]);
        assert_eq!(Grid::parse("0:0:1,0.125,0").unwrap().rules().len(), 9);
        assert!(Grid::parse("0:0:1,0.125,1.5").is_err());
        assert!(Grid::parse("0:0:1,0.125,x").is_err());
        let consts = Plan::new(1, 1, vec![], "t");
        let g = Grid::parse("-9000:-8000:1000,0.5").unwrap();
        assert!(matches!(
            Candidates::build(&g, &consts, &[2048], &[2048]),
            Err(CandidateError::Empty { .. })
        ));
    }
}
