#!/usr/bin/env python3
"""Where razor loses passkeys in the reference pass, and whether a query-aware selection in local heads wins them back.

    tools/passkey_diagnosis.py MODEL.razor.gguf [--task passkey|mniah] [--tokens 4096] [--eval 20] [--budget 0.35]
        [--ring-window 560] [--policies full,razor,razor_ring,razor_ring+needle] [--keep 64] [--json OUT.json]

The passkey prompts of razor_gguf.passkey (keys at depths spread evenly), or with --task mniah the multi-needle
NIAH prompts of tools/evidence.py (4 needles, the question naming one), the answer teacher-forced, under:
  full              the full cache;
  razor             the stored head map full, every other KV head S = 4 sinks + the window that fills --budget of
                    the full cache exactly (no ring slack), no compensation row (SmolLM2's measured default);
  razor_ring        the same with --ring-window: the window llama.cpp's cache gets for the same budget (its rings
                    hold margin and ubatch rows and are padded to 256: W 560 for SmolLM2 at 4096, budget 0.35);
  razor_ring+needle razor_ring, and every local head also keeps the needle's sentence (an oracle: no cache can
                    know where the needle is; ~25 tokens per head, not counted in the budget);
  streaming+needle  every head local at the window that fills the same budget, plus the needle's sentence.
  snap              query-aware selection (SnapKV, Li et al. 2024) in the local heads at razor_ring's memory: the
                    prompt is read with the full cache (so the answer's first token is the full cache's); at its
                    end each local KV head keeps S sinks, the --keep tokens its group's last 32 prompt queries
                    attend to most (max-pooled over 7 positions) and the last ring-window - keep positions; the
                    rest of the answer sees only those;
  snap_razor        the same selection, but the prompt is read under it too (local heads: sinks, the kept tokens and
                    that recent window), so nothing needs the full cache at any time: llama.cpp could do it by
                    reading the prompt twice (the first read gives the question's queries, the second keeps the keys
                    they pick as they leave the window);
  snap_2pass        snap_razor as such a cache would do it: a first read under razor (sinks and the recent window)
                    keeps the question's queries and their softmax normalizers; the second read scores every key
                    with them, so the selection no longer uses anything the cache could not have.
  shared_2pass      one selection for every local head: a first read under razor (sinks and the last
                    ring-window - keep positions) sums the attention the retrieval heads' last 32 prompt queries
                    (the question) give each prompt token over those heads and layers (they see every token);
                    the --keep tokens it picks (max-pooled over 7 positions) are kept by every local head in the
                    second read. A cache keeps them like sinks at known positions: no per-head rows to score.
razor against razor_ring is what the rings' slack costs; if razor_ring+needle is as good as the full cache, what
razor loses is the needle in the local heads (the retrieval heads alone do not carry it to the answer); if not,
the evicted filler and context cost the answer. Each prompt records whether the key came out whole and the
first answer token that went wrong (SmolLM2 writes one digit per token); the snap policies also record the
share of (layer, local KV head) pairs whose kept tokens include one of the key's.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
import time
from dataclasses import dataclass

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

SINKS = 4
POLICIES = ("full", "razor", "razor_ring", "razor_ring+needle")
ALL_POLICIES = POLICIES + ("streaming+needle", "snap", "snap_razor", "snap_2pass", "shared_2pass")


@dataclass(frozen=True)
class Trial:
    text: str
    key: str  # the answer: the passkey, or the asked needle's number
    needle: str  # the sentence that holds it (once in the text)
    depth: float


def trials(task: str, tokenize, n_tokens: int, n: int) -> list[Trial]:
    """passkey: razor_gguf.passkey.make_trials; mniah: the multi-needle NIAH prompts of tools/evidence.py (4
    needles, the question naming one), i.e. the prompts its llama.cpp cells are answered on."""
    from razor_gguf import niah, passkey

    if task == "passkey":
        return [Trial(p.text, p.key, passkey.NEEDLE.format(key=p.key), p.depth)
                for p in passkey.make_trials(tokenize, n_tokens, n)]
    from evidence import prompt_of

    haystack, out = niah.haystack_text(), []
    for i in range(n):
        text, number, depth = prompt_of("mniah", tokenize, n_tokens, i, haystack)
        city = next(c for c in niah.CITIES if niah.NEEDLE.format(city=c, number=number) in text)
        out.append(Trial(text, number, niah.NEEDLE.format(city=city, number=number), depth))
    return out


def needle_span(tokenize, t: Trial) -> range:
    """Token positions of the needle sentence in the prompt (a token of margin either side)."""
    at = t.text.index(t.needle)
    lo = len(tokenize(t.text[:at]))
    hi = len(tokenize(t.text[:at + len(t.needle)]))
    return range(max(0, lo - 1), hi + 1)


def keep_attention(head_map: np.ndarray, window: int, keep, chunk: int = 512):
    """ReferenceModel.forward's attention=: local KV heads (head_map 0) see sinks, the window and the positions in
    `keep` (the same for every local head); retrieval heads see everything; causal softmax, no compensation row."""
    import torch

    def attention(il, q, k, v):
        H, T, d = q.shape
        n_kv = k.shape[0]
        qg = q.reshape(n_kv, H // n_kv, T, d)
        local = torch.as_tensor(np.asarray(head_map[il]) == 0)
        pos = torch.arange(T)
        kept_pos = pos < SINKS
        kept_pos[[x for x in keep if x < T]] = True
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


def first_read_attention(head_map: np.ndarray, window: int, n_prompt: int, store: dict, obs: int = 32):
    """ReferenceModel.forward's attention= for the first of snap_2pass's two reads of the prompt: razor's policy at
    `window` (keep_attention, nothing kept), recording per layer the last `obs` prompt rows' queries and the
    log-normalizer of their softmax over the keys this read lets them see, all a cache can keep of the question
    for the second read."""
    import torch

    razor = keep_attention(head_map, window, range(0))

    def attention(il, q, k, v):
        H, T, d = q.shape
        n_kv = k.shape[0]
        o0 = n_prompt - obs
        q_obs = q.reshape(n_kv, H // n_kv, T, d)[:, :, o0:n_prompt]
        qi, kj = torch.arange(o0, n_prompt)[:, None], torch.arange(n_prompt)[None, :]
        seen = (kj <= qi) & ((kj < SINKS) | (kj > qi - window))
        sc = torch.matmul(q_obs, k[:, None, :n_prompt].transpose(-1, -2)) / math.sqrt(d)
        store[il] = (q_obs.clone(), torch.logsumexp(sc.masked_fill(~seen, float("-inf")), -1, keepdim=True))
        return razor(il, q, k, v)

    return attention


def retrieval_read_attention(head_map: np.ndarray, window: int, n_prompt: int, store: dict, obs: int = 32):
    """ReferenceModel.forward's attention= for the first of shared_2pass's two reads: razor's policy at `window`
    (keep_attention, nothing kept), adding to store["score"] the softmax attention the last `obs` prompt queries of
    the retrieval heads (which see every token) give each prompt key, summed over queries, heads and layers."""
    import torch

    razor = keep_attention(head_map, window, range(0))

    def attention(il, q, k, v):
        H, T, d = q.shape
        n_kv = k.shape[0]
        retr = torch.as_tensor(np.asarray(head_map[il]) == 1)
        if bool(retr.any()):
            o0 = n_prompt - obs
            q_obs = q.reshape(n_kv, H // n_kv, T, d)[retr][:, :, o0:n_prompt]
            sc = torch.matmul(q_obs, k[retr][:, None, :n_prompt].transpose(-1, -2)) / math.sqrt(d)
            sc = sc.masked_fill(torch.arange(n_prompt)[None, :] > torch.arange(o0, n_prompt)[:, None], float("-inf"))
            store["score"] = store.get("score", 0) + torch.softmax(sc, -1).sum(dim=(0, 1, 2))
        return razor(il, q, k, v)

    return attention


def shared_selection(score, n_keep: int, n_prompt: int, recent: int, pool: int = 7) -> list[int]:
    """The n_keep prompt positions with the highest max-pooled score outside the sinks and the last `recent`
    positions (what every local head keeps in shared_2pass's second read), ascending."""
    import torch

    pooled = torch.nn.functional.max_pool1d(torch.as_tensor(score)[None, None], pool, 1, pool // 2)[0, 0]
    lo, hi = SINKS, n_prompt - recent
    if hi <= lo:
        return []
    return sorted((torch.topk(pooled[lo:hi], min(n_keep, hi - lo)).indices + lo).tolist())


def snap_attention(head_map: np.ndarray, window: int, n_keep: int, n_prompt: int, read: str = "full",
                   key_pos=(), obs: int = 32, pool: int = 7, chunk: int = 512, stats: dict | None = None,
                   first_read: dict | None = None):
    """ReferenceModel.forward's attention= for the snap policies: each local KV head's rows see the sinks, its n_keep
    selected prompt tokens (from the row after each on) and the last window - n_keep positions; with read="full" the
    prompt's rows (before n_prompt) see every token instead, so only the answer's rows are restricted. With
    read="razor" the selection comes from this read's own queries, or with first_read (first_read_attention's store)
    from a first read's queries and softmax normalizers, which a cache can hold while it reads the prompt again.
    The selection: softmax attention of the last `obs` prompt queries of the head's group over every prompt key,
    summed, max-pooled over `pool` positions, the top n_keep outside the sinks and the recent window.
    stats["hit"] collects, per layer with local heads, how many local heads kept one of key_pos (and of how many)."""
    import torch

    recent = window - n_keep
    if recent < 1 or n_keep < 1:
        raise ValueError("--keep must be between 1 and the ring window - 1")

    def attention(il, q, k, v):
        H, T, d = q.shape
        n_kv = k.shape[0]
        P = n_prompt
        qg = q.reshape(n_kv, H // n_kv, T, d)
        local = torch.as_tensor(np.asarray(head_map[il]) == 0)
        # The selection: the prompt's last queries (this read's, or the first read's) over every prompt key.
        o0 = P - obs
        q_obs, lse = first_read[il] if first_read is not None else (qg[:, :, o0:P], None)
        sc = torch.matmul(q_obs, k[:, None, :P].transpose(-1, -2)) / math.sqrt(d)
        sc = sc.masked_fill(torch.arange(P)[None, :] > torch.arange(o0, P)[:, None], float("-inf"))
        score = (torch.softmax(sc, -1) if lse is None else torch.exp(sc - lse)).sum(dim=(1, 2))  # [n_kv, P]
        score = torch.nn.functional.max_pool1d(score[:, None], pool, 1, pool // 2)[:, 0]
        lo, hi = SINKS, P - recent  # the candidates: neither sinks nor in the window the answer still sees
        kept = torch.zeros(n_kv, T, dtype=torch.bool)
        if hi > lo:
            top = torch.topk(score[:, lo:hi], min(n_keep, hi - lo), dim=-1).indices + lo
            kept.scatter_(1, top, True)
        if stats is not None and bool(local.any()) and len(key_pos):
            hit = kept[:, list(key_pos)].any(-1) & local
            stats.setdefault("hit", []).append((int(hit.sum()), int(local.sum())))
        pos = torch.arange(T)
        sinks = pos < SINKS
        out = torch.empty(n_kv, H // n_kv, T, v.shape[2], dtype=q.dtype)
        for s0 in range(0, T, chunk):
            e = min(T, s0 + chunk)
            qi, kj = pos[s0:e, None], pos[None, :e]
            causal = kj <= qi
            windowed = causal & (sinks[None, :e] | (kj > qi - recent))  # [rows, e]
            pol = windowed[None] | (causal[None] & kept[:, None, :e])  # [n_kv, rows, e]
            if read == "full":
                pol = torch.where((qi < P)[None], causal[None], pol)
            mask = torch.where(local[:, None, None], pol, causal[None])
            sc = torch.matmul(qg[:, :, s0:e], k[:, None, :e].transpose(-1, -2)) / math.sqrt(d)
            out[:, :, s0:e] = torch.matmul(torch.softmax(sc.masked_fill(~mask[:, None], float("-inf")), -1),
                                           v[:, None, :e])
        return out.reshape(H, T, v.shape[2])

    return attention


def key_positions(tokenize, t: Trial) -> list[int]:
    """Token positions of the key's digits (every mention in the needle) in the prompt."""
    at = t.text.index(t.needle)
    out, part = [], t.needle.find(t.key)
    while part >= 0:
        lo = len(tokenize(t.text[:at + part]))
        hi = len(tokenize(t.text[:at + part + len(t.key)]))
        out += range(lo, hi)
        part = t.needle.find(t.key, part + 1)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--eval", type=int, default=20)
    ap.add_argument("--budget", type=float, default=0.35)
    ap.add_argument("--ring-window", type=int, default=560,
                    help="the window llama.cpp's rings give at this budget and length (razor_stats()['window'])")
    ap.add_argument("--policies", default=",".join(POLICIES),
                    help="comma-separated, any of " + ", ".join(ALL_POLICIES))
    ap.add_argument("--task", choices=("passkey", "mniah"), default="passkey")
    ap.add_argument("--keep", type=int, default=64, help="the snap policies' selected tokens per local KV head")
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    policies = a.policies.split(",")
    if unknown := [x for x in policies if x not in ALL_POLICIES]:
        ap.error(f"--policies: unknown {', '.join(unknown)} (known: {', '.join(ALL_POLICIES)})")
    if not 1 <= a.keep < a.ring_window:
        ap.error(f"--keep {a.keep}: must be between 1 and --ring-window - 1 ({a.ring_window - 1})")

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
    res = {"model": pathlib.Path(a.model).name, "settings": {**vars(a), "n_sink": SINKS}, "windows": windows,
           "retrieval_heads": int(stored.sum()), "prompts": []}
    for i, p in enumerate(trials(a.task, tokenize, n, a.eval)):
        prompt, ans = tokenize(p.text), tokenize(" " + p.key, False)
        span = needle_span(tokenize, p)
        row = {"depth": p.depth, "n_tokens": len(prompt), "needle": [span.start, span.stop], "policies": {}}
        keys = key_positions(tokenize, p)
        for name in policies:
            t0 = time.perf_counter()
            stats: dict = {}
            if name == "shared_2pass":
                first, recent = {}, windows["razor_ring"] - a.keep
                model.forward(prompt, attention=retrieval_read_attention(stored, recent, len(prompt), first))
                keep = shared_selection(first["score"], a.keep, len(prompt), recent)
                attention = keep_attention(stored, recent, keep)
                stats["hit"] = [(int(any(x in keep for x in keys)), 1)]
            elif name in ("snap", "snap_razor", "snap_2pass"):
                first = None
                if name == "snap_2pass":
                    first = {}
                    model.forward(prompt, attention=first_read_attention(
                        stored, windows["razor_ring"] - a.keep, len(prompt), first))
                attention = snap_attention(stored, windows["razor_ring"], a.keep, len(prompt),
                                           "full" if name == "snap" else "razor", keys, stats=stats, first_read=first)
            elif name == "full":
                attention = None
            else:
                # keep_attention with nothing kept is razor's policy without the row (its torch oracle, to 1e-4)
                head_map, window, keep = {
                    "razor": (stored, windows["razor"], range(0)),
                    "razor_ring": (stored, windows["razor_ring"], range(0)),
                    "razor_ring+needle": (stored, windows["razor_ring"], span),
                    "streaming+needle": (none, windows["streaming"], span),
                }[name]
                attention = keep_attention(head_map, window, keep)
            wrong = first_wrong(model, prompt, ans, attention)
            row["policies"][name] = {"ok": wrong is None, "first_wrong": wrong, "s": round(time.perf_counter() - t0, 1)}
            if "hit" in stats:
                hit, of = (sum(x) for x in zip(*stats["hit"]))
                row["policies"][name]["key_kept"] = round(hit / of, 3)
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
