"""razor_gguf.head_order: renumbering a layer's KV heads in its weights leaves the attention's output unchanged,
and what cannot be renumbered is refused with the tensor named."""

from types import SimpleNamespace

import gguf
import numpy as np
import pytest

from razor_gguf.head_order import ReorderError, apply_order, reordered_tensors, retrieval_first

N_HEAD, N_HEAD_KV, D, N_EMBD = 6, 3, 4, 8
T = gguf.GGMLQuantizationType


def _tensor(name, data, ttype=T.F32, ne=None):
    data = np.asarray(data)
    return SimpleNamespace(name=name, data=data, tensor_type=ttype, shape=ne or list(reversed(data.shape)))


def _attention(x, w, n_pos=5):
    """One layer's causal GQA attention in numpy, from weights in GGUF's row layout ([out, in])."""
    q = (x @ w["attn_q.weight"].T + w["attn_q.bias"]).reshape(n_pos, N_HEAD, D)
    k = (x @ w["attn_k.weight"].T).reshape(n_pos, N_HEAD_KV, D)
    v = (x @ w["attn_v.weight"].T).reshape(n_pos, N_HEAD_KV, D)
    q = q * w["attn_q_norm.weight"]  # a per-head-size weight shared by every head
    g = N_HEAD // N_HEAD_KV
    out = np.zeros((n_pos, N_HEAD, D))
    for h in range(N_HEAD):
        s = q[:, h] @ k[:, h // g].T + np.triu(np.full((n_pos, n_pos), -np.inf), 1)
        p = np.exp(s - s.max(1, keepdims=True))
        out[:, h] = (p / p.sum(1, keepdims=True)) @ v[:, h // g]
    return out.reshape(n_pos, -1) @ w["attn_output.weight"].T


def test_renumbered_heads_compute_the_same_attention():
    rng = np.random.default_rng(0)
    w = {"attn_q.weight": rng.standard_normal((N_HEAD * D, N_EMBD)), "attn_q.bias": rng.standard_normal(N_HEAD * D),
         "attn_k.weight": rng.standard_normal((N_HEAD_KV * D, N_EMBD)),
         "attn_v.weight": rng.standard_normal((N_HEAD_KV * D, N_EMBD)),
         "attn_output.weight": rng.standard_normal((N_EMBD, N_HEAD * D)), "attn_q_norm.weight": rng.standard_normal(D),
         "attn_norm.weight": rng.standard_normal(N_EMBD)}
    hm = np.array([[0, 1, 0], [0, 0, 0]])
    order = retrieval_first(hm)
    assert order.tolist() == [[1, 0, 2], [0, 1, 2]] and apply_order(hm, order).tolist() == [[1, 0, 0], [0, 0, 0]]
    reader = SimpleNamespace(tensors=[_tensor(f"blk.{il}.{k}", v) for il in (0, 1) for k, v in w.items()])
    new = reordered_tensors(reader, order, N_HEAD, N_HEAD_KV)
    # layer 1 keeps its order; norms shared by all heads and the residual-stream tensors never change
    assert sorted(new) == sorted(f"blk.0.{k}" for k in w if k not in ("attn_q_norm.weight", "attn_norm.weight"))
    w2 = {k: new.get(f"blk.0.{k}", v) for k, v in w.items()}
    assert not np.array_equal(w2["attn_k.weight"], w["attn_k.weight"])
    x = rng.standard_normal((5, N_EMBD))
    np.testing.assert_allclose(_attention(x, w2), _attention(x, w), rtol=1e-12, atol=1e-12)


def test_quantized_attn_output_renumbered_by_whole_blocks():
    # Q8_0: 32 values in 34 bytes; a KV head's query heads span 64 columns, two whole blocks a row
    rows = np.arange(4 * 3 * 68, dtype=np.uint8).reshape(4, 3 * 68)
    reader = SimpleNamespace(tensors=[_tensor("blk.0.attn_output.weight", rows, T.Q8_0, ne=[192, 4])])
    out = reordered_tensors(reader, np.array([[2, 0, 1]]), 6, 3)["blk.0.attn_output.weight"]
    assert np.array_equal(out[:, :68], rows[:, 136:]) and np.array_equal(out[:, 68:136], rows[:, :68])


@pytest.mark.parametrize("name, ttype, ne, needle", [
    ("blk.0.attn_output.weight", T.Q4_K, [576, 576], "Q4_K packs 256 values per block and one KV head's query heads span 192"),
    ("blk.0.attn_qkv.weight", T.F32, [8, 36], "blk.0.attn_qkv.weight: an attention tensor"),
    ("blk.0.attn_q_norm.weight", T.F32, [5], "neither per head nor over all heads"),
])
def test_refused_with_the_tensor_named(name, ttype, ne, needle):
    n_bytes = int(np.prod(ne)) // gguf.GGML_QUANT_SIZES[ttype][0] * gguf.GGML_QUANT_SIZES[ttype][1]
    data = np.zeros(n_bytes, np.uint8).reshape(ne[-1], -1) if ttype != T.F32 else np.zeros(list(reversed(ne)), np.float32)
    reader = SimpleNamespace(tensors=[_tensor("blk.0.attn_k.weight", np.zeros((3 * 4, 8), np.float32)),
                                      _tensor(name, data, ttype, ne=ne)])
    with pytest.raises(ReorderError, match=needle.replace("(", r"\(")):
        reordered_tensors(reader, np.array([[1, 0, 2]]), 9, 3)
