"""The head scorer on constructed attention matrices whose answer is known (SPEC section 1)."""

import numpy as np
import pytest

pytest.importorskip("torch")

from razor_gguf.scoring import (  # noqa: E402
    ScoreAccumulator,
    fit_probe_len,
    gqa_max,
    probe_tokens,
    scores_from_attention,
    select_heads,
)

B, R = 5, 4
T = 1 + R * B


def _copies(i):
    """Earlier copies of the token at position i (leading token at 0 excluded)."""
    return [i - k * B for k in range(1, R) if i - k * B >= 1]


def _attention(kind: str) -> np.ndarray:
    A = np.zeros((T, T))
    for i in range(T):
        c = _copies(i)
        if i < 1 + B or not c:
            # Repetition 1 and the leading token are excluded from the means: make them look like a
            # perfect echo+induction head so including them by mistake would show.
            A[i, :] = 0
            A[i, 0] = 1.0
            continue
        if kind == "echo":
            A[i, c] = 1.0 / len(c)
        elif kind == "induction":
            A[i, [j + 1 for j in c]] = 1.0 / len(c)
        elif kind == "diag":
            A[i, i] = 1.0
        elif kind == "sink":
            A[i, 0] = 1.0
        elif kind == "half_echo_recent":  # half on the most recent copy, half on itself
            A[i, c[0]] += 0.5
            A[i, i] += 0.5
        elif kind == "uniform":
            A[i, : i + 1] = 1.0 / (i + 1)
    assert np.allclose(A.sum(1), 1.0) and np.all(np.triu(A, 1) == 0)
    return A


def _uniform_expected():
    rows = range(1 + B, T)
    echo = np.mean([len(_copies(i)) / (i + 1) for i in rows])
    ind = np.mean([len(_copies(i)) / (i + 1) for i in rows])
    return echo, ind


@pytest.mark.parametrize("chunk", [1, 3, 7, 64])
def test_known_answers(chunk):
    kinds = ["echo", "induction", "diag", "sink", "half_echo_recent", "uniform"]
    A = np.stack([_attention(k) for k in kinds])
    echo, ind = scores_from_attention(A, B, R, chunk=chunk)
    ue, ui = _uniform_expected()
    np.testing.assert_allclose(echo, [1, 0, 0, 0, 0.5, ue], atol=1e-12)
    np.testing.assert_allclose(ind, [0, 1, 0, 0, 0, ui], atol=1e-12)


def test_induction_at_block_boundary():
    # Row i whose earlier copy j is the last token of a block: j+1 is the first token of the next block.
    A = np.zeros((1, T, T))
    i = 1 + 2 * B + (B - 1)  # last token of repetition 3
    j = i - B  # last token of repetition 2
    A[0, :, 0] = 1.0
    A[0, i, :] = 0
    A[0, i, j + 1] = 1.0
    echo, ind = scores_from_attention(A, B, R)
    assert echo[0] == 0
    assert ind[0] == pytest.approx(1.0 / ((R - 1) * B))


@pytest.mark.parametrize("key_start", [0, 3, 6, 9, 14])
def test_key_start_offset_equals_full_rows(key_start):
    # Sliding-window layers hand over rows that start at key_start; keys before it have probability 0.
    rng = np.random.default_rng(0)
    A = rng.random((2, T, T))
    A[:, :, :key_start] = 0
    A = np.tril(A)
    A[:, :key_start + 1, :] = 0
    for i in range(min(key_start + 1, T)):
        A[:, i, i] = 1.0
    A /= A.sum(-1, keepdims=True)
    full = scores_from_attention(A, B, R)
    acc = ScoreAccumulator(1, 2, B, R)
    for s in range(0, T, 4):
        e = min(T, s + 4)
        k0 = min(key_start, s)  # the window never starts after the chunk's first row
        acc.add(0, s, A[:, s:e, k0:e], k0)
    echo, ind = acc.scores()
    np.testing.assert_allclose(echo[0], full[0], atol=1e-12)
    np.testing.assert_allclose(ind[0], full[1], atol=1e-12)
    assert full[0].sum() > 0 and full[1].sum() > 0


def test_accumulator_multi_layer_and_torch_input():
    import torch

    acc = ScoreAccumulator(2, 1, B, R)
    acc.add(1, 0, torch.from_numpy(_attention("echo")[None]).float())
    echo, ind = acc.scores()
    assert echo[0, 0] == 0 and echo[1, 0] == pytest.approx(1.0, abs=1e-6)
    assert ind.sum() == 0


def test_gqa_max_groups_consecutive_query_heads():
    s = np.array([[0.1, 0.9, 0.2, 0.3, 0.0, 0.4], [5, 4, 3, 2, 1, 0]], dtype=float)
    np.testing.assert_array_equal(gqa_max(s, 2), [[0.9, 0.4], [5, 2]])
    np.testing.assert_array_equal(gqa_max(s, 6), s)
    np.testing.assert_array_equal(gqa_max(s, 1), [[0.9], [5]])


def test_selection_counts_and_union():
    rng = np.random.default_rng(1)
    ind = rng.random((25, 4))  # 100 KV heads
    echo = rng.random((25, 4))
    m = select_heads(echo, ind, 0.14, 0.01)
    top_ind = np.argsort(-ind.ravel())[:14]
    top_echo = np.argsort(-echo.ravel())[:1]
    expect = np.zeros(100, dtype=np.int32)
    expect[top_ind] = 1
    expect[top_echo] = 1
    np.testing.assert_array_equal(m.ravel(), expect)
    assert m.dtype == np.int32
    assert m.sum() == 14 + (0 if top_echo[0] in top_ind else 1)
    # ceil: 1% of 90 heads is still one head; ratio 0 selects none
    assert select_heads(echo[:, :3], ind[:, :3], 0.0, 0.01).sum() == 1  # 75 heads
    assert select_heads(echo, ind, 0.0, 0.0).sum() == 0
    assert select_heads(echo, ind, 1.0, 0.0).sum() == 100


def test_selection_excludes_local_layers():
    ind = np.zeros((6, 2))
    ind[0] = 1.0  # the highest scores sit in a sliding-window layer
    ind[5] = 0.5
    echo = np.zeros((6, 2))
    local = [True, True, True, True, True, False]
    m = select_heads(echo, ind, 0.2, 0.0, local)
    assert m[:5].sum() == 0 and m[5].sum() == 2


def test_probe_tokens_structure():
    toks = probe_tokens(1, 50, 4, seed=3)
    assert len(toks) == 1 + 4 * 50 and toks[0] == 1
    blocks = toks[1:].reshape(4, 50)
    assert (blocks == blocks[0]).all()
    assert toks[1:].min() >= 10000 and toks[1:].max() < 12500
    np.testing.assert_array_equal(toks, probe_tokens(1, 50, 4, seed=3))
    assert not np.array_equal(toks, probe_tokens(1, 50, 4, seed=4))
    small = probe_tokens(0, 20, 4, seed=0, n_vocab=3000)
    assert small[1:].max() < 3000 and small[1:].min() >= 0


def test_fit_probe_len_to_context():
    assert fit_probe_len(32768, 2500) == 2500
    assert fit_probe_len(8192, 2500) == 2047  # 1 + 4*2047 = 8189 <= 8192
    assert fit_probe_len(8192, 1000) == 1000
    with pytest.raises(ValueError):
        fit_probe_len(8, 2500)
