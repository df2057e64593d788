#!/usr/bin/env bash
# The Triton kernels' GPU check in one call, under 8 minutes (each stage has its own time limit):
#   1. the kernel tests without the interpreter (tests/test_kernel_{fused,triton,torch}.py)
#   2. benchmarks/autotune_fused.py --quick: this GPU's tiles and E*r threshold -> $OUT/tuning_<gpu>.json,
#      used by the stages below (copy it to lomix/kernels/tuning/ to make it the GPU's default)
#   3. benchmarks/kernel_bench.py: layer / base F.linear ratios (fused layer, Triton GEMM alone, cuBLAS,
#      torch and PEFT LoRA r=16, mixture kernels), T in {1,16,64,1024,8192}, three skews, fwd and fwd+bwd
#   4. benchmarks/model_gpu.py: a Llama-shaped 1.1B model, training step and greedy decode tokens/s
# Run from the repository root on a machine with a CUDA GPU, torch, triton, pytest, transformers
# and peft (lomix itself is imported from the checkout):
#   OUT=/tmp/gpu benchmarks/gpu_check.sh          # results land in $OUT (default benchmarks/results)
# SMOKE=1 runs the same stages on the CPU under the Triton interpreter with tiny shapes (checks the
# script; nothing measured, no result files). PYTHON picks the interpreter (default python3).
set -uo pipefail
OUT=${OUT:-benchmarks/results}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
start=$(date +%s)
stage() { echo "== $1 ($(($(date +%s) - start)) s)"; }

if [ "${SMOKE:-0}" = 1 ]; then
  export TRITON_INTERPRET=1
  stage tests
  timeout "${TEST_TIMEOUT:-120}" "$PY" -m pytest -q -p no:cacheprovider tests/test_kernel_fused.py 2>&1 | tail -3
  stage autotune
  timeout "${TUNE_TIMEOUT:-120}" "$PY" benchmarks/autotune_fused.py --smoke --out "$OUT/tuning_smoke.json" 2>&1 | tail -1
  stage kernels
  LOMIX_KERNEL_TUNING="$OUT/tuning_smoke.json" timeout "${BENCH_TIMEOUT:-240}" "$PY" benchmarks/kernel_bench.py --smoke --skip-masked-sweep 2>&1 | tail -1
  stage model
  timeout "${MODEL_TIMEOUT:-240}" "$PY" benchmarks/model_gpu.py --smoke 2>&1 | tail -1
  stage done
  exit 0
fi

unset TRITON_INTERPRET
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  "$PY" -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)"
} 2>&1 | tee "$OUT/gpu_env.txt"
stage tests
timeout "${TEST_TIMEOUT:-90}" "$PY" -m pytest -q -p no:cacheprovider -m "not slow" \
  tests/test_kernel_fused.py tests/test_kernel_triton.py tests/test_kernel_torch.py 2>&1 | tee "$OUT/gpu_tests.txt"
stage autotune
slug=$("$PY" -c "import torch; from lomix.kernels.fused_tuning import gpu_slug; print(gpu_slug(torch.cuda.get_device_name()))")
timeout "${TUNE_TIMEOUT:-80}" "$PY" benchmarks/autotune_fused.py --quick --out "$OUT/tuning_$slug.json" 2>&1 | tee "$OUT/gpu_autotune.txt"
if [ -f "$OUT/tuning_$slug.json" ]; then
  export LOMIX_KERNEL_TUNING="$OUT/tuning_$slug.json"
else
  echo "autotune wrote no file: the benchmarks use the defaults" | tee -a "$OUT/gpu_autotune.txt"
fi
stage kernels
timeout "${BENCH_TIMEOUT:-190}" "$PY" benchmarks/kernel_bench.py --skip-masked-sweep --out-dir "$OUT" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/gpu_bench.txt"
stage model
timeout "${MODEL_TIMEOUT:-100}" "$PY" benchmarks/model_gpu.py --out-dir "$OUT" 2>&1 | tee "$OUT/gpu_model.txt"
stage done
