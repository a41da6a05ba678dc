"""razor-gguf: RazorAttention KV-cache compression for llama.cpp and GGUF models."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # Importing Llama loads the patched native libraries; keep `import razor_gguf` cheap.
    if name == "Llama":
        from .llama import Llama

        return Llama
    raise AttributeError(f"module 'razor_gguf' has no attribute {name!r}")


__all__ = ["Llama", "__version__"]
