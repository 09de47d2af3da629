"""Magnitude pruning: zero the smallest |W|. Data-free baseline (Han et al. 2015; the baseline
in SparseGPT arXiv 2301.00774 and Wanda arXiv 2306.11695).

Default comparison group is the whole layer (`per="layer"`), as in the Wanda repository's
`prune_magnitude`; `per="row"` and N:M are available like for every method.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..config import SparsityConfig
from ..masks import lowest
from ..registry import register


@dataclass(frozen=True)
class MagnitudeConfig(SparsityConfig):
    per: str = "layer"


@register("magnitude", MagnitudeConfig, stats=None)
def magnitude(W: Tensor, stats: None, cfg: MagnitudeConfig) -> Tensor:
    score = W.abs()                                                  # (out, in)
    return W.masked_fill(lowest(score, cfg.sparsity, cfg.nm, cfg.per), 0)
