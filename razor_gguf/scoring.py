"""Head scoring (SPEC section 1): probe, echo and induction scores, GQA max, selection.

Probe: a leading token followed by a block of B random ids repeated R times (T = 1 + R*B).
Positions: 0 is the leading token, block r occupies 1 + r*B .. (r+1)*B. For each query row i in
repetitions 2..R, the earlier copies of the same token are j = i - k*B >= 1 (k >= 1):
echo(i) = sum_j A[i, j], induction(i) = sum_j A[i, j+1]. A head's scores are the means over those rows.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np

DEFAULT_PROBE_LEN = 2500  # the paper's B
DEFAULT_REPS = 4
DEFAULT_SEED = 0
DEFAULT_TOKEN_RANGE = (10000, 12500)  # the paper's ids, uniform in [low, high)
DEFAULT_INDUCTION_RATIO = 0.14
DEFAULT_ECHO_RATIO = 0.01


def fit_probe_len(n_ctx: int, probe_len: int = DEFAULT_PROBE_LEN, reps: int = DEFAULT_REPS) -> int:
    """B, shrunk so that 1 + reps*B fits the model's context."""
    b = min(int(probe_len), (int(n_ctx) - 1) // reps)
    if b < 2:
        raise ValueError(f"context {n_ctx} is too short for a probe of {reps} repetitions")
    return b


def probe_tokens(
    lead_token: int,
    probe_len: int,
    reps: int = DEFAULT_REPS,
    seed: int = DEFAULT_SEED,
    n_vocab: int | None = None,
    token_range: tuple[int, int] = DEFAULT_TOKEN_RANGE,
) -> np.ndarray:
    """[lead] + block * reps, the block uniform in token_range (moved inside a small vocabulary)."""
    low, high = effective_token_range(n_vocab, token_range)
    rng = np.random.default_rng(seed)
    block = rng.integers(low, high, size=probe_len, dtype=np.int64)
    return np.concatenate([[int(lead_token)], np.tile(block, reps)]).astype(np.int64)


def effective_token_range(n_vocab: int | None, token_range=DEFAULT_TOKEN_RANGE) -> tuple[int, int]:
    low, high = token_range
    if n_vocab is not None and high > n_vocab:
        high = n_vocab
        low = max(0, min(low, high - (token_range[1] - token_range[0])))
    return int(low), int(high)


class ScoreAccumulator:
    """Accumulates echo / induction sums from chunks of attention rows, per (layer, query head)."""

    def __init__(self, n_layer: int, n_head: int, probe_len: int, reps: int = DEFAULT_REPS):
        self.B, self.R = probe_len, reps
        self.echo = np.zeros((n_layer, n_head), dtype=np.float64)
        self.induction = np.zeros((n_layer, n_head), dtype=np.float64)
        self.n_rows = (reps - 1) * probe_len

    def add(self, layer: int, row_start: int, probs, key_start: int = 0) -> None:
        """probs: [n_head, rows, n_keys] post-softmax rows row_start.. of one layer (torch or numpy),
        over keys key_start.. (earlier keys have probability 0)."""
        import torch

        p = torch.as_tensor(probs)
        n_head, rows, n_keys = p.shape
        B = self.B
        i = torch.arange(row_start, row_start + rows, device=p.device)
        keep = i >= 1 + B  # repetitions 2..R
        if not bool(keep.any()):
            return
        p = p[:, keep]
        i = i[keep]
        e = torch.zeros(n_head, dtype=torch.float64, device=p.device)
        ind = torch.zeros(n_head, dtype=torch.float64, device=p.device)
        for k in range(1, self.R):
            j = i - k * B
            ok = j >= 1
            if not bool(ok.any()):
                break
            ok_e = ok & (j >= key_start)
            if bool(ok_e.any()):
                r = torch.nonzero(ok_e).squeeze(1)
                e += p[:, r, j[ok_e] - key_start].double().sum(-1)
            ok_i = ok & (j + 1 >= key_start)
            if bool(ok_i.any()):
                r = torch.nonzero(ok_i).squeeze(1)
                ind += p[:, r, j[ok_i] + 1 - key_start].double().sum(-1)
        self.echo[layer] += e.cpu().numpy()
        self.induction[layer] += ind.cpu().numpy()

    def scores(self) -> tuple[np.ndarray, np.ndarray]:
        """(echo, induction) per (layer, query head): means over the rows of repetitions 2..R."""
        return self.echo / self.n_rows, self.induction / self.n_rows


def scores_from_attention(A, probe_len: int, reps: int = DEFAULT_REPS, chunk: int = 64):
    """Echo and induction per head of one layer's full attention A [n_head, T, T] (for tests)."""
    A = np.asarray(A)
    acc = ScoreAccumulator(1, A.shape[0], probe_len, reps)
    T = A.shape[1]
    for s in range(0, T, chunk):
        e = min(T, s + chunk)
        acc.add(0, s, A[:, s:e, :e])
    echo, ind = acc.scores()
    return echo[0], ind[0]


def gqa_max(scores: np.ndarray, n_head_kv: int) -> np.ndarray:
    """[n_layer, n_head] -> [n_layer, n_head_kv]: max over the query heads that share a KV head
    (query head h uses KV head h // (n_head / n_head_kv), as in llama.cpp)."""
    n_layer, n_head = scores.shape
    g = n_head // n_head_kv
    return scores.reshape(n_layer, n_head_kv, g).max(axis=-1)


def _top(scores: np.ndarray, ratio: float, eligible: np.ndarray) -> np.ndarray:
    flat = scores.ravel()
    n = int(math.ceil(ratio * flat.size - 1e-9)) if ratio > 0 else 0
    cand = np.flatnonzero(eligible.ravel())
    n = min(n, cand.size)
    order = cand[np.lexsort((cand, -flat[cand]))]  # descending score, ties by index
    sel = np.zeros(flat.size, dtype=bool)
    sel[order[:n]] = True
    return sel.reshape(scores.shape)


def select_heads(
    echo_kv: np.ndarray,
    induction_kv: np.ndarray,
    induction_ratio: float = DEFAULT_INDUCTION_RATIO,
    echo_ratio: float = DEFAULT_ECHO_RATIO,
    local_layers: list[bool] | None = None,
) -> np.ndarray:
    """Head map [n_layer, n_head_kv] int32: top induction_ratio by induction union top echo_ratio by echo,
    pooled over all (layer, KV head). Counts are ceil(ratio * n_heads). Heads of sliding-window layers
    (local by construction) are never retrieval heads."""
    eligible = np.ones(echo_kv.shape, dtype=bool)
    if local_layers is not None:
        eligible[np.asarray(local_layers, dtype=bool)] = False
    sel = _top(induction_kv, induction_ratio, eligible) | _top(echo_kv, echo_ratio, eligible)
    return sel.astype(np.int32)


@dataclass
class HeadScores:
    n_layer: int
    n_head: int
    n_head_kv: int
    echo_q: np.ndarray  # [n_layer, n_head]
    induction_q: np.ndarray
    echo: np.ndarray  # [n_layer, n_head_kv]
    induction: np.ndarray
    head_map: np.ndarray
    provenance: dict = field(default_factory=dict)

    @property
    def retrieval_count(self) -> int:
        return int(self.head_map.sum())

    @property
    def retrieval_ratio(self) -> float:
        return self.retrieval_count / self.head_map.size

    def retrieval_layers(self) -> list[int]:
        return [int(l) for l in np.flatnonzero(self.head_map.any(axis=1))]


def score_model(
    path: str,
    probe_len: int = DEFAULT_PROBE_LEN,
    reps: int = DEFAULT_REPS,
    seed: int = DEFAULT_SEED,
    induction_ratio: float = DEFAULT_INDUCTION_RATIO,
    echo_ratio: float = DEFAULT_ECHO_RATIO,
    chunk: int | None = None,
    progress=None,
    model=None,
) -> HeadScores:
    """Score every head of the GGUF at `path` with the reference pass (layer-by-layer streaming)."""
    from .reference import ReferenceModel

    m = model or ReferenceModel(path)
    hp = m.hp
    B = fit_probe_len(hp.n_ctx_train, probe_len, reps)
    lead = hp.bos_token_id if hp.bos_token_id is not None else 0
    toks = probe_tokens(lead, B, reps, seed, hp.n_vocab)
    acc = ScoreAccumulator(hp.n_layer, hp.n_head, B, reps)
    if chunk is None:  # ~128 MiB of float32 probabilities per chunk of query rows, 16..256 rows
        chunk = int(max(16, min(256, (128 << 20) // (4 * hp.n_head * len(toks)))))
    t0 = time.perf_counter()
    m.forward(toks, hook=acc.add, chunk=chunk, progress=progress)
    echo_q, ind_q = acc.scores()
    echo_kv, ind_kv = gqa_max(echo_q, hp.n_head_kv), gqa_max(ind_q, hp.n_head_kv)
    local = hp.swa_layers if any(hp.swa_layers) else None
    head_map = select_heads(echo_kv, ind_kv, induction_ratio, echo_ratio, local)
    low, high = effective_token_range(hp.n_vocab)
    prov = {
        "probe_len": B,
        "repetitions": reps,
        "seed": seed,
        "lead_token": int(lead),
        "token_low": low,
        "token_high": high,
        "induction_ratio": induction_ratio,
        "echo_ratio": echo_ratio,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    return HeadScores(hp.n_layer, hp.n_head, hp.n_head_kv, echo_q, ind_q, echo_kv, ind_kv, head_map, prov)
