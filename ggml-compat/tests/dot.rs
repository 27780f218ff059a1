//! Dot kernels against independent references.
//!
//! - Scalar kernels against the f64 dot of the decoded rows (`dequantize_row` of the random
//!   weight row times `dequantize_row` of the quantized activation row), for every weight type.
//! - AVX2 kernels against the scalar ones on random rows of many lengths.
//!
//! Tolerances are relative to the magnitude of the terms, not to the result: a random dot
//! product is a sum of terms of both signs and can be arbitrarily small, while every rounding
//! error in it is bounded by a multiple of the terms' magnitudes. The weights of the affine
//! types decode as `scaled quant + offset` (Q4_1 / Q5_1 `d*q + m`, Q2_K / Q4_K / Q5_K
//! `d*sc*q - dmin*m`) and the kernels sum the two parts separately, so the magnitude is
//! `sum((|scaled quant_i| + |offset_i|) * |a_i|)`. The offsets are found by decoding the row
//! with every block's `d` set to zero.

use ggml_compat::dot::{
    dot2_kernel, dot_kernel, dot_kernel_avx2, dot_kernel_scalar, dot_tile_kernel, vec_dot,
    vec_dot_type, TILE_TOKENS,
};
use ggml_compat::{dequantize_row, quantize_row, GgmlType};
use half::f16;

/// splitmix64: a tiny deterministic generator for test data.
struct Rng(u64);
impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [-1, 1).
    fn f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

const QUANT_TYPES: [GgmlType; 10] = [
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q2_K,
    GgmlType::Q3_K,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
];
const FLOAT_TYPES: [GgmlType; 3] = [GgmlType::F32, GgmlType::F16, GgmlType::BF16];

/// Byte offsets of the f16 scale fields (d, and m / dmin where present) in a block.
fn f16_fields(ty: GgmlType) -> &'static [usize] {
    use GgmlType::*;
    match ty {
        Q4_0 | Q5_0 | Q8_0 => &[0],
        Q4_1 | Q5_1 | Q4_K | Q5_K => &[0, 2],
        Q2_K => &[80, 82],
        Q3_K => &[108],
        Q6_K => &[208],
        _ => &[],
    }
}

/// A random row of `n` elements of `ty`: random bytes with the f16 scale fields replaced by
/// random values in [-1, 1] (so every block decodes to finite values); float types get random
/// values in [-1, 1].
fn random_weights(ty: GgmlType, n: usize, rng: &mut Rng) -> Vec<u8> {
    let bytes = ty.bytes_for(n as u64).unwrap() as usize;
    match ty {
        GgmlType::F32 => (0..n).flat_map(|_| rng.f32().to_le_bytes()).collect(),
        GgmlType::F16 => (0..n)
            .flat_map(|_| f16::from_f32(rng.f32()).to_le_bytes())
            .collect(),
        GgmlType::BF16 => (0..n)
            .flat_map(|_| ((rng.f32().to_bits() >> 16) as u16).to_le_bytes())
            .collect(),
        _ => {
            let mut w: Vec<u8> = (0..bytes).map(|_| rng.next_u64() as u8).collect();
            for blk in w.chunks_exact_mut(ty.type_size()) {
                for &off in f16_fields(ty) {
                    let v = f16::from_f32(rng.f32());
                    blk[off..off + 2].copy_from_slice(&v.to_le_bytes());
                }
            }
            w
        }
    }
}

/// A random activation row quantized to `vec_dot_type(ty)`, blocks of varied magnitude.
fn random_activation(ty: GgmlType, n: usize, rng: &mut Rng) -> Vec<u8> {
    let at = vec_dot_type(ty).unwrap();
    let x: Vec<f32> = (0..n)
        .map(|i| {
            let scale = [1.0, 0.05, 7.0, 0.3][(i / 256) % 4];
            rng.f32() * scale
        })
        .collect();
    let mut a = vec![0u8; at.bytes_for(n as u64).unwrap() as usize];
    quantize_row(at, &x, &mut a).unwrap();
    a
}

fn decode(ty: GgmlType, bytes: &[u8], n: usize) -> Vec<f32> {
    let mut out = vec![0f32; n];
    dequantize_row(ty, bytes, &mut out).unwrap();
    out
}

/// The offset part of each decoded weight: the row decoded with every block's `d` zeroed.
fn offsets(ty: GgmlType, w: &[u8], n: usize) -> Vec<f32> {
    let Some(&d) = f16_fields(ty).first() else {
        return vec![0.0; n];
    };
    let mut w0 = w.to_vec();
    for blk in w0.chunks_exact_mut(ty.type_size()) {
        blk[d..d + 2].fill(0);
    }
    decode(ty, &w0, n)
}

/// The decoded rows' f64 dot product, the magnitude of its terms (see the top of the file) and
/// the magnitude of the offset terms alone.
fn reference(ty: GgmlType, w: &[u8], a: &[u8], n: usize) -> (f64, f64, f64) {
    let at = vec_dot_type(ty).unwrap();
    let (wd, ad, off) = (decode(ty, w, n), decode(at, a, n), offsets(ty, w, n));
    let (mut dot, mut mag, mut offmag) = (0f64, 0f64, 0f64);
    for i in 0..n {
        let (x, y, o) = (wd[i] as f64, ad[i] as f64, off[i] as f64);
        dot += x * y;
        mag += ((x - o).abs() + o.abs()) * y.abs();
        offmag += (o * y).abs();
    }
    (dot, mag, offmag)
}

#[test]
fn scalar_kernels_match_dot_of_decoded_rows() {
    let mut rng = Rng(0xd07_0001);
    for ty in QUANT_TYPES.iter().chain(&FLOAT_TYPES).copied() {
        let at = vec_dot_type(ty).unwrap();
        let kernel = dot_kernel_scalar(ty).unwrap();
        let block = ty.block_size().max(at.block_size());
        for nblocks in [1usize, 2, 3, 8] {
            for _ in 0..10 {
                let n = block * nblocks;
                let w = random_weights(ty, n, &mut rng);
                let a = random_activation(ty, n, &mut rng);
                let (want, mag, offmag) = reference(ty, &w, &a, n);
                // Q8_1's `s` (d * sum of quants, with the unrounded d) is stored as f16, so the
                // offset terms carry up to about 2^-10 relative error against the decoded rows.
                let s_err = if at == GgmlType::Q8_1 {
                    2e-3 * offmag
                } else {
                    0.0
                };
                let got = kernel(n, &w, &a) as f64;
                assert!(
                    (got - want).abs() <= 1e-4 * mag + s_err + 1e-30,
                    "{ty} n={n}: kernel {got}, decoded rows {want} (magnitude {mag})"
                );
                assert_eq!(vec_dot(ty, n, &w, &a).map(|_| ()), Ok(()));
            }
        }
    }
}

/// Compares a kernel with the scalar reference on random rows of many lengths.
fn compare_kernels(ty: GgmlType, fast: fn(usize, &[u8], &[u8]) -> f32, rng: &mut Rng) {
    let scalar = dot_kernel_scalar(ty).unwrap();
    let at = vec_dot_type(ty).unwrap();
    let block = ty.block_size().max(at.block_size());
    let counts: &[usize] = if block == 1 {
        &[
            0, 1, 5, 8, 15, 31, 32, 33, 63, 64, 65, 100, 255, 1000, 4096, 4099,
        ]
    } else if block == 32 {
        &[1, 2, 3, 4, 5, 7, 8, 16, 31, 64, 128]
    } else {
        &[1, 2, 3, 5, 8, 16]
    };
    for &nb in counts {
        for _ in 0..10 {
            let n = block * nb;
            let w = random_weights(ty, n, rng);
            let a = random_activation(ty, n, rng);
            let want = scalar(n, &w, &a) as f64;
            let got = fast(n, &w, &a) as f64;
            let (_, mag, _) = reference(ty, &w, &a, n);
            assert!(
                (got - want).abs() <= 1e-5 * mag + 1e-30,
                "{ty} n={n}: fast {got}, scalar {want} (magnitude {mag})"
            );
        }
    }
}

#[test]
fn avx2_kernels_match_scalar() {
    if dot_kernel_avx2(GgmlType::Q8_0).is_none() {
        println!("SKIP avx2_kernels_match_scalar: this CPU lacks AVX2/FMA/F16C (or is not x86-64)");
        return;
    }
    let mut rng = Rng(0xd07_0002);
    for ty in QUANT_TYPES.iter().chain(&FLOAT_TYPES).copied() {
        let fast = dot_kernel_avx2(ty).unwrap_or_else(|| panic!("no AVX2 kernel for {ty}"));
        compare_kernels(ty, fast, &mut rng);
    }
}

/// Whatever `dot_kernel` picked agrees with the scalar reference.
#[test]
fn dispatched_kernels_match_scalar() {
    let mut rng = Rng(0xd07_0003);
    for ty in QUANT_TYPES.iter().chain(&FLOAT_TYPES).copied() {
        compare_kernels(ty, dot_kernel(ty).unwrap(), &mut rng);
    }
}

/// Extreme activations: every quant at +-127 and weights at their extremes, where 16-bit
/// intermediate sums in the SIMD kernels are closest to saturating.
#[test]
fn extreme_quants_do_not_saturate() {
    let mut rng = Rng(0xd07_0004);
    for ty in QUANT_TYPES {
        let at = vec_dot_type(ty).unwrap();
        let n = ty.block_size().max(at.block_size()) * 4;
        for pattern in 0..4u8 {
            let x: Vec<f32> = (0..n)
                .map(|i| match pattern {
                    0 => 1.0,
                    1 => -1.0,
                    2 => {
                        if i % 2 == 0 {
                            1.0
                        } else {
                            -1.0
                        }
                    }
                    _ => {
                        if rng.next_u64() & 1 == 0 {
                            1.0
                        } else {
                            -1.0
                        }
                    }
                })
                .collect();
            let mut a = vec![0u8; at.bytes_for(n as u64).unwrap() as usize];
            quantize_row(at, &x, &mut a).unwrap();
            for fill in [0x00u8, 0xFF, 0x80, 0x7F] {
                let mut w = vec![fill; ty.bytes_for(n as u64).unwrap() as usize];
                for blk in w.chunks_exact_mut(ty.type_size()) {
                    for &off in f16_fields(ty) {
                        blk[off..off + 2].copy_from_slice(&f16::from_f32(0.5).to_le_bytes());
                    }
                }
                let want = dot_kernel_scalar(ty).unwrap()(n, &w, &a) as f64;
                let (exact, mag, offmag) = reference(ty, &w, &a, n);
                let s_err = if at == GgmlType::Q8_1 {
                    2e-3 * offmag
                } else {
                    0.0
                };
                assert!(
                    (want - exact).abs() <= 1e-4 * mag + s_err + 1e-30,
                    "{ty} fill {fill:#x}: {want} vs {exact}"
                );
                if let Some(fast) = dot_kernel_avx2(ty) {
                    let got = fast(n, &w, &a) as f64;
                    assert!(
                        (got - want).abs() <= 1e-5 * mag + 1e-30,
                        "{ty} fill {fill:#x}: {got} vs {want}"
                    );
                }
            }
        }
    }
}

/// The two-row and the two-row, four-token kernels (K-quants: the tile only) give each pair
/// exactly the single-row kernel's result (bit for bit: they share work, not sums), on random
/// rows of many lengths and on extreme quants (every activation quant at +-127).
#[test]
fn multi_row_kernels_equal_the_single_row_kernel_bitwise() {
    let mut rng = Rng(0xd07_0005);
    let mut checked = 0;
    for ty in [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
    ] {
        let one = dot_kernel(ty).unwrap();
        let Some(tile) = dot_tile_kernel(ty) else {
            println!("SKIP {ty}: no multi-row kernels on this CPU");
            continue;
        };
        // The two-row kernels exist for the 32-element block types only.
        let two = dot2_kernel(ty);
        let block = ty.block_size();
        for nb in [1usize, 2, 3, 18, 128] {
            if block == 256 && nb > 18 {
                continue;
            }
            for extreme in [false, true] {
                let n = block * nb;
                let w: Vec<Vec<u8>> = (0..2).map(|_| random_weights(ty, n, &mut rng)).collect();
                let a: Vec<Vec<u8>> = (0..TILE_TOKENS)
                    .map(|t| {
                        if extreme {
                            let x: Vec<f32> = (0..n)
                                .map(|i| if (i + t) % 3 == 0 { -1.0 } else { 1.0 })
                                .collect();
                            let at = vec_dot_type(ty).unwrap();
                            let mut q = vec![0u8; at.bytes_for(n as u64).unwrap() as usize];
                            quantize_row(at, &x, &mut q).unwrap();
                            q
                        } else {
                            random_activation(ty, n, &mut rng)
                        }
                    })
                    .collect();
                let got = tile(n, &w[0], &w[1], std::array::from_fn(|t| a[t].as_slice()));
                for t in 0..TILE_TOKENS {
                    let (p0, p1) = two.map_or((0.0, 0.0), |two| two(n, &w[0], &w[1], &a[t]));
                    for r in 0..2 {
                        let want = one(n, &w[r], &a[t]);
                        assert_eq!(
                            got[r][t].to_bits(),
                            want.to_bits(),
                            "{ty} n={n} tile row {r} token {t}: {} vs {want}",
                            got[r][t]
                        );
                        let pair = if r == 0 { p0 } else { p1 };
                        assert!(
                            two.is_none() || pair.to_bits() == want.to_bits(),
                            "{ty} n={n} two-row row {r}: {pair} vs {want}"
                        );
                        checked += 1;
                    }
                }
            }
        }
    }
    println!("{checked} products equal");
}
