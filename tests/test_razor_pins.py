"""Pinned tokens (razor.n_pin) in the razor cache against the numpy oracle, their sequence operations and state,
the retrieval-attention record that chooses them, and razor_gguf.Llama's two reads of a prompt (tiny synthetic
GGUFs with random weights; see tests/test_razor_cache.py for the tolerances)."""

from __future__ import annotations

import numpy as np
import pytest

from razor_gguf.pins import select_pins
from razor_gguf.testing import tiny_forward as tf
from razor_gguf.testing import tiny_model as tm
from razor_gguf.testing.compare import F16_TOL, F32_TOL, RawContext

SINK, WINDOW = 4, 16
MIXED = np.array([[1, 0], [0, 0], [0, 1], [1, 0]], np.int32)  # layer 1 all local, the others split
PINS = [10, 11, 30, 55]
PIN4 = {"razor.compensation": False, "razor.n_pin": 4}


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    cfg = tm.TinyConfig(head_dim=32)
    path = tm.write_tiny_model(tmp_path_factory.mktemp("pins") / "mixed.gguf", cfg,
                               tm.RazorMeta(head_map=MIXED, n_sink=SINK, window=WINDOW))
    return path, cfg, tm.read_weights(path)


def _tokens(cfg, n, seed=1):
    return np.random.default_rng(seed).integers(3, cfg.n_vocab, size=n)


def _oracle(model, toks, pins=(), **kw):
    _, cfg, w = model
    return tf.forward(w, cfg, toks, head_map=MIXED, n_sink=SINK, window=WINDOW, compensation=False, pins=pins, **kw)


def _decode(rc, toks, start=0, chunk=16):
    out = []
    for s in range(start, len(toks), chunk):
        out += rc.decode([(toks[i], i, 0) for i in range(s, min(len(toks), s + chunk))])
    return np.array(out)


def _raw(model, **kw):
    return RawContext(model[0], n_ctx=256, n_batch=16, n_ubatch=kw.pop("n_ubatch", 16), kv_overrides=PIN4, **kw)


@pytest.mark.parametrize("flash_attn", [False, True])
@pytest.mark.parametrize("n_ubatch", [1, 7, 16])
def test_pins_match_oracle(mixed, flash_attn, n_ubatch):
    """100 tokens, window 16, four pins (two of them neighbours): every local head also sees each pinned token
    after it leaves the window, read from its pin row, never twice."""
    from razor_gguf import _native

    toks = _tokens(mixed[1], 100)
    with _raw(mixed, n_ubatch=n_ubatch, flash_attn=flash_attn) as rc:
        assert _native.n_pin(rc.ctx) == 4
        assert _native.set_pins(rc.ctx, PINS + [2]) == 4  # a sink is kept anyway: dropped
        got = _decode(rc, toks)
    err = np.abs(got - _oracle(mixed, toks, PINS)).max()
    assert err < (F16_TOL if flash_attn else F32_TOL), err
    assert np.abs(got - _oracle(mixed, toks)).max() > 10 * err


def test_pins_in_a_q8_0_cache(mixed):
    """Pins in a q8_0 cache (tools/evidence.py's +q8_0 cells): a pinned row is copied out of its ring cell
    dequantized and stored again in q8_0; the logits stay as close to the oracle as without pins."""
    from razor_gguf import _native

    toks = _tokens(mixed[1], 100)
    errs = []
    for pins in (PINS, []):
        with _raw(mixed, flash_attn=True, kv_type=8) as rc:  # GGML_TYPE_Q8_0
            assert _native.set_pins(rc.ctx, pins) == len(pins)
            errs.append(np.abs(_decode(rc, toks) - _oracle(mixed, toks, pins)).max())
    assert errs[0] < 1.5 * errs[1] + F16_TOL, errs


def test_pin_rows_unused_are_invisible(mixed):
    """Pin rows allocated but nothing pinned: the same logits as without pin rows (the rows are masked)."""
    toks = _tokens(mixed[1], 100, seed=2)
    with _raw(mixed) as rc:
        got = _decode(rc, toks)
    with RawContext(mixed[0], n_ctx=256, n_batch=16, n_ubatch=16, kv_overrides={"razor.compensation": False}) as rc:
        ref = _decode(rc, toks)
    assert np.abs(got - ref).max() < F32_TOL


def test_too_many_pins_and_compensation_refused(mixed):
    from razor_gguf import Llama, _native

    with _raw(mixed) as rc:
        with pytest.raises(ValueError, match="at most 4"):
            _native.set_pins(rc.ctx, [10, 20, 30, 40, 50])
    with pytest.raises(ValueError, match="razor.n_pin .* needs razor.compensation = false"):
        Llama(model_path=str(mixed[0]), n_ctx=256, verbose=False, pins=4, compensation=True)
    with pytest.raises(ValueError, match="pins must be >= 0"):
        Llama(model_path=str(mixed[0]), n_ctx=256, verbose=False, pins=-1)


def test_trim_pinned_position_then_continue(mixed):
    """seq_rm of a pinned position empties its rows until it is decoded again: trimming the tail (pin 95
    inside it) and decoding it again equals an uninterrupted run."""
    from razor_gguf import _native

    toks = _tokens(mixed[1], 100, seed=3)
    pins = [10, 30, 95]
    with _raw(mixed) as rc:
        _native.set_pins(rc.ctx, pins)
        fresh = _decode(rc, toks)
    with _raw(mixed) as rc:
        _native.set_pins(rc.ctx, pins)
        _decode(rc, list(toks[:90]) + list(_tokens(mixed[1], 10, seed=4)))  # a wrong tail, pin 95 in it
        assert rc.seq_rm(0, 90, -1)
        again = _decode(rc, toks, start=90)
    assert np.abs(again - fresh[90:]).max() < F32_TOL
    assert np.abs(fresh - _oracle(mixed, toks, pins)).max() < F32_TOL


def test_state_round_trip_keeps_pins(mixed):
    """Save after 60 tokens (pins 10 and 30 filled, 70 not yet), restore into a fresh context, continue: the pins'
    positions, fills and rows come back."""
    import llama_cpp

    from razor_gguf import Llama, _native

    toks = list(_tokens(mixed[1], 100, seed=5))
    read = llama_cpp.Llama.eval  # the stock eval: the pins are set by hand here, not chosen by a first read
    kw = dict(n_ctx=256, n_batch=16, n_ubatch=16, logits_all=True, type_k=0, type_v=0, verbose=False, pins=4,
              compensation=False)
    a = Llama(model_path=str(mixed[0]), **kw)
    b = Llama(model_path=str(mixed[0]), **kw)
    try:
        _native.set_pins(a._ctx.ctx, [10, 30, 70])
        read(a, toks[:60])
        state = a.save_state()
        read(a, toks[60:])
        b.load_state(state)
        read(b, toks[60:])
        ref = _oracle(mixed, toks, [10, 30, 70])
        assert np.abs(np.array(a.scores[60:100]) - ref[60:]).max() < F32_TOL
        assert np.abs(np.array(b.scores[60:100]) - ref[60:]).max() < F32_TOL
    finally:
        a.close()
        b.close()


def test_pin_capture_is_the_retrieval_heads_attention(mixed):
    """The record of the last 8 queries equals their softmax attention in the retrieval heads of the split
    layers (layers 0, 2, 3), summed over queries and heads, computed from the oracle's Q and K; each query
    row sums to 1, so the record sums to 8 x 3 layers x 2 query heads."""
    from razor_gguf import _native

    _, cfg, _ = mixed
    toks = _tokens(mixed[1], 100, seed=6)
    with _raw(mixed) as rc:
        _decode(rc, toks[:92])
        _native.pin_capture(rc.ctx, True)
        rc.decode([(toks[i], i, 0) for i in range(92, 100)])
        _native.pin_capture(rc.ctx, False)
        got = _native.pin_scores(rc.ctx, 110)
    want = np.zeros(110)
    group = cfg.n_head // cfg.n_head_kv

    def probe(il, q, k):
        if MIXED[il].all() or not MIXED[il].any():
            return
        for hk in np.flatnonzero(MIXED[il]):
            for h in range(hk * group, (hk + 1) * group):
                s = q[92:, h] @ k[:, hk].T / np.sqrt(cfg.head_dim)
                s = np.where(np.arange(100)[None, :] <= np.arange(92, 100)[:, None], s, -np.inf)
                p = np.exp(s - s.max(axis=1, keepdims=True))
                want[:100] += (p / p.sum(axis=1, keepdims=True)).sum(axis=0)

    _oracle(mixed, toks, probe=probe)
    assert abs(got.sum() - 8 * 3 * group) < 1e-3
    assert np.abs(got - want).max() < 1e-4
    assert not got[100:].any()


def test_llama_reads_the_prompt_twice_with_pins(mixed):
    """razor_gguf.Llama(pins=4): a prompt from an empty cache is read once to choose its pins (the highest pooled
    retrieval attention of its last tokens, outside the final window), then again with them: its logits are the
    oracle's with those pins. A continuation is not read twice and keeps them."""
    from razor_gguf import Llama, _native

    toks = list(_tokens(mixed[1], 100, seed=7))
    llm = Llama(model_path=str(mixed[0]), n_ctx=256, n_batch=16, n_ubatch=16, logits_all=True, type_k=0, type_v=0,
                verbose=False, pins=4, compensation=False)
    try:
        llm.eval(toks[:90])
        pins = llm.pinned
        assert len(pins) == 4 and all(SINK <= p < 90 - WINDOW for p in pins)
        # the same choice by hand: the last 16 queries (n_batch) recorded in one ubatch
        with RawContext(mixed[0], n_ctx=256, n_batch=16, n_ubatch=16, kv_overrides=PIN4) as rc:
            _decode(rc, toks[:74])
            _native.pin_capture(rc.ctx, True)
            rc.decode([(toks[i], i, 0) for i in range(74, 90)])
            _native.pin_capture(rc.ctx, False)
            assert select_pins(_native.pin_scores(rc.ctx, 90), 4, SINK, 90 - WINDOW) == pins
        llm.eval(toks[90:])
        assert llm.pinned == pins
        ref = _oracle(mixed, toks, pins)
        assert np.abs(np.array(llm.scores[:100]) - ref).max() < F32_TOL
    finally:
        llm.close()


def test_new_prompt_over_a_shared_prefix_chooses_pins_again(mixed):
    """llama-cpp-python's generate() keeps the longest cached prefix the cache can trim to (the server, a shared
    system prompt): a prompt whose prefix ends before a pinned token of the last has its pins chosen from all of
    it again, as a fresh model would; a continuation that keeps every pinned token is not read twice."""
    from razor_gguf import Llama

    first = list(_tokens(mixed[1], 90, seed=11))
    second = first[:30] + list(_tokens(mixed[1], 70, seed=1))
    kw = dict(model_path=str(mixed[0]), n_ctx=256, n_batch=16, n_ubatch=16, logits_all=True, type_k=0, type_v=0,
              verbose=False, pins=16, compensation=False)  # 4..12 take 9: the sinks' score spills 12 forward
    fresh, llm = Llama(**kw), Llama(**kw)
    try:
        fresh.eval(second)
        llm.eval(first)
        assert any(p >= 30 for p in llm.pinned) and llm.pinned != fresh.pinned
        assert llm._ctx.kv_cache_seq_rm(-1, 30, -1)  # the cache keeps the shared 30 tokens, so generate() does
        llm.n_tokens = 30
        llm.eval(second[30:])
        assert llm.pinned == fresh.pinned != []
        assert np.array_equal(np.array(llm.scores[:len(second)]), np.array(fresh.scores[:len(second)]))
        pins = llm.pinned
        more = list(_tokens(mixed[1], 3, seed=9))
        llm.create_completion(second + more, max_tokens=1, temperature=0)  # the next turn: one read, same pins
        assert llm.pinned == pins
        assert np.abs(np.array(llm.scores[:len(second) + 3]) - _oracle(mixed, second + more, pins)).max() < F32_TOL
    finally:
        fresh.close()
        llm.close()


def test_reference_pass_chooses_the_pins_llama_cpp_chooses(mixed):
    """razor_gguf.calibration.choose_pins (what a pinned retrieval probe in the reference pass uses) picks the pins
    razor_gguf.Llama picks for the same prompt (its record of the last 32 queries: n_ubatch 32), and the reference
    pass's second read with them gives llama.cpp's logits."""
    pytest.importorskip("torch")
    from razor_gguf import Llama
    from razor_gguf.calibration import choose_pins, razor_policy
    from razor_gguf.reference import ReferenceModel

    toks = [int(t) for t in _tokens(mixed[1], 120, seed=5)]
    llm = Llama(model_path=str(mixed[0]), n_ctx=256, n_batch=32, n_ubatch=32, logits_all=True, type_k=0, type_v=0,
                verbose=False, pins=4, compensation=False)
    try:
        llm.eval(toks)
        cpp, pins = np.array(llm.scores[:len(toks)]), llm.pinned
    finally:
        llm.close()
    model = ReferenceModel(str(mixed[0]))
    assert choose_pins(model, toks, MIXED, n_sink=SINK, window=WINDOW, n_pin=4) == pins
    ref = model.forward(toks, want_logits="all", attention=razor_policy(model.hp, MIXED, SINK, WINDOW, False, pins))
    unpinned = model.forward(toks, want_logits="all", attention=razor_policy(model.hp, MIXED, SINK, WINDOW, False))
    assert np.abs(ref.numpy() - cpp).max() < 1e-4 < 0.1 < np.abs(unpinned.numpy() - cpp).max()


def test_select_pins():
    s = np.zeros(40)
    s[[12, 30]] = [5.0, 3.0]
    # a strong token pins PIN_BEFORE (2) before it and PIN_AFTER (12) after: 10..24, then 28..40; ties: the earliest
    assert select_pins(s, 4, 4, 40) == [10, 11, 12, 13]
    assert select_pins(s, 15, 4, 40) == list(range(10, 25))
    assert select_pins(s, 20, 4, 40)[-5:] == [28, 29, 30, 31, 32]
    assert select_pins(s, 3, 4, 40, before=1, after=1) == [11, 12, 13]
    assert select_pins(s, 4, 4, 20, before=0, after=0) == [4, 5, 6, 12]  # only [4, 20); zeros tie: the earliest
    assert select_pins(s, 0, 4, 40) == [] and select_pins(s, 4, 4, 4) == []
