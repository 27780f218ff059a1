#!/usr/bin/env bash
# Runs the split merge of decode and prefill attention (attn_merge_rows in cuda/attention.cu:
# the one-pass path up to MERGE_ONE_PASS splits per thread group member, the three-pass one
# beyond) on the CPU under emu.h against a double-precision merge of the same partials
# (attn_merge_check.cpp), with empty splits, 1 and 4 thread groups, head dims 64 and 128, and
# the q8_1 copy of the output. g++ 12+ (C++20, _Float16).
#
#   bash tools/cuda-emu/attn_merge_check.sh
set -euo pipefail
cd "$(dirname "$0")"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
src=../../cuda/attention.cu
{
    sed -n '/^__device__ __forceinline__ void q8_1_lane/,/^}/p' ../../cuda/quant.cu
    sed -n '/^#define MERGE_GROUPS/,/^extern "C" __global__ void attn_merge(/p' "$src" | sed '$d'
} >"$tmp/merge_extract.cuh"
g++ -std=c++20 -O2 -pthread -Wno-unknown-pragmas -I. -I"$tmp" -o "$tmp/check" attn_merge_check.cpp
"$tmp/check"
