// CPU check of the exact attention kernel of cuda/attention_exact.cu (attn_exact) against the
// CPU backend itself (tools/cuda-emu/attn_exact_check.sh): the cases of tests/cuda_backend.rs
// (`exact_attention_cases_dump`: dense and sink + ring layouts, decode, multi-row runs in both
// of llama.cpp's regimes) are written by the Rust test with the CPU backend's outputs, and the
// kernel runs here under emu.h (a thread per CUDA thread, warp barriers) with the CUDA
// round-to-nearest intrinsics as plain IEEE operations (compiled without FMA contraction,
// fma/fmaf from libm) and f16 conversions through _Float16. Every output must have the CPU's
// bits. The same for the row ops the exact path needs bit-equal as well (ops.cu: rope_pair and
// silu_mul with common.cuh's ggml_v_expf, against the CPU's rope_row and swiglu on random rows,
// file ops.raw). Usage: attn_exact_check DIR.
#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string>
#include "emu.h"
using std::max;
using std::min;
#define __constant__ const
inline u32 __float_as_uint(float x) { u32 u; memcpy(&u, &x, 4); return u; }
inline float __uint_as_float(u32 u) { float x; memcpy(&x, &u, 4); return x; }
inline long long __double_as_longlong(double x) { long long u; memcpy(&u, &x, 8); return u; }
inline double __longlong_as_double(long long u) { double x; memcpy(&x, &u, 8); return x; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fmaf(a, b, c); }
inline double __fma_rn(double a, double b, double c) { return std::fma(a, b, c); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline float __double2float_rn(double x) { return (float)x; }
inline float h2f(u16 h) { _Float16 f; memcpy(&f, &h, 2); return (float)f; }
inline u16 f2h(float v) { _Float16 f = (_Float16)v; u16 h; memcpy(&h, &f, 2); return h; }
inline void __syncwarp() { g_warps[threadIdx.x / 32].bar->arrive_and_wait(); }
#include "exact_extract.cuh"

template <class T> static std::vector<T> take(const std::vector<char>& b, size_t& at, size_t n) {
    std::vector<T> v(n);
    memcpy(v.data(), b.data() + at, n * sizeof(T));
    at += n * sizeof(T);
    return v;
}

int main(int argc, char** argv) {
    if (argc < 2) { fprintf(stderr, "usage: %s DIR\n", argv[0]); return 2; }
    std::vector<std::string> files;
    for (auto& e : std::filesystem::directory_iterator(argv[1]))
        if (e.path().extension() == ".bin") files.push_back(e.path());
    std::sort(files.begin(), files.end());
    size_t total = 0, differ = 0, tiled_cases = 0;
    for (auto& f : files) {
        std::ifstream in(f, std::ios::binary);
        std::vector<char> b((std::istreambuf_iterator<char>(in)), {});
        size_t at = 0;
        auto h = take<int>(b, at, 10);
        const int hd = h[0], n_head = h[1], n_kv = h[2], n = h[3], n_batch = h[4], p0 = h[5],
                  seq = h[6], sink = h[7], rows_per_seq = h[8], rows = h[9];
        auto caps = take<int>(b, at, n_kv), offs = take<int>(b, at, n_kv);
        auto q = take<float>(b, at, (size_t)n * n_head * hd);
        auto kn = take<u16>(b, at, (size_t)n * n_kv * hd), vn = take<u16>(b, at, (size_t)n * n_kv * hd);
        auto kc = take<u16>(b, at, (size_t)rows * hd), vc = take<u16>(b, at, (size_t)rows * hd);
        auto want = take<float>(b, at, (size_t)n * n_head * hd);
        if (at != b.size()) { fprintf(stderr, "%s: %zu bytes left\n", f.c_str(), b.size() - at); return 1; }
        std::vector<int> pos(n), sq(n, seq), tp0(n, p0), trs(n, 0);
        for (int t = 0; t < n; t++) pos[t] = p0 + t;
        std::vector<float> out(want.size(), NAN);
        const int tiled = n_batch >= 64;
        tiled_cases += tiled;
        const float scale = 1.0f / std::sqrt((float)hd);
        launch({(unsigned)n, (unsigned)n_head, 1}, 32, 0, [&] {
            auto run = hd == 64 ? attn_exact<64> : attn_exact<128>;
            run(q.data(), kn.data(), vn.data(), kc.data(), vc.data(), pos.data(), sq.data(),
                tp0.data(), trs.data(), n_head / n_kv, n_head, n_kv, caps.data(), offs.data(),
                rows_per_seq, sink, tiled, scale, out.data());
        });
        size_t d = 0;
        float worst = 0;
        for (size_t i = 0; i < want.size(); i++) {
            if (memcmp(&want[i], &out[i], 4)) {
                d++;
                worst = std::max(worst, std::fabs(want[i] - out[i]) / std::max(std::fabs(want[i]), 1e-30f));
            }
        }
        std::string label;
        std::ifstream lt(f.substr(0, f.size() - 4) + ".txt");
        std::getline(lt, label);
        if (d) printf("%s: %zu of %zu values differ (worst relative %.2e)\n", label.c_str(), d, want.size(), worst);
        total += want.size();
        differ += d;
    }
    printf("exact attention under emulation vs the CPU backend: %zu cases (%zu tiled), %zu of %zu values differ\n",
           files.size(), tiled_cases, differ, total);
    // Row ops.
    std::ifstream in(std::string(argv[1]) + "/ops.raw", std::ios::binary);
    std::vector<char> b((std::istreambuf_iterator<char>(in)), {});
    size_t at = 0;
    const int n = take<int>(b, at, 1)[0];
    auto x = take<float>(b, at, 2 * n), cs = take<float>(b, at, 2 * n), rot = take<float>(b, at, 2 * n);
    auto gate = take<float>(b, at, n), up = take<float>(b, at, n), act = take<float>(b, at, n);
    size_t rope_d = 0, silu_d = 0;
    for (int i = 0; i < n; i++) {
        float y0, y1;
        rope_pair(x[2 * i], x[2 * i + 1], float2{cs[2 * i], cs[2 * i + 1]}, &y0, &y1);
        rope_d += memcmp(&y0, &rot[2 * i], 4) != 0;
        rope_d += memcmp(&y1, &rot[2 * i + 1], 4) != 0;
        const float v = silu_mul(gate[i], up[i]);
        silu_d += memcmp(&v, &act[i], 4) != 0;
    }
    printf("rope_pair vs rope_row: %zu of %d values differ; silu_mul vs swiglu: %zu of %d differ\n",
           rope_d, 2 * n, silu_d, n);
    return differ == 0 && !files.empty() && n > 0 && rope_d == 0 && silu_d == 0 ? 0 : 1;
}
