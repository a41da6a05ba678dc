"""`razor-gguf serve --rpc`: the server keeps answering when an RPC worker is lost.

With patch 0005 ggml-rpc fails every call on a worker that stopped answering instead of aborting the
process, and razor_gguf.llama notes which worker it was. The model's layers on that worker (weights and
KV cache) are gone with it, so:
- the request that was running ends with a 503 naming the worker (a streamed one with a last `error` event);
- while any worker is down, generation requests get that 503 at once; everything else keeps answering;
- the first generation request after every worker answers again reloads the model, then runs.
"""

from __future__ import annotations

import json
from typing import Callable

# routes that run the model (or load it: a load with a worker down would abort in ggml-rpc's connect)
MODEL_ROUTES = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/engines/copilot-codex/completions",
                          "/v1/embeddings", "/v1/razor/switch"})


def lost_message(workers: set[str] | list[str], why: str = "") -> str:
    names = ", ".join(sorted(workers))
    return (f"RPC worker {names} is lost{why}: the model's layers there are gone; "
            "it is loaded again once every worker answers")


def error_body(message: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": "rpc_worker_lost", "param": None,
                                 "code": None}}).encode()


class RpcRecovery:
    """ASGI middleware in front of the model's routes of a server whose model runs on RPC workers.

    workers: the "HOST:PORT" endpoints; reload(proxy): frees the served model and loads it again (called in a
    worker thread, holding the server's request lock, once every worker accepts a connection); api_key: the
    server's, if any: a request without it is left to the route's 401 (it learns nothing, reloads nothing)."""

    def __init__(self, app, workers: list[str], reload: Callable[[object], None], api_key: str | None = None) -> None:
        self.app = app
        self.workers = workers
        self.reload = reload
        self.authorization = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope, receive, send) -> None:
        from fastapi.concurrency import run_in_threadpool

        from .llama import lost_rpc_workers

        if scope["type"] != "http" or scope.get("path") not in MODEL_ROUTES or (
                self.authorization and dict(scope["headers"]).get(b"authorization") != self.authorization):
            return await self.app(scope, receive, send)
        if lost_rpc_workers():
            import contextlib

            from llama_cpp.server.app import get_llama_proxy

            async with contextlib.asynccontextmanager(get_llama_proxy)() as proxy:  # no request runs meanwhile
                problem = await run_in_threadpool(self.recover, proxy) if lost_rpc_workers() else None
            if problem:
                return await self.respond(send, 503, error_body(problem))
        started, streaming, completed, held = False, False, False, None

        async def guarded(message):
            # a 500 from the route is held back: when a worker was lost meanwhile it becomes this 503; an event
            # stream that ends after the loss gets a last event with the error before it closes
            nonlocal started, streaming, completed, held
            if message["type"] == "http.response.start":
                if message["status"] == 500:
                    held = message
                    return
                started = True
                streaming = b"text/event-stream" in dict(message.get("headers", [])).get(b"content-type", b"")
            elif message["type"] == "http.response.body":
                last = not message.get("more_body", False)
                lost = lost_rpc_workers() if last else set()
                if held is not None:
                    if lost:
                        completed = True
                        return await self.respond(send, 503, error_body(lost_message(lost)))
                    await send(held)
                    held, started = None, True
                elif lost and streaming:
                    await send({"type": "http.response.body", "more_body": True,
                                "body": b"data: " + error_body(lost_message(lost)) + b"\n\n"})
                completed = completed or last
            await send(message)

        try:
            await self.app(scope, receive, guarded)
        except Exception:
            lost = lost_rpc_workers()
            if not lost:
                raise
            if completed:  # the client has the error already, and the server's log the loss
                return
            body = error_body(lost_message(lost))
            if streaming:
                await send({"type": "http.response.body", "body": b"data: " + body + b"\n\n", "more_body": False})
            elif not started:
                await self.respond(send, 503, body)
            else:  # a plain response cut short: end it; the server's log says why
                await send({"type": "http.response.body", "body": b"", "more_body": False})

    @staticmethod
    async def respond(send, status: int, body: bytes) -> None:
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    def recover(self, proxy) -> str | None:
        """None once the model is loaded again on answering workers, else why not (a worker still down)."""
        from . import _native
        from .llama import lost_rpc_workers

        try:
            _native.check_rpc_servers(self.workers, timeout=2.0)
        except _native.RpcServerError as e:
            return f"{e}: the model's layers there were lost with it; it is loaded again once every worker answers"
        try:
            self.reload(proxy)
        except Exception as e:  # noqa: BLE001  (a load that fails leaves the server answering, not dead)
            return lost_message(lost_rpc_workers(), f"; loading the model again failed: {e}")
        return None
