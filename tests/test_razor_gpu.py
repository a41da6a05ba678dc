"""The razor KV cache on a GPU backend: the oracle, parity, sequence and state checks of
test_razor_cache.py with every layer and both caches offloaded (n_gpu_layers=-1). Skipped unless the
patched libraries have a GPU backend and a device is present: CI has none; tools/gpu_check.sh runs these
on a GPU machine.

Tolerance: GPU kernels round differently from the CPU (tensor-core matmuls, flash attention in f16) and
pick different kernels for different batch sizes, so checks against the oracle are held to max(F16_TOL,
2x the error the stock cache makes against the stock oracle in the same configuration on the same device),
and checks between two runs of the device to F16_TOL; run with -s to see the measured errors. Dropping the
compensation row or misplacing the window moves these logits by more than 1
(test_razor_cache.py::test_oracle_differs_from_stock), far above either.
"""

from __future__ import annotations

import numpy as np
import pytest
import test_razor_cache
from test_razor_cache import GGML_TYPE_Q4_0, GGML_TYPE_Q8_0, _oracle, _tokens, copy_continue_keep, save_continue_restore

from razor_gguf.testing import tiny_forward as tf
from razor_gguf.testing.compare import F16_TOL, llama_logits, multi_seq_logits

GPU = {"n_gpu_layers": -1}


def _gpu_offload() -> bool:
    from razor_gguf import _native

    try:
        _native.load_llama_cpp()
    except _native.NativeLibraryError:
        return False  # the CPU tests report a broken build
    return _native.local_gpu_devices() > 0  # not llama_supports_gpu_offload(): true for any RPC-enabled build


pytestmark = pytest.mark.skipif(not _gpu_offload(), reason="no GPU backend or no GPU device")

# the CPU tests' tiny razor models (module-scoped fixtures: built again for this module)
mixed, mixed64 = test_razor_cache.mixed, test_razor_cache.mixed64
scattered = test_razor_cache.scattered


def _check(what, got, ref, model, toks, **kw):
    """razor on the GPU against the SPEC oracle, at the tolerance the stock cache earns on the same device."""
    stock = llama_logits(model[0], toks, kv_overrides={"razor.enabled": False}, **GPU, **kw)
    stock_err = np.abs(stock - tf.forward(model[2], model[1], toks)).max()
    err = np.abs(got - ref).max()
    tol = max(F16_TOL, 2 * stock_err)
    print(f"\n{what}: razor vs oracle {err:.3g}, stock vs stock oracle {stock_err:.3g} (tolerance {tol:.3g})")
    assert err < tol, what


def test_kv_cache_is_on_the_gpu(mixed, capfd):
    from razor_gguf import Llama, _native

    llm = Llama(model_path=str(mixed[0]), n_ctx=512, n_batch=16, n_ubatch=16, verbose=True, **GPU)
    try:
        assert _native.kv_bytes(llm._ctx.ctx).razor
    finally:
        llm.close()
    err = capfd.readouterr().err
    kv_lines = [ln for ln in err.splitlines() if "KV buffer size" in ln]
    print("\n" + "\n".join(kv_lines))
    assert kv_lines and all("CPU" not in ln for ln in kv_lines), "both caches live in device memory"


@pytest.mark.parametrize("flash_attn", [False, True])
@pytest.mark.parametrize("n_ubatch", [1, 7, 16])
def test_matches_oracle_f32(mixed, flash_attn, n_ubatch):
    toks = _tokens(mixed[1], 100)
    kw = dict(flash_attn=flash_attn, n_batch=16, n_ubatch=n_ubatch)
    got = llama_logits(mixed[0], toks, **GPU, **kw)
    _check(f"f32 KV, FA {flash_attn}, ubatch {n_ubatch}", got, _oracle(mixed, toks), mixed, toks, **kw)


@pytest.mark.parametrize("flash_attn", [False, True])
@pytest.mark.parametrize("n_ubatch", [7, 256])
def test_matches_oracle_without_compensation(mixed, flash_attn, n_ubatch):
    """The cache without the compensation row (no fold in the graph, no scratch rows): sinks + window only."""
    toks = _tokens(mixed[1], 300)
    kw = dict(flash_attn=flash_attn, n_ctx=512, n_batch=256, n_ubatch=n_ubatch)
    got = llama_logits(mixed[0], toks, kv_overrides=test_razor_cache.NO_COMP, **GPU, **kw)
    _check(f"no compensation row, FA {flash_attn}, ubatch {n_ubatch}", got, _oracle(mixed, toks, compensation=False),
           mixed, toks, **kw)


@pytest.mark.parametrize("flash_attn", [False, True])
@pytest.mark.parametrize("compensation", [True, False])
def test_head_groups_in_any_order(scattered, flash_attn, compensation):
    """Four KV heads a layer: layers whose retrieval heads are gathered (get_rows) beside layers split by views."""
    toks = _tokens(scattered[1], 100)
    kw = dict(flash_attn=flash_attn, n_batch=16, n_ubatch=7)
    over = None if compensation else test_razor_cache.NO_COMP
    got = llama_logits(scattered[0], toks, kv_overrides=over, **GPU, **kw)
    ref = _oracle(scattered, toks, head_map=test_razor_cache.SCATTERED, compensation=compensation)
    _check(f"scattered heads, row {compensation}, FA {flash_attn}", got, ref, scattered, toks, **kw)


@pytest.mark.parametrize("flash_attn", [False, True])
def test_matches_oracle_f16(mixed64, flash_attn):
    toks = _tokens(mixed64[1], 120, seed=2)
    kw = dict(flash_attn=flash_attn, f32_kv=False)
    got = llama_logits(mixed64[0], toks, **GPU, **kw)
    _check(f"f16 KV, FA {flash_attn}", got, _oracle(mixed64, toks), mixed64, toks, **kw)


@pytest.mark.parametrize("qtype", [GGML_TYPE_Q8_0, GGML_TYPE_Q4_0])
def test_matches_oracle_quantized(mixed64, qtype):
    toks = _tokens(mixed64[1], 120, seed=3)
    kw = dict(flash_attn=True, f32_kv=False, type_k=qtype, type_v=qtype)
    got = llama_logits(mixed64[0], toks, **GPU, **kw)
    _check(f"KV type {qtype}", got, _oracle(mixed64, toks), mixed64, toks, **kw)


@pytest.mark.parametrize("flash_attn", [False, True])
def test_prefill_equals_decode(mixed, flash_attn):
    toks = _tokens(mixed[1], 80, seed=4)
    one_shot = llama_logits(mixed[0], toks, n_batch=32, n_ubatch=32, flash_attn=flash_attn, **GPU)
    decode = llama_logits(mixed[0], toks, n_batch=1, n_ubatch=1, flash_attn=flash_attn, **GPU)
    diff = np.abs(one_shot - decode).max()
    print(f"\nFA {flash_attn}: prefill vs decode {diff:.3g}")
    assert diff < F16_TOL


@pytest.mark.parametrize("flash_attn", [False, True])
def test_window_covering_context_is_stock(mixed, flash_attn):
    """Parity on the device: the split path with nothing to evict gives the stock cache's logits."""
    from razor_gguf import _native

    toks = _tokens(mixed[1], 100, seed=7)
    kw = dict(n_ctx=512, flash_attn=flash_attn, **GPU)
    razor = llama_logits(mixed[0], toks, kv_overrides={"razor.window": 200}, **kw)
    stock = llama_logits(mixed[0], toks, kv_overrides={"razor.enabled": False}, **kw)
    diff = np.abs(razor - stock).max()
    print(f"\nwindow 200 over 100 tokens, FA {flash_attn}: razor vs stock {diff:.3g}")
    assert diff < F16_TOL
    assert (razor.argmax(-1) == stock.argmax(-1)).all()
    llm = _llama(mixed[0], kv_overrides={"razor.window": 200})
    try:
        assert _native.kv_bytes(llm._ctx.ctx).razor  # the split path really ran
    finally:
        llm.close()


@pytest.mark.parametrize("unified", [False, True])
def test_multiple_sequences(mixed, unified):
    seqs = [list(_tokens(mixed[1], 100, seed=5)), list(_tokens(mixed[1], 60, seed=6))]
    outs = multi_seq_logits(mixed[0], seqs, unified=unified, **GPU)
    stock = multi_seq_logits(mixed[0], seqs, unified=unified, kv_overrides={"razor.enabled": False}, **GPU)
    for out, ref, s in zip(outs, stock, seqs):
        err = np.abs(out - _oracle(mixed, s)).max()
        stock_err = np.abs(ref - tf.forward(mixed[2], mixed[1], s)).max()
        print(f"\nunified {unified}, {len(s)} tokens: razor vs oracle {err:.3g}, stock vs stock oracle {stock_err:.3g}")
        assert err < max(F16_TOL, 2 * stock_err)


def _llama(path, **kw):
    return test_razor_cache._llama(path, **GPU, **kw)


def test_state_save_load_round_trip(mixed):
    diff = save_continue_restore(mixed, **GPU)
    print(f"\nsave/load: {diff:.3g}")
    assert diff < F16_TOL


def test_reset_and_trim_then_continue(mixed):
    """reset() and seq_rm of recent tokens rewrite the compensation state on the device: continuing must
    equal a fresh run."""
    toks = _tokens(mixed[1], 120, seed=8)
    fresh = llama_logits(mixed[0], toks, n_ctx=512, **GPU)
    llm = _llama(mixed[0])
    try:
        llm.eval(list(_tokens(mixed[1], 150, seed=12)))
        llm.reset()
        llm.eval(list(toks[:100]) + list(_tokens(mixed[1], 12, seed=9)))
        assert llm._ctx.kv_cache_seq_rm(-1, 100, -1)
        llm.n_tokens = 100
        llm.eval(list(toks[100:]))
        diff = np.abs(np.array(llm.scores[:120]) - fresh).max()
    finally:
        llm.close()
    print(f"\nreset + trim: {diff:.3g}")
    assert diff < F16_TOL


@pytest.mark.parametrize("unified", [False, True])
def test_seq_cp_and_keep(mixed, unified):
    """seq_cp copies the compensation sums outside the graph (ggml_backend_tensor_get/set), on a device
    buffer here."""
    got, kept, (prefix, tails, more) = copy_continue_keep(mixed, unified, **GPU)
    n = len(prefix)
    errs = [np.abs(np.array(got[j]) - _oracle(mixed, prefix + tails[j])[n:]).max() for j in (0, 1)]
    errs.append(np.abs(np.array(kept) - _oracle(mixed, prefix + tails[1] + more)[n + 20:]).max())
    print(f"\nunified {unified}: copies vs oracle {errs[0]:.3g}, {errs[1]:.3g}; kept {errs[2]:.3g}")
    assert max(errs) < F16_TOL


@pytest.mark.parametrize("flash_attn", [False, True])
def test_pins_chosen_and_kept(mixed, flash_attn):
    """razor_gguf.Llama(pins=4) offloaded: the first read's record of the retrieval heads' attention (on the GPU)
    chooses four pins, and the second read's logits are the oracle's with those pins."""
    from razor_gguf import Llama

    toks = list(_tokens(mixed[1], 100, seed=7))
    llm = Llama(model_path=str(mixed[0]), n_ctx=256, n_batch=16, n_ubatch=16, logits_all=True, type_k=0, type_v=0,
                flash_attn=flash_attn, verbose=False, pins=4, compensation=False, **GPU)
    try:
        llm.eval(toks)
        pins, got = llm.pinned, np.array(llm.scores[:100])
    finally:
        llm.close()
    assert len(pins) == 4
    ref = tf.forward(mixed[2], mixed[1], toks, head_map=test_razor_cache.MIXED, n_sink=test_razor_cache.SINK,
                     window=test_razor_cache.WINDOW, compensation=False, pins=pins)
    _check("pins", got, ref, mixed, toks, flash_attn=flash_attn)
