"""Per-model defaults measured by `embed-heads` in the reference pass: does the compensation row help, and
what KV budget keeps the model's answers?

SPEC section 1: whether the compensation row is on by default is measured per model. The measurement runs
the whole model under the razor policy (razor_gguf.oracle as every layer's attention) with and without the
row, on calibration text, and compares next-token KL divergence against the full model over the positions
where tokens have been evicted. The row is on by default only when it lowers that KLD. Then, with that
setting, a ladder of KV budgets runs the same way; the smallest whose top-1 agreement with the full model
reaches TOP1_TARGET becomes the model's default budget (razor.kv_budget).

Calibration text: the Python language reference shipped with CPython (`pydoc_data.topics`): no download,
and never the text `razor-gguf eval` measures on (docstrings of stdlib modules, razor_gguf.niah).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

CALIBRATION_SOURCE = "pydoc_data.topics"
DEFAULT_CHUNKS = 2
DEFAULT_CHUNK_TOKENS = 2048


def calibration_text() -> str:
    """The calibration prose: every help topic of the Python language reference, in a fixed order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


# Prose-rich stdlib modules outside razor_gguf.niah.MODULES (the evaluation's haystack): the text the retrieval
# ratio is measured on (razor_gguf.ratios). A few docstrings inherited from shared base classes (exceptions, io,
# enum) read the same in both (under 2% of the lines).
PROSE_MODULES = (
    "os", "re", "io", "doctest", "pdb", "urllib.parse", "multiprocessing", "concurrent.futures", "selectors", "ssl",
    "zipapp", "venv", "trace", "timeit", "pstats", "wave", "codecs", "locale", "gettext", "shelve", "numbers", "abc",
    "weakref", "types", "operator", "warnings", "importlib", "pkgutil", "runpy", "ast", "dis", "tokenize", "glob",
    "fnmatch", "filecmp", "fileinput", "signal", "hashlib", "hmac", "secrets", "uuid", "ipaddress", "mimetypes",
    "base64", "html.parser", "xml.etree.ElementTree", "webbrowser", "xmlrpc.client", "poplib", "getopt",
    "http.server", "http.cookiejar", "email.utils", "email.parser", "logging.handlers", "unittest.mock", "zoneinfo",
    "graphlib", "tomllib", "struct", "array", "sysconfig", "platform", "plistlib", "netrc", "shlex", "cmd", "code",
    "codeop", "modulefinder", "compileall", "py_compile", "bdb", "faulthandler", "tracemalloc", "symtable", "keyword",
    "linecache", "reprlib", "colorsys")


def prose_text() -> str:
    """Prose from the docstrings of PROSE_MODULES, in a fixed order (razor_gguf.niah's filter)."""
    from .niah import haystack_text

    return haystack_text(PROSE_MODULES)


def calibration_chunks(tokenize: Callable[[str], Sequence[int]], n_chunks: int, n_tokens: int,
                       text: str | None = None) -> list[list[int]]:
    """n_chunks disjoint pieces of n_tokens tokens each of the calibration text (or `text`; BOS handled by
    `tokenize`)."""
    toks = list(tokenize(calibration_text() if text is None else text))
    if len(toks) < n_chunks * n_tokens:
        raise ValueError(f"calibration text has {len(toks)} tokens, fewer than {n_chunks} x {n_tokens}")
    return [toks[i * n_tokens:(i + 1) * n_tokens] for i in range(n_chunks)]


def razor_attention_torch(q, k, v, head_map, n_sink: int, window: int, compensation: bool = True, chunk: int = 512,
                          pins: Sequence[int] = ()):
    """The razor policy of razor_gguf.oracle.razor_attention (exact per token, slack 0) in PyTorch, in the
    reference pass's layout: q [n_head, T, d], k and v [n_head_kv, T, d] after RoPE; returns [n_head, T, d].
    pins: positions every local head also keeps (razor.n_pin; needs compensation=False).

    The compensation row's sums come from prefix sums over positions, so a layer costs about what its plain
    attention costs (the numpy oracle loops over heads; tests/test_oracle.py holds the two together). Without
    the row the policy is a mask, which torch's fused attention applies (about 3x faster on a CPU than the
    softmax spelled out: the retrieval-ratio measurement runs a hundred forwards)."""
    import math

    import torch

    from .reference import gqa_attention

    H, T, d = q.shape
    n_kv = k.shape[0]
    g = H // n_kv
    scale = 1.0 / math.sqrt(d)
    dev = q.device
    local = torch.as_tensor(np.asarray(head_map).reshape(-1) == 0, device=dev)  # [n_kv]
    pinned = torch.zeros(T, dtype=torch.bool, device=dev)
    pinned[[p for p in pins if 0 <= p < T]] = True
    if bool(pinned.any()) and compensation:
        raise ValueError("pins need compensation=False (the row would count a pinned token twice)")
    qg = q.reshape(n_kv, g, T, d)
    if compensation:
        csk = torch.cat([torch.zeros(n_kv, 1, d, dtype=k.dtype, device=dev), k.cumsum(1)], 1)  # sum of k[:, :j]
        csv = torch.cat([torch.zeros(n_kv, 1, v.shape[2], dtype=v.dtype, device=dev), v.cumsum(1)], 1)
    pos = torch.arange(T, device=dev)
    out = torch.empty(n_kv, g, T, v.shape[2], dtype=q.dtype, device=dev)
    for s0 in range(0, T, chunk):
        e = min(T, s0 + chunk)
        qi, kj = pos[s0:e, None], pos[None, :e]
        causal = kj <= qi
        lo = qi[:, 0] - window + 1  # first position of each query's window; [S, lo) is evicted
        kept = causal & ((kj < n_sink) | (kj >= lo[:, None]) | pinned[None, :e])
        mask = torch.where(local[:, None, None, None], kept, causal)  # [n_kv, 1, R, e]
        if not compensation:  # every row keeps its own token, so no row is all masked
            out[:, :, s0:e] = gqa_attention(qg[:, :, s0:e], k[:, :e], v[:, :e], mask, scale)
            continue
        sc = torch.matmul(qg[:, :, s0:e], k[:, None, :e].transpose(-1, -2)) * scale
        sc = sc.masked_fill(~mask, float("-inf"))
        n_ev = (lo - n_sink).clamp(min=0)  # l per query
        hi = lo.clamp(min=n_sink)
        kbar = (csk[:, hi] - csk[:, n_sink:n_sink + 1]) / n_ev.clamp(min=1)[None, :, None]  # [n_kv, R, d]
        vbar = (csv[:, hi] - csv[:, n_sink:n_sink + 1]) / n_ev.clamp(min=1)[None, :, None]
        sbar = (qg[:, :, s0:e] * kbar[:, None]).sum(-1) * scale + torch.log(n_ev.clamp(min=1).to(q.dtype))
        has = local[:, None, None] & (n_ev > 0)[None, None, :]  # [n_kv, 1, R]
        sbar = sbar.masked_fill(~has, float("-inf"))
        m = torch.maximum(sc.max(-1).values, sbar)
        p = torch.exp(sc - m[..., None])
        pbar = torch.exp(sbar - m)
        num = torch.matmul(p, v[:, None, :e]) + pbar[..., None] * vbar[:, None]
        out[:, :, s0:e] = num / (p.sum(-1) + pbar)[..., None]
    return out.reshape(H, T, v.shape[2])


def swa_layers(hp) -> list[bool]:
    """Which layers of the reference model are sliding-window layers (all False for other models)."""
    return hp.swa_layers if hp.swa_layers and any(hp.swa_layers) else [False] * hp.n_layer


def local_heads(hp, head_map: np.ndarray) -> list[int]:
    """Local (non-retrieval) KV heads per layer that razor splits: 0 in a sliding-window layer, whose heads keep
    llama.cpp's SWA cache."""
    head_map = np.asarray(head_map).reshape(hp.n_layer, -1)
    return [0 if s else int((1 - head_map[l]).sum()) for l, s in enumerate(swa_layers(hp))]


def razor_policy(hp, head_map: np.ndarray, n_sink: int, window: int | Sequence[int], compensation: bool,
                 pins: Sequence[int] = ()):
    """The whole model's attention under razor for ReferenceModel.forward(attention=...): head_map
    [n_layer, n_head_kv]; window: one for every layer or one per layer (razor.layer_window_scale); pins:
    positions every local head of the global layers also keeps; the sliding-window layers of an iSWA model keep
    their window (llama.cpp's SWA cache: every head local, no sinks, no row)."""
    swa = swa_layers(hp)
    no_retrieval = np.zeros(head_map.shape[1])
    windows = [int(window)] * hp.n_layer if np.isscalar(window) else [int(w) for w in window]

    def attention(il, q, k, v):
        if swa[il]:
            return razor_attention_torch(q, k, v, no_retrieval, 0, hp.n_swa, compensation=False)
        return razor_attention_torch(q, k, v, head_map[il], n_sink, windows[il], compensation=compensation, pins=pins)

    return attention


def pin_record_policy(hp, head_map: np.ndarray, n_sink: int, window: int, n_prompt: int, scores: list):
    """razor_policy without pins or row (the first read of a prompt with pins), which also records what
    llama_razor_pin_capture does: the softmax attention the retrieval heads' last PIN_QUERIES prompt queries give
    each prompt key, summed over queries, heads and the layers with both head kinds, appended to `scores` as a
    tensor [n_prompt] per layer."""
    import math

    import torch

    from .pins import PIN_QUERIES

    razor = razor_policy(hp, head_map, n_sink, window, compensation=False)
    swa = swa_layers(hp)
    n_obs = min(PIN_QUERIES, n_prompt - 1)

    def attention(il, q, k, v):
        retr = torch.as_tensor(np.asarray(head_map[il]) == 1)
        if not swa[il] and bool(retr.any()) and not bool(retr.all()):
            H, T, d = q.shape
            n_kv = k.shape[0]
            o0 = n_prompt - n_obs
            q_obs = q.reshape(n_kv, H // n_kv, T, d)[retr.to(q.device)][:, :, o0:n_prompt]
            sc = torch.matmul(q_obs, k[retr.to(k.device)][:, None, :n_prompt].transpose(-1, -2)) / math.sqrt(d)
            later = torch.arange(n_prompt, device=q.device)[None, :] > torch.arange(o0, n_prompt, device=q.device)[:, None]
            scores.append(torch.softmax(sc.masked_fill(later, float("-inf")), -1).sum(dim=(0, 1, 2)).cpu())
        return razor(il, q, k, v)

    return attention


def _first_read(model, toks: list[int], head_map: np.ndarray, n_sink: int, window: int, n_pin: int, n_prompt: int,
                **forward):
    """The first read of a prompt with pins: (its forward's output, the pins it chooses)."""
    from .pins import select_pins

    scores: list = []
    out = model.forward(toks, attention=pin_record_policy(model.hp, head_map, n_sink, window, n_prompt, scores),
                        **forward)
    return out, (select_pins(sum(scores).double().numpy(), n_pin, n_sink, n_prompt - window) if scores else [])


def choose_pins(model, tokens: Sequence[int], head_map: np.ndarray, *, n_sink: int, window: int, n_pin: int) -> list[int]:
    """The pins razor_gguf.Llama chooses for a prompt, in the reference pass: a first read under razor (no row)
    records the retrieval heads' attention from the prompt's last tokens (pin_record_policy); the pins are the
    n_pin positions with the highest max-pooled score among those that leave the window by the prompt's end
    (razor_gguf.pins.select_pins). Read the prompt again with razor_policy(..., pins=...) to use them."""
    head_map = np.asarray(head_map).reshape(model.hp.n_layer, -1)
    return _first_read(model, list(tokens), head_map, n_sink, window, n_pin, len(tokens))[1]


def pinned_reads(model, tokens: Sequence[int], head_map: np.ndarray, *, n_sink: int, window: int, n_pin: int,
                 n_prompt: int | None = None, logits_from: int = 0):
    """A prompt read twice as razor_gguf.Llama reads it with pins (choose_pins, then razor_policy with them), the
    first read's logits kept too: razor without pins at no extra forward. tokens: the prompt, optionally followed
    by teacher-forced tokens (n_prompt: the prompt's length, default all of tokens), which do not change the pins.
    Returns (first read's logits, second read's logits, pins); logits [len(tokens) - logits_from, n_vocab]."""
    head_map = np.asarray(head_map).reshape(model.hp.n_layer, -1)
    toks = list(tokens)
    first, pins = _first_read(model, toks, head_map, n_sink, window, n_pin, len(toks) if n_prompt is None else n_prompt,
                              want_logits="all", logits_from=logits_from)
    second = model.forward(toks, want_logits="all", logits_from=logits_from,
                           attention=razor_policy(model.hp, head_map, n_sink, window, False, pins))
    return first.numpy(), second.numpy(), pins


@dataclass(frozen=True)
class CompensationMeasurement:
    compensation: bool  # the measured default: on only where the row lowers the KLD
    kld_compensation: float  # mean next-token KLD against the full model, row on
    kld_no_compensation: float  # the same, row off
    window: int
    n_sink: int
    n_tokens: int  # positions measured (those past n_sink + window in each chunk)
    source: str = CALIBRATION_SOURCE


def measure_compensation(model, head_map: np.ndarray, chunks: list[list[int]], *, n_sink: int, window: int,
                         progress: Callable[[], None] | None = None) -> CompensationMeasurement:
    """KLD of razor with and without the compensation row against the full model, on `chunks`.

    model: a razor_gguf.reference.ReferenceModel; head_map [n_layer, n_head_kv] (1 = retrieval). Each chunk
    runs three forwards (full, row on, row off); progress() is called after each. The sliding-window layers
    of an iSWA model keep their window (llama.cpp's SWA cache: every head local, no sinks, no row)."""
    from .kld import kl_and_top1

    hp = model.hp
    head_map = np.asarray(head_map).reshape(hp.n_layer, -1)
    kl = {True: [], False: []}
    for toks in chunks:
        if len(toks) <= n_sink + window:
            raise ValueError(f"calibration chunks of {len(toks)} tokens evict nothing at window {window}")
        lo = n_sink + window  # before it razor equals the full model exactly; float32 [T - lo, n_vocab] rows
        full = model.forward(toks, want_logits="all", logits_from=lo).numpy()
        if progress:
            progress()
        for comp in (True, False):
            attention = razor_policy(hp, head_map, n_sink, window, comp)
            got = model.forward(toks, want_logits="all", attention=attention, logits_from=lo).numpy()
            kl[comp].append(kl_and_top1(full, got)[0])
            del got
            if progress:
                progress()
    with_row, without = (float(np.concatenate(kl[c]).mean()) for c in (True, False))
    n = sum(len(x) for x in kl[True])
    return CompensationMeasurement(compensation=with_row < without, kld_compensation=with_row,
                                   kld_no_compensation=without, window=window, n_sink=n_sink, n_tokens=n)


# The recommended budget: the smallest of these (fractions of the full cache at the calibration context) at
# which razor keeps the full model's next token on at least TOP1_TARGET of the measured positions.
BUDGET_LADDER = (0.25, 0.35, 0.5, 0.75)
TOP1_TARGET = 0.96


def window_for_budget(budget: float, head_map: np.ndarray, n_tokens: int, n_sink: int,
                      global_layers: Sequence[bool] | None = None) -> int | None:
    """The window a budget buys over n_tokens for the policy itself (every retrieval head keeps every token,
    every local head n_sink + window; the rings' ubatch slack not counted), None when the retrieval heads
    alone exceed it. Only global layers count when global_layers is given (sliding-window layers keep theirs)."""
    hm = np.asarray(head_map).reshape(len(head_map), -1)
    rows = hm if global_layers is None else hm[np.asarray(global_layers, dtype=bool)]
    n_ret, n_all = int(rows.sum()), rows.size
    if n_all == n_ret:
        return None
    w = (budget * n_all * n_tokens - n_ret * n_tokens) / (n_all - n_ret) - n_sink
    return int(w) if w >= 1 else None


@dataclass(frozen=True)
class BudgetMeasurement:
    kv_budget: float | None  # the recommendation: the smallest budget meeting TOP1_TARGET, None if none did
    budgets: tuple[float, ...]  # the ladder, with for each: the window it buys, mean KLD and top-1 agreement
    windows: tuple[int, ...]
    kld: tuple[float, ...]
    top1: tuple[float, ...]
    n_tokens: int  # positions measured (the last quarter of each chunk, where every budget evicts)
    context: int  # tokens per chunk: the context the budgets are fractions of
    compensation: bool
    target_top1: float = TOP1_TARGET
    source: str = CALIBRATION_SOURCE


def measure_budgets(model, head_map: np.ndarray, chunks: list[list[int]], *, n_sink: int, compensation: bool,
                    budgets: Sequence[float] = BUDGET_LADDER, progress: Callable[[], None] | None = None
                    ) -> BudgetMeasurement:
    """Next-token KLD and top-1 agreement against the full model at each budget of the ladder (the whole model
    under the razor policy, the window each budget buys at the chunk length), over the last quarter of each
    chunk; the recommendation is the smallest budget whose top-1 agreement reaches TOP1_TARGET."""
    from .kld import kl_and_top1

    hp = model.hp
    head_map = np.asarray(head_map).reshape(hp.n_layer, -1)
    swa = swa_layers(hp)
    n_tok = min(len(t) for t in chunks)
    lo = n_tok - n_tok // 4
    windows = [window_for_budget(b, head_map, n_tok, n_sink, [not s for s in swa]) for b in budgets]
    keep = [(b, w) for b, w in zip(budgets, windows) if w is not None and n_sink + w < lo]
    kl = {b: [] for b, _ in keep}
    agree = {b: [] for b, _ in keep}
    for toks in chunks:
        full = model.forward(toks[:n_tok], want_logits="all", logits_from=lo).numpy()
        if progress:
            progress()
        for b, w in keep:
            attention = razor_policy(hp, head_map, n_sink, w, compensation)
            got = model.forward(toks[:n_tok], want_logits="all", attention=attention, logits_from=lo).numpy()
            d, t1 = kl_and_top1(full, got)
            kl[b].append(d)
            agree[b].append(t1)
            if progress:
                progress()
    kld = tuple(float(np.concatenate(kl[b]).mean()) for b, _ in keep)
    top1 = tuple(float(np.concatenate(agree[b]).mean()) for b, _ in keep)
    met = [b for (b, _), t in zip(keep, top1) if t >= TOP1_TARGET]
    return BudgetMeasurement(kv_budget=min(met) if met else None, budgets=tuple(b for b, _ in keep),
                             windows=tuple(w for _, w in keep), kld=kld, top1=top1,
                             n_tokens=len(chunks) * (n_tok - lo), context=n_tok, compensation=compensation)
