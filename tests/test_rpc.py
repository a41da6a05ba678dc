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


def test_worker_killed_mid_generation_ends_the_client(model):
    """A worker killed while the model generates: the client ends with an error within seconds, it does not
    hang. (ggml-rpc aborts the client process on a lost worker, so a server process ends too: see README.)"""
    procs, rpc = _workers(2)
    try:
        client = subprocess.Popen([sys.executable, "-c", CLIENT, str(model), rpc, "100000"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(5):  # a few tokens out: generation is under way
            assert json.loads(client.stdout.readline())["token"] >= 0
        procs[1].kill()
        t0 = time.time()
        try:
            client.wait(timeout=60)
        except subprocess.TimeoutExpired:
            client.kill()
            pytest.fail("the client hangs after its worker died")
        assert client.returncode != 0 and time.time() - t0 < 60
        assert "RPC" in client.stderr.read()
    finally:
        _stop([p for p in procs if p.poll() is None])


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
