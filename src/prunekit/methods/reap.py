"""REAP: Router-weighted Expert Activation Pruning (Lasby et al., arXiv 2510.13999).

The score of expert j is the mean, over the calibration tokens routed to j, of its routing weight
times the L2 norm of its output:

    REAP_j = (1 / |T_j|) sum_{t in T_j} g_j(x_t) ||E_j(x_t)||_2

with g_j the family's own routing weight (softmax over all experts, renormalised over the top-k
where the family does that; DeepSeek-V3's sigmoid scores with its scaling). An expert that is
rarely chosen, or chosen with a small weight, or whose output is small, contributes little to the
layer's output and is removed first; an expert no token reached scores 0. The same number is
removed from every MoE block (`uniform`), as in the paper; `experts.py` does the removal.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..experts import ExpertsConfig, RoutedTokens
from ..registry import register


@dataclass(frozen=True)
class ReapConfig(ExpertsConfig):
    pass


@register("reap", ReapConfig, scope="experts", calibrated=True)
def reap(routed: RoutedTokens, cfg: ReapConfig, keep: int | None) -> Tensor:
    return routed.statistics().mean("reap")                                    # (E,)
