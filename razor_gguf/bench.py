"""`razor-gguf bench`: prefill and decode tokens/s and allocated KV bytes, razor against the full cache
(SPEC section 5).

Each (context length, mode) pair runs in a fresh worker process (`python -m razor_gguf.bench --worker
SPEC`), so the peak resident memory of one run is not inflated by an earlier, larger one, and a crash or
an out-of-memory kill in one run is reported as a one-line error instead of taking the CLI down.
The worker prints one JSON line on stdout; progress goes to stderr, and --json prints one object on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from .errors import UserError, error
from .machine import machine_info
from .options import add_kv_budget_argument, add_rpc_argument, flag_razor_overrides

# mode -> (razor cache on, KV cache type: None = llama.cpp's default F16, 8 = GGML_TYPE_Q8_0).
# A quantized V cache needs flash attention in the pinned llama.cpp; the bench always turns it on.
MODES = {
    "full": (False, None),
    "razor": (True, None),
    "full_q8_0": (False, 8),
    "razor_q8_0": (True, 8),
}
DEFAULT_MODES = "full,razor,razor_q8_0"
RPC = "@rpc"  # with --rpc every mode also runs on the RPC workers, as MODE@rpc
MIN_CTX = 64
MIN_PROMPT = 32  # a prefill shorter than this measures overhead, not throughput
SEED = 0


# ---------------------------------------------------------------------------------------------- worker


def _prompt_tokens(n: int, n_vocab: int) -> list[int]:
    import numpy as np

    # Ids from a range that holds ordinary tokens in common vocabularies (no control tokens at the
    # bottom, no byte-fallback or added tokens at the top); the content does not matter for speed.
    hi = min(n_vocab, 30000)
    return np.random.default_rng(SEED).integers(100, hi, size=n).tolist()


def run_one(spec: dict) -> dict:
    """One measurement in this process: load, allocate, prefill, decode. Returns a `runs` entry."""
    import resource

    import razor_gguf  # noqa: F401  (binds the patched libraries before llama_cpp is imported)

    from . import _native
    from .llama import Llama, RazorUnavailableError

    razor, kv_type = MODES[spec["mode"].removesuffix(RPC)]
    overrides: dict = {"razor.enabled": razor}
    if razor:
        overrides.update(spec["razor_overrides"])
    kw = {"type_k": kv_type, "type_v": kv_type} if kv_type is not None else {}
    n_gpu_layers = spec["n_gpu_layers"]
    if spec["mode"].endswith(RPC):  # every layer on the workers
        kw["rpc_servers"] = spec["rpc"]
        n_gpu_layers = -1
    n_ctx = spec["ctx"]
    try:
        # razor=True: a context that cannot run razor raises, with llama.cpp's reason
        llm = Llama(
            model_path=spec["model"], n_ctx=n_ctx, n_batch=spec["n_ubatch"], n_ubatch=spec["n_ubatch"],
            flash_attn=True, n_threads=spec["n_threads"], n_gpu_layers=n_gpu_layers,
            swa_full=spec.get("swa_full", False), kv_overrides=overrides, razor=razor, verbose=False, **kw,
        )
    except RazorUnavailableError as e:
        return {"mode": spec["mode"], "ctx": n_ctx, "supported": False, "reason": str(e), "kv_bytes": None,
                "kv_bytes_full_equiv": None, "prefill_tps": None, "decode_tps": None, "peak_rss_bytes": None}
    kb = _native.kv_bytes(llm._ctx.ctx)
    sink_window = _native.window(llm._ctx.ctx)
    hm = _native.head_map(llm._ctx.ctx)
    run = {
        "mode": spec["mode"],
        "ctx": n_ctx,
        "supported": True,
        "kv_bytes": kb.total,
        "kv_bytes_full_equiv": kb.full_equiv,
        "prefill_tps": None,
        "decode_tps": None,
        "peak_rss_bytes": None,
        "n_prompt": 0,
        "n_decode": 0,
        "n_sink": sink_window[0] if sink_window else None,
        "window": sink_window[1] if sink_window else None,
        "retrieval_heads": sum(hm) if hm else None,
        "pins": _native.n_pin(llm._ctx.ctx),
        "loadavg_1m": round(os.getloadavg()[0], 2),  # contention from other processes skews the speeds
    }
    if not spec["kv_only"]:
        n_decode = spec["n_decode"]
        n_prompt = n_ctx - n_decode - 1
        toks = _prompt_tokens(n_prompt + n_decode, llm.n_vocab())
        t0 = time.perf_counter()
        llm.eval(toks[:n_prompt])  # one call: llama-cpp-python splits it into n_batch chunks (with pins: twice)
        prefill_s = time.perf_counter() - t0
        run["pinned"] = len(llm.pinned)
        # Decode at a context of ~n_ctx tokens: one token per eval, the fixed ids standing in for
        # sampled ones, so only the forward passes are timed (no sampling, no detokenizing).
        decode_s = 0.0
        for tok in toks[n_prompt:]:
            t0 = time.perf_counter()
            llm.eval([tok])
            decode_s += time.perf_counter() - t0
        run.update(prefill_tps=n_prompt / prefill_s, decode_tps=n_decode / decode_s,
                   n_prompt=n_prompt, n_decode=n_decode)
    run["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return run


def _worker_main(spec_json: str) -> int:
    try:
        out = run_one(json.loads(spec_json))
    except Exception as e:  # reported by the parent as one line
        # a ValueError is llama-cpp-python's or razor's own message (a failed load, a budget that cannot be met)
        out = {"error": (str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}").splitlines()[0]}
    print(json.dumps(out), flush=True)
    return 1 if "error" in out else 0


# ---------------------------------------------------------------------------------------------- parent


def _check(model: str, ctx: list[int], modes: str | list[str], n_decode: int, kv_only: bool, n_ubatch: int,
           threads: int | None, razor: dict) -> tuple[list[str], dict]:
    """Validate everything before the first worker starts; returns (modes, razor overrides)."""
    from .metadata import MetadataError, open_gguf, read_razor

    names = modes.split(",") if isinstance(modes, str) else modes
    modes = []
    for m in (x.strip() for x in names):
        if m not in MODES:
            raise UserError(f"--modes: unknown mode {m!r} (choose from {', '.join(MODES)})")
        if m not in modes:
            modes.append(m)
    if not ctx:
        raise UserError("--ctx: give at least one context length")
    if n_decode < 1:
        raise UserError(f"--n-decode must be >= 1, got {n_decode}")
    min_ctx = MIN_CTX if kv_only else max(MIN_CTX, n_decode + 1 + MIN_PROMPT)
    for n in ctx:
        if n < min_ctx:
            why = "" if min_ctx == MIN_CTX else f" (--n-decode {n_decode} + 1 + a {MIN_PROMPT}-token prompt)"
            raise UserError(f"--ctx {n} is too small: at least {min_ctx}{why}")
    if threads is not None and threads < 1:
        raise UserError(f"--threads must be >= 1, got {threads}")
    if n_ubatch < 1:
        raise UserError(f"--n-ubatch must be >= 1, got {n_ubatch}")
    overrides = flag_razor_overrides(**razor)  # the same checks and kv_overrides keys as razor_gguf.Llama

    try:
        reader = open_gguf(model)
        info = read_razor(reader)
    except MetadataError as e:
        raise UserError(str(e)) from None
    if info is None and any(MODES[m][0] for m in modes):
        raise UserError(f"{model}: no razor.* keys, so the razor modes cannot run "
                        f"(run razor-gguf embed-heads first, or use --modes full)")
    arch = reader.get_field("general.architecture")
    train = reader.get_field(f"{arch.contents()}.context_length") if arch else None
    if train is not None and max(ctx) > int(train.contents()):
        print(f"bench: note: --ctx {max(ctx)} is beyond the model's training context "
              f"{int(train.contents())}; speed and KV bytes are still measured, output quality is not",
              file=sys.stderr)
    return modes, overrides


def _spawn(spec: dict) -> dict:
    cmd = [sys.executable, "-m", "razor_gguf.bench", "--worker", json.dumps(spec)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    lines = [l for l in r.stdout.splitlines() if l.startswith("{")]
    out = json.loads(lines[-1]) if lines else {}
    if r.returncode == 0 and "error" not in out and out:
        return out
    where = f"{spec['mode']} at --ctx {spec['ctx']}"
    if "error" in out:
        raise UserError(f"{where}: {out['error']}")
    if r.returncode < 0:  # killed by a signal: SIGKILL is usually the kernel's out-of-memory killer
        raise UserError(f"{where}: the worker was killed by signal {-r.returncode} (out of memory?)")
    tail = [l for l in r.stderr.splitlines() if l.strip()]
    raise UserError(f"{where}: the worker failed (exit {r.returncode}): {tail[-1] if tail else 'no message'}")


def _ratios(runs: list[dict]) -> list[dict]:
    """Every mode against the stock F16 cache ("full") at the same context and place (here, or full@rpc on the
    RPC workers), and every MODE@rpc against MODE here, when those ran."""
    by = {(r["mode"], r["ctx"]): r for r in runs if r["supported"]}

    def div(a, b):
        return a / b if a is not None and b else None

    out = []
    for (mode, ctx), r in by.items():
        pairs = [("full" + RPC if mode.endswith(RPC) else "full", mode)]
        if mode.endswith(RPC):
            pairs.append((mode.removesuffix(RPC), mode))
        for base, _ in pairs:
            b = by.get((base, ctx))
            if b is None or base == mode:
                continue
            out.append({"ctx": ctx, "mode": mode, "baseline": base,
                        "kv_fraction": div(r["kv_bytes"], b["kv_bytes"]),
                        "prefill_ratio": div(r["prefill_tps"], b["prefill_tps"]),
                        "decode_speedup": div(r["decode_tps"], b["decode_tps"])})
    return out


def format_table(res: dict) -> str:
    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    rows = [("mode", "ctx", "KV MiB", "% of full", "prefill tok/s", "decode tok/s", "peak RSS MiB")]
    for r in res["runs"]:
        if not r["supported"]:
            rows.append((r["mode"], str(r["ctx"]), "not run", "-", "-", "-", "-"))
            continue
        rows.append((r["mode"], str(r["ctx"]), f(r["kv_bytes"] / 2**20, ".1f"),
                     f(100 * r["kv_bytes"] / r["kv_bytes_full_equiv"], ".1f"),
                     f(r["prefill_tps"], ".1f"), f(r["decode_tps"], ".2f"), f(r["peak_rss_bytes"] / 2**20, ".0f")))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.append("(% of full: against a stock cache of the same KV type and context)")
    for why in sorted({r["reason"] for r in res["runs"] if not r["supported"]}):
        lines.append(f"not run: {why}")
    for q in res["ratios"]:
        lines.append(f"{q['mode']} vs {q['baseline']} at ctx {q['ctx']}: KV x{f(q['kv_fraction'], '.3f')}, "
                     f"prefill x{f(q['prefill_ratio'], '.2f')}, decode x{f(q['decode_speedup'], '.2f')}")
    return "\n".join(lines)


def bench(
    model: str,
    ctx: list[int],
    *,
    modes: str | list[str] = DEFAULT_MODES,
    n_decode: int = 64,
    kv_only: bool = False,
    n_ubatch: int = 512,
    threads: int | None = None,
    n_gpu_layers: int = 0,
    n_sink: int | None = None,
    window: int | None = None,
    retrieval_ratio: float | None = None,
    kv_budget: float | str | None = None,
    layer_windows: bool | None = None,
    pins: int | None = None,
    compensation: bool | None = None,
    swa_full: bool = False,
    rpc: str | list[str] | None = None,
) -> dict:
    """Measure every mode at every context length, each in a fresh worker process.

    Returns the `razor-gguf bench --json` object; bad input raises UserError before any run.
    Razor options left at None take the model's metadata; kv_budget sets the window per context.
    swa_full: sliding-window models keep a full-size SWA cache (llama-cpp-python's default) instead of
    window + ubatch cells (llama.cpp's own tools' default, used here for every mode alike).
    rpc: llama.cpp RPC workers ("HOST:PORT,..."): every mode runs here and, as MODE@rpc, with every layer on them.
    pins: tokens of the prompt every local head keeps (razor.n_pin, with the compensation row off, as pins need):
    the razor modes then read the prompt twice, as razor_gguf.Llama does, and the prefill speed counts both reads.
    compensation: the compensation row on or off (default: the model's; off with pins).
    """
    if pins and compensation:
        raise UserError("--pins needs the compensation row off (--no-compensation)")
    razor = {"n_sink": n_sink, "window": window, "retrieval_ratio": retrieval_ratio, "kv_budget": kv_budget,
             "layer_windows": layer_windows, "pins": pins,
             "compensation": False if pins and compensation is None else compensation}
    modes, overrides = _check(model, ctx, modes, n_decode, kv_only, n_ubatch, threads, razor)
    if rpc:
        from . import _native

        try:
            rpc = _native.check_rpc_servers(rpc)  # every worker answers before the first run (each run registers them)
        except _native.RpcServerError as e:
            raise UserError(f"--rpc: {e}") from None
        modes = modes + [m + RPC for m in modes]
    settings = {
        "modes": modes, "ctx": list(ctx), "n_decode": None if kv_only else n_decode,
        "kv_only": kv_only, "n_batch": n_ubatch, "n_ubatch": n_ubatch, "flash_attn": True,
        "n_threads": threads or os.cpu_count(), "n_gpu_layers": n_gpu_layers, "swa_full": swa_full, "rpc": rpc,
        "razor_overrides": overrides, "prompt": f"random ids in [100, min(n_vocab, 30000)), seed {SEED}",
    }
    res = {"model": os.path.abspath(model), "machine": machine_info(), "settings": settings, "runs": []}
    for n in ctx:
        for mode in modes:
            print(f"bench: {mode} at ctx {n} ...", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            run = _spawn({"model": res["model"], "mode": mode, "ctx": n, "n_decode": n_decode,
                          "kv_only": kv_only, "n_ubatch": n_ubatch, "n_threads": settings["n_threads"],
                          "n_gpu_layers": n_gpu_layers, "swa_full": swa_full, "rpc": rpc,
                          "razor_overrides": overrides})
            res["runs"].append(run)
            if not run["supported"]:
                print(f"bench: {mode} at ctx {n}: not run: {run['reason']}", file=sys.stderr, flush=True)
                continue
            speed = "" if kv_only else \
                f", prefill {run['prefill_tps']:.1f} tok/s, decode {run['decode_tps']:.2f} tok/s"
            print(f"bench: {mode} at ctx {n}: KV {run['kv_bytes'] / 2**20:.1f} MiB{speed} "
                  f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    res["ratios"] = _ratios(res["runs"])
    return res


def plot(res: dict, path: str) -> None:
    """KV MiB, prefill and decode tok/s against context length, one line per mode."""
    from . import plotting

    plt = plotting.pyplot()
    panels = [("kv_bytes", "allocated KV cache (MiB)", 2**-20), ("prefill_tps", "prefill tokens/s", 1.0),
              ("decode_tps", "decode tokens/s", 1.0), ("peak_rss_bytes", "peak resident memory (MiB)", 2**-20)]
    runs = [r for r in res["runs"] if r["supported"]]
    if res["settings"]["kv_only"]:
        panels = panels[:1]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False)
    for ax, (key, label, scale) in zip(axes[0], panels):
        for mode in res["settings"]["modes"]:
            pts = sorted((r["ctx"], r[key] * scale) for r in runs if r["mode"] == mode and r[key] is not None)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=mode)
        ax.set_xscale("log", base=2)
        ax.set(xlabel="context (tokens)", ylabel=label)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    m = res["machine"]
    fig.suptitle(f"{os.path.basename(res['model'])} on {m.get('cpu')} ({m.get('n_cores')} cores, "
                 f"{res['settings']['n_threads']} threads)", fontsize=9)
    fig.tight_layout()
    plotting.save(fig, path)


def cmd_bench(args) -> int:
    from . import plotting

    try:
        if args.plot:
            try:
                plotting.preflight(args.plot)
            except plotting.PlotError as e:
                raise UserError(str(e)) from None
        res = bench(args.model, args.ctx, modes=args.modes, n_decode=args.n_decode, kv_only=args.kv_only,
                    n_ubatch=args.n_ubatch, threads=args.threads, n_gpu_layers=args.n_gpu_layers,
                    n_sink=args.n_sink, window=args.window, retrieval_ratio=args.retrieval_ratio,
                    kv_budget=args.kv_budget, layer_windows=args.layer_windows, pins=args.pins,
                    compensation=args.compensation, swa_full=args.swa_full, rpc=args.rpc)
    except UserError as e:
        return error(str(e))
    except KeyboardInterrupt:  # subprocess.run kills the running worker on the way out
        return error("interrupted")
    if args.plot:
        plot(res, args.plot)
    print(json.dumps(res) if args.json else format_table(res))
    return 0


def add_subcommand(sub) -> None:
    b = sub.add_parser("bench", help="prefill/decode tokens/s and KV bytes, razor against the full cache")
    b.add_argument("model", metavar="MODEL.gguf")
    b.add_argument("--ctx", type=int, action="append", required=True, metavar="N",
                   help="context length; repeat for several")
    b.add_argument("--modes", default=DEFAULT_MODES,
                   help=f"comma-separated, from {', '.join(MODES)} (default {DEFAULT_MODES}); "
                        "_q8_0 = Q8_0 K and V caches")
    b.add_argument("--n-decode", type=int, default=64, help="tokens decoded one at a time after the prefill")
    b.add_argument("--kv-only", action="store_true", help="only allocate and report KV bytes (for large contexts)")
    b.add_argument("--window", type=int, help="razor.window override (default: the model's)")
    b.add_argument("--n-sink", type=int, help="razor.n_sink override (default: the model's)")
    b.add_argument("--retrieval-ratio", type=float, help="re-select retrieval heads from the stored scores")
    b.add_argument("--no-layer-windows", dest="layer_windows", action="store_false", default=None,
                   help="one window for every layer, ignoring the per-layer windows embed-heads stored")
    add_kv_budget_argument(b)
    b.add_argument("--pins", type=int, metavar="N",
                   help="tokens of the prompt every local head keeps, chosen by reading it twice (razor.n_pin; turns "
                        "the compensation row off); the prefill speed counts both reads")
    b.add_argument("--compensation", action=argparse.BooleanOptionalAction, default=None,
                   help="the compensation row of evicted tokens (default: the model's; off with --pins)")
    b.add_argument("--threads", type=int, help="CPU threads (default: all cores)")
    b.add_argument("--n-ubatch", type=int, default=512,
                   help="micro-batch size, also the batch size (default 512); razor's local ring holds this many extra rows")
    b.add_argument("--n-gpu-layers", type=int, default=0, help="layers to offload to a GPU backend (default 0)")
    add_rpc_argument(b)
    b.add_argument("--swa-full", action="store_true",
                   help="sliding-window models: a full-size SWA cache in every mode (default: window + ubatch "
                        "cells, as llama.cpp's own tools)")
    b.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    b.add_argument("--plot", metavar="OUT.png", help="draw KV bytes, prefill and decode speed against context")
    b.set_defaults(func=cmd_bench)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        sys.exit(_worker_main(sys.argv[2]))
    sys.exit(error("razor_gguf.bench is run as `razor-gguf bench`"))
