#!/usr/bin/env python3
"""Quality evidence with statistical power: the full cache, razor and StreamingLLM at equal KV budgets on
passkey, multi-needle NIAH and next-token KLD, run in cells that a JSON file accumulates across sittings.

  tools/evidence.py run MODEL.razor.gguf --out docs/results/evidence-smollm2.json [--plan targets,frontier,kld]
  tools/evidence.py report docs/results/evidence-smollm2.json [--plot docs/results/frontier.png]
  tools/evidence.py annotate docs/results/evidence-smollm2.json MODEL.gguf   (not while a run writes the file)

A cell is (task, prompt length, method, KV budget). Prompt i of a cell is the same text for every method and
budget (its seed is (task, length, i)), so methods are compared on the same prompts, and a cell asked for more
prompts than it holds runs only the missing ones: a run stopped at any point (Ctrl-C, --max-minutes) keeps
every finished prompt, and the next run goes on from there. Each cell records its wall time and the machine.
A file belongs to a model's weights (the tensors' sha256), not to one GGUF file: `embed-heads` run again on
another machine writes another file (its scores differ in the last float digits), and a cell goes on there
when the cache it would run is the one it recorded (head map, windows, pins, bytes: `cache_sha256`).

Methods (every one but `full` gets the same `kv_budget`; llama.cpp picks the largest window that fits it):
  full         the stock cache;
  razor        the model's measured defaults (its head map, its razor.compensation);
  razor_paper  the paper's defaults: the same head map with the compensation row;
  streaming    StreamingLLM: every head local (sinks + window), no compensation row;
  razor_rX     razor with the top X of heads by the stored scores as retrieval heads (plan `ratios`); any
               method but full takes the suffix (razor_pins_r0.05);
  razor_uniform  razor with one window for every layer (razor.layer_windows = false): against `razor` on a model
               whose embed-heads stored per-layer windows, the allocation's own effect (plan `layer-windows`);
  razor_pins   razor (no compensation row) with 64 pinned tokens per local head, chosen by a first read of each
               prompt (razor_gguf.pins; their rows come out of the same budget, so the window shrinks).
  METHOD+TYPE  any method with its whole KV cache in TYPE (q8_0, q4_0, ...: llama.cpp's type_k = type_v, flash
               attention on as in every cell); the budget stays a fraction of the f16 cache every other cell
               measures against, so razor_pins_r0.1+q8_0 at 0.35 buys the window that fits 0.35 of the f16 bytes.
Retrieval cells report accuracy with 95% Wilson intervals; KLD cells report mean KLD and top-1 agreement
against the full cache with 95% block-bootstrap intervals (blocks of 256 positions) over held-out prose
(Python's standard-library docstrings, never the calibration text of embed-heads).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import os
import pathlib
import random
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from razor_gguf.evaluation import MAX_NEW_TOKENS, ctx_for, kld_tokens  # noqa: E402
from razor_gguf.intervals import block_means, bootstrap_ratio, sign_test, wilson  # noqa: E402
from razor_gguf.overrides import KV_CACHE_TYPES, parse_kv_type  # noqa: E402

TASKS = ("passkey", "mniah")
METHODS = {
    "full": {"razor": False},
    "razor": {"razor": True},
    "razor_paper": {"razor": True, "compensation": True},
    "streaming": {"razor": True, "retrieval_ratio": 0.0, "compensation": False, "pins": 0},
    "razor_uniform": {"razor": True, "layer_windows": False},
    "razor_pins": {"razor": True, "compensation": False, "pins": 64},
}
PLANS = {
    # the cells that carry the targets (and 2k, reported)
    "targets": dict(tasks=TASKS, lengths=(2048, 4096, 8192), budgets=(0.35,), methods=("razor", "streaming"), n=20),
    # quality against allocated KV at 4k
    "frontier": dict(tasks=TASKS, lengths=(4096,), budgets=(0.15, 0.25, 0.35, 0.5),
                     methods=("razor", "razor_paper", "streaming"), n=10),
    # next-token distributions over held-out prose
    "kld": dict(tasks=("kld",), lengths=(4096, 8192), budgets=(0.35,), methods=("razor", "razor_paper", "streaming"),
                n=1),
    "kld-frontier": dict(tasks=("kld",), lengths=(4096,), budgets=(0.15, 0.25, 0.35, 0.5),
                         methods=("razor", "razor_paper", "streaming"), n=1),
    # more retrieval heads at the same memory (re-selected from the stored scores): what ratio to recommend
    "ratios": dict(tasks=TASKS, lengths=(4096,), budgets=(0.35, 0.5), methods=("razor_r0.25", "razor_r0.35"), n=10),
    # fewer retrieval heads at the same memory: longer windows for the local heads (prose) against the ratio's
    # retrieval; streaming is ratio 0
    "fewer-heads": dict(tasks=("kld",), lengths=(4096, 8192), budgets=(0.35,),
                        methods=("razor", "streaming", "razor_r0.05", "razor_r0.1"), n=1),
    "fewer-heads-pins": dict(tasks=TASKS, lengths=(4096, 8192), budgets=(0.35,),
                             methods=("razor_r0.05", "razor_pins_r0.05", "razor_pins_r0.1"), n=20),
    "fewer-heads-pins-kld": dict(tasks=("kld",), lengths=(4096, 8192), budgets=(0.35,),
                                 methods=("razor_pins_r0.05", "razor_pins_r0.1"), n=1),
    # per-layer windows (razor.layer_window_scale) against one uniform window at the same budget
    "layer-windows": dict(tasks=("kld",), lengths=(4096, 8192), budgets=(0.35,), methods=("razor", "razor_uniform"),
                          n=1),
    "layer-windows-retrieval": dict(tasks=("mniah",), lengths=(4096,), budgets=(0.35,),
                                    methods=("razor", "razor_uniform"), n=20),
    # pinned tokens chosen by a first read of each prompt, against razor at the same budget
    "pins": dict(tasks=TASKS, lengths=(4096, 8192), budgets=(0.35,), methods=("razor", "razor_pins"), n=20),
    "pins-kld": dict(tasks=("kld",), lengths=(4096,), budgets=(0.35,), methods=("razor", "razor_pins"), n=1),
}
N_NEEDLES = 4
TARGET_PROMPTS = 20  # a retrieval cell carries a target with at least this many prompts (the frontier's 10 do not)
N_UBATCH = 256
KLD_BLOCK = 256


# ------------------------------------------------------------------------------------------- prompts


def depth_of(i: int) -> float:
    """Needle depth of prompt i: the base-2 van der Corput sequence (0, .5, .25, .75, ...), so the first n
    prompts of a cell spread evenly over the context for any n."""
    d, f = 0.0, 0.5
    while i:
        d += f * (i & 1)
        i >>= 1
        f /= 2
    return d


def prompt_of(task: str, tokenize, length: int, i: int, haystack: str):
    """(text, expected answer, depth) of prompt i of a task at a length."""
    from razor_gguf import passkey

    if task == "passkey":
        key = str(random.Random(prompt_seed(task, length, i)).randint(10000, 99999))
        p = passkey.make_prompt(tokenize, length, depth_of(i), key)
        return p.text, p.key, p.depth
    p = mniah_prompt(tokenize, length, i, haystack)
    return p.text, p.answer, p.depth


def prompt_seed(task: str, length: int, i: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{task}/{length}/{i}".encode()).digest()[:4], "little")


def mniah_prompt(tokenize, length: int, i: int, haystack: str):
    """Multi-needle prompt i at a length (razor_gguf.niah.MultiNeedlePrompt)."""
    from razor_gguf import niah

    return niah.multi_trial(tokenize, haystack, length, N_NEEDLES, prompt_seed("mniah", length, i))


def is_correct(task: str, answer: str, expected: str) -> bool:
    from razor_gguf import niah, passkey

    return (passkey.is_correct if task == "passkey" else niah.is_correct)(answer, expected)


# ------------------------------------------------------------------------------------------- store


def cell_key(task: str, length: int, method: str, budget: float | None) -> str:
    return f"{task}/{length}/{method}" + ("" if is_full(method) else f"/{budget:g}")


def load_store(path: pathlib.Path, model: str) -> dict:
    """The results file at path, or a new one. A file written for another GGUF file of the same weights is
    taken (its cells go on only where they ran the same cache: run_retrieval_cell); other weights are an error."""
    if path.exists():
        store = json.loads(path.read_text())
        if store.get("model_sha256") == sha256_of(model):
            store.setdefault("weights_sha256", weights_sha256(model))  # a file from before weights were recorded
        elif store.get("weights_sha256") != weights_sha256(model):
            print(f"evidence: {path} holds results of another model ({store.get('model')}, other weights); "
                  "use another --out", file=sys.stderr)
            raise SystemExit(2)
        return store
    return {"schema": 1, "model": os.path.basename(model), "model_sha256": sha256_of(model),
            "weights_sha256": weights_sha256(model),
            "settings": {"n_needles": N_NEEDLES, "max_new_tokens": MAX_NEW_TOKENS, "n_ubatch": N_UBATCH,
                         "kld_block": KLD_BLOCK, "flash_attn": True, "greedy": True}, "cells": {}}


def save_store(path: pathlib.Path, store: dict) -> None:
    """Atomically: a run killed while writing leaves the previous file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(store, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _file_sha256(path: str, h=None, offset: int = 0) -> str:
    """sha256 of a file's bytes from offset on, continuing h when given."""
    h = h or hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    return h.hexdigest()


@functools.lru_cache(maxsize=None)
def sha256_of(path: str) -> str:
    return _file_sha256(path)


@functools.lru_cache(maxsize=None)
def weights_sha256(path: str) -> str:
    """sha256 of a GGUF's tensors (name, type, shape, offset, then the data section): what embed-heads keeps
    when it writes a model's head map and calibration into its metadata."""
    from gguf import GGUFReader

    r = GGUFReader(path)
    h = hashlib.sha256()
    for t in r.tensors:
        h.update(f"{t.name}:{int(t.tensor_type)}:{[int(x) for x in t.shape]}:{t.data_offset - r.data_offset}\n".encode())
    return _file_sha256(path, h, r.data_offset)


def cache_sha256(llm, st: dict) -> str:
    """What decides a method's answers on given weights: the head map in effect and what the budget bought."""
    from razor_gguf import _native

    spec = {k: st.get(k) for k in ("razor", "n_sink", "window", "layer_windows", "rings", "compensation", "pins",
                                   "kv_bytes")}
    if st.get("kv_type"):  # only typed caches name theirs: the f16 cells keep their identity
        spec["kv_type"] = st["kv_type"]
    spec["head_map"] = _native.head_map(llm._ctx.ctx) if st.get("razor") else None
    if st.get("pins"):  # which tokens get pinned (absent without pins: those cells keep their identity)
        spec["pin_span"] = pin_span()
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


# the fields a cell recorded before cache_sha256 existed: on its own model file, equal fields mean the same cache
_LEGACY_FIELDS = ("kv_bytes", "window", "n_sink", "retrieval_heads", "compensation", "ring_windows")


@functools.lru_cache(maxsize=None)
def _machine() -> tuple:
    """The machine a run is on, read once (machine_info asks nvidia-smi)."""
    from razor_gguf.machine import machine_info

    m = machine_info()
    return tuple((k, m.get(k)) for k in ("cpu", "n_cores", "backends", "gpu", "llama_cpp"))


def machine_summary() -> dict:
    return dict(_machine())


# ------------------------------------------------------------------------------------------- runs


def split_method(method: str) -> tuple[str, str | None]:
    """("razor_pins_r0.1", "q8_0") of "razor_pins_r0.1+q8_0"; (method, None) without a KV type."""
    base, sep, kv_type = method.partition("+")
    return (base, kv_type) if sep else (method, None)


def is_full(method: str) -> bool:
    return split_method(method)[0] == "full"


def f16_bytes_per(kv_type: str | None) -> float:
    """Bytes of an f16 cache per byte of one in kv_type (f16 and untyped: 1): rows of whole blocks scale exactly."""
    import gguf

    if kv_type is None:
        return 1.0
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kv_type.upper()]]
    return 2.0 / (size / block)


def method_options(method: str) -> dict:
    """razor_gguf.Llama options of a method: METHODS, or METHOD_rX = that method with retrieval ratio X, either
    with +TYPE = the KV cache in that type."""
    method, kv_type = split_method(method)
    extra = {}
    if kv_type is not None:
        t = parse_kv_type(kv_type)  # ValueError for a type llama.cpp's caches do not take
        extra = {"type_k": t, "type_v": t}
    base, sep, ratio = method.rpartition("_r")
    if sep and base in METHODS and base != "full":
        return {**METHODS[base], "retrieval_ratio": float(ratio), **extra}
    return {**METHODS[method], **extra}


def known_method(method: str) -> bool:
    try:
        method_options(method)
    except (KeyError, ValueError):
        return False
    return True


def open_model(model: str, method: str, budget: float | None, n_ctx: int, args, n_ubatch: int = N_UBATCH, **extra):
    """(razor_gguf.Llama, razor_stats) or (None, why the method cannot run there)."""
    from razor_gguf.llama import Llama, RazorUnavailableError

    kw = method_options(method)
    kv_type = split_method(method)[1]
    if not is_full(method):
        # a fraction of the f16 cache, as llama.cpp's fraction of the cache in this method's type
        kw["kv_budget"] = budget * f16_bytes_per(kv_type)
    try:
        # swa_full=False: a sliding-window layer attends within its window whatever its cache holds, and a
        # full-size one (llama-cpp-python's default) would count as memory no method can save
        llm = Llama(model_path=model, n_ctx=n_ctx, n_batch=n_ubatch, n_ubatch=n_ubatch, flash_attn=True, seed=0,
                    verbose=False, n_gpu_layers=args.n_gpu_layers, swa_full=False, **kw, **extra)
    except (RazorUnavailableError, ValueError) as e:
        return None, str(e).splitlines()[0]
    return llm, {**llm.razor_stats(), **({"kv_type": kv_type} if kv_type else {})}


def pin_span() -> list[int]:
    """The tokens a pin keeps around each strong one, before and after (razor_gguf.pins)."""
    from razor_gguf.pins import PIN_AFTER, PIN_BEFORE

    return [PIN_BEFORE, PIN_AFTER]


def cell_head(method: str, budget, n_ctx: int, st: dict, n_ubatch: int) -> dict:
    """What a cell ran; kv_fraction and full_equiv_bytes are of the f16 cache (a typed cell adds its type and its
    fraction of the full cache in that type)."""
    kv_type = split_method(method)[1]
    full = st["full_equiv_bytes"] * f16_bytes_per(kv_type)
    typed = {"kv_type": kv_type, "kv_fraction_of_type": st["kv_bytes"] / st["full_equiv_bytes"]} if kv_type else {}
    return {**({"pin_span": pin_span()} if st.get("pins") else {}), **typed,
            "method": method, "budget": budget, "ctx": n_ctx, "supported": True, "kv_bytes": st["kv_bytes"],
            "kv_fraction": st["kv_bytes"] / full, "full_equiv_bytes": round(full),
            "window": st["window"], "n_sink": st["n_sink"], "retrieval_heads": st["retrieval_heads"],
            "compensation": st["compensation"], "n_ubatch": n_ubatch,
            "ring_windows": [w for w, _ in st.get("rings") or []]}


def run_retrieval_cell(store, key, task, length, method, budget, n, args, haystack, save=lambda: None) -> float:
    """Runs the prompts a cell is missing up to n, recording the cell and calling save() after each (an 8k
    cell takes hours on 2 cores: a run stopped inside one keeps its finished prompts); returns the seconds spent."""
    from razor_gguf import niah

    cell = store["cells"].get(key)
    done = {p["i"] for p in cell["prompts"]} if cell and cell.get("supported") else set()
    todo = [i for i in range(n) if i not in done]
    if cell and not cell.get("supported") or not todo:
        return 0.0
    t0 = time.perf_counter()
    llm, st = open_model(args.model, method, budget, ctx_for(length), args)
    if llm is None:
        store["cells"][key] = {"task": task, "length": length, "method": method, "budget": budget,
                               "supported": False, "reason": st}
        return time.perf_counter() - t0
    ident = cache_sha256(llm, st)
    head = cell_head(method, budget, ctx_for(length), st, N_UBATCH)
    if cell:
        recorded, same_file = cell.get("cache_sha256"), store["model_sha256"] == sha256_of(args.model)
        if recorded is None and same_file and all(cell.get(f) == head[f] for f in _LEGACY_FIELDS):
            recorded = ident
        if recorded != ident:
            llm.close()
            why = ("ran another cache (head map, windows or pins)" if recorded or same_file else
                   f"was run before cells recorded their cache, on another file ({store['model_sha256'][:12]})")
            print(f"evidence: {key} {why}; it cannot go on with this model: use another --out", file=sys.stderr)
            raise SystemExit(2)
    try:
        tok = lambda text: llm.tokenize(text.encode(), add_bos=True)  # noqa: E731
        prompts = list(cell["prompts"]) if cell else []
        for i in todo:
            mp = mniah_prompt(tok, length, i, haystack) if task == "mniah" else None
            text, expected, depth = (mp.text, mp.answer, mp.depth) if mp else prompt_of(task, tok, length, i, haystack)
            llm.reset()  # every prompt from an empty cache
            out = llm.create_completion(text, max_tokens=MAX_NEW_TOKENS, temperature=0.0, top_k=1)
            answer = out["choices"][0]["text"].strip()
            prompts.append({"i": i, "depth": round(depth, 4), "n_tokens": len(tok(text)), "expected": expected,
                            "answer": answer, "correct": is_correct(task, answer, expected),
                            **(niah.needle_choice(tok, mp, answer) if mp else {})})
            if args.progress:
                print(f"  {key} #{i}: {'ok ' if prompts[-1]['correct'] else 'MISS'} {answer[:30]!r}",
                      file=sys.stderr)
            prompts.sort(key=lambda p: p["i"])
            k = sum(p["correct"] for p in prompts)
            lo, hi = wilson(k, len(prompts))
            store["cells"][key] = {
                "task": task, "length": length, **head, "cache_sha256": ident,
                "model_files": _model_files(cell, args.model),
                "correct": k, "n": len(prompts), "accuracy": k / len(prompts), "wilson95": [lo, hi],
                "wall_seconds": round((cell or {}).get("wall_seconds", 0.0) + time.perf_counter() - t0, 1),
                "machines": _machines(cell), "prompts": prompts}
            save()
    finally:
        llm.close()
    return time.perf_counter() - t0


def _model_files(cell: dict | None, model: str) -> list:
    """The GGUF files (sha256, 12 digits) a cell's prompts ran on."""
    fs = list((cell or {}).get("model_files", []))
    f = sha256_of(model)[:12]
    return fs if f in fs else fs + [f]


def _machines(cell: dict | None) -> list:
    ms = list((cell or {}).get("machines", []))
    m = machine_summary()
    return ms if m in ms else ms + [m]


def run_kld_group(store, length, budget, methods, args) -> float:
    """The full cache's logits over `length` tokens, then each method's KLD / top-1 against them, per block
    of KLD_BLOCK positions. All methods run at the smallest ubatch any of them needs, the full cache too
    (llama.cpp's kernels are not batch-invariant, which would otherwise count against razor)."""
    import numpy as np

    from razor_gguf.kld import kl_and_top1

    keys = {m: cell_key("kld", length, m, budget) for m in methods}
    todo = [m for m in methods if keys[m] not in store["cells"]]
    if not todo:
        return 0.0
    t0 = time.perf_counter()
    n_ctx = ctx_for(length)
    heads, ub = {}, N_UBATCH
    for m in todo:  # find each method's cache (or why it cannot run) and the common ubatch
        llm, st = open_model(args.model, m, budget, n_ctx, args)
        if llm is None:
            store["cells"][keys[m]] = {"task": "kld", "length": length, "method": m, "budget": budget,
                                       "supported": False, "reason": st}
            continue
        llm.close()
        heads[m] = st
        ub = min(ub, st["n_ubatch"] or ub)
    if not heads:
        return time.perf_counter() - t0

    def logits(method):
        llm, st = open_model(args.model, method, budget, n_ctx, args, n_ubatch=ub, logits_all=True)
        try:
            toks = kld_tokens(llm, length)  # the held-out prose, as `razor-gguf eval --task kld` reads it
            llm.eval(toks)  # one prompt (in decodes of n_batch = ub tokens): razor_pins chooses its pins over all of it
            return np.array(llm.scores[:length - 1], dtype=np.float32), {**st, "cache_sha256": cache_sha256(llm, st)}
        finally:
            llm.close()

    ref, _ = logits("full")
    for m in heads:
        t1 = time.perf_counter()
        out, st = logits(m)
        kl, top1 = kl_and_top1(ref, out)
        del out
        lo = min((st["n_sink"] or 0) + (st["window"] or 0), len(kl))
        kb, tb = block_means(kl, KLD_BLOCK), block_means(top1.astype(np.float64), KLD_BLOCK)
        w = np.array([min(KLD_BLOCK, len(kl) - i) for i in range(0, len(kl), KLD_BLOCK)], dtype=np.float64)
        store["cells"][keys[m]] = {
            "task": "kld", "length": length, **cell_head(m, budget, n_ctx, st, ub), "n_positions": len(kl),
            "kld_mean": float(kl.mean()), "kld95": list(bootstrap_ratio(kb, weights=w)),
            "top1": float(top1.mean()), "top1_95": list(bootstrap_ratio(tb, weights=w)),
            "kld_mean_past_window": float(kl[lo:].mean()) if lo < len(kl) else None,
            "top1_past_window": float(top1[lo:].mean()) if lo < len(kl) else None,
            "block_kld": [round(float(x), 6) for x in kb], "block_top1": [round(float(x), 5) for x in tb],
            "block_weights": w.astype(int).tolist(), "cache_sha256": st["cache_sha256"],
            "model_files": _model_files(None, args.model),
            "wall_seconds": round(time.perf_counter() - t1, 1), "machines": _machines(None)}
    return time.perf_counter() - t0


def cmd_run(args) -> int:
    from razor_gguf import niah

    out = pathlib.Path(args.out)
    store = load_store(out, args.model)
    haystack = niah.haystack_text()
    t_end = time.monotonic() + args.max_minutes * 60 if args.max_minutes else math.inf
    plans = [PLANS[p] for p in args.plan.split(",")]
    wanted = lambda m: not args.method or m in args.method  # noqa: E731  (--method: full only when named)
    jobs = []
    for p in plans:
        lengths = args.ctx or p["lengths"]
        budgets = args.budget or p["budgets"]
        n = args.n or p["n"]
        for task in p["tasks"]:
            if args.task and task not in args.task:
                continue
            for length in lengths:
                if task == "kld":
                    for b in budgets:
                        jobs.append(("kld", length, None, b, n))
                    continue
                if wanted("full"):
                    jobs.append((task, length, "full", None, n))
                for m in args.method or p["methods"]:
                    if is_full(m) and m != "full":  # a typed full cache: one cell, no budget
                        jobs.append((task, length, m, None, n))
                for b in budgets:
                    for m in args.method or p["methods"]:
                        if not is_full(m):
                            jobs.append((task, length, m, b, n))
    for task, length, method, budget, n in jobs:
        if time.monotonic() > t_end:
            print("evidence: --max-minutes reached; run again to go on", file=sys.stderr)
            break
        if task == "kld":
            methods = [m for p in plans if "kld" in p["tasks"] for m in args.method or p["methods"] if m != "full"]
            wall = run_kld_group(store, length, budget, list(dict.fromkeys(methods)), args)
            label = f"kld/{length}/{budget:g}"
        else:
            label = cell_key(task, length, method, budget)
            wall = run_retrieval_cell(store, label, task, length, method, budget, n, args, haystack,
                                      save=lambda: save_store(out, store))
        if wall:
            save_store(out, store)
            print(f"evidence: {label}: {wall:.1f} s", file=sys.stderr)
    return 0


# ------------------------------------------------------------------------------------------- report


def _acc(c: dict | None) -> str:
    if c is None:
        return "-"
    if not c.get("supported"):
        return "cannot run"
    lo, hi = c["wilson95"]
    return f"{c['correct']}/{c['n']} = {c['accuracy']:.0%} [{lo:.0%}, {hi:.0%}]"


def report(store: dict) -> str:
    cells = store["cells"]
    lines = [f"Evidence on {store['model']} (sha256 {store['model_sha256'][:12]}); accuracy k/n [95% Wilson]", ""]
    lengths = sorted({c["length"] for c in cells.values() if c["task"] != "kld"})
    for task in TASKS:
        budgets = sorted({c["budget"] for c in cells.values() if c["task"] == task and c["budget"] is not None})
        if not budgets:
            continue
        lines += [f"**{task}**", "", "| length | budget | method | KV / full | window | accuracy |", "|---|---|---|---|---|---|"]
        for length in lengths:
            for m in _method_order({c["method"] for c in cells.values() if is_full(c["method"])}):
                # the f16 full cache, then the same in other KV types
                full = cells.get(cell_key(task, length, m, None))
                if full:
                    kv = f"{full.get('kv_fraction', 1.0):.3f}"
                    lines.append(f"| {length} | - | {m}{_source(full)} | {kv} | - | {_acc(full)} |")
            for b in budgets:
                ms = _method_order({c["method"] for c in cells.values() if not is_full(c["method"])})
                for m in ms:
                    c = cells.get(cell_key(task, length, m, b))
                    if c is None:
                        continue
                    kv = f"{c['kv_fraction']:.3f}" if c.get("supported") else "-"
                    lines.append(f"| {length} | {b:g} | {m}{_source(c)} | {kv} | {c.get('window', '-')} | {_acc(c)} |")
        lines.append("")
    kl = sorted((c for c in cells.values() if c["task"] == "kld"), key=lambda c: (c["length"], c["budget"], c["method"]))
    if kl:
        lines += ["**next-token KLD against the full cache** (95% block bootstrap)", "",
                  "| length | budget | method | KV / full | window | mean KLD | top-1 | KLD past S+W |",
                  "|---|---|---|---|---|---|---|---|"]
        for c in kl:
            if not c.get("supported"):
                lines.append(f"| {c['length']} | {c['budget']:g} | {c['method']} | - | - | cannot run | | |")
                continue
            past = c["kld_mean_past_window"]
            lines.append(f"| {c['length']} | {c['budget']:g} | {c['method']}{_source(c)} | {c['kv_fraction']:.3f} | "
                         f"{c['window']} | "
                         f"{c['kld_mean']:.4f} [{c['kld95'][0]:.4f}, {c['kld95'][1]:.4f}] | "
                         f"{c['top1']:.1%} [{c['top1_95'][0]:.1%}, {c['top1_95'][1]:.1%}] | "
                         + (f"{past:.4f} |" if past is not None else "- |"))
        lines.append("")
    lines += paired_layer_windows(store)
    lines += paired_accuracy(store)
    lines += needle_misses(store)
    lines += targets(store)
    return "\n".join(lines)


def _method_order(methods: set[str]) -> list[str]:
    """The plans' methods in METHODS order, then the re-selected ratios (razor_r*)."""
    return [m for m in METHODS if m in methods] + sorted(m for m in methods if m not in METHODS)


def paired_accuracy(store: dict) -> list[str]:
    """Each method against razor on the same prompts (a method with pins against the same without them): the
    discordant pairs (prompts one answers and the other does not) and the two-sided exact sign test, the
    comparison an accuracy difference of a few prompts needs."""
    cells = store["cells"]
    out = []
    for c in sorted(cells.values(), key=lambda c: (c["task"], c["length"], c["budget"] or 0, c["method"])):
        base = c["method"].replace("razor_pins", "razor", 1) if c["method"].startswith("razor_pins") else "razor"
        if split_method(c["method"])[1]:  # a method in another KV type: against itself in f16
            base = split_method(c["method"])[0]
        if c["task"] == "kld" or c["method"] in ("full", base) or not c.get("supported"):
            continue
        r = cells.get(cell_key(c["task"], c["length"], base, c["budget"]))
        if not (r and r.get("supported")):
            continue
        k_c, k_r, n, b, d = discordant(c, r)
        at = "" if c["budget"] is None else f", budget {c['budget']:g}"
        out.append(f"- {c['task']} {c['length']}{at}: {c['method']} {k_c}/{n} vs {base} {k_r}/{n}; "
                   f"{b} vs {d} discordant (sign test p = {sign_test(b, d):.3g})")
    return ["**each method against razor (with pins: against the same without; in another KV type: against the same "
            "in f16) on the same prompts**", "", *out,
            ""] if out else []


def paired_layer_windows(store: dict) -> list[str]:
    """KLD of razor (the model's per-layer windows) over razor_uniform on the same blocks, with a paired interval."""
    import numpy as np

    out = []
    for c in sorted(store["cells"].values(), key=lambda c: (c["length"], c["budget"] or 0)):
        if c["task"] != "kld" or c["method"] != "razor_uniform" or not c.get("supported"):
            continue
        r = store["cells"].get(cell_key("kld", c["length"], "razor", c["budget"]))
        if not (r and r.get("supported")):
            continue
        lo, hi = bootstrap_ratio(np.array(r["block_kld"]), np.array(c["block_kld"]), weights=np.array(r["block_weights"]))
        out.append(f"- {c['length']} tokens, budget {c['budget']:g}: per-layer windows KLD {r['kld_mean']:.4f} vs uniform "
                   f"{c['kld_mean']:.4f}, ratio {r['kld_mean'] / c['kld_mean']:.2f} [95% {lo:.2f}, {hi:.2f}]; top-1 "
                   f"{r['top1']:.1%} vs {c['top1']:.1%}; KV {r['kv_fraction']:.3f} vs {c['kv_fraction']:.3f} of full")
    return ["**per-layer windows against one uniform window** (paired block bootstrap)", "", *out, ""] if out else []


def needle_misses(store: dict) -> list[str]:
    """Multi-needle misses by the needle the answer names: a distractor inside the cell's local window (one that
    starts in the prompt's last W tokens), another distractor, or no needle; for a cell with a window, also the
    misses on prompts the full cache answers. Cells recorded before runs wrote the needles (`annotate`) are left out."""
    cells, out = store["cells"], []

    def kinds(ps: list, w: int | None) -> str:
        k = [("none" if p["named"] is None else
              "window" if w and p["needle_pos"][p["named"]] >= p["n_tokens"] - w else "other") for p in ps]
        return ", ".join([f"{k.count('window')} named a distractor in the window"] * bool(w) + [
            f"{k.count('other')} {'another distractor' if w else 'named a distractor'}", f"{k.count('none')} no needle"])

    for c in sorted(cells.values(), key=lambda c: (c["task"], c["length"], c["budget"] or 0, c["method"])):
        if c["task"] != "mniah" or not c.get("supported") or any("named" not in p for p in c["prompts"]):
            continue
        w = c.get("window")
        misses = [p for p in c["prompts"] if not p["correct"]]
        at = "" if c["budget"] is None else f", budget {c['budget']:g}"
        line = (f"- mniah {c['length']}{at}: {c['method']}{f' (W {w})' if w else ''}: {len(misses)} of {c['n']} "
                f"missed: {kinds(misses, w)}")
        f = cells.get(cell_key("mniah", c["length"], "full", None))
        if w and f and f.get("supported") and same_prompts(c, f):
            right = {p["i"] for p in f["prompts"] if p["correct"]}
            lost = [p for p in misses if p["i"] in right]
            line += f"; {len(lost)} of them the full cache answers" + (f" ({kinds(lost, w)})" if lost else "")
        out.append(line)
    return ["**multi-needle misses by the needle they name** (a distractor in the window: one in the prompt's "
            "last W tokens, which the local heads still see)", "", *out, ""] if out else []


def _streaming_like(cells: dict, task: str, length: int, method: str, budget: float) -> dict | None:
    """StreamingLLM's cell at the same memory as `method`: in its KV type when measured (quantization helps both),
    else in f16."""
    kv_type = split_method(method)[1]
    s = cells.get(cell_key(task, length, f"streaming+{kv_type}", budget)) if kv_type else None
    return s or cells.get(cell_key(task, length, "streaming", budget))


def targets(store: dict, budget: float = 0.35) -> list[str]:
    """The issue's targets at KV <= `budget` of full, 4k and 8k: met or missed, by how much, with the discordant
    prompts against the full cache (a reference from another file only where its prompts are the same)."""
    import numpy as np

    cells = store["cells"]
    out = [f"**targets at budget {budget:g}**", ""]
    for length in (4096, 8192):
        for task in TASKS:
            f = cells.get(cell_key(task, length, "full", None))
            if not f:
                continue
            for method in _razor_methods(cells, task, length, budget):
                r = cells[cell_key(task, length, method, budget)]
                kv_type = split_method(method)[1]
                s = _streaming_like(cells, task, length, method, budget)
                if not r.get("supported") or r["n"] < TARGET_PROMPTS:
                    continue
                if not same_prompts(r, f):
                    out.append(f"- {task} {length}: {method}: the full cache{_source(f)} ran other prompts; "
                               "not compared")
                    continue
                d_full = 100 * (r["accuracy"] - f["accuracy"])
                line = (f"- {task} {length}: {method} {r['accuracy']:.0%} vs full{_source(f)} {f['accuracy']:.0%} "
                        f"({d_full:+.0f} points, {_discordant(r, f)}; target >= -5: "
                        f"{'met' if d_full >= -5 else 'MISSED'}); ")
                if s and s.get("supported") and same_prompts(r, s):
                    d_str = 100 * (r["accuracy"] - s["accuracy"])
                    line += (f"{s['method']}{_source(s)} {s['accuracy']:.0%} ({d_str:+.0f} points below {method}; "
                             f"target >= 30: {'met' if d_str >= 30 else 'MISSED'}); ")
                else:
                    line += "streaming not measured on these prompts; "
                ft = cells.get(cell_key(task, length, f"full+{kv_type}", None)) if kv_type else None
                if ft and same_prompts(r, ft):  # what the type alone costs, beside what razor does
                    line += f"full+{kv_type} {ft['accuracy']:.0%} ({_discordant(r, ft)}); "
                out.append(line + f"{method} KV {r['kv_fraction']:.3f} of full")
        if length != 8192:
            continue
        for method in _razor_methods(cells, "kld", length, budget):
            r = cells[cell_key("kld", length, method, budget)]
            s = _streaming_like(cells, "kld", length, method, budget)
            if not (s and s.get("supported")) or not r.get("supported") or not same_prompts(r, s):
                continue
            lo, hi = bootstrap_ratio(np.array(r["block_kld"]), np.array(s["block_kld"]),
                                     weights=np.array(r["block_weights"]))
            ratio = r["kld_mean"] / s["kld_mean"]
            out.append(f"- kld 8192: {method} top-1 {r['top1']:.1%} (target >= 96%: "
                       f"{'met' if r['top1'] >= 0.96 else 'MISSED'}); KLD {ratio:.2f}x {s['method']}'s{_source(s)} "
                       f"[95% {lo:.2f}, {hi:.2f}] (target <= 1.2x: {'met' if ratio <= 1.2 else 'MISSED'}); "
                       f"KV {r['kv_fraction']:.3f}")
    return out + [""] if len(out) > 2 else []


def discordant(a: dict, b: dict) -> tuple[int, int, int, int, int]:
    """Two retrieval cells on the prompts both ran: (a's correct, b's correct, prompts, only a right, only b right)."""
    mine, theirs = ({p["i"]: p["correct"] for p in x["prompts"]} for x in (a, b))
    both = mine.keys() & theirs.keys()
    return (sum(mine[i] for i in both), sum(theirs[i] for i in both), len(both),
            sum(mine[i] and not theirs[i] for i in both), sum(theirs[i] and not mine[i] for i in both))


def _discordant(r: dict, f: dict) -> str:
    *_, b, d = discordant(r, f)
    return f"{b} vs {d} discordant, sign test p = {sign_test(b, d):.3g}"


def _source(c: dict) -> str:
    return f" ({c['source']})" if c.get("source") else ""


def same_prompts(a: dict, b: dict) -> bool:
    """Whether cell b ran every prompt of cell a, the same text: per prompt the same expected answer and token
    count (retrieval), or the same blocks of the same held-out text at the same ubatch (KLD: the full cache's
    logits, the reference of both, depend on it)."""
    if a["task"] == "kld":
        return (a["n_positions"], a["block_weights"], a["n_ubatch"]) == (b["n_positions"], b["block_weights"],
                                                                        b["n_ubatch"])
    theirs = {p["i"]: (p["expected"], p["n_tokens"]) for p in b["prompts"]}
    return all(theirs.get(p["i"]) == (p["expected"], p["n_tokens"]) for p in a["prompts"])


def read_results(path: pathlib.Path) -> dict:
    """A results file's store; anything else is a one-line error, exit 2."""
    try:
        store = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        print(f"evidence: {path}: not a results file ({e})", file=sys.stderr)
        raise SystemExit(2)
    if not isinstance(store, dict) or not isinstance(store.get("cells"), dict):
        print(f"evidence: {path}: not a results file", file=sys.stderr)
        raise SystemExit(2)
    return store


def merge_references(store: dict, path: pathlib.Path) -> None:
    """The full and streaming cells of another results file that this one lacks, marked with their file: the
    references for a file whose run left them out (a model file embedded again has another sha256 with the
    same weights, so its run starts a new file). Settings must agree; the pairing and the targets then use a
    merged cell only on identical prompts (same_prompts)."""
    other = read_results(path)
    if (other.get("settings"), other.get("model")) != (store.get("settings"), store.get("model")):
        print(f"evidence: {path} ran another model name or other settings than the report's file; not merged",
              file=sys.stderr)
        raise SystemExit(2)
    have = {(c["task"], c["length"], c["budget"]) for c in store["cells"].values()}
    for key, c in other["cells"].items():
        if (c.get("method") in ("full", "streaming") and key not in store["cells"] and c.get("supported", True)
                and any(h[:2] == (c["task"], c["length"]) and c["budget"] in (None, h[2]) for h in have)):
            store["cells"][key] = {**c, "source": path.name}


def _razor_methods(cells: dict, task: str, length: int, budget: float) -> list[str]:
    """The methods with a cell at (task, length, budget) other than the references (full, streaming), razor
    first: the default is what the targets are for; the others (pins, other ratios) are reported beside it."""
    return _method_order({c["method"] for c in cells.values() if c["task"] == task and c["length"] == length
                          and c["budget"] == budget and not is_full(c["method"])
                          and split_method(c["method"])[0] != "streaming"})


def plot(store: dict, path: str) -> None:
    """Frontier: accuracy (Wilson bars) and KLD against allocated KV fraction, per method, at the prompt length
    with the most budgets (4096 in the plans)."""
    from razor_gguf import plotting

    plt = plotting.pyplot()
    ok = [c for c in store["cells"].values() if c.get("supported")]
    length = max({c["length"] for c in ok}, key=lambda n: (len({c["budget"] for c in ok if c["length"] == n}), n))
    cells = [c for c in ok if c["length"] == length]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), layout="constrained")
    style = {"razor": ("tab:blue", "o"), "razor_paper": ("tab:purple", "s"), "streaming": ("tab:orange", "^")}
    extra = sorted({c["method"] for c in cells} - set(style) - {"full"})  # re-selected ratios, pins, ...
    style.update({m: (color, "D") for m, color in zip(extra, ("tab:green", "tab:cyan", "tab:olive", "tab:brown",
                                                                 "tab:red", "tab:pink", "tab:gray"))})
    for ax, task in zip(axes, (*TASKS, "kld")):
        full = next((c for c in cells if c["task"] == task and c["method"] == "full"), None)
        for m, (color, marker) in style.items():
            cs = sorted((c for c in cells if c["task"] == task and c["method"] == m), key=lambda c: c["kv_fraction"])
            if not cs:
                continue
            x = [c["kv_fraction"] for c in cs]
            y, ci = ([c["kld_mean"] for c in cs], [c["kld95"] for c in cs]) if task == "kld" else \
                ([c["accuracy"] for c in cs], [c["wilson95"] for c in cs])
            # a percentile interval can miss its own mean by rounding: no negative bar lengths
            err = [[max(0.0, v - lo) for v, (lo, _) in zip(y, ci)], [max(0.0, hi - v) for v, (_, hi) in zip(y, ci)]]
            ax.errorbar(x, y, yerr=err, color=color, marker=marker, capsize=3, label=m)
        if full and task != "kld":
            ax.axhline(full["accuracy"], color="gray", ls="--", lw=1, label=f"full cache ({full['n']} prompts)")
        ns = sorted({c.get("n", 1) for c in cells if c["task"] == task and c["method"] != "full"}) or [0]
        n = f"{ns[0]}" if len(ns) == 1 else f"{ns[0]}-{ns[-1]}"
        ax.set(xlabel="allocated KV / full cache", xlim=(0, 0.6),
               ylabel="mean KLD vs full (nats)" if task == "kld" else "accuracy",
               title=f"{task}, {length} tokens" + (", 95% bootstrap" if task == "kld" else
                                                   f", {n} prompts per point, 95% Wilson"))
        if task != "kld":
            ax.set_ylim(-0.02, 1.02)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(f"{store['model']}: quality against allocated KV memory")
    plotting.save(fig, path)


def cmd_annotate(args) -> int:
    """Adds the needles (razor_gguf.niah.needle_choice) to multi-needle prompts recorded before runs wrote them.
    The prompts are seeded, so each is made again and checked against its recorded answer and token count before it
    is touched: a file of older runs of the same model (another GGUF file, weights not recorded yet) can be annotated
    too."""
    import razor_gguf  # noqa: F401  (loads the patched llama.cpp for llama_cpp)
    import llama_cpp
    from razor_gguf import niah

    path = pathlib.Path(args.results)
    store = read_results(path)  # not load_store: each prompt is checked below, not the file's model
    llm = llama_cpp.Llama(model_path=args.model, vocab_only=True, verbose=False)
    tok = lambda text: llm.tokenize(text.encode(), add_bos=True)  # noqa: E731
    haystack, made, n = niah.haystack_text(), {}, 0
    for key, c in store["cells"].items():
        for rec in c.get("prompts", []) if c["task"] == "mniah" else []:
            if "named" in rec:
                continue
            at = (c["length"], rec["i"])
            if at not in made:
                p = mniah_prompt(tok, *at, haystack)
                if (p.answer, len(tok(p.text))) != (rec["expected"], rec["n_tokens"]):
                    print(f"evidence: {key} prompt {rec['i']} is not the prompt this Python and model make (another "
                          "haystack or tokenizer); nothing annotated", file=sys.stderr)
                    return 2
                made[at] = p
            rec.update(niah.needle_choice(tok, made[at], rec["answer"]))
            n += 1
    llm.close()
    save_store(path, store)
    print(f"evidence: {n} multi-needle prompts annotated in {path}")
    return 0


def cmd_report(args) -> int:
    store = read_results(pathlib.Path(args.results))
    for ref in args.ref or []:
        merge_references(store, pathlib.Path(ref))
    print(report(store))
    if args.plot:
        plot(store, args.plot)
        print(f"plot: {args.plot}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run the cells a plan still lacks, appending each to --out")
    r.add_argument("model", metavar="MODEL.gguf")
    r.add_argument("--out", required=True, help="results JSON (created, or extended)")
    r.add_argument("--plan", default="targets,frontier,kld", help=f"comma-separated, of {', '.join(PLANS)}")
    r.add_argument("--ctx", type=int, action="append", help="prompt lengths instead of the plans' (repeatable)")
    r.add_argument("--budget", type=float, action="append", help="KV budgets instead of the plans' (repeatable)")
    r.add_argument("--n", type=int, help="prompts per retrieval cell instead of the plans'")
    r.add_argument("--task", action="append", help="only this task of the plans (passkey, mniah, kld; repeatable)")
    r.add_argument("--method", action="append",
                   help="this method instead of the plans' (full, razor, razor_pins_r0.1, streaming+q8_0, ...; repeatable)")
    r.add_argument("--n-gpu-layers", type=int, default=0)
    r.add_argument("--max-minutes", type=float, help="start no new cell after this long")
    r.add_argument("--no-progress", dest="progress", action="store_false")
    r.set_defaults(func=cmd_run)
    p = sub.add_parser("report", help="markdown tables and the target checks; --plot draws the frontier")
    p.add_argument("results")
    p.add_argument("--plot", metavar="OUT.png")
    p.add_argument("--ref", action="append", metavar="OTHER.json",
                   help="take the full and streaming cells this file lacks from another run of the same prompts")
    p.set_defaults(func=cmd_report)
    a = sub.add_parser("annotate", help="add the needles each answer names to multi-needle prompts recorded without")
    a.add_argument("results")
    a.add_argument("model", metavar="MODEL.gguf", help="a GGUF file of the results' weights (its tokenizer)")
    a.set_defaults(func=cmd_annotate, ref=None)
    args = ap.parse_args(argv)
    if args.cmd == "run":
        bad = [p for p in args.plan.split(",") if p not in PLANS]
        if bad:
            ap.error(f"unknown plan {bad[0]!r}; plans: {', '.join(PLANS)}")
        bad = [m for m in args.method or [] if not known_method(m)]
        if bad:
            ap.error(f"unknown method {bad[0]!r}; methods: {', '.join(METHODS)}, or one of them but full with _rX, "
                     f"any with +TYPE ({', '.join(KV_CACHE_TYPES)})")
        if not os.path.isfile(args.model):
            ap.error(f"{args.model}: no such file")
    else:
        files = [args.results, *(args.ref or []), *([args.model] if args.cmd == "annotate" else [])]
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            ap.error(f"{missing[0]}: no such file")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
