"""The linear engine: prune the linear layers of every decoder block, one block at a time.

    per block  onload it to the compute device, attach observers to its linear layers, run the
               cached calibration chunks through it, prune each group of linears, keep the
               *pruned* outputs as the next block's inputs, offload it

A group is the linears of one block that read the same input (q/k/v; o; gate/up; down, from the
family spec); they share one observer. Two orders inside a block (`sequential`):
  "true"   each group is pruned as soon as every chunk has reached it, so later groups observe the
           outputs of the already-pruned earlier ones: one forward pass per block (`lockstep.py`)
  "block"  every group observes the dense block, then all are pruned, then a second pass
           propagates the pruned outputs (the order of the reference SparseGPT and Wanda code)

The engine knows methods, observers and weight updates, nothing else: what varies around it comes
in `LinearOptions` (per-layer sparsities from an allocation, gradients, a compensation callback),
set up by `prune.py`, the one place that switches on a method's scope. Capture, the block stream's
helpers and the residency (where blocks live between their turns) are `core/`.
"""
from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Callable

import torch
from torch import Tensor, nn

from . import distributed
from .core.stream import BlockStep, NonFiniteError, capture, check_finite_outputs, keep_output, progress_bar, \
    to_device
from .expert_weights import ExpertGroup, observe_experts, plan_experts, prune_expert_group
from .gradients import WithGradient
from .lockstep import Lockstep
from .masks import check_pruned
from .models import spec_for
from .models.moe import is_moe_block
from .models.spec import get_module, has_module, in_features, is_linear, weight_view
from .permute import nm_permutation
from .report import LayerRecord, PruneReport, memory_now
from .surgery import permute_channels_
from .updates import OBS_DAMP, apply_update

log = logging.getLogger("prunekit")

PROBE_ROWS = 512  # calibration tokens kept per group to measure each layer's reconstruction error


@dataclass
class LinearOptions:
    """How one linear pass runs, and what the layers around the method receive."""
    device: torch.device
    cache_device: torch.device
    residency: object                      # core.residency.InMemory / OnDisk, or a recorder wrapping one
    sequential: str = "true"               # "true" (one pass, lockstep) or "block" (the reference order)
    batch_size: int = 8                    # calibration windows per chunk
    progress: bool = True
    observer: type | None = None           # statistics class every group collects (None: data-free)
    sparsities: dict | None = None         # layer name -> (sparsity, nm) from an allocation; else the config's
    windows: int = 0                       # calibration windows of the whole run (every process's)
    gradients: dict = field(default_factory=dict)     # layer name -> (out, in) |gradient|, consumed per layer
    grad_windows: int | None = None        # windows the model gradients were summed over
    block_gradients: Callable | None = None           # (BlockStep, {name: module}) -> gradients of one block
    compensate: Callable | None = None     # (name, module, W_dense, W_pruned, stats), after each layer


@dataclass
class _Layer:
    name: str                 # full module name, e.g. "model.layers.3.mlp.down_proj"
    module: nn.Module
    sparsity: float
    nm: tuple[int, int] | None = None    # this layer's N:M when an allocation varies N


@dataclass
class _Group:
    """Linears of one block that read the same input; they share one observer."""
    layers: list[_Layer]
    stats: object = None
    probe: list[Tensor] = field(default_factory=list)
    pruned: bool = False
    permutable: bool = False             # the MLP's down projection: its input channels may be reordered
    perm: Tensor | None = None           # set when they were: later inputs are reordered to match


def plan(model: nn.Module, config, sparsities: dict | None = None) -> list[list[_Group]]:
    """Every block's groups of linears to prune, with each layer's sparsity."""
    spec = spec_for(model)
    blocks = get_module(model, spec.blocks)
    groups = [_plan_block(spec, i, block, config, sparsities) for i, block in enumerate(blocks)]
    if not any(groups):
        raise ValueError(f"targets={config.targets} ignore={config.ignore} select no linear layer in {spec.blocks}")
    return groups


def layer_names(groups: list[list[_Group]]) -> list[str]:
    return [layer.name for block in groups for group in block for layer in group.layers]


def prune_linear_(model: nn.Module, method, config, calib: Tensor | None, groups: list[list[_Group]],
                  report: PruneReport, options: LinearOptions) -> None:
    """Prune the planned layers of `model` in place, block by block; records go into `report`."""
    spec = spec_for(model)
    blocks = get_module(model, spec.blocks)
    residency = options.residency
    device, cache_device = options.device, options.cache_device
    with torch.no_grad():
        if calib is None:
            hidden, kwargs = None, None
        else:
            with residency.capturing(model, blocks):
                hidden, kwargs = capture(model, blocks, calib, options.batch_size, device, cache_device)
        start, hidden = residency.resume(blocks, hidden)      # > 0 when a recorded run continues
        first_chunk = distributed.offset(len(hidden)) if hidden is not None else 0   # this process's first chunk
        if hidden is not None:
            report.memory_budget = _memory_budget(model, blocks, groups, hidden, options.sequential)
        bar = progress_bar(len(blocks), f"prune {method.name}", enabled=options.progress)
        bar.update(start)
        for index, block in enumerate(blocks):
            if index < start:
                groups[index] = []
                continue
            block_start = time.perf_counter()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            residency.onload(index, block, device)
            block_kwargs = None if kwargs is None else [kw[index] for kw in kwargs]
            records = _prune_block(block, index, groups[index], method, config, hidden, block_kwargs, first_chunk,
                                   calib, options, spec)
            if hidden is not None:
                check_finite_outputs(hidden, index, f"{spec.blocks}.{index}")
            residency.offload(index, block)
            groups[index] = []                                # frees observers and probes
            failures = [f"{r.name}: {r.problem}" for r in records if r.problem]
            if failures:
                raise RuntimeError("pruning did not produce the requested pattern in block "
                                   f"{index}:\n  " + "\n  ".join(failures))
            report.layers.extend(records)
            residency.done(index, records, hidden)
            mem = memory_now(device)
            report.blocks.append({"block": index, "seconds": round(time.perf_counter() - block_start, 3), **mem})
            errors = [r.error for r in records if r.error is not None]
            mean_error = sum(errors) / len(errors) if errors else float("nan")
            log.info("block %d: %d layers, mean rel. error %.4f, %s", index, len(records), mean_error, mem)
            bar.set_postfix(err=f"{mean_error:.4f}", mem=mem.get("peak_mb", mem.get("rss_mb")))
            bar.update(1)
        bar.close()


def _prune_block(block, index, groups, method, config, hidden, kwargs, first_chunk, calib, options, spec):
    """Observe and prune one block's groups; each chunk of `hidden` is replaced, in place, by its output."""
    for group in groups:
        if options.observer is not None and not isinstance(group, ExpertGroup):   # experts: one observer per expert
            group.stats = options.observer(in_features(group.layers[0].module), options.device)
    if options.block_gradients is not None:
        step = BlockStep(index, block, hidden, kwargs, options.device, options.cache_device, first_chunk)
        with torch.enable_grad():
            options.gradients = options.block_gradients(step, {layer.name: layer.module
                                                               for g in groups for layer in g.layers})
    records: list[LayerRecord] = []

    def prune(group):
        if isinstance(group, ExpertGroup):
            records.extend(prune_expert_group(group, method, config, index, options))
        else:
            records.extend(_prune_group(group, method, config, index, block, options, spec))

    if hidden is None:                          # data-free: no forward pass
        for group in groups:
            prune(group)
    else:
        # of all windows (every process's): the same probe rows as a single process
        probe_every = max(1, math.ceil(options.windows * calib.shape[1] / PROBE_ROWS))
        _run_block(block, groups, hidden, kwargs, options.device, options.cache_device, options.sequential, prune,
                   probe_every)
    return records


def _memory_budget(model, blocks, plan, hidden: list[Tensor], sequential: str) -> dict:
    """What peak memory should be: the model + one block + cached activations, plus 20%.

    Cached activations are the block inputs of every calibration token (outputs replace them in
    place); in true-sequential mode every chunk also holds the residual stream and the input of
    the group being pruned while it waits for the others (at most hidden + the widest group input).
    The Python interpreter and its libraries come on top (about 0.4 GB with torch + transformers).
    Observers are not counted: a Hessian takes 12 bytes per in^2 entry (its float64 sum and the
    float32 copy methods read, `stats.Hessian`), 0.05 GB for 2048 inputs, 1.45 GB for 11008.
    """
    mb = 2**20
    tokens = sum(h.shape[0] * h.shape[1] for h in hidden)
    hidden_size, elem = hidden[0].shape[-1], hidden[0].element_size()
    cache = tokens * hidden_size * elem                   # block inputs; outputs overwrite them chunk by chunk
    if sequential == "true":
        widest = max((in_features(g.layers[0].module) for groups in plan for g in groups
                      if not isinstance(g, ExpertGroup)), default=0)
        cache += tokens * (hidden_size + widest) * 4
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    block = max(sum(p.numel() * p.element_size() for p in b.parameters()) for b in blocks)
    return {"model_mb": round(model_bytes / mb), "block_mb": round(block / mb), "activations_mb": round(cache / mb),
            "budget_mb": round(1.2 * (model_bytes + block + cache) / mb)}


def _plan_block(spec, index: int, block: nn.Module, config, sparsities=None) -> list[_Group]:
    groups = []
    for names in spec.groups:
        layers = []
        for name in names:
            full = f"{spec.blocks}.{index}.{name}"
            if spec.experts is not None and not has_module(block, name):
                continue            # MoE families: dense and expert blocks differ (spec.Experts)
            module = get_module(block, name)
            if not is_linear(module):
                raise TypeError(f"{full} is a {type(module).__name__}, not a linear layer; fix the model spec")
            sparsity, nm = config.sparsity_for(full), None
            if sparsities is not None and full in sparsities:
                sparsity, nm = sparsities[full]
            if sparsity:
                layers.append(_Layer(full, module, sparsity, nm))
        if layers:
            permutable = spec.channels is not None and names == (spec.channels.consumer,)
            groups.append(_Group(layers, permutable=permutable))
    if spec.experts is not None and is_moe_block(block, spec.experts):
        experts = plan_experts(spec, index, block, config)      # the routed experts: one more group
        if experts is not None and getattr(config, "wraps_layers", False):
            raise ValueError(f"{experts.name}: this method wraps each pruned nn.Linear in block-diagonal factors "
                             "(armor), which the fused routed experts of an MoE block cannot carry: add ignore: "
                             "['experts'] (--ignore experts) to prune the other layers")
        if experts is not None:
            groups.append(experts)
    return groups


def _prune_group(group: _Group, method, config, block_index: int, block, options: LinearOptions,
                 spec) -> list[LayerRecord]:
    """Apply the method to every layer of the group, write the weights back, verify them."""
    device = options.device
    group.pruned = True
    # Distributed calibration: the one place where the processes' observers are summed, so every
    # process decides from the statistics of all windows (a no-op in a single process). Every
    # process prunes the same groups in the same order, so these collectives always pair up; in
    # true-sequential mode only the last lockstep thread of each process gets here (the others
    # wait at the meeting point), so each process issues each collective exactly once.
    distributed.reduce_stats_(group.stats)
    _check_finite_statistics(group, block_index)        # all processes' sums; before any weight of the group is written
    if group.permutable and getattr(config, "permute", False) and config.nm and method.score is not None:
        _permute(group, method, config, block, spec, device)
    X = torch.cat(group.probe) if group.probe else None                       # (rows, in)
    records = []
    for layer in group.layers:
        start = time.perf_counter()
        stored = weight_view(layer.module)                                     # (out, in), storage dtype
        W = stored.detach().to(device=device, dtype=torch.float32, copy=True)
        zeros_before = int((W == 0).sum())
        layer_config = replace(config, sparsity=layer.sparsity, nm=layer.nm or config.nm)
        stats = group.stats
        if layer.name in options.gradients:
            stats = WithGradient(group.stats, options.gradients.pop(layer.name).to(device),
                                 windows=options.windows, grad_windows=options.grad_windows)
            if not torch.isfinite(stats.grad).all():
                raise NonFiniteError(f"block {block_index}, {layer.name}: the gradient statistics hold NaN/Inf "
                                     "(the loss overflowed? check the calibration data; use dtype float32)")
        W_pruned, factors = method.fn(W, stats, layer_config), None
        if isinstance(W_pruned, tuple):    # a factorising method (ARMOR): (the stored core, its wrappers)
            W_pruned, factors = W_pruned
        W_new = apply_update(W, W_pruned, group.stats, layer_config, method_updates=method.updates_weights)
        if not torch.isfinite(W_new).all():
            raise NonFiniteError(f"block {block_index}, {layer.name}: the pruned weight has NaN/Inf "
                                     "(check the calibration data and the model dtype)")
        stored.copy_(W_new.to(stored.dtype))
        distributed.broadcast_(stored)     # identical already (same statistics); this makes it certain
        if factors is not None:
            factors.attach(layer.module)   # from here on the layer computes A (core) B x + bias
        if options.compensate is not None:
            options.compensate(layer.name, layer.module, W, stored.float(), group.stats)
        error = None
        if X is not None:      # ||X (W - W')|| / ||X W|| over the probe rows of every process
            computed = stored.float() if factors is None else factors.dense()
            moved, total = distributed.all_sum(float((X @ (W - computed).T).square().sum()),
                                               float((X @ W.T).square().sum()))
            error = math.sqrt(moved / max(total, 1e-24))
        note = _solver_note(group.stats, layer_config)
        if note:
            log.warning("%s: %s", layer.name, note)
        if factors is not None:            # the wrappers' parameters and the proxy loss they saved
            note = "; ".join(filter(None, [note, factors.note()]))
        problem = check_pruned(stored, layer_config.sparsity, layer_config.nm, config.per, zeros_before,
                               layer_zeros=config.layer_zeros(*stored.shape, layer_config.sparsity))
        records.append(LayerRecord(name=layer.name, block=block_index, requested=layer.sparsity,
                                   zeros=int((stored == 0).sum()), numel=stored.numel(), error=error,
                                   seconds=round(time.perf_counter() - start, 4), note=note, problem=problem))
    group.stats = None
    group.probe = []
    return records


def _check_finite_statistics(group: _Group, block_index: int) -> None:
    """The group's observer and probe must be finite: a NaN in X^T X or in the input norms would
    otherwise pass through topk and the OBS sweep silently (a NaN score is never "lowest")."""
    tensors = list(group.probe)
    if group.stats is not None:
        tensors += [value for value in vars(group.stats).values() if isinstance(value, Tensor)]
    if not all(bool(torch.isfinite(t).all()) for t in tensors):
        names = ", ".join(layer.name for layer in group.layers)
        raise NonFiniteError(f"block {block_index}, {names}: the input of this layer holds NaN/Inf on the "
                             "calibration data (its statistics are not finite); nothing of this group was "
                             "written. Check the calibration text and the model dtype (float16 overflows: "
                             "use float32 or bfloat16)")


def _solver_note(stats, layer_config) -> str | None:
    """The Hessian solver's note for this layer (dampening raised, or the diagonal fallback),
    for the OBS sweep of SparseGPT or of `update: obs`."""
    if not hasattr(stats, "inverse_cholesky"):
        return None
    damp = getattr(layer_config, "damp", None)
    if damp is None and getattr(layer_config, "update", None) == "obs":
        damp = OBS_DAMP                                  # what `apply_update` builds its sweep with
    return None if damp is None else stats.inverse_cholesky(damp)[2]


def _permute(group: _Group, method, config, block, spec, device) -> None:
    """Reorder the MLP's channels so that N:M keeps more of the method's score (RIA's channel
    permutation); the observer and probe follow, and `group.perm` tells the suspended chunks."""
    layer = group.layers[0]
    W = weight_view(layer.module).detach().to(device=device, dtype=torch.float32)
    perm = nm_permutation(method.score(W, group.stats, config), *config.nm)
    if perm is None:
        return
    perm = perm.to(W.device)
    permute_channels_(block, spec.channels, perm)
    group.stats.permute_(perm)
    group.probe = [X[:, perm] for X in group.probe]
    group.perm = perm
    layer.module = get_module(block, spec.channels.consumer)


def _run_block(block, groups, hidden, kwargs, device, cache_device, sequential, prune, probe_every):
    """Observe and prune one block; return its pruned outputs (one tensor per calibration chunk)."""
    group_of = {}   # module -> its group; whichever layer of a group runs first observes the shared input
    for group in groups:
        for layer in group.layers:
            group_of[layer.module] = group          # an ExpertGroup is its own single "layer" (the experts module)
    lockstep = Lockstep(len(hidden)) if sequential == "true" else None
    seen = threading.local()

    def observe(module, args):
        group = group_of[module]
        if id(group) in seen.groups:                       # k/v after q: same input, already observed
            return
        seen.groups.add(id(group))
        if isinstance(group, ExpertGroup):
            observe_experts(group, args)           # tokens, chosen experts, routing weights of this chunk
            if lockstep is not None:
                lockstep.meet(group, lambda: prune(group))
            return
        X = args[0]
        if group.stats is not None:
            group.stats.update(X)
        # a copy, not a view: a view would keep every chunk's whole input alive until pruning
        group.probe.append(X.reshape(-1, X.shape[-1])[::probe_every].to(torch.float32, copy=True))
        if lockstep is not None:
            lockstep.meet(group, lambda: prune(group))
            if group.perm is not None:                     # its channels were reordered while we waited
                return (X.index_select(-1, group.perm.to(X.device)), *args[1:])

    def forward(i: int, record: bool):
        """Run chunk i through the block; in the propagating pass its output replaces its input."""
        seen.groups = set() if record else {id(g) for g in groups}
        with torch.no_grad():
            args, kw = to_device(kwargs[i], device)
            out = block(hidden[i].to(device), *args, **kw)
        if record and lockstep is None:
            return                                    # block order: pass 1 only observes
        hidden[i] = keep_output(hidden[i], (out[0] if isinstance(out, tuple) else out), cache_device)

    handles = [module.register_forward_pre_hook(observe) for module in group_of]
    try:
        if lockstep is not None:
            lockstep.run(lambda i: forward(i, record=True))
        else:
            for i in range(len(hidden)):
                forward(i, record=True)
            for handle in handles:
                handle.remove()
            for group in groups:
                prune(group)
            for i in range(len(hidden)):
                forward(i, record=False)
    finally:
        for handle in handles:
            handle.remove()
    missed = [g.layers[0].name for g in groups if not g.pruned]
    if missed:
        raise RuntimeError(f"these layers never received calibration input, so they were not pruned: {missed}")
    return hidden
