"""expert-merge (methods/expert_merge.py): HC-SMoE clustering and frequency-weighted merging.

Exact answers first (average linkage on hand-built distances, the weighted average on hand-built
tensors, merging a duplicate expert), then one real block merged by hand, then the family matrix:
merge -> save -> stock reload -> same logits; grouped routing; the refusals.
"""
import copy

import pytest
import torch
from conftest import MOE_CONFIGS, VOCAB, tiny_moe
from transformers import AutoModelForCausalLM

import prunekit.catalog  # noqa: F401  (registers the methods)
from prunekit.core.stream import block_stream
from prunekit.experts import choose, observe
from prunekit.io.export import save_pretrained_atomic
from prunekit.methods.expert_merge import (ExpertMergeConfig, average_linkage, block_clusters, cluster_experts,
                                           cluster_logit, fit_router_row, merge_experts_, merge_weights,
                                           representative_scores, representatives, weighted_average)
from prunekit.models import spec_for
from prunekit.models.moe import groups_of, is_moe_block
from prunekit.models.spec import get_module
from prunekit.prune import prune_
from prunekit.registry import method_for_config

FAMILIES = sorted(MOE_CONFIGS)
CALIB = torch.randint(3, VOCAB, (4, 16), generator=torch.Generator().manual_seed(1))


def _distances(pairs: dict, size: int) -> torch.Tensor:
    distances = torch.zeros(size, size)
    for (i, j), value in pairs.items():
        distances[i, j] = distances[j, i] = value
    return distances


# --- exact: clustering, averaging ----------------------------------------------------------------

def test_average_linkage_joins_by_the_mean_pairwise_distance():
    # points on a line at 0, 1, 10, 11, 30
    points = torch.tensor([0.0, 1.0, 10.0, 11.0, 30.0])
    distances = (points[:, None] - points[None, :]).abs()
    assert average_linkage(distances, 5) == [[0], [1], [2], [3], [4]]
    assert average_linkage(distances, 3) == [[0, 1], [2, 3], [4]]
    assert average_linkage(distances, 2) == [[0, 1, 2, 3], [4]]
    assert average_linkage(distances, 1) == [[0, 1, 2, 3, 4]]
    # after {1, 2} (distance 1): d({0}, {1,2}) = mean(2, 10) = 6 > d({1,2}, {3}) = 5, so {1,2,3};
    # single linkage would join {0,1,2} (min 2)
    pairs = {(0, 1): 2, (0, 2): 10, (0, 3): 8, (1, 2): 1, (1, 3): 5, (2, 3): 5}
    assert average_linkage(_distances(pairs, 4), 2) == [[0], [1, 2, 3]]
    # with d(0, 2) = 7: mean(2, 7) = 4.5 < 5, so {0,1,2}; complete linkage would join {1,2,3} (max 7)
    pairs[(0, 2)] = 7
    assert average_linkage(_distances(pairs, 4), 2) == [[0, 1, 2], [3]]
    # ties: the lowest pair first
    assert average_linkage(torch.ones(4, 4), 3) == [[0, 1], [2], [3]]
    with pytest.raises(ValueError, match="cannot make 5 clusters of 4"):
        average_linkage(torch.ones(4, 4), 5)


def test_grouped_clusters_never_cross_a_routing_group():
    points = torch.tensor([0.0, 5.0, 20.0, 40.0, 0.5, 5.5, 20.5, 40.5])       # 0~4, 1~5, ... across groups
    distances = (points[:, None] - points[None, :]).abs()
    assert cluster_experts(distances, 4) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    # within each group (0, 5, 20, 40): {0, 5} at 5, then {0, 5} and 20 at mean(20, 15) = 17.5 < 20
    assert cluster_experts(distances, 4, groups=2) == [[0, 1, 2], [3], [4, 5, 6], [7]]
    with pytest.raises(ValueError, match="equally per group"):
        cluster_experts(distances, 3, groups=2)


def test_frequency_weighted_average_on_hand_built_tensors():
    a, b, c = torch.full((2, 3), 1.0), torch.full((2, 3), 5.0), torch.full((2, 3), 100.0)
    stacked = torch.stack([a, b, c])                                            # (3, 2, 3)
    assert torch.allclose(merge_weights(torch.tensor([1.0, 3.0, 0.0])), torch.tensor([0.25, 0.75, 0.0]).double())
    assert torch.equal(weighted_average(stacked, torch.tensor([1, 3, 0])), torch.full((2, 3), 4.0))
    assert torch.allclose(weighted_average(stacked, torch.zeros(3)), torch.full((2, 3), 106 / 3))   # uniform
    half = weighted_average(stacked.bfloat16(), torch.tensor([1, 1, 0]))
    assert half.dtype == torch.bfloat16 and torch.equal(half.float(), torch.full((2, 3), 3.0))


def test_representatives_are_the_most_frequent_members_and_choose_keeps_them():
    clusters = [[0, 3], [1, 2, 5], [4]]
    counts = torch.tensor([4.0, 2.0, 7.0, 9.0, 0.0, 7.0])
    assert representatives(clusters, counts) == [3, 2, 4]                       # ties (2, 5): lower index
    scores = representative_scores(clusters, counts)
    assert choose(scores, 3).tolist() == [2, 3, 4]


def test_cluster_logit_gives_the_summed_probability():
    logits = torch.randn(5, 6)
    members = [1, 4]
    merged = cluster_logit(logits[:, members], "softmax")                           # (5,)
    rest = logits[:, [0, 2, 3, 5]]
    new = torch.softmax(torch.cat([merged[:, None].float(), rest], dim=1), dim=1)[:, 0]
    assert torch.allclose(new, torch.softmax(logits, dim=1)[:, members].sum(dim=1), atol=1e-6)
    sigmoid = cluster_logit(torch.tensor([[-1.0, -2.0]]), "sigmoid-grouped")
    assert torch.allclose(sigmoid.sigmoid(), torch.tensor([-1.0, -2.0]).sigmoid().sum().double())


def test_fit_router_row_recovers_an_exact_linear_target():
    x = torch.randn(200, 6, generator=torch.Generator().manual_seed(0))
    row, bias = torch.randn(6), 0.7
    solved = fit_router_row(x, x @ row + bias, torch.zeros(7), ridge=1e-9, intercept=True)
    assert torch.allclose(solved[:6].float(), row, atol=1e-5) and abs(float(solved[6]) - bias) < 1e-5
    prior = torch.randn(6).double()
    assert torch.allclose(fit_router_row(x, torch.zeros(200), prior, ridge=1e6), prior, atol=1e-4)   # ridge -> prior


# --- exact: merging a duplicate expert -------------------------------------------------------------

def _top1_moe_with_a_duplicate(family):
    """`tiny_moe(family)` routed top-1, with expert 1 a copy of expert 0 (weights, router row, biases)
    in every MoE block."""
    config = MOE_CONFIGS[family]()
    config.num_experts_per_tok = 1
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    spec = spec_for(model)
    with torch.no_grad():
        for block in get_module(model, spec.blocks):
            if not is_moe_block(block, spec.experts):
                continue
            router, experts = get_module(block, spec.experts.router), get_module(block, spec.experts.experts)
            router.weight.normal_(0, 0.5)
            for param in [*experts.parameters(recurse=False), *router.parameters(recurse=False)]:
                param[1] = param[0]
    return model


@pytest.mark.parametrize("router", ["frequent", "average"])
@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "granitemoe", "gpt_oss"])
def test_merging_a_duplicate_expert_changes_nothing(family, router):
    """Top-1 routing with renormalised weights: the copy and the original tie, one of them is chosen
    with weight 1, and after the merge the merged expert (the same function, the same row) is."""
    model = _top1_moe_with_a_duplicate(family)
    with torch.no_grad():
        before = model(CALIB).logits
    report = prune_(model, ExpertMergeConfig(experts=7, router=router), CALIB, progress=False)
    assert all(set(kept) >= set(range(2, 8)) for kept in report.scores["kept"].values())   # {0, 1} merged
    with torch.no_grad():
        assert torch.allclose(model(CALIB).logits, before, atol=1e-5)


# --- one real block, by hand -----------------------------------------------------------------------

def _routed(model, index):
    spec = spec_for(model)
    for step in block_stream(model, CALIB, progress=False):
        if step.index == index:
            return observe(step, spec.experts)


@pytest.mark.parametrize("family", ["gpt_oss", "deepseek_v3"])
def test_merge_writes_the_weighted_average_of_each_cluster(family):
    model = tiny_moe(family)
    spec, moe = spec_for(model), spec_for(model).experts
    block = get_module(model, spec.blocks)[2]
    routed = _routed(model, 2)
    cfg = ExpertMergeConfig(experts=4, router="average")
    with torch.no_grad():
        scores = method_for_config(cfg).fn(routed, cfg, 4)
    groups = groups_of(routed.router)
    kept = choose(scores, 4, groups)
    clusters = block_clusters(routed, cfg, 4)
    assert len(clusters) == 4 and sorted(i for c in clusters for i in c) == list(range(8))
    assert all(max(c) < 4 or min(c) >= 4 for c in clusters) or groups == 1
    counts = routed.statistics().counts
    experts, router = get_module(block, moe.experts), get_module(block, moe.router)
    originals = {name: p.detach().clone() for name, p in [*experts.named_parameters(recurse=False),
                                                          *router.named_parameters(recurse=False),
                                                          *router.named_buffers(recurse=False)]}
    with torch.no_grad():
        merge_experts_(block, moe, routed, kept, cfg)
    after = dict([*experts.named_parameters(recurse=False), *router.named_parameters(recurse=False),
                  *router.named_buffers(recurse=False)])
    by_representative = dict(zip(representatives(clusters, counts), clusters))
    for slot, expert in enumerate(kept.tolist()):
        members = by_representative[expert]
        weights = counts[members].double() / counts[members].sum()
        for name, original in originals.items():
            expected = sum(float(w) * original[j].double() for w, j in zip(weights, members))
            assert torch.allclose(after[name][slot].double(), expected, atol=1e-6), (name, members)
    assert router.weight.shape[0] == 4


# --- the family matrix -----------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_family_merge_save_stock_reload(family, tmp_path):
    model = tiny_moe(family)
    report = prune_(model, ExpertMergeConfig(sparsity=0.5), CALIB, progress=False)
    spec = spec_for(model)
    assert {w.get("experts") for w in report.widths} - {None} == {4}
    assert getattr(model.config, spec.experts.count_key) == 4
    out = save_pretrained_atomic(model, None, tmp_path / "out", metadata={"prunekit_version": "test"})
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(reloaded) is type(model)
    with torch.no_grad():
        assert torch.allclose(reloaded(CALIB[:2]).logits, model(CALIB[:2]).logits, atol=1e-5)


@pytest.mark.parametrize("family", ["deepseek_v3", "glm4_moe"])
def test_grouped_routing_merges_within_groups(family):
    model = tiny_moe(family)
    reference = copy.deepcopy(model)
    report = prune_(model, ExpertMergeConfig(experts=6, router="average"), CALIB, progress=False)
    for kept in report.scores["kept"].values():
        assert len(kept) == 6 and sum(i < 4 for i in kept) == 3                 # 3 of each group of 4
    # the one merged pair per group: its correction bias is an average of two biases of that group
    spec = spec_for(model)
    for index, kept in report.scores["kept"].items():
        before = get_module(get_module(reference, spec.blocks)[index], spec.experts.router).e_score_correction_bias
        after = get_module(get_module(model, spec.blocks)[index], spec.experts.router).e_score_correction_bias
        for slot, expert in enumerate(kept):
            group = range(0, 4) if expert < 4 else range(4, 8)
            low, high = min(float(before[j]) for j in group), max(float(before[j]) for j in group)
            assert low - 1e-7 <= float(after[slot]) <= high + 1e-7


@pytest.mark.parametrize("router", ["average", "fit"])
def test_every_router_rule_gives_a_stock_model(router, tmp_path):
    model = tiny_moe("gpt_oss")                                       # router bias and expert biases
    prune_(model, ExpertMergeConfig(sparsity=0.5, router=router), CALIB, progress=False)
    out = save_pretrained_atomic(model, None, tmp_path / "out", metadata={"prunekit_version": "test"})
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        logits = reloaded(CALIB[:2]).logits
    assert torch.isfinite(logits).all() and torch.allclose(logits, model(CALIB[:2]).logits, atol=1e-5)


# --- refusals -------------------------------------------------------------------------------------

def test_config_validation():
    with pytest.raises(ValueError, match="router must be one of frequent, average, fit"):
        ExpertMergeConfig(sparsity=0.5, router="mean")
    with pytest.raises(ValueError, match="uniform counts"):
        ExpertMergeConfig(sparsity=0.5, uniform=False)
    with pytest.raises(ValueError, match="max_tokens"):
        ExpertMergeConfig(sparsity=0.5, max_tokens=0)
    with pytest.raises(ValueError, match="ridge"):
        ExpertMergeConfig(sparsity=0.5, ridge=0.0)
    assert ExpertMergeConfig(experts=4).router == "frequent"


def test_merge_refuses_kept_experts_that_are_not_the_representatives():
    model = tiny_moe("mixtral")
    spec = spec_for(model)
    block = get_module(model, spec.blocks)[2]
    routed = _routed(model, 2)
    cfg = ExpertMergeConfig(experts=4)
    clusters = block_clusters(routed, cfg, 4)
    chosen = representatives(clusters, routed.statistics().counts)
    cluster = next(c for c in clusters if len(c) > 1)
    representative = chosen[clusters.index(cluster)]
    other = next(j for j in cluster if j != representative)
    wrong = torch.tensor(sorted([j for j in chosen if j != representative] + [other]))
    with pytest.raises(ValueError, match="not the clusters' representatives"):
        merge_experts_(block, spec.experts, routed, wrong, cfg)
