#!/usr/bin/env python3
"""The golden greedy completion of SmolLM2 from the stock llama.cpp, built on this machine, as JSON.

The parity tests (tests/test_llama.py, tests/test_razor_smollm2.py) replay the same request through
razor_gguf.Llama and must match it bitwise: the same tokens and the same logits at every step. The stock
libraries come from native/build_stock.py (built once per CPU and cached: ggml's -march=native kernels round
differently from one instruction set to another, so a golden recorded on another CPU proves nothing here).
A process holds one libllama, so the stock one is loaded in a process of its own:

    python tools/stock_golden.py                               # builds the stock libraries if needed
    LLAMA_CPP_LIB_PATH=<stock build>/bin python tools/stock_golden.py

It refuses a razor-patched library.
"""

import ctypes
import hashlib
import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]

REQUEST = {
    "model": "smollm2",
    "prompt": "The three primary colors are",
    "max_tokens": 32,
    "n_ctx": 512,
    "n_batch": 512,
    "seed": 0,
}


def greedy_completion(llama_cls, model_path: str, request: dict) -> dict:
    """The shared recipe: greedy decode of `max_tokens` tokens from the raw prompt; the tokens, their text
    and a sha256 of the float32 logits each token was picked from."""
    import numpy as np

    import llama_cpp

    llm = llama_cls(model_path=model_path, n_ctx=request["n_ctx"], n_batch=request["n_batch"],
                    seed=request["seed"], verbose=False)
    try:
        prompt = llm.tokenize(request["prompt"].encode(), add_bos=True)
        out, digest = [], hashlib.sha256()
        for tok in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
            if tok == llm.token_eos() or len(out) == request["max_tokens"]:
                break
            out.append(tok)
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
            digest.update(logits.astype(np.float32).tobytes())
        text = llm.detokenize(out).decode(errors="replace")
    finally:
        llm.close()
    return {"tokens": out, "text": text, "logits_sha256": digest.hexdigest()}


def stock_lib() -> str:
    proc = subprocess.run([sys.executable, str(ROOT / "native" / "build_stock.py")],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        sys.exit(proc.stderr.strip() or "native/build_stock.py failed")
    return proc.stdout.strip()


def main() -> int:
    lib_path = os.environ.get("LLAMA_CPP_LIB_PATH")
    if not lib_path:
        env = dict(os.environ, LLAMA_CPP_LIB_PATH=stock_lib())
        return subprocess.run([sys.executable, __file__], env=env).returncode
    if hasattr(ctypes.CDLL(str(pathlib.Path(lib_path) / "libllama.so")), "llama_razor_patch_version"):
        sys.exit(f"{lib_path} is razor-patched; the golden completion must come from a stock build")
    sys.path.insert(0, str(ROOT))
    from razor_gguf.models import model_path

    import llama_cpp

    golden = greedy_completion(llama_cpp.Llama, str(model_path(REQUEST["model"])), REQUEST)
    print(json.dumps({"request": REQUEST, **golden, "llama_cpp_python": llama_cpp.__version__,
                      "llama_cpp_lib": lib_path,
                      "system_info": llama_cpp.llama_print_system_info().decode().strip()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
