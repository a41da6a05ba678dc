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
        flash_attn=flash_attn, type_k=kwargs.pop("type_k", kv), type_v=kwargs.pop("type_v", kv),
        n_threads=kwargs.pop("n_threads", 2),
        verbose=kwargs.pop("verbose", False), **kwargs,
    )
    try:
        llm.eval(list(tokens))
        return np.array(llm.scores[: len(tokens)], dtype=np.float64)
    finally:
        llm.close()


def multi_seq_logits(
    path: str | os.PathLike[str],
    seqs: Sequence[Sequence[int]],
    unified: bool = False,
    flash_attn: bool = False,
    f32_kv: bool = True,
    n_ctx_seq: int = 256,
    chunk: int = 8,
    n_ubatch: int = 16,
    kv_overrides: dict | None = None,
    n_gpu_layers: int = 0,
) -> list[npt.NDArray[np.float64]]:
    """Logits of several sequences decoded side by side in one context (n_seq_max = len(seqs)):
    every llama_decode carries the next `chunk` tokens of each unfinished sequence, so ubatches
    hold several sequences (separate KV streams unless `unified`). Returns [len(seq), n_vocab] each."""
    import ctypes

    from razor_gguf import Llama

    llm = Llama(model_path=str(path), n_ctx=n_ctx_seq, verbose=False, kv_overrides=kv_overrides,
                n_gpu_layers=n_gpu_layers)
    import llama_cpp

    n = len(seqs)
    p = llama_cpp.llama_context_default_params()
    p.n_ctx = n_ctx_seq * n
    p.n_batch = chunk * n
    p.n_ubatch = n_ubatch
    p.n_seq_max = n
    p.kv_unified = unified
    p.n_threads = p.n_threads_batch = 2
    p.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    if f32_kv:
        p.type_k = p.type_v = GGML_TYPE_F32
    ctx = llama_cpp.llama_init_from_model(llm._model.model, p)
    if not ctx:
        llm.close()
        raise RuntimeError("llama_init_from_model failed")
    n_vocab = llm.n_vocab()
    out = [np.zeros((len(s), n_vocab)) for s in seqs]
    batch = llama_cpp.llama_batch_init(chunk * n, 0, n)
    try:
        for start in range(0, max(len(s) for s in seqs), chunk):
            rows = [(j, i) for j, s in enumerate(seqs) for i in range(start, min(start + chunk, len(s)))]
            for b, (j, i) in enumerate(rows):
                batch.token[b] = seqs[j][i]
                batch.pos[b] = i
                batch.n_seq_id[b] = 1
                batch.seq_id[b][0] = j
                batch.logits[b] = True
            batch.n_tokens = len(rows)
            rc = llama_cpp.llama_decode(ctx, batch)
            if rc != 0:
                raise RuntimeError(f"llama_decode failed: {rc}")
            for b, (j, i) in enumerate(rows):
                ptr = llama_cpp.llama_get_logits_ith(ctx, b)
                out[j][i] = np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(n_vocab,))
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)
        llm.close()
    return out
