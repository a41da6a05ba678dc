"""Models split across llama.cpp RPC workers (`razor-gguf rpc-server`) on loopback: SmolLM2 with razor, its
layers on two workers, against the same model run here. The clients run in their own processes: registering
RPC devices is process-wide (and they are GPU-type devices to ggml)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest

CLIENT = r"""
import json, sys
from razor_gguf import Llama, _native
path, rpc, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
kw = dict(rpc_servers=rpc, n_gpu_layers=-1) if rpc != "-" else {}
llm = Llama(model_path=path, n_ctx=1024, n_batch=64, n_ubatch=64, seed=0, verbose=False, **kw)
toks = llm.tokenize(b"The three primary colours are", add_bos=True)
out = []
for tok in llm.generate(toks, top_k=1, temp=0.0):
    out.append(tok)
    print(json.dumps({"token": tok}), flush=True)
    if len(out) == n:
        break
kb = _native.kv_bytes(llm._ctx.ctx)
print(json.dumps({"tokens": out, "kv": [kb.razor, kb.retrieval, kb.local, kb.compensation, kb.full_equiv]}), flush=True)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _workers(n):
    procs, ports = [], []
    for _ in range(n):
        port = _free_port()
        procs.append(subprocess.Popen([sys.executable, "-m", "razor_gguf", "rpc-server", "--port", str(port),
                                       "--threads", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
        ports.append(port)
    for port, p in zip(ports, procs):
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert p.poll() is None, p.stderr.read().decode()
                time.sleep(0.1)
    return procs, ",".join(f"127.0.0.1:{p}" for p in ports)


def _stop(procs):
    for p in procs:
        p.terminate()
        p.wait(timeout=30)


def _client(path, rpc, n, timeout=300):
    r = subprocess.run([sys.executable, "-c", CLIENT, str(path), rpc, str(n)], capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.splitlines()[-1])


@pytest.fixture(scope="module")
def model(smollm2_razor):
    return smollm2_razor[0]


def test_split_across_two_workers_equals_local(model):
    """Greedy tokens identical to the local run, and the same razor cache (by part) on the workers."""
    procs, rpc = _workers(2)
    try:
        remote = _client(model, rpc, 24)
    finally:
        _stop(procs)
    local = _client(model, "-", 24)
    assert remote["kv"][0] is True and remote["kv"] == local["kv"]
    assert remote["tokens"] == local["tokens"]


def test_worker_down_at_load_is_one_line_and_exit_2(model):
    port = _free_port()  # nothing listens there
    for cmd in (["chat", str(model), "--rpc", f"127.0.0.1:{port}"],
                ["bench", str(model), "--ctx", "256", "--kv-only", "--rpc", f"127.0.0.1:{port}"],
                ["chat", str(model), "--rpc", "no-port-here"]):
        r = subprocess.run([sys.executable, "-m", "razor_gguf", *cmd], capture_output=True, text=True, timeout=120,
                           stdin=subprocess.DEVNULL)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("razor-gguf: error: "), r.stderr
        assert "Traceback" not in r.stderr and ("does not answer" in lines[0] or "HOST:PORT" in lines[0])


def test_worker_killed_mid_generation_fails_the_call_not_the_process(model):
    """A worker killed while the model generates: the call raises within seconds (no hang, no abort: patch
    0005), the lost worker is named, and later calls on that model fail the same way."""
    procs, rpc = _workers(2)
    try:
        client = subprocess.Popen([sys.executable, "-c", LOSING_CLIENT, str(model), rpc],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(5):  # a few tokens out: generation is under way
            assert json.loads(client.stdout.readline())["token"] >= 0
        procs[1].kill()
        try:
            out, err = client.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            client.kill()
            pytest.fail("the client hangs after its worker died")
        assert client.returncode == 0, err[-3000:]
        res = json.loads(out.splitlines()[-1])
        killed = rpc.split(",")[1]
        assert res["error"].startswith("llama_decode returned") and res["again"] == res["error"]
        assert res["lost"] == [killed] and res["seconds"] < 30
        assert f"RPC worker {killed} is lost" in err and "Remote RPC server crashed" not in err
    finally:
        _stop([p for p in procs if p.poll() is None])


LOSING_CLIENT = r"""
import json, sys, time
from razor_gguf import Llama
from razor_gguf.llama import lost_rpc_workers
llm = Llama(model_path=sys.argv[1], n_ctx=1024, n_batch=64, n_ubatch=64, rpc_servers=sys.argv[2], n_gpu_layers=-1,
            verbose=False)
t0 = None
try:
    for tok in llm.generate(llm.tokenize(b"Once upon a time", add_bos=True), top_k=1, temp=0.0):
        print(json.dumps({"token": tok}), flush=True)
        t0 = t0 or time.time()
    raise SystemExit("generation ended without an error")
except RuntimeError as e:
    first = str(e)
try:
    llm("Hi", max_tokens=2)
    again = None
except RuntimeError as e:
    again = str(e)
print(json.dumps({"error": first, "again": again, "lost": sorted(lost_rpc_workers()), "seconds": time.time() - t0}))
"""


def _post(port, path, body, timeout=120):
    import urllib.error
    import urllib.request

    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _wait_port(port, proc, seconds=120):
    for _ in range(seconds * 10):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            assert proc.poll() is None, "the process ended"
            time.sleep(0.1)
    pytest.fail(f"nothing listens on {port}")


def test_server_keeps_answering_after_a_worker_dies(model, tmp_path):
    """`razor-gguf serve --rpc`: a worker killed mid-stream ends that stream with an error event; the server
    keeps answering (other routes as before, generations with a 503 naming the worker, at once); once the
    worker is back the next request reloads the model and answers as before the loss."""
    import http.client
    import urllib.request

    procs, rpc = _workers(2)
    killed = rpc.split(",")[1]
    port = _free_port()
    log = open(tmp_path / "serve.log", "w")
    srv = subprocess.Popen([sys.executable, "-m", "razor_gguf", "serve", str(model), "--port", str(port), "--ctx",
                            "1024", "--rpc", rpc], stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_port(port, srv)
        greedy = {"prompt": "The three primary colours are", "max_tokens": 8, "temperature": 0}
        status, before = _post(port, "/v1/completions", greedy)
        assert status == 200
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        c.request("POST", "/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "Tell a story"}],
                  "max_tokens": 1000, "temperature": 0, "stream": True}), {"Content-Type": "application/json"})
        r = c.getresponse()
        assert r.status == 200
        events = 0
        while events < 5:
            events += r.readline().startswith(b"data:")
        procs[1].kill()
        procs[1].wait()
        t0 = time.time()
        rest = [x for x in r.read().decode().splitlines() if x.startswith("data:")]
        assert time.time() - t0 < 30
        last = json.loads(rest[-1][5:])
        assert last["error"]["type"] == "rpc_worker_lost" and killed in last["error"]["message"]

        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=30) as m:
            assert m.status == 200
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/razor/stats", timeout=30) as m:
            assert json.loads(m.read())["razor"] is True
        t0 = time.time()
        status, down = _post(port, "/v1/completions", greedy, timeout=30)
        assert status == 503 and time.time() - t0 < 10
        assert f"RPC worker {killed} does not answer" in down["error"]["message"]

        host, p = killed.split(":")
        procs[1] = subprocess.Popen([sys.executable, "-m", "razor_gguf", "rpc-server", "--port", p, "--threads", "1"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_port(int(p), procs[1])
        status, after = _post(port, "/v1/completions", greedy)
        assert status == 200, after
        assert after["choices"][0]["text"] == before["choices"][0]["text"]
        assert srv.poll() is None
    finally:
        srv.terminate()
        srv.wait(timeout=30)
        log.close()
        _stop([p for p in procs if p.poll() is None])
    text = (tmp_path / "serve.log").read_text()
    assert text.count(f"razor-gguf: RPC worker {killed} is lost") == 1, text[-3000:]
    assert "Traceback" not in text, text[-3000:]


def test_chat_ends_in_one_line_when_a_worker_is_lost(model):
    procs, rpc = _workers(2)
    try:
        chat = subprocess.Popen([sys.executable, "-m", "razor_gguf", "chat", str(model), "--rpc", rpc],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert chat.stdout.readline().startswith("razor-gguf chat:")  # loaded
        procs[0].kill()
        procs[0].wait()
        out, err = chat.communicate("Hello\n", timeout=60)
    finally:
        _stop([p for p in procs if p.poll() is None])
    lost = rpc.split(",")[0]
    assert chat.returncode == 2 and "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1] == (f"razor-gguf: error: RPC worker {lost} is lost: the model's layers there "
                                            "are gone; start the chat again once it answers")


def test_bench_reports_rpc_against_local(model):
    procs, rpc = _workers(2)
    try:
        r = subprocess.run([sys.executable, "-m", "razor_gguf", "bench", str(model), "--ctx", "512", "--modes",
                            "full,razor", "--n-decode", "4", "--window", "64", "--n-ubatch", "64", "--rpc", rpc,
                            "--json"], capture_output=True, text=True, timeout=600)
    finally:
        _stop(procs)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout)
    runs = {x["mode"]: x for x in res["runs"]}
    assert set(runs) == {"full", "razor", "full@rpc", "razor@rpc"} and all(x["supported"] for x in runs.values())
    assert runs["razor@rpc"]["kv_bytes"] == runs["razor"]["kv_bytes"] < runs["full@rpc"]["kv_bytes"]
    pairs = {(q["mode"], q["baseline"]) for q in res["ratios"]}
    assert {("razor", "full"), ("razor@rpc", "full@rpc"), ("razor@rpc", "razor"), ("full@rpc", "full")} <= pairs
    assert all(x["decode_tps"] > 0 and x["prefill_tps"] > 0 for x in runs.values())
