"""`razor-gguf serve`: a real server process on 127.0.0.1, exercised with the official openai client."""

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

openai = pytest.importorskip("openai")

MESSAGES = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is the capital of France?"}]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(model, log, *args, env=None):
    """A `razor-gguf serve` process on a free loopback port, once it answers: (base URL, process)."""
    port = _free_port()
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "razor_gguf", "serve", str(model), "--port", str(port), *args],
                                stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(base + "/v1/models", timeout=2).read()
            return base, proc
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"server did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)


def _stop(proc) -> None:
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(smollm2_razor, tmp_path_factory):
    """The server on a free loopback port; razor options from a flag (--n-sink) and the environment (RAZOR_WINDOW)."""
    log = tmp_path_factory.mktemp("serve") / "server.log"
    base, proc = _start(smollm2_razor[0], log, "--ctx", "2048", "--n-batch", "128", "--n-sink", "8",
                        env={"RAZOR_WINDOW": "256"})
    yield base, proc, log
    _stop(proc)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="not-needed", max_retries=0, timeout=120)


def _alive(server) -> None:
    assert server[1].poll() is None, server[2].read_text()[-3000:]


def test_listens_on_loopback_with_razor_options(server):
    base, proc, log = server
    assert "on http://127.0.0.1:" in log.read_text()
    stats = json.loads(urllib.request.urlopen(base + "/v1/razor/stats").read())
    assert stats["razor"] is True and stats["model"] == "smollm2-razor"
    assert (stats["n_sink"], stats["window"]) == (8, 256)  # --n-sink flag, RAZOR_WINDOW environment
    assert stats["kv_bytes"] < stats["full_equiv_bytes"] and stats["saving"] > 0.3 and stats["n_ctx"] == 2048


def test_chat_completion(client):
    r = client.chat.completions.create(model="smollm2-razor", messages=MESSAGES, max_tokens=24, temperature=0)
    assert "Paris" in r.choices[0].message.content
    assert r.usage.prompt_tokens > 10 and 0 < r.usage.completion_tokens <= 24


def test_streaming(client):
    stream = client.chat.completions.create(model="smollm2-razor", messages=MESSAGES, max_tokens=24,
                                            temperature=0, stream=True)
    pieces = [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 2 and "Paris" in "".join(pieces)


def test_two_concurrent_clients(server, client):
    """Both finish (the second waits for the first; neither stream is cut off)."""
    results: dict = {}

    def streaming():
        s = client.chat.completions.create(model="smollm2-razor", messages=MESSAGES, max_tokens=32,
                                           temperature=0, stream=True)
        results["stream"] = "".join(c.choices[0].delta.content or "" for c in s if c.choices)

    def plain():
        other = openai.OpenAI(base_url=server[0] + "/v1", api_key="x", max_retries=0, timeout=120)
        results["plain"] = other.chat.completions.create(model="smollm2-razor", messages=MESSAGES, max_tokens=24,
                                                         temperature=0).choices[0].message.content

    threads = [threading.Thread(target=streaming), threading.Thread(target=plain)]
    for t in threads:
        t.start()
        time.sleep(0.2)
    for t in threads:
        t.join(timeout=180)
    assert "Paris" in results.get("stream", ""), results
    assert "Paris" in results.get("plain", ""), results
    _alive(server)


def test_malformed_request_is_a_4xx_and_server_keeps_serving(server, client):
    req = urllib.request.Request(server[0] + "/v1/chat/completions", data=b'{"messages": [{"role": "user", ',
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    assert e.value.code == 400
    assert "not valid JSON" in json.loads(e.value.read())["error"]["message"]
    with pytest.raises(openai.APIStatusError) as e2:
        client.chat.completions.create(model="smollm2-razor", messages="not a list", max_tokens=4)
    assert e2.value.status_code == 400 and "messages" in str(e2.value)
    _alive(server)
    r = client.chat.completions.create(model="smollm2-razor", messages=MESSAGES, max_tokens=8, temperature=0)
    assert r.choices[0].message.content


def test_oversize_prompt_is_a_clear_error_without_crash(server, client):
    huge = [{"role": "user", "content": "hello " * 3000}]  # > 2048 tokens
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="smollm2-razor", messages=huge, max_tokens=8)
    assert "context length" in str(e.value) and "2048" in str(e.value)
    _alive(server)
    r = client.chat.completions.create(model="smollm2-razor", messages=MESSAGES, max_tokens=24, temperature=0)
    assert "Paris" in r.choices[0].message.content


@pytest.mark.parametrize("args, env, message", [
    (["/nonexistent/model.gguf"], {}, "no such file"),
    (["MODEL", "--razor"], {}, "no razor head map"),
    (["MODEL"], {"RAZOR_WINDOW": "wide"}, "RAZOR_WINDOW='wide' is not a valid int"),
    (["MODEL", "--port", "70000"], {}, "--port must be in 0..65535"),
])
def test_serve_bad_input_is_one_line_exit_2(smollm2_path, args, env, message):
    args = [smollm2_path if a == "MODEL" else a for a in args]
    r = subprocess.run([sys.executable, "-m", "razor_gguf", "serve", *args, "--ctx", "512"], capture_output=True,
                       text=True, timeout=120, env={**os.environ, **env})
    assert r.returncode == 2
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_pins_with_the_compensation_row_is_one_line_exit_2(smollm2_razor):
    r = subprocess.run([sys.executable, "-m", "razor_gguf", "serve", str(smollm2_razor[0]), "--pins", "8",
                        "--compensation", "--ctx", "512"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "razor.n_pin (pinned tokens) needs razor.compensation = false" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_pins_are_chosen_as_razor_gguf_llama_chooses_them(smollm2_razor, tmp_path):
    """serve --pins: the server's own model reads a prompt from an empty cache twice and pins what razor_gguf.Llama
    pins for it (GET /v1/razor/stats shows them), so both answer alike: here a passkey past the window."""
    from razor_gguf import Llama, passkey

    opts = dict(n_ctx=2048, n_batch=128, flash_attn=True, pins=64, compensation=False, kv_budget=0.35)  # serve's defaults
    base, proc = _start(smollm2_razor[0], tmp_path / "server.log", "--ctx", "2048", "--n-batch", "128", "--pins", "64",
                        "--no-compensation", "--kv-budget", "0.35")
    llm = Llama(model_path=str(smollm2_razor[0]), verbose=False, **opts)
    try:
        stats = json.loads(urllib.request.urlopen(base + "/v1/razor/stats").read())
        assert (stats["pins"], stats["pinned"]) == (64, [])
        trial = passkey.make_prompt(lambda s: llm.tokenize(s.encode()), 1300, 0.25, "71843")
        want = llm.create_completion(trial.text, max_tokens=8, temperature=0)["choices"][0]["text"]
        client = openai.OpenAI(base_url=base + "/v1", api_key="not-needed", max_retries=0, timeout=300)
        got = client.completions.create(model="smollm2-razor", prompt=trial.text, max_tokens=8, temperature=0)
        stats = json.loads(urllib.request.urlopen(base + "/v1/razor/stats").read())
        assert stats["pinned"] == llm.pinned and len(llm.pinned) == 64, (stats, llm.pinned)
        assert stats["window"] + stats["n_sink"] < trial.n_tokens * 0.75  # the needle has left the window
        assert got.choices[0].text == want and passkey.is_correct(want, trial.key), (want, got.choices[0].text)
    finally:
        llm.close()
        _stop(proc)


def test_sliding_window_model_gets_its_window_and_a_small_budget(tmp_path):
    """A sliding-window model with a head map (the tiny gemma3-style GGUF of tests/test_razor_iswa.py): the
    server's own model gets the SWA cache of window size that razor_gguf.Llama gives it (llama-cpp-python's
    server has no swa_full setting), so a budget the full-size SWA cache alone would exceed is met."""
    import numpy as np

    from razor_gguf.testing import tiny_model as tm

    cfg = tm.TinyConfig(arch="gemma3", n_swa=32, swa_pattern=2)
    path = tm.write_tiny_model(tmp_path / "gemma-mixed.gguf", cfg,
                               tm.RazorMeta(head_map=np.array([[0, 0], [1, 0], [0, 0], [0, 0]], np.int32), n_sink=4,
                                            window=16))
    base, proc = _start(path, tmp_path / "server.log", "--ctx", "4096", "--n-batch", "256", "--kv-budget", "0.45")
    try:
        stats = json.loads(urllib.request.urlopen(base + "/v1/razor/stats").read())
    finally:
        _stop(proc)
    assert stats["razor"] and stats["kv_bytes"] <= 0.45 * stats["full_equiv_bytes"], stats
    assert 0 < stats["swa_bytes"] < 0.15 * stats["full_equiv_bytes"], stats  # full size: 0.5, and 0.45 unmet
