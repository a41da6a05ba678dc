"""razor_gguf.Llama is a drop-in llama_cpp.Llama: stock without a head map, the razor cache with one,
razor options through kv_overrides, razor_stats(), and multi-turn prefix reuse equal to a fresh evaluation."""

import numpy as np
import pytest

from razor_gguf import Llama  # first: it binds llama_cpp to the patched libraries
from razor_gguf.llama import RazorUnavailableError

import llama_cpp  # noqa: E402

SYSTEM = "You are a helpful assistant."


def test_is_a_llama_cpp_llama():
    assert issubclass(Llama, llama_cpp.Llama)


def test_greedy_completion_matches_unpatched_golden(smollm2_path, golden_smollm2, golden_recipe):
    """A GGUF without a head map runs the stock cache: bitwise the unpatched build's tokens and logits."""
    assert golden_smollm2["request"] == golden_recipe.REQUEST
    got = golden_recipe.greedy_completion(Llama, smollm2_path, golden_smollm2["request"])
    assert len(got["tokens"]) == golden_smollm2["request"]["max_tokens"]
    assert got == {k: golden_smollm2[k] for k in got}


def test_create_completion_api(smollm2_path, golden_smollm2):
    req = golden_smollm2["request"]
    llm = Llama(model_path=smollm2_path, n_ctx=req["n_ctx"], verbose=False)
    out = llm.create_completion(req["prompt"], max_tokens=8, temperature=0.0)
    assert golden_smollm2["text"].startswith(out["choices"][0]["text"])
    chunks = list(llm.create_completion(req["prompt"], max_tokens=8, temperature=0.0, stream=True))
    assert "".join(c["choices"][0]["text"] for c in chunks) == out["choices"][0]["text"]


def test_vocab_only_tokenizer(smollm2_razor, capfd):
    """llama-cpp-python's tokenizer-only load: no context memory, so nothing about razor to check or say
    (llama.cpp's own n_ctx_train warning for a vocab-only model is the stock binding's, not ours)."""
    capfd.readouterr()
    tok = Llama(model_path=str(smollm2_razor[0]), vocab_only=True, verbose=False)
    try:
        ids = tok.tokenize(b"The capital of France", add_bos=False)
        assert ids and tok.detokenize(ids) == b"The capital of France"
        assert not [l for l in _stderr_lines(capfd) if "razor" in l]
    finally:
        tok.close()


def _stderr_lines(capfd) -> list[str]:
    return [l for l in capfd.readouterr().err.splitlines() if l.strip()]


def test_model_without_head_map_runs_full_cache_with_one_line_notice(smollm2_path, capfd):
    capfd.readouterr()
    llm = Llama(model_path=smollm2_path, n_ctx=1024, verbose=False)
    lines = _stderr_lines(capfd)
    assert len(lines) == 1, lines
    assert "no razor head map" in lines[0] and "razor-gguf embed-heads" in lines[0]
    st = llm.razor_stats()
    assert st["razor"] is False and st["saving"] == 0.0 and st["kv_bytes"] == st["full_equiv_bytes"] > 0
    llm.close()

    Llama(model_path=smollm2_path, n_ctx=1024, verbose=False, razor=False).close()  # asked for: no notice
    assert _stderr_lines(capfd) == []
    with pytest.raises(RazorUnavailableError, match="no razor head map"):
        Llama(model_path=smollm2_path, n_ctx=1024, verbose=False, razor=True)


def test_razor_options_and_stats(smollm2_razor, capfd):
    path = str(smollm2_razor[0])
    capfd.readouterr()
    llm = Llama(model_path=path, n_ctx=4096, n_batch=256, verbose=False, window=512)
    st = llm.razor_stats()
    assert _stderr_lines(capfd) == []  # razor runs: nothing to say
    assert st["razor"] and (st["n_sink"], st["window"]) == (4, 512)
    assert (st["retrieval_heads"], st["kv_heads"]) == (smollm2_razor[1]["retrieval_count"], 90)
    assert st["kv_bytes"] == st["retrieval_bytes"] + st["local_bytes"] + st["compensation_bytes"]
    assert st["saving"] == pytest.approx(1 - st["kv_bytes"] / st["full_equiv_bytes"]) and st["saving"] > 0.4
    llm.close()

    llm = Llama(model_path=path, n_ctx=4096, n_batch=256, verbose=False, n_sink=8, window=128,
                retrieval_ratio=0.25, compensation=False)
    st2 = llm.razor_stats()
    assert (st2["n_sink"], st2["window"]) == (8, 128)
    assert st2["retrieval_heads"] == 23  # ceil(0.24 * 90) induction + ceil(0.01 * 90) echo heads
    assert st2["compensation_bytes"] >= 0 and st2["local_bytes"] < st["local_bytes"]
    llm.close()

    off = Llama(model_path=path, n_ctx=4096, n_batch=256, verbose=False, razor=False)
    assert off.razor_stats()["razor"] is False and off.razor_stats()["kv_bytes"] == st["full_equiv_bytes"]
    off.close()
    assert _stderr_lines(capfd) == []

    with pytest.raises(ValueError, match="contradict kv_overrides"):
        Llama(model_path=path, window=64, kv_overrides={"razor.window": 32})
    with pytest.raises(ValueError, match="window must be >= 1"):
        Llama(model_path=path, window=0)


def test_fallback_to_full_cache_says_why(smollm2_razor, capfd):
    """A context too small for the local ring runs the stock cache: one line with llama.cpp's reason."""
    path = str(smollm2_razor[0])
    capfd.readouterr()
    # with the compensation row: ring pad256(4 + 512 + 2 x 128) = 1024 cells > 768 (without: 768 cells, it runs)
    llm = Llama(model_path=path, n_ctx=768, verbose=False, compensation=True, window=512)
    lines = _stderr_lines(capfd)
    assert len(lines) == 1 and "running the full KV cache" in lines[0] and "larger than the context" in lines[0], lines
    assert llm.razor_stats()["razor"] is False
    llm.close()
    with pytest.raises(RazorUnavailableError, match="larger than the context"):
        Llama(model_path=path, n_ctx=768, verbose=False, razor=True, compensation=True, window=512)
    llm = Llama(model_path=path, n_ctx=768, verbose=False, razor=True, compensation=False, window=512)
    assert llm.razor_stats()["razor"] and llm.razor_stats()["window"] == 512
    llm.close()


# ------------------------------------------------------------------------------ multi-turn reuse

TURNS = [  # each user turn is ~100 tokens, longer than the 64-token window below
    "Tell me about the city of Lyon in France: its silk industry, its food, its two rivers and its old "
    "town. I am planning a trip next spring with my family and want to know what to see first. " * 2,
    "Now compare it with Marseille: the old port, the football club, the beaches, the markets and the "
    "weather in the summer months, and tell me which one is easier to reach by train from Paris. " * 2,
    "Which of the two would you recommend for a family with two small children who like parks, "
    "museums and boats, and how many days should we stay in each city to see the main sights? " * 2,
]


class RecordingLlama(Llama):
    """Logs every eval(): (first position, number of tokens). The log shows which prompt prefix the
    binding reused and lets a fresh context replay the very same ubatch boundaries."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.evals: list[tuple[int, int]] = []

    def eval(self, tokens):
        self.evals.append((self.n_tokens, len(tokens)))
        super().eval(tokens)


def _surviving_chunks(evals: list[tuple[int, int]], n_tokens: int) -> list[tuple[int, int]]:
    """The eval calls whose tokens are still in the cache (a later eval at position p replaced [p, ...))."""
    chunks: list[tuple[int, int]] = []
    for start, n in evals:
        chunks = [(s, min(c, start - s)) for s, c in chunks if s < start]
        chunks.append((start, n))
    assert sum(c for _, c in chunks) == n_tokens
    return chunks


def _fresh_replay(path, kw, tokens, chunks) -> np.ndarray:
    llm = Llama(model_path=path, **kw)
    for s, c in chunks:
        llm.eval(tokens[s:s + c])
    out = np.array(llm.scores[:llm.n_tokens])
    llm.close()
    return out


@pytest.mark.parametrize("razor", [True, False], ids=["razor", "full"])
def test_multi_turn_prefix_reuse_equals_fresh_evaluation(smollm2_razor, razor):
    """Three chat turns, each longer than the window, on one Llama (the binding reuses the cached prefix
    and drops the unused tail): after every turn, every logit of the cached tokens is bitwise that of a
    fresh context evaluating the same tokens. The fresh context replays the same eval boundaries, since
    llama.cpp's own kernels are not batch-invariant on this quantized model (stock cache too)."""
    path = str(smollm2_razor[0])
    kw = dict(n_ctx=2048, n_batch=128, verbose=False, logits_all=True, window=64, razor=razor, seed=0)
    llm = RecordingLlama(model_path=path, **kw)
    assert llm.razor_stats()["razor"] is razor
    messages = [{"role": "system", "content": SYSTEM}]
    for turn, text in enumerate(TURNS):
        messages.append({"role": "user", "content": text})
        reply = llm.create_chat_completion(messages, max_tokens=32, temperature=0.0)["choices"][0]["message"]["content"]
        messages.append({"role": "assistant", "content": reply})
        n = llm.n_tokens
        assert n > 4 + 64 + 64 * (turn + 1)  # well past the window: most of the history is folded
        tokens = list(llm.input_ids[:n])
        ours = np.array(llm.scores[:n])
        fresh = _fresh_replay(path, kw, tokens, _surviving_chunks(llm.evals, n))
        assert np.array_equal(ours, fresh), f"turn {turn}: max |diff| {np.abs(ours - fresh).max()}"
    starts = [s for s, _ in llm.evals]
    assert sorted(set(starts)) != [0] and all(s > 0 for s in starts[1:]), "no prefix was reused"
    llm.close()


def test_edited_history_is_reevaluated_and_matches_fresh(smollm2_razor):
    """Changing an early message leaves a prefix that reaches into tokens already folded into the
    compensation row: the razor cache refuses the removal, the binding evaluates the prompt afresh, and
    the reply is token for token that of a brand-new Llama."""
    path = str(smollm2_razor[0])
    kw = dict(n_ctx=2048, n_batch=128, verbose=False, window=64, razor=True, seed=0)
    llm = RecordingLlama(model_path=path, **kw)
    messages = [{"role": "system", "content": SYSTEM}]
    for text in TURNS[:2]:
        messages.append({"role": "user", "content": text})
        reply = llm.create_chat_completion(messages, max_tokens=32, temperature=0.0)["choices"][0]["message"]["content"]
        messages.append({"role": "assistant", "content": reply})
    messages[1] = {"role": "user", "content": TURNS[0].replace("Lyon", "Bordeaux")}
    llm.evals.clear()
    ours = llm.create_chat_completion(messages, max_tokens=32, temperature=0.0)["choices"][0]["message"]["content"]
    assert llm.evals[0][0] == 0, "expected a full re-evaluation"
    fresh_llm = Llama(model_path=path, **kw)
    fresh = fresh_llm.create_chat_completion(messages, max_tokens=32, temperature=0.0)["choices"][0]["message"]["content"]
    fresh_llm.close()
    llm.close()
    assert ours == fresh
