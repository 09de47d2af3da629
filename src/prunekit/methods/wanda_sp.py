"""Wanda-SP: the structured variant of Wanda (the baseline of FLAP, arXiv 2312.11983).

The score of consumer input column j is mean_i |W_ij| * ||X_j||, Wanda's |W| * ||X|| averaged
over the consumer's output rows; a head's score is that of its head_dim columns (averaged per
unit, which ranks like the reference's sum). X is the consumer's input (the attention output / MLP down projection) over
all calibration tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..registry import register
from ..stats import InputNorm
from ..structured import Coupled, WidthConfig


@dataclass(frozen=True)
class WandaSPConfig(WidthConfig):
    pass


@register("wanda-sp", WandaSPConfig, scope="width", stats=InputNorm)
def wanda_sp(group: Coupled, stats: InputNorm, cfg: WandaSPConfig) -> Tensor:
    _, W = group.weights()                                                     # (out, columns)
    return W.abs().mean(dim=0) * stats.sq_norm.to(W.device).sqrt()            # (columns,)
