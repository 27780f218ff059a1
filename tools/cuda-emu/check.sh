#!/usr/bin/env bash
# Runs the profiler's kernels (cuda/profile.cu) on the CPU under a small emulation of the CUDA
# features they use (emu.h: one OS thread per CUDA thread, barriers for __syncthreads and warp
# shuffles, dynamic shared memory filled with NaN so reads before writes show) and compares them
# with naive double-precision references (profile_check.cpp). No GPU or CUDA toolkit needed, only
# g++ with C++20: a check of the kernels' indexing, masking and synchronization logic before a
# GPU run (it cannot see races that barriers hide, NVRTC-specific issues or speed).
#
#   bash tools/cuda-emu/check.sh
set -euo pipefail
cd "$(dirname "$0")"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# Dynamic shared memory becomes a pointer to the emulator's per-block buffer.
sed 's/extern __shared__ float pa_smem\[\];/float* pa_smem = emu_dyn_smem;/' ../../cuda/profile.cu >"$tmp/profile_emu.cu"
g++ -std=c++20 -O2 -pthread -Wno-unknown-pragmas -I. -I"$tmp" -o "$tmp/check" profile_check.cpp
"$tmp/check"
