#!/usr/bin/env bash
# Prints what every product-kernel check needs from cuda/quant.cu ahead of its kernel: the type
# ids and MV_WARPS, the one-unit code (Unit<T>) and Rows3. Sourced by mmvs_check.sh and
# mmqs_check.sh from tools/cuda-emu/.
quant_common() {
    local src=../../cuda/quant.cu
    grep -E '^#define (T_[A-Z0-9_]+|MV_WARPS) ' ../../cuda/common.cuh "$src" -h
    sed -n '/^\/\/ ---- one unit of a row times q8_1 activations/,/^\/\/ acc\[t\] += units u/p' "$src" | sed '$d'
    sed -n '/^struct Rows3 {/,/^};/p' "$src"
}
