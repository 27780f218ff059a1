//! moa-optimize's library: turning an attention-influence profile into a span plan
//! (moa-method.md section 7). [`candidates`] builds the rule grid and each rule's spans with the
//! runtime's formula, [`cost`] measures the influence each span drops, [`balance`] weighs heads against each other, [`measured`] takes
//! measured loss changes instead, [`solver`] (with the
//! Lagrangian [`dual`]) chooses one rule per KV head exactly under the density constraints,
//! [`pareto`] trades the per-length objectives off and assembles plans, and [`validate`] scores
//! plans by response-token loss on held-out conversations.

pub mod balance;
pub mod candidates;
pub mod cost;
pub mod dual;
pub mod measured;
pub mod pareto;
pub mod solver;
pub mod validate;

pub use balance::{Balance, BalanceUnit, HeadWeights};
pub use candidates::{Candidates, Grid};
pub use measured::MeasuredCosts;
pub use pareto::{front, FrontMode, FrontPoint, Instance, OptimizeError, PlanReport, Settings};
pub use solver::{solve, Problem, Solution, SolveOptions};
