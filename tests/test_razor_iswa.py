"""The razor cache inside an interleaved sliding-window model (llama.cpp's iSWA composition): a tiny gemma3-style
GGUF (4 layers, sliding window on layers 0 and 2, two KV heads per layer) against the numpy oracle, whose
sliding-window layers are llama.cpp's STANDARD window and whose global layers follow the razor policy; then
Gemma 3 270M itself against the reference pass.

The sliding-window layers keep llama.cpp's own SWA cache, so every test here also checks that the razor cache
leaves them exactly as stock runs them (the oracle's SWA layers are the stock ones)."""

from __future__ import annotations

import numpy as np
import pytest
from test_razor_cache import NO_COMP, SINK, WINDOW, copy_continue_keep

from razor_gguf.testing import tiny_forward as tf
from razor_gguf.testing import tiny_model as tm
from razor_gguf.testing.compare import F16_TOL, F32_TOL, llama_logits, multi_seq_logits

N_SWA = 32
# layers 0 and 2 slide (their map entries are ignored: 0); layer 1 splits its two KV heads, layer 3 is all local
MIXED = np.array([[0, 0], [1, 0], [0, 0], [0, 0]], np.int32)
STOCK = {"razor.enabled": False}


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    cfg = tm.TinyConfig(arch="gemma3", n_swa=N_SWA, swa_pattern=2)
    path = tm.write_tiny_model(tmp_path_factory.mktemp("iswa") / "gemma-mixed.gguf", cfg,
                               tm.RazorMeta(head_map=MIXED, n_sink=SINK, window=WINDOW))
    return path, cfg, tm.read_weights(path)


def _tokens(cfg, n, seed=1):
    return np.random.default_rng(seed).integers(3, cfg.n_vocab, size=n)


def _oracle(model, toks, head_map=MIXED, window=WINDOW, compensation=True):
    _, cfg, w = model
    return tf.forward(w, cfg, toks, head_map=head_map, n_sink=SINK, window=window, compensation=compensation)


def _ov(compensation):
    return None if compensation else NO_COMP


def test_model_is_iswa_and_stock_matches_oracle(gemma):
    """The tiny model really is an iSWA model to llama.cpp (its stock run matches the oracle only with the
    window on layers 0 and 2), and razor changes the outputs by far more than any tolerance below."""
    path, cfg, w = gemma
    assert cfg.swa_layers == [True, False, True, False]
    toks = _tokens(cfg, 100)
    stock = llama_logits(path, toks, kv_overrides=STOCK)
    assert np.abs(stock - tf.forward(w, cfg, toks)).max() < F32_TOL
    no_window = tf.forward(w, tm.TinyConfig(arch="gemma3", n_swa=0), toks)  # every layer global
    assert np.abs(stock - no_window).max() > 0.05
    assert np.abs(_oracle(gemma, toks) - tf.forward(w, cfg, toks)).max() > 0.1


@pytest.mark.parametrize("flash_attn", [False, True])
@pytest.mark.parametrize("n_ubatch", [1, 7, 16])
@pytest.mark.parametrize("compensation", [True, False])
def test_matches_oracle(gemma, flash_attn, n_ubatch, compensation):
    toks = _tokens(gemma[1], 100)
    got = llama_logits(gemma[0], toks, flash_attn=flash_attn, n_batch=16, n_ubatch=n_ubatch,
                       kv_overrides=_ov(compensation))
    err = np.abs(got - _oracle(gemma, toks, compensation=compensation)).max()
    assert err < (F16_TOL / 10 if flash_attn else F32_TOL), err
    assert np.abs(got - _oracle(gemma, toks, compensation=not compensation)).max() > 10 * err


@pytest.mark.parametrize("compensation", [True, False])
def test_large_ubatches_split_by_the_ring_match_oracle(gemma, compensation):
    """A 256-token ubatch is split by the razor cache (its ring holds fewer); the SWA cache takes the same
    ubatches."""
    toks = _tokens(gemma[1], 300)
    got = llama_logits(gemma[0], toks, n_ctx=512, n_batch=256, n_ubatch=256, kv_overrides=_ov(compensation),
                       swa_full=False)
    assert np.abs(got - _oracle(gemma, toks, compensation=compensation)).max() < F32_TOL


@pytest.mark.parametrize("compensation", [True, False])
def test_prefill_equals_decode(gemma, compensation):
    """The same outputs up to f32 rounding: each run is within F32_TOL of the oracle (test_matches_oracle), so
    the two are within twice that (measured 1.0e-4 with the compensation row, whose rows sit elsewhere in a
    ring sized for another ubatch; the stock cache's prefill and decode differ by 2e-5)."""
    toks = _tokens(gemma[1], 80, seed=4)

    def diff(ov):
        one_shot = llama_logits(gemma[0], toks, n_batch=32, n_ubatch=32, kv_overrides=ov)
        return np.abs(one_shot - llama_logits(gemma[0], toks, n_batch=1, n_ubatch=1, kv_overrides=ov)).max()

    err, err_stock = diff(_ov(compensation)), diff(STOCK)
    print(f"\nprefill vs decode: razor {err:.2e}, stock {err_stock:.2e}")
    assert err < 2 * F32_TOL


def test_all_heads_local_and_quantized_cache(gemma, tmp_path):
    """Every global head local (the forced retrieval ratio 0 of Gemma 3 270M): no retrieval cache at all;
    and a q8_0 cache with flash attention, held to the error the stock cache makes at that type."""
    path, cfg, w = gemma
    toks = _tokens(cfg, 90)
    zeros = np.zeros_like(MIXED)
    got = llama_logits(path, toks, kv_overrides={"razor.retrieval_ratio": 0.0})
    assert np.abs(got - _oracle(gemma, toks, head_map=zeros)).max() < F32_TOL
    q8 = dict(flash_attn=True, type_k=8, type_v=8)
    err_stock = np.abs(llama_logits(path, toks, kv_overrides=STOCK, **q8) - tf.forward(w, cfg, toks)).max()
    err = np.abs(llama_logits(path, toks, **q8) - _oracle(gemma, toks)).max()
    assert err < max(3 * err_stock, F16_TOL / 10), (err, err_stock)


@pytest.mark.parametrize("unified", [False, True])
def test_multiple_sequences(gemma, unified):
    seqs = [list(_tokens(gemma[1], 100, seed=5)), list(_tokens(gemma[1], 60, seed=6))]
    for out, s in zip(multi_seq_logits(gemma[0], seqs, unified=unified), seqs):
        assert np.abs(out - _oracle(gemma, s)).max() < F32_TOL


def test_every_head_retrieval_or_window_covering_context_is_stock(gemma, capfd):
    """Every global head a retrieval head: the stock iSWA cache runs (one log line says why); a window as
    long as the context: the razor cache runs and evicts nothing, reproducing the stock outputs."""
    from razor_gguf import Llama, _native

    path, cfg, _ = gemma
    toks = _tokens(cfg, 100, seed=7)
    stock = llama_logits(path, toks, n_ctx=512, kv_overrides=STOCK)
    capfd.readouterr()
    llm = Llama(model_path=str(path), n_ctx=512, verbose=True, kv_overrides={"razor.retrieval_ratio": 1.0})
    try:
        assert not _native.kv_bytes(llm._ctx.ctx).razor
    finally:
        llm.close()
    assert "every KV head of the global-attention layers is a retrieval head" in capfd.readouterr().err
    wide = llama_logits(path, toks, n_ctx=512, kv_overrides={"razor.window": 200})
    assert np.abs(wide - stock).max() < F32_TOL


def _llama(path, **kw):
    from razor_gguf import Llama

    return Llama(model_path=str(path), n_ctx=kw.pop("n_ctx", 512), n_batch=16, n_ubatch=16, logits_all=True,
                 type_k=0, type_v=0, n_threads=2, verbose=False, **kw)


def test_trim_and_state_round_trip(gemma):
    """A tail trimmed within the margin continues exactly as a fresh run; a saved and restored state gives the
    same continuation (the SWA cache's state travels with the razor cache's)."""
    cfg = gemma[1]
    toks = list(_tokens(cfg, 140, seed=8))
    fresh = llama_logits(gemma[0], toks, n_ctx=512)
    llm = _llama(gemma[0])
    try:
        llm.eval(toks[:100] + list(_tokens(cfg, 12, seed=9)))
        assert llm._ctx.kv_cache_seq_rm(-1, 100, -1)
        llm.n_tokens = 100
        state = llm.save_state()
        llm.eval(toks[100:])
        first = np.array(llm.scores[:140])
        assert np.abs(first - fresh).max() < F32_TOL
        llm.eval(list(_tokens(cfg, 30, seed=10)))
        llm.load_state(state)
        llm.eval(toks[100:])
        assert np.abs(np.array(llm.scores[100:140]) - fresh[100:]).max() < F32_TOL
    finally:
        llm.close()


def test_swa_full_default_follows_the_head_map(gemma, tmp_path):
    """With a head map the SWA layers get a window-size cache unless swa_full is given, so a budget the
    full-size one leaves nothing for is met; a model without a head map keeps llama-cpp-python's default
    (a full-size SWA cache) and runs as llama-cpp-python runs it."""
    path, cfg, _ = gemma
    plain = tm.write_tiny_model(tmp_path / "gemma-plain.gguf", cfg)
    for p, swa_full, kw in ((path, False, {}), (path, True, {"swa_full": True}), (plain, True, {})):
        llm = _llama(p, n_ctx=4096, **kw)
        try:
            assert llm.context_params.swa_full is swa_full
        finally:
            llm.close()
    llm = _llama(path, n_ctx=4096, kv_budget=0.35)  # at 4096 the full-size SWA cache alone is 0.5 of the stock
    try:
        st = llm.razor_stats()
        assert st["razor"] and st["kv_bytes"] <= 0.35 * st["full_equiv_bytes"]
    finally:
        llm.close()
    with pytest.raises(ValueError, match="sliding-window layers"):
        _llama(path, n_ctx=4096, kv_budget=0.35, swa_full=True)


@pytest.mark.parametrize("razor", [True, False])
def test_prefix_reuse_past_the_sliding_window_reads_afresh(gemma, razor):
    """razor_gguf.Llama gives a model with a head map a window-size SWA cache by default (swa_full=False, as
    llama-server does). A prompt that shares only an early prefix with the cached one, cut where that cache no
    longer holds the keys the next token attends to, is read afresh (SwaPrefixCheck): bitwise a fresh model's
    logits, with the razor cache and with the stock one; a prompt that extends the cached one still reuses it.
    llama-cpp-python alone reuses the prefix at that cut (the stock SWA cache accepts it) and attends to a
    window with a hole: about 0.5 off in the logits when run without the check."""
    import llama_cpp

    from razor_gguf import Llama

    class Recorder(llama_cpp.Llama):
        def eval(self, tokens):
            self.starts.append(self.n_tokens)  # where the binding's eval starts, after razor_gguf.Llama's checks
            super().eval(tokens)

    class RecordingLlama(Llama, Recorder):
        starts: list = []

    path, cfg, _ = gemma
    kw = dict(n_ctx=1024, n_batch=16, n_ubatch=16, logits_all=True, type_k=0, type_v=0, n_threads=2, verbose=False,
              razor=razor, **(dict(window=400, compensation=False) if razor else {}))  # a ring that accepts the cut
    llm = RecordingLlama(model_path=str(path), **kw)
    llm.starts = []
    first = [int(t) for t in _tokens(cfg, 400, seed=11)]
    second = first[:100] + [int(t) for t in _tokens(cfg, 60, seed=12)]  # SWA cache: 256 cells, the last ones
    third = second + [int(t) for t in _tokens(cfg, 20, seed=13)]
    try:
        assert llm.context_params.swa_full is False and llm.razor_stats()["razor"] is razor
        next(llm.generate(first, temp=0.0))
        for toks in (second, third):
            next(llm.generate(toks, temp=0.0))
            fresh = Llama(model_path=str(path), **kw)  # the same ubatches from position 0
            fresh.eval(toks)
            want = np.array(fresh.scores[:len(toks)])
            fresh.close()
            assert np.array_equal(np.array(llm.scores[:len(toks)]), want)
        n = len(llm.starts)
        for _ in zip(range(300), llm.generate(third, temp=0.0)):  # decoding on, far past the SWA cache's 256 cells
            pass
    finally:
        llm.close()
    assert llm.starts[n - 1] == len(second) and 100 not in llm.starts, llm.starts
    assert min(llm.starts[n:]) >= len(third) - 1 and max(llm.starts) > 256 + 64, "a continuation read afresh"


@pytest.mark.parametrize("unified", [False, True])
def test_seq_cp_and_keep(gemma, unified):
    """A sequence copied after its early tokens left both the razor window and the sliding window, each copy
    continued differently, one kept: every continuation equals the oracle of its own tokens."""
    got, kept, (prefix, tails, more) = copy_continue_keep(gemma, unified)
    n = len(prefix)
    for j in (0, 1):
        assert np.abs(np.array(got[j]) - _oracle(gemma, prefix + tails[j])[n:]).max() < F32_TOL
    assert np.abs(np.array(kept) - _oracle(gemma, prefix + tails[1] + more)[n + 20:]).max() < F32_TOL


@pytest.mark.parametrize("swa_full", [False, True])
def test_kv_bytes_count_the_swa_cache(gemma, swa_full):
    """The razor cache keeps the stock SWA cache (as large as llama.cpp makes it: swa_full or window + ubatch)
    and splits only the global layers; the full-cache equivalent is what the stock iSWA cache allocates."""
    from razor_gguf import _native

    llm = _llama(gemma[0], n_ctx=4096, swa_full=swa_full)
    stock = _llama(gemma[0], n_ctx=4096, swa_full=swa_full, kv_overrides=STOCK)
    try:
        kv, kv_stock = _native.kv_bytes(llm._ctx.ctx), _native.kv_bytes(stock._ctx.ctx)
        st = llm.razor_stats()
    finally:
        llm.close()
        stock.close()
    row = 2 * 32 * 4 * 2  # K + V of a layer's two f32 heads of size 32, per cell
    swa_cells = 4096 if swa_full else 256  # pad256(n_swa 32 + ubatch 16)
    assert kv.razor and not kv_stock.razor
    assert kv.swa == 2 * swa_cells * row
    assert kv.full_equiv == kv_stock.total == 2 * 4096 * row + kv.swa
    assert kv.retrieval == 4096 * row // 2  # layer 1's retrieval head
    assert kv.local == 3 * 256 * (row // 2)  # three local heads in a 256-cell ring
    assert st["swa_bytes"] == kv.swa and st["kv_bytes"] == kv.total
    assert kv.total < (0.34 if not swa_full else 0.66) * kv.full_equiv


def test_budget_counts_the_swa_cache(gemma):
    """A KV budget covers the SWA cache too: the window it buys matches the oracle, and a budget below the
    SWA cache plus the retrieval heads is one error naming the smallest budget."""
    from razor_gguf import Llama

    path, cfg, _ = gemma
    llm = Llama(model_path=str(path), n_ctx=1024, n_batch=64, n_ubatch=64, logits_all=True, kv_budget=0.6,
                swa_full=False, type_k=0, type_v=0, n_threads=2, verbose=False)
    try:
        st = llm.razor_stats()
        assert st["razor"] and st["kv_bytes"] <= 0.6 * st["full_equiv_bytes"] and st["swa_bytes"] > 0
        assert WINDOW < st["window"] < 600
        toks = _tokens(cfg, 700)
        llm.eval([int(t) for t in toks])
        got = np.array(llm.scores[: len(toks)], dtype=np.float64)
    finally:
        llm.close()
    assert np.abs(got - _oracle(gemma, toks, window=st["window"])).max() < F32_TOL
    with pytest.raises(Exception, match=r"the sliding-window layers 0\.\d+"):
        Llama(model_path=str(path), n_ctx=1024, kv_budget=0.2, swa_full=False, verbose=False)


# Gemma 3 270M: 18 layers, one KV head each, the global ones 5, 11 and 17


def _gemma_prompt(llm, n):
    from test_reference import PROMPT

    toks = llm.tokenize((PROMPT * 8).encode(), add_bos=True)
    return (toks + list(range(1000, 1000 + n)))[:n]


def test_gemma3_270m_forced_ratio_0_matches_the_reference_pass(gemma3_razor):
    """Every global head local (retrieval_ratio 0, window 64): llama.cpp's razor cache against the reference
    pass running the same policy (sliding-window layers: their 512-token window), 700 tokens. The
    reference pass is not bit-exact with llama.cpp (Q4_K_M dequantized to f32 there), so the check is that
    llama.cpp's razor outputs sit as close to the reference's razor outputs as its stock outputs sit to the
    reference's stock outputs, and far from the reference's stock ones."""
    pytest.importorskip("torch")
    from razor_gguf import Llama, _native
    from razor_gguf.calibration import razor_attention_torch
    from razor_gguf.kld import kl_and_top1
    from razor_gguf.reference import ReferenceModel

    path = str(gemma3_razor[0])
    ov = {"razor.retrieval_ratio": 0.0, "razor.window": 64, "razor.n_sink": 4}
    out = {}
    for name, kv in (("razor", ov), ("stock", STOCK)):
        llm = Llama(model_path=path, n_ctx=1024, logits_all=True, verbose=False, kv_overrides=kv)
        try:
            toks = _gemma_prompt(llm, 700)
            assert _native.kv_bytes(llm._ctx.ctx).razor == (name == "razor")
            llm.eval(toks)
            out[name] = np.array(llm.scores[600:700], dtype=np.float32)
        finally:
            llm.close()
    m = ReferenceModel(path)
    hp = m.hp
    zero = np.zeros(hp.n_head_kv)

    def policy(il, q, k, v):
        if hp.swa_layers[il]:
            return razor_attention_torch(q, k, v, zero, 0, hp.n_swa, compensation=False)
        return razor_attention_torch(q, k, v, zero, 4, 64, compensation=True)

    ref_razor = m.forward(toks, want_logits="all", attention=policy, logits_from=600).numpy()
    ref_stock = m.forward(toks, want_logits="all", logits_from=600).numpy()
    kl_rr = float(kl_and_top1(ref_razor, out["razor"])[0].mean())
    kl_ss = float(kl_and_top1(ref_stock, out["stock"])[0].mean())
    kl_rs = float(kl_and_top1(ref_stock, out["razor"])[0].mean())
    print(f"\ngemma3 270M, 100 positions: KL(ref razor | cpp razor) {kl_rr:.5f}, KL(ref stock | cpp stock) "
          f"{kl_ss:.5f}, KL(ref stock | cpp razor) {kl_rs:.5f}")
    assert kl_rr < max(2 * kl_ss, 0.01) and kl_rs > 5 * kl_rr


def test_calibration_keeps_the_sliding_windows(gemma):
    """embed-heads' compensation measurement runs the reference pass with the razor policy in the global layers
    and each sliding-window layer's own window: with every global head a retrieval head razor is the stock
    model (KLD 0), and with every global head local both runs match the numpy oracle's KLD."""
    pytest.importorskip("torch")
    from razor_gguf.calibration import measure_compensation
    from razor_gguf.kld import kl_and_top1
    from razor_gguf.reference import ReferenceModel

    path, cfg, w = gemma
    toks = [int(t) for t in _tokens(cfg, 120, seed=30)]
    m = ReferenceModel(str(path))
    assert m.hp.swa_layers == cfg.swa_layers and m.hp.n_swa == N_SWA
    retr = np.array([[0, 0], [1, 1], [0, 0], [1, 1]])
    same = measure_compensation(m, retr, [toks], n_sink=SINK, window=WINDOW)
    assert same.kld_compensation < 1e-6 and same.kld_no_compensation < 1e-6
    zeros = np.zeros_like(MIXED)
    got = measure_compensation(m, zeros, [toks], n_sink=SINK, window=WINDOW)
    lo = SINK + WINDOW
    full = tf.forward(w, cfg, toks)[lo:]
    for comp, kld in ((True, got.kld_compensation), (False, got.kld_no_compensation)):
        want = float(kl_and_top1(full, _oracle(gemma, toks, head_map=zeros, compensation=comp)[lo:])[0].mean())
        assert kld == pytest.approx(want, rel=1e-3, abs=1e-6), (comp, kld, want)


def test_retrieval_ratio_override_picks_global_heads_only(gemma, tmp_path):
    """A retrieval_ratio given at load time re-selects from the stored scores by embed-heads' rule: counts over
    all KV heads, picks among the global layers' heads, never a sliding-window layer's (here those score highest)."""
    from razor_gguf import _native
    from razor_gguf.scoring import select_heads

    cfg = gemma[1]
    ind = np.array([[0.9, 0.8], [0.3, 0.5], [0.95, 0.7], [0.1, 0.4]], np.float32)
    echo = np.zeros_like(ind)
    path = tm.write_tiny_model(tmp_path / "scores.gguf", cfg, tm.RazorMeta(
        head_map=MIXED, n_sink=SINK, window=WINDOW, echo_scores=echo.ravel(), induction_scores=ind.ravel()))
    llm = _llama(path, kv_overrides={"razor.retrieval_ratio": 0.375})
    try:
        got = np.array(_native.head_map(llm._ctx.ctx)).reshape(MIXED.shape)
    finally:
        llm.close()
    want = select_heads(echo, ind, induction_ratio=0.375, echo_ratio=0.0, local_layers=cfg.swa_layers)
    assert got.tolist() == want.tolist() == [[0, 0], [1, 1], [0, 0], [0, 1]]
