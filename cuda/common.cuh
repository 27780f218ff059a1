// Shared helpers for every moa kernel. NVRTC compiles the kernels with no CUDA headers at all:
// half conversions are done with PTX `cvt` instructions, so only libnvrtc is needed at run time
// (and in CI, which compiles every kernel without a GPU).

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef signed char i8;
typedef unsigned long long u64;

#define WARP 32
#define NEG_INF (-__int_as_float(0x7f800000))

__device__ __forceinline__ float h2f(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ u16 f2h(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

__device__ __forceinline__ float bf2f(u16 h) { return __int_as_float(((u32)h) << 16); }

// Loads of 32-bit words from blocks that are only 2-byte aligned.
__device__ __forceinline__ int ld_i32_a2(const u8* p) {
    const u16* q = (const u16*)p;
    return (int)((u32)q[0] | ((u32)q[1] << 16));
}

__device__ __forceinline__ int ld_i32_a4(const u8* p) { return *(const int*)p; }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Programmatic dependent launch (sm_90+; no-ops before): a kernel launched with the
// programmatic-serialization attribute (every kernel of the decode step, `Gpu::launch_pdl`) may
// start while the kernel before it still runs, once every block of that one has called
// pdl_trigger(); it reads only its weights (never written by any kernel) before pdl_wait(),
// which returns when the kernel before it has finished and its writes are visible. Every thread
// of such a kernel calls pdl_wait() before it reads or writes anything else (the products after
// issuing their weight loads, the other kernels first thing: their launch and block set-up then
// overlap the kernel before). Those other kernels trigger only after their wait: a trigger
// before it let every later kernel of the step launch early and wait, holding multiprocessor
// slots (tg128 of the 8B shape 330 vs 351 t/s on an H100). In a kernel launched without the
// attribute pdl_wait() returns at once.
__device__ __forceinline__ void pdl_wait() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_trigger() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// L2 prefetch blocks. A small decode-step kernel (norm, RoPE, SwiGLU) may be launched with
// `pf_blocks` extra blocks at the end of its grid (the host adds them with MOA_L2_PF): those
// blocks only ask L2 to fetch up to three byte ranges (the first part of the weights of the
// product after it; addresses 16-byte aligned, lengths multiples of 16) and exit without waiting
// on the kernel before. A decode step is a chain of short kernels, and while the norm, RoPE,
// attention and SwiGLU run, memory reads next to nothing: the product after them then finds
// that part of its weights in L2. One warp per block issues `cp.async.bulk.prefetch.L2` (sm_90;
// a hint, no data comes back to the multiprocessor) over 4 KiB pieces, interleaving the ranges
// piece by piece in the order the product reads its rows. Returns whether this block was one of
// them (the kernel then returns).
#define PF_PARAMS \
    int pf_blocks, const char *pf0, u64 pf0n, const char *pf1, u64 pf1n, const char *pf2, u64 pf2n
#define PF_ARGS pf_blocks, pf0, pf0n, pf1, pf1n, pf2, pf2n
__device__ __forceinline__ bool l2_prefetch_block(PF_PARAMS) {
    const int first = (int)gridDim.x - pf_blocks;
    if ((int)blockIdx.x < first) return false;
#if __CUDA_ARCH__ >= 900
    if (threadIdx.x < WARP) {
        const u64 piece = 4096;
        const u64 stride = (u64)pf_blocks * WARP;
        const u64 most = pf0n > pf1n ? (pf0n > pf2n ? pf0n : pf2n) : (pf1n > pf2n ? pf1n : pf2n);
        const char* p[3] = {pf0, pf1, pf2};
        const u64 n[3] = {pf0n, pf1n, pf2n};
        for (u64 off = ((u64)(blockIdx.x - first) * WARP + threadIdx.x) * piece; off < most;
             off += stride * piece) {
#pragma unroll
            for (int r = 0; r < 3; r++) {
                if (off < n[r]) {
                    const u32 len = (u32)(n[r] - off < piece ? n[r] - off : piece);
                    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(p[r] + off),
                                 "r"(len)
                                 : "memory");
                }
            }
        }
    }
#endif
    return true;
}

// Shared-memory address of a generic pointer into shared memory, for PTX operands.
__device__ __forceinline__ u32 smem_addr(const void* p) {
    u32 a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}

// 16 bytes global -> shared, asynchronously; `bytes` < 16 zero-fills the rest (0: all zeros).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, int bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(smem_addr(dst)), "l"(src),
                 "r"(bytes)
                 : "memory");
}

__device__ __forceinline__ void cp_async_commit() {
    asm volatile("cp.async.commit_group;" ::: "memory");
}

template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

// ggml type ids (ggml.h enum ggml_type).
#define T_F32 0
#define T_F16 1
#define T_Q4_0 2
#define T_Q4_1 3
#define T_Q5_0 6
#define T_Q5_1 7
#define T_Q8_0 8
#define T_Q4_K 12
#define T_Q5_K 13
#define T_Q6_K 14
#define T_BF16 30

// 2^k for a normal exponent k.
__device__ __forceinline__ float pow2i(int k) { return __uint_as_float((u32)(k + 127) << 23); }

// ggml_v_expf (src/backend/cpu/ggml_attn.rs: v_expf), llama.cpp's vectorized expf as the CPU
// backend computes it: a polynomial in the reduced argument, scaled by 2^n with one rounding.
// Every operation is an explicit round-to-nearest intrinsic (NVRTC would contract a * b + c).
__device__ __forceinline__ float ggml_v_expf(float x) {
    const float r = __uint_as_float(0x4b400000u);  // 0x1.8p23
    const float z = __fmaf_rn(x, __uint_as_float(0x3fb8aa3bu), r);
    const float n = __fsub_rn(z, r);
    const float b = __fmaf_rn(-n, __uint_as_float(0x35bfbe8eu),
                              __fmaf_rn(-n, __uint_as_float(0x3f317200u), x));
    const float u = __fmul_rn(b, b);
    float j = __fmaf_rn(__uint_as_float(0x3c072010u), b, __uint_as_float(0x3d2b9f17u));
    j = __fmaf_rn(j, u, __fmaf_rn(__uint_as_float(0x3e2aaf33u), b, __uint_as_float(0x3efffedbu)));
    j = __fmaf_rn(j, u, __fmaf_rn(__uint_as_float(0x3f7ffff6u), b, 1.0f));
    if (n != n) return n;
    if (fabsf(n) > 192.0f) return n <= 0.0f ? 0.0f : __uint_as_float(0x7f800000u);
    // j * 2^n rounded once (AVX-512 scalef), via two steps outside the normal exponents.
    const int e = (int)n;
    if (e < -126) return __fmul_rn(__fmul_rn(j, pow2i(e + 100)), pow2i(-100));
    if (e > 127) return __fmul_rn(__fmul_rn(j, pow2i(e - 100)), pow2i(100));
    return __fmul_rn(j, pow2i(e));
}
