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

    const int cap = caps[g];
    const int seq = tok_seq[t0], p0 = tok_p0[t0], rs = tok_rs[t0];
    const int imin = tok_pos[t0], imax = tok_pos[t0 + nt - 1];
    const int win = cap - sink;
    const int ns = min(sink, imax + 1);
    const int wlo = max(sink, imin - win + 1);
    const int nw = max(0, imax + 1 - wlo);
    const int nk = ns + nw;
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

    for (int kb = k0; kb < k1; kb += ATT_TK) {
        const int nkt = min(ATT_TK, k1 - kb);
        for (int c = tid; c < ATT_TK * (D / 8); c += ATT_THREADS) {
            int kk = c / (D / 8), part8 = c % (D / 8);
            uint4 kv4 = make_uint4(0, 0, 0, 0), vv4 = make_uint4(0, 0, 0, 0);
            if (kk < nkt) {
                int idx = kb + kk;
                int j = idx < ns ? idx : wlo + (idx - ns);
                const u16 *kp, *vp;
                if (j < p0) {
                    int slot = (j < sink || cap <= sink) ? j : sink + (j - sink) % win;
                    size_t row = (size_t)seq * rows_per_seq + offs[g] + slot;
                    kp = kc + row * D;
                    vp = vc + row * D;
                } else {
                    size_t row = (size_t)(rs + (j - p0));
                    kp = knew + row * ldkv + g * D;
                    vp = vnew + row * ldkv + g * D;
                }
                kv4 = ((const uint4*)kp)[part8];
                vv4 = ((const uint4*)vp)[part8];
            }
            *(uint4*)&sk[kk][part8 * 8] = kv4;
            *(uint4*)&sv[kk][part8 * 8] = vv4;
        }
        __syncthreads();

        const int idx = kb + lane;
        const int j = idx < ns ? idx : wlo + (idx - ns);
#pragma unroll
        for (int ri = 0; ri < ATT_RMAX / ATT_WARPS; ri++) {
            const int r = warp + ATT_WARPS * ri;
            if (r >= R) break;
            const int i = qi[ri];
            float s = NEG_INF;
            if (lane < nkt && j <= i && (j < sink || i - j < win)) {
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
