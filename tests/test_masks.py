"""Exact masks on hand-built matrices."""
import pytest
import torch

from prunekit.masks import check_pruned, lowest, nm_violations


def test_row_mask_exact():
    score = torch.tensor([[4.0, 1.0, 3.0, 2.0],
                          [0.5, 0.6, 0.1, 0.9]])
    expected = torch.tensor([[False, True, False, True],
                             [True, False, True, False]])
    assert torch.equal(lowest(score, 0.5, per="row"), expected)


def test_layer_mask_exact():
    score = torch.tensor([[4.0, 1.0, 3.0, 2.0],
                          [0.5, 0.6, 0.1, 0.9]])
    # the 3 lowest of the whole matrix (int(8 * 0.4) = 3): 0.1, 0.5, 0.6
    expected = torch.tensor([[False, False, False, False],
                             [True, True, True, False]])
    assert torch.equal(lowest(score, 0.4, per="layer"), expected)


def test_nm_mask_exact():
    score = torch.tensor([[1.0, 2.0, 3.0, 4.0, 8.0, 7.0, 6.0, 5.0],
                          [9.0, 0.0, 9.0, 0.5, 1.0, 1.5, 0.2, 3.0]])
    expected = torch.tensor([[True, True, False, False, False, False, True, True],
                             [False, True, False, True, True, False, True, False]])
    assert torch.equal(lowest(score, 0.0, nm=(2, 4)), expected)


def test_nm_4_of_8_and_1_of_4():
    torch.manual_seed(0)
    score = torch.rand(16, 64)
    for n, m in [(4, 8), (1, 4), (2, 4)]:
        mask = lowest(score, 0.0, nm=(n, m))
        assert torch.equal(mask.reshape(16, -1, m).sum(-1), torch.full((16, 64 // m), n))
        # the pruned entries are the lowest of their group
        groups, masked = score.reshape(16, -1, m), mask.reshape(16, -1, m)
        assert (groups.masked_fill(~masked, -1).amax(-1) <= groups.masked_fill(masked, 2).amin(-1)).all()


def test_ties_keep_exact_counts():
    score = torch.ones(3, 10)
    assert int(lowest(score, 0.5, per="row").sum()) == 15
    assert int(lowest(score, 0.35, per="layer").sum()) == int(30 * 0.35)


def test_zero_sparsity_prunes_nothing():
    assert not lowest(torch.rand(4, 8), 0.0).any()


def test_nm_needs_divisible_width():
    with pytest.raises(ValueError, match="multiple of 4"):
        lowest(torch.rand(2, 6), 0.0, nm=(2, 4))


def test_check_pruned():
    W = torch.tensor([[0.0, 1.0, 0.0, 2.0], [3.0, 0.0, 0.0, 4.0]])
    assert check_pruned(W, 0.5, None, "row") is None
    assert check_pruned(W, 0.5, (2, 4), "row") is None
    assert nm_violations(W, 2, 4) == 0
    dense = torch.ones(2, 4)
    assert "fewer" in check_pruned(dense, 0.5, None, "row")
    assert "fewer" in check_pruned(dense, 0.5, (2, 4), "row")
    assert "expected" in check_pruned(dense, 0.5, None, "layer")
    over = torch.zeros(2, 4)
    assert "over-pruned" in check_pruned(over, 0.5, None, "layer")
    assert check_pruned(over, 0.5, None, "layer", zeros_before=4) is None
