"""The `razor-gguf` command line (SPEC section 5)."""

from __future__ import annotations

import argparse
import os
import sys

from . import __version__


def version_text() -> str:
    from importlib.metadata import PackageNotFoundError, version

    from ._native import NativeLibraryError, build_info

    try:
        binding = version("llama-cpp-python")
    except PackageNotFoundError:
        binding = "not installed"
    lines = [f"razor-gguf {__version__}", f"llama-cpp-python {binding}"]
    try:
        info = build_info()
        lines += [
            f"llama.cpp {info.base_commit} + razor patch {info.patch_version}",
            f"backends: {', '.join(info.backends) or 'none'}",
            f"libraries: {info.lib_dir}",
        ]
    except NativeLibraryError as e:
        lines.append(f"native libraries: unavailable ({e})")
    return "\n".join(lines)


def _cmd_models(args: argparse.Namespace) -> int:
    from .models import cli_models_path

    return cli_models_path(args.name)


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo()


class _Parser(argparse.ArgumentParser):
    # argparse already exits 2 on usage errors; keep its message to one line.
    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"razor-gguf: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="razor-gguf", description="RazorAttention KV-cache compression for GGUF models")
    ap.add_argument("--version", action="store_true", help="print package, binding and patch versions")
    sub = ap.add_subparsers(dest="command", parser_class=_Parser)

    models = sub.add_parser("models", help="test models (SPEC section 4)")
    msub = models.add_subparsers(dest="models_command", required=True, parser_class=_Parser)
    path = msub.add_parser("path", help="print the local path of a test model, fetching it if needed")
    path.add_argument("name", choices=["smollm2", "gemma3"])
    path.set_defaults(func=_cmd_models)

    from .embed import add_subcommands as _add_head_scoring

    _add_head_scoring(sub)  # embed-heads, inspect

    from .bench import add_subcommand as _add_bench

    _add_bench(sub)

    from .evaluation import add_subcommand as _add_eval

    _add_eval(sub)

    from .chat import add_subcommand as _add_chat

    _add_chat(sub)

    from .serve import add_subcommand as _add_serve

    _add_serve(sub)

    from .rpc import add_subcommand as _add_rpc

    _add_rpc(sub)

    demo = sub.add_parser("demo", help="fetch SmolLM2 and run a short greedy completion")
    demo.set_defaults(func=_cmd_demo)
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.version:
        print(version_text())
        return 0
    if not getattr(args, "func", None):
        ap.print_help()
        return 2
    try:
        return args.func(args)
    except BrokenPipeError:
        # stdout closed early (`razor-gguf inspect ... | head`): stop quietly, like other CLI tools
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
