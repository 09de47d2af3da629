"""Light-PEFT for masked LoRA: after a few early steps, prune whole adapter modules and single ranks, then
train the smaller adapters to the end (Gu et al., "Light-PEFT: Lightening Parameter-Efficient Fine-Tuning via
Early Pruning", arXiv 2406.03792, Sec. 3.2 "Multi-Granularity Early Pruning of PEFT").

    early steps   `steps` (K) ordinary optimizer steps of masked LoRA (train.py's loop, unchanged)
    estimation    one more forward/backward on the batch of step K (no optimizer step), for the gradients
    modules       coarse grain: each adapter module's importance is the paper's importance ratio, the size of
                  its output relative to the frozen layer's output on the same inputs,
                  I_m = ||X ((s B A) (.) M)^T||_F / ||X W^T||_F over the estimation batch (`module_importance`;
                  the sums of squares are accumulated by a forward hook, no activation is stored). The
                  floor(`modules` x n) least important modules are removed (at least one module stays; ties: the
                  name that sorts first is removed first).
    ranks         fine grain: rank i of a module is scored by the first-order Taylor estimate of the loss
                  change when it is removed, |dL/dm_i| for a gate m_i = 1 on its term s b_i a_i^T, which is
                  |<a_i, dL/da_i>| = |<b_i, dL/db_i>| (both equal s b_i^T G a_i, G = dL/d(masked update));
                  `rank_importance` averages the two sides. Each kept module keeps its
                  r - floor(`ranks` x r) (>= 1) most important ranks (ties: the lower index stays).
    shrink        A (r, in) and B (out, r) are replaced by their kept rows / columns (`apply_plan`): the
                  trainable parameter count drops by exactly r_removed x (in + out) per module, and a removed
                  module holds no parameter at all (its forward is the frozen layer's again). The scale s stays
                  the one of the original rank, so the update of the kept ranks is unchanged by the pruning.
                  The mask M is untouched: the merge still writes W + (s B A) (.) M, and pruned zeros stay zero.
    after         a fresh AdamW over the smaller adapters continues from step K to the step budget.

Not from the paper: the foundation-model half of Light-PEFT (masked early pruning of heads and FFN channels)
is prunekit's pruning itself and is not repeated here; both importances are read on one batch (the one step
K would train on), not accumulated over the early steps; LoRA's dropout is left out of the ratio.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class LightPeftConfig:
    """Light-PEFT's early pruning of masked LoRA adapters (see the module doc)."""
    steps: int = 20            # K: optimizer steps before the importances are estimated
    modules: float = 0.25      # share of the adapter modules removed whole
    ranks: float = 0.5         # share of each kept module's ranks removed

    def __post_init__(self):
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"Light-PEFT steps (--light-peft-steps) must be an integer >= 1, got {self.steps!r}")
        for name in ("modules", "ranks"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise ValueError(f"Light-PEFT {name} (--light-peft-{name}) is the share pruned, in [0, 1); got "
                                 f"{value!r}")
        if self.modules == 0 and self.ranks == 0:
            raise ValueError("Light-PEFT with --light-peft-modules 0 and --light-peft-ranks 0 prunes nothing; give "
                             "a share of modules or ranks to remove (or leave --light-peft out)")


def rank_importance(A: Tensor, B: Tensor, grad_A: Tensor, grad_B: Tensor) -> Tensor:
    """(r,) first-order Taylor importance of each rank: (|<a_i, g(a_i)>| + |<b_i, g(b_i)>|) / 2.
    A, grad_A: (r, in); B, grad_B: (out, r)."""
    a_side = (A.double() * grad_A.double()).sum(1).abs()
    b_side = (B.double() * grad_B.double()).sum(0).abs()
    return (a_side + b_side) / 2


def module_importance(update_sq: float, base_sq: float) -> float:
    """sqrt(update_sq / base_sq): the importance ratio ||X dW^T|| / ||X W^T|| from the two sums of squares
    (inf for a zero base output with a nonzero update, 0 for no update)."""
    if base_sq <= 0:
        return math.inf if update_sq > 0 else 0.0
    return math.sqrt(update_sq / base_sq)


def output_sums(X: Tensor, W: Tensor, delta: Tensor) -> tuple[float, float]:
    """(||X delta^T||_F^2, ||X W^T||_F^2) of inputs X (..., in), W and delta (out, in)."""
    X = X.reshape(-1, X.shape[-1]).double()
    return float((X @ delta.double().T).pow(2).sum()), float((X @ W.double().T).pow(2).sum())


def plan(module_scores: dict[str, float], rank_scores: dict[str, Tensor], cfg: LightPeftConfig) -> dict[str, list[int]]:
    """module name -> the sorted rank indices it keeps ([] for a removed module)."""
    if set(module_scores) != set(rank_scores) or not module_scores:
        raise ValueError("Light-PEFT needs one module score and one rank score vector per adapter module")
    names = sorted(module_scores)
    drop = min(math.floor(cfg.modules * len(names)), len(names) - 1)
    removed = set(sorted(names, key=lambda n: (module_scores[n], n))[:drop])
    out = {}
    for name in names:
        if name in removed:
            out[name] = []
            continue
        scores = rank_scores[name]
        r = len(scores)
        keep = max(1, r - math.floor(cfg.ranks * r))
        ranked = sorted(range(r), key=lambda i: (-float(scores[i]), i))
        out[name] = sorted(ranked[:keep])
    return out


def planned_counts(shapes: dict[str, tuple[int, int, int]], kept: dict[str, list[int]]) -> tuple[int, int]:
    """(trainable parameters before, after) for `shapes` name -> (rank, in, out) and a plan."""
    before = sum(r * (i + o) for r, i, o in shapes.values())
    after = sum(len(kept[name]) * (i + o) for name, (_, i, o) in shapes.items())
    return before, after


def _base_forward(layer: nn.Module, x: Tensor, *args, **kwargs) -> Tensor:
    return layer.base_layer(x, *args, **kwargs)


@torch.no_grad()
def apply_plan(lora, kept: dict[str, list[int]]) -> None:
    """Shrink every adapter of `lora` (masked_lora.MaskedLora) to its kept ranks, in place: new, smaller
    A / B parameters; a module with no rank left runs its frozen layer alone."""
    from functools import partial

    from .masked_lora import ADAPTER
    if set(kept) != set(lora.layers):
        raise ValueError("a Light-PEFT plan must name every adapted layer once")
    for name, layer in lora.layers.items():
        A, B = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
        index = torch.tensor(kept[name], dtype=torch.long, device=A.device)
        layer.lora_A[ADAPTER].weight = nn.Parameter(A.detach().index_select(0, index).clone(),
                                                    requires_grad=A.requires_grad)
        layer.lora_B[ADAPTER].weight = nn.Parameter(B.detach().index_select(1, index).clone(),
                                                    requires_grad=B.requires_grad)
        if not kept[name]:
            layer.forward = partial(_base_forward, layer)


def early_prune(lora, cfg: LightPeftConfig, loss_fn) -> dict:
    """Estimate the importances with one backward of `loss_fn()` (a scalar loss of the current adapters), prune
    modules and ranks, shrink the adapters. Returns what was done (for the recovery report)."""
    from ..models.spec import weight_view
    from .masked_lora import ADAPTER, masked_delta
    params = lora.parameters()
    for p in params.values():
        p.grad = None
    sums = {name: [0.0, 0.0] for name in lora.layers}

    def observe(name, layer, module, args, output):
        with torch.no_grad():
            A, B = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
            delta = masked_delta(A, B, lora.masks[name], layer.scaling[ADAPTER])
            update_sq, base_sq = output_sums(args[0], weight_view(module), delta)
            sums[name][0] += update_sq
            sums[name][1] += base_sq

    from functools import partial
    hooks = [layer.get_base_layer().register_forward_hook(partial(observe, name, layer))
             for name, layer in lora.layers.items()]
    try:
        loss_fn().backward()
    finally:
        for hook in hooks:
            hook.remove()
    module_scores, rank_scores, shapes = {}, {}, {}
    for name, layer in lora.layers.items():
        A, B = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
        grad_A = A.grad if A.grad is not None else torch.zeros_like(A)
        grad_B = B.grad if B.grad is not None else torch.zeros_like(B)
        rank_scores[name] = rank_importance(A.detach(), B.detach(), grad_A, grad_B)
        module_scores[name] = module_importance(*sums[name])
        shapes[name] = (A.shape[0], A.shape[1], B.shape[0])
    for p in params.values():
        p.grad = None
    kept = plan(module_scores, rank_scores, cfg)
    before, after = planned_counts(shapes, kept)
    apply_plan(lora, kept)
    removed = sorted(name for name, ranks in kept.items() if not ranks)
    return {
        "steps": cfg.steps, "modules_share": cfg.modules, "ranks_share": cfg.ranks,
        "modules": {"total": len(kept), "removed": len(removed), "removed_names": removed},
        "ranks": {"before": sum(r for r, _, _ in shapes.values()), "after": sum(len(v) for v in kept.values())},
        "trainable_before": before, "trainable_after": after,
        "saved": round(1 - after / before, 6) if before else 0.0,
        "estimators": "modules: importance ratio ||X dW^T|| / ||X W^T|| on one batch; ranks: first-order Taylor "
                      "|dL/dm_i| from that batch's gradient (arXiv 2406.03792, Sec. 3.2)",
    }
