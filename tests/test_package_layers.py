"""The package reads bottom-up: base modules import nothing of it, the core no command, nothing the CLI;
no import cycles; and `import razor_gguf` binds llama_cpp to the patched libraries."""

import ast
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1] / "razor_gguf"

# Imports nothing of the package.
BASE = {"errors", "overrides", "_native", "metadata", "reference", "oracle", "kld", "niah", "passkey", "plotting",
        "intervals", "pins"}
# The library: may import base and core, never a command.
CORE = BASE | {"", "llama", "scoring", "machine", "models", "calibration", "layer_windows", "ratios", "head_order"}
COMMANDS = {"options", "embed", "bench", "evaluation", "chat", "serve", "serve_rpc", "rpc", "demo"}


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    """module -> package modules it imports anywhere in its code (lazy imports in functions included);
    names relative to the package, "" for razor_gguf itself."""
    files = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph = {}
    for mod, path in files.items():
        pkg = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
        pkg = [p for p in pkg if p]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = pkg[: len(pkg) - (node.level - 1)] + (node.module.split(".") if node.module else [])
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "razor_gguf":
                base = node.module.split(".")[1:]
            elif isinstance(node, ast.Import):
                base = None
                for a in node.names:
                    if a.name.split(".")[0] == "razor_gguf":
                        deps.add(".".join(a.name.split(".")[1:]))
            else:
                continue
            if base is None:
                continue
            for a in node.names:
                sub = ".".join(base + [a.name])
                deps.add(sub if sub in files else ".".join(base))
        deps.discard(mod)
        graph[mod] = deps
    return graph


GRAPH = _import_graph()


def test_every_module_has_a_layer():
    """A new module is placed in a layer here, so that the checks below cover it."""
    unplaced = {m for m in GRAPH if m.split(".")[0] not in CORE | COMMANDS | {"cli", "__main__", "testing"}}
    assert not unplaced, f"modules in no layer: {unplaced}"


def test_graph_sees_the_package():
    assert {"cli", "errors", "llama", "bench"} <= set(GRAPH)
    assert "errors" in GRAPH["cli"] or "errors" in GRAPH["embed"]  # the parser finds relative imports


def test_base_modules_import_nothing_of_the_package():
    for mod in BASE:
        assert GRAPH[mod] == set(), f"{mod} imports {GRAPH[mod]}"


def test_core_imports_no_command_and_nothing_imports_the_cli():
    for mod, deps in GRAPH.items():
        if mod in CORE:
            assert not deps & (COMMANDS | {"cli"}), f"core module {mod or 'razor_gguf'} imports {deps & COMMANDS}"
        if mod not in ("cli", "__main__"):
            assert "cli" not in deps, f"{mod} imports the CLI"


def test_no_import_cycles():
    state: dict[str, int] = {}

    def visit(mod: str, path: list[str]) -> None:
        state[mod] = 1
        for dep in GRAPH[mod]:
            assert state.get(dep) != 1, "import cycle: " + " -> ".join(path + [mod, dep])
            if dep not in state:
                visit(dep, path + [mod])
        state[mod] = 2

    for mod in GRAPH:
        if mod not in state:
            visit(mod, [])


def test_import_razor_gguf_then_llama_cpp():
    """User code that imports razor_gguf and then llama_cpp gets the patched libraries."""
    code = ("import razor_gguf, llama_cpp\n"
            "from razor_gguf import _native\n"
            "assert llama_cpp.llama_cpp._base_path.resolve() == _native.lib_dir().resolve()\n"
            "print(llama_cpp.llama_cpp._lib.llama_razor_patch_version())\n")
    env = {k: v for k, v in os.environ.items() if k != "LLAMA_CPP_LIB_PATH"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert int(r.stdout) >= 2
