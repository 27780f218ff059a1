#!/usr/bin/env bash
# Runs the exact attention kernel of cuda/attention_exact.cu on the CPU under emu.h against the
# CPU backend's attention on the same inputs (attn_exact_check.cpp): the cases come from
# tests/cuda_backend.rs (`exact_attention_cases_dump`, built with cargo), and every output must
# be bit-identical; likewise ops.cu's RoPE pair and SwiGLU against the CPU's rope_row and swiglu.
# g++ 12+ (C++20, _Float16). About a minute on two cores after the build.
#
#   bash tools/cuda-emu/attn_exact_check.sh
set -euo pipefail
cd "$(dirname "$0")"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir "$tmp/cases"
(cd ../.. && MOA_EXACT_DUMP="$tmp/cases" cargo test --release --test cuda_backend \
    exact_attention_cases_dump -- --ignored --quiet)
{
    sed -n '/^\/\/ 2^k for a normal exponent k./,$p' ../../cuda/common.cuh
    sed -n '/^__device__ __forceinline__ void rope_pair/,/^}/p' ../../cuda/ops.cu
    sed -n '/^__device__ __forceinline__ float silu_mul/,/^}/p' ../../cuda/ops.cu
    sed -n '/^struct KeySpan {/,/^};/p' ../../cuda/attention.cu
    sed -n '/^#define EX_TILE/,/^#define ATTN_EXACT(/p' ../../cuda/attention_exact.cu |
        grep -v '^#define ATTN_EXACT('
} >"$tmp/exact_extract.cuh"
g++ -std=c++20 -O2 -ffp-contract=off -pthread -Wno-unknown-pragmas -I. -I"$tmp" \
    -o "$tmp/check" attn_exact_check.cpp
"$tmp/check" "$tmp/cases"
