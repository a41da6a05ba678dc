"""The razor cache on a real model (SmolLM2 with the head map embed-heads writes): parity with the
unpatched build where nothing is evicted, exact trims, the SPEC oracle at model scale, and passkey
retrieval."""

from __future__ import annotations

import functools

import numpy as np
import pytest

from razor_gguf import Llama, _native  # first: binds llama_cpp to the patched libraries
from razor_gguf import passkey
from razor_gguf.kld import kl_and_top1


@pytest.mark.parametrize("overrides", [
    {"razor.window": 400},  # razor on (n_ctx 512 > 4 + 400), the ~40 tokens never leave the window
    {"razor.window": 400, "razor.retrieval_ratio": 0.5},  # another split of the heads
    {"razor.retrieval_ratio": 1.0},  # every head a retrieval head: the stock cache
])
def test_greedy_tokens_match_unpatched_golden(smollm2_razor, golden_smollm2, golden_recipe, overrides):
    path = str(smollm2_razor[0])
    # n_ubatch 32 keeps the local ring (4 + 400 + 2 x 32 rows) within the 512-token context
    cls = functools.partial(Llama, kv_overrides=overrides, n_ubatch=32)
    got = golden_recipe.greedy_completion(cls, path, golden_smollm2["request"])
    assert got == {k: golden_smollm2[k] for k in got}

    llm = Llama(model_path=path, n_ctx=512, n_ubatch=32, verbose=False, kv_overrides=overrides)
    try:
        assert _native.kv_bytes(llm._ctx.ctx).razor == (overrides.get("razor.retrieval_ratio") != 1.0)
    finally:
        llm.close()


def test_eviction_moves_the_golden_logits(smollm2_razor, golden_smollm2, golden_recipe):
    """The parity check above can fail: a window shorter than the completion evicts tokens, and the logits
    the tokens are picked from move."""
    cls = functools.partial(Llama, kv_overrides={"razor.window": 8}, n_ubatch=8)
    got = golden_recipe.greedy_completion(cls, str(smollm2_razor[0]), golden_smollm2["request"])
    assert got["logits_sha256"] != golden_smollm2["logits_sha256"]


def test_trim_then_reevaluate_equals_fresh(smollm2_razor):
    """The binding's prefix reuse: a cache holding a long prompt plus 30 wrong tokens (window 64, so most
    of the prompt is evicted) is trimmed back and re-evaluated; the logits of the re-evaluated tokens are
    bitwise those of a fresh evaluation. Same ubatch boundaries on both sides: llama.cpp's own kernels
    (stock cache too) are not batch-invariant on this quantized model (up to 1.4 logits between sizes 1
    and 512)."""

    path = str(smollm2_razor[0])
    kw = dict(n_ctx=1024, n_batch=16, n_ubatch=16, logits_all=True, verbose=False, kv_overrides={"razor.window": 64})
    text = ("A short story about a lighthouse keeper who finds a message in a bottle. The keeper, an old "
            "man named Elias, has lived alone on the rock for thirty years. ") * 8
    llm = Llama(model_path=path, **kw)
    fresh = Llama(model_path=path, **kw)
    try:
        toks = llm.tokenize(text.encode(), add_bos=True)
        n = len(toks) - len(toks) % 16  # ubatch boundaries at the same positions in both runs
        toks = toks[:n]
        cut = n - 32
        assert cut > 150  # far beyond sinks + window: most of the prompt is evicted
        llm.eval(toks[:cut] + list(np.random.default_rng(0).integers(100, 10000, 30)))
        assert llm._ctx.kv_cache_seq_rm(-1, cut, -1)  # within the margin: the evicted rows are still in the ring
        llm.n_tokens = cut
        llm.eval(toks[cut:])
        fresh.eval(toks)
        assert _native.kv_bytes(llm._ctx.ctx).razor
        assert np.array_equal(np.array(llm.scores[cut:n]), np.array(fresh.scores[cut:n]))
    finally:
        llm.close()
        fresh.close()


def test_model_scale_oracle(smollm2_razor):
    """The whole SmolLM2 under SPEC section 1: the PyTorch reference pass with every layer's attention
    computed by the numpy oracle (razor_gguf.oracle) against the patched llama.cpp, on a ~1k-token prompt
    with window 256 (most of it evicted). The two differ by what the stock cache and the reference differ
    by (Q4_1 activation rounding: measured KL 0.0008 vs 0.0007), while razor itself moves the logits by
    KL 0.04 (measured). A cache without the compensation row is off by KL 0.005 (measured), caught here;
    off-by-one windows are the tiny-model oracle tests' job (test_razor_cache.py)."""
    import torch
    from gguf import GGUFReader

    from razor_gguf.oracle import razor_attention
    from razor_gguf.reference import ReferenceModel

    path = str(smollm2_razor[0])
    n_sink, window, last = 4, 256, 64
    head_map = np.array(GGUFReader(path).get_field("razor.head_map").contents()).reshape(30, 3)
    cpp = {}
    # the SPEC row on, whatever default embed-heads measured for this model
    for name, ov in (("razor", {"razor.window": window, "razor.compensation": True}), ("full", {"razor.enabled": False})):
        llm = Llama(model_path=path, n_ctx=1280, n_batch=512, n_ubatch=64, logits_all=True, flash_attn=True,
                    verbose=False, kv_overrides=ov)
        try:
            tok = lambda s: llm.tokenize(s.encode(), add_bos=True)
            toks = tok(passkey.make_prompt(tok, 1024, 0.3, "48213").text)
            llm.eval(toks)
            cpp[name] = np.array(llm.scores[len(toks) - last:len(toks)], dtype=np.float64)
        finally:
            llm.close()

    def oracle(il, q, k, v):  # reference layout [heads, T, d] <-> oracle layout [T, heads, d]
        o = razor_attention(q.transpose(0, 1).numpy(), k.transpose(0, 1).numpy(), v.transpose(0, 1).numpy(),
                            head_map[il], n_sink, window)
        return torch.from_numpy(o).transpose(0, 1)

    ref = ReferenceModel(path)
    ref_full = ref.forward(toks, want_logits="all").double().numpy()[-last:]
    ref_razor = ref.forward(toks, want_logits="all", attention=oracle).double().numpy()[-last:]
    noise = kl_and_top1(ref_full, cpp["full"])[0].mean()
    got, top1 = (float(x.mean()) for x in kl_and_top1(ref_razor, cpp["razor"]))
    effect = kl_and_top1(cpp["full"], cpp["razor"])[0].mean()
    print(f"\nKL reference/llama.cpp: full {noise:.5f}, razor {got:.5f}; razor vs full {effect:.5f}; "
          f"razor top-1 agreement {top1:.3f} over {last} positions of {len(toks)}")
    assert got < max(2 * noise, 0.002)
    assert effect > 10 * got
    assert top1 >= 0.95


N_PROMPT, N_TRIALS, WINDOW = 2000, 8, 256


def _passkey_accuracy(path: str, overrides: dict) -> tuple[list[bool], float]:
    llm = Llama(model_path=path, n_ctx=2304, n_batch=512, n_ubatch=64, flash_attn=True, n_threads=2,
                verbose=False, kv_overrides=overrides)
    try:
        trials = passkey.make_trials(lambda s: llm.tokenize(s.encode(), add_bos=True), N_PROMPT, N_TRIALS, seed=0)
        ok = []
        for tr in trials:
            out = llm.create_completion(tr.text, max_tokens=6, temperature=0.0, top_k=1)["choices"][0]["text"]
            ok.append(passkey.is_correct(out, tr.key))
        kb = _native.kv_bytes(llm._ctx.ctx)
        return ok, kb.total / kb.full_equiv
    finally:
        llm.close()


@pytest.fixture(scope="module")
def passkey_runs(smollm2_razor):
    """Passkey at ~2k tokens, window 256: the full cache, razor (14/90 retrieval heads) with and
    without the compensation row, and all heads local (StreamingLLM) sized to razor's KV bytes."""
    path = str(smollm2_razor[0])
    runs = {
        "full": _passkey_accuracy(path, {"razor.enabled": False}),
        "razor": _passkey_accuracy(path, {"razor.window": WINDOW, "razor.compensation": True}),
        "razor_no_comp": _passkey_accuracy(path, {"razor.window": WINDOW, "razor.compensation": False}),
        # ring of pad256(4 + W + 2*64) cells for every head ~ razor's bytes at n_ctx 2304, n_ubatch 64
        "streaming": _passkey_accuracy(path, {"razor.window": 636, "razor.retrieval_ratio": 0.0,
                                              "razor.compensation": False}),
    }
    print("\npasskey, SmolLM2, %d tokens, %d trials:" % (N_PROMPT, N_TRIALS))
    for name, (ok, frac) in runs.items():
        print(f"  {name:14s} {sum(ok)}/{len(ok)}  KV {frac:.3f} of full  {['x' if o else '.' for o in ok]}")
    return runs


def test_passkey_full_cache_baseline(passkey_runs):
    ok, frac = passkey_runs["full"]
    assert frac == 1.0 and sum(ok) >= N_TRIALS - 2


def test_passkey_razor_at_least_streaming_at_equal_memory(passkey_runs):
    (razor, f_razor), (stream, f_stream) = passkey_runs["razor_no_comp"], passkey_runs["streaming"]
    assert f_stream <= f_razor + 0.01
    assert sum(razor) >= sum(stream)


@pytest.mark.xfail(strict=True, reason="measured gap: with SPEC's log(l)-weighted compensation row and a 256-token "
                   "window, SmolLM2-135M loses passkeys at 2k tokens that the full cache keeps: 1/8 vs 7/8 at 14/90 "
                   "retrieval heads, still 6/8 at 70%; the reference pass under the SPEC oracle agrees (2/8), so it "
                   "is the method at this scale, not the kernels (4/8 without the row, 8/8 without it at 35%)")
def test_passkey_razor_keeps_full_cache_answers(passkey_runs):
    full, razor = passkey_runs["full"][0], passkey_runs["razor"][0]
    assert all(r for f, r in zip(full, razor) if f)
