"""The retrieval ratio measured in the reference pass (razor_gguf.ratios, `embed-heads --ratios`) and its way into
the GGUF and the razor cache: the head map it adopts, the pins it makes the default, what inspect says."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("torch")

import razor_gguf  # noqa: E402,F401  (before llama_cpp)
from razor_gguf.ratios import RatioMeasurement, candidates, select_ratio  # noqa: E402


def test_candidates_are_below_the_selection():
    assert candidates(0.156) == [0.05, 0.1, 0.156]
    assert candidates(0.08) == [0.05, 0.08]
    assert candidates(0.05) == [0.05]  # nothing below: the selection alone


def test_a_ratio_selects_the_heads_llama_cpp_selects(smollm2_razor):
    """select_ratio is llama.cpp's razor.retrieval_ratio override (the map a measured ratio is written as is the
    map a user asking for that ratio at load time gets)."""
    from razor_gguf import Llama, _native

    path, info, *_ = smollm2_razor
    echo, ind = np.array(info["echo_scores"]), np.array(info["induction_scores"])
    e = info["provenance"]["selection.echo_ratio"]
    for r in (0.05, 0.1, 0.3):
        llm = Llama(model_path=str(path), n_ctx=512, retrieval_ratio=r, verbose=False)
        try:
            got = np.array(_native.head_map(llm._ctx.ctx)).reshape(echo.shape)
        finally:
            llm.close()
        want = select_ratio(echo, ind, r, e)
        assert (got == want).all(), r
        assert want.sum() == pytest.approx(r * echo.size, abs=1.01)


@pytest.fixture(scope="module")
def reference(smollm2_path):
    from razor_gguf.reference import ReferenceModel

    return ReferenceModel(smollm2_path)


@pytest.fixture(scope="module")
def smollm2_short(smollm2_path, smollm2_razor, reference):
    """The measurement run short on SmolLM2 (its stored map against 5%, one chunk of 640 tokens, 2 probes, 16 pins):
    the machinery, not the model's numbers (embed-heads --ratios measures those)."""
    from razor_gguf import Llama
    from razor_gguf.calibration import calibration_chunks
    from razor_gguf.layer_windows import retrieval_probes
    from razor_gguf.ratios import measure_ratios

    tok = Llama(model_path=smollm2_path, vocab_only=True, verbose=False)
    chunks = calibration_chunks(lambda s: tok.tokenize(s.encode(), add_bos=True), 1, 640)
    probes = retrieval_probes(lambda s, bos: tok.tokenize(s.encode(), add_bos=bos), 2, 640)
    tok.close()
    info = smollm2_razor[1]
    m = reference
    hm = np.array(info["head_map"])
    passes = []
    r = measure_ratios(m, np.array(info["echo_scores"]), np.array(info["induction_scores"]), hm,
                       info["provenance"]["selection.echo_ratio"], chunks, probes, n_sink=4, compensation=False,
                       ratios=(0.05,), n_pin=16, progress=lambda: passes.append(1))
    return r, hm, len(passes), info


def test_measurement_machinery(smollm2_short):
    from razor_gguf.calibration import window_for_budget
    from razor_gguf.ratios import passes

    r, hm, n_passes, info = smollm2_short
    stored = hm.sum() / hm.size
    assert r.ratios == pytest.approx((0.05, stored)) and r.retrieval_heads[-1] == hm.sum()
    assert r.retrieval_heads[0] < r.retrieval_heads[1]
    assert n_passes == passes(2, 1, 2, 16)
    # every candidate spends the same memory: the budget's window at its head count, less the pins' rows
    five = select_ratio(np.array(info["echo_scores"]), np.array(info["induction_scores"]), 0.05, 0.01)
    assert r.windows == (window_for_budget(0.35, five, 640, 4) - 16, window_for_budget(0.35, hm, 640, 4) - 16)
    assert r.windows[0] > r.windows[1] and r.n_pin == 16 and r.context == 640
    assert r.n_positions == 640 - 4 - r.windows[-1]  # from where the shortest window evicts
    assert r.kld_ratio_95[-1] == (1.0, 1.0) and all(k > 0 for k in r.kld)
    # the interval brackets the ratio of means (of block means: near it)
    assert r.kld_ratio_95[0][0] - 0.05 <= r.kld[0] / r.kld[-1] <= r.kld_ratio_95[0][1] + 0.05
    wins = [i for i in range(1) if r.kld_ratio_95[i][1] < 1 and r.probe[i] >= r.probe[-1]]
    assert r.adopted == bool(wins)
    if wins:
        assert r.ratio == r.ratios[min(wins, key=lambda i: r.kld[i])]
    else:
        assert r.ratio == pytest.approx(stored)
    assert (r.head_map == (five if r.adopted else hm)).all()
    # each map's first read (the pins' record) is razor without pins: its KLD measured at no extra forward
    assert len(r.kld_no_pins) == 2 and all(k > 0 for k in r.kld_no_pins) and r.kld_no_pins != r.kld
    assert r.n_probes == 2 and all(0 <= a <= 2 for a in (*r.probe, r.probe_no_pins))
    assert r.pins_adopted == (r.probe[-1] >= r.probe_no_pins) and 0 <= r.probe_full <= 2
    assert all(0.5 < t <= 1 for t in r.top1)


def test_without_pins_where_the_row_is_on(smollm2_path, smollm2_razor, reference):
    """Pins need the row off: with the row on every candidate runs without them and none become the default."""
    from razor_gguf import Llama
    from razor_gguf.calibration import calibration_chunks
    from razor_gguf.ratios import measure_ratios

    tok = Llama(model_path=smollm2_path, vocab_only=True, verbose=False)
    chunks = calibration_chunks(lambda s: tok.tokenize(s.encode(), add_bos=True), 1, 512)
    tok.close()
    info = smollm2_razor[1]
    r = measure_ratios(reference, np.array(info["echo_scores"]), np.array(info["induction_scores"]),
                       np.array(info["head_map"]), 0.01, chunks, [], n_sink=4, compensation=True, ratios=(0.1,))
    assert r.n_pin == 0 and not r.pins_adopted and r.probe == (0, 0) and len(r.ratios) == 2
    assert r.kld_no_pins is None
    with pytest.raises(ValueError, match="exceed a budget of 0.1"):
        measure_ratios(reference, np.array(info["echo_scores"]),
                       np.array(info["induction_scores"]), np.array(info["head_map"]), 0.01, chunks, [], n_sink=4,
                       compensation=True, budget=0.1)


@pytest.fixture(scope="module")
def gemma3_short(gemma3_razor):
    """The measurement on Gemma 3 270M, whose selection makes its three global heads (layers 5, 11, 17) retrieval
    heads, i.e. the stock cache: held to the full model, run short (one chunk of 640 tokens, 2 probes, 16 pins,
    window 256): the machinery, not the model's numbers."""
    from razor_gguf import Llama
    from razor_gguf.calibration import calibration_chunks
    from razor_gguf.layer_windows import retrieval_probes
    from razor_gguf.models import model_path
    from razor_gguf.ratios import candidate_maps, measure_ratios
    from razor_gguf.reference import ReferenceModel

    path = str(model_path("gemma3"))
    tok = Llama(model_path=path, vocab_only=True, verbose=False)
    chunks = calibration_chunks(lambda s: tok.tokenize(s.encode(), add_bos=True), 1, 640)
    probes = retrieval_probes(lambda s, bos: tok.tokenize(s.encode(), add_bos=bos), 2, 640)
    tok.close()
    info = gemma3_razor[1]
    model = ReferenceModel(path)
    echo, ind = np.array(info["echo_scores"]), np.array(info["induction_scores"])
    hm, e = np.array(info["head_map"]), info["provenance"]["selection.echo_ratio"]
    passes = []
    r = measure_ratios(model, echo, ind, hm, e, chunks, probes, n_sink=4, compensation=False, n_pin=16, window=256,
                       progress=lambda: passes.append(1))
    return r, hm, len(passes), candidate_maps(model.hp, echo, ind, hm, e)


def test_measured_against_the_full_model_where_no_head_is_local(gemma3_short):
    """A stored map with no local head is the full model itself: it is never read (KLD 0, every probe answered as
    the full model answers it), each distinct smaller selection runs at the recorded window less the pins, and the
    fewest heads that give the full model's answer to every probe and keep its next token on 96% replace it."""
    from razor_gguf.calibration import TOP1_TARGET
    from razor_gguf.ratios import passes

    r, hm, n_passes, (rs, maps) = gemma3_short
    assert r.against_full and r.budget == 0 and r.context == 640 and r.n_pin == 16
    assert r.ratios == pytest.approx(tuple(rs)) and r.ratios[-1] == pytest.approx(3 / 18)
    assert (maps[-1] == hm).all() and len(maps) >= 2
    for m in maps[:-1]:  # distinct selections of the global heads, each leaving one local
        assert 1 <= m.sum() < 3 and set(np.flatnonzero(m.ravel())) <= {5, 11, 17}
    assert len({m.tobytes() for m in maps}) == len(maps)
    assert r.retrieval_heads == tuple(int(m.sum()) for m in maps)
    assert r.windows == (256 - 16,) * (len(maps) - 1) + (640 - 4,)
    assert n_passes == passes(len(maps) - 1, 1, 2, 16)
    assert r.n_positions == 640 - 4 - 240
    assert (r.kld[-1], r.top1[-1], r.kld_ratio_95[-1]) == (0.0, 1.0, (0.0, 0.0)) and r.probe[-1] == 2
    assert 0 <= r.probe_full <= 2 and all(0 <= a <= 2 for a in (*r.probe, r.probe_no_pins))
    for k, (lo, hi), t in zip(r.kld[:-1], r.kld_ratio_95[:-1], r.top1[:-1]):
        assert 0 < lo <= k <= hi and 0.5 < t <= 1  # each candidate's own KLD and its interval
    wins = [i for i in range(len(maps) - 1) if r.probe[i] == 2 and r.top1[i] >= TOP1_TARGET]  # the full model's answers
    assert r.adopted == bool(wins)
    if wins:
        best = min(wins, key=lambda i: (r.retrieval_heads[i], r.kld[i]))
        assert (r.head_map == maps[best]).all() and r.ratio == pytest.approx(rs[best])
        assert r.pins_adopted == (r.probe[best] >= r.probe_no_pins)
    else:
        assert (r.head_map == hm).all() and not r.pins_adopted


def test_an_adopted_map_runs_razor_on_a_sliding_window_model(tmp_path):
    """Gemma 3 with a map adopted against the full model (two of its three global heads, 64 pins) loads as a razor
    cache, no longer the stock one, and inspect says how the map was chosen."""
    from razor_gguf import Llama, _native
    from razor_gguf.calibration import CompensationMeasurement
    from razor_gguf.embed import _summary_from_kv, _with_ratio, format_summary
    from razor_gguf.metadata import build_razor_kv, open_gguf, write_with_razor
    from razor_gguf.models import model_path
    from razor_gguf.scoring import score_model

    want = np.zeros((18, 1), dtype=np.int32)
    want[[5, 11]] = 1
    m = _measurement(head_map=want, ratio=0.1, ratios=(0.1, 3 / 18), retrieval_heads=(2, 3), windows=(448, 2044),
                     kld=(0.004, 0.0), kld_no_pins=(0.005, 0.0), top1=(0.97, 1.0),
                     kld_ratio_95=((0.003, 0.005), (0.0, 0.0)), probe=(16, 16), n_probes=16, probe_no_pins=15,
                     probe_full=16, budget=0.0, against_full=True)
    scores = score_model(str(model_path("gemma3")), probe_len=8)
    adopted = _with_ratio(scores, m)
    assert (adopted.head_map == want).all()
    row_off = CompensationMeasurement(compensation=False, kld_compensation=0.02, kld_no_compensation=0.01, window=512,
                                      n_sink=4, n_tokens=3000)
    kv = build_razor_kv(adopted, n_sink=4, window=512, source_name="x", source_sha256="0", tool_version="t",
                        calibration=row_off, ratios=m)
    out = tmp_path / "gemma-ratio.gguf"
    write_with_razor(open_gguf(str(model_path("gemma3"))), str(out), kv, lambda n: None)
    text = format_summary(_summary_from_kv(kv), detail=False)
    assert "retrieval ratio against the full model (the selection left no local head" in text
    assert "adopted: 2 retrieval heads; 64 pins on by default (razor.n_pin): the adopted map's probe 16/16" in text
    assert "10% (2 heads, W 448): KLD 0.0040 (0.0030-0.0050), top-1 97.0%, probe 16/16" in text
    assert "17% (3 heads, stock): KLD 0.0000" in text

    llm = Llama(model_path=str(out), n_ctx=2048, n_batch=64, verbose=False)
    try:
        st = llm.razor_stats()
        assert _native.kv_bytes(llm._ctx.ctx).razor and st["pins"] == 64 and st["retrieval_heads"] == 2
        assert list(np.flatnonzero(np.array(_native.head_map(llm._ctx.ctx)))) == [5, 11]
    finally:
        llm.close()


def _measurement(**kw):
    base = dict(ratio=0.05, head_map=np.zeros((30, 3), dtype=np.int32), adopted=True, n_pin=64,
                pins_adopted=True, budget=0.35, context=2048,
                ratios=(0.05, 0.1, 0.156), retrieval_heads=(5, 9, 14), windows=(570, 508, 403),
                kld=(0.01, 0.012, 0.015), kld_no_pins=(0.011, 0.012, 0.016), top1=(0.95, 0.94, 0.93),
                kld_ratio_95=((0.6, 0.8), (0.7, 0.9), (1.0, 1.0)), probe=(5, 5, 4), n_probes=8, probe_no_pins=4,
                probe_full=7, n_positions=3200)
    return RatioMeasurement(**{**base, **kw})


def test_adopted_ratio_and_pins_reach_llama_cpp(smollm2_path, smollm2_razor, tmp_path):
    """An adopted ratio is written as the head map itself (and the selection ratios that give it), its pins as
    razor.n_pin, its measurement as provenance; llama.cpp then runs that map and pins by default, and the
    compensation row asked for turns the pins off instead of failing the load."""
    import dataclasses

    from razor_gguf import Llama, _native
    from razor_gguf.calibration import CompensationMeasurement
    from razor_gguf.embed import _summary_from_kv, _with_ratio, format_summary
    from razor_gguf.metadata import build_razor_kv, open_gguf, write_with_razor
    from razor_gguf.scoring import score_model

    scores = score_model(smollm2_path, probe_len=8)
    want = select_ratio(scores.echo, scores.induction, 0.05, scores.provenance["echo_ratio"])
    m = _measurement(head_map=want)
    adopted = _with_ratio(scores, m)
    assert (adopted.head_map == want).all() and scores.head_map.sum() > want.sum()
    assert adopted.provenance["induction_ratio"] == pytest.approx(0.04)
    row_off = CompensationMeasurement(compensation=False, kld_compensation=0.02, kld_no_compensation=0.01, window=256,
                                      n_sink=4, n_tokens=3000)  # pins come only with the row off
    kv = build_razor_kv(adopted, n_sink=4, window=256, source_name="x", source_sha256="0", tool_version="t",
                        calibration=row_off, ratios=m)
    out = tmp_path / "ratio.gguf"
    write_with_razor(open_gguf(smollm2_path), str(out), kv, lambda n: None)
    info = _summary_from_kv(kv)
    assert info["n_pin"] == 64 and info["retrieval_count"] == want.sum()
    text = format_summary(info, detail=False)
    assert f"adopted: {want.sum()} retrieval heads; 64 pins on by default (razor.n_pin)" in text
    assert "5% (5 heads, W 570): KLD 0.0100 (x0.60-0.80), top-1 95.0%, probe 5/8" in text

    llm = Llama(model_path=str(out), n_ctx=2048, n_batch=64, verbose=False)
    try:
        st = llm.razor_stats()
        assert st["pins"] == 64 and st["retrieval_heads"] == want.sum()
        assert (np.array(_native.head_map(llm._ctx.ctx)).reshape(want.shape) == want).all()
    finally:
        llm.close()
    llm = Llama(model_path=str(out), n_ctx=2048, n_batch=64, compensation=True, verbose=False)
    try:
        assert llm.razor_stats()["pins"] == 0 and llm.razor_stats()["compensation"] is True
    finally:
        llm.close()

    # not adopted: the selection's map, no pins, the measurement as provenance only
    kept = dataclasses.replace(m, adopted=False, ratio=0.156, pins_adopted=False)
    kv = build_razor_kv(scores, n_sink=4, window=256, source_name="x", source_sha256="0", tool_version="t",
                        ratios=kept)
    assert "razor.n_pin" not in kv and "razor.calibration.ratio_kld" in kv
    text = format_summary(_summary_from_kv(kv), detail=False)
    assert ("the selection's ratio kept; 64 pins not adopted: the selection's probe 4/8 with them, 4/8 without; "
            "the full model's probe 7/8") in text


def test_ratios_need_the_calibration(smollm2_path, tmp_path):
    r = subprocess.run([sys.executable, "-m", "razor_gguf", "embed-heads", smollm2_path, "-o", str(tmp_path / "o.gguf"),
                        "--ratios", "--no-calibration"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "razor-gguf: error: --ratios needs the calibration (drop --no-calibration)"] and not (tmp_path / "o.gguf").exists()


def test_measured_by_default_and_skipped_where_it_cannot_be(smollm2_path, tmp_path):
    """embed-heads measures the ratio by default; a map whose retrieval heads alone exceed the 0.35 budget (half of
    the heads here) cannot be measured: the default keeps it with a one-line notice and writes the model, an
    explicit --ratios stops with the same reason (exit 2, nothing written)."""
    args = [sys.executable, "-m", "razor_gguf", "embed-heads", smollm2_path, "--probe-len", "8",
            "--induction-ratio", "0.5", "--json"]
    r = subprocess.run(args + ["-o", str(tmp_path / "a.gguf")], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    notice = [line for line in r.stderr.splitlines() if "retrieval ratios" in line]
    assert notice == ["razor-gguf: retrieval ratios: the stored map's retrieval heads alone exceed a budget of 0.35; "
                      "the selection's head map is kept"]
    import json

    info = json.loads(r.stdout)
    assert info["retrieval_ratio"] > 0.35 and "calibration.ratios" not in info["provenance"]
    assert "calibration.kld_compensation" in info["provenance"] and (tmp_path / "a.gguf").exists()
    r = subprocess.run(args + ["-o", str(tmp_path / "b.gguf"), "--ratios"], capture_output=True, text=True, timeout=900)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1:] == [
        f"razor-gguf: error: {smollm2_path}: retrieval ratios: the stored map's retrieval heads alone exceed a budget "
        "of 0.35"] and not (tmp_path / "b.gguf").exists()


def test_embed_heads_adopts_a_sliding_window_models_ratio_against_the_full_model(tmp_path, monkeypatch):
    """embed-heads on Gemma 3 270M, whose selection leaves no local head: the row is measured on the smallest
    candidate, the ratio against the full model, and no budget is recommended (its fractions would count the
    sliding-window layers' cache in llama.cpp, not here); an adopted map makes llama.cpp run razor, with the
    recorded window. Shortened (1024-token chunks, 4 probes): the wiring, not the model's numbers."""
    from razor_gguf import Llama, _native, calibration, ratios
    from razor_gguf.embed import embed_heads
    from razor_gguf.models import model_path

    monkeypatch.setattr(calibration, "DEFAULT_CHUNK_TOKENS", 1024)
    monkeypatch.setattr(ratios, "N_PROBES", 4)
    out = tmp_path / "gemma-measured.gguf"
    info = embed_heads(str(model_path("gemma3")), str(out), probe_len=600)
    p = info["provenance"]
    assert p["calibration.ratio_against_full"] and p["calibration.ratio_context"] == 1024
    assert p["calibration.ratio_heads"][-1] == 3 and p["calibration.ratio_budget"] == 0
    assert "calibration.kld_compensation" in p and "calibration.budgets" not in p and info["kv_budget"] is None
    hm = np.array(info["head_map"]).ravel()
    assert p["calibration.ratio_adopted"] == (hm.sum() < 3) and set(np.flatnonzero(hm)) <= {5, 11, 17}
    assert info["n_pin"] == (64 if p["calibration.ratio_pins_adopted"] else 0)
    llm = Llama(model_path=str(out), n_ctx=2048, verbose=False)
    try:
        assert bool(_native.kv_bytes(llm._ctx.ctx).razor) == bool(p["calibration.ratio_adopted"])
        if p["calibration.ratio_adopted"]:
            st = llm.razor_stats()
            assert st["window"] == 512 and st["retrieval_heads"] == hm.sum()
            assert (np.array(_native.head_map(llm._ctx.ctx)).ravel() == hm).all()
    finally:
        llm.close()
