"""The passkey prompt generator and scorer (known answers, no model)."""

import pytest

from razor_gguf import passkey


def _words(s):
    return s.split()  # a stand-in tokenizer: one token per word


def test_prompt_fits_and_places_needle():
    p = passkey.make_prompt(_words, 500, 0.5, "12345")
    assert p.n_tokens <= 500 and p.n_tokens > 450
    assert p.text.startswith(passkey.INTRO) and p.text.endswith(passkey.QUESTION)
    needle = passkey.NEEDLE.format(key="12345")
    assert p.text.count(needle) == 1
    before, after = p.text.split(needle)
    n_before, n_after = before.count(passkey.FILLER), after.count(passkey.FILLER)
    assert abs(n_before - n_after) <= 1


@pytest.mark.parametrize("depth, first", [(0.0, True), (1.0, False)])
def test_depth_extremes(depth, first):
    p = passkey.make_prompt(_words, 300, depth, "55555")
    needle_at = p.text.index("55555")
    filler_at = p.text.index(passkey.FILLER)
    assert (needle_at < filler_at) == first


def test_trials_deterministic_and_spread():
    a = passkey.make_trials(_words, 400, 5, seed=3)
    b = passkey.make_trials(_words, 400, 5, seed=3)
    assert [t.key for t in a] == [t.key for t in b]
    assert [t.depth for t in a] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert all(len(t.key) == 5 for t in a)
    with pytest.raises(ValueError):
        passkey.make_prompt(_words, 400, 1.5, "11111")


@pytest.mark.parametrize("answer, ok", [(" 12345.", True), ("12345 is it", True), (" 1234", False),
                                        (" the key is 12345", True), (" a magical item", False), (" 123456", False)])
def test_is_correct(answer, ok):
    assert passkey.is_correct(answer, "12345") is ok
