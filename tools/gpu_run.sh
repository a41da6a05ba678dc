#!/usr/bin/env bash
# What a lent GPU is for, in bounded steps, so that a short lease gets through them (each step's output lands
# in OUT_DIR as soon as it is done; a step that overruns its bound is stopped and the next one runs):
#   tests     tests/test_razor_gpu.py (-s: the measured errors are printed), everything offloaded;
#   evidence  tools/evidence.py on MODEL (a razor-embedded GGUF) with every layer offloaded, extending
#             EVIDENCE_JSON (copied to OUT_DIR/evidence.json first) for at most EVIDENCE_MIN minutes;
#   bench     `razor-gguf bench`, full cache against razor, on a random-weight Llama-3-8B twin written on the
#             spot (tools/make_bench_model.py: Q4_0, 15% head map, S = 4, W = 512) at BENCH_CTX, and on the same
#             twin with each layer's retrieval heads stored first (as `embed-heads --reorder-heads` writes them:
#             no head gathers in the graph) at BENCH_FIRST_CTX; TWIN_ARGS goes to both writes (e.g. TWIN=/tmp/t.gguf
#             TWIN_ARGS=--no-compensation: the cache without the fold, as embed-heads records it for SmolLM2);
#             BENCH_ARGS goes to every bench run (e.g. --no-compensation on the same twins) and BENCH_TAG to the
#             names of its JSON files, so runs with other arguments land beside each other (an empty BENCH_CTX or
#             BENCH_FIRST_CTX skips that twin);
#   twins     only writes both twins (the bench and fit steps write what is missing);
#   fit       tools/gpu_fit.py: the longest context each cache fits in FIT_GIB GiB, weights included;
#   embed     `razor-gguf embed-heads --device cuda`: MODEL scored again (its map compared with the CPU's), and
#             the probe on the 8B twin.
# Needs libraries built with the CUDA backend (`CMAKE_ARGS=-DGGML_CUDA=ON make setup`, or tools/check_cuda_build.sh
# with RAZOR_GGUF_LIB_PATH set to its bin/ folder).
# usage: tools/gpu_run.sh OUT_DIR MODEL.gguf [STEP ...]   (steps: tests evidence twins bench fit embed; default all but twins)
set -uo pipefail
[ $# -ge 2 ] || { echo "usage: $0 OUT_DIR MODEL.gguf [tests|evidence|twins|bench|fit|embed ...]" >&2; exit 2; }
out=$1 model=$2
shift 2
[ $# -gt 0 ] || set -- tests evidence bench fit embed
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
t0=$SECONDS
say() { echo "gpu_run: $* ($((SECONDS - t0)) s)"; }
twin=${TWIN:-/tmp/llama3-8b-twin.gguf}
twin_first=${twin%.gguf}-first.gguf
make_twin() { [ -f "$twin" ] || "$py" tools/make_bench_model.py "$twin" --shape llama3-8b --n-ctx-train 131072 \
  ${TWIN_ARGS:-} >/dev/null; }
make_twin_first() { [ -f "$twin_first" ] || "$py" tools/make_bench_model.py "$twin_first" --shape llama3-8b \
  --n-ctx-train 131072 --retrieval-first ${TWIN_ARGS:-} >/dev/null; }
bench_one() {  # TWIN CTX: one JSON per model and context, so a stopped run keeps the others
  timeout "${BENCH_S:-120}" "$py" -m razor_gguf bench "$1" --ctx "$2" --modes full,razor --n-gpu-layers 999 \
    --n-decode "${BENCH_DECODE:-128}" ${BENCH_ARGS:-} --json > "$out/bench-$(basename "$1" .gguf)${BENCH_TAG:-}-$2.json" \
    2>> "$out/bench.log"
  say "bench $(basename "$1" .gguf)${BENCH_TAG:-} $2 rc=$?"
}

for step in "$@"; do
  case $step in
    tests)
      timeout "${TESTS_S:-150}" "$py" -m pytest -s -q -p no:cacheprovider tests/test_razor_gpu.py > "$out/pytest.log" 2>&1
      say "tests rc=$? ($(tail -1 "$out/pytest.log"))" ;;
    evidence)
      [ -n "${EVIDENCE_JSON:-}" ] && [ -f "$EVIDENCE_JSON" ] && cp "$EVIDENCE_JSON" "$out/evidence.json"
      min=${EVIDENCE_MIN:-4}
      timeout $(( ${min%.*} * 60 + 60 )) "$py" tools/evidence.py run "$model" --out "$out/evidence.json" \
        --plan "${EVIDENCE_PLAN:-targets,kld,frontier,kld-frontier}" --n-gpu-layers 999 --max-minutes "$min" \
        --no-progress 2> "$out/evidence.log"
      say "evidence rc=$? ($(grep -c ': .* s$' "$out/evidence.log") cells)" ;;
    twins)  # both twins at once (each write is one core's work), e.g. in the background while the tests run
      make_twin & p=$!
      make_twin_first || say "twins: writing the retrieval-first twin failed"
      wait $p || say "twins: writing the twin failed" ;;
    bench)
      make_twin || { say "bench: writing the twin failed"; continue; }
      make_twin_first || { say "bench: writing the retrieval-first twin failed"; continue; }
      for n in ${BENCH_FIRST_CTX-8192 32768}; do bench_one "$twin_first" "$n"; done
      for n in ${BENCH_CTX-8192 32768 131072}; do bench_one "$twin" "$n"; done ;;
    embed)
      # the reference pass on the GPU: MODEL's own head map scored again (--dry-run) to compare with the one it
      # carries from a CPU run, then the probe on the 8B twin (random weights: timing and memory only)
      s0=$SECONDS
      timeout "${EMBED_S:-150}" "$py" -m razor_gguf embed-heads "$model" --force --dry-run --json --device cuda \
        > "$out/embed-model.json" 2> "$out/embed.log"
      say "embed model rc=$? in $((SECONDS - s0)) s"
      make_twin || { say "embed: writing the twin failed"; continue; }
      s0=$SECONDS
      timeout "${EMBED_S:-150}" "$py" -m razor_gguf embed-heads "$twin" --force --dry-run --json --device cuda \
        --no-calibration > "$out/embed-twin.json" 2>> "$out/embed.log"
      say "embed twin rc=$? in $((SECONDS - s0)) s" ;;
    fit)
      make_twin || { say "fit: writing the twin failed"; continue; }
      timeout "${FIT_S:-150}" "$py" tools/gpu_fit.py "$twin" --limit-gib "${FIT_GIB:-12}" > "$out/fit-$(basename "$twin" .gguf).json" \
        2> "$out/fit.log"
      say "fit rc=$?" ;;
    *) echo "gpu_run: unknown step $step" >&2; exit 2 ;;
  esac
done
