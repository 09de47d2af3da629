"""Expert pruning: remove whole routed experts of a Mixture-of-Experts model, so the result is a
stock checkpoint with fewer experts (less memory and disk; the active compute per token is unchanged
because every token still runs its top-k experts).

    ExpertsConfig    how many: a fraction of each MoE block's routed experts (`sparsity`) or the
                     number kept per block (`experts`); `uniform=False` spreads one global budget
    RoutedTokens     what one MoE block saw on the calibration windows (its input, the router's
                     logits and choice, the residual stream before and after), and the per-expert
                     sums the scores are built from (`statistics()`), computed from the tokens each
                     expert actually receives
    choose           which experts each block keeps: the highest scores, the same number from every
                     routing group (DeepSeek-V3's `n_group`), never fewer than the router's top-k
    prune_experts_   score each MoE block in the block stream, choose, remove (`surgery.keep_experts_`)
                     and write the config; `prune.prune_` calls it for every method registered with
                     scope="experts"

Method functions (`methods/reap.py`, `expert_frequency.py`, ...):

    fn(routed: RoutedTokens, cfg, keep: int | None) -> Tensor (E,)   higher = keep

`keep` is the number this block keeps (uniform mode), or None when the scores of all blocks are
compared in one global ranking (`uniform=False`; they are normalised to shares of their block's
total there). A method that searches subsets (NAEE) needs `keep` and refuses non-uniform mode.
A method that merges instead of dropping registers `apply(block, moe, routed, keep, cfg)`.

Uniform mode removes each block's experts as soon as it is scored, and the next block calibrates on
the pruned outputs; non-uniform mode scores every block on the unpruned model first.
Shared experts are never dropped. Grouped routing keeps the same number in every group, or refuses.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import distributed
from .core.residency import current
from .core.stream import block_stream, model_device
from .models import SPECS, spec_for
from .models.moe import expert_count, expert_output, groups_of, is_moe_block, route, top_k
from .models.spec import get_module
from .registry import method_for_config
from .report import StructureReport, parameter_counts
from .surgery import block_widths, keep_experts_, write_config

log = logging.getLogger("prunekit")

CHUNK_TOKENS = 8192     # tokens per expert evaluation (bounds the memory of one expert's outputs)


@dataclass(frozen=True)
class ExpertsConfig:
    """How many routed experts to remove: exactly one of `sparsity` and `experts`."""
    sparsity: float | None = None   # fraction of each MoE block's routed experts removed (0.5 of 8 -> 4)
    experts: int | None = None      # routed experts kept per MoE block
    uniform: bool = True            # False: one global ranking over blocks decides each block's count

    def __post_init__(self):
        if (self.sparsity is None) == (self.experts is None):
            raise ValueError("give exactly one of sparsity (fraction of the routed experts to remove, e.g. 0.5) and "
                             f"experts (number kept per MoE block); got sparsity={self.sparsity!r}, "
                             f"experts={self.experts!r}")
        if self.sparsity is not None and (isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float))
                                          or not 0 < self.sparsity < 1):
            raise ValueError(f"sparsity must be a fraction of the routed experts in (0, 1), got {self.sparsity!r}")
        if self.experts is not None and (isinstance(self.experts, bool) or not isinstance(self.experts, int)
                                         or self.experts < 1):
            raise ValueError(f"experts must be a positive number of experts to keep per block, got {self.experts!r}")

    def to_keep(self, count: int) -> int:
        """Experts kept of `count` (removing at least one); refuses what cannot be done."""
        if self.experts is not None:
            keep, asked = self.experts, f"experts={self.experts}"
        else:
            keep, asked = count - math.floor(self.sparsity * count + 0.5), f"sparsity={self.sparsity}"
        if keep >= count:
            raise ValueError(f"{asked} removes no expert of {count}; keep fewer (at most experts={count - 1})")
        return keep


class ExpertStatistics:
    """Per-expert sums over the tokens routed to each expert (float64; `SUMS` add across processes).

        counts  tokens routed to the expert
        gate    sum of its routing weights
        norm    sum of ||expert output||_2
        reap    sum of routing weight x ||expert output||_2                    (REAP)
        easy    sum of weight x ||output|| x max(0, 1 - cos(residual before, after))   (EASY-EP)
    """
    SUMS = ("counts", "gate", "norm", "reap", "easy")

    def __init__(self, num_experts: int, device):
        for name in self.SUMS:
            setattr(self, name, torch.zeros(num_experts, dtype=torch.float64, device=device))
        self.tokens = 0

    def mean(self, name: str) -> Tensor:
        """The sum per routed token; 0 for an expert no token reached."""
        return getattr(self, name) / self.counts.clamp(min=1)


class RoutedTokens:
    """One MoE block's calibration traffic, on the compute device (tokens of every chunk, flattened).

    x (N, H) the MoE input, logits (N, E), chosen (N, k) and weights (N, k) the router's decision,
    before (N, H) the residual stream entering the MoE sublayer and after (N, H) the block output.
    """

    def __init__(self, block: nn.Module, moe, x, logits, chosen, weights, before, after, block_index: int = 0):
        self.block, self.moe, self.block_index = block, moe, block_index
        self.router = get_module(block, moe.router)
        self.experts = get_module(block, moe.experts)
        self.x, self.logits, self.chosen, self.weights = x, logits, chosen, weights
        self.before, self.after = before, after
        self.num_experts = expert_count(block, moe)
        self._statistics: ExpertStatistics | None = None

    def sample(self, max_tokens: int) -> Tensor:
        """Rows of an evenly strided sample of at most `max_tokens` of this block's tokens."""
        total = self.x.shape[0]
        return torch.arange(0, total, max(1, -(-total // max_tokens)), device=self.x.device)

    def routed_to(self, expert: int) -> tuple[Tensor, Tensor]:
        """(token rows, routing weights) of the tokens routed to `expert`."""
        rows, slot = torch.where(self.chosen == expert)
        return rows, self.weights[rows, slot].float()

    def expert_output(self, expert: int, rows: Tensor) -> Tensor:
        """The expert's output (weight 1) on the tokens `rows`, in chunks of CHUNK_TOKENS."""
        if rows.numel() == 0:
            return self.x.new_zeros(0, self.x.shape[1])
        return torch.cat([expert_output(self.experts, self.x[part], expert) for part in rows.split(CHUNK_TOKENS)])

    def statistics(self) -> ExpertStatistics:
        """The per-expert sums of every process's tokens (computed once per block)."""
        if self._statistics is None:
            stats = ExpertStatistics(self.num_experts, self.x.device)
            change = (1 - F.cosine_similarity(self.before.float(), self.after.float(), dim=-1)).clamp(min=0)
            for expert in range(self.num_experts):
                rows, weight = self.routed_to(expert)
                norm = self.expert_output(expert, rows).float().norm(dim=-1)
                stats.counts[expert] += rows.numel()
                stats.gate[expert] += weight.sum()
                stats.norm[expert] += norm.sum()
                stats.reap[expert] += (weight * norm).sum()
                stats.easy[expert] += (weight * norm * change[rows]).sum()
            stats.tokens = self.x.shape[0]
            distributed.reduce_stats_(stats)
            self._statistics = stats
        return self._statistics

    def reroute(self, rows: Tensor, excluded: Tensor) -> tuple[Tensor, Tensor]:
        """(weights, chosen) of the tokens `rows` when the experts in `excluded` (E,) bool are gone."""
        return route(self.moe, self.router, self.logits[rows], excluded)


def observe(step, moe) -> RoutedTokens:
    """Run the block's calibration chunks once and record its MoE traffic (see `RoutedTokens`)."""
    block = step.block
    router, norm = get_module(block, moe.router), get_module(block, moe.residual_norm)
    seen = {"x": [], "logits": [], "chosen": [], "weights": [], "before": []}

    def on_router(module, args, output):
        x = args[0]
        seen["x"].append(x.reshape(-1, x.shape[-1]).detach())
        logits, weights, chosen = output[0], output[1], output[2]
        k = chosen.shape[-1]
        seen["logits"].append(logits.reshape(-1, logits.shape[-1]).detach().float())
        seen["weights"].append(weights.reshape(-1, k).detach().float())
        seen["chosen"].append(chosen.reshape(-1, k).detach())

    def on_norm(module, args):
        residual = args[0]
        seen["before"].append(residual.reshape(-1, residual.shape[-1]).detach())

    handles = [router.register_forward_hook(on_router), norm.register_forward_pre_hook(on_norm)]
    try:
        step.forward()
    finally:
        for handle in handles:
            handle.remove()
    after = torch.cat([out.reshape(-1, out.shape[-1]).to(step.device) for out in step.outputs])
    return RoutedTokens(block, moe, *(torch.cat(seen[name]) for name in ("x", "logits", "chosen", "weights", "before")),
                        after, block_index=step.index)


def choose(scores: Tensor, keep: int, groups: int = 1) -> Tensor:
    """The `keep` experts with the highest scores, the same number from each of `groups` equal
    routing groups, in index order. Ties go to the lower index (stable)."""
    count = scores.numel()
    per_group, keep_per_group = count // groups, keep // groups
    kept = []
    for group in range(groups):
        part = scores[group * per_group:(group + 1) * per_group].double()
        order = sorted(range(per_group), key=lambda i: (-float(part[i]), i))
        kept += [group * per_group + i for i in order[:keep_per_group]]
    return torch.tensor(sorted(kept), dtype=torch.long)


def check_keep(block: nn.Module, moe, keep: int, index: int) -> None:
    """Refuse counts the router cannot route with: fewer than its top-k, or unequal per group."""
    count, k, router = expert_count(block, moe), top_k(block, moe), get_module(block, moe.router)
    if keep < k:
        raise ValueError(f"block {index}: keeping {keep} of {count} experts leaves fewer than the {k} each token is "
                         f"routed to (num_experts_per_tok={k}); keep at least {k} (--experts {k} or "
                         f"--sparsity <= {1 - k / count:.3g})")
    groups = groups_of(router)
    if groups > 1:
        if keep % groups:
            raise ValueError(f"block {index}: the router picks from {groups} groups (n_group={groups}) and experts are "
                             f"dropped equally per group, so the kept count must be a multiple of {groups}; "
                             f"{keep} of {count} is not (try --experts {max(groups, keep - keep % groups)})")
        per_group = keep // groups
        if per_group < 2:
            raise ValueError(f"block {index}: {per_group} expert per group would remain; the router scores each of "
                             f"its {groups} groups by its best two experts, so keep at least {2 * groups}")
        if k > router.topk_group * per_group:
            raise ValueError(f"block {index}: top-{k} routing over {router.topk_group} groups needs at least "
                             f"{-(-k // router.topk_group)} experts per group; {per_group} would remain")


def global_counts(shares: list[Tensor], total_keep: int, floors: list[int]) -> list[int]:
    """Non-uniform mode: how many experts each block keeps, by one ranking of every expert's share
    of its block's total score; each block keeps at least its floor (its top-k)."""
    counts = list(floors)
    rest = total_keep - sum(floors)
    if rest < 0:
        raise ValueError(f"the budget keeps {total_keep} experts in all, fewer than the blocks' top-k need "
                         f"({sum(floors)})")
    candidates = []
    for block, share in enumerate(shares):
        order = torch.argsort(share, descending=True, stable=True).tolist()
        candidates += [(float(share[i]), block, rank) for rank, i in enumerate(order) if rank >= floors[block]]
    candidates.sort(key=lambda c: (-c[0], c[1], c[2]))
    for _, block, _ in candidates[:rest]:
        counts[block] += 1
    return counts


def prune_experts_(model: nn.Module, config: ExpertsConfig, calib: Tensor | None = None, *, device=None,
                   batch_size: int = 8, cache_device=None, progress: bool = True) -> StructureReport:
    """Remove routed experts from every MoE block of `model` in place (see the module docstring)."""
    method = method_for_config(config)
    spec = spec_for(model)
    if spec.experts is None:
        moe_types = sorted(t for family in SPECS if family.experts is not None for t in family.model_types)
        raise ValueError(f"{method.name} prunes the routed experts of a Mixture-of-Experts model, but "
                         f"{model.config.model_type!r} ({type(model).__name__}) has no experts; MoE model types: "
                         + ", ".join(moe_types))
    if calib is None:
        raise ValueError(f"{method.name} scores experts on the tokens routed to them: pass calibration data")
    moe = spec.experts
    blocks = get_module(model, spec.blocks)
    moe_blocks = [i for i, block in enumerate(blocks) if is_moe_block(block, moe)]
    if not moe_blocks:
        raise ValueError(f"no block of this {model.config.model_type} model has routed experts")
    for i in moe_blocks:                           # refuse before any work
        keep = config.to_keep(expert_count(blocks[i], moe))
        if config.uniform:
            check_keep(blocks[i], moe, keep, i)
        elif groups_of(get_module(blocks[i], moe.router)) > 1:
            raise ValueError("non-uniform expert counts are not offered for grouped routing (n_group > 1): every "
                             "group must keep the same number; use the uniform default")
    block_before, model_before = parameter_counts(model)
    started = time.perf_counter()
    device = torch.device(device) if device is not None else model_device(model)
    report = StructureReport(method.name, config, block_before, 0, model_before, 0)
    report.scores = {"scores": {}, "kept": {}, "tokens_routed": {}}
    pending = {}                                   # non-uniform: block -> scores, until every block is scored

    for step in block_stream(model, calib, device=device, batch_size=batch_size, cache_device=cache_device,
                             progress=progress, desc=f"score {method.name}"):
        if step.index not in moe_blocks:
            continue
        routed = observe(step, moe)
        keep = config.to_keep(routed.num_experts) if config.uniform else None
        with torch.no_grad():
            scores = method.fn(routed, config, keep).double().cpu()
        report.scores["scores"][step.index] = [round(float(s), 6) for s in scores]
        report.scores["tokens_routed"][step.index] = [int(c) for c in routed.statistics().counts]
        if config.uniform:
            _apply(method, step.block, moe, routed, scores, keep, config, report, step.index)
            step.outputs = None              # run again: the next block sees the pruned outputs
            step.changed = True
        else:
            pending[step.index] = scores
        del routed

    if pending:
        residency = current()
        shares = [s.clamp(min=0) / max(float(s.clamp(min=0).sum()), 1e-30) for s in pending.values()]
        floors = [top_k(blocks[i], moe) for i in pending]
        total = sum(config.to_keep(expert_count(blocks[i], moe)) for i in pending)
        for (index, scores), keep in zip(pending.items(), global_counts(shares, total, floors)):
            residency.load(blocks[index], device)
            if keep < expert_count(blocks[index], moe):
                _apply(method, blocks[index], moe, None, scores, keep, config, report, index)
            else:
                report.scores["kept"][index] = list(range(expert_count(blocks[index], moe)))
            residency.unload(blocks[index], changed=True)

    write_config(model)
    report.block_params_after, report.model_params_after = parameter_counts(model)
    report.widths = block_widths(model)
    report.seconds = time.perf_counter() - started
    counts = sorted({w["experts"] for w in report.widths if "experts" in w})
    report.notes.append(f"routed experts per MoE block: {counts[0]}" if len(counts) == 1 else
                        "routed experts per MoE block differ (" + ", ".join(map(str, counts)) +
                        "): the export records them in prunekit.json and loads with prunekit.load_pruned")
    log.info("%s: removed %.2f%% of the block parameters", method.name, 100 * report.removed_fraction)
    return report


def _apply(method, block, moe, routed, scores: Tensor, keep: int, config, report, index: int) -> None:
    """Keep the chosen experts of one block (or let a merging method fold the others in)."""
    groups = groups_of(get_module(block, moe.router))
    kept = choose(scores, keep, groups)
    apply = getattr(method, "apply", None)
    with torch.no_grad():
        if apply is not None:
            apply(block, moe, routed, kept, config)
        else:
            keep_experts_(block, moe, kept)
    report.scores["kept"][index] = kept.tolist()
