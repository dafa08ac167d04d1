#!/bin/bash
# Table 1 at one budget (issue 16): DSpark-Markov, DSpark-RNN, DFlash-style (no head) and EAGLE-style drafters
# trained identically (same data, target layers, steps, batch, anchors, learning rate, draft vocabulary) from
# one cache of the target's features, then evaluated side by side by bench/drafter_eval.py: tau per domain at
# T=0 and T=1, gamma 7, and the position-wise conditional acceptance (Figure 2). Every step resumes: rerun
# the same command to continue.
#   FEATURE_CACHE=runs/fc-all bench/table1.sh OUT    # CPU: ~15 min per variant at STEPS=300, THREADS=2;
#                                                     # a cache built by an earlier train-drafter run on the
#                                                     # same data and layers is reused (else ~40 min to build)
#   DEVICE=cuda STEPS=2000 BATCH=32 bench/table1.sh OUT
#   STEPS=2 BATCH=2 ANCHORS=4 SEQUENCES=40 PER_DOMAIN=1 MAX_TOKENS=8 bench/table1.sh /tmp/t1   # a dry run
# OUT/<variant>/   the drafters; OUT/table1.json, OUT/table1-table.md, OUT/table1.png   the comparison
set -eu
OUT=${1:?usage: bench/table1.sh OUT}
DATA=${DATA:-data/drafter/smollm2-selfgen.jsonl}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
common=(--data "$DATA" --feature-cache "${FEATURE_CACHE:-$OUT/features}" --layers 1,8,14,20,27 --gamma 7
        --draft-layers 1 --rank 64 --steps "${STEPS:-300}" --lr 2e-3 --batch "${BATCH:-8}"
        --anchors "${ANCHORS:-32}" --max-len 768 --holdout 32 --draft-vocab "${DRAFT_VOCAB:-16384}"
        --save-every 50 --device "${DEVICE:-cpu}" --threads "${THREADS:-2}")
# All of DATA unless SEQUENCES caps it (a cap changes the sequences, so an uncapped run's feature cache won't fit).
[ -n "${SEQUENCES:-}" ] && common+=(--sequences "$SEQUENCES")
declare -A variants=([dspark-markov]="--head markov" [dspark-rnn]="--head rnn" [dflash-style]="--head none"
                     [eagle-style]="--eagle")
evals=()
for name in dspark-markov dspark-rnn dflash-style eagle-style; do
  resume=""; [ -f "$OUT/$name/trainer_state.pt" ] && resume="--resume"
  if [ ! -f "$OUT/$name/done" ]; then
    # shellcheck disable=SC2086 (the variant's flags are words)
    python3 -m dspark.cli train-drafter "${common[@]}" --out "$OUT/$name" ${variants[$name]} $resume \
      > "$OUT/$name.log" 2>&1
    touch "$OUT/$name/done"
  fi
  echo "$name: $(grep -o '"tau_est": [0-9.]*' "$OUT/$name/config.json" | tail -1)"
  evals+=(--drafter "$name=$OUT/$name")
done
python3 bench/drafter_eval.py "${evals[@]}" --per-domain "${PER_DOMAIN:-4}" --max-tokens "${MAX_TOKENS:-96}" \
  --out "$OUT/table1" > "$OUT/eval.log" 2>&1
echo "eval: $OUT/table1-table.md"
