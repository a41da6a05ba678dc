"""tools/evidence.py and what it stands on: Wilson intervals and the block bootstrap on known values, the
multi-needle prompts, then a short real run on SmolLM2 that checks the cells, the resume and the report."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from razor_gguf import niah
from razor_gguf.intervals import block_means, bootstrap_ratio, sign_test, wilson

TOOL = pathlib.Path(__file__).parents[1] / "tools" / "evidence.py"


def _load_tool():
    import importlib.util

    spec = importlib.util.spec_from_file_location("evidence_tool", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def tokenize(text: str) -> list[int]:  # one token per word
    return list(range(len(text.split())))


def test_wilson_known_values():
    # Wilson (1927) at z = 1.96; e.g. Newcombe (1998), table I: 0/20 -> [0, 0.161], 10/20 -> [0.299, 0.701]
    assert wilson(0, 20) == pytest.approx((0.0, 0.1611), abs=1e-4)
    assert wilson(20, 20) == pytest.approx((0.8389, 1.0), abs=1e-4)
    assert wilson(10, 20) == pytest.approx((0.2993, 0.7007), abs=1e-4)
    assert wilson(15, 20) == pytest.approx((0.5313, 0.8881), abs=1e-4)
    assert wilson(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson(3, 2)


def test_sign_test_known_values():
    # 7 vs 0 discordant: 2 / 2**7; 5 vs 0: 2 / 2**5; an even split is no evidence
    assert sign_test(7, 0) == pytest.approx(0.015625)
    assert sign_test(0, 5) == pytest.approx(0.0625)
    assert sign_test(3, 3) == 1.0 and sign_test(0, 0) == 1.0
    assert sign_test(1, 2) == 1.0  # 2 * (1 + 3) / 8


def test_block_bootstrap():
    v = np.arange(10, dtype=float)
    assert block_means(v, 4).tolist() == [1.5, 5.5, 8.5]
    rng = np.random.default_rng(1)
    x = rng.normal(1.0, 0.5, 400)
    lo, hi = bootstrap_ratio(block_means(x, 10), weights=np.full(40, 10.0))
    assert lo < x.mean() < hi and hi - lo < 0.4
    # a paired ratio of a series with itself is exactly 1 in every resample
    b = block_means(x, 10)
    assert bootstrap_ratio(b, b) == pytest.approx((1.0, 1.0))


def test_multi_needle_prompt():
    hay = niah.haystack_text()
    p = niah.multi_trial(tokenize, hay, 3000, 4, seed=5)
    assert p.n_tokens <= 3000 and p.n_tokens > 2800
    assert len(p.needles) == 4 and [d for _, _, d in p.needles] == sorted(d for _, _, d in p.needles)
    positions = [p.text.index(niah.NEEDLE.format(city=c, number=x)) for c, x, _ in p.needles]
    assert positions == sorted(positions)
    assert p.text.endswith(niah.QUESTION.format(city=p.city))
    assert (p.city, p.answer, p.depth) in p.needles
    # each needle at its depth of the haystack
    for (c, x, d), at in zip(p.needles, positions):
        assert abs(at / len(p.text) - d) < 0.05
    assert niah.multi_trial(tokenize, hay, 3000, 4, seed=5) == p
    assert niah.multi_trial(tokenize, hay, 3000, 4, seed=6) != p
    with pytest.raises(ValueError):
        niah.make_multi_prompt(tokenize, hay, 500, [("Oslo", "1", 0.1), ("Oslo", "2", 0.2)], 0)
    # another wording (calibration probes that share no sentence with the evaluation): same needles, other text
    w = dict(needle="The code of {city} is {number}.\n", question="\nThe code of {city} is", intro="Codes.\n")
    q = niah.multi_trial(tokenize, hay, 3000, 4, seed=5, **w)
    assert q.needles == p.needles and q.answer == p.answer and q.n_tokens <= 3000
    assert q.text.startswith("Codes.\n") and q.text.endswith(f"\nThe code of {q.city} is")
    assert all(f"The code of {c} is {x}." in q.text for c, x, _ in q.needles) and "magic" not in q.text


def _run(*args, timeout=900, tool=TOOL):
    return subprocess.run([sys.executable, str(tool), *args], capture_output=True, text=True, timeout=timeout)


def _run_json(script: str, tmp_path, *args) -> dict:
    """tools/<script> with args and --json: exit status 0, the JSON it wrote."""
    out = tmp_path / f"{script}.json"
    r = _run(*args, "--json", str(out), timeout=600, tool=TOOL.parent / script)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(out.read_text())


def test_evidence_short_run_resumes(smollm2_razor, tmp_path):
    """The machinery at a small size: every cell of the plan lands in the JSON with its interval and wall
    time; a second run does nothing; asking for one prompt more runs only that prompt per cell."""
    model = str(smollm2_razor[0])
    out = tmp_path / "ev.json"
    base = ["run", model, "--out", str(out), "--ctx", "512", "--budget", "0.6", "--no-progress"]
    r = _run(*base, "--plan", "targets,kld", "--n", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    cells = json.loads(out.read_text())["cells"]
    keys = {f"{t}/512/{m}" + ("" if m == "full" else "/0.6") for t in ("passkey", "mniah")
            for m in ("full", "razor", "streaming")}
    keys |= {f"kld/512/{m}/0.6" for m in ("razor", "razor_paper", "streaming")}
    assert set(cells) == keys
    for k, c in cells.items():
        assert c["supported"], (k, c)
        assert c["wall_seconds"] > 0 and c["machines"]
        if c["task"] == "kld":
            assert 0 < c["kld_mean"] and c["kld95"][0] <= c["kld_mean"] <= c["kld95"][1]
            assert len(c["block_kld"]) == len(c["block_weights"]) and sum(c["block_weights"]) == c["n_positions"]
        else:
            assert c["n"] == 2 and [p["i"] for p in c["prompts"]] == [0, 1]
            lo, hi = c["wilson95"]
            assert lo <= c["accuracy"] <= hi and c["correct"] == sum(p["correct"] for p in c["prompts"])
            if c["method"] != "full":
                assert c["kv_fraction"] <= 0.6 and c["window"] > 0
    full = cells["passkey/512/full"]
    assert full["correct"] == 2  # the full cache finds a passkey in 512 tokens
    for p in (p for k, c in cells.items() if k.startswith("mniah") for p in c["prompts"]):
        # which needle the answer names, and where each starts, in text order
        assert len(p["needle_pos"]) == 4 and p["needle_pos"] == sorted(p["needle_pos"]) and p["needle_pos"][-1] < 512
        assert (p["named"] == p["asked"]) == p["correct"] and p["named"] in (None, 0, 1, 2, 3)
    # the same prompts for every method
    assert [p["expected"] for p in cells["mniah/512/razor/0.6"]["prompts"]] == \
        [p["expected"] for p in cells["mniah/512/full"]["prompts"]]

    before = out.read_text()
    r = _run(*base, "--plan", "targets,kld", "--n", "2")
    assert r.returncode == 0 and out.read_text() == before and "evidence:" not in r.stderr

    r = _run(*base, "--plan", "targets", "--n", "3")
    assert r.returncode == 0, r.stderr[-2000:]
    cells2 = json.loads(out.read_text())["cells"]
    for k in keys:
        if not k.startswith("kld"):
            assert [p["i"] for p in cells2[k]["prompts"]] == [0, 1, 2]
            assert cells2[k]["prompts"][:2] == cells[k]["prompts"]

    # --task / --method: only those cells of the plans (one sitting can take a few)
    r = _run(*base, "--plan", "targets", "--n", "4", "--task", "passkey", "--method", "razor")
    assert r.returncode == 0, r.stderr[-2000:]
    cells3 = json.loads(out.read_text())["cells"]
    grown = {k for k in keys if cells3[k].get("n") == 4}
    assert grown == {"passkey/512/razor/0.6"}
    r = _run(*base, "--plan", "targets", "--method", "razor_pins_rx")
    assert r.returncode == 2 and "unknown method 'razor_pins_rx'" in r.stderr

    # the file belongs to the weights: one of another GGUF file with them (embed-heads run again on another
    # machine) goes on where a cell's cache is the one it recorded, not where it differs or was not recorded
    store = json.loads(out.read_text())
    assert len(store["weights_sha256"]) == 64 and all(len(c["cache_sha256"]) == 64 for c in store["cells"].values())
    moved = tmp_path / "moved.json"
    grow = ["run", model, "--out", str(moved), *base[4:], "--plan", "targets", "--n", "5", "--task", "passkey",
            "--method", "razor"]
    key = "passkey/512/razor/0.6"
    moved.write_text(json.dumps({**store, "model_sha256": "1" * 64}))
    r = _run(*grow)
    assert r.returncode == 0, r.stderr[-2000:]
    c = json.loads(moved.read_text())["cells"][key]
    assert [p["i"] for p in c["prompts"]] == [0, 1, 2, 3, 4] and c["prompts"][:4] == cells3[key]["prompts"]
    assert c["model_files"] == [store["model_sha256"][:12]]  # the files that ran prompts, not the store's name
    for edit, why in (({"cache_sha256": "0" * 64}, "ran another cache"),
                      ({"cache_sha256": None}, "before cells recorded their cache")):
        cell = {k: v for k, v in {**store["cells"][key], **edit}.items() if v is not None}
        moved.write_text(json.dumps({**store, "model_sha256": "1" * 64, "cells": {**store["cells"], key: cell}}))
        r = _run(*grow)
        assert r.returncode == 2 and why in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    moved.write_text(json.dumps({**store, "model_sha256": "1" * 64, "weights_sha256": "1" * 64}))
    r = _run(*grow)
    assert r.returncode == 2 and "other weights" in r.stderr

    r = _run("report", str(out), "--plot", str(tmp_path / "frontier.png"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "| 512 | 0.6 | razor |" in r.stdout and "mean KLD" in r.stdout
    # streaming against razor, paired on the prompts both ran
    assert "- passkey 512, budget 0.6: streaming" in r.stdout and "discordant (sign test p = " in r.stdout
    assert (tmp_path / "frontier.png").stat().st_size > 10_000
    assert "- mniah 512, budget 0.6: razor (W " in r.stdout and " named a distractor in the window, " in r.stdout

    # annotate: prompts recorded without the needles get them, as a run writes them; a prompt this Python and
    # tokenizer do not make again is refused before anything is written
    store = json.loads(out.read_text())
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps({**store, "cells": {k: {**c, "prompts": [
        {f: v for f, v in p.items() if f not in ("needle_pos", "asked", "named")} for p in c["prompts"]]}
        if "prompts" in c else c for k, c in store["cells"].items()}}))
    r = _run("annotate", str(bare), model)
    assert r.returncode == 0 and "multi-needle prompts annotated" in r.stdout, r.stderr[-2000:]
    assert json.loads(bare.read_text())["cells"] == store["cells"]
    for p in store["cells"]["mniah/512/full"]["prompts"]:
        p.pop("named")
    bare.write_text(json.dumps({**store, "cells": {**store["cells"], "mniah/512/full": {
        **store["cells"]["mniah/512/full"], "prompts": [{**p, "expected": "1234567"} if p["i"] == 1 else p
                                                         for p in store["cells"]["mniah/512/full"]["prompts"]]}}}))
    before = bare.read_text()
    r = _run("annotate", str(bare), model)
    assert r.returncode == 2 and "mniah/512/full prompt 1 is not the prompt" in r.stderr and "Traceback" not in r.stderr
    assert bare.read_text() == before
    r = _run("annotate", str(bare), str(tmp_path / "missing.gguf"))
    assert r.returncode == 2 and "no such file" in r.stderr
    bare.write_text("[1, 2]")
    r = _run("annotate", str(bare), model)
    assert r.returncode == 2 and "not a results file" in r.stderr and "Traceback" not in r.stderr

    # a run of another model file (re-embedded: another sha256) without references takes them from this one,
    # marked with their file, and pairs on the prompts both ran
    store = json.loads(out.read_text())
    alone = tmp_path / "razor-only.json"
    alone.write_text(json.dumps({**store, "model_sha256": "1" * 64, "cells": {
        k: c for k, c in store["cells"].items() if c["method"] not in ("full", "streaming")}}))
    r = _run("report", str(alone), "--ref", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "| 512 | - | full (ev.json) | 1.000 |" in r.stdout and "| 512 | 0.6 | streaming (ev.json) |" in r.stdout
    assert "- passkey 512, budget 0.6: streaming" in r.stdout
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**store, "settings": {**store["settings"], "n_needles": 3}}))
    r = _run("report", str(alone), "--ref", str(other))
    assert r.returncode == 2 and "other settings" in r.stderr and "Traceback" not in r.stderr
    r = _run("report", str(alone), "--ref", str(tmp_path / "missing.json"))
    assert r.returncode == 2 and "no such file" in r.stderr

    # identical prompts are recognised across cells; another task's, or a prompt the other lacks, are not
    ev = _load_tool()
    cells = store["cells"]
    assert ev.same_prompts(cells["mniah/512/razor/0.6"], cells["mniah/512/full"])
    assert not ev.same_prompts(cells["mniah/512/razor/0.6"], cells["passkey/512/full"])
    assert not ev.same_prompts(cells["passkey/512/razor/0.6"], cells["passkey/512/full"])  # 4 prompts against 3
    assert ev.same_prompts(cells["kld/512/razor/0.6"], cells["kld/512/streaming/0.6"])


def test_evidence_kv_types_budget_against_f16(smollm2_razor, tmp_path):
    """METHOD+TYPE runs the whole cache in that KV type with the budget still a fraction of the f16 cache: a
    q8_0 cell at 0.4 allocates at most 0.4 of the f16 bytes (so more than 0.4 of a q8_0 full cache, a longer
    window than f16 at the same memory); a budget above what a full q8_0 cache takes cannot run; the typed full
    cache is one cell without a budget, paired with the f16 one in the report."""
    model = str(smollm2_razor[0])
    out = tmp_path / "ev.json"
    base = ["run", model, "--out", str(out), "--ctx", "512", "--plan", "targets", "--task", "passkey", "--n", "1",
            "--no-progress"]
    r = _run(*base, "--budget", "0.4", "--method", "full", "--method", "full+q8_0", "--method", "streaming",
             "--method", "streaming+q8_0")
    assert r.returncode == 0, r.stderr[-2000:]
    r = _run(*base, "--budget", "0.6", "--method", "streaming+q8_0")
    assert r.returncode == 0, r.stderr[-2000:]
    cells = json.loads(out.read_text())["cells"]
    assert set(cells) == {"passkey/512/full", "passkey/512/full+q8_0", "passkey/512/streaming/0.4",
                          "passkey/512/streaming+q8_0/0.4", "passkey/512/streaming+q8_0/0.6"}
    full_q8, s16, s8 = (cells[k] for k in ("passkey/512/full+q8_0", "passkey/512/streaming/0.4",
                                           "passkey/512/streaming+q8_0/0.4"))
    assert full_q8["kv_type"] == "q8_0" and full_q8["kv_fraction"] == pytest.approx(34 / 64)
    assert full_q8["full_equiv_bytes"] == cells["passkey/512/full"]["full_equiv_bytes"]
    assert s8["kv_type"] == "q8_0" and s8["kv_fraction"] <= 0.4 < s8["kv_fraction_of_type"]
    assert s8["window"] > s16["window"] and "kv_type" not in s16
    assert s8["cache_sha256"] != s16["cache_sha256"]
    assert not cells["passkey/512/streaming+q8_0/0.6"]["supported"]  # 0.6 of f16 > a whole q8_0 cache
    r = _run("report", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "| 512 | - | full+q8_0 | 0.531 |" in r.stdout
    assert "- passkey 512: full+q8_0 " in r.stdout and " vs full " in r.stdout
    assert "- passkey 512, budget 0.4: streaming+q8_0 " in r.stdout and " vs streaming " in r.stdout
    r = _run(*base, "--method", "razor+q3_k")
    assert r.returncode == 2 and "unknown method 'razor+q3_k'" in r.stderr


def test_evidence_on_a_sliding_window_model(gemma3_razor, tmp_path):
    """On Gemma 3 (interleaved sliding window) the cells count the sliding-window layers' own cache at its window,
    not at llama-cpp-python's full size (memory no method can save, which would leave a budget nothing to give the
    global layers), so a budget runs StreamingLLM in the global layers and one retrieval head with pins there."""
    out = tmp_path / "ev.json"
    r = _run("run", str(gemma3_razor[0]), "--out", str(out), "--ctx", "1024", "--plan", "targets", "--task",
             "passkey", "--n", "1", "--budget", "0.95", "--method", "full", "--method", "streaming", "--method",
             "razor_pins_r0.01", "--no-progress")
    assert r.returncode == 0, r.stderr[-2000:]
    cells = json.loads(out.read_text())["cells"]
    full = cells["passkey/1024/full"]
    # 18 layers, one KV head of 256: a full-size cache holds 1 KiB per layer and token, 15 of the layers far less
    assert full["kv_bytes"] < 0.8 * 18 * full["ctx"] * 1024
    s, p = cells["passkey/1024/streaming/0.95"], cells["passkey/1024/razor_pins_r0.01/0.95"]
    assert s["supported"] and s["retrieval_heads"] == 0 and s["kv_fraction"] <= 0.95 and s["window"] > 0
    assert p["supported"] and p["retrieval_heads"] == 1 and p["kv_fraction"] <= 0.95 and p["window"] > 0
    assert p["window"] < s["window"]  # the retrieval head keeps every token, out of the same memory


def test_kld_target_pairs_the_same_kv_type():
    """The 8k prose target compares a typed razor cell with StreamingLLM in the same KV type when that was measured
    (quantization helps both), an untyped one with StreamingLLM in f16."""
    ev = _load_tool()

    def kld(method, mean, top1=0.97, kv=0.34):
        return {"task": "kld", "length": 8192, "method": method, "budget": 0.35, "supported": True, "kld_mean": mean,
                "top1": top1, "kv_fraction": kv, "n_positions": 4, "n_ubatch": 256, "block_weights": [2, 2],
                "block_kld": [mean, mean]}

    cells = {ev.cell_key("kld", 8192, m, 0.35): kld(m, x) for m, x in
             (("razor", 0.006), ("streaming", 0.015), ("razor+q8_0", 0.0036), ("streaming+q8_0", 0.0045))}
    lines = ev.targets({"cells": cells})
    assert any(line.startswith("- kld 8192: razor top-1") and "0.40x streaming's" in line for line in lines)
    assert any(line.startswith("- kld 8192: razor+q8_0 top-1") and "0.80x streaming+q8_0's" in line for line in lines)
    del cells[ev.cell_key("kld", 8192, "streaming+q8_0", 0.35)]
    assert any("razor+q8_0" in line and "0.24x streaming's" in line for line in ev.targets({"cells": cells}))


def test_evidence_refuses_another_model(smollm2_path, tmp_path):
    out = tmp_path / "ev.json"
    out.write_text(json.dumps({"model": "x.gguf", "model_sha256": "0" * 64, "cells": {}}))
    r = _run("run", smollm2_path, "--out", str(out), "--plan", "targets", "--ctx", "256", "--n", "1")
    assert r.returncode != 0 and "another model" in r.stderr


def test_copy_heads_tool_runs(smollm2_razor, tmp_path):
    """tools/copy_heads.py at a small size: scores in [0, 1] for every KV head, maps of the stored map's size,
    every cell with its per-prompt results (the numbers themselves: docs/results/copy-heads-smollm2.json)."""
    res = _run_json("copy_heads.py", tmp_path, str(smollm2_razor[0]), "--probes", "1", "--tokens", "384",
                    "--eval", "1", "--lengths", "384", "--budget", "0.6", "--policies", "full,copy")
    stored = np.asarray(res["maps"]["stored"])
    assert stored.shape == (30, 3) and res["answer_tokens_scored"] > 0
    for name in ("mass", "copy"):
        s = np.asarray(res[name])
        assert s.shape == stored.shape and (0 <= s).all() and (s <= 1 + 1e-6).all() and s.max() > 0
        assert np.asarray(res["maps"][name]).sum() == stored.sum()
    assert [(c["task"], c["policy"]) for c in res["cells"]] == [(t, p) for t in ("passkey", "niah4") for p in ("full", "copy")]
    assert all(len(c["per_prompt"]) == 1 and c["correct"] == sum(c["per_prompt"]) for c in res["cells"])
    assert res["cells"][1]["window"] > 0 and res["cells"][0]["window"] is None


def test_passkey_diagnosis_tool_runs(smollm2_razor, tmp_path):
    """tools/passkey_diagnosis.py at a small size: every policy on every prompt; a ring window longer than the
    prompt evicts nothing, so razor_ring answers as the full cache does (the numbers themselves:
    docs/results/passkey-diagnosis-smollm2.json)."""
    res = _run_json("passkey_diagnosis.py", tmp_path, str(smollm2_razor[0]), "--tokens", "384", "--eval", "2",
                    "--budget", "0.6", "--ring-window", "1000")
    assert len(res["prompts"]) == 2 and 0 < res["windows"]["razor"] < 384
    for row in res["prompts"]:
        assert 0 < row["needle"][0] < row["needle"][1] < row["n_tokens"] <= 384
        pol = row["policies"]
        assert list(pol) == ["full", "razor", "razor_ring", "razor_ring+needle"]
        assert all(v["ok"] == (v["first_wrong"] is None) for v in pol.values())
        assert pol["razor_ring"] == {**pol["full"], "s": pol["razor_ring"]["s"]}
    assert res["correct"] == {k: sum(p["policies"][k]["ok"] for p in res["prompts"]) for k in res["correct"]}


def test_passkey_diagnosis_snap_on_mniah(smollm2_razor, tmp_path):
    """The query-aware policies on the multi-needle prompts at a small size: every prompt answered or not under
    each, the share of local heads that kept the key recorded, the needle inside the prompt."""
    res = _run_json("passkey_diagnosis.py", tmp_path, str(smollm2_razor[0]), "--task", "mniah", "--tokens", "384",
                    "--eval", "2", "--ring-window", "120", "--keep", "16", "--policies", "full,snap,snap_razor")
    assert res["settings"]["task"] == "mniah" and len(res["prompts"]) == 2
    for row in res["prompts"]:
        assert 0 < row["needle"][0] < row["needle"][1] < row["n_tokens"] <= 384
        assert list(row["policies"]) == ["full", "snap", "snap_razor"]
        assert all(0.0 <= row["policies"][k]["key_kept"] <= 1.0 for k in ("snap", "snap_razor"))
    r = _run(str(smollm2_razor[0]), "--policies", "full,snapkv", timeout=600, tool=TOOL.parent / "passkey_diagnosis.py")
    assert r.returncode == 2 and "unknown snapkv" in r.stderr and "Traceback" not in r.stderr
