"""Wanda: prune by |W_ij| * ||X_j||_2, weight magnitude times input-feature norm, compared within
each output row (Sun et al., arXiv 2306.11695, Eq. 1). No weight update.

Matches `prune_wanda` of locuslab/wanda: the score uses the column norm over all calibration
tokens; the default comparison group is the output row; N:M picks the n lowest of every m.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..config import SparsityConfig
from ..masks import lowest
from ..registry import register
from ..stats import InputNorm


@dataclass(frozen=True)
class WandaConfig(SparsityConfig):
    per: str = "row"


@register("wanda", WandaConfig, stats=InputNorm)
def wanda(W: Tensor, stats: InputNorm, cfg: WandaConfig) -> Tensor:
    score = W.abs() * stats.sq_norm.sqrt()                           # (out, in) * (in,)
    return W.masked_fill(lowest(score, cfg.sparsity, cfg.nm, cfg.per), 0)
