"""Run llama.cpp (through razor_gguf.Llama) on a token sequence and return all logits, and the
tolerances for comparing them with `tiny_forward.forward` (measured in tests/test_tiny_model.py).

F32_TOL: f32 weights, f32 KV cache, flash attention off: both sides compute in f32 (measured
    7.5e-6 / 9.4e-6 max abs diff for head dim 32 / 64 on logits of std ~1).
F16_TOL: f16 KV cache, flash attention (which casts K/V to f16 even from an f32 cache), or f16
    weights: f16 rounding amplified through 4 random layers (measured 7.6e-3 to 1.3e-2).
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np
import numpy.typing as npt

F32_TOL = 1e-4
F16_TOL = 4e-2
GGML_TYPE_F32 = 0  # ggml_type enum value, for Llama(type_k=..., type_v=...)


def llama_logits(
    path: str | os.PathLike[str],
    tokens: Sequence[int],
    flash_attn: bool = False,
    f32_kv: bool = True,
    n_ctx: int = 256,
    n_batch: int = 16,
    n_ubatch: int = 16,
    **kwargs: Any,
) -> npt.NDArray[np.float64]:
    """Logits [len(tokens), n_vocab] from one `eval` of the whole sequence (split by llama.cpp into
    ubatches of n_ubatch: see oracle.ubatch_slack for what a per-ubatch eviction lets queries see).
    Extra kwargs (e.g. kv_overrides for the razor knobs) go to the Llama constructor."""
    from razor_gguf import Llama  # loads the native libraries: only when actually running

    kv = GGML_TYPE_F32 if f32_kv else None
    llm = Llama(
        model_path=str(path), n_ctx=n_ctx, logits_all=True, n_batch=n_batch, n_ubatch=n_ubatch,
        flash_attn=flash_attn, type_k=kv, type_v=kv, n_threads=kwargs.pop("n_threads", 2),
        verbose=kwargs.pop("verbose", False), **kwargs,
    )
    try:
        llm.eval(list(tokens))
        return np.array(llm.scores[: len(tokens)], dtype=np.float64)
    finally:
        llm.close()
