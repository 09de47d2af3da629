"""MoE-Pruner: Wanda inside the experts, with the router weight folded into the activation
(Xie et al., arXiv 2410.12013, Eq. 4).

For expert j's weight W (out, in) and the calibration tokens routed to j, with g_j(x_t) the
token's routing weight for j:

    score_ik = |W_ik| * || g_j(x_t) X_tk ||_2 over the tokens t routed to j

compared within each output row (Wanda's group), N:M optional. The engine feeds each expert's
observer the routed tokens scaled by their routing weights (`routed_weighting`, see
`expert_weights.py`): a token the router sends to j with weight 0.9 counts more than one with
0.1. Outside the experts (attention, shared experts, dense blocks) there is no routing weight and
the score is plain Wanda. The paper follows pruning with expert-wise distillation: the recovery
method `expert-kd`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from ..config import SparsityConfig
from ..masks import lowest
from ..registry import register
from ..stats import InputNorm


@dataclass(frozen=True)
class MoePrunerConfig(SparsityConfig):
    per: str = "row"
    routed_weighting: ClassVar[bool] = True     # expert observers see g_j(x) * x (expert_weights.py)


@register("moe-pruner", MoePrunerConfig, stats=InputNorm)
def moe_pruner(W: Tensor, stats: InputNorm, cfg: MoePrunerConfig) -> Tensor:
    score = W.abs() * stats.sq_norm.sqrt()                           # (out, in) * (in,): router-weighted norms
    return W.masked_fill(lowest(score, cfg.sparsity, cfg.nm, cfg.per), 0)
