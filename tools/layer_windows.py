#!/usr/bin/env python3
"""Per-layer windows against one uniform window at equal memory, in the reference pass (razor_gguf.layer_windows:
the selection embed-heads --layer-windows runs), evaluated on held-out text.

    tools/layer_windows.py MODEL-razor.gguf [--window 256] [--tokens 2048] [--calib-chunks 2]
        [--eval-chunks 4] [--fractions 0.25,0.5] [--compensation] [--json OUT.json] [--write OUT.gguf]

Selection on the calibration text (pydoc_data.topics), judged on held-out text (stdlib docstrings,
razor_gguf.evaluation.kld_tokens: the KLD evaluation's text, never the calibration text): next-token KLD and
top-1 against the full model from position S + W/2 on (where the shortened layers start to evict), with a paired
block-bootstrap 95% interval of the KLD ratio. --write copies the model with the measured allocation as its razor.layer_window_scale (whether or not
it won: to run it in llama.cpp, e.g. tools/evidence.py's layer-windows plan).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from razor_gguf.calibration import calibration_chunks  # noqa: E402
from razor_gguf.layer_windows import measure_layer_windows, retrieval_probes  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--n-sink", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=2048, help="tokens per chunk")
    ap.add_argument("--calib-chunks", type=int, default=2)
    ap.add_argument("--eval-chunks", type=int, default=4)
    ap.add_argument("--fractions", default="0.25,0.5")
    ap.add_argument("--compensation", action="store_true", help="with the compensation row (default: without)")
    ap.add_argument("--probes", type=int, default=8, help="retrieval-probe prompts (multi-needle, calibration prose)")
    ap.add_argument("--json")
    ap.add_argument("--write", metavar="OUT.gguf")
    a = ap.parse_args(argv)

    from gguf import GGUFReader

    from razor_gguf import Llama
    from razor_gguf.evaluation import kld_tokens
    from razor_gguf.reference import ReferenceModel

    tok = Llama(model_path=a.model, vocab_only=True, verbose=False)
    calib = calibration_chunks(lambda s: tok.tokenize(s.encode(), add_bos=True), a.calib_chunks, a.tokens)
    held = kld_tokens(tok, a.tokens * a.eval_chunks)
    held = [held[i * a.tokens:(i + 1) * a.tokens] for i in range(a.eval_chunks)]
    probes = retrieval_probes(lambda s, bos: tok.tokenize(s.encode(), add_bos=bos), a.probes, a.tokens)
    tok.close()

    f = GGUFReader(a.model).get_field("razor.head_map")
    if f is None:
        sys.exit(f"{a.model}: no razor.head_map (run razor-gguf embed-heads)")
    m = ReferenceModel(a.model)
    hm = np.asarray(f.contents(), dtype=np.int64).reshape(m.hp.n_layer, m.hp.n_head_kv)
    t0 = time.perf_counter()
    n = [0]

    def tick():
        n[0] += 1
        print(f"  pass {n[0]} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)

    r = measure_layer_windows(m, hm, calib, held, n_sink=a.n_sink, window=a.window, compensation=a.compensation,
                              fractions=[float(x) for x in a.fractions.split(",")], probes=probes, progress=tick)
    windows = [round(s * a.window) for s in r.scales]
    out = {
        "model": pathlib.Path(a.model).name, "n_sink": a.n_sink, "window": a.window, "compensation": a.compensation,
        "tokens_per_chunk": a.tokens,
        "calibration": {"source": "pydoc_data.topics", "chunks": a.calib_chunks},
        "held_out": {"source": "stdlib docstrings (razor_gguf.evaluation.kld_tokens)", "chunks": a.eval_chunks,
                     "positions": r.n_positions},
        "sensitivity": {str(l): v for l, v in r.sensitivity.items()},
        "calib_kld": {str(k): v for k, v in r.calib_kld.items()}, "n_short": r.n_short, "windows": windows,
        "memory_check": [int(sum((1 - hm[l]).sum() * w for l, w in enumerate(windows))),
                         int((1 - hm).sum() * a.window)],
        "held_out_kld": {"uniform": r.kld_uniform, "per_layer": r.kld_per_layer, "ratio": r.ratio,
                         "ratio_95": list(r.ratio_95)},
        "held_out_top1": {"uniform": r.top1_uniform, "per_layer": r.top1_per_layer},
        "retrieval_probe": {"uniform": r.probe_uniform, "per_layer": r.probe_per_layer, "n": r.n_probes,
                            "source": "multi-needle (4 needles) in pydoc_data.topics prose, teacher-forced"},
        "adopted": r.adopted, "seconds": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(out["held_out_kld"]), json.dumps(out["held_out_top1"]), file=sys.stderr)
    if a.json:
        pathlib.Path(a.json).write_text(json.dumps(out, indent=1))
    else:
        print(json.dumps(out, indent=1))
    if a.write:
        from razor_gguf.metadata import layer_windows_kv, open_gguf, razor_kv_of, write_with_razor

        reader = open_gguf(a.model)
        write_with_razor(reader, a.write, {**razor_kv_of(reader), **layer_windows_kv(r, adopt=True)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
