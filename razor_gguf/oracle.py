"""Numpy oracle of the razor streaming cache policy (SPEC section 1) for one attention layer.

The C++ razor cache is checked against this. Semantics, per KV head:

- retrieval heads (head_map == 1): plain causal softmax attention over every earlier position;
- local heads (head_map == 0): a query at position p sees the sinks (positions < S), the pinned
  positions (razor.n_pin: any set of earlier positions, the same for every local head), the recent
  positions (p - W - slack_p, p], and one compensation row summarizing every position in
  [S, p - W - slack_p]: k̄, v̄ = mean of those keys / values, l = their count, logit
  q·k̄·scale + log(l) (so it weighs as l identical keys); masked when l == 0.

Slack: an implementation that evicts once per ubatch instead of once per token lets a query see
the W tokens that were cached before its ubatch plus the earlier tokens of its own ubatch, i.e.
up to n_ubatch - 1 extra recent tokens. `slack` gives that extra count per query (an int for all
queries, or an array [T]); the evicted set shrinks by the same tokens, so nothing is counted twice.
`ubatch_slack()` computes it for a sequence fed in given ubatch sizes. slack=0 is the exact
per-token policy of the SPEC.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import numpy.typing as npt

Array = npt.NDArray[np.floating]

_ROW_CHUNK = 256  # query rows per block: bounds memory at O(chunk * T) instead of O(T^2)


def ubatch_slack(n_tokens: int, n_ubatch: int | Sequence[int]) -> npt.NDArray[np.int64]:
    """Extra visible tokens per query when eviction happens only at ubatch boundaries.

    The sequence is fed in order, in ubatches of n_ubatch tokens (an int), or of the given sizes
    (a list, e.g. a 40-token prompt split 16+16+8 and then single-token decode steps). A query then
    sees, on top of W, the tokens of its own ubatch that precede it.
    """
    sizes = [n_ubatch] * (-(-n_tokens // n_ubatch)) if isinstance(n_ubatch, int) else list(n_ubatch)
    if any(s < 1 for s in sizes) or sum(sizes) < n_tokens:
        raise ValueError("ubatch sizes must be >= 1 and cover n_tokens")
    return np.concatenate([np.arange(s, dtype=np.int64) for s in sizes])[:n_tokens]


def _as_slack(slack: int | npt.ArrayLike, t: int) -> npt.NDArray[np.int64]:
    s = np.broadcast_to(np.asarray(slack, dtype=np.int64), (t,)).copy()
    if (s < 0).any():
        raise ValueError("slack must be >= 0")
    return s


def razor_attention(
    q: npt.ArrayLike,
    k: npt.ArrayLike,
    v: npt.ArrayLike,
    head_map: npt.ArrayLike,
    n_sink: int,
    window: int,
    positions: npt.ArrayLike | None = None,
    slack: int | npt.ArrayLike = 0,
    scale: float | None = None,
    reference: bool = False,
    compensation: bool = True,
    pins: Sequence[int] = (),
) -> Array:
    """Attention outputs [T, n_head, d] of one layer under the razor cache policy.

    q: [T, n_head, d]; k, v: [T, n_head_kv, d], already RoPE'd; positions: [T] (default 0..T-1),
    strictly increasing (one sequence). head_map: [n_head_kv], 1 = retrieval (full cache).
    Query head h reads KV head h // (n_head // n_head_kv) (llama.cpp's GQA broadcast).
    reference=True computes in float64 (the ground truth); otherwise float32, like the kernels.
    compensation=False drops the compensation row (razor.compensation = false): sinks + window only.
    pins: positions every local head also keeps (razor.n_pin; the compensation row must be off).
    """
    dt = np.float64 if reference else np.float32
    q = np.asarray(q, dtype=dt)
    k = np.asarray(k, dtype=dt)
    v = np.asarray(v, dtype=dt)
    t, n_head, d = q.shape
    n_head_kv = k.shape[1]
    if k.shape != (t, n_head_kv, d) or v.shape[:2] != (t, n_head_kv):
        raise ValueError(f"shape mismatch: q {q.shape}, k {k.shape}, v {v.shape}")
    if n_head % n_head_kv:
        raise ValueError("n_head must be a multiple of n_head_kv")
    hm = np.asarray(head_map, dtype=np.int64).reshape(-1)
    if hm.shape != (n_head_kv,):
        raise ValueError(f"head_map must have n_head_kv={n_head_kv} entries, got {hm.shape}")
    if window < 1 or n_sink < 0:
        raise ValueError("need window >= 1 and n_sink >= 0")
    pos = np.arange(t, dtype=np.int64) if positions is None else np.asarray(positions, np.int64)
    if pos.shape != (t,) or (np.diff(pos) <= 0).any():
        raise ValueError("positions must be [T] and strictly increasing")
    sl = _as_slack(slack, t)
    pinned = np.isin(pos, np.asarray(list(pins), dtype=np.int64))[None, :]  # [1, T]
    if pinned.any() and compensation:
        raise ValueError("pins need compensation=False (the row would count a pinned token twice)")
    sc = dt(1.0 / np.sqrt(d) if scale is None else scale)
    group = n_head // n_head_kv

    out = np.empty((t, n_head, v.shape[2]), dtype=dt)
    for r0 in range(0, t, _ROW_CHUNK):
        r1 = min(t, r0 + _ROW_CHUNK)
        pq = pos[r0:r1, None]  # [R, 1] query positions
        pk = pos[None, :]  # [1, T] key positions
        causal = pk <= pq
        # First position still in the window; everything in [S, lo) has been evicted.
        lo = pq - window - sl[r0:r1, None] + 1
        kept_local = causal & ((pk < n_sink) | (pk >= lo) | pinned)
        evicted = causal & (pk >= n_sink) & (pk < lo)
        n_ev = evicted.sum(axis=1).astype(dt)  # l per query row, [R]
        ev_w = evicted.astype(dt)
        for hk in range(n_head_kv):
            kh, vh = k[:, hk], v[:, hk]  # [T, d]
            retrieval = hm[hk] == 1
            if not retrieval:
                with np.errstate(invalid="ignore", divide="ignore"):
                    kbar = (ev_w @ kh) / n_ev[:, None]  # [R, d]; NaN rows (l=0) masked below
                    vbar = (ev_w @ vh) / n_ev[:, None]
                    log_l = np.log(n_ev)
            mask = causal if retrieval else kept_local
            for h in range(hk * group, (hk + 1) * group):
                qh = q[r0:r1, h]  # [R, d]
                s = np.where(mask, (qh @ kh.T) * sc, -np.inf)  # [R, T]
                if retrieval:
                    m = s.max(axis=1, keepdims=True)
                    p = np.exp(s - m)
                    out[r0:r1, h] = (p @ vh) / p.sum(axis=1, keepdims=True)
                    continue
                has = (n_ev > 0) & compensation
                sbar = np.where(has, np.einsum("rd,rd->r", qh, np.where(has[:, None], kbar, 0)) * sc + np.where(has, log_l, 0), -np.inf)
                m = np.maximum(s.max(axis=1), sbar)[:, None]
                p = np.exp(s - m)
                pbar = np.exp(sbar[:, None] - m)  # [R, 1], 0 where l == 0
                num = p @ vh + pbar * np.where(has[:, None], vbar, 0)
                out[r0:r1, h] = num / (p.sum(axis=1, keepdims=True) + pbar)
    return out


def full_attention(q: npt.ArrayLike, k: npt.ArrayLike, v: npt.ArrayLike, reference: bool = False) -> Array:
    """Plain causal softmax attention with GQA: the all-retrieval case, for convenience."""
    n_head_kv = np.asarray(k).shape[1]
    return razor_attention(q, k, v, np.ones(n_head_kv, np.int64), 0, 1, reference=reference)
