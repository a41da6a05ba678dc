#!/usr/bin/env python3
"""Per-layer window lengths against one uniform window at equal memory, in the reference pass (issue: one KV
budget, per-head KV lengths). Decides whether several ring lengths in the C++ cache would pay on a model.

    tools/layer_windows.py MODEL-razor.gguf [--window 256] [--tokens 2048] [--calib-chunks 2]
        [--eval-chunks 4] [--fractions 0.25,0.5,0.75] [--json OUT.json]

The retrieval heads of the model's map keep every token; the local heads of layer l keep S sinks and W_l recent
tokens, no compensation row (SmolLM2's measured default). Memory: sum over layers of n_local(l) * W_l equals the
uniform policy's W * sum n_local(l). Everything is judged on the whole model's next-token output (KLD against
the full model over the positions past S + W), never on a per-head proxy:

1. sensitivity of each layer, end to end: the KLD when that layer alone drops to W/2 (calibration text);
2. allocations: the k least sensitive layers at W/2, the others at the longer window that keeps the memory
   equal, for k = each fraction of the layers with local heads; each whole allocation measured on the
   calibration text; the best (or uniform, if none beats it) is chosen there;
3. the best per-layer allocation on the calibration text (whether or not it beat uniform there) against
   uniform on held-out text (stdlib docstrings, never the calibration text:
   pydoc_data.topics), with a paired block-bootstrap 95% interval of the KLD ratio and top-1 agreement.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from razor_gguf.calibration import calibration_chunks, razor_attention_torch  # noqa: E402
from razor_gguf.intervals import block_means, bootstrap_ratio  # noqa: E402
from razor_gguf.kld import kl_and_top1  # noqa: E402

BLOCK = 256  # bootstrap block (positions)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--n-sink", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=2048, help="tokens per chunk")
    ap.add_argument("--calib-chunks", type=int, default=2)
    ap.add_argument("--eval-chunks", type=int, default=4)
    ap.add_argument("--fractions", default="0.25,0.5,0.75")
    ap.add_argument("--json")
    a = ap.parse_args(argv)

    from razor_gguf import Llama
    from razor_gguf.evaluation import kld_tokens
    from razor_gguf.reference import ReferenceModel

    tok = Llama(model_path=a.model, vocab_only=True, verbose=False)
    calib = calibration_chunks(lambda s: tok.tokenize(s.encode(), add_bos=True), a.calib_chunks, a.tokens)
    held = kld_tokens(tok, a.tokens * a.eval_chunks)
    held = [held[i * a.tokens:(i + 1) * a.tokens] for i in range(a.eval_chunks)]
    tok.close()

    m = ReferenceModel(a.model)
    hp = m.hp
    from gguf import GGUFReader

    f = GGUFReader(a.model).get_field("razor.head_map")
    if f is None:
        sys.exit(f"{a.model}: no razor.head_map (run razor-gguf embed-heads)")
    hm = np.asarray(f.contents(), dtype=np.int64).reshape(hp.n_layer, hp.n_head_kv)
    n_loc = (1 - hm).sum(axis=1)
    local_layers = [l for l in range(hp.n_layer) if n_loc[l] > 0]
    S, W, lo = a.n_sink, a.window, a.n_sink + a.window
    t0 = time.perf_counter()
    fulls: dict[int, np.ndarray] = {}

    def run(chunks, windows, tag):
        """Per-position KLD and top-1 against the full model over positions >= S + W, all chunks."""
        kls, tops = [], []
        for ci, toks in enumerate(chunks):
            key = (tag, ci)
            if key not in fulls:
                fulls[key] = m.forward(toks, want_logits="all", logits_from=lo).numpy()

            def attention(il, q, k, v):
                return razor_attention_torch(q, k, v, hm[il], S, int(windows[il]), compensation=False)

            got = m.forward(toks, want_logits="all", attention=attention, logits_from=lo).numpy()
            kl, top1 = kl_and_top1(fulls[key], got)
            kls.append(kl)
            tops.append(top1)
        return np.concatenate(kls), np.concatenate(tops)

    def memory(windows):
        return int(sum(n_loc[l] * windows[l] for l in local_layers))

    uniform = np.full(hp.n_layer, W)
    budget = memory(uniform)
    base_kl, _ = run(calib, uniform, "calib")
    base = float(base_kl.mean())
    print(f"uniform W={W}: calibration KLD {base:.5f} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)

    sens = {}
    for l in local_layers:
        w = uniform.copy()
        w[l] = W // 2
        kl, _ = run(calib, w, "calib")
        sens[l] = float(kl.mean()) - base
        print(f"  layer {l:2d} at W/2: dKLD {sens[l]:+.5f}", file=sys.stderr)
    order = sorted(local_layers, key=lambda l: sens[l])

    candidates = [{"k": 0, "windows": uniform.tolist(), "calib_kld": base}]
    for frac in (float(x) for x in a.fractions.split(",")):
        k = max(1, round(frac * len(local_layers)))
        short = set(order[:k])
        rest = [l for l in local_layers if l not in short]
        if not rest:
            continue
        spare = budget - sum(n_loc[l] * (W // 2) for l in short)
        w_hi = spare // sum(n_loc[l] for l in rest)  # floor: never above the uniform memory
        w = uniform.copy()
        for l in short:
            w[l] = W // 2
        for l in rest:
            w[l] = w_hi
        kl, _ = run(calib, w, "calib")
        candidates.append({"k": k, "w_lo": W // 2, "w_hi": int(w_hi), "short_layers": sorted(short),
                           "windows": w.tolist(), "memory": memory(w), "calib_kld": float(kl.mean())})
        print(f"allocation k={k}: W {W // 2}/{w_hi}, memory {memory(w)}/{budget}, calibration KLD "
              f"{kl.mean():.5f}", file=sys.stderr)
    best = min(candidates, key=lambda c: c["calib_kld"])
    per_layer = min(candidates[1:], key=lambda c: c["calib_kld"])

    res_eval = {}
    for name, windows in (("uniform", uniform), ("per_layer", np.asarray(per_layer["windows"]))):
        kl, top1 = run(held, windows, "held")
        res_eval[name] = (kl, top1)
    ku, tu = res_eval["uniform"]
    kc, tc = res_eval["per_layer"]
    num, den = block_means(kc, BLOCK), block_means(ku, BLOCK)
    sizes = np.array([len(ku[i:i + BLOCK]) for i in range(0, len(ku), BLOCK)])
    ci = bootstrap_ratio(num, den, weights=sizes)
    out = {
        "model": pathlib.Path(a.model).name, "n_sink": S, "window": W, "tokens_per_chunk": a.tokens,
        "calibration": {"source": "pydoc_data.topics", "chunks": a.calib_chunks, "positions": int(len(base_kl))},
        "held_out": {"source": "stdlib docstrings (razor_gguf.evaluation.kld_tokens)", "chunks": a.eval_chunks,
                     "positions": int(len(ku))},
        "memory_uniform": budget, "sensitivity": {str(l): sens[l] for l in local_layers},
        "candidates": candidates, "chosen_on_calibration_k": best["k"], "held_out_k": per_layer["k"],
        "held_out_kld": {"uniform": float(ku.mean()), "per_layer": float(kc.mean()),
                         "ratio": float(kc.mean() / ku.mean()), "ratio_95": list(ci)},
        "held_out_top1": {"uniform": float(tu.mean()), "per_layer": float(tc.mean())},
        "seconds": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(out["held_out_kld"]), json.dumps(out["held_out_top1"]),
          f"best on calibration: k={best['k']}, held out: k={per_layer['k']}", file=sys.stderr)
    if a.json:
        pathlib.Path(a.json).write_text(json.dumps(out, indent=1))
    else:
        print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
