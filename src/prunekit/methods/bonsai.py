"""Bonsai: unit importances regressed from the losses of random sub-models, with forward passes
only (Dery, Kolawole et al., "Everybody Prune Now: Structured Pruning of LLMs with only Forward
Passes", arXiv 2402.05406).

Every prunable unit of every block (an attention head, or a group of `channel_group` FFN channels)
is a regressor. Each of `samples` sub-models drops every unit independently with probability
`drop`; its calibration loss (mean next-token NLL on the first `windows` windows) is measured with
the dropped units' consumer input columns zeroed by hooks (no weight is copied or changed), which
computes exactly what the model with those units removed computes. A ridge regression of the
losses on the drop indicators,

    loss_k ~ c + sum_u beta_u d_ku,   d_ku = 1 if sub-model k drops unit u,

gives beta_u, the loss increase expected from removing unit u: the unit's importance, higher kept.
These scores go to the width driver (`structured.prune_width_`) through the registry's `prescore`
hook, which then removes units block by block as for any other width method.

Cost: 1 + `samples` forward passes of the model over `windows` calibration windows (one dense pass
to cache the block inputs and the masks' reference, then one per sub-model). Memory is that of
inference (no gradients), plus the calibration hidden states at every block boundary of those
windows (`depth.BlockCache`) and the (samples x units) drop matrix. Deterministic for a `seed`: the
drop matrix comes from a seeded generator (the same in every process under distributed
calibration, whose losses are averaged over all processes' windows).

Units: heads individually (query heads, or whole KV groups in "kv" mode, as the driver removes
them); FFN channels in contiguous groups of `channel_group`, so that a regression from a few hundred
sub-models stays determined (a 30-block model with 9 heads and 1536 channels per block has 990 units
at 64 channels a group). The channels of one group share its beta; inside a group they are ordered
by their mean |activation| in the dense pass (a negligible tie-break), so that the driver's rounding
of kept channels to `round_to` cuts a group at its weakest channels. Use `samples` >= the number of
units (logged) for a well-determined fit; fewer rely on the ridge.

Matches: the paper's perturbative regression with random sub-models and forward passes only.
Differs: one-shot (the paper prunes iteratively, re-estimating after each step), drop indicators
sampled uniformly (the paper may bias sampling with an informative prior), losses measured on
calibration windows, no post-pruning adaptation (see `recovery/`), and with `uniform: false` the
driver standardizes each block's scores before its global ranking.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..depth import BlockCache, decoder_blocks, first_windows
from ..registry import register
from ..structured import Coupled, WidthConfig, coupled_groups

log = logging.getLogger("prunekit")


@dataclass(frozen=True)
class BonsaiConfig(WidthConfig):
    samples: int = 256            # random sub-models; one forward pass over `windows` windows each
    drop: float | None = None     # probability that a sub-model drops each unit; None: sparsity (in [0.05, 0.5])
    channel_group: int = 64       # FFN channels per regressor (heads are regressed one by one)
    windows: int | None = 8       # calibration windows for each sub-model's loss; None: all
    ridge: float = 0.1            # ridge strength, relative to the drop indicators' mean variance
    seed: int = 0                 # seeds the sub-models' drop matrix

    def __post_init__(self):
        super().__post_init__()
        for name in ("samples", "channel_group"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.windows is not None and (isinstance(self.windows, bool) or not isinstance(self.windows, int)
                                         or self.windows < 1):
            raise ValueError(f"windows must be a positive number of calibration windows or None (all), "
                             f"got {self.windows!r}")
        if self.drop is not None and (isinstance(self.drop, bool) or not isinstance(self.drop, (int, float))
                                      or not 0 < self.drop < 1):
            raise ValueError(f"drop must be a probability in (0, 1) or None (the sparsity), got {self.drop!r}")
        if isinstance(self.ridge, bool) or not isinstance(self.ridge, (int, float)) or self.ridge < 0:
            raise ValueError(f"ridge must be a number >= 0, got {self.ridge!r}")

    def drop_probability(self) -> float:
        return self.drop if self.drop is not None else min(max(self.sparsity, 0.05), 0.5)


# ----------------------------------------------------------------------------- the math

def sample_drops(samples: int, units: int, drop: float, seed: int) -> Tensor:
    """(samples, units) bool: True where a sub-model drops the unit, independently with probability `drop`."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(samples, units, generator=generator, dtype=torch.float64) < drop


def ridge_importance(D: Tensor, y: Tensor, ridge: float = 0.1) -> Tensor:
    """beta minimising ||y - c - D beta||^2 + lambda ||beta||^2 over beta and the intercept c.

    D: (samples, units) drop indicators; y: (samples,) losses. lambda = ridge * the mean squared
    centred indicator (per sample), so `ridge` does not depend on the number of samples or the drop
    rate. Solved in float64 in the smaller of the primal (units x units) and dual (samples x
    samples) forms; ridge=0 gives the minimum-norm least-squares solution. Returns (units,).
    """
    D = D.double()
    y = y.double()
    Dc = D - D.mean(dim=0)                                                     # (samples, units)
    yc = y - y.mean()                                                          # (samples,)
    n, p = Dc.shape
    if ridge == 0:
        return torch.linalg.pinv(Dc) @ yc
    lam = ridge * Dc.square().sum() / p                                        # mean column energy
    if n >= p:
        return torch.linalg.solve(Dc.T @ Dc + lam * torch.eye(p, dtype=Dc.dtype), Dc.T @ yc)
    return Dc.T @ torch.linalg.solve(Dc @ Dc.T + lam * torch.eye(n, dtype=Dc.dtype), yc)


# ----------------------------------------------------------------------------- the units

@dataclass
class _Regressors:
    """The regressors of one coupled group: `first` is the index of its first one in the drop
    matrix; `of_column` maps each consumer column to its regressor (0-based within the group)."""
    block: int
    group: Coupled
    first: int
    count: int
    of_unit: Tensor              # (units,)
    of_column: Tensor            # (columns,)


def regressors(model: nn.Module, cfg: BonsaiConfig) -> list[_Regressors]:
    """Every block's coupled groups, in block order, with their regressors numbered consecutively."""
    layout, first = [], 0
    for index, block in enumerate(decoder_blocks(model)):
        for group in coupled_groups(model, index, block, cfg):
            size = 1 if group.kind == "heads" else cfg.channel_group
            of_unit = torch.arange(group.units) // size
            count = int(of_unit.max()) + 1
            layout.append(_Regressors(index, group, first, count, of_unit, of_unit[group.column_units]))
            first += count
    return layout


class _Masks:
    """Forward pre-hooks that zero the dropped units' input columns of every consumer."""

    def __init__(self, layout: list[_Regressors]):
        self.layout = layout
        self.current: dict[nn.Module, Tensor | None] = {}
        self.handles = [entry.group.consumer.register_forward_pre_hook(self._hook) for entry in layout]

    def set(self, dropped: Tensor) -> None:
        """dropped: (regressors,) bool, one sub-model's row of the drop matrix."""
        for entry in self.layout:
            mine = dropped[entry.first:entry.first + entry.count]
            self.current[entry.group.consumer] = None if not mine.any() else (~mine[entry.of_column]).float()

    def _hook(self, module, args):
        keep = self.current.get(module)
        if keep is None:
            return None
        return (args[0] * keep.to(device=args[0].device, dtype=args[0].dtype), *args[1:])

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class _Magnitudes:
    """Sum of |x| per consumer input column in the dense pass (the channels' tie-break)."""

    def __init__(self, layout: list[_Regressors]):
        self.sums = {entry.group.consumer: None for entry in layout}
        self.handles = [entry.group.consumer.register_forward_pre_hook(self._hook) for entry in layout]

    def _hook(self, module, args):
        X = args[0].detach().reshape(-1, args[0].shape[-1]).abs().sum(dim=0).double().cpu()   # (columns,)
        self.sums[module] = X if self.sums[module] is None else self.sums[module] + X

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def masked_loss(cache: BlockCache, masks: _Masks, dropped: Tensor) -> float:
    """The calibration loss of the sub-model without the `dropped` regressors' units."""
    masks.set(dropped)
    return cache.nll(cache.run(0, cache.inputs[0]))


def unit_scores(layout: list[_Regressors], beta: Tensor, magnitudes: dict | None = None) -> dict[int, list[Tensor]]:
    """{block: [per-unit scores per coupled group]} from the regressors' beta. A channel group's
    channels get its beta plus a tie-break below 1e-6 of the largest |beta|, by their magnitude."""
    tie = 1e-6 * float(beta.abs().max()) if beta.numel() else 0.0
    out: dict[int, list[Tensor]] = {}
    for entry in layout:
        score = beta[entry.first:entry.first + entry.count][entry.of_unit].clone()   # (units,)
        column_sum = None if magnitudes is None else magnitudes.get(entry.group.consumer)
        if entry.group.kind == "channels" and column_sum is not None and tie > 0:
            score += tie * column_sum.double() / column_sum.max().clamp_min(1e-30)
        out.setdefault(entry.block, []).append(score)
    return out


# ----------------------------------------------------------------------------- the pre-pass

def bonsai_prescore(model: nn.Module, calib: Tensor, cfg: BonsaiConfig, *, device=None, batch_size: int = 8,
                    cache_device=None, progress: bool = True) -> dict[int, list[Tensor]]:
    """Every block's unit scores from 1 + cfg.samples forward passes (see the module docstring)."""
    layout = regressors(model, cfg)
    units = sum(entry.count for entry in layout)
    if units == 0:
        return {}
    windows = first_windows(calib, cfg.windows)
    magnitudes = _Magnitudes(layout)
    try:
        cache = BlockCache(model, windows, device=device, batch_size=batch_size, cache_device=cache_device,
                           progress=progress, desc="cache bonsai")
    finally:
        magnitudes.remove()
    if cfg.samples < units:
        log.warning("bonsai: %d sub-models for %d units (heads and groups of %d channels): the regression is "
                    "underdetermined and rests on the ridge; use samples >= %d for a determined fit",
                    cfg.samples, units, cfg.channel_group, units)
    drops = sample_drops(cfg.samples, units, cfg.drop_probability(), cfg.seed)
    dense = cache.loss()
    losses = []
    masks = _Masks(layout)
    try:
        for row in _progress(drops, "bonsai sub-models", progress):
            losses.append(masked_loss(cache, masks, row))
    finally:
        masks.remove()
    losses = torch.tensor(losses, dtype=torch.float64)
    log.info("bonsai: dense calibration loss %.4f; %d sub-models (drop %.2f of %d units): loss %.4f to %.4f",
             dense, cfg.samples, cfg.drop_probability(), units, float(losses.min()), float(losses.max()))
    beta = ridge_importance(drops, losses, cfg.ridge)
    return unit_scores(layout, beta, magnitudes.sums)


def _progress(items, desc: str, enabled: bool):
    from tqdm.auto import tqdm
    return tqdm(items, desc=desc, unit="sub-model", disable=not enabled)


@register("bonsai", BonsaiConfig, scope="width", calibrated=True, prescore=bonsai_prescore)
def bonsai(group: Coupled, scores: Tensor, cfg: BonsaiConfig) -> Tensor:
    return scores                                                              # (units,) from the pre-pass
