"""RIA, GBLM-Pruner and Pruner-Zero against their reference formulas, written out element by
element, on hand-built matrices; N:M patterns; config validation; RIA through the engine."""
import math

import pytest
import torch

from conftest import tiny_model
from prunekit.prune import prune_
from prunekit.gradients import WithGradient
from prunekit.masks import nm_violations
# importing the method modules registers them (the builtin list may not name them yet)
from prunekit.methods.gblm import GBLMConfig
from prunekit.methods.pruner_zero import DEFAULT_FORMULA, PrunerZeroConfig, evaluate
from prunekit.methods.ria import RIAConfig, ria_score
from prunekit.catalog import get_method
from prunekit.registry import method_for_config
from prunekit.stats import InputNorm


def _stats(X):
    stats = InputNorm(X.shape[-1], torch.device("cpu"))
    stats.update(X)
    return stats


def _lowest_by_sort(score, k, per):
    """Reference selection: the k lowest (per row, or of the whole matrix), by a stable sort."""
    mask = torch.zeros(score.shape, dtype=torch.bool)
    if per == "row":
        for i in range(score.shape[0]):
            mask[i, score[i].argsort(stable=True)[:k]] = True
    else:
        mask.view(-1)[score.reshape(-1).argsort(stable=True)[:k]] = True
    return mask


def _case(seed=0, rows=4, cols=8, tokens=6):
    generator = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=generator)                          # (out, in)
    X = torch.randn(tokens, cols, generator=generator) * torch.linspace(0.1, 3, cols)   # (tokens, in)
    G = torch.rand(rows, cols, generator=generator) * 1e-3                    # (out, in)
    return W, X, G


# ---------------------------------------------------------------- RIA

def _ria_by_hand(W, X, a):
    rows, cols = W.shape
    score = torch.zeros(rows, cols)
    for i in range(rows):
        for j in range(cols):
            row_sum = sum(abs(float(W[i, k])) for k in range(cols))
            col_sum = sum(abs(float(W[k, j])) for k in range(rows))
            norm = math.sqrt(sum(float(X[t, j]) ** 2 for t in range(X.shape[0])))
            score[i, j] = (abs(float(W[i, j])) / row_sum + abs(float(W[i, j])) / col_sum) * norm ** a
    return score


def test_ria_keeps_a_small_weight_that_dominates_its_column():
    W = torch.tensor([[1.0, 1.0, 1.0, 1.0], [100.0, 100.0, 100.0, 1.0]])
    out = get_method("ria").fn(W, _stats(torch.ones(3, 4)), RIAConfig(sparsity=0.5))
    # W[0, 3] holds half of column 3 (score 1/4 + 1/2), so it outlives W[1, 3] (1/301 + 1/2)
    # and the other ones of row 0 (1/4 + 1/101); magnitude could not tell these 1s apart
    assert torch.equal(out, torch.tensor([[0.0, 0.0, 0.0, 1.0], [100.0, 100.0, 100.0, 0.0]]))


@pytest.mark.parametrize("a", [0.5, 1.0, 0.0])
@pytest.mark.parametrize("per", ["layer", "row"])
def test_ria_exact_mask(a, per):
    W, X, _ = _case()
    expected_score = _ria_by_hand(W, X, a)
    assert torch.allclose(ria_score(W, _stats(X), RIAConfig(a=a)), expected_score, rtol=1e-5)
    out = get_method("ria").fn(W, _stats(X), RIAConfig(sparsity=0.5, a=a, per=per))
    k = 4 if per == "row" else 16
    assert torch.equal(out == 0, _lowest_by_sort(expected_score, k, per))


@pytest.mark.parametrize("permute", [False, True])
def test_ria_nm(permute):
    W, X, _ = _case(seed=1)
    out = get_method("ria").fn(W, _stats(X), RIAConfig(nm=(2, 4), permute=permute))
    assert nm_violations(out, 2, 4) == 0 and int((out == 0).sum()) == 16
    score = _ria_by_hand(W, X, 0.5)
    for i in range(4):
        for g in range(2):
            kept = out[i, 4 * g:4 * g + 4] != 0
            assert score[i, 4 * g:4 * g + 4][kept].min() >= score[i, 4 * g:4 * g + 4][~kept].max()


def test_ria_config_validation():
    assert RIAConfig().per == "layer" and RIAConfig().a == 0.5
    with pytest.raises(ValueError, match="needs nm"):
        RIAConfig(permute=True)
    for bad in (-1.0, True, float("nan"), "0.5"):
        with pytest.raises(ValueError, match="a must be"):
            RIAConfig(a=bad)
    with pytest.raises(ValueError, match="N must be smaller"):
        RIAConfig(nm=(4, 4))
    assert method_for_config(RIAConfig()).score is ria_score


def test_ria_through_the_engine(calib):
    model = tiny_model("llama")
    report = prune_(model, RIAConfig(sparsity=0.5), calib, progress=False)
    assert report.method == "ria" and len(report.layers) == 14
    assert all(record.zeros >= record.numel // 2 and record.problem is None for record in report.layers)


# ---------------------------------------------------------------- GBLM

def _gblm_by_hand(W, X, G, windows, alpha):
    rows, cols = W.shape
    score = torch.zeros(rows, cols)
    for i in range(rows):
        for j in range(cols):
            mean_sq = sum(float(X[t, j]) ** 2 for t in range(X.shape[0])) / windows   # the reference's scaler_row
            w = abs(float(W[i, j]))
            score[i, j] = w * math.sqrt(mean_sq) + alpha * w * float(G[i, j])
    return score


@pytest.mark.parametrize("alpha", [100.0, 0.0, 1e4])
def test_gblm_exact_mask(alpha):
    W, X, G = _case(seed=2)
    stats = WithGradient(_stats(X), G, windows=3)
    out = get_method("gblm").fn(W, stats, GBLMConfig(sparsity=0.5, alpha=alpha))
    assert torch.equal(out == 0, _lowest_by_sort(_gblm_by_hand(W, X, G, 3, alpha), 4, "row"))
    if alpha == 0:   # the gradient term off: Wanda's mask
        wanda = get_method("wanda").fn(W, _stats(X), get_method("wanda").config_cls(sparsity=0.5))
        assert torch.equal(out == 0, wanda == 0)


def test_gblm_scales_a_partial_gradient_to_all_windows():
    W, X, G = _case(seed=3)
    # G from 1 of 4 windows counts as the norm over 4 windows: sqrt(4) * G
    partial = WithGradient(_stats(X), G, windows=4, grad_windows=1)
    score = get_method("gblm").score(W, partial, GBLMConfig())
    assert torch.allclose(score, _gblm_by_hand(W, X, 2 * G, 4, 100.0), rtol=1e-5)


def test_gblm_nm_and_validation():
    W, X, G = _case(seed=4, rows=6, cols=16)
    out = get_method("gblm").fn(W, WithGradient(_stats(X), G, windows=2), GBLMConfig(nm=(4, 8)))
    assert nm_violations(out, 4, 8) == 0 and int((out == 0).sum()) == 48
    with pytest.raises(TypeError, match="WithGradient"):
        get_method("gblm").fn(W, _stats(X), GBLMConfig())
    for bad in (-1, float("inf"), False):
        with pytest.raises(ValueError, match="alpha"):
            GBLMConfig(alpha=bad)
    with pytest.raises(ValueError, match="gradient_samples"):
        GBLMConfig(gradient_samples=0)
    assert GBLMConfig().alpha == 100.0 and GBLMConfig().per == "row" and GBLMConfig().uses_gradient


# ---------------------------------------------------------------- Pruner-Zero

W24 = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.5, 1.0, 1.0, 2.0]])
X14 = torch.tensor([[4.0, 1.0, 0.25, 9.0]])
G24 = torch.tensor([[1.0, 3.0, 5.0, 2.0], [9.0, 1.0, 4.0, 7.0]])


@pytest.mark.parametrize("formula,expected", [
    # |W|^2 * (G - 1) / (9 - 1)
    (DEFAULT_FORMULA, [[0.0, 1.0, 4.5, 2.0], [0.25, 0.0, 0.375, 3.0]]),
    ("W * sqrt(X)", [[2.0, 2.0, 1.5, 12.0], [1.0, 1.0, 0.5, 6.0]]),
    ("sqr(W) - 2 * X / 4", [[-1.0, 3.5, 8.875, 11.5], [-1.75, 0.5, 0.875, -0.5]]),
    ("add(neg(W), mul(W, G))", [[0.0, 4.0, 12.0, 4.0], [4.0, 0.0, 3.0, 12.0]]),
    ("div(W, X)", [[v / math.sqrt(16 + 1 + 0.0625 + 81) for v in row] for row in [[1, 2, 3, 4], [0.5, 1, 1, 2]]]),
    ("log(W - 1)", [[math.log(0.001), math.log(1.001), math.log(2.001), math.log(3.001)],
                    [math.log(0.501), math.log(0.001), math.log(0.001), math.log(1.001)]]),
    ("mms(X) + skp(0.5)", [[3.75 / 8.75 + 0.5, 0.75 / 8.75 + 0.5, 0.5, 1.5]] * 2),   # (X - 0.25) / (9 - 0.25)
    ("exp(-W) * 0 + sigmoid(W - W) + tanh(W * 0)", [[0.5] * 4, [0.5] * 4]),
])
def test_pruner_zero_formulas_hand_computed(formula, expected):
    value = torch.broadcast_to(evaluate(formula, W=W24, X=X14, G=G24), W24.shape)
    assert torch.allclose(value, torch.tensor(expected), rtol=1e-5, atol=1e-7), value


def test_pruner_zero_zsn_and_constant_mms():
    z = evaluate("zsn(W)", W=torch.tensor([[1.0, 2.0, 3.0]]))
    assert torch.allclose(z, torch.tensor([[-1.0, 0.0, 1.0]]))
    assert torch.equal(evaluate("mms(W)", W=torch.ones(2, 2)), torch.zeros(2, 2))   # the reference: NaN


def test_pruner_zero_default_exact_mask():
    W, X, G = _case(seed=5)
    stats = WithGradient(_stats(X), G, windows=2)
    out = get_method("pruner-zero").fn(W, stats, PrunerZeroConfig(sparsity=0.5))
    expected = W.square() * (G - G.min()) / (G.max() - G.min())               # W^2 * mms(G), by hand
    assert torch.equal(out == 0, _lowest_by_sort(expected, 4, "row"))
    nm = get_method("pruner-zero").fn(W, stats, PrunerZeroConfig(nm=(2, 4)))
    assert nm_violations(nm, 2, 4) == 0


def test_pruner_zero_variables_follow_the_reference():
    W, X, G = _case(seed=6)
    stats = WithGradient(_stats(X), G, windows=3, grad_windows=1)
    score = get_method("pruner-zero").score
    # W is the magnitude, X the squared input norm per window, G 100 * the all-window gradient norm
    assert torch.allclose(score(-W, stats, PrunerZeroConfig(formula="W")), W.abs())
    assert torch.allclose(score(W, stats, PrunerZeroConfig(formula="X")),
                          (X.square().sum(0) / 3).expand(4, 8), rtol=1e-5)
    assert torch.allclose(score(W, stats, PrunerZeroConfig(formula="G")), 100 * math.sqrt(3) * G, rtol=1e-5)


def test_pruner_zero_uses_gradient_and_runs_without_one():
    assert PrunerZeroConfig().uses_gradient
    config = PrunerZeroConfig(formula="abs(W) * sqrt(X)")                     # Wanda, written as a formula
    assert not config.uses_gradient
    W, X, _ = _case(seed=7)
    out = get_method("pruner-zero").fn(W, _stats(X), config)                  # a plain observer suffices
    wanda = get_method("wanda").fn(W, _stats(X), get_method("wanda").config_cls(sparsity=0.5))
    assert torch.equal(out == 0, wanda == 0)
    with pytest.raises(TypeError, match="uses G"):
        get_method("pruner-zero").fn(W, _stats(X), PrunerZeroConfig())


@pytest.mark.parametrize("formula,token", [
    ("__import__('os')", "__import__"),
    ("W.__class__", "W.__class__"),
    ("(lambda: W)()", "lambda"),
    ("lambda: 1", "Lambda"),
    ("open('x')", "open"),
    ("W[0]", "W[0]"),
    ("W ** 2", "W ** 2"),
    ("mms(G, W)", "mms"),
    ("mms", "mms"),
    ("Y * W", "Y"),
    ("'W'", "'W'"),
    ("W +", "not a valid expression"),
    ("W" + " + W" * 200, "at most 500"),
])
def test_pruner_zero_rejects_unsafe_formulas(formula, token):
    with pytest.raises(ValueError) as err:
        PrunerZeroConfig(formula=formula)
    assert token in str(err.value)
