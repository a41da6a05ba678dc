"""The attention policies of tools/passkey_diagnosis.py on random tensors: which keys each row of a local head
sees under the snap (query-aware) selection, and that nothing evicted means the full model's attention."""

import math
import pathlib
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

TOOLS = pathlib.Path(__file__).parents[1] / "tools"
sys.path.insert(0, str(TOOLS))
import passkey_diagnosis as diag  # noqa: E402

N_KV, GROUP, T, D = 2, 3, 96, 8
HEAD_MAP = np.array([[0, 1]])  # KV head 0 local, 1 retrieval


def tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(N_KV * GROUP, T, D, generator=g)
    k = torch.randn(N_KV, T, D, generator=g)
    return q, k


def full_attention(q, k, v):
    sc = torch.matmul(q.reshape(N_KV, GROUP, T, D), k[:, None].transpose(-1, -2)) / math.sqrt(D)
    sc = sc.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    return torch.matmul(torch.softmax(sc, -1), v[:, None]).reshape(N_KV * GROUP, T, -1)


def seen(attention, q, k):
    """[n_head, T, T]: which keys each row attends to (v one-hot per position, so the output is the weights)."""
    return attention(0, q, k, torch.eye(T).expand(N_KV, T, T)) > 0


@pytest.mark.parametrize("read", ["full", "razor"])
def test_snap_rows_see_sinks_selection_and_recent_window(read):
    q, k = tensors()
    n_prompt, window, n_keep = 80, 40, 8
    recent = window - n_keep
    stats = {}
    att = diag.snap_attention(HEAD_MAP, window, n_keep, n_prompt, read, key_pos=[10, 11], obs=16, stats=stats)
    s = seen(att, q, k)
    # retrieval KV head (query heads 3-5): every earlier key, always
    assert torch.equal(s[3:], torch.ones(T, T, dtype=torch.bool).tril().expand(3, T, T))
    local = s[:3]
    assert torch.equal(local[0], local[1]) and torch.equal(local[0], local[2])  # one kept set per KV head
    last = local[0, T - 1]
    kept = set(torch.nonzero(last).flatten().tolist()) - set(range(diag.SINKS)) - set(range(T - recent, T))
    assert len(kept) == n_keep and all(diag.SINKS <= j < n_prompt - recent for j in kept)
    # the selection is the top of the pooled attention of the last 16 prompt queries
    sc = torch.matmul(q[:3, n_prompt - 16:n_prompt], k[0, :n_prompt].T) / math.sqrt(D)
    sc = sc.masked_fill(torch.arange(n_prompt)[None] > torch.arange(n_prompt - 16, n_prompt)[:, None], float("-inf"))
    score = torch.nn.functional.max_pool1d(torch.softmax(sc, -1).sum((0, 1))[None, None], 7, 1, 3)[0, 0]
    assert kept == set((torch.topk(score[diag.SINKS:n_prompt - recent], n_keep).indices + diag.SINKS).tolist())
    for i in range(n_prompt, T):  # answer rows: sinks, kept, the last `recent` positions
        want = set(range(diag.SINKS)) | kept | set(range(max(0, i - recent + 1), i + 1))
        assert set(torch.nonzero(local[0, i]).flatten().tolist()) == want
    i = n_prompt - 20  # a prompt row
    if read == "full":
        assert local[0, i].sum() == i + 1
    else:
        want = set(range(diag.SINKS)) | {j for j in kept if j < i} | set(range(i - recent + 1, i + 1))
        assert set(torch.nonzero(local[0, i]).flatten().tolist()) == want
    assert stats["hit"] == [(int(bool({10, 11} & kept)), 1)]


def test_snap_with_nothing_to_evict_is_the_full_model():
    q, k = tensors(1)
    v = torch.randn(N_KV, T, 5)
    att = diag.snap_attention(HEAD_MAP, T + 8, 4, 64, "razor")  # the recent window covers every position
    torch.testing.assert_close(att(0, q, k, v), full_attention(q, k, v))
    att = diag.keep_attention(HEAD_MAP, T, range(0))
    torch.testing.assert_close(att(0, q, k, v), full_attention(q, k, v))


def test_snap_keep_bounds():
    with pytest.raises(ValueError):
        diag.snap_attention(HEAD_MAP, 16, 16, 64)


def test_snap_2pass_scores_with_the_first_reads_queries():
    """With a first read that saw every key, its normalizers are the softmax's own, so the selection (and the
    output) is snap_razor's; the first read itself answers as razor's policy."""
    q, k = tensors(2)
    v = torch.randn(N_KV, T, 5)
    store = {}
    first = diag.first_read_attention(HEAD_MAP, T + 8, 80, store, obs=16)
    torch.testing.assert_close(first(0, q, k, v), diag.keep_attention(HEAD_MAP, T + 8, range(0))(0, q, k, v))
    assert store[0][0].shape == (N_KV, GROUP, 16, D) and store[0][1].shape == (N_KV, GROUP, 16, 1)
    two = diag.snap_attention(HEAD_MAP, 40, 8, 80, "razor", obs=16, first_read=store)(0, q, k, v)
    torch.testing.assert_close(two, diag.snap_attention(HEAD_MAP, 40, 8, 80, "razor", obs=16)(0, q, k, v))
    # a first read with other queries picks other tokens
    store2 = {}
    diag.first_read_attention(HEAD_MAP, T + 8, 80, store2, obs=16)(0, torch.randn(q.shape), k, v)
    other = diag.snap_attention(HEAD_MAP, 40, 8, 80, "razor", obs=16, first_read=store2)(0, q, k, v)
    assert not torch.allclose(other[:GROUP, 80:], two[:GROUP, 80:])


def test_shared_2pass_selection_is_the_retrieval_heads_attention():
    """shared_2pass: the first read adds up the softmax attention the retrieval heads' last queries give every
    prompt key (the retrieval heads see all of them); the chosen positions are the pooled top outside the sinks
    and the recent window, and every local head of the second read sees them (and nothing else beyond sinks and
    window)."""
    q, k = tensors(3)
    n_prompt, recent, n_keep = 80, 24, 6
    store = {}
    att = diag.retrieval_read_attention(HEAD_MAP, recent, n_prompt, store, obs=16)
    att(0, q, k, torch.eye(T).expand(N_KV, T, T))
    sc = torch.matmul(q[3:, n_prompt - 16:n_prompt], k[1, :n_prompt].T) / math.sqrt(D)
    sc = sc.masked_fill(torch.arange(n_prompt)[None] > torch.arange(n_prompt - 16, n_prompt)[:, None], float("-inf"))
    assert torch.allclose(store["score"], torch.softmax(sc, -1).sum((0, 1)), atol=1e-5)
    assert abs(float(store["score"].sum()) - 16 * GROUP) < 1e-3
    keep = diag.shared_selection(store["score"], n_keep, n_prompt, recent)
    pooled = torch.nn.functional.max_pool1d(store["score"][None, None], 7, 1, 3)[0, 0]
    assert keep == sorted((torch.topk(pooled[diag.SINKS:n_prompt - recent], n_keep).indices + diag.SINKS).tolist())
    s = seen(diag.keep_attention(HEAD_MAP, recent, keep), q, k)
    for i in (n_prompt - 1, T - 1):
        want = set(range(diag.SINKS)) | set(keep) | set(range(max(0, i - recent + 1), i + 1))
        assert set(torch.nonzero(s[0, i]).flatten().tolist()) == want
