// CPU check of the q8_0 K/V tile path of cuda/attention.cu (tools/cuda-emu/kvq8_check.sh): the
// key-span bookkeeping (KeySpan), the tile loader (fa_load_part, f16 and q8_0 rows) and the
// q8_0 -> f16 conversion (fa_q8_to_f16), extracted from the kernel source and run for every
// thread of a block in turn, with cp.async as a plain copy (zero-fill when 0 bytes). For random
// head regions (sinks, rings that wrap, runs with staged rows) and every split and key tile as
// attn_fa walks them, each converted row must be the f16 rounding of the dequantized row of the
// key position the span says, rows past the tile's keys zero. Checks indexing and layout only.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>
#include <algorithm>
typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef signed char i8;
#define __device__
#define __forceinline__ inline
#define FA_THREADS 128
#define FA_KEYS 64
#define FA_STAGES 2
using std::max;
using std::min;
struct uint4 { u32 x, y, z, w; };
inline uint4 make_uint4(u32 a, u32 b, u32 c, u32 d) { return {a, b, c, d}; }
#include "emu_data.h"
inline u32 pack_h2(float lo, float hi) { return (u32)f2h(lo) | ((u32)f2h(hi) << 16); }
#include "emu_cp_async.h"  // copies land at once: the loaders are checked, not the waits
#include "kvq8_extract.cuh"


// Row of key position j (head g) as floats: deterministic in (j, g).
static void row_values(int j, int g, int D, float* out) {
    uint64_t s = rs;
    rs = 0x9E3779B97F4A7C15ull * (j + 1) + g * 7919 + 1;
    for (int i = 0; i < D; i++) out[i] = rf() * (1 + (i / 32) % 3);
    rs = s;
}
static float deq(const u8* row, int i) {
    const u8* blk = row + i / 32 * 34;
    u16 dh; memcpy(&dh, blk, 2);
    return h2f(dh) * (float)(i8)blk[2 + i % 32];
}

template <int D>
static int check_case(int cap, int sink, int p0, int nt, int n_split, int hk, int g) {
    constexpr int RB = D / 32 * 34, KS = D + 8;
    const int rows_per_seq = hk * cap + 3;  // some slack rows
    const int seq = 1;
    std::vector<int> caps(hk, cap), offs(hk);
    for (int h = 0; h < hk; h++) offs[h] = h * cap + 1;
    // Cache (two sequences), q8 and f16, holding for each position < p0 its row in the ring.
    const size_t cache_rows = 2 * (size_t)rows_per_seq;
    std::vector<u8> c8(cache_rows * RB, 0xAB), c16(cache_rows * D * 2, 0xCD);
    std::vector<float> x(D);
    for (int j = 0; j < p0; j++) {
        int slot = (j < sink || cap <= sink) ? j : sink + (j - sink) % (cap - sink);
        size_t row = (size_t)seq * rows_per_seq + offs[g] + slot;
        row_values(j, g, D, x.data());
        quant_row(x.data(), D, &c8[row * RB]);
        for (int i = 0; i < D; i++) { u16 h = f2h(x[i]); memcpy(&c16[(row * D + i) * 2], &h, 2); }
    }
    // Staging: the batch holds 2 other tokens first (rs = 2), rows of hk heads.
    const int rs0 = 2, nbatch = rs0 + nt;
    std::vector<u8> s8((size_t)nbatch * hk * RB, 0xEF), s16((size_t)nbatch * hk * D * 2, 0x77);
    for (int t = 0; t < nt; t++) {
        row_values(p0 + t, g, D, x.data());
        size_t r = (size_t)(rs0 + t) * hk + g;
        quant_row(x.data(), D, &s8[r * RB]);
        for (int i = 0; i < D; i++) { u16 h = f2h(x[i]); memcpy(&s16[(r * D + i) * 2], &h, 2); }
    }
    std::vector<int> pos(nbatch), tseq(nbatch), tp0(nbatch), trs(nbatch);
    for (int t = 0; t < nbatch; t++) { pos[t] = p0 + t - rs0; tseq[t] = seq; tp0[t] = p0; trs[t] = rs0; }
    const int t0 = rs0;
    KeySpan ks(pos.data(), tseq.data(), tp0.data(), trs.data(), t0, nt, g, caps.data(), offs.data(),
               rows_per_seq, sink, hk * D, (const u16*)c16.data(), (const u16*)c16.data(),
               (const u16*)s16.data(), (const u16*)s16.data());
    const int nk = ks.nk;
    int per = (nk + n_split - 1) / n_split;
    per = max((per + FA_KEYS - 1) / FA_KEYS * FA_KEYS, 128);
    alignas(16) static u8 stage[FA_KEYS * 2 * (128 + 8) + 64];
    alignas(16) static u16 conv[FA_KEYS * (128 + 8)];
    int bad = 0, tiles = 0, ring_tiles = 0;
    for (int z = 0; z < n_split; z++) {
        const int k0 = z * per, k1 = min(nk, k0 + per);
        const int n_kt = k0 < k1 ? (k1 - k0 + FA_KEYS - 1) / FA_KEYS : 0;
        for (int it = 0; it < n_kt; it++) {
            const int kb = k0 + it * FA_KEYS, nkt = min(FA_KEYS, k1 - kb);
            const bool ring = nkt == FA_KEYS && kb >= ks.ns && ks.win >= FA_KEYS &&
                              ks.pos(kb + FA_KEYS - 1) < ks.p0;
            const int s0 = ring ? ks.sink + (ks.pos(kb) - ks.sink) % ks.win : 0;
            tiles++;
            ring_tiles += ring;
            for (int q8 = 0; q8 < 2; q8++) {
                memset(stage, 0x5A, sizeof stage);
                memset(conv, 0x5A, sizeof conv);
                for (int tid = 0; tid < FA_THREADS; tid++) {
                    if (q8) fa_load_part<D, true>(stage, ks, kb, nkt, ring, s0, c8.data(), s8.data(), tid);
                    else fa_load_part<D, false>(stage, ks, kb, nkt, ring, s0, c16.data(), s16.data(), tid);
                }
                if (q8)
                    for (int tid = 0; tid < FA_THREADS; tid++) fa_q8_to_f16<D, FA_KEYS, FA_THREADS>(stage, conv, 0, tid);
                else
                    memcpy(conv, stage, FA_KEYS * KS * 2);
                for (int kk = 0; kk < FA_KEYS; kk++) {
                    if (kk < nkt) {
                        const int j = ks.pos(kb + kk);
                        row_values(j, g, D, x.data());
                        std::vector<u8> qr(RB);
                        quant_row(x.data(), D, qr.data());
                        for (int i = 0; i < D; i++) {
                            u16 want = q8 ? f2h(deq(qr.data(), i)) : f2h(x[i]);
                            if (conv[kk * KS + i] != want) {
                                if (bad++ < 5) fprintf(stderr, "D %d q8 %d cap %d sink %d p0 %d nt %d split %d tile %d key %d (pos %d) value %d: %04x want %04x\n",
                                                       D, q8, cap, sink, p0, nt, z, it, kk, j, i, conv[kk * KS + i], want);
                            }
                        }
                    } else {
                        for (int i = 0; i < D; i++)
                            if (conv[kk * KS + i] != 0 && bad++ < 5)
                                fprintf(stderr, "D %d q8 %d: padding key %d value %d not zero\n", D, q8, kk, i);
                    }
                }
            }
        }
    }
    (void)tiles;
    return bad + 0 * ring_tiles;
}

int main() {
    int bad = 0, cases = 0;
    for (int c = 0; c < 400; c++) {
        const bool dense = c % 5 == 0;
        const int sink = dense ? 0 : (int)(rnd() % 3) * 32 + (int)(rnd() % 2) * 4;
        const int cap = dense ? 4000 : sink + 1 + (int)(rnd() % 600);
        const int p0 = (int)(rnd() % 1500);
        const int nt = 1 + (int)(rnd() % (c % 3 == 0 ? 64 : 4));
        const int n_split = 1 + (int)(rnd() % 8);
        const int hk = 1 + (int)(rnd() % 3);
        const int g = (int)(rnd() % hk);
        bad += (c % 2) ? check_case<64>(cap, sink, p0, nt, n_split, hk, g)
                       : check_case<128>(cap, sink, p0, nt, n_split, hk, g);
        cases++;
    }
    printf("%d cases, %d bad values\n", cases, bad);
    return bad != 0;
}
