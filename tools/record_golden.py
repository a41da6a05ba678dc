#!/usr/bin/env python3
"""Record the golden greedy completion of SmolLM2 on an UNPATCHED llama.cpp build.

The test tests/test_llama.py replays the same request through razor_gguf.Llama and must
produce the same tokens. Record once, from a stock build of the pinned llama.cpp
(0c1e57098, no patches), e.g.:

    git -C SRC apply --reverse patches/*.patch   # or extract the sdist's vendor/llama.cpp
    cmake -S SRC -B /tmp/stock-build -DBUILD_SHARED_LIBS=ON -DLLAMA_BUILD_TESTS=OFF \
          -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF
    cmake --build /tmp/stock-build -j2 --target llama
    LLAMA_CPP_LIB_PATH=/tmp/stock-build/bin python tools/record_golden.py

It refuses to run on a razor-patched library.
"""

import ctypes
import json
import os
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "data" / "golden_smollm2.json"

REQUEST = {
    "model": "smollm2",
    "prompt": "The three primary colors are",
    "max_tokens": 32,
    "n_ctx": 512,
    "n_batch": 512,
    "seed": 0,
}


def greedy_completion(llama_cls, model_path: str, request: dict) -> tuple[list[int], str]:
    """The shared recipe: greedy decode of `max_tokens` tokens from the raw prompt."""
    llm = llama_cls(model_path=model_path, n_ctx=request["n_ctx"], n_batch=request["n_batch"],
                    seed=request["seed"], verbose=False)
    prompt = llm.tokenize(request["prompt"].encode(), add_bos=True)
    out = []
    for tok in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
        if tok == llm.token_eos() or len(out) == request["max_tokens"]:
            break
        out.append(tok)
    return out, llm.detokenize(out).decode(errors="replace")


def main() -> int:
    lib_path = os.environ.get("LLAMA_CPP_LIB_PATH")
    if not lib_path:
        sys.exit("set LLAMA_CPP_LIB_PATH to the bin/ of an unpatched llama.cpp build")
    if hasattr(ctypes.CDLL(str(pathlib.Path(lib_path) / "libllama.so")), "llama_razor_patch_version"):
        sys.exit(f"{lib_path} is razor-patched; golden tokens must come from a stock build")
    sys.path.insert(0, str(ROOT))
    from razor_gguf.models import model_path

    import llama_cpp

    tokens, text = greedy_completion(llama_cpp.Llama, str(model_path(REQUEST["model"])), REQUEST)
    GOLDEN.write_text(json.dumps({
        "request": REQUEST,
        "tokens": tokens,
        "llama_cpp_python": llama_cpp.__version__,
        "llama_cpp_commit": "0c1e57098 (unpatched)",
        "recorded_with": "LLAMA_CPP_LIB_PATH=<stock build>/bin python tools/record_golden.py",
        "text": text,
    }, indent=1) + "\n")
    print(f"wrote {GOLDEN}: {len(tokens)} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
