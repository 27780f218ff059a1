// The batch-1 decode step's layer tail in one persistent kernel (`layer_tail`): the output
// projection, the residual add, the FFN norm, gate/up, SwiGLU, the down projection, the residual
// add and (unless it is the last layer) the next layer's attention norm and q/k/v products. It
// replaces seven launches per layer (two norms, four products, SwiGLU) by one; each of those
// paid a ramp, a tail and a dependency wait of about 3 us, which at batch 1 is a large part of
// the step (docs/decode-megakernel.md).
//
// Work. A phase is the product of up to three matrices with one input: its tiles of R whole rows
// (as mmvs: copied into shared memory by cp.async, all in flight at once, then one warp per row,
// or all warps on one wide row) are dealt to the blocks round-robin. Each block walks its tiles
// of every phase in order with nbuf tile buffers, so the next nbuf - 1 tiles' weights (never
// written) are in flight while it waits for the current tile's input and computes it: the next
// phase's weights stream while the current phase drains.
//
// Dependencies without a grid barrier. The input of phase p > 0 is formed from the outputs of
// phase p - 1 in groups of 32 rows (one q8_1 block): after its last tile of a phase, a block adds
// its tiles' rows to their groups' counters (tl_account), and the block whose add completes a
// group forms that group's part of the input:
//   - epilogue 1 (residual + norm): h += W a for the group's rows, then the group's h * w
//     (norm weight) quantized to q8_1 with raw scales (max |h w| / 127, sum of q) and its sum of
//     squares of h; the consumer phase scales them by 1 / rms (sum of every group's squares) as
//     it copies the scales into shared memory. Quantizing h w instead of rms_norm(h) w gives the
//     same int8 values up to float rounding, since 1 / rms is one positive factor per row.
//   - epilogue 2 (SwiGLU): silu(gate) * up of the group's rows (32 of each matrix) as q8_1.
// then adds one to the phase's counter of finished groups. A block starts computing a phase's
// first tile once that counter of the phase before holds every group (an acquire load spun on
// by one thread). Phase 0's input comes from the kernel before (programmatic dependent launch).
// The blocks must all be resident at once (the host sizes the grid from the occupancy); the last
// block to leave zeroes the counters for the next step.
//
// The last layer's span may end with the final norm and the output matrix (a step without
// logits leaves that phase out: np_limit). The last phase (the next layer's q/k/v) may also do
// rope_kv's work (epilogue 4, TL_ROPE: per
// head, once the head's rows are all written), so the attention kernel follows it directly.
//
// Every phase copies its whole input (q8_1 values and scales) into shared memory first (L2
// loads), so no block reads a stale L1 line of a buffer another block rewrote.

#define TL_THREADS 128
#define TL_WARPS (TL_THREADS / WARP)
// The block's counter work (waits, fences, atomics) is done by the first thread of the last
// warp, which issues no weight copies: a fence waits for every memory operation its thread
// (warp) has in flight, and in a copying thread that includes the next tiles' cp.async copies,
// which serialised the whole pipeline (tg128 of the 8B shape 114 t/s on an H100 with thread 0
// doing it, against 394 with separate kernels).
#define TL_CTL (TL_THREADS - WARP)
#define TL_MAX_MATS 3
#define TL_MAX_PHASES 4

// Epilogues: out = W a; h += W a; h += W a and norm groups; gate/up and SwiGLU groups.
#define TL_STORE 0
#define TL_RESID 1
#define TL_RESID_NORM 2
#define TL_SWIGLU 3
// The next layer's q/k/v with RoPE, the f16 staging rows and the cache store of the new K/V
// (rope_kv's work) done per head by the block that completes the head (TlRope on).
#define TL_ROPE 4
// Inputs: q8_1 from the kernel before; q8_1 groups of the phase before; normed groups.
#define TL_IN_PREV_KERNEL 0
#define TL_IN_Q8 1
#define TL_IN_NORM 2

// The host writes these tables (src/backend/cuda/layer_tail.rs); every field is 8 bytes so the
// layout is the same on both sides.
struct TlMat {
    u64 W, out, row_bytes, rows, type, units, R, tiles;
};
struct TlPhase {
    TlMat m[TL_MAX_MATS];
    u64 n_mats, n_tiles, interleave;
    u64 in_kind, K, yq, yds, ss, eps_bits;  // input: q8_1 values, scales, squares (norm), eps
    u64 epi, h, nw;                         // epilogue, residual, next norm weight
    u64 oq, ods, oss;                       // the groups this phase forms (next phase's input)
    u64 gcnt, group_target, n_groups, pcnt;  // group_target: rows that complete a group
};
struct TlDesc {
    TlPhase p[TL_MAX_PHASES];
    u64 n_phases, exit_cnt, counters, n_counters;
};

// What the RoPE epilogue needs: rope_kv's arguments for one token (the launch passes them, as
// the cache changes with a new layout). `on` 0: the epilogue only stores.
struct TlRope {
    int on, head_dim, half_rot, rows_per_seq, sink;
    const float2* cs;
    u16 *k16, *v16, *kc, *vc;
    const int *tok_pos, *tok_seq, *caps, *offs;
};

__device__ __forceinline__ u32 tl_ld_acquire(const u32* p) {
    u32 v;
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}

// One row of a tile in shared memory times the q8_1 input, the lanes of `nthr` threads taking
// units tid, tid + nthr, ... (the type is the matrix's, known only at run time).
__device__ __forceinline__ float tl_row(const u8* r, int type, int tid, int nthr, int units,
                                     const i8* yq, const float2* yds) {
    switch (type) {
        case T_Q4_0: return mmvs_row<T_Q4_0>(r, tid, nthr, units, yq, yds);
        case T_Q4_1: return mmvs_row<T_Q4_1>(r, tid, nthr, units, yq, yds);
        case T_Q5_0: return mmvs_row<T_Q5_0>(r, tid, nthr, units, yq, yds);
        case T_Q5_1: return mmvs_row<T_Q5_1>(r, tid, nthr, units, yq, yds);
        case T_Q8_0: return mmvs_row<T_Q8_0>(r, tid, nthr, units, yq, yds);
        case T_Q4_K: return mmvs_row<T_Q4_K>(r, tid, nthr, units, yq, yds);
        case T_Q5_K: return mmvs_row<T_Q5_K>(r, tid, nthr, units, yq, yds);
        default: return mmvs_row<T_Q6_K>(r, tid, nthr, units, yq, yds);
    }
}

// Matrix and tile within it of phase tile t.
__device__ __forceinline__ void tl_locate(const TlPhase& P, int t, int* mi, int* lt) {
    if (P.interleave) {
        *mi = t & 1;
        *lt = t >> 1;
        return;
    }
    int k = 0;
    while (k + 1 < (int)P.n_mats && t >= (int)P.m[k].tiles) {
        t -= (int)P.m[k].tiles;
        k++;
    }
    *mi = k;
    *lt = t;
}

// Moves (p, t) past the phases whose tiles this block has all done (round-robin: block b takes
// tiles b, b + G, ... of every phase).
__device__ __forceinline__ void tl_skip(const TlDesc& D, int np, int b, int* p, int* t) {
    while (*p < np && *t >= (int)D.p[*p].n_tiles) {
        (*p)++;
        *t = b;
    }
}

// Issues the cp.async copies of phase tile t into buf (one commit group).
__device__ __forceinline__ void tl_issue(const TlPhase& P, int t, int4* buf) {
    int mi, lt;
    tl_locate(P, t, &mi, &lt);
    const TlMat& M = P.m[mi];
    const int row0 = lt * (int)M.R;
    const int nr = min((int)M.R, (int)M.rows - row0);
    const int chunks = nr * (int)(M.row_bytes / 16);
    const int4* src = (const int4*)((const u8*)M.W + (u64)row0 * M.row_bytes);
    if (threadIdx.x < TL_CTL)
        for (int c = threadIdx.x; c < chunks; c += TL_CTL) cp_async16(buf + c, src + c, 16);
}

// Asks L2 for phase tile t's weights (warp 0, a 4 KiB piece per lane; sm_90's bulk prefetch,
// nothing elsewhere): the tiles a block will copy after those in its shared-memory buffers, so
// its weights keep streaming while it waits at a phase boundary.
__device__ __forceinline__ void tl_prefetch(const TlPhase& P, int t) {
#if __CUDA_ARCH__ >= 900
    int mi, lt;
    tl_locate(P, t, &mi, &lt);
    const TlMat& M = P.m[mi];
    const int row0 = lt * (int)M.R;
    const u64 bytes = (u64)min((int)M.R, (int)M.rows - row0) * M.row_bytes;
    const u8* src = (const u8*)M.W + (u64)row0 * M.row_bytes;
    for (u64 off = (u64)threadIdx.x * 4096; threadIdx.x < WARP && off < bytes; off += WARP * 4096) {
        const u32 len = (u32)(bytes - off < 4096 ? bytes - off : 4096);
        asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(src + off), "r"(len) : "memory");
    }
#endif
}

// Forms a finished group's part of the next phase's input (one warp): group g (32 rows) of
// the residual or of gate/up, or head g of matrix mi (q, k, v) with RoPE.
__device__ __forceinline__ void tl_form_group(const TlPhase& P, const TlRope& rp, int mi, int g,
                                              int lane) {
    i8* oq = (i8*)P.oq;
    if (P.epi == TL_RESID_NORM) {
        const int i = g * 32 + lane;
        // L2 loads: other blocks wrote the group's rows.
        const float v = __ldcg((const float*)P.h + i);
        const float hw = v * ((const float*)P.nw)[i];
        const float amax = warp_max(fabsf(hw));
        const float id = amax != 0.0f ? 127.0f / amax : 0.0f;
        const int q = (int)rintf(hw * id);
        oq[i] = (i8)q;
        const float s = warp_sum((float)q);
        double sq = (double)(v * v);
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) sq += __shfl_xor_sync(0xffffffffu, sq, o);
        if (lane == 0) {
            ((float2*)P.ods)[g] = make_float2(amax / 127.0f, s);
            ((double*)P.oss)[g] = sq;
        }
    } else if (P.epi == TL_SWIGLU) {
        const int i = g * 32 + lane;
        const float gv = __ldcg((const float*)P.m[0].out + i);
        const float uv = __ldcg((const float*)P.m[1].out + i);
        q8_1_lane(silu_mul(gv, uv), oq + g * 32, (float2*)P.ods + g, lane);
    } else {
        // rope_kv for one token and one head: q and k rotated in place, k and v as f16 into
        // the staging rows and the cache ring.
        const int hd = rp.head_dim;
        float* o = (float*)P.m[mi].out + (size_t)g * hd;
        int slot = 0;
        size_t row = 0;
        if (mi > 0) {
            slot = ring_slot(rp.caps[g], rp.sink, rp.tok_pos[0]);
            row = (size_t)rp.tok_seq[0] * rp.rows_per_seq + rp.offs[g] + slot;
        }
        for (int i = lane; i < hd / 2; i += WARP) {
            float x0 = __ldcg(o + 2 * i), x1 = __ldcg(o + 2 * i + 1);
            if (mi < 2 && i < rp.half_rot) {
                float y0, y1;
                rope_pair(x0, x1, rp.cs[i], &y0, &y1);
                x0 = y0;
                x1 = y1;
                o[2 * i] = x0;
                o[2 * i + 1] = x1;
            }
            if (mi > 0) {
                const u32 packed = (u32)f2h(x0) | ((u32)f2h(x1) << 16);
                *(u32*)((mi == 1 ? rp.k16 : rp.v16) + (size_t)g * hd + 2 * i) = packed;
                *(u32*)((mi == 1 ? rp.kc : rp.vc) + row * hd + 2 * i) = packed;
            }
        }
    }
}

// Most groups one accounting round can complete: a warp's worth of tiles, each of at most
// TILE_ROWS (16) rows, so within two groups of 32 rows (or two heads).
#define TL_FIN (2 * WARP)

// Adds this block's tiles j0 .. j1 - 1 of phase P (phase tiles b + j G; their outputs written
// before a barrier) to their groups' counters and forms the groups they complete; returns how
// many it formed. Called by every thread. The last warp adds, one tile per lane (a warp of
// tiles per round, its atomics in flight together; the warp issues no copies, see TL_CTL); every
// warp forms. Counting a phase's tiles once, after the block's last tile of the phase, takes the
// fences and atomic round trips out of the tile loop (they ran once per tile at first).
__device__ int tl_account(const TlPhase& P, const TlRope& rp, bool rope, int b, int G,
                           int j0, int j1, int* fin, int* n_fin) {
    const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP;
    const int gs = rope ? rp.head_dim : 32;
    int formed = 0;
    for (int c = j0; c < j1; c += WARP) {
        if (warp == TL_WARPS - 1) {
            if (lane == 0) *n_fin = 0;
            __syncwarp();
            __threadfence();  // the tiles' outputs before their counts
            const int j = c + lane;
            if (j < j1) {
                int mi, lt;
                tl_locate(P, b + j * G, &mi, &lt);
                const TlMat& M = P.m[mi];
                const int row0 = lt * (int)M.R, nr = min((int)M.R, (int)M.rows - row0);
                int base = 0;  // the matrix's first group (heads of q, then k, then v)
                if (rope)
                    for (int k = 0; k < mi; k++) base += (int)P.m[k].rows / gs;
                for (int g = row0 / gs; g * gs < row0 + nr; g++) {
                    const int lo = max(row0, g * gs), hi = min(row0 + nr, g * gs + gs);
                    const u32 add = (u32)(hi - lo);
                    const u32 old = atomicAdd((u32*)P.gcnt + base + g, add);
                    if (old + add == (u32)P.group_target) fin[atomicAdd(n_fin, 1)] = (mi << 24) | g;
                }
            }
            __threadfence();  // the other blocks' outputs of the completed groups before reading
        }
        __syncthreads();
        const int nf = *n_fin;
        for (int f = warp; f < nf; f += TL_WARPS) tl_form_group(P, rp, fin[f] >> 24, fin[f] & 0xffffff, lane);
        formed += nf;
        __syncthreads();  // every warp has read n_fin and formed its groups
    }
    return formed;
}

extern "C" __global__ void __launch_bounds__(TL_THREADS) layer_tail(const TlDesc* desc, int tile_words, int nbuf, int np_limit, int acct_every, int pf_tiles, int rope_on, int head_dim, int half_rot,
           int rows_per_seq, int sink, const float2* cs, u16* k16, u16* v16, u16* kc, u16* vc,
           const int* tok_pos, const int* tok_seq, const int* caps, const int* offs) {
    const TlRope rp = {rope_on, head_dim, half_rot, rows_per_seq, sink, cs,  k16,
                       v16,     kc,       vc,       tok_pos,      tok_seq, caps, offs};
    extern __shared__ int4 tl_smem[];
    __shared__ int fin[TL_FIN];
    __shared__ int n_fin;
    __shared__ double red_ss[TL_WARPS];
    const TlDesc& D = *desc;
    const int tid = threadIdx.x, warp = tid / WARP, lane = tid % WARP;
    const int G = gridDim.x, b = blockIdx.x;
    // nbuf (2 to 4) tile buffers, then the input of the current phase: int8 values, then
    // (d, d * sum) scales.
    i8* yq_s = (i8*)(tl_smem + (size_t)nbuf * tile_words);
    pdl_trigger();

    const int np = min((int)D.n_phases, np_limit);  // the logits phase only when wanted
    // Two cursors over this block's tiles, (phase, tile): the one to compute and the next one
    // to issue, nbuf - 1 tiles ahead (one commit group per tile, empty past the end).
    int p = 0, t = b, ip = 0, it = b;
    tl_skip(D, np, b, &p, &t);
    tl_skip(D, np, b, &ip, &it);
    for (int j = 0; j < nbuf - 1; j++) {
        if (ip < np) {
            tl_issue(D.p[ip], it, tl_smem + (size_t)j * tile_words);
            it += G;
            tl_skip(D, np, b, &ip, &it);
        }
        cp_async_commit();
    }
    // A third cursor, `ahead` tiles past the issue cursor (at most pf_tiles): the tiles asked
    // of L2 (tl_prefetch) and not yet copied.
    int fp = ip, ft = it, ahead = 0;
    auto top_up = [&]() {
        while (ahead < pf_tiles && fp < np) {
            tl_prefetch(D.p[fp], ft);
            ft += G;
            tl_skip(D, np, b, &fp, &ft);
            ahead++;
        }
    };
    top_up();
    int k = 0;          // tiles done by this block
    int ready = -1;     // the phase whose input is in shared memory
    int counted = 0;    // this block's tiles of phase p added to their groups so far
    bool waited = false;
    while (p < np) {
        if (ip < np) {
            tl_issue(D.p[ip], it, tl_smem + (size_t)((k + nbuf - 1) % nbuf) * tile_words);
            it += G;
            tl_skip(D, np, b, &ip, &it);
            if (ahead > 0) {
                ahead--;
            } else {
                fp = ip;
                ft = it;
            }
            top_up();
        }
        cp_async_commit();
        const TlPhase& P = D.p[p];
        const int K = (int)P.K;
        float2* yds_s = (float2*)(yq_s + ((K + 15) & ~15));
        if (ready != p) {
            if (!waited) {
                pdl_wait();  // the kernel before has finished (and every earlier one)
                waited = true;
            }
            if (P.in_kind != TL_IN_PREV_KERNEL) {
                const TlPhase& Q = D.p[p - 1];
                if (tid == TL_CTL) {
                    const u32 want = (u32)Q.n_groups;
                    while (tl_ld_acquire((const u32*)Q.pcnt) < want) __nanosleep(64);
                    __threadfence();
                }
                __syncthreads();
            }
            // The input into shared memory (L2 loads).
            const int nb = K / 32;
            for (int c = tid; c < K / 16; c += TL_THREADS)
                ((int4*)yq_s)[c] = __ldcg((const int4*)P.yq + c);
            // The scales (raw for a normed input: the loads of values, scales and squares are
            // all in flight together).
            for (int g = tid; g < nb; g += TL_THREADS) yds_s[g] = __ldcg((const float2*)P.yds + g);
            if (P.in_kind == TL_IN_NORM) {
                // 1 / rms from every group's sum of squares (fixed order: deterministic).
                if (warp == 0) {
                    double s = 0.0;
                    for (int g = lane; g < nb; g += WARP) s += __ldcg((const double*)P.ss + g);
#pragma unroll
                    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
                    if (lane == 0) red_ss[0] = s;
                }
                __syncthreads();
                const float mean = (float)(red_ss[0] / (double)K);
                const float scale = 1.0f / sqrtf(mean + __int_as_float((int)P.eps_bits));
                for (int g = tid; g < nb; g += TL_THREADS) {  // the entries this thread loaded
                    const float2 raw = yds_s[g];
                    const float d = raw.x * scale;
                    yds_s[g] = make_float2(h2f(f2h(d)), h2f(f2h(d * raw.y)));
                }
            }
            ready = p;
        }
        // This tile's group is done when at most nbuf - 1 newer ones are pending.
        if (nbuf == 2) cp_async_wait<1>();
        else if (nbuf == 3) cp_async_wait<2>();
        else cp_async_wait<3>();
        __syncthreads();

        // The tile.
        int mi, lt;
        tl_locate(P, t, &mi, &lt);
        const TlMat& M = P.m[mi];
        const int R = (int)M.R, row0 = lt * R, nr = min(R, (int)M.rows - row0);
        const u8* tile = (const u8*)(tl_smem + (size_t)(k % nbuf) * tile_words);
        float* out = (float*)M.out;
        float* h = (float*)P.h;
        const bool resid = P.epi == TL_RESID || P.epi == TL_RESID_NORM;
        // The residual rows are loaded before the product (only this tile writes them), so
        // the load's latency hides behind it.
        if (R > 1) {
            for (int i = warp; i < nr; i += TL_WARPS) {
                const float h0 = resid && lane == 0 ? __ldcg(h + row0 + i) : 0.0f;
                float acc = tl_row(tile + (u64)i * M.row_bytes, (int)M.type, lane, WARP,
                                   (int)M.units, yq_s, yds_s);
                acc = warp_sum(acc);
                if (lane == 0) {
                    if (resid) h[row0 + i] = h0 + acc;
                    else out[row0 + i] = acc;
                }
            }
        } else {
            const float h0 = resid && tid == 0 ? __ldcg(h + row0) : 0.0f;
            float acc = tl_row(tile, (int)M.type, tid, TL_THREADS, (int)M.units, yq_s, yds_s);
            acc = warp_sum(acc);
            __shared__ float red[TL_WARPS];
            if (lane == 0) red[warp] = acc;
            __syncthreads();
            if (tid == 0) {
                for (int w = 1; w < TL_WARPS; w++) acc += red[w];
                if (resid) h[row0] = h0 + acc;
                else out[row0] = acc;
            }
        }
        // Group accounting (tl_account): after the block's last tile of the phase, or every
        // acct_every tiles (> 0). The block that completes a group forms it. Groups are 32 rows
        // of the phase's outputs (gate and up share theirs), or one head of q, k or v.
        const bool rope = P.epi == TL_ROPE && rp.on;
        const int j = (t - b) / G;  // the tile's index among this block's tiles of the phase
        if ((P.epi == TL_RESID_NORM || P.epi == TL_SWIGLU || rope) &&
            (t + G >= (int)P.n_tiles || (acct_every > 0 && (j + 1) % acct_every == 0))) {
            __syncthreads();  // the tiles' outputs are written
            const int nf = tl_account(P, rp, rope, b, G, counted, j + 1, fin, &n_fin);
            counted = j + 1;
            if (nf > 0 && !rope && tid == TL_CTL) {
                __threadfence();  // the formed groups before the count (tl_account ends in a barrier)
                atomicAdd((u32*)P.pcnt, (u32)nf);
            }
        }
        __syncthreads();  // this buffer is free for the tile nbuf - 1 after the next
        k++;
        t += G;
        const int was = p;
        tl_skip(D, np, b, &p, &t);
        if (p != was) counted = 0;
    }
    cp_async_wait<0>();
    // The last block out zeroes every counter for the next step's launch.
    if (tid == TL_CTL) {
        __threadfence();
        const u32 old = atomicAdd((u32*)D.exit_cnt, 1u);
        if (old == (u32)G - 1) {
            __threadfence();
            u32* c = (u32*)D.counters;
            for (u64 i = 0; i < D.n_counters; i++) c[i] = 0;
            __threadfence();
        }
    }
}
