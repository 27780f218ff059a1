//! L2 prefetch of the next product's weights during a decode step's small kernels.
//!
//! A decode step alternates weight-streaming products with short kernels (norm, RoPE,
//! attention, SwiGLU) during which memory reads next to nothing. The norm, RoPE and SwiGLU
//! kernels are launched with extra blocks that only ask L2 to fetch the first `MOA_L2_PF` MiB
//! (default [`DEFAULT_MIB`]) of the product that follows them (`l2_prefetch_block` in
//! cuda/common.cuh), so the product starts on weights already in L2. This module plans those
//! ranges: the budget is split over the products of one input (q/k/v, gate/up) by size, each
//! range taken from the start of its matrix (the rows the product's first blocks read).
//! `MOA_L2_PF=0` turns it off. Covering the product group after the next as well (RoPE, which
//! the long attention kernel follows, starting gate/up too) was slower: tg128 323.7 vs 342.5
//! t/s at 32 MiB on an H100, so a prefetch covers the next group only.

use super::device::A;
use super::matmul::GpuMatrix;

/// MiB a prefetching kernel fetches by default: tg128 of the 8B shape (Q4_K) on an H100, same
/// machine: 0 MiB 356.9 t/s (mean of 6), 2 MiB 361.6, 4 MiB 366.3 (mean of 5; 364-369 with 16 to
/// 128 blocks), 6 MiB 368.7, 8 MiB 363.0, 12 MiB 345.3, 16 MiB 346.5, 32 MiB 342.5; 16 x 16384
/// parallel decode 1632.1 at 4 MiB vs 1634.1 at 0.
pub const DEFAULT_MIB: u64 = 4;

/// Ranges a prefetch covers at most (q/k/v are three matrices).
pub const MAX_RANGES: usize = 3;

/// The prefetch settings of a backend (`MOA_L2_PF` MiB per prefetching kernel,
/// `MOA_L2_PF_BLOCKS` extra blocks, default 64).
#[derive(Clone, Copy, Debug, Default)]
pub struct L2Prefetch {
    /// Bytes per prefetching kernel; 0 = off.
    pub budget: u64,
    /// Bytes the RoPE kernel before attention fetches of the output projection
    /// (`MOA_L2_PF_ATT` MiB; default `budget`).
    pub att_budget: u64,
    /// Bytes for a group of one, two or three products (down or output, gate/up, q/k/v):
    /// `MOA_L2_PF_DOWN`, `MOA_L2_PF_GU`, `MOA_L2_PF_QKV` MiB (default `budget`).
    pub group: [u64; 3],
    /// `MOA_L2_PF_CHAIN=1`: what is left of `att_budget` after the output projection goes to
    /// the product group after it (gate/up).
    pub att_chain: bool,
    /// Extra blocks a prefetching kernel is launched with.
    pub blocks: u32,
}

impl L2Prefetch {
    /// The settings for a device of compute capability `cc`: off before sm_90, which has no
    /// bulk prefetch (the blocks would only take launch slots).
    pub fn from_env(cc: (i32, i32)) -> L2Prefetch {
        let var = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u64>().ok());
        let mib = if cc.0 >= 9 {
            var("MOA_L2_PF").unwrap_or(DEFAULT_MIB)
        } else {
            0
        };
        let att = if cc.0 >= 9 {
            var("MOA_L2_PF_ATT").unwrap_or(mib)
        } else {
            0
        };
        L2Prefetch {
            budget: mib << 20,
            att_budget: att << 20,
            att_chain: var("MOA_L2_PF_CHAIN") == Some(1),
            group: ["MOA_L2_PF_DOWN", "MOA_L2_PF_GU", "MOA_L2_PF_QKV"].map(|k| {
                if mib == 0 {
                    0
                } else {
                    var(k).unwrap_or(mib) << 20
                }
            }),
            blocks: var("MOA_L2_PF_BLOCKS").unwrap_or(64).clamp(1, 1024) as u32,
        }
    }

    /// The budget for a group of `n` products read by one input.
    pub fn group_budget(&self, n: usize) -> u64 {
        match n {
            0 => 0,
            1..=3 => self.group[n - 1],
            _ => self.budget,
        }
    }

    /// [`plan_ranges_chain`] over the matrices of two product groups.
    pub fn plan_chain(&self, budget: u64, first: &[&GpuMatrix], then: &[&GpuMatrix]) -> Prefetch {
        let spans = |ms: &[&GpuMatrix]| -> Vec<(u64, u64)> {
            ms.iter()
                .map(|m| (m.ptr, (m.rows * m.row_bytes) as u64))
                .collect()
        };
        plan_ranges_chain(budget, self.blocks, &spans(first), &spans(then))
    }

    /// The prefetch of the first `budget` bytes of `mats` (by size), or none when there is
    /// nothing to fetch.
    pub fn plan_bytes(&self, budget: u64, mats: &[&GpuMatrix]) -> Prefetch {
        let spans: Vec<(u64, u64)> = mats
            .iter()
            .map(|m| (m.ptr, (m.rows * m.row_bytes) as u64))
            .collect();
        plan_ranges(budget, self.blocks, &spans)
    }
}

/// [`plan_ranges`] over two groups of spans read one after the other: the first group whole (or
/// as much of it as `budget` allows), what is left of the budget over the second group.
pub fn plan_ranges_chain(
    budget: u64,
    blocks: u32,
    first: &[(u64, u64)],
    then: &[(u64, u64)],
) -> Prefetch {
    let first = &first[..first.len().min(MAX_RANGES)];
    let total: u64 = first.iter().map(|s| s.1).sum();
    let mut p = plan_ranges(budget.min(total), blocks, first);
    let rest = budget.saturating_sub(total);
    let room = MAX_RANGES - first.len();
    if rest > 0 && room > 0 && !then.is_empty() {
        let q = plan_ranges(rest, blocks, &then[..then.len().min(room)]);
        for (slot, r) in p.ranges[first.len()..].iter_mut().zip(q.ranges) {
            *slot = r;
        }
        p.blocks = p.blocks.max(q.blocks);
    }
    p
}

/// Extra grid blocks and the byte ranges they fetch (the kernels' `PF_PARAMS`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Prefetch {
    pub blocks: u32,
    pub ranges: [(u64, u64); MAX_RANGES],
}

impl Prefetch {
    /// The kernel arguments `pf_blocks, pf0, pf0n, pf1, pf1n, pf2, pf2n`.
    pub fn args(&self) -> [A; 1 + 2 * MAX_RANGES] {
        let r = &self.ranges;
        [
            A::I(self.blocks as i32),
            A::P(r[0].0),
            A::P(r[0].1),
            A::P(r[1].0),
            A::P(r[1].1),
            A::P(r[2].0),
            A::P(r[2].1),
        ]
    }
}

/// Splits `budget` bytes over the first [`MAX_RANGES`] of `spans` (device address, bytes) in
/// proportion to their sizes, each part from its span's start, 16-byte aligned and a multiple of
/// 16 bytes long (what `cp.async.bulk.prefetch.L2` takes). No blocks when nothing is left to
/// fetch.
pub fn plan_ranges(budget: u64, blocks: u32, spans: &[(u64, u64)]) -> Prefetch {
    let spans = &spans[..spans.len().min(MAX_RANGES)];
    let total: u64 = spans.iter().map(|s| s.1).sum();
    let mut p = Prefetch::default();
    if budget == 0 || total == 0 {
        return p;
    }
    for (slot, &(ptr, bytes)) in p.ranges.iter_mut().zip(spans) {
        let share = if budget >= total {
            bytes
        } else {
            (budget as u128 * bytes as u128 / total as u128) as u64
        };
        let start = ptr.next_multiple_of(16);
        let len = share.saturating_sub(start - ptr) & !15;
        if len > 0 {
            *slot = (start, len);
        }
    }
    if p.ranges.iter().any(|r| r.1 > 0) {
        p.blocks = blocks;
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_is_split_by_size_aligned_and_capped() {
        // Two matrices of 3 and 1 MiB, 2 MiB budget: 1.5 and 0.5 MiB.
        let p = plan_ranges(2 << 20, 64, &[(0x1000, 3 << 20), (0x900000, 1 << 20)]);
        assert_eq!(p.blocks, 64);
        assert_eq!(p.ranges[0], (0x1000, 3 << 19));
        assert_eq!(p.ranges[1], (0x900000, 1 << 19));
        assert_eq!(p.ranges[2], (0, 0));
        // A budget above the total takes every byte (rounded down to 16); unaligned starts move
        // up to the next 16 bytes.
        let p = plan_ranges(100 << 20, 8, &[(0x1008, 1000)]);
        assert_eq!(p.ranges[0], (0x1010, 992));
        // Off, or nothing to fetch: no blocks, so the launch is exactly the plain one.
        assert_eq!(plan_ranges(0, 64, &[(0x1000, 4096)]), Prefetch::default());
        assert_eq!(plan_ranges(1 << 20, 64, &[]), Prefetch::default());
        assert_eq!(plan_ranges(1 << 20, 64, &[(0x1001, 15)]).blocks, 0);
    }

    #[test]
    fn chain_fills_the_first_group_then_the_next() {
        let first = [(0x1000, 4 << 20)];
        let then = [(0x1000000, 3 << 20), (0x2000000, 1 << 20)];
        // Budget below the first group: only the first group, as plan_ranges would.
        let p = plan_ranges_chain(2 << 20, 64, &first, &then);
        assert_eq!(p, plan_ranges(2 << 20, 64, &first));
        // 6 MiB: the first whole, 2 MiB over the next by size.
        let p = plan_ranges_chain(6 << 20, 64, &first, &then);
        assert_eq!(
            p.ranges,
            [
                (0x1000, 4 << 20),
                (0x1000000, 3 << 19),
                (0x2000000, 1 << 19)
            ]
        );
        assert_eq!(p.blocks, 64);
        // Three spans in the first group leave no slot for the next.
        let three = [(0x1000, 16), (0x2000, 16), (0x3000, 16)];
        assert_eq!(
            plan_ranges_chain(1 << 30, 64, &three, &then),
            plan_ranges(48, 64, &three)
        );
    }

    #[test]
    fn at_most_three_ranges() {
        // q/k/v fill the three ranges; a fourth span is not fetched.
        let spans = [
            (0x1000, 4096),
            (0x3000, 4096),
            (0x5000, 4096),
            (0x9000, 4096),
        ];
        let p = plan_ranges(1 << 30, 64, &spans);
        assert_eq!(p.ranges, [(0x1000, 4096), (0x3000, 4096), (0x5000, 4096)]);
    }
}
