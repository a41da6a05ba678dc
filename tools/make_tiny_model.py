#!/usr/bin/env python3
"""Write a tiny synthetic llama GGUF (random weights, fixed seed) for exact numeric tests.

    .venv/bin/python tools/make_tiny_model.py OUT.gguf [--head-dim 64] [--f16] [--seed N]
        [--head-map 1,0,0,1,...] [--n-sink 4] [--window 64]

Larger shapes (--n-layer, --n-embd, --n-ff, --n-vocab, ...) give a random-weight twin of a real
model's architecture for speed measurements on machines that lack the real file.

--head-map (n_layer*n_head_kv comma-separated 0/1, layer-major) adds the razor.* keys.
The same file can be rebuilt in Python with razor_gguf.testing.tiny_model.write_tiny_model.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from razor_gguf.testing.tiny_model import RazorMeta, TinyConfig, write_tiny_model


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--n-layer", type=int, default=TinyConfig.n_layer)
    ap.add_argument("--n-head", type=int, default=TinyConfig.n_head)
    ap.add_argument("--n-head-kv", type=int, default=TinyConfig.n_head_kv)
    ap.add_argument("--head-dim", type=int, default=TinyConfig.head_dim)
    ap.add_argument("--n-embd", type=int, default=TinyConfig.n_embd)
    ap.add_argument("--n-ff", type=int, default=TinyConfig.n_ff)
    ap.add_argument("--n-ctx-train", type=int, default=TinyConfig.n_ctx_train)
    ap.add_argument("--n-vocab", type=int, default=TinyConfig().n_vocab,
                    help="vocab size, padded with plain filler tokens (at least the 259 byte-level ones)")
    ap.add_argument("--f16", action="store_true", help="f16 matrices (default f32)")
    ap.add_argument("--q4-0", action="store_true", help="random Q4_0 matrices, written block by block (speed runs)")
    ap.add_argument("--seed", type=int, default=TinyConfig.seed)
    ap.add_argument("--head-map", help="comma-separated 0/1 per (layer, kv head); writes razor.* keys")
    ap.add_argument("--n-sink", type=int, default=4)
    ap.add_argument("--window", type=int, default=64)
    a = ap.parse_args(argv)
    n_filler = a.n_vocab - TinyConfig().n_vocab
    if n_filler < 0:
        print(f"error: --n-vocab must be at least {TinyConfig().n_vocab}", file=sys.stderr)
        return 2
    cfg = TinyConfig(n_layer=a.n_layer, n_embd=a.n_embd, n_head=a.n_head, n_head_kv=a.n_head_kv, head_dim=a.head_dim,
                     n_ff=a.n_ff, n_ctx_train=a.n_ctx_train, f16=a.f16, seed=a.seed, n_filler=n_filler,
                     q4_0=a.q4_0)
    razor = None
    if a.head_map is not None:
        try:
            hm = np.array([int(x) for x in a.head_map.split(",")], dtype=np.int32).reshape(cfg.n_layer, cfg.n_head_kv)
        except ValueError:
            print(f"error: --head-map needs {cfg.n_layer * cfg.n_head_kv} comma-separated 0/1 values", file=sys.stderr)
            return 2
        razor = RazorMeta(head_map=hm, n_sink=a.n_sink, window=a.window)
    try:
        print(write_tiny_model(a.out, cfg, razor))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
