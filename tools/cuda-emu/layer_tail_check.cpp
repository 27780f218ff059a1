// CPU check of the one-kernel layer tail (cuda/layer_tail.cu; tools/cuda-emu/layer_tail_check.sh):
// the kernel runs under emu.h with one block (cp.async as emu_cp_async.h models it) on random
// quantized weights, a random residual and random q8_1 attention output, with the phase tables
// written as src/backend/cuda/layer_tail.rs writes them; the reference runs the same arithmetic
// serially (products by the same Unit<T> code, the normed groups quantized from h * w and scaled
// by 1 / rms, SwiGLU groups as q8_1). Checked: the gate/up outputs, the residual after the down
// projection, the next layer's q/k/v (nothing written past their rows), every counter back at
// zero after the launch, and a second launch (the next step) giving the same outputs; the first
// launch counts a phase's groups once after the block's last tile, the second every 1 or 5
// tiles and also asks L2 for tiles ahead (each weight byte of the phases run once, all but the
// first buffers' tiles, nothing outside the weights). With RoPE
// in the last phase: q and k rotated (the reference rotates its own products), k and v in the
// f16 staging rows as the kernel's f32 values round, and those rows in the ring slot of the
// token's position (nothing else of the cache written).
#include "emu.h"
#include "emu_data.h"
#include "emu_quant.h"
#include "emu_cp_async.h"
#include <atomic>
#include <chrono>
#include <mutex>
inline float silu_mul(float g, float u) { return g / (1.0f + std::exp(-g)) * u; }
template <class T> inline T __ldcg(const T* p) { return *p; }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __nanosleep(unsigned) {}
inline u32 atomicAdd(u32* p, u32 v) { return std::atomic_ref<u32>(*p).fetch_add(v); }
inline int atomicAdd(int* p, int v) { return std::atomic_ref<int>(*p).fetch_add(v); }
inline void __syncwarp() { g_warps[threadIdx.x / 32].bar->arrive_and_wait(); }
// The counter waits spin on this: a wait no block can satisfy fails the check after 20 s
// instead of hanging it (one block runs, so it would wait forever).
inline u32 tl_ld_acquire(const u32* p) {
    static thread_local auto since = std::chrono::steady_clock::now();
    static thread_local const u32* last = nullptr;
    if (p != last) last = p, since = std::chrono::steady_clock::now();
    if (std::chrono::steady_clock::now() - since > std::chrono::seconds(20)) {
        fprintf(stderr, "a counter wait is never satisfied\n");
        exit(1);
    }
    return std::atomic_ref<u32>(*(u32*)p).load();
}
inline float __int_as_float(int i) { float f; memcpy(&f, &i, 4); return f; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __fmul_rn(float a, float b) { return a * b; }
using std::max;
using std::min;
// The L2 prefetches (tl_prefetch): each byte asked for is marked in its matrix; a byte outside
// every matrix, or asked for twice in one launch, fails the check.
struct EmuWeights {
    const u8* p;
    size_t n;
    std::vector<u8> marks;
};
std::vector<EmuWeights> emu_weights;
std::mutex emu_pf_mutex;
inline void emu_l2_prefetch(const u8* p, u32 len) {
    std::lock_guard<std::mutex> lock(emu_pf_mutex);
    if (len % 16 || (uintptr_t)p % 16) { fprintf(stderr, "misaligned L2 prefetch\n"); exit(1); }
    for (EmuWeights& w : emu_weights)
        if (p >= w.p && p + len <= w.p + w.n) {
            for (u32 i = 0; i < len; i++)
                if (w.marks[p - w.p + i]++) { fprintf(stderr, "a weight byte prefetched twice\n"); exit(1); }
            return;
        }
    fprintf(stderr, "L2 prefetch outside the weights\n");
    exit(1);
}
#include "layer_tail_extract.cuh"
#include "emu_quant_ref.h"

struct Mat {
    const Ty* ty;
    int rows, cols;
    size_t row_bytes;
    std::vector<int4> w;
    std::vector<float> out;
};

static Mat make_mat(const Ty& ty, int rows, int cols) {
    Mat m{&ty, rows, cols, (size_t)cols / ty.block * ty.bytes, {}, {}};
    m.w = random_weights(ty, rows, m.row_bytes);
    m.out.assign(rows + 8, 12345.0f);  // sentinels past the rows
    return m;
}

// One row's product and, in `scale`, the sum of its parts' magnitudes.
static double row_dot(const Mat& m, int r, const i8* yq, const float2* yds, double* scale = nullptr) {
    const u8* row = (const u8*)m.w.data() + (size_t)r * m.row_bytes;
    double sc, v = 0;
    with_type(m.ty->t, [&]<int T>() {
        v = serial_row_dot<T>(row, m.cols, yq, yds, &sc);
        return 0;
    });
    if (scale) *scale = sc;
    return v;
}

// q8_1 of 32 values as q8_1_lane forms it.
static void q8_1_ref(const float* v, i8* q, float2* ds) {
    float amax = 0;
    for (int i = 0; i < 32; i++) amax = std::max(amax, std::fabs(v[i]));
    const float d = amax / 127.0f, id = amax != 0.0f ? 127.0f / amax : 0.0f;
    float s = 0;
    for (int i = 0; i < 32; i++) {
        q[i] = (i8)(int)std::nearbyint(v[i] * id);
        s += q[i];
    }
    *ds = make_float2(h2f(f2h(d)), h2f(f2h(d * s)));
}

// The normed input as the kernel forms it: q8_1 of h * w per group, scales times 1 / rms.
static void norm_ref(const std::vector<float>& h, const std::vector<float>& w, float eps,
                     std::vector<i8>& q, std::vector<float2>& ds) {
    const int e = (int)h.size();
    double ss = 0;
    std::vector<float> hw(e);
    for (int i = 0; i < e; i++) {
        ss += (double)(h[i] * h[i]);
        hw[i] = h[i] * w[i];
    }
    const float scale = 1.0f / std::sqrt((float)(ss / e) + eps);
    q.resize(e);
    ds.resize(e / 32);
    for (int g = 0; g < e / 32; g++) {
        float amax = 0;
        for (int i = 0; i < 32; i++) amax = std::max(amax, std::fabs(hw[g * 32 + i]));
        const float id = amax != 0.0f ? 127.0f / amax : 0.0f;
        float s = 0;
        for (int i = 0; i < 32; i++) {
            q[g * 32 + i] = (i8)(int)std::nearbyint(hw[g * 32 + i] * id);
            s += q[g * 32 + i];
        }
        const float d = amax / 127.0f * scale;
        ds[g] = make_float2(h2f(f2h(d)), h2f(f2h(d * s)));
    }
}

static void set_mat(TlMat& t, const Mat& m, float* out, int tile) {
    const int R = std::clamp((int)(tile / m.row_bytes), 1, 16);
    const bool k = m.ty->block == 256;
    t = {(u64)m.w.data(), (u64)out, (u64)m.row_bytes, (u64)m.rows, (u64)m.ty->t,
         (u64)(k ? m.cols / 64 : m.cols / 32), (u64)R, (u64)((m.rows + R - 1) / R)};
}

static void finish_phase(TlPhase& p) {
    p.n_tiles = 0;
    for (u64 i = 0; i < p.n_mats; i++) p.n_tiles += p.m[i].tiles;
    p.interleave = p.n_mats == 2 && p.m[0].tiles == p.m[1].tiles;
}

static u64 bits(float f) {
    u32 b;
    memcpy(&b, &f, 4);
    return b;
}

// One layer tail: output projection (e x e), gate/up (f x e), down (e x f), and when `next`
// the next layer's q/k/v (e, e/2, e/2 rows); types per matrix.
static int run(const char* name, const Ty& to, const Ty& tf, const Ty& td, const Ty& tq, int e, int f,
               bool next, int nbuf, int tile, bool defer, int hd = 0, int half_rot = 0, int limit = 4) {
    const bool rope = hd > 0;
    emu_cp_defer = defer;
    Mat wo = make_mat(to, e, e), wg = make_mat(tf, f, e), wu = make_mat(tf, f, e), wd = make_mat(td, e, f);
    Mat wq = make_mat(tq, e, e), wk = make_mat(tq, e / 2, e), wv = make_mat(tq, e / 2, e);
    std::vector<float> h0(e), nw2(e), nw1(e);
    for (auto& v : h0) v = rf() * 2;
    for (auto& v : nw2) v = 0.5f + rf();
    for (auto& v : nw1) v = 0.5f + rf();
    std::vector<int4> aq_s(e / 16);
    i8* aq = (i8*)aq_s.data();
    std::vector<float2> ads(e / 32);
    {
        std::vector<float> a(e);
        for (auto& v : a) v = rf();
        for (int g = 0; g < e / 32; g++) q8_1_ref(&a[g * 32], aq + g * 32, &ads[g]);
    }
    const float eps = 1e-5f;
    // Buffers the host allocates: the normed input (values, raw scales, squares), SwiGLU's.
    std::vector<int4> nq_s(e / 16 + 1), sq_s(f / 16 + 1);
    std::vector<float2> nds(e / 32), sds(f / 32);
    std::vector<double> nss(e / 32);
    const int per = 5 + e / 32 + f / 32 + e / 32 + (rope ? 2 * e / hd : 0);
    std::vector<u32> cnt(per + 4, 0);
    std::vector<float> h(e);
    auto c = [&](int w) { return (u64)(cnt.data() + w); };

    TlDesc D;
    memset(&D, 0, sizeof D);
    TlPhase& p0 = D.p[0];
    p0.n_mats = 1;
    set_mat(p0.m[0], wo, nullptr, tile);
    p0.in_kind = TL_IN_PREV_KERNEL, p0.K = e, p0.yq = (u64)aq, p0.yds = (u64)ads.data();
    p0.epi = TL_RESID_NORM, p0.h = (u64)h.data(), p0.nw = (u64)nw2.data();
    p0.oq = (u64)nq_s.data(), p0.ods = (u64)nds.data(), p0.oss = (u64)nss.data();
    p0.gcnt = c(5), p0.group_target = 32, p0.n_groups = e / 32, p0.pcnt = c(1);
    TlPhase& p1 = D.p[1];
    p1.n_mats = 2;
    set_mat(p1.m[0], wg, wg.out.data(), tile);
    set_mat(p1.m[1], wu, wu.out.data(), tile);
    p1.in_kind = TL_IN_NORM, p1.K = e, p1.yq = p0.oq, p1.yds = p0.ods, p1.ss = p0.oss, p1.eps_bits = bits(eps);
    p1.epi = TL_SWIGLU, p1.oq = (u64)sq_s.data(), p1.ods = (u64)sds.data();
    p1.gcnt = c(5 + e / 32), p1.group_target = 64, p1.n_groups = f / 32, p1.pcnt = c(2);
    TlPhase& p2 = D.p[2];
    p2.n_mats = 1;
    set_mat(p2.m[0], wd, nullptr, tile);
    p2.in_kind = TL_IN_Q8, p2.K = f, p2.yq = p1.oq, p2.yds = p1.ods;
    p2.epi = TL_RESID, p2.h = (u64)h.data(), p2.pcnt = c(3);
    if (next) {
        p2.epi = TL_RESID_NORM, p2.nw = (u64)nw1.data();
        p2.oq = p0.oq, p2.ods = p0.ods, p2.oss = p0.oss;
        p2.gcnt = c(5 + e / 32 + f / 32), p2.group_target = 32, p2.n_groups = e / 32;
        TlPhase& p3 = D.p[3];
        p3.n_mats = 3;
        set_mat(p3.m[0], wq, wq.out.data(), tile);
        set_mat(p3.m[1], wk, wk.out.data(), tile);
        set_mat(p3.m[2], wv, wv.out.data(), tile);
        p3.in_kind = TL_IN_NORM, p3.K = e, p3.yq = p0.oq, p3.yds = p0.ods, p3.ss = p0.oss, p3.eps_bits = bits(eps);
        p3.epi = rope ? TL_ROPE : TL_STORE, p3.pcnt = c(4);
        p3.gcnt = c(5 + e / 32 + f / 32 + e / 32), p3.group_target = rope ? hd : 0;
    }
    for (int i = 0; i < (next ? 4 : 3); i++) finish_phase(D.p[i]);
    D.n_phases = next ? 4 : 3, D.exit_cnt = c(0), D.counters = c(0), D.n_counters = per;
    size_t cap = 16;
    for (int i = 0; i < (int)D.n_phases; i++)
        for (u64 m = 0; m < D.p[i].n_mats; m++) cap = std::max(cap, (size_t)(D.p[i].m[m].R * D.p[i].m[m].row_bytes));
    cap = (cap + 15) / 16 * 16;
    const int kmax = std::max(e, f);
    const size_t smem = nbuf * cap + kmax + kmax / 32 * 8;

    // Reference.
    std::vector<float> h1(e), h2(e);
    std::vector<double> sc_o(e);
    for (int r = 0; r < e; r++) h1[r] = h0[r] + (float)row_dot(wo, r, aq, ads.data(), &sc_o[r]);
    std::vector<i8> rq;
    std::vector<float2> rds;
    norm_ref(h1, nw2, eps, rq, rds);
    std::vector<float> g(f), u(f), sv(f);
    std::vector<double> sc_g(f);
    for (int r = 0; r < f; r++) {
        g[r] = (float)row_dot(wg, r, rq.data(), rds.data(), &sc_g[r]);
        u[r] = (float)row_dot(wu, r, rq.data(), rds.data());
    }
    int bad = 0;
    double worst = 0;
    auto check = [&](const char* what, int r, float got, double want, double scale) {
        const double err = std::fabs(got - want) / (scale + 1e-30);
        worst = std::max(worst, err);
        if (!(err < 2e-4)) {
            if (bad < 6) fprintf(stderr, "  %s: %s row %d: got %g want %g\n", name, what, r, got, want);
            bad++;
        }
    };
    // RoPE: (cos, sin) pairs, two KV heads' rings (sink 2), the token at position 13.
    const int hk = rope ? (e / 2) / hd : 0;
    std::vector<float2> cs(hd / 2 + 1);
    for (auto& v : cs) {
        const float a = rf() * 3.14159f;
        v = make_float2(std::cos(a), std::sin(a));
    }
    std::vector<int> caps(hk), offs(hk);
    int rows = 0;
    for (int j = 0; j < hk; j++) caps[j] = 6 + 5 * j, offs[j] = rows, rows += caps[j];
    const int sink = 2, pos = 13, seq = 0;
    std::vector<u16> k16(e / 2 + 1), v16(e / 2 + 1), kc((size_t)rows * hd + 1, 0x7777), vc(kc);
    auto ring_row = [&](int j) { return offs[j] + ring_slot(caps[j], sink, pos); };
    for (int launch_i = 0; launch_i < 2; launch_i++) {
        h = h0;
        // The groups counted after the block's last tile of a phase, then every 1 or 5 tiles.
        const int acct = launch_i == 0 ? 0 : nbuf == 3 ? 5 : 1;
        const int pf = 3 * launch_i;  // tiles asked of L2 ahead: none, then 3
        emu_weights.clear();
        for (Mat* m : {&wo, &wg, &wu, &wd, &wq, &wk, &wv})
            emu_weights.push_back({(const u8*)m->w.data(), m->rows * m->row_bytes, std::vector<u8>(m->rows * m->row_bytes)});
        launch({1, 1, 1}, TL_THREADS, smem, [&] {
            layer_tail(&D, (int)(cap / 16), nbuf, limit, acct, pf, rope, hd, half_rot, rows, sink, cs.data(), k16.data(),
                       v16.data(), kc.data(), vc.data(), &pos, &seq, caps.data(), offs.data());
            if (!emu_cp_drained()) { fprintf(stderr, "copies outlive the block\n"); exit(1); }
        });
        for (int i = 0; i < (int)cnt.size(); i++)
            if (cnt[i]) { bad++; fprintf(stderr, "  %s: counter %d left at %u\n", name, i, cnt[i]); }
        {
            // With prefetching, every tile of the phases run but the first nbuf - 1 (copied
            // before any prefetch) is asked for, once; nothing of a phase left out.
            size_t missed = 0, stray = 0, asked = 0;
            const int walked = next && limit == 4 ? 7 : 4;
            for (int i = 0; i < 7; i++)
                for (u8 x : emu_weights[i].marks) {
                    asked += x;
                    if (i < walked) missed += !x;
                    else stray += x;
                }
            if (pf > 0 ? missed > (size_t)(nbuf - 1) * cap || stray : asked > 0) {
                bad++;
                fprintf(stderr, "  %s: prefetch left %zu bytes out, %zu past the phases run\n", name, missed, stray);
            }
        }
        // gate/up against the reference from the reference's normed input; the rest from the
        // kernel's own gate/up (so one rounding does not carry through every later phase).
        for (int r = 0; r < f; r++) {
            check("gate", r, wg.out[r], g[r], sc_g[r]);
            check("up", r, wu.out[r], u[r], sc_g[r]);
        }
        std::vector<int4> sq_r(f / 16);
        std::vector<float2> sds_r(f / 32);
        for (int r = 0; r < f; r++) sv[r] = silu_mul(wg.out[r], wu.out[r]);
        for (int gi = 0; gi < f / 32; gi++) q8_1_ref(&sv[gi * 32], (i8*)sq_r.data() + gi * 32, &sds_r[gi]);
        for (int r = 0; r < e; r++) {
            double sc_d;
            const double o = row_dot(wd, r, (const i8*)sq_r.data(), sds_r.data(), &sc_d);
            h2[r] = h1[r] + (float)o;
            check("residual", r, h[r], h2[r], std::fabs(h0[r]) + sc_o[r] + sc_d);
        }
        if (next && limit < 4) {
            // The last phase left out (a step without logits): nothing of it written.
            for (Mat* m : {&wq, &wk, &wv})
                for (float x : m->out)
                    if (x != 12345.0f) { bad++; fprintf(stderr, "  %s: a phase past the limit ran\n", name); break; }
        } else if (next) {
            std::vector<i8> q1;
            std::vector<float2> d1;
            norm_ref(h, nw1, eps, q1, d1);  // from the kernel's residual
            int mi = 0;
            for (Mat* m : {&wq, &wk, &wv}) {
                std::vector<double> want(m->rows), sc(m->rows);
                for (int r = 0; r < m->rows; r++) want[r] = row_dot(*m, r, q1.data(), d1.data(), &sc[r]);
                if (rope && mi < 2)
                    for (int r = 0; r < m->rows; r += 2)
                        if ((r % hd) / 2 < half_rot) {
                            const float2 c = cs[(r % hd) / 2];
                            const double a = want[r], b = want[r + 1];
                            want[r] = a * c.x - b * c.y;
                            want[r + 1] = a * c.y + b * c.x;
                            sc[r] = sc[r + 1] = sc[r] + sc[r + 1];
                        }
                for (int r = 0; r < m->rows; r++) check("q/k/v", r, m->out[r], want[r], sc[r]);
                if (rope && mi > 0) {
                    const std::vector<u16>& st = mi == 1 ? k16 : v16;
                    const std::vector<u16>& cache = mi == 1 ? kc : vc;
                    for (int r = 0; r < m->rows; r++) {
                        const int j = r / hd;
                        if (st[r] != f2h(m->out[r])) { bad++; if (bad < 6) fprintf(stderr, "  %s: staging row %d\n", name, r); }
                        if (cache[(size_t)ring_row(j) * hd + r % hd] != st[r]) { bad++; if (bad < 6) fprintf(stderr, "  %s: ring row %d\n", name, r); }
                    }
                    size_t touched = 0;
                    for (u16 x : cache) touched += x != 0x7777;
                    if (touched > (size_t)m->rows) { bad++; fprintf(stderr, "  %s: %zu cache values written\n", name, touched); }
                }
                mi++;
                for (int r = m->rows; r < m->rows + 8; r++)
                    if (m->out[r] != 12345.0f) { bad++; fprintf(stderr, "  %s: wrote past q/k/v rows\n", name); }
            }
        }
        for (Mat* m : {&wg, &wu})
            for (int r = m->rows; r < m->rows + 8; r++)
                if (m->out[r] != 12345.0f) { bad++; fprintf(stderr, "  %s: wrote past gate/up rows\n", name); }
    }
    printf("%-22s e %4d f %4d %s nbuf %d tile %5d (%s copies): %s (worst relative %.1e)\n", name, e, f,
           !next ? "last layer     " : rope ? "next q/k/v+rope" : "with next q/k/v", nbuf, tile, defer ? "late" : "early",
           bad ? "FAILED" : "ok", worst);
    return bad;
}

int main() {
    const std::vector<Ty> types = quant_types();
    int bad = 0, i = 0;
    for (const Ty& ty : types) {
        const int e = ty.t == T_Q6_K ? 2048 : 256, f = 2 * e;
        const int tiles[3] = {8192, 600, 16 * (int)((size_t)e / ty.block * ty.bytes)};
        // Every other type with RoPE in the last phase (head dim 64, or 128 with rotary on
        // the first 48 pairs only).
        const int hd = i % 2 ? (e >= 2048 ? 128 : 64) : 0;
        bad += run(ty.name, ty, ty, ty, ty, e, f, true, 2 + i % 3, tiles[i % 3], i % 2, hd, hd == 128 ? 48 : hd / 2);
        i++;
    }
    const Ty& q4k = types[5];
    const Ty& q6k = types[7];
    const Ty& q8 = types[4];
    // Q4_K_M's mix: Q6_K down projection and v, Q4_K elsewhere; the last layer's form.
    bad += run("q4_k + q6_k down", q4k, q4k, q6k, q4k, 2048, 2048, true, 2, 8192, true, 128, 64);
    bad += run("q4_k last layer", q4k, q4k, q4k, q4k, 256, 768, false, 3, 8192, true);
    bad += run("q8_0 one-row tiles", q8, q8, q8, q8, 256, 512, true, 4, 16, true);
    bad += run("q4_k phase limit 3", q4k, q4k, q4k, q4k, 256, 512, true, 2, 8192, true, 0, 0, 3);
    printf(bad ? "layer_tail under emulation: %d wrong outputs\n"
               : "layer_tail under emulation: every output equals the serial reference\n",
           bad);
    return bad ? 1 : 0;
}
