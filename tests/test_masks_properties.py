"""Property-based tests of the mask functions: exact counts (per row, per layer), the N:M pattern,
idempotence (per row, per layer, N:M), and that `check_pruned` accepts exactly these and catches
one weight too few or too many."""
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prunekit.masks import check_pruned, lowest


@st.composite
def scores(draw):
    rows = draw(st.integers(1, 12))
    groups = draw(st.integers(1, 6))
    m = draw(st.sampled_from([2, 4, 8]))
    seed = draw(st.integers(0, 2**16))
    values = torch.randn(rows, groups * m, generator=torch.Generator().manual_seed(seed))
    if draw(st.booleans()):
        values = values.round()            # many ties
    return values, m


@settings(max_examples=60, deadline=None)
@given(scores(), st.floats(0.0, 0.99))
def test_unstructured_counts_are_exact(data, sparsity):
    score, _ = data
    rows, cols = score.shape
    assert torch.equal(lowest(score, sparsity, per="row").sum(1), torch.full((rows,), int(cols * sparsity)))
    assert int(lowest(score, sparsity, per="layer").sum()) == int(rows * cols * sparsity)


@settings(max_examples=60, deadline=None)
@given(scores(), st.data())
def test_nm_pattern_and_lowest(data, draw):
    score, m = data
    n = draw.draw(st.integers(1, m - 1))
    mask = lowest(score, 0.0, nm=(n, m))
    groups = mask.reshape(score.shape[0], -1, m)
    assert (groups.sum(-1) == n).all()
    values = score.reshape(score.shape[0], -1, m)
    assert (values.masked_fill(~groups, float("-inf")).amax(-1)
            <= values.masked_fill(groups, float("inf")).amin(-1)).all()
    W = score.masked_fill(mask, 0)
    assert check_pruned(W, n / m, (n, m), "row", zeros_before=int((score == 0).sum())) is None


@settings(max_examples=40, deadline=None)
@given(scores(), st.floats(0.0, 0.99))
def test_pruning_twice_changes_nothing(data, sparsity):
    """Idempotence: re-pruning a pruned matrix by magnitude selects the zeros again."""
    score, _ = data
    W = score + torch.sign(score) * 0.5 + (score == 0) * 0.5     # no exact zeros before pruning
    once = W.masked_fill(lowest(W.abs(), sparsity, per="row"), 0)
    twice = once.masked_fill(lowest(once.abs(), sparsity, per="row"), 0)
    assert torch.equal(once, twice)


@settings(max_examples=40, deadline=None)
@given(scores(), st.floats(0.0, 0.99))
def test_per_layer_pruning_twice_changes_nothing(data, sparsity):
    score, _ = data
    W = score + torch.sign(score) * 0.5 + (score == 0) * 0.5
    once = W.masked_fill(lowest(W.abs(), sparsity, per="layer"), 0)
    assert check_pruned(once, sparsity, None, "layer") is None
    twice = once.masked_fill(lowest(once.abs(), sparsity, per="layer"), 0)
    assert torch.equal(once, twice)


@settings(max_examples=40, deadline=None)
@given(scores(), st.data())
def test_nm_pruning_twice_changes_nothing(data, draw):
    score, m = data
    n = draw.draw(st.integers(1, m - 1))
    W = score + torch.sign(score) * 0.5 + (score == 0) * 0.5
    once = W.masked_fill(lowest(W.abs(), 0.0, nm=(n, m)), 0)
    assert ((once.reshape(W.shape[0], -1, m) == 0).sum(-1) == n).all()     # exactly n zeros in every group
    twice = once.masked_fill(lowest(once.abs(), 0.0, nm=(n, m)), 0)
    assert torch.equal(once, twice)


@settings(max_examples=40, deadline=None)
@given(scores(), st.data())
def test_check_pruned_catches_one_restored_weight(data, draw):
    """The verifier is not vacuous: undo one pruned weight and it names the shortfall."""
    score, m = data
    W = score + torch.sign(score) * 0.5 + (score == 0) * 0.5           # no zeros before pruning
    n = draw.draw(st.integers(1, m - 1))
    sparsity = n / m
    for nm, per in (((n, m), "row"), (None, "row"), (None, "layer")):
        mask = lowest(W.abs(), sparsity, nm, per)
        pruned = W.masked_fill(mask, 0)
        assert check_pruned(pruned, sparsity, nm, per) is None
        row, col = [int(i) for i in mask.nonzero()[draw.draw(st.integers(0, int(mask.sum()) - 1))]]
        pruned[row, col] = W[row, col]
        assert check_pruned(pruned, sparsity, nm, per) is not None
        over = W.masked_fill(mask, 0)
        kept = (~mask).nonzero()
        if len(kept):                                              # one zero too many is over-pruning
            r, c = [int(i) for i in kept[0]]
            over[r, c] = 0
            assert check_pruned(over, sparsity, nm, per) is not None
