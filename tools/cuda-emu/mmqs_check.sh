#!/usr/bin/env bash
# Runs the tensor-core small-batch products of cuda/quant.cu (q8_1_mma_layout: the q8_1 rows
# into fragment order, or for the K-quants q8k_mma_layout: f32 rows to ggml's q8_K in that
# order, with the block sums of the mins; mmqs: int8 mma.sync m16n8k32 and m16n8k16, each
# emulated by its own fragment layout, 16 weight rows per
# block, 8 warps over the units, 1 to 16 tokens) on the CPU under emu.h with mma.sync emulated
# per warp by its fragment layout (mmqs_check.cpp), against every row and token summed serially
# with the dp4a kernels' Unit<T> code (K-quants: on a CPU q8_K of the same rows). Checks the
# fragment indexing (weights and activations), the layout families, the q8_K quantization and
# min fragments, the padding token slots (AddressSanitizer: exactly n_tok activation rows are
# allocated), the warp reduction and the row picking over up to three matrices; the K-quants'
# 9-16 token launches also through mmqs1 (one unit per warp in flight). g++ 12+ (C++20).
#
#   bash tools/cuda-emu/mmqs_check.sh
set -euo pipefail
cd "$(dirname "$0")"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
src=../../cuda/quant.cu
source quant_extract.sh
{
    quant_common
    # The kernels without their launch macros; mma_s8 and mma_s8x2 (inline PTX) come from
    # mmqs_check.cpp (the k32 one emulated by its own fragment layout).
    sed -n '/^#define MQ_WARPS 8/,/^#define MMQS_NT(/p' "$src" | sed '$d' |
        sed '/^__device__ __forceinline__ void mma_s8/,/^}/d'
} >"$tmp/mmqs_extract.cuh"
g++ -std=c++20 -O1 -fsanitize=address -pthread -Wno-unknown-pragmas -I. -I"$tmp" -o "$tmp/check" mmqs_check.cpp
"$tmp/check"
