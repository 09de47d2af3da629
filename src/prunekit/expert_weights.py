"""Unstructured / N:M pruning of the weights inside routed experts, each expert with the
statistics of the tokens routed to it.

A routed expert is not an nn.Linear: transformers 5 stores all experts of a block as fused 3-D
parameters (`gate_up_proj` (E, 2I, H), `down_proj` (E, H, I); gpt-oss transposed). The linear
engine (`engine.py`) treats the experts module of an MoE block as one more group of the block,
an `ExpertGroup`: a pre-hook on the experts module records what it receives (the tokens, their
chosen experts and routing weights); when every calibration chunk has arrived (true-sequential
lockstep) or after the observing pass (block order), `prune_expert_group` prunes, per expert j:

    gate_up  X_j = the tokens routed to j                         (n_j, H); W (2I, H)
    down     A_j = act(gate) * up of X_j through the *pruned* gate_up      (n_j, I); W (H, I)

with the method's own function and observer (InputNorm for Wanda, Hessian for SparseGPT, ...),
exactly as for a linear layer, so every unstructured/N:M method reaches the experts. Rows are
independent for every method, so gpt-oss's interleaved gate/up rows need no reordering.

MoE-Pruner (`methods/moe_pruner.py`, arXiv 2410.12013) weights each token's activation by its
routing weight before the observer sees it (`routed_weighting`): score |W_ij| ||g_j(x) X_j||_2.

Experts that receive fewer than `config.expert_min_tokens` calibration tokens (every process's
together) have too little data for an activation statistic: they fall back to magnitude scores
(|W|, the same pattern), and their records say so (`note`), so the per-layer report shows which.
Exact sparsity is verified per expert matrix, like every linear layer.

Distributed calibration: each process observes its own tokens; the observers are summed across
processes before each expert matrix is pruned (in the same order in every process), as in the
linear engine.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, nn

from . import distributed
from .core.stream import NonFiniteError
from .masks import check_pruned, lowest
from .models.moe import expert_matrix
from .models.spec import get_module
from .report import LayerRecord
from .updates import apply_update

PROBE_TOKENS = 256       # tokens per expert kept to measure each matrix's reconstruction error


@dataclass
class ExpertGroup:
    """The routed experts of one MoE block, pruned as one group of the linear engine."""
    name: str                      # full name of the experts module, e.g. "model.layers.3.mlp.experts"
    module: nn.Module
    moe: object                    # the family's `spec.Experts`
    sparsity: float
    nm: tuple[int, int] | None = None
    routed: list = field(default_factory=list)    # per chunk: (x (T, H), chosen (T, k), weights (T, k))
    pruned: bool = False

    @property
    def layers(self):               # what the engine's bookkeeping iterates (names of missed groups)
        return [self]


def plan_experts(spec, index: int, block: nn.Module, config) -> ExpertGroup | None:
    """The expert group of block `index`, or None if the config does not target its experts."""
    name = f"{spec.blocks}.{index}.{spec.experts.experts}"
    sparsity = config.sparsity_for(f"{name}.gate_up_proj")
    if not sparsity:
        return None
    if getattr(config, "uses_gradient", False):
        raise ValueError(f"{name}: gradient scores (gblm, pruner-zero) are computed for nn.Linear layers only; "
                         "the fused experts of an MoE block are not supported: add ignore: ['experts'] "
                         "(--ignore experts) to prune the other layers, or use wanda / sparsegpt / moe-pruner")
    return ExpertGroup(name, get_module(block, spec.experts.experts), spec.experts, sparsity)


def observe_experts(group: ExpertGroup, args: tuple) -> None:
    """The experts module's pre-hook: keep what this chunk routes (the engine calls it)."""
    x, chosen, weights = args[0], args[1], args[2]
    group.routed.append((x.detach(), chosen.detach(), weights.detach().float()))


def intermediate(experts: nn.Module, moe, expert: int, x: Tensor) -> Tensor:
    """The input of expert `expert`'s down projection for tokens x (T, H): act(gate) * up, from the
    family's own activation (gpt-oss: its clamped, interleaved `_apply_gate`, with the bias)."""
    gate_up = x @ expert_matrix(experts, moe, "gate_up_proj", expert).T              # (T, 2I)
    bias = getattr(experts, "gate_up_proj_bias", None)
    if bias is not None:
        gate_up = gate_up + bias[expert]
    if hasattr(experts, "_apply_gate"):
        return experts._apply_gate(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return experts.act_fn(gate) * up


def prune_expert_group(group: ExpertGroup, method, config, block_index: int, options) -> list[LayerRecord]:
    """Prune every expert's gate_up then down projection with `method` (see the module docstring).

    Observers are fed chunk by chunk (each calibration chunk's tokens routed to the expert), as in
    the linear engine: the same float32 products whichever process holds a chunk, so distributed
    calibration reproduces the single-process statistics."""
    group.pruned = True
    experts, moe, device = group.module, group.moe, options.device
    chunks = [(x.reshape(-1, x.shape[-1]), chosen.reshape(-1, chosen.shape[-1]), weights.reshape(-1, chosen.shape[-1]))
              for x, chosen, weights in group.routed]
    group.routed = []
    if not all(bool(torch.isfinite(x).all()) for x, _, _ in chunks):
        raise NonFiniteError(f"block {block_index}, {group.name}: the experts' input holds NaN/Inf on the calibration "
                             "data; nothing of this group was written (check the model dtype and the data)")
    weighted = getattr(config, "routed_weighting", False)
    floor = getattr(config, "expert_min_tokens", 0)
    layer_config = replace(config, sparsity=group.sparsity, nm=group.nm or config.nm)
    records = []
    with torch.no_grad():
        for expert in range(expert_count_of(experts)):
            parts = None                                   # data-free: no calibration chunks
            if chunks:
                parts = []
                for x, chosen, weights in chunks:           # this expert's tokens, chunk by chunk
                    rows, slot = torch.where(chosen == expert)
                    gate = weights[rows, slot].to(device).float()
                    parts.append((x[rows].to(device=device, dtype=torch.float32), gate if weighted else None))
            tokens = int(distributed.all_sum(sum(p[0].shape[0] for p in parts) if parts else 0)[0])
            fallback = parts is not None and tokens < floor
            for part in ("gate_up_proj", "down_proj"):
                if part == "down_proj" and parts is not None:
                    dtype = experts.gate_up_proj.dtype
                    parts = [(intermediate(experts, moe, expert, X.to(dtype)).float(), gate) for X, gate in parts]
                records.append(_prune_matrix(group, part, expert, parts, tokens, fallback, method, layer_config,
                                             config, block_index, options))
    return records


def expert_count_of(experts: nn.Module) -> int:
    return int(experts.gate_up_proj.shape[0])


def _prune_matrix(group, part, expert, parts, tokens, fallback, method, layer_config, config, block_index,
                  options) -> LayerRecord:
    """One expert matrix: observe its input chunk by chunk, prune, write back, verify."""
    start = time.perf_counter()
    stored = expert_matrix(group.module, group.moe, part, expert)                              # (out, in)
    W = stored.detach().to(device=options.device, dtype=torch.float32, copy=True)
    zeros_before = int((W == 0).sum())
    stats, note = None, None
    if options.observer is not None and parts is not None:
        stats = options.observer(W.shape[1], options.device)
        for X, gate in parts:
            if X.shape[0]:
                stats.update(X * gate.unsqueeze(-1) if gate is not None else X)
        distributed.reduce_stats_(stats)
    if fallback or (options.observer is not None and parts is not None and tokens == 0):
        note = f"{tokens} routed calibration tokens (< {config.expert_min_tokens}): magnitude scores"
        W_new = W.masked_fill(lowest(W.abs(), layer_config.sparsity, layer_config.nm, config.per), 0)
    else:
        W_new = apply_update(W, method.fn(W, stats, layer_config), stats, layer_config,
                             method_updates=method.updates_weights)
    if not torch.isfinite(W_new).all():
        raise NonFiniteError(f"block {block_index}, {group.name}.{expert}.{part}: the pruned weight has NaN/Inf")
    stored.copy_(W_new.to(stored.dtype))
    distributed.broadcast_(stored)
    error = None
    X = torch.cat([p[0] for p in parts]) if parts else None                           # (n_j, in)
    if X is not None:
        probe = X[:: max(1, math.ceil(X.shape[0] / PROBE_TOKENS))]
        moved, total = distributed.all_sum(float((probe @ (W - stored.float()).T).square().sum()),
                                           float((probe @ W.T).square().sum()))
        error = math.sqrt(moved / max(total, 1e-24))
    problem = check_pruned(stored, layer_config.sparsity, layer_config.nm, config.per, zeros_before,
                           layer_zeros=config.layer_zeros(*stored.shape, layer_config.sparsity))
    return LayerRecord(name=f"{group.name}.{expert}.{part}", block=block_index, requested=group.sparsity,
                       zeros=int((stored == 0).sum()), numel=stored.numel(), error=error,
                       seconds=round(time.perf_counter() - start, 4), note=note, problem=problem)


__all__ = ["ExpertGroup", "plan_experts", "observe_experts", "prune_expert_group", "intermediate"]
