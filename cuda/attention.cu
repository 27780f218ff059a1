// Span-aware attention (flash-attention style online softmax) over the per-head KV regions of
// src/kv (sinks + ring of C_h slots), the token-exact mask of ../shared/docs/moa-method.md:
// query at position i sees key j iff j <= i and (j < sink or i - j < C_h - sink). Dense
// attention is the layout with C_h = n_ctx and no sinks.
//
// One block = one query tile (up to ATT_RMAX rows: a few tokens of one sequence run x the query
// heads of one KV group, so a K/V tile load serves the whole group) x one KV head x one split of
// the visible keys. Only keys some query of the tile can see are loaded: the sinks and the
// window [lo, i_max]; keys outside every window are never read. Keys of positions below the
// run's first position come from the cache ring; the run's own keys from the f16 staging rows
// (written to the ring after attention, so no query loses a key its run overwrites).
// With several splits each block writes (m, l, acc) and attn_merge combines them.

#define ATT_THREADS 128
#define ATT_WARPS 4
#define ATT_RMAX 16
#define ATT_TK 32
#define ATT_MIN_PER 64


// The keys one block may need, shared by both kernels: for query tokens t0..t0+nt-1 of one run
// (positions imin..imax) and KV head g, the sinks [0, min(sink, imax + 1)) followed by the window
// union [wlo, imax]; key index idx in [0, nk) maps to a position, and a position to its K/V rows
// (the cache ring below the run's first position p0, the run's f16 staging rows from p0 on).
struct KeySpan {
    int cap, sink, win, p0, rs, ns, wlo, nk, ldkv, g;
    size_t region;  // first row of this head's region for the sequence
    const u16 *kc, *vc, *knew, *vnew;

    __device__ __forceinline__ KeySpan(const int* tok_pos, const int* tok_seq, const int* tok_p0,
                                       const int* tok_rs, int t0, int nt, int g_, const int* caps,
                                       const int* offs, int rows_per_seq, int sink_, int ldkv_,
                                       const u16* kc_, const u16* vc_, const u16* knew_,
                                       const u16* vnew_) {
        g = g_;
        cap = caps[g];
        sink = sink_;
        win = cap - sink;
        p0 = tok_p0[t0];
        rs = tok_rs[t0];
        const int imin = tok_pos[t0], imax = tok_pos[t0 + nt - 1];
        ns = min(sink, imax + 1);
        wlo = max(sink, imin - win + 1);
        nk = ns + max(0, imax + 1 - wlo);
        ldkv = ldkv_;
        region = (size_t)tok_seq[t0] * rows_per_seq + offs[g];
        kc = kc_;
        vc = vc_;
        knew = knew_;
        vnew = vnew_;
    }

    // Position of key index idx.
    __device__ __forceinline__ int pos(int idx) const { return idx < ns ? idx : wlo + (idx - ns); }

    // The token-exact mask: may the query at position i see the key at position j?
    __device__ __forceinline__ bool visible(int i, int j) const {
        return j <= i && (j < sink || i - j < win);
    }

    // K and V rows (D halves each) of the key at position j.
    template <int D>
    __device__ __forceinline__ void rows(int j, const u16** kp, const u16** vp) const {
        if (j < p0) {
            const int slot = (j < sink || cap <= sink) ? j : sink + (j - sink) % win;
            *kp = kc + (region + slot) * D;
            *vp = vc + (region + slot) * D;
        } else {
            const size_t row = (size_t)(rs + (j - p0));
            *kp = knew + row * ldkv + g * D;
            *vp = vnew + row * ldkv + g * D;
        }
    }
};

template <int D>
__device__ __forceinline__ void attn_split(
    const float* q, const u16* knew, const u16* vnew, const u16* kc, const u16* vc,
    const int* tok_pos, const int* tok_seq, const int* tok_p0, const int* tok_rs,
    const int2* tiles, int G, int n_head, int n_head_kv, const int* caps, const int* offs,
    int rows_per_seq, int sink, int n_split, float scale, float* out, float* part) {
    constexpr int DPL = D / WARP;  // output dims per lane
    __shared__ float sq[ATT_RMAX][D];
    __shared__ __align__(16) u16 sk[ATT_TK][D + 8];
    __shared__ __align__(16) u16 sv[ATT_TK][D];

    const int tid = threadIdx.x, lane = tid % WARP, warp = tid / WARP;
    const int2 tl = tiles[blockIdx.x];
    const int t0 = tl.x, nt = tl.y, g = blockIdx.y, z = blockIdx.z;
    const int R = nt * G;
    const int ldq = n_head * D, ldkv = n_head_kv * D;

    for (int idx = tid; idx < R * D; idx += ATT_THREADS) {
        int r = idx / D, d = idx % D;
        int t = t0 + r / G, h = g * G + r % G;
        // Queries are rounded to f16 like the keys (as the CPU backend and the reference do).
        sq[r][d] = h2f(f2h(q[(size_t)t * ldq + h * D + d]));
    }

    const KeySpan ks(tok_pos, tok_seq, tok_p0, tok_rs, t0, nt, g, caps, offs, rows_per_seq, sink,
                     ldkv, kc, vc, knew, vnew);
    const int nk = ks.nk;
    // At least ATT_MIN_PER keys per split; splits past the end hold nothing (their empty
    // partials are skipped by the merge), so the grid does not depend on the position.
    const int per = max((nk + n_split - 1) / n_split, ATT_MIN_PER);
    const int k0 = z * per, k1 = min(nk, k0 + per);

    float m[ATT_RMAX / ATT_WARPS], l[ATT_RMAX / ATT_WARPS], acc[ATT_RMAX / ATT_WARPS][DPL];
    int qi[ATT_RMAX / ATT_WARPS];
#pragma unroll
    for (int ri = 0; ri < ATT_RMAX / ATT_WARPS; ri++) {
        m[ri] = NEG_INF;
        l[ri] = 0.0f;
#pragma unroll
        for (int d = 0; d < DPL; d++) acc[ri][d] = 0.0f;
        int r = warp + ATT_WARPS * ri;
        qi[ri] = r < R ? tok_pos[t0 + r / G] : -1;
    }
    __syncthreads();

    // K/V chunks (16 bytes) this thread moves per tile; the next tile's chunks are fetched into
    // registers while the current tile is being used (global loads overlap the math).
    constexpr int CH = ATT_TK * (D / 8) / ATT_THREADS;
    uint4 rk[CH], rv[CH];
    auto fetch = [&](int kb) {
        const int nkt = min(ATT_TK, k1 - kb);
#pragma unroll
        for (int e = 0; e < CH; e++) {
            const int c = tid + e * ATT_THREADS;
            const int kk = c / (D / 8), part8 = c % (D / 8);
            rk[e] = make_uint4(0, 0, 0, 0);
            rv[e] = make_uint4(0, 0, 0, 0);
            if (kk < nkt) {
                const u16 *kp, *vp;
                ks.rows<D>(ks.pos(kb + kk), &kp, &vp);
                rk[e] = ((const uint4*)kp)[part8];
                rv[e] = ((const uint4*)vp)[part8];
            }
        }
    };
    if (k0 < k1) fetch(k0);
    for (int kb = k0; kb < k1; kb += ATT_TK) {
        const int nkt = min(ATT_TK, k1 - kb);
#pragma unroll
        for (int e = 0; e < CH; e++) {
            const int c = tid + e * ATT_THREADS;
            const int kk = c / (D / 8), part8 = c % (D / 8);
            *(uint4*)&sk[kk][part8 * 8] = rk[e];
            *(uint4*)&sv[kk][part8 * 8] = rv[e];
        }
        __syncthreads();
        if (kb + ATT_TK < k1) fetch(kb + ATT_TK);

        const int j = ks.pos(kb + lane);
#pragma unroll
        for (int ri = 0; ri < ATT_RMAX / ATT_WARPS; ri++) {
            const int r = warp + ATT_WARPS * ri;
            if (r >= R) break;
            const int i = qi[ri];
            float s = NEG_INF;
            if (lane < nkt && ks.visible(i, j)) {
                float dot = 0.0f;
#pragma unroll
                for (int c = 0; c < D / 8; c++) {
                    uint4 k8 = *(const uint4*)&sk[lane][c * 8];
                    const float* qq = &sq[r][c * 8];
                    dot += qq[0] * h2f((u16)(k8.x & 0xffff)) + qq[1] * h2f((u16)(k8.x >> 16));
                    dot += qq[2] * h2f((u16)(k8.y & 0xffff)) + qq[3] * h2f((u16)(k8.y >> 16));
                    dot += qq[4] * h2f((u16)(k8.z & 0xffff)) + qq[5] * h2f((u16)(k8.z >> 16));
                    dot += qq[6] * h2f((u16)(k8.w & 0xffff)) + qq[7] * h2f((u16)(k8.w >> 16));
                }
                s = dot * scale;
            }
            const float mt = warp_max(s);
            const float mnew = fmaxf(m[ri], mt);
            if (mnew == NEG_INF) continue;  // warp-uniform: nothing visible yet
            const float alpha = m[ri] == NEG_INF ? 0.0f : expf(m[ri] - mnew);
            const float p = s == NEG_INF ? 0.0f : expf(s - mnew);
            l[ri] = l[ri] * alpha + warp_sum(p);
#pragma unroll
            for (int d = 0; d < DPL; d++) acc[ri][d] *= alpha;
            for (int k = 0; k < nkt; k++) {
                const float pk = __shfl_sync(0xffffffffu, p, k);
#pragma unroll
                for (int d = 0; d < DPL; d++) acc[ri][d] += pk * h2f(sv[k][lane * DPL + d]);
            }
            m[ri] = mnew;
        }
        __syncthreads();
    }

#pragma unroll
    for (int ri = 0; ri < ATT_RMAX / ATT_WARPS; ri++) {
        const int r = warp + ATT_WARPS * ri;
        if (r >= R) break;
        const int t = t0 + r / G, h = g * G + r % G;
        if (n_split == 1) {
            const float inv = l[ri] > 0.0f ? 1.0f / l[ri] : 0.0f;
#pragma unroll
            for (int d = 0; d < DPL; d++) out[(size_t)t * ldq + h * D + lane * DPL + d] = acc[ri][d] * inv;
        } else {
            float* pp = part + (((size_t)t * n_head + h) * n_split + z) * (D + 2);
#pragma unroll
            for (int d = 0; d < DPL; d++) pp[lane * DPL + d] = acc[ri][d];
            if (lane == 0) {
                pp[D] = m[ri];
                pp[D + 1] = l[ri];
            }
        }
    }
}

#define ATTN(name, D)                                                                          \
    extern "C" __global__ void __launch_bounds__(ATT_THREADS) name(                            \
        const float* q, const u16* knew, const u16* vnew, const u16* kc, const u16* vc,        \
        const int* tok_pos, const int* tok_seq, const int* tok_p0, const int* tok_rs,          \
        const int2* tiles, int G, int n_head, int n_head_kv, const int* caps, const int* offs, \
        int rows_per_seq, int sink, int n_split, float scale, float* out, float* part) {       \
        attn_split<D>(q, knew, vnew, kc, vc, tok_pos, tok_seq, tok_p0, tok_rs, tiles, G,       \
                      n_head, n_head_kv, caps, offs, rows_per_seq, sink, n_split, scale, out,  \
                      part);                                                                   \
    }
ATTN(attn_d64, 64)
ATTN(attn_d128, 128)

// Combines the splits of each (token, head) row: one block of D threads per row.
extern "C" __global__ void attn_merge(const float* part, int n_split, int D, float* out) {
    const size_t row = blockIdx.x;
    const float* pp = part + row * n_split * (D + 2);
    float M = NEG_INF;
    for (int z = 0; z < n_split; z++) M = fmaxf(M, pp[z * (D + 2) + D]);
    float L = 0.0f, o = 0.0f;
    if (M != NEG_INF) {
        for (int z = 0; z < n_split; z++) {
            const float mz = pp[z * (D + 2) + D];
            if (mz == NEG_INF) continue;
            const float w = expf(mz - M);
            L += w * pp[z * (D + 2) + D + 1];
            o += w * pp[z * (D + 2) + threadIdx.x];
        }
    }
    out[row * D + threadIdx.x] = L > 0.0f ? o / L : 0.0f;
}

// ---- prefill: tensor-core flash attention -----------------------------------------------------
// One block = 64 query rows (tokens x the query heads of one KV group, token-major) x one KV
// head; 4 warps of 16 rows. S = Q K^T and O += P V run on mma.sync m16n8k16 (f16 in, f32
// accumulate); the online softmax works on the accumulator fragments. Keys stream through
// shared memory 64 at a time over the same visible range as the split kernel (sinks + window
// union of the block's tokens); the mask is exact per element.

#define TC_ROWS 64
#define TC_KEYS 64

__device__ __forceinline__ void mma16816(float* c, const u32* a, u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// B fragment (16 keys x 8 dims) of m16n8k16 from row-major V rows in shared memory.
__device__ __forceinline__ void ldsm_x2_trans(u32& b0, u32& b1, const u16* p) {
    u32 a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];"
                 : "=r"(b0), "=r"(b1)
                 : "r"(a));
}

__device__ __forceinline__ u32 pack_h2(float lo, float hi) {
    u32 r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

template <int D>
__device__ __forceinline__ void attn_tc(
    const float* q, const u16* knew, const u16* vnew, const u16* kc, const u16* vc,
    const int* tok_pos, const int* tok_seq, const int* tok_p0, const int* tok_rs,
    const int2* tiles, int G, int n_head, int n_head_kv, const int* caps, const int* offs,
    int rows_per_seq, int sink, float scale, float* out) {
    constexpr int KS = D + 8;  // K and V tile row stride (halves): conflict-free fragment loads
    // Q staging (64 x KS) is reused for the K tile (64 x KS) after the fragments are loaded.
    __shared__ __align__(16) u16 sk[TC_KEYS * KS];
    __shared__ __align__(16) u16 sv[TC_KEYS * KS];

    const int tid = threadIdx.x, lane = tid % WARP, warp = tid / WARP;
    const int gq = lane >> 2, cq = lane & 3;
    const int2 tl = tiles[blockIdx.x];
    const int t0 = tl.x, nt = tl.y, g = blockIdx.y;
    const int R = nt * G;
    const int ldq = n_head * D, ldkv = n_head_kv * D;

    for (int idx = tid; idx < TC_ROWS * D; idx += blockDim.x) {
        int r = idx / D, d = idx % D;
        float v = 0.0f;
        if (r < R) v = q[(size_t)(t0 + r / G) * ldq + (g * G + r % G) * D + d];
        sk[r * KS + d] = f2h(v);
    }
    __syncthreads();
    u32 qa[D / 16][4];
    {
        const int r0 = warp * 16 + gq;
#pragma unroll
        for (int kk = 0; kk < D / 16; kk++) {
            qa[kk][0] = *(const u32*)&sk[r0 * KS + 16 * kk + 2 * cq];
            qa[kk][1] = *(const u32*)&sk[(r0 + 8) * KS + 16 * kk + 2 * cq];
            qa[kk][2] = *(const u32*)&sk[r0 * KS + 16 * kk + 8 + 2 * cq];
            qa[kk][3] = *(const u32*)&sk[(r0 + 8) * KS + 16 * kk + 8 + 2 * cq];
        }
    }
    // Query positions of this thread's two rows (-1: padding row, sees nothing).
    int qi[2];
#pragma unroll
    for (int h2 = 0; h2 < 2; h2++) {
        int r = warp * 16 + gq + 8 * h2;
        qi[h2] = r < R ? tok_pos[t0 + r / G] : -1;
    }

    const KeySpan ks(tok_pos, tok_seq, tok_p0, tok_rs, t0, nt, g, caps, offs, rows_per_seq, sink,
                     ldkv, kc, vc, knew, vnew);
    const int nk = ks.nk;

    float m[2] = {NEG_INF, NEG_INF}, l[2] = {0.0f, 0.0f};
    float o[D / 8][4];
#pragma unroll
    for (int j = 0; j < D / 8; j++) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.0f;

    for (int kb = 0; kb < nk; kb += TC_KEYS) {
        const int nkt = min(TC_KEYS, nk - kb);
        __syncthreads();  // previous tile (or the Q staging) fully consumed
        for (int c = tid; c < TC_KEYS * (D / 8); c += blockDim.x) {
            int kk = c / (D / 8), part8 = c % (D / 8);
            uint4 kv4 = make_uint4(0, 0, 0, 0), vv4 = make_uint4(0, 0, 0, 0);
            if (kk < nkt) {
                const u16 *kp, *vp;
                ks.rows<D>(ks.pos(kb + kk), &kp, &vp);
                kv4 = ((const uint4*)kp)[part8];
                vv4 = ((const uint4*)vp)[part8];
            }
            *(uint4*)&sk[kk * KS + part8 * 8] = kv4;
            *(uint4*)&sv[kk * KS + part8 * 8] = vv4;
        }
        __syncthreads();

        // S = Q K^T for this warp's 16 rows x 64 keys.
        float s[TC_KEYS / 8][4];
#pragma unroll
        for (int j = 0; j < TC_KEYS / 8; j++) {
            s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
#pragma unroll
            for (int kk = 0; kk < D / 16; kk++) {
                const u16* kr = &sk[(8 * j + gq) * KS + 16 * kk + 2 * cq];
                mma16816(s[j], qa[kk], *(const u32*)kr, *(const u32*)(kr + 8));
            }
        }
        // Mask, scale, tile row maxima.
        float mt[2] = {NEG_INF, NEG_INF};
#pragma unroll
        for (int j = 0; j < TC_KEYS / 8; j++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int n = 8 * j + 2 * cq + (e & 1);
                const bool vis = n < nkt && ks.visible(qi[e >> 1], ks.pos(kb + n));
                s[j][e] = vis ? s[j][e] * scale : NEG_INF;
                mt[e >> 1] = fmaxf(mt[e >> 1], s[j][e]);
            }
        }
        float alpha[2];
#pragma unroll
        for (int h2 = 0; h2 < 2; h2++) {
            mt[h2] = fmaxf(mt[h2], __shfl_xor_sync(0xffffffffu, mt[h2], 1));
            mt[h2] = fmaxf(mt[h2], __shfl_xor_sync(0xffffffffu, mt[h2], 2));
            const float mnew = fmaxf(m[h2], mt[h2]);
            alpha[h2] = (m[h2] == NEG_INF) ? 0.0f : expf(m[h2] - mnew);
            m[h2] = mnew;
            l[h2] *= alpha[h2];
        }
#pragma unroll
        for (int j = 0; j < D / 8; j++) {
            o[j][0] *= alpha[0];
            o[j][1] *= alpha[0];
            o[j][2] *= alpha[1];
            o[j][3] *= alpha[1];
        }
        // P = exp(S - m) as f16 A fragments; O += P V.
        u32 pa[TC_KEYS / 16][4];
#pragma unroll
        for (int j = 0; j < TC_KEYS / 8; j++) {
            float p[4];
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const float mm = m[e >> 1];
                p[e] = (s[j][e] == NEG_INF || mm == NEG_INF) ? 0.0f : expf(s[j][e] - mm);
                l[e >> 1] += p[e];
            }
            pa[j >> 1][(j & 1) * 2 + 0] = pack_h2(p[0], p[1]);
            pa[j >> 1][(j & 1) * 2 + 1] = pack_h2(p[2], p[3]);
        }
#pragma unroll
        for (int kk = 0; kk < TC_KEYS / 16; kk++) {
#pragma unroll
            for (int j = 0; j < D / 8; j++) {
                u32 b0, b1;
                ldsm_x2_trans(b0, b1, &sv[(16 * kk + (lane & 15)) * KS + 8 * j]);
                mma16816(o[j], pa[kk], b0, b1);
            }
        }
    }

    // Row sums across the quad, then write the rows that exist.
#pragma unroll
    for (int h2 = 0; h2 < 2; h2++) {
        l[h2] += __shfl_xor_sync(0xffffffffu, l[h2], 1);
        l[h2] += __shfl_xor_sync(0xffffffffu, l[h2], 2);
    }
#pragma unroll
    for (int h2 = 0; h2 < 2; h2++) {
        const int r = warp * 16 + gq + 8 * h2;
        if (r >= R) continue;
        const int t = t0 + r / G, h = g * G + r % G;
        const float inv = l[h2] > 0.0f ? 1.0f / l[h2] : 0.0f;
        float* op = out + (size_t)t * ldq + h * D;
#pragma unroll
        for (int j = 0; j < D / 8; j++) {
            op[8 * j + 2 * cq] = o[j][2 * h2] * inv;
            op[8 * j + 2 * cq + 1] = o[j][2 * h2 + 1] * inv;
        }
    }
}

#define ATTN_TC(name, D)                                                                       \
    extern "C" __global__ void __launch_bounds__(128) name(                                    \
        const float* q, const u16* knew, const u16* vnew, const u16* kc, const u16* vc,        \
        const int* tok_pos, const int* tok_seq, const int* tok_p0, const int* tok_rs,          \
        const int2* tiles, int G, int n_head, int n_head_kv, const int* caps, const int* offs, \
        int rows_per_seq, int sink, float scale, float* out) {                                 \
        attn_tc<D>(q, knew, vnew, kc, vc, tok_pos, tok_seq, tok_p0, tok_rs, tiles, G, n_head,  \
                   n_head_kv, caps, offs, rows_per_seq, sink, scale, out);                     \
    }
ATTN_TC(attn_tc_d64, 64)
ATTN_TC(attn_tc_d128, 128)
