"""RIA, Relative Importance and Activations: prune by
    (|W_ij| / sum_k |W_kj| + |W_ij| / sum_k |W_ik|) * ||X_j||_2 ^ a
the weight's share of its input column plus its share of its output row, times the input-feature
norm to the power a (Zhang et al., "Plug-and-Play: An Efficient Post-training Pruning Method for
Large Language Models", ICLR 2024; no arXiv preprint).

Matches `prune_ria` of biomedical-cybernetics/Relative-importance-and-activation-pruning
(lib/prune.py, the `W_metric` line of the "ria" branch; a = 0.5 is main.py's `--a` default):
- the comparison group is the whole layer (`per="layer"`): the reference thresholds the layer
  unless `--per_outneuron` ("Wanda's tactic") is given, which is our `per="row"`;
- its activation statistic is sum_t x_tj^2 divided by the number of calibration windows; a
  constant factor (1/windows)^(a/2) scales every score of the layer alike, so we drop it;
- the mask holds exactly the requested count (the reference's `<= threshold` prunes ties too).

`permute=True` (N:M only) asks for RIA's channel permutation (`prunekit.permute`). It cannot be
done inside this function: pruning in a permuted order is only valid if the producer of this
layer's inputs is permuted too. The engine computes `ria_score`, calls `nm_permutation`, reorders
the layer's input channels and their producer, then calls `ria` on the reordered weight, which
prunes in the order it is given.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..config import SparsityConfig
from ..masks import lowest
from ..registry import register
from ..stats import InputNorm


@dataclass(frozen=True)
class RIAConfig(SparsityConfig):
    per: str = "layer"        # the reference's default comparison group ("row" = its --per_outneuron)
    a: float = 0.5            # exponent of the input-feature norm (0: relative importance alone)
    permute: bool = False     # N:M only: reorder input channels first so N:M keeps more score

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.a, bool) or not isinstance(self.a, (int, float)) or not math.isfinite(self.a) or self.a < 0:
            raise ValueError(f"a must be a finite number >= 0, got {self.a!r} (the paper uses 0.5)")
        if not isinstance(self.permute, bool):
            raise ValueError(f"permute must be true or false, got {self.permute!r}")
        if self.permute and self.nm is None:
            raise ValueError("permute=True reorders input channels for N:M sparsity and needs nm, "
                             "e.g. nm=(2, 4); for unstructured sparsity set permute=False")


def ria_score(W: Tensor, stats: InputNorm, cfg: RIAConfig) -> Tensor:
    A = W.abs()                                                                   # (out, in)
    tiny = torch.finfo(A.dtype).tiny        # an all-zero row or column scores 0, not 0/0
    relative = A / A.sum(dim=0, keepdim=True).clamp_min(tiny) + A / A.sum(dim=1, keepdim=True).clamp_min(tiny)
    return relative * stats.sq_norm.sqrt().pow(cfg.a)                             # (out, in) * (in,)


@register("ria", RIAConfig, stats=InputNorm, score=ria_score)
def ria(W: Tensor, stats: InputNorm, cfg: RIAConfig) -> Tensor:
    return W.masked_fill(lowest(ria_score(W, stats, cfg), cfg.sparsity, cfg.nm, cfg.per), 0)
