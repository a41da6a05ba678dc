#!/usr/bin/env bash
# The razor cache on a GPU: correctness tests, then speed at long context, in one run.
#   1. tests/test_razor_gpu.py (-s: the measured errors are printed): oracle, parity, sequence and state
#      checks with every layer and both caches offloaded;
#   2. `razor-gguf bench` with all layers offloaded, razor against the full cache at long contexts, on a
#      random-weight twin of SmolLM2-135M (its shapes and vocab size, f16 weights, 14 of 90 KV heads
#      retrieval, S=4, W=512) written on the spot: speed does not depend on the weights' values. Set
#      BENCH_MODEL to measure a real (razor-embedded) model instead.
# Needs libraries built with a GPU backend: `CMAKE_ARGS=-DGGML_CUDA=ON make setup`, or
# tools/check_cuda_build.sh with RAZOR_GGUF_LIB_PATH set to its bin/ folder.
# usage: tools/gpu_check.sh OUT_DIR [CTX ...]   (default contexts: 8192 32768 65536; llama.cpp fills the
# attention mask on the CPU, n_ubatch x n_ctx values per ubatch, so prefill time grows with the square of the context)
# Writes OUT_DIR/pytest.log, OUT_DIR/bench.json and OUT_DIR/bench.txt; exits 1 if a test failed.
set -uo pipefail
[ $# -ge 1 ] || { echo "usage: $0 OUT_DIR [CTX ...]" >&2; exit 2; }
out=$1
shift
[ $# -gt 0 ] || set -- 8192 32768 65536
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
mkdir -p "$out"

"$py" -m pytest -s -q -p no:cacheprovider tests/test_razor_gpu.py 2>&1 | tee "$out/pytest.log"
tests_rc=${PIPESTATUS[0]}

model=${BENCH_MODEL:-}
if [ -z "$model" ]; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  model="$tmp/smollm2-twin.gguf"
  n_train=$(printf '%s\n' 8192 "$@" | sort -n | tail -1)
  # 14 of 90 KV heads retrieval (SmolLM2 at a 15% ratio), spread over layers by a fixed seed
  head_map=$("$py" -c 'import numpy as np; m = np.zeros(90, int); m[np.random.default_rng(0).choice(90, 14, replace=False)] = 1; print(",".join(map(str, m)))')
  "$py" tools/make_tiny_model.py "$model" --n-layer 30 --n-embd 576 --n-head 9 --n-head-kv 3 --head-dim 64 \
    --n-ff 1536 --n-vocab 49152 --n-ctx-train "$n_train" --f16 --head-map "$head_map" --n-sink 4 --window 512 || exit 1
fi
ctx_args=()
for n in "$@"; do ctx_args+=(--ctx "$n"); done
bench=("$py" -m razor_gguf bench "$model" "${ctx_args[@]}" --modes full,razor,full_q8_0,razor_q8_0
       --n-gpu-layers 999 --n-decode 256)
"${bench[@]}" --json > "$out/bench.json" || exit 1
"$py" -c 'import json, sys; from razor_gguf.bench import format_table; print(format_table(json.load(open(sys.argv[1]))))' \
  "$out/bench.json" | tee "$out/bench.txt"
exit "$tests_rc"
