"""What the reference-pass experiments in tools/ open first: a razor GGUF's tokenizer, its ReferenceModel and the
head map embed-heads stored in it."""

from __future__ import annotations

import pathlib
import sys
from dataclasses import dataclass
from typing import Callable

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))


@dataclass
class ReferenceSession:
    tokenize: Callable[..., list[int]]  # tokenize(text, bos=True)
    model: object  # razor_gguf.reference.ReferenceModel
    stored: np.ndarray  # the stored head map [n_layer, n_head_kv], 1 = retrieval head
    close: Callable[[], None]


def open_session(path: str, error: Callable[[str], None]) -> ReferenceSession:
    """`error` (argparse's ap.error) is called with a one-line reason when the model has no head map."""
    from razor_gguf import Llama
    from razor_gguf.metadata import open_gguf, read_razor
    from razor_gguf.reference import ReferenceModel

    meta = read_razor(open_gguf(path))
    if not meta:
        error(f"{path}: no razor.head_map (run razor-gguf embed-heads first)")
    tok = Llama(model_path=path, vocab_only=True, verbose=False)
    model = ReferenceModel(path)
    hp = model.hp
    stored = np.asarray(meta["head_map"], dtype=np.int32).reshape(hp.n_layer, hp.n_head_kv)
    return ReferenceSession(lambda s, bos=True: list(tok.tokenize(s.encode(), add_bos=bos)), model, stored, tok.close)


def first_wrong(model, prompt: list[int], ans: list[int], attention) -> int | None:
    """The answer teacher-forced after the prompt under `attention` (None: the full model): the index of the first
    answer token that is not the argmax, None when all are."""
    logits = model.forward(prompt + ans[:-1], want_logits="all", logits_from=len(prompt) - 1, attention=attention)
    wrong = np.flatnonzero(logits.numpy().argmax(-1) != np.asarray(ans))
    return int(wrong[0]) if wrong.size else None
