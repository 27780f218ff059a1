// Row-wise float ops of the forward step (the CUDA twins of src/backend/cpu/ops.rs), the KV
// cache store, f32 -> f16 conversion, row gathers and greedy argmax.

// One RoPE pair (x0, x1) rotated by (cos, sin) = c, rounded as the CPU backend rounds it
// (src/backend/cpu/ops.rs rope_row, llama.cpp's x86 build: x0' = fma(x0, cos, -(x1 * sin)),
// x1' = fma(x0, sin, x1 * cos)); explicit intrinsics, so no contraction NVRTC picks changes it.
__device__ __forceinline__ void rope_pair(float x0, float x1, float2 c, float* y0, float* y1) {
    *y0 = __fmaf_rn(x0, c.x, -__fmul_rn(x1, c.y));
    *y1 = __fmaf_rn(x0, c.y, __fmul_rn(x1, c.x));
}

// silu(g) * u as the CPU backend computes it (ops.rs swiglu: llama.cpp's ggml_v_silu, that is
// g / (1 + ggml_v_expf(0 - g)), then the product).
__device__ __forceinline__ float silu_mul(float g, float u) {
    return __fmul_rn(__fdiv_rn(g, __fadd_rn(1.0f, ggml_v_expf(__fsub_rn(0.0f, g)))), u);
}

// Rotates adjacent pairs of the first n_rot dims of every head; cs: n_tok x (n_rot/2) (cos, sin)
// computed on the host exactly as the CPU backend computes them.
extern "C" __global__ void rope(float* x, int n_tok, int n_heads, int head_dim, int half_rot,
                                const float2* cs) {
    int gid = blockIdx.x * blockDim.x + threadIdx.x;
    int per_tok = n_heads * half_rot;
    if (gid >= n_tok * per_tok) return;
    int t = gid / per_tok, r = gid % per_tok, h = r / half_rot, i = r % half_rot;
    float2 c = cs[t * half_rot + i];
    float* p = x + (size_t)t * n_heads * head_dim + h * head_dim + 2 * i;
    rope_pair(p[0], p[1], c, &p[0], &p[1]);
}

extern "C" __global__ void swiglu(float* gate, const float* up, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float g = gate[i];
    gate[i] = silu_mul(g, up[i]);
}

extern "C" __global__ void add(float* x, const float* y, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] += y[i];
}

extern "C" __global__ void to_f16(const float* x, u16* y, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = f2h(x[i]);
}

// dst[r] = src[rows[r]] for r < n, rows of width floats.
extern "C" __global__ void gather_rows(const float* src, const int* rows, int n, int width,
                                       float* dst) {
    int gid = blockIdx.x * blockDim.x + threadIdx.x;
    if (gid >= n * width) return;
    int r = gid / width, i = gid % width;
    dst[gid] = src[(size_t)rows[r] * width + i];
}

// Slot of position `pos` in a head region of capacity `cap` with `sink` kept tokens (the ring of
// src/kv: sinks first, then the most recent tokens).
__device__ __forceinline__ int ring_slot(int cap, int sink, int pos) {
    return (pos < sink || cap <= sink) ? pos : sink + (pos - sink) % (cap - sink);
}

// Writes the batch's f16 K and V rows (tok_last: the last position of each token's run) (n_tok x n_head_kv x head_dim) into one layer's cache.
// caps/offs: this layer's per-head capacity and region offset; rows_per_seq: rows one sequence
// holds in this layer.
extern "C" __global__ void kv_store(const u16* knew, const u16* vnew, int n_tok, int n_head_kv,
                                    int head_dim, const int* tok_pos, const int* tok_seq,
                                    const int* tok_last, const int* caps, const int* offs, int rows_per_seq, int sink,
                                    u16* kc, u16* vc) {
    int gid = blockIdx.x * blockDim.x + threadIdx.x;
    int per_head = head_dim / 8;
    if (gid >= n_tok * n_head_kv * per_head) return;
    int t = gid / (n_head_kv * per_head), r = gid % (n_head_kv * per_head);
    int h = r / per_head, c = r % per_head;
    int pos = tok_pos[t], cap = caps[h];
    // A later token of the same run takes this ring slot: only the newest may write it.
    if (pos >= sink && cap > sink && tok_last[t] - pos >= cap - sink) return;
    int slot = ring_slot(cap, sink, pos);
    size_t row = (size_t)tok_seq[t] * rows_per_seq + offs[h] + slot;
    size_t src = ((size_t)t * n_head_kv + h) * head_dim;
    ((uint4*)(kc + row * head_dim))[c] = ((const uint4*)(knew + src))[c];
    ((uint4*)(vc + row * head_dim))[c] = ((const uint4*)(vnew + src))[c];
}

// out[r] = argmax of logits row r (first index on ties); one block per row.
extern "C" __global__ void argmax_rows(const float* logits, int n_vocab, int* out) {
    const float* x = logits + (size_t)blockIdx.x * n_vocab;
    float best = NEG_INF;
    int bi = 0x7fffffff;
    for (int i = threadIdx.x; i < n_vocab; i += blockDim.x) {
        float v = x[i];
        if (v > best || (v == best && i < bi)) {
            best = v;
            bi = i;
        }
    }
    __shared__ float sb[32];
    __shared__ int si[32];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffffu, best, o);
        int oi = __shfl_xor_sync(0xffffffffu, bi, o);
        if (ov > best || (ov == best && oi < bi)) {
            best = ov;
            bi = oi;
        }
    }
    if (threadIdx.x % WARP == 0) {
        sb[threadIdx.x / WARP] = best;
        si[threadIdx.x / WARP] = bi;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < (int)(blockDim.x / WARP); w++) {
            if (sb[w] > best || (sb[w] == best && si[w] < bi)) {
                best = sb[w];
                bi = si[w];
            }
        }
        if (bi == 0x7fffffff) bi = 0;
        out[blockIdx.x] = bi;
    }
}

// ---- fused decode ops (fewer launches per layer; each equals the unfused sequence) -------------

// Per row t: if y: x[t] += y[t]; out[t] = x[t] / sqrt(mean(x[t]^2) + eps) * w (sum of squares in
// f64 as the CPU backend and ggml accumulate it); if yq: out[t] also as q8_1 (width a multiple of
// 32 then). One block per row; each thread holds its (at most PER) values in registers and
// issues all its loads before using any: a loop that stored x between loads would wait for one
// memory round trip per value, which made this tiny kernel take longer than a matrix product.
// PER values per thread (4, 8 or 16: `add_rms_norm_q8_<PER>`, the host picks the smallest that
// holds the row): three PER-value arrays stay in registers under the 64-register limit of
// 1024-thread blocks only for small PER, and a spilled array goes through local memory.
// With yq_m (width a multiple of 256, the next product a K-quant on the tensor cores): out also
// in the q8_K mma layout of family fam (q8k_mma_layout in quant.cu), one warp per super-block
// reading the row back once the block has written it; the layout launch goes. That part is
// compiled only into the Q8K kernels (`add_rms_norm_q8k_<PER>`): in the others its registers
// cost the one-token step about 3% (tg128 of the 8B shape 356 vs 367 t/s on an H100).
template <int PER, bool Q8K>
__device__ __forceinline__ void add_rms_norm_q8_row(float* x, const float* y, const float* w,
        float eps, int width, float* out, i8* yq, float2* yds, int fam, i8* yq_m, float* ysc) {
    pdl_wait();  // a programmatic dependent: wait first, then let the next one launch
    pdl_trigger();
    int t = blockIdx.x, nt = blockDim.x;
    float* xr = x + (size_t)t * width;
    const float* yr = y ? y + (size_t)t * width : nullptr;
    float v[PER], a[PER], wv[PER];
#pragma unroll
    for (int k = 0; k < PER; k++) {
        int i = threadIdx.x + k * nt;
        v[k] = i < width ? xr[i] : 0.0f;
        a[k] = yr && i < width ? yr[i] : 0.0f;
        wv[k] = i < width ? w[i] : 0.0f;
    }
    double s = 0.0;
#pragma unroll
    for (int k = 0; k < PER; k++) {
        int i = threadIdx.x + k * nt;
        if (yr) {
            v[k] += a[k];
            if (i < width) xr[i] = v[k];
        }
        s += (double)(v[k] * v[k]);
    }
    __shared__ double red[32];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    if (threadIdx.x % WARP == 0) red[threadIdx.x / WARP] = s;
    __syncthreads();
    if (threadIdx.x < WARP) {
        s = threadIdx.x < nt / WARP ? red[threadIdx.x] : 0.0;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
        if (threadIdx.x == 0) red[0] = s;
    }
    __syncthreads();
    float mean = (float)(red[0] / (double)width);
    float scale = 1.0f / sqrtf(mean + eps);
    // For each k a warp's lanes hold 32 consecutive values (nt is a multiple of 32): one q8_1
    // block, formed in registers.
    int lane = threadIdx.x % WARP;
#pragma unroll
    for (int k = 0; k < PER; k++) {
        int i = threadIdx.x + k * nt;
        int c = (i - lane) / 32;
        if (c * 32 >= width) break;
        float o = (v[k] * scale) * wv[k];
        if (i < width) out[(size_t)t * width + i] = o;
        if (yq) q8_1_lane(o, yq + (size_t)t * width + c * 32, yds + (size_t)t * (width / 32) + c, lane);
    }
    if (Q8K && yq_m) {
        __syncthreads();  // the row is written (global writes of the block are visible to it)
        const int nsb = width / 256;
        const float* orow = out + (size_t)t * width;
        for (int sb = threadIdx.x / WARP; sb < nsb; sb += nt / WARP) {
            // L2 reads: out may alias x, whose old values this block has read through L1.
            const float4 a = __ldcg((const float4*)(orow + sb * 256 + 8 * lane));
            const float4 b = __ldcg((const float4*)(orow + sb * 256 + 8 * lane + 4));
            const float v[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
            q8k_layout_warp(v, sb, t, lane, nsb, fam, yq_m, ysc);
        }
    }
}

#define ADD_RMS_NORM_Q8(NAME, PER, Q8K)                                                       \
    extern "C" __global__ void __launch_bounds__(1024) NAME##PER(                             \
        float* x, const float* y, const float* w, float eps, int width, float* out, i8* yq,  \
        float2* yds, int fam, i8* yq_m, float* ysc, PF_PARAMS) {                              \
        if (l2_prefetch_block(PF_ARGS)) return;                                               \
        add_rms_norm_q8_row<PER, Q8K>(x, y, w, eps, width, out, yq, yds, fam, yq_m, ysc);     \
    }
ADD_RMS_NORM_Q8(add_rms_norm_q8_, 4, false)
ADD_RMS_NORM_Q8(add_rms_norm_q8_, 8, false)
ADD_RMS_NORM_Q8(add_rms_norm_q8_, 16, false)
ADD_RMS_NORM_Q8(add_rms_norm_q8k_, 4, true)
ADD_RMS_NORM_Q8(add_rms_norm_q8k_, 8, true)
ADD_RMS_NORM_Q8(add_rms_norm_q8k_, 16, true)

// gate[t] = silu(gate[t]) * up[t], and the result as q8_1 (the input of the down projection).
// One warp per 32-value chunk.
extern "C" __global__ void swiglu_q8(float* gate, const float* up, int width, int n_tok, i8* yq,
                                     float2* yds, PF_PARAMS) {
    if (l2_prefetch_block(PF_ARGS)) return;
    pdl_wait();  // a programmatic dependent: wait first, then let the next one launch
    pdl_trigger();
    int nb = width / 32;
    int gb = blockIdx.x * (blockDim.x / WARP) + threadIdx.x / WARP;
    if (gb >= nb * n_tok) return;
    int t = gb / nb, b = gb % nb, lane = threadIdx.x % WARP;
    size_t i = (size_t)t * width + b * 32 + lane;
    float g = gate[i];
    float v = silu_mul(g, up[i]);
    gate[i] = v;
    q8_1_lane(v, yq + (size_t)t * width + b * 32, yds + (size_t)t * nb + b, lane);
}

// gate[t] = silu(gate[t]) * up[t], and the result in the q8_K mma layout (q8k_mma_layout in
// quant.cu) when the down projection is a K-quant on the tensor cores: the layout launch goes.
// One warp per (super-block, token).
extern "C" __global__ void swiglu_q8k(float* gate, const float* up, int width, int n_tok, int fam,
                                      i8* yq_m, float* ysc, PF_PARAMS) {
    if (l2_prefetch_block(PF_ARGS)) return;
    pdl_wait();  // a programmatic dependent: wait first, then let the next one launch
    pdl_trigger();
    const int nsb = width / 256;
    const int w = blockIdx.x * (blockDim.x / WARP) + threadIdx.x / WARP;
    if (w >= nsb * n_tok) return;
    const int sb = w / n_tok, t = w % n_tok, lane = threadIdx.x % WARP;
    float v[8];
    {
        float* g = gate + (size_t)t * width + sb * 256 + 8 * lane;
        const float* u = up + (size_t)t * width + sb * 256 + 8 * lane;
        // Rows of a multiple of 256 floats: 16-byte aligned pieces.
        const float4 g0 = ((const float4*)g)[0], g1 = ((const float4*)g)[1];
        const float4 u0 = ((const float4*)u)[0], u1 = ((const float4*)u)[1];
        const float gv[8] = {g0.x, g0.y, g0.z, g0.w, g1.x, g1.y, g1.z, g1.w};
        const float uv[8] = {u0.x, u0.y, u0.z, u0.w, u1.x, u1.y, u1.z, u1.w};
#pragma unroll
        for (int k = 0; k < 8; k++) v[k] = silu_mul(gv[k], uv[k]);
        ((float4*)g)[0] = make_float4(v[0], v[1], v[2], v[3]);
        ((float4*)g)[1] = make_float4(v[4], v[5], v[6], v[7]);
    }
    q8k_layout_warp(v, sb, t, lane, nsb, fam, yq_m, ysc);
}

// RoPE on q and k (in place), k and v rounded to f16 into the staging rows, and, when `store`
// (every run of the batch is one token, so no key a query of the batch needs is displaced),
// also into the layer's cache ring: bit 0 K, bit 1 V (a q8_0 cache is stored by kv_quant_q8_0
// instead). One thread per (token, head pair slot).
extern "C" __global__ void rope_kv(float* q, float* k, const float* v, int n_tok, int n_head,
                                   int n_head_kv, int head_dim, int half_rot, const float2* cs,
                                   u16* k16, u16* v16, int store, const int* tok_pos,
                                   const int* tok_seq, const int* caps, const int* offs,
                                   int rows_per_seq, int sink, u16* kc, u16* vc, PF_PARAMS) {
    if (l2_prefetch_block(PF_ARGS)) return;
    pdl_wait();  // a programmatic dependent: wait first, then let the next one launch
    pdl_trigger();
    int hp = head_dim / 2;
    int per_tok = (n_head + 2 * n_head_kv) * hp;
    int gid = blockIdx.x * blockDim.x + threadIdx.x;
    if (gid >= n_tok * per_tok) return;
    int t = gid / per_tok, r = gid % per_tok;
    int h = r / hp, i = r % hp;
    if (h < n_head) {
        if (i < half_rot) {
            float2 c = cs[t * half_rot + i];
            float* p = q + (size_t)t * n_head * head_dim + h * head_dim + 2 * i;
            rope_pair(p[0], p[1], c, &p[0], &p[1]);
        }
        return;
    }
    h -= n_head;
    bool is_k = h < n_head_kv;
    if (!is_k) h -= n_head_kv;
    size_t off = (size_t)t * n_head_kv * head_dim + h * head_dim + 2 * i;
    float x0, x1;
    if (is_k) {
        float* p = k + off;
        x0 = p[0];
        x1 = p[1];
        if (i < half_rot) {
            float2 c = cs[t * half_rot + i];
            float y0, y1;
            rope_pair(x0, x1, c, &y0, &y1);
            x0 = y0;
            x1 = y1;
            p[0] = x0;
            p[1] = x1;
        }
    } else {
        x0 = v[off];
        x1 = v[off + 1];
    }
    u32 packed = (u32)f2h(x0) | ((u32)f2h(x1) << 16);
    *(u32*)((is_k ? k16 : v16) + off) = packed;
    if (store & (is_k ? 1 : 2)) {
        int slot = ring_slot(caps[h], sink, tok_pos[t]);
        size_t row = (size_t)tok_seq[t] * rows_per_seq + offs[h] + slot;
        *(u32*)((is_k ? kc : vc) + row * head_dim + 2 * i) = packed;
    }
}

// ---- q8_0 K/V cache ------------------------------------------------------------------------
// A q8_0 cache row of head_dim values is head_dim / 32 blocks of 34 bytes (f16 scale d, 32
// int8), the staging rows the same per (token, KV head), as src/kv lays them out.

// Quantizes n_tok rows of n_head_kv x head_dim floats (K after RoPE, or V) to q8_0 staging
// blocks, as ggml's reference quantizer (ggml-compat q8::quantize_q8_0) does: d = amax / 127,
// q = round(x * (1 / d)) with ties away from zero (0 when d is 0), d stored as f16. With `store`
// (every run one token long) the blocks also go to the layer's cache ring. One warp per block.
extern "C" __global__ void kv_quant_q8_0(const float* x, int n_tok, int n_head_kv, int head_dim,
                                         u8* stage, int store, const int* tok_pos,
                                         const int* tok_seq, const int* caps, const int* offs,
                                         int rows_per_seq, int sink, u8* cache) {
    const int bph = head_dim / 32;  // blocks per head row
    const int nb = n_tok * n_head_kv * bph;
    const int gb = blockIdx.x * (blockDim.x / WARP) + threadIdx.x / WARP;
    if (gb >= nb) return;  // warp-uniform
    const int lane = threadIdx.x % WARP;
    const float v = x[(size_t)gb * 32 + lane];
    const float amax = warp_max(fabsf(v));
    const float d = __fdiv_rn(amax, 127.0f);
    const float id = d != 0.0f ? __fdiv_rn(1.0f, d) : 0.0f;
    const float r = fminf(fmaxf(roundf(__fmul_rn(v, id)), -128.0f), 127.0f);
    const u8 q = (u8)(i8)(int)r;
    const u16 dh = f2h(d);
    u8* sb = stage + (size_t)gb * 34;
    sb[2 + lane] = q;
    if (lane == 0) *(u16*)sb = dh;
    if (store) {
        const int t = gb / (n_head_kv * bph), h = (gb / bph) % n_head_kv, b = gb % bph;
        const int slot = ring_slot(caps[h], sink, tok_pos[t]);
        const size_t row = (size_t)tok_seq[t] * rows_per_seq + offs[h] + slot;
        u8* cb = cache + (row * bph + b) * 34;
        cb[2 + lane] = q;
        if (lane == 0) *(u16*)cb = dh;
    }
}

// Copies the batch's staged K or V rows (row_words 32-bit words per (token, KV head): f16 or
// q8_0) into one layer's cache ring, the newest token of a run winning each slot (as kv_store).
extern "C" __global__ void kv_store_rows(const u32* stage, int row_words, int n_tok, int n_head_kv,
                                         const int* tok_pos, const int* tok_seq,
                                         const int* tok_last, const int* caps, const int* offs,
                                         int rows_per_seq, int sink, u32* cache) {
    const int gid = blockIdx.x * blockDim.x + threadIdx.x;
    if (gid >= n_tok * n_head_kv * row_words) return;
    const int t = gid / (n_head_kv * row_words), r = gid % (n_head_kv * row_words);
    const int h = r / row_words, w = r % row_words;
    const int pos = tok_pos[t], cap = caps[h];
    if (pos >= sink && cap > sink && tok_last[t] - pos >= cap - sink) return;
    const int slot = ring_slot(cap, sink, pos);
    const size_t row = (size_t)tok_seq[t] * rows_per_seq + offs[h] + slot;
    cache[row * row_words + w] = stage[((size_t)t * n_head_kv + h) * row_words + w];
}
