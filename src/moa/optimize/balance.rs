//! How the optimizer weighs heads against each other. The profiled influence is in the units of
//! the loss gradient, which are far larger in early layers than in late ones here (mean |E| per
//! head 0.2-1.0 in layers 0-11 against 0.06-0.1 in layers 25-29 on the default model), so the
//! plain objective hardly sees the long-range attention of the late layers. A balance divides the
//! influence of each unit (a head, or a layer's heads together) by the unit's total influence to
//! the power `p`: `p = 0` is the plain objective, `p = 1` makes every unit count the same, values
//! in between interpolate. The weights are normalized so that dropping everything costs 1.

use std::fmt;
use std::str::FromStr;

use super::cost::HeadBlocks;
use crate::moa::plan::{Plan, Rule};

/// The unit whose total influence is equalized.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BalanceUnit {
    Head,
    Layer,
}

/// Measured importance per KV head (layer-major), e.g. the loss changes of
/// [`crate::profile::ablate`], and how it enters the objective.
#[derive(Debug, Clone, PartialEq)]
pub struct HeadWeights {
    pub weights: Vec<f64>,
    /// Every head keeps `floor * max_h w` on top of `max(w, 0)`.
    pub floor: f64,
    /// `None`: the weight multiplies the head's balanced factor. `Some(rule)`: calibrate
    /// instead: the head's factor is set so that the influence the rule's span drops (what the
    /// ablation removed) costs exactly the head's weight; the profile then only says how that
    /// cost spreads over the distances.
    pub calibrate: Option<Rule>,
}

impl HeadWeights {
    fn effective(&self) -> Vec<f64> {
        let top = self.weights.iter().cloned().fold(0.0f64, f64::max);
        self.weights
            .iter()
            .map(|w| w.max(0.0) + self.floor * top)
            .collect()
    }

    /// Applies the weights to `scales` (one per head, from [`Balance::scales`]) and normalizes
    /// again so that dropping everything costs 1.
    /// `consts` gives the span formula's constants (sink, minimum, alignment).
    pub fn apply(&self, scales: &mut [f64], heads: &[HeadBlocks], consts: &Plan) {
        debug_assert_eq!(scales.len(), self.weights.len());
        let w = self.effective();
        for (h, s) in scales.iter_mut().enumerate() {
            match self.calibrate {
                None => *s *= w[h],
                Some(rule) => {
                    let d = heads[h].dropped(consts.span_of(rule, heads[h].length()));
                    *s = if d > 0.0 {
                        w[h] / d
                    } else if heads[h].total > 0.0 {
                        // The profile sees nothing beyond the span: the whole head carries it.
                        w[h] / heads[h].total
                    } else {
                        0.0
                    };
                }
            }
        }
        let z: f64 = heads
            .iter()
            .zip(scales.iter())
            .map(|(b, w)| b.total * w)
            .sum();
        if z > 0.0 {
            scales.iter_mut().for_each(|w| *w /= z);
        }
    }
}

/// A unit and a power, written `head:P` or `layer:P` (`none` = power 0).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Balance {
    pub unit: BalanceUnit,
    pub power: f64,
}

impl Default for Balance {
    fn default() -> Self {
        Balance {
            unit: BalanceUnit::Head,
            power: 0.0,
        }
    }
}

impl Balance {
    /// Every head counts the same (the fraction of its own influence a rule drops).
    pub fn per_head() -> Balance {
        Balance {
            unit: BalanceUnit::Head,
            power: 1.0,
        }
    }

    pub fn is_plain(&self) -> bool {
        self.power == 0.0
    }

    /// The factor for each head's influence (heads in layer-major order, `n_head_kv` per layer):
    /// `T_u^-p / sum_h T_h T_u(h)^-p`, 0 for a head whose unit has no influence (unless `p = 0`:
    /// then every head's factor is `1 / sum_h T_h`, the plain objective exactly).
    pub fn scales(&self, heads: &[HeadBlocks], n_head_kv: usize) -> Vec<f64> {
        let unit_total = |h: usize| -> f64 {
            match self.unit {
                BalanceUnit::Head => heads[h].total,
                BalanceUnit::Layer => {
                    let l0 = h / n_head_kv * n_head_kv;
                    heads[l0..l0 + n_head_kv].iter().map(|b| b.total).sum()
                }
            }
        };
        let raw: Vec<f64> = (0..heads.len())
            .map(|h| {
                let t = unit_total(h);
                if self.is_plain() {
                    1.0
                } else if t > 0.0 {
                    t.powf(-self.power)
                } else {
                    0.0
                }
            })
            .collect();
        let z: f64 = heads.iter().zip(&raw).map(|(b, w)| b.total * w).sum();
        if z > 0.0 {
            raw.iter().map(|w| w / z).collect()
        } else {
            vec![0.0; heads.len()]
        }
    }

    /// For plan notes: empty when plain.
    pub fn label(&self) -> String {
        if self.is_plain() {
            String::new()
        } else if *self == Balance::per_head() {
            ", per head".into()
        } else {
            format!(", balance {self}")
        }
    }
}

impl fmt::Display for Balance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = match self.unit {
            BalanceUnit::Head => "head",
            BalanceUnit::Layer => "layer",
        };
        write!(f, "{unit}:{}", self.power)
    }
}

impl FromStr for Balance {
    type Err = String;
    fn from_str(s: &str) -> Result<Balance, String> {
        if s == "none" {
            return Ok(Balance::default());
        }
        let (unit, power) = s
            .split_once(':')
            .ok_or_else(|| format!("balance {s:?}: expected head:P, layer:P or none"))?;
        let unit = match unit {
            "head" => BalanceUnit::Head,
            "layer" => BalanceUnit::Layer,
            u => return Err(format!("balance unit {u:?}: expected head or layer")),
        };
        let power: f64 = power
            .parse()
            .map_err(|_| format!("balance power {power:?} is not a number"))?;
        if !(power.is_finite() && (0.0..=2.0).contains(&power)) {
            return Err(format!("balance power {power} must be in [0, 2]"));
        }
        Ok(Balance { unit, power })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(total_mass: f32) -> HeadBlocks {
        // One block of 64 tokens: the packed matrix has a single entry.
        HeadBlocks::new(&[total_mass], 64, 64, 4).unwrap()
    }

    #[test]
    fn scales_normalize_and_interpolate() {
        let heads: Vec<HeadBlocks> = [4.0, 1.0, 0.5, 0.5, 0.0, 2.0].map(head).into();
        let total: f64 = heads.iter().map(|b| b.total).sum();
        for unit in [BalanceUnit::Head, BalanceUnit::Layer] {
            for p in [0.0, 0.5, 1.0] {
                let s = Balance { unit, power: p }.scales(&heads, 2);
                let z: f64 = heads.iter().zip(&s).map(|(b, w)| b.total * w).sum();
                assert!((z - 1.0).abs() < 1e-12, "{unit:?} {p}: {z}");
                if p == 0.0 {
                    assert!(s.iter().all(|w| (w - 1.0 / total).abs() < 1e-12));
                }
            }
        }
        // Per head: every head with influence carries the same share.
        let s = Balance::per_head().scales(&heads, 2);
        let shares: Vec<f64> = heads.iter().zip(&s).map(|(b, w)| b.total * w).collect();
        assert_eq!(shares[4], 0.0);
        for x in shares.iter().filter(|&&x| x > 0.0) {
            assert!((x - 0.2).abs() < 1e-12);
        }
        // Per layer: each layer with influence carries a third, split as profiled inside it.
        let s = Balance {
            unit: BalanceUnit::Layer,
            power: 1.0,
        }
        .scales(&heads, 2);
        let shares: Vec<f64> = heads.iter().zip(&s).map(|(b, w)| b.total * w).collect();
        for l in 0..3 {
            assert!((shares[2 * l] + shares[2 * l + 1] - 1.0 / 3.0).abs() < 1e-12);
        }
        assert!((shares[0] / shares[1] - 4.0).abs() < 1e-9);
        // Half way: the layer shares lie between plain and equal.
        let s = Balance {
            unit: BalanceUnit::Layer,
            power: 0.5,
        }
        .scales(&heads, 2);
        let first: f64 = heads[..2].iter().zip(&s).map(|(b, w)| b.total * w).sum();
        assert!(first < 5.0 / 8.0 && first > 1.0 / 3.0, "{first}");
    }

    #[test]
    fn head_weights_scale_and_renormalize() {
        let heads: Vec<HeadBlocks> = [1.0, 1.0, 2.0, 4.0].map(head).into();
        let mut s = Balance::per_head().scales(&heads, 2);
        // Head 1 measured twice as important as head 0, heads 2-3 not at all (or negative).
        let hw = HeadWeights {
            weights: vec![0.5, 1.0, 0.0, -0.3],
            floor: 0.1,
            calibrate: None,
        };
        hw.apply(&mut s, &heads, &Plan::new(0, 0, vec![], "c"));
        let shares: Vec<f64> = heads.iter().zip(&s).map(|(b, w)| b.total * w).collect();
        assert!((shares.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        // Weights 0.6, 1.1, 0.1, 0.1 on equal shares.
        let want = [0.6, 1.1, 0.1, 0.1].map(|w| w / 1.9);
        for (a, b) in shares.iter().zip(want) {
            assert!((a - b).abs() < 1e-12, "{shares:?}");
        }
    }

    #[test]
    fn calibrated_weights_charge_the_ablated_span_its_measured_cost() {
        // Two heads of 256 tokens in blocks of 64: all influence on the diagonal tiles (head 0)
        // or half of it at distance 3 (head 1).
        let mut a = vec![0.0f32; 10];
        let mut b = vec![0.0f32; 10];
        for qb in 0..4 {
            a[qb * (qb + 1) / 2 + qb] = 1.0;
            b[qb * (qb + 1) / 2 + qb] = 1.0;
        }
        b[6] = 4.0; // query block 3, key block 0 (the sink's block: kept whole)
        b[7] = 4.0; // query block 3, key block 1
        let heads = vec![
            HeadBlocks::new(&a, 256, 64, 4).unwrap(),
            HeadBlocks::new(&b, 256, 64, 4).unwrap(),
        ];
        // Span 128: the rule 128:0 with sink 4, minimum 64, alignment 64.
        let mut consts = Plan::new(0, 0, vec![], "c");
        (consts.sink, consts.min_span, consts.align) = (4, 64, 64);
        let rule = Rule {
            alpha: 128.0,
            beta: 0.0,
        };
        assert_eq!(consts.span_of(rule, 256), 128);
        let d1 = heads[1].dropped(128);
        assert!(d1 > 0.0);
        let mut s = Balance::default().scales(&heads, 2);
        let hw = HeadWeights {
            weights: vec![0.0, 2.0],
            floor: 0.0,
            calibrate: Some(rule),
        };
        hw.apply(&mut s, &heads, &consts);
        // Head 0 weighs nothing; head 1's dropped influence at the span is its whole cost.
        assert_eq!(s[0], 0.0);
        let z = heads[1].total * s[1];
        assert!((z - 1.0).abs() < 1e-12);
        assert!((d1 * s[1] - d1 / heads[1].total).abs() < 1e-12);
    }

    #[test]
    fn parses_and_rejects() {
        assert_eq!("none".parse::<Balance>().unwrap(), Balance::default());
        assert_eq!("head:1".parse::<Balance>().unwrap(), Balance::per_head());
        let b: Balance = "layer:0.5".parse().unwrap();
        assert_eq!((b.unit, b.power), (BalanceUnit::Layer, 0.5));
        assert_eq!(b.to_string(), "layer:0.5");
        for bad in ["layer", "row:1", "head:x", "head:-1", "head:3", "head:NaN"] {
            assert!(bad.parse::<Balance>().is_err(), "{bad}");
        }
    }
}
