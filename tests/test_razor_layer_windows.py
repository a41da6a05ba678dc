"""Per-layer windows (razor.layer_window_scale): one local ring per distinct window, each layer's local heads
in the ring of its window. The razor cache inside llama.cpp against the numpy oracle running every layer at
its own window, with the guarantees of the one-window cache (tiny synthetic GGUFs, as test_razor_cache)."""

from __future__ import annotations

import numpy as np
import pytest
from test_razor_cache import (MIXED, NO_COMP, SINK, WINDOW, _tokens, copy_continue_keep, save_continue_restore,
                              trim_and_continue)

from razor_gguf.testing import tiny_forward as tf
from razor_gguf.testing import tiny_model as tm
from razor_gguf.testing.compare import F16_TOL, F32_TOL, llama_logits, multi_seq_logits

GGML_TYPE_Q8_0 = 8
SCALE = [0.5, 1.5, 1.0, 0.5]
WINDOWS = [8, 24, 16, 8]  # round(scale * 16): three rings


@pytest.fixture(scope="module")
def scaled(tmp_path_factory):
    cfg = tm.TinyConfig()
    path = tm.write_tiny_model(tmp_path_factory.mktemp("razor") / "scaled.gguf", cfg,
                               tm.RazorMeta(head_map=MIXED, n_sink=SINK, window=WINDOW, layer_window_scale=SCALE))
    return path, cfg, tm.read_weights(path)


def _oracle(model, toks, window=WINDOWS, compensation=True, head_map=MIXED):
    _, cfg, w = model
    return tf.forward(w, cfg, toks, head_map=head_map, n_sink=SINK, window=window, compensation=compensation)


def _llama(path, **kw):
    from razor_gguf import Llama

    return Llama(model_path=str(path), n_ctx=kw.pop("n_ctx", 512), n_batch=16, n_ubatch=16, logits_all=True,
                 type_k=0, type_v=0, n_threads=2, verbose=False, **kw)


def _kw(compensation):
    return dict(kv_overrides=None if compensation else NO_COMP)


@pytest.mark.parametrize("flash_attn", [False, True])
@pytest.mark.parametrize("n_ubatch", [1, 7, 16])
@pytest.mark.parametrize("compensation", [True, False])
def test_matches_oracle_f32(scaled, flash_attn, n_ubatch, compensation):
    """Windows 8/24/16/8 (three rings): each layer evicts at its own window in every ubatch; the oracle with one
    window for every layer (the mean, 16) is >10x further away."""
    toks = _tokens(scaled[1], 100)
    got = llama_logits(scaled[0], toks, flash_attn=flash_attn, n_batch=16, n_ubatch=n_ubatch, **_kw(compensation))
    err = np.abs(got - _oracle(scaled, toks, compensation=compensation)).max()
    assert err < (F16_TOL if flash_attn else F32_TOL), err
    assert np.abs(got - _oracle(scaled, toks, window=WINDOW, compensation=compensation)).max() > 10 * err


@pytest.mark.parametrize("compensation", [True, False])
def test_large_ubatches_split_by_the_rings_match_oracle(scaled, compensation):
    """The context's ubatch (256) is split to the smallest ring's; every ring stays exact."""
    toks = _tokens(scaled[1], 300)
    got = llama_logits(scaled[0], toks, flash_attn=True, n_ctx=512, n_batch=256, n_ubatch=256, **_kw(compensation))
    assert np.abs(got - _oracle(scaled, toks, compensation=compensation)).max() < F16_TOL


@pytest.mark.parametrize("compensation", [True, False])
def test_prefill_equals_decode(scaled, compensation):
    toks = _tokens(scaled[1], 80, seed=4)
    one_shot = llama_logits(scaled[0], toks, n_batch=32, n_ubatch=32, **_kw(compensation))
    decode = llama_logits(scaled[0], toks, n_batch=1, n_ubatch=1, **_kw(compensation))
    assert np.abs(one_shot - decode).max() < F32_TOL


def test_quantized_cache_within_stock_error(scaled):
    toks = _tokens(scaled[1], 120, seed=3)
    kw = dict(flash_attn=True, f32_kv=False, type_k=GGML_TYPE_Q8_0, type_v=GGML_TYPE_Q8_0)
    err_razor = np.abs(llama_logits(scaled[0], toks, **kw) - _oracle(scaled, toks)).max()
    stock = llama_logits(scaled[0], toks, kv_overrides={"razor.enabled": False}, **kw)
    err_stock = np.abs(stock - tf.forward(scaled[2], scaled[1], toks)).max()
    assert err_razor < 1.5 * err_stock + F16_TOL, (err_razor, err_stock)


@pytest.mark.parametrize("unified", [False, True])
@pytest.mark.parametrize("compensation", [True, False])
def test_multiple_sequences(scaled, unified, compensation):
    seqs = [list(_tokens(scaled[1], 100, seed=5)), list(_tokens(scaled[1], 60, seed=6))]
    outs = multi_seq_logits(scaled[0], seqs, unified=unified, **_kw(compensation))
    for out, s in zip(outs, seqs):
        assert np.abs(out - _oracle(scaled, s, compensation=compensation)).max() < F32_TOL


@pytest.mark.parametrize("unified", [False, True])
def test_seq_cp_and_keep(scaled, unified):
    """Copy a sequence whose early tokens are folded in every ring, continue both copies, keep one."""
    got, kept, (prefix, tails, more) = copy_continue_keep(scaled, unified)
    n = len(prefix)
    for j in (0, 1):
        assert np.abs(np.array(got[j]) - _oracle(scaled, prefix + tails[j])[n:]).max() < F32_TOL
    assert np.abs(np.array(kept) - _oracle(scaled, prefix + tails[1] + more)[n + 20:]).max() < F32_TOL


def test_trim_within_every_margin_then_continue(scaled):
    assert trim_and_continue(scaled) < F32_TOL


def test_remove_folded_positions_refused(scaled):
    llm = _llama(scaled[0])
    try:
        llm.eval(list(_tokens(scaled[1], 400, seed=10)))
        assert not llm._ctx.kv_cache_seq_rm(0, 20, 30), "a hole in the folded history must be refused"
        assert not llm._ctx.kv_cache_seq_rm(0, 50, -1)
        assert llm._ctx.kv_cache_seq_rm(0, 395, -1)
        assert llm._ctx.kv_cache_seq_rm(0, 2, -1)  # everything folded goes, in every ring
        toks = _tokens(scaled[1], 60, seed=11)
        llm.n_tokens = 2
        llm.eval(list(toks[2:]))
    finally:
        llm.close()


def test_state_save_load_round_trip(scaled):
    assert save_continue_restore(scaled) < F32_TOL


def test_kv_bytes_by_ring(scaled):
    from razor_gguf import _native

    llm = _llama(scaled[0], n_ctx=4096)
    try:
        ctx = llm._ctx.ctx
        kv = _native.kv_bytes(ctx)
        assert _native.layer_windows(ctx) == WINDOWS
        rings = _native.ring_bytes(ctx)
        row = 2 * 32 * 4  # K + V of one f32 head of size 32
        # local heads: window 8 -> layers 0 and 3 (1 + 1), 16 -> layer 2 (1), 24 -> layer 1 (2); 256 cells each
        assert rings == [(8, 2 * 256 * row), (16, 1 * 256 * row), (24, 2 * 256 * row)]
        assert kv.local == sum(b for _, b in rings) and kv.retrieval == 3 * 4096 * row
        st = llm.razor_stats()
        assert st["layer_windows"] == WINDOWS and st["rings"] == rings and st["window"] == WINDOW
    finally:
        llm.close()


def test_layer_windows_off_is_the_uniform_cache(scaled):
    """razor.layer_windows = false (layer_windows=False) ignores the scales: one ring, the uniform oracle."""
    from razor_gguf import _native

    toks = _tokens(scaled[1], 100, seed=2)
    got = llama_logits(scaled[0], toks, kv_overrides={"razor.layer_windows": False})
    assert np.abs(got - _oracle(scaled, toks, window=WINDOW)).max() < F32_TOL
    llm = _llama(scaled[0], layer_windows=False)
    try:
        assert _native.layer_windows(llm._ctx.ctx) == [WINDOW] * 4 and len(_native.ring_bytes(llm._ctx.ctx)) == 1
    finally:
        llm.close()


def test_budget_sets_the_scaled_windows(scaled):
    """A budget fits the base window the scales multiply; the cache then matches the oracle at those windows."""
    llm = _llama(scaled[0], n_ctx=512, kv_budget=0.8)
    try:
        st = llm.razor_stats()
        assert st["kv_bytes"] <= 0.8 * st["full_equiv_bytes"]
        w = st["window"]
        assert st["layer_windows"] == [max(1, round(s * w)) for s in SCALE] and len(st["rings"]) == 3
        toks = _tokens(scaled[1], 300)
        llm.eval([int(t) for t in toks])
        got = np.array(llm.scores[: len(toks)], dtype=np.float64)
    finally:
        llm.close()
    assert np.abs(got - _oracle(scaled, toks, window=st["layer_windows"])).max() < F32_TOL


def test_windows_covering_context_are_stock(scaled):
    """Every ring's window at least the context: nothing is evicted and the split path reproduces the stock cache."""
    toks = _tokens(scaled[1], 100, seed=7)
    wide = llama_logits(scaled[0], toks, n_ctx=512, kv_overrides={"razor.window": 200})  # windows 100..300
    stock = llama_logits(scaled[0], toks, n_ctx=512, kv_overrides={"razor.enabled": False})
    assert np.abs(wide - stock).max() < F32_TOL


def test_bad_scale_is_one_error(tmp_path):
    from razor_gguf import Llama

    cfg = tm.TinyConfig()
    path = tm.write_tiny_model(tmp_path / "bad.gguf", cfg, tm.RazorMeta(head_map=MIXED, layer_window_scale=[1.0, 1.0]))
    with pytest.raises(ValueError):
        Llama(model_path=str(path), n_ctx=256, verbose=False)


def test_iswa_global_layers_scaled(tmp_path):
    """A gemma3-style model: the scales apply to the global layers only (the sliding-window layers keep the
    stock SWA cache)."""
    cfg = tm.TinyConfig(arch="gemma3", n_swa=32, swa_pattern=2)
    hm = np.array([[0, 0], [1, 0], [0, 0], [0, 0]], np.int32)
    scale = [1.0, 0.5, 1.0, 1.5]
    path = tm.write_tiny_model(tmp_path / "g3.gguf", cfg, tm.RazorMeta(head_map=hm, n_sink=SINK, window=WINDOW,
                                                                     layer_window_scale=scale))
    w = tm.read_weights(path)
    toks = _tokens(cfg, 100, seed=3)
    got = llama_logits(path, toks, n_ctx=512)
    want = tf.forward(w, cfg, toks, head_map=hm, n_sink=SINK, window=[16, 8, 16, 24])
    err = np.abs(got - want).max()
    assert err < F32_TOL, err
    assert np.abs(got - tf.forward(w, cfg, toks, head_map=hm, n_sink=SINK, window=WINDOW)).max() > 10 * err
