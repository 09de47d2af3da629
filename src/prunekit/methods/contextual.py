"""Contextual pruning: remove the neurons that stay quiet on the target domain's text (Valicenti,
Vidal, Patnaik, "Mini-GPTs: Efficient Large Language Models through Contextual Pruning",
arXiv 2312.12682).

The paper runs domain data (US law, medical QA, ...) through the model, measures each neuron's
activation magnitude as the normalised L1 norm over the tokens, mean_t |a_tj| (its Sec. 3), and
removes the neurons whose value falls below a threshold: what a domain never activates it does not
need. Our version:

    channel j   s_j = mean_t |X_tj|,  X the FFN down projection's input, i.e. the channel's output
                act(x g_j) (x u_j) for gated MLPs (the "neuron" of the gate/up -> down pair)
    head h      the same per o_proj input column, averaged over the head's head_dim columns by
                the width driver (only with `attention: true`; the paper prunes linear neurons, heads
                are our option)

The domain is the calibration text: `--calib code` (or `--domain code`, which sets it) measures the
activations on Python source, `--calib prose` on the stdlib documentation. The channels are removed
physically by the shared width driver (`structured.prune_width_`), so the result is a smaller stock
checkpoint.

Where we interpret:
- the paper uses an absolute threshold per layer; the width driver removes a budgeted share
  (`sparsity`, a fraction of the decoder blocks' parameters) of the least active units, which is the
  "least active share" form of the same rule; a fixed threshold would give every block its own
  count, which the uniform driver does not express (`uniform: false` ranks all blocks' units in one
  list instead, by per-block standardised activity);
- the paper also prunes embedding rows of tokens the domain never uses and each linear layer's
  output neurons separately; we remove only coupled units (FFN channels, heads), which keeps the
  model a stock architecture;
- the statistic is observed in the driver's calibration pass on the consumer's input, after the
  earlier blocks were pruned (uniform mode), not on the dense model.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..registry import register
from ..structured import Coupled, WidthConfig


class MeanAbs:
    """Mean absolute value of each input feature over all calibration tokens: sum_t |x_tj| / tokens.
    The sum is kept in float64 (and named in SUMS), so observers of disjoint windows add."""
    SUMS = ("abs_sum",)

    def __init__(self, in_features: int, device: torch.device):
        self.abs_sum = torch.zeros(in_features, dtype=torch.float64, device=device)   # (in,)
        self.tokens = 0

    def update(self, X: Tensor) -> None:
        X = X.reshape(-1, X.shape[-1]).float()                                          # (tokens, in)
        self.abs_sum += X.abs().sum(dim=0)
        self.tokens += X.shape[0]

    @property
    def mean_abs(self) -> Tensor:
        """mean_t |x_tj|, (in,) float32."""
        return (self.abs_sum / max(self.tokens, 1)).float()


@dataclass(frozen=True)
class ContextualConfig(WidthConfig):
    attention: bool = False      # the paper removes FFN neurons; `attention: true` also ranks heads by activity


def activity(stats: MeanAbs) -> Tensor:
    """Contextual pruning's score of every consumer input column: mean_t |X_tj|, (columns,)."""
    return stats.mean_abs


@register("contextual", ContextualConfig, scope="width", stats=MeanAbs)
def contextual(group: Coupled, stats: MeanAbs, cfg: ContextualConfig) -> Tensor:
    return activity(stats)                                                      # (columns,)
