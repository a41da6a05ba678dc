"""Command-line options shared by the commands that run a model (chat, serve): the razor knobs, the
context settings, and loading a model with a one-line error for a bad path or file."""

from __future__ import annotations

import argparse
import os
from typing import Any

from .errors import UserError


def _env(name: str, cast, default=None):
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return cast(raw)
    except ValueError:
        raise UserError(f"environment variable {name}={raw!r} is not a valid {cast.__name__}") from None


def _env_bool(raw: str) -> bool:
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(raw)


_env_bool.__name__ = "boolean"


def flag_razor_overrides(**razor: Any) -> dict[str, Any]:
    """razor_overrides for the commands: a bad value is a UserError naming the flag (`--kv-budget ...`)."""
    from .overrides import razor_overrides

    try:
        return razor_overrides(**razor)
    except ValueError as e:
        raise UserError("--" + str(e).replace("_", "-", 1)) from None


def add_model_arguments(p: argparse.ArgumentParser, *, default_ctx: int) -> None:
    p.add_argument("model", metavar="MODEL.gguf")
    p.add_argument("--ctx", type=int, default=default_ctx, metavar="N", help=f"context length (default {default_ctx})")
    p.add_argument("--n-batch", type=int, default=512, metavar="N", help="prompt tokens per batch (default 512)")
    p.add_argument("--threads", type=int, help="CPU threads (default: llama-cpp-python's)")
    p.add_argument("--n-gpu-layers", type=int, default=0, metavar="N", help="layers to offload to a GPU (-1: all)")
    p.add_argument("--flash-attn", action=argparse.BooleanOptionalAction, default=True,
                   help="flash attention (default on)")
    add_kv_type_arguments(p)
    add_rpc_argument(p)
    g = p.add_argument_group("razor (environment variables RAZOR, RAZOR_N_SINK, RAZOR_WINDOW, "
                             "RAZOR_RETRIEVAL_RATIO, RAZOR_COMPENSATION, RAZOR_KV_BUDGET, RAZOR_PINS set the defaults)")
    g.add_argument("--razor", action=argparse.BooleanOptionalAction, default=None,
                   help="require (--razor) or turn off (--no-razor) the razor KV cache "
                        "(default: on when the model has a head map)")
    g.add_argument("--n-sink", type=int, metavar="N", help="sink tokens kept by local heads (default: the model's)")
    g.add_argument("--window", type=int, metavar="N", help="recent window kept by local heads (default: the model's)")
    g.add_argument("--retrieval-ratio", type=float, metavar="R",
                   help="re-select this fraction of KV heads as retrieval heads from the stored scores")
    g.add_argument("--compensation", action=argparse.BooleanOptionalAction, default=None,
                   help="the compensation row of evicted tokens (default: on)")
    g.add_argument("--layer-windows", action=argparse.BooleanOptionalAction, default=None,
                   help="the per-layer windows embed-heads stored, if any (default: on); --no-layer-windows gives "
                        "every layer the same window")
    add_kv_budget_argument(g)
    g.add_argument("--pins", type=int, metavar="N",
                   help="tokens of each prompt every local head keeps beside its window, chosen by a first read of the "
                        "prompt (needs --no-compensation; default 0)")


def add_kv_type_arguments(p) -> None:
    from .overrides import KV_CACHE_TYPES

    for part in ("k", "v"):
        p.add_argument(f"--cache-type-{part}", f"-ct{part}", metavar="TYPE",
                       help=f"KV cache type for {part.upper()} ({', '.join(KV_CACHE_TYPES)}; default f16). With razor a "
                            "fractional --kv-budget is of the full cache in these types" +
                            (" (a quantized V needs flash attention)" if part == "v" else ""))


def kv_type_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """type_k / type_v for llama_cpp.Llama from --cache-type-k / --cache-type-v (absent: llama.cpp's f16)."""
    from .overrides import KV_CACHE_TYPES, parse_kv_type

    kw: dict[str, Any] = {}
    for part in ("k", "v"):
        name = getattr(args, f"cache_type_{part}", None)
        if name is not None:
            try:
                kw[f"type_{part}"] = parse_kv_type(name)
            except ValueError as e:
                raise UserError(f"--cache-type-{part}: {e}") from None
    unquantized = {KV_CACHE_TYPES[t] for t in ("f32", "f16", "bf16")}
    if kw.get("type_v", KV_CACHE_TYPES["f16"]) not in unquantized and not getattr(args, "flash_attn", True):
        raise UserError(f"--cache-type-v {args.cache_type_v}: a quantized V cache needs flash attention "
                        "(drop --no-flash-attn)")
    return kw


def add_rpc_argument(p) -> None:
    p.add_argument("--rpc", metavar="HOST:PORT[,HOST:PORT...]",
                   help="llama.cpp RPC workers (razor-gguf rpc-server) to split the layers across; all layers go "
                        "there unless --n-gpu-layers says otherwise. The RPC protocol has no authentication: "
                        "trusted networks only")


def rpc_kwargs(rpc: str | None, n_gpu_layers: int) -> dict[str, Any]:
    """rpc_servers and n_gpu_layers for razor_gguf.Llama from --rpc: every layer on the workers unless
    --n-gpu-layers was given (its default 0 would leave them all here)."""
    if not rpc:
        return {}
    from . import _native

    try:
        servers = _native.parse_rpc_servers(rpc)
    except _native.RpcServerError as e:
        raise UserError(f"--rpc: {e}") from None
    return {"rpc_servers": servers, "n_gpu_layers": n_gpu_layers or -1}


def add_kv_budget_argument(p) -> None:
    p.add_argument("--kv-budget", metavar="B",
                   help="KV memory for the whole cache, a fraction of the full cache (0.35) or a size (96MiB, 1.5GiB): "
                        "sets the local heads' window for the context (instead of --window)")


def razor_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """razor_gguf.Llama's razor options from the flags, falling back to the RAZOR_* environment."""
    def pick(flag, env, cast):
        v = getattr(args, flag)
        return v if v is not None else _env(env, cast)

    return {
        "razor": pick("razor", "RAZOR", _env_bool),
        "n_sink": pick("n_sink", "RAZOR_N_SINK", int),
        "window": pick("window", "RAZOR_WINDOW", int),
        "retrieval_ratio": pick("retrieval_ratio", "RAZOR_RETRIEVAL_RATIO", float),
        "compensation": pick("compensation", "RAZOR_COMPENSATION", _env_bool),
        "kv_budget": pick("kv_budget", "RAZOR_KV_BUDGET", str),
        "layer_windows": getattr(args, "layer_windows", None),
        "pins": pick("pins", "RAZOR_PINS", int),
    }


def llama_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """llama_cpp.Llama constructor arguments from the model flags."""
    if args.ctx < 16:
        raise UserError(f"--ctx must be at least 16, got {args.ctx}")
    if args.n_batch < 1:
        raise UserError(f"--n-batch must be at least 1, got {args.n_batch}")
    kw: dict[str, Any] = {"n_ctx": args.ctx, "n_batch": args.n_batch, "n_gpu_layers": args.n_gpu_layers,
                          "flash_attn": args.flash_attn, **rpc_kwargs(args.rpc, args.n_gpu_layers),
                          **kv_type_kwargs(args)}
    if args.threads is not None:
        if args.threads < 1:
            raise UserError(f"--threads must be at least 1, got {args.threads}")
        kw["n_threads"] = args.threads
    return kw


def check_model_file(path: str) -> None:
    from .metadata import MetadataError, check_gguf_file

    try:
        check_gguf_file(path)
    except MetadataError as e:
        raise UserError(str(e)) from None


def load_model(path: str, **kwargs: Any):
    """razor_gguf.Llama(path, **kwargs), with every load failure turned into a one-line UserError."""
    check_model_file(path)
    from .llama import Llama

    from ._native import RpcServerError

    try:
        return Llama(model_path=path, verbose=False, **kwargs)
    except RpcServerError as e:
        raise UserError(str(e)) from None
    except ValueError as e:  # llama-cpp-python reports load failures and bad options as ValueError
        raise UserError(f"{path}: {str(e).splitlines()[0]}") from None
