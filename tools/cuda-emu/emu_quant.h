// Shared by the product-kernel checks (mmvs_check.cpp, mmqs_check.cpp): the vector types, the
// integer intrinsics and the load helpers the decode product kernels of cuda/quant.cu use, and
// no-op programmatic-launch calls. Include after emu.h and emu_data.h, before the extracted
// kernels.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
struct int4 { int x, y, z, w; };
struct int2 { int x, y; };
inline int2 make_int2(int a, int b) { return {a, b}; }
inline int ld_i32_a2(const u8* p) { int v; memcpy(&v, p, 4); return v; }
inline int ld_i32_a4(const u8* p) {
    if ((uintptr_t)p % 4) { fprintf(stderr, "misaligned 4-byte load\n"); exit(1); }
    return *(const int*)p;
}
inline int __dp4a(int a, int b, int c) {
    for (int i = 0; i < 4; i++) c += (int)(i8)(a >> (8 * i)) * (int)(i8)(b >> (8 * i));
    return c;
}
inline unsigned __vsubss4(unsigned a, unsigned b) {
    unsigned r = 0;
    for (int i = 0; i < 4; i++) {
        int v = (int)(i8)(a >> (8 * i)) - (int)(i8)(b >> (8 * i));
        v = std::clamp(v, -128, 127);
        r |= (unsigned)(u8)(i8)v << (8 * i);
    }
    return r;
}
inline int __float2int_rn(float x) { return (int)std::nearbyint(x); }  // ties to even
inline void pdl_wait() {}
inline void pdl_trigger() {}
// L2 prefetch blocks (common.cuh): the prefetch is a hint with no effect here; which blocks
// are prefetch blocks (and return) is the same as on the GPU.
#define PF_PARAMS \
    int pf_blocks, const char *pf0, u64 pf0n, const char *pf1, u64 pf1n, const char *pf2, u64 pf2n
#define PF_ARGS pf_blocks, pf0, pf0n, pf1, pf1n, pf2, pf2n
inline bool l2_prefetch_block(PF_PARAMS) {
    (void)pf0, (void)pf0n, (void)pf1, (void)pf1n, (void)pf2, (void)pf2n;
    return (int)blockIdx.x >= (int)gridDim.x - pf_blocks;
}
