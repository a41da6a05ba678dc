"""`razor-gguf embed-heads` and `razor-gguf inspect` end to end on SmolLM2 (SPEC sections 2 and 5)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("torch")

import razor_gguf  # noqa: E402,F401  (before llama_cpp)


def _cli(*args, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "razor_gguf", *map(str, args)],
        capture_output=True, text=True, timeout=timeout,
    )


def _assert_user_error(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("razor-gguf: error: "), r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    assert r.stdout == ""


@pytest.fixture(scope="session")
def scored(smollm2_razor):
    """SmolLM2 scored once with the default settings (tests/conftest.py); reused by every test here."""
    return smollm2_razor


def test_memory_budget(scored):
    # Peak memory only: wall time is for benchmarks (the fixture prints it), not a test on a shared machine.
    _, _, wall, peak = scored
    assert peak < 4 * 2**30


def test_json_and_head_map(scored):
    out, info, _, _ = scored
    assert (info["n_layer"], info["n_head_kv"]) == (30, 3)
    for k in ("head_map", "echo_scores", "induction_scores"):
        assert np.array(info[k]).shape == (30, 3)
    hm = np.array(info["head_map"])
    assert set(np.unique(hm)) <= {0, 1}
    # ceil(14% of 90) = 13 by induction, plus at most ceil(1% of 90) = 1 by echo
    assert 13 <= info["retrieval_count"] <= 14
    assert info["retrieval_count"] == hm.sum()
    assert info["retrieval_ratio"] == pytest.approx(hm.sum() / 90, abs=1e-6)
    ind = np.array(info["induction_scores"])
    # the top induction heads are selected, and they are real induction heads
    assert hm.ravel()[np.argsort(-ind.ravel())[:13]].all()
    assert ind.max() > 0.5
    # SmolLM2's induction heads live in layers 17-24 (measured: 17, 18, 20-24, plus one echo head)
    assert set(np.nonzero(hm)[0]) >= {17, 18, 20, 23}
    assert hm[25:].sum() == 0
    p = info["provenance"]
    assert p["probe.length"] == 2047 and p["probe.repetitions"] == 4 and p["probe.seed"] == 0
    assert p["source.sha256"] == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    assert info["n_sink"] == 4 and info["window"] == 512
    assert info["output"] == str(out) and info["dry_run"] is False
    # the measured compensation default (SPEC section 1): whole-model KLD with and without the row on
    # calibration text (the Python language reference, not the eval's docstrings)
    assert p["calibration.source"] == "pydoc_data.topics" and p["calibration.tokens"] > 3000
    assert p["calibration.window"] == 512 and p["calibration.kld_compensation"] > 0
    assert info["compensation"] is (p["calibration.kld_compensation"] < p["calibration.kld_no_compensation"])


def test_measured_compensation_default_reaches_llama_cpp(scored):
    from razor_gguf import Llama

    out, info, _, _ = scored
    for kw, want in (({}, info["compensation"]), ({"compensation": not info["compensation"]}, not info["compensation"])):
        llm = Llama(model_path=str(out), n_ctx=1024, verbose=False, **kw)
        try:
            assert llm.razor_stats()["compensation"] is want
        finally:
            llm.close()


def test_measured_kv_budget(scored):
    """The recommended budget: the ladder measured in the reference pass (the whole model under the razor policy
    at the window each budget buys), and the smallest budget reaching the top-1 target is razor.kv_budget."""
    from razor_gguf.calibration import BUDGET_LADDER, window_for_budget

    _, info, _, _ = scored
    p = info["provenance"]
    assert p["calibration.budgets"] == pytest.approx(list(BUDGET_LADDER))
    hm = np.array(info["head_map"])
    assert p["calibration.budget_windows"] == [window_for_budget(b, hm, 2048, 4) for b in BUDGET_LADDER]
    assert p["calibration.budget_context"] == 2048 and p["calibration.budget_tokens"] == 2 * 512
    kld, top1 = p["calibration.budget_kld"], p["calibration.budget_top1"]
    assert kld[-1] < kld[0] / 4 and top1[-1] > top1[0]  # more memory, closer to the full model
    met = [b for b, t in zip(p["calibration.budgets"], top1) if t >= p["calibration.top1_target"]]
    assert info["kv_budget"] == (pytest.approx(min(met)) if met else None)
    # measured on SmolLM2-135M: only 0.75 of the ladder keeps 96% (top-1 88.6 / 90.6 / 93.7 / 96.2%)
    assert info["kv_budget"] == pytest.approx(0.75)


def test_measured_kv_budget_is_the_default_at_load(scored):
    from razor_gguf import Llama

    out, info, _, _ = scored
    llm = Llama(model_path=str(out), n_ctx=4096, verbose=False)
    try:
        st = llm.razor_stats()
    finally:
        llm.close()
    assert st["razor"] and st["kv_budget"] == pytest.approx(info["kv_budget"])
    assert info["kv_budget"] - 0.06 < st["kv_fraction"] <= info["kv_budget"] and st["window"] > info["window"]
    llm = Llama(model_path=str(out), n_ctx=4096, verbose=False, window=256)  # an explicit window still wins
    try:
        assert llm.razor_stats()["window"] == 256
    finally:
        llm.close()


def test_window_for_budget():
    from razor_gguf.calibration import window_for_budget

    hm = np.array([[1, 0], [0, 0]])  # one retrieval head of four
    assert window_for_budget(0.5, hm, 100, 4) == 29  # (0.5 * 4 * 100 - 100) / 3 - 4
    assert window_for_budget(0.25, hm, 100, 4) is None  # the retrieval head alone takes 0.25
    assert window_for_budget(0.5, hm, 100, 4, global_layers=[False, True]) == 46  # (0.5 * 2 * 100) / 2 - 4
    assert window_for_budget(0.5, np.ones((2, 2)), 100, 4) is None


def test_inspect_reads_back(scored):
    out, info, _, _ = scored
    r = _cli("inspect", out, "--json")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["head_map"] == info["head_map"]
    np.testing.assert_allclose(got["induction_scores"], info["induction_scores"], rtol=1e-6)
    np.testing.assert_allclose(got["echo_scores"], info["echo_scores"], rtol=1e-6)
    for k in ("n_layer", "n_head_kv", "retrieval_count", "retrieval_ratio", "n_sink", "window", "provenance"):
        assert k in got
    r = _cli("inspect", out)
    assert r.returncode == 0 and "retrieval heads" in r.stdout and len(r.stdout.splitlines()) > 30


def test_tensors_and_metadata_copied_unchanged(scored, smollm2_path):
    import gguf

    out, _, _, _ = scored
    a, b = gguf.GGUFReader(smollm2_path), gguf.GGUFReader(str(out))
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
    for ta, tb in zip(a.tensors, b.tensors):
        assert ta.tensor_type == tb.tensor_type and list(ta.shape) == list(tb.shape)
        assert np.array_equal(np.asarray(ta.data).view(np.uint8), np.asarray(tb.data).view(np.uint8)), ta.name
    ka = {k: f.contents() for k, f in a.fields.items() if not k.startswith("GGUF.")}
    kb = {k: f.contents() for k, f in b.fields.items() if not k.startswith(("GGUF.", "razor."))}
    assert ka == kb
    assert b.get_field("razor.head_map").types[-1] == gguf.GGUFValueType.INT32
    assert len(b.get_field("razor.head_map").contents()) == 90


def test_stock_load_identical_logits(scored, smollm2_path):
    from razor_gguf import Llama

    out, _, _, _ = scored
    logits = []
    for p in (smollm2_path, str(out)):
        # the razor cache is on by default for an embedded model: compare the stock cache here
        llm = Llama(model_path=p, n_ctx=128, logits_all=True, verbose=False, kv_overrides={"razor.enabled": False})
        toks = llm.tokenize(b"The capital of France is Paris, and the capital of Italy is", add_bos=True)
        llm.eval(toks)
        logits.append(np.array(llm.scores[: len(toks)]))
        del llm
    assert np.array_equal(logits[0], logits[1])


def test_refuses_overwrite_and_existing_keys(scored, smollm2_path, tmp_path):
    out, _, _, _ = scored
    before = os.stat(out).st_mtime_ns
    _assert_user_error(_cli("embed-heads", smollm2_path, "-o", out), "already exists", "--force")
    assert os.stat(out).st_mtime_ns == before
    _assert_user_error(_cli("embed-heads", out, "-o", tmp_path / "x.gguf"), "already has razor", "--force")
    assert not (tmp_path / "x.gguf").exists()


def test_force_replaces_keys_dry_run_writes_nothing(scored, tmp_path):
    out, _, _, _ = scored
    r = _cli("embed-heads", out, "-o", tmp_path / "y.gguf", "--force", "--dry-run", "--json", "--probe-len", "8",
             "--no-calibration")
    assert r.returncode == 0, r.stderr[-2000:]
    info = json.loads(r.stdout)
    assert info["dry_run"] is True and info["output"] is None
    assert info["provenance"]["probe.length"] == 8
    assert os.listdir(tmp_path) == []


def test_reorder_heads(scored, smollm2_path, tmp_path):
    """--reorder-heads stores each layer's KV heads retrieval heads first: the attention weights renumbered with
    them byte for byte, every other tensor copied, the scores in the stored order, and the same model (the
    reference pass, in float32, gives the source's logits to rounding); the source's numbering survives a
    second embed-heads."""
    import gguf
    import torch

    from razor_gguf.head_order import apply_order
    from razor_gguf.reference import ReferenceModel

    src, _, _, _ = scored
    out = tmp_path / "reordered.gguf"
    args = ("--force", "--json", "--probe-len", "8", "--no-calibration")
    plain = _cli("embed-heads", src, "--dry-run", *args)
    r = _cli("embed-heads", src, "-o", out, "--reorder-heads", *args)
    assert plain.returncode == 0 and r.returncode == 0, (plain.stderr[-2000:], r.stderr[-2000:])
    p, info = json.loads(plain.stdout), json.loads(r.stdout)
    order = np.array(info["head_order"])
    assert p["head_order"] is None and sorted(map(sorted, order.tolist())) == [[0, 1, 2]] * 30
    hm = np.array(info["head_map"])
    assert np.array_equal(hm, apply_order(p["head_map"], order)) and (np.diff(hm, axis=1) <= 0).all()
    assert not np.array_equal(order, np.indices(order.shape)[1])  # SmolLM2's map has retrieval heads to move
    np.testing.assert_allclose(info["induction_scores"], apply_order(p["induction_scores"], order), rtol=1e-6)

    a, b = gguf.GGUFReader(smollm2_path), gguf.GGUFReader(str(out))
    for ta, tb in zip(a.tensors, b.tensors):
        x, y = np.asarray(ta.data), np.asarray(tb.data)
        il = int(ta.name.split(".")[1]) if ta.name.startswith("blk.") else None
        kind = ta.name.split(".")[2] if il is not None else ""
        if kind in ("attn_q", "attn_k", "attn_v"):
            x = x.reshape(3, -1, x.shape[-1])[order[il]].reshape(x.shape)
        elif kind == "attn_output":
            x = x.reshape(x.shape[0], 3, -1)[:, order[il]].reshape(x.shape)
        assert ta.name == tb.name and np.array_equal(x, y), ta.name

    toks = np.random.default_rng(0).integers(100, 20000, size=64)
    logits = [ReferenceModel(str(m)).forward(toks, want_logits="all") for m in (smollm2_path, out)]
    assert torch.allclose(logits[0], logits[1], atol=1e-3), (logits[0] - logits[1]).abs().max()
    r = _cli("inspect", out)
    assert r.returncode == 0 and "stored retrieval heads first" in r.stdout
    # scored again, the reordered file picks the same heads, already first: razor.head_order still numbers the source
    again = json.loads(_cli("embed-heads", out, "--dry-run", "--reorder-heads", *args).stdout)
    assert again["head_map"] == info["head_map"] and again["head_order"] == info["head_order"]


def test_library_entry_point_takes_plain_parameters(smollm2_path, tmp_path):
    # Python callers need no argparse namespace; bad input is the same UserError the CLI prints.
    from razor_gguf.embed import embed_heads
    from razor_gguf.errors import UserError

    info = embed_heads(smollm2_path, dry_run=True, probe_len=8, calibrate=False)
    assert info["dry_run"] is True and info["output"] is None
    assert info["provenance"]["probe.length"] == 8 and info["retrieval_count"] > 0
    with pytest.raises(UserError, match="--echo-ratio must be between 0 and 1"):
        embed_heads(smollm2_path, dry_run=True, echo_ratio=1.5)
    with pytest.raises(UserError, match="needs -o"):
        embed_heads(smollm2_path)
    import torch

    assert info["device"] == ("cuda" if torch.cuda.is_available() else "cpu")  # auto
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="--device cuda: PyTorch sees no CUDA device"):
            embed_heads(smollm2_path, dry_run=True, probe_len=8, calibrate=False, device="cuda")
    else:  # the same scores on the GPU as on the CPU, up to float rounding
        cpu = embed_heads(smollm2_path, dry_run=True, probe_len=8, calibrate=False, device="cpu")
        np.testing.assert_allclose(info["induction_scores"], cpu["induction_scores"], atol=1e-4)
        np.testing.assert_allclose(info["echo_scores"], cpu["echo_scores"], atol=1e-4)


def test_force_rewrite_in_place_replaces_keys(scored, tmp_path):
    import shutil

    import gguf

    src, _, _, _ = scored
    p = tmp_path / "m.gguf"
    shutil.copy(src, p)
    r = _cli("embed-heads", p, "-o", p, "--force", "--json", "--probe-len", "8", "--seed", "7", "--no-calibration")
    assert r.returncode == 0, r.stderr[-2000:]
    rd = gguf.GGUFReader(str(p))
    assert rd.get_field("razor.probe.seed").contents() == 7
    assert sum(1 for k in rd.fields if k == "razor.head_map") == 1
    assert sorted(os.listdir(tmp_path)) == ["m.gguf"]  # no temp files left behind


@pytest.mark.parametrize("case", ["text", "truncated", "missing", "gpt2", "out_dir_missing", "out_is_dir", "bad_ratio"])
def test_bad_input(case, smollm2_path, tmp_path):
    import gguf

    out = tmp_path / "out.gguf"
    src = smollm2_path
    extra = []
    needle = ""
    if case == "text":
        src = tmp_path / "notes.gguf"
        src.write_text("hello, not a model\n")
        needle = "not a GGUF"
    elif case == "truncated":
        src = tmp_path / "trunc.gguf"
        with open(smollm2_path, "rb") as f:
            src.write_bytes(f.read(3 * 2**20))
        needle = "truncated"
    elif case == "missing":
        src = tmp_path / "nope.gguf"
        needle = "no such file"
    elif case == "gpt2":
        src = tmp_path / "gpt2.gguf"
        w = gguf.GGUFWriter(str(src), arch="gpt2")
        w.add_tensor("x", np.zeros(4, dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        needle = "unsupported architecture"
    elif case == "out_dir_missing":
        out = tmp_path / "no" / "such" / "dir" / "out.gguf"
        needle = "does not exist"
    elif case == "out_is_dir":
        out = tmp_path
        needle = "is a directory"
    elif case == "bad_ratio":
        extra = ["--induction-ratio", "1.5"]
        needle = "--induction-ratio"
    r = _cli("embed-heads", src, "-o", out, *extra)
    _assert_user_error(r, needle)
    if case != "out_is_dir":
        assert not out.exists()
    assert [p for p in os.listdir(tmp_path) if p.startswith(".razor-")] == []


def test_unwritable_output_dir(smollm2_path, tmp_path):
    if os.geteuid() != 0:
        d = tmp_path / "ro"
        d.mkdir()
        d.chmod(0o555)
    elif os.path.isdir("/sys"):  # root writes into read-only directories, but not into sysfs
        d = None
    else:
        pytest.skip("no unwritable directory available as root")
    target = (d / "o.gguf") if d is not None else "/sys/razor-test-out.gguf"
    try:
        _assert_user_error(_cli("embed-heads", smollm2_path, "-o", target), "cannot write")
        assert not os.path.exists(target)
    finally:
        if d is not None:
            d.chmod(0o755)


def test_inspect_errors(smollm2_path, tmp_path):
    _assert_user_error(_cli("inspect", smollm2_path), "no razor.* keys")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x03\x00")
    _assert_user_error(_cli("inspect", bad), "truncated")


def test_inspect_plot(scored, tmp_path):
    pytest.importorskip("matplotlib")
    out, _, _, _ = scored
    png = tmp_path / "heads.png"
    r = _cli("inspect", out, "--plot", png)
    assert r.returncode == 0, r.stderr[-2000:]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gemma3_sliding_window_layers_are_local(gemma3_razor, capfd):
    """Gemma 3 270M: 15 of its 18 layers use a 512-token sliding window, so a probe block longer than
    the window gives them zero scores, and the 3 global layers (5, 11, 17) are the retrieval heads.
    At that default map every global head is a retrieval head: loading says so and runs the stock cache,
    with the stock outputs (tests/test_razor_iswa.py runs its global heads local)."""
    from razor_gguf import Llama, _native

    out, info = gemma3_razor
    assert (info["n_layer"], info["n_head_kv"]) == (18, 1)
    hm = np.array(info["head_map"]).ravel()
    assert list(np.flatnonzero(hm)) == [5, 11, 17]
    ind = np.array(info["induction_scores"]).ravel()
    echo = np.array(info["echo_scores"]).ravel()
    local = [l for l in range(18) if l not in (5, 11, 17)]
    assert (ind[local] == 0).all() and (echo[local] == 0).all()
    assert ind[5] > 0.5

    logits = {}
    for name, kv in (("default", None), ("stock", {"razor.enabled": False})):
        capfd.readouterr()
        llm = Llama(model_path=str(out), n_ctx=1024, logits_all=True, verbose=True, kv_overrides=kv)
        try:
            assert not _native.kv_bytes(llm._ctx.ctx).razor
            llm.eval(list(range(1000, 1100)))
            logits[name] = np.array(llm.scores[:100])
        finally:
            llm.close()
        if name == "default":
            err = capfd.readouterr().err
            assert "every KV head of the global-attention layers is a retrieval head: using the stock KV cache" in err
    assert np.array_equal(logits["default"], logits["stock"])
