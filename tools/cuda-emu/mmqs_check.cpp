// CPU check of the tensor-core small-batch products (q8_1_mma_layout or, for the K-quants,
// q8k_mma_layout, then mmqs in cuda/quant.cu; tools/cuda-emu/mmqs_check.sh): the kernels run under emu.h (one OS thread per
// CUDA thread, barriers, shuffles) with mma.sync m16n8k16 and m16n8k32 .s8 emulated per warp
// by their PTX fragment layouts (A: lane 4g + c holds rows g and g + 8, columns 4c..4c+3 of each
// 16-column half; B: column g, rows 4c..4c+3 of each half; C: rows g, g + 8, columns 2c,
// 2c + 1), on random weight bytes (valid f16 scales),
// random q8_1 rows for 1 to 16 tokens (exactly n_tok rows allocated), one to three matrices per
// launch, the layout family the host picks per type (matmul.rs: mma_family). Every output must
// equal the row's units summed serially with the dp4a kernels' Unit<T> code, to float rounding,
// and nothing else may be written (token columns past n_tok, rows past a matrix).
#include "emu.h"
#include "emu_data.h"
#include "emu_quant.h"
struct float4 { float x, y, z, w; };
using std::min;
using std::max;
// mma.sync.aligned.m16n8k{16,32}.row.col.s32.s8.s8.s32, d += A B, by the PTX fragment layout of
// each shape (KH = K / 16 halves): A byte i of register j, lane 4g + c, is row g (j even) or
// g + 8 (j odd), column 16 (j / 2) + 4c + i; B byte i of register h is row 16 h + 4c + i,
// column g. The k32 MMA is thus emulated by its own layout, not as two k16 products.
struct MmaX { int a[4][32], b[2][32]; };
std::vector<MmaX> g_mma(8);
template <int KH>
inline void mma_s8_emu(int* d, const int (&a)[2 * KH], const int (&b)[KH]) {
    const int lane = threadIdx.x % 32, wi = threadIdx.x / 32;
    MmaX& x = g_mma[wi];
    for (int j = 0; j < 2 * KH; j++) x.a[j][lane] = a[j];
    for (int h = 0; h < KH; h++) x.b[h][lane] = b[h];
    g_warps[wi].bar->arrive_and_wait();
    auto byte = [](int v, int i) { return (int)(i8)(v >> (8 * i)); };
    auto A = [&](int r, int k) { return byte(x.a[2 * (k / 16) + r / 8][4 * (r % 8) + (k % 16) / 4], k % 4); };
    auto B = [&](int k, int n) { return byte(x.b[k / 16][4 * n + (k % 16) / 4], k % 4); };
    const int g = lane >> 2, c = lane & 3;
    for (int e = 0; e < 4; e++) {
        const int r = g + 8 * (e >> 1), n = 2 * c + (e & 1);
        int s = 0;
        for (int k = 0; k < 16 * KH; k++) s += A(r, k) * B(k, n);
        d[e] += s;
    }
    g_warps[wi].bar->arrive_and_wait();
}
inline void mma_s8(int* d, int a0, int a1, int b0) { mma_s8_emu<1>(d, {a0, a1}, {b0}); }
inline void mma_s8x2(int* d, int a0, int a1, int a2, int a3, int b0, int b1) {
    mma_s8_emu<2>(d, {a0, a1, a2, a3}, {b0, b1});
}
#include "mmqs_extract.cuh"  // with the T_* type ids and MV_WARPS of the kernel sources
#include "emu_quant_ref.h"

// ggml's quantize_row_q8_K on one token row (what the CPU backend's K-quant dots use), written
// as q8_1-shaped blocks (values, (d, d * sum)) so serial_row_dot prices them.
static void q8_k_as_q8_1(const float* x, int K, i8* yq, float2* yds) {
    for (int sb = 0; sb < K / 256; sb++) {
        const float* v = x + sb * 256;
        float amax = 0, mx = 0;
        for (int i = 0; i < 256; i++)
            if (std::fabs(v[i]) > amax) { amax = std::fabs(v[i]); mx = v[i]; }
        const float is = amax != 0 ? -127.0f / mx : 0.0f, d = amax != 0 ? 1.0f / is : 0.0f;
        for (int b = 0; b < 8; b++) {
            int sum = 0;
            for (int i = 0; i < 32; i++) {
                const int q = amax != 0 ? std::min((int)std::nearbyint(is * v[32 * b + i]), 127) : 0;
                yq[sb * 256 + 32 * b + i] = (i8)q;
                sum += q;
            }
            yds[sb * 8 + b] = {d, d * (float)sum};
        }
    }
}

template <int T>
static int run(const Ty& ty, int K, const int rows[3], int n_tok, bool one) {
    const int units = (T == T_Q4_K || T == T_Q5_K) ? K / 256 : T == T_Q6_K ? K / 128 : K / 32;
    const size_t row_bytes = (size_t)K / ty.block * ty.bytes;
    std::vector<std::vector<int4>> W(3);
    for (int m = 0; m < 3; m++) W[m] = random_weights(ty, rows[m], row_bytes);
    // Exactly n_tok q8_1 rows: a read past them is out of bounds (not clamped).
    std::vector<int4> yqv((size_t)n_tok * K / 16);
    i8* yq = (i8*)yqv.data();
    for (size_t i = 0; i < (size_t)n_tok * K; i++) yq[i] = (i8)rnd();
    std::vector<float2> yds((size_t)n_tok * K / 32);
    for (auto& d : yds) d = {rf() * 0.1f, rf()};
    // The K-quants take q8_K from f32 rows (exactly n_tok of them, some blocks scaled down
    // and one zero block, so the per-256 scale and the block sums matter); the reference
    // prices ggml's q8_K of the same rows.
    constexpr bool Q8K = T == T_Q4_K || T == T_Q5_K || T == T_Q6_K;
    std::vector<float> xf(Q8K ? (size_t)n_tok * K : 0);
    for (size_t i = 0; i < xf.size(); i++) {
        const size_t blk = i / 32 % 7;
        xf[i] = blk == 3 ? 0.0f : rf() * (blk == 1 ? 1e-3f : blk == 5 ? 30.0f : 1.0f);
    }
    if (Q8K)
        for (int t = 0; t < n_tok; t++) q8_k_as_q8_1(&xf[(size_t)t * K], K, yq + (size_t)t * K, &yds[(size_t)t * K / 32]);
    const float SENT = 12345.0f;
    const int ldo[3] = {rows[0] + 3, rows[1] + 1, rows[2] + 2};
    std::vector<float> out[3];
    for (int m = 0; m < 3; m++) out[m].assign((size_t)ldo[m] * 16, SENT);
    Rows3 rr = {(const u8*)W[0].data(), (const u8*)W[1].data(), (const u8*)W[2].data(), rows[0], rows[1], rows[2],
                out[0].data(), out[1].data(), out[2].data(), ldo[0], ldo[1], ldo[2]};
    const int total = rows[0] + rows[1] + rows[2];
    // The activations into fragment order (16 token slots), as the host launches it.
    const int nb = K / 32, fam = (T == T_Q4_K || T == T_Q5_K) ? 1 : 0;
    std::vector<int4> yqm_v((size_t)16 * K / 16);
    i8* yq_m = (i8*)yqm_v.data();
    std::vector<float2> yds_m((size_t)16 * nb, float2{NAN, NAN});
    memset(yq_m, 0x5a, (size_t)16 * K);
    if (Q8K)
        launch({(unsigned)((K / 256 * n_tok * 32 + 255) / 256), 1, 1}, 256, 0,
               [&] { q8k_mma_layout(xf.data(), K, K, n_tok, fam, yq_m, (float*)yds_m.data()); });
    else
        launch({(unsigned)((nb * 64 + 255) / 256), 1, 1}, 256, 0,
               [&] { q8_1_mma_layout(yq, yds.data(), K, n_tok, yq_m, yds_m.data()); });
    launch({(unsigned)((total + 15) / 16), 1, 1}, MQ_WARPS * WARP, 0, [&] {
        if (n_tok <= 8) mmqs<T, 8>(rr, row_bytes, units, yq_m, yds_m.data(), K, n_tok);
        else if (one) mmqs<T, 16, true>(rr, row_bytes, units, yq_m, yds_m.data(), K, n_tok);
        else mmqs<T, 16>(rr, row_bytes, units, yq_m, yds_m.data(), K, n_tok);
    });
    int bad = 0;
    double worst = 0;
    for (int m = 0; m < 3; m++)
        for (int t = 0; t < 16; t++)
            for (int r = 0; r < ldo[m]; r++) {
                const float got = out[m][(size_t)t * ldo[m] + r];
                if (r >= rows[m] || t >= n_tok) {
                    if (got != SENT) { bad++; fprintf(stderr, "  %s: wrote outside (matrix %d row %d token %d)\n", ty.name, m, r, t); }
                    continue;
                }
                const u8* row = (const u8*)W[m].data() + r * row_bytes;
                double scale;
                const double want = serial_row_dot<T>(row, K, yq + (size_t)t * K, yds.data() + (size_t)t * K / 32, &scale);
                const double err = std::fabs(got - want) / (scale + 1e-30);
                worst = std::max(worst, err);
                if (!(err < 1e-5)) {
                    if (bad < 5) fprintf(stderr, "  %s K=%d n=%d matrix %d row %d token %d: got %g want %g\n", ty.name, K, n_tok, m, r, t, got, want);
                    bad++;
                }
            }
    printf("%-5s K=%-5d rows %d/%d/%d tokens %2d%s: %s (worst relative %.1e)\n", ty.name, K, rows[0], rows[1], rows[2], n_tok,
           one ? " (mmqs1)" : "", bad ? "FAILED" : "ok", worst);
    return bad;
}

int main() {
    const std::vector<Ty> types = quant_types();
    int bad = 0;
    // {rows of up to three matrices, tokens}
    const int shapes[][4] = {{21, 0, 0, 1}, {16, 9, 0, 3}, {7, 12, 5, 8}, {18, 0, 0, 11}, {10, 7, 3, 16}};
    for (auto& ty : types)
        for (int K : {512, 2304}) {
            if (K % ty.block) continue;
            for (auto& s : shapes) {
                const int rows[3] = {s[0], s[1], s[2]};
                bad += with_type(ty.t, [&]<int T>() { return run<T>(ty, K, rows, s[3], false); });
                // The K-quants' one-unit-per-warp kernel (mmqs1_<type>_16).
                if (s[3] > 8 && (ty.t == T_Q4_K || ty.t == T_Q5_K || ty.t == T_Q6_K))
                    bad += with_type(ty.t, [&]<int T>() { return run<T>(ty, K, rows, s[3], true); });
            }
        }
    printf(bad ? "mmqs under emulation: %d wrong outputs\n" : "mmqs under emulation: every output equals the serial sum\n", bad);
    return bad ? 1 : 0;
}
