"""`razor-gguf eval`: task generators and scorers on known answers, then a short real run of each task on
SmolLM2 (small lengths) through the command line."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from razor_gguf import kld, niah, passkey


def _words(text: str) -> list[str]:
    return text.split()


def tokenize(text: str) -> list[int]:  # a stand-in tokenizer for the generators: one token per word
    return list(range(len(_words(text))))


# ----------------------------------------------------------------------------- generators, scorers


def test_passkey_prompt_places_the_key_at_its_depth():
    first = passkey.make_prompt(tokenize, 400, 0.0, "12345")
    last = passkey.make_prompt(tokenize, 400, 1.0, "12345")
    mid = passkey.make_prompt(tokenize, 400, 0.5, "12345")
    for p in (first, last, mid):
        assert p.n_tokens <= 400 and p.n_tokens > 350 and p.text.count("12345") == 2
        assert p.text.endswith(passkey.QUESTION)
    needle = passkey.NEEDLE.format(key="12345")
    assert first.text.index(needle) == len(passkey.INTRO)
    assert last.text.index(needle) + len(needle) == len(last.text) - len(passkey.QUESTION)
    frac = mid.text.index(needle) / len(mid.text)
    assert 0.4 < frac < 0.6
    assert passkey.is_correct(" 12345. Remember", "12345")
    assert not passkey.is_correct(" 123456", "12345") and not passkey.is_correct(" no idea", "12345")


def test_niah_haystack_is_deterministic_prose():
    text = niah.haystack_text()
    assert text == niah.haystack_text()
    assert len(_words(text)) > 10_000
    assert ">>>" not in text and "def " not in text


def test_niah_prompt_places_the_needle_and_fits():
    hay = niah.haystack_text()
    p0 = niah.make_prompt(tokenize, hay, 600, 0.0, "Lyon", "7654321")
    p1 = niah.make_prompt(tokenize, hay, 600, 1.0, "Lyon", "7654321")
    needle = niah.NEEDLE.format(city="Lyon", number="7654321")
    question = niah.QUESTION.format(city="Lyon")
    for p in (p0, p1):
        assert 550 < p.n_tokens <= 600 and p.text.count("7654321") == 1 and p.text.endswith(question)
    assert p0.text.index(needle) == len(niah.INTRO)
    assert p1.text.index(needle) + len(needle) == len(p1.text) - len(question)
    long = niah.make_prompt(tokenize, hay, 40_000, 0.5, "Oslo", "1111111")  # longer than the text: it repeats
    assert 39_000 < long.n_tokens <= 40_000
    trials = niah.make_trials(tokenize, hay, 300, [0.0, 0.5, 1.0], seed=3)
    assert trials == niah.make_trials(tokenize, hay, 300, [0.0, 0.5, 1.0], seed=3)
    assert len({t.answer for t in trials}) == 3 and all(len(t.answer) == 7 for t in trials)
    assert niah.is_correct(" 7654321.", "7654321") and niah.is_correct(" 7,654,321", "7654321")
    assert not niah.is_correct(" 76543210", "7654321") and not niah.is_correct(" Lyon", "7654321")


def test_kl_divergence_and_top1_known_values():
    ref = np.log(np.array([[0.5, 0.5], [0.9, 0.1], [0.2, 0.8]]))
    other = np.log(np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4]]))
    kl, top1 = kld.kl_and_top1(ref, other)
    expect0 = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    assert kl[0] == pytest.approx(expect0, rel=1e-9) and kl[1] == pytest.approx(0.0, abs=1e-12)
    assert top1.tolist() == [True, True, False]  # argmax ties resolve to the first index on both sides
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 50))
    kl_same, t_same = kld.kl_and_top1(x, x + 3.0)  # a constant shift leaves the softmax unchanged
    assert np.abs(kl_same).max() < 1e-9 and t_same.all()
    bins = kld.by_position(np.arange(10.0), np.array([True] * 5 + [False] * 5), 4)
    assert [(b["start"], b["end"]) for b in bins] == [(0, 4), (4, 8), (8, 10)]
    assert bins[1]["kld_mean"] == 5.5 and bins[1]["top1_agreement"] == 0.25


# ----------------------------------------------------------------------------- real runs on SmolLM2

SMALL = ["--ctx", "512", "--depths", "0,1", "--ratios", "0.15", "--window", "64", "--n-ubatch", "64", "--no-progress"]


def _eval(model, *args, check=True):
    r = subprocess.run([sys.executable, "-m", "razor_gguf", "eval", str(model), *args], capture_output=True,
                       text=True, timeout=900)
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def _by_mode(res):
    return {(r["mode"], r["retrieval_ratio"]): r for r in res["runs"]}


@pytest.mark.parametrize("task", ["passkey", "niah"])
def test_retrieval_task_short_run(smollm2_razor, task, tmp_path):
    png = tmp_path / f"{task}.png"
    res = json.loads(_eval(smollm2_razor[0], "--task", task, *SMALL, "--json", "--plot", str(png)).stdout)
    assert res["task"] == task and res["model"] == "smollm2-razor.gguf"
    runs = _by_mode(res)
    assert set(runs) == {("full", None), ("razor", 0.15), ("streaming", 0.0)}
    full, razor, stream = runs[("full", None)], runs[("razor", 0.15)], runs[("streaming", 0.0)]
    for r in (full, razor, stream):
        assert r["supported"] and r["ctx"] >= 512 and r["trials"] == 2 and len(r["cells"]) == 2
        assert 0.0 <= r["accuracy"] <= 1.0 and r["accuracy"] == r["correct"] / 2
        assert {c["depth"] for c in r["cells"]} == {0.0, 1.0} and all(c["n_tokens"] <= 512 for c in r["cells"])
    assert full["accuracy"] == 1.0  # the full cache finds a needle in 512 tokens
    assert full["kv_bytes"] == full["kv_bytes_full_equiv"] and razor["kv_bytes"] < full["kv_bytes"]
    # razor runs the model's measured compensation default (embed-heads), StreamingLLM never has the row
    assert stream["kv_bytes"] <= razor["kv_bytes"] and stream["compensation"] is False
    assert razor["compensation"] is smollm2_razor[1]["compensation"]
    assert stream["window"] > razor["window"] == 64 and stream["retrieval_heads"] == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_kld_short_run(smollm2_razor, tmp_path):
    png = tmp_path / "kld.png"
    res = json.loads(_eval(smollm2_razor[0], "--task", "kld", *SMALL, "--json", "--plot", str(png)).stdout)
    runs = _by_mode(res)
    full, razor, stream = runs[("full", None)], runs[("razor", 0.15)], runs[("streaming", 0.0)]
    assert full["kld_mean"] == 0.0 and full["top1_agreement"] == 1.0
    for r in (razor, stream):
        assert r["kld_mean"] > 0 and 0.0 < r["top1_agreement"] <= 1.0 and r["trials"] == 1
        assert [b["start"] for b in r["by_position"]] == [0, 256]
        # until sinks + window fill up nothing is evicted: the same distributions up to float rounding
        assert r["kld_mean_within_window"] < 1e-3 and r["top1_agreement_within_window"] >= 0.98
        assert r["kld_mean_past_window"] > r["kld_mean_within_window"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = _eval(smollm2_razor[0], "--task", "kld", *SMALL, "--modes", "full,razor").stdout
    assert "mean KLD" in table and "razor 15%" in table


@pytest.mark.parametrize("args, message", [
    (["/nonexistent.gguf", "--task", "passkey"], "no such file"),
    (["MODEL", "--task", "passkey", "--depths", "0,2"], "--depths values must be in [0.0, 1.0]"),
    (["MODEL", "--task", "passkey", "--modes", "full,magic"], "--modes takes full, razor, streaming"),
    (["MODEL", "--task", "kld", "--modes", "razor"], "keep `full` in --modes"),
    (["MODEL", "--task", "niah", "--ctx", "10"], "at least 64 tokens"),
    (["MODEL", "--task", "niah", "--plot", "/nonexistent/dir/x.png"], "no such directory"),
])
def test_eval_bad_input_is_one_line_exit_2(smollm2_path, args, message):
    args = [smollm2_path if a == "MODEL" else a for a in args]
    r = subprocess.run([sys.executable, "-m", "razor_gguf", "eval", *args], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
