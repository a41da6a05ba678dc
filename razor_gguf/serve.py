"""`razor-gguf serve MODEL.gguf`: llama-cpp-python's OpenAI-compatible server on the razor-patched
libraries, loopback by default, with the razor options as flags / RAZOR_* variables, the KV-cache
figures at GET /v1/razor/stats, the razor switch at POST /v1/razor/switch and the chat page at /.

The server itself is llama-cpp-python's (llama_cpp.server): routes, streaming, errors and the OpenAI
schema are upstream's. The razor options reach llama.cpp as kv_overrides, so the models it creates run
the razor cache whenever the GGUF has a head map. The chat page (razor_gguf/web) is one more client of
that API.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
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


WEB_DIR = pathlib.Path(__file__).resolve().parent / "web"

# the chat page loads nothing but its own files and talks only to this server
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


class RequestValidation:
    """ASGI middleware: reject a malformed JSON body, or one that does not fit the OpenAI request schema,
    with a 400 and an OpenAI-style error naming the problem, before it reaches the route; and name the
    served model by its alias in what the route returns (llama-cpp-python would put the server's local
    file path in a completion's `model` field when the request names none).

    llama_cpp.server's route wrapper turns every exception into a 500, including unparsable JSON and
    schema errors; clients deserve a 4xx that says what is wrong."""

    def __init__(self, app, alias: str | None = None) -> None:
        from llama_cpp.server.types import (CreateChatCompletionRequest, CreateCompletionRequest,
                                            CreateEmbeddingRequest)

        self.app = app
        self.alias = alias
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
        if self.alias:
            # one model per server: whatever the client called it, the reply names it by its alias
            body = json.dumps({**json.loads(body), "model": self.alias}).encode()
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


@contextlib.contextmanager
def served_model_class():
    """llama-cpp-python's server builds its model itself, as `llama_cpp.Llama(...)` (llama_cpp.server.model), with
    no setting for swa_full: while it loads, that name is razor_gguf.llama.ServedLlama, which adds what
    razor_gguf.Llama does on top (swa_full's default for a model with a head map, the prefix check, the pins)."""
    import llama_cpp

    from .llama import ServedLlama

    stock, llama_cpp.Llama = llama_cpp.Llama, ServedLlama
    try:
        yield
    finally:
        llama_cpp.Llama = stock


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
    workers = kw.pop("rpc_servers", None)
    if workers:  # process-wide devices: the proxy's models load onto them
        try:
            _native.add_rpc_servers(workers)
        except _native.RpcServerError as e:
            raise UserError(str(e)) from None
    model_settings = ModelSettings(
        model=args.model, model_alias=args.model_alias or os.path.splitext(os.path.basename(args.model))[0],
        n_ctx=kw["n_ctx"], n_batch=kw["n_batch"], n_gpu_layers=kw["n_gpu_layers"], flash_attn=kw["flash_attn"],
        kv_overrides=kv_override_strings(overrides) or None, chat_format=args.chat_format, verbose=args.verbose,
        **({"n_threads": kw["n_threads"], "n_threads_batch": kw["n_threads"]} if "n_threads" in kw else {}),
        **{k: kw[k] for k in ("type_k", "type_v") if k in kw})
    # interrupt_requests=False: a second client waits for the first instead of cutting its stream off.
    server_settings = ServerSettings(host=args.host, port=args.port, api_key=args.api_key,
                                     interrupt_requests=False)
    try:
        with RazorLogTap(verbose=args.verbose) as tap, served_model_class():
            app = create_app(server_settings=server_settings, model_settings=[model_settings])
    except ValueError as e:
        raise UserError(f"{args.model}: {(tap.errors or str(e).splitlines())[-1]}") from None
    app.add_middleware(RequestValidation, alias=model_settings.model_alias)
    llm = current_model()
    llm._razor_overrides = overrides  # what razor_stats reports as the settings in effect
    served = {"overrides": overrides}  # what the model is (re)loaded with: the razor switch changes it
    if workers:
        from .serve_rpc import RpcRecovery

        # outermost: a lost worker's 503 comes before anything else looks at the request
        app.add_middleware(RpcRecovery, workers=workers, api_key=args.api_key,
                           reload=lambda proxy: _reload(proxy, model_settings, served["overrides"], args.verbose))
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
        return {"model": model_settings.model_alias, **razor_stats(m, razor["kv_budget"]), "n_ctx": m.n_ctx(),
                "n_past": m.n_tokens}

    async def switch_razor(request):
        """Reload the model with the razor KV cache on or off (body {"razor": true|false}); waits for a running
        completion. The conversation lives with the client, which sends it whole with its next request.
        Returns the new /v1/razor/stats, or 409 when razor cannot run for this model and context."""
        import contextlib

        from fastapi.concurrency import run_in_threadpool
        from llama_cpp.server.app import get_llama_proxy
        from starlette.responses import JSONResponse

        if args.api_key and request.headers.get("authorization") != f"Bearer {args.api_key}":
            return JSONResponse({"error": {"message": "this server needs its API key (Authorization: Bearer KEY)",
                                           "type": "authentication_error", "param": None, "code": None}},
                                status_code=401)
        try:
            on = (await request.json())["razor"]
            if not isinstance(on, bool):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            return JSONResponse({"error": {"message": 'the body must be {"razor": true} or {"razor": false}',
                                           "type": "invalid_request_error", "param": "razor", "code": None}},
                                status_code=400)
        async with contextlib.asynccontextmanager(get_llama_proxy)() as proxy:
            served["overrides"] = {**overrides, "razor.enabled": on}
            notes = await run_in_threadpool(_reload, proxy, model_settings, served["overrides"], args.verbose)
            m = proxy._current_model
            why = razor_fallback_reason(m, notes) if on else None
            stats = {"model": model_settings.model_alias, **razor_stats(m, razor["kv_budget"]), "n_ctx": m.n_ctx(),
                     "n_past": m.n_tokens}
        if why:
            return JSONResponse({"error": {"message": why, "type": "razor_unavailable", "param": "razor", "code": None},
                                 **stats}, status_code=409)
        return JSONResponse(stats)

    app.add_route("/v1/razor/switch", switch_razor, methods=["POST"])

    @app.get("/", include_in_schema=False)
    def chat_page():
        from starlette.responses import FileResponse

        return FileResponse(WEB_DIR / "index.html", headers=PAGE_HEADERS)

    from starlette.staticfiles import StaticFiles

    app.mount("/ui", StaticFiles(directory=WEB_DIR), name="ui")
    return app, razor_stats(llm, razor["kv_budget"])


def _reload(proxy, model_settings, overrides: dict[str, Any], verbose: bool) -> list[str]:
    """Replace the served model by one loaded with these razor overrides (llama_cpp.server's proxy reloads it
    from the updated settings). Returns the `razor:` notes llama.cpp logged while loading it."""
    from .llama import RazorLogTap, forget_lost_rpc_workers

    model_settings.kv_overrides = kv_override_strings(overrides) or None
    if proxy._current_model is not None:
        proxy._current_model.close()
    proxy._current_model = proxy._current_model_alias = None
    forget_lost_rpc_workers()  # the old model's buffers on them went with it: the load connects afresh
    with RazorLogTap(verbose=verbose) as tap, served_model_class():
        llm = proxy(model_settings.model_alias)
    llm._razor_overrides = overrides
    return tap.lines


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


def serve_page(args: argparse.Namespace) -> int:
    """`razor-gguf chat MODEL --web`: the server on a free loopback port (RAZOR_PORT if set), and the chat page
    opened in the default browser once it answers."""
    import socket
    import threading
    import time
    import webbrowser

    from .errors import error

    try:
        port = _env("RAZOR_PORT", int, 0)
    except UserError as e:
        return error(str(e))
    if port == 0:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
    args.host, args.port, args.api_key, args.model_alias, args.chat_format = "127.0.0.1", port, None, None, None
    args.verbose = getattr(args, "verbose", False)
    url = f"http://127.0.0.1:{port}/"

    def open_when_up() -> None:
        for _ in range(600):
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                time.sleep(0.5)
        print(f"razor-gguf chat: the chat page is at {url}", file=sys.stderr, flush=True)
        webbrowser.open(url)

    threading.Thread(target=open_when_up, daemon=True).start()
    return cmd_serve(args)


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
