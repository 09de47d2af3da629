"""SparseGPT: mask selection and optimal-brain-surgeon weight update, one block of columns at a
time (Frantar & Alistarh, arXiv 2301.00774, Algorithm 1).

For each block of `blocksize` input columns: choose the mask by w^2 / [H^-1]_jj^2 (adaptive
mask selection), then walk the columns left to right, zero the pruned weights and spread each
column's error over the not-yet-processed columns with the upper Cholesky factor of H^-1.

Matches `SparseGPT.fasterprune` of IST-DASLab/sparsegpt (and locuslab/wanda's copy), except that
the mask holds exactly the requested count (the reference's `<= threshold` keeps one extra
weight pruned per block, more on ties). `per="layer"` is the reference's selection (the lowest
scores of each column block across all rows); `per="row"` selects within each row of the block.

The sweep itself is `updates.obs_sweep`, shared with `update: obs` for other methods' masks.
Speed: inside each block of `blocksize` columns the rank-1 updates touch only a sub-block of
`updates.LAZY_STEP` columns; the rest of the block receives them as one matrix product afterwards. That
is the same arithmetic regrouped (GPTQ's lazy batch trick applied twice), about 3x faster on CPU.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..config import SparsityConfig
from ..registry import register
from ..stats import Hessian
from ..updates import OBS_BLOCKSIZE, OBS_DAMP, obs_sweep


@dataclass(frozen=True)
class SparseGPTConfig(SparsityConfig):
    per: str = "layer"
    blocksize: int = OBS_BLOCKSIZE   # columns per lazy-update block (the paper's B)
    damp: float = OBS_DAMP    # dampening, as a fraction of the mean diagonal of H
    update: str = "obs"       # the OBS update is part of SparseGPT; "admm" re-fits its mask's weights

    def __post_init__(self):
        super().__post_init__()
        if self.update == "none":
            raise ValueError("sparsegpt chooses its mask together with its OBS update; use update 'obs' "
                             "(the default) or 'admm', or another method for a mask without an update")
        if self.blocksize < 1:
            raise ValueError(f"blocksize must be >= 1, got {self.blocksize}")
        if self.nm is not None and self.blocksize % self.nm[1]:
            raise ValueError(f"blocksize ({self.blocksize}) must be a multiple of M ({self.nm[1]})")
        if not 0 <= self.damp < 10:
            raise ValueError(f"damp must be in [0, 10), got {self.damp} (0.01 is the paper's value)")

    def layer_zeros(self, out_features: int, in_features: int, sparsity: float) -> int:
        """The mask is chosen per block of columns, so the count is a sum of per-block floors."""
        return sum(int(out_features * min(self.blocksize, in_features - i1) * sparsity)
                   for i1 in range(0, in_features, self.blocksize))


@register("sparsegpt", SparseGPTConfig, stats=Hessian, updates_weights=True)
def sparsegpt(W: Tensor, stats: Hessian, cfg: SparseGPTConfig) -> Tensor:
    return obs_sweep(W, stats, sparsity=cfg.sparsity, nm=cfg.nm, per=cfg.per, blocksize=cfg.blocksize, damp=cfg.damp)


