"""The razor options as llama.cpp kv_overrides (SPEC section 2 keys): how razor_gguf.Llama, the
commands and the bench workers carry them to the patched library. Imports nothing of the package."""

from __future__ import annotations

import re
from typing import Any

_UNITS = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 10**3, "mb": 10**6, "gb": 10**9}


def parse_kv_budget(value: float | str) -> tuple[str, float | int]:
    """A KV-cache budget as the razor key that carries it to llama.cpp.

    A fraction of the full cache in (0, 1] (0.35, "0.35") -> ("razor.kv_budget", 0.35); an amount of memory
    ("96MiB", "1.5 GiB", "500MB") -> ("razor.kv_budget_bytes", bytes). ValueError for anything else."""
    text = str(value).strip()
    m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([KkMmGg][iI]?[Bb])?", text)
    if m and m.group(2):
        n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
        if n > 0:
            return "razor.kv_budget_bytes", n
    elif m and 0.0 < float(m.group(1)) <= 1.0:
        return "razor.kv_budget", float(m.group(1))
    raise ValueError(f"kv_budget must be a fraction of the full cache in (0, 1] or a size such as 96MiB or 1.5GiB, got {value!r}")


# llama.cpp's KV cache types (common/arg.cpp's kv_cache_types) and their ggml_type ids
KV_CACHE_TYPES = {"f32": 0, "f16": 1, "bf16": 30, "q8_0": 8, "q4_0": 2, "q4_1": 3, "iq4_nl": 20, "q5_0": 6, "q5_1": 7}


def parse_kv_type(name: str) -> int:
    """The ggml_type id of a KV cache type as llama.cpp's -ctk / -ctv name it ("q8_0" -> 8); ValueError otherwise."""
    t = KV_CACHE_TYPES.get(str(name).strip().lower())
    if t is None:
        raise ValueError(f"KV cache type must be one of {', '.join(KV_CACHE_TYPES)}, got {name!r}")
    return t


def razor_overrides(razor: bool | None = None, n_sink: int | None = None, window: int | None = None,
                    retrieval_ratio: float | None = None, compensation: bool | None = None,
                    kv_budget: float | str | None = None, layer_windows: bool | None = None,
                    pins: int | None = None) -> dict[str, Any]:
    """The kv_overrides that carry the razor options to the patched llama.cpp (SPEC section 2 keys).

    None leaves a setting to the model's razor.* metadata. kv_budget (see parse_kv_budget) sets the
    window for each context so the whole KV cache fits it; it cannot be combined with window. layer_windows=False
    gives every layer the same window, ignoring the per-layer allocation embed-heads may have stored. pins: tokens per
    sequence every local head keeps beside its window (razor.n_pin; needs the compensation row off: compensation=True
    without pins turns off the pins a model may have by default)."""
    out: dict[str, Any] = {}
    if kv_budget is not None:
        if window is not None:
            raise ValueError("kv_budget and window cannot both be set: the budget sets the window")
        key, val = parse_kv_budget(kv_budget)
        out[key] = val
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
        if compensation and pins is None:  # the row and a model's default pins (embed-heads --ratios) exclude each other
            out["razor.n_pin"] = 0
    if layer_windows is not None:
        out["razor.layer_windows"] = bool(layer_windows)
    if pins is not None:
        if int(pins) < 0:
            raise ValueError(f"pins must be >= 0, got {pins}")
        out["razor.n_pin"] = int(pins)
    return out
