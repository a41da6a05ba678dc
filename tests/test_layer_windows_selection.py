"""Per-layer window selection in the reference pass (razor_gguf.layer_windows) and its way into the GGUF and the
razor cache: embed-heads' measurement, razor.layer_window_scale, the windows llama.cpp derives from it."""

from __future__ import annotations

import re

import numpy as np
import pytest

pytest.importorskip("torch")

import razor_gguf  # noqa: E402,F401  (before llama_cpp)
from razor_gguf.layer_windows import LayerWindowMeasurement, allocation  # noqa: E402


def test_allocation_spends_the_uniform_memory():
    rng = np.random.default_rng(0)
    for _ in range(50):
        n_local = [int(x) for x in rng.integers(0, 4, size=12)]
        local = [l for l, n in enumerate(n_local) if n]
        if len(local) < 2:
            continue
        W = int(rng.integers(16, 2000))
        short = set(rng.choice(local, size=len(local) // 2, replace=False).tolist())
        w = allocation(n_local, short, W)
        mem, uniform = sum(n * x for n, x in zip(n_local, w)), W * sum(n_local)
        rest = sum(n_local[l] for l in local if l not in short)
        assert uniform - rest < mem <= uniform  # the floor leaves less than one row per head of the long layers
        assert all(w[l] == W // 2 for l in short) and all(w[l] >= W for l in local if l not in short)


@pytest.fixture(scope="module")
def smollm2_short(smollm2_path, smollm2_razor):
    """The selection run short on SmolLM2 (its stored map, 640-token chunks, W 128): the machinery, not the
    model's numbers (embed-heads --layer-windows and tools/layer_windows.py measure those)."""
    from razor_gguf import Llama
    from razor_gguf.calibration import calibration_chunks
    from razor_gguf.layer_windows import measure_layer_windows, retrieval_probes
    from razor_gguf.reference import ReferenceModel

    tok = Llama(model_path=smollm2_path, vocab_only=True, verbose=False)
    chunks = calibration_chunks(lambda s: tok.tokenize(s.encode(), add_bos=True), 3, 640)
    probes = retrieval_probes(lambda s, bos: tok.tokenize(s.encode(), add_bos=bos), 2, 640)
    tok.close()
    m = ReferenceModel(smollm2_path)
    hm = np.array(smollm2_razor[1]["head_map"])
    passes = []
    r = measure_layer_windows(m, hm, chunks[:2], chunks[2:], n_sink=4, window=128, compensation=False,
                              fractions=(0.25,), probes=probes, progress=lambda: passes.append(1))
    return r, hm, len(passes), probes


def test_selection_machinery(smollm2_short):
    from razor_gguf.layer_windows import passes

    r, hm, n_passes, probes = smollm2_short
    n_loc = (1 - hm).sum(axis=1)
    local = [l for l in range(len(n_loc)) if n_loc[l]]
    assert n_passes == passes(len(local), 2, 1, fractions=(0.25,), n_probes=2)
    assert sorted(r.sensitivity) == local
    windows = [round(s * 128) for s in r.scales]
    short = [l for l in local if windows[l] == 64]
    assert len(short) == r.n_short == round(0.25 * len(local))
    # the shortened layers are the least sensitive ones
    assert max(r.sensitivity[l] for l in short) <= min(r.sensitivity[l] for l in local if l not in short)
    assert sum(n_loc[l] * windows[l] for l in local) <= 128 * n_loc.sum()
    assert set(r.calib_kld) == {0, r.n_short} and r.calib_kld[0] > 0
    assert r.ratio == pytest.approx(r.kld_per_layer / r.kld_uniform)
    assert r.ratio_95[0] <= r.ratio <= r.ratio_95[1] or abs(r.ratio - r.ratio_95[1]) < 0.05
    assert r.adopted == (r.ratio_95[1] < 1.0 and r.probe_per_layer >= r.probe_uniform)
    assert r.n_probes == 2 and 0 <= r.probe_uniform <= 2 and 0 <= r.probe_per_layer <= 2
    assert 0.5 < r.top1_uniform <= 1 and r.n_positions == 640 - (4 + 64)  # from S + W/2


def test_retrieval_probes(smollm2_path):
    """Multi-needle prompts in calibration prose (never the evaluation's haystack), within the length, with the
    answer's number as separate tokens; the full model answers them (teacher-forced top-1 at every digit)."""
    from razor_gguf import Llama
    from razor_gguf.calibration import calibration_text
    from razor_gguf.layer_windows import retrieval_probes
    from razor_gguf.reference import ReferenceModel

    tok = Llama(model_path=smollm2_path, vocab_only=True, verbose=False)
    try:
        probes = retrieval_probes(lambda s, bos: tok.tokenize(s.encode(), add_bos=bos), 3, 600)
        texts = [tok.detokenize(p).decode(errors="replace") for p, _ in probes]
        answers = [tok.detokenize(a).decode().strip() for _, a in probes]
    finally:
        tok.close()
    assert len(probes) == 3 and all(len(p) + len(a) <= 600 for p, a in probes)
    assert all(a.isdigit() and len(a) == 7 and a in t for a, t in zip(answers, texts))
    first = re.findall(r"[^.!?\n]+[.!?]+", calibration_text())[0].strip()
    assert all(first in t for t in texts)  # the haystack is the calibration prose, from its start
    m = ReferenceModel(smollm2_path)
    ok = 0
    for p, a in probes:
        logits = m.forward(p + a[:-1], want_logits="all", logits_from=len(p) - 1).numpy()
        ok += bool((logits.argmax(-1) == np.array(a)).all())
    assert ok >= 2, ok  # a probe the full model cannot answer measures nothing


def test_adopted_scale_reaches_llama_cpp(smollm2_path, tmp_path):
    """An adopted measurement is written as razor.layer_window_scale with its provenance; llama.cpp then runs each
    layer's window = round(scale * window) for whatever window the context gets (here a budget's), and inspect
    reports the comparison."""
    from gguf import GGUFReader

    from razor_gguf import Llama
    from razor_gguf.embed import _summary_from_kv, format_summary
    from razor_gguf.metadata import open_gguf, write_with_razor
    from razor_gguf.metadata import build_razor_kv
    from razor_gguf.scoring import score_model

    scores = score_model(smollm2_path, probe_len=8)
    n_layer = scores.head_map.shape[0]
    scales = tuple(0.5 if l % 3 == 0 else 1.2 for l in range(n_layer))
    lw = LayerWindowMeasurement(window=256, scales=scales, n_short=10, adopted=True, kld_uniform=0.05,
                                kld_per_layer=0.04, ratio=0.8, ratio_95=(0.75, 0.85), top1_uniform=0.9,
                                top1_per_layer=0.92, n_positions=3000, probe_uniform=6, probe_per_layer=7, n_probes=8)
    kv = build_razor_kv(scores, n_sink=4, window=256, source_name="x", source_sha256="0", tool_version="t",
                        layer_windows=lw)
    out = tmp_path / "scaled.gguf"
    write_with_razor(open_gguf(smollm2_path), str(out), kv, lambda n: None)
    assert np.allclose(GGUFReader(str(out)).get_field("razor.layer_window_scale").contents(), scales)
    text = format_summary(_summary_from_kv(kv), detail=False)
    assert "per-layer windows 128/307 against a uniform 256" in text and "probe 7/8 vs 6/8; adopted" in text

    llm = Llama(model_path=str(out), n_ctx=4096, n_batch=64, kv_budget=0.5, verbose=False)
    try:
        st = llm.razor_stats()
        hm = scores.head_map
        want = [0 if hm[l].all() else max(1, round(scales[l] * st["window"])) for l in range(n_layer)]
        assert st["layer_windows"] == want and len(st["rings"]) == 2
        assert st["kv_bytes"] <= 0.5 * st["full_equiv_bytes"]
    finally:
        llm.close()
    llm = Llama(model_path=str(out), n_ctx=4096, n_batch=64, window=512, layer_windows=False, verbose=False)
    try:
        assert set(llm.razor_stats()["layer_windows"]) <= {0, 512}
    finally:
        llm.close()

    # not adopted: provenance only, one window for every layer
    kv = build_razor_kv(scores, n_sink=4, window=256, source_name="x", source_sha256="0", tool_version="t",
                        layer_windows=LayerWindowMeasurement(**{**lw.__dict__, "adopted": False}))
    assert "razor.layer_window_scale" not in kv and "razor.calibration.layer_windows_scale" in kv
    assert "not adopted" in format_summary(_summary_from_kv(kv), detail=False)


def test_evidence_layer_windows_plan(smollm2_razor, tmp_path):
    """tools/evidence.py's layer-windows plan at a small size: razor (the model's per-layer windows) against
    razor_uniform (layer_windows=False) on the same held-out tokens, and the paired line of the report."""
    import json
    import pathlib
    import subprocess
    import sys

    from razor_gguf.metadata import layer_windows_kv, open_gguf, razor_kv_of, write_with_razor

    reader = open_gguf(str(smollm2_razor[0]))
    n_layer = len(smollm2_razor[1]["head_map"])
    lw = LayerWindowMeasurement(window=128, scales=tuple(0.5 if l % 2 else 1.5 for l in range(n_layer)), n_short=15,
                                adopted=True, kld_uniform=0.0, kld_per_layer=0.0, ratio=1.0, ratio_95=(1.0, 1.0),
                                top1_uniform=0.0, top1_per_layer=0.0, n_positions=0)
    model = tmp_path / "scaled.gguf"
    write_with_razor(reader, str(model), {**razor_kv_of(reader), **layer_windows_kv(lw)})
    tool = pathlib.Path(__file__).resolve().parents[1] / "tools" / "evidence.py"
    out = tmp_path / "ev.json"
    r = subprocess.run([sys.executable, str(tool), "run", str(model), "--out", str(out), "--ctx", "512", "--budget",
                        "0.6", "--plan", "layer-windows", "--no-progress"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    cells = json.loads(out.read_text())["cells"]
    assert set(cells) == {"kld/512/razor/0.6", "kld/512/razor_uniform/0.6"}
    per_layer, uniform = cells["kld/512/razor/0.6"], cells["kld/512/razor_uniform/0.6"]
    assert len(per_layer["ring_windows"]) == 2 and len(uniform["ring_windows"]) == 1
    assert per_layer["kld_mean"] != uniform["kld_mean"]
    r = subprocess.run([sys.executable, str(tool), "report", str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "512 tokens, budget 0.6: per-layer windows KLD" in r.stdout, r.stdout
