#!/usr/bin/env bash
# GPU checks and benchmarks, built where cargo is and run where the GPU is.
#
#   bash tools/gpu-check.sh build          # here: stripped release binaries into .devbin/
#   bash tools/gpu-check.sh run [MODEL]    # on the GPU machine, from the repo root: all below
#   bash tools/gpu-check.sh tests|model [MODEL]|gprofile [MODEL]|eval [MODEL]|bench|parallel|variants|l2pf|skips|bandwidth|ab OLD|times|ptimes|profile|sweep
#
# With MOA_REQUIRE_GPU=1 (a missing GPU fails instead of skipping):
#   tests:     tests/cuda_backend.rs: every kernel against its CPU reference on fresh random data,
#              whole synthetic models (dense and random span plans, chunked prefill, decode across
#              ring wrap-around, long sequences at head dims 64/128) against the CPU backend;
#   model:     the default model (MODEL or models/SmolLM2-135M-Instruct.Q4_1.gguf) GPU vs CPU
#              (teacher-forced greedy), moa-perplexity on the license corpus on both, and the
#              PyTorch autograd comparison of moa-profile's gradients, CPU and GPU profiler
#              (tests/py/autograd_check.py; gguf-py from .whl/ when it is not installed);
#   gprofile:  the GPU profiler (moa-profile --device cuda): tests/cuda_profile.rs (GPU vs CPU
#              profiler on tiny random models: loss, per-layer gradients, influence blocks), then
#              `moa-profile run` on the default model with profiles/smollm2-135m-calib.jsonl at
#              1024,2048,4096,8192 (GPROFILE_PER samples per length, default 2) on the GPU and on
#              the CPU, per-sample times of both, `moa-profile diff` of the two profiles, and the
#              per-kernel GPU times of one sample at 8192 (MOA_KERNEL_TIMES=1);
#   eval:      moa-eval's pass key on the GPU for dense, uniform 0.5, the model's embedded plan
#              (when it has one) and every plans/*.json: the 21 cells of docs/results.md (lengths
#              1k..7k, depths 0.1/0.5/0.9, seed 42) with 5 trials each, JSON into $OUT/eval/ (or
#              target/gpu-eval/); then a GPU-vs-CPU sanity run (dense, 4 cells) on both devices;
#   bench:     a synthetic Llama-3-8B-shaped file (Q4_K, Q6_K output, vocab 49152: the shape of
#              the llama.cpp figures in ../shared/docs/anchors.md) and moa-bench on it, dense and
#              uniform 0.5, at the depths of the issue bars; then with a q8_0 K/V cache;
#   parallel:  moa-bench --parallel 1,4,16 with 16k prompts, dense and uniform 0.5;
#   variants:  tg128 of the 8B shape under each decode kernel-choice variable (MOA_WIDE_WPR,
#              MOA_PDL, MOA_MV_TILE), uniform 0.5 at depth 32768, and MOA_ATT_SPLIT=floor
#              (16 parallel sequences and depth 32768);
#   l2pf:      tg128 dense and at depth 32768 (uniform 0.5) under L2 prefetch budgets (MOA_L2_PF);
#   skips:     tg128 at depth 0 with launches of the small kernels left out (MOA_SKIP_KERNELS):
#              what fusing them could gain;
#   bandwidth: the decode matvec bandwidth report;
#   ab:        the issue-9 decode shapes (tg128 dense at depth 0, uniform 0.5 at depth 32768, 16 x
#              16384 parallel) for the binaries in .devbin and in OLD (`ab OLD`, a folder with an
#              earlier build's moa-bench), alternating so both see the same machine state; for
#              A/B comparisons of a change in one call (build the old one with `build` at the
#              old commit, then move .devbin there);
#   times:     per-kernel GPU times of decode steps from the built-in timer (MOA_KERNEL_TIMES=1);
#   ptimes:    the same for the 16 x 16384 parallel step and batch-1 decode at depth 32768 (0.5);
#   profile:   per-kernel times (Nsight Compute) of decode steps, and registers per kernel;
#   sweep:     the issue-9 H200 sweep within one call's limit: SWEEP=q (default; the parallel bar,
#              uniform 0.5 at depths 32768 and 65536, dense tg128), a (the bars with pp512, then
#              three attention stages), b (one-token variants MOA_MV_TILE=9216, MOA_L2_PF=8 and 0,
#              MOA_ATT_BLOCKS=396; dense depths; the matvec bandwidth report; the dense parallel
#              step; the GPU tests), t (the one-kernel layer tail on and off, MOA_LAYER_TAIL, then
#              MOA_TL_ACCOUNT=1, MOA_TL_PREFETCH, MOA_TL_ROPE=0, MOA_TL_BUFS, MOA_TL_BLOCKS and
#              MOA_TL_TILE, then its GPU test); LIM seconds in all (default 540): a test that would not
#              fit in what is left is skipped, not cut. On any card but an H200 it stops at once
#              unless ANY_GPU=1.
# `build` also compiles the kernels (2 and 3 attention stages) into .devbin/kc with `moa-bench
# kernels` when libnvrtc is found, and every step points MOA_CACHE there, so no run on the GPU
# machine pays the NVRTC compile (35-50 s per variant).
# The lent GPU machine takes at most 64 MiB per call: .devbin/ compressed (`tar cJf
# .devx/devbin.txz .devbin`: about 3 MB) and the default model (98 MB) split in two parts
# (`split -b 50000000`: the first into .devx/, the second into .devm2/) travel in two
# consecutive calls (carry .devx, then .devm2); a carried folder is gone on the next call, so
# the first call unpacks the binaries (`tar xJf .devx/devbin.txz`) and copies the model part to
# /tmp; `model` joins the parts into models/. The benchmark steps need no model: carry
# [".devbin"] as it is (about 55 MB with the precompiled kernels).
set -euo pipefail
cd "$(dirname "$0")/.."
out=.devbin
synth=${TMPDIR:-/tmp}/moa-8b-q4k.gguf
make_synth() {
    [ -f "$synth" ] || "$out/moa-bench" synth --shape llama3-8b --type q4_k --n-vocab 49152 --ctx 131072 -o "$synth"
}
model=${2:-models/SmolLM2-135M-Instruct.Q4_1.gguf}
# The default model from its two carried parts (see above) when it is not there yet.
ensure_model() {
    part1=$(ls .devm1/smol.aa .devx/smol.aa /tmp/smol.aa 2>/dev/null | head -1 || true)
    if [ ! -f "$model" ] && [ -n "$part1" ] && [ -f .devm2/smol.ab ]; then
        mkdir -p "$(dirname "$model")"
        cat "$part1" .devm2/smol.ab >"$model"
    fi
}
export MOA_REQUIRE_GPU=1
[ -d "$out/kc" ] && export MOA_CACHE="$PWD/$out/kc"
case "${1:-}" in
build)
    mkdir -p "$out"
    exe=$(cargo test --release --no-run --test cuda_backend 2>&1 | sed -n 's/.*Executable.*(\(.*\))/\1/p' | tail -1)
    pexe=$(cargo test --release --no-run --test cuda_profile 2>&1 | sed -n 's/.*Executable.*(\(.*\))/\1/p' | tail -1)
    cargo build --release --bin moa-run --bin moa-perplexity --bin moa-bench --bin moa-profile --bin moa-eval --bin moa-optimize
    strip -o "$out/cuda_backend" "$exe"
    strip -o "$out/cuda_profile" "$pexe"
    for b in moa-run moa-perplexity moa-bench moa-profile moa-eval moa-optimize; do strip -o "$out/$b" "target/release/$b"; done
    bash tests/fixtures/llamacpp/make_corpus.sh "$out/corpus.txt"
    rm -rf "$out/kc"
    for st in 2 3; do
        MOA_FA_STAGES=$st MOA_CACHE="$out/kc" "$out/moa-bench" kernels --arch sm_90 ||
            echo "(kernels not precompiled: the GPU machine compiles them on first use)"
    done
    du -sh "$out"
    ;;
run)
    for step in tests model gprofile eval bench parallel bandwidth; do bash "$0" "$step" "$model"; done
    ;;
tests)
    echo "== kernel and synthetic-model tests"
    "$out/cuda_backend" --test-threads 1 --nocapture --skip default_model 2>&1 | grep -E "^test |worst|panicked|result"
    ;;
model)
    ensure_model
    sha256sum "$model"
    echo "== default model GPU vs CPU"
    "$out/cuda_backend" --test-threads 1 --nocapture default_model 2>&1 | grep -v -E "^\s*$|^running" | tail -12
    echo "== perplexity (GPU, then CPU)"
    for dev in cuda cpu; do
        "$out/moa-perplexity" -m "$model" -f "$out/corpus.txt" -c 512 -b 512 --device $dev 2>&1 | grep Final
    done
    echo "== PyTorch autograd vs moa-profile gradients"
    if ! python3 -c "import gguf" 2>/dev/null && ls .whl/gguf-*.whl >/dev/null 2>&1; then
        python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
        export PYTHONPATH=/tmp/site
    fi
    for dev in cpu cuda; do
        echo "-- moa-profile grads --device $dev"
        "$out/moa-profile" grads -m "$model" --data profiles/smollm2-135m-calib.jsonl --max-tokens 1024 --device $dev -o /tmp/grads.bin
        python3 tests/py/autograd_check.py --model "$model" --grads /tmp/grads.bin --device cuda
    done
    ;;
gprofile)
    echo "== GPU profiler vs CPU profiler on tiny random models"
    "$out/cuda_profile" --test-threads 1 --nocapture 2>&1 | grep -E "^test |: loss|^worst|panicked|result" ||
        echo "cuda_profile FAILED (continuing with the default model)"
    if command -v nvcc >/dev/null; then
        echo "== registers and spills of the profiler's attention kernels (sm_90)"
        cat cuda/common.cuh cuda/profile.cu >/tmp/moa-prof.cu
        nvcc -arch=sm_90 -std=c++17 -cubin -Xptxas -v -o /tmp/moa-prof.cubin /tmp/moa-prof.cu 2>&1 |
            grep -E -A2 "Compiling entry.*prof_attn" | grep -E "entry|registers|spill" || true
    fi
    ensure_model
    data=profiles/smollm2-135m-calib.jsonl
    per=${GPROFILE_PER:-2}
    for dev in cuda cpu; do
        echo "== moa-profile run --device $dev, $per samples at each of 1024,2048,4096,8192"
        rm -f "/tmp/gprofile-$dev.bin"
        t0=$(date +%s.%N)
        "$out/moa-profile" run -m "$model" --data "$data" --lengths 1024,2048,4096,8192 \
            --per-length "$per" --device "$dev" -o "/tmp/gprofile-$dev.bin" 2>&1 |
            grep -E "^model|^length|^profile|error|note"
        awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "total %.1f s (model load included)\n", b - a }'
    done
    echo "== GPU profile vs CPU profile"
    "$out/moa-profile" diff /tmp/gprofile-cuda.bin /tmp/gprofile-cpu.bin --tol 1e-3 || true
    echo "== per-kernel GPU times of one sample at 8192 (MOA_KERNEL_TIMES=1)"
    rm -f /tmp/gprofile-times.bin
    MOA_KERNEL_TIMES=1 "$out/moa-profile" run -m "$model" --data "$data" --lengths 8192 --per-length 1 \
        --device cuda -o /tmp/gprofile-times.bin 2>&1 | grep -E -A16 "^kernel times"
    ;;
eval)
    ensure_model
    dir=${OUT:-target/gpu-eval}/eval
    mkdir -p "$dir"
    configs=dense,uniform:0.5
    # An embedded plan is a set of moa.* keys in the GGUF header (the first few MB).
    if head -c 16000000 "$model" | grep -qa 'moa\.alpha'; then configs="$configs,embedded"; fi
    for p in plans/*.json; do [ -f "$p" ] && configs="$configs,plan:$p"; done
    pk=(passkey -m "$model" --lengths 1k,2k,3k,4k,5k,6k,7k --depths 0.1,0.5,0.9)
    echo "== moa-eval pass key on the GPU: $configs, 5 trials per cell"
    t0=$(date +%s)
    "$out/moa-eval" "${pk[@]}" --device cuda --configs "$configs" --trials 5 -q \
        --json-file "$dir/passkey-gpu-5trials.json" --png "$dir/passkey-gpu-5trials.png"
    echo "($(($(date +%s) - t0)) s; JSON in $dir/passkey-gpu-5trials.json)"
    echo "== GPU vs CPU sanity: dense, lengths 1k and 4k, depths 0.1 and 0.9, 1 trial"
    for dev in cuda cpu; do
        t0=$(date +%s)
        "$out/moa-eval" passkey -m "$model" --lengths 1k,4k --depths 0.1,0.9 --configs dense \
            --device $dev -q --json-file "$dir/sanity-$dev.json"
        echo "($dev: $(($(date +%s) - t0)) s)"
    done
    python3 - "$dir/sanity-cuda.json" "$dir/sanity-cpu.json" <<'PY' || true
import json, sys
g, c = (json.load(open(p)) for p in sys.argv[1:3])
print("backends:", g["backend"], "|", c["backend"], "| GPU backend stats:", g["backend_stats"])
for a, b in zip(g["trials"], c["trials"]):
    print(f"len {a['length']:>5} depth {a['depth']:<4} key {a['expected']}  gpu {a['answer']!r} ({a['score']:.0f})  cpu {b['answer']!r} ({b['score']:.0f})")
PY
    ;;
bench)
    echo "== synthetic Llama-3-8B shape"
    make_synth
    b=("$out/moa-bench" -m "$synth" --device cuda -r 3)
    "${b[@]}" --dense -p 512 -n 128 -d 0,4096,16384,32768
    "${b[@]}" --dense -p 0 -n 128 -d 65536
    for d in 32768 65536; do "${b[@]}" --uniform 0.5 -p 512 -n 128 -d $d; done
    echo "== q8_0 K/V cache (-ctk q8_0 -ctv q8_0), the same shapes"
    q8=(-ctk q8_0 -ctv q8_0)
    "${b[@]}" "${q8[@]}" --dense -p 512 -n 128 -d 0,32768
    "${b[@]}" "${q8[@]}" --dense -p 0 -n 128 -d 65536
    "${b[@]}" "${q8[@]}" --uniform 0.5 -p 512 -n 128 -d 65536
    ;;
parallel)
    make_synth
    for mode in --dense "--uniform 0.5"; do "$out/moa-bench" -m "$synth" --device cuda $mode -p 16384 -n 128 --parallel 1,4,16; done
    ;;
variants)
    # One-token decode with the kernel-choice variables (tg128 at depth 0, dense): the default,
    # the down projection on dp4a, no programmatic dependent launch, every type streamed, nothing
    # streamed; then uniform 0.5 at depth 32768.
    make_synth
    for e in DEFAULT=1 MOA_WIDE_WPR=2 MOA_PDL=0 MOA_MV_TILE=8192 MOA_MV_TILE=0; do
        echo "-- $e"
        env "$e" "$out/moa-bench" -m "$synth" --device cuda --dense -p 0 -n 128 -r 3 2>&1 | grep -E "tg|rror"
    done
    "$out/moa-bench" -m "$synth" --device cuda --uniform 0.5 -p 0 -n 128 -d 32768 -r 2 2>&1 | grep -E "tg|rror"
    # Splits rounded down to stay in one wave (MOA_ATT_SPLIT=floor), where it matters most:
    # 16 parallel sequences (128 tile x head pairs: 3 splits = 1.45 waves, 2 = 0.97).
    for e in DEFAULT=1 MOA_ATT_SPLIT=floor; do
        echo "-- $e"
        env "$e" "$out/moa-bench" -m "$synth" --device cuda --uniform 0.5 -p 16384 -n 64 --parallel 16 2>&1 | grep -E "^\| 16|rror"
        env "$e" "$out/moa-bench" -m "$synth" --device cuda --uniform 0.5 -p 0 -n 128 -d 32768 -r 2 2>&1 | grep -E "tg|rror"
    done
    ;;
l2pf)
    # The L2 prefetch budget (MOA_L2_PF MiB per prefetching kernel; default 4) and its blocks:
    # tg128 dense at depth 0, twice each in alternation, then uniform 0.5 at depth 32768.
    make_synth
    for round in 1 2; do
        for e in MOA_L2_PF=0 MOA_L2_PF=2 MOA_L2_PF=4 MOA_L2_PF=6 MOA_L2_PF=8 "MOA_L2_PF=4 MOA_L2_PF_BLOCKS=16"; do
            echo "-- $e (round $round)"
            env $e "$out/moa-bench" -m "$synth" --device cuda --dense -p 0 -n 128 -r 1 2>&1 | grep -E "tg|rror"
        done
    done
    for e in MOA_L2_PF=0 MOA_L2_PF=4 MOA_L2_PF=8; do
        echo "-- $e"
        env $e "$out/moa-bench" -m "$synth" --device cuda --uniform 0.5 -p 0 -n 128 -d 32768 -r 1 2>&1 | grep -E "tg|rror"
    done
    ;;
skips)
    # What fusing the small kernels could gain: tg128 at depth 0 with launches of some kernels
    # left out (MOA_SKIP_KERNELS; the outputs are wrong then, only the time counts).
    make_synth
    for e in "" "add_rms_norm_q8*" "rope_kv" "quantize_q8_1" "swiglu_q8" "q8_1_mma_layout" \
        "attn_dec*,attn_merge*" "add_rms_norm_q8*,rope_kv,quantize_q8_1,swiglu_q8,q8_1_mma_layout,attn_dec*,attn_merge*"; do
        echo "-- skip: ${e:-nothing}"
        MOA_SKIP_KERNELS="$e" "$out/moa-bench" -m "$synth" --device cuda --dense -p 0 -n 128 -r 3 2>&1 | grep -E "tg|rror"
    done
    ;;
bandwidth)
    echo "== decode matvec bandwidth"
    "$out/cuda_backend" --ignored --nocapture matvec_bandwidth 2>&1 | grep -E "copy|n=1 |n=16"
    ;;
ab)
    old=${2:?usage: gpu-check.sh ab OLD_BINARY_DIR}
    [ -x "$old/moa-bench" ] || { echo "no moa-bench in $old" >&2; exit 1; }
    make_synth
    for round in 1 2; do
        for bin in "$old" "$out"; do
            echo "-- round $round: $bin"
            b=("$bin/moa-bench" -m "$synth" --device cuda)
            "${b[@]}" --dense -p 0 -n 128 -r 2 | grep tg
            "${b[@]}" --uniform 0.5 -p 0 -n 128 -r 1 -d 32768 | grep tg
            if [ "$round" = 1 ]; then
                "${b[@]}" --uniform 0.5 -p 16384 -n 32 --parallel 16 | grep "| 16"
            fi
        done
    done
    ;;
times)
    # Per-kernel GPU time of decode steps with the built-in kernel timer (CUDA events around
    # every launch, graphs off): depth 0, then depth 32768 dense and uniform 0.5.
    make_synth
    export MOA_KERNEL_TIMES=1
    "$out/moa-bench" -m "$synth" --device cuda --dense -p 512 -n 64 -r 1 2>&1 | head -30
    for mode in --dense "--uniform 0.5"; do
        "$out/moa-bench" -m "$synth" --device cuda $mode -p 0 -n 32 -r 1 -d 32768 2>&1 | grep -E "attn|kernel times|ms  " | head -8
    done
    ;;
ptimes)
    # Per-kernel GPU times of the 16-sequence decode step (16 x 16384 prompts, uniform 0.5; the
    # table covers the generation steps only), then of batch-1 decode at depth 32768 (0.5).
    make_synth
    export MOA_KERNEL_TIMES=1
    "$out/moa-bench" -m "$synth" --device cuda --uniform 0.5 --parallel 16 -p 16384 -n 8 2>&1 | head -40
    "$out/moa-bench" -m "$synth" --device cuda --uniform 0.5 -p 0 -n 32 -r 1 -d 32768 2>&1 | head -30
    ;;
profile)
    # Per-kernel GPU times of decode steps (Nsight Compute, clocks left alone), on the synthetic
    # 8B file: depth 0 dense, then the decode attention kernels at depth 32768 dense and 0.5.
    make_synth
    cat cuda/common.cuh cuda/quant.cu cuda/ops.cu cuda/attention.cu >/tmp/moa-all.cu
    nvcc -arch=sm_90 -std=c++17 -cubin -Xptxas -v -o /tmp/moa-all.cubin /tmp/moa-all.cu 2>&1 |
        grep -E -A3 "Compiling entry.*(attn_|mmvq_q4_k|mmvq_q6_k|rms|swiglu_q8|rope_kv)" | grep -E "entry|registers|spill" || true
    ncu=(ncu --clock-control none --metrics gpu__time_duration.sum --print-summary per-kernel)
    export MOA_CUDA_GRAPHS=0
    "${ncu[@]}" "$out/moa-bench" -m "$synth" --device cuda --dense -p 0 -n 4 -r 1 2>&1 |
        grep -E "^  [a-z_0-9]+|Average|gpu__time|Invocations" | head -150
    for mode in --dense "--uniform 0.5"; do
        "${ncu[@]}" -k regex:"attn_d|attn_merge|attn_dec" "$out/moa-bench" -m "$synth" --device cuda $mode -p 0 -n 4 -r 1 -d 32768 2>&1 |
            grep -E "^  [a-z_0-9]+|gpu__time" | head -40
    done
    ;;
sweep)
    t0=$(date +%s)
    lim=${LIM:-540}
    left() { echo $((lim - ($(date +%s) - t0))); }
    # Runs moa-bench with the arguments when more than $1 seconds are left.
    b() {
        local need=$1
        shift
        if [ "$(left)" -le "$need" ]; then
            echo "-- skipped (needs $need s, $(left) s left): $*"
            return
        fi
        echo "-- $* ($(left) s left)"
        # A run may take three times its estimate (a hung kernel, say a counter wait of the
        # layer tail that never ends, then costs that, not the rest of the call).
        local cap=$((need * 3 < $(left) ? need * 3 : $(left)))
        local rc=0
        timeout "$cap" "$out/moa-bench" -m "$synth" --device cuda "$@" >/tmp/moa-b.log 2>&1 || rc=$?
        grep -E "^\| [a-z0-9]|rror" /tmp/moa-b.log || true
        [ "$rc" != 124 ] || echo "-- timed out after $cap s"
    }
    card=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
    echo "card: $card"
    case "$card" in
    *H200*) ;;
    *) [ -n "${ANY_GPU:-}" ] || {
        echo "not an H200: stopping (ANY_GPU=1 runs it anyway)"
        exit 3
    } ;;
    esac
    make_synth
    u=(--uniform 0.5)
    case "${SWEEP:-q}" in
    q)
        b 45 "${u[@]}" -p 16384 -n 128 --parallel 16
        b 25 "${u[@]}" -p 0 -n 128 -d 32768 -r 1
        b 30 "${u[@]}" -p 0 -n 128 -d 65536 -r 1
        b 15 --dense -p 0 -n 128 -r 1
        ;;
    a)
        b 100 "${u[@]}" -p 16384 -n 128 --parallel 16
        b 60 "${u[@]}" -p 512 -n 128 -d 32768 -r 2
        b 50 --dense -p 512 -n 128 -r 2
        b 60 "${u[@]}" -p 512 -n 128 -d 65536 -r 1
        export MOA_FA_STAGES=3
        b 100 "${u[@]}" -p 16384 -n 128 --parallel 16
        b 50 "${u[@]}" -p 0 -n 128 -d 32768 -r 1
        b 60 "${u[@]}" -p 0 -n 128 -d 65536 -r 1
        ;;
    t)
        # The one-kernel layer tail against the separate kernels (alternating), then its
        # blocks per multiprocessor and tile sizes.
        for r in 1 2; do
            for lt in 1 0; do
                echo "== MOA_LAYER_TAIL=$lt"
                (
                    export MOA_LAYER_TAIL=$lt
                    b 15 --dense -p 0 -n 128 -r 1
                    b 25 "${u[@]}" -p 0 -n 128 -d 32768 -r 1
                    [ "$r" = 1 ] && b 30 "${u[@]}" -p 0 -n 128 -d 65536 -r 1
                )
            done
        done
        for e in MOA_TL_ACCOUNT=1 MOA_TL_PREFETCH=0 MOA_TL_PREFETCH=8 MOA_TL_PREFETCH=16 MOA_TL_ROPE=0 MOA_TL_BUFS=3 MOA_TL_BUFS=4 MOA_TL_BLOCKS=2 MOA_TL_BLOCKS=5 MOA_TL_TILE=4608 MOA_TL_TILE=9216 MOA_TL_TILE=16384; do
            echo "== $e"
            (
                export MOA_LAYER_TAIL=1 "${e?}"
                b 15 --dense -p 0 -n 128 -r 1
            )
        done
        if [ "$(left)" -gt 60 ]; then
            echo "== layer tail GPU test"
            timeout $(($(left) - 10)) "$out/cuda_backend" --test-threads 1 --nocapture layer_tail 2>&1 |
                grep -E "^test |worst|panicked|result" || true
        fi
        ;;
    b)
        for e in MOA_MV_TILE=9216 MOA_L2_PF=8 MOA_L2_PF=0 MOA_ATT_BLOCKS=396; do
            echo "== $e"
            (
                export "${e?}"
                b 40 "${u[@]}" -p 0 -n 128 -d 32768 -r 1
                b 20 --dense -p 0 -n 128 -r 1
            )
        done
        b 150 --dense -p 512 -n 128 -d 4096,16384,32768 -r 1
        b 80 --dense -p 0 -n 128 -d 65536 -r 1
        if [ "$(left)" -gt 60 ]; then
            echo "== decode matvec bandwidth"
            "$out/cuda_backend" --ignored --nocapture matvec_bandwidth 2>&1 | grep -E "copy|n=1 |n=16" || true
        fi
        b 150 --dense -p 16384 -n 128 --parallel 16
        if [ "$(left)" -gt 100 ]; then
            echo "== GPU tests"
            timeout $(($(left) - 10)) "$out/cuda_backend" --test-threads 1 --skip default_model 2>&1 |
                grep -E "^test |worst|panicked|result" || true
        fi
        ;;
    esac
    echo "sweep done in $(($(date +%s) - t0)) s"
    ;;
*)
    echo "usage: $0 build | run [MODEL] | tests | model [MODEL] | gprofile [MODEL] | eval [MODEL] | bench | parallel | variants | l2pf | skips | bandwidth | ab OLD | times | ptimes | profile | sweep" >&2
    exit 2
    ;;
esac
