"""`razor_gguf.Llama`: llama-cpp-python's `Llama`, running on the razor-patched libraries."""

from __future__ import annotations

from ._native import load_llama_cpp

_llama_cpp = load_llama_cpp()


class Llama(_llama_cpp.Llama):
    """Drop-in replacement for `llama_cpp.Llama` (same constructor, methods and streaming).

    The only difference so far is the library underneath: the patched llama.cpp build that
    ships with razor-gguf. With no razor head map in the model it behaves exactly like stock.
    """


__all__ = ["Llama"]
