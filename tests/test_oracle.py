"""Known-answer tests for the numpy oracle of the razor cache policy (razor_gguf.oracle)."""

import math

import numpy as np
import pytest

from razor_gguf.oracle import full_attention, razor_attention, ubatch_slack


def _rand(t: int, n_head: int, n_head_kv: int, d: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return (
        rng.standard_normal((t, n_head, d)),
        rng.standard_normal((t, n_head_kv, d)),
        rng.standard_normal((t, n_head_kv, d)),
    )


def _naive(q, k, v, head_map, s, w, slack=0):
    """Per-query loop straight from SPEC section 1, float64, independent of the vectorized oracle."""
    t, n_head, d = q.shape
    group = n_head // k.shape[1]
    out = np.zeros(q.shape)
    for p in range(t):
        for h in range(n_head):
            hk = h // group
            if head_map[hk]:
                keep, ev = list(range(p + 1)), []
            else:
                lo = p - w - slack + 1
                keep = [j for j in range(p + 1) if j < s or j >= lo]
                ev = [j for j in range(s, max(s, lo))]
            logits = [q[p, h] @ k[j, hk] / math.sqrt(d) for j in keep]
            vals = [v[j, hk] for j in keep]
            if ev:
                kbar, vbar = k[ev, hk].mean(0), v[ev, hk].mean(0)
                logits.append(q[p, h] @ kbar / math.sqrt(d) + math.log(len(ev)))
                vals.append(vbar)
            e = np.exp(np.array(logits) - max(logits))
            out[p, h] = (e[:, None] * np.array(vals)).sum(0) / e.sum()
    return out


def _plain(q, k, v):
    """Causal softmax attention, GQA by repeating KV heads, float64."""
    t, n_head, d = q.shape
    kk = np.repeat(k, n_head // k.shape[1], axis=1)
    vv = np.repeat(v, n_head // k.shape[1], axis=1)
    s = np.einsum("thd,jhd->htj", q, kk) / math.sqrt(d)
    s = np.where(np.tril(np.ones((t, t), bool))[None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("htj,jhd->thd", p, vv)


def test_no_eviction_equals_plain():
    q, k, v = _rand(40, 4, 2, 16)
    ref = _plain(q, k, v)
    out = razor_attention(q, k, v, [0, 0], n_sink=4, window=40, reference=True)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-12)
    out32 = razor_attention(q, k, v, [0, 0], n_sink=4, window=64)
    assert out32.dtype == np.float32
    np.testing.assert_allclose(out32, ref, rtol=0, atol=1e-5)


def test_all_retrieval_equals_plain():
    q, k, v = _rand(50, 4, 2, 8, seed=1)
    out = razor_attention(q, k, v, [1, 1], n_sink=1, window=2, reference=True)
    np.testing.assert_allclose(out, _plain(q, k, v), rtol=0, atol=1e-12)
    np.testing.assert_allclose(full_attention(q, k, v, reference=True), _plain(q, k, v), atol=1e-12)


def test_hand_computed_compensation():
    # T=6, S=1, W=2, d=2, one head. Query p=5 sees 0 (sink), 4, 5 and the compensation row for
    # positions 1..3: k̄ = [2, 0], v̄ = [1, 1], l = 3. With q = [√2, 0] the logit of key j is k_j[0].
    t, d = 6, 2
    q = np.zeros((t, 1, d))
    q[:, 0] = [math.sqrt(2), 0]
    k = np.zeros((t, 1, d))
    k[1:4, 0, 0] = [1, 2, 3]
    v = np.zeros((t, 1, d))
    v[0, 0], v[1, 0], v[2, 0], v[4, 0] = [1, 0], [3, 0], [0, 3], [0, 1]
    out = razor_attention(q, k, v, [0], n_sink=1, window=2, reference=True)
    # Kept logits 0, 0, 0 (values [1,0], [0,1], [0,0]); compensation logit 2 + log 3, value [1, 1].
    e2 = math.exp(2)
    expect5 = np.array([1 + 3 * e2, 1 + 3 * e2]) / (3 + 3 * e2)
    np.testing.assert_allclose(out[5, 0], expect5, rtol=1e-14)
    # p=2: window (0, 2] plus sink 0: nothing evicted yet (l=0 masked), plain attention.
    np.testing.assert_allclose(out[2, 0], _plain(q, k, v)[2, 0], rtol=1e-14)
    # p=3: evicted {1}: k̄ = k1, l = 1, so it is plain attention again (log 1 = 0).
    np.testing.assert_allclose(out[3, 0], _plain(q, k, v)[3, 0], rtol=1e-14)
    # p=4: evicted {1, 2}: logits 0 (sink), 3 (k3), 0 (k4), 1.5 + log 2 (k̄ = [1.5, 0], l = 2).
    s = np.array([0.0, 3.0, 0.0, 1.5 + math.log(2)])
    vals = np.array([v[0, 0], v[3, 0], v[4, 0], (v[1, 0] + v[2, 0]) / 2])
    e = np.exp(s)
    np.testing.assert_allclose(out[4, 0], (e[:, None] * vals).sum(0) / e.sum(), rtol=1e-14)


def test_log_l_identity_equal_evicted_keys():
    # If every evicted key and value is identical, the compensation row with logit + log(l) is
    # exactly those l keys attended individually: the output equals full attention.
    t, s, w = 24, 2, 5
    q, k, v = _rand(t, 2, 1, 8, seed=3)
    k[s : t - w] = k[s]
    v[s : t - w] = v[s]
    out = razor_attention(q, k, v, [0], n_sink=s, window=w, reference=True)
    np.testing.assert_allclose(out, _plain(q, k, v), rtol=0, atol=1e-12)
    # ...and it does not when the evicted keys differ (the oracle really evicts something).
    q2, k2, v2 = _rand(t, 2, 1, 8, seed=3)
    assert np.abs(razor_attention(q2, k2, v2, [0], s, w, reference=True) - _plain(q2, k2, v2)).max() > 1e-3


@pytest.mark.parametrize("reference,atol", [(True, 1e-12), (False, 2e-5)])
def test_matches_naive_loop_gqa_mixed(reference, atol):
    q, k, v = _rand(300, 6, 3, 16, seed=4)  # 300 > row chunk: exercises chunking
    hm = [1, 0, 0]
    out = razor_attention(q, k, v, hm, n_sink=3, window=7, reference=reference)
    np.testing.assert_allclose(out, _naive(q, k, v, hm, 3, 7), rtol=0, atol=atol)


def test_gqa_mapping():
    # Query head h reads KV head h // (n_head / n_head_kv): heads 0,1 -> kv 0; heads 2,3 -> kv 1.
    q, k, v = _rand(30, 4, 2, 8, seed=5)
    out = razor_attention(q, k, v, [1, 0], n_sink=2, window=4, reference=True)
    for h in range(4):
        hk = h // 2
        single = razor_attention(q[:, h : h + 1], k[:, hk : hk + 1], v[:, hk : hk + 1], [[1, 0][hk]], 2, 4, reference=True)
        np.testing.assert_allclose(out[:, h], single[:, 0], rtol=0, atol=1e-14)
    # Retrieval heads are untouched by the local policy.
    np.testing.assert_allclose(out[:, :2], _plain(q, k, v)[:, :2], atol=1e-12)


def test_slack():
    q, k, v = _rand(40, 2, 2, 8, seed=6)
    # A constant slack s is the same as a window of W + s.
    a = razor_attention(q, k, v, [0, 0], 2, 5, slack=3, reference=True)
    b = razor_attention(q, k, v, [0, 0], 2, 8, reference=True)
    np.testing.assert_allclose(a, b, atol=0)
    # Per-query slack from ubatches of 16: matches the naive loop query by query.
    sl = ubatch_slack(40, 16)
    assert list(sl[14:18]) == [14, 15, 0, 1] and len(sl) == 40
    assert list(ubatch_slack(6, [3, 1, 1, 1])) == [0, 1, 2, 0, 0, 0]
    with pytest.raises(ValueError):
        ubatch_slack(6, [3, 1])
    c = razor_attention(q, k, v, [0, 1], 2, 5, slack=sl, reference=True)
    for i in (0, 10, 15, 16, 31, 39):
        np.testing.assert_allclose(c[i], _naive(q, k, v, [0, 1], 2, 5, slack=int(sl[i]))[i], atol=1e-12)
    # Huge slack: nothing evicted.
    np.testing.assert_allclose(razor_attention(q, k, v, [0, 0], 2, 5, slack=100, reference=True), _plain(q, k, v), atol=1e-12)


def test_positions_offset_and_validation():
    q, k, v = _rand(20, 2, 1, 4, seed=7)
    # Positions are absolute: starting at 100, sinks (< S) do not exist and all early tokens evict.
    a = razor_attention(q, k, v, [0], 4, 5, positions=np.arange(100, 120), reference=True)
    b = razor_attention(q, k, v, [0], 0, 5, reference=True)
    np.testing.assert_allclose(a, b, atol=1e-14)
    with pytest.raises(ValueError):
        razor_attention(q, k, v, [0, 1], 4, 5)
    with pytest.raises(ValueError):
        razor_attention(q, k, v, [0], 4, 0)


@pytest.mark.parametrize("compensation", [True, False])
@pytest.mark.parametrize("window", [1, 16, 100, 400])
def test_torch_policy_matches_oracle(compensation, window):
    """razor_gguf.calibration's PyTorch policy (what embed-heads measures the compensation default with)
    computes what the oracle does, row on and off."""
    torch = pytest.importorskip("torch")
    from razor_gguf.calibration import razor_attention_torch

    rng = np.random.default_rng(7)
    t, d = 300, 32
    q, k, v = (rng.standard_normal((t, h, d)).astype(np.float32) for h in (6, 3, 3))
    hm = np.array([1, 0, 0])
    ref = razor_attention(q, k, v, hm, 4, window, reference=True, compensation=compensation)
    to = lambda a: torch.from_numpy(a).transpose(0, 1).contiguous()  # noqa: E731  oracle [T, H, d] -> [H, T, d]
    got = razor_attention_torch(to(q), to(k), to(v), hm, 4, window, compensation=compensation, chunk=128)
    assert np.abs(got.transpose(0, 1).numpy() - ref).max() < 1e-5
    if window < t - 4:  # the row matters wherever tokens are evicted
        other = razor_attention(q, k, v, hm, 4, window, reference=True, compensation=not compensation)
        assert np.abs(other - ref).max() > 1e-2


def test_torch_policy_with_pins_matches_oracle():
    """The PyTorch policy with pins (the reference pass's second read of a pinned prompt) is the oracle's."""
    torch = pytest.importorskip("torch")
    from razor_gguf.calibration import razor_attention_torch

    rng = np.random.default_rng(8)
    t, d = 300, 32
    q, k, v = (rng.standard_normal((t, h, d)).astype(np.float32) for h in (6, 3, 3))
    hm, pins = np.array([0, 1, 0]), [10, 11, 12, 150, 299]
    ref = razor_attention(q, k, v, hm, 4, 40, reference=True, compensation=False, pins=pins)
    to = lambda a: torch.from_numpy(a).transpose(0, 1).contiguous()  # noqa: E731
    got = razor_attention_torch(to(q), to(k), to(v), hm, 4, 40, compensation=False, chunk=128, pins=pins)
    assert np.abs(got.transpose(0, 1).numpy() - ref).max() < 1e-5
    assert np.abs(ref - razor_attention(q, k, v, hm, 4, 40, reference=True, compensation=False)).max() > 1e-2
    with pytest.raises(ValueError, match="pins need compensation=False"):
        razor_attention_torch(to(q), to(k), to(v), hm, 4, 40, pins=pins)
