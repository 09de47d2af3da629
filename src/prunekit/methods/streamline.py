"""LLM-Streamline: replace the most redundant run of blocks by one trained block.

Chen et al., "Compressing Large Language Models by Streamlining the Unimportant Layer" (LLM-Streamline),
arXiv 2403.19135. Two steps:

1. Layer pruning. With x_l the hidden state entering block l (x_L the last block's output) and a
   run of s = k + 1 consecutive blocks l .. l+k, the run's redundancy is the cosine similarity of
   what enters and what leaves it, averaged over every token of every calibration window:
       sim(l) = E_tokens [ cos(x_l, x_{l+s}) ],           l* = argmax_l sim(l)   (ties: the lower l)
2. Layer replacement. The run is replaced by one lightweight layer f trained on the calibration
   hidden states to map the run's input to its output:
       min_f  MSE( f(x_{l*}), x_{l*+s} )

Count semantics: `layers` / `sparsity` count the blocks removed in total, k. The run holds k + 1
blocks; one block stays in its place as the replacement, so the model loses exactly k blocks
(BlockChoice.remove = l*+1 .. l*+k). This matches the authors' code, which compares
hidden_states[l] with hidden_states[l + k + 1], initialises the replacement from block l* and
shrinks the config by k.

The replacement is a stock decoder block (the paper's "transformer layer" option): a copy of the
run's first block l*, trained from there, written back into block l*. It runs with block l*'s
forward arguments (its attention type, rotary tables and mask; Gemma's per-layer sliding window
stays right), so the output is a stock checkpoint with k fewer blocks that loads with
`AutoModelForCausalLM.from_pretrained`.

Not implemented: the paper's other replacement, a linear layer (or small FFN) standing for the
run. No stock config describes a model in which one position holds a linear map instead of a
decoder block, and `prunekit.load_pruned` cannot build one either: it re-slices stock blocks to
recorded widths (heads, FFN channels, experts, a dropped sublayer) and loads safetensors into the
stock class, with no custom modules. A linear replacement would need custom modeling code (or a
pickle), which the design rules out for exports.

Training (ours): AdamW on the replacement's parameters, `steps` steps, one calibration chunk
(`batch_size` windows) per step in a seeded order (a new permutation per pass over the chunks),
constant learning rate, gradient clipping at `max_grad_norm` (the authors clip at 5); on the
compute device, in float32 (a copy; written back in the model's dtype), the block in eval mode.
The authors train on a separate SlimPajama sample with a cosine schedule and keep the epoch with
the best validation MSE; here the data are the calibration windows (`samples` of them) and the
reported MSE before/after is measured on them.

Cost: one dense pass that caches every block boundary (`depth.BlockCache`: L+1 copies of the
hidden states of the windows used), then `steps` forward/backward passes of one block over one
chunk. Distributed calibration is refused (the training is not synchronised across processes).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import distributed
from ..core.stream import to_device
from ..depth import BlockCache, BlockChoice, DepthConfig, first_windows, onloaded
from ..registry import register
from .block_influence import cosine_sum


@dataclass(frozen=True)
class StreamlineConfig(DepthConfig):
    steps: int = 200                    # optimizer steps for the replacement block
    lr: float = 1e-4                    # AdamW learning rate, constant
    weight_decay: float = 0.0
    max_grad_norm: float | None = 5.0   # clip the gradient norm (the authors' 5); None: no clipping
    seed: int = 0                       # order of the training chunks
    samples: int | None = None          # use only the first N calibration windows; None: all

    def __post_init__(self):
        super().__post_init__()
        for name, low in (("steps", 1), ("seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        for name, positive in (("lr", True), ("weight_decay", False), ("max_grad_norm", True)):
            value = getattr(self, name)
            if value is None and name == "max_grad_norm":
                continue
            try:            # YAML reads 1e-4 as a string: numeric strings are accepted
                number = math.nan if isinstance(value, bool) else float(value)
            except (TypeError, ValueError):
                number = math.nan
            if not (number > 0 if positive else number >= 0):
                raise ValueError(f"{name} must be a {'positive' if positive else 'non-negative'} number"
                                 f"{' or None (no clipping)' if name == 'max_grad_norm' else ''}, got {value!r}")
            object.__setattr__(self, name, number)
        if self.samples is not None and (isinstance(self.samples, bool) or not isinstance(self.samples, int)
                                         or self.samples < 1):
            raise ValueError(f"samples must be a positive number of calibration windows or None (all), "
                             f"got {self.samples!r}")


# ----------------------------------------------------------------------------------------------
# The math
# ----------------------------------------------------------------------------------------------

def run_similarities(boundaries: list[list[Tensor]], count: int) -> list[float]:
    """sim(l) for every run of count + 1 blocks: the mean cosine over every token between
    boundaries[l] (the run's input) and boundaries[l + count + 1] (its output).

    boundaries[i]: the hidden states entering block i, boundaries[L] the last block's output, each
    one (batch, seq, hidden) tensor per calibration chunk."""
    span = count + 1
    out = []
    for start in range(len(boundaries) - span):
        total, tokens = cosine_sum(boundaries[start], boundaries[start + span])
        out.append(total / tokens)
    return out


def best_run(similarities: list[float]) -> int:
    """The first block of the most redundant run: the highest similarity, ties to the lower block."""
    return max(range(len(similarities)), key=lambda start: (similarities[start], -start))


def mean_squared_error(module: nn.Module, forward: Callable[[nn.Module, int], Tensor], targets: list[Tensor]) -> float:
    """MSE of forward(module, i) against targets[i], over every element of every chunk."""
    total, count = 0.0, 0
    with torch.no_grad():
        for i, target in enumerate(targets):
            out = forward(module, i).float()
            total += float(F.mse_loss(out, target.to(out.device).float(), reduction="sum"))
            count += target.numel()
    return total / count


def fit(module: nn.Module, forward: Callable[[nn.Module, int], Tensor], targets: list[Tensor], *, steps: int,
        lr: float, weight_decay: float = 0.0, max_grad_norm: float | None = None, seed: int = 0) -> list[float]:
    """Train `module` in place so that forward(module, i) matches targets[i] (MSE); returns each step's loss.

    AdamW over all of `module`'s parameters; step s uses chunk order[s mod n] of a seeded
    permutation of the n chunks (a new one per pass): a pure function of `seed`."""
    params = list(module.parameters())
    for param in params:
        param.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    losses = []
    with torch.enable_grad():
        for step in range(steps):
            if not order:
                order = torch.randperm(len(targets), generator=generator).tolist()
            i = order.pop(0)
            out = forward(module, i).float()
            loss = F.mse_loss(out, targets[i].to(out.device).float())
            if not torch.isfinite(loss):
                raise RuntimeError(f"streamline: the replacement's MSE is {float(loss)} at step {step + 1}; "
                                   f"lower lr (lr={lr:g})")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            losses.append(float(loss.detach()))
    for param in params:
        param.requires_grad_(False)
    return losses


# ----------------------------------------------------------------------------------------------
# The driver
# ----------------------------------------------------------------------------------------------

def _float32(value):
    """Floating tensors (rotary tables, additive masks) in float32, like the trained copy of the block."""
    if isinstance(value, Tensor):
        return value.float() if value.is_floating_point() else value
    if isinstance(value, dict):
        return {k: _float32(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_float32(v) for v in value)
    return value


def block_runner(step, inputs: list[Tensor], device) -> Callable[[nn.Module, int], Tensor]:
    """forward(module, i): `module` on chunk i of `inputs` with block `step`'s forward arguments, float32."""
    def forward(module: nn.Module, i: int) -> Tensor:
        args, kwargs = _float32(to_device(step.kwargs[i], device))
        out = module(inputs[i].to(device).float(), *args, **kwargs)
        return out[0] if isinstance(out, tuple) else out
    return forward


@register("streamline", StreamlineConfig, scope="depth", calibrated=True)
def streamline(model, calib: Tensor, cfg: StreamlineConfig, *, device=None, batch_size: int = 8, cache_device=None,
               progress: bool = True) -> BlockChoice:
    """Choose the run, train its replacement block, write it into the run's first block.

    scores: {"similarity": [sim(l) for l = 0 .. L-k-1] (index = first block of the run of k+1),
             "run": [l*, ..., l*+k], "mse_before": MSE of block l* as initialised, "mse_after": trained,
             "losses": per-step training MSE}.
    """
    distributed.refuse("streamline (its replacement block trains in one process)")
    windows = first_windows(calib, cfg.samples)
    cache = BlockCache(model, windows, device=device, batch_size=batch_size, cache_device=cache_device,
                       progress=progress, desc="cache streamline")
    count = cfg.blocks_to_remove(cache.num_blocks)
    boundaries = [*cache.inputs, cache.output]
    similarities = run_similarities(boundaries, count)
    start = best_run(similarities)
    run = list(range(start, start + count + 1))
    inputs, targets = boundaries[start], boundaries[start + count + 1]
    step = cache.steps[start]
    with onloaded(torch.device("cpu"), step.block):               # out of core: read it from disk
        replacement = copy.deepcopy(step.block).float()
    replacement.to(cache.device).eval()
    forward = block_runner(step, inputs, cache.device)
    with torch.random.fork_rng(devices=[cache.device] if cache.device.type == "cuda" else []):
        torch.manual_seed(cfg.seed)
        before = mean_squared_error(replacement, forward, targets)
        losses = fit(replacement, forward, targets, steps=cfg.steps, lr=cfg.lr, weight_decay=cfg.weight_decay,
                     max_grad_norm=cfg.max_grad_norm, seed=cfg.seed)
        after = mean_squared_error(replacement, forward, targets)
    replacement.to("cpu")
    with torch.no_grad(), onloaded(torch.device("cpu"), step.block, changed=True):
        for target, trained in zip(step.block.parameters(), replacement.parameters(), strict=True):
            target.copy_(trained)
    removed = run[1:]
    notes = [f"streamline replaced blocks {run[0]}..{run[-1]} (input/output cosine {similarities[start]:.4f}) by "
             f"block {start} trained for {cfg.steps} steps: MSE {before:.4g} -> {after:.4g} on the calibration "
             f"windows (block {start} was changed in place)"]
    return BlockChoice(removed, {"similarity": similarities, "run": run, "mse_before": before, "mse_after": after,
                                 "losses": losses}, notes)
