#!/usr/bin/env bash
# Runs the one-token Q4_K/Q5_K product with four lanes per unit of cuda/quant.cu (mmvk) on the
# CPU under emu.h, against the same rows summed serially with Unit<T> (mmvq's per-unit code;
# mmvk_check.cpp): the chunk split of every unit (nibble, sub-block scale, Q5_K high bits, the
# block minimum once per 32 values), the steps in flight, warps per row and up to three
# matrices per launch. The GPU tests compare both kernels with the dequantized reference.
# g++ 12+ (C++20, _Float16).
#
#   bash tools/cuda-emu/mmvk_check.sh
set -euo pipefail
cd "$(dirname "$0")"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
src=../../cuda/quant.cu
source quant_extract.sh
{
    quant_common
    sed -n "/^\/\/ ---- one token, K-quants with four lanes per unit/,/^\/\/ Four steps in flight per lane/p" "$src" | sed '$d'
} >"$tmp/mmvk_extract.cuh"
g++ -std=c++20 -O2 -pthread -Wno-unknown-pragmas -I. -I"$tmp" -o "$tmp/check" mmvk_check.cpp
"$tmp/check"
