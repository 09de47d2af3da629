"""Weight updates for a fixed mask (OBS sweep, ADMM) and ADMM's gradual mask selection."""
import pytest
import torch

from prunekit.masks import lowest, nm_violations
from prunekit.methods.sparsegpt import SparseGPTConfig
from prunekit.methods.wanda import WandaConfig
from prunekit.stats import Hessian
from prunekit.updates import admm_update, apply_update, obs_sweep


def _problem(out=16, inp=32, tokens=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    # correlated inputs with uneven scales: where a weight update has something to gain
    X = torch.randn(tokens, inp, generator=g) @ torch.randn(inp, inp, generator=g) * torch.rand(inp, generator=g) * 3
    W = torch.randn(out, inp, generator=g)
    stats = Hessian(inp, torch.device("cpu"))
    stats.update(X)
    return X, W, stats


def _error(X, W, W_new):
    return float((X @ (W - W_new).T).norm() / (X @ W.T).norm())


def _least_squares(X, W, pruned):
    """The exact optimum: each row's kept weights by least squares on the kept inputs."""
    out = torch.zeros_like(W, dtype=torch.float64)
    X64, W64 = X.double(), W.double()
    for row in range(W.shape[0]):
        keep = ~pruned[row]
        solution = torch.linalg.lstsq(X64[:, keep], X64 @ W64[row]).solution
        out[row, keep] = solution
    return out.float()


def test_admm_lowers_reconstruction_error_for_a_fixed_mask():
    X, W, stats = _problem()
    pruned = lowest(W.abs() * stats.sq_norm.sqrt(), 0.5)
    unchanged = W.masked_fill(pruned, 0)
    updated = admm_update(W, stats.H, pruned, iterations=20)
    assert torch.equal(updated == 0, pruned)                      # exactly the mask, nothing else
    assert _error(X, W, updated) < 0.8 * _error(X, W, unchanged)


def test_admm_approaches_the_least_squares_optimum_and_beats_the_obs_sweep():
    X, W, stats = _problem(seed=1)
    pruned = lowest(W.abs() * stats.sq_norm.sqrt(), 0.6)
    optimum = _error(X, W, _least_squares(X, W, pruned))
    admm = _error(X, W, admm_update(W, stats.H, pruned, iterations=200))
    obs = _error(X, W, obs_sweep(W, stats, sparsity=0.6, damp=0.0, fixed=pruned))
    assert admm <= optimum * 1.05          # dampening keeps it slightly off the exact optimum
    assert admm < obs


def test_obs_sweep_with_a_fixed_mask_keeps_that_mask_and_lowers_error():
    X, W, stats = _problem(seed=2)
    pruned = lowest(W.abs() * stats.sq_norm.sqrt(), 0.5)
    swept = obs_sweep(W, stats, sparsity=0.5, fixed=pruned)
    assert torch.equal(swept == 0, pruned)
    assert _error(X, W, swept) < _error(X, W, W.masked_fill(pruned, 0))


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_gradual_admm_reaches_the_exact_pattern(nm):
    X, W, stats = _problem(seed=3)
    updated = admm_update(W, stats.H, None, iterations=20, sparsity=0.5, nm=nm, per="row")
    if nm:
        assert nm_violations(updated, *nm) == 0
        assert int((updated == 0).sum()) == W.numel() // 2
    else:
        assert ((updated == 0).sum(dim=1) == W.shape[1] // 2).all()
    wanda = W.masked_fill(lowest(W.abs() * stats.sq_norm.sqrt(), 0.5, nm), 0)
    assert _error(X, W, updated) < _error(X, W, wanda)


def test_apply_update_dispatch():
    X, W, stats = _problem(seed=4)
    pruned = W.masked_fill(lowest(W.abs() * stats.sq_norm.sqrt(), 0.5), 0)
    assert apply_update(W, pruned, stats, WandaConfig()) is pruned
    for update in ("obs", "admm"):
        new = apply_update(W, pruned, stats, WandaConfig(update=update))
        assert torch.equal(new == 0, pruned == 0)
        assert _error(X, W, new) < _error(X, W, pruned)


def test_update_config_errors():
    with pytest.raises(ValueError, match="update must be one of"):
        WandaConfig(update="lbfgs")
    with pytest.raises(ValueError, match="admm_gradual applies"):
        WandaConfig(admm_gradual=True)
    with pytest.raises(ValueError, match="sparsegpt chooses its mask"):
        SparseGPTConfig(update="none")
    with pytest.raises(ValueError, match="allocation must be one of"):
        WandaConfig(allocation="random")


# --------------------------------------------------------------------------- through the engine

from conftest import tiny_model
from prunekit.prune import prune_
from prunekit.methods.magnitude import MagnitudeConfig


def _mean_error(report):
    errors = [r.error for r in report.layers]
    return sum(errors) / len(errors)


@pytest.mark.parametrize("family", ["llama", "gemma2", "opt", "gpt2"])
def test_updates_lower_the_layer_error_in_the_engine(family, calib):
    errors = {}
    for update in ("none", "obs", "admm"):
        report = prune_(tiny_model(family), WandaConfig(sparsity=0.6, update=update), calib, progress=False)
        assert abs(report.sparsity - 0.6) < 0.01
        errors[update] = _mean_error(report)
    assert errors["admm"] < errors["none"] and errors["obs"] < errors["none"]


def test_sparsegpt_admm_and_gradual_admm_in_the_engine(calib):
    base = _mean_error(prune_(tiny_model("llama"), SparseGPTConfig(sparsity=0.6), calib, progress=False))
    refit = prune_(tiny_model("llama"), SparseGPTConfig(sparsity=0.6, update="admm"), calib, progress=False)
    assert _mean_error(refit) < base
    gradual = prune_(tiny_model("llama"), MagnitudeConfig(sparsity=0.5, nm=(2, 4), update="admm", admm_gradual=True),
                     calib, progress=False)
    assert gradual.sparsity == pytest.approx(0.5)
