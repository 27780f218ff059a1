#!/usr/bin/env bash
# Runs the q8_0 K/V tile path of cuda/attention.cu (key spans, tile loader, q8_0 -> f16
# conversion) on the CPU against directly computed rows (kvq8_check.cpp). g++ 12+ (_Float16).
#
#   bash tools/cuda-emu/kvq8_check.sh
set -euo pipefail
cd "$(dirname "$0")"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
src=../../cuda/attention.cu
{
    sed -n '/^struct KeySpan {/,/^};/p' "$src"
    sed -n '/^template <int D, bool KQ, bool VQ>$/,/^};/p' "$src"
    sed -n '/^\/\/ Starts the copy of the K or the V rows/,/^\/\/ WK: warps splitting/p' "$src"
} >"$tmp/kvq8_extract.cuh"
g++ -std=c++20 -O2 -Wno-unknown-pragmas -I"$tmp" -o "$tmp/check" kvq8_check.cpp
"$tmp/check"
