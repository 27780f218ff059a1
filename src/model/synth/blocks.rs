//! Random quantized blocks written directly (no f32 weights, no quantizer): random quant bytes
//! and sub-block scales, with the f16 block scales chosen so that the dequantized elements have
//! mean about 0 and a requested standard deviation. Much faster than quantizing random f32
//! values, and every value is finite by construction.
//!
//! Per-type arithmetic (element = what ggml's dequantization gives):
//! - Q4_0 `d (q - 8)`, q in 0..16: sd(q) = 4.61; Q5_0 `d (q - 16)`, q in 0..32: sd 9.23;
//!   Q8_0 `d q`, q an i8: sd 73.9; Q4_1 / Q5_1 `d q + m` with `m = -7.5 d` / `-15.5 d`.
//! - Q4_K `d sc q - dmin m` per 32-element sub-block: we set `m = sc` (6-bit, 16..48) and
//!   `dmin = 7.5 d`, so the element is `d sc (q - 7.5)`; Q5_K the same with `dmin = 15.5 d`.
//! - Q6_K `d sc (q - 32)` per 16 elements, sc an i8 (16..48), q in 0..64: sd 18.5.

use ggml_compat::GgmlType;
use half::f16;

/// A small deterministic generator (xorshift64*).
#[derive(Clone)]
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Rng {
        // splitmix64 of the seed, so nearby seeds give unrelated streams; never zero.
        let mut z = seed.wrapping_add(0x9E3779B97F4A7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
        Rng((z ^ (z >> 31)) | 1)
    }
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545F4914F6CDD1D)
    }
    /// Uniform in [-1, 1).
    pub(crate) fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    fn fill(&mut self, out: &mut [u8]) {
        let mut chunks = out.chunks_exact_mut(8);
        for c in &mut chunks {
            c.copy_from_slice(&self.next().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        let x = self.next().to_le_bytes();
        let n = rest.len();
        rest.copy_from_slice(&x[..n]);
    }
    /// Integer in lo..hi.
    fn range(&mut self, lo: u32, hi: u32) -> u32 {
        lo + ((self.next() >> 32) % (hi - lo) as u64) as u32
    }
    /// A block scale near `d` (within 25%), as f16 bytes.
    fn scale(&mut self, d: f32) -> [u8; 2] {
        f16::from_f32(d * (1.0 + 0.25 * self.unit())).to_le_bytes()
    }
}

/// True when [`fill_random`] can write this type.
pub(crate) fn supported(ty: GgmlType) -> bool {
    use GgmlType::*;
    matches!(
        ty,
        F32 | F16 | Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q8_0 | Q4_K | Q5_K | Q6_K
    )
}

/// Mean 6-bit sub-block scale used by the K-quants (uniform in 16..48).
const SC_LO: u32 = 16;
const SC_HI: u32 = 48;
const SC_MEAN: f32 = (SC_LO + SC_HI - 1) as f32 / 2.0;

/// Packs eight 6-bit scales and mins the way Q4_K / Q5_K store them (12 bytes).
fn pack_scales_k4(sc: &[u8; 8], m: &[u8; 8], out: &mut [u8]) {
    for j in 0..4 {
        out[j] = sc[j] | ((sc[j + 4] >> 4) << 6);
        out[j + 4] = m[j] | ((m[j + 4] >> 4) << 6);
        out[j + 8] = (sc[j + 4] & 0xF) | ((m[j + 4] & 0xF) << 4);
    }
}

/// Fills `out` (a whole number of blocks of `ty`) with random blocks whose elements have mean
/// about 0 and standard deviation about `sd`. `ty` must be [`supported`].
pub(crate) fn fill_random(ty: GgmlType, rng: &mut Rng, sd: f32, out: &mut [u8]) {
    use GgmlType::*;
    let bs = ty.type_size();
    debug_assert_eq!(out.len() % bs, 0);
    match ty {
        F32 => {
            for c in out.chunks_exact_mut(4) {
                c.copy_from_slice(&(sd * 1.732 * rng.unit()).to_le_bytes());
            }
        }
        F16 => {
            for c in out.chunks_exact_mut(2) {
                c.copy_from_slice(&f16::from_f32(sd * 1.732 * rng.unit()).to_le_bytes());
            }
        }
        Q4_0 | Q5_0 | Q8_0 => {
            let q_sd = match ty {
                Q4_0 => 4.61,
                Q5_0 => 9.23,
                _ => 73.9,
            };
            rng.fill(out);
            for b in out.chunks_exact_mut(bs) {
                b[..2].copy_from_slice(&rng.scale(sd / q_sd));
            }
        }
        Q4_1 | Q5_1 => {
            let (q_sd, mid) = if ty == Q4_1 {
                (4.61, 7.5)
            } else {
                (9.23, 15.5)
            };
            rng.fill(out);
            for b in out.chunks_exact_mut(bs) {
                let d = f16::from_le_bytes(rng.scale(sd / q_sd));
                b[..2].copy_from_slice(&d.to_le_bytes());
                b[2..4].copy_from_slice(&f16::from_f32(-mid * d.to_f32()).to_le_bytes());
            }
        }
        Q4_K | Q5_K => {
            let (q_sd, mid) = if ty == Q4_K {
                (4.61, 7.5)
            } else {
                (9.23, 15.5)
            };
            rng.fill(out);
            for b in out.chunks_exact_mut(bs) {
                let d = f16::from_le_bytes(rng.scale(sd / (q_sd * SC_MEAN)));
                b[..2].copy_from_slice(&d.to_le_bytes());
                b[2..4].copy_from_slice(&f16::from_f32(mid * d.to_f32()).to_le_bytes());
                let mut sc = [0u8; 8];
                for s in &mut sc {
                    *s = rng.range(SC_LO, SC_HI) as u8;
                }
                pack_scales_k4(&sc, &sc, &mut b[4..16]);
            }
        }
        Q6_K => {
            // ql[128] qh[64] scales[16] (i8) d (f16)
            rng.fill(out);
            for b in out.chunks_exact_mut(bs) {
                for s in &mut b[192..208] {
                    *s = rng.range(SC_LO, SC_HI) as u8;
                }
                b[208..210].copy_from_slice(&rng.scale(sd / (18.5 * SC_MEAN)));
            }
        }
        _ => unreachable!("fill_random: {ty} is not supported (check `supported` first)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_blocks_have_the_requested_spread() {
        use GgmlType::*;
        for ty in [F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K] {
            let n = 256 * 64;
            let mut bytes = vec![0u8; ty.bytes_for(n as u64).unwrap() as usize];
            let mut rng = Rng::new(3);
            let sd = 0.02;
            fill_random(ty, &mut rng, sd, &mut bytes);
            let mut x = vec![0f32; n];
            ggml_compat::dequantize_row(ty, &bytes, &mut x).unwrap();
            assert!(x.iter().all(|v| v.is_finite()), "{ty}");
            let mean = x.iter().sum::<f32>() / n as f32;
            let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n as f32;
            let got = var.sqrt();
            // Q4_0 and Q5_0 center on -0.5 (`q - 8`, `q - 16`): -0.11 sd at most.
            assert!(mean.abs() < 0.15 * sd, "{ty}: mean {mean}");
            assert!((got / sd - 1.0).abs() < 0.15, "{ty}: sd {got}, wanted {sd}");
        }
    }
}
