#!/usr/bin/env python3
"""Dump every logit of a fixed set of runs (stock cache and razor settings) to an .npz, or compare two
dumps bitwise: the check that a refactor of the native code or the build left the outputs unchanged.

    RAZOR_GGUF_LIB_PATH=old/lib python tools/dump_logits.py MODEL.razor.gguf old.npz
    python tools/dump_logits.py MODEL.razor.gguf new.npz
    python tools/dump_logits.py --compare old.npz new.npz     # exit 1 unless every array is bitwise equal

MODEL needs razor.* keys (razor-gguf embed-heads). The runs use a window of 64 so tokens are evicted
and folded into the compensation rows well inside the 600-token prompt.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

N_TOKENS = 600
GGML_TYPE_F32, GGML_TYPE_Q8_0 = 0, 8
RAZOR = {"razor.enabled": True, "razor.n_sink": 4, "razor.window": 64}
RUNS = {
    "stock_f16": dict(kv_overrides={"razor.enabled": False}),
    "stock_f16_fa": dict(kv_overrides={"razor.enabled": False}, flash_attn=True),
    "razor_f16": dict(kv_overrides=RAZOR),
    "razor_f16_fa": dict(kv_overrides=RAZOR, flash_attn=True),
    "razor_f32": dict(kv_overrides=RAZOR, type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32),
    "razor_q8_0_fa": dict(kv_overrides=RAZOR, flash_attn=True, type_k=GGML_TYPE_Q8_0, type_v=GGML_TYPE_Q8_0),
    "razor_no_compensation": dict(kv_overrides={**RAZOR, "razor.compensation": False}),
    "razor_ubatch_7": dict(kv_overrides=RAZOR, n_ubatch=7, n_batch=7),
    "razor_ratio_0.3": dict(kv_overrides={**RAZOR, "razor.retrieval_ratio": 0.3}),
}


def dump(model: str, out: str) -> None:
    from razor_gguf import Llama, _native  # binds llama_cpp to the patched libraries

    rng = np.random.default_rng(0)
    tokens = [1] + [int(t) for t in rng.integers(100, 30000, N_TOKENS - 1)]
    arrays = {"tokens": np.array(tokens)}
    for name, kw in RUNS.items():
        kw = dict(kw)
        llm = Llama(model_path=model, n_ctx=1024, n_batch=kw.pop("n_batch", 64), n_ubatch=kw.pop("n_ubatch", 64),
                    n_threads=2, logits_all=True, verbose=False, **kw)
        try:
            llm.eval(tokens)
            arrays[name] = np.array(llm.scores[:N_TOKENS], dtype=np.float32)
            kv = _native.kv_bytes(llm.ctx)
            arrays[name + ".kv_bytes"] = np.array([kv.retrieval, kv.local, kv.compensation, kv.full_equiv])
            print(f"{name}: razor={kv.razor} KV {kv.total / 2**20:.2f} of {kv.full_equiv / 2**20:.2f} MiB",
                  file=sys.stderr)
        finally:
            llm.close()
    np.savez_compressed(out, **arrays)
    print(f"wrote {out} ({_native.lib_dir()})", file=sys.stderr)


def compare(a_path: str, b_path: str) -> int:
    a, b = np.load(a_path), np.load(b_path)
    bad = 0
    for k in sorted(set(a.files) | set(b.files)):
        if k not in a.files or k not in b.files:
            print(f"{k}: only in {'the first' if k in a.files else 'the second'} dump")
            bad += 1
            continue
        same = a[k].shape == b[k].shape and np.array_equal(a[k], b[k])
        diff = "" if same or a[k].shape != b[k].shape else f", max |diff| {np.abs(a[k] - b[k]).max():.3g}"
        print(f"{k}: {'bitwise equal' if same else 'DIFFERENT'}{diff}")
        bad += not same
    return 1 if bad else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--compare", action="store_true", help="compare two dumps instead")
    ap.add_argument("a", help="MODEL.gguf (or the first dump with --compare)")
    ap.add_argument("b", help="OUT.npz (or the second dump with --compare)")
    args = ap.parse_args()
    if args.compare:
        return compare(args.a, args.b)
    dump(args.a, args.b)
    return 0


if __name__ == "__main__":
    sys.exit(main())
