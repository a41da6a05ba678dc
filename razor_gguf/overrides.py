"""The razor options as llama.cpp kv_overrides (SPEC section 2 keys): how razor_gguf.Llama, the
commands and the bench workers carry them to the patched library. Imports nothing of the package."""

from __future__ import annotations

from typing import Any


def razor_overrides(razor: bool | None = None, n_sink: int | None = None, window: int | None = None,
                    retrieval_ratio: float | None = None, compensation: bool | None = None) -> dict[str, Any]:
    """The kv_overrides that carry the razor options to the patched llama.cpp (SPEC section 2 keys).

    None leaves a setting to the model's razor.* metadata."""
    out: dict[str, Any] = {}
    if razor is not None:
        out["razor.enabled"] = bool(razor)
    if n_sink is not None:
        if int(n_sink) < 0:
            raise ValueError(f"n_sink must be >= 0, got {n_sink}")
        out["razor.n_sink"] = int(n_sink)
    if window is not None:
        if int(window) < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        out["razor.window"] = int(window)
    if retrieval_ratio is not None:
        if not 0.0 <= float(retrieval_ratio) <= 1.0:
            raise ValueError(f"retrieval_ratio must be in [0, 1], got {retrieval_ratio}")
        out["razor.retrieval_ratio"] = float(retrieval_ratio)
    if compensation is not None:
        out["razor.compensation"] = bool(compensation)
    return out
