//! Dropped influence: how much of a head's profiled attention influence the token-exact span mask
//! (moa-method.md section 2) removes at a given span.
//!
//! A query at position `i` sees key `j` iff `j <= i && (j < sink || i - j < C - sink)`
//! ([`crate::kv::visible`]). The profile only knows influence summed over `block x block` tiles
//! of (query, key) positions, so inside a tile the influence is taken as **uniform over the
//! tile's causal pairs** (`j <= i`, both below the length): a tile whose causal pairs are a
//! fraction `f` excluded by the mask contributes `f` times its mass. Counts are exact integers
//! (closed forms below), so a tile cut by the window edge, the sink boundary, the diagonal or a
//! partial last block is charged its exact excluded fraction, not all-or-nothing.
//!
//! [`HeadBlocks`] pre-aggregates one head's matrix: full tiles whose keys lie past the sink
//! depend on the window only through the block distance `qb - kb`, so their masses are summed
//! per distance; the remaining tiles (keys overlapping the sink, a partial last block) are kept
//! one by one. Evaluating a span then costs O(blocks per side), not O(blocks^2).

use crate::moa::profile_file::packed_index;

/// `sum_{t=a}^{b} clamp(t, 0, m)` over integers (0 when `b < a` or `m <= 0`).
fn sum_clamp(a: i64, b: i64, m: i64) -> i64 {
    if b < a || m <= 0 {
        return 0;
    }
    // F(x) = sum_{t <= x} clamp(t, 0, m).
    let f = |x: i64| -> i64 {
        if x <= 0 {
            0
        } else if x <= m {
            x * (x + 1) / 2
        } else {
            m * (m + 1) / 2 + (x - m) * m
        }
    };
    f(b) - f(a - 1)
}

/// Causal pairs `(i, j)`, `j <= i`, with `i` in `[qs, qe)` and `j` in `[ks, ke)`.
pub fn causal_pairs(qs: usize, qe: usize, ks: usize, ke: usize) -> u64 {
    if qe <= qs || ke <= ks {
        return 0;
    }
    let (qs, qe, ks, ke) = (qs as i64, qe as i64, ks as i64, ke as i64);
    // For query i: clamp(i - ks + 1, 0, ke - ks) keys.
    sum_clamp(qs - ks + 1, qe - 1 - ks + 1, ke - ks) as u64
}

/// Causal pairs of the tile that the mask of a head with span `cap` excludes: `j >= sink` and
/// `i - j >= cap - sink`. `cap` must exceed `sink`.
pub fn excluded_pairs(qs: usize, qe: usize, ks: usize, ke: usize, sink: usize, cap: usize) -> u64 {
    debug_assert!(cap > sink);
    let lo = ks.max(sink);
    if qe <= qs || ke <= lo {
        return 0;
    }
    let w = (cap - sink) as i64;
    let (qs, qe, lo, ke) = (qs as i64, qe as i64, lo as i64, ke as i64);
    // For query i: keys j in [lo, min(ke, i - w + 1)), i.e. clamp(i - w - lo + 1, 0, ke - lo).
    sum_clamp(qs - w - lo + 1, qe - 1 - w - lo + 1, ke - lo) as u64
}

/// One tile kept individually (not aggregated by distance).
#[derive(Debug, Clone, Copy)]
struct Tile {
    qs: usize,
    qe: usize,
    ks: usize,
    ke: usize,
    mass: f64,
    pairs: u64,
}

/// One head's block influence at one length, aggregated for fast span evaluation.
#[derive(Debug, Clone)]
pub struct HeadBlocks {
    length: usize,
    block: usize,
    sink: usize,
    /// Mass of the regular tiles (full, keys at or past the sink) at block distance `d`.
    by_distance: Vec<f64>,
    /// The other tiles with nonzero mass.
    tiles: Vec<Tile>,
    /// Total mass of the head's matrix.
    pub total: f64,
}

/// Errors in the inputs of the cost computation.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CostError {
    #[error("length {length} with block {block} needs {expected} packed values, found {found}")]
    Shape {
        length: usize,
        block: usize,
        expected: usize,
        found: usize,
    },
    #[error(
        "block influence at query block {qb}, key block {kb} is {value} (must be finite and >= 0)"
    )]
    BadValue { qb: usize, kb: usize, value: f32 },
    #[error("block size must be positive and the sink ({sink}) smaller than every span")]
    BadConstants { sink: usize },
}

impl HeadBlocks {
    /// Aggregates the packed lower-triangular block matrix `packed` (index `qb*(qb+1)/2 + kb`)
    /// of a head profiled at `length` tokens in tiles of `block`.
    pub fn new(
        packed: &[f32],
        length: usize,
        block: usize,
        sink: usize,
    ) -> Result<HeadBlocks, CostError> {
        if block == 0 {
            return Err(CostError::BadConstants { sink });
        }
        let nb = length.div_ceil(block);
        let expected = nb * (nb + 1) / 2;
        if packed.len() != expected {
            return Err(CostError::Shape {
                length,
                block,
                expected,
                found: packed.len(),
            });
        }
        let mut by_distance = vec![0.0f64; nb];
        let mut tiles = Vec::new();
        let mut total = 0.0;
        for qb in 0..nb {
            let qs = qb * block;
            let qe = ((qb + 1) * block).min(length);
            for kb in 0..=qb {
                let v = packed[packed_index(qb, kb)];
                if !(v.is_finite() && v >= 0.0) {
                    return Err(CostError::BadValue { qb, kb, value: v });
                }
                if v == 0.0 {
                    continue;
                }
                let m = v as f64;
                total += m;
                let ks = kb * block;
                let ke = ((kb + 1) * block).min(length);
                let full = qe - qs == block && ke - ks == block;
                if full && ks >= sink {
                    by_distance[qb - kb] += m;
                } else {
                    tiles.push(Tile {
                        qs,
                        qe,
                        ks,
                        ke,
                        mass: m,
                        pairs: causal_pairs(qs, qe, ks, ke),
                    });
                }
            }
        }
        Ok(HeadBlocks {
            length,
            block,
            sink,
            by_distance,
            tiles,
            total,
        })
    }

    pub fn length(&self) -> usize {
        self.length
    }

    /// Influence the mask of span `cap` drops (same units as the profile's matrix).
    pub fn dropped(&self, cap: usize) -> f64 {
        let (b, sink) = (self.block, self.sink);
        let cap = cap.max(sink + 1);
        if cap >= self.length {
            return 0.0;
        }
        let w = cap - sink;
        let mut sum = 0.0;
        // Regular tiles at distance d: query block [d*b, d*b+b) against key block [0, b) shifted
        // past the sink (the count only depends on i - j, so any representative works).
        let full_pairs = causal_pairs(0, b, 0, b) as f64;
        let off_pairs = (b * b) as f64;
        for (d, &m) in self.by_distance.iter().enumerate() {
            if m == 0.0 || (d + 1) * b <= w {
                // The farthest pair of the tile is (d+1)*b - 1 < w apart: nothing excluded.
                continue;
            }
            let (qs, ks) = (sink + d * b, sink);
            let ex = excluded_pairs(qs, qs + b, ks, ks + b, sink, cap) as f64;
            let pairs = if d == 0 { full_pairs } else { off_pairs };
            sum += m * ex / pairs;
        }
        for t in &self.tiles {
            if t.pairs == 0 {
                continue;
            }
            let ex = excluded_pairs(t.qs, t.qe, t.ks, t.ke, sink, cap);
            sum += t.mass * ex as f64 / t.pairs as f64;
        }
        sum
    }
}

/// Reference implementation of [`HeadBlocks::dropped`] by enumerating every token pair (tests).
pub fn dropped_bruteforce(
    packed: &[f32],
    length: usize,
    block: usize,
    sink: usize,
    cap: usize,
) -> f64 {
    let nb = length.div_ceil(block);
    let mut sum = 0.0;
    for qb in 0..nb {
        for kb in 0..=qb {
            let (mut pairs, mut ex) = (0u64, 0u64);
            for i in qb * block..((qb + 1) * block).min(length) {
                for j in kb * block..((kb + 1) * block).min(length) {
                    if j > i {
                        continue;
                    }
                    pairs += 1;
                    if !crate::kv::visible(cap, sink, i, j) {
                        ex += 1;
                    }
                }
            }
            if pairs > 0 {
                sum += packed[packed_index(qb, kb)] as f64 * ex as f64 / pairs as f64;
            }
        }
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 33) as f32) / (1u64 << 31) as f32
    }

    #[test]
    fn pair_counts_match_enumeration() {
        let mut s = 7u64;
        for _ in 0..400 {
            let r = |s: &mut u64, n: usize| (lcg(s) * n as f32) as usize;
            let qs = r(&mut s, 300);
            let qe = qs + r(&mut s, 80);
            let ks = r(&mut s, 300);
            let ke = ks + r(&mut s, 80);
            let sink = 1 + r(&mut s, 100);
            let cap = sink + 1 + r(&mut s, 200);
            let (mut p, mut e) = (0, 0);
            for i in qs..qe {
                for j in ks..ke {
                    if j <= i {
                        p += 1;
                        if !crate::kv::visible(cap, sink, i, j) {
                            e += 1;
                        }
                    }
                }
            }
            assert_eq!(causal_pairs(qs, qe, ks, ke), p, "{qs} {qe} {ks} {ke}");
            assert_eq!(
                excluded_pairs(qs, qe, ks, ke, sink, cap),
                e,
                "{qs} {qe} {ks} {ke} sink {sink} cap {cap}"
            );
        }
    }

    #[test]
    fn dropped_matches_token_enumeration() {
        let mut s = 11u64;
        // Lengths that are and are not multiples of the block; sinks aligned and not.
        for &(length, block, sink) in &[
            (512usize, 64usize, 64usize),
            (500, 64, 64),
            (448, 32, 64),
            (300, 64, 96),
        ] {
            let nb = length.div_ceil(block);
            let packed: Vec<f32> = (0..nb * (nb + 1) / 2).map(|_| lcg(&mut s)).collect();
            let hb = HeadBlocks::new(&packed, length, block, sink).unwrap();
            for cap in [sink + 1, 128, 130, 192, 256, 320, 384, 448, 499, 512, 1024] {
                if cap <= sink {
                    continue;
                }
                let fast = hb.dropped(cap);
                let slow = dropped_bruteforce(&packed, length, block, sink, cap);
                assert!(
                    (fast - slow).abs() <= 1e-9 * slow.max(1.0),
                    "length {length} block {block} sink {sink} cap {cap}: {fast} vs {slow}"
                );
            }
            assert_eq!(hb.dropped(length), 0.0);
            let t: f64 = packed.iter().map(|&v| v as f64).sum();
            assert!((hb.total - t).abs() < 1e-9 * t);
        }
    }

    #[test]
    fn local_and_global_heads() {
        // A head whose influence is on the diagonal loses nothing to a short window; one whose
        // influence sits on the far keys loses it all.
        let (length, block, sink) = (1024, 64, 64);
        let nb = length / block;
        let mut local = vec![0.0f32; nb * (nb + 1) / 2];
        let mut global = local.clone();
        for qb in 0..nb {
            local[packed_index(qb, qb)] = 1.0;
            if qb >= 4 {
                global[packed_index(qb, 1)] = 1.0;
            }
        }
        let l = HeadBlocks::new(&local, length, block, sink).unwrap();
        let g = HeadBlocks::new(&global, length, block, sink).unwrap();
        assert_eq!(l.dropped(128), 0.0);
        assert!((g.dropped(128) - g.total).abs() < 1e-9);
        assert!(g.dropped(512) > 0.0 && g.dropped(512) < g.total);
        // Dropped influence never grows with the span.
        let mut prev = f64::INFINITY;
        for cap in (128..=1024).step_by(64) {
            let d = g.dropped(cap);
            assert!(d <= prev + 1e-12);
            prev = d;
        }
    }

    #[test]
    fn bad_input_is_an_error() {
        assert!(matches!(
            HeadBlocks::new(&[1.0; 5], 128, 64, 64),
            Err(CostError::Shape { expected: 3, .. })
        ));
        assert!(matches!(
            HeadBlocks::new(&[1.0, f32::NAN, 0.0], 128, 64, 64),
            Err(CostError::BadValue { qb: 1, kb: 0, .. })
        ));
        assert!(HeadBlocks::new(&[1.0, -1.0, 0.0], 128, 64, 64).is_err());
    }
}
