#!/usr/bin/env bash
# Regenerates every table of docs/RESULTS.md: trains the runs under runs/ and prints the tables.
# Usage: bash scripts/results/run_all.sh [seeds...]   (default: 0 1 2 3 4; ~7 min per seed on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release --example train_kto
B=${CARGO_TARGET_DIR:-target}/release/examples/train_kto
SEEDS=("${@:-0 1 2 3 4}")
# train NAME FLAGS...: one run into runs/NAME, skipped when runs/NAME/summary.txt exists; an
# interrupted one is continued (--resume).
train() {
  local name=$1; shift
  [[ -f runs/$name/summary.txt ]] && { echo "$name: kept"; return; }
  "$B" "$@" --run-name "$name" --resume 2>&1 | tail -n 1
}
for S in ${SEEDS[@]}; do
  # (1) the default run: base → SFT (≈140 demonstrations) → KTO, and DPO from the same SFT model
  #     on the same (paired) data.
  train e1-seed"$S" --seed "$S" --run-dpo
  R="--seed $S --init-from runs/e1-seed$S"   # reuse e1's pretrained base model
  # control: SFT for 150 + 300 steps (the alignment stage's step count) instead of KTO.
  train control-sft450-seed"$S" $R --sft-steps 450 --kto-steps 0
  # (2) keep 10% of the desirable KTO examples (λ_D from the rule, ≈13.3); DPO on all data is e1's.
  train e2-desirable0.1-seed"$S" $R --desirable-fraction 0.1
  # (3) KTO and DPO straight from the base model, no SFT.
  train e3-nosft-seed"$S" $R --skip-sft --run-dpo
  # (4) plentiful demonstrations: SFT on ≈2 700 correct lines (4 000 judged) instead of ≈140.
  train e4-sft4000-seed"$S" $R --sft-lines 4000 --run-dpo
  # (5) knobs: the paper's β = 0.1; a 3× lower learning rate; every judged sample for KTO;
  #     desirable-only KTO (λ_U = 0: no negative feedback at all).
  train e5-beta0.1-seed"$S" $R --beta 0.1 --run-dpo
  train e5-lr1e-4-seed"$S" $R --lr 1e-4 --run-dpo
  train e5-allsamples-seed"$S" $R --kto-data all-samples
  train e5-lambdaU0-seed"$S" $R --undesirable-weight 0
done
python3 scripts/results/tables.py runs
