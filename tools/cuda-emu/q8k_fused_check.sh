#!/usr/bin/env bash
# Runs the kernels that write the K-quant tensor-core products' q8_K activation layout as they
# produce their output (add_rms_norm_q8_<PER> with yq_m, swiglu_q8k in cuda/ops.cu) on the CPU
# under emu.h (q8k_fused_check.cpp), against q8k_mma_layout (cuda/quant.cu) run on the f32
# output they wrote: the layout bytes, scales and min fragments of every token must be
# identical, and the f32 output equal to the unfused kernel's. The fused kernels run with three
# L2 prefetch blocks after their own (l2_prefetch_block), which must touch nothing (AddressSanitizer
# sees a stray row). g++ 12+ (C++20).
#
#   bash tools/cuda-emu/q8k_fused_check.sh
set -euo pipefail
cd "$(dirname "$0")"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
q=../../cuda/quant.cu
o=../../cuda/ops.cu
{
    sed -n '/^__device__ __forceinline__ void q8_1_lane/,/^}/p' "$q"
    sed -n "/^\/\/ One warp's part of the q8_K layout/,/^\/\/ One unit of a K-quant row as lane c's A fragments/p" "$q" | sed '$d'
    sed -n '/^\/\/ With yq_m (width a multiple of 256/,/^ADD_RMS_NORM_Q8(add_rms_norm_q8k_, 16, true)/p' "$o"
    sed -n '/^extern "C" __global__ void swiglu_q8k(/,/^}/p' "$o"
} >"$tmp/q8k_fused_extract.cuh"
g++ -std=c++20 -O1 -fsanitize=address -pthread -Wno-unknown-pragmas -I. -I"$tmp" -o "$tmp/check" q8k_fused_check.cpp
"$tmp/check"
