// Shared by the emulator checks (tools/cuda-emu/*_check.cpp): f16 conversions as the kernels'
// h2f / f2h, a seeded xorshift generator, and ggml's reference q8_0 row quantizer (the bytes the
// CPU backend's q8_0 K/V cache holds). Include after the u8 / u16 / i8 typedefs.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
inline float h2f(u16 h) { _Float16 f; memcpy(&f, &h, 2); return (float)f; }
inline u16 f2h(float v) { _Float16 f = (_Float16)v; u16 h; memcpy(&h, &f, 2); return h; }

static uint64_t rs = 88172645463325252ull;
static uint64_t rnd() { rs ^= rs << 13; rs ^= rs >> 7; rs ^= rs << 17; return rs; }
static float rf() { return (rnd() >> 40) / float(1 << 24) * 2 - 1; }

// q8_0 blocks of D values: d = amax / 127 as f16, q = round(x / d) with ties away from zero.
static void quant_row(const float* x, int D, u8* out) {
    for (int b = 0; b < D / 32; b++) {
        float amax = 0;
        for (int i = 0; i < 32; i++) amax = std::max(amax, std::fabs(x[b * 32 + i]));
        float d = amax / 127, id = d ? 1 / d : 0;
        u16 dh = f2h(d);
        memcpy(out + b * 34, &dh, 2);
        for (int i = 0; i < 32; i++) out[b * 34 + 2 + i] = (u8)(i8)std::lround(x[b * 32 + i] * id);
    }
}
