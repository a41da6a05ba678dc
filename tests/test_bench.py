"""`razor-gguf bench` (SPEC section 5): the JSON contract, KV bytes razor against full, and bad input.
No timing assertions: speed is what the benchmark measures, not what the tests check."""

import json
import subprocess
import sys

import pytest

import razor_gguf  # noqa: F401  (before llama_cpp)

RUN_FIELDS = {"mode", "ctx", "kv_bytes", "kv_bytes_full_equiv", "prefill_tps", "decode_tps", "peak_rss_bytes"}


def _bench(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "razor_gguf", "bench", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


def _assert_user_error(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr
    assert r.stdout == ""
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("razor-gguf: error: "), r.stderr[-2000:]
    for n in needles:
        assert n in last, last


@pytest.fixture(scope="session")
def razor_model(request, smollm2_path, tmp_path_factory):
    """SmolLM2 with razor metadata: the shared session fixture when conftest has it, else a quick own one."""
    try:
        return str(request.getfixturevalue("smollm2_razor")[0])
    except pytest.FixtureLookupError:
        pass
    pytest.importorskip("torch")
    out = tmp_path_factory.mktemp("bench") / "smollm2-razor.gguf"
    r = subprocess.run([sys.executable, "-m", "razor_gguf", "embed-heads", smollm2_path, "-o", str(out),
                        "--probe-len", "300", "--no-ratios"], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return str(out)


def test_short_run_json(razor_model, tmp_path):
    # window 64, ubatch 64: with the model's recommended window (512) and ubatch 512 the local ring would be
    # larger than a 512-token context, and razor then runs the stock cache
    r = _bench(razor_model, "--ctx", 512, "--n-decode", 8, "--window", 64, "--n-ubatch", 64, "--json",
               "--plot", tmp_path / "bench.png")
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout)  # one object, nothing else on stdout
    assert {"model", "machine", "settings", "runs", "ratios"} <= set(res)
    assert res["machine"]["n_cores"] >= 1 and res["machine"]["cpu"]
    assert [(x["mode"], x["ctx"]) for x in res["runs"]] == [("full", 512), ("razor", 512), ("razor_q8_0", 512)]
    for run in res["runs"]:
        assert RUN_FIELDS <= set(run)
        assert run["kv_bytes"] > 0 and run["kv_bytes_full_equiv"] > 0
        assert run["prefill_tps"] > 0 and run["decode_tps"] > 0
        assert run["peak_rss_bytes"] > 50 * 2**20  # the model alone is ~100 MB
        assert (run["n_prompt"], run["n_decode"]) == (512 - 8 - 1, 8)
    full, razor, razor_q8 = res["runs"]
    assert full["kv_bytes"] == full["kv_bytes_full_equiv"] == razor["kv_bytes_full_equiv"]
    assert razor["window"] > 0 and razor["retrieval_heads"] > 0 and full["window"] is None
    assert razor_q8["kv_bytes"] < razor["kv_bytes"]
    q, _ = res["ratios"]
    assert (q["mode"], q["baseline"], q["ctx"]) == ("razor", "full", 512)
    assert q["kv_fraction"] == pytest.approx(razor["kv_bytes"] / full["kv_bytes"])
    assert "bench: razor at ctx 512" in r.stderr  # progress goes to stderr
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pins_read_the_prompt_twice(razor_model):
    r = _bench(razor_model, "--ctx", 1024, "--n-decode", 4, "--modes", "full,razor", "--window", 64, "--n-ubatch", 64,
               "--pins", 16, "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout)
    assert res["settings"]["razor_overrides"] == {"razor.window": 64, "razor.n_pin": 16, "razor.compensation": False}
    full, razor = res["runs"]
    assert (full["pins"], full["pinned"]) == (0, 0)
    assert (razor["pins"], razor["pinned"]) == (16, 16) and razor["prefill_tps"] > 0


def test_razor_that_cannot_run_is_reported_not_fatal(razor_model):
    # a 512-token window covers a 512-token context: llama.cpp runs the stock cache and says why
    r = _bench(razor_model, "--ctx", 512, "--kv-only", "--window", 512, "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    runs = {x["mode"]: x for x in json.loads(r.stdout)["runs"]}
    assert runs["full"]["supported"] and runs["full"]["kv_bytes"] > 0
    assert not runs["razor"]["supported"] and "window covers the whole context" in runs["razor"]["reason"]
    assert runs["razor"]["kv_bytes"] is None


def test_kv_bytes_razor_below_full(razor_model):
    # At a short context the local heads' ring (sinks + window + ubatch scratch) is as big as the context,
    # so compare where the saving is real; --kv-only only allocates, so this is fast.
    r = _bench(razor_model, "--ctx", 4096, "--kv-only", "--modes", "full,razor,full_q8_0,razor_q8_0", "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    runs = {x["mode"]: x for x in json.loads(r.stdout)["runs"]}
    assert runs["razor"]["kv_bytes"] < runs["full"]["kv_bytes"]
    assert runs["razor_q8_0"]["kv_bytes"] < runs["full_q8_0"]["kv_bytes"] < runs["full"]["kv_bytes"]
    assert runs["razor_q8_0"]["kv_bytes"] < runs["razor"]["kv_bytes"]
    assert runs["razor"]["prefill_tps"] is None and runs["razor"]["decode_tps"] is None


def test_overrides_reach_the_cache(razor_model):
    r = _bench(razor_model, "--ctx", 4096, "--kv-only", "--modes", "razor", "--window", 256, "--n-sink", 8, "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    (run,) = json.loads(r.stdout)["runs"]
    assert (run["window"], run["n_sink"]) == (256, 8)


def test_compensation_flag(razor_model):
    # the row's F32 sums and its scratch rows in the ring cost bytes; without the row the cache holds neither
    kv = {}
    for flag in ("--compensation", "--no-compensation"):
        r = _bench(razor_model, "--ctx", 4096, "--kv-only", "--modes", "razor", "--window", 256, flag, "--json")
        assert r.returncode == 0, r.stderr[-3000:]
        res = json.loads(r.stdout)
        over = res["settings"]["razor_overrides"]  # with the row on, pins are turned off too (razor.n_pin 0)
        assert (over["razor.window"], over["razor.compensation"]) == (256, flag == "--compensation")
        kv[flag] = res["runs"][0]["kv_bytes"]
    assert kv["--no-compensation"] < kv["--compensation"]


def test_table(razor_model):
    r = _bench(razor_model, "--ctx", 2048, "--kv-only")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.splitlines()[0].split()[:3] == ["mode", "ctx", "KV"]
    assert "razor vs full at ctx 2048" in r.stdout


@pytest.mark.parametrize("args, needle", [
    (["{model}", "--ctx", "abc"], "invalid int value"),
    (["{model}", "--ctx", "32"], "--ctx 32 is too small"),
    (["{model}", "--ctx", "80", "--n-decode", "64"], "--ctx 80 is too small"),
    (["{model}", "--ctx", "256", "--modes", "full,turbo"], "unknown mode 'turbo'"),
    (["{model}", "--ctx", "256", "--n-decode", "0"], "--n-decode"),
    (["{model}", "--ctx", "256", "--retrieval-ratio", "1.5"], "--retrieval-ratio"),
    (["{model}", "--ctx", "256", "--window", "0"], "--window"),
    (["{model}", "--ctx", "256", "--pins", "8", "--compensation"], "--pins needs the compensation row off"),
    (["{model}"], "--ctx"),
    (["{model}", "--ctx", "256"], "run razor-gguf embed-heads"),  # a stock model: no razor metadata
    (["/nonexistent/model.gguf", "--ctx", "256"], "no such file"),
    (["{notgguf}", "--ctx", "256"], "not a GGUF"),
])
def test_bad_input(args, needle, smollm2_path, tmp_path):
    notgguf = tmp_path / "x.gguf"
    notgguf.write_text("hello")
    r = _bench(*[a.format(model=smollm2_path, notgguf=notgguf) for a in args])
    _assert_user_error(r, needle)
    assert len(r.stderr.strip().splitlines()) == 1


def test_stock_model_full_mode_runs(smollm2_path):
    # Without razor metadata the full modes still work (a baseline for any GGUF).
    r = _bench(smollm2_path, "--ctx", 1024, "--kv-only", "--modes", "full", "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    (run,) = json.loads(r.stdout)["runs"]
    assert run["kv_bytes"] == run["kv_bytes_full_equiv"]


def test_worker_failure_is_one_line(tmp_path):
    # A well-formed GGUF that llama.cpp cannot load: the worker fails, the CLI reports one line, exit 2.
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "unknown-arch.gguf"
    w = gguf.GGUFWriter(str(path), "no_such_arch")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    r = _bench(path, "--ctx", 256, "--modes", "full")
    _assert_user_error(r, "full at --ctx 256", "Failed to load model")


def test_library_entry_point_takes_plain_parameters(smollm2_path):
    # Python callers need no argparse namespace; bad input is the same UserError the CLI prints.
    from razor_gguf.bench import bench
    from razor_gguf.errors import UserError

    res = bench(smollm2_path, [1024], modes=["full"], kv_only=True)
    (run,) = res["runs"]
    assert (run["mode"], run["ctx"]) == ("full", 1024) and run["kv_bytes"] == run["kv_bytes_full_equiv"]
    with pytest.raises(UserError, match="unknown mode 'fast'"):
        bench(smollm2_path, [1024], modes="fast")
