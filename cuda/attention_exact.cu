// Exact attention (`MOA_EXACT_ATTN=1`, `CudaBackend::set_exact_attention`): for each (query row,
// query head), the CPU backend's sequence of floating-point operations (src/backend/cpu/
// ggml_attn.rs, ggml_tile.rs, ggml_decode.rs: llama.cpp's CPU flash-attention numerics as the
// x86-64 kernels with FMA compute them), so that the GPU's attention output has the CPU's bits.
// Slow by design (one warp per (row, head), serial over the keys); for small models and
// reproducibility. f16 K/V caches only (a q8_0 part takes the fast kernels of attention.cu).
//
// The keys and their order are those of the fast kernels' KeySpan for a one-token tile (the
// sinks, then the window up to the query, ascending positions, every one visible): the order in
// which the CPU visits its spans (cached sinks, cached ring, the run's own keys). Two regimes,
// chosen like the CPU's by the number of tokens in the whole batch (`tiled`: at least 64):
//   - per key (`tiled` 0; decode and small prefills): the query rounded to f16; each score the
//     ggml_vec_dot_f16 sum (four 16-lane accumulators of fused multiply-adds over steps of 64
//     values, (s0 + s2) + (s1 + s3), then the halving reduction of _mm512_reduce_add_ps) times
//     the scale; then per key: if the score beats the running maximum M, ms = expf(M - x), M =
//     x and the accumulator rounded to f16 after `acc * ms`; else vs = expf(x - M); then acc =
//     f16(fma(v, vs, acc)) and S = fma(S, ms, vs);
//   - tiled (`tiled` 1): f32 query; each score one fused multiply-add chain over the head
//     dimension times the scale; keys in aligned tiles of 64 positions: the tile's maximum, the
//     rescale of acc and S by expf(M_old - M_new) (f32), the weights ggml_v_expf(x - M)
//     (common.cuh), their sum as ggml_vec_soft_max_f32 forms it (16-slot groups by position,
//     each reduced by halving, added in f64 to S) and acc = fma(w, v, acc) key by key.
// Both end with out = acc * (1 / S) (0 for S = 0). `expf` is glibc's (ex_expf below: its
// algorithm and table, with the fused multiply-adds GCC forms in the FMA build the x86-64
// dispatcher picks; equal to glibc 2.36's expf (Debian 12, checked on every float input), not
// CUDA's.
// Every operation is an explicit round-to-nearest intrinsic (__fmaf_rn, __fmul_rn, ...): NVRTC
// contracts a plain `a * b + c` into an FMA, which would change the bits.

#define EX_TILE 64  // GGML_FA_TILE_KV: key tiles of the tiled regime (aligned positions)

// glibc's expf (sysdeps/ieee754/flt-32/e_expf.c, table bits 5, degree-3 polynomial, in double).
__constant__ u64 EX_EXP2F_TAB[32] = {
    0x3ff0000000000000ull, 0x3fefd9b0d3158574ull, 0x3fefb5586cf9890full, 0x3fef9301d0125b51ull,
    0x3fef72b83c7d517bull, 0x3fef54873168b9aaull, 0x3fef387a6e756238ull, 0x3fef1e9df51fdee1ull,
    0x3fef06fe0a31b715ull, 0x3feef1a7373aa9cbull, 0x3feedea64c123422ull, 0x3feece086061892dull,
    0x3feebfdad5362a27ull, 0x3feeb42b569d4f82ull, 0x3feeab07dd485429ull, 0x3feea47eb03a5585ull,
    0x3feea09e667f3bcdull, 0x3fee9f75e8ec5f74ull, 0x3feea11473eb0187ull, 0x3feea589994cce13ull,
    0x3feeace5422aa0dbull, 0x3feeb737b0cdc5e5ull, 0x3feec49182a3f090ull, 0x3feed503b23e255dull,
    0x3feee89f995ad3adull, 0x3feeff76f2fb5e47ull, 0x3fef199bdd85529cull, 0x3fef3720dcef9069ull,
    0x3fef5818dcfba487ull, 0x3fef7c97337b9b5full, 0x3fefa4afa2a490daull, 0x3fefd0765b6e4540ull,
};

__device__ __forceinline__ float ex_expf(float x) {
    const u32 ux = __float_as_uint(x);
    const u32 abstop = (ux >> 20) & 0x7ffu;
    if (abstop >= 0x42bu) {  // |x| >= 88 or NaN
        if (ux == 0xff800000u) return 0.0f;
        if (abstop >= 0x7f8u) return __fadd_rn(x, x);
        if (x > 0x1.62e42ep6f) return __uint_as_float(0x7f800000u);  // overflow
        if (x < -0x1.9fe368p6f) return 0.0f;                          // underflow
    }
    const double inv_ln2_n = 0x1.71547652b82fep+0 * 32.0;
    const double shift = 0x1.8p+52;
    const double c0 = 0x1.c6af84b912394p-5 / (32.0 * 32.0 * 32.0);
    const double c1 = 0x1.ebfce50fac4f3p-3 / (32.0 * 32.0);
    const double c2 = 0x1.62e42ff0c52d6p-1 / 32.0;
    const double xd = (double)x;
    // x * N / ln2 = k + r: the product enters both uses fused (GCC contracts both).
    double kd = __fma_rn(inv_ln2_n, xd, shift);
    const u64 ki = (u64)__double_as_longlong(kd);
    kd = __dsub_rn(kd, shift);
    const double r = __fma_rn(inv_ln2_n, xd, -kd);
    const u64 t = EX_EXP2F_TAB[ki % 32] + (ki << 47);
    const double s = __longlong_as_double((long long)t);
    const double z = __fma_rn(c0, r, c1);
    const double r2 = __dmul_rn(r, r);
    double y = __fma_rn(c2, r, 1.0);
    y = __fma_rn(z, r2, y);
    y = __dmul_rn(y, s);
    return __double2float_rn(y);
}

// Round to f16 and back (nearest even).
__device__ __forceinline__ float ex_f16r(float x) { return h2f(f2h(x)); }

// _mm512_reduce_add_ps as GCC implements it (ggml_attn.rs: reduce16).
__device__ __forceinline__ float ex_reduce16(const float* x) {
    float a[8], b[4];
#pragma unroll
    for (int i = 0; i < 8; i++) a[i] = __fadd_rn(x[8 + i], x[i]);
#pragma unroll
    for (int i = 0; i < 4; i++) b[i] = __fadd_rn(a[4 + i], a[i]);
    return __fadd_rn(__fadd_rn(b[0], b[2]), __fadd_rn(b[1], b[3]));
}

// ggml_vec_dot_f16 of the f16 query (values in `q`) with an f16 key row (D a multiple of 64).
template <int D>
__device__ __forceinline__ float ex_dot_f16_ggml(const float* q, const u16* k) {
    float t[16];
#pragma unroll
    for (int l = 0; l < 16; l++) {
        float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
#pragma unroll
        for (int st = 0; st < D; st += 64) {
            s0 = __fmaf_rn(q[st + l], h2f(k[st + l]), s0);
            s1 = __fmaf_rn(q[st + 16 + l], h2f(k[st + 16 + l]), s1);
            s2 = __fmaf_rn(q[st + 32 + l], h2f(k[st + 32 + l]), s2);
            s3 = __fmaf_rn(q[st + 48 + l], h2f(k[st + 48 + l]), s3);
        }
        t[l] = __fadd_rn(__fadd_rn(s0, s2), __fadd_rn(s1, s3));
    }
    return ex_reduce16(t);
}

// The tiled regime's score: one fused multiply-add chain over the head dimension.
template <int D>
__device__ __forceinline__ float ex_dot_chain(const float* q, const u16* k) {
    float a = 0.0f;
#pragma unroll 8
    for (int d = 0; d < D; d++) a = __fmaf_rn(q[d], h2f(k[d]), a);
    return a;
}

// One warp per (token blockIdx.x, query head blockIdx.y); lane `lane` owns output values
// lane + 32 e. Arguments as attn_fa's (attention.cu), without the tiles and splits; `tiled`
// selects the regime.
template <int D>
__device__ __forceinline__ void attn_exact(const float* q, const u16* knew, const u16* vnew,
                                           const u16* kc, const u16* vc, const int* tok_pos,
                                           const int* tok_seq, const int* tok_p0,
                                           const int* tok_rs, int G, int n_head, int n_head_kv,
                                           const int* caps, const int* offs, int rows_per_seq,
                                           int sink, int tiled, float scale, float* out) {
    constexpr int PER = D / WARP;
    __shared__ float qs[D];
    __shared__ float sc[EX_TILE];    // scores of the keys in work (by key)
    __shared__ float wk[EX_TILE];    // tiled: weights by key
    __shared__ float slot[EX_TILE];  // tiled: weights by position % 64 (0: no key there)
    const int t = blockIdx.x, h = blockIdx.y, lane = threadIdx.x;
    const int g = h / G;
    const int ldq = n_head * D, ldkv = n_head_kv * D;
    const float* qr = q + (size_t)t * ldq + (size_t)h * D;
    for (int d = lane; d < D; d += WARP) qs[d] = tiled ? qr[d] : ex_f16r(qr[d]);
    __syncwarp();
    const KeySpan ks(tok_pos, tok_seq, tok_p0, tok_rs, t, 1, g, caps, offs, rows_per_seq, sink,
                     ldkv, kc, vc, knew, vnew);
    const int nk = ks.nk;
    float acc[PER];
#pragma unroll
    for (int e = 0; e < PER; e++) acc[e] = 0.0f;
    float m = NEG_INF, s = 0.0f;
    // Keys a query of the tiled regime does not see are skipped, where the CPU adds fma(0, v,
    // acc) for the other queries of its 8-query tile: the same value (up to the sign of a zero
    // accumulator, which no key of a visible score leaves).
    const u16 *kr, *vr;
    if (!tiled) {
        for (int c0 = 0; c0 < nk; c0 += WARP) {
            const int cnt = min(WARP, nk - c0);
            if (lane < cnt) {
                ks.rows<D>(ks.pos(c0 + lane), &kr, &vr);
                sc[lane] = __fmul_rn(ex_dot_f16_ggml<D>(qs, kr), scale);
            }
            __syncwarp();
            for (int c = 0; c < cnt; c++) {
                const float x = sc[c];
                ks.rows<D>(ks.pos(c0 + c), &kr, &vr);
                float ms = 1.0f, vs = 1.0f;
                if (x > m) {
                    ms = ex_expf(__fsub_rn(m, x));
                    m = x;
#pragma unroll
                    for (int e = 0; e < PER; e++) acc[e] = ex_f16r(__fmul_rn(acc[e], ms));
                } else {
                    vs = ex_expf(__fsub_rn(x, m));
                }
#pragma unroll
                for (int e = 0; e < PER; e++) {
                    acc[e] = ex_f16r(__fmaf_rn(h2f(vr[lane + WARP * e]), vs, acc[e]));
                }
                s = __fmaf_rn(s, ms, vs);
            }
            __syncwarp();  // sc is rewritten by the next chunk
        }
    } else {
        int c0 = 0;
        while (c0 < nk) {
            // The keys of one aligned 64-position tile (positions ascend).
            const int tile = ks.pos(c0) / EX_TILE;
            int c1 = c0 + 1;
            while (c1 < nk && ks.pos(c1) / EX_TILE == tile) c1++;
            const int n = c1 - c0;
            for (int c = lane; c < EX_TILE; c += WARP) slot[c] = 0.0f;
            for (int c = lane; c < n; c += WARP) {
                ks.rows<D>(ks.pos(c0 + c), &kr, &vr);
                sc[c] = __fmul_rn(ex_dot_chain<D>(qs, kr), scale);
            }
            __syncwarp();
            float tmax = NEG_INF;
            for (int c = 0; c < n; c++) tmax = fmaxf(tmax, sc[c]);
            const float mnew = fmaxf(m, tmax);
            if (mnew > m) {
                const float ms = ex_expf(__fsub_rn(m, mnew));
#pragma unroll
                for (int e = 0; e < PER; e++) acc[e] = __fmul_rn(acc[e], ms);
                s = __fmul_rn(s, ms);
            }
            m = mnew;
            for (int c = lane; c < n; c += WARP) {
                const float w = ggml_v_expf(__fsub_rn(sc[c], m));
                wk[c] = w;
                slot[ks.pos(c0 + c) % EX_TILE] = w;
            }
            __syncwarp();
            // The tile's sum: four groups of 16 slots, each reduced by halving, added in f64.
            double sum = (double)ex_reduce16(slot);
            for (int gi = 1; gi < EX_TILE / 16; gi++) {
                sum = __dadd_rn(sum, (double)ex_reduce16(slot + 16 * gi));
            }
            s = __double2float_rn(__dadd_rn((double)s, sum));
            for (int c = 0; c < n; c++) {
                ks.rows<D>(ks.pos(c0 + c), &kr, &vr);
                const float w = wk[c];
#pragma unroll
                for (int e = 0; e < PER; e++) {
                    acc[e] = __fmaf_rn(w, h2f(vr[lane + WARP * e]), acc[e]);
                }
            }
            __syncwarp();  // sc, wk and slot are rewritten by the next tile
            c0 = c1;
        }
    }
    const float inv = s == 0.0f ? 0.0f : __fdiv_rn(1.0f, s);
    float* o = out + (size_t)t * ldq + (size_t)h * D;
#pragma unroll
    for (int e = 0; e < PER; e++) o[lane + WARP * e] = __fmul_rn(acc[e], inv);
}

#define ATTN_EXACT(name, D)                                                                     \
    extern "C" __global__ void __launch_bounds__(WARP) name(                                    \
        const float* q, const u16* knew, const u16* vnew, const u16* kc, const u16* vc,         \
        const int* tok_pos, const int* tok_seq, const int* tok_p0, const int* tok_rs, int G,    \
        int n_head, int n_head_kv, const int* caps, const int* offs, int rows_per_seq,          \
        int sink, int tiled, float scale, float* out) {                                         \
        attn_exact<D>(q, knew, vnew, kc, vc, tok_pos, tok_seq, tok_p0, tok_rs, G, n_head,        \
                      n_head_kv, caps, offs, rows_per_seq, sink, tiled, scale, out);            \
    }
ATTN_EXACT(attn_exact_d64, 64)
ATTN_EXACT(attn_exact_d128, 128)
