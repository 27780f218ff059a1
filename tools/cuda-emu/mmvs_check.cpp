// CPU check of the streamed one-token matvec (mmvs in cuda/quant.cu; tools/cuda-emu/mmvs_check.sh):
// the kernel runs under emu.h (one OS thread per CUDA thread, barriers, shuffles; cp.async as
// emu_cp_async.h models it: landing at once, or only when a wait retires its group) on random
// weight bytes (valid f16 scales), random q8_1 activations, one to three matrices per launch and tiles of 1 to 16 rows
// (rows not a multiple of the tile, tiles across matrix boundaries); every output must equal the
// row's units summed serially with the same Unit<T> code, to float rounding, and nothing else
// may be written.
#include "emu.h"
#include "emu_data.h"
#include "emu_quant.h"
#include "emu_cp_async.h"
#include "mmvs_extract.cuh"  // with the T_* type ids and MV_WARPS of the kernel sources
#include "emu_quant_ref.h"

template <int T>
static int run(const Ty& ty, int K, const int rows[3], int R) {
    const int units = (T == T_Q4_K || T == T_Q5_K || T == T_Q6_K) ? K / 64 : K / 32;
    size_t row_bytes = (size_t)K / ty.block * ty.bytes;
    if (row_bytes % 16) { fprintf(stderr, "%s K=%d: rows not a multiple of 16 bytes\n", ty.name, K); exit(1); }
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
    const unsigned grid = (total + R - 1) / R;
    launch({grid, 1, 1}, MV_WARPS * WARP, (size_t)R * row_bytes, [&] {
        mmvs<T>(rr, row_bytes, units, yq, yds.data(), R);
        if (!emu_cp_drained()) { fprintf(stderr, "copies outlive the block\n"); exit(1); }
    });
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
                if (bad < 5) fprintf(stderr, "  %s K=%d R=%d matrix %d row %d: got %g want %g\n", ty.name, K, R, m, r, got, want);
                bad++;
            }
        }
    printf("%-5s K=%-5d rows %d/%d/%d tile %2d rows (%s copies): %s (worst relative %.1e)\n", ty.name, K, rows[0],
           rows[1], rows[2], R, emu_cp_defer ? "late" : "early", bad ? "FAILED" : "ok", worst);
    return bad;
}

int main() {
    const std::vector<Ty> types = quant_types();
    int bad = 0;
    const int shapes[][4] = {{7, 0, 0, 1}, {9, 0, 0, 2}, {10, 3, 4, 3}, {13, 5, 0, 4}, {37, 0, 0, 16}, {11, 6, 6, 5}};
    // The copies landing at once, then only when the kernel's wait retires them.
    for (bool defer : {false, true}) {
        emu_cp_defer = defer;
        for (auto& ty : types)
            for (int K : {2048, 4096}) {
                if (ty.t == T_Q6_K && K % 2048) continue;
                for (auto& s : shapes) {
                    int rows[3] = {s[0], s[1], s[2]};
                    bad += with_type(ty.t, [&]<int T>() { return run<T>(ty, K, rows, s[3]); });
                }
            }
        // A wide row (one-row tiles, all four warps on it, more units than threads).
        int wide[3] = {3, 2, 0};
        bad += run<T_Q6_K>(types[7], 14336, wide, 1);
        bad += run<T_Q4_K>(types[5], 14336, wide, 1);
    }
    printf(bad ? "mmvs under emulation: %d wrong outputs\n" : "mmvs under emulation: every output equals the serial sum\n", bad);
    return bad ? 1 : 0;
}
