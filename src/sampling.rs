//! Token sampling as llama.cpp's common sampler does it.
//!
//! The chain, in llama.cpp's default order:
//!
//! 1. **penalties** over the last `repeat_last_n` tokens of the history: a token seen `c` times
//!    has its logit divided by `repeat_penalty` when positive (multiplied when `<= 0`), then
//!    lowered by `c * frequency_penalty + presence_penalty`. Off when `repeat_last_n == 0` or
//!    the three penalties are neutral (1, 0, 0).
//! 2. **top-k**: keep the `top_k` highest logits (`0` = off).
//! 3. **top-p**: softmax over what is left; keep the smallest prefix, by decreasing probability,
//!    whose cumulative probability is `>= top_p` (at least one token; `>= 1` = off).
//! 4. **min-p**: keep tokens whose probability is at least `min_p` times the largest one,
//!    computed in logit space as `logit >= max_logit + ln(min_p)` (`<= 0` = off).
//! 5. **temperature**: divide the logits by `temp`.
//! 6. **dist**: softmax and draw one token with a seeded PRNG (xoshiro256**).
//!
//! `temp <= 0` is greedy decoding: the argmax of the penalized logits (what llama.cpp's chain
//! gives then, since every filter keeps the best token). Ties go to the lowest token id, here and
//! wherever the order of equal logits matters (a top-k boundary).
//!
//! Top-p and min-p see the logits before temperature, as in llama.cpp. The random stream is not
//! llama.cpp's (mt19937), so the same seed draws different tokens than llama.cpp does; the
//! distribution drawn from is the same.
//!
//! Non-finite logits: NaN counts as `-inf` (never drawn while anything finite is left).
//!
//! [`Sampler::new`] allocates the vocabulary-sized scratch buffers once; [`Sampler::sample`]
//! allocates nothing (as long as `logits.len() <= vocab_size`).

use std::cmp::Ordering;

/// `seed` value meaning "pick a random seed" (llama.cpp's `LLAMA_DEFAULT_SEED`, `-1` on its
/// command line). [`Sampler::seed`] tells which seed was picked.
pub const RANDOM_SEED: u64 = u64::MAX;

/// Sampling parameters; the defaults are llama.cpp's.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplerConfig {
    /// Temperature; `<= 0` means greedy (argmax). Default 0.8.
    pub temp: f32,
    /// Keep the `top_k` most likely tokens; 0 disables. Default 40.
    pub top_k: usize,
    /// Nucleus sampling threshold; `>= 1` disables. Default 0.95.
    pub top_p: f32,
    /// Minimum probability relative to the most likely token; `<= 0` disables. Default 0.05.
    pub min_p: f32,
    /// Repetition penalty; 1 disables. Default 1.0.
    pub repeat_penalty: f32,
    /// How many of the most recent history tokens the penalties look at; 0 disables. Default 64.
    pub repeat_last_n: usize,
    /// Subtracted once per occurrence in the window. Default 0.
    pub frequency_penalty: f32,
    /// Subtracted once when the token occurs in the window. Default 0.
    pub presence_penalty: f32,
    /// PRNG seed; [`RANDOM_SEED`] (the default) picks one from the clock and OS entropy.
    pub seed: u64,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        SamplerConfig {
            temp: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            seed: RANDOM_SEED,
        }
    }
}

impl SamplerConfig {
    /// Greedy decoding (temperature 0), no penalties.
    pub fn greedy() -> Self {
        SamplerConfig {
            temp: 0.0,
            ..SamplerConfig::default()
        }
    }
}

/// A candidate token after the filters: its (penalized, temperature-scaled) logit and its
/// probability within the kept set.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TokenProb {
    pub id: u32,
    pub logit: f32,
    pub p: f32,
}

/// xoshiro256** seeded through splitmix64.
#[derive(Clone, Debug)]
struct Rng {
    s: [u64; 4],
}

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Rng {
    fn new(seed: u64) -> Rng {
        let mut sm = seed;
        let s = [
            splitmix64(&mut sm),
            splitmix64(&mut sm),
            splitmix64(&mut sm),
            splitmix64(&mut sm),
        ];
        Rng { s }
    }

    fn next_u64(&mut self) -> u64 {
        let result = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1) with 53 random bits.
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    // RandomState is seeded from OS entropy once per process (and varied per instance).
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(nanos);
    h.write_u32(std::process::id());
    let mut sm = h.finish();
    let seed = splitmix64(&mut sm);
    if seed == RANDOM_SEED {
        0
    } else {
        seed
    }
}

/// Descending logit, then ascending id: a total order, so results never depend on the sort.
fn cmp_desc(a: &TokenProb, b: &TokenProb) -> Ordering {
    b.logit.total_cmp(&a.logit).then(a.id.cmp(&b.id))
}

/// Index of the largest logit, lowest index on ties; NaN counts as `-inf`. 0 for empty input.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    let mut best_l = f32::NEG_INFINITY;
    let mut found = false;
    for (i, &l) in logits.iter().enumerate() {
        if l.is_nan() {
            continue;
        }
        if !found || l > best_l {
            best = i;
            best_l = l;
            found = true;
        }
    }
    best as u32
}

/// Samples tokens from logits; keeps the PRNG state between calls.
#[derive(Clone, Debug)]
pub struct Sampler {
    cfg: SamplerConfig,
    seed: u64,
    rng: Rng,
    /// The candidate buffer (capacity = vocabulary size).
    cand: Vec<TokenProb>,
    /// Occurrence counts in the penalty window; all zero between calls.
    counts: Vec<u32>,
}

impl Sampler {
    /// A sampler for a vocabulary of `vocab_size` tokens. Allocates its scratch buffers here.
    pub fn new(cfg: SamplerConfig, vocab_size: usize) -> Sampler {
        let seed = if cfg.seed == RANDOM_SEED {
            random_seed()
        } else {
            cfg.seed
        };
        let penalties_on = cfg.repeat_last_n > 0
            && (cfg.repeat_penalty != 1.0
                || cfg.frequency_penalty != 0.0
                || cfg.presence_penalty != 0.0);
        Sampler {
            cfg,
            seed,
            rng: Rng::new(seed),
            cand: Vec::with_capacity(vocab_size),
            counts: if penalties_on {
                vec![0; vocab_size]
            } else {
                Vec::new()
            },
        }
    }

    pub fn config(&self) -> &SamplerConfig {
        &self.cfg
    }

    /// The seed in use (the one picked when the config asked for [`RANDOM_SEED`]).
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Temperature `<= 0`: [`Sampler::sample`] returns the argmax of the penalized logits.
    pub fn is_greedy(&self) -> bool {
        self.cfg.temp <= 0.0
    }

    fn penalties_on(&self) -> bool {
        let c = &self.cfg;
        c.repeat_last_n > 0
            && (c.repeat_penalty != 1.0 || c.frequency_penalty != 0.0 || c.presence_penalty != 0.0)
    }

    /// Loads the logits into the candidate buffer (in id order) and applies the penalties.
    fn load(&mut self, logits: &[f32], history: &[u32]) {
        assert!(!logits.is_empty(), "Sampler: empty logits");
        self.cand.clear();
        self.cand
            .extend(logits.iter().enumerate().map(|(i, &l)| TokenProb {
                id: i as u32,
                logit: if l.is_nan() { f32::NEG_INFINITY } else { l },
                p: 0.0,
            }));
        if !self.penalties_on() {
            return;
        }
        if self.counts.len() < logits.len() {
            self.counts.resize(logits.len(), 0);
        }
        let n = logits.len();
        let window = &history[history.len().saturating_sub(self.cfg.repeat_last_n)..];
        for &t in window {
            if (t as usize) < n {
                self.counts[t as usize] += 1;
            }
        }
        let (rep, freq, pres) = (
            self.cfg.repeat_penalty,
            self.cfg.frequency_penalty,
            self.cfg.presence_penalty,
        );
        for &t in window {
            let t = t as usize;
            if t >= n {
                continue;
            }
            let c = std::mem::take(&mut self.counts[t]);
            if c == 0 {
                continue; // already applied for an earlier occurrence
            }
            let l = &mut self.cand[t].logit;
            if *l <= 0.0 {
                *l *= rep;
            } else {
                *l /= rep;
            }
            *l -= c as f32 * freq + pres;
        }
    }

    /// Argmax of the loaded candidates (id order, so ties go to the lowest id).
    fn cand_argmax(&self) -> usize {
        let mut best = 0;
        for (i, c) in self.cand.iter().enumerate() {
            if c.logit > self.cand[best].logit {
                best = i;
            }
        }
        best
    }

    /// Makes `cand[..want]` the `want` best candidates in descending order, given that
    /// `cand[..*sorted]` already is the sorted best prefix.
    fn sort_prefix(cand: &mut [TokenProb], sorted: &mut usize, want: usize) {
        let want = want.min(cand.len());
        if *sorted >= want {
            return;
        }
        let rest = &mut cand[*sorted..];
        let k = want - *sorted;
        if k < rest.len() {
            rest.select_nth_unstable_by(k - 1, cmp_desc);
        }
        rest[..k].sort_unstable_by(cmp_desc);
        *sorted = want;
    }

    /// Softmax of the candidates' logits into `p` (f32, max-subtracted, like llama.cpp).
    /// Returns false when there is no finite maximum (all `-inf`, or a `+inf`).
    fn softmax(cand: &mut [TokenProb]) -> bool {
        let max = cand
            .iter()
            .map(|c| c.logit)
            .fold(f32::NEG_INFINITY, f32::max);
        if !max.is_finite() {
            return false;
        }
        let mut sum = 0.0f32;
        for c in cand.iter_mut() {
            c.p = (c.logit - max).exp();
            sum += c.p;
        }
        for c in cand.iter_mut() {
            c.p /= sum;
        }
        true
    }

    /// Runs penalties, top-k, top-p, min-p and temperature, leaving the kept candidates in
    /// `self.cand`. Returns the index of the greedy choice instead when the temperature is
    /// `<= 0` or the logits have no finite maximum.
    fn filter(&mut self, logits: &[f32], history: &[u32]) -> Option<usize> {
        self.load(logits, history);
        if self.is_greedy() {
            return Some(self.cand_argmax());
        }
        let max = self.cand[self.cand_argmax()].logit;
        if !max.is_finite() {
            return Some(self.cand_argmax());
        }
        let cfg = &self.cfg;
        let cand = &mut self.cand;
        let mut sorted = 0usize;

        // top-k
        if cfg.top_k > 0 && cfg.top_k < cand.len() {
            Self::sort_prefix(cand, &mut sorted, cfg.top_k);
            cand.truncate(cfg.top_k);
        }

        // top-p
        if cfg.top_p < 1.0 && cand.len() > 1 {
            Self::softmax(cand);
            let mut cum = 0.0f32;
            let mut last = cand.len();
            for i in 0..cand.len() {
                if i == sorted {
                    let want = (2 * sorted).max(64);
                    Self::sort_prefix(cand, &mut sorted, want);
                }
                cum += cand[i].p;
                if cum >= cfg.top_p {
                    last = i + 1;
                    break;
                }
            }
            cand.truncate(last);
        }

        // min-p
        if cfg.min_p > 0.0 && cand.len() > 1 {
            let max = cand
                .iter()
                .map(|c| c.logit)
                .fold(f32::NEG_INFINITY, f32::max);
            let min_logit = max + cfg.min_p.ln();
            if cand.iter().any(|c| c.logit >= min_logit) {
                cand.retain(|c| c.logit >= min_logit);
            } else {
                // min_p > 1: nothing qualifies; keep the best token.
                let best = cand
                    .iter()
                    .copied()
                    .min_by(cmp_desc)
                    .expect("non-empty candidates");
                cand.clear();
                cand.push(best);
            }
        }

        // temperature
        for c in cand.iter_mut() {
            c.logit /= cfg.temp;
        }
        None
    }

    /// Picks the next token. `history` is the tokens seen so far (prompt and generated), used
    /// by the penalties. Panics on empty `logits`.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        if let Some(i) = self.filter(logits, history) {
            return self.cand[i].id;
        }
        let cand = &mut self.cand;
        if cand.len() == 1 {
            return cand[0].id;
        }
        let max = cand
            .iter()
            .map(|c| c.logit)
            .fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0f64;
        for c in cand.iter_mut() {
            c.p = (c.logit - max).exp();
            sum += c.p as f64;
        }
        let target = sum * self.rng.next_f64();
        let mut run = 0.0f64;
        let mut last_positive = 0;
        for (i, c) in cand.iter().enumerate() {
            if c.p > 0.0 {
                run += c.p as f64;
                last_positive = i;
                if run > target {
                    return c.id;
                }
            }
        }
        cand[last_positive].id
    }

    /// The candidates [`Sampler::sample`] would draw from, with their probabilities (after
    /// penalties, filters and temperature), most likely first. Does not advance the PRNG.
    /// Greedy configurations give the one argmax token with probability 1.
    pub fn candidates(&mut self, logits: &[f32], history: &[u32]) -> &[TokenProb] {
        if let Some(i) = self.filter(logits, history) {
            let mut best = self.cand[i];
            best.p = 1.0;
            self.cand.clear();
            self.cand.push(best);
            return &self.cand;
        }
        Self::softmax(&mut self.cand);
        self.cand.sort_unstable_by(cmp_desc);
        &self.cand
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(temp: f32, top_k: usize, top_p: f32, min_p: f32) -> SamplerConfig {
        SamplerConfig {
            temp,
            top_k,
            top_p,
            min_p,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            seed: 1234,
        }
    }

    /// Distinct random logits in roughly [-8, 8].
    fn random_logits(rng: &mut Rng, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| (rng.next_f64() * 16.0 - 8.0) as f32)
            .collect()
    }

    #[test]
    fn defaults_are_llama_cpp() {
        let d = SamplerConfig::default();
        assert_eq!((d.temp, d.top_k, d.top_p, d.min_p), (0.8, 40, 0.95, 0.05));
        assert_eq!((d.repeat_penalty, d.repeat_last_n), (1.0, 64));
        assert_eq!((d.frequency_penalty, d.presence_penalty), (0.0, 0.0));
        assert_eq!(d.seed, RANDOM_SEED);
        let s = Sampler::new(d, 10);
        assert_ne!(s.seed(), RANDOM_SEED);
        assert!(!s.is_greedy());
        assert!(Sampler::new(SamplerConfig::greedy(), 10).is_greedy());
    }

    #[test]
    fn argmax_lowest_index_on_ties() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
        assert_eq!(argmax(&[f32::NAN, -1.0, -1.0]), 1);
        assert_eq!(argmax(&[f32::NEG_INFINITY; 3]), 0);
        assert_eq!(argmax(&[-5.0]), 0);
    }

    #[test]
    fn greedy_is_argmax() {
        let mut rng = Rng::new(7);
        for temp in [0.0, -1.0] {
            let mut s = Sampler::new(cfg(temp, 40, 0.95, 0.05), 1000);
            for _ in 0..50 {
                let l = random_logits(&mut rng, 1000);
                assert_eq!(s.sample(&l, &[]), argmax(&l));
            }
            let mut l = vec![0.0f32; 8];
            l[3] = 5.0;
            l[6] = 5.0;
            assert_eq!(s.sample(&l, &[]), 3);
        }
    }

    #[test]
    fn greedy_applies_penalties_first() {
        let mut c = cfg(0.0, 40, 0.95, 0.05);
        c.repeat_penalty = 2.0;
        let mut s = Sampler::new(c, 4);
        // 4.0 / 2 = 2.0 < 3.0
        assert_eq!(s.sample(&[4.0, 3.0, 0.0, 0.0], &[0]), 1);
        assert_eq!(s.sample(&[4.0, 3.0, 0.0, 0.0], &[]), 0);
    }

    #[test]
    fn seeded_determinism() {
        let mut rng = Rng::new(99);
        let l = random_logits(&mut rng, 500);
        let draw = |seed: u64| {
            let mut c = cfg(1.0, 0, 1.0, 0.0);
            c.seed = seed;
            let mut s = Sampler::new(c, 500);
            (0..300).map(|_| s.sample(&l, &[])).collect::<Vec<_>>()
        };
        assert_eq!(draw(42), draw(42));
        assert_ne!(draw(42), draw(43));
        // a clone continues the same stream
        let mut a = Sampler::new(cfg(1.0, 0, 1.0, 0.0), 500);
        a.sample(&l, &[]);
        let mut b = a.clone();
        for _ in 0..20 {
            assert_eq!(a.sample(&l, &[]), b.sample(&l, &[]));
        }
    }

    /// Brute-force kept set (ids, ascending) for top-k, top-p, min-p, in f64 arithmetic.
    /// `None` when a boundary is too close to call in f32.
    fn reference_kept(l: &[f32], top_k: usize, top_p: f32, min_p: f32) -> Option<Vec<u32>> {
        let mut order: Vec<usize> = (0..l.len()).collect();
        order.sort_by(|&a, &b| l[b].partial_cmp(&l[a]).unwrap().then(a.cmp(&b)));
        if top_k > 0 && top_k < order.len() {
            order.truncate(top_k);
        }
        if top_p < 1.0 {
            let max = l[order[0]] as f64;
            let w: Vec<f64> = order.iter().map(|&i| (l[i] as f64 - max).exp()).collect();
            let total: f64 = w.iter().sum();
            let mut cum = 0.0;
            let mut keep = order.len();
            for (j, wj) in w.iter().enumerate() {
                cum += wj / total;
                if (cum - top_p as f64).abs() < 1e-5 {
                    return None;
                }
                if cum >= top_p as f64 {
                    keep = j + 1;
                    break;
                }
            }
            order.truncate(keep);
        }
        if min_p > 0.0 {
            let max = l[order[0]] as f64;
            let thr = max + (min_p as f64).ln();
            if order.iter().any(|&i| (l[i] as f64 - thr).abs() < 1e-5) {
                return None;
            }
            order.retain(|&i| l[i] as f64 >= thr);
        }
        let mut ids: Vec<u32> = order.into_iter().map(|i| i as u32).collect();
        ids.sort_unstable();
        Some(ids)
    }

    #[test]
    fn filters_keep_the_reference_sets() {
        let mut rng = Rng::new(2024);
        let configs = [
            (40, 1.0, 0.0),
            (1, 1.0, 0.0),
            (0, 0.9, 0.0),
            (0, 0.5, 0.0),
            (0, 0.0, 0.0),
            (0, 1.0, 0.05),
            (0, 1.0, 0.3),
            (40, 0.95, 0.05),
            (10, 0.8, 0.1),
            (200, 0.99, 0.01),
            (5000, 0.95, 0.0),
        ];
        let mut checked = 0;
        for &(top_k, top_p, min_p) in &configs {
            for n in [1usize, 2, 7, 100, 3000] {
                for _ in 0..4 {
                    let mut l = random_logits(&mut rng, n);
                    if n > 7 {
                        // peaked distributions too: a few large logits
                        for _ in 0..3 {
                            let i = (rng.next_u64() % n as u64) as usize;
                            l[i] += 10.0;
                        }
                    }
                    let Some(want) = reference_kept(&l, top_k, top_p, min_p) else {
                        continue;
                    };
                    let mut s = Sampler::new(cfg(0.7, top_k, top_p, min_p), n);
                    let mut got: Vec<u32> = s.candidates(&l, &[]).iter().map(|c| c.id).collect();
                    got.sort_unstable();
                    assert_eq!(got, want, "top_k={top_k} top_p={top_p} min_p={min_p} n={n}");
                    checked += 1;
                }
            }
        }
        assert!(checked > 180, "only {checked} cases checked");
    }

    #[test]
    fn top_k_boundary_ties_go_to_lowest_ids() {
        let l = [1.0, 2.0, 2.0, 2.0, 0.0];
        let mut s = Sampler::new(cfg(1.0, 2, 1.0, 0.0), 5);
        let mut got: Vec<u32> = s.candidates(&l, &[]).iter().map(|c| c.id).collect();
        got.sort_unstable();
        assert_eq!(got, vec![1, 2]);
    }

    #[test]
    fn candidate_probabilities_are_softmax_at_temperature() {
        let l = [1.0f32, 2.0, 0.5, -1.0];
        let temp = 0.5;
        let mut s = Sampler::new(cfg(temp, 0, 1.0, 0.0), 4);
        let got = s.candidates(&l, &[]).to_vec();
        let z: f64 = l.iter().map(|&x| (x as f64 / temp as f64).exp()).sum();
        assert_eq!(
            got.iter().map(|c| c.id).collect::<Vec<_>>(),
            vec![1, 0, 2, 3]
        );
        for c in &got {
            let want = (l[c.id as usize] as f64 / temp as f64).exp() / z;
            assert!((c.p as f64 - want).abs() < 1e-6, "{c:?} vs {want}");
        }
    }

    #[test]
    fn sampled_frequencies_match_softmax() {
        // Ten tokens; top-k 8 drops two, top-p 0.95 then trims the tail, min-p the rest.
        let l = [2.0f32, 1.5, 1.0, 0.9, 0.3, -0.2, -0.5, -1.0, 1.2, -3.0];
        let c = SamplerConfig {
            seed: 7,
            ..cfg(0.7, 8, 0.95, 0.05)
        };
        let kept = reference_kept(&l, 8, 0.95, 0.05).unwrap();
        let mut s = Sampler::new(c, l.len());
        assert_eq!(
            {
                let mut v: Vec<u32> = s.candidates(&l, &[]).iter().map(|c| c.id).collect();
                v.sort_unstable();
                v
            },
            kept
        );
        let z: f64 = kept
            .iter()
            .map(|&i| (l[i as usize] as f64 / 0.7).exp())
            .sum();
        let n = 200_000;
        let mut counts = [0usize; 10];
        for _ in 0..n {
            counts[s.sample(&l, &[]) as usize] += 1;
        }
        let mut chi2 = 0.0;
        for i in 0..l.len() {
            if kept.contains(&(i as u32)) {
                let expected = n as f64 * (l[i] as f64 / 0.7).exp() / z;
                chi2 += (counts[i] as f64 - expected).powi(2) / expected;
            } else {
                assert_eq!(counts[i], 0, "token {i} is outside the kept set");
            }
        }
        // kept.len() - 1 degrees of freedom (<= 7); 24.3 is the 0.999 quantile for 7.
        assert!(kept.len() >= 4, "kept {kept:?}");
        assert!(chi2 < 24.3, "chi2 = {chi2}, counts {counts:?}");
    }

    #[test]
    fn penalties_match_hand_computation() {
        let l = [2.0f32, -1.0, 0.5, 0.0, 3.0, 1.0];
        let c = SamplerConfig {
            repeat_penalty: 1.5,
            frequency_penalty: 0.25,
            presence_penalty: 0.5,
            repeat_last_n: 5,
            ..cfg(1.0, 0, 1.0, 0.0)
        };
        let mut s = Sampler::new(c.clone(), l.len());
        // Window = last 5: [1, 1, 2, 3, 1]; token 0 and 4 fall outside it; 99 is out of range.
        let history = [0, 4, 99, 1, 1, 2, 3, 1];
        let history = &history[..];
        let window_start = history.len() - 5;
        assert_eq!(&history[window_start..], &[1, 1, 2, 3, 1]);
        let got = s.candidates(&l, history).to_vec();
        let logit = |id: u32| got.iter().find(|c| c.id == id).unwrap().logit;
        assert_eq!(logit(0), 2.0);
        assert_eq!(logit(4), 3.0);
        assert_eq!(logit(5), 1.0);
        // token 1: -1.0 * 1.5 - (3 * 0.25 + 0.5)
        assert!((logit(1) - (-1.5 - 1.25)).abs() < 1e-6);
        // token 2: 0.5 / 1.5 - (0.25 + 0.5)
        assert!((logit(2) - (0.5 / 1.5 - 0.75)).abs() < 1e-6);
        // token 3: 0.0 is multiplied (stays 0) - 0.75
        assert!((logit(3) - (-0.75)).abs() < 1e-6);

        // The counts buffer is clean afterwards: a second call gives the same result.
        assert_eq!(s.candidates(&l, history).to_vec(), got);

        // repeat_last_n = 0 disables all penalties.
        let mut off = Sampler::new(
            SamplerConfig {
                repeat_last_n: 0,
                ..c
            },
            l.len(),
        );
        for t in off.candidates(&l, history) {
            assert_eq!(t.logit, l[t.id as usize]);
        }
    }

    #[test]
    fn non_finite_logits() {
        let mut s = Sampler::new(cfg(0.8, 40, 0.95, 0.05), 4);
        let l = [f32::NAN, f32::NEG_INFINITY, 1.0, f32::NEG_INFINITY];
        for _ in 0..100 {
            assert_eq!(s.sample(&l, &[]), 2);
        }
        assert_eq!(s.sample(&[f32::NEG_INFINITY; 4], &[]), 0);
        let mut loose = Sampler::new(cfg(1.0, 0, 1.0, 0.0), 4);
        for _ in 0..100 {
            let t = loose.sample(&[0.0, f32::NEG_INFINITY, 0.0, f32::NAN], &[]);
            assert!(t == 0 || t == 2, "{t}");
        }
    }

    #[test]
    fn large_vocab_top_p_only() {
        // Exercises the incremental partial sort well past its first chunks. Over thousands of
        // f32 additions the exact boundary is rounding-dependent, so check that the kept set is
        // the top-m by logit with m where the exact cumulative probability crosses top_p.
        let mut rng = Rng::new(5);
        let n = 50_000;
        let l: Vec<f32> = (0..n).map(|_| (rng.next_f64() * 0.5) as f32).collect();
        let top_p = 0.3;
        let mut s = Sampler::new(cfg(1.0, 0, top_p, 0.0), n);
        let mut got: Vec<u32> = s.candidates(&l, &[]).iter().map(|c| c.id).collect();
        let m = got.len();
        got.sort_unstable();

        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&a, &b| l[b].total_cmp(&l[a]).then(a.cmp(&b)));
        let mut want: Vec<u32> = order[..m].iter().map(|&i| i as u32).collect();
        want.sort_unstable();
        assert_eq!(got, want, "not the top-{m} tokens");

        let max = l[order[0]] as f64;
        let w: Vec<f64> = order.iter().map(|&i| (l[i] as f64 - max).exp()).collect();
        let total: f64 = w.iter().sum();
        let cum_before: f64 = w[..m - 1].iter().sum::<f64>() / total;
        let cum_at: f64 = w[..m].iter().sum::<f64>() / total;
        assert!(m > 1000, "kept {m}");
        assert!(cum_before < top_p as f64 + 1e-4, "{cum_before}");
        assert!(cum_at >= top_p as f64 - 1e-4, "{cum_at}");
    }
}
