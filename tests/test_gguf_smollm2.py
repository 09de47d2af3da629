"""The real model (SmolLM2-135M-Instruct, embedded) exported to GGUF and run in llama.cpp: dense (its
tokenizer copied from the source GGUF), non-uniform width (the `deci` architecture) and depth. For each,
greedy continuations of fixed prompts equal transformers' and llama.cpp's perplexity on the held-out
default text is within 1% of ours (f32 files)."""
import json

import pytest
import torch

from prunekit.api import run_recipe
from prunekit.data import evaluation_data
from prunekit.eval.llama_cpp import gguf_greedy, gguf_perplexity, open_gguf
from prunekit.eval.perplexity import perplexity
from prunekit.io.loading import load
from prunekit.recipe import recipe_from_dict

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "Pruning a neural network means"]


def _check(model, tokenizer, path, arch):
    assert json.loads((path.parent / "prunekit.json").read_text())["gguf"]["arch"] == arch
    for prompt in PROMPTS:
        ids = tokenizer(prompt)["input_ids"]
        llm = open_gguf(path, n_ctx=64, logits_all=False)
        try:
            assert llm.tokenize(prompt.encode(), add_bos=False) == ids          # the copied tokenizer splits alike
        finally:
            llm.close()
        with torch.no_grad():
            want = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids):].tolist()
        assert gguf_greedy(path, ids, 12, f32_cache=True) == want, prompt
    text = evaluation_data(tokenizer, "default", max_tokens=1024)
    ours = perplexity(model, text, seqlen=256).ppl
    theirs = gguf_perplexity(path, text, seqlen=256)["ppl"]                  # llama.cpp's default f16 KV cache
    assert abs(theirs / ours - 1) < 0.01, (ours, theirs)


@pytest.mark.parametrize("step,arch", [
    ({"method": "magnitude", "sparsity": 0.3}, "llama"),
    ({"method": "flap", "sparsity": 0.2, "uniform": False}, "deci"),
    ({"method": "last-k", "layers": 4}, "llama"),
], ids=["unstructured", "width-non-uniform", "depth"])
def test_smollm2_exports_run_in_llama_cpp_like_in_transformers(step, arch, tmp_path):
    out = tmp_path / "pruned"
    recipe = recipe_from_dict({"model": "default", "calibration": {"samples": 4, "seqlen": 128}, "steps": [step],
                               "export": {"path": str(out), "format": "gguf", "outtype": "f32"}})
    run_recipe(recipe, progress=False, echo=lambda *a: None)
    model, tokenizer = load(out)
    _check(model, tokenizer, out / "model.gguf", arch)
