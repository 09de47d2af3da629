"""Non-uniform layer-wise sparsity (OWL, sensitivity): the global budget holds exactly."""
import pytest
import torch

from conftest import VOCAB, llama, tiny_model
from prunekit.allocation import _round_to_total, allocate, spread
from prunekit.prune import prune_
from prunekit.masks import nm_violations
from prunekit.methods.magnitude import MagnitudeConfig
from prunekit.methods.sparsegpt import SparseGPTConfig
from prunekit.methods.wanda import WandaConfig


def deep_llama(layers=6, seed=0):
    model = llama(seed, intermediate_size=128, num_hidden_layers=layers)
    with torch.no_grad():                       # uneven blocks, so the allocation has something to see
        for i, block in enumerate(model.model.layers):
            block.mlp.down_proj.weight.mul_(1 + i)
            block.mlp.gate_proj.weight[:, i * 3] *= 20     # an outlier input feature in some blocks
    return model


@pytest.fixture
def calib():
    return torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(1))


def test_spread_is_exact_bounded_and_ordered():
    keys, sizes = [0.1, 0.5, 0.2, 0.9, 0.0], [10, 10, 30, 10, 40]
    s = spread(keys, sizes, 0.6, 0.08)
    assert sum(n * v for n, v in zip(sizes, s)) / sum(sizes) == pytest.approx(0.6, abs=1e-12)
    assert all(0.52 - 1e-12 <= v <= 0.68 + 1e-12 for v in s)
    order = sorted(range(5), key=lambda i: keys[i])
    assert all(s[a] >= s[b] for a, b in zip(order, order[1:]))      # higher key, lower sparsity
    assert spread([0.3, 0.3], [1, 1], 0.5, 0.08) == [0.5, 0.5]


def test_round_to_total_hits_the_target_within_half_a_unit():
    items = [(7, 3.4), (5, 2.6), (9, 1.5), (3, 0.2)]          # (weight, ideal count)
    target = sum(w * k for w, k in items)
    counts = _round_to_total(items, target, lo=0, hi=None)
    assert abs(sum(w * k for (w, _), k in zip(items, counts)) - target) <= max(w for w, _ in items) / 2


@pytest.mark.parametrize("kind", ["owl", "sensitivity"])
@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_allocation_keeps_the_global_budget(kind, sparsity, calib):
    model = deep_llama()
    config = WandaConfig(sparsity=sparsity, allocation=kind, owl_m=3.0, allocation_lambda=0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    allocation = allocate(model, config, calib, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())   # the pre-pass changes nothing
    assert len(set(round(v, 6) for v in allocation.block_sparsity)) > 1             # it is not uniform
    assert all(abs(v - sparsity) <= 0.1 + 1e-9 for v in allocation.block_sparsity)
    report = prune_(model, config, calib, progress=False)
    zeros = sum(r.zeros for r in report.layers)
    total = sum(r.numel for r in report.layers)
    # exact up to one weight per row of one layer (each row's count is an integer)
    assert abs(zeros / total - sparsity) <= 128 / total
    assert report.to_dict()["allocation"]["kind"] == kind
    per_block = {}
    for record in report.layers:
        per_block.setdefault(record.block, []).append(record.achieved)
    assert max(map(max, per_block.values())) - min(map(min, per_block.values())) > 0.02


def test_owl_prunes_blocks_with_more_outliers_less(calib):
    model = deep_llama()
    allocation = allocate(model, WandaConfig(sparsity=0.5, allocation="owl", owl_m=3.0), calib, progress=False)
    pairs = sorted(zip(allocation.block_scores, allocation.block_sparsity))
    assert pairs[0][1] >= pairs[-1][1]
    assert pairs[0][0] < pairs[-1][0]


def test_allocation_with_nm_varies_n_and_keeps_the_total(calib):
    model = deep_llama()
    config = SparseGPTConfig(nm=(4, 8), allocation="sensitivity", allocation_lambda=0.2)
    report = prune_(model, config, calib, progress=False)
    zeros = sum(r.zeros for r in report.layers)
    total = sum(r.numel for r in report.layers)
    assert abs(zeros / total - 0.5) < 0.01
    ns = set()
    for block in model.model.layers:
        W = block.mlp.down_proj.weight
        n = int((W[0].reshape(-1, 8) == 0).sum(dim=1).min())
        assert nm_violations(W, n, 8) == 0
        ns.add(n)
    assert len(ns) > 1


def test_allocation_needs_calibration_and_a_valid_kind():
    with pytest.raises(ValueError, match="needs calibration data"):
        prune_(tiny_model("llama"), MagnitudeConfig(allocation="owl"), None, progress=False)
    with pytest.raises(ValueError, match="allocation must be one of"):
        WandaConfig(allocation="layerwise")


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2", "phi3"])
def test_allocation_runs_on_every_family(family, calib):
    model = tiny_model(family)
    report = prune_(model, WandaConfig(sparsity=0.5, allocation="owl", owl_m=2.0), calib, progress=False)
    zeros = sum(r.zeros for r in report.layers)
    total = sum(r.numel for r in report.layers)
    assert abs(zeros / total - 0.5) <= 256 / total
