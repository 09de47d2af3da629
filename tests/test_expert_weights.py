"""Unstructured / N:M pruning inside routed experts (expert_weights.py, methods/moe_pruner.py):
each expert pruned with the statistics of the tokens routed to it, checked against a hand
computation from the tokens the dense model routes; exact sparsity per expert; the fallback."""
import copy

import pytest
import torch
from conftest import VOCAB, tiny_moe

import prunekit.catalog  # registers the methods
from prunekit.expert_weights import intermediate
from prunekit.masks import lowest, nm_violations
from prunekit.methods.gblm import GBLMConfig
from prunekit.methods.moe_pruner import MoePrunerConfig
from prunekit.methods.sparsegpt import SparseGPTConfig
from prunekit.methods.wanda import WandaConfig
from prunekit.models import spec_for
from prunekit.models.spec import get_module
from prunekit.prune import prune_

CALIB = torch.randint(3, VOCAB, (8, 16), generator=torch.Generator().manual_seed(2))

assert prunekit.catalog


def experts_of(model, index):
    spec = spec_for(model)
    return get_module(get_module(model, spec.blocks)[index], spec.experts.experts), spec.experts


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_intermediate_is_the_input_of_the_down_projection(family):
    model = tiny_moe(family)
    experts, moe = experts_of(model, 1)
    x = torch.randn(7, 32)
    with torch.no_grad():
        A = intermediate(experts, moe, 3, x)                                              # (7, I)
        down = experts.down_proj[3]
        out = A @ down if moe.transposed else A @ down.T
        if hasattr(experts, "down_proj_bias"):
            out = out + experts.down_proj_bias[3]
        expected = experts(x, torch.full((7, 1), 3), torch.ones(7, 1))
    assert torch.allclose(out, expected, atol=1e-5)


def _routed_inputs(model, index):
    """The tokens (and routing weights) each expert of block `index` receives in the dense model."""
    experts, _ = experts_of(model, index)
    seen = []
    handle = experts.register_forward_pre_hook(lambda m, args: seen.append(args))
    with torch.no_grad():
        for chunk in CALIB.split(8):
            model(chunk)
    handle.remove()
    x = torch.cat([a[0] for a in seen])
    chosen = torch.cat([a[1] for a in seen])
    weights = torch.cat([a[2] for a in seen]).float()
    return x, chosen, weights


@pytest.mark.parametrize("config", [WandaConfig(sparsity=0.5, targets=("experts",), expert_min_tokens=0),
                                    MoePrunerConfig(sparsity=0.5, targets=("experts",), expert_min_tokens=0)],
                         ids=["wanda", "moe-pruner"])
def test_each_expert_is_pruned_with_the_statistics_of_its_routed_tokens(config):
    model = tiny_moe("mixtral")
    dense = copy.deepcopy(model)
    index = 0                        # the first block: its inputs do not depend on earlier pruning
    x, chosen, weights = _routed_inputs(dense, index)
    prune_(model, config, CALIB, progress=False)
    dense_experts, moe = experts_of(dense, index)
    pruned_experts, _ = experts_of(model, index)
    weighted = isinstance(config, MoePrunerConfig)
    for expert in range(8):
        rows, slot = torch.where(chosen == expert)
        X = x[rows] * (weights[rows, slot].unsqueeze(-1) if weighted else 1)
        W = dense_experts.gate_up_proj[expert].detach()
        expected = W.masked_fill(lowest(W.abs() * X.square().sum(0).sqrt(), 0.5, None, "row"), 0)
        assert torch.equal(pruned_experts.gate_up_proj[expert], expected), expert
        A = intermediate(pruned_experts, moe, expert, x[rows]) * (weights[rows, slot].unsqueeze(-1) if weighted else 1)
        W = dense_experts.down_proj[expert].detach()
        expected = W.masked_fill(lowest(W.abs() * A.square().sum(0).sqrt(), 0.5, None, "row"), 0)
        assert torch.allclose(pruned_experts.down_proj[expert], expected), expert


def test_moe_pruner_and_wanda_choose_differently():
    a, b = tiny_moe("mixtral"), tiny_moe("mixtral")
    prune_(a, WandaConfig(sparsity=0.5, targets=("experts",), expert_min_tokens=0), CALIB, progress=False)
    prune_(b, MoePrunerConfig(sparsity=0.5, targets=("experts",), expert_min_tokens=0), CALIB, progress=False)
    assert not torch.equal(experts_of(a, 2)[0].down_proj, experts_of(b, 2)[0].down_proj)


@pytest.mark.parametrize("family", ["qwen2_moe", "gpt_oss", "deepseek_v3"])
def test_sparsity_is_exact_per_expert_for_unstructured_and_2_4(family):
    for config in (SparseGPTConfig(sparsity=0.5), SparseGPTConfig(nm=(2, 4))):
        model = tiny_moe(family)
        report = prune_(model, config, CALIB, progress=False)
        records = [r for r in report.layers if ".experts." in r.name]
        assert len(records) == 2 * 8 * sum(1 for w in report.layers if w.name.endswith("0.gate_up_proj"))
        for record in records:
            assert record.problem is None and record.zeros == record.numel // 2, record.name
        experts, moe = experts_of(model, 2)
        for expert in range(8):
            for name in ("gate_up_proj", "down_proj"):
                W = getattr(experts, name)[expert]
                W = W.T if moe.transposed else W                                      # (out, in)
                assert int((W == 0).sum()) == W.numel() // 2          # SparseGPT selects per matrix
                if config.nm:
                    assert nm_violations(W, 2, 4) == 0


def test_experts_with_too_few_tokens_fall_back_to_magnitude_and_say_so():
    model = tiny_moe("mixtral")
    dense = copy.deepcopy(model)
    report = prune_(model, WandaConfig(sparsity=0.5, targets=("experts",), expert_min_tokens=10**6), CALIB,
                    progress=False)
    records = [r for r in report.layers if ".experts." in r.name]
    assert records and all(r.note and "magnitude" in r.note for r in records)
    W = experts_of(dense, 1)[0].gate_up_proj[0].detach()
    assert torch.equal(experts_of(model, 1)[0].gate_up_proj[0], W.masked_fill(lowest(W.abs(), 0.5, None, "row"), 0))


def test_gradient_methods_refuse_the_experts_with_a_way_out():
    with pytest.raises(ValueError, match="--ignore experts"):
        prune_(tiny_moe("mixtral"), GBLMConfig(sparsity=0.5), CALIB, progress=False)
