"""EASY-EP: expert pruning from a few domain demonstrations (Dong et al., arXiv 2504.06792).

Two parts multiply, summed over the calibration tokens (the paper's ~25 long few-shot
demonstrations of the target domain: pass them as `--calib FILE` or `--calib code`, few windows):

    output-aware expert importance   g_j(x_t) ||E_j(x_t)||_2 for the tokens routed to expert j
    token contribution               c_t = max(0, 1 - cos(h_t, h'_t)), h_t the residual stream
                                     entering the MoE sublayer and h'_t the block's output: tokens
                                     the MoE layer changes more count more

    EASY-EP_j = sum_{t in T_j} g_j(x_t) ||E_j(x_t)||_2 c_t

Whole experts are removed per block. Unlike the paper's code, grouped routing keeps its constraint
(the same number per group, `experts.py`), so the result loads in a stock server.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..experts import ExpertsConfig, RoutedTokens
from ..registry import register


@dataclass(frozen=True)
class EasyEpConfig(ExpertsConfig):
    pass


@register("easy-ep", EasyEpConfig, scope="experts", calibrated=True)
def easy_ep(routed: RoutedTokens, cfg: EasyEpConfig, keep: int | None) -> Tensor:
    stats = routed.statistics()
    return stats.easy / max(stats.tokens, 1)          # a sum over tokens; / N only to compare across blocks
