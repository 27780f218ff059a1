#!/usr/bin/env bash
# The offline MoA pipeline for one model: calibration conversations -> attention-influence
# profile -> plan optimization (Pareto front, chosen by validation loss at an unprofiled length)
# -> plans/<name>.json -> a converted model with the plan embedded.
#
#   bash tools/pipeline.sh MODEL.gguf [NAME]
#
# NAME (default: the file name without .gguf, lower case) names plans/NAME.json,
# profiles/NAME.bin and the work folder work/NAME/. Environment knobs (defaults in brackets):
#   DENSITY [0.5]  LENGTHS (constrained) [2048,4096,8192,16384]  PROFILE_LENGTHS [2048,4096,8192]
#   VAL_LENGTHS [6144]  PER_LENGTH [4]  MAX_RULES (at most K rules per layer) [none]
#   THREADS [all cores]
# Each step is skipped when its output exists (delete it to redo); moa-profile run resumes.
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL=${1:?usage: tools/pipeline.sh MODEL.gguf [NAME]}
NAME=${2:-$(basename "$MODEL" .gguf | tr '[:upper:]' '[:lower:]')}
DENSITY=${DENSITY:-0.5}
LENGTHS=${LENGTHS:-2048,4096,8192,16384}
PROFILE_LENGTHS=${PROFILE_LENGTHS:-2048,4096,8192}
VAL_LENGTHS=${VAL_LENGTHS:-6144}
PER_LENGTH=${PER_LENGTH:-4}
WORK=work/$NAME
T=()
[ -n "${THREADS:-}" ] && T=(-t "$THREADS")
K=()
[ -n "${MAX_RULES:-}" ] && K=(--max-rules-per-layer "$MAX_RULES")

mkdir -p "$WORK" profiles plans
cargo build --release --bin moa-profile --bin moa-optimize --bin moa-convert
B=target/release

echo "== 1. calibration and validation conversations ($WORK/calib.jsonl, $WORK/val.jsonl)"
if [ ! -s "$WORK/calib.jsonl" ] || [ ! -s "$WORK/val.jsonl" ]; then
    "$B/moa-profile" calib -m "$MODEL" --lengths "$PROFILE_LENGTHS" --per-length "$PER_LENGTH" \
        --val-lengths "$VAL_LENGTHS" -o "$WORK/calib.jsonl" --val-out "$WORK/val.jsonl" "${T[@]}"
fi

echo "== 2. profile (profiles/$NAME.bin)"
"$B/moa-profile" run -m "$MODEL" --data "$WORK/calib.jsonl" --lengths "$PROFILE_LENGTHS" \
    -o "profiles/$NAME.bin" "${T[@]}"

echo "== 3. optimize and validate (plans/$NAME.json)"
"$B/moa-optimize" --profile "profiles/$NAME.bin" -m "$MODEL" --density "$DENSITY" \
    --lengths "$LENGTHS" --front weighted --validate "$WORK/val.jsonl" --validate-baselines \
    --front-dir "$WORK/front" -o "plans/$NAME.json" "${K[@]}" "${T[@]}"

echo "== 4. embed ($(dirname "$MODEL")/$NAME-moa.gguf)"
"$B/moa-convert" embed -m "$MODEL" --plan "plans/$NAME.json" \
    -o "$(dirname "$MODEL")/$NAME-moa.gguf" --lengths "$LENGTHS"
