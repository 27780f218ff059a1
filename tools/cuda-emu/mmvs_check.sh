#!/usr/bin/env bash
# Runs the streamed one-token matvec of cuda/quant.cu (mmvs: tiles of whole rows copied into
# shared memory, a warp per row or all warps on a one-row tile, up to three matrices per launch)
# on the CPU under emu.h, against the same rows summed serially with the same Unit<T> code
# (mmvs_check.cpp). Checks the tiling, row picking, warp split and reduction, not Unit<T> (the
# GPU tests compare that with the dequantized reference). g++ 12+ (C++20, _Float16).
#
#   bash tools/cuda-emu/mmvs_check.sh
set -euo pipefail
cd "$(dirname "$0")"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
src=../../cuda/quant.cu
source quant_extract.sh
{
    quant_common
    sed -n "/^\/\/ One lane's share of a row held in shared memory/,/^#define MMVS(/p" "$src" | sed '$d' |
        sed 's/extern __shared__ int4 mvs_tile\[\];/int4* mvs_tile = (int4*)emu_dyn_smem;/'
} >"$tmp/mmvs_extract.cuh"
g++ -std=c++20 -O2 -pthread -Wno-unknown-pragmas -I. -I"$tmp" -o "$tmp/check" mmvs_check.cpp
"$tmp/check"
