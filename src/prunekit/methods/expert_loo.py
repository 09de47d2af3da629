"""Leave-one-expert-out: the output error of an MoE block without expert j, re-routed.

For each expert j, the block's router chooses again with j unavailable (its logit masked, which is
what the router of a model without j computes; `models.moe.route`), and the MoE output of the
tokens whose routing changed is recomputed:

    LOO_j = (1 / N) sum_t || MoE(x_t) - MoE_{-j}(x_t) ||^2

over N calibration tokens, 0 for tokens whose routing does not change. The sum over the displaced
tokens, divided by all N, weights the error by how many tokens lose expert j. This is the
scalable form of NAEE's reconstruction criterion (arXiv 2402.14800) that NVIDIA ModelOpt uses:
E re-routings instead of C(E, r) subsets. `max_tokens` (evenly strided) bounds the cost: each
expert costs one expert-mixture evaluation of the tokens it displaces.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .. import distributed
from ..experts import ExpertsConfig, RoutedTokens
from ..models.moe import mixture
from ..registry import register


@dataclass(frozen=True)
class ExpertLooConfig(ExpertsConfig):
    max_tokens: int = 8192          # calibration tokens per block the error is measured on (per process)

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")


@torch.no_grad()
def loo_errors(routed: RoutedTokens, rows: Tensor) -> Tensor:
    """(E,) float64: sum over the tokens `rows` of ||MoE output - MoE output without expert j||^2."""
    errors = torch.zeros(routed.num_experts, dtype=torch.float64)
    x, chosen, weights = routed.x[rows], routed.chosen[rows], routed.weights[rows]
    full = mixture(routed.experts, x, chosen, weights).float()                  # (T, H)
    for expert in range(routed.num_experts):
        excluded = torch.zeros(routed.num_experts, dtype=torch.bool)
        excluded[expert] = True
        new_weights, new_chosen = routed.reroute(rows, excluded)
        order_old, order_new = chosen.sort(dim=-1), new_chosen.sort(dim=-1)
        changed = ((order_old.values != order_new.values).any(dim=-1)
                   | (weights.gather(1, order_old.indices) - new_weights.gather(1, order_new.indices)).abs()
                   .gt(1e-7).any(dim=-1))
        moved = torch.where(changed)[0]
        if moved.numel():
            without = mixture(routed.experts, x[moved], new_chosen[moved], new_weights[moved]).float()
            errors[expert] = float((full[moved] - without).square().sum(dtype=torch.float64))
    return errors


@register("expert-loo", ExpertLooConfig, scope="experts", calibrated=True)
def expert_loo(routed: RoutedTokens, cfg: ExpertLooConfig, keep: int | None) -> Tensor:
    rows = routed.sample(cfg.max_tokens)
    errors = loo_errors(routed, rows)
    count = torch.tensor([float(rows.numel())], dtype=torch.float64)
    if distributed.is_distributed():
        distributed.all_reduce_sum_(errors)
        distributed.all_reduce_sum_(count)
    return errors / count                                                        # (E,)
