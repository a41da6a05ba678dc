"""Numpy forward pass of the tiny models, matching llama.cpp's math (src/models/llama.cpp, gemma3.cpp).

Attention goes through the razor oracle, so the same function gives stock logits (all heads
retrieval, the default) and the logits the razor cache must produce (a head map, S, W, slack).
A gemma3-style model's sliding-window layers are the oracle's local heads with no sinks, a window of
n_swa and no compensation row: exactly llama.cpp's LLAMA_SWA_TYPE_STANDARD mask.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import numpy.typing as npt

from ..oracle import razor_attention
from .tiny_model import TinyConfig

Array = npt.NDArray[np.floating]


def rms_norm(x: Array, w: Array, eps: float) -> Array:
    # ggml_rms_norm: x / sqrt(mean(x^2) + eps), then the weight multiplies elementwise.
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rope_norm(x: Array, pos: npt.NDArray[np.int64], base: float) -> Array:
    """LLAMA_ROPE_TYPE_NORM (what LLM_ARCH_LLAMA uses): rotate adjacent pairs (x[2i], x[2i+1])
    by pos * base^(-2i/d). x: [T, n_head, d], n_rot = d, no scaling (freq_scale 1, ext_factor 0)."""
    d = x.shape[-1]
    inv = base ** (-np.arange(0, d, 2, dtype=np.float64) / d)  # [d/2]
    ang = pos.astype(np.float64)[:, None] * inv[None, :]  # [T, d/2]
    cos, sin = np.cos(ang)[:, None, :].astype(x.dtype), np.sin(ang)[:, None, :].astype(x.dtype)
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = x0 * cos - x1 * sin
    out[..., 1::2] = x0 * sin + x1 * cos
    return out


def rope_neox(x: Array, pos: npt.NDArray[np.int64], base: float) -> Array:
    """LLAMA_ROPE_TYPE_NEOX (gemma3): rotate the pairs (x[i], x[i + d/2]) by pos * base^(-2i/d)."""
    d = x.shape[-1]
    inv = base ** (-np.arange(0, d, 2, dtype=np.float64) / d)
    ang = pos.astype(np.float64)[:, None] * inv[None, :]
    cos, sin = np.cos(ang)[:, None, :].astype(x.dtype), np.sin(ang)[:, None, :].astype(x.dtype)
    x0, x1 = x[..., : d // 2], x[..., d // 2 :]
    return np.concatenate([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)


def gelu_ggml(x: Array) -> Array:
    """ggml's CPU GELU (GGML_GELU_FP16): the tanh form looked up in an f16 table by the f16-rounded input."""
    x16 = x.astype(np.float16).astype(np.float32)
    y = 0.5 * x16 * (1.0 + np.tanh(np.float32(0.7978845608028654) * x16 * (1.0 + np.float32(0.044715) * x16 * x16)))
    y = y.astype(np.float16).astype(np.float32)
    return np.where(x <= -10.0, 0.0, np.where(x >= 10.0, x, y)).astype(x.dtype)


def _qkv(h: Array, w: dict, p: str, cfg: TinyConfig) -> tuple[Array, Array, Array]:
    """Q [T, n_head, d], K and V [T, n_head_kv, d] of the normed input h of layer prefix p."""
    t = h.shape[0]
    return ((h @ w[p + "attn_q.weight"].T).reshape(t, cfg.n_head, cfg.head_dim),
            (h @ w[p + "attn_k.weight"].T).reshape(t, cfg.n_head_kv, cfg.head_dim),
            (h @ w[p + "attn_v.weight"].T).reshape(t, cfg.n_head_kv, cfg.head_dim))


def forward(
    weights: dict[str, npt.NDArray[np.float32]],
    cfg: TinyConfig,
    tokens: npt.ArrayLike,
    head_map: npt.ArrayLike | None = None,
    n_sink: int = 4,
    window: int | Sequence[int] = 64,
    slack: int | npt.ArrayLike = 0,
    positions: npt.ArrayLike | None = None,
    reference: bool = False,
    compensation: bool = True,
    pins: Sequence[int] = (),
    probe: Callable[[int, Array, Array], None] | None = None,
) -> Array:
    """Logits [T, n_vocab] for `tokens` (one sequence, positions 0..T-1 by default).

    head_map: [n_layer, n_head_kv] (1 = retrieval); None means all retrieval (stock attention),
    in which case n_sink/window/slack do not matter. window: one for every layer, or one per layer (the
    razor cache's per-layer windows, razor.layer_window_scale). reference=True runs in float64. compensation=False:
    local heads see sinks + window only (razor.compensation = false). pins: positions every local head also keeps.
    probe(layer, q, k): called with each layer's RoPE'd Q [T, n_head, d] and K [T, n_head_kv, d].
    Compare llama.cpp with an f32 KV cache and flash attention off for a tight match: f16 KV
    (the default) and flash attention (which casts K/V to f16 even from an f32 cache) add f16
    rounding that 4 random layers amplify to ~1e-2; rounding K/V/Q here does not reproduce it.
    """
    dt = np.float64 if reference else np.float32
    tok = np.asarray(tokens, dtype=np.int64)
    t = len(tok)
    pos = np.arange(t, dtype=np.int64) if positions is None else np.asarray(positions, np.int64)
    hm = np.ones((cfg.n_layer, cfg.n_head_kv), np.int64) if head_map is None else np.asarray(head_map).reshape(cfg.n_layer, cfg.n_head_kv)
    eps = float(np.float32(cfg.rms_eps))  # the GGUF stores eps as f32
    window = [int(window)] * cfg.n_layer if np.isscalar(window) else [int(x) for x in window]
    if len(window) != cfg.n_layer:
        raise ValueError(f"window: {len(window)} entries for {cfg.n_layer} layers")
    w = {n: a.astype(dt) for n, a in weights.items()}

    if cfg.arch == "gemma3":
        if len(pins):
            raise ValueError("pins: not modelled for gemma3 here")
        return _forward_gemma3(w, cfg, tok, pos, hm, n_sink, window, slack, reference, compensation, eps, dt)

    x = w["token_embd.weight"][tok]  # [T, n_embd]
    for i in range(cfg.n_layer):
        p = f"blk.{i}."
        q, k, v = _qkv(rms_norm(x, w[p + "attn_norm.weight"], eps), w, p, cfg)
        q, k = rope_norm(q, pos, cfg.rope_base), rope_norm(k, pos, cfg.rope_base)
        if probe:
            probe(i, q, k)
        att = razor_attention(q, k, v, hm[i], n_sink, window[i], positions=pos, slack=slack, reference=reference,
                              compensation=compensation, pins=pins)
        x = x + att.reshape(t, -1).astype(dt) @ w[p + "attn_output.weight"].T
        h = rms_norm(x, w[p + "ffn_norm.weight"], eps)
        g = h @ w[p + "ffn_gate.weight"].T
        u = h @ w[p + "ffn_up.weight"].T
        x = x + (g / (1 + np.exp(-g)) * u) @ w[p + "ffn_down.weight"].T  # SwiGLU (LLM_FFN_SILU, PAR)
    h = rms_norm(x, w["output_norm.weight"], eps)
    return h @ w["output.weight"].T


def _forward_gemma3(w, cfg: TinyConfig, tok, pos, hm, n_sink, window, slack, reference, compensation, eps, dt) -> Array:
    t = len(tok)
    x = w["token_embd.weight"][tok] * dt(np.sqrt(np.float32(cfg.n_embd)))
    swa = cfg.swa_layers
    for i in range(cfg.n_layer):
        p = f"blk.{i}."
        q, k, v = _qkv(rms_norm(x, w[p + "attn_norm.weight"], eps), w, p, cfg)
        q, k = rms_norm(q, w[p + "attn_q_norm.weight"], eps), rms_norm(k, w[p + "attn_k_norm.weight"], eps)
        base = cfg.rope_base_swa if swa[i] else cfg.rope_base
        q = rope_neox(q, pos, base) * dt(1.0 / np.sqrt(np.float32(cfg.head_dim)))
        k = rope_neox(k, pos, base)
        if swa[i]:  # every head sees the last n_swa positions: a local head without sinks or row
            att = razor_attention(q, k, v, np.zeros(cfg.n_head_kv), 0, cfg.n_swa, positions=pos, scale=1.0,
                                  reference=reference, compensation=False)
        else:
            att = razor_attention(q, k, v, hm[i], n_sink, window[i], positions=pos, slack=slack, scale=1.0,
                                  reference=reference, compensation=compensation)
        a = att.reshape(t, -1).astype(dt) @ w[p + "attn_output.weight"].T
        x = x + rms_norm(a, w[p + "post_attention_norm.weight"], eps)
        h = rms_norm(x, w[p + "ffn_norm.weight"], eps)
        f = (gelu_ggml(h @ w[p + "ffn_gate.weight"].T) * (h @ w[p + "ffn_up.weight"].T)) @ w[p + "ffn_down.weight"].T
        x = x + rms_norm(f, w[p + "post_ffw_norm.weight"], eps)
    h = rms_norm(x, w["output_norm.weight"], eps)
    return h @ w["output.weight"].T
