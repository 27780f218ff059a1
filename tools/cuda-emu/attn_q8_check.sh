#!/usr/bin/env bash
# Runs the span-attention kernel of cuda/attention.cu (attn_fa) on the CPU under emu.h with the
# tensor-core instructions emulated: every q8_0 / mixed K/V variant against the f16 one fed the
# same values, and the f16 one against a double-precision reference (attn_q8_check.cpp); every
# case twice: the K/V copies landing at once, and only when the kernel's wait retires them
# (emu_cp_async.h). g++ 12+ (C++20, _Float16). A minute or two on two cores.
#
#   bash tools/cuda-emu/attn_q8_check.sh
set -euo pipefail
cd "$(dirname "$0")"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
src=../../cuda/attention.cu
{
    sed -n '/^__device__ __forceinline__ void q8_1_lane/,/^}/p' ../../cuda/quant.cu
    sed -n '/^struct KeySpan {/,/^};/p' "$src"
    sed -n '/^template <int D, bool KQ, bool VQ>$/,/^};/p' "$src"
    sed -n '/^\/\/ Starts the copy of the K or the V rows/,/^#define ATTN_FA(/p' "$src" |
        grep -v '^#define ATTN_FA(' |
        sed 's/extern __shared__ __align__(16) u16 fa_smem\[\];/u16* fa_smem = (u16*)emu_dyn_smem;/'
} >"$tmp/attn_extract.cuh"
g++ -std=c++20 -O2 -pthread -Wno-unknown-pragmas -I. -I"$tmp" -o "$tmp/check" attn_q8_check.cpp
"$tmp/check"
