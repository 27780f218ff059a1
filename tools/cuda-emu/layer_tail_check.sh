#!/usr/bin/env bash
# Runs the one-kernel layer tail of cuda/layer_tail.cu (the batch-1 decode step's output
# projection, residual, FFN norm, gate/up, SwiGLU, down projection, residual, next norm and
# q/k/v) on the CPU under emu.h with one block (the emulator runs blocks one after another, so
# the blocks' waits on each other are exercised on the GPU only: tests/cuda_backend.rs
# layer_tail_matches_separate_kernels), against a serial reference of the same arithmetic
# (layer_tail_check.cpp): every quantized type, a mixed-type layer, the last layer's form (no
# next norm), the next layer's RoPE and K/V staging and ring store done per head (TL_ROPE), 2 to
# 4 tile buffers, tiles of 1 to 16 rows, the copies landing at once or only when the kernel's
# wait retires them, groups counted once per phase or every few tiles, and the L2 prefetches'
# addresses (tl_prefetch, marked by emu_l2_prefetch instead of the sm_90 instruction). g++ 12+ (C++20, _Float16).
#
#   bash tools/cuda-emu/layer_tail_check.sh
set -euo pipefail
cd "$(dirname "$0")"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
src=../../cuda/quant.cu
source quant_extract.sh
{
    quant_common
    sed -n '/^__device__ __forceinline__ void q8_1_lane/,/^}/p' "$src"
    echo 'template <int T>'
    sed -n '/^__device__ __forceinline__ float mmvs_row/,/^}/p' "$src"
    sed -n '/^__device__ __forceinline__ void rope_pair/,/^}/p' ../../cuda/ops.cu
    sed -n '/^__device__ __forceinline__ int ring_slot/,/^}/p' ../../cuda/ops.cu
    sed '/^__device__ __forceinline__ u32 tl_ld_acquire/,/^}/d' ../../cuda/layer_tail.cu |
        sed 's/extern __shared__ int4 tl_smem\[\];/int4* tl_smem = (int4*)emu_dyn_smem;/' |
        sed '/^__device__ __forceinline__ void tl_prefetch/,/^}/{s/#if __CUDA_ARCH__ >= 900/#if 1/;s/asm volatile("cp.async.bulk.prefetch.L2.global \[%0\], %1;" ::"l"(src + off), "r"(len) : "memory");/emu_l2_prefetch(src + off, len);/}'
} >"$tmp/layer_tail_extract.cuh"
g++ -std=c++20 -O2 -ffp-contract=off -pthread -Wno-unknown-pragmas -I. -I"$tmp" -o "$tmp/check" layer_tail_check.cpp
"$tmp/check"
