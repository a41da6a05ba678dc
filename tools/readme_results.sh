#!/usr/bin/env bash
# Regenerate the README's quality and speed results (docs/results/): razor-gguf bench and eval on the
# two test models. Run after `make setup`; takes about an hour on a 2-core CPU. Each command is the exact
# one quoted in the README.
set -euo pipefail
cd "$(dirname "$0")/.."
RG=.venv/bin/razor-gguf
OUT=docs/results
mkdir -p "$OUT"
SMOL=$($RG models path smollm2)
GEMMA=$($RG models path gemma3)
CACHE=${RAZOR_GGUF_CACHE:-$HOME/.cache/razor-gguf}/models
for m in "$SMOL" "$GEMMA"; do
  r="$CACHE/$(basename "${m%.gguf}").razor.gguf"
  [ -f "$r" ] || $RG embed-heads "$m" -o "$r"
done
SMOL_R="$CACHE/$(basename "${SMOL%.gguf}").razor.gguf"
GEMMA_R="$CACHE/$(basename "${GEMMA%.gguf}").razor.gguf"

run() { local name=$1; shift; echo "+ razor-gguf $*" >&2; $RG "$@" --json > "$OUT/$name.json.tmp"; mv "$OUT/$name.json.tmp" "$OUT/$name.json"; }

what=${1:-all}
if [[ $what == all || $what == bench ]]; then
  run bench-smollm2 bench "$SMOL_R" --ctx 2048 --ctx 4096 --ctx 8192 --threads 2 --plot "$OUT/bench-smollm2.png"
  run bench-smollm2-kv bench "$SMOL_R" --ctx 8192 --ctx 16384 --ctx 32768 --kv-only --plot "$OUT/bench-smollm2-kv.png"
  run bench-smollm2-budget bench "$SMOL_R" --ctx 4096 --ctx 8192 --threads 2 --modes full,razor --kv-budget 0.35
  run bench-gemma3 bench "$GEMMA_R" --ctx 2048 --ctx 8192 --threads 2 --plot "$OUT/bench-gemma3.png"
fi
if [[ $what == all || $what == eval ]]; then
  run kld-smollm2 eval "$SMOL_R" --task kld --ctx 4096 --threads 2 --no-progress --plot "$OUT/kld-smollm2.png"
  run kld-smollm2-no-compensation eval "$SMOL_R" --task kld --ctx 4096 --ratios 0.15 --modes full,razor \
    --no-compensation --threads 1 --no-progress
  run passkey-smollm2 eval "$SMOL_R" --task passkey --ctx 1024 --ctx 2048 --ctx 4096 --ctx 8000 --depths 0,0.5,1 \
    --threads 2 --no-progress --plot "$OUT/passkey-smollm2.png"
  run niah-smollm2 eval "$SMOL_R" --task niah --ctx 1024 --ctx 2048 --ctx 4096 --depths 0,0.5,1 \
    --threads 2 --no-progress --plot "$OUT/niah-smollm2.png"
  run passkey-gemma3 eval "$GEMMA_R" --task passkey --ctx 1024 --ctx 4096 --depths 0,0.5,1 \
    --threads 2 --no-progress --plot "$OUT/passkey-gemma3.png"
fi
