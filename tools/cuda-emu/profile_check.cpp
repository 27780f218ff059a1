// The profiler's kernels (cuda/profile.cu, run under emu.h) against naive double-precision
// references on random inputs: the row ops (RMSNorm and its backward, cross-entropy and its
// gradient, RoPE and its inverse, gather / scatter-add with a repeated row, embedding rows,
// residual add, SwiGLU and its backward) and attention
// (forward O and log-sum-exp; backward dQ, dK, dV and the |E| influence sums per fine block) for
// GQA and MHA, head dimensions 64 and 128, partial tiles and fine blocks of 1 to 64 tokens, and
// the same buffers reused by shorter samples after a longer one, laid out as the host code does.
// Exit status 1 when a check fails.
#include "emu.h"
#include "profile_emu.cu"
#include <random>
#include <algorithm>

static std::mt19937_64 rng(42);
static std::vector<float> rnd(size_t n, float s = 1.0f) {
    std::uniform_real_distribution<float> d(-s, s);
    std::vector<float> v(n);
    for (auto& x : v) x = d(rng);
    return v;
}
static double worst_rel(const std::vector<float>& a, const std::vector<double>& b, const char* what) {
    double scale = 0, w = 0;
    for (double x : b) scale = std::max(scale, std::fabs(x));
    for (size_t i = 0; i < a.size(); i++) {
        double e = std::fabs(a[i] - b[i]) / std::max(scale, 1e-30);
        if (!(e <= w)) w = e;  // NaN-propagating
    }
    printf("  %-28s worst %.2e of max %.3e\n", what, w, scale);
    return w;
}

// Device buffers of the GPU profiler (src/profile/cuda.rs `Work`) for samples of up to `cap`
// tokens and two layers, reused from sample to sample: a shorter sample finds the rows and cells
// of the longer one before it there (NaN only before the first). Per-layer regions start at
// offsets computed from the current sample's length, as the host code does.
struct Shared {
    int cap, layers = 2;
    std::vector<float> q, k, v, dout, o, lse, dsum, dq, dk, dv, infl;
    Shared(int cap, int H, int Hkv, int D, int fb) : cap(cap) {
        int nf = (cap + fb - 1) / fb;
        size_t qn = (size_t)cap * H * D, kvn = (size_t)cap * Hkv * D, cells = (size_t)nf * (nf + 1) / 2;
        for (auto* b : {&q, &dout, &dq}) b->assign(qn, NAN);
        for (auto* b : {&k, &v, &dk, &dv}) b->assign(kvn, NAN);
        o.assign(layers * qn, NAN);
        lse.assign((size_t)layers * H * cap, NAN);
        dsum.assign((size_t)H * cap, NAN);
        infl.assign(layers * H * cells, NAN);
    }
};

// The kernels on random inputs against f64 references. With `sh`, inputs and outputs live in its
// buffers (layer `layer`'s regions for the checkpoints and influence) instead of fresh ones.
template <int D>
int attn_test(int n, int H, int Hkv, int fb, float sc, Shared* sh = nullptr, int layer = 0) {
    printf("attention n=%d H=%d Hkv=%d D=%d fb=%d%s\n", n, H, Hkv, D, fb,
           sh ? " (reused buffers)" : "");
    int qw = H * D, kvw = Hkv * D, gs = H / Hkv;
    auto q = rnd((size_t)n * qw, sc), k = rnd((size_t)n * kvw, sc), v = rnd((size_t)n * kvw), dout = rnd((size_t)n * qw);
    float scale = 1.0f / std::sqrt((float)D);
    int nqt = (n + 63) / 64;
    int nf = (n + fb - 1) / fb;
    long long cells = (long long)nf * (nf + 1) / 2;
    // Device pointers: fresh vectors, or the shared buffers (inputs copied to their first rows).
    std::vector<float> o((size_t)n * qw, NAN), lse((size_t)H * n, NAN), dsum((size_t)H * n, NAN);
    std::vector<float> dq((size_t)n * qw, NAN), dk((size_t)n * kvw, NAN), dv((size_t)n * kvw, NAN), infl((size_t)H * cells, NAN);
    float *pq = q.data(), *pk = k.data(), *pv = v.data(), *pdo = dout.data(), *po = o.data(), *plse = lse.data(),
          *pdsum = dsum.data(), *pdq = dq.data(), *pdk = dk.data(), *pdv = dv.data(), *pinf = infl.data();
    if (sh) {
        std::copy(q.begin(), q.end(), sh->q.begin());
        std::copy(k.begin(), k.end(), sh->k.begin());
        std::copy(v.begin(), v.end(), sh->v.begin());
        std::copy(dout.begin(), dout.end(), sh->dout.begin());
        pq = sh->q.data(), pk = sh->k.data(), pv = sh->v.data(), pdo = sh->dout.data();
        po = sh->o.data() + (size_t)layer * n * qw, plse = sh->lse.data() + (size_t)layer * H * n;
        pdsum = sh->dsum.data(), pdq = sh->dq.data(), pdk = sh->dk.data(), pdv = sh->dv.data();
        pinf = sh->infl.data() + (size_t)layer * H * cells;
    }
    // Copies a device region back into the vector the checks read.
    auto back = [&](std::vector<float>& dst, const float* src) {
        if (sh) std::copy(src, src + dst.size(), dst.begin());
    };
    size_t row = 64 * (D + 1), p = 64 * 65;
    launch({(unsigned)nqt, (unsigned)H, 1}, 256, (2 * row + p) * 4, [&] {
        pa_fwd<D>(pq, pk, pv, n, H, Hkv, scale, po, plse);
    });
    back(o, po);
    back(lse, plse);
    // reference
    std::vector<double> P((size_t)H * n * n, 0), ro((size_t)n * qw, 0), rlse((size_t)H * n);
    for (int h = 0; h < H; h++) {
        int g = h / gs;
        for (int i = 0; i < n; i++) {
            double m = -1e300;
            std::vector<double> s(i + 1);
            for (int j = 0; j <= i; j++) {
                double d = 0;
                for (int t = 0; t < D; t++) d += (double)q[(size_t)i * qw + h * D + t] * k[(size_t)j * kvw + g * D + t];
                s[j] = d * scale;
                m = std::max(m, s[j]);
            }
            double z = 0;
            for (int j = 0; j <= i; j++) z += std::exp(s[j] - m);
            rlse[(size_t)h * n + i] = m + std::log(z);
            for (int j = 0; j <= i; j++) {
                double a = std::exp(s[j] - m) / z;
                P[((size_t)h * n + i) * n + j] = a;
                for (int t = 0; t < D; t++) ro[(size_t)i * qw + h * D + t] += a * v[(size_t)j * kvw + g * D + t];
            }
        }
    }
    int bad = 0;
    bad += worst_rel(o, ro, "O") > 1e-5;
    bad += worst_rel(lse, rlse, "lse") > 1e-5;
    // backward
    launch({(unsigned)((n * H * 32 + 255) / 256), 1, 1}, 256, 0, [&] {
        prof_attn_dsum(pdo, po, n, H, D, pdsum);
    });
    int nsub = 64 / fb;
    launch({(unsigned)nqt, (unsigned)H, 1}, 256, (3 * row + p + 128 + nsub * nsub) * 4, [&] {
        pa_bwd_q<D>(pq, pk, pv, pdo, plse, pdsum, n, H, Hkv, scale, fb, cells, pdq, pinf);
    });
    launch({(unsigned)nqt, (unsigned)Hkv, 1}, 256, (4 * row + p + 128) * 4, [&] {
        pa_bwd_kv<D>(pq, pk, pv, pdo, plse, pdsum, n, H, Hkv, scale, pdk, pdv);
    });
    back(dsum, pdsum);
    back(dq, pdq);
    back(dk, pdk);
    back(dv, pdv);
    back(infl, pinf);
    std::vector<double> rdsum((size_t)H * n, 0), rdq((size_t)n * qw, 0), rdk((size_t)n * kvw, 0), rdv((size_t)n * kvw, 0), rinf((size_t)H * cells, 0);
    for (int h = 0; h < H; h++) {
        int g = h / gs;
        for (int i = 0; i < n; i++) {
            std::vector<double> G(i + 1);
            double gbar = 0;
            for (int j = 0; j <= i; j++) {
                double d = 0;
                for (int t = 0; t < D; t++) d += (double)dout[(size_t)i * qw + h * D + t] * v[(size_t)j * kvw + g * D + t];
                G[j] = d;
                gbar += d * P[((size_t)h * n + i) * n + j];
            }
            rdsum[(size_t)h * n + i] = gbar;
            for (int j = 0; j <= i; j++) {
                double a = P[((size_t)h * n + i) * n + j];
                double e = i == 0 ? -G[0] * a : -a * (G[j] - gbar) / (1.0 - a + 1e-6);
                int fq = i / fb, fk = j / fb;
                rinf[(size_t)h * cells + (size_t)fq * (fq + 1) / 2 + fk] += std::fabs(e);
                double ds = a * (G[j] - gbar);
                for (int t = 0; t < D; t++) {
                    rdq[(size_t)i * qw + h * D + t] += scale * ds * k[(size_t)j * kvw + g * D + t];
                    rdk[(size_t)j * kvw + g * D + t] += scale * ds * q[(size_t)i * qw + h * D + t];
                    rdv[(size_t)j * kvw + g * D + t] += a * dout[(size_t)i * qw + h * D + t];
                }
            }
        }
    }
    bad += worst_rel(dsum, rdsum, "dsum") > 1e-5;
    bad += worst_rel(dq, rdq, "dq") > 1e-4;
    bad += worst_rel(dk, rdk, "dk") > 1e-4;
    bad += worst_rel(dv, rdv, "dv") > 1e-4;
    bad += worst_rel(infl, rinf, "influence fine cells") > 1e-4;
    return bad;
}

int ops_test() {
    printf("row ops\n");
    int bad = 0, rows = 5, width = 300;
    auto x = rnd(rows * width, 2.0f), w = rnd(width), dy = rnd(rows * width);
    float eps = 1e-5f;
    std::vector<float> y(rows * width, NAN), dx(rows * width, 0.5f);
    launch({(unsigned)rows, 1, 1}, 256, 0, [&] { prof_rms_norm(x.data(), w.data(), eps, width, y.data()); });
    launch({(unsigned)rows, 1, 1}, 256, 0, [&] { prof_rms_norm_bwd(x.data(), w.data(), eps, dy.data(), width, dx.data()); });
    std::vector<double> ry(rows * width), rdx(rows * width);
    for (int r = 0; r < rows; r++) {
        double ms = 0;
        for (int i = 0; i < width; i++) ms += (double)x[r * width + i] * x[r * width + i];
        ms /= width;
        double rr = 1 / std::sqrt(ms + eps), dot = 0;
        for (int i = 0; i < width; i++) {
            ry[r * width + i] = x[r * width + i] * rr * w[i];
            dot += (double)dy[r * width + i] * w[i] * x[r * width + i];
        }
        for (int i = 0; i < width; i++)
            rdx[r * width + i] = 0.5 + rr * dy[r * width + i] * w[i] - x[r * width + i] * rr * rr * rr * dot / width;
    }
    bad += worst_rel(y, ry, "rms_norm") > 1e-5;
    bad += worst_rel(dx, rdx, "rms_norm_bwd") > 1e-5;
    // cross-entropy
    int nv = 1000, nr = 3, total = 7;
    auto lg = rnd(nr * nv, 5.0f);
    std::vector<int> tg = {3, 999, 0};
    std::vector<double> loss(nr, NAN);
    auto lg0 = lg;
    launch({(unsigned)nr, 1, 1}, 256, 0, [&] { prof_xent(lg.data(), nv, tg.data(), total, loss.data()); });
    std::vector<double> rl(nr), rg(nr * nv);
    std::vector<float> lossf(loss.begin(), loss.end());
    for (int r = 0; r < nr; r++) {
        double m = -1e300, z = 0;
        for (int i = 0; i < nv; i++) m = std::max(m, (double)lg0[r * nv + i]);
        for (int i = 0; i < nv; i++) z += std::exp(lg0[r * nv + i] - m);
        double lz = m + std::log(z);
        rl[r] = lz - lg0[r * nv + tg[r]];
        for (int i = 0; i < nv; i++) rg[r * nv + i] = std::exp(lg0[r * nv + i] - lz) / total - (i == tg[r] ? 1.0 / total : 0);
    }
    bad += worst_rel(lossf, rl, "xent loss") > 1e-6;
    bad += worst_rel(lg, rg, "xent grad") > 1e-6;
    // rope forward then inverse = identity; forward vs formula
    int nt = 4, nh = 3, hd = 8, hr = 3;
    auto xr = rnd(nt * nh * hd), x0 = xr;
    std::vector<float2> cs(nt * hr);
    std::vector<double> rr(nt * nh * hd);
    for (int t = 0; t < nt; t++) for (int i = 0; i < hr; i++) cs[t * hr + i] = {std::cos(0.3f * t * (i + 1)), std::sin(0.3f * t * (i + 1))};
    for (int t = 0; t < nt; t++) for (int h = 0; h < nh; h++) for (int d = 0; d < hd; d++) {
        size_t o = (size_t)t * nh * hd + h * hd + d;
        int i = d / 2;
        if (i >= hr) { rr[o] = x0[o]; continue; }
        float c = cs[t * hr + i].x, s = cs[t * hr + i].y;
        float a = x0[o - d % 2], b = x0[o - d % 2 + 1];
        rr[o] = d % 2 == 0 ? a * c - b * s : a * s + b * c;
    }
    launch({1, 1, 1}, 256, 0, [&] { prof_rope(xr.data(), nt, nh, hd, hr, cs.data(), 1.0f); });
    bad += worst_rel(xr, rr, "rope") > 1e-6;
    launch({1, 1, 1}, 256, 0, [&] { prof_rope(xr.data(), nt, nh, hd, hr, cs.data(), -1.0f); });
    std::vector<double> x0d(x0.begin(), x0.end());
    bad += worst_rel(xr, x0d, "rope inverse") > 1e-6;
    // gather / scatter_add with a repeated row
    std::vector<float> src = rnd(6 * 4), dst(2 * 4, NAN), acc(6 * 4, 1.0f);
    std::vector<int> rows2 = {5, 5};
    launch({1, 1, 1}, 256, 0, [&] { prof_gather(src.data(), rows2.data(), 2, 4, dst.data()); });
    launch({1, 1, 1}, 256, 0, [&] { prof_scatter_add(dst.data(), rows2.data(), 2, 4, acc.data()); });
    std::vector<double> racc(6 * 4, 1.0);
    for (int i = 0; i < 4; i++) racc[5 * 4 + i] += 2.0 * src[5 * 4 + i];
    bad += worst_rel(acc, racc, "gather + scatter_add") > 1e-6;
    // embedding rows, residual add, SwiGLU and its backward
    std::vector<float> emb = rnd(7 * 5), xe(3 * 5, NAN);
    std::vector<int> toks = {6, 0, 6};
    launch({1, 1, 1}, 256, 0, [&] { prof_gather(emb.data(), toks.data(), 3, 5, xe.data()); });
    std::vector<double> rxe(3 * 5);
    for (int t = 0; t < 3; t++) for (int i = 0; i < 5; i++) rxe[t * 5 + i] = emb[toks[t] * 5 + i] + 0.25;
    std::vector<float> quarter(3 * 5, 0.25f);
    launch({1, 1, 1}, 256, 0, [&] { prof_add(xe.data(), quarter.data(), 15); });
    bad += worst_rel(xe, rxe, "embed + add") > 1e-6;
    int m = 1000;
    auto gg = rnd(m, 4.0f), uu = rnd(m), dh = rnd(m);
    std::vector<float> hh(m, NAN), du(m, NAN), dg = dh;
    launch({(unsigned)((m + 255) / 256), 1, 1}, 256, 0, [&] { prof_swiglu(gg.data(), uu.data(), hh.data(), m); });
    launch({(unsigned)((m + 255) / 256), 1, 1}, 256, 0, [&] { prof_swiglu_bwd(gg.data(), uu.data(), dg.data(), du.data(), m); });
    std::vector<double> rh(m), rdg(m), rdu(m);
    for (int i = 0; i < m; i++) {
        double g = gg[i], sg = 1 / (1 + std::exp(-g));
        rh[i] = g * sg * uu[i];
        rdu[i] = dh[i] * g * sg;
        rdg[i] = dh[i] * uu[i] * (sg + g * sg * (1 - sg));
    }
    bad += worst_rel(hh, rh, "swiglu") > 1e-6;
    bad += worst_rel(du, rdu, "swiglu_bwd du") > 1e-6;
    bad += worst_rel(dg, rdg, "swiglu_bwd dg") > 1e-6;
    return bad;
}

int main() {
    int bad = ops_test();
    bad += attn_test<64>(150, 4, 2, 64, 1.0f);
    bad += attn_test<64>(100, 2, 2, 16, 3.0f);
    bad += attn_test<64>(5, 3, 1, 64, 1.0f);
    bad += attn_test<128>(130, 2, 1, 64, 1.0f);
    bad += attn_test<64>(70, 1, 1, 1, 2.0f);
    bad += attn_test<64>(64, 2, 1, 32, 1.0f);
    // One profiler's buffers across samples (src/profile/cuda.rs keeps them for the longest
    // sample so far): a long sample, then shorter ones with partial tiles, both layers each, on
    // the same buffers; every result must match its reference as on fresh buffers.
    for (int fb : {64, 16}) {
        Shared sh(256, 4, 2, 64, fb);
        for (int n : {200, 90, 37})
            for (int layer : {1, 0}) bad += attn_test<64>(n, 4, 2, fb, 2.0f, &sh, layer);
    }
    printf(bad ? "FAILED %d checks\n" : "all ok\n", bad);
    return bad != 0;
}
