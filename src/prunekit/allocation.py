"""Non-uniform layer-wise sparsity under a global budget: how much each block is pruned.

    owl          Outlier-Weighted Layerwise sparsity (Yin et al., arXiv 2310.05175). A block's
                 outlier ratio is the share of its Wanda scores |W_ij| ||X_j|| above `owl_m` x
                 their mean (all target linears of the block pooled, as in the reference
                 `prune_wanda_outlier` of luuyin/OWL). Blocks with more outliers are pruned less.
    sensitivity  prunekit's measured alternative: prune the block alone at the target sparsity
                 with Wanda's mask, and measure how far its output moves, relative to what the
                 block adds to the residual stream (||Y' - Y|| / ||Y - X||). More sensitive
                 blocks are pruned less.
    fdtm         First Divergent Token metric (Deiseroth et al., arXiv 2311.01544, Algorithm 1;
                 `allocation_fdtm.py`): each block Wanda-pruned alone at t/2 and 1.5 t, the
                 whole model run teacher-forced on the dense model's greedy continuation of a
                 few calibration prompts; one FDT threshold gives every block the most sparsity
                 that keeps its interpolated FDT above it. Blocks whose pruning makes generation
                 diverge early are pruned less. Its own normalisation (the threshold, solved so
                 the weighted mean is exact, each block within +/- lambda); then the same rounding.

The owl and sensitivity scores are min-max scaled to [0, 2 lambda] (OWL's normalisation) and turned into
deviations from the target that are clipped to +/- lambda and shifted so that their
parameter-weighted mean is exactly zero: the whole model holds exactly the requested share of
zeros (up to one weight per row: each row's count is an integer; the rounding is spread over the
layers so the total matches). The pre-pass observes the dense model (dense outputs are
propagated, as in the reference) and leaves the weights untouched.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .allocation_fdtm import check_fdtm_can_run, fdtm_block_sparsity
from .distributed import all_sum, reduce_stats_
from .models import spec_for
from .models.spec import get_module, weight_view
from .stats import InputNorm


@dataclass
class Allocation:
    kind: str
    target: float
    block_scores: list[float] = field(default_factory=list)     # outlier ratio, sensitivity or FDT per block
    block_sparsity: list[float] = field(default_factory=list)   # allocated sparsity per block
    layers: dict = field(default_factory=dict)                  # layer name -> (sparsity, nm or None)
    planned: float = 0.0                                        # the share of zeros the layer counts add up to

    def to_dict(self) -> dict:
        return {"kind": self.kind, "target": self.target, "planned": self.planned,
                "block_scores": [round(v, 6) for v in self.block_scores],
                "block_sparsity": [round(v, 6) for v in self.block_sparsity]}


def allocate(model, config, calib: Tensor, *, device=None, batch_size: int = 8, cache_device=None,
             progress: bool = True) -> Allocation:
    """Per-layer sparsity for `config.allocation` ("owl", "sensitivity" or "fdtm")."""
    from .core.stream import block_stream
    if config.allocation == "fdtm":
        check_fdtm_can_run(calib)               # before the calibration pass, not after it
    block_norms: list[dict] = []
    spec = spec_for(model)
    blocks_layers: list[dict[str, torch.nn.Module]] = []
    scores: list[float] = []
    stream = block_stream(model, calib, device=device, batch_size=batch_size, cache_device=cache_device,
                          progress=progress, desc=f"allocate {config.allocation}")
    for step in stream:
        layers = {}
        for group in spec.groups:
            for name in group:
                full = f"{spec.blocks}.{step.index}.{name}"
                overridden = any(re.search(pattern, full) for pattern in config.overrides)
                if config.sparsity_for(full) is not None and not overridden:
                    layers[full] = get_module(step.block, name)
        blocks_layers.append(layers)
        norms = _observe(step, layers)
        if config.allocation == "owl":
            scores.append(_outlier_ratio(layers, norms, config.owl_m))
        elif config.allocation == "fdtm":
            block_norms.append(norms)           # the probes run the whole model, after the pass
        else:
            scores.append(_sensitivity(step, layers, norms, config))
    sizes = [sum(weight_view(m).numel() for m in layers.values()) for layers in blocks_layers]
    if not any(sizes):
        raise ValueError("allocation: no layer is pruned at the step's sparsity (check targets/ignore/overrides)")
    if config.allocation == "fdtm":
        scores, block_sparsity = fdtm_block_sparsity(model, calib, blocks_layers, block_norms, sizes, config,
                                                     batch_size=batch_size, progress=progress)
    else:
        # more outliers / more sensitive -> lower sparsity; sensitivity spans decades, so compare logs
        keys = scores if config.allocation == "owl" else [math.log(max(s, 1e-12)) for s in scores]
        block_sparsity = spread(keys, sizes, config.sparsity, config.allocation_lambda)
    result = Allocation(config.allocation, config.sparsity, scores, block_sparsity)
    result.layers, result.planned = _layer_counts(blocks_layers, block_sparsity, config)
    return result


def spread(keys: list[float], sizes: list[int], target: float, lam: float) -> list[float]:
    """Per-block sparsity: target + deviation, deviation = c - scaled key, clipped to [-lam, lam] and to what
    a sparsity can be ([0, 0.999]: below a target under lam, a block can give at most `target`), with c chosen
    (bisection) so that sum(size * deviation) == 0. Higher key -> lower sparsity. Clipping to [0, 0.999] after
    the bisection instead broke the budget: 0.05 with lambda 0.08 gave blocks [0.13, 0.0], 6.5% in all."""
    lo, hi = min(keys), max(keys)
    if hi - lo < 1e-12 or lam == 0:
        return [target] * len(keys)
    scaled = [(k - lo) / (hi - lo) * 2 * lam for k in keys]           # OWL's [0, 2 lambda]
    total = sum(sizes)
    low, high = max(-lam, -target), min(lam, 0.999 - target)          # low <= 0 <= high

    def mean_deviation(c: float) -> float:
        return sum(n * min(high, max(low, c - x)) for n, x in zip(sizes, scaled)) / total

    a, b = low, high + 2 * lam                                        # mean_deviation(a) <= 0 <= mean_deviation(b)
    for _ in range(200):
        c = (a + b) / 2
        if mean_deviation(c) < 0:
            a = c
        else:
            b = c
    c = (a + b) / 2
    return [target + min(high, max(low, c - x)) for x in scaled]


def _observe(step, layers: dict) -> dict[str, InputNorm]:
    """Run the block densely over every chunk; per target layer, the input norms (summed over
    every process's windows under distributed calibration)."""
    norms = {name: InputNorm(weight_view(m).shape[1], step.device) for name, m in layers.items()}
    by_module = {m: norms[name] for name, m in layers.items()}
    hooks = [m.register_forward_pre_hook(lambda module, args: by_module[module].update(args[0]))
             for m in layers.values()]
    try:
        step.forward()
    finally:
        for hook in hooks:
            hook.remove()
    for norm in norms.values():
        reduce_stats_(norm)
    return norms


def _wanda_score(module, norm: InputNorm) -> Tensor:
    return weight_view(module).detach().float().abs() * norm.sq_norm.sqrt()      # (out, in)


def _outlier_ratio(layers: dict, norms: dict, m: float) -> float:
    """Share of the block's Wanda scores above m x their mean (all layers pooled)."""
    scores = torch.cat([_wanda_score(module, norms[name]).flatten() for name, module in layers.items()])
    return float((scores > m * scores.mean()).float().mean()) if scores.numel() else 0.0


def _sensitivity(step, layers: dict, norms: dict, config) -> float:
    """||Y' - Y||^2 / ||Y - X||^2 over all chunks (of every process), Y' with the block
    Wanda-pruned at the target."""
    from .masks import lowest
    saved = {}
    try:
        with torch.no_grad():
            for name, module in layers.items():
                W = weight_view(module)
                saved[name] = W.detach().clone()
                W.masked_fill_(lowest(_wanda_score(module, norms[name]), config.sparsity, config.nm), 0)
            moved = added = 0.0
            for i in range(len(step.inputs)):
                dense = step.outputs[i].to(step.device).float()
                pruned = step.run_chunk(i).float()
                moved += float((pruned - dense).square().sum())
                added += float((dense - step.inputs[i].to(step.device).float()).square().sum())
    finally:
        with torch.no_grad():
            for name, module in layers.items():
                if name in saved:
                    weight_view(module).copy_(saved[name])
    moved, added = all_sum(moved, added)
    return moved / max(added, 1e-30)


def _layer_counts(blocks_layers: list[dict], block_sparsity: list[float], config) -> tuple[dict, float]:
    """Per-layer (sparsity, nm) whose integer zero counts add up to the global target.

    per="row": each row of a layer loses k = floor(in * s) weights, then layers with the largest
    remainders get one more per row until the total is as close as it can be to the target.
    N:M: each block gets an integer N (1 <= N < M) the same way, with blocks as the units.
    per="layer": the sparsity as allocated (a layer's count rounds by less than one weight).
    """
    layers = [(name, module, s) for layers, s in zip(blocks_layers, block_sparsity) for name, module in layers.items()]
    total = sum(weight_view(m).numel() for _, m, _ in layers)
    target = config.sparsity * total
    out: dict[str, tuple[float, tuple | None]] = {}
    if config.nm is not None:
        n, m = config.nm
        units = []                                                    # (block size, ideal N)
        for layers_b, s in zip(blocks_layers, block_sparsity):
            units.append((sum(weight_view(mod).numel() for mod in layers_b.values()), s * m))
        counts = _round_to_total([(size / m, ideal) for size, ideal in units], target, lo=1, hi=m - 1)
        zeros = 0.0
        for layers_b, count in zip(blocks_layers, counts):
            for name, module in layers_b.items():
                out[name] = (count / m, (count, m))
                zeros += weight_view(module).numel() * count / m
        return out, zeros / total
    if config.per == "row":
        items = [(weight_view(mod).shape[0], weight_view(mod).shape[1] * s) for _, mod, s in layers]
        counts = _round_to_total(items, target, lo=0, hi=None)
        zeros = 0
        for (name, module, _), k in zip(layers, counts):
            rows, columns = weight_view(module).shape
            out[name] = (k / columns + 1e-12, None)                   # + 1e-12: int(columns * s) == k exactly
            zeros += rows * k
        return out, zeros / total
    zeros = 0
    for name, module, s in layers:
        # a block allocated 0 stays among the pruned layers (the engine leaves out layers at sparsity 0, so the
        # report's sparsity of the pruned layers would count only the other blocks), as per="row" does above
        out[name] = (max(s, 1e-12), None)
        zeros += config.layer_zeros(*weight_view(module).shape, s)
    return out, zeros / total


def _round_to_total(items: list[tuple[float, float]], target: float, lo: int, hi: int | None) -> list[int]:
    """Integers k_i near `ideal_i` with sum(weight_i * k_i) as close to `target` as one unit allows.

    items: (weight, ideal). Start from floor(ideal) (clamped to [lo, hi]), then add 1 to the items
    with the largest remainders while that brings the total closer to the target (ideal - floor
    < 1, so one round is enough)."""
    counts = [max(lo, math.floor(ideal)) if hi is None else min(hi, max(lo, math.floor(ideal))) for _, ideal in items]
    order = sorted(range(len(items)), key=lambda i: items[i][1] - math.floor(items[i][1]), reverse=True)
    current = sum(w * k for (w, _), k in zip(items, counts))
    for i in order:
        weight = items[i][0]
        if current + weight / 2 > target:
            continue
        if hi is not None and counts[i] >= hi:
            continue
        counts[i] += 1
        current += weight
    return counts
