"""Observers (stats.py): exact sums on hand-built batches, chunking, SUMS additivity, permutation,
dead inputs, and the inverse Cholesky factor with its dampening retries and diagonal fallback."""
import pytest
import torch
from torch.testing import assert_close

from prunekit.stats import DAMP_RETRIES, Hessian, InputNorm, MeanVar

CPU = torch.device("cpu")

# Integer-valued batches: every float32 product and sum below is exact, so results can be compared bit for bit.
A = torch.tensor([[1., 2., 0., -1.],
                  [3., -1., 0., 2.],
                  [0., 1., 0., 1.]])
B = torch.tensor([[2., 0., 0., 1.],
                  [-2., 1., 0., 3.]])
C = torch.tensor([[1., 1., 0., 1.]])
ALL = torch.cat([A, B, C])                                 # (6, 4); input 2 is always zero


def _fed(cls, *batches):
    obs = cls(4, CPU)
    for X in batches:
        obs.update(X)
    return obs


def test_input_norm_is_the_column_sum_of_squares():
    obs = _fed(InputNorm, A, B, C)
    assert obs.tokens == 6
    assert obs.sq_norm64.dtype == torch.float64
    assert_close(obs.sq_norm64, torch.tensor([19., 8., 0., 17.], dtype=torch.float64), rtol=0, atol=0)
    assert obs.sq_norm.dtype == torch.float32
    assert_close(obs.sq_norm, ALL.square().sum(0), rtol=0, atol=0)


def test_hessian_is_x_transpose_x():
    obs = _fed(Hessian, A, B, C)
    expected = ALL.double().T @ ALL.double()
    assert obs.tokens == 6
    assert obs.H64.dtype == torch.float64 and obs.H.dtype == torch.float32
    assert_close(obs.H64, expected, rtol=0, atol=0)
    assert_close(obs.H, expected.float(), rtol=0, atol=0)
    assert obs.H[0, 3].item() == 1 * -1 + 3 * 2 + 0 * 1 + 2 * 1 + -2 * 3 + 1 * 1    # one entry by hand: 2
    assert_close(obs.sq_norm, torch.tensor([19., 8., 0., 17.]), rtol=0, atol=0)
    assert obs.dead.tolist() == [False, False, True, False]


def test_mean_and_unbiased_variance():
    obs = _fed(MeanVar, A, B, C)
    assert obs.tokens == 6
    assert_close(obs.mean, ALL.mean(0), rtol=0, atol=1e-7)
    assert_close(obs.var, ALL.var(0, unbiased=True), rtol=0, atol=1e-6)
    assert_close(obs.mean, torch.tensor([5 / 6, 4 / 6, 0, 7 / 6]))
    assert_close(obs.sq_norm, torch.tensor([19., 8., 0., 17.]), rtol=0, atol=0)


def test_mean_var_keeps_digits_that_float32_would_lose():
    # activations with a large mean: E[x^2] - E[x]^2 in float32 would cancel every digit of the variance
    X = torch.tensor([[1e4 + 1.0], [1e4 - 1.0], [1e4 + 2.0], [1e4 - 2.0]])
    obs = _fed_1d(X)
    assert_close(obs.mean, torch.tensor([1e4]))
    assert_close(obs.var, torch.tensor([10 / 3]), rtol=1e-6, atol=0)


def _fed_1d(X):
    obs = MeanVar(1, CPU)
    obs.update(X[:2])
    obs.update(X[2:])
    return obs


def test_mean_var_edge_counts():
    empty = MeanVar(3, CPU)
    assert_close(empty.mean, torch.zeros(3), rtol=0, atol=0)
    assert_close(empty.var, torch.zeros(3), rtol=0, atol=0)
    one = MeanVar(2, CPU)
    one.update(torch.tensor([[3., -4.]]))
    assert_close(one.mean, torch.tensor([3., -4.]), rtol=0, atol=0)
    assert_close(one.var, torch.zeros(2), rtol=0, atol=0)      # one token: no spread, not NaN


@pytest.mark.parametrize("cls", [InputNorm, Hessian, MeanVar])
def test_chunked_updates_equal_one_update(cls):
    chunked = _fed(cls, A, B, C)
    whole = _fed(cls, ALL)
    assert chunked.tokens == whole.tokens == 6
    for name in cls.SUMS:
        assert_close(getattr(chunked, name), getattr(whole, name), rtol=0, atol=0)


def test_chunked_updates_match_float64_on_random_data():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(3, 7, 5, generator=g)                  # (batch, seq, in): flattened over tokens
    obs = Hessian(5, CPU)
    for chunk in X:
        obs.update(chunk)
    flat = X.reshape(-1, 5).double()
    assert obs.tokens == 21
    assert_close(obs.H64, flat.T @ flat, rtol=1e-6, atol=1e-6)
    norm = InputNorm(5, CPU)
    norm.update(X)                                         # a 3-D batch at once
    assert norm.tokens == 21
    assert_close(norm.sq_norm64, flat.square().sum(0), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("cls", [InputNorm, Hessian, MeanVar])
def test_sums_of_disjoint_windows_add_up(cls):
    # the distributed merge: each process's SUMS added together equal one process over every window
    left, right, whole = _fed(cls, A), _fed(cls, B, C), _fed(cls, ALL)
    for name in cls.SUMS:
        setattr(left, name, getattr(left, name) + getattr(right, name))
    left.tokens += right.tokens
    if hasattr(left, "sums_changed"):
        left.sums_changed()
    for name in cls.SUMS:
        assert_close(getattr(left, name), getattr(whole, name), rtol=0, atol=0)
    if cls is MeanVar:
        assert_close(left.var, whole.var, rtol=0, atol=0)
    else:
        assert_close(left.sq_norm, whole.sq_norm, rtol=0, atol=0)


def test_cached_float32_copy_follows_updates_and_setters():
    obs = _fed(Hessian, A)
    first = obs.H.clone()
    obs.update(B)
    assert not torch.equal(obs.H, first)
    assert_close(obs.H, (torch.cat([A, B]).T @ torch.cat([A, B])), rtol=0, atol=0)
    obs.H = torch.eye(4)
    assert obs.H64.dtype == torch.float64
    assert_close(obs.H, torch.eye(4), rtol=0, atol=0)
    norm = _fed(InputNorm, A)
    assert_close(norm.sq_norm, A.square().sum(0), rtol=0, atol=0)
    norm.sq_norm = torch.tensor([1., 2., 3., 4.])
    assert norm.sq_norm64.dtype == torch.float64
    assert_close(norm.sq_norm, torch.tensor([1., 2., 3., 4.]), rtol=0, atol=0)


def test_permute_follows_reordered_inputs():
    perm = torch.tensor([3, 0, 2, 1])
    H = _fed(Hessian, A, B)
    H.permute_(perm)
    assert_close(H.H, _fed(Hessian, A[:, perm], B[:, perm]).H, rtol=0, atol=0)
    before = _fed(Hessian, A, B).H
    assert_close(H.H, before[perm][:, perm], rtol=0, atol=0)
    assert H.dead.tolist() == [False, False, True, False]
    N = _fed(InputNorm, A, B)
    N.permute_(perm)
    assert_close(N.sq_norm, _fed(InputNorm, A, B).sq_norm[perm], rtol=0, atol=0)
    assert_close(N.sq_norm, torch.tensor([16., 18., 0., 7.]), rtol=0, atol=0)


def test_wrong_width_is_refused():
    for cls in (InputNorm, Hessian, MeanVar):
        obs = cls(4, CPU)
        with pytest.raises(RuntimeError):
            obs.update(torch.ones(2, 5))
        assert obs.tokens == 0


def test_nan_input_poisons_only_its_own_features():
    X = A.clone()
    X[1, 3] = float("nan")
    norm = _fed(InputNorm, X)
    assert torch.isnan(norm.sq_norm).tolist() == [False, False, False, True]
    H = _fed(Hessian, X)
    assert torch.isnan(H.H[3]).all() and torch.isnan(H.H[:, 3]).all()
    assert not torch.isnan(H.H[:3, :3]).any()


SPD = torch.tensor([[4., 1., 0., 0.5],
                    [1., 3., 0.5, 0.],
                    [0., 0.5, 2., 0.25],
                    [0.5, 0., 0.25, 1.]])


def _hessian(H):
    obs = Hessian(H.shape[0], CPU)
    obs.H = H
    return obs


def test_inverse_cholesky_of_a_4x4_spd_matrix():
    obs = _hessian(SPD)
    damp = 0.01
    U, used, note = obs.inverse_cholesky(damp)
    damped = SPD.double() + damp * SPD.diagonal().double().mean() * torch.eye(4, dtype=torch.float64)
    inverse = torch.linalg.inv(damped)
    assert used == damp and note is None
    assert torch.equal(U, torch.triu(U))                                       # upper triangular
    assert_close(U.double().T @ U.double(), inverse, rtol=1e-5, atol=1e-6)
    expected = torch.linalg.cholesky(inverse, upper=True)
    assert_close(U.double(), expected, rtol=1e-5, atol=1e-6)
    assert obs.inverse_cholesky(damp)[0] is U                                  # cached per dampening
    assert obs.inverse_cholesky(0.1)[0] is not U
    obs.update(torch.zeros(1, 4))                                              # any update invalidates it
    assert obs.inverse_cholesky(damp)[0] is not U


def test_dead_inputs_get_unit_diagonal_before_dampening():
    H = SPD.clone()
    H[2, :] = 0
    H[:, 2] = 0
    obs = _hessian(H)
    assert obs.dead.tolist() == [False, False, True, False]
    U, used, note = obs.inverse_cholesky(0.05)
    fixed = H.double().clone()
    fixed[2, 2] = 1.0
    damped = fixed + 0.05 * fixed.diagonal().mean() * torch.eye(4, dtype=torch.float64)
    assert note is None and used == 0.05
    assert_close(U.double().T @ U.double(), torch.linalg.inv(damped), rtol=1e-5, atol=1e-6)
    assert_close(obs.H, H, rtol=0, atol=0)                                     # H itself is left untouched


def test_failed_factorisation_raises_the_dampening():
    H = torch.diag(torch.tensor([1., 1., 1., -0.02]))     # indefinite: fails at 1x, passes at 10x
    U, used, note = _hessian(H).inverse_cholesky(0.01)
    assert used == pytest.approx(0.1)
    assert note == "Cholesky failed; dampening raised to 0.1"
    mean = (3 - 0.02) / 4
    expected = torch.linalg.inv(H.double() + 0.1 * mean * torch.eye(4, dtype=torch.float64))
    assert_close(U.double().T @ U.double(), expected, rtol=1e-5, atol=1e-6)


def test_hopeless_matrix_falls_back_to_the_diagonal():
    H = torch.diag(torch.tensor([-1., -2., -3., -4.]))    # negative mean diagonal: every retry makes it worse
    U, used, note = _hessian(H).inverse_cholesky(0.01)
    assert used == 0.01
    tried = ", ".join(f"{0.01 * f:g}" for f in DAMP_RETRIES)
    assert note.startswith(f"Cholesky failed at dampening {tried} (x mean diag H); fallback: diagonal H")
    # diag(H).clamp_min(0) + damp * |mean diag| + tiny = 0.025 everywhere
    expected = torch.full((4,), 0.025 + torch.finfo(torch.float32).tiny).rsqrt()
    assert_close(U, torch.diag(expected))
