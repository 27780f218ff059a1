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
#   VAL_LENGTHS [6144]  PER_LENGTH [4]  VAL_PER_LENGTH [2]  MAX_RULES (at most K rules per
#   layer) [none]  THREADS [all cores]  SOURCES (document files or folders, space-separated)
#   [/usr/share/common-licenses]  TASKS (calibration task rotation, see moa-profile calib --tasks)
#   [summarize,recall,compare,fact,facts]  WEIGH_TASKS (tasks whose calibration records count
#   twice in the profile: they are profiled again on their own and the two profiles merged;
#   e.g. fact,facts) [none]  FRONT (weighted, epsilon: validated front; none: the equal-weights
#   plan, no validation) [weighted]  PER_HEAD (non-empty: moa-optimize --per-head) [off]
#   BALANCE (moa-optimize --balance, e.g. layer:0.5) [none]
#   KEY_PER_LENGTH (non-empty: also build a retrieval set, this many fact/facts conversations
#   per profiled length, or a comma list with one count per profiled length, with the loss
#   only on the answer's reference-number tokens, `moa-profile calib --key-loss`, the ones
#   the dense model gets wrong dropped; it is profiled on its own
#   and merged into the main profile at KEY_SHARE of its influence, `moa-profile merge
#   --balance`; the front is then validated on the retrieval set's validation conversations)
#   [none]  KEY_SHARE [1]  KEY_VAL_LENGTHS [2048,6144]  KEY_VAL_PER_LENGTH [4]  KEY_SEED [1]
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
VAL_PER_LENGTH=${VAL_PER_LENGTH:-2}
TASKS=${TASKS:-summarize,recall,compare,fact,facts}
SRC=()
for s in ${SOURCES:-/usr/share/common-licenses}; do SRC+=(--source "$s"); done
WORK=work/$NAME
T=()
[ -n "${THREADS:-}" ] && T=(-t "$THREADS")
K=()
[ -n "${MAX_RULES:-}" ] && K=(--max-rules-per-layer "$MAX_RULES")
O=()
[ -n "${PER_HEAD:-}" ] && O=(--per-head)
[ -n "${BALANCE:-}" ] && O+=(--balance "$BALANCE")

mkdir -p "$WORK" profiles plans
cargo build --release --bin moa-profile --bin moa-optimize --bin moa-convert
B=target/release

echo "== 1. calibration and validation conversations ($WORK/calib.jsonl, $WORK/val.jsonl)"
if [ ! -s "$WORK/calib.jsonl" ] || [ ! -s "$WORK/val.jsonl" ]; then
    "$B/moa-profile" calib -m "$MODEL" "${SRC[@]}" --lengths "$PROFILE_LENGTHS" \
        --per-length "$PER_LENGTH" --val-lengths "$VAL_LENGTHS" --val-per-length "$VAL_PER_LENGTH" \
        --tasks "$TASKS" -o "$WORK/calib.jsonl" --val-out "$WORK/val.jsonl" "${T[@]}"
fi

VAL=$WORK/val.jsonl
if [ -n "${KEY_PER_LENGTH:-}" ]; then
    echo "== 1b. retrieval conversations, loss on the key ($WORK/calib-key.jsonl, $WORK/val-key.jsonl)"
    # One calib run per length (KEY_PER_LENGTH: one count, or one per profiled length), each
    # piece kept as it finishes, then the validation conversations.
    KC=("$B/moa-profile" calib -m "$MODEL" "${SRC[@]}" --tasks fact,facts --key-loss --max-new 32
        --seed "${KEY_SEED:-1}" "${T[@]}")
    IFS=, read -r -a KL <<< "$PROFILE_LENGTHS"
    IFS=, read -r -a KN <<< "$KEY_PER_LENGTH"
    if [ ! -s "$WORK/calib-key.jsonl" ]; then
        for i in "${!KL[@]}"; do
            piece=$WORK/calib-key-${KL[$i]}.jsonl
            [ -e "$piece" ] || "${KC[@]}" --lengths "${KL[$i]}" --per-length "${KN[$i]:-${KN[0]}}" \
                --val-lengths "" -o "$piece"
        done
        for l in "${KL[@]}"; do cat "$WORK/calib-key-$l.jsonl"; done > "$WORK/calib-key.jsonl"
    fi
    if [ ! -s "$WORK/val-key.jsonl" ]; then
        "${KC[@]}" --lengths "${KL[0]}" --per-length 0 --val-lengths "${KEY_VAL_LENGTHS:-2048,6144}" \
            --val-per-length "${KEY_VAL_PER_LENGTH:-4}" -o "$WORK/calib-key-none.jsonl" --val-out "$WORK/val-key.jsonl"
    fi
    VAL=$WORK/val-key.jsonl
fi

echo "== 2. profile (profiles/$NAME.bin)"
if [ -n "${KEY_PER_LENGTH:-}" ]; then
    # (a finished profile is resumed with nothing left to do)
    "$B/moa-profile" run -m "$MODEL" --data "$WORK/calib.jsonl" --lengths "$PROFILE_LENGTHS" \
        -o "$WORK/profile-main.bin" "${T[@]}"
    "$B/moa-profile" run -m "$MODEL" --data "$WORK/calib-key.jsonl" --lengths "$PROFILE_LENGTHS" \
        -o "$WORK/profile-key.bin" "${T[@]}"
    "$B/moa-profile" merge "$WORK/profile-main.bin" "$WORK/profile-key.bin" \
        --balance "${KEY_SHARE:-1}" -o "profiles/$NAME.bin"
elif [ -z "${WEIGH_TASKS:-}" ]; then
    "$B/moa-profile" run -m "$MODEL" --data "$WORK/calib.jsonl" --lengths "$PROFILE_LENGTHS" \
        -o "profiles/$NAME.bin" "${T[@]}"
else
    "$B/moa-profile" run -m "$MODEL" --data "$WORK/calib.jsonl" --lengths "$PROFILE_LENGTHS" \
        -o "$WORK/profile-all.bin" "${T[@]}"
    grep -E "\"task\":\"(${WEIGH_TASKS//,/|})\"" "$WORK/calib.jsonl" > "$WORK/calib-weighed.jsonl"
    "$B/moa-profile" run -m "$MODEL" --data "$WORK/calib-weighed.jsonl" \
        --lengths "$PROFILE_LENGTHS" -o "$WORK/profile-weighed.bin" "${T[@]}"
    "$B/moa-profile" merge "$WORK/profile-all.bin" "$WORK/profile-weighed.bin" -o "profiles/$NAME.bin"
fi

echo "== 3. optimize and validate (plans/$NAME.json)"
if [ "${FRONT:-weighted}" = none ]; then
    # The equal-weights plan only, no validation runs.
    "$B/moa-optimize" --profile "profiles/$NAME.bin" -m "$MODEL" --density "$DENSITY" \
        --lengths "$LENGTHS" --front none -o "plans/$NAME.json" "${K[@]}" "${O[@]}"
else
    "$B/moa-optimize" --profile "profiles/$NAME.bin" -m "$MODEL" --density "$DENSITY" \
        --lengths "$LENGTHS" --front "${FRONT:-weighted}" --validate "$VAL" \
        --validate-baselines --front-dir "$WORK/front" -o "plans/$NAME.json" "${K[@]}" "${O[@]}" "${T[@]}"
fi

echo "== 4. embed ($(dirname "$MODEL")/$NAME-moa.gguf)"
"$B/moa-convert" embed -m "$MODEL" --plan "plans/$NAME.json" \
    -o "$(dirname "$MODEL")/$NAME-moa.gguf" --lengths "$LENGTHS"
