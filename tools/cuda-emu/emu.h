// A minimal CPU emulation of the CUDA features cuda/profile.cu uses, for tools/cuda-emu/check.sh:
// one OS thread per CUDA thread, a barrier per block (__syncthreads) and per warp (the shuffles
// exchange through a per-warp buffer between two barriers), float atomics through atomic_ref,
// `__shared__` variables as statics (blocks run one after another), dynamic shared memory as a
// per-block buffer filled with NaN. Only what the profiler's kernels need.
#pragma once
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>
#include <cstdio>
#include <cstdlib>
struct dim3e { unsigned x = 1, y = 1, z = 1; };
thread_local dim3e threadIdx, blockIdx;
dim3e gridDim, blockDim;
std::barrier<>* g_bar;
struct Warp { std::unique_ptr<std::barrier<>> bar; double buf[32]; };
std::vector<Warp> g_warps;
float* emu_dyn_smem;
struct float2 { float x, y; };
inline float2 make_float2(float a, float b) { return {a, b}; }
typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef signed char i8;
typedef unsigned long long u64;
#define WARP 32
#define NEG_INF (-INFINITY)
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(x)
#define __shared__ static
inline void __syncthreads() { g_bar->arrive_and_wait(); }
// A warp shuffle: every lane publishes v, then reads the value of lane src.
template <class T> T emu_shfl(T v, int src) {
    int lane = threadIdx.x % 32;
    Warp& w = g_warps[threadIdx.x / 32];
    static_assert(sizeof(T) <= 8);
    std::memcpy(&w.buf[lane], &v, sizeof(T));
    w.bar->arrive_and_wait();
    T r;
    std::memcpy(&r, &w.buf[src & 31], sizeof(T));
    w.bar->arrive_and_wait();
    return r;
}
template <class T> T __shfl_xor_sync(unsigned, T v, int o) { return emu_shfl(v, (int)(threadIdx.x % 32) ^ o); }
template <class T> T __shfl_sync(unsigned, T v, int src) { return emu_shfl(v, src); }
inline float atomicAdd(float* p, float v) { return std::atomic_ref<float>(*p).fetch_add(v); }
inline float warp_sum(float v) { for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o); return v; }
inline float warp_max(float v) { for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o)); return v; }
template <class F> void launch(dim3e grid, unsigned threads, size_t smem, F body) {
    gridDim = grid;
    blockDim = {threads, 1, 1};
    std::vector<float> dyn(smem / 4 + 1);
    for (unsigned z = 0; z < grid.z; z++)
        for (unsigned y = 0; y < grid.y; y++)
            for (unsigned x = 0; x < grid.x; x++) {
                std::barrier<> bar(threads);
                g_bar = &bar;
                g_warps.clear();
                g_warps.resize(threads / 32);
                for (auto& w : g_warps) w.bar = std::make_unique<std::barrier<>>(32);
                for (auto& f : dyn) f = NAN;  // reads before writes show up as NaN
                emu_dyn_smem = dyn.data();
                std::vector<std::thread> ts;
                for (unsigned t = 0; t < threads; t++)
                    ts.emplace_back([=] {
                        threadIdx = {t, 0, 0};
                        blockIdx = {x, y, z};
                        body();
                    });
                for (auto& t : ts) t.join();
            }
}
