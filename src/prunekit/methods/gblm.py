"""GBLM-Pruner: prune by |W_ij| * ||X_j||_2 + alpha * |W_ij| * G_ij, Wanda's score plus the weight
times the l2 norm over calibration windows of its loss gradient, compared within each output row
(Das et al., "Beyond Size: How Gradients Shape Pruning Decisions in Large Language Models",
arXiv 2311.04902). No weight update.

Matches `prune_gblm` of VILA-Lab/GBLM-Pruner (lib/prune.py, the two `W_metric` lines) with the
gradients of its gradient_computation.py (l2 norm over 128 windows of `grad * scale`, scale 100):
- alpha = 100 is the reference's `--scale`: (100 g)^2 summed then square-rooted is 100 * G;
- ||X_j||_2 is the reference's sqrt(scaler_row): sum_t x_tj^2 averaged over calibration windows
  (`WithGradient.mean_sq_norm`), which sets the balance between the two terms;
- the reference backpropagates as many windows as it observes (128); with fewer
  (`gradient_samples`), G is scaled up to the same count (`WithGradient.grad_l2`);
- gradient="block" replaces G by the block-local estimate (`gradients.block_gradients`), which is
  on another scale: alpha then needs retuning;
- the mask holds exactly the requested count, as the reference's per-row sort does.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

from ..gradients import GradientScoreConfig, WithGradient
from ..masks import lowest
from ..registry import register
from ..stats import InputNorm


@dataclass(frozen=True)
class GBLMConfig(GradientScoreConfig):
    per: str = "row"
    alpha: float = 100.0      # weight of the gradient term (the reference's gradient --scale)

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) \
                or not math.isfinite(self.alpha) or self.alpha < 0:
            raise ValueError(f"alpha must be a finite number >= 0, got {self.alpha!r} "
                             "(100 is the paper's; 0 gives Wanda's score)")


def gblm_score(W: Tensor, stats: WithGradient, cfg: GBLMConfig) -> Tensor:
    if not isinstance(stats, WithGradient):
        raise TypeError("gblm needs gradients: the engine must pass WithGradient(stats, grad, windows=...) "
                        f"from prunekit.gradients, got {type(stats).__name__}")
    A = W.abs()                                                                  # (out, in)
    G = stats.grad_l2.to(A.device)                                               # (out, in)
    return A * stats.mean_sq_norm.sqrt() + cfg.alpha * A * G                     # (out, in)


@register("gblm", GBLMConfig, stats=InputNorm, score=gblm_score)
def gblm(W: Tensor, stats: WithGradient, cfg: GBLMConfig) -> Tensor:
    return W.masked_fill(lowest(gblm_score(W, stats, cfg), cfg.sparsity, cfg.nm, cfg.per), 0)
