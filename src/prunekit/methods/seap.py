"""SEAP: training-free sparse expert activation pruning (Liang, Wang, Lai et al., "SEAP: Training-free
Sparse Expert Activation Pruning Unlock the Brainpower of Large Language Models", arXiv 2503.07605).

The paper observes that hidden states and FFN/attention activations cluster by task, so a task's
own calibration text picks the neurons it needs ("task-specific expert activation paths"). Per task
it scores every unit from that task's activations and the consumer weights, then removes heads and
FFN channels with a layer-wise sparsity that grows with depth.

    score (the reference's WIFV)   s_j = Var_t(X_tj) * ||W_:,j||^2
                                   X the consumer input over the task's tokens (o_proj's input for
                                   heads, down_proj's for FFN channels), W the consumer weight; a
                                   head's score is the mean over its head_dim columns
    layer sparsity ("logistic")    rho_l = Lambda * sigmoid(k (x_l - x0)),  x_l = (l - m) / (L - m - n - 1)
                                   over the L - m - n unprotected blocks (the first m and last n
                                   blocks keep every unit), Lambda set so that the blocks' mean is
                                   the target sparsity (`logistic_sparsities`)

The task is our calibration domain: `--calib code` (or `--domain code`, which sets it) scores the
units on Python source, `--calib prose` on documentation. Units are removed physically by the shared
width driver (`structured.prune_width_`): the output is a smaller stock checkpoint.

Matches the reference code (IAAR-Shanghai/SEAP, `compute_scores.py` WIFV and `generate_masks.py`
UL-LD with its defaults k = 0.8, x0 = 0.3, m = n = 2). Where we interpret:
- the reference solves Lambda by bisection so that the mean over the *unprotected* blocks is the
  target, so the model as a whole loses less than the target; our `sparsity` is the fraction of all
  decoder-block parameters removed (the width driver's contract), so Lambda is solved in closed form
  for the mean over *all* blocks (protected ones count as 0);
- the reference removes the same fraction of heads and of channels in a block; the width driver
  removes a block's share as the whole number of heads nearest to it, the MLP taking the rest, kept
  channels rounded to `round_to`;
- variance: the unbiased sample variance over all calibration tokens (the reference keeps a running
  estimate);
- the paper's task router (pick a mask per input at inference) and its "generic" mask merged over
  tasks are not part of a pruning step: one run prunes for one domain.

The layer distribution: `SEAPConfig.block_sparsity(index, blocks)` gives each block its logistic share,
and the width driver's uniform budget (`structured._Budget.uniform`) reads it in place of `sparsity`;
`distribution: uniform` (the reference's "UL-UM") gives every block the same share, `uniform: false` (its
"AL-AM") the driver's global ranking.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

from ..registry import register
from ..stats import MeanVar
from ..structured import Coupled, WidthConfig

DISTRIBUTIONS = ("logistic", "uniform")


def logistic_sparsities(blocks: int, sparsity: float, k: float = 0.8, x0: float = 0.3, first: int = 2,
                        last: int = 2) -> list[float]:
    """SEAP's layer-wise sparsity (the reference's UL-LD): rho_l = Lambda / (1 + exp(-k (x_l - x0))) for the
    unprotected blocks l in [first, blocks - last), x_l = (l - first) / (active - 1) in [0, 1] (0 for a
    single active block), rho = 0 for the protected blocks; Lambda makes mean_l rho_l = `sparsity` over all
    `blocks`. Exact (rho is linear in Lambda). Raises if a block would lose everything (rho >= 1)."""
    active = list(range(first, blocks - last))
    if not active:
        raise ValueError(f"protect_first={first} and protect_last={last} leave none of the {blocks} blocks to "
                         "prune; lower them (the paper keeps 2 and 2 of 32 blocks)")
    span = len(active) - 1
    shape = [1.0 / (1.0 + math.exp(-k * ((i - first) / span - x0))) if span else 1.0 / (1.0 + math.exp(k * x0))
             for i in active]
    scale = sparsity * blocks / sum(shape)
    rho = [0.0] * blocks
    for i, value in zip(active, shape):
        rho[i] = scale * value
    if max(rho) >= 1:
        raise ValueError(f"sparsity {sparsity} spread over {len(active)} of {blocks} blocks with logistic_k={k} "
                         f"would remove {max(rho):.0%} of block {rho.index(max(rho))}; lower the sparsity, protect "
                         "fewer blocks (protect_first / protect_last) or use distribution=uniform")
    return rho


@dataclass(frozen=True)
class SEAPConfig(WidthConfig):
    distribution: str = "logistic"   # "logistic": SEAP's depth-growing block shares; "uniform": one share
    logistic_k: float = 0.8          # steepness of the logistic curve over depth (the reference's default)
    logistic_x0: float = 0.3         # its midpoint, in relative depth [0, 1]
    protect_first: int = 2           # the first blocks keep every unit (logistic)
    protect_last: int = 2            # the last blocks keep every unit (logistic)

    def __post_init__(self):
        super().__post_init__()
        if self.distribution not in DISTRIBUTIONS:
            raise ValueError(f"distribution must be one of {', '.join(DISTRIBUTIONS)}, got {self.distribution!r}")
        if self.distribution == "logistic" and not self.uniform:
            raise ValueError("distribution=logistic sets each block's share itself; uniform=false (the global "
                             "ranking) replaces it: use distribution=uniform with uniform=false")
        for name in ("logistic_k", "logistic_x0"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r} (the reference: k=0.8, x0=0.3)")
        for name in ("protect_first", "protect_last"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0 (blocks kept whole), got {value!r}")

    def block_sparsity(self, index: int, blocks: int) -> float:
        """The share of block `index` (of `blocks`) to remove."""
        if self.distribution == "uniform":
            return self.sparsity
        return logistic_sparsities(blocks, self.sparsity, self.logistic_k, self.logistic_x0, self.protect_first,
                                   self.protect_last)[index]


def wifv(W: Tensor, var: Tensor) -> Tensor:
    """SEAP's (and FLAP's) weighted input feature variance per consumer column: Var(X_j) * ||W_:,j||^2.
    W: (out, columns); var: (columns,). Returns (columns,)."""
    return var.to(W.device) * W.square().sum(dim=0)


@register("seap", SEAPConfig, scope="width", stats=MeanVar)
def seap(group: Coupled, stats: MeanVar, cfg: SEAPConfig) -> Tensor:
    _, W = group.weights()                                                     # (out, columns)
    return wifv(W, stats.var)                                                  # (columns,)

