"""SparseGPT: mask selection and optimal-brain-surgeon weight update, one block of columns at a
time (Frantar & Alistarh, arXiv 2301.00774, Algorithm 1).

For each block of `blocksize` input columns: choose the mask by w^2 / [H^-1]_jj^2 (adaptive
mask selection), then walk the columns left to right, zero the pruned weights and spread each
column's error over the not-yet-processed columns with the upper Cholesky factor of H^-1.

Matches `SparseGPT.fasterprune` of IST-DASLab/sparsegpt (and locuslab/wanda's copy), except that
the mask holds exactly the requested count (the reference's `<= threshold` keeps one extra
weight pruned per block, more on ties). `per="layer"` is the reference's selection (the lowest
scores of each column block across all rows); `per="row"` selects within each row of the block.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..config import SparsityConfig
from ..masks import lowest
from ..registry import register
from ..stats import Hessian


@dataclass(frozen=True)
class SparseGPTConfig(SparsityConfig):
    per: str = "layer"
    blocksize: int = 128      # columns per lazy-update block (the paper's B)
    damp: float = 0.01        # dampening, as a fraction of the mean diagonal of H

    def __post_init__(self):
        super().__post_init__()
        if self.blocksize < 1:
            raise ValueError(f"blocksize must be >= 1, got {self.blocksize}")
        if self.nm is not None and self.blocksize % self.nm[1]:
            raise ValueError(f"blocksize ({self.blocksize}) must be a multiple of M ({self.nm[1]})")
        if not 0 <= self.damp < 10:
            raise ValueError(f"damp must be in [0, 10), got {self.damp} (0.01 is the paper's value)")


@register("sparsegpt", SparseGPTConfig, stats=Hessian)
def sparsegpt(W: Tensor, stats: Hessian, cfg: SparseGPTConfig) -> Tensor:
    W = W.clone().float()                                            # (out, in)
    W[:, stats.dead] = 0
    U, _, _ = stats.inverse_cholesky(cfg.damp)                        # (in, in), upper: U^T U = H^-1
    columns = W.shape[1]
    for i1 in range(0, columns, cfg.blocksize):
        i2 = min(i1 + cfg.blocksize, columns)
        W1 = W[:, i1:i2]                                              # (out, B) view, updated in place
        U1 = U[i1:i2, i1:i2]                                          # (B, B)
        d = U1.diagonal()                                             # (B,)
        if cfg.nm is None:
            mask1 = lowest(W1.square() / d.square(), cfg.sparsity, None, cfg.per)
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        Err1 = torch.zeros_like(W1)                                   # (out, B)
        for i in range(i2 - i1):
            if cfg.nm is not None and i % cfg.nm[1] == 0:
                n, m = cfg.nm
                score = W1[:, i:i + m].square() / d[i:i + m].square()  # (out, m)
                mask1[:, i:i + m] = lowest(score, 0.0, (n, m))
            w = W1[:, i]
            err = torch.where(mask1[:, i], w, torch.zeros_like(w)) / d[i]   # (out,)
            W1[:, i:].sub_(err[:, None] * U1[i, i:][None, :])
            W1[:, i].masked_fill_(mask1[:, i], 0)
            Err1[:, i] = err
        W[:, i2:].sub_(Err1 @ U[i1:i2, i2:])
    return W
