"""Needle in a haystack (RULER's single-needle form): a sentence with a seven-digit "special magic number"
hidden at a chosen depth in natural English text; the model must repeat the number at the end.

The haystack is prose that ships with every Python: the docstrings of a fixed list of standard-library
modules and their public members, with code examples and option tables dropped. The text depends only
on the Python version (recorded in the results), never on the network.
"""

from __future__ import annotations

import importlib
import inspect
import itertools
import random
import re
from dataclasses import dataclass
from typing import Callable, Sequence

MODULES = ("collections", "json", "textwrap", "argparse", "pathlib", "subprocess", "threading", "logging",
           "functools", "itertools", "random", "statistics", "datetime", "calendar", "shutil", "tarfile",
           "zipfile", "csv", "email.message", "http.client", "urllib.request", "unittest", "tempfile",
           "heapq", "bisect", "decimal", "fractions", "string", "difflib", "pickle", "sqlite3", "socket",
           "typing", "asyncio", "enum", "dataclasses", "inspect", "contextlib", "copy", "gzip", "mailbox",
           "optparse", "pprint", "queue", "sched", "smtplib", "traceback", "configparser", "ftplib", "imaplib")
CITIES = ("Lyon", "Oslo", "Quito", "Hanoi", "Dakar", "Perth", "Lima", "Porto", "Turin", "Kyoto", "Bergen",
          "Tartu", "Cusco", "Malmo", "Split", "Ghent")
NEEDLE = "One of the special magic numbers for {city} is: {number}.\n"
QUESTION = ("\nWhat is the special magic number for {city} mentioned in the provided text?\n"
            "The special magic number for {city} mentioned in the provided text is")
INTRO = "Some special magic numbers are hidden within the following text. Make sure to memorize them.\n"


def _prose(doc: str) -> str:
    """Keep the paragraphs of a docstring that read as sentences (no doctest, code or tables)."""
    keep = []
    for para in re.split(r"\n\s*\n", doc):
        lines = para.splitlines()
        if not lines or any(l.startswith((" ", "\t", ">>>", "...")) or l.count("  ") > 1 for l in lines):
            continue
        text = " ".join(l.strip() for l in lines)
        if len(text) >= 40 and text[-1] in ".:" and sum(c.isalpha() for c in text) > 0.7 * len(text):
            keep.append(text)
    return "\n".join(keep)


def haystack_text(modules: Sequence[str] = MODULES) -> str:
    """The whole haystack: prose from the docstrings of `modules` (the evaluation's: MODULES), in a fixed order."""
    parts = []
    for name in modules:
        try:
            mod = importlib.import_module(name)
        except ImportError:  # e.g. a Python built without sqlite3
            continue
        docs = [inspect.getdoc(mod) or ""]
        for attr in sorted(getattr(mod, "__all__", None) or dir(mod)):
            if attr.startswith("_"):
                continue
            obj = getattr(mod, attr, None)
            if inspect.isclass(obj) or inspect.isfunction(obj):
                if getattr(obj, "__module__", None) == mod.__name__:
                    docs.append(inspect.getdoc(obj) or "")
        parts.extend(p for p in (_prose(d) for d in docs) if p)
    return "\n".join(parts) + "\n"


@dataclass(frozen=True)
class NeedlePrompt:
    text: str
    answer: str  # the magic number
    city: str
    depth: float  # 0 = needle first, 1 = needle last
    n_tokens: int


def _sentences(tokenize: Callable[[str], Sequence[int]], haystack: str, budget: int, n_tokens: int) -> list[str]:
    """Whole haystack sentences, in order, as many as fit `budget` tokens (a long context repeats the text)."""
    taken, n = [], 0
    for s in itertools.islice(itertools.cycle(re.findall(r"[^.!?\n]+[.!?]+\s*", haystack)), 20 * n_tokens):
        k = len(tokenize(s))
        if n + k > budget:
            break
        taken.append(s)
        n += k
    return taken


def make_prompt(tokenize: Callable[[str], Sequence[int]], haystack: str, n_tokens: int, depth: float,
                city: str, number: str) -> NeedlePrompt:
    """At most n_tokens tokens: the intro, whole haystack sentences with the needle after the sentence
    closest to `depth` of them, and the question."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError("depth must be in [0, 1]")
    needle = NEEDLE.format(city=city, number=number)
    question = QUESTION.format(city=city)
    taken = _sentences(tokenize, haystack, n_tokens - len(tokenize(INTRO + needle + question)), n_tokens)
    while True:
        at = round(len(taken) * depth)
        text = INTRO + "".join(taken[:at]) + needle + "".join(taken[at:]) + question
        count = len(tokenize(text))
        if count <= n_tokens or not taken:
            return NeedlePrompt(text, number, city, depth, count)
        taken.pop()  # token merges across sentence joins can add a few tokens


def make_trials(tokenize: Callable[[str], Sequence[int]], haystack: str, n_tokens: int, depths: Sequence[float],
                seed: int = 0) -> list[NeedlePrompt]:
    """One needle per depth, each with its own city and random seven-digit number (seeded)."""
    rng = random.Random(seed)
    out = []
    for i, d in enumerate(depths):
        city = CITIES[(seed + i) % len(CITIES)]
        out.append(make_prompt(tokenize, haystack, n_tokens, d, city, str(rng.randint(1_000_000, 9_999_999))))
    return out


def first_number(answer: str) -> str | None:
    m = re.search(r"\d+", answer.replace(",", ""))
    return m.group(0) if m else None


def is_correct(answer: str, number: str) -> bool:
    """Exact match: the first number in the answer is the needle's number."""
    return first_number(answer) == number


@dataclass(frozen=True)
class MultiNeedlePrompt:
    text: str
    answer: str  # the number of the city the question names
    city: str
    depth: float  # depth of the asked needle
    n_tokens: int
    needles: tuple[tuple[str, str, float], ...]  # (city, number, depth) of every needle, in text order


def make_multi_prompt(tokenize: Callable[[str], Sequence[int]], haystack: str, n_tokens: int,
                      needles: Sequence[tuple[str, str, float]], ask: int, *, needle: str = NEEDLE,
                      question: str = QUESTION, intro: str = INTRO) -> MultiNeedlePrompt:
    """RULER's multi-key form: several needles (city, number, depth) in one haystack, the question naming
    the city of needles[ask]; the other needles are distractors of the same shape. At most n_tokens tokens.
    needle/question/intro: other wordings (format fields {city}, {number}), e.g. for calibration probes that
    must not share the evaluation's."""
    if not 0 <= ask < len(needles) or len({c for c, _, _ in needles}) != len(needles):
        raise ValueError("needles need distinct cities and `ask` must index one of them")
    if any(not 0.0 <= d <= 1.0 for _, _, d in needles):
        raise ValueError("depths must be in [0, 1]")
    order = sorted(needles, key=lambda n: n[2])
    texts = [needle.format(city=c, number=x) for c, x, _ in order]
    city, number, depth = needles[ask]
    question = question.format(city=city)
    taken = _sentences(tokenize, haystack, n_tokens - len(tokenize(intro + "".join(texts) + question)), n_tokens)
    while True:
        parts, prev = [intro], 0
        for (_, _, d), t in zip(order, texts):
            at = round(len(taken) * d)
            parts += taken[prev:at] + [t]
            prev = at
        text = "".join(parts + taken[prev:] + [question])
        count = len(tokenize(text))
        if count <= n_tokens or not taken:
            return MultiNeedlePrompt(text, number, city, depth, count, tuple(order))
        taken.pop()


def multi_trial(tokenize: Callable[[str], Sequence[int]], haystack: str, n_tokens: int, n_needles: int,
                seed: int, **wording) -> MultiNeedlePrompt:
    """One multi-needle prompt from a seed: n_needles distinct cities with random seven-digit numbers at
    random depths, the question naming one of them at random (wording: make_multi_prompt's)."""
    rng = random.Random(seed)
    cities = rng.sample(CITIES, n_needles)
    needles = [(c, str(rng.randint(1_000_000, 9_999_999)), rng.random()) for c in cities]
    return make_multi_prompt(tokenize, haystack, n_tokens, needles, rng.randrange(n_needles), **wording)


def needle_choice(tokenize: Callable[[str], Sequence[int]], p: MultiNeedlePrompt, answer: str, *,
                  needle: str = NEEDLE) -> dict:
    """Which needle an answer to a multi-needle prompt names, for telling a distractor answered from a needle
    lost: `needle_pos` the token position where each needle starts (text order), `asked` the index of the one the
    question names, `named` the index of the one whose number the answer gives (None: no needle's). needle: the
    prompt's wording (make_multi_prompt's)."""
    numbers = [x for _, x, _ in p.needles]
    pos = [len(tokenize(p.text[:p.text.index(needle.format(city=c, number=x))])) for c, x, _ in p.needles]
    said = first_number(answer)
    return {"needle_pos": pos, "asked": numbers.index(p.answer),
            "named": numbers.index(said) if said in numbers else None}
