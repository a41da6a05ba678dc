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


class RawContext:
    """A llama_context made through the C API on a razor_gguf.Llama's model, for what the Llama wrapper
    does not expose: several sequences per batch, seq_cp/seq_keep/seq_rm on any sequence.
    Use as a context manager; `decode` returns copies of the logits of every item."""

    def __init__(self, path: str | os.PathLike[str], *, n_ctx: int, n_batch: int, n_ubatch: int,
                 n_seq_max: int = 1, unified: bool = False, flash_attn: bool = False, f32_kv: bool = True,
                 kv_overrides: dict | None = None, n_gpu_layers: int = 0, kv_type: int | None = None) -> None:
        from razor_gguf import Llama  # binds llama_cpp to the patched libraries: before importing it

        import llama_cpp

        self._lib = llama_cpp
        # the host's own context is never used: small, so that razor runs there too (no fallback notice)
        self.host = Llama(model_path=str(path), n_ctx=256, n_batch=16, n_ubatch=16, verbose=False,
                          kv_overrides=kv_overrides, n_gpu_layers=n_gpu_layers)
        p = llama_cpp.llama_context_default_params()
        p.n_ctx, p.n_batch, p.n_ubatch, p.n_seq_max, p.kv_unified = n_ctx, n_batch, n_ubatch, n_seq_max, unified
        p.n_threads = p.n_threads_batch = 2
        p.flash_attn_type = (llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn
                             else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        if kv_type is not None:  # a ggml_type for both K and V (f32_kv ignored)
            p.type_k = p.type_v = kv_type
        elif f32_kv:
            p.type_k = p.type_v = GGML_TYPE_F32
        self.ctx = llama_cpp.llama_init_from_model(self.host._model.model, p)
        if not self.ctx:
            self.host.close()
            raise RuntimeError("llama_init_from_model failed")
        self.batch = llama_cpp.llama_batch_init(n_batch, 0, n_seq_max)
        self.n_vocab = self.host.n_vocab()

    def seq_cp(self, src: int, dst: int, p0: int = -1, p1: int = -1) -> None:
        self._lib.llama_memory_seq_cp(self._lib.llama_get_memory(self.ctx), src, dst, p0, p1)

    def seq_keep(self, seq: int) -> None:
        self._lib.llama_memory_seq_keep(self._lib.llama_get_memory(self.ctx), seq)

    def seq_rm(self, seq: int, p0: int = -1, p1: int = -1) -> bool:
        return bool(self._lib.llama_memory_seq_rm(self._lib.llama_get_memory(self.ctx), seq, p0, p1))

    def decode(self, items: Sequence[tuple[int, int, int]]) -> list[npt.NDArray[np.float32]]:
        """One llama_decode of (token, position, sequence) items; the logits of each."""
        import ctypes

        b = self.batch
        for k, (tok, pos, seq) in enumerate(items):
            b.token[k], b.pos[k], b.n_seq_id[k], b.logits[k] = int(tok), pos, 1, True
            b.seq_id[k][0] = seq
        b.n_tokens = len(items)
        rc = self._lib.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed: {rc}")
        return [np.ctypeslib.as_array(ctypes.cast(self._lib.llama_get_logits_ith(self.ctx, k),
                                                  ctypes.POINTER(ctypes.c_float)), shape=(self.n_vocab,)).copy()
                for k in range(len(items))]

    def close(self) -> None:
        self._lib.llama_batch_free(self.batch)
        self._lib.llama_free(self.ctx)
        self.host.close()

    def __enter__(self) -> "RawContext":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


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
    n = len(seqs)
    with RawContext(path, n_ctx=n_ctx_seq * n, n_batch=chunk * n, n_ubatch=n_ubatch, n_seq_max=n, unified=unified,
                    flash_attn=flash_attn, f32_kv=f32_kv, kv_overrides=kv_overrides, n_gpu_layers=n_gpu_layers) as rc:
        out = [np.zeros((len(s), rc.n_vocab)) for s in seqs]
        for start in range(0, max(len(s) for s in seqs), chunk):
            rows = [(j, i) for j, s in enumerate(seqs) for i in range(start, min(start + chunk, len(s)))]
            for (j, i), logits in zip(rows, rc.decode([(seqs[j][i], i, j) for j, i in rows])):
                out[j][i] = logits
    return out
