"""Structure search under a measured budget: the best mix of widths, removed sublayers and removed
blocks (or routed-expert counts, or unstructured densities) that fits a parameter count, a memory size
or a decode latency on this machine.

The approach is EvoPress's (Sieberling et al., arXiv 2410.14649): a per-block library of levels, a
whole-model fitness (KL divergence to the dense model on calibration tokens) and an evolutionary
*level-switch* search that keeps the budget fixed; Tyr-the-Pruner (arXiv 2503.09657) searches the
same kind of space coarse-to-fine. Steps:

  1. library   one pass over the dense model (`depth.BlockCache`) records every block's input on the
               calibration windows and the statistics of a width score (`score`, default flap): each
               block's heads and FFN channels get an order, best first. A block's *level* is a pair
               (attention heads kept, FFN channels kept), each from a short ladder that ends at 0
               (the sublayer removed); (0, 0) removes the block. A variant is the first units of the
               order, so a variant is a slice of the dense weights: the library on disk is the orders
               and ladders (`library` in search.json), not weight copies, and evaluating a variant
               masks the consumer's input columns (exactly what slicing computes).
               Other spaces put other units on the same two ladders (`block_groups`): `experts` (MoE
               families) keeps the attention whole and ladders the routed experts of each MoE block,
               ordered by an expert score (REAP), at most 8 counts from all down to the router's top-k,
               equal per routing group; a variant routes among the kept experts only (`models.moe.route`,
               what the smaller router computes). `sparsity` ladders each sublayer's unstructured density
               in 1/8 steps: a level keeps the highest |W| x ||x|| of every row (Wanda's mask), its cost
               is the nonzeros, its variant runs masked weights.
  2. cost      exact, per block and level: parameters; memory = parameters x bytes + the KV cache
               at `context` tokens (batch 1); decode latency from a micro-benchmark on this machine
               in the chosen `runtime` (`latency.measure_latency_table`: probe models of a few blocks
               at each attention level and each FFN level, random weights, real KV cache of `context`
               tokens; in llama.cpp the probes are written as f16 GGUF files and timed there),
               combined additively per block. The table and its prediction of the dense model beside the
               dense model's measured latency go into search.json.
  3. seed      each sublayer level alone in an otherwise dense model: KL to the dense model on the
               first `seed_windows` windows (one by default; 12 variants per SmolLM2 block). A greedy
               descent on these scores (cheapest loss per unit of cost saved) gives a candidate
               inside the budget, and so does the same descent restricted to whole blocks, to
               attention alone and to the FFN alone; the uniform models that fit (every block at one
               level, per attention level the widest FFN, filled up to the budget) are the others.
               The best of them, by the whole-model fitness, is the first parent. Under a latency
               target that start is also timed as a whole, and the budget (in table units) is
               corrected by how far the table's sum of per-block times was from it
               (`_calibrate_latency`); the starts are then chosen again under the corrected budget.
  4. evolve    per generation `offspring` children of the current best, each with a few level
               switches (one block one level down, another one up) repaired back inside the budget
               and filled up to it; all are scored on the first `select_windows` windows, the best
               `survivors` on all `windows`, and the best replaces the parent only if its fitness
               is lower, so the fitness never rises. Children are evaluated from the parent's
               cached hidden states at the first block where they differ. Under a latency target the
               evolved candidate is then timed as a whole; if it measures more than 2% over the
               target (selection drifts towards what the table flatters), the budget shrinks by that
               ratio and the greedy steps it down into it (role "repair"; the KL may rise here).
  5. apply     the best candidate is cut out of the model (`surgery`), block by block through the
               calibration windows: with `compensate: liar` (the default) each narrowed consumer's
               kept columns are first re-fitted by least squares to what the removed ones
               contributed (LIAR, arXiv 2407.13331, `structured.liar_update`), on the inputs the
               pruned blocks before it produce. The fitness of the search is measured without it
               (a variant is a slice), so the reported KL is an upper bound of the compensated
               model's. Uniform widths give a stock checkpoint, anything else loads with
               `prunekit.load_pruned`.

Resumable: with `state_dir` the library, the cost table and every generation are written there
(`search-state.json`, atomically); a resumed search continues at the next generation and ends
exactly where an uninterrupted one would (every generation draws from its own seeded generator).
The time budget (`budget_minutes`) covers the whole search: the library, costs and seed scores first,
then generations while time is left (checked between generations; a resumed search counts the time
spent before). A budget spent before the first generation leaves the greedy candidate.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import re
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .depth import BlockCache, decoder_blocks, onloaded, remove_blocks
from .experts import check_keep, choose
from .experts import observe as observe_experts
from .latency import RUNTIMES, genome_latency, measure_latency_table, timer_for
from .models import spec_for
from .models.moe import expert_count, groups_of, is_moe_block, route, top_k
from .models.spec import get_module, weight_view
from .methods import flap, magnitude_sp, reap, wanda_sp  # noqa: F401  (registered: the scores that order the units)
from .registry import register, registered
from .report import StructureReport, parameter_counts
from .stats import InputNorm
from .structured import Coupled, WidthConfig, choose_units, coupled_groups, keep_units_, kept_columns, reconstruct_
from .surgery import (SUBLAYER_FAMILIES, SUBLAYER_NORMS, NoAttention, block_widths, drop_sublayer_, keep_experts_,
                      write_config)

log = logging.getLogger("prunekit")

SPACES = ("width", "depth", "sublayer", "experts", "sparsity")
TARGETS = ("params", "memory", "latency")
STATE_FILE = "search-state.json"
CALIBRATION_ROUNDS = 3      # a latency target's budget: at most this many corrections on a start timed as a whole


@dataclass(frozen=True)
class SearchConfig:
    """What to search for and how long. `target`: `params=0.75` (the decoder blocks keep 75% of their
    parameters, as --sparsity 0.25 removes), `params=100M` (the whole model at most 100M parameters),
    `memory=300MB` (weights plus the KV cache at `context` tokens), `latency=0.8` (0.8x the dense
    model's decode-step latency on this machine, from the measured cost table)."""
    target: str = "params=0.75"
    space: tuple[str, ...] = ("width", "depth", "sublayer")
    budget_minutes: float = 10.0           # wall time of the whole search; the evolution gets what is left
    generations: int | None = None         # stop after this many generations (None: the time budget decides)
    score: str = "flap"                    # width method whose scores order each block's heads and channels
    expert_score: str = "reap"             # experts space: the expert score that orders each block's experts
    sparsity_levels: int = 8               # sparsity space: density levels k/8 of each sublayer's weights
    ffn_levels: int = 8                    # FFN ladder: 1, 7/8, ..., 1/8 of the channels (rounded), then 0
    round_to: int = 8                      # kept FFN channels are a multiple of this
    context: int = 1024                    # KV-cache length for memory and latency costs (batch 1)
    runtime: str = "transformers"          # latency targets: where decode steps are timed (latency.RUNTIMES)
    windows: int | None = None             # fitness windows: the first N calibration windows (None: all)
    select_windows: int = 2                # first-stage selection on the first N windows
    seed_windows: int = 1                  # seed scores (one KL per sublayer level) on the first N windows
    offspring: int = 8
    survivors: int = 2
    max_switches: int = 3                  # level switches per child: 1..max_switches
    compensate: str = "liar"               # after the search: "liar" re-fits the kept columns (arXiv 2407.13331)
    liar_damp: float = 0.01
    seed: int = 0

    def __post_init__(self):
        parse_target(self.target)
        space = (self.space,) if isinstance(self.space, str) else tuple(self.space)
        object.__setattr__(self, "space", space)
        unknown = [s for s in space if s not in SPACES]
        if unknown or not space:
            raise ValueError(f"space holds {', '.join(SPACES)} (comma-separated); got {','.join(space) or 'nothing'}")
        if "sparsity" in space and "width" in space:
            raise ValueError("space: a block's levels are either widths or unstructured densities; search width or "
                             "sparsity (each with depth and sublayer), not both")
        for name in ("ffn_levels", "sparsity_levels", "round_to", "context", "select_windows", "seed_windows",
                     "offspring", "survivors", "max_switches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.windows is not None and self.windows < self.select_windows:
            raise ValueError(f"windows ({self.windows}) must be at least select_windows ({self.select_windows})")
        if self.generations is not None and self.generations < 0:
            raise ValueError(f"generations must be >= 0, got {self.generations}")
        if self.runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {self.runtime!r}")
        if self.compensate not in ("none", "liar"):
            raise ValueError(f"compensate must be none or liar, got {self.compensate!r}")
        if not self.budget_minutes > 0:
            raise ValueError(f"budget_minutes must be positive, got {self.budget_minutes}")
        if self.survivors > self.offspring:
            raise ValueError(f"survivors ({self.survivors}) cannot exceed offspring ({self.offspring})")


_UNITS = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "b": 1e9, "t": 1e12}
_BYTES = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "tib": 2**40}


def parse_target(text: str) -> tuple[str, float, bool]:
    """"params=0.75" -> ("params", 0.75, relative=True); "params=100M" -> ("params", 1e8, False);
    "memory=300MB" -> ("memory", 3e8, False); "latency=0.8" -> ("latency", 0.8, True)."""
    kind, _, value = str(text).partition("=")
    kind, value = kind.strip().lower(), value.strip()
    if kind not in TARGETS or not value:
        raise ValueError(f"target must be params=F, params=N[KMB], memory=N[MB|GB|MiB|GiB] or latency=F, got {text!r}")
    match = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e[-+]?[0-9]+)?)\s*([a-zA-Z]*)", value)
    if not match:
        raise ValueError(f"target {text!r}: {value!r} is not a number (with an optional unit)")
    number, unit = float(match.group(1)), match.group(2).lower()
    if kind == "memory":
        if unit not in _BYTES:
            raise ValueError(f"target {text!r}: a memory size needs a unit (MB, GB, MiB, GiB)")
        return kind, number * _BYTES[unit], False
    if kind == "params" and unit:
        if unit not in _UNITS:
            raise ValueError(f"target {text!r}: a parameter count takes K, M or B (e.g. params=100M)")
        return kind, number * _UNITS[unit], False
    if unit:
        raise ValueError(f"target {text!r}: {kind} is a fraction of the dense model's, without a unit")
    if not 0 < number < 1:
        raise ValueError(f"target {text!r}: a fraction must be in (0, 1) (e.g. {kind}=0.75)")
    return kind, number, True


# ----------------------------------------------------------------------------- the library

@dataclass
class ExpertsGroup:
    """A block's routed experts as one ladder: the units are experts, ordered by an expert score (REAP by
    default), and a level keeps the best `kept` (the same number from each routing group). `cost` is the
    parameters one expert takes with it: its slices of every experts/router parameter that has the expert
    on dimension 0 (what `surgery.keep_experts_` cuts; buffers such as `e_score_correction_bias` are not
    parameters)."""
    block: nn.Module
    moe: object                      # models.spec.Experts
    units: int
    cost: int
    top_k: int
    routing_groups: int
    consumer: nn.Module              # the MoE module (its output is zeroed if the sublayer were removed)
    kind: str = "experts"

    def removed(self, kept: int) -> int:
        return (self.units - kept) * self.cost

    def valid(self, kept: int) -> bool:
        try:
            check_keep(self.block, self.moe, kept, 0)
        except ValueError:
            return False
        return True


@dataclass
class DensityGroup:
    """A sublayer's linear weights under unstructured sparsity (the `sparsity` space): level k of `units`
    keeps round(in x k / units) weights of every output row, the highest |W_ij| x ||x_j|| (Wanda's score,
    per row), zeros stored densely. No weight update: the search compares masks; the parameters are the
    nonzeros."""
    linears: list[nn.Module]
    consumer: nn.Module              # the sublayer's output linear (its output is zeroed when removed)
    units: int
    kind: str = "density"

    def keep_per_row(self, linear: nn.Module, kept: int) -> int:
        return round(weight_view(linear).shape[1] * kept / self.units)

    def removed(self, kept: int) -> int:
        return sum(weight_view(m).shape[0] * (weight_view(m).shape[1] - self.keep_per_row(m, kept))
                   for m in self.linears)

    def mask(self, linear: nn.Module, norm: Tensor, kept: int) -> Tensor:
        """(out, in) bool: the weights level `kept` keeps in `linear`, given its input norms."""
        W = weight_view(linear).detach()
        score = W.float().abs() * norm.to(W.device).float()
        keep = self.keep_per_row(linear, kept)
        return torch.zeros_like(score, dtype=torch.bool).scatter_(1, score.topk(keep, dim=1).indices, True)


@dataclass
class FixedGroup:
    """A sublayer the space does not narrow (an MoE family's attention, a dense block of an MoE model):
    kept whole, or removed with its block."""
    consumer: nn.Module
    cost: int
    units: int = 1
    kind: str = "fixed"

    def removed(self, kept: int) -> int:
        return 0 if kept else self.cost


def _removed(group, kept: int) -> int:
    """Parameters a level removes from its sublayer (kept > 0)."""
    if isinstance(group, Coupled):
        return (group.units - kept) * group.cost
    return group.removed(kept)


def _sublayer_names(spec) -> tuple[str, str]:
    """The block's attention and MLP module names."""
    attention = spec.heads.module if spec.heads is not None else "self_attn"
    if spec.channels is not None:
        return attention, spec.channels.module
    return attention, spec.experts.module if spec.experts is not None else "mlp"


def block_groups(model: nn.Module, index: int, block: nn.Module, cfg: SearchConfig) -> list:
    """The two ladders' groups of one block, (attention, MLP): coupled heads and FFN channels (width),
    density groups (sparsity), or for Mixture-of-Experts families the attention kept whole and the routed
    experts (experts)."""
    spec = spec_for(model)
    attention_name, mlp_name = _sublayer_names(spec)
    if spec.experts is not None:
        attention = get_module(block, attention_name)
        groups = [FixedGroup(attention, _module_params(attention))]
        moe = spec.experts
        if is_moe_block(block, moe):
            experts, router = get_module(block, moe.experts), get_module(block, moe.router)
            count = expert_count(block, moe)
            per_expert = sum(t.numel() // count for m in (experts, router) for t in m.parameters(recurse=False)
                             if t.shape[0] == count)
            groups.append(ExpertsGroup(block, moe, count, per_expert, top_k(block, moe), groups_of(router),
                                       get_module(block, moe.module)))
        else:
            mlp = get_module(block, mlp_name)
            groups.append(FixedGroup(mlp, _module_params(mlp)))
        return groups
    if spec.heads is None or spec.channels is None:
        raise ValueError(f"search needs the heads and FFN channels of {model.config.model_type} in its spec")
    heads, channels = coupled_groups(model, index, block, WidthConfig(sparsity=0.0, round_to=cfg.round_to))
    if "sparsity" not in cfg.space:
        return [heads, channels]
    names = [name for group in spec.groups for name in group]
    return [DensityGroup([get_module(block, n) for n in names if n.startswith(prefix + ".")], group.consumer,
                         cfg.sparsity_levels)
            for prefix, group in ((attention_name, heads), (mlp_name, channels))]


@dataclass
class Ladder:
    """The levels of one block: kept attention units and MLP units (FFN channels, routed experts, or
    density steps), from full to 0 (the sublayer removed)."""
    heads: list[int]                 # kept attention units, descending, last 0
    channels: list[int]              # kept MLP units, descending, last 0
    allowed: list[tuple[int, int]]   # (head level, channel level) pairs the space allows


def _levels(group, cfg: SearchConfig, attention: bool) -> list[int]:
    """A group's kept-unit levels before 0, full first."""
    if isinstance(group, Coupled):
        if "width" not in cfg.space:
            return [group.units]
        if attention:
            kv = group.units // group.per_group if group.per_group > 1 else 1
            step = kv if group.per_group > 1 else 1                  # equal query heads in every KV group
            levels = list(range(group.units, 0, -step))
            if len(levels) > 8:                                      # at most 8 partial levels, evenly spaced
                levels = sorted({levels[round(i * (len(levels) - 1) / 7)] for i in range(8)}, reverse=True)
            return levels
        n = group.units
        return sorted({min(n, max(cfg.round_to, round(n * k / cfg.ffn_levels / cfg.round_to) * cfg.round_to))
                       for k in range(1, cfg.ffn_levels + 1)} | {n}, reverse=True)
    if isinstance(group, ExpertsGroup):
        if "experts" not in cfg.space:
            return [group.units]
        valid = [k for k in range(group.units, 0, -1) if k == group.units or group.valid(k)]
        if len(valid) > 8:                                           # at most 8 levels, evenly spaced
            valid = sorted({valid[round(i * (len(valid) - 1) / 7)] for i in range(8)}, reverse=True)
        return valid
    if isinstance(group, DensityGroup):
        return list(range(group.units, 0, -1))
    return [group.units]


def ladders(groups: list, cfg: SearchConfig, sublayer_ok: bool) -> Ladder:
    """The levels of a block with these groups (attention first, then the MLP)."""
    head_levels = _levels(groups[0], cfg, attention=True) + [0]
    channel_levels = _levels(groups[1], cfg, attention=False) + [0]
    last_a, last_f = len(head_levels) - 1, len(channel_levels) - 1
    allowed = []
    for a in range(len(head_levels)):
        for f in range(len(channel_levels)):
            zeros = (a == last_a) + (f == last_f)
            if zeros == 0 or (zeros == 1 and sublayer_ok) or (zeros == 2 and ("depth" in cfg.space or sublayer_ok)):
                allowed.append((a, f))
    return Ladder(head_levels, channel_levels, allowed)


def _unit_scores(group: Coupled, scores: Tensor) -> Tensor:
    """Per-unit scores from a width method's output (per unit, or per consumer column: averaged)."""
    scores = scores.detach().double().cpu()
    if scores.numel() == group.units:
        return scores
    return group.unit_sum(scores) / group.unit_sum(torch.ones_like(scores))


def _observe_inputs(modules: list[nn.Module], stats_cls, device):
    """Forward pre-hooks that feed each module's input to an observer of `stats_cls`."""
    observers = [stats_cls(weight_view(m).shape[1], device) for m in modules]
    by_module = dict(zip(modules, observers))
    handles = [m.register_forward_pre_hook(lambda m, args: by_module[m].update(args[0])) for m in modules]
    return observers, handles


# ----------------------------------------------------------------------------- evaluating a variant

def _zero_output(module, args, out):
    if isinstance(out, tuple):                   # an attention module: (output, weights)
        return (torch.zeros_like(out[0]),) + tuple(out[1:])
    return torch.zeros_like(out)


@contextmanager
def variant(block: nn.Module, groups: list, orders: list, kept: tuple[int, int]):
    """Run `block` as if only level `kept` of each group remained, without copying weights:
    width: the consumer's removed input columns are zeroed (equal to slicing); experts: the router
    chooses among the kept experts only (`models.moe.route`, what the router of the smaller model
    computes); density: each linear runs on its masked weight; 0: the sublayer's output is zero (its
    bias included, as dropping the sublayer does)."""
    handles = []
    try:
        for group, order, keep in zip(groups, orders, kept):
            if keep >= group.units:
                continue
            if keep == 0:
                handles.append(group.consumer.register_forward_hook(_zero_output))
            elif isinstance(group, Coupled):
                mask = kept_columns(group, choose_units(group, order, keep))

                def hook(module, args, mask=mask):
                    x = args[0]
                    return (x * mask.to(device=x.device, dtype=x.dtype),) + tuple(args[1:])
                handles.append(group.consumer.register_forward_pre_hook(hook))
            elif isinstance(group, ExpertsGroup):
                handles.append(_exclude_experts(group, order, keep))
            else:
                handles += _masked_weights(group, order, keep)
        yield
    finally:
        for handle in handles:
            handle.remove()


def _exclude_experts(group: ExpertsGroup, scores: Tensor, keep: int):
    """A router forward hook: route among the `keep` best experts only."""
    excluded = torch.ones(group.units, dtype=torch.bool)
    excluded[choose(scores, keep, group.routing_groups)] = False
    router = get_module(group.block, group.moe.router)

    def hook(module, args, out):
        logits = out[0]
        weights, chosen = route(group.moe, router, logits.reshape(-1, logits.shape[-1]), excluded)
        return (logits, weights.to(out[1].dtype).reshape(out[1].shape), chosen.reshape(out[2].shape)) + tuple(out[3:])
    return router.register_forward_hook(hook)


def _masked_weights(group: DensityGroup, norms: list[Tensor], keep: int) -> list:
    """Hooks that run each linear of `group` on its level-`keep` weights and put the dense ones back."""
    masks, saved, handles = {}, {}, []

    def before(module, args):
        if module not in masks:
            masks[module] = group.mask(module, norms[group.linears.index(module)], keep)
        saved[module] = module.weight.data
        module.weight.data = module.weight.data.clone()
        weight_view(module).data.mul_(masks[module].to(module.weight.device))

    def after(module, args, out):
        module.weight.data = saved.pop(module)
    for linear in group.linears:
        handles += [linear.register_forward_pre_hook(before), linear.register_forward_hook(after)]
    return handles


class Fitness:
    """KL(dense || candidate) per token on the calibration windows, from cached block boundaries.

    The dense next-token distributions are kept as float16 probabilities (half the memory of the
    log-probabilities in float32: windows x tokens x vocabulary x 2 bytes); every KL uses the same
    rounded, renormalised distribution p in both of its terms, sum p log p - sum p log q, so every
    candidate is compared with one fixed reference (the dense model itself scores ~1e-8, the rounding)."""

    def __init__(self, cache: BlockCache, groups: list[list[Coupled]], orders: list[list[Tensor]],
                 ladder: list[Ladder]):
        self.cache, self.groups, self.orders, self.ladder = cache, groups, orders, ladder
        self.blocks = decoder_blocks(cache.model)
        with torch.no_grad():
            self.dense_probs = [logp.exp().half() for logp in self._log_probs(cache.output)]   # (B, L, V) each
        self.dense = self.dense_genome()
        self.dense_boundaries = [*cache.inputs, cache.output]

    def dense_genome(self) -> tuple:
        return tuple((0, 0) for _ in self.ladder)

    def kept(self, index: int, level: tuple[int, int]) -> tuple[int, int]:
        ladder = self.ladder[index]
        return ladder.heads[level[0]], ladder.channels[level[1]]

    def _log_probs(self, hidden: list[Tensor]):
        cache = self.cache
        softcap = getattr(cache.model.config, "final_logit_softcapping", None)
        with torch.no_grad(), onloaded(cache.device, *cache.head, cache.lm_head):
            for h in hidden:
                logits = cache.lm_head(_apply(cache.head, h.to(cache.device))).float()
                if softcap is not None:
                    logits = torch.tanh(logits / softcap) * softcap
                yield F.log_softmax(logits, dim=-1).to(cache.cache_device)

    def run(self, genome: tuple, chunks: int, base: tuple | None = None,
            base_boundaries: list | None = None) -> tuple[float, list]:
        """(mean KL per token over the first `chunks` chunks, the block boundaries of `genome`).
        `base`/`base_boundaries`: a genome whose boundaries are known (default: the dense model);
        only the blocks from the first one where `genome` differs run again."""
        if base is None:
            base, base_boundaries = self.dense, self.dense_boundaries
        start = next((i for i, (a, b) in enumerate(zip(genome, base)) if a != b), len(genome))
        hidden = [h for h in base_boundaries[start][:chunks]]
        boundaries = [b[:chunks] if b is not None else None for b in base_boundaries[:start + 1]]
        for index in range(start, len(genome)):
            kept = self.kept(index, genome[index])
            if kept != (0, 0):
                block = self.blocks[index]
                with variant(block, self.groups[index], self.orders[index], kept):
                    hidden = self.cache.block(index, hidden)
            boundaries.append(hidden)
        total, count = 0.0, 0
        with torch.no_grad():
            for i, logq in enumerate(self._log_probs(hidden)):
                p = self.dense_probs[i].to(logq.device).float()
                p = p / p.sum(-1, keepdim=True)
                kl = (torch.xlogy(p, p) - p * logq).sum(-1)                          # (B, L)
                total += float(kl.sum())
                count += kl.numel()
        return total / count, boundaries


def _apply(modules: list[nn.Module], x: Tensor) -> Tensor:
    for module in modules:
        x = module(x)
    return x


# ----------------------------------------------------------------------------- costs

@dataclass
class CostTable:
    """Per block and level: parameters, KV-cache bytes and decode latency (seconds per token), plus the
    parts outside the blocks. `total(genome)` is what the target is compared with."""
    params: list[dict]                  # per block: {(a, f): parameters}
    kv_bytes: list[dict]                # per block: {(a, f): KV-cache bytes at `context`}
    latency: list[dict] | None          # per block: {(a, f): seconds}, None when not measured
    outside_params: int                 # embeddings, final norm, LM head (tied weights once)
    element_size: int
    outside_latency: float = 0.0
    dense_latency_measured: float | None = None

    def total(self, kind: str, genome: tuple) -> float:
        if kind == "params":
            return self.outside_params + sum(self.params[i][g] for i, g in enumerate(genome))
        if kind == "block_params":
            return sum(self.params[i][g] for i, g in enumerate(genome))
        if kind == "memory":
            return (self.total("params", genome) * self.element_size
                    + sum(self.kv_bytes[i][g] for i, g in enumerate(genome)))
        return self.outside_latency + sum(self.latency[i][g] for i, g in enumerate(genome))

    def to_dict(self) -> dict:
        def table(rows):
            return None if rows is None else [{f"{a},{f}": v for (a, f), v in row.items()} for row in rows]
        return {"params": table(self.params), "kv_bytes": table(self.kv_bytes), "latency_s": table(self.latency),
                "outside_params": self.outside_params, "element_size": self.element_size,
                "outside_latency_s": self.outside_latency, "dense_latency_measured_s": self.dense_latency_measured}


def _module_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def parameter_table(model: nn.Module, groups: list[list], ladder: list[Ladder]) -> list[dict]:
    """Exact parameters of every allowed level of every block (nonzeros, for density levels). A removed
    sublayer takes its norm with it (`surgery.drop_sublayer_`); a removed block takes everything."""
    spec = spec_for(model)
    sublayer = model.config.model_type in SUBLAYER_FAMILIES
    attention_name, mlp_name = _sublayer_names(spec)
    rows = []
    for block, (heads, channels), lad in zip(decoder_blocks(model), groups, ladder):
        attention = _module_params(get_module(block, attention_name))
        mlp = _module_params(get_module(block, mlp_name))
        if sublayer:
            attention += _module_params(get_module(block, SUBLAYER_NORMS["attention"]))
            mlp += _module_params(get_module(block, SUBLAYER_NORMS["mlp"]))
        other = _module_params(block) - attention - mlp
        row = {}
        for a, f in lad.allowed:
            kept_heads, kept_channels = lad.heads[a], lad.channels[f]
            if kept_heads == 0 and kept_channels == 0:
                row[(a, f)] = 0
                continue
            row[(a, f)] = (other + (attention - _removed(heads, kept_heads) if kept_heads else 0)
                           + (mlp - _removed(channels, kept_channels) if kept_channels else 0))
        rows.append(row)
    return rows


def kv_table(model: nn.Module, groups: list[list], ladder: list[Ladder], context: int,
             element_size: int) -> list[dict]:
    """KV-cache bytes per block and level at `context` tokens, batch 1 (sliding-window layers hold at most
    their window). Query-head levels keep every KV head; KV-group levels keep `kept` of them; an attention
    kept whole (density, fixed) keeps the cache of the dense model's layer (`_kv_per_token`). A removed
    attention in a kept block still caches a position counter (`NoAttention.CACHE_PER_TOKEN`); a removed
    block, nothing."""
    config = model.config
    types = getattr(config, "layer_types", None)
    window = getattr(config, "sliding_window", None)
    rows = []
    for index, ((heads, _), lad) in enumerate(zip(groups, ladder)):
        tokens = context
        if types is not None and window and types[index] == "sliding_attention":
            tokens = min(context, window)
        row = {}
        for a, f in lad.allowed:
            kept = lad.heads[a]
            if kept == 0:
                per_token = NoAttention.CACHE_PER_TOKEN if lad.channels[f] else 0
            elif isinstance(heads, Coupled):
                # per_group > 1: the units are query heads and every KV head stays; else the units are KV groups
                kv_heads = heads.units // heads.per_group if heads.per_group > 1 else kept
                per_token = 2 * kv_heads * heads.head_dim
            else:
                per_token = _kv_per_token(config)
            row[(a, f)] = per_token * tokens * element_size
        rows.append(row)
    return rows


def _kv_per_token(config) -> int:
    """Cached key and value elements per token of one full attention layer: 2 x KV heads x head size, or
    for multi-head latent attention (DeepSeek-V3), which transformers caches compressed, the latent
    (`kv_lora_rank`) plus the shared rotary key (`qk_rope_head_dim`)."""
    heads = config.num_attention_heads
    if getattr(config, "kv_lora_rank", None):
        return config.kv_lora_rank + config.qk_rope_head_dim
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 2 * (getattr(config, "num_key_value_heads", None) or heads) * head_dim


# ----------------------------------------------------------------------------- the search

@dataclass
class SearchState:
    """Everything a resumed search needs; also the body of search.json."""
    config: dict
    fingerprint: str
    library: dict                       # per block: head/channel ladders and unit orders
    costs: dict
    target: dict
    seed_scores: list = field(default_factory=list)
    parent: list | None = None
    parent_fitness: float | None = None
    generation: int = 0
    setup_seconds: float = 0.0          # the dense pass, cost table and seed scores of the first session
    seconds: float = 0.0                # the evolution, over every session
    candidates: list = field(default_factory=list)    # every candidate evaluated
    history: list = field(default_factory=list)       # best fitness after each generation


class Search:
    """The budgeted level-switch search over one model's library (see the module docstring)."""

    def __init__(self, cfg: SearchConfig, fitness: Fitness, costs: CostTable, kind: str, budget: float,
                 select_chunks: int, full_chunks: int):
        self.cfg, self.fitness, self.costs, self.kind, self.budget = cfg, fitness, costs, kind, budget
        self.select_chunks, self.full_chunks = select_chunks, full_chunks
        self.ladder = fitness.ladder

    def cost(self, genome) -> float:
        return self.costs.total(self.kind, genome)

    def fits(self, genome) -> bool:
        return self.cost(genome) <= self.budget * (1 + 1e-12)

    def neighbours(self, index: int, level: tuple[int, int]) -> list[tuple[int, int]]:
        """Allowed levels of block `index` at most one rung away on each ladder."""
        return [(a, f) for a, f in self.ladder[index].allowed
                if (a, f) != level and abs(a - level[0]) <= 1 and abs(f - level[1]) <= 1]

    def removed(self, index: int, level: tuple[int, int]) -> bool:
        """The level removes block `index` whole (no heads, no channels)."""
        return self.fitness.kept(index, level) == (0, 0)

    def _moves(self, genome, cheaper: bool, anywhere: bool = False) -> list[tuple[int, tuple[int, int]]]:
        """(block, level) steps to a neighbouring level (any allowed level with `anywhere`) that costs less
        (cheaper) or more. A step never removes the last block left: a model with no decoder blocks is no
        candidate (llama.cpp cannot even load it, and a latency calibration once tried to time one)."""
        out = []
        last = sum(not self.removed(i, level) for i, level in enumerate(genome)) <= 1
        for index, level in enumerate(genome):
            here = self._block_cost(index, level)
            others = self.ladder[index].allowed if anywhere else self.neighbours(index, level)
            for other in others:
                if last and self.removed(index, other) and not self.removed(index, level):
                    continue
                there = self._block_cost(index, other)
                if there != here and (there < here) == cheaper:
                    out.append((index, other))
        return out

    def cheapest(self) -> tuple:
        """The cheapest genome the space holds that still has a block: every block at its cheapest level, and
        where that removes them all, the block whose cheapest kept level costs least keeps it."""
        genome = [min(lad.allowed, key=lambda lv, i=i: self._block_cost(i, lv)) for i, lad in enumerate(self.ladder)]
        if all(self.removed(i, level) for i, level in enumerate(genome)):
            options = [(self._block_cost(i, lv), i, lv) for i, lad in enumerate(self.ladder) for lv in lad.allowed
                       if not self.removed(i, lv)]
            if options:
                _, index, level = min(options)
                genome[index] = level
        return tuple(genome)

    def _block_cost(self, index: int, level) -> float:
        if self.kind in ("params", "block_params"):
            return self.costs.params[index][level]
        if self.kind == "memory":
            return self.costs.params[index][level] * self.costs.element_size + self.costs.kv_bytes[index][level]
        return self.costs.latency[index][level]

    def greedy(self, seed_scores: list[dict], only=None, start=None) -> tuple | None:
        """From the dense model (or `start`), repeatedly take the cheaper neighbour with the least seed-score
        increase per unit of cost saved, until the budget is met. `only(block, level)`: the kind of change
        allowed (None: any); None is returned when changes of that kind alone cannot meet the budget."""
        genome = list(self.fitness.dense_genome() if start is None else start)

        def score(index, level):
            a, f = level
            values = seed_scores[index]
            if (a, f) in values:
                return values[(a, f)]
            return values.get((a, 0), 0.0) + values.get((0, f), 0.0)

        def moves(anywhere: bool):
            return [m for m in self._moves(genome, True, anywhere) if only is None or only(*m)]

        while not self.fits(genome):
            best, best_ratio = None, math.inf
            for index, level in moves(False) or moves(True):
                saved = self._block_cost(index, genome[index]) - self._block_cost(index, level)
                ratio = (score(index, level) - score(index, genome[index])) / saved
                if ratio < best_ratio:
                    best, best_ratio = (index, level), ratio
            if best is None:
                if only is not None:
                    return None
                raise RuntimeError("no cheaper level left")             # guarded by the feasibility check
            genome[best[0]] = best[1]
        return self._fill(genome, random.Random(self.cfg.seed))

    def starts(self, seed_scores: list[dict]) -> list[tuple[str, tuple]]:
        """The candidates the evolution may start from, each (role, genome): the greedy descent over every
        kind of change; the same restricted to whole blocks (a depth pruning ordered by the seed scores),
        to attention alone and to the FFN alone; and the uniform models (`uniform`). At `latency=0.75` in
        transformers the unrestricted greedy removed 21 attention sublayers (each alone costs little KL,
        together they ruin the model: KL 3.7, perplexity 454); the best start is what evolution needs."""
        removed = self.removed
        kinds = {"greedy": None, "greedy-depth": removed,
                 "greedy-attention": lambda index, level: level[1] == 0 and not removed(index, level),
                 "greedy-ffn": lambda index, level: level[0] == 0 and not removed(index, level)}
        out: list[tuple[str, tuple]] = []
        for role, only in kinds.items():
            genome = self.greedy(seed_scores, only)
            if genome is not None and genome not in [g for _, g in out]:
                out.append((role, genome))
        out += [("uniform", genome) for genome in self.uniform() if genome not in [g for _, g in out]]
        return out

    def uniform(self) -> list[tuple]:
        """Starting points that give every block the same level: per attention level, the widest FFN level
        whose uniform model fits the budget, filled up to it. EvoPress starts from the uniform level; the
        greedy start alone can be a trap (`starts`)."""
        starts = []
        for a in range(len(self.ladder[0].heads)):
            for f in range(len(self.ladder[0].channels)):
                if all(lad.heads[a] == 0 and lad.channels[f] == 0 for lad in self.ladder):
                    continue                                   # every block removed: no model
                if not all((a, f) in lad.allowed for lad in self.ladder):
                    continue
                genome = [(a, f)] * len(self.ladder)
                if self.fits(genome):
                    start = self._fill(genome, random.Random(self.cfg.seed))
                    if start not in starts:
                        starts.append(start)
                    break
        return starts

    def _fill(self, genome, rng: random.Random) -> tuple:
        """Spend what is left of the budget: random dearer neighbours while they fit."""
        genome = list(genome)
        for _ in range(4 * len(genome)):
            moves = [m for m in self._moves(genome, cheaper=False)
                     if self.fits(genome[:m[0]] + [m[1]] + genome[m[0] + 1:])]
            if not moves:
                break
            index, level = rng.choice(moves)
            genome[index] = level
        return tuple(genome)

    def mutate(self, parent: tuple, rng: random.Random) -> tuple | None:
        """A child: 1..max_switches level switches (one block down, another up), then repaired into the
        budget (random cheaper steps) and filled up to it."""
        genome = list(parent)
        for _ in range(rng.randint(1, self.cfg.max_switches)):
            down = self._moves(genome, cheaper=True)
            up = self._moves(genome, cheaper=False)
            if down:
                index, level = rng.choice(down)
                genome[index] = level
            if up:
                index, level = rng.choice(up)
                genome[index] = level
        while not self.fits(genome):
            down = self._moves(genome, cheaper=True) or self._moves(genome, True, anywhere=True)
            if not down:
                return None
            index, level = rng.choice(down)
            genome[index] = level
        child = self._fill(genome, rng)
        return child if child != tuple(parent) else None


    def generation(self, parent: tuple, parent_fitness: float, boundaries: list, state: SearchState):
        """One generation: `offspring` distinct children of `parent`, all scored on the selection windows,
        the best `survivors` on every fitness window; the best of those replaces the parent only if it is
        better. Every evaluation is recorded in `state.candidates`. Returns the (new) parent, its fitness and
        its block boundaries."""
        number = state.generation + 1
        rng = random.Random(f"{self.cfg.seed}:{state.generation}")     # its own generator: resumable
        children = []
        for _ in range(4 * self.cfg.offspring):
            child = self.mutate(parent, rng)
            if child is not None and child not in children:
                children.append(child)
            if len(children) == self.cfg.offspring:
                break
        select_base = [b[:self.select_chunks] if b is not None else None for b in boundaries]
        scored = []
        for child in children:
            value, _ = self.fitness.run(child, self.select_chunks, parent, select_base)
            scored.append((value, child))
            state.candidates.append(_candidate(self, child, value, None, "child", number))
        scored.sort(key=lambda item: item[0])
        for value, child in scored[:self.cfg.survivors]:
            full, child_boundaries = self.fitness.run(child, self.full_chunks, parent, boundaries)
            state.candidates.append(_candidate(self, child, value, full, "survivor", number))
            if full < parent_fitness:
                parent, parent_fitness, boundaries = child, full, child_boundaries
        return parent, parent_fitness, boundaries


def _fingerprint(model: nn.Module, calib: Tensor) -> str:
    digest = hashlib.sha256()
    digest.update(str(parameter_counts(model)).encode())
    digest.update(str(tuple(calib.shape)).encode())
    digest.update(calib.cpu().numpy().tobytes())
    first = next(iter(decoder_blocks(model)[0].parameters()))
    digest.update(first.detach().float().cpu().flatten()[:4096].numpy().tobytes())
    return digest.hexdigest()[:16]


def _levels_key(level) -> str:
    return f"{level[0]},{level[1]}"


def search_(model: nn.Module, cfg: SearchConfig, calib: Tensor, *, device=None, batch_size: int = 8,
            cache_device=None, progress: bool = True, state_dir=None, resume: bool = False,
            echo=None, latency_timer=None) -> StructureReport:
    """Search the structure that meets `cfg.target` with the lowest KL to the dense model, and cut it out of
    `model` in place. Returns a StructureReport whose `search` entry is search.json's body. `latency_timer`
    replaces the runtime's timer (`latency.timer_for(cfg.runtime)`, torch's thread count) in tests."""
    echo = echo or log.info
    started = time.perf_counter()
    spec = spec_for(model)
    kind, value, relative = parse_target(cfg.target)
    _check_space(model, cfg, kind)
    sublayer_ok = "sublayer" in cfg.space and model.config.model_type in SUBLAYER_FAMILIES
    if "sublayer" in cfg.space and not sublayer_ok:
        echo(f"note: {model.config.model_type} cannot lose a single sublayer (supported: "
             f"{', '.join(SUBLAYER_FAMILIES)}); the space keeps width and whole blocks")
    score_method = _score_method(cfg.score)
    expert_method = _expert_method(cfg.expert_score) if "experts" in cfg.space else None
    width_cfg = WidthConfig(sparsity=0.0, round_to=cfg.round_to)
    windows = calib if cfg.windows is None else calib[:cfg.windows]
    if windows.shape[0] < max(cfg.select_windows, cfg.seed_windows):
        raise ValueError(f"select_windows={cfg.select_windows} and seed_windows={cfg.seed_windows} need at least "
                         f"that many calibration windows, got {windows.shape[0]}")
    batch_size = math.gcd(batch_size, cfg.select_windows, cfg.seed_windows)   # the stages run whole chunks
    full_chunks = math.ceil(windows.shape[0] / batch_size)
    select_chunks = cfg.select_windows // batch_size
    state_path = Path(state_dir) / STATE_FILE if state_dir is not None else None
    block_before, model_before = parameter_counts(model)
    _check_memory(model, windows, echo)

    # 1. the dense pass: block boundaries + what orders each group's units
    blocks = decoder_blocks(model)
    groups = [block_groups(model, i, b, cfg) for i, b in enumerate(blocks)]
    observed: dict[int, list] = {}

    def observe(step):
        here = groups[step.index]
        if expert_method is not None and isinstance(here[1], ExpertsGroup):
            routed = observe_experts(step, spec.experts)
            with torch.no_grad():
                observed[step.index] = expert_method.fn(routed, expert_method.config_cls(sparsity=0.5), None)
            return
        if isinstance(here[0], DensityGroup):
            modules, stats_cls = [m for g in here for m in g.linears], InputNorm
        elif isinstance(here[0], Coupled) and score_method.stats is not None:
            modules, stats_cls = [g.consumer for g in here], score_method.stats
        else:
            step.forward()
            return
        observers, handles = _observe_inputs(modules, stats_cls, step.device)
        try:
            step.forward()
        finally:
            for handle in handles:
                handle.remove()
        observed[step.index] = observers

    cache = BlockCache(model, windows, device=device, batch_size=batch_size, cache_device=cache_device,
                       progress=progress, desc="search: dense pass", observe=observe)
    orders = [_orders(g, observed.get(i), score_method, width_cfg) for i, g in enumerate(groups)]
    ladder = [ladders(g, cfg, sublayer_ok) for g in groups]
    fitness = Fitness(cache, groups, orders, ladder)

    # 2. costs
    element = next(model.parameters()).element_size()
    params = parameter_table(model, groups, ladder)
    costs = CostTable(params, kv_table(model, groups, ladder, cfg.context, element), None,
                      model_before - block_before, element)
    state = _load_state(state_path, resume, cfg, _fingerprint(model, windows))
    timer = None
    if kind == "latency":
        timer = latency_timer or timer_for(cfg.runtime, **({"threads": torch.get_num_threads()}
                                                           if cfg.runtime == "llama.cpp" else {}))
        if state is not None and state.costs.get("latency_s"):
            costs.latency = [{_parse_key(k): v for k, v in row.items()} for row in state.costs["latency_s"]]
            costs.outside_latency = state.costs["outside_latency_s"]
            costs.dense_latency_measured = state.costs["dense_latency_measured_s"]
        else:
            echo(f"measuring decode latency per block width in {cfg.runtime} on this machine ({cfg.context}-token "
                 "KV cache)")
            costs.latency, costs.outside_latency, costs.dense_latency_measured = measure_latency_table(
                model, groups, ladder, cfg.context, timer=timer, echo=echo)
    dense = fitness.dense_genome()
    if relative:
        base = costs.total("block_params" if kind == "params" else kind, dense)
        budget = value * base
        measure = "block_params" if kind == "params" else kind
    else:
        budget, measure = value, kind
    search = Search(cfg, fitness, costs, measure, budget, select_chunks, full_chunks)
    cheapest = search.cheapest()
    if not search.fits(cheapest):
        raise ValueError(f"target {cfg.target} cannot be met in the space {','.join(cfg.space)}: the smallest model "
                         f"it holds costs {_fmt(measure, search.cost(cheapest), costs)} against a budget of "
                         f"{_fmt(measure, budget, costs)}; widen the space or relax the target")
    notes = []
    if kind == "latency":
        notes.append(f"latency cost table: dense predicted {costs.total('latency', dense) * 1e3:.2f} ms/token, "
                     f"measured {costs.dense_latency_measured * 1e3:.2f} ms/token; budget {budget * 1e3:.2f} ms/token")
        echo(notes[-1])

    # 3. seed scores and the first candidate
    if state is None:
        state = SearchState(config=_config_dict(cfg), fingerprint=_fingerprint(model, windows),
                            library=_library(ladder, groups, orders), costs=costs.to_dict(),
                            target={"kind": kind, "value": value, "relative": relative, "measure": measure,
                                    "budget": budget})
        state.seed_scores = _seed_scores(fitness, search, cfg.seed_windows // batch_size, progress)
        state.setup_seconds = time.perf_counter() - started
        _save_state(state_path, state)
    seed_scores = [{_parse_key(k): v for k, v in row.items()} for row in state.seed_scores]
    if kind == "latency":
        target_s = value * costs.dense_latency_measured   # the target as measured: a share of the dense step

        def whole(genome) -> float:                        # a candidate timed as a whole, in the same runtime
            return genome_latency(model, groups, ladder, genome, cfg.context, timer)
    if state.target.get("calibrated"):                      # a resumed latency search keeps its calibration
        search.budget = state.target["budget"]
    if state.parent is None:
        parent, parent_fitness, boundaries = _best_start(search, seed_scores, fitness, full_chunks, state)
        if kind == "latency":                               # the table's prediction checked on the start itself
            rounds = []
            for _ in range(CALIBRATION_ROUNDS):
                calibration = _calibrate_latency(search, parent, whole, target_s, search.cost(cheapest))
                rounds.append(calibration)
                notes.append(calibration["note"])
                echo(calibration["note"])
                if calibration["budget"] == search.budget:
                    break
                search.budget = calibration["budget"]
                parent, parent_fitness, boundaries = _best_start(search, seed_scores, fitness, full_chunks, state)
            state.target["budget"] = search.budget
            state.target["calibrated"] = rounds
        state.parent, state.parent_fitness = [list(x) for x in parent], parent_fitness
        state.history.append(parent_fitness)
        _save_state(state_path, state)
    else:
        parent = tuple(tuple(x) for x in state.parent)
        parent_fitness, boundaries = fitness.run(parent, full_chunks)
        echo(f"resumed the search at generation {state.generation} (best KL {state.parent_fitness:.5f}, "
             f"{state.seconds:.0f} s spent)")

    # 4. evolve
    limit = cfg.budget_minutes * 60
    bar = _bar(cfg, progress)
    evolve_started = time.perf_counter() - state.seconds
    while (cfg.generations is None or state.generation < cfg.generations) and \
            (state.setup_seconds + time.perf_counter() - evolve_started < limit):
        parent, parent_fitness, boundaries = search.generation(parent, parent_fitness, boundaries, state)
        state.parent, state.parent_fitness = [list(x) for x in parent], parent_fitness
        state.generation += 1
        state.history.append(parent_fitness)
        state.seconds = time.perf_counter() - evolve_started
        _save_state(state_path, state)
        bar.set_postfix_str(f"best KL {parent_fitness:.5f}")
        bar.update(1)
    bar.close()
    if kind == "latency":        # the evolved candidate timed as a whole: selection favours what the table flatters
        for _ in range(CALIBRATION_ROUNDS):
            check = _calibrate_latency(search, parent, whole, target_s, search.cost(cheapest), "the evolved candidate")
            notes.append(check["note"])
            echo(notes[-1])
            if check["budget"] >= search.budget:
                break                                    # within 2% of the target, or faster: kept as it is
            search.budget = check["budget"]
            parent = search.greedy(seed_scores, start=parent)      # the cheapest-loss steps down into the budget
            parent_fitness, boundaries = fitness.run(parent, full_chunks)
            state.candidates.append(_candidate(search, parent, None, parent_fitness, "repair", state.generation))
        state.target["budget"] = search.budget
        state.parent, state.parent_fitness = [list(x) for x in parent], parent_fitness

    # 5. apply
    del fitness.dense_probs, fitness.dense_boundaries, cache, boundaries     # the search's memory, before the pass
    if cfg.compensate == "liar":
        zeroed = compensated_apply_(model, groups, orders, ladder, parent, windows, cfg.liar_damp, device=device,
                                    batch_size=batch_size, cache_device=cache_device, progress=progress)
    else:
        zeroed = apply_levels_(model, groups, orders, ladder, parent)
    write_config(model)
    block_stored, model_stored = parameter_counts(model)
    block_after, model_after = block_stored - zeroed, model_stored - zeroed       # nonzeros (zeros stored densely)
    predicted = costs.total("params", parent)
    if predicted != model_after:
        raise RuntimeError(f"the cost table predicted {predicted} parameters, the pruned model has {model_after}")
    if zeroed:
        notes.append(f"density levels zeroed {zeroed:,} weights (stored densely: the checkpoint holds "
                     f"{model_stored:,} parameters, {model_after:,} of them nonzero)")
    body = asdict(state)
    body["best"] = {"levels": [list(x) for x in parent], "kept": [list(fitness.kept(i, lv)) for i, lv in
                                                                enumerate(parent)],
                    "fitness_kl": parent_fitness, "params": model_after, "block_params": block_after,
                    "memory_bytes": costs.total("memory", parent) + zeroed * element,
                    "latency_s": costs.total("latency", parent) if costs.latency else None}
    body["dense"] = {"params": model_before, "block_params": block_before,
                     "memory_bytes": costs.total("memory", dense),
                     "latency_s": costs.total("latency", dense) if costs.latency else None}
    if kind == "latency":
        measured = timer(model, cfg.context)
        body["best"]["latency_measured_s"] = measured
        body["best"]["latency_measured_ratio"] = measured / costs.dense_latency_measured
    body["protocol"] = (f"fitness: mean KL(dense || candidate) per token on {windows.shape[0]} calibration windows "
                        f"of {windows.shape[1]} tokens (selection on the first {cfg.select_windows}); memory: "
                        f"weights x {element} bytes + KV cache at {cfg.context} tokens, batch 1; latency: decode "
                        f"step in {cfg.runtime} with {cfg.context} tokens cached, batch 1, threads "
                        f"{torch.get_num_threads()}" + (", f16 GGUF" if cfg.runtime == "llama.cpp" else ""))
    report = StructureReport("search", cfg, block_before, block_after, model_before, model_after,
                             seconds=time.perf_counter() - started, widths=block_widths(model))
    removed = [i for i, lv in enumerate(parent) if fitness.kept(i, lv) == (0, 0)]
    report.removed_blocks = removed
    report.notes += [_summary(search, parent, parent_fitness, state, removed), *notes]
    report.search = body
    return report


def _cut_(model: nn.Module, spec, index: int, group, order, keep: int, kind: str) -> int:
    """Cut one group of block `index` down to level `keep` in place; returns the weights it zeroed
    (density) so the caller can check them against the cost table."""
    if keep == 0:
        drop_sublayer_(model, index, kind)
    elif keep >= group.units:
        return 0
    elif isinstance(group, Coupled):
        keep_units_(model, spec, group, choose_units(group, order, keep))
    elif isinstance(group, ExpertsGroup):
        keep_experts_(group.block, group.moe, choose(order, keep, group.routing_groups))
    elif isinstance(group, DensityGroup):
        zeroed = 0
        for linear, norm in zip(group.linears, order):
            mask = group.mask(linear, norm, keep)
            with torch.no_grad():
                weight_view(linear).mul_(mask.to(linear.weight.dtype))
            zeroed += int(mask.numel() - mask.sum())
        return zeroed
    return 0


def apply_levels_(model: nn.Module, groups: list[list], orders: list[list], ladder: list[Ladder],
                  genome: tuple) -> int:
    """Cut `genome` out of `model` in place: slice heads and channels to their kept units, keep the chosen
    experts, mask density levels, drop removed sublayers, remove blocks that keep nothing. Returns the
    weights zeroed by density levels."""
    spec = spec_for(model)
    removed, zeroed = [], 0
    for index, (level, block_groups, block_orders, lad) in enumerate(zip(genome, groups, orders, ladder)):
        kept = (lad.heads[level[0]], lad.channels[level[1]])
        if kept == (0, 0):
            removed.append(index)
            continue
        for group, order, keep, kind in zip(block_groups, block_orders, kept, ("attention", "mlp")):
            zeroed += _cut_(model, spec, index, group, order, keep, kind)
    remove_blocks(model, removed)
    return zeroed


def compensated_apply_(model: nn.Module, groups: list[list], orders: list[list], ladder: list[Ladder],
                       genome: tuple, calib: Tensor, damp: float, *, device=None, batch_size: int = 8,
                       cache_device=None, progress: bool = True) -> int:
    """`apply_levels_` one block at a time through the calibration windows, with LIAR: before a block's
    heads or channels are cut, X^T X of each narrowed consumer's input is observed on the outputs of the
    (already pruned) blocks before it, and the kept columns absorb the removed ones' contribution.
    Experts and density levels are cut as they are (no reconstruction)."""
    from .core.stream import block_stream
    from .stats import Hessian
    spec = spec_for(model)
    removed, zeroed = [], 0
    for step in block_stream(model, calib, device=device, batch_size=batch_size, cache_device=cache_device,
                             progress=progress, desc="search: apply + liar"):
        index = step.index
        kept = (ladder[index].heads[genome[index][0]], ladder[index].channels[genome[index][1]])
        if kept == (0, 0):
            removed.append(index)
            step.outputs = list(step.inputs)              # the block goes: its input flows on
            continue
        narrowed = [(g, o, k) for g, o, k in zip(groups[index], orders[index], kept)
                    if isinstance(g, Coupled) and 0 < k < g.units]
        if narrowed:
            observers, handles = _observe_inputs([g.consumer for g, _, _ in narrowed], Hessian, step.device)
            try:
                step.forward()
            finally:
                for handle in handles:
                    handle.remove()
            for (group, order, keep), observer in zip(narrowed, observers):
                reconstruct_(group, kept_columns(group, choose_units(group, order, keep)), observer.H64, damp)
        for group, order, keep, kind in zip(groups[index], orders[index], kept, ("attention", "mlp")):
            zeroed += _cut_(model, spec, index, group, order, keep, kind)
        step.outputs, step.changed = None, True           # run again: the next block sees the pruned outputs
    remove_blocks(model, removed)
    return zeroed


# ----------------------------------------------------------------------------- helpers

def _check_memory(model: nn.Module, windows: Tensor, echo) -> None:
    """The search holds the dense next-token distributions (float16) and two sets of hidden states at every
    block boundary (the dense model's and the best candidate's, float32): say how much, refuse what cannot fit."""
    import psutil
    tokens = windows.numel()
    blocks = len(decoder_blocks(model))
    need = tokens * model.config.vocab_size * 2 + 2 * (blocks + 1) * tokens * model.config.hidden_size * 4
    echo(f"search: {need / 2**30:.2f} GiB for the dense distributions and hidden states ({windows.shape[0]} "
         f"windows x {windows.shape[1]} tokens), besides the model")
    available = psutil.virtual_memory().available
    if need > 0.8 * available:
        raise MemoryError(f"the search needs about {need / 2**30:.1f} GiB for its {windows.shape[0]} x "
                          f"{windows.shape[1]}-token fitness windows ({available / 2**30:.1f} GiB available); use "
                          "fewer windows (--fitness-windows, --samples) or shorter ones (--seqlen)")


def _check_space(model: nn.Module, cfg: SearchConfig, kind: str) -> None:
    """Refuse spaces this model or target cannot use, with the reason."""
    spec = spec_for(model)
    family = model.config.model_type
    if "experts" in cfg.space and spec.experts is None:
        raise ValueError(f"space 'experts' searches the routed-expert counts of a Mixture-of-Experts model; {family} "
                         "has no experts (drop it from --space)")
    if spec.experts is not None and "width" in cfg.space and "experts" not in cfg.space:
        raise ValueError(f"{family} is a Mixture-of-Experts model: its MLP narrows by routed experts, not channels; "
                         "search --space experts,depth")
    if "sparsity" in cfg.space:
        if spec.experts is not None:
            raise ValueError(f"space 'sparsity' is not offered for the Mixture-of-Experts family {family}; search "
                             "--space experts,depth")
        if kind != "params":
            raise ValueError(f"space 'sparsity' needs a params target (nonzero parameters): unstructured zeros are "
                             f"stored densely by the default export and run no faster in transformers or llama.cpp, "
                             f"so a {kind} target cannot be met by them")
    if kind == "latency" and "experts" in cfg.space:
        raise ValueError("a latency target is not offered with space 'experts': fewer experts take memory away, "
                         "not compute (every token still runs its top-k); use a params or memory target")


def _expert_method(name: str):
    method = registered().get(name)
    if method is None or method.scope != "experts" or method.apply is not None or name == "naee":
        usable = sorted(n for n, m in registered().items()
                        if m.scope == "experts" and m.apply is None and n != "naee")
        raise ValueError(f"expert_score must be an expert score that ranks every expert on its own "
                         f"({', '.join(usable)}), got {name!r}")
    return method


def _orders(groups: list, observed, score_method, width_cfg: WidthConfig) -> list:
    """What ranks each group's units, from the dense pass: width scores (per head or channel, higher kept),
    expert scores, or for density groups the input norms ||x_j|| of each linear."""
    if isinstance(groups[0], DensityGroup):
        norms = [o.sq_norm.sqrt().cpu() for o in observed]
        return [norms[:len(groups[0].linears)], norms[len(groups[0].linears):]]
    if isinstance(groups[1], ExpertsGroup):
        return [None, observed.double().cpu() if observed is not None else torch.zeros(groups[1].units)]
    if isinstance(groups[0], Coupled):
        stats = observed or [None, None]
        return [_unit_scores(g, score_method.fn(g, st, width_cfg)) for g, st in zip(groups, stats)]
    return [None, None]


def _score_method(name: str):
    method = registered().get(name)
    if method is None or method.scope != "width":
        widths = sorted(n for n, m in registered().items() if m.scope == "width")
        raise ValueError(f"score must be a width method ({', '.join(widths)}), got {name!r}")
    if getattr(method.stats, "needs_grad", False):
        raise ValueError(f"score {name} needs gradients, which the search's forward-only pass does not take; "
                         "use flap, wanda-sp or magnitude-sp")
    return method


def _best_start(search: Search, seed_scores: list[dict], fitness: Fitness, chunks: int, state: SearchState):
    """Every start of `search.starts` scored on the fitness windows (recorded as generation 0); the best one
    with its fitness and block boundaries."""
    best = (None, math.inf, None)
    for role, start in search.starts(seed_scores):
        kl, boundaries = fitness.run(start, chunks)
        state.candidates.append(_candidate(search, start, None, kl, role, 0))
        if kl < best[1]:
            best = (start, kl, boundaries)
    return best


def _calibrate_latency(search: Search, start, measure, target_s: float, floor: float, what: str = "the start") -> dict:
    """Correct the budget of a latency target by what the additive cost table gets wrong on a pruned model.

    The table adds per-block probe times; a whole model of mixed widths can run slower or faster than that
    sum (on SmolLM2 in transformers a searched model measured 0.832x the dense step where the table
    predicted 0.750x). So the start is timed as a whole (`latency.genome_latency`), and the budget, in
    table units, becomes what that start's measured/predicted ratio says meets the target as measured:
        budget' = target_s x (start predicted / start measured),   target_s = target x dense measured,
    at least the cheapest model's cost, unchanged when the start already measures within 2% of the
    target. The caller repeats this on the new best start (`CALIBRATION_ROUNDS`), a fixed-point iteration
    of the budget; the final model is measured again (search.json). `what` names the timed candidate
    in the note."""
    predicted, measured = search.cost(start), measure(start)
    close = abs(measured / target_s - 1) <= 0.02
    budget = search.budget if close else max(floor, target_s * predicted / measured)
    note = (f"latency calibration: {what} measured {measured * 1e3:.2f} ms/token as a whole against "
            f"{predicted * 1e3:.2f} predicted (target {target_s * 1e3:.2f} measured); budget "
            f"{search.budget * 1e3:.2f} -> {budget * 1e3:.2f} ms/token in table units")
    return {"start_measured_s": measured, "start_predicted_s": predicted, "target_s": target_s,
            "budget_before": search.budget, "budget": budget, "note": note}


def _seed_scores(fitness: Fitness, search: Search, chunks: int, progress: bool) -> list[dict]:
    """KL of each single-block change (one ladder moved, the rest dense) on the first `chunks` chunks."""
    from tqdm.auto import tqdm
    dense = fitness.dense_genome()
    todo = []
    for index, lad in enumerate(fitness.ladder):
        for a, f in lad.allowed:
            if (a, f) != (0, 0) and (a == 0 or f == 0 or (lad.heads[a], lad.channels[f]) == (0, 0)):
                todo.append((index, (a, f)))
    rows: list[dict] = [{} for _ in fitness.ladder]
    for index, level in tqdm(todo, desc="search: seed scores", disable=not progress, unit="variant"):
        genome = dense[:index] + (level,) + dense[index + 1:]
        rows[index][_levels_key(level)], _ = fitness.run(genome, chunks)
    for row in rows:
        row["0,0"] = 0.0
    return rows


def _parse_key(key: str) -> tuple[int, int]:
    a, f = key.split(",")
    return int(a), int(f)


def _candidate(search: Search, genome, select: float | None, full: float | None, role: str, generation: int):
    return {"generation": generation, "role": role, "levels": [list(x) for x in genome],
            "cost": search.cost(genome), "fitness_select": select, "fitness": full}


def _library(ladder: list[Ladder], groups: list[list], orders: list[list]) -> dict:
    """The library as search.json keeps it: per block the ladders and the unit orders (best first) that
    make every variant; density levels are rebuilt from the model and the input norms of the dense pass."""
    blocks = []
    for lad, (attention, mlp), (a_order, m_order) in zip(ladder, groups, orders):
        row = {"kinds": [attention.kind, mlp.kind], "heads": lad.heads, "channels": lad.channels,
               "allowed": [list(x) for x in lad.allowed]}
        if isinstance(attention, Coupled):
            row["head_order"] = a_order.argsort(descending=True).tolist()
            row["head_scores"] = [round(float(v), 6) for v in a_order]
        if isinstance(mlp, (Coupled, ExpertsGroup)):
            row["channel_order"] = m_order.argsort(descending=True).tolist()
        if isinstance(mlp, ExpertsGroup):
            row["expert_scores"] = [round(float(v), 6) for v in m_order]
        blocks.append(row)
    return {"blocks": blocks}


def _config_dict(cfg: SearchConfig) -> dict:
    out = asdict(cfg)
    out["space"] = list(cfg.space)
    return out


def _load_state(path: Path | None, resume: bool, cfg: SearchConfig, fingerprint: str) -> SearchState | None:
    if path is None or not resume:
        return None
    if not path.is_file():
        raise FileNotFoundError(f"--resume: no search state at {path} (the run directory of an earlier search)")
    raw = json.loads(path.read_text())
    saved = dict(raw["config"])
    current = _config_dict(cfg)
    differs = sorted(k for k in current if k not in ("budget_minutes", "generations") and saved.get(k) != current[k])
    if differs:
        raise ValueError(f"--resume: the search in {path.parent} ran with other settings ({', '.join(differs)}); "
                         "resume with the same ones or start a new run directory")
    if raw["fingerprint"] != fingerprint:
        raise ValueError(f"--resume: the model or the calibration windows differ from the search in {path.parent}")
    return SearchState(**{k: v for k, v in raw.items() if k in SearchState.__dataclass_fields__})


def _save_state(path: Path | None, state: SearchState) -> None:
    if path is None:
        return
    from .io.atomic import write_atomic
    write_atomic(path, json.dumps(asdict(state)))


def _bar(cfg: SearchConfig, progress: bool):
    from tqdm.auto import tqdm
    return tqdm(total=cfg.generations, desc="search: generations", unit="gen", disable=not progress)


def _fmt(kind: str, value: float, costs: CostTable) -> str:
    if kind in ("params", "block_params"):
        return f"{value / 1e6:.2f}M parameters" + (" (decoder blocks)" if kind == "block_params" else "")
    if kind == "memory":
        return f"{value / 1e6:.1f} MB"
    return f"{value * 1e3:.2f} ms per token"


def _summary(search: Search, genome, fitness_value: float, state: SearchState, removed: list[int]) -> str:
    lads = search.ladder
    kept = [(lads[i].heads[a], lads[i].channels[f]) for i, (a, f) in enumerate(genome)]
    sublayers = sum((h == 0) != (c == 0) for h, c in kept)
    return (f"search: {state.generation} generations, {len(state.candidates)} candidates; best KL {fitness_value:.5f} "
            f"at {_fmt(search.kind, search.cost(genome), search.costs)} (budget "
            f"{_fmt(search.kind, search.budget, search.costs)}); removed blocks {removed}, "
            f"{sublayers} single sublayers; widths (heads, channels) per block: {kept}")


@register("search", SearchConfig, scope="search", calibrated=True)
def search(model, cfg: SearchConfig, calib, **kwargs):
    """The registered step: `prune.prune_` calls `search_` for scope "search"."""
    return search_(model, cfg, calib, **kwargs)


