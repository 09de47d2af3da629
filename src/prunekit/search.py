"""Structure search under a measured budget: the best mix of widths, removed sublayers and removed
blocks that fits a parameter count, a memory size or a decode latency on this machine.

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
  2. cost      exact, per block and level: parameters; memory = parameters x bytes + the KV cache
               at `context` tokens (batch 1); decode latency from a micro-benchmark on this machine
               (`measure_latency_table`: probe models of a few blocks at each attention level and
               each FFN level, random weights, real KV cache of `context` tokens), combined
               additively per block. The table and its prediction of the dense model beside the
               dense model's measured latency go into search.json.
  3. seed      each sublayer level alone in an otherwise dense model: KL to the dense model on the
               first `seed_windows` windows (one by default; 12 variants per SmolLM2 block). A greedy
               descent on these scores (cheapest loss per unit of cost saved) gives the first
               candidate inside the budget.
  4. evolve    per generation `offspring` children of the current best, each with a few level
               switches (one block one level down, another one up) repaired back inside the budget
               and filled up to it; all are scored on the first `select_windows` windows, the best
               `survivors` on all `windows`, and the best replaces the parent only if its fitness
               is lower, so the fitness never rises. Children are evaluated from the parent's
               cached hidden states at the first block where they differ.
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
from .latency import decode_latency, measure_latency_table
from .models import spec_for
from .models.spec import get_module, weight_view
from .methods import flap, magnitude_sp, wanda_sp  # noqa: F401  (registered: the scores that order the units)
from .registry import register, registered
from .report import StructureReport, parameter_counts
from .structured import Coupled, WidthConfig, choose_units, coupled_groups, keep_units_, kept_columns, reconstruct_
from .surgery import SUBLAYER_FAMILIES, SUBLAYER_NORMS, block_widths, drop_sublayer_, write_config

log = logging.getLogger("prunekit")

SPACES = ("width", "depth", "sublayer")
TARGETS = ("params", "memory", "latency")
STATE_FILE = "search-state.json"


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
    ffn_levels: int = 8                    # FFN ladder: 1, 7/8, ..., 1/8 of the channels (rounded), then 0
    round_to: int = 8                      # kept FFN channels are a multiple of this
    context: int = 1024                    # KV-cache length for memory and latency costs (batch 1)
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
            raise ValueError(f"space holds {', '.join(SPACES)} (comma-separated); got {','.join(space) or 'nothing'}"
                             + (" (experts and sparsity are not searched yet)" if
                                set(unknown) & {"experts", "sparsity"} else ""))
        for name in ("ffn_levels", "round_to", "context", "select_windows", "seed_windows", "offspring",
                     "survivors", "max_switches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.windows is not None and self.windows < self.select_windows:
            raise ValueError(f"windows ({self.windows}) must be at least select_windows ({self.select_windows})")
        if self.generations is not None and self.generations < 0:
            raise ValueError(f"generations must be >= 0, got {self.generations}")
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
class Ladder:
    """The levels of one block: kept attention units and FFN channels, from full to 0."""
    heads: list[int]                 # kept units (query heads, or KV groups in "kv" mode), descending, last 0
    channels: list[int]              # kept FFN channels, descending, last 0
    allowed: list[tuple[int, int]]   # (head level, channel level) pairs the space allows


def ladders(groups: list[Coupled], cfg: SearchConfig, sublayer_ok: bool) -> Ladder:
    """The levels of a block with these coupled groups (heads first, then channels)."""
    heads, channels = groups
    kv = heads.units // heads.per_group if heads.per_group > 1 else 1
    step = kv if heads.per_group > 1 else 1                        # equal query heads in every KV group
    head_levels = list(range(heads.units, 0, -step))
    if len(head_levels) > 8:                                       # at most 8 partial levels, evenly spaced
        head_levels = sorted({head_levels[round(i * (len(head_levels) - 1) / 7)] for i in range(8)}, reverse=True)
    n = channels.units
    channel_levels = sorted({min(n, max(cfg.round_to, round(n * k / cfg.ffn_levels / cfg.round_to) * cfg.round_to))
                             for k in range(1, cfg.ffn_levels + 1)} | {n}, reverse=True)
    if "width" not in cfg.space:
        head_levels, channel_levels = head_levels[:1], channel_levels[:1]
    head_levels.append(0)
    channel_levels.append(0)
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


def _observe_inputs(block: nn.Module, groups: list[Coupled], stats_cls, device):
    """Forward pre-hooks that feed each group's consumer input to an observer of `stats_cls`."""
    observers = [stats_cls(weight_view(g.consumer).shape[1], device) for g in groups]
    by_module = {g.consumer: o for g, o in zip(groups, observers)}
    handles = [g.consumer.register_forward_pre_hook(lambda m, args: by_module[m].update(args[0])) for g in groups]
    return observers, handles


# ----------------------------------------------------------------------------- evaluating a variant

@contextmanager
def variant(block: nn.Module, groups: list[Coupled], orders: list[Tensor], kept: tuple[int, int]):
    """Run `block` as if only the first kept[g] units of orders[g] remained (0: the sublayer removed):
    the consumer's removed input columns are zeroed, a removed sublayer's consumer returns zeros (its
    bias included, as dropping the sublayer does). Equal to slicing the weights, without copying them."""
    handles = []
    try:
        for group, order, keep in zip(groups, orders, kept):
            if keep >= group.units:
                continue
            if keep == 0:
                handles.append(group.consumer.register_forward_hook(lambda m, args, out: torch.zeros_like(out)))
                continue
            mask = kept_columns(group, choose_units(group, order, keep))

            def hook(module, args, mask=mask):
                x = args[0]
                return (x * mask.to(device=x.device, dtype=x.dtype),) + tuple(args[1:])
            handles.append(group.consumer.register_forward_pre_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


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


def parameter_table(model: nn.Module, groups: list[list[Coupled]], ladder: list[Ladder]) -> list[dict]:
    """Exact parameters of every allowed level of every block. A removed sublayer takes its norm with it
    (`surgery.drop_sublayer_`); a removed block takes everything."""
    spec = spec_for(model)
    sublayer = model.config.model_type in SUBLAYER_FAMILIES
    rows = []
    for block, (heads, channels), lad in zip(decoder_blocks(model), groups, ladder):
        attention = _module_params(get_module(block, spec.heads.module))
        mlp = _module_params(get_module(block, spec.channels.module))
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
            row[(a, f)] = (other + (attention - (heads.units - kept_heads) * heads.cost if kept_heads else 0)
                           + (mlp - (channels.units - kept_channels) * channels.cost if kept_channels else 0))
        rows.append(row)
    return rows


def kv_table(model: nn.Module, groups: list[list[Coupled]], ladder: list[Ladder], context: int,
             element_size: int) -> list[dict]:
    """KV-cache bytes per block and level at `context` tokens, batch 1 (sliding-window layers hold at most
    their window). Query-head levels keep every KV head; KV-group levels keep `kept` of them."""
    config = model.config
    types = getattr(config, "layer_types", None)
    window = getattr(config, "sliding_window", None)
    rows = []
    for index, ((heads, _), lad) in enumerate(zip(groups, ladder)):
        # per_group > 1: the units are query heads and every KV head stays; else the units are KV groups
        n_kv = heads.units // heads.per_group
        tokens = context
        if types is not None and window and types[index] == "sliding_attention":
            tokens = min(context, window)
        row = {}
        for a, f in lad.allowed:
            kept = lad.heads[a]
            kv_heads = 0 if kept == 0 else (n_kv if heads.per_group > 1 else kept)
            row[(a, f)] = 2 * kv_heads * heads.head_dim * tokens * element_size
        rows.append(row)
    return rows


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

    def _moves(self, genome, cheaper: bool, anywhere: bool = False) -> list[tuple[int, tuple[int, int]]]:
        """(block, level) steps to a neighbouring level (any allowed level with `anywhere`) that costs less
        (cheaper) or more."""
        out = []
        for index, level in enumerate(genome):
            here = self._block_cost(index, level)
            others = self.ladder[index].allowed if anywhere else self.neighbours(index, level)
            for other in others:
                there = self._block_cost(index, other)
                if there != here and (there < here) == cheaper:
                    out.append((index, other))
        return out

    def _block_cost(self, index: int, level) -> float:
        if self.kind in ("params", "block_params"):
            return self.costs.params[index][level]
        if self.kind == "memory":
            return self.costs.params[index][level] * self.costs.element_size + self.costs.kv_bytes[index][level]
        return self.costs.latency[index][level]

    def greedy(self, seed_scores: list[dict]) -> tuple:
        """From the dense model, repeatedly take the cheaper neighbour with the least seed-score increase per
        unit of cost saved, until the budget is met."""
        genome = list(self.fitness.dense_genome())

        def score(index, level):
            a, f = level
            values = seed_scores[index]
            if (a, f) in values:
                return values[(a, f)]
            return values.get((a, 0), 0.0) + values.get((0, f), 0.0)

        while not self.fits(genome):
            best, best_ratio = None, math.inf
            for index, level in self._moves(genome, cheaper=True) or self._moves(genome, True, anywhere=True):
                saved = self._block_cost(index, genome[index]) - self._block_cost(index, level)
                ratio = (score(index, level) - score(index, genome[index])) / saved
                if ratio < best_ratio:
                    best, best_ratio = (index, level), ratio
            if best is None:
                raise RuntimeError("no cheaper level left")             # guarded by the feasibility check
            genome[best[0]] = best[1]
        return self._fill(genome, random.Random(self.cfg.seed))

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
            echo=None, latency_timer=decode_latency) -> StructureReport:
    """Search the structure that meets `cfg.target` with the lowest KL to the dense model, and cut it out of
    `model` in place. Returns a StructureReport whose `search` entry is search.json's body."""
    echo = echo or log.info
    started = time.perf_counter()
    spec = spec_for(model)
    if spec.heads is None or spec.channels is None:
        raise ValueError(f"search needs the heads and FFN channels of {model.config.model_type} in its spec")
    kind, value, relative = parse_target(cfg.target)
    sublayer_ok = "sublayer" in cfg.space and model.config.model_type in SUBLAYER_FAMILIES
    if "sublayer" in cfg.space and not sublayer_ok:
        echo(f"note: {model.config.model_type} cannot lose a single sublayer (supported: "
             f"{', '.join(SUBLAYER_FAMILIES)}); the space keeps width and whole blocks")
    score_method = _score_method(cfg.score)
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

    # 1. the dense pass: block boundaries + the score statistics
    blocks = decoder_blocks(model)
    groups = [coupled_groups(model, i, b, width_cfg) for i, b in enumerate(blocks)]
    observed: dict[int, list] = {}

    def observe(step):
        if score_method.stats is None:
            step.forward()
            return
        observers, handles = _observe_inputs(step.block, groups[step.index], score_method.stats, step.device)
        try:
            step.forward()
        finally:
            for handle in handles:
                handle.remove()
        observed[step.index] = observers

    cache = BlockCache(model, windows, device=device, batch_size=batch_size, cache_device=cache_device,
                       progress=progress, desc="search: dense pass", observe=observe)
    orders = []
    for index, block_groups in enumerate(groups):
        stats = observed.get(index, [None] * len(block_groups))
        orders.append([_unit_scores(g, score_method.fn(g, s, width_cfg)) for g, s in zip(block_groups, stats)])
    ladder = [ladders(g, cfg, sublayer_ok) for g in groups]
    fitness = Fitness(cache, groups, orders, ladder)

    # 2. costs
    element = next(model.parameters()).element_size()
    params = parameter_table(model, groups, ladder)
    costs = CostTable(params, kv_table(model, groups, ladder, cfg.context, element), None,
                      model_before - block_before, element)
    state = _load_state(state_path, resume, cfg, _fingerprint(model, windows))
    if kind == "latency":
        if state is not None and state.costs.get("latency_s"):
            costs.latency = [{_parse_key(k): v for k, v in row.items()} for row in state.costs["latency_s"]]
            costs.outside_latency = state.costs["outside_latency_s"]
            costs.dense_latency_measured = state.costs["dense_latency_measured_s"]
        else:
            echo(f"measuring decode latency per block width on this machine ({cfg.context}-token KV cache)")
            costs.latency, costs.outside_latency, costs.dense_latency_measured = measure_latency_table(
                model, groups, ladder, cfg.context, timer=latency_timer, echo=echo)
    dense = fitness.dense_genome()
    if relative:
        base = costs.total("block_params" if kind == "params" else kind, dense)
        budget = value * base
        measure = "block_params" if kind == "params" else kind
    else:
        budget, measure = value, kind
    search = Search(cfg, fitness, costs, measure, budget, select_chunks, full_chunks)
    cheapest = tuple(min(lad.allowed, key=lambda lv, i=i: search._block_cost(i, lv)) for i, lad in enumerate(ladder))
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
                            library=_library(ladder, orders), costs=costs.to_dict(),
                            target={"kind": kind, "value": value, "relative": relative, "measure": measure,
                                    "budget": budget})
        state.seed_scores = _seed_scores(fitness, search, cfg.seed_windows // batch_size, progress)
        state.setup_seconds = time.perf_counter() - started
        _save_state(state_path, state)
    seed_scores = [{_parse_key(k): v for k, v in row.items()} for row in state.seed_scores]
    if state.parent is None:
        parent = search.greedy(seed_scores)
        parent_fitness, boundaries = fitness.run(parent, full_chunks)
        state.parent, state.parent_fitness = [list(x) for x in parent], parent_fitness
        state.candidates.append(_candidate(search, parent, None, parent_fitness, "greedy", 0))
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

    # 5. apply
    del fitness.dense_probs, fitness.dense_boundaries, cache, boundaries     # the search's memory, before the pass
    if cfg.compensate == "liar":
        compensated_apply_(model, groups, orders, ladder, parent, windows, cfg.liar_damp, device=device,
                           batch_size=batch_size, cache_device=cache_device, progress=progress)
    else:
        apply_levels_(model, groups, orders, ladder, parent)
    write_config(model)
    block_after, model_after = parameter_counts(model)
    predicted = costs.total("params", parent)
    if predicted != model_after:
        raise RuntimeError(f"the cost table predicted {predicted} parameters, the pruned model has {model_after}")
    body = asdict(state)
    body["best"] = {"levels": [list(x) for x in parent], "kept": [list(fitness.kept(i, lv)) for i, lv in
                                                                enumerate(parent)],
                    "fitness_kl": parent_fitness, "params": model_after, "block_params": block_after,
                    "memory_bytes": costs.total("memory", parent),
                    "latency_s": costs.total("latency", parent) if costs.latency else None}
    body["dense"] = {"params": model_before, "block_params": block_before,
                     "memory_bytes": costs.total("memory", dense),
                     "latency_s": costs.total("latency", dense) if costs.latency else None}
    if kind == "latency":
        measured = decode_latency(model, cfg.context)
        body["best"]["latency_measured_s"] = measured
        body["best"]["latency_measured_ratio"] = measured / costs.dense_latency_measured
    body["protocol"] = (f"fitness: mean KL(dense || candidate) per token on {windows.shape[0]} calibration windows "
                        f"of {windows.shape[1]} tokens (selection on the first {cfg.select_windows}); memory: "
                        f"weights x {element} bytes + KV cache at {cfg.context} tokens, batch 1; latency: decode "
                        f"step with {cfg.context} tokens cached, batch 1, torch threads {torch.get_num_threads()}")
    report = StructureReport("search", cfg, block_before, block_after, model_before, model_after,
                             seconds=time.perf_counter() - started, widths=block_widths(model))
    removed = [i for i, lv in enumerate(parent) if fitness.kept(i, lv) == (0, 0)]
    report.removed_blocks = removed
    report.notes += [_summary(search, parent, parent_fitness, state, removed), *notes]
    report.search = body
    return report


def apply_levels_(model: nn.Module, groups: list[list[Coupled]], orders: list[list[Tensor]], ladder: list[Ladder],
                  genome: tuple) -> None:
    """Cut `genome` out of `model` in place: slice heads and channels to their kept units, drop removed
    sublayers, remove blocks that keep nothing."""
    spec = spec_for(model)
    removed = []
    for index, (level, block_groups, block_orders, lad) in enumerate(zip(genome, groups, orders, ladder)):
        kept = (lad.heads[level[0]], lad.channels[level[1]])
        if kept == (0, 0):
            removed.append(index)
            continue
        for group, order, keep, kind in zip(block_groups, block_orders, kept, ("attention", "mlp")):
            if keep == 0:
                drop_sublayer_(model, index, kind)
            elif keep < group.units:
                keep_units_(model, spec, group, choose_units(group, order, keep))
    remove_blocks(model, removed)


def compensated_apply_(model: nn.Module, groups: list[list[Coupled]], orders: list[list[Tensor]],
                       ladder: list[Ladder], genome: tuple, calib: Tensor, damp: float, *, device=None,
                       batch_size: int = 8, cache_device=None, progress: bool = True) -> None:
    """`apply_levels_` one block at a time through the calibration windows, with LIAR: before a block's
    heads or channels are cut, X^T X of each narrowed consumer's input is observed on the outputs of the
    (already pruned) blocks before it, and the kept columns absorb the removed ones' contribution."""
    from .core.stream import block_stream
    from .stats import Hessian
    spec = spec_for(model)
    removed = []
    for step in block_stream(model, calib, device=device, batch_size=batch_size, cache_device=cache_device,
                             progress=progress, desc="search: apply + liar"):
        index = step.index
        kept = (ladder[index].heads[genome[index][0]], ladder[index].channels[genome[index][1]])
        if kept == (0, 0):
            removed.append(index)
            step.outputs = list(step.inputs)              # the block goes: its input flows on
            continue
        narrowed = [(g, o, k) for g, o, k in zip(groups[index], orders[index], kept) if 0 < k < g.units]
        if narrowed:
            observers = [Hessian(weight_view(g.consumer).shape[1], step.device) for g, _, _ in narrowed]
            by_module = {g.consumer: obs for (g, _, _), obs in zip(narrowed, observers)}
            handles = [g.consumer.register_forward_pre_hook(lambda m, args, seen=by_module: seen[m].update(args[0]))
                       for g, _, _ in narrowed]
            try:
                step.forward()
            finally:
                for handle in handles:
                    handle.remove()
            for (group, order, keep), observer in zip(narrowed, observers):
                reconstruct_(group, kept_columns(group, choose_units(group, order, keep)), observer.H64, damp)
        for group, order, keep, kind in zip(groups[index], orders[index], kept, ("attention", "mlp")):
            if keep == 0:
                drop_sublayer_(model, index, kind)
            elif keep < group.units:
                keep_units_(model, spec, group, choose_units(group, order, keep))
        step.outputs, step.changed = None, True           # run again: the next block sees the pruned outputs
    remove_blocks(model, removed)


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


def _score_method(name: str):
    method = registered().get(name)
    if method is None or method.scope != "width":
        widths = sorted(n for n, m in registered().items() if m.scope == "width")
        raise ValueError(f"score must be a width method ({', '.join(widths)}), got {name!r}")
    if getattr(method.stats, "needs_grad", False):
        raise ValueError(f"score {name} needs gradients, which the search's forward-only pass does not take; "
                         "use flap, wanda-sp or magnitude-sp")
    return method


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


def _library(ladder: list[Ladder], orders: list[list[Tensor]]) -> dict:
    return {"blocks": [{"heads": lad.heads, "channels": lad.channels, "allowed": [list(x) for x in lad.allowed],
                        "head_order": o[0].argsort(descending=True).tolist(),
                        "channel_order": o[1].argsort(descending=True).tolist(),
                        "head_scores": [round(float(v), 6) for v in o[0]]}
                       for lad, o in zip(ladder, orders)]}


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


