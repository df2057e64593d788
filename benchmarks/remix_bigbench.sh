#!/usr/bin/env bash
# Softmax top-k (k=2) vs ReMix (k=2, M=4) vs one LoRA of rank k*r=16 on BIG-bench with SmolLM2-135M,
# E=8 experts of r=8, then the comparison table (benchmarks/remix_report.py).
#
#   bash benchmarks/remix_bigbench.sh                 # the reduced run reported in the issue note
#   SCALE=full bash benchmarks/remix_bigbench.sh      # the shipped configs as they are (48 steps, batch 8,
#                                                     # 40 test examples per task; ~1.5 h on 2 CPU cores)
#
# All three adapt the same 7 projections at the same per-expert weight: top-k with alpha 16 / r 8 and
# gates summing to 1, remix with omega = 16 / (k r) = 1, the LoRA with alpha 16 / r 16 = 1.
set -euo pipefail
LOMIX=${LOMIX:-.venv/bin/lomix}
OUT=${OUT:-runs/remix-compare}
if [ "${SCALE:-reduced}" = full ]; then
  COMMON=()
else
  COMMON=(data.bigbench.test_per_task=15 train.max_steps=24 train.batch_size=4 train.warmup_steps=3
          train.log_every=4 train.save_every=0)
fi
COMMON+=(train.progress=false)
$LOMIX train recipes/configs/quickstart.yaml "${COMMON[@]}" output_dir=$OUT/topk
$LOMIX train recipes/configs/remix.yaml "${COMMON[@]}" eval.before_training=false output_dir=$OUT/remix
$LOMIX train recipes/configs/quickstart.yaml "${COMMON[@]}" eval.before_training=false \
  mixture.num_experts=1 mixture.rank=16 mixture.alpha=16 mixture.balance.switch=0 \
  "router={name: fixed, experts: [0]}" output_dir=$OUT/lora
.venv/bin/python benchmarks/remix_report.py $OUT/topk $OUT/remix $OUT/lora
