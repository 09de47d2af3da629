"""Command line and recipes for allocation, weight updates and EoRA (`--allocation`, `--update`,
`--eora-rank`, `{method: eora}` steps)."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from prunekit.cli import main
from prunekit.recipe import load_recipe

SMALL = ["--samples", "4", "--seqlen", "16", "--set", "eval.max_tokens=256"]


def test_prune_with_owl_admm_and_eora_exports_a_sparse_model_and_a_peft_adapter(tiny_model_dir, tmp_path, capsys):
    peft = pytest.importorskip("peft")
    out = tmp_path / "out"
    assert main(["prune", str(tiny_model_dir), "--method", "wanda", "--sparsity", "0.6", "--allocation", "owl",
                 "--update", "admm", "--eora-rank", "4", *SMALL, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "owl allocation" in printed and "pruned + EoRA adapter" in printed and "eora -> 14 low-rank" in printed
    record = json.loads((out / "prunekit.json").read_text())
    assert record["adapter_parameters"] > 0 and record["adapter"] == "eora_adapter"
    assert record["steps"][0]["allocation"]["kind"] == "owl"
    assert record["recipe"]["steps"] == [{"method": "wanda", "sparsity": 0.6, "allocation": "owl", "update": "admm"},
                                         {"method": "eora", "rank": 4}]
    model = AutoModelForCausalLM.from_pretrained(out)
    assert abs(float((model.model.layers[0].mlp.down_proj.weight == 0).float().mean()) - 0.6) < 0.1
    ids = torch.randint(0, 100, (1, 12))
    with torch.no_grad():
        sparse_logits = model(ids).logits
        adapted = peft.PeftModel.from_pretrained(model, out / "eora_adapter")
        assert not torch.allclose(adapted(ids).logits, sparse_logits)
    # the adapter holds the rank-4 residuals the run measured: the reported perplexity is with it
    assert record["pruned_perplexity"]["ppl"] != record["pruned_perplexity_without_adapter"]["ppl"]


def test_recipe_eora_step_must_follow_an_unstructured_step(tmp_path):
    with pytest.raises(ValueError, match="compensates the unstructured/N:M step right before it"):
        load_recipe("model: default\nsteps:\n  - {method: eora, rank: 8}\n")
    with pytest.raises(ValueError, match="compensates the unstructured/N:M step right before it"):
        load_recipe("model: default\nsteps:\n  - {method: flap, sparsity: 0.2}\n  - {method: eora, rank: 8}\n")
    recipe = load_recipe("model: default\nsteps:\n  - {method: sparsegpt, sparsity: 0.6, update: admm}\n"
                         "  - {method: eora, budget: 0.02}\n")
    assert recipe.steps[1].budget == 0.02


@pytest.mark.parametrize("args, message", [
    (["--allocation", "random"], "invalid choice"),
    (["--update", "admm", "--set", "steps.0.admm_iterations=0"], "admm_iterations must be a positive integer"),
    (["--set", "steps.0.admm_gradual=true"], "admm_gradual applies to update='admm'"),
    (["--eora-rank", "0"], "rank"),
])
def test_bad_flags_fail_with_a_clear_message(tiny_model_dir, tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) if message == "invalid choice" else _no_raise():
        code = main(["prune", str(tiny_model_dir), "--method", "wanda", "--sparsity", "0.5", *args, *SMALL,
                     "--out", str(tmp_path / "out")])
        assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


class _no_raise:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_recipe_file_with_new_methods_round_trips(tmp_path):
    from prunekit.recipe import dump_recipe
    text = ("model: default\nsteps:\n  - {method: ria, nm: [2, 4], permute: true, update: obs}\n"
            "  - {method: eora, rank: 8}\n")
    recipe = load_recipe(text)
    assert load_recipe(dump_recipe(recipe)) == recipe
    for method in ("gblm", "pruner-zero"):
        recipe = load_recipe(f"model: default\nsteps:\n  - {{method: {method}, sparsity: 0.5, allocation: owl}}\n")
        assert load_recipe(dump_recipe(recipe)) == recipe


def test_recipe_prune_then_recover_keeps_every_zero(tiny_model_dir, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    out = tmp_path / "out"
    recipe.write_text(f"model: {tiny_model_dir}\ncalibration: {{samples: 4, seqlen: 16}}\n"
                      "steps:\n  - {method: wanda, nm: [2, 4]}\n"
                      "  - {method: lora, steps: 6, rank: 4, lr: 0.01, batch_size: 2}\n"
                      f"eval: {{seqlen: 16, max_tokens: 256}}\nexport: {{path: {out}}}\n")
    assert main(["run", str(recipe)]) == 0
    assert "sparsity after merge: 50.00% (before 50.00%)" in capsys.readouterr().out
    from prunekit.masks import nm_violations
    model = AutoModelForCausalLM.from_pretrained(out)
    for block in model.model.layers:
        assert nm_violations(block.mlp.up_proj.weight, 2, 4) == 0
    record = json.loads((out / "prunekit.json").read_text())
    assert record["steps"][1]["sparsity_before"] == record["steps"][1]["sparsity_after"] == 0.5
