#!/usr/bin/env python3
"""What `embed-heads --ratios` would decide on other calibration text, lengths and probes (the reference pass).

The measurement of razor_gguf.ratios (each candidate ratio against the selection's map at budget 0.35, 64 pins
where the row is off) on a model's stored scores, per cell: a calibration text (`pydoc`: the Python reference
manual embed-heads calibrates the row and the budget on; `docstrings`: prose from docstrings of stdlib modules the
evaluation never reads, razor_gguf.calibration.prose_text), a chunk length, and a probe (`mniah4`: 4 needles, the
question naming one; `needle1`: one needle). Each finished cell is appended to the JSON (`--out`), so a run
resumes; the wall time per cell is recorded.

    python tools/ratio_calibration.py MODEL.razor.gguf --out docs/results/ratio-calibration-smollm2.json \\
        --cell pydoc:2048:needle1 --cell docstrings:2048:mniah4 --cell pydoc:4096:mniah4
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

import razor_gguf  # noqa: E402,F401  (before llama_cpp)

SOURCES = ("pydoc", "docstrings")
PROBES = {"mniah4": 4, "needle1": 1}


def text(source: str) -> str:
    from razor_gguf.calibration import calibration_text, prose_text

    return calibration_text() if source == "pydoc" else prose_text()


def parse_cell(s: str) -> tuple[str, int, str]:
    try:
        source, length, probe = s.split(":")
        if source not in SOURCES or probe not in PROBES:
            raise ValueError
        return source, int(length), probe
    except ValueError:
        raise argparse.ArgumentTypeError(f"--cell SOURCE:LENGTH:PROBE with SOURCE in {SOURCES}, PROBE in "
                                         f"{tuple(PROBES)}, got {s!r}") from None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="a GGUF with razor.* keys (its stored scores and head map)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--cell", type=parse_cell, action="append", required=True)
    ap.add_argument("--chunks", type=int, default=2)
    ap.add_argument("--probes", type=int, default=8)
    ap.add_argument("--n-sink", type=int, default=4)
    ap.add_argument("--compensation", action="store_true", help="run with the row (and so without pins)")
    a = ap.parse_args()

    from razor_gguf import Llama
    from razor_gguf.calibration import calibration_chunks
    from razor_gguf.layer_windows import retrieval_probes
    from razor_gguf.metadata import open_gguf, read_razor
    from razor_gguf.ratios import measure_ratios
    from razor_gguf.reference import ReferenceModel

    info = read_razor(open_gguf(a.model))
    done = json.load(open(a.out)) if os.path.exists(a.out) else {"model": os.path.basename(a.model), "cells": []}
    model = ReferenceModel(a.model)
    tok = Llama(model_path=a.model, vocab_only=True, verbose=False)
    for source, length, probe in a.cell:
        key = dict(source=source, length=length, probe_kind=probe, chunks=a.chunks, probes=a.probes)
        if any(all(c.get(k) == v for k, v in key.items()) for c in done["cells"]):
            print(f"{key}: done already", file=sys.stderr)
            continue
        hay = text(source)
        try:
            chunks = calibration_chunks(lambda t: tok.tokenize(t.encode(), add_bos=True), a.chunks, length, hay)
        except ValueError as e:
            print(f"{source}: {e}", file=sys.stderr)
            return 2
        probes = retrieval_probes(lambda s, bos: tok.tokenize(s.encode(), add_bos=bos), a.probes, length,
                                  n_needles=PROBES[probe], haystack=hay)
        t0 = time.perf_counter()
        m = measure_ratios(model, np.array(info["echo_scores"]), np.array(info["induction_scores"]),
                           np.array(info["head_map"]), info["provenance"]["selection.echo_ratio"], chunks, probes,
                           n_sink=a.n_sink, compensation=a.compensation)
        cell = {**key, "seconds": round(time.perf_counter() - t0, 1),
                **{k: v for k, v in m.__dict__.items() if k != "head_map"}}
        done["cells"].append(cell)
        with open(a.out + ".tmp", "w") as f:
            json.dump(done, f, indent=1)
        os.replace(a.out + ".tmp", a.out)
        print(json.dumps({k: cell[k] for k in ("source", "length", "probe_kind", "seconds", "ratio", "pins_adopted",
                                               "kld", "kld_ratio_95", "probe", "probe_no_pins")}), flush=True)
    tok.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
