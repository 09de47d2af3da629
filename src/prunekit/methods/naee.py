"""NAEE: expert pruning by exhaustive search over the dropped subsets (Lu et al., arXiv 2402.14800).

For an MoE block with E experts that keeps `keep`, every subset S of E - keep experts is tried: the
router chooses again without S (their logits masked, `models.moe.route`), and the subset whose
re-routed output is closest to the full block's output on the calibration tokens is dropped:

    S* = argmin_S  sum_t || MoE(x_t) - MoE_{-S}(x_t) ||^2

The outputs of every expert on the (strided) tokens are computed once, (T, E, H), so each subset
costs a gather. There are C(E, E - keep) subsets (with grouped routing, the product over groups of
each group's choices): fine for 8 experts (C(8, 4) = 70), infeasible for 64+ (C(64, 32) ~ 1.8e18).
Beyond `max_subsets` the method refuses and names `expert-loo`, the one-expert-at-a-time form.
The score returned is 1 for the kept experts of S*'s complement and 0 for S*, so `keep` is needed:
NAEE has no per-expert score to compare across blocks (uniform mode only).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import distributed
from ..experts import ExpertsConfig, RoutedTokens
from ..models.moe import groups_of
from ..registry import register


@dataclass(frozen=True)
class NaeeConfig(ExpertsConfig):
    max_subsets: int = 5000          # refuse blocks with more subsets to try than this
    max_tokens: int = 2048           # calibration tokens per block (per process) the error is measured on

    def __post_init__(self):
        super().__post_init__()
        if not self.uniform:
            raise ValueError("naee searches the subsets of one block for a given count: it needs uniform counts "
                             "(drop --non-uniform); expert-loo gives comparable per-expert scores")
        for name in ("max_subsets", "max_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")


def dropped_subsets(num_experts: int, drop: int, groups: int = 1):
    """Every way to drop `drop` experts, the same number from each of `groups` equal groups."""
    per_group, drop_per_group = num_experts // groups, drop // groups
    choices = [[tuple(g * per_group + i for i in combo) for combo in itertools.combinations(range(per_group),
                                                                                           drop_per_group)]
               for g in range(groups)]
    for parts in itertools.product(*choices):
        yield tuple(i for part in parts for i in part)


def subset_count(num_experts: int, drop: int, groups: int = 1) -> int:
    return math.comb(num_experts // groups, drop // groups) ** groups


@register("naee", NaeeConfig, scope="experts", calibrated=True)
@torch.no_grad()
def naee(routed: RoutedTokens, cfg: NaeeConfig, keep: int | None) -> Tensor:
    if keep is None:
        raise ValueError("naee needs the number of experts to keep per block (uniform mode)")
    experts, drop = routed.num_experts, routed.num_experts - keep
    groups = groups_of(routed.router)
    count = subset_count(experts, drop, groups)
    if count > cfg.max_subsets:
        raise ValueError(f"naee would try C({experts}, {drop}) = {count:,} subsets of experts to drop in block "
                         f"{routed.block_index}, more than max_subsets={cfg.max_subsets:,}; use expert-loo (leave one "
                         "expert out, E re-routings) or reap for this many experts, or raise max_subsets")
    rows = routed.sample(cfg.max_tokens)
    outputs = torch.stack([routed.expert_output(j, rows) for j in range(experts)], dim=1).float()   # (T, E, H)
    full = _mix(outputs, routed.chosen[rows], routed.weights[rows])                         # (T, H)
    subsets = list(dropped_subsets(experts, drop, groups))
    errors = torch.zeros(len(subsets), dtype=torch.float64)
    for n, subset in enumerate(subsets):
        excluded = torch.zeros(experts, dtype=torch.bool)
        excluded[list(subset)] = True
        weights, chosen = routed.reroute(rows, excluded)
        errors[n] = float((full - _mix(outputs, chosen, weights)).square().sum(dtype=torch.float64))
    if distributed.is_distributed():
        distributed.all_reduce_sum_(errors)
    best = subsets[int(torch.argmin(errors))]          # first of equal errors: deterministic
    scores = torch.ones(experts, dtype=torch.float64)
    scores[list(best)] = 0.0
    return scores


def _mix(outputs: Tensor, chosen: Tensor, weights: Tensor) -> Tensor:
    """sum_k weights[:, k] * outputs[t, chosen[t, k]]: (T, E, H), (T, k), (T, k) -> (T, H)."""
    picked = outputs.gather(1, chosen.unsqueeze(-1).expand(-1, -1, outputs.shape[-1]))     # (T, k, H)
    return (weights.unsqueeze(-1).float() * picked).sum(dim=1)
