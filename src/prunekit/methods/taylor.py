"""Block-local first-order Taylor importance (LLM-Pruner's criterion, arXiv 2305.11627, computed
one block at a time instead of with a full-model backward pass).

Removing a unit (a head or channel: its producer rows and consumer columns, `w_u`) changes the
block's output by about -J w_u to first order (J: the output's Jacobian with respect to the
weights). The importance is that change's expected squared size, E ||J w_u||^2, over the
calibration tokens. A block's own reconstruction loss has zero gradient at the dense weights, so
the gradient is taken of a random projection of the output, L = sum(Y * R) with R ~ N(0, 1) per
chunk: then (w_u . dL/dw_u)^2 = (R . J w_u)^2, whose expectation over R is ||J w_u||^2
(Hutchinson's estimator). Summed over the calibration chunks, one backward pass per chunk through
this block only. R is seeded by the block and the chunk's global number, so distributed
calibration (each process its own chunks, the sums added) draws the same R as one process.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..registry import register
from ..structured import Coupled, WidthConfig


def _weight_times_grad(module: nn.Module) -> tuple[Tensor, Tensor | None]:
    """(w * dL/dw as (out, in), b * dL/db or None), whatever the storage layout."""
    W = module.weight
    product = (W.detach() * W.grad).float()
    if type(module).__name__ == "Conv1D":
        product = product.T
    bias = module.bias
    bias_product = (bias.detach() * bias.grad).float() if bias is not None and bias.grad is not None else None
    return product, bias_product


class BlockTaylor:
    """Accumulates sum over chunks of (sum over the unit's weights of w * dL/dw)^2, per unit."""
    needs_grad = True
    seed = 0
    SUMS = ("score",)         # a plain sum over chunks: processes' observers add (distributed.reduce_stats_)

    def __init__(self, group: Coupled):
        self.group = group
        self.score = torch.zeros(group.units, dtype=torch.float64)
        self.tokens = 0       # chunks seen

    @classmethod
    def loss(cls, output: Tensor, block: int, chunk: int) -> Tensor:
        generator = torch.Generator().manual_seed(cls.seed + 1_000_003 * block + chunk)
        probe = torch.randn(output.shape, generator=generator).to(output)
        return (output * probe).sum()

    def update(self) -> None:
        group = self.group
        first_order = torch.zeros(group.units, dtype=torch.float64)
        for index, (module, _) in enumerate(group.producers):
            product, bias_product = _weight_times_grad(module)                  # (rows, in), (rows,)
            rows = product.sum(dim=1) + (bias_product if bias_product is not None else 0)
            first_order += group.row_sum(index, rows.double().cpu())
        product, _ = _weight_times_grad(group.consumer)                         # (out, columns)
        first_order += group.unit_sum(product.sum(dim=0).double().cpu())
        self.score += first_order.square()
        self.tokens += 1


@dataclass(frozen=True)
class TaylorConfig(WidthConfig):
    pass


@register("taylor", TaylorConfig, scope="width", stats=BlockTaylor)
def taylor(group: Coupled, stats: BlockTaylor, cfg: TaylorConfig) -> Tensor:
    return stats.score
