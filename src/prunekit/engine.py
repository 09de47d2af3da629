"""The sequential engine: prune a model one decoder block at a time.

    capture   run the calibration windows through the embeddings once; record the input of
              block 0 and the keyword arguments every block receives (masks, rotary tables:
              sliding-window families use different ones per layer)
    per block onload it to the compute device, attach observers to its target linears,
              run the cached inputs through it, prune, keep the *pruned* outputs as the next
              block's inputs, offload it

Only one block is on the accelerator at a time; cached activations live on `cache_device`
(the compute device by default, "cpu" for the low-memory mode).

Two orders inside a block (`sequential`):
  "true"   each group of linears (q/k/v, then o, then gate/up, then down) is pruned as soon as
           every calibration window has reached it, so later groups observe the outputs of the
           already-pruned earlier ones. This costs a single forward pass per block: every window
           runs in its own thread, strictly one thread at a time (`_Lockstep`), and the threads
           meet before each group.
  "block"  every group observes the dense block, then all are pruned, then a second pass
           propagates the pruned outputs (what the reference SparseGPT and Wanda code do).

Around the method, per layer (each optional, each in its own module):
  allocation   a pre-pass picks every layer's sparsity under the global budget (`allocation.py`)
  gradients    for gradient scores (GBLM, Pruner-Zero): a full-model pre-pass, or per block (`gradients.py`)
  permutation  N:M with `permute`: the MLP's channels are reordered before the down projection is
               pruned, so the N:M groups keep more of the score (`permute.py`)
  update       re-fit the kept weights to the mask: OBS sweep or ADMM (`updates.py`)
  compensate   EoRA: a low-rank residual per layer from the same Hessian (`eora.py`); it joins the
               forward pass at once, so later layers calibrate on the compensated model
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import math
import sys
import threading
import time
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, nn

from . import distributed
from .masks import check_pruned
from .models import spec_for
from .models.spec import get_module, in_features, is_linear, weight_view
from .registry import method_for_config
from .stats import Hessian
from .updates import apply_update
from .report import LayerRecord, PruneReport, memory_now

log = logging.getLogger("prunekit")

PROBE_ROWS = 512  # calibration tokens kept per group to measure each layer's reconstruction error


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


@dataclass
class _Extras:
    """What the engine adds around the method for one run (see the module docstring)."""
    spec: object
    gradients: dict = field(default_factory=dict)     # layer name -> (out, in) gradient magnitude
    compensate: object = None                         # EoraConfig or None
    adapters: dict = field(default_factory=dict)      # layer name -> (B, A) low-rank residual
    hooks: list = field(default_factory=list)         # forward hooks that add the adapters
    bases: dict = field(default_factory=dict)         # the current group's eigenbasis of H (EoRA)
    windows: int = 0                                  # calibration windows the observers see
    grad_windows: int | None = None                   # windows the model gradients were summed over


def prune_(model: nn.Module, config, calib: Tensor | None = None, *, device: str | torch.device | None = None,
           sequential: str = "true", batch_size: int = 8, cache_device: str | torch.device | None = None,
           progress: bool = True, compensate=None, residency=None) -> PruneReport:
    """Prune `model` in place with `config` (e.g. `WandaConfig(sparsity=0.5)`).

    calib: (samples, seqlen) token ids from `calibration_data`; may be None only for data-free
    methods (magnitude). compensate: an `EoraConfig` to compute low-rank residuals in the same
    pass (they are returned in `report.adapters`, and merged if it says so). Returns a
    `PruneReport` (per-layer achieved sparsity, reconstruction error, time and memory per block).
    Raises if any layer does not hold the requested pattern. residency: where blocks live between
    their turns (`offload.InMemory` by default; `offload.OnDisk` streams them from a checkpoint).

    Distributed calibration: inside a torch.distributed process group of N > 1 processes
    (`distributed.init_from_env`, or your own `init_process_group`), give every process the same
    model and `calib`; each keeps its share of the windows, and the statistics are summed across
    processes before each layer is pruned, so every process ends with the same pruned model.
    """
    from .offload import current, using
    with using(residency if residency is not None else current()) as residency:
        return _prune(model, config, calib, device, sequential, batch_size, cache_device, progress, compensate,
                      residency)


def _prune(model, config, calib, device, sequential, batch_size, cache_device, progress, compensate, residency):
    """`prune_` with its residency active (`offload.current()` returns it to every pass)."""
    method = method_for_config(config)
    if (method.needs_calibration_for(config) or compensate is not None) and calib is None:
        raise ValueError(f"{method.name} needs calibration data: pass calib=calibration_data(tokenizer, ...)")
    if compensate is not None and method.scope != "linear":
        raise ValueError(f"EoRA compensates unstructured/N:M pruning; {method.name} removes whole "
                         "units, which changes the layers' shapes (put eora after a wanda/sparsegpt/... step)")
    windows = None if calib is None else tuple(calib.shape)   # the whole set, for the report
    if distributed.is_distributed():
        # every process was handed the same windows and keeps its share (see distributed.py)
        calib = distributed.shard(calib, batch_size)
    if method.scope == "width":       # remove heads / channels: structured.py drives its own pass
        from .structured import prune_width_
        return prune_width_(model, config, calib, device=device, batch_size=batch_size,
                            cache_device=cache_device, progress=progress)
    if method.scope == "depth":       # remove whole blocks
        from .depth import prune_depth_
        return prune_depth_(model, config, calib, device=device, batch_size=batch_size,
                            cache_device=cache_device, progress=progress)
    if sequential not in ("true", "block"):
        raise ValueError(f"sequential must be 'true' or 'block', got {sequential!r}")
    started = time.perf_counter()          # pre-passes (allocation, gradients) count as pruning time
    spec = spec_for(model)
    blocks = get_module(model, spec.blocks)
    allocation = None
    if config.allocation != "uniform":
        from .allocation import allocate
        allocation = allocate(model, config, calib, device=device, batch_size=batch_size,
                              cache_device=cache_device, progress=progress)
    plan = [_plan_block(spec, i, block, config, allocation) for i, block in enumerate(blocks)]
    if not any(plan):
        raise ValueError(f"targets={config.targets} ignore={config.ignore} select no linear layer in {spec.blocks}")
    device = torch.device(device) if device is not None else _model_device(model)
    cache_device = torch.device(cache_device) if cache_device is not None else device

    report = PruneReport(method=method.name, config=config, sequential=sequential,
                         calibration_windows=0 if windows is None else windows[0],
                         calibration_seqlen=0 if windows is None else windows[1],
                         allocation=allocation.to_dict() if allocation else None)
    extras = _Extras(spec, compensate=compensate, windows=0 if windows is None else windows[0])
    observer = Hessian if config.needs_hessian or compensate is not None else method.stats
    gradient_mode = getattr(config, "gradient", None) if getattr(config, "uses_gradient", False) else None
    if gradient_mode == "model":
        from .gradients import model_gradients
        names = [layer.name for groups in plan for group in groups for layer in group.layers]
        extras.gradients = model_gradients(model, calib, names, samples=config.gradient_samples, device=device,
                                           progress=progress, first_window=distributed.offset(calib.shape[0]))
        extras.grad_windows = min(config.gradient_samples, extras.windows)
    _one_malloc_arena()
    try:
        _prune_blocks(model, blocks, plan, method, config, calib, report, extras, observer, gradient_mode,
                      device, cache_device, sequential, batch_size, progress, residency)
    finally:
        for hook in extras.hooks:
            hook.remove()
    report.seconds = time.perf_counter() - started
    if compensate is not None:
        report.adapters = extras.adapters
        if compensate.merge:
            from .eora import merge_adapters_
            merge_adapters_(model, extras.adapters)
            log.warning("EoRA adapters merged into the weights: the pruned layers are dense again")
    return report


def _prune_blocks(model, blocks, plan, method, config, calib, report, extras, observer, gradient_mode,
                  device, cache_device, sequential, batch_size, progress, residency) -> None:
    """The block loop of `prune_` (capture, then observe / prune / propagate each block)."""
    with torch.no_grad():
        if calib is None:
            hidden, kwargs = None, None
        else:
            with residency.capturing(model, blocks):
                hidden, kwargs = _capture(model, blocks, calib, batch_size, device, cache_device)
        start, hidden = residency.resume(blocks, hidden)      # > 0 when a recorded run continues
        first_chunk = distributed.offset(len(hidden)) if hidden is not None else 0   # where this process's share starts
        if hidden is not None:
            report.memory_budget = _memory_budget(model, blocks, plan, hidden, sequential)
        bar = _progress(len(blocks), f"prune {method.name}", enabled=progress)
        bar.update(start)
        for index, block in enumerate(blocks):
            if index < start:
                plan[index] = []
                continue
            block_start = time.perf_counter()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            residency.onload(index, block, device)
            groups = plan[index]
            for group in groups:
                if observer is not None:
                    group.stats = observer(in_features(group.layers[0].module), device)
            if gradient_mode == "block":
                from .gradients import block_gradients
                step = BlockStep(index, block, hidden, [kw[index] for kw in kwargs], device, cache_device,
                                 first_chunk)
                with torch.enable_grad():
                    extras.gradients = block_gradients(step, {l.name: l.module for g in groups for l in g.layers})
            records: list[LayerRecord] = []
            prune = lambda group: records.extend(_prune_group(group, method, config, index, device, block, extras))  # noqa: E731
            if hidden is None:
                for group in groups:
                    prune(group)
            else:
                # of all windows (every process's): the same probe rows as a single process
                probe_every = max(1, math.ceil(extras.windows * calib.shape[1] / PROBE_ROWS))
                hidden = _run_block(block, groups, hidden, [kw[index] for kw in kwargs], device, cache_device,
                                    sequential, prune, probe_every)
                _check_finite_outputs(hidden, index, f"{extras.spec.blocks}.{index}")
            residency.offload(index, block)
            del groups  # frees observers and probes
            plan[index] = []
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
        widest = max((in_features(g.layers[0].module) for groups in plan for g in groups), default=0)
        cache += tokens * (hidden_size + widest) * 4
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    block = max(sum(p.numel() * p.element_size() for p in b.parameters()) for b in blocks)
    return {"model_mb": round(model_bytes / mb), "block_mb": round(block / mb), "activations_mb": round(cache / mb),
            "budget_mb": round(1.2 * (model_bytes + block + cache) / mb)}


def _one_malloc_arena() -> None:
    """glibc gives every thread its own malloc arena and keeps freed memory in it; with one thread
    per calibration chunk that raises peak RSS. One shared arena measured on SmolLM2, 64 windows:
    peak 2.6 -> 2.3 GB and 7% faster. (A fixed 4 MB mmap threshold reached 1.6 GB and malloc_trim
    after each block saved 15%, but both cost 10-20% in page faults, so neither is used; see
    BENCHMARKS.md.) No-op off glibc."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(-8, 1)   # M_ARENA_MAX = 1


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") else None
    except OSError:
        return None


def _plan_block(spec, index: int, block: nn.Module, config, allocation=None) -> list[_Group]:
    groups = []
    for names in spec.groups:
        layers = []
        for name in names:
            full = f"{spec.blocks}.{index}.{name}"
            module = get_module(block, name)
            if not is_linear(module):
                raise TypeError(f"{full} is a {type(module).__name__}, not a linear layer; fix the model spec")
            sparsity, nm = config.sparsity_for(full), None
            if allocation is not None and full in allocation.layers:
                sparsity, nm = allocation.layers[full]
            if sparsity:
                layers.append(_Layer(full, module, sparsity, nm))
        if layers:
            permutable = spec.channels is not None and names == (spec.channels.consumer,)
            groups.append(_Group(layers, permutable=permutable))
    return groups


def _prune_group(group: _Group, method, config, block_index: int, device, block=None,
                 extras: _Extras | None = None) -> list[LayerRecord]:
    """Apply the method to every layer of the group, write the weights back, verify them."""
    group.pruned = True
    # Distributed calibration: the one place where the processes' observers are summed, so every
    # process decides from the statistics of all windows (a no-op in a single process). Every
    # process prunes the same groups in the same order, so these collectives always pair up; in
    # true-sequential mode only the last lockstep thread of each process gets here (the others
    # wait at the meeting point), so each process issues each collective exactly once.
    distributed.reduce_stats_(group.stats)
    _check_finite_statistics(group, block_index)        # all processes' sums; before any weight of the group is written
    if group.permutable and getattr(config, "permute", False) and config.nm and method.score is not None:
        _permute(group, method, config, block, extras.spec, device)
    X = torch.cat(group.probe) if group.probe else None                       # (rows, in)
    records = []
    for layer in group.layers:
        start = time.perf_counter()
        stored = weight_view(layer.module)                                     # (out, in), storage dtype
        W = stored.detach().to(device=device, dtype=torch.float32, copy=True)
        zeros_before = int((W == 0).sum())
        layer_config = replace(config, sparsity=layer.sparsity, nm=layer.nm or config.nm)
        stats = group.stats
        if extras is not None and layer.name in extras.gradients:
            from .gradients import WithGradient
            stats = WithGradient(group.stats, extras.gradients.pop(layer.name).to(device),
                                 windows=extras.windows, grad_windows=extras.grad_windows)
            if not torch.isfinite(stats.grad).all():
                raise NonFiniteError(f"block {block_index}, {layer.name}: the gradient statistics hold NaN/Inf "
                                     "(the loss overflowed? check the calibration data; use dtype float32)")
        W_new = apply_update(W, method.fn(W, stats, layer_config), group.stats, layer_config)
        if not torch.isfinite(W_new).all():
            raise NonFiniteError(f"block {block_index}, {layer.name}: the pruned weight has NaN/Inf "
                                     "(check the calibration data and the model dtype)")
        stored.copy_(W_new.to(stored.dtype))
        distributed.broadcast_(stored)     # identical already (same statistics); this makes it certain
        if extras is not None and extras.compensate is not None:
            _compensate(layer, W, stored.float(), group.stats, extras)
        error = None
        if X is not None:      # ||X (W - W')|| / ||X W|| over the probe rows of every process
            moved, total = distributed.all_sum(float((X @ (W - stored.float()).T).square().sum()),
                                               float((X @ W.T).square().sum()))
            error = math.sqrt(moved / max(total, 1e-24))
        note = _solver_note(group.stats, layer_config)
        if note:
            log.warning("%s: %s", layer.name, note)
        problem = check_pruned(stored, layer_config.sparsity, layer_config.nm, config.per, zeros_before,
                               layer_zeros=config.layer_zeros(*stored.shape, layer_config.sparsity))
        records.append(LayerRecord(name=layer.name, block=block_index, requested=layer.sparsity,
                                   zeros=int((stored == 0).sum()), numel=stored.numel(), error=error,
                                   seconds=round(time.perf_counter() - start, 4), note=note, problem=problem))
    group.stats = None
    group.probe = []
    return records


class NonFiniteError(FloatingPointError):
    """NaN or Inf in activations, statistics or pruned weights; the message names the block and
    module. Raised before the affected weights are written, and before anything is exported."""


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


def _check_finite_outputs(hidden: list[Tensor], block_index: int, block_name: str) -> None:
    """A block's propagated outputs must be finite, or every later block calibrates on NaN."""
    for chunk, outputs in enumerate(hidden):
        if not bool(torch.isfinite(outputs).all()):
            raise NonFiniteError(f"block {block_index} ({block_name}) produced NaN/Inf outputs on calibration "
                                 f"chunk {chunk}; stopping before the next block. Check the model dtype "
                                 "(float16 overflows: use float32 or bfloat16) and the weights of this block")


def _solver_note(stats, layer_config) -> str | None:
    """The Hessian solver's note for this layer (dampening raised, or the diagonal fallback),
    for the OBS sweep of SparseGPT or of `update: obs`."""
    if not hasattr(stats, "inverse_cholesky"):
        return None
    damp = getattr(layer_config, "damp", None)
    if damp is None and getattr(layer_config, "update", None) == "obs":
        from .methods.sparsegpt import SparseGPTConfig
        damp = SparseGPTConfig.damp                      # what `apply_update` builds its sweep with
    return None if damp is None else stats.inverse_cholesky(damp)[2]


def _permute(group: _Group, method, config, block, spec, device) -> None:
    """Reorder the MLP's channels so that N:M keeps more of the method's score (RIA's channel
    permutation); the observer and probe follow, and `group.perm` tells the suspended chunks."""
    from .permute import nm_permutation
    from .structured import permute_channels_
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


def _compensate(layer: _Layer, W_dense: Tensor, W_pruned: Tensor, stats, extras: _Extras) -> None:
    """EoRA residual for this layer; a forward hook adds it from now on (later layers calibrate
    on the compensated model, as it will run)."""
    from .eora import eigen_basis, eora_factors, layer_rank, residual_hook
    rank = layer_rank(extras.compensate, *W_dense.shape)
    if id(stats) not in extras.bases:                                        # q/k/v share one H: one eigh
        extras.bases = {id(stats): eigen_basis(stats.H)}
    B, A = eora_factors(W_dense - W_pruned, stats.H, rank, basis=extras.bases[id(stats)])   # (out, r), (r, in)
    extras.adapters[layer.name] = (B.cpu(), A.cpu())
    extras.hooks.append(layer.module.register_forward_hook(residual_hook(B, A)))


def _run_block(block, groups, hidden, kwargs, device, cache_device, sequential, prune, probe_every):
    """Observe and prune one block; return its pruned outputs (one tensor per calibration chunk)."""
    group_of = {}   # module -> its group; whichever layer of a group runs first observes the shared input
    for group in groups:
        for layer in group.layers:
            group_of[layer.module] = group
    lockstep = _Lockstep(len(hidden)) if sequential == "true" else None
    seen = threading.local()

    def observe(module, args):
        group = group_of[module]
        if id(group) in seen.groups:                       # k/v after q: same input, already observed
            return
        seen.groups.add(id(group))
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
            args, kw = _to_device(kwargs[i], device)
            out = block(hidden[i].to(device), *args, **kw)
        if record and lockstep is None:
            return                                    # block order: pass 1 only observes
        hidden[i] = _keep(hidden[i], (out[0] if isinstance(out, tuple) else out), cache_device)

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


def _keep(old: Tensor, new: Tensor, cache_device) -> Tensor:
    """The chunk's output becomes the next block's input. A memory-mapped (spilled, see
    offload.spill) cache is overwritten in place so that it stays in the page cache, not in
    anonymous memory; otherwise the output simply replaces the input."""
    if getattr(old, "spilled", False) and old.shape == new.shape:
        old.copy_(new)
        return old
    return new.to(cache_device)


class BlockStep:
    """One decoder block during `block_stream`: on the compute device, with its cached inputs."""

    def __init__(self, index, block, inputs, kwargs, device, cache_device, first_chunk: int = 0):
        self.index, self.block, self.inputs = index, block, inputs
        self.kwargs, self.device, self.cache_device = kwargs, device, cache_device
        # global number of chunk 0: under distributed calibration this process holds chunks
        # first_chunk, first_chunk + 1, ... of the whole set (seeds per chunk use the global number)
        self.first_chunk = first_chunk
        self.outputs: list[Tensor] | None = None
        self.changed = False      # set it when the caller changed the block: out of core it is written back

    def run_chunk(self, i: int, hidden: Tensor | None = None, block: nn.Module | None = None) -> Tensor:
        """Block output for calibration chunk i (its cached input, or `hidden`), on the compute
        device. Grad mode is the caller's; `block` runs another block with this one's arguments."""
        args, kw = _to_device(self.kwargs[i], self.device)
        x = (self.inputs[i] if hidden is None else hidden).to(self.device)
        out = (block or self.block)(x, *args, **kw)
        return out[0] if isinstance(out, tuple) else out

    def forward(self) -> list[Tensor]:
        """Run every chunk; the outputs (on the cache device) become the next block's inputs."""
        with torch.no_grad():
            self.outputs = [self.run_chunk(i).to(self.cache_device) for i in range(len(self.inputs))]
        return self.outputs


def block_stream(model: nn.Module, calib: Tensor, *, device=None, batch_size: int = 8, cache_device=None,
                 progress: bool = True, desc: str = "blocks"):
    """Yield a `BlockStep` per decoder block, in order, with only that block on `device`.

    The caller observes (hooks, `run_chunk`) and may change the block (then it sets
    `step.changed`); whatever `step.outputs` holds when the caller moves on (`step.forward()` is
    called if it did not) feeds the next block. Blocks come and go through the current residency
    (`offload.current()`): moved to `device` and back, or read from and written to disk.
    Structured, depth and scoring passes share this loop instead of copying it.
    """
    from .offload import current
    residency = current()          # where blocks come from and go back to (offload.py)
    spec = spec_for(model)
    blocks = get_module(model, spec.blocks)
    device = torch.device(device) if device is not None else _model_device(model)
    cache_device = torch.device(cache_device) if cache_device is not None else device
    with torch.no_grad(), residency.capturing(model, blocks):
        hidden, kwargs = _capture(model, blocks, calib, batch_size, device, cache_device)
    hidden = residency.keep(hidden)         # out of core: memory-mapped files
    first_chunk = distributed.offset(len(hidden))
    bar = _progress(len(blocks), desc, enabled=progress)
    try:
        for index, block in enumerate(blocks):
            residency.load(block, device)
            step = BlockStep(index, block, hidden, [kw[index] for kw in kwargs], device, cache_device, first_chunk)
            yield step
            if step.outputs is None:
                step.forward()
            _check_finite_outputs(step.outputs, index, f"{spec.blocks}.{index}")
            hidden = step.outputs = residency.keep(step.outputs)
            residency.unload(block, changed=step.changed)
            bar.update(1)
    finally:
        bar.close()


class _Lockstep:
    """Run fn(i) for i in range(n), each in its own thread, strictly one thread at a time.

    A thread that calls `meet(point, action)` hands over to the next thread; the last thread to
    arrive runs `action()` (prune the group whose input everybody has now seen) and hands back to
    thread 0, so all threads continue past the point with the pruned weights. The order is fixed
    (0, 1, ..., n-1 at every point), so results are deterministic.
    """

    def __init__(self, n: int):
        self.n = n
        self.turn = 0
        self.cond = threading.Condition()
        self.failure: BaseException | None = None
        self.points: list = []         # meeting points in the order thread 0 reached them
        self.local = threading.local()

    def run(self, fn) -> None:
        threads = [threading.Thread(target=self._worker, args=(i, fn), daemon=True) for i in range(self.n)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if self.failure is not None:
            raise self.failure

    def meet(self, point, action) -> None:
        i, k = self.local.index, self.local.count
        self.local.count += 1
        if i == 0:
            self.points.append(point)
        elif k >= len(self.points) or self.points[k] is not point:
            raise RuntimeError("calibration chunks took different paths through the block "
                               "(data-dependent routing?); use sequential='block'")
        if i == self.n - 1:
            action()
        self._hand_over(i)
        self._wait(i)

    def _worker(self, i: int, fn) -> None:
        self.local.index, self.local.count = i, 0
        try:
            self._wait(i)
            fn(i)
            if self.local.count != len(self.points):
                raise RuntimeError("calibration chunks took different paths through the block; use sequential='block'")
        except _Aborted:
            return
        except BaseException as err:  # noqa: BLE001 - handed to the main thread
            with self.cond:
                self.failure = self.failure or err
                self.cond.notify_all()
            return
        self._hand_over(i)

    def _wait(self, i: int) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.turn == i or self.failure is not None)
            if self.failure is not None:
                raise _Aborted

    def _hand_over(self, i: int) -> None:
        with self.cond:
            self.turn = (i + 1) % self.n
            self.cond.notify_all()


class _Aborted(Exception):
    """Another lockstep thread failed; this one stops quietly."""


class _StopForward(Exception):
    """Raised by the capture stubs to end the embedding pass before the LM head."""


def _capture(model, blocks, calib: Tensor, batch_size: int, device, cache_device):
    """Inputs of block 0 and every block's other arguments, as (args, kwargs), per calibration chunk.

    Each block's forward is replaced by a stub that records its kwargs and returns its input
    unchanged, so one cheap pass (embeddings, masks, rotary tables) yields the per-block kwargs.
    The stub mimics the block's return type, learned by running block 0 once on the first chunk
    (on the compute device, where one block forward is cheap).
    """
    chunks = list(calib.split(batch_size))
    inputs: list[Tensor] = []
    kwargs: list[list[tuple[tuple, dict]]] = []
    embed_device = _model_device(model)
    returns_tuple = None
    current: list[tuple[tuple, dict]] = []

    def stub_for(index: int):
        def stub(hidden_states, *args, **kw):
            current.append((args, kw))
            if index == 0:
                inputs.append(hidden_states.to(cache_device))
                if returns_tuple is None:
                    raise _StopForward
            if index == len(blocks) - 1:
                raise _StopForward
            return (hidden_states,) if returns_tuple else hidden_states
        return stub

    try:
        for index, block in enumerate(blocks):
            block.forward = stub_for(index)
        for chunk_index, chunk in enumerate(chunks):
            if returns_tuple is None:        # learn the blocks' return type from the real block 0
                try:
                    model(input_ids=chunk.to(embed_device), use_cache=False)
                except _StopForward:
                    pass
                del blocks[0].forward
                args, kw = _to_device(current[0], device)
                home = _module_device(blocks[0])
                probe = blocks[0].to(device)(inputs[0].to(device), *args, **kw)
                blocks[0].to(home)
                returns_tuple = isinstance(probe, tuple)
                del probe
                blocks[0].forward = stub_for(0)
                inputs.clear()
                current.clear()
            try:
                model(input_ids=chunk.to(embed_device), use_cache=False)
            except _StopForward:
                pass
            if len(current) != len(blocks):
                raise RuntimeError(f"the model called {len(current)} of its {len(blocks)} blocks during capture")
            kwargs.append(current)
            current = []
    finally:
        for block in blocks:
            block.__dict__.pop("forward", None)
    return inputs, kwargs


def _to_device(value, device):
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(v, device) for v in value)
    return value


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _module_device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit="block", disable=not enabled)
