"""`razor-gguf demo`: the main job end to end on the small test model: fetch SmolLM2, embed its head
map (once; cached), answer one chat turn on the razor KV cache and print the KV memory it saves."""

from __future__ import annotations

import subprocess
import sys
import time

SYSTEM = "You are a helpful assistant."
QUESTION = "What is the capital of France?"
N_CTX = 8192  # SmolLM2's trained context: where the KV cache is large enough to matter


def razor_model_path():
    """SmolLM2 with its head map and measured defaults, written by `razor-gguf embed-heads` the first time (about 13
    minutes on 2 CPU cores, most of it measuring the retrieval ratio)."""
    from .models import cache_dir, model_path

    src = model_path("smollm2")
    out = cache_dir() / "models" / (src.stem + ".razor.gguf")
    if not out.exists():
        print(f"embedding the head map and measuring the model's defaults (once; minutes on a CPU): "
              f"razor-gguf embed-heads {src} -o {out}", flush=True)
        r = subprocess.run([sys.executable, "-m", "razor_gguf", "embed-heads", str(src), "-o", str(out)])
        if r.returncode != 0:
            raise SystemExit(r.returncode)
    return out


def run_demo() -> int:
    from .llama import Llama

    path = razor_model_path()
    print(f"model: {path}")
    llm = Llama(model_path=str(path), n_ctx=N_CTX, flash_attn=True, verbose=False)
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]
    print(f"user: {QUESTION}\nassistant: ", end="", flush=True)
    start, n = time.perf_counter(), 0
    for chunk in llm.create_chat_completion(messages, max_tokens=64, temperature=0.0, stream=True):
        piece = chunk["choices"][0]["delta"].get("content")
        if piece:
            print(piece, end="", flush=True)
            n += 1
    elapsed = time.perf_counter() - start
    print(f"\n({n} tokens in {elapsed:.2f} s)")
    st = llm.razor_stats()
    llm.close()
    if not st["razor"]:
        print("KV cache: full (razor did not run; see the notice above)")
        return 1
    print(f"KV cache at n_ctx {N_CTX}: razor {st['kv_bytes'] / 2**20:.1f} MiB vs full {st['full_equiv_bytes'] / 2**20:.1f} "
          f"MiB: {st['saving']:.0%} saved ({st['retrieval_heads']}/{st['kv_heads']} retrieval heads, "
          f"n_sink {st['n_sink']}, window {st['window']})")
    return 0
