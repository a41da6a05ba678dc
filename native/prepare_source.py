#!/usr/bin/env python3
"""Fetch the pinned llama.cpp source and apply the razor patch series.

The source is the llama.cpp tree vendored in the llama-cpp-python sdist, so the patched
libraries match the Python binding exactly. The sdist is fetched through pip by pinned
version, checked against a pinned sha256 and cached; the patched tree is rebuilt only when
the patch series changes. Used by native/CMakeLists.txt at configure time and by the
Makefile (--sdist) to install the binding from the same cached file.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile
import tempfile

BINDING = "llama-cpp-python"
BINDING_VERSION = "0.3.36"
SDIST_NAME = f"llama_cpp_python-{BINDING_VERSION}.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
BASE_COMMIT = "0c1e57098"
VENDOR_PREFIX = f"llama_cpp_python-{BINDING_VERSION}/vendor/llama.cpp/"
# Large parts of the tree the library build never reads.
SKIP_DIRS = ("models/", "docs/", "examples/", "tools/", "benches/", "pocs/", "app/", "media/", ".github/")
STAMP = ".razor-patches.json"


class SourceError(Exception):
    pass


def cache_dir() -> pathlib.Path:
    env = os.environ.get("RAZOR_GGUF_CACHE")
    return pathlib.Path(env) if env else pathlib.Path.home() / ".cache" / "razor-gguf"


def sha256_file(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_sdist(cache: pathlib.Path) -> pathlib.Path:
    dest = cache / "src" / SDIST_NAME
    if dest.exists() and sha256_file(dest) == SDIST_SHA256:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        # pip prepares the sdist's metadata while downloading; without LLAMA_BUILD=OFF that
        # step compiles the whole of llama.cpp.
        env = dict(os.environ, CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--disable-pip-version-check", "-d", tmp, f"{BINDING}=={BINDING_VERSION}"]
        print(f"razor-gguf: fetching {BINDING} {BINDING_VERSION} source via pip", file=sys.stderr)
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        got = pathlib.Path(tmp) / SDIST_NAME
        if proc.returncode != 0 or not got.exists():
            tail = proc.stdout.strip().splitlines()[-1:] or ["no output"]
            raise SourceError(f"pip download of {BINDING}=={BINDING_VERSION} failed: {tail[0]}")
        digest = sha256_file(got)
        if digest != SDIST_SHA256:
            raise SourceError(f"{SDIST_NAME}: sha256 {digest} does not match the pinned {SDIST_SHA256}")
        os.replace(got, dest)
    return dest


def patch_series(patches: pathlib.Path) -> list[pathlib.Path]:
    return sorted(patches.glob("[0-9][0-9][0-9][0-9]-*.patch"))


def patch_files(patch: pathlib.Path) -> list[str]:
    return [line[6:].strip() for line in patch.read_text().splitlines() if line.startswith("+++ b/")]


def git_apply(tree: pathlib.Path, patch: pathlib.Path, *args: str) -> bool:
    cmd = ["git", "apply", "--whitespace=nowarn", *args, str(patch.resolve())]
    # Inside another git work tree (e.g. build/ of this repo) git apply would resolve paths
    # against that repository and silently skip ours: stop repository discovery at the tree.
    env = dict(os.environ, GIT_CEILING_DIRECTORIES=str(tree.resolve().parent))
    return subprocess.run(cmd, cwd=tree, env=env, capture_output=True).returncode == 0


def applied_prefix(tree: pathlib.Path, series: list[pathlib.Path]) -> int:
    """How many leading patches of the series the tree already has. Later patches may edit files an
    earlier one created, so a patch alone cannot be reverse-checked: revert the candidate prefix, last
    patch first, on a scratch copy of the files the series touches."""
    files = sorted({f for p in series for f in patch_files(p) if (tree / f).is_file()})
    for k in range(len(series), 0, -1):
        with tempfile.TemporaryDirectory() as tmp:
            scratch = pathlib.Path(tmp) / "tree"
            for f in files:
                (scratch / f).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(tree / f, scratch / f)
            scratch.mkdir(exist_ok=True)
            if all(git_apply(scratch, p, "--reverse") for p in reversed(series[:k])):
                return k
    return 0


def apply_series(tree: pathlib.Path, series: list[pathlib.Path]) -> None:
    """Apply the patches the tree does not have yet; fail naming the first one that does not apply."""
    for patch in series[applied_prefix(tree, series):]:
        if not git_apply(tree, patch):
            num = patch.name.split("-", 1)[0]
            raise SourceError(f"patch {patch.name} does not apply to llama.cpp {BASE_COMMIT}: "
                              f"regenerate patch {num} (see tools/refresh_patches.sh)")


def extract(sdist: pathlib.Path, dest: pathlib.Path) -> None:
    with tarfile.open(sdist) as tar:
        members = []
        for m in tar.getmembers():
            if not m.name.startswith(VENDOR_PREFIX):
                continue
            rel = m.name[len(VENDOR_PREFIX):]
            if not rel or rel.startswith(SKIP_DIRS) or rel == ".git":
                continue
            m.name = rel
            members.append(m)
        tar.extractall(dest, members=members, filter="data")


def prepare_tree(sdist: pathlib.Path, patches: pathlib.Path | None, out: pathlib.Path) -> pathlib.Path:
    """The sdist's llama.cpp tree at `out` with the patch series of `patches` applied (none: stock)."""
    series = patch_series(patches) if patches else []
    stamp = {
        "sdist_sha256": SDIST_SHA256,
        "patches": {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in series},
        "files": sorted({f for p in series for f in patch_files(p)}),
    }
    old = {}
    if (out / STAMP).exists():
        old = json.loads((out / STAMP).read_text())
        if {k: old.get(k) for k in stamp} == stamp:
            return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    extract(sdist, tmp)
    apply_series(tmp, series)
    # The extracted files keep the archive's old mtimes, so ninja reuses objects of untouched
    # files; a file a previous series patched must look new so it is rebuilt from pristine source.
    for rel in old.get("files", []):
        if (tmp / rel).exists():
            os.utime(tmp / rel)
    (tmp / STAMP).write_text(json.dumps(stamp, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sdist", action="store_true", help="only fetch the sdist and print its path")
    ap.add_argument("--patches", type=pathlib.Path, help="patch series directory")
    ap.add_argument("--out", type=pathlib.Path, help="where to put the patched tree")
    ap.add_argument("--tree", type=pathlib.Path,
                    help="patch an existing llama.cpp checkout in place instead (development)")
    ap.add_argument("--stock", action="store_true",
                    help="put the unpatched tree at --out (the stock build the parity tests compare against)")
    args = ap.parse_args(argv)
    try:
        if args.tree:
            apply_series(args.tree, patch_series(args.patches))
            print(args.tree.resolve())
            return 0
        sdist = fetch_sdist(cache_dir())
        if args.sdist:
            print(sdist)
            return 0
        if args.stock and args.out:
            print(prepare_tree(sdist, None, args.out))
            return 0
        if not (args.patches and args.out):
            ap.error("--patches and --out are required")
        print(prepare_tree(sdist, args.patches, args.out))
        return 0
    except SourceError as e:
        print(f"razor-gguf: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
