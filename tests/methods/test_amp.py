"""AMP (arXiv 2504.21174): exact scores on hand-built tensors, and the tiny-model family matrix."""
import pytest
import torch
from conftest import NO_STOCK_HEADS, TINY_CONFIGS, check_stock_reload_and_cache, tiny_model
from torch import nn

from prunekit import prune_
from prunekit.methods.amp import AMPConfig, AMPStats, amp, head_projection_l1
from prunekit.structured import Coupled

FAMILIES = sorted(TINY_CONFIGS)


def _group(kind: str, W: torch.Tensor, column_units: list[int]) -> Coupled:
    """A coupled group with a bias-free consumer of weight W (out, columns) and no producers."""
    consumer = nn.Linear(W.shape[1], W.shape[0], bias=False)
    consumer.weight.data = W.clone()
    units = max(column_units) + 1
    return Coupled(kind, 0, units, [], consumer, torch.tensor(column_units), 1, 1, head_dim=W.shape[1] // units)


# 3 tokens x 8 consumer input columns: head 0 = columns 0-3, head 1 = columns 4-7
X = torch.tensor([[1.0, -2.0, 0.0, 3.0, 1.0, 1.0, 0.5, 0.0],
                  [0.0, 1.0, -1.0, 0.0, -2.0, -2.0, 0.0, 4.0],
                  [2.0, 0.0, 0.0, -1.0, 3.0, 3.0, -1.0, 0.0]])


def test_head_score_is_the_l1_norm_of_the_projection_through_its_output_columns():
    """Consumer 4x8. Head 0 writes its 4 inputs to the 4 outputs unchanged; head 1 writes x4 - x5 to
    output 0, 2*x6 to output 1 and nothing from x7. On these tokens x4 == x5, so head 1's large
    activations project to 2*|x6| only: AMP scores what a head writes, not how large its inputs are."""
    W = torch.zeros(4, 8)
    W[:, :4] = torch.eye(4)
    W[0, 4], W[0, 5], W[1, 6] = 1.0, -1.0, 2.0
    group = _group("heads", W, [0, 0, 0, 0, 1, 1, 1, 1])
    stats = AMPStats.for_group(group, torch.device("cpu"))
    stats.update(X[None])                                      # (batch, tokens, columns) like a hook sees it
    head0 = (1 + 2 + 0 + 3) + (0 + 1 + 1 + 0) + (2 + 0 + 0 + 1)            # sum_t ||x_t,0:4||_1 = 11
    head1 = 2 * (0.5 + 0.0 + 1.0)                                          # sum_t |2 x_t6| = 3
    expected = torch.tensor([head0, head1], dtype=torch.float64) / 3
    torch.testing.assert_close(amp(group, stats, AMPConfig()), expected, rtol=0, atol=1e-12)
    # the activation norm alone would rank head 1 first
    assert X[:, 4:].abs().sum() > X[:, :4].abs().sum()


def test_a_kv_unit_is_scored_by_its_summed_contribution():
    """Two query heads of one KV group (unit 0) that write opposite values cancel: the unit writes nothing."""
    W = torch.zeros(4, 8)
    W[0, 0], W[0, 4] = 1.0, -1.0                   # head A's column 0 and head B's column 4 both to output 0
    Xs = torch.zeros(5, 8)
    Xs[:, 0] = Xs[:, 4] = torch.arange(1.0, 6.0)
    scores = head_projection_l1(Xs, W, torch.zeros(8, dtype=torch.long), 1)
    assert scores.tolist() == [0.0]
    per_head = head_projection_l1(Xs, W, torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]), 2)
    assert per_head.tolist() == [15.0, 15.0]


def test_channel_score_is_the_mean_absolute_activation():
    """MLP channels: the paper's |act(gate) * up| averaged over tokens, i.e. mean |x_j| of down's input."""
    group = _group("channels", torch.randn(4, 8), list(range(8)))
    stats = AMPStats.for_group(group, torch.device("cpu"))
    stats.update(X[:2])
    stats.update(X[2:])                            # two chunks: running sums
    expected = X.double().abs().mean(dim=0)
    torch.testing.assert_close(amp(group, stats, AMPConfig()), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("family", FAMILIES)
def test_amp_on_every_family(family, calib, tmp_path):
    model = tiny_model(family)
    report = prune_(model, AMPConfig(sparsity=0.3, attention=family not in NO_STOCK_HEADS), calib, progress=False)
    assert 0.15 < report.removed_fraction < 0.45
    check_stock_reload_and_cache(model, calib, tmp_path)


def test_amp_non_uniform_runs(calib):
    model = tiny_model("llama")
    report = prune_(model, AMPConfig(sparsity=0.3, uniform=False), calib, progress=False)
    assert 0.15 < report.removed_fraction < 0.45
    assert torch.isfinite(model(calib[:2]).logits).all()
