"""KV heads stored retrieval heads first (`embed-heads --reorder-heads`).

Where a layer's retrieval heads are contiguous at one end of its KV heads, the razor cache splits the layer's
q/k/v and joins the attention outputs with views and one concat; elsewhere it gathers the heads into that
order and back every token (four get_rows more per split layer). Renumbering the heads in the weights is exact:
a KV head's rows of attn_k/attn_v, its query heads' rows of attn_q (and the biases) and their columns of
attn_output move together, so every head computes what it did. Only attn_output's dot products add their
terms in another order, a rounding-level change of the model's outputs.
"""

from __future__ import annotations

import re

import numpy as np

ORDER_KEY = "razor.head_order"

# rows grouped by KV head (a KV head's rows, or its query heads' rows)
_ROWS = ("attn_q.weight", "attn_q.bias", "attn_k.weight", "attn_k.bias", "attn_v.weight", "attn_v.bias")
_COLUMNS = ("attn_output.weight",)
# norms of one head's size, shared by every head (Gemma 3, Qwen3), or over all heads at once (renumbered)
_NORMS = ("attn_q_norm.weight", "attn_k_norm.weight")
# the attention's tensors on the residual stream, not on heads (other blk.N.* tensors are not attention's)
_UNCHANGED = ("attn_norm.weight", "attn_norm.bias", "attn_output.bias", "attn_post_norm.weight")


class ReorderError(ValueError):
    """A model whose heads cannot be renumbered in its weights (the message names the tensor)."""


def retrieval_first(head_map) -> np.ndarray:
    """Per layer, the stored order of the KV heads: retrieval heads first, each kind in its source order
    (stored head i of layer l is the source's head order[l, i])."""
    hm = np.asarray(head_map)
    return np.stack([np.concatenate([np.flatnonzero(r != 0), np.flatnonzero(r == 0)]) for r in hm]).astype(np.int32)


def source_order(reader) -> np.ndarray | None:
    """razor.head_order of a GGUF stored reordered before ([n_layer, n_head_kv]), else None."""
    f = reader.get_field(ORDER_KEY)
    n = reader.get_field("razor.n_head_kv")
    if f is None or n is None:
        return None
    return np.asarray(f.contents(), np.int32).reshape(-1, int(n.contents()))


def apply_order(per_head, order) -> np.ndarray:
    """A [n_layer, n_head_kv] array (head map, scores) in the stored order."""
    a = np.asarray(per_head)
    return np.take_along_axis(a, np.asarray(order), axis=1)


def reordered_tensors(reader, order, n_head: int, n_head_kv: int) -> dict[str, np.ndarray]:
    """{tensor name: its data with each layer's KV heads (and their query heads) in `order`}, for the tensors that
    change. Raises ReorderError for an attention tensor it cannot permute (fused QKV, attention sinks, an
    attn_output whose quant blocks straddle two KV heads' columns)."""
    import gguf

    order = np.asarray(order)
    ident = np.arange(n_head_kv)
    out: dict[str, np.ndarray] = {}
    d_k = {}  # per layer: the key head size, from attn_k's rows
    for t in reader.tensors:
        m = re.match(r"blk\.(\d+)\.attn_k\.weight$", t.name)
        if m:
            d_k[int(m.group(1))] = int(t.shape[1]) // n_head_kv
    for t in reader.tensors:
        m = re.match(r"blk\.(\d+)\.(.+)$", t.name)
        if not m:
            continue
        il, what = int(m.group(1)), m.group(2)
        if il >= len(order) or np.array_equal(order[il], ident) or not what.startswith("attn_") or what in _UNCHANGED:
            continue
        p = order[il]
        data = np.asarray(t.data)
        if what in _NORMS:
            width, dk = data.size, d_k.get(il)
            if width == dk:  # one norm over each head's vector, shared by all heads
                continue
            if not dk or width % (n_head_kv * dk):
                raise ReorderError(f"{t.name}: a norm of {width} values that is neither per head nor over all heads")
            out[t.name] = data.reshape(n_head_kv, -1)[p].reshape(data.shape)  # over all heads: renumber with them
            continue
        if what in _ROWS:
            if data.shape[0] % n_head_kv:
                raise ReorderError(f"{t.name}: {data.shape[0]} rows do not split into {n_head_kv} KV heads")
            out[t.name] = data.reshape(n_head_kv, data.shape[0] // n_head_kv, *data.shape[1:])[p].reshape(data.shape)
            continue
        if what in _COLUMNS:
            block, _ = gguf.GGML_QUANT_SIZES[t.tensor_type]
            span = int(t.shape[0]) // n_head_kv  # the columns of one KV head's query heads
            if int(t.shape[0]) % n_head_kv or span % block:
                raise ReorderError(f"{t.name}: {t.tensor_type.name} packs {block} values per block and one KV head's "
                                   f"query heads span {span} columns, so its heads cannot be renumbered")
            rows = data.shape[0]
            out[t.name] = data.reshape(rows, n_head_kv, -1)[:, p].reshape(data.shape)
            continue
        raise ReorderError(f"{t.name}: an attention tensor this tool cannot renumber by head")
    return out


PER_HEAD_KEYS = ("razor.head_map", "razor.echo_scores", "razor.induction_scores")


def write_reordered(reader, out_path: str) -> np.ndarray:
    """Copy a GGUF that has a head map to out_path with its KV heads stored retrieval heads first: the
    attention weights, the per-head razor.* arrays and razor.head_order renumbered. Returns the order applied
    (for a file embed-heads has already scored; embed-heads --reorder-heads does the same while it writes)."""
    from gguf import GGUFValueType as V

    from .metadata import razor_kv_of, write_with_razor

    kv = razor_kv_of(reader)
    n_head_kv = int(kv["razor.n_head_kv"][1])
    arch = reader.get_field("general.architecture").contents()
    n_head = int(reader.get_field(f"{arch}.attention.head_count").contents())
    hm = np.asarray(kv["razor.head_map"][1], np.int32).reshape(-1, n_head_kv)
    order = retrieval_first(hm)
    tensors = reordered_tensors(reader, order, n_head, n_head_kv)
    for k in PER_HEAD_KEYS:
        vt, val, sub = kv[k]
        kv[k] = (vt, apply_order(np.asarray(val).reshape(hm.shape), order).ravel().tolist(), sub)
    prior = source_order(reader)
    kv[ORDER_KEY] = (V.ARRAY, apply_order(np.indices(hm.shape)[1] if prior is None else prior, order).ravel().tolist(),
                     V.INT32)
    write_with_razor(reader, out_path, kv, tensors=tensors)
    return order
