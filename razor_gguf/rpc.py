"""`razor-gguf rpc-server`: a worker of llama.cpp's RPC backend (native/tools/razor-rpc-server.cpp), so that
`--rpc HOST:PORT,...` on chat, serve, bench and eval (rpc_servers= on razor_gguf.Llama) can place a model's
layers, and their KV cache, on other machines. The RPC protocol has no authentication and no encryption:
the worker listens on 127.0.0.1 unless told otherwise, and must only ever be exposed on a trusted network."""

from __future__ import annotations

import argparse
import os
import sys

from .errors import error

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def server_binary() -> str:
    from ._native import lib_dir

    return str(lib_dir() / "razor-rpc-server")


def cmd_rpc_server(args: argparse.Namespace) -> int:
    if not 0 < args.port < 65536:
        return error(f"--port must be in 1..65535, got {args.port}")
    if args.threads is not None and args.threads < 1:
        return error(f"--threads must be at least 1, got {args.threads}")
    exe = server_binary()
    if not os.access(exe, os.X_OK):
        return error(f"{exe}: not found: these libraries were built without the RPC backend (RAZOR_RPC=OFF)")
    if args.host not in LOOPBACK:
        print(f"razor-gguf rpc-server: listening on {args.host}: the RPC protocol has no authentication; anyone "
              f"who reaches port {args.port} can use this machine's devices. Trusted networks only.",
              file=sys.stderr, flush=True)
    argv = [exe, "--host", args.host, "--port", str(args.port)]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    sys.stdout.flush()
    os.execv(exe, argv)
    return 0  # not reached


def add_subcommand(sub) -> None:
    p = sub.add_parser("rpc-server", help="a llama.cpp RPC worker (layers of a model on this machine; no authentication)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; the protocol has no authentication)")
    p.add_argument("--port", type=int, default=50052, help="TCP port (default 50052)")
    p.add_argument("--threads", type=int, help="CPU threads (default: all cores)")
    p.set_defaults(func=cmd_rpc_server)
