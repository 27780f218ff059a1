//! Vector helpers for the CPU backend's float loops (attention, norms), each with a portable
//! version and an AVX2+FMA+F16C version chosen once at run time. Quantized weight dot products
//! live in ggml-compat; these are the f32/f16 pieces around them and the attention kernels over
//! q8_0 KV rows (ggml's block layout: f16 scale, then 32 int8 quants; 34 bytes).

use half::f16;
use std::sync::OnceLock;

/// `out[r] = scale * dot(q, rows[r * stride..][..q.len()])` for `r < out.len()`.
pub type DotRowsFn = fn(&[f16], &[f16], usize, f32, &mut [f32]);
/// `acc += sum_r p[r] * rows[r * stride..][..acc.len()]` for `r < p.len()`.
pub type AxpyRowsFn = fn(&mut [f32], &[f32], &[f16], usize);
/// [`DotRowsFn`] for q8_0: query blocks, key rows of the same number of blocks `stride` bytes
/// apart.
pub type DotRowsQ8Fn = fn(&[u8], &[u8], usize, f32, &mut [f32]);
/// [`AxpyRowsFn`] for q8_0 value rows `stride` bytes apart.
pub type AxpyRowsQ8Fn = fn(&mut [f32], &[f32], &[u8], usize);

/// Bytes of a q8_0 block.
const Q8B: usize = crate::kv::Q8_0_BLOCK_BYTES;

struct Kernels {
    f32_to_f16: fn(&[f32], &mut [f16]),
    dot_rows_f16: DotRowsFn,
    axpy_rows_f16: AxpyRowsFn,
    dot_rows_q8_0: DotRowsQ8Fn,
    axpy_rows_q8_0: AxpyRowsQ8Fn,
}

fn kernels() -> &'static Kernels {
    static K: OnceLock<Kernels> = OnceLock::new();
    K.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        if ggml_compat::dot::kernel_set() == ggml_compat::dot::KernelSet::Avx2 {
            return Kernels {
                f32_to_f16: x86::f32_to_f16,
                dot_rows_f16: x86::dot_rows_f16,
                axpy_rows_f16: x86::axpy_rows_f16,
                dot_rows_q8_0: x86::dot_rows_q8_0,
                axpy_rows_q8_0: x86::axpy_rows_q8_0,
            };
        }
        Kernels {
            f32_to_f16: portable::f32_to_f16,
            dot_rows_f16: portable::dot_rows_f16,
            axpy_rows_f16: portable::axpy_rows_f16,
            dot_rows_q8_0: portable::dot_rows_q8_0,
            axpy_rows_q8_0: portable::axpy_rows_q8_0,
        }
    })
}

/// Scores of one query against consecutive rows (attention keys `stride` apart).
#[inline]
pub fn dot_rows_f16(q: &[f16], rows: &[f16], stride: usize, scale: f32, out: &mut [f32]) {
    (kernels().dot_rows_f16)(q, rows, stride, scale, out)
}

/// Weighted sum of consecutive rows (attention values `stride` apart) into `acc`.
#[inline]
pub fn axpy_rows_f16(acc: &mut [f32], p: &[f32], rows: &[f16], stride: usize) {
    (kernels().axpy_rows_f16)(acc, p, rows, stride)
}

/// Scores of a q8_0 query (`q`: whole blocks) against q8_0 key rows `stride` bytes apart:
/// integer dot products per block, times both blocks' scales and `scale`.
#[inline]
pub fn dot_rows_q8_0(q: &[u8], rows: &[u8], stride: usize, scale: f32, out: &mut [f32]) {
    (kernels().dot_rows_q8_0)(q, rows, stride, scale, out)
}

/// Weighted sum of q8_0 value rows (`acc.len() / 32` blocks each, `stride` bytes apart) into
/// `acc`, dequantized block by block.
#[inline]
pub fn axpy_rows_q8_0(acc: &mut [f32], p: &[f32], rows: &[u8], stride: usize) {
    (kernels().axpy_rows_q8_0)(acc, p, rows, stride)
}

/// Round to f16 (nearest even), as ggml does when it stores K/V or converts a query.
#[inline]
pub fn f32_to_f16(src: &[f32], dst: &mut [f16]) {
    (kernels().f32_to_f16)(src, dst)
}

pub mod portable {
    use half::f16;

    pub fn dot_rows_f16(q: &[f16], rows: &[f16], stride: usize, scale: f32, out: &mut [f32]) {
        let d = q.len();
        for (r, o) in out.iter_mut().enumerate() {
            *o = dot_f16(q, &rows[r * stride..r * stride + d]) * scale;
        }
    }
    pub fn axpy_rows_f16(acc: &mut [f32], p: &[f32], rows: &[f16], stride: usize) {
        let d = acc.len();
        for (r, &w) in p.iter().enumerate() {
            axpy_f16(acc, w, &rows[r * stride..r * stride + d]);
        }
    }

    fn q8_scale(block: &[u8]) -> f32 {
        f16::from_bits(u16::from_le_bytes([block[0], block[1]])).to_f32()
    }

    pub fn dot_rows_q8_0(q: &[u8], rows: &[u8], stride: usize, scale: f32, out: &mut [f32]) {
        let nb = q.len() / super::Q8B;
        for (r, o) in out.iter_mut().enumerate() {
            let row = &rows[r * stride..r * stride + nb * super::Q8B];
            let mut sum = 0f32;
            for (qb, kb) in q.chunks_exact(super::Q8B).zip(row.chunks_exact(super::Q8B)) {
                let isum: i32 = qb[2..]
                    .iter()
                    .zip(&kb[2..])
                    .map(|(&a, &b)| a as i8 as i32 * b as i8 as i32)
                    .sum();
                sum += (q8_scale(qb) * scale) * q8_scale(kb) * isum as f32;
            }
            *o = sum;
        }
    }
    pub fn axpy_rows_q8_0(acc: &mut [f32], p: &[f32], rows: &[u8], stride: usize) {
        let nb = acc.len() / 32;
        for (r, &w) in p.iter().enumerate() {
            let row = &rows[r * stride..r * stride + nb * super::Q8B];
            for (a, vb) in acc.chunks_exact_mut(32).zip(row.chunks_exact(super::Q8B)) {
                let s = w * q8_scale(vb);
                for (a, &v) in a.iter_mut().zip(&vb[2..]) {
                    *a += s * v as i8 as f32;
                }
            }
        }
    }

    pub fn dot_f16(a: &[f16], b: &[f16]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter().zip(b).map(|(x, y)| x.to_f32() * y.to_f32()).sum()
    }
    pub fn axpy_f16(y: &mut [f32], alpha: f32, x: &[f16]) {
        assert_eq!(y.len(), x.len());
        for (y, x) in y.iter_mut().zip(x) {
            *y += alpha * x.to_f32();
        }
    }
    pub fn f32_to_f16(src: &[f32], dst: &mut [f16]) {
        assert_eq!(src.len(), dst.len());
        for (d, s) in dst.iter_mut().zip(src) {
            *d = f16::from_f32(*s);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use half::f16;
    use std::arch::x86_64::*;

    pub fn f32_to_f16(src: &[f32], dst: &mut [f16]) {
        assert_eq!(src.len(), dst.len());
        // SAFETY: as above.
        unsafe { f32_to_f16_avx2(src, dst) }
    }

    /// Head dimensions up to this many values use the register-blocked kernels.
    const MAX_D: usize = 256;

    pub fn dot_rows_f16(q: &[f16], rows: &[f16], stride: usize, scale: f32, out: &mut [f32]) {
        let d = q.len();
        if !d.is_multiple_of(8) || d > MAX_D {
            return super::portable::dot_rows_f16(q, rows, stride, scale, out);
        }
        if let Some(last) = out.len().checked_sub(1) {
            assert!(last * stride + d <= rows.len(), "rows too short");
        }
        // SAFETY: CPU features as above; every row read lies inside `rows` (asserted).
        unsafe { dot_rows_avx2(q, rows, stride, scale, out) }
    }

    pub fn axpy_rows_f16(acc: &mut [f32], p: &[f32], rows: &[f16], stride: usize) {
        let d = acc.len();
        if !d.is_multiple_of(8) || d > MAX_D {
            return super::portable::axpy_rows_f16(acc, p, rows, stride);
        }
        if let Some(last) = p.len().checked_sub(1) {
            assert!(last * stride + d <= rows.len(), "rows too short");
        }
        // SAFETY: as above.
        unsafe { axpy_rows_avx2(acc, p, rows, stride) }
    }

    const Q8B: usize = super::Q8B;

    pub fn dot_rows_q8_0(q: &[u8], rows: &[u8], stride: usize, scale: f32, out: &mut [f32]) {
        let nb = q.len() / Q8B;
        if nb * 32 > MAX_D || q.len() != nb * Q8B {
            return super::portable::dot_rows_q8_0(q, rows, stride, scale, out);
        }
        if let Some(last) = out.len().checked_sub(1) {
            assert!(last * stride + nb * Q8B <= rows.len(), "rows too short");
        }
        // SAFETY: CPU features as above; every row read lies inside `rows` (asserted).
        unsafe { dot_rows_q8_0_avx2(q, rows, stride, scale, out) }
    }

    pub fn axpy_rows_q8_0(acc: &mut [f32], p: &[f32], rows: &[u8], stride: usize) {
        let d = acc.len();
        if !d.is_multiple_of(32) || d > MAX_D {
            return super::portable::axpy_rows_q8_0(acc, p, rows, stride);
        }
        if let Some(last) = p.len().checked_sub(1) {
            assert!(last * stride + d / 32 * Q8B <= rows.len(), "rows too short");
        }
        // SAFETY: as above.
        unsafe { axpy_rows_q8_0_avx2(acc, p, rows, stride) }
    }

    /// The f16 scale at the start of a q8_0 block.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q8_scale(b: *const u8) -> f32 {
        // SAFETY: the caller passes a pointer to a whole block (2 readable bytes here).
        unsafe {
            let bits = (b as *const u16).read_unaligned();
            _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_rows_q8_0_avx2(
        q: &[u8],
        rows: &[u8],
        stride: usize,
        scale: f32,
        out: &mut [f32],
    ) {
        let nb = q.len() / Q8B;
        // SAFETY: q holds nb blocks; row r spans r * stride .. r * stride + nb * 34, inside
        // `rows` as the caller asserted. Quants lie in [-127, 127] (ggml's encoder), so the
        // sign trick and the saturating 16-bit pair sums of maddubs are exact.
        unsafe {
            let mut qv = [_mm256_setzero_si256(); MAX_D / 32];
            let mut qd = [0f32; MAX_D / 32];
            for b in 0..nb {
                let blk = q.as_ptr().add(b * Q8B);
                qd[b] = q8_scale(blk) * scale;
                qv[b] = _mm256_loadu_si256(blk.add(2) as *const __m256i);
            }
            let ones = _mm256_set1_epi16(1);
            for (r, o) in out.iter_mut().enumerate() {
                let k = rows.as_ptr().add(r * stride);
                let mut acc = _mm256_setzero_ps();
                for b in 0..nb {
                    let kb = k.add(b * Q8B);
                    let kq = _mm256_loadu_si256(kb.add(2) as *const __m256i);
                    let p16 =
                        _mm256_maddubs_epi16(_mm256_sign_epi8(kq, kq), _mm256_sign_epi8(qv[b], kq));
                    let p = _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, ones));
                    let d = _mm256_set1_ps(q8_scale(kb) * qd[b]);
                    acc = _mm256_fmadd_ps(d, p, acc);
                }
                let s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
                let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
                let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
                *o = _mm_cvtss_f32(s);
            }
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn axpy_rows_q8_0_avx2(acc: &mut [f32], p: &[f32], rows: &[u8], stride: usize) {
        let nc = acc.len() / 8;
        let nb = acc.len() / 32;
        // SAFETY: acc holds nc * 8 values; row r spans r * stride .. r * stride + nb * 34,
        // inside `rows` as the caller asserted.
        unsafe {
            let mut av = [_mm256_setzero_ps(); MAX_D / 8];
            for (c, v) in av[..nc].iter_mut().enumerate() {
                *v = _mm256_loadu_ps(acc.as_ptr().add(8 * c));
            }
            for (r, &w) in p.iter().enumerate() {
                let v = rows.as_ptr().add(r * stride);
                for b in 0..nb {
                    let vb = v.add(b * Q8B);
                    let s = _mm256_set1_ps(w * q8_scale(vb));
                    for j in 0..4 {
                        let x8 = _mm_loadl_epi64(vb.add(2 + 8 * j) as *const __m128i);
                        let x = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(x8));
                        av[4 * b + j] = _mm256_fmadd_ps(s, x, av[4 * b + j]);
                    }
                }
            }
            for (c, v) in av[..nc].iter().enumerate() {
                _mm256_storeu_ps(acc.as_mut_ptr().add(8 * c), *v);
            }
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_rows_avx2(q: &[f16], rows: &[f16], stride: usize, scale: f32, out: &mut [f32]) {
        let nc = q.len() / 8;
        // SAFETY: q holds nc * 8 values; row r spans r * stride .. r * stride + nc * 8, inside
        // `rows` as the caller asserted.
        unsafe {
            let mut qv = [_mm256_setzero_ps(); MAX_D / 8];
            for (c, v) in qv[..nc].iter_mut().enumerate() {
                *v = _mm256_cvtph_ps(_mm_loadu_si128(q.as_ptr().add(8 * c) as *const __m128i));
            }
            for (r, o) in out.iter_mut().enumerate() {
                let k = rows.as_ptr().add(r * stride);
                let mut a0 = _mm256_setzero_ps();
                let mut a1 = _mm256_setzero_ps();
                let mut c = 0;
                while c + 1 < nc {
                    let k0 = _mm256_cvtph_ps(_mm_loadu_si128(k.add(8 * c) as *const __m128i));
                    let k1 = _mm256_cvtph_ps(_mm_loadu_si128(k.add(8 * c + 8) as *const __m128i));
                    a0 = _mm256_fmadd_ps(qv[c], k0, a0);
                    a1 = _mm256_fmadd_ps(qv[c + 1], k1, a1);
                    c += 2;
                }
                if c < nc {
                    let k0 = _mm256_cvtph_ps(_mm_loadu_si128(k.add(8 * c) as *const __m128i));
                    a0 = _mm256_fmadd_ps(qv[c], k0, a0);
                }
                let a = _mm256_add_ps(a0, a1);
                let s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
                let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
                let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
                *o = _mm_cvtss_f32(s) * scale;
            }
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn axpy_rows_avx2(acc: &mut [f32], p: &[f32], rows: &[f16], stride: usize) {
        let nc = acc.len() / 8;
        // SAFETY: acc holds nc * 8 values; row r spans r * stride .. r * stride + nc * 8, inside
        // `rows` as the caller asserted.
        unsafe {
            let mut av = [_mm256_setzero_ps(); MAX_D / 8];
            for (c, v) in av[..nc].iter_mut().enumerate() {
                *v = _mm256_loadu_ps(acc.as_ptr().add(8 * c));
            }
            for (r, &w) in p.iter().enumerate() {
                let v = rows.as_ptr().add(r * stride);
                let wv = _mm256_set1_ps(w);
                for (c, a) in av[..nc].iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(
                        wv,
                        _mm256_cvtph_ps(_mm_loadu_si128(v.add(8 * c) as *const __m128i)),
                        *a,
                    );
                }
            }
            for (c, v) in av[..nc].iter().enumerate() {
                _mm256_storeu_ps(acc.as_mut_ptr().add(8 * c), *v);
            }
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn f32_to_f16_avx2(src: &[f32], dst: &mut [f16]) {
        // SAFETY: the loads and stores below stay in bounds (see the loop conditions), and
        // the caller guarantees the CPU features this function is compiled for.
        unsafe {
            let n = src.len();
            let mut i = 0;
            // SAFETY: i + 8 <= n bounds each load of src and 16-byte store into dst.
            while i + 8 <= n {
                let v = _mm256_loadu_ps(src.as_ptr().add(i));
                let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v);
                _mm_storeu_si128(dst.as_mut_ptr().add(i) as *mut __m128i, h);
                i += 8;
            }
            while i < n {
                dst[i] = f16::from_f32(src[i]);
                i += 1;
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// `n` pseudo-random values in [-r, r] (xorshift from `seed`, steps of r / 10000).
    pub(crate) fn data_in(n: usize, seed: u32, r: f32) -> Vec<f32> {
        let mut x = seed.wrapping_mul(2654435761) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                (x % 20001) as f32 / (10000.0 / r) - r
            })
            .collect()
    }

    fn data(n: usize, seed: u32) -> Vec<f32> {
        data_in(n, seed, 1.0)
    }

    #[test]
    fn row_kernels_match_portable() {
        for (d, stride, n) in [
            (64, 64, 0),
            (64, 192, 7),
            (128, 128, 33),
            (24, 40, 5),
            (72, 72, 3),
        ] {
            let q32 = data(d, 5);
            let r32 = data(stride * n.max(1), 6);
            let mut q = vec![f16::ZERO; d];
            let mut rows = vec![f16::ZERO; r32.len()];
            portable::f32_to_f16(&q32, &mut q);
            portable::f32_to_f16(&r32, &mut rows);
            let (mut a, mut b) = (vec![0f32; n], vec![0f32; n]);
            dot_rows_f16(&q, &rows, stride, 0.125, &mut a);
            portable::dot_rows_f16(&q, &rows, stride, 0.125, &mut b);
            for (x, y) in a.iter().zip(&b) {
                assert!((x - y).abs() <= 1e-5 * (1.0 + y.abs()), "d={d}: {x} vs {y}");
            }
            let p = data(n, 7);
            let (mut a, mut b) = (data(d, 8), data(d, 8));
            axpy_rows_f16(&mut a, &p, &rows, stride);
            portable::axpy_rows_f16(&mut b, &p, &rows, stride);
            for (x, y) in a.iter().zip(&b) {
                assert!((x - y).abs() <= 1e-5 * (1.0 + y.abs()), "d={d}: {x} vs {y}");
            }
        }
    }

    #[test]
    fn q8_0_row_kernels_match_portable_and_decoded_rows() {
        use ggml_compat::q8::{dequantize_q8_0, quantize_q8_0};
        for (d, stride, n) in [(64, 64, 0), (64, 192, 9), (128, 128, 33), (256, 256, 3)] {
            let (bs, bd) = (d / 32 * Q8B, stride / 32 * Q8B);
            let q32 = data(d, 11);
            let r32 = data(stride * n.max(1), 12);
            let mut q = vec![0u8; bs];
            let mut rows = vec![0u8; r32.len() / 32 * Q8B];
            quantize_q8_0(&q32, &mut q);
            quantize_q8_0(&r32, &mut rows);
            let (mut qd, mut rd) = (vec![0f32; d], vec![0f32; r32.len()]);
            dequantize_q8_0(&q, &mut qd);
            dequantize_q8_0(&rows, &mut rd);
            let (mut a, mut b) = (vec![0f32; n], vec![0f32; n]);
            dot_rows_q8_0(&q, &rows, bd, 0.125, &mut a);
            portable::dot_rows_q8_0(&q, &rows, bd, 0.125, &mut b);
            for (r, (x, y)) in a.iter().zip(&b).enumerate() {
                let exact: f32 = qd
                    .iter()
                    .zip(&rd[r * stride..])
                    .map(|(u, v)| u * v)
                    .sum::<f32>()
                    * 0.125;
                assert!((x - y).abs() <= 1e-5 * (1.0 + y.abs()), "d={d}: {x} vs {y}");
                assert!(
                    (y - exact).abs() <= 1e-4 * (1.0 + exact.abs()),
                    "d={d}: {y} vs {exact}"
                );
            }
            let p = data(n, 7);
            let (mut a, mut b) = (data(d, 8), data(d, 8));
            let mut exact = data(d, 8);
            axpy_rows_q8_0(&mut a, &p, &rows, bd);
            portable::axpy_rows_q8_0(&mut b, &p, &rows, bd);
            for (r, &w) in p.iter().enumerate() {
                for (e, v) in exact.iter_mut().zip(&rd[r * stride..r * stride + d]) {
                    *e += w * v;
                }
            }
            for ((x, y), e) in a.iter().zip(&b).zip(&exact) {
                assert!((x - y).abs() <= 1e-5 * (1.0 + y.abs()), "d={d}: {x} vs {y}");
                assert!((y - e).abs() <= 1e-5 * (1.0 + e.abs()), "d={d}: {y} vs {e}");
            }
        }
    }

    #[test]
    fn dispatched_rounding_matches_portable() {
        for n in [0, 1, 7, 8, 15, 16, 17, 64, 100, 129] {
            let a32 = data(n, 1);
            let mut a = vec![f16::ZERO; n];
            f32_to_f16(&a32, &mut a);
            let mut ap = vec![f16::ZERO; n];
            portable::f32_to_f16(&a32, &mut ap);
            assert_eq!(a, ap, "rounding differs at n={n}");
        }
    }
}
