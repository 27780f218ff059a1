// The attention-influence profiler's kernels (src/profile/cuda.rs; the CPU twins are in
// src/profile/): f32 throughout, on dequantized weights. Element-wise and row-wise ops of the
// forward and backward pass (embedding gather, RMSNorm and its backward, RoPE and its inverse,
// SwiGLU and its backward, softmax cross-entropy on the target rows), and causal grouped-query
// attention in 64 x 64 tiles: a forward kernel writing O and each row's log-sum-exp, and two
// backward kernels that recompute the probabilities from Q, K and the log-sum-exp, one per query
// tile (dQ and the influence |E| of every entry, summed per block of the profile) and one per key
// tile (dK, dV). No N x N matrix exists in global memory.
//
// Attention thread layout (PA_THREADS = 256 threads per block): thread t has ty = t / 16 and
// tx = t % 16; in a 64 x 64 tile it owns rows ty + 16a and columns tx + 16b (a, b < 4), and in a
// 64 x D output tile rows ty + 16a and columns tx + 16c (c < D / 16). Shared tiles of D-wide rows
// are padded to D + 1 floats, the 64 x 64 probability tile to 65 (no bank conflicts).

#define PA_T 64
#define PA_THREADS 256
#define PA_PT 65

// ---- element-wise and row-wise ops ------------------------------------------------------------

// dst[r] = src[rows[r]] for r < n (also the embedding rows: rows = token ids).
extern "C" __global__ void prof_gather(const float* src, const int* rows, int n, int width,
                                       float* dst) {
    long long gid = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (gid >= (long long)n * width) return;
    int r = (int)(gid / width), i = (int)(gid % width);
    dst[gid] = src[(size_t)rows[r] * width + i];
}

// dst[rows[r]] += src[r] for r < n (rows may repeat: atomic).
extern "C" __global__ void prof_scatter_add(const float* src, const int* rows, int n, int width,
                                            float* dst) {
    long long gid = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (gid >= (long long)n * width) return;
    int r = (int)(gid / width), i = (int)(gid % width);
    atomicAdd(dst + (size_t)rows[r] * width + i, src[gid]);
}

// x[i] += y[i].
extern "C" __global__ void prof_add(float* x, const float* y, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] += y[i];
}

// h = silu(g) * u.
extern "C" __global__ void prof_swiglu(const float* g, const float* u, float* h, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float v = g[i];
    h[i] = v / (1.0f + expf(-v)) * u[i];
}

// Given dh in dh_dg: du = dh * silu(g), dg (over dh) = dh * u * silu'(g).
extern "C" __global__ void prof_swiglu_bwd(const float* g, const float* u, float* dh_dg,
                                           float* du, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float v = g[i], d = dh_dg[i];
    float sig = 1.0f / (1.0f + expf(-v));
    du[i] = d * (v * sig);
    dh_dg[i] = d * u[i] * sig * (1.0f + v * (1.0f - sig));
}

// Block-wide sum of one double per thread (blockDim.x a multiple of 32, at most 1024); every
// thread gets the total.
__device__ double prof_block_sum(double v) {
    __shared__ double red[32];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    __syncthreads();  // red may still be read by a previous call
    if (threadIdx.x % WARP == 0) red[threadIdx.x / WARP] = v;
    __syncthreads();
    double s = 0.0;
    int nw = blockDim.x / WARP;
    for (int w = 0; w < nw; w++) s += red[w];
    return s;
}

// y[t] = x[t] / sqrt(mean(x[t]^2) + eps) * w; the mean of squares in f64 (as linalg::rms_norm).
// One block per row.
extern "C" __global__ void prof_rms_norm(const float* x, const float* w, float eps, int width,
                                         float* y) {
    const float* xr = x + (size_t)blockIdx.x * width;
    float* yr = y + (size_t)blockIdx.x * width;
    double s = 0.0;
    for (int i = threadIdx.x; i < width; i += blockDim.x) s += (double)xr[i] * (double)xr[i];
    double ms = prof_block_sum(s) / (double)width;
    float r = (float)(1.0 / sqrt(ms + (double)eps));
    for (int i = threadIdx.x; i < width; i += blockDim.x) yr[i] = xr[i] * r * w[i];
}

// dx[t] += dL/dx[t] given dy[t] = dL/dy[t] of prof_rms_norm (as linalg::rms_norm_backward):
// dx += r (dy w) - x r^3 <dy w, x> / width. One block per row.
extern "C" __global__ void prof_rms_norm_bwd(const float* x, const float* w, float eps,
                                             const float* dy, int width, float* dx) {
    size_t off = (size_t)blockIdx.x * width;
    const float *xr = x + off, *dyr = dy + off;
    float* dxr = dx + off;
    double s = 0.0, dot = 0.0;
    for (int i = threadIdx.x; i < width; i += blockDim.x) {
        double v = (double)xr[i];
        s += v * v;
        dot += (double)(dyr[i] * w[i]) * v;
    }
    double ms = prof_block_sum(s) / (double)width;
    dot = prof_block_sum(dot);
    double r = 1.0 / sqrt(ms + (double)eps);
    float c = (float)(r * r * r * dot / (double)width);
    float rf = (float)r;
    for (int i = threadIdx.x; i < width; i += blockDim.x)
        dxr[i] += rf * dyr[i] * w[i] - c * xr[i];
}

// Rotates adjacent pairs (2i, 2i+1), i < half_rot, of every head of every row by the row's
// angles cs[t * half_rot + i] = (cos, sin); sign -1 rotates backwards (the gradient).
extern "C" __global__ void prof_rope(float* x, int n_tok, int n_heads, int head_dim,
                                     int half_rot, const float2* cs, float sign) {
    long long gid = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    long long per_tok = (long long)n_heads * half_rot;
    if (gid >= (long long)n_tok * per_tok) return;
    int t = (int)(gid / per_tok), r = (int)(gid % per_tok);
    int h = r / half_rot, i = r % half_rot;
    float2 c = cs[(size_t)t * half_rot + i];
    float s = sign * c.y;
    float* p = x + (size_t)t * n_heads * head_dim + h * head_dim + 2 * i;
    float a = p[0], b = p[1];
    p[0] = a * c.x - b * s;
    p[1] = a * s + b * c.x;
}

// Softmax cross-entropy of each logits row (one block per row) against its target: loss[r] =
// logsumexp(row) - row[target] (f64), and the row replaced by its gradient of the mean over
// `total` rows: (softmax - onehot) / total (as forward::loss_and_grad).
extern "C" __global__ void prof_xent(float* logits, int n_vocab, const int* target, int total,
                                     double* loss) {
    float* row = logits + (size_t)blockIdx.x * n_vocab;
    float m = NEG_INF;
    for (int i = threadIdx.x; i < n_vocab; i += blockDim.x) m = fmaxf(m, row[i]);
    __shared__ float smax[32];
    m = warp_max(m);
    if (threadIdx.x % WARP == 0) smax[threadIdx.x / WARP] = m;
    __syncthreads();
    m = smax[0];
    for (int w = 1; w < (int)(blockDim.x / WARP); w++) m = fmaxf(m, smax[w]);
    double z = 0.0;
    for (int i = threadIdx.x; i < n_vocab; i += blockDim.x) z += exp((double)row[i] - (double)m);
    z = prof_block_sum(z);
    double lz = (double)m + log(z);
    int t = target[blockIdx.x];
    float lt = row[t];
    __syncthreads();  // every thread has read row[t] before it is overwritten
    if (threadIdx.x == 0) loss[blockIdx.x] = lz - (double)lt;
    for (int i = threadIdx.x; i < n_vocab; i += blockDim.x)
        row[i] = (float)(exp((double)row[i] - lz) / (double)total);
    __syncthreads();
    if (threadIdx.x == 0) row[t] -= 1.0f / (float)total;
}

// dsum[h * n + i] = <dout_i, o_i> over head h's dims (= sum_k G_ik A_ik of the influence).
// One warp per (row, head).
extern "C" __global__ void prof_attn_dsum(const float* dout, const float* o, int n, int n_head,
                                          int head_dim, float* dsum) {
    long long w = ((long long)blockIdx.x * blockDim.x + threadIdx.x) / WARP;
    int lane = threadIdx.x % WARP;
    if (w >= (long long)n * n_head) return;
    int i = (int)(w / n_head), h = (int)(w % n_head);
    size_t off = (size_t)i * n_head * head_dim + (size_t)h * head_dim;
    float s = 0.0f;
    for (int d = lane; d < head_dim; d += WARP) s += dout[off + d] * o[off + d];
    s = warp_sum(s);
    if (lane == 0) dsum[(size_t)h * n + i] = s;
}

// ---- attention --------------------------------------------------------------------------------

// Copies rows row0.. (64 of them; zeros past n) of one head (columns col0..col0+D of rows of
// `stride` floats) into a shared tile of D + 1 floats per row.
template <int D>
__device__ __forceinline__ void pa_load(float* dst, const float* src, int row0, int n,
                                        int stride, int col0) {
    for (int idx = threadIdx.x; idx < PA_T * D; idx += PA_THREADS) {
        int r = idx / D, d = idx % D;
        int gr = row0 + r;
        dst[r * (D + 1) + d] = gr < n ? src[(size_t)gr * stride + col0 + d] : 0.0f;
    }
}

// acc[a][b] = <A row ty + 16a, B row tx + 16b> over D (shared tiles of D + 1 floats per row).
template <int D>
__device__ __forceinline__ void pa_dots(const float* A, const float* B, float acc[4][4], int ty,
                                        int tx) {
#pragma unroll
    for (int a = 0; a < 4; a++)
#pragma unroll
        for (int b = 0; b < 4; b++) acc[a][b] = 0.0f;
#pragma unroll 4
    for (int d = 0; d < D; d++) {
        float av[4], bv[4];
#pragma unroll
        for (int a = 0; a < 4; a++) av[a] = A[(ty + 16 * a) * (D + 1) + d];
#pragma unroll
        for (int b = 0; b < 4; b++) bv[b] = B[(tx + 16 * b) * (D + 1) + d];
#pragma unroll
        for (int a = 0; a < 4; a++)
#pragma unroll
            for (int b = 0; b < 4; b++) acc[a][b] += av[a] * bv[b];
    }
}

// acc[a][c] += sum_j P[ty + 16a][j] * M[j][tx + 16c] (P: 64 x 64 in rows of 65; M: 64 x D in
// rows of D + 1).
template <int D>
__device__ __forceinline__ void pa_pm(const float* P, const float* M, float acc[4][D / 16],
                                      int ty, int tx) {
#pragma unroll 4
    for (int j = 0; j < PA_T; j++) {
        float pv[4];
#pragma unroll
        for (int a = 0; a < 4; a++) pv[a] = P[(ty + 16 * a) * PA_PT + j];
#pragma unroll
        for (int c = 0; c < D / 16; c++) {
            float m = M[j * (D + 1) + tx + 16 * c];
#pragma unroll
            for (int a = 0; a < 4; a++) acc[a][c] += pv[a] * m;
        }
    }
}

// Sum over the 16 threads sharing a row (lanes xor 1..8 stay within a half warp).
__device__ __forceinline__ float pa_row_sum(float v) {
#pragma unroll
    for (int o = 8; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float pa_row_max(float v) {
#pragma unroll
    for (int o = 8; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Forward attention, one block per (query tile, head): o (rows of n_head * D) and
// lse[h * n + i], the log-sum-exp of row i's scaled scores. Dynamic shared memory:
// 2 * 64 * (D + 1) + 64 * 65 floats.
template <int D>
__device__ void pa_fwd(const float* q, const float* k, const float* v, int n, int n_head,
                       int n_head_kv, float scale, float* o, float* lse) {
    extern __shared__ float pa_smem[];
    float* sq = pa_smem;
    float* skv = sq + PA_T * (D + 1);
    float* sp = skv + PA_T * (D + 1);
    // Last query tiles (the longest) first.
    const int qb = gridDim.x - 1 - blockIdx.x, h = blockIdx.y, g = h / (n_head / n_head_kv);
    const int qw = n_head * D, kvw = n_head_kv * D;
    const int r0 = qb * PA_T;
    const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
    pa_load<D>(sq, q, r0, n, qw, h * D);
    float m[4], l[4], acc[4][D / 16];
#pragma unroll
    for (int a = 0; a < 4; a++) {
        m[a] = NEG_INF;
        l[a] = 0.0f;
#pragma unroll
        for (int c = 0; c < D / 16; c++) acc[a][c] = 0.0f;
    }
    for (int kb = 0; kb <= qb; kb++) {
        const int c0 = kb * PA_T;
        __syncthreads();  // the previous tile's V and P are no longer read
        pa_load<D>(skv, k, c0, n, kvw, g * D);
        __syncthreads();
        float s[4][4];
        pa_dots<D>(sq, skv, s, ty, tx);
        float corr[4];
#pragma unroll
        for (int a = 0; a < 4; a++) {
            int i = r0 + ty + 16 * a;
            float mx = NEG_INF;
#pragma unroll
            for (int b = 0; b < 4; b++) {
                int j = c0 + tx + 16 * b;
                bool ok = i < n && j <= i;
                s[a][b] = ok ? s[a][b] * scale : NEG_INF;
                mx = fmaxf(mx, s[a][b]);
            }
            mx = pa_row_max(mx);
            float m_new = fmaxf(m[a], mx);
            corr[a] = m[a] == NEG_INF ? 0.0f : expf(m[a] - m_new);
            float ps = 0.0f;
#pragma unroll
            for (int b = 0; b < 4; b++) {
                float p = s[a][b] == NEG_INF ? 0.0f : expf(s[a][b] - m_new);
                s[a][b] = p;
                ps += p;
            }
            l[a] = l[a] * corr[a] + ps;  // this thread's columns only; summed at the end
            m[a] = m_new;
        }
        __syncthreads();  // K is no longer read
        pa_load<D>(skv, v, c0, n, kvw, g * D);
#pragma unroll
        for (int a = 0; a < 4; a++)
#pragma unroll
            for (int b = 0; b < 4; b++) sp[(ty + 16 * a) * PA_PT + tx + 16 * b] = s[a][b];
        __syncthreads();
#pragma unroll
        for (int a = 0; a < 4; a++)
#pragma unroll
            for (int c = 0; c < D / 16; c++) acc[a][c] *= corr[a];
        pa_pm<D>(sp, skv, acc, ty, tx);
    }
#pragma unroll
    for (int a = 0; a < 4; a++) {
        int i = r0 + ty + 16 * a;
        float lt = pa_row_sum(l[a]);
        if (i >= n) continue;
        float inv = 1.0f / lt;
#pragma unroll
        for (int c = 0; c < D / 16; c++)
            o[(size_t)i * qw + h * D + tx + 16 * c] = acc[a][c] * inv;
        if (tx == 0) lse[(size_t)h * n + i] = m[a] + logf(lt);
    }
}

// Influence of one entry (influence::entry): a = A_ij, g = G_ij, gbar = sum_k G_ik A_ik.
__device__ __forceinline__ float pa_entry(float a, float g, float gbar, bool only_key) {
    return only_key ? -g * a : -a * (g - gbar) / (1.0f - a + 1e-6f);
}

// Backward attention for one (query tile, head): dq (rows of n_head * D) and the |E| sums of
// the tile's entries per fine block of fb x fb entries (fb divides 64): head h's packed
// lower-triangular fine matrix at infl + h * cells, cell fq * (fq + 1) / 2 + fk. Every cell with
// fk <= fq < ceil(n / fb) is written by exactly one block. Dynamic shared memory:
// 3 * 64 * (D + 1) + 64 * 65 + 2 * 64 + (64 / fb)^2 floats.
template <int D>
__device__ void pa_bwd_q(const float* q, const float* k, const float* v, const float* dout,
                         const float* lse, const float* dsum, int n, int n_head, int n_head_kv,
                         float scale, int fb, long long cells, float* dq, float* infl) {
    extern __shared__ float pa_smem[];
    float* sq = pa_smem;
    float* sdo = sq + PA_T * (D + 1);
    float* skv = sdo + PA_T * (D + 1);
    float* sds = skv + PA_T * (D + 1);
    float* slse = sds + PA_T * PA_PT;
    float* sdsum = slse + PA_T;
    float* sinf = sdsum + PA_T;
    // Last query tiles (the longest) first.
    const int qb = gridDim.x - 1 - blockIdx.x, h = blockIdx.y, g = h / (n_head / n_head_kv);
    const int qw = n_head * D, kvw = n_head_kv * D;
    const int r0 = qb * PA_T;
    const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
    const int nsub = PA_T / fb, ncell = nsub * nsub;
    pa_load<D>(sq, q, r0, n, qw, h * D);
    pa_load<D>(sdo, dout, r0, n, qw, h * D);
    for (int r = threadIdx.x; r < PA_T; r += PA_THREADS) {
        int i = r0 + r;
        slse[r] = i < n ? lse[(size_t)h * n + i] : 0.0f;
        sdsum[r] = i < n ? dsum[(size_t)h * n + i] : 0.0f;
    }
    float acc[4][D / 16];
#pragma unroll
    for (int a = 0; a < 4; a++)
#pragma unroll
        for (int c = 0; c < D / 16; c++) acc[a][c] = 0.0f;
    float* infl_h = infl + (long long)h * cells;
    for (int kb = 0; kb <= qb; kb++) {
        const int c0 = kb * PA_T;
        __syncthreads();  // the previous tile's K, dS and block sums are no longer read
        pa_load<D>(skv, v, c0, n, kvw, g * D);
        for (int c = threadIdx.x; c < ncell; c += PA_THREADS) sinf[c] = 0.0f;
        __syncthreads();
        float gm[4][4];
        pa_dots<D>(sdo, skv, gm, ty, tx);  // G = dO V^T
        __syncthreads();                    // V is no longer read
        pa_load<D>(skv, k, c0, n, kvw, g * D);
        __syncthreads();
        float s[4][4];
        pa_dots<D>(sq, skv, s, ty, tx);
        float esum = 0.0f;
#pragma unroll
        for (int a = 0; a < 4; a++) {
            int rl = ty + 16 * a, i = r0 + rl;
#pragma unroll
            for (int b = 0; b < 4; b++) {
                int cl = tx + 16 * b, j = c0 + cl;
                bool ok = i < n && j <= i;
                float p = ok ? expf(s[a][b] * scale - slse[rl]) : 0.0f;
                float e = ok ? fabsf(pa_entry(p, gm[a][b], sdsum[rl], i == 0)) : 0.0f;
                if (nsub == 1)
                    esum += e;
                else if (ok)
                    atomicAdd(sinf + (rl / fb) * nsub + cl / fb, e);
                sds[rl * PA_PT + cl] = ok ? p * (gm[a][b] - sdsum[rl]) : 0.0f;
            }
        }
        if (nsub == 1) {
            esum = warp_sum(esum);
            if (threadIdx.x % WARP == 0) atomicAdd(sinf, esum);
        }
        __syncthreads();
        for (int c = threadIdx.x; c < ncell; c += PA_THREADS) {
            long long fq = (r0 + (c / nsub) * fb) / fb, fk = (c0 + (c % nsub) * fb) / fb;
            // Only cells of the lower triangle that start inside the sequence exist.
            if (fk <= fq && fq * fb < n) infl_h[fq * (fq + 1) / 2 + fk] = sinf[c];
        }
        pa_pm<D>(sds, skv, acc, ty, tx);  // dQ += dS K (scaled at the end)
    }
#pragma unroll
    for (int a = 0; a < 4; a++) {
        int i = r0 + ty + 16 * a;
        if (i >= n) continue;
#pragma unroll
        for (int c = 0; c < D / 16; c++)
            dq[(size_t)i * qw + h * D + tx + 16 * c] = acc[a][c] * scale;
    }
}

// Backward attention for one (key tile, KV head) over the group's query heads and every query
// tile at or after it: dk, dv (rows of n_head_kv * D). Dynamic shared memory:
// 4 * 64 * (D + 1) + 64 * 65 + 2 * 64 floats.
template <int D>
__device__ void pa_bwd_kv(const float* q, const float* k, const float* v, const float* dout,
                          const float* lse, const float* dsum, int n, int n_head, int n_head_kv,
                          float scale, float* dk, float* dv) {
    extern __shared__ float pa_smem[];
    float* sk = pa_smem;
    float* sv = sk + PA_T * (D + 1);
    float* sq = sv + PA_T * (D + 1);
    float* sdo = sq + PA_T * (D + 1);
    float* sp = sdo + PA_T * (D + 1);
    float* slse = sp + PA_T * PA_PT;
    float* sdsum = slse + PA_T;
    const int kb = blockIdx.x, g = blockIdx.y, gs = n_head / n_head_kv;
    const int qw = n_head * D, kvw = n_head_kv * D;
    const int c0 = kb * PA_T, nqt = (n + PA_T - 1) / PA_T;
    const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
    pa_load<D>(sk, k, c0, n, kvw, g * D);
    pa_load<D>(sv, v, c0, n, kvw, g * D);
    float ak[4][D / 16], av[4][D / 16];
#pragma unroll
    for (int a = 0; a < 4; a++)
#pragma unroll
        for (int c = 0; c < D / 16; c++) {
            ak[a][c] = 0.0f;
            av[a][c] = 0.0f;
        }
    for (int hh = 0; hh < gs; hh++) {
        const int h = g * gs + hh;
        for (int qb = kb; qb < nqt; qb++) {
            const int r0 = qb * PA_T;
            __syncthreads();  // the previous tile's Q, dO and dS are no longer read
            pa_load<D>(sq, q, r0, n, qw, h * D);
            pa_load<D>(sdo, dout, r0, n, qw, h * D);
            for (int r = threadIdx.x; r < PA_T; r += PA_THREADS) {
                int i = r0 + r;
                slse[r] = i < n ? lse[(size_t)h * n + i] : 0.0f;
                sdsum[r] = i < n ? dsum[(size_t)h * n + i] : 0.0f;
            }
            __syncthreads();
            // Transposed tiles: rows are keys (ty + 16a), columns queries (tx + 16b).
            float s[4][4], gm[4][4];
            pa_dots<D>(sk, sq, s, ty, tx);
            pa_dots<D>(sv, sdo, gm, ty, tx);
#pragma unroll
            for (int a = 0; a < 4; a++) {
                int j = c0 + ty + 16 * a;
#pragma unroll
                for (int b = 0; b < 4; b++) {
                    int rl = tx + 16 * b, i = r0 + rl;
                    bool ok = i < n && j <= i;
                    float p = ok ? expf(s[a][b] * scale - slse[rl]) : 0.0f;
                    s[a][b] = p;
                    gm[a][b] = ok ? p * (gm[a][b] - sdsum[rl]) : 0.0f;  // dS^T
                    sp[(ty + 16 * a) * PA_PT + rl] = p;
                }
            }
            __syncthreads();
            pa_pm<D>(sp, sdo, av, ty, tx);  // dV += P^T dO
            __syncthreads();
#pragma unroll
            for (int a = 0; a < 4; a++)
#pragma unroll
                for (int b = 0; b < 4; b++) sp[(ty + 16 * a) * PA_PT + tx + 16 * b] = gm[a][b];
            __syncthreads();
            pa_pm<D>(sp, sq, ak, ty, tx);  // dK += dS^T Q (scaled at the end)
        }
    }
#pragma unroll
    for (int a = 0; a < 4; a++) {
        int j = c0 + ty + 16 * a;
        if (j >= n) continue;
#pragma unroll
        for (int c = 0; c < D / 16; c++) {
            dk[(size_t)j * kvw + g * D + tx + 16 * c] = ak[a][c] * scale;
            dv[(size_t)j * kvw + g * D + tx + 16 * c] = av[a][c];
        }
    }
}

#define PA_KERNELS(D)                                                                            \
    extern "C" __global__ void __launch_bounds__(PA_THREADS) prof_attn_fwd_d##D(                 \
        const float* q, const float* k, const float* v, int n, int n_head, int n_head_kv,       \
        float scale, float* o, float* lse) {                                                     \
        pa_fwd<D>(q, k, v, n, n_head, n_head_kv, scale, o, lse);                                 \
    }                                                                                            \
    extern "C" __global__ void __launch_bounds__(PA_THREADS) prof_attn_bwd_q_d##D(               \
        const float* q, const float* k, const float* v, const float* dout, const float* lse,    \
        const float* dsum, int n, int n_head, int n_head_kv, float scale, int fb,               \
        long long cells, float* dq, float* infl) {                                               \
        pa_bwd_q<D>(q, k, v, dout, lse, dsum, n, n_head, n_head_kv, scale, fb, cells, dq,       \
                    infl);                                                                       \
    }                                                                                            \
    extern "C" __global__ void __launch_bounds__(PA_THREADS) prof_attn_bwd_kv_d##D(              \
        const float* q, const float* k, const float* v, const float* dout, const float* lse,    \
        const float* dsum, int n, int n_head, int n_head_kv, float scale, float* dk,            \
        float* dv) {                                                                             \
        pa_bwd_kv<D>(q, k, v, dout, lse, dsum, n, n_head, n_head_kv, scale, dk, dv);             \
    }

PA_KERNELS(64)
PA_KERNELS(128)
