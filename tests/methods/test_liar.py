"""LIAR compensation (arXiv 2407.13331) for every width method: the least-squares math on hand-built
tensors, its place in the driver (one observation pass, FLAP's bias unchanged), the CLI flag, and
the tiny-model family matrix."""
import pytest
import torch
from conftest import TINY_CONFIGS, VOCAB, tiny_model
from conftest import NO_STOCK_HEADS, check_stock_reload_and_cache

from prunekit import prune_
from prunekit.methods.amp import AMPConfig
from prunekit.methods.flap import FlapConfig
from prunekit.methods.magnitude_sp import MagnitudeSPConfig
from prunekit.methods.wanda_sp import WandaSPConfig
from prunekit.registry import method_for_config
from prunekit.report import StructureReport
from prunekit.stats import Hessian
from prunekit.structured import _remove, coupled_groups, liar_update

FAMILIES = sorted(TINY_CONFIGS)


def _inputs_with_a_dependent_column(tokens=64, columns=8, seed=0):
    """X (tokens, columns) whose column 5 is 0.5 * column 1 - 2 * column 3 on every token."""
    X = torch.randn(tokens, columns, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    X[:, 5] = 0.5 * X[:, 1] - 2 * X[:, 3]
    return X


def test_a_removed_column_that_the_kept_ones_span_is_reconstructed_exactly():
    X = _inputs_with_a_dependent_column()                                  # (64, 8)
    W = torch.randn(4, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    kept = torch.ones(8, dtype=torch.bool)
    kept[5] = False
    B_T = liar_update(W, X.T @ X, kept, damp=0.0)                          # (4, 7)
    pruned = W[:, kept] + B_T
    torch.testing.assert_close(X[:, kept] @ pruned.T, X @ W.T, atol=1e-10, rtol=0)
    # the update is W_5 folded into columns 1 and 3 with the coefficients 0.5 and -2
    expected = torch.zeros(4, 7, dtype=torch.float64)
    expected[:, 1], expected[:, 3] = 0.5 * W[:, 5], -2 * W[:, 5]
    torch.testing.assert_close(B_T, expected, atol=1e-10, rtol=0)


def test_the_float32_observer_gives_the_same_exactness_to_1e_5():
    X = _inputs_with_a_dependent_column().float()
    W = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    observer = Hessian(8, torch.device("cpu"))
    observer.update(X[:32])
    observer.update(X[32:])
    kept = torch.ones(8, dtype=torch.bool)
    kept[5] = False
    pruned = W[:, kept] + liar_update(W, observer.H64, kept, damp=0.0).float()
    torch.testing.assert_close(X[:, kept] @ pruned.T, X @ W.T, atol=1e-5, rtol=0)


def test_an_independent_removed_column_gets_the_least_squares_fit():
    """Column 7 is independent: the residual of the pruned output is orthogonal to the kept inputs
    (the normal equations), and it is no larger than without compensation."""
    X = _inputs_with_a_dependent_column(seed=2)
    W = torch.randn(4, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    kept = torch.ones(8, dtype=torch.bool)
    kept[7] = False
    residual = X @ W.T - X[:, kept] @ (W[:, kept] + liar_update(W, X.T @ X, kept, damp=0.0)).T
    torch.testing.assert_close(X[:, kept].T @ residual, torch.zeros(7, 4, dtype=torch.float64), atol=1e-9, rtol=0)
    assert residual.norm() < (X[:, ~kept] @ W[:, ~kept].T).norm()
    # the ridge shrinks the fit towards no compensation
    assert liar_update(W, X.T @ X, kept, damp=1e6).abs().max() < 1e-4


def test_dead_inputs_are_allowed_without_dampening():
    X = _inputs_with_a_dependent_column()
    X[:, 0] = 0                                                            # never active
    W = torch.randn(4, 8, dtype=torch.float64)
    kept = torch.ones(8, dtype=torch.bool)
    kept[5] = False
    B_T = liar_update(W, X.T @ X, kept, damp=0.0)
    assert torch.isfinite(B_T).all() and B_T[:, 0].abs().max() == 0


def test_duplicated_channel_removed_from_a_real_block_leaves_the_logits_unchanged(calib):
    """Tiny Llama, block 0: channel 7 is channel 2 with its up row scaled by -1.5, so its activation
    is exactly -1.5 times channel 2's on every token. Removing channel 7 with LIAR (no dampening)
    moves its down column onto channel 2's: the model computes the same logits."""
    model = tiny_model("llama")
    mlp = model.model.layers[0].mlp
    with torch.no_grad():
        mlp.gate_proj.weight[7] = mlp.gate_proj.weight[2]
        mlp.up_proj.weight[7] = -1.5 * mlp.up_proj.weight[2]
        dense = model(calib).logits
        other = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(9))
        dense_other = model(other).logits
    config = WandaSPConfig(attention=False, compensate="liar", liar_damp=0.0)
    group = coupled_groups(model, 0, model.model.layers[0], config)[0]
    observer = Hessian(group.units, torch.device("cpu"))
    handle = mlp.down_proj.register_forward_pre_hook(lambda module, args: observer.update(args[0]))
    with torch.no_grad():
        model(calib)
    handle.remove()
    scores = torch.ones(group.units, dtype=torch.float64)
    scores[7] = 0
    _remove(model, [group], [scores], [group.units - 1], [observer], config, StructureReport("t", config, 0, 0, 0, 0))
    assert mlp.down_proj.weight.shape[1] == group.units - 1
    with torch.no_grad():
        torch.testing.assert_close(model(calib).logits, dense, atol=1e-5, rtol=0)
        torch.testing.assert_close(model(other).logits, dense_other, atol=1e-5, rtol=0)


def _block0_error(config, calib):
    """Relative error of block 0's output after pruning, against the dense block 0 on the same input."""
    from prunekit.core.stream import block_stream
    model, reference = tiny_model("llama"), tiny_model("llama")
    prune_(model, config, calib, progress=False)
    outputs = []
    for m in (reference, model):
        steps = block_stream(m, calib, progress=False)
        outputs.append(torch.cat(next(steps).forward()))
        steps.close()
    return float((outputs[1] - outputs[0]).norm() / outputs[0].norm())


def test_liar_reduces_the_block_error_of_every_method_on_the_same_mask():
    """Block 0's mask depends only on the dense inputs, so it is the same with and without
    compensation; the least-squares fit makes the block's output closer to the dense one."""
    calib = torch.randint(0, VOCAB, (16, 32), generator=torch.Generator().manual_seed(3))
    for config_cls in (WandaSPConfig, AMPConfig, MagnitudeSPConfig):
        errors = {mode: _block0_error(config_cls(sparsity=0.35, compensate=mode), calib) for mode in ("none", "liar")}
        assert errors["liar"] < 0.9 * errors["none"], (config_cls.__name__, errors)


def test_observation_stays_one_pass(calib):
    """With compensate=liar the consumer's X^T X is observed in the same forward pass as the
    method's own statistic: block 0's down projection runs as often as without compensation
    (for the uniform pass, with the pruned block re-run for the next block's inputs)."""
    counts = {}
    for mode in ("none", "liar"):
        model = tiny_model("llama")
        calls = []
        model.model.layers[0].mlp.down_proj.register_forward_pre_hook(lambda module, args, calls=calls: calls.append(1))
        prune_(model, WandaSPConfig(sparsity=0.3, compensate=mode), calib, progress=False)
        counts[mode] = len(calls)
    assert counts["liar"] == counts["none"] > 0


def test_flap_keeps_its_bias_and_can_use_liar_instead(calib):
    assert FlapConfig().compensation == "bias"
    assert FlapConfig(bias=False).compensation == "none"
    assert FlapConfig(compensate="none").compensation == "none"
    assert WandaSPConfig().compensation == "none"
    assert WandaSPConfig(compensate="bias").compensation == "bias"
    with pytest.raises(ValueError, match="contradicts bias=false"):
        FlapConfig(compensate="bias", bias=False)
    with pytest.raises(ValueError, match="compensate must be one of"):
        WandaSPConfig(compensate="lair")
    with pytest.raises(ValueError, match="liar_damp"):
        WandaSPConfig(liar_damp=-1.0)
    model = tiny_model("llama")
    prune_(model, FlapConfig(sparsity=0.3, uniform=True, compensate="liar"), calib, progress=False)
    assert not model.config.mlp_bias and model.model.layers[0].mlp.down_proj.bias is None
    model = tiny_model("llama")
    prune_(model, WandaSPConfig(sparsity=0.3, compensate="bias"), calib, progress=False)
    assert model.config.mlp_bias and model.model.layers[0].mlp.down_proj.bias.abs().sum() > 0


def test_a_data_free_method_with_compensation_needs_calibration():
    config = MagnitudeSPConfig(sparsity=0.3, compensate="liar")
    assert method_for_config(config).needs_calibration_for(config)
    assert not method_for_config(MagnitudeSPConfig()).needs_calibration_for(MagnitudeSPConfig())
    with pytest.raises(ValueError, match="needs calibration"):
        prune_(tiny_model("llama"), config, None, progress=False)


def test_cli_flag_and_recipe_round_trip():
    from prunekit.cli import _parser, prune_args_to_dict
    from prunekit.recipe import dump_recipe, load_recipe, recipe_from_dict
    args = _parser().parse_args(["prune", "default", "--method", "wanda-sp", "--sparsity", "0.2",
                                 "--compensate", "liar", "--no-eval"])
    raw = prune_args_to_dict(args)
    assert raw["steps"] == [{"method": "wanda-sp", "sparsity": 0.2, "compensate": "liar"}]
    recipe = recipe_from_dict(raw)
    assert recipe.steps[0] == WandaSPConfig(sparsity=0.2, compensate="liar")
    assert load_recipe(dump_recipe(recipe)) == recipe
    args = _parser().parse_args(["prune", "default", "--method", "flap", "--sparsity", "0.2", "--no-eval"])
    assert "compensate" not in prune_args_to_dict(args)["steps"][0]           # FLAP's default stays bias
    with pytest.raises(SystemExit):
        _parser().parse_args(["prune", "default", "--method", "flap", "--compensate", "mean"])


@pytest.mark.parametrize("family", FAMILIES)
def test_liar_on_every_family(family, calib, tmp_path):
    model = tiny_model(family)
    config = WandaSPConfig(sparsity=0.3, compensate="liar", attention=family not in NO_STOCK_HEADS)
    report = prune_(model, config, calib, progress=False)
    assert 0.15 < report.removed_fraction < 0.45
    check_stock_reload_and_cache(model, calib, tmp_path)


def test_liar_with_a_data_free_method_and_the_global_ranking(calib):
    for config in (MagnitudeSPConfig(sparsity=0.3, compensate="liar"),
                   WandaSPConfig(sparsity=0.3, uniform=False, compensate="liar")):
        model = tiny_model("qwen2")
        prune_(model, config, calib, progress=False)
        with torch.no_grad():
            assert torch.isfinite(model(calib[:2]).logits).all()
