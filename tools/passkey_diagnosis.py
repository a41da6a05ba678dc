#!/usr/bin/env python3
"""Where razor loses passkeys, in the reference pass: is it the needle the local heads evict, or the rest?

    tools/passkey_diagnosis.py MODEL.razor.gguf [--tokens 4096] [--eval 20] [--budget 0.35] [--ring-window 560]
        [--policies full,razor,razor_ring,razor_ring+needle] [--json OUT.json]

The passkey prompts of razor_gguf.passkey (keys at depths spread evenly), the answer teacher-forced, under:
  full              the full cache;
  razor             the stored head map full, every other KV head S = 4 sinks + the window that fills --budget of
                    the full cache exactly (no ring slack), no compensation row (SmolLM2's measured default);
  razor_ring        the same with --ring-window: the window llama.cpp's cache gets for the same budget (its rings
                    hold margin and ubatch rows and are padded to 256: W 560 for SmolLM2 at 4096, budget 0.35);
  razor_ring+needle razor_ring, and every local head also keeps the needle's sentence (an oracle: no cache can
                    know where the needle is; ~25 tokens per head, not counted in the budget);
  streaming+needle  every head local at the window that fills the same budget, plus the needle's sentence.
razor against razor_ring is what the rings' slack costs; if razor_ring+needle is as good as the full cache, what
razor loses is the needle in the local heads (the retrieval heads alone do not carry it to the answer); if not,
the evicted filler and context cost the answer. Each prompt records whether the key came out whole and the
first answer token that went wrong (SmolLM2 writes one digit per token).
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

SINKS = 4
POLICIES = ("full", "razor", "razor_ring", "razor_ring+needle")


def needle_span(tokenize, prompt) -> range:
    """Token positions of the needle sentence in the prompt (a token of margin either side)."""
    from razor_gguf import passkey

    needle = passkey.NEEDLE.format(key=prompt.key)
    at = prompt.text.index(needle)
    lo = len(tokenize(prompt.text[:at]))
    hi = len(tokenize(prompt.text[:at + len(needle)]))
    return range(max(0, lo - 1), hi + 1)


def keep_attention(head_map: np.ndarray, window: int, keep: range, chunk: int = 512):
    """ReferenceModel.forward's attention=: local KV heads (head_map 0) see sinks, the window and `keep`;
    retrieval heads see everything; causal softmax, no compensation row."""
    import torch

    def attention(il, q, k, v):
        H, T, d = q.shape
        n_kv = k.shape[0]
        qg = q.reshape(n_kv, H // n_kv, T, d)
        local = torch.as_tensor(np.asarray(head_map[il]) == 0)
        pos = torch.arange(T)
        kept_pos = (pos < SINKS) | ((pos >= keep.start) & (pos < keep.stop))
        out = torch.empty(n_kv, H // n_kv, T, v.shape[2], dtype=q.dtype)
        for s0 in range(0, T, chunk):
            e = min(T, s0 + chunk)
            qi, kj = pos[s0:e, None], pos[None, :e]
            causal = kj <= qi
            kept = causal & (kept_pos[None, :e] | (kj > qi - window))
            mask = torch.where(local[:, None, None, None], kept, causal)
            sc = torch.matmul(qg[:, :, s0:e], k[:, None, :e].transpose(-1, -2)) / math.sqrt(d)
            out[:, :, s0:e] = torch.matmul(torch.softmax(sc.masked_fill(~mask, float("-inf")), -1), v[:, None, :e])
        return out.reshape(H, T, v.shape[2])

    return attention


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--eval", type=int, default=20)
    ap.add_argument("--budget", type=float, default=0.35)
    ap.add_argument("--ring-window", type=int, default=560,
                    help="the window llama.cpp's rings give at this budget and length (razor_stats()['window'])")
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--json")
    a = ap.parse_args(argv)

    from razor_gguf import passkey
    from razor_gguf.calibration import window_for_budget
    from reference_session import first_wrong, open_session

    session = open_session(a.model, ap.error)
    tokenize, model, stored = session.tokenize, session.model, session.stored
    hp = model.hp
    if any(hp.swa_layers or []):
        ap.error("a sliding-window model: this diagnosis covers global-attention models only")
    none = np.zeros_like(stored)
    n = a.tokens
    windows = {"razor": window_for_budget(a.budget, stored, n, SINKS), "razor_ring": a.ring_window,
               "streaming": window_for_budget(a.budget, none, n, SINKS)}
    if windows["razor"] is None:
        ap.error(f"--budget {a.budget}: the retrieval heads alone exceed it")
    policies = a.policies.split(",")
    res = {"model": pathlib.Path(a.model).name, "settings": {**vars(a), "n_sink": SINKS}, "windows": windows,
           "retrieval_heads": int(stored.sum()), "prompts": []}
    for i, p in enumerate(passkey.make_trials(tokenize, n, a.eval)):
        prompt, ans = tokenize(p.text), tokenize(" " + p.key, False)
        span = needle_span(tokenize, p)
        row = {"depth": p.depth, "n_tokens": len(prompt), "needle": [span.start, span.stop], "policies": {}}
        for name in policies:
            t0 = time.perf_counter()
            attention = {
                "full": None,
                # keep_attention with nothing kept is razor's policy without the row (its torch oracle, to 1e-4)
                "razor": keep_attention(stored, windows["razor"], range(0)),
                "razor_ring": keep_attention(stored, windows["razor_ring"], range(0)),
                "razor_ring+needle": keep_attention(stored, windows["razor_ring"], span),
                "streaming+needle": keep_attention(none, windows["streaming"], span),
            }[name]
            wrong = first_wrong(model, prompt, ans, attention)
            row["policies"][name] = {"ok": wrong is None, "first_wrong": wrong, "s": round(time.perf_counter() - t0, 1)}
        res["prompts"].append(row)
        print(f"prompt {i} depth {p.depth:.2f}: " + ", ".join(
            f"{k} {'ok' if v['ok'] else 'x@' + str(v['first_wrong'])}" for k, v in row["policies"].items()), flush=True)
        if a.json:
            pathlib.Path(a.json).write_text(json.dumps(res) + "\n")
    res["correct"] = {k: sum(r["policies"][k]["ok"] for r in res["prompts"]) for k in policies}
    print("correct: " + ", ".join(f"{k} {v}/{len(res['prompts'])}" for k, v in res["correct"].items()))
    if a.json:
        pathlib.Path(a.json).write_text(json.dumps(res) + "\n")
    session.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
