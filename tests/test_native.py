"""The patched libraries load through llama-cpp-python, and mismatches fail clearly."""

import os
import shutil
import subprocess
import sys

import pytest

from razor_gguf import _native


def test_build_info_reports_patch_and_backends():
    info = _native.build_info()
    assert info.patch_version >= 1
    assert info.base_commit == "0c1e57098"
    assert "CPU" in info.backends
    assert (info.lib_dir / "libllama.so").exists()


def test_binding_loads_patched_library():
    llama_cpp = _native.load_llama_cpp()
    assert llama_cpp.__version__ == _native.BINDING_VERSION
    # The binding's own handle must be the patched library, which exports the razor symbols.
    assert hasattr(llama_cpp.llama_cpp._lib, "llama_razor_patch_version")
    assert llama_cpp.llama_cpp._base_path.resolve() == _native.lib_dir().resolve()
    # ...and the override does not leak to child processes.
    assert os.environ.get("LLAMA_CPP_LIB_PATH") != str(_native.lib_dir())


def _run_python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=120)


def test_unpatched_library_is_refused(tmp_path):
    # A real shared library that is not a razor-patched libllama.
    shutil.copy(_native.lib_dir() / "libggml-base.so", tmp_path / "libllama.so")
    r = _run_python("import razor_gguf; razor_gguf.Llama", RAZOR_GGUF_LIB_PATH=str(tmp_path))
    assert r.returncode != 0
    assert "is not a razor-patched llama.cpp build" in r.stderr


def test_missing_library_is_reported(tmp_path):
    r = _run_python("import razor_gguf; razor_gguf.Llama", RAZOR_GGUF_LIB_PATH=str(tmp_path))
    assert "patched llama.cpp library not found" in r.stderr


def test_binding_version_mismatch_is_refused():
    info = _native.build_info()
    with pytest.raises(_native.NativeLibraryError, match="install llama-cpp-python==0.3.36"):
        _native._check_match("0.3.35", info)
    _native._check_match(_native.BINDING_VERSION, info)


def test_version_command():
    r = subprocess.run([sys.executable, "-m", "razor_gguf", "--version"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    import razor_gguf

    assert lines[0] == f"razor-gguf {razor_gguf.__version__}"
    assert lines[1] == "llama-cpp-python 0.3.36"
    assert lines[2] == f"llama.cpp 0c1e57098 + razor patch {_native.build_info().patch_version}"
    assert lines[3].startswith("backends: ") and "CPU" in lines[3]


def test_cli_usage_error_is_one_line():
    r = subprocess.run([sys.executable, "-m", "razor_gguf", "models", "path", "nope"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
