"""Which prompt tokens to pin in razor's local heads (razor.n_pin).

A first read of the prompt records, in the retrieval heads (which keep every token), the attention the prompt's
last PIN_QUERIES tokens give each earlier token, summed over those queries, heads and layers
(llama_razor_pin_capture). The pins are the n_pin tokens with the highest score max-pooled over PIN_POOL
positions (a token's neighbours come along: a number split into several tokens stays whole), among those that
will have left the local window by the prompt's end; the prompt is then read again with them pinned. Tried
first in the reference pass (tools/passkey_diagnosis.py, policy shared_2pass).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

PIN_QUERIES = 32  # the prompt's last tokens whose attention chooses the pins (SnapKV's observation window)
PIN_POOL = 7  # max-pooling width over positions


def select_pins(scores: npt.ArrayLike, n_pin: int, n_sink: int, end: int, pool: int = PIN_POOL) -> list[int]:
    """The n_pin positions in [n_sink, end) with the highest max-pooled scores, ascending (ties: the earlier)."""
    s = np.asarray(scores, dtype=np.float64)
    lo, hi = max(0, n_sink), min(end, len(s))
    if n_pin <= 0 or hi <= lo:
        return []
    half = pool // 2
    padded = np.concatenate([np.full(half, -np.inf), s, np.full(half, -np.inf)])
    pooled = np.lib.stride_tricks.sliding_window_view(padded, pool).max(axis=1)[lo:hi]
    top = np.argsort(-pooled, kind="stable")[:n_pin] + lo
    return sorted(int(x) for x in top)
