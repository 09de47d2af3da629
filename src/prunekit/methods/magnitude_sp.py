"""Magnitude width pruning: a head or channel matters as much as the norm of its weights.

The unit's weights are its rows in every producer (q/k/v or gate/up) and its columns in the
consumer (o or down), taken together as one group (the structured "magnitude" baseline of
FLAP, arXiv 2312.11983, and LLM-Pruner's L1/L2 group criterion, arXiv 2305.11627; those score
only the consumer's columns). Data-free.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..registry import register
from ..structured import Coupled, WidthConfig


@dataclass(frozen=True)
class MagnitudeSPConfig(WidthConfig):
    norm: str = "l2"          # "l2": sqrt of the sum of squares of the unit's weights; "l1": sum of |w|

    def __post_init__(self):
        super().__post_init__()
        if self.norm not in ("l1", "l2"):
            raise ValueError(f"norm must be 'l1' or 'l2', got {self.norm!r}")


@register("magnitude-sp", MagnitudeSPConfig, scope="width")
def magnitude_sp(group: Coupled, stats: None, cfg: MagnitudeSPConfig) -> Tensor:
    producers, W = group.weights()                          # [(rows, in)], (out, columns)
    size = (lambda x: x.abs()) if cfg.norm == "l1" else (lambda x: x.square())
    score = group.unit_sum(size(W).sum(dim=0))              # (units,) consumer columns
    for index, P in enumerate(producers):
        score += group.row_sum(index, size(P).sum(dim=1))   # producer rows
    return score if cfg.norm == "l1" else score.sqrt()
