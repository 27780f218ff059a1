// Span-aware attention (flash-attention style online softmax on tensor cores) over the
// per-head KV regions of src/kv (sinks + ring of C_h slots), the token-exact mask of
// ../shared/docs/moa-method.md: query at position i sees key j iff j <= i and (j < sink or
// i - j < C_h - sink). Dense attention is the layout with C_h = n_ctx and no sinks.
//
// One block = one query tile (a few tokens of one sequence run x the query heads of one KV
// group, token-major, so a K/V tile load serves the whole group) x one KV head x one split of
// the visible keys. Only keys some query of the tile can see are loaded: the sinks and the
// window [lo, i_max]; keys outside every window are never read. Keys of positions below the
// run's first position come from the cache ring; the run's own keys from the f16 staging rows
// (written to the ring after attention, so no query loses a key its run overwrites).
// Keys stream through shared memory FA_KEYS at a time with cp.async in FA_STAGES stages (the
// next tiles load while the current one is used). Two shapes of the same kernel:
//   - attn_dec_*: decode (up to 16 query rows): the 4 warps share the rows and split each key
//     tile (16 keys each), then combine their softmax states in shared memory;
//   - attn_pre_*: prefill (up to 64 rows): each warp owns 16 rows and all keys of the tile.
// With several splits each block writes (acc, m, l) and attn_merge combines them.

#define FA_THREADS 128
#define FA_KEYS 64
#ifndef FA_STAGES  // set by the host per architecture (kernels.rs: fa_stages)
#define FA_STAGES 3
#endif
#define FA_MIN_PER 128

// 2^x (PTX ex2.approx: relative error about 2^-22; 2^-inf = 0). The softmax runs in base 2
// with the scale pre-multiplied by log2(e), and the partial maxima are kept in that domain.
__device__ __forceinline__ float ex2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}


// The keys one block may need, shared by both kernels: for query tokens t0..t0+nt-1 of one run
// (positions imin..imax) and KV head g, the sinks [0, min(sink, imax + 1)) followed by the window
// union [wlo, imax]; key index idx in [0, nk) maps to a position, and a position to its K/V rows
// (the cache ring below the run's first position p0, the run's f16 staging rows from p0 on).
struct KeySpan {
    int cap, sink, win, p0, rs, ns, wlo, nk, ldkv, g, imin, imax;
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
        imin = tok_pos[t0];
        imax = tok_pos[t0 + nt - 1];
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

    // Whether every query of the block (positions imin..imax) sees all n keys from index kb on:
    // then the tile needs no mask (all tiles but the edges of the causal diagonal and the
    // windows).
    __device__ __forceinline__ bool tile_visible(int kb, int n) const {
        if (pos(kb + n - 1) > imin) return false;      // causal: the newest key
        if (kb + n <= ns) return true;                  // sinks only
        const int jlo = kb >= ns ? pos(kb) : wlo;       // the oldest key past the sinks
        return imax - jlo < win;
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

// Combines the splits of each (token, head) row: one block of GR x D threads per row. Up to
// GR x MERGE_ONE_PASS splits (the decode steps: about 33 at batch 1) in one pass: each group of
// D threads loads every GR-th split's maximum, weight and output at once, and the groups meet in
// shared memory for the maximum and for the sums. More splits: the maxima and weights go
// through shared memory first; then each group sums every GR-th split's output (independent,
// coalesced loads) and group 0 adds the GR sums. Decode steps have few rows and tens of splits
// (latency bound: GR = 4, `attn_merge_wide`), prefill many rows and few splits (GR = 1,
// `attn_merge`). With `yq`, the output also goes to q8_1 (the input of the output projection:
// rows of n_head x D values, so each warp's 32 values are one q8_1 block).
#define MERGE_GROUPS 4
#define MERGE_MAX_SPLIT 1024
#define MERGE_ONE_PASS 16
template <int GR>
__device__ __forceinline__ void attn_merge_rows(const float* part, int n_split, int D, float* out,
                                                i8* yq, float2* yds) {
    pdl_wait();  // a programmatic dependent: wait first, then let the next one launch
    pdl_trigger();
    __shared__ float wz[MERGE_MAX_SPLIT];
    __shared__ float red[2][GR * 8];
    __shared__ float osum[GR][256];  // D <= 256
    const size_t row = blockIdx.x;
    const int tid = threadIdx.x, nth = blockDim.x, lane = tid % WARP, warp = tid / WARP;
    const int nwarp = nth / WARP;
    const float* pp = part + row * n_split * (D + 2);
    if (n_split <= GR * MERGE_ONE_PASS) {
        // Up to MERGE_ONE_PASS splits per thread group member: every load (each split's
        // maximum, weight and this thread's output value) is issued at once, so the merge waits
        // for memory once instead of three times (the maxima, then the weights, then the
        // outputs).
        const int grp = tid / D, d = tid % D;
        float mz[MERGE_ONE_PASS], lz[MERGE_ONE_PASS], az[MERGE_ONE_PASS];
#pragma unroll
        for (int k = 0; k < MERGE_ONE_PASS; k++) {
            const int z = grp + k * GR;
            const float* pz = pp + (size_t)z * (D + 2);
            mz[k] = z < n_split ? pz[D] : NEG_INF;
            lz[k] = z < n_split ? pz[D + 1] : 0.0f;
            az[k] = z < n_split ? pz[d] : 0.0f;
        }
        float mx = NEG_INF;
#pragma unroll
        for (int k = 0; k < MERGE_ONE_PASS; k++) mx = fmaxf(mx, mz[k]);
        if (GR > 1) {
            if (d == 0) red[0][grp] = mx;
            __syncthreads();
            for (int g = 0; g < GR; g++) mx = fmaxf(mx, red[0][g]);
        }
        float o = 0.0f, ls = 0.0f;
#pragma unroll
        for (int k = 0; k < MERGE_ONE_PASS; k++) {
            const float w = (mz[k] == NEG_INF) ? 0.0f : ex2(mz[k] - mx);
            o += w * az[k];
            ls += w * lz[k];
        }
        if (GR > 1) {
            if (grp > 0) osum[grp - 1][d] = o;
            if (d == 0) red[1][grp] = ls;
            __syncthreads();
            if (grp > 0) return;
            for (int g = 0; g < GR - 1; g++) o += osum[g][d];
            ls = 0.0f;
            for (int g = 0; g < GR; g++) ls += red[1][g];
        }
        const float v = ls > 0.0f ? o / ls : 0.0f;
        const size_t i = row * D + d;
        out[i] = v;
        if (yq) q8_1_lane(v, yq + (i & ~(size_t)31), yds + (i >> 5), lane);
        return;
    }
    float mx = NEG_INF;
    for (int z = tid; z < n_split; z += nth) mx = fmaxf(mx, pp[z * (D + 2) + D]);
    mx = warp_max(mx);
    if (lane == 0) red[0][warp] = mx;
    __syncthreads();
    float M = NEG_INF;
    for (int w = 0; w < nwarp; w++) M = fmaxf(M, red[0][w]);
    float ls = 0.0f;
    for (int z = tid; z < n_split; z += nth) {
        const float mz = pp[z * (D + 2) + D];
        const float w = (mz == NEG_INF) ? 0.0f : ex2(mz - M);
        wz[z] = w;
        ls += w * pp[z * (D + 2) + D + 1];
    }
    ls = warp_sum(ls);
    if (lane == 0) red[1][warp] = ls;
    __syncthreads();
    float L = 0.0f;
    for (int w = 0; w < nwarp; w++) L += red[1][w];
    const int grp = tid / D, d = tid % D;
    float o[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    int z = grp;
    for (; z + 3 * GR < n_split; z += 4 * GR) {
#pragma unroll
        for (int u = 0; u < 4; u++) {
            const int zu = z + u * GR;
            o[u] += wz[zu] * pp[zu * (D + 2) + d];
        }
    }
    for (; z < n_split; z += GR) o[0] += wz[z] * pp[z * (D + 2) + d];
    float acc = (o[0] + o[1]) + (o[2] + o[3]);
    if (GR > 1) {
        if (grp > 0) osum[grp - 1][d] = acc;
        __syncthreads();
        if (grp > 0) return;
        for (int g = 0; g < GR - 1; g++) acc += osum[g][d];
    }
    const float v = L > 0.0f ? acc / L : 0.0f;
    const size_t i = row * D + d;
    out[i] = v;
    if (yq) q8_1_lane(v, yq + (i & ~(size_t)31), yds + (i >> 5), lane);
}

// The merges run right before the output projection, after the decode attention has streamed
// its K/V through L2: their L2 prefetch blocks (PF_PARAMS, after the rows' blocks) fetch the
// projection's first weights again, where the fetch RoPE issued before the attention may have
// been evicted.
extern "C" __global__ void attn_merge(const float* part, int n_split, int D, float* out, i8* yq,
                                      float2* yds, PF_PARAMS) {
    if (l2_prefetch_block(PF_ARGS)) return;
    attn_merge_rows<1>(part, n_split, D, out, yq, yds);
}

extern "C" __global__ void attn_merge_wide(const float* part, int n_split, int D, float* out,
                                           i8* yq, float2* yds, PF_PARAMS) {
    if (l2_prefetch_block(PF_ARGS)) return;
    attn_merge_rows<MERGE_GROUPS>(part, n_split, D, out, yq, yds);
}

// ---- tensor-core helpers ----------------------------------------------------------------------
// S = Q K^T and O += P V run on mma.sync m16n8k16 (f16 in, f32 accumulate); the online softmax
// works on the accumulator fragments.

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


// Shared memory of one block (bytes): FA_STAGES x (K tile + V tile), then (q8_0 caches only)
// the f16 tiles the q8_0 ones are converted into. An f16 tile holds FA_KEYS rows padded to D + 8
// halves so fragment loads are conflict-free; a q8_0 tile holds the rows' blocks as they are
// stored (RB = D / 32 x 34 bytes per row), so a q8_0 cache moves 0.53x the bytes of f16. The
// host passes the same figure at launch (kernels.rs: fa_smem_bytes).
template <int D, bool KQ, bool VQ>
struct FaSmem {
    static constexpr int KS = D + 8;
    static constexpr int RB = D / 32 * 34;
    static constexpr int TILE16 = FA_KEYS * KS * 2;
    static constexpr int TILE8 = FA_KEYS * RB;
    static constexpr int KPART = KQ ? TILE8 : TILE16;
    static constexpr int VPART = VQ ? TILE8 : TILE16;
    static constexpr int STAGE = KPART + VPART;
    static constexpr int CONV = (KQ ? TILE16 : 0) + (VQ ? TILE16 : 0);
    static constexpr int BYTES = FA_STAGES * STAGE + CONV;
};

// `N`-byte asynchronous copy global -> shared (N = 4, 8 or 16; both addresses N-aligned);
// `bytes` 0 zero-fills the destination.
template <int N>
__device__ __forceinline__ void cp_async_n(void* dst, const void* src, int bytes) {
    if constexpr (N == 16) {
        cp_async16(dst, src, bytes);
    } else {
        asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;" ::"r"(smem_addr(dst)),
                     "l"(src), "n"(N), "r"(bytes)
                     : "memory");
    }
}

// Starts the copy of the K or the V rows of one key tile (keys kb .. kb + nkt - 1 of the span;
// rows up to FA_KEYS zero-filled) into `dst`: f16 rows (`Q` false; padded to D + 8 halves) or
// q8_0 rows (`Q`; RB bytes each, 17 copies of D / 16 bytes, the largest size a row's alignment
// allows: RB = 68 or 136). Cached keys come from `cache` (row = region + slot), the run's own
// keys from `stage` (token rows of n_head_kv head rows, as the cache stores them). `ring`: the
// whole tile is consecutive window keys of the cache, from slot s0 with at most one wrap.
template <int D, bool Q>
__device__ __forceinline__ void fa_load_part(u8* dst, const KeySpan& ks, int kb, int nkt,
                                             bool ring, int s0, const u8* cache, const u8* stage,
                                             int tid) {
    constexpr int RB = Q ? D / 32 * 34 : 2 * D;  // bytes of a row in global memory
    constexpr int CH = Q ? D / 16 : 16;          // bytes per copy
    constexpr int NCH = RB / CH;                 // copies per row
    constexpr int DS = Q ? RB : 2 * (D + 8);     // bytes of a row in shared memory
    const size_t ld_stage = (size_t)(ks.ldkv / D) * RB;
    for (int idx = tid; idx < FA_KEYS * NCH; idx += FA_THREADS) {
        const int kk = idx / NCH, c = idx % NCH;
        const u8* src = cache;
        int bytes = 0;
        if (kk < nkt) {
            if (ring) {
                int slot = s0 + kk;
                if (slot >= ks.cap) slot -= ks.win;
                src = cache + (ks.region + slot) * RB;
            } else {
                const int j = ks.pos(kb + kk);
                if (j < ks.p0) {
                    const int slot =
                        (j < ks.sink || ks.cap <= ks.sink) ? j : ks.sink + (j - ks.sink) % ks.win;
                    src = cache + (ks.region + slot) * RB;
                } else {
                    src = stage + (size_t)(ks.rs + (j - ks.p0)) * ld_stage + (size_t)ks.g * RB;
                }
            }
            src += c * CH;
            bytes = CH;
        }
        cp_async_n<CH>(dst + kk * DS + c * CH, src, bytes);
    }
}

// Converts rows r0 .. r0 + ROWS - 1 of a landed q8_0 tile (rows of RB bytes) into f16 rows of
// D + 8 halves, by NT threads (this one: tid): value d * q (exact in f32) rounded to f16. One
// unit = 8 values of a row (a quarter of a block).
template <int D, int ROWS, int NT>
__device__ __forceinline__ void fa_q8_to_f16(const u8* src, u16* dst, int r0, int tid) {
    constexpr int RB = D / 32 * 34, KS = D + 8, UPR = D / 8;
    for (int u = tid; u < ROWS * UPR; u += NT) {
        const int kk = r0 + u / UPR, e = u % UPR;
        const u8* blk = src + kk * RB + (e >> 2) * 34;
        const float d = h2f(*(const u16*)blk);
        const u16* qs = (const u16*)(blk + 2 + (e & 3) * 8);  // 2-byte aligned only
        u32 w[4];
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const u32 two = qs[i];
            const float a = d * (float)(int)(i8)(two & 0xffu);
            const float b = d * (float)(int)(i8)(two >> 8);
            w[i] = pack_h2(a, b);
        }
        *(uint4*)(dst + kk * KS + 8 * e) = make_uint4(w[0], w[1], w[2], w[3]);
    }
}

// WK: warps splitting each key tile (4: decode, 16 rows per block; 1: prefill, 64 rows).
// KQ / VQ: the K / V cache and staging rows are q8_0 blocks (else f16); kc, vc, knew, vnew then
// point at bytes, whatever their declared type.
template <int D, int WK, bool KQ, bool VQ>
__device__ __forceinline__ void attn_fa(
    const float* q, const u16* knew, const u16* vnew, const u16* kc, const u16* vc,
    const int* tok_pos, const int* tok_seq, const int* tok_p0, const int* tok_rs,
    const int2* tiles, int G, int n_head, int n_head_kv, const int* caps, const int* offs,
    int rows_per_seq, int sink, int n_split, float scale, float* out, float* part, i8* yq,
    float2* yds) {
    using SM = FaSmem<D, KQ, VQ>;
    constexpr int KS = SM::KS;
    constexpr int STAGE = SM::STAGE / 2;  // halves (all-f16 path)
    constexpr int WR = 4 / WK;        // warps along the rows
    constexpr int KW = FA_KEYS / WK;  // keys per warp per tile
    constexpr int CPR = D / 8;        // 16-byte chunks per K or V row
    extern __shared__ __align__(16) u16 fa_smem[];
    u8* const smem8 = (u8*)fa_smem;
    // q8_0 tiles are converted here (K first, then V) before the tensor-core code reads them.
    u16* const conv_k = (u16*)(smem8 + FA_STAGES * SM::STAGE);
    u16* const conv_v = (u16*)(smem8 + FA_STAGES * SM::STAGE + (KQ ? SM::TILE16 : 0));

    const int tid = threadIdx.x, lane = tid % WARP, warp = tid / WARP;
    const int wr = warp / WK, wk = warp % WK;
    const int gq = lane >> 2, cq = lane & 3;
    // The step's metadata (tiles, positions, sequences: uploaded before the step) and the
    // layer's head tables are not written by the kernel before, so they are read before
    // waiting on it: only the queries and the run's own keys come from there.
    const int2 tl = tiles[blockIdx.x];
    const int t0 = tl.x, nt = tl.y, g = blockIdx.y, z = blockIdx.z;
    const int R = nt * G;
    const int ldq = n_head * D, ldkv = n_head_kv * D;
    const float scale2 = scale * 1.4426950408889634f;  // base-2 softmax
    // Query positions of this thread's two rows (-1: padding row, sees nothing).
    int qi[2];
#pragma unroll
    for (int h2 = 0; h2 < 2; h2++) {
        const int r = wr * 16 + gq + 8 * h2;
        qi[h2] = r < R ? tok_pos[t0 + r / G] : -1;
    }
    const KeySpan ks(tok_pos, tok_seq, tok_p0, tok_rs, t0, nt, g, caps, offs, rows_per_seq, sink,
                     ldkv, kc, vc, knew, vnew);
    const int nk = ks.nk;
    // Whole tiles per split (at least FA_MIN_PER keys); splits past the end hold nothing (their
    // empty partials are skipped by the merge), so the grid does not depend on the position.
    int per = (nk + n_split - 1) / n_split;
    per = max((per + FA_KEYS - 1) / FA_KEYS * FA_KEYS, FA_MIN_PER);
    const int k0 = z * per, k1 = min(nk, k0 + per);
    const int n_kt = k0 < k1 ? (k1 - k0 + FA_KEYS - 1) / FA_KEYS : 0;

    // Starts the copy of key tile `it` into its stage (one commit group per call, empty past
    // the end so the group count stays uniform). Keys past the split's end are zero-filled.
    auto issue = [&](int it) {
        if constexpr (KQ || VQ) {
            if (it < n_kt) {
                const int kb = k0 + it * FA_KEYS, nkt = min(FA_KEYS, k1 - kb);
                u8* st = smem8 + (it % FA_STAGES) * SM::STAGE;
                const bool ring = nkt == FA_KEYS && kb >= ks.ns && ks.win >= FA_KEYS &&
                                  ks.pos(kb + FA_KEYS - 1) < ks.p0;
                const int s0 = ring ? ks.sink + (ks.pos(kb) - ks.sink) % ks.win : 0;
                fa_load_part<D, KQ>(st, ks, kb, nkt, ring, s0, (const u8*)kc, (const u8*)knew,
                                    tid);
                fa_load_part<D, VQ>(st + SM::KPART, ks, kb, nkt, ring, s0, (const u8*)vc,
                                    (const u8*)vnew, tid);
            }
            cp_async_commit();
            return;
        }
        if (it < n_kt) {
            const int kb = k0 + it * FA_KEYS, nkt = min(FA_KEYS, k1 - kb);
            u16* sk = fa_smem + (it % FA_STAGES) * STAGE;
            u16* sv = sk + FA_KEYS * KS;
            // This thread copies 16-byte part `part8` of keys kk0, kk0 + KSTEP, ...
            constexpr int KSTEP = FA_THREADS / CPR;
            const int kk0 = tid / CPR, part8 = tid % CPR;
            // A whole tile of cached window keys (the common case): consecutive positions, so
            // consecutive ring slots with at most one wrap per step; one modulo per tile.
            const bool ring = nkt == FA_KEYS && kb >= ks.ns && ks.win >= FA_KEYS &&
                              ks.pos(kb + FA_KEYS - 1) < ks.p0;
            int slot = ring ? ks.sink + (ks.pos(kb + kk0) - ks.sink) % ks.win : 0;
#pragma unroll
            for (int e = 0; e < FA_KEYS / KSTEP; e++) {
                const int kk = kk0 + e * KSTEP;
                const u16 *kp = knew, *vp = vnew;
                int bytes = 0;
                if (ring) {
                    if (slot >= ks.cap) slot -= ks.win;
                    kp = kc + (ks.region + slot) * D;
                    vp = vc + (ks.region + slot) * D;
                    slot += KSTEP;
                    bytes = 16;
                } else if (kk < nkt) {
                    ks.rows<D>(ks.pos(kb + kk), &kp, &vp);
                    bytes = 16;
                }
                if (bytes) {
                    kp += part8 * 8;
                    vp += part8 * 8;
                }
                cp_async16(sk + kk * KS + part8 * 8, kp, bytes);
                cp_async16(sv + kk * KS + part8 * 8, vp, bytes);
            }
        }
        cp_async_commit();
    };
    // The first tiles that hold only cached keys (positions below the run's first) do not
    // depend on the kernel before, which writes the queries and the run's own rows (and, when
    // decoding, ring slots of keys no query here sees), so they load before the wait.
    int pre = 0;
    for (; pre < FA_STAGES - 1 && pre < n_kt; pre++) {
        const int kb = k0 + pre * FA_KEYS, nkt = min(FA_KEYS, k1 - kb);
        if (ks.pos(kb + nkt - 1) >= ks.p0) break;
        issue(pre);
    }
    pdl_wait();  // a programmatic dependent: wait first, then let the next one launch
    pdl_trigger();
    for (int st = pre; st < FA_STAGES - 1; st++) issue(st);
    // Queries, rounded to f16, straight into A fragments: this thread's rows r0 and r0 + 8,
    // columns 16 kk + 2 cq (+1) and 16 kk + 8 + 2 cq (+1); padding rows are zero.
    u32 qa[D / 16][4];
    {
        const float* qr[2];
#pragma unroll
        for (int h2 = 0; h2 < 2; h2++) {
            const int r = wr * 16 + gq + 8 * h2;
            qr[h2] = r < R ? q + (size_t)(t0 + r / G) * ldq + (g * G + r % G) * D : nullptr;
        }
        auto pair = [&](int h2, int c) -> u32 {
            if (!qr[h2]) return 0u;
            const float2 v = *(const float2*)(qr[h2] + c);
            return (u32)f2h(v.x) | ((u32)f2h(v.y) << 16);
        };
#pragma unroll
        for (int kk = 0; kk < D / 16; kk++) {
            qa[kk][0] = pair(0, 16 * kk + 2 * cq);
            qa[kk][1] = pair(1, 16 * kk + 2 * cq);
            qa[kk][2] = pair(0, 16 * kk + 8 + 2 * cq);
            qa[kk][3] = pair(1, 16 * kk + 8 + 2 * cq);
        }
    }

    float m[2] = {NEG_INF, NEG_INF}, l[2] = {0.0f, 0.0f};
    float o[D / 8][4];
#pragma unroll
    for (int j = 0; j < D / 8; j++) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.0f;

    for (int it = 0; it < n_kt; it++) {
        cp_async_wait<FA_STAGES - 2>();  // tile `it` has landed (this thread's part)
        __syncthreads();                 // ... everyone's; and tile it - 1 is fully consumed
        issue(it + FA_STAGES - 1);       // into the stage tile it - 1 used
        const int kb = k0 + it * FA_KEYS, nkt = min(FA_KEYS, k1 - kb);
        const u16* sk = fa_smem + (it % FA_STAGES) * STAGE;
        const u16* sv = sk + FA_KEYS * KS;
        const int kw0 = wk * KW;  // this warp's first key in the tile
        if constexpr (KQ || VQ) {
            // q8_0 parts to f16. The stage read here is refilled only after the next barrier.
            // Prefill (one warp along the keys): the whole tile by the block, then a barrier
            // (the conversion buffers were last read before the barrier above). Decode: each
            // warp converts the KW keys it alone reads, so a warp barrier is enough.
            const u8* st = smem8 + (it % FA_STAGES) * SM::STAGE;
            sk = (const u16*)st;
            sv = (const u16*)(st + SM::KPART);
            if constexpr (KQ) sk = conv_k;
            if constexpr (VQ) sv = conv_v;
            if constexpr (WK == 1) {
                if constexpr (KQ) fa_q8_to_f16<D, FA_KEYS, FA_THREADS>(st, conv_k, 0, tid);
                if constexpr (VQ) {
                    fa_q8_to_f16<D, FA_KEYS, FA_THREADS>(st + SM::KPART, conv_v, 0, tid);
                }
                __syncthreads();
            } else if (kw0 < nkt) {  // warp-uniform
                if constexpr (KQ) fa_q8_to_f16<D, KW, WARP>(st, conv_k, kw0, lane);
                if constexpr (VQ) fa_q8_to_f16<D, KW, WARP>(st + SM::KPART, conv_v, kw0, lane);
                __syncwarp();
            }
        }
        if (kw0 >= nkt) continue;  // warp-uniform: nothing of this warp's in a short last tile

        // S = Q K^T for this warp's 16 rows x KW keys.
        float s[KW / 8][4];
#pragma unroll
        for (int j = 0; j < KW / 8; j++) {
            s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
#pragma unroll
            for (int kk = 0; kk < D / 16; kk++) {
                const u16* kr = &sk[(kw0 + 8 * j + gq) * KS + 16 * kk + 2 * cq];
                mma16816(s[j], qa[kk], *(const u32*)kr, *(const u32*)(kr + 8));
            }
        }
        // Mask (tiles every query sees whole skip it), scale, tile row maxima.
        float mt[2] = {NEG_INF, NEG_INF};
        if (ks.tile_visible(kb, nkt) && nkt == FA_KEYS) {
#pragma unroll
            for (int j = 0; j < KW / 8; j++) {
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    s[j][e] *= scale2;
                    mt[e >> 1] = fmaxf(mt[e >> 1], s[j][e]);
                }
            }
        } else {
#pragma unroll
            for (int j = 0; j < KW / 8; j++) {
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int n = kw0 + 8 * j + 2 * cq + (e & 1);
                    const bool vis = n < nkt && ks.visible(qi[e >> 1], ks.pos(kb + n));
                    s[j][e] = vis ? s[j][e] * scale2 : NEG_INF;
                    mt[e >> 1] = fmaxf(mt[e >> 1], s[j][e]);
                }
            }
        }
        float alpha[2];
#pragma unroll
        for (int h2 = 0; h2 < 2; h2++) {
            mt[h2] = fmaxf(mt[h2], __shfl_xor_sync(0xffffffffu, mt[h2], 1));
            mt[h2] = fmaxf(mt[h2], __shfl_xor_sync(0xffffffffu, mt[h2], 2));
            const float mnew = fmaxf(m[h2], mt[h2]);
            alpha[h2] = (m[h2] == NEG_INF) ? 0.0f : ex2(m[h2] - mnew);
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
        u32 pa[KW / 16][4];
#pragma unroll
        for (int j = 0; j < KW / 8; j++) {
            float p[4];
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const float mm = m[e >> 1];
                p[e] = (s[j][e] == NEG_INF || mm == NEG_INF) ? 0.0f : ex2(s[j][e] - mm);
                l[e >> 1] += p[e];
            }
            pa[j >> 1][(j & 1) * 2 + 0] = pack_h2(p[0], p[1]);
            pa[j >> 1][(j & 1) * 2 + 1] = pack_h2(p[2], p[3]);
        }
#pragma unroll
        for (int kk = 0; kk < KW / 16; kk++) {
#pragma unroll
            for (int j = 0; j < D / 8; j++) {
                u32 b0, b1;
                ldsm_x2_trans(b0, b1, &sv[(kw0 + 16 * kk + (lane & 15)) * KS + 8 * j]);
                mma16816(o[j], pa[kk], b0, b1);
            }
        }
    }
    cp_async_wait<0>();
    __syncthreads();  // every stage idle: the shared memory is free for the combine below

    // Row sums across the quad.
#pragma unroll
    for (int h2 = 0; h2 < 2; h2++) {
        l[h2] += __shfl_xor_sync(0xffffffffu, l[h2], 1);
        l[h2] += __shfl_xor_sync(0xffffffffu, l[h2], 2);
    }
    if (WK == 1) {
#pragma unroll
        for (int h2 = 0; h2 < 2; h2++) {
            const int r = wr * 16 + gq + 8 * h2;
            if (r >= R) continue;
            const int t = t0 + r / G, h = g * G + r % G;
            if (n_split == 1) {
                const float inv = l[h2] > 0.0f ? 1.0f / l[h2] : 0.0f;
                float* op = out + (size_t)t * ldq + h * D;
#pragma unroll
                for (int j = 0; j < D / 8; j++) {
                    op[8 * j + 2 * cq] = o[j][2 * h2] * inv;
                    op[8 * j + 2 * cq + 1] = o[j][2 * h2 + 1] * inv;
                }
            } else {
                float* pp = part + (((size_t)t * n_head + h) * n_split + z) * (D + 2);
#pragma unroll
                for (int j = 0; j < D / 8; j++) {
                    pp[8 * j + 2 * cq] = o[j][2 * h2];
                    pp[8 * j + 2 * cq + 1] = o[j][2 * h2 + 1];
                }
                if (cq == 0) {
                    pp[D] = m[h2];
                    pp[D + 1] = l[h2];
                }
            }
        }
        return;
    }
    // Combine the WK warps' states of the same 16 rows: red[w][row] = (acc[D], m, l).
    float* red = (float*)fa_smem;
#pragma unroll
    for (int h2 = 0; h2 < 2; h2++) {
        float* rw = red + (wk * 16 + gq + 8 * h2) * (D + 2);
#pragma unroll
        for (int j = 0; j < D / 8; j++) {
            rw[8 * j + 2 * cq] = o[j][2 * h2];
            rw[8 * j + 2 * cq + 1] = o[j][2 * h2 + 1];
        }
        if (cq == 0) {
            rw[D] = m[h2];
            rw[D + 1] = l[h2];
        }
    }
    __syncthreads();
    for (int idx = tid; idx < 16 * D; idx += FA_THREADS) {
        const int r = idx / D, d = idx % D;
        if (r >= R) break;
        float M = NEG_INF;
#pragma unroll
        for (int w = 0; w < WK; w++) M = fmaxf(M, red[(w * 16 + r) * (D + 2) + D]);
        float O = 0.0f, L = 0.0f;
        if (M != NEG_INF) {
#pragma unroll
            for (int w = 0; w < WK; w++) {
                const float* rw = red + (w * 16 + r) * (D + 2);
                if (rw[D] == NEG_INF) continue;
                const float f = ex2(rw[D] - M);
                O += f * rw[d];
                L += f * rw[D + 1];
            }
        }
        const int t = t0 + r / G, h = g * G + r % G;
        if (n_split == 1) {
            // A warp holds 32 consecutive values of one row: one q8_1 block of the output, for
            // the output projection when it reads q8_1 (yq set).
            const size_t i = (size_t)t * ldq + h * D + d;
            const float v = L > 0.0f ? O / L : 0.0f;
            out[i] = v;
            if (yq) q8_1_lane(v, yq + (i & ~(size_t)31), yds + (i >> 5), lane);
        } else {
            float* pp = part + (((size_t)t * n_head + h) * n_split + z) * (D + 2);
            pp[d] = O;
            if (d == 0) {
                pp[D] = M;
                pp[D + 1] = L;
            }
        }
    }
}

#define ATTN_FA(name, D, WK, KQ, VQ)                                                           \
    extern "C" __global__ void __launch_bounds__(FA_THREADS) name(                             \
        const float* q, const u16* knew, const u16* vnew, const u16* kc, const u16* vc,        \
        const int* tok_pos, const int* tok_seq, const int* tok_p0, const int* tok_rs,          \
        const int2* tiles, int G, int n_head, int n_head_kv, const int* caps, const int* offs, \
        int rows_per_seq, int sink, int n_split, float scale, float* out, float* part, i8* yq,  \
        float2* yds) {                                                                         \
        attn_fa<D, WK, KQ, VQ>(q, knew, vnew, kc, vc, tok_pos, tok_seq, tok_p0, tok_rs, tiles, \
                               G, n_head, n_head_kv, caps, offs, rows_per_seq, sink, n_split,  \
                               scale, out, part, yq, yds);                                     \
    }
// f16 K and V; then q8_0 caches: _k8v8 both, _k8v16 K only, _k16v8 V only.
#define ATTN_FA_TYPES(name, D, WK)              \
    ATTN_FA(name, D, WK, false, false)          \
    ATTN_FA(name##_k8v8, D, WK, true, true)     \
    ATTN_FA(name##_k8v16, D, WK, true, false)   \
    ATTN_FA(name##_k16v8, D, WK, false, true)
ATTN_FA_TYPES(attn_dec_d64, 64, 4)
ATTN_FA_TYPES(attn_dec_d128, 128, 4)
ATTN_FA_TYPES(attn_pre_d64, 64, 1)
ATTN_FA_TYPES(attn_pre_d128, 128, 1)
