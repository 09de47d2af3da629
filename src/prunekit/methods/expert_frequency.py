"""Expert frequency: keep the experts the router chooses most often on the calibration tokens.

The baseline of the expert-pruning papers (e.g. task-specific expert pruning, arXiv 2409.01483,
counts how often each expert is selected on the task's data): score_j = |T_j| / N, the share of
the N calibration tokens routed to expert j. It ignores how much an expert contributes when it
is chosen (REAP adds that).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..experts import ExpertsConfig, RoutedTokens
from ..registry import register


@dataclass(frozen=True)
class ExpertFrequencyConfig(ExpertsConfig):
    pass


@register("expert-frequency", ExpertFrequencyConfig, scope="experts", calibrated=True)
def expert_frequency(routed: RoutedTokens, cfg: ExpertFrequencyConfig, keep: int | None) -> Tensor:
    stats = routed.statistics()
    return stats.counts / max(stats.tokens, 1)                                  # (E,)
