#!/usr/bin/env bash
# The Triton kernels' GPU check in one call (issue 4): the kernel tests without the interpreter,
# then benchmarks/kernels.py. Run from the repository root on a machine with a CUDA GPU, torch,
# triton, pytest, transformers and peft (lomix itself is imported from the checkout):
#   OUT=/tmp/gpu benchmarks/gpu_check.sh          # results land in $OUT (default benchmarks/results)
set -uo pipefail
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)"
} 2>&1 | tee "$OUT/gpu_env.txt"
timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -q -p no:cacheprovider -m "not slow" tests/test_kernel_triton.py tests/test_kernel_torch.py 2>&1 | tee "$OUT/gpu_tests.txt"
timeout "${BENCH_TIMEOUT:-330}" python3 benchmarks/kernels.py --out-dir "$OUT" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/gpu_bench.txt"
