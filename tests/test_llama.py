"""razor_gguf.Llama is a drop-in llama_cpp.Llama; without a head map it is stock llama.cpp."""

from razor_gguf import Llama  # first: it binds llama_cpp to the patched libraries

import llama_cpp  # noqa: E402

def test_is_a_llama_cpp_llama():
    assert issubclass(Llama, llama_cpp.Llama)


def test_greedy_completion_matches_unpatched_golden(smollm2_path, golden_smollm2, golden_recipe):
    assert golden_smollm2["request"] == golden_recipe.REQUEST
    tokens, text = golden_recipe.greedy_completion(Llama, smollm2_path, golden_smollm2["request"])
    assert tokens == golden_smollm2["tokens"]
    assert text == golden_smollm2["text"]


def test_create_completion_api(smollm2_path, golden_smollm2):
    req = golden_smollm2["request"]
    llm = Llama(model_path=smollm2_path, n_ctx=req["n_ctx"], verbose=False)
    out = llm.create_completion(req["prompt"], max_tokens=8, temperature=0.0)
    assert golden_smollm2["text"].startswith(out["choices"][0]["text"])
    chunks = list(llm.create_completion(req["prompt"], max_tokens=8, temperature=0.0, stream=True))
    assert "".join(c["choices"][0]["text"] for c in chunks) == out["choices"][0]["text"]
