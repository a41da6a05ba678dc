#!/usr/bin/env python3
"""The longest context a model runs in a given amount of GPU memory, weights included, with the full cache
and with razor: what a user with a 12 GiB card can expect.

    tools/gpu_fit.py MODEL.gguf [--limit-gib 12] [--modes full,razor] [--probe 8192,32768]

GPU memory taken = the GPU's free memory (ggml_backend_dev_memory, as the CUDA backend reports it) before
loading the model minus after creating a context and decoding one token: weights, KV cache and compute
buffers. It grows linearly with the context, so two probe contexts give the line; the longest context on
it within the limit (a multiple of 256) is then loaded and measured, and stepped down until it fits.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from razor_gguf import _native  # noqa: E402

GIB = 1 << 30


@functools.lru_cache(maxsize=None)
def _ggml():
    """libggml (the backend registry), bound once."""
    lib = ctypes.CDLL(str(_native.lib_dir() / "libggml.so"))
    lib.ggml_backend_dev_count.restype = ctypes.c_size_t
    lib.ggml_backend_dev_get.restype = ctypes.c_void_p
    lib.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
    lib.ggml_backend_dev_type.restype = ctypes.c_int
    lib.ggml_backend_dev_type.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_dev_memory.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t),
                                            ctypes.POINTER(ctypes.c_size_t)]
    return lib


def gpu_free() -> int:
    """Free bytes of the first GPU device ggml knows."""
    lib = _ggml()
    for i in range(lib.ggml_backend_dev_count()):
        dev = lib.ggml_backend_dev_get(i)
        if lib.ggml_backend_dev_type(dev) == 1:  # GGML_BACKEND_DEVICE_TYPE_GPU
            free, total = ctypes.c_size_t(), ctypes.c_size_t()
            lib.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
            return free.value
    sys.exit("gpu_fit: no GPU device (build with -DGGML_CUDA=ON and run where a GPU is)")


def used_at(model: str, mode: str, n_ctx: int, args) -> tuple[int | None, dict | None]:
    """(GPU bytes taken by the model and a context of n_ctx, razor_stats) or (None, None) if it fails."""
    from razor_gguf.llama import Llama

    before = gpu_free()
    try:
        llm = Llama(model_path=model, n_ctx=n_ctx, n_batch=args.n_ubatch, n_ubatch=args.n_ubatch, n_gpu_layers=999,
                    flash_attn=True, verbose=False, razor=mode == "razor")
    except ValueError:
        return None, None
    try:
        llm.eval([1])
        return before - gpu_free(), llm.razor_stats()
    finally:
        llm.close()


def fit(model: str, mode: str, args) -> dict:
    limit = int(args.limit_gib * GIB)
    (c0, c1) = args.probe
    u0, _ = used_at(model, mode, c0, args)
    u1, _ = used_at(model, mode, c1, args)
    if u0 is None or u1 is None:
        return {"mode": mode, "error": "the probe contexts do not load"}
    slope = (u1 - u0) / (c1 - c0)
    n = int((limit - u0) / slope + c0) // 256 * 256
    n = min(n, args.max_ctx)
    tries = []
    while n >= 256:
        u, st = used_at(model, mode, n, args)
        tries.append({"n_ctx": n, "gpu_bytes": u})
        if u is not None and u <= limit:
            return {"mode": mode, "n_ctx": n, "gpu_bytes": u, "kv_bytes": st["kv_bytes"],
                    "bytes_per_token": slope, "fixed_bytes": u0 - slope * c0, "tries": tries}
        n = int(n * 0.95) // 256 * 256
    return {"mode": mode, "error": "nothing fits", "tries": tries}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("--limit-gib", type=float, default=12.0)
    ap.add_argument("--modes", default="full,razor")
    ap.add_argument("--probe", default="8192,32768", help="two contexts that load (comma-separated)")
    ap.add_argument("--n-ubatch", type=int, default=512)
    ap.add_argument("--max-ctx", type=int, default=1 << 21, help="stop the search here")
    args = ap.parse_args(argv)
    args.probe = [int(x) for x in args.probe.split(",")]
    out = {"model": pathlib.Path(args.model).name, "limit_gib": args.limit_gib, "n_ubatch": args.n_ubatch,
           "fits": [fit(args.model, m, args) for m in args.modes.split(",")]}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
