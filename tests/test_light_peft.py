"""Light-PEFT early pruning of masked LoRA (prunekit.recovery.light_peft): the rank and module importances
against hand computations, the plan on known scores, shrinking that drops exactly the planned parameters and
keeps the kept ranks' function, zeros kept through the merge, the recover CLI end to end, and bad input."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import llama, recover_cli, tiny_model
from prunekit.recovery import LoraRecoverConfig, attach_masked_lora, block_linears, recover_
from prunekit.recovery.light_peft import (LightPeftConfig, apply_plan, module_importance, output_sums, plan,
                                          planned_counts, rank_importance)
from prunekit.recovery.masked_lora import ADAPTER, masked_delta

pytestmark = pytest.mark.usefixtures("one_thread")


def test_rank_importance_by_hand():
    A = torch.tensor([[1.0, 2.0], [3.0, 0.0]])                # (r=2, in=2)
    B = torch.tensor([[1.0, 0.0], [0.0, -1.0], [2.0, 1.0]])  # (out=3, r=2)
    gA = torch.tensor([[0.5, 0.5], [1.0, 4.0]])
    gB = torch.tensor([[1.0, 2.0], [0.0, 3.0], [1.0, 1.0]])
    # rank 0: |1*.5 + 2*.5| = 1.5 and |1*1 + 0 + 2*1| = 3 -> 2.25; rank 1: |3*1| = 3 and |0 - 3 + 1| = 2 -> 2.5
    assert rank_importance(A, B, gA, gB).tolist() == [2.25, 2.5]


def test_both_sides_of_the_taylor_estimate_agree_on_a_real_gradient():
    torch.manual_seed(0)
    A = torch.randn(3, 5, requires_grad=True)
    B = torch.randn(4, 3, requires_grad=True)
    mask = torch.rand(4, 5) > 0.3
    x = torch.randn(7, 5)
    (x @ masked_delta(A, B, mask, 0.5).T).pow(2).sum().backward()
    a_side = (A * A.grad).sum(1)
    b_side = (B * B.grad).sum(0)
    assert torch.allclose(a_side, b_side, atol=1e-4)


def test_module_importance_by_hand():
    X = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    W = torch.tensor([[3.0, 0.0], [0.0, 4.0]])
    delta = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    # X delta^T = [[1, 0], [0, 0]] -> 1; X W^T = [[3, 0], [0, 8]] -> 73
    assert output_sums(X, W, delta) == (1.0, 73.0)
    assert module_importance(1.0, 73.0) == pytest.approx(73 ** -0.5)
    assert module_importance(0.0, 73.0) == 0.0 and module_importance(1.0, 0.0) == float("inf")


def test_plan_on_known_scores():
    modules = {"a": 0.3, "b": 0.1, "c": 0.9, "d": 0.5}
    ranks = {name: torch.tensor([0.1, 0.4, 0.2, 0.3]) for name in modules}
    kept = plan(modules, ranks, LightPeftConfig(steps=1, modules=0.25, ranks=0.5))
    assert kept == {"a": [1, 3], "b": [], "c": [1, 3], "d": [1, 3]}
    assert planned_counts({n: (4, 10, 6) for n in modules}, kept) == (4 * 4 * 16, 3 * 2 * 16)
    # never every module; at least one rank per kept module
    kept = plan(modules, ranks, LightPeftConfig(steps=1, modules=0.99, ranks=0.99))
    assert sum(1 for v in kept.values() if v) == 1 and kept["c"] == [1]


def _pruned_llama(seed=0):
    model = llama(seed)
    with torch.no_grad():
        for module in block_linears(model).values():
            weight = module.weight
            weight.masked_fill_(weight.abs() < weight.abs().median(), 0.0)
    return model


def test_shrinking_drops_exactly_the_planned_parameters_and_keeps_the_kept_ranks():
    model = _pruned_llama()
    targets = block_linears(model)
    lora = attach_masked_lora(model, targets, rank=4, alpha=4.0)
    torch.manual_seed(1)
    with torch.no_grad():
        for layer in lora.layers.values():
            layer.lora_B[ADAPTER].weight.normal_()
    names = sorted(lora.layers)
    kept = {name: ([] if i % 3 == 0 else [0, 2]) for i, name in enumerate(names)}
    shapes = {name: (4, layer.lora_A[ADAPTER].weight.shape[1], layer.lora_B[ADAPTER].weight.shape[0])
              for name, layer in lora.layers.items()}
    expected = {}
    for name, layer in lora.layers.items():
        A, B = layer.lora_A[ADAPTER].weight.detach(), layer.lora_B[ADAPTER].weight.detach()
        index = torch.tensor(kept[name], dtype=torch.long)
        expected[name] = masked_delta(A[index], B[:, index], lora.masks[name], layer.scaling[ADAPTER])
    before = sum(p.numel() for p in lora.parameters().values())
    apply_plan(lora, kept)
    after = sum(p.numel() for p in lora.parameters().values())
    plan_before, plan_after = planned_counts(shapes, kept)
    assert (before, after) == (plan_before, plan_after) and after < before
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(2))
    out = model(input_ids=ids).logits
    merged_model = lora.merge_and_unload()
    for name, module in block_linears(merged_model).items():
        assert bool((module.weight[~lora.masks[name]] == 0).all())          # masked zeros stay zero
    assert torch.allclose(merged_model(input_ids=ids).logits, out, atol=1e-4)
    reference = _pruned_llama()
    for name, module in block_linears(reference).items():
        assert torch.allclose(block_linears(merged_model)[name].weight, module.weight + expected[name], atol=1e-6)


def test_recover_with_light_peft_reports_the_saving_and_keeps_zeros():
    model = _pruned_llama()
    zeros = {name: (m.weight == 0).clone() for name, m in block_linears(model).items()}
    windows = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(3))
    cfg = LoraRecoverConfig(steps=4, batch_size=2, rank=4, lr=1e-2, checkpoint_every=0)
    report = recover_(model, cfg, windows, progress=False,
                      light_peft=LightPeftConfig(steps=2, modules=0.25, ranks=0.5))
    peft = report["light_peft"]
    layers = len(block_linears(model))
    removed = layers // 4
    assert peft["modules"] == {"total": layers, "removed": removed, "removed_names": peft["modules"]["removed_names"]}
    assert peft["ranks"] == {"before": 4 * layers, "after": 2 * (layers - removed)}
    assert report["trainable_parameters"] == peft["trainable_after"] < peft["trainable_before"]
    assert peft["saved"] == pytest.approx(1 - peft["trainable_after"] / peft["trainable_before"], abs=1e-6)
    assert len(report["losses"]) == 4
    for name, module in block_linears(model).items():
        assert bool((module.weight[zeros[name]] == 0).all())


def test_cli_light_peft_end_to_end(tmp_path, tiny_model_dir, capsys):
    out, log = tmp_path / "out", tmp_path / "report.json"
    code = recover_cli([str(tiny_model_dir), "--method", "lora", "--steps", "3", "--batch-size", "2", "--seqlen",
                        "16", "--rank", "4", "--light-peft", "--light-peft-steps", "1", "--light-peft-modules", "0.5",
                        "--light-peft-ranks", "0.5", "--out", str(out), "--no-progress", "--json", str(log)])
    assert code == 0, capsys.readouterr().err
    report = json.loads(log.read_text())
    assert report["light_peft"]["trainable_after"] == report["trainable_parameters"]
    assert "Light-PEFT after 1 steps" in capsys.readouterr().out
    meta = json.loads((out / "prunekit.json").read_text())
    assert meta["recovery"]["light_peft"]["saved"] > 0.5
    AutoModelForCausalLM.from_pretrained(out)                       # stock reload


def test_bad_input_is_refused(tmp_path, tiny_model_dir, capsys):
    for bad in ({"steps": 0}, {"modules": 1.0}, {"ranks": -0.1}, {"modules": 0, "ranks": 0}):
        with pytest.raises(ValueError, match="Light-PEFT"):
            LightPeftConfig(**bad)
    model, windows = tiny_model("llama"), torch.randint(0, 64, (4, 8))
    with pytest.raises(ValueError, match="fewer than steps"):
        recover_(model, LoraRecoverConfig(steps=2, checkpoint_every=0), windows, progress=False,
                 light_peft=LightPeftConfig(steps=2))
    with pytest.raises(ValueError, match="resume"):
        recover_(model, LoraRecoverConfig(steps=3), windows, progress=False, run_dir=tmp_path, resume=True,
                 light_peft=LightPeftConfig(steps=1))
    base = [str(tiny_model_dir), "--steps", "2", "--out", str(tmp_path / "o"), "--no-progress"]
    assert recover_cli([*base, "--method", "perp", "--light-peft"]) == 2
    assert "trains none" in capsys.readouterr().err
    assert recover_cli([*base, "--method", "lora", "--light-peft-steps", "1"]) == 2
    assert "needs --light-peft" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_early_prune_removes_the_module_whose_output_is_smallest():
    from prunekit.recovery.light_peft import early_prune
    from prunekit.recovery.train import next_token_loss
    model = _pruned_llama()
    lora = attach_masked_lora(model, block_linears(model), rank=4, alpha=4.0)
    names = sorted(lora.layers)
    quiet = names[3]
    torch.manual_seed(4)
    with torch.no_grad():
        for name, layer in lora.layers.items():
            layer.lora_B[ADAPTER].weight.normal_().mul_(1e-4 if name == quiet else 1.0)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(5))
    record = early_prune(lora, LightPeftConfig(steps=1, modules=1.5 / len(names), ranks=0.25),
                         lambda: next_token_loss(model(input_ids=ids).logits, ids))
    assert record["modules"]["removed_names"] == [quiet]
    assert record["ranks"] == {"before": 4 * len(names), "after": 3 * (len(names) - 1)}
    assert all(p.grad is None for p in lora.parameters().values())
    lora.unload()
