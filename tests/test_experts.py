"""Expert pruning (experts.py, models/moe.py, surgery.keep_experts_ and the expert methods).

Exact answers first (slicing on hand-built tensors, routing against each family's own router,
leave-one-out and NAEE against removing the experts for real), then the family matrix: prune ->
save -> stock reload -> same logits, generate with and without the KV cache; then the refusals.
"""
import copy

import pytest
import torch
from conftest import MOE_CONFIGS, VOCAB, tiny_moe
from transformers import AutoModelForCausalLM

import prunekit.catalog  # registers the methods
from prunekit.experts import ExpertsConfig, choose, global_counts, observe
from prunekit.io.export import save_pretrained_atomic
from prunekit.io.loading import load_pruned
from prunekit.methods.easy_ep import EasyEpConfig
from prunekit.methods.expert_frequency import ExpertFrequencyConfig
from prunekit.methods.expert_loo import ExpertLooConfig, loo_errors
from prunekit.methods.expert_output import ExpertOutputConfig
from prunekit.methods.expert_random import ExpertRandomConfig
from prunekit.methods.naee import NaeeConfig, dropped_subsets, subset_count
from prunekit.methods.reap import ReapConfig
from prunekit.models import spec_for
from prunekit.models.moe import expert_weights, route
from prunekit.models.spec import get_module
from prunekit.prune import prune_
from prunekit.surgery import keep_experts_

FAMILIES = sorted(MOE_CONFIGS)
CALIB = torch.randint(3, VOCAB, (4, 16), generator=torch.Generator().manual_seed(1))


def moe_block(model, index=None):
    spec = spec_for(model)
    blocks = get_module(model, spec.blocks)
    index = len(blocks) - 1 if index is None else index
    return blocks[index], spec.experts


# --- exact: slicing, routing ---------------------------------------------------------------------

def test_keep_experts_slices_every_expert_tensor_in_the_order_given():
    model = tiny_moe("gpt_oss")                     # transposed experts, biases, router bias
    block, moe = moe_block(model)
    experts, router = get_module(block, moe.experts), get_module(block, moe.router)
    with torch.no_grad():
        for tensor in (experts.gate_up_proj, experts.gate_up_proj_bias, experts.down_proj, experts.down_proj_bias,
                       router.weight, router.bias):
            for j in range(8):
                tensor[j] = j
    keep_experts_(block, moe, torch.tensor([6, 1, 3]))
    for tensor in (experts.gate_up_proj, experts.gate_up_proj_bias, experts.down_proj, experts.down_proj_bias,
                   router.weight, router.bias):
        assert tensor.shape[0] == 3
        assert [float(tensor.detach()[i].flatten()[0]) for i in range(3)] == [6.0, 1.0, 3.0]
    assert experts.num_experts == 3 and router.num_experts == 3


def test_keep_experts_slices_the_correction_bias_and_refuses_bad_indices():
    model = tiny_moe("deepseek_v3")
    block, moe = moe_block(model)
    router = get_module(block, moe.router)
    before = router.e_score_correction_bias.clone()
    keep_experts_(block, moe, torch.tensor([0, 2, 5, 7]))
    assert torch.equal(router.e_score_correction_bias, before[[0, 2, 5, 7]])
    with pytest.raises(ValueError, match="distinct indices"):
        keep_experts_(block, moe, torch.tensor([0, 0]))


def test_expert_weights_views_follow_each_layout():
    for family in ("mixtral", "gpt_oss"):
        model = tiny_moe(family)
        block, moe = moe_block(model)
        experts = get_module(block, moe.experts)
        views = expert_weights(experts, moe, 3)
        x = torch.randn(5, 32)
        gate, up = x @ views["gate"].T, x @ views["up"].T                      # (5, I)
        if family == "mixtral":
            h = torch.nn.functional.silu(gate) * up
            expected = h @ views["down"].T
        else:
            gate_up = torch.stack([gate, up], dim=-1).flatten(-2) + experts.gate_up_proj_bias[3]
            expected = experts._apply_gate(gate_up) @ views["down"].T + experts.down_proj_bias[3]
            h = None
        index = torch.full((5, 1), 3)
        got = experts(x, index, torch.ones(5, 1))
        assert torch.allclose(got, expected, atol=1e-5), family
        assert h is None or h.shape == (5, 48)


@pytest.mark.parametrize("family", FAMILIES)
def test_route_matches_the_family_router_and_the_router_of_a_smaller_model(family):
    """Our routing from logits equals the family's router; excluding experts equals the router of
    a block whose experts were removed by surgery (indices mapped back)."""
    model = tiny_moe(family)
    block, moe = moe_block(model)
    router = get_module(block, moe.router)
    x = torch.randn(64, 32)
    with torch.no_grad():
        logits, weights, chosen = router(x)
        ours_w, ours_c = route(moe, router, logits)
        assert torch.equal(ours_c.sort(-1).values, chosen.sort(-1).values)
        order_ours, order_theirs = ours_c.sort(-1).indices, chosen.sort(-1).indices
        assert torch.allclose(ours_w.gather(1, order_ours), weights.float().gather(1, order_theirs), atol=1e-6)

        kept = torch.tensor([0, 1, 2, 3]) if family in ("deepseek_v3", "glm4_moe") else torch.tensor([0, 2, 3, 5, 6])
        if family in ("deepseek_v3", "glm4_moe"):
            kept = torch.tensor([0, 1, 4, 5])                  # two per routing group
        excluded = torch.ones(8, dtype=torch.bool)
        excluded[kept] = False
        masked_w, masked_c = route(moe, router, logits, excluded)
        small = copy.deepcopy(block)
        keep_experts_(small, moe, kept)
        _, small_w, small_c = get_module(small, moe.router)(x)
        small_c = kept[small_c]                                # back to the full model's numbering
        assert torch.equal(masked_c.sort(-1).values, small_c.sort(-1).values)
        assert torch.allclose(masked_w.gather(1, masked_c.sort(-1).indices),
                              small_w.float().gather(1, small_c.sort(-1).indices), atol=1e-6)


def test_choose_keeps_the_highest_per_group_in_index_order():
    scores = torch.tensor([0.1, 0.9, 0.5, 0.5, 0.8, 0.2, 0.3, 0.7])
    assert choose(scores, 4).tolist() == [1, 2, 4, 7]
    assert choose(scores, 4, groups=2).tolist() == [1, 2, 4, 7]
    assert choose(scores, 2, groups=2).tolist() == [1, 4]
    assert choose(torch.tensor([1.0, 1.0, 1.0]), 2).tolist() == [0, 1]     # ties: lower index


def test_global_counts_rank_shares_over_blocks_with_floors():
    shares = [torch.tensor([0.7, 0.1, 0.1, 0.1]), torch.tensor([0.25, 0.25, 0.25, 0.25])]
    assert global_counts(shares, 5, [2, 2]) == [2, 3]
    assert global_counts(shares, 4, [2, 2]) == [2, 2]
    with pytest.raises(ValueError, match="top-k"):
        global_counts(shares, 3, [2, 2])


# --- scores on known answers ---------------------------------------------------------------------

def _routed(model, index=None):
    from prunekit.core.stream import block_stream
    spec = spec_for(model)
    index = len(get_module(model, spec.blocks)) - 1 if index is None else index
    for step in block_stream(model, CALIB, progress=False):
        if step.index == index:
            return observe(step, spec.experts)


def test_statistics_are_the_sums_over_the_routed_tokens():
    model = tiny_moe("mixtral")
    routed = _routed(model)
    stats = routed.statistics()
    assert int(stats.counts.sum()) == routed.x.shape[0] * 2                  # top-2: every token twice
    for expert in (0, 5):
        rows, slot = torch.where(routed.chosen == expert)
        y = routed.experts(routed.x[rows], torch.full((rows.numel(), 1), expert), torch.ones(rows.numel(), 1))
        w = routed.weights[rows, slot]
        assert stats.counts[expert] == rows.numel()
        assert torch.isclose(stats.reap[expert], (w * y.norm(dim=-1)).sum().double(), rtol=1e-5)
        assert torch.isclose(stats.norm[expert], y.norm(dim=-1).sum().double(), rtol=1e-5)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_leave_one_out_equals_removing_the_expert(family):
    """LOO_j sums ||MoE(x) - MoE without j (re-routed)||^2: the same as removing j for real."""
    model = tiny_moe(family)
    routed = _routed(model)
    rows = torch.arange(routed.x.shape[0])
    errors = loo_errors(routed, rows)
    block, moe = moe_block(model)
    moe_module = get_module(block, moe.module)
    x = routed.x.unsqueeze(0)
    with torch.no_grad():
        full = moe_module(x)
        full = full[0] if isinstance(full, tuple) else full
        groups = 2 if family == "deepseek_v3" else 1
        if groups == 1:
            for expert in (0, 3, 7):
                smaller = copy.deepcopy(moe_module)
                keep_experts_(torch.nn.ModuleDict({"mlp": smaller}), _rebased(moe),
                              torch.tensor([j for j in range(8) if j != expert]))
                out = smaller(x)
                out = out[0] if isinstance(out, tuple) else out
                assert torch.isclose(errors[expert], (full - out).square().sum().double(), rtol=1e-4, atol=1e-9)
    assert (errors >= 0).all() and errors.sum() > 0


def _rebased(moe):
    """The spec's Experts with paths relative to a ModuleDict holding the MoE module as "mlp"."""
    from dataclasses import replace
    prefix = moe.module
    return replace(moe, module="mlp", router="mlp" + moe.router[len(prefix):],
                   experts="mlp" + moe.experts[len(prefix):])


def test_leave_one_out_is_zero_for_an_expert_no_token_reaches():
    model = tiny_moe("gpt_oss")                      # its router has a bias: expert 4 is never chosen
    block, moe = moe_block(model)
    with torch.no_grad():
        get_module(block, moe.router).bias[4] = -1e4
    routed = _routed(model)
    assert not (routed.chosen == 4).any()
    errors = loo_errors(routed, torch.arange(routed.x.shape[0]))
    assert errors[4] == 0 and (errors[[0, 1, 2, 3, 5, 6, 7]] > 0).all()


def test_naee_picks_the_subset_whose_removal_changes_the_output_least():
    model = tiny_moe("mixtral")
    routed = _routed(model)
    block, moe = moe_block(model)
    moe_module = get_module(block, moe.module)
    x = routed.x.unsqueeze(0)
    cfg = NaeeConfig(experts=6)
    scores = prunekit.catalog.get_method("naee").fn(routed, cfg, 6)
    with torch.no_grad():
        full = moe_module(x)
        errors = {}
        for subset in dropped_subsets(8, 2):
            smaller = copy.deepcopy(moe_module)
            keep_experts_(torch.nn.ModuleDict({"mlp": smaller}), _rebased(moe),
                          torch.tensor([j for j in range(8) if j not in subset]))
            errors[subset] = float((full - smaller(x)).square().sum())
    best = min(errors, key=errors.get)
    assert sorted(torch.where(scores == 0)[0].tolist()) == list(best)


def test_naee_subsets_are_equal_per_group_and_refused_when_too_many():
    assert subset_count(8, 4) == 70 and subset_count(8, 4, groups=2) == 36
    subsets = list(dropped_subsets(8, 4, groups=2))
    assert len(subsets) == 36 and all(sum(i < 4 for i in s) == 2 for s in subsets)
    model = tiny_moe("mixtral")
    with pytest.raises(ValueError, match=r"C\(8, 4\) = 70 subsets.*expert-loo"):
        prune_(model, NaeeConfig(sparsity=0.5, max_subsets=10), CALIB, progress=False)
    with pytest.raises(ValueError, match="uniform"):
        NaeeConfig(sparsity=0.5, uniform=False)


# --- the family matrix -----------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_family_prune_save_stock_reload_generate(family, tmp_path):
    model = tiny_moe(family)
    report = prune_(model, ReapConfig(sparsity=0.5), CALIB, progress=False)
    spec = spec_for(model)
    counts = {w.get("experts") for w in report.widths} - {None}
    assert counts == {4}
    assert getattr(model.config, spec.experts.count_key) == 4
    assert model.config.num_experts_per_tok == 2
    out = save_pretrained_atomic(model, None, tmp_path / "out", metadata={"prunekit_version": "test"})
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(reloaded) is type(model)
    ids = CALIB[:2]
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, model(ids).logits, atol=1e-5)
        prompt = CALIB[:1, :6]
        cached = reloaded.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True)
        uncached = reloaded.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("config", [ExpertFrequencyConfig(sparsity=0.25), ExpertOutputConfig(experts=5),
                                    EasyEpConfig(sparsity=0.5), ExpertLooConfig(sparsity=0.5),
                                    ExpertRandomConfig(sparsity=0.5, seed=3)],
                         ids=lambda c: type(c).__name__)
def test_every_expert_method_removes_the_asked_count(config):
    model = tiny_moe("qwen2_moe")
    shared_before = copy.deepcopy(get_module(moe_block(model)[0], "mlp.shared_expert").state_dict())
    report = prune_(model, config, CALIB, progress=False)
    keep = config.to_keep(8)
    assert {w["experts"] for w in report.widths} == {keep}
    assert all(len(k) == keep for k in report.scores["kept"].values())
    shared_after = get_module(moe_block(model)[0], "mlp.shared_expert").state_dict()
    assert all(torch.equal(shared_before[k], shared_after[k]) for k in shared_before)    # never dropped


def test_non_uniform_records_counts_and_loads_with_load_pruned(tmp_path):
    model = tiny_moe("mixtral")
    report = prune_(model, ReapConfig(sparsity=0.5, uniform=False), CALIB, progress=False)
    counts = [w["experts"] for w in report.widths]
    assert sum(counts) == 12 and min(counts) >= 2
    from prunekit.surgery import structure_record
    record = {"prunekit_version": "test", "structure": structure_record(model)}
    assert len(set(counts)) > 1 and record["structure"]["stock"] is False
    out = save_pretrained_atomic(model, None, tmp_path / "out", metadata=record)
    reloaded = _load_pruned_model(out)
    with torch.no_grad():
        assert torch.allclose(reloaded(CALIB[:2]).logits, model(CALIB[:2]).logits, atol=1e-5)


def _load_pruned_model(path):
    """load_pruned without a tokenizer (the tiny models have none)."""
    from unittest import mock
    with mock.patch("prunekit.io.loading.load_tokenizer", return_value=None):
        return load_pruned(path)[0]


# --- refusals -------------------------------------------------------------------------------------

def test_grouped_routing_refuses_counts_that_do_not_divide():
    model = tiny_moe("deepseek_v3")
    with pytest.raises(ValueError, match="n_group=2.*multiple of 2"):
        prune_(model, ReapConfig(experts=5), CALIB, progress=False)
    with pytest.raises(ValueError, match="best two"):
        prune_(model, ReapConfig(experts=2), CALIB, progress=False)
    report = prune_(model, ReapConfig(experts=6), CALIB, progress=False)
    for kept in report.scores["kept"].values():
        assert sum(i < 4 for i in kept) == 3                                  # 3 of each group of 4


def test_fewer_experts_than_top_k_is_refused_with_the_numbers():
    model = tiny_moe("mixtral")
    with pytest.raises(ValueError, match=r"keeping 1 of 8 experts.*num_experts_per_tok=2"):
        prune_(model, ReapConfig(sparsity=0.9), CALIB, progress=False)
    assert get_module(moe_block(model)[0], "mlp.experts").gate_up_proj.shape[0] == 8      # nothing changed


def test_a_dense_model_is_refused_naming_its_type():
    from conftest import llama
    with pytest.raises(ValueError, match=r"'llama' \(LlamaForCausalLM\) has no experts; MoE model types: .*mixtral"):
        prune_(llama(), ReapConfig(sparsity=0.5), torch.randint(0, VOCAB, (2, 8)), progress=False)


def test_config_validation():
    with pytest.raises(ValueError, match="exactly one"):
        ExpertsConfig()
    with pytest.raises(ValueError, match="in \\(0, 1\\)"):
        ReapConfig(sparsity=1.0)
    with pytest.raises(ValueError, match="removes no expert"):
        ReapConfig(experts=8).to_keep(8)
