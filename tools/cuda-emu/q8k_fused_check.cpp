// CPU check of the fused q8_K layout writers (tools/cuda-emu/q8k_fused_check.sh): the residual
// norm (add_rms_norm_q8_row with yq_m) and SwiGLU (swiglu_q8k) write the K-quant tensor-core
// products' activation layout themselves; here, under emu.h, for 1 to 16 tokens, widths of 2
// and 9 super-blocks, both layout families, with and without the residual add, their layout
// must equal byte for byte what q8k_mma_layout makes of the f32 rows they wrote, and those rows
// must equal the unfused kernel's (norm) or the elementwise SwiGLU.
#include "emu.h"
#include "emu_data.h"
#include "emu_quant.h"
struct float4 { float x, y, z, w; };
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }
inline float4 __ldcg(const float4* p) { return *p; }
using std::min;
// SwiGLU's rounding does not matter here (both sides see the rows the kernel wrote).
inline float silu_mul(float g, float u) { return g / (1.0f + std::exp(-g)) * u; }
#include "q8k_fused_extract.cuh"

// The host's norm launch shape (src/backend/cuda/mod.rs: norm_shape).
static void norm_shape(int width, int* threads, int* per) {
    int t = ((width + 3) / 4 + 31) / 32 * 32;
    t = std::clamp(t, 32, 1024);
    const int p = (width + t - 1) / t;
    *threads = t;
    *per = p <= 4 ? 4 : p <= 8 ? 8 : 16;
}

struct Layout {
    std::vector<int4> yq;  // 16 slots x K int8
    std::vector<float> sc;  // ysc (16 x nsb floats) then the min fragments (nsb x 64 ints)
    Layout(int K) : yq((size_t)16 * K / 16), sc((size_t)16 * K / 32 * 2) {
        memset(yq.data(), 0x5a, yq.size() * 16);
        for (auto& f : sc) f = NAN;
    }
    i8* q() { return (i8*)yq.data(); }
};

// Differences between two layouts in the slots of tokens 0..n_tok-1.
static int compare(Layout& a, Layout& b, int K, int n_tok, const char* what) {
    const int nsb = K / 256;
    int bad = 0;
    for (int blk = 0; blk < K / 32; blk++)
        for (int t = 0; t < n_tok; t++)
            for (int c = 0; c < 4; c++) {
                const size_t o = (((size_t)blk * 2 + t / 8) * 4 + c) * 64 + (t % 8) * 8;
                if (memcmp(a.q() + o, b.q() + o, 8)) bad++;
            }
    for (int sb = 0; sb < nsb; sb++)
        for (int t = 0; t < n_tok; t++) {
            if (memcmp(&a.sc[sb * 16 + t], &b.sc[sb * 16 + t], 4)) bad++;
            for (int c = 0; c < 2; c++) {
                const size_t o = nsb * 16 + (((size_t)sb * 2 + t / 8) * 2 + c) * 8 * 2 + (t % 8) * 2;
                if (memcmp(&a.sc[o], &b.sc[o], 8)) bad++;
            }
        }
    if (bad) fprintf(stderr, "  %s K=%d n=%d: %d layout pieces differ\n", what, K, n_tok, bad);
    return bad;
}

static void layout_of(const float* x, int K, int n_tok, int fam, Layout& l) {
    launch({(unsigned)((K / 256 * n_tok * 32 + 255) / 256), 1, 1}, 256, 0,
           [&] { q8k_mma_layout(x, K, K, n_tok, fam, l.q(), l.sc.data()); });
}

// The norm kernels as launched: with a layout, add_rms_norm_q8k_<PER> with three L2 prefetch
// blocks after its rows (they must touch nothing); without, add_rms_norm_q8_<PER>.
template <int PER>
static void norm(float* x, const float* y, const float* w, int K, int n, int threads, float* out,
                 int fam, Layout* l) {
    auto q8 = PER == 4 ? add_rms_norm_q8_4 : PER == 8 ? add_rms_norm_q8_8 : add_rms_norm_q8_16;
    auto q8k = PER == 4 ? add_rms_norm_q8k_4 : PER == 8 ? add_rms_norm_q8k_8 : add_rms_norm_q8k_16;
    const char* pf = (const char*)w;
    const int pfb = l ? 3 : 0;
    launch({(unsigned)n + pfb, 1, 1}, threads, 0, [&] {
        (l ? q8k : q8)(x, y, w, 1e-5f, K, out, nullptr, nullptr, fam, l ? l->q() : nullptr,
                       l ? l->sc.data() : nullptr, pfb, pf, 4096, nullptr, 0, nullptr, 0);
    });
}

int main() {
    int bad = 0, cases = 0;
    for (int K : {512, 2304})
        for (int n : {1, 5, 16})
            for (int fam : {0, 1})
                for (int resid : {0, 1}) {
                    std::vector<float> x0((size_t)n * K), y((size_t)n * K), w(K);
                    for (size_t i = 0; i < x0.size(); i++) x0[i] = rf() * ((i / 32) % 5 == 1 ? 1e-3f : 2.0f);
                    for (auto& v : y) v = rf();
                    for (auto& v : w) v = 0.5f + rf();
                    int threads, per;
                    norm_shape(K, &threads, &per);
                    auto run = [&](std::vector<float>& x, std::vector<float>& out, Layout* l) {
                        x = x0;
                        out.assign((size_t)n * K, NAN);
                        const float* yp = resid ? y.data() : nullptr;
                        if (per == 4) norm<4>(x.data(), yp, w.data(), K, n, threads, out.data(), fam, l);
                        else if (per == 8) norm<8>(x.data(), yp, w.data(), K, n, threads, out.data(), fam, l);
                        else norm<16>(x.data(), yp, w.data(), K, n, threads, out.data(), fam, l);
                    };
                    std::vector<float> xa, oa, xb, ob;
                    Layout fused(K), ref(K);
                    run(xa, oa, &fused);
                    run(xb, ob, nullptr);
                    int b = 0;
                    if (memcmp(oa.data(), ob.data(), oa.size() * 4) || memcmp(xa.data(), xb.data(), xa.size() * 4)) {
                        fprintf(stderr, "  norm K=%d n=%d: rows differ from the unfused kernel\n", K, n);
                        b++;
                    }
                    layout_of(oa.data(), K, n, fam, ref);
                    b += compare(fused, ref, K, n, "norm");
                    // SwiGLU on the same rows.
                    std::vector<float> gate = x0, up = y, want((size_t)n * K);
                    for (size_t i = 0; i < want.size(); i++) want[i] = silu_mul(gate[i], up[i]);
                    Layout sf(K), sr(K);
                    // With three L2 prefetch blocks after the kernel's own (they must touch nothing).
                    const char* pf = (const char*)up.data();
                    launch({(unsigned)((K / 256 * n * 32 + 255) / 256) + 3, 1, 1}, 256, 0, [&] {
                        swiglu_q8k(gate.data(), up.data(), K, n, fam, sf.q(), sf.sc.data(), 3, pf, 4096, pf, 4096,
                                   nullptr, 0);
                    });
                    if (memcmp(gate.data(), want.data(), want.size() * 4)) {
                        fprintf(stderr, "  swiglu K=%d n=%d: rows differ\n", K, n);
                        b++;
                    }
                    layout_of(gate.data(), K, n, fam, sr);
                    b += compare(sf, sr, K, n, "swiglu");
                    printf("K=%-5d tokens %2d family %d residual %d: %s\n", K, n, fam, resid, b ? "FAILED" : "ok");
                    bad += b;
                    cases++;
                }
    printf(bad ? "fused q8_K layouts: %d differences\n" : "fused q8_K layouts: every case equals q8k_mma_layout (%d cases)\n",
           bad ? bad : cases);
    return bad ? 1 : 0;
}
