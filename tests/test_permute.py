"""Channel permutation for N:M: valid, strictly better where a better order is obvious, never
worse than the identity; with and without scipy."""
import itertools
import sys

import pytest
import torch

from prunekit.permute import _max_assignment, _swap_assignment, nm_permutation, retained_score


def _is_permutation(perm, size):
    return perm.dtype == torch.long and torch.equal(perm.sort().values, torch.arange(size))


def test_retained_score_hand_computed():
    score = torch.tensor([[1.0, 2.0, 3.0, 4.0, 8.0, 7.0, 6.0, 5.0],
                          [9.0, 0.0, 9.0, 0.5, 1.0, 1.5, 0.2, 3.0]])
    # 2:4 keeps the 2 largest of every 4: (3 + 4) + (8 + 7) + (9 + 9) + (3 + 1.5)
    assert retained_score(score, 2, 4) == pytest.approx(44.5)
    with pytest.raises(ValueError, match="multiple of 4"):
        retained_score(torch.ones(2, 6), 2, 4)


def _bad_order():
    # the four heavy channels share the first group of 4, so 2:4 must drop two of them
    return torch.tensor([[10.0, 10.0, 10.0, 10.0, 0.0, 0.0, 0.0, 0.0],
                         [9.0, 9.0, 9.0, 9.0, 1.0, 1.0, 1.0, 1.0]])


@pytest.mark.parametrize("scipy", [True, False])
def test_obvious_improvement(monkeypatch, scipy):
    if not scipy:
        monkeypatch.setitem(sys.modules, "scipy.optimize", None)     # import fails: the fallback runs
    score = _bad_order()
    perm = nm_permutation(score, 2, 4)
    assert perm is not None and _is_permutation(perm, 8)
    assert retained_score(score, 2, 4) == pytest.approx(20.0 + 20.0)
    assert retained_score(score[:, perm], 2, 4) == pytest.approx(40.0 + 36.0)   # two heavy per group: optimal


@pytest.mark.parametrize("scipy", [True, False])
@pytest.mark.parametrize("shape,nm", [((16, 32), (2, 4)), ((8, 64), (4, 8)), ((4, 16), (1, 4)), ((5, 12), (3, 4))])
def test_never_worse_than_identity(monkeypatch, scipy, shape, nm):
    if not scipy:
        monkeypatch.setitem(sys.modules, "scipy.optimize", None)
    for seed in range(3):
        generator = torch.Generator().manual_seed(seed)
        score = torch.rand(shape, generator=generator) * torch.rand(shape[1], generator=generator) ** 3
        perm = nm_permutation(score, *nm, block_groups=3)     # small blocks: several assignments per slot
        if perm is None:
            continue
        assert _is_permutation(perm, shape[1])
        assert retained_score(score[:, perm], *nm) > retained_score(score, *nm)


def test_already_optimal_returns_none():
    score = torch.tensor([[10.0, 10.0, 0.0, 0.0, 10.0, 10.0, 0.0, 0.0]])
    assert nm_permutation(score, 2, 4) is None


def test_assignment_solvers_against_brute_force():
    value = torch.rand(5, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def total(assignment):
        return float(value[assignment, torch.arange(5)].sum())

    best = max(total(torch.tensor(p)) for p in itertools.permutations(range(5)))
    assert total(_max_assignment(value)) == pytest.approx(best)          # exact (scipy)
    assert total(_swap_assignment(value)) >= total(torch.arange(5))        # local search: no worse than identity
