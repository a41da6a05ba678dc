"""The razor KV cache inside llama.cpp against the numpy oracle of SPEC section 1 (tiny synthetic
GGUFs with random weights), and its sequence operations, state and memory accounting.

Tolerances (see razor_gguf.testing.compare): F32_TOL for an f32 KV cache with flash attention off,
where both sides compute in f32; F16_TOL where flash attention or an f16 cache rounds K/V to f16.
Quantized caches are held to the error the stock cache of the same type makes against the stock
oracle, because q8_0/q4_0 rounding through 4 random layers dwarfs any razor-specific error.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from razor_gguf.testing import tiny_forward as tf
from razor_gguf.testing import tiny_model as tm
from razor_gguf.testing.compare import F16_TOL, F32_TOL, RawContext, llama_logits, multi_seq_logits

GGML_TYPE_Q4_0, GGML_TYPE_Q8_0 = 2, 8
SINK, WINDOW = 4, 16
MIXED = np.array([[1, 0], [0, 0], [0, 1], [1, 0]], np.int32)  # layer 1 all local, the others split
ALL_LOCAL = np.zeros((4, 2), np.int32)


def _model(tmp_path_factory, name, head_map, head_dim=32, window=WINDOW, **cfg_kw):
    cfg = tm.TinyConfig(head_dim=head_dim, **cfg_kw)
    path = tm.write_tiny_model(tmp_path_factory.mktemp("razor") / f"{name}.gguf", cfg,
                               tm.RazorMeta(head_map=head_map, n_sink=SINK, window=window))
    return path, cfg, tm.read_weights(path)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    return _model(tmp_path_factory, "mixed", MIXED)


@pytest.fixture(scope="module")
def mixed64(tmp_path_factory):
    # head size 64: quantized caches switch on llama.cpp's Hadamard rotation of K/V
    return _model(tmp_path_factory, "mixed64", MIXED, head_dim=64)


# four KV heads: retrieval heads in the middle and scattered (gathered by get_rows), first and last (views)
SCATTERED = np.array([[0, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 0], [0, 0, 1, 1]], np.int32)


@pytest.fixture(scope="module")
def scattered(tmp_path_factory):
    return _model(tmp_path_factory, "scattered", SCATTERED, n_head=8, n_head_kv=4)


@pytest.fixture(scope="module")
def local_only(tmp_path_factory):
    return _model(tmp_path_factory, "local", ALL_LOCAL)


def _tokens(cfg, n, seed=1):
    return np.random.default_rng(seed).integers(3, cfg.n_vocab, size=n)


def _oracle(model, toks, head_map=MIXED, window=WINDOW, compensation=True):
    _, cfg, w = model
    return tf.forward(w, cfg, toks, head_map=head_map, n_sink=SINK, window=window, compensation=compensation)


NO_COMP = {"razor.compensation": False}


def test_oracle_differs_from_stock(mixed):
    # guards every comparison below: eviction changes the outputs by far more than the tolerances
    toks = _tokens(mixed[1], 100)
    assert np.abs(_oracle(mixed, toks) - tf.forward(mixed[2], mixed[1], toks)).max() > 1.0


@pytest.mark.parametrize("flash_attn", [False, True])
@pytest.mark.parametrize("n_ubatch", [1, 7, 16])
@pytest.mark.parametrize("compensation", [True, False])
def test_matches_oracle_f32(mixed, flash_attn, n_ubatch, compensation):
    """100 tokens, window 16: eviction in every ubatch, per-query compensation rows inside a ubatch (or,
    without the row, sinks + window only: no sums, no scratch rows, no fold in the graph)."""
    toks = _tokens(mixed[1], 100)
    got = llama_logits(mixed[0], toks, flash_attn=flash_attn, n_batch=16, n_ubatch=n_ubatch,
                       kv_overrides=None if compensation else NO_COMP)
    err = np.abs(got - _oracle(mixed, toks, compensation=compensation)).max()
    assert err < (F16_TOL if flash_attn else F32_TOL), err
    assert np.abs(got - _oracle(mixed, toks, compensation=not compensation)).max() > 10 * err


@pytest.mark.parametrize("flash_attn", [False, True])
def test_matches_oracle_f16(mixed64, flash_attn):
    toks = _tokens(mixed64[1], 120, seed=2)
    got = llama_logits(mixed64[0], toks, flash_attn=flash_attn, f32_kv=False)
    assert np.abs(got - _oracle(mixed64, toks)).max() < F16_TOL


@pytest.mark.parametrize("flash_attn", [False, True])
@pytest.mark.parametrize("compensation", [True, False])
def test_large_ubatches_split_by_the_ring_match_oracle(mixed, flash_attn, compensation):
    """The context's ubatch (256) is larger than the ring's (86 tokens at window 16 with the compensation
    row: max(32, W/4) grown into the padding; 172 without its scratch rows): the razor cache splits it
    itself and stays exact."""
    toks = _tokens(mixed[1], 300)
    got = llama_logits(mixed[0], toks, flash_attn=flash_attn, n_ctx=512, n_batch=256, n_ubatch=256,
                       kv_overrides=None if compensation else NO_COMP)
    err = np.abs(got - _oracle(mixed, toks, compensation=compensation)).max()
    assert err < (F16_TOL if flash_attn else F32_TOL), err


def test_budget_window_matches_oracle(mixed):
    """A KV budget sets the window per context (here 0.8 of the 512-token full cache, whose retrieval heads
    alone take half); the cache then matches the oracle at that window."""
    from razor_gguf import Llama

    llm = Llama(model_path=str(mixed[0]), n_ctx=512, n_batch=256, n_ubatch=256, logits_all=True, kv_budget=0.8,
                type_k=0, type_v=0, n_threads=2, verbose=False)
    try:
        st = llm.razor_stats()
        assert st["razor"] and st["kv_bytes"] <= 0.8 * st["full_equiv_bytes"] and 16 < st["window"] < 250
        toks = _tokens(mixed[1], 300)
        llm.eval([int(t) for t in toks])
        got = np.array(llm.scores[: len(toks)], dtype=np.float64)
    finally:
        llm.close()
    err = np.abs(got - _oracle(mixed, toks, window=st["window"])).max()
    assert err < F32_TOL, err


@pytest.mark.parametrize("qtype", [GGML_TYPE_Q8_0, GGML_TYPE_Q4_0])
def test_matches_oracle_quantized(mixed64, qtype):
    toks = _tokens(mixed64[1], 120, seed=3)
    kw = dict(flash_attn=True, f32_kv=False, type_k=qtype, type_v=qtype)
    err_razor = np.abs(llama_logits(mixed64[0], toks, **kw) - _oracle(mixed64, toks)).max()
    stock = llama_logits(mixed64[0], toks, kv_overrides={"razor.enabled": False}, **kw)
    err_stock = np.abs(stock - tf.forward(mixed64[2], mixed64[1], toks)).max()
    print(f"\nqtype {qtype}: razor vs oracle {err_razor:.3g}, stock vs stock oracle {err_stock:.3g}")
    assert err_razor < 1.5 * err_stock + F16_TOL


@pytest.mark.parametrize("compensation", [True, False])
def test_layer_with_only_retrieval_heads(tmp_path_factory, compensation):
    """A layer whose KV heads are all retrieval heads runs the stock path over the retrieval cache (as a
    higher retrieval_ratio makes happen): the whole model still matches the oracle."""
    hm = np.array([[1, 1], [0, 0], [0, 1], [1, 0]], np.int32)
    model = _model(tmp_path_factory, "all_retrieval_layer", hm)
    toks = _tokens(model[1], 100)
    got = llama_logits(model[0], toks, kv_overrides=None if compensation else NO_COMP)
    assert np.abs(got - _oracle(model, toks, head_map=hm, compensation=compensation)).max() < F32_TOL


@pytest.mark.parametrize("flash_attn", [False, True])
@pytest.mark.parametrize("compensation", [True, False])
def test_head_groups_in_any_order_match_oracle(scattered, flash_attn, compensation):
    """Four KV heads a layer: retrieval heads gathered from the middle or from scattered places, or split off by
    views where they are the first or the last heads; every layer kind matches the oracle."""
    toks = _tokens(scattered[1], 100)
    got = llama_logits(scattered[0], toks, flash_attn=flash_attn, n_batch=16, n_ubatch=7,
                       kv_overrides=None if compensation else NO_COMP)
    err = np.abs(got - _oracle(scattered, toks, head_map=SCATTERED, compensation=compensation)).max()
    assert err < (F16_TOL if flash_attn else F32_TOL), err


def test_heads_stored_retrieval_first(scattered, tmp_path, capfd):
    """`embed-heads --reorder-heads`' renumbering (razor_gguf.head_order) of the scattered model: the same model
    (stock logits agree to float rounding), exact against the oracle on its own weights under razor, and its
    two gathered layers then split by views: 7 fewer graph nodes each (3 get_rows and 3 reshapes into the head
    groups, 1 get_rows out of them)."""
    import gguf

    from razor_gguf.head_order import apply_order, write_reordered

    src, cfg, _ = scattered
    dst = tmp_path / "reordered.gguf"
    order = write_reordered(gguf.GGUFReader(str(src)), str(dst))
    hm = tm.read_head_map(dst)
    assert hm.tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0]]
    assert np.array_equal(apply_order(SCATTERED, order), hm)
    r = gguf.GGUFReader(str(dst))
    assert np.array_equal(np.asarray(r.fields["razor.head_order"].contents()).reshape(order.shape), order)
    ind = lambda rd: np.asarray(rd.fields["razor.induction_scores"].contents()).reshape(order.shape)  # noqa: E731
    assert np.array_equal(ind(r), apply_order(ind(gguf.GGUFReader(str(src))), order))

    toks = _tokens(cfg, 100)
    stock = [llama_logits(p, toks, kv_overrides={"razor.enabled": False}) for p in (src, dst)]
    assert np.abs(stock[0] - stock[1]).max() < F32_TOL
    got = llama_logits(dst, toks)
    assert np.abs(got - tf.forward(tm.read_weights(dst), cfg, toks, head_map=hm, n_sink=SINK, window=WINDOW)).max() < F32_TOL
    assert np.abs(got - llama_logits(src, toks)).max() < F32_TOL
    assert _graph_nodes(src, capfd) - _graph_nodes(dst, capfd) == 2 * 7


def test_all_heads_local(local_only):
    """No retrieval head at all (StreamingLLM plus compensation): only the local ring exists."""
    toks = _tokens(local_only[1], 90)
    got = llama_logits(local_only[0], toks)
    assert np.abs(got - _oracle(local_only, toks, head_map=ALL_LOCAL)).max() < F32_TOL


@pytest.mark.parametrize("compensation", [True, False])
def test_prefill_equals_decode(mixed, compensation):
    toks = _tokens(mixed[1], 80, seed=4)
    kw = dict(kv_overrides=None if compensation else NO_COMP)
    one_shot = llama_logits(mixed[0], toks, n_batch=32, n_ubatch=32, **kw)
    decode = llama_logits(mixed[0], toks, n_batch=1, n_ubatch=1, **kw)
    assert np.abs(one_shot - decode).max() < F32_TOL


@pytest.mark.parametrize("unified", [False, True])
@pytest.mark.parametrize("compensation", [True, False])
def test_multiple_sequences(mixed, unified, compensation):
    """Two sequences of different lengths decoded together; each matches its own oracle."""
    seqs = [list(_tokens(mixed[1], 100, seed=5)), list(_tokens(mixed[1], 60, seed=6))]
    outs = multi_seq_logits(mixed[0], seqs, unified=unified, kv_overrides=None if compensation else NO_COMP)
    for out, s in zip(outs, seqs):
        assert np.abs(out - _oracle(mixed, s, compensation=compensation)).max() < F32_TOL


def test_window_covering_context_is_stock(mixed):
    """A window as long as the context evicts nothing: the split path reproduces the stock cache."""
    toks = _tokens(mixed[1], 100, seed=7)
    wide = llama_logits(mixed[0], toks, n_ctx=512, kv_overrides={"razor.window": 200})  # razor on, evicts nothing
    stock = llama_logits(mixed[0], toks, n_ctx=512, kv_overrides={"razor.enabled": False})
    assert np.abs(wide - stock).max() < F32_TOL
    from razor_gguf import _native

    llm = _llama(mixed[0], kv_overrides={"razor.window": 200})
    try:
        assert _native.kv_bytes(llm._ctx.ctx).razor  # the split path really ran
    finally:
        llm.close()
    assert np.abs(stock - tf.forward(mixed[2], mixed[1], toks)).max() < F32_TOL


def copy_continue_keep(model, unified, **kw):
    """Decode 80 tokens in sequence 0, seq_cp it to 1, decode 20 different tokens in each (one batch per
    position), seq_keep 1 and decode 10 more. Returns the logits of both continuations, of the kept one,
    and the tokens. kw goes to RawContext (e.g. n_gpu_layers)."""
    _, cfg, _ = model
    prefix = list(_tokens(cfg, 80, seed=20))
    tails = [list(_tokens(cfg, 20, seed=21)), list(_tokens(cfg, 20, seed=22))]
    more = list(_tokens(cfg, 10, seed=23))
    n = len(prefix)
    with RawContext(model[0], n_ctx=512, n_batch=128, n_ubatch=16, n_seq_max=2, unified=unified, **kw) as rc:
        rc.decode([(t, i, 0) for i, t in enumerate(prefix)])
        rc.seq_cp(0, 1)
        got = [[], []]
        for i in range(20):
            out = rc.decode([(tails[0][i], n + i, 0), (tails[1][i], n + i, 1)])
            got[0].append(out[0])
            got[1].append(out[1])
        rc.seq_keep(1)
        kept = [rc.decode([(t, n + 20 + i, 1)])[0] for i, t in enumerate(more)]
    return got, kept, (prefix, tails, more)


def _llama(path, **kw):
    from razor_gguf import Llama

    return Llama(model_path=str(path), n_ctx=kw.pop("n_ctx", 512), n_batch=16, n_ubatch=16, logits_all=True,
                 type_k=0, type_v=0, n_threads=2, verbose=False, **kw)


def trim_and_continue(model, **kw) -> float:
    """Eval 100 tokens and a wrong continuation of 12, trim it (the trim must succeed), continue with the right
    20: the max difference from a fresh run of the 120. kw goes to _llama and llama_logits (kv_overrides)."""
    toks = _tokens(model[1], 120, seed=8)
    fresh = llama_logits(model[0], toks, n_ctx=512, **kw)
    llm = _llama(model[0], **kw)
    try:
        llm.eval(list(toks[:100]) + list(_tokens(model[1], 12, seed=9)))  # a wrong continuation
        assert llm._ctx.kv_cache_seq_rm(-1, 100, -1)
        llm.n_tokens = 100
        llm.eval(list(toks[100:]))
        return np.abs(np.array(llm.scores[:120]) - fresh).max()
    finally:
        llm.close()


@pytest.mark.parametrize("compensation", [True, False])
def test_trim_recent_tokens_then_continue(mixed, compensation):
    """Trimming the tail within the ring's margin: continuing equals a fresh run."""
    assert trim_and_continue(mixed, kv_overrides=None if compensation else NO_COMP) < F32_TOL


def test_remove_folded_positions_refused(mixed):
    toks = list(_tokens(mixed[1], 400, seed=10))
    llm = _llama(mixed[0])
    try:
        llm.eval(toks)
        mem_rm = llm._ctx.kv_cache_seq_rm
        assert not mem_rm(0, 20, 30), "a hole in the folded history must be refused"
        # the stored sums already hold positions up to ~180: a query at 50 cannot be restored
        assert not mem_rm(0, 50, -1)
        assert mem_rm(0, 395, -1)  # recent: fine
        assert mem_rm(0, 2, -1)  # everything folded goes: the sequence starts over
    finally:
        llm.close()


def test_reset_and_reevaluate_equals_fresh(mixed):
    toks = _tokens(mixed[1], 100, seed=11)
    fresh = llama_logits(mixed[0], toks, n_ctx=512)
    llm = _llama(mixed[0])
    try:
        llm.eval(list(_tokens(mixed[1], 150, seed=12)))
        llm.reset()
        llm.eval(list(toks))
        assert np.abs(np.array(llm.scores[:100]) - fresh).max() < F32_TOL
    finally:
        llm.close()


def save_continue_restore(model, **kw):
    """Eval 100 tokens, save the state, eval 40 more, move on, restore and eval the same 40 again: the max
    difference between the two runs of those 40. kw goes to _llama (e.g. n_gpu_layers)."""
    toks = list(_tokens(model[1], 140, seed=13))
    llm = _llama(model[0], **kw)
    try:
        llm.eval(toks[:100])
        state = llm.save_state()
        llm.eval(toks[100:])
        first = np.array(llm.scores[100:140])
        llm.eval(list(_tokens(model[1], 30, seed=14)))  # move on, then restore
        llm.load_state(state)
        llm.eval(toks[100:])
        return np.abs(np.array(llm.scores[100:140]) - first).max()
    finally:
        llm.close()


@pytest.mark.parametrize("compensation", [True, False])
def test_state_save_load_round_trip(mixed, compensation):
    # a whole-cache restore packs the ring's cells from cell 0 (stock llama.cpp does the same), so the
    # attention sums run in another order: equal up to f32 rounding, the compensation state bitwise
    assert save_continue_restore(mixed, kv_overrides=None if compensation else NO_COMP) < F32_TOL


def test_kv_bytes(mixed):
    from razor_gguf import _native

    llm = _llama(mixed[0], n_ctx=4096)
    stock = _llama(mixed[0], n_ctx=4096, kv_overrides={"razor.enabled": False})
    try:
        kv, kv_stock = _native.kv_bytes(llm._ctx.ctx), _native.kv_bytes(stock._ctx.ctx)
        assert kv.razor and not kv_stock.razor
        assert kv.full_equiv == kv_stock.total == kv_stock.full_equiv
        row = 2 * 32 * 4  # K + V of one f32 head of size 32
        assert kv.retrieval == 3 * 4096 * row  # 3 retrieval KV heads keep every cell
        assert kv.local == 5 * 256 * row  # 5 local heads: pad256(4 + 16 + 16 + 16 scratch) cells
        assert kv.compensation >= 4 * 2 * 32 * 4  # 4 layers x (K+V sums of their local heads)
        assert kv.total < 0.42 * kv.full_equiv  # 3 of 8 KV heads are retrieval heads: 37.5% + the ring
        assert _native.window(llm._ctx.ctx) == (SINK, WINDOW) and _native.window(stock._ctx.ctx) is None
        assert _native.head_map(llm._ctx.ctx) == MIXED.ravel().tolist()
    finally:
        llm.close()
        stock.close()
    # without the compensation row: no sums, and no scratch rows in the ring (the ubatch grows into them)
    llm = _llama(mixed[0], n_ctx=4096, kv_overrides=NO_COMP)
    try:
        kv2 = _native.kv_bytes(llm._ctx.ctx)
        assert kv2.razor and kv2.compensation == 0 and kv2.retrieval == kv.retrieval and kv2.local == kv.local
        assert _native.n_ubatch(llm._ctx.ctx) == 16  # pad256(4 + 16 + 16): the context's ubatch, no split
    finally:
        llm.close()


def test_overrides(mixed):
    from gguf import GGUFReader

    from razor_gguf import _native
    from razor_gguf.scoring import select_heads

    llm = _llama(mixed[0], kv_overrides={"razor.window": 32, "razor.n_sink": 2, "razor.retrieval_ratio": 0.5})
    try:
        assert _native.window(llm._ctx.ctx) == (2, 32)
        r = GGUFReader(str(mixed[0]))
        echo, ind = (np.asarray(r.fields[k].contents(), np.float32).reshape(MIXED.shape)
                     for k in ("razor.echo_scores", "razor.induction_scores"))
        echo_ratio = float(r.fields["razor.selection.echo_ratio"].contents())
        want = select_heads(echo, ind, induction_ratio=0.5 - echo_ratio, echo_ratio=echo_ratio)
        assert _native.head_map(llm._ctx.ctx) == want.ravel().tolist()
        assert sum(_native.head_map(llm._ctx.ctx)) == 4
    finally:
        llm.close()


def test_bad_head_map_falls_back_to_stock(mixed, tmp_path, capfd):
    from gguf import GGUFReader, GGUFValueType

    from razor_gguf import Llama, _native
    from razor_gguf.metadata import write_with_razor

    path = tmp_path / "bad.gguf"
    write_with_razor(GGUFReader(str(mixed[0])), str(path), {
        "razor.head_map": (GGUFValueType.ARRAY, [0] * 6, GGUFValueType.INT32),
        "razor.enabled": (GGUFValueType.BOOL, True, None),
    })

    llm = Llama(model_path=str(path), n_ctx=64, verbose=True)
    try:
        assert not _native.kv_bytes(llm._ctx.ctx).razor
    finally:
        llm.close()
    err = capfd.readouterr().err
    assert "razor.head_map has 6 entries but the model has 4 layers x 2 KV heads: razor disabled" in err


def test_prefix_reuse_across_turns_same_tokens(mixed, capsys):
    """llama-cpp-python's multi-turn prefix reuse on the razor cache (f32 weights and cache, window 16):
    turn two trims the cached first turn to the common prefix and answers exactly as a fresh run."""
    kw = dict(kv_overrides={"razor.window": WINDOW})
    turn1 = "the quick brown fox jumps over the lazy dog while the cat sleeps " * 3
    llm = _llama(mixed[0], **kw)
    llm.verbose = True  # the binding reports its prefix reuse on stderr
    try:
        out1 = llm.create_completion(turn1, max_tokens=24, temperature=0.0, top_k=1)["choices"][0]["text"]
        turn2 = turn1 + out1[: len(out1) // 2] + " and then"
        capsys.readouterr()
        reused = llm.create_completion(turn2, max_tokens=24, temperature=0.0, top_k=1)["choices"][0]["text"]
        hit = re.search(r"(\d+) prefix-match hit", capsys.readouterr().err)
        assert hit and int(hit.group(1)) > 100, "the trimmed cache was reused"
        n_reused = llm.n_tokens
    finally:
        llm.close()
    fresh_llm = _llama(mixed[0], **kw)
    try:
        fresh = fresh_llm.create_completion(turn2, max_tokens=24, temperature=0.0, top_k=1)["choices"][0]["text"]
    finally:
        fresh_llm.close()
    assert n_reused > 150 and reused == fresh


@pytest.mark.parametrize("unified", [False, True])
@pytest.mark.parametrize("compensation", [True, False])
def test_seq_cp_and_keep(mixed, unified, compensation):
    """Copy a sequence whose early tokens are folded, continue both copies differently, keep one:
    every continuation equals a fresh run of its own tokens."""
    ov = None if compensation else NO_COMP
    got, kept, (prefix, tails, more) = copy_continue_keep(mixed, unified, kv_overrides=ov)
    n = len(prefix)
    for j in (0, 1):
        ref = _oracle(mixed, prefix + tails[j], compensation=compensation)[n:]
        assert np.abs(np.array(got[j]) - ref).max() < F32_TOL
    ref = _oracle(mixed, prefix + tails[1] + more, compensation=compensation)[n + 20:]
    assert np.abs(np.array(kept) - ref).max() < F32_TOL


def _graph_nodes(path, capfd, **kw) -> int:
    """Nodes of the token-generation graph llama.cpp reserves for a context (its `graph: nodes =` line)."""
    from razor_gguf import Llama

    capfd.readouterr()
    llm = Llama(model_path=str(path), n_ctx=512, n_batch=64, n_ubatch=64, flash_attn=True, verbose=True, **kw)
    llm.close()
    m = re.search(r"graph(?: \(pp bs=\d+, tg bs=\d+\))?: nodes = (\d+)(?: / (\d+))?", capfd.readouterr().err)
    assert m, "llama.cpp no longer logs its graph size"
    return int(m.group(2) or m.group(1))


def test_graph_node_overhead(mixed, capfd):
    """The razor attention's extra graph nodes (views included) over the stock graph, per layer kind, so that a
    regression shows. MIXED has three split layers, each with its retrieval head first or last, so the head
    groups are views (test_heads_stored_retrieval_first: 7 nodes more where they are gathered), and one all-local
    layer (no split, no merge). Measured: +43 per split layer with the compensation row (views 7, fold 23, second
    attention and a concat), +20 without it (no fold, no sums), and +6 per layer with local heads for the pin
    copies."""
    stock = _graph_nodes(mixed[0], capfd, kv_overrides={"razor.enabled": False})
    with_row = _graph_nodes(mixed[0], capfd)
    without = _graph_nodes(mixed[0], capfd, kv_overrides=NO_COMP)
    print(f"\ngraph nodes: stock {stock}, razor {with_row} (+{with_row - stock}), "
          f"razor without the compensation row {without} (+{without - stock})")
    assert with_row - stock <= 3 * 43 + 25
    assert without - stock <= 3 * 20 + 4
    # pinned tokens (razor.n_pin): a worst-case graph copies one into its pin row in each layer with local heads
    # (K and V: reshape, get_rows, set_rows); decode graphs without a pinned token have none of these
    pinned = _graph_nodes(mixed[0], capfd, kv_overrides={**NO_COMP, "razor.n_pin": 4})
    assert pinned - without <= 4 * 6


def _write_alibi_model(path):
    """A tiny MPT GGUF (ALiBi attention, no rope) carrying razor.* keys: a model llama.cpp runs but razor cannot."""
    import gguf

    n_embd, n_head, n_layer, n_ff = 64, 4, 2, 128
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "mpt")
    w.add_context_length(512)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head)
    w.add_layer_norm_eps(1e-5)
    w.add_max_alibi_bias(8.0)
    w.add_tokenizer_model("llama")
    toks = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    w.add_token_list(toks)
    w.add_token_scores([0.0] * len(toks))
    w.add_token_types([gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL] + [gguf.TokenType.BYTE] * 256)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    tm._add_razor_keys(w, tm.TinyConfig(n_layer=n_layer, n_head=n_head, n_head_kv=n_head),
                       tm.RazorMeta(head_map=np.zeros((n_layer, n_head), np.int32), n_sink=SINK, window=WINDOW))
    mat = lambda *s: (rng.standard_normal(s) * 0.1).astype(np.float32)  # noqa: E731
    one = np.ones(n_embd, np.float32)
    w.add_tensor("token_embd.weight", mat(len(toks), n_embd))
    w.add_tensor("output_norm.weight", one)
    for i in range(n_layer):
        p = f"blk.{i}."
        for name, a in (("attn_norm", one), ("attn_qkv", mat(3 * n_embd, n_embd)), ("attn_output", mat(n_embd, n_embd)),
                        ("ffn_norm", one), ("ffn_up", mat(n_ff, n_embd)), ("ffn_down", mat(n_embd, n_ff))):
            w.add_tensor(p + name + ".weight", a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_model_razor_cannot_run_loads_stock_with_one_line(tmp_path, capfd):
    """An ALiBi model (MPT) with razor.* keys: it loads and runs with the stock cache, one log line says why,
    and embed-heads refuses it before any heavy work (exit 2, one line)."""
    import subprocess
    import sys

    from razor_gguf import Llama, _native

    path = _write_alibi_model(tmp_path / "mpt.gguf")
    capfd.readouterr()
    llm = Llama(model_path=str(path), n_ctx=256, verbose=True)
    try:
        assert not _native.kv_bytes(llm._ctx.ctx).razor
        llm.eval([1, 5, 9, 12])
    finally:
        llm.close()
    err = capfd.readouterr().err
    assert err.count("razor: ALiBi is not supported: using the stock KV cache") == 1
    r = subprocess.run([sys.executable, "-m", "razor_gguf", "embed-heads", str(path), "-o", str(tmp_path / "o.gguf")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [r.stderr.strip()]
    assert "unsupported architecture 'mpt'" in r.stderr and not (tmp_path / "o.gguf").exists()
