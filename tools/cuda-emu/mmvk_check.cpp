// CPU check of the one-token K-quant product with four lanes per unit (mmvk in cuda/quant.cu;
// tools/cuda-emu/mmvk_check.sh): the kernel runs under emu.h (one OS thread per CUDA thread,
// barriers, shuffles) on random weight bytes (valid f16 scales) and random q8_1 activations,
// Q4_K and Q5_K, rows of 512 to 14336 values, one to three matrices per launch, 1 / 2 / 4 warps
// per row and 2 / 4 steps in flight; every output must equal the row's units summed serially
// with Unit<T> (mmvq's code) to float rounding, and nothing else may be written.
#include "emu.h"
#include "emu_data.h"
#include "emu_quant.h"
#include "mmvk_extract.cuh"  // with the T_* type ids and MV_WARPS of the kernel sources
#include "emu_quant_ref.h"

template <int T, int S>
static int run(const Ty& ty, int K, const int rows[3], int wpr) {
    constexpr bool FIVE = T == T_Q5_K;
    const int units = K / 64;
    size_t row_bytes = (size_t)K / ty.block * ty.bytes;
    std::vector<std::vector<int4>> W(3);
    for (int m = 0; m < 3; m++) W[m] = random_weights(ty, rows[m], row_bytes);
    std::vector<int4> yqv(K / 16);
    i8* yq = (i8*)yqv.data();
    for (int i = 0; i < K; i++) yq[i] = (i8)rnd();
    std::vector<float2> yds(K / 32);
    for (auto& d : yds) d = {rf() * 0.1f, rf()};
    const float SENT = 12345.0f;
    int ldo[3] = {rows[0] + 3, rows[1] + 1, rows[2] + 2};
    std::vector<float> out[3];
    for (int m = 0; m < 3; m++) out[m].assign(ldo[m], SENT);
    Rows3 rr = {(const u8*)W[0].data(), (const u8*)W[1].data(), (const u8*)W[2].data(), rows[0], rows[1], rows[2],
                out[0].data(), out[1].data(), out[2].data(), ldo[0], ldo[1], ldo[2]};
    int total = rows[0] + rows[1] + rows[2];
    unsigned grid = (total + MV_WARPS / wpr - 1) / (MV_WARPS / wpr);
    launch({grid, 1, 1}, MV_WARPS * WARP, 0, [&] { mmvk<FIVE, S>(rr, row_bytes, units, yq, yds.data(), wpr); });
    int bad = 0;
    double worst = 0;
    for (int m = 0; m < 3; m++)
        for (int r = 0; r < ldo[m]; r++) {
            float got = out[m][r];
            if (r >= rows[m]) {
                if (got != SENT) { bad++; fprintf(stderr, "  %s: wrote past matrix %d's rows (row %d)\n", ty.name, m, r); }
                continue;
            }
            const u8* row = (const u8*)W[m].data() + r * row_bytes;
            double scale;
            const double want = serial_row_dot<T>(row, K, yq, yds.data(), &scale);
            double err = std::fabs(got - want) / (scale + 1e-30);
            worst = std::max(worst, err);
            if (!(err < 1e-5)) {
                if (bad < 5) fprintf(stderr, "  %s K=%d wpr=%d S=%d matrix %d row %d: got %g want %g\n", ty.name, K, wpr, S, m, r, got, want);
                bad++;
            }
        }
    printf("%-5s K=%-5d rows %d/%d/%d wpr %d S %d: %s (worst relative %.1e)\n", ty.name, K, rows[0], rows[1], rows[2], wpr, S,
           bad ? "FAILED" : "ok", worst);
    return bad;
}

int main() {
    const std::vector<Ty> types = quant_types();
    int bad = 0;
    const int shapes[][3] = {{7, 0, 0}, {9, 5, 0}, {10, 3, 4}};
    for (auto& ty : types) {
        if (ty.t != T_Q4_K && ty.t != T_Q5_K) continue;
        for (int K : {512, 1536, 4096, 14336})
            for (auto& s : shapes)
                for (int wpr : {1, 2, 4}) {
                    if (K > 4096 && wpr == 2) continue;
                    bad += with_type(ty.t, [&]<int T>() {
                        if constexpr (T == T_Q4_K || T == T_Q5_K)
                            return run<T, 4>(ty, K, s, wpr) + run<T, 2>(ty, K, s, wpr);
                        return 0;
                    });
                }
    }
    printf(bad ? "mmvk under emulation: %d wrong outputs\n" : "mmvk under emulation: every output equals the serial sum\n", bad);
    return bad ? 1 : 0;
}
