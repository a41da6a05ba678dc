#!/usr/bin/env python3
"""Which tokens a pin should keep around each strong one: spans of razor_gguf.pins.select_pins in the reference pass.

    tools/pin_span_experiment.py MODEL.razor.gguf --json OUT.json [--tokens 2048] [--window 304] [--pins 64]
        [--ratio 0.1] [--task mniah|passkey] [--eval 20] [--variants full,pool7,fwd12,fwd24,p0,p192]

The prompts of tools/passkey_diagnosis.py (with --task mniah 4 needles, the question naming one), the answer
teacher-forced. The retrieval heads are --ratio of the KV heads re-selected from the stored scores (what
embed-heads adopts for SmolLM2: 0.1); every other head keeps 4 sinks, the last --window positions and --pins
pinned tokens, no compensation row. One first read per prompt records the retrieval heads' attention from the
prompt's last tokens (razor_gguf.calibration.pin_record_policy, what llama_razor_pin_capture does); each variant
pins from those scores with its own span (tokens before and after a strong one):
  full    the full cache;
  pool7   3 before, 3 after: the symmetric 7-token pool used until 2026-12-03;
  fwd12   2 before, 12 after: razor_gguf.pins' default since;
  fwd24   3 before, 24 after;
  fwd12s  fwd12 with the sinks' own scores left out of the pooling (fwd12 spends positions 4..12 on the BOS sink's
          attention spilled forward);
  pN      fwd12 with N pins and the window --window + --pins - N: the same rows per local head, spent on more or
          fewer pins (p0: no pins, the window alone).
Each prompt records whether the answer came out whole and, per variant, the share of the asked needle's key
tokens and of its sentence that were pinned. The JSON is rewritten after every prompt.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from passkey_diagnosis import key_positions, needle_span, trials  # noqa: E402
from reference_session import open_session  # noqa: E402

SINKS = 4
SPANS = {"pool7": (3, 3), "fwd12": (2, 12), "fwd24": (3, 24), "fwd12s": (2, 12)}  # (before, after)
SINKS_OUT = {"fwd12s"}


def pin_count(variant: str) -> int | None:
    """N of a pN variant, else None."""
    return int(variant[1:]) if re.fullmatch(r"p\d+", variant) else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--json", required=True)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--window", type=int, default=304, help="the local heads' window (llama.cpp's at 2048, 0.35)")
    ap.add_argument("--pins", type=int, default=64)
    ap.add_argument("--ratio", type=float, default=0.1, help="share of KV heads kept full")
    ap.add_argument("--task", choices=("passkey", "mniah"), default="mniah")
    ap.add_argument("--eval", type=int, default=20)
    ap.add_argument("--variants", default="full,pool7,fwd12,fwd24")
    args = ap.parse_args(argv)
    variants = args.variants.split(",")
    bad = [v for v in variants if v != "full" and v not in SPANS and pin_count(v) is None]
    if bad:
        ap.error(f"unknown variant {bad[0]!r}; variants: full, {', '.join(SPANS)}, pN")
    if any((pin_count(v) or 0) > args.window + args.pins for v in variants):
        ap.error(f"a pN variant may pin at most --window + --pins = {args.window + args.pins} tokens")
    if not pathlib.Path(args.model).is_file():
        ap.error(f"{args.model}: no such file")

    from razor_gguf.calibration import pin_record_policy, razor_policy
    from razor_gguf.metadata import open_gguf, read_razor
    from razor_gguf.pins import select_pins
    from razor_gguf.ratios import select_ratio

    s = open_session(args.model, ap.error)
    meta = read_razor(open_gguf(args.model))
    head_map = select_ratio(np.asarray(meta["echo_scores"]), np.asarray(meta["induction_scores"]), args.ratio,
                            meta["provenance"]["selection.echo_ratio"])
    hp, W = s.model.hp, args.window
    res = {"n_tokens": args.tokens, "W": W, "P": args.pins, "ratio": args.ratio, "task": args.task,
           "spans": {v: SPANS[v] for v in variants if v in SPANS},
           "pin_counts": {v: [n, W + args.pins - n] for v in variants if (n := pin_count(v)) is not None},
           "prompts": []}
    for i, t in enumerate(trials(args.task, s.tokenize, args.tokens, args.eval)):
        prompt, ans = s.tokenize(t.text), s.tokenize(" " + t.key, False)
        keys, span = key_positions(s.tokenize, t), list(needle_span(s.tokenize, t))
        toks, n = prompt + ans[:-1], len(prompt)
        row, t0 = {"depth": t.depth, "n": n}, time.perf_counter()
        recorded = []
        s.model.forward(toks, attention=pin_record_policy(hp, head_map, SINKS, W, n, recorded))
        scores = sum(recorded).double().numpy()
        for v in variants:
            pins, policy = None, None
            if v != "full":
                src = scores.copy()
                if v in SINKS_OUT:
                    src[:SINKS] = 0.0  # attention weights are >= 0: a sink no longer lights its neighbours
                n_pin, w, around = args.pins, W, SPANS.get(v)
                if around is None:  # pN: the same rows, N of them pins
                    n_pin, around = pin_count(v), SPANS["fwd12"]
                    w = W + args.pins - n_pin
                pins = select_pins(src, n_pin, SINKS, n - w, *around)
                policy = razor_policy(hp, head_map, SINKS, w, False, pins)
            logits = s.model.forward(toks, want_logits="all", logits_from=n - 1, attention=policy).numpy()
            row[v] = bool((logits.argmax(-1) == np.asarray(ans)).all())
            if pins is not None:
                row["hit_" + v] = round(sum(k in pins for k in keys) / max(1, len(keys)), 2)
                row["span_" + v] = round(sum(k in pins for k in span) / len(span), 2)
        row["s"] = round(time.perf_counter() - t0, 1)
        res["prompts"].append(row)
        print(i, row, flush=True)
        pathlib.Path(args.json).write_text(json.dumps(res))
    print({v: sum(r[v] for r in res["prompts"]) for v in variants})
    s.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
