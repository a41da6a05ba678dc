"""`razor-gguf eval MODEL.gguf --task passkey|niah|kld`: quality of the razor KV cache against the full
cache and a StreamingLLM baseline (every head local, sinks + window, no compensation row) given the same
allocated KV bytes as razor at 15% retrieval heads (SPEC section 5).

Every (mode, length) pair gets a fresh context; every prompt is evaluated from an empty cache (no prefix
reuse between trials) with greedy decoding, so a run is deterministic for a given machine and seed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from .errors import UserError
from .options import add_kv_budget_argument, add_rpc_argument, flag_razor_overrides, rpc_kwargs

TASKS = ("passkey", "niah", "kld")
DEFAULT_LENGTHS = (1024, 2048, 4096)
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
DEFAULT_RATIOS = (0.10, 0.15, 0.25)
STREAMING_MATCHES = 0.15  # StreamingLLM gets the KV bytes of razor at this retrieval ratio
MAX_NEW_TOKENS = 10
KLD_BIN = 256


@dataclass(frozen=True)
class Mode:
    name: str  # "full", "razor" or "streaming" (SPEC's JSON `mode`)
    retrieval_ratio: float | None
    razor: dict = field(default_factory=dict)  # razor_gguf.Llama razor options

    @property
    def label(self) -> str:
        return f"razor {self.retrieval_ratio:.0%}" if self.name == "razor" else self.name


@dataclass
class Settings:
    model: str
    task: str
    lengths: list[int]
    depths: list[float]
    ratios: list[float]
    modes: list[str]
    window: int | None = None
    n_sink: int | None = None
    compensation: bool | None = None  # razor modes only; StreamingLLM never has the row
    kv_budget: float | str | None = None  # razor and StreamingLLM each get the largest window within it
    n_ubatch: int = 256
    threads: int | None = None
    seed: int = 0
    progress: bool = True
    rpc: list[str] | None = None  # llama.cpp RPC workers: every layer on them


# ---------------------------------------------------------------------------------------- contexts


def ctx_for(length: int) -> int:
    """Context for a prompt of `length` tokens plus the answer, rounded up to llama.cpp's 256 padding."""
    return -(-(length + MAX_NEW_TOKENS + 2) // 256) * 256


def load(s: Settings, mode: Mode, n_ctx: int, **extra):
    """razor_gguf.Llama for one mode; RazorUnavailableError when razor cannot run that context."""
    from .llama import Llama

    kw: dict[str, Any] = dict(n_ctx=n_ctx, n_batch=s.n_ubatch, n_ubatch=s.n_ubatch, flash_attn=True, seed=s.seed,
                              verbose=False, **extra)
    if s.threads:
        kw.update(n_threads=s.threads, n_threads_batch=s.threads)
    if s.rpc:
        kw.update(rpc_servers=s.rpc, n_gpu_layers=-1)
    razor = dict(mode.razor)
    if mode.name == "razor":
        if s.kv_budget is not None:
            razor.setdefault("kv_budget", s.kv_budget)
        else:
            razor.setdefault("window", s.window)
        razor.setdefault("n_sink", s.n_sink)
    elif mode.name == "streaming":
        razor.setdefault("n_sink", s.n_sink)
    return Llama(model_path=s.model, **kw, **razor)


def stats_of(s: Settings, mode: Mode, n_ctx: int) -> tuple[dict | None, str | None]:
    """(razor_stats of a mode at n_ctx, None) or (None, why it cannot run there)."""
    from .llama import RazorUnavailableError

    try:
        llm = load(s, mode, n_ctx)
    except RazorUnavailableError as e:
        return None, str(e)
    try:
        return llm.razor_stats(), None
    finally:
        llm.close()


def kv_bytes_of(s: Settings, mode: Mode, n_ctx: int) -> tuple[int | None, str | None]:
    """(allocated KV bytes of a mode at n_ctx, None) or (None, why it cannot run there)."""
    st, why = stats_of(s, mode, n_ctx)
    return (st["kv_bytes"] if st else None), why


def common_ubatch(s: Settings, modes: list[tuple[Mode, str | None]], n_ctx: int) -> int:
    """The ubatch size every mode runs at one context: the smallest a razor cache among them splits batches
    into (llama_razor_n_ubatch), so the full cache and every razor mode see the same ubatch boundaries.
    llama.cpp's kernels are not batch-invariant (SmolLM2: KLD ~0.004 between ubatch sizes with nothing
    evicted), which would otherwise count against razor."""
    n = s.n_ubatch
    for mode, why in modes:
        if why is None and mode.name != "full":
            st, _ = stats_of(s, mode, n_ctx)
            n = min(n, st["n_ubatch"] or n) if st else n
    return n


def streaming_mode(s: Settings, n_ctx: int) -> tuple[Mode | None, str | None]:
    """StreamingLLM with the largest window whose allocated KV bytes do not exceed razor's at 15% (or, with
    a KV budget, the largest window within that budget, as razor gets)."""
    if s.kv_budget is not None:
        m = Mode("streaming", 0.0, {"razor": True, "retrieval_ratio": 0.0, "compensation": False, "pins": 0,
                                    "kv_budget": s.kv_budget})
        return m, kv_bytes_of(s, m, n_ctx)[1]
    target, why = kv_bytes_of(s, Mode("razor", STREAMING_MATCHES, {"razor": True, "retrieval_ratio": STREAMING_MATCHES}),
                              n_ctx)
    if target is None:
        return None, why

    def mode(w: int) -> Mode:
        return Mode("streaming", 0.0, {"razor": True, "retrieval_ratio": 0.0, "compensation": False, "pins": 0,
                                    "window": w})

    lo, hi = 0, n_ctx  # largest w in [1, n_ctx) with bytes(w) <= target; bytes grow with w in 256-row steps
    while hi - lo > 1:
        mid = (lo + hi) // 2
        b, _ = kv_bytes_of(s, mode(mid), n_ctx)
        if b is not None and b <= target:
            lo = mid
        else:
            hi = mid
    if lo == 0:
        return None, "even a one-token window needs more KV memory than razor at 15%"
    return mode(lo), None


def modes_for(s: Settings, n_ctx: int) -> list[tuple[Mode, str | None]]:
    """The modes to run at one context: (mode, None) or (a placeholder, why it cannot run)."""
    out: list[tuple[Mode, str | None]] = []
    if "full" in s.modes:
        out.append((Mode("full", None, {"razor": False}), None))
    if "razor" in s.modes:
        for r in s.ratios:
            m = Mode("razor", r, {"razor": True, "retrieval_ratio": r, "compensation": s.compensation})
            out.append((m, kv_bytes_of(s, m, n_ctx)[1]))
    if "streaming" in s.modes:
        m, why = streaming_mode(s, n_ctx)
        out.append((m or Mode("streaming", 0.0), why))
    return out


# ---------------------------------------------------------------------------------------- tasks


def _bar(total: int, desc: str, enabled: bool, unit: str = "prompt"):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=not enabled, leave=False)


def _prompts(task: str, tokenize: Callable[[str], list[int]], length: int, s: Settings) -> list:
    if task == "passkey":
        from . import passkey

        rng = random.Random(s.seed * 1000 + length)
        return [passkey.make_prompt(tokenize, length, d, str(rng.randint(10000, 99999))) for d in s.depths]
    from . import niah

    return niah.make_trials(tokenize, _haystack(), length, s.depths, seed=s.seed * 1000 + length)


_HAYSTACK: list[str] = []


def _haystack() -> str:
    if not _HAYSTACK:
        from . import niah

        _HAYSTACK.append(niah.haystack_text())
    return _HAYSTACK[0]


def _answer_key(task: str, prompt) -> str:
    return prompt.key if task == "passkey" else prompt.answer


def _is_correct(task: str, answer: str, key: str) -> bool:
    from . import niah, passkey

    return (passkey.is_correct if task == "passkey" else niah.is_correct)(answer, key)


def run_retrieval(s: Settings, mode: Mode, length: int, bar) -> dict:
    """passkey / niah: one context, one prompt per depth, each from an empty cache."""
    llm = load(s, mode, ctx_for(length))
    try:
        st = llm.razor_stats()
        tok = lambda text: llm.tokenize(text.encode(), add_bos=True)  # noqa: E731
        cells = []
        for p in _prompts(s.task, tok, length, s):
            llm.reset()  # evaluate from an empty cache: no prefix reuse between trials
            out = llm.create_completion(p.text, max_tokens=MAX_NEW_TOKENS, temperature=0.0, top_k=1)
            answer = out["choices"][0]["text"]
            key = _answer_key(s.task, p)
            cells.append({"depth": p.depth, "n_tokens": p.n_tokens, "expected": key, "answer": answer.strip(),
                          "correct": _is_correct(s.task, answer, key)})
            bar.update(1)
    finally:
        llm.close()
    n_ok = sum(c["correct"] for c in cells)
    return {**_run_head(mode, st, ctx_for(length), s), "length": length, "accuracy": n_ok / len(cells),
            "correct": n_ok, "trials": len(cells), "cells": cells}


def _run_head(mode: Mode, st: dict, n_ctx: int, s: Settings) -> dict:
    return {"mode": mode.name, "retrieval_ratio": mode.retrieval_ratio, "supported": True, "ctx": n_ctx,
            "kv_bytes": st["kv_bytes"], "kv_bytes_full_equiv": st["full_equiv_bytes"], "n_sink": st["n_sink"],
            "window": st["window"], "retrieval_heads": st["retrieval_heads"], "n_ubatch": s.n_ubatch,
            "compensation": st["compensation"]}


def kld_tokens(llm, length: int) -> list[int]:
    toks = llm.tokenize(_haystack().encode(), add_bos=True)
    if len(toks) < length:
        toks = (toks + toks[1:] * (length // len(toks) + 1))[:length]
    return toks[:length]


def run_kld(s: Settings, modes: list[tuple[Mode, str | None]], length: int, bar) -> list[dict]:
    """The full cache's logits over `length` tokens of text, then every other mode's KL divergence from them."""
    import numpy as np

    from .kld import by_position, kl_and_top1

    n_ctx = ctx_for(length)
    ref = None
    runs = []
    for mode, why in modes:
        if why is not None:
            runs.append(_unsupported(mode, n_ctx, why) | {"length": length})
            continue
        llm = load(s, mode, n_ctx, logits_all=True)
        try:
            toks = kld_tokens(llm, length)
            for i in range(0, length, s.n_ubatch):
                llm.eval(toks[i:i + s.n_ubatch])
                bar.update(min(s.n_ubatch, length - i))
            logits = np.array(llm.scores[:length - 1], dtype=np.float32)  # predictions for tokens 1..length-1
            st = llm.razor_stats()
        finally:
            llm.close()
        if mode.name == "full":
            ref = logits
            runs.append(_run_head(mode, st, n_ctx, s) | {"length": length, "kld_mean": 0.0, "top1_agreement": 1.0,
                                                      "trials": 1})
            continue
        kl, top1 = kl_and_top1(ref, logits)
        # Row i predicts token i+1 from tokens 0..i: nothing is evicted while i < n_sink + window.
        lo = min((st["n_sink"] or 0) + (st["window"] or 0), len(kl))
        runs.append(_run_head(mode, st, n_ctx, s) | {
            "length": length, "kld_mean": float(kl.mean()), "top1_agreement": float(top1.mean()),
            "kld_mean_within_window": float(kl[:lo].mean()) if lo else None,
            "top1_agreement_within_window": float(top1[:lo].mean()) if lo else None,
            "kld_mean_past_window": float(kl[lo:].mean()) if lo < len(kl) else None,
            "top1_agreement_past_window": float(top1[lo:].mean()) if lo < len(kl) else None,
            "kld_max": float(kl.max()), "trials": 1, "by_position": by_position(kl, top1, KLD_BIN)})
        del logits
    return runs


def _unsupported(mode: Mode, n_ctx: int, why: str) -> dict:
    return {"mode": mode.name, "retrieval_ratio": mode.retrieval_ratio, "supported": False, "reason": why,
            "ctx": n_ctx, "kv_bytes": None}


def evaluate(s: Settings) -> dict:
    from .machine import machine_info

    t0 = time.perf_counter()
    runs: list[dict] = []
    plan = []
    for length in s.lengths:
        ms = modes_for(s, ctx_for(length))
        plan.append((length, ms, dataclasses.replace(s, n_ubatch=common_ubatch(s, ms, ctx_for(length)))))
    if s.task == "kld":
        total = sum(length * sum(why is None for _, why in ms) for length, ms, _ in plan)
        with _bar(total, "kld", s.progress, unit="token") as bar:
            for length, ms, s_ctx in plan:
                runs += run_kld(s_ctx, ms, length, bar)
    else:
        total = sum(len(s.depths) * sum(why is None for _, why in ms) for _, ms, _ in plan)
        with _bar(total, s.task, s.progress) as bar:
            for length, ms, s_ctx in plan:
                for mode, why in ms:
                    if why is None:
                        runs.append(run_retrieval(s_ctx, mode, length, bar))
                    else:
                        runs.append(_unsupported(mode, ctx_for(length), why) | {"length": length})
    return {"task": s.task, "model": os.path.basename(s.model), "machine": machine_info(),
            "settings": {"lengths": s.lengths, "depths": s.depths if s.task != "kld" else None,
                         "retrieval_ratios": s.ratios, "streaming_matches_ratio": STREAMING_MATCHES,
                         "window": s.window, "n_sink": s.n_sink, "kv_budget": s.kv_budget,
                         "n_ubatch": s.n_ubatch, "seed": s.seed,
                         "max_new_tokens": MAX_NEW_TOKENS, "flash_attn": True},
            "wall_seconds": round(time.perf_counter() - t0, 1), "runs": runs}


# ---------------------------------------------------------------------------------------- output


def _mode_label(r: dict) -> str:
    return f"razor {r['retrieval_ratio']:.0%}" if r["mode"] == "razor" else r["mode"]


def format_table(res: dict) -> str:
    runs = res["runs"]
    lengths = res["settings"]["lengths"]
    labels = list(dict.fromkeys(_mode_label(r) for r in runs))
    lines = [f"{res['task']} on {res['model']} ({res['wall_seconds']} s)"]
    if res["task"] == "kld":
        lines.append(f"{'mode':<14}{'length':>8}{'KV MiB':>9}{'KV/full':>9}{'mean KLD':>10}{'top-1':>8}"
                     f"{'KLD>W':>9}{'top-1>W':>9}  (>W: positions past sinks + window)")
        for r in runs:
            if not r["supported"]:
                lines.append(f"{_mode_label(r):<14}{r['length']:>8}  not run: {r['reason']}")
                continue
            past = r.get("kld_mean_past_window")
            lines.append(f"{_mode_label(r):<14}{r['length']:>8}{r['kv_bytes'] / 2**20:>9.1f}"
                         f"{r['kv_bytes'] / r['kv_bytes_full_equiv']:>9.3f}{r['kld_mean']:>10.4f}"
                         f"{r['top1_agreement']:>8.1%}" + (f"{past:>9.4f}{r['top1_agreement_past_window']:>9.1%}"
                                                           if past is not None else ""))
    else:
        lines.append(f"correct answers over {len(res['settings']['depths'])} needle depths [KV MiB]")
        lines.append(f"{'mode':<14}" + "".join(f"{l:>14}" for l in lengths))
        for lab in labels:
            row = f"{lab:<14}"
            for l in lengths:
                r = next((r for r in runs if _mode_label(r) == lab and r["length"] == l), None)
                cell = "" if r is None else "not run" if not r["supported"] else \
                    f"{r['correct']}/{r['trials']} [{r['kv_bytes'] / 2**20:.0f}]"
                row += cell.rjust(14)
            lines.append(row)
    windows = [f"{r['length']}: W={r['window']}" for r in runs if r["mode"] == "streaming" and r["supported"]]
    if windows:
        budget = res["settings"].get("kv_budget")
        same = f"the same KV budget {budget} as razor" if budget is not None else "equal KV bytes to razor 15%"
        lines.append(f"streaming windows ({same}): " + ", ".join(windows))
    lines += [f"not run: {n}" for n in sorted({r["reason"] for r in runs if not r["supported"]})]
    return "\n".join(lines)


def plot(res: dict, path: str) -> None:
    """Accuracy heatmaps (depth x length) per mode, or KLD and top-1 agreement against position."""
    import numpy as np

    from . import plotting

    plt = plotting.pyplot()
    runs = [r for r in res["runs"] if r["supported"]]
    if res["task"] == "kld":
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5), layout="constrained")
        for r in runs:
            if r["mode"] == "full":
                continue
            bp = r["by_position"]
            x = [(b["start"] + b["end"]) / 2 for b in bp]
            lab = f"{_mode_label(r)} (KV {r['kv_bytes'] / r['kv_bytes_full_equiv']:.2f}), {r['length']} tok"
            a1.plot(x, [max(b["kld_mean"], 1e-6) for b in bp], marker=".", label=lab)
            a2.plot(x, [b["top1_agreement"] for b in bp], marker=".", label=lab)
        a1.set_yscale("log")
        a1.set(xlabel="position", ylabel="mean KL divergence from the full cache (nats)")
        a2.set(xlabel="position", ylabel="top-1 agreement with the full cache", ylim=(0, 1.02))
        a2.axhline(0.95, color="gray", lw=0.8, ls="--")
        a1.legend(fontsize=7)
        fig.suptitle(f"{res['model']}: next-token distributions against the full cache")
    else:
        labels = list(dict.fromkeys(_mode_label(r) for r in runs))
        lengths = res["settings"]["lengths"]
        depths = res["settings"]["depths"]
        fig, axes = plt.subplots(1, len(labels), figsize=(2.6 * len(labels) + 1.5, 3.4), squeeze=False,
                                 sharey=True, layout="constrained")
        for ax, lab in zip(axes[0], labels):
            grid = np.full((len(depths), len(lengths)), np.nan)
            for r in runs:
                if _mode_label(r) == lab:
                    for c in r["cells"]:
                        grid[depths.index(c["depth"]), lengths.index(r["length"])] = float(c["correct"])
            im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="upper")
            ax.set_xticks(range(len(lengths)), [str(l) for l in lengths], fontsize=7)
            ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths], fontsize=7)
            ax.tick_params(axis="y", labelleft=ax is axes[0][0])
            ax.set(xlabel="prompt tokens", title=lab)
        axes[0][0].set_ylabel("needle depth")
        fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="correct")
        fig.suptitle(f"{res['task']} on {res['model']}")
    plotting.save(fig, path)


def _floats(text: str, name: str, lo: float, hi: float) -> list[float]:
    try:
        vals = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--{name} must be comma-separated numbers, got {text!r}") from None
    if not vals or any(not lo <= v <= hi for v in vals):
        raise UserError(f"--{name} values must be in [{lo}, {hi}], got {text!r}")
    return vals


def settings_from_args(args) -> Settings:
    from .options import check_model_file

    check_model_file(args.model)
    lengths = args.ctx or list(DEFAULT_LENGTHS if args.task != "kld" else (4096,))
    if any(l < 64 for l in lengths):
        raise UserError(f"--ctx lengths must be at least 64 tokens, got {lengths}")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in ("full", "razor", "streaming")]
    if bad or not modes:
        raise UserError(f"--modes takes full, razor, streaming; got {args.modes!r}")
    if args.task == "kld" and "full" not in modes:
        raise UserError("--task kld compares against the full cache: keep `full` in --modes")
    if args.plot:
        from . import plotting

        try:
            plotting.preflight(args.plot)
        except plotting.PlotError as e:
            raise UserError(str(e)) from None
    if args.n_ubatch < 1 or (args.window is not None and args.window < 1) or (args.n_sink is not None and args.n_sink < 0):
        raise UserError("--n-ubatch and --window must be >= 1, --n-sink >= 0")
    if args.kv_budget is not None:
        flag_razor_overrides(window=args.window, kv_budget=args.kv_budget)
    return Settings(model=args.model, task=args.task, lengths=sorted(set(lengths)),
                    depths=_floats(args.depths, "depths", 0.0, 1.0),
                    ratios=_floats(args.ratios, "ratios", 0.0, 1.0), modes=modes, window=args.window,
                    n_sink=args.n_sink, compensation=args.compensation, kv_budget=args.kv_budget, n_ubatch=args.n_ubatch,
                    threads=args.threads, seed=args.seed, progress=not args.no_progress,
                    rpc=rpc_kwargs(args.rpc, 0).get("rpc_servers"))


def cmd_eval(args) -> int:
    from . import _native
    from .errors import error

    try:
        s = settings_from_args(args)
        res = evaluate(s)
    except UserError as e:
        return error(str(e))
    except _native.RpcServerError as e:
        return error(str(e))
    except ValueError as e:  # llama-cpp-python's load failures
        return error(f"{args.model}: {str(e).splitlines()[0]}")
    if args.plot:
        plot(res, args.plot)
    if args.json:
        print(json.dumps(res))
    else:
        print(format_table(res))
        if args.plot:
            print(f"plot: {args.plot}")
    return 0


def add_subcommand(sub) -> None:
    p = sub.add_parser("eval", help="quality against the full cache and StreamingLLM at equal KV memory")
    p.add_argument("model", metavar="MODEL.gguf")
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--ctx", type=int, action="append", metavar="N",
                   help="prompt length in tokens, repeatable (default 1024, 2048, 4096; kld: 4096)")
    p.add_argument("--depths", default=",".join(str(d) for d in DEFAULT_DEPTHS),
                   help="needle depths in [0, 1], comma-separated (default 0,0.25,0.5,0.75,1)")
    p.add_argument("--ratios", default=",".join(str(r) for r in DEFAULT_RATIOS),
                   help="razor retrieval-head ratios (default 0.1,0.15,0.25)")
    p.add_argument("--modes", default="full,razor,streaming", help="subset of full,razor,streaming")
    p.add_argument("--window", type=int, help="razor window (default: the model's)")
    p.add_argument("--n-sink", type=int, help="sink tokens (default: the model's)")
    add_kv_budget_argument(p)
    p.add_argument("--compensation", action=argparse.BooleanOptionalAction, default=None,
                   help="razor modes: keep the compensation row (default: on, SPEC section 1)")
    p.add_argument("--n-ubatch", type=int, default=256, help="ubatch size (default 256)")
    p.add_argument("--threads", type=int, help="CPU threads (default: llama-cpp-python's)")
    add_rpc_argument(p)
    p.add_argument("--seed", type=int, default=0, help="seed of the keys and needles (default 0)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--plot", metavar="OUT.png", help="draw the results (heatmaps, or KLD against position)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(func=cmd_eval)
