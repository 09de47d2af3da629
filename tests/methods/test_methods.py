"""Each method against its paper's formula on hand-built or seeded matrices."""
import pytest
import torch

from prunekit import MagnitudeConfig, SparseGPTConfig, WandaConfig
from prunekit.catalog import available_methods, get_method
from prunekit.registry import register
from prunekit.stats import Hessian, InputNorm


def _stats(cls, X):
    stats = cls(X.shape[-1], torch.device("cpu"))
    stats.update(X)
    return stats


def test_registry_lists_and_rejects():
    assert {"magnitude", "wanda", "sparsegpt"} <= set(available_methods())
    with pytest.raises(ValueError, match="did you mean 'wanda'|Did you mean 'wanda'"):
        get_method("wandaa")
    with pytest.raises(ValueError, match="already registered"):
        register("wanda", WandaConfig)(lambda W, s, c: W)


def test_magnitude_exact_layer_mask():
    W = torch.tensor([[1.0, -5.0, 2.0, -0.5], [3.0, 0.1, -4.0, 6.0]])
    out = get_method("magnitude").fn(W, None, MagnitudeConfig(sparsity=0.5))
    expected = torch.tensor([[0.0, -5.0, 0.0, 0.0], [3.0, 0.0, -4.0, 6.0]])
    assert torch.equal(out, expected)


def test_wanda_uses_input_norm():
    # equal weights: the column with the small input norm is pruned
    W = torch.ones(2, 4)
    X = torch.tensor([[1.0, 10.0, 0.1, 5.0], [1.0, 10.0, 0.1, 5.0]])      # (tokens, in)
    out = get_method("wanda").fn(W, _stats(InputNorm, X), WandaConfig(sparsity=0.5))
    assert torch.equal(out, torch.tensor([[0.0, 1.0, 0.0, 1.0], [0.0, 1.0, 0.0, 1.0]]))
    # the score is |W| * ||X_j||_2 (scores 2, 10, 5, 15 up to sqrt(2)): the large weight on the quiet
    # input goes, the small weight on the loud input stays (magnitude would do the opposite)
    W = torch.tensor([[2.0, 1.0, 50.0, 3.0]])
    out = get_method("wanda").fn(W, _stats(InputNorm, X), WandaConfig(sparsity=0.5))
    assert torch.equal(out, torch.tensor([[0.0, 1.0, 0.0, 3.0]]))


def _sparsegpt_reference(W, H, sparsity, prunen=0, prunem=0, blocksize=128, percdamp=0.01):
    """Transcription of SparseGPT.fasterprune (arXiv 2301.00774, Algorithm 1) with an exact-count
    mask (lowest int(numel * sparsity) of each block), the only deliberate difference."""
    W = W.clone()
    H = H.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    damp = percdamp * torch.mean(torch.diag(H))
    H[range(H.shape[0]), range(H.shape[0])] += damp
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    Hinv = torch.linalg.cholesky(H, upper=True)
    for i1 in range(0, W.shape[1], blocksize):
        i2 = min(i1 + blocksize, W.shape[1])
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        if prunen == 0:
            tmp = W1 ** 2 / (torch.diag(Hinv1).reshape((1, -1))) ** 2
            k = int(tmp.numel() * sparsity)
            mask1 = torch.zeros(tmp.numel(), dtype=torch.bool)
            mask1[torch.argsort(tmp.flatten())[:k]] = True
            mask1 = mask1.reshape(tmp.shape)
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            if prunen != 0 and i % prunem == 0:
                tmp = W1[:, i:(i + prunem)] ** 2 / (torch.diag(Hinv1)[i:(i + prunem)].reshape((1, -1))) ** 2
                mask1.scatter_(1, i + torch.topk(tmp, prunen, dim=1, largest=False)[1], True)
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return W


@pytest.mark.parametrize("nm", [None, (2, 4), (4, 8)])
@pytest.mark.parametrize("blocksize", [128, 16])
def test_sparsegpt_matches_reference_algorithm(nm, blocksize):
    torch.manual_seed(0)
    W = torch.randn(24, 64)
    X = torch.randn(512, 64) @ torch.randn(64, 64)
    cfg = SparseGPTConfig(sparsity=0.5, nm=nm, blocksize=blocksize)
    ours = get_method("sparsegpt").fn(W, _stats(Hessian, X), cfg)
    ref = _sparsegpt_reference(W, X.T @ X, 0.5, *(nm or (0, 0)), blocksize=blocksize)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    assert torch.equal(ours == 0, ref == 0)


def test_sparsegpt_beats_wanda_and_magnitude_on_reconstruction():
    torch.manual_seed(0)
    W = torch.randn(64, 128)
    X = torch.randn(2048, 128) * torch.rand(128) * 3 + torch.randn(2048, 1)   # uneven, correlated features
    errors = {}
    for name, cfg in [("magnitude", MagnitudeConfig(sparsity=0.5)), ("wanda", WandaConfig(sparsity=0.5)),
                      ("sparsegpt", SparseGPTConfig(sparsity=0.5))]:
        method = get_method(name)
        stats = _stats(method.stats, X) if method.stats else None
        W_new = method.fn(W, stats, cfg)
        errors[name] = float((X @ (W - W_new).T).norm() / (X @ W.T).norm())
    assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"], errors


def test_sparsegpt_zeroes_dead_inputs_and_survives_singular_hessian():
    W = torch.randn(8, 16)
    X = torch.randn(4, 16)          # rank 4 < 16: H singular; damping makes it invertible
    X[:, 3] = 0                     # a dead input
    out = get_method("sparsegpt").fn(W, _stats(Hessian, X), SparseGPTConfig(sparsity=0.5))
    assert torch.isfinite(out).all()
    assert (out[:, 3] == 0).all()


def test_hessian_raises_dampening_then_falls_back(monkeypatch):
    X = torch.randn(64, 4)
    real = torch.linalg.cholesky_ex
    calls = []

    def failing(A, upper=False, fails=1):
        calls.append(A)
        L, info = real(A, upper=upper)
        return L, torch.tensor(1) if len(calls) <= fails else info

    monkeypatch.setattr(torch.linalg, "cholesky_ex", failing)
    U, damp, note = _stats(Hessian, X).inverse_cholesky(0.01)
    assert damp == pytest.approx(0.1) and "0.1" in note           # first try failed: 10x dampening

    calls.clear()
    monkeypatch.setattr(torch.linalg, "cholesky_ex", lambda A, upper=False: failing(A, upper, fails=99))
    stats = _stats(Hessian, X)
    U, damp, note = stats.inverse_cholesky(0.01)
    assert "fallback" in note and torch.isfinite(U).all()
    assert torch.count_nonzero(U - torch.diag(U.diagonal())) == 0   # diagonal: no OBS update
    W = torch.randn(3, 4)
    out = get_method("sparsegpt").fn(W, stats, SparseGPTConfig(sparsity=0.5))
    kept = out != 0
    assert torch.equal(out[kept], W[kept])                          # kept weights unchanged


@pytest.mark.parametrize("bad, match", [
    (dict(sparsity=1.0), r"\[0, 1\)"), (dict(sparsity=-0.1), r"\[0, 1\)"),
    (dict(nm=(4, 4)), "smaller than M"), (dict(nm=(3, 2)), "smaller than M"),
    (dict(per="column"), "row"), (dict(targets=("(",)), "regular expression"),
    (dict(overrides={"mlp": 1.5}), "overrides"),
])
def test_config_validation(bad, match):
    with pytest.raises(ValueError, match=match):
        WandaConfig(**bad)


def test_nm_sets_sparsity_and_overrides_resolve():
    cfg = WandaConfig(nm=(2, 4), overrides={r"layers\.0\.": 0.25}, ignore=("down",))
    assert cfg.sparsity == 0.5
    assert cfg.sparsity_for("model.layers.0.mlp.up_proj") == 0.25
    assert cfg.sparsity_for("model.layers.1.mlp.up_proj") == 0.5
    assert cfg.sparsity_for("model.layers.1.mlp.down_proj") is None


def _wanda_reference_mask(W, scaler_row, sparsity, prune_n=0, prune_m=0):
    """Transcription of the mask logic of `prune_wanda` in locuslab/wanda (lib/prune.py)."""
    W_metric = torch.abs(W) * torch.sqrt(scaler_row.reshape((1, -1)))
    W_mask = torch.zeros_like(W_metric) == 1
    if prune_n != 0:
        for ii in range(W_metric.shape[1]):
            if ii % prune_m == 0:
                tmp = W_metric[:, ii:(ii + prune_m)].float()
                W_mask.scatter_(1, ii + torch.topk(tmp, prune_n, dim=1, largest=False)[1], True)
    else:
        sort_res = torch.sort(W_metric, dim=-1, stable=True)
        indices = sort_res[1][:, :int(W_metric.shape[1] * sparsity)]
        W_mask.scatter_(1, indices, True)
    return W_mask


@pytest.mark.parametrize("nm", [None, (2, 4), (4, 8)])
def test_wanda_matches_reference_mask(nm):
    torch.manual_seed(0)
    W = torch.randn(48, 64)
    X = torch.randn(300, 64) * torch.rand(64) * 4
    stats = _stats(InputNorm, X)
    # the reference keeps a running mean of squared norms; a positive scale does not change any mask
    scaler_row = stats.sq_norm / stats.tokens
    expected = _wanda_reference_mask(W, scaler_row, 0.5, *(nm or (0, 0)))
    ours = get_method("wanda").fn(W, stats, WandaConfig(sparsity=0.5, nm=nm))
    assert torch.equal(ours == 0, expected)
