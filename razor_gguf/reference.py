"""A reference PyTorch forward pass over a GGUF's own weights (SPEC section 1).

The weights are dequantized with gguf-py, one layer at a time (streaming: only one layer's weights are
held as float32 at any moment), and the attention of every layer is computed in chunks of query rows,
so no full [T, T] matrix is ever materialized. A hook receives the post-softmax probabilities of each
chunk, which is all head scoring needs.

Supported architectures: llama and mistral (Q/K stored permuted for llama.cpp's NORM rope, i.e. rotation
of adjacent pairs; Llama 3.x's rope_freqs factors; Mixtral-style mixture-of-experts FFNs), qwen2 (q/k/v biases, NEOX rope), qwen3 (per-head q/k
RMSNorm, NEOX rope), phi3 (fused QKV and gate/up projections, NEOX rope, LongRoPE's short/long factors) and
gemma3 (scaled embeddings, q/k norms, post-norms, GELU, interleaved sliding-window layers). Rope scaling:
none, linear and YaRN (as ggml's rope_yarn computes it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

SUPPORTED_ARCHS = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma3")
_NEOX_ARCHS = ("qwen2", "qwen3", "phi3", "gemma3")


class ReferenceError(Exception):
    """A GGUF the reference pass cannot run (unsupported architecture, missing tensor)."""


def _field(reader, key, default=None):
    f = reader.get_field(key)
    if f is None:
        return default
    v = f.contents()
    if isinstance(v, list):  # per-layer arrays: the reference needs them uniform
        if len(set(v)) != 1:
            raise ReferenceError(f"{key} varies per layer, which the reference pass does not support")
        v = v[0]
    return v


@dataclass
class HParams:
    arch: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    rope_dim: int
    n_ctx_train: int
    n_vocab: int
    rms_eps: float
    rope_base: float
    rope_scale: float = 1.0  # positions are multiplied by this (1/linear factor)
    rope_base_swa: float = 10000.0
    n_swa: int = 0
    swa_layers: list[bool] = field(default_factory=list)
    bos_token_id: int | None = None
    # YaRN (rope.scaling.type = yarn): the ramp between interpolated and extrapolated angles over rotation
    # pairs [yarn_low, yarn_high]; None without YaRN
    yarn: tuple[float, float] | None = None
    rope_mscale: float = 1.0  # cos/sin scale: YaRN's, or rope.scaling.attn_factor (LongRoPE)
    n_ctx_orig: int = 0  # rope.scaling.original_context_length: LongRoPE's long factors apply beyond it
    logit_softcap: float = 0.0
    n_expert: int = 0  # mixture-of-experts FFN (Mixtral-style llama GGUFs): experts, and those used per token
    n_expert_used: int = 0

    @property
    def neox(self) -> bool:
        return self.arch in _NEOX_ARCHS


def read_hparams(reader) -> HParams:
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise ReferenceError(
            f"unsupported architecture {arch!r} (supported: {', '.join(SUPPORTED_ARCHS)})"
        )
    n_layer = int(_field(reader, f"{arch}.block_count"))
    n_embd = int(_field(reader, f"{arch}.embedding_length"))
    n_head = int(_field(reader, f"{arch}.attention.head_count"))
    n_head_kv = int(_field(reader, f"{arch}.attention.head_count_kv", n_head))
    head_dim = int(_field(reader, f"{arch}.attention.key_length", n_embd // n_head))
    tokens = reader.get_field("tokenizer.ggml.tokens")
    n_vocab = int(_field(reader, f"{arch}.vocab_size", 0) or (len(tokens.data) if tokens else 0))
    if not n_vocab:
        n_vocab = int(_tensor(reader, "token_embd.weight").shape[1])
    scaling = _field(reader, f"{arch}.rope.scaling.type", "none")
    factor = float(_field(reader, f"{arch}.rope.scaling.factor", 1.0) or 1.0)
    if scaling not in ("none", "linear", "yarn") and factor != 1.0:
        raise ReferenceError(f"rope scaling {scaling!r} is not supported by the reference pass")
    hp = HParams(
        arch=arch,
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim=head_dim,
        rope_dim=int(_field(reader, f"{arch}.rope.dimension_count", head_dim)),
        n_ctx_train=int(_field(reader, f"{arch}.context_length", 2048)),
        n_vocab=n_vocab,
        rms_eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        rope_base=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        rope_scale=1.0 / factor if scaling in ("linear", "yarn") else 1.0,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
    )
    hp.n_ctx_orig = int(_field(reader, f"{arch}.rope.scaling.original_context_length", hp.n_ctx_train))
    attn_factor = float(_field(reader, f"{arch}.rope.scaling.attn_factor", 1.0) or 1.0)
    hp.rope_mscale = attn_factor
    if scaling == "yarn" and factor > 1.0:
        _set_yarn(hp, factor, hp.n_ctx_orig, attn_factor)
    hp.swa_layers = [False] * n_layer
    hp.n_expert = int(_field(reader, f"{arch}.expert_count", 0) or 0)
    hp.n_expert_used = int(_field(reader, f"{arch}.expert_used_count", 0) or 0)
    if hp.n_expert and (arch not in ("llama", "mistral") or not 0 < hp.n_expert_used <= hp.n_expert):
        raise ReferenceError(f"{arch}: a mixture of {hp.n_expert} experts ({hp.n_expert_used} used) is not "
                             "supported by the reference pass (only Mixtral-style llama GGUFs)")
    if float(_field(reader, f"{arch}.expert_weights_scale", 0.0) or 0.0) not in (0.0, 1.0):
        raise ReferenceError(f"{arch}.expert_weights_scale is not supported by the reference pass")
    hp.logit_softcap = float(_field(reader, f"{arch}.final_logit_softcapping", 0.0) or 0.0)
    if arch == "gemma3":
        # llama.cpp (models/gemma3.cpp): a sliding window on all layers but every 6th (or an explicit
        # per-layer pattern), rope base 10000 there unless rope.freq_base_swa says otherwise.
        hp.n_swa = int(_field(reader, f"{arch}.attention.sliding_window", 0) or 0)
        if hp.n_swa:
            f = reader.get_field(f"{arch}.attention.sliding_window_pattern")
            pat = f.contents() if f is not None else 6
            if isinstance(pat, list):
                hp.swa_layers = [bool(x) for x in pat][:n_layer]
            else:
                n = int(pat)
                hp.swa_layers = [n == 0 or (il % n < n - 1) for il in range(n_layer)]
            hp.rope_base_swa = float(_field(reader, f"{arch}.rope.freq_base_swa", 10000.0))
    return hp


def _set_yarn(hp: HParams, factor: float, n_ctx_orig: int, attn_factor: float,
              beta_fast: float = 32.0, beta_slow: float = 1.0) -> None:
    """llama.cpp's YaRN for these architectures (llama_context's cparams, ggml_rope_yarn_corr_dims, rope_yarn):
    ext_factor 1, the correction range from beta_fast/beta_slow, and cos/sin scaled by attn_factor *
    (1 + 0.1 ln factor) (llama.cpp cancels its own get_mscale against rope_yarn's, leaving this)."""
    f32 = np.float32

    def corr_dim(n_rot):
        return f32(hp.rope_dim) * np.log(f32(n_ctx_orig) / (f32(n_rot) * 2 * f32(math.pi))) / (2 * np.log(f32(hp.rope_base)))

    hp.yarn = (float(max(0.0, np.floor(corr_dim(beta_fast)))), float(min(hp.rope_dim - 1, np.ceil(corr_dim(beta_slow)))))
    hp.rope_mscale = attn_factor * (1.0 + 0.1 * math.log(factor))


def _tensor(reader, name):
    for t in reader.tensors:
        if t.name == name:
            return t
    return None


class GGUFWeights:
    """Dequantizes tensors on demand (nothing is cached, so callers control what is resident)."""

    def __init__(self, reader):
        self.reader = reader
        self._by_name = {t.name: t for t in reader.tensors}

    def has(self, name: str) -> bool:
        return name in self._by_name

    def get(self, name: str, rows=None):
        import torch
        from gguf.quants import dequantize

        t = self._by_name.get(name)
        if t is None:
            raise ReferenceError(f"tensor {name!r} is missing")
        data = t.data if rows is None else t.data[rows]
        arr = dequantize(np.asarray(data), t.tensor_type)
        if rows is None:
            shape = tuple(int(x) for x in reversed(t.shape.tolist()))
            arr = arr.reshape(shape)
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if not arr.flags.writeable:  # F32 tensors come straight from the read-only memory map
            arr = arr.copy()
        return torch.from_numpy(arr)


def _rms_norm(x, w, eps):
    import torch

    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _moe_ffn(h, L, n_used):
    """llama.cpp's build_moe_ffn for Mixtral-style llama models: softmax over the router's logits, the top
    n_used experts, their weights renormalized to sum 1, SwiGLU experts. h [T, n_embd]."""
    import torch

    probs = torch.softmax(h @ L["router"].T, dim=-1)  # [T, n_expert]
    w, sel = probs.topk(n_used, dim=-1)
    w = w / w.sum(-1, keepdim=True)
    out = torch.zeros_like(h)
    for e in sel.unique().tolist():
        rows, slot = (sel == e).nonzero(as_tuple=True)
        x = h[rows]
        y = (torch.nn.functional.silu(x @ L["gate_exps"][e].T) * (x @ L["up_exps"][e].T)) @ L["down_exps"][e].T
        out.index_add_(0, rows, y * w[rows, slot][:, None])
    return out


def _rope(x, pos, dim, base, scale, neox, freq_factors=None, yarn=None, mscale=1.0):
    """Rotate the first `dim` features of x [..., T, head_dim] as llama.cpp does. yarn: the (low, high)
    correction range of ggml's rope_yarn (ext_factor 1), or None; mscale scales cos and sin."""
    return _rotate(x, _rope_angles(x.device, pos, dim, base, scale, freq_factors, yarn, mscale), dim, neox)


def _rope_angles(device, pos, dim, base, scale, freq_factors=None, yarn=None, mscale=1.0):
    """(cos, sin) [T, dim / 2] of _rope: the same for every layer of one kind, so a forward computes them once."""
    import torch

    inv = base ** (-torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim)
    if freq_factors is not None:
        inv = inv / freq_factors.double()
    ang = (pos.double()[:, None] * scale) * inv[None, :]
    if yarn is not None:
        low, high = yarn
        extrap = pos.double()[:, None] * inv[None, :]
        i = torch.arange(dim // 2, dtype=torch.float64, device=device)
        ramp = 1 - ((i - low) / max(0.001, high - low)).clamp(0, 1)
        ang = ang * (1 - ramp) + extrap * ramp
    return (ang.cos() * mscale).float(), (ang.sin() * mscale).float()


def _rotate(x, angles, dim, neox):
    import torch

    cos, sin = angles
    xr, xp = x[..., :dim], x[..., dim:]
    if neox:
        x1, x2 = xr[..., : dim // 2], xr[..., dim // 2 :]
        out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    else:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)
    return torch.cat([out, xp], dim=-1) if xp.shape[-1] else out


def gqa_attention(qg, k, v, keep, scale):
    """Softmax attention by torch's fused kernel with grouped KV heads: qg [n_kv, g, R, d] queries, k and v
    [n_kv, n, d] keys and values, keep a bool mask broadcastable to [n_kv, g, R, n] (True: attended; every row
    needs one). Returns [n_kv, g, R, d_v]."""
    import torch

    n_kv, g, n = qg.shape[0], qg.shape[1], k.shape[1]
    return torch.nn.functional.scaled_dot_product_attention(
        qg, k[:, None].expand(n_kv, g, n, k.shape[2]), v[:, None].expand(n_kv, g, n, v.shape[2]), attn_mask=keep,
        scale=scale)


# hook(layer, row_start, probs, key_start): probs [n_head, rows, n_keys] are the post-softmax rows
# row_start.. over the keys key_start..row_start+rows-1 (key_start > 0 only in sliding-window layers,
# where every earlier key has probability 0).
AttentionHook = Callable[[int, int, "object"], None]


class ReferenceModel:
    """The forward pass. Usage: ReferenceModel(path, device="cpu").forward(tokens, hook=...).

    Weights are dequantized on the CPU one layer at a time and moved to `device` (a torch device: "cpu",
    "cuda"), where the layer runs; peak memory is one layer's f32 weights (all of them where they are kept, below)
    plus the activations, on that device.
    Outputs (logits) come back on the CPU; hooks and attention policies see tensors on the device.

    A small model's dequantized weights are kept after the first forward (all of them at most CACHE_BYTES as
    float32): the measurements run it a hundred times, and dequantizing is a tenth of a forward."""

    CACHE_BYTES = 2 << 30

    def __init__(self, path: str, device: str = "cpu", reader=None, cache_weights: bool | None = None):
        """reader: the GGUFReader of `path` when the caller has one open already; cache_weights: keep the
        dequantized weights (default: where they take at most CACHE_BYTES)."""
        from gguf import GGUFReader

        self.path = str(path)
        self.reader = reader if reader is not None else GGUFReader(self.path, "r")
        self.hp = read_hparams(self.reader)
        self.w = GGUFWeights(self.reader)
        self.device = device
        if cache_weights is None:
            cache_weights = 4 * sum(int(t.n_elements) for t in self.reader.tensors) <= self.CACHE_BYTES
        self._cache: dict | None = {} if cache_weights else None

    def _cached(self, key, make):
        if self._cache is None:
            return make()
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def _rope_factors(self, n_ctx: int):
        """llama_model::get_rope_factors: rope_freqs (Llama 3), else LongRoPE's long factors for a context
        beyond the original one and its short factors otherwise (phi3); None without factors. The reference
        pass runs a context of exactly its tokens."""
        if self.w.has("rope_freqs.weight"):
            return self.w.get("rope_freqs.weight")
        name = "rope_factors_long.weight" if n_ctx > self.hp.n_ctx_orig else "rope_factors_short.weight"
        return self.w.get(name) if self.w.has(name) else None

    def _layer(self, il: int) -> dict:
        p = f"blk.{il}."
        names = {
            "attn_norm": "attn_norm.weight", "wq": "attn_q.weight", "wk": "attn_k.weight",
            "wv": "attn_v.weight", "wo": "attn_output.weight", "ffn_norm": "ffn_norm.weight",
            "gate": "ffn_gate.weight", "up": "ffn_up.weight", "down": "ffn_down.weight",
        }
        optional = {
            "bq": "attn_q.bias", "bk": "attn_k.bias", "bv": "attn_v.bias", "bo": "attn_output.bias",
            "q_norm": "attn_q_norm.weight", "k_norm": "attn_k_norm.weight",
            "attn_post_norm": "post_attention_norm.weight", "ffn_post_norm": "post_ffw_norm.weight",
        }
        dev = self.device
        hp = self.hp
        if self.w.has(p + "attn_qkv.weight"):  # phi3: one fused projection, rows [q, k, v]
            qkv = self.w.get(p + "attn_qkv.weight")
            nq, nkv = hp.n_head * hp.head_dim, hp.n_head_kv * hp.head_dim
            fused = {"wq": qkv[:nq], "wk": qkv[nq:nq + nkv], "wv": qkv[nq + nkv:]}
            names = {k: v for k, v in names.items() if k not in fused}
        else:
            fused = {}
        if hp.n_expert:  # Mixtral: a router and stacked experts instead of one FFN
            names = {k: v for k, v in names.items() if k not in ("gate", "up", "down")}
            names.update(router="ffn_gate_inp.weight", gate_exps="ffn_gate_exps.weight",
                         up_exps="ffn_up_exps.weight", down_exps="ffn_down_exps.weight")
        elif not self.w.has(p + "ffn_gate.weight"):  # phi3: ffn_up holds [gate; up] (llama.cpp's fused SWIGLU)
            up = self.w.get(p + "ffn_up.weight")
            fused.update(gate=up[: up.shape[0] // 2], up=up[up.shape[0] // 2:])
            names = {k: v for k, v in names.items() if k not in ("gate", "up")}
        out = {k: self.w.get(p + v).to(dev) for k, v in names.items()}
        out.update({k: v.to(dev) for k, v in fused.items()})
        out.update({k: self.w.get(p + v).to(dev) for k, v in optional.items() if self.w.has(p + v)})
        return out

    def forward(
        self,
        tokens,
        hook: AttentionHook | None = None,
        chunk: int = 256,
        want_logits: bool | str = False,
        progress: Callable[[int], None] | None = None,
        attention: Callable[[int, "object", "object", "object"], "object"] | None = None,
        logits_from: int = 0,
    ):
        """Run the model on `tokens`. Returns None, or with want_logits=True the last token's logits
        [n_vocab], or with want_logits="all" the logits of positions logits_from.. [T - logits_from, n_vocab].

        attention(layer, q, k, v) replaces a layer's causal softmax attention when given (e.g. by the
        razor oracle): q [n_head, T, d] and k, v [n_head_kv, T, d] after RoPE, returns [n_head, T, d];
        `hook` is not called for layers it computes."""
        import torch

        hp = self.hp
        tok = np.asarray(tokens, dtype=np.int64)
        T = len(tok)
        # Embedding: dequantize only the rows the prompt uses.
        uniq, inv = np.unique(tok, return_inverse=True)
        dev = torch.device(self.device)
        x = self.w.get("token_embd.weight", rows=uniq)[torch.from_numpy(inv)].to(dev)
        if hp.arch == "gemma3":
            x = x * math.sqrt(hp.n_embd)
        pos = torch.arange(T, device=dev)
        ff = self._rope_factors(T)
        ff = ff.to(dev) if ff is not None else None
        g = hp.n_head // hp.n_head_kv
        hd = hp.head_dim
        kq_scale = 1.0 / math.sqrt(hd)
        angles = {}  # rope's (cos, sin) by layer kind (sliding-window or not)
        with torch.no_grad():
            for il in range(hp.n_layer):
                L = self._cached(il, lambda: self._layer(il))
                h = _rms_norm(x, L["attn_norm"], hp.rms_eps)
                q = h @ L["wq"].T
                k = h @ L["wk"].T
                v = h @ L["wv"].T
                if "bq" in L:
                    q, k, v = q + L["bq"], k + L["bk"], v + L["bv"]
                q = q.view(T, hp.n_head, hd).transpose(0, 1)  # [H, T, d]
                k = k.view(T, hp.n_head_kv, hd).transpose(0, 1)
                v = v.view(T, hp.n_head_kv, hd).transpose(0, 1)
                if "q_norm" in L:
                    q = _rms_norm(q, L["q_norm"], hp.rms_eps)
                    k = _rms_norm(k, L["k_norm"], hp.rms_eps)
                swa = hp.swa_layers[il] if hp.swa_layers else False
                base = hp.rope_base_swa if swa else hp.rope_base
                scale = 1.0 if swa else hp.rope_scale
                yarn, mscale = (None, 1.0) if swa else (hp.yarn, hp.rope_mscale)
                if swa not in angles:
                    angles[swa] = _rope_angles(dev, pos, hp.rope_dim, base, scale, ff, yarn, mscale)
                q = _rotate(q, angles[swa], hp.rope_dim, hp.neox)
                k = _rotate(k, angles[swa], hp.rope_dim, hp.neox)
                # GQA: query head h uses KV head h // g (llama.cpp's broadcast).
                qg = q.reshape(hp.n_head_kv, g, T, hd)
                if attention is not None:
                    out = torch.as_tensor(attention(il, q, k, v), dtype=q.dtype, device=dev)
                else:
                    out = torch.empty(hp.n_head_kv, g, T, hd, device=dev)
                    for s in range(0, T, chunk):
                        e = min(T, s + chunk)
                        # keys k0..e-1: causal, and in a sliding-window layer only the last n_swa positions
                        k0 = max(0, s - hp.n_swa + 1) if swa else 0
                        qi = torch.arange(s, e, device=dev)[:, None]
                        kj = torch.arange(k0, e, device=dev)[None, :]
                        mask = kj > qi
                        if swa:
                            mask = mask | (qi - kj >= hp.n_swa)
                        if hook is None:  # nobody reads the probabilities: torch's fused attention
                            out[:, :, s:e] = gqa_attention(qg[:, :, s:e], k[:, k0:e], v[:, k0:e], ~mask, kq_scale)
                            continue
                        sc = torch.matmul(qg[:, :, s:e], k[:, None, k0:e].transpose(-1, -2)) * kq_scale
                        sc.masked_fill_(mask, float("-inf"))
                        pr = torch.softmax(sc, dim=-1)
                        hook(il, s, pr.reshape(hp.n_head, e - s, e - k0), k0)
                        out[:, :, s:e] = torch.matmul(pr, v[:, None, k0:e])
                        del sc, pr
                attn = out.reshape(hp.n_head, T, hd).transpose(0, 1).reshape(T, hp.n_head * hd)
                attn = attn @ L["wo"].T
                if "bo" in L:
                    attn = attn + L["bo"]
                if "attn_post_norm" in L:
                    attn = _rms_norm(attn, L["attn_post_norm"], hp.rms_eps)
                x = x + attn
                h = _rms_norm(x, L["ffn_norm"], hp.rms_eps)
                if hp.n_expert:
                    f = _moe_ffn(h, L, hp.n_expert_used)
                else:
                    gate = h @ L["gate"].T
                    act = torch.nn.functional.gelu(gate, approximate="tanh") if hp.arch == "gemma3" else torch.nn.functional.silu(gate)
                    f = (act * (h @ L["up"].T)) @ L["down"].T
                if "ffn_post_norm" in L:
                    f = _rms_norm(f, L["ffn_post_norm"], hp.rms_eps)
                x = x + f
                del L
                if progress is not None:
                    progress(il)
            if not want_logits:
                return None
            last = _rms_norm(x[logits_from:] if want_logits == "all" else x[-1:], self.w.get("output_norm.weight").to(dev),
                             hp.rms_eps)
            name = "output.weight" if self.w.has("output.weight") else "token_embd.weight"
            t = self.w._by_name[name]
            n_rows = t.data.shape[0]
            logits = []
            for r in range(0, n_rows, 8192):  # stream the output matrix in row blocks
                W = self._cached((name, r), lambda: self.w.get(name, rows=slice(r, min(n_rows, r + 8192))).to(dev))
                logits.append((last @ W.T).cpu())
            out = torch.cat(logits, dim=-1)
            last = W = None
            out = out if want_logits == "all" else out[0]
            if self.w.has("output.bias"):
                out = out + self.w.get("output.bias")
            if hp.logit_softcap:
                out = torch.tanh(out / hp.logit_softcap) * hp.logit_softcap
            return out
