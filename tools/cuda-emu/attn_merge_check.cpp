// CPU check of the attention split merge (attn_merge_rows in cuda/attention.cu;
// tools/cuda-emu/attn_merge_check.sh): each split's partial row holds D unnormalized output
// values, its maximum m (base 2) and its weight sum l; the merged row must equal
// sum_z 2^(m_z - M) acc_z / sum_z 2^(m_z - M) l_z (M the largest m, empty splits m = -inf),
// computed here in double, and its q8_1 copy must hold that row's quantization.
#include "emu.h"
#include "emu_data.h"
inline float ex2(float x) { return exp2f(x); }
inline void pdl_wait() {}
inline void pdl_trigger() {}
typedef signed char i8;
#include "merge_extract.cuh"

template <int GR>
static int run(int D, int n_split, int rows, double empty_frac) {
    const int stride = D + 2;
    std::vector<float> part((size_t)rows * n_split * stride);
    for (int r = 0; r < rows; r++)
        for (int z = 0; z < n_split; z++) {
            float* p = &part[((size_t)r * n_split + z) * stride];
            const bool empty = rf() * 0.5f + 0.5f < empty_frac && !(z == n_split - 1 && r % 2 == 0);
            for (int d = 0; d < D; d++) p[d] = empty ? 0.0f : rf() * 3.0f;
            p[D] = empty ? NEG_INF : rf() * 20.0f;
            p[D + 1] = empty ? 0.0f : 0.5f + (rf() * 0.5f + 0.5f) * 40.0f;
        }
    std::vector<float> out((size_t)rows * D, 12345.0f);
    std::vector<i8> yq((size_t)rows * D);
    std::vector<float2> yds((size_t)rows * D / 32);
    launch({(unsigned)rows, 1, 1}, GR * D, 0,
           [&] { attn_merge_rows<GR>(part.data(), n_split, D, out.data(), yq.data(), yds.data()); });
    int bad = 0;
    double worst = 0;
    for (int r = 0; r < rows; r++) {
        double M = -INFINITY;
        for (int z = 0; z < n_split; z++) M = std::max(M, (double)part[((size_t)r * n_split + z) * stride + D]);
        double L = 0;
        std::vector<double> o(D, 0.0);
        for (int z = 0; z < n_split; z++) {
            const float* p = &part[((size_t)r * n_split + z) * stride];
            if (p[D] == NEG_INF) continue;
            const double w = std::exp2((double)p[D] - M);
            L += w * p[D + 1];
            for (int d = 0; d < D; d++) o[d] += w * p[d];
        }
        for (int d = 0; d < D; d++) {
            const double want = L > 0 ? o[d] / L : 0.0;
            const double got = out[(size_t)r * D + d];
            const double err = std::fabs(got - want) / (std::fabs(want) + 1e-3);
            worst = std::max(worst, err);
            // The q8_1 copy: quant * d within half a step of the value.
            const size_t i = (size_t)r * D + d;
            const float dq = yds[i / 32].x * yq[i];
            if (!(err < 1e-4) || std::fabs(dq - got) > 0.51f * yds[i / 32].x + 1e-3f * std::fabs(got)) {
                if (bad < 5) fprintf(stderr, "  GR=%d D=%d n_split=%d row %d dim %d: got %g want %g (q8_1 %g)\n", GR, D, n_split, r, d, got, want, dq);
                bad++;
            }
        }
    }
    printf("GR %d D %3d splits %3d rows %d: %s (worst relative %.1e)\n", GR, D, n_split, rows, bad ? "FAILED" : "ok", worst);
    return bad;
}

int main() {
    int bad = 0;
    for (int D : {64, 128})
        for (int n : {1, 2, 5, 16, 17, 33, 64, 65, 200}) {
            bad += run<4>(D, n, 3, 0.2);
            if (n <= 33) bad += run<1>(D, n, 3, 0.2);
        }
    bad += run<4>(128, 33, 2, 0.9);  // mostly empty splits
    printf(bad ? "attention merge under emulation: %d wrong outputs\n"
               : "attention merge under emulation: every output equals the double-precision merge\n", bad);
    return bad ? 1 : 0;
}
