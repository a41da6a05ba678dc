"""Per-layer windows (KV-Compress's variable compression rates, allocated per layer) chosen by the whole model's
output in the reference pass, against one uniform window at equal memory.

The retrieval heads keep every token; the local heads of layer l keep S sinks and W_l recent tokens, with
sum_l n_local(l) * W_l = W * sum_l n_local(l) (the uniform window's memory). Per-head-in-isolation choices did
not beat a uniform window on SmolLM2 (shared notes); an allocation measured end to end did (tools/layer_windows.py,
KLD ratio 0.81 at W 256). So:

Every KLD is taken over the positions from S + W/2 on, where the shortened layers start to evict.

1. sensitivity of each layer: the KLD against the full model when that layer alone drops to W/2;
2. allocations: the k least sensitive layers at W/2, the others at the window that keeps the memory equal, for k
   a few fractions of the layers with local heads; each whole allocation measured on the calibration chunks;
3. the best of them against the uniform window on validation chunks (other calibration text, never the
   evaluation's), with a paired block-bootstrap 95% interval of the KLD ratio, and on a retrieval probe:
   multi-needle prompts (RULER's form, razor_gguf.niah) in calibration prose, answered when the model's top-1
   token at every position of the number is the number's (teacher forcing: one pass per prompt). It is adopted
   (becomes the model's razor.layer_window_scale) only when the whole KLD interval lies below 1 and the probe
   answers at least as many prompts as with the uniform window.

The result is stored as scales W_l / W, so that a budget or window chosen at load time re-derives the windows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

FRACTIONS = (0.25, 0.5)  # of the layers with local heads, shortened to W/2
BLOCK = 128  # bootstrap block (positions), never across chunks
N_PROBES = 8  # retrieval-probe prompts (embed-heads)


@dataclass(frozen=True)
class LayerWindowMeasurement:
    window: int  # the uniform window the allocation is measured against (the memory both spend)
    scales: tuple[float, ...]  # [n_layer] the best allocation's W_l / window (1 for layers without local heads)
    n_short: int  # layers at window/2 in it
    adopted: bool  # it beat the uniform window on validation (KLD ratio's 95% interval below 1, probe not worse)
    kld_uniform: float  # validation next-token KLD against the full model
    kld_per_layer: float
    ratio: float  # kld_per_layer / kld_uniform
    ratio_95: tuple[float, float]
    top1_uniform: float
    top1_per_layer: float
    n_positions: int  # validation positions
    probe_uniform: int = 0  # retrieval-probe prompts answered
    probe_per_layer: int = 0
    n_probes: int = 0
    calib_kld: dict[int, float] = field(default_factory=dict)  # n_short -> calibration KLD (0 = uniform)
    sensitivity: dict[int, float] = field(default_factory=dict)  # layer -> calibration KLD increase at window/2


def allocation(n_local: Sequence[int], short: set[int], window: int) -> list[int]:
    """Windows per layer: the `short` layers at window // 2, the other layers with local heads at the longest
    window that keeps sum n_local * W_l within the uniform window's memory (layers without local heads: window)."""
    local = [l for l, n in enumerate(n_local) if n > 0]
    rest = [l for l in local if l not in short]
    w = [window] * len(n_local)
    if not rest:
        return w
    spare = window * sum(n_local[l] for l in local) - sum(n_local[l] * (window // 2) for l in short)
    w_hi = spare // sum(n_local[l] for l in rest)
    for l in short:
        w[l] = window // 2
    for l in rest:
        w[l] = int(w_hi)
    return w


def retrieval_probes(tokenize: Callable[[str, bool], Sequence[int]], n: int, n_tokens: int, seed: int = 0,
                     n_needles: int = 4, haystack: str | None = None) -> list[tuple[list[int], list[int]]]:
    """n multi-needle prompts (n_needles needles, the question naming one) of at most n_tokens tokens in the
    calibration prose (or `haystack`): (prompt tokens with BOS, answer tokens). tokenize(text, add_bos)."""
    from . import niah
    from .calibration import calibration_text

    hay = calibration_text() if haystack is None else haystack
    out = []
    for i in range(n):
        p = niah.multi_trial(lambda t: tokenize(t, True), hay, n_tokens - 8, n_needles, seed=seed * 1000 + i)
        out.append((list(tokenize(p.text, True)), list(tokenize(" " + p.answer, False))))
    return out


def measure_layer_windows(model, head_map: np.ndarray, calib: list[list[int]], valid: list[list[int]], *,
                          n_sink: int, window: int, compensation: bool, fractions: Sequence[float] = FRACTIONS,
                          probes: Sequence[tuple[list[int], list[int]]] = (),
                          progress: Callable[[], None] | None = None) -> LayerWindowMeasurement:
    """Sensitivity on calib[0], allocations on calib, the best against uniform on valid and on the retrieval
    probes (see the module)."""
    from .calibration import local_heads, razor_policy
    from .intervals import block_means, bootstrap_ratio
    from .kld import kl_and_top1

    hp = model.hp
    head_map = np.asarray(head_map).reshape(hp.n_layer, -1)
    n_local = local_heads(hp, head_map)
    local = [l for l in range(hp.n_layer) if n_local[l] > 0]
    # from the first position any allocation evicts at (its short layers at window/2): measured only past
    # n_sink + window, where the uniform window evicts too, an allocation looked better than it is (the short
    # layers' loss before that point went unseen; in llama.cpp at SmolLM2's 0.75 budget it doubled the KLD)
    lo = n_sink + window // 2
    if not local or any(len(t) <= lo + BLOCK for t in calib + valid):
        raise ValueError(f"layer windows: need local heads and chunks longer than {lo + BLOCK} tokens")
    fulls: dict[tuple[str, int], np.ndarray] = {}

    def run(tag, chunks, windows):
        kls, tops = [], []
        for ci, toks in enumerate(chunks):
            if (tag, ci) not in fulls:
                fulls[tag, ci] = model.forward(toks, want_logits="all", logits_from=lo).numpy()
            got = model.forward(toks, want_logits="all", logits_from=lo,
                                attention=razor_policy(hp, head_map, n_sink, windows, compensation)).numpy()
            kl, top1 = kl_and_top1(fulls[tag, ci], got)
            kls.append(kl)
            tops.append(top1)
            if progress:
                progress()
        return kls, tops

    def mean(parts):
        return float(np.concatenate(parts).mean())

    uniform = [window] * hp.n_layer
    uniform_calib = run("calib", calib, uniform)[0]
    base = float(uniform_calib[0].mean())  # the sensitivities are taken on calib[0] alone
    sensitivity = {}
    for l in local:
        w = list(uniform)
        w[l] = window // 2
        sensitivity[l] = mean(run("calib", calib[:1], w)[0]) - base
    order = sorted(local, key=lambda l: sensitivity[l])

    calib_kld = {0: mean(uniform_calib)}
    candidates = {}
    for frac in fractions:
        k = min(len(local) - 1, max(1, round(frac * len(local))))
        if k < 1 or k in candidates:
            continue
        candidates[k] = allocation(n_local, set(order[:k]), window)
        calib_kld[k] = mean(run("calib", calib, candidates[k])[0])
    if not candidates:
        raise ValueError("layer windows: a model with one layer of local heads has nothing to allocate")
    k_best = min(candidates, key=lambda k: calib_kld[k])
    best = candidates[k_best]

    ku, tu = run("valid", valid, uniform)
    kc, tc = run("valid", valid, best)

    def answered(windows):
        n = 0
        for prompt, answer in probes:
            toks = prompt + answer[:-1]
            logits = model.forward(toks, want_logits="all", logits_from=len(prompt) - 1,
                                   attention=razor_policy(hp, head_map, n_sink, windows, compensation)).numpy()
            n += bool((logits.argmax(axis=-1) == np.asarray(answer)).all())
            if progress:
                progress()
        return n

    pu, pc = answered(uniform), answered(best)
    num = np.concatenate([block_means(x, BLOCK) for x in kc])
    den = np.concatenate([block_means(x, BLOCK) for x in ku])
    sizes = np.concatenate([[len(x[i:i + BLOCK]) for i in range(0, len(x), BLOCK)] for x in ku])
    lo95, hi95 = bootstrap_ratio(num, den, weights=sizes)
    return LayerWindowMeasurement(
        window=window, scales=tuple(best[l] / window if n_local[l] else 1.0 for l in range(hp.n_layer)),
        n_short=k_best, adopted=hi95 < 1.0 and pc >= pu, kld_uniform=mean(ku), kld_per_layer=mean(kc),
        ratio=mean(kc) / mean(ku), ratio_95=(lo95, hi95), top1_uniform=mean(tu), top1_per_layer=mean(tc),
        n_positions=int(sum(len(x) for x in ku)), probe_uniform=pu, probe_per_layer=pc, n_probes=len(probes),
        calib_kld=calib_kld, sensitivity=sensitivity)


def passes(n_layers_local: int, n_calib: int, n_valid: int, fractions: Sequence[float] = FRACTIONS,
           n_probes: int = 0) -> int:
    """The razor passes measure_layer_windows reports to `progress` (one per chunk or probe run)."""
    return n_layers_local + n_calib * (1 + len(fractions)) + 2 * n_valid + 2 * n_probes
