"""tools/ratio_calibration.py: embed-heads --ratios' measurement on other calibration texts, lengths and probes,
run short on SmolLM2 (the machinery: cells appended, a rerun resumes, bad cells refused)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("torch")

TOOL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools", "ratio_calibration.py")


def _run(*args):
    return subprocess.run([sys.executable, TOOL, *map(str, args)], capture_output=True, text=True, timeout=900)


def test_cells_append_and_resume(smollm2_razor, tmp_path):
    path = smollm2_razor[0]
    out = tmp_path / "rc.json"
    r = _run(path, "--out", out, "--chunks", 1, "--probes", 1, "--cell", "docstrings:640:needle1")
    assert r.returncode == 0, r.stderr[-2000:]
    cells = json.loads(out.read_text())["cells"]
    assert len(cells) == 1
    c = cells[0]
    assert (c["source"], c["length"], c["probe_kind"], c["chunks"], c["probes"]) == ("docstrings", 640, "needle1", 1, 1)
    assert c["context"] == 640 and c["n_pin"] == 64 and c["n_probes"] == 1 and c["seconds"] > 0
    assert len(c["ratios"]) == len(c["kld"]) == len(c["kld_no_pins"]) == len(c["probe"]) == 3  # 5%, 10%, the map's
    assert c["kld_ratio_95"][-1] == [1.0, 1.0] and all(k > 0 for k in c["kld"])
    again = _run(path, "--out", out, "--chunks", 1, "--probes", 1, "--cell", "docstrings:640:needle1")
    assert again.returncode == 0 and "done already" in again.stderr
    assert json.loads(out.read_text())["cells"] == cells


def test_the_prose_is_not_the_evaluations():
    from razor_gguf import niah
    from razor_gguf.calibration import PROSE_MODULES, prose_text

    assert not set(PROSE_MODULES) & set(niah.MODULES)
    other, evaluation = set(prose_text().splitlines()), set(niah.haystack_text().splitlines())
    # a few docstrings inherited from the same base classes (exceptions, io, enum) read the same in both
    assert len(other) > 800 and len(other & evaluation) <= 0.02 * len(other)


def test_a_bad_cell_is_refused(smollm2_razor, tmp_path):
    r = _run(smollm2_razor[0], "--out", tmp_path / "rc.json", "--cell", "wiki:2048:needle1")
    assert r.returncode == 2 and "--cell SOURCE:LENGTH:PROBE" in r.stderr and not (tmp_path / "rc.json").exists()
