"""Random expert removal: the floor every expert score must beat.

score_j is a seeded uniform draw (the same for a given seed, block and expert count on every
machine and process), so the kept experts are a random subset of the required size. It reads no
statistics; it runs in the same calibrated pass as the other expert methods so that its report
shows the same routed-token counts.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..experts import ExpertsConfig, RoutedTokens
from ..registry import register


@dataclass(frozen=True)
class ExpertRandomConfig(ExpertsConfig):
    seed: int = 0


@register("expert-random", ExpertRandomConfig, scope="experts", calibrated=True)
def expert_random(routed: RoutedTokens, cfg: ExpertRandomConfig, keep: int | None) -> Tensor:
    generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + routed.block_index)
    return torch.rand(routed.num_experts, generator=generator, dtype=torch.float64)
