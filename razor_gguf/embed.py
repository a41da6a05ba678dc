"""`razor-gguf embed-heads` and `razor-gguf inspect` (SPEC sections 2 and 5)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np

from . import __version__
from .errors import UserError, error
from .metadata import (
    DEFAULT_N_SINK,
    DEFAULT_WINDOW,
    MetadataError,
    build_razor_kv,
    open_gguf,
    razor_keys,
    read_razor,
    sha256_file,
    write_with_razor,
)

# The paper's B=2500, shrunk to fit the context (SmolLM2: B=2047, T=8189, ~70 s and 1.2 GiB on 2 cores).
# Attention work grows as T^2: a smaller --probe-len trades fidelity for speed on big models.
DEFAULT_CLI_PROBE_LEN = 2500


def _bar(total, desc, unit="it", **kw):
    from tqdm import tqdm

    # On stderr, only on a terminal, so --json output and logs stay clean.
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=None, leave=False, **kw)


def _check_output(out: str, force: bool) -> None:
    if os.path.isdir(out):
        raise UserError(f"{out}: is a directory")
    if os.path.exists(out) and not force:
        raise UserError(f"{out}: already exists (use --force to overwrite)")
    d = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(d):
        raise UserError(f"{out}: directory {d} does not exist")
    try:  # os.access lies for root; really try
        fd, probe = tempfile.mkstemp(prefix=".razor-probe-", dir=d)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"{out}: cannot write to {d} ({e.strerror})") from None


def _ratio(name: str, v: float) -> float:
    if not 0.0 <= v <= 1.0:
        raise UserError(f"--{name} must be between 0 and 1, got {v}")
    return v


def embed_heads(
    input: str,
    output: str | None = None,
    *,
    induction_ratio: float | None = None,
    echo_ratio: float | None = None,
    probe_len: int = DEFAULT_CLI_PROBE_LEN,
    seed: int | None = None,
    n_sink: int = DEFAULT_N_SINK,
    window: int = DEFAULT_WINDOW,
    force: bool = False,
    dry_run: bool = False,
    calibrate: bool = True,
    layer_windows: bool = False,
    ratios: bool | None = None,
    device: str = "auto",
    reorder_heads: bool = False,
) -> dict:
    """Score the heads of the GGUF `input` and write a copy with the razor.* keys to `output`.

    Returns the summary `razor-gguf inspect --json` prints for the written file, plus `output`,
    `dry_run` and the scoring time. `input` is never modified. Ratios and seed default to the
    paper's (razor_gguf.scoring); bad input raises UserError (or MetadataError for a bad GGUF).
    calibrate: measure whether the compensation row helps this model (razor_gguf.calibration) and
    record that as the model's default (razor.compensation, with razor.calibration.* provenance).
    layer_windows: also measure per-layer windows against one uniform window at the recommended budget
    (razor_gguf.layer_windows; minutes more) and store them (razor.layer_window_scale) where they win.
    ratios: measure the retrieval ratio at budget 0.35 (razor_gguf.ratios; about 126 reference forwards): a smaller
    one that wins replaces the selection's map, and the pins it ran with become the default (razor.n_pin) where they
    lose nothing; the budget and per-layer windows are then measured with that map. Where the selection leaves no
    local head (Gemma 3) fewer heads are held to the full model instead (razor_gguf.ratios), and a sliding-window
    model gets no recommended budget (its local heads keep `window`). None (the default): measured
    with the calibration, and where this model cannot be measured (e.g. the selection's heads alone exceed the
    budget) the selection's map is kept with a notice; True: that is an error; False: not measured.
    device: where the reference pass runs: "cuda" (a GPU PyTorch sees), "cpu", or "auto" (cuda when there is one).
    reorder_heads: store each layer's KV heads retrieval heads first (razor_gguf.head_order: the weights renumbered
    with them, razor.head_order recording the source's numbering), so the cache needs no head permutation.
    """
    reader = open_gguf(input)
    from .reference import ReferenceError, read_hparams

    try:
        hp = read_hparams(reader)
    except ReferenceError as e:
        raise UserError(f"{input}: {e}") from None
    except Exception as e:
        raise UserError(f"{input}: missing or bad model metadata ({type(e).__name__}: {e})") from None
    if razor_keys(reader) and not force:
        raise UserError(f"{input}: already has razor.* keys (use --force to replace them)")
    if not dry_run:
        if not output:
            raise UserError("embed-heads needs -o OUT.gguf (or --dry-run)")
        _check_output(output, force)
    from .scoring import DEFAULT_ECHO_RATIO, DEFAULT_INDUCTION_RATIO, DEFAULT_SEED

    induction_ratio = _ratio("induction-ratio", DEFAULT_INDUCTION_RATIO if induction_ratio is None else induction_ratio)
    echo_ratio = _ratio("echo-ratio", DEFAULT_ECHO_RATIO if echo_ratio is None else echo_ratio)
    seed = DEFAULT_SEED if seed is None else seed
    if ratios is None and not calibrate:
        ratios = False
    if (layer_windows or ratios) and not calibrate:
        raise UserError(f"--{'layer-windows' if layer_windows else 'ratios'} needs the calibration (drop --no-calibration)")
    if probe_len < 2:
        raise UserError(f"--probe-len must be at least 2, got {probe_len}")
    if window < 1 or n_sink < 0:
        raise UserError("--window must be >= 1 and --n-sink >= 0")
    try:
        import torch
    except ImportError:
        raise UserError("embed-heads needs torch: pip install 'razor-gguf[scoring]'") from None
    if device not in ("auto", "cpu", "cuda"):
        raise UserError(f"--device must be auto, cpu or cuda, got {device!r}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: PyTorch sees no CUDA device (a CPU-only torch build, or no GPU)")

    from .reference import ReferenceModel
    from .scoring import fit_probe_len, score_model

    try:
        fit_probe_len(hp.n_ctx_train, probe_len)
    except ValueError as e:
        raise UserError(f"{input}: {e}") from None
    model = ReferenceModel(input, device=device, reader=reader)
    with _bar(hp.n_layer, "scoring layers", unit="layer") as bar:
        scores = score_model(
            input,
            probe_len=probe_len,
            seed=seed,
            induction_ratio=induction_ratio,
            echo_ratio=echo_ratio,
            progress=lambda il: bar.update(1),
            model=model,
        )
    calibration, budgets, windows, measured_ratios = None, None, None, None
    if calibrate:
        calibration, budgets, windows, measured_ratios, scores = _calibrate(input, model, scores, n_sink, window,
                                                                            layer_windows, ratios)
    from .head_order import source_order

    tensors, order = {}, source_order(reader)  # a file reordered before keeps its source's numbering
    if reorder_heads:
        scores, tensors, order = _reordered(input, reader, scores, hp, order)
    size = os.path.getsize(input)
    with _bar(size, "sha256", unit="B", unit_scale=True) as bar:
        digest = sha256_file(input, bar.update)
    kv = build_razor_kv(
        scores,
        n_sink=n_sink,
        window=window,
        source_name=os.path.basename(input),
        source_sha256=digest,
        tool_version=__version__,
        calibration=calibration,
        budgets=budgets,
        layer_windows=windows,
        ratios=measured_ratios,
        head_order=order,
    )
    if not dry_run:
        total = sum(int(t.n_bytes) for t in reader.tensors)
        with _bar(total, "writing", unit="B", unit_scale=True) as bar:
            try:
                write_with_razor(reader, output, kv, bar.update, tensors=tensors)
            except OSError as e:
                raise UserError(f"{output}: write failed ({e.strerror or e})") from None
    summary = _summary_from_kv(kv)
    summary["provenance"]["seconds"] = scores.provenance["seconds"]
    summary["output"] = None if dry_run else os.path.abspath(output)
    summary["dry_run"] = bool(dry_run)
    summary["device"] = device
    import resource

    summary["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    if device == "cuda":
        summary["peak_gpu_bytes"] = int(torch.cuda.max_memory_allocated())
    return summary


def _reordered(input: str, reader, scores, hp, prior):
    """The scores, the renumbered attention tensors and the source numbering (composed with `prior`, the input's
    own where it was reordered before) for KV heads stored retrieval heads first."""
    import dataclasses

    from .head_order import ReorderError, apply_order, reordered_tensors, retrieval_first

    order = retrieval_first(scores.head_map)
    try:
        tensors = reordered_tensors(reader, order, hp.n_head, hp.n_head_kv)
    except ReorderError as e:
        raise UserError(f"{input}: --reorder-heads: {e}") from None
    n_gqa = scores.n_head // scores.n_head_kv
    q_order = (order[:, :, None] * n_gqa + np.arange(n_gqa)).reshape(order.shape[0], -1)  # query heads follow
    scores = dataclasses.replace(
        scores, head_map=apply_order(scores.head_map, order), echo=apply_order(scores.echo, order),
        induction=apply_order(scores.induction, order), echo_q=apply_order(scores.echo_q, q_order),
        induction_q=apply_order(scores.induction_q, q_order))
    return scores, tensors, order if prior is None else apply_order(prior, order)


def _with_ratio(scores, m):
    """The scores with the head map of the adopted retrieval ratio and the selection ratios that give it."""
    import dataclasses

    from .ratios import selection_ratios

    ind, echo = selection_ratios(m.ratio, scores.provenance["echo_ratio"])
    return dataclasses.replace(scores, head_map=m.head_map,
                               provenance={**scores.provenance, "induction_ratio": ind, "echo_ratio": echo})


def _calibrate(path: str, model, scores, n_sink: int, window: int, layer_windows: bool = False,
               ratios: bool | None = None):
    """The measured defaults (razor_gguf.calibration): whether the compensation row helps; then, with that setting,
    (ratios) the retrieval ratio and pins (razor_gguf.ratios), and with the map that gives, the recommended KV
    budget and (layer_windows) per-layer windows at that budget's window. Returns (compensation, budgets, layer
    windows, ratios, the scores with the adopted map); the measurements are None where there is nothing to
    measure: no local head (every head of the global layers a retrieval head: razor runs the stock cache) where the
    ratio measurement, held to the full model there (the row measured on its smallest map), adopts no fewer heads,
    or a context too short to evict anything."""
    from . import layer_windows as _layer_windows, ratios as _ratios
    from .calibration import (BUDGET_LADDER, DEFAULT_CHUNK_TOKENS, DEFAULT_CHUNKS, calibration_chunks,
                              local_heads, measure_budgets, measure_compensation, swa_layers)

    hp = model.hp
    n_tokens = min(DEFAULT_CHUNK_TOKENS, hp.n_ctx_train or DEFAULT_CHUNK_TOKENS)
    # the maps the ratio measurement reads, the stored one last
    maps = _ratios.candidate_maps(hp, scores.echo, scores.induction, scores.head_map,
                                  scores.provenance["echo_ratio"])[1]
    # every global head a retrieval head (a sliding-window model): razor runs the stock cache unless the ratio
    # measurement finds fewer heads that keep the full model's answers; the row is then measured on the smallest
    stock = sum(local_heads(hp, scores.head_map)) == 0
    if stock and (ratios is False or len(maps) == 1):
        return None, None, None, None, scores
    comp_map = maps[0] if stock else scores.head_map  # the map the row is measured with: one with local heads
    if n_tokens < n_sink + window + 256:
        return None, None, None, None, scores
    from . import _native

    try:
        from .llama import Llama

        tok = Llama(model_path=path, vocab_only=True, verbose=False)
    except (_native.NativeLibraryError, ValueError) as e:
        raise UserError(f"{path}: calibration needs the model's tokenizer ({str(e).splitlines()[0]}); "
                        "use --no-calibration to skip it") from None
    n_valid = 2 if layer_windows else 0  # validation chunks: the calibration text past the chunks above
    try:
        chunks = calibration_chunks(lambda s: tok.tokenize(s.encode(), add_bos=True), DEFAULT_CHUNKS + n_valid, n_tokens)
        tokenize = lambda s, bos: tok.tokenize(s.encode(), add_bos=bos)  # noqa: E731
        probes = _layer_windows.retrieval_probes(tokenize, _layer_windows.N_PROBES, n_tokens) if layer_windows else []
        needles = (_layer_windows.retrieval_probes(tokenize, _ratios.N_PROBES, n_tokens, n_needles=_ratios.PROBE_NEEDLES)
                   if ratios is not False else [])
    finally:
        tok.close()
    chunks, valid = chunks[:DEFAULT_CHUNKS], chunks[DEFAULT_CHUNKS:]
    with _bar(3 * len(chunks), "calibrating", unit="pass") as bar:
        comp = measure_compensation(model, comp_map, chunks, n_sink=n_sink, window=window,
                                    progress=lambda: bar.update(1))
    measured_ratios = None
    if ratios is not False:
        n_pin = 0 if comp.compensation else _ratios.N_PIN
        n_read = len(maps) - stock  # a stock stored map is not read
        with _bar(_ratios.passes(n_read, len(chunks), _ratios.N_PROBES, n_pin), "retrieval ratios", unit="pass") as bar:
            try:
                measured_ratios = _ratios.measure_ratios(
                    model, scores.echo, scores.induction, scores.head_map, scores.provenance["echo_ratio"], chunks,
                    needles, n_sink=n_sink, compensation=comp.compensation, n_pin=n_pin, window=window,
                    progress=lambda: bar.update(1))
            except ValueError as ex:
                if ratios:
                    raise UserError(f"{path}: {ex}") from None
                print(f"razor-gguf: {ex}; the selection's head map is kept", file=sys.stderr, flush=True)
        if measured_ratios is not None and measured_ratios.adopted:
            scores = _with_ratio(scores, measured_ratios)
    if sum(local_heads(hp, scores.head_map)) == 0:  # still the stock cache: no budget to recommend
        return comp, None, None, measured_ratios, scores
    budgets = None
    if not any(swa_layers(hp)):
        # not for a sliding-window model: the ladder's fractions count the global layers only, llama.cpp's kv_budget
        # the sliding-window layers' cache too, so a fraction measured here would buy another window there; its
        # local heads keep the recorded window, the one the measurements above ran at
        with _bar((1 + len(BUDGET_LADDER)) * len(chunks), "budgets", unit="pass") as bar:
            budgets = measure_budgets(model, scores.head_map, chunks, n_sink=n_sink, compensation=comp.compensation,
                                      progress=lambda: bar.update(1))
    windows = None
    if layer_windows:
        # at the recommended budget's window (else the recorded window), at the calibration length
        w = (budgets.windows[budgets.budgets.index(budgets.kv_budget)]
             if budgets is not None and budgets.kv_budget is not None else window)
        n_local = local_heads(hp, scores.head_map)
        with _bar(_layer_windows.passes(sum(n > 0 for n in n_local), len(chunks), len(valid), n_probes=len(probes)),
                  "layer windows", unit="pass") as bar:
            try:
                windows = _layer_windows.measure_layer_windows(
                    model, scores.head_map, chunks, valid, n_sink=n_sink, window=w, compensation=comp.compensation,
                    probes=probes, progress=lambda: bar.update(1))
            except ValueError as e:
                raise UserError(f"{path}: {e}") from None
    return comp, budgets, windows, measured_ratios, scores


def _summary_from_kv(kv: dict) -> dict:
    """The inspect JSON object from razor_kv (same shape as read_razor on the written file)."""

    class _F:
        def __init__(self, v):
            self.v = v

        def contents(self):
            return self.v

    class _R:
        fields = {k: None for k in kv}

        def get_field(self, k):
            return _F(kv[k][1]) if k in kv else None

    return read_razor(_R())


def format_summary(info: dict, detail: bool = True) -> str:
    L, H = info["n_layer"], info["n_head_kv"]
    retr_layers = [l for l in range(L) if any(info["head_map"][l])]
    prov = info.get("provenance", {})
    lines = [
        f"razor head map: {info['retrieval_count']} of {L * H} KV heads are retrieval heads "
        f"(ratio {info['retrieval_ratio']:.3f}); {L} layers x {H} KV heads",
        f"n_sink {info['n_sink']}, window {info['window']}, compensation row "
        + ("on" if info.get("compensation", True) else "off") + _measured(info),
        *_budget_lines(info),
        *_ratio_lines(info),
        *_layer_window_lines(info),
        f"retrieval heads in layers: {', '.join(map(str, retr_layers)) or 'none'}",
        *(["KV heads stored retrieval heads first (razor.head_order: the source's numbering)"] if info.get("head_order") else []),
        # per-layer arrays are shown above (or by --json), not in this line
        "provenance: " + ", ".join(f"{k}={v}" for k, v in prov.items() if not (isinstance(v, list) and len(v) > 8)),
    ]
    if detail:
        lines.append("layer  map" + " " * max(0, H - 3) + "  induction per KV head" + " " * max(0, 7 * H - 21) + "  echo per KV head")
        for l in range(L):
            m = "".join("R" if x else "." for x in info["head_map"][l])
            ind = " ".join(f"{x:6.3f}" for x in info["induction_scores"][l])
            ech = " ".join(f"{x:6.3f}" for x in info["echo_scores"][l])
            lines.append(f"{l:5d}  {m:<{max(3, H)}}  {ind}  {ech}")
    return "\n".join(lines)


def _measured(info: dict) -> str:
    p = info.get("provenance", {})
    if "calibration.kld_compensation" not in p:
        return ""
    return (f" (measured: next-token KLD {p['calibration.kld_compensation']:.4f} with it, "
            f"{p['calibration.kld_no_compensation']:.4f} without, window {p['calibration.window']})")


def _budget_lines(info: dict) -> list[str]:
    p = info.get("provenance", {})
    if "calibration.budgets" not in p:
        return []
    ladder = "; ".join(f"{b:g}: W {w}, KLD {k:.4f}, top-1 {t:.1%}" for b, w, k, t in zip(
        p["calibration.budgets"], p["calibration.budget_windows"], p["calibration.budget_kld"],
        p["calibration.budget_top1"]))
    head = (f"KV budget {info['kv_budget']:g} by default (the smallest" if info.get("kv_budget") else
            "no KV budget recommended (none")
    return [f"{head} keeping the full model's next token on >= {p['calibration.top1_target']:.0%} of "
            f"{p['calibration.budget_tokens']} calibration positions at {p['calibration.budget_context']} tokens)",
            f"  measured: {ladder}"]


def _ratio_lines(info: dict) -> list[str]:
    p = info.get("provenance", {})
    if "calibration.ratios" not in p:
        return []
    n = p["calibration.ratio_probes"]
    against_full = p.get("calibration.ratio_against_full", False)
    last = len(p["calibration.ratios"]) - 1

    def cell(i, r, h, w, k, lo, hi, t, a):
        where = "stock" if against_full and i == last else f"W {w}"
        interval = f"{lo:.4f}-{hi:.4f}" if against_full else f"x{lo:.2f}-{hi:.2f}"  # its own KLD's, or the ratio's
        return f"{r:.0%} ({h} heads, {where}): KLD {k:.4f} ({interval}), top-1 {t:.1%}, probe {a}/{n}"

    cells = "; ".join(cell(i, *c) for i, c in enumerate(zip(
        p["calibration.ratios"], p["calibration.ratio_heads"], p["calibration.ratio_windows"],
        p["calibration.ratio_kld"], p["calibration.ratio_kld_lo"], p["calibration.ratio_kld_hi"],
        p["calibration.ratio_top1"], p["calibration.ratio_probe"])))
    pins = p["calibration.ratio_n_pin"]
    verdict = (f"adopted: {info['retrieval_count']} retrieval heads" if p["calibration.ratio_adopted"] else
               "the selection's ratio kept")
    whose = "the adopted map's" if against_full else "the selection's"
    probe_with = (p["calibration.ratio_probe"][p["calibration.ratio_heads"].index(info["retrieval_count"])]
                  if against_full and p["calibration.ratio_adopted"] else p["calibration.ratio_probe"][-1])
    pin_line = ("" if not pins or (against_full and not p["calibration.ratio_adopted"]) else
                f"; {pins} pins {'on by default (razor.n_pin)' if p['calibration.ratio_pins_adopted'] else 'not adopted'}"
                f": {whose} probe {probe_with}/{n} with them, {p['calibration.ratio_probe_no_pins']}/{n} without")
    if against_full:
        full = f"; the full model answers {p['calibration.ratio_probe_full']}/{n} of the probes right"
    elif "calibration.ratio_probe_full" in p:
        full = f"; the full model's probe {p['calibration.ratio_probe_full']}/{n}"
    else:
        full = ""
    where = (f"against the full model (the selection left no local head; each candidate at the recorded window, "
             f"less the pins; KLD and its 95% interval; probe: the full model's answer given)" if against_full else
             f"at budget {p['calibration.ratio_budget']:g}")
    how = "" if against_full else ", KLD x its 95% interval against the last"
    return [f"retrieval ratio {where} ({p['calibration.ratio_context']} tokens, "
            f"{p['calibration.ratio_tokens']} positions{how}): {verdict}{pin_line}{full}",
            f"  measured: {cells}"]


def _layer_window_lines(info: dict) -> list[str]:
    p = info.get("provenance", {})
    if "calibration.layer_windows_ratio" not in p:
        return []
    (ku, kc), (tu, tc) = p["calibration.layer_windows_kld"], p["calibration.layer_windows_top1"]
    r, lo, hi = p["calibration.layer_windows_ratio"]
    w = p["calibration.layer_windows_window"]
    local = [not all(row) for row in info["head_map"]]  # (a sliding-window layer's row is all local: scale 1)
    windows = sorted({round(x * w) for x, l in zip(p["calibration.layer_windows_scale"], local) if l})
    pu, pc, n = p.get("calibration.layer_windows_probe", [0, 0, 0])
    verdict = ("adopted: razor.layer_window_scale" if p.get("calibration.layer_windows_adopted") else
               "not adopted: one window for every layer")
    return [f"per-layer windows {'/'.join(map(str, windows))} against a uniform {w} at equal memory: validation KLD "
            f"{kc:.4f} vs {ku:.4f} (ratio {r:.2f}, 95% {lo:.2f}-{hi:.2f}), top-1 {tc:.1%} vs {tu:.1%} over "
            f"{p['calibration.layer_windows_tokens']} positions; retrieval probe {pc}/{n} vs {pu}/{n}; {verdict}"]


def plot_heads(info: dict, path: str) -> None:
    from . import plotting

    try:
        plt = plotting.pyplot()
    except plotting.PlotError as e:
        raise UserError(str(e)) from None
    import numpy as np

    hm = np.array(info["head_map"])
    L, H = hm.shape
    fig, axes = plt.subplots(1, 2, figsize=(2 + 0.6 * H * 2 + 2, 1.5 + 0.22 * L), squeeze=False)
    for ax, key, title in zip(axes[0], ("induction_scores", "echo_scores"), ("induction", "echo")):
        im = ax.imshow(np.array(info[key]), aspect="auto", cmap="viridis", interpolation="nearest")
        ys, xs = np.nonzero(hm)
        ax.scatter(xs, ys, marker="s", s=60, facecolors="none", edgecolors="red", linewidths=1.5, label="retrieval")
        ax.set_title(f"{title} score")
        ax.set_xlabel("KV head")
        ax.set_ylabel("layer")
        ax.set_xticks(range(H))
        fig.colorbar(im, ax=ax, fraction=0.05)
    axes[0][0].legend(loc="upper right", fontsize="small")
    fig.suptitle(f"retrieval heads: {info['retrieval_count']} / {L * H} (ratio {info['retrieval_ratio']:.3f})")
    fig.tight_layout()
    plotting.save(fig, path, dpi=100)


def cmd_embed_heads(args) -> int:
    try:
        info = embed_heads(
            args.input, args.output, induction_ratio=args.induction_ratio, echo_ratio=args.echo_ratio,
            probe_len=args.probe_len, seed=args.seed, n_sink=args.n_sink, window=args.window,
            force=args.force, dry_run=args.dry_run, calibrate=args.calibration, layer_windows=args.layer_windows,
            ratios=args.ratios, device=args.device, reorder_heads=args.reorder_heads)
    except (UserError, MetadataError) as e:
        return error(str(e))
    except KeyboardInterrupt:
        return error("interrupted; nothing written")
    if args.json:
        print(json.dumps(info))
    else:
        print(format_summary(info, detail=False))
        print(f"wrote {info['output']}" if info["output"] else "dry run: nothing written")
    return 0


def cmd_inspect(args) -> int:
    try:
        reader = open_gguf(args.model)
        info = read_razor(reader)
        if info is None:
            raise UserError(f"{args.model}: no razor.* keys (run razor-gguf embed-heads first)")
        if args.plot:
            _check_output(args.plot, force=True)
            plot_heads(info, args.plot)
    except (UserError, MetadataError) as e:
        return error(str(e))
    except OSError as e:
        return error(f"{e.filename or ''}: {e.strerror}")
    if args.json:
        print(json.dumps(info))
    else:
        print(format_summary(info))
        if args.plot:
            print(f"plot written to {args.plot}")
    return 0


def add_subcommands(sub) -> None:
    from .scoring import DEFAULT_ECHO_RATIO, DEFAULT_INDUCTION_RATIO, DEFAULT_SEED

    e = sub.add_parser("embed-heads", help="score the heads of a GGUF and write a copy with the razor.* keys")
    e.add_argument("input", metavar="IN.gguf")
    e.add_argument("-o", "--output", metavar="OUT.gguf")
    e.add_argument("--induction-ratio", type=float, default=DEFAULT_INDUCTION_RATIO)
    e.add_argument("--echo-ratio", type=float, default=DEFAULT_ECHO_RATIO)
    e.add_argument("--probe-len", type=int, default=DEFAULT_CLI_PROBE_LEN,
                   help=f"probe block length B (default {DEFAULT_CLI_PROBE_LEN}, the paper's; shrunk so 1+4B fits the context)")
    e.add_argument("--seed", type=int, default=DEFAULT_SEED)
    e.add_argument("--n-sink", type=int, default=DEFAULT_N_SINK, help="recommended sink tokens recorded in the GGUF")
    e.add_argument("--window", type=int, default=DEFAULT_WINDOW, help="recommended local window recorded in the GGUF")
    e.add_argument("--calibration", action=argparse.BooleanOptionalAction, default=True,
                   help="measure in the reference pass whether the compensation row helps this model (next-token "
                        "KLD with and without it on 4k tokens of calibration text, ~1-2 min for SmolLM2) and record "
                        "the result as its default (default on)")
    e.add_argument("--layer-windows", action="store_true",
                   help="also measure per-layer windows against one uniform window at equal memory (the layers "
                        "whose eviction costs least give half their window to the others; whole-model KLD on "
                        "calibration text, validated on other text; ~6-7 min more for SmolLM2) and store them as the "
                        "model's default where the 95%% interval says they win; an experiment: on SmolLM2 what it "
                        "adopts at the 0.75 budget loses in llama.cpp, see README")
    e.add_argument("--ratios", action=argparse.BooleanOptionalAction, default=None,
                   help="measure the retrieval ratio at KV budget 0.35 (default on, with the calibration): fewer "
                        "retrieval heads (5%%, 10%%) against the selection's at equal memory, on next-token KLD over "
                        "calibration text and 16 single-needle probes, with 64 pinned tokens where the compensation "
                        "row is off; a ratio that wins (KLD 95%% interval below 1, probe not worse) replaces the head "
                        "map, and the pins become the model's default where they lose no probe (razor-gguf's doors "
                        "then read each prompt twice); about 126 reference forwards of 2048 tokens: 10 more minutes "
                        "on 2 CPU cores for SmolLM2. Where the selection leaves no local head (Gemma 3) fewer heads "
                        "are held to the full model instead: the fewest that give its answer to every probe and keep "
                        "its next token on 96%% replace the map. A model it cannot measure keeps the selection's map "
                        "with a notice (an error with --ratios); --no-ratios skips it")
    e.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where the reference pass runs (default auto: a CUDA GPU when PyTorch sees one, else the CPU)")
    e.add_argument("--reorder-heads", action="store_true",
                   help="store each layer's KV heads retrieval heads first, renumbering the attention weights with "
                        "them (the same model, but attn_output adds its terms in another order: outputs change at "
                        "rounding level), so the razor cache splits and joins head groups with views instead of "
                        "gathering them every token (4 fewer graph ops per split layer); razor.head_order records "
                        "the source's numbering")
    e.add_argument("--force", action="store_true", help="overwrite OUT and replace existing razor.* keys")
    e.add_argument("--dry-run", action="store_true", help="score and report, write nothing")
    e.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    e.set_defaults(func=cmd_embed_heads)

    i = sub.add_parser("inspect", help="show the razor head map, scores and summary of a GGUF")
    i.add_argument("model", metavar="MODEL.gguf")
    i.add_argument("--json", action="store_true")
    i.add_argument("--plot", metavar="heads.png", help="write a layer x head heatmap of both scores")
    i.set_defaults(func=cmd_inspect)

