"""`razor-gguf serve MODEL.gguf`: llama-cpp-python's OpenAI-compatible server on the razor-patched
libraries, loopback by default, with the razor options as flags / RAZOR_* variables and the KV-cache
figures at GET /v1/razor/stats.

The server itself is llama-cpp-python's (llama_cpp.server): routes, streaming, errors and the OpenAI
schema are upstream's. The razor options reach llama.cpp as kv_overrides, so the models it creates run
the razor cache whenever the GGUF has a head map.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from .errors import UserError
from .options import _env, add_model_arguments, check_model_file, flag_razor_overrides, llama_kwargs, razor_kwargs


def kv_override_strings(overrides: dict[str, Any]) -> list[str]:
    """The razor kv_overrides (razor_gguf.overrides) as llama_cpp.server's `key=type:value` strings."""
    out = []
    for key, value in overrides.items():
        kind = "bool" if isinstance(value, bool) else "int" if isinstance(value, int) else "float"
        out.append(f"{key}={kind}:{str(value).lower() if kind == 'bool' else value}")
    return out


class RequestValidation:
    """ASGI middleware: reject a malformed JSON body, or one that does not fit the OpenAI request schema,
    with a 400 and an OpenAI-style error naming the problem, before it reaches the route.

    llama_cpp.server's route wrapper turns every exception into a 500, including unparsable JSON and
    schema errors; clients deserve a 4xx that says what is wrong."""

    def __init__(self, app) -> None:
        from llama_cpp.server.types import (CreateChatCompletionRequest, CreateCompletionRequest,
                                            CreateEmbeddingRequest)

        self.app = app
        self.schemas = {"/v1/chat/completions": CreateChatCompletionRequest,
                        "/v1/completions": CreateCompletionRequest,
                        "/v1/engines/copilot-codex/completions": CreateCompletionRequest,
                        "/v1/embeddings": CreateEmbeddingRequest}

    @staticmethod
    def problem(schema, body: bytes) -> tuple[str, str | None] | None:
        """(message, param) for a bad body, None for a good one."""
        import json

        from pydantic import ValidationError

        try:
            data = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            return f"the request body is not valid JSON ({e})", None
        try:
            schema.model_validate(data)
        except ValidationError as e:
            errs = e.errors()
            where = lambda err: ".".join(str(x) for x in err["loc"]) or "body"  # noqa: E731
            msg = "; ".join(f"{where(err)}: {err['msg']}" for err in errs[:3])
            return f"invalid request: {msg}" + (f" (and {len(errs) - 3} more)" if len(errs) > 3 else ""), where(errs[0])
        return None

    async def __call__(self, scope, receive, send) -> None:
        schema = self.schemas.get(scope.get("path", "")) if scope["type"] == "http" else None
        if schema is None or scope.get("method") != "POST":
            return await self.app(scope, receive, send)
        chunks, more = [], True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        bad = self.problem(schema, body)
        if bad is not None:
            from starlette.responses import JSONResponse

            error = {"message": bad[0], "type": "invalid_request_error", "param": bad[1], "code": None}
            return await JSONResponse({"error": error}, status_code=400)(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


def current_model():
    """The llama_cpp.Llama the upstream server is running (one model per razor-gguf server)."""
    from llama_cpp.server import app as server_app

    proxy = server_app._llama_proxy
    return proxy._current_model if proxy is not None else None


def build_app(args: argparse.Namespace):
    """The FastAPI app with the model loaded. Raises UserError for bad input."""
    from . import _native
    from .llama import RazorLogTap, razor_fallback_reason, razor_stats

    _native.load_llama_cpp()  # bind llama_cpp to the patched libraries before the server imports it
    try:
        from llama_cpp.server.app import create_app
        from llama_cpp.server.settings import ModelSettings, ServerSettings
    except ImportError as e:
        raise UserError(f"the server needs llama-cpp-python's server extras ({e}): "
                        "pip install 'llama-cpp-python[server]'") from None

    check_model_file(args.model)
    razor = razor_kwargs(args)
    overrides = flag_razor_overrides(**razor)
    kw = llama_kwargs(args)
    model_settings = ModelSettings(
        model=args.model, model_alias=args.model_alias or os.path.splitext(os.path.basename(args.model))[0],
        n_ctx=kw["n_ctx"], n_batch=kw["n_batch"], n_gpu_layers=kw["n_gpu_layers"], flash_attn=kw["flash_attn"],
        kv_overrides=kv_override_strings(overrides) or None, chat_format=args.chat_format, verbose=args.verbose,
        **({"n_threads": kw["n_threads"], "n_threads_batch": kw["n_threads"]} if "n_threads" in kw else {}))
    # interrupt_requests=False: a second client waits for the first instead of cutting its stream off.
    server_settings = ServerSettings(host=args.host, port=args.port, api_key=args.api_key,
                                     interrupt_requests=False)
    try:
        with RazorLogTap(verbose=args.verbose) as tap:
            app = create_app(server_settings=server_settings, model_settings=[model_settings])
    except ValueError as e:
        raise UserError(f"{args.model}: {(tap.errors or str(e).splitlines())[-1]}") from None
    app.add_middleware(RequestValidation)
    llm = current_model()
    llm._razor_overrides = overrides  # what razor_stats reports as the settings in effect
    why = None if razor["razor"] is False else razor_fallback_reason(llm, tap.lines)
    if why and razor["razor"]:
        raise UserError(why)
    if why:
        print(f"razor-gguf: {why}", file=sys.stderr, flush=True)

    @app.get("/v1/razor/stats", tags=["razor"])
    def get_razor_stats() -> dict[str, Any]:
        """KV-cache bytes of the served model by part, against the full cache (razor_gguf.Llama.razor_stats)."""
        # Read without the server's request lock: the sizes are fixed at load time, and taking the lock
        # would queue behind (or, with interrupt_requests, cut off) a running completion.
        m = current_model()
        return {"model": model_settings.model_alias, **razor_stats(m, razor["kv_budget"]), "n_ctx": m.n_ctx()}

    return app, razor_stats(llm, razor["kv_budget"])


def cmd_serve(args: argparse.Namespace) -> int:
    from .errors import error

    try:
        app, stats = build_app(args)
    except UserError as e:
        return error(str(e))
    import uvicorn

    if stats["razor"]:
        kv = (f"razor KV cache {stats['kv_bytes'] / 2**20:.1f} MiB vs {stats['full_equiv_bytes'] / 2**20:.1f} MiB "
              f"full (-{stats['saving']:.0%}), {stats['retrieval_heads']}/{stats['kv_heads']} retrieval heads, "
              f"window {stats['window']}")
    else:
        kv = f"full KV cache {stats['kv_bytes'] / 2**20:.1f} MiB"
    print(f"razor-gguf serve: {args.model} on http://{args.host}:{args.port}/v1 ({kv})", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info" if args.verbose else "warning")
    return 0


def add_subcommand(sub) -> None:
    p = sub.add_parser("serve", help="an OpenAI-compatible server (llama-cpp-python's) on loopback")
    add_model_arguments(p, default_ctx=4096)
    p.add_argument("--host", default=os.environ.get("RAZOR_HOST", "127.0.0.1"),
                   help="address to listen on (env RAZOR_HOST; default 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=None, help="port (env RAZOR_PORT; default 8000)")
    p.add_argument("--api-key", default=os.environ.get("RAZOR_API_KEY"),
                   help="require this bearer token (env RAZOR_API_KEY)")
    p.add_argument("--model-alias", help="model name clients use (default: the file name without .gguf)")
    p.add_argument("--chat-format", help="llama-cpp-python chat format (default: the model's chat template)")
    p.add_argument("--verbose", action="store_true", help="llama.cpp and request logs")
    p.set_defaults(func=_cmd_serve_with_env)


def _cmd_serve_with_env(args: argparse.Namespace) -> int:
    from .errors import error

    if args.port is None:
        try:
            args.port = _env("RAZOR_PORT", int, 8000)
        except UserError as e:
            return error(str(e))
    if not 0 <= args.port <= 65535:
        return error(f"--port must be in 0..65535, got {args.port}")
    return cmd_serve(args)
