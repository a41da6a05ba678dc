"""`razor-gguf demo`: the main job end to end on the small test model."""

from __future__ import annotations

import time

PROMPT = "The three primary colors are"


def run_demo(max_tokens: int = 48) -> int:
    from .models import model_path
    from .llama import Llama

    path = model_path("smollm2")
    print(f"model: {path}")
    llm = Llama(model_path=str(path), n_ctx=512, verbose=False)
    start = time.perf_counter()
    out = llm.create_completion(PROMPT, max_tokens=max_tokens, temperature=0.0)
    elapsed = time.perf_counter() - start
    usage = out["usage"]
    print(f"prompt: {PROMPT}")
    print(f"completion: {out['choices'][0]['text'].strip()}")
    print(f"{usage['completion_tokens']} tokens in {elapsed:.2f} s "
          f"({usage['completion_tokens'] / elapsed:.1f} tokens/s, greedy)")
    return 0
