#!/bin/sh
# Run `razor-gguf bench --json` over several context lengths and write the JSON object to OUT.json.
# usage: tools/bench_contexts.sh MODEL.gguf OUT.json [CTX ...]   (default contexts: 2048 4096 8192)
# Extra bench options go in BENCH_ARGS, e.g. BENCH_ARGS="--modes full,razor,razor_q8_0 --n-decode 32".
# Written to a temporary file next to OUT.json and renamed, so a failed or interrupted run leaves no partial file.
set -eu
[ $# -ge 2 ] || { echo "usage: $0 MODEL.gguf OUT.json [CTX ...]" >&2; exit 2; }
model=$1 out=$2
shift 2
[ $# -gt 0 ] || set -- 2048 4096 8192
here=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-$here/.venv/bin/python}
ctx_args=
for n in "$@"; do ctx_args="$ctx_args --ctx $n"; done
tmp=$(mktemp "$(dirname "$out")/.bench-XXXXXX")
trap 'rm -f "$tmp"' EXIT INT TERM
# shellcheck disable=SC2086  # word splitting of ctx_args and BENCH_ARGS is intended
"$py" -m razor_gguf bench "$model" $ctx_args ${BENCH_ARGS:-} --json > "$tmp"
mv "$tmp" "$out"
echo "wrote $out" >&2
