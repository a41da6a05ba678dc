"""`razor_gguf.Llama`: llama-cpp-python's `Llama`, running on the razor-patched libraries."""

from __future__ import annotations

import atexit
import ctypes
import re
import sys
from typing import Any, Sequence

from . import _native
from .overrides import razor_overrides
from .pins import PIN_QUERIES, select_pins

_llama_cpp = _native.load_llama_cpp()
from llama_cpp import _logger  # noqa: E402  (after the binding is bound to the patched libraries)

_GGML_LOG_LEVEL_WARN = 3  # enum ggml_log_level in the pinned ggml.h (DEBUG = 1, INFO = 2, WARN = 3, ERROR = 4)
_GGML_LOG_LEVEL_ERROR = 4

# ggml-rpc's line for a worker that stopped answering (patch 0005): from then on every call on it fails and
# llama_decode returns an error; the worker's buffers (its layers' weights and KV cache) are gone.
_RPC_LOST = re.compile(rb"RPC server (\S+) crashed, was stopped or is unreachable")
_lost_rpc_workers: set[str] = set()


@_llama_cpp.llama_log_callback
def _log_callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    """llama-cpp-python's log callback, plus a note of every RPC worker ggml-rpc reports lost (the line is
    an ERROR, which llama-cpp-python's level table drops when not verbose, so it is said here once)."""
    lost = _RPC_LOST.search(text) if level == _GGML_LOG_LEVEL_ERROR else None
    if lost and lost.group(1).decode() not in _lost_rpc_workers:
        _lost_rpc_workers.add(lost.group(1).decode())
        print(f"razor-gguf: RPC worker {lost.group(1).decode()} is lost (crashed, stopped or unreachable): the "
              "model must be loaded again once it answers", file=sys.stderr, flush=True)
    _logger.llama_log_callback(level, text, user_data)


_llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))
# llama-cpp-python's own callback back before this module is torn down: models freed at interpreter exit
# still log, and a freed ctypes callback would be a crash.
atexit.register(_llama_cpp.llama_log_set, _logger.llama_log_callback, ctypes.c_void_p(0))


def lost_rpc_workers() -> set[str]:
    """RPC workers ("HOST:PORT") ggml-rpc has reported lost since the last forget_lost_rpc_workers()."""
    return set(_lost_rpc_workers)


def forget_lost_rpc_workers() -> None:
    """Call once every model that used a lost worker is freed (a new load connects afresh)."""
    _lost_rpc_workers.clear()


class RazorUnavailableError(ValueError):
    """`razor=True` was asked for but the context runs the full (stock) KV cache."""


class RazorLogTap:
    """Collects llama.cpp's `razor:` warnings while a model and context are created.

    The patched library explains every fallback to the stock cache (no head map, an unsupported
    architecture, a window that covers the context, ...) in one WARN line, and a razor setting it cannot
    honour (a KV budget below the smallest cache) in one ERROR line before the load fails.
    llama-cpp-python drops those when verbose=False, so the wrapper listens in to repeat them to the
    user in one line. Everything else (and, when verbose, those lines too) goes on to
    llama-cpp-python's callback.
    """

    def __init__(self, verbose: bool = True) -> None:
        self._forward = _log_callback
        self.lines: list[str] = []
        self.errors: list[str] = []

        @_llama_cpp.llama_log_callback
        def tap(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
            if level in (_GGML_LOG_LEVEL_WARN, _GGML_LOG_LEVEL_ERROR) and b"razor:" in text:
                msg = text.decode("utf-8", "replace").strip()
                (self.lines if level == _GGML_LOG_LEVEL_WARN else self.errors).append(msg.split("razor: ", 1)[-1])
                if not verbose:
                    return
            self._forward(level, text, user_data)

        self._tap = tap  # keep the ctypes callback alive while llama.cpp holds it

    def __enter__(self) -> "RazorLogTap":
        _llama_cpp.llama_log_set(self._tap, ctypes.c_void_p(0))
        return self

    def __exit__(self, *exc) -> None:
        _llama_cpp.llama_log_set(self._forward, ctypes.c_void_p(0))


def has_head_map(llm) -> bool:
    """The model file carries a razor head map (written by `razor-gguf embed-heads`)."""
    return "razor.head_map" in llm.metadata or "razor.version" in llm.metadata


def razor_fallback_reason(llm, notes: list[str]) -> str | None:
    """Why a llama_cpp.Llama on the patched libraries runs the full cache (None: it runs razor).

    notes: the `razor:` warnings llama.cpp logged while the model and context were created."""
    if _native.kv_bytes(llm._ctx.ctx).razor:
        return None
    if not has_head_map(llm):
        return (f"{llm.model_path} has no razor head map: running the full KV cache "
                f"(run `razor-gguf embed-heads {llm.model_path} -o OUT.gguf` to add one)")
    if notes:
        return f"running the full KV cache: {notes[-1]}"
    if llm.metadata.get("razor.enabled") == "false":
        return "razor is disabled in the model's metadata (razor.enabled = false): running the full KV cache"
    return "running the full KV cache (every KV head is a retrieval head)"


def _model_budget(llm) -> float | None:
    """The model's own razor.kv_budget (embed-heads' measured default) when it is in effect: not when a window
    or a budget was given at load time."""
    ov = getattr(llm, "_razor_overrides", {})
    stored = llm.metadata.get("razor.kv_budget")
    if stored is None or {"razor.window", "razor.kv_budget", "razor.kv_budget_bytes"} & set(ov):
        return None
    return float(stored)


def razor_stats(llm, kv_budget: float | str | None = None) -> dict[str, Any]:
    """Allocated KV-cache bytes of a llama_cpp.Llama's context by part, the full-cache equivalent and the saving.

    Keys: razor (bool), retrieval_bytes, local_bytes, compensation_bytes, swa_bytes (the stock SWA cache of a
    sliding-window model's sliding-window layers, kept as it is), kv_bytes (their sum), full_equiv_bytes,
    kv_fraction (kv_bytes / full_equiv_bytes), saving (1 - kv_fraction), kv_budget
    (the budget asked for, as given, or the model's razor.kv_budget when no window was asked for; None
    without one), n_sink, window
    (what the budget bought: the window in effect; with per-layer windows the base they scale), layer_windows
    (each layer's window, 0 for layers without local heads), rings ([(window, bytes)] of the local rings), n_ubatch (tokens per ubatch the razor cache runs),
    compensation (the compensation row in effect: the option, else the model's measured default),
    retrieval_heads, kv_heads (None for n_sink..kv_heads when the full cache runs), pins (pinned tokens a
    prompt may hold, razor.n_pin; 0 without), pinned (the positions pinned for the prompt in
    the cache)."""
    kb = _native.kv_bytes(llm._ctx.ctx)
    sw = _native.window(llm._ctx.ctx)
    # the row's setting: razor_gguf.Llama's options or kv_overrides, else the model's measured default, else on
    comp = getattr(llm, "_razor_overrides", {}).get("razor.compensation")
    if comp is None:
        comp = llm.metadata.get("razor.compensation", "true") == "true"
    hm = _native.head_map(llm._ctx.ctx)
    return {
        "razor": kb.razor,
        "retrieval_bytes": kb.retrieval,
        "local_bytes": kb.local,
        "compensation_bytes": kb.compensation,
        "swa_bytes": kb.swa,
        "kv_bytes": kb.total,
        "full_equiv_bytes": kb.full_equiv,
        "kv_fraction": kb.total / kb.full_equiv if kb.full_equiv else None,
        "saving": kb.saving,
        "kv_budget": kv_budget if kv_budget is not None else _model_budget(llm),
        "n_sink": sw[0] if sw else None,
        "window": sw[1] if sw else None,
        "layer_windows": _native.layer_windows(llm._ctx.ctx),
        "rings": _native.ring_bytes(llm._ctx.ctx),
        "n_ubatch": _native.n_ubatch(llm._ctx.ctx),
        "compensation": bool(comp) if kb.razor else None,
        "retrieval_heads": sum(hm) if hm else None,
        "kv_heads": len(hm) if hm else None,
        "pins": _native.n_pin(llm._ctx.ctx),
        "pinned": list(getattr(llm, "_pins", ())),
    }


def _clear_memory(llm) -> None:
    llm.n_tokens = 0
    _llama_cpp.llama_cpp.llama_memory_clear(_llama_cpp.llama_cpp.llama_get_memory(llm._ctx.ctx), True)


class SwaPrefixCheck:
    """llama-server's check before it reuses a cached prefix, for a llama_cpp.Llama: a sliding-window model's
    SWA cache at window size (swa_full=False) no longer holds the positions older than its window, so a prefix
    cut short of what is cached may lack keys the next token attends to. llama-cpp-python reuses a prefix
    whenever seq_rm accepts the cut, which a stock SWA cache always does; here the prompt is read afresh
    instead, as llama-server does ("forcing full prompt re-processing due to lack of cache data")."""

    def eval(self, tokens: Sequence[int]) -> None:
        if self.n_tokens > 0 and self._swa_prefix_lost():
            tokens = [*self._input_ids[:self.n_tokens].tolist(), *tokens]
            _clear_memory(self)
        super().eval(tokens)

    def _swa_prefix_lost(self) -> bool:
        n_swa = _llama_cpp.llama_cpp.llama_model_n_swa(self._model.model)
        if n_swa <= 0:
            return False  # razor's own rings refuse a cut they cannot serve (seq_rm returns false)
        mem = _llama_cpp.llama_cpp.llama_get_memory(self._ctx.ctx)
        pos_min = _llama_cpp.llama_cpp.llama_memory_seq_pos_min(mem, 0)
        return pos_min < 0 or pos_min > max(0, self.n_tokens - n_swa)


class PinChoice:
    """Pin choice for a llama_cpp.Llama whose context pins tokens (razor.n_pin): a prompt evaluated from an
    empty cache, or over a cached prefix that ends before one of the last prompt's pins, is read once to choose
    its pins (razor_gguf.pins), then again with them; a continuation keeps them. razor_gguf.Llama has it;
    `razor-gguf serve` gives it to llama-cpp-python's server model (ServedLlama)."""

    _pins: Sequence[int] = ()  # the last prompt's pins (set by _choose_pins)

    def eval(self, tokens: Sequence[int]) -> None:
        if _native.n_pin(self._ctx.ctx) > 0 and (self.n_tokens == 0 or any(p >= self.n_tokens for p in self._pins)):
            # A new prompt, or one that replaces a pinned token of the last (the server reusing only a shared
            # system prompt): its pins are chosen from all of it.
            tokens = [*self._input_ids[:self.n_tokens].tolist(), *tokens]
            _clear_memory(self)
            self._choose_pins(tokens)
        super().eval(tokens)

    def _choose_pins(self, tokens: list[int]) -> None:
        """Reads a prompt that starts from an empty cache once to choose its pins (razor_gguf.pins), then clears
        the cache and pins them, so that eval() reads it again with them."""
        ctx = self._ctx.ctx
        n_sink, _ = _native.window(ctx)
        window = min(w for w in _native.layer_windows(ctx) if w > 0)
        n_obs = min(PIN_QUERIES, _native.n_ubatch(ctx), self.n_batch, len(tokens) - 1)
        end = len(tokens) - window  # the tokens that will have left every local window by the prompt's end
        self._pins = []
        _native.set_pins(ctx, [])
        if n_obs < 1 or end <= n_sink or not any(_native.head_map(ctx)):
            return
        super().eval(tokens[:-n_obs])
        _native.pin_capture(ctx, True)
        try:
            super().eval(tokens[-n_obs:])  # one ubatch: the record holds the last graph's queries
        finally:
            _native.pin_capture(ctx, False)
        scores = _native.pin_scores(ctx, len(tokens))
        self._pins = select_pins(scores, _native.n_pin(ctx), n_sink, end)
        _clear_memory(self)
        _native.set_pins(ctx, self._pins)

    @property
    def pinned(self) -> list[int]:
        """The positions pinned for the prompt in the cache (empty without pins)."""
        return list(self._pins)


def swa_full_default(model_path: str, kwargs: dict[str, Any]) -> None:
    """razor-gguf's default for llama-cpp-python's swa_full (see Llama): False for a model with a head map, unless
    given (kwargs is updated)."""
    if "swa_full" not in kwargs and _native.gguf_has_key(model_path, "razor.head_map", "razor.version"):
        kwargs["swa_full"] = False


class ServedLlama(SwaPrefixCheck, PinChoice, _llama_cpp.Llama):
    """llama-cpp-python's Llama as `razor-gguf serve` has its server load it: razor_gguf.Llama's swa_full default,
    prefix check and pin choice (the check first: a prompt it reads afresh chooses its pins again)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        swa_full_default(kwargs.get("model_path") or args[0], kwargs)
        super().__init__(*args, **kwargs)


class Llama(SwaPrefixCheck, PinChoice, _llama_cpp.Llama):
    """Drop-in replacement for `llama_cpp.Llama` (same constructor, methods and streaming) on the
    razor-patched llama.cpp.

    Razor options (all optional; None keeps what `razor-gguf embed-heads` stored in the model):
      razor: True requires the razor cache (RazorUnavailableError if the context cannot run it),
             False runs the full cache, None uses razor when the model has a head map.
      n_sink, window: sink tokens and recent window kept for the non-retrieval heads.
      retrieval_ratio: re-select this fraction of KV heads as retrieval heads from the stored scores.
      compensation: keep the compensation row (SPEC section 1); False keeps only sinks + window.
      kv_budget: the memory the whole KV cache may take, as a fraction of the full cache (0.35) or a
             size ("96MiB", "1.5GiB"): sets the window for this context (not together with window;
             retrieval heads always keep every token). A budget below the smallest razor cache of the
             context is a ValueError naming the smallest.
      layer_windows: False gives every layer the same window; None/True keeps the per-layer windows
             embed-heads stored (razor.layer_window_scale: `window` and the budget then set their mean).
      pins: tokens of each prompt every local head keeps beside its sinks and window (razor.n_pin; needs
             compensation=False; their rows come out of a budget like the window's). A prompt evaluated from
             an empty cache is then read twice: the first read records what the retrieval heads attend to from
             the prompt's last tokens (razor_gguf.pins), the second pins the tokens they attend to most.
    rpc_servers: llama.cpp RPC workers (`razor-gguf rpc-server`), ["HOST:PORT", ...] or "HOST:PORT,...",
             registered as devices before the model loads; layers offloaded with n_gpu_layers are split
             across them (and their KV cache, razor's included, lives there). A worker that does not answer
             is a ValueError (_native.RpcServerError). A worker lost later makes every call on the model a
             RuntimeError (llama_decode's error; lost_rpc_workers() names it): load the model again once it
             answers. The RPC protocol has no authentication.

    swa_full: llama-cpp-python's option, whose default (True) gives a sliding-window model's SWA layers a cache
             of the whole context. For a model with a head map the default here is False, as in llama-server:
             those layers keep their window plus one ubatch, and a kv_budget counts them at that size (with a
             full-size SWA cache a small budget cannot be met at all). A cached prefix the window-size cache can
             no longer serve is read afresh (SwaPrefixCheck). Models without a head map keep llama-cpp-python's
             default.

    A model without a head map runs the full cache, with a one-line notice on stderr.
    Prefix reuse across calls is llama-cpp-python's: when the razor cache cannot drop the old tail
    (its tokens were already folded into the compensation row), the prompt is evaluated afresh.
    """

    def __init__(self, model_path: str, *args: Any, razor: bool | None = None, n_sink: int | None = None,
                 window: int | None = None, retrieval_ratio: float | None = None,
                 compensation: bool | None = None, kv_budget: float | str | None = None,
                 layer_windows: bool | None = None, pins: int | None = None,
                 rpc_servers: str | list[str] | None = None, **kwargs: Any) -> None:
        if rpc_servers:
            _native.add_rpc_servers(rpc_servers)
        ours = razor_overrides(razor, n_sink, window, retrieval_ratio, compensation, kv_budget, layer_windows, pins)
        theirs = dict(kwargs.pop("kv_overrides", None) or {})
        clash = sorted(k for k in ours if k in theirs and theirs[k] != ours[k])
        if clash:
            raise ValueError(f"razor options contradict kv_overrides for {', '.join(clash)}")
        overrides = {**theirs, **ours}
        swa_full_default(model_path, kwargs)
        self._razor_budget = kv_budget
        self._razor_overrides = overrides
        with RazorLogTap(verbose=kwargs.get("verbose", True)) as tap:
            try:
                super().__init__(model_path, *args, kv_overrides=overrides or None, **kwargs)
            except ValueError:
                if tap.errors:  # the razor reason beats "Failed to create llama_context"
                    raise ValueError(tap.errors[-1]) from None
                raise
        self._razor_notes = tap.lines
        self._razor_check(overrides.get("razor.enabled"))

    def close(self) -> None:
        # Bad razor options raise before llama_cpp.Llama.__init__ has run; its __del__ still calls close().
        if hasattr(self, "_stack"):
            super().close()

    # -------------------------------------------------------------------------------------- razor

    @property
    def razor_active(self) -> bool:
        """The context runs the razor KV cache (False: the full, stock cache)."""
        return _native.kv_bytes(self._ctx.ctx).razor

    def _razor_check(self, razor: bool | None) -> None:
        if self.model_params.vocab_only:  # a tokenizer only: no context memory to check
            return
        why = None if razor is False else razor_fallback_reason(self, self._razor_notes)
        if why is None:
            return
        if razor:
            self.close()
            raise RazorUnavailableError(why)
        print(f"razor-gguf: {why}", file=sys.stderr, flush=True)

    def razor_stats(self) -> dict[str, Any]:
        """Allocated KV-cache bytes by part, the full-cache equivalent and the saving (see razor_stats())."""
        return razor_stats(self, self._razor_budget)


__all__ = ["Llama", "PinChoice", "ServedLlama", "SwaPrefixCheck", "RazorUnavailableError", "razor_fallback_reason", "razor_overrides", "razor_stats"]
