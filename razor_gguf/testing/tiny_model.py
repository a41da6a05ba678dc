"""Write a tiny llama-architecture (or gemma3-style, with interleaved sliding-window layers) GGUF with random
weights (fixed seed), for exact numeric tests.

The model is small enough for a numpy forward pass (`tiny_forward.py`) to check llama.cpp's
logits token by token. Weights are written in llama.cpp's own layout (Q/K rows already in the
order its NORM RoPE expects: adjacent pairs), so no HF-style Q/K permutation is involved.
Optionally the file carries `razor.*` metadata (SPEC section 2) for a given head map.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import numpy.typing as npt

# SentencePiece-style vocab: <unk>, <s>, </s> and the 256 byte tokens (byte fallback), so the
# tokenizer loads and can encode any text, with no merges or pre-tokenizer to get right.
N_SPECIAL = 3
BOS_ID, EOS_ID, UNK_ID = 1, 2, 0


@dataclass(frozen=True)
class TinyConfig:
    n_layer: int = 4
    n_embd: int = 128
    n_head: int = 4
    n_head_kv: int = 2
    head_dim: int = 32  # 64 works too: q/k/v width need not equal n_embd (key_length is written)
    n_ff: int = 256
    n_ctx_train: int = 4096
    rope_base: float = 10000.0
    rms_eps: float = 1e-5
    seed: int = 0
    f16: bool = False  # matrices in f16 (norm weights stay f32, as llama.cpp requires)
    qk_gain: float = 2.0  # >1 sharpens attention so eviction visibly changes the outputs
    n_filler: int = 0  # plain tokens after the byte tokens: a real model's vocab size, for speed runs
    q4_0: bool = False  # random Q4_0 matrices written block by block (speed runs at 7-8B shapes; no forward)
    # "gemma3": scaled embeddings, q/k norms, post-norms, GELU, NEOX rope, and with n_swa > 0 a sliding window on
    # every layer but each swa_pattern-th (llama.cpp's pattern rule: layer il slides when il % n < n - 1)
    arch: str = "llama"
    n_swa: int = 0
    swa_pattern: int = 2
    rope_base_swa: float = 10000.0

    @property
    def n_vocab(self) -> int:
        return N_SPECIAL + 256 + self.n_filler

    @property
    def swa_layers(self) -> list[bool]:
        """Which layers use the sliding window (all False without one)."""
        n = self.swa_pattern
        return [self.n_swa > 0 and il % n < n - 1 for il in range(self.n_layer)]


@dataclass(frozen=True)
class RazorMeta:
    """The `razor.*` keys of SPEC section 2, as `razor-gguf embed-heads` would write them."""

    head_map: npt.NDArray[np.int32]  # [n_layer, n_head_kv], 1 = retrieval
    n_sink: int = 4
    window: int = 64
    echo_scores: npt.NDArray[np.float32] | None = None  # default: random in [0, 1)
    induction_scores: npt.NDArray[np.float32] | None = None
    layer_window_scale: Sequence[float] | None = None  # razor.layer_window_scale [n_layer]: per-layer windows
    compensation: bool | None = None  # razor.compensation (the measured default embed-heads writes); None: unset, on


def make_weights(cfg: TinyConfig) -> dict[str, npt.NDArray[np.float32]]:
    """Random weights by GGUF tensor name, numpy shape [out, in] (ggml ne reversed)."""
    rng = np.random.default_rng(cfg.seed)

    def lin(n_out: int, n_in: int, gain: float = 1.0) -> npt.NDArray[np.float32]:
        return (rng.standard_normal((n_out, n_in)) * gain / np.sqrt(n_in)).astype(np.float32)

    def norm(n: int) -> npt.NDArray[np.float32]:
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    w: dict[str, npt.NDArray[np.float32]] = {}
    for name, shape in tensor_shapes(cfg).items():
        if name == "token_embd.weight":
            w[name] = rng.standard_normal(shape).astype(np.float32)
        elif len(shape) == 1:
            w[name] = norm(*shape)
        else:
            w[name] = lin(*shape, cfg.qk_gain if name.endswith(("attn_q.weight", "attn_k.weight")) else 1.0)
    if cfg.f16:
        # Round matrices through f16 here so the numpy forward sees exactly the stored values.
        w = {n: a if a.ndim == 1 else a.astype(np.float16).astype(np.float32) for n, a in w.items()}
    return w


def tensor_shapes(cfg: TinyConfig) -> dict[str, tuple[int, ...]]:
    """GGUF tensor name -> numpy shape [out, in] (norms: [n]), in make_weights' order."""
    qd, kvd = cfg.n_head * cfg.head_dim, cfg.n_head_kv * cfg.head_dim
    s: dict[str, tuple[int, ...]] = {"token_embd.weight": (cfg.n_vocab, cfg.n_embd)}
    for i in range(cfg.n_layer):
        p = f"blk.{i}."
        s.update({p + "attn_norm.weight": (cfg.n_embd,), p + "attn_q.weight": (qd, cfg.n_embd),
                  p + "attn_k.weight": (kvd, cfg.n_embd), p + "attn_v.weight": (kvd, cfg.n_embd),
                  p + "attn_output.weight": (cfg.n_embd, qd), p + "ffn_norm.weight": (cfg.n_embd,),
                  p + "ffn_gate.weight": (cfg.n_ff, cfg.n_embd), p + "ffn_up.weight": (cfg.n_ff, cfg.n_embd),
                  p + "ffn_down.weight": (cfg.n_embd, cfg.n_ff)})
        if cfg.arch == "gemma3":
            s.update({p + "attn_q_norm.weight": (cfg.head_dim,), p + "attn_k_norm.weight": (cfg.head_dim,),
                      p + "post_attention_norm.weight": (cfg.n_embd,), p + "post_ffw_norm.weight": (cfg.n_embd,)})
    s["output_norm.weight"] = (cfg.n_embd,)
    s["output.weight"] = (cfg.n_vocab, cfg.n_embd)
    return s


def random_q4_0(rng: np.random.Generator, n_out: int, n_in: int) -> npt.NDArray[np.uint8]:
    """Q4_0 blocks (f16 scale d, 32 nibbles q; value d*(q-8)) of a random [n_out, n_in] matrix with entries of
    standard deviation ~1/sqrt(n_in), as raw bytes [n_out, n_in/32*18]: a 7-8B model in seconds and without
    its f32 weights in memory."""
    if n_in % 32:
        raise ValueError(f"Q4_0 rows need a multiple of 32 values, got {n_in}")
    nb = n_out * n_in // 32
    blocks = np.empty((nb, 18), dtype=np.uint8)
    d = (rng.uniform(0.5, 1.5, nb) / np.sqrt(21.25 * n_in)).astype(np.float16)  # var(q-8) = 21.25
    blocks[:, :2] = d.view(np.uint8).reshape(nb, 2)
    blocks[:, 2:] = rng.integers(0, 256, size=(nb, 16), dtype=np.uint8)
    return blocks.reshape(n_out, n_in // 32 * 18)


def _add_razor_keys(writer, cfg: TinyConfig, meta: RazorMeta) -> None:
    from gguf import GGUFValueType

    hm = np.asarray(meta.head_map, dtype=np.int32)
    if hm.shape != (cfg.n_layer, cfg.n_head_kv) or not np.isin(hm, (0, 1)).all():
        raise ValueError(f"head_map must be 0/1 of shape ({cfg.n_layer}, {cfg.n_head_kv})")
    rng = np.random.default_rng(cfg.seed + 1)
    echo = meta.echo_scores if meta.echo_scores is not None else rng.random(hm.size)
    ind = meta.induction_scores if meta.induction_scores is not None else rng.random(hm.size)
    # Same key set as razor_gguf.metadata.build_razor_kv (what embed-heads writes), with
    # synthetic provenance, so the patched loader sees a realistic file.
    writer.add_uint32("razor.version", 1)
    writer.add_bool("razor.enabled", True)
    writer.add_uint32("razor.n_layer", cfg.n_layer)
    writer.add_uint32("razor.n_head_kv", cfg.n_head_kv)
    writer.add_array("razor.head_map", [int(x) for x in hm.reshape(-1)])  # layer-major, INT32
    writer.add_key_value("razor.echo_scores", [float(x) for x in np.ravel(echo)], GGUFValueType.ARRAY, GGUFValueType.FLOAT32)
    writer.add_key_value("razor.induction_scores", [float(x) for x in np.ravel(ind)], GGUFValueType.ARRAY, GGUFValueType.FLOAT32)
    writer.add_uint32("razor.retrieval_count", int(hm.sum()))
    writer.add_float32("razor.retrieval_ratio", float(hm.mean()))
    writer.add_uint32("razor.n_sink", int(meta.n_sink))
    writer.add_uint32("razor.window", int(meta.window))
    if meta.layer_window_scale is not None:
        writer.add_key_value("razor.layer_window_scale", [float(x) for x in meta.layer_window_scale],
                             GGUFValueType.ARRAY, GGUFValueType.FLOAT32)
    if meta.compensation is not None:
        writer.add_bool("razor.compensation", bool(meta.compensation))
    writer.add_uint32("razor.probe.length", 0)
    writer.add_uint32("razor.probe.repetitions", 0)
    writer.add_uint64("razor.probe.seed", cfg.seed)
    writer.add_float32("razor.selection.induction_ratio", 0.0)
    writer.add_float32("razor.selection.echo_ratio", 0.0)
    writer.add_string("razor.source.file", "synthetic (razor_gguf.testing.tiny_model)")
    writer.add_string("razor.source.sha256", "none")  # add_string drops empty strings
    writer.add_string("razor.tool_version", "razor-gguf tiny_model")


def write_tiny_model(path: str | os.PathLike[str], cfg: TinyConfig = TinyConfig(), razor: RazorMeta | None = None) -> Path:
    """Write the tiny model to `path` (atomically) and return the path."""
    from gguf import GGUFWriter, LlamaFileType, TokenType

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if cfg.arch not in ("llama", "gemma3"):
        raise ValueError(f"tiny models are llama or gemma3, not {cfg.arch!r}")
    w = GGUFWriter(str(tmp), cfg.arch)
    w.add_name(f"razor-tiny-{cfg.n_layer}L-{cfg.n_embd}-hd{cfg.head_dim}")
    w.add_context_length(cfg.n_ctx_train)
    w.add_embedding_length(cfg.n_embd)
    w.add_block_count(cfg.n_layer)
    w.add_feed_forward_length(cfg.n_ff)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.n_head_kv)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_base)
    w.add_layer_norm_rms_eps(cfg.rms_eps)
    if cfg.n_swa:
        w.add_sliding_window(cfg.n_swa)
        w.add_sliding_window_pattern(cfg.swa_pattern)
        w.add_rope_freq_base_swa(cfg.rope_base_swa)
    w.add_vocab_size(cfg.n_vocab)
    w.add_file_type(LlamaFileType.MOSTLY_Q4_0 if cfg.q4_0 else LlamaFileType.MOSTLY_F16 if cfg.f16 else
                    LlamaFileType.ALL_F32)

    w.add_tokenizer_model("llama")
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL] + [TokenType.BYTE] * 256
    tokens += [f"<filler_{i}>" for i in range(cfg.n_filler)]
    types += [TokenType.NORMAL] * cfg.n_filler
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * len(tokens))
    w.add_token_types(types)
    w.add_bos_token_id(BOS_ID)
    w.add_eos_token_id(EOS_ID)
    w.add_unk_token_id(UNK_ID)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)

    if razor is not None:
        _add_razor_keys(w, cfg, razor)

    if cfg.q4_0:
        from gguf import GGMLQuantizationType

        rng = np.random.default_rng(cfg.seed)
        for name, shape in tensor_shapes(cfg).items():
            if len(shape) == 1:
                w.add_tensor(name, (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32))
            else:
                w.add_tensor(name, random_q4_0(rng, *shape), raw_dtype=GGMLQuantizationType.Q4_0)
    else:
        for name, arr in make_weights(cfg).items():
            w.add_tensor(name, arr.astype(np.float16) if cfg.f16 and arr.ndim > 1 else arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, path)
    return path


def config_from_gguf(path: str | os.PathLike[str]) -> TinyConfig:
    """Recover the TinyConfig a file was written with (shapes and hyperparameters)."""
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    arch = r.fields["general.architecture"].contents()

    def val(key: str, default=None):
        f = r.fields.get(f"{arch}.{key}")
        return default if f is None else f.contents()

    return dataclasses.replace(
        TinyConfig(),
        arch=arch,
        n_layer=int(val("block_count")),
        n_embd=int(val("embedding_length")),
        n_head=int(val("attention.head_count")),
        n_head_kv=int(val("attention.head_count_kv")),
        head_dim=int(val("attention.key_length")),
        n_ff=int(val("feed_forward_length")),
        n_ctx_train=int(val("context_length")),
        rope_base=float(val("rope.freq_base")),
        rms_eps=float(val("attention.layer_norm_rms_epsilon")),
        n_filler=len(r.fields["tokenizer.ggml.tokens"].data) - N_SPECIAL - 256,
        n_swa=int(val("attention.sliding_window", 0)),
        swa_pattern=int(val("attention.sliding_window_pattern", 2)),
        rope_base_swa=float(val("rope.freq_base_swa", 10000.0)),
    )


def read_weights(path: str | os.PathLike[str]) -> dict[str, npt.NDArray[np.float32]]:
    """Tensors of a (f32/f16) GGUF as float32 arrays, numpy shape [out, in]."""
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    out = {}
    for t in r.tensors:
        a = np.asarray(t.data)
        if a.dtype not in (np.float32, np.float16):
            raise ValueError(f"{t.name}: only f32/f16 tensors are supported, got {t.tensor_type.name}")
        out[t.name] = a.astype(np.float32).reshape([int(x) for x in reversed(t.shape)])
    return out


def read_head_map(path: str | os.PathLike[str], cfg: TinyConfig | None = None) -> npt.NDArray[np.int32] | None:
    """`razor.head_map` as [n_layer, n_head_kv], or None when the file has none."""
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    f = r.fields.get("razor.head_map")
    if f is None:
        return None
    cfg = cfg or config_from_gguf(path)
    return np.asarray(f.contents(), dtype=np.int32).reshape(cfg.n_layer, cfg.n_head_kv)
