"""FLAP: fluctuation-based adaptive structured pruning with bias compensation (An et al.,
arXiv 2312.11983, AAAI 2024).

Score of consumer input column j: the variance of X_j over the calibration tokens times the
squared norm of the column, Var(X_j) * ||W_:,j||^2 (the paper's WIFV metric): a channel whose
input hardly fluctuates can be replaced by its mean. As in the reference code, attention columns
use the square of that value. Non-uniform mode (FLAP's default, `uniform: false`) standardizes
the scores per block and group and ranks all units globally (the adaptive structure search,
"AL-AM"); `bias: true` folds the mean contribution of the removed inputs,
W[:, removed] @ mean(X[removed]), into the consumer's output bias.

Differences from the reference: the variance is the exact sample variance over all tokens (the
reference's running update skips the first sample), and a unit's cost in the global ranking is
computed from the layer shapes (the reference hard-codes 512/3 for Llama-7B's heads vs channels).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..registry import register
from ..stats import MeanVar
from ..structured import Coupled, WidthConfig


@dataclass(frozen=True)
class FlapConfig(WidthConfig):
    uniform: bool = False     # the adaptive global structure search is FLAP's point
    bias: bool = True         # bias compensation with the mean of the removed inputs


@register("flap", FlapConfig, scope="width", stats=MeanVar)
def flap(group: Coupled, stats: MeanVar, cfg: FlapConfig) -> Tensor:
    _, W = group.weights()                                                     # (out, columns)
    score = stats.var.to(W.device) * W.square().sum(dim=0)                     # (columns,)
    return score.square() if group.kind == "heads" else score
