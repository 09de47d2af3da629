"""Bonsai (arXiv 2402.05406): the regression on synthetic losses, masks that equal removal, the
whole-model pre-pass through the driver's `prescore` hook, and the tiny-model family matrix."""
import pytest
import torch
from conftest import TINY_CONFIGS, tiny_model
from conftest import NO_STOCK_HEADS, check_stock_reload_and_cache

from prunekit import prune_
from prunekit.depth import BlockCache
from prunekit.methods import bonsai as bonsai_module
from prunekit.methods.bonsai import BonsaiConfig, _Masks, masked_loss, regressors, ridge_importance, sample_drops
from prunekit.registry import method_for_config
from prunekit.report import StructureReport
from prunekit.structured import _remove

FAMILIES = sorted(TINY_CONFIGS)
FAST = dict(samples=24, channel_group=16, windows=4)     # 2 blocks x (4 heads + 6 channel groups) = 20 units


def test_least_squares_recovers_additive_importances_exactly():
    beta = torch.tensor([0.5, -0.1, 2.0, 0.0, 1.25, 0.3, 0.7, -0.4], dtype=torch.float64)
    D = sample_drops(200, beta.numel(), 0.3, seed=0)
    losses = 4.0 + D.double() @ beta                               # an additive loss with an intercept
    torch.testing.assert_close(ridge_importance(D, losses, ridge=0.0), beta, atol=1e-10, rtol=0)
    # a small ridge with noise keeps the ranking
    noisy = losses + 0.01 * torch.randn(200, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    fitted = ridge_importance(D, noisy, ridge=0.01)
    assert torch.equal(fitted.argsort(), beta.argsort())
    assert (fitted - beta).abs().max() < 0.05


def test_fewer_samples_than_units_use_the_dual_form_of_the_same_ridge():
    D = sample_drops(12, 30, 0.25, seed=3)
    y = torch.randn(12, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    Dc, yc = D.double() - D.double().mean(0), y - y.mean()
    lam = 0.1 * Dc.square().sum() / 30
    primal = torch.linalg.solve(Dc.T @ Dc + lam * torch.eye(30, dtype=torch.float64), Dc.T @ yc)
    torch.testing.assert_close(ridge_importance(D, y, ridge=0.1), primal, atol=1e-9, rtol=0)


def test_drop_matrix_is_seeded():
    a, b = sample_drops(50, 40, 0.2, seed=7), sample_drops(50, 40, 0.2, seed=7)
    assert torch.equal(a, b) and not torch.equal(a, sample_drops(50, 40, 0.2, seed=8))
    assert 0.1 < a.double().mean() < 0.3


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_masked_sub_model_loss_equals_the_loss_after_removal(family, calib):
    """Zeroing the dropped units' consumer input columns (hooks, no weight copies) computes exactly
    the model with those units removed: one head per KV group of block 0 (the driver's query mode)
    and two channel groups of block 1."""
    model = tiny_model(family)
    config = BonsaiConfig(sparsity=0.3, channel_group=8)
    layout = regressors(model, config)
    assert [(e.block, e.group.kind) for e in layout] == [(0, "heads"), (0, "channels"), (1, "heads"), (1, "channels")]
    assert [e.count for e in layout] == [4, -(-layout[1].group.units // 8), 4, -(-layout[3].group.units // 8)]
    dropped = torch.zeros(sum(e.count for e in layout), dtype=torch.bool)
    heads0, channels1 = layout[0], layout[3]
    dropped[heads0.first + 0] = dropped[heads0.first + 2] = True
    dropped[channels1.first + 1] = dropped[channels1.first + 5] = True
    cache = BlockCache(model, calib, progress=False)
    masks = _Masks(layout)
    masked = masked_loss(cache, masks, dropped)
    masks.remove()
    assert masked != pytest.approx(cache.loss(), abs=1e-4)              # the masks change something
    for entry in (heads0, channels1):
        gone = dropped[entry.first:entry.first + entry.count][entry.of_unit]          # (units,)
        _remove(model, [entry.group], [(~gone).double()], [int((~gone).sum())], [None], config,
                StructureReport("t", config, 0, 0, 0, 0))
    assert BlockCache(model, calib, progress=False).loss() == pytest.approx(masked, abs=1e-5)


def test_prescore_recovers_a_synthetic_additive_loss(calib, monkeypatch):
    """The whole pre-pass with the model's loss replaced by an additive function of the drops: every
    head gets its own importance, every channel its group's (plus a tie-break below 1e-6 of the
    largest), in the driver's block and group order."""
    model = tiny_model("llama")
    config = BonsaiConfig(sparsity=0.3, channel_group=16, samples=60, ridge=0.0)
    layout = regressors(model, config)
    units = sum(e.count for e in layout)
    beta = torch.linspace(-1.0, 2.0, units, dtype=torch.float64)[torch.randperm(units, generator=torch.Generator()
                                                                                    .manual_seed(0))]
    monkeypatch.setattr(bonsai_module, "masked_loss", lambda cache, masks, row: 3.0 + float(row.double() @ beta))
    scores = method_for_config(config).prescore(model, calib, config, progress=False)
    assert sorted(scores) == [0, 1]
    for entry in layout:
        score = scores[entry.block][0 if entry.group.kind == "heads" else 1]
        expected = beta[entry.first:entry.first + entry.count][entry.of_unit]
        torch.testing.assert_close(score, expected, atol=1e-5, rtol=0)
        if entry.group.kind == "channels":               # the tie-break orders a group's channels
            assert (score != expected).any()


def test_seeded_runs_are_identical(calib):
    states = []
    for seed in (0, 0, 1):
        model = tiny_model("qwen2")
        prune_(model, BonsaiConfig(sparsity=0.3, seed=seed, **FAST), calib, progress=False)
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_config_checks():
    with pytest.raises(ValueError, match="samples"):
        BonsaiConfig(samples=0)
    with pytest.raises(ValueError, match="drop"):
        BonsaiConfig(drop=1.0)
    with pytest.raises(ValueError, match="channel_group"):
        BonsaiConfig(channel_group=0)
    assert BonsaiConfig(sparsity=0.8).drop_probability() == 0.5
    assert BonsaiConfig(sparsity=0.3, drop=0.1).drop_probability() == 0.1
    assert method_for_config(BonsaiConfig()).needs_calibration


@pytest.mark.parametrize("family", FAMILIES)
def test_bonsai_on_every_family(family, calib, tmp_path):
    model = tiny_model(family)
    config = BonsaiConfig(sparsity=0.3, attention=family not in NO_STOCK_HEADS, **FAST)
    report = prune_(model, config, calib, progress=False)
    assert 0.15 < report.removed_fraction < 0.45
    check_stock_reload_and_cache(model, calib, tmp_path)


def test_bonsai_with_liar_and_the_global_ranking(calib):
    for config in (BonsaiConfig(sparsity=0.3, compensate="liar", **FAST),
                   BonsaiConfig(sparsity=0.3, uniform=False, **FAST)):
        model = tiny_model("mistral")
        report = prune_(model, config, calib, progress=False)
        assert 0.15 < report.removed_fraction < 0.45
        with torch.no_grad():
            assert torch.isfinite(model(calib[:2]).logits).all()
