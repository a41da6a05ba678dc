#!/usr/bin/env bash
# Regenerate the README's quality and speed results (docs/results/): razor-gguf bench, tools/evidence.py and
# eval on the two test models. Run after `make setup`. Each command is the exact one quoted in the README;
# EVIDENCE_ARGS (e.g. "--n-gpu-layers 999" with a CUDA build) goes to the evidence run. The GPU results come
# from tools/gpu_run.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
RG=.venv/bin/razor-gguf
OUT=docs/results
mkdir -p "$OUT"
SMOL=$($RG models path smollm2)
GEMMA=$($RG models path gemma3)
CACHE=${RAZOR_GGUF_CACHE:-$HOME/.cache/razor-gguf}/models
# The results below were measured on the selection's map (15% of the heads, no pins): embedded with --no-ratios
# since the retrieval ratio became a measured default (a model `make demo` wrote has the measured ratio: remove it
# first to reproduce them; the ratio's own cells run it through retrieval_ratio= overrides, methods razor_*_r*).
for m in "$SMOL" "$GEMMA"; do
  r="$CACHE/$(basename "${m%.gguf}").razor.gguf"
  [ -f "$r" ] || $RG embed-heads "$m" -o "$r" --no-ratios
done
SMOL_R="$CACHE/$(basename "${SMOL%.gguf}").razor.gguf"
GEMMA_R="$CACHE/$(basename "${GEMMA%.gguf}").razor.gguf"

run() { local name=$1; shift; echo "+ razor-gguf $*" >&2; $RG "$@" --json > "$OUT/$name.json.tmp"; mv "$OUT/$name.json.tmp" "$OUT/$name.json"; }

what=${1:-all}
if [[ $what == all || $what == bench ]]; then
  run bench-smollm2 bench "$SMOL_R" --ctx 2048 --ctx 4096 --ctx 8192 --threads 2 --plot "$OUT/bench-smollm2.png"
  run bench-smollm2-kv bench "$SMOL_R" --ctx 8192 --ctx 16384 --ctx 32768 --kv-only --plot "$OUT/bench-smollm2-kv.png"
  run bench-smollm2-budget bench "$SMOL_R" --ctx 4096 --ctx 8192 --threads 2 --modes full,razor --kv-budget 0.35
  # the default make demo writes: 10% of the heads with 64 pins, at its default budget and at 0.35
  run bench-smollm2-pins-default bench "$SMOL_R" --ctx 2048 --ctx 8192 --threads 2 --modes full,razor \
    --retrieval-ratio 0.1 --pins 64
  run bench-smollm2-pins-035 bench "$SMOL_R" --ctx 2048 --ctx 8192 --threads 2 --modes full,razor \
    --retrieval-ratio 0.1 --pins 64 --kv-budget 0.35
  run bench-gemma3 bench "$GEMMA_R" --ctx 2048 --ctx 8192 --threads 2 --plot "$OUT/bench-gemma3.png"
fi
if [[ $what == all || $what == eval ]]; then
  # the quality evidence: resumable cells, so a run stopped at any point goes on where it stopped (about 4
  # minutes on an H200 with --n-gpu-layers 999; hours on a 2-core CPU); then its tables and frontier plot
  .venv/bin/python tools/evidence.py run "$SMOL_R" --out "$OUT/evidence-smollm2.json" --plan targets,frontier,kld,kld-frontier \
    ${EVIDENCE_ARGS:-}
  .venv/bin/python tools/evidence.py report "$OUT/evidence-smollm2.json" --plot "$OUT/evidence-smollm2.png"
  # the passkey cells again on the 2-core CPU (about 30 minutes), against the GPU run above
  .venv/bin/python tools/evidence.py run "$SMOL_R" --out "$OUT/evidence-smollm2-cpu.json" --plan targets --ctx 4096 \
    --task passkey --method full --method razor
  .venv/bin/python tools/evidence.py run "$SMOL_R" --out "$OUT/evidence-smollm2-cpu.json" --plan targets --ctx 2048 \
    --task passkey --method razor
  # heads scored on needle copying against the probe's map (reference pass, about 40 minutes)
  .venv/bin/python tools/copy_heads.py "$SMOL_R" --json "$OUT/copy-heads-smollm2.json"
  # where the passkey misses come from: window, rings' slack or the needle in the local heads (about 41 minutes)
  .venv/bin/python tools/passkey_diagnosis.py "$SMOL_R" --json "$OUT/passkey-diagnosis-smollm2.json"
  # query-aware (SnapKV-style) selection in the local heads at the same memory (about 50 and 40 minutes)
  .venv/bin/python tools/passkey_diagnosis.py "$SMOL_R" --policies snap_razor,snap_2pass,snap --keep 64 \
    --json "$OUT/passkey-snap-smollm2.json"
  .venv/bin/python tools/passkey_diagnosis.py "$SMOL_R" --policies snap_razor --keep 16 \
    --json "$OUT/passkey-snap16-smollm2.json"
  .venv/bin/python tools/passkey_diagnosis.py "$SMOL_R" --task mniah --policies full,razor_ring,snap_razor --keep 64 \
    --json "$OUT/mniah-snap-smollm2.json"
  # one selection for every local head, by the retrieval heads' attention (what razor.n_pin builds; about 35 minutes)
  .venv/bin/python tools/passkey_diagnosis.py "$SMOL_R" --policies shared_2pass --keep 64 \
    --json "$OUT/passkey-shared-smollm2.json"
  # the same in llama.cpp: razor with 64 pinned tokens against razor, same budget (about 40 minutes)
  .venv/bin/python tools/evidence.py run "$SMOL_R" --out "$OUT/evidence-smollm2-cpu.json" --plan pins --ctx 4096 \
    --method razor_pins
  .venv/bin/python tools/evidence.py run "$SMOL_R" --out "$OUT/evidence-smollm2-cpu.json" --plan pins --ctx 4096 \
    --task mniah --method razor
  .venv/bin/python tools/evidence.py run "$SMOL_R" --out "$OUT/evidence-smollm2-cpu.json" --plan pins-kld
  .venv/bin/python tools/evidence.py run "$SMOL_R" --out "$OUT/evidence-smollm2-cpu.json" --plan pins --ctx 2048 \
    --task passkey --method full --method razor_pins
  # passkey at 8192 tokens with pins (about 70 minutes)
  .venv/bin/python tools/evidence.py run "$SMOL_R" --out "$OUT/evidence-smollm2-cpu.json" --plan pins --ctx 8192 \
    --task passkey --method razor_pins
  # fewer retrieval heads at the same memory: prose (about 20 minutes), then passkey with and without pins
  .venv/bin/python tools/evidence.py run "$SMOL_R" --out "$OUT/evidence-smollm2-fewer-heads.json" --plan fewer-heads
  .venv/bin/python tools/evidence.py run "$SMOL_R" --out "$OUT/evidence-smollm2-fewer-heads.json" \
    --plan fewer-heads-pins --ctx 4096 --task passkey --method razor_pins_r0.05 --method razor_r0.05
  .venv/bin/python tools/evidence.py run "$SMOL_R" --out "$OUT/evidence-smollm2-fewer-heads.json" \
    --plan fewer-heads-pins --ctx 4096 --task mniah --method razor_pins_r0.05 --method razor_r0.05
  .venv/bin/python tools/evidence.py run "$SMOL_R" --out "$OUT/evidence-smollm2-fewer-heads.json" \
    --plan fewer-heads-pins --ctx 8192 --task passkey --method razor_pins_r0.05
  .venv/bin/python tools/evidence.py run "$SMOL_R" --out "$OUT/evidence-smollm2-fewer-heads.json" \
    --plan fewer-heads-pins-kld
  .venv/bin/python tools/evidence.py run "$SMOL_R" --out "$OUT/evidence-smollm2-fewer-heads.json" \
    --plan fewer-heads-pins --ctx 8192 --task mniah --method razor_pins_r0.05
  # the measured retrieval ratio and pins (embed-heads' default since it became one: about 13 minutes on 2 idle cores)
  $RG embed-heads "$SMOL" -o "$OUT/.smollm2-ratios.gguf" --json > "$OUT/ratios-smollm2.json"
  rm -f "$OUT/.smollm2-ratios.gguf"
  # prose with 10% heads and 64 pins (--ratios' choice for SmolLM2; about 6 minutes)
  .venv/bin/python tools/evidence.py run "$SMOL_R" --out "$OUT/evidence-smollm2-pins-r10.json" \
    --plan fewer-heads-pins-kld --method razor_pins_r0.1
  # its retrieval cells and the full cache on the current multi-needle prompts (about 40 minutes at 8192, 15 at
  # 4096 per cell), then the report with the references of the other files (only on identical prompts)
  E10=(.venv/bin/python tools/evidence.py run "$SMOL_R" --out "$OUT/evidence-smollm2-pins-r10.json" --plan fewer-heads-pins)
  "${E10[@]}" --ctx 8192 --task mniah --method razor_pins_r0.1 --method full
  "${E10[@]}" --ctx 4096 --task passkey --task mniah --method razor_pins_r0.1
  "${E10[@]}" --ctx 4096 --task mniah --method full
  .venv/bin/python tools/evidence.py report "$OUT/evidence-smollm2-pins-r10.json" \
    --ref "$OUT/evidence-smollm2-fewer-heads.json" --ref "$OUT/evidence-smollm2-cpu.json" --ref "$OUT/evidence-smollm2.json"
  # the default at 2048 tokens, its passkey at 8192, its frontier at 4096 and StreamingLLM on the current NIAH-4
  # prompts (a model embedded again: a second file; about 10 minutes a 2k cell, 50 the 8k passkey, 25 an 8k
  # StreamingLLM NIAH-4 cell)
  E2=(.venv/bin/python tools/evidence.py run "$SMOL_R" --out "$OUT/evidence-smollm2-pins-r10-2.json")
  "${E2[@]}" --plan fewer-heads-pins --ctx 8192 --task passkey --method razor_pins_r0.1
  "${E2[@]}" --plan targets --ctx 4096 --ctx 8192 --task mniah --method streaming
  "${E2[@]}" --plan fewer-heads-pins --ctx 2048 --method razor_pins_r0.1
  "${E2[@]}" --plan targets --ctx 2048 --method full --method streaming
  "${E2[@]}" --plan frontier --method razor_pins_r0.1 --budget 0.25 --budget 0.5 --budget 0.15
  "${E2[@]}" --plan kld-frontier --method razor_pins_r0.1 --method streaming
  # pins spanning 2 tokens before a strong one and 12 after (razor_gguf/pins.py): first the reference pass over
  # the 2k NIAH-4 prompts (about 10 minutes), then the default's llama.cpp cells (about 50 minutes)
  .venv/bin/python tools/pin_span_experiment.py "$SMOL_R" --json "$OUT/pin-span-reference-smollm2.json"
  .venv/bin/python tools/pin_span_experiment.py "$SMOL_R" --json "$OUT/pin-span-sinks-reference-smollm2.json" \
    --variants fwd12,fwd12s
  ESF=(.venv/bin/python tools/evidence.py run "$SMOL_R" --out "$OUT/evidence-smollm2-pins-span.json")
  ES=("${ESF[@]}" --plan fewer-heads-pins --method razor_pins_r0.1)
  for c in 2048 4096; do "${ES[@]}" --ctx $c --task mniah; "${ES[@]}" --ctx $c --task passkey; done
  # the default's frontier at 4096 with that span, StreamingLLM's frontier on the current prompts, the prose
  # cells (about 14 minutes a 4k retrieval cell of 10 prompts, 6 a StreamingLLM one)
  "${ESF[@]}" --plan frontier --method streaming --budget 0.15 --budget 0.25 --budget 0.5
  "${ESF[@]}" --plan frontier --method razor_pins_r0.1 --budget 0.15 --budget 0.25 --budget 0.5
  "${ESF[@]}" --plan fewer-heads-pins-kld --method razor_pins_r0.1 --ctx 8192
  "${ESF[@]}" --plan kld-frontier --method razor_pins_r0.1 --budget 0.35 --budget 0.25 --budget 0.5
  # NIAH-4 at 4096 on 40 prompts (about 24 minutes each for the 20 new razor prompts, the full cache's 40 and
  # StreamingLLM's 40), then the 8k retrieval cells (about 55 minutes each)
  "${ES[@]}" --ctx 4096 --task mniah --n 40
  "${ESF[@]}" --plan targets --ctx 4096 --task mniah --method full --n 40
  "${ESF[@]}" --plan targets --ctx 4096 --task mniah --method streaming --n 40
  "${ES[@]}" --ctx 8192 --task mniah
  "${ES[@]}" --ctx 8192 --task passkey
  # the whole cache in q8_0 at 0.35 of the f16 cache's bytes (the default's window 2172 instead of 714), against
  # StreamingLLM in q8_0 at the same bytes and the full cache in q8_0 (about 75, 25 and 25 minutes; passkey 25)
  for m in razor_pins_r0.1+q8_0 streaming+q8_0 full+q8_0; do
    "${ESF[@]}" --plan targets --ctx 4096 --budget 0.35 --task mniah --method $m --n 40
  done
  for m in razor_pins_r0.1+q8_0 streaming+q8_0; do
    "${ESF[@]}" --plan targets --ctx 4096 --budget 0.35 --task passkey --method $m
  done
  "${ESF[@]}" --plan kld --ctx 8192 --budget 0.35 --task kld --method razor_pins_r0.1+q8_0 --method streaming+q8_0 \
    --method full+q8_0
  # passkey at 8192 in q8_0: the default (W 4732) and StreamingLLM at the same bytes (about 80 and 60 minutes)
  "${ESF[@]}" --plan targets --ctx 8192 --budget 0.35 --task passkey --method razor_pins_r0.1+q8_0
  "${ESF[@]}" --plan targets --ctx 8192 --budget 0.35 --task passkey --method streaming+q8_0
  # NIAH-4 at 2048 in q8_0 beside f16, with the full cache on the same prompts (about 25, 4, 3 and 6 minutes)
  "${ESF[@]}" --plan targets --ctx 2048 --budget 0.35 --task mniah --method razor_pins_r0.1+q8_0 \
    --method streaming+q8_0 --method streaming --method full
  # NIAH-4 at 8192 in q8_0: the default (W 4732) and StreamingLLM at the same bytes (about 90 and 50 minutes)
  for m in razor_pins_r0.1+q8_0 streaming+q8_0; do
    "${ESF[@]}" --plan targets --ctx 8192 --budget 0.35 --task mniah --method $m
  done
  # how many of a local head's rows are pins at the same memory, 4k NIAH-4 in the reference pass (about 60 minutes)
  .venv/bin/python tools/pin_span_experiment.py "$SMOL_R" --json "$OUT/pin-count-reference-smollm2-4k.json" \
    --tokens 4096 --window 714 --pins 64 --variants full,fwd12,p0,p128,p256
  .venv/bin/python tools/evidence.py report "$OUT/evidence-smollm2-pins-span.json" \
    --ref "$OUT/evidence-smollm2-pins-r10.json" --ref "$OUT/evidence-smollm2-pins-r10-2.json" \
    --ref "$OUT/evidence-smollm2-fewer-heads.json" --ref "$OUT/evidence-smollm2-cpu.json" \
    --ref "$OUT/evidence-smollm2.json" --plot "$OUT/evidence-smollm2-default.png"
  # what --ratios decides on other calibration texts, lengths and probes (about 55 minutes)
  RC=(.venv/bin/python tools/ratio_calibration.py "$SMOL_R" --out "$OUT/ratio-calibration-smollm2.json")
  "${RC[@]}" --cell pydoc:2048:mniah4
  "${RC[@]}" --probes 0 --cell docstrings:2048:mniah4 --cell pydoc:4096:mniah4 --cell docstrings:4096:mniah4
  "${RC[@]}" --probes 16 --cell pydoc:2048:needle1
  run passkey-gemma3 eval "$GEMMA_R" --task passkey --ctx 1024 --ctx 4096 --depths 0,0.5,1 \
    --threads 2 --no-progress --plot "$OUT/passkey-gemma3.png"
  # Gemma 3 270M's three global heads at 8192 tokens and 0.8 of the stock iSWA cache: none kept whole
  # (StreamingLLM in the global layers), one (ratio 0.01: the top echo head) or two (0.06), with 64 pins
  EG=(.venv/bin/python tools/evidence.py run "$GEMMA_R" --out "$OUT/evidence-gemma3.json" --budget 0.8 --plan targets)
  "${EG[@]}" --ctx 8192 --task passkey --method full --method streaming --method razor_pins_r0.01 \
    --method razor_pins_r0.06
  # the same at the defaults embed-heads measures for it (its ratio held to the full model: layers 5 and 11 kept
  # whole, the compensation row on); the file keeps its usual name in a folder of its own
  GEMMA_M="$CACHE/measured/$(basename "${GEMMA%.gguf}").razor.gguf"
  mkdir -p "$CACHE/measured"
  [ -f "$GEMMA_M" ] || $RG embed-heads "$GEMMA" -o "$GEMMA_M"
  .venv/bin/python tools/evidence.py run "$GEMMA_M" --out "$OUT/evidence-gemma3-measured.json" --budget 0.8 \
    --plan targets --ctx 8192 --task passkey --method razor --method full --n 20
  run kv-gemma3-measured bench "$GEMMA_M" --ctx 8192 --ctx 32768 --ctx 131072 --kv-only --modes full,razor
fi
