#!/usr/bin/env bash
# Serve a `lomix export --format moe` checkpoint with llama.cpp and check it against transformers.
#
#   bash benchmarks/serve_llamacpp.sh [EXPORT_DIR]
#
# Without EXPORT_DIR it first trains and exports a tiny block-routed mixture offline (with a
# sentencepiece tokenizer trained on the spot). Then it:
#   1. installs llama-cpp-python and sentencepiece when missing (this compiles llama.cpp: ~9 minutes
#      on 2 CPU cores the first time; pip caches the wheel, later installs take seconds);
#   2. takes llama.cpp's own converter, convert_hf_to_gguf.py with its bundled gguf-py, from the
#      vendor/llama.cpp folder of the same version's sdist (the wheel does not ship it, and the PyPI
#      `gguf` package has no converter);
#   3. converts the export to an f32 GGUF and a Q8_0 GGUF;
#   4. runs the f32 GGUF with llama_cpp.Llama (f32 KV cache, logits_all) and checks that greedy
#      decoding gives the same token ids as transformers and logits within TOL (default 1e-4);
#   5. prints a short llama.cpp generation, and with SPEED=1 greedy decode tokens/s of llama.cpp
#      (f32, Q8_0), the export in transformers and, with RUN=<lomix run folder>, lomix itself; with
#      BASE=<the base model's folder> the base model in transformers and llama.cpp too (alternating
#      rounds in one process; SPEED_JSON=<file> writes the table).
#
# The default build is a portable AVX2/AVX-512 CPU build without AMX: on a CPU that lists AMX
# (amx_int8 in /proc/cpuinfo) a -DGGML_NATIVE=ON build of llama-cpp-python 0.3.36 died with
# "Illegal instruction" on the Q8_0 file while the f32 file ran (inside a VM, where AMX tiles need
# a permission the guest may not get); the build below ran both. On a CPU without AVX-512 use
#   CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
#
# Environment: PYTHON (default .venv/bin/python), WORK (default $TMPDIR/lomix_llamacpp), TOL,
# CMAKE_ARGS (default: the CPU build above), THREADS (default 2), PROMPT (the generation's prompt).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
WORK=${WORK:-${TMPDIR:-/tmp}/lomix_llamacpp}
TOL=${TOL:-1e-4}
THREADS=${THREADS:-2}
PROMPT=${PROMPT:-"The date one year after 2020-03-01 is"}
EXPORT=${1:-}
HELPER="$ROOT/benchmarks/serve_llamacpp.py"
mkdir -p "$WORK"

echo "== 1. llama-cpp-python and sentencepiece"
if ! "$PYTHON" -c "import llama_cpp, sentencepiece" 2>/dev/null; then
  AVX512=""
  grep -q avx512f /proc/cpuinfo && AVX512="-DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON"
  CMAKE_ARGS=${CMAKE_ARGS:-"-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON $AVX512 \
-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DGGML_CUDA=OFF -DGGML_METAL=OFF -DLLAMA_CURL=OFF"} \
    "$PYTHON" -m pip install llama-cpp-python sentencepiece
fi
VERSION=$("$PYTHON" -c "import llama_cpp; print(llama_cpp.__version__)")
echo "llama-cpp-python $VERSION"

echo "== 2. llama.cpp's converter (sdist of llama-cpp-python $VERSION)"
SRC="$WORK/llama-cpp-python-$VERSION"
CONVERTER="$SRC/convert_hf_to_gguf.py"
if [ ! -f "$CONVERTER" ]; then
  "$PYTHON" -m pip download --no-deps --no-binary :all: -d "$WORK/sdist" "llama-cpp-python==$VERSION"
  ARCHIVE=$(ls "$WORK"/sdist/llama_cpp_python-"$VERSION".tar.gz)
  TOP=$(basename "$ARCHIVE" .tar.gz)  # an sdist unpacks into NAME-VERSION/
  tar -xzf "$ARCHIVE" -C "$WORK/sdist" "$TOP/vendor/llama.cpp/convert_hf_to_gguf.py" \
    "$TOP/vendor/llama.cpp/conversion" "$TOP/vendor/llama.cpp/gguf-py"
  rm -rf "$SRC" && mv "$WORK/sdist/$TOP/vendor/llama.cpp" "$SRC"
fi

if [ -z "$EXPORT" ]; then
  echo "== 0. a tiny block-routed mixture, trained and exported with --format moe"
  "$PYTHON" "$HELPER" tiny "$WORK/tiny"
  EXPORT="$WORK/tiny/moe"
  LOMIX_ARGS=(--lomix "$WORK/tiny/lomix")
else
  LOMIX_ARGS=()
  [ -n "${RUN:-}" ] && LOMIX_ARGS=(--run "$RUN")
fi
NAME=$(basename "$EXPORT")

echo "== 3. GGUF conversion (f32 and Q8_0)"
F32="$WORK/$NAME-f32.gguf"
Q8="$WORK/$NAME-q8_0.gguf"
"$PYTHON" "$CONVERTER" "$EXPORT" --outtype f32 --outfile "$F32" 2>&1 | tail -1
"$PYTHON" "$CONVERTER" "$EXPORT" --outtype q8_0 --outfile "$Q8" 2>&1 | tail -1
ls -l "$F32" "$Q8"

echo "== 4. llama.cpp (f32) against transformers: greedy ids and logits within $TOL"
"$PYTHON" "$HELPER" check "$EXPORT" "$F32" --tol "$TOL" --threads "$THREADS"

echo "== 5. a llama.cpp generation (f32)"
"$PYTHON" - "$F32" "$PROMPT" "$THREADS" <<'PY'
import sys
from llama_cpp import Llama

llm = Llama(model_path=sys.argv[1], n_ctx=256, n_threads=int(sys.argv[3]), verbose=False)
out = llm(sys.argv[2], max_tokens=24, temperature=0.0)
print(repr(sys.argv[2] + out["choices"][0]["text"]))
PY

if [ "${SPEED:-0}" = "1" ]; then
  echo "== 6. greedy decode tokens/s"
  BASE_ARGS=()
  if [ -n "${BASE:-}" ]; then
    BASE_F32="$WORK/$(basename "$BASE")-base-f32.gguf"
    BASE_Q8="$WORK/$(basename "$BASE")-base-q8_0.gguf"
    "$PYTHON" "$CONVERTER" "$BASE" --outtype f32 --outfile "$BASE_F32" 2>&1 | tail -1
    "$PYTHON" "$CONVERTER" "$BASE" --outtype q8_0 --outfile "$BASE_Q8" 2>&1 | tail -1
    BASE_ARGS=(--base "$BASE" --base-gguf "$BASE_F32" "$BASE_Q8")
  fi
  JSON_ARGS=()
  [ -n "${SPEED_JSON:-}" ] && JSON_ARGS=(--json "$SPEED_JSON")
  "$PYTHON" "$HELPER" speed "$EXPORT" "$F32" "$Q8" --threads "$THREADS" --rounds "${ROUNDS:-5}" \
    "${LOMIX_ARGS[@]}" "${BASE_ARGS[@]}" "${JSON_ARGS[@]}"
fi
echo "OK: $EXPORT runs in llama.cpp with transformers' greedy ids and logits"
