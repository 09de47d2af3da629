"""Width pruning: remove whole attention heads and MLP channels, so the result is a physically
smaller dense model (fewer heads, a narrower FFN) that every runtime runs faster.

A block's width is two coupled groups, declared in the model spec (`models/spec.py`):

    heads     q/k/v rows (producers) -> o columns (consumer); head_dim rows/columns per head
    channels  gate/up rows (producers) -> down columns (consumer); one row/column per channel

A *unit* is what is removed at once: a query head ("query" mode: the same number of query heads
leaves every KV group, so `num_attention_heads % num_key_value_heads == 0` still holds), a whole
KV group with its query heads ("kv" mode; for multi-head attention this is one head), or an FFN
channel.

`prune_width_` (called by `prune.prune_` for methods registered with `scope="width"`):

  1. scores   the method maps (Coupled, stats, cfg) -> one score per unit, or one per consumer
              column (averaged per unit). Activation statistics are observed on the consumer's
              input (o_proj / down_proj) in a block-by-block calibration pass
              (`core.stream.block_stream`); gradient scores backpropagate through one block at a time.
  2. select   uniform: every block loses the same share; attention the nearest whole number of
              units, the MLP the rest of the parameter budget. Non-uniform: FLAP's adaptive
              search, scores standardized per block and group, then one global ranking in which
              each unit counts with its parameter cost. Kept channels are rounded to a multiple of
              `round_to` (GEMM-friendly); query heads stay a multiple of the KV heads.
  3. remove   slice rows and columns, update the attention modules' head counts, optionally
              compensate the consumer for its removed inputs (`compensate`, below), and rewrite
              the config when every block has the same widths (a stock checkpoint).

Compensation (`WidthConfig.compensate`, any width method; the statistic it needs is observed on
the consumer's input in the same calibration pass as the method's own):

    bias   FLAP (arXiv 2312.11983): the removed inputs' mean contribution W[:, R] @ mean(X_R) goes
           into the consumer's output bias (added to the config when the family has a flag)
    liar   LIAR (arXiv 2407.13331): the kept columns are re-fitted by least squares so that X_K
           reproduces the removed inputs' contribution, B = (X_K^T X_K + lambda I)^-1 X_K^T X_R W_R^T
           and W_K += B^T, from the consumer input's second moment X^T X (`liar_update`)
    auto   the default: "bias" for a config with `bias: true` (FLAP's own switch), else "none"

In non-uniform mode every block's compensation statistics wait for the global selection (for
liar, X^T X of o_proj's and down_proj's inputs per block: 12 bytes x columns^2 each).

A method may also score every block at once from whole-model passes before the block loop (Bonsai):
it registers `prescore(model, calib, cfg, *, device, batch_size, cache_device, progress) ->
{block index: [scores per coupled group]}`, and its `fn(group, scores, cfg)` receives that group's
scores where other methods receive their observer; a method with both an observer and a prescore
(the structured LLM Surgeon: X^T X from the block stream, G from a whole-model backward pass)
receives the pair `(observer, prescored)`. In uniform mode each group's `target_keep` is set before
it is scored, for methods that remove in rounds (the LLM Surgeon's shots).

Uniform mode prunes each block as soon as it is scored and propagates the pruned outputs (later
blocks see what they will see at inference). Non-uniform mode needs every score before it can
choose, so it scores on the dense model, like FLAP's reference code.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .core.residency import current
from .core.stream import NonFiniteError, block_stream, model_device, progress_bar
from .models import spec_for
from .models.spec import get_module, weight_view
from .registry import method_for_config
from .stats import Hessian, MeanVar
from .surgery import block_widths, enable_bias, head_counts, keep_columns_, keep_rows_, \
    set_head_counts, write_config
from .report import StructureReport, parameter_counts

log = logging.getLogger("prunekit")


@dataclass(frozen=True)
class WidthConfig:
    """Shared fields of the width-pruning methods (magnitude-sp, wanda-sp, flap, taylor, amp, bonsai)."""
    sparsity: float = 0.25        # fraction of the decoder blocks' parameters to remove
    uniform: bool = True          # same share in every block; False: global (adaptive) allocation
    round_to: int = 8             # kept FFN channels are a multiple of this (64/128 for big GEMMs)
    heads: str = "auto"           # "query", "kv", or "auto" (query heads for GQA, whole heads for MHA)
    round_heads: bool = True      # round removed query heads to whole multiples of the KV heads
    attention: bool = True        # prune attention heads
    mlp: bool = True              # prune FFN channels
    compensate: str = "auto"      # "none", "bias" (FLAP), "liar" (least squares); auto: bias iff `bias: true`
    liar_damp: float = 0.01       # compensate=liar: ridge lambda on X_K^T X_K, times its mean diagonal

    def __post_init__(self):
        if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float)) or not 0 <= self.sparsity < 1:
            raise ValueError(f"sparsity must be a number in [0, 1) (fraction of block parameters), "
                             f"got {self.sparsity!r}")
        if not isinstance(self.round_to, int) or self.round_to < 1:
            raise ValueError(f"round_to must be a positive integer (e.g. 8, 64, 128), got {self.round_to!r}")
        if self.heads not in ("auto", "query", "kv"):
            raise ValueError(f"heads must be 'auto', 'query' or 'kv', got {self.heads!r}")
        if not (self.attention or self.mlp):
            raise ValueError("attention=false and mlp=false leave nothing to prune")
        if self.compensate not in COMPENSATIONS:
            raise ValueError(f"compensate must be one of {', '.join(COMPENSATIONS)}, got {self.compensate!r}")
        if self.compensate == "bias" and getattr(self, "bias", True) is False:
            raise ValueError("compensate=bias contradicts bias=false; give one of them")
        if isinstance(self.liar_damp, bool) or not isinstance(self.liar_damp, (int, float)) or self.liar_damp < 0:
            raise ValueError(f"liar_damp must be a number >= 0 (e.g. 0.01), got {self.liar_damp!r}")

    @property
    def compensation(self) -> str:
        """What the driver does after removing units: "none", "bias" or "liar" ("auto" resolved)."""
        if self.compensate != "auto":
            return self.compensate
        return "bias" if getattr(self, "bias", False) else "none"


COMPENSATIONS = ("auto", "none", "bias", "liar")


@dataclass
class Coupled:
    """One coupled group of one block, as score functions see it.

    `producers` are (module, row_units) pairs: row_units[r] is the unit that output row r belongs
    to, or -1 for rows that stay whatever is removed (k/v rows in "query" mode).
    `column_units[c]` is the unit of consumer input column c.
    """
    kind: str                                    # "heads" or "channels"
    block: int
    units: int
    producers: list[tuple[nn.Module, Tensor]]
    consumer: nn.Module
    column_units: Tensor                         # (columns,)
    per_group: int                               # units per KV group whose removal must be equal; 1 = free
    cost: int                                    # parameters removed with one unit
    head_dim: int = 1
    name: str = ""                               # the consumer's module name, for messages
    target_keep: int | None = None               # units the driver keeps (uniform mode, set before scoring)

    def weights(self) -> tuple[list[Tensor], Tensor]:
        """(producer weights, consumer weight), each a float32 (out, in) tensor."""
        return ([weight_view(m).detach().float() for m, _ in self.producers],
                weight_view(self.consumer).detach().float())

    def unit_sum(self, column_values: Tensor) -> Tensor:
        """Sum per-column values into per-unit values, (columns,) -> (units,)."""
        out = torch.zeros(self.units, dtype=column_values.dtype, device=column_values.device)
        return out.index_add_(0, self.column_units.to(column_values.device), column_values)

    def row_sum(self, index: int, row_values: Tensor) -> Tensor:
        """Sum per-row values of producer `index` into per-unit values (rows of no unit dropped)."""
        rows = self.producers[index][1].to(row_values.device)
        keep = rows >= 0
        out = torch.zeros(self.units, dtype=row_values.dtype, device=row_values.device)
        return out.index_add_(0, rows[keep], row_values[keep])


# ----------------------------------------------------------------------------- geometry


def coupled_groups(model: nn.Module, index: int, block: nn.Module, cfg: WidthConfig) -> list[Coupled]:
    """The block's coupled groups that `cfg` prunes, read from the modules' current shapes."""
    spec = spec_for(model)
    groups = []
    if cfg.attention and spec.heads is not None:
        groups.append(_heads(spec, model.config, index, block, cfg))
    if cfg.mlp and spec.channels is not None:
        groups.append(_channels(spec, index, block))
    return groups


def _bias_numel(module: nn.Module) -> int:
    return 1 if getattr(module, "bias", None) is not None else 0


def _heads(spec, config, index: int, block: nn.Module, cfg: WidthConfig) -> Coupled:
    h = spec.heads
    n_heads, n_kv, hd = head_counts(spec, config, block)
    o, q = get_module(block, h.o), get_module(block, h.q)
    hidden, q_in = weight_view(o).shape[0], weight_view(q).shape[1] + _bias_numel(q)
    per_kv = n_heads // n_kv
    mode = cfg.heads if cfg.heads != "auto" else ("query" if per_kv > 1 else "kv")
    q_head = torch.arange(n_heads * hd) // hd                                 # query head of each q row
    kv_head = torch.arange(n_kv * hd) // hd
    if mode == "query":                 # unit = query head; k/v rows stay
        units, q_units, kv_units, per_group = n_heads, q_head, torch.full_like(kv_head, -1), per_kv
        cost = hd * q_in + hd * hidden
    else:                               # unit = KV group: its k/v rows and its query heads
        units, q_units, kv_units, per_group = n_kv, q_head // per_kv, kv_head, 1
        cost = (per_kv + 2) * hd * q_in + per_kv * hd * hidden
    if h.fused:
        producers = [(q, torch.cat([q_units, kv_units, kv_units]))]
    else:
        producers = [(q, q_units), (get_module(block, h.k), kv_units), (get_module(block, h.v), kv_units)]
    return Coupled("heads", index, units, producers, o, q_units.clone(), per_group, cost, hd,
                   f"{spec.blocks}.{index}.{h.o}")


def _channels(spec, index: int, block: nn.Module) -> Coupled:
    c = spec.channels
    consumer = get_module(block, c.consumer)
    n = weight_view(consumer).shape[1]
    producers = []
    cost = weight_view(consumer).shape[0]
    for name in c.producers:
        module = get_module(block, name)
        producers.append((module, torch.arange(n * c.fused) % n))
        cost += c.fused * (weight_view(module).shape[1] + _bias_numel(module))
    return Coupled("channels", index, n, producers, consumer, torch.arange(n), 1, cost,
                   name=f"{spec.blocks}.{index}.{c.consumer}")


# ----------------------------------------------------------------------------- the pass

def prune_width_(model: nn.Module, config: WidthConfig, calib: Tensor | None = None, *, device=None,
                 batch_size: int = 8, cache_device=None, progress: bool = True) -> StructureReport:
    """Remove `config.sparsity` of the decoder blocks' parameters as whole heads and channels."""

    method = method_for_config(config)
    spec = spec_for(model)
    if spec.heads is None and spec.channels is None:
        raise ValueError(f"the {model.config.model_type} spec declares no heads/channels to prune by width")
    block_before, model_before = parameter_counts(model)
    started = time.perf_counter()
    blocks = get_module(model, spec.blocks)
    device = torch.device(device) if device is not None else model_device(model)
    report = StructureReport(method.name, config, block_before, 0, model_before, 0)
    budget = _Budget(config, [_block_params(b) for b in blocks])
    pending = []      # non-uniform: every block's scores and compensation statistics until all are scored
    compensation = config.compensation
    if compensation != "none" and calib is None:
        raise ValueError(f"compensate={compensation} needs calibration data: pass calib=calibration_data(...)")
    extra = _compensation_observer(method, compensation)
    prescores = None
    if method.prescore is not None:          # whole-model passes score every block first (Bonsai)
        prescores = method.prescore(model, calib, config, device=device, batch_size=batch_size,
                                    cache_device=cache_device, progress=progress)

    def visit(index: int, block: nn.Module, step=None) -> bool:
        """Score one block; in uniform mode also prune it. True if the block changed."""
        groups = coupled_groups(model, index, block, config)
        n_keep = budget.uniform(index, groups) if config.uniform else None
        for group, keep in zip(groups, n_keep or []):
            group.target_keep = keep                     # a method that removes in rounds needs its count
        stats, observed = _observe(step, groups, method, extra) if step is not None else ([None] * len(groups),) * 2
        inputs = stats
        if prescores is not None:       # a method with an observer and a prescore gets (observer, prescore) pairs
            inputs = prescores[index] if method.stats is None else list(zip(stats, prescores[index]))
        scores = [_unit_scores(g, method.fn(g, x, config), standardize=not config.uniform)
                  for g, x in zip(groups, inputs)]
        if not config.uniform:
            pending.append((index, groups, scores, observed))
            return False
        _remove(model, groups, scores, n_keep, observed, config, report)
        return True

    residency = current()            # blocks move to `device` and back, or stream from disk (core/residency.py)
    if (method.needs_calibration and (prescores is None or method.stats is not None)) or compensation != "none":
        for step in block_stream(model, calib, device=device, batch_size=batch_size, cache_device=cache_device,
                                 progress=progress, desc=f"score {method.name}"):
            if visit(step.index, step.block, step):
                step.outputs = None          # run again: the next block sees the pruned outputs
                step.changed = True
    else:
        bar = progress_bar(len(blocks), f"score {method.name}", enabled=progress)
        for index, block in enumerate(blocks):
            residency.load(block, device)
            residency.unload(block, changed=visit(index, block))
            bar.update(1)
        bar.close()

    if pending:
        for (index, groups, scores, stats), n_keep in zip(pending, budget.global_selection(pending)):
            residency.load(blocks[index], device)
            _remove(model, groups, scores, n_keep, stats, config, report)
            residency.unload(blocks[index], changed=True)

    write_config(model)
    report.block_params_after, report.model_params_after = parameter_counts(model)
    report.widths = block_widths(model)
    report.seconds = time.perf_counter() - started
    log.info("%s: removed %.2f%% of the block parameters", method.name, 100 * report.removed_fraction)
    return report


def _block_params(block: nn.Module) -> int:
    return sum(p.numel() for p in block.parameters())


def _compensation_observer(method, compensation: str) -> type | None:
    """The observer that compensation needs beside the method's own, or None if the method's
    observer already holds it (FLAP's MeanVar has the mean; a Hessian method has X^T X)."""
    if compensation == "bias" and not hasattr(method.stats, "mean"):
        return MeanVar
    if compensation == "liar" and not (isinstance(method.stats, type) and issubclass(method.stats, Hessian)):
        return Hessian
    return None


def _observe(step, groups: list[Coupled], method, extra: type | None = None) -> tuple[list, list]:
    """Run the calibration chunks through the block once (one forward pass, every hook in it).

    Returns (the method's observer per group, the observer compensation reads per group): the
    latter is the `extra` observer when one is needed, else the method's own."""
    from .distributed import reduce_stats_
    own = [None] * len(groups)
    needs_grad = getattr(method.stats, "needs_grad", False)
    if needs_grad:
        own = _observe_gradients(step, groups, method.stats)
    classes = [c for c in ((None if needs_grad else method.stats), extra) if c is not None]
    observed = _observe_inputs(step, groups, classes)       # the forward pass that feeds the next block
    if method.stats is not None and not needs_grad:
        own = [per_group[0] for per_group in observed]
    added = [per_group[-1] for per_group in observed] if extra is not None else own
    for observer in {id(o): o for o in [*own, *added] if o is not None}.values():
        reduce_stats_(observer)     # distributed calibration: sum the processes' statistics before scoring
    return own, added


def _new_observer(stats_cls, group: Coupled, device):
    """An observer of the group's consumer input; one that needs the group's geometry or weights
    (AMP's projections) is built by its `for_group(group, device)`."""
    if hasattr(stats_cls, "for_group"):
        return stats_cls.for_group(group, device)
    return stats_cls(weight_view(group.consumer).shape[1], device)


def _observe_inputs(step, groups: list[Coupled], classes: list[type]) -> list[list]:
    """Observers of each group's consumer input (one per class in `classes`), fed by one forward
    pass over every calibration chunk; with no classes, just that forward pass."""
    stats = [[_new_observer(cls, g, step.device) for cls in classes] for g in groups]
    if not classes:
        step.forward()
        return stats
    by_module = {g.consumer: observers for g, observers in zip(groups, stats)}

    def hook(module, args):
        for observer in by_module[module]:
            observer.update(args[0])

    handles = [g.consumer.register_forward_pre_hook(hook) for g in groups]
    try:
        step.forward()
    finally:
        for handle in handles:
            handle.remove()
    return stats


def _observe_gradients(step, groups: list[Coupled], stats_cls) -> list:
    """Backpropagate through this block only, one calibration chunk at a time: the observer
    defines the loss on the block's output (`loss`) and reads the weights' gradients (`update`)."""
    stats = [stats_cls(g) for g in groups]
    params = list(step.block.parameters())
    was = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    try:
        for i in range(len(step.inputs)):
            with torch.enable_grad():
                stats[0].loss(step.run_chunk(i), step.index, step.first_chunk + i).backward()
            for s in stats:
                s.update()
            for p in params:
                p.grad = None
    finally:
        for p, flag in zip(params, was):
            p.requires_grad_(flag)
    return stats          # the caller runs the forward pass that feeds the next block (`_observe_inputs`)


def _unit_scores(group: Coupled, scores: Tensor, standardize: bool) -> Tensor:
    """Per-unit scores from a method's output (per unit, or per consumer column: averaged).

    With `standardize` (non-uniform selection) the values are z-scored within this block and
    group first, as FLAP's reference does before its global ranking (per column, then averaged
    per head).
    """
    scores = scores.detach().double().cpu()
    columns = group.column_units.numel()
    if scores.numel() not in (group.units, columns):
        raise ValueError(f"a {group.kind} score needs {group.units} (per unit) or {columns} (per column) values, "
                         f"got {scores.numel()}")
    if not torch.isfinite(scores).all():
        # ranked, a NaN/Inf score (NaN activations, statistics or gradients) would remove arbitrary units
        raise NonFiniteError(f"block {group.block}, {group.name} ({group.kind}): the scores hold NaN/Inf (the "
                             "calibration activations, statistics or gradients are not finite); nothing of this "
                             "block was removed. Check the calibration text and the model dtype (float16 "
                             "overflows: use float32 or bfloat16)")
    if standardize and scores.numel() > 1:
        scores = (scores - scores.mean()) / scores.std().clamp_min(1e-12)
    if scores.numel() == group.units:
        return scores
    return group.unit_sum(scores) / group.unit_sum(torch.ones_like(scores))


# ----------------------------------------------------------------------------- selection

class _Budget:
    """Turns `sparsity` (a fraction of block parameters) into the number of units each group keeps."""

    def __init__(self, cfg: WidthConfig, block_params: list[int]):
        self.cfg = cfg
        self.block_params = block_params

    def uniform(self, index: int, groups: list[Coupled]) -> list[int]:
        """Every block loses `sparsity` of its parameters: attention the feasible number of units
        nearest to its share, the MLP the rest (kept channels rounded to `round_to`)."""
        sparsity = (self.cfg.block_sparsity(index, len(self.block_params)) if hasattr(self.cfg, "block_sparsity")
                    else self.cfg.sparsity)             # a config may give each block its own share (SEAP)
        target = sparsity * self.block_params[index]
        heads = next((g for g in groups if g.kind == "heads"), None)
        channels = next((g for g in groups if g.kind == "channels"), None)
        removed = {"heads": 0, "channels": 0}
        if heads is not None:
            share = target if channels is None else sparsity * _total_params(heads)
            removed["heads"] = self._heads_to_remove(heads, share, spill=channels is not None)
        if channels is not None:
            rest = max(0.0, target - removed["heads"] * (heads.cost if heads is not None else 0))
            removed["channels"] = channels.units - self._round_channels(channels, channels.units - rest / channels.cost)
        return [g.units - removed[g.kind] for g in groups]

    def _heads_to_remove(self, group: Coupled, share: float, spill: bool = False) -> int:
        """The number of heads whose cost comes nearest to `share`. Attention keeps at least one step of
        heads; with `spill` (the MLP is pruned too) a share nearer to every head removes all but one step and
        the MLP takes the rest: with GQA the share counts the K/V projections that removing query heads keeps,
        so from 63% of a SmolLM2 block (SEAP's deep blocks at 50% overall) "every head" was nearest."""
        kv = group.units // group.per_group
        step = kv if group.per_group > 1 and self.cfg.round_heads else 1
        best = min(range(0, group.units + 1, step), key=lambda k: abs(k * group.cost - share))
        if best >= group.units and spill:
            best = group.units - step
        if best >= group.units:
            most = (group.units - step) * group.cost / self.block_params[group.block]
            raise ValueError(f"block {group.block}: sparsity {self.cfg.sparsity} would remove every attention head "
                             f"(keeping at least {step} of them, attention can give at most "
                             f"{most:.1%} of the block); lower the sparsity, let the MLP take part (mlp=true) or "
                             "set attention=false")
        if group.per_group > 1 and best % kv:
            raise ValueError(f"block {group.block}: keeping {group.units - best} query heads with {kv} KV heads breaks "
                             "num_attention_heads % num_key_value_heads == 0; allow rounding (round_heads=true) "
                             "or remove whole KV groups (heads=kv)")
        return best

    def _round_channels(self, group: Coupled, kept: float) -> int:
        multiple = self.cfg.round_to
        rounded = int(round(kept / multiple)) * multiple
        if rounded < multiple:
            raise ValueError(f"block {group.block}: sparsity {self.cfg.sparsity} leaves {max(kept, 0):.0f} of "
                             f"{group.units} FFN channels, fewer than round_to={multiple}; lower the sparsity")
        return min(rounded, group.units)

    def global_selection(self, pending: list) -> list[list[int]]:
        """FLAP's adaptive structure search: one ranking of every unit of every block (standardized
        scores), each unit weighted by its parameter cost; remove from the bottom until the removed
        parameters come closest to the budget. Then make each block feasible: at least one unit,
        equal query heads per KV group, kept channels a multiple of `round_to`."""
        entries = []   # (score, cost, (position in pending, group position))
        for p, (_, groups, scores, _) in enumerate(pending):
            for g, (group, score) in enumerate(zip(groups, scores)):
                entries.extend((float(v), group.cost, (p, g)) for v in score)
        entries.sort(key=lambda e: e[0])
        target = self.cfg.sparsity * sum(self.block_params)
        removed_params = torch.tensor([0.0] + [e[1] for e in entries], dtype=torch.float64).cumsum(0)
        n_remove = int(torch.argmin((removed_params - target).abs()))
        removed = [[0] * len(groups) for _, groups, _, _ in pending]
        for _, _, (p, g) in entries[:n_remove]:
            removed[p][g] += 1
        keep = []
        for p, (_, groups, _, _) in enumerate(pending):
            keep.append([self._feasible(group, group.units - removed[p][g]) for g, group in enumerate(groups)])
        self._check_reached(pending, keep)
        return keep

    def _check_reached(self, pending: list, keep: list[list[int]]) -> None:
        """Making every block feasible keeps at least one unit (and whole multiples) of each group. A target
        above what is left removable even then cannot be met: refuse it with the most that can be removed,
        instead of reporting success at a lower sparsity (FLAP at 0.99 once removed 72.7%). Below that, the
        rounding to feasible widths stands and the report states the share reached."""
        total = sum(self.block_params)
        most = sum((group.units - self._feasible(group, 0)) * group.cost
                   for _, groups, _, _ in pending for group in groups) / total
        if self.cfg.sparsity > most:
            reached = sum((group.units - k) * group.cost for (_, groups, _, _), kept in zip(pending, keep)
                          for group, k in zip(groups, kept)) / total
            raise ValueError(f"sparsity {self.cfg.sparsity} cannot be met: every block keeps at least one unit of "
                             f"each group (and whole multiples of round_to={self.cfg.round_to} channels), so at most "
                             f"{most:.2%} of the block parameters can be removed (this ranking reached {reached:.2%}); "
                             f"use --sparsity {math.floor(most * 100) / 100:g} or less")

    def _feasible(self, group: Coupled, n_keep: int) -> int:
        if group.kind == "channels":
            multiple = self.cfg.round_to
        else:
            multiple = group.units // group.per_group if group.per_group > 1 else 1
        return min(group.units, max(multiple, int(round(n_keep / multiple)) * multiple))


def _total_params(group: Coupled) -> int:
    """Parameters of the group's layers (producers and consumer, biases included)."""
    modules = {id(m): m for m, _ in group.producers} | {id(group.consumer): group.consumer}
    return sum(p.numel() for m in modules.values() for p in m.parameters(recurse=False))


def choose_units(group: Coupled, scores: Tensor, n_keep: int) -> Tensor:
    """The `n_keep` best-scored units, sorted; with KV groups the best n_keep / kv of each group,
    so every KV group keeps the same number of query heads."""
    if group.per_group > 1:
        kv = group.units // group.per_group
        by_group = scores.reshape(kv, group.per_group)
        top = by_group.topk(n_keep // kv, dim=1).indices + torch.arange(kv)[:, None] * group.per_group
        return top.flatten().sort().values
    return scores.topk(n_keep).indices.sort().values


# ----------------------------------------------------------------------------- removal

def _remove(model, groups: list[Coupled], scores: list[Tensor], n_keep: list[int], stats: list,
            cfg: WidthConfig, report: StructureReport) -> None:
    """Remove each group's lowest-scored units; `stats` are the observers compensation reads."""
    spec = spec_for(model)
    compensation = cfg.compensation
    for group, score, keep_count, stat in zip(groups, scores, n_keep, stats):
        if keep_count >= group.units:
            continue
        keep = choose_units(group, score, keep_count)
        columns = kept_columns(group, keep)                                    # (columns,) kept columns
        if compensation == "bias" and stat is not None and hasattr(stat, "mean"):
            _compensate(model, spec, group, ~columns, stat.mean, report)
        elif compensation == "liar" and stat is not None and hasattr(stat, "H64"):
            reconstruct_(group, columns, stat.H64, cfg.liar_damp)
        keep_units_(model, spec, group, keep, report)
        report.scores.setdefault(group.kind, {})[group.block] = [round(float(v), 6) for v in score]


def kept_columns(group: Coupled, keep: Tensor) -> Tensor:
    """(columns,) bool: the consumer's input columns of the units `keep`."""
    units = torch.zeros(group.units, dtype=torch.bool)
    units[keep] = True
    return units[group.column_units]


def keep_units_(model: nn.Module, spec, group: Coupled, keep: Tensor, report=None) -> None:
    """Slice one coupled group to the units `keep` (sorted): producer rows and consumer columns, and the
    attention module's head counts."""
    mask = torch.zeros(group.units, dtype=torch.bool)
    mask[keep] = True
    for module, rows in group.producers:
        keep_rows_(module, ((rows < 0) | mask[rows.clamp_min(0)]).nonzero().squeeze(1))
    keep_columns_(group.consumer, mask[group.column_units].nonzero().squeeze(1))
    if group.kind == "heads":
        set_head_counts(model, spec, group.block, report)


def _compensate(model, spec, group: Coupled, removed: Tensor, mean: Tensor, report: StructureReport) -> None:
    """FLAP bias compensation: the removed inputs' average contribution W[:, removed] @ mean[removed]
    is added to the consumer's output bias, so the block's output keeps its mean."""
    consumer = group.consumer
    if getattr(consumer, "bias", None) is None and not enable_bias(model, spec, group.kind):
        layer = spec.heads.o if group.kind == "heads" else spec.channels.consumer
        note = (f"{group.kind}: no bias compensation, stock {model.config.model_type} has no bias on {layer} "
                "and no config flag to add one")
        if note not in report.notes:
            report.notes.append(note)
            log.warning(note)
        return
    W = weight_view(consumer).detach().float()                                 # (out, columns)
    delta = W[:, removed.to(W.device)] @ mean.to(W.device)[removed.to(W.device)]   # (out,)
    consumer.bias.data += delta.to(consumer.bias.dtype)


def liar_update(W: Tensor, H: Tensor, kept: Tensor, damp: float = 0.01) -> Tensor:
    """LIAR's reconstruction (arXiv 2407.13331): the change of the kept columns that best
    reproduces, on the calibration inputs, what the removed columns contributed.

    With X the consumer's input (tokens, columns), K the kept and R the removed columns, B minimises
    ||X_R W_R^T - X_K B||^2 + lambda ||B||^2, whose normal equations need only H = X^T X:

        B = (H_KK + lambda I)^-1 H_KR W_R^T,   lambda = damp * mean(diag H_KK)

    W: (out, columns) the consumer's weight; H: (columns, columns); kept: (columns,) bool.
    Returns B^T, (out, kept columns), to be added to W[:, kept]. Solved in float64; inputs that
    were always zero get a unit diagonal (their B rows are then zero), so damp=0 is allowed.
    """
    kept = kept.to(H.device)
    removed = ~kept
    rows = H[kept].double()                                                    # (K, columns), a copy
    H_KK, H_KR = rows[:, kept], rows[:, removed]                               # (K, K), (K, R)
    del rows
    dead = H_KK.diagonal() == 0
    H_KK[dead, dead] = 1.0
    H_KK.diagonal().add_(damp * H_KK.diagonal().mean())
    W_R = W.to(H_KK.device).double()[:, removed]                               # (out, R)
    B = torch.linalg.solve(H_KK, H_KR @ W_R.T)                                 # (K, out)
    return B.T                                                                 # (out, K)


def reconstruct_(group: Coupled, kept: Tensor, H: Tensor, damp: float) -> None:
    """Fold LIAR's least-squares fit of the removed columns into the kept ones, before slicing."""
    W = weight_view(group.consumer).data                                       # (out, columns), a view
    delta = liar_update(W.float(), H, kept, damp)                              # (out, kept)
    W[:, kept.to(W.device)] += delta.to(device=W.device, dtype=W.dtype)


# ----------------------------------------------------------------------------- config and reload


