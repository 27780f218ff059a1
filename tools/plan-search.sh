#!/usr/bin/env bash
# Plan search on a GPU: candidate plans for the default model from several objectives, chosen
# by the key loss of pass-key prompts of a validation seed (not the reported seed 42), then the
# chosen ones evaluated on the reported pass-key grid. Run from the repo root on the GPU machine
# after `tools/gpu-check.sh build` (binaries in .devbin/); outputs under $OUT/search (or
# target/plan-search).
#
#   bash tools/plan-search.sh data [MODEL]    # retrieval calibration set, its profile, head ablations
#   bash tools/plan-search.sh plans [MODEL]   # candidate plans (moa-optimize variants)
#   bash tools/plan-search.sh measure [MODEL] [PLAN...] # measured cost tables (base dense, then
#                                             # the plan made from it, then each PLAN) and their plans
#   bash tools/plan-search.sh mix [MODEL]     # fine retrieval tables (beta step 0.125) inside
#                                             # BASE and dense, profile-weighted mixes, a
#                                             # smallest beta
#   bash tools/plan-search.sh validate [MODEL] # key loss + pass key on the validation seed
#   bash tools/plan-search.sh final [MODEL] PLAN... # the reported grid (seed 42, 5 trials)
#
# Environment: DOCS (document folders for the retrieval set) [/usr/share/common-licenses
# /usr/share/vim/vim90/doc], KEY_PER_LENGTH [12], VAL_SEED [7], VAL_TRIALS [5], ABL_MAX [16],
# CANDS (glob of candidate names to validate) [*], RANK (validate: `first` ranks by the key's
# first-token loss instead of the whole key's) [key], VAL_TEXT (validate: also perplexity at 8k
# on this text, not the reported corpus) [none], FINAL_TRIALS [5], RULES and GRID (the measured
# tables' rules and the solver grid that must hold only them; measure: [0:0.25,..,0:1 and
# 0:0:1,0.25], mix: [0:0.125,0:0.25,..,0:1 and 0:0:1,0.125]), BASE (mix: the base plan)
# [$WORK/cand/mk1-h1-abldense.json], PROFILE_WEIGHTS (mix) [0.05 0.1 0.15 0.2 0.25 0.5 1 2
# 4], MIN_BETAS (mix: the table's plan on grids without the shorter betas) [0.25 0.375], GEN
# (mix: also a general response-loss table) [off], GEN_DATA (mix, GEN: its conversations)
# [profiles/smollm2-135m-calib-gen6.jsonl: the main calibration set's first two conversations
# at 1k, 2k and 4k], MIX (mix, GEN: weights of the general table next to the retrieval table)
# [0.25 0.5 1 2], GEN_PROFILE_WEIGHTS (mix, GEN: the profile's weight next to it) [0.1 0.25 0.5].
set -euo pipefail
cd "$(dirname "$0")/.."
bin=.devbin
[ -x "$bin/moa-optimize" ] || bin=target/release
model=${2:-models/SmolLM2-135M-Instruct.Q4_1.gguf}
dir=${OUT:-target/plan-search}/search
work=${WORK:-/tmp/plan-search}
mkdir -p "$dir" "$work/cand"
main_profile=profiles/smollm2-135m.bin
lens=1024,2048,4096,8192,16384
case "${1:-}" in
data)
    src=()
    for d in ${DOCS:-/usr/share/common-licenses /usr/share/vim/vim90/doc}; do src+=(--source "$d"); done
    t0=$(date +%s)
    echo "== retrieval calibration set on the GPU (fact/facts, key loss), seed 11"
    [ -s "$work/key.jsonl" ] || "$bin/moa-profile" calib -m "$model" "${src[@]}" --device cuda \
        --tasks fact,facts --key-loss --lengths 1024,2048,4096,8192 \
        --per-length "${KEY_PER_LENGTH:-12}" --val-lengths "" --seed 11 \
        -o "$work/key.jsonl" --val-out "$work/key-val.jsonl" 2>&1 | tail -3
    echo "($(($(date +%s) - t0)) s) records per length:"
    python3 -c "
import json,collections,sys
c=collections.Counter(json.loads(l)['length'] for l in open(sys.argv[1]))
print(dict(sorted(c.items())))" "$work/key.jsonl"
    cp "$work/key.jsonl" "$dir/"
    echo "== its profile on the GPU"
    t0=$(date +%s)
    "$bin/moa-profile" run -m "$model" --data "$work/key.jsonl" --lengths 1024,2048,4096,8192 \
        --device cuda -o "$work/key.bin" 2>&1 | grep -E "^profile|error" || true
    echo "($(($(date +%s) - t0)) s)"
    cp "$work/key.bin" "$dir/"
    for base in dense short; do
        echo "== head ablation, base $base (short rule 256:0)"
        t0=$(date +%s)
        "$bin/moa-profile" ablate -m "$model" --data "$work/key.jsonl",profiles/smollm2-135m-calib-key.jsonl \
            --max-tokens 4200 --max-per-file "${ABL_MAX:-16}" --base $base -b 4096 --device cuda \
            -o "$dir/ablate-$base.json" 2>&1 | tr '\r' '\n' | grep -v "^  pass" | tail -34
        echo "($(($(date +%s) - t0)) s)"
    done
    ;;
keyset)
    # Another retrieval set (seed KEY_SEED, KEY_PER_LENGTH per length at 1k/2k/4k) for the
    # measured tables: $work/key-$KEY_SEED.jsonl, used by `measure` with the first one.
    src=()
    for d in ${DOCS:-/usr/share/common-licenses /usr/share/vim/vim90/doc}; do src+=(--source "$d"); done
    seed=${KEY_SEED:-12}
    "$bin/moa-profile" calib -m "$model" "${src[@]}" --device cuda --tasks fact,facts --key-loss \
        --lengths 1024,2048,4096 --per-length "${KEY_PER_LENGTH:-24}" --val-lengths "" --seed "$seed" \
        -o "$work/key-$seed.jsonl" --val-out "$work/key-$seed-val.jsonl" 2>&1 | grep -E "kept|wrote" || true
    cp "$work/key-$seed.jsonl" "$dir/"
    ;;
plans)
    opt() { # name, extra args
        local name=$1
        shift
        "$bin/moa-optimize" --density 0.5 --lengths $lens --front none -o "$work/cand/$name.json" "$@" >/dev/null
    }
    for s in 1 4; do
        "$bin/moa-profile" merge "$main_profile" "$work/key.bin" --balance $s -o "$work/mk$s.bin" >/dev/null
    done
    cp plans/smollm2-135m.json "$work/cand/shipped.json"
    for p in main:$main_profile key:$work/key.bin mk1:$work/mk1.bin mk4:$work/mk4.bin; do
        n=${p%%:*}
        f=${p#*:}
        opt "$n" --profile "$f"
        opt "$n-head1" --profile "$f" --balance head:1
        opt "$n-layer1" --profile "$f" --balance layer:1
        for base in dense short; do
            opt "$n-h1-abl$base" --profile "$f" --balance head:1 --head-weights "$dir/ablate-$base.json"
            opt "$n-h1-abl$base-f10" --profile "$f" --balance head:1 --head-weights "$dir/ablate-$base.json" --head-weight-floor 0.1
        done
    done
    ls "$work/cand" | wc -l
    cp -r "$work/cand" "$dir/"
    ;;
measure)
    # Cost tables: every KV head moved to each rule of the grid (GRID) inside a base
    # configuration, loss change on the retrieval set (+ the committed one); the solver's plan
    # from each table becomes the next base once.
    rules=${RULES:-0:0.25,0:0.5,0:0.75,0:1}
    grid=${GRID:-0:0:1,0.25}
    data="$work/key.jsonl,profiles/smollm2-135m-calib-key.jsonl"
    for f in "$work"/key-[0-9]*.jsonl; do case $f in *-val.jsonl) ;; *) [ -f "$f" ] && data="$data,$f" ;; esac; done
    table() { # out, ablate args...
        local out=$1
        shift
        t0=$(date +%s)
        mkdir -p "$work/tables"
        [ -s "$work/tables/$out.json" ] || "$bin/moa-profile" ablate -m "$model" --data "$data" \
            --max-tokens 4200 --rules "$rules" -b 4096 --device cuda -o "$work/tables/$out.json" "$@" 2>&1 |
            grep -E "^ablate|^base loss|error" || true
        cp "$work/tables/$out.json" "$dir/"
        echo "($out: $(($(date +%s) - t0)) s)"
        "$bin/moa-optimize" --profile "$main_profile" --density 0.5 --lengths $lens --front none \
            --measured "$work/tables/$out.json" --grid $grid -o "$work/cand/meas-$out.json" | grep -E "optimal" || true
    }
    table dense --base dense
    [ -n "${SKIP_IT1:-}" ] || table it1 --base plan --base-plan "$work/cand/meas-dense.json"
    shift 2 || true
    for p in "$@"; do
        table "from-$(basename "$p" .json)" --base plan --base-plan "$p"
    done
    cp "$work"/cand/meas-*.json "$dir/"
    ;;
mix)
    # Fine measured tables (RULES, beta step 0.125) of the retrieval set inside one base plan
    # (BASE; default the first-order candidate mk1-h1-abldense) and among dense heads; their
    # plans alone and averaged, then the BASE table plus the main profile's first-order costs
    # at each weight of PROFILE_WEIGHTS (moa-optimize --measured-profile-weight: the
    # retrieval table alone trades away the long-range copying that perplexity needs). With
    # GEN=1 also a table of general response loss (GEN_DATA, six conversations of the main
    # calibration set) inside BASE (gen; 160 s on an H200), its plans alone, with a smallest
    # beta (MIN_BETAS) and with the profile's costs,
    # and the retrieval + general sums (MIX: the general table's weight, its total first scaled
    # to the retrieval table's).
    rules=${RULES:-0:0.125,0:0.25,0:0.375,0:0.5,0:0.625,0:0.75,0:0.875,0:1}
    grid=${GRID:-0:0:1,0.125}
    base=${BASE:-$work/cand/mk1-h1-abldense.json}
    bname=$(basename "$base" .json)
    mkdir -p "$work/tables"
    kinds="ret:$bname ret:dense"
    [ -n "${GEN:-}" ] && kinds="$kinds gen:$bname"
    for k in $kinds; do
        kind=${k%%:*} on=${k#*:}
        out=$work/tables/$kind-$on.json
        data="$work/key.jsonl,profiles/smollm2-135m-calib-key.jsonl"
        [ "$kind" = gen ] && data=${GEN_DATA:-profiles/smollm2-135m-calib-gen6.jsonl}
        args=(--base plan --base-plan "$base")
        [ "$on" = dense ] && args=(--base dense)
        t0=$(date +%s)
        [ -s "$out" ] || "$bin/moa-profile" ablate -m "$model" --data "$data" --max-tokens 4200 \
            --rules "$rules" -b 4096 --device cuda "${args[@]}" -o "$out" 2>&1 |
            grep -E "^ablate|^base loss|error" || true
        echo "($kind-$on: $(($(date +%s) - t0)) s)"
        cp "$out" "$dir/"
    done
    opt() {
        "$bin/moa-optimize" --profile "$main_profile" --density 0.5 --lengths $lens --front none \
            --grid "$grid" "$@" | grep -E "optimal|rror" || true
    }
    ret=$work/tables/ret-$bname.json
    opt --measured "$ret" -o "$work/cand/fine-$bname.json"
    opt --measured "$work/tables/ret-dense.json" -o "$work/cand/fine-dense.json"
    opt --measured "$work/tables/ret-dense.json,$ret" -o "$work/cand/fine-avg.json"
    for w in ${PROFILE_WEIGHTS:-0.05 0.1 0.15 0.2 0.25 0.5 1 2 4}; do
        opt --measured "$ret" --measured-profile-weight "$w" -o "$work/cand/fine-$bname-profile$w.json"
    done
    # The table alone with no span below MIN_BETA x N (the grid's smallest beta; an assignment
    # before a bash function call holds for that call only).
    for b in ${MIN_BETAS:-0.25 0.375}; do
        grid="$grid,$b" opt --measured "$ret" -o "$work/cand/fine-$bname-bmin$b.json"
    done
    if [ -n "${GEN:-}" ]; then
        gen=$work/tables/gen-$bname.json
        scale=$(python3 -c "
import json, sys
t = lambda f: sum(max(v, 0.0) for v in json.load(open(f))['table'])
print(t(sys.argv[1]) / max(t(sys.argv[2]), 1e-12))" "$ret" "$gen")
        opt --measured "$gen" -o "$work/cand/gen-$bname.json"
        for b in ${MIN_BETAS:-0.25 0.375}; do
            grid="$grid,$b" opt --measured "$gen" -o "$work/cand/gen-$bname-bmin$b.json"
        done
        for w in ${GEN_PROFILE_WEIGHTS:-0.1 0.25 0.5}; do
            opt --measured "$gen" --measured-profile-weight "$w" -o "$work/cand/gen-$bname-profile$w.json"
        done
        for f in ${MIX:-0.25 0.5 1 2}; do
            opt --measured "$ret,$gen" --measured-weights "1,$(python3 -c "print($scale * $f)")" \
                -o "$work/cand/retgen-$bname-$f.json"
        done
    fi
    cp "$work"/cand/fine-*.json "$dir/"
    if [ -n "${GEN:-}" ]; then cp "$work"/cand/gen-*.json "$work"/cand/retgen-*.json "$dir/"; fi
    ;;
validate)
    configs=dense,uniform:0.5
    for p in "$work"/cand/${CANDS:-*}.json; do configs="$configs,plan:$p"; done
    t0=$(date +%s)
    "$bin/moa-eval" passkey -m "$model" --lengths 1k,2k,3k,4k,5k,6k,7k --depths 0.1,0.5,0.9 \
        --device cuda --configs "$configs" --trials "${VAL_TRIALS:-5}" --seed "${VAL_SEED:-7}" \
        --key-loss -q --json-file "$dir/validate.json" >/dev/null
    echo "($(($(date +%s) - t0)) s)"
    if [ -n "${VAL_TEXT:-}" ]; then
        "$bin/moa-eval" ppl -m "$model" --device cuda --configs "$configs" -f "$VAL_TEXT" -c 8k \
            --chunks 3 2>&1 | grep "^|"
    fi
    python3 - "$dir/validate.json" <<'PY'
import json, os, sys, collections
r = json.load(open(sys.argv[1]))
acc, loss, first = (collections.defaultdict(list) for _ in range(3))
for t in r["trials"]:
    acc[t["config"]].append(t["score"]); loss[t["config"]].append(t["loss"])
    first[t["config"]].append(t.get("first_loss") or 0.0)
mean = lambda v: sum(v) / len(v)
# RANK=first ranks by the loss of the key's first token (where wrong greedy answers depart).
by = first if os.environ.get("RANK") == "first" else loss
rows = sorted(acc, key=lambda c: mean(by[c]))
for c in rows:
    print(f"{c:<32} key loss {mean(loss[c]):7.4f}  first-token {mean(first[c]):7.4f}  pass key {100*mean(acc[c]):5.1f}%")
# The plans to take to the reported grid: the 3 lowest key losses and the best pass key.
plans = [c[5:] for c in rows if c.startswith("plan ")]
best = max(plans, key=lambda c: sum(acc["plan " + c]))
pick = plans[:3] + ([best] if best not in plans[:3] else [])
open(sys.argv[1] + ".pick", "w").write(" ".join(pick))
PY
    ;;
final)
    shift 2
    configs=dense
    for p in "$@"; do configs="$configs,plan:$p"; done
    t0=$(date +%s)
    "$bin/moa-eval" passkey -m "$model" --lengths 1k,2k,3k,4k,5k,6k,7k --depths 0.1,0.5,0.9 \
        --device cuda --configs "$configs" --trials "${FINAL_TRIALS:-5}" -q --json-file "$dir/final.json"
    echo "($(($(date +%s) - t0)) s)"
    ;;
*)
    echo "usage: $0 data|keyset|plans|measure|mix|validate [MODEL] | final MODEL PLAN..." >&2
    exit 2
    ;;
esac
