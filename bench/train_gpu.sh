#!/bin/bash
# On a GPU machine: regenerate drafter training data with the target at scale, train a DSpark drafter on
# it and export it, all into one folder, in one run of under ~10 minutes (issue 16). Every step resumes:
# rerun the same command to continue.
#   bench/train_gpu.sh OUT                      # H200 defaults below
#   DEVICE=cpu PROMPTS=12 MAX_BATCH=4 NEW_TOKENS=16 GEN_MIN=1 STEPS=3 BATCH=2 ANCHORS=4 bench/train_gpu.sh /tmp/x
#                                               # the CPU dry run (minutes)
# OUT/data.jsonl      self-generated replies (prompts never from ../shared/datasets; tests/test_selfgen.py)
# OUT/drafter/        the trained drafter (config.json, model.safetensors, train_log.jsonl, trainer_state.pt)
# OUT/export/         the drafter in bf16, ready for dspark/drafters/pretrained/ (after comparing end to end)
set -eu
OUT=${1:?usage: bench/train_gpu.sh OUT}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
# 1. Data: plain batched decoding by the target (bf16), a wall-clock budget, appended to what is there.
python3 -m dspark.train.selfgen --out "$OUT/data.jsonl" --num-prompts "${PROMPTS:-6000}" --device "$DEVICE" \
  --dtype bf16 --max-batch "${MAX_BATCH:-256}" --max-new-tokens "${NEW_TOKENS:-256}" --threads 0 \
  --time-limit-min "${GEN_MIN:-4}" > "$OUT/selfgen.log" 2>&1
echo "data: $(wc -l < "$OUT/data.jsonl") replies; $(tail -1 "$OUT/selfgen.log")"
# 2. Train (the same recipe as the shipped drafter, far more steps), resuming if a state is there.
resume=""; [ -f "$OUT/drafter/trainer_state.pt" ] && resume="--resume"
python3 -m dspark.cli train-drafter --data "$OUT/data.jsonl" --out "$OUT/drafter" --device "$DEVICE" \
  --gamma 7 --draft-layers "${DRAFT_LAYERS:-1}" --head markov --rank "${RANK:-64}" --layers 1,8,14,20,27 \
  --steps "${STEPS:-3000}" --batch "${BATCH:-32}" --anchors "${ANCHORS:-64}" --lr 2e-3 --save-every 250 \
  --draft-vocab "${DRAFT_VOCAB:-16384}" $resume > "$OUT/train.log" 2>&1
echo "train: $(tail -3 "$OUT/train.log" | tr '\n' ' ' | cut -c1-400)"
# 3. Export in bf16 (no trainer state): what ships if it beats the shipped drafter end to end.
python3 -m dspark.cli export-drafter "$OUT/drafter" "$OUT/export" --dtype bf16 > "$OUT/export.log" 2>&1
echo "export: $(tr '\n' ' ' < "$OUT/export.log")"
