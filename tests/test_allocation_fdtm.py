"""`allocation: fdtm` (Deiseroth et al., arXiv 2311.01544, Algorithm 1): the FDT summary and the
threshold allocation on hand-built numbers, a planted important block, the exact global budget on
two families, the CLI with stock reload, determinism, and bad input."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import VOCAB, llama, tiny_model
from prunekit.allocation import allocate
from prunekit.allocation_fdtm import (fdt_at, fdt_curve, fdt_summary, probe_sparsities, sparsity_at,
                                      threshold_allocation)
from prunekit.cli import main
from prunekit.masks import nm_violations
from prunekit.methods.magnitude import MagnitudeConfig
from prunekit.methods.sparsegpt import SparseGPTConfig
from prunekit.methods.wanda import WandaConfig
from prunekit.prune import prune_
from prunekit.recipe import dump_recipe, load_recipe
from prunekit.report import sparsity_report

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = dict(fdtm_prompts=4, fdtm_prompt_tokens=8, fdtm_new_tokens=12)


@pytest.fixture
def calib():
    return torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(1))


def planted_llama(important: int, layers: int = 4):
    """Every block but `important` adds almost nothing to the residual stream (its output
    projections x 0.02), so pruning it cannot move the greedy continuation; `important` is x 5."""
    model = llama(0, intermediate_size=128, num_hidden_layers=layers)
    with torch.no_grad():
        for index, block in enumerate(model.model.layers):
            factor = 5.0 if index == important else 0.02
            block.mlp.down_proj.weight.mul_(factor)
            block.self_attn.o_proj.weight.mul_(factor)
    return model


# ------------------------------------------------------------------------------------------ exact math

def test_fdt_summary_is_the_quantile_of_the_first_mismatch_per_prompt():
    reference = torch.tensor([[5, 6, 7, 8, 9]] * 4)
    predicted = reference.clone()
    predicted[0, 0] = 1          # FDT 0
    predicted[1, 2] = 1          # FDT 2 (and a later mismatch that does not count)
    predicted[1, 4] = 1
    # prompt 2 never diverges: FDT 5 (= new tokens)
    predicted[3, 3] = 1          # FDT 3
    # sorted FDTs 0, 2, 3, 5; linear interpolation between order statistics
    assert fdt_summary(predicted, reference, 0.0) == 0.0
    assert fdt_summary(predicted, reference, 0.25) == 1.5        # 0 + 0.75 * (2 - 0)
    assert fdt_summary(predicted, reference, 0.5) == 2.5
    assert fdt_summary(predicted, reference, 1.0) == 5.0
    assert fdt_summary(reference, reference, 0.25) == 5.0        # a model agrees with itself to the end


def test_curve_points_interpolation_and_inverse_are_exact():
    # Algorithm 1's four points; a later probe that measured better is held to the earlier one
    assert fdt_curve(8, [(0.75, 12.0), (0.25, 6.0)]) == [(0.0, 8.0), (0.25, 6.0), (0.75, 6.0), (1.0, 0.0)]
    curve = fdt_curve(10, [(0.25, 10.0), (0.75, 4.0)])
    assert fdt_at(curve, 0.5) == 7.0
    assert fdt_at(curve, 0.875) == 2.0
    assert sparsity_at(curve, 10.0) == 0.25        # the flat start: the largest sparsity still at the top
    assert sparsity_at(curve, 7.0) == 0.5
    assert sparsity_at(curve, 2.0) == 0.875
    assert sparsity_at(curve, 0.0) == 1.0
    assert sparsity_at(curve, 10.5) == 0.0         # no sparsity keeps an FDT above the maximum
    assert probe_sparsities(0.5) == (0.25, 0.75)
    assert probe_sparsities(0.8) == (0.4, 0.9)     # 1.5 t would be 120%: (1 + t) / 2


def test_threshold_allocation_hand_built():
    robust = fdt_curve(10, [(0.25, 10.0), (0.75, 10.0)])     # pruning it never moves the continuation
    fragile = fdt_curve(10, [(0.25, 2.0), (0.75, 0.0)])      # pruning a quarter already diverges at token 2
    # equal sizes, target 0.5, lambda 0.2: the robust block takes the upper bound, the fragile the lower
    assert threshold_allocation([robust, fragile], [1, 1], 0.5, 0.2) == pytest.approx([0.7, 0.3], abs=1e-12)
    # unequal sizes: the mean is still exact and the fragile block is still pruned less
    sizes = [3, 1, 2]
    middle = fdt_curve(10, [(0.25, 8.0), (0.75, 3.0)])
    s = threshold_allocation([robust, fragile, middle], sizes, 0.6, 0.25)
    assert sum(n * v for n, v in zip(sizes, s)) / sum(sizes) == pytest.approx(0.6, abs=1e-12)
    assert all(0.35 - 1e-12 <= v <= 0.85 + 1e-12 for v in s)
    assert s[1] < s[2] < s[0]
    # identical curves (every flat stretch a jump) share the target exactly; lambda 0 is uniform
    assert threshold_allocation([robust] * 3, [1, 2, 3], 0.5, 0.3) == pytest.approx([0.5] * 3, abs=1e-12)
    assert threshold_allocation([robust, fragile], [1, 1], 0.5, 0.0) == [0.5, 0.5]


# ------------------------------------------------------------------------------------------ on models

@pytest.mark.parametrize("important", [0, 1, 2, 3])
def test_the_block_whose_pruning_breaks_generation_is_pruned_least(important, calib):
    model = planted_llama(important)
    config = WandaConfig(sparsity=0.5, allocation="fdtm", allocation_lambda=0.3, **FAST)
    allocation = allocate(model, config, calib, progress=False)
    s, scores = allocation.block_sparsity, allocation.block_scores
    assert min(range(4), key=lambda i: scores[i]) == important           # it diverges earliest
    others = [v for i, v in enumerate(s) if i != important]
    assert s[important] < min(others) - 1e-6                              # and keeps the most weights
    assert s[important] == pytest.approx(0.2)                            # the lower bound, target - lambda
    assert allocation.planned == pytest.approx(0.5, abs=1e-3)


def test_fdtm_keeps_the_global_budget_and_the_weights_until_pruning(calib):
    model = planted_llama(1)
    config = WandaConfig(sparsity=0.6, allocation="fdtm", allocation_lambda=0.3, **FAST)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    first = allocate(model, config, calib, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())   # the probes are undone
    second = allocate(model, config, calib, progress=False)
    assert first.to_dict() == second.to_dict() and first.layers == second.layers   # deterministic
    assert len(set(round(v, 6) for v in first.block_sparsity)) > 1
    report = prune_(model, config, calib, progress=False)
    zeros = sum(r.zeros for r in report.layers)
    total = sum(r.numel for r in report.layers)
    assert abs(zeros / total - 0.6) <= 128 / total        # one weight per row of one layer at most
    record = report.to_dict()["allocation"]
    assert record["kind"] == "fdtm" and len(record["block_scores"]) == len(record["block_sparsity"]) == 4
    assert record["block_sparsity"] == [round(v, 6) for v in first.block_sparsity]
    per_block = {}
    for layer in report.layers:
        per_block.setdefault(layer.block, []).append(layer.achieved)
    assert min(per_block[1]) < min(min(v) for b, v in per_block.items() if b != 1)


@pytest.mark.parametrize("family", ["qwen2", "opt"])
def test_fdtm_budget_is_exact_on_other_families(family, calib):
    model = tiny_model(family)
    with torch.no_grad():                          # block 0 matters, block 1 barely: a non-uniform answer
        for parameter in model.model.decoder.layers[1].parameters() if family == "opt" else \
                model.model.layers[1].mlp.down_proj.parameters():
            parameter.mul_(0.02)
    config = WandaConfig(sparsity=0.5, allocation="fdtm", allocation_lambda=0.2, **FAST)
    report = prune_(model, config, calib, progress=False)
    zeros = sum(r.zeros for r in report.layers)
    total = sum(r.numel for r in report.layers)
    assert abs(zeros / total - 0.5) <= 128 / total
    assert report.to_dict()["allocation"]["kind"] == "fdtm"


def test_fdtm_with_nm_varies_n_per_block_and_keeps_the_total(calib):
    model = planted_llama(2)
    config = SparseGPTConfig(nm=(4, 8), allocation="fdtm", allocation_lambda=0.2, **FAST)
    report = prune_(model, config, calib, progress=False)
    zeros = sum(r.zeros for r in report.layers)
    total = sum(r.numel for r in report.layers)
    assert abs(zeros / total - 0.5) < 0.01
    ns = []
    for block in model.model.layers:
        W = block.mlp.down_proj.weight
        n = int((W[0].reshape(-1, 8) == 0).sum(dim=1).min())
        assert nm_violations(W, n, 8) == 0
        ns.append(n)
    assert ns[2] == min(ns) and len(set(ns)) > 1


def test_cli_and_recipe_prune_with_fdtm_and_the_output_reloads_stock(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["prune", str(tiny_model_dir), "--method", "wanda", "--sparsity", "0.5", "--allocation", "fdtm",
                 "--samples", "4", "--seqlen", "16", "--no-eval", "--set", "steps.0.fdtm_prompts=2",
                 "--set", "steps.0.fdtm_new_tokens=4", "--out", str(out)]) == 0
    assert "fdtm allocation" in capsys.readouterr().out
    record = json.loads((out / "prunekit.json").read_text())
    assert record["steps"][0]["allocation"]["kind"] == "fdtm"
    assert record["recipe"]["steps"] == [{"method": "wanda", "allocation": "fdtm", "fdtm_prompts": 2,
                                          "fdtm_new_tokens": 4}]                  # 0.5: the default, left out
    model = AutoModelForCausalLM.from_pretrained(out)                        # stock transformers
    assert sparsity_report(model)["block_linear_sparsity"] == pytest.approx(0.5, abs=0.01)
    text = "model: default\nsteps:\n- method: wanda\n  sparsity: 0.5\n  allocation: fdtm\n  fdtm_quantile: 0.5\n"
    recipe = load_recipe(text)
    assert recipe.steps[0].allocation == "fdtm" and recipe.steps[0].fdtm_quantile == 0.5
    assert load_recipe(dump_recipe(recipe)) == recipe


# ------------------------------------------------------------------------------------------ bad input

def test_fdtm_needs_calibration_and_valid_parameters(tiny_model_dir, tmp_path, capsys):
    with pytest.raises(ValueError, match="needs calibration data"):
        prune_(tiny_model("llama"), MagnitudeConfig(allocation="fdtm"), None, progress=False)
    with pytest.raises(ValueError, match="allocation 'fdtm' needs calibration data"):
        allocate(tiny_model("llama"), MagnitudeConfig(allocation="fdtm"), None, progress=False)
    with pytest.raises(ValueError, match="fdtm_new_tokens must be a positive integer"):
        WandaConfig(allocation="fdtm", fdtm_new_tokens=0)
    with pytest.raises(ValueError, match="fdtm_prompts must be a positive integer"):
        WandaConfig(allocation="fdtm", fdtm_prompts=2.5)
    with pytest.raises(ValueError, match=r"fdtm_quantile must be a number in \[0, 1\]"):
        WandaConfig(allocation="fdtm", fdtm_quantile=1.5)
    with pytest.raises(ValueError, match="allocation must be one of uniform, owl, sensitivity, fdtm"):
        WandaConfig(allocation="fdt")
    # a bad parameter through the CLI fails before any work and writes nothing
    assert main(["prune", str(tiny_model_dir), "--method", "wanda", "--sparsity", "0.5", "--allocation", "fdtm",
                 "--samples", "4", "--seqlen", "16", "--set", "steps.0.fdtm_quantile=2",
                 "--out", str(tmp_path / "out")]) == 2
    assert "fdtm_quantile must be a number in [0, 1]" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
