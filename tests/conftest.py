import importlib.util
import json
import pathlib
import resource
import subprocess
import sys
import time

import pytest

DATA = pathlib.Path(__file__).parent / "data"
TOOLS = pathlib.Path(__file__).parents[1] / "tools"


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    from razor_gguf.models import model_path

    return str(model_path("smollm2"))


@pytest.fixture(scope="session")
def golden_recipe():
    """tools/stock_golden.py as a module: the greedy-completion recipe the golden completion comes from."""
    spec = importlib.util.spec_from_file_location("stock_golden", TOOLS / "stock_golden.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def golden_smollm2() -> dict:
    """SmolLM2's greedy completion from the stock llama.cpp built on this machine (native/build_stock.py:
    about 3 minutes the first time, cached after): tokens, text and a digest of the logits."""
    r = subprocess.run([sys.executable, str(TOOLS / "stock_golden.py")], capture_output=True, text=True,
                       timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)


@pytest.fixture(scope="session")
def smollm2_razor(smollm2_path, tmp_path_factory):
    """SmolLM2 with its head map embedded by `razor-gguf embed-heads --no-ratios` (default settings but the
    retrieval-ratio measurement: ten more minutes, whose machinery tests/test_ratios.py covers), made once per
    session: (path, the --json summary, wall seconds, peak RSS bytes of the embed process)."""
    pytest.importorskip("torch")
    out = tmp_path_factory.mktemp("embed") / "smollm2-razor.gguf"
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "razor_gguf", "embed-heads", smollm2_path, "-o", str(out), "--json",
                        "--no-ratios"],
                       capture_output=True, text=True, timeout=900)
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    assert r.returncode == 0, r.stderr[-3000:]
    info = json.loads(r.stdout)
    print(f"\nembed-heads SmolLM2: {wall:.1f} s wall, peak RSS {peak / 2**30:.2f} GiB; "
          f"{info['retrieval_count']} retrieval heads (ratio {info['retrieval_ratio']:.3f}) in layers "
          f"{[l for l, row in enumerate(info['head_map']) if any(row)]}")
    return out, info, wall, peak


@pytest.fixture(scope="session")
def gemma3_razor(tmp_path_factory):
    """Gemma 3 270M with its head map embedded by `razor-gguf embed-heads --probe-len 600 --no-ratios` (a probe
    block longer than the 512-token sliding window; no retrieval-ratio measurement, as for SmolLM2), made once per
    session: (path, the --json summary)."""
    pytest.importorskip("torch")
    from razor_gguf.models import model_path

    out = tmp_path_factory.mktemp("embed") / "gemma3-razor.gguf"
    r = subprocess.run([sys.executable, "-m", "razor_gguf", "embed-heads", str(model_path("gemma3")), "-o", str(out),
                        "--json", "--probe-len", "600", "--no-ratios"], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, json.loads(r.stdout)
