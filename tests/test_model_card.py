"""The model card (README.md) written with every export: sections, numbers from prunekit.json, loadability."""
import json

import yaml
from transformers import AutoModelForCausalLM

from prunekit.cli import main
from prunekit.card import model_card
from prunekit.recipe import load_recipe


def test_exported_model_has_a_card_with_the_recorded_numbers(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    assert main(["prune", str(tiny_model_dir), "--method", "wanda", "--sparsity", "0.6", "--out", str(out),
                 "--samples", "4", "--seqlen", "32", "--set", "eval.max_tokens=640"]) == 0
    card = (out / "README.md").read_text()
    meta = json.loads((out / "prunekit.json").read_text())
    assert card.startswith("---\n")
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["library_name"] == "transformers"
    assert front["tags"] == ["pruned", "prunekit", "wanda"]
    assert "base_model" not in front                      # a local folder is no hub id
    for section in ("## Recipe", "## What was pruned", "## Metrics", "## How to load", "## Expected speed"):
        assert section in card
    assert "method: wanda" in card and "sparsity: 0.6" in card
    assert f"{meta['sparsity']['block_linear_sparsity']:.2%} of the decoder blocks' linear weights" in card
    assert f"{meta['parameters']:,} before" in card
    assert (f"- step 0: wanda, {meta['steps'][0]['sparsity_of_pruned_layers']:.2%} of the pruned layers' weights "
            "are zero") in card
    dense, pruned = meta["dense_perplexity"], meta["pruned_perplexity"]
    assert f"| perplexity, dense | {dense['ppl']:.4g} | {dense['protocol']} |" in card
    assert f"| perplexity, pruned | {pruned['ppl']:.4g} | {pruned['protocol']} |" in card
    assert "AutoModelForCausalLM.from_pretrained" in card
    assert "no speedup with dense kernels" in card
    model = AutoModelForCausalLM.from_pretrained(out)      # the card does not disturb a stock load
    assert model.config.num_hidden_layers == 2


def test_card_for_a_hub_model_names_it_and_a_width_run_says_so(tmp_path):
    recipe = load_recipe("model: owner/tiny\nsteps: [{method: wanda-sp, sparsity: 0.25}]\n")
    record = {"source": {"kind": "hub", "id": "owner/tiny", "path": None}, "parameters": 1000,
              "parameters_after": 750, "structure": {"stock": True, "num_blocks": 2},
              "steps": [{"method": "wanda-sp", "removed_fraction_of_block_params": 0.25}],
              "eval": {"suites": {"fidelity": {"kl_mean": 0.125, "protocol": "kl over 64 tokens"}}}}
    card = model_card(recipe, record)
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["base_model"] == "owner/tiny"
    assert "- parameters: 1,000 before, 750 after (25.00% removed)" in card
    assert "removed 25.00% of the block parameters" in card
    assert "| fidelity: kl_mean | 0.125 | kl over 64 tokens |" in card
    assert "physically smaller dense model" in card
