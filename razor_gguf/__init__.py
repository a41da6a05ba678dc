"""razor-gguf: RazorAttention KV-cache compression for llama.cpp and GGUF models."""

__version__ = "0.1.0"

from . import _native  # noqa: E402

# llama-cpp-python binds its libllama once, on its first import. Bind it to the patched libraries
# now, so `import razor_gguf` followed by `import llama_cpp` (or `from llama_cpp import ...`) gets
# the razor build. Without usable libraries the package still imports: the CLI can report the
# problem, and `razor_gguf.Llama` raises the NativeLibraryError that says what to do.
try:
    _native.load_llama_cpp()
except _native.NativeLibraryError:
    pass


def __getattr__(name: str):
    if name == "Llama":
        from .llama import Llama

        return Llama
    raise AttributeError(f"module 'razor_gguf' has no attribute {name!r}")


__all__ = ["Llama", "__version__"]
