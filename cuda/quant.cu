// Quantized weights on the GPU: the ggml block formats as they sit in the GGUF file (never
// dequantized copies kept), with
//   - quantize_q8_1: activations to 8-bit blocks of 32 (int8 values + (scale, scale * sum)),
//     once per matrix input, as llama.cpp's MMVQ path does;
//   - mmvq_<type>: decode matrix-vector products (1..8 tokens) from q8_1 activations with
//     __dp4a, one warp per weight row, the row's blocks spread over the lanes;
//   - mv_<f32|f16|bf16>: the same for float weights with f32 activations;
//   - dequant_f16_<type>: weights to f16 rows (prefill: a scratch tile for cuBLAS);
//   - embed_<type>: token embedding rows to f32.
// Block layouts follow ggml (see ggml-compat for the CPU reference of every one).

#define MV_WARPS 4
#define MV_MAXT 16

// ---- q8_1 activations ---------------------------------------------------------------------

// Quantizes one 32-value chunk held one value per lane into q8_1 with the arithmetic of
// ggml's x86 quantize_row_q8_1, which the CPU backend uses: d = max|v| / 127, q =
// round-half-even(v * (127 / max|v|)), and d and d * sum(q) rounded to f16 (kept as floats), so
// both backends form the same integer dots with the same scales.
__device__ __forceinline__ void q8_1_lane(float v, i8* yq, float2* yds, int lane) {
    float amax = warp_max(fabsf(v));
    float d = amax / 127.0f;
    float id = amax != 0.0f ? 127.0f / amax : 0.0f;
    int q = (int)rintf(v * id);
    yq[lane] = (i8)q;
    float s = warp_sum((float)q);
    if (lane == 0) *yds = make_float2(h2f(f2h(d)), h2f(f2h(d * s)));
}

// x: n_tok rows of K floats (row stride ldx). yq: n_tok rows of K int8. yds: (d, d * sum q).
extern "C" __global__ void quantize_q8_1(const float* x, int ldx, int K, int n_tok, i8* yq,
                                         float2* yds) {
    pdl_wait();  // a programmatic dependent: wait first, then let the next one launch
    pdl_trigger();
    int nb = K / 32;
    int gb = blockIdx.x * (blockDim.x / WARP) + threadIdx.x / WARP;  // global block index
    if (gb >= nb * n_tok) return;
    int t = gb / nb, b = gb % nb, lane = threadIdx.x % WARP;
    float v = x[(size_t)t * ldx + b * 32 + lane];
    q8_1_lane(v, yq + (size_t)t * K + b * 32, yds + (size_t)t * nb + b, lane);
}

// ---- one unit of a row times q8_1 activations ----------------------------------------------
// A unit is 32 values for the legacy quants and 64 for the K-quants. `load` reads the unit's
// weight bytes into registers once (vector loads where the block layout is aligned); `dot`
// multiplies them with one token's q8_1 row, so a batch of tokens reads each weight once.

// Four ints of int8 activations (16 values) at `p` (16-byte aligned).
__device__ __forceinline__ int4 ld_y16(const i8* p) { return *(const int4*)p; }

__device__ __forceinline__ int dp4(int a, int b, int c) { return __dp4a(a, b, c); }

// Spreads 4 bits to bit 4 of each byte.
__device__ __forceinline__ int spread4(u32 hb) {
    return (int)(((hb & 1u) << 4) | ((hb & 2u) << 11) | ((hb & 4u) << 18) | ((hb & 8u) << 25));
}

// Sum of 16 int8 products: q[0..4] x y (16 values).
__device__ __forceinline__ int dot16(const int* q, int4 y, int s) {
    s = dp4(q[0], y.x, s);
    s = dp4(q[1], y.y, s);
    s = dp4(q[2], y.z, s);
    return dp4(q[3], y.w, s);
}

// Sum of 32 int8 products: q[0..8] x the 32 activations at y (16-byte aligned).
__device__ __forceinline__ int dot32(const int* q, const i8* y) {
    return dot16(q + 4, ld_y16(y + 16), dot16(q, ld_y16(y), 0));
}

template <int T>
struct Unit;

// Legacy quants: one 32-value block; lo[i] / hi[i] hold values 4i.. and 16+4i.. as bytes.
template <>
struct Unit<T_Q4_0> {
    int q[8];
    float d;
    int u;
    __device__ __forceinline__ void load(const u8* row, int uu) {
        u = uu;
        const u8* b = row + u * 18;
        d = h2f(*(const u16*)b);
#pragma unroll
        for (int i = 0; i < 4; i++) {
            int v = ld_i32_a2(b + 2 + 4 * i);
            q[i] = v & 0x0F0F0F0F;
            q[i + 4] = (v >> 4) & 0x0F0F0F0F;
        }
    }
    __device__ __forceinline__ float dot(const i8* yq, const float2* yds) const {
        int s = dot32(q, yq + u * 32);
        float2 ds = yds[u];
        return d * (ds.x * (float)s - 8.0f * ds.y);
    }
};

template <>
struct Unit<T_Q4_1> {
    int q[8];
    float d, m;
    int u;
    __device__ __forceinline__ void load(const u8* row, int uu) {
        u = uu;
        const u8* b = row + u * 20;
        u32 dm = *(const u32*)b;
        d = h2f((u16)(dm & 0xffff));
        m = h2f((u16)(dm >> 16));
#pragma unroll
        for (int i = 0; i < 4; i++) {
            int v = ld_i32_a4(b + 4 + 4 * i);
            q[i] = v & 0x0F0F0F0F;
            q[i + 4] = (v >> 4) & 0x0F0F0F0F;
        }
    }
    __device__ __forceinline__ float dot(const i8* yq, const float2* yds) const {
        int s = dot32(q, yq + u * 32);
        float2 ds = yds[u];
        return d * ds.x * (float)s + m * ds.y;
    }
};

template <>
struct Unit<T_Q5_0> {
    int q[8];
    float d;
    int u;
    __device__ __forceinline__ void load(const u8* row, int uu) {
        u = uu;
        const u8* b = row + u * 22;
        d = h2f(*(const u16*)b);
        u32 qh = (u32)ld_i32_a2(b + 2);
#pragma unroll
        for (int i = 0; i < 4; i++) {
            int v = ld_i32_a2(b + 6 + 4 * i);
            q[i] = (v & 0x0F0F0F0F) | spread4((qh >> (4 * i)) & 0xF);
            q[i + 4] = ((v >> 4) & 0x0F0F0F0F) | spread4((qh >> (16 + 4 * i)) & 0xF);
        }
    }
    __device__ __forceinline__ float dot(const i8* yq, const float2* yds) const {
        int s = dot32(q, yq + u * 32);
        float2 ds = yds[u];
        return d * (ds.x * (float)s - 16.0f * ds.y);
    }
};

template <>
struct Unit<T_Q5_1> {
    int q[8];
    float d, m;
    int u;
    __device__ __forceinline__ void load(const u8* row, int uu) {
        u = uu;
        const u8* b = row + u * 24;
        u32 dm = *(const u32*)b;
        d = h2f((u16)(dm & 0xffff));
        m = h2f((u16)(dm >> 16));
        u32 qh = *(const u32*)(b + 4);
#pragma unroll
        for (int i = 0; i < 4; i++) {
            int v = ld_i32_a4(b + 8 + 4 * i);
            q[i] = (v & 0x0F0F0F0F) | spread4((qh >> (4 * i)) & 0xF);
            q[i + 4] = ((v >> 4) & 0x0F0F0F0F) | spread4((qh >> (16 + 4 * i)) & 0xF);
        }
    }
    __device__ __forceinline__ float dot(const i8* yq, const float2* yds) const {
        int s = dot32(q, yq + u * 32);
        float2 ds = yds[u];
        return d * ds.x * (float)s + m * ds.y;
    }
};

template <>
struct Unit<T_Q8_0> {
    int q[8];
    float d;
    int u;
    __device__ __forceinline__ void load(const u8* row, int uu) {
        u = uu;
        const u8* b = row + u * 34;
        d = h2f(*(const u16*)b);
#pragma unroll
        for (int i = 0; i < 8; i++) q[i] = ld_i32_a2(b + 2 + 4 * i);
    }
    __device__ __forceinline__ float dot(const i8* yq, const float2* yds) const {
        int s = dot32(q, yq + u * 32);
        return d * yds[u].x * (float)s;
    }
};

// 6-bit scale and min j (0..7) of a K-quant super-block from its 12 scale bytes held in three
// words (ggml's get_scale_min_k4), with shifts of the words (no byte indexing, which would put
// the words in local memory when j is not a constant).
__device__ __forceinline__ void scale_min_w(int j, const u32* w, int* sc, int* m) {
    int s = 8 * (j & 3);
    u32 a = w[0] >> s, b = w[1] >> s, c = w[2] >> s;
    if (j < 4) {
        *sc = (int)(a & 63);
        *m = (int)(b & 63);
    } else {
        *sc = (int)((c & 0xF) | (((a >> 6) & 3) << 4));
        *m = (int)(((c >> 4) & 0xF) | (((b >> 6) & 3) << 4));
    }
}

// Byte-pointer variant for the dequantizers.
__device__ __forceinline__ void scale_min_k4(int j, const u8* q, int* sc, int* m) {
    if (j < 4) {
        *sc = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
        *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

// Q4_K / Q5_K: unit = one pair of 32-value sub-blocks (4 per 256-value super-block); the
// super-block is 16-byte aligned in both, so its header and the quants load as int4.
template <bool FIVE>
struct UnitK45 {
    int lo[8], hi[8];
    float d0, d1, m0, m1;
    int blk;
    __device__ __forceinline__ void load(const u8* row, int u) {
        int sb = u >> 2, p = u & 3;
        const u8* b = row + sb * (FIVE ? 176 : 144);
        const int4 hd = *(const int4*)b;  // d, dmin, the 12 scale bytes: one load
        const u32 dd = (u32)hd.x;
        float d = h2f((u16)(dd & 0xffff)), dmin = h2f((u16)(dd >> 16));
        u32 w[3] = {(u32)hd.y, (u32)hd.z, (u32)hd.w};
        int sc0, mm0, sc1, mm1;
        scale_min_w(2 * p, w, &sc0, &mm0);
        scale_min_w(2 * p + 1, w, &sc1, &mm1);
        d0 = d * (float)sc0;
        d1 = d * (float)sc1;
        m0 = dmin * (float)mm0;
        m1 = dmin * (float)mm1;
        const int4* ql = (const int4*)(b + (FIVE ? 48 : 16) + 32 * p);
        int4 a = ql[0], c = ql[1];
        int v[8] = {a.x, a.y, a.z, a.w, c.x, c.y, c.z, c.w};
        int h[8];
        if (FIVE) {
            const int4* qh = (const int4*)(b + 16);
            int4 e = qh[0], f = qh[1];
            h[0] = e.x; h[1] = e.y; h[2] = e.z; h[3] = e.w;
            h[4] = f.x; h[5] = f.y; h[6] = f.z; h[7] = f.w;
        }
#pragma unroll
        for (int i = 0; i < 8; i++) {
            lo[i] = v[i] & 0x0F0F0F0F;
            hi[i] = (v[i] >> 4) & 0x0F0F0F0F;
            if (FIVE) {
                lo[i] |= ((h[i] >> (2 * p)) & 0x01010101) << 4;
                hi[i] |= ((h[i] >> (2 * p + 1)) & 0x01010101) << 4;
            }
        }
        blk = sb * 8 + 2 * p;
    }
    __device__ __forceinline__ float dot(const i8* yq, const float2* yds) const {
        const i8* y = yq + blk * 32;
        int s0 = dot32(lo, y), s1 = dot32(hi, y + 32);
        float2 a = yds[blk], c = yds[blk + 1];
        return d0 * a.x * (float)s0 + d1 * c.x * (float)s1 - (m0 * a.y + m1 * c.y);
    }
};

template <>
struct Unit<T_Q4_K> : UnitK45<false> {};
template <>
struct Unit<T_Q5_K> : UnitK45<true> {};

// Q6_K: unit = (half h of the super-block, 16-value group lg): values l in [16 lg, 16 lg + 16)
// of the four 32-value quarters of that half (64 values). Blocks are 210 bytes (2-aligned).
template <>
struct Unit<T_Q6_K> {
    int q[4][4];
    float ds[4];
    int yoff;
    __device__ __forceinline__ void load(const u8* row, int u) {
        int sb = u >> 2, h = (u >> 1) & 1, lg = u & 1;
        const u8* b = row + sb * 210;
        const u8* ql = b + 64 * h + 16 * lg;
        const u8* qh = b + 128 + 32 * h + 16 * lg;
        const i8* sc = (const i8*)(b + 192) + 8 * h + lg;
        float d = h2f(*(const u16*)(b + 208));
#pragma unroll
        for (int i = 0; i < 4; i++) {
            int a = ld_i32_a2(ql + 4 * i), c = ld_i32_a2(ql + 32 + 4 * i),
                hh = ld_i32_a2(qh + 4 * i);
            q[0][i] = (int)__vsubss4((a & 0x0F0F0F0F) | ((hh & 0x03030303) << 4), 0x20202020);
            q[1][i] = (int)__vsubss4((c & 0x0F0F0F0F) | (((hh >> 2) & 0x03030303) << 4), 0x20202020);
            q[2][i] = (int)__vsubss4(((a >> 4) & 0x0F0F0F0F) | (((hh >> 4) & 0x03030303) << 4), 0x20202020);
            q[3][i] = (int)__vsubss4(((c >> 4) & 0x0F0F0F0F) | (((hh >> 6) & 0x03030303) << 4), 0x20202020);
        }
#pragma unroll
        for (int k = 0; k < 4; k++) ds[k] = d * (float)sc[2 * k];
        yoff = (sb * 8 + 4 * h) * 32 + 16 * lg;
    }
    __device__ __forceinline__ float dot(const i8* yq, const float2* yds) const {
        const i8* y = yq + yoff;
        const float2* dd = yds + (yoff >> 5);
        float r = 0.0f;
#pragma unroll
        for (int k = 0; k < 4; k++) r += ds[k] * dd[k].x * (float)dot16(q[k], ld_y16(y + 32 * k), 0);
        return r;
    }
};

// acc[t] += units u, u + WARP, ... (U of them) of a row times token t's q8_1 activations.
template <int T, int U, int NT>
__device__ __forceinline__ void mmvq_units(const u8* r, int u, int stride, const i8* yq,
                                           const float2* yds, int K, int nb, int n_tok,
                                           float* acc) {
    Unit<T> w[U];
#pragma unroll
    for (int i = 0; i < U; i++) w[i].load(r, u + i * stride);
    pdl_wait();  // weights are in flight; the activations come from the kernel before
#pragma unroll
    for (int i = 0; i < U; i++) {
#pragma unroll
        for (int t = 0; t < NT; t++)
            if (t < n_tok) acc[t] += w[i].dot(yq + (size_t)t * K, yds + (size_t)t * nb);
    }
}

// Row `row` of the up to three matrices launched together (q/k/v, gate/up): rows [0, r0) of
// W0, then r1 rows of W1, then r2 rows of W2. False past the last row.
struct Rows3 {
    const u8 *W0, *W1, *W2;
    int r0, r1, r2;
    float *o0, *o1, *o2;
    int ldo0, ldo1, ldo2;
    __device__ __forceinline__ int total() const { return r0 + r1 + r2; }
    __device__ __forceinline__ bool pick(int row, const u8** W, float** out, int* ldo,
                                         int* local) const {
        if (row < r0) {
            *W = W0; *out = o0; *ldo = ldo0; *local = row;
        } else if (row < r0 + r1) {
            *W = W1; *out = o1; *ldo = ldo1; *local = row - r0;
        } else if (row < r0 + r1 + r2) {
            *W = W2; *out = o2; *ldo = ldo2; *local = row - r0 - r1;
        } else {
            return false;
        }
        return true;
    }
};

// The leading parameters of every product kernel (mmvq, mvx, mmvs, mmqs: the up to three
// matrices with their row counts, outputs and output strides, the row bytes, the units per row,
// the q8_1 activations) and the Rows3 `m` made of them.
#define PRODUCT_PARAMS                                                                       \
    const u8 *W0, const u8 *W1, const u8 *W2, int r0, int r1, int r2, float *o0, float *o1, \
        float *o2, int ldo0, int ldo1, int ldo2, u64 row_bytes, int units, const i8 *yq,    \
        const float2 *yds
#define ROWS3_M Rows3 m = {W0, W1, W2, r0, r1, r2, o0, o1, o2, ldo0, ldo1, ldo2}

// out[t * ldo + row] = W[row] . y[t] for t < n_tok (<= MV_MAXT). `wpr` warps (1, 2 or 4) share
// a row, each taking every wpr-th group of 32 units (more warps in flight where a matrix has few
// rows); their sums meet in shared memory.
template <int T, int NT>
__device__ __forceinline__ void mmvq(const Rows3& m, u64 row_bytes, int units, const i8* yq,
                                     const float2* yds, int K, int n_tok, int wpr) {
    __shared__ float red[MV_WARPS][NT];
    int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP;
    int row = blockIdx.x * (MV_WARPS / wpr) + warp / wpr, sub = warp % wpr;
    const u8* W;
    float* out;
    int ldo, local;
    pdl_trigger();
    bool ok = m.pick(row, &W, &out, &ldo, &local);
    float acc[NT];
#pragma unroll
    for (int t = 0; t < NT; t++) acc[t] = 0.0f;
    if (ok) {
        const u8* r = W + (u64)local * row_bytes;
        int nb = K / 32, stride = wpr * WARP;
        // Several units per lane are loaded before any is used, so each lane keeps 2-4 weight
        // loads in flight. Two where acc takes registers, and for one token on the K-quants:
        // their 64-value units make two per lane a whole 4096-wide row already, and four would
        // cost registers for every row (80 instead of 56 for Q4_K on sm_90, with a spill: six
        // blocks per multiprocessor instead of nine; tg128 +3.6% on an H100).
        int u = sub * WARP + lane;
        constexpr bool KQ = T == T_Q4_K || T == T_Q5_K || T == T_Q6_K;
        constexpr int U = (NT == 1 && KQ) || NT > 8 ? 2 : 4;
        for (; u + (U - 1) * stride < units; u += U * stride)
            mmvq_units<T, U, NT>(r, u, stride, yq, yds, K, nb, n_tok, acc);
        if (U == 4 && u + stride < units) {
            mmvq_units<T, 2, NT>(r, u, stride, yq, yds, K, nb, n_tok, acc);
            u += 2 * stride;
        }
        if (u < units) mmvq_units<T, 1, NT>(r, u, stride, yq, yds, K, nb, n_tok, acc);
    }
    pdl_wait();  // warps without units, too
#pragma unroll
    for (int t = 0; t < NT; t++) acc[t] = warp_sum(acc[t]);
    if (wpr > 1) {
        if (lane == 0) {
#pragma unroll
            for (int t = 0; t < NT; t++) red[warp][t] = acc[t];
        }
        __syncthreads();
        if (sub == 0) {
#pragma unroll
            for (int t = 0; t < NT; t++)
                for (int w = 1; w < wpr; w++) acc[t] += red[warp + w][t];
        }
    }
    if (ok && sub == 0 && lane == 0) {
#pragma unroll
        for (int t = 0; t < NT; t++)
            if (t < n_tok) out[(size_t)t * ldo + local] = acc[t];
    }
}

#define MMVQ_NT(name, T, NT)                                                                   \
    extern "C" __global__ void __launch_bounds__(MV_WARPS * WARP) name(                        \
        PRODUCT_PARAMS, int K, int n_tok, int wpr) {                                           \
        ROWS3_M;                                                                               \
        mmvq<T, NT>(m, row_bytes, units, yq, yds, K, n_tok, wpr);                              \
    }
// One token (the batch-1 decode step), up to 8, up to MV_MAXT.
#define MMVQ(name, T)           \
    MMVQ_NT(name##_1, T, 1)     \
    MMVQ_NT(name##_8, T, 8)     \
    MMVQ_NT(name##_16, T, MV_MAXT)
MMVQ(mmvq_q4_0, T_Q4_0)
MMVQ(mmvq_q4_1, T_Q4_1)
MMVQ(mmvq_q5_0, T_Q5_0)
MMVQ(mmvq_q5_1, T_Q5_1)
MMVQ(mmvq_q8_0, T_Q8_0)
MMVQ(mmvq_q4_k, T_Q4_K)
MMVQ(mmvq_q5_k, T_Q5_K)
MMVQ(mmvq_q6_k, T_Q6_K)

// ---- exact mode: the CPU backend's summation order ------------------------------------------
// mvx_<type> (legacy types): the same products as mmvq, summed in exactly the order of the CPU
// backend's AVX2 kernels (ggml-compat dot/avx2.rs, ggml's x86 ggml_vec_dot_<type>_q8_<0|1>), so
// that the two backends give the same bits: eight f32 lanes, lane l holding the products of
// quants 4l..4l+3 of every block (an exact integer per block), `acc_l = fma(d_w * d_a, isum_l,
// acc_l)` block after block; the minimum terms of the _1 types in one chain `mins = fma(m_w,
// s_a, mins)`; then ((a0 + a4) + (a2 + a6)) + ((a1 + a5) + (a3 + a7)) + mins. Eight threads per
// row, four rows per warp, every token in turn: slow, for `MOA_EXACT_ATTN=1` (exact mode).
// The activations are the q8_1 blocks of quantize_q8_1; the _0 types use their d only (the
// CPU's q8_0 blocks hold the same quants and d).
template <int T>
__device__ __forceinline__ int mvx_offset() {
    return T == T_Q4_0 ? 8 : (T == T_Q5_0 ? 16 : 0);
}

template <int T>
__device__ __forceinline__ void mvx(const Rows3& m, u64 row_bytes, const i8* yq,
                                    const float2* yds, int K, int n_tok) {
    pdl_wait();
    pdl_trigger();
    const int lane = threadIdx.x % WARP, l = lane % 8;
    const int row = blockIdx.x * (blockDim.x / 8) + threadIdx.x / 8;
    const u8* W;
    float* out;
    int ldo, local;
    const bool ok = m.pick(row, &W, &out, &ldo, &local);
    const int nb = K / 32;
    const u8* r = ok ? W + (u64)local * row_bytes : nullptr;
    for (int t = 0; t < n_tok; t++) {
        const i8* y = yq + (size_t)t * K;
        const float2* ds = yds + (size_t)t * nb;
        float acc = 0.0f, mins = 0.0f;
        if (ok) {
            for (int u = 0; u < nb; u++) {
                Unit<T> w;
                w.load(r, u);
                const int y4 = *(const int*)(y + u * 32 + 4 * l);
                int isum = __dp4a(w.q[l], y4, 0);
                if (mvx_offset<T>()) isum -= mvx_offset<T>() * __dp4a(0x01010101, y4, 0);
                acc = __fmaf_rn(__fmul_rn(w.d, ds[u].x), (float)isum, acc);
                if constexpr (T == T_Q4_1 || T == T_Q5_1) mins = __fmaf_rn(w.m, ds[u].y, mins);
            }
        }
        // Lanes l and l + 4, then l and l + 2, then l and l + 1 (the AVX2 lane sum).
        acc = __fadd_rn(acc, __shfl_xor_sync(0xffffffffu, acc, 4));
        acc = __fadd_rn(acc, __shfl_xor_sync(0xffffffffu, acc, 2));
        acc = __fadd_rn(acc, __shfl_xor_sync(0xffffffffu, acc, 1));
        if (ok && l == 0) out[(size_t)t * ldo + local] = __fadd_rn(acc, mins);
    }
}

#define MVX(name, T)                                                                           \
    extern "C" __global__ void __launch_bounds__(MV_WARPS * WARP) name(                        \
        PRODUCT_PARAMS, int K, int n_tok, int wpr) {                                           \
        ROWS3_M;                                                                               \
        mvx<T>(m, row_bytes, yq, yds, K, n_tok);                                               \
    }
MVX(mvx_q4_0, T_Q4_0)
MVX(mvx_q4_1, T_Q4_1)
MVX(mvx_q5_0, T_Q5_0)
MVX(mvx_q5_1, T_Q5_1)
MVX(mvx_q8_0, T_Q8_0)

// ---- one token, weights streamed through shared memory -----------------------------------
// mmvs_<type>: the one-token product of mmvq with each block's tile of `R` consecutive rows
// (of the up to three matrices) copied whole into shared memory by cp.async in 16-byte pieces
// before any of it is used: every byte of the tile is in flight at once and each warp-wide copy
// moves 512 contiguous bytes, whatever the type's block size or alignment (Q6_K's 210-byte
// blocks). Then one warp per row (all the block's warps on a tile of one row) reads its
// units (Unit<T>, as mmvq) from shared memory. Rows must start 16-byte aligned and row_bytes be
// a multiple of 16 (the host checks, else mmvq).

// One lane's share of a row held in shared memory: units u0, u0 + stride, ..., two at a time.
template <int T>
__device__ __forceinline__ float mmvs_row(const u8* r, int u0, int stride, int units,
                                          const i8* yq, const float2* yds) {
    float acc = 0.0f;
    int u = u0;
    for (; u + stride < units; u += 2 * stride) {
        Unit<T> a, b;
        a.load(r, u);
        b.load(r, u + stride);
        acc += a.dot(yq, yds);
        acc += b.dot(yq, yds);
    }
    if (u < units) {
        Unit<T> a;
        a.load(r, u);
        acc += a.dot(yq, yds);
    }
    return acc;
}

template <int T>
__device__ __forceinline__ void mmvs(const Rows3& m, u64 row_bytes, int units, const i8* yq,
                                     const float2* yds, int R) {
    extern __shared__ int4 mvs_tile[];
    int tid = threadIdx.x, warp = tid / WARP, lane = tid % WARP;
    int row0 = blockIdx.x * R, cpr = (int)(row_bytes / 16);
    pdl_trigger();
    for (int i = 0; i < R; i++) {
        const u8* W;
        float* out;
        int ldo, local;
        if (!m.pick(row0 + i, &W, &out, &ldo, &local)) break;
        const int4* src = (const int4*)(W + (u64)local * row_bytes);
        int4* dst = mvs_tile + (size_t)i * cpr;
        for (int c = tid; c < cpr; c += MV_WARPS * WARP) cp_async16(dst + c, src + c, 16);
    }
    cp_async_commit();
    pdl_wait();  // the weights are in flight; the activations come from the kernel before
    cp_async_wait<0>();
    __syncthreads();
    if (R > 1) {
        // One warp per row (splitting two rows over the four warps measured slower: the Q6_K
        // output matrix 66 vs 82% of copy bandwidth on an H100).
        for (int i = warp; i < R; i += MV_WARPS) {
            const u8* W;
            float* out;
            int ldo, local;
            if (!m.pick(row0 + i, &W, &out, &ldo, &local)) break;
            const u8* r = (const u8*)(mvs_tile + (size_t)i * cpr);
            float acc = mmvs_row<T>(r, lane, WARP, units, yq, yds);
            acc = warp_sum(acc);
            if (lane == 0) out[local] = acc;
        }
    } else {
        // One wide row (a down projection): every warp takes a share, the sums meet in shared
        // memory (Q6_K 4096 x 14336: 67% of copy bandwidth, one warp 61%).
        __shared__ float red[MV_WARPS];
        const u8* W;
        float* out;
        int ldo, local;
        bool ok = m.pick(row0, &W, &out, &ldo, &local);
        float acc = ok ? mmvs_row<T>((const u8*)mvs_tile, tid, MV_WARPS * WARP, units, yq, yds)
                       : 0.0f;
        acc = warp_sum(acc);
        if (lane == 0) red[warp] = acc;
        __syncthreads();
        if (ok && tid == 0) {
            for (int w = 1; w < MV_WARPS; w++) acc += red[w];
            out[local] = acc;
        }
    }
}

#define MMVS(name, T)                                                                          \
    extern "C" __global__ void __launch_bounds__(MV_WARPS * WARP) name(                        \
        PRODUCT_PARAMS, int R) {                                                               \
        ROWS3_M;                                                                               \
        mmvs<T>(m, row_bytes, units, yq, yds, R);                                              \
    }
MMVS(mmvs_q4_0, T_Q4_0)
MMVS(mmvs_q4_1, T_Q4_1)
MMVS(mmvs_q5_0, T_Q5_0)
MMVS(mmvs_q5_1, T_Q5_1)
MMVS(mmvs_q8_0, T_Q8_0)
MMVS(mmvs_q4_k, T_Q4_K)
MMVS(mmvs_q5_k, T_Q5_K)
MMVS(mmvs_q6_k, T_Q6_K)

// ---- small batches on tensor cores (2..16 tokens) ------------------------------------------
// mmqs_<type>_<8|16>: the same product as mmvq for up to 8 / 16 tokens with int8 tensor-core
// MMAs (m16n8k32 per 32-value block, mma_s8x2; m16n8k16 where a block has a scale per 16 values
// and for the mins): a block of MQ_WARPS warps owns 16 weight rows, its warps take every
// MQ_WARPS-th unit of those rows, and each weight is unpacked to int8 once for all tokens
// (mmvq's dp4a path re-reads every token's activations per weight unit, which starves at 16
// tokens). Per 32-value block the int32 dots are scaled by the weight's and the activation's
// scales, exactly as mmvq does, so both paths give the same sums up to float rounding.
//
// Fragment layout (PTX m16n8k16 .s8): lane = 4 g + c holds A rows g and g + 8, columns 4c..4c+3
// of each 16-column half, and B (the activations) columns 4c..4c+3 for token g; the result holds
// rows g, g + 8 for tokens 2c, 2c + 1.

#define MQ_WARPS 8

// The activations in fragment order ("mma layout"), so that one 8-byte load per lane gives the
// B fragments of both 16-column halves for 8 tokens and a warp's load covers 256 contiguous
// bytes: yq_m[((b * 2 + t / 8) * 4 + c) * 64 + (t % 8) * 8 + j] holds byte j of lane c's share
// of token t's 32-value block b. The share is that of family 0, columns 4c..4c+3 and
// 16+4c..16+4c+3, the columns a lane's weight fragment holds (Frag<T>::load: the legacy types;
// family 1, columns 8c..8c+7, is the K-quants' and only q8k_mma_layout writes it), so the dot
// products see the same k order on both sides; yds_m[b * 16 + t] = (d, d * sum). Tokens
// n_tok..15 are zero.
extern "C" __global__ void q8_1_mma_layout(const i8* yq, const float2* yds, int K, int n_tok,
                                           i8* yq_m, float2* yds_m) {
    pdl_wait();  // a programmatic dependent: wait first, then let the next one launch
    pdl_trigger();
    int nb = K / 32;
    int gid = blockIdx.x * blockDim.x + threadIdx.x;
    if (gid >= nb * 64) return;
    int c = gid & 3, t = (gid >> 2) & 15, b = gid >> 6;
    int lo = 0, hi = 0;
    if (t < n_tok) {
        const i8* src = yq + (size_t)t * K + b * 32;
        lo = *(const int*)(src + 4 * c);
        hi = *(const int*)(src + 16 + 4 * c);
    }
    if (c == 0) yds_m[b * 16 + t] = t < n_tok ? yds[(size_t)t * nb + b] : make_float2(0.0f, 0.0f);
    *(int2*)(yq_m + (((size_t)b * 2 + t / 8) * 4 + c) * 64 + (t % 8) * 8) = make_int2(lo, hi);
}

__device__ __forceinline__ void mma_s8(int* d, int a0, int a1, int b0) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5}, {%6}, "
        "{%0,%1,%2,%3};"
        : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
        : "r"(a0), "r"(a1), "r"(b0));
}

// d += the two m16n8k16 products (a0, a1) x b0 and (a2, a3) x b1 in one m16n8k32: its A
// fragment holds rows g (a0, a2) and g + 8 (a1, a3) at columns 4c..4c+3 (a0, a1) and
// 16+4c..16+4c+3 (a2, a3), its B fragment columns 4c..4c+3 (b0) and 16+4c.. (b1) of token g,
// so the pairs meet exactly as in the two k16 MMAs: half the MMAs and one step less in each
// warp's dependent chain. MQ_K16 (MOA_NVRTC_DEFINES) keeps the two k16 MMAs, for measuring.
__device__ __forceinline__ void mma_s8x2(int* d, int a0, int a1, int a2, int a3, int b0, int b1) {
#ifdef MQ_K16
    mma_s8(d, a0, a1, b0);
    mma_s8(d, a2, a3, b1);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#endif
}

// One unit (a block of 32 values) of one row of a legacy type as lane c's A fragments: q[b][h] =
// the int8 values at columns 16 h + 4c .. + 3 of block b; the block's values are d[b][h] * q +
// m[b]. (The K-quants: FragI below, on q8_K activations.)
template <int T>
struct Frag;

template <>
struct Frag<T_Q4_0> {
    static constexpr int NB = 1;
    int q[1][2];
    float d[1][2], m[1];
    __device__ __forceinline__ void load(const u8* row, int u, int c) {
        const u8* b = row + u * 18;
        float dd = h2f(*(const u16*)b);
        int v = ld_i32_a2(b + 2 + 4 * c);
        q[0][0] = v & 0x0F0F0F0F;
        q[0][1] = (v >> 4) & 0x0F0F0F0F;
        d[0][0] = d[0][1] = dd;
        m[0] = -8.0f * dd;
    }
};

template <>
struct Frag<T_Q4_1> {
    static constexpr int NB = 1;
    int q[1][2];
    float d[1][2], m[1];
    __device__ __forceinline__ void load(const u8* row, int u, int c) {
        const u8* b = row + u * 20;
        u32 dm = *(const u32*)b;
        d[0][0] = d[0][1] = h2f((u16)(dm & 0xffff));
        m[0] = h2f((u16)(dm >> 16));
        int v = ld_i32_a4(b + 4 + 4 * c);
        q[0][0] = v & 0x0F0F0F0F;
        q[0][1] = (v >> 4) & 0x0F0F0F0F;
    }
};

template <>
struct Frag<T_Q5_0> {
    static constexpr int NB = 1;
    int q[1][2];
    float d[1][2], m[1];
    __device__ __forceinline__ void load(const u8* row, int u, int c) {
        const u8* b = row + u * 22;
        float dd = h2f(*(const u16*)b);
        u32 qh = (u32)ld_i32_a2(b + 2);
        int v = ld_i32_a2(b + 6 + 4 * c);
        q[0][0] = (v & 0x0F0F0F0F) | spread4((qh >> (4 * c)) & 0xF);
        q[0][1] = ((v >> 4) & 0x0F0F0F0F) | spread4((qh >> (16 + 4 * c)) & 0xF);
        d[0][0] = d[0][1] = dd;
        m[0] = -16.0f * dd;
    }
};

template <>
struct Frag<T_Q5_1> {
    static constexpr int NB = 1;
    int q[1][2];
    float d[1][2], m[1];
    __device__ __forceinline__ void load(const u8* row, int u, int c) {
        const u8* b = row + u * 24;
        u32 dm = *(const u32*)b;
        d[0][0] = d[0][1] = h2f((u16)(dm & 0xffff));
        m[0] = h2f((u16)(dm >> 16));
        u32 qh = *(const u32*)(b + 4);
        int v = ld_i32_a4(b + 8 + 4 * c);
        q[0][0] = (v & 0x0F0F0F0F) | spread4((qh >> (4 * c)) & 0xF);
        q[0][1] = ((v >> 4) & 0x0F0F0F0F) | spread4((qh >> (16 + 4 * c)) & 0xF);
    }
};

template <>
struct Frag<T_Q8_0> {
    static constexpr int NB = 1;
    int q[1][2];
    float d[1][2], m[1];
    __device__ __forceinline__ void load(const u8* row, int u, int c) {
        const u8* b = row + u * 34;
        d[0][0] = d[0][1] = h2f(*(const u16*)b);
        m[0] = 0.0f;
        q[0][0] = ld_i32_a2(b + 2 + 4 * c);
        q[0][1] = ld_i32_a2(b + 18 + 4 * c);
    }
};

// f[i][0], f[i][1] = lane c's fragments of unit u + i * MQ_WARPS of rows r0 (g) and r1 (g + 8);
// then waits on the kernel before: every weight load is issued before it, and the activations
// come from that kernel.
template <class F, int U>
__device__ __forceinline__ void load_units(F (&f)[U][2], const u8* r0, const u8* r1, int u,
                                           int c) {
#pragma unroll
    for (int i = 0; i < U; i++) {
        f[i][0].load(r0, u + i * MQ_WARPS, c);
        f[i][1].load(r1, u + i * MQ_WARPS, c);
    }
    pdl_wait();
}

// acc[i][nt][j] (row g + 8i, token 8 nt + 2c + j) += units u, u + MQ_WARPS, ... (U of them),
// activations in the mma layout (q8_1_mma_layout).
template <int T, int U, int NTL>
__device__ __forceinline__ void mmqs_units(const u8* r0, const u8* r1, int u, int g, int c,
                                           const i8* yq_m, const float2* yds_m,
                                           float (*acc)[NTL][2]) {
    Frag<T> f[U][2];
    load_units(f, r0, r1, u, c);
#pragma unroll
    for (int i = 0; i < U; i++) {
#pragma unroll
        for (int b = 0; b < Frag<T>::NB; b++) {
            int blk = (u + i * MQ_WARPS) * Frag<T>::NB + b;
#pragma unroll
            for (int nt = 0; nt < NTL; nt++) {
                int2 y = *(const int2*)(yq_m + (((size_t)blk * 2 + nt) * 4 + c) * 64 + g * 8);
                float4 ds = *(const float4*)(yds_m + blk * 16 + 8 * nt + 2 * c);
                int s0[4] = {0, 0, 0, 0};
                mma_s8x2(s0, f[i][0].q[b][0], f[i][1].q[b][0], f[i][0].q[b][1], f[i][1].q[b][1],
                         y.x, y.y);
#pragma unroll
                for (int j = 0; j < 2; j++) {
                    float da = j ? ds.z : ds.x, sa = j ? ds.w : ds.y;
#pragma unroll
                    for (int rr = 0; rr < 2; rr++) {
                        const Frag<T>& w = f[i][rr];
                        acc[rr][nt][j] += w.d[b][0] * da * (float)s0[2 * rr + j] + w.m[b] * sa;
                    }
                }
            }
        }
    }
}

// ---- K-quants on the tensor cores with q8_K activations --------------------------------------
// The K-quant small-batch products (mmqs_q4_k / q5_k / q6_k) take the activations quantized as
// ggml's q8_K, which is what the CPU backend's K-quant dot products use: one f32 scale per 256
// values, d = 1 / iscale with iscale = -127 / (the signed value of largest magnitude, the first
// on ties), q = nearest-even(iscale * v) capped at 127. With one activation scale per super-block
// the weights' per-32 (Q6_K: per-16) scales are small integers applied to the int32 dots with
// integer multiply-adds, and a super-block's sum becomes a float once per token and row: a few
// float operations per unit instead of about twenty per 32-value block and token, which is what
// bounded the q8_1 version (it issues more instructions than it moves bytes at 8-16 tokens).
//
// q8k_mma_layout writes, from the f32 activations: the int8 values in the fragment order of
// q8_1_mma_layout (same families: fam 1 = Q4_K/Q5_K, 0 = Q6_K); ysc[sb * 16 + t] = token t's
// d of super-block sb; and after those (Q4_K/Q5_K, for the mins)
// ymin[((sb * 2 + t / 8) * 2 + c) * 8 + t % 8] = the B fragments (k = 4c .. 4c + 3, token t) of
// the 32-value block sums S of blocks 4c .. 4c + 3, split into int8 parts: x holds S >> 6
// (-64..63), y holds S & 63, so S = 64 x + y (|S| <= 32 * 127). One warp per (super-block,
// token), 8 values per lane. Token slots n_tok..15 are not written: a token is one column of
// the B fragments, so whatever they hold reaches only the padding columns of the results,
// which are never stored.
// One warp's part of the q8_K layout: lane `lane` holds values 8 lane .. 8 lane + 7 of token
// t's super-block sb and writes their share of yq_m, ysc and the min fragments. Shared by
// q8k_mma_layout and the fused producers (add_rms_norm_q8_*, swiglu_q8k).
__device__ __forceinline__ void q8k_layout_warp(const float* v, int sb, int t, int lane, int nsb,
                                                int fam, i8* yq_m, float* ysc) {
    // The signed value of largest magnitude; ties go to the first (lanes hold values in order).
    float amax = 0.0f, mx = 0.0f;
    int src = lane;
#pragma unroll
    for (int k = 0; k < 8; k++) {
        if (fabsf(v[k]) > amax) {
            amax = fabsf(v[k]);
            mx = v[k];
        }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float oa = __shfl_xor_sync(0xffffffffu, amax, o);
        const float om = __shfl_xor_sync(0xffffffffu, mx, o);
        const int os = __shfl_xor_sync(0xffffffffu, src, o);
        if (oa > amax || (oa == amax && os < src)) {
            amax = oa;
            mx = om;
            src = os;
        }
    }
    int q[8];
    float d = 0.0f;
    if (amax != 0.0f) {
        const float is = -127.0f / mx;
#pragma unroll
        for (int k = 0; k < 8; k++) q[k] = min(__float2int_rn(is * v[k]), 127);
        d = 1.0f / is;
    } else {
#pragma unroll
        for (int k = 0; k < 8; k++) q[k] = 0;
    }
    int lo = 0, hi = 0;
#pragma unroll
    for (int k = 0; k < 4; k++) {
        lo |= (q[k] & 0xFF) << (8 * k);
        hi |= (q[k + 4] & 0xFF) << (8 * k);
    }
    // Lane 4b + cc holds columns 8cc .. 8cc + 7 of block b: family 1's share for lane cc.
    // Family 0's share of lane cc is columns 4cc .. 4cc + 3 and 16 + 4cc .. 16 + 4cc + 3.
    const int b = lane >> 2, cc = lane & 3, base = lane & ~3;
    int ol = lo, oh = hi;
    {
        const int a0 = __shfl_sync(0xffffffffu, lo, base + (cc >> 1));
        const int a1 = __shfl_sync(0xffffffffu, hi, base + (cc >> 1));
        const int b0 = __shfl_sync(0xffffffffu, lo, base + 2 + (cc >> 1));
        const int b1 = __shfl_sync(0xffffffffu, hi, base + 2 + (cc >> 1));
        if (fam == 0) {
            ol = (cc & 1) ? a1 : a0;
            oh = (cc & 1) ? b1 : b0;
        }
    }
    const size_t blk = (size_t)sb * 8 + b;
    *(int2*)(yq_m + ((blk * 2 + t / 8) * 4 + cc) * 64 + (t % 8) * 8) = make_int2(ol, oh);
    if (lane == 0) ysc[sb * 16 + t] = d;
    // Block sums, split and packed one byte per block.
    int s = 0;
#pragma unroll
    for (int k = 0; k < 8; k++) s += q[k];
    s += __shfl_xor_sync(0xffffffffu, s, 1);
    s += __shfl_xor_sync(0xffffffffu, s, 2);
    u32 hb = (u32)((s >> 6) & 0xFF) << (8 * (b & 3)), lb = (u32)(s & 63) << (8 * (b & 3));
    if (cc != 0) hb = lb = 0u;
    hb |= __shfl_xor_sync(0xffffffffu, hb, 4);
    lb |= __shfl_xor_sync(0xffffffffu, lb, 4);
    hb |= __shfl_xor_sync(0xffffffffu, hb, 8);
    lb |= __shfl_xor_sync(0xffffffffu, lb, 8);
    if ((lane & 15) == 0) {
        int2* ymin = (int2*)(ysc + nsb * 16);
        ymin[((sb * 2 + t / 8) * 2 + (lane >> 4)) * 8 + t % 8] = make_int2((int)hb, (int)lb);
    }
}

extern "C" __global__ void q8k_mma_layout(const float* x, int ldx, int K, int n_tok, int fam,
                                          i8* yq_m, float* ysc) {
    pdl_wait();  // a programmatic dependent: wait first, then let the next one launch
    pdl_trigger();
    const int nsb = K / 256;
    const int w = blockIdx.x * (blockDim.x / WARP) + threadIdx.x / WARP;
    if (w >= nsb * n_tok) return;
    const int sb = w / n_tok, t = w % n_tok, lane = threadIdx.x % WARP;
    float v[8];
#pragma unroll
    for (int k = 0; k < 8; k++) v[k] = x[(size_t)t * ldx + sb * 256 + 8 * lane + k];
    q8k_layout_warp(v, sb, t, lane, nsb, fam, yq_m, ysc);
}

// One unit of a K-quant row as lane c's A fragments with the block scales kept as integers
// (the q8_K path): q as Frag<T>; scale(b, h) = the integer scale of half h of block b.
template <int T>
struct FragI;

// Q4_K / Q5_K: unit = one super-block (8 blocks); lane c takes bytes 8c..8c+7 of each sub-block
// pair's 32 quant bytes (one 8-byte load: the quad reads the pair's 32 bytes at once), i.e.
// columns 8c..8c+7 of blocks 2p (low nibbles) and 2p + 1 (high); the header (d, dmin and the 12
// scale bytes) is one 16-byte load per super-block. The 8 scales and 8 mins stay bytes in two
// words each; `mn` is the lane's A fragment of the mins (blocks 4c .. 4c + 3 for c < 2, else
// zero: k = 8..15 of the fragment is empty).
template <bool FIVE>
struct FragIK45 {
    static constexpr int NB = 8;
    static constexpr bool SPLIT = false;
    static constexpr bool MIN = true;
    // The raw quant bytes (and Q5_K's high bits), split into nibbles where an MMA takes them
    // (qv): ten words per unit instead of sixteen unpacked ones. The compiler still places the
    // splits: mmqs_q4_k_16 stays at 104 registers on sm_90 (a variant with staged activations
    // went from 110 to 105).
    int2 v[4];
    int2 e;
    u32 sc[2];
    int mn;
    float d, dmin;
    __device__ __forceinline__ void load(const u8* row, int u, int c) {
        const u8* b = row + u * (FIVE ? 176 : 144);
        int4 hd = *(const int4*)b;
        d = h2f((u16)(hd.x & 0xffff));
        dmin = h2f((u16)((u32)hd.x >> 16));
        const u32 w0 = (u32)hd.y, w1 = (u32)hd.z, w2 = (u32)hd.w;
        // ggml's get_scale_min_k4 on four bytes at once.
        sc[0] = w0 & 0x3F3F3F3Fu;
        sc[1] = (w2 & 0x0F0F0F0Fu) | (((w0 >> 6) & 0x03030303u) << 4);
        const u32 m0 = w1 & 0x3F3F3F3Fu;
        const u32 m1 = ((w2 >> 4) & 0x0F0F0F0Fu) | (((w1 >> 6) & 0x03030303u) << 4);
        mn = c == 0 ? (int)m0 : c == 1 ? (int)m1 : 0;
        e = make_int2(0, 0);
        if (FIVE) e = *(const int2*)(b + 16 + 8 * c);
        const u8* qs = b + (FIVE ? 48 : 16) + 8 * c;
#pragma unroll
        for (int p = 0; p < 4; p++) v[p] = *(const int2*)(qs + 32 * p);
    }
    // Half h of block b's A fragment: columns 8c..8c+7 of block b (b = 2p: low nibbles of the
    // sub-block pair p, 2p + 1: high), 4 of them per half.
    __device__ __forceinline__ int qv(int b, int h) const {
        const int p = b >> 1, hi = b & 1;
        const int w = h ? v[p].y : v[p].x;
        int q = (w >> (4 * hi)) & 0x0F0F0F0F;
        if (FIVE) q |= (((h ? e.y : e.x) >> (2 * p + hi)) & 0x01010101) << 4;
        return q;
    }
    __device__ __forceinline__ int scale(int b, int) const {
        return (int)((sc[b >> 2] >> (8 * (b & 3))) & 0xFFu);
    }
};

template <>
struct FragI<T_Q4_K> : FragIK45<false> {};
template <>
struct FragI<T_Q5_K> : FragIK45<true> {};

// Q6_K: half hh of a super-block (4 blocks), a signed 8-bit scale per 16 values.
template <>
struct FragI<T_Q6_K> {
    static constexpr int NB = 4;
    static constexpr bool SPLIT = true;
    static constexpr bool MIN = false;
    int q[4][2];
    int sc[4][2];
    int mn;
    float d, dmin;
    __device__ __forceinline__ void load(const u8* row, int u, int c) {
        int sb = u >> 1, hh = u & 1;
        const u8* b = row + sb * 210;
        const u8* ql = b + 64 * hh;
        const u8* qh = b + 128 + 32 * hh;
        const i8* s = (const i8*)(b + 192) + 8 * hh;
        d = h2f(*(const u16*)(b + 208));
        dmin = 0.0f;
        mn = 0;
#pragma unroll
        for (int h = 0; h < 2; h++) {
            int l0 = 16 * h + 4 * c;
            int a = ld_i32_a2(ql + l0), a2 = ld_i32_a2(ql + 32 + l0), e = ld_i32_a2(qh + l0);
            q[0][h] = (int)__vsubss4((a & 0x0F0F0F0F) | ((e & 0x03030303) << 4), 0x20202020);
            q[1][h] = (int)__vsubss4((a2 & 0x0F0F0F0F) | (((e >> 2) & 0x03030303) << 4), 0x20202020);
            q[2][h] = (int)__vsubss4(((a >> 4) & 0x0F0F0F0F) | (((e >> 4) & 0x03030303) << 4), 0x20202020);
            q[3][h] = (int)__vsubss4(((a2 >> 4) & 0x0F0F0F0F) | (((e >> 6) & 0x03030303) << 4), 0x20202020);
#pragma unroll
            for (int j = 0; j < 4; j++) sc[j][h] = (int)s[h + 2 * j];
        }
    }
    __device__ __forceinline__ int qv(int b, int h) const { return q[b][h]; }
    __device__ __forceinline__ int scale(int b, int h) const { return sc[b][h]; }
};

// acc[i][nt][j] (row g + 8i, token 8 nt + 2c + j) += super-block unit `uu` of a K-quant (its
// fragments of rows g and g + 8 in f[0], f[1]), activations from q8k_mma_layout (values yq_m,
// scales and min fragments ysc).
template <int T, int NTL>
__device__ __forceinline__ void mmqk_unit(const FragI<T> (&f)[2], int uu, int g, int c,
                                          const i8* yq_m, const float* ysc, int nsb,
                                          float (*acc)[NTL][2]) {
    using F = FragI<T>;
    const int2* ymin = (const int2*)(ysc + nsb * 16);
    const int sb = uu * F::NB / 8;  // the unit's super-block
    int is[2][NTL][2];
#pragma unroll
    for (int rr = 0; rr < 2; rr++)
#pragma unroll
        for (int nt = 0; nt < NTL; nt++) is[rr][nt][0] = is[rr][nt][1] = 0;
#pragma unroll
    for (int b = 0; b < F::NB; b++) {
        const size_t blk = (size_t)uu * F::NB + b;
#pragma unroll
        for (int nt = 0; nt < NTL; nt++) {
            int2 y = *(const int2*)(yq_m + ((blk * 2 + nt) * 4 + c) * 64 + g * 8);
            int s0[4] = {0, 0, 0, 0}, s1[4] = {0, 0, 0, 0};
            if constexpr (F::SPLIT) {  // Q6_K: a scale per 16 values, two sums
                mma_s8(s0, f[0].qv(b, 0), f[1].qv(b, 0), y.x);
                mma_s8(s1, f[0].qv(b, 1), f[1].qv(b, 1), y.y);
            } else {
                mma_s8x2(s0, f[0].qv(b, 0), f[1].qv(b, 0), f[0].qv(b, 1), f[1].qv(b, 1), y.x, y.y);
            }
#pragma unroll
            for (int rr = 0; rr < 2; rr++)
#pragma unroll
                for (int j = 0; j < 2; j++) {
                    is[rr][nt][j] += f[rr].scale(b, 0) * s0[2 * rr + j];
                    if (F::SPLIT) is[rr][nt][j] += f[rr].scale(b, 1) * s1[2 * rr + j];
                }
        }
    }
#pragma unroll
    for (int nt = 0; nt < NTL; nt++) {
        const float2 dt = *(const float2*)(ysc + sb * 16 + 8 * nt + 2 * c);
        int mh[4] = {0, 0, 0, 0}, ml[4] = {0, 0, 0, 0};
        if (F::MIN) {
            const int2 mb = c < 2 ? ymin[((sb * 2 + nt) * 2 + c) * 8 + g] : make_int2(0, 0);
            mma_s8(mh, f[0].mn, f[1].mn, mb.x);
            mma_s8(ml, f[0].mn, f[1].mn, mb.y);
        }
#pragma unroll
        for (int rr = 0; rr < 2; rr++)
#pragma unroll
            for (int j = 0; j < 2; j++) {
                float v = f[rr].d * (float)is[rr][nt][j];
                if (F::MIN) v -= f[rr].dmin * (float)(64 * mh[2 * rr + j] + ml[2 * rr + j]);
                acc[rr][nt][j] += (j ? dt.y : dt.x) * v;
            }
    }
}

// acc += units u, u + MQ_WARPS, ... (U of them) of a K-quant's rows r0 (g) and r1 (g + 8): all
// their weights are loaded before the kernel before is waited on and any is used.
template <int T, int U, int NTL>
__device__ __forceinline__ void mmqk_units(const u8* r0, const u8* r1, int u, int g, int c,
                                           const i8* yq_m, const float* ysc, int nsb,
                                           float (*acc)[NTL][2]) {
    FragI<T> f[U][2];
    load_units(f, r0, r1, u, c);
#pragma unroll
    for (int i = 0; i < U; i++) mmqk_unit<T, NTL>(f[i], u + i * MQ_WARPS, g, c, yq_m, ysc, nsb, acc);
}

template <int T, int NT, bool ONE = false>
__device__ __forceinline__ void mmqs(const Rows3& m, u64 row_bytes, int units, const i8* yq,
                                     const float2* yds, int K, int n_tok) {
    constexpr int NTL = NT / 8;
    __shared__ float red[MQ_WARPS][WARP][4 * NTL];
    int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP, g = lane >> 2, c = lane & 3;
    pdl_trigger();
    int base = blockIdx.x * 16, last = m.total() - 1;
    const u8* rp[2];
#pragma unroll
    for (int i = 0; i < 2; i++) {
        const u8* W;
        float* o;
        int ldo, local;
        m.pick(min(base + g + 8 * i, last), &W, &o, &ldo, &local);
        rp[i] = W + (u64)local * row_bytes;
    }
    float acc[2][NTL][2];
#pragma unroll
    for (int i = 0; i < 2; i++)
#pragma unroll
        for (int nt = 0; nt < NTL; nt++) acc[i][nt][0] = acc[i][nt][1] = 0.0f;
    int u = warp;
    if constexpr (T == T_Q4_K || T == T_Q5_K || T == T_Q6_K) {
        // q8_K activations (q8k_mma_layout): yds holds the scales and the min fragments.
        const float* ysc = (const float*)yds;
        const int nsb = K / 256;
        if constexpr (ONE) {
            for (; u < units; u += MQ_WARPS)
                mmqk_units<T, 1, NTL>(rp[0], rp[1], u, g, c, yq, ysc, nsb, acc);
        } else {
            for (; u + MQ_WARPS < units; u += 2 * MQ_WARPS)
                mmqk_units<T, 2, NTL>(rp[0], rp[1], u, g, c, yq, ysc, nsb, acc);
            if (u < units) mmqk_units<T, 1, NTL>(rp[0], rp[1], u, g, c, yq, ysc, nsb, acc);
        }
    } else {
        for (; u + MQ_WARPS < units; u += 2 * MQ_WARPS)
            mmqs_units<T, 2, NTL>(rp[0], rp[1], u, g, c, yq, yds, acc);
        if (u < units) mmqs_units<T, 1, NTL>(rp[0], rp[1], u, g, c, yq, yds, acc);
    }
    pdl_wait();  // warps without units, too
#pragma unroll
    for (int i = 0; i < 2; i++)
#pragma unroll
        for (int nt = 0; nt < NTL; nt++) {
            red[warp][lane][4 * nt + 2 * i] = acc[i][nt][0];
            red[warp][lane][4 * nt + 2 * i + 1] = acc[i][nt][1];
        }
    __syncthreads();
    // Warp 0 adds the warps' partial sums and writes rows g, g + 8 for its tokens.
    if (warp != 0) return;
#pragma unroll
    for (int i = 0; i < 2; i++) {
        const u8* W;
        float* out;
        int ldo, local;
        if (!m.pick(base + g + 8 * i, &W, &out, &ldo, &local)) continue;
#pragma unroll
        for (int nt = 0; nt < NTL; nt++)
#pragma unroll
            for (int j = 0; j < 2; j++) {
                int t = 8 * nt + 2 * c + j;
                float v = 0.0f;
#pragma unroll
                for (int w = 0; w < MQ_WARPS; w++) v += red[w][lane][4 * nt + 2 * i + j];
                if (t < n_tok) out[(size_t)t * ldo + local] = v;
            }
    }
}

#define MMQS_NT(name, T, NT)                                                                   \
    extern "C" __global__ void __launch_bounds__(MQ_WARPS * WARP) name(                        \
        PRODUCT_PARAMS, int K, int n_tok) {                                                    \
        ROWS3_M;                                                                               \
        mmqs<T, NT>(m, row_bytes, units, yq, yds, K, n_tok);                                   \
    }
#define MMQS(name, T)         \
    MMQS_NT(name##_8, T, 8)   \
    MMQS_NT(name##_16, T, 16)
MMQS(mmqs_q4_0, T_Q4_0)
MMQS(mmqs_q4_1, T_Q4_1)
MMQS(mmqs_q5_0, T_Q5_0)
MMQS(mmqs_q5_1, T_Q5_1)
MMQS(mmqs_q8_0, T_Q8_0)
MMQS(mmqs_q4_k, T_Q4_K)
MMQS(mmqs_q5_k, T_Q5_K)
MMQS(mmqs_q6_k, T_Q6_K)

// mmqs1_<K-quant>_16: mmqs_<type>_16 with one unit per warp in flight instead of two, in 80
// registers: three blocks (24 warps) per multiprocessor instead of two (16), for latency
// hiding; the products measured latency-bound (Nsight Compute on an H100, gate/up: 23% of
// issue slots busy, 44% of DRAM bandwidth; with weights through shared memory or the
// activations staged there no faster).
#define MMQS1(name, T)                                                                         \
    extern "C" __global__ void __launch_bounds__(MQ_WARPS * WARP, 3) name##_16(                \
        PRODUCT_PARAMS, int K, int n_tok) {                                                    \
        ROWS3_M;                                                                               \
        mmqs<T, 16, true>(m, row_bytes, units, yq, yds, K, n_tok);                             \
    }
MMQS1(mmqs1_q4_k, T_Q4_K)
MMQS1(mmqs1_q5_k, T_Q5_K)
MMQS1(mmqs1_q6_k, T_Q6_K)

// ---- float weights ---------------------------------------------------------------------------

template <int T>
__device__ __forceinline__ float ld_float(const u8* row, int i) {
    if (T == T_F32) return ((const float*)row)[i];
    if (T == T_F16) return h2f(((const u16*)row)[i]);
    return bf2f(((const u16*)row)[i]);
}

template <int T>
__device__ __forceinline__ void mv_float(const u8* W, u64 row_bytes, const float* x, int ldx,
                                         int K, int n_tok, float* out, int ldo, int n_rows) {
    int row = blockIdx.x * MV_WARPS + threadIdx.x / WARP;
    int lane = threadIdx.x % WARP;
    if (row >= n_rows) return;
    const u8* r = W + (u64)row * row_bytes;
    float acc[MV_MAXT];
#pragma unroll
    for (int t = 0; t < MV_MAXT; t++) acc[t] = 0.0f;
    for (int i = lane; i < K; i += WARP) {
        float w = ld_float<T>(r, i);
#pragma unroll
        for (int t = 0; t < MV_MAXT; t++)
            if (t < n_tok) acc[t] += w * x[(size_t)t * ldx + i];
    }
#pragma unroll
    for (int t = 0; t < MV_MAXT; t++) {
        if (t < n_tok) {
            float v = warp_sum(acc[t]);
            if (lane == 0) out[(size_t)t * ldo + row] = v;
        }
    }
}

#define MVF(name, T)                                                                        \
    extern "C" __global__ void __launch_bounds__(MV_WARPS * WARP)                           \
        name(const u8* W, u64 row_bytes, const float* x, int ldx, int K, int n_tok, float* out, \
             int ldo, int n_rows) {                                                         \
        mv_float<T>(W, row_bytes, x, ldx, K, n_tok, out, ldo, n_rows);                      \
    }
MVF(mv_f32, T_F32)
MVF(mv_f16, T_F16)
MVF(mv_bf16, T_BF16)

// ---- dequantization of 32-value groups ------------------------------------------------------
// Group g of a row holds values [32 g, 32 g + 32).

// Values [l0, l0 + N) of group g into v[0..N).
template <int T, int N>
__device__ __forceinline__ void dq_part(const u8* row, int g, int l0, float* v) {
    if (T == T_F32 || T == T_F16 || T == T_BF16) {
        for (int l = 0; l < N; l++) v[l] = ld_float<T>(row, 32 * g + l0 + l);
    } else if (T == T_Q4_0 || T == T_Q4_1) {
        const u8* b = row + g * (T == T_Q4_0 ? 18 : 20);
        float d = h2f(*(const u16*)b);
        float m = T == T_Q4_0 ? -8.0f * d : h2f(*(const u16*)(b + 2));
        const u8* qs = b + (T == T_Q4_0 ? 2 : 4);
        for (int i = 0; i < N; i++) {
            int l = l0 + i;
            v[i] = d * (float)(l < 16 ? qs[l] & 15 : qs[l - 16] >> 4) + m;
        }
    } else if (T == T_Q5_0 || T == T_Q5_1) {
        const u8* b = row + g * (T == T_Q5_0 ? 22 : 24);
        float d = h2f(*(const u16*)b);
        float m = T == T_Q5_0 ? -16.0f * d : h2f(*(const u16*)(b + 2));
        const u8* qhp = b + (T == T_Q5_0 ? 2 : 4);
        u32 qh = (u32)qhp[0] | ((u32)qhp[1] << 8) | ((u32)qhp[2] << 16) | ((u32)qhp[3] << 24);
        const u8* qs = qhp + 4;
        for (int i = 0; i < N; i++) {
            int l = l0 + i;
            int q = l < 16 ? qs[l] & 15 : qs[l - 16] >> 4;
            v[i] = d * (float)(q | (((qh >> l) & 1) << 4)) + m;
        }
    } else if (T == T_Q8_0) {
        const u8* b = row + g * 34;
        float d = h2f(*(const u16*)b);
        for (int i = 0; i < N; i++) v[i] = d * (float)((const i8*)(b + 2))[l0 + i];
    } else if (T == T_Q4_K || T == T_Q5_K) {
        const bool five = T == T_Q5_K;
        int sb = g >> 3, j = g & 7, p = j >> 1, hi = j & 1;
        const u8* b = row + sb * (five ? 176 : 144);
        float d = h2f(*(const u16*)b), dmin = h2f(*(const u16*)(b + 2));
        int sc, m;
        scale_min_k4(j, b + 4, &sc, &m);
        const u8* ql = b + (five ? 48 : 16) + 32 * p;
        const u8* qh = b + 16;
        for (int i = 0; i < N; i++) {
            int l = l0 + i;
            int q = (ql[l] >> (4 * hi)) & 15;
            if (five) q |= ((qh[l] >> j) & 1) << 4;
            v[i] = d * (float)sc * (float)q - dmin * (float)m;
        }
    } else if (T == T_Q6_K) {
        int sb = g >> 3, j = g & 7, h = j >> 2, k = j & 3;
        const u8* b = row + sb * 210;
        const u8* ql = b + 64 * h + ((k & 1) ? 32 : 0);
        const u8* qh = b + 128 + 32 * h;
        const i8* sc = (const i8*)(b + 192) + 8 * h;
        float d = h2f(*(const u16*)(b + 208));
        for (int i = 0; i < N; i++) {
            int l = l0 + i;
            int q = ((ql[l] >> ((k >> 1) * 4)) & 15) | (((qh[l] >> (2 * k)) & 3) << 4);
            v[i] = d * (float)sc[l / 16 + 2 * k] * (float)(q - 32);
        }
    }
}

template <int T>
__device__ __forceinline__ void dq32(const u8* row, int g, float* v) {
    dq_part<T, 32>(row, g, 0, v);
}

// W (n_rows rows of K values) -> f16 rows, one thread per 8 values: consecutive threads write
// consecutive 16-byte pieces of a row (coalesced) and read neighbouring bytes of its blocks.
template <int T>
__device__ __forceinline__ void dequant_f16(const u8* W, u64 row_bytes, int K, int n_rows,
                                            u16* out) {
    u64 gid = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    int n8 = K / 8;
    if (gid >= (u64)n8 * n_rows) return;
    int row = (int)(gid / n8), e = (int)(gid % n8);
    float v[8];
    dq_part<T, 8>(W + (u64)row * row_bytes, e >> 2, (e & 3) * 8, v);
    uint4 o;
    o.x = (u32)f2h(v[0]) | ((u32)f2h(v[1]) << 16);
    o.y = (u32)f2h(v[2]) | ((u32)f2h(v[3]) << 16);
    o.z = (u32)f2h(v[4]) | ((u32)f2h(v[5]) << 16);
    o.w = (u32)f2h(v[6]) | ((u32)f2h(v[7]) << 16);
    *(uint4*)(out + (u64)row * K + 8 * e) = o;
}

// out[t] = row tokens[t] of an embedding table, as f32.
template <int T>
__device__ __forceinline__ void embed(const u8* W, u64 row_bytes, int K, const int* tokens,
                                      int n_tok, float* out) {
    int gid = blockIdx.x * blockDim.x + threadIdx.x;
    int ng = K / 32;
    if (gid >= ng * n_tok) return;
    int t = gid / ng, g = gid % ng;
    float v[32];
    dq32<T>(W + (u64)tokens[t] * row_bytes, g, v);
    for (int l = 0; l < 32; l++) out[(size_t)t * K + 32 * g + l] = v[l];
}

#define DQ(suffix, T)                                                                          \
    extern "C" __global__ void dequant_f16_##suffix(const u8* W, u64 row_bytes, int K,         \
                                                    int n_rows, u16* out) {                    \
        dequant_f16<T>(W, row_bytes, K, n_rows, out);                                          \
    }                                                                                          \
    extern "C" __global__ void embed_##suffix(const u8* W, u64 row_bytes, int K,               \
                                              const int* tokens, int n_tok, float* out) {      \
        embed<T>(W, row_bytes, K, tokens, n_tok, out);                                         \
    }
DQ(f32, T_F32)
DQ(f16, T_F16)
DQ(bf16, T_BF16)
DQ(q4_0, T_Q4_0)
DQ(q4_1, T_Q4_1)
DQ(q5_0, T_Q5_0)
DQ(q5_1, T_Q5_1)
DQ(q8_0, T_Q8_0)
DQ(q4_k, T_Q4_K)
DQ(q5_k, T_Q5_K)
DQ(q6_k, T_Q6_K)
