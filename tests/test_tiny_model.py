"""The tiny synthetic GGUF loads in llama.cpp and its logits match the numpy forward pass.

Tolerances (max |llama.cpp - numpy float64| over all 64x259 logits; logits have std ~1, max ~4):
- f32 weights, f32 KV cache, flash attention off: everything is f32 on both sides; measured
  7.5e-6 (head dim 32) and 9.4e-6 (64). Bound 1e-4.
- f16 KV cache (the default) or flash attention on: llama.cpp stores K/V in f16, and its flash
  attention casts K/V to f16 even from an f32 cache and runs the CPU kernel's Q·K in f16; these
  rounding errors (2^-11 relative) pass through 4 random layers. Measured 7.6e-3 (f16 KV, FA off)
  and 1.0e-2 to 1.3e-2 (FA on). Bound 4e-2, still far below the effect of evicting tokens
  (test_razor_policy_is_visible: > 0.3); llama.cpp's greedy token must be the reference's best up
to ties within the bound.
"""

from pathlib import Path

import numpy as np
import pytest

import razor_gguf  # noqa: F401  (before llama_cpp)
from razor_gguf.testing.compare import F16_TOL, F32_TOL, llama_logits
from razor_gguf.testing.tiny_forward import forward
from razor_gguf.testing.tiny_model import RazorMeta, TinyConfig, read_head_map, read_weights, write_tiny_model

T = 64


@pytest.fixture(scope="module")
def tokens() -> list[int]:
    rng = np.random.default_rng(1)
    return [1] + [int(x) for x in rng.integers(3, 259, T - 1)]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, tuple[Path, TinyConfig]]:
    d = tmp_path_factory.mktemp("tiny")
    cfgs = {"hd32": TinyConfig(), "hd64": TinyConfig(head_dim=64), "f16": TinyConfig(f16=True)}
    out = {name: (write_tiny_model(d / f"{name}.gguf", cfg), cfg) for name, cfg in cfgs.items()}
    hm = np.array([[1, 0], [0, 0], [0, 1], [1, 1]], dtype=np.int32)
    out["razor"] = (write_tiny_model(d / "razor.gguf", TinyConfig(), RazorMeta(head_map=hm, n_sink=4, window=16)), TinyConfig())
    return out


def test_numpy_f32_matches_f64(models, tokens):
    path, cfg = models["hd32"]
    w = read_weights(path)
    diff = np.abs(forward(w, cfg, tokens) - forward(w, cfg, tokens, reference=True)).max()
    assert diff < 1e-4


@pytest.mark.parametrize(
    "name,flash_attn,f32_kv,tol",
    [
        ("hd32", False, True, F32_TOL),
        ("hd32", False, False, F16_TOL),
        ("hd32", True, False, F16_TOL),
        ("hd32", True, True, F16_TOL),  # FA casts the f32 cache to f16: no tighter than f16 KV
        ("hd64", False, True, F32_TOL),
        ("hd64", True, False, F16_TOL),
        ("f16", False, True, F16_TOL),  # f16 weights: ggml converts activations to f16 for matmuls
        ("f16", True, False, F16_TOL),
    ],
)
def test_llama_cpp_matches_numpy(models, tokens, name, flash_attn, f32_kv, tol):
    path, cfg = models[name]
    ref = forward(read_weights(path), cfg, tokens, reference=True)
    got = llama_logits(path, tokens, flash_attn, f32_kv)
    assert got.shape == ref.shape == (T, cfg.n_vocab)
    diff = np.abs(got - ref).max()
    assert diff < tol, f"max abs diff {diff:.3g} (logit std {ref.std():.3g})"
    # llama.cpp's greedy token is the reference's best, up to ties within the tolerance.
    picked = ref[np.arange(T), got.argmax(1)]
    assert (picked >= ref.max(1) - 2 * tol).all()
    print(f"{name} fa={flash_attn} f32_kv={f32_kv}: max abs diff {diff:.2g}")


@pytest.mark.parametrize("flash_attn", [False, True])
def test_razor_keys_ignored_by_stock_path(models, tokens, flash_attn):
    # razor switched off at load time: the keys alone change nothing (tests/test_razor_cache.py covers it on)
    plain = llama_logits(models["hd32"][0], tokens, flash_attn, f32_kv=True)
    razor = llama_logits(models["razor"][0], tokens, flash_attn, f32_kv=True, kv_overrides={"razor.enabled": False})
    np.testing.assert_array_equal(plain, razor)


def test_razor_keys_round_trip(models):
    from gguf import GGUFReader

    path, cfg = models["razor"]
    np.testing.assert_array_equal(read_head_map(path), [[1, 0], [0, 0], [0, 1], [1, 1]])
    assert read_head_map(models["hd32"][0]) is None
    f = GGUFReader(str(path)).fields
    assert f["razor.version"].contents() == 1
    assert f["razor.retrieval_count"].contents() == 4
    assert f["razor.n_sink"].contents() == 4 and f["razor.window"].contents() == 16
    assert len(f["razor.echo_scores"].contents()) == len(f["razor.induction_scores"].contents()) == 8


def test_razor_policy_is_visible(models, tokens):
    # The future razor-cache comparison is only meaningful if eviction moves the logits far more
    # than the llama.cpp-vs-numpy tolerance; a window of 16 over 64 tokens must do so.
    path, cfg = models["razor"]
    w = read_weights(path)
    full = forward(w, cfg, tokens, reference=True)
    hm = read_head_map(path)
    local = forward(w, cfg, tokens, head_map=hm, n_sink=4, window=16, reference=True)
    np.testing.assert_allclose(local[:20], full[:20], atol=1e-12)  # nothing evicted before p=20
    assert np.abs(local - full).max() > 0.3


def test_make_tiny_model_cli(tmp_path):
    import subprocess
    import sys

    tool = Path(__file__).resolve().parents[1] / "tools" / "make_tiny_model.py"
    out = tmp_path / "cli.gguf"
    r = subprocess.run([sys.executable, str(tool), str(out), "--head-map", "1,0,0,1,0,0,1,1", "--window", "32"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    np.testing.assert_array_equal(read_head_map(out), [[1, 0], [0, 1], [0, 0], [1, 1]])
    # Same weights as the Python helper with the same seed.
    ref = read_weights(write_tiny_model(tmp_path / "py.gguf", TinyConfig()))
    got = read_weights(out)
    assert all(np.array_equal(got[n], ref[n]) for n in ref)
    bad = subprocess.run([sys.executable, str(tool), str(tmp_path / "bad.gguf"), "--head-map", "1,0"], capture_output=True, text=True)
    assert bad.returncode == 2 and "error:" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "bad.gguf").exists()


def test_make_bench_model_q4_0(tmp_path):
    """tools/make_bench_model.py: random Q4_0 blocks at a real model's shape (here SmolLM2's, at a 15% head map)
    that llama.cpp loads and runs with finite logits, razor on."""
    import subprocess
    import sys

    from gguf import GGMLQuantizationType, GGUFReader

    from razor_gguf import Llama

    tool = Path(__file__).resolve().parents[1] / "tools" / "make_bench_model.py"
    out = tmp_path / "twin.gguf"
    r = subprocess.run([sys.executable, str(tool), str(out), "--shape", "smollm2-135m", "--n-ctx-train", "2048"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    rd = GGUFReader(str(out))
    types = {t.name: t.tensor_type for t in rd.tensors}
    assert types["blk.0.attn_q.weight"] == GGMLQuantizationType.Q4_0 and types["output.weight"] == GGMLQuantizationType.Q4_0
    assert types["blk.0.attn_norm.weight"] == GGMLQuantizationType.F32
    assert int(sum(rd.fields["razor.head_map"].contents())) == round(0.15 * 90)
    llm = Llama(model_path=str(out), n_ctx=1024, n_batch=256, n_ubatch=256, logits_all=True, verbose=False)
    try:
        assert llm.razor_stats()["razor"]
        llm.eval(list(range(300, 900)))
        logits = np.array(llm.scores[:600])
    finally:
        llm.close()
    assert np.isfinite(logits).all() and logits.std() > 0.1
