"""Which prompt tokens to pin in razor's local heads (razor.n_pin).

A first read of the prompt records, in the retrieval heads (which keep every token), the attention the prompt's
last PIN_QUERIES tokens give each earlier token, summed over those queries, heads and layers
(llama_razor_pin_capture). The pins are the n_pin tokens with the highest score max-pooled over a span that
reaches PIN_AFTER positions back and PIN_BEFORE forward, i.e. each strong token pins itself, PIN_BEFORE tokens
before it and PIN_AFTER after it, among the tokens that will have left the local window by the prompt's end; the
prompt is then read again with them pinned. The span leans forward because the retrieval heads attend where the
question matches the text (a needle's key: "... for Tartu"), and what the answer copies follows it ("is: 3412344"):
on 20 multi-needle prompts of 2048 tokens in the reference pass, a symmetric 7-token pool pinned one digit of
the asked number in 19 of them and the whole number in none; this span pins it whole in 18 and answers 7 against
5 (0 vs 2 discordant; the full cache 11). First tried in tools/passkey_diagnosis.py (policy shared_2pass).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

PIN_QUERIES = 32  # the prompt's last tokens whose attention chooses the pins (SnapKV's observation window)
PIN_BEFORE = 2  # tokens pinned before a strong one
PIN_AFTER = 12  # and after it: a key's value (a 7-digit number and its punctuation) follows the key
# The sinks' own score is pooled forward too, so positions n_sink..12 are pinned in every prompt (leaving it out
# did not answer more in the reference pass: README, "Pinned tokens follow the key").


def select_pins(scores: npt.ArrayLike, n_pin: int, n_sink: int, end: int, before: int = PIN_BEFORE,
                after: int = PIN_AFTER) -> list[int]:
    """The n_pin positions p in [n_sink, end) with the highest max(scores[p - after .. p + before]), ascending
    (ties: the earlier)."""
    s = np.asarray(scores, dtype=np.float64)
    lo, hi = max(0, n_sink), min(end, len(s))
    if n_pin <= 0 or hi <= lo:
        return []
    padded = np.concatenate([np.full(after, -np.inf), s, np.full(before, -np.inf)])
    pooled = np.lib.stride_tricks.sliding_window_view(padded, after + before + 1).max(axis=1)[lo:hi]
    top = np.argsort(-pooled, kind="stable")[:n_pin] + lo
    return sorted(int(x) for x in top)
