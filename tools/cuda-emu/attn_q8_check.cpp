// CPU check of the whole span-attention kernel of cuda/attention.cu (attn_fa) with q8_0 K/V
// against itself with f16 K/V (tools/cuda-emu/attn_q8_check.sh). The kernel body is extracted
// from the source and run under emu.h (a thread per CUDA thread, barriers, shuffles, dynamic
// shared memory filled with NaN) with the tensor-core instructions emulated per warp (mma.sync
// m16n8k16 and ldmatrix .x2 .trans by their fragment layouts) and cp.async as an immediate copy
// (a write into a stage still being read would show). The f16 instantiation is fed the f16
// rounding of the dequantized q8_0 rows, which is exactly what the q8_0 instantiations convert
// their tiles to, so every q8_0 / mixed variant must give bit-identical outputs (and split
// partials); the f16 one is also compared with a double-precision masked softmax reference.
// Cases: decode and prefill shapes, head dims 64 and 128, GQA groups, sinks, rings that wrap,
// runs with their own staged keys, several splits.
#include <algorithm>
#include <cstdint>
#include "emu.h"
using std::max;
using std::min;
struct int2 { int x, y; };
struct uint4 { u32 x, y, z, w; };
inline uint4 make_uint4(u32 a, u32 b, u32 c, u32 d) { return {a, b, c, d}; }
#define __align__(x)
#define FA_THREADS 128
#define FA_KEYS 64
#define FA_STAGES 2
#define FA_MIN_PER 128
#include "emu_data.h"
inline u32 pack_h2(float lo, float hi) { return (u32)f2h(lo) | ((u32)f2h(hi) << 16); }
inline void pdl_trigger() {}
inline void pdl_wait() {}
inline void __syncwarp() { g_warps[threadIdx.x / 32].bar->arrive_and_wait(); }
inline float ex2(float x) { return exp2f(x); }
#include "emu_cp_async.h"
struct WarpX { u32 a[32][4]; u32 b[32][2]; const u16* p[32]; };
WarpX g_x[4];
inline float hv(u32 v, int hi) { return h2f(hi ? (u16)(v >> 16) : (u16)(v & 0xffff)); }
// m16n8k16, row.col, f16 in, f32 accumulate.
inline void mma16816(float* c, const u32* a, u32 b0, u32 b1) {
    const int lane = threadIdx.x % 32, wi = threadIdx.x / 32;
    WarpX& x = g_x[wi];
    memcpy(x.a[lane], a, 16);
    x.b[lane][0] = b0;
    x.b[lane][1] = b1;
    g_warps[wi].bar->arrive_and_wait();
    auto A = [&](int r, int k) { return hv(x.a[(r % 8) * 4 + (k % 8) / 2][(r / 8) + 2 * (k / 8)], k % 2); };
    auto B = [&](int k, int n) { return hv(x.b[n * 4 + (k % 8) / 2][k / 8], k % 2); };
    const int gq = lane >> 2, cq = lane & 3;
    for (int e = 0; e < 4; e++) {
        const int r = gq + 8 * (e >> 1), n = 2 * cq + (e & 1);
        float s = 0;
        for (int k = 0; k < 16; k++) s += A(r, k) * B(k, n);
        c[e] += s;
    }
    g_warps[wi].bar->arrive_and_wait();
}
inline void ldsm_x2_trans(u32& b0, u32& b1, const u16* p) {
    const int lane = threadIdx.x % 32, wi = threadIdx.x / 32;
    WarpX& x = g_x[wi];
    x.p[lane] = p;
    g_warps[wi].bar->arrive_and_wait();
    const int r = 2 * (lane % 4), c = lane / 4;
    b0 = (u32)x.p[r][c] | ((u32)x.p[r + 1][c] << 16);
    b1 = (u32)x.p[8 + r][c] | ((u32)x.p[9 + r][c] << 16);
    g_warps[wi].bar->arrive_and_wait();
}
#include "attn_extract.cuh"


static u16 deq16(const u8* row, int i) {
    const u8* blk = row + i / 32 * 34;
    u16 dh; memcpy(&dh, blk, 2);
    return f2h(h2f(dh) * (float)(i8)blk[2 + i % 32]);
}

struct Case { int D, WK, G, hk, cap, sink, p0, nt, n_split; };

template <int D, int WK, bool KQ, bool VQ>
static void run(const Case& c, const std::vector<float>& q, const std::vector<u8>* k8, const std::vector<u16>* k16,
                const std::vector<int>& pos, const std::vector<int>& seq, const std::vector<int>& p0v,
                const std::vector<int>& rsv, const std::vector<int2>& tiles, const std::vector<int>& caps,
                const std::vector<int>& offs, int rows_per_seq, std::vector<float>& out, std::vector<float>& part,
                i8* yq = nullptr, float2* yds = nullptr) {
    // k8/k16: [0] cache K, [1] cache V, [2] staged K, [3] staged V.
    auto P = [&](int i, bool q8) -> const u16* { return q8 ? (const u16*)k8[i].data() : k16[i].data(); };
    const int n_head = c.G * c.hk;
    const size_t smem = FaSmem<D, KQ, VQ>::BYTES;
    launch({(unsigned)tiles.size(), (unsigned)c.hk, (unsigned)c.n_split}, FA_THREADS, smem, [&] {
        attn_fa<D, WK, KQ, VQ>(q.data(), P(2, KQ), P(3, VQ), P(0, KQ), P(1, VQ), pos.data(), seq.data(),
                               p0v.data(), rsv.data(), tiles.data(), c.G, n_head, c.hk, caps.data(),
                               offs.data(), rows_per_seq, c.sink, c.n_split, 1.0f / sqrtf((float)D),
                               out.data(), part.data(), yq, yds);
    });
}

template <int D, int WK>
static int check(const Case& c) {
    const int hk = c.hk, G = c.G, n_head = G * hk, nt = c.nt, rs0 = 1, nb = rs0 + nt;
    const int RB = D / 32 * 34;
    std::vector<int> caps(hk), offs(hk);
    int rows_per_seq = 0;
    for (int h = 0; h < hk; h++) {
        caps[h] = h == 0 ? c.cap : std::min(c.p0 + nt + 5, c.cap + 37 * h);  // heads differ
        if (caps[h] <= c.sink) caps[h] = c.sink + 1;
        offs[h] = rows_per_seq;
        rows_per_seq += caps[h];
    }
    const int seqid = 1, nseq = 2;
    // Cache rows hold the key of the position their slot holds; other rows random too.
    std::vector<std::vector<u8>> k8(4);
    std::vector<std::vector<u16>> k16(4);
    std::vector<float> x(D);
    // Keys by (position, head) for the reference (f16 values as both kernels see them).
    const int npos = c.p0 + nt;
    std::vector<u16> kref((size_t)npos * hk * D), vref((size_t)npos * hk * D);
    for (int kv = 0; kv < 2; kv++) {
        k8[kv].resize((size_t)nseq * rows_per_seq * RB);
        k8[2 + kv].resize((size_t)nb * hk * RB);
        for (auto& b : k8[kv]) b = (u8)rnd();
        for (size_t r = 0; r < (size_t)nseq * rows_per_seq; r++) { u16 d = f2h(0.01f); memcpy(&k8[kv][r * RB], &d, 2); memcpy(&k8[kv][r * RB + 34], &d, 2); if (D == 128) { memcpy(&k8[kv][r * RB + 68], &d, 2); memcpy(&k8[kv][r * RB + 102], &d, 2); } }
        for (auto& b : k8[2 + kv]) b = 0;
        for (int h = 0; h < hk; h++) {
            for (int j = 0; j < npos; j++) {
                for (int i = 0; i < D; i++) x[i] = rf() * (kv ? 1.0f : 2.0f) * (1 + (i / 32) % 3);
                u8* dst;
                if (j < c.p0) {
                    const int cap = caps[h];
                    const int slot = (j < c.sink || cap <= c.sink) ? j : c.sink + (j - c.sink) % (cap - c.sink);
                    dst = &k8[kv][((size_t)seqid * rows_per_seq + offs[h] + slot) * RB];
                } else {
                    dst = &k8[2 + kv][((size_t)(rs0 + j - c.p0) * hk + h) * RB];
                }
                quant_row(x.data(), D, dst);
                u16* ref = (kv ? vref : kref).data() + ((size_t)j * hk + h) * D;
                for (int i = 0; i < D; i++) ref[i] = deq16(dst, i);
            }
        }
        // Ring slots overwritten by later positions: the reference keeps the newest (visible) ones.
        for (int i = 0; i < 2; i++) {
            const auto& src = k8[kv + 2 * i];
            auto& dst = k16[kv + 2 * i];
            const size_t rows = src.size() / RB;
            dst.resize(rows * D);
            for (size_t r = 0; r < rows; r++)
                for (int e = 0; e < D; e++) dst[r * D + e] = deq16(&src[r * RB], e);
        }
    }
    // Cache positions whose slot a later cached position took are not visible to the run's queries
    // anyway (the mask), but the reference reads keys by position: rebuild them from the cache.
    for (int kv = 0; kv < 2; kv++)
        for (int h = 0; h < hk; h++)
            for (int j = 0; j < c.p0; j++) {
                const int cap = caps[h];
                const int slot = (j < c.sink || cap <= c.sink) ? j : c.sink + (j - c.sink) % (cap - c.sink);
                const u16* row = &k16[kv][((size_t)seqid * rows_per_seq + offs[h] + slot) * D];
                memcpy((kv ? vref : kref).data() + ((size_t)j * hk + h) * D, row, D * 2);
            }
    std::vector<float> q((size_t)nb * n_head * D);
    for (auto& v : q) v = rf();
    std::vector<int> pos(nb), seq(nb), p0v(nb), rsv(nb);
    for (int t = 0; t < nb; t++) { pos[t] = t < rs0 ? 0 : c.p0 + t - rs0; seq[t] = t < rs0 ? 0 : seqid; p0v[t] = t < rs0 ? 0 : c.p0; rsv[t] = t < rs0 ? 0 : rs0; }
    const int tq = std::max(1, (WK == 4 ? 16 : 64) / G);
    std::vector<int2> tiles;
    for (int tb = 0; tb < nt; tb += tq) tiles.push_back({rs0 + tb, std::min(tq, nt - tb)});
    const size_t on = (size_t)nb * n_head * D, pn = (size_t)nb * n_head * c.n_split * (D + 2);
    std::vector<float> out[4], part[4];
    for (int v = 0; v < 4; v++) { out[v].assign(on, -7.0f); part[v].assign(pn, -7.0f); }
    run<D, WK, false, false>(c, q, k8.data(), k16.data(), pos, seq, p0v, rsv, tiles, caps, offs, rows_per_seq, out[0], part[0]);
    run<D, WK, true, true>(c, q, k8.data(), k16.data(), pos, seq, p0v, rsv, tiles, caps, offs, rows_per_seq, out[1], part[1]);
    run<D, WK, true, false>(c, q, k8.data(), k16.data(), pos, seq, p0v, rsv, tiles, caps, offs, rows_per_seq, out[2], part[2]);
    run<D, WK, false, true>(c, q, k8.data(), k16.data(), pos, seq, p0v, rsv, tiles, caps, offs, rows_per_seq, out[3], part[3]);
    int bad = 0;
    // The decode kernel unsplit also leaves its output in q8_1 (for the output projection): the
    // f16 variant again with yq/yds, against the q8_1 quantization of its float output.
    if (WK == 4 && c.n_split == 1) {
        std::vector<i8> yq(on, 99);
        std::vector<float2> yds(on / 32, float2{-1.0f, -1.0f});
        std::vector<float> o2(on, -7.0f), p2(pn, -7.0f);
        run<D, WK, false, false>(c, q, k8.data(), k16.data(), pos, seq, p0v, rsv, tiles, caps, offs, rows_per_seq, o2, p2,
                                 yq.data(), yds.data());
        size_t qbad = memcmp(o2.data(), out[0].data(), on * 4) != 0;
        for (size_t b = (size_t)rs0 * n_head * D / 32; b < on / 32; b++) {
            float amax = 0;
            for (int e = 0; e < 32; e++) amax = std::max(amax, std::fabs(out[0][b * 32 + e]));
            const float id = amax != 0.0f ? 127.0f / amax : 0.0f;
            int sum = 0;
            for (int e = 0; e < 32; e++) {
                const int qv = (int)rintf(out[0][b * 32 + e] * id);
                sum += qv;
                qbad += yq[b * 32 + e] != qv;
            }
            const float d = amax / 127.0f;
            qbad += yds[b].x != h2f(f2h(d)) || yds[b].y != h2f(f2h(d * (float)sum));
        }
        if (qbad) {
            fprintf(stderr, "D %d G %d hk %d: q8_1 output differs in %zu places\n", D, G, hk, qbad);
            bad++;
        }
    }
    for (int v = 1; v < 4; v++) {
        if (memcmp(out[v].data(), out[0].data(), on * 4) || memcmp(part[v].data(), part[0].data(), pn * 4)) {
            size_t diff = 0;
            for (size_t i = 0; i < on; i++) diff += memcmp(&out[v][i], &out[0][i], 4) != 0;
            for (size_t i = 0; i < pn; i++) diff += memcmp(&part[v][i], &part[0][i], 4) != 0;
            fprintf(stderr, "D %d WK %d G %d hk %d cap %d sink %d p0 %d nt %d splits %d: variant %d differs from f16 in %zu values\n",
                    D, WK, G, hk, c.cap, c.sink, c.p0, nt, c.n_split, v, diff);
            bad++;
        }
    }
    // Reference (f16 Q, f16 keys/values as the kernel reads them), merged over splits.
    double worst = 0;
    for (int t = rs0; t < nb; t++)
        for (int h = 0; h < n_head; h++) {
            const int g = h / G, cap = caps[g], win = cap - c.sink, i = pos[t];
            std::vector<double> s;
            std::vector<int> js;
            for (int j = 0; j <= i; j++) {
                if (!(j < c.sink || i - j < win)) continue;
                double a = 0;
                for (int e = 0; e < D; e++) a += (double)h2f(f2h(q[((size_t)t * n_head + h) * D + e])) * h2f(kref[((size_t)j * hk + g) * D + e]);
                s.push_back(a / sqrt((double)D));
                js.push_back(j);
            }
            double m = -1e300, l = 0;
            for (double v : s) m = std::max(m, v);
            for (double& v : s) { v = exp(v - m); l += v; }
            for (int e = 0; e < D; e++) {
                double o = 0;
                for (size_t k = 0; k < s.size(); k++) o += s[k] * h2f(vref[((size_t)js[k] * hk + g) * D + e]);
                o /= l;
                double got;
                if (c.n_split == 1) {
                    got = out[0][((size_t)t * n_head + h) * D + e];
                } else {
                    double M = -1e300, L = 0, O = 0;
                    for (int z = 0; z < c.n_split; z++) M = std::max(M, (double)part[0][(((size_t)t * n_head + h) * c.n_split + z) * (D + 2) + D]);
                    for (int z = 0; z < c.n_split; z++) {
                        const float* pp = &part[0][(((size_t)t * n_head + h) * c.n_split + z) * (D + 2)];
                        if (pp[D] == -INFINITY) continue;
                        const double w = exp2(pp[D] - M);
                        O += w * pp[e];
                        L += w * pp[D + 1];
                    }
                    got = O / L;
                }
                worst = std::max(worst, std::fabs(got - o));
            }
        }
    if (!(worst < 2e-2)) {
        fprintf(stderr, "D %d WK %d G %d hk %d cap %d sink %d p0 %d nt %d splits %d: f16 kernel vs reference %g\n",
                D, WK, G, hk, c.cap, c.sink, c.p0, nt, c.n_split, worst);
        bad++;
    }
    printf("D %3d WK %d G %d hk %d cap %4d sink %2d p0 %4d nt %2d splits %d: %s (f16 vs reference %.2e)\n", D, WK, G, hk,
           c.cap, c.sink, c.p0, nt, c.n_split, bad ? "FAIL" : "ok", worst);
    return bad;
}

int main() {
    // {D, WK, G, hk, cap, sink, p0, nt, n_split}
    const Case cases[] = {
        {64, 4, 2, 2, 5000, 0, 300, 1, 2},   // dense decode, 2 splits
        {128, 4, 4, 1, 200, 4, 700, 2, 1},   // ring wrapped several times, sinks
        {64, 4, 8, 1, 150, 32, 400, 2, 3},   // ring, 3 splits (some empty)
        {128, 4, 4, 3, 3000, 4, 2000, 1, 7}, // one token, 7 splits, heads of different spans
        {64, 4, 4, 2, 120, 8, 900, 1, 1},    // one token, wrapped ring, unsplit
        {128, 4, 4, 2, 900, 0, 1000, 4, 5},  // four tokens, wrapped ring, 5 splits
        {128, 4, 1, 2, 5000, 0, 130, 9, 1},  // decode shape with 9 tokens in the run
        {64, 1, 2, 2, 5000, 0, 100, 40, 1},  // prefill, dense, run keys staged
        {128, 1, 4, 1, 140, 4, 500, 48, 2},  // prefill over a wrapped ring, 2 splits
        {64, 1, 1, 1, 90, 8, 60, 70, 1},     // prefill run longer than the ring
    };
    int bad = 0;
    // The K/V copies landing at once, then only when the kernel's wait retires them.
    for (bool defer : {false, true}) {
        emu_cp_defer = defer;
        printf("cp.async copies landing %s:\n", defer ? "at the wait" : "at once");
        for (const Case& c : cases) {
            if (c.D == 64) bad += c.WK == 4 ? check<64, 4>(c) : check<64, 1>(c);
            else bad += c.WK == 4 ? check<128, 4>(c) : check<128, 1>(c);
        }
    }
    printf("%s\n", bad ? "FAILED" : "all variants agree");
    return bad != 0;
}
