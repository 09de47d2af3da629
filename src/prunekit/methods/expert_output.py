"""Expert output norm: keep the experts whose outputs are largest on the tokens they receive.

score_j = (1 / |T_j|) sum_{t in T_j} ||E_j(x_t)||_2, the mean L2 norm of expert j's output
(routing weight 1) over the calibration tokens routed to it; 0 for an expert no token reached.
The activation-magnitude criterion of the expert-pruning literature (an ablation in REAP,
arXiv 2510.13999, which adds the routing weight).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..experts import ExpertsConfig, RoutedTokens
from ..registry import register


@dataclass(frozen=True)
class ExpertOutputConfig(ExpertsConfig):
    pass


@register("expert-output", ExpertOutputConfig, scope="experts", calibrated=True)
def expert_output_norm(routed: RoutedTokens, cfg: ExpertOutputConfig, keep: int | None) -> Tensor:
    return routed.statistics().mean("norm")                                    # (E,)
