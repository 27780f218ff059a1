//! L2 prefetch of the next product's weights during a decode step's small kernels.
//!
//! A decode step alternates weight-streaming products with short kernels (norm, RoPE,
//! attention, SwiGLU) during which memory reads next to nothing. The norm, RoPE and SwiGLU
//! kernels are launched with extra blocks that only ask L2 to fetch the first `MOA_L2_PF` MiB
//! (default [`DEFAULT_MIB`]) of the product that follows them (`l2_prefetch_block` in
//! cuda/common.cuh), so the product starts on weights already in L2. This module plans those
//! ranges: the budget is split over the products of one input (q/k/v, gate/up) by size, each
//! range taken from the start of its matrix (the rows the product's first blocks read).
//! `MOA_L2_PF=0` turns it off. The split merge after a long decode attention repeats RoPE's
//! fetch of the output projection (the attention's K/V stream may have evicted it;
//! `MOA_PF_MERGE=0` leaves it out). Covering the product group after the next as well (RoPE, which
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
        L2Prefetch {
            budget: mib << 20,
            blocks: var("MOA_L2_PF_BLOCKS").unwrap_or(64).clamp(1, 1024) as u32,
        }
    }

    /// The prefetch of the first `budget` bytes of `mats` (by size), or none when off or
    /// there is nothing to fetch.
    pub fn plan(&self, mats: &[&GpuMatrix]) -> Prefetch {
        let spans: Vec<(u64, u64)> = mats
            .iter()
            .map(|m| (m.ptr, (m.rows * m.row_bytes) as u64))
            .collect();
        plan_ranges(self.budget, self.blocks, &spans)
    }
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
