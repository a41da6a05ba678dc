#!/usr/bin/env python3
"""Build the pinned llama.cpp without the razor patches and print the folder of its shared libraries.

The parity tests hold the razor build to this one: with nothing evicted, its greedy tokens and logits must be
bitwise the stock build's. ggml compiles its CPU kernels with -march=native, and their rounding differs from
one instruction set to another (an AVX-512 Xeon and an AVX2 EPYC part ways at token 30 of SmolLM2's greedy
completion, both unpatched), so the reference is built on the machine that runs the tests: native/CMakeLists.txt
with RAZOR_STOCK=ON (the same options and flags as the razor build, no patches, no razor sources), once per
CPU and source checkout, under the cache (about 3 minutes on 2 cores; ccache makes rebuilds cheap).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import pathlib
import platform
import shutil
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "native"))
import prepare_source  # noqa: E402


class BuildError(Exception):
    pass


def cpu_signature() -> str:
    """What -march=native compiles for: the CPU model and its feature flags."""
    try:
        lines = pathlib.Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.machine() + " " + platform.processor()
    keep = [l for l in lines if l.split(":")[0].strip() in ("model name", "flags", "Features", "CPU part")]
    return "\n".join(dict.fromkeys(keep))


def build_dir(cache: pathlib.Path) -> pathlib.Path:
    key = hashlib.sha256("\n".join([prepare_source.SDIST_SHA256, str(ROOT), cpu_signature()]).encode())
    return cache / "stock" / key.hexdigest()[:16]


def tool(name: str) -> str | None:
    """The venv's cmake/ninja first (make setup installs them there), then PATH."""
    here = pathlib.Path(sys.executable).parent / name
    return str(here) if here.exists() else shutil.which(name)


def build(cache: pathlib.Path, jobs: int) -> pathlib.Path:
    cmake = tool("cmake")
    if not cmake:
        raise BuildError("cmake not found (make setup installs it into the venv)")
    out = build_dir(cache)
    args = [cmake, "-S", str(ROOT), "-B", str(out), "-DCMAKE_BUILD_TYPE=Release", "-DRAZOR_STOCK=ON"]
    ninja = tool("ninja")
    if ninja and not (out / "CMakeCache.txt").exists():
        args += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
    for cmd in (args, [cmake, "--build", str(out), "--target", "llama", "-j", str(jobs)]):
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if proc.returncode != 0:
            tail = "\n".join(proc.stdout.strip().splitlines()[-15:])
            raise BuildError(f"{' '.join(cmd[:2])} ... failed (exit {proc.returncode}):\n{tail}")
    lib = out / "bin"
    if not (lib / "libllama.so").exists():
        raise BuildError(f"no libllama.so in {lib} after the build")
    return lib


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args(argv)
    try:
        print(build(prepare_source.cache_dir(), args.jobs))
    except (BuildError, prepare_source.SourceError) as e:
        print(f"razor-gguf: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
