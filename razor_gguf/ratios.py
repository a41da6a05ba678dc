"""The retrieval ratio measured per model in the reference pass (`embed-heads --ratios`).

At a fixed KV budget every retrieval head costs the local heads window: fewer retrieval heads buy a longer window,
which running prose wants, while a needle far back in the prompt wants heads that keep every token. On SmolLM2 at
budget 0.35, 5% of the KV heads as retrieval heads beat the paper's 15% on next-token KLD at 4k and 8k tokens, and
with 64 pinned tokens (chosen by those heads' attention, razor.n_pin) kept the passkey the full cache keeps. So the
ratio is measured on the model, not assumed:

1. each candidate ratio re-selects the heads from the stored scores as llama.cpp's razor.retrieval_ratio override
   does (the top ratio - echo_ratio by induction score, union the top echo_ratio by echo score), and gets the window
   that fills RATIO_BUDGET of the full cache at the calibration length, less n_pin rows for the pins;
2. next-token KLD against the full model on calibration chunks (razor_gguf.calibration), every candidate over the
   same positions: from the first one the candidate with the most retrieval heads evicts (each chunk read as one
   prompt: its pins chosen from a first read, then read again with them);
3. a retrieval probe: N_PROBES single-needle prompts in calibration prose (razor_gguf.layer_windows.retrieval_probes),
   answered when the model's top-1 token at every position of the number is the number's (teacher forcing), pins
   chosen from the prompt as razor_gguf.Llama chooses them; the full model's answers are the probe's ceiling. (A
   probe of 8 four-needle prompts, the first version, was mostly the model's own limit: on SmolLM2 at 2048 tokens
   it could not tell 2 answers from 3; 16 single needles separate the ratios: docs/results/ratio-calibration-*);
4. the stored map's ratio (the selection's, 15% by default) is replaced by the candidate with the lowest KLD whose
   KLD ratio against it has its whole paired block-bootstrap 95% interval below 1 and whose probe answers at least
   as many prompts.

Where the stored map leaves no local head (a sliding-window model such as Gemma 3, whose few global-layer heads the
selection makes all retrieval heads: razor then runs the stock cache), there is no equal-memory comparison to make:
the stored map is the full model. Every candidate that leaves a local head then runs at the recorded window (less the
pins), and the one with the fewest retrieval heads that gives the full model's answer to every probe (its top-1 at
every position of the number, right or wrong: the probe's `probe` counts agreement there) and keeps the full model's
next token on TOP1_TARGET of the positions replaces it (`against_full`; the KLD interval is then the candidate's
own, not a ratio).

Pins need the compensation row off; where the measured row is on, every candidate runs without pins and the pins
stay off. Where it is off, the stored map is also probed without pins: the pins become the model's default
(razor.n_pin) only where they lose no probe. They are the default of razor-gguf's doors, which read each prompt
twice to choose them; llama.cpp's own tools, which read a prompt once, keep the n_pin rows empty.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

RATIOS = (0.05, 0.1)  # candidates below the selection's own ratio (which is always measured too)
RATIO_BUDGET = 0.35  # the KV fraction the ratios are compared at (the quality targets' budget)
N_PIN = 64
N_PROBES = 16
PROBE_NEEDLES = 1  # one needle: the full model answers nearly every probe, so a miss is the cache's
BLOCK = 128  # bootstrap block (positions), never across chunks


@dataclass(frozen=True)
class RatioMeasurement:
    ratio: float  # the adopted ratio (the stored map's own when nothing beat it)
    head_map: np.ndarray  # its map [n_layer, n_head_kv]: the candidate's selection, or the stored map
    adopted: bool  # a candidate replaced the stored map
    n_pin: int  # the pins every candidate ran with (0: none); the model's default only where pins_adopted
    pins_adopted: bool  # the stored map's probe with pins answered at least as many prompts as without
    budget: float
    context: int  # tokens per chunk and probe: the context the budget is a fraction of
    ratios: tuple[float, ...]  # every measured ratio (the stored map's last), with for each:
    retrieval_heads: tuple[int, ...]
    windows: tuple[int, ...]
    kld: tuple[float, ...]
    kld_no_pins: tuple[float, ...] | None  # the same maps' first reads, without pins (None where no pins ran)
    top1: tuple[float, ...]
    kld_ratio_95: tuple[tuple[float, float], ...]  # KLD against the stored map's, paired block bootstrap
    # (against_full: each map's own KLD, block bootstrap; the stored map's (0, 0))
    probe: tuple[int, ...]  # probe prompts answered (against_full: answered as the full model answers them)
    n_probes: int
    probe_no_pins: int  # the stored map's probe without pins (= probe[-1] when n_pin is 0); against_full: the adopted
    # map's
    probe_full: int  # the full model's answers: the probe's ceiling (a miss it shares is the model's, not the cache's)
    n_positions: int
    against_full: bool = False  # the stored map left no local head: candidates held to the full model (above)


def selection_ratios(ratio: float, echo_ratio: float) -> tuple[float, float]:
    """(induction_ratio, echo_ratio) that select `ratio` of the KV heads as llama.cpp's razor.retrieval_ratio
    override does: the echo share capped at the ratio, induction the rest."""
    e = min(echo_ratio, ratio)
    return max(0.0, ratio - e), e


def select_ratio(echo: np.ndarray, induction: np.ndarray, ratio: float, echo_ratio: float,
                 local_layers: Sequence[bool] | None = None) -> np.ndarray:
    """The head map llama.cpp selects for a razor.retrieval_ratio override: the top (ratio - echo_ratio) of KV
    heads by induction score, union the top min(echo_ratio, ratio) by echo score."""
    from .scoring import select_heads

    return select_heads(echo, induction, *selection_ratios(ratio, echo_ratio),
                        list(local_layers) if local_layers else None)


def candidates(scores_ratio: float, ratios: Sequence[float] = RATIOS) -> list[float]:
    """The ratios measured: those of `ratios` below the stored map's, then the stored map's."""
    return sorted({r for r in ratios if 0 < r < scores_ratio - 1e-9}) + [scores_ratio]


def candidate_maps(hp, echo: np.ndarray, induction: np.ndarray, head_map: np.ndarray, echo_ratio: float,
                   ratios: Sequence[float] = RATIOS) -> tuple[list[float], list[np.ndarray]]:
    """(ratios, head maps) measure_ratios measures, the stored map last: each candidate ratio's selection, the first
    ratio of each distinct map only, and none equal to the stored map (a sliding-window model's few global heads
    make several ratios select the same heads)."""
    from .calibration import swa_layers

    head_map = np.asarray(head_map).reshape(hp.n_layer, -1)
    swa = swa_layers(hp)
    rs, maps = [], []
    for r in candidates(float(head_map.sum() / head_map.size), ratios)[:-1]:
        m = select_ratio(echo, induction, r, echo_ratio, swa if any(swa) else None)
        if not any((m == x).all() for x in (*maps, head_map)):
            rs.append(r)
            maps.append(m)
    return rs + [float(head_map.sum() / head_map.size)], maps + [head_map]


def measure_ratios(model, echo: np.ndarray, induction: np.ndarray, head_map: np.ndarray, echo_ratio: float,
                   chunks: list[list[int]], probes: Sequence[tuple[list[int], list[int]]], *, n_sink: int,
                   compensation: bool, ratios: Sequence[float] = RATIOS, budget: float = RATIO_BUDGET,
                   n_pin: int = N_PIN, window: int | None = None,
                   progress: Callable[[], None] | None = None) -> RatioMeasurement:
    """The module's measurement. head_map: the stored map (the selection's), measured last; chunks and probes of
    at most the calibration length (the shortest chunk sets the context). window: the recorded window, which the
    candidates run at where the stored map leaves no local head (against_full; without it that is an error)."""
    from .calibration import TOP1_TARGET, local_heads, pinned_reads, razor_policy, swa_layers, window_for_budget
    from .intervals import block_means, bootstrap_ratio
    from .kld import kl_and_top1

    hp = model.hp
    head_map = np.asarray(head_map).reshape(hp.n_layer, -1)
    swa = swa_layers(hp)
    n_pin = 0 if compensation else int(n_pin)
    rs, maps = candidate_maps(hp, echo, induction, head_map, echo_ratio, ratios)
    n_tok = min(len(t) for t in chunks)
    against_full = sum(local_heads(hp, head_map)) == 0
    if against_full:
        if window is None or window - n_pin < 1 or len(maps) == 1:
            raise ValueError("retrieval ratios: the stored map leaves no local head"
                             + ("" if len(maps) > 1 else " and no smaller ratio selects other heads"))
        # the stored map is the full model: never read, every candidate at the recorded window less the pins
        windows = [window - n_pin] * (len(maps) - 1) + [n_tok - n_sink]
        budget = 0.0
    else:
        windows = []
        for hm in maps:
            w = window_for_budget(budget, hm, n_tok, n_sink, [not s for s in swa])
            windows.append(None if w is None else w - n_pin)
        if windows[-1] is None or windows[-1] < 1:
            raise ValueError(f"retrieval ratios: the stored map's retrieval heads alone exceed a budget of {budget}")
    keep = [i for i, w in enumerate(windows) if w is not None and w >= 1]
    base = keep[-1]
    reads = keep[:-1] if against_full else keep  # the maps read (the stock cache is the full model's own read)
    lo = n_sink + min(windows[i] for i in reads)  # where the most retrieval heads (the shortest window) start to evict
    if n_tok <= lo + BLOCK:
        raise ValueError(f"retrieval ratios: calibration chunks of {n_tok} tokens evict too little "
                         f"{'at window ' + str(window) if against_full else 'at budget ' + str(budget)}")

    def tick(n):
        for _ in range(n if progress else 0):
            progress()

    def read(i, toks, n_prompt, logits_from):
        """Map i's logits with its pins (the prompt read twice), and without them where pins run (else None)."""
        if n_pin:
            without, pinned, _ = pinned_reads(model, toks, maps[i], n_sink=n_sink, window=windows[i], n_pin=n_pin,
                                              n_prompt=n_prompt, logits_from=logits_from)
            tick(2)
            return pinned, without
        got = model.forward(toks, want_logits="all", logits_from=logits_from,
                            attention=razor_policy(hp, maps[i], n_sink, windows[i], compensation)).numpy()
        tick(1)
        return got, None

    kl = {i: [] for i in keep}
    t1 = {i: [] for i in keep}
    kl_first = {i: [] for i in keep}
    for toks in chunks:
        toks = list(toks[:n_tok])
        full = model.forward(toks, want_logits="all", logits_from=lo).numpy()
        tick(1)
        if against_full:
            kl[base].append(np.zeros(len(full)))
            t1[base].append(np.ones(len(full)))
            kl_first[base].append(np.zeros(len(full)))
        for i in reads:
            got, first = read(i, toks, len(toks), lo)
            d, a = kl_and_top1(full, got)
            kl[i].append(d)
            t1[i].append(a)
            if first is not None:
                kl_first[i].append(kl_and_top1(full, first)[0])

    probe = {i: 0 for i in keep}
    no_pins = {i: 0 for i in keep}
    full_answers = 0
    for prompt, answer in probes:
        full = model.forward(prompt + answer[:-1], want_logits="all", logits_from=len(prompt) - 1).numpy()
        full_answers += _answered(full, answer)
        tick(1)
        # against_full: a probe counts where the candidate gives the full model's top-1 at every position of the
        # answer, right or wrong (a model may miss a number's first digit and copy the rest: Gemma 3 270M does)
        said = full.argmax(axis=-1) if against_full else answer
        if against_full:
            probe[base] += 1
            no_pins[base] += 1
        for i in reads:
            got = read(i, prompt + answer[:-1], len(prompt), len(prompt) - 1)
            probe[i] += _answered(got[0], said)
            no_pins[i] += _answered(got[1], said) if n_pin else 0
    sizes = np.concatenate([[len(x[j:j + BLOCK]) for j in range(0, len(x), BLOCK)] for x in kl[base]])
    blocks = {i: np.concatenate([block_means(x, BLOCK) for x in kl[i]]) for i in keep}
    mean = {i: float(np.concatenate(kl[i]).mean()) for i in keep}
    top1 = {i: float(np.concatenate(t1[i]).mean()) for i in keep}
    if against_full:
        ci = {i: (0.0, 0.0) if i == base else bootstrap_ratio(blocks[i], weights=sizes) for i in keep}
        # every probe as the full model answers it (no probes: nothing is adopted on the KLD alone)
        wins = [i for i in reads if probes and probe[i] >= len(probes) and top1[i] >= TOP1_TARGET]
        best = min(wins, key=lambda i: (int(maps[i].sum()), mean[i])) if wins else base
        pins_adopted = bool(n_pin) and best != base and probe[best] >= no_pins[best]
    else:
        ci = {i: (1.0, 1.0) if i == base else bootstrap_ratio(blocks[i], blocks[base], weights=sizes) for i in keep}
        wins = [i for i in keep[:-1] if ci[i][1] < 1.0 and probe[i] >= probe[base]]
        best = min(wins, key=lambda i: mean[i]) if wins else base
        pins_adopted = bool(n_pin) and probe[base] >= no_pins[base]
    return RatioMeasurement(
        ratio=float(rs[best]), head_map=maps[best], adopted=best != base, n_pin=n_pin,
        pins_adopted=pins_adopted, budget=float(budget), context=n_tok,
        ratios=tuple(float(rs[i]) for i in keep), retrieval_heads=tuple(int(maps[i].sum()) for i in keep),
        windows=tuple(int(windows[i]) for i in keep), kld=tuple(mean[i] for i in keep),
        kld_no_pins=tuple(float(np.concatenate(kl_first[i]).mean()) for i in keep) if n_pin else None,
        top1=tuple(top1[i] for i in keep), kld_ratio_95=tuple(tuple(float(x) for x in ci[i]) for i in keep),
        probe=tuple(probe[i] for i in keep), n_probes=len(probes),
        probe_no_pins=(no_pins[best] if against_full else no_pins[base]) if n_pin else probe[base],
        probe_full=full_answers, n_positions=int(sum(len(x) for x in kl[base])), against_full=against_full)


def _answered(logits: np.ndarray, answer: Sequence[int]) -> bool:
    """Teacher-forced: the top-1 token at every position of the answer is the answer's."""
    return bool((logits.argmax(axis=-1) == np.asarray(answer)).all())


def passes(n_ratios: int, n_chunks: int, n_probes: int, n_pin: int) -> int:
    """The forwards measure_ratios reports to `progress` (one per chunk or probe read; two where pins run) for
    n_ratios maps read (against_full: the candidates, not the stored map)."""
    reads = 2 if n_pin else 1
    return n_chunks * (1 + n_ratios * reads) + n_probes * (1 + n_ratios * reads)
