#!/usr/bin/env python3
"""Write a random-weight GGUF of a real model's shape, with a razor head map, for speed and memory runs.

    tools/make_bench_model.py OUT.gguf [--shape llama3-8b|smollm2-135m|gemma3-SIZE-kv] [--retrieval-ratio 0.15]
        [--f16] [--n-ctx-train N] [--window 512] [--n-sink 4] [--retrieval-first]
        [--no-compensation]

Speed does not depend on the weights' values, so a twin written on the spot (seconds; Q4_0 blocks are drawn
directly, never as f32) stands in for a multi-GB download. Never commit the output. The retrieval heads are
drawn by a fixed seed, spread over layers as embed-heads' selection would leave them (never in a
sliding-window layer); --retrieval-first stores each layer's retrieval heads first, as `embed-heads
--reorder-heads` writes a real model (random weights need no renumbering); --no-compensation records the
compensation row off, as embed-heads does for a model the row does not help (SmolLM2), so the cache carries no
fold. The gemma3-*-kv shapes keep only Gemma 3's attention shape (layers, KV heads, head size, sliding window,
one global layer in six); embedding, FFN and vocabulary are shrunk, since KV bytes depend on nothing else:
`razor-gguf bench --kv-only` on them gives what razor saves at each Gemma 3 size.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from razor_gguf.testing.tiny_model import RazorMeta, TinyConfig, write_tiny_model  # noqa: E402

SHAPES = {
    # Llama-3-8B: 32 layers, 32 query / 8 KV heads of 128, FFN 14336, vocab 128256
    "llama3-8b": dict(n_layer=32, n_embd=4096, n_head=32, n_head_kv=8, head_dim=128, n_ff=14336, n_vocab=128256,
                      rope_base=500000.0),
    # SmolLM2-135M: 30 layers, 9 query / 3 KV heads of 64, FFN 1536, vocab 49152
    "smollm2-135m": dict(n_layer=30, n_embd=576, n_head=9, n_head_kv=3, head_dim=64, n_ff=1536, n_vocab=49152,
                         rope_base=100000.0),
}
# Gemma 3 (google/gemma-3-*-pt configs): layers, query / KV heads, head size, sliding window
_GEMMA3 = {"270m": (18, 4, 1, 256, 512), "1b": (26, 4, 1, 256, 512), "4b": (34, 8, 4, 256, 1024),
           "12b": (48, 16, 8, 256, 1024), "27b": (62, 32, 16, 128, 1024)}
for _size, (_l, _h, _kv, _d, _w) in _GEMMA3.items():
    SHAPES[f"gemma3-{_size}-kv"] = dict(arch="gemma3", n_layer=_l, n_embd=256, n_head=_h, n_head_kv=_kv, head_dim=_d,
                                        n_ff=256, n_vocab=TinyConfig().n_vocab, rope_base=1000000.0, n_swa=_w,
                                        swa_pattern=6)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--shape", choices=SHAPES, default="llama3-8b")
    ap.add_argument("--retrieval-ratio", type=float, default=0.15)
    ap.add_argument("--f16", action="store_true", help="f16 matrices instead of Q4_0")
    ap.add_argument("--n-ctx-train", type=int, default=131072)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--n-sink", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--retrieval-first", action="store_true", help="each layer's retrieval heads first")
    ap.add_argument("--no-compensation", action="store_true", help="razor.compensation = false (no fold)")
    a = ap.parse_args(argv)
    s = dict(SHAPES[a.shape])
    n_filler = s.pop("n_vocab") - TinyConfig().n_vocab
    cfg = TinyConfig(**s, n_filler=n_filler, n_ctx_train=a.n_ctx_train, seed=a.seed, f16=a.f16, q4_0=not a.f16,
                     qk_gain=1.0)
    n_kv = cfg.n_layer * cfg.n_head_kv
    eligible = np.flatnonzero(~np.repeat(cfg.swa_layers, cfg.n_head_kv))
    hm = np.zeros(n_kv, dtype=np.int32)
    n_retr = min(round(a.retrieval_ratio * n_kv), eligible.size)
    hm[np.random.default_rng(a.seed).choice(eligible, n_retr, replace=False)] = 1
    hm = hm.reshape(cfg.n_layer, cfg.n_head_kv)
    if a.retrieval_first:
        hm = -np.sort(-hm, axis=1)
    razor = RazorMeta(head_map=hm, n_sink=a.n_sink, window=a.window,
                      compensation=False if a.no_compensation else None)
    print(write_tiny_model(a.out, cfg, razor))
    return 0


if __name__ == "__main__":
    sys.exit(main())
