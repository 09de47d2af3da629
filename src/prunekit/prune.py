"""`prune_(model, config, calib)`: the public entry point, and the one place that switches on scope.

    width   remove heads and channels (`structured.prune_width_`)
    depth   remove whole blocks (`depth.prune_depth_`)
    experts remove (or merge) routed experts of MoE blocks (`experts.prune_experts_`)
    search  the best widths / removed sublayers / removed blocks under a measured budget (`search.search_`)
    linear  unstructured / N:M: run the pre-passes the config asks for, then the linear engine
            (`engine.py`) with what they produced:
              allocation   per-layer sparsities under the global budget (OWL, sensitivity; `allocation.py`)
              gradients    for gradient scores (GBLM, Pruner-Zero): a full-model pre-pass, or per
                           block inside the engine (`gradients.py`)
              compensate   a callback run as each layer is pruned, the registered function of the
                           compensation step (EoRA: a low-rank residual from the same Hessian, `eora.py`)

Every pass of the run finds its blocks through the residency given here (`core/residency.py`):
in memory by default, streamed from a checkpoint out of core.
"""
from __future__ import annotations

import logging
import time

import torch
from torch import Tensor, nn

from . import distributed, engine, gradients
from .allocation import allocate
from .core.memory import one_malloc_arena
from .core.residency import current, using
from .core.stream import model_device
from .depth import prune_depth_
from .eora import check_rank_fits, merge_adapters_
from .experts import prune_experts_
from .search import search_
from .models.spec import weight_view
from .registry import method_for_config
from .report import PruneReport
from .stats import Hessian
from .structured import prune_width_

log = logging.getLogger("prunekit")


def prune_(model: nn.Module, config, calib: Tensor | None = None, *, device: str | torch.device | None = None,
           sequential: str = "true", batch_size: int = 8, cache_device: str | torch.device | None = None,
           progress: bool = True, compensate=None, residency=None, state_dir=None, resume: bool = False):
    """Prune `model` in place with `config` (e.g. `WandaConfig(sparsity=0.5)`).

    calib: (samples, seqlen) token ids from `calibration_data`; may be None only for data-free
    methods (magnitude). compensate: an `EoraConfig` to compute low-rank residuals in the same
    pass (they are returned in `report.adapters`, and merged if it says so). Returns a
    `PruneReport` (per-layer achieved sparsity, reconstruction error, time and memory per block),
    or a `StructureReport` for width and depth methods. Raises if any layer does not hold the
    requested pattern. residency: where blocks live between their turns (`InMemory` by default;
    `OnDisk` streams them from a checkpoint). state_dir / resume: a structure search keeps its state
    there and continues it (`search.py`).

    Distributed calibration: inside a torch.distributed process group of N > 1 processes
    (`distributed.init_from_env`, or your own `init_process_group`), give every process the same
    model and `calib`; each keeps its share of the windows, and the statistics are summed across
    processes before each layer is pruned, so every process ends with the same pruned model.
    """
    method = method_for_config(config)
    if (method.needs_calibration_for(config) or compensate is not None) and calib is None:
        raise ValueError(f"{method.name} needs calibration data: pass calib=calibration_data(tokenizer, ...)")
    if compensate is not None and method.scope != "linear":
        raise ValueError(f"EoRA compensates unstructured/N:M pruning; {method.name} removes whole "
                         "units, which changes the layers' shapes (put eora after a wanda/sparsegpt/... step)")
    if method.scope not in ("linear", "width", "depth", "experts", "search", "state"):
        raise ValueError(f"{method.name} is a {method.scope} step, not a pruning method: run it in a recipe")
    windows = None if calib is None else tuple(calib.shape)   # the whole set, for the report
    if distributed.is_distributed():
        # every process was handed the same windows and keeps its share (see distributed.py)
        calib = distributed.shard(calib, batch_size)
    with using(residency if residency is not None else current()) as residency:
        if method.scope == "width":
            return prune_width_(model, config, calib, device=device, batch_size=batch_size,
                                cache_device=cache_device, progress=progress)
        if method.scope == "experts":
            return prune_experts_(model, config, calib, device=device, batch_size=batch_size,
                                  cache_device=cache_device, progress=progress)
        if method.scope == "search":
            if distributed.is_distributed():
                distributed.refuse("a structure search")
            return search_(model, config, calib, device=device, batch_size=batch_size, cache_device=cache_device,
                           progress=progress, state_dir=state_dir, resume=resume)
        if method.scope == "state":
            return method.fn(model, calib, config, device=device, batch_size=batch_size, cache_device=cache_device,
                             progress=progress)
        if method.scope == "depth":
            return prune_depth_(model, config, calib, device=device, batch_size=batch_size,
                                cache_device=cache_device, progress=progress)
        return _prune_linear(model, method, config, calib, windows, device, sequential, batch_size, cache_device,
                             progress, compensate, residency)


def _prune_linear(model, method, config, calib, windows, device, sequential, batch_size, cache_device, progress,
                  compensate, residency) -> PruneReport:
    """Unstructured / N:M: the pre-passes, then the linear engine."""
    if sequential not in ("true", "block"):
        raise ValueError(f"sequential must be 'true' or 'block', got {sequential!r}")
    started = time.perf_counter()          # pre-passes (allocation, gradients) count as pruning time
    allocation = None
    if config.allocation != "uniform":
        allocation = allocate(model, config, calib, device=device, batch_size=batch_size,
                              cache_device=cache_device, progress=progress)
    groups = engine.plan(model, config, allocation.layers if allocation else None)
    if compensate is not None:
        check_rank_fits(compensate, [weight_view(layer.module).shape for block in groups for group in block
                                     for layer in group.layers])
    device = torch.device(device) if device is not None else model_device(model)
    cache_device = torch.device(cache_device) if cache_device is not None else device
    report = PruneReport(method=method.name, config=config, sequential=sequential,
                         calibration_windows=0 if windows is None else windows[0],
                         calibration_seqlen=0 if windows is None else windows[1],
                         allocation=allocation.to_dict() if allocation else None)
    options = engine.LinearOptions(
        device=device, cache_device=cache_device, residency=residency, sequential=sequential,
        batch_size=batch_size, progress=progress, windows=0 if windows is None else windows[0],
        observer=Hessian if config.needs_hessian or compensate is not None else method.stats,
        compensate=method_for_config(compensate).fn(compensate) if compensate is not None else None)
    gradient_mode = getattr(config, "gradient", None) if getattr(config, "uses_gradient", False) else None
    if gradient_mode == "model":
        options.gradients = gradients.model_gradients(
            model, calib, engine.layer_names(groups), samples=config.gradient_samples, device=device,
            progress=progress, first_window=distributed.offset(calib.shape[0]))
        options.grad_windows = min(config.gradient_samples, options.windows)
    elif gradient_mode == "block":
        options.block_gradients = gradients.block_gradients
    if method.prescore is not None:       # a whole-model pre-pass per layer (D-Pruner, LLM Surgeon's G): stats.grad
        options.gradients.update(method.prescore(model, calib, config, names=engine.layer_names(groups),
                                                 device=device, progress=progress))
    try:
        with one_malloc_arena():
            engine.prune_linear_(model, method, config, calib, groups, report, options)
    finally:
        if options.compensate is not None:
            options.compensate.remove_hooks()
    report.seconds = time.perf_counter() - started
    if compensate is not None:
        report.adapters = options.compensate.adapters
        if compensate.merge:
            merge_adapters_(model, report.adapters)
            log.warning("EoRA adapters merged into the weights: the pruned layers are dense again")
    return report
