"""Distribution distance between two runs over the same tokens, as llama.cpp's perplexity tool reports
it (--kl-divergence): per position, KL(P_ref || P) of the next-token distributions and whether their
top-1 tokens agree."""

from __future__ import annotations

import numpy as np


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def kl_and_top1(ref_logits: np.ndarray, logits: np.ndarray, chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Per row: KL(softmax(ref) || softmax(logits)) in nats, and top-1 agreement (bool).
    Rows are processed in chunks so [n, n_vocab] float64 temporaries stay small."""
    if ref_logits.shape != logits.shape:
        raise ValueError(f"shape mismatch: {ref_logits.shape} vs {logits.shape}")
    kl = np.empty(len(ref_logits))
    top1 = np.empty(len(ref_logits), dtype=bool)
    for i in range(0, len(ref_logits), chunk):
        lp_ref = log_softmax(ref_logits[i:i + chunk])
        lp = log_softmax(logits[i:i + chunk])
        kl[i:i + chunk] = np.maximum((np.exp(lp_ref) * (lp_ref - lp)).sum(axis=-1), 0.0)  # clamp rounding below 0
        top1[i:i + chunk] = ref_logits[i:i + chunk].argmax(axis=-1) == logits[i:i + chunk].argmax(axis=-1)
    return kl, top1


def by_position(kl: np.ndarray, top1: np.ndarray, bin_size: int) -> list[dict]:
    """Means over consecutive bins of positions: [{start, end, kld_mean, top1_agreement}]."""
    out = []
    for s in range(0, len(kl), bin_size):
        e = min(s + bin_size, len(kl))
        out.append({"start": s, "end": e, "kld_mean": float(kl[s:e].mean()),
                    "top1_agreement": float(top1[s:e].mean())})
    return out
