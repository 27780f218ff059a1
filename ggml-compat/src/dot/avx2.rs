//! AVX2 + FMA (+ F16C) dot kernels for x86-64, chosen at run time by [`kernel`].
//!
//! Same arithmetic as the scalar reference: integer products summed exactly per block (32
//! bytes at a time with `maddubs` / `madd`), then an f32 fused multiply-add of the block scale
//! into eight f32 lanes, summed horizontally at the end. Signed-by-signed byte products use
//! the sign trick (`|x| * (y * sign(x))`), which needs the activation bytes in `[-127, 127]`
//! so that a 16-bit pair sum cannot saturate; our Q8 encoders guarantee that.
//!
//! Memory safety: every kernel first calls [`check_blocks`], which asserts that `w` and `a` hold
//! `nb` whole blocks; all loads below stay inside block `i < nb`, at offsets within the block
//! size. The functions are only reachable through [`kernel`], which checks the CPU features.

// Before Rust 1.87 (our MSRV is 1.80) every intrinsic is an unsafe fn; since then those without
// pointer arguments are safe inside functions with matching target features, which makes some
// of the blocks below redundant on new compilers but required on old ones.
#![allow(unused_unsafe)]

use super::layout::*;
use super::{check_blocks, Dot2Fn, DotFn, DotTileFn, TILE_TOKENS};
use crate::{GgmlType, QK, QK_K};
use std::arch::x86_64::*;

/// True when the CPU has every feature the kernels here are compiled for.
fn detected() -> bool {
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

/// The AVX2 kernel for weights of type `ty`, or `None` when the CPU lacks the features.
pub(super) fn kernel(ty: GgmlType) -> Option<DotFn> {
    if !detected() {
        return None;
    }
    use GgmlType::*;
    Some(match ty {
        F32 => f32_f32,
        F16 => f16_f16,
        BF16 => bf16_f32,
        Q4_0 => q4_0_q8_0,
        Q4_1 => q4_1_q8_1,
        Q5_0 => q5_0_q8_0,
        Q5_1 => q5_1_q8_1,
        Q8_0 => q8_0_q8_0,
        Q2_K => q2_k_q8_k,
        Q3_K => q3_k_q8_k,
        Q4_K => q4_k_q8_k,
        Q5_K => q5_k_q8_k,
        Q6_K => q6_k_q8_k,
        _ => return None,
    })
}

/// Safe entry points for the `unsafe` target-feature kernels.
macro_rules! entries {
    ($($name:ident => $imp:ident;)*) => {$(
        fn $name(n: usize, w: &[u8], a: &[u8]) -> f32 {
            debug_assert!(detected());
            // SAFETY: this function is only handed out by `kernel`, after `detected()` confirmed
            // that the CPU supports AVX2, FMA and F16C, the features `$imp` is compiled for.
            unsafe { $imp(n, w, a) }
        }
    )*};
}

entries! {
    f32_f32 => f32_f32_impl;
    f16_f16 => f16_f16_impl;
    bf16_f32 => bf16_f32_impl;
    q4_0_q8_0 => q4_0_impl;
    q4_1_q8_1 => q4_1_impl;
    q5_0_q8_0 => q5_0_impl;
    q5_1_q8_1 => q5_1_impl;
    q8_0_q8_0 => q8_0_impl;
    q2_k_q8_k => q2_k_impl;
    q3_k_q8_k => q3_k_impl;
    q4_k_q8_k => q4_k_impl;
    q5_k_q8_k => q5_k_impl;
    q6_k_q8_k => q6_k_impl;
}

// ---------------------------------------------------------------------------------------------
// Helpers. All are `#[inline]` target-feature functions called only from kernels compiled
// with the same features.

/// Sum of the eight lanes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn hsum_ps(v: __m256) -> f32 {
    // SAFETY: register-only intrinsics; the CPU features are guaranteed by the caller.
    unsafe {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }
}

/// Sum of the eight i32 lanes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn hsum_epi32(v: __m256i) -> i32 {
    // SAFETY: register-only intrinsics; the CPU features are guaranteed by the caller.
    unsafe {
        let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
        _mm_cvtsi128_si32(s)
    }
}

/// The little-endian f16 at `p`, widened to f32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f16_at(p: *const u8) -> f32 {
    // SAFETY: the caller guarantees two readable bytes at `p`; the read is unaligned-safe.
    unsafe {
        let h = std::ptr::read_unaligned(p.cast::<u16>());
        // A broadcast rather than an insert into lane 0: LLVM turns the latter into `vpinsrw`
        // into whatever register is free, often an accumulator, creating a false dependency
        // that serialized whole loops.
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_set1_epi16(h as i16)))
    }
}

/// The product of the little-endian f16s at `px` and `py` (a weight and an activation scale).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f16_mul(px: *const u8, py: *const u8) -> f32 {
    // SAFETY: the caller guarantees two readable bytes at `px` and at `py`.
    unsafe {
        let hx = std::ptr::read_unaligned(px.cast::<u16>()) as u32;
        let hy = std::ptr::read_unaligned(py.cast::<u16>()) as u32;
        let v = _mm_cvtph_ps(_mm_set1_epi32((hx | hy << 16) as i32));
        _mm_cvtss_f32(_mm_mul_ss(v, _mm_movehdup_ps(v)))
    }
}

/// Two products of f16 pairs: the f16s at `px`, `px + 2` times those at `py`, `py + 2`, as
/// lanes 0 and 1 (Q4_1 / Q5_1 `d * d` and `m * s`).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f16_mul2(px: *const u8, py: *const u8) -> __m128 {
    // SAFETY: the caller guarantees four readable bytes at `px` and at `py`.
    unsafe {
        let x = std::ptr::read_unaligned(px.cast::<u32>());
        let y = std::ptr::read_unaligned(py.cast::<u32>());
        let v = _mm_cvtph_ps(_mm_set_epi32(0, 0, y as i32, x as i32));
        _mm_mul_ps(v, _mm_movehl_ps(v, v))
    }
}

/// The little-endian f32 at `p`.
#[inline]
unsafe fn f32_at(p: *const u8) -> f32 {
    // SAFETY: the caller guarantees four readable bytes at `p`; the read is unaligned-safe.
    unsafe { std::ptr::read_unaligned(p.cast::<f32>()) }
}

/// 32 bytes at `p` (unaligned).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load32(p: *const u8) -> __m256i {
    // SAFETY: the caller guarantees 32 readable bytes at `p`; loadu has no alignment need.
    unsafe { _mm256_loadu_si256(p.cast::<__m256i>()) }
}

/// 16 bytes at `p` (unaligned).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load16(p: *const u8) -> __m128i {
    // SAFETY: the caller guarantees 16 readable bytes at `p`; loadu has no alignment need.
    unsafe { _mm_loadu_si128(p.cast::<__m128i>()) }
}

/// Expands 16 bytes of nibbles at `p` to 32 bytes: the low nibbles, then the high nibbles
/// (the element order of the 32-element block formats).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn nibbles32(p: *const u8) -> __m256i {
    // SAFETY: the caller guarantees 16 readable bytes at `p`.
    unsafe {
        let lo = load16(p);
        let hi = _mm_srli_epi16::<4>(lo);
        _mm256_and_si256(_mm256_set_m128i(hi, lo), _mm256_set1_epi8(0x0F))
    }
}

/// Expands the 32 bits of the little-endian u32 at `p` to 32 bytes, 0x10 where the bit is set
/// (bit `i` to byte `i`): the fifth bits of a Q5 block.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn fifth_bits32(p: *const u8) -> __m256i {
    // SAFETY: the caller guarantees 4 readable bytes at `p`; the rest is register-only.
    unsafe {
        let bits = std::ptr::read_unaligned(p.cast::<u32>());
        let v = _mm256_set1_epi32(bits as i32);
        // Byte i takes source byte i / 8 (shuffles stay within 128-bit halves; every half holds
        // all four source bytes), then keeps bit i % 8.
        let pick = _mm256_set_epi64x(
            0x0303_0303_0303_0303,
            0x0202_0202_0202_0202,
            0x0101_0101_0101_0101,
            0,
        );
        let v = _mm256_shuffle_epi8(v, pick);
        let mask = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
        let set = _mm256_cmpeq_epi8(_mm256_and_si256(v, mask), mask);
        _mm256_and_si256(set, _mm256_set1_epi8(0x10))
    }
}

/// Sums of products of signed bytes `x` by signed bytes `y` (`y` in [-127, 127]), four pairs
/// per i32 lane, as f32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_i8_ps(x: __m256i, y: __m256i) -> __m256 {
    // SAFETY: register-only intrinsics; the CPU features are guaranteed by the caller.
    unsafe {
        let ax = _mm256_sign_epi8(x, x);
        let sy = _mm256_sign_epi8(y, x);
        dot_u8_ps(ax, sy)
    }
}

/// Sums of products of unsigned bytes `x` by signed bytes `y`, four pairs per i32 lane, as f32.
/// Needs `x * y` pair sums within i16: true for `x <= 128` with `|y| <= 127`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_u8_ps(x: __m256i, y: __m256i) -> __m256 {
    // SAFETY: register-only intrinsics; the CPU features are guaranteed by the caller.
    unsafe {
        let p16 = _mm256_maddubs_epi16(x, y);
        _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, _mm256_set1_epi16(1)))
    }
}

// ---------------------------------------------------------------------------------------------
// Float rows.

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f32_f32_impl(n: usize, w: &[u8], a: &[u8]) -> f32 {
    check_blocks(n, 1, w, 4, a, 4);
    let (wp, ap) = (w.as_ptr().cast::<f32>(), a.as_ptr().cast::<f32>());
    // SAFETY: `check_blocks` asserted 4n readable bytes in each; reads are at element i < n,
    // unaligned loads.
    unsafe {
        let mut acc = [_mm256_setzero_ps(); 4];
        let body = n / 32 * 32;
        let mut i = 0;
        while i < body {
            for (k, s) in acc.iter_mut().enumerate() {
                let x = _mm256_loadu_ps(wp.add(i + 8 * k));
                let y = _mm256_loadu_ps(ap.add(i + 8 * k));
                *s = _mm256_fmadd_ps(x, y, *s);
            }
            i += 32;
        }
        let mut tail = 0f32;
        while i < n {
            tail += std::ptr::read_unaligned(wp.add(i)) * std::ptr::read_unaligned(ap.add(i));
            i += 1;
        }
        let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        hsum_ps(s) + tail
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f16_f16_impl(n: usize, w: &[u8], a: &[u8]) -> f32 {
    check_blocks(n, 1, w, 2, a, 2);
    let (wp, ap) = (w.as_ptr(), a.as_ptr());
    // SAFETY: `check_blocks` asserted 2n readable bytes in each; loads cover elements < n.
    unsafe {
        let mut acc = [_mm256_setzero_ps(); 4];
        let body = n / 32 * 32;
        let mut i = 0;
        while i < body {
            for (k, s) in acc.iter_mut().enumerate() {
                let x = _mm256_cvtph_ps(load16(wp.add(2 * (i + 8 * k))));
                let y = _mm256_cvtph_ps(load16(ap.add(2 * (i + 8 * k))));
                *s = _mm256_fmadd_ps(x, y, *s);
            }
            i += 32;
        }
        let mut tail = 0f32;
        while i < n {
            tail += f16_at(wp.add(2 * i)) * f16_at(ap.add(2 * i));
            i += 1;
        }
        let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        hsum_ps(s) + tail
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn bf16_f32_impl(n: usize, w: &[u8], a: &[u8]) -> f32 {
    check_blocks(n, 1, w, 2, a, 4);
    let (wp, ap) = (w.as_ptr(), a.as_ptr().cast::<f32>());
    // SAFETY: `check_blocks` asserted 2n bytes of `w` and 4n of `a`; loads cover elements < n.
    unsafe {
        let mut acc = [_mm256_setzero_ps(); 4];
        let body = n / 32 * 32;
        let mut i = 0;
        while i < body {
            for (k, s) in acc.iter_mut().enumerate() {
                let h = _mm256_cvtepu16_epi32(load16(wp.add(2 * (i + 8 * k))));
                let x = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(h));
                let y = _mm256_loadu_ps(ap.add(i + 8 * k));
                *s = _mm256_fmadd_ps(x, y, *s);
            }
            i += 32;
        }
        let mut tail = 0f32;
        while i < n {
            let h = std::ptr::read_unaligned(wp.add(2 * i).cast::<u16>());
            tail += f32::from_bits((h as u32) << 16) * std::ptr::read_unaligned(ap.add(i));
            i += 1;
        }
        let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        hsum_ps(s) + tail
    }
}

// ---------------------------------------------------------------------------------------------
// 32-element blocks.

/// The loop of the kernels against Q8_0. `quants(x)` (an unsafe target-feature fn) turns a
/// pointer to a weight block into its 32 quants as signed bytes, reading only inside that block.
macro_rules! against_q8_0 {
    ($n:expr, $w:expr, $a:expr, $wbytes:expr, $quants:ident) => {{
        let nb = check_blocks($n, QK, $w, $wbytes, $a, Q8_0_BYTES);
        let (wp, ap) = ($w.as_ptr(), $a.as_ptr());
        // SAFETY: block i < nb lies within the lengths `check_blocks` asserted; `$quants` reads
        // inside the weight block, the activation reads are bytes 0..34 of block i. The caller
        // is compiled with AVX2, FMA and F16C, which its own caller guarantees.
        //
        // One accumulator, block after block, as ggml's x86 kernels sum (so results match them
        // bit for bit).
        unsafe {
            let mut acc = _mm256_setzero_ps();
            for i in 0..nb {
                let (x0, y0) = (wp.add(i * $wbytes), ap.add(i * Q8_0_BYTES));
                let p0 = dot_i8_ps($quants(x0), load32(y0.add(2)));
                acc = _mm256_fmadd_ps(_mm256_set1_ps(f16_mul(x0, y0)), p0, acc);
            }
            hsum_ps(acc)
        }
    }};
}

/// The loop of the kernels against Q8_1. `quants(x)` (an unsafe target-feature fn) turns a
/// pointer to a weight block into its 32 quants as unsigned bytes (0..32), reading only inside
/// that block; the block's f16 `m` is at its byte 2.
macro_rules! against_q8_1 {
    ($n:expr, $w:expr, $a:expr, $wbytes:expr, $quants:ident) => {{
        let nb = check_blocks($n, QK, $w, $wbytes, $a, Q8_1_BYTES);
        let (wp, ap) = ($w.as_ptr(), $a.as_ptr());
        // SAFETY: block i < nb lies within the lengths `check_blocks` asserted; `$quants` reads
        // inside the weight block, the activation reads are bytes 0..36 of block i. The caller
        // is compiled with AVX2, FMA and F16C, which its own caller guarantees.
        //
        // The order of ggml's x86 kernel (ggml_vec_dot_q4_1_q8_1), so that results match it
        // bit for bit: one f32 accumulator, `acc = fma(d_w * d_a, block sums, acc)` block after
        // block, the minimum terms in one scalar chain `mins = fma(m_w, s_a, mins)`, then the
        // lane sum plus `mins`.
        unsafe {
            let mut acc = _mm256_setzero_ps();
            let mut mins = 0f32;
            for i in 0..nb {
                let (x0, y0) = (wp.add(i * $wbytes), ap.add(i * Q8_1_BYTES));
                let p0 = dot_u8_ps($quants(x0), load32(y0.add(4)));
                // Lane 0: d_w * d_a, lane 1: m_w * s_a (not used: ggml fuses it below).
                let s0 = f16_mul2(x0, y0);
                mins = f16_at(x0.add(2)).mul_add(f16_at(y0.add(2)), mins);
                acc = _mm256_fmadd_ps(_mm256_broadcastss_ps(s0), p0, acc);
            }
            hsum_ps(acc) + mins
        }
    }};
}

/// Two rows' dot products with the same activations, each summed exactly as one call of the
/// single-row kernel (`against_q8_0` / `against_q8_1`); the two independent chains keep the
/// fused multiply-adds' latency hidden.
macro_rules! against_q8_0_x2 {
    ($n:expr, $w0:expr, $w1:expr, $a:expr, $wbytes:expr, $quants:ident) => {{
        let nb = check_blocks($n, QK, $w0, $wbytes, $a, Q8_0_BYTES);
        check_blocks($n, QK, $w1, $wbytes, $a, Q8_0_BYTES);
        let (wp0, wp1, ap) = ($w0.as_ptr(), $w1.as_ptr(), $a.as_ptr());
        // SAFETY: as in `against_q8_0`, for both weight rows (their lengths checked above).
        unsafe {
            let mut acc0 = _mm256_setzero_ps();
            let mut acc1 = _mm256_setzero_ps();
            for i in 0..nb {
                let y = ap.add(i * Q8_0_BYTES);
                let ya = load32(y.add(2));
                let (x0, x1) = (wp0.add(i * $wbytes), wp1.add(i * $wbytes));
                let p0 = dot_i8_ps($quants(x0), ya);
                let p1 = dot_i8_ps($quants(x1), ya);
                acc0 = _mm256_fmadd_ps(_mm256_set1_ps(f16_mul(x0, y)), p0, acc0);
                acc1 = _mm256_fmadd_ps(_mm256_set1_ps(f16_mul(x1, y)), p1, acc1);
            }
            (hsum_ps(acc0), hsum_ps(acc1))
        }
    }};
}

macro_rules! against_q8_1_x2 {
    ($n:expr, $w0:expr, $w1:expr, $a:expr, $wbytes:expr, $quants:ident) => {{
        let nb = check_blocks($n, QK, $w0, $wbytes, $a, Q8_1_BYTES);
        check_blocks($n, QK, $w1, $wbytes, $a, Q8_1_BYTES);
        let (wp0, wp1, ap) = ($w0.as_ptr(), $w1.as_ptr(), $a.as_ptr());
        // SAFETY: as in `against_q8_1`, for both weight rows (their lengths checked above).
        unsafe {
            let mut acc0 = _mm256_setzero_ps();
            let mut acc1 = _mm256_setzero_ps();
            let mut mins0 = _mm_setzero_ps();
            let mut mins1 = _mm_setzero_ps();
            for i in 0..nb {
                let y = ap.add(i * Q8_1_BYTES);
                let ya = load32(y.add(4));
                let (x0, x1) = (wp0.add(i * $wbytes), wp1.add(i * $wbytes));
                let p0 = dot_u8_ps($quants(x0), ya);
                let p1 = dot_u8_ps($quants(x1), ya);
                // Lanes 0, 1 of v: d_w, m_w; of h: d_a, s_a. Lane 1 of the fma is
                // fma(m_w, s_a, mins), exactly the scalar chain of the single-row kernel.
                let (v0, v1, h) = f16_pairs(x0, x1, y);
                mins0 = _mm_fmadd_ps(v0, h, mins0);
                mins1 = _mm_fmadd_ps(v1, h, mins1);
                let d0 = _mm256_broadcastss_ps(_mm_mul_ss(v0, h));
                let d1 = _mm256_broadcastss_ps(_mm_mul_ss(v1, h));
                acc0 = _mm256_fmadd_ps(d0, p0, acc0);
                acc1 = _mm256_fmadd_ps(d1, p1, acc1);
            }
            let m0 = _mm_cvtss_f32(_mm_movehdup_ps(mins0));
            let m1 = _mm_cvtss_f32(_mm_movehdup_ps(mins1));
            (hsum_ps(acc0) + m0, hsum_ps(acc1) + m1)
        }
    }};
}

/// The f16 pairs at `x0`, `x1` (a weight block's `d, m`) and at `y` (an activation block's
/// `d, s`), widened: lanes 0 and 1 of each result.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f16_pairs(x0: *const u8, x1: *const u8, y: *const u8) -> (__m128, __m128, __m128) {
    // SAFETY: the caller guarantees four readable bytes at each pointer.
    unsafe {
        let a = std::ptr::read_unaligned(x0.cast::<u32>());
        let b = std::ptr::read_unaligned(x1.cast::<u32>());
        let c = std::ptr::read_unaligned(y.cast::<u32>());
        let v = _mm256_cvtph_ps(_mm_set_epi32(0, c as i32, b as i32, a as i32));
        let lo = _mm256_castps256_ps128(v);
        (lo, _mm_movehl_ps(lo, lo), _mm256_extractf128_ps::<1>(v))
    }
}

/// Q4_0 quants: the 16 nibble bytes at 2..18, minus 8.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_0_quants(x: *const u8) -> __m256i {
    // SAFETY: the caller passes a pointer to a whole 18-byte block.
    unsafe { _mm256_sub_epi8(nibbles32(x.add(2)), _mm256_set1_epi8(8)) }
}

/// Q5_0 quants: nibbles at 6..22 with the fifth bits of qh at 2..6, minus 16.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q5_0_quants(x: *const u8) -> __m256i {
    // SAFETY: the caller passes a pointer to a whole 22-byte block.
    unsafe {
        let q = _mm256_or_si256(nibbles32(x.add(6)), fifth_bits32(x.add(2)));
        _mm256_sub_epi8(q, _mm256_set1_epi8(16))
    }
}

/// Q8_0 quants: the 32 bytes at 2..34.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q8_0_quants(x: *const u8) -> __m256i {
    // SAFETY: the caller passes a pointer to a whole 34-byte block.
    unsafe { load32(x.add(2)) }
}

/// Q4_1 quants: the 16 nibble bytes at 4..20.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_1_quants(x: *const u8) -> __m256i {
    // SAFETY: the caller passes a pointer to a whole 20-byte block.
    unsafe { nibbles32(x.add(4)) }
}

/// Q5_1 quants: nibbles at 8..24 with the fifth bits of qh at 4..8.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q5_1_quants(x: *const u8) -> __m256i {
    // SAFETY: the caller passes a pointer to a whole 24-byte block.
    unsafe { _mm256_or_si256(nibbles32(x.add(8)), fifth_bits32(x.add(4))) }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_0_impl(n: usize, w: &[u8], a: &[u8]) -> f32 {
    against_q8_0!(n, w, a, Q4_0_BYTES, q4_0_quants)
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q5_0_impl(n: usize, w: &[u8], a: &[u8]) -> f32 {
    against_q8_0!(n, w, a, Q5_0_BYTES, q5_0_quants)
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q8_0_impl(n: usize, w: &[u8], a: &[u8]) -> f32 {
    against_q8_0!(n, w, a, Q8_0_BYTES, q8_0_quants)
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_1_impl(n: usize, w: &[u8], a: &[u8]) -> f32 {
    against_q8_1!(n, w, a, Q4_1_BYTES, q4_1_quants)
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q5_1_impl(n: usize, w: &[u8], a: &[u8]) -> f32 {
    against_q8_1!(n, w, a, Q5_1_BYTES, q5_1_quants)
}

macro_rules! x2_kernels {
    ($($name:ident => $imp:ident, $mac:ident, $bytes:ident, $quants:ident;)*) => {$(
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn $imp(n: usize, w0: &[u8], w1: &[u8], a: &[u8]) -> (f32, f32) {
            $mac!(n, w0, w1, a, $bytes, $quants)
        }
        fn $name(n: usize, w0: &[u8], w1: &[u8], a: &[u8]) -> (f32, f32) {
            debug_assert!(detected());
            // SAFETY: handed out only by `kernel2`, after `detected()` confirmed AVX2, FMA and
            // F16C, the features `$imp` is compiled for.
            unsafe { $imp(n, w0, w1, a) }
        }
    )*};
}

x2_kernels! {
    q4_0_x2 => q4_0_x2_impl, against_q8_0_x2, Q4_0_BYTES, q4_0_quants;
    q5_0_x2 => q5_0_x2_impl, against_q8_0_x2, Q5_0_BYTES, q5_0_quants;
    q8_0_x2 => q8_0_x2_impl, against_q8_0_x2, Q8_0_BYTES, q8_0_quants;
    q4_1_x2 => q4_1_x2_impl, against_q8_1_x2, Q4_1_BYTES, q4_1_quants;
    q5_1_x2 => q5_1_x2_impl, against_q8_1_x2, Q5_1_BYTES, q5_1_quants;
}

/// The two-row AVX2 kernel for weights of type `ty` (the 32-element block types), or `None`.
pub(super) fn kernel2(ty: GgmlType) -> Option<Dot2Fn> {
    if !detected() {
        return None;
    }
    use GgmlType::*;
    Some(match ty {
        Q4_0 => q4_0_x2,
        Q5_0 => q5_0_x2,
        Q8_0 => q8_0_x2,
        Q4_1 => q4_1_x2,
        Q5_1 => q5_1_x2,
        _ => return None,
    })
}

// ---------------------------------------------------------------------------------------------
// Tiles: two weight rows by four activation rows (prefill), each of the eight dot products
// summed exactly as one call of the single-row kernel. Per block a weight row's quants are
// unpacked once for four tokens and an activation block loaded once for two rows; each pair
// keeps its own accumulator (and minimum chain), so only the work is shared, not the sums.

/// The u32 at `p` (two f16s), unaligned.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn u32_at(p: *const u8) -> i32 {
    // SAFETY: the caller guarantees four readable bytes at `p`.
    unsafe { std::ptr::read_unaligned(p.cast::<u32>()) as i32 }
}

/// The u16 at `p` (one f16), unaligned.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn u16_at(p: *const u8) -> i16 {
    // SAFETY: the caller guarantees two readable bytes at `p`.
    unsafe { std::ptr::read_unaligned(p.cast::<u16>()) as i16 }
}

/// Lane `T` of `v` (lanes 0..4 used) in all eight lanes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn lane8<const T: i32>(v: __m128) -> __m256 {
    // SAFETY: register-only intrinsics.
    unsafe { _mm256_permutevar8x32_ps(_mm256_castps128_ps256(v), _mm256_set1_epi32(T)) }
}

/// Sums of the tile's accumulators, plus the minimum chains' lanes where there are any.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile_sums(
    acc: &[[__m256; TILE_TOKENS]; 2],
    mins: Option<[__m128; 2]>,
) -> [[f32; TILE_TOKENS]; 2] {
    // SAFETY: register-only intrinsics and stores into local arrays.
    unsafe {
        let mut out = [[0f32; TILE_TOKENS]; 2];
        for r in 0..2 {
            let mut m = [0f32; 4];
            if let Some(mins) = mins {
                _mm_storeu_ps(m.as_mut_ptr(), mins[r]);
            }
            for t in 0..TILE_TOKENS {
                out[r][t] = hsum_ps(acc[r][t]);
                if mins.is_some() {
                    out[r][t] += m[t];
                }
            }
        }
        out
    }
}

/// Every activation row of a tile checked like the weight rows (`check_blocks`).
fn check_tile(
    n: usize,
    w0: &[u8],
    w1: &[u8],
    a: &[&[u8]; TILE_TOKENS],
    (block, wbytes, abytes): (usize, usize, usize),
) -> usize {
    let nb = check_blocks(n, block, w0, wbytes, a[0], abytes);
    check_blocks(n, block, w1, wbytes, a[0], abytes);
    for at in &a[1..] {
        check_blocks(n, block, w0, wbytes, at, abytes);
    }
    nb
}

/// Pointers to block `i` (blocks of `bytes`) of each token's activation row.
#[inline(always)]
unsafe fn tile_blocks(
    a: &[&[u8]; TILE_TOKENS],
    i: usize,
    bytes: usize,
) -> [*const u8; TILE_TOKENS] {
    // SAFETY: the caller checked (`check_tile`) that every row holds block i.
    std::array::from_fn(|t| unsafe { a[t].as_ptr().add(i * bytes) })
}

/// The tile loop against Q8_0 (`against_q8_0`'s arithmetic per pair: `acc = fma(d_w * d_a,
/// sum, acc)` block after block, then the lane sum).
macro_rules! against_q8_0_tile {
    ($n:expr, $w0:expr, $w1:expr, $a:expr, $wbytes:expr, $quants:ident) => {{
        let nb = check_tile($n, $w0, $w1, &$a, (QK, $wbytes, Q8_0_BYTES));
        let (wp0, wp1) = ($w0.as_ptr(), $w1.as_ptr());
        // SAFETY: block i < nb of every row lies within the lengths `check_tile` asserted;
        // `$quants` reads inside the weight block, the activation reads are bytes 0..34 of
        // block i. The caller is compiled with AVX2, FMA and F16C, which its caller guarantees.
        unsafe {
            let mut acc = [[_mm256_setzero_ps(); TILE_TOKENS]; 2];
            for i in 0..nb {
                let (x0, x1) = (wp0.add(i * $wbytes), wp1.add(i * $wbytes));
                let y = tile_blocks(&$a, i, Q8_0_BYTES);
                // d_a of the four tokens (lanes 0..4), d_w of the two rows (lanes 0, 1).
                let da = _mm_cvtph_ps(_mm_setr_epi16(
                    u16_at(y[0]),
                    u16_at(y[1]),
                    u16_at(y[2]),
                    u16_at(y[3]),
                    0,
                    0,
                    0,
                    0,
                ));
                let dw = _mm_cvtph_ps(_mm_setr_epi16(u16_at(x0), u16_at(x1), 0, 0, 0, 0, 0, 0));
                let dd0 = _mm_mul_ps(_mm_permute_ps::<0b00_00_00_00>(dw), da);
                let dd1 = _mm_mul_ps(_mm_permute_ps::<0b01_01_01_01>(dw), da);
                let (q0, q1) = ($quants(x0), $quants(x1));
                // dot_i8_ps's sign trick with |q| formed once per row.
                let (a0, a1) = (_mm256_sign_epi8(q0, q0), _mm256_sign_epi8(q1, q1));
                macro_rules! token {
                    ($t:literal) => {{
                        let ya = load32(y[$t].add(2));
                        let p0 = dot_u8_ps(a0, _mm256_sign_epi8(ya, q0));
                        let p1 = dot_u8_ps(a1, _mm256_sign_epi8(ya, q1));
                        acc[0][$t] = _mm256_fmadd_ps(lane8::<$t>(dd0), p0, acc[0][$t]);
                        acc[1][$t] = _mm256_fmadd_ps(lane8::<$t>(dd1), p1, acc[1][$t]);
                    }};
                }
                token!(0);
                token!(1);
                token!(2);
                token!(3);
            }
            tile_sums(&acc, None)
        }
    }};
}

/// The tile loop against Q8_1 (`against_q8_1`'s arithmetic per pair: `acc = fma(d_w * d_a,
/// sum, acc)` block after block, the minimum chain `mins = fma(m_w, s_a, mins)` one lane per
/// token, then the lane sum plus `mins`).
macro_rules! against_q8_1_tile {
    ($n:expr, $w0:expr, $w1:expr, $a:expr, $wbytes:expr, $quants:ident) => {{
        let nb = check_tile($n, $w0, $w1, &$a, (QK, $wbytes, Q8_1_BYTES));
        let (wp0, wp1) = ($w0.as_ptr(), $w1.as_ptr());
        // SAFETY: as in `against_q8_0_tile`; the activation reads are bytes 0..36 of block i.
        unsafe {
            let mut acc = [[_mm256_setzero_ps(); TILE_TOKENS]; 2];
            let mut mins = [_mm_setzero_ps(); 2];
            let deinterleave = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
            for i in 0..nb {
                let (x0, x1) = (wp0.add(i * $wbytes), wp1.add(i * $wbytes));
                let y = tile_blocks(&$a, i, Q8_1_BYTES);
                // (d_a, s_a) of the four tokens as lanes 0..4 and 4..8; (d_w, m_w) of the rows.
                let hs = _mm256_permutevar8x32_ps(
                    _mm256_cvtph_ps(_mm_setr_epi32(
                        u32_at(y[0]),
                        u32_at(y[1]),
                        u32_at(y[2]),
                        u32_at(y[3]),
                    )),
                    deinterleave,
                );
                let (da, sa) = (_mm256_castps256_ps128(hs), _mm256_extractf128_ps::<1>(hs));
                let wv = _mm_cvtph_ps(_mm_setr_epi32(u32_at(x0), u32_at(x1), 0, 0));
                mins[0] = _mm_fmadd_ps(_mm_permute_ps::<0b01_01_01_01>(wv), sa, mins[0]);
                mins[1] = _mm_fmadd_ps(_mm_permute_ps::<0b11_11_11_11>(wv), sa, mins[1]);
                let dd0 = _mm_mul_ps(_mm_permute_ps::<0b00_00_00_00>(wv), da);
                let dd1 = _mm_mul_ps(_mm_permute_ps::<0b10_10_10_10>(wv), da);
                let (q0, q1) = ($quants(x0), $quants(x1));
                macro_rules! token {
                    ($t:literal) => {{
                        let ya = load32(y[$t].add(4));
                        acc[0][$t] =
                            _mm256_fmadd_ps(lane8::<$t>(dd0), dot_u8_ps(q0, ya), acc[0][$t]);
                        acc[1][$t] =
                            _mm256_fmadd_ps(lane8::<$t>(dd1), dot_u8_ps(q1, ya), acc[1][$t]);
                    }};
                }
                token!(0);
                token!(1);
                token!(2);
                token!(3);
            }
            tile_sums(&acc, Some(mins))
        }
    }};
}

macro_rules! tile_kernels {
    ($($name:ident => $imp:ident, $mac:ident, $bytes:ident, $quants:ident;)*) => {$(
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn $imp(n: usize, w0: &[u8], w1: &[u8], a: [&[u8]; TILE_TOKENS]) -> [[f32; TILE_TOKENS]; 2] {
            $mac!(n, w0, w1, a, $bytes, $quants)
        }
        fn $name(n: usize, w0: &[u8], w1: &[u8], a: [&[u8]; TILE_TOKENS]) -> [[f32; TILE_TOKENS]; 2] {
            debug_assert!(detected());
            // SAFETY: handed out only by `kernel_tile`, after `detected()` confirmed AVX2, FMA
            // and F16C, the features `$imp` is compiled for.
            unsafe { $imp(n, w0, w1, a) }
        }
    )*};
}

/// Safe entry points of the K-quant tiles.
macro_rules! tile_entries {
    ($($name:ident => $imp:path;)*) => {$(
        fn $name(n: usize, w0: &[u8], w1: &[u8], a: [&[u8]; TILE_TOKENS]) -> [[f32; TILE_TOKENS]; 2] {
            debug_assert!(detected());
            // SAFETY: handed out only by `kernel_tile`, after `detected()` confirmed AVX2, FMA
            // and F16C, the features `$imp` is compiled for.
            unsafe { $imp(n, w0, w1, a) }
        }
    )*};
}

tile_entries! {
    q4_k_tile => k4_tile::<false>;
    q5_k_tile => k4_tile::<true>;
    q6_k_tile => k6_tile;
}

tile_kernels! {
    q4_0_tile => q4_0_tile_impl, against_q8_0_tile, Q4_0_BYTES, q4_0_quants;
    q5_0_tile => q5_0_tile_impl, against_q8_0_tile, Q5_0_BYTES, q5_0_quants;
    q8_0_tile => q8_0_tile_impl, against_q8_0_tile, Q8_0_BYTES, q8_0_quants;
    q4_1_tile => q4_1_tile_impl, against_q8_1_tile, Q4_1_BYTES, q4_1_quants;
    q5_1_tile => q5_1_tile_impl, against_q8_1_tile, Q5_1_BYTES, q5_1_quants;
}

/// The tile of `q4_k_impl` (`FIFTH`: `q5_k_impl`): each pair's `acc = fma(dy * d, sumi, acc)`
/// and `mins += dy * dmin * min_term` per super-block, in the single-row kernels' order. Row
/// by row, each 32-byte chunk of quants is unpacked and its two scales broadcast once, then
/// multiplied with the four tokens' activations while in registers.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn k4_tile<const FIFTH: bool>(
    n: usize,
    w0: &[u8],
    w1: &[u8],
    a: [&[u8]; TILE_TOKENS],
) -> [[f32; TILE_TOKENS]; 2] {
    let fifth = FIFTH;
    let wbytes = if fifth { Q5_K_BYTES } else { Q4_K_BYTES };
    let nb = check_tile(n, w0, w1, &a, (QK_K, wbytes, Q8_K_BYTES));
    let wp = [w0.as_ptr(), w1.as_ptr()];
    // SAFETY: block i < nb of every row lies within the lengths `check_tile` asserted; the
    // reads are those of the single-row kernels.
    unsafe {
        let mut acc = [[_mm256_setzero_ps(); TILE_TOKENS]; 2];
        let mut mins = [[0f32; TILE_TOKENS]; 2];
        for i in 0..nb {
            let y = tile_blocks(&a, i, Q8_K_BYTES);
            for r in 0..2 {
                let x = wp[r].add(i * wbytes);
                let (sc, mn) = k4_scales_mins(x.add(4));
                let mut sumi = [_mm256_setzero_si256(); TILE_TOKENS];
                let mut qh = if fifth {
                    load32(x.add(16))
                } else {
                    _mm256_setzero_si256()
                };
                for j in 0..4 {
                    let (lo, hi) = k4_chunk(x, j, fifth, &mut qh);
                    let (s0, s1) = k4_chunk_scales(sc, j);
                    for t in 0..TILE_TOKENS {
                        let p0 = _mm256_maddubs_epi16(lo, load32(y[t].add(Q8K_QS + 64 * j)));
                        let p1 = _mm256_maddubs_epi16(hi, load32(y[t].add(Q8K_QS + 64 * j + 32)));
                        let s =
                            _mm256_add_epi32(_mm256_madd_epi16(p0, s0), _mm256_madd_epi16(p1, s1));
                        sumi[t] = _mm256_add_epi32(sumi[t], s);
                    }
                }
                let (d, dmin) = (f16_at(x), f16_at(x.add(2)));
                for t in 0..TILE_TOKENS {
                    let dy = f32_at(y[t]);
                    mins[r][t] += dy * dmin * k4_min_term(mn, y[t].add(Q8K_BSUMS)) as f32;
                    acc[r][t] = _mm256_fmadd_ps(
                        _mm256_set1_ps(dy * d),
                        _mm256_cvtepi32_ps(sumi[t]),
                        acc[r][t],
                    );
                }
            }
        }
        let mut out = [[0f32; TILE_TOKENS]; 2];
        for r in 0..2 {
            for t in 0..TILE_TOKENS {
                out[r][t] = hsum_ps(acc[r][t]) - mins[r][t];
            }
        }
        out
    }
}

/// The tile of `q6_k_impl`: each pair's `sumi` (integer) and `acc = fma(dy * d, sumi, acc)`,
/// row by row, each 32-value piece of quants unpacked and its scales spread once for the four
/// tokens.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn k6_tile(
    n: usize,
    w0: &[u8],
    w1: &[u8],
    a: [&[u8]; TILE_TOKENS],
) -> [[f32; TILE_TOKENS]; 2] {
    let nb = check_tile(n, w0, w1, &a, (QK_K, Q6_K_BYTES, Q8_K_BYTES));
    let wp = [w0.as_ptr(), w1.as_ptr()];
    // SAFETY: as in `k4_tile`.
    unsafe {
        let mut acc = [[_mm256_setzero_ps(); TILE_TOKENS]; 2];
        for i in 0..nb {
            let y = tile_blocks(&a, i, Q8_K_BYTES);
            for (r, &w) in wp.iter().enumerate() {
                let x = w.add(i * Q6_K_BYTES);
                let scales = load16(x.add(192));
                let sc16 = _mm256_cvtepi8_epi16(scales);
                let mut sumi: [__m256i; TILE_TOKENS] = std::array::from_fn(|t| {
                    let corr = _mm256_madd_epi16(sc16, load32(y[t].add(Q8K_BSUMS)));
                    _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32::<5>(corr))
                });
                let mut ctrl = first_pair();
                for h in 0..2 {
                    let u = k6_quants(x, h);
                    for (k, &uk) in u.iter().enumerate() {
                        let ps = pair_scales(scales, ctrl);
                        ctrl = next_pair(ctrl);
                        for t in 0..TILE_TOKENS {
                            let p = _mm256_maddubs_epi16(
                                uk,
                                load32(y[t].add(Q8K_QS + 128 * h + 32 * k)),
                            );
                            sumi[t] = _mm256_add_epi32(sumi[t], _mm256_madd_epi16(p, ps));
                        }
                    }
                }
                let d = f16_at(x.add(208));
                for t in 0..TILE_TOKENS {
                    acc[r][t] = _mm256_fmadd_ps(
                        _mm256_set1_ps(f32_at(y[t]) * d),
                        _mm256_cvtepi32_ps(sumi[t]),
                        acc[r][t],
                    );
                }
            }
        }
        tile_sums(&acc, None)
    }
}

/// The two-row, four-token AVX2 kernel for weights of type `ty` (the 32-element block types,
/// Q4_K, Q5_K and Q6_K), or `None`.
pub(super) fn kernel_tile(ty: GgmlType) -> Option<DotTileFn> {
    if !detected() {
        return None;
    }
    use GgmlType::*;
    Some(match ty {
        Q4_0 => q4_0_tile,
        Q5_0 => q5_0_tile,
        Q8_0 => q8_0_tile,
        Q4_1 => q4_1_tile,
        Q5_1 => q5_1_tile,
        Q4_K => q4_k_tile,
        Q5_K => q5_k_tile,
        Q6_K => q6_k_tile,
        _ => return None,
    })
}

// ---------------------------------------------------------------------------------------------
// 256-element super-blocks against Q8_K.

/// For 16-element groups: a shuffle control that spreads bytes `2k` and `2k + 1` of a 16-byte
/// scale vector over eight bytes each, advanced by [`next_pair`] from k = 0.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn first_pair() -> __m128i {
    // SAFETY: register-only intrinsic.
    unsafe { _mm_set_epi64x(0x0101_0101_0101_0101, 0) }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn next_pair(ctrl: __m128i) -> __m128i {
    // SAFETY: register-only intrinsic.
    unsafe { _mm_add_epi8(ctrl, _mm_set1_epi8(2)) }
}

/// The i16 multipliers for 32 elements spanning groups 2k and 2k + 1: lanes 0..8 get
/// `scales[2k]`, lanes 8..16 get `scales[2k + 1]` (signed bytes, sign-extended).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn pair_scales(scales: __m128i, ctrl: __m128i) -> __m256i {
    // SAFETY: register-only intrinsics.
    unsafe { _mm256_cvtepi8_epi16(_mm_shuffle_epi8(scales, ctrl)) }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q2_k_impl(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let nb = check_blocks(n, QK_K, w, Q2_K_BYTES, a, Q8_K_BYTES);
    let (wp, ap) = (w.as_ptr(), a.as_ptr());
    // SAFETY: block i < nb lies within the asserted lengths; reads: weight bytes 0..84
    // (scales 0..16, quants 16..80, d/dmin 80..84), activation bytes 0..292.
    unsafe {
        let low4 = _mm_set1_epi8(0x0F);
        let three = _mm256_set1_epi8(3);
        let mut acc = _mm256_setzero_ps();
        let mut mins = 0f32;
        for i in 0..nb {
            let (x, y) = (wp.add(i * Q2_K_BYTES), ap.add(i * Q8_K_BYTES));
            let dy = f32_at(y);
            let raw = load16(x);
            let scales = _mm_and_si128(raw, low4);
            let mvals = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16::<4>(raw), low4));
            let msum = hsum_epi32(_mm256_madd_epi16(mvals, load32(y.add(Q8K_BSUMS))));
            mins += dy * f16_at(x.add(82)) * msum as f32;

            let mut sumi = _mm256_setzero_si256();
            let mut ctrl = first_pair();
            for h in 0..2 {
                let mut q = load32(x.add(16 + 32 * h));
                for j in 0..4 {
                    let v = _mm256_and_si256(q, three);
                    q = _mm256_srli_epi16::<2>(q);
                    let p = _mm256_maddubs_epi16(v, load32(y.add(Q8K_QS + 128 * h + 32 * j)));
                    sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(p, pair_scales(scales, ctrl)));
                    ctrl = next_pair(ctrl);
                }
            }
            let d = dy * f16_at(x.add(80));
            acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
        }
        hsum_ps(acc) - mins
    }
}

/// The sixteen 6-bit Q3_K scales from their 12 packed bytes at `p`, minus 32, as signed bytes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q3_k_scales(p: *const u8) -> __m128i {
    // SAFETY: the caller guarantees 12 readable bytes at `p`.
    unsafe {
        let rd = |k: usize| std::ptr::read_unaligned(p.add(4 * k).cast::<u32>());
        let (w0, w1, w2) = (rd(0), rd(1), rd(2));
        const LO: u32 = 0x0F0F_0F0F;
        const HI: u32 = 0x0303_0303;
        let s0 = (w0 & LO) | ((w2 & HI) << 4);
        let s1 = (w1 & LO) | (((w2 >> 2) & HI) << 4);
        let s2 = ((w0 >> 4) & LO) | (((w2 >> 4) & HI) << 4);
        let s3 = ((w1 >> 4) & LO) | (((w2 >> 6) & HI) << 4);
        let v = _mm_set_epi32(s3 as i32, s2 as i32, s1 as i32, s0 as i32);
        _mm_sub_epi8(v, _mm_set1_epi8(32))
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q3_k_impl(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let nb = check_blocks(n, QK_K, w, Q3_K_BYTES, a, Q8_K_BYTES);
    let (wp, ap) = (w.as_ptr(), a.as_ptr());
    // SAFETY: block i < nb lies within the asserted lengths; reads: weight bytes 0..110
    // (hmask 0..32, quants 32..96, scales 96..108, d 108..110), activation bytes 0..292.
    unsafe {
        let three = _mm256_set1_epi8(3);
        let one = _mm256_set1_epi8(1);
        let mut acc = _mm256_setzero_ps();
        for i in 0..nb {
            let (x, y) = (wp.add(i * Q3_K_BYTES), ap.add(i * Q8_K_BYTES));
            let scales = q3_k_scales(x.add(96));
            // Quants are stored as u = q + 4 in 0..8: sum(sc * q * a) = sum(sc * u * a) -
            // 4 * sum(sc * bsum).
            let corr = _mm256_madd_epi16(_mm256_cvtepi8_epi16(scales), load32(y.add(Q8K_BSUMS)));
            let mut sumi = _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32::<2>(corr));
            let mut hm = load32(x);
            let mut ctrl = first_pair();
            for h in 0..2 {
                let mut q = load32(x.add(32 + 32 * h));
                for j in 0..4 {
                    let low = _mm256_and_si256(q, three);
                    q = _mm256_srli_epi16::<2>(q);
                    let high = _mm256_slli_epi16::<2>(_mm256_and_si256(hm, one));
                    hm = _mm256_srli_epi16::<1>(hm);
                    let u = _mm256_or_si256(low, high);
                    let p = _mm256_maddubs_epi16(u, load32(y.add(Q8K_QS + 128 * h + 32 * j)));
                    sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(p, pair_scales(scales, ctrl)));
                    ctrl = next_pair(ctrl);
                }
            }
            let d = f32_at(y) * f16_at(x.add(108));
            acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
        }
        hsum_ps(acc)
    }
}

/// Scales and mins of a Q4_K / Q5_K block from their 12 packed bytes at `p`: eight 6-bit
/// scales in the low u64, eight 6-bit mins in the high u64.
#[inline]
unsafe fn k4_scales_mins(p: *const u8) -> (u64, u64) {
    // SAFETY: the caller guarantees 12 readable bytes at `p`.
    let rd = |k: usize| unsafe { std::ptr::read_unaligned(p.add(4 * k).cast::<u32>()) };
    let (w0, w1, w2) = (rd(0), rd(1), rd(2));
    const SIX: u32 = 0x3F3F_3F3F;
    const LO: u32 = 0x0F0F_0F0F;
    const TOP: u32 = 0x0303_0303;
    let sc_lo = w0 & SIX;
    let mn_lo = w1 & SIX;
    let sc_hi = (w2 & LO) | (((w0 >> 6) & TOP) << 4);
    let mn_hi = ((w2 >> 4) & LO) | (((w1 >> 6) & TOP) << 4);
    (
        sc_lo as u64 | (sc_hi as u64) << 32,
        mn_lo as u64 | (mn_hi as u64) << 32,
    )
}

/// `sum(min_s * (bsum[2s] + bsum[2s+1]))` over the eight sub-blocks of a Q4_K / Q5_K block.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn k4_min_term(mins: u64, bsums: *const u8) -> i32 {
    // SAFETY: the caller guarantees 32 readable bytes at `bsums`.
    unsafe {
        let b = load32(bsums);
        let pairs = _mm_hadd_epi16(_mm256_castsi256_si128(b), _mm256_extracti128_si256::<1>(b));
        let m = _mm_cvtepu8_epi16(_mm_cvtsi64_si128(mins as i64));
        let s = _mm_madd_epi16(pairs, m);
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
        _mm_cvtsi128_si32(s)
    }
}

/// Sub-blocks 2j and 2j + 1 of a Q4_K / Q5_K super-block at `x` as unsigned bytes: the low and
/// high nibbles of 32-byte chunk j of the quants (at byte `quants`), with Q5_K's fifth bits
/// (`fifth`) from `qh` (the 32 bytes at 16, shifted right by two per chunk: pass it in chunk
/// order).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn k4_chunk(x: *const u8, j: usize, fifth: bool, qh: &mut __m256i) -> (__m256i, __m256i) {
    // SAFETY: the caller passes a whole 144-byte (Q4_K) or 176-byte (Q5_K) block.
    unsafe {
        let low4 = _mm256_set1_epi8(0x0F);
        let q = load32(x.add(if fifth { 48 } else { 16 } + 32 * j));
        let lo = _mm256_and_si256(q, low4);
        let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(q), low4);
        if !fifth {
            return (lo, hi);
        }
        // Bit 2j of qh[l] is the fifth bit of the low-nibble quant l, bit 2j+1 of the
        // high-nibble one.
        let h0 = _mm256_slli_epi16::<4>(_mm256_and_si256(*qh, _mm256_set1_epi8(1)));
        let h1 = _mm256_slli_epi16::<3>(_mm256_and_si256(*qh, _mm256_set1_epi8(2)));
        *qh = _mm256_srli_epi16::<2>(*qh);
        (_mm256_or_si256(lo, h0), _mm256_or_si256(hi, h1))
    }
}

/// The 6-bit scales of sub-blocks 2j and 2j + 1 (from `k4_scales_mins`), each broadcast as i16.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn k4_chunk_scales(sc: u64, j: usize) -> (__m256i, __m256i) {
    // SAFETY: register-only intrinsics.
    unsafe {
        (
            _mm256_set1_epi16(((sc >> (16 * j)) & 0xFF) as i16),
            _mm256_set1_epi16(((sc >> (16 * j + 8)) & 0xFF) as i16),
        )
    }
}

/// The quants `u = q + 32` (0..64) of the four 32-value pieces 4h .. 4h + 3 of a Q6_K
/// super-block at `x` (ql at 0..128, qh at 128..192).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn k6_quants(x: *const u8, h: usize) -> [__m256i; 4] {
    // SAFETY: the caller passes a whole 210-byte block.
    unsafe {
        let low4 = _mm256_set1_epi8(0x0F);
        let top2 = _mm256_set1_epi8(0x30);
        let ql0 = load32(x.add(64 * h));
        let ql1 = load32(x.add(64 * h + 32));
        let qh = load32(x.add(128 + 32 * h));
        [
            _mm256_or_si256(
                _mm256_and_si256(ql0, low4),
                _mm256_and_si256(_mm256_slli_epi16::<4>(qh), top2),
            ),
            _mm256_or_si256(
                _mm256_and_si256(ql1, low4),
                _mm256_and_si256(_mm256_slli_epi16::<2>(qh), top2),
            ),
            _mm256_or_si256(
                _mm256_and_si256(_mm256_srli_epi16::<4>(ql0), low4),
                _mm256_and_si256(qh, top2),
            ),
            _mm256_or_si256(
                _mm256_and_si256(_mm256_srli_epi16::<4>(ql1), low4),
                _mm256_and_si256(_mm256_srli_epi16::<2>(qh), top2),
            ),
        ]
    }
}

/// Q4_K (`fifth` false) or Q5_K against Q8_K: per super-block the integer `sumi` of the
/// sub-blocks' quants times their scales, `acc = fma(dy * d, sumi, acc)`, and the mins' term
/// `mins += dy * dmin * min_term`; the lane sum minus `mins` at the end.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn k4_dot(n: usize, w: &[u8], a: &[u8], fifth: bool) -> f32 {
    let wbytes = if fifth { Q5_K_BYTES } else { Q4_K_BYTES };
    let nb = check_blocks(n, QK_K, w, wbytes, a, Q8_K_BYTES);
    let (wp, ap) = (w.as_ptr(), a.as_ptr());
    // SAFETY: block i < nb lies within the asserted lengths; reads: weight bytes 0..144 (Q4_K:
    // d/dmin 0..4, scales 4..16, quants 16..144) or 0..176 (Q5_K: qh 16..48, quants 48..176),
    // activation bytes 0..292.
    unsafe {
        let mut acc = _mm256_setzero_ps();
        let mut mins = 0f32;
        for i in 0..nb {
            let (x, y) = (wp.add(i * wbytes), ap.add(i * Q8_K_BYTES));
            let dy = f32_at(y);
            let (sc, mn) = k4_scales_mins(x.add(4));
            mins += dy * f16_at(x.add(2)) * k4_min_term(mn, y.add(Q8K_BSUMS)) as f32;
            let mut qh = if fifth {
                load32(x.add(16))
            } else {
                _mm256_setzero_si256()
            };
            let mut sumi = _mm256_setzero_si256();
            for j in 0..4 {
                let (lo, hi) = k4_chunk(x, j, fifth, &mut qh);
                let (s0, s1) = k4_chunk_scales(sc, j);
                let p0 = _mm256_maddubs_epi16(lo, load32(y.add(Q8K_QS + 64 * j)));
                let p1 = _mm256_maddubs_epi16(hi, load32(y.add(Q8K_QS + 64 * j + 32)));
                let s = _mm256_add_epi32(_mm256_madd_epi16(p0, s0), _mm256_madd_epi16(p1, s1));
                sumi = _mm256_add_epi32(sumi, s);
            }
            let d = dy * f16_at(x);
            acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
        }
        hsum_ps(acc) - mins
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_k_impl(n: usize, w: &[u8], a: &[u8]) -> f32 {
    // SAFETY: same features.
    unsafe { k4_dot(n, w, a, false) }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q5_k_impl(n: usize, w: &[u8], a: &[u8]) -> f32 {
    // SAFETY: same features.
    unsafe { k4_dot(n, w, a, true) }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q6_k_impl(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let nb = check_blocks(n, QK_K, w, Q6_K_BYTES, a, Q8_K_BYTES);
    let (wp, ap) = (w.as_ptr(), a.as_ptr());
    // SAFETY: block i < nb lies within the asserted lengths; reads: weight bytes 0..210
    // (ql 0..128, qh 128..192, scales 192..208, d 208..210), activation bytes 0..292.
    unsafe {
        let mut acc = _mm256_setzero_ps();
        for i in 0..nb {
            let (x, y) = (wp.add(i * Q6_K_BYTES), ap.add(i * Q8_K_BYTES));
            let scales = load16(x.add(192));
            // Quants are stored as u = q + 32 in 0..64: sum(sc * q * a) = sum(sc * u * a) -
            // 32 * sum(sc * bsum).
            let corr = _mm256_madd_epi16(_mm256_cvtepi8_epi16(scales), load32(y.add(Q8K_BSUMS)));
            let mut sumi = _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32::<5>(corr));
            let mut ctrl = first_pair();
            for h in 0..2 {
                for (k, &uk) in k6_quants(x, h).iter().enumerate() {
                    let p = _mm256_maddubs_epi16(uk, load32(y.add(Q8K_QS + 128 * h + 32 * k)));
                    sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(p, pair_scales(scales, ctrl)));
                    ctrl = next_pair(ctrl);
                }
            }
            let d = f32_at(y) * f16_at(x.add(208));
            acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
        }
        hsum_ps(acc)
    }
}
