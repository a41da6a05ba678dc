#!/usr/bin/env python3
"""Retrieval heads scored on retrieval itself against the stored probe map, at equal memory, in the reference pass.

    tools/copy_heads.py MODEL.razor.gguf [--probes 16] [--tokens 2048] [--eval 20] [--lengths 2048]
        [--budget 0.35] [--policies full,stored,mass,copy] [--json OUT.json]

The stored head map comes from SPEC's data-free probe (induction/echo on repeated random tokens). This scores
each head on what the needle tasks ask of it instead, in the manner of Wu et al. 2024 ("Retrieval Head
Mechanistically Explains Long-Context Factuality"): multi-needle prompts (4 needles) in the calibration prose
(pydoc_data.topics) with a wording of their own (an "access code of the <city> vault", so neither the passkey
nor the NIAH evaluation's sentences), the answer teacher-forced; at each answer token a query head scores
  mass: its attention mass on the asked needle's number,
  copy: 1 when its most-attended key is a token of that number equal to the token being produced,
averaged over the answer tokens of every probe, a KV head taking the max over its query heads (SPEC's GQA
rule). The same number of heads as the stored map, top by each score, are then the retrieval heads.

Evaluation (teacher-forced exact match of the answer under razor's policy, no compensation row, S = 4, the
window that fills --budget of the full cache with that many retrieval heads: equal memory for every map):
passkey (razor_gguf.passkey) and 4-needle NIAH in stdlib docstrings (razor_gguf.niah), --eval prompts each.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

# the calibration probes' wording: none of the evaluation's sentences
WORDING = dict(needle="The access code of the {city} vault is {number}.\n",
               question="\nWhat is the access code of the {city} vault?\nThe access code of the {city} vault is",
               intro="Several access codes are written somewhere in the text below. Keep them in mind.\n")
SINKS = 4


def _find_last(hay: list[int], needle: list[int]) -> int:
    for i in range(len(hay) - len(needle), -1, -1):
        if hay[i:i + len(needle)] == needle:
            return i
    return -1


def needle_scores(model, tokenize, n_probes: int, n_tokens: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(mass, copy) per KV head [n_layer, n_head_kv] and the number of answer tokens scored."""
    from razor_gguf import niah
    from razor_gguf.calibration import calibration_text

    hp = model.hp
    mass = np.zeros((hp.n_layer, hp.n_head))
    copy = np.zeros((hp.n_layer, hp.n_head))
    steps = 0
    prose = calibration_text()
    for i in range(n_probes):
        p = niah.multi_trial(tokenize, prose, n_tokens - 8, 4, seed=10_000 + i, **WORDING)
        prompt, ans = tokenize(p.text), tokenize(" " + p.answer, False)
        at = _find_last(prompt, ans)
        if at < 0:
            print(f"copy_heads: probe {i}: the answer's tokens do not occur in the prompt; skipped", file=sys.stderr)
            continue
        span = range(at, at + len(ans))
        toks = prompt + ans[:-1]
        target = {len(prompt) - 1 + k: t for k, t in enumerate(ans)}  # query row -> the token it produces

        def hook(il, s, pr, k0):
            for r, t in target.items():
                if s <= r < s + pr.shape[1]:
                    a = pr[:, r - s, :]
                    mass[il] += a[:, span.start - k0:span.stop - k0].sum(-1).numpy()
                    top = a.argmax(-1).numpy() + k0
                    copy[il] += [j in span and prompt[j] == t for j in top]

        model.forward(toks, hook=hook, chunk=256)
        steps += len(target)
    g = hp.n_head // hp.n_head_kv
    kv = lambda x: (x / max(1, steps)).reshape(hp.n_layer, hp.n_head_kv, g).max(-1)  # noqa: E731
    return kv(mass), kv(copy), steps


def top_map(hp, score: np.ndarray, k: int) -> np.ndarray:
    """The k heads of highest score (ties by index), none in a sliding-window layer: SPEC's selection rule."""
    from razor_gguf.calibration import swa_layers
    from razor_gguf.scoring import select_heads

    return select_heads(np.zeros_like(score), score, k / score.size, 0.0, local_layers=swa_layers(hp))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--probes", type=int, default=16, help="calibration probes scored")
    ap.add_argument("--tokens", type=int, default=2048, help="tokens per calibration probe")
    ap.add_argument("--eval", type=int, default=20, help="prompts per evaluation cell")
    ap.add_argument("--lengths", default="2048")
    ap.add_argument("--budget", type=float, default=0.35)
    ap.add_argument("--policies", default="full,stored,mass,copy")
    ap.add_argument("--json")
    a = ap.parse_args(argv)

    from razor_gguf import niah, passkey
    from razor_gguf.calibration import razor_policy, swa_layers, window_for_budget
    from reference_session import first_wrong, open_session

    session = open_session(a.model, ap.error)
    tokenize, model, stored = session.tokenize, session.model, session.stored
    hp = model.hp
    t0 = time.perf_counter()
    mass, copy, steps = needle_scores(model, tokenize, a.probes, a.tokens)
    k = int(stored.sum())
    maps = {"stored": stored, "mass": top_map(hp, mass, k), "copy": top_map(hp, copy + 1e-3 * mass, k)}  # mass breaks ties
    res = {"model": pathlib.Path(a.model).name, "settings": {**vars(a), "wording": WORDING, "n_sink": SINKS},
           "answer_tokens_scored": steps, "scoring_seconds": round(time.perf_counter() - t0, 1),
           "mass": mass.tolist(), "copy": copy.tolist(), "maps": {n: m.tolist() for n, m in maps.items()},
           "overlap_with_stored": {n: int((m & stored).sum()) for n, m in maps.items()}, "cells": []}
    print(f"{k} retrieval heads; shared with the stored map: mass {res['overlap_with_stored']['mass']}, "
          f"copy {res['overlap_with_stored']['copy']}", flush=True)

    policies = a.policies.split(",")
    hay = niah.haystack_text()
    global_layers = [not s for s in swa_layers(hp)]
    for n in (int(x) for x in a.lengths.split(",")):
        tasks = {
            "passkey": [(tokenize(p.text), tokenize(" " + p.key, False)) for p in passkey.make_trials(tokenize, n, a.eval)],
            "niah4": [(tokenize(p.text), tokenize(" " + p.answer, False))
                      for p in (niah.multi_trial(tokenize, hay, n, 4, seed=i) for i in range(a.eval))],
        }
        for task, items in tasks.items():
            for name in policies:
                t1 = time.perf_counter()
                window, attention = None, None
                if name != "full":
                    # the window that fills the budget exactly per token (no ring slack): equal memory for every map
                    window = window_for_budget(a.budget, maps[name], n, SINKS, global_layers)
                    if window is None:
                        ap.error(f"--budget {a.budget}: the {name} map's retrieval heads alone exceed it")
                    attention = razor_policy(hp, maps[name], SINKS, window, compensation=False)
                ok = [first_wrong(model, p, ans, attention) is None for p, ans in items]
                res["cells"].append({"task": task, "n": n, "policy": name, "window": window, "correct": sum(ok),
                                     "trials": len(ok), "per_prompt": ok, "s": round(time.perf_counter() - t1)})
                print(f"{task} {n} {name} window {window}: {sum(ok)}/{len(ok)}", flush=True)
                if a.json:
                    pathlib.Path(a.json).write_text(json.dumps(res) + "\n")
    session.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
