"""One KV budget (razor.kv_budget / razor.kv_budget_bytes): each context gets the largest window whose whole
allocated cache fits the budget, retrieval heads keeping every token; a budget below the smallest razor cache
is one error naming the smallest; and the local ring's slack (one ubatch of new tokens plus a scratch row per
query) no longer costs more than the window it serves. On SmolLM2 with its embedded head map."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from razor_gguf import Llama  # first: binds llama_cpp to the patched libraries

HEAD_DIM = 64  # SmolLM2-135M
F16 = 2


def _stats(path, n_ctx, **kw):
    llm = Llama(model_path=str(path), n_ctx=n_ctx, verbose=False, **kw)
    try:
        return llm.razor_stats()
    finally:
        llm.close()


def _ring_rows(st) -> int:
    """Cells per stream of the local ring, from its allocated bytes (f16 K and V rows of every local head)."""
    n_local = st["kv_heads"] - st["retrieval_heads"]
    row = n_local * HEAD_DIM * F16 * 2
    return round(st["local_bytes"] / row)


@pytest.mark.parametrize("n_ctx,budget", [(2048, 0.5), (4096, 0.25), (4096, 0.35), (8192, 0.35), (8192, 0.5)])
def test_budget_buys_the_largest_window_that_fits(smollm2_razor, n_ctx, budget):
    st = _stats(smollm2_razor[0], n_ctx, kv_budget=budget)
    assert st["razor"] and st["kv_budget"] == budget
    # the budget counts allocated bytes: everything razor allocates, the compensation sums included
    assert st["kv_bytes"] <= budget * st["full_equiv_bytes"]
    assert st["kv_fraction"] == pytest.approx(st["kv_bytes"] / st["full_equiv_bytes"])
    # and it is the largest that fits: one more 256-cell step of the local ring would not
    step = 256 * (st["kv_heads"] - st["retrieval_heads"]) * HEAD_DIM * F16 * 2
    assert st["kv_bytes"] + step > budget * st["full_equiv_bytes"]
    # the same window given explicitly allocates the same cache
    same = _stats(smollm2_razor[0], n_ctx, window=st["window"])
    assert same["kv_bytes"] <= st["kv_bytes"]


def test_budget_in_mib(smollm2_razor):
    st = _stats(smollm2_razor[0], 4096, kv_budget="40MiB")
    assert st["razor"] and st["kv_bytes"] <= 40 * 2**20
    assert st["window"] > 512  # 40 of the 90 MiB full cache buys more than the default window


def test_budget_of_a_quantized_cache(smollm2_razor):
    """With type_k = type_v = q8_0 a fractional budget is of the full cache in q8_0 (what the same context would
    otherwise allocate), so the same fraction buys about the same window; a size buys a longer window than it
    does in f16 (what tools/evidence.py's +q8_0 methods use)."""
    q8 = dict(type_k=8, type_v=8, flash_attn=True)
    st16 = _stats(smollm2_razor[0], 4096, kv_budget=0.35)
    st8 = _stats(smollm2_razor[0], 4096, kv_budget=0.35, **q8)
    assert st8["full_equiv_bytes"] == st16["full_equiv_bytes"] * 34 // 64
    assert st8["kv_bytes"] <= 0.35 * st8["full_equiv_bytes"] and abs(st8["window"] - st16["window"]) <= 256
    mib = st16["kv_bytes"] / 2**20
    by_size = _stats(smollm2_razor[0], 4096, kv_budget=f"{mib:.3f}MiB", **q8)
    assert by_size["kv_bytes"] <= st16["kv_bytes"] and by_size["window"] > 2 * st16["window"]


def test_budget_below_the_smallest_names_it(smollm2_razor):
    with pytest.raises(ValueError, match=r"below the smallest razor cache for n_ctx = 4096") as e:
        _stats(smollm2_razor[0], 4096, kv_budget=0.15)
    msg = str(e.value)
    assert "\n" not in msg and "the retrieval heads alone take 0.156" in msg
    smallest = float(re.search(r"for n_ctx = 4096: ([0-9.]+) ", msg).group(1))
    st = _stats(smollm2_razor[0], 4096, kv_budget=smallest + 0.001)  # the named budget is enough
    assert st["razor"] and st["kv_fraction"] <= smallest + 0.001


def test_budget_covering_the_full_cache_runs_the_stock_cache(smollm2_razor):
    st = _stats(smollm2_razor[0], 2048, kv_budget=1.0)
    assert not st["razor"] and st["kv_bytes"] == st["full_equiv_bytes"]


def test_budget_and_window_together_are_refused(smollm2_razor):
    with pytest.raises(ValueError, match="cannot both be set"):
        _stats(smollm2_razor[0], 4096, kv_budget=0.35, window=100)
    with pytest.raises(ValueError, match="razor.window and razor.kv_budget given together"):
        _stats(smollm2_razor[0], 4096, kv_overrides={"razor.kv_budget": 0.35, "razor.window": 100})
    with pytest.raises(ValueError, match="fraction of the full cache in"):
        _stats(smollm2_razor[0], 4096, kv_budget="2")


@pytest.mark.parametrize("n_ctx", [4096, 8192])
def test_ring_slack_costs_no_more_than_the_window(smollm2_razor, n_ctx):
    """A 512-token window at llama-cpp-python's default n_ubatch (512): the ring used to hold
    S + W + 2 x 512 rows (0.525 of the full cache at 4k); its slack is now at most the window."""
    st = _stats(smollm2_razor[0], n_ctx, n_batch=512, n_ubatch=512, window=512)
    assert st["razor"] and st["window"] == 512
    slack = _ring_rows(st) - (st["n_sink"] + st["window"])
    assert 0 < slack <= st["window"], slack
    assert st["kv_fraction"] < {4096: 0.40, 8192: 0.27}[n_ctx]


def test_bench_kv_budget(smollm2_razor):
    r = subprocess.run([sys.executable, "-m", "razor_gguf", "bench", str(smollm2_razor[0]), "--ctx", "4096",
                        "--kv-only", "--modes", "full,razor", "--kv-budget", "0.35", "--json"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout)
    (q,) = res["ratios"]
    assert q["kv_fraction"] <= 0.35 and res["settings"]["razor_overrides"] == {"razor.kv_budget": 0.35}
    r = subprocess.run([sys.executable, "-m", "razor_gguf", "bench", str(smollm2_razor[0]), "--ctx", "4096",
                        "--kv-only", "--modes", "razor", "--kv-budget", "0.1"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("razor-gguf: error: razor at --ctx 4096: kv_budget 0.100")
