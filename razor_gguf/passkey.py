"""The passkey retrieval task (Mohtashami & Jaggi 2023, as used by RazorAttention and LongLoRA): a
five-digit key hidden at a chosen depth in repeated filler; the model must repeat it at the end."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Callable, Sequence

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the important information there.\n")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n"
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key.\n"
QUESTION = "What is the pass key? The pass key is"


@dataclass(frozen=True)
class PasskeyPrompt:
    text: str
    key: str
    depth: float  # where the needle sits, 0 = start of the filler, 1 = end
    n_tokens: int


def make_prompt(tokenize: Callable[[str], Sequence[int]], n_tokens: int, depth: float, key: str) -> PasskeyPrompt:
    """The longest prompt of whole filler lines that stays within n_tokens tokens, needle at `depth`."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError("depth must be in [0, 1]")
    fixed = len(tokenize(INTRO + NEEDLE.format(key=key) + QUESTION))
    per_line = len(tokenize(FILLER * 10)) / 10
    n_lines = max(1, int((n_tokens - fixed) / per_line))
    while True:
        before = round(n_lines * depth)
        text = INTRO + FILLER * before + NEEDLE.format(key=key) + FILLER * (n_lines - before) + QUESTION
        n = len(tokenize(text))
        if n <= n_tokens or n_lines == 1:
            return PasskeyPrompt(text, key, depth, n)
        n_lines -= 1


def make_trials(tokenize: Callable[[str], Sequence[int]], n_tokens: int, n_trials: int, seed: int = 0) -> list[PasskeyPrompt]:
    """n_trials prompts with random keys at depths spread evenly over [0, 1]."""
    rng = random.Random(seed)
    depths = [i / max(1, n_trials - 1) for i in range(n_trials)]
    return [make_prompt(tokenize, n_tokens, d, str(rng.randint(10000, 99999))) for d in depths]


def is_correct(answer: str, key: str) -> bool:
    """The first number in the answer is the key."""
    m = re.search(r"\d+", answer)
    return m is not None and m.group(0) == key
