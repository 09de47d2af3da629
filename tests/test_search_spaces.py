"""The structure search's expert and sparsity spaces (search.py): a variant computes what the cut model
computes, the cost table is exact (experts, nonzeros, the KV cache of MoE attention), budgets hold, the
results reload, and what cannot be searched is refused with the reason."""
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from conftest import llama, tiny_moe
from prunekit.io.export import save_pretrained_atomic
from prunekit.io.loading import load_pruned
from prunekit.methods.wanda import WandaConfig, wanda
from prunekit.models import spec_for
from prunekit.models.spec import get_module
from prunekit.report import parameter_counts
from prunekit.search import DensityGroup, SearchConfig, block_groups, kv_table, ladders, search_
from prunekit.surgery import structure_record


def windows(model, count=6, length=24, seed=0):
    return torch.randint(0, model.config.vocab_size, (count, length), generator=torch.Generator().manual_seed(seed))


def kl_to(dense, model, calib) -> float:
    with torch.no_grad():
        p = F.log_softmax(dense(calib).logits.float(), -1)
        q = F.log_softmax(model(calib).logits.float(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def run(model, calib, **cfg):
    cfg = {"generations": 3, "select_windows": 2, "offspring": 4, "compensate": "none", **cfg}
    return search_(model, SearchConfig(**cfg), calib, batch_size=2, progress=False)


def reload(model, tmp_path):
    save_pretrained_atomic(model, None, tmp_path / "m", metadata={"structure": structure_record(model)})
    if structure_record(model)["stock"]:
        return AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    return load_pruned(tmp_path / "m")[0]


# ----------------------------------------------------------------------------- experts

@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "deepseek_v3"])
def test_expert_search_fitness_is_the_cut_models_kl_and_the_budget_holds(family, tmp_path):
    """qwen3_moe keeps block 0 dense, deepseek_v3 routes in 2 groups (kept counts even) with MLA attention."""
    dense, model = tiny_moe(family), tiny_moe(family)
    calib = windows(model)
    block_params = parameter_counts(model)[0]
    report = run(model, calib, target="params=0.8", space=("experts",))
    best = report.search["best"]
    assert best["block_params"] <= 0.8 * block_params and best["params"] == parameter_counts(model)[1]
    assert best["fitness_kl"] == pytest.approx(kl_to(dense, model, calib), rel=3e-2, abs=1e-6)
    counts = [w.get("experts") for w in report.widths]
    spec = spec_for(model)
    blocks = get_module(model, spec.blocks)
    for block, count in zip(blocks, counts):
        if count is not None:
            router = get_module(block, spec.experts.router)
            assert count >= router.top_k and count % getattr(router, "num_group", 1) == 0
    assert any(c is not None and c < 8 for c in counts)
    prompt = windows(model, 1, 5)
    with torch.no_grad():
        assert torch.allclose(reload(model, tmp_path)(prompt).logits, model(prompt).logits, atol=1e-5)


def test_expert_ladders_respect_top_k_and_routing_groups():
    model = tiny_moe("deepseek_v3")
    cfg = SearchConfig(space=("experts", "depth"))
    blocks = get_module(model, spec_for(model).blocks)
    lads = [ladders(block_groups(model, i, b, cfg), cfg, False) for i, b in enumerate(blocks)]
    assert lads[0].channels == [1, 0] and lads[0].heads == [1, 0]          # the dense first block: whole or gone
    assert lads[1].channels == [8, 6, 4, 0]                                # 2 groups, >= 2 per group, top-2
    assert lads[1].allowed == [(0, 0), (0, 1), (0, 2), (1, 3)]               # no single sublayer: the block or not


def test_moe_attention_kv_cost_matches_a_real_cache():
    for family in ("qwen3_moe", "deepseek_v3", "mixtral"):
        model = tiny_moe(family)
        cfg = SearchConfig(space=("experts",))
        groups = [block_groups(model, i, b, cfg) for i, b in enumerate(get_module(model, spec_for(model).blocks))]
        table = kv_table(model, groups, [ladders(g, cfg, False) for g in groups], 16, 4)
        with torch.no_grad():
            cache = model(windows(model, 1, 16), use_cache=True).past_key_values
        real = [(layer.keys.numel() + layer.values.numel()) * 4 for layer in cache.layers]
        assert [row[(0, 0)] for row in table] == real, family


def test_experts_space_refusals():
    with pytest.raises(ValueError, match="has no experts"):
        run(llama(), windows(llama()), target="params=0.8", space=("experts",))
    moe = tiny_moe("mixtral")
    with pytest.raises(ValueError, match="not compute"):
        run(moe, windows(moe), target="latency=0.8", space=("experts",))
    with pytest.raises(ValueError, match="--space experts,depth"):
        run(moe, windows(moe), target="params=0.8", space=("width",))
    with pytest.raises(ValueError, match="expert score that ranks"):
        run(moe, windows(moe), target="params=0.8", space=("experts",), expert_score="naee")


# ----------------------------------------------------------------------------- sparsity

def test_a_density_level_is_wandas_mask_at_that_sparsity():
    torch.manual_seed(0)
    linear = torch.nn.Linear(16, 6, bias=False)
    norm = torch.rand(16) + 0.1
    group = DensityGroup([linear], linear, units=8)
    for kept in range(1, 8):
        class Stats:
            sq_norm = norm.square()
        expected = wanda(linear.weight.detach(), Stats, WandaConfig(sparsity=1 - kept / 8)) != 0
        assert torch.equal(group.mask(linear, norm, kept), expected), kept
        assert group.removed(kept) == 6 * (16 - round(16 * kept / 8))


def test_sparsity_search_counts_nonzeros_and_its_fitness_is_the_masked_models_kl(tmp_path):
    dense, model = llama(num_hidden_layers=3), llama(num_hidden_layers=3)
    calib = windows(model)
    block_params = parameter_counts(model)[0]
    report = run(model, calib, target="params=0.6", space=("sparsity",))
    best = report.search["best"]
    nonzero_blocks = sum(int((p != 0).sum()) for p in get_module(model, spec_for(model).blocks).parameters())
    assert best["block_params"] == nonzero_blocks <= 0.6 * block_params
    assert parameter_counts(model)[0] == block_params                      # zeros stored densely: a stock shape
    assert best["fitness_kl"] == pytest.approx(kl_to(dense, model, calib), rel=3e-2)
    levels = {tuple(k) for k in best["kept"]}
    assert len(levels) > 1 or levels != {(8, 8)}                             # something was sparsified
    assert any("stored densely" in note for note in report.notes)
    prompt = windows(model, 1, 5)
    with torch.no_grad():
        assert torch.allclose(reload(model, tmp_path)(prompt).logits, model(prompt).logits, atol=1e-5)


def test_sparsity_with_sublayer_removal_and_its_refusals():
    model = llama(num_hidden_layers=3)
    report = run(model, windows(model), target="params=0.3", space=("sparsity", "sublayer", "depth"))
    assert report.search["best"]["block_params"] <= 0.3 * parameter_counts(llama(num_hidden_layers=3))[0]
    with pytest.raises(ValueError, match="params target"):
        run(llama(), windows(llama()), target="memory=0.1MB", space=("sparsity",))
    with pytest.raises(ValueError, match="not offered for the Mixture-of-Experts"):
        moe = tiny_moe("mixtral")
        run(moe, windows(moe), target="params=0.8", space=("sparsity",))


def test_cli_searches_experts_and_sparsity(tiny_moe_dir, tiny_model_dir, tmp_path):
    import json

    from prunekit.cli import main
    out = tmp_path / "experts"
    assert main(["search", str(tiny_moe_dir), "--target", "params=0.8", "--space", "experts,depth", "--generations",
                 "2", "--samples", "4", "--seqlen", "16", "--out", str(out)]) == 0
    body = json.loads((out / "search.json").read_text())
    first = body["library"]["blocks"][0]
    assert first["kinds"] == ["fixed", "experts"] and len(first["expert_scores"]) == 8
    model, _ = load_pruned(out)
    assert sum(p.numel() for p in model.parameters()) == body["best"]["params"]
    out = tmp_path / "sparse"
    assert main(["search", str(tiny_model_dir), "--target", "params=0.7", "--space", "sparsity", "--generations", "2",
                 "--samples", "4", "--seqlen", "16", "--out", str(out)]) == 0
    body = json.loads((out / "search.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(out)
    assert sum(int((p != 0).sum()) for p in model.parameters()) == body["best"]["params"]
